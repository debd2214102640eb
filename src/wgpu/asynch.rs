//! The wgpu backend's async entry points: creating the device, submitting and waiting,
//! read-backs, a host-tensor forward, and the settling of wgpu's error scopes.
//!
//! Natively wgpu answers these at once or when the device is polled, and the blocking calls
//! of [`WgpuDevice`] are [`crate::asynch::block_on`] over the functions here. In a browser
//! (WebGPU) every answer is a JavaScript promise that resolves only once control returns to
//! the event loop, so nothing here blocks:
//! - adapter and device requests, `map_async` read-backs and the queue's
//!   `on_submitted_work_done` are awaited;
//! - the error scopes that synchronous code pushes around buffer, shader and pipeline
//!   creation (and around submissions) are popped at once, but on wasm32 their results are
//!   kept as futures (`WgpuDevice::settle`) and awaited by [`WgpuDevice::settled`], which
//!   every async entry point calls before it returns: a validation or out-of-memory error
//!   surfaces there, as the same typed error the native path returns on the spot.

use std::time::Duration;

use bytemuck::Pod;
use web_time::Instant;

use crate::asynch::oneshot;
use crate::device::{self, HostForward, Plan};
use crate::error::{Error, Result};
use crate::stage::Stage;
use crate::tensor::Tensor;
use crate::wgpu::act;
use crate::wgpu::context::{gpu_err, unavailable};
use crate::wgpu::device::{Timestamps, WgpuResident, WgpuStages, WgpuWorkspace};
use crate::wgpu::weights::pack_words;
use crate::wgpu::{GpuBuffer, WgpuDevice};

/// A popped error scope whose answer has not been awaited yet, and the error it becomes.
#[cfg(target_arch = "wasm32")]
pub(crate) type Pending = (
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<::wgpu::Error>>>>,
    Box<dyn FnOnce(::wgpu::Error) -> Error>,
);

/// The error scopes popped on wasm32 and not yet awaited ([`WgpuDevice::settled`]).
#[cfg(target_arch = "wasm32")]
pub(crate) type Deferred = std::sync::Mutex<Vec<Pending>>;

