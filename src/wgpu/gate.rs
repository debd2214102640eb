//! Stage 1 on wgpu: fused scoring, selection and weights (shaders/gate.wgsl).
//!
//! The common path (no capacity) is one workgroup per token plus a two-pass, atomic-free
//! count of the assignments per expert. Capacity adds the batch-wide GShard counting (block
//! counts, per-expert exclusive scan, positions inside each block) and, for top-1-score
//! priority, a rank of every token; expert choice finds each expert's top-C tokens by
//! bisection on order-preserving keys. All passes are recorded into the caller's encoder.

use crate::config::{Combine, Priority, RoutingConfig, Scoring};
use crate::error::{Error, Result};
use crate::limits::{self, Resource};
use crate::stage::Stage;
use crate::wgpu::act;
use crate::wgpu::context::{index_u32, within, GpuBuffer, WgpuDevice, WG};
use crate::wgpu::kernels::Kernel;
use crate::wgpu::scratch::Scratch;
use crate::wgpu::GateGpu;

/// Entry points of shaders/gate.wgsl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    /// One workgroup per token: scores, groups, picks, raw (or, without capacity, final)
    /// weights.
    Select,
    /// [`Entry::Select`] with one invocation per token (at most [`LANE_SLOTS`] slots, at
    /// most 32 groups, no expert choice): no reduction trees.
    SelectLanes,
    /// [`Entry::Select`] from the gate module of devices with subgroups (its two workgroup
    /// reductions from shaders/gate_subgroups.wgsl): the same bits, fewer barriers.
    SelectSubgroups,
    /// One invocation per token: its priority position by top-1 score.
    Priority,
    /// One workgroup per (slot, block of tokens): assignments per expert.
    BlockCounts,
    /// One workgroup per expert: counts, and the exclusive offsets of the blocks.
    BlockScan,
    /// One workgroup per (slot, block): kept flags under capacity.
    Capacity,
    /// One workgroup per expert: the expert-choice threshold.
    ExpertChoice,
    /// One invocation per token: kept masking, renormalisation and scale.
    Finish,
}

impl Entry {
    /// The entry point's name in the shader.
    pub fn name(self) -> &'static str {
        match self {
            Entry::Select | Entry::SelectSubgroups => "gate_select",
            Entry::SelectLanes => "gate_select_lanes",
            Entry::Priority => "gate_priority",
            Entry::BlockCounts => "gate_block_counts",
            Entry::BlockScan => "gate_block_scan",
            Entry::Capacity => "gate_capacity",
            Entry::ExpertChoice => "gate_expert_choice",
            Entry::Finish => "gate_finish",
        }
    }

    /// The bindings of group 0 the entry point uses (the header of gate.wgsl lists them).
    fn bindings(self) -> &'static [u32] {
        match self {
            Entry::Select | Entry::SelectLanes | Entry::SelectSubgroups => &[0, 1, 2, 3, 4, 5, 7],
            Entry::Priority => &[0, 7],
            Entry::BlockCounts => &[0, 3, 7],
            Entry::BlockScan | Entry::ExpertChoice => &[0, 6, 7],
            Entry::Capacity => &[0, 3, 5, 7],
            Entry::Finish => &[0, 3, 4, 5, 7],
        }
    }
}

/// Tokens per block of the capacity counting (`BLOCK` in gate.wgsl).
const BLOCK: usize = 256;
/// f32 words of gate_select's workgroup row cache (`CACHE` in gate.wgsl).
const CACHE: usize = 2048;
/// The most slots gate_select_lanes takes (`LANE_SLOTS` in gate.wgsl).
pub const LANE_SLOTS: usize = 8;
/// The most groups gate_select_lanes takes (one bit each).
const LANE_GROUPS: usize = 32;
/// Experts per staged block of gate_select_lanes (`LT` in gate.wgsl).
const LANE_BLOCK: usize = 32;

const MODE_PLAIN: u32 = 0;
const MODE_CAPACITY: u32 = 1;
const MODE_EXPERT_CHOICE: u32 = 2;

