//! The wgpu side of an expert-parallel rank ([`RankStages`]): the stage encoders of the
//! single-device forward (`src/wgpu/device.rs`) on this rank's tokens and experts, with the
//! buffers that cross ranks staged through the host (one submission and read-back per step).
//! Every rank of an in-process world shares one device; each holds its own weights (router and
//! shared expert whole, its range of routed experts) and allocates its buffers per step. The
//! kernels, their parameters and the activation layouts are those of the single-device
//! forward, so each value is bitwise the one it computes.

use std::sync::Arc;

use crate::cpu::expert_gemm::ExpertDims;
use crate::device::GateBuffers;
use crate::ep::stages::{RankStages, RankWeights};
use crate::error::{Error, Result};
use crate::stage::Stage;
use crate::tensor::{DType, Tensor};
use crate::wgpu::act::{self, Act};
use crate::wgpu::context::index_u32;
use crate::wgpu::expert_gemm::GpuExperts;
use crate::wgpu::scratch::Scratch;
use crate::wgpu::weights::{pack_words, GpuWeights};
use crate::wgpu::{combine, expert_gemm, gate, permute, router};
use crate::wgpu::{GateGpu, GpuBuffer, PermuteGpu, WgpuDevice};

/// One rank on a (shared) wgpu device.
#[derive(Debug)]
pub(crate) struct WgpuRank {
    dev: Arc<WgpuDevice>,
    config: crate::config::LayerConfig,
    dims: ExpertDims,
    dtype: DType,
    router_w: GpuWeights,
    router_bias: Option<GpuBuffer<f32>>,
    correction_bias: Option<GpuBuffer<f32>>,
    local: Option<GpuExperts>,
    shared: Option<GpuExperts>,
    shared_gate: Option<GpuWeights>,
    /// This forward's `x` `[T_r, H]` (dense words) and T_r.
    x: Option<(GpuBuffer<u32>, usize)>,
    shared_logit: Option<GpuBuffer<f32>>,
    gate: Option<GateGpu>,
    perm: Option<PermuteGpu>,
}

impl WgpuRank {
    /// Uploads `w` to `dev`, for activations in `dtype`.
    pub fn new(dev: Arc<WgpuDevice>, w: &RankWeights, dtype: DType) -> Result<Self> {
        let d = &*dev;
        let act = w.config.activation;
        let f32_buf = |t: Option<&Tensor>, label: &str| {
            t.map(|b| d.upload(&b.to_f32_vec(), label)).transpose()
        };
        let experts = |e: &Option<crate::cpu::expert_gemm::ExpertWeights>| {
            e.as_ref()
                .map(|e| GpuExperts::upload(d, e, act))
                .transpose()
        };
        Ok(WgpuRank {
            config: w.config,
            dims: ExpertDims {
                experts: w.experts,
                hidden: w.hidden,
                ffn: 0,
            },
            dtype,
            router_w: GpuWeights::upload_router(d, &w.router_weight, None, "router.weight")?,
            router_bias: f32_buf(w.router_bias.as_ref(), "router.bias")?,
            correction_bias: f32_buf(w.correction_bias.as_ref(), "router.score_correction_bias")?,
            local: experts(&w.local)?,
            shared: experts(&w.shared)?,
            shared_gate: w
                .shared_gate
                .as_ref()
                .map(|g| GpuWeights::upload_router(d, g, None, "shared.gate.weight"))
                .transpose()?,
            x: None,
            shared_logit: None,
            gate: None,
            perm: None,
            dev,
        })
    }

    fn slots(&self) -> usize {
        self.config.routing.slots(self.dims.experts)
    }

    fn x(&self) -> Result<(&GpuBuffer<u32>, usize)> {
        self.x
            .as_ref()
            .map(|(b, t)| (b, *t))
            .ok_or_else(|| Error::Usage("expert-parallel rank: no x loaded".into()))
    }
}

impl RankStages for WgpuRank {
    fn row_words(&self) -> usize {
        act::matrix_words(1, self.dims.hidden, self.dtype)
    }

    fn router(&mut self, x: &Tensor) -> Result<Vec<f32>> {
        let d = &*self.dev;
        let (t, h, e) = (x.shape()[0], self.dims.hidden, self.dims.experts);
        let xb = d.upload(&pack_words(x, 0, x.len()), "x")?;
        let logits = d.alloc::<f32>(t * e, "logits")?;
        let scratch = Scratch::new();
        let mut enc = d.encoder();
        let xa = Act::dense(&xb, self.dtype, t, h);
        router::encode(
            d,
            &mut enc,
            &scratch,
            xa,
            &self.router_w,
            self.router_bias.as_ref(),
            &logits,
        )?;
        self.shared_logit = match &self.shared_gate {
            Some(g) => {
                let out = d.alloc::<f32>(t, "shared gate logits")?;
                router::encode(d, &mut enc, &scratch, xa, g, None, &out)?;
                Some(out)
            }
            None => None,
        };
        d.submit_and_wait(enc)?;
        let out = d.read_prefix(&logits, t * e)?;
        self.x = Some((xb, t));
        Ok(out)
    }

