//! The shared test harness: every available backend, seeded inputs, relative L2, tolerances.
//! Each test body runs on every backend that [`backends`] returns and prints which ran.
#![allow(dead_code)]

pub mod fixture;

use moe_kernels::backend::unavailable_reason;
use moe_kernels::config::{Capacity, RoutingConfig};
use moe_kernels::synth::{random_layer, Extras};
use moe_kernels::{Backend, BackendKind, DType, MoeLayer, Preset};

/// Every backend that can run here. Prints which ran and why the others did not.
///
/// CUDA is skipped when no driver is present (the reason is printed). In CI (`CI=true`)
/// the wgpu backend must run (on lavapipe): a missing adapter fails the test instead of
/// skipping it.
pub fn backends(test: &str) -> Vec<Backend> {
    let mut ran = Vec::new();
    let mut names = Vec::new();
    let mut skipped = Vec::new();
    for kind in [BackendKind::Cpu, BackendKind::Cuda, BackendKind::Wgpu] {
        match Backend::new(kind) {
            Ok(b) => {
                names.push(kind.name());
                ran.push(b);
            }
            Err(_) => skipped.push(format!(
                "{kind} ({})",
                unavailable_reason(kind).unwrap_or_default()
            )),
        }
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if in_ci && cfg!(feature = "wgpu") {
        assert!(
            names.contains(&"wgpu"),
            "[{test}] CI=true but the wgpu backend did not start: {skipped:?}"
        );
    }
    let skipped = if skipped.is_empty() {
        "none".to_string()
    } else {
        skipped.join("; ")
    };
    println!(
        "[{test}] backends ran: {}; skipped: {skipped}",
        names.join(", ")
    );
    assert!(!ran.is_empty(), "no backend could run");
    ran
}

/// Relative L2 distance of `a` from the reference `b` (absolute when `b` is all zero).
pub fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (f64::from(x) - y).powi(2);
        den += y * y;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Relative L2 of two f64 vectors.
pub fn rel_l2_f64(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// DESIGN.md section 5's bound for results computed with weights in `dtype`.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        DType::F16 => 5e-3,
        DType::BF16 => 1e-2,
    }
}

/// Token counts of the shape sweep (DESIGN.md section 5).
pub const TOKENS: [usize; 5] = [0, 1, 7, 37, 300];

/// f32 → f64 copy.
pub fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Bound for a backend computing with `dtype` weights against a reference that uses the same
/// rounded weights: f32 activations everywhere except CUDA's tensor-core path, which rounds
/// activations to the weight dtype too (so DESIGN.md's dtype bound applies there).
pub fn stage_tolerance(kind: BackendKind, dtype: DType) -> f64 {
    match (kind, dtype) {
        (BackendKind::Cuda, d) => tolerance(d),
        _ => tolerance(DType::F32),
    }
}

/// The sizes of a small synthetic preset layer: experts, hidden, FFN width, the shared
/// expert's width (Qwen2-MoE, DeepSeek-V3) and Switch's capacity in tokens.
pub struct Small {
    pub experts: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub shared_ffn: (usize, usize),
    pub switch_capacity: i64,
}

/// The odd sizes most tests use (E 16, H 37, F 29).
pub const SMALL: Small = Small {
    experts: 16,
    hidden: 37,
    ffn: 29,
    shared_ffn: (45, 29),
    switch_capacity: 5,
};

/// A synthetic layer shaped like preset `p`'s family at [`SMALL`] sizes, after `tweak` has
/// edited its routing (see [`preset_layer_sized`]).
pub fn preset_layer_with(
    p: Preset,
    dtype: DType,
    seed: u64,
    tweak: impl FnOnce(&mut RoutingConfig),
) -> MoeLayer {
    preset_layer_sized(p, dtype, seed, &SMALL, tweak)
}

/// A synthetic layer shaped like preset `p`'s family at sizes `s` (Qwen2-MoE's gated shared
/// expert, DeepSeek-V3's correction bias, shared expert and top-6, gpt-oss / NLLB expert
/// biases, Switch's capacity), after `tweak` has edited its routing.
pub fn preset_layer_sized(
    p: Preset,
    dtype: DType,
    seed: u64,
    s: &Small,
    tweak: impl FnOnce(&mut RoutingConfig),
) -> MoeLayer {
    let mut cfg = p.config();
    let mut extras = Extras::default();
    match p {
        Preset::Qwen2Moe => {
            extras.shared_ffn = Some(s.shared_ffn.0);
            extras.shared_gate = true;
        }
        Preset::DeepseekV3 => {
            extras.score_correction_bias = true;
            extras.shared_ffn = Some(s.shared_ffn.1);
            cfg.routing.top_k = 6;
        }
        Preset::GptOss | Preset::NllbMoe => {
            extras.expert_biases = true;
            extras.router_bias = p == Preset::GptOss;
        }
        Preset::Switch => cfg.routing.capacity = Some(Capacity::Tokens(s.switch_capacity)),
        _ => {}
    }
    tweak(&mut cfg.routing);
    random_layer(cfg, s.experts, s.hidden, s.ffn, extras, dtype, seed).expect("layer")
}
