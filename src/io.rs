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

/// Every tensor of a safetensors file, by name. Accepts F32, F16 and BF16 only.
pub fn load_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = read(path)?;
    parse_tensors(&bytes, &path.display().to_string())
}

/// Parses safetensors bytes; `origin` names the source in errors.
pub fn parse_tensors(bytes: &[u8], origin: &str) -> Result<BTreeMap<String, Tensor>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        path: origin.to_string(),
        msg: format!("{e}"),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let raw = view.data();
        let data = match view.dtype() {
            StDtype::F32 => TensorData::F32(bytemuck::pod_collect_to_vec::<u8, f32>(raw)),
            StDtype::F16 => TensorData::F16(bytemuck::pod_collect_to_vec::<u8, f16>(raw)),
            StDtype::BF16 => TensorData::BF16(bytemuck::pod_collect_to_vec::<u8, bf16>(raw)),
            other => {
                return Err(Error::Dtype {
                    context: format!("{origin}: tensor {name:?}"),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let t = Tensor::new(shape, data).map_err(|e| Error::Safetensors {
            path: origin.to_string(),
            msg: format!("tensor {name:?}: {e}"),
        })?;
        out.insert(name, t);
    }
    Ok(out)
}

/// The input tensor `x` `[T, H]` of an input file (the file must hold `x` and nothing else).
pub fn load_input(path: &Path) -> Result<Tensor> {
    let origin = path.display().to_string();
    let mut tensors = load_tensors(path)?;
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
}

/// Writes named tensors to a safetensors file.
pub fn save(path: &Path, tensors: &[(&str, OutTensor)]) -> Result<()> {
    let bytes: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| match t {
            OutTensor::F32(s, v) => (
                name.to_string(),
                StDtype::F32,
                s.clone(),
                bytemuck::cast_slice(v).to_vec(),
            ),
            OutTensor::I32(s, v) => (
                name.to_string(),
                StDtype::I32,
                s.clone(),
                bytemuck::cast_slice(v).to_vec(),
            ),
            OutTensor::Tensor(t) => {
                let (d, b): (StDtype, Vec<u8>) = match t.data() {
                    TensorData::F32(v) => (StDtype::F32, bytemuck::cast_slice(v).to_vec()),
                    TensorData::F16(v) => (StDtype::F16, bytemuck::cast_slice(v).to_vec()),
                    TensorData::BF16(v) => (StDtype::BF16, bytemuck::cast_slice(v).to_vec()),
                };
                (name.to_string(), d, t.shape().to_vec(), b)
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
