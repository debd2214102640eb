//! Stage 1 on CUDA in one launch (kernels/gate_fused.ptx, opt-in `MOE_CUDA_KERNELS=next`):
//! every routing variant (softmax / sigmoid / logits, correction bias, groups, capacity with
//! either priority, expert choice) with counts and capacity ranks, without a memset, a scan
//! or any second launch.
//!
//! Blocks take tickets in the order they start and do one work item of a phase (SELECT,
//! RANK, COUNT, SCAN, FINALIZE); a block only waits for blocks with smaller tickets, so the
//! launch needs no co-residency. The batch-wide phases and the general select are the
//! verified kernels of kernels/gate.ptx, pasted in ([`pasted_body`]); the FAST select
//! ([`fast_select`]) keeps each token's experts in registers across a segment of `L` lanes.
//! The control block ([`ctl_len`] words, zeroed once at allocation) is left zero by every
//! launch.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use crate::config::{Combine, Priority, RoutingConfig, Scoring};
use crate::cuda::context::{check_len, drv, to_u32};
use crate::cuda::ptx::PtxModule;
use crate::cuda::{CudaDevice, GateCuda};
use crate::error::{Error, Result};
use crate::stage::Stage;

/// The template, embedded at build time.
const TEMPLATE: &str = include_str!("../../kernels/gate_fused.ptx");
/// Threads per block (8 warps).
const THREADS: usize = 256;
/// Dynamic shared memory the general select may use in the shared variant (8 warps' buffers).
pub const SHARED_MAX: usize = 200 * 1024;
/// Most picks the FAST select keeps in registers.
pub const FAST_MAX_SLOTS: usize = 8;
/// Most experts the FAST select covers (32 lanes of 8).
pub const FAST_MAX_EXPERTS: usize = 256;
/// Experts per lane in the FAST select.
const PER_LANE: usize = 8;

/// Phase kinds (kernels/gate_fused.ptx header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Phase {
    /// Register-resident select, L lanes per token.
    SelectFast = 0,
    /// kernels/gate.ptx gate_select, one warp per token.
    SelectGeneral = 1,
    /// gate_rank (BPR order or expert-choice kept).
    Rank = 2,
    /// gate_cap_count.
    Count = 3,
    /// gate_cap_scan.
    Scan = 4,
    /// gate_finalize.
    Finalize = 5,
}

/// The kernels/gate.ptx kernels pasted into the fused one: entry, parameter prefix, template
/// slot, and the body's first early exit, which skips a whole warp (gate_select, gate_cap_scan,
/// gate_finalize: a warp past the last token / expert) or block (gate_rank, gate_cap_count):
/// uniform, so marked `bra.uni` once the exit no longer ends the thread (see [`pasted_body`]).
const PASTED: [(&str, &str, &str, &str); 5] = [
    (
        "gate_select",
        "sel",
        "SELECT_BODY",
        "@%q_exit bra    $SEL_DONE;",
    ),
    (
        "gate_rank",
        "rank",
        "RANK_BODY",
        "@%q bra         $RANK_DONE;",
    ),
    (
        "gate_cap_count",
        "cnt",
        "COUNT_BODY",
        "@%q bra         $CNT_DONE;",
    ),
    (
        "gate_cap_scan",
        "scan",
        "SCAN_BODY",
        "@%q bra         $SCAN_DONE;",
    ),
    (
        "gate_finalize",
        "fin",
        "FINALIZE_BODY",
        "@%q bra         $FIN_DONE;",
    ),
];

fn err(what: impl Into<String>) -> Error {
    Error::shape(Stage::Gate, what)
}

/// The text between the braces of kernel `entry` in `src` (a rendered kernels/gate.ptx
/// module) and its parameter list `(name, type)`.
fn entry_text<'a>(src: &'a str, entry: &str) -> Result<(&'a str, Vec<(String, String)>)> {
    let head = format!(".visible .entry {entry}(");
    let start = src
        .find(&head)
        .ok_or_else(|| err(format!("kernels/gate.ptx has no {entry}")))?;
    let plist_end = start
        + src[start..]
            .find(')')
            .ok_or_else(|| err(format!("{entry}: unterminated parameter list")))?;
    let params = src[start + head.len()..plist_end]
        .split(',')
        .filter_map(|p| {
            let mut it = p.split_whitespace();
            match (it.next(), it.next(), it.next()) {
                (Some(".param"), Some(t), Some(n)) => Some((n.to_string(), t.to_string())),
                _ => None,
            }
        })
        .collect();
    let open = plist_end
        + src[plist_end..]
            .find('{')
            .ok_or_else(|| err(format!("{entry}: no body")))?;
    let mut depth = 0usize;
    for (i, ch) in src[open..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Ok((&src[open + 1..open + i], params));
                }
            }
            _ => {}
        }
    }
    Err(err(format!("{entry}: unbalanced braces")))
}

/// Kernel `entry` of the rendered kernels/gate.ptx module `src` as a block of the fused
/// kernel: its parameters read as `prefix_name`, the block index replaced by the work item
/// (`%fz_item`; one-dimensional: `%ctaid.y` 0, `%nctaid.x` 1), `ret` by a branch to the
/// phase end, and the first line equal to `uniform_exit` (trimmed) made `bra.uni`. In the
/// kernel of its own that exit ended the thread; here the thread goes on to the phase end, so
/// ptxas would otherwise have to assume divergent warps at every later shfl / redux.
/// Returns the body and the prefixed parameter declarations.
pub fn pasted_body(
    src: &str,
    entry: &str,
    prefix: &str,
    uniform_exit: &str,
) -> Result<(String, Vec<String>)> {
    let (body, params) = entry_text(src, entry)?;
    let mut out = String::with_capacity(body.len());
    let mut marked = false;
    for line in body.split_inclusive('\n') {
        let t = line.trim_start();
        let mut l = line.to_string();
        if !marked && t.trim_end() == uniform_exit {
            l = l.replacen(" bra ", " bra.uni", 1);
            marked = true;
        }
        if t.starts_with("ld.param.") {
            let (Some(a), Some(b)) = (l.find('['), l.find(']')) else {
                return Err(err(format!("{entry}: odd parameter load {t:?}")));
            };
            l = format!("{}[{prefix}_{}{}", &l[..a], &l[a + 1..b], &l[b..]);
        }
        l = l
            .replace("%ctaid.x", "%fz_item")
            .replace("%ctaid.y", "0")
            .replace("%nctaid.x", "1");
        if t.starts_with("ret;") {
            l = l.replace("ret;", "bra.uni         $FZ_END;");
        }
        out.push_str(&l);
    }
    if out.contains("%nctaid.y") || out.contains("%ctaid.z") || out.contains("\tret") {
        return Err(err(format!(
            "{entry}: a grid index or ret is left in the body"
        )));
    }
    if !marked {
        return Err(err(format!("{entry}: no early exit {uniform_exit:?}")));
    }
    let decls = params
        .iter()
        .map(|(n, t)| format!("\t.param {t} {prefix}_{n}"))
        .collect();
    Ok((out, decls))
}

