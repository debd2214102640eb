//! The expert-parallel forward, written once for every backend (over [`RankStages`] and any
//! [`Communicator`] of host buffers). On rank r, with T_r tokens that are rows
//! `first..first + T_r` of the global batch:
//!
//! 1. **Agree.** Every rank sends every rank a header (its rank, the world, H, E, slots, the
//!    activation dtype, the expert split, a fingerprint of config and router, T_r, whether its
//!    `x` is valid). Ranks that disagree all fail with the same [`Error::Ep`]; the token
//!    counts give every rank the global token split.
//! 2. **Route.** Router logits of the own tokens. With capacity or expert choice, the routing
//!    of a token depends on the whole batch (DESIGN.md stage 1): the logits `[T_r, E]` are
//!    all-gathered and every rank runs the same gate on the global `[T, E]`, exactly the
//!    single-device gate, then keeps its own rows. Without them the gate is per token and
//!    each rank gates its own tokens only (nothing is gathered).
//! 3. **Layout and dispatch.** The permutation of the own tokens (stage 2) puts the kept rows
//!    in expert order, so the rows for each rank are one contiguous run ([`Layout`]); the
//!    per-expert counts go first (every expert rank learns what will arrive, as NCCL's
//!    send/recv need sizes), then the rows.
//! 4. **Experts.** Received rows regrouped by local expert ([`Arrange`]), the grouped GEMM on
//!    the rank's experts (stage 3), results back in arrival order, returned to their home
//!    ranks in the order they came.
//! 5. **Combine.** The returned rows land in the home rank's permutation order, and the
//!    combine (stage 4, with the shared expert) sums each token's picks in slot order, exactly
//!    as on one device; arrival order never enters a sum.

use std::time::{Duration, Instant};

use crate::device::GateBuffers;
use crate::ep::agree::agree;
use crate::ep::comm::Communicator;
use crate::ep::exchange::Exchange;
use crate::ep::layer::{EpLayer, EpOutput, EpStats};
use crate::ep::layout::{Arrange, Layout};
use crate::error::Result;
use crate::tensor::Tensor;

/// Rows `range` of every `[T, slots]` array of `g`, and the counts of those rows.
fn own_rows(g: &GateBuffers, first: usize, t: usize) -> GateBuffers {
    let (s, e) = (g.slots, g.experts);
    let r = first * s..(first + t) * s;
    let mut counts = vec![0u32; e];
    for (i, &id) in g.topk_ids[r.clone()].iter().enumerate() {
        if g.kept[r.start + i] != 0 {
            if let Some(c) = counts.get_mut(id as usize) {
                *c += 1;
            }
        }
    }
    GateBuffers {
        tokens: t,
        slots: s,
        experts: e,
        topk_ids: g.topk_ids[r.clone()].to_vec(),
        topk_weights: g.topk_weights[r.clone()].to_vec(),
        kept: g.kept[r].to_vec(),
        counts,
    }
}

fn timed<T>(acc: &mut Duration, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    let out = f();
    *acc += t.elapsed();
    out
}

/// One rank's expert-parallel forward (see the module docs).
pub(crate) fn forward<C>(l: &mut EpLayer, comm: &C, x: &Tensor) -> Result<EpOutput>
where
    C: Communicator<Buffer<u32> = [u32]> + ?Sized,
{
    let (me, world) = (comm.rank(), comm.world_size());
    let mut ex = Exchange {
        comm,
        me,
        world,
        stats: EpStats::default(),
    };
    let tokens = agree(l, &mut ex, x)?;
    let (t, first, total) = (
        tokens.range(me).len(),
        tokens.range(me).start,
        tokens.total(),
    );
    let (e, slots, rw) = (l.num_experts, l.slots, l.stages.row_words());
    let mut compute = Duration::ZERO;
    let mut layout_time = Duration::ZERO;

    // 2. Route.
    let logits = if t > 0 {
        timed(&mut compute, || l.stages.router(x))?
    } else {
        Vec::new()
    };
    let gate = if l.batch_routing {
        let words: Vec<u32> = logits.iter().map(|v| v.to_bits()).collect();
        let counts: Vec<usize> = tokens.counts().iter().map(|&c| c * e).collect();
        let all: Vec<f32> = ex
            .all_gather(&words, &counts)?
            .into_iter()
            .map(f32::from_bits)
            .collect();
        if t > 0 {
            let g = timed(&mut compute, || l.stages.gate(&all, total))?;
            timed(&mut layout_time, || Ok(own_rows(&g, first, t)))?
        } else {
            GateBuffers::poisoned(0, slots, e)
        }
    } else if t > 0 {
        timed(&mut compute, || l.stages.gate(&logits, t))?
    } else {
        GateBuffers::poisoned(0, slots, e)
    };

    // 3. Layout and dispatch.
    let (offsets, rows) = if t > 0 {
        timed(&mut compute, || l.stages.permute(&gate))?
    } else {
        (vec![0u32; e + 1], Vec::new())
    };
    let layout = timed(&mut layout_time, || Layout::new(me, &offsets, &l.experts))?;
    let local = l.experts.range(me);
    let send_counts = l.experts.counts();
    let recv = ex.all_to_all(
        &layout.expert_counts_payload(),
        &send_counts,
        &vec![local.len(); world],
    )?;
    let arrange = timed(&mut layout_time, || {
        Arrange::new(me, &recv, world, local.len())
    })?;
    let words = |v: &[usize]| v.iter().map(|&r| r * rw).collect::<Vec<_>>();
    let arrived = ex.all_to_all(
        &rows[..layout.rows() * rw],
        &words(&layout.rows_per_rank),
        &words(&arrange.rows_per_source),
    )?;

    // 4. Experts.
    let gemm_in = timed(&mut layout_time, || Ok(arrange.to_gemm(&arrived, rw)))?;
    let gemm_out = if arrange.rows > 0 {
        timed(&mut compute, || {
            l.stages.experts(&gemm_in, &arrange.expert_offsets)
        })?
    } else {
        Vec::new()
    };
    let back = timed(&mut layout_time, || Ok(arrange.to_arrival(&gemm_out, rw)))?;
    let y_rows = ex.all_to_all(
        &back,
        &words(&arrange.rows_per_source),
        &words(&layout.rows_per_rank),
    )?;

    // 5. Combine.
    let y = if t > 0 {
        timed(&mut compute, || l.stages.combine(&y_rows))?
    } else {
        Vec::new()
    };
    let mut stats = ex.stats;
    stats.compute = compute;
    stats.layout = layout_time;
    stats.rows_sent = layout.rows();
    stats.rows_received = arrange.rows;
    let counts = if t > 0 {
        gate.counts.clone()
    } else {
        vec![0; e]
    };
    Ok(EpOutput {
        first_token: first,
        tokens: t,
        hidden: l.hidden,
        slots,
        dtype: l.dtype,
        y,
        topk_ids: gate.topk_ids,
        topk_weights: gate.topk_weights,
        kept: gate.kept,
        counts,
        stats,
    })
}
