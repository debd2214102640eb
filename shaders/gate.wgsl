// gate.wgsl — stage 1: fused scoring, selection and weights of the MoE gate.
//
// Per token t: scores s (softmax over E, max-subtracted / sigmoid / raw logits), selection
// values c = s + score_correction_bias; with groups, the best `keep` of G contiguous groups
// (group score = sum of its two largest c) stay eligible; the `slots` picks are the eligible
// experts in rank order (descending c, NaN last, ties to the lower index: `ranks_before`).
// Raw weight of pick j: s of the pick, or the softmax over the picked logits. Then, batch-wide,
// token-choice capacity (GShard counting, slot by slot, within a slot by priority) or expert
// choice (each expert keeps its top-C tokens by c); then weights are zeroed where dropped,
// renormalised over the kept picks when asked and the sum != 0, and multiplied by `scale`.
// counts[e] = kept assignments of expert e. Everything in f32; every sum in a fixed order (no
// atomic adds; the subgroup form's atomic maxima / minima are order-free): bitwise
// repeatable, and a token depends on the others only through capacity or expert choice.
//
// Mirrors: src/cpu/gate.rs `gate` (scores / softmax / eligible_experts / select_token /
//   capacity_kept / expert_choice_kept), with src/cpu/mod.rs `rank_cmp` / `top_n` as the
//   ranking order (`ranks_before` in common.wgsl).
//
// Parameters (bindings of group 0, in order; each entry point binds the subset it uses, listed
// with its launch below):
//   0 p        uniform             GateParams (below)
//   1 logits   storage read        f32 [T, E]
//   2 bias     storage read        f32 [E] score_correction_bias (1-element dummy unless has_bias)
//   3 ids      storage read_write  u32 [T, slots] expert of each assignment, rank order per token
//   4 weights  storage read_write  f32 [T, slots] raw weights after gate_select, final after the
//                                  last pass (0 where dropped)
//   5 kept     storage read_write  u32 [T, slots] 1 kept / 0 dropped
//   6 counts   storage read_write  u32 [E] kept assignments per expert
//   7 scratch  storage read_write  u32 words, regions at the offsets in GateParams (f32 stored
//                                  as bits): rows [T, row_len] (only when use_global), top1 [T]
//                                  and order [T] (Top1Score priority), blk [slots·blocks, E]
//                                  (block counts, then exclusive offsets), ec_key [E, T] and
//                                  ec_sel [E, 2] (expert choice)
//
// Passes per mode (src/wgpu/gate.rs records them in this order; gate_select_lanes replaces
// gate_select when T ≥ 64, slots ≤ 8, G ≤ 32 and not expert choice; both give the same bits):
//   plain (no capacity): gate_select (finishes the weights, kept = 1), gate_block_counts,
//                        gate_block_scan (counts = totals)
//   capacity:            gate_select, [gate_priority], gate_block_counts, gate_block_scan,
//                        gate_capacity, gate_finish
//   expert choice:       gate_select, gate_expert_choice, gate_finish
//
// Launch (WG = 64 invocations per workgroup everywhere; 2-D grids flattened x first, surplus
// workgroups / invocations exit):
//   gate_select        one workgroup per token: grid(T, 1)                 bindings 0-5, 7
//   gate_select_lanes  one invocation per token: grid(T, WG)               bindings 0-5, 7
//   gate_priority      one invocation per token: grid(T, WG)               bindings 0, 7
//   gate_block_counts  one workgroup per (slot j, block b of BLOCK priority positions):
//                      grid(slots · blocks, 1), blocks = ceil(T / BLOCK)    bindings 0, 3, 7
//   gate_block_scan    one workgroup per expert: grid(E, 1)                bindings 0, 6, 7
//   gate_capacity      one workgroup per (j, b): grid(slots · blocks, 1)    bindings 0, 3, 5, 7
//   gate_finish        one invocation per token: grid(T, WG)               bindings 0, 3, 4, 5, 7
//   gate_expert_choice one workgroup per expert: grid(E, 1)                bindings 0, 6, 7
//
// Workgroup memory: gate_select caches its token's row (c, group scores, group kept flags) in
// CACHE f32 when row_len = E + 2G <= CACHE, else in the scratch rows; gate_select_lanes
// stages 64 tokens × 32 logits (pitch 33) and keeps each token's group scores (2 × 8448 B);
// at most ~17 KiB per entry point. Compared values have subnormals flushed on the bits
// (`canon`), so rankings agree on any denormal mode.
// Subgroups: this file uses none. Where the device has wgpu's SUBGROUP feature, gate_select's
// two workgroup reductions (the softmax maximum, each pick's best candidate) come from
// shaders/gate_subgroups.wgsl instead (subgroupMax / subgroupMin / subgroupOr, then one
// workgroup atomicMax / atomicMin / atomicOr per subgroup): any subgroup size, the same bits
// (maxima and minima of exact keys do not depend on the order), 3 or 4 barriers per
// reduction instead of 8 (see the <portable-reductions> section).
// lavapipe ends an invocation after 65535 loop iterations (all loops together); the Rust side
// refuses launches that could exceed that there (loop_iterations in src/wgpu/gate.rs).
// Target: WGSL core, no extensions (the subgroup module: `enable subgroups;`).

