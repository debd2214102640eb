//! Stage 3 on CUDA (kernels/expert_gemm.ptx): the grouped expert FFN as two launches of one
//! kernel, `expert_gemm_<wt>`: GEMM 1 (`x_rows · W{g,u}ᵀ + b`, activation in the epilogue)
//! writes `h` `[rows, F]` f32 to a scratch buffer, GEMM 2 (`h · Wdᵀ + bd`) writes `y`.
//!
//! Variants, all rendered from the one template: `expert_gemm.f32` (f32 weights, FFMA) and
//! `expert_gemm.bf16` / `expert_gemm.f16` (tensor cores, `mma.sync.m16n8k16` with f32
//! accumulation; the f32 activations are rounded to the weight type as they are staged in
//! shared memory). The template keeps the lines of its `//@begin ffma` / `//@begin mma`
//! sections (closed by `//@end`) for the variant that uses them, then fills the `${NAME}`
//! placeholders. Expert offsets stay on the device: the grid comes from the static bound
//! `floor(rows / 128) + E` row tiles and surplus blocks exit.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::backend::BackendKind;
use crate::config::Activation;
use crate::cpu::expert_gemm::{ExpertDims, ExpertWeights};
use crate::cuda::context::drv;
use crate::cuda::context::to_u32;
use crate::cuda::ptx::{self, PtxModule};
use crate::cuda::{CudaDevice, CudaWeights};
use crate::error::{Error, Result};
use crate::limits::{self, Resource};
use crate::stage::Stage;
use crate::tensor::{DType, Tensor};

/// Rows per tile (both variants).
const BM: usize = 128;
/// Threads per block (both variants).
const THREADS: u32 = 256;
/// cp.async pipeline depth of the tensor-core variants.
const STAGES: usize = 3;
/// Bytes of one pipeline stage: A and B tiles of 128 rows × 32 16-bit elements.
const STAGE_BYTES: usize = 2 * 128 * 32 * 2;
/// Bytes of the epilogue tile C[64][136] f32 (aliases the pipeline buffers).
const EPILOGUE_BYTES: usize = 64 * 136 * 4;
/// Dynamic shared memory a block may use without raising the function attribute.
const DEFAULT_SMEM_LIMIT: usize = 48 * 1024;

/// Dynamic shared memory of the tensor-core variants.
fn mma_smem_bytes() -> usize {
    (STAGES * STAGE_BYTES).max(EPILOGUE_BYTES)
}

/// The module variant, kernel entry and template section for a weight dtype.
fn variant(dtype: DType) -> (&'static str, &'static str, &'static str) {
    match dtype {
        DType::F32 => ("expert_gemm.f32", "expert_gemm_f32", "ffma"),
        DType::BF16 => ("expert_gemm.bf16", "expert_gemm_bf16", "mma"),
        DType::F16 => ("expert_gemm.f16", "expert_gemm_f16", "mma"),
    }
}

/// The template's lines outside any `//@begin NAME` … `//@end` section, plus those inside
/// sections named `keep`. The marker lines themselves are dropped.
fn select_sections(template: &str, keep: &str) -> Result<String> {
    let st = Stage::ExpertGemm;
    let mut out = String::with_capacity(template.len());
    let mut section: Option<&str> = None;
    for line in template.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("//@begin ") {
            if section.is_some() {
                return Err(Error::shape(st, "nested //@begin in the PTX template"));
            }
            section = Some(name.trim());
        } else if t == "//@end" {
            if section.take().is_none() {
                return Err(Error::shape(
                    st,
                    "//@end without //@begin in the PTX template",
                ));
            }
        } else if section.is_none_or(|s| s == keep) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if section.is_some() {
        return Err(Error::shape(
            st,
            "unterminated //@begin in the PTX template",
        ));
    }
    Ok(out)
}

