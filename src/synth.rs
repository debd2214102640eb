//! Seeded synthetic layers and inputs, for `moe demo`, the tests and the benches. Values are
//! never zero-filled: weights are uniform with variance ~1/fan_in so activations stay O(1).

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::LayerConfig;
use crate::device::BackendKind;
use crate::error::Result;
use crate::layer::MoeLayer;
use crate::limits;
use crate::tensor::{DType, Tensor};

/// What a synthetic layer holds besides the routed experts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extras {
    /// A router bias `router.bias` `[E]`.
    pub router_bias: bool,
    /// A selection bias `router.score_correction_bias` `[E]` (DeepSeek-V3).
    pub score_correction_bias: bool,
    /// Biases on the expert projections (`experts.*_proj_bias`).
    pub expert_biases: bool,
    /// Shared expert width Fs, if any.
    pub shared_ffn: Option<usize>,
    /// A sigmoid gate `shared.gate.weight` `[1, H]` on the shared expert (Qwen2-MoE); ignored
    /// without `shared_ffn`.
    pub shared_gate: bool,
}

/// A seeded generator of uniform values.
pub struct Gen(StdRng);

impl Gen {
    /// A generator seeded with `seed`: equal seeds give equal values.
    pub fn new(seed: u64) -> Self {
        Gen(StdRng::seed_from_u64(seed))
    }

    /// `n` values uniform in `[-scale, scale]`.
    pub fn uniform(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.0.gen_range(-scale..=scale)).collect()
    }

    /// A tensor of `shape` uniform in `[-scale, scale]`.
    pub fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product();
        let data = self.uniform(n, scale);
        // The length equals the shape's product by construction.
        Tensor::from_f32(shape.to_vec(), data).expect("length matches shape")
    }

    /// A uniform integer in `lo..hi`.
    pub fn below(&mut self, lo: usize, hi: usize) -> usize {
        self.0.gen_range(lo..hi)
    }

    /// A uniform random permutation of `0..n` (Fisher-Yates, from the back).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(0, i + 1);
            p.swap(i, j);
        }
        p
    }
}

/// How [`assignments`] spreads tokens over experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// k distinct uniform picks per token.
    Random,
    /// Every token on expert 0 first (one expert takes everything it can).
    FirstExpert,
    /// The upper half of the experts never chosen when possible (empty experts).
    LowerHalf,
    /// Random picks with every third assignment dropped.
    DropEveryThird,
}

impl Spread {
    /// Every spread.
    pub const ALL: [Spread; 4] = [
        Spread::Random,
        Spread::FirstExpert,
        Spread::LowerHalf,
        Spread::DropEveryThird,
    ];
}

/// Gate outputs `(topk_ids, kept)` `[T, k]` for the permutation tests: `k` distinct experts
/// out of `e` per token, as the gate produces, spread as `spread` says.
pub fn assignments(
    g: &mut Gen,
    t: usize,
    k: usize,
    e: usize,
    spread: Spread,
) -> (Vec<u32>, Vec<u32>) {
    let mut ids = Vec::with_capacity(t * k);
    for _ in 0..t {
        let mut pool: Vec<u32> = (0..e as u32).collect();
        for j in 0..k {
            let pick = match spread {
                Spread::FirstExpert => j,
                Spread::LowerHalf => g.below(j, (e / 2).max(k)),
                Spread::Random | Spread::DropEveryThird => g.below(j, e),
            };
            pool.swap(j, pick);
            ids.push(pool[j]);
        }
    }
    let kept = (0..t * k)
        .map(|i| u32::from(spread != Spread::DropEveryThird || i % 3 != 1))
        .collect();
    (ids, kept)
}

