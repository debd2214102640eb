//! The two ways a prepared layer runs on wgpu: from host tensors (upload `x`, record, submit,
//! wait, read back) and device-resident, recorded into the caller's command encoder from the
//! caller's `x` buffer to its `y` buffer (the caller submits). Both record the one forward of
//! `crate::device::forward`.

use std::time::Instant;

use half::{bf16, f16};

use crate::device::{self, HostForward, Plan};
use crate::error::Result;
use crate::tensor::{DType, Tensor};
use crate::wgpu::act;
use crate::wgpu::device::{check_region, WgpuResident, WgpuStages, WgpuWorkspace};
use crate::wgpu::weights::pack_words;
use crate::wgpu::WgpuDevice;

/// One forward of the host tensor `x` (in the workspace's dtype): one submission, then `y`.
pub(crate) fn forward_host(
    dev: &WgpuDevice,
    res: &WgpuResident,
    ws: &mut WgpuWorkspace,
    plan: Plan,
    x: &Tensor,
) -> Result<HostForward> {
    let start = Instant::now();
    let elems = x.len();
    let words = pack_words(x, 0, elems);
    if !words.is_empty() {
        dev.queue
            .write_buffer(&ws.x.buffer, 0, bytemuck::cast_slice(&words));
    }
    let mut enc = dev.encoder();
    ws.timed = true;
    device::forward(&WgpuStages { dev }, &mut enc, res, ws, plan, (), ())?;
    dev.submit_and_wait(enc)?;
    let wall = start.elapsed();
    let times = match &ws.stamps {
        Some(s) => s.read(dev)?,
        None => Vec::new(),
    };
    let y = dev.read_prefix(&ws.y, act::words(elems, ws.dtype))?;
    Ok((unpack(&y, ws.dtype, elems), times, wall))
}

/// The first `n` elements of `dtype` in `words`, widened exactly to f32.
pub(crate) fn unpack(words: &[u32], dtype: DType, n: usize) -> Vec<f32> {
    let half = |i: usize| {
        let w = words[i / 2];
        if i % 2 == 0 {
            (w & 0xffff) as u16
        } else {
            (w >> 16) as u16
        }
    };
    match dtype {
        DType::F32 => words[..n].iter().map(|&w| f32::from_bits(w)).collect(),
        DType::F16 => (0..n).map(|i| f16::from_bits(half(i)).to_f32()).collect(),
        DType::BF16 => (0..n).map(|i| bf16::from_bits(half(i)).to_f32()).collect(),
    }
}

/// Records one forward of `tokens` tokens into `enc`, reading `x` `[T, H]` from the caller's
/// `(buffer, byte offset)` and writing `y` `[T, H]` to the caller's, both dense in the
/// workspace's dtype. Nothing is submitted, allocated or read back.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_device(
    dev: &WgpuDevice,
    res: &WgpuResident,
    ws: &mut WgpuWorkspace,
    plan: Plan,
    enc: &mut ::wgpu::CommandEncoder,
    x: (&::wgpu::Buffer, u64),
    y: (&::wgpu::Buffer, u64),
    hidden: usize,
) -> Result<()> {
    let bytes = 4 * act::words(plan.tokens * hidden, ws.dtype) as u64;
    let usage = ::wgpu::BufferUsages::COPY_SRC;
    check_region(dev, &ws.x.buffer, "x", x.0, x.1, bytes, usage)?;
    let usage = ::wgpu::BufferUsages::COPY_DST;
    check_region(dev, &ws.y.buffer, "y", y.0, y.1, bytes, usage)?;
    if bytes > 0 {
        enc.copy_buffer_to_buffer(x.0, x.1, &ws.x.buffer, 0, bytes);
    }
    ws.timed = false;
    device::forward(&WgpuStages { dev }, enc, res, ws, plan, (), ())?;
    if bytes > 0 {
        enc.copy_buffer_to_buffer(&ws.y.buffer, 0, y.0, y.1, bytes);
    }
    Ok(())
}
