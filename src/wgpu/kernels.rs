//! Every WGSL entry point the crate dispatches, as enums: a [`Kernel`] names the stage shader
//! and the entry point within it. Each stage module owns its `Entry` enum.

use crate::stage::Stage;
use crate::wgpu::{combine, expert_gemm, gate, permute, router};

/// The shared prelude (weight decoding, NaN-aware ranking), prepended to every stage shader.
const COMMON: &str = include_str!("../../shaders/common.wgsl");

/// One compute entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// An entry point of shaders/router.wgsl.
    Router(router::Entry),
    /// An entry point of shaders/gate.wgsl.
    Gate(gate::Entry),
    /// An entry point of shaders/permute.wgsl.
    Permute(permute::Entry),
    /// An entry point of shaders/expert_gemm.wgsl.
    ExpertGemm(expert_gemm::Entry),
    /// An entry point of shaders/combine.wgsl.
    Combine(combine::Entry),
}

impl Kernel {
    /// The stage this kernel belongs to.
    pub fn stage(self) -> Stage {
        match self {
            Kernel::Router(_) => Stage::Router,
            Kernel::Gate(_) => Stage::Gate,
            Kernel::Permute(_) => Stage::Permute,
            Kernel::ExpertGemm(_) => Stage::ExpertGemm,
            Kernel::Combine(_) => Stage::Combine,
        }
    }

    /// The entry point's name in its shader.
    pub fn entry_point(self) -> &'static str {
        match self {
            Kernel::Router(e) => e.name(),
            Kernel::Gate(e) => e.name(),
            Kernel::Permute(e) => e.name(),
            Kernel::ExpertGemm(e) => e.name(),
            Kernel::Combine(e) => e.name(),
        }
    }

    /// `(file name, full WGSL source)` of this kernel's module: the prelude, then the stage.
    pub fn source(self) -> (&'static str, String) {
        let (file, body) = stage_source(self.stage());
        (file, format!("{COMMON}\n{body}"))
    }
}

/// The WGSL file of each stage, embedded at build time.
pub fn stage_source(stage: Stage) -> (&'static str, &'static str) {
    match stage {
        Stage::Router => ("router.wgsl", include_str!("../../shaders/router.wgsl")),
        Stage::Gate => ("gate.wgsl", include_str!("../../shaders/gate.wgsl")),
        Stage::Permute => ("permute.wgsl", include_str!("../../shaders/permute.wgsl")),
        Stage::ExpertGemm => (
            "expert_gemm.wgsl",
            include_str!("../../shaders/expert_gemm.wgsl"),
        ),
        Stage::Combine => ("combine.wgsl", include_str!("../../shaders/combine.wgsl")),
    }
}
