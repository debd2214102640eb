//! `moe`: the command-line front end (DESIGN.md section 4).
//!
//! - `moe demo` — a GPT-4-style layer (16 experts, top-2) on the best backend, checked
//!   against the f64 CPU reference, with routing load and per-stage times.
//! - `moe run` — one layer forward from files (dense or quantized expert weights).
//! - `moe bench` — stage timings of real model shapes, dense or quantized.
//! - `moe info` — the backends and devices found; `moe info --weights W` describes a weights
//!   file (every tensor and quantized matrix with its format, logical shape and bytes).
//!
//! Every error prints `error: …` and exits with status 1; nothing panics on bad input.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use moe_kernels::backend::unavailable_reason;
use moe_kernels::io::{self, FileTensor, OutTensor};
use moe_kernels::layer::{MATRIX_NAMES, TENSOR_NAMES};
use moe_kernels::quant::{self, QuantFormat, QuantSpec, Weight};
use moe_kernels::synth::{self, Extras};
use moe_kernels::{
    Activation, Backend, BackendKind, DType, Error, LayerConfig, MoeLayer, Preset, Result, Stage,
};

#[derive(Parser)]
#[command(
    name = "moe",
    version,
    about = "Mixture-of-Experts kernels: run, check and inspect MoE layers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a GPT-4-style MoE layer (16 experts, top-2) and check it against the CPU reference.
    Demo {
        /// auto, cpu, cuda or wgpu.
        #[arg(long, default_value = "auto")]
        backend: String,
        /// Expert weight dtype: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Tokens in the batch.
        #[arg(long, default_value_t = 97)]
        tokens: usize,
        /// Hidden size H.
        #[arg(long, default_value_t = 512)]
        hidden: usize,
        /// Expert FFN width F.
        #[arg(long, default_value_t = 1376)]
        ffn: usize,
        /// Seed of the random weights and input.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Quantize the expert weights first: fp8, mxfp4 or int4 (weight-only; the check then
        /// compares with the reference of the quantized layer). mxfp4 needs --hidden and
        /// --ffn to be multiples of 32.
        #[arg(long)]
        quant: Option<String>,
    },
    /// Run one layer forward: config + weights (or --checkpoint + --layer) + input -> output
    /// file.
    Run {
        /// Layer config JSON (DESIGN.md section 4).
        #[arg(
            long,
            required_unless_present = "checkpoint",
            conflicts_with = "checkpoint"
        )]
        config: Option<PathBuf>,
        /// Layer weights, safetensors with the canonical names (dense f32 / f16 / bf16, or
        /// quantized fp8 / mxfp4 / int4 expert matrices).
        #[arg(
            long,
            required_unless_present = "checkpoint",
            conflicts_with = "checkpoint"
        )]
        weights: Option<PathBuf>,
        /// A Hugging Face checkpoint directory (config.json + model.safetensors or shards with
        /// model.safetensors.index.json) in place of --config and --weights.
        #[arg(long, requires = "layer")]
        checkpoint: Option<PathBuf>,
        /// The checkpoint's MoE layer: a decoder layer index, or encoder.L / decoder.L.
        #[arg(long, requires = "checkpoint")]
        layer: Option<String>,
        /// Input safetensors holding `x` [T, H].
        #[arg(long)]
        input: PathBuf,
        /// Output safetensors: y, topk_ids, topk_weights (and kept with capacity).
        #[arg(long)]
        output: PathBuf,
        /// auto, cpu, cuda or wgpu.
        #[arg(long, default_value = "auto")]
        backend: String,
        /// Round dense expert weights to f32, f16 or bf16 first (default: as stored;
        /// quantized matrices stay as stored).
        #[arg(long)]
        dtype: Option<String>,
        /// Run the forward as N expert-parallel ranks (threads of this process, experts and
        /// tokens split evenly): the output file is byte for byte the single-device one.
        #[arg(long)]
        ep: Option<usize>,
    },
    /// Write one MoE layer of a Hugging Face checkpoint as the canonical files (weights in
    /// their stored dtype or quantized format, and the config that reproduces its routing).
    Import {
        /// The checkpoint directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The MoE layer: a decoder layer index, or encoder.L / decoder.L.
        #[arg(long)]
        layer: String,
        /// Output weights safetensors (canonical names).
        #[arg(long)]
        weights: PathBuf,
        /// Output layer config JSON.
        #[arg(long)]
        config: PathBuf,
    },
    /// Time each stage of real model shapes on a backend (median after warm-up).
    Bench {
        /// Shapes: mixtral, deepseek_v3, qwen3_30b_a3b, gpt_oss_120b, gpt4, gpt4_small
        /// (comma-separated).
        #[arg(long, default_value = "mixtral")]
        preset: String,
        /// Token counts, comma-separated.
        #[arg(long, default_value = "1,8,64,512,4096")]
        tokens: String,
        /// auto, cpu, cuda or wgpu.
        #[arg(long, default_value = "auto")]
        backend: String,
        /// Expert weight dtype: f32, f16 or bf16 (dense weights, and the --dense ceiling).
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Quantized expert weights instead: fp8, mxfp4 or int4 (weight GB/s counts the
        /// packed bytes: codes, scales and zero points).
        #[arg(long)]
        quant: Option<String>,
        /// Activation dtype (x, intermediates, y): f32, f16 or bf16; default bf16 on a GPU (as
        /// runtimes run), f32 on the CPU.
        #[arg(long)]
        act: Option<String>,
        /// Timed forwards per point (the median is reported).
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Untimed forwards first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Print one JSON object per point instead of the table.
        #[arg(long)]
        json: bool,
        /// Token-to-expert spread: uniform, skewed (expert 0 takes half the tokens), or both.
        #[arg(long, default_value = "uniform")]
        routing: String,
        /// Also measure our own dense ceiling: one N x N expert, 8192 rows (0 = skip).
        #[arg(long, default_value_t = 0)]
        dense: usize,
        /// Instead: the layer as N expert-parallel in-process ranks next to one device, with
        /// each rank's compute, layout and exchange time and the bytes between ranks.
        #[arg(long)]
        ep: Option<usize>,
    },
    /// List the backends and devices found; with --weights, describe a weights file instead.
    Info {
        /// A weights file to describe: every tensor and matrix with its format (f32, f16,
        /// bf16, fp8, mxfp4, int4; scale dtype, group, zero points), logical shape and bytes
        /// as stored, and the total. A malformed file is an error naming the tensor.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// The layer config, to validate the file exactly as `moe run` does (without it the
        /// gating is read off the file).
        #[arg(long, requires = "weights")]
        config: Option<PathBuf>,
    },
    /// Write every PTX module exactly as it is handed to the driver (one file per variant).
    #[cfg(feature = "cuda")]
    Ptx {
        /// Folder to write `<variant>.ptx` files into.
        #[arg(long)]
        dump: PathBuf,
    },
}

