//! Stage 1 on CUDA (kernels/gate.ptx): scores, selection (top-k, group-limited, capacity,
//! expert choice) and weights, mirroring src/cpu/gate.rs in f32.
//!
//! One warp per token does the per-token work (`gate_select`); without capacity that is the
//! whole gate (plus a memset of `counts`). Capacity and expert-choice routing add batch-wide
//! passes (`gate_rank`, `gate_cap_count`, `gate_cap_scan`, `gate_finalize`), launched in order
//! on the device's stream with device scratch buffers that the caller allocates once
//! ([`GateScratchCuda`]): no allocation, no host synchronisation and no read-back in a launch.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::config::{Combine, Priority, RoutingConfig, Scoring};
use crate::cuda::context::{check_len, to_u32};
use crate::cuda::context::{drv, grid_1d};
use crate::cuda::gate_fused;
use crate::cuda::ptx::PtxModule;
use crate::cuda::{CudaDevice, GateCuda, KernelSet};
use crate::error::{Error, Result};
use crate::stage::Stage;

/// Variant whose per-warp buffers live in dynamic shared memory.
const SHARED_VARIANT: &str = "gate";
/// Variant whose per-warp buffers live in a global scratch allocation (any E).
const GLOBAL_VARIANT: &str = "gate.global";
/// Dynamic shared memory a `gate_select` block may use without an opt-in.
const SHARED_LIMIT: usize = 48 * 1024;
/// Most warps (tokens) per `gate_select` block (`.maxntid 256`).
const MAX_WARPS: usize = 8;
/// Assignments per chunk of the capacity count (`gate_cap_count`'s block size).
const CHUNK: usize = 256;
/// Tokens per block of `gate_rank`.
const RANK_TILE: usize = 256;

// gate_select flags (kernels/gate.ptx header).
const FLAG_RENORM: u32 = 1;
const FLAG_FINAL: u32 = 2;
const FLAG_BIAS: u32 = 4;
const FLAG_TOP1: u32 = 8;
const FLAG_EC: u32 = 16;
const FLAG_SOFTMAX_SELECTED: u32 = 32;

/// Every module variant of this stage: the template with its buffers in shared memory
/// (`gate`) and in global scratch memory (`gate.global`).
pub fn modules() -> Result<Vec<PtxModule>> {
    [(SHARED_VARIANT, "shared"), (GLOBAL_VARIANT, "global")]
        .into_iter()
        .map(|(variant, space)| {
            PtxModule::specialise(Stage::Gate, variant, &[], &[("SPACE", space.to_string())])
        })
        .collect()
}

fn shape_err(what: impl Into<String>) -> Error {
    Error::shape(Stage::Gate, what)
}

/// Largest power of two <= `v` (`v` >= 1).
fn prev_pow2(v: usize) -> usize {
    1 << (usize::BITS - 1 - v.leading_zeros())
}

/// Bytes of one gate_select warp's buffers for `experts` and `cfg`:
/// `align8(8 G + 12 E)` (G = 0 when every group is kept).
pub(crate) fn per_warp(experts: usize, cfg: &RoutingConfig) -> usize {
    let groups = match cfg.groups {
        Some(g) if g.keep < g.count => g.count,
        _ => 0,
    };
    (8 * groups + 12 * experts + 7) & !7
}

/// Lanes per group in gate_select's group pass: as many as fit 32 lanes with every group of
/// one pass side by side, but no more than the group's size needs.
pub(crate) fn group_lanes(count: usize, size: usize) -> usize {
    let by_count = if count >= 32 {
        1
    } else {
        prev_pow2(32 / count)
    };
    by_count.min(size.next_power_of_two()).max(1)
}

