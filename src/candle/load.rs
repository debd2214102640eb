//! Reading one MoE layer through a candle `VarBuilder`: the family, routing and tensor names
//! come from config.json exactly as [`MoeLayer::from_checkpoint`] reads them
//! (`checkpoint::families`); the tensors come from the `VarBuilder`, stacked into the
//! canonical layout of DESIGN.md section 4.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType as CDType, Device, WithDType};
use candle_nn::var_builder::{Backend, VarBuilderArgs};
use half::{bf16, f16};

use super::convert::{act_dtype, elements, to_host};
use crate::checkpoint::dir::CheckpointDir;
use crate::checkpoint::families::{self, ExpertNames, Family};
use crate::checkpoint::{quantization, LayerSpec, Quantization};
use crate::error::Error;
use crate::layer::MoeLayer;
use crate::tensor::{DType, Tensor, TensorData};

/// The families a `VarBuilder` can be read for: decoder-only, one Linear per expert.
const FAMILIES: [Family; 4] = [
    Family::Mixtral,
    Family::Qwen2Moe,
    Family::Qwen3Moe,
    Family::DeepseekV3,
];

/// Reads the MoE block of decoder layer `layer` from `vb`, a `VarBuilder` at that layer
/// (`model.layers.{layer}`), with the routing of `config` (the model's config.json, parsed).
///
/// The block's tensors are read under the family's names below the layer:
/// `block_sparse_moe.{gate, experts.{j}.w1/w3/w2}` (Mixtral), `mlp.{gate, experts.{j}.*_proj,
/// shared_expert.*, shared_expert_gate}` (Qwen2-MoE; Qwen3-MoE without the shared expert),
/// `mlp.{gate, gate.e_score_correction_bias, experts.{j}.*_proj, shared_experts.*}`
/// (DeepSeek-V3). They are read on the CPU whatever `vb`'s device. Expert and shared-expert
/// weights take `vb`'s dtype (F32, F16 or BF16); the router, its biases and Qwen2's shared
/// gate are read in f32, which holds every F32, F16 and BF16 value exactly, so routing
/// decisions use the weights as stored.
///
/// Errors: a config.json without a supported `model_type` (gpt-oss, Switch and NLLB-MoE
/// store their experts otherwise: read them with [`MoeLayer::from_checkpoint`]), a quantized
/// checkpoint (same), a dense or missing layer, a missing tensor or a shape that disagrees with
/// config.json.
pub fn read_layer<B: Backend>(
    config: &serde_json::Value,
    layer: usize,
    vb: &VarBuilderArgs<'_, B>,
) -> candle_core::Result<MoeLayer> {
    let serde_json::Value::Object(map) = config else {
        return Err(Error::Checkpoint {
            path: "config.json".into(),
            what: format!("not a JSON object: {config}"),
        }
        .into());
    };
    let ck = CheckpointDir::from_config(PathBuf::new(), map.clone());
    let family = families::family(&ck)?;
    if !FAMILIES.contains(&family) {
        return Err(ck
            .error(format!(
                "MoeBlock reads the {} families through a VarBuilder, not {family}: read it \
                 with MoeLayer::from_checkpoint and build the block with MoeBlock::from_layer",
                FAMILIES.map(Family::model_type).join(", ")
            ))
            .into());
    }
    let quant = quantization(&ck)?;
    if quant != Quantization::None {
        return Err(ck
            .error(format!(
                "a {quant} checkpoint: MoeBlock reads F32, F16 or BF16 weights through a \
                 VarBuilder; read it with MoeLayer::from_checkpoint and build the block with \
                 MoeBlock::from_layer"
            ))
            .into());
    }
    let (layer_config, plan) = families::plan(&ck, family, LayerSpec::Index(layer))?;
    let Some(module) = plan.within_layer(layer) else {
        return Err(ck
            .error(format!(
                "{family} layers are not named model.layers.{layer}"
            ))
            .into());
    };
    let ExpertNames::PerExpert {
        stem,
        gate,
        up,
        down,
        biases,
    } = plan.experts
    else {
        return Err(ck
            .error(format!("{family} does not store one Linear per expert"))
            .into());
    };
    let vb = vb
        .clone()
        .set_device(Device::Cpu)
        .pp(module.trim_end_matches('.'));
    let origin = format!("VarBuilder {} ({family} layer {layer})", vb.prefix());
    let wdtype = act_dtype(
        vb.dtype(),
        "the VarBuilder's dtype (the expert weights' dtype)",
    )?;
    let r = Reader { vb: &vb, wdtype };
    let (e, h, f) = (plan.num_experts, plan.hidden, plan.ffn);

    let mut t: BTreeMap<String, Tensor> = BTreeMap::new();
    let router = format!("{}.weight", plan.router);
    t.insert(
        "router.weight".into(),
        r.one(&router, &[e, h], CDType::F32)?,
    );
    let router_bias = format!("{}.bias", plan.router);
    if vb.contains_tensor(&router_bias) {
        t.insert(
            "router.bias".into(),
            r.one(&router_bias, &[e], CDType::F32)?,
        );
    }
    if let Some(b) = plan.score_bias {
        t.insert(
            "router.score_correction_bias".into(),
            r.one(b, &[e], CDType::F32)?,
        );
    }
    let projs = [
        ("gate_proj", gate, f, h),
        ("up_proj", Some(up), f, h),
        ("down_proj", Some(down), h, f),
    ];
    for (canonical, local, n, k) in projs {
        let Some(local) = local else { continue };
        let base = |j: usize| format!("{stem}{j}.{local}");
        if vb.contains_tensor(&format!("{}.weight_scale_inv", base(0))) {
            return Err(Error::Weights {
                path: origin,
                what: format!(
                    "{}.weight has a weight_scale_inv (FP8 block): read the layer with \
                     MoeLayer::from_checkpoint",
                    base(0)
                ),
            }
            .into());
        }
        let names: Vec<String> = (0..e).map(|j| format!("{}.weight", base(j))).collect();
        t.insert(format!("experts.{canonical}"), r.stacked(&names, &[n, k])?);
        if biases {
            let names: Vec<String> = (0..e).map(|j| format!("{}.bias", base(j))).collect();
            t.insert(
                format!("experts.{canonical}_bias"),
                r.stacked(&names, &[n])?,
            );
        }
    }
    if let Some((shared, shared_gate)) = plan.shared {
        let fs = plan.shared_ffn.unwrap_or(f);
        let gated = layer_config.activation.is_gated();
        for (canonical, shape) in [
            ("gate_proj", [fs, h]),
            ("up_proj", [fs, h]),
            ("down_proj", [h, fs]),
        ] {
            if canonical == "gate_proj" && !gated {
                continue;
            }
            let name = format!("{shared}{canonical}.weight");
            t.insert(
                format!("shared.{canonical}"),
                r.one(&name, &shape, vb.dtype())?,
            );
        }
        if let Some(g) = shared_gate {
            let name = format!("{g}.weight");
            t.insert(
                "shared.gate.weight".into(),
                r.one(&name, &[1, h], CDType::F32)?,
            );
        }
    }
    Ok(MoeLayer::from_tensors(layer_config, t, &origin)?)
}

