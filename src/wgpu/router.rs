//! Stage 0 on wgpu: router logits (shaders/router.wgsl), one dispatch per weight chunk.
//!
//! The router weights are k-major slabs of 64 experts ([`GpuWeights::upload_router`]). Each
//! invocation owns 8 experts of one slab and a group of up to 8 tokens, and sums over `H` in
//! order (one fma chain per logit): one 128-bit weight load per h serves 8 tokens x 8 experts,
//! 8 invocations read one slab row, and there is no workgroup memory and no barrier. A token's
//! logits depend on `H` only, never on `T` or its batch (batch invariance).

use crate::error::{Error, Result};
use crate::shape;
use crate::stage::Stage;
use crate::wgpu::act::{self, Act};
use crate::wgpu::context::{index_u32, GpuBuffer, WgpuDevice};
use crate::wgpu::kernels::Kernel;
use crate::wgpu::scratch::Scratch;
use crate::wgpu::weights::{GpuWeights, SLAB};

/// Entry points of shaders/router.wgsl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    /// Router logits `x·Wrᵀ (+ b)`, one workgroup per (token, expert).
    Logits,
}

impl Entry {
    /// The entry point's name in the shader.
    pub fn name(self) -> &'static str {
        match self {
            Entry::Logits => "router_logits",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    tokens: u32,
    experts: u32,
    hidden: u32,
    has_bias: u32,
    first_row: u32,
    rows: u32,
    x_stride: u32,
    x_vec4: u32,
    slabs: u32,
    last_width: u32,
    _pad: [u32; 2],
}

/// Records `logits [T, E] = x [T, H] · wᵀ (+ bias [E])`, with `w` `[E, H]` uploaded in slabs
/// ([`GpuWeights::upload_router`]) and `T = x.rows`; `x` in any activation dtype (widened
/// exactly), `logits` f32. `logits` and `bias` may be larger than needed. Allocates nothing:
/// uniforms and the dummy bindings come from `scratch`.
pub fn encode(
    dev: &WgpuDevice,
    enc: &mut ::wgpu::CommandEncoder,
    scratch: &Scratch,
    x: Act<'_>,
    w: &GpuWeights,
    bias: Option<&GpuBuffer<f32>>,
    logits: &GpuBuffer<f32>,
) -> Result<()> {
    let st = Stage::Router;
    let tokens = x.rows;
    let (experts, hidden) = (w.rows, w.cols);
    let Some(layout) = w.slab else {
        return Err(Error::shape(
            st,
            "the router weights must be uploaded in slabs (GpuWeights::upload_router)",
        ));
    };
    if x.cols != hidden {
        return Err(Error::shape(
            st,
            format!("x has {} columns, the weight rows have {hidden}", x.cols),
        ));
    }
    x.check(st, "x", tokens)?;
    let te = shape::mul(st, "T x E", tokens, experts)?;
    act::at_least(st, "logits", logits.len, te)?;
    if let Some(b) = bias {
        act::at_least(st, "router bias", b.len, experts)?;
    }
    // x is read as 128-bit words where every row starts on one.
    let x_vec4 = (x.stride * x.dtype.size()) % 16 == 0 && x.buf.buffer.size() >= 16;
    let params = |c: &crate::wgpu::weights::WeightChunk| -> Result<Params> {
        Ok(Params {
            tokens: index_u32(st, "T", tokens)?,
            experts: index_u32(st, "E", experts)?,
            hidden: index_u32(st, "H", hidden)?,
            has_bias: u32::from(bias.is_some()),
            first_row: c.first_row as u32,
            rows: c.rows as u32,
            x_stride: index_u32(st, "x row stride", x.stride)?,
            x_vec4: u32::from(x_vec4),
            slabs: c.slabs as u32,
            last_width: if c.first_slab + c.slabs == layout.per_expert {
                layout.last_width as u32
            } else {
                SLAB as u32
            },
            _pad: [0; 2],
        })
    };
    index_u32(st, "T x E", te)?;
    if tokens == 0 {
        return Ok(());
    }
    let pipeline = dev.pipeline(
        Kernel::Router(Entry::Logits),
        &[("W_DTYPE", w.dtype_code()), ("A_DTYPE", act::code(x.dtype))],
    )?;
    let dummy;
    let bias_buf = match bias {
        Some(b) => b,
        None => {
            dummy = scratch.buffer::<f32>(dev, "router no bias", 1)?;
            &dummy
        }
    };
    let words4 = scratch.buffer::<u32>(dev, "router no vec4 words", 4)?;
    let x4 = if x_vec4 {
        act::range_binding(x.buf, x.words_for_rows(tokens).next_multiple_of(4))
    } else {
        words4.binding()
    };
    for c in &w.chunks {
        if c.rows == 0 {
            continue;
        }
        let params = scratch.uniform(dev, "router params", &params(c)?)?;
        let wb = if c.words.buffer.size() >= 16 {
            c.words.binding()
        } else {
            words4.binding()
        };
        let bind = scratch.bind(
            dev,
            &pipeline,
            &[
                params.as_entire_binding(),
                x.binding(tokens, 1),
                wb,
                bias_buf.binding(),
                act::range_binding(logits, te),
                x4.clone(),
            ],
        )?;
        // Jobs (slab, group of 8 tokens) of one vec4 of weights per invocation and h: 8
        // invocations (16-bit weights) or 16 (f32) each, 64 invocations per workgroup.
        let per_job = if w.dtype_code() == 0.0 { 16 } else { 8 };
        let jobs = c.slabs * tokens.div_ceil(8);
        dev.dispatch(enc, &pipeline, &bind, dev.grid(jobs, 64 / per_job)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! x in f16 / bf16 (odd H, dense rows straddling words), buffers larger than the forward
    //! and one scratch pool reused across forwards of T = 37, 7, 1.

    use super::*;
    use crate::cpu::router::router_logits;
    use crate::synth::Gen;
    use crate::tensor::{DType, Tensor};
    use crate::wgpu::act::test_util::{self, rel_l2};

    #[test]
    fn half_activations_match_the_reference() {
        let Some(dev) = crate::wgpu::context::test_device("router") else {
            return;
        };
        let mut g = Gen::new(21);
        let (e, h, max_t) = (13, 97, 37);
        for dtype in [DType::F16, DType::BF16] {
            for wdt in DType::ALL {
                let w = g.tensor(&[e, h], 0.2).cast(wdt);
                let bias = g.tensor(&[e], 0.1);
                let gw = GpuWeights::upload_router(&dev, &w, None, "router.weight").unwrap();
                let bb = dev.upload(&bias.to_f32_vec(), "bias").unwrap();
                let pool = Scratch::new();
                let xb_cap = act::words(max_t * h, dtype);
                let logits = dev.alloc::<f32>(max_t * e + 5, "logits").unwrap();
                for t in [max_t, 7, 1] {
                    let x = Tensor::from_f32(vec![t, h], g.uniform(t * h, 1.0))
                        .unwrap()
                        .cast(dtype);
                    let xv = x.to_f32_vec();
                    let want = router_logits(&x, &w, Some(&bias)).unwrap();
                    let xb = test_util::upload(&dev, &xv, (t, h, h), dtype, xb_cap);
                    test_util::poison(&dev, &logits);
                    pool.begin().unwrap();
                    let mut enc = dev.encoder();
                    let xa = Act::dense(&xb, dtype, t, h);
                    encode(&dev, &mut enc, &pool, xa, &gw, Some(&bb), &logits).unwrap();
                    dev.submit_and_wait(enc).unwrap();
                    let got = dev.read(&logits).unwrap();
                    // Logits are f32 from exactly widened inputs: the f32 tolerance applies.
                    let err = rel_l2(&got[..t * e], &want);
                    assert!(
                        err <= 2e-5,
                        "{dtype} x, {wdt} weights, T {t}: rel L2 {err:e}"
                    );
                    assert!(got[t * e..].iter().all(|v| v.is_nan()), "wrote past T x E");
                }
            }
            println!("router with {dtype} activations: within f32 tolerance");
        }
    }

    #[test]
    fn short_buffers_are_refused() {
        let Some(dev) = crate::wgpu::context::test_device("router") else {
            return;
        };
        let w = Gen::new(22).tensor(&[3, 5], 0.2);
        let gw = GpuWeights::upload_router(&dev, &w, None, "router.weight").unwrap();
        let xb = dev.alloc::<u32>(7, "x").unwrap();
        let logits = dev.alloc::<f32>(6, "logits").unwrap();
        let pool = Scratch::new();
        let mut enc = dev.encoder();
        for (x, n) in [
            (Act::dense(&xb, DType::F32, 2, 5), 6), // x needs 10 words
            (Act::dense(&xb, DType::F16, 3, 5), 6), // logits need 9
            (Act::dense(&xb, DType::F16, 2, 4), 6), // H differs from the weights'
        ] {
            let err = encode(&dev, &mut enc, &pool, x, &gw, None, &logits).unwrap_err();
            assert!(matches!(err, Error::Shape { .. }), "{n}: {err:?}");
        }
    }
}
