//! The model families a checkpoint may hold: which layers are MoE, where their tensors are
//! named, and the routing their transformers module computes, read off config.json with the
//! defaults of transformers' config classes where a key is absent.

use std::fmt;

use super::dir::CheckpointDir;
use super::LayerSpec;
use crate::config::{Activation, Capacity, ClampedSwiglu, Groups, LayerConfig, Preset, Priority};
use crate::error::Result;

/// A model family, by config.json's `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `mixtral`.
    Mixtral,
    /// `qwen2_moe`.
    Qwen2Moe,
    /// `qwen3_moe`.
    Qwen3Moe,
    /// `deepseek_v3`.
    DeepseekV3,
    /// `gpt_oss`.
    GptOss,
    /// `switch_transformers` (encoder-decoder).
    Switch,
    /// `nllb-moe` (encoder-decoder).
    NllbMoe,
}

impl Family {
    /// Every family.
    pub const ALL: [Family; 7] = [
        Family::Mixtral,
        Family::Qwen2Moe,
        Family::Qwen3Moe,
        Family::DeepseekV3,
        Family::GptOss,
        Family::Switch,
        Family::NllbMoe,
    ];

    /// config.json's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
            Family::DeepseekV3 => "deepseek_v3",
            Family::GptOss => "gpt_oss",
            Family::Switch => "switch_transformers",
            Family::NllbMoe => "nllb-moe",
        }
    }

    fn encoder_decoder(self) -> bool {
        matches!(self, Family::Switch | Family::NllbMoe)
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.model_type())
    }
}

/// How the experts of a layer are stored.
#[derive(Debug, Clone, PartialEq)]
pub enum ExpertNames {
    /// One Linear per expert and projection: `{stem}{j}.{proj}`.
    PerExpert {
        /// e.g. `experts.` or `experts.expert_`.
        stem: &'static str,
        /// The gate projection (None for non-gated experts).
        gate: Option<&'static str>,
        /// The up projection.
        up: &'static str,
        /// The down projection.
        down: &'static str,
        /// Each Linear has a `.bias`.
        biases: bool,
    },
    /// gpt-oss: `experts.gate_up_proj` and `experts.down_proj` hold every expert.
    GptOss,
}

/// Where one MoE layer's tensors are named (relative to `prefix`).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// e.g. `model.layers.3.block_sparse_moe.`.
    pub prefix: String,
    /// The router Linear (`.weight`, optional `.bias`).
    pub router: &'static str,
    /// DeepSeek's selection bias.
    pub score_bias: Option<&'static str>,
    /// The routed experts.
    pub experts: ExpertNames,
    /// Shared expert stem (`shared_expert.`) and its sigmoid gate Linear, if the family has one.
    pub shared: Option<(&'static str, Option<&'static str>)>,
    /// Number of routed experts per config.json.
    pub num_experts: usize,
    /// Hidden size per config.json.
    pub hidden: usize,
    /// Expert width per config.json.
    pub ffn: usize,
    /// Shared expert width per config.json (when the family has one).
    pub shared_ffn: Option<usize>,
}

impl Plan {
    /// The prefix below decoder layer `i` (`model.layers.{i}.`), e.g. `block_sparse_moe.`:
    /// where a candle `VarBuilder` at the layer finds the MoE block. `None` for families whose
    /// layers are not named `model.layers.{i}` (the encoder-decoder ones).
    #[cfg(feature = "candle")]
    pub(crate) fn within_layer(&self, i: usize) -> Option<&str> {
        self.prefix.strip_prefix(&format!("model.layers.{i}."))
    }
}

/// config.json accessors with typed errors naming the key.
struct Keys<'a>(&'a CheckpointDir);

