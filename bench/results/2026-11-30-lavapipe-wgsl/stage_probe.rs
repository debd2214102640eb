//! Scratch probe (not committed): GPU time of the router and the gate at one shape.
//! usage: stage_probe T E H K
use moe_kernels::config::Preset;
use moe_kernels::synth::Gen;
use moe_kernels::wgpu::act::Act;
use moe_kernels::wgpu::scratch::Scratch;
use moe_kernels::wgpu::weights::GpuWeights;
use moe_kernels::wgpu::{gate, router, GateGpu, WgpuDevice};
use moe_kernels::DType;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (t, e, h, k) = (a[0], a[1], a[2], a[3]);
    let dev = WgpuDevice::new().unwrap();
    let mut g = Gen::new(1);
    let w = g.tensor(&[e, h], 0.05);
    let gw = GpuWeights::upload_router(&dev, &w, None, "router").unwrap();
    let x = g.tensor(&[t, h], 1.0).cast(DType::BF16);
    let words = moe_kernels::wgpu::act::pack(&x.to_f32_vec(), t, h, h, DType::BF16);
    let xb = dev.upload(&words, "x").unwrap();
    let logits = dev.alloc::<f32>(t * e, "logits").unwrap();
    let out = GateGpu::alloc(&dev, t, k, e).unwrap();
    let mut cfg = Preset::Qwen3Moe.config().routing;
    cfg.top_k = k;
    let pool = Scratch::new();
    let qs = dev.device.create_query_set(&wgpu::QuerySetDescriptor {
        label: None,
        ty: wgpu::QueryType::Timestamp,
        count: 3,
    });
    let rb = dev.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 24,
        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let rbuf = moe_kernels::wgpu::GpuBuffer::<u64>::from_raw(rb, 3);
    let mut rt = vec![];
    let mut gt = vec![];
    for _ in 0..5 {
        pool.begin().unwrap();
        let mut enc = dev.encoder();
        enc.write_timestamp(&qs, 0);
        router::encode(
            &dev,
            &mut enc,
            &pool,
            Act::dense(&xb, DType::BF16, t, h),
            &gw,
            None,
            &logits,
        )
        .unwrap();
        enc.write_timestamp(&qs, 1);
        gate::encode(&dev, &mut enc, &pool, &logits, t, e, None, &cfg, &out).unwrap();
        enc.write_timestamp(&qs, 2);
        enc.resolve_query_set(&qs, 0..3, &rbuf.buffer, 0);
        dev.submit_and_wait(enc).unwrap();
        let ts = dev.read(&rbuf).unwrap();
        let p = dev.queue.get_timestamp_period() as f64 / 1e6;
        rt.push((ts[1] - ts[0]) as f64 * p);
        gt.push((ts[2] - ts[1]) as f64 * p);
    }
    rt.sort_by(f64::total_cmp);
    gt.sort_by(f64::total_cmp);
    println!(
        "T {t} E {e} H {h} k {k}: router min {:.2} med {:.2} ms | gate min {:.2} med {:.2} ms",
        rt[0], rt[2], gt[0], gt[2]
    );
}
