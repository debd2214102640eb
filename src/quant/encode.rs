//! Quantizing dense `[E, N, K]` weights into each format (for `moe demo --quant`, benches and
//! tests). Round-to-nearest with ties to the even code; scales chosen so no value overflows.
//! The reference never uses these: it reads whatever codes a file holds.

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::quant::{decode, QuantFormat, QuantMatrix, Scales, FP8_BLOCK, MX_BLOCK};
use crate::tensor::{DType, Tensor, TensorData};

/// How to quantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    /// The format.
    pub format: QuantFormat,
    /// Dtype of FP8 / INT4 scales (MXFP4 scales are e8m0).
    pub scale_dtype: DType,
    /// INT4 group size G (must divide K); `None` picks the largest of 128, 64, 32 dividing K,
    /// else K.
    pub group: Option<usize>,
    /// INT4: asymmetric with zero points (`true`) or symmetric around the default 8.
    pub zeros: bool,
}

impl QuantSpec {
    /// The defaults for a format: f32 scales for FP8, bf16 for INT4 with zero points.
    pub fn new(format: QuantFormat) -> Self {
        QuantSpec {
            format,
            scale_dtype: match format {
                QuantFormat::Int4 => DType::BF16,
                _ => DType::F32,
            },
            group: None,
            zeros: format == QuantFormat::Int4,
        }
    }
}

/// The INT4 group for `k` columns under `spec`: `spec.group`, else the largest of 128, 64,
/// 32 dividing `k`, else `k`; an error when it does not divide `k`.
pub fn int4_group(spec: &QuantSpec, k: usize) -> Result<usize> {
    let g = spec.group.unwrap_or_else(|| {
        [128, 64, 32]
            .into_iter()
            .find(|g| k % g == 0)
            .unwrap_or(k.max(1))
    });
    if g == 0 || k % g != 0 {
        return Err(Error::config(format!(
            "int4 group {g} does not divide K = {k}"
        )));
    }
    Ok(g)
}

/// A scale value as stored in `dtype` (rounded to nearest even), widened back to f32.
fn store(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::F32 => v,
        DType::F16 => f16::from_f32(v).to_f32(),
        DType::BF16 => bf16::from_f32(v).to_f32(),
    }
}

fn scale_tensor(dtype: DType, shape: Vec<usize>, v: Vec<f32>) -> Result<Scales> {
    Ok(Scales::Float(Tensor::from_f32(shape, v)?.cast(dtype)))
}

/// The e4m3 code nearest to `v` (ties to the even code; beyond ±448 saturates).
pub fn e4m3_encode(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7F;
    }
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs();
    let mut best = 0u8;
    let mut best_err = f32::INFINITY;
    for c in 0u8..=0x7E {
        let err = (decode::e4m3(c) - a).abs();
        if err < best_err || (err == best_err && c % 2 == 0) {
            best = c;
            best_err = err;
        }
    }
    sign | best
}

/// The e2m1 nibble nearest to `v` (ties to the even code; beyond ±6 saturates).
pub fn e2m1_encode(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 8 } else { 0 };
    let a = v.abs();
    let mut best = 0u8;
    let mut best_err = f32::INFINITY;
    for (c, &m) in decode::E2M1.iter().enumerate() {
        let err = (m - a).abs();
        if err < best_err || (err == best_err && c % 2 == 0) {
            best = c as u8;
            best_err = err;
        }
    }
    sign | best
}