/// Logits `[T, E]` whose ranked values are at least `gap` apart within each token, so that
/// f32 rounding can never flip a pick: a random permutation of `0, s, 2·s, …` (s a per-token
/// spacing in [gap, 1.25·gap]) plus a per-token offset.
pub fn separated_logits(g: &mut Gen, t: usize, e: usize, gap: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(t * e);
    for _ in 0..t {
        let ranks = g.permutation(e);
        let offset = g.uniform(1, 2.0)[0];
        // A spacing of its own per token (in [gap, 1.25 gap]): softmax cancels the offset, so
        // equal spacings would give every token the same scores and tie tokens against each
        // other (top-1 priority, expert choice) below f32 resolution.
        let step = gap * (1.125 + g.uniform(1, 0.125)[0]);
        out.extend(
            ranks
                .iter()
                .map(|&r| offset + step * (r as f32 - e as f32 / 2.0)),
        );
    }
    out
}

/// Uniform scale giving variance 1/fan_in.
fn scale_for(fan_in: usize) -> f32 {
    (3.0 / fan_in.max(1) as f32).sqrt()
}

/// A random layer with E experts, hidden H, FFN width F, weights in `dtype`.
pub fn random_layer(
    config: LayerConfig,
    e: usize,
    h: usize,
    f: usize,
    extras: Extras,
    dtype: DType,
    seed: u64,
) -> Result<MoeLayer> {
    // Generated in f32 before the cast; checked before any of it is allocated.
    let per_expert = if config.activation.is_gated() { 3 } else { 2 };
    let shared = extras
        .shared_ffn
        .map_or(0, |fs| limits::product(&[per_expert, fs, h]));
    limits::check_host(
        BackendKind::Cpu,
        || format!("a synthetic layer with E = {e}, H = {h}, F = {f}"),
        limits::product(&[per_expert, e, f, h])
            .saturating_add(shared)
            .saturating_add(limits::product(&[e, h]))
            .saturating_mul(4),
    )?;
    let mut g = Gen::new(seed);
    let mut t = BTreeMap::new();
    // Router weights are larger than 1/sqrt(H) so scores are spread out, as in trained routers.
    t.insert(
        "router.weight".to_string(),
        g.tensor(&[e, h], 4.0 * scale_for(h)),
    );
    if extras.router_bias {
        t.insert("router.bias".into(), g.tensor(&[e], 0.5));
    }
    if extras.score_correction_bias {
        t.insert("router.score_correction_bias".into(), g.tensor(&[e], 0.1));
    }
    let gated = config.activation.is_gated();
    if gated {
        t.insert(
            "experts.gate_proj".into(),
            g.tensor(&[e, f, h], scale_for(h)).cast(dtype),
        );
    }
    t.insert(
        "experts.up_proj".into(),
        g.tensor(&[e, f, h], scale_for(h)).cast(dtype),
    );
    t.insert(
        "experts.down_proj".into(),
        g.tensor(&[e, h, f], scale_for(f)).cast(dtype),
    );
    if extras.expert_biases {
        if gated {
            t.insert(
                "experts.gate_proj_bias".into(),
                g.tensor(&[e, f], 0.1).cast(dtype),
            );
        }
        t.insert(
            "experts.up_proj_bias".into(),
            g.tensor(&[e, f], 0.1).cast(dtype),
        );
        t.insert(
            "experts.down_proj_bias".into(),
            g.tensor(&[e, h], 0.1).cast(dtype),
        );
    }
    if let Some(fs) = extras.shared_ffn {
        if gated {
            t.insert(
                "shared.gate_proj".into(),
                g.tensor(&[fs, h], scale_for(h)).cast(dtype),
            );
        }
        t.insert(
            "shared.up_proj".into(),
            g.tensor(&[fs, h], scale_for(h)).cast(dtype),
        );
        t.insert(
            "shared.down_proj".into(),
            g.tensor(&[h, fs], scale_for(fs)).cast(dtype),
        );
        if extras.shared_gate {
            t.insert("shared.gate.weight".into(), g.tensor(&[1, h], scale_for(h)));
        }
    }
    MoeLayer::from_tensors(config, t, "synthetic layer")
}

/// A random input `x` `[T, H]` uniform in [-1, 1].
pub fn random_x(t: usize, h: usize, seed: u64) -> Tensor {
    Gen::new(seed ^ 0x5eed_0000_0000_0001).tensor(&[t, h], 1.0)
}
