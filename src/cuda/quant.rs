//! Quantized expert weights on CUDA (DESIGN.md section 4): the packed matrices on the device
//! ([`CudaQuant`]: codes, scales and zero points uploaded as the file's bytes, never
//! dequantized), their validation ([`check_matrix`]), and the unrolled pieces of the quantized
//! expert GEMM variants of kernels/expert_gemm.ptx (the `QA_*`, `QB_*` and `Q_SCALE`
//! placeholders; the header of the template explains each).
//!
//! Opt-in: these kernels are assembled and their machine code checked here, but no GPU has run
//! them yet, so a quantized layer on CUDA is refused unless `MOE_CUDA_QUANT=1`
//! ([`crate::cuda::quant_enabled`]).

use cudarc::driver::CudaSlice;

use crate::backend::BackendKind;
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};
use crate::quant::{QuantFormat, QuantMatrix, Scales, Weight, FP8_BLOCK, MX_BLOCK};
use crate::stage::Stage;
use crate::tensor::DType;

/// How one GEMM's weight matrices are stored on the device; picks the kernel variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// Dense f32, f16 or bf16 elements.
    Dense(DType),
    /// FP8 e4m3 codes with f32 / f16 / bf16 scales per 128 × 128 block.
    Fp8 {
        /// The scales' dtype.
        scale: DType,
    },
    /// MXFP4 e2m1 nibbles with an e8m0 scale per 32 values.
    Mxfp4,
    /// INT4 nibbles with f32 / f16 / bf16 scales per group (zero points chosen at launch).
    Int4 {
        /// The scales' dtype.
        scale: DType,
    },
}

impl WeightFormat {
    /// Every quantized format the kernels are specialised for.
    pub const QUANT: [WeightFormat; 7] = [
        WeightFormat::Fp8 { scale: DType::F32 },
        WeightFormat::Fp8 { scale: DType::BF16 },
        WeightFormat::Fp8 { scale: DType::F16 },
        WeightFormat::Mxfp4,
        WeightFormat::Int4 { scale: DType::F32 },
        WeightFormat::Int4 { scale: DType::BF16 },
        WeightFormat::Int4 { scale: DType::F16 },
    ];

    /// The format of `w`, or an error when a quantized matrix's scales are of the wrong kind
    /// (e8m0 for FP8 / INT4, float for MXFP4).
    pub fn of(w: &Weight, what: &str) -> Result<Self> {
        match w {
            Weight::Dense(t) => Ok(WeightFormat::Dense(t.dtype())),
            Weight::Quant(q) => WeightFormat::of_quant(q, what),
        }
    }

    /// The format of a quantized matrix (see [`WeightFormat::of`]).
    pub fn of_quant(q: &QuantMatrix, what: &str) -> Result<Self> {
        match (q.format, &q.scales) {
            (QuantFormat::Fp8Block, Scales::Float(t)) => Ok(WeightFormat::Fp8 { scale: t.dtype() }),
            (QuantFormat::Mxfp4, Scales::E8m0(_)) => Ok(WeightFormat::Mxfp4),
            (QuantFormat::Int4, Scales::Float(t)) => Ok(WeightFormat::Int4 { scale: t.dtype() }),
            (f, s) => Err(bad(format!(
                "{what}: {f} weights with {} scales",
                s.dtype_name()
            ))),
        }
    }

    /// True for the quantized formats.
    pub fn is_quant(self) -> bool {
        !matches!(self, WeightFormat::Dense(_))
    }

