//! What one rank holds of a layer: the router and the shared expert whole, the routed experts
//! of its range only (dense tensors and quantized matrices sliced along the expert axis,
//! bytes as stored), and the rows of a tensor that are its tokens.

use std::ops::Range;

use crate::cpu::expert_gemm::ExpertWeights;
use crate::ep::stages::RankWeights;
use crate::error::{Error, Result};
use crate::layer::MoeLayer;
use crate::quant::{QuantMatrix, Scales, Weight};
use crate::tensor::{Tensor, TensorData};

/// Items `range` of the leading axis of `t` (rows of a matrix, experts of `[E, ..]`).
pub fn leading(t: &Tensor, range: Range<usize>) -> Result<Tensor> {
    let Some(&n) = t.shape().first() else {
        return Err(Error::config(
            "a tensor of rank 0 has no leading axis to slice",
        ));
    };
    if range.start > range.end || range.end > n {
        return Err(Error::config(format!(
            "rows {range:?} of a tensor of shape {:?}",
            t.shape()
        )));
    }
    let per: usize = t.shape()[1..].iter().product();
    let (a, b) = (range.start * per, range.end * per);
    let data = match t.data() {
        TensorData::F32(v) => TensorData::F32(v[a..b].to_vec()),
        TensorData::F16(v) => TensorData::F16(v[a..b].to_vec()),
        TensorData::BF16(v) => TensorData::BF16(v[a..b].to_vec()),
    };
    let mut shape = t.shape().to_vec();
    shape[0] = range.len();
    Tensor::new(shape, data)
}

/// Experts `range` of a quantized `[E, N, K]` matrix: codes, scales and zero points are
/// `[E, ..]` arrays, each expert's block contiguous.
fn quant_experts(q: &QuantMatrix, range: Range<usize>) -> Result<QuantMatrix> {
    let e = q.experts.max(1);
    let cut = |len: usize| (range.start * (len / e), range.end * (len / e));
    let (a, b) = cut(q.codes.len());
    let scales = match &q.scales {
        Scales::Float(t) => {
            let flat = Tensor::new(vec![e, t.len() / e], t.data().clone())?;
            let part = leading(&flat, range.clone())?;
            let shape = match t.shape() {
                [first, rest @ ..] if *first == q.experts => {
                    let mut sh = vec![range.len()];
                    sh.extend_from_slice(rest);
                    sh
                }
                _ => vec![part.len()],
            };
            Scales::Float(Tensor::new(shape, part.into_data())?)
        }
        Scales::E8m0(v) => {
            let (sa, sb) = cut(v.len());
            Scales::E8m0(v[sa..sb].to_vec())
        }
    };
    let zeros = q.zeros.as_ref().map(|z| {
        let (za, zb) = cut(z.len());
        z[za..zb].to_vec()
    });
    let out = QuantMatrix {
        format: q.format,
        experts: range.len(),
        rows: q.rows,
        cols: q.cols,
        codes: q.codes[a..b].to_vec(),
        scales,
        zeros,
    };
    out.validate().map_err(Error::config)?;
    Ok(out)
}

fn weight_experts(w: &Weight, range: Range<usize>) -> Result<Weight> {
    match w {
        Weight::Dense(t) => Ok(Weight::Dense(leading(t, range)?)),
        Weight::Quant(q) => Ok(Weight::Quant(quant_experts(q, range)?)),
    }
}

/// Experts `range` of `w` (every matrix and bias sliced along its expert axis); an error
/// unless `range` lies within its E experts.
pub fn experts(w: &ExpertWeights, range: Range<usize>) -> Result<ExpertWeights> {
    let e = w.up.shape().first().copied().unwrap_or(0);
    if range.start > range.end || range.end > e {
        return Err(Error::config(format!(
            "experts {range:?} of a layer with E = {e}"
        )));
    }
    let bias = |b: &Option<Tensor>| b.as_ref().map(|t| leading(t, range.clone())).transpose();
    Ok(ExpertWeights {
        gate: w
            .gate
            .as_ref()
            .map(|g| weight_experts(g, range.clone()))
            .transpose()?,
        up: weight_experts(&w.up, range.clone())?,
        down: weight_experts(&w.down, range.clone())?,
        gate_bias: bias(&w.gate_bias)?,
        up_bias: bias(&w.up_bias)?,
        down_bias: bias(&w.down_bias)?,
    })
}

/// What a rank holding experts `range` of `layer` keeps.
pub(crate) fn rank_weights(layer: &MoeLayer, range: Range<usize>) -> Result<RankWeights> {
    let d = layer.dims();
    if range.end > d.experts {
        return Err(Error::config(format!(
            "experts {range:?} of a layer with E = {}",
            d.experts
        )));
    }
    let local = if range.is_empty() {
        None
    } else {
        Some(experts(&layer.experts, range)?)
    };
    Ok(RankWeights {
        config: layer.config,
        experts: d.experts,
        hidden: d.hidden,
        router_weight: layer.router_weight.clone(),
        router_bias: layer.router_bias.clone(),
        correction_bias: layer.score_correction_bias.clone(),
        local,
        shared: layer.shared.as_ref().map(|s| s.weights.clone()),
        shared_gate: layer.shared.as_ref().and_then(|s| s.gate.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{encode, QuantFormat, QuantSpec};
    use crate::synth::Gen;

    #[test]
    fn slices_keep_each_expert_bit_for_bit() {
        let mut g = Gen::new(3);
        let t = g.tensor(&[5, 130, 64], 0.5);
        let s = leading(&t, 1..4).unwrap();
        assert_eq!(s.shape(), &[3, 130, 64]);
        assert_eq!(s.get(0), t.get(130 * 64));
        for spec in [
            QuantSpec::new(QuantFormat::Fp8Block),
            QuantSpec::new(QuantFormat::Mxfp4),
            QuantSpec {
                group: Some(32),
                ..QuantSpec::new(QuantFormat::Int4)
            },
        ] {
            let q = encode::quantize(&t, &spec).unwrap();
            let part = quant_experts(&q, 2..5).unwrap();
            for (e, n, k) in [(0, 0, 0), (1, 129, 63), (2, 64, 17)] {
                assert_eq!(
                    part.get(e, n, k).to_bits(),
                    q.get(e + 2, n, k).to_bits(),
                    "{:?}",
                    spec.format
                );
            }
        }
        assert!(leading(&t, 4..6).is_err());
        assert!(leading(
            &Tensor::new(vec![], TensorData::F32(vec![1.0])).unwrap(),
            0..0
        )
        .is_err());
    }
}
