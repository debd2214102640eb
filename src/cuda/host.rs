//! Host-buffer entry points of the CUDA stages, behind `Backend`'s stage calls: upload the
//! inputs, launch the stage, read the outputs back (explicit synchronisation). Outputs are
//! poisoned first (0xFF bytes: NaN / `u32::MAX`) so an unwritten element fails the tests.
//! Host data is f32, so activations travel as f32 device buffers viewed as bytes
//! ([`ActView::of_f32`]); scratch buffers are allocated per call here (the layer forward
//! allocates them once instead).
//! A layer forward instead stays on the device: see `crate::cuda::device`.

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use crate::backend::{GateBuffers, PermuteBuffers};
use crate::config::{Activation, RoutingConfig};
use crate::cpu::expert_gemm::ExpertWeights;
use crate::cuda::act::{ActView, ActViewMut};
use crate::cuda::expert_gemm::CudaExperts;
use crate::cuda::gate::GateScratchCuda;
use crate::cuda::permute::PermuteScratchCuda;
use crate::cuda::{
    combine, expert_gemm, gate as gate_stage, permute as permute_stage, router as router_stage,
};
use crate::cuda::{CudaDevice, CudaWeights, GateCuda, PermuteCuda};
use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// A device buffer of `n` elements with every byte 0xFF.
fn poisoned<T: DeviceRepr + ValidAsZeroBits + Clone + Default + bytemuck::Pod>(
    dev: &CudaDevice,
    n: usize,
) -> Result<CudaSlice<T>> {
    let bytes = vec![0xFFu8; n.max(1) * std::mem::size_of::<T>()];
    dev.upload(&bytemuck::pod_collect_to_vec::<u8, T>(&bytes))
}

fn bias(dev: &CudaDevice, b: Option<&Tensor>) -> Result<Option<CudaSlice<f32>>> {
    b.map(|b| dev.upload(&b.to_f32_vec())).transpose()
}

/// Stage 0 with host buffers.
pub fn router(
    dev: &CudaDevice,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    logits: &mut [f32],
) -> Result<()> {
    let xb = dev.upload(&x.to_f32_vec())?;
    let wb = CudaWeights::upload(dev, w)?;
    let bb = bias(dev, b)?;
    let mut out = poisoned::<f32>(dev, logits.len())?;
    let xv = ActView::of_f32(&xb)?;
    router_stage::launch(dev, &xv, x.shape()[0], &wb, bb.as_ref(), &mut out)?;
    logits.copy_from_slice(&dev.read(&out, logits.len())?);
    Ok(())
}

/// Stage 1 with host buffers.
pub fn gate(
    dev: &CudaDevice,
    logits: &[f32],
    b: Option<&Tensor>,
    cfg: &RoutingConfig,
    out: &mut GateBuffers,
) -> Result<()> {
    let lb = dev.upload(logits)?;
    let bb = bias(dev, b)?;
    let n = out.tokens * out.slots;
    let mut g = GateCuda {
        topk_ids: poisoned(dev, n)?,
        topk_weights: poisoned(dev, n)?,
        kept: poisoned(dev, n)?,
        counts: poisoned(dev, out.experts)?,
    };
    let mut scratch = GateScratchCuda::alloc(dev, out.tokens, out.experts, cfg)?;
    gate_stage::launch(
        dev,
        &lb,
        out.tokens,
        out.experts,
        bb.as_ref(),
        cfg,
        &mut g,
        &mut scratch,
    )?;
    out.topk_ids.copy_from_slice(&dev.read(&g.topk_ids, n)?);
    out.topk_weights
        .copy_from_slice(&dev.read(&g.topk_weights, n)?);
    out.kept.copy_from_slice(&dev.read(&g.kept, n)?);
    out.counts
        .copy_from_slice(&dev.read(&g.counts, out.experts)?);
    Ok(())
}

/// The gate's host buffers on the device.
pub fn upload_gate(dev: &CudaDevice, g: &GateBuffers) -> Result<GateCuda> {
    Ok(GateCuda {
        topk_ids: dev.upload(&g.topk_ids)?,
        topk_weights: dev.upload(&g.topk_weights)?,
        kept: dev.upload(&g.kept)?,
        counts: dev.upload(&g.counts)?,
    })
}