/// `GateParams` of gate.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    tokens: u32,
    experts: u32,
    slots: u32,
    groups: u32,
    keep: u32,
    group_size: u32,
    scoring: u32,
    combine: u32,
    has_bias: u32,
    renormalize: u32,
    mode: u32,
    by_top1: u32,
    capacity: u32,
    blocks: u32,
    use_rank: u32,
    use_global: u32,
    row_len: u32,
    top1_off: u32,
    order_off: u32,
    blk_off: u32,
    ec_key_off: u32,
    ec_sel_off: u32,
    scale: f32,
    nan: f32,
    neg_inf: f32,
    _pad: [u32; 3],
}

/// lavapipe (llvmpipe) ends a shader invocation after this many loop iterations, counted over
/// all its loops together (`LP_MAX_TGSI_LOOP_ITERATIONS` in Mesa's gallivm): past it the
/// results would be silently wrong, so such launches are refused there.
const LAVAPIPE_LOOP_LIMIT: usize = 65535;

/// An upper bound on the loop iterations of one invocation, over the passes of this launch
/// (mirrors the loops of gate.wgsl).
fn loop_iterations(
    (tokens, experts, slots): (usize, usize, usize),
    (groups, group_size): (usize, usize),
    mode: u32,
    by_top1: bool,
    (use_rank, lanes): (bool, bool),
) -> usize {
    let wg = WG as usize;
    let per_inv = experts.div_ceil(wg);
    let trees = 2 * 6 + 12;
    let grouping = groups.div_ceil(wg) * (group_size + groups);
    let picking = if use_rank {
        per_inv * (experts / 4 + 4)
    } else {
        slots * (per_inv + 7)
    };
    // Invocation 0 sums the softmax's exponentials over E.
    let mut select = 3 * per_inv + experts + trees + grouping + picking + 6 * slots;
    if lanes {
        // Four passes over the staged blocks (32 load rows and 32 experts each), the group
        // ranking and the epilogue.
        select = 4 * experts.div_ceil(LANE_BLOCK) * (32 + LANE_BLOCK)
            + groups * (groups + 1)
            + 6 * slots;
    }
    let blocks = tokens.div_ceil(BLOCK);
    let mut most = select;
    match mode {
        MODE_EXPERT_CHOICE => {
            most = most.max(65 * (tokens.div_ceil(wg) + 7)).max(3 * slots);
        }
        _ => {
            let counting = BLOCK / wg + per_inv * BLOCK;
            let scan = wg + 2 * (slots * blocks).div_ceil(wg);
            most = most.max(counting).max(scan);
            if mode == MODE_CAPACITY {
                most = most.max(BLOCK / wg * (BLOCK + 1)).max(2 * slots);
                if by_top1 {
                    most = most.max(tokens.div_ceil(wg) * (wg + 1));
                }
            }
        }
    }
    most
}

fn too_large(what: &str) -> Error {
    Error::Limit {
        backend: crate::BackendKind::Wgpu,
        resource: Resource::IndexRange,
        what: format!("{}: {what}", Stage::Gate),
        need: u64::MAX,
        limit: u64::from(u32::MAX),
    }
}

fn to_u32(v: usize, what: &str) -> Result<u32> {
    index_u32(Stage::Gate, what, v)
}

/// Records the gate on `logits` `[T, E]` into `out` (`[T, slots]`, counts `[E]`). Every buffer
/// may be larger than needed (a workspace for more tokens); launches are sized from `tokens`.
/// Allocates nothing: the uniform, the gate's scratch and the dummy bias come from `scratch`.
#[allow(clippy::too_many_arguments)]
pub fn encode(
    dev: &WgpuDevice,
    enc: &mut ::wgpu::CommandEncoder,
    scratch: &Scratch,
    logits: &GpuBuffer<f32>,
    tokens: usize,
    experts: usize,
    bias: Option<&GpuBuffer<f32>>,
    cfg: &RoutingConfig,
    out: &GateGpu,
) -> Result<()> {
    encode_with(
        dev,
        enc,
        scratch,
        (logits, tokens, experts),
        bias,
        cfg,
        out,
        false,
    )
}

