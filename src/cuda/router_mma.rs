//! Stage 0 on tensor cores (kernels/router_mma.ptx, opt-in `MOE_CUDA_KERNELS=next`):
//! `logits [T, E] = x [T, H] · Wᵀ (+ bias)` with mma.sync m16n8k16 (f32 accumulation) when x
//! and W are the same 16-bit dtype (bf16 or f16), so no operand is rounded. Tiles of 64 tokens
//! × 64 experts, an 8-stage `cp.async` ring of 16-byte copies. f32 activations, mixed dtypes,
//! `H % 8 != 0` or an unaligned x run the verified kernel (kernels/router.ptx).

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use crate::cuda::act::ActView;
use crate::cuda::context::{drv, to_u32, MAX_INDEX};
use crate::cuda::ptx::PtxModule;
use crate::cuda::{CudaDevice, CudaWeights, KernelSet};
use crate::error::Result;
use crate::stage::Stage;
use crate::tensor::DType;

/// The template, embedded at build time.
const TEMPLATE: &str = include_str!("../../kernels/router_mma.ptx");
/// Ring depth: 8 stages keep 32 KiB of x in flight per block, which the few blocks of a
/// small-E router (ceil(T / 64) of them) need to stream x near HBM bandwidth.
const STAGES: usize = 8;
/// Tokens (and experts) per block tile.
pub const TILE: usize = 64;
/// Dynamic shared memory: `STAGES` stages of x and W tiles, 4 KiB each.
pub const SMEM_BYTES: usize = STAGES * 8192;

/// The module of dtype `w` (x and W both): `router_mma.<w>`, entry `router_mma_<w>`.
fn name(w: DType) -> String {
    format!("router_mma.{}", w.name())
}

/// MMA_PAIRS: per valid pair p of n8 tiles (2p, 2p+1), one ldmatrix.x4 of W and two mma; the
/// pairs past E are skipped (r_np, warp-uniform).
fn mma_pairs(w: DType) -> String {
    let w = w.name();
    let mut s = Vec::new();
    for p in 0..4 {
        if p > 0 {
            s.push(format!(
                "    setp.le.u32     p_c, r_np, {p};\n    @p_c bra.uni    MM_KK_NEXT;"
            ));
        }
        let (j0, j1) = (2 * p, 2 * p + 1);
        s.push(format!(
            "    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{r_bf0, r_bf1, r_bf2, r_bf3}}, [r_b+{off}];
    mma.sync.aligned.m16n8k16.row.col.f32.{w}.{w}.f32 {{{a0}}}, {{r_af0, r_af1, r_af2, r_af3}}, {{r_bf0, r_bf1}}, {{{a0}}};
    mma.sync.aligned.m16n8k16.row.col.f32.{w}.{w}.f32 {{{a1}}}, {{r_af0, r_af1, r_af2, r_af3}}, {{r_bf2, r_bf3}}, {{{a1}}};",
            off = 1024 * p,
            a0 = acc(j0),
            a1 = acc(j1),
        ));
    }
    s.join("\n")
}

/// The four accumulators of n8 tile j.
fn acc(j: usize) -> String {
    (0..4)
        .map(|q| format!("f_acc{}", 4 * j + q))
        .collect::<Vec<_>>()
        .join(", ")
}

