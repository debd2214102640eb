//! Safetensors bytes -> `io::parse_tensors` -> `MoeLayer::from_tensors` under several configs
//! -> the f64 reference forward and the CPU backend's staged forward on a tiny input. Every
//! step must return a value or an error, never panic. A tensor named `x` is taken out and used
//! as the input (and the bytes go through `io::load_input`, which reads a file).

#![no_main]

#[path = "common.rs"]
mod common;

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use moe_kernels::config::{ClampedSwiglu, ExpertChoice, Groups};
use moe_kernels::tensor::TensorData;
use moe_kernels::{
    io, Activation, Backend, BackendKind, Capacity, DType, LayerConfig, MoeLayer, Preset, Priority,
    RoutingConfig, Tensor,
};

/// Tensors cloned into each config's layer: keep the per-input cost bounded.
const MAX_ELEMENTS: usize = 1_000_000;
/// Multiply-adds one forward may cost (T · slots · F · H and friends).
const MAX_FORWARD_WORK: usize = 4_000_000;

fn configs(e: usize) -> Vec<LayerConfig> {
    let mut v = vec![
        Preset::Mixtral.config(),
        Preset::NllbMoe.config(),    // relu, not gated, capacity fraction
        Preset::DeepseekV3.config(), // sigmoid, 8 groups keep 4, top-8
        Preset::GptOss.config(),     // logits, softmax over picks, clamped swiglu
    ];
    // ReLU, top-1, capacity 1 token per expert (heavy dropping).
    let mut relu = Preset::Switch.config();
    relu.routing.capacity = Some(Capacity::Tokens(1));
    v.push(relu);
    // DeepSeek-style routing sized to this E: groups that divide E, k within the kept groups.
    let count = [4usize, 2, 1]
        .into_iter()
        .find(|&c| (e / c) * c == e)
        .unwrap_or(1);
    let mut ds = Preset::DeepseekV3.config();
    let keep = count.div_ceil(2);
    ds.routing.groups = Some(Groups { count, keep });
    ds.routing.top_k = (keep * (e / count.max(1))).clamp(1, 3);
    v.push(ds);
    // Expert choice with GELU; GeGLU with capacity factor and top-1 priority.
    let base = LayerConfig::default();
    v.push(LayerConfig {
        activation: Activation::Gelu,
        routing: RoutingConfig {
            expert_choice: Some(ExpertChoice {
                capacity_factor: 1.5,
            }),
            ..base.routing
        },
        ..base
    });
    v.push(LayerConfig {
        activation: Activation::Geglu,
        routing: RoutingConfig {
            capacity: Some(Capacity::Factor(1.0)),
            priority: Priority::Top1Score,
            top_k: 1,
            ..base.routing
        },
        ..base
    });
    let mut cs = Preset::GptOss.config();
    cs.activation = Activation::ClampedSwiglu(ClampedSwiglu {
        alpha: 1e300,
        limit: 1e-300,
    });
    cs.routing.top_k = 1;
    v.push(cs);
    v
}

/// A tiny deterministic `x` `[T, H]`, T in 1..=3, from the input's hash.
fn tiny_x(h: usize, seed: u64) -> Option<Tensor> {
    let mut rng = common::Rng::new(seed);
    let t = 1 + (seed % 3) as usize;
    let n = t.checked_mul(h)?;
    if n > 4096 {
        return None;
    }
    Tensor::from_f32(vec![t, h], (0..n).map(|_| rng.unit()).collect()).ok()
}

/// Same shape, dtype and bit patterns (NaN payloads included; `==` says NaN != NaN).
fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    let bits = |t: &Tensor| -> Vec<u32> {
        match t.data() {
            TensorData::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
            TensorData::F16(v) => v.iter().map(|x| u32::from(x.to_bits())).collect(),
            TensorData::BF16(v) => v.iter().map(|x| u32::from(x.to_bits())).collect(),
        }
    };
    a.shape() == b.shape() && a.dtype() == b.dtype() && bits(a) == bits(b)
}

