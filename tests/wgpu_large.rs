//! Sizes that stress the wgpu path: a reduction of K = 14336 (Mixtral's F) in f32, and a
//! Mixtral-sized layer (8 experts of 14336 x 4096, f32: 235 MB per matrix, beyond a 128 MiB
//! storage binding) that must run without a binding-limit error (ignored by default: on
//! lavapipe it takes minutes; `scripts/soak.sh`-style runs and the GPU check run it).

#![cfg(feature = "wgpu")]

mod common;

use moe_kernels::synth::{random_layer, random_x, Extras};
use moe_kernels::{Backend, BackendKind, DType, Preset};

fn wgpu_or_skip(test: &str) -> Option<Backend> {
    match Backend::new(BackendKind::Wgpu) {
        Ok(b) => Some(b),
        Err(e) => {
            let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(!in_ci, "[{test}] CI=true but wgpu did not start: {e}");
            println!("[{test}] skipped: {e}");
            None
        }
    }
}

/// f32 accumulation over K = 14336 in both GEMMs (F = 14336 is GEMM 2's reduction).
/// Measured bound on lavapipe: printed; the assertion is DESIGN.md's f32 bound, 2e-5.
#[test]
fn f32_reduction_of_14336_stays_within_bound() {
    let Some(dev) = wgpu_or_skip("wgpu K=14336") else {
        return;
    };
    let mut cfg = Preset::Mixtral.config();
    cfg.routing.top_k = 1;
    let layer = random_layer(cfg, 1, 96, 14336, Extras::default(), DType::F32, 17).unwrap();
    let x = random_x(5, 96, 18);
    let out = layer.forward(&dev, &x).unwrap();
    let reference = layer.forward_reference(&x).unwrap();
    let err = common::rel_l2(&out.y, &reference.y);
    println!("[wgpu K=14336] y rel L2 against the f64 reference: {err:.3e} (bound 2e-5)");
    assert!(err <= 2e-5, "rel L2 {err:e}");
}

#[test]
#[ignore = "Mixtral-sized weights (5.6 GB in f32): minutes on lavapipe; run by the GPU check"]
fn mixtral_sized_layer_runs_without_binding_errors() {
    let Some(dev) = wgpu_or_skip("wgpu mixtral-sized") else {
        return;
    };
    let layer =
        moe_kernels::bench::layer(&moe_kernels::bench::shape("mixtral").unwrap(), DType::F32)
            .unwrap();
    let x = random_x(2, 4096, 19);
    let out = layer.forward(&dev, &x).unwrap();
    let reference = layer.forward_reference(&x).unwrap();
    let err = common::rel_l2(&out.y, &reference.y);
    println!("[wgpu mixtral-sized] y rel L2 {err:.3e}");
    assert!(err <= 2e-5, "rel L2 {err:e}");
}
