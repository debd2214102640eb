//! The CUDA device: context, one stream, the module cache, typed device buffers and explicit
//! copies. Modules are JIT-compiled by the driver from the PTX of [`crate::cuda::ptx`] once per
//! (stage, variant) and cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use crate::device::BackendKind;
use crate::error::{Error, Result};
use crate::limits::{self, Resource};
use crate::stage::Stage;

/// An error from the CUDA backend.
pub(crate) fn cuda_err(what: impl Into<String>) -> Error {
    Error::Device {
        backend: BackendKind::Cuda,
        what: what.into(),
    }
}

/// A failure while opening a device, as "this backend cannot be used here".
fn unavailable(e: Error) -> Error {
    match e {
        Error::Device { backend, what } => Error::BackendUnavailable {
            backend,
            reason: what,
        },
        other => other,
    }
}

/// Largest index the kernels that use signed 32-bit index arithmetic accept.
pub(crate) const MAX_INDEX: usize = i32::MAX as usize;

/// An error unless a device buffer named `what` holds at least `need` elements.
pub(crate) fn check_len(stage: Stage, what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::shape(
            stage,
            format!("{what} holds {have} elements, needs {need}"),
        ));
    }
    Ok(())
}

/// `n` as a kernel `u32` parameter, or an [`Error::Limit`] ([`Resource::IndexRange`]) when
/// it exceeds `max` (the index range the kernel's 32-bit arithmetic supports).
pub(crate) fn to_u32(stage: Stage, what: &str, n: usize, max: usize) -> Result<u32> {
    let max = max.min(u32::MAX as usize);
    limits::check(
        BackendKind::Cuda,
        Resource::IndexRange,
        || format!("{stage}: {what}"),
        n as u64,
        max as u64,
    )?;
    Ok(n as u32)
}

/// Wraps a driver error with what was being done.
pub(crate) fn drv<T>(
    r: std::result::Result<T, cudarc::driver::DriverError>,
    what: &str,
) -> Result<T> {
    r.map_err(|e| cuda_err(format!("{what}: {e:?}")))
}

/// Wraps an allocation's driver error: out-of-memory becomes an [`Error::Limit`] on device
/// memory (with the bytes asked for and the bytes free), anything else a backend error.
fn alloc_err<T>(
    r: std::result::Result<T, cudarc::driver::DriverError>,
    ctx: &CudaContext,
    bytes: usize,
) -> Result<T> {
    r.map_err(|e| {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            Error::Limit {
                backend: BackendKind::Cuda,
                resource: Resource::DeviceMemory,
                what: "a device allocation".into(),
                need: bytes as u64,
                limit: ctx.mem_get_info().map_or(0, |(free, _)| free as u64),
            }
        } else {
            cuda_err(format!("device allocation of {bytes} bytes: {e:?}"))
        }
    })
}

/// One CUDA device with its stream and caches.
pub struct CudaDevice {
    /// The driver context of the device.
    pub ctx: Arc<CudaContext>,
    /// The stream every launch, copy and allocation of this handle is ordered on.
    pub stream: Arc<CudaStream>,
    /// The device name the driver reports.
    pub name: String,
    /// Compute capability `(major, minor)`, at least `(8, 0)`.
    pub compute_capability: (i32, i32),
    /// The kernel set this handle launches: `MOE_CUDA_KERNELS`, read when it was opened.
    pub kernels: crate::cuda::KernelSet,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaDevice({}, sm_{}{}, kernels {})",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.kernels.name()
        )
    }
}

