//! CUDA tensors (feature `candle-cuda`): the forward runs this crate's kernels on the stream of
//! `x`'s candle device (`CudaDevice::cuda_stream()`), reading `x` in candle's own `CudaSlice`
//! and writing `y` into a new one allocated from candle's device. Nothing is copied, read
//! back or synchronised; the routing, when asked, is copied device to device.

use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, Shape, Storage, Tensor};
use cudarc::driver::{CudaSlice, DeviceRepr};
use half::{bf16, f16};

use super::block::{MoeBlock, Place, Routing};
use crate::backend::{Backend, BackendKind};
use crate::error::Error;
use crate::layer::PreparedLayer;
use crate::tensor::{DType, Element};

/// `y` (and the routing when asked) of the CUDA tensor `x` holding `tokens` rows.
pub(super) fn forward(
    block: &MoeBlock,
    x: &Tensor,
    dev: &CudaDevice,
    tokens: usize,
    dtype: DType,
    routing: bool,
) -> candle_core::Result<(Tensor, Option<Routing>)> {
    let stream = dev.cuda_stream();
    let place = Place::Cuda(stream.cu_stream() as usize);
    let prepared = block.prepared(
        place,
        || Backend::from_cuda_stream(stream.clone()),
        dtype,
        tokens,
    )?;
    // A contiguous x (the usual case) is used in place; candle copies a strided one on the
    // device first.
    let x = x.contiguous()?;
    let n = tokens * block.hidden_size();
    // One forward and its routing copies at a time per block: the routing is the workspace's.
    let _one = block.lock_run()?;
    let y = {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cuda(xs) = &*storage else {
            return Err(not_cuda());
        };
        let start = match layout.contiguous_offsets() {
            Some((start, _)) => start,
            None => return Err(not_cuda()),
        };
        match dtype {
            DType::F32 => run::<f32>(&prepared, xs, start, n, tokens, dev)?,
            DType::F16 => run::<f16>(&prepared, xs, start, n, tokens, dev)?,
            DType::BF16 => run::<bf16>(&prepared, xs, start, n, tokens, dev)?,
        }
    };
    let y = wrap(y, x.shape().clone());
    if !routing {
        return Ok((y, None));
    }
    let (ids, weights, kept, counts) = prepared.routing_cuda(tokens)?;
    let slots = block.slots();
    let r = Routing {
        topk_ids: wrap_slice(ids, dev, (tokens, slots).into()),
        topk_weights: wrap_slice(weights, dev, (tokens, slots).into()),
        kept: wrap_slice(kept, dev, (tokens, slots).into()),
        counts: wrap_slice(counts, dev, block.num_experts().into()),
    };
    Ok((y, Some(r)))
}

/// Enqueues the forward of `n` elements of `x` (from element `start` of `xs`) into a new
/// allocation of candle's device.
fn run<T: Element + CudaDType + DeviceRepr>(
    prepared: &PreparedLayer,
    xs: &CudaStorage,
    start: usize,
    n: usize,
    tokens: usize,
    dev: &CudaDevice,
) -> candle_core::Result<CudaStorage> {
    let x = xs.as_cuda_slice::<T>()?;
    let xv = x.slice(start..start + n);
    // SAFETY: the forward enqueued below writes every one of the n = T x H elements of `y`
    // (the combine stage writes each output row once; tests poison y to check it), and
    // nothing reads `y` before that: it is returned only after the launches are enqueued on
    // the same stream as every later use of it.
    let mut y = unsafe { dev.alloc::<T>(n) }?;
    prepared.forward_cuda(&xv, &mut y.slice_mut(0..n), tokens)?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

fn wrap(storage: CudaStorage, shape: Shape) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

fn wrap_slice<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: Shape) -> Tensor {
    wrap(CudaStorage::wrap_cuda_slice(s, dev.clone()), shape)
}

fn not_cuda() -> candle_core::Error {
    Error::BackendUnavailable {
        backend: BackendKind::Cuda,
        reason: "x on a candle CUDA device has no contiguous CUDA storage".into(),
    }
    .into()
}