/// Every module variant of this stage.
pub fn modules() -> Result<Vec<PtxModule>> {
    let stage = Stage::ExpertGemm;
    [DType::F32, DType::BF16, DType::F16]
        .into_iter()
        .map(|dtype| {
            let (name, _, section) = variant(dtype);
            let text = select_sections(ptx::template(stage), section)?;
            let subs = [
                ("VARIANT", name.to_string()),
                ("WT", dtype.name().to_string()),
                ("STAGES", STAGES.to_string()),
                ("STAGES_M1", (STAGES - 1).to_string()),
                ("WAIT_PENDING", (STAGES - 2).to_string()),
                ("SMEM_BYTES", mma_smem_bytes().to_string()),
            ];
            Ok(PtxModule {
                stage,
                variant: name.to_string(),
                source: ptx::render(stage, &text, &subs)?,
            })
        })
        .collect()
}

/// Expert weights on the device: weights in their own dtype, biases as f32 (zeros where the
/// layer has none, so the kernel always adds one).
#[derive(Debug)]
pub struct CudaExperts {
    pub dims: ExpertDims,
    /// The dtype of every weight matrix; picks the kernel variant.
    pub dtype: DType,
    gated: bool,
    gate: Option<CudaWeights>,
    up: CudaWeights,
    down: CudaWeights,
    gate_bias: CudaSlice<f32>,
    up_bias: CudaSlice<f32>,
    down_bias: CudaSlice<f32>,
}

/// A bias `[n]` as f32 on the device, zeros when absent.
fn upload_bias(dev: &CudaDevice, b: Option<&Tensor>, n: usize) -> Result<CudaSlice<f32>> {
    match b {
        Some(t) => dev.upload(&t.to_f32_vec()),
        None => dev.alloc(n),
    }
}

impl CudaExperts {
    /// Uploads `w` (E experts, or one shared expert as E = 1) for `act`.
    pub fn upload(dev: &CudaDevice, w: &ExpertWeights, act: Activation) -> Result<Self> {
        let st = Stage::ExpertGemm;
        let dims = w.dims(act)?;
        let dtype = w.up.dtype();
        for (name, t) in [("gate_proj", w.gate.as_ref()), ("down_proj", Some(&w.down))] {
            if let Some(t) = t {
                if t.dtype() != dtype {
                    return Err(Error::shape(
                        st,
                        format!(
                            "{name} is {} but up_proj is {dtype}; the CUDA kernels need one weight dtype",
                            t.dtype()
                        ),
                    ));
                }
            }
        }
        // The kernel forms (e * N + n) in 32 bits for weight rows and bias elements.
        to_u32(
            Stage::ExpertGemm,
            "E x max(F, H)",
            dims.experts * dims.ffn.max(dims.hidden),
            u32::MAX as usize,
        )?;
        let (e, f, h) = (dims.experts, dims.ffn, dims.hidden);
        Ok(CudaExperts {
            dims,
            dtype,
            gated: act.is_gated(),
            gate: w
                .gate
                .as_ref()
                .map(|g| CudaWeights::upload(dev, g))
                .transpose()?,
            up: CudaWeights::upload(dev, &w.up)?,
            down: CudaWeights::upload(dev, &w.down)?,
            gate_bias: upload_bias(dev, w.gate_bias.as_ref(), e * f)?,
            up_bias: upload_bias(dev, w.up_bias.as_ref(), e * f)?,
            down_bias: upload_bias(dev, w.down_bias.as_ref(), e * h)?,
        })
    }
}

/// Kernel code of an activation (see the header of kernels/expert_gemm.ptx) and its
/// clamped-SwiGLU `(alpha, limit)`.
fn act_code(act: Activation) -> (u32, f32, f32) {
    match act {
        Activation::Relu => (1, 0.0, 0.0),
        Activation::Gelu => (2, 0.0, 0.0),
        Activation::Swiglu => (3, 0.0, 0.0),
        Activation::Geglu => (4, 0.0, 0.0),
        Activation::ClampedSwiglu(c) => (5, c.alpha as f32, c.limit as f32),
    }
}

