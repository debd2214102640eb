//! CUDA path: hand-written PTX in `kernels/`, loaded through cudarc with the driver found at
//! run time (no CUDA toolkit needed). One module per stage launches that stage's kernels on
//! device buffers, stream-ordered, with no host synchronisation inside a forward.

pub mod act;
pub mod combine;
pub mod context;
pub mod device;
pub mod expert_decode;
pub mod expert_gemm;
pub mod expert_gemm_sm90;
pub mod gate;
pub mod gate_fused;
pub mod host;
pub mod next;
pub mod permute;
pub mod ptx;
pub mod quant;
pub mod router;
pub mod router_mma;

use cudarc::driver::{CudaContext, CudaSlice};

pub use context::CudaDevice;

use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// A weight matrix on the device: the tensor's raw little-endian elements (f32, f16 or bf16),
/// viewed as `[rows, cols]` with `cols` the last dimension.
#[derive(Debug)]
pub struct CudaWeights {
    /// The dtype of the elements, as stored in the tensor.
    pub dtype: DType,
    /// Rows: the product of every dimension but the last.
    pub rows: usize,
    /// Columns: the tensor's last dimension.
    pub cols: usize,
    /// `rows · cols` elements of `dtype`, row-major, as raw bytes.
    pub bytes: CudaSlice<u8>,
}

impl CudaWeights {
    /// Uploads `t` (any rank; leading dimensions flattened into rows).
    pub fn upload(dev: &CudaDevice, t: &Tensor) -> Result<Self> {
        let cols = *t.shape().last().unwrap_or(&1);
        let rows = t.len().checked_div(cols).unwrap_or(0);
        let raw = act::tensor_bytes(t);
        Ok(CudaWeights {
            dtype: t.dtype(),
            rows,
            cols,
            bytes: dev.upload(&raw)?,
        })
    }
}

/// Stage 1's outputs on the device, `[T, slots]` token-major (counts `[E]`).
#[derive(Debug)]
pub struct GateCuda {
    /// Expert of each assignment.
    pub topk_ids: CudaSlice<u32>,
    /// Weight applied per assignment, 0 where dropped.
    pub topk_weights: CudaSlice<f32>,
    /// 1 where kept.
    pub kept: CudaSlice<u32>,
    /// Kept assignments per expert, `[E]`.
    pub counts: CudaSlice<u32>,
}

impl GateCuda {
    /// Device buffers for `tokens × slots` assignments over `experts` experts.
    pub fn alloc(dev: &CudaDevice, tokens: usize, slots: usize, experts: usize) -> Result<Self> {
        Ok(GateCuda {
            topk_ids: dev.alloc(tokens * slots)?,
            topk_weights: dev.alloc(tokens * slots)?,
            kept: dev.alloc(tokens * slots)?,
            counts: dev.alloc(experts)?,
        })
    }
}

/// Stage 2's outputs on the device.
#[derive(Debug)]
pub struct PermuteCuda {
    /// `[E + 1]`.
    pub expert_offsets: CudaSlice<u32>,
    /// `[T·slots]`.
    pub sorted_assignment: CudaSlice<u32>,
    /// `[T·slots]`.
    pub row_of_assignment: CudaSlice<u32>,
    /// `[T·slots, H]` elements of `dtype`, as bytes.
    pub x_perm: CudaSlice<u8>,
    /// The activation dtype of `x_perm` (and of the `x` it is gathered from).
    pub dtype: DType,
}

impl PermuteCuda {
    /// Device buffers for `tokens × slots` assignments of width `hidden` in `dtype`.
    pub fn alloc(
        dev: &CudaDevice,
        tokens: usize,
        slots: usize,
        experts: usize,
        hidden: usize,
        dtype: DType,
    ) -> Result<Self> {
        let n = tokens * slots;
        Ok(PermuteCuda {
            expert_offsets: dev.alloc(experts + 1)?,
            sorted_assignment: dev.alloc(n)?,
            row_of_assignment: dev.alloc(n)?,
            x_perm: dev.alloc(n * hidden * dtype.size())?,
            dtype,
        })
    }
}

/// Whether prepared CUDA layers may run 16-bit activations: `MOE_CUDA_ACT16=1`. The f16 / bf16
/// activation kernels are assembled and their machine code checked (`scripts/sass-check.sh`)
/// but have not run on a GPU yet, so they are opt-in until a device check verifies them
/// (`scripts/device-check.sh` sets the variable). f32 activations need nothing.
pub fn act16_enabled() -> bool {
    std::env::var("MOE_CUDA_ACT16").is_ok_and(|v| v.trim() == "1")
}

