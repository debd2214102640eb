//! Offline checks of kernels/expert_gemm_sm90.ptx: the kernel choice, the rendered modules,
//! and models of its address math and protocols checked against the PTX ISA's documented
//! layouts (no GPU needed), plus the device test that runs on the next GPU run.

use super::*;

// ---------------------------------------------------------------- kernel choice

#[test]
fn hopper_kernel_only_on_9x_with_the_opt_in() {
    for cc in [(9, 0), (9, 1)] {
        assert_eq!(kernel_for(cc, true), GemmKernel::Wgmma, "{cc:?}");
        assert_eq!(kernel_for(cc, false), GemmKernel::Portable, "{cc:?}");
    }
    for cc in [(8, 0), (8, 6), (8, 9), (10, 0), (12, 0)] {
        for next in [false, true] {
            assert_eq!(kernel_for(cc, next), GemmKernel::Portable, "{cc:?} {next}");
        }
    }
}

#[test]
fn wgmma_serves_dense_16_bit_same_dtype_launches_only() {
    let dense = |w, a| Variant {
        w: WeightFormat::Dense(w),
        a,
    };
    let wg = GemmKernel::Wgmma;
    for d in [DType::BF16, DType::F16] {
        assert_eq!(
            applies(wg, dense(d, d), 4096, 0x1000),
            Some(Sm90Variant { dtype: d })
        );
        assert_eq!(
            applies(wg, dense(d, d), 8, 0x10),
            Some(Sm90Variant { dtype: d })
        );
        // The portable kernel whatever the operands.
        assert_eq!(
            applies(GemmKernel::Portable, dense(d, d), 4096, 0x1000),
            None
        );
        // TMA: K a positive multiple of 8, 16-byte aligned activations.
        for k in [0, 4, 13, 4100 + 2] {
            assert_eq!(applies(wg, dense(d, d), k, 0x1000), None, "K = {k}");
        }
        assert_eq!(applies(wg, dense(d, d), 4096, 0x1002), None);
        assert_eq!(applies(wg, dense(d, d), 4096, 0x1008), None);
    }
    // Mixed dtypes, f32 anywhere, quantized weights: the verified kernels.
    for (w, a) in [
        (DType::BF16, DType::F16),
        (DType::F16, DType::BF16),
        (DType::BF16, DType::F32),
        (DType::F32, DType::F32),
        (DType::F32, DType::BF16),
    ] {
        assert_eq!(applies(wg, dense(w, a), 4096, 0x1000), None, "{w} {a}");
    }
    for w in WeightFormat::QUANT {
        for a in DType::ALL {
            assert_eq!(applies(wg, Variant { w, a }, 4096, 0x1000), None);
        }
    }
}

// ---------------------------------------------------------------- the rendered modules

