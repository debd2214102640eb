//! The candle integration (feature `candle`): `moe_kernels::candle::MoeBlock` loaded through a
//! candle `VarBuilder` with the Hugging Face names of each family's published checkpoints, run
//! on candle CPU tensors and compared with transformers' float64 output of the same layer
//! (tests/fixtures/checkpoints/), plus T = 1, odd H, f16 / bf16 activations, shapes, errors
//! and, with `candle-cuda` where a GPU exists, the zero-copy CUDA path.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType as CDType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use common::fixture::{dense, fixtures_dir, read_expected, Expected};
use moe_kernels::candle::{MoeBlock, Routing};
use moe_kernels::synth::{random_layer, random_x, Extras};
use moe_kernels::{Backend, BackendKind, DType, MoeLayer, Preset};

/// The families a `VarBuilder` is read for, by fixture name.
const FAMILIES: [&str; 4] = [
    "mixtral_bf16",
    "qwen2_moe_bf16",
    "qwen3_moe_bf16",
    "deepseek_v3_bf16",
];

/// f32 activations against transformers' float64 (the bound).
const F32_BOUND: f64 = 1e-5;

/// One fixture: its checkpoint, MoE layer, input and transformers' outputs.
struct Fixture {
    name: &'static str,
    dir: PathBuf,
    config: serde_json::Value,
    layer: usize,
    x: Tensor,
    exp: Expected,
}

fn checkpoints() -> PathBuf {
    fixtures_dir().join("checkpoints")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("json file")).expect("json")
}

