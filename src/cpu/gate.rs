//! Stage 1, CPU reference: scoring, selection (top-k, group-limited, capacity, expert choice)
//! and weights, exactly as DESIGN.md section 1 defines them.
//!
//! Per token: scores `s` (softmax / sigmoid / logits), selection values `c = s + bias`;
//! with groups, the best `keep` groups by the sum of their two largest `c` stay eligible;
//! the k picks are the eligible experts ranked by descending `c`, ties to the lower index, NaN
//! below every number. Then capacity (batch-wide), then weights: `s` of each pick or the
//! softmax over the picked logits, zero for dropped picks, renormalised over the kept picks,
//! times `scale`.

use rayon::prelude::*;

use crate::config::{Combine, Priority, RoutingConfig, Scoring};
use crate::cpu::{rank_cmp, sigmoid, top_n};
use crate::error::{Error, Result};
use crate::shape;
use crate::stage::Stage;

/// The gate's outputs for T tokens, each with `slots` assignments (`top_k`, or E for
/// expert-choice routing). All per-assignment arrays are `[T, slots]`, token-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Tokens T.
    pub tokens: usize,
    /// Assignments per token (`top_k`, or E for expert choice).
    pub slots: usize,
    /// Experts E.
    pub experts: usize,
    /// Expert of each assignment, in descending selection value per token.
    pub topk_ids: Vec<u32>,
    /// Weight applied to each assignment's expert output (0 where dropped).
    pub topk_weights: Vec<f64>,
    /// Whether each assignment survived capacity (all true without capacity).
    pub kept: Vec<bool>,
    /// Kept assignments per expert, `[E]`.
    pub counts: Vec<u32>,
    /// Capacity C per expert when capacity or expert-choice routing is on.
    pub capacity: Option<usize>,
}

/// Scores of one token's logits.
pub fn scores(logits: &[f64], scoring: Scoring) -> Vec<f64> {
    match scoring {
        Scoring::Softmax => softmax(logits),
        Scoring::Sigmoid => logits.iter().map(|&l| sigmoid(l)).collect(),
        Scoring::Logits => logits.to_vec(),
    }
}

/// Max-subtracted softmax. Like PyTorch: a NaN anywhere, or an infinite maximum, gives NaN.
pub fn softmax(v: &[f64]) -> Vec<f64> {
    if v.iter().any(|x| x.is_nan()) {
        return vec![f64::NAN; v.len()];
    }
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let ex: Vec<f64> = v.iter().map(|&x| (x - m).exp()).collect();
    let sum: f64 = ex.iter().sum();
    ex.iter().map(|&x| x / sum).collect()
}

/// Experts eligible under group-limited selection, ascending.
fn eligible_experts(c: &[f64], cfg: &RoutingConfig) -> Vec<usize> {
    let e = c.len();
    let Some(g) = cfg.groups else {
        return (0..e).collect();
    };
    let size = e / g.count;
    let group_score: Vec<f64> = (0..g.count)
        .map(|gi| {
            let members: Vec<usize> = (gi * size..(gi + 1) * size).collect();
            top_n(&members, 2, |i| c[i]).iter().map(|&i| c[i]).sum()
        })
        .collect();
    let groups: Vec<usize> = (0..g.count).collect();
    let mut kept = top_n(&groups, g.keep, |gi| group_score[gi]);
    kept.sort_unstable();
    kept.iter()
        .flat_map(|&gi| gi * size..(gi + 1) * size)
        .collect()
}

/// Per-token selection before capacity: `(picks, s, c)` with picks in rank order.
fn select_token(
    logits: &[f64],
    bias: Option<&[f64]>,
    cfg: &RoutingConfig,
    slots: usize,
) -> (Vec<usize>, Vec<f64>, Vec<f64>) {
    let s = scores(logits, cfg.scoring);
    let c: Vec<f64> = match bias {
        Some(b) => s.iter().zip(b).map(|(&si, &bi)| si + bi).collect(),
        None => s.clone(),
    };
    let eligible = eligible_experts(&c, cfg);
    let picks = top_n(&eligible, slots, |i| c[i]);
    (picks, s, c)
}