/// Keys transformers' config classes map onto each other (`attribute_map`): a config.json
/// written by either spelling means the same.
const ALIASES: [(&str, &str); 7] = [
    ("num_experts", "num_local_experts"),
    ("num_local_experts", "num_experts"),
    ("n_routed_experts", "num_local_experts"),
    ("d_model", "hidden_size"),
    ("hidden_size", "d_model"),
    ("num_layers", "num_hidden_layers"),
    ("encoder_layers", "num_hidden_layers"),
];

impl Keys<'_> {
    fn value(&self, key: &str) -> Option<&serde_json::Value> {
        let get = |k: &str| self.0.config.get(k).filter(|v| !v.is_null());
        get(key).or_else(|| {
            ALIASES
                .iter()
                .filter(|(k, _)| *k == key)
                .find_map(|(_, alias)| get(alias))
        })
    }

    fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.value(key) {
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                self.0.error(format!(
                    "key {key:?} must be a non-negative integer, got {v}"
                ))
            }),
            None => default.ok_or_else(|| self.0.error(format!("missing key {key:?}"))),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.value(key) {
            Some(v) => v.as_f64().ok_or_else(|| {
                self.0
                    .error(format!("key {key:?} must be a number, got {v}"))
            }),
            None => Ok(default),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.value(key) {
            Some(v) => v.as_bool().ok_or_else(|| {
                self.0
                    .error(format!("key {key:?} must be true or false, got {v}"))
            }),
            None => Ok(default),
        }
    }

    fn str_or<'b>(&'b self, key: &str, default: &'b str) -> Result<&'b str> {
        match self.value(key) {
            Some(v) => v.as_str().ok_or_else(|| {
                self.0
                    .error(format!("key {key:?} must be a string, got {v}"))
            }),
            None => Ok(default),
        }
    }

    fn list_or_empty(&self, key: &str) -> Result<Vec<usize>> {
        match self.value(key) {
            None => Ok(Vec::new()),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64().map(|n| n as usize).ok_or_else(|| {
                        self.0
                            .error(format!("key {key:?} must list layer indices, got {v}"))
                    })
                })
                .collect(),
            Some(v) => Err(self.0.error(format!("key {key:?} must be a list, got {v}"))),
        }
    }
}

