//! Stage 4, CPU reference: `y[t] = output_scale · Σ_j w[t,j] · y_perm[row_of(t,j)]` in slot
//! order j = 0..slots−1 over kept assignments, plus the shared expert (weight 1, or
//! `sigmoid(x·g)` when the shared expert has a gate).

use rayon::prelude::*;

use crate::cpu::sigmoid;
use crate::error::{Error, Result};
use crate::shape;
use crate::stage::Stage;

/// The shared expert's contribution to stage 4.
#[derive(Debug, Clone, Copy)]
pub struct SharedInput<'a> {
    /// Shared expert output `[T, H]`.
    pub y: &'a [f64],
    /// Gate logits `x·g` `[T]` (Qwen2); `None` means weight 1 (DeepSeek).
    pub gate_logits: Option<&'a [f64]>,
}

/// The assignments combine reads, `[T, slots]` each.
#[derive(Debug, Clone, Copy)]
pub struct Assignments<'a> {
    /// Assignments per token (`top_k`, or E for expert choice).
    pub slots: usize,
    /// Weight of each assignment (0 where dropped).
    pub weights: &'a [f64],
    /// Whether each assignment survived capacity; dropped ones are skipped.
    pub kept: &'a [bool],
    /// Row of `y_perm` holding each kept assignment's expert output.
    pub row_of_assignment: &'a [u32],
}

/// `y` `[T, H]` from `y_perm` `[rows, H]`.
pub fn combine(
    y_perm: &[f64],
    hidden: usize,
    a: Assignments<'_>,
    shared: Option<SharedInput<'_>>,
    output_scale: f64,
) -> Result<Vec<f64>> {
    let st = Stage::Combine;
    let n = a.weights.len();
    if a.slots == 0 || n % a.slots != 0 {
        return Err(Error::shape(
            st,
            format!("{n} weights do not fill rows of {} slots", a.slots),
        ));
    }
    let t = n / a.slots;
    shape::expect_len(st, "kept", a.kept.len(), n)?;
    shape::expect_len(st, "row_of_assignment", a.row_of_assignment.len(), n)?;
    let rows = y_perm.len().checked_div(hidden).unwrap_or(0);
    if let Some(i) = (0..n).find(|&i| a.kept[i] && a.row_of_assignment[i] as usize >= rows) {
        return Err(Error::shape(
            st,
            format!(
                "row_of_assignment[{i}] = {} is outside y_perm's {rows} rows",
                a.row_of_assignment[i]
            ),
        ));
    }
    if let Some(s) = shared {
        shape::expect_len(st, "shared expert output", s.y.len(), t * hidden)?;
        if let Some(g) = s.gate_logits {
            shape::expect_len(st, "shared gate logits", g.len(), t)?;
        }
    }
    let mut y = vec![0.0f64; t * hidden];
    if hidden == 0 {
        return Ok(y);
    }
    y.par_chunks_mut(hidden).enumerate().for_each(|(ti, out)| {
        for j in 0..a.slots {
            let i = ti * a.slots + j;
            // Dropped assignments contribute nothing (not even 0 · NaN).
            if !a.kept[i] {
                continue;
            }
            let w = a.weights[i];
            let r = a.row_of_assignment[i] as usize;
            for (o, &v) in out.iter_mut().zip(&y_perm[r * hidden..(r + 1) * hidden]) {
                *o += w * v;
            }
        }
        out.iter_mut().for_each(|o| *o *= output_scale);
        if let Some(s) = shared {
            let g = s.gate_logits.map_or(1.0, |g| sigmoid(g[ti]));
            for (o, &v) in out.iter_mut().zip(&s.y[ti * hidden..(ti + 1) * hidden]) {
                *o += g * v;
            }
        }
    });
    Ok(y)
}
