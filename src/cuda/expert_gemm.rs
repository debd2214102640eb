//! Stage 3 on CUDA (kernels/expert_gemm.ptx): the grouped expert FFN as two launches of one
//! kernel: GEMM 1 (`x_rows · W{g,u}ᵀ + b`, activation in the epilogue) writes `h` `[rows, F]`
//! to a caller-provided scratch buffer, GEMM 2 (`h · Wdᵀ + bd`) writes `y`. `x_rows`, `h` and
//! `y` are in the activation dtype (f32, f16 or bf16); accumulation is f32 and every stored
//! element is rounded to the activation dtype once (nearest even).
//!
//! Variants, all rendered from the one template, one per (weight dtype W, activation dtype A):
//! - A = f32: `expert_gemm.f32` (FFMA), `expert_gemm.bf16` / `expert_gemm.f16` (tensor cores,
//!   `mma.sync.m16n8k16`, f32 accumulation; activations rounded to W as they are staged in
//!   shared memory);
//! - A = f16 / bf16: `expert_gemm.<W>.a<A>`: with A = W the activations go global → shared by
//!   `cp.async` exactly like the weights (no conversion in the main loop); with A ≠ W (both
//!   16-bit) they are widened and rounded to W on the way to shared memory; with W = f32 the
//!   FFMA kernel widens them to f32.
//!
//! The template keeps the lines of its `//@begin TAG` sections for the variants that carry the
//! tag (see `Variant::tags`), then fills the `${NAME}` placeholders. Expert offsets stay on
//! the device: the grid comes from the static bound `floor(rows / 128) + E` row tiles and
//! surplus blocks exit.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use crate::backend::BackendKind;
use crate::config::Activation;
use crate::cpu::expert_gemm::{ExpertDims, ExpertWeights};
use crate::cuda::act::{ActMeta, ActView, ActViewMut};
use crate::cuda::context::drv;
use crate::cuda::context::to_u32;
use crate::cuda::ptx::PtxModule;
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

/// One module variant: weight dtype `w`, activation dtype `a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Variant {
    pub w: DType,
    pub a: DType,
}

/// Every variant, the f32-activation ones first (their modules predate 16-bit activations).
const VARIANTS: [Variant; 9] = [
    Variant {
        w: DType::F32,
        a: DType::F32,
    },
    Variant {
        w: DType::BF16,
        a: DType::F32,
    },
    Variant {
        w: DType::F16,
        a: DType::F32,
    },
    Variant {
        w: DType::F32,
        a: DType::F16,
    },
    Variant {
        w: DType::F32,
        a: DType::BF16,
    },
    Variant {
        w: DType::BF16,
        a: DType::BF16,
    },
    Variant {
        w: DType::F16,
        a: DType::F16,
    },
    Variant {
        w: DType::BF16,
        a: DType::F16,
    },
    Variant {
        w: DType::F16,
        a: DType::BF16,
    },
];

impl Variant {
    /// Module variant name: `expert_gemm.<w>` (f32 activations) or `expert_gemm.<w>.a<a>`.
    pub(crate) fn name(self) -> String {
        match self.a {
            DType::F32 => format!("expert_gemm.{}", self.w.name()),
            a => format!("expert_gemm.{}.a{}", self.w.name(), a.name()),
        }
    }

    /// Kernel entry: `expert_gemm_<w>` or `expert_gemm_<w>_a<a>`.
    pub(crate) fn entry(self) -> String {
        format!("expert_gemm_{}{}", self.w.name(), self.suffix())
    }

    fn suffix(self) -> String {
        match self.a {
            DType::F32 => String::new(),
            a => format!("_a{}", a.name()),
        }
    }

    /// Tensor cores (16-bit weights) rather than FFMA.
    pub(crate) fn mma(self) -> bool {
        self.w != DType::F32
    }

