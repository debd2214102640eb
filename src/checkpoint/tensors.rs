//! Byte-level rearrangements of checkpoint tensors into the canonical layout: stacking
//! per-expert matrices, splitting interleaved gate/up halves, transposing, and typing the
//! bytes as [`FileTensor`]s. Everything moves whole elements, so values are carried over
//! bit for bit.

use half::{bf16, f16};
use safetensors::tensor::Dtype;

use super::dir::Raw;
use crate::io::FileTensor;
use crate::tensor::{Tensor, TensorData};

impl Raw {
    /// Bytes per element (sub-byte dtypes are refused).
    pub fn elem_size(&self) -> Result<usize, String> {
        let bits = self.dtype.bitsize();
        if bits % 8 != 0 {
            return Err(format!(
                "dtype {:?} packs elements below a byte",
                self.dtype
            ));
        }
        Ok(bits / 8)
    }

    /// Typed as a weights-file tensor: F32 / F16 / BF16, U8 (F8_E8M0 as its U8 bytes) or
    /// F8_E4M3.
    pub fn into_file_tensor(self) -> Result<FileTensor, String> {
        let b = &self.bytes;
        let float = |data| Tensor::new(self.shape.clone(), data).map_err(|e| e.to_string());
        Ok(match self.dtype {
            Dtype::F32 => {
                FileTensor::Float(float(TensorData::F32(bytemuck::pod_collect_to_vec::<
                    u8,
                    f32,
                >(b)))?)
            }
            Dtype::F16 => {
                FileTensor::Float(float(TensorData::F16(bytemuck::pod_collect_to_vec::<
                    u8,
                    f16,
                >(b)))?)
            }
            Dtype::BF16 => {
                FileTensor::Float(float(TensorData::BF16(bytemuck::pod_collect_to_vec::<
                    u8,
                    bf16,
                >(b)))?)
            }
            Dtype::U8 | Dtype::F8_E8M0 => FileTensor::U8(self.shape, self.bytes),
            Dtype::F8_E4M3 => FileTensor::F8E4M3(self.shape, self.bytes),
            other => return Err(format!("unsupported dtype {other:?}")),
        })
    }

    /// The elements of an I32 tensor.
    pub fn to_i32(&self) -> Result<Vec<i32>, String> {
        if self.dtype != Dtype::I32 {
            return Err(format!("expected dtype I32, got {:?}", self.dtype));
        }
        Ok(bytemuck::pod_collect_to_vec::<u8, i32>(&self.bytes))
    }

    /// The elements of an integer tensor (I32 or I64) as i64.
    pub fn to_i64(&self) -> Result<Vec<i64>, String> {
        match self.dtype {
            Dtype::I32 => Ok(self.to_i32()?.into_iter().map(i64::from).collect()),
            Dtype::I64 => Ok(bytemuck::pod_collect_to_vec::<u8, i64>(&self.bytes)),
            other => Err(format!("expected an integer dtype, got {other:?}")),
        }
    }

    /// The tensor as a float [`Tensor`] (F32 / F16 / BF16).
    pub fn into_float(self) -> Result<Tensor, String> {
        let dtype = self.dtype;
        match self.into_file_tensor()? {
            FileTensor::Float(t) => Ok(t),
            _ => Err(format!("expected F32, F16 or BF16, got {dtype:?}")),
        }
    }
}

/// A float tensor's bytes as a [`Raw`] (for stacking scales made by a conversion).
pub fn raw_of(name: &str, file: &str, t: Tensor) -> Raw {
    let shape = t.shape().to_vec();
    let (dtype, bytes) = match t.into_data() {
        TensorData::F32(v) => (Dtype::F32, bytemuck::cast_slice(&v).to_vec()),
        TensorData::F16(v) => (Dtype::F16, bytemuck::cast_slice(&v).to_vec()),
        TensorData::BF16(v) => (Dtype::BF16, bytemuck::cast_slice(&v).to_vec()),
    };
    Raw {
        name: name.to_string(),
        file: file.to_string(),
        dtype,
        shape,
        bytes,
    }
}

/// Stacks same-dtype, same-shape tensors along a new leading axis, consuming them one by one
/// so that only the stacked copy stays.
pub fn stack(parts: Vec<Raw>) -> Result<Raw, String> {
    let first = parts.first().ok_or("no tensors to stack")?;
    let (dtype, shape, file, name) = (
        first.dtype,
        first.shape.clone(),
        first.file.clone(),
        first.name.clone(),
    );
    let total: usize = parts.iter().map(|p| p.bytes.len()).sum();
    let mut bytes = Vec::with_capacity(total);
    let n = parts.len();
    for p in parts {
        if p.dtype != dtype || p.shape != shape {
            return Err(format!(
                "tensor {:?} is {:?} {:?}, but {name:?} is {dtype:?} {shape:?} (every expert \
                 must be stored alike)",
                p.name, p.dtype, p.shape
            ));
        }
        bytes.extend_from_slice(&p.bytes);
    }
    let mut out_shape = vec![n];
    out_shape.extend(shape);
    Ok(Raw {
        name,
        file,
        dtype,
        shape: out_shape,
        bytes,
    })
}

