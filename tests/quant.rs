//! Quantized expert weights (issue 13): FP8 block, MXFP4 and INT4 groups. The decode tables bit
//! by bit against the formats' definitions written out here; each format × scale dtype ×
//! gated / non-gated × shared expert on every backend against the f64 reference of the
//! quantized layer; that reference against float64 of the dequantized layer; N and K off the
//! block and group sizes; determinism and batch invariance per format; files written and read
//! back; malformed files refused with errors naming the tensor.

mod common;

use std::collections::BTreeMap;

use moe_kernels::io::{self, FileTensor, OutTensor};
use moe_kernels::quant::{decode, QuantFormat, QuantMatrix, QuantSpec, Scales, Weight};
use moe_kernels::synth::{random_layer, random_x, Extras, Gen};
use moe_kernels::{Backend, BackendKind, DType, Error, MoeLayer, Preset, Tensor};

/// Quantized weights on CUDA are opt-in until a GPU verifies them (`MOE_CUDA_QUANT=1`, set by
/// `scripts/device-check.sh`): without it, preparing one must be refused (checked), and the
/// case is skipped (said).
fn skip_cuda(dev: &Backend, layer: &MoeLayer) -> bool {
    if dev.kind() != BackendKind::Cuda || std::env::var("MOE_CUDA_QUANT").is_ok_and(|v| v == "1") {
        return false;
    }
    let err = layer
        .prepare(dev, 4, DType::F32)
        .expect_err("CUDA must refuse quantized weights without MOE_CUDA_QUANT=1");
    assert!(err.to_string().contains("MOE_CUDA_QUANT"), "{err}");
    println!("[quant] cuda skipped: MOE_CUDA_QUANT is not set (refusal checked)");
    true
}

/// float8_e4m3fn by its definition: (-1)^s · 2^(e-7) · (1 + m/8), 2^-6 · m/8 at e = 0, NaN at
/// S.1111.111.
fn def_e4m3(c: u8) -> f64 {
    let (s, e, m) = (c >> 7, i32::from((c >> 3) & 15), f64::from(c & 7));
    if e == 15 && m == 7.0 {
        return f64::NAN;
    }
    let mag = if e == 0 {
        m / 8.0 * 2f64.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f64.powi(e - 7)
    };
    if s == 1 {
        -mag
    } else {
        mag
    }
}

/// e2m1 by its table, sign bit 3.
fn def_e2m1(nib: u8) -> f64 {
    let mag = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0][usize::from(nib & 7)];
    if nib & 8 != 0 {
        -mag
    } else {
        mag
    }
}

/// An MXFP4 weight as transformers computes it (`lut · 2.0 ** (s - 127)` in f32): exact
/// where it fits f32, ±inf beyond, and lut · inf at s = 255.
fn def_mxfp4(nib: u8, s: u8) -> f64 {
    let mag = def_e2m1(nib);
    if s == 255 {
        return mag * f64::INFINITY;
    }
    let exact = mag * 2f64.powi(i32::from(s) - 127);
    if exact.abs() > f64::from(f32::MAX) {
        exact.signum() * f64::INFINITY
    } else {
        exact
    }
}

/// Element (e, n, k) of a quantized matrix from its raw bytes by DESIGN.md section 4, written
/// out here independently of the crate's decoder.
fn def_weight(q: &QuantMatrix, e: usize, n: usize, k: usize) -> f64 {
    let (rows, cols) = (q.rows, q.cols);
    let scale = |i: usize| match &q.scales {
        Scales::Float(t) => t.get(i),
        Scales::E8m0(v) => f64::from(v[i]),
    };
    let nibble = |row_bytes: usize| {
        let b = q.codes[(e * rows + n) * row_bytes + k / 2];
        if k % 2 == 0 {
            b & 15
        } else {
            b >> 4
        }
    };
    match q.format {
        QuantFormat::Fp8Block => {
            let (sr, sc) = (rows.div_ceil(128), cols.div_ceil(128));
            let s = scale((e * sr + n / 128) * sc + k / 128);
            def_e4m3(q.codes[(e * rows + n) * cols + k]) * s
        }
        QuantFormat::Mxfp4 => {
            let Scales::E8m0(v) = &q.scales else {
                panic!("mxfp4 with float scales")
            };
            def_mxfp4(nibble(cols / 2), v[(e * rows + n) * (cols / 32) + k / 32])
        }
        QuantFormat::Int4 => {
            let groups = q.scales.len() / (q.experts * rows);
            let i = (e * rows + n) * groups + k / (cols / groups);
            let z = q.zeros.as_ref().map_or(8.0, |z| f64::from(z[i]));
            (f64::from(nibble(cols.div_ceil(2))) - z) * scale(i)
        }
    }
}

