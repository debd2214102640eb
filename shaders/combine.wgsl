// combine.wgsl — stage 4: y[t, h] = output_scale · Σ_j w[t, j] · y_perm[row_of(t, j), h]
// over kept assignments in slot order j = 0..slots−1, plus g_t · shared[t, h] with
// g_t = 1, or sigmoid(shared_gate[t]) when has_shared_gate.
//
// Mirrors: src/cpu/combine.rs `combine` (f64 there, f32 here, same summation order; no
//   atomics, so the result is bitwise repeatable and independent of the batch).
// Activations (y_perm, shared, y) are u32 words in A_DTYPE (common.wgsl; layout in
//   src/wgpu/act.rs): element (r, h) of a matrix with row stride s is element r·s + h of its
//   words. Each element is widened exactly, summed in f32 and rounded once (to nearest even)
//   at the store. Weights and gate logits are f32.
// Parameters (bindings of group 0, in order):
//   0 params       uniform  CombineParams (below)
//   1 y_perm       storage read        words of y_perm [T·slots, H], row stride yp_stride
//   2 weights      storage read        f32 [T, slots]
//   3 kept         storage read        u32 [T, slots]
//   4 row_of       storage read        u32 [T, slots]
//   5 shared       storage read        words of shared [T, H], row stride sh_stride
//                                      (1-word dummy when has_shared = 0)
//   6 shared_gate  storage read        f32 [T]     (1-element dummy unless has_shared_gate)
//   7 y            storage read_write  words of y [T, H], row stride y_stride; out
// Overrides: A_DTYPE (common.wgsl).
// Launch: one invocation per word of y: grid(y_words, WG) workgroups of WG = 64, flattened
//   with flat_id; y_words = words spanned by the T rows ((T − 1)·y_stride + H elements: T·H
//   for the caller's dense y); invocations past y_words exit. f32: word = element (positions
//   in the row padding, h ≥ H, are left untouched). f16 / bf16: word i holds positions 2i and
//   2i + 1, both computed by this invocation; a position in the padding or past the last
//   row is written as 0 (so every word is written whole, by one invocation).
// Target: WGSL core.

struct CombineParams {
    tokens: u32,
    slots: u32,
    hidden: u32,
    has_shared: u32,
    has_shared_gate: u32,
    output_scale: f32,
    yp_stride: u32,
    sh_stride: u32,
    y_stride: u32,
    y_words: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: CombineParams;
@group(0) @binding(1) var<storage, read> y_perm: array<u32>;
@group(0) @binding(2) var<storage, read> weights: array<f32>;
@group(0) @binding(3) var<storage, read> kept: array<u32>;
@group(0) @binding(4) var<storage, read> row_of: array<u32>;
@group(0) @binding(5) var<storage, read> shared_y: array<u32>;
@group(0) @binding(6) var<storage, read> shared_gate: array<f32>;
@group(0) @binding(7) var<storage, read_write> y: array<u32>;

// y[t, h] in f32 (before rounding to A_DTYPE).
fn combine_elem(t: u32, h: u32) -> f32 {
    var acc = 0.0;
    for (var j = 0u; j < p.slots; j++) {
        let a = t * p.slots + j;
        // Dropped assignments are skipped, never multiplied: their rows are not computed.
        if (kept[a] != 0u) {
            let i = row_of[a] * p.yp_stride + h;
            acc += weights[a] * a_decode(y_perm[a_word(i)], i);
        }
    }
    acc *= p.output_scale;
    if (p.has_shared != 0u) {
        var g = 1.0;
        if (p.has_shared_gate != 0u) {
            g = 1.0 / (1.0 + exp(-shared_gate[t]));
        }
        let i = t * p.sh_stride + h;
        acc += g * a_decode(shared_y[a_word(i)], i);
    }
    return acc;
}

// The value at position `pos` of y's words (0 in the row padding or past the last row).
fn combine_pos(pos: u32) -> f32 {
    let t = pos / p.y_stride;
    let h = pos % p.y_stride;
    if (t >= p.tokens || h >= p.hidden) {
        return 0.0;
    }
    return combine_elem(t, h);
}

@compute @workgroup_size(64)
fn combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wid, nwg, lid, 64u);
    if (i >= p.y_words) {
        return;
    }
    if (A_DTYPE == 0u) {
        let h = i % p.y_stride;
        if (h < p.hidden) {
            y[i] = bitcast<u32>(combine_elem(i / p.y_stride, h));
        }
        return;
    }
    y[i] = a_pack2(combine_pos(2u * i), combine_pos(2u * i + 1u));
}
