//! The CPU backend's side of the one forward ([`crate::device::forward`]): each step runs the
//! f64 reference of its stage and stores its result as a GPU stores it, in f32 for logits and
//! routing and in the activation dtype for `x_perm`, `h`, `y_perm`, the shared expert and `y`.

use web_time::Instant;

use crate::config::{LayerConfig, RoutingConfig};
use crate::cpu;
use crate::cpu::combine::{Assignments, SharedInput};
use crate::cpu::expert_gemm::{ExpertDims, ExpertWeights};
use crate::device::{GateBuffers, LayerWeights, PermuteBuffers, Stages};
use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// The CPU computes on the host.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuStages;

/// The layer as the CPU holds it: an owned copy of its weights.
#[derive(Debug)]
pub(crate) struct CpuResident {
    config: LayerConfig,
    dims: ExpertDims,
    router_weight: Tensor,
    router_bias: Option<Tensor>,
    correction_bias: Option<Tensor>,
    experts: ExpertWeights,
    shared: Option<ExpertWeights>,
    shared_gate: Option<Tensor>,
}

impl CpuResident {
    /// An owned copy of `w` (so the caller's host copy may be dropped).
    pub fn new(w: &LayerWeights<'_>) -> Self {
        CpuResident {
            config: *w.config,
            dims: w.dims,
            router_weight: w.router_weight.clone(),
            router_bias: w.router_bias.cloned(),
            correction_bias: w.correction_bias.cloned(),
            experts: w.experts.clone(),
            shared: w.shared.cloned(),
            shared_gate: w.shared_gate.cloned(),
        }
    }
}

/// Host buffers of one forward, reused between forwards.
#[derive(Debug)]
pub(crate) struct CpuWorkspace {
    pub dtype: DType,
    pub logits: Vec<f32>,
    pub shared_logit: Vec<f32>,
    pub gate: GateBuffers,
    pub perm: PermuteBuffers,
    /// `[T·slots, H]`, values of the activation dtype.
    pub y_perm: Vec<f32>,
    /// `[T, H]`, values of the activation dtype.
    pub shared_y: Vec<f32>,
    /// Host time at each stage boundary of the last forward.
    pub marks: [Option<Instant>; 6],
}

impl CpuWorkspace {
    pub fn new(dtype: DType, res: &CpuResident) -> Self {
        let d = res.dims;
        let slots = res.config.routing.slots(d.experts);
        CpuWorkspace {
            dtype,
            logits: Vec::new(),
            shared_logit: Vec::new(),
            gate: GateBuffers::poisoned(0, slots, d.experts),
            perm: PermuteBuffers::poisoned(0, slots, d.experts, d.hidden),
            y_perm: Vec::new(),
            shared_y: Vec::new(),
            marks: [None; 6],
        }
    }
}

/// `src` rounded into `dst` as `dtype` stores it.
fn store(dtype: DType, src: &[f64], dst: &mut Vec<f32>) {
    dst.clear();
    dst.extend(src.iter().map(|&v| dtype.round(v) as f32));
}

/// Stage 1 on the CPU: the routing of `logits` `[T, E]` written into `out` (sized for it),
/// weights stored in f32. Shared by [`CpuStages`] and `Backend::gate`.
pub(crate) fn gate_into(
    logits: &[f32],
    correction_bias: Option<&Tensor>,
    cfg: &RoutingConfig,
    out: &mut GateBuffers,
) -> Result<()> {
    let l: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
    let bias = correction_bias.map(Tensor::to_f64_vec);
    let r = cpu::gate::gate(&l, out.tokens, out.experts, bias.as_deref(), cfg)?;
    out.topk_ids.copy_from_slice(&r.topk_ids);
    for (d, &w) in out.topk_weights.iter_mut().zip(&r.topk_weights) {
        *d = w as f32;
    }
    for (k, &b) in out.kept.iter_mut().zip(&r.kept) {
        *k = u32::from(b);
    }
    out.counts.copy_from_slice(&r.counts);
    Ok(())
}

