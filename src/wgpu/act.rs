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
    pub buf: &'a GpuBuffer<u32>,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
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