/// C_STORE: the warp's accumulators to the shared C tile at r_a (row g, column 2t): n8 tile j
/// at +32 j bytes, rows g + 8 at +8 * 272.
fn c_store() -> String {
    (0..8)
        .map(|j| {
            format!(
                "    st.shared.v2.f32 [r_a+{o0}], {{f_acc{a}, f_acc{b}}};\n    st.shared.v2.f32 [r_a+{o1}], {{f_acc{c}, f_acc{d}}};",
                o0 = 32 * j,
                o1 = 32 * j + 8 * 272,
                a = 4 * j,
                b = 4 * j + 1,
                c = 4 * j + 2,
                d = 4 * j + 3
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module variant: `router_mma.bf16` and `router_mma.f16`.
pub fn modules() -> Result<Vec<PtxModule>> {
    [DType::BF16, DType::F16]
        .into_iter()
        .map(|w| {
            let zero = (0..32)
                .map(|i| format!("    mov.f32         f_acc{i}, 0f00000000;"))
                .collect::<Vec<_>>()
                .join("\n");
            let subs = vec![
                ("VARIANT", name(w)),
                ("WT", w.name().to_string()),
                ("STAGES", STAGES.to_string()),
                ("STAGES_M1", (STAGES - 1).to_string()),
                ("WAIT_PENDING", (STAGES - 2).to_string()),
                ("SMEM_BYTES", SMEM_BYTES.to_string()),
                ("ACC_ZERO", zero),
                ("MMA_PAIRS", mma_pairs(w)),
                ("C_STORE", c_store()),
            ];
            PtxModule::from_template(Stage::Router, TEMPLATE, name(w), &[], &subs)
        })
        .collect()
}

/// Whether the tensor-core router runs: the `next` set, x and W the same 16-bit dtype,
/// `H % 8 == 0` and a 16-byte aligned x base (16-byte copies of whole rows).
pub fn applies(kernels: KernelSet, x: DType, w: DType, hidden: usize, x_addr: u64) -> bool {
    kernels == KernelSet::Next && x == w && w != DType::F32 && hidden % 8 == 0 && x_addr % 16 == 0
}

/// Blocks of a launch: `ceil(T / 64) · ceil(E / 64)`.
pub fn grid_blocks(tokens: usize, experts: usize) -> usize {
    tokens.div_ceil(TILE) * experts.div_ceil(TILE)
}

/// Launches the tensor-core router (the caller, `router::launch`, checked every length and
/// that [`applies`] holds; T, E >= 1).
pub fn launch(
    dev: &CudaDevice,
    x: &ActView<'_>,
    tokens: usize,
    w: &CudaWeights,
    bias: Option<&CudaSlice<f32>>,
    logits: &mut CudaSlice<f32>,
) -> Result<()> {
    let st = Stage::Router;
    let (experts, hidden) = (w.rows, w.cols);
    let x_addr = x.bytes.device_ptr(&dev.stream).0;
    if !applies(KernelSet::Next, x.dtype, w.dtype, hidden, x_addr) {
        return Err(crate::error::Error::shape(
            st,
            "router_mma needs x and W of one 16-bit dtype, H % 8 == 0 and a 16-byte aligned x",
        ));
    }
    let blocks = grid_blocks(tokens, experts);
    let b32 = to_u32(st, "router blocks", blocks, MAX_INDEX)?;
    let t = to_u32(st, "tokens", tokens, MAX_INDEX)?;
    let e = to_u32(st, "experts", experts, MAX_INDEX)?;
    let h = to_u32(st, "hidden", hidden, MAX_INDEX)?;
    let func = dev.function(
        st,
        &name(w.dtype),
        &format!("router_mma_{}", w.dtype.name()),
    )?;
    drv(
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            SMEM_BYTES as i32,
        ),
        "raising the tensor-core router's shared memory limit",
    )?;
    let cfg = LaunchConfig {
        grid_dim: (b32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: SMEM_BYTES as u32,
    };
    let null: u64 = 0;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(&x.bytes).arg(&w.bytes);
    match bias {
        Some(bias) => b.arg(bias),
        None => b.arg(&null),
    };
    b.arg(&mut *logits).arg(&t).arg(&e).arg(&h);
    // SAFETY: matches the header of kernels/router_mma.ptx `router_mma_<w>`: x_ptr ([T, H] of
    // the variant's dtype, 16-byte aligned, H % 8 == 0: checked above), w_ptr (W [E, H] of the
    // same dtype), bias_ptr (f32 [E] or 0), logits_ptr (f32 [T, E]), tokens, experts, hidden;
    // router::launch checked every length (buffers may be longer), T, E >= 1; the kernel
    // zero-fills past T, E and H and stores only existing (token, expert) pairs. Grid
    // ceil(T/64) ceil(E/64) blocks of 128 threads, 64 KiB of dynamic shared memory (the
    // attribute raised above).
    drv(unsafe { b.launch(cfg) }, "launching router_mma")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_variants_render() {
        let m = modules().unwrap();
        assert_eq!(m.len(), 2);
        for (v, w) in m.iter().zip(["bf16", "f16"]) {
            let s = &v.source;
            assert!(s.is_ascii() && !s.contains("${"), "{}", v.variant);
            assert!(s.contains(&format!(".entry router_mma_{w}(")));
            let mma = format!("mma.sync.aligned.m16n8k16.row.col.f32.{w}.{w}.f32");
            assert_eq!(s.matches(&mma).count(), 8, "{}", v.variant);
            assert_eq!(s.matches("cp.async.cg.shared.global").count(), 4);
            assert_eq!(s.matches("st.global.f32   [d_t], f_v;").count(), 1);
            assert_eq!(s.matches("st.shared.v2.f32").count(), 16);
            assert!(
                !s.contains("cvt.rn"),
                "{}: no operand is converted",
                v.variant
            );
        }
    }

    #[test]
    fn it_applies_to_matching_16_bit_dtypes_only() {
        let n = KernelSet::Next;
        assert!(applies(n, DType::BF16, DType::BF16, 4096, 0));
        assert!(applies(n, DType::F16, DType::F16, 8, 256));
        assert!(!applies(
            KernelSet::Verified,
            DType::BF16,
            DType::BF16,
            4096,
            0
        ));
        assert!(!applies(n, DType::F32, DType::F32, 4096, 0));
        assert!(!applies(n, DType::F32, DType::BF16, 4096, 0));
        assert!(!applies(n, DType::F16, DType::BF16, 4096, 0));
        assert!(!applies(n, DType::BF16, DType::BF16, 4100, 0));
        assert!(!applies(n, DType::BF16, DType::BF16, 4096, 8));
        assert_eq!(grid_blocks(4096, 256), 64 * 4);
        assert_eq!(grid_blocks(1, 8), 1);
    }

    /// On a CUDA device (skipped without one): the tensor-core router against the CPU
    /// reference (rel L2 <= 2e-5, as the verified router), bitwise repeatable and independent
    /// of the batch a token is in, with and without bias, T and E off the 64-tiles.
    #[test]
    fn matches_cpu_reference_on_device() {
        let Ok(mut dev) = CudaDevice::new(0) else {
            println!("router_mma: no CUDA device, device test skipped");
            return;
        };
        dev.kernels = KernelSet::Next;
        let mut g = crate::synth::Gen::new(5);
        for &(t, e, h) in &[(1, 8, 64), (37, 16, 4096), (300, 61, 40), (130, 256, 2048)] {
            for dt in [DType::BF16, DType::F16] {
                let x = crate::synth::random_x(t, h, 7).cast(dt);
                let xb = dev.upload(&crate::cuda::act::tensor_bytes(&x)).unwrap();
                let w = g.tensor(&[e, h], 0.3).cast(dt);
                let wd = CudaWeights::upload(&dev, &w).unwrap();
                let b = g.tensor(&[e], 0.5);
                let bd = dev.upload(&b.to_f32_vec()).unwrap();
                for with_bias in [false, true] {
                    let want =
                        crate::cpu::router::router_logits(&x, &w, with_bias.then_some(&b)).unwrap();
                    let bias = with_bias.then_some(&bd);
                    let xv = ActView {
                        bytes: xb.slice(..),
                        dtype: dt,
                    };
                    let mut out = dev.upload(&vec![f32::NAN; t * e]).unwrap();
                    crate::cuda::router::launch(&dev, &xv, t, &wd, bias, &mut out).unwrap();
                    let got = dev.read(&out, t * e).unwrap();
                    let num: f64 = got
                        .iter()
                        .zip(&want)
                        .map(|(&a, &b)| (f64::from(a) - b).powi(2))
                        .sum();
                    let den: f64 = want.iter().map(|b| b * b).sum();
                    let err = (num / den.max(f64::MIN_POSITIVE)).sqrt();
                    let ctx = format!("{dt} T={t} E={e} H={h} bias={with_bias}");
                    assert!(err <= 2e-5, "{ctx}: rel L2 {err:e}");
                    crate::cuda::router::launch(&dev, &xv, t, &wd, bias, &mut out).unwrap();
                    assert_eq!(
                        dev.read(&out, t * e)
                            .unwrap()
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>(),
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{ctx}: repeatable"
                    );
                    if t > 1 {
                        let x1 = ActView {
                            bytes: xb.slice((t - 1) * h * dt.size()..),
                            dtype: dt,
                        };
                        let mut one = dev.upload(&vec![f32::NAN; e]).unwrap();
                        crate::cuda::router::launch(&dev, &x1, 1, &wd, bias, &mut one).unwrap();
                        let one = dev.read(&one, e).unwrap();
                        let last = &got[(t - 1) * e..];
                        assert!(
                            one.iter()
                                .zip(last)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{ctx}: batch-independent"
                        );
                    }
                }
            }
        }
        println!("router_mma: device test ran on {}", dev.name);
    }
}
