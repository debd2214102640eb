//! Stage 3 (grouped expert FFN): activations by hand, the reference against an independent
//! naive loop written here, and every backend against the reference for every activation,
//! dtype, bias setting and odd shape, including experts with no rows and dropped rows.

mod common;

use approx::assert_relative_eq;
use moe_kernels::config::{Activation, ClampedSwiglu};
use moe_kernels::cpu::expert_gemm::{activate, expert_ffn, ExpertWeights};
use moe_kernels::synth::Gen;
use moe_kernels::{DType, PermuteBuffers, Tensor};

const ACTIVATIONS: [Activation; 5] = [
    Activation::Swiglu,
    Activation::Geglu,
    Activation::Relu,
    Activation::Gelu,
    Activation::ClampedSwiglu(ClampedSwiglu {
        alpha: 1.702,
        limit: 7.0,
    }),
];

#[test]
fn activations_by_hand() {
    let silu1 = 1.0 / (1.0 + (-1.0f64).exp());
    assert_relative_eq!(
        activate(Activation::Swiglu, 1.0, 3.0),
        3.0 * silu1,
        max_relative = 1e-15
    );
    // GELU(1) = Φ(1) = 0.841344746068542948...
    assert_relative_eq!(
        activate(Activation::Gelu, 0.0, 1.0),
        0.841_344_746_068_542_9,
        max_relative = 1e-15
    );
    assert_relative_eq!(
        activate(Activation::Geglu, 1.0, 2.0),
        2.0 * 0.841_344_746_068_542_9,
        max_relative = 1e-15
    );
    assert_eq!(activate(Activation::Relu, 5.0, -2.0), 0.0);
    assert_eq!(activate(Activation::Relu, 5.0, 2.5), 2.5);
    let c = Activation::ClampedSwiglu(ClampedSwiglu {
        alpha: 1.702,
        limit: 7.0,
    });
    // Gate clamped from above only, up clamped both ways, (up + 1) · g · σ(α g).
    let s = |v: f64| 1.0 / (1.0 + (-v).exp());
    assert_relative_eq!(
        activate(c, 9.0, 10.0),
        8.0 * 7.0 * s(1.702 * 7.0),
        max_relative = 1e-15
    );
    assert_relative_eq!(
        activate(c, -9.0, -10.0),
        -6.0 * -9.0 * s(1.702 * -9.0),
        max_relative = 1e-15
    );
    assert_relative_eq!(
        activate(c, 0.5, 0.25),
        1.25 * 0.5 * s(0.851),
        max_relative = 1e-15
    );
}

/// Random expert weights; gate iff the activation is gated.
fn weights(
    g: &mut Gen,
    e: usize,
    f: usize,
    h: usize,
    act: Activation,
    biases: bool,
    dtype: DType,
) -> ExpertWeights {
    let mut t = |shape: &[usize], s: f32| g.tensor(shape, s).cast(dtype);
    ExpertWeights {
        gate: act.is_gated().then(|| t(&[e, f, h], 0.4).into()),
        up: t(&[e, f, h], 0.4).into(),
        down: t(&[e, h, f], 0.3).into(),
        gate_bias: (biases && act.is_gated()).then(|| t(&[e, f], 0.1)),
        up_bias: biases.then(|| t(&[e, f], 0.1)),
        down_bias: biases.then(|| t(&[e, h], 0.1)),
    }
}

/// The FFN written out directly from the definition, independently of the crate's code.
fn naive_row(
    x: &[f64],
    w: &ExpertWeights,
    e: usize,
    f: usize,
    h: usize,
    act: Activation,
) -> Vec<f64> {
    let get = |t: &Option<Tensor>, i: usize| t.as_ref().map_or(0.0, |t| t.get(i));
    let mut hid = vec![0.0; f];
    for (fi, hv) in hid.iter_mut().enumerate() {
        let (mut gs, mut us) = (get(&w.gate_bias, e * f + fi), get(&w.up_bias, e * f + fi));
        for (hi, xv) in x.iter().enumerate() {
            gs += w.gate.as_ref().map_or(0.0, |g| g.get(e, fi, hi)) * xv;
            us += w.up.get(e, fi, hi) * xv;
        }
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let gelu = |v: f64| 0.5 * v * (1.0 + libm::erf(v / 2f64.sqrt()));
        *hv = match act {
            Activation::Swiglu => gs * sig(gs) * us,
            Activation::Geglu => gelu(gs) * us,
            Activation::Relu => us.max(0.0),
            Activation::Gelu => gelu(us),
            Activation::ClampedSwiglu(c) => {
                let gc = gs.min(c.limit);
                (us.clamp(-c.limit, c.limit) + 1.0) * gc * sig(c.alpha * gc)
            }
        };
    }
    (0..h)
        .map(|o| {
            get(&w.down_bias, e * h + o)
                + (0..f).map(|fi| hid[fi] * w.down.get(e, o, fi)).sum::<f64>()
        })
        .collect()
}

/// Offsets for `rows` rows over E experts with some experts empty; `dropped` rows at the end.
fn offsets(g: &mut Gen, e: usize, kept: usize) -> Vec<u32> {
    let mut cuts: Vec<u32> = (0..e - 1).map(|_| g.below(0, kept + 1) as u32).collect();
    cuts.sort_unstable();
    let mut o = vec![0];
    o.extend(cuts);
    o.push(kept as u32);
    o
}