/// Every quantization this suite runs: each format with each allowed scale dtype, INT4 with
/// and without zero points.
fn specs() -> Vec<QuantSpec> {
    let mut out = Vec::new();
    for s in [DType::F32, DType::BF16] {
        out.push(QuantSpec {
            scale_dtype: s,
            ..QuantSpec::new(QuantFormat::Fp8Block)
        });
    }
    out.push(QuantSpec::new(QuantFormat::Mxfp4));
    for (s, zeros) in [(DType::F16, true), (DType::BF16, false), (DType::F32, true)] {
        out.push(QuantSpec {
            scale_dtype: s,
            zeros,
            ..QuantSpec::new(QuantFormat::Int4)
        });
    }
    out
}

fn describe(s: &QuantSpec) -> String {
    format!(
        "{} ({} scales{})",
        s.format,
        s.scale_dtype,
        if s.zeros { ", zeros" } else { "" }
    )
}

/// Small layers of four families, H and F multiples of 32 (MXFP4) but not of 128 (FP8 edge
/// blocks): gated with a gated shared expert (DeepSeek), gated with expert biases (gpt-oss),
/// non-gated ReLU with capacity (Switch), gated Mixtral.
fn layers() -> Vec<(Preset, MoeLayer)> {
    let mut out = Vec::new();
    for p in [
        Preset::Mixtral,
        Preset::DeepseekV3,
        Preset::GptOss,
        Preset::Switch,
    ] {
        let mut cfg = p.config();
        let mut ex = Extras::default();
        match p {
            Preset::DeepseekV3 => {
                ex.score_correction_bias = true;
                ex.shared_ffn = Some(64);
                ex.shared_gate = true;
                cfg.routing.top_k = 4;
            }
            Preset::GptOss => {
                ex.expert_biases = true;
                ex.router_bias = true;
            }
            _ => {}
        }
        let layer = random_layer(cfg, 8, 160, 96, ex, DType::F32, 21).expect("layer");
        out.push((p, layer));
    }
    out
}

fn check_forward(dev: &Backend, layer: &MoeLayer, x: &Tensor, what: &str) {
    let kind = dev.kind();
    let out = layer
        .forward(dev, x)
        .unwrap_or_else(|e| panic!("{kind} {what}: {e}"));
    let r = layer.forward_reference(x).unwrap();
    assert_eq!(out.topk_ids, r.routing.topk_ids, "{kind} {what}: top-k");
    let rel = common::rel_l2(&out.y, &r.y);
    let bound = common::tolerance(x.dtype());
    assert!(rel <= bound, "{kind} {what}: rel L2 {rel:e} > {bound:e}");
}

#[test]
fn every_format_matches_the_reference_on_every_backend() {
    for dev in common::backends("quant_formats") {
        let kind = dev.kind();
        for spec in specs() {
            for (p, dense) in layers() {
                let layer = dense.quantized(&spec).unwrap();
                if skip_cuda(&dev, &layer) {
                    break;
                }
                for t in [1usize, 7, 37] {
                    let x = random_x(t, 160, 300 + t as u64);
                    check_forward(&dev, &layer, &x, &format!("{p} {} T={t}", describe(&spec)));
                }
            }
        }
        println!("[quant_formats] {kind}: fp8, mxfp4 and int4 on four families");
    }
}

#[test]
fn sixteen_bit_activations_with_quantized_weights() {
    for dev in common::backends("quant_act16") {
        let kind = dev.kind();
        let (_, dense) = layers().swap_remove(1);
        for format in QuantFormat::ALL {
            let layer = dense.quantized(&QuantSpec::new(format)).unwrap();
            if skip_cuda(&dev, &layer) {
                break;
            }
            #[cfg(feature = "cuda")]
            if kind == BackendKind::Cuda && !moe_kernels::cuda::act16_enabled() {
                println!("[quant_act16] cuda skipped: MOE_CUDA_ACT16 is not set");
                break;
            }
            for act in [DType::F16, DType::BF16] {
                let x = random_x(9, 160, 3).cast(act);
                check_forward(&dev, &layer, &x, &format!("{format} act {act}"));
            }
        }
        println!("[quant_act16] {kind}: f16 and bf16 activations");
    }
}

