//! Stage 0 on CUDA (kernels/router.ptx): `logits [T, E] = x [T, H] · Wᵀ (+ bias [E])`, one
//! warp per tile of 4 tokens × 4 experts, f32 accumulation in a fixed order (the kernel
//! header gives it). One template, one module variant per weight dtype.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::cuda::act::ActView;
use crate::cuda::context::drv;
use crate::cuda::context::{check_len, to_u32, MAX_INDEX};
use crate::cuda::ptx::PtxModule;
use crate::cuda::{CudaDevice, CudaWeights};
use crate::error::Result;
use crate::stage::Stage;
use crate::tensor::DType;

/// Tokens (and experts) per warp tile: the kernel's 4 × 4 tile.
const TILE: usize = 4;
/// Warps per block (`block (128, 1, 1)` in the header).
const WARPS_PER_BLOCK: usize = 4;

/// The module variant for weights of `w` and activations `x`: `router.<w>` (x f32, the
/// original three) or `router.<w>.a<x>` (x f16 / bf16).
fn variant(w: DType, x: DType) -> String {
    match x {
        DType::F32 => format!("router.{}", w.name()),
        _ => format!("router.{}.a{}", w.name(), x.name()),
    }
}

/// The load-and-widen sequence of weight `j` (placeholder `LOAD_W<j>`).
fn load_w(dtype: DType, j: usize) -> String {
    match dtype {
        DType::F32 => format!("ld.global.nc.f32    %wv{j}, [%pw{j}];"),
        DType::F16 => format!("ld.global.nc.b16    %hw{j}, [%pw{j}];\n\tcvt.f32.f16         %wv{j}, %hw{j};"),
        DType::BF16 => format!(
            "ld.global.nc.u16    %uw{j}, [%pw{j}];\n\tshl.b32             %uw{j}, %uw{j}, 16;\n\tmov.b32             %wv{j}, %uw{j};"
        ),
    }
}

/// The load-and-widen sequence of activation `i` (placeholder `LOAD_X<i>`).
fn load_x(dtype: DType, i: usize) -> String {
    match dtype {
        DType::F32 => format!("ld.global.nc.f32    %xv{i}, [%px{i}];"),
        DType::F16 => format!("ld.global.nc.b16    %hx{i}, [%px{i}];\n\tcvt.f32.f16         %xv{i}, %hx{i};"),
        DType::BF16 => format!(
            "ld.global.nc.u16    %ux{i}, [%px{i}];\n\tshl.b32             %ux{i}, %ux{i}, 16;\n\tmov.b32             %xv{i}, %ux{i};"
        ),
    }
}

/// Activation dtypes, f32 first (the f32 variants keep their original names and bytes).
const ACT_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Every module variant of this stage: `router.<w>` for f32 activations and
/// `router.<w>.a<x>` for f16 / bf16 activations, for every weight dtype `w`.
pub fn modules() -> Result<Vec<PtxModule>> {
    let mut out = Vec::new();
    for x in ACT_DTYPES {
        for w in DType::ALL {
            let (size, xsize) = (w.size(), x.size());
            let mut subs = vec![
                ("W_TYPE", w.name().to_string()),
                ("W_SHIFT", size.trailing_zeros().to_string()),
                ("W_STEP", (32 * size).to_string()),
                ("X_TYPE", x.name().to_string()),
                ("X_SHIFT", xsize.trailing_zeros().to_string()),
                ("X_STEP", (32 * xsize).to_string()),
            ];
            for j in 0..4 {
                subs.push((
                    ["LOAD_W0", "LOAD_W1", "LOAD_W2", "LOAD_W3"][j],
                    load_w(w, j),
                ));
                subs.push((
                    ["LOAD_X0", "LOAD_X1", "LOAD_X2", "LOAD_X3"][j],
                    load_x(x, j),
                ));
            }
            let tag = if x == DType::F32 { "a32" } else { "a16" };
            out.push(PtxModule::specialise(
                Stage::Router,
                variant(w, x),
                &[tag],
                &subs,
            )?);
        }
    }
    Ok(out)
}

