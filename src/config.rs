//! Routing and layer configuration: the JSON schema of DESIGN.md section 4 and its presets.
//!
//! A config is a preset (defaults) plus overriding keys. Unknown keys are an error. Values that
//! depend on the layer's shape (top_k <= E, groups dividing E) are checked by
//! [`RoutingConfig::validate`] once E is known.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How router logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// Softmax over all E experts (max-subtracted).
    Softmax,
    /// Element-wise logistic sigmoid (DeepSeek-V3).
    Sigmoid,
    /// The raw logits (GPT-OSS selects on logits).
    Logits,
}

/// Group-limited selection (DeepSeek-V3): E experts in `count` contiguous groups, the best
/// `keep` groups (by the sum of their two largest selection values) stay eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Groups {
    /// Number of groups; must divide E.
    pub count: usize,
    /// Groups that stay eligible, in `1..=count`.
    pub keep: usize,
}

/// How the weight of each pick is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// The pick's score `s`.
    Score,
    /// Softmax over the k picked logits (GPT-OSS).
    SoftmaxSelected,
}

/// Expert capacity C for token-choice routing with dropping.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Capacity {
    /// A fixed number of assignments per expert.
    Tokens(i64),
    /// `ceil(fraction · T)` (fairseq's eval capacity).
    Fraction(f64),
    /// `ceil(factor · T · k / E)` (GShard / Switch capacity factor).
    Factor(f64),
}

impl Capacity {
    /// C for a batch of `t` tokens, `k` slots and `e` experts.
    pub fn tokens_per_expert(self, t: usize, k: usize, e: usize) -> usize {
        match self {
            Capacity::Tokens(n) => n.max(0) as usize,
            Capacity::Fraction(f) => (f * t as f64).ceil() as usize,
            // In f64 throughout: `t * k` could overflow usize for absurd T.
            Capacity::Factor(f) => (f * (t as f64 * k as f64) / e as f64).ceil() as usize,
        }
    }
}

/// Order in which assignments of one slot claim capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Token position (GShard, fairseq default).
    Position,
    /// Descending score of the token's first pick, ties by position (batch-prioritized routing).
    Top1Score,
}

/// Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertChoice {
    /// C = ceil(capacity_factor · T / E), at most T.
    pub capacity_factor: f64,
}

/// Parameters of GPT-OSS's clamped SwiGLU.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClampedSwiglu {
    /// Slope of the sigmoid, `alpha` in `σ(alpha · g')` (1.702 in GPT-OSS).
    pub alpha: f64,
    /// Clamp bound, finite and > 0: `g` is clamped above at `limit`, `u` to `±limit` (7.0 in
    /// GPT-OSS).
    pub limit: f64,
}

/// The expert activation, fused into GEMM 1's epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `silu(g) · u` (gated).
    Swiglu,
    /// `gelu(g) · u` with the exact (erf) GELU (gated).
    Geglu,
    /// `relu(u)` (not gated).
    Relu,
    /// `gelu(u)`, exact erf form (not gated).
    Gelu,
    /// GPT-OSS: `g' = min(g, limit)`, `u' = clamp(u, ±limit)`, `(u' + 1) · g' · σ(alpha · g')`.
    ClampedSwiglu(ClampedSwiglu),
}

impl Activation {
    /// Whether the expert has a gate projection.
    pub fn is_gated(self) -> bool {
        match self {
            Activation::Swiglu | Activation::Geglu | Activation::ClampedSwiglu(_) => true,
            Activation::Relu | Activation::Gelu => false,
        }
    }
}