/// N and K off the FP8 block (128) and INT4 group sizes, odd K included, on every backend.
#[test]
fn shapes_off_the_block_and_group_sizes() {
    let mut g = Gen::new(77);
    let mut cases = vec![(1usize, 1usize, 1usize), (3, 129, 255), (5, 75, 45)];
    for _ in 0..4 {
        cases.push((g.below(1, 6), g.below(1, 300), g.below(1, 300)));
    }
    for dev in common::backends("quant_shapes") {
        let kind = dev.kind();
        for &(e, h, f) in &cases {
            let mut cfg = Preset::Mixtral.config();
            cfg.routing.top_k = e.min(2);
            let dense = random_layer(
                cfg,
                e,
                h,
                f,
                Extras::default(),
                DType::F32,
                (e * 1000 + h) as u64,
            )
            .unwrap();
            // The largest group dividing both H and F among a few, so K / G is often odd.
            let group = [25usize, 15, 9, 5, 3, 1]
                .into_iter()
                .find(|gs| h % gs == 0 && f % gs == 0)
                .unwrap();
            for spec in [
                QuantSpec::new(QuantFormat::Fp8Block),
                QuantSpec {
                    group: Some(group),
                    ..QuantSpec::new(QuantFormat::Int4)
                },
            ] {
                let layer = dense.quantized(&spec).unwrap();
                if skip_cuda(&dev, &layer) {
                    break;
                }
                for t in [1usize, 37] {
                    let x = random_x(t, h, 9);
                    let what = format!("E={e} H={h} F={f} {} T={t}", describe(&spec));
                    check_forward(&dev, &layer, &x, &what);
                }
            }
        }
        println!("[quant_shapes] {kind}: {} shapes", cases.len());
    }
}

#[test]
fn every_format_is_deterministic_and_batch_invariant() {
    for dev in common::backends("quant_determinism") {
        let kind = dev.kind();
        let (_, dense) = layers().swap_remove(0);
        for format in QuantFormat::ALL {
            let layer = dense.quantized(&QuantSpec::new(format)).unwrap();
            if skip_cuda(&dev, &layer) {
                break;
            }
            let x = random_x(37, 160, 5);
            let prepared = layer.prepare(&dev, 37, DType::F32).unwrap();
            let a = prepared.forward(&x).unwrap();
            let b = prepared.forward(&x).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.y), bits(&b.y), "{kind} {format}: two runs differ");
            for t in [0usize, 13, 36] {
                let row = Tensor::from_f32(
                    vec![1, 160],
                    x.to_f32_vec()[t * 160..(t + 1) * 160].to_vec(),
                )
                .unwrap();
                let one = prepared.forward(&row).unwrap();
                assert_eq!(
                    bits(&one.y),
                    bits(&a.y[t * 160..(t + 1) * 160]),
                    "{kind} {format}: token {t} alone differs from its row in the batch"
                );
            }
        }
        println!("[quant_determinism] {kind}: bitwise repeatable and batch invariant");
    }
}

