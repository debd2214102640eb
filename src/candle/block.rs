//! [`MoeBlock`]: the candle-facing MoE block. It keeps the layer's host weights and one
//! [`PreparedLayer`] per place (host or CUDA stream) and activation dtype it has run in.

use std::sync::{Arc, Mutex};

use candle_core::{DType as CDType, Device, Tensor};
use candle_nn::var_builder::{Backend as VbBackend, VarBuilderArgs};

use super::convert::act_dtype;
use crate::backend::{Backend, BackendKind};
use crate::error::{Error, Result};
use crate::layer::{MoeLayer, PreparedLayer};
use crate::stage::Stage;
use crate::tensor::DType;

/// The fewest tokens a block prepares a layer for (see [`MoeBlock::with_max_tokens`]).
pub const DEFAULT_MAX_TOKENS: usize = 512;

/// Where a prepared layer takes its inputs from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    /// CPU tensors, run on the block's host backend.
    Host,
    /// CUDA tensors of the stream with this raw handle.
    #[cfg(feature = "cuda")]
    Cuda(usize),
}

/// One prepared layer of the block.
struct Entry {
    place: Place,
    prepared: Arc<PreparedLayer>,
}

/// The routing of a forward, as candle tensors on `x`'s device (`N` = tokens, the product of
/// `x`'s leading dimensions; `slots` = `top_k`, or E for expert choice).
#[derive(Debug, Clone)]
pub struct Routing {
    /// `[N, slots]` u32: the expert of each assignment, picks in descending score order.
    pub topk_ids: Tensor,
    /// `[N, slots]` f32: the weight applied to each assignment (0 where dropped).
    pub topk_weights: Tensor,
    /// `[N, slots]` u32: 1 where the assignment was kept (capacity, expert choice), else 0.
    pub kept: Tensor,
    /// `[E]` u32: kept assignments per expert (load statistics).
    pub counts: Tensor,
}

/// An MoE block over this crate's kernels for candle models: `forward(x)` with `x` `[..., H]`
/// in f32, f16 or bf16 on the CPU (feature `candle`) or on CUDA (feature `candle-cuda`).
///
/// The block prepares its layer on first use for each place (the host backend, or each CUDA
/// stream) and activation dtype: weights uploaded once, one workspace for up to
/// `max(`[`DEFAULT_MAX_TOKENS`]` or `[`MoeBlock::with_max_tokens`]`, T)` tokens. A later
/// forward with more tokens prepares again for twice as many (uploading the weights again):
/// set `with_max_tokens` to the largest batch a runtime runs. Forwards are deterministic: the
/// same input gives bitwise the same output, whatever else shares the batch (except through
/// capacity, which is defined on the batch).
pub struct MoeBlock {
    /// The host weights, to prepare from; `None` for a block made from a prepared layer.
    layer: Option<MoeLayer>,
    hidden: usize,
    experts: usize,
    slots: usize,
    /// Where CPU tensors run: the CPU backend when `None`.
    host: Option<Backend>,
    /// The fewest tokens a layer is prepared for.
    max_tokens: usize,
    cache: Mutex<Vec<Entry>>,
    /// Held by a CUDA forward from its launches to its routing copies.
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    run: Mutex<()>,
}

impl std::fmt::Debug for MoeBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MoeBlock(E = {}, H = {}, {} slots per token, host backend {})",
            self.experts,
            self.hidden,
            self.slots,
            self.host.as_ref().map_or(BackendKind::Cpu, Backend::kind)
        )
    }
}

impl MoeBlock {
    /// The MoE block of decoder layer `layer`, read from `vb` (a `VarBuilder` at
    /// `model.layers.{layer}`) with the Hugging Face names of the family in `config` (the
    /// model's config.json, parsed) and the routing it configures: see [`super::read_layer`]
    /// for the names, dtypes and errors.
    ///
    /// ```no_run
    /// # fn main() -> candle_core::Result<()> {
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::VarBuilder;
    /// use moe_kernels::candle::MoeBlock;
    ///
    /// let config: serde_json::Value =
    ///     serde_json::from_str(&std::fs::read_to_string("model/config.json")?)
    ///         .map_err(candle_core::Error::wrap)?;
    /// // SAFETY: the files are not modified while mapped.
    /// let vb = unsafe {
    ///     VarBuilder::from_mmaped_safetensors(&["model/model.safetensors"], DType::BF16, &Device::Cpu)?
    /// };
    /// let block = MoeBlock::new(&config, 3, vb.pp("model.layers.3"))?;
    /// let x = Tensor::zeros((2, 5, block.hidden_size()), DType::BF16, &Device::Cpu)?;
    /// let y = block.forward(&x)?; // [2, 5, H], bf16
    /// # Ok(()) }
    /// ```
    pub fn new<B: VbBackend>(
        config: &serde_json::Value,
        layer: usize,
        vb: VarBuilderArgs<'_, B>,
    ) -> candle_core::Result<Self> {
        Ok(Self::from_layer(super::read_layer(config, layer, &vb)?))
    }

