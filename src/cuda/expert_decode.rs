//! Stage 3 for small batches on CUDA (kernels/expert_decode.ptx, opt-in
//! `MOE_CUDA_KERNELS=next`): the weight-streaming expert GEMM. A block owns at most 32 rows of
//! one expert and 64 weight rows, and streams those weight rows over the whole K once through a
//! deep `cp.async` ring, so at decode every weight byte is read once for all of its expert's
//! rows, with many 16-byte copies in flight per thread (split-N over many blocks, never
//! split-K).
//!
//! It computes bitwise what the tiled kernel (kernels/expert_gemm.ptx) computes: the same
//! mma.sync k16 steps (or the same f32 fma chain) per output, in the same k order, and the
//! tiled kernel's own epilogue code (pasted in from that template). So choosing it by batch
//! size ([`choose`]: at most [`ROWS_PER_EXPERT`] routed rows per expert on average) keeps
//! batch invariance. Dense weights only (f32, f16, bf16) with `K % 8 == 0` and a 16-byte
//! aligned activation base; everything else (quantized formats included) runs the verified
//! tiled kernel.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};

use crate::backend::BackendKind;
use crate::cuda::context::{drv, to_u32};
use crate::cuda::expert_gemm::widen_pair;
use crate::cuda::ptx::PtxModule;
use crate::cuda::{CudaDevice, KernelSet};
use crate::error::Result;
use crate::limits::{self, Resource};
use crate::stage::Stage;
use crate::tensor::DType;

/// The template, embedded at build time.
const TEMPLATE: &str = include_str!("../../kernels/expert_decode.ptx");
/// Rows per block: one chunk of an expert's rows.
pub const BM: usize = 32;
/// The decode kernel runs when `rows <= ROWS_PER_EXPERT · E`: at most this many routed rows
/// per expert on average (the decode regime, T <= 32 rows per expert).
pub const ROWS_PER_EXPERT: usize = 32;
/// Threads per block.
const THREADS: u32 = 128;
/// Ring depth of the tensor-core variants (4 KiB of weights per stage).
const MMA_STAGES: usize = 8;
/// Ring depth of the f32-weight variants (9 KiB of weights per stage).
const FFMA_STAGES: usize = 6;
/// Bytes of the epilogue tile C[32][68] f32.
const EPILOGUE_BYTES: usize = 32 * 68 * 4;
/// Bytes of the converted activation tile [32][64 B] (mma with A != W).
const CONV_BYTES: usize = 32 * 64;

/// One module variant: weight dtype `w` (dense), activation dtype `a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeVariant {
    /// Weight dtype.
    pub w: DType,
    /// Activation dtype (x, h, y).
    pub a: DType,
}

impl DecodeVariant {
    /// Every variant, f32 activations first.
    pub fn all() -> Vec<DecodeVariant> {
        let mut v = Vec::new();
        for a in [DType::F32, DType::F16, DType::BF16] {
            for w in [DType::F32, DType::BF16, DType::F16] {
                v.push(DecodeVariant { w, a });
            }
        }
        v
    }

    /// Module name: `expert_decode.<w>` (f32 activations) or `expert_decode.<w>.a<a>`.
    pub fn name(self) -> String {
        match self.a {
            DType::F32 => format!("expert_decode.{}", self.w.name()),
            a => format!("expert_decode.{}.a{}", self.w.name(), a.name()),
        }
    }

    /// Kernel entry: `expert_decode_<w>` or `expert_decode_<w>_a<a>`.
    pub fn entry(self) -> String {
        self.name().replace('.', "_")
    }

    /// Tensor cores (16-bit weights) rather than FFMA.
    fn mma(self) -> bool {
        self.w != DType::F32
    }

