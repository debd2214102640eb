//! The wgpu backend's side of the one forward (`crate::device::forward`): the layer's
//! weights resident on the device ([`WgpuResident`]), one workspace of every buffer a forward
//! of up to `max_tokens` tokens needs ([`WgpuWorkspace`]), and each stage recorded into a
//! command encoder that the caller submits. Nothing is allocated, uploaded or read back
//! inside a forward: the per-forward parameters (uniforms, the shared expert's row range) are
//! written with `Queue::write_buffer`, which takes effect at the next submission.
//!
//! Two entry points run it: `forward_host_async` in `crate::wgpu::asynch` (upload a host `x`
//! into the workspace, record, submit, await, read `y`) and `forward_device` (record into the caller's encoder from its `x`
//! buffer to its `y` buffer; the caller submits), both used by [`crate::PreparedLayer`].

use std::time::Duration;

use crate::config::LayerConfig;
use crate::cpu::expert_gemm::ExpertDims;
use crate::device::{self, LayerWeights, Plan, Stages};
use crate::error::{Error, Result};
use crate::stage::Stage;
use crate::tensor::DType;
use crate::wgpu::act::{self, Act};
use crate::wgpu::context::gpu_err;
use crate::wgpu::expert_gemm::GpuExperts;
use crate::wgpu::scratch::Scratch;
use crate::wgpu::weights::GpuWeights;
use crate::wgpu::{combine, expert_gemm, gate, permute, router};
use crate::wgpu::{GateGpu, GpuBuffer, PermuteGpu, WgpuDevice};

/// Records the stages on one wgpu device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WgpuStages<'d> {
    pub dev: &'d WgpuDevice,
}

/// A layer's weights on one wgpu device.
#[derive(Debug)]
pub struct WgpuResident {
    config: LayerConfig,
    dims: ExpertDims,
    router_w: GpuWeights,
    router_bias: Option<GpuBuffer<f32>>,
    correction_bias: Option<GpuBuffer<f32>>,
    experts: GpuExperts,
    shared: Option<GpuExperts>,
    shared_gate: Option<GpuWeights>,
}

impl WgpuResident {
    /// Uploads every weight of `w` (validated already by [`crate::MoeLayer`]).
    pub fn upload(dev: &WgpuDevice, w: &LayerWeights<'_>) -> Result<Self> {
        let act = w.config.activation;
        let f32_buf = |t: Option<&crate::Tensor>, label: &str| {
            t.map(|b| dev.upload(&b.to_f32_vec(), label)).transpose()
        };
        Ok(WgpuResident {
            config: *w.config,
            dims: w.dims,
            router_w: GpuWeights::upload_router(dev, w.router_weight, None, "router.weight")?,
            router_bias: f32_buf(w.router_bias, "router.bias")?,
            correction_bias: f32_buf(w.correction_bias, "router.score_correction_bias")?,
            experts: GpuExperts::upload(dev, w.experts, act)?,
            shared: w
                .shared
                .map(|s| GpuExperts::upload(dev, s, act))
                .transpose()?,
            shared_gate: w
                .shared_gate
                .map(|g| GpuWeights::upload_router(dev, g, None, "shared.gate.weight"))
                .transpose()?,
        })
    }

    /// Bytes of device memory the weights hold, as allocated: quantized expert matrices as
    /// their packed bytes (with section alignment), biases as f32, dense matrices as words.
    pub fn bytes(&self) -> u64 {
        let f32s = |b: &Option<GpuBuffer<f32>>| b.as_ref().map_or(0, |b| b.buffer.size());
        self.router_w.bytes()
            + f32s(&self.router_bias)
            + f32s(&self.correction_bias)
            + self.experts.bytes()
            + self.shared.as_ref().map_or(0, GpuExperts::bytes)
            + self.shared_gate.as_ref().map_or(0, GpuWeights::bytes)
    }
}