/// What one gate launch needs, from the batch size, E and the routing config: shared by
/// [`GateScratchCuda::alloc`] (for the largest batch) and [`launch`] (for the actual one).
#[derive(Debug, Clone, Copy)]
struct Plan {
    slots: usize,
    /// T × slots.
    n: usize,
    /// T × E.
    te: usize,
    /// Capacity applies (token choice with dropping).
    capacity: bool,
    /// Capacity with BPR priority (top-1 score order).
    bpr: bool,
    /// Expert-choice routing.
    expert_choice: bool,
    /// Bytes of one warp's gate_select buffers.
    per_warp: usize,
    /// gate_select's buffers go to global scratch (variant `gate.global`).
    global: bool,
    /// Capacity chunks ceil(n / 256).
    nb: usize,
}

impl Plan {
    fn new(tokens: usize, experts: usize, cfg: &RoutingConfig) -> Result<Plan> {
        cfg.validate(experts)?;
        let slots = cfg.slots(experts);
        let n = tokens
            .checked_mul(slots)
            .ok_or_else(|| shape_err("T x slots overflows"))?;
        let te = tokens
            .checked_mul(experts)
            .ok_or_else(|| shape_err("T x E overflows"))?;
        if experts > 1 << 30 {
            return Err(shape_err(format!("E = {experts} exceeds 2^30")));
        }
        if tokens > 1 << 31 {
            return Err(shape_err(format!("T = {tokens} exceeds 2^31")));
        }
        let expert_choice = cfg.expert_choice.is_some();
        let capacity = !expert_choice && cfg.capacity.is_some();
        let per_warp = per_warp(experts, cfg);
        Ok(Plan {
            slots,
            n,
            te,
            capacity,
            bpr: capacity && cfg.priority == Priority::Top1Score,
            expert_choice,
            per_warp,
            global: SHARED_LIMIT / per_warp == 0,
            nb: n.div_ceil(CHUNK),
        })
    }

    /// Cells of the capacity count table, E × NB.
    fn cells(&self, experts: usize) -> Result<usize> {
        experts
            .checked_mul(self.nb)
            .ok_or_else(|| shape_err("capacity table size overflows"))
    }

    /// Bytes of gate_select's global per-warp buffers, T × PW.
    fn select_bytes(&self, tokens: usize) -> Result<usize> {
        tokens
            .checked_mul(self.per_warp)
            .ok_or_else(|| shape_err("gate scratch size overflows"))
    }
}

/// Device scratch of the gate's batch-wide passes, allocated once by the caller (sized for
/// the largest batch and one routing config) and reused by every launch; only what the
/// config needs is allocated. Contents need not be preserved between launches.
#[derive(Debug, Default)]
pub struct GateScratchCuda {
    /// BPR capacity: orderable key of each token's top-1 score, `u32 [T]`.
    top1: Option<CudaSlice<u32>>,
    /// BPR capacity: token at each priority position and its inverse, `u32 [T]` each.
    order: Option<CudaSlice<u32>>,
    prio: Option<CudaSlice<u32>>,
    /// Capacity: rank of each assignment in its chunk, `u32 [T·S]`.
    lrank: Option<CudaSlice<u32>>,
    /// Capacity: per-(expert, chunk) counts, `u32 [E·NB]` (zeroed by each launch).
    cells: Option<CudaSlice<u32>>,
    /// Expert choice: keys `u32 [E, T]` and the slot of each (token, expert) `u32 [T, E]`.
    ec_keys: Option<CudaSlice<u32>>,
    slot_of: Option<CudaSlice<u32>>,
    /// gate_select's per-warp buffers in global memory, `[T, PW]` bytes, when one warp's
    /// buffers do not fit in 48 KiB of shared memory (large E), or (fused gate) when 8 warps'
    /// do not fit in [`gate_fused::SHARED_MAX`].
    select: Option<CudaSlice<u8>>,
    /// The fused gate's control block (`MOE_CUDA_KERNELS=next`), `u32 [8 + E]`: zero when
    /// allocated and left zero by every launch ([`gate_fused::ctl_len`]).
    ctl: Option<CudaSlice<u32>>,
}