/// A model family whose reference implementation a preset reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// Mixtral (HF `MixtralSparseMoeBlock`): softmax, top-2, renormalise, SwiGLU.
    Mixtral,
    /// Qwen2-MoE (HF `Qwen2MoeSparseMoeBlock`): top-4, `norm_topk_prob = false`; its layers
    /// have a gated shared expert.
    Qwen2Moe,
    /// Qwen3-MoE (HF `Qwen3MoeSparseMoeBlock`): top-8, renormalised.
    Qwen3Moe,
    /// DeepSeek-V3 (HF `DeepseekV3MoE`): sigmoid plus correction bias, 8 groups keep 4, top-8,
    /// weights × 2.5.
    DeepseekV3,
    /// GPT-OSS (HF `GptOssMLP`): top-4 on raw logits, softmax over the picks, clamped SwiGLU.
    GptOss,
    /// Switch Transformers (HF `SwitchTransformersSparseMLP`): top-1, capacity 64
    /// assignments per expert, ReLU.
    Switch,
    /// NLLB-MoE (fairseq eval): top-2, capacity `ceil(1.0 · T)`, renormalise after dropping,
    /// ReLU, routed output × 0.8.
    NllbMoe,
    /// A GPT-4-style layer: Mixtral's routing and activation (softmax, top-2, renormalise,
    /// SwiGLU).
    Gpt4,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 8] = [
        Preset::Mixtral,
        Preset::Qwen2Moe,
        Preset::Qwen3Moe,
        Preset::DeepseekV3,
        Preset::GptOss,
        Preset::Switch,
        Preset::NllbMoe,
        Preset::Gpt4,
    ];

    /// The name used in JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Mixtral => "mixtral",
            Preset::Qwen2Moe => "qwen2_moe",
            Preset::Qwen3Moe => "qwen3_moe",
            Preset::DeepseekV3 => "deepseek_v3",
            Preset::GptOss => "gpt_oss",
            Preset::Switch => "switch",
            Preset::NllbMoe => "nllb_moe",
            Preset::Gpt4 => "gpt4",
        }
    }

    /// The full config this preset stands for.
    pub fn config(self) -> LayerConfig {
        let base = LayerConfig::default();
        let r = base.routing;
        match self {
            // HF MixtralSparseMoeBlock: softmax, top-2, renormalise, SwiGLU.
            Preset::Mixtral | Preset::Gpt4 => LayerConfig {
                preset: Some(self),
                ..base
            },
            // HF Qwen2MoeSparseMoeBlock: top-4, norm_topk_prob=false, gated shared expert.
            Preset::Qwen2Moe => LayerConfig {
                preset: Some(self),
                routing: RoutingConfig {
                    top_k: 4,
                    renormalize: false,
                    ..r
                },
                ..base
            },
            // HF Qwen3MoeSparseMoeBlock: top-8, norm_topk_prob=true.
            Preset::Qwen3Moe => LayerConfig {
                preset: Some(self),
                routing: RoutingConfig { top_k: 8, ..r },
                ..base
            },
            // HF DeepseekV3MoE: sigmoid + correction bias, 8 groups keep 4, top-8, ×2.5.
            Preset::DeepseekV3 => LayerConfig {
                preset: Some(self),
                routing: RoutingConfig {
                    top_k: 8,
                    scoring: Scoring::Sigmoid,
                    groups: Some(Groups { count: 8, keep: 4 }),
                    scale: 2.5,
                    ..r
                },
                ..base
            },
            // HF GptOssMLP: top-4 on raw logits (+bias), softmax over the picks, clamped SwiGLU.
            Preset::GptOss => LayerConfig {
                preset: Some(self),
                routing: RoutingConfig {
                    top_k: 4,
                    scoring: Scoring::Logits,
                    combine: Combine::SoftmaxSelected,
                    renormalize: false,
                    ..r
                },
                activation: Activation::ClampedSwiglu(ClampedSwiglu {
                    alpha: 1.702,
                    limit: 7.0,
                }),
                ..base
            },
            // HF SwitchTransformersSparseMLP: top-1, expert_capacity 64 per sequence, ReLU.
            Preset::Switch => LayerConfig {
                preset: Some(self),
                routing: RoutingConfig {
                    top_k: 1,
                    renormalize: false,
                    capacity: Some(Capacity::Tokens(64)),
                    ..r
                },
                activation: Activation::Relu,
                ..base
            },
            // fairseq / NLLB-MoE eval: top-2, capacity ceil(1.0·T), renormalise after
            // dropping, ReLU, expert output × (1 − moe_token_dropout 0.2).
            Preset::NllbMoe => LayerConfig {
                preset: Some(self),
                routing: RoutingConfig {
                    top_k: 2,
                    capacity: Some(Capacity::Fraction(1.0)),
                    ..r
                },
                activation: Activation::Relu,
                output_scale: 0.8,
            },
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Preset::ALL.iter().map(|p| p.name()).collect();
                Error::config(format!(
                    "unknown preset {s:?} (expected one of {})",
                    names.join(", ")
                ))
            })
    }
}

