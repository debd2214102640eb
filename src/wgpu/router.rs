//! Stage 0 on wgpu: router logits (shaders/router.wgsl), one dispatch per weight chunk.
//!
//! One workgroup of 64 invocations per (token, expert) pair: each invocation sums a strided
//! slice of `H` in order, then a fixed pairwise tree adds the 64 partial sums. A token's logits
//! depend on `H` only, never on `T` (batch invariance), and `T = 1` still spreads every dot
//! product over 64 lanes with coalesced reads instead of one serial loop per (t, e).

use crate::error::Result;
use crate::wgpu::context::{GpuBuffer, WgpuDevice};
use crate::wgpu::kernels::Kernel;
use crate::wgpu::weights::GpuWeights;

/// Entry points of shaders/router.wgsl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    Logits,
}

impl Entry {
    pub fn name(self) -> &'static str {
        match self {
            Entry::Logits => "router_logits",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    tokens: u32,
    experts: u32,
    hidden: u32,
    has_bias: u32,
    first_row: u32,
    rows: u32,
    _pad: [u32; 2],
}

/// Records `logits [T, E] = x [T, H] · wᵀ (+ bias [E])`, with `w` `[E, H]`.
pub fn encode(
    dev: &WgpuDevice,
    enc: &mut ::wgpu::CommandEncoder,
    x: &GpuBuffer<f32>,
    tokens: usize,
    w: &GpuWeights,
    bias: Option<&GpuBuffer<f32>>,
    logits: &GpuBuffer<f32>,
) -> Result<()> {
    let pipeline = dev.pipeline(
        Kernel::Router(Entry::Logits),
        &[("W_DTYPE", w.dtype_code())],
    )?;
    let dummy;
    let bias_buf = match bias {
        Some(b) => b,
        None => {
            dummy = dev.upload(&[0f32], "no bias")?;
            &dummy
        }
    };
    for c in &w.chunks {
        let params = dev.uniform(&Params {
            tokens: tokens as u32,
            experts: w.rows as u32,
            hidden: w.cols as u32,
            has_bias: u32::from(bias.is_some()),
            first_row: c.first_row as u32,
            rows: c.rows as u32,
            _pad: [0; 2],
        });
        let bind = dev.bind(
            &pipeline,
            &[
                params.as_entire_binding(),
                x.binding(),
                c.words.binding(),
                bias_buf.binding(),
                logits.binding(),
            ],
        );
        dev.dispatch(enc, &pipeline, &bind, dev.grid(tokens * c.rows, 1)?);
    }
    Ok(())
}
