//! Stage 3, CPU reference: the expert FFN on permuted rows.
//!
//! For row r of expert e: `h = act(x·Wg[e]ᵀ + bg, x·Wu[e]ᵀ + bu)` (gated) or
//! `h = act(x·Wu[e]ᵀ + bu)`; then `y = h·Wd[e]ᵀ + bd`. f64 throughout.

use rayon::prelude::*;

use crate::config::Activation;
use crate::cpu::{gelu, sigmoid};
use crate::error::{Error, Result};
use crate::quant::Weight;
use crate::shape;
use crate::stage::Stage;
use crate::tensor::Tensor;

/// Weights of E experts (or of one shared expert viewed as E = 1), PyTorch Linear layout.
/// The three matrices are dense or quantized ([`Weight`]); biases are dense.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertWeights {
    /// `[E, F, H]`, present iff the activation is gated.
    pub gate: Option<Weight>,
    /// `[E, F, H]`.
    pub up: Weight,
    /// `[E, H, F]`.
    pub down: Weight,
    /// `[E, F]`.
    pub gate_bias: Option<Tensor>,
    /// `[E, F]`.
    pub up_bias: Option<Tensor>,
    /// `[E, H]`.
    pub down_bias: Option<Tensor>,
}

/// E, H and F of a set of expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertDims {
    /// Experts E.
    pub experts: usize,
    /// Model width H (input and output of each expert).
    pub hidden: usize,
    /// FFN width F (rows of the gate and up projections).
    pub ffn: usize,
}

impl ExpertWeights {
    /// Checks that every tensor agrees on E, H and F and matches the activation; returns them.
    pub fn dims(&self, activation: Activation) -> Result<ExpertDims> {
        let st = Stage::ExpertGemm;
        let (e, f, h) = match self.up.shape()[..] {
            [e, f, h] => (e, f, h),
            ref s => {
                return Err(Error::shape(
                    st,
                    format!("up_proj must be rank 3, got shape {s:?}"),
                ))
            }
        };
        expect_weight(st, "down_proj", &self.down, &[e, h, f])?;
        for (name, w) in [
            ("gate_proj", self.gate.as_ref()),
            ("up_proj", Some(&self.up)),
            ("down_proj", Some(&self.down)),
        ] {
            if let Some(q) = w.and_then(Weight::quant) {
                q.validate()
                    .map_err(|m| Error::shape(st, format!("{name}: {m}")))?;
            }
        }
        match (&self.gate, activation.is_gated()) {
            (Some(g), true) => {
                expect_weight(st, "gate_proj", g, &[e, f, h])?;
                let layout = |w: &Weight| w.quant().map(|q| q.layout());
                if layout(g) != layout(&self.up) {
                    return Err(Error::shape(
                        st,
                        format!(
                            "gate_proj ({}) and up_proj ({}) must share one format, scale dtype, \
                             group and zero-point layout: the gated GEMM decodes both alike",
                            describe(g),
                            describe(&self.up)
                        ),
                    ));
                }
            }
            (None, false) => {}
            (None, true) => {
                return Err(Error::shape(
                    st,
                    format!("activation {activation:?} is gated but there is no gate_proj"),
                ))
            }
            (Some(_), false) => {
                return Err(Error::shape(
                    st,
                    format!("activation {activation:?} is not gated but a gate_proj is present"),
                ))
            }
        }
        if let Some(b) = &self.gate_bias {
            if self.gate.is_none() {
                return Err(Error::shape(st, "gate_proj_bias given without gate_proj"));
            }
            shape::expect_shape(st, "gate_proj_bias", b, &[e, f])?;
        }
        if let Some(b) = &self.up_bias {
            shape::expect_shape(st, "up_proj_bias", b, &[e, f])?;
        }
        if let Some(b) = &self.down_bias {
            shape::expect_shape(st, "down_proj_bias", b, &[e, h])?;
        }
        Ok(ExpertDims {
            experts: e,
            hidden: h,
            ffn: f,
        })
    }
}

/// An error unless weight `name` has logical shape `want`.
fn expect_weight(st: Stage, name: &str, w: &Weight, want: &[usize]) -> Result<()> {
    if w.shape() == want {
        Ok(())
    } else {
        Err(Error::shape(
            st,
            format!("{name}: expected shape {want:?}, got {:?}", w.shape()),
        ))
    }
}

/// A weight's format for messages: `bf16`, or `int4 (BF16 scales, group 128, zeros)`.
fn describe(w: &Weight) -> String {
    match w.quant() {
        None => w.format_name().to_string(),
        Some(q) => {
            let l = q.layout();
            format!(
                "{} ({} scales, group {}{})",
                l.format,
                l.scale_dtype,
                l.group,
                if l.zeros { ", zeros" } else { "" }
            )
        }
    }
}

/// The activation of one FFN column: gated ones take `(g, u)`, the others `u` alone.
#[inline]
pub fn activate(act: Activation, g: f64, u: f64) -> f64 {
    match act {
        Activation::Swiglu => g * sigmoid(g) * u,
        Activation::Geglu => gelu(g) * u,
        Activation::Relu => u.max(0.0),
        Activation::Gelu => gelu(u),
        Activation::ClampedSwiglu(c) => {
            let g = g.min(c.limit);
            let u = u.clamp(-c.limit, c.limit);
            (u + 1.0) * g * sigmoid(c.alpha * g)
        }
    }
}

