//! Checkpoints as published: every tiny checkpoint under tests/fixtures/checkpoints/ (written by
//! gen_checkpoints.py with transformers, tensor names as the released checkpoints store them)
//! is read with `MoeLayer::from_checkpoint` and `moe run --checkpoint`, run on every backend and
//! compared with the float64 output of transformers' own module of that layer.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixture::{dense, fixtures_dir, read_expected, Expected};
use moe_kernels::{io, LayerConfig, MoeLayer, Tensor};
use safetensors::SafeTensors;

/// One fixture case: `NAME.case.json` beside the checkpoint directory.
struct Case {
    name: String,
    dir: PathBuf,
    layer: String,
    dense_layers: Vec<String>,
    out_of_range: String,
    layer_config: LayerConfig,
    format: String,
}

fn checkpoints() -> PathBuf {
    fixtures_dir().join("checkpoints")
}

fn cases() -> Vec<Case> {
    let root = checkpoints();
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .expect("tests/fixtures/checkpoints exists")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".case.json").map(str::to_string))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let text = std::fs::read_to_string(root.join(format!("{name}.case.json"))).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let s = |k: &str| {
                v[k].as_str()
                    .unwrap_or_else(|| panic!("{name}: {k}"))
                    .to_string()
            };
            let dir_name = v["checkpoint"].as_str().unwrap_or(&name).to_string();
            Case {
                dir: root.join(dir_name),
                layer: s("layer"),
                dense_layers: v["dense_layers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_str().unwrap().to_string())
                    .collect(),
                out_of_range: s("out_of_range"),
                layer_config: LayerConfig::from_json(&v["layer_config"].to_string(), &name)
                    .unwrap(),
                format: s("format"),
                name,
            }
        })
        .collect()
}

fn inputs(c: &Case) -> (Tensor, Expected) {
    let root = checkpoints();
    let x = io::load_input(&root.join(format!("{}.input.safetensors", c.name))).expect("input");
    let exp = read_expected(&root.join(format!("{}.expected.safetensors", c.name)));
    (x, exp)
}

/// Compares a forward's outputs with transformers; returns y's relative L2.
fn check(
    what: &str,
    exp: &Expected,
    y: &[f32],
    (ids, kept, w, slots): (&[u32], &[bool], &[f64], usize),
    tol: f64,
) -> f64 {
    let (sel, dis, wd) = dense(exp.t, exp.e, slots, ids, kept, w);
    assert_eq!(
        sel, exp.selected,
        "{what}: top-k sets differ from transformers"
    );
    assert_eq!(
        dis, exp.dispatch,
        "{what}: kept assignments differ from transformers"
    );
    let werr = common::rel_l2_f64(&wd, &exp.weights);
    assert!(werr <= 1e-6, "{what}: weights rel L2 {werr:e}");
    let err = common::rel_l2(y, &exp.y);
    assert!(err <= tol, "{what}: y rel L2 {err:e} > {tol:e}");
    err
}

#[test]
fn every_family_and_format_has_a_checkpoint() {
    let cs = cases();
    let have: Vec<(String, String)> = cs
        .iter()
        .map(|c| {
            let ck: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(c.dir.join("config.json")).unwrap())
                    .unwrap();
            (
                ck["model_type"].as_str().unwrap().to_string(),
                c.format.clone(),
            )
        })
        .collect();
    for (family, format) in [
        ("mixtral", "bf16"),
        ("qwen2_moe", "bf16"),
        ("qwen3_moe", "bf16"),
        ("deepseek_v3", "bf16"),
        ("deepseek_v3", "fp8"),
        ("gpt_oss", "bf16"),
        ("gpt_oss", "mxfp4"),
        ("switch_transformers", "f32"),
        ("nllb-moe", "f32"),
        ("mixtral", "gptq"),
        ("mixtral", "awq"),
        ("qwen3_moe", "compressed-tensors"),
    ] {
        assert!(
            have.iter().any(|(f, m)| f == family && m == format),
            "no checkpoint fixture for {family} {format}: {have:?}"
        );
    }
}

