//! Activation buffers on wgpu: `x`, `x_perm`, `h`, `y_perm`, the shared expert's output and
//! `y` in the prepared layer's activation dtype, as u32 words (WGSL has no 16-bit storage type
//! without `shader-f16`, and none at all for bf16).
//!
//! Layout: f32 is one element per word; f16 and bf16 are two per word, element 2i in the low
//! half (as the weights, shaders/common.wgsl). A matrix `[rows, cols]` has a row stride of
//! [`stride`]`(cols, dtype)` elements: `cols` for f32, `cols` rounded up to even for the
//! 16-bit dtypes, so that no word holds elements of two rows and every word of a GEMM output
//! is written by one invocation. The caller's `x` and `y` are dense (stride `cols`): they are
//! only read (x) or written one whole word per invocation by an elementwise kernel (y), so a
//! word may hold the end of one row and the start of the next.

use crate::error::{Error, Result};
use crate::stage::Stage;
use crate::tensor::DType;
use crate::wgpu::context::GpuBuffer;

/// Row stride, in elements, of an internal activation matrix with `cols` columns.
pub fn stride(cols: usize, dtype: DType) -> usize {
    match dtype {
        DType::F32 => cols,
        DType::F16 | DType::BF16 => cols.next_multiple_of(2),
    }
}

/// Words of `elems` consecutive elements of `dtype`.
pub fn words(elems: usize, dtype: DType) -> usize {
    match dtype {
        DType::F32 => elems,
        DType::F16 | DType::BF16 => elems.div_ceil(2),
    }
}

/// Words of an internal `[rows, cols]` activation matrix (padded rows, see [`stride`]).
pub fn matrix_words(rows: usize, cols: usize, dtype: DType) -> usize {
    words(rows.saturating_mul(stride(cols, dtype)), dtype)
}

/// The WGSL `A_DTYPE` override of `dtype` (0 f32, 1 f16, 2 bf16: the weights' codes).
pub fn code(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 0.0,
        DType::F16 => 1.0,
        DType::BF16 => 2.0,
    }
}

/// An activation matrix `[rows, cols]` on the device: its words, dtype and row stride in
/// elements (`cols` for the caller's dense x and y, [`stride`] for internal buffers).
#[derive(Debug, Clone, Copy)]
pub struct Act<'a> {
    /// The matrix's words.
    pub buf: &'a GpuBuffer<u32>,
    /// The element dtype.
    pub dtype: DType,
    /// Rows.
    pub rows: usize,
    /// Columns (elements per row that hold data).
    pub cols: usize,
    /// Elements from the start of one row to the next (>= `cols`).
    pub stride: usize,
}

impl<'a> Act<'a> {
    /// A dense matrix (stride = cols): the caller's x or y.
    pub fn dense(buf: &'a GpuBuffer<u32>, dtype: DType, rows: usize, cols: usize) -> Self {
        Act {
            buf,
            dtype,
            rows,
            cols,
            stride: cols,
        }
    }

    /// An internal matrix with the padded stride of [`stride`].
    pub fn padded(buf: &'a GpuBuffer<u32>, dtype: DType, rows: usize, cols: usize) -> Self {
        Act {
            buf,
            dtype,
            rows,
            cols,
            stride: stride(cols, dtype),
        }
    }

    /// Words the matrix spans: `ceil(((rows − 1)·stride + cols) / per-word)`, 0 when empty.
    pub fn span_words(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        words((self.rows - 1) * self.stride + self.cols, self.dtype)
    }
}

impl Act<'_> {
    /// Words spanned by the first `rows` rows (0 when `rows` or `cols` is 0).
    pub fn words_for_rows(&self, rows: usize) -> usize {
        if rows == 0 || self.cols == 0 {
            return 0;
        }
        words(
            (rows - 1)
                .saturating_mul(self.stride)
                .saturating_add(self.cols),
            self.dtype,
        )
    }

    /// Checks that rows `0..rows` of this matrix can be read (or written) as `name` of
    /// `stage`: at most [`Act::rows`] of them, a stride of at least `cols`, a buffer holding
    /// every word they span (it may hold more: a workspace sized for more tokens), and element
    /// indices in the shaders' u32 range.
    pub fn check(&self, stage: Stage, name: &str, rows: usize) -> Result<()> {
        if rows > self.rows {
            return Err(Error::shape(
                stage,
                format!("{name}: {rows} rows needed, the matrix has {}", self.rows),
            ));
        }
        if self.stride < self.cols {
            return Err(Error::shape(
                stage,
                format!(
                    "{name}: row stride {} is below its {} columns",
                    self.stride, self.cols
                ),
            ));
        }
        let need = self.words_for_rows(rows);
        if self.buf.len < need {
            return Err(Error::shape(
                stage,
                format!(
                    "{name}: [{rows}, {}] {} with row stride {} needs {need} words, the buffer \
                     holds {}",
                    self.cols, self.dtype, self.stride, self.buf.len
                ),
            ));
        }
        crate::wgpu::context::index_u32(stage, name, rows.saturating_mul(self.stride))?;
        Ok(())
    }

    /// Like [`Act::check`], for a matrix that a GEMM writes one whole word per invocation:
    /// 16-bit rows must also start on a word (an even stride), so that no word holds elements
    /// of two rows.
    pub fn check_padded(&self, stage: Stage, name: &str, rows: usize) -> Result<()> {
        self.check(stage, name, rows)?;
        if self.dtype != DType::F32 && self.stride % 2 != 0 {
            return Err(Error::shape(
                stage,
                format!(
                    "{name}: {} rows need an even row stride (padded), got {}",
                    self.dtype, self.stride
                ),
            ));
        }
        Ok(())
    }

    /// The binding of the words of rows `0..rows` (at least one word, at least `min_words`).
    pub fn binding(&self, rows: usize, min_words: usize) -> ::wgpu::BindingResource<'_> {
        range_binding(self.buf, self.words_for_rows(rows).max(min_words))
    }
}

