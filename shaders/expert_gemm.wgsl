// expert_gemm.wgsl — stage 3: the grouped expert FFN, two grouped GEMMs over the permuted rows.
//   GEMM 1 (expert_up):   h[r, f] = act(x[r]·Wg[e, f]ᵀ + bg[e, f], x[r]·Wu[e, f]ᵀ + bu[e, f])
//                         (gated: swiglu, geglu, clamped_swiglu) or act(x[r]·Wu[e, f]ᵀ + bu[e, f])
//                         (relu, gelu); the activation is this GEMM's epilogue, and the gate and
//                         up tiles of a column block are computed by the same workgroup.
//   GEMM 2 (expert_down): y[r, o] = h[r]·Wd[e, o]ᵀ + bd[e, o].
//   Rows r of expert e are offsets[e] .. offsets[e+1]; rows from offsets[E] on are not written.
//
// Mirrors: src/cpu/expert_gemm.rs `expert_ffn` / `ffn_row` / `activate` (f64 there; f32 here).
//   GELU is exact: x·Φ(x) with Φ from an erf/erfc evaluation (`phi` below, ≤ 5e-7 relative in
//   f32 arithmetic with correctly rounded exp, ~1e-7 typical).
//
// Entry points: expert_up / expert_down (the tiled GEMM below, any row count) and, for at most
// RB_M = 32 rows in all (decode and small batches; chosen on the host): for dense weights
// expert_up_gemv / expert_down_gemv (the split-k GEMV over k-major slabs, at the end of
// this file); for quantized weights expert_up_rows / expert_down_rows (scalar weight words:
// one u32 word and one scale fetched per element) and expert_up_rows_x4 /
// expert_down_rows_x4 (128-bit weight words).
// The host (src/wgpu/expert_gemm.rs `pass_entry`, src/wgpu/weights.rs `vec4_rows`) picks the
// _x4 form for a pass exactly when every weight row is a whole number of 16-byte words of whole
// elements: dense K % 4 = 0 (f32) or K % 8 = 0 (f16 / bf16), each word 4 or 8 elements;
// FP8 K % 16 = 0 (16 e4m3 codes a word), MXFP4 / INT4 K % 32 = 0 (32 nibbles a word), the
// codes decoded with one scale (and zero point) fetch per group in the word (rows_q_*
// below). Any other K (odd K included) takes the scalar *_rows form; each pass (up, down) is
// chosen on its own K. All eight compute every output with the same arithmetic (see
// Determinism).
//
// Dense weights (W_QUANT = 0) are k-major slabs (src/wgpu/weights.rs): per expert, each block
// of SLAB = 64 output columns n = 64·s .. 64·s + 63 (zero past N) is a [K][64] slab, element
// (k, j) at k·64 + j of it; slabs of a matrix follow each other expert by expert, and a chunk
// holds whole slabs (so a dense chunk starts on a slab, at an even expert-local column).
// Element (n, k) of expert e is element ((e·⌈N/64⌉ + n / 64 − s_row0)·K + k)·64 + n % 64 of
// the chunk (w_elem; s_rows_e = ⌈N/64⌉ and s_row0 = the chunk's first slab in GemmParams).
//
// Every entry point runs the same GEMM `out[r, n] = epilogue(Σ_k a[r, k] · W[row(e, n), k])`
// with the weight rows of expert e at e·N .. e·N + N of the flattened [E·N, K] weight view:
//                 a        K   N   W (rows of the flattened view)       out
//   expert_up     x [rows,H]  H   F   Wu / Wg  [E·F, H]                   h [rows, F]
//   expert_down   h [rows,F]  F   H   Wd       [E·H, F]                   y [rows, H]
//
// Activations (a and out) are u32 words in A_DTYPE (common.wgsl; layout in src/wgpu/act.rs):
// element (r, k) of a is element r·a_stride + k of its words (the caller's dense x: a_stride =
// H; x_perm and h: the padded stride), out has an even row stride out_stride for f16 / bf16.
// a is widened exactly; every output is the f32 result rounded once, to nearest even, at the
// store. Output ownership (no word written by two invocations of one dispatch): f32 writes
// one word per output; f16 / bf16 compute the two columns of a word in one invocation (the
// column mapping below) and write the word whole. Column tiles then start on an even
// expert-local column: one column early where a weight chunk starts at an odd one; that
// column, and a column past the chunk's end, belongs to the neighbouring chunk's dispatch
// (a later or earlier pass), so the half of the word holding it is kept (read-modify-write);
// the padding column N of an odd-N row is written as 0.
// Weights are bound one row chunk at a time (src/wgpu/weights.rs: chunks keep every binding under
// the adapter's limit); a chunk may start and end in the middle of an expert. One dispatch per
// chunk covers every (expert, column) pair whose weight row lies in that chunk, indexing the
// chunk with chunk-relative rows (e·N + n − chunk_first; dense slabs as above).
//
// Quantized weights (W_QUANT ≠ 0; DESIGN.md section 4, src/quant/): the chunk's words hold the
// file's bytes in three sections, each starting on a 16-byte boundary (src/wgpu/weights.rs),
// byte i of the buffer being bits 8·(i % 4) .. 8·(i % 4) + 7 of word i / 4:
//   codes  from word 0: chunk-relative row r at byte r·row_bytes. FP8 (W_QUANT 1): one e4m3
//          byte per k (row_bytes = K; odd K: rows start mid-word, so codes are read by byte
//          index). MXFP4 (2) / INT4 (3): byte k / 2 of the row, the low nibble for even k
//          (row_bytes = ⌈K/2⌉).
//   scales from word s_off, s_cols per scale row, in S_DTYPE: f32 one per word; f16 / bf16
//          two per word (the even scale low); e8m0 one byte each. The scale of (row r of
//          expert e at expert-local column n, k) is scale row srow, column k / W_GROUP:
//          FP8: srow = e·s_rows_e + n / 128 − s_row0 (the chunk holds the whole matrix's scale
//          rows s_row0 ..); MXFP4 / INT4: srow = r (one scale row per weight row).
//   zeros  from word z_off (INT4 with W_ZEROS = 1): one byte per scale, same index; else 8.
// Decode (src/quant/mod.rs `QuantMatrix::get`, in f32; `q_value` below, the one definition
// every entry point uses): FP8 e4m3(q) · s; MXFP4
// e2m1(q) · 2^(s − 127) (the e8m0 scale built from its bits: code 0 is the subnormal 2^-127,
// which WGSL implementations may flush to 0, so such blocks may decode to 0 here; 255 is
// +inf); INT4 (f32(q) − f32(z)) · s. Each product is the exact value rounded once to f32
// (MXFP4's is exact but for subnormal results); the decoded weight is one f32 that enters
// the same fma chain as a dense weight (see Determinism). No dequantized copy exists.
// The tiled and scalar *_rows entry points decode element by element through w_b / w_g
// (w_elem: a code byte and a scale per element); the *_rows_x4 ones read the same words
// through w4_b / w4_g: the codes as 16-byte words, the scales and zeros as words of them.
//
// Parameters (bindings of group 0; expert_up / expert_down and the *_rows entry points use
// 0..7, the *_rows_x4 entry points use 0, 1, 2, 5, 6, 7, 8, 9 (never 3 or 4, also for
// quantized weights), the *_gemv ones those and 10; at most 8 storage buffers per entry
// point, WebGPU's default limit, so quantized sections share the weight binding):
//   0 p        uniform             GemmParams (below)
//   1 offsets  storage read        u32 [E + 1]  expert_offsets (on the device, never read by the host)
//   2 a        storage read        u32 words of a [rows, K] in A_DTYPE, row stride a_stride
//                                  (x_perm or x for expert_up, h for expert_down)
//   3 w_b      storage read        u32 words of the weight rows chunk_first .. chunk_first +
//                                  chunk_rows of Wu (expert_up) or Wd (expert_down), [chunk_rows, K]
//                                  in W_DTYPE (common.wgsl), or quantized: codes, scales, zeros
//                                  (above)
//   4 w_g      storage read        u32 words of the same rows of Wg, same layout and offsets
//                                  (gated expert_up only; a 1-word dummy otherwise)
//   5 bias_b   storage read        f32 [E·N]  bu or bd (a 1-element dummy when has_bias bit 0 is 0)
//   6 bias_g   storage read        f32 [E·F]  bg (a 1-element dummy when has_bias bit 1 is 0)
//   7 out      storage read_write  u32 words of out [rows, N] in A_DTYPE, row stride out_stride
//                                  (h for expert_up, y for expert_down)
//   8 w4_b     storage read        vec4<u32> view of the words of binding 3 (*_rows_x4 only;
//                                  quantized: codes, scales and zeros, all through this view)
//   9 w4_g     storage read        vec4<u32> view of the words of binding 4 (*_rows_x4 only;
//                                  a 4-word dummy when not gated)
//   (*_gemv: bindings 8 and 9 are the dense slab words of Wu / Wd and Wg)
//   10 a4      storage read        vec4<u32> view of the words of binding 2 (*_gemv only;
//                                  read when a_vec4 = 1, a 4-word dummy otherwise)
// Overrides: W_DTYPE and A_DTYPE (common.wgsl); ACT: 0 none (expert_down), 1 swiglu,
//   2 geglu, 3 relu, 4 gelu, 5 clamped_swiglu (alpha and limit in p); W_QUANT: 0 dense
//   (W_DTYPE), 1 fp8 block, 2 mxfp4, 3 int4; S_DTYPE (scales): 0 f32, 1 f16, 2 bf16, 3 e8m0;
//   W_ZEROS: 1 when an INT4 zeros section is present; W_GROUP: the k extent of one scale
//   (128 fp8, 32 mxfp4, G int4); GV_SPLITS and GV_WG (*_gemv only): the k splits per output
//   (1, 2, 4 or 8, per pass: src/wgpu/expert_gemm.rs `gv_splits`) and the workgroup size.
//
// Launch of expert_up / expert_down (one dispatch per weight chunk holding ≥ 1 row):
//   workgroup_size 256 = 16 × 16 invocations (tx = lid % 16, ty = lid / 16), each computing a
//   4 × 4 block of outputs (4 × (4 + 4) for gated expert_up: the gate and up values of the
//   same 4 × 4 block): rows 4·ty .. 4·ty + 3 of the tile, columns tx + 16·j (f32) or
//   2·tx, 2·tx + 1, 2·tx + 32, 2·tx + 33 (f16 / bf16: two word-pairs).
//   Tile BM = 64 rows × BN = 64 columns, BK = 16 deep.
//   grid.x = ceil(rows / BM) + e_count      (row tiles: Σ_e ceil(count_e / BM) ≤ this static
//                                            bound; surplus workgroups exit after reading offsets)
//   grid.y = ceil((min(N, chunk_rows) + s) / BN), s = 0 for f32, 1 for f16 / bf16 (the early
//                                            start above); column tiles of one expert inside the
//                                            chunk; tiles past the expert's part of it exit
//   grid.z = 1
//   with e_first = chunk_first / N, e_count = (chunk_first + chunk_rows − 1) / N − e_first + 1.
//   Workgroup x maps to (expert, row tile) by scanning offsets[e_first .. e_first + e_count]:
//   row tiles of expert e_first first, then e_first + 1, …
// Launch of the *_rows and *_rows_x4 entry points (rows ≤ 32; one dispatch per weight chunk
//   holding ≥ 1 row):
//   workgroup_size 256; a workgroup computes all (≤ 32) rows of one expert for RB_N = 32
//   columns, k in blocks of RB_K = 64 (details above the small-path code). Weight loads per
//   block: *_rows 8 elements per invocation (scalar words); *_rows_x4 one vec4 of codes per
//   loader invocation, 32 · RB_K / q_epv() loaders per matrix (FP8 128, MXFP4 / INT4 64; the gate's
//   loaders follow the up matrix's: FP8 gated uses all 256).
//   grid.x = e_count                        (expert e_first + x; experts without rows exit)
//   grid.y = ceil((min(N, chunk_rows) + s) / 32), s as above (column blocks of one expert
//                                            inside the chunk; blocks past its part exit)
//   grid.z = 1
// Workgroup memory: expert_up / expert_down: three tiles of 64 rows × (16 + 4) f32 (padded
//   against bank conflicts) = 3 × 5120 B = 15 360 B, plus 16 B of tile info: 15 376 B.
//   *_rows and *_rows_x4 (quantized): three tiles of 32 rows × (64 + 4) f32 =
//   3 × 8704 B = 26 112 B, plus 16 B of job info: 26 128 B. Both ≤ 32 KiB. *_gemv: the staged
//   chunk sums of one row, 16 384 B (16 KiB; above the GEMV code).
// Launch of the *_gemv entry points: above the GEMV code at the end of this file.
// Determinism: one canonical summation order for every output on every entry point. k is cut
//   into chunks of KC = 256 consecutive k (chunk c: k = 256·c .. 256·c + 255; KC is a
//   multiple of BK = 16 and RB_K = 64, so every path folds at its own tile boundaries). Each
//   chunk is one f32 sum from 0: acc = 0; acc = fma(a[r, k], w, acc) for its k in order, w
//   the weight decoded to f32 (w_decode for dense words, q_value of the same code, scale and
//   zero point for quantized ones, whether read by w_elem or a 128-bit word at a time by
//   rows_q_stage), the same function on every path; the last chunk runs on over
//   k = K .. ceil(K / 16)·16 − 1 with a = w = 0 (the last k tile of expert_up / expert_down is
//   zero-padded). The sum is chunk 0 itself, then + chunk 1, + chunk 2, … left to right
//   (plain f32 adds), then + bias, then the activation. The split of k is fixed by K alone
//   (never by the row count, the tile, the weight chunking or the entry point): gemm_tile and
//   the *_rows paths fold their sums every KC / BK or KC / RB_K tiles, the GEMV sums
//   different chunks in different invocations and adds them in chunk order. So the result of
//   a row does not depend on the other rows, the tile it lands in, the chunking of the
//   weights, the batch size or which of the entry points computed it; for K ≤ 256 it is the
//   single in-order fma chain. The epilogue's multiply-adds are explicit fma so that no
//   compiler contraction can differ between the entry points.
// Target: WGSL core, no extensions; no subgroup operations (any subgroup size).