impl GateScratchCuda {
    /// Scratch for batches of up to `tokens` tokens over `experts` experts routed by `cfg`
    /// (an empty struct when the config needs none).
    pub fn alloc(
        dev: &CudaDevice,
        tokens: usize,
        experts: usize,
        cfg: &RoutingConfig,
    ) -> Result<Self> {
        let p = Plan::new(tokens, experts, cfg)?;
        let mut s = GateScratchCuda::default();
        if p.bpr {
            s.top1 = Some(dev.alloc(tokens)?);
            s.order = Some(dev.alloc(tokens)?);
            s.prio = Some(dev.alloc(tokens)?);
        }
        if p.capacity {
            s.lrank = Some(dev.alloc(p.n)?);
            s.cells = Some(dev.alloc(p.cells(experts)?)?);
        }
        if p.expert_choice {
            s.ec_keys = Some(dev.alloc(p.te)?);
            s.slot_of = Some(dev.alloc(p.te)?);
        }
        let next = dev.kernels == KernelSet::Next;
        let fused_global = gate_fused::fast_lanes(experts, cfg).is_none()
            && gate_fused::general_global(p.per_warp);
        if p.global || (next && fused_global) {
            s.select = Some(dev.alloc(p.select_bytes(tokens)?)?);
        }
        if next {
            // Zeroed by the allocation: the fused gate's control block starts (and stays) zero.
            s.ctl = Some(dev.alloc(gate_fused::ctl_len(experts))?);
        }
        Ok(s)
    }
}

/// `buf`, checked to hold at least `need` elements; an error naming it when it is missing
/// (the scratch was allocated for another routing config) or short (for fewer tokens).
fn need<'a, T>(
    buf: Option<&'a mut CudaSlice<T>>,
    what: &str,
    need: usize,
) -> Result<&'a mut CudaSlice<T>> {
    let b = buf.ok_or_else(|| {
        shape_err(format!(
            "gate scratch has no {what}: allocate GateScratchCuda for this routing config"
        ))
    })?;
    check_len(Stage::Gate, &format!("gate scratch {what}"), b.len(), need)?;
    Ok(b)
}