/// Stage 2 on the CPU: the permutation of `gate`'s assignments and the gathered rows of `x`
/// (values of `dtype` already, so the gather copies them exactly), written into `out`.
/// Shared by [`CpuStages`] and `Backend::permute`.
pub(crate) fn permute_into(
    gate: &GateBuffers,
    x: &Tensor,
    dtype: DType,
    out: &mut PermuteBuffers,
) -> Result<()> {
    let kept: Vec<bool> = gate.kept.iter().map(|&k| k != 0).collect();
    let p = cpu::permute::permute(&gate.topk_ids, &kept, gate.experts)?;
    let xp = cpu::permute::gather(x, gate.slots, &p)?;
    out.expert_offsets = p.expert_offsets;
    out.sorted_assignment = p.sorted_assignment;
    out.row_of_assignment = p.row_of_assignment;
    store(dtype, &xp, &mut out.x_perm);
    Ok(())
}

/// Stage 4 on the CPU in f64: `y` `[T, H]` from `y_perm`, `gate`'s weights and kept flags, the
/// rows of each assignment and the shared expert `(output [T, H], gate logits [T])`. Shared by
/// [`CpuStages`] and `Backend::combine`.
pub(crate) fn combine_f64(
    y_perm: &[f32],
    gate: &GateBuffers,
    row_of_assignment: &[u32],
    hidden: usize,
    shared: Option<(&[f32], Option<&[f32]>)>,
    output_scale: f64,
) -> Result<Vec<f64>> {
    let wide = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    let yp = wide(y_perm);
    let w = wide(&gate.topk_weights);
    let kept: Vec<bool> = gate.kept.iter().map(|&k| k != 0).collect();
    let sy = shared.map(|(s, _)| wide(s));
    let sg = shared.and_then(|(_, g)| g.map(wide));
    let shared_in = sy.as_deref().map(|y| SharedInput {
        y,
        gate_logits: sg.as_deref(),
    });
    let a = Assignments {
        slots: gate.slots,
        weights: &w,
        kept: &kept,
        row_of_assignment,
    };
    cpu::combine::combine(&yp, hidden, a, shared_in, output_scale)
}

/// Stage 0 on the CPU: `x · wᵀ (+ bias)` stored in f32 into `out`. Shared by [`CpuStages`]
/// and the expert-parallel ranks.
pub(crate) fn router_into(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out: &mut Vec<f32>,
) -> Result<()> {
    let logits = cpu::router::router_logits(x, w, bias)?;
    store(DType::F32, &logits, out);
    Ok(())
}

/// Stage 3 on the CPU: the experts of `w` on `x_perm` (values of `dtype`) grouped by
/// `expert_offsets`, `h` and the output stored in `dtype`, into `out`. Shared by
/// [`CpuStages`] and the expert-parallel ranks.
pub(crate) fn experts_into(
    x_perm: &[f32],
    expert_offsets: &[u32],
    w: &ExpertWeights,
    act: crate::config::Activation,
    dtype: DType,
    out: &mut Vec<f32>,
) -> Result<()> {
    let xp: Vec<f64> = x_perm.iter().map(|&v| f64::from(v)).collect();
    let y = cpu::expert_gemm::expert_ffn_stored(&xp, expert_offsets, w, act, |v| dtype.round(v))?;
    store(dtype, &y, out);
    Ok(())
}

/// Stage 3 on the CPU, shared expert: `s` on every token of `x`, stored in `dtype` into
/// `out`. Shared by [`CpuStages`] and the expert-parallel ranks.
pub(crate) fn shared_into(
    x: &Tensor,
    s: &ExpertWeights,
    act: crate::config::Activation,
    dtype: DType,
    out: &mut Vec<f32>,
) -> Result<()> {
    let y = cpu::expert_gemm::shared_ffn_stored(x, s, act, |v| dtype.round(v))?;
    store(dtype, &y, out);
    Ok(())
}