    /// The template sections this variant keeps.
    fn tags(self) -> Vec<&'static str> {
        let mut t = vec![if self.mma() { "mma" } else { "ffma" }];
        t.push(if self.a == DType::F32 { "a32" } else { "a16" });
        if self.mma() {
            t.push(if self.a == self.w { "acp" } else { "aconv" });
        }
        t
    }

    fn stages(self) -> usize {
        if self.mma() {
            MMA_STAGES
        } else {
            FFMA_STAGES
        }
    }

    /// Bytes of the weight part of a ring stage: 64 rows of 64 B (mma) or 144 B (ffma).
    fn stage_w(self) -> usize {
        if self.mma() {
            64 * 64
        } else {
            64 * 144
        }
    }

    /// Bytes of one ring stage: weights, then 32 activation rows of 32 elements.
    fn stage_bytes(self) -> usize {
        self.stage_w() + 32 * 32 * self.a.size()
    }

    /// Offset of the converted activation tile (mma with A != W).
    fn conv_offset(self) -> usize {
        self.stages() * self.stage_bytes()
    }

    /// Dynamic shared memory of a launch.
    pub fn smem(self) -> usize {
        let ring = self.conv_offset()
            + if self.mma() && self.a != self.w {
                CONV_BYTES
            } else {
                0
            };
        ring.max(EPILOGUE_BYTES)
    }
}

/// CONVERT (mma, A != W): the thread's 8 raw activations at [r_t0] to 4 W pairs r_pk0..3.
fn convert(v: DecodeVariant) -> String {
    let w = v.w.name();
    let mut out = Vec::new();
    match v.a {
        DType::F32 => {
            out.push("ld.shared.v4.f32 {f_x0, f_x1, f_x2, f_x3}, [r_t0];".to_string());
            out.push("ld.shared.v4.f32 {f_x4, f_x5, f_x6, f_x7}, [r_t0+16];".to_string());
            for i in 0..4 {
                out.push(format!(
                    "cvt.rn.{w}x2.f32 r_pk{i}, f_x{}, f_x{};",
                    2 * i + 1,
                    2 * i
                ));
            }
        }
        a => {
            out.push("ld.shared.v4.b32 {r_x0, r_x1, r_x2, r_x3}, [r_t0];".to_string());
            for i in 0..4 {
                out.extend(widen_pair(
                    a,
                    &format!("r_x{i}"),
                    "f_w0",
                    "f_w1",
                    ("h_a0", "h_a1"),
                    "r_t1",
                ));
                out.push(format!("cvt.rn.{w}x2.f32 r_pk{i}, f_w1, f_w0;"));
            }
        }
    }
    out.join("\n    ")
}

/// FF_GROUP0 / FF_GROUP1 (ffma): 8 chunk rows `first..first + 8` of 4 k each: load the row's 4
/// activations (widened when 16-bit), four fma.rn into its accumulator, k in order.
fn ff_group(a: DType, first: usize) -> String {
    let pitch = 32 * a.size();
    let mut out = Vec::new();
    for r in first..first + 8 {
        let off = r * pitch;
        match a {
            DType::F32 => out.push(format!(
                "    ld.shared.v4.f32 {{f_a0, f_a1, f_a2, f_a3}}, [r_t3+{off}];"
            )),
            _ => {
                out.push(format!(
                    "    ld.shared.v2.b32 {{r_x0, r_x1}}, [r_t3+{off}];"
                ));
                for (word, lo, hi) in [("r_x0", "f_a0", "f_a1"), ("r_x1", "f_a2", "f_a3")] {
                    for l in widen_pair(a, word, lo, hi, ("h_x0", "h_x1"), "r_t1") {
                        out.push(format!("    {l}"));
                    }
                }
            }
        }
        for j in 0..4 {
            out.push(format!(
                "    fma.rn.f32      f_acc{r}, f_a{j}, f_w{j}, f_acc{r};"
            ));
        }
    }
    out.join("\n")
}

/// The tiled kernel's activation code: the lines of kernels/expert_gemm.ptx after `EPI_ACT:`
/// up to and including `ACT_END:` (one definition of every activation for both kernels).
pub fn activation_code() -> Result<String> {
    let src = crate::cuda::ptx::template(Stage::ExpertGemm);
    let err = |what: &str| {
        crate::error::Error::shape(
            Stage::ExpertGemm,
            format!("kernels/expert_gemm.ptx: {what} (the decode kernel pastes its activation)"),
        )
    };
    let start = src
        .find("\nEPI_ACT:\n")
        .ok_or_else(|| err("no EPI_ACT: label"))?
        + 10;
    let len = src[start..]
        .find("\nACT_END:\n")
        .ok_or_else(|| err("no ACT_END: label after EPI_ACT:"))?;
    let text = &src[start..start + len + 9];
    if text.contains("${") || text.contains("//@") {
        return Err(err(
            "the activation code holds a placeholder or section marker",
        ));
    }
    Ok(text.to_string())
}