const WG: u32 = 64u;
const BLOCK: u32 = 256u;
const CACHE: u32 = 2048u;
const NONE: u32 = 0xffffffffu;

const SCORING_SOFTMAX: u32 = 0u;
const SCORING_SIGMOID: u32 = 1u;

const COMBINE_SCORE: u32 = 0u;

const MODE_PLAIN: u32 = 0u;
const MODE_CAPACITY: u32 = 1u;
const MODE_EXPERT_CHOICE: u32 = 2u;

struct GateParams {
    tokens: u32,
    experts: u32,
    // Assignments per token: top_k, or E for expert choice.
    slots: u32,
    // Group count G (0: no group-limited selection), groups kept, experts per group.
    groups: u32,
    keep: u32,
    group_size: u32,
    // SCORING_* and COMBINE_* above.
    scoring: u32,
    combine: u32,
    has_bias: u32,
    renormalize: u32,
    // MODE_* above.
    mode: u32,
    // 1: capacity claimed in descending top-1 score order (needs gate_priority), 0: position.
    by_top1: u32,
    // Capacity C per expert (0xffffffff in plain mode).
    capacity: u32,
    // ceil(T / BLOCK).
    blocks: u32,
    // 1: rank every expert at once (large slots or small E), 0: select pick by pick.
    use_rank: u32,
    // 1: gate_select keeps its row in scratch instead of workgroup memory.
    use_global: u32,
    // E + 2G.
    row_len: u32,
    // Word offsets of the scratch regions.
    top1_off: u32,
    order_off: u32,
    blk_off: u32,
    ec_key_off: u32,
    ec_sel_off: u32,
    scale: f32,
    // Constants WGSL cannot write as literals.
    nan: f32,
    neg_inf: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: GateParams;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> weights: array<f32>;
@group(0) @binding(5) var<storage, read_write> kept: array<u32>;
@group(0) @binding(6) var<storage, read_write> counts: array<u32>;
@group(0) @binding(7) var<storage, read_write> scratch: array<u32>;

// gate_select's row: c[0..E], group scores [E..E+G], group kept flags (1.0 / 0.0) [E+G..E+2G].
var<workgroup> row: array<f32, CACHE>;
// Reductions.
var<workgroup> red_f: array<f32, WG>;
var<workgroup> red_u: array<u32, WG>;
// One block of assignments of one slot, in priority order: expert (NONE past T) and token.
var<workgroup> blk_ids: array<u32, BLOCK>;
var<workgroup> blk_tok: array<u32, BLOCK>;

fn is_inf(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) == 0x7f800000u;
}

// A value that is compared: subnormals (and -0) become +0, decided on the bits, so every
// comparison agrees whether or not the device flushes subnormals (a device that flushes in
// some comparisons and not in others would otherwise rank inconsistently).
fn canon(x: f32) -> f32 {
    if ((bitcast<u32>(x) & 0x7f800000u) == 0u) {
        return 0.0;
    }
    return x;
}

// ---------------------------------------------------------------------------------------------
// gate_select

// Softmax statistics of one row: max m, sum of exp(l - m), and `bad` (a NaN, or an infinite
// maximum, makes every score NaN, as in f64 / PyTorch).
struct Stats {
    m: f32,
    sum: f32,
    bad: bool,
}

fn row_get(t: u32, i: u32) -> f32 {
    if (p.use_global != 0u) {
        return bitcast<f32>(scratch[t * p.row_len + i]);
    }
    return row[i];
}

fn row_set(t: u32, i: u32, v: f32) {
    if (p.use_global != 0u) {
        scratch[t * p.row_len + i] = bitcast<u32>(v);
    } else {
        row[i] = v;
    }
}

// Score s of logit l.
fn score(l: f32, st: Stats) -> f32 {
    if (p.scoring == SCORING_SOFTMAX) {
        if (st.bad) {
            return p.nan;
        }
        return exp(l - st.m) / st.sum;
    }
    if (p.scoring == SCORING_SIGMOID) {
        if (is_nan(l)) {
            return l;
        }
        return 1.0 / (1.0 + exp(-l));
    }
    return l;
}

// Selection value c of expert e of the row starting at `base`.
fn selection_value(base: u32, e: u32, st: Stats) -> f32 {
    var c = score(logits[base + e], st);
    if (p.has_bias != 0u) {
        c += bias[e];
    }
    return canon(c);
}

