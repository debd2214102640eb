//! Shared setup of the stage benches (`benches/<stage>.rs`), included by each with
//! `#[path = "common/mod.rs"] mod common;`.
//!
//! Every bench runs on every backend that [`Backend::new`] constructs here (printing the others
//! with the reason), through the public dispatch API, on seeded random inputs from
//! [`moe_kernels::synth`]. A stage's inputs are produced by running the earlier stages on the
//! same backend (untimed), so routing, expert loads and permutations are realistic. Outputs are
//! poisoned once and checked after one untimed call, so a bench never times a stage that does
//! not write its outputs.
//!
//! Throughput is the minimum traffic of the stage (`Throughput::Bytes`: every input read once,
//! every output written once, nothing cached between iterations), and for the two GEMM stages
//! (router, expert_gemm) also the arithmetic as `elements` = FLOPs (2 per multiply-add), so
//! criterion's `elem/s` reads as FLOP/s there.
//!
//! Timing is [`time_stage`]: host wall time today; the one place a GPU backend substitutes
//! device time.

#![allow(dead_code)] // each bench uses a different part of this module

use std::time::{Duration, Instant};

use criterion::Criterion;
use moe_kernels::quant::{QuantFormat, QuantSpec};
use moe_kernels::synth::{self, Extras, Gen};
use moe_kernels::{
    Backend, BackendKind, DType, GateBuffers, MoeLayer, PermuteBuffers, Preset, Result,
    RoutingConfig, Stage, Tensor,
};

/// Bytes of one f32 / u32 element.
const F32: u64 = 4;
const U32: u64 = 4;

/// A GPT-4-style layer (16 experts, top-2, softmax + renormalise, SwiGLU) scaled down so the
/// f64 CPU reference finishes on a 2-core machine: E 16, k 2, H 512, F 1024.
pub const GPT4_E: usize = 16;
pub const GPT4_H: usize = 512;
pub const GPT4_F: usize = 1024;
/// Token counts benched for the GPT-4-style layer: decode, a small batch, a prefill chunk.
pub const GPT4_TOKENS: [usize; 3] = [1, 64, 512];
/// Name of the GPT-4-style shape in benchmark ids.
pub const GPT4_NAME: &str = "gpt4_e16k2_h512f1024";

/// Seed of every synthetic layer and input (the input seed also mixes in T).
pub const SEED: u64 = 0x6d6f_655f_6265_6e63; // "moe_benc"

/// The criterion settings of every stage bench: 10 samples, short warm-up and measurement,
/// no plots. Command-line flags (`--quick`, `--measurement-time`, ...) still override these.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
}

/// Every backend that constructs here, in [`BackendKind::AUTO_ORDER`]; prints each skipped
/// kind with the reason from its error, and which ones run.
pub fn backends(bench: &str) -> Vec<Backend> {
    let mut run = Vec::new();
    for kind in BackendKind::AUTO_ORDER {
        match Backend::new(kind) {
            Ok(dev) => run.push(dev),
            Err(e) => println!("{bench}: skipping backend {kind}: {e}"),
        }
    }
    let names: Vec<&str> = run.iter().map(|d| d.kind().name()).collect();
    println!("{bench}: benching on backend(s): {}", names.join(", "));
    run
}

/// The stage inside a whole layer forward, for device timing: `(layer, x, stage)`.
pub type InLayer<'a> = Option<(&'a MoeLayer, &'a Tensor, Stage)>;

/// Time of `iters` runs of one stage.
///
/// - CPU: host wall time around the loop (the CPU backend computes synchronously).
/// - GPU backends, with `in_layer`: the stage's own device time inside prepared layer
///   forwards (CUDA events; wgpu timestamp queries), summed over `iters` forwards, so uploads
///   and read-backs are not counted. Without timestamps (some wgpu adapters), or without
///   `in_layer`, the host stage call is timed as submit-and-wait (it includes its uploads and
///   read-back; the bench id says which clock was used via the printed note).
pub fn time_stage(
    dev: &Backend,
    iters: u64,
    in_layer: InLayer<'_>,
    mut stage: impl FnMut() -> Result<()>,
) -> Duration {
    if dev.kind() != BackendKind::Cpu {
        if let Some((layer, x, which)) = in_layer {
            if let Some(d) = device_stage_time(dev, layer, x, which, iters) {
                return d;
            }
        }
    }
    let start = Instant::now();
    for _ in 0..iters {
        // Validated by an untimed call before the bench, so this cannot fail.
        if let Err(e) = stage() {
            panic!("{} failed during the bench: {e}", dev.kind());
        }
    }
    start.elapsed()
}

