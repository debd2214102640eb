//! Stage 3 on wgpu: the grouped expert FFN (shaders/expert_gemm.wgsl).
//!
//! Two passes of one tiled GEMM kernel (64 × 64 output tiles, 16 deep, 256 invocations each
//! computing a 4 × 4 block): `expert_up` computes `h [rows, F]` with the activation in its
//! epilogue (gate and up tiles side by side in the same workgroup when gated), `expert_down`
//! computes `y [rows, H]` from `h`. Expert row ranges come from `offsets` on the device: grids
//! are sized from static bounds (`ceil(rows / 64) + experts` row tiles) and surplus workgroups
//! exit after reading the offsets, so the host never reads them.
//!
//! Weights are bound one row chunk at a time ([`GpuWeights`]: every chunk fits the adapter's
//! storage binding limit). A chunk may start or end in the middle of an expert; each dispatch
//! covers every (expert, column) whose weight row lies in its chunk, indexing the chunk with
//! chunk-relative rows, so no re-upload per expert is needed. Gate and up share one chunking
//! (same shape, dtype and limit). Chunking never changes a result: every output is summed in
//! the one canonical order below.
//!
//! **Canonical summation order** (every entry point, dense and quantized; the shader header's
//! Determinism section): k is cut into chunks of [`K_CHUNK`] = 256 consecutive k; each chunk
//! is one f32 fma chain from 0 in k order (zero-padded to a multiple of 16 inside the last
//! chunk), the output is chunk 0, + chunk 1, + chunk 2, … left to right, then bias and
//! activation. It depends on K alone, so a row's bits do not depend on the batch, the tile,
//! the weight chunking or the entry point; for K ≤ 256 it is the single in-order chain.
//!
//! Quantized weights (FP8 block, MXFP4, INT4; DESIGN.md section 4) are uploaded as their
//! packed bytes, each chunk one buffer of codes, scales and zero points (src/wgpu/weights.rs),
//! and decoded in the kernels' weight loads (the `W_QUANT`, `S_DTYPE`, `W_ZEROS` and `W_GROUP`
//! overrides, the section offsets in the uniform): one decoded f32 per weight element enters
//! the same fma chain as a dense weight, so every path and chunking gives the same bits. The
//! tiled and scalar small-batch entry points decode element by element (a code word and a
//! scale per element); the vec4 small-batch ones read 16-byte words of codes (16 FP8 codes or
//! 32 nibbles) and decode a word with one scale (and zero point) fetch per group in it.
//!
//! Dense weights are uploaded as k-major slabs of 64 output columns
//! ([`GpuWeights::upload_slabs`]); chunks hold whole slabs. With at most [`SMALL_ROWS`] = 32
//! rows in all, dense passes run the `*_gemv` entry points: each invocation owns 8 columns of
//! one slab and up to 4 rows of its expert and sums whole k chunks with one 128-bit weight
//! load per k (8 invocations read one 128-byte line). k is split over [`gv_splits`] (S = 1,
//! 2, 4 or 8: from K on a GPU, 1 on a CPU adapter) invocations per output: a workgroup is S
//! splits × min(8, 32 / S) slabs × 8 lanes, split j sums chunks j, j + S, …, and split 0
//! adds the chunk sums staged in workgroup memory in chunk order (at most 2 barriers per row
//! and round of S chunks): S times the independent weight loads in flight of one sequential
//! walk over k, the same arithmetic as every other path whatever S is.
//!
//! Small batches of quantized weights (decode): with at most [`SMALL_ROWS`] = 32 rows in all
//! (`T · k` routed rows, known on the host), the 64-row tiles would be almost empty and the
//! grid too small to keep the memory busy, so the `*_rows` entry points run instead: one
//! workgroup per (expert, 32 weight rows), looping over that expert's ≤ 32 rows with one read
//! of each weight element, loaded with coalesced 128-bit reads (`*_rows_x4`) or scalar words.
//! `pass_entry` picks the 128-bit form for a pass whenever its weight rows are whole 16-byte
//! words of whole elements ([`GpuWeights::vec4_rows`]: FP8 K % 16 = 0, MXFP4 / INT4
//! K % 32 = 0), the scalar form otherwise (odd K included); [`GemmPath`] forces either for
//! tests. They compute every output with exactly the tiled kernel's arithmetic (same decoded
//! weights, the canonical k-chunk order, zero padding, bias and activation code), so a
//! token's output is bitwise the same whether its batch takes the small or the tiled path,
//! and whichever weight load the small path uses.
//!
//! Activations (`a`, `h`, `out`) are f32, f16 or bf16 ([`Act`], the shader's `A_DTYPE`): read
//! widened exactly, accumulated in f32, each output rounded once at the store. A 16-bit output
//! word is written whole by the one invocation that computes both of its columns; where a
//! weight chunk boundary splits a word's two columns, each chunk's dispatch keeps the other
//! half (shaders/expert_gemm.wgsl). With f32 the results are bitwise those of the f32-only
//! kernels.

use crate::config::Activation;
use crate::cpu::expert_gemm::{ExpertDims, ExpertWeights};
use crate::error::{Error, Result};
use crate::limits::{self, Resource};
use crate::quant::QuantFormat;
use crate::shape;
use crate::stage::Stage;
use crate::tensor::{DType, Tensor};
use crate::wgpu::act::{self, Act};
use crate::wgpu::context::{gpu_err, index_u32, within, GpuBuffer, WgpuDevice};
use crate::wgpu::kernels::Kernel;
use crate::wgpu::scratch::Scratch;
use crate::wgpu::weights::{GpuWeights, WeightChunk, WeightFormat, SLAB};

/// Rows of a workgroup's output tile (BM in the shader).
const TILE_ROWS: usize = 64;
/// Columns of a workgroup's output tile (BN in the shader).
const TILE_COLS: usize = 64;
/// The most rows (in all, over every expert) the small-batch path takes (RB_M in the shader).
/// Up to 32 rows, one read of a weight element serves every row of its expert while the
/// tiled kernel's 64-row tiles would be at most half full; past it the tiles' reuse of the
/// weight tile across 64 rows wins.
pub const SMALL_ROWS: usize = 32;
/// Columns (weight rows) of a small-path workgroup (RB_N in the shader).
const SMALL_COLS: usize = 32;
/// Rows of one dense GEMV invocation (GV_ROWS in the shader).
const GV_ROWS: usize = 4;
/// Depth of a canonical k chunk (KC in the shader): every path sums each chunk of KC
/// consecutive k from 0 and adds the chunks in order.
pub const K_CHUNK: usize = 256;

/// The k splits of a dense GEMV pass over K (GV_SPLITS in the shader). On a GPU: the number
/// of k chunks (KC = [`K_CHUNK`] deep, of K rounded up to 16) rounded up to a power of two,
/// at most 8, so that S times the weight loads are in flight. On a CPU adapter (`cpu`:
/// lavapipe) 1: its barriers are coroutine switches and a k loop followed by one costs about
/// twice as much (docs/PERF.md, 2026-12-05), and it has no memory latency to hide. The split
/// count never changes a result (every split count adds the same chunk sums in the same
/// order), so it may depend on the device; it never depends on the batch.
pub fn gv_splits(k: usize, cpu: bool) -> usize {
    if cpu {
        return 1;
    }
    k.next_multiple_of(16)
        .div_ceil(K_CHUNK)
        .clamp(1, 8)
        .next_power_of_two()
}

/// The environment variable that overrides [`gv_splits`] (device checks time the split counts
/// against each other; every count gives the same bits).
pub const GEMV_SPLITS_VAR: &str = "MOE_WGPU_GEMV_SPLITS";

/// [`GEMV_SPLITS_VAR`]: unset or `auto` → `None` ([`gv_splits`] decides); `1`, `2`, `4` or `8`
/// → that split count; anything else is a [`crate::Error::Config`] naming the variable. The
/// variable is read once per process (the first call), not on every forward's encode.
pub fn gv_splits_override() -> Result<Option<usize>> {
    static PARSED: std::sync::OnceLock<std::result::Result<Option<usize>, String>> =
        std::sync::OnceLock::new();
    PARSED
        .get_or_init(|| parse_gv_splits(std::env::var_os(GEMV_SPLITS_VAR).as_deref()))
        .clone()
        .map_err(crate::error::Error::Config)
}

/// [`gv_splits_override`] of the variable's value `v` (`None`: unset); `Err` is the message.
fn parse_gv_splits(v: Option<&std::ffi::OsStr>) -> std::result::Result<Option<usize>, String> {
    let Some(v) = v else {
        return Ok(None);
    };
    match v.to_str() {
        Some("auto") => Ok(None),
        Some("1") => Ok(Some(1)),
        Some("2") => Ok(Some(2)),
        Some("4") => Ok(Some(4)),
        Some("8") => Ok(Some(8)),
        _ => Err(format!(
            "{GEMV_SPLITS_VAR}={v:?}: expected auto, 1, 2, 4 or 8"
        )),
    }
}

/// Slabs per dense GEMV workgroup with `splits` k splits (gv_gs in the shader): 8, or 4
/// with 8 splits; the workgroup is `splits` × this × 8 invocations (at most 256).
fn gv_slabs(splits: usize) -> usize {
    8.min(32 / splits)
}