#[test]
fn layers_match_transformers_on_every_backend() {
    let cs = cases();
    assert!(!cs.is_empty());
    let backends = common::backends("checkpoint");
    for c in &cs {
        let layer = MoeLayer::from_checkpoint(&c.dir, &c.layer)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(
            layer.config, c.layer_config,
            "{}: routing read off config.json",
            c.name
        );
        let (x, exp) = inputs(c);
        let r = layer.forward_reference(&x).expect("reference");
        let rt = &r.routing;
        let (sel, dis, _) = dense(
            exp.t,
            exp.e,
            rt.slots,
            &rt.topk_ids,
            &rt.kept,
            &rt.topk_weights,
        );
        assert_eq!(
            (sel, dis),
            (exp.selected.clone(), exp.dispatch.clone()),
            "{}",
            c.name
        );
        let ref_err = common::rel_l2_f64(&r.y, &exp.y);
        assert!(
            ref_err <= 1e-5,
            "{}: reference y rel L2 {ref_err:e}",
            c.name
        );
        let mut line = format!(
            "{} ({}, layer {}): reference {ref_err:.1e}",
            c.name, c.format, c.layer
        );
        for dev in &backends {
            let out = layer.forward(dev, &x).expect("forward");
            let kept: Vec<bool> = out.kept.iter().map(|&k| k != 0).collect();
            let tol = match dev.kind() {
                moe_kernels::BackendKind::Cpu => 1e-5,
                _ => 2e-5,
            };
            let err = check(
                &format!("{}/{}", dev.kind(), c.name),
                &exp,
                &out.y,
                (
                    &out.topk_ids,
                    &kept,
                    &common::wide(&out.topk_weights),
                    out.slots,
                ),
                tol,
            );
            line += &format!(", {} {err:.1e}", dev.kind());
        }
        println!("{line}");
    }
}

#[test]
fn dense_and_out_of_range_layers_are_errors_naming_the_layer() {
    for c in cases() {
        for (layer, words) in c
            .dense_layers
            .iter()
            .map(|l| (l.as_str(), "is dense"))
            .chain([(c.out_of_range.as_str(), "out of range")])
        {
            let e = MoeLayer::from_checkpoint(&c.dir, layer)
                .err()
                .unwrap_or_else(|| panic!("{}: layer {layer} loaded", c.name))
                .to_string();
            assert!(
                e.contains(words)
                    && e.contains(&format!("layer {layer}"))
                    && e.contains("MoE layers"),
                "{}: layer {layer}: {e}",
                c.name
            );
        }
    }
}

fn moe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .env(
            "WGPU_BACKEND",
            std::env::var("WGPU_BACKEND").unwrap_or_default(),
        )
        .output()
        .expect("moe runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moe-checkpoint-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn read_outputs(path: &Path) -> (Vec<f32>, Vec<u32>, Vec<f32>, Option<Vec<i32>>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let y = bytemuck::pod_collect_to_vec::<u8, f32>(st.tensor("y").unwrap().data());
    let ids = bytemuck::pod_collect_to_vec::<u8, i32>(st.tensor("topk_ids").unwrap().data())
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let w = bytemuck::pod_collect_to_vec::<u8, f32>(st.tensor("topk_weights").unwrap().data());
    let kept = st
        .tensor("kept")
        .ok()
        .map(|k| bytemuck::pod_collect_to_vec::<u8, i32>(k.data()));
    (y, ids, w, kept)
}

