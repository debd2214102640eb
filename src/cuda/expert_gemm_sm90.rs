//! Stage 3 on Hopper (kernels/expert_gemm_sm90.ptx, `.target sm_90a`): the grouped expert
//! GEMM with `wgmma.mma_async` fed by TMA (`cp.async.bulk.tensor`) through a 4-stage
//! shared-memory ring with mbarriers, one producer and two consumer warpgroups, and a
//! persistent tile scheduler over the expert row ranges read on the device.
//!
//! Which kernel a launch runs is a pure function of the device and the opt-in
//! ([`kernel_for`]): the wgmma kernel only on compute capability 9.x with
//! `MOE_CUDA_KERNELS=next` ([`crate::cuda::next::next_kernels`]); the verified portable kernels
//! (kernels/expert_gemm.ptx) everywhere else. Where the Hopper kernel is chosen it serves the
//! dense 16-bit variants whose activation dtype equals the weight dtype (bf16/bf16, f16/f16)
//! when K is a positive multiple of 8 and the bases are 16-byte aligned (what TMA needs);
//! every other launch (f32 or quantized weights, mixed dtypes, odd K) falls back to the
//! portable kernel (`choose`).
//!
//! The address math (TMA's 128-byte swizzle, the wgmma matrix descriptors, the accumulator
//! fragments, the epilogue's staging and output indexing, the tile scheduler and the mbarrier
//! protocol) is mirrored here and checked against the PTX ISA's documented layouts by the unit
//! tests below, which need no GPU.

use cudarc::driver::sys::{self, CUfunction_attribute_enum};
use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};

use crate::backend::BackendKind;
use crate::cuda::context::{cuda_err, drv, to_u32};
use crate::cuda::expert_gemm::{Variant, WeightFormat};
use crate::cuda::ptx::{self, PtxModule};
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};
use crate::limits::{self, Resource};
use crate::stage::Stage;
use crate::tensor::DType;

/// Rows per tile (two consumer warpgroups of 64 rows).
pub(crate) const BM: usize = 128;
/// k per pipeline stage: 64 16-bit elements, one 128-byte swizzle row.
pub(crate) const BK: usize = 64;
/// Rows of the B tile (the wgmma N): 128 gate + 128 up rows when gated, else 256 of w0.
pub(crate) const BN: usize = 256;
/// Pipeline depth.
pub(crate) const STAGES: usize = 4;
/// Threads per block: producer, consumer 0, consumer 1.
const THREADS: u32 = 384;
/// Bytes of one A tile (128 rows x 128 B).
const A_BYTES: usize = BM * BK * 2;
/// Bytes of one TMA box of B (128 rows x 128 B): half the B tile.
const B_HALF: usize = 128 * BK * 2;
/// Offset of B in a stage.
const B_OFF: usize = A_BYTES;
/// Bytes of one stage (A and B).
const STAGE_BYTES: usize = A_BYTES + 2 * B_HALF;
/// Offset of the epilogue staging (after the ring).
const EPI_OFF: usize = STAGES * STAGE_BYTES;
/// Bytes of one consumer's staging: f32 [64][64].
const EPI_BYTES: usize = 64 * 64 * 4;
/// Offset of full[0] (then empty[0] at `EMPTY_OFF`).
const BAR_OFF: usize = EPI_OFF + 2 * EPI_BYTES;
/// Offset of empty[0].
const EMPTY_OFF: usize = BAR_OFF + 8 * STAGES;
/// Bytes used from the 1024-aligned base.
const SMEM_USED: usize = EMPTY_OFF + 8 * STAGES;
/// Dynamic shared memory of a launch: what is used plus the alignment slack.
pub(crate) const SMEM_BYTES: usize = SMEM_USED + 1024;
/// Bytes the three TMA copies of one stage deliver (out-of-bounds zeros included).
const TX_BYTES: usize = STAGE_BYTES;
/// The 128-byte swizzle atom: 8 rows of 128 bytes; the stride between 8-row groups (SBO).
const SBO: usize = 1024;
/// Low word flags of a descriptor: leading byte offset encoded 1 (unused when swizzled).
const DESC_LO: u32 = 1 << 16;
/// High word of a descriptor: SBO >> 4 in bits 32-45, swizzle mode 1 (128 B) in bits 62-63.
const DESC_HI: u32 = (SBO as u32 >> 4) | (1 << 30);
/// The most dynamic shared memory an sm_90 block may opt into (227 KiB).
const SM90_SMEM_LIMIT: usize = 232_448;
const _: () = assert!(SMEM_BYTES <= SM90_SMEM_LIMIT);
/// Consumer warps: each arrives once on empty[s] per use of stage s.
const CONSUMER_WARPS: usize = 8;

