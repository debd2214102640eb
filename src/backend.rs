//! The device handle and the stage-by-stage dispatch layer.
//!
//! A [`Backend`] owns whatever a device needs (modules, pipelines) and exposes every stage as
//! a call that validates its inputs and pre-sized outputs, then computes. Outputs are written
//! into caller-owned typed buffers so tests can poison them first: an element a backend fails
//! to write shows up as NaN or `u32::MAX`.
//!
//! Every stage computes on every backend: the CPU (the f64 reference with stage boundaries
//! stored as a GPU stores them), CUDA (hand-written PTX) and wgpu (WGSL). A backend that
//! cannot run here answers [`Error::BackendUnavailable`] naming what is missing. The whole
//! layer runs through [`MoeLayer::prepare`](crate::MoeLayer::prepare).

use crate::config::{Activation, RoutingConfig};
use crate::cpu;
use crate::cpu::expert_gemm::ExpertWeights;
pub use crate::device::{BackendKind, GateBuffers, PermuteBuffers};
use crate::error::{Error, Result};
use crate::limits::{self, Footprint, LayerShape, Resource};
use crate::shape;
use crate::stage::Stage;
use crate::tensor::{DType, Tensor};

/// What a backend computes on. Every stage method matches on this, so a new backend that
/// forgets a stage does not compile.
#[derive(Debug, Clone)]
pub(crate) enum Device {
    /// The f64 reference, with stage boundaries rounded to f32 as a GPU stores them.
    Cpu,
    /// Hand-written PTX through cudarc.
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<crate::cuda::CudaDevice>),
    /// WGSL shaders through wgpu.
    #[cfg(feature = "wgpu")]
    Wgpu(std::sync::Arc<crate::wgpu::WgpuDevice>),
}

/// A device handle. Create it once and reuse it; it is `Send + Sync`, and cloning it shares
/// the device (and its module and pipeline caches).
#[derive(Debug, Clone)]
pub struct Backend {
    pub(crate) device: Device,
    /// Cap on a prepared layer's weights plus one forward's buffers, in bytes.
    memory_limit: Option<u64>,
}

/// Why a backend kind cannot be used here, or `None` when it can.
pub fn unavailable_reason(kind: BackendKind) -> Option<String> {
    match kind {
        BackendKind::Cpu => None,
        BackendKind::Cuda => cuda_reason(),
        BackendKind::Wgpu => wgpu_reason(),
    }
}

