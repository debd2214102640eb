//! A runtime embedding the crate on its own wgpu device: it creates the instance, device and
//! queue, fills a bf16 `x` buffer itself, runs 100 forwards of varying T through the
//! device-resident API into its own command encoders (submitting each), reads `y` once, and
//! compares the last forward with the CPU reference. Prints PASS (exit 0) or FAIL (exit 1).
//!
//! `cargo run --release --example wgpu_runtime` (needs a wgpu adapter: a GPU driver, or Mesa's
//! lavapipe with `WGPU_BACKEND=vulkan`).

use std::process::ExitCode;

use half::bf16;
use moe_kernels::synth::{random_layer, random_x, Extras};
use moe_kernels::{Backend, DType, Preset, Tensor};

fn main() -> ExitCode {
    // Mesa's Vulkan device-select layer prints "XDG_RUNTIME_DIR is invalid" on a headless
    // machine when an instance is created; switch it off before creating ours.
    moe_kernels::wgpu::quiet_headless_vulkan();
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
    // The runtime's own device and queue.
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&Default::default()))?;
    let info = adapter.get_info();
    let (device, queue) = pollster::block_on(adapter.request_device(&Default::default()))?;
    println!("adapter: {} ({:?})", info.name, info.backend);

    // A Mixtral-like layer (E = 8, top-2, SwiGLU) with bf16 weights, prepared once for up to
    // 64 tokens of bf16 activations on the runtime's device.
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
    let dev = Backend::from_wgpu(device.clone(), queue.clone(), info);
    let prepared = layer.prepare(&dev, max_t, DType::BF16)?;
    let reference_layer = layer.clone();
    drop(layer); // the prepared layer owns its weights

    // The runtime's activation buffers: dense bf16 [T, H].
    let bytes = (max_t * h * 2) as u64;
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let make = |label| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage,
            mapped_at_creation: false,
        })
    };
    let (x_buf, y_buf) = (make("x"), make("y"));

    let allocations = prepared.device_allocations();
    let mut last: Option<Tensor> = None;
    for i in 0..100 {
        let t = [1, 64, 7, 33, 2][i % 5];
        let x = random_x(t, h, i as u64).cast(DType::BF16);
        let words: Vec<u8> = x
            .to_f32_vec()
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        queue.write_buffer(&x_buf, 0, &words);
        let mut enc = device.create_command_encoder(&Default::default());
        prepared.forward_wgpu(&mut enc, (&x_buf, 0), (&y_buf, 0), t)?;
        queue.submit([enc.finish()]);
        last = Some(x);
    }
    let new_buffers = prepared.device_allocations().unwrap_or(0) - allocations.unwrap_or(0);

    // Read y of the last forward once.
    let x = last.ok_or("no forward ran")?;
    let t = x.shape()[0];
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("y read-back"),
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(&y_buf, 0, &staging, 0, bytes);
    queue.submit([enc.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| {
        if let Err(e) = r {
            eprintln!("map failed: {e}");
        }
    });
    device.poll(wgpu::PollType::wait_indefinitely())?;
    let raw = staging.get_mapped_range(..)?.to_vec();
    let y: Vec<f64> = raw[..t * h * 2]
        .chunks_exact(2)
        .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
        .collect();

    let reference = reference_layer.forward_reference(&x)?;
    let (num, den) = y
        .iter()
        .zip(&reference.y)
        .fold((0.0, 0.0), |(n, d), (a, b)| {
            (n + (a - b).powi(2), d + b * b)
        });
    let rel = (num / den).sqrt();
    let routing = prepared.read_routing()?;
    let ids_ok = routing.topk_ids == reference.routing.topk_ids;
    println!(
        "100 forwards (T = 1..64) into the runtime's encoders; buffers created after prepare: \
         {new_buffers}; last forward T = {t}: rel L2 {rel:.2e} (bound 1e-2), top-k ids {}",
        if ids_ok { "equal" } else { "DIFFER" }
    );
    let pass = rel <= 1e-2 && ids_ok && new_buffers == 0;
    println!("{}", if pass { "PASS" } else { "FAIL" });
    Ok(pass)
}