/// Which expert GEMM kernel family a device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmKernel {
    /// kernels/expert_gemm.ptx (`.target sm_80`, verified on H100 / H200).
    Portable,
    /// kernels/expert_gemm_sm90.ptx (`.target sm_90a`, wgmma + TMA; awaits its first GPU run).
    Wgmma,
}

/// The kernel family for a device of compute capability `cc` with the opt-in `next`
/// (`MOE_CUDA_KERNELS=next`): the wgmma kernel on 9.x (H100, H200) with the opt-in, the
/// portable one otherwise (sm_90a code runs on no other architecture, not even 10.x).
pub fn kernel_for(cc: (i32, i32), next: bool) -> GemmKernel {
    if next && cc.0 == 9 {
        GemmKernel::Wgmma
    } else {
        GemmKernel::Portable
    }
}

/// One module of this template: weights and activations both `dtype` (bf16 or f16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sm90Variant {
    pub dtype: DType,
}

impl Sm90Variant {
    /// Every variant.
    pub(crate) const ALL: [Sm90Variant; 2] = [
        Sm90Variant { dtype: DType::BF16 },
        Sm90Variant { dtype: DType::F16 },
    ];

    /// Module name: `expert_gemm.wgmma.<w>.a<w>`.
    pub(crate) fn name(self) -> String {
        let w = self.dtype.name();
        format!("expert_gemm.wgmma.{w}.a{w}")
    }

    /// Kernel entry: `expert_gemm_wgmma_<w>_a<w>`.
    pub(crate) fn entry(self) -> String {
        let w = self.dtype.name();
        format!("expert_gemm_wgmma_{w}_a{w}")
    }
}

/// The Hopper variant for a launch of the portable variant `v` with reduction length `k`
/// and activation base address `a_addr`, or `None` (portable kernel): see the module docs.
/// `kernel` is [`kernel_for`] of the device.
pub(crate) fn applies(
    kernel: GemmKernel,
    v: Variant,
    k: usize,
    a_addr: u64,
) -> Option<Sm90Variant> {
    if kernel != GemmKernel::Wgmma {
        return None;
    }
    let WeightFormat::Dense(w) = v.w else {
        return None;
    };
    let ok = matches!(w, DType::BF16 | DType::F16) && v.a == w && k > 0 && k % 8 == 0;
    (ok && a_addr % 16 == 0).then_some(Sm90Variant { dtype: w })
}

/// [`applies`] for `dev` and the environment's opt-in.
pub(crate) fn choose(dev: &CudaDevice, v: Variant, k: usize, a_addr: u64) -> Option<Sm90Variant> {
    let kernel = kernel_for(dev.compute_capability, crate::cuda::next::next_kernels());
    applies(kernel, v, k, a_addr)
}

/// Every module of this template (whatever the device: `moe ptx --dump` writes them all).
pub fn modules() -> Result<Vec<PtxModule>> {
    Sm90Variant::ALL.into_iter().map(module).collect()
}

