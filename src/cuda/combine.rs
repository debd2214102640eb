//! Stage 4 on CUDA (kernels/combine.ptx): `y[t] = output_scale · Σ_j w[t,j] · y_perm[row_of(t,j)]`
//! over kept slots in order, plus the shared expert. One thread per (token, element group),
//! no atomics. One template, two module variants: `combine.x1` (any H) and `combine.x4`
//! (16-byte loads and stores, `H % 4 == 0`).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::backend::BackendKind;
use crate::cuda::context::drv;
use crate::cuda::context::{check_len, to_u32};
use crate::cuda::ptx::PtxModule;
use crate::cuda::{CudaDevice, GateCuda};
use crate::error::Result;
use crate::limits::{self, Resource};
use crate::stage::Stage;

/// The two vector widths: (variant suffix, f32 elements per thread).
const WIDTHS: [(&str, usize); 2] = [("x1", 1), ("x4", 4)];

/// The placeholders of one vector width (see the header of kernels/combine.ptx).
fn subs(name: &str, vec: usize) -> Vec<(&'static str, String)> {
    let (load_y, load_s, store) = if vec == 4 {
        (
            "ld.global.nc.v4.f32 {%yv0, %yv1, %yv2, %yv3}, [%src];",
            "ld.global.nc.v4.f32 {%sv0, %sv1, %sv2, %sv3}, [%src];",
            "st.global.v4.f32    [%src], {%acc0, %acc1, %acc2, %acc3};",
        )
    } else {
        (
            "ld.global.nc.f32    %yv0, [%src];",
            "ld.global.nc.f32    %sv0, [%src];",
            "st.global.f32       [%src], %acc0;",
        )
    };
    vec![
        ("VEC_NAME", format!("combine.{name}")),
        ("VEC_SHIFT", vec.trailing_zeros().to_string()),
        ("VEC_BYTES_LOG2", (4 * vec).trailing_zeros().to_string()),
        ("LOAD_Y", load_y.to_string()),
        ("LOAD_SHARED", load_s.to_string()),
        ("STORE_Y", store.to_string()),
    ]
}

/// Every module variant of this stage: `combine.x1`, `combine.x4`.
pub fn modules() -> Result<Vec<PtxModule>> {
    WIDTHS
        .iter()
        .map(|&(name, vec)| {
            PtxModule::specialise(Stage::Combine, format!("combine.{name}"), &subs(name, vec))
        })
        .collect()
}

/// The shared expert's output `[T, H]` and optional gate logits `[T]`.
pub type SharedCuda<'a> = Option<(&'a CudaSlice<f32>, Option<&'a CudaSlice<f32>>)>;

/// Threads per block for `cols` threads per row: a multiple of 32 in 32..=256.
pub(crate) fn block_for(cols: usize) -> usize {
    cols.next_multiple_of(32).clamp(32, 256)
}

