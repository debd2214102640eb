//! Stage 3 on CUDA (kernels/expert_gemm.ptx). Placeholder: being written.

use cudarc::driver::CudaSlice;

use crate::config::Activation;
use crate::cpu::expert_gemm::{ExpertDims, ExpertWeights};
use crate::cuda::context::cuda_err;
use crate::cuda::ptx::{self, PtxModule};
use crate::cuda::CudaDevice;
use crate::error::Result;
use crate::stage::Stage;

/// Every module variant of this stage.
pub fn modules() -> Result<Vec<PtxModule>> {
    ptx::plain(Stage::ExpertGemm)
}

/// Expert weights on the device.
#[derive(Debug)]
pub struct CudaExperts {
    pub dims: ExpertDims,
}

impl CudaExperts {
    /// Uploads `w` (E experts, or one shared expert as E = 1) for `act`.
    pub fn upload(_dev: &CudaDevice, w: &ExpertWeights, act: Activation) -> Result<Self> {
        Ok(CudaExperts { dims: w.dims(act)? })
    }
}

/// Launches `y [rows, H]` = the expert FFN of `x_rows [rows, H]`; rows of expert e are
/// `offsets[e]..offsets[e+1]` (`offsets` `[E + 1]` on the device, never read by the host).
#[allow(clippy::too_many_arguments)]
pub fn launch(
    _dev: &CudaDevice,
    _x_rows: &CudaSlice<f32>,
    _rows: usize,
    _offsets: &CudaSlice<u32>,
    _w: &CudaExperts,
    _act: Activation,
    _y: &mut CudaSlice<f32>,
) -> Result<()> {
    Err(cuda_err("the CUDA expert GEMM is not implemented yet"))
}
