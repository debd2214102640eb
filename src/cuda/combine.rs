//! Stage 4 on CUDA (kernels/combine.ptx). Placeholder: being written.

use cudarc::driver::CudaSlice;

use crate::cuda::context::cuda_err;
use crate::cuda::ptx::{self, PtxModule};
use crate::cuda::{CudaDevice, GateCuda};
use crate::error::Result;
use crate::stage::Stage;

/// Every module variant of this stage.
pub fn modules() -> Result<Vec<PtxModule>> {
    ptx::plain(Stage::Combine)
}

/// The shared expert's output `[T, H]` and optional gate logits `[T]`.
pub type SharedCuda<'a> = Option<(&'a CudaSlice<f32>, Option<&'a CudaSlice<f32>>)>;

/// Launches `y [T, H]` from `y_perm`, the gate's weights and kept flags, `row_of_assignment`.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    _dev: &CudaDevice,
    _y_perm: &CudaSlice<f32>,
    _gate: &GateCuda,
    _row_of_assignment: &CudaSlice<u32>,
    (_tokens, _slots, _hidden): (usize, usize, usize),
    _shared: SharedCuda<'_>,
    _output_scale: f32,
    _y: &mut CudaSlice<f32>,
) -> Result<()> {
    Err(cuda_err("the CUDA combine kernel is not implemented yet"))
}