/// The family of a checkpoint, from `model_type`.
pub fn family(dir: &CheckpointDir) -> Result<Family> {
    let supported = || {
        Family::ALL
            .iter()
            .map(|f| f.model_type())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mt = match dir.config.get("model_type").and_then(|v| v.as_str()) {
        Some(mt) => mt,
        None => {
            return Err(dir.error(format!(
                "no \"model_type\" key (supported model types: {})",
                supported()
            )))
        }
    };
    Family::ALL
        .into_iter()
        .find(|f| f.model_type() == mt)
        .ok_or_else(|| {
            dir.error(format!(
                "unknown model_type {mt:?} (supported model types: {})",
                supported()
            ))
        })
}

/// The activation of a gated family's `hidden_act`.
fn gated_act(dir: &CheckpointDir, key: &str) -> Result<Activation> {
    match Keys(dir).str_or(key, "silu")? {
        "silu" | "swish" => Ok(Activation::Swiglu),
        "gelu" => Ok(Activation::Geglu),
        other => Err(dir.error(format!("{key} {other:?} is not supported (silu or gelu)"))),
    }
}

fn plain_act(dir: &CheckpointDir, key: &str) -> Result<Activation> {
    match Keys(dir).str_or(key, "relu")? {
        "relu" => Ok(Activation::Relu),
        "gelu" => Ok(Activation::Gelu),
        other => Err(dir.error(format!("{key} {other:?} is not supported (relu or gelu)"))),
    }
}

/// The layers of a stack, each MoE or dense, as the family's transformers code decides.
fn moe_layers(dir: &CheckpointDir, family: Family, encoder: bool) -> Result<Vec<bool>> {
    let k = Keys(dir);
    Ok(match family {
        Family::Mixtral | Family::GptOss => vec![true; k.usize_or("num_hidden_layers", None)?],
        Family::Qwen2Moe | Family::Qwen3Moe => {
            let n = k.usize_or("num_hidden_layers", None)?;
            let only = k.list_or_empty("mlp_only_layers")?;
            let step = k.usize_or("decoder_sparse_step", Some(1))?;
            let experts = k.usize_or("num_experts", None)?;
            (0..n)
                .map(|i| !only.contains(&i) && experts > 0 && step > 0 && (i + 1) % step == 0)
                .collect()
        }
        Family::DeepseekV3 => {
            let n = k.usize_or("num_hidden_layers", None)?;
            let first = k.usize_or("first_k_dense_replace", Some(3))?;
            (0..n).map(|i| i >= first).collect()
        }
        Family::Switch => {
            // transformers derives the step from num_sparse_*_layers, whatever the file says.
            let layers = k.usize_or("num_layers", Some(12))?;
            let (n, sparse) = if encoder {
                (layers, k.usize_or("num_sparse_encoder_layers", Some(3))?)
            } else {
                (
                    k.usize_or("num_decoder_layers", Some(layers))?,
                    k.usize_or("num_sparse_decoder_layers", Some(3))?,
                )
            };
            let step = n.checked_div(sparse).unwrap_or(n);
            (0..n)
                .map(|i| step > 0 && (i % step == 1 || step == 1))
                .collect()
        }
        Family::NllbMoe => {
            let (n, step) = if encoder {
                (
                    k.usize_or("encoder_layers", Some(12))?,
                    k.usize_or("encoder_sparse_step", Some(4))?,
                )
            } else {
                (
                    k.usize_or("decoder_layers", Some(12))?,
                    k.usize_or("decoder_sparse_step", Some(4))?,
                )
            };
            (0..n).map(|i| step > 0 && (i + 1) % step == 0).collect()
        }
    })
}

/// Checks that `layer` exists and is MoE; returns its index.
fn check_layer(dir: &CheckpointDir, family: Family, layer: LayerSpec) -> Result<usize> {
    let (encoder, i) = match (family.encoder_decoder(), layer) {
        (true, LayerSpec::Encoder(i)) => (true, i),
        (true, LayerSpec::Decoder(i)) => (false, i),
        (true, LayerSpec::Index(i)) => {
            return Err(dir.error(format!(
                "{family} is an encoder-decoder model: name the layer encoder.{i} or decoder.{i}"
            )))
        }
        (false, LayerSpec::Encoder(_)) => {
            return Err(dir.error(format!(
                "{family} has no encoder: name the layer by its decoder index alone"
            )))
        }
        (false, LayerSpec::Decoder(i) | LayerSpec::Index(i)) => (false, i),
    };
    let moe = moe_layers(dir, family, encoder)?;
    let stack = if !family.encoder_decoder() {
        "decoder layers"
    } else if encoder {
        "encoder layers"
    } else {
        "decoder layers"
    };
    let listing = || {
        let sparse: Vec<String> = moe
            .iter()
            .enumerate()
            .filter(|(_, m)| **m)
            .map(|(i, _)| layer.with_index(i).to_string())
            .collect();
        if sparse.is_empty() {
            "none".to_string()
        } else {
            sparse.join(", ")
        }
    };
    match moe.get(i) {
        None => Err(dir.error(format!(
            "layer {layer} is out of range: the model has {} {stack} (MoE layers: {})",
            moe.len(),
            listing()
        ))),
        Some(false) => Err(dir.error(format!(
            "layer {layer} is dense (its feed-forward is not a mixture of experts); MoE layers: {}",
            listing()
        ))),
        Some(true) => Ok(i),
    }
}

/// Where layer `layer` is named and the routing it computes.
pub fn plan(dir: &CheckpointDir, family: Family, layer: LayerSpec) -> Result<(LayerConfig, Plan)> {
    let i = check_layer(dir, family, layer)?;
    let k = Keys(dir);
    let per_expert = |gate, up, down| ExpertNames::PerExpert {
        stem: "experts.",
        gate: Some(gate),
        up,
        down,
        biases: false,
    };
    let preset = |p: Preset| p.config();
    let (config, plan) = match family {
        Family::Mixtral => {
            let mut c = preset(Preset::Mixtral);
            c.routing.top_k = k.usize_or("num_experts_per_tok", Some(2))?;
            c.activation = gated_act(dir, "hidden_act")?;
            (
                c,
                Plan {
                    prefix: format!("model.layers.{i}.block_sparse_moe."),
                    router: "gate",
                    score_bias: None,
                    experts: per_expert("w1", "w3", "w2"),
                    shared: None,
                    num_experts: k.usize_or("num_local_experts", Some(8))?,
                    hidden: k.usize_or("hidden_size", None)?,
                    ffn: k.usize_or("intermediate_size", None)?,
                    shared_ffn: None,
                },
            )
        }
        Family::Qwen2Moe | Family::Qwen3Moe => {
            let qwen2 = family == Family::Qwen2Moe;
            let mut c = preset(if qwen2 {
                Preset::Qwen2Moe
            } else {
                Preset::Qwen3Moe
            });
            c.routing.top_k = k.usize_or("num_experts_per_tok", Some(if qwen2 { 4 } else { 8 }))?;
            c.routing.renormalize = k.bool_or("norm_topk_prob", false)?;
            c.activation = gated_act(dir, "hidden_act")?;
            (
                c,
                Plan {
                    prefix: format!("model.layers.{i}.mlp."),
                    router: "gate",
                    score_bias: None,
                    experts: per_expert("gate_proj", "up_proj", "down_proj"),
                    shared: qwen2.then_some(("shared_expert.", Some("shared_expert_gate"))),
                    num_experts: k.usize_or("num_experts", None)?,
                    hidden: k.usize_or("hidden_size", None)?,
                    ffn: k.usize_or("moe_intermediate_size", None)?,
                    shared_ffn: if qwen2 {
                        Some(k.usize_or("shared_expert_intermediate_size", None)?)
                    } else {
                        None
                    },
                },
            )
        }
        Family::DeepseekV3 => {
            let mut c = preset(Preset::DeepseekV3);
            let r = &mut c.routing;
            r.top_k = k.usize_or("num_experts_per_tok", Some(8))?;
            r.renormalize = k.bool_or("norm_topk_prob", true)?;
            r.scale = k.f64_or("routed_scaling_factor", 2.5)?;
            let count = k.usize_or("n_group", Some(8))?;
            let keep = k.usize_or("topk_group", Some(4))?;
            // One group keeps every expert: no restriction at all.
            r.groups = (count > 1).then_some(Groups { count, keep });
            if let Some(s) = k.value("scoring_func") {
                if s.as_str() != Some("sigmoid") {
                    return Err(dir.error(format!(
                        "scoring_func {s} is not supported (transformers' DeepseekV3 scores with sigmoid)"
                    )));
                }
            }
            c.activation = gated_act(dir, "hidden_act")?;
            let ffn = k.usize_or("moe_intermediate_size", None)?;
            let shared = k.usize_or("n_shared_experts", Some(1))?;
            (
                c,
                Plan {
                    prefix: format!("model.layers.{i}.mlp."),
                    router: "gate",
                    score_bias: Some("gate.e_score_correction_bias"),
                    experts: per_expert("gate_proj", "up_proj", "down_proj"),
                    shared: (shared > 0).then_some(("shared_experts.", None)),
                    num_experts: k.usize_or("n_routed_experts", None)?,
                    hidden: k.usize_or("hidden_size", None)?,
                    ffn,
                    shared_ffn: (shared > 0).then_some(shared * ffn),
                },
            )
        }
        Family::GptOss => {
            let mut c = preset(Preset::GptOss);
            c.routing.top_k = k.usize_or("num_experts_per_tok", Some(4))?;
            c.activation = Activation::ClampedSwiglu(ClampedSwiglu {
                // transformers 5.x names it `swiglu_alpha`; the published config leaves it out.
                alpha: k.f64_or("swiglu_alpha", 1.702)?,
                limit: k.f64_or("swiglu_limit", 7.0)?,
            });
            (
                c,
                Plan {
                    prefix: format!("model.layers.{i}.mlp."),
                    router: "router",
                    score_bias: None,
                    experts: ExpertNames::GptOss,
                    shared: None,
                    num_experts: k.usize_or("num_local_experts", None)?,
                    hidden: k.usize_or("hidden_size", None)?,
                    ffn: k.usize_or("intermediate_size", None)?,
                    shared_ffn: None,
                },
            )
        }
        Family::Switch => {
            let mut c = preset(Preset::Switch);
            c.routing.capacity = Some(Capacity::Tokens(
                k.usize_or("expert_capacity", Some(64))? as i64
            ));
            c.activation = plain_act(dir, "dense_act_fn")?;
            let prefix = match layer {
                LayerSpec::Encoder(_) => format!("encoder.block.{i}.layer.1.mlp."),
                _ => format!("decoder.block.{i}.layer.2.mlp."),
            };
            (
                c,
                Plan {
                    prefix,
                    router: "router.classifier",
                    score_bias: None,
                    experts: ExpertNames::PerExpert {
                        stem: "experts.expert_",
                        gate: None,
                        up: "wi",
                        down: "wo",
                        biases: false,
                    },
                    shared: None,
                    num_experts: k.usize_or("num_experts", Some(8))?,
                    hidden: k.usize_or("d_model", Some(768))?,
                    ffn: k.usize_or("d_ff", Some(2048))?,
                    shared_ffn: None,
                },
            )
        }
        Family::NllbMoe => {
            let mut c = preset(Preset::NllbMoe);
            let policy = k.str_or("second_expert_policy", "all")?;
            if policy != "all" {
                return Err(dir.error(format!(
                    "second_expert_policy {policy:?} is not supported: transformers draws random \
                     numbers for it even in eval (only \"all\" is deterministic)"
                )));
            }
            if k.bool_or("normalize_router_prob_before_dropping", false)? {
                return Err(dir.error(
                    "normalize_router_prob_before_dropping = true is not supported (the layer \
                     renormalises over the assignments kept after capacity)",
                ));
            }
            let frac = k.f64_or("moe_eval_capacity_token_fraction", 1.0)?;
            // transformers: the eval fraction when > 0, else `expert_capacity` (class default 64).
            c.routing.capacity = Some(if frac > 0.0 {
                Capacity::Fraction(frac)
            } else {
                Capacity::Tokens(k.usize_or("expert_capacity", Some(64))? as i64)
            });
            if k.bool_or("batch_prioritized_routing", false)? {
                c.routing.priority = Priority::Top1Score;
            }
            // fairseq's eval scales the routed output by 1 - moe_token_dropout.
            c.output_scale = 1.0 - k.f64_or("moe_token_dropout", 0.2)?;
            c.activation = plain_act(dir, "activation_function")?;
            let (side, ffn_key) = match layer {
                LayerSpec::Encoder(_) => ("encoder", "encoder_ffn_dim"),
                _ => ("decoder", "decoder_ffn_dim"),
            };
            (
                c,
                Plan {
                    prefix: format!("model.{side}.layers.{i}.ffn."),
                    router: "router.classifier",
                    score_bias: None,
                    experts: ExpertNames::PerExpert {
                        stem: "experts.expert_",
                        gate: None,
                        up: "fc1",
                        down: "fc2",
                        biases: true,
                    },
                    shared: None,
                    num_experts: k.usize_or("num_experts", Some(128))?,
                    hidden: k.usize_or("d_model", Some(1024))?,
                    ffn: k.usize_or(ffn_key, Some(4096))?,
                    shared_ffn: None,
                },
            )
        }
    };
    config.validate_values()?;
    Ok((config, plan))
}
