//! PTX modules as the crate hands them to the driver. Kernel variants (dtype, tile shape) come
//! from one hand-written template per stage in `kernels/`, specialised here by substituting
//! named placeholders `${NAME}` (ptxas and the driver run no preprocessor on PTX). Every module
//! the crate may load is listed by [`all_modules`]; `moe ptx --dump DIR` writes them, and CI
//! runs ptxas on exactly those files.

use crate::error::{Error, Result};
use crate::stage::Stage;

/// One loadable PTX module: a stage's template with its placeholders filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxModule {
    pub stage: Stage,
    /// File-name-safe variant name, e.g. `expert_gemm.bf16`; `<variant>.ptx` when dumped.
    pub variant: String,
    pub source: String,
}

impl PtxModule {
    /// Module `variant` of `stage`: the stage's template with `subs` filled in.
    pub fn specialise(
        stage: Stage,
        variant: impl Into<String>,
        subs: &[(&str, String)],
    ) -> Result<Self> {
        Ok(PtxModule {
            stage,
            variant: variant.into(),
            source: render(stage, template(stage), subs)?,
        })
    }
}

/// `template` with every `${NAME}` replaced by its value in `subs`. An unknown or unfilled
/// placeholder is an error, so a module can never reach the driver half-specialised.
pub fn render(stage: Stage, template: &str, subs: &[(&str, String)]) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| Error::shape(stage, "unterminated ${ placeholder in PTX template"))?;
        let name = &after[..end];
        let value = subs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| {
                Error::shape(
                    stage,
                    format!("PTX template placeholder ${{{name}}} has no value"),
                )
            })?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The template of each stage, embedded at build time.
pub fn template(stage: Stage) -> &'static str {
    match stage {
        Stage::Router => include_str!("../../kernels/router.ptx"),
        Stage::Gate => include_str!("../../kernels/gate.ptx"),
        Stage::Permute => include_str!("../../kernels/permute.ptx"),
        Stage::ExpertGemm => include_str!("../../kernels/expert_gemm.ptx"),
        Stage::Combine => include_str!("../../kernels/combine.ptx"),
    }
}

/// Every module the crate may load, in every variant.
pub fn all_modules() -> Result<Vec<PtxModule>> {
    let mut v = Vec::new();
    for stage in Stage::ALL {
        v.extend(stage_modules(stage)?);
    }
    Ok(v)
}

/// The variants of one stage's module.
pub fn stage_modules(stage: Stage) -> Result<Vec<PtxModule>> {
    match stage {
        Stage::Router => crate::cuda::router::modules(),
        Stage::Gate => crate::cuda::gate::modules(),
        Stage::Permute => crate::cuda::permute::modules(),
        Stage::ExpertGemm => crate::cuda::expert_gemm::modules(),
        Stage::Combine => crate::cuda::combine::modules(),
    }
}

/// A module that needs no specialisation: the template as it is.
pub fn plain(stage: Stage) -> Result<Vec<PtxModule>> {
    Ok(vec![PtxModule::specialise(stage, stage.stem(), &[])?])
}

/// Writes every module to `dir/<variant>.ptx`; returns the paths written.
pub fn dump(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    for m in all_modules()? {
        let path = dir.join(format!("{}.ptx", m.variant));
        std::fs::write(&path, &m.source).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}
