//! A whole MoE layer: weights under the canonical names of DESIGN.md section 4, its config,
//! and the forward pass on a [`Backend`] (stage by stage) or as the pure f64 reference.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::backend::{Backend, BackendKind, Device, GateBuffers, PermuteBuffers};
use crate::config::LayerConfig;
use crate::cpu;
use crate::cpu::combine::{Assignments, SharedInput};
use crate::cpu::expert_gemm::{ExpertDims, ExpertWeights};
use crate::cpu::gate::Routing;
use crate::error::{Error, Result};
use crate::io;
use crate::limits::{self, Footprint, LayerShape};
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
    pub config: LayerConfig,
    /// `[E, H]`.
    pub router_weight: Tensor,
    /// `[E]`.
    pub router_bias: Option<Tensor>,
    /// `[E]`, added to the scores for selection only.
    pub score_correction_bias: Option<Tensor>,
    pub experts: ExpertWeights,
    pub shared: Option<SharedExpert>,
    dims: ExpertDims,
}

/// The outputs of a forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardOutput {
    pub tokens: usize,
    pub hidden: usize,
    /// Assignments per token (`top_k`, or E for expert choice).
    pub slots: usize,
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
    /// Time of each stage: host wall time on the CPU backend, GPU timestamps on wgpu (empty
    /// when the adapter has no timestamp queries).
    pub stage_times: Vec<(Stage, Duration)>,
    /// Wall time of the whole forward on the host (upload, launches, wait; not read-backs).
    pub wall_time: Duration,
}

/// The f64 reference's outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceOutput {
    /// `[T, H]`.
    pub y: Vec<f64>,
    pub routing: Routing,
}

fn weights_err(origin: &str, what: impl Into<String>) -> Error {
    Error::Weights {
        path: origin.to_string(),
        what: what.into(),
    }
}

/// A `[d0, d1]` tensor viewed as `[1, d0, d1]`.
fn as_one_expert(t: Tensor) -> Result<Tensor> {
    let mut shape = vec![1];
    shape.extend_from_slice(t.shape());
    Tensor::new(shape, t.data().clone())
}

impl MoeLayer {
    /// Loads a layer from a safetensors file with the canonical names.
    pub fn load(config: LayerConfig, path: &Path) -> Result<Self> {
        let tensors = io::load_tensors(path)?;
        Self::from_tensors(config, tensors, &path.display().to_string())
    }