/// One launch of `expert_gemm_<wt>`: `out [rows, n] = act(a [rows, k] · w{0,1}ᵀ + b{0,1})`.
struct Gemm<'a> {
    a: &'a CudaSlice<f32>,
    w0: &'a CudaWeights,
    w1: &'a CudaWeights,
    b0: &'a CudaSlice<f32>,
    b1: &'a CudaSlice<f32>,
    n: usize,
    k: usize,
    code: u32,
    alpha: f32,
    limit: f32,
}

fn run_gemm(
    dev: &CudaDevice,
    w: &CudaExperts,
    g: Gemm<'_>,
    rows: usize,
    offsets: &CudaSlice<u32>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    if g.n == 0 || rows == 0 {
        return Ok(());
    }
    let bno = if g.code >= 3 { 64 } else { 128 };
    let tiles_m = rows / BM + w.dims.experts;
    let blocks = limits::product(&[tiles_m, g.n.div_ceil(bno)]);
    limits::check(
        BackendKind::Cuda,
        Resource::GridSize,
        || format!("{}: the expert GEMM's grid", Stage::ExpertGemm),
        blocks,
        i32::MAX as u64,
    )?;
    let (name, entry, _) = variant(w.dtype);
    let func = dev.function(Stage::ExpertGemm, name, entry)?;
    let smem = if w.dtype == DType::F32 {
        0
    } else {
        mma_smem_bytes()
    };
    if smem > DEFAULT_SMEM_LIMIT {
        drv(
            func.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            ),
            "raising the expert GEMM's shared memory limit",
        )?;
    }
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let rows_u = to_u32(Stage::ExpertGemm, "rows", rows, u32::MAX as usize)?;
    let experts_u = to_u32(Stage::ExpertGemm, "E", w.dims.experts, u32::MAX as usize)?;
    let n_u = to_u32(Stage::ExpertGemm, "N", g.n, u32::MAX as usize)?;
    let k_u = to_u32(Stage::ExpertGemm, "K", g.k, u32::MAX as usize)?;
    let (code, alpha, limit) = (g.code, g.alpha, g.limit);
    let mut b = dev.stream.launch_builder(&func);
    b.arg(g.a)
        .arg(offsets)
        .arg(&g.w0.bytes)
        .arg(&g.w1.bytes)
        .arg(g.b0)
        .arg(g.b1)
        .arg(out)
        .arg(&rows_u)
        .arg(&experts_u)
        .arg(&n_u)
        .arg(&k_u)
        .arg(&code)
        .arg(&alpha)
        .arg(&limit);
    // SAFETY: matches the KERNEL header of kernels/expert_gemm.ptx (`expert_gemm_<wt>`: a,
    // offsets, w0, w1, b0, b1, out, rows, experts, n, k, act, alpha, limit). `launch` checked
    // a >= rows*k and out >= rows*n f32 elements and offsets >= E+1; w0/w1 hold [E, n, k]
    // elements of the variant's dtype and b0/b1 [E, n] f32 (CudaExperts::upload). The kernel
    // clips every row to min(offsets[e+1], rows) and every column/k to n/k, so it stays in
    // bounds for any offset values; LAUNCH: grid = (floor(rows/128) + E) * ceil(n/BNO)
    // blocks of 256 threads, dynamic shared memory 0 (f32) or mma_smem_bytes() (raised above).
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(|e| crate::cuda::context::cuda_err(format!("launching {entry}: {e:?}")))
}