    /// The format's name: `f32`, `f16`, `bf16`, `fp8`, `mxfp4` or `int4`.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Dense(d) => d.name(),
            WeightFormat::Fp8 { .. } => "fp8",
            WeightFormat::Mxfp4 => "mxfp4",
            WeightFormat::Int4 { .. } => "int4",
        }
    }

    /// The scales' dtype name (`f32`, `f16`, `bf16`, `e8m0`); `None` when dense.
    pub fn scale_name(self) -> Option<&'static str> {
        match self {
            WeightFormat::Dense(_) => None,
            WeightFormat::Fp8 { scale } | WeightFormat::Int4 { scale } => Some(scale.name()),
            WeightFormat::Mxfp4 => Some("e8m0"),
        }
    }

    /// The k tile of the quantized kernel: 32 for FP8 (32 bytes of codes per row), 64 for the
    /// 4-bit formats (also 32 bytes).
    pub(crate) fn k_tile(self) -> usize {
        match self {
            WeightFormat::Fp8 { .. } => 32,
            _ => 64,
        }
    }

    /// Bytes of one scale.
    pub(crate) fn scale_size(self) -> usize {
        match self {
            WeightFormat::Fp8 { scale } | WeightFormat::Int4 { scale } => scale.size(),
            _ => 1,
        }
    }
}

fn bad(what: impl Into<String>) -> Error {
    Error::shape(Stage::ExpertGemm, what)
}

/// The refusal of a quantized layer on CUDA while `MOE_CUDA_QUANT` is not set.
pub fn not_enabled(what: &str, format: WeightFormat) -> Error {
    Error::BackendUnavailable {
        backend: BackendKind::Cuda,
        reason: format!(
            "{what} is {}: quantized weights on CUDA are unverified; set MOE_CUDA_QUANT=1 to \
             use them",
            format.name()
        ),
    }
}

/// What the kernel needs to know of a validated quantized matrix besides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantShape {
    /// The format (with the scale dtype).
    pub format: WeightFormat,
    /// Experts E.
    pub experts: usize,
    /// Rows N per expert.
    pub rows: usize,
    /// Columns K (the reduction dimension).
    pub cols: usize,
    /// Bytes of one row's codes: K (FP8) or ⌈K/2⌉.
    pub row_bytes: usize,
    /// Scales per scale row: ⌈K/128⌉ (FP8), K/32 (MXFP4), K/G (INT4).
    pub scale_cols: usize,
    /// The k extent of a scale: 128, 32 or G (1 when K = 0).
    pub group: usize,
    /// INT4 zero points present.
    pub zeros: bool,
}

impl QuantShape {
    /// Bytes of codes: E·N·row_bytes.
    pub fn code_bytes(&self) -> usize {
        self.experts * self.rows * self.row_bytes
    }

    /// Scale rows per expert: ⌈N/128⌉ (FP8) or N.
    pub fn scale_rows(&self) -> usize {
        match self.format {
            WeightFormat::Fp8 { .. } => self.rows.div_ceil(FP8_BLOCK),
            _ => self.rows,
        }
    }

    /// Number of scales (and of zero points when present).
    pub fn scale_count(&self) -> usize {
        self.experts * self.scale_rows() * self.scale_cols
    }
}