    /// The template sections this variant keeps (see the header of kernels/expert_gemm.ptx).
    pub(crate) fn tags(self) -> Vec<&'static str> {
        let mut t = vec![if self.mma() { "mma" } else { "ffma" }];
        if self.a == DType::F32 {
            t.push("a32");
        } else {
            t.push("a16");
            if self.mma() {
                t.push(if self.a == self.w { "acp" } else { "awide" });
            }
        }
        t
    }

    /// Blocks per SM the kernel is compiled for (`.minnctapersm`): 2 (at most 128 registers)
    /// except for the FFMA kernel with 16-bit activations, which spills at 128 registers and
    /// is compiled for one block per SM instead.
    pub(crate) fn min_ctas(self) -> u32 {
        if !self.mma() && self.a != DType::F32 {
            1
        } else {
            2
        }
    }

    /// Dynamic shared memory of a launch.
    fn smem(self) -> usize {
        if self.mma() {
            mma_smem_bytes()
        } else {
            0
        }
    }
}

/// The 16-bit elements of the packed word `word` widened to f32 into `lo` and `hi`
/// (`tmp16` two b16 temporaries, `tmp32` one b32 temporary).
fn widen_pair(
    a: DType,
    word: &str,
    lo: &str,
    hi: &str,
    tmp16: (&str, &str),
    tmp32: &str,
) -> Vec<String> {
    match a {
        DType::F16 => vec![
            format!("mov.b32         {{{}, {}}}, {word};", tmp16.0, tmp16.1),
            format!("cvt.f32.f16     {lo}, {};", tmp16.0),
            format!("cvt.f32.f16     {hi}, {};", tmp16.1),
        ],
        _ => vec![
            format!("shl.b32         {tmp32}, {word}, 16;"),
            format!("mov.b32         {lo}, {tmp32};"),
            format!("and.b32         {tmp32}, {word}, 0xFFFF0000;"),
            format!("mov.b32         {hi}, {tmp32};"),
        ],
    }
}

/// FF_WIDEN: the ffma variant's 4 A elements (r_xa0, r_xa1) widened into f_la0..3.
fn ff_widen(a: DType) -> String {
    let mut v = widen_pair(a, "r_xa0", "f_la0", "f_la1", ("h_xa0", "h_xa1"), "r_t1");
    v.extend(widen_pair(
        a,
        "r_xa1",
        "f_la2",
        "f_la3",
        ("h_xa2", "h_xa3"),
        "r_t1",
    ));
    v.join("\n    ")
}

/// AW_CONVERT: the awide variant's next A tile (r_xw0..7, rows lrow and lrow + 64) widened,
/// rounded to `w` pairs and stored to its stage at r_t0 and r_t0 + 4096.
fn aw_convert(a: DType, w: DType) -> String {
    let mut v = Vec::new();
    for i in 0..8 {
        v.extend(widen_pair(
            a,
            &format!("r_xw{i}"),
            "f_t0",
            "f_t1",
            ("h_a0", "h_a1"),
            "r_t1",
        ));
        v.push(format!(
            "cvt.rn.{}x2.f32 r_pk{}, f_t1, f_t0;",
            w.name(),
            i % 4
        ));
        if i % 4 == 3 {
            let off = if i == 3 { "" } else { "+4096" };
            v.push(format!(
                "st.shared.v4.b32 [r_t0{off}], {{r_pk0, r_pk1, r_pk2, r_pk3}};"
            ));
        }
    }
    v.join("\n    ")
}

/// Every module variant of this stage.
pub fn modules() -> Result<Vec<PtxModule>> {
    VARIANTS
        .iter()
        .map(|&v| {
            let subs = [
                ("VARIANT", v.name()),
                ("WT", v.w.name().to_string()),
                ("ASUF", v.suffix()),
                ("AT", v.a.name().to_string()),
                ("A_SIZE", v.a.size().to_string()),
                ("A_SHIFT", v.a.size().trailing_zeros().to_string()),
                ("STAGES", STAGES.to_string()),
                ("STAGES_M1", (STAGES - 1).to_string()),
                ("WAIT_PENDING", (STAGES - 2).to_string()),
                ("SMEM_BYTES", mma_smem_bytes().to_string()),
                ("MIN_CTAS", v.min_ctas().to_string()),
                ("FF_WIDEN", ff_widen(v.a)),
                ("AW_CONVERT", aw_convert(v.a, v.w)),
            ];
            PtxModule::specialise(Stage::ExpertGemm, v.name(), &v.tags(), &subs)
        })
        .collect()
}

