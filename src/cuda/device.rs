//! The CUDA backend's side of the one forward (`crate::device::forward`): the layer's
//! weights resident on the device ([`CudaResident`]), one workspace of every buffer a forward
//! of up to `max_tokens` tokens needs ([`CudaWorkspace`]), and each stage launched on the
//! device's stream. A forward allocates nothing, copies nothing between host and device and
//! never synchronises, so it can be captured in a CUDA graph.
//!
//! Two entry points run it: `forward_host` (upload a host `x` into the workspace, launch,
//! wait, read `y`) and `forward_device` (launch on the caller's views, enqueue only), both
//! used by [`crate::PreparedLayer`].

use std::time::{Duration, Instant};

use cudarc::driver::{sys, CudaEvent, CudaSlice};

use crate::config::LayerConfig;
use crate::cpu::expert_gemm::ExpertDims;
use crate::cuda::act::{bytes_to_f64, tensor_bytes, ActView, ActViewMut};
use crate::cuda::context::{cuda_err, drv};
use crate::cuda::expert_gemm::CudaExperts;
use crate::cuda::gate::GateScratchCuda;
use crate::cuda::permute::PermuteScratchCuda;
use crate::cuda::{combine, expert_gemm, gate, permute, router};
use crate::cuda::{CudaDevice, CudaWeights, GateCuda, PermuteCuda};
use crate::device::{self, HostForward, LayerWeights, Plan, Stages};
use crate::error::Result;
use crate::stage::Stage;
use crate::tensor::{DType, Tensor};

/// Launches the stages on one CUDA device's stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CudaStages<'d> {
    pub dev: &'d CudaDevice,
}

/// A layer's weights on one CUDA device.
#[derive(Debug)]
pub struct CudaResident {
    config: LayerConfig,
    dims: ExpertDims,
    router_w: CudaWeights,
    router_bias: Option<CudaSlice<f32>>,
    correction_bias: Option<CudaSlice<f32>>,
    experts: CudaExperts,
    shared: Option<CudaExperts>,
    shared_gate: Option<CudaWeights>,
}

impl CudaResident {
    /// Uploads every weight of `w` (validated already by [`crate::MoeLayer`]).
    pub fn upload(dev: &CudaDevice, w: &LayerWeights<'_>) -> Result<Self> {
        let act = w.config.activation;
        let f32_buf =
            |t: Option<&crate::Tensor>| t.map(|b| dev.upload(&b.to_f32_vec())).transpose();
        Ok(CudaResident {
            config: *w.config,
            dims: w.dims,
            router_w: CudaWeights::upload(dev, w.router_weight)?,
            router_bias: f32_buf(w.router_bias)?,
            correction_bias: f32_buf(w.correction_bias)?,
            experts: CudaExperts::upload(dev, w.experts, act)?,
            shared: w
                .shared
                .map(|s| CudaExperts::upload(dev, s, act))
                .transpose()?,
            shared_gate: w
                .shared_gate
                .map(|g| CudaWeights::upload(dev, g))
                .transpose()?,
        })
    }
}

/// Every buffer of a forward of up to `max_tokens` tokens.
pub struct CudaWorkspace {
    /// The activation dtype of `x`, `x_perm`, `h`, `y_perm`, `shared_y` and `y`.
    pub dtype: DType,
    /// Most tokens one forward on this workspace may have.
    pub max_tokens: usize,
    /// `[max_tokens, H]` in `dtype`: where the host-tensor forward uploads `x`.
    pub x: Option<CudaSlice<u8>>,
    /// `[max_tokens, E]` router logits.
    pub logits: CudaSlice<f32>,
    /// `[max_tokens]` shared-expert gate logits `x·g`, when the shared expert has a gate.
    pub shared_logit: Option<CudaSlice<f32>>,
    /// Stage 1's outputs.
    pub gate: GateCuda,
    /// Scratch of the gate's batch-wide passes (what the routing config needs).
    pub gate_scratch: GateScratchCuda,
    /// Stage 2's outputs, `x_perm` included.
    pub perm: PermuteCuda,
    /// The permutation's count table.
    pub perm_scratch: PermuteScratchCuda,
    /// `[max_tokens·slots, F]` (and the shared expert's `[max_tokens, Fs]`) in `dtype`.
    pub h: CudaSlice<u8>,
    /// `[max_tokens·slots, H]` in `dtype`.
    pub y_perm: CudaSlice<u8>,
    /// `[max_tokens, H]` in `dtype`.
    pub shared_y: Option<CudaSlice<u8>>,
    /// `pairs[2T..2T+2] = [0, T]` for every T <= max_tokens: the shared expert's row range,
    /// on the device without an upload per forward.
    pub pairs: CudaSlice<u32>,
    /// `[0, T]` of this forward, copied device-to-device from `pairs`.
    pub shared_offsets: CudaSlice<u32>,
    /// `[max_tokens, H]` in `dtype`: where the host-tensor forward reads `y`.
    pub y: Option<CudaSlice<u8>>,
    /// Six events around the five stages, when the workspace was allocated `timed`.
    pub events: Option<Vec<CudaEvent>>,
    /// Whether this forward records the events (the host-tensor forward does; the
    /// device-resident one enqueues nothing it was not asked for).
    pub timed: bool,
}

