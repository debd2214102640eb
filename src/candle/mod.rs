//! candle integration (feature `candle`): [`MoeBlock`], an MoE block over this crate's kernels
//! that candle models call like any other module.
//!
//! A block is loaded from a candle `VarBuilder` at a decoder layer with the tensor names the
//! published Hugging Face checkpoints use (Mixtral `block_sparse_moe.*`, Qwen2-MoE and
//! Qwen3-MoE `mlp.*`, DeepSeek-V3 `mlp.*` with `gate.e_score_correction_bias`), and the routing
//! of the model's config.json, read by the same code as [`MoeLayer::from_checkpoint`]; or
//! it wraps a [`MoeLayer`] or [`PreparedLayer`] built any other way.
//!
//! [`MoeBlock::forward`] takes `x` `[..., H]` in f32, f16 or bf16 as candle holds it and
//! returns `y` of the same shape, dtype and device:
//! - CPU tensors run on the crate's CPU backend, or on the backend the caller chose with
//!   [`MoeBlock::with_host_backend`] (e.g. wgpu);
//! - CUDA tensors (feature `candle-cuda`) run the crate's CUDA kernels on the tensor's own
//!   stream (`CudaDevice::cuda_stream()`), reading `x` and writing `y` in candle's own device
//!   memory: no copy, no host synchronisation, no read-back.
//!
//! Errors are this crate's [`Error`](crate::Error) turned into `candle_core::Error` with the
//! message kept (`impl From<moe_kernels::Error> for candle_core::Error`).
//!
//! [`MoeLayer`]: crate::MoeLayer
//! [`MoeLayer::from_checkpoint`]: crate::MoeLayer::from_checkpoint
//! [`PreparedLayer`]: crate::PreparedLayer

mod block;
mod convert;
#[cfg(feature = "candle-cuda")]
mod cuda;
mod host;
mod load;

pub use block::{MoeBlock, Routing, DEFAULT_MAX_TOKENS};
pub use load::read_layer;

impl From<crate::Error> for candle_core::Error {
    /// Wraps the crate's error; its message is the candle error's message.
    fn from(e: crate::Error) -> Self {
        candle_core::Error::wrap(e)
    }
}
