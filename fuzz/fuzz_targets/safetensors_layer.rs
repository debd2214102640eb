//! Safetensors bytes -> `io::parse_file_tensors` (F32 / F16 / BF16 and the U8 / F8_E4M3 parts
//! of quantized matrices) -> `MoeLayer::from_file_tensors` under several configs -> the f64
//! reference forward and the CPU backend's staged forward on a tiny input. Every step must
//! return a value or an error, never panic. A tensor named `x` is taken out and used as the
//! input (and the bytes go through `io::load_input`, which reads a file). `io::parse_tensors`
//! must agree with `parse_file_tensors` (it accepts exactly the all-float files).
//!
//! An accepted quantized layer must hold consistent parts (codes, scales and zero points of
//! the sizes its format implies) and write itself back (`file_tensors`) as a file that loads
//! as the same layer; a small accepted dense layer is quantized (`MoeLayer::quantized`, one
//! format per input) and goes through the same checks and forwards.

#![no_main]

#[path = "common.rs"]
mod common;

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use moe_kernels::config::{ClampedSwiglu, ExpertChoice, Groups};
use moe_kernels::cpu::expert_gemm::ExpertWeights;
use moe_kernels::io::FileTensor;
use moe_kernels::quant::{QuantFormat, QuantSpec, Weight};
use moe_kernels::tensor::TensorData;
use moe_kernels::{
    io, Activation, Backend, BackendKind, Capacity, DType, LayerConfig, MoeLayer, Preset, Priority,
    RoutingConfig, Tensor,
};

/// Tensors cloned into each config's layer: keep the per-input cost bounded.
const MAX_ELEMENTS: usize = 1_000_000;
/// Multiply-adds one forward may cost (T · slots · F · H and friends); a quantized weight's
/// decode counts as [`QUANT_WORK`] multiply-adds.
const MAX_FORWARD_WORK: usize = 4_000_000;
const QUANT_WORK: usize = 4;
/// Expert weights of a dense layer still quantized to every format (the FP8 encoder searches
/// the code table per element).
const MAX_QUANTIZE: usize = 4096;

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

/// Same dtype, shape and bits (`==` says NaN != NaN).
fn same_file_tensor(a: &FileTensor, b: &FileTensor) -> bool {
    match (a, b) {
        (FileTensor::Float(x), FileTensor::Float(y)) => same_bits(x, y),
        _ => a == b,
    }
}

/// `io::parse_tensors` accepts exactly the files whose tensors are all F32 / F16 / BF16, and
/// gives the same tensors.
fn check_parse_tensors(bytes: &[u8], file: &BTreeMap<String, FileTensor>) {
    let all_float = file.values().all(|t| matches!(t, FileTensor::Float(_)));
    match io::parse_tensors(bytes, "fuzz") {
        Ok(t) => {
            assert!(all_float, "parse_tensors accepted a U8 / F8_E4M3 tensor");
            assert_eq!(t.len(), file.len(), "parse_tensors: tensor count");
            for (name, x) in &t {
                let same = matches!(file.get(name), Some(FileTensor::Float(y)) if same_bits(x, y));
                assert!(
                    same,
                    "parse_tensors and parse_file_tensors disagree on {name:?}"
                );
            }
        }
        Err(e) => assert!(!all_float, "parse_tensors rejected an all-float file: {e}"),
    }
}

/// Runs `bytes` through `io::load_input` via a per-process temporary file.
fn check_load_input(bytes: &[u8], tensors: &BTreeMap<String, FileTensor>) {
    let path = std::env::temp_dir().join(format!("moe-fuzz-x-{}.safetensors", std::process::id()));
    if std::fs::write(&path, bytes).is_err() {
        return;
    }
    let r = io::load_input(&path);
    let _ = std::fs::remove_file(&path);
    let x = match tensors.get("x") {
        Some(FileTensor::Float(x)) => Some(x),
        _ => None,
    };
    let all_float = tensors.values().all(|t| matches!(t, FileTensor::Float(_)));
    let want_ok = all_float && tensors.len() == 1 && x.is_some_and(|x| x.shape().len() == 2);
    match r {
        Ok(got) => {
            assert!(want_ok, "load_input accepted a file it should reject");
            let same = x.is_some_and(|y| same_bits(&got, y));
            assert!(same, "load_input and parse_file_tensors disagree: {got:?}");
        }
        Err(e) => assert!(!want_ok, "load_input rejected a valid input file: {e}"),
    }
}

