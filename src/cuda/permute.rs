//! Stage 2 on CUDA (kernels/permute.ptx). Placeholder: being written.

use cudarc::driver::CudaSlice;

use crate::cuda::context::cuda_err;
use crate::cuda::ptx::{self, PtxModule};
use crate::cuda::{CudaDevice, GateCuda, PermuteCuda};
use crate::error::Result;
use crate::stage::Stage;

/// Every module variant of this stage.
pub fn modules() -> Result<Vec<PtxModule>> {
    ptx::plain(Stage::Permute)
}

/// Launches the permutation of `gate`'s assignments and the gather of `x` `[T, H]` into `out`.
pub fn launch(
    _dev: &CudaDevice,
    _gate: &GateCuda,
    (_tokens, _slots, _experts): (usize, usize, usize),
    _x: &CudaSlice<f32>,
    _hidden: usize,
    _out: &mut PermuteCuda,
) -> Result<()> {
    Err(cuda_err("the CUDA permute kernels are not implemented yet"))
}
