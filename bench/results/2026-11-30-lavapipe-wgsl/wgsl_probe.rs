//! Scratch probe (not committed): times one WGSL entry point on the wgpu device.
//! usage: wgsl_probe FILE ENTRY IN_WORDS OUT_WORDS GX GY [u32 params...]
//! binding 0: storage read array<u32> (IN_WORDS, filled with a pattern)
//! binding 1: storage read_write array<u32> (OUT_WORDS)
//! binding 2: uniform array<vec4<u32>, 4> (params)
use moe_kernels::wgpu::WgpuDevice;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let src = std::fs::read_to_string(&a[1]).unwrap();
    let entry = &a[2];
    let in_words: usize = a[3].parse().unwrap();
    let out_words: usize = a[4].parse().unwrap();
    let gx: u32 = a[5].parse().unwrap();
    let gy: u32 = a[6].parse().unwrap();
    let mut params = [0u32; 1040];
    for (i, v) in params.iter_mut().enumerate().skip(16) {
        *v = (i as u32).wrapping_mul(2654435761) & 0x3f7f_3f7f;
    }
    for (i, v) in a[7..].iter().enumerate() {
        params[i] = v.parse().unwrap();
    }
    let dev = WgpuDevice::new().unwrap();
    let d = &dev.device;
    let data: Vec<u32> = (0..in_words as u32)
        .map(|i| (i.wrapping_mul(2654435761) & 0x807f_807f) | 0x3f00_3f00)
        .collect();
    let inb = dev.upload(&data, "in").unwrap();
    let outb = dev.alloc::<u32>(out_words, "out").unwrap();
    let ub = dev.uniform(&params);
    let m = d.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(src.into()),
    });
    let p = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &m,
        entry_point: Some(entry),
        compilation_options: Default::default(),
        cache: None,
    });
    let bgl = p.get_bind_group_layout(0);
    let bg = d.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &bgl,
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: inb.binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: outb.binding(),
            },
            wgpu::BindGroupEntry {
                binding: 2,
                resource: ub.as_entire_binding(),
            },
        ],
    });
    let qs = d.create_query_set(&wgpu::QuerySetDescriptor {
        label: None,
        ty: wgpu::QueryType::Timestamp,
        count: 2,
    });
    let rb = d.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let rbuf = moe_kernels::wgpu::GpuBuffer::<u64>::from_raw(rb, 2);
    let mut times = vec![];
    let cpu = || {
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
        let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
        t(u.ru_utime) + t(u.ru_stime)
    };
    let c0 = cpu();
    for _ in 0..5 {
        let mut enc = dev.encoder();
        enc.write_timestamp(&qs, 0);
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&p);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
        }
        enc.write_timestamp(&qs, 1);
        enc.resolve_query_set(&qs, 0..2, &rbuf.buffer, 0);
        dev.submit_and_wait(enc).unwrap();
        let t = dev.read(&rbuf).unwrap();
        let s = (t[1] - t[0]) as f64 * dev.queue.get_timestamp_period() as f64 / 1e9;
        times.push(s);
    }
    let cpu_ms = (cpu() - c0) / 5.0 * 1e3;
    let out = dev.read(&outb).unwrap();
    let x: u32 = out.iter().fold(0, |a, b| a ^ b);
    times.sort_by(f64::total_cmp);
    let s = times[1];
    println!(
        "{entry}: cpu {cpu_ms:.2} ms  min {:.2} ms med {:.2} ms  read {:.2} GB/s (min)  [xor {x:08x}]",
        s * 1e3,
        times[2] * 1e3,
        in_words as f64 * 4.0 / s / 1e9
    );
}