/// Device time of `stage` summed over `iters` prepared forwards, or `None` when the backend
/// reports no per-stage device times.
fn device_stage_time(
    dev: &Backend,
    layer: &MoeLayer,
    x: &Tensor,
    stage: Stage,
    iters: u64,
) -> Option<Duration> {
    let prepared = layer
        .prepare(dev, x.shape()[0], x.dtype())
        .unwrap_or_else(|e| panic!("prepare on {}: {e}", dev.kind()));
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let out = prepared
            .forward(x)
            .unwrap_or_else(|e| panic!("forward on {}: {e}", dev.kind()));
        total += out.stage_times.iter().find(|(s, _)| *s == stage)?.1;
    }
    Some(total)
}

/// The seeded GPT-4-style layer in f32.
pub fn gpt4_layer() -> MoeLayer {
    synth::random_layer(
        Preset::Gpt4.config(),
        GPT4_E,
        GPT4_H,
        GPT4_F,
        Extras::default(),
        DType::F32,
        SEED,
    )
    .unwrap_or_else(|e| panic!("synthetic GPT-4-style layer: {e}"))
}

/// The seeded GPT-4-style layer with its expert matrices quantized to `format` (the
/// quantizer's defaults: f32 FP8 block scales; bf16 INT4 scales, group 128, zero points).
pub fn gpt4_layer_quant(format: QuantFormat) -> MoeLayer {
    gpt4_layer()
        .quantized(&QuantSpec::new(format))
        .unwrap_or_else(|e| panic!("quantizing the GPT-4-style layer to {format}: {e}"))
}

