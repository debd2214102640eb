//! Quantized expert weights (DESIGN.md section 4): FP8 with 128 × 128 block scales, MXFP4 and
//! INT4 groups. A [`QuantMatrix`] holds the bytes exactly as the file stores them; the CPU
//! reference dequantizes each element exactly ([`QuantMatrix::get`]) and computes in f64, the
//! GPU kernels decode in their weight loads and never hold a dequantized copy.

pub mod decode;
pub mod encode;
pub mod parts;

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorData};

pub use encode::QuantSpec;

/// A quantized weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// float8_e4m3fn codes `[E, N, K]` with an f32 or bf16 `scale_inv` per 128 × 128 block
    /// `[E, ⌈N/128⌉, ⌈K/128⌉]` (DeepSeek-V3, Qwen3-FP8): `W = f32(q) · scale_inv`.
    Fp8Block,
    /// e2m1 nibbles `[E, N, K/32, 16]` with an e8m0 scale per 32 values `[E, N, K/32]`
    /// (gpt-oss): `W = e2m1(q) · 2^(s − 127)`.
    Mxfp4,
    /// Unsigned 4-bit codes `[E, N, ⌈K/2⌉]` with an f16 / bf16 / f32 scale per group of G
    /// values `[E, N, K/G]` and optional u8 zero points (absent = 8): `W = (q − z) · scale`.
    Int4,
}

impl QuantFormat {
    /// Every format.
    pub const ALL: [QuantFormat; 3] =
        [QuantFormat::Fp8Block, QuantFormat::Mxfp4, QuantFormat::Int4];

    /// The name used on the command line and in messages.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Fp8Block => "fp8",
            QuantFormat::Mxfp4 => "mxfp4",
            QuantFormat::Int4 => "int4",
        }
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp8" => Ok(QuantFormat::Fp8Block),
            "mxfp4" => Ok(QuantFormat::Mxfp4),
            "int4" => Ok(QuantFormat::Int4),
            other => Err(Error::Usage(format!(
                "unknown quantization {other:?} (expected fp8, mxfp4 or int4)"
            ))),
        }
    }
}

/// The FP8 block edge: one scale per 128 × 128 block of (N, K).
pub const FP8_BLOCK: usize = 128;
/// Values per MXFP4 scale.
pub const MX_BLOCK: usize = 32;
/// The INT4 zero point when a file has no `_zeros` tensor.
pub const INT4_DEFAULT_ZERO: u8 = 8;

/// The scales of a [`QuantMatrix`], row-major in their file layout.
#[derive(Debug, Clone, PartialEq)]
pub enum Scales {
    /// f32, f16 or bf16 scales (FP8 `scale_inv`, INT4 `scales`).
    Float(Tensor),
    /// e8m0 exponent codes (MXFP4).
    E8m0(Vec<u8>),
}

impl Scales {
    /// Scale `i` as f32 (exact: every scale dtype widens exactly).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Scales::Float(t) => match t.data() {
                TensorData::F32(v) => v[i],
                TensorData::F16(v) => v[i].to_f32(),
                TensorData::BF16(v) => v[i].to_f32(),
            },
            Scales::E8m0(v) => decode::e8m0(v[i]),
        }
    }

    /// Number of scales.
    pub fn len(&self) -> usize {
        match self {
            Scales::Float(t) => t.len(),
            Scales::E8m0(v) => v.len(),
        }
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dtype's name as in a safetensors header (`F32`, `F16`, `BF16`, `U8`).
    pub fn dtype_name(&self) -> &'static str {
        match self {
            Scales::Float(t) => match t.dtype() {
                DType::F32 => "F32",
                DType::F16 => "F16",
                DType::BF16 => "BF16",
            },
            Scales::E8m0(_) => "U8",
        }
    }

    /// Bytes per scale.
    pub fn elem_bytes(&self) -> usize {
        match self {
            Scales::Float(t) => t.dtype().size(),
            Scales::E8m0(_) => 1,
        }
    }

    /// The scales' bytes as stored (little-endian).
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Scales::Float(t) => match t.data() {
                TensorData::F32(v) => bytemuck::cast_slice(v).to_vec(),
                TensorData::F16(v) => bytemuck::cast_slice(v).to_vec(),
                TensorData::BF16(v) => bytemuck::cast_slice(v).to_vec(),
            },
            Scales::E8m0(v) => v.clone(),
        }
    }
}

