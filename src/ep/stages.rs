//! What a backend does for one rank of an expert-parallel forward: the stages of DESIGN.md
//! section 1 on this rank's tokens or this rank's experts, with the buffers that cross ranks
//! (logits, routing, rows) on the host. Each backend implements it with the very functions its
//! single-device forward runs (`src/cpu/ep.rs`, `src/wgpu/ep.rs`), so every value a rank
//! computes is bitwise the one the single-device forward computes; `ep::forward` orders the
//! steps and the exchanges, once for every backend.
//!
//! Rows travel as `u32` words in the backend's own row layout ([`RankStages::row_words`] words
//! per row): f32 bits on the CPU, the padded activation rows of `wgpu::act` on wgpu.

use crate::device::GateBuffers;
use crate::error::Result;
use crate::tensor::Tensor;

/// One rank's stages on its backend (see the module docs).
pub(crate) trait RankStages: Send {
    /// Words per activation row.
    fn row_words(&self) -> usize;

    /// Stage 0 on this rank's tokens: takes `x` `[T_r, H]` (in the activation dtype; kept
    /// for the later steps) and returns its router logits `[T_r, E]` in f32. The shared
    /// expert's gate logits, when the layer has them, are computed and kept too.
    fn router(&mut self, x: &Tensor) -> Result<Vec<f32>>;

    /// Stage 1 on `logits` `[tokens, E]`.
    fn gate(&mut self, logits: &[f32], tokens: usize) -> Result<GateBuffers>;

    /// Stage 2 on this rank's tokens under `gate` (`[T_r, slots]`, kept for the combine):
    /// returns `expert_offsets` `[E + 1]` and the words of the kept rows (`expert_offsets[E]`
    /// rows, in permutation order).
    fn permute(&mut self, gate: &GateBuffers) -> Result<(Vec<u32>, Vec<u32>)>;

    /// Stage 3 on this rank's experts: `rows` grouped by local expert as `offsets`
    /// `[local E + 1]` say; returns their outputs in the same order.
    fn experts(&mut self, rows: &[u32], offsets: &[u32]) -> Result<Vec<u32>>;

    /// The shared expert and stage 4 on this rank's tokens: `y` `[T_r, H]` (values of the
    /// activation dtype) from `y_rows`, the expert outputs of the kept rows in permutation
    /// order.
    fn combine(&mut self, y_rows: &[u32]) -> Result<Vec<f32>>;
}

/// The parts of a layer one rank holds: the router and shared expert whole, the routed
/// experts of its range only.
#[derive(Debug, Clone)]
pub(crate) struct RankWeights {
    /// Routing, activation, output scale.
    pub config: crate::config::LayerConfig,
    /// E (all experts) and H.
    pub experts: usize,
    /// H.
    pub hidden: usize,
    /// `[E, H]`.
    pub router_weight: Tensor,
    /// `[E]`.
    pub router_bias: Option<Tensor>,
    /// `[E]`.
    pub correction_bias: Option<Tensor>,
    /// This rank's routed experts (`None` when it holds none).
    pub local: Option<crate::cpu::expert_gemm::ExpertWeights>,
    /// The shared expert as one expert.
    pub shared: Option<crate::cpu::expert_gemm::ExpertWeights>,
    /// `[1, H]`.
    pub shared_gate: Option<Tensor>,
}
