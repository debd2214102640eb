//! NCCL as the [`Communicator`] of expert parallelism (feature `nccl`): one rank per GPU, in
//! one process per rank (or one thread per GPU), all-to-all-v as NCCL's grouped point-to-point
//! calls (`ncclGroupStart`, one `ncclSend` and one `ncclRecv` per peer with a non-zero count,
//! `ncclGroupEnd`), the pattern DeepEP's normal kernels replace and NCCL EP (2.28+) builds on.
//! libnccl is opened at run time through cudarc's dynamic loading: the crate builds and runs
//! where it is absent, and [`available`] says so before anything would call into it.
//!
//! [`NcclComm`] moves device buffers (`CudaSlice<T>`), as bytes, on the communicator's
//! stream. [`Staged`] wraps it for host buffers (copy in, exchange, copy out, synchronise), so
//! that [`EpLayer::forward`](crate::ep::EpLayer::forward), which exchanges host buffers, runs
//! across processes with it. Neither has run here: this machine has no GPU, and NCCL between
//! ranks needs two or more (README, "Expert parallelism").

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::result as nccl_result;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::device::BackendKind;
use crate::ep::comm::{check_counts, offsets, Communicator, Word};
use crate::error::{Error, Result};

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device {
        backend: BackendKind::Cuda,
        what: format!("NCCL {what}: {e:?}"),
    }
}

fn driver_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device {
        backend: BackendKind::Cuda,
        what: format!("{what}: {e:?}"),
    }
}

/// `Ok` when libnccl can be opened here, else [`Error::BackendUnavailable`]. Every
/// constructor checks it first: cudarc would panic on the first NCCL call without it.
pub fn available() -> Result<()> {
    // SAFETY: is_culib_present only tries to open the library (dlopen of each candidate
    // name); it calls nothing inside it.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::BackendUnavailable {
            backend: BackendKind::Cuda,
            reason: "libnccl was not found (install NCCL 2.18+ where the ranks run)".into(),
        })
    }
}

/// The unique id that names one NCCL world: made once (on rank 0) and handed to every rank
/// out of band (a file, a socket, the launcher's environment) as its 128 bytes.
#[derive(Debug, Clone, Copy)]
pub struct NcclId(Id);

impl NcclId {
    /// A new id (`ncclGetUniqueId`).
    pub fn new() -> Result<Self> {
        available()?;
        Id::new()
            .map(NcclId)
            .map_err(|e| nccl_err("ncclGetUniqueId", e))
    }

    /// The id's 128 bytes, to send to the other ranks.
    pub fn to_bytes(&self) -> [u8; 128] {
        self.0.internal().map(|c| c as u8)
    }

    /// The id from the 128 bytes rank 0 sent.
    pub fn from_bytes(bytes: [u8; 128]) -> Self {
        NcclId(Id::uninit(bytes.map(|b| b as ::core::ffi::c_char)))
    }
}

/// One rank of an NCCL world, exchanging device buffers on `stream`.
#[derive(Debug)]
pub struct NcclComm {
    comm: Comm,
    stream: Arc<CudaStream>,
}

impl NcclComm {
    /// Rank `rank` of `world` ranks named by `id` (`ncclCommInitRank`: blocks until every
    /// rank has joined), enqueuing its transfers on `stream` (the stream of the GPU this rank
    /// runs on; one GPU per rank).
    pub fn from_rank(
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: &NcclId,
    ) -> Result<Self> {
        available()?;
        if world == 0 || rank >= world || i32::try_from(world).is_err() {
            return Err(Error::Ep {
                rank,
                what: format!("rank {rank} of a world of {world} ranks"),
            });
        }
        let comm = Comm::from_rank(stream.clone(), rank, world, id.0)
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(NcclComm { comm, stream })
    }

