//! A whole layer forward on CUDA is one stream-ordered sequence of launches with no host
//! synchronisation inside: it is captured in a CUDA graph, replayed, and must give bitwise the
//! same output as the direct forward. Skipped (and says so) without a CUDA driver.

#![cfg(feature = "cuda")]

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaStream};
use moe_kernels::cuda::act::tensor_bytes;
use moe_kernels::synth::{random_layer, random_x, Extras};
use moe_kernels::{Backend, DType, Preset, Tensor, TensorData};

/// A context and stream of our own, as a runtime holds them (cudarc's event tracking off, as
/// CUDA-graph users set it). `None` without a driver or device.
fn runtime_stream() -> Option<Arc<CudaStream>> {
    if !moe_kernels::cuda::driver_present() {
        return None;
    }
    let ctx = CudaContext::new(0).ok()?;
    // SAFETY: every use of this context in the test is on the one stream below.
    unsafe { ctx.disable_event_tracking() };
    ctx.new_stream().ok()
}

#[test]
fn device_forward_on_the_callers_stream_is_graph_capturable() {
    let Some(stream) = runtime_stream() else {
        println!("[cuda_graph] skipped: no CUDA driver or device");
        return;
    };
    let dev = Backend::from_cuda_stream(stream.clone()).expect("backend on our stream");
    for (preset, wdtype, act) in [
        (Preset::Mixtral, DType::F32, DType::F32),
        (Preset::Qwen2Moe, DType::BF16, DType::BF16),
        (Preset::DeepseekV3, DType::F32, DType::F16),
    ] {
        if act != DType::F32 && !moe_kernels::cuda::act16_enabled() {
            println!("[cuda_graph] {preset} {act} skipped: MOE_CUDA_ACT16 is not set");
            continue;
        }
        let mut cfg = preset.config();
        let extras = match preset {
            Preset::Qwen2Moe => Extras {
                shared_ffn: Some(40),
                shared_gate: true,
                ..Extras::default()
            },
            Preset::DeepseekV3 => {
                cfg.routing.top_k = 4;
                Extras {
                    score_correction_bias: true,
                    shared_ffn: Some(24),
                    ..Extras::default()
                }
            }
            _ => Extras::default(),
        };
        let layer = random_layer(cfg, 16, 64, 48, extras, wdtype, 3).unwrap();
        let (t, h) = (37, 64);
        let x = random_x(t, h, 4).cast(act);
        let prepared = layer.prepare(&dev, 64, act).unwrap();
        let direct = prepared.forward(&x).unwrap();

        let n = t * h * act.size();
        let x_dev = stream.clone_htod(&tensor_bytes(&x)).unwrap();
        let mut y_dev = stream.alloc_zeros::<u8>(n).unwrap();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
            .unwrap();
        let launched = match act {
            DType::F32 => {
                // SAFETY: n bytes are n / 4 f32 elements of the same allocation.
                let xv = unsafe { x_dev.transmute::<f32>(t * h) }.unwrap();
                // SAFETY: as above.
                let mut yv = unsafe { y_dev.transmute_mut::<f32>(t * h) }.unwrap();
                prepared.forward_cuda(&xv, &mut yv, t)
            }
            DType::F16 => {
                // SAFETY: n bytes are n / 2 f16 elements of the same allocation.
                let xv = unsafe { x_dev.transmute::<half::f16>(t * h) }.unwrap();
                // SAFETY: as above.
                let mut yv = unsafe { y_dev.transmute_mut::<half::f16>(t * h) }.unwrap();
                prepared.forward_cuda(&xv, &mut yv, t)
            }
            DType::BF16 => {
                // SAFETY: n bytes are n / 2 bf16 elements of the same allocation.
                let xv = unsafe { x_dev.transmute::<half::bf16>(t * h) }.unwrap();
                // SAFETY: as above.
                let mut yv = unsafe { y_dev.transmute_mut::<half::bf16>(t * h) }.unwrap();
                prepared.forward_cuda(&xv, &mut yv, t)
            }
        };
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        launched.expect("forward inside capture");
        let graph = graph.expect("end capture").expect("a graph was captured");
        // Poison y, replay twice, compare bitwise with the host-tensor forward.
        stream.memcpy_htod(&vec![0xFFu8; n], &mut y_dev).unwrap();
        graph.launch().unwrap();
        graph.launch().unwrap();
        stream.synchronize().unwrap();
        let y_raw = stream.clone_dtoh(&y_dev).unwrap();
        let y = Tensor::new(
            vec![t, h],
            match act {
                DType::F32 => TensorData::F32(bytemuck::pod_collect_to_vec(&y_raw)),
                DType::F16 => TensorData::F16(bytemuck::pod_collect_to_vec(&y_raw)),
                DType::BF16 => TensorData::BF16(bytemuck::pod_collect_to_vec(&y_raw)),
            },
        )
        .unwrap()
        .to_f32_vec();
        assert!(
            y.iter()
                .zip(&direct.y)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{preset} {act}: graph replay differs from the direct forward"
        );
        let reference = layer.forward_reference(&x).unwrap();
        let num: f64 = y
            .iter()
            .zip(&reference.y)
            .map(|(a, b)| (f64::from(*a) - b).powi(2))
            .sum();
        let den: f64 = reference.y.iter().map(|b| b * b).sum();
        let err = (num / den).sqrt();
        let tol = match (wdtype, act) {
            (DType::F32, DType::F32) => 2e-5,
            (_, DType::F16) => 5e-3,
            _ => 1e-2,
        };
        assert!(err <= tol, "{preset} {act}: graph replay rel L2 {err:e}");
        println!(
            "[cuda_graph] {preset} weights {wdtype} activations {act}: replay bitwise equal to \
             direct, rel L2 {err:.2e}"
        );
    }
}
