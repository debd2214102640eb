//! `moe bench --ep N`: one layer forward as N in-process ranks next to the single-device
//! forward, with each rank's time split into compute (the backend's stages), layout (the
//! dispatch counts and the regrouping of rows) and exchange (inside the communicator,
//! waiting for the slowest rank included), and the rows and bytes that crossed ranks.

use std::time::Duration;

use crate::backend::Backend;
use crate::ep::world::InProcessWorld;
use crate::ep::Split;
use crate::error::Result;
use crate::layer::MoeLayer;
use crate::tensor::Tensor;

/// One measured point.
#[derive(Debug, Clone, PartialEq)]
pub struct EpPoint {
    /// Ranks.
    pub world: usize,
    /// Median single-device forward (prepared once, host tensors in and out).
    pub single: Duration,
    /// Median wall time of the EP forward (every rank, threads started to joined).
    pub wall: Duration,
    /// Of the median EP forward: the slowest rank's compute.
    pub compute: Duration,
    /// Of the median EP forward: the slowest rank's layout work.
    pub layout: Duration,
    /// Of the median EP forward: the longest time a rank spent in the communicator.
    pub exchange: Duration,
    /// Rows dispatched in all (one per kept assignment).
    pub rows: usize,
    /// Bytes sent between different ranks in all (dispatch, return, counts, headers, logits).
    pub bytes: u64,
    /// Whether the EP output (y, ids, weights, kept, counts) was bitwise the single-device one.
    pub bitwise: bool,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Times `iters` forwards of `x` (after `warmup`) on one device and as `world` in-process
/// ranks (experts and tokens split evenly), and compares the outputs bit for bit.
pub fn run_point(
    dev: &Backend,
    layer: &MoeLayer,
    x: &Tensor,
    world: usize,
    warmup: usize,
    iters: usize,
) -> Result<EpPoint> {
    let t = x.shape().first().copied().unwrap_or(0);
    let prepared = layer.prepare(dev, t.max(1), x.dtype())?;
    let mut single = Vec::new();
    let mut one = None;
    for i in 0..warmup + iters.max(1) {
        let out = prepared.forward(x)?;
        if i >= warmup {
            single.push(out.wall_time);
        }
        one = Some(out);
    }
    drop(prepared);
    let mut w = InProcessWorld::even(layer, dev, world, x.dtype())?;
    let tokens = Split::even(t, world)?;
    let mut runs = Vec::new();
    for i in 0..warmup + iters.max(1) {
        let run = w.forward(x, &tokens)?;
        if i >= warmup {
            runs.push(run);
        }
    }
    runs.sort_by_key(|r| r.wall);
    let mid = &runs[runs.len() / 2];
    let max =
        |f: fn(&crate::ep::EpStats) -> Duration| mid.ranks.iter().map(f).max().unwrap_or_default();
    let bitwise = one.is_some_and(|o| {
        let b = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let e = &mid.output;
        b(&o.y) == b(&e.y)
            && o.topk_ids == e.topk_ids
            && b(&o.topk_weights) == b(&e.topk_weights)
            && o.kept == e.kept
            && o.counts == e.counts
    });
    Ok(EpPoint {
        world,
        single: median(single),
        wall: mid.wall,
        compute: max(|s| s.compute),
        layout: max(|s| s.layout),
        exchange: max(|s| s.exchange),
        rows: mid.ranks.iter().map(|s| s.rows_sent).sum(),
        bytes: mid.ranks.iter().map(|s| s.bytes_to_peers).sum(),
        bitwise,
    })
}
