//! A whole MoE layer: weights under the canonical names of DESIGN.md section 4, its config,
//! and the forward pass on a [`Backend`] (stage by stage) or as the pure f64 reference.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use web_time::Instant;

use std::sync::Mutex;

use crate::backend::{Backend, BackendKind, Device};
use crate::config::LayerConfig;
use crate::cpu;
use crate::cpu::combine::{Assignments, SharedInput};
use crate::cpu::device::{CpuResident, CpuStages, CpuWorkspace};
use crate::cpu::expert_gemm::{ExpertDims, ExpertWeights};
use crate::cpu::gate::Routing;
use crate::device::{self, LayerWeights, Plan};
use crate::error::{Error, Result};
use crate::io::{self, FileTensor};
use crate::limits::{self, Footprint, LayerShape};
use crate::quant::{self, parts, QuantSpec, Weight};
use crate::stage::Stage;
use crate::tensor::{DType, Tensor};

/// Every tensor name a layer file may hold.
pub const TENSOR_NAMES: [&str; 13] = [
    "router.weight",
    "router.bias",
    "router.score_correction_bias",
    "experts.gate_proj",
    "experts.up_proj",
    "experts.down_proj",
    "experts.gate_proj_bias",
    "experts.up_proj_bias",
    "experts.down_proj_bias",
    "shared.gate_proj",
    "shared.up_proj",
    "shared.down_proj",
    "shared.gate.weight",
];

/// The shared expert every token uses (Qwen2-MoE, DeepSeek), held as one expert.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedExpert {
    /// `[1, Fs, H]` / `[1, H, Fs]` views of the `[Fs, H]` / `[H, Fs]` tensors.
    pub weights: ExpertWeights,
    /// `shared.gate.weight` `[1, H]`: the output is scaled by `sigmoid(x·g)` when present.
    pub gate: Option<Tensor>,
}

/// A loaded, validated MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeLayer {
    /// Routing, activation and output scale.
    pub config: LayerConfig,
    /// `[E, H]`.
    pub router_weight: Tensor,
    /// `[E]`.
    pub router_bias: Option<Tensor>,
    /// `[E]`, added to the scores for selection only.
    pub score_correction_bias: Option<Tensor>,
    /// The routed experts.
    pub experts: ExpertWeights,
    /// The shared expert, if the layer has one.
    pub shared: Option<SharedExpert>,
    dims: ExpertDims,
}

/// The outputs of a forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardOutput {
    /// Tokens T.
    pub tokens: usize,
    /// Model width H.
    pub hidden: usize,
    /// Assignments per token (`top_k`, or E for expert choice).
    pub slots: usize,
    /// The activation dtype of the forward: `y` holds values of it, widened exactly to f32.
    pub dtype: DType,
    /// `[T, H]`.
    pub y: Vec<f32>,
    /// `[T, slots]`.
    pub topk_ids: Vec<u32>,
    /// `[T, slots]`, the weights applied (0 where dropped).
    pub topk_weights: Vec<f32>,
    /// `[T, slots]`, 1 where kept.
    pub kept: Vec<u32>,
    /// `[E]`, kept assignments per expert.
    pub counts: Vec<u32>,
    /// Time of each stage: host wall time on the CPU backend, CUDA events, GPU timestamps on
    /// wgpu (empty when the adapter has no timestamp queries).
    pub stage_times: Vec<(Stage, Duration)>,
    /// Wall time of the whole forward on the host (upload, launches, wait; not read-backs).
    pub wall_time: Duration,
}

impl ForwardOutput {
    /// `y` `[T, H]` as a tensor in the forward's activation dtype (exact: `y` holds values of
    /// that dtype).
    pub fn y_tensor(&self) -> Result<Tensor> {
        Tensor::from_f32(vec![self.tokens, self.hidden], self.y.clone()).map(|t| t.cast(self.dtype))
    }
}

/// The f64 reference's outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceOutput {
    /// `[T, H]`.
    pub y: Vec<f64>,
    /// The reference gate's outputs.
    pub routing: Routing,
}

fn weights_err(origin: &str, what: impl Into<String>) -> Error {
    Error::Weights {
        path: origin.to_string(),
        what: what.into(),
    }
}

/// True for a canonical tensor name, or a quantized matrix's part.
fn known_name(name: &str) -> bool {
    TENSOR_NAMES.contains(&name)
        || MATRIX_NAMES.iter().any(|m| {
            name.strip_prefix(m)
                .is_some_and(|rest| parts::SUFFIXES.contains(&rest))
        })
}

/// The names of the six expert matrices that may be quantized.
pub const MATRIX_NAMES: [&str; 6] = [
    "experts.gate_proj",
    "experts.up_proj",
    "experts.down_proj",
    "shared.gate_proj",
    "shared.up_proj",
    "shared.down_proj",
];

/// Takes the float tensor `name`, if present; an error naming it when it is U8 / F8.
fn float(t: &mut BTreeMap<String, FileTensor>, name: &str, origin: &str) -> Result<Option<Tensor>> {
    match t.remove(name) {
        None => Ok(None),
        Some(FileTensor::Float(x)) => Ok(Some(x)),
        Some(other) => Err(weights_err(
            origin,
            format!(
                "{name:?} is {}: it must be F32, F16 or BF16",
                other.dtype_name()
            ),
        )),
    }
}