/// Launches the gate on `logits` `[T, E]` into `out`, with the batch-wide passes' buffers in
/// `scratch` (allocated by [`GateScratchCuda::alloc`] for at least `tokens` tokens, `experts`
/// and a config that needs the same passes). Buffers may be larger than the batch needs.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    dev: &CudaDevice,
    logits: &CudaSlice<f32>,
    tokens: usize,
    experts: usize,
    bias: Option<&CudaSlice<f32>>,
    cfg: &RoutingConfig,
    out: &mut GateCuda,
    scratch: &mut GateScratchCuda,
) -> Result<()> {
    let plan = Plan::new(tokens, experts, cfg)?;
    let (slots, n, te) = (plan.slots, plan.n, plan.te);
    to_u32(Stage::Gate, "T x slots", n, u32::MAX as usize)?;
    check_len(Stage::Gate, "logits", logits.len(), te)?;
    if let Some(b) = bias {
        check_len(Stage::Gate, "score_correction_bias", b.len(), experts)?;
    }
    check_len(Stage::Gate, "topk_ids", out.topk_ids.len(), n)?;
    check_len(Stage::Gate, "topk_weights", out.topk_weights.len(), n)?;
    check_len(Stage::Gate, "kept", out.kept.len(), n)?;
    check_len(Stage::Gate, "counts", out.counts.len(), experts)?;

    if tokens == 0 {
        // Nothing to route: every expert got 0 assignments. No kernel is launched.
        let mut counts = out.counts.slice_mut(..experts);
        return drv(dev.stream.memset_zeros(&mut counts), "zeroing counts");
    }

    let t32 = to_u32(Stage::Gate, "T", tokens, u32::MAX as usize)?;
    let e32 = to_u32(Stage::Gate, "E", experts, u32::MAX as usize)?;
    let s32 = to_u32(Stage::Gate, "slots", slots, u32::MAX as usize)?;

    // Group-limited selection; keeping every group selects from all experts.
    let (g_count, g_keep, g_size, g_lanes) = match cfg.groups {
        Some(g) if g.keep < g.count => {
            let size = experts / g.count;
            (g.count, g.keep, size, group_lanes(g.count, size))
        }
        _ => (0, 0, 0, 1),
    };

    let capacity = if plan.capacity { cfg.capacity } else { None };
    let bpr = plan.bpr;

    let mut flags = 0;
    if cfg.renormalize {
        flags |= FLAG_RENORM;
    }
    if capacity.is_none() && cfg.expert_choice.is_none() {
        flags |= FLAG_FINAL;
    }
    if bias.is_some() {
        flags |= FLAG_BIAS;
    }
    if bpr {
        flags |= FLAG_TOP1;
    }
    if cfg.expert_choice.is_some() {
        flags |= FLAG_EC;
    }
    if cfg.combine == Combine::SoftmaxSelected {
        flags |= FLAG_SOFTMAX_SELECTED;
    }
    let scoring: u32 = match cfg.scoring {
        Scoring::Softmax => 0,
        Scoring::Sigmoid => 1,
        Scoring::Logits => 2,
    };
    let scale = cfg.scale as f32;

    // Scratch of this launch, every buffer checked against this batch before any launch.
    let GateScratchCuda {
        top1,
        order,
        prio,
        lrank,
        cells,
        ec_keys,
        slot_of,
        select,
        ctl,
    } = scratch;
    let mut top1 = if bpr {
        Some(need(top1.as_mut(), "top1", tokens)?)
    } else {
        None
    };
    let mut order_prio = if bpr {
        Some((
            need(order.as_mut(), "order", tokens)?,
            need(prio.as_mut(), "prio", tokens)?,
        ))
    } else {
        None
    };
    let cells_len = plan.cells(experts)?;
    let mut tables = if capacity.is_some() {
        Some((
            need(lrank.as_mut(), "lrank", n)?,
            need(cells.as_mut(), "cells", cells_len)?,
        ))
    } else {
        None
    };
    let (mut ec_keys, mut slot_of) = if plan.expert_choice {
        (
            Some(need(ec_keys.as_mut(), "ec_keys", te)?),
            Some(need(slot_of.as_mut(), "slot_of", te)?),
        )
    } else {
        (None, None)
    };
    let next = dev.kernels == KernelSet::Next;
    let fused_global = next
        && gate_fused::fast_lanes(experts, cfg).is_none()
        && gate_fused::general_global(plan.per_warp);
    let mut select = if plan.global || fused_global {
        Some(need(
            select.as_mut(),
            "select buffers",
            plan.select_bytes(tokens)?,
        )?)
    } else {
        None
    };

    if next {
        // MOE_CUDA_KERNELS=next: every routing variant in one launch (kernels/gate_fused.ptx).
        let ctl = need(
            ctl.as_mut(),
            "fused control block",
            gate_fused::ctl_len(experts),
        )?;
        let (order, prio) = match order_prio {
            Some((o, p)) => (Some(o), Some(p)),
            None => (None, None),
        };
        let (lrank, cells) = match tables {
            Some((l, c)) => (Some(l), Some(c)),
            None => (None, None),
        };
        return gate_fused::launch(
            dev,
            logits,
            tokens,
            experts,
            bias,
            cfg,
            out,
            gate_fused::FusedScratch {
                ctl,
                top1,
                order,
                prio,
                lrank,
                cells,
                ec_keys,
                slot_of,
                select,
            },
        );
    }

    if flags & FLAG_FINAL != 0 {
        let mut counts = out.counts.slice_mut(..experts);
        drv(dev.stream.memset_zeros(&mut counts), "zeroing counts")?;
    }

    // ---- gate_select: one warp per token.
    let per_warp = plan.per_warp;
    let (variant, warps) = if plan.global {
        (GLOBAL_VARIANT, MAX_WARPS)
    } else {
        (SHARED_VARIANT, (SHARED_LIMIT / per_warp).min(MAX_WARPS))
    };
    {
        let func = dev.function(Stage::Gate, variant, "gate_select")?;
        let mut lc: LaunchConfig = grid_1d(tokens * 32, (32 * warps) as u32);
        if select.is_none() {
            lc.shared_mem_bytes = (warps * per_warp) as u32;
        }
        let null = 0u64;
        let (groups, keep, group_size, lanes) =
            (g_count as u32, g_keep as u32, g_size as u32, g_lanes as u32);
        let mut b = dev.stream.launch_builder(&func);
        b.arg(logits);
        match bias {
            Some(bias) => b.arg(bias),
            None => b.arg(&null),
        };
        b.arg(&mut out.topk_ids)
            .arg(&mut out.topk_weights)
            .arg(&mut out.kept)
            .arg(&mut out.counts);
        match top1.as_mut() {
            Some(s) => b.arg(&mut **s),
            None => b.arg(&null),
        };
        match ec_keys.as_mut() {
            Some(s) => b.arg(&mut **s),
            None => b.arg(&null),
        };
        match slot_of.as_mut() {
            Some(s) => b.arg(&mut **s),
            None => b.arg(&null),
        };
        match select.as_mut() {
            Some(s) => b.arg(&mut **s),
            None => b.arg(&null),
        };
        b.arg(&t32)
            .arg(&e32)
            .arg(&s32)
            .arg(&groups)
            .arg(&keep)
            .arg(&group_size)
            .arg(&lanes)
            .arg(&scoring)
            .arg(&flags)
            .arg(&scale);
        // SAFETY: matches the gate_select header of kernels/gate.ptx: 10 pointers (logits
        // [T,E] f32, bias [E] f32 or 0, ids/weights/kept [T,S], counts [E], top1 [T], ec_keys
        // [E,T], slot_of [T,E], scratch [T,PW] bytes, each or 0 where its flag is off), then
        // 9 u32 and 1 f32 scalars in header order; every buffer was checked above to hold at
        // least what the kernel indexes for this T (scratch buffers may be longer); block
        // 32*W <= 256 threads, W*PW bytes of dynamic shared memory (<= 48 KiB) in the shared
        // variant; the scalars outlive the launch.
        drv(unsafe { b.launch(lc) }.map(|_| ()), "launching gate_select")?;
    }

    if let (Some(cap), Some((lrank, cells))) = (capacity, tables.as_mut()) {
        // ---- capacity: [BPR order], chunk counts, per-expert prefix, finalize.
        let c = u32::try_from(cap.tokens_per_expert(tokens, slots, experts)).unwrap_or(u32::MAX);
        let nb = plan.nb;
        let nb32 = to_u32(Stage::Gate, "capacity chunks", nb, u32::MAX as usize)?;
        // gate_cap_count writes only the cells of experts present in a chunk.
        {
            let mut used = cells.slice_mut(..cells_len);
            drv(
                dev.stream.memset_zeros(&mut used),
                "zeroing the capacity table",
            )?;
        }
        if let (Some(keys), Some((order, prio))) = (top1.as_ref(), order_prio.as_mut()) {
            let tiles = tokens.div_ceil(RANK_TILE);
            let (tiles32, cols, zero, mode) = (
                to_u32(Stage::Gate, "rank tiles", tiles, u32::MAX as usize)?,
                1u32,
                0u32,
                0u32,
            );
            let null = 0u64;
            let func = dev.function(Stage::Gate, variant, "gate_rank")?;
            let mut b = dev.stream.launch_builder(&func);
            b.arg(&**keys)
                .arg(&null)
                .arg(&mut **order)
                .arg(&mut **prio)
                .arg(&t32)
                .arg(&cols)
                .arg(&tiles32)
                .arg(&zero)
                .arg(&mode);
            // SAFETY: matches the gate_rank header of kernels/gate.ptx in mode 0: keys [1, T]
            // u32, slot_of unused (0), order [T] and prio [T] u32 outputs (checked to hold T),
            // then tokens, cols = 1, tiles = ceil(T / 256), cap (unused), mode; one 256-thread
            // block per tile.
            drv(
                unsafe { b.launch(grid_1d(tiles * RANK_TILE, RANK_TILE as u32)) }.map(|_| ()),
                "launching gate_rank",
            )?;
        }
        {
            let null = 0u64;
            let func = dev.function(Stage::Gate, variant, "gate_cap_count")?;
            let mut b = dev.stream.launch_builder(&func);
            b.arg(&out.topk_ids);
            match order_prio.as_ref() {
                Some((order, _)) => b.arg(&**order),
                None => b.arg(&null),
            };
            b.arg(&mut **lrank)
                .arg(&mut **cells)
                .arg(&t32)
                .arg(&s32)
                .arg(&nb32);
            // SAFETY: matches the gate_cap_count header of kernels/gate.ptx: ids [T, S], order
            // [T] or 0, lrank [T, S] out, cells [E, NB] out (its first E*NB cells zeroed
            // above), then T, S, NB with T*S < 2^32; one 256-thread block per chunk of 256
            // assignments.
            drv(
                unsafe { b.launch(grid_1d(nb * CHUNK, CHUNK as u32)) }.map(|_| ()),
                "launching gate_cap_count",
            )?;
        }
        {
            let func = dev.function(Stage::Gate, variant, "gate_cap_scan")?;
            let mut b = dev.stream.launch_builder(&func);
            b.arg(&mut **cells)
                .arg(&mut out.counts)
                .arg(&e32)
                .arg(&nb32)
                .arg(&c);
            // SAFETY: matches the gate_cap_scan header of kernels/gate.ptx: cells [E, NB]
            // in/out, counts [E] out, then E, NB, C; one warp per expert, 8 per block.
            drv(
                unsafe { b.launch(grid_1d(experts * 32, 256)) }.map(|_| ()),
                "launching gate_cap_scan",
            )?;
        }
        finalize(
            dev,
            variant,
            out,
            order_prio.as_ref().map(|(_, prio)| &**prio),
            Some((&**lrank, &**cells)),
            (t32, s32, nb32, c),
            0,
            cfg,
        )?;
    } else if let Some(ec) = cfg.expert_choice {
        // ---- expert choice: every expert keeps its top-C tokens, then finalize.
        let c = ((ec.capacity_factor * tokens as f64 / experts as f64).ceil() as usize).min(tokens);
        let c32 = to_u32(Stage::Gate, "expert-choice capacity", c, u32::MAX as usize)?;
        let tiles = tokens.div_ceil(RANK_TILE);
        let blocks = tiles
            .checked_mul(experts)
            .ok_or_else(|| shape_err("gate_rank grid overflows"))?;
        to_u32(Stage::Gate, "gate_rank blocks", blocks, u32::MAX as usize)?;
        let (tiles32, mode) = (
            to_u32(Stage::Gate, "rank tiles", tiles, u32::MAX as usize)?,
            1u32,
        );
        let (Some(keys), Some(slot_of)) = (ec_keys.as_ref(), slot_of.as_ref()) else {
            return Err(shape_err("expert-choice scratch missing"));
        };
        {
            let func = dev.function(Stage::Gate, variant, "gate_rank")?;
            let mut b = dev.stream.launch_builder(&func);
            b.arg(&**keys)
                .arg(&**slot_of)
                .arg(&mut out.kept)
                .arg(&mut out.counts)
                .arg(&t32)
                .arg(&e32)
                .arg(&tiles32)
                .arg(&c32)
                .arg(&mode);
            // SAFETY: matches the gate_rank header of kernels/gate.ptx in mode 1: keys [E, T]
            // u32, slot_of [T, E] u32 (both checked to hold T*E), kept [T, E] out, counts [E]
            // out, then tokens, cols = E, tiles = ceil(T / 256), cap = C <= T, mode = 1;
            // tiles * E 256-thread blocks.
            drv(
                unsafe { b.launch(grid_1d(blocks * RANK_TILE, RANK_TILE as u32)) }.map(|_| ()),
                "launching gate_rank",
            )?;
        }
        finalize(dev, variant, out, None, None, (t32, s32, 0, c32), 1, cfg)?;
    }
    Ok(())
}