/// Runs the gate on `logits` `[T, E]` with an optional score-correction `bias` `[E]`.
pub fn gate(
    logits: &[f64],
    tokens: usize,
    experts: usize,
    bias: Option<&[f64]>,
    cfg: &RoutingConfig,
) -> Result<Routing> {
    cfg.validate(experts)?;
    shape::expect_len(
        Stage::Gate,
        "logits",
        logits.len(),
        shape::mul(Stage::Gate, "T x E", tokens, experts)?,
    )?;
    if let Some(b) = bias {
        shape::expect_len(Stage::Gate, "score_correction_bias", b.len(), experts)?;
    }
    let slots = cfg.slots(experts);
    let per_token: Vec<(Vec<usize>, Vec<f64>, Vec<f64>)> = (0..tokens)
        .into_par_iter()
        .map(|t| select_token(&logits[t * experts..(t + 1) * experts], bias, cfg, slots))
        .collect();

    let n = tokens * slots;
    let mut ids = vec![0u32; n];
    for (t, (picks, _, _)) in per_token.iter().enumerate() {
        for (j, &p) in picks.iter().enumerate() {
            ids[t * slots + j] = p as u32;
        }
    }

    // Capacity decides which assignments survive.
    let (kept, capacity) = if let Some(ec) = cfg.expert_choice {
        let cap =
            ((ec.capacity_factor * tokens as f64 / experts as f64).ceil() as usize).min(tokens);
        (
            expert_choice_kept(&per_token, &ids, tokens, experts, slots, cap),
            Some(cap),
        )
    } else if let Some(cap) = cfg.capacity {
        let cap = cap.tokens_per_expert(tokens, slots, experts);
        (
            capacity_kept(&per_token, &ids, tokens, experts, slots, cap, cfg.priority),
            Some(cap),
        )
    } else {
        (vec![true; n], None)
    };

    // Weights: raw, zero where dropped, renormalised over kept, scaled.
    let mut weights = vec![0.0f64; n];
    for (t, (picks, s, _)) in per_token.iter().enumerate() {
        let row = t * slots..(t + 1) * slots;
        let raw: Vec<f64> = match cfg.combine {
            Combine::Score => picks.iter().map(|&p| s[p]).collect(),
            Combine::SoftmaxSelected => {
                let l = &logits[t * experts..(t + 1) * experts];
                softmax(&picks.iter().map(|&p| l[p]).collect::<Vec<_>>())
            }
        };
        let w = &mut weights[row.clone()];
        for (j, wj) in w.iter_mut().enumerate() {
            *wj = if kept[t * slots + j] { raw[j] } else { 0.0 };
        }
        if cfg.renormalize {
            let sum: f64 = w.iter().sum();
            // All picks dropped (or zero scores): nothing to renormalise, the weights stay 0.
            // Only kept weights are divided: a dropped one stays exactly 0, even when a NaN
            // score makes the sum NaN.
            if sum != 0.0 {
                for (j, x) in w.iter_mut().enumerate() {
                    if kept[t * slots + j] {
                        *x /= sum;
                    }
                }
            }
        }
        w.iter_mut().for_each(|x| *x *= cfg.scale);
    }

    let mut counts = vec![0u32; experts];
    for (i, &id) in ids.iter().enumerate() {
        if kept[i] {
            counts[id as usize] += 1;
        }
    }
    Ok(Routing {
        tokens,
        slots,
        experts,
        topk_ids: ids,
        topk_weights: weights,
        kept,
        counts,
        capacity,
    })
}

/// Token-choice capacity (GShard / fairseq counting): assignments ranked slot by slot, within
/// a slot by priority; an assignment's position at its expert counts every earlier-ranked
/// assignment to that expert, kept or dropped; kept iff position < C.
fn capacity_kept(
    per_token: &[(Vec<usize>, Vec<f64>, Vec<f64>)],
    ids: &[u32],
    tokens: usize,
    experts: usize,
    slots: usize,
    cap: usize,
    priority: Priority,
) -> Vec<bool> {
    let mut order: Vec<usize> = (0..tokens).collect();
    if priority == Priority::Top1Score {
        let top1 = |t: usize| {
            let (picks, s, _) = &per_token[t];
            picks.first().map_or(f64::NAN, |&p| s[p])
        };
        // Stable: equal scores keep position order.
        order.sort_by(|&a, &b| rank_cmp(top1(b), top1(a)));
    }
    let mut position = vec![0usize; experts];
    let mut kept = vec![false; tokens * slots];
    for j in 0..slots {
        for &t in &order {
            let i = t * slots + j;
            let e = ids[i] as usize;
            kept[i] = position[e] < cap;
            position[e] += 1;
        }
    }
    kept
}

/// Expert choice: each expert keeps its top-C tokens by selection value `c`, ties to the lower
/// token index. Every token has E slots (all experts in its own rank order).
fn expert_choice_kept(
    per_token: &[(Vec<usize>, Vec<f64>, Vec<f64>)],
    ids: &[u32],
    tokens: usize,
    experts: usize,
    slots: usize,
    cap: usize,
) -> Vec<bool> {
    // slot_of[t][e] = the slot where token t lists expert e.
    let mut slot_of = vec![0usize; tokens * experts];
    for t in 0..tokens {
        for j in 0..slots {
            slot_of[t * experts + ids[t * slots + j] as usize] = j;
        }
    }
    let mut kept = vec![false; tokens * slots];
    let all: Vec<usize> = (0..tokens).collect();
    for e in 0..experts {
        for t in top_n(&all, cap, |t| per_token[t].2[e]) {
            kept[t * slots + slot_of[t * experts + e]] = true;
        }
    }
    kept
}

/// Checks that every id in `ids` names one of `experts` experts.
pub fn check_ids(ids: &[u32], experts: usize) -> Result<()> {
    match ids.iter().position(|&id| id as usize >= experts) {
        None => Ok(()),
        Some(i) => Err(Error::shape(
            Stage::Permute,
            format!(
                "topk_ids[{i}] = {} is not an expert (E = {experts})",
                ids[i]
            ),
        )),
    }
}
