//! Weight matrices on the GPU, split into row chunks so that no binding exceeds the adapter's
//! storage binding or buffer size (128 MiB on some adapters).
//!
//! Dense weights: packed u32 words (one f32, or two f16 / bf16 per word, element 2i of the
//! chunk in the low half), in k-major slabs ([`GpuWeights::upload_slabs`] for expert
//! matrices, [`GpuWeights::upload_router`] for the router's): per expert, each block of
//! [`SLAB`] = 64 output columns
//! (weight rows n = 64·s .. 64·s + 63, zero past N) is stored as a `[K][64]` slab, element
//! (k, j) at `k·64 + j` of the slab (16-bit: word `k·32 + j/2`, column j even in the low
//! half). A k-row of a slab is 128 (16-bit) or 256 (f32) bytes, whole 16-byte words for any K;
//! slabs follow each other expert by expert, and chunks hold whole slabs.
//!
//! Quantized weights ([`QuantMatrix`]) keep the file's bytes: the kernel decodes them in its
//! weight load (shaders/expert_gemm.wgsl), no dequantized copy exists on the device. Each
//! chunk is one u32 buffer of three sections, each starting on a 16-byte boundary and padded
//! to one, bytes little-endian in their words (byte i of a section is bits 8·(i % 4) of word
//! i / 4):
//!
//! - codes, from byte 0: the chunk's rows, `row_bytes` each: FP8 one e4m3 byte per element
//!   (K bytes), MXFP4 / INT4 two nibbles per byte, the low nibble the even k (⌈K/2⌉ bytes);
//!   with K a multiple of 16 (FP8) or 32 (MXFP4 / INT4) every row is whole 16-byte words,
//!   which the small-batch kernels then read as `vec4<u32>` ([`GpuWeights::vec4_rows`]);
//! - scales, in the file's dtype (f32; f16 / bf16 two per word, the even scale low; e8m0
//!   bytes): FP8 the scale rows `srow(first) ..= srow(last)` of the chunk's first and last
//!   rows, `srow(r) = (r / N)·⌈N/128⌉ + (r % N) / 128` (monotonic in r, so contiguous; a scale
//!   row on a chunk boundary is held by both chunks), ⌈K/128⌉ scales each; MXFP4 / INT4 the
//!   chunk's rows, `K / group` scales each;
//! - zeros (INT4 with zero points only): one byte per scale of the scales section.
//!
//! The section offsets (in words) and the first scale row go to the shader's `GemmParams`, so a
//! chunk needs one binding, as a dense one does. Device memory is the packed bytes
//! ([`QuantMatrix::packed_bytes`]) plus at most 15 bytes of alignment per section and chunk,
//! plus the FP8 scale rows repeated at chunk boundaries ([`GpuWeights::bytes`] reports it).

use crate::device::BackendKind;
use crate::error::Error;
use crate::error::Result;
use crate::limits::Resource;
use crate::quant::{QuantFormat, QuantMatrix, Scales, Weight, FP8_BLOCK, MX_BLOCK};
use crate::stage::Stage;
use crate::tensor::{DType, Tensor, TensorData};
use crate::wgpu::context::{GpuBuffer, WgpuDevice};

/// Section alignment of a quantized chunk, in bytes.
pub const SECTION_ALIGN: usize = 16;

/// Output columns (weight rows) of one k-major slab of a dense expert matrix.
pub const SLAB: usize = 64;

/// The slab layout of a dense expert matrix `[E, N, K]` (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlabLayout {
    /// Rows N of one expert.
    pub expert_rows: usize,
    /// Slabs per expert, ⌈N / 64⌉.
    pub per_expert: usize,
    /// Columns stored in the matrix's last slab: 64 for expert matrices (every slab whole);
    /// for a router matrix ([`GpuWeights::upload_router`]) its real columns rounded up to one
    /// 16-byte word (4 f32 or 8 16-bit elements).
    pub last_width: usize,
}

