//! A runtime embedding the crate on its own CUDA stream: it creates the context and stream,
//! uploads a bf16 `x` itself, runs 100 forwards of varying T through the device-resident API
//! on its stream (no synchronisation inside), reads `y` once, and compares the last forward
//! with the CPU reference. Prints PASS (exit 0) or FAIL (exit 1); without a CUDA driver it says
//! so and exits 0. Compiles everywhere the `cuda` feature does.
//!
//! `cargo run --release --example cuda_runtime`

use std::process::ExitCode;

use half::bf16;
use moe_kernels::synth::{random_layer, random_x, Extras};
use moe_kernels::{Backend, DType, Preset, Tensor};

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
    use cudarc::driver::CudaContext;
    if !moe_kernels::cuda::driver_present() {
        println!("no CUDA driver here: nothing to run (the example needs an NVIDIA GPU)");
        return Ok(true);
    }
    if !moe_kernels::cuda::act16_enabled() {
        println!(
            "bf16 activations on CUDA are opt-in until a GPU run verifies them: run with \
             MOE_CUDA_ACT16=1"
        );
        return Ok(true);
    }
    // The runtime's own context and stream.
    let ctx = CudaContext::new(0)?;
    let stream = ctx.new_stream()?;

    let (e, h, f, max_t) = (8, 256, 512, 64);
    let layer = random_layer(
        Preset::Mixtral.config(),
        e,
        h,
        f,
        Extras::default(),
        DType::BF16,
        7,
    )?;
    let dev = Backend::from_cuda_stream(stream.clone())?;
    let prepared = layer.prepare(&dev, max_t, DType::BF16)?;

    let mut x_dev = stream.alloc_zeros::<bf16>(max_t * h)?;
    let mut y_dev = stream.alloc_zeros::<bf16>(max_t * h)?;
    let mut last: Option<Tensor> = None;
    for i in 0..100 {
        let t = [1, 64, 7, 33, 2][i % 5];
        let x = random_x(t, h, i as u64).cast(DType::BF16);
        let host: Vec<bf16> = x.to_f32_vec().iter().map(|v| bf16::from_f32(*v)).collect();
        let mut xv = x_dev.slice_mut(0..t * h);
        stream.memcpy_htod(&host, &mut xv)?;
        let xv = x_dev.slice(0..t * h);
        let mut yv = y_dev.slice_mut(0..t * h);
        prepared.forward_cuda(&xv, &mut yv, t)?;
        last = Some(x);
    }
    let x = last.ok_or("no forward ran")?;
    let t = x.shape()[0];
    let y: Vec<f64> = stream.clone_dtoh(&y_dev)?[..t * h]
        .iter()
        .map(|v| v.to_f64())
        .collect();
    let reference = layer.forward_reference(&x)?;
    let (num, den) = y
        .iter()
        .zip(&reference.y)
        .fold((0.0, 0.0), |(n, d), (a, b)| {
            (n + (a - b).powi(2), d + b * b)
        });
    let rel = (num / den).sqrt();
    let ids_ok = prepared.read_routing()?.topk_ids == reference.routing.topk_ids;
    println!(
        "100 forwards (T = 1..64) on the runtime's stream; last forward T = {t}: rel L2 \
         {rel:.2e} (bound 1e-2), top-k ids {}",
        if ids_ok { "equal" } else { "DIFFER" }
    );
    let pass = rel <= 1e-2 && ids_ok;
    println!("{}", if pass { "PASS" } else { "FAIL" });
    Ok(pass)
}
