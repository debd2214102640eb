//! Reading and writing safetensors files: layer weights, the input `x`, the outputs of
//! `moe run`. Every failure is a typed error naming the file; nothing panics on a bad file.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorData};

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A tensor of a weights file: floating point, or the raw bytes of a quantized format's
/// codes and scales (DESIGN.md section 4).
#[derive(Debug, Clone, PartialEq)]
pub enum FileTensor {
    /// An F32, F16 or BF16 tensor.
    Float(Tensor),
    /// A U8 tensor (MXFP4 / INT4 codes, e8m0 scales, INT4 zero points): shape and bytes.
    U8(Vec<usize>, Vec<u8>),
    /// An F8_E4M3 tensor (FP8 codes): shape and bytes.
    F8E4M3(Vec<usize>, Vec<u8>),
}

impl FileTensor {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            FileTensor::Float(t) => t.shape(),
            FileTensor::U8(s, _) | FileTensor::F8E4M3(s, _) => s,
        }
    }

    /// The dtype as a safetensors header names it.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            FileTensor::Float(t) => match t.dtype() {
                crate::tensor::DType::F32 => "F32",
                crate::tensor::DType::F16 => "F16",
                crate::tensor::DType::BF16 => "BF16",
            },
            FileTensor::U8(..) => "U8",
            FileTensor::F8E4M3(..) => "F8_E4M3",
        }
    }

    /// Bytes as stored.
    pub fn byte_len(&self) -> u64 {
        match self {
            FileTensor::Float(t) => crate::limits::product(&[t.len(), t.dtype().size()]),
            FileTensor::U8(_, b) | FileTensor::F8E4M3(_, b) => b.len() as u64,
        }
    }
}

/// Every tensor of a safetensors file, by name. Accepts F32, F16 and BF16 only.
pub fn load_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = read(path)?;
    parse_tensors(&bytes, &path.display().to_string())
}

/// Parses safetensors bytes; `origin` names the source in errors. Accepts F32, F16 and BF16.
pub fn parse_tensors(bytes: &[u8], origin: &str) -> Result<BTreeMap<String, Tensor>> {
    parse_file_tensors(bytes, origin)?
        .into_iter()
        .map(|(name, t)| match t {
            FileTensor::Float(t) => Ok((name, t)),
            other => Err(Error::Dtype {
                context: format!("{origin}: tensor {name:?}"),
                dtype: other.dtype_name().to_string(),
            }),
        })
        .collect()
}

/// Every tensor of a weights file, by name: F32, F16, BF16, and the U8 / F8_E4M3 tensors of
/// quantized weights.
pub fn load_file_tensors(path: &Path) -> Result<BTreeMap<String, FileTensor>> {
    let bytes = read(path)?;
    parse_file_tensors(&bytes, &path.display().to_string())
}

/// Parses safetensors bytes into [`FileTensor`]s; `origin` names the source in errors.
pub fn parse_file_tensors(bytes: &[u8], origin: &str) -> Result<BTreeMap<String, FileTensor>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        path: origin.to_string(),
        msg: format!("{e}"),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let raw = view.data();
        let float = |data| {
            Tensor::new(shape.clone(), data)
                .map(FileTensor::Float)
                .map_err(|e| Error::Safetensors {
                    path: origin.to_string(),
                    msg: format!("tensor {name:?}: {e}"),
                })
        };
        let t = match view.dtype() {
            StDtype::F32 => float(TensorData::F32(bytemuck::pod_collect_to_vec::<u8, f32>(
                raw,
            )))?,
            StDtype::F16 => float(TensorData::F16(bytemuck::pod_collect_to_vec::<u8, f16>(
                raw,
            )))?,
            StDtype::BF16 => float(TensorData::BF16(bytemuck::pod_collect_to_vec::<u8, bf16>(
                raw,
            )))?,
            // F8_E8M0 is the same bytes as a U8 e8m0 scale (newer MXFP4 exports name it so).
            StDtype::U8 | StDtype::F8_E8M0 => FileTensor::U8(shape, raw.to_vec()),
            StDtype::F8_E4M3 => FileTensor::F8E4M3(shape, raw.to_vec()),
            other => {
                return Err(Error::Dtype {
                    context: format!("{origin}: tensor {name:?}"),
                    dtype: format!("{other:?}"),
                })
            }
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// The input tensor `x` `[T, H]` of an input file (the file must hold `x` and nothing else).
pub fn load_input(path: &Path) -> Result<Tensor> {
    let bytes = read(path)?;
    parse_input(&bytes, &path.display().to_string())
}

/// [`load_input`] on the bytes of an input file; `origin` names it in errors.
pub fn parse_input(bytes: &[u8], origin: &str) -> Result<Tensor> {
    let origin = origin.to_string();
    let mut tensors = parse_tensors(bytes, &origin)?;
    let x = tensors.remove("x").ok_or_else(|| Error::Input {
        path: origin.clone(),
        what: "no tensor named \"x\"".into(),
    })?;
    if let Some(extra) = tensors.keys().next() {
        return Err(Error::Input {
            path: origin,
            what: format!("unexpected tensor {extra:?} (the input file holds only \"x\")"),
        });
    }
    if x.shape().len() != 2 {
        return Err(Error::Input {
            path: origin,
            what: format!("x must be [T, H], got shape {:?}", x.shape()),
        });
    }
    Ok(x)
}

/// One output tensor for [`save`].
pub enum OutTensor {
    /// An f32 tensor: shape and row-major values.
    F32(Vec<usize>, Vec<f32>),
    /// An i32 tensor (expert ids, kept flags): shape and row-major values.
    I32(Vec<usize>, Vec<i32>),
    /// A tensor in its own dtype (f32, f16 or bf16).
    Tensor(Tensor),
    /// A weights-file tensor of any dtype (quantized codes and scales included).
    File(FileTensor),
}

/// Writes named tensors to a safetensors file.
pub fn save(path: &Path, tensors: &[(&str, OutTensor)]) -> Result<()> {
    // Borrowed bytes: a layer being written is not copied a second time.
    let bytes: Vec<(String, StDtype, Vec<usize>, &[u8])> = tensors
        .iter()
        .map(|(name, t)| match t {
            OutTensor::F32(s, v) => (
                name.to_string(),
                StDtype::F32,
                s.clone(),
                bytemuck::cast_slice(v),
            ),
            OutTensor::I32(s, v) => (
                name.to_string(),
                StDtype::I32,
                s.clone(),
                bytemuck::cast_slice(v),
            ),
            OutTensor::Tensor(t) | OutTensor::File(FileTensor::Float(t)) => {
                let (d, b): (StDtype, &[u8]) = match t.data() {
                    TensorData::F32(v) => (StDtype::F32, bytemuck::cast_slice(v)),
                    TensorData::F16(v) => (StDtype::F16, bytemuck::cast_slice(v)),
                    TensorData::BF16(v) => (StDtype::BF16, bytemuck::cast_slice(v)),
                };
                (name.to_string(), d, t.shape().to_vec(), b)
            }
            OutTensor::File(FileTensor::U8(s, b)) => {
                (name.to_string(), StDtype::U8, s.clone(), b.as_slice())
            }
            OutTensor::File(FileTensor::F8E4M3(s, b)) => {
                (name.to_string(), StDtype::F8_E4M3, s.clone(), b.as_slice())
            }
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Safetensors {
                    path: path.display().to_string(),
                    msg: format!("tensor {n:?}: {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| Error::Safetensors {
        path: path.display().to_string(),
        msg: format!("write failed: {e}"),
    })
}