#[test]
fn cli_run_checkpoint_and_import_match_transformers() {
    let backends = ["cpu", "wgpu"];
    for c in cases() {
        let (_, exp) = inputs(&c);
        let input = checkpoints().join(format!("{}.input.safetensors", c.name));
        let dir = c.dir.to_str().unwrap();
        for backend in backends {
            let out = tmp(&format!("{}-{backend}.safetensors", c.name));
            let o = moe(&[
                "run",
                "--checkpoint",
                dir,
                "--layer",
                &c.layer,
                "--input",
                input.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--backend",
                backend,
            ]);
            assert!(
                o.status.success(),
                "{}: moe run --backend {backend}: {}",
                c.name,
                String::from_utf8_lossy(&o.stderr)
            );
            let (y, ids, w, kept) = read_outputs(&out);
            let slots = ids.len() / exp.t;
            let kept: Vec<bool> = match kept {
                Some(k) => k.iter().map(|&k| k != 0).collect(),
                None => vec![true; ids.len()],
            };
            let tol = if backend == "cpu" { 1e-5 } else { 2e-5 };
            check(
                &format!("moe run {backend} {}", c.name),
                &exp,
                &y,
                (&ids, &kept, &common::wide(&w), slots),
                tol,
            );
        }
        // import writes the canonical files; they load to the same layer.
        let (w, cfg) = (
            tmp(&format!("{}.weights.safetensors", c.name)),
            tmp(&format!("{}.config.json", c.name)),
        );
        let o = moe(&[
            "import",
            "--checkpoint",
            dir,
            "--layer",
            &c.layer,
            "--weights",
            w.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ]);
        assert!(
            o.status.success(),
            "{}: import: {}",
            c.name,
            String::from_utf8_lossy(&o.stderr)
        );
        let imported =
            MoeLayer::load(LayerConfig::from_file(&cfg).unwrap(), &w).expect("imported files load");
        let direct = MoeLayer::from_checkpoint(&c.dir, &c.layer).unwrap();
        assert!(imported == direct, "{}: imported layer differs", c.name);
        // Dense layers exit 1 with a message.
        if let Some(d) = c.dense_layers.first() {
            let o = moe(&[
                "run",
                "--checkpoint",
                dir,
                "--layer",
                d,
                "--input",
                input.to_str().unwrap(),
                "--output",
                tmp("never.safetensors").to_str().unwrap(),
            ]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{}: {err}", c.name);
            assert!(
                err.contains("is dense") && !err.contains("panicked"),
                "{err}"
            );
        }
    }
}

/// A copy of a fixture checkpoint in a temp folder, to break.
fn copy_checkpoint(name: &str, tag: &str) -> PathBuf {
    let src = checkpoints().join(name);
    let dst = tmp(&format!("broken-{name}-{tag}"));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, v.to_string()).unwrap();
}

