//! Thread safety: the handles are `Send + Sync` (checked at compile time), and 8 threads
//! running forwards on one `Backend` (per backend) give bitwise the same outputs as one thread,
//! both through a shared `PreparedLayer` and through `MoeLayer::forward`, with each thread on
//! its own input so that cross-talk between concurrent forwards would show.

mod common;

use moe_kernels::config::{Capacity, ExpertChoice};
use moe_kernels::synth::{random_layer, random_x, Extras};
use moe_kernels::{Backend, DType, ForwardOutput, MoeLayer, PreparedLayer, Preset, Tensor};

fn assert_send_sync<T: Send + Sync>() {}

// Compile-time: fails to build if any of these loses Send or Sync.
const _: fn() = || {
    assert_send_sync::<Backend>();
    assert_send_sync::<MoeLayer>();
    assert_send_sync::<PreparedLayer>();
    assert_send_sync::<Tensor>();
};

const THREADS: usize = 8;
const ROUNDS: usize = 4;

fn layers() -> Vec<(String, MoeLayer)> {
    let mut out = Vec::new();
    let mut mixtral = Preset::Mixtral.config();
    mixtral.routing.top_k = 3;
    out.push((
        "mixtral-like".to_string(),
        random_layer(mixtral, 12, 37, 29, Extras::default(), DType::F32, 1).unwrap(),
    ));
    let mut ds = Preset::DeepseekV3.config();
    ds.routing.top_k = 6;
    out.push((
        "deepseek-like bf16".to_string(),
        random_layer(
            ds,
            16,
            33,
            21,
            Extras {
                score_correction_bias: true,
                shared_ffn: Some(19),
                ..Extras::default()
            },
            DType::BF16,
            2,
        )
        .unwrap(),
    ));
    let mut cap = Preset::Switch.config();
    cap.routing.capacity = Some(Capacity::Fraction(0.2));
    out.push((
        "switch-like capacity".to_string(),
        random_layer(
            cap,
            8,
            25,
            31,
            Extras {
                expert_biases: true,
                ..Extras::default()
            },
            DType::F16,
            3,
        )
        .unwrap(),
    ));
    let mut ec = Preset::Mixtral.config();
    ec.routing.expert_choice = Some(ExpertChoice {
        capacity_factor: 2.0,
    });
    out.push((
        "expert choice".to_string(),
        random_layer(ec, 6, 19, 23, Extras::default(), DType::F32, 4).unwrap(),
    ));
    out
}

fn bits(o: &ForwardOutput) -> (Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>) {
    (
        o.y.iter().map(|v| v.to_bits()).collect(),
        o.topk_ids.clone(),
        o.topk_weights.iter().map(|v| v.to_bits()).collect(),
        o.kept.clone(),
    )
}

#[test]
fn eight_threads_on_one_backend_match_one_thread_bitwise() {
    for dev in common::backends("concurrency") {
        for (name, layer) in layers() {
            let h = layer.dims().hidden;
            // One input per thread, of different sizes (T = 0 included).
            let xs: Vec<Tensor> = (0..THREADS)
                .map(|i| random_x([0, 1, 7, 37, 64, 100, 13, 300][i], h, 100 + i as u64))
                .collect();
            let expected: Vec<_> = xs
                .iter()
                .map(|x| bits(&layer.forward(&dev, x).unwrap()))
                .collect();
            let prepared = layer.prepare(&dev, 300, DType::F32).unwrap();
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|i| {
                        let (prepared, layer, dev, xs) = (&prepared, &layer, &dev, &xs);
                        s.spawn(move || {
                            let mut got = Vec::new();
                            for r in 0..ROUNDS {
                                // Alternate between the shared prepared layer and a fresh
                                // forward, and walk through the inputs so that threads overlap
                                // on different shapes.
                                let j = (i + r) % THREADS;
                                let out = if r % 2 == 0 {
                                    prepared.forward(&xs[j])
                                } else {
                                    layer.forward(dev, &xs[j])
                                };
                                got.push((j, bits(&out.unwrap())));
                            }
                            got
                        })
                    })
                    .collect();
                for (i, hnd) in handles.into_iter().enumerate() {
                    for (j, got) in hnd.join().expect("thread panicked") {
                        assert!(
                            got == expected[j],
                            "{} {name}: thread {i}, input {j} (T = {}): output differs from \
                             the single-threaded run",
                            dev.kind(),
                            xs[j].shape()[0]
                        );
                    }
                }
            });
            // And the same input from all threads at once.
            let x = &xs[4];
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|_| s.spawn(|| bits(&prepared.forward(x).unwrap())))
                    .collect();
                for hnd in handles {
                    assert!(
                        hnd.join().expect("thread panicked") == expected[4],
                        "{} {name}: same input on 8 threads differs",
                        dev.kind()
                    );
                }
            });
        }
    }
}

#[test]
fn backends_can_move_between_threads() {
    // A Backend created on one thread and used (and dropped) on another.
    let layer = &layers()[0].1;
    let x = random_x(9, layer.dims().hidden, 7);
    for dev in common::backends("concurrency move") {
        let expected = bits(&layer.forward(&dev, &x).unwrap());
        let x = &x;
        let got = std::thread::scope(|s| {
            s.spawn(move || {
                let out = bits(&layer.forward(&dev, x).unwrap());
                drop(dev);
                out
            })
            .join()
            .unwrap()
        });
        assert!(got == expected, "output differs after moving the backend");
    }
}
