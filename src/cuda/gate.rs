//! Stage 1 on CUDA (kernels/gate.ptx). Placeholder: being written.

use cudarc::driver::CudaSlice;

use crate::config::RoutingConfig;
use crate::cuda::context::cuda_err;
use crate::cuda::ptx::{self, PtxModule};
use crate::cuda::{CudaDevice, GateCuda};
use crate::error::Result;
use crate::stage::Stage;

/// Every module variant of this stage.
pub fn modules() -> Result<Vec<PtxModule>> {
    ptx::plain(Stage::Gate)
}

/// Launches the gate on `logits` `[T, E]` into `out`.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    _dev: &CudaDevice,
    _logits: &CudaSlice<f32>,
    _tokens: usize,
    _experts: usize,
    _bias: Option<&CudaSlice<f32>>,
    _cfg: &RoutingConfig,
    _out: &mut GateCuda,
) -> Result<()> {
    Err(cuda_err("the CUDA gate kernel is not implemented yet"))
}
