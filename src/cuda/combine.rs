//! Stage 4 on CUDA (kernels/combine.ptx): `y[t] = output_scale · Σ_j w[t,j] · y_perm[row_of(t,j)]`
//! over kept slots in order, plus the shared expert. One thread per (token, element group),
//! no atomics, f32 sums. One template, six module variants: `combine.x1` (f32, any H),
//! `combine.x4` (f32, 16-byte loads and stores, `H % 4 == 0`), and for f16 / bf16
//! activations `combine.<A>.x1` (any H) and `combine.<A>.x8` (16-byte accesses, `H % 8 == 0`),
//! which widen on load and round y to A (nearest even) at the store. The 16-byte variants
//! also need every activation base 16-byte aligned.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::backend::BackendKind;
use crate::cuda::act::{ActView, ActViewMut};
use crate::cuda::context::drv;
use crate::cuda::context::{check_len, to_u32};
use crate::cuda::ptx::PtxModule;
use crate::cuda::{CudaDevice, GateCuda};
use crate::error::Result;
use crate::limits::{self, Resource};
use crate::stage::Stage;
use crate::tensor::DType;

/// One module variant: its activation dtype and elements per thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Width {
    dtype: DType,
    vec: usize,
}

/// Every variant, the f32 pair first (their modules predate 16-bit activations).
const WIDTHS: [Width; 6] = [
    Width {
        dtype: DType::F32,
        vec: 1,
    },
    Width {
        dtype: DType::F32,
        vec: 4,
    },
    Width {
        dtype: DType::F16,
        vec: 1,
    },
    Width {
        dtype: DType::F16,
        vec: 8,
    },
    Width {
        dtype: DType::BF16,
        vec: 1,
    },
    Width {
        dtype: DType::BF16,
        vec: 8,
    },
];

impl Width {
    /// The module variant name: `combine.x<vec>` (f32) or `combine.<A>.x<vec>`.
    fn name(self) -> String {
        match self.dtype {
            DType::F32 => format!("combine.x{}", self.vec),
            d => format!("combine.{}.x{}", d.name(), self.vec),
        }
    }
}

/// `n` 16-bit elements of `dtype` packed in the 32-bit words `%w0..`, widened into
/// `{reg}0..{reg}(n-1)`.
fn unpack16(dtype: DType, reg: &str, n: usize) -> String {
    let mut v = Vec::new();
    for i in (0..n).step_by(2) {
        let w = i / 2;
        match dtype {
            DType::F16 => {
                v.push(format!("mov.b32             {{%h0, %h1}}, %w{w};"));
                v.push(format!("cvt.f32.f16         {reg}{i}, %h0;"));
                v.push(format!("cvt.f32.f16         {reg}{}, %h1;", i + 1));
            }
            _ => {
                v.push(format!("shl.b32             %u0, %w{w}, 16;"));
                v.push(format!("mov.b32             {reg}{i}, %u0;"));
                v.push(format!("and.b32             %u0, %w{w}, 0xFFFF0000;"));
                v.push(format!("mov.b32             {reg}{}, %u0;", i + 1));
            }
        }
    }
    v.join("\n\t")
}

