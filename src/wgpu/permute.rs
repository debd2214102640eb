//! Stage 2 on wgpu: the canonical stable counting sort of assignments by bucket (expert if
//! kept, `E` if dropped) and the gather of `x` into expert order (shaders/permute.wgsl).
//!
//! A blocked counting sort without atomics: per-(bucket, block) counts and in-block ranks, an
//! exclusive prefix sum over the counts in bucket-major order, then each assignment's row is
//! its (bucket, block) base plus its rank. The shader header gives every pass and its launch.
//! The gather copies x's elements bit for bit in any activation dtype: whole words where rows
//! start on words (f32; 16-bit with even H), element by element into whole output words
//! otherwise (16-bit with odd H, whose padded rows end in a 0 half).

use crate::error::{Error, Result};
use crate::limits::{self, Resource};
use crate::shape;
use crate::stage::Stage;
use crate::tensor::DType;
use crate::wgpu::act::{self, Act};
use crate::wgpu::context::{index_u32, within, WgpuDevice};
use crate::wgpu::kernels::Kernel;
use crate::wgpu::scratch::Scratch;
use crate::wgpu::{GateGpu, PermuteGpu};

/// Assignments per block (the shader's `CHUNK`, the workgroup size of `permute_rank`).
const CHUNK: usize = 256;
/// Cells per scan workgroup (the shader's `TILE`).
const TILE: usize = 1024;
/// Workgroup size of the per-assignment and per-element entry points.
const WG: u32 = 64;

/// Entry points of shaders/permute.wgsl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    /// Per-block ranks and per-(bucket, block) counts.
    Rank,
    /// Sum of each tile of the count table.
    ScanReduce,
    /// Exclusive prefix sum of the tile sums (one workgroup).
    ScanTiles,
    /// Exclusive prefix sum of the count table in place, and `expert_offsets`.
    ScanDown,
    /// `sorted_assignment` and `row_of_assignment`.
    Place,
    /// `x_perm`, one word per invocation.
    Gather,
    /// `x_perm`, four words per invocation (rows of a multiple of 4 words).
    Gather4,
    /// `x_perm` of 16-bit elements that straddle words of `x`: one output word per invocation.
    Gather16,
}

impl Entry {
    /// The entry point's name in the shader.
    pub fn name(self) -> &'static str {
        match self {
            Entry::Rank => "permute_rank",
            Entry::ScanReduce => "permute_scan_reduce",
            Entry::ScanTiles => "permute_scan_tiles",
            Entry::ScanDown => "permute_scan_down",
            Entry::Place => "permute_place",
            Entry::Gather => "permute_gather",
            Entry::Gather4 => "permute_gather4",
            Entry::Gather16 => "permute_gather16",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    assignments: u32,
    slots: u32,
    experts: u32,
    hidden: u32,
    blocks: u32,
    cells: u32,
    tiles: u32,
    x_stride: u32,
    row_words: u32,
    src_words: u32,
    dst_words: u32,
    _pad: u32,
}

fn to_u32(what: &str, n: usize) -> Result<u32> {
    index_u32(Stage::Permute, what, n)
}

/// How the gather copies a row of `x` into `x_perm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copy {
    /// Whole words (f32, or 16-bit rows that start on a word in both matrices): `row_words`
    /// words per row, `src_words` / `dst_words` apart; four at a time when all three are
    /// multiples of 4.
    Words {
        row_words: usize,
        src_words: usize,
        dst_words: usize,
    },
    /// 16-bit elements that straddle words of x (odd H or odd stride): one output word of
    /// two elements per invocation.
    Halves,
}

fn copy_kind(x: &Act<'_>, dst_stride: usize) -> Copy {
    match x.dtype {
        DType::F32 => Copy::Words {
            row_words: x.cols,
            src_words: x.stride,
            dst_words: dst_stride,
        },
        _ if x.cols % 2 == 0 && x.stride % 2 == 0 => Copy::Words {
            row_words: x.cols / 2,
            src_words: x.stride / 2,
            dst_words: dst_stride / 2,
        },
        _ => Copy::Halves,
    }
}