    /// A block over `layer` (from [`MoeLayer::from_checkpoint`], [`MoeLayer::load`] or built
    /// any other way, quantized expert weights included). CPU tensors run on the CPU backend
    /// until [`MoeBlock::with_host_backend`] says otherwise.
    pub fn from_layer(layer: MoeLayer) -> Self {
        let dims = layer.dims();
        MoeBlock {
            hidden: dims.hidden,
            experts: dims.experts,
            slots: layer.config.routing.slots(dims.experts),
            layer: Some(layer),
            host: None,
            max_tokens: DEFAULT_MAX_TOKENS,
            cache: Mutex::new(Vec::new()),
            run: Mutex::new(()),
        }
    }

    /// A block over a layer already prepared by the caller (no host copy of the weights is
    /// kept): it runs CPU tensors when `prepared` is on the CPU or wgpu, and CUDA tensors of
    /// `prepared`'s stream when it is on CUDA (prepare it on `Backend::from_cuda_stream` of
    /// candle's `CudaDevice::cuda_stream()`), in `prepared`'s activation dtype and for up to
    /// its `max_tokens` tokens. Anything else is an error naming what it was prepared for.
    pub fn from_prepared(prepared: PreparedLayer) -> Self {
        let place = match &prepared.backend().device {
            #[cfg(feature = "cuda")]
            crate::backend::Device::Cuda(d) => Place::Cuda(d.stream.cu_stream() as usize),
            _ => Place::Host,
        };
        MoeBlock {
            layer: None,
            hidden: prepared.hidden(),
            experts: prepared.experts(),
            slots: prepared.slots(),
            host: Some(prepared.backend().clone()),
            max_tokens: prepared.max_tokens(),
            cache: Mutex::new(vec![Entry {
                place,
                prepared: Arc::new(prepared),
            }]),
            run: Mutex::new(()),
        }
    }

    /// Runs CPU tensors on `backend` (e.g. `Backend::new(BackendKind::Wgpu)`) instead of the
    /// CPU backend. Layers already prepared for CPU tensors are dropped. A block made with
    /// [`MoeBlock::from_prepared`] keeps its layer: only a block with host weights re-prepares.
    pub fn with_host_backend(mut self, backend: Backend) -> Self {
        if self.layer.is_some() {
            self.host = Some(backend);
            if let Ok(cache) = self.cache.get_mut() {
                cache.retain(|e| e.place != Place::Host);
            }
        }
        self
    }

    /// Prepares layers for at least `tokens` tokens (default [`DEFAULT_MAX_TOKENS`]): the
    /// workspace a GPU keeps per prepared layer grows with it.
    pub fn with_max_tokens(mut self, tokens: usize) -> Self {
        self.max_tokens = tokens;
        self
    }

    /// The layer's host weights and config (`None` for a block made from a prepared layer).
    pub fn layer(&self) -> Option<&MoeLayer> {
        self.layer.as_ref()
    }

    /// H, the last dimension of `x` and `y`.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// E, the number of routed experts.
    pub fn num_experts(&self) -> usize {
        self.experts
    }

