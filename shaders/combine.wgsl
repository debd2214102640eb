// combine.wgsl — stage 4: y[t, h] = output_scale · Σ_j w[t, j] · y_perm[row_of(t, j), h]
// over kept assignments in slot order j = 0..slots−1, plus g_t · shared[t, h] with
// g_t = 1, or sigmoid(shared_gate[t]) when has_shared_gate.
//
// Mirrors: src/cpu/combine.rs `combine` (f64 there, f32 here, same summation order; no
//   atomics, so the result is bitwise repeatable and independent of the batch).
// Parameters (bindings of group 0, in order):
//   0 params       uniform  CombineParams (below)
//   1 y_perm       storage read        f32 [T·slots, H]
//   2 weights      storage read        f32 [T, slots]
//   3 kept         storage read        u32 [T, slots]
//   4 row_of       storage read        u32 [T, slots]
//   5 shared       storage read        f32 [T, H]  (1-element dummy when has_shared = 0)
//   6 shared_gate  storage read        f32 [T]     (1-element dummy unless has_shared_gate)
//   7 y            storage read_write  f32 [T, H]
// Launch: one invocation per (t, h): grid(T · H, WG) workgroups of WG = 64, flattened with
//   flat_id; invocations past T · H exit.
// Target: WGSL core.

struct CombineParams {
    tokens: u32,
    slots: u32,
    hidden: u32,
    has_shared: u32,
    has_shared_gate: u32,
    output_scale: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: CombineParams;
@group(0) @binding(1) var<storage, read> y_perm: array<f32>;
@group(0) @binding(2) var<storage, read> weights: array<f32>;
@group(0) @binding(3) var<storage, read> kept: array<u32>;
@group(0) @binding(4) var<storage, read> row_of: array<u32>;
@group(0) @binding(5) var<storage, read> shared_y: array<f32>;
@group(0) @binding(6) var<storage, read> shared_gate: array<f32>;
@group(0) @binding(7) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wid, nwg, lid, 64u);
    if (i >= p.tokens * p.hidden) {
        return;
    }
    let t = i / p.hidden;
    let h = i % p.hidden;
    var acc = 0.0;
    for (var j = 0u; j < p.slots; j++) {
        let a = t * p.slots + j;
        // Dropped assignments are skipped, never multiplied: their rows are not computed.
        if (kept[a] != 0u) {
            acc += weights[a] * y_perm[row_of[a] * p.hidden + h];
        }
    }
    acc *= p.output_scale;
    if (p.has_shared != 0u) {
        var g = 1.0;
        if (p.has_shared_gate != 0u) {
            g = 1.0 / (1.0 + exp(-shared_gate[t]));
        }
        acc += g * shared_y[i];
    }
    y[i] = acc;
}