/// Records the permutation of `gate`'s assignments (`[T, slots]` over `experts` experts) and
/// the gather of `x` `[T, H]` (any activation dtype, `H = x.cols`) into `out`: `x_perm`
/// `[T·slots, H]` with the padded row stride of [`act::stride`] in `x.dtype`, a bitwise copy of
/// x's elements (padding elements of 16-bit rows are 0). Every buffer may be larger than
/// needed; launches are sized from `tokens`. Allocates nothing: the count table, tile sums,
/// ranks and the uniform come from `scratch`.
#[allow(clippy::too_many_arguments)]
pub fn encode(
    dev: &WgpuDevice,
    enc: &mut ::wgpu::CommandEncoder,
    scratch: &Scratch,
    gate: &GateGpu,
    (tokens, slots, experts): (usize, usize, usize),
    x: Act<'_>,
    out: &PermuteGpu,
) -> Result<()> {
    let st = Stage::Permute;
    let hidden = x.cols;
    let n = shape::mul(st, "T x slots", tokens, slots)?;
    act::same_dtype(st, "x and x_perm", x.dtype, out.dtype)?;
    act::at_least(st, "topk_ids", gate.topk_ids.len, n)?;
    act::at_least(st, "kept", gate.kept.len, n)?;
    x.check(st, "x", tokens)?;
    act::at_least(st, "expert_offsets", out.expert_offsets.len, experts + 1)?;
    act::at_least(st, "sorted_assignment", out.sorted_assignment.len, n)?;
    act::at_least(st, "row_of_assignment", out.row_of_assignment.len, n)?;
    let x_perm = Act::padded(&out.x_perm, out.dtype, n, hidden);
    x_perm.check_padded(st, "x_perm", n)?;
    let blocks = n.div_ceil(CHUNK).max(1);
    let cells = (experts + 1)
        .checked_mul(blocks)
        .ok_or_else(|| Error::shape(st, "(E + 1) x blocks overflows"))?;
    let tiles = cells.div_ceil(TILE);
    let copy = copy_kind(&x, x_perm.stride);
    let (row_words, src_words, dst_words) = match copy {
        Copy::Words {
            row_words,
            src_words,
            dst_words,
        } => (row_words, src_words, dst_words),
        Copy::Halves => (x_perm.stride / 2, 0, x_perm.stride / 2),
    };
    let params = Params {
        assignments: to_u32("T x slots", n)?,
        slots: to_u32("slots", slots)?,
        experts: to_u32("experts", experts)?,
        hidden: to_u32("hidden", hidden)?,
        blocks: to_u32("blocks", blocks)?,
        cells: to_u32("(E + 1) x blocks", cells)?,
        tiles: to_u32("tiles", tiles)?,
        x_stride: to_u32("x row stride", x.stride)?,
        row_words: to_u32("words per row", row_words)?,
        src_words: to_u32("x row stride", src_words)?,
        dst_words: to_u32("x_perm row stride", dst_words)?,
        _pad: 0,
    };
    to_u32("T x slots x H", n.saturating_mul(x_perm.stride))?;
    for (name, words) in [
        ("x", x.words_for_rows(tokens)),
        ("x_perm", x_perm.words_for_rows(n)),
        ("scan table", cells),
    ] {
        within(
            Resource::BindingSize,
            || format!("{}: binding {name}", Stage::Permute),
            limits::product(&[words, 4]),
            dev.max_binding_bytes(),
        )?;
    }

    let cell_buf = scratch.buffer::<u32>(dev, "permute cells", cells)?;
    let tile_buf = scratch.buffer::<u32>(dev, "permute tile sums", tiles)?;
    let rank_buf = scratch.buffer::<u32>(dev, "permute local ranks", n)?;
    let p = scratch.uniform(dev, "permute params", &params)?;
    let p = p.as_entire_binding();

    // Cells that no assignment counts must read 0 (the pool's buffer holds the last forward's).
    enc.clear_buffer(&cell_buf.buffer, 0, None);

    let pipe = dev.pipeline(Kernel::Permute(Entry::Rank), &[])?;
    let bind = scratch.bind(
        dev,
        &pipe,
        &[
            p.clone(),
            gate.topk_ids.binding(),
            gate.kept.binding(),
            cell_buf.binding(),
            rank_buf.binding(),
        ],
    )?;
    dev.dispatch(enc, &pipe, &bind, dev.grid(blocks * CHUNK, CHUNK as u32)?);

    let pipe = dev.pipeline(Kernel::Permute(Entry::ScanReduce), &[])?;
    let bind = scratch.bind(
        dev,
        &pipe,
        &[p.clone(), cell_buf.binding(), tile_buf.binding()],
    )?;
    dev.dispatch(enc, &pipe, &bind, dev.grid(cells, TILE as u32)?);

    let pipe = dev.pipeline(Kernel::Permute(Entry::ScanTiles), &[])?;
    let bind = scratch.bind(dev, &pipe, &[p.clone(), tile_buf.binding()])?;
    dev.dispatch(enc, &pipe, &bind, (1, 1, 1));

    let pipe = dev.pipeline(Kernel::Permute(Entry::ScanDown), &[])?;
    let bind = scratch.bind(
        dev,
        &pipe,
        &[
            p.clone(),
            cell_buf.binding(),
            tile_buf.binding(),
            out.expert_offsets.binding(),
        ],
    )?;
    dev.dispatch(enc, &pipe, &bind, dev.grid(cells, TILE as u32)?);

    if n == 0 {
        return Ok(());
    }
    let pipe = dev.pipeline(Kernel::Permute(Entry::Place), &[])?;
    let bind = scratch.bind(
        dev,
        &pipe,
        &[
            p.clone(),
            gate.topk_ids.binding(),
            gate.kept.binding(),
            cell_buf.binding(),
            rank_buf.binding(),
            out.sorted_assignment.binding(),
            out.row_of_assignment.binding(),
        ],
    )?;
    dev.dispatch(enc, &pipe, &bind, dev.grid(n, WG)?);

    if hidden == 0 {
        return Ok(());
    }
    // vec4 bindings: every row offset and length a whole number of vec4 words (and, with
    // T, N > 0, at least one vec4 bound).
    let (entry, per_row, constants) = match copy {
        Copy::Words { .. } if [row_words, src_words, dst_words].iter().all(|w| w % 4 == 0) => {
            (Entry::Gather4, row_words / 4, vec![])
        }
        Copy::Words { .. } => (Entry::Gather, row_words, vec![]),
        Copy::Halves => (
            Entry::Gather16,
            row_words,
            vec![("A_DTYPE", act::code(x.dtype))],
        ),
    };
    let pipe = dev.pipeline(Kernel::Permute(entry), &constants)?;
    let bind = scratch.bind(
        dev,
        &pipe,
        &[
            p,
            x.binding(tokens, 4),
            out.sorted_assignment.binding(),
            x_perm.binding(n, 4),
        ],
    )?;
    dev.dispatch(enc, &pipe, &bind, dev.grid(n * per_row, WG)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    //! f16 / bf16 gathers (odd H: element copies across words; even H: word copies; H/2 a
    //! multiple of 4: vec4 copies) bitwise against the reference, with the gate and output
    //! buffers and the scratch pool of a workspace for more tokens, reused across T = 37, 7, 1.

    use super::*;
    use crate::cpu::permute::permute as cpu_permute;
    use crate::synth::{assignments, Gen, Spread};
    use crate::wgpu::act::test_util;

    #[test]
    fn half_gather_is_bitwise() {
        let Some(dev) = crate::wgpu::context::test_device("permute") else {
            return;
        };
        let mut g = Gen::new(31);
        let (e, k, max_t) = (5, 2, 37);
        for dtype in [DType::F16, DType::BF16] {
            for h in [37usize, 40, 16, 1] {
                let gate = GateGpu::alloc(&dev, max_t, k, e).unwrap();
                let out = PermuteGpu::alloc(&dev, max_t, k, e, h, dtype).unwrap();
                let pool = Scratch::new();
                let st = act::stride(h, dtype);
                for (t, spread) in [
                    (37, Spread::DropEveryThird),
                    (7, Spread::Random),
                    (1, Spread::Random),
                ] {
                    let n = t * k;
                    let (ids, kept) = assignments(&mut g, t, k, e, spread);
                    dev.queue
                        .write_buffer(&gate.topk_ids.buffer, 0, bytemuck::cast_slice(&ids));
                    dev.queue
                        .write_buffer(&gate.kept.buffer, 0, bytemuck::cast_slice(&kept));
                    let x = test_util::round(&g.uniform(t * h, 1.0), dtype);
                    let xb = test_util::upload(&dev, &x, (t, h, h), dtype, max_t * h);
                    for b in [
                        &out.expert_offsets,
                        &out.sorted_assignment,
                        &out.row_of_assignment,
                    ] {
                        test_util::poison(&dev, b);
                    }
                    test_util::poison(&dev, &out.x_perm);
                    pool.begin().unwrap();
                    let mut enc = dev.encoder();
                    let xa = Act::dense(&xb, dtype, t, h);
                    encode(&dev, &mut enc, &pool, &gate, (t, k, e), xa, &out).unwrap();
                    dev.submit_and_wait(enc).unwrap();

                    let kept_b: Vec<bool> = kept.iter().map(|&v| v != 0).collect();
                    let want = cpu_permute(&ids, &kept_b, e).unwrap();
                    let ctx = format!("{dtype}, H {h}, T {t}");
                    assert_eq!(
                        dev.read(&out.expert_offsets).unwrap(),
                        want.expert_offsets,
                        "{ctx}"
                    );
                    let sorted = dev.read(&out.sorted_assignment).unwrap();
                    assert_eq!(sorted[..n], want.sorted_assignment, "{ctx}");
                    let row_of = dev.read(&out.row_of_assignment).unwrap();
                    assert_eq!(row_of[..n], want.row_of_assignment, "{ctx}");
                    let rows: Vec<f32> = want
                        .sorted_assignment
                        .iter()
                        .flat_map(|&a| {
                            let tok = a as usize / k;
                            x[tok * h..(tok + 1) * h].iter().copied()
                        })
                        .collect();
                    let expected = act::pack(&rows, n, h, st, dtype);
                    let words = dev.read(&out.x_perm).unwrap();
                    assert_eq!(words[..expected.len()], expected, "{ctx}: x_perm bits");
                    assert!(
                        words[expected.len()..].iter().all(|&w| w == u32::MAX),
                        "{ctx}: wrote past the rows"
                    );
                }
            }
            println!("permute with {dtype} activations: bitwise");
        }
    }

    #[test]
    fn mismatched_buffers_are_refused() {
        let Some(dev) = crate::wgpu::context::test_device("permute") else {
            return;
        };
        let gate = GateGpu::alloc(&dev, 4, 2, 3).unwrap();
        let out = PermuteGpu::alloc(&dev, 4, 2, 3, 6, DType::F16).unwrap();
        let xb = dev.alloc::<u32>(12, "x").unwrap();
        let pool = Scratch::new();
        let mut enc = dev.encoder();
        for (x, t) in [
            (Act::dense(&xb, DType::BF16, 4, 6), 4), // dtype differs from x_perm's
            (Act::dense(&xb, DType::F16, 5, 6), 5),  // more tokens than the gate holds
            (Act::dense(&xb, DType::F16, 4, 7), 4),  // x_perm too small for H = 7
            (Act::dense(&xb, DType::F16, 3, 6), 4),  // x has fewer rows than T
        ] {
            let err = encode(&dev, &mut enc, &pool, &gate, (t, 2, 3), x, &out).unwrap_err();
            assert!(matches!(err, Error::Shape { .. }), "T {t}: {err:?}");
        }
    }
}