/// The reference of a quantized layer is float64 of its dequantized layer: the same forward
/// with every matrix replaced by its values decoded by this file's definitions (dense f32
/// here: every decoded FP8 / INT4 weight with bf16 / f16 scales and every MXFP4 weight is
/// exact in f32).
#[test]
fn reference_is_the_dequantized_layer() {
    let (_, dense) = layers().swap_remove(1);
    for spec in specs() {
        let q = dense.quantized(&spec).unwrap();
        // Decoded by this file's own definitions, not the crate's decoder.
        let deq = |w: &Weight| -> Weight {
            let m = w.quant().expect("quantized");
            let v: Vec<f32> = (0..m.experts)
                .flat_map(|e| (0..m.rows).map(move |n| (e, n)))
                .flat_map(|(e, n)| (0..m.cols).map(move |k| def_weight(m, e, n, k) as f32))
                .collect();
            Weight::Dense(Tensor::from_f32(w.shape(), v).unwrap())
        };
        let mut d = q.clone();
        d.experts.up = deq(&q.experts.up);
        d.experts.down = deq(&q.experts.down);
        d.experts.gate = q.experts.gate.as_ref().map(deq);
        let s = d.shared.as_mut().unwrap();
        let qs = q.shared.as_ref().unwrap();
        s.weights.up = deq(&qs.weights.up);
        s.weights.down = deq(&qs.weights.down);
        s.weights.gate = qs.weights.gate.as_ref().map(deq);
        let x = random_x(11, 160, 8);
        let (a, b) = (
            q.forward_reference(&x).unwrap(),
            d.forward_reference(&x).unwrap(),
        );
        let rel = common::rel_l2_f64(&a.y, &b.y);
        // FP8 with f32 scales rounds q·s to f32 in the dense copy: ≤ 2^-24 per weight.
        let bound = if spec.scale_dtype == DType::F32 {
            1e-7
        } else {
            0.0
        };
        assert!(rel <= bound, "{}: {rel:e}", describe(&spec));
        // Quantization itself stays close to the dense layer (sanity of the quantizers).
        let r = dense.forward_reference(&x).unwrap();
        let rel = common::rel_l2_f64(&a.y, &r.y);
        assert!(rel < 0.2, "{}: quantization error {rel:e}", describe(&spec));
    }
}

/// Every code of every format, through a matrix as a file stores it, against the formats'
/// definitions written out here.
#[test]
fn decode_tables_bit_by_bit() {
    // FP8: all 256 codes in one row, scale_inv 1 (bf16) — then scale 2^-3 on a second block.
    let e4m3 = def_e4m3;
    let codes: Vec<u8> = (0..=255u8).collect();
    let fp8 = QuantMatrix {
        format: QuantFormat::Fp8Block,
        experts: 1,
        rows: 1,
        cols: 256,
        codes,
        scales: Scales::Float(
            Tensor::from_f32(vec![1, 1, 2], vec![1.0, 0.125])
                .unwrap()
                .cast(DType::BF16),
        ),
        zeros: None,
    };
    for k in 0..256 {
        let want = e4m3(k as u8) * if k >= 128 { 0.125 } else { 1.0 };
        let got = fp8.get(0, 0, k);
        assert!(
            got == want || (got.is_nan() && want.is_nan()),
            "e4m3 {k:#04x}: {got} vs {want}"
        );
    }
    // MXFP4: every nibble under every e8m0 scale 0..=254 (255: transformers' inf, see below).
    let scales: Vec<u8> = (0..=255u8).collect();
    let mut codes = Vec::new();
    for _ in 0..256 {
        // 32 values per block: nibbles 0..15 twice (low nibble first).
        for pair in 0..16u8 {
            let lo = (2 * pair) % 16;
            codes.push(lo | ((lo + 1) << 4));
        }
    }
    let mx = QuantMatrix {
        format: QuantFormat::Mxfp4,
        experts: 1,
        rows: 256,
        cols: 32,
        codes,
        scales: Scales::E8m0(scales),
        zeros: None,
    };
    for s in 0..256usize {
        for k in 0..32 {
            let nib = (k % 16) as u8;
            let (got, want) = (mx.get(0, s, k), def_mxfp4(nib, s as u8));
            assert!(
                got == want || (got.is_nan() && want.is_nan()),
                "scale {s} nibble {nib}: {got} vs {want}"
            );
        }
    }
    // INT4: every code against zero points 0, 8 and 15, scale 0.5 (f16).
    let mut codes = Vec::new();
    for _ in 0..3 {
        for pair in 0..8u8 {
            codes.push((2 * pair) | ((2 * pair + 1) << 4));
        }
    }
    let i4 = QuantMatrix {
        format: QuantFormat::Int4,
        experts: 1,
        rows: 3,
        cols: 16,
        codes,
        scales: Scales::Float(
            Tensor::from_f32(vec![1, 3, 1], vec![0.5; 3])
                .unwrap()
                .cast(DType::F16),
        ),
        zeros: Some(vec![0, 8, 15]),
    };
    for (r, z) in [0.0, 8.0, 15.0].into_iter().enumerate() {
        for k in 0..16 {
            assert_eq!(i4.get(0, r, k), (k as f64 - z) * 0.5, "int4 q {k} z {z}");
        }
    }
    assert_eq!(decode::e8m0_bits(0), 0x0040_0000);
}