/// Whether CUDA may run quantized expert weights (FP8 block, MXFP4, INT4): `MOE_CUDA_QUANT=1`.
/// Their kernels (the quantized variants of kernels/expert_gemm.ptx) are assembled and their
/// machine code checked (`scripts/sass-check.sh`) but have not run on a GPU yet, so uploading
/// a quantized layer to CUDA is a typed [`crate::Error::BackendUnavailable`] naming the
/// variable until a device check verifies them (`scripts/device-check.sh` sets it). Never a
/// silent fallback to another path.
pub fn quant_enabled() -> bool {
    std::env::var("MOE_CUDA_QUANT").is_ok_and(|v| v.trim() == "1")
}

/// Which set of CUDA kernels a device handle launches: the kernels a GPU run has verified
/// (the default), or the next ones, which are assembled and checked offline (ptxas, SASS, a
/// PTX interpreter) but have not run on a GPU yet.
///
/// Read in one place, [`KernelSet::from_env`], when a [`CudaDevice`] is opened (and kept in
/// [`CudaDevice::kernels`]); [`CudaDevice::with_kernels`] overrides it per handle (tests).
/// `MOE_CUDA_KERNELS` unset, empty or `verified` selects [`KernelSet::Verified`]; `next`
/// selects [`KernelSet::Next`]; any other value is a [`crate::Error::Config`] naming the
/// variable, so a typo never silently runs the other set.
///
/// What `next` changes (each falls back to the verified kernel where it does not apply):
/// - expert GEMM, batches of at most 32 routed rows per expert on average (`rows <= 32 E`)
///   with dense weights, `K % 8 == 0` and a 16-byte aligned activation base: the
///   weight-streaming decode kernel (kernels/expert_decode.ptx), bitwise equal to the tiled
///   kernel ([`expert_decode`]);
/// - gate: every routing variant in one launch (kernels/gate_fused.ptx, [`gate_fused`]);
/// - router: f16 / bf16 weights with activations of the same dtype on tensor cores
///   (kernels/router_mma.ptx, [`router_mma`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelSet {
    /// The kernels verified on a GPU (`scripts/device-check.sh`): the default.
    #[default]
    Verified,
    /// The kernels of issue 15 that await their first GPU run: `MOE_CUDA_KERNELS=next`.
    Next,
}

impl KernelSet {
    /// The environment variable that selects the set.
    pub const ENV: &'static str = "MOE_CUDA_KERNELS";

    /// The set a value of [`KernelSet::ENV`] names (`None`: the variable is unset).
    pub fn parse(value: Option<&str>) -> crate::error::Result<Self> {
        match value.map(str::trim) {
            None | Some("") | Some("verified") => Ok(KernelSet::Verified),
            Some("next") => Ok(KernelSet::Next),
            Some(other) => Err(crate::error::Error::Config(format!(
                "{}={other:?}: expected `verified` (the default) or `next`",
                Self::ENV
            ))),
        }
    }

    /// The set the environment selects (see [`KernelSet`]); the one place the variable is
    /// read.
    pub fn from_env() -> crate::error::Result<Self> {
        match std::env::var(Self::ENV) {
            Ok(v) => Self::parse(Some(&v)),
            Err(std::env::VarError::NotPresent) => Self::parse(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(crate::error::Error::Config(format!(
                "{} is not valid Unicode",
                Self::ENV
            ))),
        }
    }

    /// The value of [`KernelSet::ENV`] that selects this set.
    pub fn name(self) -> &'static str {
        match self {
            KernelSet::Verified => "verified",
            KernelSet::Next => "next",
        }
    }
}

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// The device's index, as `CudaDevice::new` takes it.
    pub ordinal: usize,
    /// The device name the driver reports.
    pub name: String,
    /// Compute capability `(major, minor)`; the kernels need 8.0 or newer.
    pub compute_capability: (i32, i32),
    /// Total device memory in bytes.
    pub total_mem_bytes: usize,
}

