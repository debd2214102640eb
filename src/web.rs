//! JavaScript bindings (wasm-bindgen) for wasm32-unknown-unknown, feature `web`: the wgpu
//! backend on the browser's WebGPU and the f64 CPU reference, in one wasm module.
//!
//! ```js
//! import init, { Backend, Layer, parseInput } from "./pkg/moe_kernels.js";
//! await init();
//! const dev = await Backend.create("wgpu");               // or "cpu", "auto"
//! const layer = new Layer(weightsArrayBuffer, configJson); // canonical names (DESIGN.md §4)
//! const { x, tokens, dtype } = parseInput(inputArrayBuffer);
//! const run = await layer.prepare(dev, tokens, dtype);    // "f32" | "f16" | "bf16"
//! const out = await run.forward(x, tokens);               // Float32Array, or Uint16Array bits
//! out.y; out.topkIds; out.topkWeights; out.kept;           // typed arrays, row-major
//! const check = layer.check(x, tokens, dtype, out);       // against the f64 reference
//! ```
//!
//! Every call that can fail throws a JavaScript `Error` whose `name` is `"MoeError"`, whose
//! `kind` is the [`Error`] variant (`"Weights"`, `"ConfigJson"`, `"Limit"`, ...) and whose
//! `message` is the crate's own message. Nothing here blocks: the calls that wait for the GPU
//! return promises.

use std::rc::Rc;

use js_sys::{Array, Float32Array, Float64Array, Int32Array, Object, Reflect, Uint16Array};
use js_sys::{Uint32Array, Uint8Array};
use wasm_bindgen::prelude::*;

use crate::config::{LayerConfig, Preset};
use crate::device::BackendKind;
use crate::error::Error;
use crate::layer::{ForwardOutput, MoeLayer, PreparedLayer};
use crate::tensor::{DType, Tensor, TensorData};
use crate::Backend;

/// Sends Rust panics to the browser console (as `console.error`) with their message, instead
/// of a bare `unreachable` trap.
#[wasm_bindgen(start)]
pub fn start() {
    std::panic::set_hook(Box::new(|info| {
        web_sys::console::error_1(&JsValue::from_str(&format!("moe-kernels panicked: {info}")));
    }));
}

/// The crate's version (`Cargo.toml`).
#[wasm_bindgen]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// The [`Error`] variant's name, for the JS error's `kind`.
fn kind_of(e: &Error) -> &'static str {
    match e {
        Error::Shape { .. } => "Shape",
        Error::Usage(_) => "Usage",
        Error::WouldBlock(_) => "WouldBlock",
        Error::Config(_) => "Config",
        Error::ConfigJson { .. } => "ConfigJson",
        Error::Weights { .. } => "Weights",
        Error::Checkpoint { .. } => "Checkpoint",
        Error::Safetensors { .. } => "Safetensors",
        Error::Input { .. } => "Input",
        Error::Dtype { .. } => "Dtype",
        Error::DtypeMismatch { .. } => "DtypeMismatch",
        Error::Device { .. } => "Device",
        Error::BackendUnavailable { .. } => "BackendUnavailable",
        Error::Limit { .. } => "Limit",
        Error::Ep { .. } => "Ep",
        Error::Io { .. } => "Io",
    }
}

/// A JS `Error` named `MoeError` with the crate's message and the variant as `kind`.
fn js_err(e: Error) -> JsValue {
    let err = js_sys::Error::new(&e.to_string());
    err.set_name("MoeError");
    // Setting a property on a fresh Error object cannot fail.
    let _ = Reflect::set(&err, &"kind".into(), &kind_of(&e).into());
    err.into()
}

/// A usage error as a JS exception.
fn usage(msg: impl Into<String>) -> JsValue {
    js_err(Error::Usage(msg.into()))
}

fn set(obj: &Object, key: &str, value: impl Into<JsValue>) {
    // Setting a property on a plain object we created cannot fail.
    let _ = Reflect::set(obj, &JsValue::from_str(key), &value.into());
}

fn dtype_of(name: &str) -> Result<DType, JsValue> {
    name.parse::<DType>().map_err(js_err)
}

