//! The runtime data path (issue 12): activations in f32, f16 and bf16 on every backend against
//! the f64 reference of the rounded input; bitwise determinism and batch invariance in every
//! activation dtype; the device-resident wgpu forward on the caller's own device, recorded into
//! its encoders with no allocation after `prepare`; buffers that do not fit the contract are
//! errors, not wrong answers.

mod common;

use moe_kernels::synth::random_x;
use moe_kernels::{DType, Error, MoeLayer, Preset, Tensor};

const ACTS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Small odd-sized layers of four families: shared expert with gate, group routing with a
/// correction bias and shared expert, expert biases, capacity.
fn layers(wdtype: DType) -> Vec<(Preset, MoeLayer)> {
    let mut out = Vec::new();
    for p in [
        Preset::Mixtral,
        Preset::Qwen2Moe,
        Preset::DeepseekV3,
        Preset::GptOss,
        Preset::Switch,
    ] {
        out.push((p, common::preset_layer_with(p, wdtype, 11, |_| {})));
    }
    out
}

/// 16-bit activations on CUDA are opt-in until a GPU verifies them (`MOE_CUDA_ACT16=1`, set
/// by `scripts/device-check.sh`): without it, preparing one is an error this checks, and the
/// case is skipped (said).
fn skip_cuda16(kind: moe_kernels::BackendKind, act: DType) -> bool {
    #[cfg(feature = "cuda")]
    if kind == moe_kernels::BackendKind::Cuda
        && act != DType::F32
        && !moe_kernels::cuda::act16_enabled()
    {
        println!("[runtime] cuda {act} activations skipped: MOE_CUDA_ACT16 is not set");
        return true;
    }
    let _ = (kind, act);
    false
}

/// The bound for activations in `act` with weights in `w`: the looser of the two dtypes'.
fn bound(w: DType, act: DType) -> f64 {
    common::tolerance(w).max(common::tolerance(act))
}

#[test]
fn every_activation_dtype_matches_the_reference_on_every_backend() {
    for dev in common::backends("runtime_act_dtypes") {
        let kind = dev.kind();
        for wdtype in [DType::F32, DType::BF16] {
            for (p, layer) in layers(wdtype) {
                for act in ACTS {
                    if skip_cuda16(kind, act) {
                        continue;
                    }
                    for t in [1usize, 7, 37, 300] {
                        let x = random_x(t, 37, 100 + t as u64).cast(act);
                        let out = layer
                            .forward(&dev, &x)
                            .unwrap_or_else(|e| panic!("{kind} {p} {act} T={t}: {e}"));
                        assert_eq!(out.dtype, act);
                        let y = out.y_tensor().unwrap();
                        assert_eq!(y.dtype(), act);
                        assert_eq!(
                            y.to_f32_vec(),
                            out.y,
                            "{kind} {p} {act}: y holds values of its dtype"
                        );
                        let r = layer.forward_reference(&x).unwrap();
                        assert_eq!(
                            out.topk_ids, r.routing.topk_ids,
                            "{kind} {p} w {wdtype} act {act} T={t}: top-k"
                        );
                        let rel = common::rel_l2(&out.y, &r.y);
                        assert!(
                            rel <= bound(wdtype, act),
                            "{kind} {p} w {wdtype} act {act} T={t}: rel L2 {rel:e}"
                        );
                    }
                }
            }
        }
        println!("[runtime_act_dtypes] {kind}: every preset, weight dtype and activation dtype");
    }
}

#[test]
fn every_activation_dtype_is_deterministic_and_batch_invariant() {
    for dev in common::backends("runtime_determinism") {
        let kind = dev.kind();
        for (p, layer) in layers(DType::BF16) {
            // Capacity is defined on the batch: batch invariance does not apply to it.
            let capacity = layer.config.routing.capacity.is_some();
            for act in ACTS {
                if skip_cuda16(kind, act) {
                    continue;
                }
                let x = random_x(37, 37, 5).cast(act);
                let prepared = layer.prepare(&dev, 37, act).unwrap();
                let a = prepared.forward(&x).unwrap();
                let b = prepared.forward(&x).unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a.y), bits(&b.y), "{kind} {p} {act}: two runs differ");
                if capacity {
                    continue;
                }
                for t in [0usize, 13, 36] {
                    let row = Tensor::from_f32(
                        vec![1, 37],
                        x.to_f32_vec()[t * 37..(t + 1) * 37].to_vec(),
                    )
                    .unwrap()
                    .cast(act);
                    let one = prepared.forward(&row).unwrap();
                    assert_eq!(
                        bits(&one.y),
                        bits(&a.y[t * 37..(t + 1) * 37]),
                        "{kind} {p} {act}: token {t} alone differs from its row in the batch"
                    );
                }
            }
        }
        println!("[runtime_determinism] {kind}: bitwise repeatable and batch invariant");
    }
}

