//! Stage 2, permute (stable counting sort of the T·k assignments by expert, plus the gather
//! `x_perm[r] = x[token of r]`): the GPT-4-style layer (E 16, k 2, H 512) at T 1, 64, 512 on
//! every backend that constructs here, on the routing its router and gate computed from seeded
//! `x`. Throughput: the minimum bytes (read the ids and each row of `x` once, write the
//! offsets, both index maps and `x_perm`).

#[path = "common/mod.rs"]
mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moe_kernels::{PermuteBuffers, Stage};

fn bench(c: &mut Criterion) {
    let devs = common::backends("permute");
    let layer = common::gpt4_layer();
    let d = layer.dims();
    let mut group = c.benchmark_group("permute");
    for dev in &devs {
        for t in common::GPT4_TOKENS {
            let x = common::input(t, d.hidden);
            let p = common::Pipeline::run_before(dev, &layer, x, Stage::Permute)
                .unwrap_or_else(|err| panic!("stages before permute on {}: {err}", dev.kind()));
            let gate = p.gate.as_ref().expect("the pipeline ran the gate");
            let mut out = PermuteBuffers::poisoned(t, p.slots, d.experts, d.hidden);
            let run = |out: &mut PermuteBuffers| dev.permute(gate, &p.x, out);
            run(&mut out).unwrap_or_else(|err| panic!("permute on {}: {err}", dev.kind()));
            common::check_permute(gate, &out);
            group.throughput(Throughput::Bytes(common::permute_bytes(
                gate,
                &layer.config.routing,
                d.hidden,
            )));
            let id = BenchmarkId::new(
                format!("{}/{}", dev.kind(), common::GPT4_NAME),
                format!("T{t}"),
            );
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    common::time_stage(dev, iters, Some((&layer, &p.x, Stage::Permute)), || {
                        run(&mut out)
                    })
                })
            });
            black_box(&out);
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