/// `x` `[tokens, hidden]` as a tensor: a `Float32Array` is f32; a `Uint16Array` holds the bits
/// of `dtype16` (f16 or bf16).
fn tensor_of(x: &JsValue, tokens: usize, hidden: usize, dtype16: DType) -> Result<Tensor, JsValue> {
    let data = if let Some(a) = x.dyn_ref::<Float32Array>() {
        TensorData::F32(a.to_vec())
    } else if let Some(a) = x.dyn_ref::<Uint16Array>() {
        let bits = a.to_vec();
        match dtype16 {
            DType::F16 => TensorData::F16(bits.into_iter().map(half::f16::from_bits).collect()),
            DType::BF16 => TensorData::BF16(bits.into_iter().map(half::bf16::from_bits).collect()),
            DType::F32 => {
                return Err(usage(
                    "x is a Uint16Array (f16 / bf16 bits) but the activations are f32: pass a \
                     Float32Array",
                ))
            }
        }
    } else {
        return Err(usage(
            "x must be a Float32Array, or a Uint16Array of f16 / bf16 bits",
        ));
    };
    Tensor::new(vec![tokens, hidden], data).map_err(js_err)
}

/// A tensor's values as the typed array of its dtype: `Float32Array`, or `Uint16Array` bits.
fn typed_of(t: &Tensor) -> JsValue {
    match t.data() {
        TensorData::F32(v) => Float32Array::from(v.as_slice()).into(),
        TensorData::F16(v) => Uint16Array::from(
            v.iter()
                .map(|x| x.to_bits())
                .collect::<Vec<u16>>()
                .as_slice(),
        )
        .into(),
        TensorData::BF16(v) => Uint16Array::from(
            v.iter()
                .map(|x| x.to_bits())
                .collect::<Vec<u16>>()
                .as_slice(),
        )
        .into(),
    }
}

fn i32s(v: &[u32]) -> Int32Array {
    Int32Array::from(v.iter().map(|&x| x as i32).collect::<Vec<i32>>().as_slice())
}

/// A device handle: WebGPU through wgpu, or the CPU reference.
#[wasm_bindgen(js_name = Backend)]
pub struct JsBackend {
    dev: Backend,
}

#[wasm_bindgen(js_class = Backend)]
impl JsBackend {
    /// Opens a backend: `"wgpu"` (the browser's WebGPU adapter), `"cpu"` (the f64 reference,
    /// stage by stage) or `"auto"` (WebGPU, else the CPU). Rejects with a `MoeError` when the
    /// kind cannot be created here (no `navigator.gpu`, no adapter, a refused device).
    pub async fn create(kind: String) -> Result<JsBackend, JsValue> {
        let dev = Backend::from_name_async(&kind).await.map_err(js_err)?;
        Ok(JsBackend { dev })
    }

    /// `"wgpu"` or `"cpu"`.
    #[wasm_bindgen(getter)]
    pub fn kind(&self) -> String {
        self.dev.kind().name().to_string()
    }

    /// The adapter's name, API and device type (`"host"` on the CPU).
    #[wasm_bindgen(getter)]
    pub fn adapter(&self) -> String {
        self.dev.adapter_name()
    }

    /// The optional device features in use: `"timestamp-query"` when per-stage GPU times
    /// are available, `"subgroups"` when the gate's per-token reductions use subgroup
    /// operations (same bits as the portable shaders). None is required; `shader-f16` is not
    /// used.
    #[wasm_bindgen(getter)]
    pub fn features(&self) -> Array {
        let out = Array::new();
        if let crate::backend::Device::Wgpu(d) = &self.dev.device {
            if d.device
                .features()
                .contains(::wgpu::Features::TIMESTAMP_QUERY)
            {
                out.push(&JsValue::from_str("timestamp-query"));
            }
            if d.subgroups {
                out.push(&JsValue::from_str("subgroups"));
            }
        }
        out
    }
}

/// A loaded, validated MoE layer (weights and config), on the host.
#[wasm_bindgen(js_name = Layer)]
pub struct JsLayer {
    layer: Rc<MoeLayer>,
}