/// The placeholders and section tags of one variant (see the header of kernels/combine.ptx).
fn subs(w: Width) -> (Vec<&'static str>, Vec<(&'static str, String)>) {
    let (load_y, load_s, store) = match (w.dtype, w.vec) {
        (DType::F32, 4) => (
            "ld.global.nc.v4.f32 {%yv0, %yv1, %yv2, %yv3}, [%src];".to_string(),
            "ld.global.nc.v4.f32 {%sv0, %sv1, %sv2, %sv3}, [%src];".to_string(),
            "st.global.v4.f32    [%src], {%acc0, %acc1, %acc2, %acc3};".to_string(),
        ),
        (DType::F32, _) => (
            "ld.global.nc.f32    %yv0, [%src];".to_string(),
            "ld.global.nc.f32    %sv0, [%src];".to_string(),
            "st.global.f32       [%src], %acc0;".to_string(),
        ),
        (d, 8) => {
            let ld = "ld.global.nc.v4.b32 {%w0, %w1, %w2, %w3}, [%src];";
            let cvt: Vec<String> = (0..4)
                .map(|i| {
                    format!(
                        "cvt.rn.{}x2.f32     %w{i}, %acc{}, %acc{};",
                        d.name(),
                        2 * i + 1,
                        2 * i
                    )
                })
                .collect();
            (
                format!("{ld}\n\t{}", unpack16(d, "%yv", 8)),
                format!("{ld}\n\t{}", unpack16(d, "%sv", 8)),
                format!(
                    "{}\n\tst.global.v4.b32    [%src], {{%w0, %w1, %w2, %w3}};",
                    cvt.join("\n\t")
                ),
            )
        }
        (d, _) => {
            let load = |reg: &str| {
                match d {
                DType::F16 => format!(
                    "ld.global.nc.b16    %h0, [%src];\n\tcvt.f32.f16         {reg}0, %h0;"
                ),
                _ => format!(
                    "ld.global.nc.u16    %u0, [%src];\n\tshl.b32             %u0, %u0, 16;\n\tmov.b32             {reg}0, %u0;"
                ),
            }
            };
            (
                load("%yv"),
                load("%sv"),
                format!(
                    "cvt.rn.{}.f32      %h0, %acc0;\n\tst.global.b16       [%src], %h0;",
                    d.name()
                ),
            )
        }
    };
    let tags = match (w.dtype, w.vec) {
        (DType::F32, _) => vec!["a32"],
        (_, 8) => vec!["a16", "x8"],
        _ => vec!["a16"],
    };
    let bytes = w.vec * w.dtype.size();
    (
        tags,
        vec![
            ("VEC_NAME", w.name()),
            ("ACT", w.dtype.name().to_string()),
            ("VEC_SHIFT", w.vec.trailing_zeros().to_string()),
            ("VEC_BYTES_LOG2", bytes.trailing_zeros().to_string()),
            ("LOAD_Y", load_y),
            ("LOAD_SHARED", load_s),
            ("STORE_Y", store),
        ],
    )
}

/// Every module variant of this stage: `combine.x1`, `combine.x4`, `combine.f16.x1`,
/// `combine.f16.x8`, `combine.bf16.x1`, `combine.bf16.x8`.
pub fn modules() -> Result<Vec<PtxModule>> {
    WIDTHS
        .iter()
        .map(|&w| {
            let (tags, subs) = subs(w);
            PtxModule::specialise(Stage::Combine, w.name(), &tags, &subs)
        })
        .collect()
}

/// The variant for `hidden` elements of `dtype` per row with every activation base at
/// `aligned16` (all 16-byte aligned or not): the vector one where both allow it.
fn width_for(dtype: DType, hidden: usize, aligned16: bool) -> Width {
    let vec = if dtype == DType::F32 { 4 } else { 8 };
    let vec = if aligned16 && hidden % vec == 0 {
        vec
    } else {
        1
    };
    Width { dtype, vec }
}

/// Threads per block for `cols` threads per row: a multiple of 32 in 32..=256.
pub(crate) fn block_for(cols: usize) -> usize {
    cols.next_multiple_of(32).clamp(32, 256)
}

