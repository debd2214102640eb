//! Stage 0 on tensor cores (kernels/router_mma.ptx, opt-in `MOE_CUDA_KERNELS=next`).

use crate::cuda::ptx::PtxModule;
use crate::error::Result;

/// Every module variant of the tensor-core router.
pub fn modules() -> Result<Vec<PtxModule>> {
    Ok(Vec::new())
}