/// gate_finalize: kept (capacity) and the final weights (renormalised, scaled).
#[allow(clippy::too_many_arguments)]
fn finalize(
    dev: &CudaDevice,
    variant: &str,
    out: &mut GateCuda,
    prio: Option<&CudaSlice<u32>>,
    tables: Option<(&CudaSlice<u32>, &CudaSlice<u32>)>,
    (t32, s32, nb32, cap): (u32, u32, u32, u32),
    mode: u32,
    cfg: &RoutingConfig,
) -> Result<()> {
    let flags: u32 = if cfg.renormalize { FLAG_RENORM } else { 0 };
    let scale = cfg.scale as f32;
    let null = 0u64;
    let func = dev.function(Stage::Gate, variant, "gate_finalize")?;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(&out.topk_ids)
        .arg(&mut out.topk_weights)
        .arg(&mut out.kept);
    match prio {
        Some(p) => b.arg(p),
        None => b.arg(&null),
    };
    match tables {
        Some((lrank, cells)) => b.arg(lrank).arg(cells),
        None => b.arg(&null).arg(&null),
    };
    b.arg(&t32)
        .arg(&s32)
        .arg(&nb32)
        .arg(&cap)
        .arg(&mode)
        .arg(&flags)
        .arg(&scale);
    // SAFETY: matches the gate_finalize header of kernels/gate.ptx: ids, weights, kept [T, S],
    // prio [T] or 0, lrank [T, S] and cells [E, NB] (mode 0; 0 in mode 1), then T, S, NB, C,
    // mode, flags (u32) and scale (f32); one warp per token, 8 per block.
    drv(
        unsafe { b.launch(grid_1d(t32 as usize * 32, 256)) }.map(|_| ()),
        "launching gate_finalize",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Capacity, ExpertChoice};

    #[test]
    fn plans_ask_for_exactly_the_scratch_a_config_uses() {
        let top2 = RoutingConfig::default();
        let p = Plan::new(300, 16, &top2).unwrap();
        assert!(!p.capacity && !p.bpr && !p.expert_choice && !p.global);
        assert_eq!((p.slots, p.n, p.te, p.per_warp), (2, 600, 4800, 192));
        let cap = RoutingConfig {
            capacity: Some(Capacity::Factor(1.25)),
            priority: Priority::Top1Score,
            ..top2
        };
        let p = Plan::new(300, 16, &cap).unwrap();
        assert!(p.capacity && p.bpr && !p.expert_choice);
        assert_eq!((p.nb, p.cells(16).unwrap()), (3, 48));
        let ec = RoutingConfig {
            expert_choice: Some(ExpertChoice {
                capacity_factor: 2.0,
            }),
            ..top2
        };
        let p = Plan::new(7, 8, &ec).unwrap();
        // Every token lists all E experts; no capacity passes.
        assert!(p.expert_choice && !p.capacity && !p.bpr);
        assert_eq!((p.slots, p.n, p.te), (8, 56, 56));
        // One warp's buffers past 48 KiB: the global-scratch variant, T x PW bytes.
        let p = Plan::new(5, 4100, &top2).unwrap();
        assert!(p.global);
        assert_eq!(p.select_bytes(5).unwrap(), 5 * 12 * 4100);
        assert!(!Plan::new(5, 4096, &top2).unwrap().global);
        assert!(Plan::new(1, 0, &top2).is_err());
    }

    #[test]
    fn missing_or_short_scratch_is_a_typed_error() {
        let mut none: Option<CudaSlice<u32>> = None;
        assert!(matches!(
            need(none.as_mut(), "cells", 4),
            Err(Error::Shape { .. })
        ));
    }

    /// On a CUDA device (skipped without one): the fused one-launch gate
    /// (`MOE_CUDA_KERNELS=next`) against the verified launch sequence on the same logits, for
    /// every routing variant (FAST and GENERAL select, capacity with both priorities, expert
    /// choice, large E in global scratch): ids, kept and counts equal, weights within 1e-5
    /// relative; the control block is zero after every launch, and a second launch on it
    /// gives the same outputs (a CUDA-graph replay reuses it the same way).
    #[test]
    fn fused_gate_matches_the_verified_sequence_on_device() {
        use crate::config::{Capacity, ExpertChoice, Groups};
        let Ok(mut dev) = CudaDevice::new(0) else {
            println!("gate: no CUDA device, fused device test skipped");
            return;
        };
        let top2 = RoutingConfig::default();
        let ds = RoutingConfig {
            top_k: 8,
            scoring: Scoring::Sigmoid,
            groups: Some(Groups { count: 8, keep: 4 }),
            scale: 2.5,
            ..top2
        };
        let cap = RoutingConfig {
            top_k: 1,
            capacity: Some(Capacity::Tokens(5)),
            ..top2
        };
        let cases: Vec<(&str, usize, usize, RoutingConfig, bool)> = vec![
            ("mixtral", 4096, 8, top2, false),
            ("deepseek", 4096, 256, ds, true),
            (
                "gpt_oss",
                333,
                32,
                RoutingConfig {
                    top_k: 4,
                    scoring: Scoring::Logits,
                    combine: Combine::SoftmaxSelected,
                    renormalize: false,
                    ..top2
                },
                false,
            ),
            (
                "qwen3",
                1000,
                128,
                RoutingConfig { top_k: 8, ..top2 },
                false,
            ),
            ("switch", 700, 16, cap, false),
            (
                "nllb_bpr",
                600,
                8,
                RoutingConfig {
                    top_k: 2,
                    capacity: Some(Capacity::Fraction(0.3)),
                    priority: Priority::Top1Score,
                    ..top2
                },
                false,
            ),
            (
                "expert_choice",
                300,
                8,
                RoutingConfig {
                    expert_choice: Some(ExpertChoice {
                        capacity_factor: 2.0,
                    }),
                    ..top2
                },
                false,
            ),
            (
                "general_k12",
                200,
                16,
                RoutingConfig { top_k: 12, ..top2 },
                false,
            ),
            ("global_e3000", 20, 3000, top2, false),
        ];
        let mut g = crate::synth::Gen::new(77);
        for (name, t, e, cfg, with_bias) in cases {
            let logits = g.tensor(&[t, e], 2.0).to_f32_vec();
            let lb = dev.upload(&logits).unwrap();
            let b = g.tensor(&[e], 0.5).to_f32_vec();
            let bd = dev.upload(&b).unwrap();
            let bias = with_bias.then_some(&bd);
            dev.kernels = KernelSet::Next;
            let mut scratch = GateScratchCuda::alloc(&dev, t, e, &cfg).unwrap();
            let slots = cfg.slots(e);
            let mut outs = Vec::new();
            for k in [KernelSet::Verified, KernelSet::Next, KernelSet::Next] {
                dev.kernels = k;
                let mut o = GateCuda::alloc(&dev, t, slots, e).unwrap();
                launch(&dev, &lb, t, e, bias, &cfg, &mut o, &mut scratch).unwrap();
                let n = t * slots;
                outs.push((
                    dev.read(&o.topk_ids, n).unwrap(),
                    dev.read(&o.topk_weights, n).unwrap(),
                    dev.read(&o.kept, n).unwrap(),
                    dev.read(&o.counts, e).unwrap(),
                ));
                let ctl = dev.read(scratch.ctl.as_ref().unwrap(), 8 + e).unwrap();
                assert!(ctl.iter().all(|&w| w == 0), "{name}: control block {ctl:?}");
            }
            let (v, f) = (&outs[0], &outs[1]);
            assert_eq!(v.0, f.0, "{name}: ids");
            assert_eq!(v.2, f.2, "{name}: kept");
            assert_eq!(v.3, f.3, "{name}: counts");
            for (i, (a, b)) in v.1.iter().zip(&f.1).enumerate() {
                let ok = (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-5 * a.abs().max(1e-30);
                assert!(ok, "{name}: weight {i}: verified {a} fused {b}");
            }
            assert_eq!(outs[1], outs[2], "{name}: a second fused launch");
        }
        dev.kernels = KernelSet::Verified;
        println!("gate: fused device test ran on {}", dev.name);
    }
}
