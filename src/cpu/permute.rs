//! Stage 2, CPU reference: the canonical stable counting sort of assignments by expert.
//!
//! Assignment `i = t · slots + j` has key `topk_ids[i]` when kept and `E` (a bucket after
//! every expert) when dropped by capacity. Rows are sorted by key, stably, so within a key
//! they keep assignment order (token-major, then slot). `expert_offsets[e]..[e+1]` are expert
//! e's rows; rows from `expert_offsets[E]` on are the dropped assignments, which no GEMM
//! computes and no combine reads.

use crate::cpu::gate::check_ids;
use crate::error::Result;
use crate::shape;
use crate::stage::Stage;
use crate::tensor::Tensor;

/// The permutation of T·slots assignments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permutation {
    /// Experts E (key E is the bucket of dropped assignments).
    pub experts: usize,
    /// `[E + 1]`: exclusive prefix sum of kept assignments per expert.
    pub expert_offsets: Vec<u32>,
    /// `[T·slots]`: the assignment at each row.
    pub sorted_assignment: Vec<u32>,
    /// `[T·slots]`: the row of each assignment (inverse of `sorted_assignment`).
    pub row_of_assignment: Vec<u32>,
}

impl Permutation {
    /// Rows that experts compute (`expert_offsets[E]`).
    pub fn kept_rows(&self) -> usize {
        self.expert_offsets[self.experts] as usize
    }
}

/// Sorts assignments by expert (see the module docs).
pub fn permute(topk_ids: &[u32], kept: &[bool], experts: usize) -> Result<Permutation> {
    shape::expect_len(Stage::Permute, "kept", kept.len(), topk_ids.len())?;
    check_ids(topk_ids, experts)?;
    if u32::try_from(topk_ids.len()).is_err() {
        return Err(crate::error::Error::shape(
            Stage::Permute,
            format!("{} assignments exceed the u32 index range", topk_ids.len()),
        ));
    }
    let key = |i: usize| {
        if kept[i] {
            topk_ids[i] as usize
        } else {
            experts
        }
    };
    // Counting sort: histogram, exclusive prefix sum, then place in assignment order.
    let mut offsets = vec![0u32; experts + 2];
    for i in 0..topk_ids.len() {
        offsets[key(i) + 1] += 1;
    }
    for b in 0..=experts {
        offsets[b + 1] += offsets[b];
    }
    let mut next = offsets.clone();
    let mut sorted = vec![0u32; topk_ids.len()];
    let mut row_of = vec![0u32; topk_ids.len()];
    for i in 0..topk_ids.len() {
        let r = next[key(i)] as usize;
        next[key(i)] += 1;
        sorted[r] = i as u32;
        row_of[i] = r as u32;
    }
    offsets.truncate(experts + 1);
    Ok(Permutation {
        experts,
        expert_offsets: offsets,
        sorted_assignment: sorted,
        row_of_assignment: row_of,
    })
}

/// The gathered rows `x_perm[r] = x[sorted_assignment[r] / slots]`, `[T·slots, H]`, for every
/// row (dropped ones too, so the buffer is fully defined).
pub fn gather(x: &Tensor, slots: usize, perm: &Permutation) -> Result<Vec<f64>> {
    let (t, h) = shape::matrix(Stage::Permute, "x", x)?;
    shape::expect_len(
        Stage::Permute,
        "sorted_assignment",
        perm.sorted_assignment.len(),
        shape::mul(Stage::Permute, "T x slots", t, slots)?,
    )?;
    let mut out = Vec::with_capacity(perm.sorted_assignment.len() * h);
    for &a in &perm.sorted_assignment {
        out.extend(x.row_f64(a as usize / slots, h));
    }
    Ok(out)
}
