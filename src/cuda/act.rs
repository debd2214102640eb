//! Activation buffers on CUDA: `x`, `x_perm`, `h`, `y_perm`, the shared expert's output and `y`
//! in the prepared layer's activation dtype (f32, f16 or bf16), passed to the stage launchers
//! as raw device bytes plus their dtype, so that the crate's own buffers, a runtime's
//! `CudaView`s and raw device pointers all reach the kernels the same way.
//!
//! Layout: dense row-major `[rows, cols]`, `cols · size` bytes per row (no padding: a CUDA
//! thread can store 2 bytes).

use cudarc::driver::{CudaView, CudaViewMut};

use crate::tensor::DType;

/// A read-only activation matrix: `bytes` holds at least `elems · dtype.size()` bytes.
#[derive(Debug)]
pub struct ActView<'a> {
    pub bytes: CudaView<'a, u8>,
    pub dtype: DType,
}

/// A writable activation matrix: `bytes` holds at least `elems · dtype.size()` bytes.
#[derive(Debug)]
pub struct ActViewMut<'a> {
    pub bytes: CudaViewMut<'a, u8>,
    pub dtype: DType,
}

impl ActView<'_> {
    /// Elements of `dtype` the view holds.
    pub fn elems(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }
}

impl ActViewMut<'_> {
    /// Elements of `dtype` the view holds.
    pub fn elems(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }
}