/// Launches `y [T, H]` from `y_perm`, the gate's weights and kept flags, `row_of_assignment`,
/// and optionally the shared expert's output (same activation dtype as `y_perm` and `y`) and
/// its gate logits (f32). Every buffer may be larger than the batch needs.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    dev: &CudaDevice,
    y_perm: &ActView<'_>,
    gate: &GateCuda,
    row_of_assignment: &CudaSlice<u32>,
    (tokens, slots, hidden): (usize, usize, usize),
    shared: Option<(&ActView<'_>, Option<&CudaSlice<f32>>)>,
    output_scale: f32,
    y: &mut ActViewMut<'_>,
) -> Result<()> {
    let st = Stage::Combine;
    let mul = |what: &str, a: usize, b: usize| crate::shape::mul(st, what, a, b);
    let n = mul("T x slots", tokens, slots)?;
    let th = mul("T x H", tokens, hidden)?;
    let dtype = y.dtype;
    check_len(st, "topk_weights", gate.topk_weights.len(), n)?;
    check_len(st, "kept", gate.kept.len(), n)?;
    check_len(st, "row_of_assignment", row_of_assignment.len(), n)?;
    let y_meta = y.meta(&dev.stream);
    y_meta.check(st, "y", dtype, th)?;
    let yp_meta = y_perm.meta(&dev.stream);
    yp_meta.check(st, "y_perm", dtype, 0)?;
    let mut aligned16 = y_meta.aligned(16) && yp_meta.aligned(16);
    if let Some((sy, gl)) = shared {
        let m = sy.meta(&dev.stream);
        m.check(st, "shared expert output", dtype, th)?;
        aligned16 &= m.aligned(16);
        if let Some(g) = gl {
            check_len(st, "shared gate logits", g.len(), tokens)?;
        }
    }
    if tokens == 0 || hidden == 0 {
        return Ok(());
    }
    let width = width_for(dtype, hidden, aligned16);
    let cols = hidden / width.vec;
    let bs = block_for(cols);
    let gy = cols.div_ceil(bs);
    to_u32(st, "T x slots", n, u32::MAX as usize)?;
    let t = to_u32(st, "tokens", tokens, i32::MAX as usize)?;
    let s = to_u32(st, "slots", slots, u32::MAX as usize)?;
    let h = to_u32(st, "hidden", hidden, u32::MAX as usize)?;
    limits::check(
        BackendKind::Cuda,
        Resource::GridSize,
        || format!("{st}: blocks per token (grid y)"),
        gy as u64,
        65_535,
    )?;
    // Rows of y_perm the kernel may read (its length / H; a row past them gives NaN).
    let rows = (y_perm.elems() / hidden).min(u32::MAX as usize) as u32;
    let cfg = LaunchConfig {
        grid_dim: (t, gy as u32, 1),
        block_dim: (bs as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let func = dev.function(st, &width.name(), "combine")?;
    let null: u64 = 0;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(&y_perm.bytes)
        .arg(&gate.topk_weights)
        .arg(&gate.kept)
        .arg(row_of_assignment);
    match shared {
        Some((sy, gl)) => {
            b.arg(&sy.bytes);
            match gl {
                Some(g) => b.arg(g),
                None => b.arg(&null),
            };
        }
        None => {
            b.arg(&null).arg(&null);
        }
    }
    b.arg(&mut y.bytes)
        .arg(&t)
        .arg(&s)
        .arg(&h)
        .arg(&rows)
        .arg(&output_scale);
    // SAFETY: matches the header of kernels/combine.ptx `combine` in the variant of `dtype`:
    // y_perm_ptr ([rows, H] of dtype), weights_ptr, kept_ptr, row_of_ptr ([T, slots]),
    // shared_ptr ([T, H] of dtype or 0), shared_gate_ptr (f32 [T] or 0), y_ptr ([T, H] of
    // dtype), tokens, slots, hidden, rows (u32), output_scale (f32). Lengths, dtypes and
    // element alignment were checked above; the kernel reads y_perm only at rows < `rows`;
    // the 16-byte variants only when H is a multiple of their vector and every activation
    // base is 16-byte aligned; the grid is the header's (T, ceil(COLS / BS)) × BS.
    drv(unsafe { b.launch(cfg) }, "launching combine")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_renders_without_placeholders() {
        let m = modules().unwrap();
        let names: Vec<&str> = m.iter().map(|v| v.variant.as_str()).collect();
        assert_eq!(
            names,
            [
                "combine.x1",
                "combine.x4",
                "combine.f16.x1",
                "combine.f16.x8",
                "combine.bf16.x1",
                "combine.bf16.x8"
            ]
        );
        for v in &m {
            assert!(!v.source.contains("${"), "{}", v.variant);
            assert!(v.source.is_ascii(), "{}", v.variant);
            assert!(v.source.contains(".entry combine("), "{}", v.variant);
        }
        assert!(m[1].source.contains("ld.global.nc.v4.f32"));
        for (i, d) in [(2, "f16"), (4, "bf16")] {
            // x1: one 16-bit element, widened on load, rounded (RNE) at the store.
            let x1 = &m[i].source;
            assert!(
                x1.contains(&format!("cvt.rn.{d}.f32      %h0, %acc0;")),
                "{d}"
            );
            assert!(x1.contains("st.global.b16       [%src], %h0;"), "{d}");
            assert!(!x1.contains("fma.rn.f32          %acc7"), "{d}");
            // x8: 16-byte loads and stores of eight elements, eight f32 sums.
            let x8 = &m[i + 1].source;
            assert!(x8.contains("ld.global.nc.v4.b32 {%w0, %w1, %w2, %w3}, [%src];"));
            assert!(x8.contains(&format!("cvt.rn.{d}x2.f32     %w3, %acc7, %acc6;")));
            assert!(x8.contains("st.global.v4.b32    [%src], {%w0, %w1, %w2, %w3};"));
            assert!(x8.contains("fma.rn.f32          %acc7, %gv, %sv7, %acc7;"));
            assert!(x8.contains("shr.u32             %cols, %hidden, 3;"));
        }
        assert!(m[2].source.contains("cvt.f32.f16         %yv0, %h0;"));
        assert!(m[3].source.contains("cvt.f32.f16         %sv7, %h1;"));
        assert!(m[5]
            .source
            .contains("and.b32             %u0, %w3, 0xFFFF0000;"));
        assert_eq!(width_for(DType::F32, 8, true).name(), "combine.x4");
        assert_eq!(width_for(DType::F32, 8, false).name(), "combine.x1");
        assert_eq!(width_for(DType::BF16, 8, true).name(), "combine.bf16.x8");
        assert_eq!(width_for(DType::F16, 12, true).name(), "combine.f16.x1");
    }

    #[test]
    fn blocks_are_warp_multiples() {
        assert_eq!(block_for(1), 32);
        assert_eq!(block_for(33), 64);
        assert_eq!(block_for(1792), 256);
        assert!(check_len(Stage::Combine, "y", 1, 2).is_err());
        assert!(to_u32(Stage::Combine, "gy", 65_536, 65_535)
            .is_err_and(|e| matches!(e, crate::Error::Limit { .. })));
    }

    /// On a CUDA device (skipped without one): against the CPU reference with and without
    /// the shared expert and its gate, dropped rows poisoned with NaN (never read), every
    /// activation dtype and width, slots = 0 and T = 0.
    #[test]
    fn matches_cpu_reference_on_device() {
        use crate::cpu::combine::{combine, Assignments, SharedInput};
        let Ok(dev) = CudaDevice::new(0) else {
            println!("combine: no CUDA device, device test skipped");
            return;
        };
        let mut g = crate::synth::Gen::new(17);
        for &(t, k, h) in &[
            (0, 2, 8),
            (1, 1, 1),
            (7, 2, 13),
            (37, 8, 8),
            (300, 2, 64),
            (5, 0, 12),
            (64, 8, 2052),
        ] {
            let n = t * k;
            let mut y_perm = g.uniform(n * h, 1.0);
            let weights = g.uniform(n, 1.0);
            let kept: Vec<u32> = (0..n).map(|i| u32::from(i % 3 != 1)).collect();
            // A random permutation of the rows.
            let mut row_of: Vec<u32> = (0..n as u32).collect();
            for i in (1..n).rev() {
                row_of.swap(i, g.below(0, i + 1));
            }
            for i in 0..n {
                if kept[i] == 0 {
                    let r = row_of[i] as usize;
                    y_perm[r * h..(r + 1) * h].fill(f32::NAN);
                }
            }
            let shared_y = g.uniform(t * h, 1.0);
            let shared_g = g.uniform(t, 3.0);
            let wide = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
            let (w64, sg64) = (wide(&weights), wide(&shared_g));
            let kept_b: Vec<bool> = kept.iter().map(|&v| v != 0).collect();
            let gate = GateCuda {
                topk_ids: dev.upload(&vec![0u32; n]).unwrap(),
                topk_weights: dev.upload(&weights).unwrap(),
                kept: dev.upload(&kept).unwrap(),
                counts: dev.alloc(1).unwrap(),
            };
            let rod = dev.upload(&row_of).unwrap();
            let sgd = dev.upload(&shared_g).unwrap();
            // Activations in each dtype: rounded on the host, the reference uses the rounded
            // values; the tolerance covers y's final rounding.
            for (dtype, tol) in [(DType::F32, 2e-5), (DType::F16, 5e-3), (DType::BF16, 1e-2)] {
                let act = |v: &[f32]| {
                    let t = crate::tensor::Tensor::from_f32(vec![v.len()], v.to_vec())
                        .unwrap()
                        .cast(dtype);
                    let bytes = crate::cuda::act::tensor_bytes(&t);
                    let rounded = crate::cuda::act::bytes_to_f64(&bytes, dtype);
                    (dev.upload(&bytes).unwrap(), rounded)
                };
                let (ypd, yp64) = act(&y_perm);
                let (syd, sy64) = act(&shared_y);
                let ypv = ActView {
                    bytes: ypd.slice(..),
                    dtype,
                };
                let syv = ActView {
                    bytes: syd.slice(..),
                    dtype,
                };
                for shared in 0..3 {
                    let a = Assignments {
                        slots: k.max(1),
                        weights: &w64,
                        kept: &kept_b,
                        row_of_assignment: &row_of,
                    };
                    let sh_cpu = match shared {
                        0 => None,
                        1 => Some(SharedInput {
                            y: &sy64,
                            gate_logits: None,
                        }),
                        _ => Some(SharedInput {
                            y: &sy64,
                            gate_logits: Some(&sg64),
                        }),
                    };
                    let sh_dev = match shared {
                        0 => None,
                        1 => Some((&syv, None)),
                        _ => Some((&syv, Some(&sgd))),
                    };
                    // The CPU reference needs slots >= 1; with k = 0 the result is the shared part.
                    let reference = if k == 0 {
                        let mut r = vec![0.0f64; t * h];
                        if let Some(s) = sh_cpu {
                            for ti in 0..t {
                                let gv =
                                    s.gate_logits.map_or(1.0, |gl| crate::cpu::sigmoid(gl[ti]));
                                for c in 0..h {
                                    r[ti * h + c] = gv * s.y[ti * h + c];
                                }
                            }
                        }
                        r
                    } else {
                        combine(&yp64, h, a, sh_cpu, 0.8).unwrap()
                    };
                    let mut yd = dev.upload(&vec![0xFFu8; t * h * dtype.size()]).unwrap();
                    let mut y = ActViewMut {
                        bytes: yd.slice_mut(..),
                        dtype,
                    };
                    launch(&dev, &ypv, &gate, &rod, (t, k, h), sh_dev, 0.8, &mut y).unwrap();
                    let got = crate::cuda::act::bytes_to_f64(
                        &dev.read(&yd, t * h * dtype.size()).unwrap(),
                        dtype,
                    );
                    let num: f64 = got
                        .iter()
                        .zip(&reference)
                        .map(|(&x, &r)| (x - r).powi(2))
                        .sum();
                    let den: f64 = reference.iter().map(|r| r * r).sum();
                    let err = if den == 0.0 {
                        num.sqrt()
                    } else {
                        (num / den).sqrt()
                    };
                    assert!(
                        err <= tol,
                        "{dtype} T={t} k={k} H={h} shared={shared}: rel L2 {err:e}"
                    );
                }
            }
        }
        println!("combine: device test ran on {}", dev.name);
    }
}
