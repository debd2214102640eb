//! `moe import` reads only the chosen layer of a sharded checkpoint: on a generated
//! Mixtral-style checkpoint of more than 1 GB in four shards, importing one layer peaks below
//! twice that layer's bytes + 64 MiB of resident memory, whatever the checkpoint's total size.
//! (Linux: the child's peak RSS comes from `wait4`.)

use std::path::Path;
use std::process::Command;

use safetensors::tensor::{Dtype, TensorView};

const E: usize = 16;
const H: usize = 1024;
const F: usize = 2048;
const LAYERS: usize = 6;
const SHARDS: usize = 4;

/// Writes a bf16 Mixtral-style checkpoint: every expert matrix holds the same (non-zero)
/// pattern; layer L's experts are spread over every shard.
fn write_checkpoint(dir: &Path) -> (u64, u64) {
    let config = serde_json::json!({
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
        "hidden_size": H, "intermediate_size": F, "num_hidden_layers": LAYERS,
        "num_local_experts": E, "num_experts_per_tok": 2, "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let pattern: Vec<u8> = (0..F * H)
        .flat_map(|i| half::bf16::from_f32(((i % 251) as f32 - 125.0) / 4096.0).to_le_bytes())
        .collect();
    let router: Vec<u8> = pattern[..E * H * 2].to_vec();
    let mut names: Vec<(String, Vec<usize>, bool)> = Vec::new();
    for l in 0..LAYERS {
        names.push((
            format!("model.layers.{l}.block_sparse_moe.gate.weight"),
            vec![E, H],
            true,
        ));
        for j in 0..E {
            for (w, shape) in [("w1", [F, H]), ("w2", [H, F]), ("w3", [F, H])] {
                names.push((
                    format!("model.layers.{l}.block_sparse_moe.experts.{j}.{w}.weight"),
                    shape.to_vec(),
                    false,
                ));
            }
        }
    }
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for s in 0..SHARDS {
        let file = format!("model-{:05}-of-{SHARDS:05}.safetensors", s + 1);
        // Round-robin: every shard holds experts of every layer.
        let views: Vec<(String, TensorView)> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| i % SHARDS == s)
            .map(|(_, (n, shape, is_router))| {
                let data: &[u8] = if *is_router { &router } else { &pattern };
                (
                    n.clone(),
                    TensorView::new(Dtype::BF16, shape.clone(), data).unwrap(),
                )
            })
            .collect();
        for (n, _) in &views {
            weight_map.insert(n.clone(), serde_json::json!(file));
        }
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        total += std::fs::metadata(dir.join(&file)).unwrap().len();
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let layer = (E * H * 2 + E * 3 * F * H * 2) as u64;
    (total, layer)
}

#[cfg(target_os = "linux")]
#[test]
// The child is reaped by wait4 (for its rusage), not by Child::wait.
#[allow(clippy::zombie_processes)]
fn import_of_one_layer_stays_within_twice_its_bytes() {
    let dir = std::env::temp_dir().join(format!("moe-rss-checkpoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (total, layer) = write_checkpoint(&dir);
    assert!(total >= 1 << 30, "checkpoint is only {total} bytes");
    let (w, c) = (dir.join("w.safetensors"), dir.join("c.json"));
    let child = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args([
            "import",
            "--checkpoint",
            dir.to_str().unwrap(),
            "--layer",
            "3",
        ])
        .args([
            "--weights",
            w.to_str().unwrap(),
            "--config",
            c.to_str().unwrap(),
        ])
        .spawn()
        .expect("moe import starts");
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills; the pid is our own child, waited once.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "moe import failed: {status}"
    );
    let peak = usage.ru_maxrss as u64 * 1024;
    let bound = 2 * layer + (64 << 20);
    let written = std::fs::metadata(&w).unwrap().len();
    println!(
        "checkpoint {total} bytes in {SHARDS} shards; layer 3: {layer} bytes; import peak RSS {peak} bytes \
         (bound {bound}); wrote {written} bytes"
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        written >= layer,
        "the imported file ({written}) is smaller than the layer ({layer})"
    );
    assert!(
        peak < bound,
        "peak RSS {peak} >= 2 x layer + 64 MiB = {bound}"
    );
}
