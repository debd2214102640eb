//! The CPU reference: plain code, f64 accumulation, the ground truth every backend is checked
//! against. One file per stage; each function documents which DESIGN.md rule it implements.
//!
//! Rows are processed in parallel with rayon only to keep tests fast; every sum runs in a
//! fixed order, so results do not depend on the thread count.

pub mod combine;
pub(crate) mod device;
pub(crate) mod ep;
pub mod expert_gemm;
pub mod gate;
pub mod permute;
pub mod router;

use std::cmp::Ordering;

use crate::tensor::{Tensor, TensorData};

/// Ranking order of selection values: larger first, every NaN below every number (including
/// −inf), NaNs equal to each other. Callers break ties by the lower index.
#[inline]
pub fn rank_cmp(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        // Neither is NaN, so partial_cmp is total here; -0.0 == +0.0 falls to the index.
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// The `n` best of `candidates` by `value`, in rank order (descending value, ties to the lower
/// index, NaN last).
pub fn top_n(candidates: &[usize], n: usize, value: impl Fn(usize) -> f64) -> Vec<usize> {
    let mut order = candidates.to_vec();
    // A stable sort on the value keeps ties in ascending index order.
    order.sort_by(|&i, &j| rank_cmp(value(j), value(i)).then(i.cmp(&j)));
    order.truncate(n);
    order
}

/// Dot product of `x` with `w[offset .. offset + x.len()]`, accumulated in f64 in index order.
#[inline]
pub fn dot(w: &Tensor, offset: usize, x: &[f64]) -> f64 {
    let n = x.len();
    match w.data() {
        TensorData::F32(v) => v[offset..offset + n]
            .iter()
            .zip(x)
            .fold(0.0, |acc, (&a, &b)| acc + f64::from(a) * b),
        TensorData::F16(v) => v[offset..offset + n]
            .iter()
            .zip(x)
            .fold(0.0, |acc, (&a, &b)| acc + a.to_f64() * b),
        TensorData::BF16(v) => v[offset..offset + n]
            .iter()
            .zip(x)
            .fold(0.0, |acc, (&a, &b)| acc + a.to_f64() * b),
    }
}

/// Logistic sigmoid in f64.
#[inline]
pub fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// Exact GELU, `v · Φ(v)` with the error function (PyTorch's default "gelu").
#[inline]
pub fn gelu(v: f64) -> f64 {
    0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2))
}