#[test]
fn modules_render_for_sm90a_with_the_portable_activation() {
    let act = act_block().unwrap();
    assert!(act.contains("ACT_SIGMOID:") && act.trim_end().ends_with("ACT_END:"));
    let portable = crate::cuda::expert_gemm::modules().unwrap();
    let bf16 = portable
        .iter()
        .find(|m| m.variant == "expert_gemm.bf16.abf16")
        .unwrap();
    assert!(
        bf16.source.contains(&act),
        "the portable kernel runs the same activation"
    );
    let all = modules().unwrap();
    assert_eq!(all.len(), 2);
    for (v, m) in Sm90Variant::ALL.iter().zip(&all) {
        let src = &m.source;
        let name = &m.variant;
        assert_eq!(*name, v.name());
        assert!(src.is_ascii(), "{name}");
        assert!(!src.contains("${"), "{name}");
        assert!(!src.lines().any(|l| l.trim().starts_with("//@")), "{name}");
        assert!(src.contains(".version 8.0\n.target sm_90a\n"), "{name}");
        assert!(
            src.contains(&format!(".visible .entry {}(", v.entry())),
            "{name}"
        );
        assert!(src.contains(&act), "{name}");
        let w = v.dtype.name();
        let mma = format!("wgmma.mma_async.sync.aligned.m64n256k16.f32.{w}.{w}");
        assert_eq!(
            src.matches(&mma).count(),
            BK / 16,
            "{name}: one wgmma per k16"
        );
        let copies = src
            .lines()
            .filter(|l| l.trim_start().starts_with("cp.async.bulk.tensor."))
            .count();
        assert_eq!(copies, 3, "{name}: A and the two halves of B");
        assert_eq!(
            src.matches("f_acc127},").count(),
            BK / 16,
            "{name}: 128 accumulators each"
        );
        assert!(src.contains(&format!("cvt.rn.{w}.f32 h_o, f_h;")), "{name}");
        // The register pool: producer 40, consumers 232, entry cap 168 x 384 threads.
        let num = |key: &str| -> u32 {
            let i = src.find(key).unwrap() + key.len();
            let digits: String = src[i..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap()
        };
        let (dec, inc) = (
            num("setmaxnreg.dec.sync.aligned.u32 "),
            num("setmaxnreg.inc.sync.aligned.u32 "),
        );
        let (cap, threads) = (num(".maxnreg "), num(".maxntid "));
        assert_eq!((dec, inc, cap, threads), (40, 232, 168, THREADS));
        assert!(dec * 128 + inc * 256 <= cap * threads && cap * threads <= 65536);
        // Every k tile: one fence, four wgmma, a commit, a wait.
        let body = &src[src.find("C_WAIT:").unwrap()..src.find("C_SKIP:").unwrap()];
        for needle in [
            "wgmma.fence.sync.aligned;",
            "wgmma.commit_group.sync.aligned;",
            "wgmma.wait_group.sync.aligned 1;",
        ] {
            assert_eq!(body.matches(needle).count(), 1, "{name}: {needle}");
        }
        assert_eq!(body.matches(&mma).count(), 4, "{name}");
    }
}

// ---------------------------------------------------------------- layout constants

#[test]
fn shared_memory_layout_fits_and_is_aligned() {
    assert_eq!(STAGE_BYTES, 49152);
    const { assert!(SMEM_BYTES <= SM90_SMEM_LIMIT) };
    for s in 0..STAGES {
        // 128-byte swizzle atoms start on 1024-byte boundaries (descriptor base offset 0).
        assert_eq!((s * STAGE_BYTES) % SBO, 0);
        assert_eq!((s * STAGE_BYTES + B_OFF) % SBO, 0);
        assert_eq!((s * STAGE_BYTES + B_OFF + B_HALF) % SBO, 0);
        assert_eq!((s * STAGE_BYTES + 64 * 128) % SBO, 0, "consumer 1's A rows");
    }
    assert_eq!(EPI_OFF % 16, 0);
    assert_eq!(BAR_OFF % 8, 0);
    assert_eq!(EMPTY_OFF, BAR_OFF + 8 * STAGES);
    const { assert!(SMEM_USED <= SMEM_BYTES - 1024) };
    // 14-bit descriptor address field: (addr & 0x3FFFF) >> 4 holds every shared address.
    const { assert!(SMEM_BYTES + 1024 <= 1 << 18) };
    // TMA: the three boxes of a stage are the transaction bytes full[s] expects.
    let a = MapSpec::activations(300, 4096);
    let w = MapSpec::weights(8, 14336, 4096);
    assert_eq!(a.box_bytes(), A_BYTES);
    assert_eq!(w.box_bytes(), B_HALF);
    assert_eq!(a.box_bytes() + 2 * w.box_bytes(), TX_BYTES);
    // Descriptor constants (PTX ISA 9.7.15.5.1.2.2): SBO 1024 >> 4 = 64 in bits 32-45, mode
    // 1 (128-byte swizzle) in bits 62-63, LBO encoded 1 in bits 16-29.
    assert_eq!(DESC_HI, 64 | 1 << 30);
    assert_eq!(DESC_LO, 1 << 16);
}

#[test]
fn tensor_map_specs_meet_the_driver_rules() {
    let a = MapSpec::activations(7, 72);
    assert_eq!(a.dims[..2], [72, 7]);
    assert_eq!(a.strides[0], 144);
    assert_eq!(a.boxdim[..2], [64, 128]);
    assert!(a.check().is_ok());
    let w = MapSpec::weights(3, 136, 72);
    assert_eq!(w.dims, [72, 136, 3]);
    assert_eq!(w.strides, [144, 144 * 136]);
    assert_eq!(w.boxdim, [64, 128, 1]);
    assert!(w.check().is_ok());
    // The inner box is exactly one 128-byte swizzle row.
    assert_eq!(a.boxdim[0] as usize * 2, 128);
    // K not a multiple of 8: the row pitch is not 16-byte: refused (the caller falls back).
    assert!(MapSpec::activations(7, 13).check().is_err());
    assert!(MapSpec::weights(2, 8, 12).check().is_err());
    assert!(MapSpec::activations(0, 64).check().is_err());
    // Mixtral and DeepSeek-V3 shapes.
    for (e, n, k) in [
        (8, 14336, 4096),
        (8, 4096, 14336),
        (256, 2048, 7168),
        (256, 7168, 2048),
    ] {
        assert!(MapSpec::weights(e, n, k).check().is_ok());
        assert!(MapSpec::activations(32768, k).check().is_ok());
    }
}

// ---------------------------------------------------------------- swizzle and descriptors

/// The 128-byte swizzle of the PTX ISA (5.5.7 "Swizzling Modes", 16-byte atomicity),
/// transcribed: row r of the table lists, for each 16-byte position p of a 128-byte shared
/// memory row (rows r mod 8 from a 1024-byte boundary), the source chunk stored there.
const SW128_TABLE: [[usize; 8]; 8] = [
    [0, 1, 2, 3, 4, 5, 6, 7],
    [1, 0, 3, 2, 5, 4, 7, 6],
    [2, 3, 0, 1, 6, 7, 4, 5],
    [3, 2, 1, 0, 7, 6, 5, 4],
    [4, 5, 6, 7, 0, 1, 2, 3],
    [5, 4, 7, 6, 1, 0, 3, 2],
    [6, 7, 4, 5, 2, 3, 0, 1],
    [7, 6, 5, 4, 3, 2, 1, 0],
];

/// Where TMA (128-byte swizzle, box {64, rows} of 16-bit elements, destination `dst` on a
/// 1024-byte boundary) puts element (row, k) of the box: row r's 128 bytes at dst + 128 r,
/// its chunk k / 8 at the position the table gives.
fn tma_addr(dst: u32, row: usize, k: usize) -> u32 {
    assert_eq!(dst % 1024, 0);
    assert!(k < 64);
    let chunk = k / 8;
    let p = SW128_TABLE[row % 8]
        .iter()
        .position(|&c| c == chunk)
        .unwrap();
    dst + 128 * row as u32 + 16 * p as u32 + 2 * (k % 8) as u32
}

/// Swizzle<3,4,3> on a byte address: bits 4-6 (the 16-byte chunk) XOR bits 7-9 (the 128-byte
/// row within 1024 bytes).
fn swizzle128(addr: u32) -> u32 {
    addr ^ (((addr >> 7) & 7) << 4)
}

/// The shared address wgmma reads for element (row, k) (row < 8 m, k < 16) of a K-major
/// operand described by `desc`, as the PTX ISA 9.7.15.5.1.2 defines it: the fields decoded
/// from the descriptor, the canonical layout ((8,m),(T,2)):((8T,SBO),(1,T)) in 16-bit
/// elements (T = 8) with SBO in bytes, Swizzle<3,4,3> applied to the byte address.
fn wgmma_addr(desc: u64, row: usize, k: usize) -> u32 {
    let start = ((desc & 0x3FFF) << 4) as u32;
    let sbo = (((desc >> 32) & 0x3FFF) << 4) as u32;
    let base_offset = (desc >> 49) & 7;
    let mode = desc >> 62;
    assert_eq!(mode, 1, "128-byte swizzle");
    assert_eq!(base_offset, 0, "atoms start on 1024-byte boundaries");
    assert!(k < 16);
    let t = 8;
    let elems = (row % 8) * 8 * t + (k % t) + (k / t) * t;
    swizzle128(start + 2 * elems as u32 + (row / 8) as u32 * sbo)
}

/// The descriptor the kernel builds for slice kk of the tile at shared address `tile`
/// (mirrors the PTX: `or.b32 r_dla, addr >> 4, DESC_LO`; `add.u32 r_t0, r_dla, 2 kk`;
/// `mov.b64 d_da, {r_t0, r_dhi}`).
fn kernel_desc(tile: u32, kk: usize) -> u64 {
    let lo = ((tile >> 4) | DESC_LO) + 2 * kk as u32;
    u64::from(lo) | u64::from(DESC_HI) << 32
}

#[test]
fn the_isa_swizzle_table_is_the_xor_pattern() {
    for (r, row) in SW128_TABLE.iter().enumerate() {
        for (p, &c) in row.iter().enumerate() {
            assert_eq!(c, p ^ r);
            // the byte-address form: chunk c of row r lands at position c ^ r
            let addr = swizzle128((128 * r + 16 * c) as u32);
            assert_eq!(addr, (128 * r + 16 * (c ^ r)) as u32);
        }
    }
}

#[test]
fn descriptors_read_exactly_what_tma_wrote() {
    // Shared bases as the kernel may find them (it rounds up to 1024).
    for raw in [0u32, 16, 1024, 0x400 + 8, 3000] {
        let sbase = (raw + 1023) & !1023;
        for s in 0..STAGES {
            let stage = sbase + (s * STAGE_BYTES) as u32;
            for c in 0..2u32 {
                for kk in 0..BK / 16 {
                    // A: consumer c's rows 64 c .. 64 c + 63 of the 128-row box.
                    let da = kernel_desc(stage + (c << 13), kk);
                    let mut seen = std::collections::HashSet::new();
                    for i in 0..64 {
                        for k in 0..16 {
                            let want = tma_addr(stage, 64 * c as usize + i, 16 * kk + k);
                            assert_eq!(wgmma_addr(da, i, k), want, "A s{s} c{c} kk{kk} ({i},{k})");
                            assert!(seen.insert(want));
                        }
                    }
                }
            }
            // B: 256 rows, the two TMA boxes back to back.
            let b = stage + B_OFF as u32;
            for kk in 0..BK / 16 {
                let db = kernel_desc(b, kk);
                for n in 0..BN {
                    for k in 0..16 {
                        let want = tma_addr(b + (B_HALF * (n / 128)) as u32, n % 128, 16 * kk + k);
                        assert_eq!(wgmma_addr(db, n, k), want, "B s{s} kk{kk} ({n},{k})");
                    }
                }
            }
        }
    }
}

#[test]
fn descriptor_slices_do_not_carry_out_of_the_address_field() {
    // lo + 2 kk must stay inside bits 0-13 (the start address): the largest tile address
    // plus 3 slices of 32 bytes is below 2^18.
    let top = (SMEM_BYTES as u32 + 1023) & !1023;
    let lo = (top >> 4) + 2 * 3;
    assert!(lo < 1 << 14, "{lo}");
}

// ---------------------------------------------------------------- fragments and epilogue

/// The accumulator element f_acc(reg) of lane `lane` of warp `w` (PTX ISA 9.7.15.5.1.1,
/// wgmma D of m64nNk16): (row, column) of the warpgroup's 64 x 256 tile.
fn d_elem(w: usize, lane: usize, reg: usize) -> (usize, usize) {
    let (g, t) = (lane / 4, lane % 4);
    let (i, q) = (reg / 4, reg % 4);
    (16 * w + g + 8 * (q >> 1), 8 * i + 2 * t + (q & 1))
}

#[test]
fn fragments_cover_the_accumulator_tile_once() {
    let mut seen = vec![0u8; 64 * 256];
    for w in 0..4 {
        for lane in 0..32 {
            for reg in 0..128 {
                let (r, c) = d_elem(w, lane, reg);
                seen[r * 256 + c] += 1;
            }
        }
    }
    assert!(seen.iter().all(|&n| n == 1));
}

/// Bank groups of one 64-bit shared access per lane: each half-warp's 16 accesses must touch
/// 32 distinct 4-byte banks (one wavefront per half-warp, the minimum for 256 bytes).
fn half_warps_conflict_free(addrs: &[u32]) -> bool {
    addrs.chunks(16).all(|h| {
        let mut banks = std::collections::HashSet::new();
        h.iter()
            .all(|a| banks.insert((a / 4) % 32) && banks.insert((a / 4 + 1) % 32))
    })
}

#[test]
fn epilogue_stores_every_output_once_from_the_right_accumulators() {
    let stg = 0x30000u32; // any 16-byte aligned staging base
    for gated in [false, true] {
        let (cnt, shift, cw) = if gated { (1024, 4, 32) } else { (2048, 5, 64) };
        for ch in 0..4 {
            // Stores: staging word -> (row, accumulator column) of the 64 x 256 tile.
            let mut staging: Vec<Option<(usize, usize)>> = vec![None; 64 * 64];
            let stores = staging_stores(gated, ch);
            assert_eq!(stores.len(), 16);
            for (si, s) in stores.iter().enumerate() {
                let mut warp_addrs = Vec::new();
                for w in 0..4 {
                    for lane in 0..32 {
                        let (g, t) = (lane / 4, lane % 4);
                        // the kernel's r_q0..3
                        let qb = stg + 256 * (16 * w + g) as u32 + 8 * t as u32;
                        let q = qb + 32 * ((s.m ^ (g & 3)) as u32);
                        let addr = q + s.off as u32;
                        if w == 0 {
                            warp_addrs.push(addr);
                        }
                        for e in 0..2 {
                            let word = ((addr - stg) / 4) as usize + e;
                            assert!(word < 64 * 64, "store {si} outside the staging");
                            let d = d_elem(w, lane, s.reg + e);
                            assert!(staging[word].is_none(), "two stores to one word");
                            staging[word] = Some(d);
                        }
                    }
                }
                assert!(
                    half_warps_conflict_free(&warp_addrs),
                    "store {si} conflicts"
                );
            }
            assert!(
                staging.iter().all(Option::is_some),
                "every staging word written"
            );
            // Reads: thread i of the warpgroup walks idx = i, i + 128, ...
            let mut outputs = std::collections::HashMap::new();
            for it in 0..cnt / 128 {
                let mut warp_addrs = Vec::new();
                for i in 0..128 {
                    let idx = it * 128 + i;
                    let rl = idx >> shift;
                    let lc = 2 * (idx & ((1 << shift) - 1));
                    let word = rl * 64 + (lc ^ ((rl & 3) << 3));
                    if i < 32 {
                        warp_addrs.push(stg + 4 * word as u32);
                    }
                    for e in 0..2 {
                        let out_col = ch * cw + lc + e; // minus n0
                        let got = staging[word + e].unwrap();
                        if gated {
                            assert_eq!(got, (rl, out_col), "gate of ({rl}, {out_col})");
                            // up: staging column + 32 = 128 bytes further
                            let up = staging[word + 32 + e].unwrap();
                            assert_eq!(up, (rl, 128 + out_col), "up of ({rl}, {out_col})");
                        } else {
                            assert_eq!(got, (rl, out_col));
                        }
                        assert!(outputs.insert((rl, out_col), ()).is_none());
                    }
                }
                assert!(half_warps_conflict_free(&warp_addrs), "read {it} conflicts");
            }
            assert_eq!(outputs.len(), 64 * cw, "gated {gated} chunk {ch}");
        }
    }
}

#[test]
fn stage_stores_render_the_modelled_stores() {
    let text = stage_stores();
    for b in 0..8 {
        for s in staging_stores(b >= 4, b % 4) {
            let line = format!(
                "st.shared.v2.f32 [r_q{}+{}], {{f_acc{}, f_acc{}}};",
                s.m,
                s.off,
                s.reg,
                s.reg + 1
            );
            assert!(text.contains(&line), "{line}");
        }
    }
    assert_eq!(text.matches("st.shared.v2.f32").count(), 128);
}

// ---------------------------------------------------------------- tile scheduler

/// The scheduler of DECODE_P / DECODE_C in Rust: tile t to (expert, first row, row end,
/// first column), None for a gap tile.
fn decode_model(
    t: usize,
    rows: usize,
    off: &[u32],
    n: usize,
    gated: bool,
) -> Option<(usize, usize, usize, usize)> {
    let e_cnt = off.len() - 1;
    let bno = if gated { 128 } else { 256 };
    let tm = rows / 128 + e_cnt;
    let tn = n.div_ceil(bno);
    let gs = 8 * tn;
    let (gid, ing) = (t / gs, t % gs);
    let fm = 8 * gid;
    let gm = (tm - fm).min(8);
    let vt = fm + ing % gm;
    let tnn = ing / gm;
    let (mut lo, mut hi) = (0usize, e_cnt);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if off[mid] as usize / 128 + mid <= vt {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let e = lo;
    let rs = off[e] as usize;
    let re = (off[e + 1] as usize).min(rows);
    let row0 = rs + 128 * (vt - (rs / 128 + e));
    (row0 < re).then_some((e, row0, re, tnn * bno))
}

#[test]
fn scheduler_covers_every_kept_row_and_column_tile_once() {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = |m: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % m as u64) as usize
    };
    let mut cases: Vec<(Vec<u32>, usize)> = vec![
        (vec![0, 1], 1),               // T = 1, one expert
        (vec![0, 7, 7, 14], 14),       // an empty expert
        (vec![0, 0, 0, 300], 300),     // every row on the last expert
        (vec![0, 290, 290, 290], 300), // dropped rows past offsets[E]
        (vec![0, 128, 256, 384], 384), // exact tiles
        (vec![0, 129, 130, 700], 701),
    ];
    for _ in 0..40 {
        let e = 1 + next(40);
        let mut off = vec![0u32];
        for _ in 0..e {
            let c = if next(4) == 0 { 0 } else { next(300) };
            off.push(off.last().unwrap() + c as u32);
        }
        let kept = *off.last().unwrap() as usize;
        cases.push((off, kept + next(50)));
    }
    for (off, rows) in &cases {
        for gated in [false, true] {
            for n in [8usize, 136, 256, 300] {
                let bno = if gated { 128 } else { 256 };
                let tiles = (rows / 128 + off.len() - 1) * n.div_ceil(bno);
                let mut seen = std::collections::HashMap::new();
                for t in 0..tiles {
                    if let Some((e, row0, re, n0)) = decode_model(t, *rows, off, n, gated) {
                        assert!(row0 >= off[e] as usize && row0 < re);
                        for r in row0..(row0 + 128).min(re) {
                            assert!(seen.insert((r, n0), e).is_none(), "row {r} twice");
                        }
                    }
                }
                let kept = *off.last().unwrap() as usize;
                for (e, w) in off.windows(2).enumerate() {
                    for r in w[0] as usize..w[1] as usize {
                        for n0 in (0..n).step_by(bno) {
                            assert_eq!(seen.get(&(r, n0)), Some(&e), "row {r} col {n0} {off:?}");
                        }
                    }
                }
                assert_eq!(seen.len(), kept * n.div_ceil(bno), "{off:?} rows {rows}");
            }
        }
    }
}