/// Stage 2 with host buffers.
pub fn permute(
    dev: &CudaDevice,
    gate: &GateBuffers,
    x: &Tensor,
    out: &mut PermuteBuffers,
) -> Result<()> {
    let g = upload_gate(dev, gate)?;
    let xb = dev.upload(&x.to_f32_vec())?;
    let n = out.tokens * out.slots;
    let mut p = PermuteCuda {
        expert_offsets: poisoned(dev, out.experts + 1)?,
        sorted_assignment: poisoned(dev, n)?,
        row_of_assignment: poisoned(dev, n)?,
        x_perm: poisoned(dev, n * out.hidden * 4)?,
        dtype: DType::F32,
    };
    let mut scratch = PermuteScratchCuda::alloc(dev, out.tokens, out.slots, out.experts)?;
    permute_stage::launch(
        dev,
        &g,
        (out.tokens, out.slots, out.experts),
        &ActView::of_f32(&xb)?,
        out.hidden,
        &mut p,
        &mut scratch,
    )?;
    out.expert_offsets
        .copy_from_slice(&dev.read(&p.expert_offsets, out.experts + 1)?);
    out.sorted_assignment
        .copy_from_slice(&dev.read(&p.sorted_assignment, n)?);
    out.row_of_assignment
        .copy_from_slice(&dev.read(&p.row_of_assignment, n)?);
    let x_perm = dev.read(&p.x_perm, n * out.hidden * 4)?;
    out.x_perm
        .copy_from_slice(&bytemuck::pod_collect_to_vec::<u8, f32>(&x_perm));
    Ok(())
}

/// Stage 3 with host buffers: `y` `[rows, H]` for `x_rows` `[rows, H]` and `offsets` `[E+1]`.
pub fn expert_gemm(
    dev: &CudaDevice,
    x_rows: &[f32],
    offsets: &[u32],
    w: &ExpertWeights,
    act: Activation,
    y: &mut [f32],
) -> Result<()> {
    let experts = CudaExperts::upload(dev, w, act)?;
    let rows = x_rows.len().checked_div(experts.dims.hidden).unwrap_or(0);
    let xb = dev.upload(x_rows)?;
    let ob = dev.upload(offsets)?;
    let mut hb = poisoned::<f32>(dev, rows * experts.dims.ffn)?;
    let mut yb = poisoned::<f32>(dev, y.len())?;
    expert_gemm::launch(
        dev,
        &ActView::of_f32(&xb)?,
        rows,
        &ob,
        &experts,
        act,
        &mut ActViewMut::of_f32(&mut hb)?,
        &mut ActViewMut::of_f32(&mut yb)?,
    )?;
    y.copy_from_slice(&dev.read(&yb, y.len())?);
    Ok(())
}

/// Stage 4 with host buffers.
pub fn combine(
    dev: &CudaDevice,
    y_perm: &[f32],
    gate: &GateBuffers,
    perm: &PermuteBuffers,
    shared: Option<(&[f32], Option<&[f32]>)>,
    output_scale: f32,
    y: &mut [f32],
) -> Result<()> {
    let g = upload_gate(dev, gate)?;
    let yp = dev.upload(y_perm)?;
    let rows = dev.upload(&perm.row_of_assignment)?;
    let sy = shared.map(|(s, _)| dev.upload(s)).transpose()?;
    let sg = shared
        .and_then(|(_, g)| g)
        .map(|g| dev.upload(g))
        .transpose()?;
    let mut out = poisoned::<f32>(dev, y.len())?;
    let syv = sy.as_ref().map(ActView::of_f32).transpose()?;
    let sh = syv.as_ref().map(|s| (s, sg.as_ref()));
    combine::launch(
        dev,
        &ActView::of_f32(&yp)?,
        &g,
        &rows,
        (gate.tokens, gate.slots, perm.hidden),
        sh,
        output_scale,
        &mut ActViewMut::of_f32(&mut out)?,
    )?;
    y.copy_from_slice(&dev.read(&out, y.len())?);
    Ok(())
}