/// Everything stage 1 (the gate) needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingConfig {
    /// Experts per token (ignored by expert-choice routing, which gives every token E slots).
    pub top_k: usize,
    /// How logits become scores.
    pub scoring: Scoring,
    /// Group-limited selection, if any.
    pub groups: Option<Groups>,
    /// How the weight of each pick is formed.
    pub combine: Combine,
    /// Divide the kept weights of a token by their sum (after capacity).
    pub renormalize: bool,
    /// Multiplies every weight (DeepSeek's routed_scaling_factor).
    pub scale: f64,
    /// Expert capacity; `None` keeps every assignment.
    pub capacity: Option<Capacity>,
    /// Which assignments claim capacity first (used only with `capacity`).
    pub priority: Priority,
    /// Expert-choice routing instead of token choice, when set.
    pub expert_choice: Option<ExpertChoice>,
}

impl Default for RoutingConfig {
    /// Mixtral's routing: softmax, top-2, renormalise.
    fn default() -> Self {
        RoutingConfig {
            top_k: 2,
            scoring: Scoring::Softmax,
            groups: None,
            combine: Combine::Score,
            renormalize: true,
            scale: 1.0,
            capacity: None,
            priority: Priority::Position,
            expert_choice: None,
        }
    }
}

impl RoutingConfig {
    /// Slots per token in the gate's outputs: `top_k`, or E for expert-choice routing.
    pub fn slots(&self, num_experts: usize) -> usize {
        if self.expert_choice.is_some() {
            num_experts
        } else {
            self.top_k
        }
    }

    /// Checks the values that do not depend on the layer's shape.
    pub fn validate_values(&self) -> Result<()> {
        if self.top_k == 0 {
            return Err(Error::config("top_k must be at least 1"));
        }
        if !self.scale.is_finite() {
            return Err(Error::config(format!(
                "scale must be finite, got {}",
                self.scale
            )));
        }
        if let Some(g) = self.groups {
            if g.count == 0 {
                return Err(Error::config("groups.count must be at least 1"));
            }
            if g.keep == 0 || g.keep > g.count {
                return Err(Error::config(format!(
                    "groups.keep must be in 1..={} (groups.count), got {}",
                    g.count, g.keep
                )));
            }
        }
        match self.capacity {
            Some(Capacity::Tokens(n)) if n <= 0 => {
                return Err(Error::config(format!(
                    "capacity.tokens must be > 0, got {n}"
                )))
            }
            Some(Capacity::Fraction(f)) | Some(Capacity::Factor(f))
                if !(f > 0.0 && f.is_finite()) =>
            {
                return Err(Error::config(format!(
                    "capacity fraction/factor must be finite and > 0, got {f}"
                )))
            }
            _ => {}
        }
        if let Some(ec) = self.expert_choice {
            if !(ec.capacity_factor > 0.0 && ec.capacity_factor.is_finite()) {
                return Err(Error::config(format!(
                    "expert_choice.capacity_factor must be finite and > 0, got {}",
                    ec.capacity_factor
                )));
            }
            if self.capacity.is_some() {
                return Err(Error::config(
                    "expert_choice and capacity cannot be combined (expert choice has its own capacity)",
                ));
            }
            if self.groups.is_some() {
                return Err(Error::config("expert_choice and groups cannot be combined"));
            }
            if self.combine != Combine::Score {
                return Err(Error::config("expert_choice needs combine = \"score\""));
            }
        }
        Ok(())
    }

    /// Checks everything, for a layer with `num_experts` experts.
    pub fn validate(&self, num_experts: usize) -> Result<()> {
        self.validate_values()?;
        if num_experts == 0 {
            return Err(Error::config("the layer has no experts (E = 0)"));
        }
        if self.expert_choice.is_none() && self.top_k > num_experts {
            return Err(Error::config(format!(
                "top_k = {} exceeds the number of experts E = {num_experts}",
                self.top_k
            )));
        }
        if let Some(g) = self.groups {
            if num_experts % g.count != 0 {
                return Err(Error::config(format!(
                    "groups.count = {} does not divide E = {num_experts}",
                    g.count
                )));
            }
            let eligible = g.keep * (num_experts / g.count);
            if self.top_k > eligible {
                return Err(Error::config(format!(
                    "top_k = {} exceeds the {eligible} experts in the {} kept groups",
                    self.top_k, g.keep
                )));
            }
        }
        Ok(())
    }
}

/// The whole layer's configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerConfig {
    /// The preset this config started from, if any.
    pub preset: Option<Preset>,
    /// Stage 1's routing.
    pub routing: RoutingConfig,
    /// The expert activation.
    pub activation: Activation,
    /// Multiplies the routed experts' sum (NLLB's 0.8 eval scale); the shared expert is not scaled.
    pub output_scale: f64,
}

