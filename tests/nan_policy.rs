//! The NaN / ±Inf policy on every backend: NaN ranks below every number, ties (including
//! -inf against -inf and NaN against NaN) go to the lower index, a NaN or an infinite maximum
//! makes a softmax NaN. Whatever the input, ids are in range, nothing panics, and every
//! backend gives exactly the CPU reference's ids, kept and counts, with weights NaN exactly
//! where the reference's are NaN (and equal infinities, and close finite values elsewhere).

mod common;

use moe_kernels::config::{
    Capacity, Combine, ExpertChoice, Groups, Priority, RoutingConfig, Scoring,
};
use moe_kernels::cpu;
use moe_kernels::synth::{random_x, Gen};
use moe_kernels::{DType, GateBuffers, MoeLayer, Preset, Tensor};

const NAN: f32 = f32::NAN;
const INF: f32 = f32::INFINITY;

/// Routing variants with the special values in mind, for E experts and k picks.
fn variants(e: usize, k: usize) -> Vec<(String, RoutingConfig, bool)> {
    let base = RoutingConfig {
        top_k: k,
        ..RoutingConfig::default()
    };
    let mut v = Vec::new();
    for scoring in [Scoring::Softmax, Scoring::Sigmoid, Scoring::Logits] {
        for renormalize in [false, true] {
            v.push((
                format!("{scoring:?} renormalize={renormalize}"),
                RoutingConfig {
                    scoring,
                    renormalize,
                    ..base
                },
                false,
            ));
        }
        v.push((
            format!("{scoring:?} + correction bias"),
            RoutingConfig { scoring, ..base },
            true,
        ));
    }
    v.push((
        "logits softmax_selected".into(),
        RoutingConfig {
            scoring: Scoring::Logits,
            combine: Combine::SoftmaxSelected,
            renormalize: false,
            scale: 1.5,
            ..base
        },
        false,
    ));
    v.push((
        "capacity tokens position".into(),
        RoutingConfig {
            capacity: Some(Capacity::Tokens(2)),
            ..base
        },
        false,
    ));
    v.push((
        "capacity fraction top1".into(),
        RoutingConfig {
            capacity: Some(Capacity::Fraction(0.3)),
            priority: Priority::Top1Score,
            scoring: Scoring::Sigmoid,
            ..base
        },
        false,
    ));
    v.push((
        "capacity factor top1 logits".into(),
        RoutingConfig {
            capacity: Some(Capacity::Factor(1.0)),
            priority: Priority::Top1Score,
            scoring: Scoring::Logits,
            renormalize: false,
            ..base
        },
        false,
    ));
    for scoring in [Scoring::Softmax, Scoring::Sigmoid, Scoring::Logits] {
        v.push((
            format!("expert choice {scoring:?}"),
            RoutingConfig {
                scoring,
                expert_choice: Some(ExpertChoice {
                    capacity_factor: 1.5,
                }),
                ..base
            },
            scoring == Scoring::Sigmoid,
        ));
    }
    if e % 4 == 0 && k <= e / 2 {
        for scoring in [Scoring::Sigmoid, Scoring::Logits] {
            v.push((
                format!("groups 4 keep 2 {scoring:?}"),
                RoutingConfig {
                    scoring,
                    groups: Some(Groups { count: 4, keep: 2 }),
                    scale: 2.5,
                    ..base
                },
                true,
            ));
        }
    }
    v
}

/// Logits `[T, E]` with margins, then special values: the first rows are one pattern each
/// (all NaN, all +inf, all -inf, +inf and -inf mixed, one NaN, one +inf, one -inf, several
/// -inf), later rows get NaN / ±inf scattered at random (about one in six).
fn special_logits(g: &mut Gen, t: usize, e: usize) -> Vec<f32> {
    let mut l = moe_kernels::synth::separated_logits(g, t, e, 0.05);
    let patterns: [&dyn Fn(usize, usize) -> Option<f32>; 8] = [
        &|_, _| Some(NAN),
        &|_, _| Some(INF),
        &|_, _| Some(-INF),
        &|i, _| Some(if i % 2 == 0 { INF } else { -INF }),
        &|i, e| (i == e / 2).then_some(NAN),
        &|i, e| (i == e - 1).then_some(INF),
        &|i, _| (i == 0).then_some(-INF),
        &|i, _| (i % 3 == 1).then_some(-INF),
    ];
    for ti in 0..t {
        let row = &mut l[ti * e..(ti + 1) * e];
        if let Some(p) = patterns.get(ti) {
            for (i, v) in row.iter_mut().enumerate() {
                if let Some(s) = p(i, e) {
                    *v = s;
                }
            }
        } else {
            for v in row.iter_mut() {
                match g.below(0, 18) {
                    0 => *v = NAN,
                    1 => *v = INF,
                    2 => *v = -INF,
                    _ => {}
                }
            }
        }
    }
    l
}

