//! Stage 1 (gate): hand-checked cases of every routing rule, then one generic body that runs
//! each routing variant over the shape sweep on every backend against the f64 reference.

mod common;

use approx::assert_relative_eq;
use moe_kernels::config::{
    Capacity, Combine, ExpertChoice, Groups, Priority, RoutingConfig, Scoring,
};
use moe_kernels::cpu::gate::{gate, Routing};
use moe_kernels::synth::Gen;
use moe_kernels::GateBuffers;

fn cfg(top_k: usize, scoring: Scoring) -> RoutingConfig {
    RoutingConfig {
        top_k,
        scoring,
        renormalize: false,
        ..RoutingConfig::default()
    }
}

fn run(logits: &[f64], t: usize, e: usize, bias: Option<&[f64]>, c: &RoutingConfig) -> Routing {
    gate(logits, t, e, bias, c).expect("gate")
}

#[test]
fn softmax_top2_renormalized_by_hand() {
    let l = [1.0, 3.0, 2.0, 0.0];
    let c = RoutingConfig {
        renormalize: true,
        ..cfg(2, Scoring::Softmax)
    };
    let r = run(&l, 1, 4, None, &c);
    assert_eq!(r.topk_ids, vec![1, 2]);
    let (a, b) = (3f64.exp(), 2f64.exp());
    assert_relative_eq!(r.topk_weights[0], a / (a + b), max_relative = 1e-14);
    assert_relative_eq!(r.topk_weights[1], b / (a + b), max_relative = 1e-14);
    assert_eq!(r.counts, vec![0, 1, 1, 0]);
}

#[test]
fn softmax_weights_without_renormalization_are_full_softmax() {
    let l = [1.0, 3.0, 2.0, 0.0];
    let r = run(&l, 1, 4, None, &cfg(2, Scoring::Softmax));
    let z: f64 = l.iter().map(|v: &f64| v.exp()).sum();
    assert_relative_eq!(r.topk_weights[0], 3f64.exp() / z, max_relative = 1e-14);
    assert_relative_eq!(r.topk_weights[1], 2f64.exp() / z, max_relative = 1e-14);
}

#[test]
fn ties_go_to_the_lower_index() {
    let r = run(&[0.5; 6], 1, 6, None, &cfg(3, Scoring::Logits));
    assert_eq!(r.topk_ids, vec![0, 1, 2]);
    let r = run(
        &[0.1, 0.7, 0.7, 0.2, 0.7],
        1,
        5,
        None,
        &cfg(2, Scoring::Logits),
    );
    assert_eq!(r.topk_ids, vec![1, 2]);
}

#[test]
fn nan_ranks_below_every_number() {
    let l = [f64::NAN, 1.0, f64::NEG_INFINITY, 0.5];
    let r = run(&l, 1, 4, None, &cfg(3, Scoring::Sigmoid));
    assert_eq!(r.topk_ids, vec![1, 3, 2]);
    // All NaN: still k distinct in-range ids, lowest indices first.
    let r = run(&[f64::NAN; 5], 1, 5, None, &cfg(2, Scoring::Softmax));
    assert_eq!(r.topk_ids, vec![0, 1]);
    // A NaN logit makes the whole softmax NaN (as in PyTorch); ids stay in range.
    let r = run(&[0.0, f64::NAN, 2.0], 1, 3, None, &cfg(2, Scoring::Softmax));
    assert_eq!(r.topk_ids, vec![0, 1]);
    assert!(r.topk_weights.iter().all(|w| w.is_nan()));
}

#[test]
fn correction_bias_changes_selection_not_weights() {
    let l = [0.0, 1.0, 2.0];
    let bias = [3.0, 0.0, 0.0];
    let r = run(&l, 1, 3, Some(&bias), &cfg(2, Scoring::Sigmoid));
    assert_eq!(r.topk_ids, vec![0, 2]);
    assert_relative_eq!(r.topk_weights[0], 0.5, max_relative = 1e-14);
    assert_relative_eq!(
        r.topk_weights[1],
        1.0 / (1.0 + (-2f64).exp()),
        max_relative = 1e-14
    );
}

#[test]
fn group_limited_selection_by_hand() {
    // Groups of 2: scores 1.0, 0.95, 0.8, 0.6 -> keep groups 0 and 1.
    let l = [0.9, 0.1, 0.5, 0.45, 0.8, 0.0, 0.3, 0.3];
    let free = run(&l, 1, 8, None, &cfg(3, Scoring::Logits));
    assert_eq!(free.topk_ids, vec![0, 4, 2]);
    let grouped = RoutingConfig {
        groups: Some(Groups { count: 4, keep: 2 }),
        ..cfg(3, Scoring::Logits)
    };
    let r = run(&l, 1, 8, None, &grouped);
    assert_eq!(r.topk_ids, vec![0, 2, 3]);
}