/// Every buffer of a forward of up to `max_tokens` tokens.
#[derive(Debug)]
pub struct WgpuWorkspace {
    /// The activation dtype of `x`, `x_perm`, `h`, `y_perm`, `shared_y` and `y`.
    pub dtype: DType,
    /// Most tokens one forward on this workspace may have.
    pub max_tokens: usize,
    /// The pool of scratch and uniform buffers the stage encoders draw from.
    pub scratch: Scratch,
    /// `[max_tokens, H]` dense, in `dtype` words: the forward's input.
    pub x: GpuBuffer<u32>,
    /// `[max_tokens, E]` router logits.
    pub logits: GpuBuffer<f32>,
    /// `[max_tokens]` shared-expert gate logits `x·g`, when the shared expert has a gate.
    pub shared_logit: Option<GpuBuffer<f32>>,
    /// Stage 1's outputs.
    pub gate: GateGpu,
    /// Stage 2's outputs, `x_perm` included.
    pub perm: PermuteGpu,
    /// `[max_tokens·slots, H]` padded rows.
    pub y_perm: GpuBuffer<u32>,
    /// `[max_tokens, H]` padded rows.
    pub shared_y: Option<GpuBuffer<u32>>,
    /// `[0, T]`: the shared expert's one "expert" covers every token.
    pub shared_offsets: GpuBuffer<u32>,
    /// `[max_tokens, H]` dense, in `dtype` words: the forward's output.
    pub y: GpuBuffer<u32>,
    /// GPU timestamps around the five stages, when the workspace was allocated `timed` and
    /// the adapter supports them.
    pub stamps: Option<Timestamps>,
    /// Whether this forward writes the timestamps (the host-tensor forward does; the
    /// device-resident one records nothing it was not asked for).
    pub timed: bool,
}

impl WgpuWorkspace {
    /// Allocates every buffer for up to `max_tokens` tokens in activation dtype `dtype`;
    /// `timed` adds a timestamp query set when the device has timestamps.
    pub fn alloc(
        dev: &WgpuDevice,
        res: &WgpuResident,
        max_tokens: usize,
        dtype: DType,
        timed: bool,
    ) -> Result<Self> {
        let (e, h) = (res.dims.experts, res.dims.hidden);
        let slots = res.config.routing.slots(e);
        let n = max_tokens.saturating_mul(slots);
        Ok(WgpuWorkspace {
            dtype,
            max_tokens,
            scratch: Scratch::new(),
            x: dev.alloc(act::words(max_tokens.saturating_mul(h), dtype), "x")?,
            logits: dev.alloc(max_tokens.saturating_mul(e), "logits")?,
            shared_logit: res
                .shared_gate
                .as_ref()
                .map(|_| dev.alloc(max_tokens, "shared gate logits"))
                .transpose()?,
            gate: GateGpu::alloc(dev, max_tokens, slots, e)?,
            perm: PermuteGpu::alloc(dev, max_tokens, slots, e, h, dtype)?,
            y_perm: dev.alloc(act::matrix_words(n, h, dtype), "y_perm")?,
            shared_y: res
                .shared
                .as_ref()
                .map(|_| dev.alloc(act::matrix_words(max_tokens, h, dtype), "shared y"))
                .transpose()?,
            shared_offsets: dev.alloc(2, "shared offsets")?,
            y: dev.alloc(act::words(max_tokens.saturating_mul(h), dtype), "y")?,
            stamps: if timed { Timestamps::new(dev) } else { None },
            timed: false,
        })
    }

    /// Bytes the workspace holds on the device (scratch pool included).
    pub fn bytes(&self) -> u64 {
        let mut b: u64 = [
            &self.x.buffer,
            &self.logits.buffer,
            &self.gate.topk_ids.buffer,
            &self.gate.topk_weights.buffer,
            &self.gate.kept.buffer,
            &self.gate.counts.buffer,
            &self.perm.expert_offsets.buffer,
            &self.perm.sorted_assignment.buffer,
            &self.perm.row_of_assignment.buffer,
            &self.perm.x_perm.buffer,
            &self.y_perm.buffer,
            &self.shared_offsets.buffer,
            &self.y.buffer,
        ]
        .iter()
        .map(|b| b.size())
        .sum::<u64>();
        b += self.shared_y.as_ref().map_or(0, |x| x.buffer.size());
        b + self.shared_logit.as_ref().map_or(0, |x| x.buffer.size()) + self.scratch.bytes()
    }
}

fn x_act(ws: &WgpuWorkspace, t: usize, h: usize) -> Act<'_> {
    Act::dense(&ws.x, ws.dtype, t, h)
}

