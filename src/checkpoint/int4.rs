//! Published 4-bit integer checkpoint layouts converted into the canonical INT4 groups
//! (DESIGN.md section 4), exactly: every code, scale and zero point is carried over bit for
//! bit (scales keep their stored dtype and are only transposed), so the canonical formula
//! gives the very weights the publishing library's own dequantizer gives.
//!
//! Each function takes one `[N, K]` Linear weight of one expert (N = out features, K = in
//! features) and returns an [`Int4Groups`].
//!
//! # The canonical target
//!
//! `packed` U8 `[N, ⌈K/2⌉]`, the low nibble of byte `k / 2` holding the even k (codes 0..15;
//! an odd K's spare high nibble is 0), `scales` F16 / BF16 / F32 `[N, K/G]`, optional `zeros`
//! U8 `[N, K/G]` (absent means 8), and `W[n, k] = (q − z) · scale[n, k / G]` with G = K / the
//! scales' last dimension.
//!
//! # GPTQ ([`gptq`]): AutoGPTQ / GPTQModel, `checkpoint_format` "gptq" (v1) or "gptq_v2"
//!
//! As AutoGPTQ's `auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py` packs and dequantizes:
//! `qweight` I32 `[K/8, N]` holds the eight codes k = 8i + j of column n in bits 4j of word
//! `[i, n]` (the packer shifts the j-th of each run of eight input rows by 4j and ORs it in);
//! `qzeros` I32 `[K/G, N/8]` holds the zero point of column n = 8c + j in bits 4j of word
//! `[g, c]`; `scales` `[K/G, N]`; `g_idx` I32 `[K]`, the group of each input row, which is
//! k / G unless the checkpoint was quantized with act-order (`desc_act`), which this layout
//! cannot express and is refused. `W = scale · (q − zero)`.
//!
//! In the "v1" format the zero points are stored minus one, and the two libraries undo that
//! differently ([`GptqZeros`]). AutoGPTQ's packer subtracts one from each zero point before
//! packing, and its torch fallback (like vLLM's `csrc/quantization/gptq/q_gemm.cu`, a zero
//! offset of 1 unless `use_v2_format`) adds one to each nibble on its own, so a stored nibble
//! 15 reads as zero point 16. GPTQModel quantizes in "v2" (zero points as they are) and writes
//! v1 by subtracting 0x11111111 from the whole word (`convert_gptq_v2_to_v1_format_module`),
//! which borrows from the next nibble where a zero point is 0; it reads v1 back by adding
//! 0x11111111 to the whole word (`convert_gptq_v1_to_v2_format_module`, which Hugging Face
//! optimum, and so transformers, applies to a "gptq" checkpoint it loads with a GPTQModel
//! kernel that works in v2).
//! The two readings differ only in words holding a nibble 15, which only a zero point of 0
//! produces: AutoGPTQ's packer ORs that −1 in as all ones (garbling the word's higher nibbles
//! as well), GPTQModel's subtraction borrows (which its addition undoes exactly). Symmetric
//! checkpoints store 7 everywhere and read as 8 both ways. "gptq_v2" stores zero points as
//! they are. Needs K and N multiples of 8 (the word counts are K/8 and N/8).
//!
//! # AWQ GEMM ([`awq`]): AutoAWQ `version` "gemm"
//!
//! As AutoAWQ's `awq/modules/linear/gemm.py` (`WQLinear_GEMM.from_linear`) packs and
//! `awq/utils/packing_utils.py` (`dequantize_gemm`) unpacks: `qweight` I32 `[K, N/8]`, the
//! transpose of GPTQ's packing direction, nibble i (bits 4i) of word `[k, c]` holding column
//! `8c + order[i]` with order `[0, 2, 4, 6, 1, 3, 5, 7]` (undone by the reverse order
//! `[0, 4, 1, 5, 2, 6, 3, 7]` on unpacking); `qzeros` I32 `[K/G, N/8]` packed the same way,
//! zero points stored as they are (no minus one); `scales` `[K/G, N]`;
//! `W = (q − zero) · scale`. Needs N a multiple of 8 and G dividing K (AutoAWQ asserts both).
//!
//! # compressed-tensors "pack-quantized" ([`compressed_tensors`]), 4-bit int
//!
//! As `compressors/quantized_compressors/pack_quantized.py` of neuralmagic/compressed-tensors
//! packs (`pack_to_int32`) and unpacks (`unpack_from_int32`): the signed codes −8..7 are
//! offset by +8 to 0..15 and packed eight per I32 along the last dimension, element 8c + i in
//! bits 4i of word c, the last word zero-padded: `weight_packed` I32 `[N, ⌈K/8⌉]`, with
//! `weight_shape` `[N, K]` giving the unpadded shape. `weight_scale` `[N, K/G]` (`[N, 1]` for
//! the channel strategy). Symmetric schemes store no zero point (zero 0, i.e. canonical 8).
//! Asymmetric group / channel schemes: since compressed-tensors 0.9.4 (PR #296)
//! `weight_zero_point` is packed by the same function along dim 0 — I32 `[⌈N/8⌉, K/G]`, the
//! zero point of row n = 8r + i (offset by +8) in bits 4i of word `[r, g]`; before that the
//! base compressor saved the zero points unpacked as they are, I8 `[N, K/G]` in −8..7
//! (`calculate_qparams` rounds and clamps them to the int4 range and casts to int8).
//! Dequantization (`quantization/lifecycle/forward.py`, `_dequantize`) is
//! `(q − zero) · scale` on the signed values, which is `(q + 8 − (zero + 8)) · scale` on the
//! stored ones. `weight_g_idx` I32 `[K]` exists only for activation ordering "group"; a g_idx
//! holding −1 means column order, anything else must be k / G or it is refused.

use half::{bf16, f16};

use crate::tensor::{Tensor, TensorData};

