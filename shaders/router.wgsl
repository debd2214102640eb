// router.wgsl — stage 0: router logits `logits[t, e] = Σ_h x[t, h] · W[e, h] + bias[e]`.
//
// Mirrors: src/cpu/router.rs `router_logits` (f64 there, f32 accumulation here).
// Parameters (bindings of group 0, in order):
//   0 params  uniform  RouterParams (below)
//   1 x       storage read        u32 words of x [T, H] in A_DTYPE (common.wgsl), row stride
//             x_stride elements (H for the caller's dense x)
//   2 w       storage read        vec4<u32> words of W's k-major slabs (src/wgpu/weights.rs
//             `upload_router`: experts 64·s .. 64·s + 63 of slab s stored as [H][64], the
//             matrix's last slab only last_width wide — its experts rounded up to one vec4 —
//             zero past E) of the chunk's slabs, in W_DTYPE (common.wgsl): slab s of the chunk
//             starts at element s·H·64, its row h at h·width
//   3 bias    storage read        f32  [E] (a 1-element dummy when has_bias = 0)
//   4 logits  storage read_write  f32  [T, E] (always f32)
//   5 x4      storage read        the words of binding 1 as vec4<u32> (read when x_vec4 = 1:
//             every row of x starts on a 16-byte word; a 4-word dummy otherwise)
// Overrides: W_DTYPE and A_DTYPE (common.wgsl).
// Launch: one dispatch per weight chunk (whole slabs). Jobs = (slab of the chunk, group of
//   TG = 8 tokens), slab fastest: slabs · ceil(T / 8) jobs of LPJ invocations (8 for 16-bit
//   weights, 16 for f32: one vec4<u32> of weights each per h, EPL = 8 or 4 experts), 64 / LPJ
//   jobs per workgroup of 64: grid(jobs, 64 / LPJ) (src/wgpu/context.rs `grid`, flattened x
//   first; invocations past the jobs, or past their slab's width or the chunk's experts,
//   exit). Invocation l of a job owns experts first_row + 64·s + EPL·l .. + EPL − 1 and the
//   job's ≤ 8 tokens: the LPJ invocations of a job read one 128- or 256-byte slab row per h,
//   and x 8 h at a time per token (one vec4<u32> for 16-bit rows starting on a word, two
//   for f32, else element by element). Every weight is read once per 8 tokens; no workgroup
//   memory, no barrier.
// Workgroup memory: none.
// Numerics: x is widened exactly to f32 (for A_DTYPE = 0 it is read as f32 bits), the
//   products and sums are f32.
// Determinism: every logit is one f32 accumulator, fma over h = 0, 1, …, H − 1 in order, then
//   + bias: it depends on H only — a token's logits do not depend on T, on the other tokens
//   or on which job computed them.
// lavapipe counts every loop iteration of an invocation against 65535: the h loop makes
//   ceil(H / 8) + 7 iterations (inner steps unrolled), so H up to ~500k.
// Target: WGSL core; no subgroup operations (any subgroup size).

struct RouterParams {
    tokens: u32,
    experts: u32,
    hidden: u32,
    has_bias: u32,
    first_row: u32, // first expert of the chunk (64 · its first slab)
    rows: u32,      // experts in the chunk
    x_stride: u32,  // elements between rows of x
    x_vec4: u32,    // 1: rows of x start on 16-byte words (read through x4)
    slabs: u32,     // slabs in the chunk
    last_width: u32, // columns of the chunk's last slab (64 but in the matrix's last chunk)
    _pad1: u32,
    _pad2: u32,
}

const TG: u32 = 8u;

@group(0) @binding(0) var<uniform> p: RouterParams;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> logits: array<f32>;
@group(0) @binding(5) var<storage, read> x4: array<vec4<u32>>;

// Element h of token t of x, widened to f32.
fn x_elem(t: u32, h: u32) -> f32 {
    let i = t * p.x_stride + h;
    return a_decode(x[a_word(i)], i);
}