#[cfg(test)]
thread_local! {
    /// Tests: the GEMV's k split count, in place of [`gv_splits`] (every count must give
    /// the same bits).
    static FORCE_SPLITS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Which kernel [`encode_path`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmPath {
    /// The small-batch path when `rows <= SMALL_ROWS`, the tiled kernel otherwise.
    Auto,
    /// The tiled kernel (any row count).
    Tiled,
    /// The small-batch path (`rows <= SMALL_ROWS` only): for dense (slab) weights the GEMV;
    /// for quantized ones 128-bit weight words for each matrix whose rows allow them
    /// ([`GpuWeights::vec4_rows`]), scalar words otherwise: what `Auto` runs for small batches.
    Rows,
    /// The small-batch path with scalar weight words for every quantized matrix
    /// (`rows <= SMALL_ROWS`; dense weights: the GEMV).
    RowsScalar,
    /// The small-batch path with 128-bit weight words for every quantized matrix
    /// (`rows <= SMALL_ROWS`; an error when a matrix's rows do not allow them; a pass with
    /// K = 0 reads no weight and runs the scalar entry point; dense weights: the GEMV).
    RowsX4,
}

/// Entry points of shaders/expert_gemm.wgsl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    /// GEMM 1 with the activation in its epilogue: `h = act(x·Wgᵀ + bg, x·Wuᵀ + bu)`.
    Up,
    /// GEMM 2: `y = h·Wdᵀ + bd`.
    Down,
    /// [`Entry::Up`] for ≤ 32 rows, scalar weight words.
    UpRows,
    /// [`Entry::Down`] for ≤ 32 rows, scalar weight words.
    DownRows,
    /// [`Entry::Up`] for ≤ 32 rows, 128-bit weight words (rows of whole words:
    /// [`GpuWeights::vec4_rows`]; dense elements, or quantized codes decoded a word at a time).
    UpRowsX4,
    /// [`Entry::Down`] for ≤ 32 rows, 128-bit weight words (as [`Entry::UpRowsX4`]).
    DownRowsX4,
    /// [`Entry::Up`] for ≤ 32 rows of dense (slab) weights: the split-k GEMV.
    UpGemv,
    /// [`Entry::Down`] for ≤ 32 rows of dense (slab) weights.
    DownGemv,
}

/// Tiled, small-batch scalar, small-batch vec4 and dense GEMV entry points of GEMM 1.
const UP_ENTRIES: [Entry; 4] = [Entry::Up, Entry::UpRows, Entry::UpRowsX4, Entry::UpGemv];
/// Tiled, small-batch scalar, small-batch vec4 and dense GEMV entry points of GEMM 2.
const DOWN_ENTRIES: [Entry; 4] = [
    Entry::Down,
    Entry::DownRows,
    Entry::DownRowsX4,
    Entry::DownGemv,
];

/// The entry point of a pass with `entries` (tiled, scalar rows, vec4 rows, dense GEMV) over
/// `weights` (`[E·N, K]`, K = `weights.cols`) for `rows` rows on `path`. Dense (slab) weights
/// take the GEMV for every small-batch path. For quantized ones the vec4 small-batch entry
/// point is taken only when every weight row is whole 16-byte words
/// ([`GpuWeights::vec4_rows`]: FP8 K % 16 = 0, MXFP4 / INT4 K % 32 = 0); odd K and other
/// widths take the scalar one. Every choice gives the same bits.
fn pass_entry(
    path: GemmPath,
    rows: usize,
    entries: [Entry; 4],
    weights: &GpuWeights,
) -> Result<Entry> {
    if path != GemmPath::Tiled && path != GemmPath::Auto && rows > SMALL_ROWS {
        return Err(gpu_err(format!(
            "the small-batch expert GEMM takes at most {SMALL_ROWS} rows, not {rows}"
        )));
    }
    // Dense weights are slabs: every small-batch path is the GEMV (any K).
    if weights.slab.is_some() {
        return Ok(match path {
            GemmPath::Tiled => entries[0],
            GemmPath::Auto if rows > SMALL_ROWS => entries[0],
            _ => entries[3],
        });
    }
    let k = weights.cols;
    let x4 = weights.vec4_rows();
    Ok(match path {
        GemmPath::Tiled => entries[0],
        GemmPath::Auto if rows > SMALL_ROWS => entries[0],
        GemmPath::Auto | GemmPath::Rows => entries[if x4 { 2 } else { 1 }],
        GemmPath::RowsScalar => entries[1],
        GemmPath::RowsX4 if k == 0 => entries[1],
        GemmPath::RowsX4 => {
            if !x4 {
                return Err(gpu_err(format!(
                    "the vec4 small-batch expert GEMM needs rows of whole 16-byte words; \
                     {:?} weights with K = {k} do not have them",
                    weights.format
                )));
            }
            entries[2]
        }
    })
}

impl Entry {
    /// The entry point's name in the shader.
    pub fn name(self) -> &'static str {
        match self {
            Entry::Up => "expert_up",
            Entry::Down => "expert_down",
            Entry::UpRows => "expert_up_rows",
            Entry::DownRows => "expert_down_rows",
            Entry::UpRowsX4 => "expert_up_rows_x4",
            Entry::DownRowsX4 => "expert_down_rows_x4",
            Entry::UpGemv => "expert_up_gemv",
            Entry::DownGemv => "expert_down_gemv",
        }
    }
}

/// Expert weights on the device: `[E·F, H]` gate / up and `[E·H, F]` down matrices in row
/// chunks (dense words or quantized bytes), biases as f32.
#[derive(Debug)]
pub struct GpuExperts {
    /// E, H and F.
    pub dims: ExpertDims,
    /// `[E·F, H]`, present iff the activation is gated; chunked exactly like `up`.
    pub gate: Option<GpuWeights>,
    /// `[E·F, H]`.
    pub up: GpuWeights,
    /// `[E·H, F]`.
    pub down: GpuWeights,
    /// `[E·F]`.
    pub gate_bias: Option<GpuBuffer<f32>>,
    /// `[E·F]`.
    pub up_bias: Option<GpuBuffer<f32>>,
    /// `[E·H]`.
    pub down_bias: Option<GpuBuffer<f32>>,
    /// Bound where a matrix or bias is absent.
    dummy_words: GpuBuffer<u32>,
    /// Four words: the smallest binding of the shader's `array<vec4<u32>>`.
    dummy_words4: GpuBuffer<u32>,
    dummy_f32: GpuBuffer<f32>,
}

impl GpuExperts {
    /// Uploads `w` (E experts, or one shared expert as E = 1) for `act`.
    pub fn upload(dev: &WgpuDevice, w: &ExpertWeights, act: Activation) -> Result<Self> {
        Self::upload_with_limit(dev, w, act, None)
    }

    /// [`GpuExperts::upload`] with weight chunks of at most `max_bytes` each (the device's
    /// binding limit when `None`, and never above it); small limits exercise the chunked path.
    pub fn upload_with_limit(
        dev: &WgpuDevice,
        w: &ExpertWeights,
        act: Activation,
        max_bytes: Option<u64>,
    ) -> Result<Self> {
        // Gate and up share one format and layout (dims checks the quantized ones): one
        // pipeline decodes both, and they chunk identically.
        let dims = w.dims(act)?;
        let st = Stage::ExpertGemm;
        if let (Some(g), Some(u)) = (w.gate.as_ref().and_then(|g| g.dense()), w.up.dense()) {
            if g.dtype() != u.dtype() {
                return Err(Error::shape(
                    st,
                    format!(
                        "gate_proj is {} but up_proj is {}: the gated GEMM reads both with one dtype",
                        g.dtype(),
                        u.dtype()
                    ),
                ));
            }
        }
        let up = GpuWeights::upload_weight(dev, &w.up, max_bytes, "experts.up_proj")?;
        let gate = match &w.gate {
            Some(g) => {
                let gw = GpuWeights::upload_weight(dev, g, max_bytes, "experts.gate_proj")?;
                let same_chunk = |a: &WeightChunk, b: &WeightChunk| {
                    (a.first_row, a.rows, a.scale_word, a.zero_word, a.scale_row0)
                        == (b.first_row, b.rows, b.scale_word, b.zero_word, b.scale_row0)
                        && (a.first_slab, a.slabs) == (b.first_slab, b.slabs)
                };
                let same = gw.format == up.format
                    && gw.slab == up.slab
                    && gw.chunks.len() == up.chunks.len()
                    && gw
                        .chunks
                        .iter()
                        .zip(&up.chunks)
                        .all(|(a, b)| same_chunk(a, b));
                if !same {
                    return Err(gpu_err(
                        "gate_proj and up_proj were laid out differently on the device",
                    ));
                }
                Some(gw)
            }
            None => None,
        };
        let down = GpuWeights::upload_weight(dev, &w.down, max_bytes, "experts.down_proj")?;
        let bias = |b: &Option<Tensor>, label: &str| {
            b.as_ref()
                .map(|t| dev.upload(&t.to_f32_vec(), label))
                .transpose()
        };
        Ok(GpuExperts {
            dims,
            gate,
            up,
            down,
            gate_bias: bias(&w.gate_bias, "experts.gate_proj_bias")?,
            up_bias: bias(&w.up_bias, "experts.up_proj_bias")?,
            down_bias: bias(&w.down_bias, "experts.down_proj_bias")?,
            dummy_words: dev.upload(&[0u32], "no weights")?,
            dummy_words4: dev.upload(&[0u32; 4], "no weights")?,
            dummy_f32: dev.upload(&[0f32], "no bias")?,
        })
    }

    /// Bytes of device memory these weights hold: the matrices as allocated (dense words, or
    /// quantized sections with their alignment), the f32 biases and the small placeholder
    /// buffers bound where a matrix or bias is absent.
    pub fn bytes(&self) -> u64 {
        let bias = |b: &Option<GpuBuffer<f32>>| b.as_ref().map_or(0, |b| b.buffer.size());
        self.gate.as_ref().map_or(0, GpuWeights::bytes)
            + self.up.bytes()
            + self.down.bytes()
            + bias(&self.gate_bias)
            + bias(&self.up_bias)
            + bias(&self.down_bias)
            + self.dummy_words.buffer.size()
            + self.dummy_words4.buffer.size()
            + self.dummy_f32.buffer.size()
    }
}

/// The weight-decoding overrides of a matrix: `W_DTYPE` (common.wgsl), `W_QUANT`, `S_DTYPE`,
/// `W_ZEROS` and `W_GROUP` (shaders/expert_gemm.wgsl).
fn weight_constants(w: &GpuWeights) -> Vec<(&'static str, f64)> {
    let mut c = vec![("W_DTYPE", w.dtype_code())];
    if let WeightFormat::Quant(q) = &w.format {
        let code = match q.format {
            QuantFormat::Fp8Block => 1.0,
            QuantFormat::Mxfp4 => 2.0,
            QuantFormat::Int4 => 3.0,
        };
        c.extend([
            ("W_QUANT", code),
            ("S_DTYPE", f64::from(q.scale_code)),
            ("W_ZEROS", f64::from(u8::from(q.zeros))),
            ("W_GROUP", q.group as f64),
        ]);
    }
    c
}

/// One weight chunk of a pass as the shader sees it.
#[derive(Clone, Copy)]
struct ChunkRef<'a> {
    /// First row of the flattened `[E·N, K]` view.
    first: usize,
    rows: usize,
    /// The weight words (gate words in `gate`, a dummy when not gated).
    words: &'a GpuBuffer<u32>,
    gate: &'a GpuBuffer<u32>,
    /// Quantized section offsets (words) and first scale row (0 when dense).
    scale_word: usize,
    zero_word: usize,
    scale_row0: usize,
    /// Slab weights: the chunk's first slab and its slab count (0 otherwise).
    first_slab: usize,
    slabs: usize,
}

impl<'a> ChunkRef<'a> {
    /// `c` with the gate words `gate` (a dummy when not gated).
    fn new(c: &'a WeightChunk, gate: &'a GpuBuffer<u32>) -> Self {
        ChunkRef {
            first: c.first_row,
            rows: c.rows,
            words: &c.words,
            gate,
            scale_word: c.scale_word,
            zero_word: c.zero_word,
            scale_row0: c.scale_row0,
            first_slab: c.first_slab,
            slabs: c.slabs,
        }
    }
}

/// The shader's `GemmParams` (the quantized fields are 0 for dense weights).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    experts: u32,
    rows: u32,
    k_dim: u32,
    n_dim: u32,
    e_first: u32,
    e_count: u32,
    chunk_first: u32,
    chunk_rows: u32,
    has_bias: u32,
    alpha: f32,
    limit: f32,
    a_stride: u32,
    out_stride: u32,
    s_off: u32,
    z_off: u32,
    s_row0: u32,
    s_cols: u32,
    s_rows_e: u32,
    row_bytes: u32,
    a_vec4: u32,
}

// A uniform's size is a multiple of 16 bytes.
const _: () = assert!(std::mem::size_of::<Params>() % 16 == 0);