fn module(v: Sm90Variant) -> Result<PtxModule> {
    let st = Stage::ExpertGemm;
    let wt = v.dtype.name().to_string();
    let subs = vec![
        ("VARIANT", v.name()),
        ("ENTRY", v.entry()),
        ("WT", wt.clone()),
        ("STAGES", STAGES.to_string()),
        ("STAGE_BYTES", STAGE_BYTES.to_string()),
        ("B_OFF", B_OFF.to_string()),
        ("B_HALF", B_HALF.to_string()),
        ("EPI_OFF", EPI_OFF.to_string()),
        ("EPI_BYTES", EPI_BYTES.to_string()),
        ("BAR_OFF", BAR_OFF.to_string()),
        ("EMPTY_OFF", EMPTY_OFF.to_string()),
        ("FULL_TO_EMPTY", (EMPTY_OFF - BAR_OFF).to_string()),
        ("BAR_INIT", bar_init()),
        ("TX_BYTES", TX_BYTES.to_string()),
        ("SMEM_BYTES", SMEM_BYTES.to_string()),
        ("DESC_LO", format!("{DESC_LO:#x}")),
        ("DESC_HI", format!("{DESC_HI:#x}")),
        ("ZERO_ACC", zero_acc()),
        ("MMA_KTILE", mma_ktile(&wt)),
        ("DECODE_P", decode("P", "P_NEXT")),
        ("DECODE_C", decode("C", "C_TNEXT")),
        ("STAGE_STORES", stage_stores()),
        ("ACT", act_block()?),
    ];
    let text = ptx::select_sections(st, TEMPLATE, &[])?;
    Ok(PtxModule {
        stage: st,
        variant: v.name(),
        source: ptx::render(st, &text, &subs)?,
    })
}

/// The template, embedded at build time.
const TEMPLATE: &str = include_str!("../../kernels/expert_gemm_sm90.ptx");

/// The bias-free activation block of the portable template (kernels/expert_gemm.ptx), from
/// the line after `EPI_ACT:` through `ACT_END:`: `f_h = act(f_g, f_u)` by `r_act`, with the
/// clamped SwiGLU's `f_alpha`, `f_limit`, `f_nlimit`. Both kernels run the same code, so their
/// epilogues compute the same function of the accumulators.
fn act_block() -> Result<String> {
    let st = Stage::ExpertGemm;
    let src = ptx::template(st);
    let start = src
        .find("\nEPI_ACT:\n")
        .map(|i| i + "\nEPI_ACT:\n".len())
        .ok_or_else(|| Error::shape(st, "kernels/expert_gemm.ptx lacks the EPI_ACT: label"))?;
    let end = src[start..]
        .find("\nACT_END:\n")
        .map(|i| start + i + "\nACT_END:\n".len())
        .ok_or_else(|| Error::shape(st, "kernels/expert_gemm.ptx lacks the ACT_END: label"))?;
    let block = &src[start..end];
    if block.contains("${") || block.contains("//@") {
        return Err(Error::shape(
            st,
            "the activation block of kernels/expert_gemm.ptx is not plain PTX",
        ));
    }
    Ok(block.trim_end_matches('\n').to_string())
}

/// BAR_INIT: full[s] expects one arrival (the producer's, with the stage's bytes), empty[s]
/// eight (lane 0 of each consumer warp); `r_t0` holds the address of full[0].
fn bar_init() -> String {
    let full = (0..STAGES).map(|s| format!("mbarrier.init.shared::cta.b64 [r_t0+{}], 1;", 8 * s));
    let empty = (0..STAGES).map(|s| {
        format!(
            "mbarrier.init.shared::cta.b64 [r_t0+{}], {CONSUMER_WARPS};",
            EMPTY_OFF - BAR_OFF + 8 * s
        )
    });
    full.chain(empty).collect::<Vec<_>>().join("\n    ")
}

/// ZERO_ACC: the 128 accumulators set to 0 (before the tile's first wgmma.fence).
fn zero_acc() -> String {
    (0..128)
        .map(|i| format!("mov.f32         f_acc{i}, 0f00000000;"))
        .collect::<Vec<_>>()
        .join("\n    ")
}

/// The accumulator vector operand `{f_acc0, ..., f_acc127}`, 8 per line.
fn acc_list() -> String {
    let regs: Vec<String> = (0..128).map(|i| format!("f_acc{i}")).collect();
    let lines: Vec<String> = regs.chunks(8).map(|c| c.join(", ")).collect();
    format!("{{{}}}", lines.join(",\n         "))
}