/// A contiguous range of rows of a weight matrix.
#[derive(Debug)]
pub struct WeightChunk {
    /// First row (of the flattened `[rows, cols]` view) held by this chunk.
    pub first_row: usize,
    /// Rows held by this chunk.
    pub rows: usize,
    /// The chunk's words: dense elements (see the module docs), or the sections of a
    /// quantized chunk.
    pub words: GpuBuffer<u32>,
    /// Quantized: the word where the scales section starts (0 when dense).
    pub scale_word: usize,
    /// Quantized INT4 with zero points: the word where the zeros section starts (0 otherwise).
    pub zero_word: usize,
    /// Quantized: the scale row (of the whole matrix's scales) the scales section starts with.
    pub scale_row0: usize,
    /// Slab layout: the first slab of the chunk (of the whole matrix's slabs, `e·⌈N/64⌉ + s`)
    /// and the number of slabs it holds (0 and 0 otherwise).
    pub first_slab: usize,
    /// Slabs in this chunk (slab layout only).
    pub slabs: usize,
}

/// How a quantized matrix's bytes decode: what the shader's overrides and `GemmParams` need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantDesc {
    /// The format.
    pub format: QuantFormat,
    /// The scales' element type as the shader's `S_DTYPE`: 0 f32, 1 f16, 2 bf16, 3 e8m0.
    pub scale_code: u32,
    /// Bytes per scale.
    pub scale_bytes: usize,
    /// INT4 zero points present.
    pub zeros: bool,
    /// The k extent of one scale (128, 32 or G).
    pub group: usize,
    /// Scales per scale row.
    pub scale_cols: usize,
    /// Scale rows per expert: ⌈N/128⌉ for FP8, N otherwise.
    pub scale_rows: usize,
    /// Rows N per expert.
    pub expert_rows: usize,
    /// Code bytes per row.
    pub row_bytes: usize,
}

impl QuantDesc {
    /// The scale row of flattened weight row `r`.
    fn scale_row(&self, r: usize) -> usize {
        match self.format {
            QuantFormat::Fp8Block => {
                let n = self.expert_rows.max(1);
                (r / n) * self.scale_rows + (r % n) / FP8_BLOCK
            }
            _ => r,
        }
    }

    /// The scale rows `lo..hi` that rows `first .. first + n` (n ≥ 1) use.
    fn scale_span(&self, first: usize, n: usize) -> (usize, usize) {
        (self.scale_row(first), self.scale_row(first + n - 1) + 1)
    }

    /// `(codes, scales, zeros)` bytes of rows `first .. first + n` (n ≥ 1), unpadded.
    fn section_bytes(&self, first: usize, n: usize) -> [usize; 3] {
        let (lo, hi) = self.scale_span(first, n);
        let scales = (hi - lo) * self.scale_cols;
        [
            n * self.row_bytes,
            scales * self.scale_bytes,
            if self.zeros { scales } else { 0 },
        ]
    }

    /// Bytes of the chunk of rows `first .. first + n` (n ≥ 1), every section padded.
    fn chunk_bytes(&self, first: usize, n: usize) -> u64 {
        self.section_bytes(first, n)
            .iter()
            .map(|&b| b.next_multiple_of(SECTION_ALIGN) as u64)
            .sum()
    }
}

/// The element encoding of a [`GpuWeights`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Dense elements in this dtype.
    Dense(DType),
    /// Quantized bytes.
    Quant(QuantDesc),
}

/// A `[rows, cols]` weight matrix (any leading dims flattened into rows) on the GPU.
#[derive(Debug)]
pub struct GpuWeights {
    /// How the elements are stored.
    pub format: WeightFormat,
    /// Rows: the product of every dimension but the last.
    pub rows: usize,
    /// Columns: the tensor's last dimension.
    pub cols: usize,
    /// Row chunks in order, each within the binding limit.
    pub chunks: Vec<WeightChunk>,
    /// Dense expert matrices: the k-major slab layout; `None` for row-major words (the
    /// router) and quantized bytes.
    pub slab: Option<SlabLayout>,
}

