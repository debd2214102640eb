//! Stage 4 on wgpu: the weighted un-permute in slot order plus the shared expert
//! (shaders/combine.wgsl).

use crate::error::Result;
use crate::wgpu::context::{GpuBuffer, WgpuDevice, WG};
use crate::wgpu::kernels::Kernel;
use crate::wgpu::GateGpu;

/// Entry points of shaders/combine.wgsl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    Combine,
}

impl Entry {
    pub fn name(self) -> &'static str {
        match self {
            Entry::Combine => "combine",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    tokens: u32,
    slots: u32,
    hidden: u32,
    has_shared: u32,
    has_shared_gate: u32,
    output_scale: f32,
    _pad: [u32; 2],
}

/// The shared expert's output `[T, H]` and optional gate logits `[T]`.
pub type SharedGpu<'a> = Option<(&'a GpuBuffer<f32>, Option<&'a GpuBuffer<f32>>)>;

/// Records `y [T, H]` from `y_perm`, the gate's weights and kept flags and `row_of_assignment`.
#[allow(clippy::too_many_arguments)]
pub fn encode(
    dev: &WgpuDevice,
    enc: &mut ::wgpu::CommandEncoder,
    y_perm: &GpuBuffer<f32>,
    gate: &GateGpu,
    row_of_assignment: &GpuBuffer<u32>,
    (tokens, slots, hidden): (usize, usize, usize),
    shared: SharedGpu<'_>,
    output_scale: f32,
    y: &GpuBuffer<f32>,
) -> Result<()> {
    let pipeline = dev.pipeline(Kernel::Combine(Entry::Combine), &[])?;
    let dummy = dev.upload(&[0f32], "no shared expert")?;
    let (sy, sg) = match shared {
        Some((s, g)) => (s, g),
        None => (&dummy, None),
    };
    let params = dev.uniform(&Params {
        tokens: tokens as u32,
        slots: slots as u32,
        hidden: hidden as u32,
        has_shared: u32::from(shared.is_some()),
        has_shared_gate: u32::from(sg.is_some()),
        output_scale,
        _pad: [0; 2],
    });
    let bind = dev.bind(
        &pipeline,
        &[
            params.as_entire_binding(),
            y_perm.binding(),
            gate.topk_weights.binding(),
            gate.kept.binding(),
            row_of_assignment.binding(),
            sy.binding(),
            sg.unwrap_or(&dummy).binding(),
            y.binding(),
        ],
    );
    dev.dispatch(enc, &pipeline, &bind, dev.grid(tokens * hidden, WG)?);
    Ok(())
}
