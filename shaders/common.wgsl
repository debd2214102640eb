// common.wgsl — prepended by the crate to every stage shader (src/wgpu/kernels.rs), so each
// module gets the same weight decoding, NaN-aware ranking, grid flattening and the V8 unit
// of 128-bit loads (w_decode8 / a_decode8).
//
// Mirrors: the element widening of src/tensor.rs (`Tensor::get`) and the ranking order of
// src/cpu/mod.rs (`rank_cmp` / `top_n`: larger first, NaN below every number, ties to the
// lower index).
// Target: WGSL core, no extensions (no shader-f16, no subgroups), any subgroup size.

// Weight element type of the bound weight words: 0 = f32 (one per u32), 1 = f16, 2 = bf16
// (two per u32, element 2i in the low half). Set per pipeline.
override W_DTYPE: u32 = 0u;

// Index of the u32 word holding weight element `i`.
fn w_word(i: u32) -> u32 {
    if (W_DTYPE == 0u) {
        return i;
    }
    return i >> 1u;
}

// Weight element `i` from the word that holds it, widened to f32.
fn w_decode(word: u32, i: u32) -> f32 {
    if (W_DTYPE == 0u) {
        return bitcast<f32>(word);
    }
    let half = select(word & 0xffffu, word >> 16u, (i & 1u) == 1u);
    if (W_DTYPE == 1u) {
        return unpack2x16float(half).x;
    }
    return bitcast<f32>(half << 16u);
}

// ---------------------------------------------------------------------------------------------
// Quantized weight codes (src/quant/decode.rs, bit for bit): each decodes to the f32 value the
// CPU reference widens to f64, built from its bits (never with exp2, whose accuracy WGSL leaves
// open).

// float8_e4m3fn byte `q`: sign bit 7, exponent bits 6..3 (bias 7), mantissa bits 2..0;
// exponent 0 is subnormal (m · 2^-9, exact in f32); 0x7f / 0xff are NaN; no infinities.
fn e4m3_to_f32(q: u32) -> f32 {
    let s = (q & 0x80u) << 24u;
    let e = (q >> 3u) & 0xfu;
    let m = q & 7u;
    if (e == 0xfu && m == 7u) {
        return bitcast<f32>(s | 0x7fc00000u);
    }
    if (e == 0u) {
        return bitcast<f32>(s | bitcast<u32>(f32(m) * 0.001953125));
    }
    return bitcast<f32>(s | ((e + 120u) << 23u) | (m << 20u));
}

// e2m1 nibble `q` (OCP MX FP4): bit 3 the sign, magnitudes [0, .5, 1, 1.5, 2, 3, 4, 6]:
// exponent bits 2..1 (bias 1), mantissa bit 0; exponent 0 is subnormal (m · 0.5).
fn e2m1_to_f32(q: u32) -> f32 {
    let s = (q & 8u) << 28u;
    let e = (q >> 1u) & 3u;
    let m = q & 1u;
    if (e == 0u) {
        return bitcast<f32>(s | bitcast<u32>(f32(m) * 0.5));
    }
    return bitcast<f32>(s | ((e + 126u) << 23u) | (m << 22u));
}

// The f32 bits of the e8m0 scale 2^(code − 127): code 0 is the subnormal 2^-127 (which WGSL
// implementations may flush to 0), code 255 is +inf (transformers' 2.0 ** 128, see
// src/quant/decode.rs `e8m0_bits`).
fn e8m0_bits(code: u32) -> u32 {
    if (code == 0u) {
        return 0x00400000u;
    }
    if (code == 255u) {
        return 0x7f800000u;
    }
    return code << 23u;
}

// NaN test on the bits: compilers may assume `x != x` is false.
fn is_nan(x: f32) -> bool {
    let b = bitcast<u32>(x);
    return (b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0u;
}

// True when (a, ia) ranks before (b, ib): larger value first, every NaN below every number
// (NaNs equal), ties to the lower index.
fn ranks_before(a: f32, ia: u32, b: f32, ib: u32) -> bool {
    let na = is_nan(a);
    let nb = is_nan(b);
    if (na || nb) {
        if (na && nb) {
            return ia < ib;
        }
        return nb;
    }
    if (a != b) {
        return a > b;
    }
    return ia < ib;
}

// Flattened invocation index of a 1-D kernel dispatched on a 2-D grid (x first).
fn flat_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, wg: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * wg + lid;
}

// ---------------------------------------------------------------------------------------------
// Activations (x, x_perm, h, y_perm, the shared expert's output, y): bound as u32 words in
// A_DTYPE, same codes as W_DTYPE: 0 = f32 (one per word), 1 = f16, 2 = bf16 (two per word,
// element 2i of the buffer in the low half). Internal matrices have an even row stride in the
// 16-bit dtypes (src/wgpu/act.rs). Reads widen exactly; writes round the f32 result to the
// nearest A_DTYPE value, ties to even (WGSL leaves the rounding of pack2x16float unspecified
// and its out-of-range results indeterminate, so both conversions are done on the bits).
override A_DTYPE: u32 = 0u;