impl GpuWeights {
    /// The `W_DTYPE` override value of common.wgsl (0 for quantized weights, which ignore it).
    pub fn dtype_code(&self) -> f64 {
        match self.format {
            WeightFormat::Dense(d) => dtype_code(d),
            WeightFormat::Quant(_) => 0.0,
        }
    }

    /// The quantized layout, or `None` when dense.
    pub fn quant(&self) -> Option<&QuantDesc> {
        match &self.format {
            WeightFormat::Dense(_) => None,
            WeightFormat::Quant(q) => Some(q),
        }
    }

    /// Whether every row of a quantized matrix is a whole number of 16-byte words of whole
    /// codes, so that the small-batch `*_rows_x4` entry points (shaders/expert_gemm.wgsl) can
    /// read it as `vec4<u32>` words (false for dense weights: slabs, read by the GEMV): FP8
    /// K % 16 = 0 (16 e4m3 codes a word), MXFP4 / INT4 K % 32 = 0 (32 nibbles a word; an odd K's padding nibble
    /// is never in a word of its own). Every chunk starts with a row at byte 0 of its buffer
    /// (for quantized chunks: the codes section comes first), so every row, and every word of
    /// a row, then starts on a 16-byte boundary of the binding. False when K = 0.
    pub fn vec4_rows(&self) -> bool {
        const WORD: usize = 16;
        let per_word = match &self.format {
            // Dense weights are slabs, read by the GEMV (any K), never by rows.
            WeightFormat::Dense(_) => return false,
            WeightFormat::Quant(q) => match q.format {
                QuantFormat::Fp8Block => WORD,
                QuantFormat::Mxfp4 | QuantFormat::Int4 => 2 * WORD,
            },
        };
        self.cols > 0 && self.cols % per_word == 0
    }

