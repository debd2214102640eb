//! Host tensors: row-major data in f32, f16 or bf16 with a shape. Weights keep the dtype they
//! were stored in; the CPU reference widens every element to f64 as it reads it.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

use crate::error::{Error, Result};

/// Element type of weights and inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE half float.
    F16,
    /// bfloat16: f32's exponent range with an 8-bit significand.
    BF16,
}

impl DType {
    /// Every dtype, widest first.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// `v` as a device stores it in this dtype: rounded to f32 first (every kernel computes in
    /// f32), then round-to-nearest-even to f16 or bf16; returned widened to f64.
    pub fn round(self, v: f64) -> f64 {
        let f = v as f32;
        match self {
            DType::F32 => f64::from(f),
            DType::F16 => f16::from_f32(f).to_f64(),
            DType::BF16 => bf16::from_f32(f).to_f64(),
        }
    }

    /// The name used on the command line and in messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            other => Err(Error::Usage(format!(
                "unknown dtype {other:?} (expected f32, f16 or bf16)"
            ))),
        }
    }
}

/// A Rust element type of one of the activation dtypes (`f32`, `half::f16`, `half::bf16`).
pub trait Element: Copy + Send + Sync + 'static {
    /// Its dtype.
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}

/// The elements of a [`Tensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
}

/// A row-major host tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl Tensor {
    /// A tensor from f32 data; `data.len()` must equal the product of `shape`.
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        Self::new(shape, TensorData::F32(data))
    }

    /// A tensor from any element data; `data`'s length must equal the product of `shape`.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self> {
        let want: usize = shape.iter().product();
        let have = match &data {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
        };
        if want != have {
            return Err(Error::config(format!(
                "tensor of shape {shape:?} needs {want} elements, got {have}"
            )));
        }
        Ok(Tensor { shape, data })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
        }
    }

    /// The raw elements.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// The raw elements, by value.
    pub fn into_data(self) -> TensorData {
        self.data
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` (flat, row-major) widened to f64.
    #[inline]
    pub fn get(&self, i: usize) -> f64 {
        match &self.data {
            TensorData::F32(v) => f64::from(v[i]),
            TensorData::F16(v) => v[i].to_f64(),
            TensorData::BF16(v) => v[i].to_f64(),
        }
    }

    /// Every element widened to f64.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }

    /// Every element as f32 (exact for all three dtypes).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// This tensor rounded (round-to-nearest-even) to `dtype`.
    pub fn cast(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let f = self.to_f32_vec();
        let data = match dtype {
            DType::F32 => TensorData::F32(f),
            DType::F16 => TensorData::F16(f.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => TensorData::BF16(f.iter().map(|&x| bf16::from_f32(x)).collect()),
        };
        Tensor {
            shape: self.shape.clone(),
            data,
        }
    }

    /// Row `r` of a 2-D view whose rows have `cols` elements, widened to f64.
    pub fn row_f64(&self, r: usize, cols: usize) -> Vec<f64> {
        (r * cols..(r + 1) * cols).map(|i| self.get(i)).collect()
    }
}
