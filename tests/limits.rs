//! Device limits: a shape past a limit is a typed [`Error::Limit`] returned before anything is
//! allocated or launched, on every backend; the handle stays usable afterwards.
//!
//! The absurd shapes below need hundreds of GB (x_perm alone is 275 GB): had any backend tried
//! to allocate them, the test process would abort or be killed on every machine it runs on.

mod common;

use moe_kernels::config::ExpertChoice;
use moe_kernels::synth::{random_layer, random_x, Extras};
use moe_kernels::{Activation, BackendKind, DType, Error, LayerConfig, MoeLayer, Resource};

/// A small Mixtral-style layer: E = 8, H = 32, F = 48, top-2, f32.
fn small_layer() -> MoeLayer {
    random_layer(
        moe_kernels::Preset::Mixtral.config(),
        8,
        32,
        48,
        Extras::default(),
        DType::F32,
        5,
    )
    .expect("small layer")
}

/// Bytes the small layer's weights hold, counted from its shape here: router [8, 32] plus
/// three [8, 48, 32] expert matrices, all f32.
const SMALL_WEIGHT_BYTES: u64 = 4 * (8 * 32 + 3 * 8 * 48 * 32);

/// A lower bound on the bytes of a top-k forward's buffers that every backend must hold:
/// x and y [T, H], logits [T, E], x_perm and y_perm [T·k, H], the expert intermediate
/// [T·k, F], ids and weights [T, k].
fn forward_lower_bound(t: u64, e: u64, h: u64, f: u64, k: u64) -> u64 {
    4 * (2 * t * h + t * e + 2 * t * k * h + t * k * f + 2 * t * k)
}

fn limit_parts(e: &Error) -> (BackendKind, Resource, u64, u64) {
    match e {
        Error::Limit {
            backend,
            resource,
            need,
            limit,
            ..
        } => (*backend, *resource, *need, *limit),
        other => panic!("expected Error::Limit, got {other:?}"),
    }
}

#[test]
fn memory_limit_is_checked_before_a_forward_and_the_handle_stays_usable() {
    let layer = small_layer();
    let t = 64;
    let x = random_x(t, 32, 9);
    let reference = layer.forward_reference(&x).expect("reference");
    for dev in common::backends("memory_limit_forward") {
        let kind = dev.kind();
        // First find what the forward needs: a limit of 1 byte past the weights fails.
        let tight = moe_kernels::Backend::new(kind)
            .unwrap()
            .with_memory_limit(SMALL_WEIGHT_BYTES);
        let err = layer
            .prepare(&tight, t, DType::F32)
            .expect_err("no room for the workspace");
        let (backend, resource, need, limit) = limit_parts(&err);
        assert_eq!(backend, kind);
        assert_eq!(resource, Resource::MemoryLimit, "{err}");
        assert_eq!(limit, SMALL_WEIGHT_BYTES);
        let activations = need - SMALL_WEIGHT_BYTES;
        let floor = forward_lower_bound(t as u64, 8, 32, 48, 2);
        // Every real buffer is counted, and the estimate is not wildly above them.
        assert!(
            activations >= floor && activations <= 4 * floor,
            "{kind}: forward needs {activations} bytes, real buffers hold at least {floor}"
        );
        println!("[{kind}] {err}");

        // Exactly `need` is enough, and the result is the reference's.
        let exact = moe_kernels::Backend::new(kind)
            .unwrap()
            .with_memory_limit(need);
        let out = layer
            .prepare(&exact, t, DType::F32)
            .and_then(|p| p.forward(&x))
            .unwrap_or_else(|e| panic!("{kind}: a limit of exactly {need} bytes: {e}"));
        assert_eq!(out.topk_ids, reference.routing.topk_ids, "{kind}");
        let rel = common::rel_l2(&out.y, &reference.y);
        assert!(rel < common::tolerance(DType::F32), "{kind}: rel L2 {rel}");

        // One byte less fails; a layer prepared for 1 token fits, runs a 1-token forward and
        // refuses a 64-token one (past its max_tokens) with a shape error.
        let short = moe_kernels::Backend::new(kind)
            .unwrap()
            .with_memory_limit(need - 1);
        assert!(matches!(
            layer.prepare(&short, t, DType::F32),
            Err(Error::Limit {
                resource: Resource::MemoryLimit,
                ..
            })
        ));
        let p = layer.prepare(&short, 1, DType::F32).expect("1 token fits");
        assert!(
            matches!(p.forward(&x), Err(Error::Shape { .. })),
            "{kind}: T past max_tokens"
        );
        let x1 = random_x(1, 32, 9);
        let one = p.forward(&x1).expect("a 1-token forward fits");
        let ref1 = layer.forward_reference(&x1).expect("reference");
        assert_eq!(one.topk_ids, ref1.routing.topk_ids, "{kind}");
    }
}

