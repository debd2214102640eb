// router.wgsl — stage 0: router logits `logits[t, e] = Σ_h x[t, h] · W[e, h] + bias[e]`.
//
// Mirrors: src/cpu/router.rs `router_logits` (f64 there, f32 accumulation here).
// Parameters (bindings of group 0, in order):
//   0 params  uniform  RouterParams (below)
//   1 x       storage read        f32  [T, H]
//   2 w       storage read        u32 words of W rows first_row .. first_row + rows, [rows, H]
//             in W_DTYPE (common.wgsl)
//   3 bias    storage read        f32  [E] (a 1-element dummy when has_bias = 0)
//   4 logits  storage read_write  f32  [T, E]
// Launch: one invocation per (t, e) of the chunk: grid(T · rows, WG) workgroups of WG = 64,
//   flattened with flat_id; invocations past T · rows exit. One dispatch per weight chunk.
// Target: WGSL core; f32 accumulation in h order (deterministic, batch-independent).

struct RouterParams {
    tokens: u32,
    experts: u32,
    hidden: u32,
    has_bias: u32,
    first_row: u32,
    rows: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: RouterParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> logits: array<f32>;

@compute @workgroup_size(64)
fn router_logits(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wid, nwg, lid, 64u);
    if (i >= p.tokens * p.rows) {
        return;
    }
    let t = i / p.rows;
    let el = i % p.rows;
    let e = p.first_row + el;
    var acc = 0.0;
    for (var h = 0u; h < p.hidden; h++) {
        let wi = el * p.hidden + h;
        acc += x[t * p.hidden + h] * w_decode(w[w_word(wi)], wi);
    }
    if (p.has_bias != 0u) {
        acc += bias[e];
    }
    logits[t * p.experts + e] = acc;
}