/// Whether the CUDA driver library is there. cudarc loads it at run time and panics at the
/// first driver call when it is missing, so this looks for it first (cudarc's own check).
/// With the `candle-cuda` feature, candle-core makes cudarc link the CUDA libraries instead
/// (`dynamic-linking`): a binary that started has the driver library, so this is `true`.
pub fn driver_present() -> bool {
    #[cfg(not(feature = "candle-cuda"))]
    {
        // SAFETY: `is_culib_present` only tries to dlopen the driver library and reports
        // success; it dereferences nothing of ours.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }
    #[cfg(feature = "candle-cuda")]
    {
        true
    }
}

/// Lists CUDA devices, or says why there are none (no driver library, no device, init error).
/// Never panics: cudarc panics when libcuda is absent, so its presence is checked first.
pub fn probe() -> Result<Vec<DeviceInfo>, String> {
    if !driver_present() {
        return Err("no CUDA driver library (libcuda) found".into());
    }
    let count = CudaContext::device_count().map_err(|e| format!("CUDA driver error: {e:?}"))?;
    if count <= 0 {
        return Err("the CUDA driver reports no devices".into());
    }
    (0..count as usize)
        .map(|ordinal| {
            let ctx = CudaContext::new(ordinal).map_err(|e| format!("device {ordinal}: {e:?}"))?;
            Ok(DeviceInfo {
                ordinal,
                name: ctx.name().map_err(|e| format!("{e:?}"))?,
                compute_capability: ctx.compute_capability().map_err(|e| format!("{e:?}"))?,
                total_mem_bytes: ctx.total_mem().map_err(|e| format!("{e:?}"))?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_set_parses_its_variable() {
        assert_eq!(KernelSet::parse(None).unwrap(), KernelSet::Verified);
        assert_eq!(KernelSet::parse(Some("")).unwrap(), KernelSet::Verified);
        assert_eq!(
            KernelSet::parse(Some("verified")).unwrap(),
            KernelSet::Verified
        );
        assert_eq!(KernelSet::parse(Some(" next ")).unwrap(), KernelSet::Next);
        let e = KernelSet::parse(Some("nxt")).unwrap_err();
        assert!(matches!(e, crate::Error::Config(_)), "{e}");
        assert!(e.to_string().contains("MOE_CUDA_KERNELS"), "{e}");
        assert_eq!(KernelSet::default(), KernelSet::Verified);
        for k in [KernelSet::Verified, KernelSet::Next] {
            assert_eq!(KernelSet::parse(Some(k.name())).unwrap(), k);
        }
    }

    /// Every module of the `next` set assembles with ptxas for sm_80 and sm_90 without
    /// spills or stack (`-v --warn-on-spills -Werror`), when ptxas is found: `$PTXAS`, or the
    /// copy scripts/sass-check.sh and CI cache under `~/.cache/moe-kernels/`. Skipped (and
    /// said so) without it; CI assembles every module of `moe ptx --dump` in any case.
    #[test]
    fn next_modules_assemble_with_ptxas() {
        let cached = std::env::var_os("XDG_CACHE_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
            .map(|c| c.join("moe-kernels/nvcc-12.9.86/nvidia/cuda_nvcc/bin/ptxas"));
        let Some(ptxas) = std::env::var_os("PTXAS")
            .map(std::path::PathBuf::from)
            .or(cached)
            .filter(|p| p.is_file())
        else {
            println!("cuda: no ptxas ($PTXAS or the sass-check cache), next-set check skipped");
            return;
        };
        let dir = std::env::temp_dir().join(format!("moe-next-ptx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut modules = expert_decode::modules().unwrap();
        modules.extend(gate_fused::modules().unwrap());
        modules.extend(router_mma::modules().unwrap());
        assert_eq!(modules.len(), 13);
        for m in &modules {
            let path = dir.join(format!("{}.ptx", m.variant));
            std::fs::write(&path, &m.source).unwrap();
            for arch in ["sm_80", "sm_90"] {
                let out = std::process::Command::new(&ptxas)
                    .args(["-v", "--warn-on-spills", "-Werror"])
                    .arg(format!("-arch={arch}"))
                    .arg(&path)
                    .args(["-o", "/dev/null"])
                    .output()
                    .unwrap();
                let log = String::from_utf8_lossy(&out.stderr);
                assert!(out.status.success(), "{} {arch}: {log}", m.variant);
                assert!(
                    log.contains("0 bytes stack frame"),
                    "{} {arch}: {log}",
                    m.variant
                );
                assert!(
                    log.contains("0 bytes spill stores"),
                    "{} {arch}: {log}",
                    m.variant
                );
            }
        }
        std::fs::remove_dir_all(&dir).ok();
        println!(
            "cuda: {} next-set module builds passed ptxas",
            2 * modules.len()
        );
    }
}
