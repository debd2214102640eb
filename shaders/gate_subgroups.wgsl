// gate_subgroups.wgsl — the subgroup form of gate_select's two workgroup reductions.
//
// Not a stage: src/wgpu/kernels.rs splices this text into shaders/gate.wgsl in place of the
// section between its portable-reductions markers (`enable subgroups;` first in a browser;
// naga takes the built-ins without it), and only for a device with
// wgpu's SUBGROUP feature (src/wgpu/gate.rs then dispatches gate_select from that module).
// It defines the same two functions with the same contracts (see gate.wgsl): every
// invocation of the workgroup calls them in uniform control flow and gets the result.
//
// Mirrors: gate.wgsl's portable wg_max_or / wg_best: the same maximum, flag and pick (so the
//   same gate outputs, bit for bit; a NaN winner's value comes back as p.nan, which the
//   caller only tests with is_nan): a maximum, an OR and a
//   best-by-rank (ranks_before: larger value first, NaN last, ties to the lower index) are
//   exact whatever order they are taken in. Values are compared as order_key (gate.wgsl): an
//   order-preserving u32, NaN lowest and −0 equal to +0 — gate_select's row values are
//   canon'ed, so neither −0 nor subnormals reach wg_best, and wg_max_or's maximum is only
//   used through exp(l − m) and is_inf, which cannot tell −0 from +0.
// Per reduction: each subgroup reduces its invocations (subgroupMax / subgroupMin /
//   subgroupOr), one invocation per subgroup (its lowest active one) folds that into a workgroup
//   atomic, and everyone reads it back: wg_max_or 3 barriers (reset, fold, read), wg_best 4
//   (reset, fold the best key, fold the lowest index holding it, read), against the tree's
//   8; any subgroup size, no assumption on how subgroups map to local_invocation_index.
// Workgroup memory: 2 atomic<u32> (8 B) on top of gate.wgsl's.
// Target: WGSL with `enable subgroups;` (wgpu Features::SUBGROUP).

var<workgroup> sg_key: atomic<u32>;
var<workgroup> sg_aux: atomic<u32>;

// Whether this invocation is its subgroup's lowest active one (subgroupElect, which naga 30
// does not parse yet).
fn leader(lid: u32) -> bool {
    return subgroupBroadcastFirst(lid) == lid;
}

// The f32 of a key order_key produced from a non-NaN value (+0 for either zero).
fn key_value(k: u32) -> f32 {
    if ((k & 0x80000000u) != 0u) {
        return bitcast<f32>(k & 0x7fffffffu);
    }
    return bitcast<f32>(~k);
}

fn wg_max_or(lid: u32, v: f32, flag: u32) -> MaxOr {
    if (lid == 0u) {
        atomicStore(&sg_key, 0u);
        atomicStore(&sg_aux, 0u);
    }
    workgroupBarrier();
    let k = subgroupMax(order_key(v));
    let f = subgroupOr(flag);
    if (leader(lid)) {
        atomicMax(&sg_key, k);
        atomicOr(&sg_aux, f);
    }
    workgroupBarrier();
    let r = MaxOr(key_value(atomicLoad(&sg_key)), atomicLoad(&sg_aux));
    workgroupBarrier();
    return r;
}

fn wg_best(lid: u32, v: f32, i: u32) -> Best {
    // 0: no candidate; a candidate's key is order_key + 1 (NaN: 1, below every number).
    var key = 0u;
    if (i != NONE) {
        key = order_key(v) + 1u;
    }
    if (lid == 0u) {
        atomicStore(&sg_key, 0u);
        atomicStore(&sg_aux, NONE);
    }
    workgroupBarrier();
    let kmax = subgroupMax(key);
    if (leader(lid)) {
        atomicMax(&sg_key, kmax);
    }
    // atomicLoad of a value other invocations may still raise would race; the barrier
    // orders every fold before any read.
    workgroupBarrier();
    let best = atomicLoad(&sg_key);
    var mine = NONE;
    if (key == best && best != 0u) {
        mine = i;
    }
    let imin = subgroupMin(mine);
    if (leader(lid)) {
        atomicMin(&sg_aux, imin);
    }
    workgroupBarrier();
    let bi = atomicLoad(&sg_aux);
    workgroupBarrier();
    if (best == 0u) {
        return Best(0.0, NONE);
    }
    if (best == 1u) {
        return Best(p.nan, bi);
    }
    return Best(key_value(best - 1u), bi);
}
