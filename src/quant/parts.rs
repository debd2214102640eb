//! A weight matrix from the tensors of a weights file under the names of DESIGN.md section 4
//! (`P`, `P_scale_inv`, `P_blocks`, `P_scales`, `P_packed`, `P_zeros`), validated with errors
//! naming the file and the tensor; and the same tensors back from a matrix (for writing files).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::io::FileTensor;
use crate::quant::{QuantFormat, QuantMatrix, Scales, Weight, FP8_BLOCK, MX_BLOCK};
use crate::tensor::{DType, Tensor};

/// Every suffix a quantized matrix's tensors may carry.
pub const SUFFIXES: [&str; 5] = ["_scale_inv", "_blocks", "_scales", "_packed", "_zeros"];

fn err(origin: &str, what: impl Into<String>) -> Error {
    Error::Weights {
        path: origin.to_string(),
        what: what.into(),
    }
}

/// Where a matrix comes from: its base name, the file, and whether it has the E axis.
struct Ctx<'a> {
    name: &'a str,
    origin: &'a str,
    expert_axis: bool,
}

impl Ctx<'_> {
    fn err(&self, what: impl Into<String>) -> Error {
        err(self.origin, what)
    }

    /// `shape` split into `(E, rest)`, with E = 1 for a shared expert's tensors.
    fn split<'s>(
        &self,
        tensor: &str,
        shape: &'s [usize],
        rank: usize,
    ) -> Result<(usize, &'s [usize])> {
        let rank = rank - usize::from(!self.expert_axis);
        if shape.len() != rank {
            return Err(self.err(format!(
                "{tensor:?} must be rank {rank}, got shape {shape:?}"
            )));
        }
        Ok(if self.expert_axis {
            (shape[0], &shape[1..])
        } else {
            (1, shape)
        })
    }

    /// `t` with the E axis (of 1) added for a shared expert, as the matrix holds its scales.
    fn with_axis(&self, t: Tensor) -> Result<Tensor> {
        if self.expert_axis {
            return Ok(t);
        }
        let mut shape = vec![1];
        shape.extend_from_slice(t.shape());
        Tensor::new(shape, t.data().clone())
    }

    /// `q` as a weight once [`QuantMatrix::validate`] accepts it; an error naming `tensor`.
    fn checked(&self, tensor: &str, q: QuantMatrix) -> Result<Weight> {
        q.validate()
            .map_err(|m| self.err(format!("{tensor:?}: {m}")))?;
        Ok(Weight::Quant(q))
    }

    /// An error unless `tensor`'s shape is `want` (without the E axis for a shared expert).
    fn expect(&self, tensor: &str, have: &[usize], e: usize, want: &[usize]) -> Result<()> {
        let mut full = if self.expert_axis { vec![e] } else { vec![] };
        full.extend_from_slice(want);
        if have == full.as_slice() {
            Ok(())
        } else {
            Err(self.err(format!(
                "{tensor:?} must have shape {full:?} for {:?}, got {have:?}",
                self.name
            )))
        }
    }
}

