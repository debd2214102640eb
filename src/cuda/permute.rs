//! Stage 2 on CUDA (kernels/permute.ptx): the canonical stable counting sort of assignments
//! by bucket (expert if kept, `E` if dropped) and the gather of `x` into expert order.
//!
//! A blocked counting sort without atomics: per-(bucket, chunk) counts and in-chunk ranks,
//! an exclusive prefix sum over the counts in bucket-major order, then each assignment's row
//! is its (bucket, chunk) base plus its rank. The kernel header gives every pass and its
//! launch. One template, four module variants that differ in the gather only: `permute.x1`
//! (f32 rows, any H), `permute.x4` (f32 rows, 16-byte copies, `H % 4 == 0`), `permute.b16.x1`
//! (f16 / bf16 rows, any H) and `permute.b16.x8` (f16 / bf16 rows, 16-byte copies,
//! `H % 8 == 0`). The vector variants also need 16-byte aligned `x` and `x_perm`.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::cuda::act::ActView;
use crate::cuda::context::drv;
use crate::cuda::context::{check_len, to_u32, MAX_INDEX};
use crate::cuda::ptx::PtxModule;
use crate::cuda::{CudaDevice, GateCuda, PermuteCuda};
use crate::error::{Error, Result};
use crate::stage::Stage;
use crate::tensor::DType;

/// Assignments per chunk (the kernel's `CHUNK`; `i >> 10` in permute_place).
const CHUNK: usize = 1024;

/// One gather width of one element size.
#[derive(Debug, Clone, Copy)]
struct Width {
    /// Module variant name.
    name: &'static str,
    /// Bytes per element (4: f32, 2: f16 / bf16).
    elem: usize,
    /// Elements per gather thread.
    vec: usize,
}

/// Every gather width: the f32 pair first (their modules predate 16-bit activations).
const WIDTHS: [Width; 4] = [
    Width {
        name: "permute.x1",
        elem: 4,
        vec: 1,
    },
    Width {
        name: "permute.x4",
        elem: 4,
        vec: 4,
    },
    Width {
        name: "permute.b16.x1",
        elem: 2,
        vec: 1,
    },
    Width {
        name: "permute.b16.x8",
        elem: 2,
        vec: 8,
    },
];

/// The placeholders and section tag of one gather width (see the header of
/// kernels/permute.ptx).
fn subs(w: Width) -> (&'static str, Vec<(&'static str, String)>) {
    let bytes = w.elem * w.vec;
    let copy = match bytes {
        16 => "ld.global.nc.v4.b32 {%v0, %v1, %v2, %v3}, [%src];\n\tst.global.v4.b32    [%dst], {%v0, %v1, %v2, %v3};",
        4 => "ld.global.nc.b32    %v0, [%src];\n\tst.global.b32       [%dst], %v0;",
        _ => "ld.global.nc.u16    %v0, [%src];\n\tst.global.b16       [%dst], %v0;",
    };
    let tag = if w.elem == 4 { "a32" } else { "a16" };
    (
        tag,
        vec![
            ("VEC_NAME", w.name.to_string()),
            ("VEC_SHIFT", w.vec.trailing_zeros().to_string()),
            ("VEC_BYTES_LOG2", bytes.trailing_zeros().to_string()),
            ("COPY", copy.to_string()),
        ],
    )
}

/// Every module variant of this stage: `permute.x1`, `permute.x4`, `permute.b16.x1`,
/// `permute.b16.x8`.
pub fn modules() -> Result<Vec<PtxModule>> {
    WIDTHS
        .iter()
        .map(|&w| {
            let (tag, subs) = subs(w);
            PtxModule::specialise(Stage::Permute, w.name, &[tag], &subs)
        })
        .collect()
}

/// The gather width for rows of `hidden` elements of `dtype` between `x` and `x_perm` at
/// these addresses: 16-byte copies where the row length and both bases allow them.
fn width_for(dtype: DType, hidden: usize, x_addr: u64, xp_addr: u64) -> Width {
    let aligned = x_addr % 16 == 0 && xp_addr % 16 == 0;
    let (scalar, vector) = match dtype {
        DType::F32 => (WIDTHS[0], WIDTHS[1]),
        DType::F16 | DType::BF16 => (WIDTHS[2], WIDTHS[3]),
    };
    if aligned && hidden % vector.vec == 0 {
        vector
    } else {
        scalar
    }
}

/// Device scratch of the permutation: the per-(bucket, chunk) count table. Sized once for the
/// largest batch; a launch uses the first `(E + 1) · ceil(T · slots / 1024)` cells.
#[derive(Debug)]
pub struct PermuteScratchCuda {
    /// `u32 [(E + 1) · NB]`, every used cell written by permute_count before it is read.
    pub cells: CudaSlice<u32>,
}