impl std::fmt::Debug for CudaWorkspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaWorkspace({} tokens, {})",
            self.max_tokens, self.dtype
        )
    }
}

impl CudaWorkspace {
    /// Allocates every buffer for up to `max_tokens` tokens in activation dtype `dtype`;
    /// `timed` adds the CUDA events that time each stage.
    pub fn alloc(
        dev: &CudaDevice,
        res: &CudaResident,
        max_tokens: usize,
        dtype: DType,
        timed: bool,
    ) -> Result<Self> {
        let ExpertDims {
            experts: e,
            hidden: h,
            ffn: f,
        } = res.dims;
        let r = &res.config.routing;
        let slots = r.slots(e);
        let n = max_tokens.saturating_mul(slots);
        let sz = dtype.size();
        let fs = res.shared.as_ref().map_or(0, |s| s.dims.ffn);
        let h_elems = n.saturating_mul(f).max(max_tokens.saturating_mul(fs));
        let pairs: Vec<u32> = (0..=max_tokens as u32).flat_map(|t| [0, t]).collect();
        let events = if timed {
            Some(
                (0..6)
                    .map(|_| {
                        drv(
                            dev.ctx
                                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)),
                            "creating an event",
                        )
                    })
                    .collect::<Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        Ok(CudaWorkspace {
            dtype,
            max_tokens,
            x: Some(dev.alloc(max_tokens.saturating_mul(h).saturating_mul(sz))?),
            logits: dev.alloc(max_tokens.saturating_mul(e))?,
            shared_logit: res
                .shared_gate
                .as_ref()
                .map(|_| dev.alloc(max_tokens))
                .transpose()?,
            gate: GateCuda::alloc(dev, max_tokens, slots, e)?,
            gate_scratch: GateScratchCuda::alloc(dev, max_tokens, e, r)?,
            perm: PermuteCuda::alloc(dev, max_tokens, slots, e, h, dtype)?,
            perm_scratch: PermuteScratchCuda::alloc(dev, max_tokens, slots, e)?,
            h: dev.alloc(h_elems.saturating_mul(sz))?,
            y_perm: dev.alloc(n.saturating_mul(h).saturating_mul(sz))?,
            shared_y: res
                .shared
                .as_ref()
                .map(|_| dev.alloc(max_tokens.saturating_mul(h).saturating_mul(sz)))
                .transpose()?,
            pairs: dev.upload(&pairs)?,
            shared_offsets: dev.alloc(2)?,
            y: Some(dev.alloc(max_tokens.saturating_mul(h).saturating_mul(sz))?),
            events,
            timed: false,
        })
    }

    /// The five stage times of the last forward (waits for its last event).
    pub fn stage_times(&self) -> Result<Option<Vec<(Stage, Duration)>>> {
        let (Some(ev), true) = (&self.events, self.timed) else {
            return Ok(None);
        };
        drv(ev[5].synchronize(), "waiting for an event")?;
        let mut out = Vec::with_capacity(5);
        for (i, &s) in Stage::ALL.iter().enumerate() {
            let ms = drv(ev[i].elapsed_ms(&ev[i + 1]), "reading an event")?;
            out.push((s, Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3)));
        }
        Ok(Some(out))
    }
}

/// The first `bytes` bytes of `buf` as a read-only activation view.
fn view(buf: &CudaSlice<u8>, bytes: usize, dtype: DType) -> ActView<'_> {
    ActView {
        bytes: buf.slice(0..bytes),
        dtype,
    }
}