#[test]
fn memory_limit_is_checked_before_the_weights_are_uploaded() {
    let layer = small_layer();
    assert_eq!(layer.weight_bytes(), SMALL_WEIGHT_BYTES);
    for dev in common::backends("memory_limit_weights") {
        let kind = dev.kind();
        let dev = dev.with_memory_limit(SMALL_WEIGHT_BYTES - 1);
        let err = layer
            .prepare(&dev, 1, DType::F32)
            .expect_err("weights do not fit");
        let (backend, resource, need, limit) = limit_parts(&err);
        assert_eq!(
            (backend, resource, need, limit),
            (
                kind,
                Resource::MemoryLimit,
                SMALL_WEIGHT_BYTES,
                SMALL_WEIGHT_BYTES - 1
            ),
            "{err}"
        );
        assert!(err.to_string().contains("memory limit"), "{err}");
    }
}

/// Expert choice gives every token E slots: T = 131072, E = 8192, H = 64 makes x_perm
/// [T·E, H] = 6.9e10 elements (275 GB) from an input of 32 MB and weights of 6 MB.
fn absurd_expert_choice_layer() -> MoeLayer {
    let mut config = LayerConfig::default();
    config.routing.expert_choice = Some(ExpertChoice {
        capacity_factor: 1.0,
    });
    config.activation = Activation::Relu;
    random_layer(config, 8192, 64, 1, Extras::default(), DType::F32, 1).expect("layer")
}

#[test]
fn absurd_shapes_are_rejected_not_allocated_on_every_backend() {
    let layer = absurd_expert_choice_layer();
    let t = 131_072;
    let x = random_x(t, 64, 2);
    let err = layer.forward_reference(&x).expect_err("reference refuses");
    let (_, resource, need, limit) = limit_parts(&err);
    assert_eq!(resource, Resource::HostMemory, "{err}");
    assert!(need > limit);
    for dev in common::backends("absurd_shapes") {
        let kind = dev.kind();
        let err = layer.forward(&dev, &x).expect_err("forward refuses");
        let (backend, resource, need, limit) = limit_parts(&err);
        assert_eq!(backend, kind, "{err}");
        assert!(need > limit, "{err}");
        let expected = match kind {
            BackendKind::Cpu => Resource::HostMemory,
            // lavapipe and NVIDIA's Vulkan driver cap buffers far below 275 GB.
            BackendKind::Wgpu => Resource::BufferSize,
            // 6.9e10 elements are past the kernels' signed 32-bit indexing.
            BackendKind::Cuda => Resource::IndexRange,
        };
        assert_eq!(resource, expected, "{err}");
        println!("[{kind}] {err}");
    }
}

#[test]
fn saturated_sizes_never_wrap_around() {
    // T · E · H overflows usize: the footprint saturates and every backend refuses it.
    let layer = absurd_expert_choice_layer();
    let fp = moe_kernels::limits::Footprint::forward(&layer.shape(), usize::MAX / 2);
    assert_eq!(fp.total_bytes(), u64::MAX);
    for dev in common::backends("saturated_sizes") {
        let err = dev
            .check_forward(&layer.shape(), usize::MAX / 2, 0)
            .expect_err("refused");
        let (backend, _, need, limit) = limit_parts(&err);
        assert_eq!(backend, dev.kind());
        assert!(need > limit, "{err}");
    }
}

/// The wgpu device's own checks, below the layer: one buffer past `max_buffer_size` and a
/// grid past the per-dimension limit squared are typed errors (wgpu itself would hand both
/// to its panicking default error handler).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_buffer_and_grid_limits_are_typed_errors() {
    let dev = match moe_kernels::wgpu::WgpuDevice::new() {
        Ok(d) => d,
        Err(e) => {
            let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(!in_ci, "CI=true but no wgpu adapter: {e}");
            println!("[wgpu_limits] skipped: {e}");
            return;
        }
    };
    let max = dev.limits.max_buffer_size;
    let err = dev
        .alloc::<u8>(max as usize + 1, "too big")
        .expect_err("past max_buffer_size");
    let (backend, resource, need, limit) = limit_parts(&err);
    assert_eq!(
        (backend, resource, limit),
        (BackendKind::Wgpu, Resource::BufferSize, max)
    );
    assert!(need > max, "{err}");
    assert!(
        dev.alloc::<u8>(16, "small").is_ok(),
        "the device still works"
    );

    let per_dim = u64::from(dev.limits.max_compute_workgroups_per_dimension);
    let items = (per_dim * per_dim + 1) as usize;
    let err = dev.grid(items, 1).expect_err("past the grid");
    assert_eq!(limit_parts(&err).1, Resource::GridSize, "{err}");
    let (x, y, z) = dev.grid(items - 1, 1).expect("exactly the limit");
    assert_eq!((u64::from(x), u64::from(y), z), (per_dim, per_dim, 1));
    println!("[wgpu_limits] ran on {}: {err}", dev.info.name);
}