/// MMA_KTILE: the four wgmma of one 64-wide k tile, slice kk at descriptor low words
/// `r_dla + 2 kk`, `r_dlb + 2 kk` (32 bytes further into the swizzle atom, in 16-byte units).
fn mma_ktile(wt: &str) -> String {
    let mut v = Vec::new();
    for kk in 0..BK / 16 {
        v.push(format!("add.u32         r_t0, r_dla, {};", 2 * kk));
        v.push("mov.b64         d_da, {r_t0, r_dhi};".to_string());
        v.push(format!("add.u32         r_t1, r_dlb, {};", 2 * kk));
        v.push("mov.b64         d_db, {r_t1, r_dhi};".to_string());
        v.push(format!(
            "wgmma.mma_async.sync.aligned.m64n256k16.f32.{wt}.{wt}\n        {},\n        d_da, d_db, 1, 1, 1, 0, 0;",
            acc_list()
        ));
    }
    v.join("\n    ")
}

/// DECODE_P / DECODE_C: tile `r_t` to expert `r_e`, first row `r_row0`, row end `r_re` and
/// first output column `r_n0`; an empty tile branches to `skip`. Labels carry `prefix`
/// (each role has its own copy: the producer runs at 40 registers).
fn decode(prefix: &str, skip: &str) -> String {
    let p = prefix;
    format!(
        "// tile r_t -> (r_e, r_row0, r_re, r_n0); see LAUNCH in the header
    div.u32         r_gid, r_t, r_gs;
    mul.lo.u32      r_t0, r_gid, r_gs;
    sub.u32         r_ing, r_t, r_t0;               // index inside the group
    shl.b32         r_fm, r_gid, 3;                 // first row tile of the group
    sub.u32         r_gm, r_tm, r_fm;
    min.u32         r_gm, r_gm, 8;                  // row tiles in this group (>= 1)
    rem.u32         r_t0, r_ing, r_gm;
    add.u32         r_vt, r_fm, r_t0;               // virtual row tile
    div.u32         r_tnn, r_ing, r_gm;             // column tile
    // largest e in [0, E) with floor(off[e]/128) + e <= vt
    mov.u32         r_lo, 0;
    mov.u32         r_hi, r_E;
{p}_SEARCH:
    sub.u32         r_t0, r_hi, r_lo;
    setp.le.u32     p_w, r_t0, 1;
    @p_w bra        {p}_FOUND;
    add.u32         r_mid, r_lo, r_hi;
    shr.u32         r_mid, r_mid, 1;
    mul.wide.u32    d_t, r_mid, 4;
    add.u64         d_t, d_off, d_t;
    ld.global.u32   r_t1, [d_t];
    shr.u32         r_t1, r_t1, 7;
    add.u32         r_t1, r_t1, r_mid;
    setp.le.u32     p_w, r_t1, r_vt;
    selp.u32        r_lo, r_mid, r_lo, p_w;
    selp.u32        r_hi, r_hi, r_mid, p_w;
    bra.uni         {p}_SEARCH;
{p}_FOUND:
    mov.u32         r_e, r_lo;
    mul.wide.u32    d_t, r_e, 4;
    add.u64         d_t, d_off, d_t;
    ld.global.u32   r_rs, [d_t];
    ld.global.u32   r_re, [d_t+4];
    min.u32         r_re, r_re, r_rows;             // row end, clipped
    shr.u32         r_t0, r_rs, 7;
    add.u32         r_t0, r_t0, r_e;                // the expert's first virtual row tile
    sub.u32         r_t0, r_vt, r_t0;
    shl.b32         r_t0, r_t0, 7;
    add.u32         r_row0, r_rs, r_t0;
    setp.ge.u32     p_w, r_row0, r_re;
    @p_w bra        {skip};                      // a gap tile or an empty expert
    shl.b32         r_n0, r_tnn, r_bnosh;"
    )
}

/// One accumulator pair's store to the staging: `st.shared.v2.f32 [r_q{m}+off], {f_acc{reg},
/// f_acc{reg + 1}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StagingStore {
    /// Which of the thread's four base addresses r_q0..3.
    pub m: usize,
    /// Immediate byte offset.
    pub off: usize,
    /// First accumulator of the pair.
    pub reg: usize,
}