    /// Builds a layer from named tensors; E, H, F and the optional parts are read off them.
    /// `origin` names the source in errors.
    pub fn from_tensors(
        config: LayerConfig,
        mut t: BTreeMap<String, Tensor>,
        origin: &str,
    ) -> Result<Self> {
        if let Some(extra) = t.keys().find(|k| !TENSOR_NAMES.contains(&k.as_str())) {
            return Err(weights_err(
                origin,
                format!(
                    "unexpected tensor {extra:?} (known: {})",
                    TENSOR_NAMES.join(", ")
                ),
            ));
        }
        let mut need = |name: &str| {
            t.remove(name)
                .ok_or_else(|| weights_err(origin, format!("missing tensor {name:?}")))
        };
        let router_weight = need("router.weight")?;
        let up = need("experts.up_proj")?;
        let down = need("experts.down_proj")?;
        let gated = config.activation.is_gated();
        let gate = t.remove("experts.gate_proj");
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
        let experts = ExpertWeights {
            gate,
            up,
            down,
            gate_bias: t.remove("experts.gate_proj_bias"),
            up_bias: t.remove("experts.up_proj_bias"),
            down_bias: t.remove("experts.down_proj_bias"),
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
        let shared = Self::take_shared(&mut t, &config, origin)?;
        let layer = MoeLayer {
            config,
            router_weight,
            router_bias: t.remove("router.bias"),
            score_correction_bias: t.remove("router.score_correction_bias"),
            experts,
            shared,
            dims,
        };
        layer.check(origin)?;
        Ok(layer)
    }

    fn take_shared(
        t: &mut BTreeMap<String, Tensor>,
        config: &LayerConfig,
        origin: &str,
    ) -> Result<Option<SharedExpert>> {
        let any = [
            "shared.gate_proj",
            "shared.up_proj",
            "shared.down_proj",
            "shared.gate.weight",
        ]
        .iter()
        .any(|n| t.contains_key(*n));
        if !any {
            return Ok(None);
        }
        let mut need = |name: &str| {
            t.remove(name).ok_or_else(|| {
                weights_err(
                    origin,
                    format!("missing tensor {name:?} (other shared.* tensors are present)"),
                )
            })
        };
        let up = need("shared.up_proj")?;
        let down = need("shared.down_proj")?;
        let gate = t.remove("shared.gate_proj");
        if config.activation.is_gated() != gate.is_some() {
            return Err(weights_err(
                origin,
                format!(
                    "shared.gate_proj must be present iff the activation is gated ({:?})",
                    config.activation
                ),
            ));
        }
        let rank2 = |name: &str, x: &Tensor| -> Result<()> {
            if x.shape().len() == 2 {
                Ok(())
            } else {
                Err(weights_err(
                    origin,
                    format!("{name} must be rank 2, got shape {:?}", x.shape()),
                ))
            }
        };
        rank2("shared.up_proj", &up)?;
        rank2("shared.down_proj", &down)?;
        if let Some(g) = &gate {
            rank2("shared.gate_proj", g)?;
        }
        let weights = ExpertWeights {
            gate: gate.map(as_one_expert).transpose()?,
            up: as_one_expert(up)?,
            down: as_one_expert(down)?,
            gate_bias: None,
            up_bias: None,
            down_bias: None,
        };
        weights
            .dims(config.activation)
            .map_err(|e| weights_err(origin, format!("shared expert: {}", strip_stage(&e))))?;
        Ok(Some(SharedExpert {
            weights,
            gate: t.remove("shared.gate.weight"),
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
                w.gate.as_ref(),
                Some(&w.up),
                Some(&w.down),
                w.gate_bias.as_ref(),
                w.up_bias.as_ref(),
                w.down_bias.as_ref(),
            ]
            .into_iter()
            .flatten()
            .map(bytes)
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

    /// The same layer with expert and shared-expert weights rounded to `dtype`. Router
    /// weights and biases stay as stored, since routing decisions are made on them.
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
        match x.shape() {
            [t, h] if *h == self.dims.hidden => Ok(*t),
            s => Err(Error::shape(
                Stage::Router,
                format!(
                    "x must be [T, H] with H = {}, got shape {s:?}",
                    self.dims.hidden
                ),
            )),
        }
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

    /// The layer made ready on `dev` (weights uploaded once for GPU backends); call
    /// [`PreparedLayer::forward`] as often as needed.
    pub fn prepare<'a>(&'a self, dev: &'a Backend) -> Result<PreparedLayer<'a>> {
        let resident = self.weight_bytes();
        dev.check_weights(resident)?;
        let inner = match &dev.device {
            Device::Cpu => Prepared::Staged,
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                Prepared::Cuda(Box::new(crate::cuda::layer::CudaLayer::upload(d, self)?))
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu(d) => {
                Prepared::Wgpu(Box::new(crate::wgpu::layer::WgpuLayer::upload(d, self)?))
            }
        };
        Ok(PreparedLayer {
            layer: self,
            dev,
            inner,
            resident,
        })
    }

    /// The forward pass on `dev` (prepares the layer first: for repeated forwards on a GPU,
    /// [`MoeLayer::prepare`] once instead).
    pub fn forward(&self, dev: &Backend, x: &Tensor) -> Result<ForwardOutput> {
        self.prepare(dev)?.forward(x)
    }

    /// The forward pass through the backend's stage calls, timing each stage on the host.
    fn forward_staged(&self, dev: &Backend, x: &Tensor) -> Result<ForwardOutput> {
        let start_all = Instant::now();
        let t = self.check_x(x)?;
        let (e, h) = (self.dims.experts, self.dims.hidden);
        let cfg = &self.config;
        let slots = cfg.routing.slots(e);
        let mut times = Vec::with_capacity(Stage::ALL.len());
        let mut timed = |stage: Stage, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
            let start = Instant::now();
            f()?;
            times.push((stage, start.elapsed()));
            Ok(())
        };

        let mut logits = vec![f32::NAN; t * e];
        let mut shared_g = self
            .shared
            .as_ref()
            .and_then(|s| s.gate.as_ref())
            .map(|_| vec![f32::NAN; t]);
        timed(Stage::Router, &mut || {
            dev.router(
                x,
                &self.router_weight,
                self.router_bias.as_ref(),
                &mut logits,
            )?;
            if let (Some(g), Some(out)) = (
                self.shared.as_ref().and_then(|s| s.gate.as_ref()),
                shared_g.as_mut(),
            ) {
                dev.router(x, g, None, out)?;
            }
            Ok(())
        })?;
        let mut gate = GateBuffers::poisoned(t, slots, e);
        timed(Stage::Gate, &mut || {
            dev.gate(
                &logits,
                self.score_correction_bias.as_ref(),
                &cfg.routing,
                &mut gate,
            )
        })?;
        let mut perm = PermuteBuffers::poisoned(t, slots, e, h);
        timed(Stage::Permute, &mut || dev.permute(&gate, x, &mut perm))?;
        let mut y_perm = vec![f32::NAN; t * slots * h];
        let mut shared_y = self.shared.as_ref().map(|_| vec![f32::NAN; t * h]);
        timed(Stage::ExpertGemm, &mut || {
            dev.expert_gemm(&perm, &self.experts, cfg.activation, &mut y_perm)?;
            if let (Some(s), Some(out)) = (&self.shared, shared_y.as_mut()) {
                dev.shared_expert(x, &s.weights, cfg.activation, out)?;
            }
            Ok(())
        })?;
        let mut y = vec![f32::NAN; t * h];
        let shared = shared_y.as_deref().map(|s| (s, shared_g.as_deref()));
        timed(Stage::Combine, &mut || {
            dev.combine(
                &y_perm,
                &gate,
                &perm,
                shared,
                cfg.output_scale as f32,
                &mut y,
            )
        })?;
        Ok(ForwardOutput {
            tokens: t,
            hidden: h,
            slots,
            y,
            topk_ids: gate.topk_ids,
            topk_weights: gate.topk_weights,
            kept: gate.kept,
            counts: gate.counts,
            stage_times: times,
            wall_time: start_all.elapsed(),
        })
    }
}

/// What a backend keeps of a prepared layer.
#[derive(Debug)]
enum Prepared {
    /// Stage-by-stage through the backend's calls (CPU).
    Staged,
    /// Weights resident on a CUDA device; one stream-ordered sequence of launches per forward.
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::layer::CudaLayer>),
    /// Weights resident on a wgpu device; one submission per forward.
    #[cfg(feature = "wgpu")]
    Wgpu(Box<crate::wgpu::layer::WgpuLayer>),
}

/// A layer ready to run on one backend.
#[derive(Debug)]
pub struct PreparedLayer<'a> {
    layer: &'a MoeLayer,
    dev: &'a Backend,
    inner: Prepared,
    /// Bytes of the weights this layer keeps on the backend.
    resident: u64,
}

impl PreparedLayer<'_> {
    /// One forward of `x` `[T, H]`.
    pub fn forward(&self, x: &Tensor) -> Result<ForwardOutput> {
        let t = self.layer.check_x(x)?;
        self.dev
            .check_forward(&self.layer.shape(), t, self.resident)?;
        match (&self.inner, &self.dev.device) {
            #[cfg(feature = "cuda")]
            (Prepared::Cuda(l), Device::Cuda(d)) => l.forward(d, x),
            #[cfg(feature = "wgpu")]
            (Prepared::Wgpu(l), Device::Wgpu(d)) => l.forward(d, x),
            _ => self.layer.forward_staged(self.dev, x),
        }
    }
}

/// An error's message without its "stage: " prefix, for re-wrapping as a weights error.
fn strip_stage(e: &Error) -> String {
    match e {
        Error::Shape { what, .. } => what.clone(),
        other => other.to_string(),
    }
}