#[test]
fn group_score_is_sum_of_two_largest() {
    // Group 0 = {5, -10, -10}: best single value, but the sum of its two largest is -5.
    // Group 1 = {1, 1, 0}: sum 2 -> kept.
    let l = [5.0, -10.0, -10.0, 1.0, 1.0, 0.0];
    let c = RoutingConfig {
        groups: Some(Groups { count: 2, keep: 1 }),
        ..cfg(2, Scoring::Logits)
    };
    assert_eq!(run(&l, 1, 6, None, &c).topk_ids, vec![3, 4]);
}

#[test]
fn softmax_selected_and_scale() {
    let l = [0.3, -1.0, 2.0, 1.0];
    let c = RoutingConfig {
        combine: Combine::SoftmaxSelected,
        scale: 2.5,
        ..cfg(2, Scoring::Logits)
    };
    let r = run(&l, 1, 4, None, &c);
    assert_eq!(r.topk_ids, vec![2, 3]);
    let (a, b) = (2f64.exp(), 1f64.exp());
    assert_relative_eq!(r.topk_weights[0], 2.5 * a / (a + b), max_relative = 1e-14);
    assert_relative_eq!(r.topk_weights[1], 2.5 * b / (a + b), max_relative = 1e-14);
}

#[test]
fn capacity_by_position() {
    // Every token prefers expert 0; C = 2 keeps the first two.
    let l = [2.0, 0.0, 2.0, 0.0, 2.0, 0.0, 0.0, 2.0];
    let c = RoutingConfig {
        capacity: Some(Capacity::Tokens(2)),
        ..cfg(1, Scoring::Softmax)
    };
    let r = run(&l, 4, 2, None, &c);
    assert_eq!(r.topk_ids, vec![0, 0, 0, 1]);
    assert_eq!(r.kept, vec![true, true, false, true]);
    assert_eq!(r.topk_weights[2], 0.0);
    assert_eq!(r.counts, vec![2, 1]);
    assert_eq!(r.capacity, Some(2));
}

#[test]
fn capacity_slot_by_slot_and_renormalized_after_dropping() {
    // T = 3, E = 3, k = 2, C = 2. First choices: 0, 0, 1. Second choices: 1, 1, 0.
    // Slot 0 fills expert 0 (t0, t1) and expert 1 (t2); slot 1: t0->1 kept (pos 1),
    // t1->1 dropped (pos 2), t2->0 dropped (pos 2).
    let l = [3.0, 2.0, 0.0, 3.0, 2.0, 0.0, 2.0, 3.0, 0.0];
    let c = RoutingConfig {
        capacity: Some(Capacity::Tokens(2)),
        renormalize: true,
        ..cfg(2, Scoring::Softmax)
    };
    let r = run(&l, 3, 3, None, &c);
    assert_eq!(r.topk_ids, vec![0, 1, 0, 1, 1, 0]);
    assert_eq!(r.kept, vec![true, true, true, false, true, false]);
    // Token 1 keeps only its first pick: renormalized to 1.
    assert_relative_eq!(r.topk_weights[2], 1.0, max_relative = 1e-15);
    assert_eq!(r.topk_weights[3], 0.0);
    assert_relative_eq!(
        r.topk_weights[0] + r.topk_weights[1],
        1.0,
        max_relative = 1e-15
    );
    assert_eq!(r.counts, vec![2, 2, 0]);
}

#[test]
fn capacity_fraction_and_factor() {
    let c = |cap| RoutingConfig {
        capacity: Some(cap),
        ..cfg(2, Scoring::Softmax)
    };
    let mut g = Gen::new(3);
    let l: Vec<f64> = common::wide(&moe_kernels::synth::separated_logits(&mut g, 10, 4, 0.5));
    // ceil(0.25 * 10) = 3; ceil(1.5 * 10 * 2 / 4) = 8.
    assert_eq!(
        run(&l, 10, 4, None, &c(Capacity::Fraction(0.25))).capacity,
        Some(3)
    );
    assert_eq!(
        run(&l, 10, 4, None, &c(Capacity::Factor(1.5))).capacity,
        Some(8)
    );
}

#[test]
fn capacity_by_top1_score_priority() {
    // All three tokens want expert 0; top-1 softmax scores rank t1 > t2 > t0. C = 1.
    let l = [0.5, 0.0, 2.0, 0.0, 1.0, 0.0];
    let base = RoutingConfig {
        capacity: Some(Capacity::Tokens(1)),
        ..cfg(1, Scoring::Softmax)
    };
    let pos = run(&l, 3, 2, None, &base);
    assert_eq!(pos.kept, vec![true, false, false]);
    let bpr = run(
        &l,
        3,
        2,
        None,
        &RoutingConfig {
            priority: Priority::Top1Score,
            ..base
        },
    );
    assert_eq!(bpr.kept, vec![false, true, false]);
}

