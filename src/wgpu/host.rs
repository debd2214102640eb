//! Host-buffer entry points of the wgpu stages, behind `Backend`'s stage calls: upload the
//! inputs, record the stage, submit once, read the outputs back. Activations travel as f32
//! (the stage-level host API is f32); each call uses a fresh [`Scratch`] pool. (A layer
//! forward instead keeps everything on the device, with one pool for all its forwards.)

use crate::backend::{GateBuffers, PermuteBuffers};
use crate::config::{Activation, RoutingConfig};
use crate::cpu::expert_gemm::ExpertWeights;
use crate::error::Result;
use crate::tensor::{DType, Tensor};
use crate::wgpu::act::Act;
use crate::wgpu::expert_gemm::GpuExperts;
use crate::wgpu::scratch::Scratch;
use crate::wgpu::weights::GpuWeights;
use crate::wgpu::{
    combine, expert_gemm, gate as gate_stage, permute as permute_stage, router as router_stage,
};
use crate::wgpu::{GateGpu, GpuBuffer, PermuteGpu, WgpuDevice};

/// f32 activations as the words the shaders bind.
fn f32_words(dev: &WgpuDevice, v: &[f32], label: &str) -> Result<GpuBuffer<u32>> {
    dev.upload(&v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>(), label)
}

/// f32 activations read back from their words.
fn read_f32(dev: &WgpuDevice, buf: &GpuBuffer<u32>) -> Result<Vec<f32>> {
    Ok(dev.read(buf)?.into_iter().map(f32::from_bits).collect())
}

fn bias_buf(dev: &WgpuDevice, b: Option<&Tensor>, label: &str) -> Result<Option<GpuBuffer<f32>>> {
    b.map(|b| dev.upload(&b.to_f32_vec(), label)).transpose()
}

/// Stage 0 with host buffers.
pub fn router(
    dev: &WgpuDevice,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    logits: &mut [f32],
) -> Result<()> {
    let (t, h) = crate::shape::matrix(crate::stage::Stage::Router, "x", x)?;
    let xb = f32_words(dev, &x.to_f32_vec(), "x")?;
    let wb = GpuWeights::upload_router(dev, w, None, "router.weight")?;
    let bb = bias_buf(dev, bias, "router.bias")?;
    let out = dev.alloc_poisoned::<f32>(logits.len(), "logits")?;
    let mut enc = dev.encoder();
    let xa = Act::dense(&xb, DType::F32, t, h);
    router_stage::encode(dev, &mut enc, &Scratch::new(), xa, &wb, bb.as_ref(), &out)?;
    dev.submit_and_wait(enc)?;
    logits.copy_from_slice(&dev.read(&out)?);
    Ok(())
}

/// Stage 1 with host buffers.
pub fn gate(
    dev: &WgpuDevice,
    logits: &[f32],
    bias: Option<&Tensor>,
    cfg: &RoutingConfig,
    out: &mut GateBuffers,
) -> Result<()> {
    let lb = dev.upload(logits, "logits")?;
    let bb = bias_buf(dev, bias, "score_correction_bias")?;
    let g = GateGpu {
        topk_ids: dev.alloc_poisoned(out.tokens * out.slots, "topk_ids")?,
        topk_weights: dev.alloc_poisoned(out.tokens * out.slots, "topk_weights")?,
        kept: dev.alloc_poisoned(out.tokens * out.slots, "kept")?,
        counts: dev.alloc_poisoned(out.experts, "counts")?,
    };
    let mut enc = dev.encoder();
    gate_stage::encode(
        dev,
        &mut enc,
        &Scratch::new(),
        &lb,
        out.tokens,
        out.experts,
        bb.as_ref(),
        cfg,
        &g,
    )?;
    dev.submit_and_wait(enc)?;
    out.topk_ids.copy_from_slice(&dev.read(&g.topk_ids)?);
    out.topk_weights
        .copy_from_slice(&dev.read(&g.topk_weights)?);
    out.kept.copy_from_slice(&dev.read(&g.kept)?);
    out.counts.copy_from_slice(&dev.read(&g.counts)?);
    Ok(())
}

/// The gate's host buffers on the device.
pub fn upload_gate(dev: &WgpuDevice, g: &GateBuffers) -> Result<GateGpu> {
    Ok(GateGpu {
        topk_ids: dev.upload(&g.topk_ids, "topk_ids")?,
        topk_weights: dev.upload(&g.topk_weights, "topk_weights")?,
        kept: dev.upload(&g.kept, "kept")?,
        counts: dev.upload(&g.counts, "counts")?,
    })
}