impl WgpuDevice {
    /// Opens the preferred adapter with its full limits, without blocking: natively as
    /// [`WgpuDevice::new`] (`WGPU_BACKEND`, `WGPU_ADAPTER_NAME`, `WGPU_POWER_PREF` honoured),
    /// in a browser the WebGPU adapter `navigator.gpu.requestAdapter()` gives. Optional
    /// features are taken where the adapter has them (timestamp queries); none is required,
    /// so an adapter without `shader-f16` or subgroups runs the portable shaders.
    pub async fn new_async() -> Result<Self> {
        let desc = crate::wgpu::instance_descriptor();
        let instance = ::wgpu::Instance::new(desc);
        let adapter = ::wgpu::util::initialize_adapter_from_env_or_default(&instance, None)
            .await
            .map_err(|e| unavailable(format!("no wgpu adapter: {e}")))?;
        let info = adapter.get_info();
        let required_features = adapter.features() & Self::WANTED;
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&::wgpu::DeviceDescriptor {
                label: Some("moe-kernels"),
                required_features,
                required_limits: limits,
                experimental_features: ::wgpu::ExperimentalFeatures::disabled(),
                memory_hints: ::wgpu::MemoryHints::Performance,
                trace: ::wgpu::Trace::Off,
            })
            .await
            .map_err(|e| unavailable(format!("adapter {} refused a device: {e}", info.name)))?;
        Ok(Self::from_device(device, queue, info))
    }

    /// Turns a pushed error scope into a result: natively at once (the scope's answer is
    /// ready), on wasm32 later, at the next [`WgpuDevice::settled`] (the answer is a promise);
    /// `err` makes the crate's error of wgpu's.
    pub(crate) fn settle(
        &self,
        scope: ::wgpu::ErrorScopeGuard,
        err: impl FnOnce(::wgpu::Error) -> Error + 'static,
    ) -> Result<()> {
        let popped = scope.pop();
        #[cfg(not(target_arch = "wasm32"))]
        {
            match pollster::block_on(popped) {
                Some(e) => Err(err(e)),
                None => Ok(()),
            }
        }
        #[cfg(target_arch = "wasm32")]
        {
            self.deferred
                .lock()
                .map_err(|_| gpu_err("error-scope list poisoned"))?
                .push((Box::pin(popped), Box::new(err)));
            Ok(())
        }
    }

    /// Awaits every error scope popped so far (wasm32; natively they were settled at once)
    /// and returns the first error among them.
    pub async fn settled(&self) -> Result<()> {
        #[cfg(target_arch = "wasm32")]
        {
            let pending = std::mem::take(
                &mut *self
                    .deferred
                    .lock()
                    .map_err(|_| gpu_err("error-scope list poisoned"))?,
            );
            let mut first = None;
            for (answer, err) in pending {
                if let Some(e) = answer.await {
                    first.get_or_insert(err(e));
                }
            }
            if let Some(e) = first {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Submits `enc` and waits, without blocking, for the queue to finish it: natively
    /// [`WgpuDevice::submit_and_wait`], in a browser the queue's `onSubmittedWorkDone`.
    pub async fn submit_async(&self, enc: ::wgpu::CommandEncoder) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            self.submit_and_wait(enc)
        }
        #[cfg(target_arch = "wasm32")]
        {
            let scope = self
                .device
                .push_error_scope(::wgpu::ErrorFilter::Validation);
            self.queue.submit([enc.finish()]);
            self.settle(scope, |e| gpu_err(format!("submission rejected: {e}")))?;
            let (tx, rx) = oneshot();
            self.queue.on_submitted_work_done(move || tx.send(()));
            rx.await
                .ok_or_else(|| gpu_err("the queue never reported the submission done"))?;
            self.settled().await
        }
    }

    /// Copies `buf` back to the host, without blocking.
    pub async fn read_async<T: Pod>(&self, buf: &GpuBuffer<T>) -> Result<Vec<T>> {
        self.read_prefix_async(buf, buf.len).await
    }

    /// The first `n` elements of `buf` (at most its `len`), copied to the host without
    /// blocking: one copy into a staging buffer, one submission, `map_async` awaited.
    pub async fn read_prefix_async<T: Pod>(&self, buf: &GpuBuffer<T>, n: usize) -> Result<Vec<T>> {
        let bytes = (n.min(buf.len) * std::mem::size_of::<T>()) as u64;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        self.count_allocation();
        let staging = self.device.create_buffer(&::wgpu::BufferDescriptor {
            label: Some("read-back"),
            size: bytes.next_multiple_of(4),
            usage: ::wgpu::BufferUsages::MAP_READ | ::wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.encoder();
        enc.copy_buffer_to_buffer(&buf.buffer, 0, &staging, 0, bytes.next_multiple_of(4));
        self.submit_async(enc).await?;
        let (tx, rx) = oneshot();
        staging.map_async(::wgpu::MapMode::Read, .., move |r| tx.send(r));
        // Natively the callback runs inside a poll; in a browser the promise runs it.
        self.device
            .poll(::wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .map_err(|e| gpu_err(format!("waiting for the read-back failed: {e}")))?;
        rx.await
            .ok_or_else(|| gpu_err("read-back callback never ran"))?
            .map_err(|e| gpu_err(format!("read-back failed: {e}")))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| gpu_err(format!("read-back map: {e:?}")))?;
        let out = bytemuck::pod_collect_to_vec::<u8, T>(&view[..bytes as usize]);
        drop(view);
        staging.unmap();
        Ok(out)
    }
}

impl Timestamps {
    /// The five stage times of the last submitted forward, read back without blocking.
    pub async fn read_async(&self, dev: &WgpuDevice) -> Result<Vec<(Stage, Duration)>> {
        let ticks = dev.read_async(self.buffer()).await?;
        Self::stage_times(dev, &ticks)
    }
}

/// One forward of the host tensor `x` (in the workspace's dtype): one submission, then `y`,
/// all awaited without blocking. The blocking `forward_host` is this under `block_on`.
pub(crate) async fn forward_host_async(
    dev: &WgpuDevice,
    res: &WgpuResident,
    ws: &mut WgpuWorkspace,
    plan: Plan,
    x: &Tensor,
) -> Result<HostForward> {
    let start = Instant::now();
    let elems = x.len();
    let words = pack_words(x, 0, elems);
    if !words.is_empty() {
        dev.queue
            .write_buffer(&ws.x.buffer, 0, bytemuck::cast_slice(&words));
    }
    let mut enc = dev.encoder();
    ws.timed = true;
    device::forward(&WgpuStages { dev }, &mut enc, res, ws, plan, (), ())?;
    dev.settled().await?;
    dev.submit_async(enc).await?;
    let wall = start.elapsed();
    let times = match &ws.stamps {
        Some(s) => s.read_async(dev).await?,
        None => Vec::new(),
    };
    let y = dev
        .read_prefix_async(&ws.y, act::words(elems, ws.dtype))
        .await?;
    // y is dense: one row of T·H elements.
    Ok((act::unpack(&y, 1, elems, elems, ws.dtype), times, wall))
}
