//! A whole MoE layer on CUDA: weights uploaded once ([`CudaLayer::upload`]); each forward
//! launches every stage in order on one stream with no host synchronisation or device-to-host
//! copy inside (CUDA-graph capturable), then reads the outputs back explicitly. Per-stage GPU
//! times come from CUDA events recorded between the stages.

use std::time::{Duration, Instant};

use cudarc::driver::{sys, CudaEvent, CudaSlice};

use crate::config::LayerConfig;
use crate::cpu::expert_gemm::ExpertDims;
use crate::cuda::context::drv;
use crate::cuda::expert_gemm::CudaExperts;
use crate::cuda::{combine, expert_gemm, gate, permute, router};
use crate::cuda::{CudaDevice, CudaWeights, GateCuda, PermuteCuda};
use crate::error::Result;
use crate::layer::{ForwardOutput, MoeLayer};
use crate::stage::Stage;
use crate::tensor::Tensor;

/// A layer's weights on one CUDA device.
#[derive(Debug)]
pub struct CudaLayer {
    config: LayerConfig,
    dims: ExpertDims,
    router_w: CudaWeights,
    router_bias: Option<CudaSlice<f32>>,
    correction_bias: Option<CudaSlice<f32>>,
    experts: CudaExperts,
    shared: Option<CudaExperts>,
    shared_gate: Option<CudaWeights>,
}

/// Every device buffer of one forward.
pub struct ForwardBuffers {
    pub tokens: usize,
    pub x: CudaSlice<f32>,
    pub logits: CudaSlice<f32>,
    pub shared_logit: Option<CudaSlice<f32>>,
    pub gate: GateCuda,
    pub perm: PermuteCuda,
    pub y_perm: CudaSlice<f32>,
    pub shared_y: Option<CudaSlice<f32>>,
    pub shared_offsets: CudaSlice<u32>,
    pub y: CudaSlice<f32>,
}

impl CudaLayer {
    /// Uploads every weight of `layer` (validated already by [`MoeLayer`]).
    pub fn upload(dev: &CudaDevice, layer: &MoeLayer) -> Result<Self> {
        let act = layer.config.activation;
        let f32_buf =
            |t: &Option<Tensor>| t.as_ref().map(|b| dev.upload(&b.to_f32_vec())).transpose();
        Ok(CudaLayer {
            config: layer.config,
            dims: layer.dims(),
            router_w: CudaWeights::upload(dev, &layer.router_weight)?,
            router_bias: f32_buf(&layer.router_bias)?,
            correction_bias: f32_buf(&layer.score_correction_bias)?,
            experts: CudaExperts::upload(dev, &layer.experts, act)?,
            shared: layer
                .shared
                .as_ref()
                .map(|s| CudaExperts::upload(dev, &s.weights, act))
                .transpose()?,
            shared_gate: layer
                .shared
                .as_ref()
                .and_then(|s| s.gate.as_ref())
                .map(|g| CudaWeights::upload(dev, g))
                .transpose()?,
        })
    }

    /// Device buffers for a forward of `x` `[T, H]` (x uploaded).
    pub fn buffers(&self, dev: &CudaDevice, x: &Tensor) -> Result<ForwardBuffers> {
        let (e, h) = (self.dims.experts, self.dims.hidden);
        let t = x.shape()[0];
        let slots = self.config.routing.slots(e);
        Ok(ForwardBuffers {
            tokens: t,
            x: dev.upload(&x.to_f32_vec())?,
            logits: dev.alloc(t * e)?,
            shared_logit: self
                .shared_gate
                .as_ref()
                .map(|_| dev.alloc(t))
                .transpose()?,
            gate: GateCuda::alloc(dev, t, slots, e)?,
            perm: PermuteCuda::alloc(dev, t, slots, e, h)?,
            y_perm: dev.alloc(t * slots * h)?,
            shared_y: self.shared.as_ref().map(|_| dev.alloc(t * h)).transpose()?,
            shared_offsets: dev.upload(&[0u32, t as u32])?,
            y: dev.alloc(t * h)?,
        })
    }