    /// Assignments per token in [`Routing`] (`top_k`, or E for expert choice).
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// `y` = the MoE block of `x` `[..., H]` (f32, f16 or bf16, on the CPU or CUDA): same
    /// shape, dtype and device as `x`. On CUDA nothing is copied or read back: the forward is
    /// enqueued on `x`'s stream and `y` is a new tensor of candle's in the same memory pool.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.run(x, false)?.0)
    }

    /// [`MoeBlock::forward`] and the routing it applied, as tensors on `x`'s device (on CUDA
    /// copied device to device out of the workspace; nothing is read back).
    pub fn forward_with_routing(&self, x: &Tensor) -> candle_core::Result<(Tensor, Routing)> {
        let (y, routing) = self.run(x, true)?;
        match routing {
            Some(r) => Ok((y, r)),
            None => Err(Error::Usage("the forward returned no routing".into()).into()),
        }
    }

    fn run(&self, x: &Tensor, routing: bool) -> candle_core::Result<(Tensor, Option<Routing>)> {
        let dims = x.dims();
        if dims.last() != Some(&self.hidden) {
            return Err(Error::shape(
                Stage::Router,
                format!(
                    "x must be [..., H] with H = {}, got shape {dims:?}",
                    self.hidden
                ),
            )
            .into());
        }
        let tokens = x.elem_count() / self.hidden;
        let dtype = act_dtype(x.dtype(), "x of the candle MoeBlock")?;
        if tokens == 0 {
            return Ok((
                x.clone(),
                routing
                    .then(|| self.empty_routing(x.device()))
                    .transpose()?,
            ));
        }
        match x.device() {
            Device::Cpu => super::host::forward(self, x, tokens, dtype, routing),
            #[cfg(feature = "candle-cuda")]
            Device::Cuda(dev) => super::cuda::forward(self, x, dev, tokens, dtype, routing),
            #[allow(unreachable_patterns)] // without candle-cuda, CUDA tensors land here too
            other => Err(Error::BackendUnavailable {
                backend: BackendKind::Cuda,
                reason: format!(
                    "x is on {:?}: the candle MoeBlock runs CPU tensors{}",
                    other.location(),
                    if cfg!(feature = "candle-cuda") {
                        " and CUDA tensors"
                    } else {
                        " (CUDA tensors need moe-kernels' `candle-cuda` feature)"
                    }
                ),
            }
            .into()),
        }
    }

    fn empty_routing(&self, dev: &Device) -> candle_core::Result<Routing> {
        let ids = Tensor::zeros((0, self.slots), CDType::U32, dev)?;
        Ok(Routing {
            topk_ids: ids.clone(),
            topk_weights: Tensor::zeros((0, self.slots), CDType::F32, dev)?,
            kept: ids,
            counts: Tensor::zeros(self.experts, CDType::U32, dev)?,
        })
    }

    /// The layer prepared for `place` and `dtype` and at least `tokens` tokens: the cached one,
    /// or one prepared now on the place's backend (`backend` makes it the first time).
    pub(super) fn prepared(
        &self,
        place: Place,
        backend: impl FnOnce() -> Result<Backend>,
        dtype: DType,
        tokens: usize,
    ) -> Result<Arc<PreparedLayer>> {
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| Error::Usage("a previous forward on this MoeBlock panicked".into()))?;
        let found = cache
            .iter()
            .position(|e| e.place == place && e.prepared.act_dtype() == dtype);
        if let Some(i) = found {
            if tokens <= cache[i].prepared.max_tokens() {
                return Ok(cache[i].prepared.clone());
            }
        }
        let Some(layer) = &self.layer else {
            return Err(Error::Usage(format!(
                "this MoeBlock was built from a layer prepared for {} activations on {} (up to \
                 {} tokens); got {tokens} tokens of {dtype} {}",
                cache.first().map_or(DType::F32, |e| e.prepared.act_dtype()),
                cache
                    .first()
                    .map_or(BackendKind::Cpu, |e| e.prepared.backend().kind()),
                self.max_tokens,
                match place {
                    Place::Host => "on the CPU",
                    #[cfg(feature = "cuda")]
                    Place::Cuda(_) => "on a CUDA stream",
                }
            )));
        };
        let (dev, least) = match found {
            Some(i) => (
                cache[i].prepared.backend().clone(),
                cache[i].prepared.max_tokens().saturating_mul(2),
            ),
            None => (backend()?, 0),
        };
        let max = tokens.max(self.max_tokens).max(least);
        let prepared = Arc::new(layer.prepare(&dev, max, dtype)?);
        match found {
            Some(i) => cache[i].prepared = prepared.clone(),
            None => cache.push(Entry {
                place,
                prepared: prepared.clone(),
            }),
        }
        Ok(prepared)
    }

    /// Serialises a forward with the routing copies that follow it.
    #[cfg(feature = "candle-cuda")]
    pub(super) fn lock_run(&self) -> Result<std::sync::MutexGuard<'_, ()>> {
        self.run
            .lock()
            .map_err(|_| Error::Usage("a previous forward on this MoeBlock panicked".into()))
    }

    /// The backend CPU tensors run on.
    pub(super) fn host_backend(&self) -> Result<Backend> {
        match &self.host {
            Some(b) => Ok(b.clone()),
            None => Backend::new(BackendKind::Cpu),
        }
    }
}

impl candle_core::Module for MoeBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        MoeBlock::forward(self, xs)
    }
}
