//! A whole layer forward on CUDA is one stream-ordered sequence of launches with no host
//! synchronisation inside: it is captured in a CUDA graph, replayed, and must give bitwise the
//! same output as the direct forward. Skipped (and says so) without a CUDA driver.

#![cfg(feature = "cuda")]

use cudarc::driver::sys;
use moe_kernels::cuda::layer::CudaLayer;
use moe_kernels::cuda::CudaDevice;
use moe_kernels::synth::{random_layer, random_x, Extras};
use moe_kernels::{DType, Preset};

#[test]
fn layer_forward_is_graph_capturable() {
    let dev = match CudaDevice::new(0) {
        Ok(d) => d,
        Err(e) => {
            println!("[cuda_graph] skipped: {e}");
            return;
        }
    };
    for (preset, dtype) in [
        (Preset::Mixtral, DType::F32),
        (Preset::Qwen2Moe, DType::BF16),
        (Preset::DeepseekV3, DType::F32),
    ] {
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
        let layer = random_layer(cfg, 16, 64, 48, extras, dtype, 3).unwrap();
        let x = random_x(37, 64, 4);
        let cl = CudaLayer::upload(&dev, &layer).unwrap();
        let direct = cl.forward(&dev, &x).unwrap();

        let mut b = cl.buffers(&dev, &x).unwrap();
        dev.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
            .unwrap();
        let launched = cl.launch(&dev, &mut b, None);
        let graph = dev.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        launched.expect("launch inside capture");
        let graph = graph.expect("end capture").expect("a graph was captured");
        // Poison y, replay twice, compare bitwise with the direct forward.
        let nan = vec![f32::NAN; 37 * 64];
        dev.stream.memcpy_htod(&nan, &mut b.y).unwrap();
        graph.launch().unwrap();
        graph.launch().unwrap();
        dev.sync().unwrap();
        let y = dev.read(&b.y, 37 * 64).unwrap();
        assert!(
            y.iter()
                .zip(&direct.y)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{preset}: graph replay differs from the direct forward"
        );
        let reference = layer.forward_reference(&x).unwrap();
        let num: f64 = y
            .iter()
            .zip(&reference.y)
            .map(|(a, b)| (f64::from(*a) - b).powi(2))
            .sum();
        let den: f64 = reference.y.iter().map(|b| b * b).sum();
        let err = (num / den).sqrt();
        let tol = if dtype == DType::F32 { 2e-5 } else { 1e-2 };
        assert!(err <= tol, "{preset}: graph replay rel L2 {err:e}");
        println!("[cuda_graph] {preset} {dtype}: replay bitwise equal to direct, rel L2 {err:.2e}");
    }
}