/// Launches `y [T, H]` from `y_perm`, the gate's weights and kept flags, `row_of_assignment`.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    dev: &CudaDevice,
    y_perm: &CudaSlice<f32>,
    gate: &GateCuda,
    row_of_assignment: &CudaSlice<u32>,
    (tokens, slots, hidden): (usize, usize, usize),
    shared: SharedCuda<'_>,
    output_scale: f32,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    let mul = |what: &str, a: usize, b: usize| crate::shape::mul(Stage::Combine, what, a, b);
    let n = mul("T x slots", tokens, slots)?;
    let th = mul("T x H", tokens, hidden)?;
    check_len(Stage::Combine, "topk_weights", gate.topk_weights.len(), n)?;
    check_len(Stage::Combine, "kept", gate.kept.len(), n)?;
    check_len(
        Stage::Combine,
        "row_of_assignment",
        row_of_assignment.len(),
        n,
    )?;
    check_len(Stage::Combine, "y", y.len(), th)?;
    if let Some((sy, gl)) = shared {
        check_len(Stage::Combine, "shared expert output", sy.len(), th)?;
        if let Some(g) = gl {
            check_len(Stage::Combine, "shared gate logits", g.len(), tokens)?;
        }
    }
    if tokens == 0 || hidden == 0 {
        return Ok(());
    }
    let (name, vec) = if hidden % 4 == 0 {
        WIDTHS[1]
    } else {
        WIDTHS[0]
    };
    let cols = hidden / vec;
    let bs = block_for(cols);
    let gy = cols.div_ceil(bs);
    to_u32(Stage::Combine, "T x slots", n, u32::MAX as usize)?;
    let t = to_u32(Stage::Combine, "tokens", tokens, i32::MAX as usize)?;
    let s = to_u32(Stage::Combine, "slots", slots, u32::MAX as usize)?;
    let h = to_u32(Stage::Combine, "hidden", hidden, u32::MAX as usize)?;
    limits::check(
        BackendKind::Cuda,
        Resource::GridSize,
        || format!("{}: blocks per token (grid y)", Stage::Combine),
        gy as u64,
        65_535,
    )?;
    let rows = (y_perm.len() / hidden).min(u32::MAX as usize) as u32;
    let cfg = LaunchConfig {
        grid_dim: (t, gy as u32, 1),
        block_dim: (bs as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let func = dev.function(Stage::Combine, &format!("combine.{name}"), "combine")?;
    let null: u64 = 0;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(y_perm)
        .arg(&gate.topk_weights)
        .arg(&gate.kept)
        .arg(row_of_assignment);
    match shared {
        Some((sy, gl)) => {
            b.arg(sy);
            match gl {
                Some(g) => b.arg(g),
                None => b.arg(&null),
            };
        }
        None => {
            b.arg(&null).arg(&null);
        }
    }
    b.arg(&mut *y)
        .arg(&t)
        .arg(&s)
        .arg(&h)
        .arg(&rows)
        .arg(&output_scale);
    // SAFETY: matches the header of kernels/combine.ptx `combine`: y_perm_ptr (f32
    // [rows, H]), weights_ptr, kept_ptr, row_of_ptr ([T, slots]), shared_ptr (f32 [T, H] or
    // 0), shared_gate_ptr (f32 [T] or 0), y_ptr (f32 [T, H]), tokens, slots, hidden, rows
    // (u32), output_scale (f32). Lengths were checked above; the kernel reads y_perm only at
    // rows < `rows`; x4 is chosen only when H % 4 == 0 and every buffer starts at its
    // (256-byte aligned) allocation; the grid is the header's (T, ceil(COLS / BS)) × BS.
    drv(unsafe { b.launch(cfg) }, "launching combine")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_widths_render_without_placeholders() {
        let m = modules().unwrap();
        assert_eq!(m.len(), 2);
        for v in &m {
            assert!(!v.source.contains("${"), "{}", v.variant);
            assert!(v.source.is_ascii(), "{}", v.variant);
        }
        assert!(m[1].source.contains("ld.global.nc.v4.f32"));
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
    /// the shared expert and its gate, dropped rows poisoned with NaN (never read), both
    /// widths, slots = 0 and T = 0.
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
            let (yp64, w64, sy64, sg64) = (
                wide(&y_perm),
                wide(&weights),
                wide(&shared_y),
                wide(&shared_g),
            );
            let kept_b: Vec<bool> = kept.iter().map(|&v| v != 0).collect();
            let ypd = dev.upload(&y_perm).unwrap();
            let gate = GateCuda {
                topk_ids: dev.upload(&vec![0u32; n]).unwrap(),
                topk_weights: dev.upload(&weights).unwrap(),
                kept: dev.upload(&kept).unwrap(),
                counts: dev.alloc(1).unwrap(),
            };
            let rod = dev.upload(&row_of).unwrap();
            let syd = dev.upload(&shared_y).unwrap();
            let sgd = dev.upload(&shared_g).unwrap();
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
                let sh_dev: SharedCuda<'_> = match shared {
                    0 => None,
                    1 => Some((&syd, None)),
                    _ => Some((&syd, Some(&sgd))),
                };
                // The CPU reference needs slots >= 1; with k = 0 the result is the shared part.
                let reference = if k == 0 {
                    let mut r = vec![0.0f64; t * h];
                    if let Some(s) = sh_cpu {
                        for ti in 0..t {
                            let gv = s.gate_logits.map_or(1.0, |gl| crate::cpu::sigmoid(gl[ti]));
                            for c in 0..h {
                                r[ti * h + c] = gv * s.y[ti * h + c];
                            }
                        }
                    }
                    r
                } else {
                    combine(&yp64, h, a, sh_cpu, 0.8).unwrap()
                };
                let mut y = dev.upload(&vec![f32::NAN; t * h]).unwrap();
                launch(&dev, &ypd, &gate, &rod, (t, k, h), sh_dev, 0.8, &mut y).unwrap();
                let got = dev.read(&y, t * h).unwrap();
                let num: f64 = got
                    .iter()
                    .zip(&reference)
                    .map(|(&x, &r)| (f64::from(x) - r).powi(2))
                    .sum();
                let den: f64 = reference.iter().map(|r| r * r).sum();
                let err = if den == 0.0 {
                    num.sqrt()
                } else {
                    (num / den).sqrt()
                };
                assert!(
                    err <= 2e-5,
                    "T={t} k={k} H={h} shared={shared}: rel L2 {err:e}"
                );
            }
        }
        println!("combine: device test ran on {}", dev.name);
    }
}