fn main() -> ExitCode {
    // Before any thread exists: no "XDG_RUNTIME_DIR is invalid" line on a headless machine.
    #[cfg(feature = "wgpu")]
    moe_kernels::wgpu::quiet_headless_vulkan();
    // Usage errors exit 1 like every other error; --help and --version exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Demo {
            backend,
            dtype,
            tokens,
            hidden,
            ffn,
            seed,
            quant,
        } => demo(
            &backend,
            &dtype,
            quant.as_deref(),
            (tokens, hidden, ffn),
            seed,
        ),
        Command::Run {
            config,
            weights,
            checkpoint,
            layer,
            input,
            output,
            backend,
            dtype,
            ep,
        } => {
            let source = match (checkpoint, layer, config, weights) {
                (Some(dir), Some(layer), None, None) => Source::Checkpoint(dir, layer),
                (None, None, Some(c), Some(w)) => Source::Files(c, w),
                // clap's requires / conflicts rule out every other combination.
                _ => Source::Usage,
            };
            run(&source, &input, &output, &backend, dtype.as_deref(), ep)
        }
        Command::Import {
            checkpoint,
            layer,
            weights,
            config,
        } => import(&checkpoint, &layer, &weights, &config),
        Command::Bench {
            preset,
            tokens,
            backend,
            dtype,
            quant,
            act,
            iters,
            warmup,
            json,
            routing,
            dense,
            ep,
        } => bench(
            &preset,
            &tokens,
            &backend,
            (&dtype, quant.as_deref(), act.as_deref()),
            (iters, warmup),
            json,
            &routing,
            dense,
            ep,
        ),
        Command::Info { weights: None, .. } => info(),
        Command::Info {
            weights: Some(w),
            config,
        } => info_weights(&w, config.as_deref()),
        #[cfg(feature = "cuda")]
        Command::Ptx { dump } => moe_kernels::cuda::ptx::dump(&dump).map(|files| {
            for f in &files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let msg = e.to_string();
            eprintln!("error: {msg}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                // Causes already quoted in the message are not repeated.
                let cause = s.to_string();
                if !msg.contains(&cause) {
                    eprintln!("  caused by: {cause}");
                }
                src = s.source();
            }
            ExitCode::from(1)
        }
    }
}

/// Relative L2 distance `|a - b| / |b|` (0 when both are empty or zero).
fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
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