struct GemmParams {
    experts: u32,       // E: offsets has E + 1 entries
    rows: u32,          // rows of a and out (offsets are clamped to it)
    k_dim: u32,         // K: the length of a row of a and of a weight row
    n_dim: u32,         // N: output columns per expert (the length of a row of out)
    e_first: u32,       // first expert with weight rows in this chunk
    e_count: u32,       // experts with weight rows in this chunk
    chunk_first: u32,   // first weight row of the chunk (flattened [E·N, K] view)
    chunk_rows: u32,    // weight rows in the chunk
    has_bias: u32,      // bit 0: bias_b, bit 1: bias_g
    alpha: f32,         // clamped_swiglu
    limit: f32,         // clamped_swiglu
    a_stride: u32,      // elements between rows of a
    out_stride: u32,    // elements between rows of out (even for 16-bit A_DTYPE)
    // Quantized weights only (W_QUANT ≠ 0; 0 when dense):
    s_off: u32,         // word of the chunk where the scales section starts
    z_off: u32,         // word of the chunk where the zeros section starts (W_ZEROS = 1)
    s_row0: u32,        // FP8: the matrix's scale row the chunk's scales start with
    s_cols: u32,        // scales per scale row: ⌈K/128⌉ (fp8), K / 32 (mxfp4), K / G (int4)
    s_rows_e: u32,      // FP8: scale rows per expert, ⌈N/128⌉
    row_bytes: u32,     // code bytes per weight row: K (fp8), ⌈K/2⌉ (mxfp4, int4)
    a_vec4: u32,        // expert_*_gemv: 1 when every row of a starts on a 16-byte word (a4)
}

override W_QUANT: u32 = 0u;
override S_DTYPE: u32 = 0u;
override W_ZEROS: u32 = 0u;
override W_GROUP: u32 = 128u;

override ACT: u32 = 0u;

const ACT_NONE: u32 = 0u;
const ACT_SWIGLU: u32 = 1u;
const ACT_GEGLU: u32 = 2u;
const ACT_RELU: u32 = 3u;
const ACT_GELU: u32 = 4u;
const ACT_CLAMPED_SWIGLU: u32 = 5u;

const BM: u32 = 64u;
const BN: u32 = 64u;
// Columns of a k-major slab of dense weights (src/wgpu/weights.rs SLAB).
const SLAB: u32 = 64u;
const BK: u32 = 16u;
// Depth of a canonical k chunk (see Determinism): a multiple of BK and of RB_K, so that every
// path folds its sums at its own tile boundaries.
const KC: u32 = 256u;
// Row pitch of a workgroup tile in vec4 (BK / 4 = 4 used, 1 of padding).
const PITCH: u32 = 5u;
const TILE_VEC4: u32 = 320u; // BM · PITCH (= BN · PITCH)

@group(0) @binding(0) var<uniform> p: GemmParams;
@group(0) @binding(1) var<storage, read> offsets: array<u32>;
@group(0) @binding(2) var<storage, read> a: array<u32>;
@group(0) @binding(3) var<storage, read> w_b: array<u32>;
@group(0) @binding(4) var<storage, read> w_g: array<u32>;
@group(0) @binding(5) var<storage, read> bias_b: array<f32>;
@group(0) @binding(6) var<storage, read> bias_g: array<f32>;
@group(0) @binding(7) var<storage, read_write> out: array<u32>;

// Tiles stored row-major along k: tile[row · PITCH + k / 4][k % 4].
var<workgroup> a_s: array<vec4<f32>, TILE_VEC4>;
var<workgroup> b_s: array<vec4<f32>, TILE_VEC4>;
var<workgroup> g_s: array<vec4<f32>, TILE_VEC4>;
// (expert, first row, row count, valid) of this workgroup's row tile.
var<workgroup> tile_info: vec4<u32>;

fn sigmoid(v: f32) -> f32 {
    return 1.0 / (1.0 + exp(-v));
}

// Φ(v) = P(N(0,1) ≤ v) = erfc(−v/√2) / 2, to a few f32 ulps. Every multiply-add is written
// as fma (a compiler may not contract it differently in different entry points).
//   |v/√2| < 0.5: Φ = 1/2 + erf(v/√2)/2 with erf's Maclaurin series (8 terms, truncation < 1e-12).
//   0.5 ≤ z = |v/√2| < 10: erfc(z) = t · exp(−z² + P(s)), t = 1/(1 + z/2), s = (t − c) / r
//     mapping t ∈ [1/6, 0.8] to [−1, 1]; P is a degree-10 least-squares fit of
//     log(erfc(z)·exp(z²)/t) (fit error < 1e-9). exp(−z²) = exp(−v²/2) uses an exact split of
//     |v| (12 leading bits, whose square is exact) so that large |v| keep their accuracy.
//   z ≥ 10: Φ is 0 or 1 in f32.
fn phi(v: f32) -> f32 {
    let x = v * 0.70710678118654752;
    let z = abs(x);
    if (z < 0.5) {
        let q = x * x;
        var s = -1.492565036e-05;
        s = fma(s, q, 1.205533298e-04);
        s = fma(s, q, -8.548327023e-04);
        s = fma(s, q, 5.223977625e-03);
        s = fma(s, q, -2.686617065e-02);
        s = fma(s, q, 1.128379167e-01);
        s = fma(s, q, -3.761263890e-01);
        s = fma(s, q, 1.128379167e+00);
        return fma(0.5, x * s, 0.5);
    }
    if (z >= 10.0) {
        return select(0.0, 1.0, x > 0.0);
    }
    let t = 1.0 / fma(0.5, z, 1.0);
    let s = (t - 4.833333194e-01) * 3.157894850e+00;
    var pl = 1.990926819e-07;
    pl = fma(pl, s, 8.306947166e-06);
    pl = fma(pl, s, -9.550488357e-06);
    pl = fma(pl, s, -9.027711349e-05);
    pl = fma(pl, s, 1.486160763e-04);
    pl = fma(pl, s, 8.566257311e-04);
    pl = fma(pl, s, -1.819902798e-03);
    pl = fma(pl, s, -1.155404933e-02);
    pl = fma(pl, s, 2.084326744e-02);
    pl = fma(pl, s, 4.239103794e-01);
    pl = fma(pl, s, -6.941611767e-01);
    let av = abs(v);
    let vh = bitcast<f32>(bitcast<u32>(av) & 0xfffff000u);
    let e = t * exp(-0.5 * vh * vh) * exp(fma(-0.5, (av - vh) * (av + vh), pl));
    return select(0.5 * e, fma(-0.5, e, 1.0), x > 0.0);
}

fn gelu(v: f32) -> f32 {
    return v * phi(v);
}

// The epilogue of one output: `u` is the up (or down) sum with its bias, `g` the gate sum.
fn activate(act: u32, g: f32, u: f32) -> f32 {
    switch act {
        case ACT_SWIGLU: {
            return g * sigmoid(g) * u;
        }
        case ACT_GEGLU: {
            return gelu(g) * u;
        }
        case ACT_RELU: {
            return max(u, 0.0);
        }
        case ACT_GELU: {
            return gelu(u);
        }
        case ACT_CLAMPED_SWIGLU: {
            let gc = min(g, p.limit);
            let uc = clamp(u, -p.limit, p.limit);
            return (uc + 1.0) * gc * sigmoid(p.alpha * gc);
        }
        default: {
            return u;
        }
    }
}

// Word i of the gate weight words (w_g) when `gate`, else of w_b (a storage pointer cannot be
// a function parameter in core WGSL). The *_rows_x4 entry points read the same words through
// w4_at (their bindings are w4_b / w4_g).
fn w_at(gate: bool, i: u32) -> u32 {
    if (gate) {
        return w_g[i];
    }
    return w_b[i];
}