    /// Bytes of device memory the chunks hold (what was allocated, padding included).
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.words.buffer.size()).sum()
    }

    /// Uploads the expert matrix `w` (dense in slabs, or quantized; see
    /// [`GpuWeights::upload_slabs`] and [`GpuWeights::upload_quant`]).
    pub fn upload_weight(
        dev: &WgpuDevice,
        w: &Weight,
        max_bytes: Option<u64>,
        label: &str,
    ) -> Result<Self> {
        match w {
            Weight::Dense(t) => Self::upload_slabs(dev, t, max_bytes, label),
            Weight::Quant(q) => Self::upload_quant(dev, q, max_bytes, label),
        }
    }

    /// Uploads the dense expert matrix `t` (`[E, N, K]`, or `[N, K]` for one expert) in k-major
    /// slabs of 64 output columns (see the module docs), chunked by whole slabs so that each
    /// chunk fits `max_bytes` (or the device's binding limit when `None`). Device memory is
    /// the matrix plus the zero columns that pad each expert's N to a multiple of 64.
    pub fn upload_slabs(
        dev: &WgpuDevice,
        t: &Tensor,
        max_bytes: Option<u64>,
        label: &str,
    ) -> Result<Self> {
        Self::upload_slabs_as(dev, t, max_bytes, label, false)
    }

    /// A router matrix `[E, H]` (E output columns) in slabs of 64 like
    /// [`GpuWeights::upload_slabs`], except that the last slab holds only its real columns
    /// rounded up to one 16-byte word (4 f32 or 8 16-bit elements) and is that wide: a
    /// router of 8 experts, or the shared expert's `[1, H]` gate, is not padded to 64.
    pub fn upload_router(
        dev: &WgpuDevice,
        t: &Tensor,
        max_bytes: Option<u64>,
        label: &str,
    ) -> Result<Self> {
        Self::upload_slabs_as(dev, t, max_bytes, label, true)
    }

    fn upload_slabs_as(
        dev: &WgpuDevice,
        t: &Tensor,
        max_bytes: Option<u64>,
        label: &str,
        narrow: bool,
    ) -> Result<Self> {
        let shape = t.shape();
        let cols = *shape.last().unwrap_or(&1);
        let rows = t.len().checked_div(cols).unwrap_or(0);
        let n = if shape.len() >= 2 {
            shape[shape.len() - 2]
        } else {
            rows
        };
        let experts = rows.checked_div(n).unwrap_or(0);
        let per_expert = n.div_ceil(SLAB);
        let total = experts * per_expert;
        let per_word = if t.dtype().size() == 2 { 2 } else { 1 };
        let slab_words = cols * SLAB / per_word;
        let limit = max_bytes
            .unwrap_or_else(|| dev.max_binding_bytes())
            .min(dev.max_binding_bytes())
            .min(u64::from(u32::MAX));
        let slab_bytes = slab_words as u64 * 4;
        // K = 0: slabs hold no word, one chunk takes them all.
        let per_chunk = limit
            .saturating_sub(4)
            .checked_div(slab_bytes)
            .map_or(total.max(1), |n| n as usize);
        if per_chunk == 0 {
            return Err(Error::Limit {
                backend: BackendKind::Wgpu,
                resource: Resource::BindingSize,
                what: format!(
                    "{label}: one slab of {SLAB} rows of {cols} {} elements",
                    t.dtype()
                ),
                need: slab_bytes + 4,
                limit,
            });
        }
        let word = 16 / t.dtype().size();
        let last_width = if narrow && experts == 1 && n > 0 {
            (n - (per_expert - 1) * SLAB).next_multiple_of(word)
        } else {
            SLAB
        };
        let layout = SlabLayout {
            expert_rows: n,
            per_expert,
            last_width,
        };
        // Flattened first row and real rows (padding excluded) of slabs g0 .. g1.
        let first_row = |g: usize| (g / per_expert.max(1)) * n + (g % per_expert.max(1)) * SLAB;
        let real_rows = |g0: usize, g1: usize| -> usize {
            (g0..g1)
                .map(|g| (n - (g % per_expert) * SLAB).min(SLAB))
                .sum()
        };
        let mut chunks = Vec::new();
        let mut g0 = 0;
        while g0 < total || chunks.is_empty() {
            let g1 = (g0 + per_chunk).min(total);
            let words = slab_words_of(t, layout, cols, g0..g1, total);
            chunks.push(WeightChunk {
                first_row: if g0 < total { first_row(g0) } else { 0 },
                rows: real_rows(g0, g1),
                words: dev.upload(&words, label)?,
                scale_word: 0,
                zero_word: 0,
                scale_row0: 0,
                first_slab: g0,
                slabs: g1 - g0,
            });
            if g1 >= total {
                break;
            }
            g0 = g1;
        }
        Ok(GpuWeights {
            format: WeightFormat::Dense(t.dtype()),
            rows,
            cols,
            chunks,
            slab: Some(layout),
        })
    }

    /// Uploads the packed bytes of `q` viewed as `[E·N, K]`, in row chunks of at most
    /// `max_bytes` each (the device's binding limit when `None`, never above it), each chunk
    /// one buffer of codes, scales and zeros (see the module docs).
    pub fn upload_quant(
        dev: &WgpuDevice,
        q: &QuantMatrix,
        max_bytes: Option<u64>,
        label: &str,
    ) -> Result<Self> {
        let d = describe(q, label)?;
        let rows = q.experts * q.rows;
        let limit = chunk_limit(dev, max_bytes);
        let scale_bytes = q.scales.bytes();
        let zeros: &[u8] = q.zeros.as_deref().unwrap_or(&[]);
        let mut chunks = Vec::new();
        let mut first = 0;
        while first < rows || (rows == 0 && chunks.is_empty()) {
            let n = if rows == 0 {
                0
            } else {
                rows_that_fit(&d, first, rows - first, limit, label)?
            };
            let (buf, scale_word, zero_word, scale_row0) = if n == 0 {
                (Vec::new(), 0, 0, 0)
            } else {
                let (s_lo, s_hi) = d.scale_span(first, n);
                let (c_lo, c_hi) = (first * d.row_bytes, (first + n) * d.row_bytes);
                let (z_lo, z_hi) = (s_lo * d.scale_cols, s_hi * d.scale_cols);
                let sb = d.scale_bytes;
                let mut buf = Vec::with_capacity(d.chunk_bytes(first, n) as usize);
                // Codes first, at byte 0: rows of whole 16-byte words start on one
                // (`vec4_rows`).
                push_section(&mut buf, &q.codes[c_lo..c_hi]);
                let scale_word = buf.len() / 4;
                push_section(&mut buf, &scale_bytes[z_lo * sb..z_hi * sb]);
                let zero_word = buf.len() / 4;
                if d.zeros {
                    push_section(&mut buf, &zeros[z_lo..z_hi]);
                }
                (buf, scale_word, if d.zeros { zero_word } else { 0 }, s_lo)
            };
            let words: Vec<u32> = buf
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            chunks.push(WeightChunk {
                first_row: first,
                rows: n,
                words: dev.upload(&words, label)?,
                scale_word,
                zero_word,
                scale_row0,
                first_slab: 0,
                slabs: 0,
            });
            first += n;
            if rows == 0 {
                break;
            }
        }
        Ok(GpuWeights {
            format: WeightFormat::Quant(d),
            rows,
            cols: q.cols,
            chunks,
            slab: None,
        })
    }
}