#[test]
fn prepared_layer_refuses_what_it_was_not_prepared_for() {
    for dev in common::backends("runtime_refusals") {
        let kind = dev.kind();
        if skip_cuda16(kind, DType::BF16) {
            continue;
        }
        let (_, layer) = layers(DType::F32).swap_remove(0);
        let prepared = layer.prepare(&dev, 8, DType::BF16).unwrap();
        // More tokens than max_tokens: a shape error naming the limit.
        let x = random_x(9, 37, 1).cast(DType::BF16);
        let err = prepared.forward(&x).unwrap_err();
        assert!(
            matches!(err, Error::Shape { .. }) && err.to_string().contains("prepared for"),
            "{kind}: {err}"
        );
        // x in another dtype than the prepared activations.
        let x = random_x(3, 37, 1);
        let err = prepared.forward(&x).unwrap_err();
        assert!(matches!(err, Error::DtypeMismatch { .. }), "{kind}: {err}");
        // The layer may be dropped: the prepared layer owns its weights.
        drop(layer);
        let x = random_x(3, 37, 1).cast(DType::BF16);
        assert_eq!(prepared.forward(&x).unwrap().tokens, 3);
        println!("[runtime_refusals] {kind}: T past max_tokens and a wrong dtype refused");
    }
}

#[cfg(feature = "wgpu")]
mod wgpu_device {
    use super::*;
    use moe_kernels::Backend;

    /// A device and queue of the test's own, as a runtime creates them. `None` (said) when
    /// there is no adapter outside CI.
    fn own_device() -> Option<(wgpu::Device, wgpu::Queue, wgpu::AdapterInfo)> {
        let adapter = own_adapter()?;
        Some(device_of(&adapter))
    }

