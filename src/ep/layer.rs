//! [`EpLayer`]: one rank of an expert-parallel MoE layer, and what its forward returns.

use std::ops::Range;
use std::time::Duration;

use crate::backend::{Backend, Device};
use crate::ep::comm::Communicator;
use crate::ep::shard::rank_weights;
use crate::ep::split::{fnv, Split};
use crate::ep::stages::RankStages;
use crate::error::{Error, Result};
use crate::layer::MoeLayer;
use crate::tensor::{DType, Tensor};

/// Rank `r` of an expert-parallel layer: the router and any shared expert of the layer, and
/// the routed experts `experts.range(r)`, made ready on a backend for one activation dtype.
/// Every rank of a world calls [`EpLayer::forward`] with its own tokens; together they compute
/// bitwise what [`MoeLayer::forward`] computes on the whole batch with the same backend
/// (`ep` module docs).
pub struct EpLayer {
    pub(crate) rank: usize,
    pub(crate) experts: Split,
    pub(crate) hidden: usize,
    pub(crate) num_experts: usize,
    pub(crate) slots: usize,
    pub(crate) dtype: DType,
    pub(crate) batch_routing: bool,
    /// FNV-1a of the config and the router's weights: ranks holding different layers differ.
    pub(crate) fingerprint: u64,
    pub(crate) stages: Box<dyn RankStages>,
}

impl std::fmt::Debug for EpLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EpLayer(rank {} of {}, experts {:?} of {}, {} activations)",
            self.rank,
            self.experts.world(),
            self.experts.range(self.rank),
            self.num_experts,
            self.dtype
        )
    }
}

impl EpLayer {
    /// Rank `rank` of `experts.world()` ranks: keeps the router, the shared expert and the
    /// routed experts `experts.range(rank)` of `layer` (which may be none) on `dev`, for
    /// activations (`x`, the rows exchanged, `y`) in `act_dtype`. `experts` must split the
    /// layer's E experts. CPU and wgpu backends run ranks today; a CUDA backend is an
    /// [`Error::BackendUnavailable`] (its ranks wait for a multi-GPU machine to be verified).
    pub fn new(
        layer: &MoeLayer,
        dev: &Backend,
        rank: usize,
        experts: &Split,
        act_dtype: DType,
    ) -> Result<EpLayer> {
        let d = layer.dims();
        if experts.total() != d.experts {
            return Err(Error::Ep {
                rank,
                what: format!(
                    "the expert split covers {} experts, the layer has E = {}",
                    experts.total(),
                    d.experts
                ),
            });
        }
        if rank >= experts.world() {
            return Err(Error::Ep {
                rank,
                what: format!("rank {rank} of a world of {} ranks", experts.world()),
            });
        }
        let w = rank_weights(layer, experts.range(rank))?;
        let stages: Box<dyn RankStages> = match &dev.device {
            Device::Cpu => Box::new(crate::cpu::ep::CpuRank::new(w, act_dtype)),
            #[cfg(all(feature = "wgpu", not(target_arch = "wasm32")))]
            Device::Wgpu(wd) => {
                Box::new(crate::wgpu::ep::WgpuRank::new(wd.clone(), &w, act_dtype)?)
            }
            #[cfg(all(feature = "wgpu", target_arch = "wasm32"))]
            Device::Wgpu(_) => {
                return Err(Error::BackendUnavailable {
                    backend: crate::device::BackendKind::Wgpu,
                    reason: "expert-parallel ranks run on threads, which a browser's WebGPU \
                             handles cannot cross"
                        .into(),
                })
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                return Err(Error::BackendUnavailable {
                    backend: crate::device::BackendKind::Cuda,
                    reason: "expert-parallel ranks run on the CPU and wgpu backends; CUDA ranks \
                             (NCCL on device buffers) await a multi-GPU machine"
                        .into(),
                })
            }
        };
        let r = &layer.config.routing;
        let router = layer.router_weight.to_f32_vec();
        let fingerprint = fnv(layer
            .config
            .to_json()
            .into_bytes()
            .into_iter()
            .chain(router.iter().flat_map(|v| v.to_bits().to_le_bytes())));
        Ok(EpLayer {
            rank,
            experts: experts.clone(),
            hidden: d.hidden,
            num_experts: d.experts,
            slots: r.slots(d.experts),
            dtype: act_dtype,
            batch_routing: r.capacity.is_some() || r.expert_choice.is_some(),
            fingerprint,
            stages,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The routed experts this rank holds.
    pub fn local_experts(&self) -> Range<usize> {
        self.experts.range(self.rank)
    }

    /// The expert split of the world.
    pub fn expert_split(&self) -> &Split {
        &self.experts
    }

    /// The activation dtype.
    pub fn act_dtype(&self) -> DType {
        self.dtype
    }

    /// The forward of this rank's tokens `x` `[T_r, H]` (in the activation dtype; `T_r` may
    /// be 0): every rank of `comm`'s world calls it at once, each with its own tokens, which
    /// are the rows `Σ_{q<r} T_q ..` of the global batch. Returns this rank's part of the
    /// output. Ranks that disagree on the layer, H, E, the dtype or the expert split fail
    /// together with an [`Error::Ep`].
    pub fn forward<C>(&mut self, comm: &C, x: &Tensor) -> Result<EpOutput>
    where
        C: Communicator<Buffer<u32> = [u32]>,
    {
        crate::ep::forward::forward(self, comm, x)
    }
}

/// What one rank's forward returns: its tokens' rows of the layer's outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct EpOutput {
    /// Global index of this rank's first token.
    pub first_token: usize,
    /// This rank's tokens T_r.
    pub tokens: usize,
    /// Model width H.
    pub hidden: usize,
    /// Assignments per token.
    pub slots: usize,
    /// The activation dtype (`y` holds values of it).
    pub dtype: DType,
    /// `[T_r, H]`.
    pub y: Vec<f32>,
    /// `[T_r, slots]`.
    pub topk_ids: Vec<u32>,
    /// `[T_r, slots]`, the weights applied (0 where dropped).
    pub topk_weights: Vec<f32>,
    /// `[T_r, slots]`, 1 where kept.
    pub kept: Vec<u32>,
    /// `[E]`: kept assignments of this rank's tokens per expert (the world's counts are
    /// their sum).
    pub counts: Vec<u32>,
    /// Where the time went, and what crossed ranks.
    pub stats: EpStats,
}

/// One rank's forward in numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EpStats {
    /// The backend's stages (router, gate, permute, experts, shared expert, combine), with
    /// their host staging.
    pub compute: Duration,
    /// The dispatch layout: counts per rank and expert, the regrouping of received rows.
    pub layout: Duration,
    /// Inside the communicator: the exchanges and the waits for slower ranks.
    pub exchange: Duration,
    /// Rows this rank dispatched (one per kept assignment of its tokens, any rank, itself
    /// included).
    pub rows_sent: usize,
    /// Rows this rank's experts received.
    pub rows_received: usize,
    /// Bytes this rank sent to other ranks (dispatch and return rows, counts, headers,
    /// logits), in the backend's row layout.
    pub bytes_to_peers: u64,
}
