//! Device limits: what one forward needs and the checks every backend runs on it before it
//! allocates or launches anything.
//!
//! A forward's buffers are known from the layer's dims, its routing and T alone
//! ([`Footprint::forward`]), so a shape past a limit — one buffer larger than the device's
//! largest buffer or binding, more elements than a kernel's 32-bit index range, more bytes than
//! the memory free on the device or host (or than the limit set with
//! [`crate::Backend::with_memory_limit`]) — is an [`Error::Limit`] naming the resource, what
//! needed it, and both numbers, instead of an abort in the allocator, a driver error in the
//! middle of a launch sequence or a wgpu validation panic.
//!
//! Sizes are computed in `u128` and saturate at `u64::MAX`: no product of user-given sizes can
//! overflow on the way to the check.

use std::fmt;

use crate::config::LayerConfig;
use crate::cpu::expert_gemm::ExpertDims;
use crate::device::BackendKind;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Which limit a shape ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// Memory the host can give (`MemAvailable`, bounded by the cgroup's `memory.max`).
    HostMemory,
    /// Memory free on the GPU.
    DeviceMemory,
    /// The memory limit set on the backend with [`crate::Backend::with_memory_limit`].
    MemoryLimit,
    /// The largest single buffer the device creates (wgpu `max_buffer_size`).
    BufferSize,
    /// The largest storage binding (wgpu `max_storage_buffer_binding_size`).
    BindingSize,
    /// The elements a kernel addresses with its 32-bit index arithmetic.
    IndexRange,
    /// Workgroups or blocks in one launch.
    GridSize,
    /// Loop iterations one invocation may run (Mesa's lavapipe stops it past 65535).
    LoopIterations,
}

impl Resource {
    /// The unit `need` and `limit` are counted in.
    pub fn unit(self) -> &'static str {
        match self {
            Resource::IndexRange => "elements",
            Resource::GridSize => "workgroups",
            Resource::LoopIterations => "iterations",
            _ => "bytes",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::HostMemory => "available host memory",
            Resource::DeviceMemory => "free device memory",
            Resource::MemoryLimit => "backend's memory limit",
            Resource::BufferSize => "device's largest buffer",
            Resource::BindingSize => "device's largest storage binding",
            Resource::IndexRange => "kernels' 32-bit index range",
            Resource::GridSize => "device's largest grid",
            Resource::LoopIterations => "loop iterations per invocation",
        })
    }
}

/// An [`Error::Limit`] unless `need <= limit`.
pub fn check(
    backend: BackendKind,
    resource: Resource,
    what: impl FnOnce() -> String,
    need: u64,
    limit: u64,
) -> Result<()> {
    if need <= limit {
        return Ok(());
    }
    Err(Error::Limit {
        backend,
        resource,
        what: what(),
        need,
        limit,
    })
}

/// `a · b · …` in u64, saturating (a saturated size fails every check, as it should).
pub fn product(factors: &[usize]) -> u64 {
    let p = factors
        .iter()
        .try_fold(1u128, |acc, &f| acc.checked_mul(f as u128));
    p.map_or(u64::MAX, |p| u64::try_from(p).unwrap_or(u64::MAX))
}

/// One buffer of a forward (or, when `single` is false, an upper bound on several scratch
/// buffers, counted in the total only): its name and its length in 4-byte elements (every
/// activation, id and scratch buffer of every backend is f32 or u32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferNeed {
    /// The buffer's name in errors.
    pub name: &'static str,
    /// Length in elements.
    pub elements: u64,
    /// Bytes per element: 4, or 2 for activations in f16 / bf16.
    pub element_bytes: u64,
    /// One buffer, checked on its own against buffer, binding and index limits.
    pub single: bool,
}

/// One buffer named `name` of `elements` 4-byte elements.
fn one(name: &'static str, elements: u64) -> BufferNeed {
    BufferNeed {
        name,
        elements,
        element_bytes: 4,
        single: true,
    }
}

/// One activation buffer of `rows` rows of `cols` elements in `act`: 16-bit rows are counted
/// rounded up to an even length (wgpu pads its internal activation rows so), an upper bound
/// for every backend.
fn activation(name: &'static str, rows: u64, cols: usize, act: DType) -> BufferNeed {
    let (cols, element_bytes) = match act {
        DType::F32 => (cols, 4),
        DType::F16 | DType::BF16 => (cols.saturating_add(1) / 2 * 2, 2),
    };
    BufferNeed {
        name,
        elements: rows.saturating_mul(cols as u64),
        element_bytes,
        single: true,
    }
}

impl BufferNeed {
    /// Its size in bytes (saturating).
    pub fn bytes(&self) -> u64 {
        self.elements.saturating_mul(self.element_bytes)
    }
}

