//! The whole layer: the stage pipeline on every backend against the f64 reference for every
//! preset and odd shapes, the reference against the per-token definition (no permutation),
//! determinism, batch invariance, T = 0, one hot expert, NaN inputs.

mod common;

use moe_kernels::config::ExpertChoice;
use moe_kernels::cpu::expert_gemm::ffn_row;
use moe_kernels::cpu::sigmoid;
use moe_kernels::synth::{random_layer, random_x, Extras};
use moe_kernels::{DType, LayerConfig, MoeLayer, Preset, Tensor};

/// A synthetic layer shaped like each preset's family, small and odd-sized.
fn preset_layer(p: Preset, dtype: DType, seed: u64) -> MoeLayer {
    common::preset_layer_with(p, dtype, seed, |_| {})
}

/// y[t] from the definition: Σ over kept picks of w · FFN_e(x[t]) · output_scale + shared.
fn per_token_definition(layer: &MoeLayer, x: &Tensor) -> Vec<f64> {
    let r = layer.forward_reference(x).unwrap().routing;
    let d = layer.dims();
    let act = layer.config.activation;
    let mut y = vec![0.0; r.tokens * d.hidden];
    for t in 0..r.tokens {
        let xr = x.row_f64(t, d.hidden);
        let yr = &mut y[t * d.hidden..(t + 1) * d.hidden];
        for j in 0..r.slots {
            let i = t * r.slots + j;
            if r.kept[i] {
                let out = ffn_row(&xr, &layer.experts, d, r.topk_ids[i] as usize, act);
                yr.iter_mut()
                    .zip(out)
                    .for_each(|(a, b)| *a += r.topk_weights[i] * b);
            }
        }
        yr.iter_mut().for_each(|a| *a *= layer.config.output_scale);
        if let Some(s) = &layer.shared {
            let sd = s.weights.dims(act).unwrap();
            let out = ffn_row(&xr, &s.weights, sd, 0, act);
            let g = s
                .gate
                .as_ref()
                .map_or(1.0, |g| sigmoid(moe_kernels::cpu::dot(g, 0, &xr)));
            yr.iter_mut().zip(out).for_each(|(a, b)| *a += g * b);
        }
    }
    y
}

#[test]
fn reference_equals_per_token_definition() {
    for p in Preset::ALL {
        let layer = preset_layer(p, DType::F32, 1);
        let x = random_x(37, layer.dims().hidden, 2);
        let staged = layer.forward_reference(&x).unwrap().y;
        let direct = per_token_definition(&layer, &x);
        let err = common::rel_l2_f64(&staged, &direct);
        assert!(err <= 1e-13, "{p}: staged vs definition {err:e}");
    }
}

#[test]
fn every_backend_every_preset_and_dtype_matches_reference() {
    let backends = common::backends("layer");
    for p in Preset::ALL {
        for dtype in DType::ALL {
            let layer = preset_layer(p, dtype, 3);
            for &t in &common::TOKENS {
                let x = random_x(t, layer.dims().hidden, t as u64);
                let reference = layer.forward_reference(&x).unwrap();
                for dev in &backends {
                    let out = layer.forward(dev, &x).unwrap();
                    let ctx = format!("{} {p} {dtype} T={t}", dev.kind());
                    assert_eq!(out.topk_ids, reference.routing.topk_ids, "{ctx}: ids");
                    let err = common::rel_l2(&out.y, &reference.y);
                    assert!(
                        err <= common::stage_tolerance(dev.kind(), dtype),
                        "{ctx}: y rel L2 {err:e}"
                    );
                    assert_eq!(out.y.len(), t * layer.dims().hidden, "{ctx}");
                }
            }
        }
    }
}

#[test]
fn deterministic_and_batch_invariant() {
    for dev in common::backends("layer determinism") {
        for p in Preset::ALL {
            let layer = preset_layer(p, DType::BF16, 4);
            let h = layer.dims().hidden;
            let x = random_x(300, h, 5);
            let a = layer.forward(&dev, &x).unwrap();
            let b = layer.forward(&dev, &x).unwrap();
            assert_eq!(
                a.y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{p}: not bitwise repeatable"
            );
            if layer.config.routing.capacity.is_some() {
                continue; // capacity is defined on the batch
            }
            for t in [0, 123, 299] {
                let alone = Tensor::from_f32(
                    vec![1, h],
                    x.row_f64(t, h).iter().map(|&v| v as f32).collect(),
                )
                .unwrap();
                let one = layer.forward(&dev, &alone).unwrap();
                let in_batch = &a.y[t * h..(t + 1) * h];
                assert!(
                    one.y
                        .iter()
                        .zip(in_batch)
                        .all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{} {p}: token {t} depends on its batch",
                    dev.kind()
                );
            }
        }
    }
}

#[test]
fn empty_batch_gives_empty_output() {
    let layer = preset_layer(Preset::Mixtral, DType::F32, 6);
    let x = Tensor::from_f32(vec![0, layer.dims().hidden], vec![]).unwrap();
    for dev in common::backends("layer T=0") {
        let out = layer.forward(&dev, &x).unwrap();
        assert!(out.y.is_empty() && out.topk_ids.is_empty());
        assert_eq!(out.counts, vec![0; 16]);
    }
}