#[wasm_bindgen(js_class = Layer)]
impl JsLayer {
    /// A layer from the bytes of a weights file with the canonical names (the file `moe run
    /// --weights` reads; an `ArrayBuffer` or `Uint8Array`) and a config JSON string (the file
    /// `moe run --config` reads). Throws a `MoeError` naming the tensor or key at fault.
    #[wasm_bindgen(constructor)]
    pub fn new(weights: &JsValue, config_json: &str) -> Result<JsLayer, JsValue> {
        let bytes = if weights.is_instance_of::<js_sys::ArrayBuffer>()
            || weights.is_instance_of::<Uint8Array>()
        {
            Uint8Array::new(weights).to_vec()
        } else {
            return Err(usage("weights must be an ArrayBuffer or a Uint8Array"));
        };
        let config = LayerConfig::from_json(config_json, "config").map_err(js_err)?;
        let tensors = crate::io::parse_file_tensors(&bytes, "weights").map_err(js_err)?;
        let layer = MoeLayer::from_file_tensors(config, tensors, "weights").map_err(js_err)?;
        Ok(JsLayer {
            layer: Rc::new(layer),
        })
    }

    /// The demo layer of `moe demo`: GPT-4-style (preset `gpt4`: 16 experts, top-2, SwiGLU),
    /// seeded random weights of `hidden` × `ffn` in `dtype` (`"f32"`, `"f16"`, `"bf16"`); the
    /// same seed gives the same layer as `moe demo --seed`.
    pub fn demo(hidden: usize, ffn: usize, dtype: &str, seed: u64) -> Result<JsLayer, JsValue> {
        let dtype = dtype_of(dtype)?;
        if hidden == 0 || ffn == 0 {
            return Err(usage("hidden and ffn must be at least 1"));
        }
        let layer = crate::synth::random_layer(
            Preset::Gpt4.config(),
            16,
            hidden,
            ffn,
            crate::synth::Extras::default(),
            dtype,
            seed,
        )
        .map_err(js_err)?;
        Ok(JsLayer {
            layer: Rc::new(layer),
        })
    }

    /// The demo input of `moe demo --seed`: `x` `[tokens, hidden]` uniform in [-1, 1], f32.
    #[wasm_bindgen(js_name = demoInput)]
    pub fn demo_input(tokens: usize, hidden: usize, seed: u64) -> Float32Array {
        Float32Array::from(
            crate::synth::random_x(tokens, hidden, seed)
                .to_f32_vec()
                .as_slice(),
        )
    }

    /// Experts E.
    #[wasm_bindgen(getter)]
    pub fn experts(&self) -> usize {
        self.layer.dims().experts
    }

    /// Model width H.
    #[wasm_bindgen(getter)]
    pub fn hidden(&self) -> usize {
        self.layer.dims().hidden
    }

    /// Expert FFN width F.
    #[wasm_bindgen(getter)]
    pub fn ffn(&self) -> usize {
        self.layer.dims().ffn
    }

    /// Assignments per token (`top_k`, or E for expert choice).
    #[wasm_bindgen(getter)]
    pub fn slots(&self) -> usize {
        self.layer.config.routing.slots(self.layer.dims().experts)
    }

    /// The expert weights' format: `f32`, `f16`, `bf16`, `fp8`, `mxfp4` or `int4`.
    #[wasm_bindgen(getter, js_name = weightFormat)]
    pub fn weight_format(&self) -> String {
        self.layer.experts.up.format_name().to_string()
    }

    /// Bytes of every weight as stored.
    #[wasm_bindgen(getter, js_name = weightBytes)]
    pub fn weight_bytes(&self) -> f64 {
        self.layer.weight_bytes() as f64
    }

    /// The full config as JSON (the preset expanded).
    #[wasm_bindgen(getter)]
    pub fn config(&self) -> String {
        self.layer.config.to_json()
    }

    /// Makes the layer ready on `backend` for forwards of up to `max_tokens` tokens with
    /// activations in `dtype` (`"f32"`, `"f16"`, `"bf16"`): uploads the weights and allocates
    /// one workspace. A promise of a [`JsPrepared`]; rejects with a `MoeError` (a limit of the
    /// adapter, a shader the browser refused, ...).
    pub fn prepare(
        &self,
        backend: &JsBackend,
        max_tokens: usize,
        dtype: &str,
    ) -> Result<js_sys::Promise, JsValue> {
        let dtype = dtype_of(dtype)?;
        let (layer, dev) = (self.layer.clone(), backend.dev.clone());
        Ok(wasm_bindgen_futures::future_to_promise(async move {
            let run = layer
                .prepare_async(&dev, max_tokens, dtype)
                .await
                .map_err(js_err)?;
            Ok(JsPrepared {
                run: Rc::new(run),
                hidden: layer.dims().hidden,
            }
            .into())
        }))
    }

