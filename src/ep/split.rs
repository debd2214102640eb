//! Contiguous ranges over ranks: which experts a rank holds, which tokens a rank is home to.
//! Uneven splits are allowed, and so are empty ranges (more ranks than experts, a rank with no
//! tokens).

use std::ops::Range;

use crate::error::{Error, Result};

/// `n` items split into contiguous ranges, one per rank, in rank order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Split {
    /// `[world + 1]`: rank r holds items `bounds[r]..bounds[r + 1]`.
    bounds: Vec<usize>,
}

impl Split {
    /// `n` items over `world` ranks as evenly as possible: the first `n % world` ranks hold
    /// one more. An error for a world of 0 ranks.
    pub fn even(n: usize, world: usize) -> Result<Split> {
        if world == 0 {
            return Err(Error::Ep {
                rank: 0,
                what: "a split over 0 ranks".into(),
            });
        }
        let (q, r) = (n / world, n % world);
        Ok(Split::from_counts(
            &(0..world)
                .map(|i| q + usize::from(i < r))
                .collect::<Vec<_>>(),
        ))
    }

    /// Rank r holds `counts[r]` items (any of them may be 0).
    pub fn from_counts(counts: &[usize]) -> Split {
        let mut bounds = Vec::with_capacity(counts.len() + 1);
        let mut acc = 0usize;
        bounds.push(0);
        for &c in counts {
            acc = acc.saturating_add(c);
            bounds.push(acc);
        }
        Split { bounds }
    }

    /// Ranks.
    pub fn world(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Items in all.
    pub fn total(&self) -> usize {
        self.bounds[self.bounds.len() - 1]
    }

    /// The items of `rank` (empty for a rank outside the world).
    pub fn range(&self, rank: usize) -> Range<usize> {
        match (self.bounds.get(rank), self.bounds.get(rank + 1)) {
            (Some(&a), Some(&b)) => a..b,
            _ => 0..0,
        }
    }

    /// Items each rank holds.
    pub fn counts(&self) -> Vec<usize> {
        self.bounds.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// The `world + 1` range bounds.
    pub fn bounds(&self) -> &[usize] {
        &self.bounds
    }

    /// The rank holding item `i` (`None` past the end). With empty ranges, the last rank
    /// whose range starts at or before `i`, i.e. the one that holds it.
    pub fn owner(&self, i: usize) -> Option<usize> {
        if i >= self.total() {
            return None;
        }
        Some(self.bounds.partition_point(|&b| b <= i) - 1)
    }

    /// A 64-bit fingerprint of the bounds (FNV-1a), for checking that ranks agree.
    pub fn fingerprint(&self) -> u64 {
        fnv(self.bounds.iter().flat_map(|b| (*b as u64).to_le_bytes()))
    }
}

/// FNV-1a over `bytes`.
pub(crate) fn fnv(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_uneven_and_empty_ranges() {
        let s = Split::even(10, 4).unwrap();
        assert_eq!(s.counts(), vec![3, 3, 2, 2]);
        assert_eq!(s.range(2), 6..8);
        assert_eq!(s.owner(5), Some(1));
        assert_eq!(s.owner(10), None);
        let s = Split::even(3, 8).unwrap();
        assert_eq!(s.counts(), vec![1, 1, 1, 0, 0, 0, 0, 0]);
        let s = Split::from_counts(&[0, 2, 0, 3]);
        assert_eq!(s.owner(0), Some(1));
        assert_eq!(s.owner(2), Some(3));
        assert_eq!(s.range(9), 0..0);
        assert!(Split::even(1, 0).is_err());
        assert_ne!(
            s.fingerprint(),
            Split::from_counts(&[0, 2, 3, 0]).fingerprint()
        );
    }
}
