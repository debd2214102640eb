//! PTX modules as the crate hands them to the driver. Kernel variants (dtype, tile shape) come
//! from one hand-written template per stage in `kernels/`, specialised here in two steps
//! (ptxas and the driver run no preprocessor on PTX):
//! 1. sections: the lines between `//@begin TAG` and `//@end` are kept only in the variants
//!    whose tag set holds `TAG` (sections nest: a line is kept iff every section around it
//!    is); the marker lines themselves are dropped ([`select_sections`]);
//! 2. placeholders: every `${NAME}` is replaced by its value ([`render`]).
//!
//! Every module the crate may load is listed by [`all_modules`]; `moe ptx --dump DIR` writes
//! them, and CI runs ptxas on exactly those files.

use crate::error::{Error, Result};
use crate::stage::Stage;

/// One loadable PTX module: a stage's template with its placeholders filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxModule {
    /// The stage whose template the module comes from.
    pub stage: Stage,
    /// File-name-safe variant name, e.g. `expert_gemm.bf16`; `<variant>.ptx` when dumped.
    pub variant: String,
    /// The PTX text handed to the driver.
    pub source: String,
}

impl PtxModule {
    /// Module `variant` of `stage`: the stage's template with the sections of `tags` kept
    /// (every other section dropped) and `subs` filled in.
    pub fn specialise(
        stage: Stage,
        variant: impl Into<String>,
        tags: &[&str],
        subs: &[(&str, String)],
    ) -> Result<Self> {
        Self::from_template(stage, template(stage), variant, tags, subs)
    }

    /// Module `variant` of `stage` rendered from `template` (a stage may have several
    /// templates: kernels/expert_decode.ptx next to kernels/expert_gemm.ptx, say), with the
    /// sections of `tags` kept and `subs` filled in.
    pub fn from_template(
        stage: Stage,
        template: &str,
        variant: impl Into<String>,
        tags: &[&str],
        subs: &[(&str, String)],
    ) -> Result<Self> {
        let text = select_sections(stage, template, tags)?;
        Ok(PtxModule {
            stage,
            variant: variant.into(),
            source: render(stage, &text, subs)?,
        })
    }
}

/// The lines of `template` outside every `//@begin TAG` ... `//@end` section, plus the lines
/// whose enclosing sections all have a tag in `tags`. Marker lines (trimmed: `//@begin `
/// followed by one tag, or exactly `//@end`) are dropped; every other line is copied with its
/// own line ending, so a template without markers comes back unchanged.
pub fn select_sections(stage: Stage, template: &str, tags: &[&str]) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    // Enclosing sections, innermost last: whether each one is kept.
    let mut open: Vec<bool> = Vec::new();
    for line in template.split_inclusive('\n') {
        let t = line.trim();
        if let Some(tag) = t.strip_prefix("//@begin ") {
            let tag = tag.trim();
            if tag.is_empty() || tag.contains(char::is_whitespace) {
                return Err(Error::shape(
                    stage,
                    format!("PTX template section marker {t:?} needs exactly one tag"),
                ));
            }
            open.push(tags.contains(&tag));
        } else if t == "//@end" {
            if open.pop().is_none() {
                return Err(Error::shape(
                    stage,
                    "//@end without //@begin in the PTX template",
                ));
            }
        } else if open.iter().all(|&keep| keep) {
            out.push_str(line);
        }
    }
    if !open.is_empty() {
        return Err(Error::shape(
            stage,
            "unterminated //@begin in the PTX template",
        ));
    }
    Ok(out)
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

/// The variants of one stage's modules: the verified kernels' first, then those of the
/// opt-in `MOE_CUDA_KERNELS=next` set ([`crate::cuda::KernelSet`]).
pub fn stage_modules(stage: Stage) -> Result<Vec<PtxModule>> {
    match stage {
        Stage::Router => {
            let mut v = crate::cuda::router::modules()?;
            v.extend(crate::cuda::router_mma::modules()?);
            Ok(v)
        }
        Stage::Gate => {
            let mut v = crate::cuda::gate::modules()?;
            v.extend(crate::cuda::gate_fused::modules()?);
            Ok(v)
        }
        Stage::Permute => crate::cuda::permute::modules(),
        Stage::ExpertGemm => {
            // The portable modules, then the sm_90a ones (issue 15, MOE_CUDA_KERNELS=next).
            let mut v = crate::cuda::expert_gemm::modules()?;
            v.extend(crate::cuda::expert_gemm_sm90::modules()?);
            v.extend(crate::cuda::expert_decode::modules()?);
            Ok(v)
        }
        Stage::Combine => crate::cuda::combine::modules(),
    }
}

/// A module that needs no specialisation: the template as it is.
pub fn plain(stage: Stage) -> Result<Vec<PtxModule>> {
    Ok(vec![PtxModule::specialise(stage, stage.stem(), &[], &[])?])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_is_ascii_fully_rendered_and_uniquely_named() {
        let all = all_modules().unwrap();
        let mut names: Vec<&str> = all.iter().map(|m| m.variant.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len(), "duplicate variant names");
        for m in &all {
            let marker = |l: &str| l.trim().starts_with("//@begin") || l.trim() == "//@end";
            assert!(m.source.is_ascii(), "{}", m.variant);
            assert!(!m.source.contains("${"), "{}", m.variant);
            assert!(!m.source.lines().any(marker), "{}", m.variant);
            // Portable modules target sm_80; the Hopper ones (issue 15) sm_90a.
            let target = if m.source.contains("\n.target sm_90a\n") {
                "sm_90a"
            } else {
                "sm_80"
            };
            assert!(
                m.source
                    .contains(&format!(".version 8.0\n.target {target}\n")),
                "{}",
                m.variant
            );
            assert!(
                m.variant
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_'),
                "{}",
                m.variant
            );
        }
    }

    #[test]
    fn sections_nest_and_keep_line_endings() {
        let st = Stage::ExpertGemm;
        let t = "a\n//@begin x\nb\n  //@begin y\nc\n  //@end\n//@end\nd";
        assert_eq!(select_sections(st, t, &[]).unwrap(), "a\nd");
        assert_eq!(select_sections(st, t, &["x"]).unwrap(), "a\nb\nd");
        assert_eq!(select_sections(st, t, &["y"]).unwrap(), "a\nd");
        assert_eq!(select_sections(st, t, &["x", "y"]).unwrap(), "a\nb\nc\nd");
        assert_eq!(select_sections(st, "p\r\nq\n", &[]).unwrap(), "p\r\nq\n");
        assert!(select_sections(st, "//@begin x\n", &["x"]).is_err());
        assert!(select_sections(st, "//@end\n", &[]).is_err());
        assert!(select_sections(st, "//@begin\n//@end\n", &[]).is_err());
        assert!(select_sections(st, "//@begin a b\n//@end\n", &[]).is_err());
    }

    #[test]
    fn placeholders_must_be_filled() {
        let st = Stage::Router;
        assert_eq!(render(st, "x${A}y", &[("A", "1".into())]).unwrap(), "x1y");
        assert!(render(st, "x${A}y", &[]).is_err());
        assert!(render(st, "x${A", &[("A", "1".into())]).is_err());
    }
}