// Elements h0 .. h0 + 7 (all < H) of token t.
fn x8(t: u32, h0: u32) -> V8 {
    let i = t * p.x_stride + h0;
    if (p.x_vec4 != 0u) {
        if (A_DTYPE == 0u) {
            return V8(bitcast<vec4<f32>>(x4[i >> 2u]), bitcast<vec4<f32>>(x4[(i >> 2u) + 1u]));
        }
        return a_decode8(x4[i >> 3u]);
    }
    return V8(vec4<f32>(x_elem(t, h0), x_elem(t, h0 + 1u), x_elem(t, h0 + 2u), x_elem(t, h0 + 3u)),
              vec4<f32>(x_elem(t, h0 + 4u), x_elem(t, h0 + 5u), x_elem(t, h0 + 6u), x_elem(t, h0 + 7u)));
}

// Experts per invocation: one vec4<u32> of weights, 4 f32 or 8 16-bit.
fn epl() -> u32 {
    return select(8u, 4u, W_DTYPE == 0u);
}

// This invocation's EPL weights at h (f32: in lo; hi is 0) of the slab starting at vec4 word
// `sv` with rows of `width` elements: columns EPL·l .. EPL·l + EPL − 1.
fn w8(sv: u32, width: u32, h: u32, l: u32) -> V8 {
    let v = w[sv + h * width / (16u / select(2u, 4u, W_DTYPE == 0u)) + l];
    if (W_DTYPE == 0u) {
        return V8(bitcast<vec4<f32>>(v), vec4<f32>(0.0));
    }
    return w_decode8(v);
}

fn fma8(acc: V8, a: f32, wv: V8) -> V8 {
    var hi = acc.hi;
    if (W_DTYPE != 0u) {
        hi = fma(vec4<f32>(a), wv.hi, acc.hi);
    }
    return V8(fma(vec4<f32>(a), wv.lo, acc.lo), hi);
}

// Accumulators of the job's tokens 0..7 (8 experts each).
struct Acc {
    t0: V8,
    t1: V8,
    t2: V8,
    t3: V8,
    t4: V8,
    t5: V8,
    t6: V8,
    t7: V8,
}

// One h: acc_i += x_i · wv for token i (only token 0 unless `many`; tokens past the job's
// have x = 0 and are never stored).
fn step(acc_in: Acc, xa: vec4<f32>, xb: vec4<f32>, wv: V8, many: bool) -> Acc {
    var acc = acc_in;
    acc.t0 = fma8(acc.t0, xa.x, wv);
    if (many) {
        acc.t1 = fma8(acc.t1, xa.y, wv);
        acc.t2 = fma8(acc.t2, xa.z, wv);
        acc.t3 = fma8(acc.t3, xa.w, wv);
        acc.t4 = fma8(acc.t4, xb.x, wv);
        acc.t5 = fma8(acc.t5, xb.y, wv);
        acc.t6 = fma8(acc.t6, xb.z, wv);
        acc.t7 = fma8(acc.t7, xb.w, wv);
    }
    return acc;
}

// x of token i of the job at h0 .. h0 + 7, or zeros past the job's `nt` tokens.
fn xt(t0: u32, nt: u32, i: u32, h0: u32) -> V8 {
    if (i < nt) {
        return x8(t0 + i, h0);
    }
    return V8(vec4<f32>(0.0), vec4<f32>(0.0));
}

// Element q of token i's 8 values, for the eight tokens (xa: tokens 0..3, xb: 4..7).
fn col(a: array<V8, 8>, q: u32) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(
        vec4<f32>(v8_get(a[0], q), v8_get(a[1], q), v8_get(a[2], q), v8_get(a[3], q)),
        vec4<f32>(v8_get(a[4], q), v8_get(a[5], q), v8_get(a[6], q), v8_get(a[7], q)));
}

fn hq(acc: Acc, s: vec2<u32>, h: u32, l: u32, a: array<V8, 8>, q: u32, many: bool) -> Acc {
    let c = col(a, q);
    return step(acc, c[0], c[1], w8(s.x, s.y, h, l), many);
}

