//! Stage 2 on CUDA (kernels/permute.ptx): the canonical stable counting sort of assignments
//! by bucket (expert if kept, `E` if dropped) and the gather of `x` into expert order.
//!
//! A blocked counting sort without atomics: per-(bucket, chunk) counts and in-chunk ranks,
//! an exclusive prefix sum over the counts in bucket-major order, then each assignment's row
//! is its (bucket, chunk) base plus its rank. The kernel header gives every pass and its
//! launch. One template, two module variants that differ in the gather only: `permute.x1`
//! (any H) and `permute.x4` (16-byte copies, `H % 4 == 0`).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::cuda::context::drv;
use crate::cuda::context::{check_len, to_u32, MAX_INDEX};
use crate::cuda::ptx::PtxModule;
use crate::cuda::{CudaDevice, GateCuda, PermuteCuda};
use crate::error::{Error, Result};
use crate::stage::Stage;

/// Assignments per chunk (the kernel's `CHUNK`; `i >> 10` in permute_place).
const CHUNK: usize = 1024;
/// The two gather widths: (variant suffix, 32-bit words per thread).
const WIDTHS: [(&str, usize); 2] = [("x1", 1), ("x4", 4)];

/// The placeholders of one gather width (see the header of kernels/permute.ptx).
fn subs(name: &str, vec: usize) -> Vec<(&'static str, String)> {
    let copy = if vec == 4 {
        "ld.global.nc.v4.b32 {%v0, %v1, %v2, %v3}, [%src];\n\tst.global.v4.b32    [%dst], {%v0, %v1, %v2, %v3};"
    } else {
        "ld.global.nc.b32    %v0, [%src];\n\tst.global.b32       [%dst], %v0;"
    };
    vec![
        ("VEC_NAME", format!("permute.{name}")),
        ("VEC_SHIFT", vec.trailing_zeros().to_string()),
        ("VEC_BYTES_LOG2", (4 * vec).trailing_zeros().to_string()),
        ("COPY", copy.to_string()),
    ]
}

/// Every module variant of this stage: `permute.x1`, `permute.x4`.
pub fn modules() -> Result<Vec<PtxModule>> {
    WIDTHS
        .iter()
        .map(|&(name, vec)| {
            PtxModule::specialise(Stage::Permute, format!("permute.{name}"), &subs(name, vec))
        })
        .collect()
}