/// Stage 2 with host buffers.
pub fn permute(
    dev: &WgpuDevice,
    gate: &GateBuffers,
    x: &Tensor,
    out: &mut PermuteBuffers,
) -> Result<()> {
    let g = upload_gate(dev, gate)?;
    let xb = f32_words(dev, &x.to_f32_vec(), "x")?;
    let n = out.tokens * out.slots;
    let p = PermuteGpu {
        expert_offsets: dev.alloc_poisoned(out.experts + 1, "expert_offsets")?,
        sorted_assignment: dev.alloc_poisoned(n, "sorted_assignment")?,
        row_of_assignment: dev.alloc_poisoned(n, "row_of_assignment")?,
        x_perm: dev.alloc_poisoned(n * out.hidden, "x_perm")?,
        dtype: DType::F32,
    };
    let mut enc = dev.encoder();
    permute_stage::encode(
        dev,
        &mut enc,
        &Scratch::new(),
        &g,
        (out.tokens, out.slots, out.experts),
        Act::dense(&xb, DType::F32, out.tokens, out.hidden),
        &p,
    )?;
    dev.submit_and_wait(enc)?;
    out.expert_offsets
        .copy_from_slice(&dev.read(&p.expert_offsets)?);
    out.sorted_assignment
        .copy_from_slice(&dev.read(&p.sorted_assignment)?);
    out.row_of_assignment
        .copy_from_slice(&dev.read(&p.row_of_assignment)?);
    out.x_perm.copy_from_slice(&read_f32(dev, &p.x_perm)?);
    Ok(())
}

/// Stage 3 with host buffers: `y` `[rows, H]` for `x_rows` `[rows, H]` and `offsets` `[E+1]`.
pub fn expert_gemm(
    dev: &WgpuDevice,
    x_rows: &[f32],
    offsets: &[u32],
    w: &ExpertWeights,
    act: Activation,
    y: &mut [f32],
) -> Result<()> {
    let experts = GpuExperts::upload(dev, w, act)?;
    let h = experts.dims.hidden;
    let rows = x_rows.len().checked_div(h).unwrap_or(0);
    let xb = f32_words(dev, x_rows, "x_rows")?;
    let ob = dev.upload(offsets, "expert_offsets")?;
    let yb = dev.alloc_poisoned::<u32>(y.len(), "y_rows")?;
    let mut enc = dev.encoder();
    expert_gemm::encode(
        dev,
        &mut enc,
        &Scratch::new(),
        Act::dense(&xb, DType::F32, rows, h),
        &ob,
        &experts,
        act,
        Act::dense(&yb, DType::F32, y.len().checked_div(h).unwrap_or(0), h),
    )?;
    dev.submit_and_wait(enc)?;
    y.copy_from_slice(&read_f32(dev, &yb)?);
    Ok(())
}

/// Stage 4 with host buffers.
pub fn combine(
    dev: &WgpuDevice,
    y_perm: &[f32],
    gate: &GateBuffers,
    perm: &PermuteBuffers,
    shared: Option<(&[f32], Option<&[f32]>)>,
    output_scale: f32,
    y: &mut [f32],
) -> Result<()> {
    let g = upload_gate(dev, gate)?;
    let (t, h) = (gate.tokens, perm.hidden);
    let yp = f32_words(dev, y_perm, "y_perm")?;
    let rows = dev.upload(&perm.row_of_assignment, "row_of_assignment")?;
    let sy = shared
        .map(|(s, _)| f32_words(dev, s, "shared"))
        .transpose()?;
    let sg = shared
        .and_then(|(_, g)| g)
        .map(|g| dev.upload(g, "shared_gate"))
        .transpose()?;
    let out = dev.alloc_poisoned::<u32>(y.len(), "y")?;
    let mut enc = dev.encoder();
    let f32_act = |b| Act::dense(b, DType::F32, t, h);
    let sh = sy.as_ref().map(|s| (f32_act(s), sg.as_ref()));
    let yp_rows = y_perm
        .len()
        .checked_div(h)
        .unwrap_or(gate.tokens * gate.slots);
    combine::encode(
        dev,
        &mut enc,
        &Scratch::new(),
        Act::dense(&yp, DType::F32, yp_rows, h),
        &g,
        &rows,
        (t, gate.slots, h),
        sh,
        output_scale,
        f32_act(&out),
    )?;
    dev.submit_and_wait(enc)?;
    y.copy_from_slice(&read_f32(dev, &out)?);
    Ok(())
}