// The whole sum over h for the job's tokens (many: up to 8; else token 0 only), from the
// slab at vec4 word s.x with rows of s.y elements.
fn sum_h(s: vec2<u32>, l: u32, t0: u32, nt: u32, many: bool) -> Acc {
    let z = V8(vec4<f32>(0.0), vec4<f32>(0.0));
    var acc = Acc(z, z, z, z, z, z, z, z);
    let hd = p.hidden;
    var h0 = 0u;
    for (; h0 + 8u <= hd; h0 += 8u) {
        var a = array<V8, 8>(x8(t0, h0), z, z, z, z, z, z, z);
        if (many) {
            a = array<V8, 8>(a[0], xt(t0, nt, 1u, h0), xt(t0, nt, 2u, h0), xt(t0, nt, 3u, h0),
                             xt(t0, nt, 4u, h0), xt(t0, nt, 5u, h0), xt(t0, nt, 6u, h0), xt(t0, nt, 7u, h0));
        }
        // h0 .. h0 + 7 in order, unrolled (lavapipe's loop-iteration limit).
        acc = hq(acc, s, h0, l, a, 0u, many);
        acc = hq(acc, s, h0 + 1u, l, a, 1u, many);
        acc = hq(acc, s, h0 + 2u, l, a, 2u, many);
        acc = hq(acc, s, h0 + 3u, l, a, 3u, many);
        acc = hq(acc, s, h0 + 4u, l, a, 4u, many);
        acc = hq(acc, s, h0 + 5u, l, a, 5u, many);
        acc = hq(acc, s, h0 + 6u, l, a, 6u, many);
        acc = hq(acc, s, h0 + 7u, l, a, 7u, many);
    }
    for (var h = h0; h < hd; h++) {
        var xa = vec4<f32>(0.0);
        var xb = vec4<f32>(0.0);
        xa.x = x_elem(t0, h);
        if (many) {
            for (var i = 1u; i < nt; i++) {
                let v = x_elem(t0 + i, h);
                if (i < 4u) {
                    xa[i] = v;
                } else {
                    xb[i - 4u] = v;
                }
            }
        }
        acc = step(acc, xa, xb, w8(s.x, s.y, h, l), many);
    }
    return acc;
}

// Stores token t's logits of this invocation's experts (chunk-relative e0 .. e0 + EPL − 1).
fn store(t: u32, e0: u32, v: V8) {
    for (var q = 0u; q < epl(); q++) {
        let el = e0 + q;
        if (el < p.rows) {
            let e = p.first_row + el;
            var r = v8_get(v, q);
            if (p.has_bias != 0u) {
                r += bias[e];
            }
            logits[t * p.experts + e] = r;
        }
    }
}

@compute @workgroup_size(64)
fn router_logits(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let lpj = 64u / epl(); // invocations per job
    let lane = (wid.x + wid.y * nwg.x) * 64u + lid;
    let job = lane / lpj;
    let l = lane % lpj;
    let groups = (p.tokens + TG - 1u) / TG;
    if (p.slabs == 0u || job >= p.slabs * groups) {
        return;
    }
    let s = job % p.slabs;
    let t0 = (job / p.slabs) * TG;
    let nt = min(TG, p.tokens - t0);
    let width = select(64u, p.last_width, s + 1u == p.slabs);
    let e0 = s * 64u + epl() * l;
    if (epl() * l >= width || e0 >= p.rows) {
        return; // past the slab's stored columns, or the zero padding past the experts
    }
    // The slab's first vec4 word (slab s starts at element s·H·64) and its row width.
    let sv = vec2<u32>(s * p.hidden * 64u / (16u / select(2u, 4u, W_DTYPE == 0u)), width);
    var acc: Acc;
    if (nt == 1u) {
        acc = sum_h(sv, l, t0, nt, false);
    } else {
        acc = sum_h(sv, l, t0, nt, true);
    }
    store(t0, e0, acc.t0);
    if (nt > 1u) {
        store(t0 + 1u, e0, acc.t1);
    }
    if (nt > 2u) {
        store(t0 + 2u, e0, acc.t2);
    }
    if (nt > 3u) {
        store(t0 + 3u, e0, acc.t3);
    }
    if (nt > 4u) {
        store(t0 + 4u, e0, acc.t4);
    }
    if (nt > 5u) {
        store(t0 + 5u, e0, acc.t5);
    }
    if (nt > 6u) {
        store(t0 + 6u, e0, acc.t6);
    }
    if (nt > 7u) {
        store(t0 + 7u, e0, acc.t7);
    }
}