/// Runs `bytes` through `io::load_input` via a per-process temporary file.
fn check_load_input(bytes: &[u8], tensors: &BTreeMap<String, Tensor>) {
    let path = std::env::temp_dir().join(format!("moe-fuzz-x-{}.safetensors", std::process::id()));
    if std::fs::write(&path, bytes).is_err() {
        return;
    }
    let r = io::load_input(&path);
    let _ = std::fs::remove_file(&path);
    let want_ok = tensors.len() == 1 && tensors.get("x").is_some_and(|x| x.shape().len() == 2);
    match r {
        Ok(x) => {
            assert!(want_ok, "load_input accepted a file it should reject");
            let same = tensors.get("x").is_some_and(|y| same_bits(&x, y));
            assert!(same, "load_input and parse_tensors disagree: {x:?}");
        }
        Err(e) => assert!(!want_ok, "load_input rejected a valid input file: {e}"),
    }
}

fn forward_work(layer: &MoeLayer, t: usize) -> usize {
    let d = layer.dims();
    let slots = layer.config.routing.slots(d.experts);
    let shared = layer.shared.as_ref().map_or(0, |s| s.weights.up.len() * 3);
    t.saturating_mul(slots)
        .saturating_mul(d.ffn.saturating_mul(d.hidden).saturating_mul(3))
        .saturating_add(t.saturating_mul(d.experts.saturating_mul(d.hidden)))
        .saturating_add(t.saturating_mul(shared))
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut tensors) = io::parse_tensors(data, "fuzz") else {
        return;
    };
    if tensors.contains_key("x") {
        check_load_input(data, &tensors);
    }
    let total: usize = tensors
        .values()
        .map(Tensor::len)
        .fold(0, usize::saturating_add);
    if total > MAX_ELEMENTS {
        return;
    }
    let seed = common::hash(data);
    let file_x = tensors.remove("x");
    let e_guess = tensors
        .get("router.weight")
        .and_then(|w| w.shape().first().copied())
        .unwrap_or(8);
    let dev = Backend::new(BackendKind::Cpu).expect("cpu backend");
    for cfg in configs(e_guess) {
        let Ok(layer) = MoeLayer::from_tensors(cfg, tensors.clone(), "fuzz") else {
            continue;
        };
        let d = layer.dims();
        assert!(
            d.experts >= 1 && d.hidden >= 1 && d.ffn >= 1,
            "accepted dims {d:?}"
        );
        let x = match &file_x {
            Some(x) if x.shape().len() == 2 && x.shape()[1] == d.hidden && x.shape()[0] <= 8 => {
                x.clone()
            }
            _ => match tiny_x(d.hidden, seed) {
                Some(x) => x,
                None => continue,
            },
        };
        let t = x.shape()[0];
        if forward_work(&layer, t) > MAX_FORWARD_WORK {
            continue;
        }
        let out = layer
            .forward_reference(&x)
            .unwrap_or_else(|err| panic!("forward_reference failed on an accepted layer: {err}"));
        assert_eq!(out.y.len(), t * d.hidden, "y length");
        common::check_routing(&out.routing, &layer.config.routing, t, d.experts);

        let staged = layer
            .forward(&dev, &x)
            .unwrap_or_else(|err| panic!("CPU backend forward failed on an accepted layer: {err}"));
        assert_eq!(staged.y.len(), t * d.hidden, "staged y length");
        assert!(
            staged.topk_ids.iter().all(|&id| (id as usize) < d.experts),
            "staged ids"
        );

        // Weights rounded to half precision go through the same paths.
        let half = layer.with_expert_dtype(if seed & 1 == 0 {
            DType::F16
        } else {
            DType::BF16
        });
        half.forward_reference(&x)
            .unwrap_or_else(|err| panic!("forward_reference failed on the half layer: {err}"));
    }
});