/// DESIGN.md section 5's bound for the dtype of the weights.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        DType::F16 => 5e-3,
        DType::BF16 => 1e-2,
    }
}

/// The quantized format named by `--quant`, if any.
fn parse_quant(quant: Option<&str>) -> Result<Option<QuantFormat>> {
    quant.map(str::parse).transpose()
}

/// How a quantized matrix is laid out, for messages: `BF16 scales, group 128, U8 zero points`.
fn describe_layout(q: &quant::QuantMatrix) -> String {
    let l = q.layout();
    match l.format {
        QuantFormat::Fp8Block => format!("{} scale_inv, 128x128 blocks", l.scale_dtype),
        QuantFormat::Mxfp4 => format!("e8m0 ({}) scales, group {}", l.scale_dtype, l.group),
        QuantFormat::Int4 => format!(
            "{} scales, group {}, {}",
            l.scale_dtype,
            l.group,
            if l.zeros {
                "U8 zero points"
            } else {
                "zero point 8"
            }
        ),
    }
}

/// `bytes` with a binary unit: `1.5 MiB`.
fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn demo(
    backend: &str,
    dtype: &str,
    quant: Option<&str>,
    (tokens, hidden, ffn): (usize, usize, usize),
    seed: u64,
) -> Result<ExitCode> {
    let dev = Backend::from_name(backend)?;
    let dtype: DType = dtype.parse()?;
    let quant = parse_quant(quant)?;
    if hidden == 0 || ffn == 0 {
        return Err(Error::Config(
            "--hidden and --ffn must be at least 1".into(),
        ));
    }
    if quant == Some(QuantFormat::Mxfp4)
        && (hidden % quant::MX_BLOCK != 0 || ffn % quant::MX_BLOCK != 0)
    {
        return Err(Error::Usage(format!(
            "--quant mxfp4 needs --hidden and --ffn to be multiples of {} (one e8m0 scale per \
             {} values along K), got --hidden {hidden} --ffn {ffn}",
            quant::MX_BLOCK,
            quant::MX_BLOCK
        )));
    }
    let experts = 16;
    let config = Preset::Gpt4.config();
    let mut layer =
        synth::random_layer(config, experts, hidden, ffn, Extras::default(), dtype, seed)?;
    if let Some(format) = quant {
        layer = layer.quantized(&QuantSpec::new(format))?;
    }
    // Both forwards' limits before x is built, so a huge --tokens fails here with the numbers.
    dev.check_forward(&layer.shape(), tokens, layer.weight_bytes())?;
    layer.check_reference(tokens)?;
    // Before anything is printed: a backend that cannot take these weights (a GPU backend
    // without the quantized decode) fails here with its own message; no fallback.
    let prepared = layer.prepare(&dev, tokens, DType::F32)?;
    let x = synth::random_x(tokens, hidden, seed);
    println!(
        "moe demo: GPT-4-style MoE layer, {experts} experts, top-{}, SwiGLU",
        config.routing.top_k
    );
    let weights = match layer.experts.up.quant() {
        Some(q) => format!(
            "{} ({}; quantized from {dtype})",
            q.format,
            describe_layout(q)
        ),
        None => dtype.to_string(),
    };
    println!(
        "  T = {tokens} tokens, H = {hidden}, F = {ffn}, expert weights {weights}, seed {seed}"
    );
    println!("  weights as stored: {}", human_bytes(layer.weight_bytes()));
    println!("  backend: {}", dev.kind());

    // One warm-up forward (pipeline creation, first-touch allocations), then the timed one.
    prepared.forward(&x)?;
    let out = prepared.forward(&x)?;
    let ref_start = Instant::now();
    let reference = layer.forward_reference(&x)?;
    let ref_time = ref_start.elapsed();

    println!(
        "\nrouting load (assignments per expert, {} in all):",
        out.counts.iter().sum::<u32>()
    );
    let max = out.counts.iter().copied().max().unwrap_or(0).max(1);
    for (e, &c) in out.counts.iter().enumerate() {
        let bar = "#".repeat((c as usize * 40).div_ceil(max as usize));
        println!("  expert {e:>2}: {c:>5}  {bar}");
    }
    let clock = match dev.kind() {
        BackendKind::Cpu => "host wall time",
        _ => "GPU timestamps",
    };
    println!("\ntime per stage on {} ({clock}):", dev.kind());
    if out.stage_times.is_empty() {
        println!("  (this adapter has no timestamp queries: per-stage times unavailable)");
    }
    for (stage, d) in &out.stage_times {
        println!(
            "  {:<12} {:>10.3} ms",
            stage.to_string(),
            d.as_secs_f64() * 1e3
        );
    }
    println!(
        "  {:<12} {:>10.3} ms (host wall time of the forward, one submission)",
        "layer",
        out.wall_time.as_secs_f64() * 1e3
    );
    println!(
        "  (f64 CPU reference: {:.3} ms)",
        ref_time.as_secs_f64() * 1e3
    );

    let err = rel_l2(&out.y, &reference.y);
    let ids_equal = out
        .topk_ids
        .iter()
        .zip(&reference.routing.topk_ids)
        .filter(|(a, b)| a == b)
        .count();
    let n_ids = reference.routing.topk_ids.len();
    // Quantized values are exact in f32 (the reference dequantizes them exactly), so a
    // quantized layer is held to the f32 bound against the reference of the quantized layer.
    let (tol, bound_for) = match quant {
        Some(q) => (tolerance(DType::F32), format!("{q} weights, f32 compute")),
        None => (tolerance(dtype), dtype.to_string()),
    };
    let pass = err <= tol && ids_equal == n_ids && out.y.iter().all(|v| v.is_finite());
    match quant {
        Some(q) => println!("\ncheck against the f64 CPU reference of the {q} layer:"),
        None => println!("\ncheck against the f64 CPU reference:"),
    }
    println!("  expert ids equal: {ids_equal}/{n_ids}");
    println!("  relative L2 of y: {err:.3e} (bound {tol:.0e} for {bound_for})");
    println!("  {}", if pass { "PASS" } else { "FAIL" });
    Ok(if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Where `moe run` takes its layer from.
enum Source {
    /// `--config C --weights W`.
    Files(PathBuf, PathBuf),
    /// `--checkpoint DIR --layer L`.
    Checkpoint(PathBuf, String),
    /// A combination clap lets through but that names no layer.
    Usage,
}

fn run(
    source: &Source,
    input: &std::path::Path,
    output: &std::path::Path,
    backend: &str,
    dtype: Option<&str>,
    ep: Option<usize>,
) -> Result<ExitCode> {
    if ep == Some(0) {
        return Err(Error::Usage("--ep must be at least 1 rank".into()));
    }
    let dev = Backend::from_name(backend)?;
    let mut layer = match source {
        Source::Files(config, weights) => MoeLayer::load(LayerConfig::from_file(config)?, weights)?,
        Source::Checkpoint(dir, layer) => MoeLayer::from_checkpoint(dir, layer)?,
        Source::Usage => {
            return Err(Error::Usage(
                "give --config and --weights, or --checkpoint and --layer".into(),
            ))
        }
    };
    if let Some(d) = dtype {
        layer = layer.with_expert_dtype(d.parse()?);
    }
    let x = io::load_input(input)?;
    let h = layer.dims().hidden;
    if x.shape()[1] != h {
        return Err(Error::Input {
            path: input.display().to_string(),
            what: format!(
                "x has width {}, but the layer's hidden size is H = {h}",
                x.shape()[1]
            ),
        });
    }
    let out = match ep {
        Some(n) => moe_kernels::ep::forward_in_process(&layer, &dev, &x, n)?.output,
        None => layer.forward(&dev, &x)?,
    };
    let (t, k) = (out.tokens, out.slots);
    let to_i32 = |v: &[u32]| v.iter().map(|&a| a as i32).collect::<Vec<_>>();
    let mut tensors = vec![
        ("y", OutTensor::Tensor(out.y_tensor()?)),
        (
            "topk_ids",
            OutTensor::I32(vec![t, k], to_i32(&out.topk_ids)),
        ),
        (
            "topk_weights",
            OutTensor::F32(vec![t, k], out.topk_weights.clone()),
        ),
    ];
    let r = &layer.config.routing;
    if r.capacity.is_some() || r.expert_choice.is_some() {
        tensors.push(("kept", OutTensor::I32(vec![t, k], to_i32(&out.kept))));
    }
    io::save(output, &tensors)?;
    let ranks = ep.map_or(String::new(), |n| format!(" as {n} expert-parallel ranks"));
    println!(
        "wrote {} (T = {t}, H = {}, {k} slots per token) with backend {}{ranks}",
        output.display(),
        out.hidden,
        dev.kind()
    );
    Ok(ExitCode::SUCCESS)
}

fn import(
    dir: &std::path::Path,
    layer: &str,
    weights: &std::path::Path,
    config: &std::path::Path,
) -> Result<ExitCode> {
    let ck = moe_kernels::checkpoint::read_layer(dir, layer.parse()?)?;
    let (family, quantization, spec) = (ck.family, ck.quantization, ck.layer);
    // Built (and so validated) before anything is written; then moved, not copied, out.
    let moe = MoeLayer::from_file_tensors(ck.config, ck.tensors, &ck.origin)?;
    let (cfg, dims) = (moe.config, moe.dims());
    let tensors = moe.into_file_tensors()?;
    let (names, values): (Vec<String>, Vec<OutTensor>) = tensors
        .into_iter()
        .map(|(n, t)| (n, OutTensor::File(t)))
        .unzip();
    let named: Vec<(&str, OutTensor)> = names.iter().map(String::as_str).zip(values).collect();
    io::save(weights, &named)?;
    std::fs::write(config, cfg.to_json()).map_err(|source| Error::Io {
        path: config.to_path_buf(),
        source,
    })?;
    println!(
        "wrote {} and {} ({family} layer {spec}, quantization {quantization}: E = {}, H = {}, F = {})",
        weights.display(),
        config.display(),
        dims.experts,
        dims.hidden,
        dims.ffn
    );
    Ok(ExitCode::SUCCESS)
}

fn info() -> Result<ExitCode> {
    println!("moe-kernels {}", env!("CARGO_PKG_VERSION"));
    println!("backends (auto picks the first usable one of cuda, wgpu, cpu):");
    for kind in [BackendKind::Cpu, BackendKind::Cuda, BackendKind::Wgpu] {
        match unavailable_reason(kind) {
            None if kind == BackendKind::Cpu => println!(
                "  {kind:<5} usable ({} threads)",
                rayon::current_num_threads()
            ),
            None => println!("  {kind:<5} usable"),
            Some(why) => println!("  {kind:<5} not usable: {why}"),
        }
    }
    #[cfg(feature = "cuda")]
    if let Ok(devs) = moe_kernels::cuda::probe() {
        for d in devs {
            println!(
                "  cuda device {}: {} (sm_{}{}, {:.1} GiB)",
                d.ordinal,
                d.name,
                d.compute_capability.0,
                d.compute_capability.1,
                d.total_mem_bytes as f64 / (1u64 << 30) as f64
            );
        }
    }
    #[cfg(feature = "wgpu")]
    if let Ok(ads) = moe_kernels::wgpu::probe() {
        for a in ads {
            println!(
                "  wgpu adapter: {} [{}; {}; {}]",
                a.name, a.backend, a.device_type, a.driver
            );
            println!("    optional features: {}", a.features);
        }
    }
    if let Ok(b) = Backend::auto() {
        println!("auto selects: {}", b.kind());
    }
    Ok(ExitCode::SUCCESS)
}

/// The base matrix a tensor belongs to (`experts.up_proj` for `experts.up_proj_scales`), or
/// `None` for a tensor that is not part of a quantized matrix.
fn matrix_of(name: &str) -> Option<&'static str> {
    MATRIX_NAMES.iter().copied().find(|m| {
        name == *m
            || name
                .strip_prefix(m)
                .is_some_and(|rest| quant::parts::SUFFIXES.contains(&rest))
    })
}

/// The config `moe info --weights` validates a file under when none is given: gated iff the
/// file has `experts.gate_proj`, top-1 softmax routing (valid for every E).
fn config_off_file(tensors: &std::collections::BTreeMap<String, FileTensor>) -> LayerConfig {
    let gated = tensors
        .keys()
        .any(|n| matrix_of(n) == Some("experts.gate_proj"));
    let mut cfg = LayerConfig {
        activation: if gated {
            Activation::Swiglu
        } else {
            Activation::Relu
        },
        ..LayerConfig::default()
    };
    cfg.routing.top_k = 1;
    cfg
}

/// The layer's matrix `name` (routed `experts.*` or shared `shared.*`).
fn layer_matrix<'a>(layer: &'a MoeLayer, name: &str) -> Option<&'a Weight> {
    let (w, proj) = match name.split_once('.') {
        Some(("experts", p)) => (&layer.experts, p),
        Some(("shared", p)) => (&layer.shared.as_ref()?.weights, p),
        _ => return None,
    };
    match proj {
        "gate_proj" => w.gate.as_ref(),
        "up_proj" => Some(&w.up),
        "down_proj" => Some(&w.down),
        _ => None,
    }
}