/// `f(i)` for i in 0..n, one line group each, joined.
fn unroll(n: usize, f: impl Fn(usize) -> String) -> String {
    (0..n).map(f).collect::<Vec<_>>().join("\n")
}

/// The orderable key of the f32 in `%fs_c` into `%fs_h` (-0 as +0, NaN -> 1): the mapping of
/// kernels/gate.ptx.
fn key_of(c: &str) -> String {
    format!(
        "\tsetp.eq.f32     %fs_z, {c}, 0f00000000;
\tselp.f32        {c}, 0f00000000, {c}, %fs_z;
\tmov.b32         %fs_bits, {c};
\tshr.s32         %fs_sg, %fs_bits, 31;
\tor.b32          %fs_sg, %fs_sg, 0x80000000;
\txor.b32         %fs_h, %fs_bits, %fs_sg;
\tsetp.nan.f32    %fs_n, {c}, {c};
\tselp.b32        %fs_h, 1, %fs_h, %fs_n;"
    )
}

/// A butterfly over the segment of the f32 `reg` with `op` (`max.f32` or `add.rn.f32`).
fn bfly32(reg: &str, op: &str, label: &str) -> String {
    format!(
        "\tshr.u32         %fs_o, %fs_L, 1;
{label}:
\tsetp.eq.u32     %fs_q, %fs_o, 0;
\t@%fs_q bra      {label}_DONE;
\tshfl.sync.bfly.b32 %fs_f, {reg}, %fs_o, 0x1f, 0xffffffff;
\t{op} {reg}, {reg}, %fs_f;
\tshr.u32         %fs_o, %fs_o, 1;
\tbra.uni         {label};
{label}_DONE:"
    )
}

