//! `moe bench`: layer shapes of real models, timed per stage on a backend (CUDA events, wgpu
//! timestamps, host wall time on the CPU), median over repeated forwards after warm-up, with
//! the FLOPs and minimum bytes of each stage so achieved rates can be compared with a device's
//! measured ceilings. Weights are seeded pseudo-random (never zeros), generated in parallel:
//! dense in f32 / f16 / bf16 ([`layer`]), or quantized FP8 / MXFP4 / INT4 codes and scales
//! ([`quantized_layer`]), whose weight bytes are the packed bytes the decode streams.

use std::collections::BTreeMap;
use std::time::Duration;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::backend::Backend;
use crate::config::{Groups, LayerConfig, Preset, Scoring};
use crate::error::{Error, Result};
use crate::io::FileTensor;
use crate::layer::MoeLayer;
use crate::quant::{self, QuantFormat, QuantLayout, QuantMatrix, QuantSpec, Scales, Weight};
use crate::stage::Stage;
use crate::tensor::{DType, Tensor, TensorData};

/// A model's MoE layer shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Name on the command line and in reports (`mixtral`, `deepseek_v3`, ...).
    pub name: &'static str,
    /// Routed experts E.
    pub experts: usize,
    /// Experts per token k.
    pub top_k: usize,
    /// Model width H.
    pub hidden: usize,
    /// Routed expert FFN width F.
    pub ffn: usize,
    /// Shared expert width, if any.
    pub shared_ffn: Option<usize>,
    /// The preset whose config the layer starts from.
    pub preset: Preset,
}

/// The shapes `moe bench --preset` knows.
pub const SHAPES: [Shape; 6] = [
    Shape {
        name: "mixtral",
        experts: 8,
        top_k: 2,
        hidden: 4096,
        ffn: 14336,
        shared_ffn: None,
        preset: Preset::Mixtral,
    },
    Shape {
        name: "deepseek_v3",
        experts: 256,
        top_k: 8,
        hidden: 7168,
        ffn: 2048,
        shared_ffn: Some(2048),
        preset: Preset::DeepseekV3,
    },
    Shape {
        name: "qwen3_30b_a3b",
        experts: 128,
        top_k: 8,
        hidden: 2048,
        ffn: 768,
        shared_ffn: None,
        preset: Preset::Qwen3Moe,
    },
    Shape {
        name: "gpt_oss_120b",
        experts: 128,
        top_k: 4,
        hidden: 2880,
        ffn: 2880,
        shared_ffn: None,
        preset: Preset::GptOss,
    },
    // No public shape exists for GPT-4; 16 experts top-2 as described, Mixtral-sized experts.
    Shape {
        name: "gpt4",
        experts: 16,
        top_k: 2,
        hidden: 4096,
        ffn: 14336,
        shared_ffn: None,
        preset: Preset::Gpt4,
    },
    // The stage benches' GPT-4-style layer (benches/common): small enough for a quick run on
    // the CPU backend.
    Shape {
        name: "gpt4_small",
        experts: 16,
        top_k: 2,
        hidden: 512,
        ffn: 1024,
        shared_ffn: None,
        preset: Preset::Gpt4,
    },
];

/// The shape named `name`.
pub fn shape(name: &str) -> Result<Shape> {
    SHAPES
        .iter()
        .copied()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            let names: Vec<_> = SHAPES.iter().map(|s| s.name).collect();
            Error::Usage(format!(
                "unknown bench preset {name:?} (expected one of {})",
                names.join(", ")
            ))
        })
}