/// The matrices of one expert set: gate (when gated), up, down.
fn expert_matrices(w: &ExpertWeights) -> impl Iterator<Item = &Weight> {
    w.gate.iter().chain([&w.up, &w.down])
}

/// Every matrix of the layer (routed, then shared).
fn matrices(layer: &MoeLayer) -> Vec<&Weight> {
    expert_matrices(&layer.experts)
        .chain(
            layer
                .shared
                .iter()
                .flat_map(|s| expert_matrices(&s.weights)),
        )
        .collect()
}

/// An accepted quantized matrix holds exactly the bytes its format and shape imply.
fn check_quant_parts(layer: &MoeLayer) {
    for w in matrices(layer) {
        let Some(q) = w.quant() else { continue };
        let rows = q.experts * q.rows;
        assert!(q.experts >= 1 && q.rows >= 1 && q.cols >= 1, "empty {q:?}");
        assert_eq!(q.codes.len(), rows * q.row_bytes(), "{} codes", q.format);
        assert_eq!(
            q.scales.len(),
            q.experts * q.scale_rows() * q.scale_cols(),
            "{} scales",
            q.format
        );
        if q.format != QuantFormat::Fp8Block {
            assert_eq!(q.group() * q.scale_cols(), q.cols, "{} group", q.format);
        }
        if let Some(z) = &q.zeros {
            assert_eq!(q.format, QuantFormat::Int4, "zero points outside int4");
            assert_eq!(z.len(), q.scales.len(), "zero points");
        }
        let parts = q.codes.len()
            + q.scales.len() * q.scales.elem_bytes()
            + q.zeros.as_ref().map_or(0, Vec::len);
        assert_eq!(w.bytes(), parts as u64, "Weight::bytes of {}", q.format);
    }
}

/// The layer written back through `file_tensors` loads as the same layer (bit for bit).
fn check_round_trip(layer: &MoeLayer, what: &str) {
    let file = layer
        .file_tensors()
        .unwrap_or_else(|e| panic!("{what}: file_tensors of an accepted layer failed: {e}"));
    let back = MoeLayer::from_file_tensors(layer.config, file.iter().cloned().collect(), what)
        .unwrap_or_else(|e| panic!("{what}: the layer's own file tensors do not load: {e}"));
    let again = back
        .file_tensors()
        .expect("file_tensors of the loaded layer");
    assert_eq!(
        file.len(),
        again.len(),
        "{what}: tensor count after a round trip"
    );
    for ((n, a), (m, b)) in file.iter().zip(&again) {
        assert!(
            n == m && same_file_tensor(a, b),
            "{what}: {n:?} changed in a round trip"
        );
    }
}

fn forward_work(layer: &MoeLayer, t: usize) -> usize {
    let d = layer.dims();
    let slots = layer.config.routing.slots(d.experts);
    let shared = layer.shared.as_ref().map_or(0, |s| s.weights.up.len() * 3);
    let decode = if layer.experts.up.quant().is_some() {
        QUANT_WORK
    } else {
        1
    };
    t.saturating_mul(slots)
        .saturating_mul(d.ffn.saturating_mul(d.hidden).saturating_mul(3))
        .saturating_add(t.saturating_mul(shared))
        .saturating_mul(decode)
        .saturating_add(t.saturating_mul(d.experts.saturating_mul(d.hidden)))
}