/// The FAST select (kernels/gate_fused.ptx, kind 0): lane `lis` of a token's segment of L
/// lanes holds experts 8 lis .. 8 lis + 7 in registers. Generated unrolled code (8 experts,
/// 8 slots), one step per line group; the header of kernels/gate_fused.ptx describes it.
pub fn fast_select() -> String {
    let mut s = String::new();
    s += "\t.reg .pred  %fs_q, %fs_valid, %fs_bias, %fs_ss, %fs_final, %fs_renorm, %fs_top1;
\t.reg .pred  %fs_div, %fs_z, %fs_n, %fs_ga, %fs_st, %fs_gt, %fs_eq, %fs_lt, %fs_full;
\t.reg .pred  %fs_qv<8>, %fs_qb<8>, %fs_pj<8>;
\t.reg .b32   %fs_tid, %fs_L, %fs_lgL, %fs_lis, %fs_seg, %fs_tok, %fs_T, %fs_E, %fs_S;
\t.reg .b32   %fs_G, %fs_keep, %fs_gsz, %fs_GL, %fs_lgGL, %fs_scoring, %fs_flags, %fs_e0;
\t.reg .b32   %fs_t, %fs_c, %fs_bits, %fs_sg, %fs_h, %fs_lo, %fs_hi, %fs_idx, %fs_src;
\t.reg .b32   %fs_g, %fs_gg, %fs_rank, %fs_o, %fs_a, %fs_one, %fs_segc, %fs_lm1, %fs_e;
\t.reg .b32   %fs_h1, %fs_h2, %fs_id<8>, %fs_ex<8>, %fs_mh, %fs_wi, %fs_stg;
\t.reg .f32   %fs_x<8>, %fs_b<8>, %fs_s<8>, %fs_ps<8>, %fs_px<8>, %fs_w<8>;
\t.reg .f32   %fs_m, %fs_sum, %fs_inv, %fs_f, %fs_mx, %fs_sum1, %fs_sum2;
\t.reg .f32   %fs_scale, %fs_c1, %fs_c2;
\t.reg .b64   %fs_v<8>, %fs_best, %fs_p1, %fs_p2, %fs_k1, %fs_k2, %fs_kmin, %fs_gk, %fs_pk;
\t.reg .b64   %fs_row, %fs_pb, %fs_t64, %fs_u64, %fs_ids, %fs_wts, %fs_kept, %fs_ptop1;
\t.reg .f64   %fs_d1, %fs_d2;

\t// ---- the lane's token and experts
\tmov.u32         %fs_tid, %tid.x;
\tld.param.u32    %fs_L, [fast_lanes];
\tbfind.u32       %fs_lgL, %fs_L;
\tsub.u32         %fs_lm1, %fs_L, 1;
\tand.b32         %fs_lis, %fs_tid, %fs_lm1;       // lane in the token's segment
\tshr.u32         %fs_seg, %fs_tid, %fs_lgL;       // segment (token) in the block
\tmov.u32         %fs_c, 256;
\tshr.u32         %fs_c, %fs_c, %fs_lgL;           // tokens per block
\tmad.lo.u32      %fs_tok, %fz_item, %fs_c, %fs_seg;
\tld.param.u32    %fs_T, [sel_tokens];
\t// a warp whose first token is past T has nothing to do (warp-uniform)
\tand.b32         %fs_t, %fs_tid, 0xFFFFFFE0;
\tshr.u32         %fs_t, %fs_t, %fs_lgL;
\tmad.lo.u32      %fs_t, %fz_item, %fs_c, %fs_t;
\tsetp.ge.u32     %fs_q, %fs_t, %fs_T;
\t@%fs_q bra.uni  $FS_DONE;
\tsetp.lt.u32     %fs_valid, %fs_tok, %fs_T;
\tld.param.u32    %fs_E, [sel_experts];
\tld.param.u32    %fs_S, [sel_slots];
\tld.param.u32    %fs_G, [sel_groups];
\tld.param.u32    %fs_keep, [sel_keep];
\tld.param.u32    %fs_gsz, [sel_group_size];
\tld.param.u32    %fs_GL, [sel_group_lanes];
\tld.param.u32    %fs_scoring, [sel_scoring];
\tld.param.u32    %fs_flags, [sel_flags];
\tld.param.f32    %fs_scale, [sel_scale];
\tand.b32         %fs_t, %fs_flags, 1;
\tsetp.ne.u32     %fs_renorm, %fs_t, 0;
\tand.b32         %fs_t, %fs_flags, 2;
\tsetp.ne.u32     %fs_final, %fs_t, 0;
\tand.b32         %fs_t, %fs_flags, 4;
\tsetp.ne.u32     %fs_bias, %fs_t, 0;
\tand.b32         %fs_t, %fs_flags, 8;
\tsetp.ne.u32     %fs_top1, %fs_t, 0;
\tand.b32         %fs_t, %fs_flags, 32;
\tsetp.ne.u32     %fs_ss, %fs_t, 0;
\tmov.u32         %fs_one, 1;
\t// shfl.idx inside the segment: segment mask (32 - L) << 8, clamp 31
\tmov.u32         %fs_segc, 32;
\tsub.u32         %fs_segc, %fs_segc, %fs_L;
\tshl.b32         %fs_segc, %fs_segc, 8;
\tor.b32          %fs_segc, %fs_segc, 0x1f;
\tshl.b32         %fs_e0, %fs_lis, 3;              // first expert of the lane
\tadd.u32         %fs_ex0, %fs_e0, 0;
\tadd.u32         %fs_ex1, %fs_e0, 1;
\tadd.u32         %fs_ex2, %fs_e0, 2;
\tadd.u32         %fs_ex3, %fs_e0, 3;
\tadd.u32         %fs_ex4, %fs_e0, 4;
\tadd.u32         %fs_ex5, %fs_e0, 5;
\tadd.u32         %fs_ex6, %fs_e0, 6;
\tadd.u32         %fs_ex7, %fs_e0, 7;
\tsetp.eq.u32     %fs_full, %fs_L, 32;             // one token per warp: redux.sync
\t// staging of s (and logits) in shared memory: thread tid's experts at [8 tid, 8 tid + 8),
\t// so expert e of the token is at 8 (first thread of the segment) + e
\tmov.u32         %fs_stg, gate_fused_stage;
\tmad.lo.u32      %fs_stg, %fs_tid, 32, %fs_stg;    // &stage[8 tid]
\tmul.wide.u32    %fs_t64, %fs_tok, %fs_E;
\tcvt.u64.u32     %fs_u64, %fs_e0;
\tadd.u64         %fs_t64, %fs_t64, %fs_u64;
\tshl.b64         %fs_t64, %fs_t64, 2;
\tld.param.u64    %fs_row, [sel_logits];
\tcvta.to.global.u64 %fs_row, %fs_row;
\tadd.u64         %fs_row, %fs_row, %fs_t64;       // &logits[tok, e0]
\tld.param.u64    %fs_pb, [sel_bias];
\tcvta.to.global.u64 %fs_pb, %fs_pb;
\tmul.wide.u32    %fs_t64, %fs_e0, 4;
\tadd.u64         %fs_pb, %fs_pb, %fs_t64;         // &bias[e0]

\t// ---- logits (and bias): 8 independent loads per lane, -inf / 0 where absent
";
    s += &unroll(PER_LANE, |i| {
        format!(
            "\tsetp.lt.u32     %fs_qv{i}, %fs_ex{i}, %fs_E;
\tand.pred        %fs_qv{i}, %fs_qv{i}, %fs_valid;
\tand.pred        %fs_qb{i}, %fs_qv{i}, %fs_bias;
\tmov.f32         %fs_x{i}, 0fFF800000;
\tmov.f32         %fs_b{i}, 0f00000000;
\t@%fs_qv{i} ld.global.nc.f32 %fs_x{i}, [%fs_row+{o}];
\t@%fs_qb{i} ld.global.nc.f32 %fs_b{i}, [%fs_pb+{o}];",
            o = 4 * i
        )
    });
    s += "
\t// ---- scores s: softmax over E (max and sum by butterflies over the segment), sigmoid, or
\t//      the logit (the formulas of kernels/gate.ptx gate_select)
\tsetp.ne.u32     %fs_q, %fs_scoring, 0;
\t@%fs_q bra      $FS_NOT_SOFTMAX;
\tmov.f32         %fs_m, %fs_x0;
";
    s += &unroll(PER_LANE - 1, |i| {
        format!("\tmax.f32         %fs_m, %fs_m, %fs_x{};", i + 1)
    });
    s += "\n";
    s += &bfly32("%fs_m", "max.f32        ", "$FS_MAX");
    s += "\n\tmov.f32         %fs_sum, 0f00000000;\n";
    s += &unroll(PER_LANE, |i| {
        format!(
            "\tsub.rn.f32      %fs_f, %fs_x{i}, %fs_m;
\tmul.rn.f32      %fs_f, %fs_f, 0f3FB8AA3B;
\tex2.approx.ftz.f32 %fs_s{i}, %fs_f;
\tadd.rn.f32      %fs_sum, %fs_sum, %fs_s{i};"
        )
    });
    s += "\n";
    s += &bfly32("%fs_sum", "add.rn.f32     ", "$FS_SUM");
    s += "\n\trcp.rn.f32      %fs_inv, %fs_sum;\n";
    s += &unroll(PER_LANE, |i| {
        format!("\tmul.rn.f32      %fs_s{i}, %fs_s{i}, %fs_inv;")
    });
    s += "
\tbra.uni         $FS_KEYS;
$FS_NOT_SOFTMAX:
\tsetp.ne.u32     %fs_q, %fs_scoring, 1;
\t@%fs_q bra      $FS_LOGITS;
";
    s += &unroll(PER_LANE, |i| {
        format!(
            "\tmul.rn.f32      %fs_f, %fs_x{i}, 0fBFB8AA3B;
\tex2.approx.ftz.f32 %fs_f, %fs_f;
\tadd.rn.f32      %fs_f, %fs_f, 0f3F800000;
\trcp.approx.ftz.f32 %fs_s{i}, %fs_f;"
        )
    });
    s += "
\tbra.uni         $FS_KEYS;
$FS_LOGITS:
";
    s += &unroll(PER_LANE, |i| {
        format!("\tmov.f32         %fs_s{i}, %fs_x{i};")
    });
    s += "
$FS_KEYS:
\t// ---- keys: v = {hi key(s + bias), lo ~expert}; 0 for absent experts
";
    s += &unroll(PER_LANE, |i| {
        format!(
            "\tadd.rn.f32      %fs_c1, %fs_s{i}, %fs_b{i};
{key}
\tnot.b32         %fs_e, %fs_ex{i};
\tmov.b64         %fs_v{i}, {{%fs_e, %fs_h}};
\t@!%fs_qv{i} mov.b64 %fs_v{i}, 0;",
            key = key_of("%fs_c1")
        )
    });
    s += "
\t// ---- groups: each group is GL whole lanes; top-2 by lane then a butterfly over the
\t//      group's lanes; score in f64; rank against every group; drop the lane's experts
\t//      when its group ranks >= keep
\tsetp.eq.u32     %fs_q, %fs_G, 0;
\t@%fs_q bra      $FS_PICKS;
\tbfind.u32       %fs_lgGL, %fs_GL;
\tshr.u32         %fs_g, %fs_lis, %fs_lgGL;       // the lane's group
\tsetp.lt.u32     %fs_ga, %fs_g, %fs_G;
\tmov.b64         %fs_k1, 0;
\tmov.b64         %fs_k2, 0;
";
    s += &unroll(PER_LANE, |i| {
        format!(
            "\tmin.u64         %fs_kmin, %fs_v{i}, %fs_k1;
\tmax.u64         %fs_k2, %fs_k2, %fs_kmin;
\tmax.u64         %fs_k1, %fs_k1, %fs_v{i};"
        )
    });
    s += "
\tmov.u32         %fs_o, 1;
$FS_GMERGE:
\tsetp.ge.u32     %fs_q, %fs_o, %fs_GL;
\t@%fs_q bra      $FS_GSCORE;
\tmov.b64         {%fs_lo, %fs_hi}, %fs_k1;
\tshfl.sync.bfly.b32 %fs_lo, %fs_lo, %fs_o, 0x1f, 0xffffffff;
\tshfl.sync.bfly.b32 %fs_hi, %fs_hi, %fs_o, 0x1f, 0xffffffff;
\tmov.b64         %fs_p1, {%fs_lo, %fs_hi};
\tmov.b64         {%fs_lo, %fs_hi}, %fs_k2;
\tshfl.sync.bfly.b32 %fs_lo, %fs_lo, %fs_o, 0x1f, 0xffffffff;
\tshfl.sync.bfly.b32 %fs_hi, %fs_hi, %fs_o, 0x1f, 0xffffffff;
\tmov.b64         %fs_p2, {%fs_lo, %fs_hi};
\tmin.u64         %fs_kmin, %fs_k1, %fs_p1;
\tmax.u64         %fs_k1, %fs_k1, %fs_p1;
\tmax.u64         %fs_k2, %fs_k2, %fs_p2;
\tmax.u64         %fs_k2, %fs_k2, %fs_kmin;
\tshl.b32         %fs_o, %fs_o, 1;
\tbra.uni         $FS_GMERGE;
$FS_GSCORE:
\t// decode key -> value: 1 -> NaN, >= 2^31 -> bits & 0x7fffffff, else ~bits
\tmov.b64         {%fs_lo, %fs_h1}, %fs_k1;
\tmov.b64         {%fs_lo, %fs_h2}, %fs_k2;
\tsetp.ge.u32     %fs_q, %fs_h1, 0x80000000;
\tand.b32         %fs_t, %fs_h1, 0x7FFFFFFF;
\tnot.b32         %fs_bits, %fs_h1;
\tselp.b32        %fs_bits, %fs_t, %fs_bits, %fs_q;
\tsetp.eq.u32     %fs_q, %fs_h1, 1;
\tselp.b32        %fs_bits, 0x7FC00000, %fs_bits, %fs_q;
\tmov.b32         %fs_c1, %fs_bits;
\tsetp.ge.u32     %fs_q, %fs_h2, 0x80000000;
\tand.b32         %fs_t, %fs_h2, 0x7FFFFFFF;
\tnot.b32         %fs_bits, %fs_h2;
\tselp.b32        %fs_bits, %fs_t, %fs_bits, %fs_q;
\tsetp.eq.u32     %fs_q, %fs_h2, 1;
\tselp.b32        %fs_bits, 0x7FC00000, %fs_bits, %fs_q;
\tmov.b32         %fs_c2, %fs_bits;
\t// group score in f64 (the sum of two f32 values is exact there, as in the reference)
\tcvt.f64.f32     %fs_d1, %fs_c1;
\tcvt.f64.f32     %fs_d2, %fs_c2;
\tsetp.ge.u32     %fs_q, %fs_gsz, 2;
\t@%fs_q add.rn.f64 %fs_d1, %fs_d1, %fs_d2;
\tsetp.eq.f64     %fs_z, %fs_d1, 0d0000000000000000;
\tselp.f64        %fs_d1, 0d0000000000000000, %fs_d1, %fs_z;
\tmov.b64         %fs_gk, %fs_d1;
\tshr.s64         %fs_kmin, %fs_gk, 63;
\tor.b64          %fs_kmin, %fs_kmin, 0x8000000000000000;
\txor.b64         %fs_gk, %fs_gk, %fs_kmin;
\tsetp.nan.f64    %fs_n, %fs_d1, %fs_d1;
\tselp.b64        %fs_gk, 1, %fs_gk, %fs_n;
\t// rank = #groups g' with key' > key, or key' == key and g' < g (g' from its first lane)
\tmov.u32         %fs_rank, 0;
\tmov.u32         %fs_gg, 0;
$FS_GRANK:
\tsetp.ge.u32     %fs_q, %fs_gg, %fs_G;
\t@%fs_q bra      $FS_GDROP;
\tmul.lo.u32      %fs_src, %fs_gg, %fs_GL;
\tmov.b64         {%fs_lo, %fs_hi}, %fs_gk;
\tshfl.sync.idx.b32 %fs_lo, %fs_lo, %fs_src, %fs_segc, 0xffffffff;
\tshfl.sync.idx.b32 %fs_hi, %fs_hi, %fs_src, %fs_segc, 0xffffffff;
\tmov.b64         %fs_pk, {%fs_lo, %fs_hi};
\tsetp.gt.u64     %fs_gt, %fs_pk, %fs_gk;
\tsetp.eq.u64     %fs_eq, %fs_pk, %fs_gk;
\tsetp.lt.u32     %fs_lt, %fs_gg, %fs_g;
\tand.pred        %fs_eq, %fs_eq, %fs_lt;
\tor.pred         %fs_gt, %fs_gt, %fs_eq;
\tselp.u32        %fs_t, 1, 0, %fs_gt;
\tadd.u32         %fs_rank, %fs_rank, %fs_t;
\tadd.u32         %fs_gg, %fs_gg, 1;
\tbra.uni         $FS_GRANK;
$FS_GDROP:
\tsetp.ge.u32     %fs_q, %fs_rank, %fs_keep;
\tand.pred        %fs_q, %fs_q, %fs_ga;
";
    s += &unroll(PER_LANE, |i| format!("\t@%fs_q mov.b64 %fs_v{i}, 0;"));
    s += "
$FS_PICKS:
\t// ---- stage s (and the logit, for softmax_selected) for the weights after the picks
\tst.shared.v4.f32 [%fs_stg+0], {%fs_s0, %fs_s1, %fs_s2, %fs_s3};
\tst.shared.v4.f32 [%fs_stg+16], {%fs_s4, %fs_s5, %fs_s6, %fs_s7};
\t@%fs_ss st.shared.v4.f32 [%fs_stg+8192], {%fs_x0, %fs_x1, %fs_x2, %fs_x3};
\t@%fs_ss st.shared.v4.f32 [%fs_stg+8208], {%fs_x4, %fs_x5, %fs_x6, %fs_x7};
\t// ---- S picks: the lane's best v (key, then the lower expert), the segment's best (a
\t//      butterfly over the segment, or two redux.sync over the warp when L = 32: largest key,
\t//      then the lowest expert holding it); the owner drops it. Every collective runs with
\t//      the constant full mask on converged warps (no WARPSYNC.COLLECTIVE fallback).
";
    for j in 0..FAST_MAX_SLOTS {
        s += &format!(
            "\tsetp.lt.u32     %fs_pj{j}, {j}, %fs_S;
\tmov.u32         %fs_id{j}, 0xFFFFFFFF;
"
        );
    }
    for j in 0..FAST_MAX_SLOTS {
        s += &format!("\t@!%fs_pj{j} bra   $FS_PICKS_DONE;\n\tmov.b64         %fs_best, %fs_v0;\n");
        s += &unroll(PER_LANE - 1, |i| {
            format!("\tmax.u64         %fs_best, %fs_best, %fs_v{};", i + 1)
        });
        s += &format!(
            "
\t@%fs_full bra.uni $FS_R{j};
\t// L < 32: a butterfly of 64-bit maxima over the segment (xor offsets below L stay in it)
\tshr.u32         %fs_o, %fs_L, 1;
$FS_B{j}:
\tsetp.eq.u32     %fs_q, %fs_o, 0;
\t@%fs_q bra.uni  $FS_B{j}_DONE;
\tmov.b64         {{%fs_lo, %fs_hi}}, %fs_best;
\tshfl.sync.bfly.b32 %fs_lo, %fs_lo, %fs_o, 0x1f, 0xffffffff;
\tshfl.sync.bfly.b32 %fs_hi, %fs_hi, %fs_o, 0x1f, 0xffffffff;
\tmov.b64         %fs_p1, {{%fs_lo, %fs_hi}};
\tmax.u64         %fs_best, %fs_best, %fs_p1;
\tshr.u32         %fs_o, %fs_o, 1;
\tbra.uni         $FS_B{j};
$FS_B{j}_DONE:
\tmov.b64         {{%fs_lo, %fs_hi}}, %fs_best;
\tnot.b32         %fs_wi, %fs_lo;                 // 0xFFFFFFFF when nothing is left (v = 0)
\tbra.uni         $FS_R{j}_DONE;
$FS_R{j}:
\t// L = 32: the largest key by one redux, then the lowest expert holding it by another
\tmov.b64         {{%fs_lo, %fs_hi}}, %fs_best;
\tredux.sync.max.u32 %fs_mh, %fs_hi, 0xffffffff;
\tsetp.eq.u32     %fs_q, %fs_hi, %fs_mh;
\tnot.b32         %fs_idx, %fs_lo;                // 0xFFFFFFFF for an empty entry (v = 0)
\tselp.b32        %fs_idx, %fs_idx, 0xFFFFFFFF, %fs_q;
\tredux.sync.min.u32 %fs_wi, %fs_idx, 0xffffffff;
$FS_R{j}_DONE:
\tmov.u32         %fs_id{j}, %fs_wi;
"
        );
        s += &unroll(PER_LANE, |i| {
            format!(
                "\tsetp.eq.u32     %fs_q, %fs_ex{i}, %fs_wi;
\t@%fs_q mov.b64  %fs_v{i}, 0;"
            )
        });
        s += "\n";
    }
    s += "$FS_PICKS_DONE:
\t// ---- weights: s of each pick, or the softmax over the picked logits (softmax_selected),
\t//      sums in slot order; FINAL: renormalized (kept ones: all), times scale
\tbar.warp.sync   0xffffffff;                     // the segment's staged s are visible
\tnot.b32         %fs_c, %fs_lm1;
\tand.b32         %fs_t, %fs_tid, %fs_c;
\tmov.u32         %fs_c, gate_fused_stage;
\tmad.lo.u32      %fs_c, %fs_t, 32, %fs_c;        // &stage[8 (segment's first thread)]
";
    s += &unroll(FAST_MAX_SLOTS, |j| {
        format!(
            "\tmov.f32         %fs_ps{j}, 0f00000000;
\tmov.f32         %fs_px{j}, 0f00000000;
\tsetp.lt.u32     %fs_q, %fs_id{j}, %fs_E;
\tmad.lo.u32      %fs_t, %fs_id{j}, 4, %fs_c;
\t@%fs_q ld.shared.f32 %fs_ps{j}, [%fs_t];
\tand.pred        %fs_q, %fs_q, %fs_ss;
\t@%fs_q ld.shared.f32 %fs_px{j}, [%fs_t+8192];
\tmov.f32         %fs_w{j}, %fs_ps{j};"
        )
    });
    s += "
\t@!%fs_ss bra    $FS_WSUM;
\tmov.f32         %fs_mx, 0fFF800000;
";
    s += &unroll(FAST_MAX_SLOTS, |j| {
        format!("\t@%fs_pj{j} max.f32 %fs_mx, %fs_mx, %fs_px{j};")
    });
    s += "\n\tmov.f32         %fs_sum1, 0f00000000;\n";
    s += &unroll(FAST_MAX_SLOTS, |j| {
        format!(
            "\tsub.rn.f32      %fs_f, %fs_px{j}, %fs_mx;
\tmul.rn.f32      %fs_f, %fs_f, 0f3FB8AA3B;
\tex2.approx.ftz.f32 %fs_w{j}, %fs_f;
\t@%fs_pj{j} add.rn.f32 %fs_sum1, %fs_sum1, %fs_w{j};"
        )
    });
    s += "\n";
    s += &unroll(FAST_MAX_SLOTS, |j| {
        format!("\tdiv.rn.f32      %fs_w{j}, %fs_w{j}, %fs_sum1;")
    });
    s += "
$FS_WSUM:
\tand.pred        %fs_q, %fs_final, %fs_renorm;
\tmov.f32         %fs_sum2, 0f00000000;
";
    s += &unroll(FAST_MAX_SLOTS, |j| {
        format!("\t@%fs_pj{j} add.rn.f32 %fs_sum2, %fs_sum2, %fs_w{j};")
    });
    s += "
\t// divide when renormalizing and sum != 0 (unordered: a NaN sum divides too)
\tsetp.neu.f32    %fs_div, %fs_sum2, 0f00000000;
\tand.pred        %fs_div, %fs_div, %fs_q;
";
    s += &unroll(FAST_MAX_SLOTS, |j| {
        format!(
            "\t@%fs_div div.rn.f32 %fs_w{j}, %fs_w{j}, %fs_sum2;
\t@%fs_final mul.rn.f32 %fs_w{j}, %fs_w{j}, %fs_scale;"
        )
    });
    s += "
\t// ---- stores: slot j by the lane j mod L of the segment
\tld.param.u64    %fs_ids, [sel_topk_ids];
\tcvta.to.global.u64 %fs_ids, %fs_ids;
\tld.param.u64    %fs_wts, [sel_topk_weights];
\tcvta.to.global.u64 %fs_wts, %fs_wts;
\tld.param.u64    %fs_kept, [sel_kept];
\tcvta.to.global.u64 %fs_kept, %fs_kept;
";
    s += &unroll(FAST_MAX_SLOTS, |j| {
        format!(
            "\tand.b32         %fs_t, %fs_lm1, {j};
\tsetp.eq.u32     %fs_st, %fs_t, %fs_lis;
\tand.pred        %fs_st, %fs_st, %fs_pj{j};
\tand.pred        %fs_st, %fs_st, %fs_valid;
\tmad.lo.u32      %fs_a, %fs_tok, %fs_S, {j};
\tmul.wide.u32    %fs_u64, %fs_a, 4;
\tadd.u64         %fs_t64, %fs_ids, %fs_u64;
\t@%fs_st st.global.u32 [%fs_t64], %fs_id{j};
\tadd.u64         %fs_t64, %fs_wts, %fs_u64;
\t@%fs_st st.global.f32 [%fs_t64], %fs_w{j};
\tand.pred        %fs_st, %fs_st, %fs_final;
\tadd.u64         %fs_t64, %fs_kept, %fs_u64;
\t@%fs_st st.global.u32 [%fs_t64], %fs_one;
\tmul.wide.u32    %fs_u64, %fs_id{j}, 4;
\tadd.u64         %fs_t64, %fz_ctl, %fs_u64;
\t@%fs_st red.global.add.u32 [%fs_t64+32], %fs_one;"
        )
    });
    s += &format!(
        "
\t// BPR: the orderable key of pick 0's score, by the segment's lane 0
\tsetp.eq.u32     %fs_st, %fs_lis, 0;
\tand.pred        %fs_st, %fs_st, %fs_valid;
\tand.pred        %fs_st, %fs_st, %fs_top1;
\tmov.f32         %fs_c1, %fs_ps0;
{key}
\tld.param.u64    %fs_ptop1, [sel_top1_key];
\tcvta.to.global.u64 %fs_ptop1, %fs_ptop1;
\tmul.wide.u32    %fs_u64, %fs_tok, 4;
\tadd.u64         %fs_t64, %fs_ptop1, %fs_u64;
\t@%fs_st st.global.u32 [%fs_t64], %fs_h;
$FS_DONE:",
        key = key_of("%fs_c1")
    );
    s
}