/// The 16 staging stores of chunk `ch` (gated or not): staging column 8 jj + 2 t (jj = 0..7,
/// t = lane % 4) of rows 16 w + g (h = 0) and + 8 (h = 1). Gated: jj < 4 gate accumulators
/// 16 ch + 4 jj, jj >= 4 up accumulators 64 + 16 ch + 4 (jj - 4); non-gated 32 ch + 4 jj.
/// The column's swizzle (jj ^ (g & 3)) lives in r_q{jj & 3}; jj >= 4 adds 128 bytes, h 2048.
pub(crate) fn staging_stores(gated: bool, ch: usize) -> Vec<StagingStore> {
    let mut v = Vec::new();
    for jj in 0..8 {
        let base = match (gated, jj < 4) {
            (true, true) => 16 * ch + 4 * jj,
            (true, false) => 64 + 16 * ch + 4 * (jj - 4),
            (false, _) => 32 * ch + 4 * jj,
        };
        for h in 0..2 {
            v.push(StagingStore {
                m: jj & 3,
                off: 128 * (jj >> 2) + 2048 * h,
                reg: base + 2 * h,
            });
        }
    }
    v
}

/// STAGE_STORES: dispatch on r_t0 = 4 gated + chunk to one of 8 store blocks, then
/// `C_STORED:`.
fn stage_stores() -> String {
    let mut v = Vec::new();
    for b in 0..7 {
        v.push(format!("setp.eq.u32     p_w, r_t0, {b};"));
        v.push(format!("@p_w bra        C_STG{b};"));
    }
    v.push("bra.uni         C_STG7;".to_string());
    for b in 0..8 {
        v.push(format!("C_STG{b}:"));
        for s in staging_stores(b >= 4, b % 4) {
            v.push(format!(
                "st.shared.v2.f32 [r_q{}+{}], {{f_acc{}, f_acc{}}};",
                s.m,
                s.off,
                s.reg,
                s.reg + 1
            ));
        }
        if b < 7 {
            v.push("bra.uni         C_STORED;".to_string());
        }
    }
    v.push("C_STORED:".to_string());
    v.join("\n    ")
}

/// A TMA tensor map's shape as `cuTensorMapEncodeTiled` takes it (innermost dimension first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapSpec {
    /// Dimensions used: 2 (activations) or 3 (weights).
    pub rank: usize,
    /// Elements per dimension.
    pub dims: [u64; 3],
    /// Byte strides of dimensions 1.. (dimension 0 is contiguous).
    pub strides: [u64; 2],
    /// The box (elements per dimension) one copy moves.
    pub boxdim: [u32; 3],
}

impl MapSpec {
    /// Activations `[rows, k]`: dims {k, rows}, box {64, 128}.
    pub(crate) fn activations(rows: usize, k: usize) -> Self {
        MapSpec {
            rank: 2,
            dims: [k as u64, rows as u64, 1],
            strides: [2 * k as u64, 0],
            boxdim: [BK as u32, BM as u32, 1],
        }
    }

    /// Weights `[e, n, k]`: dims {k, n, e}, box {64, 128, 1}.
    pub(crate) fn weights(e: usize, n: usize, k: usize) -> Self {
        MapSpec {
            rank: 3,
            dims: [k as u64, n as u64, e as u64],
            strides: [2 * k as u64, 2 * (n * k) as u64],
            boxdim: [BK as u32, 128, 1],
        }
    }

    /// What the driver requires of a tiled, 128-byte-swizzled map of 16-bit elements
    /// (CUDA driver API, cuTensorMapEncodeTiled): every dimension in 1..=2^32, strides
    /// multiples of 16 below 2^40, box sizes in 1..=256, the inner box 16-byte multiple and
    /// at most the 128-byte swizzle span.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        for d in &self.dims[..self.rank] {
            if *d == 0 || *d > 1 << 32 {
                return Err(format!("tensor dimension {d} outside 1..=2^32"));
            }
        }
        for s in &self.strides[..self.rank - 1] {
            if s % 16 != 0 || *s >= 1 << 40 {
                return Err(format!("stride {s} bytes: not a multiple of 16 below 2^40"));
            }
        }
        for b in &self.boxdim[..self.rank] {
            if *b == 0 || *b > 256 {
                return Err(format!("box size {b} outside 1..=256"));
            }
        }
        let inner = self.boxdim[0] as usize * 2;
        if inner % 16 != 0 || inner > 128 {
            return Err(format!(
                "inner box of {inner} bytes: 128-byte swizzle needs <= 128"
            ));
        }
        Ok(())
    }

    /// Bytes one copy of the box delivers (out-of-bounds elements included).
    pub(crate) fn box_bytes(&self) -> usize {
        self.boxdim[..self.rank]
            .iter()
            .map(|&b| b as usize)
            .product::<usize>()
            * 2
    }
}

