//! Property tests (proptest): random routing configs, layer shapes and options, run on every
//! available backend and compared with the f64 CPU reference.
//!
//! * `gate_matches_reference`: logits with margins (every within-token rank at least ~0.6·gap
//!   apart, distinct per-token spacings so top-1 scores differ across tokens), every scoring,
//!   groups, capacity kinds and priorities, expert choice, correction bias; ids, kept, counts
//!   exact, weights within float bounds; then permute on the backend's own gate output, which
//!   must equal the CPU permutation exactly (the permutation is canonical given ids and kept).
//! * `layer_matches_reference`: random layers (every activation, dtype, biases, shared expert
//!   with and without its gate); `y` within `common::stage_tolerance`, ids exact where the
//!   reference's decision margins (computed from its f64 logits) are clear of rounding.
//!
//! Decisions whose margin is too small to be decided by f32 arithmetic (e.g. two router logits
//! 1e-5 apart) are not compared exactly; the counts of such skips are printed. Invariants that
//! hold whatever the margins (ids in range and distinct, counts = kept tally, capacity
//! respected, finite outputs) are always checked.
//!
//! `MOE_PROPTEST_CASES` sets the number of cases per property (default 24);
//! `MOE_PROPTEST_SEED` the seed (default fixed, so CI is reproducible). A failure is shrunk and
//! reported as one line per field of the minimal case.

mod common;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::OnceLock;

use moe_kernels::config::{
    Activation, Capacity, ClampedSwiglu, Combine, ExpertChoice, Groups, Priority, RoutingConfig,
    Scoring,
};
use moe_kernels::cpu;
use moe_kernels::cpu::gate::Routing;
use moe_kernels::synth::{random_layer, random_x, Extras, Gen};
use moe_kernels::{Backend, BackendKind, DType, GateBuffers, LayerConfig, PermuteBuffers, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

// ---------------------------------------------------------------------------------------------
// Runner set-up
// ---------------------------------------------------------------------------------------------

fn backends() -> &'static [Backend] {
    static B: OnceLock<Vec<Backend>> = OnceLock::new();
    B.get_or_init(|| common::backends("properties"))
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

fn case_count() -> u32 {
    env_u64("MOE_PROPTEST_CASES").map_or(24, |n| n.clamp(1, u32::MAX as u64) as u32)
}

/// Runs `test` on `cases()` values of `strategy` with a seeded RNG; on failure panics with the
/// shrunk case and the failure message.
fn run_property<S>(name: &str, strategy: S, test: impl Fn(&S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: fmt::Debug,
{
    let seed = env_u64("MOE_PROPTEST_SEED").unwrap_or(0x6d6f_655f_7072_6f70);
    let cases = case_count();
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 400,
        max_shrink_time: 120_000,
        ..Config::default()
    };
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    for (i, b) in name.bytes().enumerate() {
        bytes[8 + i % 24] ^= b;
    }
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let start = std::time::Instant::now();
    let result = runner.run(&strategy, |v| test(&v));
    println!(
        "[{name}] {cases} cases, seed {seed:#x}, {:.1} s",
        start.elapsed().as_secs_f64()
    );
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, minimal)) => panic!(
            "[{name}] property failed (seed {seed:#x}; rerun with MOE_PROPTEST_SEED={seed:#x})\n\
             minimal case:\n{minimal:#?}\nfailure: {why}"
        ),
        Err(TestError::Abort(why)) => panic!("[{name}] aborted: {why}"),
    }
}

/// Fails the case with a message (the `?`-able form of `prop_assert!`).
fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(msg()))
    }
}

fn ok<T>(r: moe_kernels::Result<T>, what: &str) -> Result<T, TestCaseError> {
    r.map_err(|e| TestCaseError::fail(format!("{what}: error {e}")))
}

/// Skip statistics, printed by each property.
struct Stats {
    compared: AtomicUsize,
    tokens_skipped: AtomicUsize,
    tokens_total: AtomicUsize,
    routing_skipped: AtomicUsize,
}

impl Stats {
    const fn new() -> Self {
        Stats {
            compared: AtomicUsize::new(0),
            tokens_skipped: AtomicUsize::new(0),
            tokens_total: AtomicUsize::new(0),
            routing_skipped: AtomicUsize::new(0),
        }
    }

    fn add(c: &AtomicUsize) {
        c.fetch_add(1, AtomicOrdering::Relaxed);
    }

    fn print(&self, name: &str) {
        let get = |c: &AtomicUsize| c.load(AtomicOrdering::Relaxed);
        println!(
            "[{name}] backend runs compared: {}; tokens whose picks are too close to call: {} of \
             {}; capacity/expert-choice batches not compared exactly (cross-token near-ties): {}",
            get(&self.compared),
            get(&self.tokens_skipped),
            get(&self.tokens_total),
            get(&self.routing_skipped),
        );
    }
}

static GATE_STATS: Stats = Stats::new();
static LAYER_STATS: Stats = Stats::new();