    /// The stream the transfers are enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl Communicator for NcclComm {
    type Buffer<T: Word> = CudaSlice<T>;

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Enqueued on the stream, not waited for (NCCL semantics): the receive buffer is ready
    /// for work enqueued later on the same stream. NCCL cannot check that the counts agree
    /// between ranks; counts that disagree hang or corrupt (the EP forward sends its counts
    /// first, so they agree by construction).
    fn all_to_all_v<T: Word>(
        &self,
        send: &CudaSlice<T>,
        send_counts: &[usize],
        recv: &mut CudaSlice<T>,
        recv_counts: &[usize],
    ) -> Result<()> {
        let (me, world) = (self.rank(), self.world_size());
        check_counts(me, world, "all_to_all_v send", send_counts, send.len())?;
        check_counts(me, world, "all_to_all_v recv", recv_counts, recv.len())?;
        let size = std::mem::size_of::<T>();
        let (so, ro) = (offsets(send_counts), offsets(recv_counts));
        let bad_view = || Error::Ep {
            rank: me,
            what: "a buffer could not be viewed as bytes".into(),
        };
        // SAFETY: a CudaSlice<T> of n elements is n · size_of::<T>() bytes of device memory;
        // u8 has no invalid bit patterns, and T: Pod has no padding to read uninitialised.
        let sb = unsafe { send.transmute::<u8>(send.len() * size) }.ok_or_else(bad_view)?;
        // SAFETY: as above; bytes written are whole elements of T sent by a peer's T buffer.
        let mut rb = unsafe { recv.transmute_mut::<u8>(recv.len() * size) }.ok_or_else(bad_view)?;
        nccl_result::group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
        let mut res = Ok(());
        for p in 0..world {
            let peer = p as i32;
            if res.is_ok() && send_counts[p] > 0 {
                let view = sb.slice(so[p] * size..so[p + 1] * size);
                res = self
                    .comm
                    .send(&view, peer)
                    .map_err(|e| nccl_err("ncclSend", e));
            }
            if res.is_ok() && recv_counts[p] > 0 {
                let mut view = rb.slice_mut(ro[p] * size..ro[p + 1] * size);
                res = self
                    .comm
                    .recv(&mut view, peer)
                    .map(|_| ())
                    .map_err(|e| nccl_err("ncclRecv", e));
            }
        }
        // The group is closed whatever happened inside it.
        let end = nccl_result::group_end().map_err(|e| nccl_err("ncclGroupEnd", e));
        res.and(end.map(|_| ()))
    }

    /// An all-reduce of one element, waited for on the host.
    fn barrier(&self) -> Result<()> {
        let mut one = self
            .stream
            .alloc_zeros::<f32>(1)
            .map_err(|e| driver_err("barrier buffer", e))?;
        self.comm
            .all_reduce_in_place(&mut one, &ReduceOp::Sum)
            .map_err(|e| nccl_err("ncclAllReduce", e))?;
        self.stream
            .synchronize()
            .map_err(|e| driver_err("barrier synchronize", e))
    }
}

/// [`NcclComm`] for host buffers: each all-to-all-v copies the send buffer to the device,
/// exchanges, copies the received elements back and waits. What the host-buffer EP forward
/// ([`EpLayer::forward`](crate::ep::EpLayer::forward)) runs on across processes.
#[derive(Debug)]
pub struct Staged(pub NcclComm);

impl Communicator for Staged {
    type Buffer<T: Word> = [T];

    fn rank(&self) -> usize {
        self.0.rank()
    }

    fn world_size(&self) -> usize {
        self.0.world_size()
    }

    fn all_to_all_v<T: Word>(
        &self,
        send: &[T],
        send_counts: &[usize],
        recv: &mut [T],
        recv_counts: &[usize],
    ) -> Result<()> {
        let (me, world) = (self.rank(), self.world_size());
        let sn = check_counts(me, world, "all_to_all_v send", send_counts, send.len())?;
        let rn = check_counts(me, world, "all_to_all_v recv", recv_counts, recv.len())?;
        let size = std::mem::size_of::<T>();
        let stream = self.0.stream();
        let bytes: &[u8] = bytemuck::cast_slice(&send[..sn]);
        let mut dsend = stream
            .alloc_zeros::<u8>(bytes.len().max(1))
            .map_err(|e| driver_err("staging buffer", e))?;
        if !bytes.is_empty() {
            stream
                .memcpy_htod(bytes, &mut dsend)
                .map_err(|e| driver_err("staging copy in", e))?;
        }
        let mut drecv = stream
            .alloc_zeros::<u8>((rn * size).max(1))
            .map_err(|e| driver_err("staging buffer", e))?;
        let scale = |c: &[usize]| c.iter().map(|&n| n * size).collect::<Vec<_>>();
        self.0
            .all_to_all_v::<u8>(&dsend, &scale(send_counts), &mut drecv, &scale(recv_counts))?;
        if rn > 0 {
            let out: &mut [u8] = bytemuck::cast_slice_mut(&mut recv[..rn]);
            stream
                .memcpy_dtoh(&drecv.slice(0..rn * size), out)
                .map_err(|e| driver_err("staging copy out", e))?;
        }
        stream
            .synchronize()
            .map_err(|e| driver_err("staging synchronize", e))
    }

    fn barrier(&self) -> Result<()> {
        self.0.barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without libnccl (this machine), every constructor answers BackendUnavailable instead
    /// of panicking inside cudarc.
    #[test]
    fn absent_nccl_is_an_error_not_a_panic() {
        if available().is_ok() {
            return; // a machine with NCCL: nothing to check here
        }
        assert!(matches!(
            NcclId::new(),
            Err(Error::BackendUnavailable { .. })
        ));
        let id = NcclId::from_bytes([0; 128]);
        assert_eq!(id.to_bytes(), [0; 128]);
    }
}