fn fixture(name: &'static str) -> Fixture {
    let root = checkpoints();
    let dir = root.join(name);
    let case = json(&root.join(format!("{name}.case.json")));
    let layer = case["layer"].as_str().unwrap().parse().unwrap();
    let x = candle_core::safetensors::load(
        root.join(format!("{name}.input.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
    .remove("x")
    .unwrap();
    Fixture {
        name,
        config: json(&dir.join("config.json")),
        exp: read_expected(&root.join(format!("{name}.expected.safetensors"))),
        dir,
        layer,
        x,
    }
}

/// A `VarBuilder` over every safetensors file of a checkpoint directory.
fn var_builder(dir: &Path, dtype: CDType) -> VarBuilder<'static> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    // SAFETY: the fixture files are not modified while they are mapped.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, &Device::Cpu) }.unwrap()
}

fn block(f: &Fixture, dtype: CDType) -> MoeBlock {
    let vb = var_builder(&f.dir, dtype);
    MoeBlock::new(
        &f.config,
        f.layer,
        vb.pp(format!("model.layers.{}", f.layer)),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", f.name))
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(CDType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Relative L2 of `y` against `want`.
fn rel_l2(y: &Tensor, want: &[f64]) -> f64 {
    common::rel_l2_f64(&f64s(y), want)
}

/// Dense `[T, E]` (selected, dispatched, weight) views of a candle routing.
fn dense_routing(r: &Routing, t: usize, e: usize) -> (Vec<i32>, Vec<i32>, Vec<f64>) {
    let ids: Vec<u32> = r.topk_ids.flatten_all().unwrap().to_vec1().unwrap();
    let kept: Vec<bool> = r
        .kept
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
        .iter()
        .map(|&k| k != 0)
        .collect();
    let w = f64s(&r.topk_weights);
    let slots = r.topk_ids.dims2().unwrap().1;
    dense(t, e, slots, &ids, &kept, &w)
}

/// The transformers rows `rows` of a `[T, width]` expected array.
fn rows<T: Copy>(v: &[T], width: usize, rows: std::ops::Range<usize>) -> Vec<T> {
    v[rows.start * width..rows.end * width].to_vec()
}

#[test]
fn every_family_matches_transformers_on_cpu_tensors() {
    for name in FAMILIES {
        let f = fixture(name);
        let b = block(&f, CDType::F32);
        let (y, r) = b.forward_with_routing(&f.x).unwrap();
        assert_eq!(y.dims(), f.x.dims(), "{name}");
        assert_eq!(y.dtype(), CDType::F32, "{name}");
        let err = rel_l2(&y, &f.exp.y);
        assert!(err <= F32_BOUND, "{name}: y rel L2 {err:e}");
        let (sel, dis, w) = dense_routing(&r, f.exp.t, f.exp.e);
        assert_eq!(
            sel, f.exp.selected,
            "{name}: top-k differs from transformers"
        );
        assert_eq!(dis, f.exp.dispatch, "{name}: kept assignments differ");
        let werr = common::rel_l2_f64(&w, &f.exp.weights);
        assert!(werr <= 1e-6, "{name}: routing weights rel L2 {werr:e}");
        let counts: Vec<u32> = r.counts.to_vec1().unwrap();
        assert_eq!(
            counts.iter().sum::<u32>() as usize,
            f.exp.t * b.slots(),
            "{name}: counts"
        );
        println!(
            "[candle] {name} (E = {}, H = {}, top-{}): y rel L2 {err:.1e}, top-k equal",
            b.num_experts(),
            b.hidden_size(),
            b.slots()
        );
    }
}

#[test]
fn one_token_matches_transformers() {
    for name in FAMILIES {
        let f = fixture(name);
        let b = block(&f, CDType::F32);
        let (t, h, e) = (f.exp.t, b.hidden_size(), f.exp.e);
        for i in [0, t / 2, t - 1] {
            let x = f.x.i(i..i + 1).unwrap();
            let (y, r) = b.forward_with_routing(&x).unwrap();
            assert_eq!(y.dims(), [1, h]);
            let err = rel_l2(&y, &rows(&f.exp.y, h, i..i + 1));
            assert!(err <= F32_BOUND, "{name} token {i}: rel L2 {err:e}");
            let (sel, _, _) = dense_routing(&r, 1, e);
            assert_eq!(sel, rows(&f.exp.selected, e, i..i + 1), "{name} token {i}");
            // A token's output does not depend on the batch: bitwise the batched row.
            let all = b.forward(&f.x).unwrap().i(i..i + 1).unwrap();
            assert_eq!(f64s(&y), f64s(&all), "{name} token {i}: T = 1 vs T = {t}");
        }
    }
}

#[test]
fn half_activations_within_design_tolerances() {
    for name in FAMILIES {
        let f = fixture(name);
        // The checkpoints' own dtype: the weights as stored.
        let b = block(&f, CDType::BF16);
        for (act, bound) in [(CDType::F16, 5e-3), (CDType::BF16, 1e-2)] {
            let x = f.x.to_dtype(act).unwrap();
            let (y, r) = b.forward_with_routing(&x).unwrap();
            assert_eq!(y.dtype(), act, "{name}");
            let err = rel_l2(&y, &f.exp.y);
            assert!(err <= bound, "{name} {act:?}: rel L2 {err:e} > {bound:e}");
            let (sel, _, _) = dense_routing(&r, f.exp.t, f.exp.e);
            assert_eq!(sel, f.exp.selected, "{name} {act:?}: top-k");
            println!("[candle] {name} {act:?} activations: y rel L2 {err:.1e} (bound {bound:.0e})");
        }
    }
}

#[test]
fn var_builder_layer_equals_the_checkpoint_reader() {
    for name in FAMILIES {
        let f = fixture(name);
        let from_vb = block(&f, CDType::BF16);
        let layer = MoeLayer::from_checkpoint(&f.dir, &f.layer.to_string()).unwrap();
        let read = from_vb.layer().unwrap();
        assert_eq!(
            read.config, layer.config,
            "{name}: routing from config.json"
        );
        assert_eq!(read.dims(), layer.dims(), "{name}");
        // Expert weights keep the checkpoint's dtype (the VarBuilder's is BF16 here); the
        // router and shared gate are read in f32, which holds their BF16 values exactly.
        assert!(read.experts == layer.experts, "{name}: expert weights");
        let values = |t: Option<&moe_kernels::Tensor>| t.map(|t| t.to_f32_vec());
        assert_eq!(
            values(Some(&read.router_weight)),
            values(Some(&layer.router_weight)),
            "{name}: router"
        );
        assert_eq!(
            values(read.score_correction_bias.as_ref()),
            values(layer.score_correction_bias.as_ref()),
            "{name}: score correction bias"
        );
        match (&read.shared, &layer.shared) {
            (Some(a), Some(b)) => {
                assert!(a.weights == b.weights, "{name}: shared expert weights");
                assert_eq!(
                    values(a.gate.as_ref()),
                    values(b.gate.as_ref()),
                    "{name}: shared gate"
                );
            }
            (a, b) => assert_eq!(a.is_some(), b.is_some(), "{name}: shared expert"),
        }
        let y = from_vb.forward(&f.x).unwrap();
        let y2 = MoeBlock::from_layer(layer).forward(&f.x).unwrap();
        assert_eq!(f64s(&y), f64s(&y2), "{name}: bitwise the same forward");
    }
}

#[test]
fn a_block_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<MoeBlock>();
    shared::<Routing>();
}

#[test]
fn shapes_layouts_and_the_module_trait() {
    let f = fixture("mixtral_bf16");
    let b = block(&f, CDType::F32);
    let (t, h) = f.x.dims2().unwrap();
    let y = b.forward(&f.x).unwrap();
    // [B, S, H] as candle models hold it.
    let y3 = b.forward(&f.x.reshape((1, t, h)).unwrap()).unwrap();
    assert_eq!(y3.dims(), [1, t, h]);
    assert_eq!(f64s(&y3), f64s(&y));
    // A strided x (a transpose's transpose) gives the same.
    let strided = f.x.t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!strided.is_contiguous());
    assert_eq!(f64s(&b.forward(&strided).unwrap()), f64s(&y));
    // candle's Module trait.
    assert_eq!(f64s(&f.x.apply(&b).unwrap()), f64s(&y));
    // No tokens.
    let (y0, r0) = b.forward_with_routing(&f.x.i(0..0).unwrap()).unwrap();
    assert_eq!(y0.dims(), [0, h]);
    assert_eq!(r0.topk_ids.dims(), [0, b.slots()]);
    // Deterministic.
    assert_eq!(f64s(&b.forward(&f.x).unwrap()), f64s(&y));
}

/// A synthetic layer's tensors under Mixtral's Hugging Face names at `model.layers.0`, and
/// the config.json that describes it.
fn as_mixtral_checkpoint(layer: &MoeLayer) -> (serde_json::Value, HashMap<String, Tensor>) {
    let d = layer.dims();
    let cpu = Device::Cpu;
    let host = |t: &moe_kernels::Tensor, shape: &[usize]| {
        Tensor::from_vec(t.to_f32_vec(), shape, &cpu).unwrap()
    };
    let mut m = HashMap::new();
    let p = "model.layers.0.block_sparse_moe";
    m.insert(
        format!("{p}.gate.weight"),
        host(&layer.router_weight, &[d.experts, d.hidden]),
    );
    let dense = |w: &moe_kernels::quant::Weight| match w {
        moe_kernels::quant::Weight::Dense(t) => t.clone(),
        _ => panic!("dense weights"),
    };
    let gate = dense(layer.experts.gate.as_ref().unwrap());
    let up = dense(&layer.experts.up);
    let down = dense(&layer.experts.down);
    for j in 0..d.experts {
        for (local, w, n, k) in [
            ("w1", &gate, d.ffn, d.hidden),
            ("w3", &up, d.ffn, d.hidden),
            ("w2", &down, d.hidden, d.ffn),
        ] {
            let all = host(w, &[d.experts, n, k]);
            m.insert(format!("{p}.experts.{j}.{local}.weight"), all.i(j).unwrap());
        }
    }
    let config = serde_json::json!({
        "model_type": "mixtral",
        "hidden_size": d.hidden,
        "intermediate_size": d.ffn,
        "num_local_experts": d.experts,
        "num_experts_per_tok": layer.config.routing.top_k,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
    });
    (config, m)
}

#[test]
fn odd_hidden_size_against_the_crates_reference() {
    // H and F odd, E not a power of two.
    let (e, h, f) = (6, 37, 19);
    let layer = random_layer(
        Preset::Mixtral.config(),
        e,
        h,
        f,
        Extras::default(),
        DType::F32,
        11,
    )
    .unwrap();
    let from_layer = MoeBlock::from_layer(layer.clone());
    // The same layer through a VarBuilder with Mixtral's names.
    let (config, tensors) = as_mixtral_checkpoint(&layer);
    let vb = VarBuilder::from_tensors(tensors, CDType::F32, &Device::Cpu);
    let from_vb = MoeBlock::new(&config, 0, vb.pp("model.layers.0")).unwrap();
    for t in [1, 7, 37] {
        let x_host = random_x(t, h, t as u64);
        let reference = layer.forward_reference(&x_host).unwrap();
        let x = Tensor::from_vec(x_host.to_f32_vec(), (t, h), &Device::Cpu).unwrap();
        for (what, b) in [("from_layer", &from_layer), ("VarBuilder", &from_vb)] {
            let (y, r) = b.forward_with_routing(&x).unwrap();
            let err = rel_l2(&y, &reference.y);
            assert!(err <= 2e-5, "{what} T = {t} H = {h}: rel L2 {err:e}");
            let ids: Vec<u32> = r.topk_ids.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(ids, reference.routing.topk_ids, "{what} T = {t}: top-k");
        }
        for (act, bound) in [(CDType::F16, 5e-3), (CDType::BF16, 1e-2)] {
            let y = from_layer.forward(&x.to_dtype(act).unwrap()).unwrap();
            let err = rel_l2(&y, &reference.y);
            assert!(err <= bound, "{act:?} T = {t} H = {h}: rel L2 {err:e}");
        }
        println!("[candle] synthetic Mixtral H = {h}, F = {f}, E = {e}, T = {t}: f32, f16, bf16 within bounds");
    }
}

#[test]
fn a_prepared_layer_runs_only_what_it_was_prepared_for() {
    let f = fixture("qwen2_moe_bf16");
    let layer = MoeLayer::from_checkpoint(&f.dir, "1").unwrap();
    let cpu = Backend::new(BackendKind::Cpu).unwrap();
    let b = MoeBlock::from_prepared(layer.prepare(&cpu, 8, DType::BF16).unwrap());
    assert!(b.layer().is_none());
    let x = f.x.i(0..5).unwrap().to_dtype(CDType::BF16).unwrap();
    let y = b.forward(&x).unwrap();
    assert!(rel_l2(&y, &rows(&f.exp.y, 64, 0..5)) <= 1e-2);
    let e = b.forward(&f.x.i(0..5).unwrap()).unwrap_err().to_string();
    assert!(
        e.contains("prepared for bf16") && e.contains("got 5 tokens of f32"),
        "{e}"
    );
    let e = b
        .forward(&f.x.to_dtype(CDType::BF16).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("up to 8 tokens"), "{e}");
}

#[test]
fn errors_keep_the_crates_message() {
    let f = fixture("mixtral_bf16");
    let b = block(&f, CDType::F32);
    let wrong = Tensor::zeros((3, 65), CDType::F32, &Device::Cpu).unwrap();
    let e = b.forward(&wrong).unwrap_err().to_string();
    assert!(
        e.contains("x must be [..., H] with H = 64, got shape [3, 65]"),
        "{e}"
    );
    let e = b
        .forward(&f.x.to_dtype(CDType::F64).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("unsupported dtype F64"), "{e}");

    // A dense layer: the same message as the checkpoint reader's (which names the file).
    let q = fixture("qwen2_moe_bf16");
    let vb = var_builder(&q.dir, CDType::F32);
    let e = MoeBlock::new(&q.config, 0, vb.pp("model.layers.0"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer 0 is dense") && e.contains("MoE layers: 1"),
        "{e}"
    );
    // Families stored otherwise and quantized checkpoints point to MoeLayer::from_checkpoint.
    for (dir, words) in [
        ("gpt_oss_bf16", "not gpt_oss"),
        ("deepseek_v3_fp8", "a fp8 checkpoint"),
    ] {
        let config = json(&checkpoints().join(dir).join("config.json"));
        let vb = var_builder(&checkpoints().join(dir), CDType::F32);
        let e = MoeBlock::new(&config, 1, vb.pp("model.layers.1"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(words) && e.contains("MoeLayer::from_checkpoint"),
            "{dir}: {e}"
        );
    }
    // A VarBuilder at the wrong layer: candle's message names the tensor it looked for.
    let e = MoeBlock::new(
        &f.config,
        1,
        var_builder(&f.dir, CDType::F32).pp("model.layers.7"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("model.layers.7.block_sparse_moe.gate.weight"),
        "{e}"
    );
    let e = MoeBlock::new(&serde_json::json!([1]), 1, var_builder(&f.dir, CDType::F32))
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json: not a JSON object"), "{e}");
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_host_backend_when_asked() {
    let wgpu = match Backend::new(BackendKind::Wgpu) {
        Ok(b) => b,
        Err(e) => {
            println!("[candle] wgpu host backend skipped: {e}");
            return;
        }
    };
    for name in FAMILIES {
        let f = fixture(name);
        let b = block(&f, CDType::F32).with_host_backend(wgpu.clone());
        let (y, r) = b.forward_with_routing(&f.x).unwrap();
        let err = rel_l2(&y, &f.exp.y);
        assert!(err <= 2e-5, "{name} on wgpu: rel L2 {err:e}");
        let (sel, _, _) = dense_routing(&r, f.exp.t, f.exp.e);
        assert_eq!(sel, f.exp.selected, "{name} on wgpu: top-k");
        println!("[candle] {name} on the wgpu host backend: y rel L2 {err:.1e}");
    }
}

/// CUDA tensors (feature `candle-cuda`): bitwise the crate's own CUDA forward, on candle's
/// stream, with no device-to-host copy inside `forward` (the forward is captured into a CUDA
/// graph, which a synchronous copy or synchronisation would break, and the graph holds no copy
/// to host memory). Skipped, saying why, where there is no GPU.
#[cfg(feature = "candle-cuda")]
mod cuda {
    use super::*;
    use cudarc::driver::sys;

    fn cuda_device() -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                let why = e.to_string();
                let why = why.lines().next().unwrap_or_default();
                println!("[candle] CUDA test skipped: no CUDA device ({why})");
                None
            }
        }
    }

    /// Memory copies into host memory among the nodes of a captured graph.
    fn host_copies(graph: sys::CUgraph) -> usize {
        let mut n = 0usize;
        // SAFETY: a null node array asks for the count only.
        let r = unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut n) };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
        let mut nodes = vec![std::ptr::null_mut(); n];
        // SAFETY: `nodes` holds room for the n nodes just counted.
        let r = unsafe { sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut n) };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
        nodes
            .iter()
            .filter(|&&node| {
                let mut ty = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
                // SAFETY: `node` is a node of `graph`, which is alive; `ty` outlives the call.
                unsafe { sys::cuGraphNodeGetType(node, &mut ty) };
                if ty != sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY {
                    return false;
                }
                // SAFETY: a memcpy node's parameters are one CUDA_MEMCPY3D, written into `p`.
                let mut p: sys::CUDA_MEMCPY3D = unsafe { std::mem::zeroed() };
                // SAFETY: as above.
                unsafe { sys::cuGraphMemcpyNodeGetParams(node, &mut p) };
                p.dstMemoryType == sys::CUmemorytype::CU_MEMORYTYPE_HOST
            })
            .count()
    }

    #[test]
    fn cuda_tensors_run_zero_copy_and_bitwise_equal_to_the_crates_cuda_forward() {
        let Some(dev) = cuda_device() else { return };
        let Device::Cuda(cdev) = &dev else { return };
        // SAFETY: everything in this test runs on the device's one stream, so stream order
        // sequences every buffer's uses; cudarc's per-buffer events would be recorded and
        // waited on inside the capture below, as CUDA-graph users avoid.
        unsafe { cdev.disable_event_tracking() };
        let stream = cdev.cuda_stream();
        for name in FAMILIES {
            let f = fixture(name);
            let layer = MoeLayer::from_checkpoint(&f.dir, &f.layer.to_string()).unwrap();
            let b = MoeBlock::from_layer(layer.clone());
            let own = layer
                .prepare(
                    &Backend::from_cuda_stream(stream.clone()).unwrap(),
                    64,
                    DType::F32,
                )
                .unwrap();
            let x = f.x.to_device(&dev).unwrap();
            // Warm: the first forward prepares (uploads) the layer on candle's stream.
            let y = b.forward(&x).unwrap();
            // The crate's own CUDA forward on the same stream, same input slice.
            let n = x.elem_count();
            let mut y_own = stream.alloc_zeros::<f32>(n).unwrap();
            {
                let (s, _) = x.storage_and_layout();
                let candle_core::Storage::Cuda(xs) = &*s else {
                    panic!("cuda storage")
                };
                let xv = xs.as_cuda_slice::<f32>().unwrap().slice(0..n);
                own.forward_cuda(&xv, &mut y_own.slice_mut(0..n), f.exp.t)
                    .unwrap();
            }
            let y_own = stream.clone_dtoh(&y_own).unwrap();
            let y_block: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                y_block
                    .iter()
                    .zip(&y_own)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: MoeBlock on CUDA differs from PreparedLayer::forward_cuda"
            );
            let err = rel_l2(&y, &f.exp.y);
            assert!(err <= 2e-5, "{name} on CUDA: rel L2 {err:e}");

            // No host copy inside forward: capture it (global mode rejects synchronous copies
            // and synchronisation) and look at what was captured.
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
                .unwrap();
            let captured = b.forward_with_routing(&x);
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            let (y2, r2) = captured.expect("forward inside a CUDA graph capture");
            let graph = graph.unwrap().expect("a graph was captured");
            assert_eq!(
                host_copies(graph.cu_graph()),
                0,
                "{name}: a copy to the host"
            );
            graph.launch().unwrap();
            stream.synchronize().unwrap();
            assert_eq!(f64s(&y2), f64s(&y), "{name}: replay differs");
            let (sel, _, _) = dense_routing(&r2.to_cpu(), f.exp.t, f.exp.e);
            assert_eq!(sel, f.exp.selected, "{name}: top-k on CUDA");
            println!("[candle] {name} on CUDA: bitwise PreparedLayer::forward_cuda, rel L2 {err:.1e}, no host copy");
        }
    }

    trait ToCpu {
        fn to_cpu(&self) -> Routing;
    }

    impl ToCpu for Routing {
        fn to_cpu(&self) -> Routing {
            let c = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
            Routing {
                topk_ids: c(&self.topk_ids),
                topk_weights: c(&self.topk_weights),
                kept: c(&self.kept),
                counts: c(&self.counts),
            }
        }
    }
}

/// Says in the test output that the CUDA test is not built without `candle-cuda`.
#[cfg(not(feature = "candle-cuda"))]
#[test]
fn cuda_tensors_need_the_candle_cuda_feature() {
    println!(
        "[candle] CUDA test skipped: built without the `candle-cuda` feature (README \"Use \
         from candle\" says how to build it)"
    );
}
