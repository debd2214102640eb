//! Stage 0 (router logits): by hand, and on every backend against the f64 reference for every
//! weight dtype over the shape sweep.

mod common;

use approx::assert_relative_eq;
use moe_kernels::cpu::router::router_logits;
use moe_kernels::synth::Gen;
use moe_kernels::{DType, Tensor};

#[test]
fn logits_by_hand() {
    let x = Tensor::from_f32(vec![2, 2], vec![1.0, 2.0, 3.0, -1.0]).unwrap();
    let w = Tensor::from_f32(vec![3, 2], vec![1.0, 0.0, 0.5, 0.25, -1.0, 1.0]).unwrap();
    let b = Tensor::from_f32(vec![3], vec![0.5, 0.0, 0.0]).unwrap();
    let l = router_logits(&x, &w, Some(&b)).unwrap();
    let want = [1.5, 1.0, 1.0, 3.5, 1.25, -4.0];
    for (a, b) in l.iter().zip(want) {
        assert_relative_eq!(*a, b, max_relative = 1e-15);
    }
}

#[test]
fn shape_errors() {
    let x = Tensor::from_f32(vec![2, 3], vec![0.5; 6]).unwrap();
    let w = Tensor::from_f32(vec![4, 2], vec![0.5; 8]).unwrap();
    assert!(router_logits(&x, &w, None).is_err(), "H mismatch");
    let w = Tensor::from_f32(vec![4, 3], vec![0.5; 12]).unwrap();
    let b = Tensor::from_f32(vec![3], vec![0.5; 3]).unwrap();
    assert!(router_logits(&x, &w, Some(&b)).is_err(), "bias length");
    let dev = moe_kernels::Backend::new(moe_kernels::BackendKind::Cpu).unwrap();
    assert!(
        dev.router(&x, &w, None, &mut [0.0; 7]).is_err(),
        "output length"
    );
}

#[test]
fn every_backend_and_dtype_matches_reference() {
    let backends = common::backends("router");
    let mut g = Gen::new(1);
    let mut cases = 0;
    for &t in &common::TOKENS {
        for &(e, h) in &[(1usize, 1usize), (3, 5), (16, 67), (61, 130), (256, 33)] {
            let x = g.tensor(&[t, h], 1.0);
            for dtype in DType::ALL {
                let w = g.tensor(&[e, h], 0.3).cast(dtype);
                let b = g.tensor(&[e], 0.5).cast(dtype);
                let reference = router_logits(&x, &w, Some(&b)).unwrap();
                for dev in &backends {
                    let mut out = vec![f32::NAN; t * e];
                    dev.router(&x, &w, Some(&b), &mut out).unwrap();
                    let err = common::rel_l2(&out, &reference);
                    // The reference uses the same rounded weights: only f32 output rounding remains.
                    assert!(
                        err <= 2e-6,
                        "{} {dtype} T={t} E={e} H={h}: rel L2 {err:e}",
                        dev.kind()
                    );
                    assert!(out.iter().all(|v| v.is_finite()), "unwritten logits");
                    cases += 1;
                }
            }
        }
    }
    println!("router: {cases} cases");
}