// ---------------------------------------------------------------------------------------------
// Routing configs
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Mode {
    Free,
    Capacity(Capacity),
    ExpertChoice(f64),
}

/// Raw draws that [`RoutingCase::new`] turns into a valid config (so shrinking the draws
/// always gives a valid, simpler config).
#[derive(Clone, Copy, Debug)]
struct RoutingDraw {
    t: usize,
    e: usize,
    k_raw: usize,
    scoring: Scoring,
    groups: Option<(u8, u8)>,
    combine: Combine,
    renormalize: bool,
    scale: f64,
    mode: Mode,
    priority: Priority,
    bias: bool,
}

fn routing_draw(max_t: usize, max_e: usize) -> impl Strategy<Value = RoutingDraw> {
    let scoring = prop_oneof![
        Just(Scoring::Softmax),
        Just(Scoring::Sigmoid),
        Just(Scoring::Logits)
    ];
    let combine = prop_oneof![3 => Just(Combine::Score), 1 => Just(Combine::SoftmaxSelected)];
    let scale = prop_oneof![2 => Just(1.0f64), 1 => 0.1f64..4.0];
    let mode = prop_oneof![
        4 => Just(Mode::Free),
        1 => (1i64..40).prop_map(|n| Mode::Capacity(Capacity::Tokens(n))),
        1 => (0.05f64..1.5).prop_map(|f| Mode::Capacity(Capacity::Fraction(f))),
        1 => (0.25f64..2.5).prop_map(|f| Mode::Capacity(Capacity::Factor(f))),
        1 => (0.1f64..3.0).prop_map(Mode::ExpertChoice),
    ];
    let priority = prop_oneof![Just(Priority::Position), Just(Priority::Top1Score)];
    (
        (0..max_t, 1..max_e, 0usize..16, scoring),
        (
            prop::option::weighted(0.3, (any::<u8>(), any::<u8>())),
            combine,
            any::<bool>(),
            scale,
        ),
        (mode, priority, prop::bool::weighted(0.3)),
    )
        .prop_map(
            |(
                (t, e, k_raw, scoring),
                (groups, combine, renormalize, scale),
                (mode, priority, bias),
            )| {
                RoutingDraw {
                    t,
                    e,
                    k_raw,
                    scoring,
                    groups,
                    combine,
                    renormalize,
                    scale,
                    mode,
                    priority,
                    bias,
                }
            },
        )
}

impl RoutingDraw {
    fn config(&self) -> RoutingConfig {
        let e = self.e;
        let k = 1 + self.k_raw % e.min(16);
        let mut c = RoutingConfig {
            top_k: k,
            scoring: self.scoring,
            groups: None,
            combine: self.combine,
            renormalize: self.renormalize,
            scale: self.scale,
            capacity: None,
            priority: self.priority,
            expert_choice: None,
        };
        match self.mode {
            Mode::Free => {}
            Mode::Capacity(cap) => c.capacity = Some(cap),
            Mode::ExpertChoice(f) => {
                c.expert_choice = Some(ExpertChoice { capacity_factor: f });
                c.combine = Combine::Score;
            }
        }
        if let (Some((cs, ks)), None) = (self.groups, c.expert_choice) {
            let divisors: Vec<usize> = (1..=e).filter(|d| e % d == 0).collect();
            let count = divisors[cs as usize % divisors.len()];
            let size = e / count;
            let min_keep = k.div_ceil(size);
            let keep = min_keep + ks as usize % (count - min_keep + 1);
            c.groups = Some(Groups { count, keep });
        }
        c
    }
}

