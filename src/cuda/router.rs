//! Stage 0 on CUDA (kernels/router.ptx). Placeholder: being written.

use cudarc::driver::CudaSlice;

use crate::cuda::context::cuda_err;
use crate::cuda::ptx::{self, PtxModule};
use crate::cuda::{CudaDevice, CudaWeights};
use crate::error::Result;
use crate::stage::Stage;

/// Every module variant of this stage.
pub fn modules() -> Result<Vec<PtxModule>> {
    ptx::plain(Stage::Router)
}

/// Launches `logits [T, E] = x [T, H] · wᵀ (+ bias [E])` on the device's stream.
pub fn launch(
    _dev: &CudaDevice,
    _x: &CudaSlice<f32>,
    _tokens: usize,
    _w: &CudaWeights,
    _bias: Option<&CudaSlice<f32>>,
    _logits: &mut CudaSlice<f32>,
) -> Result<()> {
    Err(cuda_err("the CUDA router kernel is not implemented yet"))
}
