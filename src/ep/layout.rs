//! The dispatch layout (as DeepEP's `get_dispatch_layout`): from a home rank's permutation of
//! its own tokens, how many rows go to each rank and to each expert; on an expert rank, where
//! each received row sits in the grouped GEMM's input and back.
//!
//! A home rank's kept assignments, in its canonical permutation (DESIGN.md stage 2: sorted by
//! expert, stable in token-then-slot order), are already grouped by destination: ranks hold
//! ascending contiguous expert ranges, so the rows for rank d are one contiguous run, those of
//! experts `experts.range(d)`. An expert rank receives, from each source s in rank order, its
//! rows grouped by local expert; [`Arrange`] regroups them by expert (then source) for the
//! grouped GEMM and puts the results back in arrival order for the return trip. Since every
//! GEMM row is computed alone, the order of rows within an expert changes no bit of any row.

use crate::ep::split::Split;
use crate::error::{Error, Result};

/// Rows a home rank sends: per destination rank and per expert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `[world]`: kept assignments of this rank's tokens to each rank's experts.
    pub rows_per_rank: Vec<usize>,
    /// `[E]`: kept assignments of this rank's tokens to each expert.
    pub rows_per_expert: Vec<usize>,
}

impl Layout {
    /// The layout of a permutation with `expert_offsets` `[E + 1]` (this rank's tokens) over
    /// the expert split `experts` (whose total must be E).
    pub fn new(rank: usize, expert_offsets: &[u32], experts: &Split) -> Result<Layout> {
        let e = experts.total();
        if expert_offsets.len() != e + 1 {
            return Err(Error::Ep {
                rank,
                what: format!(
                    "expert_offsets has {} entries for E = {e} experts",
                    expert_offsets.len()
                ),
            });
        }
        let rows_per_expert: Vec<usize> = expert_offsets
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]) as usize)
            .collect();
        let rows_per_rank = (0..experts.world())
            .map(|d| rows_per_expert[experts.range(d)].iter().sum())
            .collect();
        Ok(Layout {
            rows_per_rank,
            rows_per_expert,
        })
    }

    /// The per-expert counts this rank sends to each rank (rank d gets those of its
    /// experts): the all-to-all-v payload that tells every expert rank what will arrive.
    pub fn expert_counts_payload(&self) -> Vec<u32> {
        self.rows_per_expert.iter().map(|&c| c as u32).collect()
    }

    /// Rows this rank sends in all.
    pub fn rows(&self) -> usize {
        self.rows_per_rank.iter().sum()
    }
}

/// An expert rank's regrouping of received rows: arrival order (source, then local expert)
/// to GEMM order (local expert, then source), and back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrange {
    /// `(arrival row, GEMM row, rows)` of each (source, expert) block.
    blocks: Vec<(usize, usize, usize)>,
    /// `[local E + 1]`: the GEMM's expert offsets.
    pub expert_offsets: Vec<u32>,
    /// Rows received from each source rank.
    pub rows_per_source: Vec<usize>,
    /// Rows in all.
    pub rows: usize,
}

impl Arrange {
    /// From `counts` `[world · local E]`: the rows of each local expert received from each
    /// source rank, source-major.
    pub fn new(rank: usize, counts: &[u32], world: usize, local_experts: usize) -> Result<Arrange> {
        if counts.len() != world * local_experts {
            return Err(Error::Ep {
                rank,
                what: format!(
                    "{} expert counts received for {world} ranks x {local_experts} local experts",
                    counts.len()
                ),
            });
        }
        let c = |s: usize, e: usize| counts[s * local_experts + e] as usize;
        let mut expert_offsets = Vec::with_capacity(local_experts + 1);
        let mut acc = 0usize;
        expert_offsets.push(0u32);
        // GEMM row where (expert e, source s) starts.
        let mut start = vec![0usize; world * local_experts];
        for e in 0..local_experts {
            for s in 0..world {
                start[s * local_experts + e] = acc;
                acc += c(s, e);
            }
            expert_offsets.push(u32::try_from(acc).map_err(|_| Error::Ep {
                rank,
                what: format!("{acc} received rows exceed the u32 row index"),
            })?);
        }
        let mut blocks = Vec::new();
        let mut arrival = 0usize;
        let mut rows_per_source = vec![0usize; world];
        for s in 0..world {
            for e in 0..local_experts {
                let n = c(s, e);
                if n > 0 {
                    blocks.push((arrival, start[s * local_experts + e], n));
                }
                arrival += n;
                rows_per_source[s] += n;
            }
        }
        Ok(Arrange {
            blocks,
            expert_offsets,
            rows_per_source,
            rows: acc,
        })
    }

    /// Rows in arrival order → GEMM order (`w` words per row).
    pub fn to_gemm(&self, arrived: &[u32], w: usize) -> Vec<u32> {
        let mut out = vec![0u32; self.rows * w];
        for &(a, g, n) in &self.blocks {
            out[g * w..(g + n) * w].copy_from_slice(&arrived[a * w..(a + n) * w]);
        }
        out
    }

    /// Rows in GEMM order → arrival order (`w` words per row), for the return trip.
    pub fn to_arrival(&self, gemm: &[u32], w: usize) -> Vec<u32> {
        let mut out = vec![0u32; self.rows * w];
        for &(a, g, n) in &self.blocks {
            out[a * w..(a + n) * w].copy_from_slice(&gemm[g * w..(g + n) * w]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_counts_rows_per_rank_and_expert() {
        // E = 5 over ranks holding 2, 0, 3 experts; 1+2 rows to rank 0, 4 to rank 2.
        let split = Split::from_counts(&[2, 0, 3]);
        let l = Layout::new(0, &[0, 1, 3, 3, 7, 7], &split).unwrap();
        assert_eq!(l.rows_per_rank, vec![3, 0, 4]);
        assert_eq!(l.rows_per_expert, vec![1, 2, 0, 4, 0]);
        assert_eq!(l.rows(), 7);
        assert!(Layout::new(0, &[0, 1], &split).is_err());
    }

    #[test]
    fn arrange_groups_by_expert_then_source_and_back() {
        // 2 sources, 2 local experts: source 0 sends 1 row of e0, 2 of e1; source 1 2 of e0.
        let a = Arrange::new(0, &[1, 2, 2, 0], 2, 2).unwrap();
        assert_eq!(a.expert_offsets, vec![0, 3, 5]);
        assert_eq!(a.rows_per_source, vec![3, 2]);
        let arrived = vec![10, 11, 12, 20, 21];
        let g = a.to_gemm(&arrived, 1);
        assert_eq!(g, vec![10, 20, 21, 11, 12]);
        assert_eq!(a.to_arrival(&g, 1), arrived);
    }
}
