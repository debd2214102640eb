//! Stage 3, the grouped expert FFN (`y = (silu(x·Wgᵀ) ⊙ x·Wuᵀ)·Wdᵀ` per expert's rows): the
//! GPT-4-style layer (E 16, k 2, H 512, F 1024, SwiGLU) at T 1, 64, 512 on every backend that
//! constructs here, on the permutation its earlier stages computed from seeded `x`. A T whose
//! untimed first call takes longer than [`MAX_ITER`] is skipped (with a message), which today
//! is T 512 on the f64 CPU reference of a 2-core machine.
//!
//! Throughput: FLOPs (`3 · 2·H·F` per row, as elem/s) and the minimum bytes (read `x_perm`
//! and the weights of every expert that has rows once, write `y_perm`).
//!
//! The same layer with quantized expert weights (FP8 block, MXFP4, INT4; ids
//! `<backend>/<shape>_<format>/T<t>`): bytes count the packed codes, scales and zero points
//! the decode streams. A backend that refuses quantized weights is skipped with its message.

#[path = "common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode,
    Throughput,
};
use moe_kernels::quant::QuantFormat;
use moe_kernels::{Backend, MoeLayer, Stage};

/// Longest single call still benched: 10 samples of it must fit in a few seconds.
const MAX_ITER: Duration = Duration::from_secs(1);
/// Measurement time of a case, unless its 10 iterations need longer.
const MEASUREMENT: Duration = Duration::from_secs(2);

fn bench(c: &mut Criterion) {
    let devs = common::backends("expert_gemm");
    let dense = common::gpt4_layer();
    let mut group = c.benchmark_group("expert_gemm");
    // Iterations take milliseconds to a second: the same iteration count in every sample.
    group.sampling_mode(SamplingMode::Flat);
    let mut layers = vec![(common::GPT4_NAME.to_string(), dense)];
    for format in QuantFormat::ALL {
        layers.push((
            format!("{}_{format}", common::GPT4_NAME),
            common::gpt4_layer_quant(format),
        ));
    }
    for dev in &devs {
        for (shape, layer) in &layers {
            bench_layer(&mut group, dev, shape, layer);
        }
    }
    group.finish();
}

/// Every T of one layer on one backend.
fn bench_layer(
    group: &mut BenchmarkGroup<'_, WallTime>,
    dev: &Backend,
    shape: &str,
    layer: &MoeLayer,
) {
    let d = layer.dims();
    let act = layer.config.activation;
    for t in common::GPT4_TOKENS {
        let x = common::input(t, d.hidden);
        let p = common::Pipeline::run_before(dev, layer, x, Stage::ExpertGemm)
            .unwrap_or_else(|err| panic!("stages before expert_gemm on {}: {err}", dev.kind()));
        let perm = p.perm.as_ref().expect("the pipeline ran permute");
        let mut y_perm = vec![f32::NAN; t * p.slots * d.hidden];
        let run = |y: &mut [f32]| dev.expert_gemm(perm, &layer.experts, act, y);
        let name = format!("{}/{shape}", dev.kind());
        let start = Instant::now();
        let first = run(&mut y_perm);
        let first_time = start.elapsed();
        match first {
            Ok(()) => {}
            // A backend without the quantized decode: skipped, with its reason.
            Err(err) if layer.experts.up.quant().is_some() => {
                println!("expert_gemm/{name}: skipped: {err}");
                return;
            }
            Err(err) => panic!("expert_gemm on {}: {err}", dev.kind()),
        }
        common::check_finite("y_perm", &y_perm);
        if first_time > MAX_ITER {
            println!(
                "expert_gemm/{name}/T{t}: skipped, one call took {first_time:.2?} (> {MAX_ITER:?})"
            );
            continue;
        }
        // Flat sampling runs at least 10 iterations: give them the time they need.
        group.measurement_time(MEASUREMENT.max(first_time * 12));
        group.throughput(Throughput::ElementsAndBytes {
            elements: common::expert_gemm_flops(layer, perm),
            bytes: common::expert_gemm_bytes(layer, perm),
        });
        group.bench_function(BenchmarkId::new(name, format!("T{t}")), |b| {
            b.iter_custom(|iters| {
                common::time_stage(dev, iters, Some((layer, &p.x, Stage::ExpertGemm)), || {
                    run(&mut y_perm)
                })
            })
        });
        black_box(&y_perm);
    }
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = bench
}
criterion_main!(benches);
