//! The wgpu device: adapter and device selection, typed storage buffers, the pipeline cache,
//! explicit read-back and GPU timestamps. One [`WgpuDevice`] per backend handle; shader modules
//! and pipelines are created once per (kernel, specialisation constants) and cached.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ::wgpu::util::DeviceExt;
use bytemuck::Pod;

use crate::device::BackendKind;
use crate::error::{Error, Result};
use crate::limits::{self, Resource};
use crate::stage::Stage;
use crate::wgpu::kernels::Kernel;

/// Invocations per workgroup of the 1-D elementwise kernels (every shader's `WG` constant).
pub const WG: u32 = 64;

/// A typed storage buffer of `len` elements of `T` (at least 4 bytes are allocated, since a
/// zero-sized binding is invalid; `len` is what the data holds).
#[derive(Debug)]
pub struct GpuBuffer<T> {
    /// The wgpu buffer.
    pub buffer: ::wgpu::Buffer,
    /// Elements of `T` it holds.
    pub len: usize,
    _t: PhantomData<T>,
}

impl<T> GpuBuffer<T> {
    /// Wraps a buffer the caller created with `len` elements of `T`.
    pub fn from_raw(buffer: ::wgpu::Buffer, len: usize) -> Self {
        GpuBuffer {
            buffer,
            len,
            _t: PhantomData,
        }
    }

    /// The whole buffer as a binding resource.
    pub fn binding(&self) -> ::wgpu::BindingResource<'_> {
        self.buffer.as_entire_binding()
    }
}

/// An error from the wgpu backend.
pub(crate) fn gpu_err(what: impl Into<String>) -> Error {
    Error::Device {
        backend: BackendKind::Wgpu,
        what: what.into(),
    }
}

/// Why the wgpu backend cannot be created here.
pub(crate) fn unavailable(what: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: BackendKind::Wgpu,
        reason: what.into(),
    }
}

/// An [`Error::Limit`] of the wgpu backend unless `need <= limit`.
pub(crate) fn within(
    resource: Resource,
    what: impl FnOnce() -> String,
    need: u64,
    limit: u64,
) -> Result<()> {
    limits::check(BackendKind::Wgpu, resource, what, need, limit)
}

/// `n` as a shader `u32`, or an [`Error::Limit`] on the shaders' 32-bit index range.
pub(crate) fn index_u32(stage: Stage, what: &str, n: usize) -> Result<u32> {
    within(
        Resource::IndexRange,
        || format!("{stage}: {what}"),
        n as u64,
        u64::from(u32::MAX),
    )?;
    Ok(n as u32)
}

/// The device of the `tests` unit tests: `None` (said on stdout) without an adapter, except
/// under CI, where a missing adapter fails the test instead of skipping it.
#[cfg(test)]
pub(crate) fn test_device(tests: &str) -> Option<WgpuDevice> {
    match WgpuDevice::new() {
        Ok(d) => Some(d),
        Err(err) => {
            assert!(
                std::env::var("CI").is_err(),
                "CI needs a wgpu adapter: {err}"
            );
            println!("wgpu {tests} unit tests skipped: {err}");
            None
        }
    }
}

/// Cached pipelines keyed by kernel and its specialisation constants (as f64 bits).
type PipelineKey = (Kernel, Vec<(&'static str, u64)>);

/// A wgpu device with its queue, limits and caches.
pub struct WgpuDevice {
    /// The logical device.
    pub device: ::wgpu::Device,
    /// The queue every submission and buffer write goes to.
    pub queue: ::wgpu::Queue,
    /// The adapter's name, backend, device type and driver.
    pub info: ::wgpu::AdapterInfo,
    /// The device's limits (buffer and binding sizes, workgroups per dimension).
    pub limits: ::wgpu::Limits,
    /// Whether GPU timestamps are available (TIMESTAMP_QUERY + inside passes).
    pub timestamps: bool,
    /// Whether the kernels that use subgroup operations run (the device has wgpu's SUBGROUP
    /// feature; a runtime's own device only if it was created with it). They give the same
    /// bits as the portable ones; set it to `false` to run the portable kernels only.
    pub subgroups: bool,
    modules: Mutex<HashMap<&'static str, Arc<::wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<::wgpu::ComputePipeline>>>,
    /// Buffers created through this handle (storage, uniform, read-back staging).
    allocations: AtomicU64,
    /// Error scopes popped but not yet awaited (wasm32: see `crate::wgpu::asynch`).
    #[cfg(target_arch = "wasm32")]
    pub(crate) deferred: crate::wgpu::asynch::Deferred,
}

impl std::fmt::Debug for WgpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WgpuDevice({} on {:?})",
            self.info.name, self.info.backend
        )
    }
}