// ---------------------------------------------------------------- mbarrier protocol

/// An mbarrier as the PTX ISA 9.7.13.15 describes it: a phase completes when its pending
/// arrivals and its transaction count both reach zero; try_wait.parity(p) is true when the
/// phase of parity p is the completed, immediately preceding one.
struct Mbar {
    count: u32,
    pending: u32,
    tx: i64,
    phase: u32,
}

impl Mbar {
    fn new(count: u32) -> Self {
        Mbar {
            count,
            pending: count,
            tx: 0,
            phase: 0,
        }
    }
    fn complete(&mut self) {
        if self.pending == 0 && self.tx == 0 {
            self.phase += 1;
            self.pending = self.count;
        }
    }
    fn arrive(&mut self) {
        assert!(self.pending > 0, "arrival beyond the expected count");
        self.pending -= 1;
        self.complete();
    }
    fn expect_tx(&mut self, b: i64) {
        self.tx += b;
    }
    fn complete_tx(&mut self, b: i64) {
        self.tx -= b;
        assert!(self.tx >= 0, "more bytes than expected");
        self.complete();
    }
    fn try_wait_parity(&self, p: u32) -> bool {
        (self.phase & 1) != p
    }
}

#[test]
fn pipeline_never_overwrites_a_stage_in_use_and_never_deadlocks() {
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = |m: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % m as u64) as usize
    };
    for trial in 0..300 {
        // The CTA's tiles: (k tiles, consumer 0 live, consumer 1 live).
        let tiles: Vec<(usize, bool, bool)> = (0..1 + rnd(5))
            .map(|_| (1 + rnd(11), true, rnd(3) != 0))
            .collect();
        let total_k: usize = tiles.iter().map(|t| t.0).sum();
        let mut full: Vec<Mbar> = (0..STAGES).map(|_| Mbar::new(1)).collect();
        let mut empty: Vec<Mbar> = (0..STAGES)
            .map(|_| Mbar::new(CONSUMER_WARPS as u32))
            .collect();
        let mut data = [usize::MAX; STAGES]; // which k tile (global sequence) a stage holds
        let mut in_use = [0usize; STAGES];
        // producer: (seq, stage, phase); pending TMA copies: (stage, seq, bytes)
        let (mut p_seq, mut p_s, mut p_ph) = (0usize, 0usize, 0u32);
        let mut copies: Vec<(usize, usize, i64)> = Vec::new();
        // consumer warps: (seq, stage, phase, held stage of the previous k tile)
        #[derive(Clone, Copy)]
        struct Warp {
            seq: usize,
            s: usize,
            ph: u32,
            prev: Option<usize>,
            done: bool,
        }
        let mut warps = vec![
            Warp {
                seq: 0,
                s: 0,
                ph: 0,
                prev: None,
                done: false
            };
            CONSUMER_WARPS
        ];
        let tile_of = |seq: usize| {
            let mut acc = 0;
            for (i, t) in tiles.iter().enumerate() {
                if seq < acc + t.0 {
                    return (i, seq - acc, t.0);
                }
                acc += t.0;
            }
            unreachable!()
        };
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < 1_000_000, "trial {trial}: no progress");
            let mut moves: Vec<usize> = Vec::new(); // 0 producer, 1 copy, 2.. warp
            if p_seq < total_k && empty[p_s].try_wait_parity(p_ph ^ 1) {
                moves.push(0);
            }
            if !copies.is_empty() {
                moves.push(1);
            }
            for (i, w) in warps.iter().enumerate() {
                if !w.done && w.seq < total_k && full[w.s].try_wait_parity(w.ph) {
                    moves.push(2 + i);
                }
            }
            if moves.is_empty() {
                assert!(
                    p_seq == total_k && warps.iter().all(|w| w.done),
                    "trial {trial}: deadlock"
                );
                break;
            }
            match moves[rnd(moves.len())] {
                0 => {
                    // wait empty passed: expect_tx + arrive, three copies in flight
                    full[p_s].expect_tx(TX_BYTES as i64);
                    full[p_s].arrive();
                    for b in [A_BYTES, B_HALF, B_HALF] {
                        copies.push((p_s, p_seq, b as i64));
                    }
                    p_seq += 1;
                    p_s += 1;
                    if p_s == STAGES {
                        p_s = 0;
                        p_ph ^= 1;
                    }
                }
                1 => {
                    let (s, seq, b) = copies.swap_remove(rnd(copies.len()));
                    assert_eq!(
                        in_use[s], 0,
                        "trial {trial}: copy into stage {s} while in use"
                    );
                    data[s] = seq;
                    full[s].complete_tx(b);
                }
                m => {
                    let wi = m - 2;
                    let c = wi / 4;
                    let mut w = warps[wi];
                    let (ti, kt, kts) = tile_of(w.seq);
                    let live = if c == 0 { tiles[ti].1 } else { tiles[ti].2 };
                    assert_eq!(data[w.s], w.seq, "trial {trial}: stale stage {}", w.s);
                    if live {
                        in_use[w.s] += 1; // its wgmma reads the stage until wait_group 1
                        if let Some(p) = w.prev.take() {
                            in_use[p] -= 1;
                            empty[p].arrive();
                        }
                        w.prev = Some(w.s);
                        if kt + 1 == kts {
                            // wait_group 0, release the last stage
                            let p = w.prev.take().unwrap();
                            in_use[p] -= 1;
                            empty[p].arrive();
                        }
                    } else {
                        empty[w.s].arrive(); // no rows: released at once
                    }
                    w.seq += 1;
                    w.s += 1;
                    if w.s == STAGES {
                        w.s = 0;
                        w.ph ^= 1;
                    }
                    w.done = w.seq == total_k;
                    warps[wi] = w;
                }
            }
        }
        assert!(in_use.iter().all(|&n| n == 0));
    }
}