fn eligible(t: u32, e: u32) -> bool {
    if (p.groups == 0u) {
        return true;
    }
    return row_get(t, p.experts + p.groups + e / p.group_size) != 0.0;
}

// Workgroup reductions of gate_select. Every invocation of the workgroup calls them at the
// same point (uniform control flow) and gets the result; they begin and end with every
// invocation past a barrier, so red_f / red_u (or the atomics) are free again on return.
struct MaxOr {
    m: f32,    // the maximum of the v (none is NaN)
    flag: u32, // the OR of the flags
}

struct Best {
    v: f32, // the best candidate's value (0.0 and NONE when no invocation has one); NaN
    i: u32, // values rank last, ties go to the lower index (ranks_before)
}

// <portable-reductions> The section up to the closing marker is the portable form: trees
// over workgroup memory, log2(WG) = 6 barrier steps. Where the device has subgroups,
// src/wgpu/kernels.rs builds a second gate module (`enable subgroups;`) with this section
// replaced by shaders/gate_subgroups.wgsl: the same maximum and picks (a maximum and a
// best-by-rank are exact in any order), in 3 and 4 barriers.
fn wg_max_or(lid: u32, v: f32, flag: u32) -> MaxOr {
    red_f[lid] = v;
    red_u[lid] = flag;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            red_f[lid] = max(red_f[lid], red_f[lid + s]);
            red_u[lid] |= red_u[lid + s];
        }
    }
    workgroupBarrier();
    let r = MaxOr(red_f[0], red_u[0]);
    workgroupBarrier();
    return r;
}

fn wg_best(lid: u32, v: f32, i: u32) -> Best {
    red_f[lid] = v;
    red_u[lid] = i;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            let bi = red_u[lid + s];
            let ai = red_u[lid];
            if (bi != NONE && (ai == NONE || ranks_before(red_f[lid + s], bi, red_f[lid], ai))) {
                red_f[lid] = red_f[lid + s];
                red_u[lid] = bi;
            }
        }
    }
    workgroupBarrier();
    let r = Best(red_f[0], red_u[0]);
    workgroupBarrier();
    return r;
}
// </portable-reductions>

// Row statistics: the maximum by a tree reduction (exact in any order), the sum of
// exp(l − m) in expert order by invocation 0 from the exponentials staged in the row (the
// order gate_select_lanes sums in, so both give the same bits and a token's weights do not
// depend on which of them its batch size picks).
fn softmax_stats(t: u32, base: u32, lid: u32) -> Stats {
    var lmax = p.neg_inf;
    var nan = 0u;
    for (var e = lid; e < p.experts; e += WG) {
        let l = logits[base + e];
        if (is_nan(l)) {
            nan = 1u;
        } else {
            lmax = max(lmax, l);
        }
    }
    let mo = wg_max_or(lid, lmax, nan);
    let m = mo.m;
    let bad = mo.flag != 0u || is_inf(m);
    for (var e = lid; e < p.experts; e += WG) {
        row_set(t, e, exp(logits[base + e] - m));
    }
    storageBarrier();
    workgroupBarrier();
    if (lid == 0u) {
        var sum = 0.0;
        for (var e = 0u; e < p.experts; e++) {
            sum += row_get(t, e);
        }
        red_f[0] = sum;
    }
    workgroupBarrier();
    let total = red_f[0];
    storageBarrier();
    workgroupBarrier(); // the row is rewritten with the selection values next
    return Stats(m, total, bad);
}

// Group scores, then which groups are kept (rank among groups < keep).
fn select_groups(t: u32, lid: u32) {
    let e0 = p.experts;
    let g0 = p.experts + p.groups;
    for (var g = lid; g < p.groups; g += WG) {
        let first = g * p.group_size;
        var b1 = first;
        var b2 = NONE;
        for (var e = first + 1u; e < first + p.group_size; e++) {
            let v = row_get(t, e);
            if (ranks_before(v, e, row_get(t, b1), b1)) {
                b2 = b1;
                b1 = e;
            } else if (b2 == NONE || ranks_before(v, e, row_get(t, b2), b2)) {
                b2 = e;
            }
        }
        var gs = row_get(t, b1);
        if (b2 != NONE) {
            gs += row_get(t, b2);
        }
        row_set(t, e0 + g, canon(gs));
    }
    storageBarrier();
    workgroupBarrier();
    for (var g = lid; g < p.groups; g += WG) {
        let v = row_get(t, e0 + g);
        var r = 0u;
        for (var h = 0u; h < p.groups; h++) {
            if (ranks_before(row_get(t, e0 + h), h, v, g)) {
                r++;
            }
        }
        row_set(t, g0 + g, select(0.0, 1.0, r < p.keep));
    }
    storageBarrier();
    workgroupBarrier();
}

