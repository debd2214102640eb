//! The exchanges of one expert-parallel forward over a host-buffer [`Communicator`]: every
//! all-to-all-v timed (into [`EpStats::exchange`]) and the bytes sent to other ranks counted.

use std::time::Instant;

use crate::ep::comm::Communicator;
use crate::ep::layer::EpStats;
use crate::error::Result;

/// The exchanges of one forward, timed and counted.
pub(crate) struct Exchange<'a, C: ?Sized> {
    pub comm: &'a C,
    pub me: usize,
    pub world: usize,
    pub stats: EpStats,
}

impl<C> Exchange<'_, C>
where
    C: Communicator<Buffer<u32> = [u32]> + ?Sized,
{
    /// One all-to-all-v of u32 words; returns what arrived, in rank order.
    pub fn all_to_all(
        &mut self,
        send: &[u32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<u32>> {
        let mut recv = vec![0u32; recv_counts.iter().sum()];
        let t = Instant::now();
        self.comm
            .all_to_all_v::<u32>(send, send_counts, &mut recv, recv_counts)?;
        self.stats.exchange += t.elapsed();
        let out: usize = send_counts
            .iter()
            .enumerate()
            .filter(|&(p, _)| p != self.me)
            .map(|(_, &c)| c)
            .sum();
        self.stats.bytes_to_peers += 4 * out as u64;
        Ok(recv)
    }

    /// The same `words` to every rank; returns every rank's, in rank order.
    pub fn all_gather(&mut self, words: &[u32], counts: &[usize]) -> Result<Vec<u32>> {
        let send: Vec<u32> = (0..self.world)
            .flat_map(|_| words.iter().copied())
            .collect();
        self.all_to_all(&send, &vec![words.len(); self.world], counts)
    }
}
