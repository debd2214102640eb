//! WebGPU path: WGSL shaders in `shaders/` run through wgpu (Vulkan, Metal, DX12, lavapipe).
//!
//! One module per stage encodes that stage's dispatches on device buffers; a layer forward
//! records every stage into one command encoder and submits once, with no read-back inside.
//! [`context`] owns the device, typed buffers and the pipeline cache; [`weights`] packs and
//! chunks weight matrices under the adapter's binding limit.

pub mod act;
pub mod asynch;
pub mod combine;
pub mod context;
pub mod device;
// Expert-parallel ranks run on threads (`RankStages: Send + Sync`); wgpu's web handles are
// neither, so there are no wgpu ranks on wasm32.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod ep;
pub mod expert_gemm;
pub mod gate;
pub mod host;
pub mod kernels;
pub mod permute;
pub mod router;
pub mod scratch;
pub mod weights;

pub use context::{GpuBuffer, WgpuDevice};

use crate::tensor::DType;
use act::Act;

/// Stage 1's outputs on the device, `[T, slots]` token-major (counts `[E]`).
#[derive(Debug)]
pub struct GateGpu {
    /// Expert of each assignment.
    pub topk_ids: GpuBuffer<u32>,
    /// Weight applied per assignment, 0 where dropped.
    pub topk_weights: GpuBuffer<f32>,
    /// 1 where kept.
    pub kept: GpuBuffer<u32>,
    /// Kept assignments per expert, `[E]`.
    pub counts: GpuBuffer<u32>,
}

impl GateGpu {
    /// Device buffers for `tokens × slots` assignments over `experts` experts.
    pub fn alloc(
        dev: &WgpuDevice,
        tokens: usize,
        slots: usize,
        experts: usize,
    ) -> crate::Result<Self> {
        let n = tokens * slots;
        Ok(GateGpu {
            topk_ids: dev.alloc(n, "topk_ids")?,
            topk_weights: dev.alloc(n, "topk_weights")?,
            kept: dev.alloc(n, "kept")?,
            counts: dev.alloc(experts, "counts")?,
        })
    }
}

/// Stage 2's outputs on the device.
#[derive(Debug)]
pub struct PermuteGpu {
    /// `[E + 1]`.
    pub expert_offsets: GpuBuffer<u32>,
    /// `[T·slots]`.
    pub sorted_assignment: GpuBuffer<u32>,
    /// `[T·slots]`.
    pub row_of_assignment: GpuBuffer<u32>,
    /// `[T·slots, H]` in `dtype` as u32 words, rows padded to [`act::stride`] elements.
    pub x_perm: GpuBuffer<u32>,
    /// The activation dtype of `x_perm` (that of the gathered `x`).
    pub dtype: DType,
}

impl PermuteGpu {
    /// Device buffers for `tokens × slots` assignments of width `hidden` in activation dtype
    /// `dtype`.
    pub fn alloc(
        dev: &WgpuDevice,
        tokens: usize,
        slots: usize,
        experts: usize,
        hidden: usize,
        dtype: DType,
    ) -> crate::Result<Self> {
        let n = tokens.saturating_mul(slots);
        Ok(PermuteGpu {
            expert_offsets: dev.alloc(experts + 1, "expert_offsets")?,
            sorted_assignment: dev.alloc(n, "sorted_assignment")?,
            row_of_assignment: dev.alloc(n, "row_of_assignment")?,
            x_perm: dev.alloc(act::matrix_words(n, hidden, dtype), "x_perm")?,
            dtype,
        })
    }

    /// `x_perm` as the activation matrix `[rows, hidden]` (padded rows).
    pub fn x_perm_act(&self, rows: usize, hidden: usize) -> Act<'_> {
        Act::padded(&self.x_perm, self.dtype, rows, hidden)
    }
}

/// One wgpu adapter.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    /// The adapter's name.
    pub name: String,
    /// The graphics API it runs on (`Vulkan`, `Metal`, `Dx12`, ...).
    pub backend: String,
    /// The device type (`DiscreteGpu`, `IntegratedGpu`, `Cpu` for lavapipe, ...).
    pub device_type: String,
    /// The driver's name and version information.
    pub driver: String,
    /// The optional features this crate can use that the adapter offers (`timestamp-query`,
    /// `subgroups` with the adapter's subgroup size range, `shader-f16`), or `none`.
    pub features: String,
}

/// Switches off Mesa's Vulkan device-select layer on a headless machine. That implicit layer
/// (loaded into every Vulkan instance) probes for a Wayland display and prints "error:
/// XDG_RUNTIME_DIR is invalid or not set in the environment." when there is no session; wgpu
/// picks its adapter itself, so without a usable `XDG_RUNTIME_DIR` this sets
/// `NODEVICE_SELECT=1`, unless the variable is already set. It changes the process
/// environment: call it first in `main`, before any other thread exists and before a wgpu
/// instance is created.
pub fn quiet_headless_vulkan() {
    let runtime_dir_ok =
        std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).is_dir());
    if !runtime_dir_ok && std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

/// The instance settings: `WGPU_*` variables are honoured; without `WGPU_BACKEND`, only the
/// primary backends (Vulkan, Metal, DX12) are tried, since wgpu would otherwise fall back to
/// OpenGL silently.
pub fn instance_descriptor() -> ::wgpu::InstanceDescriptor {
    let mut desc = ::wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if std::env::var_os("WGPU_BACKEND").is_none() {
        desc.backends = ::wgpu::Backends::PRIMARY;
    }
    desc
}

/// The optional features of `a` that matter here, as `moe info` prints them.
fn feature_summary(a: &::wgpu::Adapter) -> String {
    let f = a.features();
    let mut out = Vec::new();
    if f.contains(::wgpu::Features::TIMESTAMP_QUERY) {
        out.push("timestamp-query".to_string());
    }
    if f.contains(::wgpu::Features::SUBGROUP) {
        let i = a.get_info();
        out.push(format!(
            "subgroups (size {}..{})",
            i.subgroup_min_size, i.subgroup_max_size
        ));
    }
    if f.contains(::wgpu::Features::SHADER_F16) {
        out.push("shader-f16".to_string());
    }
    if out.is_empty() {
        "none".to_string()
    } else {
        out.join(", ")
    }
}

/// Lists the adapters wgpu finds. Instance creation honours `WGPU_BACKEND` and the other
/// `WGPU_*` variables.
pub fn probe() -> Result<Vec<AdapterSummary>, String> {
    let desc = instance_descriptor();
    let backends = desc.backends;
    let instance = ::wgpu::Instance::new(desc);
    let adapters = crate::asynch::poll_or_wait(instance.enumerate_adapters(backends))
        .ok_or("listing adapters would block on wasm32")?;
    if adapters.is_empty() {
        return Err("wgpu found no adapter (install a Vulkan driver, e.g. Mesa's lavapipe)".into());
    }
    Ok(adapters
        .iter()
        .map(|a| {
            let i = a.get_info();
            AdapterSummary {
                name: i.name,
                backend: format!("{:?}", i.backend),
                device_type: format!("{:?}", i.device_type),
                driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
                features: feature_summary(a),
            }
        })
        .collect())
}