// 1 when expert f is eligible and ranks before (v, e).
fn before(t: u32, f: u32, v: f32, e: u32) -> u32 {
    return select(0u, 1u, eligible(t, f) && ranks_before(row_get(t, f), f, v, e));
}

// Picks by rank: each eligible expert counts the eligible experts ranked before it. The inner
// loop is unrolled by 4 (fewer loop iterations: lavapipe stops an invocation after 65535).
fn select_by_rank(t: u32, lid: u32) {
    for (var e = lid; e < p.experts; e += WG) {
        if (!eligible(t, e)) {
            continue;
        }
        let v = row_get(t, e);
        var r = 0u;
        var f = 0u;
        for (; f + 4u <= p.experts; f += 4u) {
            r += before(t, f, v, e) + before(t, f + 1u, v, e) + before(t, f + 2u, v, e)
                + before(t, f + 3u, v, e);
        }
        for (; f < p.experts; f++) {
            r += before(t, f, v, e);
        }
        if (r < p.slots) {
            ids[t * p.slots + r] = e;
        }
    }
}

// Picks one by one: pick j is the best eligible expert ranked strictly after pick j - 1.
fn select_by_rounds(t: u32, lid: u32) {
    var prev_v = 0.0;
    var prev_i = NONE;
    for (var j = 0u; j < p.slots; j++) {
        var best_v = 0.0;
        var best_i = NONE;
        for (var e = lid; e < p.experts; e += WG) {
            if (!eligible(t, e)) {
                continue;
            }
            let v = row_get(t, e);
            let after = prev_i == NONE || ranks_before(prev_v, prev_i, v, e);
            if (after && (best_i == NONE || ranks_before(v, e, best_v, best_i))) {
                best_v = v;
                best_i = e;
            }
        }
        let b = wg_best(lid, best_v, best_i);
        prev_v = b.v;
        prev_i = b.i;
        if (lid == 0u) {
            ids[t * p.slots + j] = prev_i;
        }
    }
}

// Zeroes dropped weights, renormalises over the kept ones (sum in slot order), scales.
fn finish_weights(o: u32) {
    var sum = 0.0;
    for (var j = 0u; j < p.slots; j++) {
        var w = 0.0;
        if (kept[o + j] != 0u) {
            w = weights[o + j];
        }
        weights[o + j] = w;
        sum += w;
    }
    let renorm = p.renormalize != 0u && (sum != 0.0 || is_nan(sum));
    for (var j = 0u; j < p.slots; j++) {
        var w = weights[o + j];
        // Only kept weights are divided: a dropped one stays exactly 0 even for a NaN sum.
        if (renorm && kept[o + j] != 0u) {
            w = w / sum;
        }
        weights[o + j] = w * p.scale;
    }
}

// Raw weights of the picks of token t (invocation 0 of its workgroup).
fn raw_weights(t: u32, base: u32, st: Stats) {
    let o = t * p.slots;
    if (p.combine == COMBINE_SCORE) {
        for (var j = 0u; j < p.slots; j++) {
            weights[o + j] = score(logits[base + ids[o + j]], st);
        }
        return;
    }
    // Softmax over the picked logits, with the same NaN / infinite-maximum rule.
    var m = p.neg_inf;
    var nan = false;
    for (var j = 0u; j < p.slots; j++) {
        let l = logits[base + ids[o + j]];
        if (is_nan(l)) {
            nan = true;
        } else {
            m = max(m, l);
        }
    }
    let bad = nan || is_inf(m);
    var sum = 0.0;
    for (var j = 0u; j < p.slots; j++) {
        sum += exp(logits[base + ids[o + j]] - m);
    }
    for (var j = 0u; j < p.slots; j++) {
        var w = p.nan;
        if (!bad) {
            w = exp(logits[base + ids[o + j]] - m) / sum;
        }
        weights[o + j] = w;
    }
}

// Order-preserving u32 key of an f32 selection value: NaN lowest (0), -0 == +0.
fn order_key(v: f32) -> u32 {
    if (is_nan(v)) {
        return 0u;
    }
    var b = bitcast<u32>(v);
    if ((b & 0x7fffffffu) == 0u) {
        b = 0u;
    }
    if ((b & 0x80000000u) != 0u) {
        return ~b;
    }
    return b | 0x80000000u;
}