    /// The f64 reference forward (no rounding between stages) of `x` `[tokens, H]`
    /// (`Float32Array`, or a `Uint16Array` of `dtype` bits): `{y: Float64Array, topkIds,
    /// topkWeights: Float64Array, kept, counts, ms}`.
    pub fn reference(&self, x: &JsValue, tokens: usize, dtype: &str) -> Result<Object, JsValue> {
        let x = tensor_of(x, tokens, self.hidden(), dtype_of(dtype)?)?;
        let start = web_time::Instant::now();
        let r = self.layer.forward_reference(&x).map_err(js_err)?;
        let obj = Object::new();
        set(&obj, "y", Float64Array::from(r.y.as_slice()));
        set(&obj, "topkIds", i32s(&r.routing.topk_ids));
        set(
            &obj,
            "topkWeights",
            Float64Array::from(r.routing.topk_weights.as_slice()),
        );
        let kept: Vec<u32> = r.routing.kept.iter().map(|&k| u32::from(k)).collect();
        set(&obj, "kept", i32s(&kept));
        set(
            &obj,
            "counts",
            Uint32Array::from(r.routing.counts.as_slice()),
        );
        set(&obj, "ms", start.elapsed().as_secs_f64() * 1e3);
        Ok(obj)
    }

    /// Checks a forward's output against the f64 reference of the same `x` (DESIGN.md
    /// section 5): `y` within the relative-L2 bound of the coarsest of the activation and
    /// expert-weight dtypes (f32 2e-5, f16 5e-3, bf16 1e-2; quantized weights: f32), every
    /// value finite, each token's set of (expert, kept) picks equal. Returns `{status: "PASS" |
    /// "FAIL", relL2, bound, topkSetsEqual, keptEqual, finite, referenceMs, message}`.
    pub fn check(
        &self,
        x: &JsValue,
        tokens: usize,
        dtype: &str,
        out: &JsOutput,
    ) -> Result<Object, JsValue> {
        let act = dtype_of(dtype)?;
        let x = tensor_of(x, tokens, self.hidden(), act)?;
        let start = web_time::Instant::now();
        let r = self.layer.forward_reference(&x).map_err(js_err)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let o = &out.out;
        let slots = o.slots;
        let rel = rel_l2(&o.y, &r.y);
        let weights = self
            .layer
            .experts
            .up
            .dense()
            .map_or(DType::F32, Tensor::dtype);
        let bound = tolerance(act).max(tolerance(weights));
        let finite = o.y.iter().all(|v| v.is_finite());
        let picks = |ids: &[u32], kept: &dyn Fn(usize) -> bool, t: usize| {
            let mut p: Vec<(u32, bool)> = (t * slots..(t + 1) * slots)
                .map(|i| (ids[i], kept(i)))
                .collect();
            p.sort_unstable();
            p
        };
        let (mut sets_equal, mut kept_equal) = (true, true);
        let same_len = o.topk_ids.len() == r.routing.topk_ids.len()
            && o.kept.len() == r.routing.kept.len()
            && o.topk_ids.len() == tokens * slots;
        if same_len {
            for t in 0..tokens {
                let got = picks(&o.topk_ids, &|i| o.kept[i] != 0, t);
                let want = picks(&r.routing.topk_ids, &|i| r.routing.kept[i], t);
                let ids = |p: &[(u32, bool)]| p.iter().map(|q| q.0).collect::<Vec<_>>();
                sets_equal &= ids(&got) == ids(&want);
                kept_equal &= got == want;
            }
        }
        let pass = same_len && sets_equal && kept_equal && finite && rel <= bound;
        let message = if pass {
            format!("rel L2 {rel:.3e} <= {bound:.0e}; top-k sets and kept equal")
        } else {
            let mut why = Vec::new();
            if !same_len {
                why.push("routing outputs have the wrong length".to_string());
            }
            if !sets_equal {
                why.push("a token's top-k set differs from the reference".into());
            }
            if sets_equal && !kept_equal {
                why.push("kept differs from the reference".into());
            }
            if !finite {
                why.push("y has non-finite values".into());
            }
            if rel > bound {
                why.push(format!("rel L2 {rel:.3e} > {bound:.0e}"));
            }
            why.join("; ")
        };
        let obj = Object::new();
        set(&obj, "status", if pass { "PASS" } else { "FAIL" });
        set(&obj, "relL2", rel);
        set(&obj, "bound", bound);
        set(&obj, "topkSetsEqual", sets_equal);
        set(&obj, "keptEqual", kept_equal);
        set(&obj, "finite", finite);
        set(&obj, "referenceMs", ms);
        set(&obj, "message", message);
        Ok(obj)
    }
}