/// Every activation-sized buffer one forward allocates on the device (weights excluded): the
/// same list on CUDA and wgpu, scratch included at its largest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footprint {
    /// Tokens T of the forward.
    pub tokens: usize,
    /// The buffers, each with its size.
    pub buffers: Vec<BufferNeed>,
}

/// The parts of a layer a forward's buffers depend on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerShape {
    /// E, H and F of the routed experts.
    pub dims: ExpertDims,
    /// The layer's config (its routing sets the slots per token).
    pub config: LayerConfig,
    /// The shared expert's FFN width, when the layer has one.
    pub shared_ffn: Option<usize>,
    /// Whether the shared expert has a sigmoid gate (one more router launch).
    pub shared_gate: bool,
}

impl Footprint {
    /// The buffers of a forward of `tokens` tokens with f32 activations.
    pub fn forward(layer: &LayerShape, tokens: usize) -> Footprint {
        Self::forward_in(layer, tokens, DType::F32)
    }

    /// The buffers of a forward of `tokens` tokens with activations in `act`.
    pub fn forward_in(layer: &LayerShape, tokens: usize, act: DType) -> Footprint {
        let ExpertDims {
            experts: e,
            hidden: h,
            ffn: f,
        } = layer.dims;
        let t = tokens;
        let s = layer.config.routing.slots(e);
        let n = product(&[t, s]) as usize;
        // The permutation's scan table: (E + 1) counters per 256 assignments (wgpu's chunk;
        // CUDA's is larger, so this bounds both).
        let cells = product(&[e.saturating_add(1), n.div_ceil(256).max(1)]);
        let ts = product(&[t, s]);
        let mut b = vec![
            activation("x", t as u64, h, act),
            one("logits", product(&[t, e])),
            one("topk_ids", ts),
            one("topk_weights", ts),
            one("kept", ts),
            // An upper bound over both backends' gate scratch: CUDA's gate keeps up to 12
            // bytes per (token, expert) when E is too large for shared memory, expert choice
            // two more [T, E] arrays, capacity a rank per assignment and two per token. Each
            // of those is checked by the gate itself; here they count in the total.
            BufferNeed {
                name: "gate scratch",
                elements: product(&[t, e, 5]).saturating_add(product(&[t, s.saturating_add(2)])),
                element_bytes: 4,
                single: false,
            },
            one("sorted_assignment", ts),
            one("row_of_assignment", ts),
            one("permute scan table", cells),
            activation("x_perm", ts, h, act),
            activation("expert intermediate h", ts, f, act),
            activation("y_perm", ts, h, act),
            activation("y", t as u64, h, act),
        ];
        if let Some(fs) = layer.shared_ffn {
            b.push(activation("shared expert h", t as u64, fs, act));
            b.push(activation("shared expert y", t as u64, h, act));
        }
        if layer.shared_gate {
            b.push(one("shared gate logits", t as u64));
        }
        Footprint { tokens, buffers: b }
    }

    /// All buffers together, in bytes (saturating).
    pub fn total_bytes(&self) -> u64 {
        self.buffers
            .iter()
            .fold(0u64, |acc, b| acc.saturating_add(b.bytes()))
    }

    /// The bytes the host holds for the outputs a GPU forward reads back, plus x's f32 copy.
    pub fn host_readback_bytes(&self) -> u64 {
        ["x", "y", "topk_ids", "topk_weights", "kept"]
            .iter()
            .filter_map(|n| self.buffers.iter().find(|b| b.name == *n))
            .fold(0u64, |acc, b| acc.saturating_add(b.bytes()))
    }

    /// Each buffer within `max_elements` (a kernel's index range), as [`Resource::IndexRange`].
    pub fn check_elements(&self, backend: BackendKind, max_elements: u64) -> Result<()> {
        for b in self.buffers.iter().filter(|b| b.single) {
            check(
                backend,
                Resource::IndexRange,
                || format!("buffer {} of a {}-token forward", b.name, self.tokens),
                b.elements,
                max_elements,
            )?;
        }
        Ok(())
    }

    /// Each buffer within `max_bytes` as `resource` (buffer or binding size).
    pub fn check_each(
        &self,
        backend: BackendKind,
        resource: Resource,
        max_bytes: u64,
    ) -> Result<()> {
        for b in self.buffers.iter().filter(|b| b.single) {
            check(
                backend,
                resource,
                || format!("buffer {} of a {}-token forward", b.name, self.tokens),
                b.bytes(),
                max_bytes,
            )?;
        }
        Ok(())
    }
}

