//! Expert parallelism: an EP forward over N in-process ranks is bitwise the single-device
//! forward of the same layer on the same backend (y, ids, weights, kept, counts), for world
//! sizes 1, 2, 3, 4 and 8, every preset, with and without capacity and expert choice, on the
//! CPU and on wgpu (lavapipe in CI, a bounded matrix); uneven expert splits, ranks with no
//! experts or no tokens, an empty batch; ranks that disagree fail together; `moe run --ep N`
//! writes the single-device file byte for byte.

mod common;

use std::time::Instant;

use moe_kernels::config::{Capacity, ExpertChoice};
use moe_kernels::ep::{EpLayer, InProcess, InProcessWorld, Split};
use moe_kernels::io::{self, OutTensor};
use moe_kernels::synth::{random_layer, random_x, Extras};
use moe_kernels::{
    Backend, BackendKind, Combine, DType, Error, ForwardOutput, MoeLayer, Preset, Priority, Tensor,
};

const WORLDS: [usize; 5] = [1, 2, 3, 4, 8];

/// Routing variants: the preset as it is, with token-choice capacity (position priority or
/// BPR, alternating), and with expert choice.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    Plain,
    Capacity,
    ExpertChoice,
}

const VARIANTS: [Variant; 3] = [Variant::Plain, Variant::Capacity, Variant::ExpertChoice];