    fn own_adapter() -> Option<wgpu::Adapter> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        match pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
        {
            Ok(a) => Some(a),
            Err(e) => {
                assert!(std::env::var("CI").is_err(), "CI needs a wgpu adapter: {e}");
                println!("[runtime wgpu] skipped: {e}");
                None
            }
        }
    }

    fn device_of(adapter: &wgpu::Adapter) -> (wgpu::Device, wgpu::Queue, wgpu::AdapterInfo) {
        let info = adapter.get_info();
        let (device, queue) =
            pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default()))
                .expect("device");
        (device, queue, info)
    }

    fn buffer(dev: &wgpu::Device, bytes: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        dev.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage,
            mapped_at_creation: false,
        })
    }

    fn read(dev: &wgpu::Device, queue: &wgpu::Queue, src: &wgpu::Buffer, bytes: u64) -> Vec<u8> {
        let staging = buffer(
            dev,
            bytes,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let mut enc = dev.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src, 0, &staging, 0, bytes);
        queue.submit([enc.finish()]);
        staging.map_async(wgpu::MapMode::Read, .., |r| r.expect("map"));
        dev.poll(wgpu::PollType::wait_indefinitely()).expect("poll");
        let view = staging.get_mapped_range(..).expect("range");
        view.to_vec()
    }

    fn bf16_bytes(x: &Tensor) -> Vec<u8> {
        let mut b: Vec<u8> = x
            .to_f32_vec()
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        b.resize(b.len().next_multiple_of(4), 0);
        b
    }

    #[test]
    fn device_forward_on_the_callers_device_allocates_nothing_after_prepare() {
        let Some((device, queue, info)) = own_device() else {
            return;
        };
        let dev = Backend::from_wgpu(device.clone(), queue.clone(), info);
        let (h, max) = (37usize, 64usize);
        for (p, layer) in layers(DType::BF16) {
            let prepared = layer.prepare(&dev, max, DType::BF16).unwrap();
            let bytes = (max * h * 2).next_multiple_of(4) as u64;
            let usage = wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST;
            let xb = buffer(&device, bytes, usage);
            let yb = buffer(&device, bytes, usage);
            let before = prepared.device_allocations().expect("a wgpu count");
            let mut last = None;
            for i in 0..100usize {
                let t = [1, 64, 7, 37, 0, 33, 2][i % 7];
                let x = random_x(t, h, i as u64).cast(DType::BF16);
                let data = bf16_bytes(&x);
                if !data.is_empty() {
                    queue.write_buffer(&xb, 0, &data);
                }
                let mut enc = device.create_command_encoder(&Default::default());
                prepared
                    .forward_wgpu(&mut enc, (&xb, 0), (&yb, 0), t)
                    .unwrap_or_else(|e| panic!("{p} forward {i}: {e}"));
                queue.submit([enc.finish()]);
                last = Some(x);
            }
            let after = prepared.device_allocations().unwrap();
            assert_eq!(
                after,
                before,
                "{p}: 100 device-resident forwards created {} buffers",
                after - before
            );
            // Read y of the last forward once and check it against the reference.
            let x = last.unwrap();
            let t = x.shape()[0];
            let raw = read(&device, &queue, &yb, bytes);
            let y: Vec<f32> = raw[..t * h * 2]
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect();
            let r = layer.forward_reference(&x).unwrap();
            let rel = common::rel_l2(&y, &r.y);
            assert!(rel <= 1e-2, "{p}: device forward rel L2 {rel:e}");
            let routing = prepared.read_routing().unwrap();
            assert_eq!(routing.topk_ids, r.routing.topk_ids, "{p}: routing");
            println!(
                "[runtime wgpu] {p}: 100 forwards into the caller's encoders, {before} buffers \
                 before and after, last y rel L2 {rel:.2e}"
            );
        }
    }

    #[test]
    fn buffers_outside_the_contract_are_errors() {
        let Some(adapter) = own_adapter() else {
            return;
        };
        let (device, queue, info) = device_of(&adapter);
        let dev = Backend::from_wgpu(device.clone(), queue.clone(), info);
        let (_, layer) = layers(DType::F32).swap_remove(0);
        let prepared = layer.prepare(&dev, 8, DType::F32).unwrap();
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        let ok = buffer(&device, 8 * 37 * 4, usage);
        let mut enc = device.create_command_encoder(&Default::default());
        // Misaligned offset, too small a region, missing usage, T past max_tokens.
        let small = buffer(&device, 16, usage);
        let no_copy = buffer(&device, 8 * 37 * 4, wgpu::BufferUsages::STORAGE);
        for (what, r) in [
            (
                "offset",
                prepared.forward_wgpu(&mut enc, (&ok, 2), (&ok, 0), 1),
            ),
            (
                "size",
                prepared.forward_wgpu(&mut enc, (&small, 0), (&ok, 0), 1),
            ),
            (
                "usage",
                prepared.forward_wgpu(&mut enc, (&ok, 0), (&no_copy, 0), 1),
            ),
            (
                "max_tokens",
                prepared.forward_wgpu(&mut enc, (&ok, 0), (&ok, 0), 9),
            ),
        ] {
            let e = r.expect_err(what);
            println!("[runtime wgpu] refused ({what}): {e}");
        }
        // A buffer of another device (of the same instance: wgpu gives no way to tell a
        // buffer of another instance, whose ids alias ours; README, "Embedding in a runtime").
        let (other, _, _) = device_of(&adapter);
        let foreign = buffer(&other, 8 * 37 * 4, usage);
        let e = prepared
            .forward_wgpu(&mut enc, (&foreign, 0), (&ok, 0), 1)
            .expect_err("a buffer of another device");
        println!("[runtime wgpu] refused (foreign x): {e}");
        let e = prepared
            .forward_wgpu(&mut enc, (&ok, 0), (&foreign, 0), 1)
            .expect_err("a buffer of another device");
        println!("[runtime wgpu] refused (foreign y): {e}");
        // Nothing was recorded into enc by the refused calls; it still finishes and submits.
        queue.submit([enc.finish()]);
        // A layer prepared on the CPU has no wgpu forward.
        let cpu = moe_kernels::Backend::new(moe_kernels::BackendKind::Cpu).unwrap();
        let p = layer.prepare(&cpu, 8, DType::F32).unwrap();
        let mut enc = device.create_command_encoder(&Default::default());
        assert!(p.forward_wgpu(&mut enc, (&ok, 0), (&ok, 0), 1).is_err());
    }
}