/// One row `x` `[H]` through expert `e`; returns `[H]`.
pub fn ffn_row(x: &[f64], w: &ExpertWeights, d: ExpertDims, e: usize, act: Activation) -> Vec<f64> {
    ffn_row_stored(x, w, d, e, act, |v| v)
}

/// [`ffn_row`] with the intermediate `h` passed through `store` (the rounding of a device
/// that stores `h` in a narrower dtype between its two GEMMs).
pub fn ffn_row_stored(
    x: &[f64],
    w: &ExpertWeights,
    d: ExpertDims,
    e: usize,
    act: Activation,
    store: impl Fn(f64) -> f64,
) -> Vec<f64> {
    let (h, f) = (d.hidden, d.ffn);
    let hidden: Vec<f64> = (0..f)
        .map(|fi| {
            let u = w.up.dot_row(e, fi, x) + w.up_bias.as_ref().map_or(0.0, |b| b.get(e * f + fi));
            let g = match &w.gate {
                Some(gw) => {
                    gw.dot_row(e, fi, x) + w.gate_bias.as_ref().map_or(0.0, |b| b.get(e * f + fi))
                }
                None => 0.0,
            };
            store(activate(act, g, u))
        })
        .collect();
    (0..h)
        .map(|o| {
            w.down.dot_row(e, o, &hidden) + w.down_bias.as_ref().map_or(0.0, |b| b.get(e * h + o))
        })
        .collect()
}

/// `y_perm` `[rows, H]` for `x_perm` `[rows, H]`: rows of expert e are
/// `expert_offsets[e]..expert_offsets[e+1]`; rows from `expert_offsets[E]` on are zero.
pub fn expert_ffn(
    x_perm: &[f64],
    expert_offsets: &[u32],
    w: &ExpertWeights,
    act: Activation,
) -> Result<Vec<f64>> {
    expert_ffn_stored(x_perm, expert_offsets, w, act, |v| v)
}

/// [`expert_ffn`] with `h` passed through `store` (see [`ffn_row_stored`]).
pub fn expert_ffn_stored(
    x_perm: &[f64],
    expert_offsets: &[u32],
    w: &ExpertWeights,
    act: Activation,
    store: impl Fn(f64) -> f64 + Sync,
) -> Result<Vec<f64>> {
    let d = w.dims(act)?;
    let st = Stage::ExpertGemm;
    shape::expect_len(st, "expert_offsets", expert_offsets.len(), d.experts + 1)?;
    if d.hidden == 0 {
        return Ok(Vec::new());
    }
    if x_perm.len() % d.hidden != 0 {
        return Err(Error::shape(
            st,
            format!(
                "x_perm has {} elements, not a multiple of H = {}",
                x_perm.len(),
                d.hidden
            ),
        ));
    }
    let rows = x_perm.len() / d.hidden;
    check_offsets(expert_offsets, rows)?;
    let mut y = vec![0.0f64; rows * d.hidden];
    y.par_chunks_mut(d.hidden).enumerate().for_each(|(r, out)| {
        // Expert of row r: the last e with offsets[e] <= r (skipping empty experts).
        let e = expert_offsets.partition_point(|&o| o as usize <= r);
        if e == 0 || e > d.experts {
            return; // a dropped row (r >= offsets[E]): stays zero
        }
        let x = &x_perm[r * d.hidden..(r + 1) * d.hidden];
        out.copy_from_slice(&ffn_row_stored(x, w, d, e - 1, act, &store));
    });
    Ok(y)
}

/// The shared expert on every token of `x` `[T, H]`; `w` holds it as one expert.
pub fn shared_ffn(x: &Tensor, w: &ExpertWeights, act: Activation) -> Result<Vec<f64>> {
    shared_ffn_stored(x, w, act, |v| v)
}

/// [`shared_ffn`] with `h` passed through `store` (see [`ffn_row_stored`]).
pub fn shared_ffn_stored(
    x: &Tensor,
    w: &ExpertWeights,
    act: Activation,
    store: impl Fn(f64) -> f64 + Sync,
) -> Result<Vec<f64>> {
    let d = w.dims(act)?;
    let (t, h) = shape::matrix(Stage::ExpertGemm, "x", x)?;
    shape::expect_eq(Stage::ExpertGemm, "shared expert H", d.hidden, h)?;
    shape::expect_eq(Stage::ExpertGemm, "shared expert count", d.experts, 1)?;
    let mut y = vec![0.0f64; t * h];
    if h == 0 {
        return Ok(y);
    }
    y.par_chunks_mut(h).enumerate().for_each(|(ti, out)| {
        out.copy_from_slice(&ffn_row_stored(&x.row_f64(ti, h), w, d, 0, act, &store));
    });
    Ok(y)
}

/// Offsets must start at 0, never decrease, and stay within `rows`.
pub fn check_offsets(offsets: &[u32], rows: usize) -> Result<()> {
    let bad = offsets.first() != Some(&0)
        || offsets.windows(2).any(|w| w[0] > w[1])
        || offsets.last().is_some_and(|&l| l as usize > rows);
    if bad {
        return Err(Error::shape(
            Stage::ExpertGemm,
            format!("expert_offsets must be non-decreasing from 0 to at most {rows} rows"),
        ));
    }
    Ok(())
}