    /// Launches the whole forward on the stream: no synchronisation, no copies, so it can be
    /// captured in a CUDA graph. `events`, when given, are recorded before and after each stage.
    pub fn launch(
        &self,
        dev: &CudaDevice,
        b: &mut ForwardBuffers,
        events: Option<&[CudaEvent]>,
    ) -> Result<()> {
        let (e, h) = (self.dims.experts, self.dims.hidden);
        let t = b.tokens;
        let r = &self.config.routing;
        let slots = r.slots(e);
        let act = self.config.activation;
        let mark = |i: usize| -> Result<()> {
            if let Some(ev) = events {
                drv(ev[i].record(&dev.stream), "recording an event")?;
            }
            Ok(())
        };
        mark(0)?;
        router::launch(
            dev,
            &b.x,
            t,
            &self.router_w,
            self.router_bias.as_ref(),
            &mut b.logits,
        )?;
        if let (Some(gw), Some(out)) = (&self.shared_gate, b.shared_logit.as_mut()) {
            router::launch(dev, &b.x, t, gw, None, out)?;
        }
        mark(1)?;
        gate::launch(
            dev,
            &b.logits,
            t,
            e,
            self.correction_bias.as_ref(),
            r,
            &mut b.gate,
        )?;
        mark(2)?;
        permute::launch(dev, &b.gate, (t, slots, e), &b.x, h, &mut b.perm)?;
        mark(3)?;
        expert_gemm::launch(
            dev,
            &b.perm.x_perm,
            t * slots,
            &b.perm.expert_offsets,
            &self.experts,
            act,
            &mut b.y_perm,
        )?;
        if let (Some(s), Some(out)) = (&self.shared, b.shared_y.as_mut()) {
            expert_gemm::launch(dev, &b.x, t, &b.shared_offsets, s, act, out)?;
        }
        mark(4)?;
        let sh = b.shared_y.as_ref().map(|s| (s, b.shared_logit.as_ref()));
        combine::launch(
            dev,
            &b.y_perm,
            &b.gate,
            &b.perm.row_of_assignment,
            (t, slots, h),
            sh,
            self.config.output_scale as f32,
            &mut b.y,
        )?;
        mark(5)
    }

    /// One forward of `x` `[T, H]`: launches, then explicit read-backs.
    pub fn forward(&self, dev: &CudaDevice, x: &Tensor) -> Result<ForwardOutput> {
        let start = Instant::now();
        let mut b = self.buffers(dev, x)?;
        let events: Vec<CudaEvent> = (0..6)
            .map(|_| {
                drv(
                    dev.ctx
                        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)),
                    "creating an event",
                )
            })
            .collect::<Result<_>>()?;
        self.launch(dev, &mut b, Some(&events))?;
        dev.sync()?;
        let wall = start.elapsed();
        let mut stage_times = Vec::with_capacity(5);
        for (i, &s) in Stage::ALL.iter().enumerate() {
            let ms = drv(events[i].elapsed_ms(&events[i + 1]), "reading an event")?;
            stage_times.push((s, Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3)));
        }
        let t = b.tokens;
        let slots = self.config.routing.slots(self.dims.experts);
        let n = t * slots;
        Ok(ForwardOutput {
            tokens: t,
            hidden: self.dims.hidden,
            slots,
            y: dev.read(&b.y, t * self.dims.hidden)?,
            topk_ids: dev.read(&b.gate.topk_ids, n)?,
            topk_weights: dev.read(&b.gate.topk_weights, n)?,
            kept: dev.read(&b.gate.kept, n)?,
            counts: dev.read(&b.gate.counts, self.dims.experts)?,
            stage_times,
            wall_time: wall,
        })
    }
}
