//! Stage 4, combine (`y[t] = Σ_j w[t,j] · y_perm[row_of(t,j)]` in slot order): the GPT-4-style
//! layer (E 16, k 2, H 512) at T 1, 64, 512 on every backend that constructs here, on the
//! weights, permutation and expert outputs its earlier stages computed from seeded `x`.
//! Throughput: the minimum bytes (read the weights, the row map and each row of `y_perm`
//! once, write `y`).

#[path = "common/mod.rs"]
mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moe_kernels::Stage;

fn bench(c: &mut Criterion) {
    let devs = common::backends("combine");
    let layer = common::gpt4_layer();
    let d = layer.dims();
    let scale = layer.config.output_scale as f32;
    let mut group = c.benchmark_group("combine");
    for dev in &devs {
        for t in common::GPT4_TOKENS {
            let x = common::input(t, d.hidden);
            let p = common::Pipeline::run_before(dev, &layer, x, Stage::Combine)
                .unwrap_or_else(|err| panic!("stages before combine on {}: {err}", dev.kind()));
            let (Some(gate), Some(perm), Some(y_perm)) = (&p.gate, &p.perm, &p.y_perm) else {
                panic!("the pipeline ran gate, permute and expert_gemm");
            };
            let mut y = vec![f32::NAN; t * d.hidden];
            let run = |y: &mut [f32]| dev.combine(y_perm, gate, perm, None, scale, y);
            run(&mut y).unwrap_or_else(|err| panic!("combine on {}: {err}", dev.kind()));
            common::check_finite("y", &y);
            group.throughput(Throughput::Bytes(common::combine_bytes(
                gate,
                perm,
                &layer.config.routing,
            )));
            let id = BenchmarkId::new(
                format!("{}/{}", dev.kind(), common::GPT4_NAME),
                format!("T{t}"),
            );
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    common::time_stage(dev, iters, Some((&layer, &p.x, Stage::Combine)), || {
                        run(&mut y)
                    })
                })
            });
            black_box(&y);
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = bench
}
criterion_main!(benches);