/// A `CUtensorMap` passed by value as a kernel parameter (`.param .align 64 .b8 [128]`).
#[derive(Debug, Clone, Copy)]
#[repr(transparent)]
struct TensorMap(sys::CUtensorMap);

// SAFETY: a CUtensorMap is 128 plain bytes (64-byte aligned) with no host pointers; the driver
// copies them into the kernel's parameter buffer, which is all a kernel argument needs.
unsafe impl DeviceRepr for TensorMap {}

/// Encodes `spec` for 16-bit `dtype` elements at device address `addr` (16-byte aligned):
/// tiled, no interleave, 128-byte swizzle, 256-byte L2 promotion, zero fill out of bounds.
fn encode(spec: &MapSpec, dtype: DType, addr: u64, what: &str) -> Result<TensorMap> {
    let st = Stage::ExpertGemm;
    spec.check()
        .map_err(|e| Error::shape(st, format!("{what}: TMA tensor map: {e}")))?;
    if addr % 16 != 0 {
        return Err(Error::shape(
            st,
            format!("{what} at {addr:#x}: TMA needs a 16-byte aligned base"),
        ));
    }
    let data_type = match dtype {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::F32 => {
            return Err(Error::shape(
                st,
                format!("{what}: the wgmma kernel reads 16-bit data"),
            ))
        }
    };
    let elem_strides = [1u32; 3];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: cuTensorMapEncodeTiled writes the 128-byte map and reads `rank` entries of dims,
    // box and element strides and `rank - 1` strides, all live arrays of at least that length
    // (checked by MapSpec::check above); it dereferences nothing else (the global address is
    // only recorded). It is a host-side function of the driver, present since CUDA 12.0.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            data_type,
            spec.rank as u32,
            addr as *mut std::ffi::c_void,
            spec.dims.as_ptr(),
            spec.strides.as_ptr(),
            spec.boxdim.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(cuda_err(format!(
            "cuTensorMapEncodeTiled for {what}: {r:?}"
        )));
    }
    // SAFETY: the driver reported success, so it wrote all 128 bytes (and the zeroed start
    // makes every byte initialised in any case).
    Ok(TensorMap(unsafe { map.assume_init() }))
}

/// One launch's operands: `out [rows, n] = act(a [rows, k] · w{0,1}ᵀ + b{0,1})`, weights
/// `[E, n, k]` dense in the variant's dtype (w1 read only when gated: pass w0 otherwise).
pub(crate) struct Sm90Gemm<'a> {
    pub w0: &'a CudaSlice<u8>,
    pub w1: &'a CudaSlice<u8>,
    pub b0: &'a CudaSlice<f32>,
    pub b1: &'a CudaSlice<f32>,
    pub n: usize,
    pub k: usize,
    pub code: u32,
    pub alpha: f32,
    pub limit: f32,
}