/// A quantized `[E, N, K]` weight matrix (PyTorch Linear layout per expert: N outputs, K
/// inputs), its bytes exactly as the file stores them.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    /// The format.
    pub format: QuantFormat,
    /// Experts E (1 for a shared expert).
    pub experts: usize,
    /// Rows N per expert.
    pub rows: usize,
    /// Columns K (the reduction dimension).
    pub cols: usize,
    /// Element codes: FP8 one byte per element (`[E, N, K]`); MXFP4 and INT4 two per byte, the
    /// low nibble holding the even k (`[E, N, K/2]`, an odd K's last byte has a spare high
    /// nibble).
    pub codes: Vec<u8>,
    /// FP8 `[E, ⌈N/128⌉, ⌈K/128⌉]`, MXFP4 `[E, N, K/32]`, INT4 `[E, N, K/G]`.
    pub scales: Scales,
    /// INT4 zero points `[E, N, K/G]`, or `None` for 8.
    pub zeros: Option<Vec<u8>>,
}

impl QuantMatrix {
    /// Checks that the bytes agree with the format and the logical shape: code, scale and
    /// zero-point counts, the scales' kind, MXFP4's K a multiple of 32, an INT4 group that
    /// divides K. Every path that builds a matrix runs it (the file loader, the quantizers,
    /// [`ExpertWeights::dims`](crate::cpu::expert_gemm::ExpertWeights::dims)), so the
    /// decoders never index out of range. The message names no tensor: callers add it.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (e, n, k) = (self.experts, self.rows, self.cols);
        let er = e
            .checked_mul(n)
            .ok_or_else(|| format!("E x N = {e} x {n} overflows"))?;
        let codes = er
            .checked_mul(self.row_bytes())
            .ok_or_else(|| format!("[{e}, {n}, {k}] overflows"))?;
        if self.codes.len() != codes {
            return Err(format!(
                "{} codes of [{e}, {n}, {k}] take {codes} bytes, got {}",
                self.format,
                self.codes.len()
            ));
        }
        match (self.format, &self.scales) {
            (QuantFormat::Mxfp4, Scales::E8m0(_)) => {}
            (QuantFormat::Mxfp4, s) => {
                return Err(format!(
                    "mxfp4 scales are e8m0 (U8), got {}",
                    s.dtype_name()
                ))
            }
            (f, Scales::E8m0(_)) => return Err(format!("{f} scales are floats, got e8m0 (U8)")),
            (QuantFormat::Fp8Block, Scales::Float(t)) if t.dtype() == DType::F16 => {
                return Err("fp8 block scales are F32 or BF16, got F16".into())
            }
            _ => {}
        }
        if self.format == QuantFormat::Mxfp4 && k % MX_BLOCK != 0 {
            return Err(format!(
                "mxfp4 needs K to be a multiple of {MX_BLOCK}, got K = {k}"
            ));
        }
        if self.format == QuantFormat::Int4 {
            let sc = self.scales.len().checked_div(er).unwrap_or(0);
            if er > 0 && (self.scales.len() % er != 0 || sc == 0 || k % sc != 0) {
                return Err(format!(
                    "int4 scales: {} for {er} rows of K = {k}: need K / G per row, G dividing K",
                    self.scales.len()
                ));
            }
        }
        let want = e
            .checked_mul(self.scale_rows())
            .and_then(|v| v.checked_mul(self.scale_cols()))
            .unwrap_or(usize::MAX);
        if self.format != QuantFormat::Int4 && self.scales.len() != want {
            return Err(format!(
                "{} scales of [{e}, {n}, {k}]: expected {want}, got {}",
                self.format,
                self.scales.len()
            ));
        }
        match (&self.zeros, self.format) {
            (None, _) => Ok(()),
            (Some(_), f) if f != QuantFormat::Int4 => Err(format!("{f} has no zero points")),
            (Some(z), _) if z.len() != self.scales.len() => Err(format!(
                "int4 zero points: one per scale ({}), got {}",
                self.scales.len(),
                z.len()
            )),
            _ => Ok(()),
        }
    }

    /// Bytes of one row's codes.
    pub fn row_bytes(&self) -> usize {
        match self.format {
            QuantFormat::Fp8Block => self.cols,
            QuantFormat::Mxfp4 | QuantFormat::Int4 => self.cols.div_ceil(2),
        }
    }

    /// Scales per (expert, row) for MXFP4 / INT4, per (expert, row block) for FP8.
    pub fn scale_cols(&self) -> usize {
        match self.format {
            QuantFormat::Fp8Block => self.cols.div_ceil(FP8_BLOCK),
            QuantFormat::Mxfp4 => self.cols / MX_BLOCK,
            QuantFormat::Int4 => self.scales.len() / (self.experts * self.rows).max(1),
        }
    }

    /// Scale rows per expert: `⌈N/128⌉` for FP8, N otherwise.
    pub fn scale_rows(&self) -> usize {
        match self.format {
            QuantFormat::Fp8Block => self.rows.div_ceil(FP8_BLOCK),
            _ => self.rows,
        }
    }

    /// The k extent of one scale: 128 (FP8), 32 (MXFP4), G (INT4).
    pub fn group(&self) -> usize {
        match self.format {
            QuantFormat::Fp8Block => FP8_BLOCK,
            QuantFormat::Mxfp4 => MX_BLOCK,
            QuantFormat::Int4 => self.cols / self.scale_cols().max(1),
        }
    }

    /// The index of the scale (and zero point) of element `(e, n, k)`.
    #[inline]
    pub fn scale_index(&self, e: usize, n: usize, k: usize) -> usize {
        match self.format {
            QuantFormat::Fp8Block => {
                (e * self.scale_rows() + n / FP8_BLOCK) * self.scale_cols() + k / FP8_BLOCK
            }
            _ => (e * self.rows + n) * self.scale_cols() + k / self.group(),
        }
    }

    /// Element `(e, n, k)` dequantized exactly (see [`decode`]).
    pub fn get(&self, e: usize, n: usize, k: usize) -> f64 {
        let row = (e * self.rows + n) * self.row_bytes();
        let s = self.scale_index(e, n, k);
        match self.format {
            QuantFormat::Fp8Block => {
                f64::from(decode::e4m3(self.codes[row + k])) * f64::from(self.scales.get(s))
            }
            QuantFormat::Mxfp4 => {
                let Scales::E8m0(sc) = &self.scales else {
                    return f64::NAN;
                };
                f64::from(decode::mxfp4(self.nibble(row, k), sc[s]))
            }
            QuantFormat::Int4 => {
                let z = self.zeros.as_ref().map_or(INT4_DEFAULT_ZERO, |z| z[s]);
                (f64::from(self.nibble(row, k)) - f64::from(z)) * f64::from(self.scales.get(s))
            }
        }
    }

    #[inline]
    fn nibble(&self, row: usize, k: usize) -> u8 {
        let b = self.codes[row + k / 2];
        if k % 2 == 0 {
            b & 0xF
        } else {
            b >> 4
        }
    }

    /// `Σ_k W[e, n, k] · x[k]` in f64, in k order; every weight as [`QuantMatrix::get`]
    /// decodes it (one scale lookup per group instead of per element).
    pub fn dot_row(&self, e: usize, n: usize, x: &[f64]) -> f64 {
        let row = (e * self.rows + n) * self.row_bytes();
        let codes = &self.codes[row..row + self.row_bytes()];
        let group = self.group().max(1);
        let mut acc = 0.0;
        for (gi, xs) in x[..self.cols].chunks(group).enumerate() {
            let k0 = gi * group;
            let s = self.scale_index(e, n, k0);
            match (self.format, &self.scales) {
                (QuantFormat::Fp8Block, sc) => {
                    let scale = f64::from(sc.get(s));
                    for (i, xv) in xs.iter().enumerate() {
                        acc += f64::from(decode::e4m3(codes[k0 + i])) * scale * xv;
                    }
                }
                (QuantFormat::Mxfp4, Scales::E8m0(sc)) => {
                    for (i, xv) in xs.iter().enumerate() {
                        let k = k0 + i;
                        let nib = (codes[k / 2] >> (4 * (k % 2))) & 0xF;
                        acc += f64::from(decode::mxfp4(nib, sc[s])) * xv;
                    }
                }
                (QuantFormat::Int4, sc) => {
                    let scale = f64::from(sc.get(s));
                    let z = f64::from(self.zeros.as_ref().map_or(INT4_DEFAULT_ZERO, |z| z[s]));
                    for (i, xv) in xs.iter().enumerate() {
                        let k = k0 + i;
                        let nib = (codes[k / 2] >> (4 * (k % 2))) & 0xF;
                        acc += (f64::from(nib) - z) * scale * xv;
                    }
                }
                (QuantFormat::Mxfp4, Scales::Float(_)) => return f64::NAN,
            }
        }
        acc
    }

    /// Expert `e`'s rows dequantized, `[N, K]` row-major.
    pub fn dequantize_expert(&self, e: usize) -> Vec<f64> {
        (0..self.rows)
            .flat_map(|n| (0..self.cols).map(move |k| (n, k)))
            .map(|(n, k)| self.get(e, n, k))
            .collect()
    }

    /// Bytes as stored: codes, scales and zero points.
    pub fn packed_bytes(&self) -> u64 {
        let s = (self.scales.len() * self.scales.elem_bytes()) as u64;
        self.codes.len() as u64 + s + self.zeros.as_ref().map_or(0, |z| z.len() as u64)
    }

    /// What a kernel needs to know besides the bytes: format, scale dtype, group, zeros.
    pub fn layout(&self) -> QuantLayout {
        QuantLayout {
            format: self.format,
            scale_dtype: self.scales.dtype_name(),
            group: self.group(),
            zeros: self.zeros.is_some(),
        }
    }
}

