//! Checks shared by the fuzz targets: the invariants of the gate's and permute's outputs
//! (DESIGN.md section 1, stages 1 and 2). A failed check panics, which libFuzzer reports.

#![allow(dead_code)]

use moe_kernels::cpu::gate::Routing;
use moe_kernels::cpu::permute::{permute, Permutation};
use moe_kernels::RoutingConfig;

/// Asserts the gate's output invariants for `t` tokens and `e` experts, then runs permute
/// on it (which must succeed) and checks the permutation; returns it.
pub fn check_routing(r: &Routing, cfg: &RoutingConfig, t: usize, e: usize) -> Permutation {
    let slots = cfg.slots(e);
    assert_eq!(r.tokens, t, "routing.tokens");
    assert_eq!(r.experts, e, "routing.experts");
    assert_eq!(r.slots, slots, "routing.slots");
    let n = t * slots;
    assert_eq!(r.topk_ids.len(), n, "topk_ids length");
    assert_eq!(r.topk_weights.len(), n, "topk_weights length");
    assert_eq!(r.kept.len(), n, "kept length");
    assert_eq!(r.counts.len(), e, "counts length");

    for (i, &id) in r.topk_ids.iter().enumerate() {
        assert!((id as usize) < e, "topk_ids[{i}] = {id} >= E = {e}");
    }
    // A token's picks are distinct experts.
    for tok in 0..t {
        let row = &r.topk_ids[tok * slots..(tok + 1) * slots];
        let mut seen = vec![false; e];
        for &id in row {
            assert!(
                !seen[id as usize],
                "token {tok} picks expert {id} twice: {row:?}"
            );
            seen[id as usize] = true;
        }
    }
    // counts[e] = kept assignments to e.
    let mut counts = vec![0u32; e];
    for (i, &id) in r.topk_ids.iter().enumerate() {
        if r.kept[i] {
            counts[id as usize] += 1;
        }
    }
    assert_eq!(r.counts, counts, "counts differ from the kept assignments");
    // Dropped assignments weigh exactly zero.
    for i in 0..n {
        if !r.kept[i] {
            assert!(
                r.topk_weights[i] == 0.0,
                "dropped assignment {i} has weight {}",
                r.topk_weights[i]
            );
        }
    }
    match (cfg.expert_choice, cfg.capacity) {
        (None, None) => {
            assert!(r.capacity.is_none(), "capacity reported without capacity");
            assert!(
                r.kept.iter().all(|&k| k),
                "an assignment dropped without capacity"
            );
        }
        _ => {
            let cap = r.capacity.expect("capacity routing reports C");
            for (x, &c) in r.counts.iter().enumerate() {
                assert!(c as usize <= cap, "expert {x} keeps {c} > C = {cap}");
            }
            if cfg.expert_choice.is_some() {
                assert!(cap <= t, "expert-choice C = {cap} > T = {t}");
            }
        }
    }

    let kept_total = r.kept.iter().filter(|&&k| k).count();
    let p = permute(&r.topk_ids, &r.kept, e).unwrap_or_else(|err| {
        panic!("permute failed on the gate's own output: {err}");
    });
    check_permutation(&p, &r.topk_ids, &r.kept, &r.counts, e);
    assert_eq!(p.kept_rows(), kept_total, "kept rows");
    p
}

/// The permutation is the stable counting sort of the assignments by expert (dropped last).
pub fn check_permutation(p: &Permutation, ids: &[u32], kept: &[bool], counts: &[u32], e: usize) {
    let n = ids.len();
    assert_eq!(p.experts, e);
    assert_eq!(p.expert_offsets.len(), e + 1, "expert_offsets length");
    assert_eq!(p.expert_offsets[0], 0, "expert_offsets[0]");
    for (x, (w, &c)) in p.expert_offsets.windows(2).zip(counts).enumerate() {
        assert_eq!(w[1] - w[0], c, "rows of expert {x}");
    }
    assert_eq!(p.sorted_assignment.len(), n);
    assert_eq!(p.row_of_assignment.len(), n);
    let key = |i: usize| if kept[i] { ids[i] as usize } else { e };
    let mut seen = vec![false; n];
    for (r, &a) in p.sorted_assignment.iter().enumerate() {
        let a = a as usize;
        assert!(a < n, "sorted_assignment[{r}] = {a} out of range");
        assert!(!seen[a], "assignment {a} appears twice");
        seen[a] = true;
        assert_eq!(
            p.row_of_assignment[a] as usize, r,
            "row_of_assignment is not the inverse"
        );
        if r > 0 {
            let prev = p.sorted_assignment[r - 1] as usize;
            assert!(
                (key(prev), prev) < (key(a), a),
                "rows {} and {r} are not in stable expert order",
                r - 1
            );
        }
    }
}

/// A small deterministic generator (xorshift64*), seeded from the fuzz input.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// FNV-1a of the input: a deterministic seed.
pub fn hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