impl Stages for WgpuStages<'_> {
    type Resident = WgpuResident;
    type Workspace = WgpuWorkspace;
    type Rec = ::wgpu::CommandEncoder;
    type In<'a> = ();
    type Out<'a> = ();

    fn mark(&self, enc: &mut Self::Rec, ws: &mut WgpuWorkspace, i: usize) -> Result<()> {
        if i == 0 {
            ws.scratch.begin()?;
        }
        if let (Some(s), true) = (&ws.stamps, ws.timed) {
            s.write(enc, i as u32);
            if i == 5 {
                s.resolve(enc);
            }
        }
        Ok(())
    }

    fn router(
        &self,
        enc: &mut Self::Rec,
        res: &WgpuResident,
        ws: &mut WgpuWorkspace,
        _: (),
        t: usize,
    ) -> Result<()> {
        let x = x_act(ws, t, res.dims.hidden);
        router::encode(
            self.dev,
            enc,
            &ws.scratch,
            x,
            &res.router_w,
            res.router_bias.as_ref(),
            &ws.logits,
        )
    }

    fn shared_gate(
        &self,
        enc: &mut Self::Rec,
        res: &WgpuResident,
        ws: &mut WgpuWorkspace,
        _: (),
        t: usize,
    ) -> Result<()> {
        let (Some(gw), Some(out)) = (&res.shared_gate, &ws.shared_logit) else {
            return Ok(());
        };
        let x = x_act(ws, t, res.dims.hidden);
        router::encode(self.dev, enc, &ws.scratch, x, gw, None, out)
    }

    fn gate(
        &self,
        enc: &mut Self::Rec,
        res: &WgpuResident,
        ws: &mut WgpuWorkspace,
        t: usize,
    ) -> Result<()> {
        gate::encode(
            self.dev,
            enc,
            &ws.scratch,
            &ws.logits,
            t,
            res.dims.experts,
            res.correction_bias.as_ref(),
            &res.config.routing,
            &ws.gate,
        )
    }

    fn permute(
        &self,
        enc: &mut Self::Rec,
        res: &WgpuResident,
        ws: &mut WgpuWorkspace,
        _: (),
        t: usize,
    ) -> Result<()> {
        let e = res.dims.experts;
        let slots = res.config.routing.slots(e);
        let x = x_act(ws, t, res.dims.hidden);
        permute::encode(
            self.dev,
            enc,
            &ws.scratch,
            &ws.gate,
            (t, slots, e),
            x,
            &ws.perm,
        )
    }

    fn experts(
        &self,
        enc: &mut Self::Rec,
        res: &WgpuResident,
        ws: &mut WgpuWorkspace,
        t: usize,
    ) -> Result<()> {
        let h = res.dims.hidden;
        let rows = t * res.config.routing.slots(res.dims.experts);
        expert_gemm::encode(
            self.dev,
            enc,
            &ws.scratch,
            Act::padded(&ws.perm.x_perm, ws.dtype, rows, h),
            &ws.perm.expert_offsets,
            &res.experts,
            res.config.activation,
            Act::padded(&ws.y_perm, ws.dtype, rows, h),
        )
    }

    fn shared(
        &self,
        enc: &mut Self::Rec,
        res: &WgpuResident,
        ws: &mut WgpuWorkspace,
        _: (),
        t: usize,
    ) -> Result<()> {
        let (Some(s), Some(out)) = (&res.shared, &ws.shared_y) else {
            return Ok(());
        };
        let h = res.dims.hidden;
        let t32 = crate::wgpu::context::index_u32(Stage::ExpertGemm, "T", t)?;
        self.dev.queue.write_buffer(
            &ws.shared_offsets.buffer,
            0,
            bytemuck::cast_slice(&[0u32, t32]),
        );
        expert_gemm::encode(
            self.dev,
            enc,
            &ws.scratch,
            x_act(ws, t, h),
            &ws.shared_offsets,
            s,
            res.config.activation,
            Act::padded(out, ws.dtype, t, h),
        )
    }

    fn combine(
        &self,
        enc: &mut Self::Rec,
        res: &WgpuResident,
        ws: &mut WgpuWorkspace,
        t: usize,
        _: (),
    ) -> Result<()> {
        let (e, h) = (res.dims.experts, res.dims.hidden);
        let slots = res.config.routing.slots(e);
        let shared = ws
            .shared_y
            .as_ref()
            .map(|s| (Act::padded(s, ws.dtype, t, h), ws.shared_logit.as_ref()));
        combine::encode(
            self.dev,
            enc,
            &ws.scratch,
            Act::padded(&ws.y_perm, ws.dtype, t * slots, h),
            &ws.gate,
            &ws.perm.row_of_assignment,
            (t, slots, h),
            shared,
            res.config.output_scale as f32,
            Act::dense(&ws.y, ws.dtype, t, h),
        )
    }
}