/// Checks that `q`'s bytes are exactly what its format and logical shape `[E, N, K]` call
/// for, so that the kernel, which trusts these sizes, stays in bounds; returns the shape.
pub fn check_matrix(q: &QuantMatrix, what: &str) -> Result<QuantShape> {
    let format = WeightFormat::of_quant(q, what)?;
    let (e, n, k) = (q.experts, q.rows, q.cols);
    let mul = |a: usize, b: usize| {
        a.checked_mul(b)
            .ok_or_else(|| bad(format!("{what}: [{e}, {n}, {k}] overflows")))
    };
    let en = mul(e, n)?;
    let row_bytes = match format {
        WeightFormat::Fp8 { .. } => k,
        _ => k.div_ceil(2),
    };
    // The kernel forms k, row bytes and (e·N + n) in 32 bits (plus one k tile).
    if k > (u32::MAX as usize) - 64 || en > u32::MAX as usize {
        return Err(bad(format!(
            "{what}: [{e}, {n}, {k}] exceeds the CUDA kernel's 32-bit indices"
        )));
    }
    let (scale_cols, group) = match format {
        WeightFormat::Fp8 { .. } => (k.div_ceil(FP8_BLOCK), FP8_BLOCK),
        WeightFormat::Mxfp4 => {
            if k % MX_BLOCK != 0 {
                return Err(bad(format!(
                    "{what}: mxfp4 needs K to be a multiple of {MX_BLOCK}, got K = {k}"
                )));
            }
            (k / MX_BLOCK, MX_BLOCK)
        }
        WeightFormat::Int4 { .. } => {
            let sc = q.scales.len().checked_div(en).unwrap_or(0);
            if k == 0 {
                (sc, 1)
            } else if sc == 0 || k % sc != 0 {
                return Err(bad(format!(
                    "{what}: int4 has {} scales for [{e}, {n}, {k}]: K / G scales per row need \
                     a group G dividing K",
                    q.scales.len()
                )));
            } else {
                (sc, k / sc)
            }
        }
        WeightFormat::Dense(_) => return Err(bad(format!("{what}: not a quantized matrix"))),
    };
    let shape = QuantShape {
        format,
        experts: e,
        rows: n,
        cols: k,
        row_bytes,
        scale_cols,
        group,
        zeros: q.zeros.is_some(),
    };
    let codes = mul(en, row_bytes)?;
    if q.codes.len() != codes {
        return Err(bad(format!(
            "{what}: {} code bytes, expected {codes} for {} [{e}, {n}, {k}]",
            q.codes.len(),
            format.name()
        )));
    }
    let scales = mul(mul(e, shape.scale_rows())?, scale_cols)?;
    if q.scales.len() != scales {
        return Err(bad(format!(
            "{what}: {} scales, expected {scales} for {} [{e}, {n}, {k}]",
            q.scales.len(),
            format.name()
        )));
    }
    match (&q.zeros, format) {
        (None, _) => {}
        (Some(z), WeightFormat::Int4 { .. }) if z.len() == scales => {}
        (Some(z), WeightFormat::Int4 { .. }) => {
            return Err(bad(format!(
                "{what}: {} zero points, expected {scales} (one per scale)",
                z.len()
            )))
        }
        (Some(_), f) => {
            return Err(bad(format!(
                "{what}: {} weights have no zero points",
                f.name()
            )))
        }
    }
    Ok(shape)
}

/// A quantized `[E, N, K]` matrix on the device: its codes, scales and zero points as the
/// file stores them (device memory = the packed bytes).
#[derive(Debug)]
pub struct CudaQuant {
    /// Format, sizes, group and zero points.
    pub shape: QuantShape,
    /// `[E, N, row_bytes]` codes.
    pub codes: CudaSlice<u8>,
    /// The scales' little-endian bytes, row-major in their file layout.
    pub scales: CudaSlice<u8>,
    /// `[E, N, K/G]` INT4 zero points, when the matrix has them.
    pub zeros: Option<CudaSlice<u8>>,
}

impl CudaQuant {
    /// Validates `q` ([`check_matrix`]) and uploads its bytes.
    pub fn upload(dev: &CudaDevice, q: &QuantMatrix, what: &str) -> Result<Self> {
        let shape = check_matrix(q, what)?;
        Ok(CudaQuant {
            shape,
            codes: dev.upload(&q.codes)?,
            scales: dev.upload(&q.scales.bytes())?,
            zeros: q.zeros.as_ref().map(|z| dev.upload(z)).transpose()?,
        })
    }