// Byte i of the weight words.
fn w_byte(gate: bool, i: u32) -> u32 {
    return (w_at(gate, i >> 2u) >> ((i & 3u) * 8u)) & 0xffu;
}

// The word of the chunk holding scale i of the scales section.
fn s_word(i: u32) -> u32 {
    if (S_DTYPE == 0u) {
        return p.s_off + i;
    }
    if (S_DTYPE == 3u) {
        return p.s_off + (i >> 2u);
    }
    return p.s_off + (i >> 1u);
}

// Scale i from the word holding it (s_word(i)), widened to f32 (exact).
fn s_decode(word: u32, i: u32) -> f32 {
    if (S_DTYPE == 0u) {
        return bitcast<f32>(word);
    }
    if (S_DTYPE == 3u) {
        return bitcast<f32>(e8m0_bits((word >> ((i & 3u) * 8u)) & 0xffu));
    }
    let h = select(word & 0xffffu, word >> 16u, (i & 1u) == 1u);
    if (S_DTYPE == 1u) {
        return f16_bits_to_f32(h);
    }
    return bitcast<f32>(h << 16u);
}

// The word of the chunk holding zero point i (INT4 with W_ZEROS = 1), and the zero point
// from that word.
fn z_word(i: u32) -> u32 {
    return p.z_off + (i >> 2u);
}

fn z_decode(word: u32, i: u32) -> u32 {
    return (word >> ((i & 3u) * 8u)) & 0xffu;
}

// The chunk-relative scale row base of expert e: FP8 scale row of (e, n) is this + n / 128
// (u32 arithmetic wraps; the sum does not); dense slab weights: the chunk-relative slab of
// (e, n) is this + n / 64 (s_rows_e = slabs per expert, s_row0 = the chunk's first slab).
// Unused for MXFP4 / INT4.
fn w_sbase(e: u32) -> u32 {
    return e * p.s_rows_e - p.s_row0;
}

// Index in the scales section of the scale of element k of chunk-relative row `row`
// (expert-local column n, `sbase` = w_sbase(e)); also the index of its zero point.
fn w_scale_index(row: u32, sbase: u32, n: u32, k: u32) -> u32 {
    let srow = select(row, sbase + n / 128u, W_QUANT == 1u);
    return srow * p.s_cols + k / W_GROUP;
}

// The weight of code `q` (an e4m3 byte, or a nibble) with scale `s` and zero point `z` (INT4;
// ignored otherwise), one f32: the decode every path uses (w_elem, rows_q_stage).
fn q_value(q: u32, s: f32, z: u32) -> f32 {
    if (W_QUANT == 1u) {
        return e4m3_to_f32(q) * s;
    }
    if (W_QUANT == 2u) {
        return e2m1_to_f32(q) * s;
    }
    return (f32(q) - f32(z)) * s;
}

// Weight element k of chunk-relative row `row` (expert-local column n, `sbase` = w_sbase(e))
// of w_g (`gate`) or w_b, decoded to one f32: the value every path feeds to its fma chain.
fn w_elem(gate: bool, row: u32, sbase: u32, n: u32, k: u32) -> f32 {
    if (W_QUANT == 0u) {
        // Dense weights are k-major slabs of SLAB columns: chunk-relative slab sbase + n / 64.
        let i = ((sbase + n / SLAB) * p.k_dim + k) * SLAB + (n % SLAB);
        return w_decode(w_at(gate, w_word(i)), i);
    }
    let si = w_scale_index(row, sbase, n, k);
    let s = s_decode(w_at(gate, s_word(si)), si);
    var q = 0u;
    if (W_QUANT == 1u) {
        q = w_byte(gate, row * p.row_bytes + k);
    } else {
        q = (w_byte(gate, row * p.row_bytes + (k >> 1u)) >> ((k & 1u) * 4u)) & 0xfu;
    }
    var z = 8u;
    if (W_QUANT == 3u && W_ZEROS != 0u) {
        z = z_decode(w_at(gate, z_word(si)), si);
    }
    return q_value(q, s, z);
}

// Element k of row `row` of a, widened to f32.
fn a_elem(row: u32, k: u32) -> f32 {
    let i = row * p.a_stride + k;
    return a_decode(a[a_word(i)], i);
}

// The epilogue of one output of expert-local column `col` of expert row block `e_row`: + bias,
// then the activation (`u` the up or down sum, `g` the gate sum).
fn epilogue(act: u32, gated: bool, e_row: u32, col: u32, u: f32, g: f32) -> f32 {
    var uv = u;
    var gv = 0.0;
    if ((p.has_bias & 1u) != 0u) {
        uv += bias_b[e_row + col];
    }
    if (gated) {
        gv = g;
        if ((p.has_bias & 2u) != 0u) {
            gv += bias_g[e_row + col];
        }
    }
    return activate(act, gv, uv);
}

// 16-bit A_DTYPE: stores expert-local columns col (even) and col + 1 of output row `row`, with
// values v0 and v1, as one word; in0 / in1 say whether this dispatch computed them. A column
// this dispatch did not compute is either the row padding (col + 1 = N: written as 0) or
// belongs to the neighbouring weight chunk, whose dispatch (a separate pass, ordered with
// this one) writes that half: its half of the word is kept (read, modify, write).
fn store_pair16(row: u32, col: u32, v0: f32, v1: f32, in0: bool, in1: bool) {
    let wi = (row * p.out_stride + col) >> 1u;
    if (in0 && in1) {
        out[wi] = a_pack2(v0, v1);
    } else if (in0) {
        if (col + 1u >= p.n_dim) {
            out[wi] = a_pack2(v0, 0.0);
        } else {
            out[wi] = (out[wi] & 0xffff0000u) | a_bits16(v0);
        }
    } else if (in1) {
        out[wi] = (out[wi] & 0xffffu) | (a_bits16(v1) << 16u);
    }
}

// acc[j] += Σ_{k of this vec4, in order} av[k] · bj[k], for the 4 columns j of one row.
fn mac(acc: vec4<f32>, av: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    var r = fma(vec4<f32>(av.x), vec4<f32>(b0.x, b1.x, b2.x, b3.x), acc);
    r = fma(vec4<f32>(av.y), vec4<f32>(b0.y, b1.y, b2.y, b3.y), r);
    r = fma(vec4<f32>(av.z), vec4<f32>(b0.z, b1.z, b2.z, b3.z), r);
    r = fma(vec4<f32>(av.w), vec4<f32>(b0.w, b1.w, b2.w, b3.w), r);
    return r;
}

// Tile-relative column of accumulator lane j of invocation column tx: tx + 16·j for f32;
// for 16-bit A_DTYPE the pairs 2·tx, 2·tx + 1 and 2·tx + 32, 2·tx + 33, so that the two
// columns of an output word are computed by one invocation.
fn tcol(tx: u32, j: u32) -> u32 {
    if (A_DTYPE == 0u) {
        return tx + 16u * j;
    }
    return 2u * tx + (j & 1u) + 32u * (j >> 1u);
}

// Epilogue of one output row: columns tcol(tx, j) of row `r` (tile-relative); the tile's
// columns [clo, ncount) are this dispatch's (clo = 1 only where a 16-bit tile starts one
// column early, on a word).
fn store_row(act: u32, r: u32, tx: u32, m0: u32, mcount: u32, n0: u32, clo: u32, ncount: u32, bias_base: u32, gated: bool, u: vec4<f32>, g: vec4<f32>) {
    if (r >= mcount) {
        return;
    }
    let n = p.n_dim;
    if (A_DTYPE == 0u) {
        for (var j = 0u; j < 4u; j++) {
            let c = tx + 16u * j;
            if (c < ncount) {
                out[(m0 + r) * p.out_stride + n0 + c] = bitcast<u32>(epilogue(act, gated, bias_base, n0 + c, u[j], g[j]));
            }
        }
        return;
    }
    for (var q = 0u; q < 2u; q++) {
        let c = 2u * tx + 32u * q;
        let in0 = c >= clo && c < ncount;
        let in1 = c + 1u >= clo && c + 1u < ncount;
        var v0 = 0.0;
        var v1 = 0.0;
        if (in0) {
            v0 = epilogue(act, gated, bias_base, n0 + c, u[2u * q], g[2u * q]);
        }
        if (in1) {
            v1 = epilogue(act, gated, bias_base, n0 + c + 1u, u[2u * q + 1u], g[2u * q + 1u]);
        }
        store_pair16(m0 + r, n0 + c, v0, v1, in0, in1);
    }
}

// The elements of k tile `kt` this invocation loads: element q is row (lid >> 4) + 16·q of the
// tile at k = kt·BK + (lid & 15), of a (rows m0 ..), of w_b and of w_g (expert-local columns
// n0 .., chunk-relative weight rows w_row0 .., tile columns clo .. ncount; sbase = w_sbase(e));
// zero outside the matrices. (w_row0 wraps below 0 when clo = 1; w_row0 + r does not, u32
// arithmetic wraps.)
struct TileRegs {
    a: vec4<f32>,
    b: vec4<f32>,
    g: vec4<f32>,
}

