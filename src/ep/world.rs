//! N ranks of one layer as threads of this process, on one backend (the CPU, or one shared
//! wgpu device), exchanging through [`InProcess`]: what the tests, `moe run --ep N` and
//! `moe bench --ep N` run.

use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::ep::in_process::InProcess;
use crate::ep::layer::{EpLayer, EpOutput, EpStats};
use crate::ep::shard::leading;
use crate::ep::split::Split;
use crate::error::{Error, Result};
use crate::layer::{ForwardOutput, MoeLayer};
use crate::tensor::{DType, Tensor};

/// Every rank of an expert-parallel layer, prepared once, run as threads of this process.
#[derive(Debug)]
pub struct InProcessWorld {
    ranks: Vec<EpLayer>,
}

/// One in-process expert-parallel forward: the assembled output and each rank's numbers.
#[derive(Debug, Clone)]
pub struct EpRun {
    /// The whole batch's outputs, assembled from the ranks' parts in token order (counts
    /// summed); comparable field by field with [`MoeLayer::forward`]'s (`stage_times` is
    /// empty: see `ranks`).
    pub output: ForwardOutput,
    /// Each rank's times and traffic.
    pub ranks: Vec<EpStats>,
    /// Wall time from the first rank's start to the last rank's end.
    pub wall: Duration,
}

impl InProcessWorld {
    /// `experts.world()` ranks of `layer` on `dev`, rank r holding experts
    /// `experts.range(r)`, for activations in `act_dtype`.
    pub fn new(layer: &MoeLayer, dev: &Backend, experts: &Split, act_dtype: DType) -> Result<Self> {
        let ranks = (0..experts.world())
            .map(|r| EpLayer::new(layer, dev, r, experts, act_dtype))
            .collect::<Result<Vec<_>>>()?;
        if ranks.is_empty() {
            return Err(Error::Ep {
                rank: 0,
                what: "a world needs at least one rank".into(),
            });
        }
        Ok(InProcessWorld { ranks })
    }

    /// `world` ranks with the layer's experts split evenly over them.
    pub fn even(layer: &MoeLayer, dev: &Backend, world: usize, act_dtype: DType) -> Result<Self> {
        Self::new(
            layer,
            dev,
            &Split::even(layer.dims().experts, world)?,
            act_dtype,
        )
    }

    /// Ranks.
    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    /// The forward of `x` `[T, H]` with rank r home to tokens `tokens.range(r)` (a split of
    /// T over the world; [`Split::even`] for the usual one).
    pub fn forward(&mut self, x: &Tensor, tokens: &Split) -> Result<EpRun> {
        let world = self.world();
        let t = match x.shape() {
            [t, _] => *t,
            s => {
                return Err(Error::Ep {
                    rank: 0,
                    what: format!("x must be [T, H], got shape {s:?}"),
                })
            }
        };
        if tokens.world() != world || tokens.total() != t {
            return Err(Error::Ep {
                rank: 0,
                what: format!(
                    "the token split covers {} tokens over {} ranks; x has {t} tokens and the \
                     world {world} ranks",
                    tokens.total(),
                    tokens.world()
                ),
            });
        }
        let parts = (0..world)
            .map(|r| leading(x, tokens.range(r)))
            .collect::<Result<Vec<_>>>()?;
        let comms = InProcess::world(world)?;
        let start = Instant::now();
        let results: Vec<Result<EpOutput>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .ranks
                .iter_mut()
                .zip(&comms)
                .zip(&parts)
                .map(|((layer, comm), x)| {
                    s.spawn(move || {
                        let out = layer.forward(comm, x);
                        if let Err(e) = &out {
                            comm.abort(&e.to_string());
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(r, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Ep {
                            rank: r,
                            what: "the rank's thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        let wall = start.elapsed();
        // The rank that failed first is the cause; the others report its abort.
        let first = comms[0].aborted().map(|(r, _)| r);
        let mut outs = Vec::with_capacity(world);
        let mut errors: Vec<(usize, Error)> = Vec::new();
        for (r, res) in results.into_iter().enumerate() {
            match res {
                Ok(o) => outs.push(o),
                Err(e) => errors.push((r, e)),
            }
        }
        if !errors.is_empty() {
            let i = errors
                .iter()
                .position(|(r, _)| Some(*r) == first)
                .unwrap_or(0);
            return Err(errors.swap_remove(i).1);
        }
        Ok(assemble(outs, t, wall))
    }
}

/// The ranks' parts in token order, as one [`ForwardOutput`].
fn assemble(parts: Vec<EpOutput>, tokens: usize, wall: Duration) -> EpRun {
    let first = &parts[0];
    let (hidden, slots, dtype) = (first.hidden, first.slots, first.dtype);
    let mut counts = vec![0u32; first.counts.len()];
    let mut out = ForwardOutput {
        tokens,
        hidden,
        slots,
        dtype,
        y: Vec::with_capacity(tokens * hidden),
        topk_ids: Vec::with_capacity(tokens * slots),
        topk_weights: Vec::with_capacity(tokens * slots),
        kept: Vec::with_capacity(tokens * slots),
        counts: Vec::new(),
        stage_times: Vec::new(),
        wall_time: wall,
    };
    let mut ranks = Vec::with_capacity(parts.len());
    for p in parts {
        out.y.extend(p.y);
        out.topk_ids.extend(p.topk_ids);
        out.topk_weights.extend(p.topk_weights);
        out.kept.extend(p.kept);
        for (c, v) in counts.iter_mut().zip(p.counts) {
            *c += v;
        }
        ranks.push(p.stats);
    }
    out.counts = counts;
    EpRun {
        output: out,
        ranks,
        wall,
    }
}

/// The forward of `x` as `world` in-process ranks with experts and tokens split evenly:
/// bitwise [`MoeLayer::forward`]`(dev, x)`.
pub fn forward_in_process(
    layer: &MoeLayer,
    dev: &Backend,
    x: &Tensor,
    world: usize,
) -> Result<EpRun> {
    let t = x.shape().first().copied().unwrap_or(0);
    InProcessWorld::even(layer, dev, world, x.dtype())?.forward(x, &Split::even(t, world)?)
}