#[test]
fn expert_choice_by_hand() {
    // T = 3, E = 2, capacity_factor 1 -> C = ceil(1 * 3 / 2) = 2 tokens per expert.
    let l = [1.0, 0.0, 0.5, 2.0, 0.8, 0.9];
    let c = RoutingConfig {
        expert_choice: Some(ExpertChoice {
            capacity_factor: 1.0,
        }),
        ..cfg(1, Scoring::Logits)
    };
    let r = run(&l, 3, 2, None, &c);
    assert_eq!(r.slots, 2);
    assert_eq!(r.capacity, Some(2));
    assert_eq!(r.topk_ids, vec![0, 1, 1, 0, 1, 0]);
    assert_eq!(r.kept, vec![true, false, true, false, true, true]);
    assert_eq!(r.topk_weights, vec![1.0, 0.0, 2.0, 0.0, 0.9, 0.8]);
    assert_eq!(r.counts, vec![2, 2]);
}

#[test]
fn invalid_configs_are_errors() {
    let l = [0.0; 8];
    assert!(gate(&l, 2, 4, None, &cfg(0, Scoring::Softmax)).is_err());
    assert!(gate(&l, 2, 4, None, &cfg(5, Scoring::Softmax)).is_err());
    let g = |count, keep| RoutingConfig {
        groups: Some(Groups { count, keep }),
        ..cfg(1, Scoring::Softmax)
    };
    assert!(
        gate(&l, 2, 4, None, &g(3, 1)).is_err(),
        "3 groups do not divide 4 experts"
    );
    assert!(gate(&l, 2, 4, None, &g(2, 3)).is_err(), "keep > groups");
    assert!(gate(&l, 2, 4, None, &cfg(1, Scoring::Softmax)).is_ok());
    assert!(
        gate(&l[..7], 2, 4, None, &cfg(1, Scoring::Softmax)).is_err(),
        "short logits"
    );
}

/// Every routing variant exercised by the generic body, as (name, config, E constraint).
fn variants(e: usize, k: usize) -> Vec<(String, RoutingConfig)> {
    let base = RoutingConfig {
        top_k: k,
        ..RoutingConfig::default()
    };
    let mut v = vec![
        ("softmax+renorm".to_string(), base),
        (
            "softmax".into(),
            RoutingConfig {
                renormalize: false,
                ..base
            },
        ),
        (
            "sigmoid".into(),
            RoutingConfig {
                scoring: Scoring::Sigmoid,
                ..base
            },
        ),
        (
            "logits+softmax_selected".into(),
            RoutingConfig {
                scoring: Scoring::Logits,
                combine: Combine::SoftmaxSelected,
                renormalize: false,
                ..base
            },
        ),
        (
            "capacity tokens".into(),
            RoutingConfig {
                capacity: Some(Capacity::Tokens(3)),
                ..base
            },
        ),
        (
            "capacity fraction bpr".into(),
            RoutingConfig {
                capacity: Some(Capacity::Fraction(0.3)),
                priority: Priority::Top1Score,
                ..base
            },
        ),
        (
            "capacity factor".into(),
            RoutingConfig {
                capacity: Some(Capacity::Factor(1.0)),
                scale: 0.8,
                ..base
            },
        ),
        (
            "expert choice".into(),
            RoutingConfig {
                expert_choice: Some(ExpertChoice {
                    capacity_factor: 2.0,
                }),
                ..base
            },
        ),
    ];
    if e % 4 == 0 && k <= e / 2 {
        v.push((
            "groups 4 keep 2 sigmoid".into(),
            RoutingConfig {
                scoring: Scoring::Sigmoid,
                groups: Some(Groups { count: 4, keep: 2 }),
                scale: 2.5,
                ..base
            },
        ));
    }
    v
}