/// `moe info --weights W [--config C]`: every tensor of a weights file, each quantized matrix
/// with its parts, after the validation `moe run` does (with C, or a config read off the
/// file: gating from the presence of `experts.gate_proj`).
fn info_weights(path: &std::path::Path, config: Option<&std::path::Path>) -> Result<ExitCode> {
    let origin = path.display().to_string();
    let tensors = io::load_file_tensors(path)?;
    // What the file stores, before validation takes the tensors apart.
    let stored: Vec<(String, &'static str, Vec<usize>, u64)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dtype_name(), t.shape().to_vec(), t.byte_len()))
        .collect();
    let cfg = match config {
        Some(c) => LayerConfig::from_file(c)?,
        None => config_off_file(&tensors),
    };
    let layer = MoeLayer::from_file_tensors(cfg, tensors, &origin)?;
    let d = layer.dims();
    let format = layer.experts.up.format_name();
    println!("{origin}: {} tensors", stored.len());
    println!(
        "  E = {}, H = {}, F = {}{}, expert weights {format}, {}",
        d.experts,
        d.hidden,
        d.ffn,
        layer.shared.as_ref().map_or(String::new(), |s| format!(
            ", shared expert Fs = {}",
            s.weights.up.shape().get(1).copied().unwrap_or(0)
        )),
        match config {
            Some(c) => format!("valid for {}", c.display()),
            None => "valid (no --config: gating read off the file)".into(),
        }
    );
    // One row: indent, name, format, layout, shape, bytes.
    let row = |indent: usize, name: &str, format: &str, layout: &str, shape: &str, bytes: &str| {
        println!(
            "{:indent$}{name:<w$} {format:<8} {layout:<38} {shape:<20} {bytes:>12}",
            "",
            w = 32 - indent
        );
    };
    row(2, "tensor / matrix", "format", "layout", "shape", "bytes");
    let mut total = 0u64;
    // Canonical order: validation has checked that every tensor is one of these or a part of
    // a quantized matrix.
    for name in TENSOR_NAMES {
        let parts: Vec<&(String, &str, Vec<usize>, u64)> = stored
            .iter()
            .filter(|(n, ..)| n == name || matrix_of(n) == Some(name))
            .collect();
        total += parts.iter().map(|p| p.3).sum::<u64>();
        match (layer_matrix(&layer, name), parts.first()) {
            (_, None) => {}
            (Some(Weight::Quant(q)), _) => {
                let mut shape = vec![q.experts, q.rows, q.cols];
                if name.starts_with("shared.") {
                    shape.remove(0);
                }
                let layout = describe_layout(q);
                let bytes = q.packed_bytes().to_string();
                row(
                    2,
                    name,
                    q.format.name(),
                    &layout,
                    &format!("{shape:?}"),
                    &bytes,
                );
                for (n, dt, sh, b) in parts {
                    row(4, n, dt, "", &format!("{sh:?}"), &b.to_string());
                }
            }
            (_, Some((_, dt, sh, b))) => {
                let dense = dt.to_lowercase();
                row(2, name, &dense, "", &format!("{sh:?}"), &b.to_string());
            }
        }
    }
    row(2, "total", "", "", "", &total.to_string());
    println!("  ({} as stored)", human_bytes(total));
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn bench(
    presets: &str,
    tokens: &str,
    backend: &str,
    (dtype, quant, act): (&str, Option<&str>, Option<&str>),
    (iters, warmup): (usize, usize),
    json: bool,
    routing: &str,
    dense: usize,
    ep: Option<usize>,
) -> Result<ExitCode> {
    if ep == Some(0) {
        return Err(Error::Usage("--ep must be at least 1 rank".into()));
    }
    use moe_kernels::bench::{self, Routing};
    let dev = Backend::from_name(backend)?;
    let dtype: DType = dtype.parse()?;
    let quant = parse_quant(quant)?.map(QuantSpec::new);
    let act: DType = match act {
        Some(a) => a.parse()?,
        None if dev.kind() == BackendKind::Cpu => DType::F32,
        // 16-bit activations on CUDA wait for a GPU to verify them (MOE_CUDA_ACT16).
        #[cfg(feature = "cuda")]
        None if dev.kind() == BackendKind::Cuda && !moe_kernels::cuda::act16_enabled() => {
            DType::F32
        }
        None => DType::BF16,
    };
    let parse_list = |flag: &str, v: &str| -> Result<Vec<String>> {
        let items: Vec<String> = v
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        if items.is_empty() {
            return Err(Error::Usage(format!("{flag} is empty")));
        }
        Ok(items)
    };
    let tokens: Vec<usize> = parse_list("--tokens", tokens)?
        .iter()
        .map(|t| {
            t.parse()
                .map_err(|_| Error::Usage(format!("--tokens: {t:?} is not a token count")))
        })
        .collect::<Result<_>>()?;
    let routings: Vec<Routing> = if routing == "both" {
        vec![Routing::Uniform, Routing::Skewed]
    } else {
        parse_list("--routing", routing)?
            .iter()
            .map(|r| r.parse())
            .collect::<Result<_>>()?
    };
    let shapes: Vec<bench::Shape> = parse_list("--preset", presets)?
        .iter()
        .map(|n| bench::shape(n))
        .collect::<Result<_>>()?;

    if let Some(world) = ep {
        let layers = shapes
            .iter()
            .map(|shape| match &quant {
                Some(spec) => bench::quantized_layer(shape, spec),
                None => bench::layer(shape, dtype),
            })
            .collect::<Result<Vec<_>>>()?;
        return bench_ep(
            &dev,
            &shapes,
            &layers,
            (&tokens, &routings, act),
            world,
            (iters, warmup),
            json,
        );
    }
    // Ceilings measured in this run, on this device.
    let copy_gbs = bench::copy_bandwidth(&dev, 1 << 30)?;
    // wgpu: what a WGSL kernel that only reads can stream (256 MiB, or the largest binding);
    // measured again for each point over that point's expert weight bytes (%read).
    let read_gbs = bench::read_bandwidth(&dev, 1 << 28)?;
    let dense_tflops = if dense > 0 {
        Some(bench::dense_ceiling(&dev, dtype, dense)?)
    } else {
        None
    };
    if !json {
        let weights = match &quant {
            Some(q) => format!("{} expert weights, packed bytes counted", q.format),
            None => format!("{dtype} expert weights"),
        };
        println!(
            "moe bench on {} ({weights}; median of {iters} after {warmup} warm-up)",
            dev.kind()
        );
        println!("ceilings measured now: copy {copy_gbs:.0} GB/s (read + write)");
        if let Some(r) = read_gbs {
            println!(
                "                       WGSL read kernel {r:.2} GB/s (read only; per point: rdGB/s)"
            );
        }
        if let Some(d) = dense_tflops {
            println!("                       our expert GEMM, one {dense}x{dense} expert, 8192 rows: {d:.2} TFLOP/s");
        }
        println!(
            "{:<14} {:>6} {:>8} {:>9} {:>9} {:>9} {:>11} {:>9} {:>10} {:>8} {:>7} {:>7} {:>6} {:>7} {:>6} {:>11}",
            "shape",
            "T",
            "routing",
            "router",
            "gate",
            "permute",
            "expert_gemm",
            "combine",
            "layer(us)",
            "TFLOP/s",
            "%dense",
            "wGB/s",
            "%copy",
            "rdGB/s",
            "%read",
            "enqueue(us)"
        );
    }
    let total = (shapes.len() * tokens.len() * routings.len()) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // The expert weights' format: the dtype, or the quantized format (`dtype` in --json).
    let weight_format = quant.map_or(dtype.name(), |q| q.format.name());
    for shape in &shapes {
        bar.set_message(format!("{}: generating weights", shape.name));
        let layer = match &quant {
            Some(spec) => bench::quantized_layer(shape, spec)?,
            None => bench::layer(shape, dtype)?,
        };
        for &t in &tokens {
            for &routing in &routings {
                bar.set_message(format!("{} T={t}", shape.name));
                let p = bench::run_point(&dev, shape, &layer, (t, act), warmup, iters, routing)?;
                bar.inc(1);
                let us = |s: Stage| {
                    p.stages
                        .iter()
                        .find(|(x, _)| *x == s)
                        .map_or(f64::NAN, |(_, d)| d.as_secs_f64() * 1e6)
                };
                let g = us(Stage::ExpertGemm) / 1e6;
                let tflops = p.gemm_flops / g / 1e12;
                let gbs = p.gemm_weight_bytes / g / 1e9;
                let pct_dense = dense_tflops.map_or(f64::NAN, |d| 100.0 * tflops / d);
                let pct_copy = 100.0 * gbs / copy_gbs;
                // The read kernel over the same number of bytes, right after the point.
                let point_read = match read_gbs {
                    Some(_) => bench::read_bandwidth(&dev, p.gemm_weight_bytes as usize)?,
                    None => None,
                };
                let pct_read = point_read.map_or(f64::NAN, |r| 100.0 * gbs / r);
                let enqueue_us = p.enqueue.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
                let rname = match routing {
                    Routing::Uniform => "uniform",
                    Routing::Skewed => "skewed",
                };
                if json {
                    let line = serde_json::json!({
                        "shape": p.shape, "tokens": t, "dtype": weight_format, "act": act.name(), "backend": dev.kind().name(),
                        "routing": rname, "max_load": p.max_load, "mean_load": p.mean_load,
                        "router_us": us(Stage::Router), "gate_us": us(Stage::Gate), "permute_us": us(Stage::Permute),
                        "expert_gemm_us": us(Stage::ExpertGemm), "combine_us": us(Stage::Combine),
                        "layer_us": p.layer.as_secs_f64() * 1e6, "gemm_tflops": tflops, "gemm_weight_gbs": gbs,
                        "copy_gbs": copy_gbs, "dense_tflops": dense_tflops, "pct_copy": pct_copy,
                        "read_gbs": point_read, "pct_read": point_read.map(|_| pct_read),
                        "pct_dense": dense_tflops.map(|_| pct_dense), "enqueue_us": p.enqueue.map(|d| d.as_secs_f64() * 1e6),
                        "quant": p.quant.map(|q| q.format.name()), "scale_dtype": p.quant.map(|q| q.scale_dtype),
                        "group": p.quant.map(|q| q.group), "zeros": p.quant.map(|q| q.zeros),
                        "gemm_weight_bytes": p.gemm_weight_bytes,
                    });
                    bar.suspend(|| println!("{line}"));
                } else {
                    bar.suspend(|| {
                        println!(
                            "{:<14} {:>6} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>11.1} {:>9.1} {:>10.1} {:>8.2} {:>7.1} {:>7.2} {:>6.1} {:>7.2} {:>6.1} {:>11.1}",
                            p.shape, t, rname, us(Stage::Router), us(Stage::Gate), us(Stage::Permute), us(Stage::ExpertGemm),
                            us(Stage::Combine), p.layer.as_secs_f64() * 1e6, tflops, pct_dense, gbs, pct_copy,
                            point_read.unwrap_or(f64::NAN), pct_read, enqueue_us
                        )
                    });
                }
            }
        }
    }
    bar.finish_and_clear();
    Ok(ExitCode::SUCCESS)
}

/// `moe bench --ep N`: each shape, token count and routing as N in-process ranks next to one
/// device (see `moe_kernels::ep::bench`).
fn bench_ep(
    dev: &Backend,
    shapes: &[moe_kernels::bench::Shape],
    layers: &[MoeLayer],
    (tokens, routings, act): (&[usize], &[moe_kernels::bench::Routing], DType),
    world: usize,
    (iters, warmup): (usize, usize),
    json: bool,
) -> Result<ExitCode> {
    use moe_kernels::bench::{self, Routing};
    if !json {
        println!(
            "moe bench --ep: EP {world} in-process ranks on {} ({act} activations; median of \
             {iters} after {warmup} warm-up; per-rank times are the slowest rank's)",
            dev.kind()
        );
        println!(
            "{:<14} {:>6} {:>8} {:>11} {:>11} {:>11} {:>10} {:>11} {:>8} {:>10} {:>8}",
            "shape",
            "T",
            "routing",
            "single(ms)",
            "EP wall(ms)",
            "compute(ms)",
            "layout(ms)",
            "exchange(ms)",
            "rows",
            "peer MB",
            "bitwise"
        );
    }
    let mut all_bitwise = true;
    for (shape, layer) in shapes.iter().zip(layers) {
        for &t in tokens {
            for &routing in routings {
                let x = bench::input(layer, t, routing)?.cast(act);
                let p = moe_kernels::ep::bench::run_point(dev, layer, &x, world, warmup, iters)?;
                all_bitwise &= p.bitwise;
                let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
                let rname = match routing {
                    Routing::Uniform => "uniform",
                    Routing::Skewed => "skewed",
                };
                if json {
                    let line = serde_json::json!({
                        "shape": shape.name, "tokens": t, "routing": rname, "ep": world,
                        "backend": dev.kind().name(), "act": act.name(),
                        "single_ms": ms(p.single), "ep_wall_ms": ms(p.wall),
                        "compute_ms": ms(p.compute), "layout_ms": ms(p.layout),
                        "exchange_ms": ms(p.exchange), "rows": p.rows, "peer_bytes": p.bytes,
                        "bitwise": p.bitwise,
                    });
                    println!("{line}");
                } else {
                    println!(
                        "{:<14} {:>6} {:>8} {:>11.2} {:>11.2} {:>11.2} {:>10.3} {:>11.2} {:>8} {:>10.3} {:>8}",
                        shape.name,
                        t,
                        rname,
                        ms(p.single),
                        ms(p.wall),
                        ms(p.compute),
                        ms(p.layout),
                        ms(p.exchange),
                        p.rows,
                        p.bytes as f64 / 1e6,
                        if p.bitwise { "yes" } else { "NO" }
                    );
                }
            }
        }
    }
    if !all_bitwise {
        return Err(Error::Usage(
            "an EP forward was not bitwise the single-device forward".into(),
        ));
    }
    Ok(ExitCode::SUCCESS)
}
