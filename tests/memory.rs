//! Resident memory stays flat over many forwards (no leak per forward), on the CPU backend and
//! on wgpu when it is available. Reads `VmRSS` from `/proc/self/status` (Linux; elsewhere the
//! tests print that they cannot measure and pass).
//!
//! * `rss_flat_over_10k_forwards` (`--ignored`, run by `scripts/soak.sh`): 10,000 forwards of
//!   a small layer per backend through a `PreparedLayer`, then 1,000 through
//!   `MoeLayer::forward` (which prepares, i.e. uploads, every time); RSS between forward 1,000
//!   and 10,000 must grow by less than 10 % or less than 32 MiB.
//! * `rss_flat_quick`: 300 prepared forwards per backend, growth between forward 100 and 300
//!   below 64 MiB (a loose bound: it only catches a gross leak).

mod common;

use std::time::Instant;

use moe_kernels::synth::{random_layer, random_x, Extras};
use moe_kernels::{Backend, BackendKind, DType, MoeLayer, Preset, Tensor};

/// Resident set size in KiB, if this platform has `/proc/self/status`.
fn rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn small_layer() -> MoeLayer {
    let mut cfg = Preset::Mixtral.config();
    cfg.routing.top_k = 2;
    random_layer(
        cfg,
        8,
        32,
        48,
        Extras {
            shared_ffn: Some(16),
            shared_gate: true,
            ..Extras::default()
        },
        DType::F32,
        1,
    )
    .expect("layer")
}

/// The backends measured: CPU, and wgpu when it starts (CUDA too when present).
fn measured_backends(test: &str) -> Vec<Backend> {
    common::backends(test)
}

struct Run {
    kind: BackendKind,
    /// (forward count, RSS KiB) samples.
    samples: Vec<(usize, u64)>,
    secs: f64,
}

/// `n` prepared forwards, sampling RSS at each count in `at`.
fn run_prepared(dev: &Backend, layer: &MoeLayer, x: &Tensor, n: usize, at: &[usize]) -> Run {
    let prepared = layer
        .prepare(dev, x.shape()[0], x.dtype())
        .expect("prepare");
    let mut samples = Vec::new();
    let start = Instant::now();
    let mut checksum = 0.0f64;
    for i in 1..=n {
        let out = prepared.forward(x).expect("forward");
        checksum += f64::from(out.y[0]);
        if at.contains(&i) {
            samples.push((i, rss_kib().unwrap_or(0)));
        }
    }
    std::hint::black_box(checksum);
    Run {
        kind: dev.kind(),
        samples,
        secs: start.elapsed().as_secs_f64(),
    }
}

fn report(label: &str, r: &Run) {
    let s: Vec<String> = r
        .samples
        .iter()
        .map(|(i, kib)| format!("{i}: {:.1} MiB", *kib as f64 / 1024.0))
        .collect();
    println!(
        "[memory] {} {label}: {} forwards in {:.1} s; RSS {}",
        r.kind,
        r.samples.last().map_or(0, |x| x.0),
        r.secs,
        s.join(", ")
    );
}

/// RSS growth (KiB) from the sample at forward `from` to the last sample.
fn growth(r: &Run, from: usize) -> (u64, u64, i64) {
    let base = r.samples.iter().find(|s| s.0 == from).expect("sample").1;
    let last = r.samples.last().expect("sample").1;
    (base, last, last as i64 - base as i64)
}

#[test]
#[ignore = "long: 10,000 forwards per backend (scripts/soak.sh runs it)"]
fn rss_flat_over_10k_forwards() {
    if rss_kib().is_none() {
        println!("[memory] no /proc/self/status here: cannot measure RSS, skipped");
        return;
    }
    let layer = small_layer();
    let x = random_x(16, layer.dims().hidden, 2);
    let at: Vec<usize> = (1..=10).map(|i| i * 1000).chain([1, 100]).collect();
    for dev in measured_backends("memory 10k") {
        let run = run_prepared(&dev, &layer, &x, 10_000, &at);
        let mut sorted = run.samples.clone();
        sorted.sort_unstable();
        let run = Run {
            samples: sorted,
            ..run
        };
        report("prepared", &run);
        let (base, last, grew) = growth(&run, 1000);
        let frac = grew as f64 / base as f64;
        println!(
            "[memory] {} prepared: RSS at 1000 = {:.1} MiB, at 10000 = {:.1} MiB, growth {:+.2} MiB ({:+.2} %)",
            dev.kind(),
            base as f64 / 1024.0,
            last as f64 / 1024.0,
            grew as f64 / 1024.0,
            100.0 * frac
        );
        assert!(
            grew < 32 * 1024 || frac < 0.10,
            "{}: RSS grew {:.1} MiB ({:.1} %) between forward 1000 and 10000",
            dev.kind(),
            grew as f64 / 1024.0,
            100.0 * frac
        );

        // Unprepared forwards upload the weights every time: also flat.
        let start = Instant::now();
        let mut samples = Vec::new();
        for i in 1..=1000 {
            layer.forward(&dev, &x).expect("forward");
            if i % 250 == 0 {
                samples.push((i, rss_kib().unwrap_or(0)));
            }
        }
        let run = Run {
            kind: dev.kind(),
            samples,
            secs: start.elapsed().as_secs_f64(),
        };
        report("unprepared", &run);
        let (base, _, grew) = growth(&run, 250);
        let frac = grew as f64 / base as f64;
        assert!(
            grew < 32 * 1024 || frac < 0.10,
            "{}: RSS grew {:.1} MiB ({:.1} %) over 750 unprepared forwards",
            dev.kind(),
            grew as f64 / 1024.0,
            100.0 * frac
        );
    }
}

#[test]
fn rss_flat_quick() {
    if rss_kib().is_none() {
        println!("[memory] no /proc/self/status here: cannot measure RSS, skipped");
        return;
    }
    let layer = small_layer();
    let x = random_x(16, layer.dims().hidden, 3);
    for dev in measured_backends("memory quick") {
        let run = run_prepared(&dev, &layer, &x, 300, &[1, 100, 200, 300]);
        report("quick", &run);
        let (_, _, grew) = growth(&run, 100);
        assert!(
            grew < 64 * 1024,
            "{}: RSS grew {:.1} MiB over 200 forwards",
            dev.kind(),
            grew as f64 / 1024.0
        );
    }
}
