//! Stage 3 on wgpu (shaders/expert_gemm.wgsl). Placeholder: being written.

use crate::config::Activation;
use crate::cpu::expert_gemm::{ExpertDims, ExpertWeights};
use crate::error::Result;
use crate::wgpu::context::{gpu_err, GpuBuffer, WgpuDevice};

/// Entry points of shaders/expert_gemm.wgsl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    Placeholder,
}

impl Entry {
    pub fn name(self) -> &'static str {
        match self {
            Entry::Placeholder => "placeholder_expert_gemm",
        }
    }
}

/// Expert weights on the device.
#[derive(Debug)]
pub struct GpuExperts {
    pub dims: ExpertDims,
}

impl GpuExperts {
    /// Uploads `w` (E experts, or one shared expert) for `act`.
    pub fn upload(_dev: &WgpuDevice, w: &ExpertWeights, act: Activation) -> Result<Self> {
        Ok(GpuExperts { dims: w.dims(act)? })
    }
}

/// Records `y [rows, H]` = the expert FFN of `x_rows [rows, H]`, rows of expert e being
/// `offsets[e]..offsets[e+1]` (`offsets` `[E + 1]` on the device).
#[allow(clippy::too_many_arguments)]
pub fn encode(
    _dev: &WgpuDevice,
    _enc: &mut ::wgpu::CommandEncoder,
    _x_rows: &GpuBuffer<f32>,
    _rows: usize,
    _offsets: &GpuBuffer<u32>,
    _w: &GpuExperts,
    _act: Activation,
    _y: &GpuBuffer<f32>,
) -> Result<()> {
    Err(gpu_err("the wgpu expert GEMM is not implemented yet"))
}