/// One file, one format: the routed experts' matrices are all dense or all in one quantized
/// format, and a shared expert is dense or in that same format.
fn check_formats(
    experts: &ExpertWeights,
    shared: Option<&SharedExpert>,
    origin: &str,
) -> Result<()> {
    let mut seen: Vec<(String, &'static str, bool)> = Vec::new();
    let mut add = |prefix: &str, w: &ExpertWeights| {
        for (name, m) in [
            ("gate_proj", w.gate.as_ref()),
            ("up_proj", Some(&w.up)),
            ("down_proj", Some(&w.down)),
        ] {
            if let Some(m) = m {
                seen.push((
                    format!("{prefix}.{name}"),
                    m.format_name(),
                    m.quant().is_some(),
                ));
            }
        }
    };
    add("experts", experts);
    if let Some(s) = shared {
        add("shared", &s.weights);
    }
    let quant: Vec<&(String, &str, bool)> = seen.iter().filter(|s| s.2).collect();
    if let Some(a) = quant.first() {
        if let Some(b) = quant.iter().find(|b| b.1 != a.1) {
            return Err(weights_err(
                origin,
                format!(
                    "two formats in one file: {} is {}, {} is {}",
                    a.0, a.1, b.0, b.1
                ),
            ));
        }
    }
    for prefix in ["experts.", "shared."] {
        let group: Vec<_> = seen.iter().filter(|s| s.0.starts_with(prefix)).collect();
        if let (Some(q), Some(d)) = (group.iter().find(|s| s.2), group.iter().find(|s| !s.2)) {
            return Err(weights_err(
                origin,
                format!(
                    "{} is {} but {} is dense {}: one expert's matrices share one format",
                    q.0, q.1, d.0, d.1
                ),
            ));
        }
    }
    // The shared expert may be dense with quantized experts, not quantized with dense ones.
    let routed_dense = seen.iter().find(|s| s.0.starts_with("experts.") && !s.2);
    let shared_quant = seen.iter().find(|s| s.0.starts_with("shared.") && s.2);
    if let (Some(d), Some(q)) = (routed_dense, shared_quant) {
        return Err(weights_err(
            origin,
            format!(
                "two formats in one file: {} is {} but the routed {} is dense {} (a quantized \
                 shared expert needs routed experts in its format)",
                q.0, q.1, d.0, d.1
            ),
        ));
    }
    Ok(())
}

impl MoeLayer {
    /// Loads a layer from a safetensors file with the canonical names (dense or quantized
    /// expert weights; the format is read off the file).
    pub fn load(config: LayerConfig, path: &Path) -> Result<Self> {
        let tensors = io::load_file_tensors(path)?;
        Self::from_file_tensors(config, tensors, &path.display().to_string())
    }

    /// Reads one MoE layer straight from a Hugging Face checkpoint directory (DESIGN.md
    /// section 4): `layer` is the decoder layer index (`"3"`), or `"encoder.3"` /
    /// `"decoder.3"` for encoder-decoder models. The family's tensor names, its routing
    /// (config.json) and the stored dtype or quantized format are kept; only this layer's
    /// tensors are read. A dense or missing layer, an unknown `model_type`, a missing shard or
    /// tensor and shapes that disagree with config.json are errors naming file and tensor.
    pub fn from_checkpoint(dir: impl AsRef<Path>, layer: &str) -> Result<Self> {
        let ck = crate::checkpoint::read_layer(dir.as_ref(), layer.parse()?)?;
        Self::from_file_tensors(ck.config, ck.tensors, &ck.origin)
    }

    /// Builds a layer from named dense tensors; E, H, F and the optional parts are read off
    /// them. `origin` names the source in errors.
    pub fn from_tensors(
        config: LayerConfig,
        t: BTreeMap<String, Tensor>,
        origin: &str,
    ) -> Result<Self> {
        let t = t
            .into_iter()
            .map(|(k, v)| (k, FileTensor::Float(v)))
            .collect();
        Self::from_file_tensors(config, t, origin)
    }

    /// Builds a layer from the tensors of a weights file, dense or quantized (DESIGN.md
    /// section 4); E, H, F, the optional parts and the weight format are read off them.
    /// `origin` names the source in errors.
    pub fn from_file_tensors(
        config: LayerConfig,
        mut t: BTreeMap<String, FileTensor>,
        origin: &str,
    ) -> Result<Self> {
        if let Some(extra) = t.keys().find(|k| !known_name(k)) {
            return Err(weights_err(
                origin,
                format!(
                    "unexpected tensor {extra:?} (known: {}; quantized matrices add the \
                     suffixes {})",
                    TENSOR_NAMES.join(", "),
                    parts::SUFFIXES.join(", ")
                ),
            ));
        }
        let router_weight = float(&mut t, "router.weight", origin)?
            .ok_or_else(|| weights_err(origin, "missing tensor \"router.weight\""))?;
        let hidden = match router_weight.shape() {
            [_, h] => *h,
            s => {
                return Err(weights_err(
                    origin,
                    format!("router.weight must be [E, H], got shape {s:?}"),
                ))
            }
        };
        let up = parts::take_matrix(&mut t, "experts.up_proj", hidden, true, origin)?
            .ok_or_else(|| weights_err(origin, "missing tensor \"experts.up_proj\""))?;
        let ffn = up.shape().get(1).copied().unwrap_or(0);
        let down = parts::take_matrix(&mut t, "experts.down_proj", ffn, true, origin)?
            .ok_or_else(|| weights_err(origin, "missing tensor \"experts.down_proj\""))?;
        let gate = parts::take_matrix(&mut t, "experts.gate_proj", hidden, true, origin)?;
        let gated = config.activation.is_gated();
        if gated && gate.is_none() {
            return Err(weights_err(
                origin,
                format!(
                    "missing tensor \"experts.gate_proj\" (activation {:?} is gated)",
                    config.activation
                ),
            ));
        }
        if !gated && gate.is_some() {
            return Err(weights_err(
                origin,
                format!(
                    "tensor \"experts.gate_proj\" given but activation {:?} is not gated",
                    config.activation
                ),
            ));
        }
        let (mut gate, mut up) = (gate, up);
        if let Some(g) = gate.as_mut() {
            quant::harmonize(g, &mut up);
        }
        let experts = ExpertWeights {
            gate,
            up,
            down,
            gate_bias: float(&mut t, "experts.gate_proj_bias", origin)?,
            up_bias: float(&mut t, "experts.up_proj_bias", origin)?,
            down_bias: float(&mut t, "experts.down_proj_bias", origin)?,
        };
        let dims = experts
            .dims(config.activation)
            .map_err(|e| weights_err(origin, format!("experts: {}", strip_stage(&e))))?;
        if dims.experts == 0 || dims.hidden == 0 || dims.ffn == 0 {
            return Err(weights_err(
                origin,
                format!(
                    "E, H and F must be at least 1, got E = {}, H = {}, F = {}",
                    dims.experts, dims.hidden, dims.ffn
                ),
            ));
        }
        let shared = Self::take_shared(&mut t, &config, hidden, origin)?;
        check_formats(&experts, shared.as_ref(), origin)?;
        let layer = MoeLayer {
            config,
            router_weight,
            router_bias: float(&mut t, "router.bias", origin)?,
            score_correction_bias: float(&mut t, "router.score_correction_bias", origin)?,
            experts,
            shared,
            dims,
        };
        layer.check(origin)?;
        Ok(layer)
    }

    fn take_shared(
        t: &mut BTreeMap<String, FileTensor>,
        config: &LayerConfig,
        hidden: usize,
        origin: &str,
    ) -> Result<Option<SharedExpert>> {
        let any = t.keys().any(|n| n.starts_with("shared."));
        if !any {
            return Ok(None);
        }
        let missing = |name: &str| {
            weights_err(
                origin,
                format!("missing tensor {name:?} (other shared.* tensors are present)"),
            )
        };
        let up = parts::take_matrix(t, "shared.up_proj", hidden, false, origin)?
            .ok_or_else(|| missing("shared.up_proj"))?;
        let rank2 = |name: &str, x: &Weight| -> Result<()> {
            if x.quant().is_some() || x.shape().len() == 2 {
                Ok(())
            } else {
                Err(weights_err(
                    origin,
                    format!("{name} must be rank 2, got shape {:?}", x.shape()),
                ))
            }
        };
        rank2("shared.up_proj", &up)?;
        let shared_ffn = up.shape().iter().rev().nth(1).copied().unwrap_or(0);
        let down = parts::take_matrix(t, "shared.down_proj", shared_ffn, false, origin)?
            .ok_or_else(|| missing("shared.down_proj"))?;
        let gate = parts::take_matrix(t, "shared.gate_proj", hidden, false, origin)?;
        if config.activation.is_gated() != gate.is_some() {
            return Err(weights_err(
                origin,
                format!(
                    "shared.gate_proj must be present iff the activation is gated ({:?})",
                    config.activation
                ),
            ));
        }
        rank2("shared.down_proj", &down)?;
        if let Some(g) = &gate {
            rank2("shared.gate_proj", g)?;
        }
        let (mut gate, mut up) = (gate, up);
        if let Some(g) = gate.as_mut() {
            quant::harmonize(g, &mut up);
        }
        let weights = ExpertWeights {
            gate: gate.map(Weight::as_one_expert).transpose()?,
            up: up.as_one_expert()?,
            down: down.as_one_expert()?,
            gate_bias: None,
            up_bias: None,
            down_bias: None,
        };
        weights
            .dims(config.activation)
            .map_err(|e| weights_err(origin, format!("shared expert: {}", strip_stage(&e))))?;
        Ok(Some(SharedExpert {
            weights,
            gate: float(t, "shared.gate.weight", origin)?,
        }))
    }

    /// Cross-tensor consistency and the routing config against E.
    fn check(&self, origin: &str) -> Result<()> {
        let ExpertDims {
            experts: e,
            hidden: h,
            ..
        } = self.dims;
        if self.router_weight.shape() != [e, h] {
            return Err(weights_err(
                origin,
                format!(
                    "router.weight must be [E, H] = [{e}, {h}] (from experts.up_proj), got {:?}",
                    self.router_weight.shape()
                ),
            ));
        }
        for (name, b) in [
            ("router.bias", &self.router_bias),
            ("router.score_correction_bias", &self.score_correction_bias),
        ] {
            if let Some(b) = b {
                if b.shape() != [e] {
                    return Err(weights_err(
                        origin,
                        format!("{name} must be [E] = [{e}], got {:?}", b.shape()),
                    ));
                }
            }
        }
        if let Some(s) = &self.shared {
            let sd = s.weights.dims(self.config.activation)?;
            if sd.hidden != h {
                return Err(weights_err(
                    origin,
                    format!(
                        "shared expert hidden size {} differs from the experts' H = {h}",
                        sd.hidden
                    ),
                ));
            }
            if let Some(g) = &s.gate {
                if g.shape() != [1, h] {
                    return Err(weights_err(
                        origin,
                        format!(
                            "shared.gate.weight must be [1, H] = [1, {h}], got {:?}",
                            g.shape()
                        ),
                    ));
                }
            }
        }
        self.config.routing.validate(e)
    }

    /// E, H and F.
    pub fn dims(&self) -> ExpertDims {
        self.dims
    }

    /// What a forward's buffers depend on (for [`Footprint::forward`]).
    ///
    /// [`Footprint::forward`]: crate::limits::Footprint::forward
    pub fn shape(&self) -> LayerShape {
        LayerShape {
            dims: self.dims,
            config: self.config,
            shared_ffn: self
                .shared
                .as_ref()
                .map(|s| s.weights.up.shape().get(1).copied().unwrap_or(0)),
            shared_gate: self.shared.as_ref().is_some_and(|s| s.gate.is_some()),
        }
    }

    /// Bytes of every weight and bias as stored.
    pub fn weight_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| limits::product(&[t.len(), t.dtype().size()]);
        let ew = |w: &ExpertWeights| {
            [
                w.gate_bias.as_ref(),
                w.up_bias.as_ref(),
                w.down_bias.as_ref(),
            ]
            .into_iter()
            .flatten()
            .map(bytes)
            .chain(
                [w.gate.as_ref(), Some(&w.up), Some(&w.down)]
                    .into_iter()
                    .flatten()
                    .map(Weight::bytes),
            )
            .fold(0u64, u64::saturating_add)
        };
        [
            Some(&self.router_weight),
            self.router_bias.as_ref(),
            self.score_correction_bias.as_ref(),
            self.shared.as_ref().and_then(|s| s.gate.as_ref()),
        ]
        .into_iter()
        .flatten()
        .map(bytes)
        .fold(0u64, u64::saturating_add)
        .saturating_add(ew(&self.experts))
        .saturating_add(self.shared.as_ref().map_or(0, |s| ew(&s.weights)))
    }

    /// The same layer with its routed and shared expert matrices quantized by `spec`
    /// (biases, router and shared gate stay as stored). An error when a dimension does not
    /// fit the format (MXFP4 needs H and F to be multiples of 32; an INT4 group must divide
    /// them).
    pub fn quantized(&self, spec: &QuantSpec) -> Result<MoeLayer> {
        let q = |w: &Weight| -> Result<Weight> {
            let t = match w {
                Weight::Dense(t) => t,
                Weight::Quant(_) => return Err(Error::config("the layer is already quantized")),
            };
            Ok(Weight::Quant(quant::encode::quantize(t, spec)?))
        };
        let all = |w: &ExpertWeights| -> Result<ExpertWeights> {
            Ok(ExpertWeights {
                gate: w.gate.as_ref().map(q).transpose()?,
                up: q(&w.up)?,
                down: q(&w.down)?,
                ..w.clone()
            })
        };
        Ok(MoeLayer {
            experts: all(&self.experts)?,
            shared: self
                .shared
                .as_ref()
                .map(|s| -> Result<SharedExpert> {
                    Ok(SharedExpert {
                        weights: all(&s.weights)?,
                        gate: s.gate.clone(),
                    })
                })
                .transpose()?,
            ..self.clone()
        })
    }

    /// Every tensor of this layer under the canonical names of DESIGN.md section 4, as
    /// [`MoeLayer::load`] reads them (quantized matrices as their packed parts).
    pub fn file_tensors(&self) -> Result<Vec<(String, FileTensor)>> {
        self.clone().into_file_tensors()
    }

    /// [`MoeLayer::file_tensors`] by value: moves the weights instead of copying them (what
    /// `moe import` writes, so a layer is held once).
    pub fn into_file_tensors(self) -> Result<Vec<(String, FileTensor)>> {
        let mut out: Vec<(String, FileTensor)> = Vec::new();
        let mut float = |name: &str, t: Option<Tensor>| {
            if let Some(t) = t {
                out.push((name.to_string(), FileTensor::Float(t)));
            }
        };
        float("router.weight", Some(self.router_weight));
        float("router.bias", self.router_bias);
        float("router.score_correction_bias", self.score_correction_bias);
        let w = self.experts;
        float("experts.gate_proj_bias", w.gate_bias);
        float("experts.up_proj_bias", w.up_bias);
        float("experts.down_proj_bias", w.down_bias);
        let (shared, shared_gate) = match self.shared {
            Some(s) => (Some(s.weights), s.gate),
            None => (None, None),
        };
        float("shared.gate.weight", shared_gate);
        let mut mats = vec![
            ("experts.gate_proj", w.gate, true),
            ("experts.up_proj", Some(w.up), true),
            ("experts.down_proj", Some(w.down), true),
        ];
        if let Some(s) = shared {
            mats.push(("shared.gate_proj", s.gate, false));
            mats.push(("shared.up_proj", Some(s.up), false));
            mats.push(("shared.down_proj", Some(s.down), false));
        }
        for (name, m, axis) in mats {
            if let Some(m) = m {
                out.extend(parts::file_tensors(name, m, axis)?);
            }
        }
        Ok(out)
    }

    /// The same layer with expert and shared-expert weights rounded to `dtype` (quantized
    /// matrices stay as they are). Router weights and biases stay as stored, since routing
    /// decisions are made on them.
    pub fn with_expert_dtype(&self, dtype: DType) -> MoeLayer {
        let cast = |w: &ExpertWeights| ExpertWeights {
            gate: w.gate.as_ref().map(|t| t.cast(dtype)),
            up: w.up.cast(dtype),
            down: w.down.cast(dtype),
            gate_bias: w.gate_bias.as_ref().map(|t| t.cast(dtype)),
            up_bias: w.up_bias.as_ref().map(|t| t.cast(dtype)),
            down_bias: w.down_bias.as_ref().map(|t| t.cast(dtype)),
        };
        MoeLayer {
            experts: cast(&self.experts),
            shared: self.shared.as_ref().map(|s| SharedExpert {
                weights: cast(&s.weights),
                gate: s.gate.clone(),
            }),
            ..self.clone()
        }
    }

    fn check_x(&self, x: &Tensor) -> Result<usize> {
        x_tokens(x, self.dims.hidden)
    }

    /// An [`Error::Limit`] unless the host can hold the f64 reference forward of `tokens`
    /// tokens (every activation in f64 plus the stage temporaries: about 3× the f32
    /// [`Footprint`]). [`MoeLayer::forward_reference`] runs it first; call it before building
    /// a large input to fail before that allocation too.
    pub fn check_reference(&self, tokens: usize) -> Result<()> {
        limits::check_host(
            BackendKind::Cpu,
            || format!("the f64 reference forward of {tokens} tokens"),
            Footprint::forward(&self.shape(), tokens)
                .total_bytes()
                .saturating_mul(3),
        )
    }

    /// The pure f64 reference forward (no rounding between stages).
    pub fn forward_reference(&self, x: &Tensor) -> Result<ReferenceOutput> {
        let t = self.check_x(x)?;
        self.check_reference(t)?;
        let (e, h) = (self.dims.experts, self.dims.hidden);
        let cfg = &self.config;
        let logits = cpu::router::router_logits(x, &self.router_weight, self.router_bias.as_ref())?;
        let bias = self.score_correction_bias.as_ref().map(Tensor::to_f64_vec);
        let routing = cpu::gate::gate(&logits, t, e, bias.as_deref(), &cfg.routing)?;
        let perm = cpu::permute::permute(&routing.topk_ids, &routing.kept, e)?;
        let x_perm = cpu::permute::gather(x, routing.slots, &perm)?;
        let y_perm = cpu::expert_gemm::expert_ffn(
            &x_perm,
            &perm.expert_offsets,
            &self.experts,
            cfg.activation,
        )?;
        let shared_y = match &self.shared {
            Some(s) => Some(cpu::expert_gemm::shared_ffn(x, &s.weights, cfg.activation)?),
            None => None,
        };
        let shared_g = match self.shared.as_ref().and_then(|s| s.gate.as_ref()) {
            Some(g) => Some(cpu::router::router_logits(x, g, None)?),
            None => None,
        };
        let a = Assignments {
            slots: routing.slots,
            weights: &routing.topk_weights,
            kept: &routing.kept,
            row_of_assignment: &perm.row_of_assignment,
        };
        let shared_in = shared_y.as_deref().map(|y| SharedInput {
            y,
            gate_logits: shared_g.as_deref(),
        });
        let y = cpu::combine::combine(&y_perm, h, a, shared_in, cfg.output_scale)?;
        Ok(ReferenceOutput { y, routing })
    }

    /// The weights and config as the backends' uploads read them.
    pub(crate) fn weights(&self) -> LayerWeights<'_> {
        LayerWeights {
            config: &self.config,
            dims: self.dims,
            router_weight: &self.router_weight,
            router_bias: self.router_bias.as_ref(),
            correction_bias: self.score_correction_bias.as_ref(),
            experts: &self.experts,
            shared: self.shared.as_ref().map(|s| &s.weights),
            shared_gate: self.shared.as_ref().and_then(|s| s.gate.as_ref()),
        }
    }

    /// The layer made ready on `dev` for forwards of up to `max_tokens` tokens with
    /// activations (`x`, `x_perm`, `h`, `y_perm`, `y`) in `act_dtype`: the weights are uploaded
    /// and one workspace is allocated, once. A device-resident forward
    /// ([`PreparedLayer::forward_wgpu`], [`PreparedLayer::forward_cuda`]) of any
    /// `T <= max_tokens` creates no device buffer (wgpu reuses its bind groups between
    /// forwards of the same T and recreates those whose buffer ranges changed); the
    /// host-tensor [`PreparedLayer::forward`] adds only its read-back staging. Every size and
    /// limit is checked here, for `max_tokens`; a forward only checks `T <= max_tokens`. The
    /// prepared layer owns what it needs: `self` may be dropped. Blocks
    /// ([`MoeLayer::prepare_async`] under [`crate::asynch::block_on`]).
    pub fn prepare(
        &self,
        dev: &Backend,
        max_tokens: usize,
        act_dtype: DType,
    ) -> Result<PreparedLayer> {
        crate::asynch::block_on(
            "MoeLayer::prepare",
            self.prepare_async(dev, max_tokens, act_dtype),
        )
    }

    /// [`MoeLayer::prepare`] without blocking: the uploads and pipelines are created as there,
    /// then the device's answers (wgpu's error scopes; promises in a browser) are awaited, so
    /// an out-of-memory or a shader the browser rejects is an error here.
    pub async fn prepare_async(
        &self,
        dev: &Backend,
        max_tokens: usize,
        act_dtype: DType,
    ) -> Result<PreparedLayer> {
        let prepared = self.prepare_now(dev, max_tokens, act_dtype)?;
        dev.settled().await?;
        Ok(prepared)
    }

    /// The body of [`MoeLayer::prepare_async`] up to the wait for the device.
    fn prepare_now(
        &self,
        dev: &Backend,
        max_tokens: usize,
        act_dtype: DType,
    ) -> Result<PreparedLayer> {
        #[allow(unused_mut)]
        let mut resident = self.weight_bytes();
        dev.check_weights(resident)?;
        dev.check_forward_in(&self.shape(), max_tokens, act_dtype, resident)?;
        let w = self.weights();
        let inner = match &dev.device {
            Device::Cpu => {
                let res = CpuResident::new(&w);
                let ws = CpuWorkspace::new(act_dtype, &res);
                Inner::Cpu(Box::new((res, ws)))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                if act_dtype != DType::F32 && !crate::cuda::act16_enabled() {
                    return Err(Error::BackendUnavailable {
                        backend: BackendKind::Cuda,
                        reason: format!(
                            "{act_dtype} activations on CUDA are assembled and checked but not \
                             yet verified on a GPU; set MOE_CUDA_ACT16=1 to run them, or \
                             prepare with f32 activations"
                        ),
                    });
                }
                let res = crate::cuda::device::CudaResident::upload(d, &w)?;
                let ws = crate::cuda::device::CudaWorkspace::alloc(
                    d, &res, max_tokens, act_dtype, true,
                )?;
                Inner::Cuda(Box::new((res, ws)))
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu(d) => {
                let res = crate::wgpu::device::WgpuResident::upload(d, &w)?;
                // What wgpu really holds: packed sections with their alignment, f32 biases.
                resident = res.bytes();
                let mut ws = crate::wgpu::device::WgpuWorkspace::alloc(
                    d, &res, max_tokens, act_dtype, true,
                )?;
                // Record (never submit) the forwards that use the most scratch, so that the
                // pool holds every buffer a forward of up to max_tokens asks for.
                let st = crate::wgpu::device::WgpuStages { dev: d };
                for t in [max_tokens, max_tokens.min(1)] {
                    let mut enc = d.encoder();
                    device::forward(&st, &mut enc, &res, &mut ws, self.plan(t), (), ())?;
                    drop(enc);
                }
                Inner::Wgpu(Box::new((res, ws)))
            }
        };
        Ok(PreparedLayer {
            dev: dev.clone(),
            hidden: self.dims.hidden,
            slots: self.config.routing.slots(self.dims.experts),
            experts: self.dims.experts,
            plan: self.plan(0),
            max_tokens,
            dtype: act_dtype,
            resident,
            last_tokens: std::sync::atomic::AtomicUsize::new(usize::MAX),
            inner: Mutex::new(inner),
        })
    }

    fn plan(&self, tokens: usize) -> Plan {
        Plan {
            tokens,
            shared: self.shared.is_some(),
            shared_gate: self.shared.as_ref().is_some_and(|s| s.gate.is_some()),
        }
    }

    /// The forward pass of `x` `[T, H]` on `dev`, with activations in `x`'s dtype (prepares
    /// the layer for T tokens first: for repeated forwards, [`MoeLayer::prepare`] once instead).
    pub fn forward(&self, dev: &Backend, x: &Tensor) -> Result<ForwardOutput> {
        crate::asynch::block_on("MoeLayer::forward", self.forward_async(dev, x))
    }

    /// [`MoeLayer::forward`] without blocking.
    pub async fn forward_async(&self, dev: &Backend, x: &Tensor) -> Result<ForwardOutput> {
        let t = self.check_x(x)?;
        self.prepare_async(dev, t, x.dtype())
            .await?
            .forward_async(x)
            .await
    }
}

