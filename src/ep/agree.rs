//! Step 1 of the expert-parallel forward: every rank sends every rank a header (its rank,
//! the world, H, E, slots, the activation dtype, the expert split, a fingerprint of config and
//! router weights, its token count, whether its `x` is valid) and checks them all, so that
//! ranks that disagree fail together, each with an [`Error::Ep`] naming what differs, before
//! any other exchange. The token counts give every rank the global token split.

use crate::ep::comm::Communicator;
use crate::ep::exchange::Exchange;
use crate::ep::layer::EpLayer;
use crate::ep::split::Split;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

const MAGIC: u32 = 0x5045_6f4d;
/// Header words: magic, rank, world, H, E, slots, dtype, x valid, T_r, split (2), layer (2).
const HEADER: usize = 13;
const FIELDS: [&str; HEADER] = [
    "protocol",
    "rank",
    "world size",
    "hidden size H",
    "expert count E",
    "slots per token",
    "activation dtype",
    "input",
    "tokens",
    "expert split",
    "expert split",
    "layer (config and router weights)",
    "layer (config and router weights)",
];

fn dtype_code(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

fn lo_hi(v: u64) -> [u32; 2] {
    [v as u32, (v >> 32) as u32]
}

/// Checks this rank's `x` against the layer: `[T_r, H]` in the activation dtype.
fn check_x(l: &EpLayer, x: &Tensor) -> Result<usize> {
    match x.shape() {
        [t, h] if *h == l.hidden => {
            if x.dtype() != l.dtype {
                return Err(Error::DtypeMismatch {
                    what: format!("x of expert-parallel rank {}", l.rank),
                    expected: l.dtype,
                    got: x.dtype(),
                });
            }
            Ok(*t)
        }
        s => Err(Error::Ep {
            rank: l.rank,
            what: format!("x must be [T, H] with H = {}, got shape {s:?}", l.hidden),
        }),
    }
}

/// Step 1: the headers of every rank, checked; returns the token split.
pub(crate) fn agree<C>(l: &EpLayer, ex: &mut Exchange<'_, C>, x: &Tensor) -> Result<Split>
where
    C: Communicator<Buffer<u32> = [u32]> + ?Sized,
{
    let (me, world) = (ex.me, ex.world);
    let local = check_x(l, x);
    let t = *local.as_ref().unwrap_or(&0);
    let mut h = vec![
        MAGIC,
        l.rank as u32,
        l.experts.world() as u32,
        l.hidden as u32,
        l.num_experts as u32,
        l.slots as u32,
        dtype_code(l.dtype),
        u32::from(local.is_ok()),
        u32::try_from(t).unwrap_or(u32::MAX),
    ];
    h.extend(lo_hi(l.experts.fingerprint()));
    h.extend(lo_hi(l.fingerprint));
    let all = ex.all_gather(&h, &vec![HEADER; world])?;
    let hdr = |p: usize| &all[p * HEADER..(p + 1) * HEADER];
    // This rank's own problem first, in full.
    local?;
    let ep = |what: String| Error::Ep { rank: me, what };
    if let Some(p) = (0..world).find(|&p| hdr(p)[7] != 1) {
        return Err(ep(format!("rank {p}'s input x is invalid (see its error)")));
    }
    if l.rank != me {
        return Err(ep(format!(
            "this layer was built for rank {} but runs as rank {me}",
            l.rank
        )));
    }
    for p in 0..world {
        if hdr(p)[1] as usize != p {
            return Err(ep(format!(
                "rank {p} runs a layer built for rank {}",
                hdr(p)[1]
            )));
        }
    }
    for (i, field) in FIELDS.iter().enumerate() {
        if matches!(i, 1 | 7 | 8) {
            continue;
        }
        if let Some(p) = (0..world).find(|&p| hdr(p)[i] != hdr(0)[i]) {
            return Err(ep(format!(
                "ranks disagree on the {field}: rank 0 has {}, rank {p} has {}",
                hdr(0)[i],
                hdr(p)[i]
            )));
        }
    }
    if l.experts.world() != world {
        return Err(ep(format!(
            "the expert split is over {} ranks, the world has {world}",
            l.experts.world()
        )));
    }
    Ok(Split::from_counts(
        &(0..world).map(|p| hdr(p)[8] as usize).collect::<Vec<_>>(),
    ))
}