/// Makes a gate and an up matrix of one format decode alike where that is exact: scales of
/// different float dtypes both widened to f32 (every f16 / bf16 value is an f32), and zero
/// points materialised as 8 on the one that has none. The GPU kernels decode gate and up in
/// one pass with one layout; the values are unchanged. Different groups are left as they are
/// ([`ExpertWeights::dims`](crate::cpu::expert_gemm::ExpertWeights::dims) refuses them).
pub fn harmonize(gate: &mut Weight, up: &mut Weight) {
    let (Weight::Quant(g), Weight::Quant(u)) = (gate, up) else {
        return;
    };
    if g.format != u.format || g.group() != u.group() {
        return;
    }
    if g.scales.dtype_name() != u.scales.dtype_name() {
        for m in [&mut *g, &mut *u] {
            if let Scales::Float(t) = &m.scales {
                m.scales = Scales::Float(t.cast(DType::F32));
            }
        }
    }
    if g.zeros.is_some() != u.zeros.is_some() {
        for m in [g, u] {
            if m.zeros.is_none() {
                m.zeros = Some(vec![INT4_DEFAULT_ZERO; m.scales.len()]);
            }
        }
    }
}

/// The parts of a quantized matrix's layout a kernel is specialised for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantLayout {
    /// The format.
    pub format: QuantFormat,
    /// `F32`, `F16`, `BF16` or `U8` (e8m0).
    pub scale_dtype: &'static str,
    /// The k extent of a scale.
    pub group: usize,
    /// INT4 zero points present.
    pub zeros: bool,
}

