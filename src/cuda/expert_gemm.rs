//! Stage 3 on CUDA (kernels/expert_gemm.ptx): the grouped expert FFN as two launches of one
//! kernel: GEMM 1 (`x_rows · W{g,u}ᵀ + b`, activation in the epilogue) writes `h` `[rows, F]`
//! to a caller-provided scratch buffer, GEMM 2 (`h · Wdᵀ + bd`) writes `y`. `x_rows`, `h` and
//! `y` are in the activation dtype (f32, f16 or bf16); accumulation is f32 and every stored
//! element is rounded to the activation dtype once (nearest even).
//!
//! Variants, all rendered from the one template, one per (weight format W, activation dtype A):
//! - dense W, A = f32: `expert_gemm.f32` (FFMA), `expert_gemm.bf16` / `expert_gemm.f16`
//!   (tensor cores, `mma.sync.m16n8k16`, f32 accumulation; activations rounded to W as they
//!   are staged in shared memory);
//! - dense W, A = f16 / bf16: `expert_gemm.<W>.a<A>`: with A = W the activations go global →
//!   shared by `cp.async` exactly like the weights (no conversion in the main loop); with A ≠ W
//!   (both 16-bit) they are widened and rounded to W on the way to shared memory; with W = f32
//!   the FFMA kernel widens them to f32;
//! - quantized W (FP8 block, MXFP4, INT4; [`WeightFormat`]): `expert_gemm.<fmt>.s<scale>[.a<A>]`,
//!   the FFMA kernel with the packed bytes read by 16-byte loads and each weight decoded to f32
//!   on its way to shared memory (src/cuda/quant.rs generates the unrolled decode). Opt-in with
//!   `MOE_CUDA_QUANT=1` until a GPU has verified them ([`crate::cuda::quant_enabled`]).
//!
//! GEMM 1 and GEMM 2 pick their variants separately (gate/up share one format; down may
//! differ). The template keeps the lines of its `//@begin TAG` sections for the variants that
//! carry the tag (see `Variant::tags`), then fills the `${NAME}` placeholders. Expert offsets
//! stay on the device: the grid comes from the static bound `floor(rows / 128) + E` row tiles
//! and surplus blocks exit.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};

use crate::backend::BackendKind;
use crate::config::Activation;
use crate::cpu::expert_gemm::{ExpertDims, ExpertWeights};
use crate::cuda::act::{ActMeta, ActView, ActViewMut};
use crate::cuda::context::drv;
use crate::cuda::context::to_u32;
use crate::cuda::ptx::PtxModule;
pub use crate::cuda::quant::WeightFormat;
use crate::cuda::quant::{self, CudaQuant};
use crate::cuda::{CudaDevice, CudaWeights};
use crate::error::{Error, Result};
use crate::limits::{self, Resource};
use crate::quant::Weight;
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
/// Bytes of one k row of the FFMA kernels' shared tiles: 132 f32 (128 + 4 of padding).
const FF_PITCH: usize = 132 * 4;

/// Dynamic shared memory of the tensor-core variants.
fn mma_smem_bytes() -> usize {
    (STAGES * STAGE_BYTES).max(EPILOGUE_BYTES)
}

/// One module variant: weight format `w`, activation dtype `a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Variant {
    pub w: WeightFormat,
    pub a: DType,
}

const fn dense(w: DType, a: DType) -> Variant {
    Variant {
        w: WeightFormat::Dense(w),
        a,
    }
}

/// Every dense variant, the f32-activation ones first (their modules predate 16-bit
/// activations).
const DENSE_VARIANTS: [Variant; 9] = [
    dense(DType::F32, DType::F32),
    dense(DType::BF16, DType::F32),
    dense(DType::F16, DType::F32),
    dense(DType::F32, DType::F16),
    dense(DType::F32, DType::BF16),
    dense(DType::BF16, DType::BF16),
    dense(DType::F16, DType::F16),
    dense(DType::BF16, DType::F16),
    dense(DType::F16, DType::BF16),
];

/// Every variant: the dense ones, then each quantized format with each activation dtype.
pub(crate) fn variants() -> Vec<Variant> {
    let mut v = DENSE_VARIANTS.to_vec();
    for w in WeightFormat::QUANT {
        for a in [DType::F32, DType::F16, DType::BF16] {
            v.push(Variant { w, a });
        }
    }
    v
}

impl Variant {
    /// The weight part of the names: `f32`, `bf16`, `fp8_sbf16`, `mxfp4_se8m0`, `int4_sf16`.
    fn weight_code(self) -> String {
        match (self.w, self.w.scale_name()) {
            (WeightFormat::Dense(d), _) => d.name().to_string(),
            (w, Some(s)) => format!("{}_s{s}", w.name()),
            (w, None) => w.name().to_string(),
        }
    }

    /// Module variant name: `expert_gemm.<w>` (f32 activations) or `expert_gemm.<w>.a<a>`,
    /// `<w>` as [`Variant::weight_code`] with dots (`expert_gemm.fp8.sbf16.af16`).
    pub(crate) fn name(self) -> String {
        let w = self.weight_code().replace('_', ".");
        match self.a {
            DType::F32 => format!("expert_gemm.{w}"),
            a => format!("expert_gemm.{w}.a{}", a.name()),
        }
    }