#[cfg(feature = "cuda")]
fn cuda_reason() -> Option<String> {
    crate::cuda::CudaDevice::new(0).err().map(|e| match e {
        Error::BackendUnavailable { reason, .. } => reason,
        other => other.to_string(),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_reason() -> Option<String> {
    Some("this build has no `cuda` feature".into())
}

#[cfg(feature = "wgpu")]
fn wgpu_reason() -> Option<String> {
    crate::wgpu::WgpuDevice::new().err().map(|e| match e {
        Error::BackendUnavailable { reason, .. } => reason,
        other => other.to_string(),
    })
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_reason() -> Option<String> {
    Some("this build has no `wgpu` feature".into())
}

impl Backend {
    /// The best usable backend. The environment variable `MOE_BACKEND` (`auto`, `cpu`,
    /// `cuda` or `wgpu`) overrides the choice: set to a kind, that kind or its error; unset,
    /// empty or `auto`, the first of CUDA, wgpu, CPU that can be created here. Blocks
    /// ([`Backend::auto_async`] under [`crate::asynch::block_on`]).
    pub fn auto() -> Result<Self> {
        crate::asynch::block_on("Backend::auto", Self::auto_async())
    }

    /// [`Backend::auto`] without blocking (what a browser calls: CUDA is not built there, so
    /// WebGPU, then the CPU).
    pub async fn auto_async() -> Result<Self> {
        match std::env::var("MOE_BACKEND") {
            Ok(v) if !v.trim().is_empty() && v.trim() != "auto" => {
                Backend::new_async(v.parse()?).await
            }
            _ => {
                for kind in BackendKind::AUTO_ORDER {
                    if let Ok(b) = Backend::new_async(kind).await {
                        return Ok(b);
                    }
                }
                Err(Error::BackendUnavailable {
                    backend: BackendKind::Cpu,
                    reason: "no backend could be created".into(),
                })
            }
        }
    }

    /// `auto`, `cpu`, `cuda` or `wgpu`. Blocks ([`Backend::from_name_async`]).
    pub fn from_name(name: &str) -> Result<Self> {
        crate::asynch::block_on("Backend::from_name", Self::from_name_async(name))
    }

    /// [`Backend::from_name`] without blocking.
    pub async fn from_name_async(name: &str) -> Result<Self> {
        if name.trim() == "auto" {
            Backend::auto_async().await
        } else {
            Backend::new_async(name.parse()?).await
        }
    }

    /// A backend of this kind, or [`Error::BackendUnavailable`] saying why not. Blocks
    /// ([`Backend::new_async`] under [`crate::asynch::block_on`]; on wasm32 a wgpu backend
    /// needs `new_async`).
    pub fn new(kind: BackendKind) -> Result<Self> {
        crate::asynch::block_on("Backend::new", Self::new_async(kind))
    }

    /// A backend of this kind without blocking: a wgpu adapter and device are awaited (in a
    /// browser, WebGPU's promises); the other kinds are ready at once.
    // wasm32: wgpu's web handles are neither Send nor Sync (one thread); the Arc only shares.
    #[cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]
    pub async fn new_async(kind: BackendKind) -> Result<Self> {
        match kind {
            BackendKind::Cpu => Ok(Backend {
                device: Device::Cpu,
                memory_limit: None,
            }),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => Ok(Backend {
                device: Device::Cuda(std::sync::Arc::new(crate::cuda::CudaDevice::new(0)?)),
                memory_limit: None,
            }),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Ok(Backend {
                device: Device::Wgpu(std::sync::Arc::new(
                    crate::wgpu::WgpuDevice::new_async().await?,
                )),
                memory_limit: None,
            }),
            #[allow(unreachable_patterns)] // reached when a backend's feature is off
            other => Err(Error::BackendUnavailable {
                backend: other,
                reason: unavailable_reason(other).unwrap_or_default(),
            }),
        }
    }

    /// A CUDA backend on device `ordinal` (its own context and stream).
    #[cfg(feature = "cuda")]
    pub fn cuda(ordinal: usize) -> Result<Self> {
        Ok(Backend {
            device: Device::Cuda(std::sync::Arc::new(crate::cuda::CudaDevice::new(ordinal)?)),
            memory_limit: None,
        })
    }

    /// A CUDA backend that launches on the caller's stream (a runtime's own, e.g. candle's
    /// `CudaDevice::cuda_stream()`): every launch of this backend is enqueued on `stream`, in
    /// its context, and nothing synchronises it except explicit read-backs.
    #[cfg(feature = "cuda")]
    pub fn from_cuda_stream(stream: std::sync::Arc<cudarc::driver::CudaStream>) -> Result<Self> {
        Ok(Backend {
            device: Device::Cuda(std::sync::Arc::new(crate::cuda::CudaDevice::from_stream(
                stream,
            )?)),
            memory_limit: None,
        })
    }

    /// A wgpu backend on the caller's device and queue (a runtime's own). The device's
    /// features and limits are used as they are; the crate needs none beyond WebGPU's
    /// defaults and uses timestamp queries only where enabled. `info` names the adapter in
    /// messages (`adapter.get_info()`).
    #[cfg(feature = "wgpu")]
    #[cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))] // as in new_async
    pub fn from_wgpu(
        device: ::wgpu::Device,
        queue: ::wgpu::Queue,
        info: ::wgpu::AdapterInfo,
    ) -> Self {
        Backend {
            device: Device::Wgpu(std::sync::Arc::new(crate::wgpu::WgpuDevice::from_device(
                device, queue, info,
            ))),
            memory_limit: None,
        }
    }

    /// This backend with a cap of `bytes` on what a prepared layer's weights and one forward's
    /// buffers ([`Footprint`]) may take together: device memory on a GPU, host memory on the
    /// CPU. Checked before anything is allocated or launched; past it, [`MoeLayer::prepare`] or
    /// the forward returns [`Error::Limit`] with [`Resource::MemoryLimit`]. The device's own
    /// limits are checked as well, whichever is smaller wins.
    ///
    /// [`MoeLayer::prepare`]: crate::MoeLayer::prepare
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// The cap set with [`Backend::with_memory_limit`], if any.
    pub fn memory_limit(&self) -> Option<u64> {
        self.memory_limit
    }

    /// Checks that weights of `weight_bytes` fit before they are uploaded: the memory limit,
    /// and on CUDA the free device memory. (wgpu reports no free memory: its buffer sizes are
    /// checked as they are created, and an out-of-memory there is an [`Error::Limit`] too.)
    pub fn check_weights(&self, weight_bytes: u64) -> Result<()> {
        let kind = self.kind();
        let what = || "the layer's weights".to_string();
        if let Some(cap) = self.memory_limit {
            limits::check(kind, Resource::MemoryLimit, what, weight_bytes, cap)?;
        }
        match &self.device {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => limits::check(
                kind,
                Resource::DeviceMemory,
                what,
                weight_bytes,
                d.free_memory()?,
            ),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(_) => Ok(()),
        }
    }

    /// Checks, before anything is allocated or launched, that a forward of `tokens` tokens
    /// through `layer` fits this backend with `resident` bytes (the prepared weights) already
    /// taken: every buffer within the kernels' index range and the device's buffer and
    /// binding sizes, all of them within the free device (or host) memory and the memory limit.
    pub fn check_forward(&self, layer: &LayerShape, tokens: usize, resident: u64) -> Result<()> {
        self.check_forward_in(layer, tokens, DType::F32, resident)
    }

    /// [`Backend::check_forward`] for activations in `act` (the f16 / bf16 activation buffers
    /// take half the bytes).
    pub fn check_forward_in(
        &self,
        layer: &LayerShape,
        tokens: usize,
        act: DType,
        resident: u64,
    ) -> Result<()> {
        let fp = Footprint::forward_in(layer, tokens, act);
        let kind = self.kind();
        let total = fp.total_bytes();
        let what = || format!("a {tokens}-token forward's buffers");
        match &self.device {
            Device::Cpu => {
                // The f32 stage buffers plus the f64 temporaries of the stage running: about 3×.
                limits::check_host(kind, what, total.saturating_mul(3))?;
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                fp.check_elements(kind, crate::cuda::context::MAX_INDEX as u64)?;
                limits::check(kind, Resource::DeviceMemory, what, total, d.free_memory()?)?;
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu(d) => {
                fp.check_each(kind, Resource::BufferSize, d.limits.max_buffer_size)?;
                fp.check_each(
                    kind,
                    Resource::BindingSize,
                    d.limits.max_storage_buffer_binding_size,
                )?;
                fp.check_elements(kind, u64::from(u32::MAX))?;
            }
        }
        if kind != BackendKind::Cpu {
            // A GPU forward's x copy and read-backs live on the host.
            limits::check_host(
                kind,
                || "the forward's read-backs".into(),
                fp.host_readback_bytes(),
            )?;
        }
        if let Some(cap) = self.memory_limit {
            limits::check(
                kind,
                Resource::MemoryLimit,
                || format!("the weights ({resident} bytes) and a {tokens}-token forward's buffers"),
                total.saturating_add(resident),
                cap,
            )?;
        }
        Ok(())
    }

    /// Waits, without blocking, until the device has answered for everything done so far:
    /// on wasm32 the wgpu error scopes of buffer, shader and pipeline creation are promises,
    /// and their first error is returned here (natively, and on the CPU, they were answered
    /// at once: `Ok`). The async entry points call it before they return.
    pub async fn settled(&self) -> Result<()> {
        match &self.device {
            #[cfg(feature = "wgpu")]
            Device::Wgpu(d) => d.settled().await,
            _ => Ok(()),
        }
    }

    /// The adapter's name, API and device type on wgpu (`"SwiftShader Device (Vulkan) on
    /// BrowserWebGpu, Cpu"`), the device name on CUDA, `"host"` on the CPU.
    pub fn adapter_name(&self) -> String {
        match &self.device {
            Device::Cpu => "host".into(),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => format!("{d:?}"),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(d) => {
                let i = &d.info;
                let name = if i.name.is_empty() {
                    "unnamed adapter"
                } else {
                    &i.name
                };
                let driver = format!("{} {}", i.driver, i.driver_info);
                let driver = driver.trim();
                let mut s = format!("{name} on {:?}, {:?}", i.backend, i.device_type);
                if !driver.is_empty() {
                    s += &format!(" ({driver})");
                }
                if i.vendor != 0 || i.device != 0 {
                    s += &format!(" [{:04x}:{:04x}]", i.vendor, i.device);
                }
                s
            }
        }
    }

    /// Which kind this is.
    pub fn kind(&self) -> BackendKind {
        match self.device {
            Device::Cpu => BackendKind::Cpu,
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => BackendKind::Cuda,
            #[cfg(feature = "wgpu")]
            Device::Wgpu(_) => BackendKind::Wgpu,
        }
    }

    /// Stage 0: `logits` `[T, E]` from `x` `[T, H]`, `weight` `[E, H]`, `bias` `[E]`.
    pub fn router(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        logits: &mut [f32],
    ) -> Result<()> {
        let (t, _) = shape::matrix(Stage::Router, "x", x)?;
        let (e, _) = shape::matrix(Stage::Router, "router weight", weight)?;
        shape::expect_len(
            Stage::Router,
            "logits",
            logits.len(),
            shape::mul(Stage::Router, "T x E", t, e)?,
        )?;
        match self.device {
            Device::Cpu => narrow(&cpu::router::router_logits(x, weight, bias)?, logits),
            #[cfg(feature = "cuda")]
            Device::Cuda(ref d) => crate::cuda::host::router(d, x, weight, bias, logits)?,
            #[cfg(feature = "wgpu")]
            Device::Wgpu(ref d) => crate::wgpu::host::router(d, x, weight, bias, logits)?,
        }
        Ok(())
    }

    /// Stage 1: routing of `logits` `[T, E]` into `out` (sized by [`GateBuffers::poisoned`]).
    pub fn gate(
        &self,
        logits: &[f32],
        correction_bias: Option<&Tensor>,
        cfg: &RoutingConfig,
        out: &mut GateBuffers,
    ) -> Result<()> {
        let st = Stage::Gate;
        cfg.validate(out.experts)?;
        shape::expect_eq(st, "gate buffer slots", out.slots, cfg.slots(out.experts))?;
        shape::expect_len(
            st,
            "logits",
            logits.len(),
            shape::mul(st, "T x E", out.tokens, out.experts)?,
        )?;
        out.check_sizes()?;
        if let Some(b) = correction_bias {
            shape::expect_shape(st, "score_correction_bias", b, &[out.experts])?;
        }
        match self.device {
            Device::Cpu => cpu::device::gate_into(logits, correction_bias, cfg, out)?,
            #[cfg(feature = "cuda")]
            Device::Cuda(ref d) => crate::cuda::host::gate(d, logits, correction_bias, cfg, out)?,
            #[cfg(feature = "wgpu")]
            Device::Wgpu(ref d) => crate::wgpu::host::gate(d, logits, correction_bias, cfg, out)?,
        }
        Ok(())
    }

    /// Stage 2: the canonical permutation of `gate`'s assignments and the gathered rows of `x`.
    pub fn permute(&self, gate: &GateBuffers, x: &Tensor, out: &mut PermuteBuffers) -> Result<()> {
        let st = Stage::Permute;
        let (t, h) = shape::matrix(st, "x", x)?;
        shape::expect_eq(st, "x rows (T)", t, gate.tokens)?;
        shape::expect_eq(st, "permute buffer T", out.tokens, gate.tokens)?;
        shape::expect_eq(st, "permute buffer slots", out.slots, gate.slots)?;
        shape::expect_eq(st, "permute buffer E", out.experts, gate.experts)?;
        shape::expect_eq(st, "permute buffer H", out.hidden, h)?;
        out.check_sizes()?;
        gate.check_sizes()?;
        cpu::gate::check_ids(&gate.topk_ids, gate.experts)?;
        match self.device {
            // The f32 stage API: x's values are exact in f32 whatever its dtype.
            Device::Cpu => cpu::device::permute_into(gate, x, DType::F32, out)?,
            #[cfg(feature = "cuda")]
            Device::Cuda(ref d) => crate::cuda::host::permute(d, gate, x, out)?,
            #[cfg(feature = "wgpu")]
            Device::Wgpu(ref d) => crate::wgpu::host::permute(d, gate, x, out)?,
        }
        Ok(())
    }

    /// Stage 3: `y_perm` `[T·slots, H]` for the rows of `perm`. Rows past
    /// `expert_offsets[E]` (dropped assignments) are not part of the result: no backend
    /// promises their contents and combine never reads them.
    pub fn expert_gemm(
        &self,
        perm: &PermuteBuffers,
        w: &ExpertWeights,
        act: Activation,
        y_perm: &mut [f32],
    ) -> Result<()> {
        let st = Stage::ExpertGemm;
        let d = w.dims(act)?;
        shape::expect_eq(st, "experts (E)", d.experts, perm.experts)?;
        shape::expect_eq(st, "hidden (H)", d.hidden, perm.hidden)?;
        perm.check_sizes()?;
        shape::expect_len(st, "y_perm", y_perm.len(), perm.x_perm.len())?;
        cpu::expert_gemm::check_offsets(&perm.expert_offsets, perm.tokens * perm.slots)?;
        match self.device {
            Device::Cpu => {
                let xp: Vec<f64> = perm.x_perm.iter().map(|&v| f64::from(v)).collect();
                narrow(
                    &cpu::expert_gemm::expert_ffn(&xp, &perm.expert_offsets, w, act)?,
                    y_perm,
                );
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ref d) => crate::cuda::host::expert_gemm(
                d,
                &perm.x_perm,
                &perm.expert_offsets,
                w,
                act,
                y_perm,
            )?,
            #[cfg(feature = "wgpu")]
            Device::Wgpu(ref d) => crate::wgpu::host::expert_gemm(
                d,
                &perm.x_perm,
                &perm.expert_offsets,
                w,
                act,
                y_perm,
            )?,
        }
        Ok(())
    }

    /// Stage 3, shared expert: `out` `[T, H]` = the shared FFN (`w` as one expert) on `x`.
    pub fn shared_expert(
        &self,
        x: &Tensor,
        w: &ExpertWeights,
        act: Activation,
        out: &mut [f32],
    ) -> Result<()> {
        let (t, h) = shape::matrix(Stage::ExpertGemm, "x", x)?;
        shape::expect_len(
            Stage::ExpertGemm,
            "shared output",
            out.len(),
            shape::mul(Stage::ExpertGemm, "T x H", t, h)?,
        )?;
        match self.device {
            Device::Cpu => narrow(&cpu::expert_gemm::shared_ffn(x, w, act)?, out),
            #[cfg(feature = "cuda")]
            Device::Cuda(ref d) => {
                w.dims(act)?;
                crate::cuda::host::expert_gemm(d, &x.to_f32_vec(), &[0, t as u32], w, act, out)?
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu(ref d) => {
                w.dims(act)?;
                crate::wgpu::host::expert_gemm(d, &x.to_f32_vec(), &[0, t as u32], w, act, out)?
            }
        }
        Ok(())
    }

    /// Stage 4: `y` `[T, H]` = `output_scale · Σ_j w · y_perm[row]` in slot order, plus the
    /// shared expert `(output [T,H], optional gate logits [T])`.
    pub fn combine(
        &self,
        y_perm: &[f32],
        gate: &GateBuffers,
        perm: &PermuteBuffers,
        shared: Option<(&[f32], Option<&[f32]>)>,
        output_scale: f32,
        y: &mut [f32],
    ) -> Result<()> {
        let st = Stage::Combine;
        gate.check_sizes()?;
        perm.check_sizes()?;
        shape::expect_len(st, "y_perm", y_perm.len(), perm.x_perm.len())?;
        shape::expect_len(
            st,
            "y",
            y.len(),
            shape::mul(st, "T x H", gate.tokens, perm.hidden)?,
        )?;
        match self.device {
            Device::Cpu => narrow(
                &cpu::device::combine_f64(
                    y_perm,
                    gate,
                    &perm.row_of_assignment,
                    perm.hidden,
                    shared,
                    f64::from(output_scale),
                )?,
                y,
            ),
            #[cfg(feature = "cuda")]
            Device::Cuda(ref d) => {
                crate::cuda::host::combine(d, y_perm, gate, perm, shared, output_scale, y)?
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu(ref d) => {
                crate::wgpu::host::combine(d, y_perm, gate, perm, shared, output_scale, y)?
            }
        }
        Ok(())
    }
}

/// Rounds f64 results into an f32 output buffer of the same length.
fn narrow(src: &[f64], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s as f32;
    }
}

/// Device-to-device copy bandwidth in GB/s (bytes read + written), median of 5 copies of
/// `bytes` after one warm-up; the bandwidth ceiling `moe bench` reports against.
pub fn copy_bandwidth(dev: &Backend, bytes: usize) -> Result<f64> {
    let bytes = bytes.max(1 << 20);
    let secs = match &dev.device {
        Device::Cpu => {
            let src = vec![1u8; bytes];
            let mut dst = vec![0u8; bytes];
            let mut t = Vec::new();
            for _ in 0..6 {
                let start = web_time::Instant::now();
                dst.copy_from_slice(&src);
                t.push(start.elapsed().as_secs_f64());
                std::hint::black_box(&dst);
            }
            t.remove(0);
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d.copy_seconds(bytes)?,
        #[cfg(feature = "wgpu")]
        Device::Wgpu(d) => d.copy_seconds(bytes)?,
    };
    Ok(2.0 * bytes as f64 / secs / 1e9)
}
