//! End-to-end tests of the `moe` binary (DESIGN.md section 4).
//!
//! Every bad input to `moe run` must end with exit status 1 and an `error: …` line on stderr
//! that names what is wrong — never a panic (status 101) and never a silent success. The good
//! cases check the output file's tensors: `y` [T, H] in x's dtype, `topk_ids` I32 [T, k],
//! `topk_weights` F32 [T, k] and, with capacity, `kept` I32 [T, k].
//!
//! Each test builds its files from a seeded synthetic layer in its own folder under the
//! system temp dir; the folder is removed when the test passes and kept when it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use half::f16;
use moe_kernels::io::{save, OutTensor};
use moe_kernels::layer::TENSOR_NAMES;
use moe_kernels::synth::{random_layer, random_x, Extras};
use moe_kernels::{Activation, DType, Preset, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

/// Experts, hidden size, FFN width and tokens of the synthetic layer.
const E: usize = 4;
const H: usize = 8;
const F: usize = 6;
const T: usize = 5;

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// One tensor as raw little-endian bytes, any safetensors dtype.
#[derive(Clone, Debug)]
struct Raw {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Raw {
    fn f32(name: &str, shape: &[usize], data: &[f32]) -> Raw {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}");
        Raw {
            name: name.into(),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    fn from_tensor(name: &str, t: &Tensor) -> Raw {
        Raw::f32(name, t.shape(), &t.to_f32_vec())
    }

    /// Seeded values in [-1, 1] (never all zero) of any shape.
    fn random(name: &str, shape: &[usize], seed: u64) -> Raw {
        let n = shape.iter().product();
        Raw::f32(name, shape, &lcg_f32(n, seed))
    }

    /// The same values stored as F64.
    fn to_f64(&self) -> Raw {
        let bytes = self
            .as_f32()
            .iter()
            .flat_map(|&v| f64::from(v).to_le_bytes())
            .collect();
        Raw {
            dtype: Dtype::F64,
            bytes,
            ..self.clone()
        }
    }

    /// The values truncated to integers, stored as I64.
    fn to_i64(&self) -> Raw {
        let bytes = self
            .as_f32()
            .iter()
            .flat_map(|&v| ((v * 10.0) as i64).to_le_bytes())
            .collect();
        Raw {
            dtype: Dtype::I64,
            bytes,
            ..self.clone()
        }
    }

    /// The values rounded to F16.
    fn to_f16(&self) -> Raw {
        let bytes = self
            .as_f32()
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        Raw {
            dtype: Dtype::F16,
            bytes,
            ..self.clone()
        }
    }

    fn as_f32(&self) -> Vec<f32> {
        assert_eq!(self.dtype, Dtype::F32);
        self.bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

/// `n` deterministic values in [-1, 1].
fn lcg_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `n` deterministic bytes.
fn lcg_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 56) as u8
        })
        .collect()
}

/// Writes raw tensors with the `safetensors` crate.
fn write_raw(path: &Path, tensors: &[Raw]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|r| {
            let v = TensorView::new(r.dtype, r.shape.clone(), &r.bytes)
                .unwrap_or_else(|e| panic!("test bug: view {}: {e}", r.name));
            (r.name.clone(), v)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path)
        .unwrap_or_else(|e| panic!("test bug: write {}: {e}", path.display()));
}

/// The tensors of a good synthetic layer (E, H, F above) for `activation`, all F32.
fn layer_tensors(activation: Activation) -> Vec<Raw> {
    let mut config = Preset::Mixtral.config();
    config.activation = activation;
    let layer =
        random_layer(config, E, H, F, Extras::default(), DType::F32, 11).expect("synthetic layer");
    let mut out = vec![Raw::from_tensor("router.weight", &layer.router_weight)];
    if let Some(g) = &layer.experts.gate {
        out.push(Raw::from_tensor("experts.gate_proj", g.dense().unwrap()));
    }
    out.push(Raw::from_tensor(
        "experts.up_proj",
        layer.experts.up.dense().unwrap(),
    ));
    out.push(Raw::from_tensor(
        "experts.down_proj",
        layer.experts.down.dense().unwrap(),
    ));
    for r in &out {
        assert!(TENSOR_NAMES.contains(&r.name.as_str()), "{}", r.name);
    }
    out
}

/// Good swiglu (gated) layer tensors.
fn gated() -> Vec<Raw> {
    layer_tensors(Activation::Swiglu)
}

/// `tensors` without `name`.
fn without(mut tensors: Vec<Raw>, name: &str) -> Vec<Raw> {
    let before = tensors.len();
    tensors.retain(|r| r.name != name);
    assert_eq!(tensors.len() + 1, before, "test bug: no tensor {name}");
    tensors
}

/// `tensors` with `name` replaced by `r` (renamed to `name`).
fn replaced(tensors: Vec<Raw>, name: &str, r: Raw) -> Vec<Raw> {
    let mut t = without(tensors, name);
    t.push(Raw {
        name: name.into(),
        ..r
    });
    t
}

/// `tensors` with `name` changed by `f`.
fn mapped(tensors: Vec<Raw>, name: &str, f: impl Fn(&Raw) -> Raw) -> Vec<Raw> {
    let r = tensors
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("test bug: no tensor {name}"))
        .clone();
    replaced(tensors, name, f(&r))
}

fn with(mut tensors: Vec<Raw>, r: Raw) -> Vec<Raw> {
    tensors.push(r);
    tensors
}

/// A good input `x` [t, h].
fn x_raw(t: usize, h: usize) -> Raw {
    Raw::from_tensor("x", &random_x(t, h, 3))
}