/// One line per setting, for the shrunk-case report.
fn describe_routing(c: &RoutingConfig) -> String {
    let mut s = format!(
        "top_k={} scoring={:?} combine={:?} renormalize={} scale={}",
        c.top_k, c.scoring, c.combine, c.renormalize, c.scale
    );
    if let Some(g) = c.groups {
        s += &format!(" groups={}/keep {}", g.count, g.keep);
    }
    if let Some(cap) = c.capacity {
        s += &format!(" capacity={cap:?} priority={:?}", c.priority);
    }
    if let Some(ec) = c.expert_choice {
        s += &format!(" expert_choice(factor {})", ec.capacity_factor);
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Decision margins
// ---------------------------------------------------------------------------------------------

/// Scores and selection values of one token, f64, as the reference computes them.
struct TokenValues {
    s: Vec<f64>,
    c: Vec<f64>,
}

fn token_values(logits: &[f64], bias: Option<&[f64]>, scoring: Scoring) -> TokenValues {
    let s = cpu::gate::scores(logits, scoring);
    let c = match bias {
        Some(b) => s.iter().zip(b).map(|(x, y)| x + y).collect(),
        None => s.clone(),
    };
    TokenValues { s, c }
}

/// How far apart two scores must be for f32 arithmetic (and a backend's f32 router) to agree
/// with the f64 reference on their order: about 1e-4 in logit units.
fn score_tol(scoring: Scoring, a: f64, b: f64) -> f64 {
    let m = a.abs().max(b.abs());
    match scoring {
        // Relative: softmax errors scale with the value (1e-4 relative = 1e-4 in logits); the
        // floor covers f32 underflow.
        Scoring::Softmax => 1e-4 * m + 1e-30,
        Scoring::Sigmoid => 2e-5,
        Scoring::Logits => 1e-4 * m.max(1.0),
    }
}

/// Whether selection values `i` and `j` of a token are clearly ordered.
fn clear(v: &TokenValues, scoring: Scoring, i: usize, j: usize) -> bool {
    let (ci, cj) = (v.c[i], v.c[j]);
    let tol = score_tol(scoring, v.s[i], v.s[j]) + 3e-7 * ci.abs().max(cj.abs());
    (ci - cj).abs() > tol
}

/// `(set_ok, order_ok)` of one token: whether its eligible groups and its set of picks are
/// clear of near-ties, and whether the order of its picks is too.
fn token_margins(v: &TokenValues, cfg: &RoutingConfig, slots: usize) -> (bool, bool) {
    let e = v.c.len();
    let mut set_ok = true;
    let eligible: Vec<usize> = match cfg.groups {
        None => (0..e).collect(),
        Some(g) => {
            let size = e / g.count;
            // (group, score, tolerance of the score)
            let mut gs: Vec<(usize, f64, f64)> = (0..g.count)
                .map(|gi| {
                    let members: Vec<usize> = (gi * size..(gi + 1) * size).collect();
                    let top = cpu::top_n(&members, 2, |i| v.c[i]);
                    let score: f64 = top.iter().map(|&i| v.c[i]).sum();
                    let tol: f64 = top
                        .iter()
                        .map(|&i| score_tol(cfg.scoring, v.s[i], v.s[i]) + 3e-7 * v.c[i].abs())
                        .sum();
                    (gi, score, tol)
                })
                .collect();
            gs.sort_by(|a, b| cpu::rank_cmp(b.1, a.1).then(a.0.cmp(&b.0)));
            if g.keep < g.count {
                let (a, b) = (gs[g.keep - 1], gs[g.keep]);
                set_ok &= (a.1 - b.1).abs() > 2.0 * (a.2 + b.2);
            }
            let mut kept: Vec<usize> = gs[..g.keep].iter().map(|x| x.0).collect();
            kept.sort_unstable();
            kept.iter()
                .flat_map(|&gi| gi * size..(gi + 1) * size)
                .collect()
        }
    };
    let order = cpu::top_n(&eligible, eligible.len(), |i| v.c[i]);
    if slots < order.len() {
        set_ok &= clear(v, cfg.scoring, order[slots - 1], order[slots]);
    }
    let mut order_ok = set_ok;
    for j in 0..slots.min(order.len()).saturating_sub(1) {
        order_ok &= clear(v, cfg.scoring, order[j], order[j + 1]);
    }
    (set_ok, order_ok)
}

/// The near-tied adjacent pairs (by expert) among a token's first `slots + 1` eligible ranks,
/// or `None` when its eligible groups are themselves near-tied.
fn near_pairs(v: &TokenValues, cfg: &RoutingConfig, slots: usize) -> Option<Vec<(usize, usize)>> {
    let e = v.c.len();
    let eligible: Vec<usize> = match cfg.groups {
        None => (0..e).collect(),
        Some(_) => {
            let (set_ok, _) = token_margins(v, cfg, slots);
            if !set_ok {
                // Could be the group boundary; be conservative.
                return None;
            }
            // Groups are clear: the eligible experts are those the reference ranks among any
            // kept group, which the c-order over all experts restricted to kept groups gives.
            let g = cfg.groups.expect("groups");
            let size = e / g.count;
            let mut gs: Vec<(usize, f64)> = (0..g.count)
                .map(|gi| {
                    let members: Vec<usize> = (gi * size..(gi + 1) * size).collect();
                    let top = cpu::top_n(&members, 2, |i| v.c[i]);
                    (gi, top.iter().map(|&i| v.c[i]).sum())
                })
                .collect();
            gs.sort_by(|a, b| cpu::rank_cmp(b.1, a.1).then(a.0.cmp(&b.0)));
            gs[..g.keep]
                .iter()
                .flat_map(|x| x.0 * size..(x.0 + 1) * size)
                .collect()
        }
    };
    let order = cpu::top_n(&eligible, (slots + 1).min(eligible.len()), |i| v.c[i]);
    Some(
        order
            .windows(2)
            .filter(|w| !clear(v, cfg.scoring, w[0], w[1]))
            .map(|w| (w[0], w[1]))
            .collect(),
    )
}

/// The reference's capacity rule (DESIGN.md section 1) on given ids and token order.
fn capacity_kept(ids: &[u32], order: &[usize], slots: usize, e: usize, cap: usize) -> Vec<bool> {
    let mut position = vec![0usize; e];
    let mut kept = vec![false; ids.len()];
    for j in 0..slots {
        for &t in order {
            let i = t * slots + j;
            let ex = ids[i] as usize;
            kept[i] = position[ex] < cap;
            position[ex] += 1;
        }
    }
    kept
}

/// Margins of a whole batch.
struct Margins {
    set_ok: Vec<bool>,
    order_ok: Vec<bool>,
    /// Cross-token decisions (capacity order, expert choice) are clear, and so is every
    /// token's order when capacity depends on it.
    routing_ok: bool,
}

fn margins(
    logits: &[f64],
    t: usize,
    e: usize,
    bias: Option<&[f64]>,
    cfg: &RoutingConfig,
    reference: &Routing,
) -> Margins {
    let slots = cfg.slots(e);
    let values: Vec<TokenValues> = (0..t)
        .map(|ti| token_values(&logits[ti * e..(ti + 1) * e], bias, cfg.scoring))
        .collect();
    let (set_ok, order_ok): (Vec<bool>, Vec<bool>) =
        values.iter().map(|v| token_margins(v, cfg, slots)).unzip();
    let mut routing_ok = true;
    if let Some(ec) = cfg.expert_choice {
        // Only the boundary between each expert's C-th and (C+1)-th token matters.
        let cap = ((ec.capacity_factor * t as f64 / e as f64).ceil() as usize).min(t);
        if cap > 0 && cap < t {
            for ei in 0..e {
                let all: Vec<usize> = (0..t).collect();
                let order = cpu::top_n(&all, cap + 1, |ti| values[ti].c[ei]);
                let (a, b) = (&values[order[cap - 1]], &values[order[cap]]);
                let tol = score_tol(cfg.scoring, a.s[ei], b.s[ei])
                    + 3e-7 * a.c[ei].abs().max(b.c[ei].abs());
                routing_ok &= (a.c[ei] - b.c[ei]).abs() > tol;
            }
        }
    } else if let Some(capacity) = cfg.capacity {
        // A token whose picks are near-tied is not compared itself; the others still are when
        // no alternative resolution of its near-ties changes their kept flags.
        let cap = capacity.tokens_per_expert(t, slots, e);
        let top1: Vec<f64> = (0..t)
            .map(|ti| values[ti].s[reference.topk_ids[ti * slots] as usize])
            .collect();
        let mut order: Vec<usize> = (0..t).collect();
        if cfg.priority == Priority::Top1Score {
            order.sort_by(|&a, &b| cpu::rank_cmp(top1[b], top1[a]));
        }
        for ti in (0..t).filter(|&ti| !order_ok[ti]) {
            match near_pairs(&values[ti], cfg, slots) {
                None => routing_ok = false,
                Some(pairs) => {
                    for (a, b) in pairs {
                        let mut ids = reference.topk_ids.clone();
                        let row = &mut ids[ti * slots..(ti + 1) * slots];
                        let pa = row.iter().position(|&x| x as usize == a);
                        let pb = row.iter().position(|&x| x as usize == b);
                        match (pa, pb) {
                            (Some(i), Some(j)) => row.swap(i, j),
                            (Some(i), None) => row[i] = b as u32,
                            (None, Some(j)) => row[j] = a as u32,
                            (None, None) => {}
                        }
                        let alt = capacity_kept(&ids, &order, slots, e, cap);
                        let same_for_others = (0..t * slots)
                            .filter(|i| i / slots != ti)
                            .all(|i| alt[i] == reference.kept[i]);
                        routing_ok &= same_for_others;
                    }
                }
            }
        }
        if cfg.priority == Priority::Top1Score && routing_ok {
            // Tokens in priority order; a near-tie between two tokens matters only when they
            // claim the same expert in the same slot and the capacity boundary lies between.
            let top1: Vec<f64> = (0..t)
                .map(|ti| values[ti].s[reference.topk_ids[ti * slots] as usize])
                .collect();
            let mut order: Vec<usize> = (0..t).collect();
            order.sort_by(|&a, &b| cpu::rank_cmp(top1[b], top1[a]));
            let mut start = 0;
            while start < order.len() {
                let mut end = start + 1;
                while end < order.len() {
                    let (a, b) = (top1[order[end - 1]], top1[order[end]]);
                    if (a - b).abs() > score_tol(cfg.scoring, a, b) {
                        break;
                    }
                    end += 1;
                }
                let cluster = &order[start..end];
                for (x, &ta) in cluster.iter().enumerate() {
                    for &tb in &cluster[x + 1..] {
                        for j in 0..slots {
                            let (ia, ib) = (ta * slots + j, tb * slots + j);
                            if reference.topk_ids[ia] == reference.topk_ids[ib]
                                && reference.kept[ia] != reference.kept[ib]
                            {
                                routing_ok = false;
                            }
                        }
                    }
                }
                start = end;
            }
        }
    }
    Margins {
        set_ok,
        order_ok,
        routing_ok,
    }
}

// ---------------------------------------------------------------------------------------------
// Checks shared by both properties
// ---------------------------------------------------------------------------------------------

/// What holds whatever the margins: ids in range and distinct per token, kept is 0/1, dropped
/// weights are 0, counts tally the kept assignments, capacity is respected.
#[allow(clippy::too_many_arguments)]
fn check_invariants(
    ctx: &str,
    ids: &[u32],
    weights: &[f32],
    kept: &[u32],
    counts: &[u32],
    t: usize,
    e: usize,
    cfg: &RoutingConfig,
) -> Result<(), TestCaseError> {
    let slots = cfg.slots(e);
    ensure(ids.len() == t * slots, || {
        format!("{ctx}: ids length {}", ids.len())
    })?;
    let mut tally = vec![0u32; e];
    for ti in 0..t {
        let row = &ids[ti * slots..(ti + 1) * slots];
        ensure(row.iter().all(|&i| (i as usize) < e), || {
            format!("{ctx}: token {ti}: id out of range: {row:?}")
        })?;
        let mut sorted = row.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        ensure(sorted.len() == slots, || {
            format!("{ctx}: token {ti}: repeated expert: {row:?}")
        })?;
        for j in 0..slots {
            let i = ti * slots + j;
            ensure(kept[i] <= 1, || format!("{ctx}: kept[{i}] = {}", kept[i]))?;
            if kept[i] == 1 {
                tally[ids[i] as usize] += 1;
            } else {
                ensure(weights[i] == 0.0, || {
                    format!("{ctx}: dropped assignment {i} has weight {}", weights[i])
                })?;
            }
            ensure(weights[i].is_finite(), || {
                format!("{ctx}: weight[{i}] = {}", weights[i])
            })?;
        }
    }
    ensure(tally == counts, || {
        format!("{ctx}: counts {counts:?} differ from the kept tally {tally:?}")
    })?;
    let cap = match (cfg.capacity, cfg.expert_choice) {
        (Some(c), _) => Some(c.tokens_per_expert(t, slots, e)),
        (_, Some(ec)) => Some(((ec.capacity_factor * t as f64 / e as f64).ceil() as usize).min(t)),
        _ => None,
    };
    if let Some(cap) = cap {
        ensure(counts.iter().all(|&n| n as usize <= cap), || {
            format!("{ctx}: capacity {cap} exceeded: {counts:?}")
        })?;
    }
    if cfg.capacity.is_none() && cfg.expert_choice.is_none() {
        ensure(kept.iter().all(|&k| k == 1), || {
            format!("{ctx}: dropped without capacity")
        })?;
    }
    Ok(())
}

/// Condition number of a token's renormalization: `Σ|w| / |Σw|` of its reference weights (1
/// unless weights can be negative, i.e. raw logits as scores). Renormalizing logits that sum
/// to almost 0 amplifies any f32 rounding by this factor, so such tokens are not held to the
/// f32 bounds (they are not bugs: the f64 reference is just as sensitive to its inputs).
fn renorm_condition(w: &[f64], cfg: &RoutingConfig) -> f64 {
    if !cfg.renormalize || cfg.scale == 0.0 {
        return 1.0;
    }
    w.iter().map(|x| x.abs()).sum::<f64>() / cfg.scale.abs()
}

fn close(a: f32, b: f64, rtol: f64, atol: f64) -> bool {
    (f64::from(a) - b).abs() <= rtol * b.abs() + atol
}

/// Compares a backend's routing with the reference where the margins allow.
#[allow(clippy::too_many_arguments)]
fn compare_routing(
    ctx: &str,
    ids: &[u32],
    weights: &[f32],
    kept: &[u32],
    counts: &[u32],
    reference: &Routing,
    m: &Margins,
    cfg: &RoutingConfig,
    stats: &Stats,
) -> Result<(), TestCaseError> {
    let (t, slots) = (reference.tokens, reference.slots);
    let atol = 1e-6 * cfg.scale.abs();
    let rtol = 1e-4;
    let row = |v: &[u32], ti: usize| v[ti * slots..(ti + 1) * slots].to_vec();
    let ec = cfg.expert_choice.is_some();
    let cap = cfg.capacity.is_some();
    for ti in 0..t {
        Stats::add(&stats.tokens_total);
        if !m.order_ok[ti] {
            Stats::add(&stats.tokens_skipped);
            continue;
        }
        ensure(row(ids, ti) == row(&reference.topk_ids, ti), || {
            format!(
                "{ctx}: token {ti}: ids {:?}, reference {:?}",
                row(ids, ti),
                row(&reference.topk_ids, ti)
            )
        })?;
        if !cap
            && !ec
            && renorm_condition(&reference.topk_weights[ti * slots..(ti + 1) * slots], cfg) <= 100.0
        {
            for j in 0..slots {
                let i = ti * slots + j;
                ensure(
                    close(weights[i], reference.topk_weights[i], rtol, atol),
                    || {
                        format!(
                            "{ctx}: token {ti} slot {j}: weight {} vs reference {}",
                            weights[i], reference.topk_weights[i]
                        )
                    },
                )?;
            }
        }
    }
    if !(cap || ec) {
        if m.set_ok.iter().all(|&x| x) {
            ensure(counts == reference.counts.as_slice(), || {
                format!("{ctx}: counts {counts:?}, reference {:?}", reference.counts)
            })?;
        }
        return Ok(());
    }
    if !m.routing_ok {
        Stats::add(&stats.routing_skipped);
        return Ok(());
    }
    if cap && m.order_ok.iter().all(|&x| x) || ec {
        ensure(counts == reference.counts.as_slice(), || {
            format!("{ctx}: counts {counts:?}, reference {:?}", reference.counts)
        })?;
    }
    // Kept and weights per (token, expert), so that a near-tie in one token's slot order
    // (expert choice lists all E experts) does not hide the rest.
    for ti in 0..t {
        if cap && !m.order_ok[ti] {
            continue;
        }
        let mut ours: Vec<(u32, u32, f32)> = (0..slots)
            .map(|j| {
                let i = ti * slots + j;
                (ids[i], kept[i], weights[i])
            })
            .collect();
        let mut theirs: Vec<(u32, bool, f64)> = (0..slots)
            .map(|j| {
                let i = ti * slots + j;
                (
                    reference.topk_ids[i],
                    reference.kept[i],
                    reference.topk_weights[i],
                )
            })
            .collect();
        ours.sort_by_key(|x| x.0);
        theirs.sort_by_key(|x| x.0);
        for (o, r) in ours.iter().zip(&theirs) {
            ensure(o.0 == r.0 && (o.1 == 1) == r.1, || {
                format!(
                    "{ctx}: token {ti} expert {}: kept {} vs reference expert {} kept {}",
                    o.0, o.1, r.0, r.1
                )
            })?;
            let cond = renorm_condition(&reference.topk_weights[ti * slots..(ti + 1) * slots], cfg);
            ensure(cond > 100.0 || close(o.2, r.2, rtol, atol), || {
                format!(
                    "{ctx}: token {ti} expert {}: weight {} vs reference {}",
                    o.0, o.2, r.2
                )
            })?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Gate-level property
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct GateCase {
    draw: RoutingDraw,
    seed: u64,
}

impl fmt::Debug for GateCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.draw;
        writeln!(f, "  T={} E={}", d.t, d.e)?;
        writeln!(f, "  routing: {}", describe_routing(&d.config()))?;
        writeln!(f, "  correction_bias={} seed={:#x}", d.bias, self.seed)
    }
}

/// Logits `[T, E]` with margins: token t ranks its experts by a random permutation, logit =
/// `step_t · (rank + u[rank] − E/2)` with `u[rank] ∈ [0, 0.4)` shared by every token (so group
/// sums do not tie exactly) and `step_t` distinct per token (so top-1 scores differ across
/// tokens). Adjacent logits of a token are ≥ 0.6·gap apart.
fn margin_logits(g: &mut Gen, t: usize, e: usize, gap: f32) -> Vec<f32> {
    let jitter: Vec<f32> = g.uniform(e, 0.2).iter().map(|u| u + 0.2).collect();
    let step_rank = g.permutation(t);
    let mut out = Vec::with_capacity(t * e);
    for &sr in &step_rank {
        let ranks = g.permutation(e);
        let step = gap * (1.0 + 0.25 * sr as f32 / t.max(1) as f32);
        out.extend(
            ranks
                .iter()
                .map(|&r| step * (r as f32 + jitter[r] - e as f32 / 2.0)),
        );
    }
    out
}

/// Correction bias `[E]` on a coarse grid (multiples of more than the score range), so that
/// `s + bias` keeps the margins of `s`.
fn grid_bias(g: &mut Gen, e: usize, scoring: Scoring, logit_range: f32) -> Vec<f32> {
    let quantum = match scoring {
        Scoring::Softmax | Scoring::Sigmoid => 1.5,
        Scoring::Logits => logit_range + 1.0,
    };
    (0..e).map(|_| quantum * g.below(0, 4) as f32).collect()
}

fn check_gate(case: &GateCase) -> Result<(), TestCaseError> {
    let d = &case.draw;
    let (t, e) = (d.t, d.e);
    let cfg = d.config();
    let slots = cfg.slots(e);
    let mut g = Gen::new(case.seed);
    // Keep sigmoid out of saturation: logits within about ±6.
    let gap = 0.05f32.min(8.0 / e as f32);
    let logits = margin_logits(&mut g, t, e, gap);
    let bias = d
        .bias
        .then(|| grid_bias(&mut g, e, d.scoring, 1.25 * gap * (e as f32 + 1.0)));
    let bias_t = bias
        .as_ref()
        .map(|b| Tensor::from_f32(vec![e], b.clone()).expect("bias"));
    let bias64 = bias.as_deref().map(common::wide);
    let l64 = common::wide(&logits);
    let reference = cpu::gate::gate(&l64, t, e, bias64.as_deref(), &cfg)
        .map_err(|err| TestCaseError::fail(format!("reference gate: {err}")))?;
    let m = margins(&l64, t, e, bias64.as_deref(), &cfg, &reference);
    let x = Gen::new(case.seed ^ 0xabcd).tensor(&[t, 3], 1.0);
    for dev in backends() {
        let ctx = format!("{} gate", dev.kind());
        let mut out = GateBuffers::poisoned(t, slots, e);
        ok(dev.gate(&logits, bias_t.as_ref(), &cfg, &mut out), &ctx)?;
        check_invariants(
            &ctx,
            &out.topk_ids,
            &out.topk_weights,
            &out.kept,
            &out.counts,
            t,
            e,
            &cfg,
        )?;
        compare_routing(
            &ctx,
            &out.topk_ids,
            &out.topk_weights,
            &out.kept,
            &out.counts,
            &reference,
            &m,
            &cfg,
            &GATE_STATS,
        )?;
        Stats::add(&GATE_STATS.compared);
        // Permute on the backend's own routing: canonical, so exactly the CPU's.
        let kept: Vec<bool> = out.kept.iter().map(|&k| k == 1).collect();
        let p = cpu::permute::permute(&out.topk_ids, &kept, e)
            .map_err(|err| TestCaseError::fail(format!("cpu permute: {err}")))?;
        let xp = cpu::permute::gather(&x, slots, &p).expect("gather");
        let mut perm = PermuteBuffers::poisoned(t, slots, e, 3);
        ok(dev.permute(&out, &x, &mut perm), &format!("{ctx} permute"))?;
        ensure(perm.expert_offsets == p.expert_offsets, || {
            format!(
                "{ctx}: expert_offsets {:?} vs cpu {:?}",
                perm.expert_offsets, p.expert_offsets
            )
        })?;
        ensure(perm.sorted_assignment == p.sorted_assignment, || {
            format!("{ctx}: sorted_assignment differs from the cpu's")
        })?;
        ensure(perm.row_of_assignment == p.row_of_assignment, || {
            format!("{ctx}: row_of_assignment differs from the cpu's")
        })?;
        let rows = p.kept_rows() * 3;
        ensure(
            perm.x_perm[..rows]
                .iter()
                .zip(&xp[..rows])
                .all(|(a, b)| f64::from(*a) == *b),
            || format!("{ctx}: x_perm (kept rows) is not the exact gather"),
        )?;
    }
    Ok(())
}

#[test]
fn gate_matches_reference() {
    backends();
    let strategy =
        (routing_draw(600, 300), any::<u64>()).prop_map(|(draw, seed)| GateCase { draw, seed });
    run_property("gate property", strategy, check_gate);
    GATE_STATS.print("gate property");
}

// ---------------------------------------------------------------------------------------------
// Layer-level property
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct LayerCase {
    draw: RoutingDraw,
    h: usize,
    f: usize,
    activation: Activation,
    dtype: DType,
    router_bias: bool,
    expert_biases: bool,
    shared: Option<(usize, bool)>,
    output_scale: f64,
    seed: u64,
}

impl fmt::Debug for LayerCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.draw;
        writeln!(f, "  T={} E={} H={} F={}", d.t, d.e, self.h, self.f)?;
        writeln!(f, "  routing: {}", describe_routing(&d.config()))?;
        writeln!(
            f,
            "  activation={:?} dtype={} output_scale={}",
            self.activation, self.dtype, self.output_scale
        )?;
        writeln!(
            f,
            "  router_bias={} score_correction_bias={} expert_biases={} shared={}",
            self.router_bias,
            d.bias,
            self.expert_biases,
            match self.shared {
                None => "none".to_string(),
                Some((fs, gate)) => format!("Fs={fs} gate={gate}"),
            }
        )?;
        writeln!(f, "  seed={:#x}", self.seed)
    }
}

fn layer_case() -> impl Strategy<Value = LayerCase> {
    let activation = prop_oneof![
        Just(Activation::Swiglu),
        Just(Activation::Geglu),
        Just(Activation::Relu),
        Just(Activation::Gelu),
        (0.5f64..8.0).prop_map(|limit| Activation::ClampedSwiglu(ClampedSwiglu {
            alpha: 1.702,
            limit
        })),
    ];
    let dtype = prop_oneof![
        2 => Just(DType::F32),
        1 => Just(DType::F16),
        1 => Just(DType::BF16)
    ];
    let output_scale = prop_oneof![2 => Just(1.0f64), 1 => 0.25f64..2.0];
    (
        routing_draw(600, 300),
        (0usize..24, 0usize..24, activation, dtype),
        (
            any::<bool>(),
            any::<bool>(),
            prop::option::weighted(0.3, (0usize..24, any::<bool>())),
            output_scale,
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                draw,
                (h2, f2, activation, dtype),
                (router_bias, expert_biases, shared, output_scale, seed),
            )| {
                LayerCase {
                    draw,
                    h: 2 * h2 + 1,
                    f: 2 * f2 + 1,
                    activation,
                    dtype,
                    router_bias,
                    expert_biases,
                    shared: shared.map(|(fs2, gate)| (2 * fs2 + 1, gate)),
                    output_scale,
                    seed,
                }
            },
        )
}

/// Relative L2 over the rows `keep` of `[T, H]` outputs.
fn rel_l2_rows(a: &[f32], b: &[f64], h: usize, keep: &[bool]) -> f64 {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (ti, &k) in keep.iter().enumerate() {
        if k {
            x.extend_from_slice(&a[ti * h..(ti + 1) * h]);
            y.extend_from_slice(&b[ti * h..(ti + 1) * h]);
        }
    }
    common::rel_l2(&x, &y)
}

fn check_layer(case: &LayerCase) -> Result<(), TestCaseError> {
    let d = &case.draw;
    let (t, e, h) = (d.t, d.e, case.h);
    let config = LayerConfig {
        preset: None,
        routing: d.config(),
        activation: case.activation,
        output_scale: case.output_scale,
    };
    let extras = Extras {
        router_bias: case.router_bias,
        score_correction_bias: d.bias,
        expert_biases: case.expert_biases,
        shared_ffn: case.shared.map(|s| s.0),
        shared_gate: case.shared.is_some_and(|s| s.1),
    };
    let layer = random_layer(config, e, h, case.f, extras, case.dtype, case.seed)
        .map_err(|err| TestCaseError::fail(format!("random_layer: {err}")))?;
    let x = random_x(t, h, case.seed.wrapping_add(1));
    let reference = layer
        .forward_reference(&x)
        .map_err(|err| TestCaseError::fail(format!("reference: {err}")))?;
    let logits = cpu::router::router_logits(&x, &layer.router_weight, layer.router_bias.as_ref())
        .expect("router logits");
    let bias = layer.score_correction_bias.as_ref().map(Tensor::to_f64_vec);
    let cfg = &layer.config.routing;
    let m = margins(&logits, t, e, bias.as_deref(), cfg, &reference.routing);
    let free = cfg.capacity.is_none() && cfg.expert_choice.is_none();
    for dev in backends() {
        let ctx = format!("{} layer", dev.kind());
        let out = ok(layer.forward(dev, &x), &ctx)?;
        ensure(out.y.len() == t * h, || {
            format!("{ctx}: y length {}", out.y.len())
        })?;
        check_invariants(
            &ctx,
            &out.topk_ids,
            &out.topk_weights,
            &out.kept,
            &out.counts,
            t,
            e,
            cfg,
        )?;
        ensure(out.y.iter().all(|v| v.is_finite()), || {
            format!("{ctx}: non-finite y")
        })?;
        compare_routing(
            &ctx,
            &out.topk_ids,
            &out.topk_weights,
            &out.kept,
            &out.counts,
            &reference.routing,
            &m,
            cfg,
            &LAYER_STATS,
        )?;
        Stats::add(&LAYER_STATS.compared);
        // y: every row whose set of picks is clear (token-choice without capacity), or all
        // rows when the batch's routing is clear.
        let rows: Vec<bool> = if free {
            m.set_ok.clone()
        } else if m.routing_ok && cfg.capacity.is_some() {
            m.order_ok.clone()
        } else if m.routing_ok {
            vec![true; t]
        } else {
            vec![false; t]
        };
        let slots = reference.routing.slots;
        let rows: Vec<bool> = (0..t)
            .map(|ti| {
                rows[ti]
                    && renorm_condition(
                        &reference.routing.topk_weights[ti * slots..(ti + 1) * slots],
                        cfg,
                    ) <= 20.0
            })
            .collect();
        let tol = common::stage_tolerance(dev.kind(), case.dtype);
        let err = rel_l2_rows(&out.y, &reference.y, h, &rows);
        ensure(err <= tol, || {
            let worst = (0..t)
                .filter(|&ti| rows[ti])
                .map(|ti| {
                    let one = [true];
                    let e = rel_l2_rows(
                        &out.y[ti * h..(ti + 1) * h],
                        &reference.y[ti * h..(ti + 1) * h],
                        h,
                        &one,
                    );
                    (ti, e)
                })
                .max_by(|a, b| a.1.total_cmp(&b.1));
            format!("{ctx}: y rel L2 {err:e} > {tol:e} (worst row {worst:?})")
        })?;
        if dev.kind() == BackendKind::Cpu {
            // The staged CPU backend is the reference with f32 stage boundaries.
            ensure(err <= 2e-5, || format!("{ctx}: cpu y rel L2 {err:e}"))?;
        }
    }
    Ok(())
}

#[test]
fn layer_matches_reference() {
    backends();
    run_property("layer property", layer_case(), check_layer);
    LAYER_STATS.print("layer property");
}