/// One weight matrix of an expert FFN: dense in f32 / f16 / bf16, or quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Weight {
    /// A dense `[E, N, K]` tensor.
    Dense(Tensor),
    /// A quantized `[E, N, K]` matrix.
    Quant(QuantMatrix),
}

impl From<Tensor> for Weight {
    fn from(t: Tensor) -> Self {
        Weight::Dense(t)
    }
}

impl Weight {
    /// The logical shape: the tensor's shape when dense, `[E, N, K]` when quantized.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Weight::Dense(t) => t.shape().to_vec(),
            Weight::Quant(q) => vec![q.experts, q.rows, q.cols],
        }
    }

    /// Number of logical elements.
    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }

    /// True when the matrix has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dense tensor, or `None` when quantized.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Quant(_) => None,
        }
    }

    /// The dense tensor, or an error naming `what` for a backend `backend` that cannot take
    /// quantized weights on this path.
    pub fn require_dense(
        &self,
        backend: crate::device::BackendKind,
        what: &str,
    ) -> Result<&Tensor> {
        match self {
            Weight::Dense(t) => Ok(t),
            Weight::Quant(q) => Err(Error::shape(
                crate::stage::Stage::ExpertGemm,
                format!(
                    "{what}: {} weights are not supported on {backend}",
                    q.format
                ),
            )),
        }
    }

    /// The quantized matrix, or `None` when dense.
    pub fn quant(&self) -> Option<&QuantMatrix> {
        match self {
            Weight::Dense(_) => None,
            Weight::Quant(q) => Some(q),
        }
    }

    /// The format's name: `f32`, `f16`, `bf16`, `fp8`, `mxfp4` or `int4`.
    pub fn format_name(&self) -> &'static str {
        match self {
            Weight::Dense(t) => t.dtype().name(),
            Weight::Quant(q) => q.format.name(),
        }
    }

    /// Bytes as stored (the packed bytes when quantized).
    pub fn bytes(&self) -> u64 {
        match self {
            Weight::Dense(t) => crate::limits::product(&[t.len(), t.dtype().size()]),
            Weight::Quant(q) => q.packed_bytes(),
        }
    }

    /// Element `(e, n, k)` of the logical `[E, N, K]` matrix, dequantized exactly.
    pub fn get(&self, e: usize, n: usize, k: usize) -> f64 {
        match self {
            Weight::Dense(t) => {
                let s = t.shape();
                t.get((e * s[1] + n) * s[2] + k)
            }
            Weight::Quant(q) => q.get(e, n, k),
        }
    }

    /// `Σ_k W[e, n, k] · x[k]` in f64 (`x` has K elements), dequantizing exactly.
    pub fn dot_row(&self, e: usize, n: usize, x: &[f64]) -> f64 {
        match self {
            Weight::Dense(t) => {
                let (rows, cols) = (t.shape()[1], x.len());
                crate::cpu::dot(t, (e * rows + n) * cols, x)
            }
            Weight::Quant(q) => q.dot_row(e, n, x),
        }
    }

    /// Dense weights rounded to `dtype`; quantized ones unchanged.
    pub fn cast(&self, dtype: DType) -> Weight {
        match self {
            Weight::Dense(t) => Weight::Dense(t.cast(dtype)),
            Weight::Quant(q) => Weight::Quant(q.clone()),
        }
    }

    /// Viewed with one more leading axis of 1 (a shared expert's `[N, K]` as `[1, N, K]`).
    pub fn as_one_expert(self) -> Result<Weight> {
        match self {
            Weight::Dense(t) => {
                let mut shape = vec![1];
                shape.extend_from_slice(t.shape());
                Ok(Weight::Dense(Tensor::new(shape, t.data().clone())?))
            }
            Weight::Quant(q) => Ok(Weight::Quant(q)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::Gen;

    /// The fast row dot equals the element-by-element definition bit for bit.
    #[test]
    fn dot_row_is_the_sum_of_get() {
        let mut g = Gen::new(5);
        let t = g.tensor(&[2, 130, 75], 0.5);
        let x: Vec<f64> = g.uniform(75, 1.0).into_iter().map(f64::from).collect();
        let mut specs = vec![QuantSpec::new(QuantFormat::Fp8Block)];
        specs.push(QuantSpec {
            group: Some(25),
            ..QuantSpec::new(QuantFormat::Int4)
        });
        for spec in specs {
            let q = encode::quantize(&t, &spec).unwrap();
            for (e, n) in [(0, 0), (1, 129), (1, 64)] {
                let want = (0..75).fold(0.0, |acc, k| acc + q.get(e, n, k) * x[k]);
                assert_eq!(q.dot_row(e, n, &x), want, "{:?}", spec.format);
            }
        }
        let t = g.tensor(&[2, 3, 64], 0.5);
        let q = encode::quantize(&t, &QuantSpec::new(QuantFormat::Mxfp4)).unwrap();
        let x = &x[..64];
        let want = (0..64).fold(0.0, |acc, k| acc + q.get(1, 2, k) * x[k]);
        assert_eq!(q.dot_row(1, 2, x), want);
    }
}