impl WgpuDevice {
    /// Opens the preferred adapter (`WGPU_BACKEND`, `WGPU_ADAPTER_NAME`, `WGPU_POWER_PREF` are
    /// honoured) with its full limits. Never panics: every failure is an error. Blocks:
    /// [`WgpuDevice::new_async`] under [`crate::asynch::block_on`] (on wasm32, an
    /// [`Error::WouldBlock`]: use `new_async` there).
    pub fn new() -> Result<Self> {
        crate::asynch::block_on("WgpuDevice::new", Self::new_async())
    }

    /// GPU timestamps: both features are needed.
    pub(crate) const TIMESTAMPS: ::wgpu::Features =
        ::wgpu::Features::TIMESTAMP_QUERY.union(::wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);

    /// Optional features the crate uses where the device has them: GPU timestamps, subgroups
    /// (gate_select's reductions, shaders/gate_subgroups.wgsl).
    pub(crate) const WANTED: ::wgpu::Features = Self::TIMESTAMPS.union(::wgpu::Features::SUBGROUP);

    /// A handle on a device and queue that the caller created (a runtime's own): the crate
    /// records into and submits on them, and uses the device's limits and features as they are.
    /// `info` describes the adapter (for messages and `moe info`).
    pub fn from_device(
        device: ::wgpu::Device,
        queue: ::wgpu::Queue,
        info: ::wgpu::AdapterInfo,
    ) -> Self {
        Self::wrap(device, queue, info)
    }

    fn wrap(device: ::wgpu::Device, queue: ::wgpu::Queue, info: ::wgpu::AdapterInfo) -> Self {
        let timestamps = device.features().contains(Self::TIMESTAMPS);
        let subgroups = device.features().contains(::wgpu::Features::SUBGROUP);
        let limits = device.limits();
        WgpuDevice {
            timestamps,
            subgroups,
            device,
            queue,
            info,
            limits,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            allocations: AtomicU64::new(0),
            #[cfg(target_arch = "wasm32")]
            deferred: Default::default(),
        }
    }

