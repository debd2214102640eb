//! Moving values between candle tensors and the crate's host tensors: dtypes and host copies.
//! Only the CPU path and loading copy; the CUDA path never comes here.

use candle_core::{DType as CDType, Device, Shape, Tensor as CTensor, WithDType};
use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorData};

/// The crate's dtype of a candle activation or weight dtype (F32, F16 or BF16 only); `what`
/// names the tensor in the error.
pub(crate) fn act_dtype(d: CDType, what: &str) -> Result<DType> {
    match d {
        CDType::F32 => Ok(DType::F32),
        CDType::F16 => Ok(DType::F16),
        CDType::BF16 => Ok(DType::BF16),
        other => Err(Error::Dtype {
            context: what.to_string(),
            dtype: format!("{other:?}"),
        }),
    }
}

/// The elements of `t` (any layout, any device) in row-major order, as `T`.
pub(crate) fn elements<T: WithDType>(t: &CTensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// A host copy of `t` (F32, F16 or BF16; any layout) as the crate's tensor of `shape`, in
/// `t`'s own dtype. `what` names the tensor in errors.
pub(crate) fn to_host(t: &CTensor, shape: Vec<usize>, what: &str) -> candle_core::Result<Tensor> {
    let data = match act_dtype(t.dtype(), what)? {
        DType::F32 => TensorData::F32(elements::<f32>(t)?),
        DType::F16 => TensorData::F16(elements::<f16>(t)?),
        DType::BF16 => TensorData::BF16(elements::<bf16>(t)?),
    };
    Ok(Tensor::new(shape, data)?)
}

/// `values` (each exactly representable in `dtype`: what a forward in `dtype` returns) as a
/// candle tensor of `dtype` and `shape` on the CPU.
pub(crate) fn from_f32(
    values: Vec<f32>,
    dtype: DType,
    shape: &Shape,
) -> candle_core::Result<CTensor> {
    let cpu = Device::Cpu;
    match dtype {
        DType::F32 => CTensor::from_vec(values, shape, &cpu),
        DType::F16 => CTensor::from_vec(
            values.into_iter().map(f16::from_f32).collect::<Vec<_>>(),
            shape,
            &cpu,
        ),
        DType::BF16 => CTensor::from_vec(
            values.into_iter().map(bf16::from_f32).collect::<Vec<_>>(),
            shape,
            &cpu,
        ),
    }
}
