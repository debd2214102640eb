//! Every preset against Hugging Face transformers (fairseq semantics for NLLB): the fixtures
//! under tests/fixtures/ hold random layers, inputs and the float64 outputs of each family's
//! reference implementation (see tests/fixtures/README.md for how they were made).

mod common;

use std::collections::BTreeSet;

use common::fixture::{dense, fixtures_dir, read_expected, Expected};
use moe_kernels::{io, LayerConfig, MoeLayer, Preset};

/// Every case name (the stem of each `*.config.json`).
fn cases() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .expect("tests/fixtures exists")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".config.json").map(str::to_string))
        .collect();
    names.sort();
    names
}

fn load_case(name: &str) -> (LayerConfig, MoeLayer, moe_kernels::Tensor, Expected) {
    let dir = fixtures_dir();
    let cfg = LayerConfig::from_file(&dir.join(format!("{name}.config.json"))).expect("config");
    let layer =
        MoeLayer::load(cfg, &dir.join(format!("{name}.weights.safetensors"))).expect("weights");
    let x = io::load_input(&dir.join(format!("{name}.input.safetensors"))).expect("input");
    let exp = read_expected(&dir.join(format!("{name}.expected.safetensors")));
    (cfg, layer, x, exp)
}

#[test]
fn every_preset_has_a_fixture() {
    let names = cases();
    for p in Preset::ALL {
        assert!(
            names.iter().any(|n| n.starts_with(p.name())),
            "no fixture for preset {p}"
        );
    }
}

#[test]
fn reference_matches_transformers() {
    let names = cases();
    assert!(names.len() >= 8, "expected fixture cases, found {names:?}");
    for name in &names {
        let (cfg, layer, x, exp) = load_case(name);
        let r = layer.forward_reference(&x).expect("reference forward");
        let rt = &r.routing;
        assert_eq!((rt.tokens, rt.experts), (exp.t, exp.e), "{name}: shape");
        let (sel, dis, w) = dense(
            rt.tokens,
            rt.experts,
            rt.slots,
            &rt.topk_ids,
            &rt.kept,
            &rt.topk_weights,
        );
        // Top-k sets (before capacity) and kept sets are exact.
        assert_eq!(
            sel, exp.selected,
            "{name}: selected experts differ from transformers"
        );
        assert_eq!(
            dis, exp.dispatch,
            "{name}: kept assignments differ from transformers"
        );
        // HF routers round to f32 internally (see the fixture README): weights agree to ~1e-7.
        let werr = common::rel_l2_f64(&w, &exp.weights);
        assert!(werr <= 1e-6, "{name}: weights rel L2 {werr:e}");
        let yerr = common::rel_l2_f64(&r.y, &exp.y);
        assert!(
            yerr <= 1e-5,
            "{name}: y rel L2 {yerr:e} against transformers"
        );
        println!(
            "{name}: preset {:?}, y rel L2 {yerr:.2e}, weights rel L2 {werr:.2e}",
            cfg.preset.map(|p| p.name())
        );
    }
}

#[test]
fn backends_match_transformers() {
    for dev in common::backends("presets") {
        for name in &cases() {
            let (_, layer, x, exp) = load_case(name);
            let out = layer.forward(&dev, &x).expect("forward");
            let kept: Vec<bool> = out.kept.iter().map(|&k| k != 0).collect();
            let (sel, dis, _) = dense(
                out.tokens,
                exp.e,
                out.slots,
                &out.topk_ids,
                &kept,
                &common::wide(&out.topk_weights),
            );
            assert_eq!(sel, exp.selected, "{}/{name}: selected", dev.kind());
            assert_eq!(dis, exp.dispatch, "{}/{name}: kept", dev.kind());
            let err = common::rel_l2(&out.y, &exp.y);
            assert!(err <= 1e-5, "{}/{name}: y rel L2 {err:e}", dev.kind());
            // Ordered picks: per token, ids are distinct.
            for t in 0..out.tokens {
                let ids: BTreeSet<u32> = out.topk_ids[t * out.slots..(t + 1) * out.slots]
                    .iter()
                    .copied()
                    .collect();
                assert_eq!(ids.len(), out.slots, "{name}: repeated expert in token {t}");
            }
        }
    }
}