/// Every module variant: the general select's buffers in shared memory (`gate_fused`) or in
/// global scratch (`gate_fused.global`).
pub fn modules() -> Result<Vec<PtxModule>> {
    let gate = crate::cuda::gate::modules()?;
    let fast = fast_select();
    let mut out = Vec::new();
    for (variant, from) in [("gate_fused", "gate"), ("gate_fused.global", "gate.global")] {
        let src = &gate
            .iter()
            .find(|m| m.variant == from)
            .ok_or_else(|| err(format!("no gate module {from}")))?
            .source;
        let mut subs: Vec<(&str, String)> = vec![("VARIANT", variant.to_string())];
        let mut params = Vec::new();
        for (entry, prefix, slot, exit) in PASTED {
            let (body, decls) = pasted_body(src, entry, prefix, exit)?;
            params.extend(decls);
            subs.push((slot, body));
        }
        subs.push(("BODY_PARAMS", params.join(",\n")));
        subs.push(("FAST_SELECT", fast.clone()));
        out.push(PtxModule::from_template(
            Stage::Gate,
            TEMPLATE,
            variant,
            &[],
            &subs,
        )?);
    }
    Ok(out)
}

/// Words of the control block for `experts` experts: 8 control words and the accumulator.
pub fn ctl_len(experts: usize) -> usize {
    8 + experts
}