/// `moe run --checkpoint` on a broken checkpoint: exit 1, a message with every word given.
fn run_fails(dir: &Path, layer: &str, words: &[&str]) {
    let input = checkpoints().join("mixtral_bf16.input.safetensors");
    let o = moe(&[
        "run",
        "--checkpoint",
        dir.to_str().unwrap(),
        "--layer",
        layer,
        "--input",
        input.to_str().unwrap(),
        "--output",
        tmp("never.safetensors").to_str().unwrap(),
        "--backend",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{dir:?} layer {layer}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for w in words {
        assert!(err.contains(w), "{dir:?} layer {layer}: {w:?} not in {err}");
    }
}

#[test]
fn broken_checkpoints_exit_1_naming_file_tensor_and_layer() {
    // Unknown model_type: the supported ones are listed.
    let d = copy_checkpoint("mixtral_bf16", "type");
    edit_config(&d, |c| {
        c.insert("model_type".into(), "llama4_text".into());
    });
    run_fails(
        &d,
        "1",
        &[
            "unknown model_type \"llama4_text\"",
            "mixtral",
            "deepseek_v3",
            "nllb-moe",
        ],
    );
    // A shard the index lists is missing.
    let d = copy_checkpoint("mixtral_bf16", "shard");
    std::fs::remove_file(d.join("model-00002-of-00003.safetensors")).unwrap();
    run_fails(
        &d,
        "1",
        &["missing shard", "model-00002-of-00003.safetensors"],
    );
    // config.json disagrees with the tensors: the tensor and layer are named.
    let d = copy_checkpoint("mixtral_bf16", "shape");
    edit_config(&d, |c| {
        c.insert("intermediate_size".into(), 40.into());
    });
    run_fails(
        &d,
        "1",
        &[
            "disagrees with config.json",
            "block_sparse_moe.experts.0.w1.weight",
            "layer 1",
        ],
    );
    // More experts in config.json than tensors.
    let d = copy_checkpoint("qwen3_moe_bf16", "experts");
    edit_config(&d, |c| {
        c.remove("num_local_experts");
        c.insert("num_experts".into(), 17.into());
    });
    run_fails(
        &d,
        "1",
        &[
            "model.layers.1.mlp.gate.weight",
            "disagrees with config.json",
        ],
    );
    // A tensor missing from the index and shards.
    let d = copy_checkpoint("mixtral_bf16", "tensor");
    let idx = d.join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&idx).unwrap()).unwrap();
    v["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.layers.1.block_sparse_moe.experts.5.w2.weight");
    std::fs::write(&idx, v.to_string()).unwrap();
    run_fails(
        &d,
        "1",
        &[
            "missing tensor",
            "model.layers.1.block_sparse_moe.experts.5.w2.weight",
            "layer 1",
        ],
    );
    // Encoder-decoder models need encoder.L / decoder.L; decoder-only ones have no encoder.
    run_fails(
        &checkpoints().join("switch"),
        "1",
        &["encoder-decoder", "encoder.1 or decoder.1"],
    );
    run_fails(
        &checkpoints().join("mixtral_bf16"),
        "encoder.1",
        &["has no encoder"],
    );
    run_fails(
        &checkpoints().join("mixtral_bf16"),
        "one",
        &["expected a layer index"],
    );
    // Not a checkpoint at all.
    run_fails(&tmp("no-such-dir"), "1", &["not a directory"]);
    // An FP8 weight without its scale.
    let d = copy_checkpoint("qwen3_moe_fp8", "scale");
    let f = d.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv")
        .collect();
    safetensors::serialize_to_file(kept, None, &f).unwrap();
    run_fails(
        &d,
        "1",
        &[
            "model.layers.1.mlp.experts.2.up_proj.weight",
            "without its scale",
        ],
    );
}

#[test]
fn routing_options_follow_transformers_config_semantics() {
    use moe_kernels::config::{Capacity, Priority};
    // NLLB: a fraction <= 0 falls back to expert_capacity.
    let d = copy_checkpoint("nllb_moe", "capacity");
    edit_config(&d, |c| {
        c.insert("moe_eval_capacity_token_fraction".into(), (-1.0).into());
        c.insert("expert_capacity".into(), 3.into());
        c.insert("batch_prioritized_routing".into(), true.into());
    });
    let l = MoeLayer::from_checkpoint(&d, "encoder.1").unwrap();
    assert_eq!(l.config.routing.capacity, Some(Capacity::Tokens(3)));
    assert_eq!(l.config.routing.priority, Priority::Top1Score);
    // NLLB's random second-expert policy draws random numbers even in eval: refused.
    edit_config(&d, |c| {
        c.insert("second_expert_policy".into(), "random".into());
    });
    let e = MoeLayer::from_checkpoint(&d, "encoder.1")
        .unwrap_err()
        .to_string();
    assert!(e.contains("second_expert_policy \"random\""), "{e}");
    // DeepSeek: one group is no group restriction; the scaling factor is read.
    let d = copy_checkpoint("deepseek_v3_bf16", "groups");
    edit_config(&d, |c| {
        c.insert("n_group".into(), 1.into());
        c.insert("topk_group".into(), 1.into());
        c.insert("routed_scaling_factor".into(), 1.5.into());
    });
    let l = MoeLayer::from_checkpoint(&d, "1").unwrap();
    assert_eq!(
        (l.config.routing.groups, l.config.routing.scale),
        (None, 1.5)
    );
}
