//! The transport of expert parallelism: a [`Communicator`] knows its rank and the world's size
//! and moves typed buffers between ranks with an all-to-all-v (per-peer counts on both sides,
//! as NCCL's grouped `send` / `recv` and MPI's `Alltoallv` take them) and a barrier. Two
//! implement it: [`InProcess`](crate::ep::InProcess) (N ranks as threads of one process, host
//! buffers; the test double) and, with the `nccl` feature, `ep::nccl::NcclComm` (device
//! buffers, one GPU per rank).

use crate::error::{Error, Result};

/// An element a communicator moves: plain old data of a fixed size (bytes on the wire).
pub trait Word: bytemuck::Pod + Send + Sync + 'static {
    /// A name for messages (`u32`, `f32`, ...).
    const NAME: &'static str;
}

macro_rules! words {
    ($($t:ty),*) => {
        $(impl Word for $t {
            const NAME: &'static str = stringify!($t);
        })*
    };
}
words!(u8, u16, u32, u64, i32, i64, f32, f64);

impl Word for half::f16 {
    const NAME: &'static str = "f16";
}

impl Word for half::bf16 {
    const NAME: &'static str = "bf16";
}

/// One rank's view of a group of ranks that exchange buffers.
///
/// Every rank of the world calls each collective in the same order (as with NCCL and MPI); a
/// rank that fails between collectives must make its peers fail too rather than wait forever
/// (the in-process world aborts; NCCL's communicator is aborted when it is dropped).
pub trait Communicator {
    /// The typed buffer this transport moves: host slices for the in-process double, device
    /// memory (`CudaSlice<T>`) for NCCL.
    type Buffer<T: Word>: ?Sized;

    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// Ranks in the world.
    fn world_size(&self) -> usize;

    /// All-to-all with per-peer counts: the elements `send[Σ_{q<p} send_counts[q] ..][..
    /// send_counts[p]]` go to rank `p`, and the `recv_counts[p]` elements from rank `p` land
    /// at `recv[Σ_{q<p} recv_counts[q] ..]`, in rank order. Both count lists have
    /// `world_size()` entries; `recv_counts[p]` must equal what rank `p` sends here (an
    /// [`Error::Ep`] when the transport can tell it does not). Elements past the counted
    /// prefix of `recv` are left as they are.
    fn all_to_all_v<T: Word>(
        &self,
        send: &Self::Buffer<T>,
        send_counts: &[usize],
        recv: &mut Self::Buffer<T>,
        recv_counts: &[usize],
    ) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// Checks one side of an all-to-all-v: `counts` has one entry per rank and their sum fits in
/// `len` elements; returns the sum.
pub fn check_counts(
    rank: usize,
    world: usize,
    what: &str,
    counts: &[usize],
    len: usize,
) -> Result<usize> {
    let ep = |what: String| Error::Ep { rank, what };
    if counts.len() != world {
        return Err(ep(format!(
            "{what}: {} counts for a world of {world} ranks",
            counts.len()
        )));
    }
    let total = counts
        .iter()
        .try_fold(0usize, |a, &c| a.checked_add(c))
        .ok_or_else(|| ep(format!("{what}: the counts overflow")))?;
    if total > len {
        return Err(ep(format!(
            "{what}: the counts add up to {total} elements, the buffer holds {len}"
        )));
    }
    Ok(total)
}

/// Exclusive prefix sums of `counts` (`counts.len() + 1` entries).
pub(crate) fn offsets(counts: &[usize]) -> Vec<usize> {
    let mut o = Vec::with_capacity(counts.len() + 1);
    let mut acc = 0usize;
    o.push(0);
    for &c in counts {
        acc = acc.saturating_add(c);
        o.push(acc);
    }
    o
}