/// Lanes per token of the FAST select for this config, or `None` for the general select:
/// S <= 8, no expert choice, E <= 256, and groups (if any are dropped) of whole lanes whose
/// count per group is a power of two.
pub fn fast_lanes(experts: usize, cfg: &RoutingConfig) -> Option<usize> {
    let slots = cfg.slots(experts);
    if cfg.expert_choice.is_some()
        || slots > FAST_MAX_SLOTS
        || experts == 0
        || experts > FAST_MAX_EXPERTS
    {
        return None;
    }
    if let Some(g) = cfg.groups {
        if g.keep < g.count {
            let size = experts / g.count;
            if size % PER_LANE != 0 || !(size / PER_LANE).is_power_of_two() {
                return None;
            }
        }
    }
    Some(experts.div_ceil(PER_LANE).next_power_of_two())
}

/// Whether the general select keeps its per-warp buffers in global scratch (8 warps' buffers
/// past [`SHARED_MAX`]).
pub fn general_global(per_warp: usize) -> bool {
    8 * per_warp > SHARED_MAX
}

/// The phases of one launch: `(kind, items)` in order.
pub fn phases(tokens: usize, experts: usize, cfg: &RoutingConfig) -> Vec<(Phase, usize)> {
    let slots = cfg.slots(experts);
    let sel = match fast_lanes(experts, cfg) {
        Some(l) => (Phase::SelectFast, tokens.div_ceil(THREADS / l)),
        None => (Phase::SelectGeneral, tokens.div_ceil(8)),
    };
    let tiles = tokens.div_ceil(256);
    let fin = (Phase::Finalize, tokens.div_ceil(8));
    if cfg.expert_choice.is_some() {
        return vec![sel, (Phase::Rank, tiles * experts), fin];
    }
    if cfg.capacity.is_none() {
        return vec![sel];
    }
    let count = (Phase::Count, (tokens * slots).div_ceil(256));
    let scan = (Phase::Scan, experts.div_ceil(8));
    if cfg.priority == Priority::Top1Score {
        vec![sel, (Phase::Rank, tiles), count, scan, fin]
    } else {
        vec![sel, count, scan, fin]
    }
}