    /// How many buffers this handle has created so far (storage, uniform and read-back
    /// staging buffers): a prepared forward on the device path adds none.
    pub fn allocations(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    pub(crate) fn count_allocation(&self) {
        self.allocations.fetch_add(1, Ordering::Relaxed);
    }

    /// The largest storage binding and buffer, in bytes.
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// The compute pipeline of `kernel` specialised with `constants` (WGSL `override`s), created
    /// on first use and cached.
    pub fn pipeline(
        &self,
        kernel: Kernel,
        constants: &[(&'static str, f64)],
    ) -> Result<Arc<::wgpu::ComputePipeline>> {
        let key = (
            kernel,
            constants.iter().map(|(n, v)| (*n, v.to_bits())).collect(),
        );
        let mut cache = self
            .pipelines
            .lock()
            .map_err(|_| gpu_err("pipeline cache poisoned"))?;
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let module = self.module(kernel)?;
        let scope = self
            .device
            .push_error_scope(::wgpu::ErrorFilter::Validation);
        let p = self
            .device
            .create_compute_pipeline(&::wgpu::ComputePipelineDescriptor {
                label: Some(kernel.entry_point()),
                layout: None,
                module: &module,
                entry_point: Some(kernel.entry_point()),
                compilation_options: ::wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        let entry = kernel.entry_point();
        self.settle(scope, move |e| gpu_err(format!("pipeline {entry}: {e}")))?;
        let p = Arc::new(p);
        cache.insert(key, p.clone());
        Ok(p)
    }

    fn module(&self, kernel: Kernel) -> Result<Arc<::wgpu::ShaderModule>> {
        if kernel.needs_subgroups() && !self.device.features().contains(::wgpu::Features::SUBGROUP)
        {
            return Err(gpu_err(format!(
                "{} needs subgroups, which this device was not created with \
                 (set WgpuDevice::subgroups to false)",
                kernel.entry_point()
            )));
        }
        let (file, source) = kernel.source();
        let mut cache = self
            .modules
            .lock()
            .map_err(|_| gpu_err("module cache poisoned"))?;
        if let Some(m) = cache.get(file) {
            return Ok(m.clone());
        }
        let scope = self
            .device
            .push_error_scope(::wgpu::ErrorFilter::Validation);
        let m = self
            .device
            .create_shader_module(::wgpu::ShaderModuleDescriptor {
                label: Some(file),
                source: ::wgpu::ShaderSource::Wgsl(source.into()),
            });
        self.settle(scope, move |e| gpu_err(format!("shader {file}: {e}")))?;
        let m = Arc::new(m);
        cache.insert(file, m.clone());
        Ok(m)
    }

    /// A storage buffer holding `data`.
    pub fn upload<T: Pod>(&self, data: &[T], label: &str) -> Result<GpuBuffer<T>> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let contents = if bytes.len() >= 4 { bytes } else { &[0u8; 4] };
        let buffer = self.create_checked(label, contents.len() as u64, |dev| {
            dev.create_buffer_init(&::wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage: storage_usage(),
            })
        })?;
        Ok(GpuBuffer {
            buffer,
            len: data.len(),
            _t: PhantomData,
        })
    }

    /// An uninitialised storage buffer of `len` elements (its contents are whatever the first
    /// kernel writes; wgpu zero-fills new buffers).
    pub fn alloc<T: Pod>(&self, len: usize, label: &str) -> Result<GpuBuffer<T>> {
        let bytes = limits::product(&[len, std::mem::size_of::<T>()])
            .max(4)
            .next_multiple_of(4);
        let buffer = self.create_checked(label, bytes, |dev| {
            dev.create_buffer(&::wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: storage_usage(),
                mapped_at_creation: false,
            })
        })?;
        Ok(GpuBuffer {
            buffer,
            len,
            _t: PhantomData,
        })
    }

    /// Creates a buffer of `bytes` with `create` after checking it against the adapter's
    /// largest buffer, and catches what wgpu would otherwise hand its panicking default error
    /// handler: out-of-memory becomes an [`Error::Limit`] on device memory, a validation error
    /// a backend error.
    fn create_checked(
        &self,
        label: &str,
        bytes: u64,
        create: impl FnOnce(&::wgpu::Device) -> ::wgpu::Buffer,
    ) -> Result<::wgpu::Buffer> {
        limits::check(
            BackendKind::Wgpu,
            Resource::BufferSize,
            || format!("buffer {label}"),
            bytes,
            self.limits.max_buffer_size,
        )?;
        self.count_allocation();
        let oom = self
            .device
            .push_error_scope(::wgpu::ErrorFilter::OutOfMemory);
        let invalid = self
            .device
            .push_error_scope(::wgpu::ErrorFilter::Validation);
        let buffer = create(&self.device);
        let what = format!("creating buffer {label} ({bytes} bytes)");
        let invalid = self.settle(invalid, move |e| gpu_err(format!("{what}: {e}")));
        let what = format!("buffer {label}");
        let oom = self.settle(oom, move |_| Error::Limit {
            backend: BackendKind::Wgpu,
            resource: Resource::DeviceMemory,
            what,
            need: bytes,
            // wgpu reports no free-memory figure; 0 says "none was left".
            limit: 0,
        });
        oom.and(invalid)?;
        Ok(buffer)
    }

    /// A storage buffer of `len` elements whose every byte is 0xFF (NaN as f32, `u32::MAX` as
    /// u32), so that an element a kernel fails to write is caught by the stage tests.
    pub fn alloc_poisoned<T: Pod>(&self, len: usize, label: &str) -> Result<GpuBuffer<T>> {
        let buf = self.alloc::<T>(len, label)?;
        // The size `alloc` checked and created, padding included.
        self.queue
            .write_buffer(&buf.buffer, 0, &vec![0xFFu8; buf.buffer.size() as usize]);
        Ok(buf)
    }

    /// A uniform buffer with the kernel's parameters (a `#[repr(C)]` Pod struct).
    pub fn uniform<T: Pod>(&self, params: &T) -> ::wgpu::Buffer {
        self.count_allocation();
        self.device
            .create_buffer_init(&::wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::bytes_of(params),
                usage: ::wgpu::BufferUsages::UNIFORM | ::wgpu::BufferUsages::COPY_DST,
            })
    }

    /// Records one dispatch of `groups` workgroups in its own compute pass.
    pub fn dispatch(
        &self,
        enc: &mut ::wgpu::CommandEncoder,
        pipeline: &::wgpu::ComputePipeline,
        bind: &::wgpu::BindGroup,
        groups: (u32, u32, u32),
    ) {
        if groups.0 == 0 || groups.1 == 0 || groups.2 == 0 {
            return;
        }
        let mut pass = enc.begin_compute_pass(&::wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, bind, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
    }

    /// A 2-D grid covering `n` items with `per_group` items per workgroup: x up to the
    /// per-dimension limit, y for the rest. Shaders flatten `wid.x + wid.y · nwg.x`.
    /// An [`Error::Limit`] when `n` needs more than the limit squared.
    pub fn grid(&self, n: usize, per_group: u32) -> Result<(u32, u32, u32)> {
        let groups = n.div_ceil(per_group.max(1) as usize) as u64;
        let max_x = u64::from(self.limits.max_compute_workgroups_per_dimension.max(1));
        if groups == 0 {
            return Ok((0, 0, 0));
        }
        within(
            Resource::GridSize,
            || format!("a launch over {n} items, {per_group} per workgroup"),
            groups,
            max_x * max_x,
        )?;
        let x = groups.min(max_x);
        Ok((x as u32, groups.div_ceil(x) as u32, 1))
    }

    /// A new command encoder.
    pub fn encoder(&self) -> ::wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&::wgpu::CommandEncoderDescriptor { label: Some("moe") })
    }