/// Relative L2 distance `|a - b| / |b|`.
fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (f64::from(x) - y).powi(2);
        den += y * y;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// DESIGN.md section 5's relative-L2 bound for a dtype.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        DType::F16 => 5e-3,
        DType::BF16 => 1e-2,
    }
}

/// A layer ready on one backend for forwards of up to `maxTokens` tokens.
#[wasm_bindgen(js_name = Prepared)]
pub struct JsPrepared {
    run: Rc<PreparedLayer>,
    hidden: usize,
}

#[wasm_bindgen(js_class = Prepared)]
impl JsPrepared {
    /// One forward of `x` `[tokens, H]`: a `Float32Array` for f32 activations, a
    /// `Uint16Array` of f16 / bf16 bits for those. A promise of a [`JsOutput`]; rejects with a
    /// `MoeError` (wrong length or dtype, more tokens than prepared for, a device error).
    pub fn forward(&self, x: &JsValue, tokens: usize) -> Result<js_sys::Promise, JsValue> {
        let x = tensor_of(x, tokens, self.hidden, self.run.act_dtype())?;
        let run = self.run.clone();
        Ok(wasm_bindgen_futures::future_to_promise(async move {
            let out = run.forward_async(&x).await.map_err(js_err)?;
            Ok(JsOutput { out }.into())
        }))
    }

    /// The activation dtype: `"f32"`, `"f16"` or `"bf16"`.
    #[wasm_bindgen(getter)]
    pub fn dtype(&self) -> String {
        self.run.act_dtype().name().to_string()
    }

    /// The most tokens one forward may have.
    #[wasm_bindgen(getter, js_name = maxTokens)]
    pub fn max_tokens(&self) -> usize {
        self.run.max_tokens()
    }

    /// `"wgpu"` or `"cpu"`.
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        self.run.backend().kind().name().to_string()
    }

    /// Bytes of the layer's weights held on the backend.
    #[wasm_bindgen(getter, js_name = weightBytes)]
    pub fn weight_bytes(&self) -> f64 {
        self.run.weight_bytes() as f64
    }
}

/// The outputs of one forward, as typed arrays (row-major).
#[wasm_bindgen(js_name = Output)]
pub struct JsOutput {
    out: ForwardOutput,
}

#[wasm_bindgen(js_class = Output)]
impl JsOutput {
    /// Tokens T.
    #[wasm_bindgen(getter)]
    pub fn tokens(&self) -> usize {
        self.out.tokens
    }

    /// Model width H.
    #[wasm_bindgen(getter)]
    pub fn hidden(&self) -> usize {
        self.out.hidden
    }

    /// Assignments per token.
    #[wasm_bindgen(getter)]
    pub fn slots(&self) -> usize {
        self.out.slots
    }

    /// The activation dtype of `y`.
    #[wasm_bindgen(getter)]
    pub fn dtype(&self) -> String {
        self.out.dtype.name().to_string()
    }

    /// `y` `[T, H]` in the activation dtype: a `Float32Array` (f32) or a `Uint16Array` of f16 /
    /// bf16 bits.
    #[wasm_bindgen(getter)]
    pub fn y(&self) -> Result<JsValue, JsValue> {
        Ok(typed_of(&self.out.y_tensor().map_err(js_err)?))
    }

