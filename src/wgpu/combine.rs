//! Stage 4 on wgpu: the weighted un-permute in slot order plus the shared expert
//! (shaders/combine.wgsl).

use crate::error::Result;
use crate::shape;
use crate::stage::Stage;
use crate::wgpu::act::{self, Act};
use crate::wgpu::context::{index_u32, GpuBuffer, WgpuDevice, WG};
use crate::wgpu::kernels::Kernel;
use crate::wgpu::scratch::Scratch;
use crate::wgpu::GateGpu;

/// Entry points of shaders/combine.wgsl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    /// The weighted un-permute: `y` from `y_perm` and the shared expert's output.
    Combine,
}

impl Entry {
    /// The entry point's name in the shader.
    pub fn name(self) -> &'static str {
        match self {
            Entry::Combine => "combine",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    tokens: u32,
    slots: u32,
    hidden: u32,
    has_shared: u32,
    has_shared_gate: u32,
    output_scale: f32,
    yp_stride: u32,
    sh_stride: u32,
    y_stride: u32,
    y_words: u32,
    _pad: [u32; 2],
}

/// The shared expert's output `[T, H]` (padded rows, the activation dtype) and optional gate
/// logits `[T]` (f32).
pub type SharedGpu<'a> = Option<(Act<'a>, Option<&'a GpuBuffer<f32>>)>;

/// Records `y [T, H]` from `y_perm` `[T·slots, H]`, the gate's weights and kept flags and
/// `row_of_assignment`, plus the shared expert. `y_perm`, the shared output and `y` share one
/// activation dtype (sums in f32, each element of `y` rounded once at the store); `y` is
/// written one whole word per invocation (16-bit: two elements; when the matrix ends in the
/// middle of a word its high half is written as 0). Every buffer may be larger than needed;
/// the launch is sized from `tokens`. Allocates nothing: the uniform and the dummies come from
/// `scratch`.
#[allow(clippy::too_many_arguments)]
pub fn encode(
    dev: &WgpuDevice,
    enc: &mut ::wgpu::CommandEncoder,
    scratch: &Scratch,
    y_perm: Act<'_>,
    gate: &GateGpu,
    row_of_assignment: &GpuBuffer<u32>,
    (tokens, slots, hidden): (usize, usize, usize),
    shared: SharedGpu<'_>,
    output_scale: f32,
    y: Act<'_>,
) -> Result<()> {
    let st = Stage::Combine;
    let n = shape::mul(st, "T x slots", tokens, slots)?;
    for (name, a) in [("y_perm", &y_perm), ("y", &y)] {
        shape::expect_eq(st, &format!("{name} columns (H)"), a.cols, hidden)?;
    }
    act::same_dtype(st, "y_perm and y", y_perm.dtype, y.dtype)?;
    // Rows of y_perm are addressed through row_of_assignment (< T·slots, checked by the
    // permutation's construction); the binding covers all of them.
    y_perm.check(st, "y_perm", n)?;
    y.check(st, "y", tokens)?;
    act::at_least(st, "topk_weights", gate.topk_weights.len, n)?;
    act::at_least(st, "kept", gate.kept.len, n)?;
    act::at_least(st, "row_of_assignment", row_of_assignment.len, n)?;
    if let Some((s, g)) = &shared {
        shape::expect_eq(st, "shared expert output columns (H)", s.cols, hidden)?;
        act::same_dtype(st, "shared expert output and y", s.dtype, y.dtype)?;
        s.check(st, "shared expert output", tokens)?;
        if let Some(g) = g {
            act::at_least(st, "shared gate logits", g.len, tokens)?;
        }
    }
    let y_words = y.words_for_rows(tokens);
    let params = Params {
        tokens: index_u32(st, "T", tokens)?,
        slots: index_u32(st, "slots", slots)?,
        hidden: index_u32(st, "H", hidden)?,
        has_shared: u32::from(shared.is_some()),
        has_shared_gate: u32::from(shared.is_some_and(|(_, g)| g.is_some())),
        output_scale,
        yp_stride: index_u32(st, "y_perm row stride", y_perm.stride)?,
        sh_stride: index_u32(st, "shared row stride", shared.map_or(0, |(s, _)| s.stride))?,
        y_stride: index_u32(st, "y row stride", y.stride)?,
        y_words: index_u32(st, "words of y", y_words)?,
        _pad: [0; 2],
    };
    if y_words == 0 {
        return Ok(());
    }
    let pipeline = dev.pipeline(
        Kernel::Combine(Entry::Combine),
        &[("A_DTYPE", act::code(y.dtype))],
    )?;
    let no_shared;
    let no_gate;
    let sy = match &shared {
        Some((s, _)) => s.binding(tokens, 1),
        None => {
            no_shared = scratch.buffer::<u32>(dev, "combine no shared", 1)?;
            no_shared.binding()
        }
    };
    let sg = match shared.and_then(|(_, g)| g) {
        Some(g) => g.binding(),
        None => {
            no_gate = scratch.buffer::<f32>(dev, "combine no shared gate", 1)?;
            no_gate.binding()
        }
    };
    let params = scratch.uniform(dev, "combine params", &params)?;
    let bind = scratch.bind(
        dev,
        &pipeline,
        &[
            params.as_entire_binding(),
            y_perm.binding(n, 1),
            gate.topk_weights.binding(),
            gate.kept.binding(),
            row_of_assignment.binding(),
            sy,
            sg,
            y.binding(tokens, 1),
        ],
    )?;
    dev.dispatch(enc, &pipeline, &bind, dev.grid(y_words, WG)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    //! f16 / bf16 y_perm, shared expert output and y against the reference on inputs rounded
    //! to the dtype: odd H (T·H odd: y's last word half padding, written 0), with and without
    //! the shared expert and its gate, buffers of a workspace for more tokens and one scratch
    //! pool reused across T = 37, 7, 1.

    use super::*;
    use crate::cpu::combine::{combine as cpu_combine, Assignments, SharedInput};
    use crate::cpu::permute::permute as cpu_permute;
    use crate::error::Error;
    use crate::synth::{assignments, Gen, Spread};
    use crate::tensor::DType;
    use crate::wgpu::act::test_util::{self, rel_l2};

    fn wide(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| f64::from(x)).collect()
    }

    #[test]
    fn half_activations_match_the_reference() {
        let Some(dev) = crate::wgpu::context::test_device("combine") else {
            return;
        };
        let mut g = Gen::new(41);
        let (e, k, h, max_t) = (6, 3, 37, 37);
        for dtype in [DType::F16, DType::BF16] {
            let st = act::stride(h, dtype);
            for shared_kind in 0..3 {
                let pool = Scratch::new();
                let cap_perm = act::matrix_words(max_t * k, h, dtype);
                let y = test_util::poisoned(&dev, act::words(max_t * h, dtype) + 3);
                let gate = GateGpu::alloc(&dev, max_t, k, e).unwrap();
                let row_of_b = dev.alloc::<u32>(max_t * k, "row_of").unwrap();
                let gate_logits = dev.alloc::<f32>(max_t, "shared gate").unwrap();
                for t in [max_t, 7, 1] {
                    let n = t * k;
                    let (ids, kept) = assignments(&mut g, t, k, e, Spread::DropEveryThird);
                    let kept_b: Vec<bool> = kept.iter().map(|&v| v != 0).collect();
                    let perm = cpu_permute(&ids, &kept_b, e).unwrap();
                    let weights = g.uniform(n, 1.0);
                    let y_perm = test_util::round(&g.uniform(n * h, 1.0), dtype);
                    let shared = test_util::round(&g.uniform(t * h, 1.0), dtype);
                    let logits = g.uniform(t, 2.0);
                    let q = &dev.queue;
                    q.write_buffer(&gate.topk_weights.buffer, 0, bytemuck::cast_slice(&weights));
                    q.write_buffer(&gate.kept.buffer, 0, bytemuck::cast_slice(&kept));
                    let row_of = &perm.row_of_assignment;
                    q.write_buffer(&row_of_b.buffer, 0, bytemuck::cast_slice(row_of));
                    q.write_buffer(&gate_logits.buffer, 0, bytemuck::cast_slice(&logits));
                    let ypb = test_util::upload(&dev, &y_perm, (n, h, st), dtype, cap_perm);
                    let sb = test_util::upload(&dev, &shared, (t, h, st), dtype, 0);
                    test_util::poison(&dev, &y);
                    let sh = match shared_kind {
                        0 => None,
                        1 => Some((Act::padded(&sb, dtype, t, h), None)),
                        _ => Some((Act::padded(&sb, dtype, t, h), Some(&gate_logits))),
                    };
                    pool.begin().unwrap();
                    let mut enc = dev.encoder();
                    encode(
                        &dev,
                        &mut enc,
                        &pool,
                        Act::padded(&ypb, dtype, n, h),
                        &gate,
                        &row_of_b,
                        (t, k, h),
                        sh,
                        0.8,
                        Act::dense(&y, dtype, t, h),
                    )
                    .unwrap();
                    dev.submit_and_wait(enc).unwrap();

                    let (sw, lw) = (wide(&shared), wide(&logits));
                    let want = cpu_combine(
                        &wide(&y_perm),
                        h,
                        Assignments {
                            slots: k,
                            weights: &wide(&weights),
                            kept: &kept_b,
                            row_of_assignment: row_of,
                        },
                        (shared_kind > 0).then(|| SharedInput {
                            y: &sw,
                            gate_logits: (shared_kind == 2).then_some(&lw[..]),
                        }),
                        0.8,
                    )
                    .unwrap();
                    let words = dev.read(&y).unwrap();
                    let ctx = format!("{dtype}, shared {shared_kind}, T {t}");
                    let got = act::unpack(&words, t, h, h, dtype);
                    let err = rel_l2(&got, &want);
                    assert!(err <= test_util::tolerance(dtype), "{ctx}: rel L2 {err:e}");
                    let used = act::words(t * h, dtype);
                    if (t * h) % 2 == 1 {
                        assert_eq!(words[used - 1] >> 16, 0, "{ctx}: the padding half");
                    }
                    assert!(
                        words[used..].iter().all(|&w| w == u32::MAX),
                        "{ctx}: past y"
                    );
                }
            }
            println!("combine with {dtype} activations: within tolerance");
        }
    }

    #[test]
    fn mismatched_activations_are_refused() {
        let Some(dev) = crate::wgpu::context::test_device("combine") else {
            return;
        };
        let gate = GateGpu::alloc(&dev, 2, 2, 3).unwrap();
        let rows = dev.alloc::<u32>(4, "row_of").unwrap();
        let b = dev.alloc::<u32>(16, "activations").unwrap();
        let pool = Scratch::new();
        let mut enc = dev.encoder();
        let f16 = |rows, cols| Act::padded(&b, DType::F16, rows, cols);
        let cases = [
            (Act::padded(&b, DType::BF16, 4, 5), f16(2, 5)), // dtypes differ
            (f16(3, 5), f16(2, 5)),                          // y_perm has < T·slots rows
            (f16(4, 5), f16(2, 4)),                          // y's width is not H
            (f16(4, 9), f16(2, 5)),                          // y_perm's words do not fit
        ];
        for (yp, y) in cases {
            let err = encode(
                &dev,
                &mut enc,
                &pool,
                yp,
                &gate,
                &rows,
                (2, 2, 5),
                None,
                1.0,
                y,
            );
            assert!(matches!(err, Err(Error::Shape { .. })), "{err:?}");
        }
    }

    /// `y[t] = w[t] · y_perm[t]` for H = 1, one slot, scale 1: with y_perm = 1 the kernel
    /// stores the f32 weight rounded to the dtype, so its f32 → f16 / bf16 conversion is
    /// checked bit for bit against the `half` crate (round to nearest, ties to even, overflow
    /// to infinity, subnormals, NaN), on edge cases and random normal f32 values; with w = 1,
    /// every 16-bit pattern of y_perm must come back unchanged (exact widening; signed zeros
    /// compare equal since 0 + (−0) = +0, and bf16 subnormals, which the f32 multiply may
    /// flush, are left out).
    #[test]
    fn conversions_are_exact_and_round_to_nearest_even() {
        let Some(dev) = crate::wgpu::context::test_device("combine") else {
            return;
        };
        let run = |dtype: DType, w: &[f32], yp: &[u32]| -> Vec<u32> {
            let t = w.len();
            let gate = GateGpu {
                topk_ids: dev.upload(&vec![0u32; t], "ids").unwrap(),
                topk_weights: dev.upload(w, "weights").unwrap(),
                kept: dev.upload(&vec![1u32; t], "kept").unwrap(),
                counts: dev.upload(&[0u32], "counts").unwrap(),
            };
            let rows: Vec<u32> = (0..t as u32).collect();
            let rows = dev.upload(&rows, "row_of").unwrap();
            let ypb = dev.upload(yp, "y_perm").unwrap();
            let y = test_util::poisoned(&dev, t.div_ceil(2));
            let mut enc = dev.encoder();
            let pool = Scratch::new();
            let yp = Act::padded(&ypb, dtype, t, 1);
            let ya = Act::dense(&y, dtype, t, 1);
            encode(
                &dev,
                &mut enc,
                &pool,
                yp,
                &gate,
                &rows,
                (t, 1, 1),
                None,
                1.0,
                ya,
            )
            .unwrap();
            dev.submit_and_wait(enc).unwrap();
            dev.read(&y)
                .unwrap()
                .iter()
                .flat_map(|&w| [w & 0xffff, w >> 16])
                .take(t)
                .collect()
        };
        let one_padded = |dtype: DType, t: usize| -> Vec<u32> {
            // Padded rows of one element: [1, pad] per word.
            let one = match dtype {
                DType::F16 => 0x3c00u32,
                _ => 0x3f80u32,
            };
            vec![one; t]
        };
        let mut g = Gen::new(43);
        let mut values: Vec<f32> = vec![
            65504.0,
            65519.996,
            65520.0,
            65536.0,
            1e30,
            -1e30,
            f32::INFINITY,
            -f32::INFINITY,
            f32::NAN,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -(1.0 + 1.0 / 2048.0),
            6.103_515_6e-5,
            6.1e-5,
            5.960_464_5e-8,
            2.980_232_2e-8,
            2.980_233e-8,
            8.940_697e-8,
            1.5e-7,
            -3.0e-6,
            1.0e-10,
            3.0e38,
            3.4e38,
            f32::MAX,
            f32::MIN_POSITIVE,
        ];
        while values.len() < 20_000 {
            let v = f32::from_bits(g.below(0, u32::MAX as usize) as u32);
            if v.is_normal() {
                values.push(v);
            }
        }
        for dtype in [DType::F16, DType::BF16] {
            let got = run(dtype, &values, &one_padded(dtype, values.len()));
            for (&v, &bits) in values.iter().zip(&got) {
                let want = match dtype {
                    DType::F16 => u32::from(half::f16::from_f32(v).to_bits()),
                    _ => u32::from(half::bf16::from_f32(v).to_bits()),
                };
                if v.is_nan() {
                    assert!(
                        act::unpack(&[bits], 1, 1, 1, dtype)[0].is_nan(),
                        "{dtype}: NaN"
                    );
                } else {
                    assert_eq!(bits, want, "{dtype}: {v:e} ({:#010x})", v.to_bits());
                }
            }
            // Every 16-bit pattern through y_perm, weight 1.
            let patterns: Vec<u32> = (0..=0xffffu32)
                .filter(|&b| {
                    let exp_zero = match dtype {
                        DType::F16 => b & 0x7c00 == 0,
                        _ => b & 0x7f80 == 0,
                    };
                    let v = act::unpack(&[b], 1, 1, 1, dtype)[0];
                    let bf16_subnormal = dtype == DType::BF16 && exp_zero && b & 0x7fff != 0;
                    !v.is_nan() && !bf16_subnormal
                })
                .collect();
            let got = run(dtype, &vec![1.0; patterns.len()], &patterns);
            for (&p, &bits) in patterns.iter().zip(&got) {
                let zero = p & 0x7fff == 0;
                assert!(
                    bits == p || (zero && bits & 0x7fff == 0),
                    "{dtype}: {p:#06x} came back as {bits:#06x}"
                );
            }
            println!(
                "{dtype}: conversions bit-exact on {} values",
                values.len() + patterns.len()
            );
        }
    }
}
