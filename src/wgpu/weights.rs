//! Weight matrices on the GPU: packed u32 words (one f32, or two f16 / bf16 per word, element
//! 2i in the low half), split into row chunks so that no binding exceeds the adapter's storage
//! binding or buffer size (128 MiB on some adapters). A chunk always starts on a whole word.

use crate::device::BackendKind;
use crate::error::Error;
use crate::error::Result;
use crate::limits::Resource;
use crate::tensor::{DType, Tensor, TensorData};
use crate::wgpu::context::{GpuBuffer, WgpuDevice};

/// A contiguous range of rows of a weight matrix.
#[derive(Debug)]
pub struct WeightChunk {
    /// First row (of the flattened `[rows, cols]` view) held by this chunk.
    pub first_row: usize,
    /// Rows held by this chunk.
    pub rows: usize,
    /// The chunk's elements, packed into u32 words (see the module docs).
    pub words: GpuBuffer<u32>,
}

/// A `[rows, cols]` weight matrix (any leading dims flattened into rows) on the GPU.
#[derive(Debug)]
pub struct GpuWeights {
    /// The dtype of the elements, as stored in the tensor.
    pub dtype: DType,
    /// Rows: the product of every dimension but the last.
    pub rows: usize,
    /// Columns: the tensor's last dimension.
    pub cols: usize,
    /// Row chunks in order, each within the binding limit.
    pub chunks: Vec<WeightChunk>,
}

impl GpuWeights {
    /// The `W_DTYPE` override value of common.wgsl for this dtype.
    pub fn dtype_code(&self) -> f64 {
        dtype_code(self.dtype)
    }

    /// Uploads `t` viewed as `[rows, cols]` with `cols` its last dimension, chunked so that
    /// each chunk fits `max_bytes` (or the device's binding limit when `None`).
    pub fn upload(
        dev: &WgpuDevice,
        t: &Tensor,
        max_bytes: Option<u64>,
        label: &str,
    ) -> Result<Self> {
        let cols = *t.shape().last().unwrap_or(&1);
        let rows = t.len().checked_div(cols).unwrap_or(0);
        let elem = t.dtype().size() as u64;
        let limit = max_bytes
            .unwrap_or_else(|| dev.max_binding_bytes())
            .min(dev.max_binding_bytes());
        let row_bytes = (cols as u64 * elem).max(1);
        // 16-bit rows of odd length would split a word between chunks: keep chunks even.
        let align = if elem == 2 && cols % 2 == 1 { 2 } else { 1 };
        let mut per_chunk = ((limit.saturating_sub(4)) / row_bytes) as usize / align * align;
        if per_chunk == 0 {
            return Err(Error::Limit {
                backend: BackendKind::Wgpu,
                resource: Resource::BindingSize,
                what: format!("{label}: one row of {cols} {} elements", t.dtype()),
                need: row_bytes + 4,
                limit,
            });
        }
        per_chunk = per_chunk.min(rows.max(1));
        let mut chunks = Vec::new();
        let mut first = 0;
        while first < rows || (rows == 0 && chunks.is_empty()) {
            let n = per_chunk.min(rows - first);
            let words = pack_words(t, first * cols, (first + n) * cols);
            chunks.push(WeightChunk {
                first_row: first,
                rows: n,
                words: dev.upload(&words, label)?,
            });
            first += n;
            if rows == 0 {
                break;
            }
        }
        Ok(GpuWeights {
            dtype: t.dtype(),
            rows,
            cols,
            chunks,
        })
    }
}

/// The `W_DTYPE` override value of common.wgsl.
pub fn dtype_code(d: DType) -> f64 {
    match d {
        DType::F32 => 0.0,
        DType::F16 => 1.0,
        DType::BF16 => 2.0,
    }
}

/// Elements `lo..hi` of `t` packed into u32 words (`lo` is even for 16-bit dtypes).
pub fn pack_words(t: &Tensor, lo: usize, hi: usize) -> Vec<u32> {
    match t.data() {
        TensorData::F32(v) => v[lo..hi].iter().map(|x| x.to_bits()).collect(),
        TensorData::F16(v) => pack16(&v[lo..hi].iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
        TensorData::BF16(v) => pack16(&v[lo..hi].iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
    }
}

fn pack16(h: &[u16]) -> Vec<u32> {
    h.chunks(2)
        .map(|p| u32::from(p[0]) | (u32::from(*p.get(1).unwrap_or(&0)) << 16))
        .collect()
}