/// Stage 4 on the CPU: [`combine_f64`] with the output scale as the GPUs take it (f32),
/// stored in `dtype` into `y`. Shared by [`CpuStages`] and the expert-parallel ranks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn combine_into(
    y_perm: &[f32],
    gate: &GateBuffers,
    row_of_assignment: &[u32],
    hidden: usize,
    shared: Option<(&[f32], Option<&[f32]>)>,
    output_scale: f64,
    dtype: DType,
    y: &mut Vec<f32>,
) -> Result<()> {
    let out = combine_f64(
        y_perm,
        gate,
        row_of_assignment,
        hidden,
        shared,
        f64::from(output_scale as f32),
    )?;
    store(dtype, &out, y);
    Ok(())
}

fn config(res: &CpuResident) -> &LayerConfig {
    &res.config
}

impl Stages for CpuStages {
    type Resident = CpuResident;
    type Workspace = CpuWorkspace;
    type Rec = ();
    type In<'a> = &'a Tensor;
    type Out<'a> = &'a mut Vec<f32>;

    fn mark(&self, _: &mut (), ws: &mut CpuWorkspace, i: usize) -> Result<()> {
        ws.marks[i] = Some(Instant::now());
        Ok(())
    }

    fn router(
        &self,
        _: &mut (),
        res: &CpuResident,
        ws: &mut CpuWorkspace,
        x: &Tensor,
        _t: usize,
    ) -> Result<()> {
        router_into(
            x,
            &res.router_weight,
            res.router_bias.as_ref(),
            &mut ws.logits,
        )
    }

    fn shared_gate(
        &self,
        _: &mut (),
        res: &CpuResident,
        ws: &mut CpuWorkspace,
        x: &Tensor,
        _t: usize,
    ) -> Result<()> {
        match &res.shared_gate {
            Some(g) => router_into(x, g, None, &mut ws.shared_logit),
            None => Ok(()),
        }
    }

    fn gate(&self, _: &mut (), res: &CpuResident, ws: &mut CpuWorkspace, t: usize) -> Result<()> {
        let e = res.dims.experts;
        let cfg = &config(res).routing;
        ws.gate = GateBuffers::poisoned(t, cfg.slots(e), e);
        gate_into(&ws.logits, res.correction_bias.as_ref(), cfg, &mut ws.gate)
    }

    fn permute(
        &self,
        _: &mut (),
        res: &CpuResident,
        ws: &mut CpuWorkspace,
        x: &Tensor,
        t: usize,
    ) -> Result<()> {
        let d = res.dims;
        let mut out = PermuteBuffers::poisoned(t, ws.gate.slots, d.experts, d.hidden);
        permute_into(&ws.gate, x, ws.dtype, &mut out)?;
        ws.perm = out;
        Ok(())
    }

    fn experts(
        &self,
        _: &mut (),
        res: &CpuResident,
        ws: &mut CpuWorkspace,
        _t: usize,
    ) -> Result<()> {
        experts_into(
            &ws.perm.x_perm,
            &ws.perm.expert_offsets,
            &res.experts,
            config(res).activation,
            ws.dtype,
            &mut ws.y_perm,
        )
    }

    fn shared(
        &self,
        _: &mut (),
        res: &CpuResident,
        ws: &mut CpuWorkspace,
        x: &Tensor,
        _t: usize,
    ) -> Result<()> {
        match &res.shared {
            Some(s) => shared_into(x, s, config(res).activation, ws.dtype, &mut ws.shared_y),
            None => Ok(()),
        }
    }

    fn combine(
        &self,
        _: &mut (),
        res: &CpuResident,
        ws: &mut CpuWorkspace,
        _t: usize,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        let shared = res.shared.is_some().then(|| {
            let gate = res
                .shared_gate
                .is_some()
                .then_some(ws.shared_logit.as_slice());
            (ws.shared_y.as_slice(), gate)
        });
        combine_into(
            &ws.y_perm,
            &ws.gate,
            &ws.perm.row_of_assignment,
            res.dims.hidden,
            shared,
            config(res).output_scale,
            ws.dtype,
            y,
        )
    }
}