/// One expert matrix `[rows = N, cols = K]` in the canonical INT4 group layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Groups {
    /// Rows N (out features).
    pub rows: usize,
    /// Columns K (in features, the reduction dimension).
    pub cols: usize,
    /// Codes `[N, ⌈K/2⌉]`, the low nibble holding the even k (an odd K's spare nibble is 0).
    pub packed: Vec<u8>,
    /// Scales `[N, K/G]` in the checkpoint's dtype.
    pub scales: Tensor,
    /// Zero points `[N, K/G]`, or `None` for 8.
    pub zeros: Option<Vec<u8>>,
}

impl Int4Groups {
    /// Groups per row, K/G.
    pub fn groups(&self) -> usize {
        self.scales.shape().get(1).copied().unwrap_or(0)
    }

    /// The group size G.
    pub fn group(&self) -> usize {
        self.cols.checked_div(self.groups()).unwrap_or(0)
    }

    /// Code `(n, k)`, 0..15.
    pub fn code(&self, n: usize, k: usize) -> u8 {
        let b = self.packed[n * self.cols.div_ceil(2) + k / 2];
        (b >> (4 * (k % 2))) & 0xF
    }

    /// Element `(n, k)` by the canonical formula `(q − z) · scale`, exactly, in f64.
    pub fn get(&self, n: usize, k: usize) -> f64 {
        let s = n * self.groups() + k / self.group().max(1);
        let z = self.zeros.as_ref().map_or(8, |z| z[s]);
        (f64::from(self.code(n, k)) - f64::from(z)) * self.scales.get(s)
    }
}

/// A borrowed I32 tensor as a checkpoint stores it: its shape and its row-major values.
#[derive(Debug, Clone, Copy)]
pub struct I32Tensor<'a> {
    /// The shape from the file's header.
    pub shape: &'a [usize],
    /// The values, row-major.
    pub data: &'a [i32],
}

impl<'a> I32Tensor<'a> {
    /// A view of `data` with `shape`.
    pub fn new(shape: &'a [usize], data: &'a [i32]) -> Self {
        I32Tensor { shape, data }
    }
}

/// A compressed-tensors `weight_zero_point` of an asymmetric 4-bit scheme.
#[derive(Debug, Clone, Copy)]
pub enum CtZeroPoint<'a> {
    /// I32 `[⌈N/8⌉, K/G]`, packed along N with +8 (compressed-tensors ≥ 0.9.4).
    Packed(I32Tensor<'a>),
    /// I8 `[N, K/G]`, the signed zero points −8..7 unpacked (earlier releases).
    Unpacked {
        /// The shape from the file's header.
        shape: &'a [usize],
        /// The values, row-major.
        data: &'a [i8],
    },
}

type Res<T> = std::result::Result<T, String>;

/// Nibble `i` (bits 4i..4i+4) of a packed word.
#[inline]
fn nibble(word: i32, i: usize) -> u8 {
    ((word as u32 >> (4 * i)) & 0xF) as u8
}

fn mul(a: usize, b: usize, what: &str) -> Res<usize> {
    a.checked_mul(b)
        .ok_or_else(|| format!("{what}: {a} x {b} overflows"))
}

/// Checks an I32 tensor against the expected 2-D shape.
fn check_i32(name: &str, t: &I32Tensor<'_>, want: [usize; 2], what: &str) -> Res<()> {
    if t.shape != want {
        return Err(format!(
            "{name}: expected shape {want:?} ({what}), got {:?}",
            t.shape
        ));
    }
    let n = mul(want[0], want[1], name)?;
    if t.data.len() != n {
        return Err(format!(
            "{name}: shape {want:?} holds {n} values, got {}",
            t.data.len()
        ));
    }
    Ok(())
}

fn check_dims(rows: usize, cols: usize) -> Res<()> {
    if rows == 0 || cols == 0 {
        return Err(format!("empty matrix [N, K] = [{rows}, {cols}]"));
    }
    // The canonical codes and every packed input index below stay within these products.
    mul(rows, cols, "[N, K]")?;
    Ok(())
}

fn check_multiple(what: &str, v: usize, m: usize, format: &str) -> Res<()> {
    if v % m != 0 {
        return Err(format!(
            "{format} packs {m} values per int32 along {what}: needs {what} a multiple of {m}, got {v}"
        ));
    }
    Ok(())
}

/// The number of groups per row S read off `scales`, whose shape must be `[S, N]`
/// (`transposed`, GPTQ / AWQ) or `[N, S]`, with S dividing K.
fn scale_groups(scales: &Tensor, rows: usize, cols: usize, transposed: bool) -> Res<usize> {
    let shape = scales.shape();
    let want = if transposed { "[K/G, N]" } else { "[N, K/G]" };
    let s = match (shape, transposed) {
        ([s, n], true) if *n == rows => *s,
        ([n, s], false) if *n == rows => *s,
        _ => {
            return Err(format!(
                "scales: expected shape {want} with N = {rows}, K = {cols}, got {shape:?}"
            ))
        }
    };
    if s == 0 || cols % s != 0 {
        return Err(format!(
            "scales: shape {shape:?} gives {s} groups per row, which does not divide K = {cols} \
             (the group size G must divide K)"
        ));
    }
    Ok(s)
}

/// Checks a g_idx against column order `k / G`.
fn check_g_idx(g_idx: Option<&[i32]>, cols: usize, group: usize, name: &str) -> Res<()> {
    let Some(g) = g_idx else { return Ok(()) };
    if g.len() != cols {
        return Err(format!(
            "{name}: expected shape [{cols}] (K), got {} values",
            g.len()
        ));
    }
    for (k, &v) in g.iter().enumerate() {
        if i64::from(v) != (k / group) as i64 {
            return Err(format!(
                "{name}[{k}] = {v}, expected k / G = {} (G = {group}): act-order (desc_act) \
                 checkpoints, whose groups are not contiguous runs of K, are not supported",
                k / group
            ));
        }
    }
    Ok(())
}