/// The buffers of one fused launch beyond the gate's outputs (scratch of
/// [`crate::cuda::gate::GateScratchCuda`], checked by the caller).
pub struct FusedScratch<'a> {
    /// The control block, [`ctl_len`] words, zero between launches.
    pub ctl: &'a mut CudaSlice<u32>,
    /// BPR: top-1 keys, order and priority positions `[T]` each.
    pub top1: Option<&'a mut CudaSlice<u32>>,
    /// BPR order.
    pub order: Option<&'a mut CudaSlice<u32>>,
    /// BPR priority positions.
    pub prio: Option<&'a mut CudaSlice<u32>>,
    /// Capacity: chunk ranks `[T, S]` and the count table `[E, NB]`.
    pub lrank: Option<&'a mut CudaSlice<u32>>,
    /// Capacity count table.
    pub cells: Option<&'a mut CudaSlice<u32>>,
    /// Expert choice: keys `[E, T]` and slots `[T, E]`.
    pub ec_keys: Option<&'a mut CudaSlice<u32>>,
    /// Expert choice slots.
    pub slot_of: Option<&'a mut CudaSlice<u32>>,
    /// General select buffers in global memory, `[T, PW]` bytes (variant `.global`).
    pub select: Option<&'a mut CudaSlice<u8>>,
}