/// The `ACT` override of the shader.
fn act_code(act: Activation) -> f64 {
    match act {
        Activation::Swiglu => 1.0,
        Activation::Geglu => 2.0,
        Activation::Relu => 3.0,
        Activation::Gelu => 4.0,
        Activation::ClampedSwiglu(_) => 5.0,
    }
}

/// One GEMM pass: `out [rows, N] = epilogue(a [rows, K] · W[e]ᵀ)` for the weight row chunks
/// `chunks` of the flattened `[E·N, K]` view of `weights`.
struct Pass<'a> {
    /// The entry point ([`pass_entry`]).
    entry: Entry,
    weights: &'a GpuWeights,
    constants: Vec<(&'static str, f64)>,
    k: usize,
    n: usize,
    chunks: Vec<ChunkRef<'a>>,
    bias_b: Option<&'a GpuBuffer<f32>>,
    bias_g: Option<&'a GpuBuffer<f32>>,
    a: Act<'a>,
    out: Act<'a>,
}

/// Records `out [rows, H]` = the expert FFN of `a [rows, H]` (`rows = a.rows`), rows of
/// expert e being `offsets[e]..offsets[e+1]` (`offsets` `[E + 1]` on the device; rows from
/// `offsets[E]` on are not written). `a` and `out` share one activation dtype; `a` may have any
/// row stride (the caller's dense x for the shared expert, the padded x_perm for the routed
/// ones), `out` is padded (an even stride for f16 / bf16). The intermediate `h [rows, F]`
/// (padded, in the same dtype; one binding: it must fit the adapter's storage binding limit)
/// comes from `scratch`, as do the uniforms: nothing is allocated. Records dispatches only.
/// Takes the small-batch path when `rows <= SMALL_ROWS` (128-bit weight words for each
/// matrix whose rows allow them: [`GpuWeights::vec4_rows`]), the tiled kernel otherwise
/// (bitwise the same results).
#[allow(clippy::too_many_arguments)]
pub fn encode(
    dev: &WgpuDevice,
    enc: &mut ::wgpu::CommandEncoder,
    scratch: &Scratch,
    a: Act<'_>,
    offsets: &GpuBuffer<u32>,
    w: &GpuExperts,
    act: Activation,
    out: Act<'_>,
) -> Result<()> {
    encode_path(dev, enc, scratch, a, offsets, w, act, out, GemmPath::Auto)
}

/// [`encode`] with the kernel chosen by `path` (tests force each path).
#[allow(clippy::too_many_arguments)]
pub fn encode_path(
    dev: &WgpuDevice,
    enc: &mut ::wgpu::CommandEncoder,
    scratch: &Scratch,
    a: Act<'_>,
    offsets: &GpuBuffer<u32>,
    w: &GpuExperts,
    act: Activation,
    out: Act<'_>,
    path: GemmPath,
) -> Result<()> {
    let st = Stage::ExpertGemm;
    let rows = a.rows;
    // Both passes' entry points, chosen (and a forced path checked) before anything is recorded.
    let up_entry = pass_entry(path, rows, UP_ENTRIES, &w.up)?;
    let down_entry = pass_entry(path, rows, DOWN_ENTRIES, &w.down)?;
    let ExpertDims {
        experts: e,
        hidden: h,
        ffn: f,
    } = w.dims;
    if w.gate.is_some() != act.is_gated() {
        return Err(Error::shape(
            st,
            format!("the experts were uploaded for another activation than {act:?}"),
        ));
    }
    act::at_least(st, "expert_offsets", offsets.len, e + 1)?;
    act::same_dtype(st, "a and out", a.dtype, out.dtype)?;
    shape::expect_eq(st, "a columns (H)", a.cols, h)?;
    shape::expect_eq(st, "out columns (H)", out.cols, h)?;
    a.check(st, "a", rows)?;
    out.check_padded(st, "out", rows)?;
    if rows == 0 || h == 0 {
        return Ok(());
    }
    let dtype = a.dtype;
    let max_elems = limits::product(&[rows.max(e), h.max(f)]);
    within(
        Resource::IndexRange,
        || {
            format!(
                "{}: {rows} rows, E = {e}, H = {h}, F = {f}",
                Stage::ExpertGemm
            )
        },
        max_elems,
        u64::from(u32::MAX),
    )?;
    let h_words = act::matrix_words(rows, f, dtype);
    within(
        Resource::BindingSize,
        || format!("{}: the intermediate h [{rows}, {f}]", Stage::ExpertGemm),
        limits::product(&[h_words, 4]),
        dev.max_binding_bytes(),
    )?;
    let hbuf = scratch.buffer::<u32>(dev, "expert_gemm h", h_words)?;
    let h_act = Act::padded(&hbuf, dtype, rows, f);
    index_u32(st, "h elements", rows.saturating_mul(h_act.stride))?;

    let (alpha, limit) = match act {
        Activation::ClampedSwiglu(c) => (c.alpha as f32, c.limit as f32),
        _ => (0.0, 0.0),
    };
    let gate_words = |i: usize| {
        w.gate
            .as_ref()
            .and_then(|g| g.chunks.get(i))
            .map_or(&w.dummy_words, |c| &c.words)
    };
    let mut up_constants = weight_constants(&w.up);
    up_constants.extend([("A_DTYPE", act::code(dtype)), ("ACT", act_code(act))]);
    let up = Pass {
        entry: up_entry,
        weights: &w.up,
        constants: up_constants,
        k: h,
        n: f,
        chunks: w
            .up
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| ChunkRef::new(c, gate_words(i)))
            .collect(),
        bias_b: w.up_bias.as_ref(),
        bias_g: w.gate_bias.as_ref(),
        a,
        out: h_act,
    };
    // With F = 0 the down matrix has no rows to chunk, yet y = bd (or 0): one chunk covering
    // every output column with K = 0 (no weight is read).
    let down_chunks = if f == 0 {
        vec![ChunkRef {
            first: 0,
            rows: e * h,
            words: &w.dummy_words,
            gate: &w.dummy_words,
            scale_word: 0,
            zero_word: 0,
            scale_row0: 0,
            first_slab: 0,
            slabs: e * h.div_ceil(SLAB),
        }]
    } else {
        w.down
            .chunks
            .iter()
            .map(|c| ChunkRef::new(c, &w.dummy_words))
            .collect()
    };
    let mut down_constants = weight_constants(&w.down);
    down_constants.extend([("A_DTYPE", act::code(dtype)), ("ACT", 0.0)]);
    let down = Pass {
        entry: down_entry,
        weights: &w.down,
        constants: down_constants,
        k: f,
        n: h,
        chunks: down_chunks,
        bias_b: w.down_bias.as_ref(),
        bias_g: None,
        a: h_act,
        out,
    };
    for pass in [up, down] {
        if pass.n == 0 {
            continue;
        }
        let q = pass.weights.quant();
        let entry = pass.entry;
        // The small-batch entry points (a grid of experts × 32 columns) and, of them, the vec4
        // ones (bindings 8 and 9 for the weights); the dense GEMV (experts × slab groups × row
        // groups; bindings 8 to 10).
        let gemv = entry == UP_ENTRIES[3] || entry == DOWN_ENTRIES[3];
        let small = entry != UP_ENTRIES[0] && entry != DOWN_ENTRIES[0];
        let x4 = entry == UP_ENTRIES[2] || entry == DOWN_ENTRIES[2] || gemv;
        // Dense slab weights: slabs per expert (N may be 0 for an empty up pass).
        let per_expert = pass.n.div_ceil(SLAB);
        // The GEMV reads rows of a as 128-bit words when each starts on one.
        let a_vec4 = gemv
            && (pass.a.stride * pass.a.dtype.size()) % 16 == 0
            && pass.a.buf.buffer.size() >= 16;
        // The GEMV's k splits (no other entry point has them; the override is read once).
        let splits = if gemv {
            match gv_splits_override()? {
                Some(s) => s,
                None => gv_splits(pass.k, dev.info.device_type == ::wgpu::DeviceType::Cpu),
            }
        } else {
            1
        };
        #[cfg(test)]
        let splits = FORCE_SPLITS.with(|f| f.get()).unwrap_or(splits);
        let pipeline = if gemv {
            let mut constants = pass.constants.clone();
            constants.push(("GV_SPLITS", splits as f64));
            constants.push(("GV_WG", (8 * splits * gv_slabs(splits)) as f64));
            dev.pipeline(Kernel::ExpertGemm(entry), &constants)?
        } else {
            dev.pipeline(Kernel::ExpertGemm(entry), &pass.constants)?
        };
        for c in &pass.chunks {
            let (first, n_rows, words, gwords) = (c.first, c.rows, c.words, c.gate);
            if n_rows == 0 {
                continue;
            }
            let e_first = first / pass.n;
            let e_count = (first + n_rows - 1) / pass.n - e_first + 1;
            // 16-bit outputs: column tiles start on an even column, up to one column early.
            let cols = n_rows.min(pass.n) + usize::from(dtype != DType::F32);
            let (groups_x, groups_y, groups_z) = if gemv {
                let slabs = c.slabs.min(per_expert);
                // Row tiles of GV_ROWS rows: at most one per row, and at most one partial
                // tile per expert beyond ceil(rows / GV_ROWS); slab groups of gv_slabs.
                (
                    rows.min(rows.div_ceil(GV_ROWS) + e_count),
                    slabs.div_ceil(gv_slabs(splits)),
                    1,
                )
            } else if small {
                (e_count, cols.div_ceil(SMALL_COLS), 1)
            } else {
                (
                    rows.div_ceil(TILE_ROWS) + e_count,
                    cols.div_ceil(TILE_COLS),
                    1,
                )
            };
            let max = u64::from(dev.limits.max_compute_workgroups_per_dimension);
            within(
                Resource::GridSize,
                || {
                    format!(
                        "{}: grid {groups_x} × {groups_y}, per dimension",
                        Stage::ExpertGemm
                    )
                },
                groups_x.max(groups_y).max(groups_z) as u64,
                max,
            )?;
            // Dense slab weights: the shader's slab base (w_sbase) comes from the FP8 fields.
            let (s_row0, s_rows_e) = match q {
                Some(q) => (c.scale_row0, q.scale_rows),
                None => (c.first_slab, per_expert),
            };
            let params = scratch.uniform(
                dev,
                "expert_gemm params",
                &Params {
                    experts: e as u32,
                    rows: rows as u32,
                    k_dim: pass.k as u32,
                    n_dim: pass.n as u32,
                    e_first: e_first as u32,
                    e_count: e_count as u32,
                    chunk_first: first as u32,
                    chunk_rows: n_rows as u32,
                    has_bias: u32::from(pass.bias_b.is_some())
                        | (u32::from(pass.bias_g.is_some()) << 1),
                    alpha,
                    limit,
                    a_stride: pass.a.stride as u32,
                    out_stride: pass.out.stride as u32,
                    s_off: c.scale_word as u32,
                    z_off: c.zero_word as u32,
                    s_row0: s_row0 as u32,
                    s_cols: q.map_or(0, |q| q.scale_cols as u32),
                    s_rows_e: s_rows_e as u32,
                    row_bytes: q.map_or(0, |q| q.row_bytes as u32),
                    a_vec4: u32::from(a_vec4),
                },
            )?;
            let bias_b = pass.bias_b.unwrap_or(&w.dummy_f32);
            let bias_g = pass.bias_g.unwrap_or(&w.dummy_f32);
            let bind = if x4 {
                // The gate words bind as vec4 too: a 4-word dummy when there is no gate (or
                // no weight word at all: K = 0).
                let mut entries = vec![
                    (0, params.as_entire_binding()),
                    (1, offsets.binding()),
                    (2, pass.a.binding(rows, 1)),
                    (5, bias_b.binding()),
                    (6, bias_g.binding()),
                    (7, pass.out.binding(rows, 1)),
                    (8, vec4_words(w, words).binding()),
                    (9, vec4_words(w, gwords).binding()),
                ];
                if gemv {
                    // a as 128-bit words (read only when a_vec4; a dummy otherwise).
                    let a4 = if a_vec4 {
                        let words = pass.a.words_for_rows(rows).next_multiple_of(4);
                        act::range_binding(pass.a.buf, words)
                    } else {
                        w.dummy_words4.binding()
                    };
                    entries.push((10, a4));
                }
                bind_at(dev, scratch, &pipeline, &entries)?
            } else {
                scratch.bind(
                    dev,
                    &pipeline,
                    &[
                        params.as_entire_binding(),
                        offsets.binding(),
                        pass.a.binding(rows, 1),
                        words.binding(),
                        gwords.binding(),
                        bias_b.binding(),
                        bias_g.binding(),
                        pass.out.binding(rows, 1),
                    ],
                )?
            };
            dev.dispatch(
                enc,
                &pipeline,
                &bind,
                (groups_x as u32, groups_y as u32, groups_z as u32),
            );
        }
    }
    Ok(())
}