/// NaN exactly where the reference is NaN, the same infinities, close finite values.
fn same_weight(w: f32, r: f64, scale: f64) -> bool {
    if r.is_nan() || w.is_nan() {
        return r.is_nan() && w.is_nan();
    }
    if r.is_infinite() || w.is_infinite() {
        return f64::from(w) == r;
    }
    (f64::from(w) - r).abs() <= 1e-5 * r.abs() + 1e-6 * scale.abs()
}

#[test]
fn gate_with_nan_and_inf_logits_matches_reference() {
    let backends = common::backends("nan_policy gate");
    let mut g = Gen::new(0x4e414e);
    let mut cases = 0;
    for (t, e, k) in [
        (9, 4, 2),
        (12, 8, 3),
        (37, 16, 4),
        (20, 5, 5),
        (40, 3, 1),
        (64, 32, 8),
    ] {
        let logits = special_logits(&mut g, t, e);
        let bias: Vec<f32> = g.uniform(e, 0.01);
        let bias_t = Tensor::from_f32(vec![e], bias.clone()).unwrap();
        for (name, cfg, use_bias) in variants(e, k) {
            let reference = cpu::gate::gate(
                &common::wide(&logits),
                t,
                e,
                use_bias.then(|| common::wide(&bias)).as_deref(),
                &cfg,
            )
            .unwrap();
            for dev in &backends {
                let ctx = format!("{} {name} T={t} E={e} k={k}", dev.kind());
                let mut out = GateBuffers::poisoned(t, cfg.slots(e), e);
                dev.gate(&logits, use_bias.then_some(&bias_t), &cfg, &mut out)
                    .unwrap_or_else(|err| panic!("{ctx}: {err}"));
                assert!(
                    out.topk_ids.iter().all(|&i| (i as usize) < e),
                    "{ctx}: id out of range: {:?}",
                    out.topk_ids
                );
                let s = out.slots;
                for ti in 0..t {
                    let row = ti * s..(ti + 1) * s;
                    assert_eq!(
                        out.topk_ids[row.clone()],
                        reference.topk_ids[row.clone()],
                        "{ctx}: token {ti} ids (logits {:?})",
                        &logits[ti * e..(ti + 1) * e]
                    );
                    let kept: Vec<bool> = out.kept[row.clone()].iter().map(|&x| x == 1).collect();
                    assert_eq!(
                        kept,
                        reference.kept[row.clone()],
                        "{ctx}: token {ti} kept (logits {:?})",
                        &logits[ti * e..(ti + 1) * e]
                    );
                    for i in row {
                        assert!(
                            same_weight(out.topk_weights[i], reference.topk_weights[i], cfg.scale),
                            "{ctx}: token {ti} slot {}: weight {} vs reference {} (logits {:?})",
                            i - ti * s,
                            out.topk_weights[i],
                            reference.topk_weights[i],
                            &logits[ti * e..(ti + 1) * e]
                        );
                    }
                }
                assert_eq!(out.counts, reference.counts, "{ctx}: counts");
                cases += 1;
            }
        }
    }
    println!("nan_policy gate: {cases} cases");
}

#[test]
fn router_with_nan_and_inf_inputs_matches_reference() {
    let backends = common::backends("nan_policy router");
    let (t, e, h) = (8, 6, 13);
    let mut g = Gen::new(5);
    let w = g.tensor(&[e, h], 0.5);
    let b = g.tensor(&[e], 0.5);
    let mut x = g.uniform(t * h, 1.0);
    x[0] = NAN; // row 0: one NaN
    x[h + 3] = INF; // row 1: one +inf
    x[2 * h + 4] = -INF; // row 2: one -inf
    x[3 * h] = INF; // row 3: +inf and -inf (NaN where the products' signs differ)
    x[3 * h + 1] = -INF;
    x[4 * h..5 * h].fill(NAN); // row 4: all NaN
    let x = Tensor::from_f32(vec![t, h], x).unwrap();
    let reference = cpu::router::router_logits(&x, &w, Some(&b)).unwrap();
    for dev in &backends {
        let mut out = vec![0.0f32; t * e];
        dev.router(&x, &w, Some(&b), &mut out).unwrap();
        for (i, (&o, &r)) in out.iter().zip(&reference).enumerate() {
            let same = if r.is_nan() || r.is_infinite() {
                (o.is_nan() && r.is_nan()) || f64::from(o) == r
            } else {
                (f64::from(o) - r).abs() <= 1e-5 * (1.0 + r.abs())
            };
            assert!(
                same,
                "{}: logits[{}, {}] = {o}, reference {r}",
                dev.kind(),
                i / e,
                i % e
            );
        }
    }
}