    /// Kernel entry: `expert_gemm_<w>` or `expert_gemm_<w>_a<a>`.
    pub(crate) fn entry(self) -> String {
        format!("expert_gemm_{}{}", self.weight_code(), self.suffix())
    }

    fn suffix(self) -> String {
        match self.a {
            DType::F32 => String::new(),
            a => format!("_a{}", a.name()),
        }
    }

    /// Quantized weights (the FFMA kernel with decode).
    pub(crate) fn quant(self) -> bool {
        self.w.is_quant()
    }

    /// Tensor cores (16-bit dense weights) rather than FFMA.
    pub(crate) fn mma(self) -> bool {
        matches!(self.w, WeightFormat::Dense(d) if d != DType::F32)
    }

    /// The template sections this variant keeps (see the header of kernels/expert_gemm.ptx).
    pub(crate) fn tags(self) -> Vec<&'static str> {
        let mut t = vec![if self.mma() { "mma" } else { "ffma" }];
        t.push(if self.quant() { "quant" } else { "dense" });
        t.push(if self.a == DType::F32 { "a32" } else { "a16" });
        match self.w {
            WeightFormat::Dense(w) if self.a != DType::F32 && self.mma() => {
                t.push(if self.a == w { "acp" } else { "awide" });
            }
            WeightFormat::Dense(_) => {}
            q => t.push(q.name()),
        }
        t
    }

    /// Blocks per SM the kernel is compiled for (`.minnctapersm`): 2 (at most 128 registers)
    /// except for the FFMA kernels with 16-bit activations and the quantized ones (their
    /// register-prefetched k tile is 16 or 32 values per thread), compiled for one block per
    /// SM instead: held to 128 registers, ptxas spills them.
    pub(crate) fn min_ctas(self) -> u32 {
        if self.quant() || (!self.mma() && self.a != DType::F32) {
            1
        } else {
            2
        }
    }

    /// The k tile of the quantized variants (32 FP8, 64 4-bit); 8 for the dense FFMA kernel.
    fn k_tile(self) -> usize {
        if self.quant() {
            self.w.k_tile()
        } else {
            8
        }
    }

    /// Dynamic shared memory of a launch: 0 (dense FFMA: static), the cp.async ring (mma), or
    /// the quantized kernel's As and Bs `[QK][132]` f32 (at least the epilogue's C tile).
    fn smem(self) -> usize {
        if self.quant() {
            (2 * self.k_tile() * FF_PITCH).max(EPILOGUE_BYTES)
        } else if self.mma() {
            mma_smem_bytes()
        } else {
            0
        }
    }

    /// The dense 16-bit weight dtype of an mma variant (f32 otherwise: unused there).
    fn dense_dtype(self) -> DType {
        match self.w {
            WeightFormat::Dense(d) => d,
            _ => DType::F32,
        }
    }
}

/// The 16-bit elements of the packed word `word` widened to f32 into `lo` and `hi`
/// (`tmp16` two b16 temporaries, `tmp32` one b32 temporary).
pub(crate) fn widen_pair(
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
    variants().into_iter().map(module).collect()
}

/// The module of variant `v`: the template with `v`'s sections and placeholders.
fn module(v: Variant) -> Result<PtxModule> {
    let mut subs = vec![
        ("VARIANT", v.name()),
        ("WT", v.weight_code()),
        ("ASUF", v.suffix()),
        ("AT", v.a.name().to_string()),
        ("A_SIZE", v.a.size().to_string()),
        ("A_SHIFT", v.a.size().trailing_zeros().to_string()),
        ("STAGES", STAGES.to_string()),
        ("STAGES_M1", (STAGES - 1).to_string()),
        ("WAIT_PENDING", (STAGES - 2).to_string()),
        (
            "SMEM_BYTES",
            if v.quant() {
                v.smem()
            } else {
                mma_smem_bytes()
            }
            .to_string(),
        ),
        ("MIN_CTAS", v.min_ctas().to_string()),
        ("FF_BK", v.k_tile().to_string()),
        ("FF_WIDEN", ff_widen(v.a)),
        ("AW_CONVERT", aw_convert(v.a, v.dense_dtype())),
    ];
    if v.quant() {
        let (qk, f, a) = (v.k_tile(), v.w, v.a);
        let qh = qk / 2;
        let qfmt = match f {
            WeightFormat::Fp8 { .. } => "fp8 (e4m3 codes, 128 x 128 block scales)",
            WeightFormat::Mxfp4 => "mxfp4 (e2m1 nibbles, e8m0 scales per 32)",
            _ => "int4 (nibbles, group scales, zero points)",
        };
        subs.extend([
            ("QFMT", qfmt.to_string()),
            ("SDT", f.scale_name().unwrap_or("-").to_string()),
            ("QK", qk.to_string()),
            ("QK_M1", (qk - 1).to_string()),
            ("QK_SHIFT", qk.trailing_zeros().to_string()),
            ("QH", qh.to_string()),
            ("QW", (qh / 2).to_string()),
            ("QH_SHIFT", qh.trailing_zeros().to_string()),
            ("QH_PITCH", (qh * FF_PITCH).to_string()),
            ("QB_OFF", (qk * FF_PITCH).to_string()),
            ("QA_KMASK", (16 / a.size() - 1).to_string()),
            ("S_LD", quant::scale_ld(f).to_string()),
            ("S_SIZE", f.scale_size().to_string()),
            ("S_SHIFT", f.scale_size().trailing_zeros().to_string()),
            ("QA_ZERO", quant::qa_zero(a, qh)),
            ("QA_FAST", quant::qa_fast(a, qh)),
            ("QA_SLOW", quant::qa_slow(a, qh)),
            ("QA_STORE", quant::qa_store(a, qh)),
            ("QB_SLOW", quant::qb_slow()),
            ("Q_SCALE", quant::q_scale(f)),
            ("QB_DECODE", quant::qb_decode(f)),
        ]);
    }
    PtxModule::specialise(Stage::ExpertGemm, v.name(), &v.tags(), &subs)
}