//
// Dense (slab) weights are loaded along the slab's contiguous columns instead: element q of
// b and g is tile column lid & 63 at k = kt·BK + (lid >> 6) + 4·q (64 invocations read one
// k-row of 64 columns: 128 or 256 contiguous bytes); gemm_tile stages them accordingly.
fn load_tile(kt: u32, kd: u32, m0: u32, mcount: u32, clo: u32, ncount: u32, w_row0: u32, sbase: u32, n0: u32, lid: u32, gated: bool) -> TileRegs {
    var t = TileRegs(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    let k = kt * BK + (lid & 15u);
    if (W_QUANT == 0u) {
        let c = lid & 63u;
        if (c >= clo && c < ncount) {
            for (var q = 0u; q < 4u; q++) {
                let kq = kt * BK + (lid >> 6u) + 4u * q;
                if (kq < kd) {
                    t.b[q] = w_elem(false, w_row0 + c, sbase, n0 + c, kq);
                    if (gated) {
                        t.g[q] = w_elem(true, w_row0 + c, sbase, n0 + c, kq);
                    }
                }
            }
        }
        if (k < kd) {
            for (var q = 0u; q < 4u; q++) {
                let r = (lid >> 4u) + 16u * q;
                if (r < mcount) {
                    t.a[q] = a_elem(m0 + r, k);
                }
            }
        }
        return t;
    }
    if (k >= kd) {
        return t;
    }
    for (var q = 0u; q < 4u; q++) {
        let r = (lid >> 4u) + 16u * q;
        if (r < mcount) {
            t.a[q] = a_elem(m0 + r, k);
        }
        if (r >= clo && r < ncount) {
            t.b[q] = w_elem(false, w_row0 + r, sbase, n0 + r, k);
            if (gated) {
                t.g[q] = w_elem(true, w_row0 + r, sbase, n0 + r, k);
            }
        }
    }
    return t;
}

// One 64 × 64 output tile of expert GEMM `act` (ACT for expert_up, ACT_NONE for expert_down).
fn gemm_tile(wid: vec3<u32>, lid: u32, act: u32) {
    let gated = act == ACT_SWIGLU || act == ACT_GEGLU || act == ACT_CLAMPED_SWIGLU;

    // Row tile: invocation 0 scans the experts of this chunk, the others wait for its answer.
    if (lid == 0u) {
        var t = wid.x;
        var info = vec4<u32>(0u);
        for (var i = 0u; i < p.e_count; i++) {
            let e = p.e_first + i;
            let lo = min(offsets[e], p.rows);
            let hi = min(offsets[e + 1u], p.rows);
            let count = select(0u, hi - lo, hi > lo);
            let tiles = (count + BM - 1u) / BM;
            if (t < tiles) {
                info = vec4<u32>(e, lo + t * BM, min(BM, count - t * BM), 1u);
                break;
            }
            t -= tiles;
        }
        tile_info = info;
    }
    let info = workgroupUniformLoad(&tile_info);
    if (info.w == 0u) {
        return; // a surplus row tile
    }
    let e = info.x;
    let m0 = info.y;
    let mcount = info.z;

    // Column tile: this expert's part of the chunk, in expert-local columns [n_lo, n_hi).
    let n = p.n_dim;
    let kd = p.k_dim;
    let e_row = e * n;
    let n_lo = max(e_row, p.chunk_first) - e_row;
    let n_hi = min(e_row + n, p.chunk_first + p.chunk_rows) - e_row;
    // 16-bit outputs: column tiles start on an even column (a word), one column early when
    // the chunk starts at an odd one; that column is not this dispatch's (clo = 1).
    let early = select(0u, n_lo & 1u, A_DTYPE != 0u);
    let n0 = n_lo - early + wid.y * BN;
    if (n0 >= n_hi) {
        return; // past this expert's columns in the chunk
    }
    let ncount = min(BN, n_hi - n0);
    let clo = select(0u, early, wid.y == 0u);
    let w_row0 = e_row + n0 - p.chunk_first; // chunk-relative weight row of column n0
    let sbase = w_sbase(e);

    let tx = lid & 15u;
    let ty = lid >> 4u;
    var acc_u0 = vec4<f32>(0.0);
    var acc_u1 = vec4<f32>(0.0);
    var acc_u2 = vec4<f32>(0.0);
    var acc_u3 = vec4<f32>(0.0);
    var acc_g0 = vec4<f32>(0.0);
    var acc_g1 = vec4<f32>(0.0);
    var acc_g2 = vec4<f32>(0.0);
    var acc_g3 = vec4<f32>(0.0);
    // The sums of the finished k chunks (KC = 256 deep, see Determinism): acc_* hold the sum
    // of the current chunk from 0, folded into tot_* at every chunk boundary.
    var tot_u0 = vec4<f32>(0.0);
    var tot_u1 = vec4<f32>(0.0);
    var tot_u2 = vec4<f32>(0.0);
    var tot_u3 = vec4<f32>(0.0);
    var tot_g0 = vec4<f32>(0.0);
    var tot_g1 = vec4<f32>(0.0);
    var tot_g2 = vec4<f32>(0.0);
    var tot_g3 = vec4<f32>(0.0);
    let computes = ty * 4u < mcount; // whether this invocation has any row of the tile

    // Double buffering through registers: tile kt + 1 is loaded from memory while tile kt is
    // multiplied out of workgroup memory.
    let k_tiles = (kd + BK - 1u) / BK;
    var next = load_tile(0u, kd, m0, mcount, clo, ncount, w_row0, sbase, n0, lid, gated);
    for (var kt = 0u; kt < k_tiles; kt++) {
        workgroupBarrier(); // every invocation is done with the previous tile
        for (var q = 0u; q < 4u; q++) {
            let s = ((lid >> 4u) + 16u * q) * PITCH + ((lid & 15u) >> 2u);
            let c = lid & 3u;
            a_s[s][c] = next.a[q];
            if (W_QUANT == 0u) {
                // Column lid & 63, k = (lid >> 6) + 4·q of the tile (load_tile).
                let sw = (lid & 63u) * PITCH + q;
                b_s[sw][lid >> 6u] = next.b[q];
                if (gated) {
                    g_s[sw][lid >> 6u] = next.g[q];
                }
            } else {
                b_s[s][c] = next.b[q];
                if (gated) {
                    g_s[s][c] = next.g[q];
                }
            }
        }
        workgroupBarrier();
        if (kt + 1u < k_tiles) {
            next = load_tile(kt + 1u, kd, m0, mcount, clo, ncount, w_row0, sbase, n0, lid, gated);
        }
        if (computes) {
            for (var kv = 0u; kv < 4u; kv++) {
                let a0 = a_s[(ty * 4u + 0u) * PITCH + kv];
                let a1 = a_s[(ty * 4u + 1u) * PITCH + kv];
                let a2 = a_s[(ty * 4u + 2u) * PITCH + kv];
                let a3 = a_s[(ty * 4u + 3u) * PITCH + kv];
                let b0 = b_s[tcol(tx, 0u) * PITCH + kv];
                let b1 = b_s[tcol(tx, 1u) * PITCH + kv];
                let b2 = b_s[tcol(tx, 2u) * PITCH + kv];
                let b3 = b_s[tcol(tx, 3u) * PITCH + kv];
                acc_u0 = mac(acc_u0, a0, b0, b1, b2, b3);
                acc_u1 = mac(acc_u1, a1, b0, b1, b2, b3);
                acc_u2 = mac(acc_u2, a2, b0, b1, b2, b3);
                acc_u3 = mac(acc_u3, a3, b0, b1, b2, b3);
                if (gated) {
                    let g0 = g_s[tcol(tx, 0u) * PITCH + kv];
                    let g1 = g_s[tcol(tx, 1u) * PITCH + kv];
                    let g2 = g_s[tcol(tx, 2u) * PITCH + kv];
                    let g3 = g_s[tcol(tx, 3u) * PITCH + kv];
                    acc_g0 = mac(acc_g0, a0, g0, g1, g2, g3);
                    acc_g1 = mac(acc_g1, a1, g0, g1, g2, g3);
                    acc_g2 = mac(acc_g2, a2, g0, g1, g2, g3);
                    acc_g3 = mac(acc_g3, a3, g0, g1, g2, g3);
                }
            }
        }
        // End of a k chunk (KC / BK tiles, or the last tile): chunk 0 is the running total
        // itself, each later chunk is added to it (one f32 add per output); the next chunk
        // sums from 0.
        if ((kt + 1u) % (KC / BK) == 0u || kt + 1u == k_tiles) {
            if (kt < KC / BK) {
                tot_u0 = acc_u0;
                tot_u1 = acc_u1;
                tot_u2 = acc_u2;
                tot_u3 = acc_u3;
                tot_g0 = acc_g0;
                tot_g1 = acc_g1;
                tot_g2 = acc_g2;
                tot_g3 = acc_g3;
            } else {
                tot_u0 += acc_u0;
                tot_u1 += acc_u1;
                tot_u2 += acc_u2;
                tot_u3 += acc_u3;
                tot_g0 += acc_g0;
                tot_g1 += acc_g1;
                tot_g2 += acc_g2;
                tot_g3 += acc_g3;
            }
            acc_u0 = vec4<f32>(0.0);
            acc_u1 = vec4<f32>(0.0);
            acc_u2 = vec4<f32>(0.0);
            acc_u3 = vec4<f32>(0.0);
            acc_g0 = vec4<f32>(0.0);
            acc_g1 = vec4<f32>(0.0);
            acc_g2 = vec4<f32>(0.0);
            acc_g3 = vec4<f32>(0.0);
        }
    }

    let bias_base = e_row;
    store_row(act, ty * 4u + 0u, tx, m0, mcount, n0, clo, ncount, bias_base, gated, tot_u0, tot_g0);
    store_row(act, ty * 4u + 1u, tx, m0, mcount, n0, clo, ncount, bias_base, gated, tot_u1, tot_g1);
    store_row(act, ty * 4u + 2u, tx, m0, mcount, n0, clo, ncount, bias_base, gated, tot_u2, tot_g2);
    store_row(act, ty * 4u + 3u, tx, m0, mcount, n0, clo, ncount, bias_base, gated, tot_u3, tot_g3);
}

@compute @workgroup_size(256)
fn expert_up(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    gemm_tile(wid, lid, ACT);
}

@compute @workgroup_size(256)
fn expert_down(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    gemm_tile(wid, lid, ACT_NONE);
}

// ---------------------------------------------------------------------------------------------
// Small-batch path of quantized weights (expert_up_rows / expert_down_rows and their _x4
// forms; dense weights take the GEMV at the end of this file): ≤ RB_M = 32 rows in all, so
// every expert has ≤ 32 rows. A workgroup owns one expert and RB_N = 32 weight rows (output
// columns) and walks k in blocks of RB_K = 64: the 256 invocations load the [32 × 64] weight
// block (and the gate block) with coalesced reads — 8 elements each; _x4: one 128-bit word of
// 16 or 32 codes per loader invocation, decoded at staging (rows_q_* below) — and the
// [rows × 64] block of `a`, two
// blocks ahead in registers; they stage them in workgroup memory; then invocation
// (c = lid % 32, s = lid / 32) adds the block into the outputs (rows s, s + 8, s + 16,
// s + 24; column c), k in order; for f16 / bf16 invocation (cp = lid % 16, s = lid / 16)
// takes columns 2·cp and 2·cp + 1 (one output word) of rows s and s + 16 instead. Every
// weight element is read from memory once for all rows of its expert.
// The arithmetic of an output is that of gemm_tile, bit for bit: per k chunk of KC = 4 blocks,
// acc = 0; acc = fma(a[k], w[k], acc) for its k in order (a and w zero from K to
// ceil(K / 16)·16, as in gemm_tile's last tile); the chunks added left to right (rows_fold);
// then + bias, then `activate`. So a row gives the same bits on either path.

const RB_M: u32 = 32u;
const RB_N: u32 = 32u;
const RB_K: u32 = 64u;
// Row pitch of a small-path tile in vec4 (RB_K / 4 = 16 used, 1 of padding).
const RPITCH: u32 = 17u;
const RTILE_VEC4: u32 = 544u; // 32 rows · RPITCH

// Weight words as 128-bit vectors (the _x4 entry points, bound only when a weight row is a whole
// number of vec4 words, so that every row starts on one; and the dense slabs of the GEMV).
@group(0) @binding(8) var<storage, read> w4_b: array<vec4<u32>>;
@group(0) @binding(9) var<storage, read> w4_g: array<vec4<u32>>;

// tile[row · RPITCH + k / 4][k % 4]: a rows (ra_s) and weight rows = columns (rb_s, rg_s).
var<workgroup> ra_s: array<vec4<f32>, RTILE_VEC4>;
var<workgroup> rb_s: array<vec4<f32>, RTILE_VEC4>;
var<workgroup> rg_s: array<vec4<f32>, RTILE_VEC4>;

// What a small-path workgroup computes: rows m0 .. m0 + mcount of expert e, its columns
// n0 .. n0 + ncount (chunk-relative weight rows w_row0 ..); valid = 0: nothing (surplus).
struct RowsJob {
    valid: u32,
    e: u32,
    m0: u32,
    mcount: u32,
    n0: u32,
    ncount: u32,
    w_row0: u32,
    k16: u32, // K rounded up to gemm_tile's BK: the k range both paths accumulate over
    clo: u32, // first block column of this dispatch (1 where a 16-bit block starts early)
}

// One k block in registers: this invocation's 8 elements of a, of w_b and of w_g.
struct RowsRegs {
    a: V8,
    b: V8,
    g: V8,
}

// Accumulators of rows s + 8·j (u: up or down, g: gate), j = 0..3.
struct RowsAcc {
    u: vec4<f32>,
    g: vec4<f32>,
}

// `v` with element i replaced by x.
fn v8_set(v: V8, i: u32, x: f32) -> V8 {
    var r = v;
    if (i < 4u) {
        r.lo[i] = x;
    } else {
        r.hi[i - 4u] = x;
    }
    return r;
}

// Must be called in uniform control flow (workgroupUniformLoad). Workgroup (x, y) = (expert
// e_first + x, column block y of that expert's part of the chunk).
fn rows_job(wid: vec3<u32>, lid: u32) -> RowsJob {
    let e = p.e_first + wid.x;
    if (lid == 0u) {
        var info = vec4<u32>(0u);
        if (wid.x < p.e_count) {
            let lo = min(offsets[e], p.rows);
            let hi = min(offsets[e + 1u], p.rows);
            if (hi > lo) {
                info = vec4<u32>(lo, min(hi - lo, RB_M), 1u, 0u);
            }
        }
        tile_info = info;
    }
    let info = workgroupUniformLoad(&tile_info);
    var j = RowsJob(0u, e, info.x, info.y, 0u, 0u, 0u, 0u, 0u);
    let n = p.n_dim;
    let e_row = e * n;
    let n_lo = max(e_row, p.chunk_first) - e_row;
    let n_hi = min(e_row + n, p.chunk_first + p.chunk_rows) - e_row;
    // As in gemm_tile: 16-bit column blocks start on an even column.
    let early = select(0u, n_lo & 1u, A_DTYPE != 0u);
    let n0 = n_lo - early + wid.y * RB_N;
    if (info.z == 0u || n0 >= n_hi) {
        return j;
    }
    j.valid = 1u;
    j.n0 = n0;
    j.ncount = min(RB_N, n_hi - n0);
    j.clo = select(0u, early, wid.y == 0u);
    j.w_row0 = e_row + n0 - p.chunk_first;
    j.k16 = (p.k_dim + BK - 1u) / BK * BK;
    return j;
}

// Elements of `a` for k block kt: element i is row (lid / 64) + 4·i at k = kt·64 + lid % 64
// (a warp reads 32 consecutive floats of a row); zero past K and past the expert's rows.
fn rows_load_a(j: RowsJob, kt: u32, lid: u32) -> V8 {
    var v = V8(vec4<f32>(0.0), vec4<f32>(0.0));
    let kd = p.k_dim;
    let k = kt * RB_K + (lid & 63u);
    if (k < kd) {
        for (var i = 0u; i < 8u; i++) {
            let r = (lid >> 6u) + 4u * i;
            if (r < j.mcount) {
                v = v8_set(v, i, a_elem(j.m0 + r, k));
            }
        }
    }
    return v;
}

// Tile-relative k of weight element i of this invocation (weight row lid / 8, l = lid % 8):
// elements l, l + 8, …, l + 56 of the block row.
fn rows_wk(l: u32, i: u32) -> u32 {
    return l + 8u * i;
}

// Weight elements of block kt through the scalar words w_b / w_g (quantized, decoded by
// w_elem), zero past K and past the columns of the job.
fn rows_load_w1(j: RowsJob, kt: u32, lid: u32, gated: bool) -> RowsRegs {
    var t = RowsRegs(rows_load_a(j, kt, lid), V8(vec4<f32>(0.0), vec4<f32>(0.0)),
                     V8(vec4<f32>(0.0), vec4<f32>(0.0)));
    let kd = p.k_dim;
    let c = lid >> 3u;
    if (c >= j.clo && c < j.ncount) {
        let sbase = w_sbase(j.e);
        for (var i = 0u; i < 8u; i++) {
            let k = kt * RB_K + rows_wk(lid & 7u, i);
            if (k < kd) {
                t.b = v8_set(t.b, i, w_elem(false, j.w_row0 + c, sbase, j.n0 + c, k));
                if (gated) {
                    t.g = v8_set(t.g, i, w_elem(true, j.w_row0 + c, sbase, j.n0 + c, k));
                }
            }
        }
    }
    return t;
}

// Stores a block from registers into workgroup memory (two barriers: call in uniform flow).
fn rows_stage(t: RowsRegs, lid: u32, gated: bool) {
    workgroupBarrier(); // every invocation is done with the previous block
    let ka = lid & 63u;
    let c = lid >> 3u;
    for (var i = 0u; i < 8u; i++) {
        let r = (lid >> 6u) + 4u * i;
        ra_s[r * RPITCH + (ka >> 2u)][ka & 3u] = v8_get(t.a, i);
        let k = rows_wk(lid & 7u, i);
        rb_s[c * RPITCH + (k >> 2u)][k & 3u] = v8_get(t.b, i);
        if (gated) {
            rg_s[c * RPITCH + (k >> 2u)][k & 3u] = v8_get(t.g, i);
        }
    }
    workgroupBarrier();
}

// Adds block kt (staged) into this invocation's accumulators, k in order, up to k16.
// Returns the updated accumulators. f32: invocation (c = lid % 32, s = lid / 32) owns column c
// of rows s + 8·q; 16-bit A_DTYPE: rows_compute16.
fn rows_compute(j: RowsJob, kt: u32, lid: u32, gated: bool, acc_in: RowsAcc) -> RowsAcc {
    if (A_DTYPE != 0u) {
        return rows_compute16(j, kt, lid, gated, acc_in);
    }
    var acc = acc_in;
    let c = lid & 31u;
    let s = lid >> 5u;
    if (s >= j.mcount || c >= j.ncount) {
        return acc;
    }
    let kv_end = min(RB_K / 4u, (j.k16 - kt * RB_K) / 4u);
    for (var kv = 0u; kv < kv_end; kv++) {
        let wv = rb_s[c * RPITCH + kv];
        var gv = vec4<f32>(0.0);
        if (gated) {
            gv = rg_s[c * RPITCH + kv];
        }
        for (var q = 0u; q < 4u; q++) {
            let r = s + 8u * q;
            if (r < j.mcount) {
                let av = ra_s[r * RPITCH + kv];
                var u = acc.u[q];
                u = fma(av.x, wv.x, u);
                u = fma(av.y, wv.y, u);
                u = fma(av.z, wv.z, u);
                u = fma(av.w, wv.w, u);
                acc.u[q] = u;
                if (gated) {
                    var g = acc.g[q];
                    g = fma(av.x, gv.x, g);
                    g = fma(av.y, gv.y, g);
                    g = fma(av.z, gv.z, g);
                    g = fma(av.w, gv.w, g);
                    acc.g[q] = g;
                }
            }
        }
    }
    return acc;
}

// 16-bit A_DTYPE: invocation (cp = lid % 16, s = lid / 16) owns the column pair 2·cp, 2·cp + 1
// (one output word) of rows s and s + 16: accumulator q is column 2·cp + (q & 1) of row
// s + 16·(q >> 1). Per output the same fma sequence as rows_compute.
fn rows_compute16(j: RowsJob, kt: u32, lid: u32, gated: bool, acc_in: RowsAcc) -> RowsAcc {
    var acc = acc_in;
    let cp = 2u * (lid & 15u);
    let s = lid >> 4u;
    if (s >= j.mcount || cp + 1u < j.clo || cp >= j.ncount) {
        return acc;
    }
    let kv_end = min(RB_K / 4u, (j.k16 - kt * RB_K) / 4u);
    for (var kv = 0u; kv < kv_end; kv++) {
        for (var q = 0u; q < 4u; q++) {
            let r = s + 16u * (q >> 1u);
            let c = cp + (q & 1u);
            if (r < j.mcount) {
                let av = ra_s[r * RPITCH + kv];
                let wv = rb_s[c * RPITCH + kv];
                var u = acc.u[q];
                u = fma(av.x, wv.x, u);
                u = fma(av.y, wv.y, u);
                u = fma(av.z, wv.z, u);
                u = fma(av.w, wv.w, u);
                acc.u[q] = u;
                if (gated) {
                    let gv = rg_s[c * RPITCH + kv];
                    var g = acc.g[q];
                    g = fma(av.x, gv.x, g);
                    g = fma(av.y, gv.y, g);
                    g = fma(av.z, gv.z, g);
                    g = fma(av.w, gv.w, g);
                    acc.g[q] = g;
                }
            }
        }
    }
    return acc;
}

// The epilogue, as store_row: + bias, then the activation.
fn rows_store(j: RowsJob, lid: u32, act: u32, gated: bool, acc: RowsAcc) {
    let e_row = j.e * p.n_dim;
    if (A_DTYPE != 0u) {
        let c = 2u * (lid & 15u);
        let s = lid >> 4u;
        for (var h = 0u; h < 2u; h++) {
            let r = s + 16u * h;
            if (r < j.mcount) {
                let in0 = c >= j.clo && c < j.ncount;
                let in1 = c + 1u >= j.clo && c + 1u < j.ncount;
                var v0 = 0.0;
                var v1 = 0.0;
                if (in0) {
                    v0 = epilogue(act, gated, e_row, j.n0 + c, acc.u[2u * h], acc.g[2u * h]);
                }
                if (in1) {
                    v1 = epilogue(act, gated, e_row, j.n0 + c + 1u, acc.u[2u * h + 1u], acc.g[2u * h + 1u]);
                }
                store_pair16(j.m0 + r, j.n0 + c, v0, v1, in0, in1);
            }
        }
        return;
    }
    let c = lid & 31u;
    let s = lid >> 5u;
    if (c >= j.ncount) {
        return;
    }
    for (var q = 0u; q < 4u; q++) {
        let r = s + 8u * q;
        if (r < j.mcount) {
            let v = epilogue(act, gated, e_row, j.n0 + c, acc.u[q], acc.g[q]);
            out[(j.m0 + r) * p.out_stride + j.n0 + c] = bitcast<u32>(v);
        }
    }
}

// End of block kt of k_tiles (RB_K deep): at a k chunk boundary (KC / RB_K blocks) or the
// last block, the chunk's sums `acc` enter the total `tot` (chunk 0 is the total itself, later
// chunks are added, one f32 add each) and the next chunk sums from 0. Returns (tot, acc).
struct RowsFold {
    tot: RowsAcc,
    acc: RowsAcc,
}

fn rows_fold(tot: RowsAcc, acc: RowsAcc, kt: u32, k_tiles: u32) -> RowsFold {
    if ((kt + 1u) % (KC / RB_K) != 0u && kt + 1u != k_tiles) {
        return RowsFold(tot, acc);
    }
    let z = RowsAcc(vec4<f32>(0.0), vec4<f32>(0.0));
    if (kt < KC / RB_K) {
        return RowsFold(acc, z);
    }
    return RowsFold(RowsAcc(tot.u + acc.u, tot.g + acc.g), z);
}

fn is_gated(act: u32) -> bool {
    return act == ACT_SWIGLU || act == ACT_GEGLU || act == ACT_CLAMPED_SWIGLU;
}

// ---------------------------------------------------------------------------------------------
// Quantized weights through 128-bit words (the *_rows_x4 entry points with W_QUANT ≠ 0): a
// block row of RB_K = 64 codes is q_vpr() 16-byte words of q_epv() codes each (FP8: 4 words
// of 16 e4m3 bytes; MXFP4 / INT4: 2 words of 32 nibbles). The host picks this path only when
// K is a multiple of q_epv() (so row_bytes is a multiple of 16, and the codes section starts
// the chunk's buffer: every row and every word of codes starts on a vec4 and lies wholly
// before K or wholly past it). Loaders: invocation t < 32·q_vpr() loads word t % q_vpr() of
// block row (column) t / q_vpr() of w4_b; with a gate, invocations 32·q_vpr() ..
// 64·q_vpr() − 1 do the same for w4_g (FP8 gated: all 256; warp-uniform split). A loader
// fetches its codes word, the word holding the scale of its first code and (INT4 with zeros)
// the word holding its zero point, two blocks ahead, raw; at staging it decodes the q_epv()
// codes with q_value, fetching another scale (and zero point) only where a group boundary
// falls inside the word (INT4 with W_GROUP not a multiple of 32; never for FP8, whose groups
// of 128 and words of 16 codes are aligned, nor MXFP4, group = word), and stores them as
// q_epv() / 4 vec4<f32>. Every decoded weight is the value w_elem gives (same code, scale and
// zero point, same q_value), so the staged block is bitwise the one rows_load_w1 stages.

// Codes per 16-byte word and words per block row.
fn q_epv() -> u32 {
    return select(32u, 16u, W_QUANT == 1u);
}

fn q_vpr() -> u32 {
    return RB_K / q_epv();
}

// Word i of the weight words of the gate (w4_g) when `gate`, else of w4_b, and the 128-bit
// word i / 4 holding it.
fn w4_at(gate: bool, i: u32) -> u32 {
    if (gate) {
        return w4_g[i >> 2u][i & 3u];
    }
    return w4_b[i >> 2u][i & 3u];
}

fn w4_vec(gate: bool, v: u32) -> vec4<u32> {
    if (gate) {
        return w4_g[v];
    }
    return w4_b[v];
}

// What loader invocation `lid` loads: block column c, its word v of the block row, of w4_g
// when gate; valid = false for the other invocations.
struct QLoader {
    valid: bool,
    gate: bool,
    c: u32,
    v: u32,
}

fn rows_q_loader(lid: u32, gated: bool) -> QLoader {
    let nl = RB_N * q_vpr();
    let gate = lid >= nl;
    let t = select(lid, lid - nl, gate);
    return QLoader(lid < select(nl, 2u * nl, gated), gate, t / q_vpr(), t % q_vpr());
}

// One k block in registers: this invocation's 8 elements of a and, for a loader, its raw words
// (zero where it has none: past K or outside the job's columns).
struct RowsQRegs {
    a: V8,
    w: vec4<u32>, // q_epv() codes
    sw: u32,      // the word holding the scale of the first code
    zw: u32,      // INT4 with zeros: the word holding its zero point
}

fn rows_q_load(j: RowsJob, kt: u32, lid: u32, gated: bool) -> RowsQRegs {
    var t = RowsQRegs(rows_load_a(j, kt, lid), vec4<u32>(0u), 0u, 0u);
    let ld = rows_q_loader(lid, gated);
    let k0 = kt * RB_K + ld.v * q_epv();
    if (!ld.valid || ld.c < j.clo || ld.c >= j.ncount || k0 >= p.k_dim) {
        return t;
    }
    let row = j.w_row0 + ld.c;
    let byte0 = row * p.row_bytes + select(k0 >> 1u, k0, W_QUANT == 1u);
    t.w = w4_vec(ld.gate, byte0 >> 4u);
    let si = w_scale_index(row, w_sbase(j.e), j.n0 + ld.c, k0);
    t.sw = w4_at(ld.gate, s_word(si));
    if (W_QUANT == 3u && W_ZEROS != 0u) {
        t.zw = w4_at(ld.gate, z_word(si));
    }
    return t;
}

// Stores block kt from registers into workgroup memory, decoding the loaders' codes (two
// barriers: call in uniform flow). Columns and words without codes are stored as 0.
fn rows_q_stage(j: RowsJob, t: RowsQRegs, kt: u32, lid: u32, gated: bool) {
    workgroupBarrier(); // every invocation is done with the previous block
    let ka = lid & 63u;
    for (var i = 0u; i < 8u; i++) {
        let r = (lid >> 6u) + 4u * i;
        ra_s[r * RPITCH + (ka >> 2u)][ka & 3u] = v8_get(t.a, i);
    }
    let ld = rows_q_loader(lid, gated);
    if (ld.valid) {
        let epv = q_epv();
        let k0 = kt * RB_K + ld.v * epv;
        let base = ld.c * RPITCH + ld.v * (epv >> 2u);
        let has = ld.c >= j.clo && ld.c < j.ncount && k0 < p.k_dim;
        let row = j.w_row0 + ld.c;
        let sbase = w_sbase(j.e);
        var si = w_scale_index(row, sbase, j.n0 + ld.c, k0);
        var s = s_decode(t.sw, si);
        var z = 8u;
        if (W_QUANT == 3u && W_ZEROS != 0u) {
            z = z_decode(t.zw, si);
        }
        for (var q = 0u; q < (epv >> 2u); q++) {
            var f = vec4<f32>(0.0);
            if (has) {
                for (var e = 0u; e < 4u; e++) {
                    let i = 4u * q + e;
                    if (W_GROUP % epv != 0u && i > 0u && (k0 + i) % W_GROUP == 0u) {
                        // A group boundary inside the word: the next scale (and zero point).
                        si = w_scale_index(row, sbase, j.n0 + ld.c, k0 + i);
                        s = s_decode(w4_at(ld.gate, s_word(si)), si);
                        if (W_QUANT == 3u && W_ZEROS != 0u) {
                            z = z_decode(w4_at(ld.gate, z_word(si)), si);
                        }
                    }
                    var code = 0u;
                    if (W_QUANT == 1u) {
                        code = (t.w[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu;
                    } else {
                        code = (t.w[i >> 3u] >> ((i & 7u) * 4u)) & 0xfu;
                    }
                    f[e] = q_value(code, s, z);
                }
            }
            if (ld.gate) {
                rg_s[base + q] = f;
            } else {
                rb_s[base + q] = f;
            }
        }
    }
    workgroupBarrier();
}

// The small-batch GEMM of a quantized pass through 128-bit code words: as expert_up_rows with
// rows_q_load / rows_q_stage for the weight blocks.
fn rows_q_main(wid: vec3<u32>, lid: u32, act: u32) {
    let j = rows_job(wid, lid);
    if (j.valid == 0u) {
        return;
    }
    let gated = is_gated(act);
    let k_tiles = (p.k_dim + RB_K - 1u) / RB_K;
    var acc = RowsAcc(vec4<f32>(0.0), vec4<f32>(0.0));
    var tot = RowsAcc(vec4<f32>(0.0), vec4<f32>(0.0));
    var n1 = rows_q_load(j, 0u, lid, gated);
    var n2 = rows_q_load(j, 1u, lid, gated);
    for (var kt = 0u; kt < k_tiles; kt++) {
        rows_q_stage(j, n1, kt, lid, gated);
        n1 = n2;
        n2 = rows_q_load(j, kt + 2u, lid, gated);
        acc = rows_compute(j, kt, lid, gated, acc);
        let f = rows_fold(tot, acc, kt, k_tiles);
        tot = f.tot;
        acc = f.acc;
    }
    rows_store(j, lid, act, gated, tot);
}

// The scalar entry points (quantized weights, element by element) and rows_q_main (the _x4 ones)
// differ only in the weight load and the epilogue's activation; each runs: job, two blocks
// prefetched, then per block stage / prefetch the block two ahead / accumulate, then the
// epilogue.
@compute @workgroup_size(256)
fn expert_up_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = rows_job(wid, lid);
    if (j.valid == 0u) {
        return;
    }
    let gated = is_gated(ACT);
    let k_tiles = (p.k_dim + RB_K - 1u) / RB_K;
    var acc = RowsAcc(vec4<f32>(0.0), vec4<f32>(0.0));
    var tot = RowsAcc(vec4<f32>(0.0), vec4<f32>(0.0));
    var n1 = rows_load_w1(j, 0u, lid, gated);
    var n2 = rows_load_w1(j, 1u, lid, gated);
    for (var kt = 0u; kt < k_tiles; kt++) {
        rows_stage(n1, lid, gated);
        n1 = n2;
        n2 = rows_load_w1(j, kt + 2u, lid, gated);
        acc = rows_compute(j, kt, lid, gated, acc);
        let f = rows_fold(tot, acc, kt, k_tiles);
        tot = f.tot;
        acc = f.acc;
    }
    rows_store(j, lid, ACT, gated, tot);
}

@compute @workgroup_size(256)
fn expert_down_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = rows_job(wid, lid);
    if (j.valid == 0u) {
        return;
    }
    let k_tiles = (p.k_dim + RB_K - 1u) / RB_K;
    var acc = RowsAcc(vec4<f32>(0.0), vec4<f32>(0.0));
    var tot = RowsAcc(vec4<f32>(0.0), vec4<f32>(0.0));
    var n1 = rows_load_w1(j, 0u, lid, false);
    var n2 = rows_load_w1(j, 1u, lid, false);
    for (var kt = 0u; kt < k_tiles; kt++) {
        rows_stage(n1, lid, false);
        n1 = n2;
        n2 = rows_load_w1(j, kt + 2u, lid, false);
        acc = rows_compute(j, kt, lid, false, acc);
        let f = rows_fold(tot, acc, kt, k_tiles);
        tot = f.tot;
        acc = f.acc;
    }
    rows_store(j, lid, ACT_NONE, false, tot);
}

// The _x4 entry points take quantized weights only (dense weights are slabs: *_gemv).
@compute @workgroup_size(256)
fn expert_up_rows_x4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    rows_q_main(wid, lid, ACT);
}

