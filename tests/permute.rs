//! Stage 2 (permute): the canonical stable permutation, exact on every backend, checked by
//! hand and by its defining properties; the gather copies rows exactly.

mod common;

use moe_kernels::cpu::permute::{gather, permute};
use moe_kernels::synth::{assignments, random_x, Gen, Spread};
use moe_kernels::{GateBuffers, PermuteBuffers};

#[test]
fn permutation_by_hand() {
    // T = 3, k = 2: assignments 0..6 with experts [2,0 | 0,1 | 2,1].
    let ids = [2, 0, 0, 1, 2, 1];
    let p = permute(&ids, &[true; 6], 3).unwrap();
    assert_eq!(p.expert_offsets, vec![0, 2, 4, 6]);
    assert_eq!(p.sorted_assignment, vec![1, 2, 3, 5, 0, 4]);
    assert_eq!(p.row_of_assignment, vec![4, 0, 1, 2, 5, 3]);
}

#[test]
fn dropped_assignments_go_after_every_expert() {
    let ids = [2, 0, 0, 1, 2, 1];
    let kept = [true, false, true, true, false, true];
    let p = permute(&ids, &kept, 3).unwrap();
    assert_eq!(p.expert_offsets, vec![0, 1, 3, 4]);
    assert_eq!(p.sorted_assignment, vec![2, 3, 5, 0, 1, 4]);
    assert_eq!(p.kept_rows(), 4);
}

#[test]
fn out_of_range_id_is_an_error() {
    assert!(permute(&[0, 3], &[true, true], 3).is_err());
    assert!(permute(&[0, 1], &[true], 3).is_err());
}

#[test]
fn every_backend_matches_reference_and_properties() {
    let backends = common::backends("permute");
    let mut g = Gen::new(5);
    let mut cases = 0;
    for &t in &common::TOKENS {
        for &(e, k) in &[(1usize, 1usize), (5, 1), (8, 2), (16, 16), (61, 8)] {
            for (mode, spread) in Spread::ALL.into_iter().enumerate() {
                let h = if mode % 2 == 0 { 13 } else { 8 }; // 8 takes the 4-wide gather path
                let x = random_x(t, h, (t * 31 + e) as u64);
                let (ids, kept) = assignments(&mut g, t, k, e, spread);
                let kept_b: Vec<bool> = kept.iter().map(|&v| v == 1).collect();
                let reference = permute(&ids, &kept_b, e).unwrap();
                let ref_rows = gather(&x, k, &reference).unwrap();
                let mut gate = GateBuffers::poisoned(t, k, e);
                gate.topk_ids = ids.clone();
                gate.kept = kept.clone();
                gate.topk_weights = vec![0.5; t * k];
                gate.counts = vec![0; e];
                for dev in &backends {
                    let ctx = format!("{} T={t} E={e} k={k} {spread:?}", dev.kind());
                    let mut out = PermuteBuffers::poisoned(t, k, e, h);
                    dev.permute(&gate, &x, &mut out).unwrap();
                    assert_eq!(out.permutation(), reference, "{ctx}");
                    // The gather is a copy: bitwise equal to the input rows.
                    let rows: Vec<f64> = common::wide(&out.x_perm);
                    assert_eq!(rows, ref_rows, "{ctx}: x_perm");
                    check_properties(&ids, &kept_b, e, k, &out, &x.to_f32_vec(), h, &ctx);
                    cases += 1;
                }
            }
        }
    }
    println!("permute: {cases} cases");
}

/// The definition, checked directly: offsets are the prefix sum of kept counts; rows are a
/// permutation; within a bucket rows keep assignment order; inverse is consistent.
#[allow(clippy::too_many_arguments)]
fn check_properties(
    ids: &[u32],
    kept: &[bool],
    e: usize,
    k: usize,
    out: &PermuteBuffers,
    x: &[f32],
    h: usize,
    ctx: &str,
) {
    let n = ids.len();
    let mut counts = vec![0u32; e];
    for i in 0..n {
        if kept[i] {
            counts[ids[i] as usize] += 1;
        }
    }
    let mut prefix = vec![0u32];
    for c in &counts {
        prefix.push(prefix.last().unwrap() + c);
    }
    assert_eq!(out.expert_offsets, prefix, "{ctx}: offsets");
    let mut seen = vec![false; n];
    for r in 0..n {
        let a = out.sorted_assignment[r] as usize;
        assert!(!seen[a], "{ctx}: assignment {a} twice");
        seen[a] = true;
        assert_eq!(out.row_of_assignment[a] as usize, r, "{ctx}: inverse");
        let bucket = if kept[a] { ids[a] as usize } else { e };
        let lo = if bucket == e {
            prefix[e]
        } else {
            prefix[bucket]
        } as usize;
        let hi = if bucket == e {
            n
        } else {
            prefix[bucket + 1] as usize
        };
        assert!((lo..hi).contains(&r), "{ctx}: row {r} outside its bucket");
        if r > lo {
            assert!(
                out.sorted_assignment[r - 1] < out.sorted_assignment[r],
                "{ctx}: not stable"
            );
        }
        let tok = a / k;
        assert_eq!(
            &out.x_perm[r * h..(r + 1) * h],
            &x[tok * h..(tok + 1) * h],
            "{ctx}: gathered row"
        );
    }
}