/// `b`, or the 4-word dummy of `w` where `b` is the 1-word dummy or shorter than one vec4.
fn vec4_words<'b>(w: &'b GpuExperts, b: &'b GpuBuffer<u32>) -> &'b GpuBuffer<u32> {
    if std::ptr::eq(b, &w.dummy_words) || b.buffer.size() < 16 {
        &w.dummy_words4
    } else {
        b
    }
}

/// A bind group for group 0 of `pipeline` with each resource at its own binding number.
fn bind_at(
    dev: &WgpuDevice,
    scratch: &Scratch,
    pipeline: &::wgpu::ComputePipeline,
    resources: &[(u32, ::wgpu::BindingResource<'_>)],
) -> Result<::wgpu::BindGroup> {
    let entries: Vec<::wgpu::BindGroupEntry<'_>> = resources
        .iter()
        .map(|(binding, r)| ::wgpu::BindGroupEntry {
            binding: *binding,
            resource: r.clone(),
        })
        .collect();
    scratch.bind_entries(dev, pipeline, &entries)
}

#[cfg(test)]
mod tests {
    //! The chunked path (chunks starting mid-expert), multi-tile shapes, bitwise invariance of a
    //! row's result to chunking and to the rest of its batch, F = 0, and quantized weights
    //! (every format against the reference, their device bytes, malformed ones refused).

    use super::*;

    #[test]
    fn gemv_split_override_takes_auto_and_powers_of_two_only() {
        let parse = |v: &str| parse_gv_splits(Some(std::ffi::OsStr::new(v)));
        assert_eq!(parse_gv_splits(None).unwrap(), None);
        assert_eq!(parse("auto").unwrap(), None);
        for s in [1, 2, 4, 8] {
            assert_eq!(parse(&s.to_string()).unwrap(), Some(s));
        }
        for bad in ["0", "3", "16", "", " 8", "eight"] {
            let e = parse(bad).unwrap_err();
            assert!(
                e.contains(GEMV_SPLITS_VAR) && e.contains("auto, 1, 2, 4 or 8"),
                "{e}"
            );
        }
        // The automatic choice: a power of two up to 8 from K's chunks on a GPU, 1 on a CPU.
        assert_eq!(gv_splits(2048, false), 8);
        assert_eq!(gv_splits(768, false), 4);
        assert_eq!(gv_splits(256, false), 1);
        assert_eq!(gv_splits(7168, true), 1);
    }
    use crate::config::ClampedSwiglu;
    use crate::cpu::expert_gemm::{expert_ffn, expert_ffn_stored};
    use crate::quant::encode::quantize;
    use crate::quant::{QuantSpec, Weight};
    use crate::synth::Gen;
    use crate::wgpu::act::test_util::{self, rel_l2};

    const ACTS: [Activation; 5] = [
        Activation::Swiglu,
        Activation::Geglu,
        Activation::Relu,
        Activation::Gelu,
        Activation::ClampedSwiglu(ClampedSwiglu {
            alpha: 1.702,
            limit: 7.0,
        }),
    ];

    fn device() -> Option<WgpuDevice> {
        crate::wgpu::context::test_device("expert GEMM")
    }

    fn weights(
        g: &mut Gen,
        (e, f, h): (usize, usize, usize),
        act: Activation,
        dtype: DType,
    ) -> ExpertWeights {
        let mut t = |shape: &[usize], s: f32| g.tensor(shape, s).cast(dtype);
        ExpertWeights {
            gate: act.is_gated().then(|| t(&[e, f, h], 0.3).into()),
            up: t(&[e, f, h], 0.3).into(),
            down: t(&[e, h, f], 0.2).into(),
            gate_bias: act.is_gated().then(|| t(&[e, f], 0.1)),
            up_bias: Some(t(&[e, f], 0.1)),
            down_bias: Some(t(&[e, h], 0.1)),
        }
    }

    /// `y` for `x` (f32, poisoned with NaN before the launch).
    fn run(
        dev: &WgpuDevice,
        w: &GpuExperts,
        x: &[f32],
        offsets: &[u32],
        act: Activation,
    ) -> Vec<f32> {
        run_path(dev, w, x, offsets, act, GemmPath::Auto)
    }

    /// [`run`] on the kernel chosen by `path`.
    fn run_path(
        dev: &WgpuDevice,
        w: &GpuExperts,
        x: &[f32],
        offsets: &[u32],
        act: Activation,
        path: GemmPath,
    ) -> Vec<f32> {
        let h = w.dims.hidden;
        let rows = x.len() / h;
        let words = run_words(dev, w, x, offsets, act, path, (DType::F32, false));
        act::unpack(&words, rows, h, h, DType::F32)
    }

    /// The words of `y` (padded rows in `dtype`, poisoned before the launch) for `x` (rounded
    /// to `dtype`; dense rows when `dense_x`, as the shared expert reads the caller's x, else
    /// padded as x_perm), on the kernel chosen by `path`.
    fn run_words(
        dev: &WgpuDevice,
        w: &GpuExperts,
        x: &[f32],
        offsets: &[u32],
        act: Activation,
        path: GemmPath,
        dtypes: (DType, bool),
    ) -> Vec<u32> {
        try_run_words(dev, w, x, offsets, act, path, dtypes).unwrap()
    }

    /// [`run_words`], or the error of [`encode_path`] (a forced path the weights or the row
    /// count do not allow).
    fn try_run_words(
        dev: &WgpuDevice,
        w: &GpuExperts,
        x: &[f32],
        offsets: &[u32],
        act: Activation,
        path: GemmPath,
        (dtype, dense_x): (DType, bool),
    ) -> Result<Vec<u32>> {
        let h = w.dims.hidden;
        let rows = x.len() / h;
        let st = if dense_x { h } else { act::stride(h, dtype) };
        let xb = test_util::upload(dev, x, (rows, h, st), dtype, 0);
        let ob = dev.upload(offsets, "offsets").unwrap();
        let yb = test_util::poisoned(dev, act::matrix_words(rows, h, dtype));
        let xa = Act {
            buf: &xb,
            dtype,
            rows,
            cols: h,
            stride: st,
        };
        let mut enc = dev.encoder();
        encode_path(
            dev,
            &mut enc,
            &Scratch::new(),
            xa,
            &ob,
            w,
            act,
            Act::padded(&yb, dtype, rows, h),
            path,
        )?;
        dev.submit_and_wait(enc).unwrap();
        Ok(dev.read(&yb).unwrap())
    }

    /// A chunk limit of one slab of K elements of `dtype` (dense weights chunk by slabs).
    fn one_slab(k: usize, dtype: DType) -> u64 {
        (k * SLAB * dtype.size() + 4) as u64
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Whether rows of K elements of `format` are whole 128-bit words, from the element sizes
    /// alone: the rule the choice of the vec4 small-batch entry points is held to.
    fn whole_words(format: &WeightFormat, k: usize) -> bool {
        let bits = match format {
            WeightFormat::Dense(d) => 8 * d.size(),
            WeightFormat::Quant(q) if q.format == QuantFormat::Fp8Block => 8,
            WeightFormat::Quant(_) => 4,
        };
        k > 0 && (k * bits) % 128 == 0
    }

    /// Checks the entry points each path picks for `w` (K = H for the up pass, F for the
    /// down pass) against [`whole_words`]: vec4 small-batch ones exactly where the rows are
    /// whole words (`Auto`, `Rows`, and `RowsX4`, refused otherwise), scalar ones for
    /// `RowsScalar`, tiled ones past 32 rows. Returns whether both passes take the vec4 ones.
    fn check_small_entries(w: &GpuExperts, rows: usize) -> bool {
        let (h, f) = (w.dims.hidden, w.dims.ffn);
        let mut x4 = true;
        for (entries, m, k) in [(UP_ENTRIES, &w.up, h), (DOWN_ENTRIES, &w.down, f)] {
            if m.slab.is_some() {
                // Dense slab weights: every small path is the GEMV, any K.
                for path in [
                    GemmPath::Auto,
                    GemmPath::Rows,
                    GemmPath::RowsScalar,
                    GemmPath::RowsX4,
                ] {
                    assert_eq!(pass_entry(path, rows, entries, m).unwrap(), entries[3]);
                }
                let big = SMALL_ROWS + 1;
                assert_eq!(
                    pass_entry(GemmPath::Auto, big, entries, m).unwrap(),
                    entries[0]
                );
                for path in [GemmPath::Rows, GemmPath::RowsScalar, GemmPath::RowsX4] {
                    assert!(pass_entry(path, big, entries, m).is_err());
                }
                continue;
            }
            let words = whole_words(&m.format, k);
            x4 &= words;
            let ctx = format!("{:?}, K {k}, {rows} rows", m.format);
            let want = entries[if words { 2 } else { 1 }];
            for path in [GemmPath::Auto, GemmPath::Rows] {
                assert_eq!(pass_entry(path, rows, entries, m).unwrap(), want, "{ctx}");
            }
            let scalar = pass_entry(GemmPath::RowsScalar, rows, entries, m).unwrap();
            assert_eq!(scalar, entries[1], "{ctx}");
            let forced = pass_entry(GemmPath::RowsX4, rows, entries, m);
            assert_eq!(forced.ok(), words.then_some(entries[2]), "{ctx}");
            assert_eq!(
                pass_entry(GemmPath::Tiled, rows, entries, m).unwrap(),
                entries[0]
            );
            let big = SMALL_ROWS + 1;
            assert_eq!(
                pass_entry(GemmPath::Auto, big, entries, m).unwrap(),
                entries[0]
            );
            for path in [GemmPath::Rows, GemmPath::RowsScalar, GemmPath::RowsX4] {
                assert!(pass_entry(path, big, entries, m).is_err(), "{ctx}");
            }
        }
        x4
    }

    /// The forced small-batch paths for weights whose rows are (`x4`) or are not whole vec4
    /// words: `Rows` (what `Auto` picks) and `RowsScalar` always, `RowsX4` when allowed.
    fn small_paths(x4: bool) -> Vec<GemmPath> {
        let mut paths = vec![GemmPath::Rows, GemmPath::RowsScalar];
        if x4 {
            paths.push(GemmPath::RowsX4);
        }
        paths
    }

    /// Dense weights: the small-batch path, with vec4 words where the rows allow them and
    /// forced to scalar words (and to vec4 words where allowed; refused elsewhere), bitwise
    /// the tiled path, whole and in chunks.
    #[test]
    fn small_batch_path_is_bitwise_the_tiled_path() {
        let Some(dev) = device() else { return };
        let mut g = Gen::new(10);
        // (E, F, H, offsets): H and F multiples of 8 (the vec4 entry points for every dtype,
        // K over three 64-deep blocks with a partial last one) and odd ones (scalar words,
        // 16-bit rows straddling words); an expert with no rows, a full 32-row expert, rows
        // past offsets[E] (dropped), one row alone.
        let cases: [(usize, usize, usize, &[u32]); 4] = [
            (3, 152, 136, &[0, 13, 13, 30]),
            (2, 150, 97, &[0, 7, 19]),
            (1, 72, 40, &[0, 32]),
            (4, 29, 37, &[0, 0, 1, 1, 1]),
        ];
        for (e, f, h, offsets) in cases {
            let rows = (*offsets.last().unwrap() as usize + 2).min(SMALL_ROWS);
            let kept = *offsets.last().unwrap() as usize;
            let x = g.uniform(rows * h, 1.0);
            let xd: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            for act in ACTS {
                for dtype in DType::ALL {
                    let w = weights(&mut g, (e, f, h), act, dtype);
                    let reference = expert_ffn(&xd, offsets, &w, act).unwrap();
                    let whole = GpuExperts::upload(&dev, &w, act).unwrap();
                    // Chunks of one slab of the deeper matrix: chunks start mid-expert.
                    let limit = one_slab(h.max(f), dtype);
                    let chunked =
                        GpuExperts::upload_with_limit(&dev, &w, act, Some(limit)).unwrap();
                    assert!(chunked.down.chunks.len() >= e);
                    let tiled = run_path(&dev, &whole, &x, offsets, act, GemmPath::Tiled);
                    let err = rel_l2(&tiled[..kept * h], &reference[..kept * h]);
                    assert!(err <= 2e-5, "{act:?} {dtype}: rel L2 {err:e}");
                    let x4 = check_small_entries(&whole, rows);
                    for (label, gw) in [("whole", &whole), ("chunked", &chunked)] {
                        for path in small_paths(x4) {
                            let small = run_path(&dev, gw, &x, offsets, act, path);
                            assert_eq!(
                                bits(&tiled[..kept * h]),
                                bits(&small[..kept * h]),
                                "E {e} F {f} H {h} {act:?} {dtype} {label} {path:?}: differs"
                            );
                        }
                        if !x4 {
                            let forced = (DType::F32, false);
                            let r =
                                try_run_words(&dev, gw, &x, offsets, act, GemmPath::RowsX4, forced);
                            assert!(r.is_err(), "E {e} F {f} H {h} {dtype}: vec4 words forced");
                        }
                    }
                    let auto = run(&dev, &whole, &x, offsets, act);
                    assert_eq!(bits(&tiled[..kept * h]), bits(&auto[..kept * h]));
                }
            }
            println!("E {e} F {f} H {h}: small-batch path bitwise equal to the tiled path");
        }
    }

    #[test]
    fn chunked_multi_tile_and_batch_invariant() {
        let Some(dev) = device() else { return };
        let mut g = Gen::new(7);
        let (e, f, h, rows) = (3, 150, 97, 300);
        // Expert 0: 170 rows (3 row tiles), expert 1: none, expert 2: 90; 40 rows dropped.
        let offsets = [0u32, 170, 170, 260];
        let kept = 260;
        let x = g.uniform(rows * h, 1.0);
        let xd: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        for act in ACTS {
            for dtype in DType::ALL {
                let w = weights(&mut g, (e, f, h), act, dtype);
                let reference = expert_ffn(&xd, &offsets, &w, act).unwrap();
                let whole = GpuExperts::upload(&dev, &w, act).unwrap();
                // One slab (64 rows) per chunk: chunks start mid-expert.
                let limit = one_slab(h.max(f), dtype);
                let chunked = GpuExperts::upload_with_limit(&dev, &w, act, Some(limit)).unwrap();
                assert!(chunked.up.chunks.len() > e && chunked.down.chunks.len() > e);
                let y = run(&dev, &whole, &x, &offsets, act);
                let err = rel_l2(&y[..kept * h], &reference[..kept * h]);
                println!("{act:?} {dtype}: rel L2 {err:.2e}");
                assert!(err <= 2e-5, "{act:?} {dtype}: rel L2 {err:e}");
                let yc = run(&dev, &chunked, &x, &offsets, act);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&y[..kept * h]),
                    bits(&yc[..kept * h]),
                    "{act:?} {dtype}: chunking changed bits"
                );
                // Expert 2's rows alone in a batch of their own: bitwise the same results.
                let alone = run(&dev, &whole, &x[170 * h..260 * h], &[0, 0, 0, 90], act);
                assert_eq!(
                    bits(&y[170 * h..260 * h]),
                    bits(&alone),
                    "{act:?} {dtype}: batch changed bits"
                );
            }
        }
    }

    #[test]
    fn empty_ffn_gives_the_down_bias() {
        let Some(dev) = device() else { return };
        let mut g = Gen::new(8);
        let (e, f, h) = (2, 0, 5);
        let w = weights(&mut g, (e, f, h), Activation::Relu, DType::F32);
        let x = g.uniform(4 * h, 1.0);
        let offsets = [0u32, 1, 4];
        let xd: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let reference = expert_ffn(&xd, &offsets, &w, Activation::Relu).unwrap();
        let gw = GpuExperts::upload(&dev, &w, Activation::Relu).unwrap();
        let y = run(&dev, &gw, &x, &offsets, Activation::Relu);
        assert!(rel_l2(&y, &reference) <= 1e-7);
    }

    #[test]
    fn gelu_tails() {
        // Inputs wide enough that the pre-activations reach |v| > 14 (Φ is 0 or 1 in f32).
        let Some(dev) = device() else { return };
        let mut g = Gen::new(9);
        let (e, f, h, rows) = (2, 70, 40, 50);
        let offsets = [0u32, 20, 50];
        let x = g.uniform(rows * h, 12.0);
        let xd: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        for act in [Activation::Gelu, Activation::Geglu] {
            let w = weights(&mut g, (e, f, h), act, DType::F32);
            let reference = expert_ffn(&xd, &offsets, &w, act).unwrap();
            let gw = GpuExperts::upload(&dev, &w, act).unwrap();
            let y = run(&dev, &gw, &x, &offsets, act);
            let err = rel_l2(&y, &reference);
            println!("{act:?} wide inputs: rel L2 {err:.2e}");
            assert!(err <= 2e-5, "{act:?}: {err:e}");
        }
    }

    /// f16 / bf16 activations (x, h and y in the dtype, odd H and F) against the reference on
    /// x rounded to the dtype with h rounded between the GEMMs; for T = 1, 7, 37 at k = 2
    /// (2, 14, 74 rows) and 1 and 32 rows: the small path (≤ 32 rows) bitwise equal to the
    /// tiled one, weight chunks starting at odd expert-local columns (read-modify-write of the
    /// shared words) bitwise equal to whole weights, dense x rows (the shared expert's input,
    /// straddling words) bitwise equal to padded ones, and the padding of y's rows written 0.
    #[test]
    fn half_activations_match_the_reference() {
        let Some(dev) = device() else { return };
        let mut g = Gen::new(11);
        let (e, f, h) = (3, 29, 37);
        for rows in [1usize, 2, 14, 32, 74] {
            let kept = rows - rows / 5;
            let cut = g.below(0, kept + 1) as u32;
            // Expert 1 has no rows; rows from `kept` on are dropped.
            let offsets = [0, cut, cut, kept as u32];
            let x = g.uniform(rows * h, 1.0);
            for dtype in [DType::F16, DType::BF16] {
                let st = act::stride(h, dtype);
                let xr = test_util::round(&x, dtype);
                let xd: Vec<f64> = xr.iter().map(|&v| f64::from(v)).collect();
                for (i, act) in ACTS.into_iter().enumerate() {
                    let wdt = DType::ALL[i % 3];
                    let w = weights(&mut g, (e, f, h), act, wdt);
                    let reference =
                        expert_ffn_stored(&xd, &offsets, &w, act, |v| dtype.round(v)).unwrap();
                    let whole = GpuExperts::upload(&dev, &w, act).unwrap();
                    // One slab per chunk (dense weights chunk by whole slabs; the quantized
                    // tests below start chunks at odd expert-local columns).
                    let limit = one_slab(h.max(f), wdt);
                    let chunked =
                        GpuExperts::upload_with_limit(&dev, &w, act, Some(limit)).unwrap();
                    assert!(chunked.up.chunks.len() >= e && chunked.down.chunks.len() >= e);
                    let ctx = format!("{rows} rows, {dtype} activations, {wdt} weights, {act:?}");
                    let run = |gw: &GpuExperts, path: GemmPath, dense: bool| {
                        let words = run_words(&dev, gw, &xr, &offsets, act, path, (dtype, dense));
                        words[..kept * st / 2].to_vec()
                    };
                    let auto = run(&whole, GemmPath::Auto, false);
                    let y = act::unpack(&auto, kept, h, st, dtype);
                    let err = rel_l2(&y, &reference[..kept * h]);
                    assert!(err <= test_util::tolerance(dtype), "{ctx}: rel L2 {err:e}");
                    for r in 0..kept {
                        assert_eq!(auto[(r * st + h) / 2] >> 16, 0, "{ctx}: padding of row {r}");
                    }
                    assert_eq!(auto, run(&whole, GemmPath::Tiled, false), "{ctx}: tiled");
                    if rows <= SMALL_ROWS {
                        assert_eq!(auto, run(&whole, GemmPath::Rows, false), "{ctx}: small");
                        assert_eq!(auto, run(&chunked, GemmPath::Rows, false), "{ctx}: chunked");
                    }
                    assert_eq!(
                        auto,
                        run(&chunked, GemmPath::Tiled, false),
                        "{ctx}: chunked"
                    );
                    assert_eq!(auto, run(&whole, GemmPath::Auto, true), "{ctx}: dense x");
                }
                println!("{rows} rows, {dtype} activations: within tolerance, paths bitwise equal");
            }
        }
    }

    /// The dense GEMV reading 16-bit activation rows as 128-bit words (H and F multiples of
    /// 8, so every padded row starts on one), with N not a multiple of the slab width (a
    /// partial last slab) and more than one slab group per expert: bitwise the tiled path,
    /// whole and chunked by single slabs, and the dense x of the shared expert (whose rows
    /// also start on words here) bitwise the padded one; within tolerance of the reference.
    #[test]
    fn gemv_with_aligned_half_rows_is_bitwise_the_tiled_path() {
        let Some(dev) = device() else { return };
        let mut g = Gen::new(14);
        let (e, f, h) = (3, 584, 72);
        for rows in [1usize, 6, 32] {
            let offsets = [0, (rows / 3) as u32, (rows / 3) as u32, rows as u32];
            let x = g.uniform(rows * h, 1.0);
            for dtype in [DType::F16, DType::BF16] {
                let st = act::stride(h, dtype);
                assert_eq!(st % 8, 0);
                let xr = test_util::round(&x, dtype);
                let xd: Vec<f64> = xr.iter().map(|&v| f64::from(v)).collect();
                for act in [Activation::Swiglu, Activation::Relu] {
                    let wdt = if act == Activation::Swiglu {
                        DType::BF16
                    } else {
                        DType::F16
                    };
                    let w = weights(&mut g, (e, f, h), act, wdt);
                    let reference =
                        expert_ffn_stored(&xd, &offsets, &w, act, |v| dtype.round(v)).unwrap();
                    let whole = GpuExperts::upload(&dev, &w, act).unwrap();
                    let chunked =
                        GpuExperts::upload_with_limit(&dev, &w, act, Some(one_slab(f, wdt)))
                            .unwrap();
                    assert!(chunked.up.chunks.len() > e && chunked.down.chunks.len() > e);
                    let ctx = format!("{rows} rows, {dtype} activations, {wdt} weights, {act:?}");
                    let run = |gw: &GpuExperts, path: GemmPath, dense: bool| {
                        let words = run_words(&dev, gw, &xr, &offsets, act, path, (dtype, dense));
                        words[..rows * st / 2].to_vec()
                    };
                    let gemv = run(&whole, GemmPath::Rows, false);
                    let y = act::unpack(&gemv, rows, h, st, dtype);
                    let err = rel_l2(&y, &reference[..rows * h]);
                    assert!(err <= test_util::tolerance(dtype), "{ctx}: rel L2 {err:e}");
                    assert_eq!(gemv, run(&whole, GemmPath::Tiled, false), "{ctx}: tiled");
                    assert_eq!(gemv, run(&chunked, GemmPath::Rows, false), "{ctx}: chunked");
                    assert_eq!(
                        gemv,
                        run(&chunked, GemmPath::Tiled, false),
                        "{ctx}: chunked"
                    );
                    assert_eq!(gemv, run(&whole, GemmPath::Rows, true), "{ctx}: dense x");
                    // Every k split count of the GEMV (down pass: K 584, 3 chunks).
                    for splits in [1, 2, 4, 8] {
                        FORCE_SPLITS.with(|f| f.set(Some(splits)));
                        for dense in [false, true] {
                            let y = run(&chunked, GemmPath::Rows, dense);
                            assert_eq!(gemv, y, "{ctx}: {splits} splits, dense x {dense}");
                        }
                    }
                    FORCE_SPLITS.with(|f| f.set(None));
                }
            }
            println!("{rows} rows: GEMV with 128-bit half rows bitwise the tiled path");
        }
    }

    /// Buffers larger than the forward needs (a workspace for more rows) and a scratch pool
    /// reused across forwards of different sizes: the same words as a fresh, exact run.
    #[test]
    fn larger_buffers_and_a_reused_pool() {
        let Some(dev) = device() else { return };
        let mut g = Gen::new(12);
        let (e, f, h, max_rows) = (2, 21, 19, 80);
        let act = Activation::Swiglu;
        let w = weights(&mut g, (e, f, h), act, DType::BF16);
        let gw = GpuExperts::upload(&dev, &w, act).unwrap();
        for dtype in DType::ALL {
            let st = act::stride(h, dtype);
            let pool = Scratch::new();
            let cap = act::matrix_words(max_rows, h, dtype);
            let yb = test_util::poisoned(&dev, cap);
            for rows in [80usize, 3, 40, 1] {
                let x = test_util::round(&g.uniform(rows * h, 1.0), dtype);
                let offsets = [0, (rows / 2) as u32, rows as u32];
                let xb = test_util::upload(&dev, &x, (rows, h, st), dtype, cap);
                let ob = dev.upload(&offsets, "offsets").unwrap();
                test_util::poison(&dev, &yb);
                pool.begin().unwrap();
                let mut enc = dev.encoder();
                encode(
                    &dev,
                    &mut enc,
                    &pool,
                    Act::padded(&xb, dtype, rows, h),
                    &ob,
                    &gw,
                    act,
                    Act::padded(&yb, dtype, max_rows, h),
                )
                .unwrap();
                dev.submit_and_wait(enc).unwrap();
                let got = dev.read(&yb).unwrap();
                let want = run_words(&dev, &gw, &x, &offsets, act, GemmPath::Auto, (dtype, false));
                let n = act::matrix_words(rows, h, dtype);
                assert_eq!(got[..n], want[..n], "{dtype}, {rows} rows");
                assert!(
                    got[n..].iter().all(|&v| v == u32::MAX),
                    "{dtype}: wrote past the rows"
                );
            }
        }
    }

    /// `w` with every expert matrix quantized under `spec` (biases stay dense).
    fn quantized(w: &ExpertWeights, spec: &QuantSpec) -> ExpertWeights {
        let q = |m: &Weight| {
            let t = m.dense().expect("dense test weights");
            Weight::Quant(quantize(t, spec).unwrap())
        };
        ExpertWeights {
            gate: w.gate.as_ref().map(q),
            up: q(&w.up),
            down: q(&w.down),
            gate_bias: w.gate_bias.clone(),
            up_bias: w.up_bias.clone(),
            down_bias: w.down_bias.clone(),
        }
    }

    /// A chunk limit of about 11 rows of the widest quantized matrix of `w` (codes, scales
    /// and zeros, plus the sections' alignment and FP8's scale rows at chunk boundaries).
    fn eleven_rows(w: &ExpertWeights) -> u64 {
        let per_row = |m: &Weight| {
            let q = m.quant().expect("quantized");
            q.packed_bytes() / (q.experts * q.rows) as u64
        };
        11 * per_row(&w.up).max(per_row(&w.down)) + 64
    }

    fn spec(
        format: QuantFormat,
        scale_dtype: DType,
        group: Option<usize>,
        zeros: bool,
    ) -> QuantSpec {
        QuantSpec {
            format,
            scale_dtype,
            group,
            zeros,
        }
    }

    /// Every format on f32 activations against the reference on the same quantized weights
    /// (which it dequantizes exactly), gated and not: FP8 with f32 and bf16 scales, N and K not
    /// multiples of 128 (one and two blocks) and odd K (rows starting mid-word); MXFP4; INT4
    /// with f16 / bf16 / f32 scales, with and without zero points, odd K with G = 25 and the
    /// default groups. Small chunks (≈ 11 rows: chunks start mid-expert and mid-FP8-block)
    /// give the same bits as one chunk, and the small-batch path the tiled path's bits, with
    /// each of its weight loads forced: scalar words, and 128-bit code words where K allows
    /// them (FP8 K % 16 = 0, here with edge blocks in N and K; MXFP4 / INT4 K % 32 = 0, INT4
    /// with groups of 16 and 48, so a group boundary inside a word); they are refused, and
    /// never picked, for the other K: odd K (INT4 K = 31, a 16-byte row), K % 16 ≠ 0 (FP8),
    /// K % 32 ≠ 0 (INT4), one pass of the FFN taking them and the other not.
    #[test]
    fn quantized_weights_match_the_reference() {
        let Some(dev) = device() else { return };
        let mut g = Gen::new(21);
        let (fp8, mx, int4) = (QuantFormat::Fp8Block, QuantFormat::Mxfp4, QuantFormat::Int4);
        // (spec, (E, F, H)); H and F are K of the up and down GEMMs.
        let cases = [
            (spec(fp8, DType::F32, None, false), (3, 136, 200)),
            (spec(fp8, DType::BF16, None, false), (3, 136, 200)),
            (spec(fp8, DType::F32, None, false), (2, 45, 75)),
            (spec(mx, DType::F32, None, false), (3, 96, 160)),
            (spec(int4, DType::F16, Some(25), true), (3, 125, 75)),
            (spec(int4, DType::BF16, Some(25), false), (3, 125, 75)),
            (spec(int4, DType::F32, Some(25), true), (2, 25, 75)),
            (spec(int4, DType::BF16, None, true), (2, 96, 160)),
            (spec(int4, DType::F16, None, false), (2, 96, 160)),
            // 128-bit code words: FP8 edge blocks (N = 144: a 16-row block; K = 208 and 144:
            // a partial last block), FP8 up only (F = 40) with N < 128, INT4 with 2 groups a
            // word and with a group boundary mid-word, INT4 odd K = 31 (never vec4).
            (spec(fp8, DType::F32, None, false), (3, 144, 208)),
            (spec(fp8, DType::BF16, None, false), (2, 40, 208)),
            (spec(int4, DType::F16, Some(16), true), (2, 96, 160)),
            (spec(int4, DType::BF16, Some(48), false), (2, 96, 192)),
            (spec(int4, DType::F32, Some(31), true), (2, 31, 31)),
        ];
        let mut x4_cases = 0;
        for (sp, (e, f, h)) in cases {
            // 30 rows (the small path) and 150 (several row tiles); 2 rows dropped each.
            for rows in [30usize, 150] {
                let kept = rows - 2;
                let cut = (kept / 2) as u32;
                let mut offsets = vec![0u32; e + 1];
                offsets[1] = cut;
                offsets[e] = kept as u32;
                for o in offsets.iter_mut().take(e).skip(2) {
                    *o = cut; // experts 1 .. E − 2 get no rows
                }
                let x = g.uniform(rows * h, 1.0);
                let xd: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
                for act in [Activation::Swiglu, Activation::Gelu] {
                    let ctx = format!(
                        "{} {} scales, group {:?}, zeros {}, E {e} F {f} H {h}, {rows} rows, \
                         {act:?}",
                        sp.format, sp.scale_dtype, sp.group, sp.zeros
                    );
                    let w = quantized(&weights(&mut g, (e, f, h), act, DType::F32), &sp);
                    let reference = expert_ffn(&xd, &offsets, &w, act).unwrap();
                    let whole = GpuExperts::upload(&dev, &w, act).unwrap();
                    assert_eq!(whole.up.chunks.len(), 1, "{ctx}");
                    let chunked =
                        GpuExperts::upload_with_limit(&dev, &w, act, Some(eleven_rows(&w)))
                            .unwrap();
                    assert!(
                        chunked.up.chunks.len() > e && chunked.down.chunks.len() > e,
                        "{ctx}: {} / {} chunks",
                        chunked.up.chunks.len(),
                        chunked.down.chunks.len()
                    );
                    let tiled = run_path(&dev, &whole, &x, &offsets, act, GemmPath::Tiled);
                    let err = rel_l2(&tiled[..kept * h], &reference[..kept * h]);
                    assert!(err <= 2e-5, "{ctx}: rel L2 {err:e}");
                    let tc = run_path(&dev, &chunked, &x, &offsets, act, GemmPath::Tiled);
                    assert_eq!(
                        bits(&tiled[..kept * h]),
                        bits(&tc[..kept * h]),
                        "{ctx}: chunked"
                    );
                    if rows <= SMALL_ROWS {
                        let x4 = check_small_entries(&whole, rows);
                        x4_cases += usize::from(x4);
                        for (label, gw) in [("whole", &whole), ("chunked", &chunked)] {
                            for path in small_paths(x4) {
                                let small = run_path(&dev, gw, &x, &offsets, act, path);
                                assert_eq!(
                                    bits(&tiled[..kept * h]),
                                    bits(&small[..kept * h]),
                                    "{ctx} {label} {path:?}: small path differs"
                                );
                            }
                            if !x4 {
                                let f32x = (DType::F32, false);
                                let forced = GemmPath::RowsX4;
                                let r = try_run_words(&dev, gw, &x, &offsets, act, forced, f32x);
                                assert!(r.is_err(), "{ctx} {label}: vec4 words forced");
                            }
                        }
                        println!("{ctx}: vec4 code words in both passes: {x4}");
                    }
                    println!("{ctx}: rel L2 {err:.2e}, paths and chunkings bitwise equal");
                }
            }
        }
        // MXFP4 (3, 96, 160), FP8 (3, 144, 208), INT4 (2, 96, 160) with default groups (two
        // specs) and G = 16, INT4 (2, 96, 192) with G = 48; two activations each.
        assert_eq!(x4_cases, 2 * 6, "cases on the vec4 path in both passes");
    }

    /// f16 and bf16 activations with quantized weights (FP8 with bf16 scales, INT4 with f16
    /// scales and zeros, MXFP4), against the reference with x and h rounded to the dtype; the
    /// small path (each weight load forced: scalar words, and 128-bit code words for MXFP4,
    /// FP8 with K = 48 / 80 and INT4 with groups of 16), the tiled path and small chunks
    /// (starting at odd expert-local columns) give the same words.
    #[test]
    fn quantized_weights_with_half_activations() {
        let Some(dev) = device() else { return };
        let mut g = Gen::new(22);
        let cases = [
            (
                DType::F16,
                spec(QuantFormat::Fp8Block, DType::BF16, None, false),
                (3, 45, 75),
            ),
            (
                DType::BF16,
                spec(QuantFormat::Int4, DType::F16, Some(25), true),
                (3, 25, 75),
            ),
            (
                DType::F16,
                spec(QuantFormat::Mxfp4, DType::F32, None, false),
                (2, 32, 96),
            ),
            (
                DType::F16,
                spec(QuantFormat::Fp8Block, DType::BF16, None, false),
                (3, 48, 80),
            ),
            (
                DType::BF16,
                spec(QuantFormat::Int4, DType::BF16, Some(16), true),
                (2, 64, 96),
            ),
        ];
        let mut x4_cases = 0;
        for (dtype, sp, (e, f, h)) in cases {
            for rows in [7usize, 74] {
                let kept = rows - 1;
                let cut = (kept / 3) as u32;
                let mut offsets = vec![cut; e + 1];
                offsets[0] = 0;
                offsets[e] = kept as u32;
                let st = act::stride(h, dtype);
                let xr = test_util::round(&g.uniform(rows * h, 1.0), dtype);
                let xd: Vec<f64> = xr.iter().map(|&v| f64::from(v)).collect();
                for act in [Activation::Geglu, Activation::Relu] {
                    let ctx = format!(
                        "{dtype} activations, {} weights, {rows} rows, {act:?}",
                        sp.format
                    );
                    let w = quantized(&weights(&mut g, (e, f, h), act, DType::F32), &sp);
                    let reference =
                        expert_ffn_stored(&xd, &offsets, &w, act, |v| dtype.round(v)).unwrap();
                    let whole = GpuExperts::upload(&dev, &w, act).unwrap();
                    let chunked =
                        GpuExperts::upload_with_limit(&dev, &w, act, Some(eleven_rows(&w)))
                            .unwrap();
                    assert!(chunked.up.chunks.len() > e, "{ctx}");
                    let run = |gw: &GpuExperts, path: GemmPath| {
                        let words = run_words(&dev, gw, &xr, &offsets, act, path, (dtype, false));
                        words[..kept * st / 2].to_vec()
                    };
                    let auto = run(&whole, GemmPath::Auto);
                    let y = act::unpack(&auto, kept, h, st, dtype);
                    let err = rel_l2(&y, &reference[..kept * h]);
                    assert!(err <= test_util::tolerance(dtype), "{ctx}: rel L2 {err:e}");
                    assert_eq!(auto, run(&whole, GemmPath::Tiled), "{ctx}: tiled");
                    assert_eq!(auto, run(&chunked, GemmPath::Tiled), "{ctx}: chunked");
                    if rows <= SMALL_ROWS {
                        let x4 = check_small_entries(&whole, rows);
                        x4_cases += usize::from(x4);
                        for path in small_paths(x4) {
                            assert_eq!(auto, run(&whole, path), "{ctx}: small {path:?}");
                            let c = run(&chunked, path);
                            assert_eq!(auto, c, "{ctx}: small chunked {path:?}");
                        }
                    }
                    println!("{ctx}: rel L2 {err:.2e}, paths bitwise equal");
                }
            }
        }
        // MXFP4, FP8 (3, 48, 80) and INT4 (2, 64, 96); two activations each.
        assert_eq!(x4_cases, 3 * 2, "cases on the vec4 path in both passes");
    }

    /// Device memory of a quantized matrix is its packed bytes: with one chunk, exactly each
    /// section (codes, scales, zeros) rounded up to 16 bytes; chunked, at most 3 × 15 bytes of
    /// alignment per chunk more, plus FP8's scale rows shared by two chunks.
    #[test]
    fn quantized_weight_bytes_are_the_packed_bytes() {
        let Some(dev) = device() else { return };
        let mut g = Gen::new(23);
        let r16 = |b: usize| b.next_multiple_of(16) as u64;
        for (sp, (e, f, h)) in [
            (
                spec(QuantFormat::Fp8Block, DType::BF16, None, false),
                (2, 136, 200),
            ),
            (
                spec(QuantFormat::Mxfp4, DType::F32, None, false),
                (2, 96, 160),
            ),
            (
                spec(QuantFormat::Int4, DType::F16, Some(8), true),
                (2, 136, 200),
            ),
            (
                spec(QuantFormat::Int4, DType::F32, None, false),
                (2, 136, 200),
            ),
        ] {
            let act = Activation::Swiglu;
            let w = quantized(&weights(&mut g, (e, f, h), act, DType::F32), &sp);
            let whole = GpuExperts::upload(&dev, &w, act).unwrap();
            let chunked =
                GpuExperts::upload_with_limit(&dev, &w, act, Some(eleven_rows(&w))).unwrap();
            for (name, m) in [
                ("gate", w.gate.as_ref()),
                ("up", Some(&w.up)),
                ("down", Some(&w.down)),
            ] {
                let q = m.and_then(Weight::quant).unwrap();
                let pick = |x: &GpuExperts| match name {
                    "gate" => x.gate.as_ref().unwrap().bytes(),
                    "up" => x.up.bytes(),
                    _ => x.down.bytes(),
                };
                let sections = r16(q.codes.len())
                    + r16(q.scales.len() * q.scales.elem_bytes())
                    + r16(q.zeros.as_ref().map_or(0, Vec::len));
                assert_eq!(pick(&whole), sections, "{} {name}: one chunk", sp.format);
                assert!(sections - q.packed_bytes() < 48);
                let chunks = match name {
                    "down" => chunked.down.chunks.len(),
                    _ => chunked.up.chunks.len(),
                } as u64;
                // FP8: each chunk boundary may repeat one scale row (⌈K/128⌉ scales).
                let dup = match sp.format {
                    QuantFormat::Fp8Block => (chunks - 1) * (q.cols.div_ceil(128) * 2) as u64,
                    _ => 0,
                };
                let got = pick(&chunked);
                assert!(
                    got >= q.packed_bytes() && got <= q.packed_bytes() + 45 * chunks + dup,
                    "{} {name}: {got} bytes in {chunks} chunks for {} packed",
                    sp.format,
                    q.packed_bytes()
                );
            }
            let bias = (2 * e * f + e * h) as u64 * 4;
            let dummies = 4 + 16 + 4;
            let mats = whole.gate.as_ref().unwrap().bytes() + whole.up.bytes() + whole.down.bytes();
            assert_eq!(whole.bytes(), mats + bias + dummies);
        }
    }

    /// Malformed quantized matrices are refused at upload with a typed error.
    #[test]
    fn malformed_quantized_weights_are_refused() {
        let Some(dev) = device() else { return };
        let mut g = Gen::new(24);
        let act = Activation::Relu;
        let sp = spec(QuantFormat::Int4, DType::BF16, None, true);
        let w = quantized(&weights(&mut g, (2, 32, 64), act, DType::F32), &sp);
        let mut short = w.clone();
        if let Weight::Quant(q) = &mut short.down {
            q.codes.pop();
        }
        let mut zeros = w.clone();
        if let Weight::Quant(q) = &mut zeros.up {
            q.zeros.as_mut().unwrap().pop();
        }
        for bad in [short, zeros] {
            let err = GpuExperts::upload(&dev, &bad, act).unwrap_err();
            assert!(matches!(err, Error::Shape { .. }), "{err:?}");
        }
        // A chunk limit below one row with its scales.
        let err = GpuExperts::upload_with_limit(&dev, &w, act, Some(16)).unwrap_err();
        assert!(matches!(err, Error::Limit { .. }), "{err:?}");
    }

    #[test]
    fn mismatched_activations_are_refused() {
        let Some(dev) = device() else { return };
        let mut g = Gen::new(13);
        let (e, f, h) = (2, 6, 5);
        let act = Activation::Relu;
        let w =
            GpuExperts::upload(&dev, &weights(&mut g, (e, f, h), act, DType::F32), act).unwrap();
        let ob = dev.upload(&[0u32, 1, 4], "offsets").unwrap();
        let small = test_util::poisoned(&dev, 4);
        let big = test_util::poisoned(&dev, 64);
        let pool = Scratch::new();
        let mut enc = dev.encoder();
        let cases = [
            // Output dtype differs from the input's.
            (
                Act::padded(&big, DType::F16, 4, h),
                Act::padded(&big, DType::BF16, 4, h),
            ),
            // Input buffer too small for 4 rows.
            (
                Act::padded(&small, DType::F32, 4, h),
                Act::padded(&big, DType::F32, 4, h),
            ),
            // A 16-bit output with an odd row stride.
            (
                Act::padded(&big, DType::F16, 4, h),
                Act::dense(&big, DType::F16, 4, h),
            ),
            // Output with fewer rows than the input.
            (
                Act::padded(&big, DType::F32, 4, h),
                Act::padded(&big, DType::F32, 3, h),
            ),
            // Wrong width.
            (
                Act::padded(&big, DType::F32, 4, h + 1),
                Act::padded(&big, DType::F32, 4, h),
            ),
        ];
        for (a, out) in cases {
            let err = encode(&dev, &mut enc, &pool, a, &ob, &w, act, out).unwrap_err();
            assert!(matches!(err, Error::Shape { .. }), "{err:?}");
        }
    }

    /// The first index where `a` and `b` differ (or their lengths do), if any.
    fn first_difference(a: &[u32], b: &[u32]) -> Option<usize> {
        if a.len() != b.len() {
            return Some(a.len().min(b.len()));
        }
        a.iter().zip(b).position(|(x, y)| x != y)
    }

    /// `a · w` in the order given: chunks of `chunk` consecutive k, each summed in f32 from 0
    /// (with fma when `fused`, else a rounded product and a rounded add), k zero-padded to a
    /// multiple of 16 in the last chunk, the chunks added left to right starting from chunk 0
    /// itself. `chunk = usize::MAX`: the single in-order chain of the kernels before k chunks.
    fn dot_f32(a: &[f32], w: &[f32], chunk: usize, fused: bool) -> f32 {
        let k = a.len();
        let k16 = k.next_multiple_of(16);
        let mut tot = 0.0f32;
        let mut c0 = 0;
        while c0 < k16 {
            let end = c0.saturating_add(chunk).min(k16);
            let mut acc = 0.0f32;
            for kk in c0..end {
                let (x, y) = if kk < k { (a[kk], w[kk]) } else { (0.0, 0.0) };
                acc = if fused {
                    x.mul_add(y, acc)
                } else {
                    x * y + acc
                };
            }
            tot = if c0 == 0 { acc } else { tot + acc };
            c0 = end;
        }
        tot
    }

    /// The ReLU FFN of f32 activations `x` in f32 with [`dot_f32`]'s order: h = max(x·Wuᵀ +
    /// bu, 0), y = h·Wdᵀ + bd (the kernels' epilogue: + bias, then the activation), rows past
    /// offsets[E] left 0.
    fn relu_ffn_f32(
        x: &[f32],
        offsets: &[u32],
        w: &ExpertWeights,
        chunk: usize,
        fused: bool,
    ) -> Vec<f32> {
        let up = w.up.dense().unwrap();
        let (e, f, h) = (up.shape()[0], up.shape()[1], up.shape()[2]);
        let wu = up.to_f32_vec();
        let wd = w.down.dense().unwrap().to_f32_vec();
        let bu = w.up_bias.as_ref().unwrap().to_f32_vec();
        let bd = w.down_bias.as_ref().unwrap().to_f32_vec();
        let mut y = vec![0.0f32; x.len()];
        for ex in 0..e {
            for r in offsets[ex] as usize..offsets[ex + 1] as usize {
                let xr = &x[r * h..(r + 1) * h];
                let hr: Vec<f32> = (0..f)
                    .map(|n| {
                        let wr = &wu[(ex * f + n) * h..(ex * f + n + 1) * h];
                        (dot_f32(xr, wr, chunk, fused) + bu[ex * f + n]).max(0.0)
                    })
                    .collect();
                for o in 0..h {
                    let wr = &wd[(ex * h + o) * f..(ex * h + o + 1) * f];
                    y[r * h + o] = dot_f32(&hr, wr, chunk, fused) + bd[ex * h + o];
                }
            }
        }
        y
    }

    /// The canonical k chunks on every dense path, with K over several chunks and not a
    /// multiple of 256 (300, 517, 601, 1000, 2100), odd N, 1 to 4 rows per GEMV invocation
    /// (5 rows: two row tiles): the GEMV with 1, 2, 4 and 8 k splits (several rounds, idle
    /// splits) and the device's own count, whole and in one-slab chunks, and the tiled kernel
    /// (whole and chunked) give the same bits, within tolerance of the f64 reference; for ReLU those bits are the f32
    /// FFN summed in the canonical order on the CPU ([`relu_ffn_f32`], with fma or without,
    /// whichever the device's fma is), and not those of the single in-order chain.
    #[test]
    fn k_chunks_are_canonical_on_every_dense_path() {
        let Some(dev) = device() else { return };
        let ks = [0, 16, 256, 272, 300, 601, 1000, 2048, 2100, 9000];
        assert_eq!(
            ks.map(|k| gv_splits(k, false)),
            [1, 1, 1, 2, 2, 4, 4, 8, 8, 8]
        );
        assert_eq!(ks.map(|k| gv_splits(k, true)), [1; 10]);
        let mut g = Gen::new(31);
        // (E, F, H, offsets): K of the up pass is H, of the down pass F.
        let cases: [(usize, usize, usize, &[u32]); 4] = [
            (2, 1000, 601, &[0, 5, 7]),
            (2, 1000, 601, &[0, 0, 1]),
            (2, 2100, 41, &[0, 3, 3]),
            (3, 517, 300, &[0, 1, 1, 4]),
        ];
        let mut differs_from_one_chain = 0;
        for (e, f, h, offsets) in cases {
            let kept = *offsets.last().unwrap() as usize;
            let rows = kept + 2;
            let x = g.uniform(rows * h, 1.0);
            let xd: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            for act in [Activation::Relu, Activation::Swiglu] {
                for dtype in [DType::F32, DType::BF16] {
                    let ctx = format!("E {e} F {f} H {h}, {kept} rows, {act:?}, {dtype} weights");
                    let w = weights(&mut g, (e, f, h), act, dtype);
                    let reference = expert_ffn(&xd, offsets, &w, act).unwrap();
                    let whole = GpuExperts::upload(&dev, &w, act).unwrap();
                    let chunked = GpuExperts::upload_with_limit(
                        &dev,
                        &w,
                        act,
                        Some(one_slab(h.max(f), dtype)),
                    )
                    .unwrap();
                    let most = chunked.up.chunks.len().max(chunked.down.chunks.len());
                    assert!(most > 1, "{ctx}: {most} chunks");
                    let tiled = run_path(&dev, &whole, &x, offsets, act, GemmPath::Tiled);
                    let err = rel_l2(&tiled[..kept * h], &reference[..kept * h]);
                    assert!(err <= 2e-5, "{ctx}: rel L2 {err:e}");
                    let want = bits(&tiled[..kept * h]);
                    // The GEMV with each split count (fewer splits than chunks: several
                    // rounds; more: idle splits), and with the device's own choice.
                    for splits in [None, Some(1), Some(2), Some(4), Some(8)] {
                        FORCE_SPLITS.with(|f| f.set(splits));
                        for (label, gw, path) in [
                            ("GEMV", &whole, GemmPath::Rows),
                            ("GEMV chunked", &chunked, GemmPath::Rows),
                            ("tiled chunked", &chunked, GemmPath::Tiled),
                            ("auto", &whole, GemmPath::Auto),
                        ] {
                            let y = run_path(&dev, gw, &x, offsets, act, path);
                            let at = first_difference(&want, &bits(&y[..kept * h]));
                            assert!(
                                at.is_none(),
                                "{ctx}: {label}, splits {splits:?}, differs first at {at:?}"
                            );
                        }
                    }
                    FORCE_SPLITS.with(|f| f.set(None));
                    if act == Activation::Relu {
                        let canonical = [true, false].map(|fused| {
                            bits(&relu_ffn_f32(&x, offsets, &w, K_CHUNK, fused)[..kept * h])
                        });
                        assert!(
                            canonical.contains(&want),
                            "{ctx}: not the canonical k-chunk order"
                        );
                        let chain = [true, false].map(|fused| {
                            bits(&relu_ffn_f32(&x, offsets, &w, usize::MAX, fused)[..kept * h])
                        });
                        differs_from_one_chain += usize::from(!chain.contains(&want));
                    }
                    println!("{ctx}: rel L2 {err:.2e}, GEMV and tiled bitwise equal");
                }
            }
        }
        // With K up to 2100 the chunked order rounds differently from one chain somewhere
        // (the check above could not tell the two orders apart otherwise).
        assert_eq!(
            differs_from_one_chain, 8,
            "cases differing from the single chain"
        );
    }

    /// The canonical k chunks with quantized weights: FP8 (K 608 with 128-bit code words, and
    /// odd K 999 with scalar words, odd N 999), MXFP4 (K 800 and 544, 128-bit words) and INT4
    /// with zero points (K 1056 and 608, groups of 32): the tiled kernel, whole and in
    /// ≈ 11-row chunks, and every small-batch weight load give the same bits, within
    /// tolerance of the f64 reference.
    #[test]
    fn k_chunks_are_canonical_on_every_quantized_path() {
        let Some(dev) = device() else { return };
        let mut g = Gen::new(32);
        let (fp8, mx, int4) = (QuantFormat::Fp8Block, QuantFormat::Mxfp4, QuantFormat::Int4);
        let cases = [
            (spec(fp8, DType::F32, None, false), (2, 999, 608)),
            (spec(mx, DType::F32, None, false), (2, 544, 800)),
            (spec(int4, DType::BF16, Some(32), true), (2, 608, 1056)),
        ];
        for (sp, (e, f, h)) in cases {
            let offsets = [0u32, 3, 9];
            let kept = 9;
            let rows = kept + 2;
            let x = g.uniform(rows * h, 1.0);
            let xd: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            for act in [Activation::Swiglu, Activation::Relu] {
                let ctx = format!("{} E {e} F {f} H {h}, {act:?}", sp.format);
                let w = quantized(&weights(&mut g, (e, f, h), act, DType::F32), &sp);
                let reference = expert_ffn(&xd, &offsets, &w, act).unwrap();
                let whole = GpuExperts::upload(&dev, &w, act).unwrap();
                let chunked =
                    GpuExperts::upload_with_limit(&dev, &w, act, Some(eleven_rows(&w))).unwrap();
                assert!(chunked.down.chunks.len() > e, "{ctx}");
                let tiled = run_path(&dev, &whole, &x, &offsets, act, GemmPath::Tiled);
                let err = rel_l2(&tiled[..kept * h], &reference[..kept * h]);
                assert!(err <= 2e-5, "{ctx}: rel L2 {err:e}");
                let want = bits(&tiled[..kept * h]);
                let tc = run_path(&dev, &chunked, &x, &offsets, act, GemmPath::Tiled);
                let at = first_difference(&want, &bits(&tc[..kept * h]));
                assert!(at.is_none(), "{ctx}: tiled chunked differs first at {at:?}");
                let x4 = check_small_entries(&whole, rows);
                for (label, gw) in [("whole", &whole), ("chunked", &chunked)] {
                    let mut paths = small_paths(x4);
                    if !x4 {
                        paths.push(GemmPath::Rows);
                    }
                    for path in paths {
                        let y = run_path(&dev, gw, &x, &offsets, act, path);
                        let at = first_difference(&want, &bits(&y[..kept * h]));
                        assert!(
                            at.is_none(),
                            "{ctx}: {label} {path:?} differs first at {at:?}"
                        );
                    }
                }
                println!("{ctx}: rel L2 {err:.2e}, vec4 words both passes {x4}, paths equal");
            }
        }
    }
}