/// A small layer of each preset's family (as in tests/layer.rs, smaller).
fn preset_layer(p: Preset, seed: u64) -> MoeLayer {
    let s = common::Small {
        experts: 16,
        hidden: 23,
        ffn: 17,
        shared_ffn: (21, 19),
        switch_capacity: 3,
    };
    common::preset_layer_sized(p, DType::F32, seed, &s, |_| {})
}

#[test]
fn layer_with_nan_and_inf_inputs_matches_reference() {
    let backends = common::backends("nan_policy layer");
    let mut configs: Vec<(String, MoeLayer)> = Preset::ALL
        .iter()
        .map(|&p| (p.to_string(), preset_layer(p, 21)))
        .collect();
    for scoring in [Scoring::Softmax, Scoring::Sigmoid, Scoring::Logits] {
        let mut l = preset_layer(Preset::Mixtral, 22);
        l.config.routing.scoring = scoring;
        l.config.routing.expert_choice = Some(ExpertChoice {
            capacity_factor: 2.0,
        });
        configs.push((format!("expert choice {scoring:?}"), l));
        let mut l = preset_layer(Preset::Mixtral, 23);
        l.config.routing.scoring = scoring;
        l.config.routing.capacity = Some(Capacity::Fraction(0.25));
        l.config.routing.priority = Priority::Top1Score;
        configs.push((format!("capacity top1 {scoring:?}"), l));
    }
    for (name, layer) in &configs {
        let h = layer.dims().hidden;
        let e = layer.dims().experts;
        let t = 12;
        let mut v = random_x(t, h, 24).to_f32_vec();
        v[0] = NAN; // token 0: one NaN
        v[h..2 * h].fill(NAN); // token 1: all NaN
        v[2 * h + 5] = INF; // token 2: +inf
        v[3 * h + 1] = -INF; // token 3: -inf
        v[4 * h] = INF; // token 4: +inf and -inf
        v[4 * h + 2] = -INF;
        v[5 * h..6 * h].fill(INF); // token 5: all +inf
        let x = Tensor::from_f32(vec![t, h], v).unwrap();
        let reference = layer.forward_reference(&x).unwrap();
        let r = &reference.routing;
        for dev in &backends {
            let ctx = format!("{} {name}", dev.kind());
            let out = layer
                .forward(dev, &x)
                .unwrap_or_else(|err| panic!("{ctx}: {err}"));
            assert!(
                out.topk_ids.iter().all(|&i| (i as usize) < e),
                "{ctx}: id out of range"
            );
            assert_eq!(
                out.topk_ids, r.topk_ids,
                "{ctx}: ids differ from the reference"
            );
            let kept: Vec<bool> = out.kept.iter().map(|&k| k == 1).collect();
            assert_eq!(kept, r.kept, "{ctx}: kept");
            assert_eq!(out.counts, r.counts, "{ctx}: counts");
            for (i, (&w, &rw)) in out.topk_weights.iter().zip(&r.topk_weights).enumerate() {
                assert!(
                    same_weight(w, rw, layer.config.routing.scale),
                    "{ctx}: weight [{}, {}] = {w}, reference {rw}",
                    i / r.slots,
                    i % r.slots
                );
            }
            // Rows whose reference is finite (at least the clean tokens 6..) are finite and
            // close; NaN does not leak across tokens.
            for ti in 0..t {
                let ry = &reference.y[ti * h..(ti + 1) * h];
                let oy = &out.y[ti * h..(ti + 1) * h];
                if ti >= 6 {
                    assert!(
                        ry.iter().all(|v| v.is_finite()),
                        "{ctx}: reference row {ti}"
                    );
                }
                if ry.iter().all(|v| v.is_finite()) {
                    assert!(
                        oy.iter().all(|v| v.is_finite()),
                        "{ctx}: row {ti} not finite: {oy:?}"
                    );
                    let err = common::rel_l2(oy, ry);
                    assert!(err <= 1e-4, "{ctx}: row {ti} rel L2 {err:e}");
                }
            }
        }
    }
}