/// Checks that a caller's `(buffer, offset)` region can hold `bytes` bytes of an activation
/// and can be copied from or to by this device: offset and size multiples of 4, in range, the
/// right usage, and the buffer created on this device (a buffer of another device is refused
/// here, before anything is recorded into the caller's encoder).
pub(crate) fn check_region(
    dev: &WgpuDevice,
    probe: &::wgpu::Buffer,
    what: &str,
    buffer: &::wgpu::Buffer,
    offset: u64,
    bytes: u64,
    usage: ::wgpu::BufferUsages,
) -> Result<()> {
    let err = |m: String| Error::shape(Stage::Router, format!("{what}: {m}"));
    if offset % 4 != 0 {
        return Err(err(format!("offset {offset} is not a multiple of 4")));
    }
    let end = offset.saturating_add(bytes.next_multiple_of(4));
    if end > buffer.size() {
        return Err(err(format!(
            "needs bytes {offset}..{end} (whole u32 words), but the buffer holds {}",
            buffer.size()
        )));
    }
    if !buffer.usage().contains(usage) {
        return Err(err(format!(
            "the buffer's usage {:?} lacks {usage:?}",
            buffer.usage()
        )));
    }
    // A zero-size copy to or from `probe` (a buffer of ours) validates the buffer's device
    // without touching any data or allocating; the command buffer is never submitted.
    let scope = dev.device.push_error_scope(::wgpu::ErrorFilter::Validation);
    let mut enc = dev.encoder();
    if usage.contains(::wgpu::BufferUsages::COPY_SRC) {
        enc.copy_buffer_to_buffer(buffer, offset, probe, 0, 0);
    } else {
        enc.copy_buffer_to_buffer(probe, 0, buffer, offset, 0);
    }
    drop(enc.finish());
    // On wasm32 the answer is a promise: it is awaited by the next `WgpuDevice::settled`.
    let what = what.to_string();
    dev.settle(scope, move |e| {
        Error::shape(
            Stage::Router,
            format!(
                "{what}: the buffer cannot be used with this backend's device (created on \
                 another device?): {e}"
            ),
        )
    })
}

/// Six GPU timestamps around the five stages, when the adapter supports them in encoders.
#[derive(Debug)]
pub struct Timestamps {
    set: ::wgpu::QuerySet,
    buf: GpuBuffer<u64>,
    /// Written at the start of an empty compute pass instead of on the encoder: WebGPU's
    /// `timestamp-query` (browsers) has no timestamps between passes.
    in_pass: bool,
}

impl Timestamps {
    const N: u32 = 6;

    fn new(dev: &WgpuDevice) -> Option<Self> {
        let in_pass = !dev.timestamps
            && dev
                .device
                .features()
                .contains(::wgpu::Features::TIMESTAMP_QUERY);
        if !dev.timestamps && !in_pass {
            return None;
        }
        let set = dev.device.create_query_set(&::wgpu::QuerySetDescriptor {
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
        Some(Timestamps {
            set,
            buf: GpuBuffer::from_raw(buf, Self::N as usize),
            in_pass,
        })
    }

    fn write(&self, enc: &mut ::wgpu::CommandEncoder, i: u32) {
        if self.in_pass {
            // An empty pass: its beginning comes after the previous pass's work.
            drop(enc.begin_compute_pass(&::wgpu::ComputePassDescriptor {
                label: Some("stage timestamp"),
                timestamp_writes: Some(::wgpu::ComputePassTimestampWrites {
                    query_set: &self.set,
                    beginning_of_pass_write_index: Some(i),
                    end_of_pass_write_index: None,
                }),
            }));
            return;
        }
        enc.write_timestamp(&self.set, i);
    }

    /// The buffer the timestamps are resolved into.
    pub(crate) fn buffer(&self) -> &GpuBuffer<u64> {
        &self.buf
    }

    fn resolve(&self, enc: &mut ::wgpu::CommandEncoder) {
        enc.resolve_query_set(&self.set, 0..Self::N, &self.buf.buffer, 0);
    }

    /// The five stage times of the last submitted forward.
    pub fn read(&self, dev: &WgpuDevice) -> Result<Vec<(Stage, Duration)>> {
        Self::stage_times(dev, &dev.read(&self.buf)?)
    }

    /// The five stage times from the six timestamps read back.
    pub(crate) fn stage_times(dev: &WgpuDevice, ticks: &[u64]) -> Result<Vec<(Stage, Duration)>> {
        let period = f64::from(dev.queue.get_timestamp_period());
        if ticks.len() != Self::N as usize {
            return Err(gpu_err("timestamp read-back has the wrong length"));
        }
        let ns: Vec<u64> = ticks.iter().map(|&t| (t as f64 * period) as u64).collect();
        Ok(Stage::ALL
            .iter()
            .enumerate()
            .map(|(i, &s)| (s, Duration::from_nanos(ns[i + 1].saturating_sub(ns[i]))))
            .collect())
    }
}

// ---------------------------------------------------------------------------------------------
// The entry points: from host tensors, and device-resident on the caller's buffers.
// ---------------------------------------------------------------------------------------------

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