/// Reads tensors of one block's `VarBuilder` into host tensors.
struct Reader<'v, 'a, B: Backend> {
    vb: &'v VarBuilderArgs<'a, B>,
    /// The dtype the expert weights are read in (the `VarBuilder`'s).
    wdtype: DType,
}

impl<B: Backend> Reader<'_, '_, B> {
    /// Tensor `name` of `shape` (checked) in `dtype`.
    fn one(&self, name: &str, shape: &[usize], dtype: CDType) -> candle_core::Result<Tensor> {
        let t = self
            .vb
            .get_with_hints_dtype(shape.to_vec(), name, Default::default(), dtype)?;
        to_host(&t, shape.to_vec(), name)
    }

    /// The tensors `names`, each of shape `each` (checked), stacked on a new leading axis in
    /// the expert weights' dtype, read one at a time into the stacked buffer.
    fn stacked(&self, names: &[String], each: &[usize]) -> candle_core::Result<Tensor> {
        let mut shape = vec![names.len()];
        shape.extend_from_slice(each);
        let data = match self.wdtype {
            DType::F32 => TensorData::F32(self.collect::<f32>(names, each)?),
            DType::F16 => TensorData::F16(self.collect::<f16>(names, each)?),
            DType::BF16 => TensorData::BF16(self.collect::<bf16>(names, each)?),
        };
        Ok(Tensor::new(shape, data)?)
    }

    fn collect<T: WithDType>(
        &self,
        names: &[String],
        each: &[usize],
    ) -> candle_core::Result<Vec<T>> {
        let len: usize = each.iter().product();
        let mut out = Vec::with_capacity(names.len().saturating_mul(len));
        for name in names {
            let t =
                self.vb
                    .get_with_hints_dtype(each.to_vec(), name, Default::default(), T::DTYPE)?;
            out.extend(elements::<T>(&t)?);
        }
        Ok(out)
    }
}