#[test]
fn reference_matches_naive_definition() {
    let mut g = Gen::new(21);
    for act in ACTIVATIONS {
        let (e, f, h, rows) = (3, 11, 9, 10);
        let w = weights(&mut g, e, f, h, act, true, DType::F32);
        let x: Vec<f64> = common::wide(&g.uniform(rows * h, 1.5));
        let off = vec![0u32, 4, 4, 8]; // expert 1 empty, rows 8 and 9 dropped
        let y = expert_ffn(&x, &off, &w, act).unwrap();
        for r in 0..rows {
            let want = match r {
                0..=3 => naive_row(&x[r * h..(r + 1) * h], &w, 0, f, h, act),
                4..=7 => naive_row(&x[r * h..(r + 1) * h], &w, 2, f, h, act),
                _ => vec![0.0; h],
            };
            let err = common::rel_l2_f64(&y[r * h..(r + 1) * h], &want);
            assert!(err <= 1e-14, "{act:?} row {r}: {err:e}");
        }
    }
}

#[test]
fn bad_offsets_and_shapes_are_errors() {
    let mut g = Gen::new(2);
    let w = weights(&mut g, 2, 3, 4, Activation::Swiglu, false, DType::F32);
    let x = vec![0.5; 5 * 4];
    assert!(
        expert_ffn(&x, &[0, 3], &w, Activation::Swiglu).is_err(),
        "short offsets"
    );
    assert!(
        expert_ffn(&x, &[0, 4, 3], &w, Activation::Swiglu).is_err(),
        "decreasing"
    );
    assert!(
        expert_ffn(&x, &[0, 3, 6], &w, Activation::Swiglu).is_err(),
        "past the rows"
    );
    assert!(
        expert_ffn(&x, &[1, 3, 5], &w, Activation::Swiglu).is_err(),
        "not from 0"
    );
    assert!(
        expert_ffn(&x, &[0, 3, 5], &w, Activation::Relu).is_err(),
        "gate with relu"
    );
}

#[test]
fn every_backend_activation_and_dtype_matches_reference() {
    let backends = common::backends("expert_gemm");
    let mut g = Gen::new(3);
    let mut cases = 0;
    for &(e, f, h, rows) in &[
        (1usize, 1usize, 1usize, 1usize),
        (4, 13, 7, 9),
        (8, 33, 17, 37),
        (16, 24, 40, 120),
    ] {
        for act in ACTIVATIONS {
            for dtype in DType::ALL {
                for biases in [false, true] {
                    let w = weights(&mut g, e, f, h, act, biases, dtype);
                    let kept = rows - rows / 4;
                    let mut perm = PermuteBuffers::poisoned(rows, 1, e, h);
                    perm.expert_offsets = offsets(&mut g, e, kept);
                    perm.sorted_assignment = (0..rows as u32).collect();
                    perm.row_of_assignment = (0..rows as u32).collect();
                    perm.x_perm = g.uniform(rows * h, 1.0);
                    let reference =
                        expert_ffn(&common::wide(&perm.x_perm), &perm.expert_offsets, &w, act)
                            .unwrap();
                    for dev in &backends {
                        let ctx = format!(
                            "{} {act:?} {dtype} biases={biases} E={e} F={f} H={h}",
                            dev.kind()
                        );
                        let mut y = vec![f32::NAN; rows * h];
                        dev.expert_gemm(&perm, &w, act, &mut y).unwrap();
                        // Same rounded weights in the reference: only activation rounding remains.
                        let err = common::rel_l2(&y[..kept * h], &reference[..kept * h]);
                        assert!(
                            err <= common::stage_tolerance(dev.kind(), dtype),
                            "{ctx}: rel L2 {err:e}"
                        );
                        cases += 1;
                    }
                }
            }
        }
    }
    println!("expert_gemm: {cases} cases");
}

#[test]
fn low_precision_weights_stay_within_design_bounds_of_f32() {
    // The same layer with weights rounded to f16 / bf16, against the f32-weight reference.
    let mut g = Gen::new(4);
    let (e, f, h, rows) = (4, 96, 64, 20);
    let act = Activation::Swiglu;
    let w32 = weights(&mut g, e, f, h, act, true, DType::F32);
    let x: Vec<f64> = common::wide(&g.uniform(rows * h, 1.0));
    let off = vec![0u32, 5, 11, 11, 20];
    let reference = expert_ffn(&x, &off, &w32, act).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let cast = |t: &Tensor| t.cast(dtype);
        let w = ExpertWeights {
            gate: w32.gate.as_ref().map(|m| m.cast(dtype)),
            up: w32.up.cast(dtype),
            down: w32.down.cast(dtype),
            gate_bias: w32.gate_bias.as_ref().map(cast),
            up_bias: w32.up_bias.as_ref().map(cast),
            down_bias: w32.down_bias.as_ref().map(cast),
        };
        let y = expert_ffn(&x, &off, &w, act).unwrap();
        let err = common::rel_l2_f64(&y, &reference);
        assert!(err <= common::tolerance(dtype), "{dtype}: {err:e}");
        assert!(
            err > 0.0,
            "{dtype}: rounding had no effect, so the test is not testing"
        );
        println!("{dtype} weights vs f32 weights: rel L2 {err:.2e}");
    }
}