fn transpose<T: Copy>(v: &[T], r: usize, c: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(v.len());
    for j in 0..c {
        out.extend((0..r).map(|i| v[i * c + j]));
    }
    out
}

/// `scales` `[S, N]` as `[N, S]`, same dtype.
fn transpose_scales(scales: &Tensor, s: usize, n: usize) -> Res<Tensor> {
    let data = match scales.data() {
        TensorData::F32(v) => TensorData::F32(transpose::<f32>(v, s, n)),
        TensorData::F16(v) => TensorData::F16(transpose::<f16>(v, s, n)),
        TensorData::BF16(v) => TensorData::BF16(transpose::<bf16>(v, s, n)),
    };
    Tensor::new(vec![n, s], data).map_err(|e| format!("scales: {e}"))
}

/// How a GPTQ checkpoint stores its zero points (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GptqZeros {
    /// `checkpoint_format` "gptq" read as GPTQModel (and transformers through optimum) reads
    /// it: the word plus 0x11111111, carries included. Exact for GPTQModel's own exports;
    /// zero points 0..15.
    V1Word,
    /// `checkpoint_format` "gptq" read as AutoGPTQ's kernels and vLLM read it: each nibble
    /// plus one on its own; zero points 1..16.
    V1Nibble,
    /// `checkpoint_format` "gptq_v2" (GPTQModel): the nibbles as they are; zero points 0..15.
    V2,
}