/// [`encode`], optionally forcing gate_select's row into the scratch buffer (the path taken
/// when E + 2G exceeds the workgroup cache), so that tests can reach it with small E.
#[allow(clippy::too_many_arguments)]
fn encode_with(
    dev: &WgpuDevice,
    enc: &mut ::wgpu::CommandEncoder,
    pool: &Scratch,
    (logits, tokens, experts): (&GpuBuffer<f32>, usize, usize),
    bias: Option<&GpuBuffer<f32>>,
    cfg: &RoutingConfig,
    out: &GateGpu,
    force_global: bool,
) -> Result<()> {
    cfg.validate(experts)?;
    let slots = cfg.slots(experts);
    let n = tokens
        .checked_mul(slots)
        .ok_or_else(|| too_large("T x slots"))?;
    let te = tokens
        .checked_mul(experts)
        .ok_or_else(|| too_large("T x E"))?;
    let expect = |what: &str, got: usize, want: usize| act::at_least(Stage::Gate, what, got, want);
    expect("logits", logits.len, te)?;
    if let Some(b) = bias {
        expect("score_correction_bias", b.len, experts)?;
    }
    expect("topk_ids", out.topk_ids.len, n)?;
    expect("topk_weights", out.topk_weights.len, n)?;
    expect("kept", out.kept.len, n)?;
    expect("counts", out.counts.len, experts)?;

    let (groups, keep) = cfg.groups.map_or((0, 0), |g| (g.count, g.keep));
    let group_size = experts.checked_div(groups).unwrap_or(0);
    let row_len = experts + 2 * groups;
    let use_global = force_global || row_len > CACHE;

    let (mode, capacity) = if let Some(ec) = cfg.expert_choice {
        let c = ((ec.capacity_factor * tokens as f64 / experts as f64).ceil() as usize).min(tokens);
        (MODE_EXPERT_CHOICE, c)
    } else if let Some(c) = cfg.capacity {
        (MODE_CAPACITY, c.tokens_per_expert(tokens, slots, experts))
    } else {
        (MODE_PLAIN, u32::MAX as usize)
    };
    // Positions never exceed T · slots, so a larger C keeps everything.
    let capacity = capacity.min(u32::MAX as usize) as u32;
    let by_top1 = mode == MODE_CAPACITY && cfg.priority == Priority::Top1Score;
    let blocks = tokens.div_ceil(BLOCK);

    // Rank every expert at once when that is cheaper than `slots` rounds of a workgroup
    // reduction (about 12 barrier steps each).
    let per_inv = experts.div_ceil(WG as usize);
    let use_rank = experts * per_inv <= slots * (per_inv + 12);
    // One invocation per token where the picks fit its registers and the batch fills a
    // workgroup of tokens (the tests may force the workgroup path's scratch rows); below 64
    // tokens a workgroup per token spreads each token over 64 invocations. Both paths give
    // the same bits (gate.wgsl), so the choice by T keeps batch invariance.
    let lanes = !force_global
        && tokens >= WG as usize
        && mode != MODE_EXPERT_CHOICE
        && slots <= LANE_SLOTS
        && groups <= LANE_GROUPS;

    if dev.info.name.contains("llvmpipe") {
        let most = loop_iterations(
            (tokens, experts, slots),
            (groups, group_size),
            mode,
            by_top1,
            (use_rank, lanes),
        );
        within(
            Resource::LoopIterations,
            || {
                format!(
                    "{}: T = {tokens}, E = {experts}, {slots} slots on lavapipe",
                    Stage::Gate
                )
            },
            most as u64,
            LAVAPIPE_LOOP_LIMIT as u64,
        )?;
    }

    // Scratch regions, in u32 words.
    let mut len = 0usize;
    let mut region = |words: usize, what: &str| -> Result<u32> {
        let off = to_u32(len, what)?;
        len = len.checked_add(words).ok_or_else(|| too_large(what))?;
        Ok(off)
    };
    region(if use_global { tokens * row_len } else { 0 }, "gate rows")?;
    let top1_off = region(if by_top1 { tokens } else { 0 }, "top-1 scores")?;
    let order_off = region(if by_top1 { tokens } else { 0 }, "priority order")?;
    let blk_words = if mode == MODE_EXPERT_CHOICE {
        0
    } else {
        slots * blocks * experts
    };
    let blk_off = region(blk_words, "block counts")?;
    let ec_key_off = region(
        if mode == MODE_EXPERT_CHOICE { te } else { 0 },
        "expert-choice keys",
    )?;
    let ec_sel_off = region(
        if mode == MODE_EXPERT_CHOICE {
            2 * experts
        } else {
            0
        },
        "expert-choice thresholds",
    )?;
    to_u32(len, "gate scratch")?;
    within(
        Resource::BindingSize,
        || format!("{}: the gate's scratch", Stage::Gate),
        limits::product(&[len, 4]),
        dev.max_binding_bytes(),
    )?;
    let scratch = pool.buffer::<u32>(dev, "gate scratch", len.max(1))?;

    let params = Params {
        tokens: to_u32(tokens, "T")?,
        experts: to_u32(experts, "E")?,
        slots: to_u32(slots, "slots")?,
        groups: groups as u32,
        keep: keep as u32,
        group_size: group_size as u32,
        scoring: match cfg.scoring {
            Scoring::Softmax => 0,
            Scoring::Sigmoid => 1,
            Scoring::Logits => 2,
        },
        combine: match cfg.combine {
            Combine::Score => 0,
            Combine::SoftmaxSelected => 1,
        },
        has_bias: u32::from(bias.is_some()),
        renormalize: u32::from(cfg.renormalize),
        mode,
        by_top1: u32::from(by_top1),
        capacity,
        blocks: blocks as u32,
        use_rank: u32::from(use_rank),
        use_global: u32::from(use_global),
        row_len: to_u32(row_len, "E + 2G")?,
        top1_off,
        order_off,
        blk_off,
        ec_key_off,
        ec_sel_off,
        scale: cfg.scale as f32,
        nan: f32::NAN,
        neg_inf: f32::NEG_INFINITY,
        _pad: [0; 3],
    };
    let uniform = pool.uniform(dev, "gate params", &params)?;
    let dummy;
    let bias_buf = match bias {
        Some(b) => b,
        None => {
            dummy = pool.buffer::<f32>(dev, "gate no bias", 1)?;
            &dummy
        }
    };
    let resources = [
        uniform.as_entire_binding(),
        logits.binding(),
        bias_buf.binding(),
        out.topk_ids.binding(),
        out.topk_weights.binding(),
        out.kept.binding(),
        out.counts.binding(),
        scratch.binding(),
    ];
    let run =
        |enc: &mut ::wgpu::CommandEncoder, entry: Entry, groups: (u32, u32, u32)| -> Result<()> {
            let pipeline = dev.pipeline(Kernel::Gate(entry), &[])?;
            let entries: Vec<::wgpu::BindGroupEntry<'_>> = entry
                .bindings()
                .iter()
                .map(|&b| ::wgpu::BindGroupEntry {
                    binding: b,
                    resource: resources[b as usize].clone(),
                })
                .collect();
            let bind = pool.bind_entries(dev, &pipeline, &entries)?;
            dev.dispatch(enc, &pipeline, &bind, groups);
            Ok(())
        };

    let per_token = dev.grid(tokens, 1)?;
    let per_token_inv = dev.grid(tokens, WG)?;
    let per_expert = dev.grid(experts, 1)?;
    let per_block = dev.grid(slots * blocks, 1)?;
    if lanes {
        run(enc, Entry::SelectLanes, per_token_inv)?;
    } else if dev.subgroups {
        run(enc, Entry::SelectSubgroups, per_token)?;
    } else {
        run(enc, Entry::Select, per_token)?;
    }
    match mode {
        MODE_PLAIN => {
            run(enc, Entry::BlockCounts, per_block)?;
            run(enc, Entry::BlockScan, per_expert)?;
        }
        MODE_CAPACITY => {
            if by_top1 {
                run(enc, Entry::Priority, per_token_inv)?;
            }
            run(enc, Entry::BlockCounts, per_block)?;
            run(enc, Entry::BlockScan, per_expert)?;
            run(enc, Entry::Capacity, per_block)?;
            run(enc, Entry::Finish, per_token_inv)?;
        }
        _ => {
            run(enc, Entry::ExpertChoice, per_expert)?;
            run(enc, Entry::Finish, per_token_inv)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Paths the shape sweep of tests/gate.rs does not reach: the scratch-buffer row (E + 2G
    //! beyond the workgroup cache, forced here at small E and reached for real at E = 3000),
    //! a token grid beyond 65535 workgroups in x, and a token's routing not depending on its
    //! batch without capacity.

    use super::*;
    use crate::config::{Capacity, ExpertChoice, Groups};
    use crate::cpu::gate::{gate, Routing};
    use crate::synth::{separated_logits, Gen};

    fn device() -> Option<WgpuDevice> {
        crate::wgpu::context::test_device("gate")
    }

    /// The gate on the device, outputs poisoned first: (ids, weights, kept, counts).
    fn run(
        dev: &WgpuDevice,
        l: &[f32],
        (t, e): (usize, usize),
        bias: Option<&[f32]>,
        cfg: &RoutingConfig,
        force_global: bool,
    ) -> (Vec<u32>, Vec<f32>, Vec<u32>, Vec<u32>) {
        run_in(dev, &Scratch::new(), t, l, (t, e), bias, cfg, force_global)
    }

    /// [`run`] with scratch from `pool` and output buffers for `room` ≥ T tokens (read back
    /// for the first T).
    #[allow(clippy::too_many_arguments)]
    fn run_in(
        dev: &WgpuDevice,
        pool: &Scratch,
        room: usize,
        l: &[f32],
        (t, e): (usize, usize),
        bias: Option<&[f32]>,
        cfg: &RoutingConfig,
        force_global: bool,
    ) -> (Vec<u32>, Vec<f32>, Vec<u32>, Vec<u32>) {
        let slots = cfg.slots(e);
        let (n, cap) = (t * slots, room * slots);
        let mut lv = l.to_vec();
        lv.resize(room * e, f32::NAN);
        let lb = dev.upload(&lv, "logits").unwrap();
        let bb = bias.map(|b| dev.upload(b, "bias").unwrap());
        let out = GateGpu {
            topk_ids: dev.upload(&vec![u32::MAX; cap], "ids").unwrap(),
            topk_weights: dev.upload(&vec![f32::NAN; cap], "weights").unwrap(),
            kept: dev.upload(&vec![7u32; cap], "kept").unwrap(),
            counts: dev.upload(&vec![u32::MAX; e], "counts").unwrap(),
        };
        pool.begin().unwrap();
        let mut enc = dev.encoder();
        encode_with(
            dev,
            &mut enc,
            pool,
            (&lb, t, e),
            bb.as_ref(),
            cfg,
            &out,
            force_global,
        )
        .unwrap();
        dev.submit_and_wait(enc).unwrap();
        let ids = dev.read(&out.topk_ids).unwrap();
        assert!(ids[n..].iter().all(|&v| v == u32::MAX), "wrote past T");
        (
            ids[..n].to_vec(),
            dev.read(&out.topk_weights).unwrap()[..n].to_vec(),
            dev.read(&out.kept).unwrap()[..n].to_vec(),
            dev.read(&out.counts).unwrap(),
        )
    }

    fn check(got: &(Vec<u32>, Vec<f32>, Vec<u32>, Vec<u32>), want: &Routing, ctx: &str) {
        assert_eq!(got.0, want.topk_ids, "{ctx}: ids");
        let kept: Vec<bool> = got.2.iter().map(|&k| k == 1).collect();
        assert_eq!(kept, want.kept, "{ctx}: kept");
        assert_eq!(got.3, want.counts, "{ctx}: counts");
        let num: f64 = got
            .1
            .iter()
            .zip(&want.topk_weights)
            .map(|(&a, b)| (f64::from(a) - b).powi(2))
            .sum();
        let den: f64 = want.topk_weights.iter().map(|b| b * b).sum();
        let err = (num / den.max(f64::MIN_POSITIVE)).sqrt();
        assert!(err <= 2e-6, "{ctx}: weights rel L2 {err:e}");
    }

    /// A gate run's (ids, weights, kept, counts), as [`run`] reads them back.
    type GateOut = (Vec<u32>, Vec<f32>, Vec<u32>, Vec<u32>);

    /// Two gate runs give bitwise the same ids, weights, kept flags and counts.
    fn assert_same_bits(a: &GateOut, b: &GateOut, ctx: &str) {
        let bits = |w: &[f32]| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(a.0, b.0, "{ctx}: ids");
        assert_eq!(bits(&a.1), bits(&b.1), "{ctx}: weights");
        assert_eq!(a.2, b.2, "{ctx}: kept");
        assert_eq!(a.3, b.3, "{ctx}: counts");
    }

    fn compare(
        dev: &WgpuDevice,
        (t, e): (usize, usize),
        cfg: &RoutingConfig,
        force_global: bool,
        seed: u64,
        gap: f32,
    ) {
        let mut g = Gen::new(seed);
        let l = separated_logits(&mut g, t, e, gap);
        let bias = (cfg.scoring == Scoring::Sigmoid).then(|| g.uniform(e, 0.01));
        let wide = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        let want = gate(&wide(&l), t, e, bias.as_deref().map(wide).as_deref(), cfg).unwrap();
        let got = run(dev, &l, (t, e), bias.as_deref(), cfg, force_global);
        check(
            &got,
            &want,
            &format!("T={t} E={e} {cfg:?} global={force_global}"),
        );
    }

    fn variants(k: usize) -> Vec<RoutingConfig> {
        let base = RoutingConfig {
            top_k: k,
            ..RoutingConfig::default()
        };
        vec![
            base,
            RoutingConfig {
                scoring: Scoring::Sigmoid,
                groups: Some(Groups { count: 4, keep: 2 }),
                scale: 2.5,
                ..base
            },
            RoutingConfig {
                scoring: Scoring::Logits,
                combine: Combine::SoftmaxSelected,
                renormalize: false,
                ..base
            },
            RoutingConfig {
                capacity: Some(Capacity::Fraction(0.2)),
                priority: Priority::Top1Score,
                ..base
            },
            RoutingConfig {
                expert_choice: Some(ExpertChoice {
                    capacity_factor: 1.5,
                }),
                ..base
            },
        ]
    }

    /// gate_select_lanes (one invocation per token, taken from T = 64 on) and gate_select
    /// (one workgroup per token, forced here through the scratch rows) give bitwise the same
    /// outputs, for every variant the lanes path takes (softmax, sigmoid with groups and
    /// bias, raw logits with softmax_selected, capacity with top-1 priority), E over one
    /// staged block and not a multiple of it, and a token with NaN logits: the batch size may
    /// pick either path.
    #[test]
    fn lanes_and_workgroup_paths_give_the_same_bits() {
        let Some(dev) = device() else { return };
        let mut g = Gen::new(12);
        for (e, k) in [(16, 4), (72, 8), (128, 8)] {
            for cfg in variants(k) {
                if cfg.expert_choice.is_some() {
                    continue;
                }
                let t = 70;
                let mut l = g.uniform(t * e, 3.0);
                l[5 * e + 3] = f32::NAN;
                let bias = (cfg.scoring == Scoring::Sigmoid).then(|| g.uniform(e, 0.01));
                let lanes = run(&dev, &l, (t, e), bias.as_deref(), &cfg, false);
                let wg = run(&dev, &l, (t, e), bias.as_deref(), &cfg, true);
                assert_same_bits(&lanes, &wg, &format!("E {e} {cfg:?}"));
            }
        }
    }

    /// gate_select from the subgroup module (shaders/gate_subgroups.wgsl) and from the
    /// portable one give bitwise the same outputs, for every routing variant (expert choice
    /// included: it always takes gate_select), T = 1 and T = 37 (below the lanes path), E from
    /// 4 to 3000 (the scratch rows), the workgroup row forced into scratch, ties between
    /// experts and NaN logits. On lavapipe in CI the subgroup module must run (subgroup size 8:
    /// eight subgroups fold into each reduction).
    #[test]
    fn subgroup_and_portable_reductions_give_the_same_bits() {
        let Some(mut dev) = device() else { return };
        if !dev.subgroups {
            assert!(
                std::env::var("CI").is_err() || !dev.info.name.contains("llvmpipe"),
                "lavapipe offers subgroups: the subgroup gate must run in CI"
            );
            println!("subgroup gate not run: {} has no subgroups", dev.info.name);
            return;
        }
        let mut g = Gen::new(31);
        for (e, k) in [(4, 1), (16, 4), (72, 8), (128, 8), (3000, 8)] {
            for cfg in variants(k) {
                for (t, force_global) in [(1, false), (37, false), (37, true)] {
                    let mut l = g.uniform(t * e, 3.0);
                    // Ties: expert 1 of each token equals expert 0 (lower index wins), and
                    // a token with a NaN logit.
                    for r in 0..t {
                        l[r * e + 1] = l[r * e];
                    }
                    l[(t / 2) * e + e / 2] = f32::NAN;
                    let bias = (cfg.scoring == Scoring::Sigmoid).then(|| g.uniform(e, 0.01));
                    dev.subgroups = true;
                    let sg = run(&dev, &l, (t, e), bias.as_deref(), &cfg, force_global);
                    dev.subgroups = false;
                    let portable = run(&dev, &l, (t, e), bias.as_deref(), &cfg, force_global);
                    let ctx = format!("T {t} E {e} global {force_global} {cfg:?}");
                    assert_same_bits(&sg, &portable, &ctx);
                }
            }
        }
        println!("subgroup gate == portable gate on {}", dev.info.name);
    }

    #[test]
    fn scratch_rows_match_the_reference() {
        let Some(dev) = device() else { return };
        for (e, k) in [(4, 1), (16, 4), (64, 8)] {
            for cfg in variants(k) {
                compare(&dev, (37, e), &cfg, true, 5, 0.05);
            }
        }
    }

    #[test]
    fn more_experts_than_the_workgroup_cache() {
        let Some(dev) = device() else { return };
        for cfg in variants(8) {
            compare(&dev, (5, 3000), &cfg, false, 6, 0.005);
        }
    }

    #[test]
    fn more_tokens_than_one_grid_dimension() {
        let Some(dev) = device() else { return };
        let t = dev.limits.max_compute_workgroups_per_dimension as usize + 100;
        let base = RoutingConfig {
            top_k: 2,
            ..RoutingConfig::default()
        };
        compare(&dev, (t, 4), &base, false, 7, 0.05);
        let cap = RoutingConfig {
            capacity: Some(Capacity::Factor(1.0)),
            ..base
        };
        compare(&dev, (t, 4), &cap, false, 8, 0.05);
    }

    #[test]
    fn nan_and_infinite_logits_follow_the_reference() {
        let Some(dev) = device() else { return };
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        // One row each: a NaN, an infinite maximum, all -inf, a -inf among numbers, all NaN,
        // signed zeros (equal: ties to the lower index).
        let rows: [[f32; 4]; 6] = [
            [0.0, nan, 2.0, 1.0],
            [0.5, inf, -1.0, 2.0],
            [-inf, -inf, -inf, -inf],
            [1.0, -inf, 0.5, 2.0],
            [nan, nan, nan, nan],
            [-0.0, 0.0, -1.0, -0.0],
        ];
        let l: Vec<f32> = rows.iter().flatten().copied().collect();
        let wide: Vec<f64> = l.iter().map(|&x| f64::from(x)).collect();
        for scoring in [Scoring::Softmax, Scoring::Sigmoid, Scoring::Logits] {
            for combine in [Combine::Score, Combine::SoftmaxSelected] {
                let cfg = RoutingConfig {
                    top_k: 3,
                    scoring,
                    combine,
                    ..RoutingConfig::default()
                };
                let want = gate(&wide, 6, 4, None, &cfg).unwrap();
                let got = run(&dev, &l, (6, 4), None, &cfg, false);
                let ctx = format!("{scoring:?} {combine:?}");
                assert_eq!(got.0, want.topk_ids, "{ctx}: ids");
                assert_eq!(got.3, want.counts, "{ctx}: counts");
                for (i, (&a, &b)) in got.1.iter().zip(&want.topk_weights).enumerate() {
                    let same = (a.is_nan() && b.is_nan())
                        || (f64::from(a) - b).abs() <= 1e-6 * b.abs().max(1.0);
                    assert!(same, "{ctx}: weight {i}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn lavapipe_refuses_launches_past_its_loop_limit() {
        let Some(dev) = device() else { return };
        if !dev.info.name.contains("llvmpipe") {
            return;
        }
        // The priority pass compares every token with every other: T iterations each.
        let (t, e) = (70_000, 2);
        let cfg = RoutingConfig {
            top_k: 1,
            capacity: Some(Capacity::Tokens(4)),
            priority: Priority::Top1Score,
            ..RoutingConfig::default()
        };
        let lb = dev.upload(&vec![0.5f32; t * e], "logits").unwrap();
        let out = GateGpu::alloc(&dev, t, 1, e).unwrap();
        let mut enc = dev.encoder();
        let err = encode(&dev, &mut enc, &Scratch::new(), &lb, t, e, None, &cfg, &out).unwrap_err();
        assert!(err.to_string().contains("lavapipe"), "{err}");
        assert!(
            matches!(
                err,
                Error::Limit {
                    resource: Resource::LoopIterations,
                    need: 70_000..,
                    limit: 65_535,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_token_does_not_depend_on_its_batch_without_capacity() {
        let Some(dev) = device() else { return };
        let (t, e) = (300, 61);
        let cfg = RoutingConfig {
            top_k: 6,
            ..RoutingConfig::default()
        };
        let l = separated_logits(&mut Gen::new(9), t, e, 0.05);
        let all = run(&dev, &l, (t, e), None, &cfg, false);
        let one = run(&dev, &l[100 * e..101 * e], (1, e), None, &cfg, false);
        assert_eq!(one.0, all.0[600..606]);
        let bits = |w: &[f32]| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one.1), bits(&all.1[600..606]), "bitwise weights");
    }

    /// One scratch pool reused by forwards of every mode at T = 37, 7, 1 (its buffers hold the
    /// previous forward's data, the scratch rows forced on and off) with output and logits
    /// buffers sized for 37 tokens: the reference's routing each time.
    #[test]
    fn a_reused_pool_and_larger_buffers_match_the_reference() {
        let Some(dev) = device() else { return };
        let pool = Scratch::new();
        let e = 16;
        let mut g = Gen::new(10);
        for cfg in variants(4) {
            for (t, global) in [(37, false), (7, true), (1, false), (37, true)] {
                let l = separated_logits(&mut g, t, e, 0.05);
                let bias = (cfg.scoring == Scoring::Sigmoid).then(|| g.uniform(e, 0.01));
                let wide = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
                let want =
                    gate(&wide(&l), t, e, bias.as_deref().map(wide).as_deref(), &cfg).unwrap();
                let got = run_in(&dev, &pool, 37, &l, (t, e), bias.as_deref(), &cfg, global);
                check(
                    &got,
                    &want,
                    &format!("T={t} {cfg:?} global={global}, reused pool"),
                );
            }
        }
    }
}
