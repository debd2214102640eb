//! Scratch probe (not committed): the expert GEMM alone, E experts with one row each.
//! usage: gemv_probe E H F ACT(swiglu|relu) PATH(rows|tiled) N
use moe_kernels::config::Activation;
use moe_kernels::cpu::expert_gemm::ExpertWeights;
use moe_kernels::synth::Gen;
use moe_kernels::wgpu::act::{self, Act};
use moe_kernels::wgpu::expert_gemm::{encode_path, GemmPath, GpuExperts};
use moe_kernels::wgpu::scratch::Scratch;
use moe_kernels::wgpu::WgpuDevice;
use moe_kernels::DType;

fn cpu() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (e, h, f): (usize, usize, usize) = (
        a[1].parse().unwrap(),
        a[2].parse().unwrap(),
        a[3].parse().unwrap(),
    );
    let act = if a[4] == "relu" {
        Activation::Relu
    } else {
        Activation::Swiglu
    };
    let path = if a[5] == "tiled" {
        GemmPath::Tiled
    } else {
        GemmPath::Rows
    };
    let n: usize = a[6].parse().unwrap();
    let dev = WgpuDevice::new().unwrap();
    let mut g = Gen::new(3);
    let mut t = |shape: &[usize], s: f32| g.tensor(shape, s).cast(DType::BF16);
    let w = ExpertWeights {
        gate: act.is_gated().then(|| t(&[e, f, h], 0.04).into()),
        up: t(&[e, f, h], 0.04).into(),
        down: t(&[e, h, f], 0.04).into(),
        gate_bias: None,
        up_bias: None,
        down_bias: None,
    };
    let gw = GpuExperts::upload(&dev, &w, act).unwrap();
    let used: usize = a.get(7).map_or(e, |v| v.parse().unwrap());
    let rows = used;
    let x: Vec<f32> = (0..rows * h)
        .map(|i| ((i * 7919 % 1000) as f32 / 1000.0) - 0.5)
        .collect();
    let xb = dev
        .upload(&act::pack(&x, rows, h, h, DType::BF16), "x")
        .unwrap();
    // Experts e·k/used get one row each (spread over the layer), the others none.
    let offsets: Vec<u32> = (0..=e).map(|i| (i * used).div_ceil(e) as u32).collect();
    let ob = dev.upload(&offsets, "offsets").unwrap();
    let yb = dev
        .alloc::<u32>(act::matrix_words(rows, h, DType::BF16), "y")
        .unwrap();
    let pool = Scratch::new();
    let qs = dev.device.create_query_set(&wgpu::QuerySetDescriptor {
        label: None,
        ty: wgpu::QueryType::Timestamp,
        count: 2,
    });
    let rb = dev.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let rbuf = moe_kernels::wgpu::GpuBuffer::<u64>::from_raw(rb, 2);
    let mut ts = vec![];
    let mut c0 = 0.0;
    for i in 0..=n {
        if i == 1 {
            c0 = cpu();
        }
        pool.begin().unwrap();
        let mut enc = dev.encoder();
        enc.write_timestamp(&qs, 0);
        encode_path(
            &dev,
            &mut enc,
            &pool,
            Act::padded(&xb, DType::BF16, rows, h),
            &ob,
            &gw,
            act,
            Act::padded(&yb, DType::BF16, rows, h),
            path,
        )
        .unwrap();
        enc.write_timestamp(&qs, 1);
        enc.resolve_query_set(&qs, 0..2, &rbuf.buffer, 0);
        dev.submit_and_wait(enc).unwrap();
        let r = dev.read(&rbuf).unwrap();
        if i > 0 {
            ts.push((r[1] - r[0]) as f64 * dev.queue.get_timestamp_period() as f64 / 1e6);
        }
    }
    let c = (cpu() - c0) / n as f64 * 1e3;
    ts.sort_by(f64::total_cmp);
    let bytes = gw.bytes() as f64 * used as f64 / e as f64;
    println!(
        "{:?} {:?}: cpu {c:.2} ms, min {:.2} med {:.2} ms, {:.2} GB/s (min), {:.1} MB",
        act,
        path,
        ts[0],
        ts[n / 2],
        bytes / ts[0] / 1e6,
        bytes / 1e6
    );
}