/// Converts a GPTQ matrix (AutoGPTQ / GPTQModel, no act-order; see the module docs):
/// `qweight` I32 `[K/8, N]`, `qzeros` I32 `[K/G, N/8]` read as `zero_format` says, `scales`
/// `[K/G, N]`, `g_idx` I32 `[K]` (must be k / G).
pub fn gptq(
    qweight: I32Tensor<'_>,
    qzeros: I32Tensor<'_>,
    scales: &Tensor,
    g_idx: Option<&[i32]>,
    zero_format: GptqZeros,
    rows: usize,
    cols: usize,
) -> Result<Int4Groups, String> {
    let (n, k) = (rows, cols);
    check_dims(n, k)?;
    check_multiple("K", k, 8, "GPTQ")?;
    check_multiple("N", n, 8, "GPTQ")?;
    check_i32("qweight", &qweight, [k / 8, n], "[K/8, N]")?;
    let s = scale_groups(scales, n, k, true)?;
    check_i32("qzeros", &qzeros, [s, n / 8], "[K/G, N/8]")?;
    let group = k / s;
    check_g_idx(g_idx, k, group, "g_idx")?;

    // Word [i, n] holds codes 8i..8i+8 of column n, code 8i + j in bits 4j: its four
    // little-endian bytes are canonical bytes 4i..4i+4 of row n (low nibble = even k).
    let rb = k / 2;
    let mut packed = vec![0u8; n * rb];
    for (i, words) in qweight.data.chunks_exact(n).enumerate() {
        for (col, &w) in words.iter().enumerate() {
            packed[col * rb + 4 * i..col * rb + 4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
    }
    let mut zeros = vec![0u8; n * s];
    for (g, words) in qzeros.data.chunks_exact(n / 8).enumerate() {
        for (c, &w) in words.iter().enumerate() {
            let (w, add) = match zero_format {
                GptqZeros::V1Word => ((w as u32).wrapping_add(0x1111_1111) as i32, 0),
                GptqZeros::V1Nibble => (w, 1),
                GptqZeros::V2 => (w, 0),
            };
            for j in 0..8 {
                zeros[(8 * c + j) * s + g] = nibble(w, j) + add;
            }
        }
    }
    Ok(Int4Groups {
        rows: n,
        cols: k,
        packed,
        scales: transpose_scales(scales, s, n)?,
        zeros: Some(zeros),
    })
}

/// AutoAWQ's GEMM pack order: nibble i of a word holds column `8c + AWQ_ORDER[i]`.
const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Converts an AWQ GEMM matrix (AutoAWQ `version` "gemm"; see the module docs): `qweight` I32
/// `[K, N/8]` and `qzeros` I32 `[K/G, N/8]` in AWQ's pack order `[0, 2, 4, 6, 1, 3, 5, 7]`,
/// zero points as stored, `scales` `[K/G, N]`.
pub fn awq(
    qweight: I32Tensor<'_>,
    qzeros: I32Tensor<'_>,
    scales: &Tensor,
    rows: usize,
    cols: usize,
) -> Result<Int4Groups, String> {
    let (n, k) = (rows, cols);
    check_dims(n, k)?;
    check_multiple("N", n, 8, "AWQ")?;
    check_i32("qweight", &qweight, [k, n / 8], "[K, N/8]")?;
    let s = scale_groups(scales, n, k, true)?;
    check_i32("qzeros", &qzeros, [s, n / 8], "[K/G, N/8]")?;

    let rb = k.div_ceil(2);
    let mut packed = vec![0u8; n * rb];
    for (kk, words) in qweight.data.chunks_exact(n / 8).enumerate() {
        let (byte, shift) = (kk / 2, 4 * (kk % 2));
        for (c, &w) in words.iter().enumerate() {
            for (i, &o) in AWQ_ORDER.iter().enumerate() {
                packed[(8 * c + o) * rb + byte] |= nibble(w, i) << shift;
            }
        }
    }
    let mut zeros = vec![0u8; n * s];
    for (g, words) in qzeros.data.chunks_exact(n / 8).enumerate() {
        for (c, &w) in words.iter().enumerate() {
            for (i, &o) in AWQ_ORDER.iter().enumerate() {
                zeros[(8 * c + o) * s + g] = nibble(w, i);
            }
        }
    }
    Ok(Int4Groups {
        rows: n,
        cols: k,
        packed,
        scales: transpose_scales(scales, s, n)?,
        zeros: Some(zeros),
    })
}

/// Converts a compressed-tensors "pack-quantized" 4-bit int matrix (see the module docs):
/// `weight_packed` I32 `[N, ⌈K/8⌉]` (signed codes + 8, k = 8c + i in bits 4i), `weight_scale`
/// `[N, K/G]`, the optional asymmetric `weight_zero_point` (packed I32 or, from releases
/// before 0.9.4, unpacked I8), the optional `weight_g_idx` I32 `[K]` (−1 entries mean column
/// order; otherwise it must be k / G), and `rows`, `cols` from `weight_shape` `[N, K]`.
/// Without a zero point the result has none (canonical 8 = signed 0).
pub fn compressed_tensors(
    weight_packed: I32Tensor<'_>,
    scale: &Tensor,
    zero_point: Option<CtZeroPoint<'_>>,
    g_idx: Option<&[i32]>,
    rows: usize,
    cols: usize,
) -> Result<Int4Groups, String> {
    let (n, k) = (rows, cols);
    check_dims(n, k)?;
    let words = k.div_ceil(8);
    check_i32(
        "weight_packed",
        &weight_packed,
        [n, words],
        "[N, ceil(K/8)]",
    )?;
    let s = scale_groups(scale, n, k, false)?;
    if g_idx.is_some_and(|g| !g.contains(&-1)) {
        check_g_idx(g_idx, k, k / s, "weight_g_idx")?;
    }

    // Word c of a row holds k = 8c..8c+8, k = 8c + i in bits 4i: its little-endian bytes are
    // the canonical bytes 4c.. of that row, the last word cut to the row's ⌈K/2⌉ bytes.
    let rb = k.div_ceil(2);
    let mut packed = vec![0u8; n * rb];
    for (row, ws) in weight_packed.data.chunks_exact(words).enumerate() {
        let out = &mut packed[row * rb..(row + 1) * rb];
        for (chunk, &w) in out.chunks_mut(4).zip(ws) {
            let len = chunk.len();
            chunk.copy_from_slice(&w.to_le_bytes()[..len]);
        }
        if k % 2 == 1 {
            out[rb - 1] &= 0xF;
        }
    }

    let zeros = match zero_point {
        None => None,
        Some(CtZeroPoint::Packed(zp)) => {
            let r8 = n.div_ceil(8);
            check_i32("weight_zero_point", &zp, [r8, s], "[ceil(N/8), K/G]")?;
            let mut zeros = vec![0u8; n * s];
            for (r, ws) in zp.data.chunks_exact(s).enumerate() {
                for (g, &w) in ws.iter().enumerate() {
                    for i in 0..8 {
                        let row = 8 * r + i;
                        if row < n {
                            zeros[row * s + g] = nibble(w, i);
                        }
                    }
                }
            }
            Some(zeros)
        }
        Some(CtZeroPoint::Unpacked { shape, data }) => {
            if shape != [n, s] {
                return Err(format!(
                    "weight_zero_point: expected shape [{n}, {s}] ([N, K/G], unpacked I8) or \
                     [{}, {s}] (packed I32), got {shape:?}",
                    n.div_ceil(8)
                ));
            }
            if data.len() != n * s {
                return Err(format!(
                    "weight_zero_point: shape [{n}, {s}] holds {} values, got {}",
                    n * s,
                    data.len()
                ));
            }
            let mut zeros = Vec::with_capacity(data.len());
            for (i, &z) in data.iter().enumerate() {
                if !(-8..=7).contains(&z) {
                    return Err(format!(
                        "weight_zero_point[{}, {}] = {z} is outside the int4 range -8..7",
                        i / s,
                        i % s
                    ));
                }
                zeros.push((z + 8) as u8);
            }
            Some(zeros)
        }
    };
    Ok(Int4Groups {
        rows: n,
        cols: k,
        packed,
        scales: scale.clone(),
        zeros,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Random scales `shape` in `dtype` (f32 values rounded to the dtype).
    fn scales(rng: &mut StdRng, shape: [usize; 2], dtype: DType) -> Tensor {
        let v: Vec<f32> = (0..shape[0] * shape[1])
            .map(|_| rng.gen_range(-0.05f32..0.05))
            .collect();
        Tensor::from_f32(shape.to_vec(), v).unwrap().cast(dtype)
    }

    const DTYPES: [DType; 3] = [DType::F16, DType::BF16, DType::F32];

    /// Every element of `got` by the canonical formula equals `want(n, k)` exactly.
    fn assert_dequant(got: &Int4Groups, want: impl Fn(usize, usize) -> f64, what: &str) {
        assert_eq!(got.packed.len(), got.rows * got.cols.div_ceil(2), "{what}");
        for n in 0..got.rows {
            for k in 0..got.cols {
                assert_eq!(got.get(n, k), want(n, k), "{what}: element ({n}, {k})");
            }
        }
        if got.cols % 2 == 1 {
            for n in 0..got.rows {
                assert_eq!(got.packed[(n + 1) * got.cols.div_ceil(2) - 1] >> 4, 0);
            }
        }
    }

    // ---- GPTQ: the packers of AutoGPTQ (qlinear_cuda_old.QuantLinear.pack) and GPTQModel
    // (PackableQuantLinear.pack_original + convert_gptq_v2_to_v1_format_module), 4-bit ----

    /// `intweight` `[K, N]` (codes 0..15), `zeros` `[S, N]`: qweight `[K/8, N]` (eight
    /// consecutive rows ORed in at 4 · (j − i)), qzeros `[S, N/8]` of `zeros`, less one each
    /// when `minus_one` (AutoGPTQ), ORed in column-wise the same way, as uint32, then int32.
    fn gptq_pack(
        intweight: &[u32],
        zeros: &[u32],
        k: usize,
        n: usize,
        minus_one: bool,
    ) -> (Vec<i32>, Vec<i32>) {
        let mut qweight = vec![0u32; k / 8 * n];
        let (mut i, mut row) = (0, 0);
        while row < k / 8 {
            for j in i..i + 8 {
                for c in 0..n {
                    qweight[row * n + c] |= intweight[j * n + c] << (4 * (j - i));
                }
            }
            i += 8;
            row += 1;
        }
        let s = zeros.len() / n;
        let zs: Vec<u32> = zeros
            .iter()
            .map(|z| z.wrapping_sub(u32::from(minus_one)))
            .collect();
        let mut qzeros = vec![0u32; s * (n / 8)];
        let (mut i, mut col) = (0, 0);
        while col < n / 8 {
            for j in i..i + 8 {
                for g in 0..s {
                    qzeros[g * (n / 8) + col] |= zs[g * n + j] << (4 * (j - i));
                }
            }
            i += 8;
            col += 1;
        }
        let cast = |v: Vec<u32>| v.into_iter().map(|x| x as i32).collect();
        (cast(qweight), cast(qzeros))
    }

    /// GPTQModel's v2 → v1 export: the whole int32 word minus 0x11111111 (borrows included).
    fn gptq_v2_to_v1(qzeros: &[i32]) -> Vec<i32> {
        qzeros.iter().map(|w| w.wrapping_sub(0x1111_1111)).collect()
    }

    #[test]
    fn gptq_matches_dequant() {
        let mut rng = StdRng::seed_from_u64(0x6715);
        let shapes = [
            (8, 16, 8),
            (24, 48, 16),
            (16, 40, 8),
            (40, 96, 32),
            (8, 64, 64),
        ];
        for (case, &(n, k, g)) in shapes.iter().enumerate() {
            let s = k / g;
            let dtype = DTYPES[case % 3];
            let intweight: Vec<u32> = (0..k * n).map(|_| rng.gen_range(0..16)).collect();
            let sc = scales(&mut rng, [s, n], dtype);
            let g_idx: Vec<i32> = (0..k).map(|i| (i / g) as i32).collect();
            // AutoGPTQ-written v1 with zero points 1..16 (16 stored as nibble 15), read per
            // nibble; GPTQModel-written v1 with zero points 0..15 (0 borrowing from the next
            // nibble), read per word; v2 as stored; and GPTQModel's v1 without a zero point of
            // 0, which both v1 readings agree on.
            let mut z_auto: Vec<u32> = (0..s * n).map(|_| rng.gen_range(1..=16)).collect();
            z_auto[0] = 16;
            let mut z_model: Vec<u32> = (0..s * n).map(|_| rng.gen_range(0..16)).collect();
            z_model[0] = 0;
            z_model[n - 1] = 0;
            let z_pos: Vec<u32> = (0..s * n).map(|_| rng.gen_range(1..16)).collect();
            let (qw, qz_auto) = gptq_pack(&intweight, &z_auto, k, n, true);
            let (_, qz_v2) = gptq_pack(&intweight, &z_model, k, n, false);
            let qz_model = gptq_v2_to_v1(&qz_v2);
            let (_, qz_pos) = gptq_pack(&intweight, &z_pos, k, n, false);
            let qz_pos = gptq_v2_to_v1(&qz_pos);
            let cases = [
                (&z_auto, &qz_auto, GptqZeros::V1Nibble),
                (&z_model, &qz_model, GptqZeros::V1Word),
                (&z_model, &qz_v2, GptqZeros::V2),
                (&z_pos, &qz_pos, GptqZeros::V1Word),
                (&z_pos, &qz_pos, GptqZeros::V1Nibble),
            ];
            for (zeros, qz, format) in cases {
                let what = format!("gptq {format:?} N={n} K={k} G={g}");
                let got = gptq(
                    I32Tensor::new(&[k / 8, n], &qw),
                    I32Tensor::new(&[s, n / 8], qz),
                    &sc,
                    Some(&g_idx),
                    format,
                    n,
                    k,
                )
                .unwrap();
                assert_eq!(got.scales.dtype(), dtype);
                assert_eq!(got.scales.shape(), [n, s]);
                assert_eq!(got.group(), g);
                // scale · (q − zero) on the original integers.
                let want = |nn: usize, kk: usize| {
                    let gi = kk / g;
                    (f64::from(intweight[kk * n + nn]) - f64::from(zeros[gi * n + nn]))
                        * sc.get(gi * n + nn)
                };
                assert_dequant(&got, want, &what);
                for nn in 0..n {
                    for gi in 0..s {
                        let z = got.zeros.as_ref().unwrap()[nn * s + gi];
                        assert_eq!(u32::from(z), zeros[gi * n + nn], "{what}");
                        assert_eq!(
                            got.scales.get(nn * s + gi).to_bits(),
                            sc.get(gi * n + nn).to_bits()
                        );
                    }
                }
                // No g_idx: the same.
                let again = gptq(
                    I32Tensor::new(&[k / 8, n], &qw),
                    I32Tensor::new(&[s, n / 8], qz),
                    &sc,
                    None,
                    format,
                    n,
                    k,
                )
                .unwrap();
                assert_eq!(again, got);
            }
            // Where GPTQModel wrote a zero point of 0 the per-nibble reading differs.
            let nibble_read = gptq(
                I32Tensor::new(&[k / 8, n], &qw),
                I32Tensor::new(&[s, n / 8], &qz_model),
                &sc,
                None,
                GptqZeros::V1Nibble,
                n,
                k,
            )
            .unwrap();
            assert_eq!(nibble_read.zeros.unwrap()[0], 16);
        }
    }

    // ---- AWQ: the packer of AutoAWQ's WQLinear_GEMM.from_linear ----

    /// `intweight` `[K, N]`, `zeros` `[S, N]`: each word column c ORs in column
    /// `c · 8 + order_map[i]` at 4i, order_map `[0, 2, 4, 6, 1, 3, 5, 7]`.
    fn awq_pack(intweight: &[i32], zeros: &[i32], k: usize, n: usize) -> (Vec<i32>, Vec<i32>) {
        let order_map = [0, 2, 4, 6, 1, 3, 5, 7];
        let pack = |m: &[i32], r: usize| {
            let mut q = vec![0i32; r * (n / 8)];
            for col in 0..n / 8 {
                for (i, &o) in order_map.iter().enumerate() {
                    for row in 0..r {
                        q[row * (n / 8) + col] |= m[row * n + col * 8 + o] << (i * 4);
                    }
                }
            }
            q
        };
        (pack(intweight, k), pack(zeros, zeros.len() / n))
    }

    /// AutoAWQ's own unpacking (`unpack_awq` + `reverse_awq_order`): nibble j of word c,
    /// reordered by `[0, 4, 1, 5, 2, 6, 3, 7]`.
    fn awq_unpack(q: &[i32], r: usize, n: usize) -> Vec<i32> {
        let rev = [0, 4, 1, 5, 2, 6, 3, 7];
        let raw: Vec<i32> = (0..r * n)
            .map(|i| (q[i / 8] >> (4 * (i % 8))) & 0xF)
            .collect();
        (0..r * n)
            .map(|i| {
                let (row, col) = (i / n, i % n);
                raw[row * n + col / 8 * 8 + rev[col % 8]]
            })
            .collect()
    }

    #[test]
    fn awq_matches_autoawq_dequant() {
        let mut rng = StdRng::seed_from_u64(0xA3C);
        for (case, &(n, k, g)) in [
            (8, 6, 2),
            (16, 15, 5),
            (24, 33, 11),
            (40, 96, 32),
            (8, 7, 7),
        ]
        .iter()
        .enumerate()
        {
            let s = k / g;
            let dtype = DTYPES[case % 3];
            let intweight: Vec<i32> = (0..k * n).map(|_| rng.gen_range(0..16)).collect();
            let zeros: Vec<i32> = (0..s * n).map(|_| rng.gen_range(0..16)).collect();
            let sc = scales(&mut rng, [s, n], dtype);
            let (qw, qz) = awq_pack(&intweight, &zeros, k, n);
            // The test packer round-trips through AutoAWQ's own unpacker.
            assert_eq!(awq_unpack(&qw, k, n), intweight);
            assert_eq!(awq_unpack(&qz, s, n), zeros);
            let got = awq(
                I32Tensor::new(&[k, n / 8], &qw),
                I32Tensor::new(&[s, n / 8], &qz),
                &sc,
                n,
                k,
            )
            .unwrap();
            assert_eq!(got.scales.dtype(), dtype);
            assert_eq!(got.group(), g);
            // dequantize_gemm: (iweight − izeros) · scales, per group of K.
            let want = |nn: usize, kk: usize| {
                let gi = kk / g;
                (f64::from(intweight[kk * n + nn]) - f64::from(zeros[gi * n + nn]))
                    * sc.get(gi * n + nn)
            };
            assert_dequant(&got, want, &format!("awq N={n} K={k} G={g}"));
            for nn in 0..n {
                for kk in 0..k {
                    assert_eq!(i32::from(got.code(nn, kk)), intweight[kk * n + nn]);
                }
            }
        }
    }

    // ---- compressed-tensors: pack_to_int32 (current torch version and the numpy one) ----

    /// `pack_to_int32(value, 4, packed_dim)` of compressed-tensors (current): +8 to unsigned,
    /// (dim 0: transposed first), zero-padded to a multiple of 8 along the last dim, each run
    /// of 8 shifted by 4i and summed as int32, (dim 0: transposed back).
    fn ct_pack(value: &[i8], r: usize, c: usize, packed_dim: usize) -> (Vec<i32>, [usize; 2]) {
        let unsigned: Vec<i32> = value.iter().map(|&v| i32::from(v) + 8).collect();
        let (rows, cols, value) = if packed_dim == 0 {
            (c, r, transpose(&unsigned, r, c))
        } else {
            (r, c, unsigned)
        };
        let groups = cols.div_ceil(8);
        let mut packed = vec![0i32; rows * groups];
        for i in 0..rows {
            for gi in 0..groups {
                let mut sum = 0i32;
                for b in 0..8 {
                    let j = gi * 8 + b;
                    let v = if j < cols { value[i * cols + j] } else { 0 };
                    sum = sum.wrapping_add(v << (4 * b));
                }
                packed[i * groups + gi] = sum;
            }
        }
        if packed_dim == 0 {
            (transpose(&packed, rows, groups), [groups, rows])
        } else {
            (packed, [rows, groups])
        }
    }

    /// The earlier numpy `pack_to_int32` (packed_dim 1): uint32, padded, `|=` of
    /// `value[:, i::8] << 4i`.
    fn ct_pack_numpy(value: &[i8], r: usize, c: usize) -> Vec<i32> {
        let words = c.div_ceil(8);
        let mut padded = vec![0u32; r * words * 8];
        for i in 0..r {
            for j in 0..c {
                padded[i * words * 8 + j] = (i32::from(value[i * c + j]) + 8) as u32;
            }
        }
        let mut packed = vec![0u32; r * words];
        for b in 0..8 {
            for i in 0..r {
                for w in 0..words {
                    packed[i * words + w] |= padded[i * words * 8 + w * 8 + b] << (4 * b);
                }
            }
        }
        packed.into_iter().map(|x| x as i32).collect()
    }

    #[test]
    fn compressed_tensors_matches_dequantize() {
        let mut rng = StdRng::seed_from_u64(0xC7);
        let shapes = [
            (1, 7, 7),
            (13, 21, 7),
            (9, 30, 10),
            (17, 64, 16),
            (5, 17, 17),
            (8, 16, 4),
        ];
        for (case, &(n, k, g)) in shapes.iter().enumerate() {
            let s = k / g;
            let dtype = DTYPES[case % 3];
            let q: Vec<i8> = (0..n * k).map(|_| rng.gen_range(-8..=7)).collect();
            let zp: Vec<i8> = (0..n * s).map(|_| rng.gen_range(-8..=7)).collect();
            let sc = scales(&mut rng, [n, s], dtype);
            let (wp, wshape) = ct_pack(&q, n, k, 1);
            assert_eq!(wshape, [n, k.div_ceil(8)]);
            assert_eq!(ct_pack_numpy(&q, n, k), wp);
            let (zpp, zshape) = ct_pack(&zp, n, s, 0);
            assert_eq!(zshape, [n.div_ceil(8), s]);
            let g_col: Vec<i32> = (0..k).map(|i| (i / g) as i32).collect();
            let g_unset = vec![-1i32; k];
            // _dequantize: (x_q − zero_point) · scale on the signed values.
            let want_asym = |nn: usize, kk: usize| {
                let i = nn * s + kk / g;
                (f64::from(q[nn * k + kk]) - f64::from(zp[i])) * sc.get(i)
            };
            let want_sym =
                |nn: usize, kk: usize| f64::from(q[nn * k + kk]) * sc.get(nn * s + kk / g);
            let w = I32Tensor::new(&wshape, &wp);
            let what = format!("ct N={n} K={k} G={g}");

            let sym = compressed_tensors(w, &sc, None, None, n, k).unwrap();
            assert!(sym.zeros.is_none());
            assert_eq!(sym.scales, sc);
            assert_dequant(&sym, want_sym, &what);

            let packed_zp = Some(CtZeroPoint::Packed(I32Tensor::new(&zshape, &zpp)));
            let asym = compressed_tensors(w, &sc, packed_zp, Some(&g_col), n, k).unwrap();
            assert_dequant(&asym, want_asym, &what);

            // Padding nibbles past K are ignored (an odd K's spare canonical nibble stays 0).
            let mut dirty = wp.clone();
            let words = k.div_ceil(8);
            for row in 0..n {
                let used = k - 8 * (words - 1);
                if used < 8 {
                    dirty[row * words + words - 1] |= (u32::MAX << (4 * used)) as i32;
                }
            }
            let dirty = I32Tensor::new(&wshape, &dirty);
            assert_eq!(
                compressed_tensors(dirty, &sc, None, None, n, k).unwrap(),
                sym
            );

            let unpacked = Some(CtZeroPoint::Unpacked {
                shape: &[n, s],
                data: &zp,
            });
            let old = compressed_tensors(w, &sc, unpacked, Some(&g_unset), n, k).unwrap();
            assert_eq!(old, asym);
            for nn in 0..n {
                for kk in 0..k {
                    assert_eq!(i32::from(asym.code(nn, kk)), i32::from(q[nn * k + kk]) + 8);
                }
            }
        }
    }

    // ---- errors ----

    fn f16_scales(shape: [usize; 2]) -> Tensor {
        Tensor::from_f32(shape.to_vec(), vec![0.5; shape[0] * shape[1]])
            .unwrap()
            .cast(DType::F16)
    }

    fn err<T: std::fmt::Debug>(r: Result<T, String>, has: &str) {
        let e = r.expect_err("expected an error");
        assert!(e.contains(has), "{e:?} does not mention {has:?}");
    }

    const V1: GptqZeros = GptqZeros::V1Word;

    #[test]
    fn gptq_errors() {
        let (n, k) = (16, 32);
        let qw = vec![0i32; k / 8 * n];
        let qz = vec![0i32; 2 * n / 8];
        let sc = f16_scales([2, n]);
        let w = I32Tensor::new(&[4, 16], &qw);
        let z = I32Tensor::new(&[2, 2], &qz);
        assert!(gptq(w, z, &sc, None, V1, n, k).is_ok());
        // Shapes.
        err(
            gptq(I32Tensor::new(&[16, 4], &qw), z, &sc, None, V1, n, k),
            "qweight: expected shape [4, 16]",
        );
        err(
            gptq(I32Tensor::new(&[4, 16], &qw[1..]), z, &sc, None, V1, n, k),
            "holds 64 values, got 63",
        );
        err(
            gptq(w, I32Tensor::new(&[2, 16], &qz), &sc, None, V1, n, k),
            "qzeros: expected shape [2, 2]",
        );
        err(
            gptq(w, z, &f16_scales([n, 2]), None, V1, n, k),
            "scales: expected shape [K/G, N]",
        );
        err(
            gptq(w, z, &f16_scales([3, n]), None, V1, n, k),
            "does not divide K = 32",
        );
        err(gptq(w, z, &f16_scales([0, n]), None, V1, n, k), "scales");
        // Multiples of 8, empty, overflow.
        err(gptq(w, z, &sc, None, V1, n, 36), "K a multiple of 8");
        err(gptq(w, z, &sc, None, V1, 12, k), "N a multiple of 8");
        err(gptq(w, z, &sc, None, V1, 0, k), "empty");
        err(
            gptq(w, z, &sc, None, V1, usize::MAX - 7, 1 << 40),
            "overflows",
        );
        // g_idx: act-order and length.
        let mut g: Vec<i32> = (0..k).map(|i| (i / 16) as i32).collect();
        assert!(gptq(w, z, &sc, Some(&g), V1, n, k).is_ok());
        g.swap(3, 20);
        err(gptq(w, z, &sc, Some(&g), V1, n, k), "act-order");
        err(
            gptq(w, z, &sc, Some(&g[1..]), V1, n, k),
            "g_idx: expected shape [32]",
        );
        let g8: Vec<i32> = (0..k).map(|i| (i / 8) as i32).collect();
        err(gptq(w, z, &sc, Some(&g8), V1, n, k), "g_idx[8] = 1");
    }

    #[test]
    fn awq_errors() {
        let (n, k) = (8, 12);
        let qw = vec![0i32; k * n / 8];
        let qz = vec![0i32; 3 * n / 8];
        let sc = f16_scales([3, n]);
        let w = I32Tensor::new(&[12, 1], &qw);
        let z = I32Tensor::new(&[3, 1], &qz);
        assert!(awq(w, z, &sc, n, k).is_ok());
        err(awq(w, z, &sc, 12, k), "N a multiple of 8");
        err(
            awq(I32Tensor::new(&[1, 12], &qw), z, &sc, n, k),
            "qweight: expected shape [12, 1]",
        );
        err(
            awq(w, I32Tensor::new(&[1, 3], &qz), &sc, n, k),
            "qzeros: expected shape [3, 1]",
        );
        err(
            awq(w, z, &f16_scales([5, n]), n, k),
            "does not divide K = 12",
        );
        err(
            awq(w, z, &f16_scales([3, 16]), n, k),
            "scales: expected shape [K/G, N]",
        );
        err(awq(w, z, &sc, n, 0), "empty");
    }

    #[test]
    fn compressed_tensors_errors() {
        let (n, k) = (9, 12);
        let wp = vec![0i32; n * 2];
        let sc = f16_scales([n, 3]);
        let w = I32Tensor::new(&[9, 2], &wp);
        assert!(compressed_tensors(w, &sc, None, None, n, k).is_ok());
        err(
            compressed_tensors(I32Tensor::new(&[2, 9], &wp), &sc, None, None, n, k),
            "weight_packed: expected shape [9, 2]",
        );
        err(
            compressed_tensors(w, &f16_scales([3, n]), None, None, n, k),
            "scales: expected shape [N, K/G]",
        );
        err(
            compressed_tensors(w, &f16_scales([n, 5]), None, None, n, k),
            "does not divide K = 12",
        );
        let zp = vec![0i32; 2 * 3];
        let ok = Some(CtZeroPoint::Packed(I32Tensor::new(&[2, 3], &zp)));
        assert!(compressed_tensors(w, &sc, ok, None, n, k).is_ok());
        let bad = Some(CtZeroPoint::Packed(I32Tensor::new(&[3, 2], &zp)));
        err(
            compressed_tensors(w, &sc, bad, None, n, k),
            "weight_zero_point: expected shape [2, 3]",
        );
        let mut zi = vec![0i8; n * 3];
        fn un(d: &[i8]) -> Option<CtZeroPoint<'_>> {
            Some(CtZeroPoint::Unpacked {
                shape: &[9, 3],
                data: d,
            })
        }
        assert!(compressed_tensors(w, &sc, un(&zi), None, n, k).is_ok());
        zi[4] = 8;
        err(
            compressed_tensors(w, &sc, un(&zi), None, n, k),
            "weight_zero_point[1, 1] = 8",
        );
        zi[4] = -9;
        err(
            compressed_tensors(w, &sc, un(&zi), None, n, k),
            "outside the int4 range",
        );
        err(
            compressed_tensors(w, &sc, un(&zi[1..]), None, n, k),
            "holds 27 values, got 26",
        );
        let wrong = Some(CtZeroPoint::Unpacked {
            shape: &[3, 9],
            data: &zi,
        });
        err(
            compressed_tensors(w, &sc, wrong, None, n, k),
            "weight_zero_point: expected shape [9, 3]",
        );
        let mut g: Vec<i32> = (0..k).map(|i| (i / 4) as i32).collect();
        assert!(compressed_tensors(w, &sc, None, Some(&g), n, k).is_ok());
        g.swap(0, 11);
        err(
            compressed_tensors(w, &sc, None, Some(&g), n, k),
            "weight_g_idx[0] = 2",
        );
        err(
            compressed_tensors(w, &sc, None, Some(&g[..5]), n, k),
            "weight_g_idx: expected shape [12]",
        );
    }

    /// Arbitrary shapes, lengths and dimensions never panic: each call returns Ok or Err.
    #[test]
    fn arbitrary_inputs_never_panic() {
        let mut rng = StdRng::seed_from_u64(99);
        let data: Vec<i32> = (0..4096).map(|_| rng.gen()).collect();
        let bytes: Vec<i8> = (0..4096).map(|_| rng.gen()).collect();
        let g_idx: Vec<i32> = (0..256).map(|i| i / 8).collect();
        let pick =
            |rng: &mut StdRng| [0, 1, 2, 3, 7, 8, 9, 16, 24, 32, 33, 64][rng.gen_range(0..12)];
        for _ in 0..4000 {
            let (n, k) = (pick(&mut rng), pick(&mut rng));
            let s1 = [pick(&mut rng), pick(&mut rng)];
            let s2 = [pick(&mut rng), pick(&mut rng)];
            let s3 = [pick(&mut rng), pick(&mut rng)];
            let l1 = rng.gen_range(0..=(s1[0] * s1[1] + 1).min(4096));
            let l2 = rng.gen_range(0..=(s2[0] * s2[1] + 1).min(4096));
            let sc = f16_scales(s3);
            let a = I32Tensor::new(&s1, &data[..l1]);
            let b = I32Tensor::new(&s2, &data[..l2]);
            let gi = rng.gen_bool(0.5).then_some(&g_idx[..k.min(256)]);
            let _ = gptq(a, b, &sc, gi, V1, n, k);
            let _ = awq(a, b, &sc, n, k);
            let zp = match rng.gen_range(0..3) {
                0 => None,
                1 => Some(CtZeroPoint::Packed(b)),
                _ => Some(CtZeroPoint::Unpacked {
                    shape: &s2,
                    data: &bytes[..l2],
                }),
            };
            if let Ok(m) = compressed_tensors(a, &sc, zp, gi, n, k) {
                for nn in 0..m.rows {
                    for kk in 0..m.cols {
                        let _ = m.get(nn, kk);
                    }
                }
            }
        }
    }
}