@compute @workgroup_size(256)
fn expert_down_rows_x4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    rows_q_main(wid, lid, ACT_NONE);
}

// ---------------------------------------------------------------------------------------------
// Dense small-batch path (expert_up_gemv / expert_down_gemv): ≤ 32 rows in all, dense weights
// in k-major slabs (src/wgpu/weights.rs: per expert, each block of SLAB = 64 output columns is
// a [K][64] slab; a k-row of a slab is 8 (16-bit) or 16 (f32) 128-bit words), k split over
// GV_SPLITS = S invocations per output. Invocation lid of a workgroup is split
// j = lid / (8·GS) and, within it, i = lid % (8·GS): lane l = i % 8 of slab i / 8 of the
// workgroup (GS = min(8, 32 / S) slabs per workgroup: gv_gs). It owns the 8 columns
// 64·s + 8·l .. 64·s + 8·l + 7 of slab s of its expert and up to GV_ROWS rows, and sums the
// k chunks (KC = 256 deep, see Determinism) c = j, j + S, j + 2·S, …: chunk c from 0, k in
// order, loading per k one vec4<u32> of weights (two for f32; and the gate's) — the 8
// invocations of a slab read one whole 128-byte line (256 bytes for f32) per k, a 32-wide
// warp four lines — and the activations of its rows 8 k at a time (one vec4<u32> for 16-bit
// rows starting on a 16-byte word, a_vec4 = 1; else element by element). Every weight byte is
// read once per GV_ROWS rows of its expert. The S splits work on S consecutive chunks at once
// (a round); after each round every split with a chunk stages its chunk sums of one row in
// workgroup memory, and split 0 adds them, in chunk order, to the total of the earlier
// rounds, one row at a time (1 barrier for the first row of the first round, 2 for each
// other row and round; none when S = 1, where one invocation adds its chunks in order in
// registers). So the total is chunk 0 + chunk 1 + … left to right for every S.
// On a GPU this puts S times as many independent 128-bit weight loads in flight as one
// sequential walk over k (the point of the split: at T = 1 a sequential GEMV is latency
// bound). The host picks S per pass (src/wgpu/expert_gemm.rs `gv_splits`): on a GPU
// min(8, the power of two ≥ the number of chunks ⌈⌈K/16⌉·16 / KC⌉), so no split waits on a
// round without work for it but the last; on a CPU adapter (lavapipe) 1. S never changes a
// result.
// Arithmetic per output: that of gemm_tile, bit for bit — each chunk acc = 0; acc = fma(a[k],
// w[k], acc) for its k in order (k = K .. ceil(K / 16)·16 − 1 with a = w = 0 in the last
// chunk); the chunks summed left to right; then `epilogue`. So a row gives the same bits on
// this path, the tiled one and the row paths.
// Launch (one dispatch per weight chunk; chunks hold whole slabs):
//   workgroup_size GV_WG = S splits × GS slabs × 8 invocations (S = 1, 2, 4, 8: 64, 128, 256,
//                                            256)
//   grid.x = min(rows, ceil(rows / GV_ROWS) + e_count)   (row tiles: an expert's rows in
//                                            tiles of GV_ROWS, experts e_first .. in order, found
//                                            by scanning offsets; at most one tile per row, and
//                                            Σ_e ceil(count_e / 4) ≤ this bound; surplus exit)
//   grid.y = ceil(min(⌈N/64⌉, slabs of the chunk) / GS)   (slab groups of the expert's part
//                                            of the chunk, its slabs split evenly over them;
//                                            invocations past its part only join the barriers)
//   grid.z = 1
// Workgroup memory: gv_s, 4 × GV_STAGE vec4<f32> = 4 × 256 × 16 B = 16 384 B (the staged
//   chunk sums of one row: ≤ 256 invocations × 8 up and 8 gate values) = 16 KiB, WebGPU's
//   default limit; used only when S > 1. No other workgroup variable.
// Bindings: 0, 1, 2, 5, 6, 7, 8 (w4_b), 9 (w4_g), 10 (a4: the words of binding 2 as vec4).