/// Takes the tensors of matrix `name` (e.g. `experts.up_proj`) out of `t`: `None` when the
/// file has none of them. `k` is the reduction dimension the layer expects (H for gate / up,
/// F for down): it is checked against the file, and fixes an INT4 matrix's odd K.
/// `expert_axis` is false for the shared expert (`[N, K]` tensors).
pub fn take_matrix(
    t: &mut BTreeMap<String, FileTensor>,
    name: &str,
    k: usize,
    expert_axis: bool,
    origin: &str,
) -> Result<Option<Weight>> {
    let cx = Ctx {
        name,
        origin,
        expert_axis,
    };
    let key = |suffix: &str| format!("{name}{suffix}");
    let mut take = |suffix: &str| t.remove(&key(suffix)).map(|v| (key(suffix), v));
    let base = take("");
    let scale_inv = take("_scale_inv");
    let blocks = take("_blocks");
    let scales = take("_scales");
    let packed = take("_packed");
    let zeros = take("_zeros");
    let fp8 = matches!(base, Some((_, FileTensor::F8E4M3(..))));
    let carriers: Vec<&str> = [
        base.as_ref().map(|(n, _)| n.as_str()),
        blocks.as_ref().map(|(n, _)| n.as_str()),
        packed.as_ref().map(|(n, _)| n.as_str()),
    ]
    .into_iter()
    .flatten()
    .collect();
    if carriers.len() > 1 {
        return Err(cx.err(format!(
            "{} all hold {name:?}: a matrix is stored in one format",
            carriers.join(" and ")
        )));
    }
    for (tensor, owner) in [
        (&scale_inv, fp8),
        (&zeros, packed.is_some()),
        (&scales, blocks.is_some() || packed.is_some()),
    ] {
        if let (Some((n, _)), false) = (tensor, owner) {
            let what = match n.rsplit('_').next() {
                Some("inv") => format!("F8_E4M3 {name:?}"),
                Some("zeros") => format!("{name}_packed"),
                _ if fp8 => format!(
                    "{name}_blocks or {name}_packed (an F8_E4M3 matrix's scales are \
                     {name}_scale_inv)"
                ),
                _ => format!("{name}_blocks or {name}_packed"),
            };
            return Err(cx.err(format!("{n:?} has no matrix: the file has no {what}")));
        }
    }
    match (base, blocks, packed) {
        (None, None, None) => Ok(None),
        (Some((_, FileTensor::Float(d))), None, None) => Ok(Some(Weight::Dense(d))),
        (Some((n, FileTensor::U8(..))), None, None) => Err(cx.err(format!(
            "{n:?} is U8: a dense matrix is F32, F16 or BF16, an fp8 one F8_E4M3"
        ))),
        (Some((n, FileTensor::F8E4M3(shape, codes))), None, None) => {
            let Some((sn, s)) = scale_inv else {
                return Err(cx.err(format!(
                    "{n:?} is F8_E4M3 but the file has no {name}_scale_inv"
                )));
            };
            fp8_matrix(&cx, &n, &shape, codes, k, &sn, s).map(Some)
        }
        (None, Some((n, blocks)), None) => {
            let Some((sn, s)) = scales else {
                return Err(cx.err(format!("{n:?} has no {name}_scales")));
            };
            mxfp4_matrix(&cx, &n, blocks, k, &sn, s).map(Some)
        }
        (None, None, Some((n, packed))) => {
            let Some((sn, s)) = scales else {
                return Err(cx.err(format!("{n:?} has no {name}_scales")));
            };
            int4_matrix(&cx, &n, packed, k, &sn, s, zeros).map(Some)
        }
        _ => Err(cx.err(format!("{name:?}: more than one format"))),
    }
}

fn fp8_matrix(
    cx: &Ctx<'_>,
    n: &str,
    shape: &[usize],
    codes: Vec<u8>,
    k: usize,
    sn: &str,
    s: FileTensor,
) -> Result<Weight> {
    let (e, rest) = cx.split(n, shape, 3)?;
    let (rows, cols) = (rest[0], rest[1]);
    if cols != k {
        return Err(cx.err(format!("{n:?} has K = {cols} columns, the layer needs {k}")));
    }
    let FileTensor::Float(st) = s else {
        return Err(cx.err(format!(
            "{sn:?} is {}: fp8 block scales are F32 or BF16",
            s.dtype_name()
        )));
    };
    if st.dtype() == DType::F16 {
        return Err(cx.err(format!("{sn:?} is F16: fp8 block scales are F32 or BF16")));
    }
    cx.expect(
        sn,
        st.shape(),
        e,
        &[rows.div_ceil(FP8_BLOCK), cols.div_ceil(FP8_BLOCK)],
    )?;
    cx.checked(
        n,
        QuantMatrix {
            format: QuantFormat::Fp8Block,
            experts: e,
            rows,
            cols,
            codes,
            scales: Scales::Float(cx.with_axis(st)?),
            zeros: None,
        },
    )
}

fn mxfp4_matrix(
    cx: &Ctx<'_>,
    n: &str,
    blocks: FileTensor,
    k: usize,
    sn: &str,
    s: FileTensor,
) -> Result<Weight> {
    let FileTensor::U8(shape, codes) = blocks else {
        return Err(cx.err(format!(
            "{n:?} is {}: mxfp4 blocks are U8",
            blocks.dtype_name()
        )));
    };
    if k % MX_BLOCK != 0 {
        return Err(cx.err(format!(
            "{n:?}: mxfp4 needs K to be a multiple of {MX_BLOCK}, the layer has K = {k}"
        )));
    }
    let (e, rest) = cx.split(n, &shape, 4)?;
    let rows = rest[0];
    cx.expect(n, &shape, e, &[rows, k / MX_BLOCK, MX_BLOCK / 2])?;
    let FileTensor::U8(ss, sv) = s else {
        return Err(cx.err(format!(
            "{sn:?} is {}: mxfp4 scales are U8 (e8m0)",
            s.dtype_name()
        )));
    };
    cx.expect(sn, &ss, e, &[rows, k / MX_BLOCK])?;
    cx.checked(
        n,
        QuantMatrix {
            format: QuantFormat::Mxfp4,
            experts: e,
            rows,
            cols: k,
            codes,
            scales: Scales::E8m0(sv),
            zeros: None,
        },
    )
}