/// The module of variant `v`.
fn module(v: DecodeVariant, activation: &str) -> Result<PtxModule> {
    let s = v.stages();
    let subs = vec![
        ("VARIANT", v.name()),
        ("ENTRY", v.entry()),
        ("WT", v.w.name().to_string()),
        ("AT", v.a.name().to_string()),
        ("A_SIZE", v.a.size().to_string()),
        ("A_SHIFT", v.a.size().trailing_zeros().to_string()),
        ("STAGES", s.to_string()),
        ("STAGES_M1", (s - 1).to_string()),
        ("WAIT_PENDING", (s - 2).to_string()),
        ("ST_BYTES", v.stage_bytes().to_string()),
        ("ST_A", v.stage_w().to_string()),
        ("CONV", v.conv_offset().to_string()),
        ("SMEM_BYTES", v.smem().to_string()),
        ("A_ROW", (32 * v.a.size()).to_string()),
        ("A_CHUNK", (8 * v.a.size()).to_string()),
        (
            "A_COPIES",
            if v.a == DType::F32 { "2" } else { "1" }.to_string(),
        ),
        ("CONVERT", convert(v)),
        // ffma: A rows of 32 A_SIZE bytes; half h starts at row 16 h.
        (
            "FF_HALF_SHIFT",
            (16 * 32 * v.a.size()).trailing_zeros().to_string(),
        ),
        ("FF_A_STEP", (4 * v.a.size()).to_string()),
        ("FF_GROUP0", ff_group(v.a, 0)),
        ("FF_GROUP1", ff_group(v.a, 8)),
        ("ACTIVATION", activation.to_string()),
    ];
    PtxModule::from_template(Stage::ExpertGemm, TEMPLATE, v.name(), &v.tags(), &subs)
}

/// Every module variant of the decode kernel.
pub fn modules() -> Result<Vec<PtxModule>> {
    let act = activation_code()?;
    DecodeVariant::all()
        .into_iter()
        .map(|v| module(v, &act))
        .collect()
}

/// The decode variant for one GEMM launch, or `None` for the verified tiled kernel: the
/// `next` kernel set, dense weights of `w`, activations `a`, `rows <= 32 E`, `K % 8 == 0`
/// (16-byte copies that never straddle K) and a 16-byte aligned activation base `a_addr`.
pub fn choose(
    kernels: KernelSet,
    w: Option<DType>,
    a: DType,
    rows: usize,
    experts: usize,
    k: usize,
    a_addr: u64,
) -> Option<DecodeVariant> {
    let w = w?;
    let fits = rows <= ROWS_PER_EXPERT.saturating_mul(experts);
    (kernels == KernelSet::Next && fits && k % 8 == 0 && a_addr % 16 == 0)
        .then_some(DecodeVariant { w, a })
}

/// The operands of one decode launch: `out [rows, n] = act(a [rows, k] · w{0,1}ᵀ + b{0,1})`.
pub struct DecodeGemm<'a> {
    /// `[E, n, k]` weights of the variant's dtype (gate or up / down).
    pub w0: &'a CudaSlice<u8>,
    /// `[E, n, k]` up weights of a gated GEMM 1 (else `w0` again).
    pub w1: &'a CudaSlice<u8>,
    /// `[E, n]` f32 bias of `w0`.
    pub b0: &'a CudaSlice<f32>,
    /// `[E, n]` f32 bias of `w1`.
    pub b1: &'a CudaSlice<f32>,
    /// Output columns.
    pub n: usize,
    /// Reduction length.
    pub k: usize,
    /// Activation code (kernels/expert_gemm.ptx header), 0 for GEMM 2.
    pub code: u32,
    /// Clamped-SwiGLU alpha.
    pub alpha: f32,
    /// Clamped-SwiGLU limit.
    pub limit: f32,
}

