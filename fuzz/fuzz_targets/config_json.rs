//! `LayerConfig::from_json` on arbitrary text: it must return a config or an error, never
//! panic. An accepted config is validated against several E; where it is valid, the gate and
//! permute run on fixed logits, and a tiny synthetic layer runs the f64 reference forward.

#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use moe_kernels::cpu::gate::gate;
use moe_kernels::synth::{random_layer, random_x, Extras};
use moe_kernels::{DType, LayerConfig};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(cfg) = LayerConfig::from_json(&text, "fuzz") else {
        return;
    };
    // from_json promises the shape-independent checks passed.
    cfg.validate_values()
        .unwrap_or_else(|e| panic!("from_json accepted a config validate_values rejects: {e}"));
    let seed = common::hash(data);
    let t = 5;
    for e in [1usize, 2, 3, 4, 8, 16, 64] {
        let r = &cfg.routing;
        if r.validate(e).is_err() {
            continue;
        }
        let slots = r.slots(e);
        assert!(slots >= 1 && slots <= e, "slots = {slots} for E = {e}");
        if let Some(c) = r.capacity {
            let _ = c.tokens_per_expert(t, slots, e);
            let _ = c.tokens_per_expert(0, slots, e);
            // T·k beyond usize overflows in `tokens_per_expert` (config.rs); stay allocatable.
            let _ = c.tokens_per_expert(u32::MAX as usize, slots, e);
        }
        // Logits with ties, so tie-breaking and group scoring are exercised.
        let mut rng = common::Rng::new(seed ^ e as u64);
        let logits: Vec<f64> = (0..t * e)
            .map(|_| f64::from((rng.next() % 7) as u32) - 3.0)
            .collect();
        let bias: Vec<f64> = (0..e).map(|_| f64::from(rng.unit())).collect();
        let routing = gate(&logits, t, e, Some(&bias), r)
            .unwrap_or_else(|err| panic!("gate rejected a config valid for E = {e}: {err}"));
        common::check_routing(&routing, r, t, e);
    }
    // A tiny layer with this config: E = 16 (or the smallest E it is valid for).
    let Some(e) = [16usize, 8, 4, 64]
        .into_iter()
        .find(|&e| cfg.routing.validate(e).is_ok())
    else {
        return;
    };
    let extras = Extras {
        router_bias: seed & 1 != 0,
        score_correction_bias: seed & 2 != 0,
        expert_biases: seed & 4 != 0,
        shared_ffn: (seed & 8 != 0).then_some(3),
        shared_gate: seed & 16 != 0,
    };
    let dtype = DType::ALL[(seed >> 5) as usize % 3];
    let layer = random_layer(cfg, e, 4, 3, extras, dtype, seed)
        .unwrap_or_else(|err| panic!("a valid config made an invalid synthetic layer: {err}"));
    let x = random_x(t, 4, seed);
    let out = layer
        .forward_reference(&x)
        .unwrap_or_else(|err| panic!("forward_reference failed on a valid layer: {err}"));
    assert_eq!(out.y.len(), t * 4);
    common::check_routing(&out.routing, &cfg.routing, t, e);
});
