//! Stage 1 on wgpu (shaders/gate.wgsl). Placeholder: being written.

use crate::config::RoutingConfig;
use crate::error::Result;
use crate::wgpu::context::{gpu_err, GpuBuffer, WgpuDevice};
use crate::wgpu::GateGpu;

/// Entry points of shaders/gate.wgsl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    Placeholder,
}

impl Entry {
    pub fn name(self) -> &'static str {
        match self {
            Entry::Placeholder => "placeholder_gate",
        }
    }
}

/// Records the gate on `logits` `[T, E]` into `out`.
#[allow(clippy::too_many_arguments)]
pub fn encode(
    _dev: &WgpuDevice,
    _enc: &mut ::wgpu::CommandEncoder,
    _logits: &GpuBuffer<f32>,
    _tokens: usize,
    _experts: usize,
    _bias: Option<&GpuBuffer<f32>>,
    _cfg: &RoutingConfig,
    _out: &GateGpu,
) -> Result<()> {
    Err(gpu_err("the wgpu gate is not implemented yet"))
}
