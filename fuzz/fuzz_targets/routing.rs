//! Stage 1 and 2 on arbitrary logits: a small header picks T, E, k and the routing options,
//! the rest of the input gives f64 logits (any bit pattern: NaN, ±inf, huge, denormal, ties).
//! The gate must either reject the config or return routing whose invariants hold, and
//! permute must accept that routing. The backend's CPU gate (f32 logits) is checked too.

#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use moe_kernels::config::{ExpertChoice, Groups};
use moe_kernels::cpu::gate::gate;
use moe_kernels::{
    Backend, BackendKind, Capacity, Combine, GateBuffers, Priority, RoutingConfig, Scoring,
};

/// Reads bytes off the front of the input; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u64(&mut self) -> u64 {
        let mut v = [0u8; 8];
        for b in &mut v {
            *b = self.u8();
        }
        u64::from_le_bytes(v)
    }
    fn f64_bits(&mut self) -> f64 {
        f64::from_bits(self.u64())
    }
    /// One value in a compact encoding: special values, raw bits, or small numbers with ties.
    fn value(&mut self) -> f64 {
        const SPECIAL: [f64; 16] = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            -0.0,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            5e-324, // smallest denormal
            -5e-324,
            1e308,
            -1e308,
            709.8, // exp overflows just above
            -745.2,
            f64::EPSILON,
            1.0,
        ];
        let tag = self.u8();
        match tag {
            0..=15 => SPECIAL[tag as usize],
            16..=31 => self.f64_bits(),
            // Quiet/signalling NaNs with payloads and the sign bit set.
            32..=35 => f64::from_bits(0xfff0_0000_0000_0001 | u64::from(self.u8()) << 8),
            _ => (f64::from(tag) - 144.0) / 8.0,
        }
    }
}

fn config(b: &mut Bytes) -> RoutingConfig {
    let flags = b.u8();
    let scoring = match flags % 3 {
        0 => Scoring::Softmax,
        1 => Scoring::Sigmoid,
        _ => Scoring::Logits,
    };
    let combine = if flags & 0x04 != 0 {
        Combine::SoftmaxSelected
    } else {
        Combine::Score
    };
    let renormalize = flags & 0x08 != 0;
    let priority = if flags & 0x10 != 0 {
        Priority::Top1Score
    } else {
        Priority::Position
    };
    let top_k = usize::from(b.u8() % 66); // 0 and > E are errors the gate must report
    let g = b.u8();
    let groups = (g != 0).then(|| Groups {
        count: usize::from(g & 0x0f),
        keep: usize::from(g >> 4),
    });
    let c = b.u8();
    let cv = b.value();
    let capacity = match c % 5 {
        0 | 1 => None,
        2 => Some(Capacity::Tokens(i64::from(c >> 3) - 2)),
        3 => Some(Capacity::Fraction(cv)),
        _ => Some(Capacity::Factor(cv)),
    };
    let ec = b.u8();
    let ecv = b.value();
    let expert_choice = (ec % 4 == 3).then_some(ExpertChoice {
        capacity_factor: ecv,
    });
    let s = b.u8();
    let scale = match s % 4 {
        0 | 1 => 1.0,
        2 => 2.5,
        _ => b.value(),
    };
    RoutingConfig {
        top_k,
        scoring,
        groups,
        combine,
        renormalize,
        scale,
        capacity,
        priority,
        expert_choice,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let t = usize::from(b.u8() % 17);
    let e = usize::from(b.u8() % 65); // E = 0 must be an error
    let cfg = config(&mut b);
    let with_bias = b.u8() & 1 == 1;
    let bias: Option<Vec<f64>> = with_bias.then(|| (0..e).map(|_| b.value()).collect());
    let logits: Vec<f64> = (0..t * e).map(|_| b.value()).collect();

    let valid = cfg.validate(e).is_ok();
    let r = gate(&logits, t, e, bias.as_deref(), &cfg);
    assert_eq!(
        r.is_ok(),
        valid,
        "gate accepted/rejected a config that validate() did not: {r:?}"
    );
    let Ok(r) = r else { return };
    common::check_routing(&r, &cfg, t, e);

    // The backend's CPU gate on the logits narrowed to f32 (what the GPU paths receive).
    let dev = Backend::new(BackendKind::Cpu).expect("cpu backend");
    let l32: Vec<f32> = logits.iter().map(|&v| v as f32).collect();
    let bias_t = bias.as_ref().map(|v| {
        moe_kernels::Tensor::from_f32(vec![e], v.iter().map(|&x| x as f32).collect())
            .expect("bias tensor")
    });
    let mut out = GateBuffers::poisoned(t, cfg.slots(e), e);
    dev.gate(&l32, bias_t.as_ref(), &cfg, &mut out)
        .unwrap_or_else(|err| panic!("backend gate rejected what the reference accepted: {err}"));
    assert!(
        out.topk_ids.iter().all(|&id| (id as usize) < e),
        "backend ids"
    );
    assert!(out.kept.iter().all(|&k| k <= 1), "backend kept");
    let kept: u64 = out.kept.iter().map(|&k| u64::from(k)).sum();
    let counted: u64 = out.counts.iter().map(|&c| u64::from(c)).sum();
    assert_eq!(kept, counted, "backend counts");
});