// Index of the u32 word holding activation element `i`.
fn a_word(i: u32) -> u32 {
    if (A_DTYPE == 0u) {
        return i;
    }
    return i >> 1u;
}

// The 16 bits of activation element `i` (A_DTYPE 1 or 2) from the word that holds it.
fn a_half(word: u32, i: u32) -> u32 {
    return select(word & 0xffffu, word >> 16u, (i & 1u) == 1u);
}

// f16 bits to f32, exactly (subnormals included: m · 2^-24 is exact in f32).
fn f16_bits_to_f32(h: u32) -> f32 {
    let s = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0x1fu) {
        return bitcast<f32>(s | 0x7f800000u | (m << 13u));
    }
    if (e == 0u) {
        return bitcast<f32>(s | bitcast<u32>(f32(m) * 5.9604644775390625e-8));
    }
    return bitcast<f32>(s | ((e + 112u) << 23u) | (m << 13u));
}

// Activation element `i` from the word that holds it, widened to f32 (exact).
fn a_decode(word: u32, i: u32) -> f32 {
    if (A_DTYPE == 0u) {
        return bitcast<f32>(word);
    }
    let h = a_half(word, i);
    if (A_DTYPE == 1u) {
        return f16_bits_to_f32(h);
    }
    return bitcast<f32>(h << 16u);
}

// Eight f32 values (elements 0..3 in lo, 4..7 in hi): what one 128-bit word of 16-bit
// elements widens to (the router's and the expert GEMMs' small-batch loads).
struct V8 {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn v8_get(v: V8, i: u32) -> f32 {
    if (i < 4u) {
        return v.lo[i];
    }
    return v.hi[i - 4u];
}

// The 8 16-bit weights of one 128-bit word (W_DTYPE 1 or 2), widened to f32.
fn w_decode8(v: vec4<u32>) -> V8 {
    return V8(vec4<f32>(w_decode(v.x, 0u), w_decode(v.x, 1u), w_decode(v.y, 0u), w_decode(v.y, 1u)),
              vec4<f32>(w_decode(v.z, 0u), w_decode(v.z, 1u), w_decode(v.w, 0u), w_decode(v.w, 1u)));
}

// The 8 16-bit activations of one 128-bit word (A_DTYPE 1 or 2), widened exactly to f32.
fn a_decode8(v: vec4<u32>) -> V8 {
    return V8(vec4<f32>(a_decode(v.x, 0u), a_decode(v.x, 1u), a_decode(v.y, 0u), a_decode(v.y, 1u)),
              vec4<f32>(a_decode(v.z, 0u), a_decode(v.z, 1u), a_decode(v.w, 0u), a_decode(v.w, 1u)));
}

// f32 to f16 bits, round to nearest, ties to even; overflow to ±inf, NaN stays NaN (quiet,
// top payload bits kept), as the `half` crate's f16::from_f32.
fn f32_to_f16_bits(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    let s = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return s | 0x7e00u | ((a >> 13u) & 0x3ffu);
    }
    if (a >= 0x477ff000u) {
        return s | 0x7c00u; // ≥ 65520 (the midpoint above 65504, ties to even) and ±inf
    }
    if (a >= 0x38800000u) {
        // Normal: rebias the exponent (127 → 15), round off 13 mantissa bits; a carry into
        // the exponent is the correct result.
        let r = a - 0x38000000u;
        return s | ((r + 0xfffu + ((r >> 13u) & 1u)) >> 13u);
    }
    if (a < 0x33000000u) {
        return s; // below 2^-25 (half the smallest subnormal, a tie rounding to 0 included)
    }
    // Subnormal: round(|v| · 2^24) = round(m · 2^(e − 126)), m with its implicit bit.
    let e = a >> 23u;
    let m = (a & 0x7fffffu) | 0x800000u;
    let sh = 126u - e; // 14 ..= 24
    var q = m >> sh;
    let rem = m & ((1u << sh) - 1u);
    let half = 1u << (sh - 1u);
    if (rem > half || (rem == half && (q & 1u) == 1u)) {
        q += 1u;
    }
    return s | q;
}

// f32 to bf16 bits, round to nearest, ties to even; NaN stays NaN (quiet), as the `half`
// crate's bf16::from_f32.
fn f32_to_bf16_bits(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// The 16 bits of `v` rounded to A_DTYPE (1 or 2).
fn a_bits16(v: f32) -> u32 {
    if (A_DTYPE == 1u) {
        return f32_to_f16_bits(v);
    }
    return f32_to_bf16_bits(v);
}

// One output word of two 16-bit activations (lo = the even element), rounded to A_DTYPE.
fn a_pack2(lo: f32, hi: f32) -> u32 {
    return a_bits16(lo) | (a_bits16(hi) << 16u);
}