/// The seeded input `x` `[T, H]` for `t` tokens.
pub fn input(t: usize, h: usize) -> Tensor {
    synth::random_x(t, h, SEED ^ (t as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Seeded router logits `[T, E]` uniform in [-4, 4] (the spread of a trained router), for gate
/// configs too large to run the router for.
pub fn random_logits(t: usize, e: usize, seed: u64) -> Vec<f32> {
    Gen::new(seed).uniform(t * e, 4.0)
}

/// A seeded `score_correction_bias` `[E]`, as `synth::random_layer` draws it.
pub fn random_correction_bias(e: usize, seed: u64) -> Tensor {
    Gen::new(seed).tensor(&[e], 0.1)
}

/// The DeepSeek-V3 routing config (sigmoid, 8 groups keep 4, top-8, score_correction_bias,
/// renormalise, ×2.5) with E 256 and T 4096.
pub const DEEPSEEK_E: usize = 256;
pub const DEEPSEEK_T: usize = 4096;
pub const DEEPSEEK_NAME: &str = "deepseek_v3_e256k8_g8keep4";

pub fn deepseek_routing() -> RoutingConfig {
    Preset::DeepseekV3.config().routing
}

/// The inputs of one stage of `layer` for `x`, produced by the stages before it on `dev`.
pub struct Pipeline {
    pub x: Tensor,
    pub slots: usize,
    /// `[T, E]`, after [`Stage::Router`].
    pub logits: Vec<f32>,
    /// After [`Stage::Gate`].
    pub gate: Option<GateBuffers>,
    /// After [`Stage::Permute`].
    pub perm: Option<PermuteBuffers>,
    /// `[T·slots, H]`, after [`Stage::ExpertGemm`].
    pub y_perm: Option<Vec<f32>>,
}

impl Pipeline {
    /// Runs the stages of `layer` before `upto` on `dev` (the router always).
    pub fn run_before(dev: &Backend, layer: &MoeLayer, x: Tensor, upto: Stage) -> Result<Self> {
        let dims = layer.dims();
        let (e, h) = (dims.experts, dims.hidden);
        let t = x.shape()[0];
        let cfg = &layer.config;
        let slots = cfg.routing.slots(e);
        let before = |s: Stage| {
            Stage::ALL.iter().position(|&a| a == s) < Stage::ALL.iter().position(|&a| a == upto)
        };
        let mut logits = vec![f32::NAN; t * e];
        dev.router(
            &x,
            &layer.router_weight,
            layer.router_bias.as_ref(),
            &mut logits,
        )?;
        let mut p = Pipeline {
            x,
            slots,
            logits,
            gate: None,
            perm: None,
            y_perm: None,
        };
        if before(Stage::Gate) {
            let mut g = GateBuffers::poisoned(t, slots, e);
            dev.gate(
                &p.logits,
                layer.score_correction_bias.as_ref(),
                &cfg.routing,
                &mut g,
            )?;
            check_gate(&g);
            p.gate = Some(g);
        }
        if let (true, Some(g)) = (before(Stage::Permute), &p.gate) {
            let mut perm = PermuteBuffers::poisoned(t, slots, e, h);
            dev.permute(g, &p.x, &mut perm)?;
            check_permute(g, &perm);
            p.perm = Some(perm);
        }
        if let (true, Some(perm)) = (before(Stage::ExpertGemm), &p.perm) {
            let mut y_perm = vec![f32::NAN; t * slots * h];
            dev.expert_gemm(perm, &layer.experts, cfg.activation, &mut y_perm)?;
            check_finite("y_perm", &y_perm);
            p.y_perm = Some(y_perm);
        }
        Ok(p)
    }

    pub fn tokens(&self) -> usize {
        self.x.shape()[0]
    }
}

/// Panics (in the bench, before timing) if any element is NaN or infinite: a stage left a
/// poisoned element unwritten or computed garbage.
pub fn check_finite(what: &str, v: &[f32]) {
    if let Some(i) = v.iter().position(|a| !a.is_finite()) {
        panic!("{what}[{i}] = {} after the stage: not written", v[i]);
    }
}

/// Panics if the gate left a poisoned id, weight, kept flag or count.
pub fn check_gate(g: &GateBuffers) {
    if let Some(i) = g.topk_ids.iter().position(|&id| id as usize >= g.experts) {
        panic!(
            "gate: topk_ids[{i}] = {} (E = {})",
            g.topk_ids[i], g.experts
        );
    }
    check_finite("topk_weights", &g.topk_weights);
    if let Some(i) = g.kept.iter().position(|&k| k > 1) {
        panic!("gate: kept[{i}] = {}", g.kept[i]);
    }
    let kept: u64 = g.kept.iter().map(|&k| u64::from(k)).sum();
    let counted: u64 = g.counts.iter().map(|&c| u64::from(c)).sum();
    if kept != counted {
        panic!("gate: counts sum to {counted}, but {kept} assignments are kept");
    }
}

/// Panics if the permutation or the gathered rows were left poisoned.
pub fn check_permute(g: &GateBuffers, p: &PermuteBuffers) {
    let n = g.tokens * g.slots;
    let kept: usize = g.kept.iter().filter(|&&k| k != 0).count();
    if p.expert_offsets.first() != Some(&0) || p.expert_offsets[g.experts] as usize != kept {
        panic!(
            "permute: expert_offsets {:?} (expected 0 .. {kept})",
            p.expert_offsets
        );
    }
    for (name, v) in [
        ("sorted_assignment", &p.sorted_assignment),
        ("row_of_assignment", &p.row_of_assignment),
    ] {
        if let Some(i) = v.iter().position(|&a| a as usize >= n) {
            panic!("permute: {name}[{i}] = {} (T·slots = {n})", v[i]);
        }
    }
    check_finite("x_perm", &p.x_perm[..kept * p.hidden]);
}

/// Bytes of one element of `t`.
pub fn elem_bytes(t: &Tensor) -> u64 {
    t.dtype().size() as u64
}

/// Minimum traffic of the router: read `x` and `Wr` (and the bias), write the logits.
pub fn router_bytes(layer: &MoeLayer, t: usize) -> u64 {
    let d = layer.dims();
    let (t, e, h) = (t as u64, d.experts as u64, d.hidden as u64);
    let bias = layer
        .router_bias
        .as_ref()
        .map_or(0, |b| b.len() as u64 * elem_bytes(b));
    t * h * F32 + e * h * elem_bytes(&layer.router_weight) + bias + t * e * F32
}

/// FLOPs of the router GEMM: `2·T·E·H`.
pub fn router_flops(layer: &MoeLayer, t: usize) -> u64 {
    let d = layer.dims();
    2 * (t * d.experts * d.hidden) as u64
}

/// Minimum traffic of the gate: read the logits (and the correction bias), write ids, weights
/// and counts, and the kept flags when capacity can drop assignments.
pub fn gate_bytes(t: usize, e: usize, cfg: &RoutingConfig, bias: Option<&Tensor>) -> u64 {
    let n = (t * cfg.slots(e)) as u64;
    let (t, e) = (t as u64, e as u64);
    let kept = if cfg.capacity.is_some() || cfg.expert_choice.is_some() {
        n * U32
    } else {
        0
    };
    let bias = bias.map_or(0, |b| b.len() as u64 * elem_bytes(b));
    t * e * F32 + bias + n * (U32 + F32) + kept + e * U32
}

/// Minimum traffic of permute: read the ids (and kept flags under capacity) and each token's
/// row of `x` once; write the offsets, both index maps and the gathered rows.
pub fn permute_bytes(g: &GateBuffers, cfg: &RoutingConfig, h: usize) -> u64 {
    let n = (g.tokens * g.slots) as u64;
    let kept_rows = g.kept.iter().filter(|&&k| k != 0).count() as u64;
    let kept_in = if cfg.capacity.is_some() || cfg.expert_choice.is_some() {
        n * U32
    } else {
        0
    };
    let (t, e, h) = (g.tokens as u64, g.experts as u64, h as u64);
    n * U32 + kept_in + t * h * F32 + (e + 1) * U32 + 2 * n * U32 + kept_rows * h * F32
}

/// Experts with at least one row, from `expert_offsets`.
pub fn active_experts(p: &PermuteBuffers) -> u64 {
    p.expert_offsets.windows(2).filter(|w| w[1] > w[0]).count() as u64
}

/// Minimum traffic of the expert FFN: read the offsets, the kept rows of `x_perm` and the
/// weights (and biases) of every expert that has rows once, write all of `y_perm`.
pub fn expert_gemm_bytes(layer: &MoeLayer, p: &PermuteBuffers) -> u64 {
    let w = &layer.experts;
    let d = layer.dims();
    let (e, h) = (d.experts as u64, d.hidden as u64);
    let per_expert = |t: &Tensor| t.len() as u64 / e * elem_bytes(t);
    // Quantized matrices count their packed bytes: what the decode must stream.
    let mut weights = [Some(&w.up), Some(&w.down), w.gate.as_ref()]
        .into_iter()
        .flatten()
        .map(|m| m.bytes() / e)
        .sum::<u64>();
    for t in [&w.gate_bias, &w.up_bias, &w.down_bias]
        .into_iter()
        .flatten()
    {
        weights += per_expert(t);
    }
    let rows = p.expert_offsets[d.experts] as u64;
    let all_rows = (p.tokens * p.slots) as u64;
    (e + 1) * U32 + rows * h * F32 + active_experts(p) * weights + all_rows * h * F32
}

/// FLOPs of the expert FFN: `2·H·F` per row for each of up, gate (when gated) and down.
pub fn expert_gemm_flops(layer: &MoeLayer, p: &PermuteBuffers) -> u64 {
    let d = layer.dims();
    let gemms = if layer.config.activation.is_gated() {
        3
    } else {
        2
    };
    let rows = p.expert_offsets[d.experts] as u64;
    rows * gemms * 2 * (d.hidden * d.ffn) as u64
}

/// Minimum traffic of combine: read the weights, the row map (and kept flags under capacity)
/// and each kept row of `y_perm` once, write `y`.
pub fn combine_bytes(g: &GateBuffers, p: &PermuteBuffers, cfg: &RoutingConfig) -> u64 {
    let n = (g.tokens * g.slots) as u64;
    let kept_rows = g.kept.iter().filter(|&&k| k != 0).count() as u64;
    let kept_in = if cfg.capacity.is_some() || cfg.expert_choice.is_some() {
        n * U32
    } else {
        0
    };
    let h = p.hidden as u64;
    n * (F32 + U32) + kept_in + kept_rows * h * F32 + g.tokens as u64 * h * F32
}

/// The routing load of a gate result, for the bench log: min / max assignments per expert.
pub fn load_summary(g: &GateBuffers) -> String {
    let min = g.counts.iter().min().copied().unwrap_or(0);
    let max = g.counts.iter().max().copied().unwrap_or(0);
    format!(
        "expert load min {min} max {max} (of {} assignments)",
        g.counts.iter().sum::<u32>()
    )
}