@compute @workgroup_size(64)
fn gate_select(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let t = wid.x + wid.y * nwg.x;
    if (t >= p.tokens) {
        return;
    }
    let base = t * p.experts;
    var st = Stats(0.0, 1.0, false);
    if (p.scoring == SCORING_SOFTMAX) {
        st = softmax_stats(t, base, lid);
    }
    for (var e = lid; e < p.experts; e += WG) {
        let c = selection_value(base, e, st);
        row_set(t, e, c);
        if (p.mode == MODE_EXPERT_CHOICE) {
            scratch[p.ec_key_off + e * p.tokens + t] = order_key(c);
        }
    }
    storageBarrier();
    workgroupBarrier();
    if (p.groups != 0u) {
        select_groups(t, lid);
    }
    if (p.use_rank != 0u) {
        select_by_rank(t, lid);
    } else {
        select_by_rounds(t, lid);
    }
    storageBarrier();
    workgroupBarrier();
    if (lid != 0u) {
        return;
    }
    raw_weights(t, base, st);
    let o = t * p.slots;
    if (p.mode == MODE_CAPACITY && p.by_top1 != 0u) {
        scratch[p.top1_off + t] = bitcast<u32>(canon(score(logits[base + ids[o]], st)));
    }
    if (p.mode == MODE_PLAIN) {
        for (var j = 0u; j < p.slots; j++) {
            kept[o + j] = 1u;
        }
        finish_weights(o);
    }
}

// ---------------------------------------------------------------------------------------------
// gate_select_lanes: gate_select for at most LANE_SLOTS = 8 slots without expert choice (the
// common routing: top-k ≤ 8, with or without groups (G ≤ 32), capacity or not), one
// invocation per token instead of one workgroup per token: no reduction trees, two barriers
// per staged block. A workgroup takes 64 tokens; their logits are staged through workgroup
// memory LT = 32 experts at a time (coalesced: 32 invocations read one 128-byte row segment),
// and each invocation walks its token's experts in order, pass by pass: softmax maximum (and
// NaN), softmax sum, group scores (G > 0), then the picks — an insertion chain of 8 slots in
// registers, ordered by `ranks_before` (descending c, NaN last, ties to the lower index), fed
// the eligible experts in index order. The outputs are those of gate_select: the same picks
// (the same c of each expert: the same score, bias and canon), the same group rule, and the
// same per-token epilogue (raw_weights, top-1 score, plain-mode finish). The softmax sum is
// taken in expert order (gate_select: strided, then a tree), so a weight may differ from
// gate_select's in its last bits; either is the reference's within f32 rounding.

const LANE_SLOTS: u32 = 8u;
const LT: u32 = 32u;
const LPITCH: u32 = 33u;

// Staged logits: token row r (of the workgroup's 64) at r · LPITCH, LT experts each.
var<workgroup> lt: array<f32, 2112>;
// Group scores of each invocation's token (its own row, G ≤ 32; never shared).
var<workgroup> lgs: array<f32, 2112>;

// Stages logits of tokens t0 .. t0 + 63, experts c0 .. c0 + LT − 1 (0 outside [T, E]); call in
// uniform control flow.
fn lanes_stage(t0: u32, c0: u32, lid: u32) {
    workgroupBarrier(); // every invocation is done with the previous block
    let i = lid & 31u;
    let e = c0 + i;
    for (var r = lid >> 5u; r < WG; r += 2u) {
        let t = t0 + r;
        var v = 0.0;
        if (t < p.tokens && e < p.experts) {
            v = logits[t * p.experts + e];
        }
        lt[r * LPITCH + i] = v;
    }
    workgroupBarrier();
}

// Selection value c of expert e with logit l (selection_value on a staged logit).
fn lanes_c(l: f32, e: u32, st: Stats) -> f32 {
    var c = score(l, st);
    if (p.has_bias != 0u) {
        c += bias[e];
    }
    return canon(c);
}

// Result of one compare-and-swap of the insertion chain: the slot's new content and the
// candidate carried on.
struct Cas {
    sv: f32,
    si: u32,
    cv: f32,
    ci: u32,
}

fn cas(cv: f32, ci: u32, sv: f32, si: u32) -> Cas {
    if (si == NONE || ranks_before(cv, ci, sv, si)) {
        return Cas(cv, ci, sv, si);
    }
    return Cas(sv, si, cv, ci);
}

// Eight slots: values and experts (NONE: empty), slot j in component j % 4 of v/i (j / 4).
struct TopK {
    v0: vec4<f32>,
    v1: vec4<f32>,
    i0: vec4<u32>,
    i1: vec4<u32>,
}