/// One expert weight matrix on the device: dense elements or packed quantized bytes.
#[derive(Debug)]
pub enum CudaMatrix {
    /// `[E, N, K]` f32 / f16 / bf16 elements.
    Dense(CudaWeights),
    /// A quantized `[E, N, K]` matrix's codes, scales and zero points.
    Quant(CudaQuant),
}

impl CudaMatrix {
    fn upload(dev: &CudaDevice, w: &Weight, what: &str) -> Result<Self> {
        match w {
            Weight::Dense(t) => Ok(CudaMatrix::Dense(CudaWeights::upload(dev, t)?)),
            Weight::Quant(q) => Ok(CudaMatrix::Quant(CudaQuant::upload(dev, q, what)?)),
        }
    }

    /// The bytes the kernel's `w` parameter points at.
    fn bytes(&self) -> &CudaSlice<u8> {
        match self {
            CudaMatrix::Dense(w) => &w.bytes,
            CudaMatrix::Quant(q) => &q.codes,
        }
    }
}

/// Expert weights on the device: dense weights in their own dtype or quantized ones as their
/// packed bytes, biases as f32 (zeros where the layer has none, so the kernel always adds one).
#[derive(Debug)]
pub struct CudaExperts {
    /// E, H and F.
    pub dims: ExpertDims,
    /// The format of gate_proj and up_proj: picks GEMM 1's kernel variant.
    pub gemm1: WeightFormat,
    /// The format of down_proj: picks GEMM 2's kernel variant.
    pub gemm2: WeightFormat,
    gated: bool,
    gate: Option<CudaMatrix>,
    up: CudaMatrix,
    down: CudaMatrix,
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

/// The formats of GEMM 1 (gate/up) and GEMM 2 (down) of `w`, checked for what one launch
/// needs (gate and up alike: format, group, zero points), and the opt-in of quantized
/// weights (`MOE_CUDA_QUANT`); nothing touches the device.
pub fn gemm_formats(w: &ExpertWeights) -> Result<(WeightFormat, WeightFormat)> {
    let st = Stage::ExpertGemm;
    let up = WeightFormat::of(&w.up, "up_proj")?;
    let down = WeightFormat::of(&w.down, "down_proj")?;
    if let Some(g) = &w.gate {
        let gate = WeightFormat::of(g, "gate_proj")?;
        let layout = |m: &Weight| m.quant().map(|q| q.layout());
        if gate != up || layout(g) != layout(&w.up) {
            return Err(Error::shape(
                st,
                format!(
                    "gate_proj is {} but up_proj is {}; the CUDA kernel reads both in one \
                     launch and needs one format, scale dtype, group and zero-point layout",
                    describe(g, gate),
                    describe(&w.up, up)
                ),
            ));
        }
    }
    for (what, f) in [("up_proj", up), ("down_proj", down)] {
        if f.is_quant() && !crate::cuda::quant_enabled() {
            return Err(quant::not_enabled(what, f));
        }
    }
    Ok((up, down))
}

/// A matrix's format for messages: `bf16`, or `int4 (bf16 scales, group 128, zeros)`.
fn describe(w: &Weight, f: WeightFormat) -> String {
    match (w.quant(), f.scale_name()) {
        (Some(q), Some(s)) => format!(
            "{} ({s} scales, group {}{})",
            f.name(),
            q.group(),
            if q.zeros.is_some() { ", zeros" } else { "" }
        ),
        _ => f.name().to_string(),
    }
}

impl CudaExperts {
    /// Uploads `w` (E experts, or one shared expert as E = 1) for `act`. Quantized matrices
    /// are validated ([`quant::check_matrix`]) and uploaded as their packed bytes; they need
    /// `MOE_CUDA_QUANT=1` (a typed [`Error::BackendUnavailable`] otherwise).
    pub fn upload(dev: &CudaDevice, w: &ExpertWeights, act: Activation) -> Result<Self> {
        let dims = w.dims(act)?;
        let (gemm1, gemm2) = gemm_formats(w)?;
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
            gemm1,
            gemm2,
            gated: act.is_gated(),
            gate: w
                .gate
                .as_ref()
                .map(|g| CudaMatrix::upload(dev, g, "gate_proj"))
                .transpose()?,
            up: CudaMatrix::upload(dev, &w.up, "up_proj")?,
            down: CudaMatrix::upload(dev, &w.down, "down_proj")?,
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
    w0: &'a CudaMatrix,
    w1: &'a CudaMatrix,
    b0: &'a CudaSlice<f32>,
    b1: &'a CudaSlice<f32>,
    n: usize,
    k: usize,
    code: u32,
    alpha: f32,
    limit: f32,
}

/// The quantized operands of a launch: `(w0, w1)` as packed matrices, checked against the
/// GEMM's `[E, n, k]` and against each other (one group and zero-point layout per launch).
fn quant_operands<'a>(
    v: Variant,
    g: &Gemm<'a>,
    experts: usize,
) -> Result<(&'a CudaQuant, &'a CudaQuant)> {
    let st = Stage::ExpertGemm;
    let (CudaMatrix::Quant(q0), CudaMatrix::Quant(q1)) = (g.w0, g.w1) else {
        return Err(Error::shape(
            st,
            format!("{}: the weights are not quantized", v.entry()),
        ));
    };
    for q in [q0, q1] {
        q.check_launch(&v.entry(), experts, g.n, g.k)?;
        if q.shape.format != v.w {
            return Err(Error::shape(
                st,
                format!("{}: weights are {}", v.entry(), q.shape.format.name()),
            ));
        }
    }
    if (q0.shape.group, q0.shape.zeros) != (q1.shape.group, q1.shape.zeros) {
        return Err(Error::shape(
            st,
            "gate_proj and up_proj differ in group or zero points: one launch reads both",
        ));
    }
    Ok((q0, q1))
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
    // Issue 15: the sm_90a wgmma kernel on compute capability 9.x with MOE_CUDA_KERNELS=next,
    // where it applies (kernel chosen per launch by expert_gemm_sm90::choose; else below).
    let a_addr = a.device_ptr(&dev.stream).0;
    if let Some(hv) = crate::cuda::expert_gemm_sm90::choose(dev, v, g.k, a_addr) {
        if let (CudaMatrix::Dense(w0), CudaMatrix::Dense(w1)) = (g.w0, g.w1) {
            let hg = crate::cuda::expert_gemm_sm90::Sm90Gemm {
                w0: &w0.bytes,
                w1: &w1.bytes,
                b0: g.b0,
                b1: g.b1,
                n: g.n,
                k: g.k,
                code: g.code,
                alpha: g.alpha,
                limit: g.limit,
            };
            let experts = w.dims.experts;
            return crate::cuda::expert_gemm_sm90::run(
                dev, hv, &hg, rows, experts, offsets, a, out,
            );
        }
    }
    // MOE_CUDA_KERNELS=next: the weight-streaming decode kernel where it applies (bitwise the
    // same results as this kernel, so the choice by batch size keeps batch invariance). The
    // Hopper kernel above is tried first and its choice does not depend on the row count, so
    // on 9.x a variant it serves is never split between it and the decode kernel by batch size.
    let dense_w = match v.w {
        WeightFormat::Dense(d) => Some(d),
        _ => None,
    };
    if let Some(dv) = crate::cuda::expert_decode::choose(
        dev.kernels,
        dense_w,
        v.a,
        rows,
        w.dims.experts,
        g.k,
        a_addr,
    ) {
        let (CudaMatrix::Dense(w0), CudaMatrix::Dense(w1)) = (g.w0, g.w1) else {
            return Err(Error::shape(
                Stage::ExpertGemm,
                "dense variant with quantized weights",
            ));
        };
        let dg = crate::cuda::expert_decode::DecodeGemm {
            w0: &w0.bytes,
            w1: &w1.bytes,
            b0: g.b0,
            b1: g.b1,
            n: g.n,
            k: g.k,
            code: g.code,
            alpha: g.alpha,
            limit: g.limit,
        };
        return crate::cuda::expert_decode::run(
            dev,
            dv,
            &dg,
            rows,
            w.dims.experts,
            offsets,
            a,
            out,
        );
    }
    // Validate everything before anything is launched.
    let quant_ops = if v.quant() {
        Some(quant_operands(v, &g, w.dims.experts)?)
    } else {
        None
    };
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
    let group = quant_ops.map_or(1, |(q, _)| q.shape.group.max(1));
    let group_u = to_u32(Stage::ExpertGemm, "group", group, u32::MAX as usize)?;
    let zeros_u = u32::from(quant_ops.is_some_and(|(q, _)| q.shape.zeros));
    let mut b = dev.stream.launch_builder(&func);
    b.arg(a)
        .arg(offsets)
        .arg(g.w0.bytes())
        .arg(g.w1.bytes())
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
    if let Some((q0, q1)) = quant_ops {
        // Absent zero points are never read (zeros = 0): the scales stand in as the pointer.
        b.arg(&q0.scales)
            .arg(&q1.scales)
            .arg(q0.zeros.as_ref().unwrap_or(&q0.scales))
            .arg(q1.zeros.as_ref().unwrap_or(&q1.scales))
            .arg(&group_u)
            .arg(&zeros_u);
    }
    // SAFETY: matches the KERNEL header of kernels/expert_gemm.ptx (`expert_gemm_<w>[_a<a>]`
    // of the variant: a, offsets, w0, w1, b0, b1, out, rows, experts, n, k, act, alpha, limit,
    // and for the quantized variants s0, s1, z0, z1, group, zeros). `launch` checked that a
    // holds >= rows*k and out >= rows*n elements of the activation dtype (element-aligned;
    // 16-byte aligned where the dense f32-activation variants' vector loads need it; the
    // quantized ones check alignment on the device) and offsets >= E+1; dense w0/w1 hold
    // [E, n, k] elements of the variant's weight dtype (CudaExperts::upload); quantized w0/w1,
    // s0/s1 and z0/z1 hold the codes, scales and zero points of [E, n, k] matrices of the
    // variant's format with one group and zero-point layout (quant_operands, checked above,
    // on top of quant::check_matrix at upload); b0/b1 [E, n] f32. The kernel clips every row
    // to min(offsets[e+1], rows) and every column/k to n/k, so it stays in bounds for any
    // offset values; LAUNCH: grid = (floor(rows/128) + E) * ceil(n/BNO) blocks of 256 threads,
    // dynamic shared memory v.smem() (0 for the dense ffma kernel; raised above 48 KiB).
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(|e| crate::cuda::context::cuda_err(format!("launching {entry}: {e:?}")))
}

/// An error unless the dense f32-activation variant `v` may read `a` with its vector loads:
/// they run when `k % 4 == 0` (FFMA) or `k % 8 == 0` (tensor cores) and need a 16-byte aligned
/// base (the 16-bit-activation and quantized variants check this on the device and fall back
/// to element loads).
fn check_f32_vector_base(v: Variant, what: &str, a: &ActMeta, k: usize) -> Result<()> {
    let vector = if v.mma() { k % 8 == 0 } else { k % 4 == 0 };
    if v.a == DType::F32 && !v.quant() && vector && !a.aligned(16) {
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
        w: w.gemm1,
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
    let v1 = Variant {
        w: w.gemm1,
        a: dtype,
    };
    let v2 = Variant {
        w: w.gemm2,
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
    check_f32_vector_base(v1, "x_rows", &a_meta, d.hidden)?;
    if d.ffn > 0 {
        check_f32_vector_base(v2, "h", &h_meta, d.ffn)?;
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
    // Both GEMMs' quantized operands are checked before the first launch.
    for (v, g) in [(v1, &gemm1), (v2, &gemm2)] {
        if v.quant() && g.n > 0 {
            quant_operands(v, g, d.experts)?;
        }
    }
    run_gemm(dev, w, v1, gemm1, rows, offsets, &a.bytes, &mut h.bytes)?;
    let h_in = h.bytes.slice(..);
    run_gemm(dev, w, v2, gemm2, rows, offsets, &h_in, &mut y.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of the mma main loop (MM_LOOP up to the final wait), the dense ffma one or the
    /// quantized one.
    fn main_loop(src: &str) -> &str {
        let (start, end) = if src.contains("MM_LOOP:") {
            ("MM_LOOP:", "cp.async.wait_group 0;")
        } else if src.contains("Q_LOOP:") {
            ("Q_LOOP:", "@p_t bra        Q_LOOP;")
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
        let all = variants();
        assert_eq!(m.len(), all.len());
        assert_eq!(
            all.len(),
            DENSE_VARIANTS.len() + 3 * WeightFormat::QUANT.len()
        );
        for (v, module) in all.iter().zip(&m) {
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
            if v.quant() {
                check_quant_module(*v, src, body);
                continue;
            }
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
                (true, a) if WeightFormat::Dense(a) == v.w => {
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

    /// A quantized module: its FFMA main loop reads the packed bytes with one 16-byte load
    /// (plus the byte-load fallback), decodes its format and nothing of the dense kernels.
    fn check_quant_module(v: Variant, src: &str, body: &str) {
        let name = v.name();
        assert!(
            src.contains(".extern .shared .align 16 .b8 smem[];"),
            "{name}"
        );
        assert!(src.contains(".minnctapersm 1"), "{name}");
        assert!(src.contains(".param .u32 prm_zeros"), "{name}");
        for gone in ["FF_LOOP", "MM_LOOP", "mma.sync", "cp.async", "smem[34816]"] {
            assert!(!src.contains(gone), "{name} has {gone}");
        }
        // The packed chunk: one 16-byte load, or 16 byte loads when rows are not 16-byte.
        let v4 = "@p_u ld.global.nc.v4.u32 {r_q0, r_q1, r_q2, r_q3}, [d_pb];";
        assert_eq!(body.matches(v4).count(), 1, "{name}");
        assert_eq!(body.matches("ld.global.nc.u8 r_t").count(), 16, "{name}");
        // The shared FFMA k-step loop over QK k rows.
        assert!(body.contains(&format!("setp.lt.u32     p_t, r_k8, {};", v.k_tile())));
        assert_eq!(body.matches("fma.rn.f32").count(), 64, "{name}");
        // Activations: 16-byte pieces of QH values per thread and tile.
        let qh = v.k_tile() / 2;
        let a_loads = qh * v.a.size() / 16;
        let a_v4 = match v.a {
            DType::F32 => "ld.global.nc.v4.f32 {f_la",
            _ => "ld.global.nc.v4.b32 {r_xa",
        };
        assert_eq!(body.matches(a_v4).count(), a_loads, "{name}");
        let (decode, per_chunk) = match v.w {
            WeightFormat::Fp8 { .. } => ("mul.rn.f32      f_w, f_w, 0f7B800000;", 16),
            WeightFormat::Mxfp4 => ("mul.rn.f32      f_w, f_w, 0f7E800000;", 32),
            _ => ("cvt.rn.f32.s32  f_w, r_m;", 64), // both INT4 decode blocks
        };
        assert_eq!(body.matches(decode).count(), per_chunk, "{name}");
        let scale = match v.w.scale_name() {
            Some("f32") => "mov.b32         f_sc, r_scr;",
            Some("bf16") => "shl.b32         r_t0, r_scr, 16;",
            Some("f16") => "cvt.f32.f16     f_sc, h_sc;",
            _ => "selp.b32        r_t0, 0x00400000, r_t0, p_t;",
        };
        assert!(body.contains(scale), "{name}");
        if v.a == DType::F32 {
            assert!(src.contains("st.global.f32   [d_t], f_h;"), "{name}");
        } else {
            let cvt = format!("cvt.rn.{}.f32 h_o, f_h;", v.a.name());
            assert!(src.contains(&cvt), "{name}");
        }
    }

    #[test]
    fn variant_names_entries_and_tags() {
        let v = Variant {
            w: WeightFormat::Dense(DType::BF16),
            a: DType::BF16,
        };
        assert_eq!(
            (v.name(), v.entry()),
            (
                "expert_gemm.bf16.abf16".into(),
                "expert_gemm_bf16_abf16".into()
            )
        );
        assert_eq!(v.tags(), ["mma", "dense", "a16", "acp"]);
        let v = dense(DType::F16, DType::BF16);
        assert_eq!(v.tags(), ["mma", "dense", "a16", "awide"]);
        let v = dense(DType::F32, DType::F16);
        assert_eq!(
            (v.name(), v.entry()),
            ("expert_gemm.f32.af16".into(), "expert_gemm_f32_af16".into())
        );
        assert_eq!(v.tags(), ["ffma", "dense", "a16"]);
        let v = dense(DType::F16, DType::F32);
        assert_eq!(
            (v.name(), v.entry()),
            ("expert_gemm.f16".into(), "expert_gemm_f16".into())
        );
        assert_eq!(v.tags(), ["mma", "dense", "a32"]);
        let v = Variant {
            w: WeightFormat::Fp8 { scale: DType::BF16 },
            a: DType::F32,
        };
        assert_eq!(
            (v.name(), v.entry()),
            (
                "expert_gemm.fp8.sbf16".into(),
                "expert_gemm_fp8_sbf16".into()
            )
        );
        assert_eq!(v.tags(), ["ffma", "quant", "a32", "fp8"]);
        assert_eq!((v.k_tile(), v.smem(), v.min_ctas()), (32, 34816, 1));
        let v = Variant {
            w: WeightFormat::Mxfp4,
            a: DType::F16,
        };
        assert_eq!(
            (v.name(), v.entry()),
            (
                "expert_gemm.mxfp4.se8m0.af16".into(),
                "expert_gemm_mxfp4_se8m0_af16".into()
            )
        );
        assert_eq!(v.tags(), ["ffma", "quant", "a16", "mxfp4"]);
        assert_eq!((v.k_tile(), v.smem()), (64, 67584));
        let v = Variant {
            w: WeightFormat::Int4 { scale: DType::F16 },
            a: DType::BF16,
        };
        assert_eq!(v.entry(), "expert_gemm_int4_sf16_abf16");
        let all = variants();
        for w in DType::ALL {
            for a in DType::ALL {
                assert!(all.contains(&dense(w, a)), "{w} {a}");
            }
        }
        for w in WeightFormat::QUANT {
            for a in DType::ALL {
                assert!(all.contains(&Variant { w, a }), "{w:?} {a}");
            }
        }
    }

    /// Every quantized module assembles with ptxas for sm_80 and sm_90 without spills
    /// (`-v --warn-on-spills -Werror`), when ptxas is found: `$PTXAS`, or the copy
    /// scripts/sass-check.sh and CI cache under `~/.cache/moe-kernels/`. Skipped (and said so)
    /// without it; CI assembles every module of `moe ptx --dump` in any case.
    #[test]
    fn quantized_modules_assemble_with_ptxas() {
        let cached = std::env::var_os("XDG_CACHE_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
            .map(|c| c.join("moe-kernels/nvcc-12.9.86/nvidia/cuda_nvcc/bin/ptxas"));
        let Some(ptxas) = std::env::var_os("PTXAS")
            .map(std::path::PathBuf::from)
            .or(cached)
            .filter(|p| p.is_file())
        else {
            println!("expert_gemm: no ptxas ($PTXAS or the sass-check cache), check skipped");
            return;
        };
        let dir = std::env::temp_dir().join(format!("moe-quant-ptx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut n = 0;
        for v in variants().into_iter().filter(|v| v.quant()) {
            let path = dir.join(format!("{}.ptx", v.name()));
            std::fs::write(&path, module(v).unwrap().source).unwrap();
            for arch in ["sm_80", "sm_90"] {
                let out = std::process::Command::new(&ptxas)
                    .args(["-v", "--warn-on-spills", "-Werror"])
                    .arg(format!("-arch={arch}"))
                    .arg(&path)
                    .args(["-o", "/dev/null"])
                    .output()
                    .unwrap();
                let log = String::from_utf8_lossy(&out.stderr);
                assert!(out.status.success(), "{} {arch}: {log}", v.name());
                assert!(
                    log.contains("0 bytes spill stores"),
                    "{} {arch}: {log}",
                    v.name()
                );
                n += 1;
            }
        }
        std::fs::remove_dir_all(&dir).ok();
        println!("expert_gemm: {n} quantized module builds passed ptxas");
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
            let w = v.dense_dtype();
            if w == DType::BF16 || v.a == DType::BF16 {
                1e-2
            } else if w == DType::F16 || v.a == DType::F16 {
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
                for v in DENSE_VARIANTS {
                    let mut t =
                        |shape: &[usize], sc: f32| g.tensor(shape, sc).cast(v.dense_dtype());
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

    /// Without `MOE_CUDA_QUANT=1`, quantized weights are refused for CUDA with the typed
    /// error naming the variable (no device needed); with it, their formats come back.
    #[test]
    fn quantized_weights_need_the_opt_in() {
        use crate::quant::encode::quantize;
        use crate::quant::{QuantFormat, QuantSpec};
        let mut g = crate::synth::Gen::new(41);
        let q =
            |t: Tensor| Weight::Quant(quantize(&t, &QuantSpec::new(QuantFormat::Mxfp4)).unwrap());
        let w = ExpertWeights {
            gate: None,
            up: q(g.tensor(&[2, 8, 64], 0.5)),
            down: g.tensor(&[2, 64, 8], 0.5).into(),
            gate_bias: None,
            up_bias: None,
            down_bias: None,
        };
        match gemm_formats(&w) {
            Ok(f) => {
                assert!(crate::cuda::quant_enabled());
                assert_eq!(f, (WeightFormat::Mxfp4, WeightFormat::Dense(DType::F32)));
            }
            Err(e) => {
                assert!(!crate::cuda::quant_enabled());
                assert!(matches!(e, Error::BackendUnavailable { .. }), "{e}");
                let msg = e.to_string();
                assert!(msg.contains("up_proj is mxfp4"), "{msg}");
                assert!(msg.contains("set MOE_CUDA_QUANT=1"), "{msg}");
            }
        }
        // Gate and up in one launch must agree (here: fp8 gate, mxfp4 up).
        let mut w2 = w.clone();
        w2.gate = Some(Weight::Quant(
            quantize(
                &g.tensor(&[2, 8, 64], 0.5),
                &QuantSpec::new(QuantFormat::Fp8Block),
            )
            .unwrap(),
        ));
        let msg = gemm_formats(&w2).unwrap_err().to_string();
        assert!(msg.contains("gate_proj is fp8"), "{msg}");
    }

    /// On a CUDA device with `MOE_CUDA_QUANT=1` (skipped otherwise, and said so): every
    /// quantized format (FP8 with f32 / bf16 / f16 scales, MXFP4, INT4 with each scale dtype,
    /// with and without zero points, G a multiple of 32 and not) with every activation dtype,
    /// gated and not, against the CPU reference on the same packed weights; K not a multiple
    /// of 16 (FP8 byte loads), an odd K (INT4), an empty expert, dropped rows left unwritten,
    /// and a 16-bit activation base that is not 16-byte aligned (element loads).
    #[test]
    fn quantized_variants_match_cpu_reference_on_device() {
        use crate::cpu::expert_gemm::expert_ffn_stored;
        use crate::quant::encode::quantize;
        use crate::quant::{QuantFormat, QuantSpec};
        if !crate::cuda::quant_enabled() {
            println!("expert_gemm: MOE_CUDA_QUANT is not set, quantized device test skipped");
            return;
        }
        let Ok(dev) = CudaDevice::new(0) else {
            println!("expert_gemm: no CUDA device, quantized device test skipped");
            return;
        };
        let mut g = crate::synth::Gen::new(31);
        let tol = |a: DType| match a {
            DType::BF16 => 1e-2,
            DType::F16 => 5e-3,
            DType::F32 => 2e-5,
        };
        let spec = |format, scale_dtype, group, zeros| QuantSpec {
            format,
            scale_dtype,
            group,
            zeros,
        };
        let (fp8, mx, int4) = (QuantFormat::Fp8Block, QuantFormat::Mxfp4, QuantFormat::Int4);
        // (spec, [(E, F, H, rows, kept)]): F and H as the format allows (MXFP4: multiples of
        // 32; INT4: divisible by the group), expert 1 empty where E = 3.
        let cases = [
            (
                spec(fp8, DType::F32, None, false),
                vec![(3, 40, 64, 300, 290), (2, 24, 13, 9, 9)],
            ),
            (
                spec(fp8, DType::BF16, None, false),
                vec![(3, 136, 200, 130, 130)],
            ),
            (
                spec(fp8, DType::F16, None, false),
                vec![(3, 40, 64, 37, 30)],
            ),
            (
                spec(mx, DType::F32, None, false),
                vec![(3, 96, 64, 300, 290), (1, 32, 32, 3, 3)],
            ),
            (
                spec(int4, DType::BF16, Some(32), true),
                vec![(3, 96, 64, 150, 140)],
            ),
            (
                spec(int4, DType::F16, Some(25), false),
                vec![(2, 50, 50, 20, 17)],
            ),
            (
                spec(int4, DType::F32, Some(13), true),
                vec![(2, 26, 13, 9, 9)],
            ),
            (
                spec(int4, DType::BF16, Some(31), true),
                vec![(2, 62, 31, 10, 10)],
            ),
            (
                spec(int4, DType::F16, Some(8), true),
                vec![(3, 40, 64, 37, 30)],
            ),
        ];
        let mut ran = 0;
        for (sp, shapes) in &cases {
            for &(e, f, h, rows, kept) in shapes {
                let mut offsets: Vec<u32> = (0..=e).map(|i| (kept * i / e) as u32).collect();
                if e >= 3 {
                    offsets[2] = offsets[1];
                }
                let od = dev.upload(&offsets).unwrap();
                for act in [Activation::Swiglu, Activation::Gelu] {
                    let mut qt = |shape: &[usize], sc: f32| {
                        let k = shape[2];
                        let s = QuantSpec {
                            group: sp.group.map(|gr| gr.min(k)),
                            ..*sp
                        };
                        Weight::Quant(quantize(&g.tensor(shape, sc), &s).unwrap())
                    };
                    let w = ExpertWeights {
                        gate: act.is_gated().then(|| qt(&[e, f, h], 0.4)),
                        up: qt(&[e, f, h], 0.4),
                        down: qt(&[e, h, f], 0.3),
                        gate_bias: act.is_gated().then(|| g.tensor(&[e, f], 0.1)),
                        up_bias: Some(g.tensor(&[e, f], 0.1)),
                        down_bias: Some(g.tensor(&[e, h], 0.1)),
                    };
                    let cw = CudaExperts::upload(&dev, &w, act).unwrap();
                    for a_dt in DType::ALL {
                        let x = g.tensor(&[rows, h], 1.0).cast(a_dt);
                        let xb = crate::cuda::act::tensor_bytes(&x);
                        let x64 = crate::cuda::act::bytes_to_f64(&xb, a_dt);
                        let want =
                            expert_ffn_stored(&x64, &offsets, &w, act, |y| a_dt.round(y)).unwrap();
                        let size = a_dt.size();
                        let mut shifted = vec![0u8; size];
                        shifted.extend_from_slice(&xb);
                        let bufs = [dev.upload(&xb).unwrap(), dev.upload(&shifted).unwrap()];
                        for (i, buf) in bufs.iter().enumerate() {
                            let a = ActView {
                                bytes: buf.slice(i * size..),
                                dtype: a_dt,
                            };
                            let mut hb = dev.upload(&vec![0xFFu8; rows * f * size]).unwrap();
                            let mut yb = dev.upload(&vec![0xFFu8; rows * h * size]).unwrap();
                            let mut hv = ActViewMut {
                                bytes: hb.slice_mut(..),
                                dtype: a_dt,
                            };
                            let mut yv = ActViewMut {
                                bytes: yb.slice_mut(..),
                                dtype: a_dt,
                            };
                            let ctx = format!(
                                "{:?}/{:?} a{a_dt} {act:?} E={e} F={f} H={h} rows={rows} shift={i}",
                                cw.gemm1, cw.gemm2
                            );
                            launch(&dev, &a, rows, &od, &cw, act, &mut hv, &mut yv)
                                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                            let got = crate::cuda::act::bytes_to_f64(
                                &dev.read(&yb, rows * h * size).unwrap(),
                                a_dt,
                            );
                            let err = rel_l2(&got[..kept * h], &want[..kept * h]);
                            assert!(err <= tol(a_dt), "{ctx}: rel L2 {err:e}");
                            assert!(
                                got[kept * h..].iter().all(|y| y.is_nan()),
                                "{ctx}: dropped rows"
                            );
                            ran += 1;
                        }
                    }
                }
            }
        }
        println!(
            "expert_gemm: {ran} quantized device checks ran on {}",
            dev.name
        );
    }
}