impl PermuteScratchCuda {
    /// Scratch for up to `tokens × slots` assignments over `experts` experts.
    pub fn alloc(dev: &CudaDevice, tokens: usize, slots: usize, experts: usize) -> Result<Self> {
        Ok(PermuteScratchCuda {
            cells: dev.alloc(cells_len(tokens, slots, experts)?)?,
        })
    }
}

/// Cells of the count table for `tokens × slots` assignments over `experts` experts.
fn cells_len(tokens: usize, slots: usize, experts: usize) -> Result<usize> {
    let mul = |what: &str, a: usize, b: usize| crate::shape::mul(Stage::Permute, what, a, b);
    let n = mul("T x slots", tokens, slots)?;
    mul(
        "(E + 1) x chunks",
        experts.saturating_add(1),
        n.div_ceil(CHUNK),
    )
}

/// Launches the permutation of `gate`'s assignments and the gather of `x` `[T, H]` (f32, f16
/// or bf16, the dtype of `out.x_perm`) into `out`. Every buffer may be larger than the batch
/// needs; nothing is allocated.
pub fn launch(
    dev: &CudaDevice,
    gate: &GateCuda,
    (tokens, slots, experts): (usize, usize, usize),
    x: &ActView<'_>,
    hidden: usize,
    out: &mut PermuteCuda,
    scratch: &mut PermuteScratchCuda,
) -> Result<()> {
    let mul = |what: &str, a: usize, b: usize| crate::shape::mul(Stage::Permute, what, a, b);
    let n = mul("T x slots", tokens, slots)?;
    check_len(Stage::Permute, "topk_ids", gate.topk_ids.len(), n)?;
    check_len(Stage::Permute, "kept", gate.kept.len(), n)?;
    let dtype = out.dtype;
    let x_meta = x.meta(&dev.stream);
    x_meta.check(Stage::Permute, "x", dtype, mul("T x H", tokens, hidden)?)?;
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
    let xp_meta = crate::cuda::act::ActMeta {
        dtype,
        bytes: out.x_perm.len(),
        addr: crate::cuda::act::slice_addr(&out.x_perm, &dev.stream),
    };
    xp_meta.check(
        Stage::Permute,
        "x_perm",
        dtype,
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
    let m = cells_len(tokens, slots, experts)?;
    check_len(Stage::Permute, "scratch cells", scratch.cells.len(), m)?;
    let n_u = to_u32(Stage::Permute, "T x slots", n, MAX_INDEX)?;
    let e_u = to_u32(Stage::Permute, "experts", experts, MAX_INDEX)?;
    let m_u = to_u32(Stage::Permute, "(E + 1) x chunks", m, MAX_INDEX)?;
    let nb_u = nb as u32;
    // The gather's width picks the module (kernels 1-3 are the same in every variant).
    let width = width_for(dtype, hidden, x_meta.addr, xp_meta.addr);
    let variant = width.name;
    let cols = hidden / width.vec;
    let bs = crate::cuda::combine::block_for(cols);
    let gy = to_u32(Stage::Permute, "blocks per row", cols.div_ceil(bs), 65_535)?;
    let s_u = to_u32(Stage::Permute, "slots", slots, u32::MAX as usize)?;
    let h_u = to_u32(Stage::Permute, "hidden", hidden, u32::MAX as usize)?;
    let cells = &mut scratch.cells;

    let func = dev.function(Stage::Permute, variant, "permute_count")?;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(&gate.topk_ids)
        .arg(&gate.kept)
        .arg(&mut *cells)
        .arg(&mut out.row_of_assignment);
    b.arg(&n_u).arg(&e_u).arg(&nb_u);
    let cfg = LaunchConfig {
        grid_dim: (nb_u, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches the header of kernels/permute.ptx `permute_count`: ids_ptr, kept_ptr
    // (u32 [N]), cells_ptr (u32 [M], scratch checked to hold M), rank_ptr (u32 [N],
    // row_of_assignment as scratch), n, experts, nb (u32); lengths checked above,
    // M = (E + 1) · NB < 2^31; grid (NB) × 256.
    drv(unsafe { b.launch(cfg) }, "launching permute_count")?;

    let func = dev.function(Stage::Permute, variant, "permute_scan")?;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(&mut *cells)
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

    let func = dev.function(Stage::Permute, variant, "permute_place")?;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(&gate.topk_ids).arg(&gate.kept).arg(&*cells);
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
    let func = dev.function(Stage::Permute, variant, "permute_gather")?;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(&x.bytes)
        .arg(&out.sorted_assignment)
        .arg(&mut out.x_perm)
        .arg(&s_u)
        .arg(&h_u);
    let cfg = LaunchConfig {
        grid_dim: (n_u, gy, 1),
        block_dim: (bs as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches the header of kernels/permute.ptx `permute_gather` in `variant`: x_ptr
    // ([T, H] elements of `dtype`, 4 or 2 bytes as the variant copies), sorted_ptr (u32 [N],
    // a permutation of 0..N so the token is < T), x_perm_ptr ([N, H] of `dtype`), slots,
    // hidden (u32); lengths and element alignment checked above; the 16-byte variants only
    // when H is a multiple of their vector and both bases are 16-byte aligned (width_for);
    // grid (N, ceil(COLS / BS)) × BS.
    drv(unsafe { b.launch(cfg) }, "launching permute_gather")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{assignments, Spread};

    #[test]
    fn every_width_renders_without_placeholders() {
        let m = modules().unwrap();
        assert_eq!(m.len(), 4);
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
        let names: Vec<&str> = m.iter().map(|v| v.variant.as_str()).collect();
        assert_eq!(
            names,
            [
                "permute.x1",
                "permute.x4",
                "permute.b16.x1",
                "permute.b16.x8"
            ]
        );
        assert!(m[1].source.contains("ld.global.nc.v4.b32"));
        // 2-byte rows: element copies (x1) and 16-byte copies of 8 elements (x8).
        assert!(m[2].source.contains("ld.global.nc.u16    %v0, [%src];"));
        assert!(m[2].source.contains("st.global.b16       [%dst], %v0;"));
        assert!(m[2].source.contains("shl.b64             %off, %off, 1;"));
        assert!(m[3]
            .source
            .contains("ld.global.nc.v4.b32 {%v0, %v1, %v2, %v3}, [%src];"));
        assert!(m[3]
            .source
            .contains("shr.u32             %cols, %hidden, 3;"));
        assert!(m[3].source.contains("shl.b64             %off, %off, 4;"));
        assert!(check_len(Stage::Permute, "x", 1, 2).is_err());
        assert!(to_u32(Stage::Permute, "n", MAX_INDEX + 1, MAX_INDEX).is_err());
    }

    #[test]
    fn widths_follow_dtype_length_and_alignment() {
        let w = |d, h, a, b| width_for(d, h, a, b).name;
        assert_eq!(w(DType::F32, 8, 0, 256), "permute.x4");
        assert_eq!(w(DType::F32, 6, 0, 256), "permute.x1");
        assert_eq!(w(DType::F32, 8, 4, 256), "permute.x1");
        assert_eq!(w(DType::BF16, 16, 0, 0), "permute.b16.x8");
        assert_eq!(w(DType::F16, 12, 0, 0), "permute.b16.x1");
        assert_eq!(w(DType::F16, 16, 0, 2), "permute.b16.x1");
        assert_eq!(cells_len(300, 2, 5).unwrap(), 6);
        assert_eq!(cells_len(0, 2, 5).unwrap(), 0);
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
                let n = t * k;
                let gate = GateCuda {
                    topk_ids: dev.upload(&ids).unwrap(),
                    topk_weights: dev.upload(&vec![0.5f32; n]).unwrap(),
                    kept: dev.upload(&kept).unwrap(),
                    counts: dev.alloc(e).unwrap(),
                };
                // 2-byte rows (b16.x1 at H = 13, b16.x8 at H = 8) and f32 rows (x1, x4): bit
                // copies, so the reference is the gather of the rounded x.
                let dtype = [DType::F16, DType::BF16, DType::F32, DType::F32][mode];
                let x = x.cast(dtype);
                let rows = crate::cpu::permute::gather(&x, k, &reference).unwrap();
                let mut out = PermuteCuda {
                    expert_offsets: dev.upload(&vec![u32::MAX; e + 1]).unwrap(),
                    sorted_assignment: dev.upload(&vec![u32::MAX; n]).unwrap(),
                    row_of_assignment: dev.upload(&vec![u32::MAX; n]).unwrap(),
                    x_perm: dev.upload(&vec![0xFFu8; n * h * dtype.size()]).unwrap(),
                    dtype,
                };
                let mut scratch = PermuteScratchCuda::alloc(&dev, t, k, e).unwrap();
                let xbuf = dev.upload(&crate::cuda::act::tensor_bytes(&x)).unwrap();
                let xd = ActView {
                    bytes: xbuf.slice(..),
                    dtype,
                };
                launch(&dev, &gate, (t, k, e), &xd, h, &mut out, &mut scratch).unwrap();
                let ctx = format!("T={t} k={k} E={e} H={h} {spread:?} {dtype}");
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
                let got = crate::cuda::act::bytes_to_f64(
                    &dev.read(&out.x_perm, n * h * dtype.size()).unwrap(),
                    dtype,
                );
                assert!(got == rows, "{ctx}: x_perm");
            }
        }
        println!("permute: device test ran on {}", dev.name);
    }
}
