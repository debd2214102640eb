//! The stages of an MoE layer (DESIGN.md section 1). Every backend implements each one; an
//! unhandled stage fails to compile wherever a `match` over [`Stage`] lists them.

use std::fmt;

/// One stage of the MoE forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Stage 0: router logits `x · Wrᵀ (+ bias)`.
    Router,
    /// Stage 1: fused scoring, top-k / capacity / expert-choice selection and weights.
    Gate,
    /// Stage 2: stable counting sort of assignments by expert, plus the row gather.
    Permute,
    /// Stage 3: the grouped expert FFN (two grouped GEMMs, activation in the first epilogue).
    ExpertGemm,
    /// Stage 4: weighted un-permute in fixed slot order, plus the shared expert.
    Combine,
}

impl Stage {
    /// Every stage, in execution order.
    pub const ALL: [Stage; 5] = [
        Stage::Router,
        Stage::Gate,
        Stage::Permute,
        Stage::ExpertGemm,
        Stage::Combine,
    ];

    /// The stem used for this stage's files in every column of the layout.
    pub fn stem(self) -> &'static str {
        match self {
            Stage::Router => "router",
            Stage::Gate => "gate",
            Stage::Permute => "permute",
            Stage::ExpertGemm => "expert_gemm",
            Stage::Combine => "combine",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.stem())
    }
}