/// Splits `axis` (of even length 2M) into its even and odd entries: two tensors with M there.
pub fn split_interleaved(raw: Raw, axis: usize) -> Result<(Raw, Raw), String> {
    let len = *raw
        .shape
        .get(axis)
        .ok_or_else(|| format!("tensor {:?} has no axis {axis}", raw.name))?;
    if len % 2 != 0 {
        return Err(format!(
            "tensor {:?} {:?}: axis {axis} has odd length {len}, not gate and up interleaved",
            raw.name, raw.shape
        ));
    }
    let es = raw.elem_size()?;
    let outer: usize = raw.shape[..axis].iter().product();
    let inner: usize = raw.shape[axis + 1..].iter().product::<usize>() * es;
    let mut even = Vec::with_capacity(raw.bytes.len() / 2);
    let mut odd = Vec::with_capacity(raw.bytes.len() / 2);
    for o in 0..outer {
        for m in 0..len {
            let at = (o * len + m) * inner;
            let dst = if m % 2 == 0 { &mut even } else { &mut odd };
            dst.extend_from_slice(&raw.bytes[at..at + inner]);
        }
    }
    let mut shape = raw.shape.clone();
    shape[axis] = len / 2;
    let half = |bytes| Raw {
        name: raw.name.clone(),
        file: raw.file.clone(),
        dtype: raw.dtype,
        shape: shape.clone(),
        bytes,
    };
    Ok((half(even), half(odd)))
}

/// `[.., A, B]` → `[.., B, A]`.
pub fn transpose_last2(raw: Raw) -> Result<Raw, String> {
    let r = raw.shape.len();
    if r < 2 {
        return Err(format!(
            "tensor {:?} {:?} is not a matrix",
            raw.name, raw.shape
        ));
    }
    let es = raw.elem_size()?;
    let (a, b) = (raw.shape[r - 2], raw.shape[r - 1]);
    let outer: usize = raw.shape[..r - 2].iter().product();
    let mut bytes = vec![0u8; raw.bytes.len()];
    for o in 0..outer {
        let base = o * a * b * es;
        for i in 0..a {
            for j in 0..b {
                let src = base + (i * b + j) * es;
                let dst = base + (j * a + i) * es;
                bytes[dst..dst + es].copy_from_slice(&raw.bytes[src..src + es]);
            }
        }
    }
    let mut shape = raw.shape.clone();
    shape.swap(r - 2, r - 1);
    Ok(Raw {
        shape,
        bytes,
        ..raw
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Raw {
        Raw {
            name: "t".into(),
            file: "f".into(),
            dtype,
            shape,
            bytes,
        }
    }

    #[test]
    fn split_interleaved_takes_even_and_odd_entries_of_any_axis() {
        // [2, 4] u8: rows interleaved along the last axis.
        let t = raw(Dtype::U8, vec![2, 4], vec![0, 1, 2, 3, 4, 5, 6, 7]);
        let (e, o) = split_interleaved(t.clone(), 1).unwrap();
        assert_eq!((e.bytes, o.bytes), (vec![0, 2, 4, 6], vec![1, 3, 5, 7]));
        // Along axis 0 whole rows move.
        let (e, o) = split_interleaved(t, 0).unwrap();
        assert_eq!((e.bytes, o.bytes), (vec![0, 1, 2, 3], vec![4, 5, 6, 7]));
        assert_eq!(e.shape, vec![1, 4]);
        // Two-byte elements stay whole.
        let t = raw(Dtype::BF16, vec![1, 2], vec![1, 2, 3, 4]);
        let (e, o) = split_interleaved(t, 1).unwrap();
        assert_eq!((e.bytes, o.bytes), (vec![1, 2], vec![3, 4]));
        let odd = raw(Dtype::U8, vec![3], vec![0, 1, 2]);
        assert!(split_interleaved(odd, 0)
            .unwrap_err()
            .contains("odd length"));
    }

    #[test]
    fn transpose_and_stack_move_whole_elements() {
        let t = raw(Dtype::F16, vec![2, 3], (0u8..12).collect());
        let tt = transpose_last2(t).unwrap();
        assert_eq!(tt.shape, vec![3, 2]);
        // element (i, j) = bytes [2(3i+j), +1]; after: (j, i).
        assert_eq!(tt.bytes, vec![0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]);
        let s = stack(vec![tt.clone(), tt.clone()]).unwrap();
        assert_eq!(s.shape, vec![2, 3, 2]);
        let mut other = tt.clone();
        other.dtype = Dtype::BF16;
        assert!(stack(vec![tt, other]).unwrap_err().contains("stored alike"));
    }
}