/// A small odd-shaped synthetic layer of each preset's family (as tests/layer.rs), routed as
/// `v` says.
fn layer(p: Preset, v: Variant, dtype: DType, seed: u64) -> MoeLayer {
    common::preset_layer_with(p, dtype, seed, |r| match v {
        Variant::Plain => r.capacity = None,
        Variant::Capacity => {
            // Tight enough that assignments are dropped.
            r.capacity = Some(Capacity::Factor(0.75));
            if seed % 2 == 1 {
                r.priority = Priority::Top1Score;
            }
        }
        Variant::ExpertChoice => {
            r.capacity = None;
            r.groups = None;
            r.combine = Combine::Score;
            r.expert_choice = Some(ExpertChoice {
                capacity_factor: 1.5,
            });
        }
    })
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every output of `ep` is bitwise that of `one`.
fn assert_bitwise(ep: &ForwardOutput, one: &ForwardOutput, ctx: &str) {
    assert_eq!(
        (ep.tokens, ep.hidden, ep.slots, ep.dtype),
        (one.tokens, one.hidden, one.slots, one.dtype),
        "{ctx}: shapes"
    );
    assert_eq!(ep.topk_ids, one.topk_ids, "{ctx}: topk_ids");
    assert_eq!(
        bits(&ep.topk_weights),
        bits(&one.topk_weights),
        "{ctx}: topk_weights"
    );
    assert_eq!(ep.kept, one.kept, "{ctx}: kept");
    assert_eq!(ep.counts, one.counts, "{ctx}: counts");
    if let Some(i) = (0..ep.y.len()).find(|&i| ep.y[i].to_bits() != one.y[i].to_bits()) {
        panic!(
            "{ctx}: y[{i}] (token {}) differs: EP {:e} vs single-device {:e}",
            i / ep.hidden,
            ep.y[i],
            one.y[i]
        );
    }
    assert_eq!(ep.y.len(), one.y.len(), "{ctx}: y length");
}

/// The EP forward of `x` over `experts` and `tokens` against `MoeLayer::forward`.
fn check(dev: &Backend, l: &MoeLayer, x: &Tensor, experts: &Split, tokens: &Split, ctx: &str) {
    let one = l
        .forward(dev, x)
        .unwrap_or_else(|e| panic!("{ctx}: single: {e}"));
    let mut world = InProcessWorld::new(l, dev, experts, x.dtype())
        .unwrap_or_else(|e| panic!("{ctx}: world: {e}"));
    let ep = world
        .forward(x, tokens)
        .unwrap_or_else(|e| panic!("{ctx}: ep: {e}"));
    assert_bitwise(&ep.output, &one, ctx);
    // Every kept assignment was dispatched once and computed once.
    let kept: usize = one.kept.iter().filter(|&&k| k != 0).count();
    let sent: usize = ep.ranks.iter().map(|s| s.rows_sent).sum();
    let got: usize = ep.ranks.iter().map(|s| s.rows_received).sum();
    assert_eq!(
        (sent, got),
        (kept, kept),
        "{ctx}: rows dispatched / received"
    );
}

fn even(l: &MoeLayer, x: &Tensor, w: usize) -> (Split, Split) {
    (
        Split::even(l.dims().experts, w).unwrap(),
        Split::even(x.shape()[0], w).unwrap(),
    )
}

fn wgpu() -> Option<Backend> {
    match Backend::new(BackendKind::Wgpu) {
        Ok(b) => Some(b),
        Err(e) => {
            let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(!in_ci, "CI=true but wgpu did not start: {e}");
            println!("wgpu skipped: {e}");
            None
        }
    }
}

#[test]
fn cpu_every_world_preset_routing_and_dtype_is_bitwise_single_device() {
    let start = Instant::now();
    let dev = Backend::new(BackendKind::Cpu).unwrap();
    let mut n = 0;
    for (pi, p) in Preset::ALL.into_iter().enumerate() {
        for (vi, v) in VARIANTS.into_iter().enumerate() {
            for dtype in DType::ALL {
                let l = layer(p, v, dtype, (pi * 3 + vi) as u64);
                let x = random_x(37, l.dims().hidden, pi as u64).cast(dtype);
                for w in WORLDS {
                    let (e, t) = even(&l, &x, w);
                    check(
                        &dev,
                        &l,
                        &x,
                        &e,
                        &t,
                        &format!("cpu {p} {v:?} {dtype} EP{w}"),
                    );
                    n += 1;
                }
            }
        }
    }
    println!(
        "[ep cpu] {n} EP forwards bitwise equal in {:?}",
        start.elapsed()
    );
}

/// The same matrix on wgpu, bounded for lavapipe on two cores (about 15 s): every world
/// size, preset and routing variant, with the activation dtype rotating over them (the CPU
/// test above runs every dtype of every combination).
#[test]
fn wgpu_every_world_preset_and_routing_is_bitwise_single_device() {
    let Some(dev) = wgpu() else { return };
    let start = Instant::now();
    let mut n = 0;
    for (pi, p) in Preset::ALL.into_iter().enumerate() {
        for (vi, v) in VARIANTS.into_iter().enumerate() {
            let l = layer(p, v, DType::F32, (pi * 3 + vi) as u64);
            let x = random_x(37, l.dims().hidden, pi as u64);
            for (wi, w) in WORLDS.into_iter().enumerate() {
                let dtype = DType::ALL[(pi + vi + wi) % 3];
                let l = l.with_expert_dtype(dtype);
                let x = x.cast(dtype);
                let (e, t) = even(&l, &x, w);
                check(
                    &dev,
                    &l,
                    &x,
                    &e,
                    &t,
                    &format!("wgpu {p} {v:?} {dtype} EP{w}"),
                );
                n += 1;
            }
        }
    }
    println!(
        "[ep wgpu] {n} EP forwards bitwise equal in {:?}",
        start.elapsed()
    );
}

/// A larger batch (T = 300) with capacity and expert choice, where many assignments are
/// dropped and every rank has work, on each backend.
#[test]
fn larger_batch_with_capacity_and_expert_choice() {
    let mut devs = vec![Backend::new(BackendKind::Cpu).unwrap()];
    devs.extend(wgpu());
    for dev in &devs {
        for (p, v) in [
            (Preset::Switch, Variant::Capacity),
            (Preset::DeepseekV3, Variant::Capacity),
            (Preset::Qwen2Moe, Variant::ExpertChoice),
        ] {
            let l = layer(p, v, DType::BF16, 51);
            let x = random_x(300, l.dims().hidden, 52).cast(DType::BF16);
            for w in [3, 8] {
                let (e, t) = even(&l, &x, w);
                check(
                    dev,
                    &l,
                    &x,
                    &e,
                    &t,
                    &format!("{} {p} {v:?} T=300 EP{w}", dev.kind()),
                );
            }
        }
    }
}

/// Uneven expert splits, ranks holding no experts (also more ranks than experts), ranks home
/// to no tokens, fewer tokens than ranks, and an empty batch.
#[test]
fn uneven_splits_and_empty_ranks() {
    let mut devs = vec![Backend::new(BackendKind::Cpu).unwrap()];
    devs.extend(wgpu());
    for dev in &devs {
        let k = dev.kind();
        for v in VARIANTS {
            let l = layer(Preset::Mixtral, v, DType::F32, 11);
            let x = random_x(37, l.dims().hidden, 12);
            let cases: [(&[usize], &[usize]); 4] = [
                (&[1, 0, 10, 5], &[10, 0, 20, 7]),
                (&[0, 0, 16], &[37, 0, 0]),
                (&[16, 0], &[0, 37]),
                (&[3, 3, 0, 3, 3, 0, 2, 2], &[5, 5, 5, 5, 5, 5, 5, 2]),
            ];
            for (es, ts) in cases {
                let ctx = format!("{k} {v:?} experts {es:?} tokens {ts:?}");
                check(
                    dev,
                    &l,
                    &x,
                    &Split::from_counts(es),
                    &Split::from_counts(ts),
                    &ctx,
                );
            }
            // Fewer tokens than ranks, and no tokens at all.
            for t in [3, 0] {
                let x = random_x(t, l.dims().hidden, 13);
                let (e, ts) = even(&l, &x, 8);
                check(dev, &l, &x, &e, &ts, &format!("{k} {v:?} T={t} EP8"));
            }
        }
        // More ranks than experts: E = 4 over 8 ranks, four of them hold none.
        let mut cfg = Preset::Qwen2Moe.config();
        cfg.routing.top_k = 2;
        let extras = Extras {
            shared_ffn: Some(21),
            shared_gate: true,
            ..Extras::default()
        };
        let l = random_layer(cfg, 4, 37, 29, extras, DType::F32, 14).unwrap();
        let x = random_x(23, 37, 15);
        let (e, t) = even(&l, &x, 8);
        assert_eq!(e.counts(), vec![1, 1, 1, 1, 0, 0, 0, 0]);
        check(dev, &l, &x, &e, &t, &format!("{k} E=4 over 8 ranks"));
    }
}

/// Runs one forward per rank on threads of an in-process world; each rank's layer and x are
/// built by `rank`.
fn run_ranks(
    world: usize,
    rank: impl Fn(usize) -> moe_kernels::Result<(EpLayer, Tensor)> + Sync,
) -> Vec<moe_kernels::Result<()>> {
    let comms = InProcess::world(world).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(r, c)| {
                let rank = &rank;
                s.spawn(move || {
                    let out = rank(r).and_then(|(mut l, x)| l.forward(c, &x).map(|_| ()));
                    // A failed rank aborts the world, so its peers do not wait for it.
                    if let Err(e) = &out {
                        c.abort(&e.to_string());
                    }
                    out
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assert_all_fail(res: &[moe_kernels::Result<()>], needle: &str, ctx: &str) {
    assert!(res.iter().all(Result::is_err), "{ctx}: {res:?}");
    assert!(
        res.iter()
            .any(|r| r.as_ref().unwrap_err().to_string().contains(needle)),
        "{ctx}: no error mentions {needle:?}: {res:?}"
    );
}

#[test]
fn ranks_that_disagree_fail_together() {
    let dev = Backend::new(BackendKind::Cpu).unwrap();
    let a = layer(Preset::Mixtral, Variant::Plain, DType::F32, 21);
    let cap = layer(Preset::Mixtral, Variant::Capacity, DType::F32, 21);
    let other_router = layer(Preset::Mixtral, Variant::Plain, DType::F32, 22);
    let mut cfg8 = Preset::Mixtral.config();
    cfg8.routing.top_k = 2;
    let e8 = random_layer(cfg8, 8, 37, 29, Extras::default(), DType::F32, 23).unwrap();
    let wide = random_layer(cfg8, 16, 41, 29, Extras::default(), DType::F32, 23).unwrap();
    let h = 37;
    let split = |l: &MoeLayer| Split::even(l.dims().experts, 3).unwrap();
    let x = |t: usize| random_x(t, h, 24);

    // One rank's x has another width.
    let res = run_ranks(3, |r| {
        let xr = if r == 1 { random_x(4, 36, 1) } else { x(4) };
        Ok((EpLayer::new(&a, &dev, r, &split(&a), DType::F32)?, xr))
    });
    assert_all_fail(&res, "x must be [T, H] with H = 37", "x width");
    assert!(res[0]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("rank 1's input x is invalid"));

    // One rank's x is in another dtype than the world's activations.
    let res = run_ranks(3, |r| {
        let xr = if r == 2 { x(4).cast(DType::BF16) } else { x(4) };
        Ok((EpLayer::new(&a, &dev, r, &split(&a), DType::F32)?, xr))
    });
    assert_all_fail(&res, "expected f32, got bf16", "x dtype");

    // Ranks prepared for different activation dtypes.
    let res = run_ranks(2, |r| {
        let d = if r == 1 { DType::BF16 } else { DType::F32 };
        Ok((
            EpLayer::new(&a, &dev, r, &Split::even(16, 2)?, d)?,
            x(3).cast(d),
        ))
    });
    assert_all_fail(&res, "ranks disagree on the activation dtype", "act dtype");

    // Layers with another E, another H, another router, another routing config.
    for (name, b, needle) in [
        ("E", &e8, "ranks disagree on the expert count E"),
        ("H", &wide, "ranks disagree on the hidden size H"),
        ("router", &other_router, "ranks disagree on the layer"),
        ("config", &cap, "ranks disagree on the layer"),
    ] {
        let res = run_ranks(3, |r| {
            let l = if r == 2 { b } else { &a };
            let xr = random_x(4, l.dims().hidden, 2);
            Ok((EpLayer::new(l, &dev, r, &split(l), DType::F32)?, xr))
        });
        assert_all_fail(&res, needle, name);
    }

    // Different expert splits of the same layer.
    let res = run_ranks(2, |r| {
        let s = if r == 0 {
            Split::from_counts(&[8, 8])
        } else {
            Split::from_counts(&[4, 12])
        };
        Ok((EpLayer::new(&a, &dev, r, &s, DType::F32)?, x(5)))
    });
    assert_all_fail(&res, "ranks disagree on the expert split", "split");

    // A layer built for another rank, and a split for another world size.
    let res = run_ranks(2, |r| {
        Ok((
            EpLayer::new(&a, &dev, 1 - r, &Split::even(16, 2)?, DType::F32)?,
            x(2),
        ))
    });
    assert_all_fail(&res, "built for rank", "rank swap");
    let res = run_ranks(2, |r| {
        let s = Split::even(16, 3)?;
        Ok((EpLayer::new(&a, &dev, r, &s, DType::F32)?, x(2)))
    });
    assert_all_fail(
        &res,
        "the expert split is over 3 ranks, the world has 2",
        "world",
    );

    // Checked before any thread starts.
    let bad = EpLayer::new(&a, &dev, 0, &Split::even(15, 2).unwrap(), DType::F32);
    assert!(matches!(bad, Err(Error::Ep { .. })), "{bad:?}");
    let bad = EpLayer::new(&a, &dev, 2, &Split::even(16, 2).unwrap(), DType::F32);
    assert!(matches!(bad, Err(Error::Ep { .. })), "{bad:?}");
    let mut w = InProcessWorld::even(&a, &dev, 2, DType::F32).unwrap();
    let bad = w.forward(&x(5), &Split::even(4, 2).unwrap());
    assert!(bad.unwrap_err().to_string().contains("token split"));
}

/// Quantized expert weights: each rank slices the packed codes and scales of its experts.
#[test]
fn quantized_experts_are_bitwise_too() {
    use moe_kernels::quant::{QuantFormat, QuantSpec};
    let dev = Backend::new(BackendKind::Cpu).unwrap();
    let mut cfg = Preset::Mixtral.config();
    cfg.routing.top_k = 2;
    let l = random_layer(cfg, 8, 64, 96, Extras::default(), DType::F32, 31).unwrap();
    let x = random_x(19, 64, 32);
    for f in QuantFormat::ALL {
        let q = l.quantized(&QuantSpec::new(f)).unwrap();
        for w in [3, 8] {
            let (e, t) = even(&q, &x, w);
            check(&dev, &q, &x, &e, &t, &format!("cpu {f} EP{w}"));
        }
    }
}

/// `moe run --ep N` writes the single-device run's file byte for byte.
#[test]
fn moe_run_ep_writes_byte_identical_files() {
    let dir = std::env::temp_dir().join(format!("moe-ep-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let l = layer(Preset::DeepseekV3, Variant::Capacity, DType::F32, 41);
    let config = dir.join("c.json");
    let weights = dir.join("w.safetensors");
    let input = dir.join("x.safetensors");
    std::fs::write(&config, l.config.to_json()).unwrap();
    let (names, values): (Vec<String>, Vec<OutTensor>) = l
        .file_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, OutTensor::File(t)))
        .unzip();
    let refs: Vec<(&str, OutTensor)> = names.iter().map(String::as_str).zip(values).collect();
    io::save(&weights, &refs).unwrap();
    let x = random_x(29, l.dims().hidden, 42).cast(DType::BF16);
    io::save(&input, &[("x", OutTensor::Tensor(x))]).unwrap();
    let mut backends = vec!["cpu"];
    if wgpu().is_some() {
        backends.push("wgpu");
    }
    for backend in backends {
        let run = |ep: Option<usize>| {
            let out = dir.join(format!("y-{backend}-{}.safetensors", ep.unwrap_or(0)));
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_moe"));
            cmd.args(["run", "--config"]).arg(&config);
            cmd.arg("--weights")
                .arg(&weights)
                .arg("--input")
                .arg(&input);
            cmd.arg("--output").arg(&out).args(["--backend", backend]);
            if let Some(n) = ep {
                cmd.args(["--ep", &n.to_string()]);
            }
            let o = cmd.output().unwrap();
            assert!(
                o.status.success(),
                "{backend} --ep {ep:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            std::fs::read(out).unwrap()
        };
        let one = run(None);
        let eps: &[usize] = if backend == "cpu" {
            &[1, 2, 3, 8]
        } else {
            &[3]
        };
        for &n in eps {
            assert!(run(Some(n)) == one, "{backend}: --ep {n} file differs");
        }
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["run", "--config"])
        .arg(&config)
        .arg("--weights")
        .arg(&weights)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(dir.join("never.safetensors"))
        .args(["--backend", "cpu", "--ep", "0"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--ep"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `moe bench --ep N` reports layout and exchange next to compute.
#[test]
fn moe_bench_ep_reports_overheads() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_moe"))
        .args([
            "bench",
            "--preset",
            "gpt4_small",
            "--tokens",
            "16",
            "--backend",
            "cpu",
            "--ep",
            "2",
            "--iters",
            "1",
            "--warmup",
            "0",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for needle in ["EP 2", "compute", "layout", "exchange", "bitwise"] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
}