/// Splitmix64 of index `i` under `seed`: the one source of every bench weight.
fn mix(i: usize, seed: u64) -> u64 {
    let mut z = (i as u64).wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Value `i` uniform in [-scale, scale].
fn val(i: usize, seed: u64, scale: f32) -> f32 {
    ((mix(i, seed) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
}

/// Deterministic pseudo-random values in [-scale, scale] (splitmix64 of the index), in
/// parallel: a Mixtral layer has 1.4 G weights.
fn fill(n: usize, seed: u64, scale: f32, dtype: DType, shape: Vec<usize>) -> Result<Tensor> {
    let val = move |i: usize| val(i, seed, scale);
    let data = match dtype {
        DType::F32 => TensorData::F32((0..n).into_par_iter().map(val).collect()),
        DType::F16 => TensorData::F16(
            (0..n)
                .into_par_iter()
                .map(|i| f16::from_f32(val(i)))
                .collect(),
        ),
        DType::BF16 => TensorData::BF16(
            (0..n)
                .into_par_iter()
                .map(|i| bf16::from_f32(val(i)))
                .collect(),
        ),
    };
    Tensor::new(shape, data)
}

/// `n` pseudo-random bytes, each mapped by `f`, in parallel.
fn bytes(n: usize, seed: u64, f: impl Fn(u8) -> u8 + Sync + Send) -> Vec<u8> {
    (0..n)
        .into_par_iter()
        .map(|i| f((mix(i, seed) >> 56) as u8))
        .collect()
}

/// Seeded codes and scales of an `[e, n, k]` matrix in `spec`'s layout, its values within
/// about `[-scale, scale]` like a dense bench matrix: FP8 codes from every finite e4m3 value
/// with `scale_inv = scale / 448`; MXFP4 nibbles with the power-of-two scale putting 6 at
/// `scale`; INT4 nibbles with scales of `scale / 8` and zero points 4..=11 (or 8). The decode
/// costs the same for any codes; generating them directly (instead of quantizing dense
/// weights) keeps a real model's layer to seconds.
fn quant_matrix(
    spec: &QuantSpec,
    [e, n, k]: [usize; 3],
    seed: u64,
    scale: f32,
) -> Result<QuantMatrix> {
    let float_scales = |shape: Vec<usize>, v: f32| -> Result<Scales> {
        let len = shape.iter().product::<usize>();
        // Within a factor of two of `v`, so blocks differ.
        let vals: Vec<f32> = (0..len)
            .into_par_iter()
            .map(|i| v * (0.75 + 0.25 * val(i, seed ^ 0x5ca1e, 1.0)))
            .collect();
        Ok(Scales::Float(
            Tensor::from_f32(shape, vals)?.cast(spec.scale_dtype),
        ))
    };
    let (codes, scales, zeros) = match spec.format {
        QuantFormat::Fp8Block => {
            // 0x7F and 0xFF are NaN: the neighbouring ±448 instead.
            let codes = bytes(
                e * n * k,
                seed,
                |b| if b & 0x7F == 0x7F { b ^ 1 } else { b },
            );
            let sr = n.div_ceil(quant::FP8_BLOCK);
            let sc = k.div_ceil(quant::FP8_BLOCK);
            (codes, float_scales(vec![e, sr, sc], scale / 448.0)?, None)
        }
        QuantFormat::Mxfp4 => {
            if k % quant::MX_BLOCK != 0 {
                return Err(Error::config(format!(
                    "mxfp4 needs K to be a multiple of {}, got K = {k}",
                    quant::MX_BLOCK
                )));
            }
            let codes = bytes(e * n * k / 2, seed, |b| b);
            // 2^(code - 127) · 6 <= scale.
            let base = 127 + (scale / 6.0).log2().floor() as i32;
            let blocks = e * n * (k / quant::MX_BLOCK);
            let sv = bytes(blocks, seed ^ 0xe8, |b| {
                (base - i32::from(b % 3)).clamp(1, 254) as u8
            });
            (codes, Scales::E8m0(sv), None)
        }
        QuantFormat::Int4 => {
            let g = quant::encode::int4_group(spec, k)?;
            let codes = bytes(e * n * k.div_ceil(2), seed, |b| b);
            let shape = vec![e, n, k / g];
            let zeros = spec
                .zeros
                .then(|| bytes(e * n * (k / g), seed ^ 0x2e, |b| 4 + b % 8));
            (codes, float_scales(shape, scale / 8.0)?, zeros)
        }
    };
    Ok(QuantMatrix {
        format: spec.format,
        experts: e,
        rows: n,
        cols: k,
        codes,
        scales,
        zeros,
    })
}

/// A random layer of `s` with expert weights in `dtype`.
pub fn layer(s: &Shape, dtype: DType) -> Result<MoeLayer> {
    build(
        s,
        &format!("{dtype}"),
        dtype.size() as f64,
        false,
        &|name, [e, n, k], seed, a, axis| {
            let shape = if axis { vec![e, n, k] } else { vec![n, k] };
            Ok(vec![(
                name.to_string(),
                FileTensor::Float(fill(e * n * k, seed, a, dtype, shape)?),
            )])
        },
    )
}

/// A random layer of `s` with expert (and shared expert) matrices quantized as `spec` says:
/// format, scale dtype, INT4 group and zero points; router and biases in f32. Seeded codes and
/// scales, see [`QuantMatrix`]: the same layout a quantizer writes, made in seconds for a real
/// model's layer.
pub fn quantized_layer(s: &Shape, spec: &QuantSpec) -> Result<MoeLayer> {
    let per_elem = match spec.format {
        QuantFormat::Fp8Block => 1.0,
        QuantFormat::Mxfp4 | QuantFormat::Int4 => 0.5,
    };
    build(
        s,
        spec.format.name(),
        per_elem,
        true,
        &|name, [e, n, k], seed, a, axis| {
            let q = quant_matrix(spec, [e, n, k], seed, a)?;
            quant::parts::file_tensors(name, Weight::Quant(q), axis)
        },
    )
}

/// One expert matrix's file tensors: `(name, [E, N, K], seed, value scale, expert axis)`.
type MatrixFn<'a> =
    dyn Fn(&str, [usize; 3], u64, f32, bool) -> Result<Vec<(String, FileTensor)>> + 'a;

/// The layer of `s` with each expert matrix from `matrix`, checked against the host first:
/// `bytes_per_weight` of every expert weight, plus one matrix more when `copy` (a quantized
/// matrix is copied into its file tensors).
fn build(
    s: &Shape,
    what: &str,
    bytes_per_weight: f64,
    copy: bool,
    matrix: &MatrixFn<'_>,
) -> Result<MoeLayer> {
    let (e, h, f) = (s.experts, s.hidden, s.ffn);
    let mut cfg: LayerConfig = s.preset.config();
    cfg.routing.top_k = s.top_k;
    if s.preset == Preset::DeepseekV3 {
        cfg.routing.scoring = Scoring::Sigmoid;
        cfg.routing.groups = Some(Groups { count: 8, keep: 4 });
    }
    // Generated in place: checked against the host before any of it is allocated.
    let n_mats = if cfg.activation.is_gated() { 3 } else { 2 };
    let fs = s.shared_ffn.unwrap_or(0);
    let weights = crate::limits::product(&[n_mats + usize::from(copy), e, f, h])
        .saturating_add(crate::limits::product(&[3, fs, h]));
    crate::limits::check_host(
        crate::BackendKind::Cpu,
        || format!("the {} layer's weights in {what}", s.name),
        ((weights as f64 * bytes_per_weight) as u64)
            .saturating_add(crate::limits::product(&[e, h, 4])),
    )?;
    let a = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    let mut t: BTreeMap<String, FileTensor> = BTreeMap::new();
    let mut float = |name: &str, tensor: Tensor| {
        t.insert(name.to_string(), FileTensor::Float(tensor));
    };
    float(
        "router.weight",
        fill(e * h, 1, 4.0 * a(h), DType::F32, vec![e, h])?,
    );
    if s.preset == Preset::DeepseekV3 {
        float(
            "router.score_correction_bias",
            fill(e, 2, 0.01, DType::F32, vec![e])?,
        );
    }
    if s.preset == Preset::GptOss {
        float("router.bias", fill(e, 3, 0.1, DType::F32, vec![e])?);
    }
    let mut mats: Vec<(&str, [usize; 3], u64, f32, bool)> = Vec::new();
    if cfg.activation.is_gated() {
        mats.push(("experts.gate_proj", [e, f, h], 4, a(h), true));
    }
    mats.push(("experts.up_proj", [e, f, h], 5, a(h), true));
    mats.push(("experts.down_proj", [e, h, f], 6, a(f), true));
    if let Some(fs) = s.shared_ffn {
        mats.push(("shared.gate_proj", [1, fs, h], 7, a(h), false));
        mats.push(("shared.up_proj", [1, fs, h], 8, a(h), false));
        mats.push(("shared.down_proj", [1, h, fs], 9, a(fs), false));
    }
    for (name, dims, seed, scale, axis) in mats {
        t.extend(matrix(name, dims, seed, scale, axis)?);
    }
    MoeLayer::from_file_tensors(cfg, t, s.name)
}

/// Median stage and layer times of one (shape, T) point.
#[derive(Debug, Clone)]
pub struct Point {
    /// The shape's name.
    pub shape: &'static str,
    /// Tokens T per forward.
    pub tokens: usize,
    /// The dtype of the expert weights (f32 when they are quantized: see `quant`).
    pub dtype: DType,
    /// The layout of quantized expert weights, `None` when dense.
    pub quant: Option<QuantLayout>,
    /// Median time of each stage the backend timed, in stage order (empty when none).
    pub stages: Vec<(Stage, Duration)>,
    /// Median forward time: the sum of the stage times, or the host wall time when the
    /// backend timed no stage.
    pub layer: Duration,
    /// FLOPs of the expert FFN (routed + shared), 2 per multiply-add.
    pub gemm_flops: f64,
    /// Expert weight bytes the FFN must read at least once (experts that got tokens, and the
    /// shared expert), as stored: the packed codes, scales and zero points when quantized.
    pub gemm_weight_bytes: f64,
    /// Most tokens any expert received, and the mean (load balance).
    pub max_load: u32,
    /// Mean tokens per expert.
    pub mean_load: f64,
    /// Host time to enqueue one device-resident forward (record + submit on wgpu, launches on
    /// CUDA; median of 5), `None` on the CPU.
    pub enqueue: Option<Duration>,
}

/// Times `iters` forwards of `layer` on `dev` after `warmup` forwards.
pub fn run_point(
    dev: &Backend,
    s: &Shape,
    layer: &MoeLayer,
    (tokens, act): (usize, DType),
    warmup: usize,
    iters: usize,
    routing: Routing,
) -> Result<Point> {
    // Before x exists: a --tokens value past a limit fails here, not in the allocator.
    dev.check_forward(&layer.shape(), tokens, layer.weight_bytes())?;
    let prepared = layer.prepare(dev, tokens, act)?;
    let x = input(layer, tokens, routing)?.cast(act);
    let mut counts = Vec::new();
    for _ in 0..warmup {
        counts = prepared.forward(&x)?.counts;
    }
    let mut per_stage: Vec<Vec<Duration>> = vec![Vec::new(); Stage::ALL.len()];
    let mut totals = Vec::new();
    for _ in 0..iters.max(1) {
        let out = prepared.forward(&x)?;
        counts = out.counts.clone();
        for (i, (_, d)) in out.stage_times.iter().enumerate() {
            per_stage[i].push(*d);
        }
        totals.push(
            out.stage_times
                .iter()
                .map(|(_, d)| *d)
                .sum::<Duration>()
                .max(if out.stage_times.is_empty() {
                    out.wall_time
                } else {
                    Duration::ZERO
                }),
        );
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    let stages = Stage::ALL
        .iter()
        .zip(per_stage.iter_mut())
        .filter(|(_, v)| !v.is_empty())
        .map(|(s, v)| (*s, median(v)))
        .collect();
    let gated = layer.config.activation.is_gated();
    let mats = if gated { 3.0 } else { 2.0 };
    let rows = (tokens * s.top_k) as f64;
    let shared_rows = if s.shared_ffn.is_some() {
        tokens as f64
    } else {
        0.0
    };
    let fs = s.shared_ffn.unwrap_or(0) as f64;
    let (h, f) = (s.hidden as f64, s.ffn as f64);
    let used = counts.iter().filter(|&&c| c > 0).count() as f64;
    // As stored: Weight::bytes counts a quantized matrix's packed bytes.
    let matrix_bytes = |w: &crate::cpu::expert_gemm::ExpertWeights| {
        [w.gate.as_ref(), Some(&w.up), Some(&w.down)]
            .into_iter()
            .flatten()
            .map(|m| m.bytes() as f64)
            .sum::<f64>()
    };
    let per_expert = matrix_bytes(&layer.experts) / layer.dims().experts.max(1) as f64;
    let shared_bytes = layer
        .shared
        .as_ref()
        .map_or(0.0, |sh| matrix_bytes(&sh.weights));
    Ok(Point {
        shape: s.name,
        tokens,
        dtype: dtype_of(layer),
        quant: layer.experts.up.quant().map(QuantMatrix::layout),
        stages,
        layer: median(&mut totals),
        gemm_flops: 2.0 * mats * h * (rows * f + shared_rows * fs),
        gemm_weight_bytes: used * per_expert + shared_bytes,
        max_load: counts.iter().copied().max().unwrap_or(0),
        mean_load: counts.iter().map(|&c| f64::from(c)).sum::<f64>() / counts.len().max(1) as f64,
        enqueue: enqueue_time(dev, &prepared, tokens, s.hidden)?,
    })
}

/// Median host time of 5 device-resident forwards' enqueue (the device finishes each before
/// the next is timed), on buffers of zeros; `None` on the CPU backend.
fn enqueue_time(
    dev: &Backend,
    prepared: &crate::PreparedLayer,
    tokens: usize,
    hidden: usize,
) -> Result<Option<Duration>> {
    let mut times = Vec::new();
    match &dev.device {
        crate::backend::Device::Cpu => return Ok(None),
        #[cfg(feature = "wgpu")]
        crate::backend::Device::Wgpu(d) => {
            let words = crate::wgpu::act::words(tokens * hidden, prepared.act_dtype());
            let x = d.alloc::<u32>(words, "bench x")?;
            let y = d.alloc::<u32>(words, "bench y")?;
            for _ in 0..5 {
                let start = std::time::Instant::now();
                let mut enc = d.encoder();
                prepared.forward_wgpu(&mut enc, (&x.buffer, 0), (&y.buffer, 0), tokens)?;
                d.queue.submit([enc.finish()]);
                times.push(start.elapsed());
                d.submit_and_wait(d.encoder())?;
            }
        }
        #[cfg(feature = "cuda")]
        crate::backend::Device::Cuda(d) => {
            let n = tokens * hidden;
            for _ in 0..5 {
                times.push(match prepared.act_dtype() {
                    DType::F32 => cuda_enqueue::<f32>(d, prepared, tokens, n)?,
                    DType::F16 => cuda_enqueue::<half::f16>(d, prepared, tokens, n)?,
                    DType::BF16 => cuda_enqueue::<half::bf16>(d, prepared, tokens, n)?,
                });
            }
        }
    }
    times.sort();
    Ok(times.get(times.len() / 2).copied())
}

#[cfg(feature = "cuda")]
fn cuda_enqueue<T>(
    d: &crate::cuda::CudaDevice,
    prepared: &crate::PreparedLayer,
    tokens: usize,
    n: usize,
) -> Result<Duration>
where
    T: crate::tensor::Element + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
{
    let x = d.alloc::<T>(n)?;
    let mut y = d.alloc::<T>(n)?;
    let start = std::time::Instant::now();
    prepared.forward_cuda(&x.slice(0..n), &mut y.slice_mut(0..n), tokens)?;
    let t = start.elapsed();
    d.sync()?;
    Ok(t)
}

fn dtype_of(layer: &MoeLayer) -> DType {
    layer.experts.up.dense().map_or(DType::F32, Tensor::dtype)
}

/// Device-to-device copy bandwidth of `dev` in GB/s, counting bytes read plus bytes written
/// (the bandwidth ceiling of METHOD.md), median of a few copies of `bytes`.
pub fn copy_bandwidth(dev: &Backend, bytes: usize) -> Result<f64> {
    crate::backend::copy_bandwidth(dev, bytes)
}

/// Read rate of `dev` in GB/s (bytes read) of a trivial WGSL kernel that only streams about
/// `bytes` with coalesced 16-byte loads (shaders/read_ceiling.wgsl, median of 5), the ceiling
/// of a weight-streaming kernel on adapters where a buffer copy is not one (on lavapipe it is a
/// memcpy); `None` off wgpu.
pub fn read_bandwidth(dev: &Backend, bytes: usize) -> Result<Option<f64>> {
    match &dev.device {
        #[cfg(feature = "wgpu")]
        crate::backend::Device::Wgpu(d) => {
            let (secs, read) = d.read_seconds(bytes)?;
            Ok(Some(read as f64 / secs / 1e9))
        }
        _ => {
            let _ = bytes;
            Ok(None)
        }
    }
}

/// Our own dense ceiling: the expert GEMM of one expert at `n x n`, 8192 rows (TFLOP/s).
pub fn dense_ceiling(dev: &Backend, dtype: DType, n: usize) -> Result<f64> {
    let s = Shape {
        name: "dense",
        experts: 1,
        top_k: 1,
        hidden: n,
        ffn: n,
        shared_ffn: None,
        preset: Preset::Mixtral,
    };
    let l = layer(&s, dtype)?;
    let p = run_point(dev, &s, &l, (8192, dtype), 1, 3, Routing::Uniform)?;
    let g = p
        .stages
        .iter()
        .find(|(st, _)| *st == Stage::ExpertGemm)
        .map_or(f64::NAN, |(_, d)| d.as_secs_f64());
    Ok(p.gemm_flops / g / 1e12)
}

/// How tokens spread over experts in a bench input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// The router's own spread on random inputs (roughly uniform).
    Uniform,
    /// Every other token is pushed towards expert 0, so it takes about half the tokens.
    Skewed,
}

impl std::str::FromStr for Routing {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "uniform" => Ok(Routing::Uniform),
            "skewed" => Ok(Routing::Skewed),
            o => Err(Error::Usage(format!(
                "unknown routing {o:?} (expected uniform or skewed)"
            ))),
        }
    }
}

/// Input `x` `[T, H]` for a bench point; with [`Routing::Skewed`], even tokens get a push
/// along router row 0 that raises expert 0's logit by 20.
pub fn input(layer: &MoeLayer, tokens: usize, routing: Routing) -> Result<Tensor> {
    let h = layer.dims().hidden;
    let x = fill(
        tokens * h,
        11 + tokens as u64,
        1.0,
        DType::F32,
        vec![tokens, h],
    )?;
    if routing == Routing::Uniform {
        return Ok(x);
    }
    let w0 = layer.router_weight.row_f64(0, h);
    let norm2: f64 = w0.iter().map(|v| v * v).sum::<f64>().max(1e-30);
    let mut v = x.to_f32_vec();
    for t in (0..tokens).step_by(2) {
        for (i, w) in w0.iter().enumerate() {
            v[t * h + i] += (20.0 * w / norm2) as f32;
        }
    }
    Tensor::from_f32(vec![tokens, h], v)
}
