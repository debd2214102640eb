//! Stage 0, CPU reference: `logits[t,e] = x[t] · Wr[e] (+ bias[e])`, accumulated in f64.

use rayon::prelude::*;

use crate::cpu::dot;
use crate::error::Result;
use crate::shape;
use crate::stage::Stage;
use crate::tensor::Tensor;

/// Router logits `[T, E]` for `x` `[T, H]`, `weight` `[E, H]` and an optional `bias` `[E]`.
/// Also computes the Qwen2 shared-expert gate logit when given `shared.gate.weight` `[1, H]`.
pub fn router_logits(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Vec<f64>> {
    let (t, h) = shape::matrix(Stage::Router, "x", x)?;
    let (e, wh) = shape::matrix(Stage::Router, "router weight", weight)?;
    shape::expect_eq(Stage::Router, "router weight width (H)", wh, h)?;
    if let Some(b) = bias {
        shape::expect_shape(Stage::Router, "router bias", b, &[e])?;
    }
    let mut logits = vec![0.0f64; t * e];
    if e == 0 {
        return Ok(logits);
    }
    logits.par_chunks_mut(e).enumerate().for_each(|(ti, row)| {
        let xr = x.row_f64(ti, h);
        for (ei, out) in row.iter_mut().enumerate() {
            let b = bias.map_or(0.0, |b| b.get(ei));
            *out = dot(weight, ei * h, &xr) + b;
        }
    });
    Ok(logits)
}
