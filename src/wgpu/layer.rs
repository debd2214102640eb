//! A whole MoE layer on wgpu: weights uploaded once ([`WgpuLayer::upload`]), then each forward
//! records every stage into one command encoder and submits once, with no read-back inside.
//! Outputs are read back afterwards, explicitly. Per-stage GPU times come from timestamp
//! queries between the stages when the adapter offers them.

use std::time::{Duration, Instant};

use crate::config::LayerConfig;
use crate::cpu::expert_gemm::ExpertDims;
use crate::error::Result;
use crate::layer::{ForwardOutput, MoeLayer};
use crate::stage::Stage;
use crate::tensor::Tensor;
use crate::wgpu::context::gpu_err;
use crate::wgpu::expert_gemm::GpuExperts;
use crate::wgpu::weights::GpuWeights;
use crate::wgpu::{combine, expert_gemm, gate, permute, router};
use crate::wgpu::{GateGpu, GpuBuffer, PermuteGpu, WgpuDevice};

/// A layer's weights on one wgpu device.
#[derive(Debug)]
pub struct WgpuLayer {
    config: LayerConfig,
    dims: ExpertDims,
    router_w: GpuWeights,
    router_bias: Option<GpuBuffer<f32>>,
    correction_bias: Option<GpuBuffer<f32>>,
    experts: GpuExperts,
    shared: Option<GpuExperts>,
    shared_gate: Option<GpuWeights>,
}

impl WgpuLayer {
    /// Uploads every weight of `layer` (validated already by [`MoeLayer`]).
    pub fn upload(dev: &WgpuDevice, layer: &MoeLayer) -> Result<Self> {
        let act = layer.config.activation;
        Ok(WgpuLayer {
            config: layer.config,
            dims: layer.dims(),
            router_w: GpuWeights::upload(dev, &layer.router_weight, None, "router.weight")?,
            router_bias: layer
                .router_bias
                .as_ref()
                .map(|b| dev.upload(&b.to_f32_vec(), "router.bias"))
                .transpose()?,
            correction_bias: layer
                .score_correction_bias
                .as_ref()
                .map(|b| dev.upload(&b.to_f32_vec(), "router.score_correction_bias"))
                .transpose()?,
            experts: GpuExperts::upload(dev, &layer.experts, act)?,
            shared: layer
                .shared
                .as_ref()
                .map(|s| GpuExperts::upload(dev, &s.weights, act))
                .transpose()?,
            shared_gate: layer
                .shared
                .as_ref()
                .and_then(|s| s.gate.as_ref())
                .map(|g| GpuWeights::upload(dev, g, None, "shared.gate.weight"))
                .transpose()?,
        })
    }

