//! The ways a prepared layer runs on CUDA: from host tensors (upload `x` into the workspace,
//! launch, wait, read back), on the caller's device views (`CudaView` / `CudaViewMut`,
//! enqueued on the backend's stream, no synchronisation), and on raw device pointers. All
//! launch the one forward of `crate::device::forward`.

use std::time::Instant;

use crate::cuda::act::{ActView, ActViewMut};
use crate::cuda::device::{CudaResident, CudaStages, CudaWorkspace};
use crate::cuda::CudaDevice;
use crate::device::{self, HostForward, Plan};
use crate::error::Result;
use crate::tensor::{DType, Tensor, TensorData};

/// One forward of the host tensor `x` (in the workspace's dtype): upload, launch, wait, `y`.
pub(crate) fn forward_host(
    dev: &CudaDevice,
    res: &CudaResident,
    ws: &mut CudaWorkspace,
    plan: Plan,
    x: &Tensor,
) -> Result<HostForward> {
    let start = Instant::now();
    let dtype = ws.dtype;
    let bytes = x.len() * dtype.size();
    let raw: Vec<u8> = match x.data() {
        TensorData::F32(v) => bytemuck::cast_slice(v).to_vec(),
        TensorData::F16(v) => bytemuck::cast_slice(v).to_vec(),
        TensorData::BF16(v) => bytemuck::cast_slice(v).to_vec(),
    };
    if bytes > 0 {
        let mut dst = ws.x.slice_mut(0..bytes);
        crate::cuda::context::drv(dev.stream.memcpy_htod(&raw, &mut dst), "uploading x")?;
    }
    // The workspace's own x and y: moved out for the forward, which borrows the rest.
    let xbuf = std::mem::replace(&mut ws.x, dev.alloc(0)?);
    let mut ybuf = std::mem::replace(&mut ws.y, dev.alloc(0)?);
    let run = {
        let xv = ActView {
            bytes: xbuf.slice(0..bytes),
            dtype,
        };
        let yv = ActViewMut {
            bytes: ybuf.slice_mut(0..bytes),
            dtype,
        };
        ws.timed = true;
        device::forward(&CudaStages { dev }, &mut (), res, ws, plan, &xv, yv)
    };
    ws.x = xbuf;
    ws.y = ybuf;
    run?;
    dev.sync()?;
    let wall = start.elapsed();
    let times = ws.stage_times()?.unwrap_or_default();
    let raw = dev.read(&ws.y, bytes)?;
    Ok((widen(&raw, dtype), times, wall))
}

/// Little-endian elements of `dtype` widened exactly to f32.
fn widen(raw: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => raw
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// One forward on the caller's activation views, enqueued on the backend's stream.
pub(crate) fn forward_device(
    dev: &CudaDevice,
    res: &CudaResident,
    ws: &mut CudaWorkspace,
    plan: Plan,
    x: &ActView<'_>,
    y: ActViewMut<'_>,
) -> Result<()> {
    ws.timed = false;
    device::forward(&CudaStages { dev }, &mut (), res, ws, plan, x, y)
}
