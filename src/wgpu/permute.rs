//! Stage 2 on wgpu (shaders/permute.wgsl). Placeholder: being written.

use crate::error::Result;
use crate::wgpu::context::{gpu_err, GpuBuffer, WgpuDevice};
use crate::wgpu::{GateGpu, PermuteGpu};

/// Entry points of shaders/permute.wgsl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    Placeholder,
}

impl Entry {
    pub fn name(self) -> &'static str {
        match self {
            Entry::Placeholder => "placeholder_permute",
        }
    }
}

/// Records the permutation of `gate`'s assignments and the gather of `x` `[T, H]` into `out`.
#[allow(clippy::too_many_arguments)]
pub fn encode(
    _dev: &WgpuDevice,
    _enc: &mut ::wgpu::CommandEncoder,
    _gate: &GateGpu,
    (_tokens, _slots, _experts): (usize, usize, usize),
    _x: &GpuBuffer<f32>,
    _hidden: usize,
    _out: &PermuteGpu,
) -> Result<()> {
    Err(gpu_err("the wgpu permute is not implemented yet"))
}