/// The reference and the CPU backend's staged forward of an accepted layer on `x` succeed
/// with outputs of the right sizes and valid routing; so does the reference of its weights
/// rounded to half precision (quantized matrices stay as they are).
fn check_forward(layer: &MoeLayer, x: &Tensor, dev: &Backend, seed: u64, what: &str) {
    let d = layer.dims();
    let t = x.shape()[0];
    let out = layer.forward_reference(x).unwrap_or_else(|err| {
        panic!("{what}: forward_reference failed on an accepted layer: {err}")
    });
    assert_eq!(out.y.len(), t * d.hidden, "y length");
    common::check_routing(&out.routing, &layer.config.routing, t, d.experts);

    let staged = layer.forward(dev, x).unwrap_or_else(|err| {
        panic!("{what}: CPU backend forward failed on an accepted layer: {err}")
    });
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
    half.forward_reference(x)
        .unwrap_or_else(|err| panic!("{what}: forward_reference failed on the half layer: {err}"));
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut tensors) = io::parse_file_tensors(data, "fuzz") else {
        assert!(
            io::parse_tensors(data, "fuzz").is_err(),
            "parse_tensors accepted what parse_file_tensors rejects"
        );
        return;
    };
    check_parse_tensors(data, &tensors);
    if tensors.contains_key("x") {
        check_load_input(data, &tensors);
    }
    // Elements, or bytes for U8 / F8_E4M3 tensors.
    let total: usize = tensors
        .values()
        .map(|t| t.shape().iter().fold(1usize, |a, &b| a.saturating_mul(b)))
        .fold(0, usize::saturating_add);
    if total > MAX_ELEMENTS {
        return;
    }
    let seed = common::hash(data);
    let file_x = match tensors.remove("x") {
        Some(FileTensor::Float(x)) => Some(x),
        _ => None,
    };
    let e_guess = tensors
        .get("router.weight")
        .and_then(|w| w.shape().first().copied())
        .unwrap_or(8);
    let dev = Backend::new(BackendKind::Cpu).expect("cpu backend");
    let (mut checked_parts, mut quantized) = (false, false);
    for cfg in configs(e_guess) {
        let Ok(layer) = MoeLayer::from_file_tensors(cfg, tensors.clone(), "fuzz") else {
            continue;
        };
        let d = layer.dims();
        assert!(
            d.experts >= 1 && d.hidden >= 1 && d.ffn >= 1,
            "accepted dims {d:?}"
        );
        if !checked_parts {
            // The tensors are the same under every config: once per input.
            checked_parts = true;
            check_quant_parts(&layer);
            check_round_trip(&layer, "loaded layer");
        }
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
        if forward_work(&layer, t) <= MAX_FORWARD_WORK {
            check_forward(&layer, &x, &dev, seed, "loaded layer");
        }

        // Once per input: a small dense layer quantized (an error when a dimension does not
        // fit the format, never a panic), then the same checks.
        let weights: usize = matrices(&layer).iter().map(|w| w.len()).sum();
        if quantized || layer.experts.up.quant().is_some() || weights > MAX_QUANTIZE {
            continue;
        }
        quantized = true;
        // One format per input (the FP8 encoder is the slow part), picked by its hash.
        let format = QuantFormat::ALL[((seed >> 8) % 3) as usize];
        let mut spec = QuantSpec::new(format);
        spec.zeros = seed & 2 == 0;
        // FP8 block scales are F32 or BF16 in a file; INT4 scales any of the three.
        spec.scale_dtype = match (format, seed % 3) {
            (_, 0) => DType::F32,
            (QuantFormat::Fp8Block, _) | (_, 1) => DType::BF16,
            _ => DType::F16,
        };
        let Ok(q) = layer.quantized(&spec) else {
            continue;
        };
        check_quant_parts(&q);
        check_round_trip(&q, format.name());
        if forward_work(&q, t) <= MAX_FORWARD_WORK {
            check_forward(&q, &x, &dev, seed, format.name());
        }
    }
});
