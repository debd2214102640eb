//! CUDA path: hand-written PTX in `kernels/`, loaded through cudarc with the driver found at
//! run time. The stage kernels are not written yet (issue #4); today this module only probes
//! the driver so that `moe info` and backend selection can say what is there.

use cudarc::driver::{sys, CudaContext};

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_mem_bytes: usize,
}

/// Lists CUDA devices, or says why there are none (no driver library, no device, init error).
/// Never panics: cudarc panics when libcuda is absent, so its presence is checked first.
pub fn probe() -> Result<Vec<DeviceInfo>, String> {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library and reports success;
    // it dereferences nothing of ours.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver library (libcuda) found".into());
    }
    let count = CudaContext::device_count().map_err(|e| format!("CUDA driver error: {e:?}"))?;
    if count <= 0 {
        return Err("the CUDA driver reports no devices".into());
    }
    (0..count as usize)
        .map(|ordinal| {
            let ctx = CudaContext::new(ordinal).map_err(|e| format!("device {ordinal}: {e:?}"))?;
            Ok(DeviceInfo {
                ordinal,
                name: ctx.name().map_err(|e| format!("{e:?}"))?,
                compute_capability: ctx.compute_capability().map_err(|e| format!("{e:?}"))?,
                total_mem_bytes: ctx.total_mem().map_err(|e| format!("{e:?}"))?,
            })
        })
        .collect()
}