/// Expert weights on the device: weights in their own dtype, biases as f32 (zeros where the
/// layer has none, so the kernel always adds one).
#[derive(Debug)]
pub struct CudaExperts {
    /// E, H and F.
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
        let (up_t, down_t) = (
            w.up.require_dense(BackendKind::Cuda, "up_proj")?,
            w.down.require_dense(BackendKind::Cuda, "down_proj")?,
        );
        let gate_t = w
            .gate
            .as_ref()
            .map(|g| g.require_dense(BackendKind::Cuda, "gate_proj"))
            .transpose()?;
        let dtype = up_t.dtype();
        for (name, t) in [("gate_proj", gate_t), ("down_proj", Some(down_t))] {
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
            gate: gate_t.map(|g| CudaWeights::upload(dev, g)).transpose()?,
            up: CudaWeights::upload(dev, up_t)?,
            down: CudaWeights::upload(dev, down_t)?,
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

/// One launch of the kernel: `out [rows, n] = act(a [rows, k] · w{0,1}ᵀ + b{0,1})`.
struct Gemm<'a> {
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

#[allow(clippy::too_many_arguments)]
fn run_gemm(
    dev: &CudaDevice,
    w: &CudaExperts,
    v: Variant,
    g: Gemm<'_>,
    rows: usize,
    offsets: &CudaSlice<u32>,
    a: &CudaView<'_, u8>,
    out: &mut CudaViewMut<'_, u8>,
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
    let entry = v.entry();
    let func = dev.function(Stage::ExpertGemm, &v.name(), &entry)?;
    let smem = v.smem();
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
    b.arg(a)
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
    // SAFETY: matches the KERNEL header of kernels/expert_gemm.ptx (`expert_gemm_<w>[_a<a>]`
    // of the variant: a, offsets, w0, w1, b0, b1, out, rows, experts, n, k, act, alpha, limit).
    // `launch` checked that a holds >= rows*k and out >= rows*n elements of the activation
    // dtype (element-aligned; 16-byte aligned where the f32-activation variants' vector loads
    // need it) and offsets >= E+1; w0/w1 hold [E, n, k] elements of the variant's weight
    // dtype and b0/b1 [E, n] f32 (CudaExperts::upload). The kernel clips every row to
    // min(offsets[e+1], rows) and every column/k to n/k, so it stays in bounds for any offset
    // values; LAUNCH: grid = (floor(rows/128) + E) * ceil(n/BNO) blocks of 256 threads,
    // dynamic shared memory 0 (ffma) or mma_smem_bytes() (raised above).
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(|e| crate::cuda::context::cuda_err(format!("launching {entry}: {e:?}")))
}

/// An error unless the f32-activation variant `v` may read `a` with its vector loads: they
/// run when `k % 4 == 0` (FFMA) or `k % 8 == 0` (tensor cores) and need a 16-byte aligned
/// base (the 16-bit-activation variants check this on the device and fall back to element
/// loads).
fn check_f32_vector_base(v: Variant, what: &str, a: &ActMeta, k: usize) -> Result<()> {
    let vector = if v.mma() { k % 8 == 0 } else { k % 4 == 0 };
    if v.a == DType::F32 && vector && !a.aligned(16) {
        return Err(Error::shape(
            Stage::ExpertGemm,
            format!(
                "{what} (f32, rows of {k} elements) starts at {:#x}: the f32-activation kernels \
                 need a 16-byte aligned base for their 16-byte loads",
                a.addr
            ),
        ));
    }
    Ok(())
}

/// Checks, before anything of a forward is launched, that `a` can be read by these experts'
/// GEMM: the f32-activation kernels need a 16-byte aligned base when their vector loads apply
/// (the 16-bit ones fall back on the device). A layer forward calls it for the caller's `x`,
/// which the shared expert reads directly.
pub fn check_input(dev: &CudaDevice, a: &ActView<'_>, w: &CudaExperts) -> Result<()> {
    let v = Variant {
        w: w.dtype,
        a: a.dtype,
    };
    if w.dims.hidden == 0 {
        return Ok(());
    }
    check_f32_vector_base(v, "x", &a.meta(&dev.stream), w.dims.hidden)
}

/// Launches `y [rows, H]` = the expert FFN of `a [rows, H]`; rows of expert e are
/// `offsets[e]..offsets[e+1]` (`offsets` `[E + 1]` on the device, never read by the host).
/// Rows from `offsets[E]` on are not written. `h` is the caller's scratch for the
/// intermediate `[rows, F]`; `a`, `h` and `y` share one activation dtype (f32, f16 or bf16)
/// and may be larger than `rows` rows. Nothing is allocated.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    dev: &CudaDevice,
    a: &ActView<'_>,
    rows: usize,
    offsets: &CudaSlice<u32>,
    w: &CudaExperts,
    act: Activation,
    h: &mut ActViewMut<'_>,
    y: &mut ActViewMut<'_>,
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
    let elems = rows
        .checked_mul(d.hidden)
        .ok_or_else(|| Error::shape(st, "rows x H overflows"))?;
    let h_elems = rows
        .checked_mul(d.ffn)
        .ok_or_else(|| Error::shape(st, "rows x F overflows"))?;
    let dtype = a.dtype;
    let v = Variant {
        w: w.dtype,
        a: dtype,
    };
    let a_meta = a.meta(&dev.stream);
    let h_meta = h.meta(&dev.stream);
    a_meta.check(st, "x_rows", dtype, elems)?;
    h_meta.check(st, "h (scratch)", dtype, h_elems)?;
    y.meta(&dev.stream).check(st, "y", dtype, elems)?;
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
    if rows == 0 || d.hidden == 0 || d.experts == 0 {
        return Ok(());
    }
    check_f32_vector_base(v, "x_rows", &a_meta, d.hidden)?;
    if d.ffn > 0 {
        check_f32_vector_base(v, "h", &h_meta, d.ffn)?;
    }
    let (code, alpha, limit) = act_code(act);
    let (w0, b0) = match &w.gate {
        Some(g) => (g, &w.gate_bias),
        None => (&w.up, &w.up_bias),
    };
    let gemm1 = Gemm {
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
    run_gemm(dev, w, v, gemm1, rows, offsets, &a.bytes, &mut h.bytes)?;
    let gemm2 = Gemm {
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
    let h_in = h.bytes.slice(..);
    run_gemm(dev, w, v, gemm2, rows, offsets, &h_in, &mut y.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of the mma main loop (MM_LOOP up to the final wait) or the ffma one.
    fn main_loop(src: &str) -> &str {
        let (start, end) = if src.contains("MM_LOOP:") {
            ("MM_LOOP:", "cp.async.wait_group 0;")
        } else {
            ("FF_LOOP:", "@p_t bra        FF_LOOP;")
        };
        let i = src.find(start).unwrap();
        let j = i + src[i..].find(end).unwrap();
        &src[i..j]
    }

    #[test]
    fn every_variant_renders_ascii_without_markers() {
        let m = modules().unwrap();
        assert_eq!(m.len(), VARIANTS.len());
        for (v, module) in VARIANTS.iter().zip(&m) {
            assert_eq!(module.variant, v.name());
            let src = &module.source;
            assert!(src.is_ascii(), "{}", module.variant);
            let marker = |l: &str| l.trim().starts_with("//@begin") || l.trim() == "//@end";
            assert!(
                !src.lines().any(marker) && !src.contains("${"),
                "{}",
                module.variant
            );
            let entry = format!(".entry {}(", v.entry());
            assert!(src.contains(&entry), "{} lacks {entry}", module.variant);
            let body = main_loop(src);
            if v.mma() {
                let w = v.w.name();
                let mma = format!("mma.sync.aligned.m16n8k16.row.col.f32.{w}.{w}.f32");
                assert_eq!(body.matches(&mma).count(), 16, "{}", module.variant);
            } else {
                assert!(body.contains("fma.rn.f32      f_acc63, f_a7, f_b7, f_acc63;"));
                assert!(!src.contains("cp.async.cg.shared"), "{}", module.variant);
            }
            let cp = body.matches("cp.async.cg.shared.global [").count();
            match (v.mma(), v.a) {
                (false, DType::F32) => {
                    assert!(body.contains("ld.global.nc.v4.f32 {f_la0, f_la1, f_la2, f_la3}"));
                }
                (false, a) => {
                    // 8-byte loads of 4 activations, widened to f32 at the shared store.
                    assert!(body.contains("@p_u ld.global.nc.v2.b32 {r_xa0, r_xa1}, [d_pa];"));
                    assert!(body.contains("@p_u ld.global.nc.b16 h_xa3, [d_pa+6];"));
                    let widen = match a {
                        DType::F16 => "cvt.f32.f16     f_la3, h_xa3;",
                        _ => "and.b32         r_t1, r_xa1, 0xFFFF0000;",
                    };
                    assert!(body.contains(widen), "{}", module.variant);
                    assert!(body.contains("ld.global.nc.v4.f32 {f_lb0, f_lb1, f_lb2, f_lb3}"));
                }
                (true, DType::F32) => {
                    assert_eq!(cp, 2, "{}", module.variant);
                    assert!(body.contains("ld.global.nc.v4.f32 {f_st0, f_st1, f_st2, f_st3}"));
                    let w = v.w.name();
                    assert!(body.contains(&format!("cvt.rn.{w}x2.f32 r_pk0, f_st1, f_st0;")));
                }
                (true, a) if a == v.w => {
                    // A straight to shared memory: two cp.async for A, two for B, and no
                    // conversion of any kind in the main loop.
                    assert_eq!(cp, 4, "{}", module.variant);
                    assert!(
                        body.contains("cp.async.cg.shared.global [r_pad+4096], [d_src], 16, r_sz;")
                    );
                    assert!(!body.contains("cvt."), "{}", module.variant);
                    assert!(!src.contains(".reg .f32   f_st<16>;"), "{}", module.variant);
                }
                (true, a) => {
                    assert_eq!(cp, 2, "{}", module.variant);
                    assert!(body.contains(
                        "@p_u ld.global.nc.v4.b32 {r_xw4, r_xw5, r_xw6, r_xw7}, [d_pa1];"
                    ));
                    let w = v.w.name();
                    assert!(body.contains(&format!("cvt.rn.{w}x2.f32 r_pk3, f_t1, f_t0;")));
                    let widen = match a {
                        DType::F16 => "cvt.f32.f16     f_t1, h_a1;",
                        _ => "and.b32         r_t1, r_xw7, 0xFFFF0000;",
                    };
                    assert!(body.contains(widen), "{}", module.variant);
                }
            }
            // Epilogue: f32 stores, or one rounding to the activation dtype.
            if v.a == DType::F32 {
                assert!(src.contains("st.global.f32   [d_t], f_h;"));
                assert!(!src.contains("h_o"));
            } else {
                let cvt = format!("cvt.rn.{}.f32 h_o, f_h;", v.a.name());
                assert!(src.contains(&cvt), "{}", module.variant);
                assert!(src.contains("st.global.b16   [d_t], h_o;"));
                assert!(!src.contains("st.global.f32"), "{}", module.variant);
            }
        }
    }

    #[test]
    fn variant_names_entries_and_tags() {
        let v = Variant {
            w: DType::BF16,
            a: DType::BF16,
        };
        assert_eq!(
            (v.name(), v.entry()),
            (
                "expert_gemm.bf16.abf16".into(),
                "expert_gemm_bf16_abf16".into()
            )
        );
        assert_eq!(v.tags(), ["mma", "a16", "acp"]);
        let v = Variant {
            w: DType::F16,
            a: DType::BF16,
        };
        assert_eq!(v.tags(), ["mma", "a16", "awide"]);
        let v = Variant {
            w: DType::F32,
            a: DType::F16,
        };
        assert_eq!(
            (v.name(), v.entry()),
            ("expert_gemm.f32.af16".into(), "expert_gemm_f32_af16".into())
        );
        assert_eq!(v.tags(), ["ffma", "a16"]);
        let v = Variant {
            w: DType::F16,
            a: DType::F32,
        };
        assert_eq!(
            (v.name(), v.entry()),
            ("expert_gemm.f16".into(), "expert_gemm_f16".into())
        );
        assert_eq!(v.tags(), ["mma", "a32"]);
        for w in DType::ALL {
            for a in DType::ALL {
                assert!(VARIANTS.contains(&Variant { w, a }), "{w} {a}");
            }
        }
    }

    /// Relative L2 error of `got` against `want`.
    fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
        let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        if den == 0.0 {
            num.sqrt()
        } else {
            (num / den).sqrt()
        }
    }

    /// On a CUDA device (skipped without one): every (weight, activation) dtype variant
    /// against the CPU reference (with h rounded to the activation dtype between the GEMMs),
    /// gated and not, K a multiple of 8 and not, an empty expert, dropped rows left unwritten,
    /// a 16-bit activation base that is not 16-byte aligned (the kernels' element-load path),
    /// and the typed error for an f32 one.
    #[test]
    fn every_variant_matches_cpu_reference_on_device() {
        use crate::cpu::expert_gemm::expert_ffn_stored;
        let Ok(dev) = CudaDevice::new(0) else {
            println!("expert_gemm: no CUDA device, device test skipped");
            return;
        };
        let mut g = crate::synth::Gen::new(29);
        let tol = |v: Variant| {
            if v.w == DType::BF16 || v.a == DType::BF16 {
                1e-2
            } else if v.w == DType::F16 || v.a == DType::F16 {
                5e-3
            } else {
                2e-5
            }
        };
        // (E, F, H, rows, kept rows), expert 1 empty.
        for &(e, f, h, rows, kept) in &[
            (3, 40, 64, 300, 290),
            (3, 24, 13, 37, 30),
            (3, 136, 72, 130, 130),
        ] {
            let offsets: Vec<u32> = vec![0, (kept / 2) as u32, (kept / 2) as u32, kept as u32];
            let od = dev.upload(&offsets).unwrap();
            for act in [Activation::Swiglu, Activation::Gelu] {
                for v in VARIANTS {
                    let mut t = |shape: &[usize], sc: f32| g.tensor(shape, sc).cast(v.w);
                    let w = ExpertWeights {
                        gate: act.is_gated().then(|| t(&[e, f, h], 0.4).into()),
                        up: t(&[e, f, h], 0.4).into(),
                        down: t(&[e, h, f], 0.3).into(),
                        gate_bias: act.is_gated().then(|| t(&[e, f], 0.1)),
                        up_bias: Some(t(&[e, f], 0.1)),
                        down_bias: Some(t(&[e, h], 0.1)),
                    };
                    let x = g.tensor(&[rows, h], 1.0).cast(v.a);
                    let xb = crate::cuda::act::tensor_bytes(&x);
                    let x64 = crate::cuda::act::bytes_to_f64(&xb, v.a);
                    let want =
                        expert_ffn_stored(&x64, &offsets, &w, act, |y| v.a.round(y)).unwrap();
                    let cw = CudaExperts::upload(&dev, &w, act).unwrap();
                    let size = v.a.size();
                    // Two copies of x: at the allocation's start and `size` bytes in.
                    let mut shifted = vec![0u8; size];
                    shifted.extend_from_slice(&xb);
                    let bufs = [dev.upload(&xb).unwrap(), dev.upload(&shifted).unwrap()];
                    for (i, buf) in bufs.iter().enumerate() {
                        let a = ActView {
                            bytes: buf.slice(i * size..),
                            dtype: v.a,
                        };
                        let mut hb = dev.upload(&vec![0xFFu8; rows * f * size]).unwrap();
                        let mut yb = dev.upload(&vec![0xFFu8; rows * h * size]).unwrap();
                        let mut hv = ActViewMut {
                            bytes: hb.slice_mut(..),
                            dtype: v.a,
                        };
                        let mut yv = ActViewMut {
                            bytes: yb.slice_mut(..),
                            dtype: v.a,
                        };
                        let r = launch(&dev, &a, rows, &od, &cw, act, &mut hv, &mut yv);
                        let ctx = format!(
                            "{} {act:?} E={e} F={f} H={h} rows={rows} shift={i}",
                            v.name()
                        );
                        if i == 1 && v.a == DType::F32 && h % 4 == 0 {
                            assert!(r.is_err(), "{ctx}: an unaligned f32 base must be refused");
                            continue;
                        }
                        r.unwrap();
                        let got = crate::cuda::act::bytes_to_f64(
                            &dev.read(&yb, rows * h * size).unwrap(),
                            v.a,
                        );
                        let err = rel_l2(&got[..kept * h], &want[..kept * h]);
                        assert!(err <= tol(v), "{ctx}: rel L2 {err:e}");
                        // Rows past offsets[E] are never written (still the 0xFF poison).
                        assert!(
                            got[kept * h..].iter().all(|y| y.is_nan()),
                            "{ctx}: dropped rows"
                        );
                    }
                }
            }
        }
        println!("expert_gemm: device test ran on {}", dev.name);
    }
}
