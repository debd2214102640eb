//! What every backend shares, below them all: the backend kinds, the host-side stage buffers,
//! and the `Stages` trait through which the one forward of a layer (`forward`) runs on a
//! CPU, a CUDA stream or a wgpu command encoder. `backend.rs` and `layer.rs` sit above this
//! module and the backend modules; nothing here imports them.

use std::fmt;
use std::str::FromStr;

use crate::config::LayerConfig;
use crate::cpu::expert_gemm::{ExpertDims, ExpertWeights};
use crate::cpu::permute::Permutation;
use crate::error::{Error, Result};
use crate::shape;
use crate::stage::Stage;
use crate::tensor::Tensor;

/// The kinds of backend the crate knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// The host: each stage's f64 reference, results stored as a GPU stores them.
    Cpu,
    /// An NVIDIA GPU through the CUDA driver (feature `cuda`).
    Cuda,
    /// A GPU through wgpu: Vulkan, Metal, DX12 or lavapipe (feature `wgpu`).
    Wgpu,
}

impl BackendKind {
    /// Preference order of [`Backend::auto`](crate::Backend::auto): CUDA, then wgpu, then CPU.
    pub const AUTO_ORDER: [BackendKind; 3] =
        [BackendKind::Cuda, BackendKind::Wgpu, BackendKind::Cpu];

    /// The name used on the command line and in `MOE_BACKEND`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
            BackendKind::Wgpu => "wgpu",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            "wgpu" => Ok(BackendKind::Wgpu),
            other => Err(Error::Usage(format!(
                "unknown backend {other:?} (expected auto, cpu, cuda or wgpu)"
            ))),
        }
    }
}

/// Outputs of stage 1 for T tokens with `slots` assignments each, `[T, slots]` token-major.
#[derive(Debug, Clone, PartialEq)]
pub struct GateBuffers {
    /// Tokens T.
    pub tokens: usize,
    /// Assignments per token (`top_k`, or E for expert choice).
    pub slots: usize,
    /// Experts E.
    pub experts: usize,
    /// Expert of each assignment.
    pub topk_ids: Vec<u32>,
    /// The weight applied to each assignment (0 where dropped).
    pub topk_weights: Vec<f32>,
    /// 1 where the assignment survived capacity, else 0.
    pub kept: Vec<u32>,
    /// Kept assignments per expert, `[E]`.
    pub counts: Vec<u32>,
}

impl GateBuffers {
    /// Buffers filled with poison (NaN, `u32::MAX`) so an unwritten element is caught.
    pub fn poisoned(tokens: usize, slots: usize, experts: usize) -> Self {
        let n = tokens * slots;
        GateBuffers {
            tokens,
            slots,
            experts,
            topk_ids: vec![u32::MAX; n],
            topk_weights: vec![f32::NAN; n],
            kept: vec![u32::MAX; n],
            counts: vec![u32::MAX; experts],
        }
    }

    pub(crate) fn check_sizes(&self) -> Result<()> {
        let st = Stage::Gate;
        let n = shape::mul(st, "T x slots", self.tokens, self.slots)?;
        shape::expect_len(st, "topk_ids", self.topk_ids.len(), n)?;
        shape::expect_len(st, "topk_weights", self.topk_weights.len(), n)?;
        shape::expect_len(st, "kept", self.kept.len(), n)?;
        shape::expect_len(st, "counts", self.counts.len(), self.experts)
    }
}

/// Outputs of stage 2: the permutation and the gathered rows.
#[derive(Debug, Clone, PartialEq)]
pub struct PermuteBuffers {
    /// Tokens T.
    pub tokens: usize,
    /// Assignments per token (`top_k`, or E for expert choice).
    pub slots: usize,
    /// Experts E.
    pub experts: usize,
    /// Model width H.
    pub hidden: usize,
    /// `[E + 1]`; rows from `expert_offsets[E]` on are dropped assignments.
    pub expert_offsets: Vec<u32>,
    /// `[T·slots]`.
    pub sorted_assignment: Vec<u32>,
    /// `[T·slots]`.
    pub row_of_assignment: Vec<u32>,
    /// `[T·slots, H]`.
    pub x_perm: Vec<f32>,
}

impl PermuteBuffers {
    /// Buffers filled with poison (NaN, `u32::MAX`) so an unwritten element is caught.
    pub fn poisoned(tokens: usize, slots: usize, experts: usize, hidden: usize) -> Self {
        let n = tokens * slots;
        PermuteBuffers {
            tokens,
            slots,
            experts,
            hidden,
            expert_offsets: vec![u32::MAX; experts + 1],
            sorted_assignment: vec![u32::MAX; n],
            row_of_assignment: vec![u32::MAX; n],
            x_perm: vec![f32::NAN; n * hidden],
        }
    }

    /// The permutation part as the CPU reference's type.
    pub fn permutation(&self) -> Permutation {
        Permutation {
            experts: self.experts,
            expert_offsets: self.expert_offsets.clone(),
            sorted_assignment: self.sorted_assignment.clone(),
            row_of_assignment: self.row_of_assignment.clone(),
        }
    }

    pub(crate) fn check_sizes(&self) -> Result<()> {
        let st = Stage::Permute;
        let n = shape::mul(st, "T x slots", self.tokens, self.slots)?;
        shape::expect_len(
            st,
            "expert_offsets",
            self.expert_offsets.len(),
            self.experts + 1,
        )?;
        shape::expect_len(st, "sorted_assignment", self.sorted_assignment.len(), n)?;
        shape::expect_len(st, "row_of_assignment", self.row_of_assignment.len(), n)?;
        shape::expect_len(
            st,
            "x_perm",
            self.x_perm.len(),
            shape::mul(st, "rows x H", n, self.hidden)?,
        )
    }
}

