//! The CPU backend's side of the one forward ([`crate::device::forward`]): each step runs the
//! f64 reference of its stage and stores its result as a GPU stores it, in f32 for logits and
//! routing and in the activation dtype for `x_perm`, `h`, `y_perm`, the shared expert and `y`.

use std::time::Instant;

use crate::config::LayerConfig;
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
        let logits = cpu::router::router_logits(x, &res.router_weight, res.router_bias.as_ref())?;
        store(DType::F32, &logits, &mut ws.logits);
        Ok(())
    }

    fn shared_gate(
        &self,
        _: &mut (),
        res: &CpuResident,
        ws: &mut CpuWorkspace,
        x: &Tensor,
        _t: usize,
    ) -> Result<()> {
        if let Some(g) = &res.shared_gate {
            let logit = cpu::router::router_logits(x, g, None)?;
            store(DType::F32, &logit, &mut ws.shared_logit);
        }
        Ok(())
    }

    fn gate(&self, _: &mut (), res: &CpuResident, ws: &mut CpuWorkspace, t: usize) -> Result<()> {
        let e = res.dims.experts;
        let l: Vec<f64> = ws.logits.iter().map(|&v| f64::from(v)).collect();
        let bias = res.correction_bias.as_ref().map(Tensor::to_f64_vec);
        let r = cpu::gate::gate(&l, t, e, bias.as_deref(), &config(res).routing)?;
        let g = &mut ws.gate;
        *g = GateBuffers::poisoned(t, r.slots, e);
        g.topk_ids.copy_from_slice(&r.topk_ids);
        for (d, &s) in g.topk_weights.iter_mut().zip(&r.topk_weights) {
            *d = s as f32;
        }
        for (k, &b) in g.kept.iter_mut().zip(&r.kept) {
            *k = u32::from(b);
        }
        g.counts.copy_from_slice(&r.counts);
        Ok(())
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
        let g = &ws.gate;
        let kept: Vec<bool> = g.kept.iter().map(|&k| k != 0).collect();
        let p = cpu::permute::permute(&g.topk_ids, &kept, d.experts)?;
        let xp = cpu::permute::gather(x, g.slots, &p)?;
        let mut out = PermuteBuffers::poisoned(t, g.slots, d.experts, d.hidden);
        out.expert_offsets = p.expert_offsets;
        out.sorted_assignment = p.sorted_assignment;
        out.row_of_assignment = p.row_of_assignment;
        // x holds values of the activation dtype already: the gather copies them exactly.
        store(ws.dtype, &xp, &mut out.x_perm);
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
        let dtype = ws.dtype;
        let xp: Vec<f64> = ws.perm.x_perm.iter().map(|&v| f64::from(v)).collect();
        let y = cpu::expert_gemm::expert_ffn_stored(
            &xp,
            &ws.perm.expert_offsets,
            &res.experts,
            config(res).activation,
            |v| dtype.round(v),
        )?;
        store(dtype, &y, &mut ws.y_perm);
        Ok(())
    }

    fn shared(
        &self,
        _: &mut (),
        res: &CpuResident,
        ws: &mut CpuWorkspace,
        x: &Tensor,
        _t: usize,
    ) -> Result<()> {
        let dtype = ws.dtype;
        if let Some(s) = &res.shared {
            let y = cpu::expert_gemm::shared_ffn_stored(x, s, config(res).activation, |v| {
                dtype.round(v)
            })?;
            store(dtype, &y, &mut ws.shared_y);
        }
        Ok(())
    }

    fn combine(
        &self,
        _: &mut (),
        res: &CpuResident,
        ws: &mut CpuWorkspace,
        _t: usize,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        let wide = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
        let has_shared = res.shared.is_some();
        let has_gate = res.shared_gate.is_some();
        let yp = wide(&ws.y_perm);
        let w = wide(&ws.gate.topk_weights);
        let kept: Vec<bool> = ws.gate.kept.iter().map(|&k| k != 0).collect();
        let sy = has_shared.then(|| wide(&ws.shared_y));
        let sg = has_gate.then(|| wide(&ws.shared_logit));
        let shared_in = sy.as_deref().map(|y| SharedInput {
            y,
            gate_logits: sg.as_deref(),
        });
        let a = Assignments {
            slots: ws.gate.slots,
            weights: &w,
            kept: &kept,
            row_of_assignment: &ws.perm.row_of_assignment,
        };
        let out = cpu::combine::combine(
            &yp,
            res.dims.hidden,
            a,
            shared_in,
            f64::from(config(res).output_scale as f32),
        )?;
        store(ws.dtype, &out, y);
        Ok(())
    }
}