/// A quantized layer written with the canonical names reads back identical, and a prepared
/// layer holds the packed bytes, not a dequantized copy.
#[test]
fn files_round_trip_and_weights_stay_packed() {
    let dir = std::env::temp_dir().join(format!("moe-quant-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (p, dense) in layers() {
        for spec in specs() {
            let layer = dense.quantized(&spec).unwrap();
            let path = dir.join(format!("{p}.safetensors"));
            let tensors = layer.file_tensors().unwrap();
            let refs: Vec<(&str, OutTensor)> = tensors
                .iter()
                .map(|(n, t)| (n.as_str(), OutTensor::File(t.clone())))
                .collect();
            io::save(&path, &refs).unwrap();
            let back = MoeLayer::load(layer.config, &path).unwrap();
            assert_eq!(back, layer, "{p} {}", describe(&spec));
            let dense_bytes = dense.weight_bytes();
            assert!(
                layer.weight_bytes() * 3 < dense_bytes,
                "{p} {}: {} packed vs {dense_bytes} dense",
                describe(&spec),
                layer.weight_bytes()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The layer's bytes held by each backend: the packed bytes on the GPUs (up to section
/// alignment), never a dequantized copy.
#[test]
fn prepared_quantized_layers_hold_the_packed_bytes() {
    for dev in common::backends("quant_resident") {
        let kind = dev.kind();
        if kind == BackendKind::Cpu {
            continue;
        }
        let (_, dense) = layers().swap_remove(0);
        for format in QuantFormat::ALL {
            let layer = dense.quantized(&QuantSpec::new(format)).unwrap();
            if skip_cuda(&dev, &layer) {
                break;
            }
            let prepared = layer.prepare(&dev, 8, DType::F32).unwrap();
            let (held, packed) = (prepared.weight_bytes(), layer.weight_bytes());
            // Each section of each matrix may be padded to 16 bytes; router, biases are f32.
            assert!(
                held >= packed && held <= packed + 4096,
                "{kind} {format}: holds {held} bytes for {packed} packed"
            );
        }
        println!("[quant_resident] {kind}: packed bytes held");
    }
}

fn expect_weights_err(t: BTreeMap<String, FileTensor>, needle: &str, what: &str) {
    let cfg = Preset::Mixtral.config();
    match MoeLayer::from_file_tensors(cfg, t, "bad.safetensors") {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => {
            assert!(matches!(e, Error::Weights { .. }), "{what}: {e:?}");
            let msg = e.to_string();
            assert!(
                msg.contains("bad.safetensors") && msg.contains(needle),
                "{what}: {msg:?} does not name {needle:?}"
            );
        }
    }
}

/// The tensors of a small quantized Mixtral layer, by name.
fn file_of(spec: &QuantSpec) -> BTreeMap<String, FileTensor> {
    let dense = random_layer(
        Preset::Mixtral.config(),
        4,
        64,
        32,
        Extras::default(),
        DType::F32,
        3,
    )
    .unwrap();
    dense
        .quantized(spec)
        .unwrap()
        .file_tensors()
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn malformed_quantized_files_are_refused_naming_the_tensor() {
    let fp8 = file_of(&QuantSpec::new(QuantFormat::Fp8Block));
    let mx = file_of(&QuantSpec::new(QuantFormat::Mxfp4));
    let i4 = file_of(&QuantSpec::new(QuantFormat::Int4));

    // A scale shape that does not match its matrix.
    let mut t = fp8.clone();
    t.insert(
        "experts.up_proj_scale_inv".into(),
        FileTensor::Float(Tensor::from_f32(vec![4, 2, 1], vec![1.0; 8]).unwrap()),
    );
    expect_weights_err(t, "experts.up_proj_scale_inv", "fp8 scale shape");
    let mut t = mx.clone();
    t.insert(
        "experts.down_proj_scales".into(),
        FileTensor::U8(vec![4, 64, 2], vec![127; 512]),
    );
    expect_weights_err(t, "experts.down_proj_scales", "mxfp4 scale shape");

    // MXFP4 with K not a multiple of 32: a layer with H = 48.
    let mut t = mx.clone();
    t.insert(
        "router.weight".into(),
        FileTensor::Float(Tensor::from_f32(vec![4, 48], vec![0.1; 192]).unwrap()),
    );
    expect_weights_err(t, "multiple of 32", "mxfp4 K");

    // An INT4 group that does not divide K (64 columns, 3 groups).
    let mut t = i4.clone();
    t.insert(
        "experts.gate_proj_scales".into(),
        FileTensor::Float(Tensor::from_f32(vec![4, 32, 3], vec![0.1; 384]).unwrap()),
    );
    expect_weights_err(t, "experts.gate_proj_scales", "int4 group");

    // Zero points of the wrong shape.
    let mut t = i4.clone();
    t.insert(
        "experts.up_proj_zeros".into(),
        FileTensor::U8(vec![4, 32, 2], vec![8; 256]),
    );
    expect_weights_err(t, "experts.up_proj_zeros", "int4 zeros shape");

    // An F8 matrix without its scale.
    let mut t = fp8.clone();
    t.remove("experts.down_proj_scale_inv");
    expect_weights_err(t, "experts.down_proj", "fp8 without scale");

    // A scale without its matrix.
    let mut t = mx.clone();
    t.remove("experts.up_proj_blocks");
    expect_weights_err(t, "experts.up_proj_scales", "scale without matrix");

    // Two formats in one file.
    let mut t = fp8.clone();
    for n in ["experts.down_proj", "experts.down_proj_scale_inv"] {
        t.remove(n);
    }
    for n in [
        "experts.down_proj_packed",
        "experts.down_proj_scales",
        "experts.down_proj_zeros",
    ] {
        t.insert(n.into(), i4[n].clone());
    }
    expect_weights_err(t, "two formats", "fp8 + int4");

    // Dense and quantized expert matrices mixed.
    let mut t = fp8.clone();
    for n in ["experts.down_proj", "experts.down_proj_scale_inv"] {
        t.remove(n);
    }
    t.insert(
        "experts.down_proj".into(),
        FileTensor::Float(Tensor::from_f32(vec![4, 64, 32], vec![0.1; 8192]).unwrap()),
    );
    expect_weights_err(t, "experts.down_proj", "dense + fp8");

    // A quantized shared expert with dense routed experts.
    let mut sdense = random_layer(
        Preset::Mixtral.config(),
        4,
        64,
        32,
        Extras {
            shared_ffn: Some(32),
            ..Extras::default()
        },
        DType::F32,
        3,
    )
    .unwrap();
    sdense.shared = sdense
        .quantized(&QuantSpec::new(QuantFormat::Int4))
        .unwrap()
        .shared;
    let t: BTreeMap<String, FileTensor> = sdense.file_tensors().unwrap().into_iter().collect();
    expect_weights_err(t, "two formats", "quantized shared, dense routed");

    // Code bytes that do not match their shape (a caller building tensors by hand).
    let mut t = mx.clone();
    if let Some(FileTensor::U8(s, mut b)) = t.remove("experts.up_proj_blocks") {
        b.pop();
        t.insert("experts.up_proj_blocks".into(), FileTensor::U8(s, b));
    }
    expect_weights_err(t, "experts.up_proj_blocks", "truncated codes");

    // FP8 codes stored as U8, and F16 block scales.
    let mut t = fp8.clone();
    if let Some(FileTensor::F8E4M3(s, b)) = t.remove("experts.up_proj") {
        t.insert("experts.up_proj".into(), FileTensor::U8(s, b));
    }
    expect_weights_err(t, "experts.up_proj", "fp8 codes as U8");
    let mut t = fp8;
    if let Some(FileTensor::Float(s)) = t.remove("experts.up_proj_scale_inv") {
        t.insert(
            "experts.up_proj_scale_inv".into(),
            FileTensor::Float(s.cast(DType::F16)),
        );
    }
    expect_weights_err(t, "experts.up_proj_scale_inv", "fp8 f16 scales");
    println!("[quant_malformed] every malformed file refused with the tensor named");
}

/// A one-expert ReLU layer whose `down_proj` holds every code of `format` (with every e8m0
/// scale for MXFP4, zero points up to 255 for INT4), so each backend decodes each code in the
/// GEMM: row o of y must be what the reference gives, NaN where it is NaN, ±inf where it is.
/// Rows whose reference magnitude is below 2^-100 only need to be that small (a driver may
/// flush subnormals; DESIGN.md allows it for WGSL); rows above 2^120 may be inf (an f32
/// partial sum overflowing).
fn special_codes_layer(format: QuantFormat) -> MoeLayer {
    let mut cfg = Preset::Switch.config();
    cfg.routing.capacity = None;
    let (h, f) = (256usize, 32usize);
    let dense = random_layer(cfg, 1, h, f, Extras::default(), DType::F32, 4).unwrap();
    let mut q = dense
        .quantized(&QuantSpec {
            group: Some(16),
            ..QuantSpec::new(format)
        })
        .unwrap();
    let Some(Weight::Quant(down)) = Some(q.experts.down.clone()) else {
        unreachable!()
    };
    let mut down = down;
    match format {
        // Row o: the codes o, o + 1, … (mod 256), so each code lands in 32 rows.
        QuantFormat::Fp8Block => {
            for o in 0..h {
                for k in 0..f {
                    down.codes[o * f + k] = ((o + k * 8) % 256) as u8;
                }
            }
        }
        // Row o: scale code o, nibbles 0..15 twice.
        QuantFormat::Mxfp4 => {
            for (i, b) in down.codes.iter_mut().enumerate() {
                let p = (i % 8) as u8 * 2;
                *b = p | ((p + 1) << 4);
            }
            down.scales = Scales::E8m0((0..=255u8).collect());
        }
        // Every code, zero points spread over 0..=255.
        QuantFormat::Int4 => {
            for (i, b) in down.codes.iter_mut().enumerate() {
                *b = (i % 256) as u8;
            }
            let n = down.scales.len();
            down.zeros = Some((0..n).map(|i| (i * 37 % 256) as u8).collect());
        }
    }
    q.experts.down = Weight::Quant(down);
    q
}

#[test]
fn every_code_decodes_alike_on_every_backend() {
    for dev in common::backends("quant_special_codes") {
        let kind = dev.kind();
        for format in QuantFormat::ALL {
            let layer = special_codes_layer(format);
            if skip_cuda(&dev, &layer) {
                break;
            }
            let x = random_x(3, 256, 12);
            let out = layer
                .forward(&dev, &x)
                .unwrap_or_else(|e| panic!("{kind} {format}: {e}"));
            let r = layer.forward_reference(&x).unwrap();
            let (mut num, mut den, mut special) = (0.0f64, 0.0f64, 0);
            for (i, (&g, &w)) in out.y.iter().zip(&r.y).enumerate() {
                let g = f64::from(g);
                if w.is_nan() || w.is_infinite() || w.abs() > f64::from(f32::MAX) {
                    let want = if w.is_nan() {
                        f64::NAN
                    } else {
                        w.signum() * f64::INFINITY
                    };
                    assert!(
                        (g.is_nan() && want.is_nan()) || g == want,
                        "{kind} {format} y[{i}]: {g} vs reference {w}"
                    );
                    special += 1;
                } else if w.abs() > 2f64.powi(120) && g.is_infinite() {
                    // Near f32's range an f32 partial sum may overflow where the f64 sum does
                    // not: a range artifact, not a decode error (smaller scales check those).
                    special += 1;
                } else if w.abs() < 2f64.powi(-100) {
                    assert!(
                        g.abs() < 2f64.powi(-99),
                        "{kind} {format} y[{i}]: {g} vs {w}"
                    );
                } else {
                    num += (g - w).powi(2);
                    den += w * w;
                }
            }
            let rel = (num / den).sqrt();
            assert!(rel <= 2e-5, "{kind} {format}: finite rows rel L2 {rel:e}");
            if format != QuantFormat::Int4 {
                assert!(special > 0, "{kind} {format}: no NaN / inf row reached");
            }
        }
        println!("[quant_special_codes] {kind}: every code, NaN and inf rows alike");
    }
}

/// Gate and up of one format with different scale dtypes (and INT4 zero points on one only)
/// load, decode to the same values, and run on every backend.
#[test]
fn gate_and_up_may_differ_in_scale_dtype_and_zero_points() {
    let (_, dense) = layers().swap_remove(0);
    for (format, gs, us) in [
        (QuantFormat::Fp8Block, DType::BF16, DType::F32),
        (QuantFormat::Int4, DType::F16, DType::BF16),
    ] {
        let spec = |s: DType, zeros: bool| QuantSpec {
            scale_dtype: s,
            zeros,
            ..QuantSpec::new(format)
        };
        let gq = dense.quantized(&spec(gs, true)).unwrap();
        let uq = dense.quantized(&spec(us, false)).unwrap();
        let mut t: BTreeMap<String, FileTensor> = uq.file_tensors().unwrap().into_iter().collect();
        t.retain(|n, _| !n.starts_with("experts.gate_proj"));
        for (n, v) in gq.file_tensors().unwrap() {
            if n.starts_with("experts.gate_proj") {
                t.insert(n, v);
            }
        }
        let layer = MoeLayer::from_file_tensors(dense.config, t, "mixed.safetensors")
            .unwrap_or_else(|e| panic!("{format}: {e}"));
        for (name, w, q) in [
            (
                "gate",
                layer.experts.gate.as_ref().unwrap(),
                gq.experts.gate.as_ref().unwrap(),
            ),
            ("up", &layer.experts.up, &uq.experts.up),
        ] {
            let (a, b) = (w.quant().unwrap(), q.quant().unwrap());
            for (e, n, k) in [(0, 0, 0), (3, 95, 159), (7, 50, 77)] {
                assert_eq!(a.get(e, n, k), b.get(e, n, k), "{format} {name}");
            }
        }
        for dev in common::backends("quant_mixed_scales") {
            if skip_cuda(&dev, &layer) {
                continue;
            }
            let x = random_x(5, 160, 2);
            check_forward(&dev, &layer, &x, &format!("{format} gate {gs} up {us}"));
        }
    }
}

/// MXFP4 scales stored as F8_E8M0 (as newer exports name them) read as the same e8m0 bytes.
#[test]
fn mxfp4_scales_may_be_stored_as_f8_e8m0() {
    use safetensors::tensor::{Dtype, TensorView};
    let (_, dense) = layers().swap_remove(0);
    let layer = dense
        .quantized(&QuantSpec::new(QuantFormat::Mxfp4))
        .unwrap();
    let tensors = layer.file_tensors().unwrap();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| {
            let (dtype, shape, bytes): (Dtype, Vec<usize>, &[u8]) = match t {
                FileTensor::Float(x) => match x.data() {
                    moe_kernels::TensorData::F32(v) => {
                        (Dtype::F32, x.shape().to_vec(), bytemuck::cast_slice(v))
                    }
                    _ => unreachable!("the synthetic layer is f32"),
                },
                FileTensor::U8(s, b) if n.ends_with("_scales") => (Dtype::F8_E8M0, s.clone(), b),
                FileTensor::U8(s, b) => (Dtype::U8, s.clone(), b),
                FileTensor::F8E4M3(s, b) => (Dtype::F8_E4M3, s.clone(), b),
            };
            (n.clone(), TensorView::new(dtype, shape, bytes).unwrap())
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    let t = io::parse_file_tensors(&bytes, "e8m0.safetensors").unwrap();
    let back = MoeLayer::from_file_tensors(layer.config, t, "e8m0.safetensors").unwrap();
    assert_eq!(back, layer);
}

/// Every format with K over several k chunks of 256 and not a multiple of 256 (H 608,
/// F 544): a token alone (the small-batch paths) gives bitwise the bits of its row in a batch
/// of 100 (the tiled kernel), within tolerance of the reference.
#[test]
fn batch_invariant_with_k_over_several_chunks() {
    let (h, f) = (608, 544);
    let dense = random_layer(
        Preset::Mixtral.config(),
        8,
        h,
        f,
        Extras::default(),
        DType::F32,
        23,
    )
    .expect("layer");
    let x = random_x(100, h, 24);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    for dev in common::backends("quant_k_chunks") {
        let kind = dev.kind();
        for format in QuantFormat::ALL {
            let layer = dense.quantized(&QuantSpec::new(format)).unwrap();
            if skip_cuda(&dev, &layer) {
                break;
            }
            check_forward(&dev, &layer, &x, &format!("{format}, H {h} F {f}"));
            let run = layer.prepare(&dev, 100, DType::F32).unwrap();
            let batch = run.forward(&x).unwrap();
            for t in [0usize, 58, 99] {
                let row = Tensor::from_f32(vec![1, h], x.to_f32_vec()[t * h..(t + 1) * h].to_vec())
                    .unwrap();
                let one = run.forward(&row).unwrap();
                assert_eq!(
                    bits(&one.y),
                    bits(&batch.y[t * h..(t + 1) * h]),
                    "{kind} {format}: token {t} alone differs from its row in the batch"
                );
            }
        }
        println!("[quant_k_chunks] {kind}: batch invariant with K over several chunks");
    }
}
