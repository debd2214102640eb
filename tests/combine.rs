//! Stage 4 (combine): by hand, fixed slot order, dropped rows never read, the shared expert
//! with and without its gate, and every backend against the reference.

mod common;

use approx::assert_relative_eq;
use moe_kernels::cpu::combine::{combine, Assignments, SharedInput};
use moe_kernels::synth::Gen;
use moe_kernels::{GateBuffers, PermuteBuffers};

#[test]
fn combine_by_hand() {
    // T = 2, k = 2, H = 2. Rows: 0..4; row 3 is a dropped assignment holding NaN.
    let y_perm = [1.0, 2.0, 10.0, 20.0, 100.0, 200.0, f64::NAN, f64::NAN];
    let a = Assignments {
        slots: 2,
        weights: &[0.75, 0.25, 0.5, 0.0],
        kept: &[true, true, true, false],
        row_of_assignment: &[2, 0, 1, 3],
    };
    let shared_y = [1.0, 1.0, 2.0, 2.0];
    let gate_logits = [0.0, 100.0];
    let y = combine(
        &y_perm,
        2,
        a,
        Some(SharedInput {
            y: &shared_y,
            gate_logits: Some(&gate_logits),
        }),
        0.8,
    )
    .unwrap();
    // t0: 0.8 (0.75·[100,200] + 0.25·[1,2]) + σ(0)·[1,1]
    assert_relative_eq!(y[0], 0.8 * (75.0 + 0.25) + 0.5, max_relative = 1e-15);
    assert_relative_eq!(y[1], 0.8 * (150.0 + 0.5) + 0.5, max_relative = 1e-15);
    // t1: 0.8 (0.5·[10,20]) + σ(100)·[2,2]; the dropped NaN row is never read.
    let s = 1.0 / (1.0 + (-100f64).exp());
    assert_relative_eq!(y[2], 0.8 * 5.0 + 2.0 * s, max_relative = 1e-15);
    assert_relative_eq!(y[3], 0.8 * 10.0 + 2.0 * s, max_relative = 1e-15);
    // Without a gate the shared expert has weight 1.
    let y = combine(
        &y_perm,
        2,
        a,
        Some(SharedInput {
            y: &shared_y,
            gate_logits: None,
        }),
        1.0,
    )
    .unwrap();
    assert_relative_eq!(y[2], 5.0 + 2.0, max_relative = 1e-15);
}

#[test]
fn bad_rows_are_errors() {
    let a = Assignments {
        slots: 1,
        weights: &[1.0],
        kept: &[true],
        row_of_assignment: &[5],
    };
    assert!(combine(&[0.0; 4], 2, a, None, 1.0).is_err());
}

#[test]
fn every_backend_matches_reference() {
    let backends = common::backends("combine");
    let mut g = Gen::new(9);
    let mut cases = 0;
    for &t in &common::TOKENS {
        for &(k, h) in &[(1usize, 1usize), (2, 7), (8, 33), (3, 130)] {
            for shared in 0..3 {
                let n = t * k;
                // A random permutation of the rows; every third assignment dropped.
                let mut rows: Vec<u32> = (0..n as u32).collect();
                for i in (1..n).rev() {
                    let j = g.below(0, i + 1);
                    rows.swap(i, j);
                }
                let kept: Vec<u32> = (0..n).map(|i| u32::from(i % 3 != 2)).collect();
                let weights: Vec<f32> = g
                    .uniform(n, 1.0)
                    .iter()
                    .zip(&kept)
                    .map(|(w, &k)| if k == 1 { *w } else { 0.0 })
                    .collect();
                let mut y_perm = g.uniform(n * h, 2.0);
                for (i, &kp) in kept.iter().enumerate() {
                    if kp == 0 {
                        // Dropped rows are garbage that must never be read.
                        let r = rows[i] as usize;
                        y_perm[r * h..(r + 1) * h].fill(f32::NAN);
                    }
                }
                let shared_y = g.uniform(t * h, 1.0);
                let shared_g = g.uniform(t, 3.0);
                let sh = match shared {
                    0 => None,
                    1 => Some((&shared_y[..], None)),
                    _ => Some((&shared_y[..], Some(&shared_g[..]))),
                };
                let (wy, wsy, wsg) = (
                    common::wide(&y_perm),
                    common::wide(&shared_y),
                    common::wide(&shared_g),
                );
                let kept_b: Vec<bool> = kept.iter().map(|&x| x == 1).collect();
                let ww = common::wide(&weights);
                let a = Assignments {
                    slots: k,
                    weights: &ww,
                    kept: &kept_b,
                    row_of_assignment: &rows,
                };
                let sin = sh.map(|(_, g)| SharedInput {
                    y: &wsy,
                    gate_logits: g.map(|_| &wsg[..]),
                });
                let reference = combine(&wy, h, a, sin, 0.8).unwrap();
                let mut gate = GateBuffers::poisoned(t, k, 4);
                gate.topk_ids = vec![0; n];
                gate.topk_weights = weights.clone();
                gate.kept = kept.clone();
                gate.counts = vec![0; 4];
                let mut perm = PermuteBuffers::poisoned(t, k, 4, h);
                perm.row_of_assignment = rows.clone();
                for dev in &backends {
                    let mut y = vec![f32::NAN; t * h];
                    dev.combine(&y_perm, &gate, &perm, sh, 0.8, &mut y).unwrap();
                    let err = common::rel_l2(&y, &reference);
                    assert!(
                        err <= 2e-6,
                        "{} T={t} k={k} H={h} shared={shared}: {err:e}",
                        dev.kind()
                    );
                    assert!(
                        y.iter().all(|v| v.is_finite()),
                        "NaN leaked from a dropped row"
                    );
                    cases += 1;
                }
            }
        }
    }
    println!("combine: {cases} cases");
}