/// A layer's weights and config as every backend's upload reads them (borrowed from a
/// [`MoeLayer`](crate::MoeLayer), which sits above the backends).
#[derive(Debug, Clone, Copy)]
pub struct LayerWeights<'a> {
    /// Routing, activation and output scale.
    pub config: &'a LayerConfig,
    /// E, H and F of the routed experts.
    pub dims: ExpertDims,
    /// `[E, H]`.
    pub router_weight: &'a Tensor,
    /// `[E]`.
    pub router_bias: Option<&'a Tensor>,
    /// `[E]`.
    pub correction_bias: Option<&'a Tensor>,
    /// The routed experts.
    pub experts: &'a ExpertWeights,
    /// The shared expert as one expert.
    pub shared: Option<&'a ExpertWeights>,
    /// `[1, H]`.
    pub shared_gate: Option<&'a Tensor>,
}

/// `(y [T, H] widened exactly to f32, stage times, wall time)` of a host-tensor forward.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) type HostForward = (
    Vec<f32>,
    Vec<(Stage, std::time::Duration)>,
    std::time::Duration,
);

/// What one forward is, independent of the backend: sizes and which optional parts run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Tokens of this forward (T <= the workspace's `max_tokens`).
    pub tokens: usize,
    /// Whether the layer has a shared expert.
    pub shared: bool,
    /// Whether the shared expert's output is gated by `sigmoid(x·g)`.
    pub shared_gate: bool,
}

/// A backend's stages over its resident weights and one workspace. Each method records (GPU)
/// or computes (CPU) one step; none allocates device memory. [`forward`] is the only place that
/// orders them.
pub(crate) trait Stages {
    /// The layer's weights on the device, and its config.
    type Resident;
    /// Every buffer of a forward of up to `max_tokens` tokens.
    type Workspace;
    /// Where steps are recorded: a wgpu command encoder; nothing on CUDA (the stream is the
    /// device's) and on the CPU.
    type Rec;
    /// The input `x` `[T, H]` as a step reads it.
    type In<'a>: Copy;
    /// The output `y` `[T, H]` as the last step writes it.
    type Out<'a>;

    /// Marks the boundary before stage `i` (after the last stage when `i = 5`), for timing.
    fn mark(&self, rec: &mut Self::Rec, ws: &mut Self::Workspace, i: usize) -> Result<()>;
    /// Stage 0: router logits `[T, E]`.
    fn router(
        &self,
        rec: &mut Self::Rec,
        res: &Self::Resident,
        ws: &mut Self::Workspace,
        x: Self::In<'_>,
        t: usize,
    ) -> Result<()>;
    /// Stage 0 for the shared expert's gate: logits `x·g` `[T]`.
    fn shared_gate(
        &self,
        rec: &mut Self::Rec,
        res: &Self::Resident,
        ws: &mut Self::Workspace,
        x: Self::In<'_>,
        t: usize,
    ) -> Result<()>;
    /// Stage 1: routing of the logits.
    fn gate(
        &self,
        rec: &mut Self::Rec,
        res: &Self::Resident,
        ws: &mut Self::Workspace,
        t: usize,
    ) -> Result<()>;
    /// Stage 2: permutation and gather of `x`.
    fn permute(
        &self,
        rec: &mut Self::Rec,
        res: &Self::Resident,
        ws: &mut Self::Workspace,
        x: Self::In<'_>,
        t: usize,
    ) -> Result<()>;
    /// Stage 3: the routed experts on the permuted rows.
    fn experts(
        &self,
        rec: &mut Self::Rec,
        res: &Self::Resident,
        ws: &mut Self::Workspace,
        t: usize,
    ) -> Result<()>;
    /// Stage 3: the shared expert on every token of `x`.
    fn shared(
        &self,
        rec: &mut Self::Rec,
        res: &Self::Resident,
        ws: &mut Self::Workspace,
        x: Self::In<'_>,
        t: usize,
    ) -> Result<()>;
    /// Stage 4: `y` from the expert rows, the routing and the shared expert.
    fn combine(
        &self,
        rec: &mut Self::Rec,
        res: &Self::Resident,
        ws: &mut Self::Workspace,
        t: usize,
        y: Self::Out<'_>,
    ) -> Result<()>;
}

/// The forward of an MoE layer, stage by stage (DESIGN.md section 1), on any backend.
pub(crate) fn forward<D: Stages>(
    d: &D,
    rec: &mut D::Rec,
    res: &D::Resident,
    ws: &mut D::Workspace,
    plan: Plan,
    x: D::In<'_>,
    y: D::Out<'_>,
) -> Result<()> {
    let t = plan.tokens;
    d.mark(rec, ws, 0)?;
    d.router(rec, res, ws, x, t)?;
    if plan.shared_gate {
        d.shared_gate(rec, res, ws, x, t)?;
    }
    d.mark(rec, ws, 1)?;
    d.gate(rec, res, ws, t)?;
    d.mark(rec, ws, 2)?;
    d.permute(rec, res, ws, x, t)?;
    d.mark(rec, ws, 3)?;
    d.experts(rec, res, ws, t)?;
    if plan.shared {
        d.shared(rec, res, ws, x, t)?;
    }
    d.mark(rec, ws, 4)?;
    d.combine(rec, res, ws, t, y)?;
    d.mark(rec, ws, 5)
}