    fn gate(&mut self, logits: &[f32], tokens: usize) -> Result<GateBuffers> {
        let d = &*self.dev;
        let (e, slots) = (self.dims.experts, self.slots());
        let lb = d.upload(logits, "logits")?;
        let g = GateGpu::alloc(d, tokens, slots, e)?;
        let mut enc = d.encoder();
        gate::encode(
            d,
            &mut enc,
            &Scratch::new(),
            &lb,
            tokens,
            e,
            self.correction_bias.as_ref(),
            &self.config.routing,
            &g,
        )?;
        d.submit_and_wait(enc)?;
        let n = tokens * slots;
        Ok(GateBuffers {
            tokens,
            slots,
            experts: e,
            topk_ids: d.read_prefix(&g.topk_ids, n)?,
            topk_weights: d.read_prefix(&g.topk_weights, n)?,
            kept: d.read_prefix(&g.kept, n)?,
            counts: d.read_prefix(&g.counts, e)?,
        })
    }

    fn permute(&mut self, gate: &GateBuffers) -> Result<(Vec<u32>, Vec<u32>)> {
        let d = &*self.dev;
        let (xb, t) = self.x()?;
        let (e, h, slots) = (self.dims.experts, self.dims.hidden, self.slots());
        let g = crate::wgpu::host::upload_gate(d, gate)?;
        let p = PermuteGpu::alloc(d, t, slots, e, h, self.dtype)?;
        let mut enc = d.encoder();
        permute::encode(
            d,
            &mut enc,
            &Scratch::new(),
            &g,
            (t, slots, e),
            Act::dense(xb, self.dtype, t, h),
            &p,
        )?;
        d.submit_and_wait(enc)?;
        let offsets = d.read_prefix(&p.expert_offsets, e + 1)?;
        let kept = offsets.get(e).copied().unwrap_or(0) as usize;
        let rows = d.read_prefix(&p.x_perm, kept * self.row_words())?;
        self.gate = Some(g);
        self.perm = Some(p);
        Ok((offsets, rows))
    }

    fn experts(&mut self, rows: &[u32], offsets: &[u32]) -> Result<Vec<u32>> {
        let d = &*self.dev;
        let Some(w) = &self.local else {
            return match rows.is_empty() {
                true => Ok(Vec::new()),
                false => Err(Error::shape(
                    Stage::ExpertGemm,
                    "rows arrived at a rank that holds no experts",
                )),
            };
        };
        let (h, rw) = (self.dims.hidden, self.row_words());
        let n = rows.len() / rw.max(1);
        let xb = d.upload(rows, "ep rows")?;
        let ob = d.upload(offsets, "ep expert offsets")?;
        let yb = d.alloc::<u32>(n * rw, "ep expert rows")?;
        let mut enc = d.encoder();
        expert_gemm::encode(
            d,
            &mut enc,
            &Scratch::new(),
            Act::padded(&xb, self.dtype, n, h),
            &ob,
            w,
            self.config.activation,
            Act::padded(&yb, self.dtype, n, h),
        )?;
        d.submit_and_wait(enc)?;
        d.read_prefix(&yb, n * rw)
    }

    fn combine(&mut self, y_rows: &[u32]) -> Result<Vec<f32>> {
        let d = &*self.dev;
        let (xb, t) = self.x()?;
        let (h, slots, dtype) = (self.dims.hidden, self.slots(), self.dtype);
        let (Some(g), Some(p)) = (&self.gate, &self.perm) else {
            return Err(Error::Usage(
                "expert-parallel rank: combine before permute".into(),
            ));
        };
        let n = t * slots;
        // y_perm holds every row the single-device forward's does; rows past the kept ones
        // (dropped assignments) are never read.
        let mut full = y_rows.to_vec();
        full.resize(n * self.row_words(), 0);
        let yp = d.upload(&full, "y_perm")?;
        let scratch = Scratch::new();
        let mut enc = d.encoder();
        let shared_y = match &self.shared {
            Some(s) => {
                let t32 = index_u32(Stage::ExpertGemm, "T", t)?;
                let so = d.upload(&[0u32, t32], "shared offsets")?;
                let sy = d.alloc::<u32>(act::matrix_words(t, h, dtype), "shared y")?;
                expert_gemm::encode(
                    d,
                    &mut enc,
                    &scratch,
                    Act::dense(xb, dtype, t, h),
                    &so,
                    s,
                    self.config.activation,
                    Act::padded(&sy, dtype, t, h),
                )?;
                Some(sy)
            }
            None => None,
        };
        let y = d.alloc::<u32>(act::words(t * h, dtype), "y")?;
        let shared = shared_y
            .as_ref()
            .map(|s| (Act::padded(s, dtype, t, h), self.shared_logit.as_ref()));
        combine::encode(
            d,
            &mut enc,
            &scratch,
            Act::padded(&yp, dtype, n, h),
            g,
            &p.row_of_assignment,
            (t, slots, h),
            shared,
            self.config.output_scale as f32,
            Act::dense(&y, dtype, t, h),
        )?;
        d.submit_and_wait(enc)?;
        let elems = t * h;
        let words = d.read_prefix(&y, act::words(elems, dtype))?;
        Ok(act::unpack(&words, 1, elems, elems, dtype))
    }
}