    /// `y` `[T, H]` widened to f32 (exact).
    #[wasm_bindgen(getter, js_name = yF32)]
    pub fn y_f32(&self) -> Float32Array {
        Float32Array::from(self.out.y.as_slice())
    }

    /// `[T, slots]` expert ids.
    #[wasm_bindgen(getter, js_name = topkIds)]
    pub fn topk_ids(&self) -> Int32Array {
        i32s(&self.out.topk_ids)
    }

    /// `[T, slots]` weights applied (0 where dropped).
    #[wasm_bindgen(getter, js_name = topkWeights)]
    pub fn topk_weights(&self) -> Float32Array {
        Float32Array::from(self.out.topk_weights.as_slice())
    }

    /// `[T, slots]`: 1 where kept, 0 where dropped by capacity.
    #[wasm_bindgen(getter)]
    pub fn kept(&self) -> Int32Array {
        i32s(&self.out.kept)
    }

    /// `[E]` kept assignments per expert (the routing load).
    #[wasm_bindgen(getter)]
    pub fn counts(&self) -> Uint32Array {
        Uint32Array::from(self.out.counts.as_slice())
    }

    /// Per-stage times `[{stage, ms}]`: GPU timestamps on WebGPU where the browser allows
    /// `timestamp-query`, host wall time on the CPU; empty when neither is available.
    #[wasm_bindgen(getter, js_name = stageTimes)]
    pub fn stage_times(&self) -> Array {
        let out = Array::new();
        for (stage, d) in &self.out.stage_times {
            let o = Object::new();
            set(&o, "stage", stage.to_string());
            set(&o, "ms", d.as_secs_f64() * 1e3);
            out.push(&o);
        }
        out
    }

    /// Wall time of the whole forward in ms (upload, submission, wait; not the read-backs).
    #[wasm_bindgen(getter, js_name = wallMs)]
    pub fn wall_ms(&self) -> f64 {
        self.out.wall_time.as_secs_f64() * 1e3
    }
}

/// Parses the bytes of an input file (the file `moe run --input` reads: `x` `[T, H]` in f32,
/// f16 or bf16): `{x, tokens, hidden, dtype}`, `x` a `Float32Array` or a `Uint16Array` of bits.
#[wasm_bindgen(js_name = parseInput)]
pub fn parse_input(bytes: &JsValue) -> Result<Object, JsValue> {
    if !(bytes.is_instance_of::<js_sys::ArrayBuffer>() || bytes.is_instance_of::<Uint8Array>()) {
        return Err(usage("the input must be an ArrayBuffer or a Uint8Array"));
    }
    let x = crate::io::parse_input(&Uint8Array::new(bytes).to_vec(), "input").map_err(js_err)?;
    let obj = Object::new();
    set(&obj, "x", typed_of(&x));
    set(&obj, "tokens", x.shape()[0]);
    set(&obj, "hidden", x.shape()[1]);
    set(&obj, "dtype", x.dtype().name());
    Ok(obj)
}

/// `x` rounded (to nearest even) to `dtype` (`"f16"` or `"bf16"`), as the `Uint16Array` of
/// bits that [`JsPrepared::forward`] takes for 16-bit activations.
#[wasm_bindgen(js_name = toBits16)]
pub fn to_bits16(x: &Float32Array, dtype: &str) -> Result<Uint16Array, JsValue> {
    let v = x.to_vec();
    let bits: Vec<u16> = match dtype_of(dtype)? {
        DType::F16 => v
            .iter()
            .map(|&a| half::f16::from_f32(a).to_bits())
            .collect(),
        DType::BF16 => v
            .iter()
            .map(|&a| half::bf16::from_f32(a).to_bits())
            .collect(),
        DType::F32 => return Err(usage("toBits16 rounds to \"f16\" or \"bf16\", not f32")),
    };
    Ok(Uint16Array::from(bits.as_slice()))
}

/// The kinds of backend this build has: `["wgpu", "cpu"]`.
#[wasm_bindgen(js_name = backendKinds)]
pub fn backend_kinds() -> Array {
    [BackendKind::Wgpu, BackendKind::Cpu]
        .iter()
        .map(|k| JsValue::from_str(k.name()))
        .collect()
}