    /// An error unless the device buffers hold at least what the kernel reads for an
    /// `[experts, n, k]` GEMM operand (checked before every launch).
    pub fn check_launch(&self, what: &str, experts: usize, n: usize, k: usize) -> Result<()> {
        let s = &self.shape;
        if (s.experts, s.rows, s.cols) != (experts, n, k) {
            return Err(bad(format!(
                "{what}: uploaded as [{}, {}, {}], the GEMM needs [{experts}, {n}, {k}]",
                s.experts, s.rows, s.cols
            )));
        }
        let scale_bytes = s.scale_count() * s.format.scale_size();
        let short = self.codes.len() < s.code_bytes()
            || self.scales.len() < scale_bytes
            || (s.zeros
                && self
                    .zeros
                    .as_ref()
                    .is_none_or(|z| z.len() < s.scale_count()));
        if short {
            return Err(bad(format!(
                "{what}: device buffers smaller than the {} matrix [{experts}, {n}, {k}]",
                s.format.name()
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Unrolled PTX of the quantized variants (see the template's header). Each function returns
// instructions joined by newline + 4 spaces, the template's indentation.

fn join(v: Vec<String>) -> String {
    v.join("\n    ")
}

/// Shared-memory byte offset of k row `j` of the thread's half (As; Bs adds `QB_OFF`).
fn srow(j: usize) -> usize {
    528 * j
}

/// QA_ZERO: clear the next activations (zero past K and for rows past the tile's end).
pub(crate) fn qa_zero(a: DType, qh: usize) -> String {
    join(match a {
        DType::F32 => (0..qh)
            .map(|j| format!("mov.f32         f_la{j}, 0f00000000;"))
            .collect(),
        _ => (0..qh / 2)
            .map(|w| format!("mov.b32         r_xa{w}, 0;"))
            .collect(),
    })
}

/// QA_FAST: 16-byte activation loads, each wholly below K or not loaded.
pub(crate) fn qa_fast(a: DType, qh: usize) -> String {
    let per = 16 / a.size();
    let mut v = Vec::new();
    for i in 0..qh / per {
        v.push(format!("setp.gt.u32     p_u, r_kva, {};", i * per));
        let off = if i == 0 {
            String::new()
        } else {
            format!("+{}", 16 * i)
        };
        v.push(match a {
            DType::F32 => format!(
                "@p_u ld.global.nc.v4.f32 {{f_la{}, f_la{}, f_la{}, f_la{}}}, [d_pa{off}];",
                4 * i,
                4 * i + 1,
                4 * i + 2,
                4 * i + 3
            ),
            _ => format!(
                "@p_u ld.global.nc.v4.b32 {{r_xa{}, r_xa{}, r_xa{}, r_xa{}}}, [d_pa{off}];",
                4 * i,
                4 * i + 1,
                4 * i + 2,
                4 * i + 3
            ),
        });
    }
    join(v)
}

/// QA_SLOW: predicated element loads of the activations (any K, any alignment).
pub(crate) fn qa_slow(a: DType, qh: usize) -> String {
    let mut v = Vec::new();
    if a != DType::F32 {
        v.extend((0..qh).map(|j| format!("mov.b16         h_xa{j}, 0;")));
    }
    for j in 0..qh {
        v.push(format!("setp.gt.u32     p_u, r_kva, {j};"));
        v.push(match a {
            DType::F32 => format!("@p_u ld.global.nc.f32 f_la{j}, [d_pa+{}];", 4 * j),
            _ => format!("@p_u ld.global.nc.b16 h_xa{j}, [d_pa+{}];", 2 * j),
        });
    }
    if a != DType::F32 {
        v.extend((0..qh / 2).map(|w| {
            format!(
                "mov.b32         r_xa{w}, {{h_xa{}, h_xa{}}};",
                2 * w,
                2 * w + 1
            )
        }));
    }
    join(v)
}

/// QA_STORE: the activations as f32 to As[QH h + j][lrow] (16-bit ones widened exactly).
pub(crate) fn qa_store(a: DType, qh: usize) -> String {
    let mut v = Vec::new();
    match a {
        DType::F32 => {
            for j in 0..qh {
                v.push(format!("st.shared.f32   [r_soff+{}], f_la{j};", srow(j)));
            }
        }
        _ => {
            for w in 0..qh / 2 {
                v.extend(crate::cuda::expert_gemm::widen_pair(
                    a,
                    &format!("r_xa{w}"),
                    "f_t0",
                    "f_t1",
                    ("h_w0", "h_w1"),
                    "r_t1",
                ));
                v.push(format!("st.shared.f32   [r_soff+{}], f_t0;", srow(2 * w)));
                v.push(format!(
                    "st.shared.f32   [r_soff+{}], f_t1;",
                    srow(2 * w + 1)
                ));
            }
        }
    }
    join(v)
}

/// QB_SLOW: the chunk's 16 packed bytes by byte loads below the row end (r_kbv valid bytes),
/// packed little-endian into r_q0..3 (prmt 0x3340: bytes a0 b0 0 0; 0x5410: a0 a1 b0 b1).
pub(crate) fn qb_slow() -> String {
    let mut v = Vec::new();
    for w in 0..4 {
        for b in 0..4 {
            let j = 4 * w + b;
            v.push(format!("mov.u32         r_t{b}, 0;"));
            v.push(format!("setp.gt.u32     p_u, r_kbv, {j};"));
            v.push(format!("@p_u ld.global.nc.u8 r_t{b}, [d_pb+{j}];"));
        }
        v.push("prmt.b32        r_t0, r_t0, r_t1, 0x3340;".into());
        v.push("prmt.b32        r_t2, r_t2, r_t3, 0x3340;".into());
        v.push(format!("prmt.b32        r_q{w}, r_t0, r_t2, 0x5410;"));
    }
    join(v)
}

/// The scale load type of a format (`ld.global.nc.<type>` into the u32 r_scr).
pub(crate) fn scale_ld(f: WeightFormat) -> &'static str {
    match f.scale_size() {
        4 => "b32",
        2 => "u16",
        _ => "u8",
    }
}

/// Q_SCALE: the raw scale r_scr as the f32 f_sc (exact widening; e8m0 from its bits), each
/// line prefixed with `pred` (empty or `@p_g `).
fn scale_cvt(f: WeightFormat, pred: &str) -> Vec<String> {
    let v: Vec<&str> = match f {
        WeightFormat::Mxfp4 => vec![
            "shl.b32         r_t0, r_scr, 23;",
            "setp.eq.u32     p_t, r_scr, 0;",
            "selp.b32        r_t0, 0x00400000, r_t0, p_t;", // code 0: the subnormal 2^-127
            "mov.b32         f_sc, r_t0;",
        ],
        WeightFormat::Fp8 { scale } | WeightFormat::Int4 { scale } => match scale {
            DType::F32 => vec!["mov.b32         f_sc, r_scr;"],
            DType::BF16 => vec![
                "shl.b32         r_t0, r_scr, 16;",
                "mov.b32         f_sc, r_t0;",
            ],
            DType::F16 => vec![
                "mov.b32         {h_sc, h_w0}, r_scr;",
                "cvt.f32.f16     f_sc, h_sc;",
            ],
        },
        WeightFormat::Dense(_) => vec![],
    };
    v.into_iter().map(|l| format!("{pred}{l}")).collect()
}

/// Q_SCALE for the template.
pub(crate) fn q_scale(f: WeightFormat) -> String {
    join(scale_cvt(f, ""))
}

/// The tail of every decoded weight j: zero at or past K (r_kv valid), store to Bs.
fn store_w(v: &mut Vec<String>, j: usize, qk: usize) {
    v.push(format!("setp.gt.u32     p_t, r_kv, {j};"));
    v.push("selp.f32        f_w, f_w, 0f00000000, p_t;".into());
    v.push(format!(
        "st.shared.f32   [r_soff+{}], f_w;",
        528 * qk + srow(j)
    ));
}

/// `dst = src` shifted so that bit `from` lands on bit `to`.
fn shift(dst: &str, src: &str, from: usize, to: usize) -> String {
    if to >= from {
        format!("shl.b32         {dst}, {src}, {};", to - from)
    } else {
        format!("shr.b32         {dst}, {src}, {};", from - to)
    }
}

/// QB_DECODE: the QH weights of r_q0..3 decoded to f32 (see DECODE in the template header)
/// and stored to Bs[QH h + j][lrow].
pub(crate) fn qb_decode(f: WeightFormat) -> String {
    let qk = f.k_tile();
    let mut v = Vec::new();
    match f {
        WeightFormat::Fp8 { .. } => {
            for j in 0..16 {
                let (w, s) = (format!("r_q{}", j / 4), 8 * (j % 4));
                v.push(format!("// k0 + {j}: e4m3 byte {} of {w}", j % 4));
                v.push(shift("r_m", &w, s, 20));
                v.push("and.b32         r_m, r_m, 0x07F00000;".into());
                v.push(shift("r_t0", &w, s + 7, 31));
                v.push("and.b32         r_t0, r_t0, 0x80000000;".into());
                v.push("or.b32          r_t0, r_t0, r_m;".into());
                v.push("mov.b32         f_w, r_t0;".into());
                v.push("mul.rn.f32      f_w, f_w, 0f7B800000;".into()); // x 2^120, exact
                v.push("setp.eq.u32     p_t, r_m, 0x07F00000;".into()); // S.1111.111: NaN
                v.push("selp.f32        f_w, 0f7FFFFFFF, f_w, p_t;".into());
                v.push("mul.rn.f32      f_w, f_w, f_sc;".into());
                store_w(&mut v, j, qk);
            }
        }
        WeightFormat::Mxfp4 => {
            for j in 0..32 {
                let (w, s) = (format!("r_q{}", j / 8), 4 * (j % 8));
                v.push(format!("// k0 + {j}: e2m1 nibble {} of {w}", j % 8));
                v.push(shift("r_m", &w, s, 22));
                v.push("and.b32         r_m, r_m, 0x01C00000;".into());
                v.push(shift("r_t0", &w, s + 3, 31));
                v.push("and.b32         r_t0, r_t0, 0x80000000;".into());
                v.push("or.b32          r_t0, r_t0, r_m;".into());
                v.push("mov.b32         f_w, r_t0;".into());
                v.push("mul.rn.f32      f_w, f_w, 0f7E800000;".into()); // x 2^126, exact
                v.push("mul.rn.f32      f_w, f_w, f_sc;".into());
                store_w(&mut v, j, qk);
            }
        }
        WeightFormat::Int4 { .. } => {
            // G % 32 == 0 (p_ga, uniform): the chunk lies in one group; otherwise the group
            // advances where k reaches a multiple of G.
            v.push("@p_ga bra       Q_I4ONE;".into());
            int4_elems(&mut v, f, true);
            v.push("bra.uni         Q_I4DONE;".into());
            v.push("Q_I4ONE:".into());
            int4_elems(&mut v, f, false);
            v.push("Q_I4DONE:".into());
        }
        WeightFormat::Dense(_) => {}
    }
    join(v)
}

/// The 32 INT4 weights of r_q0..3; `track`: advance the group inside the chunk.
fn int4_elems(v: &mut Vec<String>, f: WeightFormat, track: bool) {
    let qk = f.k_tile();
    for j in 0..32 {
        let (w, s) = (format!("r_q{}", j / 8), 4 * (j % 8));
        v.push(format!("// k0 + {j}: nibble {} of {w}", j % 8));
        if track && j > 0 {
            v.push("add.u32         r_rem, r_rem, 1;".into());
            v.push("setp.eq.u32     p_g, r_rem, r_G;".into());
            v.push(format!("setp.gt.and.u32 p_g, r_kv, {j}, p_g;"));
            v.push("@p_g mov.u32    r_rem, 0;".into());
            v.push("@p_g add.u32    r_g, r_g, 1;".into());
            v.push(format!("@p_g mul.wide.u32 d_t, r_g, {};", f.scale_size()));
            v.push("@p_g add.u64    d_t, d_sr, d_t;".into());
            v.push(format!("@p_g ld.global.nc.{} r_scr, [d_t];", scale_ld(f)));
            v.extend(scale_cvt(f, "@p_g "));
            v.push("and.pred        p_t, p_g, p_hz;".into());
            v.push("@p_t cvt.u64.u32 d_t, r_g;".into());
            v.push("@p_t add.u64    d_t, d_zr, d_t;".into());
            v.push("@p_t ld.global.nc.u8 r_z, [d_t];".into());
        }
        match s {
            0 => v.push(format!("and.b32         r_m, {w}, 15;")),
            28 => v.push(format!("shr.b32         r_m, {w}, 28;")),
            _ => {
                v.push(format!("shr.b32         r_m, {w}, {s};"));
                v.push("and.b32         r_m, r_m, 15;".into());
            }
        }
        v.push("sub.s32         r_m, r_m, r_z;".into());
        v.push("cvt.rn.f32.s32  f_w, r_m;".into()); // exact: |q - z| < 2^8
        v.push("mul.rn.f32      f_w, f_w, f_sc;".into());
        store_w(v, j, qk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::encode::{quantize, QuantSpec};
    use crate::tensor::Tensor;

    fn matrix(format: QuantFormat, scale: DType, k: usize, group: Option<usize>) -> QuantMatrix {
        let mut g = crate::synth::Gen::new(3);
        let t: Tensor = g.tensor(&[2, 5, k], 1.0);
        let spec = QuantSpec {
            format,
            scale_dtype: scale,
            group,
            zeros: format == QuantFormat::Int4,
        };
        quantize(&t, &spec).unwrap()
    }

    #[test]
    fn formats_and_shapes_of_valid_matrices() {
        let q = matrix(QuantFormat::Fp8Block, DType::BF16, 300, None);
        let s = check_matrix(&q, "up_proj").unwrap();
        assert_eq!(s.format, WeightFormat::Fp8 { scale: DType::BF16 });
        assert_eq!((s.row_bytes, s.scale_cols, s.scale_rows()), (300, 3, 1));
        let q = matrix(QuantFormat::Mxfp4, DType::F32, 64, None);
        let s = check_matrix(&q, "up_proj").unwrap();
        assert_eq!(s.format, WeightFormat::Mxfp4);
        assert_eq!((s.row_bytes, s.scale_cols, s.group), (32, 2, 32));
        // INT4 with an odd K and G = K: one scale per row, ceil(K/2) bytes per row.
        let q = matrix(QuantFormat::Int4, DType::F16, 13, Some(13));
        let s = check_matrix(&q, "down_proj").unwrap();
        assert_eq!(s.format, WeightFormat::Int4 { scale: DType::F16 });
        assert_eq!(
            (s.row_bytes, s.scale_cols, s.group, s.zeros),
            (7, 1, 13, true)
        );
        let q = matrix(QuantFormat::Int4, DType::F32, 50, Some(25));
        assert_eq!(check_matrix(&q, "x").unwrap().group, 25);
    }

    #[test]
    fn malformed_matrices_are_typed_errors() {
        let q = matrix(QuantFormat::Fp8Block, DType::F32, 40, None);
        let mut short = q.clone();
        short.codes.pop();
        assert!(matches!(
            check_matrix(&short, "up_proj"),
            Err(Error::Shape { .. })
        ));
        let mut zeros = q.clone();
        zeros.zeros = Some(vec![8; 2]);
        assert!(check_matrix(&zeros, "up_proj").is_err());
        let mut e8 = q.clone();
        e8.scales = Scales::E8m0(vec![127; 2]);
        let err = check_matrix(&e8, "up_proj").unwrap_err().to_string();
        assert!(err.contains("fp8 weights with U8 scales"), "{err}");
        let mut mx = matrix(QuantFormat::Mxfp4, DType::F32, 64, None);
        mx.cols = 48;
        assert!(check_matrix(&mx, "gate_proj").is_err());
        let mut i4 = matrix(QuantFormat::Int4, DType::BF16, 64, Some(32));
        if let Some(z) = i4.zeros.as_mut() {
            z.pop();
        }
        assert!(check_matrix(&i4, "down_proj").is_err());
        let mut i4 = matrix(QuantFormat::Int4, DType::BF16, 60, Some(20));
        // 3 scales per row, but a K of 64 has no group of 64 / 3.
        i4.cols = 64;
        i4.codes = vec![0; 2 * 5 * 32];
        assert!(check_matrix(&i4, "down_proj").is_err());
    }

    #[test]
    fn opt_in_error_names_the_variable() {
        let e = not_enabled("up_proj", WeightFormat::Mxfp4);
        assert!(matches!(
            e,
            Error::BackendUnavailable {
                backend: BackendKind::Cuda,
                ..
            }
        ));
        let msg = e.to_string();
        assert!(
            msg.contains("quantized weights on CUDA are unverified; set MOE_CUDA_QUANT=1"),
            "{msg}"
        );
    }

    #[test]
    fn decode_code_shifts_every_code_into_place() {
        // e4m3 byte 2 of a word (bits 16..23): magnitude to bit 20 (shl 4), sign bit 23 to 31.
        let fp8 = qb_decode(WeightFormat::Fp8 { scale: DType::F32 });
        assert!(fp8.contains("shl.b32         r_m, r_q0, 4;"));
        assert!(fp8.contains("shl.b32         r_t0, r_q0, 8;"));
        assert!(fp8.contains("shr.b32         r_m, r_q3, 4;")); // byte 3: bits 24..30 -> 20
        assert_eq!(fp8.matches("st.shared.f32").count(), 16);
        // e2m1 nibble 7 (bits 28..31): magnitude 28 -> 22, sign 31 stays.
        let mx = qb_decode(WeightFormat::Mxfp4);
        assert!(mx.contains("shr.b32         r_m, r_q3, 6;"));
        assert!(mx.contains("shl.b32         r_t0, r_q3, 0;"));
        assert_eq!(mx.matches("st.shared.f32").count(), 32);
        // INT4: both decode blocks, the tracking one reloading the scale 31 times at most.
        let i4 = qb_decode(WeightFormat::Int4 { scale: DType::BF16 });
        assert_eq!(i4.matches("st.shared.f32").count(), 64);
        assert_eq!(
            i4.matches("@p_g ld.global.nc.u16 r_scr, [d_t];").count(),
            31
        );
        // Bs starts at 528 QK: the last weight of a 4-bit chunk is k row 31.
        assert!(i4.contains(&format!("[r_soff+{}], f_w;", 528 * 64 + 528 * 31)));
    }

    /// The decode recipes of the template header, run here on the host with f32 bit
    /// operations exactly as the PTX does, against src/quant/decode.rs for every code.
    #[test]
    fn decode_recipes_match_the_reference_for_every_code() {
        use crate::quant::decode;
        for b in 0u32..256 {
            let bits = ((b & 0x80) << 24) | ((b & 0x7F) << 20);
            let v = f32::from_bits(bits) * f32::from_bits(0x7B80_0000);
            let v = if b & 0x7F == 0x7F { f32::NAN } else { v };
            let want = decode::e4m3(b as u8);
            assert!(
                v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                "e4m3 {b:#04x}: {v} vs {want}"
            );
        }
        for q in 0u32..16 {
            let bits = ((q & 8) << 28) | ((q & 7) << 22);
            let v = f32::from_bits(bits) * f32::from_bits(0x7E80_0000);
            assert_eq!(v.to_bits(), decode::e2m1(q as u8).to_bits(), "e2m1 {q}");
            for code in 0u32..256 {
                let s = if code == 0 { 0x0040_0000 } else { code << 23 };
                assert_eq!(s, decode::e8m0_bits(code as u8), "e8m0 {code}");
                let w = v * f32::from_bits(s);
                let want = decode::mxfp4(q as u8, code as u8);
                assert!(
                    w.to_bits() == want.to_bits() || (w.is_nan() && want.is_nan()),
                    "mxfp4 {q} {code}"
                );
            }
        }
    }
}