impl CudaDevice {
    /// Opens device `ordinal`. Checks for the driver library first (cudarc panics without it).
    /// Every failure is [`Error::BackendUnavailable`].
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::open(ordinal).map_err(unavailable)
    }

    fn open(ordinal: usize) -> Result<Self> {
        let devices = crate::cuda::probe().map_err(cuda_err)?;
        if ordinal >= devices.len() {
            return Err(cuda_err(format!(
                "no CUDA device {ordinal}: the driver reports {}",
                devices.len()
            )));
        }
        let ctx = drv(CudaContext::new(ordinal), "creating the CUDA context")?;
        // SAFETY: every launch, copy and allocation of this crate goes through the one stream
        // below, so stream order already sequences every buffer's uses; cudarc's per-buffer
        // events would only add work (and event records inside CUDA-graph captures).
        unsafe { ctx.disable_event_tracking() };
        Self::on(drv(ctx.new_stream(), "creating a stream")?)
    }

    /// A handle that launches on the caller's `stream`, in its context. cudarc's event
    /// tracking is left as the caller set it (it is the caller's context).
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        Self::on(stream).map_err(unavailable)
    }

    /// The handle of `stream` in its context (sm_80 or newer).
    fn on(stream: Arc<CudaStream>) -> Result<Self> {
        let kernels = crate::cuda::KernelSet::from_env()?;
        let ctx = stream.context().clone();
        let (name, compute_capability) = Self::describe(&ctx)?;
        Ok(CudaDevice {
            ctx,
            stream,
            name,
            compute_capability,
            kernels,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// This handle with kernel set `kernels` instead of the one `MOE_CUDA_KERNELS` chose
    /// (tests run both sets side by side).
    pub fn with_kernels(mut self, kernels: crate::cuda::KernelSet) -> Self {
        self.kernels = kernels;
        self
    }

    /// An error unless `ptr` is device memory of this handle's device (CUDA's unified
    /// addressing tells which device any allocation lives on, whichever binding made it).
    /// `what` names the buffer in the message.
    pub fn check_pointer(&self, ptr: sys::CUdeviceptr, what: &str) -> Result<()> {
        let mut ordinal: std::ffi::c_int = -1;
        // SAFETY: cuPointerGetAttribute writes one int for DEVICE_ORDINAL into `ordinal`, which
        // outlives the call; for a pointer CUDA does not know it returns an error and writes
        // nothing.
        let r = unsafe {
            sys::cuPointerGetAttribute(
                (&mut ordinal as *mut std::ffi::c_int).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::shape(
                Stage::Router,
                format!("{what}: {ptr:#x} is not device memory CUDA knows ({r:?})"),
            ));
        }
        if usize::try_from(ordinal).ok() != Some(self.ctx.ordinal()) {
            return Err(Error::shape(
                Stage::Router,
                format!(
                    "{what}: memory of CUDA device {ordinal}, but this backend runs on device {}",
                    self.ctx.ordinal()
                ),
            ));
        }
        Ok(())
    }

    /// Name and compute capability, or an error for a device older than sm_80.
    fn describe(ctx: &CudaContext) -> Result<(String, (i32, i32))> {
        let name = drv(ctx.name(), "device name")?;
        let cc = drv(ctx.compute_capability(), "compute capability")?;
        if cc.0 < 8 {
            return Err(cuda_err(format!(
                "{name} is sm_{}{}; the kernels target sm_80 and newer",
                cc.0, cc.1
            )));
        }
        Ok((name, cc))
    }

    /// Function `entry` of the module variant `variant` of `stage`, loading (JIT-compiling) the
    /// module on first use.
    pub fn function(&self, stage: Stage, variant: &str, entry: &str) -> Result<CudaFunction> {
        let module = {
            let mut cache = self
                .modules
                .lock()
                .map_err(|_| cuda_err("module cache poisoned"))?;
            match cache.get(variant) {
                Some(m) => m.clone(),
                None => {
                    let src = crate::cuda::ptx::stage_modules(stage)?
                        .into_iter()
                        .find(|m| m.variant == variant)
                        .ok_or_else(|| cuda_err(format!("no PTX module variant {variant}")))?
                        .source;
                    let m = drv(
                        self.ctx.load_module(Ptx::from_src(src)),
                        &format!("loading PTX module {variant}"),
                    )?;
                    cache.insert(variant.to_string(), m.clone());
                    m
                }
            }
        };
        drv(
            module.load_function(entry),
            &format!("kernel {entry} in {variant}"),
        )
    }

    /// A device copy of `data` (at least one element is allocated).
    pub fn upload<T: DeviceRepr + ValidAsZeroBits + Clone + Default>(
        &self,
        data: &[T],
    ) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            return self.alloc(0);
        }
        alloc_err(
            self.stream.clone_htod(data),
            &self.ctx,
            std::mem::size_of_val(data),
        )
    }

    /// A zeroed device buffer of `n` elements (at least one is allocated).
    pub fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        let bytes = n.max(1).saturating_mul(std::mem::size_of::<T>());
        alloc_err(self.stream.alloc_zeros::<T>(n.max(1)), &self.ctx, bytes)
    }

    /// Bytes free on the device now.
    pub fn free_memory(&self) -> Result<u64> {
        let (free, _total) = drv(self.ctx.mem_get_info(), "querying free device memory")?;
        Ok(free as u64)
    }

    /// The first `n` elements of `buf`, copied to the host (synchronises the stream).
    pub fn read<T: DeviceRepr + Default + Clone>(
        &self,
        buf: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>> {
        // Only the first n elements cross: a workspace buffer is sized for max_tokens.
        let view = buf.slice(0..n.min(buf.len()));
        drv(self.stream.clone_dtoh(&view), "device-to-host copy")
    }

    /// Waits for the stream.
    pub fn sync(&self) -> Result<()> {
        drv(self.stream.synchronize(), "stream synchronize")
    }
}

/// A 1-D launch of `n` threads in blocks of `block`, with a 2-D grid past 65535 blocks in y
/// (kernels flatten `ctaid.x + ctaid.y · nctaid.x`).
pub fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).max(1) as u64;
    let x = blocks.min(2_147_483_647);
    LaunchConfig {
        grid_dim: (x as u32, blocks.div_ceil(x) as u32, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaDevice {
    /// Median seconds of a device-to-device copy of `bytes` (5 copies after a warm-up),
    /// timed with CUDA events.
    pub fn copy_seconds(&self, bytes: usize) -> Result<f64> {
        let src = self.alloc::<u8>(bytes)?;
        let mut dst = self.alloc::<u8>(bytes)?;
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::new();
        for i in 0..6 {
            let a = drv(self.stream.record_event(flags), "recording an event")?;
            drv(
                self.stream.memcpy_dtod(&src, &mut dst),
                "device-to-device copy",
            )?;
            let b = drv(self.stream.record_event(flags), "recording an event")?;
            drv(b.synchronize(), "waiting for an event")?;
            if i > 0 {
                times.push(f64::from(drv(a.elapsed_ms(&b), "reading an event")?) / 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}