    /// One forward of `x` `[T, H]`: one submission, then explicit read-backs.
    pub fn forward(&self, dev: &WgpuDevice, x: &Tensor) -> Result<ForwardOutput> {
        let (e, h) = (self.dims.experts, self.dims.hidden);
        let t = x.shape()[0];
        let r = &self.config.routing;
        let slots = r.slots(e);
        let start = Instant::now();

        let xb = dev.upload(&x.to_f32_vec(), "x")?;
        let logits = dev.alloc::<f32>(t * e, "logits")?;
        let shared_logit = match &self.shared_gate {
            Some(_) => Some(dev.alloc::<f32>(t, "shared gate logits")?),
            None => None,
        };
        let g = GateGpu::alloc(dev, t, slots, e)?;
        let p = PermuteGpu::alloc(dev, t, slots, e, h)?;
        let y_perm = dev.alloc::<f32>(t * slots * h, "y_perm")?;
        let shared_y = match &self.shared {
            Some(_) => Some(dev.alloc::<f32>(t * h, "shared y")?),
            None => None,
        };
        let shared_offsets = dev.upload(&[0u32, t as u32], "shared offsets")?;
        let y = dev.alloc::<f32>(t * h, "y")?;

        let stamps = Timestamps::new(dev);
        let mut enc = dev.encoder();
        stamps.write(&mut enc, 0);
        router::encode(
            dev,
            &mut enc,
            &xb,
            t,
            &self.router_w,
            self.router_bias.as_ref(),
            &logits,
        )?;
        if let (Some(gw), Some(out)) = (&self.shared_gate, &shared_logit) {
            router::encode(dev, &mut enc, &xb, t, gw, None, out)?;
        }
        stamps.write(&mut enc, 1);
        gate::encode(
            dev,
            &mut enc,
            &logits,
            t,
            e,
            self.correction_bias.as_ref(),
            r,
            &g,
        )?;
        stamps.write(&mut enc, 2);
        permute::encode(dev, &mut enc, &g, (t, slots, e), &xb, h, &p)?;
        stamps.write(&mut enc, 3);
        let act = self.config.activation;
        expert_gemm::encode(
            dev,
            &mut enc,
            &p.x_perm,
            t * slots,
            &p.expert_offsets,
            &self.experts,
            act,
            &y_perm,
        )?;
        if let (Some(s), Some(out)) = (&self.shared, &shared_y) {
            expert_gemm::encode(dev, &mut enc, &xb, t, &shared_offsets, s, act, out)?;
        }
        stamps.write(&mut enc, 4);
        let sh = shared_y.as_ref().map(|s| (s, shared_logit.as_ref()));
        combine::encode(
            dev,
            &mut enc,
            &y_perm,
            &g,
            &p.row_of_assignment,
            (t, slots, h),
            sh,
            self.config.output_scale as f32,
            &y,
        )?;
        stamps.write(&mut enc, 5);
        stamps.resolve(&mut enc);
        dev.submit_and_wait(enc)?;
        let wall = start.elapsed();

        let stage_times = match stamps.read(dev)? {
            Some(ns) => Stage::ALL
                .iter()
                .enumerate()
                .map(|(i, &s)| (s, Duration::from_nanos(ns[i + 1].saturating_sub(ns[i]))))
                .collect(),
            // No timestamp queries: only the whole forward's wall time is known.
            None => Vec::new(),
        };
        Ok(ForwardOutput {
            tokens: t,
            hidden: h,
            slots,
            y: dev.read(&y)?,
            topk_ids: dev.read(&g.topk_ids)?,
            topk_weights: dev.read(&g.topk_weights)?,
            kept: dev.read(&g.kept)?,
            counts: dev.read(&g.counts)?,
            stage_times,
            wall_time: wall,
        })
    }
}

/// Six GPU timestamps around the five stages, when the adapter supports them in encoders.
struct Timestamps {
    set: Option<(::wgpu::QuerySet, GpuBuffer<u64>)>,
}

impl Timestamps {
    const N: u32 = 6;

    fn new(dev: &WgpuDevice) -> Self {
        if !dev.timestamps {
            return Timestamps { set: None };
        }
        let qs = dev.device.create_query_set(&::wgpu::QuerySetDescriptor {
            label: Some("stage timestamps"),
            ty: ::wgpu::QueryType::Timestamp,
            count: Self::N,
        });
        let buf = dev.device.create_buffer(&::wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: u64::from(Self::N) * 8,
            usage: ::wgpu::BufferUsages::QUERY_RESOLVE
                | ::wgpu::BufferUsages::COPY_SRC
                | ::wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Timestamps {
            set: Some((qs, GpuBuffer::from_raw(buf, Self::N as usize))),
        }
    }

    fn write(&self, enc: &mut ::wgpu::CommandEncoder, i: u32) {
        if let Some((qs, _)) = &self.set {
            enc.write_timestamp(qs, i);
        }
    }

    fn resolve(&self, enc: &mut ::wgpu::CommandEncoder) {
        if let Some((qs, buf)) = &self.set {
            enc.resolve_query_set(qs, 0..Self::N, &buf.buffer, 0);
        }
    }

    /// Timestamps in nanoseconds, or `None` without timestamp support.
    fn read(&self, dev: &WgpuDevice) -> Result<Option<Vec<u64>>> {
        let Some((_, buf)) = &self.set else {
            return Ok(None);
        };
        let ticks = dev.read(buf)?;
        let period = f64::from(dev.queue.get_timestamp_period());
        if ticks.len() != Self::N as usize {
            return Err(gpu_err("timestamp read-back has the wrong length"));
        }
        Ok(Some(
            ticks.iter().map(|&t| (t as f64 * period) as u64).collect(),
        ))
    }
}