/// What a backend keeps of a prepared layer: its resident weights and its workspace.
enum Inner {
    Cpu(Box<(CpuResident, CpuWorkspace)>),
    #[cfg(feature = "cuda")]
    Cuda(
        Box<(
            crate::cuda::device::CudaResident,
            crate::cuda::device::CudaWorkspace,
        )>,
    ),
    #[cfg(feature = "wgpu")]
    Wgpu(
        Box<(
            crate::wgpu::device::WgpuResident,
            crate::wgpu::device::WgpuWorkspace,
        )>,
    ),
}

/// A layer ready to run on one backend: its weights resident there and one workspace for
/// forwards of up to `max_tokens` tokens, in one activation dtype. It owns everything it
/// uses. Forwards on one prepared layer are serialised (its workspace is locked per forward);
/// prepare one per thread or stream for concurrent forwards.
pub struct PreparedLayer {
    dev: Backend,
    hidden: usize,
    slots: usize,
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    experts: usize,
    plan: Plan,
    max_tokens: usize,
    dtype: DType,
    /// Bytes of the weights this layer keeps on the backend (as allocated on wgpu; as stored
    /// elsewhere).
    resident: u64,
    /// Tokens of the last forward (what the routing read-backs cover); `usize::MAX` before
    /// the first.
    last_tokens: std::sync::atomic::AtomicUsize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for PreparedLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PreparedLayer({} up to {} tokens, {} activations)",
            self.dev.kind(),
            self.max_tokens,
            self.dtype
        )
    }
}