impl Default for LayerConfig {
    fn default() -> Self {
        LayerConfig {
            preset: None,
            routing: RoutingConfig::default(),
            activation: Activation::Swiglu,
            output_scale: 1.0,
        }
    }
}

/// The keys a config file may hold.
pub const CONFIG_KEYS: [&str; 12] = [
    "preset",
    "top_k",
    "scoring",
    "groups",
    "combine",
    "renormalize",
    "scale",
    "capacity",
    "priority",
    "expert_choice",
    "activation",
    "output_scale",
];

impl LayerConfig {
    /// Parses the JSON config (preset defaults, then overriding keys) and checks the values
    /// that do not depend on the layer's shape. `origin` names the source in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let json_err = |msg: String| Error::ConfigJson {
            path: origin.to_string(),
            msg,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| json_err(e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| json_err(format!("the config must be a JSON object, got {value}")))?;
        if let Some(k) = obj.keys().find(|k| !CONFIG_KEYS.contains(&k.as_str())) {
            return Err(json_err(format!(
                "unknown key {k:?} (known keys: {})",
                CONFIG_KEYS.join(", ")
            )));
        }
        // Each key is parsed on its own so that an error names it.
        fn parse<T: serde::de::DeserializeOwned>(
            key: &str,
            v: &serde_json::Value,
            origin: &str,
        ) -> Result<T> {
            T::deserialize(v).map_err(|e| Error::ConfigJson {
                path: origin.to_string(),
                msg: format!("key {key:?}: {e}"),
            })
        }
        let mut cfg = match obj.get("preset") {
            Some(v) => parse::<Preset>("preset", v, origin)?.config(),
            None => LayerConfig::default(),
        };
        let r = &mut cfg.routing;
        for (key, v) in obj {
            match key.as_str() {
                "preset" => {}
                "top_k" => {
                    let k: i64 = parse(key, v, origin)?;
                    if k <= 0 {
                        return Err(Error::config(format!("top_k must be at least 1, got {k}")));
                    }
                    r.top_k =
                        usize::try_from(k).map_err(|_| Error::config("top_k is too large"))?;
                }
                "scoring" => r.scoring = parse(key, v, origin)?,
                // null is allowed for these three and overrides the preset with nothing.
                "groups" => r.groups = parse(key, v, origin)?,
                "capacity" => r.capacity = parse(key, v, origin)?,
                "expert_choice" => r.expert_choice = parse(key, v, origin)?,
                "combine" => r.combine = parse(key, v, origin)?,
                "renormalize" => r.renormalize = parse(key, v, origin)?,
                "scale" => r.scale = parse(key, v, origin)?,
                "priority" => r.priority = parse(key, v, origin)?,
                "activation" => cfg.activation = parse(key, v, origin)?,
                "output_scale" => cfg.output_scale = parse(key, v, origin)?,
                // CONFIG_KEYS was checked above.
                other => return Err(json_err(format!("unknown key {other:?}"))),
            }
        }
        cfg.validate_values()?;
        Ok(cfg)
    }

    /// The config as JSON that [`LayerConfig::from_json`] reads back to the same value: the
    /// preset (if any) and every key written out, so the file says everything it computes.
    pub fn to_json(&self) -> String {
        let r = &self.routing;
        let mut v = serde_json::json!({
            "top_k": r.top_k,
            "scoring": r.scoring,
            "groups": r.groups,
            "combine": r.combine,
            "renormalize": r.renormalize,
            "scale": r.scale,
            "capacity": r.capacity,
            "priority": r.priority,
            "expert_choice": r.expert_choice,
            "activation": self.activation,
            "output_scale": self.output_scale,
        });
        if let (Some(p), Some(obj)) = (self.preset, v.as_object_mut()) {
            obj.insert("preset".into(), serde_json::json!(p));
        }
        // Serialising plain enums and numbers into a Value cannot fail.
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
    }

    /// Reads and parses a JSON config file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Checks the values that do not depend on the layer's shape.
    pub fn validate_values(&self) -> Result<()> {
        self.routing.validate_values()?;
        if !self.output_scale.is_finite() {
            return Err(Error::config(format!(
                "output_scale must be finite, got {}",
                self.output_scale
            )));
        }
        if let Activation::ClampedSwiglu(c) = self.activation {
            if !(c.alpha.is_finite() && c.limit > 0.0 && c.limit.is_finite()) {
                return Err(Error::config(format!(
                    "clamped_swiglu needs a finite alpha and a finite limit > 0, got alpha {} limit {}",
                    c.alpha, c.limit
                )));
            }
        }
        Ok(())
    }
}