/// A folder of its own for one test (or one case), with a good config, layer and input.
struct Fixture {
    dir: PathBuf,
    config: PathBuf,
    weights: PathBuf,
    input: PathBuf,
    output: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let dir = std::env::temp_dir().join(format!("moe-cli-test-{}-{safe}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let fx = Fixture {
            config: dir.join("config.json"),
            weights: dir.join("weights.safetensors"),
            input: dir.join("input.safetensors"),
            output: dir.join("output.safetensors"),
            dir,
        };
        fx.set_config(r#"{"preset": "mixtral"}"#);
        fx.set_weights(&gated());
        // The input goes through the library's own writer.
        let x = random_x(T, H, 3);
        save(
            &fx.input,
            &[("x", OutTensor::F32(x.shape().to_vec(), x.to_f32_vec()))],
        )
        .expect("save input");
        fx
    }

    fn set_config(&self, json: &str) {
        std::fs::write(&self.config, json).expect("write config");
    }

    fn set_weights(&self, tensors: &[Raw]) {
        write_raw(&self.weights, tensors);
    }

    fn set_input(&self, tensors: &[Raw]) {
        write_raw(&self.input, tensors);
    }

    /// `moe run` on this fixture's files with `--backend cpu` and `extra` arguments.
    fn run(&self, extra: &[&str]) -> Output {
        self.run_backend(Some("cpu"), extra)
    }

    /// `moe run` with `--backend B` (left out when `None`) and `extra` arguments.
    fn run_backend(&self, backend: Option<&str>, extra: &[&str]) -> Output {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--config".into(),
            self.config.display().to_string(),
            "--weights".into(),
            self.weights.display().to_string(),
            "--input".into(),
            self.input.display().to_string(),
            "--output".into(),
            self.output.display().to_string(),
        ];
        if let Some(b) = backend {
            args.push("--backend".into());
            args.push(b.into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        moe(&args)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs the `moe` binary with `args`, `MOE_BACKEND` unset.
fn moe<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .env_remove("MOE_BACKEND")
        .output()
        .expect("spawn moe")
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `Err(why)` unless `out` is a clean failure: status exactly 1, no panic, an `error:` line
/// and every needle (case-insensitive) on stderr.
fn check_fails(out: &Output, needles: &[&str]) -> Result<(), String> {
    // Shown with `--nocapture`, to read the messages themselves.
    println!(
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    let mut problems = Vec::new();
    if out.status.code() != Some(1) {
        problems.push(format!("exit status {:?}, want 1", out.status.code()));
    }
    if stderr.contains("panicked") || stderr.contains("rust_backtrace") {
        problems.push("stderr shows a panic".to_string());
    }
    if !stderr.contains("error:") {
        problems.push("stderr has no `error:` line".to_string());
    }
    for n in needles {
        if !stderr.contains(&n.to_lowercase()) {
            problems.push(format!("stderr does not mention {n:?}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{}\n{}", problems.join("; "), describe(out)))
    }
}

#[track_caller]
fn assert_fails(out: &Output, needles: &[&str]) {
    if let Err(why) = check_fails(out, needles) {
        panic!("{why}");
    }
}

#[track_caller]
fn assert_ok(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(0) && !stderr.contains("panicked"),
        "expected success\n{}",
        describe(out)
    );
}

/// Runs a table of cases; every case runs, and the test fails listing each one that failed.
fn run_table(cases: Vec<(String, Result<(), String>)>) {
    let total = cases.len();
    let failed: Vec<String> = cases
        .into_iter()
        .filter_map(|(name, r)| r.err().map(|why| format!("=== case `{name}`: {why}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {total} cases failed:\n{}",
        failed.len(),
        failed.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Reading the output
// ---------------------------------------------------------------------------------------------

/// One output tensor.
struct OutT {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl OutT {
    fn f32s(&self) -> Vec<f32> {
        assert_eq!(self.dtype, Dtype::F32);
        self.bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn i32s(&self) -> Vec<i32> {
        assert_eq!(self.dtype, Dtype::I32);
        self.bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn read_output(path: &Path) -> BTreeMap<String, OutT> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("output is a valid safetensors file");
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            (
                name,
                OutT {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    bytes: v.data().to_vec(),
                },
            )
        })
        .collect()
}

/// Checks the output's names, dtypes and shapes and that every id is in 0..E; returns it.
#[track_caller]
fn check_output(path: &Path, t: usize, k: usize, kept: bool) -> BTreeMap<String, OutT> {
    let out = read_output(path);
    let mut want = vec!["topk_ids", "topk_weights", "y"];
    if kept {
        want.insert(0, "kept");
    }
    let names: Vec<&str> = out.keys().map(String::as_str).collect();
    assert_eq!(names, want, "output tensors");
    assert_eq!(out["y"].dtype, Dtype::F32, "y dtype");
    assert_eq!(out["y"].shape, [t, H], "y shape");
    assert_eq!(out["topk_ids"].dtype, Dtype::I32, "topk_ids dtype");
    assert_eq!(out["topk_ids"].shape, [t, k], "topk_ids shape");
    assert_eq!(out["topk_weights"].dtype, Dtype::F32, "topk_weights dtype");
    assert_eq!(out["topk_weights"].shape, [t, k], "topk_weights shape");
    let ids = out["topk_ids"].i32s();
    assert!(
        ids.iter().all(|&i| (0..E as i32).contains(&i)),
        "topk_ids out of 0..{E}: {ids:?}"
    );
    if kept {
        assert_eq!(out["kept"].dtype, Dtype::I32, "kept dtype");
        assert_eq!(out["kept"].shape, [t, k], "kept shape");
        let kv = out["kept"].i32s();
        assert!(kv.iter().all(|&v| v == 0 || v == 1), "kept not 0/1: {kv:?}");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Good runs
// ---------------------------------------------------------------------------------------------

#[test]
fn good_run_writes_y_ids_weights() {
    let fx = Fixture::new("good_run");
    assert_ok(&fx.run(&[]));
    let out = check_output(&fx.output, T, 2, false);
    assert!(out["y"].f32s().iter().all(|v| v.is_finite()), "y finite");
    let w = out["topk_weights"].f32s();
    for row in w.chunks(2) {
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "mixtral renormalises: {row:?}");
    }
}

#[test]
fn good_run_default_backend() {
    // No --backend: auto picks whatever runs here (the CPU on a machine without GPU kernels).
    let fx = Fixture::new("good_run_auto");
    assert_ok(&fx.run_backend(None, &[]));
    check_output(&fx.output, T, 2, false);
}

#[test]
fn zero_tokens() {
    let fx = Fixture::new("zero_tokens");
    fx.set_input(&[Raw::f32("x", &[0, H], &[])]);
    assert_ok(&fx.run(&[]));
    check_output(&fx.output, 0, 2, false);
}

#[test]
fn nan_and_inf_in_x() {
    let fx = Fixture::new("nan_inf");
    let mut x = lcg_f32(7 * H, 5);
    x[..H].fill(f32::NAN); // token 0: all NaN
    x[H..2 * H].fill(f32::INFINITY); // token 1: all +Inf
    x[2 * H..3 * H].fill(f32::NEG_INFINITY); // token 2: all -Inf
    x[3 * H] = f32::NAN; // token 3: one NaN
    x[4 * H] = f32::INFINITY; // token 4: one +Inf
    x[5 * H + 1] = f32::NEG_INFINITY; // token 5: one -Inf
    fx.set_input(&[Raw::f32("x", &[7, H], &x)]);
    assert_ok(&fx.run(&[]));
    let out = check_output(&fx.output, 7, 2, false);
    // Token 6 is finite and must stay finite.
    let y = out["y"].f32s();
    assert!(y[6 * H..].iter().all(|v| v.is_finite()), "finite token's y");
}

#[test]
fn nan_in_x_with_capacity_and_groups() {
    // The ids stay in 0..E on the capacity and group paths too.
    for (i, cfg) in [
        r#"{"preset": "mixtral", "capacity": {"tokens": 2}}"#,
        r#"{"preset": "mixtral", "groups": {"count": 2, "keep": 1}, "scoring": "sigmoid"}"#,
        r#"{"preset": "mixtral", "scoring": "logits", "combine": "softmax_selected"}"#,
    ]
    .iter()
    .enumerate()
    {
        let fx = Fixture::new(&format!("nan_paths_{i}"));
        fx.set_config(cfg);
        let mut x = lcg_f32(4 * H, 6);
        x[..H].fill(f32::NAN);
        x[H..2 * H].fill(f32::INFINITY);
        x[2 * H] = f32::NEG_INFINITY;
        fx.set_input(&[Raw::f32("x", &[4, H], &x)]);
        let out = fx.run(&[]);
        assert!(
            out.status.code() == Some(0),
            "config {cfg}\n{}",
            describe(&out)
        );
        check_output(&fx.output, 4, 2, cfg.contains("capacity"));
    }
}

#[test]
fn capacity_writes_kept() {
    let fx = Fixture::new("capacity_kept");
    fx.set_config(r#"{"preset": "mixtral", "capacity": {"tokens": 1}}"#);
    assert_ok(&fx.run(&[]));
    let out = check_output(&fx.output, T, 2, true);
    // 5 tokens × 2 picks into 4 experts of capacity 1: some assignments are dropped.
    let kept = out["kept"].i32s();
    assert!(kept.iter().sum::<i32>() <= E as i32, "kept {kept:?}");
}

#[test]
fn capacity_from_preset_writes_kept() {
    // switch: top-1, ReLU (no gate_proj), capacity 64 tokens.
    let fx = Fixture::new("capacity_preset");
    fx.set_config(r#"{"preset": "switch"}"#);
    fx.set_weights(&layer_tensors(Activation::Relu));
    assert_ok(&fx.run(&[]));
    check_output(&fx.output, T, 1, true);
}

#[test]
fn expert_choice_writes_kept() {
    let fx = Fixture::new("expert_choice");
    fx.set_config(r#"{"preset": "mixtral", "expert_choice": {"capacity_factor": 2.0}}"#);
    assert_ok(&fx.run(&[]));
    // Expert choice gives every token E slots.
    check_output(&fx.output, T, E, true);
}

#[test]
fn no_capacity_no_kept() {
    let fx = Fixture::new("no_capacity");
    // nllb_moe has a capacity by default; null removes it.
    fx.set_config(r#"{"preset": "nllb_moe", "capacity": null}"#);
    fx.set_weights(&layer_tensors(Activation::Relu));
    assert_ok(&fx.run(&[]));
    check_output(&fx.output, T, 2, false);
}

#[test]
fn dtype_flags_run() {
    for d in ["f32", "f16", "bf16"] {
        let fx = Fixture::new(&format!("dtype_{d}"));
        let out = fx.run(&["--dtype", d]);
        assert!(
            out.status.code() == Some(0),
            "--dtype {d}\n{}",
            describe(&out)
        );
        let o = check_output(&fx.output, T, 2, false);
        assert!(o["y"].f32s().iter().all(|v| v.is_finite()), "--dtype {d}");
    }
}

#[test]
fn f16_weights_run() {
    let fx = Fixture::new("f16_weights");
    let t: Vec<Raw> = gated()
        .into_iter()
        .map(|r| {
            if r.name.starts_with("experts.") {
                r.to_f16()
            } else {
                r
            }
        })
        .collect();
    fx.set_weights(&t);
    assert_ok(&fx.run(&[]));
    check_output(&fx.output, T, 2, false);
}

#[test]
fn info_exits_0() {
    let out = moe(&["info"]);
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("cpu"),
        "info lists the cpu backend\n{}",
        describe(&out)
    );
}

#[test]
fn demo_small_passes() {
    let out = moe(&[
        "demo",
        "--tokens",
        "5",
        "--hidden",
        "16",
        "--ffn",
        "24",
        "--backend",
        "cpu",
    ]);
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("PASS"),
        "{}",
        describe(&out)
    );
}

#[test]
fn demo_past_the_limits_fails_cleanly() {
    // 1e11 tokens (6 PiB of buffers) and a 175 TiB layer: refused with the numbers, before
    // anything that large is allocated, on the CPU and on whatever `auto` picks.
    for backend in ["cpu", "auto"] {
        let out = moe(&["demo", "--backend", backend, "--tokens", "100000000000"]);
        assert_fails(&out, &["needs", "more than the"]);
        let out = moe(&[
            "demo",
            "--backend",
            backend,
            "--hidden",
            "1000000",
            "--ffn",
            "1000000",
        ]);
        assert_fails(&out, &["synthetic layer", "available host memory"]);
    }
}

#[test]
fn run_past_the_limits_fails_cleanly() {
    // Expert choice gives each of T = 131072 tokens E = 8192 slots: x_perm [T·E, 64] is
    // 275 GB, from a 32 MB input and 4 MB of weights.
    let fx = Fixture::new("past_limits");
    fx.set_config(r#"{"expert_choice": {"capacity_factor": 1.0}, "activation": "relu"}"#);
    let mut config = Preset::Mixtral.config();
    config.activation = Activation::Relu;
    let layer = random_layer(config, 8192, 64, 1, Extras::default(), DType::F32, 1)
        .expect("synthetic layer");
    fx.set_weights(&[
        Raw::from_tensor("router.weight", &layer.router_weight),
        Raw::from_tensor("experts.up_proj", layer.experts.up.dense().unwrap()),
        Raw::from_tensor("experts.down_proj", layer.experts.down.dense().unwrap()),
    ]);
    fx.set_input(&[x_raw(131_072, 64)]);
    assert_fails(
        &fx.run(&[]),
        &["131072-token forward", "available host memory"],
    );
    assert_fails(
        &fx.run_backend(None, &[]),
        &["131072-token forward", "needs"],
    );
}

#[test]
fn demo_small_auto_passes() {
    let out = moe(&["demo", "--tokens", "5", "--hidden", "16", "--ffn", "24"]);
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("PASS"),
        "{}",
        describe(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// Bad weights
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_weights() {
    let relu = r#"{"preset": "mixtral", "activation": "relu"}"#;
    let mix = r#"{"preset": "mixtral"}"#;
    // (case, config, weights, needles)
    let cases: Vec<(&str, &str, Vec<Raw>, Vec<&str>)> = vec![
        (
            "missing experts.down_proj",
            mix,
            without(gated(), "experts.down_proj"),
            vec!["missing", "experts.down_proj"],
        ),
        (
            "missing experts.up_proj",
            mix,
            without(gated(), "experts.up_proj"),
            vec!["missing", "experts.up_proj"],
        ),
        (
            "missing router.weight",
            mix,
            without(gated(), "router.weight"),
            vec!["missing", "router.weight"],
        ),
        (
            "unknown tensor",
            mix,
            with(gated(), Raw::random("foo.bar", &[3], 1)),
            vec!["unexpected", "foo.bar"],
        ),
        (
            "up_proj rank 2",
            mix,
            replaced(gated(), "experts.up_proj", Raw::random("", &[E * F, H], 2)),
            vec!["up_proj", "rank"],
        ),
        (
            "down_proj rank 4",
            mix,
            replaced(
                gated(),
                "experts.down_proj",
                Raw::random("", &[E, H, F, 1], 2),
            ),
            vec!["down_proj"],
        ),
        (
            "E: router.weight has E+1 rows",
            mix,
            replaced(gated(), "router.weight", Raw::random("", &[E + 1, H], 3)),
            vec!["router.weight"],
        ),
        (
            "E: down_proj has E+1 experts",
            mix,
            replaced(
                gated(),
                "experts.down_proj",
                Raw::random("", &[E + 1, H, F], 3),
            ),
            vec!["down_proj"],
        ),
        (
            "E: gate_proj has E-1 experts",
            mix,
            replaced(
                gated(),
                "experts.gate_proj",
                Raw::random("", &[E - 1, F, H], 3),
            ),
            vec!["gate_proj"],
        ),
        (
            "H: router.weight has H+1 columns",
            mix,
            replaced(gated(), "router.weight", Raw::random("", &[E, H + 1], 4)),
            vec!["router.weight"],
        ),
        (
            "H: down_proj has H+1 rows",
            mix,
            replaced(
                gated(),
                "experts.down_proj",
                Raw::random("", &[E, H + 1, F], 4),
            ),
            vec!["down_proj"],
        ),
        (
            "F: down_proj has F+1 columns",
            mix,
            replaced(
                gated(),
                "experts.down_proj",
                Raw::random("", &[E, H, F + 1], 5),
            ),
            vec!["down_proj"],
        ),
        (
            "F: gate_proj has F+1 rows",
            mix,
            replaced(
                gated(),
                "experts.gate_proj",
                Raw::random("", &[E, F + 1, H], 5),
            ),
            vec!["gate_proj"],
        ),
        (
            "router.bias wrong length",
            mix,
            with(gated(), Raw::random("router.bias", &[E + 1], 6)),
            vec!["router.bias"],
        ),
        (
            "experts.down_proj_bias wrong shape",
            mix,
            with(
                gated(),
                Raw::random("experts.down_proj_bias", &[E, H + 1], 6),
            ),
            vec!["down_proj_bias"],
        ),
        (
            "gate_proj present for relu",
            relu,
            gated(),
            vec!["gate_proj", "not gated"],
        ),
        (
            "gate_proj missing for swiglu",
            mix,
            without(gated(), "experts.gate_proj"),
            vec!["experts.gate_proj", "gated"],
        ),
        (
            "shared.up_proj without shared.down_proj",
            mix,
            with(gated(), Raw::random("shared.up_proj", &[F, H], 7)),
            vec!["shared.down_proj"],
        ),
        (
            "router.weight F64",
            mix,
            mapped(gated(), "router.weight", Raw::to_f64),
            vec!["F64", "router.weight", "dtype"],
        ),
        (
            "experts.up_proj I64",
            mix,
            mapped(gated(), "experts.up_proj", Raw::to_i64),
            vec!["I64", "experts.up_proj", "dtype"],
        ),
        (
            "no experts (E = 0)",
            mix,
            vec![
                Raw::f32("router.weight", &[0, H], &[]),
                Raw::f32("experts.gate_proj", &[0, F, H], &[]),
                Raw::f32("experts.up_proj", &[0, F, H], &[]),
                Raw::f32("experts.down_proj", &[0, H, F], &[]),
            ],
            vec!["E = 0"],
        ),
    ];
    let results = cases
        .into_iter()
        .enumerate()
        .map(|(i, (name, cfg, weights, needles))| {
            let fx = Fixture::new(&format!("bad_weights_{i}"));
            fx.set_config(cfg);
            fx.set_weights(&weights);
            let out = fx.run(&[]);
            (name.to_string(), check_fails(&out, &needles))
        })
        .collect();
    run_table(results);
}

/// The byte-level corruptions applied to both the weights and the input file.
fn corruptions(good: &[u8]) -> Vec<(&'static str, Vec<u8>, Vec<&'static str>)> {
    let mut garbage_json = 40u64.to_le_bytes().to_vec();
    garbage_json.extend_from_slice(b"{this is [not] json at all;;; \x01\x02\x03 ??");
    let mut bad_offsets = Vec::new();
    let header = br#"{"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,1000]}}"#;
    bad_offsets.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bad_offsets.extend_from_slice(header);
    bad_offsets.extend_from_slice(&[0u8; 16]);
    let mut short_header = 1000u64.to_le_bytes().to_vec();
    short_header.extend_from_slice(b"{}");
    vec![
        (
            "truncated to half",
            good[..good.len() / 2].to_vec(),
            vec!["safetensors"],
        ),
        (
            "last byte cut",
            good[..good.len() - 1].to_vec(),
            vec!["safetensors"],
        ),
        ("random bytes", lcg_bytes(512, 9), vec!["safetensors"]),
        ("garbage JSON header", garbage_json, vec!["safetensors"]),
        (
            "header longer than the file",
            short_header,
            vec!["safetensors"],
        ),
        ("offsets past the end", bad_offsets, vec!["safetensors"]),
        ("empty file", Vec::new(), vec!["safetensors"]),
        ("four bytes", vec![1, 2, 3, 4], vec!["safetensors"]),
    ]
}

#[test]
fn corrupt_weights_files() {
    let fx0 = Fixture::new("corrupt_weights_src");
    let good = std::fs::read(&fx0.weights).unwrap();
    let results = corruptions(&good)
        .into_iter()
        .enumerate()
        .map(|(i, (name, bytes, needles))| {
            let fx = Fixture::new(&format!("corrupt_weights_{i}"));
            std::fs::write(&fx.weights, bytes).unwrap();
            let mut needles = needles;
            needles.push("weights.safetensors");
            (
                format!("weights: {name}"),
                check_fails(&fx.run(&[]), &needles),
            )
        })
        .collect();
    run_table(results);
}

#[test]
fn corrupt_input_files() {
    let fx0 = Fixture::new("corrupt_input_src");
    let good = std::fs::read(&fx0.input).unwrap();
    let results = corruptions(&good)
        .into_iter()
        .enumerate()
        .map(|(i, (name, bytes, needles))| {
            let fx = Fixture::new(&format!("corrupt_input_{i}"));
            std::fs::write(&fx.input, bytes).unwrap();
            let mut needles = needles;
            needles.push("input.safetensors");
            (
                format!("input: {name}"),
                check_fails(&fx.run(&[]), &needles),
            )
        })
        .collect();
    run_table(results);
}

// ---------------------------------------------------------------------------------------------
// Missing files
// ---------------------------------------------------------------------------------------------

#[test]
fn nonexistent_paths() {
    let mut results = Vec::new();
    for which in ["config", "weights", "input"] {
        let fx = Fixture::new(&format!("nonexistent_{which}"));
        let missing = fx.dir.join(format!("does-not-exist-{which}.file"));
        let path = match which {
            "config" => &fx.config,
            "weights" => &fx.weights,
            _ => &fx.input,
        };
        std::fs::remove_file(path).unwrap();
        // Point the argument at a name that never existed.
        let mut args: Vec<String> = vec!["run".into()];
        for (flag, p) in [
            ("--config", &fx.config),
            ("--weights", &fx.weights),
            ("--input", &fx.input),
            ("--output", &fx.output),
        ] {
            args.push(flag.into());
            if flag.trim_start_matches("--") == which {
                args.push(missing.display().to_string());
            } else {
                args.push(p.display().to_string());
            }
        }
        args.extend(["--backend".into(), "cpu".into()]);
        let out = moe(&args);
        let name = format!("does-not-exist-{which}");
        results.push((format!("nonexistent {which}"), check_fails(&out, &[&name])));
    }
    // A directory where a file is expected.
    let fx = Fixture::new("weights_is_dir");
    std::fs::remove_file(&fx.weights).unwrap();
    std::fs::create_dir(&fx.weights).unwrap();
    results.push((
        "weights path is a directory".into(),
        check_fails(&fx.run(&[]), &["weights.safetensors"]),
    ));
    // An output in a folder that does not exist.
    let fx = Fixture::new("output_no_dir");
    let out = moe(&[
        "run",
        "--config",
        &fx.config.display().to_string(),
        "--weights",
        &fx.weights.display().to_string(),
        "--input",
        &fx.input.display().to_string(),
        "--output",
        &fx.dir
            .join("no-such-dir/out.safetensors")
            .display()
            .to_string(),
        "--backend",
        "cpu",
    ]);
    results.push((
        "output folder missing".into(),
        check_fails(&out, &["out.safetensors"]),
    ));
    run_table(results);
}

// ---------------------------------------------------------------------------------------------
// Bad configs
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_configs() {
    // (case, JSON, needles)
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        (
            "malformed JSON",
            r#"{"preset": "mixtral", "top_k": }"#,
            vec!["config"],
        ),
        ("truncated JSON", r#"{"preset": "mixtral""#, vec!["config"]),
        ("empty config", "", vec!["config"]),
        ("not an object", "[1, 2, 3]", vec!["config"]),
        (
            "unknown key",
            r#"{"preset": "mixtral", "topk": 2}"#,
            vec!["unknown key", "topk"],
        ),
        (
            "unknown key in groups",
            r#"{"groups": {"count": 2, "keep": 1, "drop": 1}}"#,
            vec!["drop"],
        ),
        (
            "wrong type: top_k string",
            r#"{"preset": "mixtral", "top_k": "two"}"#,
            vec!["invalid type", "two"],
        ),
        (
            "wrong type: renormalize number",
            r#"{"renormalize": 1}"#,
            vec!["invalid type"],
        ),
        (
            "wrong type: top_k float",
            r#"{"top_k": 1.5}"#,
            vec!["invalid type"],
        ),
        (
            "wrong type: groups number",
            r#"{"groups": 4}"#,
            vec!["invalid type"],
        ),
        ("unknown preset", r#"{"preset": "llama"}"#, vec!["llama"]),
        (
            "unknown activation",
            r#"{"activation": "tanh"}"#,
            vec!["tanh"],
        ),
        (
            "unknown scoring",
            r#"{"scoring": "argmax"}"#,
            vec!["argmax"],
        ),
        (
            "top_k = 0",
            r#"{"preset": "mixtral", "top_k": 0}"#,
            vec!["top_k"],
        ),
        ("top_k = -1", r#"{"top_k": -1}"#, vec!["top_k"]),
        (
            "top_k > E",
            r#"{"preset": "mixtral", "top_k": 5}"#,
            vec!["top_k", "E = 4"],
        ),
        (
            "preset top_k > E (qwen3_moe, top-8)",
            r#"{"preset": "qwen3_moe"}"#,
            vec!["top_k", "E = 4"],
        ),
        (
            "groups.count does not divide E",
            r#"{"groups": {"count": 3, "keep": 1}}"#,
            vec!["groups.count", "divide"],
        ),
        (
            "groups.count = 0",
            r#"{"groups": {"count": 0, "keep": 0}}"#,
            vec!["groups.count"],
        ),
        (
            "groups.keep > count",
            r#"{"groups": {"count": 2, "keep": 3}}"#,
            vec!["groups.keep"],
        ),
        (
            "groups.keep = 0",
            r#"{"groups": {"count": 2, "keep": 0}}"#,
            vec!["groups.keep"],
        ),
        (
            "top_k > experts in kept groups",
            r#"{"top_k": 2, "groups": {"count": 4, "keep": 1}}"#,
            vec!["top_k", "kept groups"],
        ),
        (
            "groups negative",
            r#"{"groups": {"count": -2, "keep": 1}}"#,
            vec!["config"],
        ),
        (
            "capacity tokens 0",
            r#"{"capacity": {"tokens": 0}}"#,
            vec!["capacity"],
        ),
        (
            "capacity tokens negative",
            r#"{"capacity": {"tokens": -3}}"#,
            vec!["capacity"],
        ),
        (
            "capacity fraction 0",
            r#"{"capacity": {"fraction": 0.0}}"#,
            vec!["capacity"],
        ),
        (
            "capacity fraction negative",
            r#"{"capacity": {"fraction": -0.5}}"#,
            vec!["capacity"],
        ),
        (
            "capacity factor 0",
            r#"{"capacity": {"factor": 0}}"#,
            vec!["capacity"],
        ),
        (
            "capacity factor negative",
            r#"{"capacity": {"factor": -1.25}}"#,
            vec!["capacity"],
        ),
        (
            "capacity unknown kind",
            r#"{"capacity": {"percent": 10}}"#,
            vec!["percent"],
        ),
        (
            "expert_choice capacity_factor 0",
            r#"{"expert_choice": {"capacity_factor": 0}}"#,
            vec!["expert_choice"],
        ),
        (
            "expert_choice with capacity",
            r#"{"expert_choice": {"capacity_factor": 1.0}, "capacity": {"tokens": 2}}"#,
            vec!["expert_choice", "capacity"],
        ),
        (
            "top_k 1e18 (fits u64, far past E)",
            r#"{"top_k": 1000000000000000000}"#,
            vec!["top_k", "E = 4"],
        ),
        (
            "top_k past u64",
            r#"{"top_k": 100000000000000000000000000000}"#,
            vec!["top_k"],
        ),
        (
            "groups.count u64::MAX",
            r#"{"groups": {"count": 18446744073709551615, "keep": 1}}"#,
            vec!["groups.count", "divide"],
        ),
        (
            "groups.count past u64",
            r#"{"groups": {"count": 18446744073709551616, "keep": 1}}"#,
            vec!["groups"],
        ),
        (
            "capacity tokens past i64",
            r#"{"capacity": {"tokens": 9223372036854775808}}"#,
            vec!["capacity"],
        ),
        (
            "capacity factor overflows to infinity",
            r#"{"capacity": {"factor": 1e400}}"#,
            vec!["config"],
        ),
        (
            "clamped_swiglu limit 0",
            r#"{"activation": {"clamped_swiglu": {"alpha": 1.702, "limit": 0}}}"#,
            vec!["clamped_swiglu"],
        ),
    ];
    let results = cases
        .into_iter()
        .enumerate()
        .map(|(i, (name, json, needles))| {
            let fx = Fixture::new(&format!("bad_config_{i}"));
            fx.set_config(json);
            (name.to_string(), check_fails(&fx.run(&[]), &needles))
        })
        .collect();
    run_table(results);
}

/// Huge but valid numbers mean "no limit": they run (on the CPU and on the backend `auto`
/// picks) and allocate nothing in proportion to them.
#[test]
fn huge_valid_config_numbers_run() {
    let cases = [
        r#"{"capacity": {"tokens": 9223372036854775807}}"#,
        r#"{"capacity": {"factor": 1e300}}"#,
        r#"{"capacity": {"fraction": 1e300}, "priority": "top1_score"}"#,
        r#"{"expert_choice": {"capacity_factor": 1e300}}"#,
    ];
    for (i, json) in cases.iter().enumerate() {
        let fx = Fixture::new(&format!("huge_valid_{i}"));
        fx.set_config(json);
        for out in [fx.run(&[]), fx.run_backend(None, &[])] {
            assert_ok(&out);
            let slots = if json.contains("expert_choice") { E } else { 2 };
            let tensors = check_output(&fx.output, T, slots, true);
            // Nothing is dropped under a capacity that large.
            let kept = tensors["kept"].i32s();
            assert!(kept.iter().all(|&k| k == 1), "{json}: {kept:?}");
        }
    }
}

/// A type error should say which key has the wrong type, not only where in the file.
#[test]
fn wrong_type_names_the_key() {
    let results = [
        ("top_k", r#"{"preset": "mixtral", "top_k": "two"}"#),
        ("renormalize", r#"{"renormalize": 1}"#),
        ("scale", r#"{"scale": "big"}"#),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (key, json))| {
        let fx = Fixture::new(&format!("wrong_type_key_{i}"));
        fx.set_config(json);
        (
            format!("wrong type for {key}"),
            check_fails(&fx.run(&[]), &[key]),
        )
    })
    .collect();
    run_table(results);
}

// ---------------------------------------------------------------------------------------------
// Bad inputs
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_inputs() {
    let cases: Vec<(&str, Vec<Raw>, Vec<&str>)> = vec![
        ("no x", vec![Raw::random("y", &[T, H], 1)], vec![r#""x""#]),
        ("no tensors at all", vec![], vec![r#""x""#]),
        (
            "x plus an extra tensor",
            vec![x_raw(T, H), Raw::random("z", &[2], 1)],
            vec![r#""z""#],
        ),
        (
            "x rank 1",
            vec![Raw::random("x", &[H], 2)],
            vec!["x", "[T, H]"],
        ),
        (
            "x rank 3",
            vec![Raw::random("x", &[1, T, H], 2)],
            vec!["x", "[T, H]"],
        ),
        (
            "x scalar (rank 0)",
            vec![Raw::random("x", &[], 2)],
            vec!["x", "[T, H]"],
        ),
        ("x width H+1", vec![x_raw(T, H + 1)], vec!["width", "H = 8"]),
        ("x width H-1", vec![x_raw(T, H - 1)], vec!["width", "H = 8"]),
        (
            "x width 0",
            vec![Raw::f32("x", &[T, 0], &[])],
            vec!["width"],
        ),
        (
            "x F64",
            vec![x_raw(T, H).to_f64()],
            vec!["F64", "x", "dtype"],
        ),
        (
            "x I64",
            vec![x_raw(T, H).to_i64()],
            vec!["I64", "x", "dtype"],
        ),
    ];
    let results = cases
        .into_iter()
        .enumerate()
        .map(|(i, (name, input, needles))| {
            let fx = Fixture::new(&format!("bad_input_{i}"));
            fx.set_input(&input);
            (name.to_string(), check_fails(&fx.run(&[]), &needles))
        })
        .collect();
    run_table(results);
}

// ---------------------------------------------------------------------------------------------
// Bad flags
// ---------------------------------------------------------------------------------------------

#[test]
fn backend_bogus() {
    let fx = Fixture::new("backend_bogus");
    assert_fails(&fx.run_backend(Some("bogus"), &[]), &["bogus", "backend"]);
    assert!(!fx.output.exists(), "no output on failure");
}

/// On a machine without the GPU kernels, cuda and wgpu must fail cleanly naming the backend.
/// (Today neither is implemented anywhere, so they fail everywhere; once a backend computes,
/// this test accepts success when the backend is usable here.)
#[test]
fn backend_cuda_and_wgpu_unavailable() {
    let mut results = Vec::new();
    for b in ["cuda", "wgpu"] {
        let fx = Fixture::new(&format!("backend_{b}"));
        let out = fx.run_backend(Some(b), &[]);
        let r = if out.status.code() == Some(0) {
            let info = moe(&["info"]);
            let usable = String::from_utf8_lossy(&info.stdout)
                .lines()
                .any(|l| l.trim_start().starts_with(b) && l.contains(" usable"));
            if usable {
                Ok(())
            } else {
                Err(format!(
                    "--backend {b} succeeded but `moe info` does not call it usable\n{}",
                    describe(&out)
                ))
            }
        } else {
            check_fails(&out, &[b, "not available"])
        };
        results.push((format!("--backend {b}"), r));
    }
    run_table(results);
}

#[test]
fn dtype_f8() {
    let fx = Fixture::new("dtype_f8");
    assert_fails(&fx.run(&["--dtype", "f8"]), &["f8", "dtype"]);
    assert!(!fx.output.exists(), "no output on failure");
}

#[test]
fn demo_bad_flags() {
    let results = vec![
        (
            "demo --backend bogus".to_string(),
            check_fails(&moe(&["demo", "--backend", "bogus"]), &["bogus"]),
        ),
        (
            "demo --dtype f8".to_string(),
            check_fails(
                &moe(&["demo", "--dtype", "f8", "--backend", "cpu"]),
                &["f8"],
            ),
        ),
        (
            "demo --hidden 0".to_string(),
            check_fails(
                &moe(&["demo", "--hidden", "0", "--backend", "cpu"]),
                &["--hidden"],
            ),
        ),
    ];
    run_table(results);
}

/// A `caused by:` line must add something: an I/O error's cause is not printed twice.
#[test]
fn io_error_cause_not_repeated() {
    let fx = Fixture::new("io_cause_once");
    std::fs::remove_file(&fx.weights).unwrap();
    let out = fx.run(&[]);
    assert_fails(&out, &["weights.safetensors"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut seen = String::new();
    for line in stderr.lines() {
        if let Some(cause) = line.trim_start().strip_prefix("caused by: ") {
            assert!(
                !seen.contains(cause),
                "cause {cause:?} repeats what was already printed\n{}",
                describe(&out)
            );
        }
        seen.push_str(line);
        seen.push('\n');
    }
}

// ---------------------------------------------------------------------------------------------
// Activation dtype (issue 12): x in f16 or bf16 runs the forward in that dtype and writes y in it
// ---------------------------------------------------------------------------------------------

#[test]
fn half_precision_x_gives_y_in_its_dtype_on_cpu_and_wgpu() {
    use moe_kernels::{LayerConfig, MoeLayer};
    let backends: Vec<&str> = if moe_kernels::Backend::new(moe_kernels::BackendKind::Wgpu).is_ok() {
        vec!["cpu", "wgpu"]
    } else {
        assert!(std::env::var("CI").is_err(), "CI needs the wgpu backend");
        println!("[cli act dtype] wgpu skipped: no adapter");
        vec!["cpu"]
    };
    for (dtype, sdtype, bound) in [
        (DType::BF16, Dtype::BF16, 1e-2),
        (DType::F16, Dtype::F16, 5e-3),
    ] {
        for backend in &backends {
            let fx = Fixture::new(&format!("act_{dtype}_{backend}"));
            let t = 37;
            let x = random_x(t, H, 21).cast(dtype);
            save(&fx.input, &[("x", OutTensor::Tensor(x.clone()))]).expect("save input");
            assert_ok(&fx.run_backend(Some(backend), &[]));
            let out = read_output(&fx.output);
            assert_eq!(
                out["y"].dtype, sdtype,
                "{backend}: y is written in x's dtype"
            );
            assert_eq!(out["y"].shape, [t, H]);
            let y: Vec<f64> = out["y"]
                .bytes
                .chunks_exact(2)
                .map(|c| {
                    let b = u16::from_le_bytes([c[0], c[1]]);
                    match dtype {
                        DType::F16 => f16::from_bits(b).to_f64(),
                        _ => half::bf16::from_bits(b).to_f64(),
                    }
                })
                .collect();
            let cfg = LayerConfig::from_file(&fx.config).expect("config");
            let layer = MoeLayer::load(cfg, &fx.weights).expect("layer");
            let r = layer.forward_reference(&x).expect("reference");
            let (num, den) = y.iter().zip(&r.y).fold((0.0, 0.0), |(n, d), (a, b)| {
                (n + (a - b).powi(2), d + b * b)
            });
            let rel = (num / den).sqrt();
            assert!(rel <= bound, "{backend} {dtype}: rel L2 {rel:e} > {bound}");
            let ids = out["topk_ids"].i32s();
            let k = r.routing.slots;
            for tok in 0..t {
                let mut a: Vec<i32> = ids[tok * k..(tok + 1) * k].to_vec();
                let mut b: Vec<i32> = r.routing.topk_ids[tok * k..(tok + 1) * k]
                    .iter()
                    .map(|&v| v as i32)
                    .collect();
                a.sort_unstable();
                b.sort_unstable();
                assert_eq!(a, b, "{backend} {dtype}: token {tok}'s top-k set");
            }
            println!(
                "[cli act dtype] {backend} {dtype}: y {dtype}, rel L2 {rel:.2e}, top-k sets equal"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quantized expert weights (DESIGN.md section 4): `moe run`, `moe info --weights`,
// `moe demo --quant`, `moe bench --quant`
// ---------------------------------------------------------------------------------------------

mod quantized {
    use super::*;
    use moe_kernels::io::FileTensor;
    use moe_kernels::quant::{QuantFormat, QuantSpec};
    use moe_kernels::{LayerConfig, MoeLayer, TensorData};

    /// Sizes of the quantized layers: H and F multiples of 32 (MXFP4), F not a multiple of
    /// 128 (a partial FP8 block), an INT4 group of 32 along F and 64 along H.
    pub(super) const QE: usize = 4;
    pub(super) const QH: usize = 64;
    pub(super) const QF: usize = 96;
    pub(super) const QFS: usize = 32;

    /// A seeded Mixtral-routed layer with router bias, expert biases and a shared expert, its
    /// expert matrices quantized to `format` (or dense f32 for `None`).
    pub(super) fn layer(format: Option<QuantFormat>) -> MoeLayer {
        let extras = Extras {
            router_bias: true,
            expert_biases: true,
            shared_ffn: Some(QFS),
            shared_gate: true,
            ..Extras::default()
        };
        let dense = random_layer(Preset::Mixtral.config(), QE, QH, QF, extras, DType::F32, 29)
            .expect("synthetic layer");
        match format {
            Some(f) => dense.quantized(&QuantSpec::new(f)).expect("quantize"),
            None => dense,
        }
    }

    /// The layer's tensors as raw tensors (to mutate them).
    pub(super) fn raws(layer: &MoeLayer) -> Vec<Raw> {
        layer
            .file_tensors()
            .expect("file tensors")
            .into_iter()
            .map(|(name, t)| {
                let (dtype, bytes) = match &t {
                    FileTensor::Float(x) => match x.data() {
                        TensorData::F32(v) => (Dtype::F32, f32_le_bytes(v)),
                        TensorData::F16(v) => {
                            (Dtype::F16, v.iter().flat_map(|a| a.to_le_bytes()).collect())
                        }
                        TensorData::BF16(v) => (
                            Dtype::BF16,
                            v.iter().flat_map(|a| a.to_le_bytes()).collect(),
                        ),
                    },
                    FileTensor::U8(_, b) => (Dtype::U8, b.clone()),
                    FileTensor::F8E4M3(_, b) => (Dtype::F8_E4M3, b.clone()),
                };
                Raw {
                    name,
                    dtype,
                    shape: t.shape().to_vec(),
                    bytes,
                }
            })
            .collect()
    }

    fn f32_le_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|a| a.to_le_bytes()).collect()
    }

    /// Writes `layer` through the library's own writer (`OutTensor::File`).
    pub(super) fn save_layer(path: &Path, layer: &MoeLayer) {
        let t = layer.file_tensors().expect("file tensors");
        let named: Vec<(&str, OutTensor)> = t
            .iter()
            .map(|(n, f)| (n.as_str(), OutTensor::File(f.clone())))
            .collect();
        save(path, &named).expect("save quantized layer");
    }

    /// A raw tensor of `dtype` and `shape` filled with seeded bytes (valid for U8 / F8; for
    /// floats, small positive values).
    pub(super) fn raw_of(name: &str, dtype: Dtype, shape: &[usize]) -> Raw {
        let n: usize = shape.iter().product();
        let bytes = match dtype {
            Dtype::F32 => f32_le_bytes(&vec![0.01f32; n]),
            Dtype::F16 => (0..n)
                .flat_map(|_| f16::from_f32(0.01).to_le_bytes())
                .collect(),
            Dtype::BF16 => (0..n)
                .flat_map(|_| half::bf16::from_f32(0.01).to_le_bytes())
                .collect(),
            _ => lcg_bytes(n, 17).into_iter().map(|b| b & 0x77).collect(),
        };
        Raw {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            bytes,
        }
    }

    /// Relative L2 of `y` (from the output file, f32) against the reference.
    pub(super) fn rel_l2(y: &[f32], r: &[f64]) -> f64 {
        let (num, den) = y.iter().zip(r).fold((0.0, 0.0), |(n, d), (&a, &b)| {
            (n + (f64::from(a) - b).powi(2), d + b * b)
        });
        (num / den).sqrt()
    }

    /// `moe run` of the fixture's quantized file on `backend`: `Ok` when y matches the f64
    /// reference of the layer as loaded within 1e-5 and every token's top-k set is equal.
    pub(super) fn run_matches_reference(
        fx: &Fixture,
        layer_file: &MoeLayer,
        backend: &str,
    ) -> std::result::Result<String, String> {
        let out = fx.run_backend(Some(backend), &[]);
        if out.status.code() != Some(0) {
            return Err(format!("moe run failed\n{}", describe(&out)));
        }
        let cfg = LayerConfig::from_file(&fx.config).expect("config");
        let layer = MoeLayer::load(cfg, &fx.weights).expect("load the written file");
        if &layer != layer_file {
            return Err("the file does not load back as the layer written".into());
        }
        let x = moe_kernels::io::load_input(&fx.input).expect("input");
        let r = layer.forward_reference(&x).expect("reference");
        let o = read_output(&fx.output);
        let rel = rel_l2(&o["y"].f32s(), &r.y);
        let ids = o["topk_ids"].i32s();
        let k = r.routing.slots;
        for tok in 0..x.shape()[0] {
            let mut a: Vec<i32> = ids[tok * k..(tok + 1) * k].to_vec();
            let mut b: Vec<i32> = r.routing.topk_ids[tok * k..(tok + 1) * k]
                .iter()
                .map(|&v| v as i32)
                .collect();
            a.sort_unstable();
            b.sort_unstable();
            if a != b {
                return Err(format!("token {tok}: top-k {a:?}, reference {b:?}"));
            }
        }
        if rel.is_nan() || rel > 1e-5 {
            return Err(format!("rel L2 {rel:e} > 1e-5"));
        }
        Ok(format!("rel L2 {rel:.2e}"))
    }

    /// A fixture whose weights are `layer` (written by the library) and whose input is
    /// x [t, layer's H].
    pub(super) fn fixture(name: &str, layer: &MoeLayer, t: usize) -> Fixture {
        let fx = Fixture::new(name);
        save_layer(&fx.weights, layer);
        let x = random_x(t, layer.dims().hidden, 23);
        save(&fx.input, &[("x", OutTensor::Tensor(x))]).expect("save input");
        fx
    }

    pub(super) fn info_weights(fx: &Fixture, with_config: bool) -> Output {
        let mut args = vec![
            "info".to_string(),
            "--weights".to_string(),
            fx.weights.display().to_string(),
        ];
        if with_config {
            args.push("--config".into());
            args.push(fx.config.display().to_string());
        }
        moe(&args)
    }
}

/// `moe run` on a quantized file of each format on `backend` against the f64 reference.
fn run_quantized_files_on(backend: &str) {
    use moe_kernels::quant::QuantFormat;
    let mut results = Vec::new();
    for format in QuantFormat::ALL {
        let layer = quantized::layer(Some(format));
        let fx = quantized::fixture(&format!("quant_run_{backend}_{format}"), &layer, 13);
        let r = quantized::run_matches_reference(&fx, &layer, backend);
        if let Ok(msg) = &r {
            println!("[cli quant] {backend} {format}: {msg}");
        }
        results.push((format!("{backend} {format}"), r.map(|_| ())));
    }
    run_table(results);
}

#[test]
fn run_quantized_files_on_cpu_match_the_reference() {
    run_quantized_files_on("cpu");
}

/// The wgpu backend on quantized files: the same check as on the CPU.
#[test]
fn run_quantized_files_on_wgpu_match_the_reference() {
    if moe_kernels::Backend::new(moe_kernels::BackendKind::Wgpu).is_err() {
        assert!(std::env::var("CI").is_err(), "CI needs the wgpu backend");
        println!("[cli quant] wgpu skipped: no adapter");
        return;
    }
    run_quantized_files_on("wgpu");
}

#[test]
fn info_weights_names_each_matrix_format_and_bytes() {
    use moe_kernels::quant::QuantFormat;
    let mut results = Vec::new();
    for format in [None]
        .into_iter()
        .chain(QuantFormat::ALL.into_iter().map(Some))
    {
        let layer = quantized::layer(format);
        let name = format.map_or("dense".to_string(), |f| f.to_string());
        let fx = quantized::fixture(&format!("quant_info_{name}"), &layer, 1);
        let file_bytes: u64 = layer
            .file_tensors()
            .unwrap()
            .iter()
            .map(|(_, t)| t.byte_len())
            .sum();
        for with_config in [false, true] {
            let out = quantized::info_weights(&fx, with_config);
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            println!("{stdout}");
            let mut problems = Vec::new();
            if out.status.code() != Some(0) {
                problems.push("exit status".to_string());
            }
            let mats = [
                ("experts.gate_proj", layer.experts.gate.as_ref()),
                ("experts.up_proj", Some(&layer.experts.up)),
                ("experts.down_proj", Some(&layer.experts.down)),
                (
                    "shared.gate_proj",
                    layer.shared.as_ref().and_then(|s| s.weights.gate.as_ref()),
                ),
                (
                    "shared.up_proj",
                    layer.shared.as_ref().map(|s| &s.weights.up),
                ),
                (
                    "shared.down_proj",
                    layer.shared.as_ref().map(|s| &s.weights.down),
                ),
            ];
            for (m, w) in mats {
                let w = w.expect("the layer has every matrix");
                let fmt = w.format_name();
                let bytes = w.bytes().to_string();
                let line = stdout.lines().find(|l| {
                    let mut words = l.split_whitespace();
                    words.next() == Some(m)
                });
                match line {
                    Some(l) if l.split_whitespace().nth(1) == Some(fmt) && l.ends_with(&bytes) => {}
                    other => problems.push(format!(
                        "{m}: want a line `{m} {fmt} … {bytes}`, got {other:?}"
                    )),
                }
            }
            if let Some(f) = format {
                // Every part is listed under its matrix, with its dtype.
                for (n, t) in layer.file_tensors().unwrap() {
                    if n.ends_with("_scales") || n.ends_with("_scale_inv") || n.ends_with("_zeros")
                    {
                        let ok = stdout.lines().any(|l| {
                            let w: Vec<&str> = l.split_whitespace().collect();
                            w.first() == Some(&n.as_str()) && w.get(1) == Some(&t.dtype_name())
                        });
                        if !ok {
                            problems.push(format!("{f}: part {n} ({}) not listed", t.dtype_name()));
                        }
                    }
                }
            }
            let total = stdout.lines().find(|l| l.trim_start().starts_with("total"));
            if !total.is_some_and(|l| l.contains(&file_bytes.to_string())) {
                problems.push(format!("total line {total:?} lacks {file_bytes}"));
            }
            let case = format!("{name}, config {with_config}");
            results.push((
                case,
                if problems.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{}\n{}", problems.join("\n"), describe(&out)))
                },
            ));
        }
    }
    run_table(results);
}

#[test]
fn info_without_weights_still_lists_devices() {
    let out = moe(&["info"]);
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("backends"), "{}", describe(&out));
    // --config alone is a usage error.
    assert_fails(&moe(&["info", "--config", "c.json"]), &["--weights"]);
}

/// Malformed quantized files: `moe run` and `moe info --weights` exit 1 naming the tensor.
#[test]
fn bad_quantized_weights() {
    use moe_kernels::quant::QuantFormat::{Fp8Block, Int4, Mxfp4};
    use quantized::{raw_of, raws, QE, QF, QFS, QH};
    let fp8 = raws(&quantized::layer(Some(Fp8Block)));
    let mx = raws(&quantized::layer(Some(Mxfp4)));
    let int4 = raws(&quantized::layer(Some(Int4)));
    let dense = raws(&quantized::layer(None));
    let part = |t: &[Raw], name: &str| -> Raw {
        t.iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("test bug: no {name}"))
            .clone()
    };
    // (case, weights, needles)
    let cases: Vec<(&str, Vec<Raw>, Vec<&str>)> = vec![
        (
            "fp8 scale_inv shape mismatch",
            replaced(
                fp8.clone(),
                "experts.up_proj_scale_inv",
                raw_of("", Dtype::F32, &[QE, 1, 2]),
            ),
            vec!["experts.up_proj_scale_inv", "shape"],
        ),
        (
            "int4 scales shape mismatch (rows)",
            replaced(
                int4.clone(),
                "experts.down_proj_scales",
                raw_of("", Dtype::BF16, &[QE, QH + 1, 3]),
            ),
            vec!["experts.down_proj_scales"],
        ),
        (
            "mxfp4 scales shape mismatch",
            replaced(
                mx.clone(),
                "experts.gate_proj_scales",
                raw_of("", Dtype::U8, &[QE, QF, 1]),
            ),
            vec!["experts.gate_proj_scales", "shape"],
        ),
        (
            "mxfp4 K not a multiple of 32",
            // H = 48: router [E, 48], up/gate blocks hold 48 / 32 rounded down.
            replaced(
                mx.clone(),
                "router.weight",
                raw_of("", Dtype::F32, &[QE, 48]),
            ),
            vec!["experts.up_proj_blocks", "multiple of 32", "48"],
        ),
        (
            "int4 group does not divide K",
            replaced(
                replaced(
                    int4.clone(),
                    "experts.up_proj_scales",
                    raw_of("", Dtype::BF16, &[QE, QF, 3]),
                ),
                "experts.up_proj_zeros",
                raw_of("", Dtype::U8, &[QE, QF, 3]),
            ),
            vec!["experts.up_proj_scales", "divide", "64"],
        ),
        (
            "int4 zeros wrong shape",
            replaced(
                int4.clone(),
                "experts.down_proj_zeros",
                raw_of("", Dtype::U8, &[QE, QH, 7]),
            ),
            vec!["experts.down_proj_zeros", "shape"],
        ),
        (
            "int4 zeros not U8",
            mapped(int4.clone(), "experts.up_proj_zeros", |r| {
                raw_of("", Dtype::F16, &r.shape)
            }),
            vec!["experts.up_proj_zeros", "U8"],
        ),
        (
            "int4 zeros without packed codes",
            with(
                dense.clone(),
                raw_of("experts.up_proj_zeros", Dtype::U8, &[QE, QF, 2]),
            ),
            vec!["experts.up_proj_zeros", "no matrix"],
        ),
        (
            "F8 matrix without scale_inv",
            without(fp8.clone(), "experts.gate_proj_scale_inv"),
            vec!["experts.gate_proj", "scale_inv"],
        ),
        (
            "fp8 scale_inv in F16",
            mapped(fp8.clone(), "experts.down_proj_scale_inv", |r| {
                raw_of("", Dtype::F16, &r.shape)
            }),
            vec!["experts.down_proj_scale_inv", "F16"],
        ),
        (
            "scale_inv without a matrix (dense file)",
            with(
                dense.clone(),
                raw_of("experts.down_proj_scale_inv", Dtype::F32, &[QE, 1, 1]),
            ),
            vec!["experts.down_proj_scale_inv", "no matrix"],
        ),
        (
            "scales without blocks or packed codes",
            with(
                dense.clone(),
                raw_of("shared.up_proj_scales", Dtype::U8, &[QFS, 2]),
            ),
            vec!["shared.up_proj_scales", "no matrix"],
        ),
        (
            "two formats in one file (fp8 and int4 experts)",
            {
                let mut t = fp8.clone();
                t.retain(|r| !r.name.starts_with("experts.down_proj"));
                for p in ["_packed", "_scales", "_zeros"] {
                    t.push(part(&int4, &format!("experts.down_proj{p}")));
                }
                t
            },
            vec!["two formats", "experts.down_proj", "int4", "fp8"],
        ),
        (
            "two formats for one matrix (F8 and packed)",
            with(fp8.clone(), part(&int4, "experts.up_proj_packed")),
            vec!["experts.up_proj", "experts.up_proj_packed"],
        ),
        (
            "U8 dense matrix",
            mapped(dense.clone(), "experts.up_proj", |r| {
                raw_of("", Dtype::U8, &r.shape)
            }),
            vec!["experts.up_proj", "U8"],
        ),
        (
            "mxfp4 blocks wrong shape",
            mapped(mx.clone(), "experts.down_proj_blocks", |r| {
                raw_of("", Dtype::U8, &[r.shape[0], r.shape[1], r.shape[2], 8])
            }),
            vec!["experts.down_proj_blocks", "shape"],
        ),
        (
            "mxfp4 scales not U8",
            mapped(mx.clone(), "experts.up_proj_scales", |r| {
                raw_of("", Dtype::F32, &r.shape)
            }),
            vec!["experts.up_proj_scales", "U8"],
        ),
        (
            "shared expert scales wrong shape",
            mapped(int4.clone(), "shared.down_proj_scales", |r| {
                raw_of("", Dtype::BF16, &[r.shape[0] + 1, r.shape[1]])
            }),
            vec!["shared.down_proj_scales"],
        ),
        (
            "unknown quantized suffix",
            with(
                int4.clone(),
                raw_of("experts.up_proj_qweight", Dtype::U8, &[QE, QF, 8]),
            ),
            vec!["experts.up_proj_qweight", "unexpected"],
        ),
        (
            "packed codes of an F8 dtype",
            mapped(int4.clone(), "experts.gate_proj_packed", |r| Raw {
                dtype: Dtype::F8_E4M3,
                ..r.clone()
            }),
            vec!["experts.gate_proj_packed", "F8_E4M3"],
        ),
    ];
    let mut results = Vec::new();
    for (i, (case, weights, needles)) in cases.into_iter().enumerate() {
        let fx = Fixture::new(&format!("bad_quant_{i}"));
        fx.set_weights(&weights);
        let x = random_x(T, QH, 3);
        save(&fx.input, &[("x", OutTensor::Tensor(x))]).expect("save input");
        let mut r = check_fails(&fx.run(&[]), &needles);
        if r.is_ok() && fx.output.exists() {
            r = Err("output written on failure".into());
        }
        results.push((format!("run: {case}"), r));
        results.push((
            format!("info --weights: {case}"),
            check_fails(&quantized::info_weights(&fx, false), &needles),
        ));
        results.push((
            format!("info --weights --config: {case}"),
            check_fails(&quantized::info_weights(&fx, true), &needles),
        ));
    }
    run_table(results);
}

#[test]
fn demo_quant_on_cpu_passes() {
    let mut results = Vec::new();
    for q in ["int4", "fp8", "mxfp4"] {
        let out = moe(&[
            "demo",
            "--quant",
            q,
            "--backend",
            "cpu",
            "--tokens",
            "5",
            "--hidden",
            "64",
            "--ffn",
            "96",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let ok = out.status.code() == Some(0)
            && stdout.contains("PASS")
            && stdout.contains(&format!("expert weights {q}"))
            && stdout.contains(&format!("reference of the {q} layer"));
        results.push((
            format!("demo --quant {q}"),
            if ok { Ok(()) } else { Err(describe(&out)) },
        ));
    }
    run_table(results);
}

#[test]
fn demo_quant_bad_flags() {
    run_table(vec![
        (
            "mxfp4 with H not a multiple of 32".into(),
            check_fails(
                &moe(&[
                    "demo",
                    "--quant",
                    "mxfp4",
                    "--backend",
                    "cpu",
                    "--hidden",
                    "48",
                ]),
                &["mxfp4", "multiples of 32", "--hidden 48"],
            ),
        ),
        (
            "mxfp4 with F not a multiple of 32".into(),
            check_fails(
                &moe(&[
                    "demo",
                    "--quant",
                    "mxfp4",
                    "--backend",
                    "cpu",
                    "--ffn",
                    "100",
                ]),
                &["mxfp4", "multiples of 32", "--ffn 100"],
            ),
        ),
        (
            "unknown format".into(),
            check_fails(
                &moe(&["demo", "--quant", "q8", "--backend", "cpu"]),
                &["q8", "fp8, mxfp4 or int4"],
            ),
        ),
    ]);
}

/// On a GPU backend, a quantized demo passes or fails naming the format and the backend: it
/// never falls back to another backend.
#[test]
fn demo_quant_on_a_gpu_backend_passes_or_refuses_clearly() {
    let mut results = Vec::new();
    for b in ["wgpu", "cuda"] {
        let out = moe(&[
            "demo",
            "--quant",
            "int4",
            "--backend",
            b,
            "--tokens",
            "5",
            "--hidden",
            "64",
            "--ffn",
            "96",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let r = if out.status.code() == Some(0) {
            if stdout.contains(&format!("backend: {b}")) && stdout.contains("PASS") {
                Ok(())
            } else {
                Err(format!(
                    "succeeded without running on {b}\n{}",
                    describe(&out)
                ))
            }
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
            if stderr.contains("not available") {
                check_fails(&out, &[b])
            } else {
                check_fails(&out, &[b, "int4"])
            }
        };
        results.push((format!("demo --quant int4 --backend {b}"), r));
    }
    run_table(results);
}

#[test]
fn bench_quant_json_counts_packed_bytes() {
    let run = |quant: Option<&str>| {
        let mut args = vec![
            "bench",
            "--preset",
            "gpt4_small",
            "--tokens",
            "1,3",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--backend",
            "cpu",
            "--json",
        ];
        if let Some(q) = quant {
            args.extend(["--quant", q]);
        }
        moe(&args)
    };
    let lines = |out: &Output| -> Vec<serde_json::Value> {
        assert_ok(out);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    // The fields `moe bench --json` had before quantized weights: all still there.
    let fields = [
        "shape",
        "tokens",
        "dtype",
        "act",
        "backend",
        "routing",
        "max_load",
        "mean_load",
        "router_us",
        "gate_us",
        "permute_us",
        "expert_gemm_us",
        "combine_us",
        "layer_us",
        "gemm_tflops",
        "gemm_weight_gbs",
        "copy_gbs",
        "dense_tflops",
        "pct_copy",
        "pct_dense",
        "enqueue_us",
        "quant",
    ];
    let dense = lines(&run(None));
    let int4 = lines(&run(Some("int4")));
    assert_eq!(dense.len(), 2, "one line per point");
    assert_eq!(int4.len(), 2, "one line per point");
    for (d, q) in dense.iter().zip(&int4) {
        for f in fields {
            assert!(d.get(f).is_some(), "dense line lacks {f}: {d}");
            assert!(q.get(f).is_some(), "int4 line lacks {f}: {q}");
        }
        assert!(d["quant"].is_null(), "{d}");
        assert_eq!(d["dtype"], "bf16", "{d}");
        assert_eq!(q["quant"], "int4", "{q}");
        assert_eq!(q["dtype"], "int4", "the expert weights' format: {q}");
        // Same routing (same router weights and x): the same experts are read, so the weight
        // bytes differ by the packing alone. bf16 dense = 2 bytes per weight; int4 = 0.5 plus
        // a bf16 scale and a u8 zero point per group.
        let (db, qb) = (
            d["gemm_weight_bytes"].as_f64().unwrap(),
            q["gemm_weight_bytes"].as_f64().unwrap(),
        );
        let ratio = qb / db;
        assert!(
            (0.25..0.3).contains(&ratio),
            "int4 / bf16 weight bytes {qb} / {db} = {ratio}"
        );
        assert!(q["gemm_weight_gbs"].as_f64().unwrap() > 0.0, "{q}");
    }
}