// Splits of k per output (S above): 1, 2, 4 or 8, set by the host per pass; and the
// workgroup size, S · gv_gs() · 8 (64, 128, 256 or 256).
override GV_SPLITS: u32 = 1u;
override GV_WG: u32 = 64u;
const GV_ROWS: u32 = 4u;
// Staging slots per component: one per invocation.
const GV_STAGE: u32 = 256u;

@group(0) @binding(10) var<storage, read> a4: array<vec4<u32>>;

// Staged chunk sums of one row: gv_s[q · GV_STAGE + j · 256 / S + i] is component q (up
// columns 0..3, 4..7, gate columns 0..3, 4..7) of invocation i of split j (consecutive
// invocations, consecutive 16-byte words).
var<workgroup> gv_s: array<vec4<f32>, 1024>;

// The row tile of workgroup wid.x, (expert, first row, rows ≤ GV_ROWS, valid): the chunk's
// experts' tiles of GV_ROWS rows in expert order (found by scanning offsets; experts without
// rows have no tile, so the grid needs no workgroup for them). Every invocation scans: the
// result depends only on the workgroup id, the uniform p and the read-only offsets, so it is
// workgroup-uniform (the barriers of gv_run depend on it) without a barrier of its own.
fn gv_tile(wid: vec3<u32>) -> vec4<u32> {
    var t = wid.x;
    var lo = min(offsets[p.e_first], p.rows);
    for (var i = 0u; i < p.e_count; i++) {
        let hi = min(offsets[p.e_first + i + 1u], p.rows);
        let c = select(0u, hi - lo, hi > lo);
        let tiles = (c + GV_ROWS - 1u) / GV_ROWS;
        if (t < tiles) {
            return vec4<u32>(p.e_first + i, lo + t * GV_ROWS, min(GV_ROWS, c - t * GV_ROWS), 1u);
        }
        t -= tiles;
        lo = hi;
    }
    return vec4<u32>(0u);
}