/// One launch of the fused gate on `logits` `[T, E]` (T >= 1; the caller validated the
/// config and every buffer's length, and handles T = 0).
#[allow(clippy::too_many_arguments)]
pub fn launch(
    dev: &CudaDevice,
    logits: &CudaSlice<f32>,
    tokens: usize,
    experts: usize,
    bias: Option<&CudaSlice<f32>>,
    cfg: &RoutingConfig,
    out: &mut GateCuda,
    s: FusedScratch<'_>,
) -> Result<()> {
    let st = Stage::Gate;
    let slots = cfg.slots(experts);
    check_len(st, "gate control block", s.ctl.len(), ctl_len(experts))?;
    let ph = phases(tokens, experts, cfg);
    let total: usize = ph.iter().map(|p| p.1).sum();
    to_u32(st, "fused gate blocks", total, i32::MAX as usize)?;
    let mut ends = [0u32; 5];
    let mut kinds = [5u32; 5];
    let mut acc = 0usize;
    for (i, (k, n)) in ph.iter().enumerate() {
        acc += n;
        ends[i] = acc as u32;
        kinds[i] = *k as u32;
    }
    for e in ends.iter_mut().skip(ph.len()) {
        *e = acc as u32;
    }
    let nphase = ph.len() as u32;
    let lanes = fast_lanes(experts, cfg);
    let groups = match cfg.groups {
        Some(g) if g.keep < g.count => Some(g),
        _ => None,
    };
    let (g_count, g_keep, g_size) = groups.map_or((0, 0, 0), |g| {
        (g.count as u32, g.keep as u32, (experts / g.count) as u32)
    });
    let g_lanes = match (lanes, groups) {
        (Some(_), Some(_)) => g_size / PER_LANE as u32,
        (None, Some(g)) => crate::cuda::gate::group_lanes(g.count, experts / g.count) as u32,
        _ => 1,
    };
    let capacity = cfg.expert_choice.is_none() && cfg.capacity.is_some();
    let bpr = capacity && cfg.priority == Priority::Top1Score;
    let mut flags = 0u32;
    if cfg.renormalize {
        flags |= 1;
    }
    if !capacity && cfg.expert_choice.is_none() {
        flags |= 2;
    }
    if bias.is_some() {
        flags |= 4;
    }
    if bpr {
        flags |= 8;
    }
    if cfg.expert_choice.is_some() {
        flags |= 16;
    }
    if cfg.combine == Combine::SoftmaxSelected {
        flags |= 32;
    }
    let scoring: u32 = match cfg.scoring {
        Scoring::Softmax => 0,
        Scoring::Sigmoid => 1,
        Scoring::Logits => 2,
    };
    let scale = cfg.scale as f32;
    let nb = (tokens * slots).div_ceil(256);
    let tiles = tokens.div_ceil(256);
    let cap = if let Some(ec) = cfg.expert_choice {
        ((ec.capacity_factor * tokens as f64 / experts as f64).ceil() as usize).min(tokens)
    } else if let Some(c) = cfg.capacity.filter(|_| capacity) {
        c.tokens_per_expert(tokens, slots, experts)
    } else {
        0
    };
    let cap32 = u32::try_from(cap).unwrap_or(u32::MAX);
    let cells_total = if capacity { experts * nb } else { 0 };
    let per_warp = crate::cuda::gate::per_warp(experts, cfg);
    let general = lanes.is_none();
    let global = general && general_global(per_warp);
    let variant = if global {
        "gate_fused.global"
    } else {
        "gate_fused"
    };
    let smem = if general && !global { 8 * per_warp } else { 0 };
    if global && s.select.is_none() {
        return Err(err(
            "gate scratch has no select buffers for the fused gate: allocate GateScratchCuda \
             on this device for this routing config",
        ));
    }
    let func = dev.function(st, variant, "gate_fused")?;
    if smem > 48 * 1024 {
        drv(
            func.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            ),
            "raising the fused gate's shared memory limit",
        )?;
    }
    let u = |n: usize, what: &str| to_u32(st, what, n, u32::MAX as usize);
    let (t32, e32, s32) = (u(tokens, "T")?, u(experts, "E")?, u(slots, "slots")?);
    let (nb32, tiles32, cells32) = (
        u(nb, "capacity chunks")?,
        u(tiles, "rank tiles")?,
        u(cells_total, "capacity cells")?,
    );
    let lanes32 = lanes.unwrap_or(1) as u32;
    let rank_mode: u32 = u32::from(cfg.expert_choice.is_some());
    let fin_flags: u32 = flags & 1;
    let null = 0u64;
    // Buffers of the pasted bodies (0 where a mode does not read them).
    let FusedScratch {
        ctl,
        top1,
        order,
        prio,
        lrank,
        cells,
        ec_keys,
        slot_of,
        select,
    } = s;
    let ctl_addr = ctl.device_ptr(&dev.stream).0;
    let acc_addr = ctl_addr + 32;
    let dptr = |b: Option<&CudaSlice<u32>>| -> u64 { b.map_or(0, |b| b.device_ptr(&dev.stream).0) };
    let top1_a = dptr(top1.as_deref());
    let order_a = dptr(order.as_deref());
    let prio_a = dptr(prio.as_deref());
    let lrank_a = dptr(lrank.as_deref());
    let cells_a = dptr(cells.as_deref());
    let eck_a = dptr(ec_keys.as_deref());
    let slot_a = dptr(slot_of.as_deref());
    // The general select takes global buffers iff its scratch pointer is not 0: only in the
    // global variant.
    let sel_a = match (global, select.as_deref()) {
        (true, Some(b)) => b.device_ptr(&dev.stream).0,
        _ => 0,
    };
    let ids_a = out.topk_ids.device_ptr(&dev.stream).0;
    let wts_a = out.topk_weights.device_ptr(&dev.stream).0;
    let kept_a = out.kept.device_ptr(&dev.stream).0;
    let counts_a = out.counts.device_ptr(&dev.stream).0;
    let logits_a = logits.device_ptr(&dev.stream).0;
    let bias_a = bias.map_or(0, |b| b.device_ptr(&dev.stream).0);
    // gate_select's counts: the accumulator in FINAL mode (copied to counts by the last block).
    let sel_counts = if flags & 2 != 0 { acc_addr } else { 0 };
    // gate_rank: mode 0 (BPR) keys top1 [1, T] -> order, prio; mode 1 keys ec_keys [E, T],
    // slot_of -> kept, counts.
    let (rk_keys, rk_slot, rk_a, rk_b, rk_cols) = if rank_mode == 1 {
        (eck_a, slot_a, kept_a, counts_a, e32)
    } else {
        (top1_a, null, order_a, prio_a, 1)
    };
    let (fin_prio, fin_lrank, fin_cells) = if rank_mode == 1 {
        (null, null, null)
    } else {
        (prio_a, lrank_a, cells_a)
    };
    let gl32 = g_lanes;
    let mut b = dev.stream.launch_builder(&func);
    b.arg(&counts_a)
        .arg(&cells_a)
        .arg(&ctl_addr)
        .arg(&cells32)
        .arg(&lanes32)
        .arg(&nphase);
    for e in &ends {
        b.arg(e);
    }
    for k in &kinds {
        b.arg(k);
    }
    // sel_: gate_select's parameters.
    b.arg(&logits_a)
        .arg(&bias_a)
        .arg(&ids_a)
        .arg(&wts_a)
        .arg(&kept_a)
        .arg(&sel_counts)
        .arg(&top1_a)
        .arg(&eck_a)
        .arg(&slot_a)
        .arg(&sel_a)
        .arg(&t32)
        .arg(&e32)
        .arg(&s32)
        .arg(&g_count)
        .arg(&g_keep)
        .arg(&g_size)
        .arg(&gl32)
        .arg(&scoring)
        .arg(&flags)
        .arg(&scale);
    // rank_: gate_rank's.
    b.arg(&rk_keys)
        .arg(&rk_slot)
        .arg(&rk_a)
        .arg(&rk_b)
        .arg(&t32)
        .arg(&rk_cols)
        .arg(&tiles32)
        .arg(&cap32)
        .arg(&rank_mode);
    // cnt_: gate_cap_count's (order 0 for position priority).
    let cnt_order = if bpr { order_a } else { null };
    b.arg(&ids_a)
        .arg(&cnt_order)
        .arg(&lrank_a)
        .arg(&cells_a)
        .arg(&t32)
        .arg(&s32)
        .arg(&nb32);
    // scan_: gate_cap_scan's.
    b.arg(&cells_a)
        .arg(&counts_a)
        .arg(&e32)
        .arg(&nb32)
        .arg(&cap32);
    // fin_: gate_finalize's.
    b.arg(&ids_a)
        .arg(&wts_a)
        .arg(&kept_a)
        .arg(&fin_prio)
        .arg(&fin_lrank)
        .arg(&fin_cells)
        .arg(&t32)
        .arg(&s32)
        .arg(&nb32)
        .arg(&cap32)
        .arg(&rank_mode)
        .arg(&fin_flags)
        .arg(&scale);
    let cfg_l = LaunchConfig {
        grid_dim: (total as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: matches the gate_fused header of kernels/gate_fused.ptx: counts, cells, ctl,
    // cells_total, fast_lanes, nphase, end0..4, kind0..4, then the sel_ / rank_ / cnt_ /
    // scan_ / fin_ parameters in the order of kernels/gate.ptx's gate_select, gate_rank,
    // gate_cap_count, gate_cap_scan and gate_finalize headers (pointers as raw device
    // addresses of buffers that stay borrowed until this call returns; the stream orders
    // every later use). gate::launch checked every output and scratch buffer against this
    // batch (ids / weights / kept >= T S, counts >= E, top1 / order / prio >= T, lrank >= T S,
    // cells >= E NB, ec_keys / slot_of >= T E, the select buffers >= T PW), ctl holds 8 + E
    // words that are zero (allocated zeroed; every launch leaves them zero). Grid: the sum of
    // the phase items (< 2^31) blocks of 256 threads; dynamic shared memory 8 PW in the shared
    // variant when the general select runs (attribute raised above 48 KiB).
    drv(
        unsafe { b.launch(cfg_l) }.map(|_| ()),
        "launching gate_fused",
    )?;
    // The buffers' borrows end with the launch's enqueue.
    let _ = (
        ctl, top1, order, prio, lrank, cells, ec_keys, slot_of, select,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Capacity, ExpertChoice, Groups};

    #[test]
    fn both_variants_render_with_the_pasted_bodies() {
        let m = modules().unwrap();
        assert_eq!(m.len(), 2);
        for v in &m {
            let s = &v.source;
            assert!(s.is_ascii() && !s.contains("${"), "{}", v.variant);
            assert!(s.contains(".entry gate_fused("), "{}", v.variant);
            for (entry, prefix, _, _) in PASTED {
                assert!(!s.contains(&format!(".entry {entry}(")), "{entry}");
                assert!(s.contains(&format!(".param .u32 {prefix}_")), "{prefix}");
                assert!(s.contains(&format!("[{prefix}_")), "{prefix}: loads");
            }
            assert!(s.contains(".param .u32 sel_tokens") && s.contains(".param .u32 scan_experts"));
            assert!(
                !s.contains("%ctaid.y") && !s.contains("\tret;\n\t}"),
                "{}",
                v.variant
            );
            // The select buffers' state space follows the variant.
            let space = if v.variant.ends_with("global") {
                "ld.global.u32 %h, [%ph];"
            } else {
                "ld.shared.u32 %h, [%ph];"
            };
            assert!(s.contains(space), "{}", v.variant);
            assert_eq!(s.matches("$FZ_END;").count(), 6, "{}", v.variant);
        }
    }

    #[test]
    fn the_fast_select_covers_the_common_configs() {
        let top2 = RoutingConfig::default();
        assert_eq!(fast_lanes(8, &top2), Some(1));
        assert_eq!(fast_lanes(16, &top2), Some(2));
        assert_eq!(fast_lanes(60, &top2), Some(8));
        assert_eq!(fast_lanes(256, &top2), Some(32));
        assert_eq!(fast_lanes(257, &top2), None);
        let k8 = RoutingConfig {
            top_k: 8,
            groups: Some(Groups { count: 8, keep: 4 }),
            ..top2
        };
        // DeepSeek-V3: 8 groups of 32 experts = 4 lanes each.
        assert_eq!(fast_lanes(256, &k8), Some(32));
        let odd = RoutingConfig {
            groups: Some(Groups { count: 4, keep: 2 }),
            ..k8
        };
        assert_eq!(fast_lanes(96, &odd), None); // 24 experts a group: 3 lanes
        assert_eq!(fast_lanes(64, &odd), Some(8));
        let k9 = RoutingConfig { top_k: 9, ..top2 };
        assert_eq!(fast_lanes(64, &k9), None);
        let ec = RoutingConfig {
            expert_choice: Some(ExpertChoice {
                capacity_factor: 1.0,
            }),
            ..top2
        };
        assert_eq!(fast_lanes(8, &ec), None);
    }

    #[test]
    fn phases_per_routing_variant() {
        let top2 = RoutingConfig::default();
        assert_eq!(phases(4096, 8, &top2), vec![(Phase::SelectFast, 16)]);
        let ds = RoutingConfig {
            top_k: 8,
            scoring: Scoring::Sigmoid,
            groups: Some(Groups { count: 8, keep: 4 }),
            ..top2
        };
        assert_eq!(phases(4096, 256, &ds), vec![(Phase::SelectFast, 512)]);
        let cap = RoutingConfig {
            capacity: Some(Capacity::Tokens(5)),
            ..top2
        };
        assert_eq!(
            phases(300, 16, &cap),
            vec![
                (Phase::SelectFast, 3),
                (Phase::Count, 3),
                (Phase::Scan, 2),
                (Phase::Finalize, 38)
            ]
        );
        let bpr = RoutingConfig {
            priority: Priority::Top1Score,
            ..cap
        };
        assert_eq!(phases(300, 16, &bpr)[1], (Phase::Rank, 2));
        assert_eq!(phases(300, 16, &bpr).len(), 5);
        let ec = RoutingConfig {
            expert_choice: Some(ExpertChoice {
                capacity_factor: 2.0,
            }),
            ..top2
        };
        assert_eq!(
            phases(7, 8, &ec),
            vec![
                (Phase::SelectGeneral, 1),
                (Phase::Rank, 8),
                (Phase::Finalize, 1)
            ]
        );
        assert_eq!(ctl_len(256), 264);
        assert!(!general_global(25 * 1024) && general_global(26 * 1024));
    }
}