// (v, e) into the chain of the first `slots` slots (unrolled: constant slot indices).
fn topk_insert(tk_in: TopK, v: f32, e: u32) -> TopK {
    var tk = tk_in;
    var cv = v;
    var ci = e;
    if (p.slots > 0u && ci != NONE) {
        let r = cas(cv, ci, tk.v0.x, tk.i0.x);
        tk.v0.x = r.sv;
        tk.i0.x = r.si;
        cv = r.cv;
        ci = r.ci;
    }
    if (p.slots > 1u && ci != NONE) {
        let r = cas(cv, ci, tk.v0.y, tk.i0.y);
        tk.v0.y = r.sv;
        tk.i0.y = r.si;
        cv = r.cv;
        ci = r.ci;
    }
    if (p.slots > 2u && ci != NONE) {
        let r = cas(cv, ci, tk.v0.z, tk.i0.z);
        tk.v0.z = r.sv;
        tk.i0.z = r.si;
        cv = r.cv;
        ci = r.ci;
    }
    if (p.slots > 3u && ci != NONE) {
        let r = cas(cv, ci, tk.v0.w, tk.i0.w);
        tk.v0.w = r.sv;
        tk.i0.w = r.si;
        cv = r.cv;
        ci = r.ci;
    }
    if (p.slots > 4u && ci != NONE) {
        let r = cas(cv, ci, tk.v1.x, tk.i1.x);
        tk.v1.x = r.sv;
        tk.i1.x = r.si;
        cv = r.cv;
        ci = r.ci;
    }
    if (p.slots > 5u && ci != NONE) {
        let r = cas(cv, ci, tk.v1.y, tk.i1.y);
        tk.v1.y = r.sv;
        tk.i1.y = r.si;
        cv = r.cv;
        ci = r.ci;
    }
    if (p.slots > 6u && ci != NONE) {
        let r = cas(cv, ci, tk.v1.z, tk.i1.z);
        tk.v1.z = r.sv;
        tk.i1.z = r.si;
        cv = r.cv;
        ci = r.ci;
    }
    if (p.slots > 7u && ci != NONE) {
        let r = cas(cv, ci, tk.v1.w, tk.i1.w);
        tk.v1.w = r.sv;
        tk.i1.w = r.si;
        cv = r.cv;
        ci = r.ci;
    }
    return tk;
}

@compute @workgroup_size(64)
fn gate_select_lanes(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let t0 = (wid.x + wid.y * nwg.x) * WG;
    let t = t0 + lid;
    let live = t < p.tokens;
    let ne = p.experts;
    let row = lid * LPITCH;
    var st = Stats(0.0, 1.0, false);
    if (p.scoring == SCORING_SOFTMAX) {
        // Maximum over the numbers, and whether any logit is NaN.
        var m = p.neg_inf;
        var nan = false;
        for (var c0 = 0u; c0 < ne; c0 += LT) {
            lanes_stage(t0, c0, lid);
            for (var i = 0u; i < min(LT, ne - c0); i++) {
                let l = lt[row + i];
                if (is_nan(l)) {
                    nan = true;
                } else {
                    m = max(m, l);
                }
            }
        }
        // Sum of exp(l − m) in expert order.
        var sum = 0.0;
        for (var c0 = 0u; c0 < ne; c0 += LT) {
            lanes_stage(t0, c0, lid);
            for (var i = 0u; i < min(LT, ne - c0); i++) {
                sum += exp(lt[row + i] - m);
            }
        }
        st = Stats(m, sum, nan || is_inf(m));
    }
    // Groups: each group's score (its two largest c, as select_groups), then the kept mask.
    var kept_groups = 0xffffffffu;
    if (p.groups != 0u) {
        var v1 = 0.0;
        var i1 = NONE;
        var v2 = 0.0;
        var i2 = NONE;
        for (var c0 = 0u; c0 < ne; c0 += LT) {
            lanes_stage(t0, c0, lid);
            for (var i = 0u; i < min(LT, ne - c0); i++) {
                let e = c0 + i;
                let v = lanes_c(lt[row + i], e, st);
                if (e % p.group_size == 0u) {
                    v1 = v;
                    i1 = e;
                    i2 = NONE;
                } else if (ranks_before(v, e, v1, i1)) {
                    v2 = v1;
                    i2 = i1;
                    v1 = v;
                    i1 = e;
                } else if (i2 == NONE || ranks_before(v, e, v2, i2)) {
                    v2 = v;
                    i2 = e;
                }
                if (e % p.group_size == p.group_size - 1u) {
                    var gs = v1;
                    if (i2 != NONE) {
                        gs += v2;
                    }
                    lgs[row + e / p.group_size] = canon(gs);
                }
            }
        }
        kept_groups = 0u;
        for (var g = 0u; g < p.groups; g++) {
            let v = lgs[row + g];
            var r = 0u;
            for (var h = 0u; h < p.groups; h++) {
                if (ranks_before(lgs[row + h], h, v, g)) {
                    r++;
                }
            }
            if (r < p.keep) {
                kept_groups |= 1u << g;
            }
        }
    }
    // The picks.
    var tk = TopK(vec4<f32>(0.0), vec4<f32>(0.0), vec4<u32>(NONE), vec4<u32>(NONE));
    for (var c0 = 0u; c0 < ne; c0 += LT) {
        lanes_stage(t0, c0, lid);
        for (var i = 0u; i < min(LT, ne - c0); i++) {
            let e = c0 + i;
            if (p.groups == 0u || ((kept_groups >> (e / p.group_size)) & 1u) != 0u) {
                tk = topk_insert(tk, lanes_c(lt[row + i], e, st), e);
            }
        }
    }
    if (!live) {
        return;
    }
    let o = t * p.slots;
    if (p.slots > 0u) {
        ids[o + 0u] = tk.i0.x;
    }
    if (p.slots > 1u) {
        ids[o + 1u] = tk.i0.y;
    }
    if (p.slots > 2u) {
        ids[o + 2u] = tk.i0.z;
    }
    if (p.slots > 3u) {
        ids[o + 3u] = tk.i0.w;
    }
    if (p.slots > 4u) {
        ids[o + 4u] = tk.i1.x;
    }
    if (p.slots > 5u) {
        ids[o + 5u] = tk.i1.y;
    }
    if (p.slots > 6u) {
        ids[o + 6u] = tk.i1.z;
    }
    if (p.slots > 7u) {
        ids[o + 7u] = tk.i1.w;
    }
    let base = t * p.experts;
    raw_weights(t, base, st);
    if (p.mode == MODE_CAPACITY && p.by_top1 != 0u) {
        scratch[p.top1_off + t] = bitcast<u32>(canon(score(logits[base + ids[o]], st)));
    }
    if (p.mode == MODE_PLAIN) {
        for (var j = 0u; j < p.slots; j++) {
            kept[o + j] = 1u;
        }
        finish_weights(o);
    }
}