/// Quantizes a dense `[E, N, K]` tensor.
pub fn quantize(t: &Tensor, spec: &QuantSpec) -> Result<QuantMatrix> {
    let [e, n, k] = t.shape() else {
        return Err(Error::config(format!(
            "quantize: expected an [E, N, K] tensor, got shape {:?}",
            t.shape()
        )));
    };
    let (e, n, k) = (*e, *n, *k);
    if spec.format == QuantFormat::Fp8Block && spec.scale_dtype == DType::F16 {
        return Err(Error::config(
            "fp8 block scales are f32 or bf16 (DESIGN.md section 4), not f16",
        ));
    }
    let w = t.to_f32_vec();
    let at = |ei: usize, ni: usize, ki: usize| w[(ei * n + ni) * k + ki];
    let (codes, scales, zeros) = match spec.format {
        QuantFormat::Fp8Block => {
            let (sr, sc) = (n.div_ceil(FP8_BLOCK), k.div_ceil(FP8_BLOCK));
            let mut scales = vec![0f32; e * sr * sc];
            for ei in 0..e {
                for (bi, bj) in (0..sr).flat_map(|i| (0..sc).map(move |j| (i, j))) {
                    let mut amax = 0f32;
                    for ni in bi * FP8_BLOCK..((bi + 1) * FP8_BLOCK).min(n) {
                        for ki in bj * FP8_BLOCK..((bj + 1) * FP8_BLOCK).min(k) {
                            amax = amax.max(at(ei, ni, ki).abs());
                        }
                    }
                    let s = if amax > 0.0 { amax / 448.0 } else { 1.0 };
                    scales[(ei * sr + bi) * sc + bj] = store(spec.scale_dtype, s);
                }
            }
            let mut codes = vec![0u8; e * n * k];
            for ei in 0..e {
                for ni in 0..n {
                    for ki in 0..k {
                        let s = scales[(ei * sr + ni / FP8_BLOCK) * sc + ki / FP8_BLOCK];
                        codes[(ei * n + ni) * k + ki] = e4m3_encode(at(ei, ni, ki) / s);
                    }
                }
            }
            (
                codes,
                scale_tensor(spec.scale_dtype, vec![e, sr, sc], scales)?,
                None,
            )
        }
        QuantFormat::Mxfp4 => {
            if k % MX_BLOCK != 0 {
                return Err(Error::config(format!(
                    "mxfp4 needs K to be a multiple of {MX_BLOCK}, got K = {k}"
                )));
            }
            let blocks = k / MX_BLOCK;
            let mut scales = vec![0u8; e * n * blocks];
            let mut codes = vec![0u8; e * n * k / 2];
            for r in 0..e * n {
                for b in 0..blocks {
                    let vals = &w[r * k + b * MX_BLOCK..r * k + (b + 1) * MX_BLOCK];
                    let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                    // The smallest power of two putting amax within e2m1's ±6.
                    // Exponents clamped to e8m0's finite range (an inf or NaN block saturates).
                    let mut s: i32 = 0;
                    if amax > 0.0 {
                        s = ((amax / 6.0).log2().ceil()).clamp(-127.0, 127.0) as i32;
                        while s < 127 && amax / 2f32.powi(s) > 6.0 {
                            s += 1;
                        }
                    }
                    let code = (s + 127).clamp(0, 254) as u8;
                    scales[r * blocks + b] = code;
                    let sv = decode::e8m0(code);
                    for (i, v) in vals.iter().enumerate() {
                        let q = e2m1_encode(v / sv);
                        let byte = &mut codes[r * k / 2 + b * MX_BLOCK / 2 + i / 2];
                        *byte |= if i % 2 == 0 { q } else { q << 4 };
                    }
                }
            }
            (codes, Scales::E8m0(scales), None)
        }
        QuantFormat::Int4 => {
            let g = int4_group(spec, k)?;
            let groups = k / g.max(1);
            let row_bytes = k.div_ceil(2);
            let mut scales = vec![0f32; e * n * groups];
            let mut zeros = vec![0u8; e * n * groups];
            let mut codes = vec![0u8; e * n * row_bytes];
            for r in 0..e * n {
                for gi in 0..groups {
                    let vals = &w[r * k + gi * g..r * k + (gi + 1) * g];
                    let (lo, hi) = vals
                        .iter()
                        .fold((0f32, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
                    let (s, z) = if spec.zeros {
                        let s = if hi > lo { (hi - lo) / 15.0 } else { 1.0 };
                        let s = store(spec.scale_dtype, s);
                        (s, (-lo / s).round().clamp(0.0, 15.0) as u8)
                    } else {
                        let amax = lo.abs().max(hi.abs());
                        let s = if amax > 0.0 { amax / 7.0 } else { 1.0 };
                        (store(spec.scale_dtype, s), 8)
                    };
                    scales[r * groups + gi] = s;
                    zeros[r * groups + gi] = z;
                    for (i, v) in vals.iter().enumerate() {
                        let q = ((v / s).round() + f32::from(z)).clamp(0.0, 15.0) as u8;
                        let ki = gi * g + i;
                        let byte = &mut codes[r * row_bytes + ki / 2];
                        *byte |= if ki % 2 == 0 { q } else { q << 4 };
                    }
                }
            }
            (
                codes,
                scale_tensor(spec.scale_dtype, vec![e, n, groups], scales)?,
                spec.zeros.then_some(zeros),
            )
        }
    };
    Ok(QuantMatrix {
        format: spec.format,
        experts: e,
        rows: n,
        cols: k,
        codes,
        scales,
        zeros,
    })
}

/// The dense f32 tensor of a quantized matrix's dequantized values (for tests and `moe
/// import`-style round trips).
pub fn dequantize(q: &QuantMatrix) -> Result<Tensor> {
    let v: Vec<f32> = (0..q.experts)
        .flat_map(|e| q.dequantize_expert(e))
        .map(|x| x as f32)
        .collect();
    Tensor::new(vec![q.experts, q.rows, q.cols], TensorData::F32(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Non-finite weights saturate instead of overflowing the exponent arithmetic.
    #[test]
    fn infinite_weights_saturate() {
        let mut v = vec![0.5f32; 64];
        v[3] = f32::INFINITY;
        v[40] = f32::NAN;
        let t = Tensor::from_f32(vec![1, 1, 64], v).unwrap();
        for f in QuantFormat::ALL {
            quantize(&t, &QuantSpec::new(f)).unwrap();
        }
        let f16_fp8 = QuantSpec {
            scale_dtype: DType::F16,
            ..QuantSpec::new(QuantFormat::Fp8Block)
        };
        assert!(quantize(&t, &f16_fp8).is_err());
    }
}
