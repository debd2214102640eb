//! Stage 0, router logits `x·Wrᵀ`: the GPT-4-style layer (E 16, H 512) at T 1, 64, 512 on
//! every backend that constructs here. Throughput: FLOPs (`2·T·E·H`, as elem/s) and the
//! minimum bytes (read `x` and `Wr`, write the logits).

#[path = "common/mod.rs"]
mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moe_kernels::Stage;

fn bench(c: &mut Criterion) {
    let devs = common::backends("router");
    let layer = common::gpt4_layer();
    let e = layer.dims().experts;
    let mut group = c.benchmark_group("router");
    for dev in &devs {
        for t in common::GPT4_TOKENS {
            let x = common::input(t, common::GPT4_H);
            let mut logits = vec![f32::NAN; t * e];
            let run = |logits: &mut [f32]| {
                dev.router(&x, &layer.router_weight, layer.router_bias.as_ref(), logits)
            };
            run(&mut logits).unwrap_or_else(|err| panic!("router on {}: {err}", dev.kind()));
            common::check_finite("logits", &logits);
            group.throughput(Throughput::ElementsAndBytes {
                elements: common::router_flops(&layer, t),
                bytes: common::router_bytes(&layer, t),
            });
            let id = BenchmarkId::new(
                format!("{}/{}", dev.kind(), common::GPT4_NAME),
                format!("T{t}"),
            );
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    common::time_stage(dev, iters, Some((&layer, &x, Stage::Router)), || {
                        run(&mut logits)
                    })
                })
            });
            black_box(&logits);
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