// ---------------------------------------------------------------- ptxas

/// Both modules assemble for sm_90a without spills, stack or wgmma serialization, when ptxas
/// is found ($PTXAS or the copy scripts/sass-check.sh and CI cache); skipped (and said so)
/// otherwise: CI assembles every dumped module in any case.
#[test]
fn modules_assemble_for_sm90a_without_spills_or_serialization() {
    let Some(ptxas) = ptxas_path() else {
        println!("expert_gemm_sm90: no ptxas ($PTXAS or the sass-check cache), check skipped");
        return;
    };
    let dir = std::env::temp_dir().join(format!("moe-sm90-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for m in modules().unwrap() {
        let path = dir.join(format!("{}.ptx", m.variant));
        std::fs::write(&path, &m.source).unwrap();
        let out = std::process::Command::new(&ptxas)
            .args(["-arch=sm_90a", "-v", "--warn-on-spills", "-Werror"])
            .arg(&path)
            .args(["-o", "/dev/null"])
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        let name = &m.variant;
        assert!(out.status.success(), "{name}: {log}");
        assert!(
            log.contains("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"),
            "{name}: {log}"
        );
        // C7508 (setmaxnreg ignored), C7515..C7518 (wgmma serialized, waits injected).
        for bad in ["Performance Loss", "injected", "C7508", "setmaxnreg"] {
            assert!(!log.contains(bad), "{name}: {log}");
        }
        assert!(log.contains("Used 168 registers"), "{name}: {log}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------- on a GPU

/// On a Hopper GPU (compute capability 9.x; skipped otherwise, and said so): the wgmma kernel
/// against the CPU reference (h rounded to the activation dtype between the GEMMs) for
/// T = 1, 7 and 300 routed rows, H and F not multiples of the tiles (K tails, partial column
/// tiles, chunks past N), more k tiles than pipeline stages, an expert with no rows, rows
/// past offsets[E] left unwritten (poison), gated and not, bf16 and f16; and batch
/// invariance: a row computed alone is bitwise the row computed inside the batch.
#[test]
fn wgmma_kernel_matches_cpu_reference_on_device() {
    use crate::config::Activation;
    use crate::cpu::expert_gemm::{expert_ffn_stored, ExpertWeights};
    use crate::cuda::act::{ActView, ActViewMut};
    use crate::cuda::expert_gemm::{launch, CudaExperts};
    let Ok(dev) = CudaDevice::new(0) else {
        println!("expert_gemm_sm90: no CUDA device, device test skipped");
        return;
    };
    if dev.compute_capability.0 != 9 {
        println!(
            "expert_gemm_sm90: {} is sm_{}{}, not Hopper: device test skipped",
            dev.name, dev.compute_capability.0, dev.compute_capability.1
        );
        return;
    }
    let _next = crate::cuda::next::force_for_thread(true);
    let mut g = crate::synth::Gen::new(90);
    let mut ran = 0;
    // (E, F, H, rows, kept): expert 1 empty where E >= 3.
    let shapes = [
        (3, 136, 72, 1, 1),
        (3, 136, 72, 7, 7),
        (3, 136, 72, 300, 290),
        (3, 40, 200, 37, 30),
        (2, 264, 520, 300, 300),
        (1, 24, 16, 130, 130),
    ];
    for &(e, f, h, rows, kept) in &shapes {
        let mut offsets: Vec<u32> = (0..=e).map(|i| (kept * i / e) as u32).collect();
        if e >= 3 {
            offsets[2] = offsets[1];
        }
        let od = dev.upload(&offsets).unwrap();
        for dt in [DType::BF16, DType::F16] {
            for act in [Activation::Swiglu, Activation::Gelu] {
                let mut t = |shape: &[usize], sc: f32| g.tensor(shape, sc).cast(dt);
                let w = ExpertWeights {
                    gate: act.is_gated().then(|| t(&[e, f, h], 0.4).into()),
                    up: t(&[e, f, h], 0.4).into(),
                    down: t(&[e, h, f], 0.3).into(),
                    gate_bias: act.is_gated().then(|| t(&[e, f], 0.1)),
                    up_bias: Some(t(&[e, f], 0.1)),
                    down_bias: Some(t(&[e, h], 0.1)),
                };
                let x = g.tensor(&[rows, h], 1.0).cast(dt);
                let xb = crate::cuda::act::tensor_bytes(&x);
                let x64 = crate::cuda::act::bytes_to_f64(&xb, dt);
                let want = expert_ffn_stored(&x64, &offsets, &w, act, |y| dt.round(y)).unwrap();
                let cw = CudaExperts::upload(&dev, &w, act).unwrap();
                let buf = dev.upload(&xb).unwrap();
                let size = dt.size();
                let run = |n_rows: usize, od: &CudaSlice<u32>, a: &CudaSlice<u8>| {
                    let av = ActView {
                        bytes: a.slice(..),
                        dtype: dt,
                    };
                    let v = Variant {
                        w: WeightFormat::Dense(dt),
                        a: dt,
                    };
                    let addr = av.bytes.device_ptr(&dev.stream).0;
                    assert!(choose(&dev, v, h, addr).is_some() && choose(&dev, v, f, 0).is_some());
                    let mut hb = dev.upload(&vec![0xFFu8; n_rows * f * size]).unwrap();
                    let mut yb = dev.upload(&vec![0xFFu8; n_rows * h * size]).unwrap();
                    let mut hv = ActViewMut {
                        bytes: hb.slice_mut(..),
                        dtype: dt,
                    };
                    let mut yv = ActViewMut {
                        bytes: yb.slice_mut(..),
                        dtype: dt,
                    };
                    launch(&dev, &av, n_rows, od, &cw, act, &mut hv, &mut yv).unwrap();
                    dev.read(&yb, n_rows * h * size).unwrap()
                };
                let ctx = format!("{dt} {act:?} E={e} F={f} H={h} rows={rows}");
                let yb = run(rows, &od, &buf);
                let got = crate::cuda::act::bytes_to_f64(&yb, dt);
                let num: f64 = got[..kept * h]
                    .iter()
                    .zip(&want[..kept * h])
                    .map(|(a, b)| (a - b).powi(2))
                    .sum();
                let den: f64 = want[..kept * h].iter().map(|b| b * b).sum();
                let err = (num / den.max(1e-300)).sqrt();
                let tol = if dt == DType::BF16 { 1e-2 } else { 5e-3 };
                assert!(err <= tol, "{ctx}: rel L2 {err:e}");
                assert!(
                    got[kept * h..].iter().all(|y| y.is_nan()),
                    "{ctx}: dropped rows written"
                );
                // Batch invariance: the last kept row alone, as a one-row batch of its expert.
                if kept > 0 {
                    let r = kept - 1;
                    let er = offsets
                        .windows(2)
                        .position(|w| w[0] as usize <= r && r < w[1] as usize)
                        .unwrap();
                    let mut one = vec![0u32; e + 1];
                    for (i, o) in one.iter_mut().enumerate() {
                        *o = u32::from(i > er);
                    }
                    let od1 = dev.upload(&one).unwrap();
                    let a1 = dev.upload(&xb[r * h * size..(r + 1) * h * size]).unwrap();
                    let y1 = run(1, &od1, &a1);
                    assert_eq!(
                        y1[..],
                        yb[r * h * size..(r + 1) * h * size],
                        "{ctx}: batch invariance"
                    );
                }
                ran += 1;
            }
        }
    }
    println!("expert_gemm_sm90: {ran} device checks ran on {}", dev.name);
}

// ---------------------------------------------------------------- the PTX text itself

/// A small interpreter for the integer and address subset of PTX the kernel's bookkeeping
/// uses (mov, add, sub, shl, shr, and, or, xor, mad.lo, mul.lo, mul.wide, div, rem, min, selp,
/// setp, and.pred, cvt between u32 and u64, ld.global.u32, bra), so that the rendered
/// module's own scheduler, descriptor, staging and TMA-coordinate code runs against the
/// models above. Instructions it does not model (wgmma, cp.async.bulk.tensor, mbarrier, ...)
/// are recorded as events with their operands' values, or skipped where listed.
struct Ptx<'a> {
    lines: Vec<&'a str>,
    labels: std::collections::HashMap<String, usize>,
    regs: std::collections::HashMap<String, u64>,
    preds: std::collections::HashMap<String, bool>,
    mem: std::collections::HashMap<u64, u32>,
    events: Vec<(String, Vec<u64>)>,
}

impl<'a> Ptx<'a> {
    fn new(src: &'a str) -> Self {
        let lines: Vec<&str> = src.lines().collect();
        let mut labels = std::collections::HashMap::new();
        for (i, l) in lines.iter().enumerate() {
            let t = l.split("//").next().unwrap().trim();
            if let Some(name) = t.strip_suffix(':') {
                if !name.contains(' ') {
                    labels.insert(name.to_string(), i);
                }
            }
        }
        Ptx {
            lines,
            labels,
            regs: Default::default(),
            preds: Default::default(),
            mem: Default::default(),
            events: Vec::new(),
        }
    }

    /// Index of the first line at or after `from` whose code starts with `code`.
    fn find(&self, from: usize, code: &str) -> usize {
        (from..self.lines.len())
            .find(|&i| self.code(i).starts_with(code))
            .unwrap_or_else(|| panic!("no line {code:?} after {from}"))
    }

    fn code(&self, i: usize) -> &'a str {
        self.lines[i].split("//").next().unwrap().trim()
    }

    fn set(&mut self, r: &str, v: u64) {
        self.regs.insert(r.to_string(), v);
    }

    fn val(&self, op: &str) -> u64 {
        let op = op.trim();
        if let Some(h) = op.strip_prefix("0x").or_else(|| op.strip_prefix("0X")) {
            return u64::from_str_radix(h, 16).unwrap();
        }
        if let Ok(v) = op.parse::<u64>() {
            return v;
        }
        *self
            .regs
            .get(op)
            .unwrap_or_else(|| panic!("register {op} read before it was set"))
    }

    /// Operands split at top-level commas.
    fn operands(s: &str) -> Vec<String> {
        let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0);
        for ch in s.chars() {
            match ch {
                '{' | '[' => depth += 1,
                '}' | ']' => depth -= 1,
                _ => {}
            }
            if ch == ',' && depth == 0 {
                out.push(cur.trim().to_string());
                cur.clear();
            } else {
                cur.push(ch);
            }
        }
        if !cur.trim().is_empty() {
            out.push(cur.trim().to_string());
        }
        out
    }

    /// The values inside `[reg+off]` or `{a, b}`.
    fn address(&self, op: &str) -> u64 {
        let inner = op.trim_start_matches('[').trim_end_matches(']');
        match inner.split_once('+') {
            Some((r, off)) => self.val(r) + self.val(off),
            None => self.val(inner),
        }
    }

    /// Runs from line `from` until a line whose code starts with one of `stops` (returned:
    /// its index and which stop). Panics on an instruction it does not know.
    fn run(&mut self, from: usize, stops: &[&str], skip: &[&str]) -> (usize, usize) {
        let mut i = from;
        for _ in 0..1_000_000 {
            let first = self.code(i);
            if let Some(k) = stops.iter().position(|s| first.starts_with(s)) {
                return (i, k);
            }
            i += 1;
            if first.is_empty() || first.ends_with(':') || first.starts_with(".reg") {
                continue;
            }
            // A statement may span lines (the wgmma's accumulator list): join up to the ';'.
            let mut joined = first.to_string();
            while !joined.ends_with(';') {
                joined.push(' ');
                joined.push_str(self.code(i));
                i += 1;
            }
            let code = joined.trim_end_matches(';');
            let (guard, rest) = match code.strip_prefix('@') {
                Some(r) => {
                    let (p, rest) = r.split_once(char::is_whitespace).unwrap();
                    let (neg, p) = p.strip_prefix('!').map_or((false, p), |p| (true, p));
                    (Some(self.preds[p] != neg), rest.trim())
                }
                None => (None, code),
            };
            if guard == Some(false) {
                continue;
            }
            let (op, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            if skip.iter().any(|s| op.starts_with(s)) {
                continue;
            }
            let a = Self::operands(args);
            let w32 = |v: u64| v & 0xFFFF_FFFF;
            let is64 = op.ends_with(".u64") || op.ends_with(".b64") || op.ends_with(".s64");
            let m = |v: u64| if is64 { v } else { w32(v) };
            match op.split('.').next().unwrap() {
                "bra" => {
                    i = self.labels[a[0].as_str()];
                }
                "mov" if a[1].starts_with('{') => {
                    let parts = Self::operands(a[1].trim_matches(|c| c == '{' || c == '}'));
                    let (lo, hi) = (self.val(&parts[0]), self.val(&parts[1]));
                    self.set(&a[0], w32(lo) | w32(hi) << 32);
                }
                "mov" => {
                    let v = self.val(&a[1]);
                    self.set(&a[0], m(v));
                }
                "add" => self.set(&a[0], m(self.val(&a[1]).wrapping_add(self.val(&a[2])))),
                "sub" => self.set(&a[0], m(self.val(&a[1]).wrapping_sub(self.val(&a[2])))),
                "shl" => self.set(&a[0], m(self.val(&a[1]) << self.val(&a[2]))),
                "shr" => self.set(&a[0], m(self.val(&a[1]) >> self.val(&a[2]))),
                "and" if op == "and.pred" => {
                    let v = self.preds[&a[1]] && self.preds[&a[2]];
                    self.preds.insert(a[0].clone(), v);
                }
                "and" => self.set(&a[0], m(self.val(&a[1]) & self.val(&a[2]))),
                "or" => self.set(&a[0], m(self.val(&a[1]) | self.val(&a[2]))),
                "xor" => self.set(&a[0], m(self.val(&a[1]) ^ self.val(&a[2]))),
                "min" => self.set(&a[0], self.val(&a[1]).min(self.val(&a[2]))),
                "div" => self.set(&a[0], self.val(&a[1]) / self.val(&a[2])),
                "rem" => self.set(&a[0], self.val(&a[1]) % self.val(&a[2])),
                "mad" => {
                    let v = self.val(&a[1]) * self.val(&a[2]) + self.val(&a[3]);
                    self.set(&a[0], w32(v));
                }
                "mul" if op == "mul.wide.u32" => self.set(&a[0], self.val(&a[1]) * self.val(&a[2])),
                "mul" => self.set(&a[0], w32(self.val(&a[1]) * self.val(&a[2]))),
                "selp" => {
                    let v = if self.preds[&a[3]] {
                        self.val(&a[1])
                    } else {
                        self.val(&a[2])
                    };
                    self.set(&a[0], v);
                }
                "setp" => {
                    let (x, y) = (self.val(&a[1]), self.val(&a[2]));
                    let v = match op.split('.').nth(1).unwrap() {
                        "eq" => x == y,
                        "ne" => x != y,
                        "lt" => x < y,
                        "le" => x <= y,
                        "gt" => x > y,
                        "ge" => x >= y,
                        c => panic!("setp.{c}"),
                    };
                    self.preds.insert(a[0].clone(), v);
                }
                "cvt" => self.set(&a[0], w32(self.val(&a[1]))),
                "ld" if op == "ld.global.u32" => {
                    let addr = self.address(&a[1]);
                    let v = *self
                        .mem
                        .get(&addr)
                        .unwrap_or_else(|| panic!("load of {addr:#x}"));
                    self.set(&a[0], u64::from(v));
                }
                _ => {
                    // An event: the operands' values (vectors and addresses flattened).
                    let mut vals = Vec::new();
                    for o in &a {
                        if o.starts_with('[') {
                            let inner = o.trim_matches(|c| c == '[' || c == ']');
                            for part in Self::operands(inner) {
                                let part = part.trim_matches(|c| c == '{' || c == '}');
                                for p in Self::operands(part) {
                                    vals.push(if p.contains('+') {
                                        self.address(&p)
                                    } else {
                                        self.val(&p)
                                    });
                                }
                            }
                        } else if o.starts_with('{') {
                            for p in Self::operands(o.trim_matches(|c| c == '{' || c == '}')) {
                                vals.push(self.regs.get(p.as_str()).copied().unwrap_or(0));
                            }
                        } else if let Some(v) = self.regs.get(o.as_str()) {
                            vals.push(*v);
                        } else if let Ok(v) = o.parse::<u64>() {
                            vals.push(v);
                        }
                    }
                    self.events.push((op.to_string(), vals));
                }
            }
        }
        panic!("no stop reached");
    }
}

fn bf16_module() -> PtxModule {
    module(Sm90Variant { dtype: DType::BF16 }).unwrap()
}

#[test]
fn the_kernels_scheduler_is_the_model() {
    let m = bf16_module();
    let mut cases: Vec<(Vec<u32>, usize)> = vec![
        (vec![0, 1], 1),
        (vec![0, 7, 7, 14], 14),
        (vec![0, 290, 290, 290], 300),
        (vec![0, 129, 130, 700], 701),
    ];
    let mut off = vec![0u32];
    for i in 0..37u32 {
        off.push(off.last().unwrap() + (i * 37) % 211);
    }
    let kept = *off.last().unwrap() as usize;
    cases.push((off, kept + 5));
    for role in ["P", "C"] {
        for (off, rows) in &cases {
            for (gated, n) in [(false, 300usize), (true, 136), (true, 8)] {
                let mut p = Ptx::new(&m.source);
                let base = 0x1000u64;
                for (i, o) in off.iter().enumerate() {
                    p.mem.insert(base + 4 * i as u64, *o);
                }
                let e = off.len() - 1;
                let bnosh = if gated { 7 } else { 8 };
                let tm = rows / 128 + e;
                let tn = n.div_ceil(1 << bnosh);
                for (r, v) in [
                    ("d_off", base),
                    ("r_E", e as u64),
                    ("r_rows", *rows as u64),
                    ("r_bnosh", bnosh),
                    ("r_tm", tm as u64),
                    ("r_gs", 8 * tn as u64),
                ] {
                    p.set(r, v);
                }
                let (start_label, skip, after) = if role == "P" {
                    ("P_TILE", "bra.uni         P_TILE", "add.u32         r_nhi")
                } else {
                    (
                        "C_TILE",
                        "bra.uni         C_TILE",
                        "shl.b32         r_t0, r_c, 6",
                    )
                };
                let start = p.labels[start_label] + 3; // past the bound check
                for t in 0..tm * tn {
                    p.set("r_t", t as u64);
                    p.set("r_nct", 0); // the skip path's `add r_t, r_nct` keeps t
                    let (_, which) = p.run(start, &[after, skip], &[]);
                    let want = decode_model(t, *rows, off, n, gated);
                    match (which, want) {
                        (0, Some((e, row0, re, n0))) => {
                            let got = (p.val("r_e"), p.val("r_row0"), p.val("r_re"), p.val("r_n0"));
                            assert_eq!(
                                got,
                                (e as u64, row0 as u64, re as u64, n0 as u64),
                                "{role} t={t}"
                            );
                        }
                        (1, None) => {}
                        _ => panic!("{role} tile {t}: kernel {which}, model {want:?}"),
                    }
                }
            }
        }
    }
}

#[test]
fn the_kernels_descriptors_staging_and_copies_are_the_model() {
    let m = bf16_module();
    let src = &m.source;
    let sbase = 0x400u64; // a 1024-aligned shared base
                          // ---- consumer setup: staging base and each thread's four store addresses
    for tid in 128..384u64 {
        let mut p = Ptx::new(src);
        p.set("r_tid", tid);
        p.set("r_wg", tid >> 7);
        p.set("r_sbase", sbase);
        p.set("r_N", 136);
        p.set("d_out", 0x7000_0000);
        p.preds.insert("p_gated".into(), true);
        let from = p.labels["CONSUMER"] + 1;
        let stop = p.find(from, "mov.u32         r_s, 0;");
        p.run(from, &[p.code(stop)], &["setmaxnreg", "neg.f32"]);
        let c = (tid >> 7) - 1;
        let (lane, w) = ((tid % 32) as usize, ((tid / 32) % 4) as usize);
        let (g, t) = (lane / 4, lane % 4);
        let stg = sbase + EPI_OFF as u64 + EPI_BYTES as u64 * c;
        assert_eq!(p.val("r_stg"), stg);
        assert_eq!(p.val("r_coff"), 8192 * c);
        assert_eq!(p.val("r_i"), tid % 128);
        for mm in 0..4 {
            let want = stg + 256 * (16 * w + g) as u64 + 8 * t as u64 + 32 * (mm ^ (g & 3)) as u64;
            assert_eq!(p.val(&format!("r_q{mm}")), want, "tid {tid} q{mm}");
        }
        assert!(
            p.preds["p_pair"],
            "N even and an aligned output: pair stores"
        );
    }
    // ---- epilogue read address of every pair index
    for gated in [false, true] {
        let (cnt, shift, mask) = if gated {
            (1024u64, 4, 15)
        } else {
            (2048, 5, 31)
        };
        let mut p = Ptx::new(src);
        let stg = 0x31000u64;
        for (r, v) in [
            ("r_shift", shift),
            ("r_pmask", mask),
            ("r_wrow0", 0),
            ("r_re", 1 << 20),
            ("r_stg", stg),
        ] {
            p.set(r, v);
        }
        let from = p.find(0, "shr.u32         r_rl, r_idx, r_shift;");
        let stop = p.find(from, "ld.shared.v2.f32 {f_a0, f_a1}, [r_t0];");
        for idx in 0..cnt {
            p.set("r_idx", idx);
            p.run(from, &[p.code(stop)], &[]);
            let rl = idx >> shift;
            let lc = 2 * (idx & mask);
            assert_eq!(p.val("r_lc"), lc);
            assert_eq!(
                p.val("r_t0"),
                stg + 4 * (rl * 64 + (lc ^ ((rl & 3) << 3))),
                "idx {idx}"
            );
        }
    }
    // ---- the four descriptors of each k tile, every stage and consumer
    for s in 0..STAGES as u64 {
        for c in 0..2u64 {
            let mut p = Ptx::new(src);
            p.set("r_s", s);
            p.set("r_sbase", sbase);
            p.set("r_coff", 8192 * c);
            p.set("r_dhi", u64::from(DESC_HI));
            let from = p.find(0, "@!p_live bra    C_SKIP;") + 1;
            let stop = p.find(from, "wgmma.commit_group");
            p.run(from, &[p.code(stop)], &["wgmma.fence"]);
            let mmas: Vec<&Vec<u64>> = p
                .events
                .iter()
                .filter(|(op, _)| op.starts_with("wgmma.mma_async"))
                .map(|(_, v)| v)
                .collect();
            assert_eq!(mmas.len(), 4);
            let stage = (sbase + s * STAGE_BYTES as u64) as u32;
            for (kk, mma) in mmas.iter().enumerate() {
                // operands: 128 accumulators, a-desc, b-desc, scale-d, scales, transposes
                assert_eq!(
                    mma[128],
                    kernel_desc(stage + (c as u32) * 8192, kk),
                    "A s{s} c{c} kk{kk}"
                );
                assert_eq!(
                    mma[129],
                    kernel_desc(stage + B_OFF as u32, kk),
                    "B s{s} kk{kk}"
                );
                assert_eq!(
                    mma[130..],
                    [1, 1, 1, 0, 0],
                    "scale-d 1, no negation, K-major both"
                );
            }
        }
    }
    // ---- the producer's three copies per k tile
    for gated in [false, true] {
        for (s, ph, kt) in [(0u64, 0u64, 0u64), (3, 1, 9), (2, 0, 6)] {
            let mut p = Ptx::new(src);
            for (r, v) in [
                ("r_s", s),
                ("r_ph", ph),
                ("r_kt", kt),
                ("r_KT", kt + 2),
                ("r_sbase", sbase),
                ("r_row0", 384),
                ("r_n0", 256),
                ("r_e", 5),
                ("d_ta", 0xA000),
                ("d_tw0", 0xB000),
                ("d_tw1", if gated { 0xC000 } else { 0xB000 }),
            ] {
                p.set(r, v);
            }
            p.set("r_nhi", if gated { 256 } else { 384 });
            p.preds.insert("p_w".into(), true); // try_wait: the stage is free
            let from = p.labels["P_K"] + 1;
            let stop = p.find(from, "add.u32         r_s, r_s, 1;");
            p.run(from, &[p.code(stop)], &[]);
            let ev: Vec<&(String, Vec<u64>)> = p.events.iter().collect();
            let full = sbase + BAR_OFF as u64 + 8 * s;
            assert_eq!(ev[0].0, "mbarrier.try_wait.parity.shared::cta.b64");
            assert_eq!(
                ev[0].1,
                [full + 8 * STAGES as u64, ph ^ 1],
                "wait empty[s], parity ph ^ 1"
            );
            assert_eq!(ev[1].0, "mbarrier.arrive.expect_tx.shared::cta.b64");
            assert_eq!(ev[1].1, [full, TX_BYTES as u64]);
            let dst = sbase + s * STAGE_BYTES as u64;
            let k0 = 64 * kt;
            let want: [&[u64]; 3] = [
                &[dst, 0xA000, k0, 384, full],
                &[dst + B_OFF as u64, 0xB000, k0, 256, 5, full],
                &[
                    dst + (B_OFF + B_HALF) as u64,
                    if gated { 0xC000 } else { 0xB000 },
                    k0,
                    if gated { 256 } else { 384 },
                    5,
                    full,
                ],
            ];
            for (j, w) in want.iter().enumerate() {
                assert!(
                    ev[2 + j].0.starts_with("cp.async.bulk.tensor."),
                    "{}",
                    ev[2 + j].0
                );
                assert_eq!(ev[2 + j].1, *w, "copy {j}, gated {gated}, s {s}");
            }
        }
    }
}
