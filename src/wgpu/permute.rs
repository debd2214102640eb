//! Stage 2 on wgpu: the canonical stable counting sort of assignments by bucket (expert if
//! kept, `E` if dropped) and the gather of `x` into expert order (shaders/permute.wgsl).
//!
//! A blocked counting sort without atomics: per-(bucket, block) counts and in-block ranks, an
//! exclusive prefix sum over the counts in bucket-major order, then each assignment's row is
//! its (bucket, block) base plus its rank. The shader header gives every pass and its launch.

use crate::error::{Error, Result};
use crate::limits::{self, Resource};
use crate::stage::Stage;
use crate::wgpu::context::{index_u32, within, GpuBuffer, WgpuDevice};
use crate::wgpu::kernels::Kernel;
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
    /// `x_perm`, one element per invocation.
    Gather,
    /// `x_perm`, four elements per invocation (`H % 4 == 0`).
    Gather4,
}

impl Entry {
    pub fn name(self) -> &'static str {
        match self {
            Entry::Rank => "permute_rank",
            Entry::ScanReduce => "permute_scan_reduce",
            Entry::ScanTiles => "permute_scan_tiles",
            Entry::ScanDown => "permute_scan_down",
            Entry::Place => "permute_place",
            Entry::Gather => "permute_gather",
            Entry::Gather4 => "permute_gather4",
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
    _pad: u32,
}

fn to_u32(what: &str, n: usize) -> Result<u32> {
    index_u32(Stage::Permute, what, n)
}

fn expect_len(name: &str, have: usize, want: usize) -> Result<()> {
    crate::shape::expect_len(Stage::Permute, name, have, want)
}

/// Records the permutation of `gate`'s assignments and the gather of `x` `[T, H]` into `out`.
#[allow(clippy::too_many_arguments)]
pub fn encode(
    dev: &WgpuDevice,
    enc: &mut ::wgpu::CommandEncoder,
    gate: &GateGpu,
    (tokens, slots, experts): (usize, usize, usize),
    x: &GpuBuffer<f32>,
    hidden: usize,
    out: &PermuteGpu,
) -> Result<()> {
    let n = tokens
        .checked_mul(slots)
        .ok_or_else(|| Error::shape(Stage::Permute, "T x slots overflows"))?;
    expect_len("topk_ids", gate.topk_ids.len, n)?;
    expect_len("kept", gate.kept.len, n)?;
    expect_len("x", x.len, tokens * hidden)?;
    expect_len("expert_offsets", out.expert_offsets.len, experts + 1)?;
    expect_len("sorted_assignment", out.sorted_assignment.len, n)?;
    expect_len("row_of_assignment", out.row_of_assignment.len, n)?;
    expect_len("x_perm", out.x_perm.len, n * hidden)?;
    let blocks = n.div_ceil(CHUNK).max(1);
    let cells = (experts + 1)
        .checked_mul(blocks)
        .ok_or_else(|| Error::shape(Stage::Permute, "(E + 1) x blocks overflows"))?;
    let tiles = cells.div_ceil(TILE);
    let params = Params {
        assignments: to_u32("T x slots", n)?,
        slots: to_u32("slots", slots)?,
        experts: to_u32("experts", experts)?,
        hidden: to_u32("hidden", hidden)?,
        blocks: to_u32("blocks", blocks)?,
        cells: to_u32("(E + 1) x blocks", cells)?,
        tiles: to_u32("tiles", tiles)?,
        _pad: 0,
    };
    to_u32("T x slots x H", n * hidden)?;
    for (name, elems) in [
        ("x", x.len),
        ("x_perm", out.x_perm.len),
        ("scan table", cells),
    ] {
        within(
            Resource::BindingSize,
            || format!("{}: binding {name}", Stage::Permute),
            limits::product(&[elems, 4]),
            dev.max_binding_bytes(),
        )?;
    }

    let cell_buf = dev.alloc::<u32>(cells, "permute cells")?;
    let tile_buf = dev.alloc::<u32>(tiles, "permute tile sums")?;
    let rank_buf = dev.alloc::<u32>(n, "permute local ranks")?;
    let p = dev.uniform(&params);
    let p = p.as_entire_binding();

    // Cells that no assignment counts must read 0.
    enc.clear_buffer(&cell_buf.buffer, 0, None);

    let pipe = dev.pipeline(Kernel::Permute(Entry::Rank), &[])?;
    let bind = dev.bind(
        &pipe,
        &[
            p.clone(),
            gate.topk_ids.binding(),
            gate.kept.binding(),
            cell_buf.binding(),
            rank_buf.binding(),
        ],
    );
    dev.dispatch(enc, &pipe, &bind, dev.grid(blocks * CHUNK, CHUNK as u32)?);

    let pipe = dev.pipeline(Kernel::Permute(Entry::ScanReduce), &[])?;
    let bind = dev.bind(&pipe, &[p.clone(), cell_buf.binding(), tile_buf.binding()]);
    dev.dispatch(enc, &pipe, &bind, dev.grid(cells, TILE as u32)?);

    let pipe = dev.pipeline(Kernel::Permute(Entry::ScanTiles), &[])?;
    let bind = dev.bind(&pipe, &[p.clone(), tile_buf.binding()]);
    dev.dispatch(enc, &pipe, &bind, (1, 1, 1));

    let pipe = dev.pipeline(Kernel::Permute(Entry::ScanDown), &[])?;
    let bind = dev.bind(
        &pipe,
        &[
            p.clone(),
            cell_buf.binding(),
            tile_buf.binding(),
            out.expert_offsets.binding(),
        ],
    );
    dev.dispatch(enc, &pipe, &bind, dev.grid(cells, TILE as u32)?);

    if n == 0 {
        return Ok(());
    }
    let pipe = dev.pipeline(Kernel::Permute(Entry::Place), &[])?;
    let bind = dev.bind(
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
    );
    dev.dispatch(enc, &pipe, &bind, dev.grid(n, WG)?);

    if hidden == 0 {
        return Ok(());
    }
    // vec4 bindings need a 16-byte multiple, which H % 4 == 0 and N, T > 0 give.
    let (entry, per_row) = if hidden % 4 == 0 {
        (Entry::Gather4, hidden / 4)
    } else {
        (Entry::Gather, hidden)
    };
    let pipe = dev.pipeline(Kernel::Permute(entry), &[])?;
    let bind = dev.bind(
        &pipe,
        &[
            p,
            x.binding(),
            out.sorted_assignment.binding(),
            out.x_perm.binding(),
        ],
    );
    dev.dispatch(enc, &pipe, &bind, dev.grid(n * per_row, WG)?);
    Ok(())
}
