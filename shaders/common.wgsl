// common.wgsl — prepended by the crate to every stage shader (src/wgpu/kernels.rs), so each
// module gets the same weight decoding, NaN-aware ranking and grid flattening.
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
