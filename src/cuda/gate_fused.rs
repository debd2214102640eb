//! Stage 1 in one launch (kernels/gate_fused.ptx, opt-in `MOE_CUDA_KERNELS=next`).

use crate::cuda::ptx::PtxModule;
use crate::error::Result;

/// Every module variant of the fused gate.
pub fn modules() -> Result<Vec<PtxModule>> {
    Ok(Vec::new())
}