#[test]
fn every_token_on_one_expert_and_expert_choice() {
    let mut cfg = Preset::Mixtral.config();
    cfg.routing.top_k = 1;
    let extras = Extras {
        router_bias: true,
        ..Extras::default()
    };
    let mut layer = random_layer(cfg, 5, 11, 13, extras, DType::F32, 7).unwrap();
    layer.router_bias = Some(Tensor::from_f32(vec![5], vec![0.0, 0.0, 50.0, 0.0, 0.0]).unwrap());
    let x = random_x(37, 11, 8);
    for dev in common::backends("layer one expert") {
        let out = layer.forward(&dev, &x).unwrap();
        assert_eq!(out.counts, vec![0, 0, 37, 0, 0]);
        let reference = layer.forward_reference(&x).unwrap();
        assert!(common::rel_l2(&out.y, &reference.y) <= 2e-5);
        let mut ec = layer.clone();
        ec.config.routing.expert_choice = Some(ExpertChoice {
            capacity_factor: 1.0,
        });
        let out = ec.forward(&dev, &x).unwrap();
        // C = ceil(37 / 5) = 8 tokens per expert, every expert full.
        assert_eq!(out.counts, vec![8; 5]);
        assert_eq!(out.slots, 5);
        let reference = ec.forward_reference(&x).unwrap();
        assert!(common::rel_l2(&out.y, &reference.y) <= 2e-5);
    }
}

#[test]
fn nan_and_inf_inputs_give_in_range_ids() {
    for p in Preset::ALL {
        let layer = preset_layer(p, DType::F32, 9);
        let h = layer.dims().hidden;
        let mut v = random_x(6, h, 10).to_f32_vec();
        v[0] = f32::NAN;
        v[h..2 * h].fill(f32::NAN);
        v[2 * h] = f32::INFINITY;
        v[3 * h + 1] = f32::NEG_INFINITY;
        let x = Tensor::from_f32(vec![6, h], v).unwrap();
        let reference = layer.forward_reference(&x).unwrap();
        for dev in common::backends("layer nan") {
            let out = layer.forward(&dev, &x).unwrap();
            assert!(
                out.topk_ids.iter().all(|&i| (i as usize) < 16),
                "{p}: id out of range"
            );
            assert_eq!(
                out.topk_ids, reference.routing.topk_ids,
                "{p}: ids differ from the reference"
            );
            // Rows 4 and 5 are clean and stay finite.
            assert!(
                out.y[4 * h..].iter().all(|v| v.is_finite()),
                "{p}: NaN leaked across tokens"
            );
        }
    }
}

#[test]
fn layer_config_json_round_trip() {
    let cfg = LayerConfig::from_json(r#"{"preset": "deepseek_v3", "top_k": 6}"#, "inline").unwrap();
    assert_eq!(cfg.routing.top_k, 6);
    let layer = random_layer(
        cfg,
        16,
        9,
        7,
        Extras {
            score_correction_bias: true,
            ..Extras::default()
        },
        DType::F32,
        1,
    )
    .unwrap();
    assert!(layer.forward_reference(&random_x(3, 9, 1)).is_ok());
}

/// K over several k chunks of 256 and not a multiple of 256 (H 601, F 1000; odd H): a token
/// alone (its 8 rows on the small-batch path, the split-k GEMV on wgpu) gives bitwise the
/// bits of its row in a batch of 100 (800 rows: the tiled kernel), with f32 and bf16
/// activations, on every backend; the batch within tolerance of the reference.
#[test]
fn batch_invariant_with_k_over_several_chunks() {
    let (e, h, f) = (16, 601, 1000);
    let cfg = Preset::Qwen3Moe.config();
    let layer = random_layer(cfg, e, h, f, Extras::default(), DType::BF16, 8).expect("layer");
    let x = random_x(100, h, 9);
    let reference = layer.forward_reference(&x).unwrap();
    for dev in common::backends("layer k chunks") {
        for act in [DType::F32, DType::BF16] {
            let ctx = format!("{} {act} activations", dev.kind());
            let xa = x.cast(act);
            let run = layer.prepare(&dev, 100, act).unwrap();
            let batch = run.forward(&xa).unwrap();
            if act == DType::F32 {
                let err = common::rel_l2(&batch.y, &reference.y);
                let bound = common::stage_tolerance(dev.kind(), DType::BF16);
                assert!(err <= bound, "{ctx}: y rel L2 {err:e}");
            }
            for t in [0usize, 41, 99] {
                let row =
                    Tensor::from_f32(vec![1, h], xa.to_f32_vec()[t * h..(t + 1) * h].to_vec())
                        .unwrap()
                        .cast(act);
                let one = run.forward(&row).unwrap();
                assert!(
                    one.y
                        .iter()
                        .zip(&batch.y[t * h..(t + 1) * h])
                        .all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{ctx}: token {t} alone differs from its row in the batch"
                );
            }
            println!("[layer k chunks] {ctx}: batch invariant with K over several chunks");
        }
    }
}