/// Launches the permutation of `gate`'s assignments and the gather of `x` `[T, H]` into `out`.
pub fn launch(
    dev: &CudaDevice,
    gate: &GateCuda,
    (tokens, slots, experts): (usize, usize, usize),
    x: &CudaSlice<f32>,
    hidden: usize,
    out: &mut PermuteCuda,
) -> Result<()> {
    let mul = |what: &str, a: usize, b: usize| crate::shape::mul(Stage::Permute, what, a, b);
    let n = mul("T x slots", tokens, slots)?;
    check_len(Stage::Permute, "topk_ids", gate.topk_ids.len(), n)?;
    check_len(Stage::Permute, "kept", gate.kept.len(), n)?;
    check_len(Stage::Permute, "x", x.len(), mul("T x H", tokens, hidden)?)?;
    check_len(
        Stage::Permute,
        "expert_offsets",
        out.expert_offsets.len(),
        experts + 1,
    )?;
    check_len(
        Stage::Permute,
        "sorted_assignment",
        out.sorted_assignment.len(),
        n,
    )?;
    check_len(
        Stage::Permute,
        "row_of_assignment",
        out.row_of_assignment.len(),
        n,
    )?;
    check_len(
        Stage::Permute,
        "x_perm",
        out.x_perm.len(),
        mul("T x slots x H", n, hidden)?,
    )?;
    if n == 0 {
        // No assignment: nothing to launch, but the offsets are defined (all 0).
        let mut offsets = out.expert_offsets.slice_mut(..experts + 1);
        return drv(
            dev.stream.memset_zeros(&mut offsets),
            "clearing expert_offsets",
        );
    }
    if experts == 0 {
        return Err(Error::shape(
            Stage::Permute,
            "assignments to route but no experts",
        ));
    }
    let nb = n.div_ceil(CHUNK);
    let m = mul("(E + 1) x chunks", experts + 1, nb)?;
    let n_u = to_u32(Stage::Permute, "T x slots", n, MAX_INDEX)?;
    let e_u = to_u32(Stage::Permute, "experts", experts, MAX_INDEX)?;
    let m_u = to_u32(Stage::Permute, "(E + 1) x chunks", m, MAX_INDEX)?;
    let nb_u = nb as u32;
    // The gather's width picks the module (kernels 1-3 are the same in both variants).
    let (name, vec) = if hidden % 4 == 0 {
        WIDTHS[1]
    } else {
        WIDTHS[0]
    };
    let variant = format!("permute.{name}");
    let cols = hidden / vec;
    let bs = crate::cuda::combine::block_for(cols);
    let gy = to_u32(Stage::Permute, "blocks per row", cols.div_ceil(bs), 65_535)?;
    let s_u = to_u32(Stage::Permute, "slots", slots, u32::MAX as usize)?;
    let h_u = to_u32(Stage::Permute, "hidden", hidden, u32::MAX as usize)?;

    // The count table, every cell written by permute_count before it is read.
    let mut cells = dev.alloc::<u32>(m)?;

    let func = dev.function(Stage::Permute, &variant, "permute_count")?;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(&gate.topk_ids)
        .arg(&gate.kept)
        .arg(&mut cells)
        .arg(&mut out.row_of_assignment);
    b.arg(&n_u).arg(&e_u).arg(&nb_u);
    let cfg = LaunchConfig {
        grid_dim: (nb_u, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches the header of kernels/permute.ptx `permute_count`: ids_ptr, kept_ptr
    // (u32 [N]), cells_ptr (u32 [M]), rank_ptr (u32 [N], row_of_assignment as scratch), n,
    // experts, nb (u32); lengths checked above, M = (E + 1) · NB < 2^31; grid (NB) × 256.
    drv(unsafe { b.launch(cfg) }, "launching permute_count")?;

    let func = dev.function(Stage::Permute, &variant, "permute_scan")?;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(&mut cells)
        .arg(&mut out.expert_offsets)
        .arg(&m_u)
        .arg(&nb_u);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches the header of kernels/permute.ptx `permute_scan`: cells_ptr (u32 [M]),
    // offsets_ptr (u32 [E + 1], length checked), m, nb (u32); one block of 1024 threads.
    drv(unsafe { b.launch(cfg) }, "launching permute_scan")?;

    let func = dev.function(Stage::Permute, &variant, "permute_place")?;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(&gate.topk_ids).arg(&gate.kept).arg(&cells);
    b.arg(&mut out.sorted_assignment)
        .arg(&mut out.row_of_assignment);
    b.arg(&n_u).arg(&e_u).arg(&nb_u);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches the header of kernels/permute.ptx `permute_place`: ids_ptr, kept_ptr
    // (u32 [N]), cells_ptr (u32 [M]), sorted_ptr, row_of_ptr (u32 [N]), n, experts, nb (u32);
    // rows are a permutation of 0..N by construction, so every store stays inside [N].
    drv(unsafe { b.launch(cfg) }, "launching permute_place")?;

    if hidden == 0 {
        return Ok(());
    }
    let func = dev.function(Stage::Permute, &variant, "permute_gather")?;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(x)
        .arg(&out.sorted_assignment)
        .arg(&mut out.x_perm)
        .arg(&s_u)
        .arg(&h_u);
    let cfg = LaunchConfig {
        grid_dim: (n_u, gy, 1),
        block_dim: (bs as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches the header of kernels/permute.ptx `permute_gather`: x_ptr (f32 [T, H]),
    // sorted_ptr (u32 [N], a permutation of 0..N so the token is < T), x_perm_ptr
    // (f32 [N, H]), slots, hidden (u32); x4 only when H % 4 == 0 with allocation-aligned
    // buffers; grid (N, ceil(COLS / BS)) × BS.
    drv(unsafe { b.launch(cfg) }, "launching permute_gather")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{assignments, Spread};

    #[test]
    fn both_widths_render_without_placeholders() {
        let m = modules().unwrap();
        assert_eq!(m.len(), 2);
        for v in &m {
            assert!(!v.source.contains("${"), "{}", v.variant);
            assert!(v.source.is_ascii(), "{}", v.variant);
            for entry in [
                "permute_count",
                "permute_scan",
                "permute_place",
                "permute_gather",
            ] {
                assert!(
                    v.source.contains(&format!(".entry {entry}(")),
                    "{} {entry}",
                    v.variant
                );
            }
        }
        assert!(m[1].source.contains("ld.global.nc.v4.b32"));
        assert!(check_len(Stage::Permute, "x", 1, 2).is_err());
        assert!(to_u32(Stage::Permute, "n", MAX_INDEX + 1, MAX_INDEX).is_err());
    }

    /// On a CUDA device (skipped without one): bit-exact against the CPU reference over
    /// one and many chunks, one and several bucket windows, both gather widths, and T = 0.
    #[test]
    fn matches_cpu_reference_on_device() {
        let Ok(dev) = CudaDevice::new(0) else {
            println!("permute: no CUDA device, device test skipped");
            return;
        };
        let mut g = crate::synth::Gen::new(11);
        let shapes = [
            (0, 2, 8),
            (1, 1, 1),
            (7, 2, 8),
            (37, 8, 61),
            (37, 16, 16),
            (300, 2, 5),
            (300, 8, 61),
            (4096, 8, 256),
            (2100, 1, 3000),
            (16384, 8, 16),
        ];
        for &(t, k, e) in &shapes {
            for (mode, spread) in Spread::ALL.into_iter().enumerate() {
                let h = [13, 8, 1, 64][mode];
                let x = crate::synth::random_x(t, h, (t * 31 + e) as u64);
                let (ids, kept) = assignments(&mut g, t, k, e, spread);
                let kept_b: Vec<bool> = kept.iter().map(|&v| v != 0).collect();
                let reference = crate::cpu::permute::permute(&ids, &kept_b, e).unwrap();
                let rows = crate::cpu::permute::gather(&x, k, &reference).unwrap();
                let n = t * k;
                let gate = GateCuda {
                    topk_ids: dev.upload(&ids).unwrap(),
                    topk_weights: dev.upload(&vec![0.5f32; n]).unwrap(),
                    kept: dev.upload(&kept).unwrap(),
                    counts: dev.alloc(e).unwrap(),
                };
                let mut out = PermuteCuda {
                    expert_offsets: dev.upload(&vec![u32::MAX; e + 1]).unwrap(),
                    sorted_assignment: dev.upload(&vec![u32::MAX; n]).unwrap(),
                    row_of_assignment: dev.upload(&vec![u32::MAX; n]).unwrap(),
                    x_perm: dev.upload(&vec![f32::NAN; n * h]).unwrap(),
                };
                let xd = dev.upload(&x.to_f32_vec()).unwrap();
                launch(&dev, &gate, (t, k, e), &xd, h, &mut out).unwrap();
                let ctx = format!("T={t} k={k} E={e} H={h} {spread:?}");
                assert_eq!(
                    dev.read(&out.expert_offsets, e + 1).unwrap(),
                    reference.expert_offsets,
                    "{ctx}"
                );
                assert_eq!(
                    dev.read(&out.sorted_assignment, n).unwrap(),
                    reference.sorted_assignment,
                    "{ctx}"
                );
                assert_eq!(
                    dev.read(&out.row_of_assignment, n).unwrap(),
                    reference.row_of_assignment,
                    "{ctx}"
                );
                let got: Vec<f64> = dev
                    .read(&out.x_perm, n * h)
                    .unwrap()
                    .into_iter()
                    .map(f64::from)
                    .collect();
                assert!(got == rows, "{ctx}: x_perm");
            }
        }
        println!("permute: device test ran on {}", dev.name);
    }
}