    /// Submits `enc` and waits for the queue to finish it.
    pub fn submit_and_wait(&self, enc: ::wgpu::CommandEncoder) -> Result<()> {
        let scope = self
            .device
            .push_error_scope(::wgpu::ErrorFilter::Validation);
        let idx = self.queue.submit([enc.finish()]);
        self.settle(scope, |e| gpu_err(format!("submission rejected: {e}")))?;
        self.device
            .poll(::wgpu::PollType::Wait {
                submission_index: Some(idx),
                timeout: None,
            })
            .map_err(|e| gpu_err(format!("waiting for the GPU failed: {e}")))?;
        Ok(())
    }

    /// Copies `buf` back to the host (an explicit, synchronous read-back).
    pub fn read<T: Pod>(&self, buf: &GpuBuffer<T>) -> Result<Vec<T>> {
        self.read_prefix(buf, buf.len)
    }

    /// The first `n` elements of `buf` (at most its `len`), copied to the host: blocks
    /// ([`WgpuDevice::read_prefix_async`] under [`crate::asynch::block_on`]).
    pub fn read_prefix<T: Pod>(&self, buf: &GpuBuffer<T>, n: usize) -> Result<Vec<T>> {
        crate::asynch::block_on("WgpuDevice::read_prefix", self.read_prefix_async(buf, n))
    }
}

fn storage_usage() -> ::wgpu::BufferUsages {
    ::wgpu::BufferUsages::STORAGE | ::wgpu::BufferUsages::COPY_SRC | ::wgpu::BufferUsages::COPY_DST
}