/// The grid of a launch: `(floor(rows / 32) + E) · ceil(n / BNO)` blocks, BNO = 32 gated, else
/// 64 (checked against the grid limit).
pub fn grid_blocks(rows: usize, experts: usize, n: usize, gated: bool) -> Result<u64> {
    let bno = if gated { 32 } else { 64 };
    let blocks = limits::product(&[rows / BM + experts, n.div_ceil(bno)]);
    limits::check(
        BackendKind::Cuda,
        Resource::GridSize,
        || format!("{}: the decode GEMM's grid", Stage::ExpertGemm),
        blocks,
        i32::MAX as u64,
    )?;
    Ok(blocks)
}

/// Launches variant `v` on `a [rows, k]` (the caller checked dtypes, lengths and that
/// `v` came from [`choose`] for this launch).
#[allow(clippy::too_many_arguments)]
pub fn run(
    dev: &CudaDevice,
    v: DecodeVariant,
    g: &DecodeGemm<'_>,
    rows: usize,
    experts: usize,
    offsets: &CudaSlice<u32>,
    a: &CudaView<'_, u8>,
    out: &mut CudaViewMut<'_, u8>,
) -> Result<()> {
    if g.n == 0 || rows == 0 {
        return Ok(());
    }
    let st = Stage::ExpertGemm;
    if g.k % 8 != 0 || a.device_ptr(&dev.stream).0 % 16 != 0 {
        return Err(crate::error::Error::shape(
            st,
            format!(
                "{}: needs K % 8 == 0 and a 16-byte aligned activation base",
                v.entry()
            ),
        ));
    }
    let blocks = grid_blocks(rows, experts, g.n, g.code >= 3)?;
    let entry = v.entry();
    let func = dev.function(st, &v.name(), &entry)?;
    let smem = v.smem();
    drv(
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        ),
        "raising the decode GEMM's shared memory limit",
    )?;
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let rows_u = to_u32(st, "rows", rows, u32::MAX as usize)?;
    let experts_u = to_u32(st, "E", experts, u32::MAX as usize)?;
    let n_u = to_u32(st, "N", g.n, u32::MAX as usize)?;
    let k_u = to_u32(st, "K", g.k, u32::MAX as usize)?;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(a)
        .arg(offsets)
        .arg(g.w0)
        .arg(g.w1)
        .arg(g.b0)
        .arg(g.b1)
        .arg(out)
        .arg(&rows_u)
        .arg(&experts_u)
        .arg(&n_u)
        .arg(&k_u)
        .arg(&g.code)
        .arg(&g.alpha)
        .arg(&g.limit);
    // SAFETY: matches the KERNEL header of kernels/expert_decode.ptx (`expert_decode_<w>[_a<a>]`:
    // a, offsets, w0, w1, b0, b1, out, rows, experts, n, k, act, alpha, limit). The caller
    // (expert_gemm::launch) checked that a holds >= rows*k and out >= rows*n elements of the
    // activation dtype and offsets >= E+1; w0/w1 hold [E, n, k] elements of the variant's
    // weight dtype and b0/b1 [E, n] f32 (CudaExperts::upload); K % 8 == 0 and a's 16-byte
    // alignment were checked above, so every 16-byte cp.async is aligned and inside its row.
    // The kernel clips rows to min(offsets[e+1], rows) and columns / k to n / k for any offset
    // values. LAUNCH: grid_blocks blocks of 128 threads, v.smem() bytes of dynamic shared
    // memory (the attribute raised above).
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(|e| crate::cuda::context::cuda_err(format!("launching {entry}: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_renders_with_the_tiled_activation() {
        let m = modules().unwrap();
        let all = DecodeVariant::all();
        assert_eq!(m.len(), 9);
        let act = activation_code().unwrap();
        assert!(act.contains("ACT_NOT_RELU:") && act.contains("ACT_SIGMOID:"));
        assert!(act.trim_end().ends_with("ACT_END:"), "{act}");
        for (v, module) in all.iter().zip(&m) {
            let src = &module.source;
            let name = &module.variant;
            assert_eq!(*name, v.name());
            assert!(src.is_ascii() && !src.contains("${"), "{name}");
            assert!(src.contains(&format!(".entry {}(", v.entry())), "{name}");
            assert!(
                src.contains(&act),
                "{name}: the tiled kernel's activation code"
            );
            let cp = src.matches("cp.async.cg.shared.global").count();
            if v.mma() {
                let mma = format!("mma.sync.aligned.m16n8k16.row.col.f32.{0}.{0}.f32", v.w);
                assert_eq!(src.matches(&mma).count(), 4, "{name}");
                // weights 2, activations 1 (acp / 16-bit raw) or 2 (f32 raw)
                let want = if v.a == DType::F32 { 4 } else { 3 };
                assert_eq!(cp, want, "{name}");
                assert!(!src.contains("fma.rn.f32      f_acc"), "{name}");
                if v.a == v.w {
                    assert!(!src.contains("x2.f32"), "{name}: A = W converts nothing");
                } else {
                    let cvt = format!("cvt.rn.{}x2.f32 r_pk3,", v.w);
                    assert!(src.contains(&cvt), "{name}");
                }
            } else {
                assert!(!src.contains("mma.sync.aligned"), "{name}");
                assert_eq!(src.matches("fma.rn.f32      f_acc").count(), 64, "{name}");
                let want = if v.a == DType::F32 { 6 } else { 5 };
                assert_eq!(cp, want, "{name}");
            }
            if v.a == DType::F32 {
                assert!(src.contains("st.global.f32   [d_t], f_h;"), "{name}");
            } else {
                let cvt = format!("cvt.rn.{}.f32 h_o, f_h;", v.a);
                assert!(src.contains(&cvt), "{name}");
            }
            assert!(v.smem() <= 227 * 1024, "{name}");
        }
    }

    #[test]
    fn the_decode_kernel_is_chosen_only_where_it_applies() {
        let (n, bf) = (KernelSet::Next, Some(DType::BF16));
        let v = choose(n, bf, DType::BF16, 2, 8, 4096, 256).unwrap();
        assert_eq!(v.entry(), "expert_decode_bf16_abf16");
        assert_eq!(v.tags(), ["mma", "a16", "acp"]);
        // 32 rows per expert on average is the boundary.
        assert!(choose(n, bf, DType::BF16, 256, 8, 4096, 0).is_some());
        assert!(choose(n, bf, DType::BF16, 257, 8, 4096, 0).is_none());
        // The verified set, quantized weights, K % 8 != 0, an unaligned base: the tiled kernel.
        assert!(choose(KernelSet::Verified, bf, DType::BF16, 2, 8, 4096, 0).is_none());
        assert!(choose(n, None, DType::BF16, 2, 8, 4096, 0).is_none());
        assert!(choose(n, bf, DType::BF16, 2, 8, 4100, 0).is_none());
        assert!(choose(n, bf, DType::BF16, 2, 8, 4096, 8).is_none());
        let f = choose(n, Some(DType::F32), DType::F16, 1, 1, 8, 0).unwrap();
        assert_eq!(
            (f.name(), f.tags()),
            ("expert_decode.f32.af16".into(), vec!["ffma", "a16"])
        );
        let c = choose(n, bf, DType::F32, 1, 1, 8, 0).unwrap();
        assert_eq!(c.tags(), ["mma", "a32", "aconv"]);
    }

    #[test]
    fn grids_and_shared_memory() {
        // Mixtral decode: T = 1, top-2, E = 8: 8 row tiles; F = 14336 gated: 448 column tiles.
        assert_eq!(grid_blocks(2, 8, 14336, true).unwrap(), 8 * 448);
        assert_eq!(grid_blocks(2, 8, 4096, false).unwrap(), 8 * 64);
        assert_eq!(grid_blocks(64, 1, 100, false).unwrap(), 3 * 2);
        let bf = DecodeVariant {
            w: DType::BF16,
            a: DType::BF16,
        };
        assert_eq!(bf.smem(), 8 * (4096 + 2048));
        let conv = DecodeVariant {
            w: DType::BF16,
            a: DType::F32,
        };
        assert_eq!(conv.smem(), 8 * (4096 + 4096) + 2048);
        let ff = DecodeVariant {
            w: DType::F32,
            a: DType::F32,
        };
        assert_eq!(ff.smem(), 6 * (9216 + 4096));
    }

    /// On a CUDA device (skipped without one): every decode variant gives bitwise the tiled
    /// kernel's h and y (so choosing it by batch size keeps batch invariance), both within the
    /// reference's tolerance, gated and not, one and two 32-row chunks per expert, an empty
    /// expert, dropped rows left unwritten; and a layer's GEMM 2 input (h) that the decode
    /// kernel reads from the same scratch.
    #[test]
    fn decode_is_bitwise_the_tiled_kernel_on_device() {
        use crate::config::Activation;
        use crate::cpu::expert_gemm::{expert_ffn_stored, ExpertWeights};
        use crate::cuda::act::{ActView, ActViewMut};
        use crate::cuda::expert_gemm::{launch, CudaExperts};
        let Ok(mut dev) = CudaDevice::new(0) else {
            println!("expert_decode: no CUDA device, device test skipped");
            return;
        };
        let mut g = crate::synth::Gen::new(57);
        let rel = |got: &[f64], want: &[f64]| {
            let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
            let den: f64 = want.iter().map(|b| b * b).sum();
            (num / den.max(f64::MIN_POSITIVE)).sqrt()
        };
        // (E, F, H, rows, offsets): 15 / 0 / 15 rows; 20 / 30 (m tile 1); 45 (two chunks) / 40.
        let cases: [(usize, usize, usize, usize, Vec<u32>); 3] = [
            (3, 40, 64, 37, vec![0, 15, 15, 30]),
            (2, 24, 32, 50, vec![0, 20, 50]),
            (3, 16, 32, 90, vec![0, 45, 45, 85]),
        ];
        let mut ran = 0;
        for (e, f, h, rows, offsets) in &cases {
            let (e, f, h, rows) = (*e, *f, *h, *rows);
            let kept = *offsets.last().unwrap() as usize;
            let od = dev.upload(offsets).unwrap();
            for act in [Activation::Swiglu, Activation::Gelu] {
                for v in DecodeVariant::all() {
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
                    let want = expert_ffn_stored(&x64, offsets, &w, act, |y| v.a.round(y)).unwrap();
                    let cw = CudaExperts::upload(&dev, &w, act).unwrap();
                    let xd = dev.upload(&xb).unwrap();
                    let size = v.a.size();
                    let mut out = Vec::new();
                    for k in [KernelSet::Verified, KernelSet::Next] {
                        dev.kernels = k;
                        let mut hb = dev.upload(&vec![0xFFu8; rows * f * size]).unwrap();
                        let mut yb = dev.upload(&vec![0xFFu8; rows * h * size]).unwrap();
                        let a = ActView {
                            bytes: xd.slice(..),
                            dtype: v.a,
                        };
                        let mut hv = ActViewMut {
                            bytes: hb.slice_mut(..),
                            dtype: v.a,
                        };
                        let mut yv = ActViewMut {
                            bytes: yb.slice_mut(..),
                            dtype: v.a,
                        };
                        launch(&dev, &a, rows, &od, &cw, act, &mut hv, &mut yv).unwrap();
                        out.push((
                            dev.read(&hb, rows * f * size).unwrap(),
                            dev.read(&yb, rows * h * size).unwrap(),
                        ));
                    }
                    let ctx = format!("{} {act:?} E={e} F={f} H={h} rows={rows}", v.name());
                    assert!(choose(KernelSet::Next, Some(v.w), v.a, rows, e, h, 0).is_some());
                    assert_eq!(
                        out[0].0[..kept * f * size],
                        out[1].0[..kept * f * size],
                        "{ctx}: h"
                    );
                    assert_eq!(out[0].1, out[1].1, "{ctx}: y (dropped rows included)");
                    let got = crate::cuda::act::bytes_to_f64(&out[1].1, v.a);
                    let tol = if v.w == DType::BF16 || v.a == DType::BF16 {
                        1e-2
                    } else if v.w == DType::F16 || v.a == DType::F16 {
                        5e-3
                    } else {
                        2e-5
                    };
                    let err = rel(&got[..kept * h], &want[..kept * h]);
                    assert!(err <= tol, "{ctx}: rel L2 {err:e}");
                    assert!(
                        got[kept * h..].iter().all(|y| y.is_nan()),
                        "{ctx}: dropped rows"
                    );
                    ran += 1;
                }
            }
        }
        dev.kernels = KernelSet::Verified;
        println!("expert_decode: {ran} bitwise checks ran on {}", dev.name);
    }
}