fn int4_matrix(
    cx: &Ctx<'_>,
    n: &str,
    packed: FileTensor,
    k: usize,
    sn: &str,
    s: FileTensor,
    zeros: Option<(String, FileTensor)>,
) -> Result<Weight> {
    let FileTensor::U8(shape, codes) = packed else {
        return Err(cx.err(format!(
            "{n:?} is {}: int4 codes are U8",
            packed.dtype_name()
        )));
    };
    let (e, rest) = cx.split(n, &shape, 3)?;
    let rows = rest[0];
    cx.expect(n, &shape, e, &[rows, k.div_ceil(2)])?;
    let FileTensor::Float(st) = s else {
        return Err(cx.err(format!(
            "{sn:?} is {}: int4 scales are F32, F16 or BF16",
            s.dtype_name()
        )));
    };
    let (_, srest) = cx.split(sn, st.shape(), 3)?;
    let groups = srest[1];
    if groups == 0 || k % groups != 0 {
        return Err(cx.err(format!(
            "{sn:?} has {groups} groups per row: the group size K / {groups} must divide K = {k}"
        )));
    }
    cx.expect(sn, st.shape(), e, &[rows, groups])?;
    let zeros = match zeros {
        None => None,
        Some((zn, FileTensor::U8(zs, zv))) => {
            cx.expect(&zn, &zs, e, &[rows, groups])?;
            Some(zv)
        }
        Some((zn, z)) => {
            return Err(cx.err(format!(
                "{zn:?} is {}: int4 zero points are U8",
                z.dtype_name()
            )))
        }
    };
    cx.checked(
        n,
        QuantMatrix {
            format: QuantFormat::Int4,
            experts: e,
            rows,
            cols: k,
            codes,
            scales: Scales::Float(cx.with_axis(st)?),
            zeros,
        },
    )
}

/// The file tensors of matrix `name` (`expert_axis` false for a shared expert's `[N, K]`).
pub fn file_tensors(name: &str, w: Weight, expert_axis: bool) -> Result<Vec<(String, FileTensor)>> {
    let lead = |mut s: Vec<usize>| {
        if !expert_axis {
            s.remove(0);
        }
        s
    };
    let q = match w {
        Weight::Dense(t) => {
            let t = if expert_axis {
                t
            } else {
                let shape = lead(t.shape().to_vec());
                Tensor::new(shape, t.into_data())?
            };
            return Ok(vec![(name.to_string(), FileTensor::Float(t))]);
        }
        Weight::Quant(q) => q,
    };
    let (e, n, k) = (q.experts, q.rows, q.cols);
    let scale_shape = lead(vec![e, q.scale_rows(), q.scale_cols()]);
    let scales = match q.scales {
        Scales::Float(t) => FileTensor::Float(Tensor::new(scale_shape.clone(), t.into_data())?),
        Scales::E8m0(v) => FileTensor::U8(scale_shape.clone(), v),
    };
    let mut out = Vec::new();
    match q.format {
        QuantFormat::Fp8Block => {
            out.push((
                name.to_string(),
                FileTensor::F8E4M3(lead(vec![e, n, k]), q.codes),
            ));
            out.push((format!("{name}_scale_inv"), scales));
        }
        QuantFormat::Mxfp4 => {
            let shape = lead(vec![e, n, k / MX_BLOCK, MX_BLOCK / 2]);
            out.push((format!("{name}_blocks"), FileTensor::U8(shape, q.codes)));
            out.push((format!("{name}_scales"), scales));
        }
        QuantFormat::Int4 => {
            let shape = lead(vec![e, n, k.div_ceil(2)]);
            out.push((format!("{name}_packed"), FileTensor::U8(shape, q.codes)));
            out.push((format!("{name}_scales"), scales));
            if let Some(z) = q.zeros {
                out.push((format!("{name}_zeros"), FileTensor::U8(scale_shape, z)));
            }
        }
    }
    Ok(out)
}