/// The largest quantized chunk: `max_bytes`, never above the device's binding limit nor the
/// shaders' 32-bit byte addressing.
fn chunk_limit(dev: &WgpuDevice, max_bytes: Option<u64>) -> u64 {
    let dev_max = dev.max_binding_bytes().min(u64::from(u32::MAX));
    max_bytes.unwrap_or(dev_max).min(dev_max)
}

/// `bytes` appended to `buf`, then zeros up to the next section boundary.
fn push_section(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(bytes);
    buf.resize(buf.len().next_multiple_of(SECTION_ALIGN), 0);
}

/// The most rows from `first` (at most `left`, at least 1) whose chunk fits `limit` bytes.
fn rows_that_fit(
    d: &QuantDesc,
    first: usize,
    left: usize,
    limit: u64,
    label: &str,
) -> Result<usize> {
    let one = d.chunk_bytes(first, 1);
    if one > limit {
        return Err(Error::Limit {
            backend: BackendKind::Wgpu,
            resource: Resource::BindingSize,
            what: format!(
                "{label}: one {} row of {} bytes with its scales",
                d.format, d.row_bytes
            ),
            need: one,
            limit,
        });
    }
    // The chunk's size grows with its row count: the largest count that fits, by bisection.
    let (mut lo, mut hi) = (1, left);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if d.chunk_bytes(first, mid) <= limit {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(lo)
}

/// The layout of `q`, after checking that its byte counts match its shape (a malformed matrix
/// is an error here, not an out-of-bounds read in a shader).
fn describe(q: &QuantMatrix, label: &str) -> Result<QuantDesc> {
    let bad = |what: String| Error::shape(Stage::ExpertGemm, format!("{label}: {what}"));
    let rows = q.experts * q.rows;
    let (scale_code, scale_bytes) = match (&q.scales, q.format) {
        (Scales::E8m0(_), QuantFormat::Mxfp4) => (3, 1),
        (Scales::Float(t), QuantFormat::Fp8Block | QuantFormat::Int4) => (
            match t.dtype() {
                DType::F32 => 0,
                DType::F16 => 1,
                DType::BF16 => 2,
            },
            t.dtype().size(),
        ),
        (s, f) => {
            return Err(bad(format!("{f} with {} scales", s.dtype_name())));
        }
    };
    let scale_cols = q.scale_cols();
    let scale_rows = q.scale_rows();
    let group = q.group();
    match q.format {
        QuantFormat::Mxfp4 if q.cols % MX_BLOCK != 0 => {
            return Err(bad(format!(
                "mxfp4 needs K a multiple of {MX_BLOCK}, got {}",
                q.cols
            )));
        }
        QuantFormat::Int4 if q.cols > 0 && (scale_cols == 0 || q.cols % scale_cols != 0) => {
            return Err(bad(format!(
                "int4: {} scales per row do not divide K = {}",
                scale_cols, q.cols
            )));
        }
        _ => {}
    }
    let want_codes = rows * q.row_bytes();
    let want_scales = q.experts * scale_rows * scale_cols;
    if q.codes.len() != want_codes {
        return Err(bad(format!(
            "{} code bytes, expected {want_codes}",
            q.codes.len()
        )));
    }
    if q.scales.len() != want_scales {
        return Err(bad(format!(
            "{} scales, expected {want_scales}",
            q.scales.len()
        )));
    }
    match &q.zeros {
        Some(_) if q.format != QuantFormat::Int4 => {
            return Err(bad(format!("{} has no zero points", q.format)));
        }
        Some(z) if z.len() != want_scales => {
            return Err(bad(format!(
                "{} zero points, expected {want_scales}",
                z.len()
            )));
        }
        _ => {}
    }
    Ok(QuantDesc {
        format: q.format,
        scale_code,
        scale_bytes,
        zeros: q.zeros.is_some(),
        group: group.max(1),
        scale_cols,
        scale_rows,
        expert_rows: q.rows,
        row_bytes: q.row_bytes(),
    })
}

/// The `W_DTYPE` override value of common.wgsl.
pub fn dtype_code(d: DType) -> f64 {
    match d {
        DType::F32 => 0.0,
        DType::F16 => 1.0,
        DType::BF16 => 2.0,
    }
}

/// Elements `lo..hi` of `t` packed into u32 words (`lo` is even for 16-bit dtypes).
pub fn pack_words(t: &Tensor, lo: usize, hi: usize) -> Vec<u32> {
    match t.data() {
        TensorData::F32(v) => v[lo..hi].iter().map(|x| x.to_bits()).collect(),
        TensorData::F16(v) => pack16(&v[lo..hi].iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
        TensorData::BF16(v) => pack16(&v[lo..hi].iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
    }
}

/// The words of slabs `slabs` of the `[E·N, K]` matrix `t` in `layout` (see the module docs),
/// built in parallel, one slab at a time.
fn slab_words_of(
    t: &Tensor,
    layout: SlabLayout,
    k: usize,
    slabs: std::ops::Range<usize>,
    total: usize,
) -> Vec<u32> {
    use rayon::prelude::*;
    let n = layout.expert_rows;
    let per_expert = layout.per_expert.max(1);
    let half = t.dtype().size() == 2;
    let per_word = if half { 2 } else { 1 };
    // Whole slabs, then (router matrices) a narrower last one.
    let last = if slabs.end == total {
        layout.last_width
    } else {
        SLAB
    };
    let slab_words = k * SLAB / per_word;
    let len = (slabs.len().saturating_sub(1)) * slab_words + k * last / per_word;
    let mut out = vec![0u32; if slabs.is_empty() { 0 } else { len }];
    if slab_words == 0 {
        return out;
    }
    // The bits of element i of the tensor (16-bit: in the low half).
    let bits = |i: usize| -> u32 {
        match t.data() {
            TensorData::F32(v) => v[i].to_bits(),
            TensorData::F16(v) => u32::from(v[i].to_bits()),
            TensorData::BF16(v) => u32::from(v[i].to_bits()),
        }
    };
    out.par_chunks_mut(slab_words)
        .zip(slabs)
        .for_each(|(dst, g)| {
            let (e, s) = (g / per_expert, g % per_expert);
            let row_words = dst.len() / k; // 64 columns, or the narrow last slab's
            for j in 0..SLAB.min(n - s * SLAB) {
                let src = (e * n + s * SLAB + j) * k;
                let (w, shift) = if half { (j / 2, 16 * (j % 2)) } else { (j, 0) };
                for kk in 0..k {
                    dst[kk * row_words + w] |= bits(src + kk) << shift;
                }
            }
        });
    out
}

fn pack16(h: &[u16]) -> Vec<u32> {
    h.chunks(2)
        .map(|p| u32::from(p[0]) | (u32::from(*p.get(1).unwrap_or(&0)) << 16))
        .collect()
}