/// Launches the wgmma kernel of `v` for one GEMM. The caller (src/cuda/expert_gemm.rs:
/// `run_gemm`) has checked the operands' sizes and dtypes as for the portable kernel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    dev: &CudaDevice,
    v: Sm90Variant,
    g: &Sm90Gemm<'_>,
    rows: usize,
    experts: usize,
    offsets: &CudaSlice<u32>,
    a: &CudaView<'_, u8>,
    out: &mut CudaViewMut<'_, u8>,
) -> Result<()> {
    let st = Stage::ExpertGemm;
    if g.n == 0 || rows == 0 {
        return Ok(());
    }
    let need_w = experts
        .checked_mul(g.n)
        .and_then(|x| x.checked_mul(g.k))
        .and_then(|x| x.checked_mul(2))
        .ok_or_else(|| Error::shape(st, "E x N x K overflows"))?;
    for (what, w) in [("w0", g.w0), ("w1", g.w1)] {
        if w.len() < need_w {
            return Err(Error::shape(
                st,
                format!("{what} holds {} bytes, needs {need_w}", w.len()),
            ));
        }
    }
    // TMA coordinates are s32: rows, n, k and E stay below 2^31.
    let max = i32::MAX as usize;
    let rows_u = to_u32(st, "rows", rows, max)?;
    let experts_u = to_u32(st, "E", experts, max)?;
    let n_u = to_u32(st, "N", g.n, max)?;
    let k_u = to_u32(st, "K", g.k, max)?;
    let bno = if g.code >= 3 { BN / 2 } else { BN };
    let tiles = limits::product(&[rows / BM + experts, g.n.div_ceil(bno)]);
    limits::check(
        BackendKind::Cuda,
        Resource::GridSize,
        || format!("{st}: the wgmma expert GEMM's tiles"),
        tiles,
        i32::MAX as u64,
    )?;
    let a_addr = a.device_ptr(&dev.stream).0;
    let w0_addr = g.w0.device_ptr(&dev.stream).0;
    let w1_addr = g.w1.device_ptr(&dev.stream).0;
    let aspec = MapSpec::activations(rows, g.k);
    let wspec = MapSpec::weights(experts, g.n, g.k);
    if aspec.box_bytes() + 2 * wspec.box_bytes() != TX_BYTES {
        return Err(Error::shape(
            st,
            "TMA boxes do not add up to a stage's bytes",
        ));
    }
    let tmap_a = encode(&aspec, v.dtype, a_addr, "a")?;
    let tmap_w0 = encode(&wspec, v.dtype, w0_addr, "w0")?;
    let tmap_w1 = encode(&wspec, v.dtype, w1_addr, "w1")?;
    let sms = drv(
        dev.ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
        "multiprocessor count",
    )?
    .max(1) as u64;
    let grid = tiles.min(sms).max(1);
    let entry = v.entry();
    let func = dev.function(st, &v.name(), &entry)?;
    drv(
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            SMEM_BYTES as i32,
        ),
        "raising the wgmma expert GEMM's shared memory limit",
    )?;
    let cfg = LaunchConfig {
        grid_dim: (grid as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: SMEM_BYTES as u32,
    };
    let (code, alpha, limit) = (g.code, g.alpha, g.limit);
    let mut b = dev.stream.launch_builder(&func);
    b.arg(&tmap_a)
        .arg(&tmap_w0)
        .arg(&tmap_w1)
        .arg(offsets)
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
    // SAFETY: matches the KERNEL header of kernels/expert_gemm_sm90.ptx (tmap_a, tmap_w0,
    // tmap_w1 by value, offsets, b0, b1, out, rows, experts, n, k, act, alpha, limit). The
    // maps describe a [rows, k] and w0/w1 [E, n, k] of the variant's dtype at 16-byte aligned
    // bases (encode checked; the caller checked a's size, w0/w1 are checked above), so every
    // TMA copy stays inside them (out-of-bounds boxes are zero-filled by the hardware). out
    // holds rows*n elements and offsets E+1 (checked by expert_gemm::launch); b0/b1 are
    // [E, n] f32 (CudaExperts::upload). The kernel writes only rows < min(offsets[e+1], rows)
    // and columns < n. LAUNCH: persistent grid min(SMs, tiles) of 384 threads with
    // SMEM_BYTES of dynamic shared memory (raised above).
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(|e| cuda_err(format!("launching {entry}: {e:?}")))
}

/// The measured `ptxas -v` lines of each module (for docs/PERF.md and the template header).
#[cfg(test)]
fn ptxas_path() -> Option<std::path::PathBuf> {
    let cached = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .map(|c| c.join("moe-kernels/nvcc-12.9.86/nvidia/cuda_nvcc/bin/ptxas"));
    std::env::var_os("PTXAS")
        .map(std::path::PathBuf::from)
        .or(cached)
        .filter(|p| p.is_file())
}

#[cfg(test)]
mod tests;
