//! Stage 1, the fused gate (scores, top-k, weights, expert counts) on every backend that
//! constructs here:
//! - the GPT-4-style layer's routing (softmax over E 16, top-2, renormalise) at T 1, 64, 512,
//!   on logits that the router stage computed from seeded `x`;
//! - DeepSeek-V3's routing (sigmoid over E 256, `score_correction_bias`, 8 groups keep 4,
//!   top-8, renormalise, ×2.5) at T 4096, on seeded random logits.
//!
//! Throughput: the minimum bytes (read the logits and bias, write ids, weights and counts).

#[path = "common/mod.rs"]
mod common;

use std::hint::black_box;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moe_kernels::{Backend, GateBuffers, RoutingConfig, Tensor};

fn bench(c: &mut Criterion) {
    let devs = common::backends("gate");
    let layer = common::gpt4_layer();
    let routing = layer.config.routing;
    let e = layer.dims().experts;
    let mut group = c.benchmark_group("gate");
    for dev in &devs {
        for t in common::GPT4_TOKENS {
            let x = common::input(t, common::GPT4_H);
            let p = common::Pipeline::run_before(dev, &layer, x, moe_kernels::Stage::Gate)
                .unwrap_or_else(|err| panic!("router on {}: {err}", dev.kind()));
            let case = Case {
                dev,
                logits: &p.logits,
                bias: layer.score_correction_bias.as_ref(),
                cfg: &routing,
                tokens: t,
                experts: e,
                in_layer: Some((&layer, &p.x, moe_kernels::Stage::Gate)),
            };
            case.bench(&mut group, common::GPT4_NAME);
        }

        let (t, e) = (common::DEEPSEEK_T, common::DEEPSEEK_E);
        let logits = common::random_logits(t, e, common::SEED);
        let bias = common::random_correction_bias(e, common::SEED + 1);
        let cfg = common::deepseek_routing();
        let case = Case {
            dev,
            logits: &logits,
            bias: Some(&bias),
            cfg: &cfg,
            tokens: t,
            experts: e,
            in_layer: None,
        };
        case.bench(&mut group, common::DEEPSEEK_NAME);
    }
    group.finish();
}

/// One gate configuration on one backend.
struct Case<'a> {
    dev: &'a Backend,
    logits: &'a [f32],
    bias: Option<&'a Tensor>,
    cfg: &'a RoutingConfig,
    tokens: usize,
    experts: usize,
    /// The layer and input this gate runs inside, for device timing on GPU backends.
    in_layer: common::InLayer<'a>,
}

impl Case<'_> {
    fn bench(&self, group: &mut criterion::BenchmarkGroup<'_, WallTime>, name: &str) {
        let (dev, t, e) = (self.dev, self.tokens, self.experts);
        let mut out = GateBuffers::poisoned(t, self.cfg.slots(e), e);
        let run = |out: &mut GateBuffers| dev.gate(self.logits, self.bias, self.cfg, out);
        run(&mut out).unwrap_or_else(|err| panic!("gate {name} on {}: {err}", dev.kind()));
        common::check_gate(&out);
        println!(
            "gate/{}/{name}/T{t}: {}",
            dev.kind(),
            common::load_summary(&out)
        );
        group.throughput(Throughput::Bytes(common::gate_bytes(
            t, e, self.cfg, self.bias,
        )));
        let id = BenchmarkId::new(format!("{}/{name}", dev.kind()), format!("T{t}"));
        group.bench_function(id, |b| {
            b.iter_custom(|iters| common::time_stage(dev, iters, self.in_layer, || run(&mut out)))
        });
        black_box(&out);
    }
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = bench
}
criterion_main!(benches);
