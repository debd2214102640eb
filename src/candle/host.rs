//! CPU tensors: copied into the crate's host tensor, run on the block's host backend (the
//! CPU backend, or the one the caller chose), `y` and the routing copied back out.

use candle_core::{Device, Tensor};

use super::block::{MoeBlock, Place, Routing};
use super::convert::{from_f32, to_host};
use crate::tensor::DType;

/// `y` (and the routing when asked) of the CPU tensor `x` holding `tokens` rows.
pub(super) fn forward(
    block: &MoeBlock,
    x: &Tensor,
    tokens: usize,
    dtype: DType,
    routing: bool,
) -> candle_core::Result<(Tensor, Option<Routing>)> {
    let prepared = block.prepared(Place::Host, || block.host_backend(), dtype, tokens)?;
    let xt = to_host(
        x,
        vec![tokens, block.hidden_size()],
        "x of the candle MoeBlock",
    )?;
    let out = prepared.forward(&xt)?;
    let y = from_f32(out.y, dtype, x.shape())?;
    if !routing {
        return Ok((y, None));
    }
    let cpu = Device::Cpu;
    let slots = out.slots;
    let r = Routing {
        topk_ids: Tensor::from_vec(out.topk_ids, (tokens, slots), &cpu)?,
        topk_weights: Tensor::from_vec(out.topk_weights, (tokens, slots), &cpu)?,
        kept: Tensor::from_vec(out.kept, (tokens, slots), &cpu)?,
        counts: Tensor::from_vec(out.counts, block.num_experts(), &cpu)?,
    };
    Ok((y, Some(r)))
}