/// Launches `y [rows, H]` = the expert FFN of `x_rows [rows, H]`; rows of expert e are
/// `offsets[e]..offsets[e+1]` (`offsets` `[E + 1]` on the device, never read by the host).
/// Rows from `offsets[E]` on are not written. Allocates the intermediate `h [rows, F]` f32.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    dev: &CudaDevice,
    x_rows: &CudaSlice<f32>,
    rows: usize,
    offsets: &CudaSlice<u32>,
    w: &CudaExperts,
    act: Activation,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    let st = Stage::ExpertGemm;
    let d = w.dims;
    if act.is_gated() != w.gated {
        return Err(Error::shape(
            st,
            format!(
                "activation {act:?} does not match the uploaded experts (gated: {})",
                w.gated
            ),
        ));
    }
    if rows == 0 || d.hidden == 0 || d.experts == 0 {
        return Ok(());
    }
    let elems = rows
        .checked_mul(d.hidden)
        .ok_or_else(|| Error::shape(st, "rows x H overflows"))?;
    let h_elems = rows
        .checked_mul(d.ffn)
        .ok_or_else(|| Error::shape(st, "rows x F overflows"))?;
    for (what, len) in [("x_rows", x_rows.len()), ("y", y.len())] {
        if len < elems {
            return Err(Error::shape(
                st,
                format!("{what} holds {len} elements, fewer than rows x H = {elems}"),
            ));
        }
    }
    if offsets.len() < d.experts + 1 {
        return Err(Error::shape(
            st,
            format!(
                "expert_offsets holds {} elements, expected E + 1 = {}",
                offsets.len(),
                d.experts + 1
            ),
        ));
    }
    let (code, alpha, limit) = act_code(act);
    let mut h: CudaSlice<f32> = dev.alloc(h_elems)?;
    let (w0, b0) = match &w.gate {
        Some(g) => (g, &w.gate_bias),
        None => (&w.up, &w.up_bias),
    };
    let gemm1 = Gemm {
        a: x_rows,
        w0,
        w1: &w.up,
        b0,
        b1: &w.up_bias,
        n: d.ffn,
        k: d.hidden,
        code,
        alpha,
        limit,
    };
    run_gemm(dev, w, gemm1, rows, offsets, &mut h)?;
    let gemm2 = Gemm {
        a: &h,
        w0: &w.down,
        w1: &w.down,
        b0: &w.down_bias,
        b1: &w.down_bias,
        n: d.hidden,
        k: d.ffn,
        code: 0,
        alpha: 0.0,
        limit: 0.0,
    };
    run_gemm(dev, w, gemm2, rows, offsets, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_select_one_variant() {
        let t = "a\n//@begin ffma\nb\n//@end\n//@begin mma\nc\n//@end\nd\n";
        assert_eq!(select_sections(t, "ffma").unwrap(), "a\nb\nd\n");
        assert_eq!(select_sections(t, "mma").unwrap(), "a\nc\nd\n");
        assert!(select_sections("//@begin x\n", "x").is_err());
        assert!(select_sections("//@end\n", "x").is_err());
    }

    #[test]
    fn every_variant_renders_ascii_without_markers() {
        let m = modules().unwrap();
        assert_eq!(m.len(), 3);
        for v in &m {
            assert!(v.source.is_ascii(), "{}", v.variant);
            let marker = |l: &str| l.trim().starts_with("//@begin") || l.trim() == "//@end";
            assert!(
                !v.source.lines().any(marker) && !v.source.contains("${"),
                "{}",
                v.variant
            );
            let entry = format!(".entry {}(", variant_entry(&v.variant));
            assert!(v.source.contains(&entry), "{} lacks {entry}", v.variant);
        }
        assert!(
            m[0].source.contains("fma.rn.f32")
                && !m[0].source.contains("cp.async.cg.shared.global [")
        );
        assert!(m[1]
            .source
            .contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
        assert!(m[2]
            .source
            .contains("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"));
    }

    fn variant_entry(name: &str) -> &'static str {
        [DType::F32, DType::BF16, DType::F16]
            .into_iter()
            .map(variant)
            .find(|v| v.0 == name)
            .unwrap()
            .1
    }
}