impl WgpuDevice {
    /// Median seconds of one dispatch of shaders/read_ceiling.wgsl reading `bytes` (rounded to
    /// whole 16-byte words, at most the largest binding) with coalesced 16-byte loads (5 runs
    /// after a warm-up; timestamps when available, else submit-and-wait wall time), and the
    /// bytes it read: the rate a WGSL kernel that only streams memory reaches on this adapter.
    pub fn read_seconds(&self, bytes: usize) -> Result<(f64, u64)> {
        const PER: u32 = 4096;
        let words4 = ((bytes as u64).min(self.max_binding_bytes()) / 16).max(1);
        let n4 = u32::try_from(words4).unwrap_or(u32::MAX);
        let groups = n4.div_ceil(PER);
        let src = self.alloc::<u32>(4 * n4 as usize, "read ceiling src")?;
        let out = self.alloc::<u32>(64 * groups as usize, "read ceiling out")?;
        let params = self.uniform(&[n4, PER, 0, 0]);
        let source = include_str!("../../shaders/read_ceiling.wgsl");
        let scope = self
            .device
            .push_error_scope(::wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(::wgpu::ShaderModuleDescriptor {
                label: Some("read_ceiling.wgsl"),
                source: ::wgpu::ShaderSource::Wgsl(source.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&::wgpu::ComputePipelineDescriptor {
                label: Some("read_ceiling"),
                layout: None,
                module: &module,
                entry_point: Some("read_ceiling"),
                compilation_options: Default::default(),
                cache: None,
            });
        let bind = self.device.create_bind_group(&::wgpu::BindGroupDescriptor {
            label: Some("read ceiling"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                ::wgpu::BindGroupEntry {
                    binding: 0,
                    resource: params.as_entire_binding(),
                },
                ::wgpu::BindGroupEntry {
                    binding: 1,
                    resource: src.binding(),
                },
                ::wgpu::BindGroupEntry {
                    binding: 2,
                    resource: out.binding(),
                },
            ],
        });
        self.settle(scope, |e| gpu_err(format!("read ceiling kernel: {e}")))?;
        let t = self.time_passes(|enc| self.dispatch(enc, &pipeline, &bind, (groups, 1, 1)))?;
        Ok((t, u64::from(n4) * 16))
    }

    /// Median seconds of what `record` encodes (5 runs after a warm-up), between two
    /// timestamps when available, else submit-and-wait wall time.
    fn time_passes(&self, record: impl Fn(&mut ::wgpu::CommandEncoder)) -> Result<f64> {
        let stamps = self.timestamps.then(|| {
            let qs = self.device.create_query_set(&::wgpu::QuerySetDescriptor {
                label: Some("timing"),
                ty: ::wgpu::QueryType::Timestamp,
                count: 2,
            });
            let buf = self.device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some("timing"),
                size: 16,
                usage: ::wgpu::BufferUsages::QUERY_RESOLVE | ::wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            (qs, GpuBuffer::<u64>::from_raw(buf, 2))
        });
        let mut times = Vec::new();
        for i in 0..6 {
            let mut enc = self.encoder();
            if let Some((qs, _)) = &stamps {
                enc.write_timestamp(qs, 0);
            }
            record(&mut enc);
            if let Some((qs, buf)) = &stamps {
                enc.write_timestamp(qs, 1);
                enc.resolve_query_set(qs, 0..2, &buf.buffer, 0);
            }
            let start = web_time::Instant::now();
            self.submit_and_wait(enc)?;
            let wall = start.elapsed().as_secs_f64();
            let t = match &stamps {
                Some((_, buf)) => {
                    let ticks = self.read(buf)?;
                    ticks[1].saturating_sub(ticks[0]) as f64
                        * f64::from(self.queue.get_timestamp_period())
                        / 1e9
                }
                None => wall,
            };
            if i > 0 {
                times.push(t.max(1e-9));
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    /// Median seconds of a buffer-to-buffer copy of `bytes` (5 copies after a warm-up):
    /// timestamp queries when available, else submit-and-wait wall time.
    pub fn copy_seconds(&self, bytes: usize) -> Result<f64> {
        let bytes = (bytes as u64)
            .min(self.limits.max_buffer_size)
            .next_multiple_of(4);
        let make = |label| {
            self.device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: ::wgpu::BufferUsages::COPY_SRC | ::wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let (src, dst) = (make("copy src"), make("copy dst"));
        self.time_passes(|enc| enc.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes))
    }
}
