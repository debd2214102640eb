//! Activation buffers on CUDA: `x`, `x_perm`, `h`, `y_perm`, the shared expert's output and `y`
//! in the prepared layer's activation dtype (f32, f16 or bf16), passed to the stage launchers
//! as raw device bytes plus their dtype, so that the crate's own buffers, a runtime's
//! `CudaView`s and raw device pointers all reach the kernels the same way.
//!
//! Layout: dense row-major `[rows, cols]`, `cols · size` bytes per row (no padding: a CUDA
//! thread can store 2 bytes).

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr};

use crate::error::{Error, Result};
use crate::stage::Stage;
use crate::tensor::DType;

/// A read-only activation matrix: `bytes` holds at least `elems · dtype.size()` bytes.
#[derive(Debug)]
pub struct ActView<'a> {
    /// The matrix's elements as device bytes.
    pub bytes: CudaView<'a, u8>,
    /// The element dtype.
    pub dtype: DType,
}

/// A writable activation matrix: `bytes` holds at least `elems · dtype.size()` bytes.
#[derive(Debug)]
pub struct ActViewMut<'a> {
    /// The matrix's elements as device bytes.
    pub bytes: CudaViewMut<'a, u8>,
    /// The element dtype.
    pub dtype: DType,
}

impl<'a> ActView<'a> {
    /// An f32 matrix held in a typed buffer, viewed as its bytes.
    pub fn of_f32(s: &'a CudaSlice<f32>) -> Result<Self> {
        // SAFETY: every f32 bit pattern is a valid sequence of u8, and the byte view covers
        // exactly the slice's 4 · len bytes (transmute checks that it fits).
        let bytes = unsafe { s.transmute::<u8>(s.len() * 4) }
            .ok_or_else(|| crate::cuda::context::cuda_err("an f32 buffer's byte view"))?;
        Ok(ActView {
            bytes,
            dtype: DType::F32,
        })
    }

    /// Elements of `dtype` the view holds.
    pub fn elems(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    /// Dtype, length and device address, for the launchers' checks.
    pub(crate) fn meta(&self, stream: &CudaStream) -> ActMeta {
        ActMeta {
            dtype: self.dtype,
            bytes: self.bytes.len(),
            addr: self.bytes.device_ptr(stream).0,
        }
    }
}

impl<'a> ActViewMut<'a> {
    /// A writable f32 matrix held in a typed buffer, viewed as its bytes.
    pub fn of_f32(s: &'a mut CudaSlice<f32>) -> Result<Self> {
        let n = s.len() * 4;
        // SAFETY: every u8 sequence written through the view is read back as f32 bits, valid
        // for any pattern; the byte view covers exactly the slice's 4 · len bytes.
        let bytes = unsafe { s.transmute_mut::<u8>(n) }
            .ok_or_else(|| crate::cuda::context::cuda_err("an f32 buffer's byte view"))?;
        Ok(ActViewMut {
            bytes,
            dtype: DType::F32,
        })
    }

    /// Elements of `dtype` the view holds.
    pub fn elems(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    /// Dtype, length and device address, for the launchers' checks.
    pub(crate) fn meta(&self, stream: &CudaStream) -> ActMeta {
        ActMeta {
            dtype: self.dtype,
            bytes: self.bytes.len(),
            addr: self.bytes.device_ptr(stream).0,
        }
    }
}

/// What a launcher checks of an activation operand before it launches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActMeta {
    pub dtype: DType,
    /// Bytes the view holds.
    pub bytes: usize,
    /// Device address of its first byte.
    pub addr: u64,
}

impl ActMeta {
    /// An error unless the operand `what` of `stage` is `want`, holds at least `elems`
    /// elements and starts at a multiple of its element size. Views may be larger than
    /// needed (a workspace sized for the largest batch).
    pub(crate) fn check(&self, stage: Stage, what: &str, want: DType, elems: usize) -> Result<()> {
        if self.dtype != want {
            return Err(Error::DtypeMismatch {
                what: format!("{stage}: {what}"),
                expected: want,
                got: self.dtype,
            });
        }
        let need = elems
            .checked_mul(want.size())
            .ok_or_else(|| Error::shape(stage, format!("{what}: size overflows")))?;
        if self.bytes < need {
            return Err(Error::shape(
                stage,
                format!(
                    "{what} holds {} bytes, needs {need} ({elems} {want} elements)",
                    self.bytes
                ),
            ));
        }
        if self.addr % want.size() as u64 != 0 {
            return Err(Error::shape(
                stage,
                format!(
                    "{what} starts at device address {:#x}, not a multiple of its {}-byte elements",
                    self.addr,
                    want.size()
                ),
            ));
        }
        Ok(())
    }

    /// Whether the operand starts at a multiple of `align` bytes (vector accesses).
    pub(crate) fn aligned(&self, align: u64) -> bool {
        self.addr % align == 0
    }
}

/// A tensor's elements as little-endian bytes in its own dtype (what an activation buffer of
/// that dtype holds).
pub fn tensor_bytes(t: &crate::tensor::Tensor) -> Vec<u8> {
    use crate::tensor::TensorData;
    match t.data() {
        TensorData::F32(v) => bytemuck::cast_slice(v).to_vec(),
        TensorData::F16(v) => bytemuck::cast_slice(v).to_vec(),
        TensorData::BF16(v) => bytemuck::cast_slice(v).to_vec(),
    }
}

/// Little-endian elements of `dtype`, widened to f64 (exact); a trailing partial element is
/// ignored.
pub fn bytes_to_f64(bytes: &[u8], dtype: DType) -> Vec<f64> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
    }
}

/// Device address of a typed buffer's first element (for alignment checks).
pub(crate) fn slice_addr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operand_checks_are_typed_errors() {
        let st = Stage::Combine;
        let m = ActMeta {
            dtype: DType::BF16,
            bytes: 64,
            addr: 0x1000,
        };
        // Larger than needed is fine; exactly needed too.
        assert!(m.check(st, "y", DType::BF16, 10).is_ok());
        assert!(m.check(st, "y", DType::BF16, 32).is_ok());
        assert!(matches!(
            m.check(st, "y", DType::BF16, 33),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            m.check(st, "y", DType::F16, 1),
            Err(Error::DtypeMismatch {
                expected: DType::F16,
                got: DType::BF16,
                ..
            })
        ));
        assert!(matches!(
            m.check(st, "y", DType::BF16, usize::MAX),
            Err(Error::Shape { .. })
        ));
        let odd = ActMeta { addr: 0x1001, ..m };
        assert!(odd.check(st, "y", DType::BF16, 1).is_err());
        let two = ActMeta { addr: 0x1002, ..m };
        assert!(two.check(st, "y", DType::BF16, 1).is_ok());
        assert!(!two.aligned(16) && m.aligned(16));
        let f = ActMeta {
            dtype: DType::F32,
            addr: 0x1002,
            ..m
        };
        assert!(f.check(st, "y", DType::F32, 1).is_err());
    }

    #[test]
    fn bytes_round_trip_every_dtype() {
        let t = crate::tensor::Tensor::from_f32(vec![4], vec![1.0, -2.5, 0.375, 65504.0]).unwrap();
        for d in DType::ALL {
            let c = t.cast(d);
            let back = bytes_to_f64(&tensor_bytes(&c), d);
            let want: Vec<f64> = c.to_f32_vec().into_iter().map(f64::from).collect();
            assert_eq!(back, want, "{d}");
        }
    }
}