// ---------------------------------------------------------------------------------------------
// Token-choice capacity (and the counts of the plain mode)

// Priority position of every token: its rank by descending top-1 score, NaN last, ties by
// position (the stable sort of capacity_kept); order[rank] = t.
@compute @workgroup_size(64)
fn gate_priority(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let t = flat_id(wid, nwg, lid, WG);
    let live = t < p.tokens;
    var v = 0.0;
    if (live) {
        v = bitcast<f32>(scratch[p.top1_off + t]);
    }
    var r = 0u;
    for (var first = 0u; first < p.tokens; first += WG) {
        let i = first + lid;
        if (i < p.tokens) {
            red_f[lid] = bitcast<f32>(scratch[p.top1_off + i]);
        }
        workgroupBarrier();
        let n = min(WG, p.tokens - first);
        if (live) {
            for (var q = 0u; q < n; q++) {
                if (ranks_before(red_f[q], first + q, v, t)) {
                    r++;
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        scratch[p.order_off + r] = t;
    }
}

// Loads block b of slot j into blk_ids / blk_tok, in priority order.
fn load_block(j: u32, b: u32, lid: u32) {
    for (var i = lid; i < BLOCK; i += WG) {
        let pos = b * BLOCK + i;
        var e = NONE;
        var t = 0u;
        if (pos < p.tokens) {
            t = pos;
            if (p.by_top1 != 0u) {
                t = scratch[p.order_off + pos];
            }
            e = ids[t * p.slots + j];
        }
        blk_ids[i] = e;
        blk_tok[i] = t;
    }
}

// blk[q, e] = assignments to expert e in block q = j · blocks + b.
@compute @workgroup_size(64)
fn gate_block_counts(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let q = wid.x + wid.y * nwg.x;
    if (q >= p.slots * p.blocks) {
        return;
    }
    load_block(q / p.blocks, q % p.blocks, lid);
    workgroupBarrier();
    // Only the block's positions below T hold assignments (the rest are NONE).
    let len = min(BLOCK, p.tokens - (q % p.blocks) * BLOCK);
    for (var e = lid; e < p.experts; e += WG) {
        var n = 0u;
        for (var i = 0u; i < len; i++) {
            if (blk_ids[i] == e) {
                n++;
            }
        }
        scratch[p.blk_off + q * p.experts + e] = n;
    }
}

// Per expert: counts[e] = min(total, C); with capacity, blk[q, e] becomes the exclusive prefix
// over q (every earlier-ranked assignment to e).
@compute @workgroup_size(64)
fn gate_block_scan(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let e = wid.x + wid.y * nwg.x;
    if (e >= p.experts) {
        return;
    }
    let nq = p.slots * p.blocks;
    let chunk = (nq + WG - 1u) / WG;
    let lo = min(lid * chunk, nq);
    let hi = min(lo + chunk, nq);
    var s = 0u;
    for (var q = lo; q < hi; q++) {
        s += scratch[p.blk_off + q * p.experts + e];
    }
    red_u[lid] = s;
    workgroupBarrier();
    if (lid == 0u) {
        var run = 0u;
        for (var i = 0u; i < WG; i++) {
            let x = red_u[i];
            red_u[i] = run;
            run += x;
        }
        counts[e] = min(run, p.capacity);
    }
    workgroupBarrier();
    if (p.mode == MODE_CAPACITY) {
        var run = red_u[lid];
        for (var q = lo; q < hi; q++) {
            let i = p.blk_off + q * p.experts + e;
            let x = scratch[i];
            scratch[i] = run;
            run += x;
        }
    }
}

// kept = (position at the expert < C), position = earlier blocks + earlier in this block.
@compute @workgroup_size(64)
fn gate_capacity(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let q = wid.x + wid.y * nwg.x;
    if (q >= p.slots * p.blocks) {
        return;
    }
    let j = q / p.blocks;
    load_block(j, q % p.blocks, lid);
    workgroupBarrier();
    for (var i = lid; i < BLOCK; i += WG) {
        let e = blk_ids[i];
        if (e == NONE) {
            continue;
        }
        var pos = scratch[p.blk_off + q * p.experts + e];
        for (var h = 0u; h < i; h++) {
            if (blk_ids[h] == e) {
                pos++;
            }
        }
        kept[blk_tok[i] * p.slots + j] = select(0u, 1u, pos < p.capacity);
    }
}

// ---------------------------------------------------------------------------------------------
// Expert choice

// Tree sum over the workgroup; every invocation gets the (uniform) total.
fn wg_sum(lid: u32, v: u32) -> u32 {
    red_u[lid] = v;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            red_u[lid] += red_u[lid + s];
        }
    }
    let total = workgroupUniformLoad(&red_u[0]);
    workgroupBarrier();
    return total;
}

// Tokens whose key for expert e is >= k.
fn count_at_least(col: u32, lid: u32, k: u32) -> u32 {
    var n = 0u;
    for (var t = lid; t < p.tokens; t += WG) {
        if (scratch[col + t] >= k) {
            n++;
        }
    }
    return wg_sum(lid, n);
}

// Tokens below x whose key for expert e equals k.
fn count_equal_below(col: u32, lid: u32, k: u32, x: u32) -> u32 {
    var n = 0u;
    for (var t = lid; t < x; t += WG) {
        if (scratch[col + t] == k) {
            n++;
        }
    }
    return wg_sum(lid, n);
}

// Expert e keeps its top-C tokens by key (ties to the lower token): found by bisection as
// (threshold key v, token bound x): token t is kept iff key > v, or key == v and t < x.
@compute @workgroup_size(64)
fn gate_expert_choice(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let e = wid.x + wid.y * nwg.x;
    if (e >= p.experts) {
        return;
    }
    let col = p.ec_key_off + e * p.tokens;
    let cap = p.capacity;
    // C = 0 keeps nothing: no key exceeds 0xffffffff (the largest is +inf's).
    var v = NONE;
    var x = 0u;
    if (cap > 0u) {
        // v = the largest key with at least C tokens at or above it (the C-th largest key).
        v = 0u;
        for (var bit = 0u; bit < 32u; bit++) {
            let cand = v | (1u << (31u - bit));
            if (count_at_least(col, lid, cand) >= cap) {
                v = cand;
            }
        }
        // The ties at v fill the C - (tokens above v) places left, lowest tokens first:
        // x - 1 = the largest token bound with fewer than `need` ties below it.
        var above = 0u;
        if (v != NONE) {
            above = count_at_least(col, lid, v + 1u);
        }
        let need = cap - above;
        var x0 = 0u;
        for (var bit = 0u; bit < 32u; bit++) {
            let step = 1u << (31u - bit);
            let cand = x0 | step;
            // Uniform: every invocation takes the same branch.
            if (step < p.tokens) {
                let n = count_equal_below(col, lid, v, min(cand, p.tokens));
                if (cand < p.tokens && n < need) {
                    x0 = cand;
                }
            }
        }
        x = x0 + 1u;
    }
    if (lid == 0u) {
        scratch[p.ec_sel_off + 2u * e] = v;
        scratch[p.ec_sel_off + 2u * e + 1u] = x;
        counts[e] = cap;
    }
}

// ---------------------------------------------------------------------------------------------
// Final weights (capacity and expert choice)

@compute @workgroup_size(64)
fn gate_finish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let t = flat_id(wid, nwg, lid, WG);
    if (t >= p.tokens) {
        return;
    }
    let o = t * p.slots;
    if (p.mode == MODE_EXPERT_CHOICE) {
        for (var j = 0u; j < p.slots; j++) {
            let e = ids[o + j];
            let k = scratch[p.ec_key_off + e * p.tokens + t];
            let v = scratch[p.ec_sel_off + 2u * e];
            let x = scratch[p.ec_sel_off + 2u * e + 1u];
            kept[o + j] = select(0u, 1u, k > v || (k == v && t < x));
        }
    }
    finish_weights(o);
}