/// The routing of the last forward, read back on request.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingOutput {
    /// `[T, slots]`.
    pub topk_ids: Vec<u32>,
    /// `[T, slots]`, the weights applied (0 where dropped).
    pub topk_weights: Vec<f32>,
    /// `[T, slots]`, 1 where kept.
    pub kept: Vec<u32>,
    /// `[E]`, kept assignments per expert.
    pub counts: Vec<u32>,
}

impl PreparedLayer {
    /// The activation dtype of `x`, `y` and every activation-sized intermediate.
    pub fn act_dtype(&self) -> DType {
        self.dtype
    }

    /// The most tokens one forward may have.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Bytes of the layer's weights held on the backend.
    pub fn weight_bytes(&self) -> u64 {
        self.resident
    }

    /// The backend this layer runs on.
    pub fn backend(&self) -> &Backend {
        &self.dev
    }

    /// H, the width of `x` and `y`.
    #[cfg(feature = "candle")]
    pub(crate) fn hidden(&self) -> usize {
        self.hidden
    }

    /// E, the number of routed experts.
    #[cfg(feature = "candle")]
    pub(crate) fn experts(&self) -> usize {
        self.experts
    }

    /// Assignments per token (`top_k`, or E for expert choice).
    #[cfg(feature = "candle")]
    pub(crate) fn slots(&self) -> usize {
        self.slots
    }