/// Launches `logits [T, E] = x [T, H] · wᵀ (+ bias [E])` on the device's stream; `x` in
/// any activation dtype (widened to f32 on load), logits and bias f32. Buffers may be larger
/// than `T` rows; the grid comes from `tokens`.
pub fn launch(
    dev: &CudaDevice,
    x: &ActView<'_>,
    tokens: usize,
    w: &CudaWeights,
    bias: Option<&CudaSlice<f32>>,
    logits: &mut CudaSlice<f32>,
) -> Result<()> {
    let (experts, hidden) = (w.rows, w.cols);
    let mul = |what: &str, a: usize, b: usize| crate::shape::mul(Stage::Router, what, a, b);
    x.meta(&dev.stream)
        .check(Stage::Router, "x", x.dtype, mul("T x H", tokens, hidden)?)?;
    check_len(
        Stage::Router,
        "router weight bytes",
        w.bytes.len(),
        mul(
            "E x H x size",
            mul("E x H", experts, hidden)?,
            w.dtype.size(),
        )?,
    )?;
    check_len(
        Stage::Router,
        "logits",
        logits.len(),
        mul("T x E", tokens, experts)?,
    )?;
    if let Some(b) = bias {
        check_len(Stage::Router, "router bias", b.len(), experts)?;
    }
    if tokens == 0 || experts == 0 {
        return Ok(());
    }
    // MOE_CUDA_KERNELS=next: tensor cores when x and W are one 16-bit dtype.
    let x_addr = x.meta(&dev.stream).addr;
    if crate::cuda::router_mma::applies(dev.kernels, x.dtype, w.dtype, hidden, x_addr) {
        return crate::cuda::router_mma::launch(dev, x, tokens, w, bias, logits);
    }
    let warps = mul("warp tiles", tokens.div_ceil(TILE), experts.div_ceil(TILE))?;
    to_u32(Stage::Router, "warp tiles", warps, MAX_INDEX)?;
    let t = to_u32(Stage::Router, "tokens", tokens, MAX_INDEX)?;
    let e = to_u32(Stage::Router, "experts", experts, MAX_INDEX)?;
    let h = to_u32(Stage::Router, "hidden", hidden, MAX_INDEX)?;
    let blocks = warps.div_ceil(WARPS_PER_BLOCK) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: ((32 * WARPS_PER_BLOCK) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let func = dev.function(Stage::Router, &variant(w.dtype, x.dtype), "router_logits")?;
    let null: u64 = 0;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(&x.bytes).arg(&w.bytes);
    match bias {
        Some(bias) => b.arg(bias),
        None => b.arg(&null),
    };
    b.arg(&mut *logits).arg(&t).arg(&e).arg(&h);
    // SAFETY: matches the header of kernels/router.ptx `router_logits` in the variant of
    // (w.dtype, x.dtype): x_ptr ([T, H] in x's dtype, element-aligned), w_ptr (W [E, H] in
    // the variant's dtype), bias_ptr (f32 [E] or 0), logits_ptr (f32 [T, E]), tokens,
    // experts, hidden (u32); every length was checked above (buffers may be longer), T, E >= 1,
    // and the grid is the header's (ceil(warps / 4), 1, 1) × (128, 1, 1).
    drv(unsafe { b.launch(cfg) }, "launching router_logits")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_renders_without_placeholders() {
        let m = modules().unwrap();
        assert_eq!(m.len(), 9);
        for v in &m {
            assert!(!v.source.contains("${"), "{}", v.variant);
            assert!(v.source.is_ascii(), "{}", v.variant);
            assert!(v.source.contains(".entry router_logits("), "{}", v.variant);
        }
        let by = |name: &str| &m.iter().find(|v| v.variant == name).unwrap().source;
        assert!(by("router.f16").contains("cvt.f32.f16"));
        for w in DType::ALL {
            // f32 x: 4-byte loads, 128-byte steps, no 16-bit x temporaries.
            let s = by(&variant(w, DType::F32));
            assert!(s.contains("ld.global.nc.f32    %xv0, [%px0];"), "{w}");
            assert!(s.contains("add.s64             %px0, %px0, 128;"), "{w}");
            assert!(!s.contains("%hx") && !s.contains("%ux"), "{w}");
            let s = by(&variant(w, DType::F16));
            assert!(s.contains("ld.global.nc.b16    %hx3, [%px3];"), "{w}");
            assert!(s.contains("cvt.f32.f16         %xv3, %hx3;"), "{w}");
            assert!(s.contains("add.s64             %px0, %px0, 64;"), "{w}");
            let s = by(&variant(w, DType::BF16));
            assert!(s.contains("ld.global.nc.u16    %ux2, [%px2];"), "{w}");
            assert!(s.contains("shl.b32             %ux2, %ux2, 16;"), "{w}");
            assert!(s.contains("shl.b64             %off, %off, 1;\n\tadd.s64             %px1"));
        }
    }

    #[test]
    fn error_helpers_name_the_stage() {
        assert!(check_len(Stage::Router, "x", 1, 2).is_err());
        assert!(to_u32(Stage::Router, "n", 1 << 31, MAX_INDEX).is_err());
        assert_eq!(to_u32(Stage::Router, "n", 5, MAX_INDEX).unwrap(), 5);
    }

    fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
        let num: f64 = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| (f64::from(x) - y).powi(2))
            .sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        if den == 0.0 {
            num.sqrt()
        } else {
            (num / den).sqrt()
        }
    }

    /// On a CUDA device (skipped without one): every dtype against the CPU reference, bitwise
    /// repeatable, and a token's logits independent of the batch it is in.
    #[test]
    fn matches_cpu_reference_on_device() {
        let Ok(dev) = CudaDevice::new(0) else {
            println!("router: no CUDA device, device test skipped");
            return;
        };
        let mut g = crate::synth::Gen::new(3);
        for &(t, e, h) in &[
            (0, 5, 8),
            (1, 1, 1),
            (7, 5, 13),
            (37, 16, 64),
            (300, 61, 33),
            (5, 256, 2048),
        ] {
            for (xi, xdtype) in ACT_DTYPES.into_iter().enumerate() {
                let x = crate::synth::random_x(t, h, 7).cast(xdtype);
                let xbuf = dev.upload(&crate::cuda::act::tensor_bytes(&x)).unwrap();
                let xd = ActView {
                    bytes: xbuf.slice(..),
                    dtype: xdtype,
                };
                // 16-bit x: one weight dtype per x dtype keeps the test short.
                for dtype in DType::ALL
                    .into_iter()
                    .filter(|&d| xi == 0 || d == DType::ALL[xi])
                {
                    let w = g.tensor(&[e, h], 0.3).cast(dtype);
                    for with_bias in [false, true] {
                        let b = g.tensor(&[e], 0.5);
                        let reference =
                            crate::cpu::router::router_logits(&x, &w, with_bias.then_some(&b))
                                .unwrap();
                        let wd = CudaWeights::upload(&dev, &w).unwrap();
                        let bd = dev.upload(&b.to_f32_vec()).unwrap();
                        let bias = with_bias.then_some(&bd);
                        let mut out = dev.upload(&vec![f32::NAN; t * e]).unwrap();
                        launch(&dev, &xd, t, &wd, bias, &mut out).unwrap();
                        let got = dev.read(&out, t * e).unwrap();
                        let err = rel_l2(&got, &reference);
                        assert!(
                        err <= 2e-5,
                        "w {dtype} x {xdtype} T={t} E={e} H={h} bias={with_bias}: rel L2 {err:e}"
                    );
                        launch(&dev, &xd, t, &wd, bias, &mut out).unwrap();
                        let again = dev.read(&out, t * e).unwrap();
                        assert!(
                            got.iter()
                                .zip(&again)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "repeatable"
                        );
                        if t > 1 {
                            let mut one = dev.upload(&vec![f32::NAN; e]).unwrap();
                            let x1 = ActView {
                                bytes: xbuf.slice((t - 1) * h * xdtype.size()..),
                                dtype: xdtype,
                            };
                            launch(&dev, &x1, 1, &wd, bias, &mut one).unwrap();
                            let one = dev.read(&one, e).unwrap();
                            let last = &got[(t - 1) * e..];
                            assert!(
                                one.iter()
                                    .zip(last)
                                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                                "batch-independent"
                            );
                        }
                    }
                }
            }
        }
        println!("router: device test ran on {}", dev.name);
    }
}
