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

    /// `(module name, full WGSL source)` of this kernel's module: the prelude, then the stage;
    /// for [`gate::Entry::SelectSubgroups`], the gate module of subgroup devices (see
    /// [`gate_subgroups_source`]). The module name keys the device's module cache.
    pub fn source(self) -> (&'static str, String) {
        if self == Kernel::Gate(gate::Entry::SelectSubgroups) {
            return ("gate.wgsl+gate_subgroups.wgsl", gate_subgroups_source());
        }
        let (file, body) = stage_source(self.stage());
        (file, format!("{COMMON}\n{body}"))
    }

    /// Whether the kernel needs wgpu's SUBGROUP feature on the device.
    pub fn needs_subgroups(self) -> bool {
        self == Kernel::Gate(gate::Entry::SelectSubgroups)
    }
}

/// Start and end markers of gate.wgsl's portable reductions.
const PORTABLE_BEGIN: &str = "// <portable-reductions>";
const PORTABLE_END: &str = "// </portable-reductions>";

/// The gate module for devices with subgroups: `enable subgroups;` (in a browser only), the
/// prelude, then gate.wgsl with its `<portable-reductions>` section (from its opening marker
/// to the end of its closing one) replaced by shaders/gate_subgroups.wgsl, which defines the
/// same functions.
pub fn gate_subgroups_source() -> String {
    let (_, gate) = stage_source(Stage::Gate);
    let sub = include_str!("../../shaders/gate_subgroups.wgsl");
    // Both markers are in the embedded file (a unit test checks it); a missing one would be
    // a build defect, so the whole gate.wgsl is kept and naga reports the duplicate functions.
    let (Some(b), Some(e)) = (gate.find(PORTABLE_BEGIN), gate.find(PORTABLE_END)) else {
        return format!("{ENABLE_SUBGROUPS}{COMMON}\n{gate}\n{sub}");
    };
    let e = e + PORTABLE_END.len();
    format!(
        "{ENABLE_SUBGROUPS}{COMMON}\n{}{sub}{}",
        &gate[..b],
        &gate[e..]
    )
}

/// The WGSL directive of the subgroup module. A browser's WebGPU (Tint, wasm32) requires
/// `enable subgroups;`; naga (wgpu 30, native) rejects it as not yet implemented and takes the
/// subgroup built-ins from the device's SUBGROUP capability instead.
#[cfg(target_arch = "wasm32")]
const ENABLE_SUBGROUPS: &str = "enable subgroups;\n";
#[cfg(not(target_arch = "wasm32"))]
const ENABLE_SUBGROUPS: &str = "";

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The subgroup gate module is gate.wgsl with exactly its portable reductions swapped.
    #[test]
    fn the_subgroup_gate_module_swaps_only_the_portable_reductions() {
        let (_, gate) = stage_source(Stage::Gate);
        assert_eq!(gate.matches(PORTABLE_BEGIN).count(), 1);
        assert_eq!(gate.matches(PORTABLE_END).count(), 1);
        let src = gate_subgroups_source();
        assert!(src.starts_with(ENABLE_SUBGROUPS));
        assert!(!src.contains(PORTABLE_BEGIN) && !src.contains(PORTABLE_END));
        for f in [
            "fn wg_max_or(",
            "fn wg_best(",
            "fn gate_select(",
            "fn gate_finish(",
        ] {
            assert_eq!(src.matches(f).count(), 1, "{f}");
        }
        assert!(src.contains("subgroupMax(") && !src.contains("red_f[lid] = v;"));
    }
}