#[test]
fn every_variant_on_every_backend_matches_reference() {
    let backends = common::backends("gate");
    let mut g = Gen::new(11);
    let shapes: [(usize, usize); 7] = [(1, 1), (4, 1), (4, 4), (8, 2), (16, 4), (61, 6), (256, 8)];
    let mut cases = 0;
    for &t in &common::TOKENS {
        for &(e, k) in &shapes {
            let logits = moe_kernels::synth::separated_logits(&mut g, t, e, 0.05);
            let bias: Vec<f32> = g.uniform(e, 0.01);
            for (name, c) in variants(e, k) {
                let bias_t = moe_kernels::Tensor::from_f32(vec![e], bias.clone()).unwrap();
                let use_bias = c.scoring == Scoring::Sigmoid;
                let reference = gate(
                    &common::wide(&logits),
                    t,
                    e,
                    use_bias.then(|| common::wide(&bias)).as_deref(),
                    &c,
                )
                .unwrap();
                for dev in &backends {
                    let mut out = GateBuffers::poisoned(t, c.slots(e), e);
                    dev.gate(&logits, use_bias.then_some(&bias_t), &c, &mut out)
                        .unwrap();
                    let ctx = format!("{} {name} T={t} E={e} k={k}", dev.kind());
                    assert_eq!(out.topk_ids, reference.topk_ids, "{ctx}: ids");
                    let kept: Vec<bool> = out.kept.iter().map(|&x| x == 1).collect();
                    assert_eq!(kept, reference.kept, "{ctx}: kept");
                    assert_eq!(out.counts, reference.counts, "{ctx}: counts");
                    let err = common::rel_l2(&out.topk_weights, &reference.topk_weights);
                    assert!(err <= 2e-6, "{ctx}: weights rel L2 {err:e}");
                    check_properties(&out, &c, &ctx);
                    cases += 1;
                }
            }
        }
    }
    println!("gate: {cases} cases");
}

/// Properties that hold whatever the reference says: ids in range and distinct per token,
/// counts equal the kept assignments, capacity respected, renormalized weights sum to scale.
fn check_properties(out: &GateBuffers, c: &RoutingConfig, ctx: &str) {
    let (t, s, e) = (out.tokens, out.slots, out.experts);
    let mut counts = vec![0u32; e];
    for ti in 0..t {
        let ids = &out.topk_ids[ti * s..(ti + 1) * s];
        assert!(
            ids.iter().all(|&i| (i as usize) < e),
            "{ctx}: id out of range"
        );
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), s, "{ctx}: repeated expert");
        let mut sum = 0.0f64;
        for j in 0..s {
            if out.kept[ti * s + j] == 1 {
                counts[ids[j] as usize] += 1;
                sum += f64::from(out.topk_weights[ti * s + j]);
            } else {
                assert_eq!(out.topk_weights[ti * s + j], 0.0, "{ctx}: dropped weight");
            }
        }
        if c.renormalize && sum != 0.0 {
            assert!(
                (sum - c.scale).abs() <= 1e-5 * c.scale.abs().max(1.0),
                "{ctx}: weights sum {sum}"
            );
        }
    }
    assert_eq!(counts, out.counts, "{ctx}: counts");
    if c.capacity.is_some() || c.expert_choice.is_some() {
        let cap = match (c.capacity, c.expert_choice) {
            (Some(cap), _) => cap.tokens_per_expert(t, s, e),
            (_, Some(ec)) => ((ec.capacity_factor * t as f64 / e as f64).ceil() as usize).min(t),
            _ => unreachable!(),
        };
        assert!(
            counts.iter().all(|&n| n as usize <= cap),
            "{ctx}: capacity exceeded"
        );
    }
}

/// Found by fuzzing (`fuzz/`, target `routing`): with capacity and renormalisation, a kept
/// NaN weight made the sum NaN and the division turned the token's dropped weight into NaN.
/// Dropped assignments weigh exactly 0 on every backend.
#[test]
fn dropped_weight_stays_zero_when_the_kept_sum_is_nan() {
    // T = 2, E = 3, k = 2, C = 1. Token 0 picks [0, 2]; token 1 (all NaN) picks [0, 1]:
    // its slot-0 assignment to expert 0 is dropped, its slot-1 one to expert 1 is kept.
    let logits = [2.0, 0.0, 1.0, f64::NAN, f64::NAN, f64::NAN];
    let c = RoutingConfig {
        capacity: Some(Capacity::Tokens(1)),
        renormalize: true,
        ..cfg(2, Scoring::Softmax)
    };
    let r = run(&logits, 2, 3, None, &c);
    assert_eq!(r.topk_ids, vec![0, 2, 0, 1]);
    assert_eq!(r.kept, vec![true, true, false, true]);
    assert_eq!(r.topk_weights[2], 0.0);
    assert!(r.topk_weights[3].is_nan());
    let l32: Vec<f32> = logits.iter().map(|&v| v as f32).collect();
    for dev in common::backends("gate dropped NaN") {
        let mut out = GateBuffers::poisoned(2, 2, 3);
        dev.gate(&l32, None, &c, &mut out).unwrap();
        assert_eq!(out.topk_ids, r.topk_ids, "{}", dev.kind());
        assert_eq!(out.kept, vec![1, 1, 0, 1], "{}", dev.kind());
        assert_eq!(out.topk_weights[2], 0.0, "{}: dropped weight", dev.kind());
        assert!(out.topk_weights[3].is_nan(), "{}", dev.kind());
    }
}