// What one invocation computes: rows m0 .. m0 + nr (nr ≤ GV_ROWS) of expert e, expert-local
// columns col0 .. col0 + 7 from chunk-relative slab `slab`, the chunks of split `split`, as
// invocation `inv` of its split; valid = false: no columns (it only joins the barriers).
struct GvJob {
    valid: bool,
    e: u32,
    m0: u32,
    nr: u32,
    slab: u32,
    col0: u32,
    split: u32,
    inv: u32,
}

fn gv_job(tile: vec4<u32>, wid: vec3<u32>, lid: u32) -> GvJob {
    let gs = gv_gs();
    let inv = lid % (8u * gs);
    var j = GvJob(false, tile.x, tile.y, tile.z, 0u, 0u, lid / (8u * gs), inv);
    let n = p.n_dim;
    let e_row = j.e * n;
    // This expert's part of the chunk, [n_lo, n_hi): n_lo is a multiple of SLAB.
    let n_lo = max(e_row, p.chunk_first) - e_row;
    let n_hi = min(e_row + n, p.chunk_first + p.chunk_rows) - e_row;
    // The expert's slabs in the chunk, split evenly over ceil(slabs / GS) workgroups
    // (12 slabs in groups of 8: 6 + 6, not 8 + 4), so that the workgroups of a dispatch take
    // equal time.
    let slabs = (n_hi - n_lo + SLAB - 1u) / SLAB;
    let groups = (slabs + gs - 1u) / gs;
    let per = (slabs + groups - 1u) / groups;
    let s = n_lo / SLAB + wid.y * per + (inv >> 3u);
    if ((inv >> 3u) >= per || s * SLAB >= n_hi) {
        return j;
    }
    j.valid = true;
    j.slab = w_sbase(j.e) + s;
    j.col0 = s * SLAB + 8u * (inv & 7u);
    return j;
}

fn w4_get(gate: bool, v: u32) -> vec4<u32> {
    if (gate) {
        return w4_g[v];
    }
    return w4_b[v];
}

// This invocation's 8 weights at k of chunk-relative slab `slab` (columns 8·l .. 8·l + 7).
fn gv_w(gate: bool, slab: u32, k: u32, l: u32) -> V8 {
    let kr = slab * p.k_dim + k;
    if (W_DTYPE == 0u) {
        let v = kr * 16u + 2u * l;
        return V8(bitcast<vec4<f32>>(w4_get(gate, v)), bitcast<vec4<f32>>(w4_get(gate, v + 1u)));
    }
    return w_decode8(w4_get(gate, kr * 8u + l));
}

// Elements k0 .. k0 + 7 (all < K) of row `row` of a, widened to f32.
fn gv_a8(row: u32, k0: u32) -> V8 {
    let i = row * p.a_stride + k0;
    if (p.a_vec4 != 0u) {
        if (A_DTYPE == 0u) {
            return V8(bitcast<vec4<f32>>(a4[i >> 2u]), bitcast<vec4<f32>>(a4[(i >> 2u) + 1u]));
        }
        return a_decode8(a4[i >> 3u]);
    }
    // Unrolled: lavapipe counts every loop iteration of an invocation against 65535.
    return V8(vec4<f32>(a_elem(row, k0), a_elem(row, k0 + 1u), a_elem(row, k0 + 2u), a_elem(row, k0 + 3u)),
              vec4<f32>(a_elem(row, k0 + 4u), a_elem(row, k0 + 5u), a_elem(row, k0 + 6u), a_elem(row, k0 + 7u)));
}

// acc + a · w, per column (one fma each).
fn gv_fma(acc: V8, a: f32, w: V8) -> V8 {
    return V8(fma(vec4<f32>(a), w.lo, acc.lo), fma(vec4<f32>(a), w.hi, acc.hi));
}

// Accumulators of rows 0..3 of a job: up (or down) u*, gate g*.
struct GvAcc {
    u0: V8,
    u1: V8,
    u2: V8,
    u3: V8,
    g0: V8,
    g1: V8,
    g2: V8,
    g3: V8,
}

// One k: acc += a_r · w for rows r < 4 (rows past nr have a = 0; their sums are dropped).
fn gv_k(acc_in: GvAcc, a: vec4<f32>, wb: V8, wg: V8, gated: bool, four: bool) -> GvAcc {
    var acc = acc_in;
    acc.u0 = gv_fma(acc.u0, a.x, wb);
    if (gated) {
        acc.g0 = gv_fma(acc.g0, a.x, wg);
    }
    if (four) {
        acc.u1 = gv_fma(acc.u1, a.y, wb);
        acc.u2 = gv_fma(acc.u2, a.z, wb);
        acc.u3 = gv_fma(acc.u3, a.w, wb);
        if (gated) {
            acc.g1 = gv_fma(acc.g1, a.y, wg);
            acc.g2 = gv_fma(acc.g2, a.z, wg);
            acc.g3 = gv_fma(acc.g3, a.w, wg);
        }
    }
    return acc;
}

