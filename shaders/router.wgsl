// router.wgsl — stage 0: router logits `logits[t, e] = Σ_h x[t, h] · W[e, h] + bias[e]`.
//
// Mirrors: src/cpu/router.rs `router_logits` (f64 there, f32 accumulation here).
// Parameters (bindings of group 0, in order):
//   0 params  uniform  RouterParams (below)
//   1 x       storage read        u32 words of x [T, H] in A_DTYPE (common.wgsl), row stride
//             x_stride elements (H for the caller's dense x)
//   2 w       storage read        u32 words of W rows first_row .. first_row + rows, [rows, H]
//             in W_DTYPE (common.wgsl)
//   3 bias    storage read        f32  [E] (a 1-element dummy when has_bias = 0)
//   4 logits  storage read_write  f32  [T, E] (always f32)
// Overrides: W_DTYPE and A_DTYPE (common.wgsl).
// Launch: one workgroup of RWG = 64 invocations per (t, e) pair of the chunk:
//   T · rows workgroups on a 2-D grid (src/wgpu/context.rs `grid(T · rows, 1)`), flattened as
//   pair = wid.x + wid.y · nwg.x = t · rows + (e − first_row); workgroups past T · rows exit.
//   One dispatch per weight chunk.
// Workgroup memory: RWG f32 partial sums = 256 B.
// Numerics: x is widened exactly to f32 (for A_DTYPE = 0 it is read as f32 bits), the
//   products and sums are f32.
// Determinism: invocation i sums h = i, i + 64, i + 128, … in order with fma (coalesced: the 64
//   invocations read 64 consecutive elements of x[t] and of W[e]); the 64 partial sums are then
//   added by a fixed pairwise tree (strides 32, 16, …, 1). The shape of the sum depends on H
//   only: a token's logits do not depend on T or on the other tokens.
// Target: WGSL core; no subgroup operations (any subgroup size).

struct RouterParams {
    tokens: u32,
    experts: u32,
    hidden: u32,
    has_bias: u32,
    first_row: u32,
    rows: u32,
    x_stride: u32, // elements between rows of x
    _pad1: u32,
}

const RWG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: RouterParams;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> logits: array<f32>;

var<workgroup> part: array<f32, RWG>;

@compute @workgroup_size(64)
fn router_logits(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let pair = wid.x + wid.y * nwg.x;
    if (pair >= p.tokens * p.rows) {
        return; // the whole workgroup: pair is uniform
    }
    let t = pair / p.rows;
    let el = pair % p.rows;
    let e = p.first_row + el;
    let hd = p.hidden;
    var acc = 0.0;
    for (var h = lid; h < hd; h += RWG) {
        let wi = el * hd + h;
        let xi = t * p.x_stride + h;
        acc = fma(a_decode(x[a_word(xi)], xi), w_decode(w[w_word(wi)], wi), acc);
    }
    part[lid] = acc;
    workgroupBarrier();
    for (var s = RWG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            part[lid] += part[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        var r = part[0];
        if (p.has_bias != 0u) {
            r += bias[e];
        }
        logits[t * p.experts + e] = r;
    }
}
