//! A Mixtral MoE block in a candle program: the layer is loaded through a candle `VarBuilder`
//! from a sharded safetensors checkpoint with Hugging Face names (the tiny Mixtral that
//! transformers wrote under tests/fixtures/checkpoints/mixtral_bf16/), run with
//! `MoeBlock::forward` on candle tensors, and compared with transformers' float64 output of
//! the same layer. Prints the error and PASS (exit 0) or FAIL (exit 1).
//!
//! `cargo run --release --features candle --example candle_mixtral`

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use moe_kernels::candle::MoeBlock;

/// The layer of the fixture that is MoE (its case file says so too).
const LAYER: usize = 1;
/// DESIGN.md section 5: f32 activations against the f64 reference.
const BOUND: f64 = 1e-5;

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoints");
    let dir = fixtures.join("mixtral_bf16");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let shards = shards(&dir)?;
    // SAFETY: the fixture files are not modified while they are mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&shards, DType::F32, &Device::Cpu)? };
    let block = MoeBlock::new(&config, LAYER, vb.pp(format!("model.layers.{LAYER}")))?;

    let x = candle_core::safetensors::load(
        fixtures.join("mixtral_bf16.input.safetensors"),
        &Device::Cpu,
    )?
    .remove("x")
    .ok_or("the input file has no x")?;
    let expected = candle_core::safetensors::load(
        fixtures.join("mixtral_bf16.expected.safetensors"),
        &Device::Cpu,
    )?;
    let want = |name: &str| {
        expected
            .get(name)
            .ok_or(format!("no {name} in the expected file"))
    };

    let (y, routing) = block.forward_with_routing(&x)?;
    let err = rel_l2(&y, want("y")?)?;
    // transformers' `selected` is [T, E] with 1 at each token's top-k experts.
    let selected: Vec<Vec<i32>> = want("selected")?.to_vec2()?;
    let ids: Vec<Vec<u32>> = routing.topk_ids.to_vec2()?;
    let same_topk = ids.iter().zip(&selected).all(|(picks, row)| {
        let mut ours: Vec<usize> = picks.iter().map(|&e| e as usize).collect();
        ours.sort_unstable();
        let theirs: Vec<usize> = (0..row.len()).filter(|&e| row[e] == 1).collect();
        ours == theirs
    });
    let (t, h) = x.dims2()?;
    println!(
        "candle MoeBlock, Mixtral layer {LAYER} from {} shards via VarBuilder (E = {}, top-{}), \
         x [{t}, {h}] f32 on the CPU: rel L2 vs transformers float64 = {err:.2e} (bound {BOUND:.0e}), \
         top-k {}",
        shards.len(),
        block.num_experts(),
        block.slots(),
        if same_topk { "equal" } else { "DIFFER" }
    );
    let pass = err <= BOUND && same_topk;
    println!("{}", if pass { "PASS" } else { "FAIL" });
    Ok(pass)
}

/// The shards listed by the checkpoint's index, in order.
fn shards(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.join("model.safetensors.index.json"),
    )?)?;
    let map = index["weight_map"]
        .as_object()
        .ok_or("index without weight_map")?;
    let mut files: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    files.sort_unstable();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Relative L2 distance of `y` from the f64 reference `want`.
fn rel_l2(y: &Tensor, want: &Tensor) -> candle_core::Result<f64> {
    let y = y.to_dtype(DType::F64)?;
    let num = (&y - want)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let den = want.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((num / den).sqrt())
}