// The full 8-deep k blocks from k0 = k_lo while k0 + 8 ≤ k_end, for 1 row or (four) up to 4
// rows (k_lo a multiple of 8).
fn gv_main(j: GvJob, acc_in: GvAcc, gated: bool, four: bool, k_lo: u32, k_end: u32) -> GvAcc {
    var acc = acc_in;
    let z = V8(vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = k_lo; k0 + 8u <= k_end; k0 += 8u) {
        let a0 = gv_a8(j.m0, k0);
        var a1 = z;
        var a2 = z;
        var a3 = z;
        if (four) {
            if (j.nr > 1u) {
                a1 = gv_a8(j.m0 + 1u, k0);
            }
            if (j.nr > 2u) {
                a2 = gv_a8(j.m0 + 2u, k0);
            }
            if (j.nr > 3u) {
                a3 = gv_a8(j.m0 + 3u, k0);
            }
        }
        // k0 .. k0 + 7, unrolled (lavapipe's loop-iteration limit; constant lanes of a*).
        acc = gv_kw(acc, j, k0, vec4<f32>(a0.lo.x, a1.lo.x, a2.lo.x, a3.lo.x), gated, four);
        acc = gv_kw(acc, j, k0 + 1u, vec4<f32>(a0.lo.y, a1.lo.y, a2.lo.y, a3.lo.y), gated, four);
        acc = gv_kw(acc, j, k0 + 2u, vec4<f32>(a0.lo.z, a1.lo.z, a2.lo.z, a3.lo.z), gated, four);
        acc = gv_kw(acc, j, k0 + 3u, vec4<f32>(a0.lo.w, a1.lo.w, a2.lo.w, a3.lo.w), gated, four);
        acc = gv_kw(acc, j, k0 + 4u, vec4<f32>(a0.hi.x, a1.hi.x, a2.hi.x, a3.hi.x), gated, four);
        acc = gv_kw(acc, j, k0 + 5u, vec4<f32>(a0.hi.y, a1.hi.y, a2.hi.y, a3.hi.y), gated, four);
        acc = gv_kw(acc, j, k0 + 6u, vec4<f32>(a0.hi.z, a1.hi.z, a2.hi.z, a3.hi.z), gated, four);
        acc = gv_kw(acc, j, k0 + 7u, vec4<f32>(a0.hi.w, a1.hi.w, a2.hi.w, a3.hi.w), gated, four);
    }
    return acc;
}

fn gv_kw(acc: GvAcc, j: GvJob, k: u32, a: vec4<f32>, gated: bool, four: bool) -> GvAcc {
    let lane = (j.col0 >> 3u) & 7u; // col0 = 64·s + 8·lane
    let wb = gv_w(false, j.slab, k, lane);
    var wg = V8(vec4<f32>(0.0), vec4<f32>(0.0));
    if (gated) {
        wg = gv_w(true, j.slab, k, lane);
    }
    return gv_k(acc, a, wb, wg, gated, four);
}

// The rest of a chunk: k from k_lo to k_hi one at a time (a = w = 0 from K on).
fn gv_tail(j: GvJob, acc_in: GvAcc, gated: bool, k_lo: u32, k_hi: u32) -> GvAcc {
    var acc = acc_in;
    let kd = p.k_dim;
    let lane = (j.col0 >> 3u) & 7u;
    let z = V8(vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k = k_lo; k < k_hi; k++) {
        var wb = z;
        var wg = z;
        var a = vec4<f32>(0.0);
        if (k < kd) {
            wb = gv_w(false, j.slab, k, lane);
            if (gated) {
                wg = gv_w(true, j.slab, k, lane);
            }
            a.x = a_elem(j.m0, k);
            if (j.nr > 1u) {
                a.y = a_elem(j.m0 + 1u, k);
            }
            if (j.nr > 2u) {
                a.z = a_elem(j.m0 + 2u, k);
            }
            if (j.nr > 3u) {
                a.w = a_elem(j.m0 + 3u, k);
            }
        }
        acc = gv_k(acc, a, wb, wg, gated, true);
    }
    return acc;
}

// The sums of k chunk c (KC deep) from 0: the 8-deep blocks, then the rest up to the chunk's
// end or ceil(K / 16)·16, whichever is first.
fn gv_chunk(j: GvJob, c: u32, gated: bool) -> GvAcc {
    let z = V8(vec4<f32>(0.0), vec4<f32>(0.0));
    var acc = GvAcc(z, z, z, z, z, z, z, z);
    let kd = p.k_dim;
    let k16 = (kd + BK - 1u) / BK * BK;
    let k_lo = c * KC;
    let k_end = min(k_lo + KC, kd);
    if (j.nr == 1u) {
        acc = gv_main(j, acc, gated, false, k_lo, k_end);
    } else {
        acc = gv_main(j, acc, gated, true, k_lo, k_end);
    }
    return gv_tail(j, acc, gated, k_lo + (k_end - k_lo) / 8u * 8u, min(k_lo + KC, k16));
}

// Row r (< 4) of accumulators: (up, gate).
struct GvRow {
    u: V8,
    g: V8,
}

fn gv_get(acc: GvAcc, r: u32) -> GvRow {
    switch r {
        case 0u: {
            return GvRow(acc.u0, acc.g0);
        }
        case 1u: {
            return GvRow(acc.u1, acc.g1);
        }
        case 2u: {
            return GvRow(acc.u2, acc.g2);
        }
        default: {
            return GvRow(acc.u3, acc.g3);
        }
    }
}

fn gv_put(acc_in: GvAcc, r: u32, v: GvRow) -> GvAcc {
    var acc = acc_in;
    switch r {
        case 0u: {
            acc.u0 = v.u;
            acc.g0 = v.g;
        }
        case 1u: {
            acc.u1 = v.u;
            acc.g1 = v.g;
        }
        case 2u: {
            acc.u2 = v.u;
            acc.g2 = v.g;
        }
        default: {
            acc.u3 = v.u;
            acc.g3 = v.g;
        }
    }
    return acc;
}

// a + b per column (one f32 add each).
fn gv_add(a: GvRow, b: GvRow) -> GvRow {
    return GvRow(V8(a.u.lo + b.u.lo, a.u.hi + b.u.hi), V8(a.g.lo + b.g.lo, a.g.hi + b.g.hi));
}

// Slabs per workgroup (GS above): 8, or 4 with 8 splits (at most 256 invocations).
fn gv_gs() -> u32 {
    return min(8u, 32u / GV_SPLITS);
}

// The staging slot of invocation `inv` of split `split` (component 0).
fn gv_slot(split: u32, inv: u32) -> u32 {
    return split * 8u * gv_gs() + inv;
}

// Stages row sums `v` of invocation `inv` of split `split`.
fn gv_stage(split: u32, inv: u32, gated: bool, v: GvRow) {
    let slot = gv_slot(split, inv);
    gv_s[slot] = v.u.lo;
    gv_s[GV_STAGE + slot] = v.u.hi;
    if (gated) {
        gv_s[2u * GV_STAGE + slot] = v.g.lo;
        gv_s[3u * GV_STAGE + slot] = v.g.hi;
    }
}

// The sums staged by invocation `inv` of split `split`.
fn gv_staged(split: u32, inv: u32, gated: bool) -> GvRow {
    let slot = gv_slot(split, inv);
    let z = V8(vec4<f32>(0.0), vec4<f32>(0.0));
    var v = GvRow(V8(gv_s[slot], gv_s[GV_STAGE + slot]), z);
    if (gated) {
        v.g = V8(gv_s[2u * GV_STAGE + slot], gv_s[3u * GV_STAGE + slot]);
    }
    return v;
}

// The epilogue of row r of the job from its accumulators u, g: bias, activation, store.
fn gv_store(j: GvJob, act: u32, gated: bool, r: u32, u: V8, g: V8) {
    let n = p.n_dim;
    let e_row = j.e * n;
    let row = j.m0 + r;
    if (A_DTYPE == 0u) {
        for (var q = 0u; q < 8u; q++) {
            let c = j.col0 + q;
            if (c < n) {
                out[row * p.out_stride + c] = bitcast<u32>(epilogue(act, gated, e_row, c, v8_get(u, q), v8_get(g, q)));
            }
        }
        return;
    }
    for (var q = 0u; q < 8u; q += 2u) {
        let c = j.col0 + q;
        if (c < n) {
            let v0 = epilogue(act, gated, e_row, c, v8_get(u, q), v8_get(g, q));
            var v1 = 0.0;
            let in1 = c + 1u < n;
            if (in1) {
                v1 = epilogue(act, gated, e_row, c + 1u, v8_get(u, q + 1u), v8_get(g, q + 1u));
            }
            store_pair16(row, c, v0, v1, true, in1);
        }
    }
}

fn gv_run(wid: vec3<u32>, lid: u32, act: u32) {
    let tile = gv_tile(wid);
    if (tile.w == 0u) {
        return; // past the chunk's row tiles (workgroup-uniform)
    }
    let nr = tile.z; // workgroup-uniform, as is everything the barriers below depend on
    let j = gv_job(tile, wid, lid);
    let gated = is_gated(act);
    let k16 = (p.k_dim + BK - 1u) / BK * BK;
    let chunks = (k16 + KC - 1u) / KC;
    let rounds = (chunks + GV_SPLITS - 1u) / GV_SPLITS;
    let z = V8(vec4<f32>(0.0), vec4<f32>(0.0));
    // Split 0: the total of the chunks of the rounds so far (chunk 0 is the total itself).
    var tot = GvAcc(z, z, z, z, z, z, z, z);
    for (var rd = 0u; rd < rounds; rd++) {
        let c = rd * GV_SPLITS + j.split;
        var part = GvAcc(z, z, z, z, z, z, z, z);
        if (j.valid && c < chunks) {
            part = gv_chunk(j, c, gated);
        }
        if (GV_SPLITS == 1u) {
            // One split: the chunks in order in this invocation, no barrier.
            for (var r = 0u; r < GV_ROWS; r++) {
                if (rd == 0u) {
                    tot = gv_put(tot, r, gv_get(part, r));
                } else {
                    tot = gv_put(tot, r, gv_add(gv_get(tot, r), gv_get(part, r)));
                }
            }
            continue;
        }
        // Every split with a chunk stages its sums of row r; split 0 adds them in chunk order
        // to the total of the earlier rounds.
        for (var r = 0u; r < nr; r++) {
            if (rd > 0u || r > 0u) {
                workgroupBarrier(); // split 0 is done with the slots of the previous row
            }
            if (j.valid && c < chunks) {
                gv_stage(j.split, j.inv, gated, gv_get(part, r));
            }
            workgroupBarrier();
            if (j.split == 0u && j.valid) {
                var t = gv_staged(0u, j.inv, gated);
                if (rd > 0u) {
                    t = gv_add(gv_get(tot, r), t);
                }
                for (var s = 1u; s < GV_SPLITS; s++) {
                    if (rd * GV_SPLITS + s < chunks) {
                        t = gv_add(t, gv_staged(s, j.inv, gated));
                    }
                }
                tot = gv_put(tot, r, t);
            }
        }
    }
    if (!j.valid || j.split != 0u) {
        return;
    }
    for (var r = 0u; r < nr; r++) {
        let v = gv_get(tot, r);
        gv_store(j, act, gated, r, v.u, v.g);
    }
}

@compute @workgroup_size(GV_WG)
fn expert_up_gemv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    gv_run(wid, lid, ACT);
}

@compute @workgroup_size(GV_WG)
fn expert_down_gemv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    gv_run(wid, lid, ACT_NONE);
}
