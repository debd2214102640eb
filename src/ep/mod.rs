//! Expert parallelism (DESIGN.md section 8): the routed experts of a layer sharded over ranks,
//! tokens dispatched to their experts' rank and back, and the output **bitwise equal to the
//! single-device forward** on the same backend, for every number of ranks.
//!
//! - [`Communicator`]: rank, world size, all-to-all-v of typed buffers with per-peer counts,
//!   barrier. [`InProcess`] runs N ranks as threads of one process (host buffers; the tests'
//!   double); with the `nccl` feature, `nccl::NcclComm` moves device buffers with NCCL's
//!   grouped send/recv (libnccl loaded at run time), and `nccl::Staged` lets the host-buffer
//!   forward use it across processes.
//! - [`EpLayer`]: rank r holds the router, any shared expert, and the contiguous range of
//!   routed experts `experts.range(r)` of a [`Split`] (uneven splits and empty ranges are
//!   valid). [`EpLayer::forward`] takes the rank's own tokens.
//! - [`InProcessWorld`] / [`forward_in_process`]: every rank as a thread, the output assembled.
//!
//! **Capacity and expert choice over the global batch.** Tokens are split over ranks (each
//! rank is the home of a contiguous run of the batch). Capacity and expert choice are defined
//! on the whole batch (an assignment's position at its expert counts every earlier-ranked
//! assignment of every token), so a rank cannot decide them from its own tokens: with either,
//! the router logits `[T_r, E]` are all-gathered (4·E bytes per token) and every rank runs the
//! same gate kernel on the same global `[T, E]` logits, which is the single-device gate, then
//! keeps its own rows. Without them the gate is per token, so each rank gates only its own
//! tokens and nothing is gathered. The global expert counts are the sum of the ranks'.
//!
//! **Why the output is bitwise equal.** Every value is computed by the function the
//! single-device forward uses for it, on the same inputs: router logits, the shared expert and
//! the gate are per token (or, with capacity, run on the same global logits); an expert GEMM
//! row depends on its own input row only (no split of k that depends on the batch, no
//! batch-dependent summation order: the backends promise it and their tests check it); rows cross ranks as raw bits in the
//! activation dtype; and the combine on the home rank reads each token's picks through its
//! own permutation, in slot order, never in arrival order.
//!
//! **Host staging.** The forward exchanges host buffers and the backends stage their device
//! buffers through the host at each step (`ep::stages`): the layout (counts per rank and
//! expert) is computed on the host from the permutation's expert offsets, read once. That is
//! the in-process simulation's shape, which checks the semantics; a device-resident layout
//! kernel and NCCL on the CUDA backend's own buffers (no host copy, CUDA-graph capturable
//! with worst-case buffers) are what a multi-GPU machine is needed for.

pub(crate) mod agree;
#[cfg(feature = "cli")]
pub mod bench;
pub mod comm;
pub(crate) mod exchange;
pub(crate) mod forward;
pub mod in_process;
pub mod layer;
pub mod layout;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod shard;
pub mod split;
pub(crate) mod stages;
pub mod world;

pub use comm::{Communicator, Word};
pub use in_process::InProcess;
pub use layer::{EpLayer, EpOutput, EpStats};
pub use layout::{Arrange, Layout};
pub use split::Split;
pub use world::{forward_in_process, EpRun, InProcessWorld};