/// Bytes the host can still give this process: Linux's `MemAvailable`, bounded by the cgroup v2
/// `memory.max − memory.current` when the process runs under one. `None` where neither can be
/// read (other systems): then only the address-space bound [`isize::MAX`] is checked.
pub fn host_available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let avail = meminfo.as_deref().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb.saturating_mul(1024))
    });
    let read_u64 =
        |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let cgroup = match (
        read_u64("/sys/fs/cgroup/memory.max"),
        read_u64("/sys/fs/cgroup/memory.current"),
    ) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => None,
    };
    match (avail, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// Below this many bytes [`check_host`] does not read `/proc/meminfo` (tens of microseconds,
/// which would show in a GPU decode step's wall time): a host that cannot give 64 MiB is out
/// of memory whatever this crate checks.
pub const HOST_CHECK_FLOOR: u64 = 64 << 20;

/// An [`Error::Limit`] unless the host can hold `bytes` more (and the allocation is within
/// `isize::MAX`, Rust's own bound), checked before allocating anything that large.
pub fn check_host(backend: BackendKind, what: impl FnOnce() -> String, bytes: u64) -> Result<()> {
    if bytes <= HOST_CHECK_FLOOR {
        return Ok(());
    }
    let limit = host_available_bytes()
        .unwrap_or(u64::MAX)
        .min(isize::MAX as u64);
    check(backend, Resource::HostMemory, what, bytes, limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExpertChoice;

    fn shape(e: usize, h: usize, f: usize) -> LayerShape {
        LayerShape {
            dims: ExpertDims {
                experts: e,
                hidden: h,
                ffn: f,
            },
            config: LayerConfig::default(),
            shared_ffn: None,
            shared_gate: false,
        }
    }

    #[test]
    fn product_saturates_instead_of_overflowing() {
        assert_eq!(product(&[3, 5, 7]), 105);
        assert_eq!(product(&[]), 1);
        assert_eq!(product(&[usize::MAX, usize::MAX, 2]), u64::MAX);
        assert_eq!(product(&[0, usize::MAX]), 0);
    }

    #[test]
    fn footprint_counts_every_buffer_of_a_top2_forward() {
        // T = 10, E = 4, H = 6, F = 8, top-2: x 60, logits 40, 5 × [T, 2] = 100, gate scratch
        // 5 · 40 + 10 · 4 = 240, scan table 5 × 1, x_perm 120, h 160, y_perm 120, y 60.
        let fp = Footprint::forward(&shape(4, 6, 8), 10);
        let total: u64 = fp.buffers.iter().map(|b| b.elements).sum();
        assert_eq!(total, 60 + 40 + 100 + 240 + 5 + 120 + 160 + 120 + 60);
        assert_eq!(fp.total_bytes(), 4 * total);
        assert_eq!(fp.host_readback_bytes(), 4 * (60 + 60 + 60));
    }

    #[test]
    fn expert_choice_scales_with_t_times_e() {
        let mut s = shape(1000, 16, 16);
        s.config.routing.expert_choice = Some(ExpertChoice {
            capacity_factor: 1.0,
        });
        let fp = Footprint::forward(&s, 1_000_000);
        let x_perm = fp.buffers.iter().find(|b| b.name == "x_perm").unwrap();
        assert_eq!(x_perm.elements, 1_000_000 * 1000 * 16);
        let err = fp
            .check_elements(BackendKind::Cpu, u32::MAX as u64)
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Limit {
                resource: Resource::IndexRange,
                ..
            }
        ));
    }

    #[test]
    fn aggregate_scratch_counts_in_the_total_but_not_per_buffer() {
        // Logits [1e6, 1024] fit u32 indexing; the gate scratch bound (5 · T · E) does not,
        // and must not reject a shape whose every real buffer fits.
        let mut s = shape(1024, 1, 1);
        s.config.routing.top_k = 1;
        let fp = Footprint::forward(&s, 1_000_000);
        let scratch = fp.buffers.iter().find(|b| !b.single).unwrap();
        assert!(scratch.elements > u64::from(u32::MAX));
        fp.check_elements(BackendKind::Wgpu, u64::from(u32::MAX))
            .expect("every single buffer fits");
        assert!(fp.total_bytes() >= scratch.bytes());
    }

    #[test]
    fn absurd_sizes_saturate_and_fail_the_host_check() {
        let fp = Footprint::forward(&shape(usize::MAX / 2, usize::MAX / 3, 7), usize::MAX);
        assert_eq!(fp.total_bytes(), u64::MAX);
        let err = check_host(BackendKind::Cpu, || "absurd".into(), fp.total_bytes()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("available host memory"), "{msg}");
    }

    #[test]
    fn host_memory_is_readable_here() {
        // CI and the development machines are Linux: the check must not silently disappear.
        if cfg!(target_os = "linux") {
            let b = host_available_bytes().expect("MemAvailable readable on Linux");
            assert!(b > 0);
        }
    }
}