fn view_mut(buf: &mut CudaSlice<u8>, bytes: usize, dtype: DType) -> ActViewMut<'_> {
    ActViewMut {
        bytes: buf.slice_mut(0..bytes),
        dtype,
    }
}

impl<'d> Stages for CudaStages<'d> {
    type Resident = CudaResident;
    type Workspace = CudaWorkspace;
    type Rec = ();
    type In<'a> = &'a ActView<'a>;
    type Out<'a> = ActViewMut<'a>;

    fn mark(&self, _: &mut (), ws: &mut CudaWorkspace, i: usize) -> Result<()> {
        if let (Some(ev), true) = (&ws.events, ws.timed) {
            drv(ev[i].record(&self.dev.stream), "recording an event")?;
        }
        Ok(())
    }

    fn router(
        &self,
        _: &mut (),
        res: &CudaResident,
        ws: &mut CudaWorkspace,
        x: &ActView<'_>,
        t: usize,
    ) -> Result<()> {
        router::launch(
            self.dev,
            x,
            t,
            &res.router_w,
            res.router_bias.as_ref(),
            &mut ws.logits,
        )
    }

    fn shared_gate(
        &self,
        _: &mut (),
        res: &CudaResident,
        ws: &mut CudaWorkspace,
        x: &ActView<'_>,
        t: usize,
    ) -> Result<()> {
        let (Some(gw), Some(out)) = (&res.shared_gate, ws.shared_logit.as_mut()) else {
            return Ok(());
        };
        router::launch(self.dev, x, t, gw, None, out)
    }

    fn gate(&self, _: &mut (), res: &CudaResident, ws: &mut CudaWorkspace, t: usize) -> Result<()> {
        gate::launch(
            self.dev,
            &ws.logits,
            t,
            res.dims.experts,
            res.correction_bias.as_ref(),
            &res.config.routing,
            &mut ws.gate,
            &mut ws.gate_scratch,
        )
    }

    fn permute(
        &self,
        _: &mut (),
        res: &CudaResident,
        ws: &mut CudaWorkspace,
        x: &ActView<'_>,
        t: usize,
    ) -> Result<()> {
        let e = res.dims.experts;
        let slots = res.config.routing.slots(e);
        permute::launch(
            self.dev,
            &ws.gate,
            (t, slots, e),
            x,
            res.dims.hidden,
            &mut ws.perm,
            &mut ws.perm_scratch,
        )
    }

    fn experts(
        &self,
        _: &mut (),
        res: &CudaResident,
        ws: &mut CudaWorkspace,
        t: usize,
    ) -> Result<()> {
        let d = res.dims;
        let rows = t * res.config.routing.slots(d.experts);
        let (dt, sz) = (ws.dtype, ws.dtype.size());
        let a = view(&ws.perm.x_perm, rows * d.hidden * sz, dt);
        let mut h = view_mut(&mut ws.h, rows * d.ffn * sz, dt);
        let mut y = view_mut(&mut ws.y_perm, rows * d.hidden * sz, dt);
        expert_gemm::launch(
            self.dev,
            &a,
            rows,
            &ws.perm.expert_offsets,
            &res.experts,
            res.config.activation,
            &mut h,
            &mut y,
        )
    }

    fn shared(
        &self,
        _: &mut (),
        res: &CudaResident,
        ws: &mut CudaWorkspace,
        x: &ActView<'_>,
        t: usize,
    ) -> Result<()> {
        let (Some(s), Some(out)) = (&res.shared, ws.shared_y.as_mut()) else {
            return Ok(());
        };
        let (dt, sz) = (ws.dtype, ws.dtype.size());
        let mut h = view_mut(&mut ws.h, t * s.dims.ffn * sz, dt);
        let mut y = view_mut(out, t * res.dims.hidden * sz, dt);
        let pair = ws.pairs.slice(2 * t..2 * t + 2);
        drv(
            self.dev.stream.memcpy_dtod(&pair, &mut ws.shared_offsets),
            "copying the shared expert's row range",
        )?;
        expert_gemm::launch(
            self.dev,
            x,
            t,
            &ws.shared_offsets,
            s,
            res.config.activation,
            &mut h,
            &mut y,
        )
    }