    /// Bytes of device memory the workspace holds (0 on the CPU).
    pub fn workspace_bytes(&self) -> u64 {
        match self.inner.lock().as_deref() {
            #[cfg(feature = "wgpu")]
            Ok(Inner::Wgpu(b)) => b.1.bytes(),
            _ => 0,
        }
    }

    /// Buffers the device handle has created so far (wgpu only; `None` elsewhere): a forward
    /// on a prepared layer adds none on the device-resident path.
    pub fn device_allocations(&self) -> Option<u64> {
        match &self.dev.device {
            #[cfg(feature = "wgpu")]
            Device::Wgpu(d) => Some(d.allocations()),
            _ => None,
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        let poisoned = || Error::Usage("a previous forward on this prepared layer panicked".into());
        #[cfg(target_arch = "wasm32")]
        {
            // One thread: a held lock belongs to a forward that is awaiting the device.
            self.inner.try_lock().map_err(|e| match e {
                std::sync::TryLockError::Poisoned(_) => poisoned(),
                std::sync::TryLockError::WouldBlock => Error::Usage(
                    "another forward or read-back on this prepared layer is still running: \
                     await it first"
                        .into(),
                ),
            })
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            self.inner.lock().map_err(|_| poisoned())
        }
    }

    fn check_tokens(&self, t: usize) -> Result<()> {
        if t > self.max_tokens {
            return Err(Error::shape(
                Stage::Router,
                format!(
                    "a forward of {t} tokens exceeds the {} this layer was prepared for \
                     (MoeLayer::prepare's max_tokens)",
                    self.max_tokens
                ),
            ));
        }
        // Everything else was checked by `prepare` for max_tokens, and every buffer only grows
        // with T; the workspace is allocated, so free memory is not asked again.
        Ok(())
    }

    fn check_x(&self, x: &Tensor) -> Result<usize> {
        let t = x_tokens(x, self.hidden)?;
        if x.dtype() != self.dtype {
            return Err(Error::DtypeMismatch {
                what: format!(
                    "x of a layer prepared for {} activations (cast x, or prepare for {})",
                    self.dtype,
                    x.dtype()
                ),
                expected: self.dtype,
                got: x.dtype(),
            });
        }
        self.check_tokens(t)?;
        Ok(t)
    }

    /// One forward of the host tensor `x` `[T, H]` (in the activation dtype): uploads `x`,
    /// runs the forward, waits, and reads `y` and the routing back. Blocks
    /// ([`PreparedLayer::forward_async`] under [`crate::asynch::block_on`]).
    pub fn forward(&self, x: &Tensor) -> Result<ForwardOutput> {
        crate::asynch::block_on("PreparedLayer::forward", self.forward_async(x))
    }

    /// [`PreparedLayer::forward`] without blocking: the submission and the read-backs of `y`,
    /// the routing and the stage timestamps are awaited. A second forward on the same
    /// prepared layer while one is awaiting is an [`Error::Usage`] on wasm32 (nothing may
    /// wait for the lock there); natively it waits for the first.
    // The workspace lock is held across the awaits on purpose: it serialises forwards exactly
    // as the blocking API did, and on wasm32 it is only ever taken with `try_lock`.
    #[allow(clippy::await_holding_lock)]
    pub async fn forward_async(&self, x: &Tensor) -> Result<ForwardOutput> {
        let t = self.check_x(x)?;
        let start = Instant::now();
        let mut inner = self.lock()?;
        let plan = Plan {
            tokens: t,
            ..self.plan
        };
        let (y, stage_times, wall) = match &mut *inner {
            Inner::Cpu(b) => {
                let (res, ws) = &mut **b;
                let mut y = Vec::new();
                device::forward(&CpuStages, &mut (), res, ws, plan, x, &mut y)?;
                let wall = start.elapsed();
                let times = Stage::ALL
                    .iter()
                    .enumerate()
                    .filter_map(|(i, &s)| match (ws.marks[i], ws.marks[i + 1]) {
                        (Some(a), Some(b)) => Some((s, b.duration_since(a))),
                        _ => None,
                    })
                    .collect();
                (y, times, wall)
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda(b) => {
                let Device::Cuda(d) = &self.dev.device else {
                    return Err(Error::Usage("prepared layer lost its CUDA device".into()));
                };
                crate::cuda::device::forward_host(d, &b.0, &mut b.1, plan, x)?
            }
            #[cfg(feature = "wgpu")]
            Inner::Wgpu(b) => {
                let Device::Wgpu(d) = &self.dev.device else {
                    return Err(Error::Usage("prepared layer lost its wgpu device".into()));
                };
                crate::wgpu::asynch::forward_host_async(d, &b.0, &mut b.1, plan, x).await?
            }
        };
        self.last_tokens
            .store(t, std::sync::atomic::Ordering::Relaxed);
        let routing = self.read_routing_locked(&inner, t).await?;
        Ok(ForwardOutput {
            tokens: t,
            hidden: self.hidden,
            slots: self.slots,
            dtype: self.dtype,
            y,
            topk_ids: routing.topk_ids,
            topk_weights: routing.topk_weights,
            kept: routing.kept,
            counts: routing.counts,
            stage_times,
            wall_time: wall,
        })
    }

    /// Records one forward of `tokens` tokens into the caller's `enc`: `x` `[T, H]` is read from
    /// `(buffer, byte offset)` and `y` `[T, H]` written to `(buffer, byte offset)`, both dense
    /// in [`PreparedLayer::act_dtype`] (f32: one element per 4 bytes; f16 / bf16: 2 bytes each).
    /// The caller submits `enc`. Nothing is allocated, uploaded or read back; the routing stays
    /// on the device ([`PreparedLayer::read_routing`] after the submission).
    ///
    /// Requirements, checked: the backend is wgpu ([`Backend::from_wgpu`] for the caller's own
    /// device) and both buffers belong to its device; offsets are multiples of 4; each region
    /// spans whole u32 words (`ceil(T·H·size / 4)·4` bytes: with a 16-bit dtype and `T·H` odd,
    /// the last 2 bytes of `y`'s region are written as padding); `x` has `COPY_SRC` and `y`
    /// `COPY_DST` usage. Not checkable, so the caller's part: `enc` comes from the same
    /// device, neither buffer is mapped or destroyed at submission, and a recorded forward
    /// is submitted before the next forward of this prepared layer is recorded (the
    /// per-forward parameters are written with `Queue::write_buffer`, which applies at the
    /// next submission).
    #[cfg(feature = "wgpu")]
    pub fn forward_wgpu(
        &self,
        enc: &mut ::wgpu::CommandEncoder,
        x: (&::wgpu::Buffer, u64),
        y: (&::wgpu::Buffer, u64),
        tokens: usize,
    ) -> Result<()> {
        self.check_tokens(tokens)?;
        let mut inner = self.lock()?;
        let (Inner::Wgpu(b), Device::Wgpu(d)) = (&mut *inner, &self.dev.device) else {
            return Err(Error::Usage(format!(
                "forward_wgpu needs a layer prepared on a wgpu backend, not {}",
                self.dev.kind()
            )));
        };
        let plan = Plan {
            tokens,
            ..self.plan
        };
        crate::wgpu::device::forward_device(d, &b.0, &mut b.1, plan, enc, x, y, self.hidden)?;
        self.last_tokens
            .store(tokens, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Enqueues one forward of `tokens` tokens on the backend's CUDA stream, reading `x`
    /// `[T, H]` from the caller's view and writing `y` `[T, H]` into the caller's view, both
    /// dense with elements of [`PreparedLayer::act_dtype`] (`f32`, `half::f16` or
    /// `half::bf16`). No synchronisation, allocation or copy: the stream orders it after the
    /// caller's earlier work and before its later work; the routing stays on the device
    /// ([`PreparedLayer::read_routing`] synchronises). The views must belong to the backend's
    /// context (build the backend with [`Backend::from_cuda_stream`] on the runtime's stream).
    #[cfg(feature = "cuda")]
    pub fn forward_cuda<T: crate::tensor::Element>(
        &self,
        x: &cudarc::driver::CudaView<'_, T>,
        y: &mut cudarc::driver::CudaViewMut<'_, T>,
        tokens: usize,
    ) -> Result<()> {
        use crate::cuda::act::{ActView, ActViewMut};
        self.check_device_io(T::DTYPE, x.len(), y.len(), tokens)?;
        let n = tokens * self.hidden;
        // SAFETY: a view of n elements of T is n · size_of::<T>() bytes of the same memory;
        // u8 has no invalid bit patterns (ActView's header: raw bytes + dtype).
        let xb = unsafe { x.transmute::<u8>(n * T::DTYPE.size()) };
        // SAFETY: as above, for the caller's writable view.
        let yb = unsafe { y.transmute_mut::<u8>(n * T::DTYPE.size()) };
        let (Some(xb), Some(yb)) = (xb, yb) else {
            return Err(Error::shape(Stage::Router, "x or y view is too small"));
        };
        if let Device::Cuda(d) = &self.dev.device {
            use cudarc::driver::DevicePtr;
            if n > 0 {
                d.check_pointer(xb.device_ptr(&d.stream).0, "x")?;
                d.check_pointer(yb.device_ptr(&d.stream).0, "y")?;
            }
        }
        let xv = ActView {
            bytes: xb,
            dtype: T::DTYPE,
        };
        let yv = ActViewMut {
            bytes: yb,
            dtype: T::DTYPE,
        };
        self.run_cuda(tokens, &xv, yv)
    }

    /// [`PreparedLayer::forward_cuda`] on raw device pointers, for runtimes on other CUDA
    /// bindings: `x` and `y` hold `tokens · H` dense elements of [`PreparedLayer::act_dtype`].
    ///
    /// # Safety
    /// `x` and `y` must be device allocations in the backend's CUDA context holding at least
    /// `tokens · H · size` bytes each, not overlapping; `x` must stay unmodified and both must
    /// stay allocated until the work enqueued on `stream` has finished. `stream` must be the
    /// backend's stream (checked: another stream is an error, since nothing would order the
    /// launches after the caller's work).
    #[cfg(feature = "cuda")]
    pub unsafe fn forward_cuda_raw(
        &self,
        x: cudarc::driver::sys::CUdeviceptr,
        y: cudarc::driver::sys::CUdeviceptr,
        tokens: usize,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        use crate::cuda::act::{ActView, ActViewMut};
        use crate::cuda::device::raw_view;
        let Device::Cuda(d) = &self.dev.device else {
            return Err(self.not_cuda());
        };
        if stream != d.stream.cu_stream() {
            return Err(Error::Usage(
                "forward_cuda_raw: the stream is not this backend's stream (build the backend \
                 with Backend::from_cuda_stream on it)"
                    .into(),
            ));
        }
        // T within max_tokens first: then T x H fits (the workspace holds it).
        self.check_tokens(tokens)?;
        let n = tokens * self.hidden;
        self.check_device_io(self.dtype, n, n, tokens)?;
        if n > 0 {
            d.check_pointer(x, "x")?;
            d.check_pointer(y, "y")?;
        }
        // SAFETY: forwarded from this function's contract; the Borrowed guards never free.
        let (xs, xbytes) = unsafe { raw_view(d, x, n, self.dtype)? };
        // SAFETY: as above, for y.
        let (mut ys, ybytes) = unsafe { raw_view(d, y, n, self.dtype)? };
        let xv = ActView {
            bytes: xs.slice().slice(0..xbytes),
            dtype: self.dtype,
        };
        let yv = ActViewMut {
            bytes: ys.slice_mut().slice_mut(0..ybytes),
            dtype: self.dtype,
        };
        self.run_cuda(tokens, &xv, yv)
    }

    #[cfg(feature = "cuda")]
    fn not_cuda(&self) -> Error {
        Error::Usage(format!(
            "a CUDA forward needs a layer prepared on a CUDA backend, not {}",
            self.dev.kind()
        ))
    }

    /// Checks a device-resident forward's dtype, token count and buffer sizes.
    #[cfg(feature = "cuda")]
    fn check_device_io(&self, dtype: DType, x_len: usize, y_len: usize, t: usize) -> Result<()> {
        if dtype != self.dtype {
            return Err(Error::DtypeMismatch {
                what: format!("x and y of a layer prepared for {} activations", self.dtype),
                expected: self.dtype,
                got: dtype,
            });
        }
        self.check_tokens(t)?;
        let n = t.saturating_mul(self.hidden);
        if x_len < n || y_len < n {
            return Err(Error::shape(
                Stage::Router,
                format!("x and y must hold T x H = {n} elements; they hold {x_len} and {y_len}"),
            ));
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn run_cuda(
        &self,
        tokens: usize,
        x: &crate::cuda::act::ActView<'_>,
        y: crate::cuda::act::ActViewMut<'_>,
    ) -> Result<()> {
        let mut inner = self.lock()?;
        let (Inner::Cuda(b), Device::Cuda(d)) = (&mut *inner, &self.dev.device) else {
            return Err(self.not_cuda());
        };
        let plan = Plan {
            tokens,
            ..self.plan
        };
        crate::cuda::device::forward_device(d, &b.0, &mut b.1, plan, x, y)?;
        self.last_tokens
            .store(tokens, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Device-to-device copies of the routing of the last forward (`tokens` tokens) into new
    /// allocations on the backend's stream, enqueued there: (ids, weights, kept, counts).
    /// Nothing is read back or synchronised.
    #[cfg(feature = "candle-cuda")]
    #[allow(clippy::type_complexity)]
    pub(crate) fn routing_cuda(
        &self,
        tokens: usize,
    ) -> Result<(
        cudarc::driver::CudaSlice<u32>,
        cudarc::driver::CudaSlice<f32>,
        cudarc::driver::CudaSlice<u32>,
        cudarc::driver::CudaSlice<u32>,
    )> {
        use crate::cuda::context::drv;
        let inner = self.lock()?;
        let (Inner::Cuda(b), Device::Cuda(d)) = (&*inner, &self.dev.device) else {
            return Err(self.not_cuda());
        };
        let n = tokens * self.slots;
        let g = &b.1.gate;
        let what = "copying the routing";
        Ok((
            drv(d.stream.clone_dtod(&g.topk_ids.slice(0..n)), what)?,
            drv(d.stream.clone_dtod(&g.topk_weights.slice(0..n)), what)?,
            drv(d.stream.clone_dtod(&g.kept.slice(0..n)), what)?,
            drv(d.stream.clone_dtod(&g.counts.slice(0..self.experts)), what)?,
        ))
    }

    /// Reads back the routing of the last forward (ids, weights, kept flags, expert counts):
    /// waits for the device (blocks: [`PreparedLayer::read_routing_async`] under
    /// [`crate::asynch::block_on`]).
    pub fn read_routing(&self) -> Result<RoutingOutput> {
        crate::asynch::block_on("PreparedLayer::read_routing", self.read_routing_async())
    }

    /// [`PreparedLayer::read_routing`] without blocking.
    #[allow(clippy::await_holding_lock)] // as in `forward_async`
    pub async fn read_routing_async(&self) -> Result<RoutingOutput> {
        let inner = self.lock()?;
        let t = self.last_tokens.load(std::sync::atomic::Ordering::Relaxed);
        if t == usize::MAX {
            return Err(Error::Usage(
                "read_routing: no forward has run on this prepared layer yet".into(),
            ));
        }
        self.read_routing_locked(&inner, t).await
    }

    // The CPU holds exactly the last forward's routing; the GPU workspaces need `t`.
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(unused_variables))]
    async fn read_routing_locked(&self, inner: &Inner, t: usize) -> Result<RoutingOutput> {
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        let n = t * self.slots;
        match inner {
            Inner::Cpu(b) => {
                let g = &b.1.gate;
                Ok(RoutingOutput {
                    topk_ids: g.topk_ids.clone(),
                    topk_weights: g.topk_weights.clone(),
                    kept: g.kept.clone(),
                    counts: g.counts.clone(),
                })
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda(b) => {
                let Device::Cuda(d) = &self.dev.device else {
                    return Err(Error::Usage("prepared layer lost its CUDA device".into()));
                };
                let g = &b.1.gate;
                Ok(RoutingOutput {
                    topk_ids: d.read(&g.topk_ids, n)?,
                    topk_weights: d.read(&g.topk_weights, n)?,
                    kept: d.read(&g.kept, n)?,
                    counts: d.read(&g.counts, self.experts)?,
                })
            }
            #[cfg(feature = "wgpu")]
            Inner::Wgpu(b) => {
                let Device::Wgpu(d) = &self.dev.device else {
                    return Err(Error::Usage("prepared layer lost its wgpu device".into()));
                };
                let g = &b.1.gate;
                Ok(RoutingOutput {
                    topk_ids: d.read_prefix_async(&g.topk_ids, n).await?,
                    topk_weights: d.read_prefix_async(&g.topk_weights, n).await?,
                    kept: d.read_prefix_async(&g.kept, n).await?,
                    counts: d.read_prefix_async(&g.counts, self.experts).await?,
                })
            }
        }
    }
}

/// T of an input `x` that must be `[T, hidden]`.
fn x_tokens(x: &Tensor, hidden: usize) -> Result<usize> {
    match x.shape() {
        [t, h] if *h == hidden => Ok(*t),
        s => Err(Error::shape(
            Stage::Router,
            format!("x must be [T, H] with H = {hidden}, got shape {s:?}"),
        )),
    }
}

/// An error's message without its "stage: " prefix, for re-wrapping as a weights error.
fn strip_stage(e: &Error) -> String {
    match e {
        Error::Shape { what, .. } => what.clone(),
        other => other.to_string(),
    }
}