/// The binding of the first `words` words of `buf` (at least 4 bytes, at most the buffer).
pub fn range_binding<T>(buf: &GpuBuffer<T>, words: usize) -> ::wgpu::BindingResource<'_> {
    let bytes = (words.max(1) as u64)
        .saturating_mul(4)
        .min(buf.buffer.size());
    ::wgpu::BindingResource::Buffer(::wgpu::BufferBinding {
        buffer: &buf.buffer,
        offset: 0,
        size: std::num::NonZeroU64::new(bytes),
    })
}

/// An error unless `a` and `b` have one dtype.
pub fn same_dtype(stage: Stage, what: &str, a: DType, b: DType) -> Result<()> {
    if a == b {
        Ok(())
    } else {
        Err(Error::shape(
            stage,
            format!("{what}: activation dtypes differ ({a} and {b})"),
        ))
    }
}

/// An error unless `have >= need` (a buffer may be larger than a forward needs).
pub fn at_least(stage: Stage, name: &str, have: usize, need: usize) -> Result<()> {
    if have >= need {
        Ok(())
    } else {
        Err(Error::shape(
            stage,
            format!("{name}: at least {need} elements needed, the buffer holds {have}"),
        ))
    }
}

/// The 16 bits of `v` rounded (to nearest, ties to even) to a 16-bit dtype.
fn bits16(v: f32, dtype: DType) -> u32 {
    match dtype {
        DType::F16 => u32::from(half::f16::from_f32(v).to_bits()),
        _ => u32::from(half::bf16::from_f32(v).to_bits()),
    }
}

/// Host side: `values` `[rows, cols]` (dense) as the words of a `[rows, cols]` matrix with row
/// stride `stride` in `dtype`, rounded to nearest even; padding elements are 0.
pub fn pack(values: &[f32], rows: usize, cols: usize, stride: usize, dtype: DType) -> Vec<u32> {
    let span = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * stride + cols
    };
    let mut elems = vec![0f32; span];
    for r in 0..rows {
        elems[r * stride..r * stride + cols].copy_from_slice(&values[r * cols..(r + 1) * cols]);
    }
    match dtype {
        DType::F32 => elems.iter().map(|v| v.to_bits()).collect(),
        _ => elems
            .chunks(2)
            .map(|p| bits16(p[0], dtype) | (p.get(1).map_or(0, |&v| bits16(v, dtype)) << 16))
            .collect(),
    }
}

/// Host side: the `[rows, cols]` elements (dense, widened to f32) of a matrix with row stride
/// `stride` held in `words` of `dtype`.
pub fn unpack(words: &[u32], rows: usize, cols: usize, stride: usize, dtype: DType) -> Vec<f32> {
    let elem = |i: usize| -> f32 {
        match dtype {
            DType::F32 => f32::from_bits(words[i]),
            _ => {
                let h = (words[i / 2] >> (16 * (i % 2))) as u16;
                match dtype {
                    DType::F16 => half::f16::from_bits(h).to_f32(),
                    _ => half::bf16::from_bits(h).to_f32(),
                }
            }
        }
    };
    (0..rows)
        .flat_map(|r| (0..cols).map(move |c| r * stride + c))
        .map(elem)
        .collect()
}

/// Helpers of the wgpu unit tests that run stages on f16 / bf16 activations.
#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use crate::wgpu::WgpuDevice;

    /// The relative L2 tolerance of an activation dtype against the f64 reference (DESIGN.md
    /// section 5).
    pub fn tolerance(dtype: DType) -> f64 {
        match dtype {
            DType::F32 => 2e-5,
            DType::F16 => 5e-3,
            DType::BF16 => 1e-2,
        }
    }

    /// ‖a − b‖ / ‖b‖.
    pub fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        let num: f64 = a
            .iter()
            .zip(b)
            .map(|(&x, y)| (f64::from(x) - y).powi(2))
            .sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den.max(1e-300)).sqrt()
    }

    /// `v` rounded to `dtype` (the values a device holding them in `dtype` sees).
    pub fn round(v: &[f32], dtype: DType) -> Vec<f32> {
        v.iter()
            .map(|&x| dtype.round(f64::from(x)) as f32)
            .collect()
    }

    /// Every byte of `buf` set to 0xFF (NaN in every dtype), at the next submission.
    pub fn poison<T>(dev: &WgpuDevice, buf: &GpuBuffer<T>) {
        dev.queue
            .write_buffer(&buf.buffer, 0, &vec![0xFFu8; buf.buffer.size() as usize]);
    }

    /// A poisoned buffer of `words` words.
    pub fn poisoned(dev: &WgpuDevice, words: usize) -> GpuBuffer<u32> {
        dev.upload(&vec![u32::MAX; words.max(1)], "poisoned")
            .unwrap()
    }

    /// A buffer of `capacity` words (at least what the matrix needs) holding `values`
    /// `[rows, cols]` in `dtype` with row stride `stride`; the words past the matrix are
    /// poisoned.
    pub fn upload(
        dev: &WgpuDevice,
        values: &[f32],
        (rows, cols, stride): (usize, usize, usize),
        dtype: DType,
        capacity: usize,
    ) -> GpuBuffer<u32> {
        let mut w = pack(values, rows, cols, stride, dtype);
        let len = capacity.max(w.len()).max(1);
        w.resize(len, u32::MAX);
        dev.upload(&w, "activations").unwrap()
    }
}