    fn combine(
        &self,
        _: &mut (),
        res: &CudaResident,
        ws: &mut CudaWorkspace,
        t: usize,
        mut y: ActViewMut<'_>,
    ) -> Result<()> {
        let (e, h) = (res.dims.experts, res.dims.hidden);
        let slots = res.config.routing.slots(e);
        let (dt, sz) = (ws.dtype, ws.dtype.size());
        let yp = view(&ws.y_perm, t * slots * h * sz, dt);
        let sy = ws.shared_y.as_ref().map(|s| view(s, t * h * sz, dt));
        let shared = sy.as_ref().map(|s| (s, ws.shared_logit.as_ref()));
        combine::launch(
            self.dev,
            &yp,
            &ws.gate,
            &ws.perm.row_of_assignment,
            (t, slots, h),
            shared,
            res.config.output_scale as f32,
            &mut y,
        )
    }
}

/// A caller's device memory borrowed as a [`CudaSlice`] for the length of one forward: when
/// it goes out of scope (normally, by an early error or by unwinding) the slice is leaked
/// back, so the caller's memory is never freed by us.
pub(crate) struct Borrowed(Option<CudaSlice<u8>>);

impl Borrowed {
    /// The borrowed bytes.
    pub fn slice(&self) -> &CudaSlice<u8> {
        // Always Some until drop.
        self.0.as_ref().expect("borrowed slice present until drop")
    }

    /// The borrowed bytes, writable.
    pub fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        self.0.as_mut().expect("borrowed slice present until drop")
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            // Releases cudarc's bookkeeping (events) without freeing the caller's memory.
            let _ = s.leak();
        }
    }
}

/// A caller's device region of `elems` elements of `dtype` as a [`Borrowed`] slice, with its
/// length in bytes.
///
/// # Safety
/// `ptr` must be a device allocation of the backend's context holding at least
/// `elems · dtype.size()` bytes, valid and not written by anything else until the stream
/// has finished the work recorded with the view.
pub(crate) unsafe fn raw_view(
    dev: &CudaDevice,
    ptr: sys::CUdeviceptr,
    elems: usize,
    dtype: DType,
) -> Result<(Borrowed, usize)> {
    if ptr == 0 && elems > 0 {
        return Err(cuda_err("null device pointer"));
    }
    let bytes = elems.saturating_mul(dtype.size());
    // SAFETY: the caller guarantees `ptr` holds `bytes` bytes on this context; `Borrowed`
    // leaks the slice back on drop, so it is never freed by us.
    let s = unsafe { dev.stream.upgrade_device_ptr::<u8>(ptr, bytes.max(1)) };
    Ok((Borrowed(Some(s)), bytes))
}

// ---------------------------------------------------------------------------------------------
// The entry points: from host tensors, and device-resident on the caller's buffers.
// ---------------------------------------------------------------------------------------------

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
    let raw = tensor_bytes(x);
    // The workspace's own x and y: taken out for the forward, which borrows the rest, and put
    // back after it (a previous forward that failed half-way may have lost them: refused).
    let (Some(mut xbuf), Some(mut ybuf)) = (ws.x.take(), ws.y.take()) else {
        return Err(cuda_err(
            "the workspace lost its x / y buffers in an earlier failure",
        ));
    };
    let mut run = || -> Result<Vec<u8>> {
        if bytes > 0 {
            let mut dst = xbuf.slice_mut(0..bytes);
            drv(dev.stream.memcpy_htod(&raw, &mut dst), "uploading x")?;
        }
        let xv = ActView {
            bytes: xbuf.slice(0..bytes),
            dtype,
        };
        let yv = ActViewMut {
            bytes: ybuf.slice_mut(0..bytes),
            dtype,
        };
        ws.timed = true;
        device::forward(&CudaStages { dev }, &mut (), res, ws, plan, &xv, yv)?;
        dev.sync()?;
        dev.read(&ybuf, bytes)
    };
    let raw = run();
    ws.x = Some(xbuf);
    ws.y = Some(ybuf);
    let raw = raw?;
    let wall = start.elapsed();
    let times = ws.stage_times()?.unwrap_or_default();
    // Widening f16 / bf16 / f32 to f64 and back to f32 is exact.
    let y = bytes_to_f64(&raw, dtype)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    Ok((y, times, wall))
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
    // The shared expert reads the caller's x directly: check it before anything is launched.
    if let (Some(s), true) = (&res.shared, plan.tokens > 0) {
        expert_gemm::check_input(dev, x, s)?;
    }
    ws.timed = false;
    device::forward(&CudaStages { dev }, &mut (), res, ws, plan, x, y)
}
