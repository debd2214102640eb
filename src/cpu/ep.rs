//! The CPU's side of an expert-parallel rank ([`RankStages`]): the functions of its
//! single-device forward (`src/cpu/device.rs`) on this rank's tokens and experts.

use crate::cpu::device::{combine_into, experts_into, gate_into, permute_into, router_into};
use crate::device::{GateBuffers, PermuteBuffers};
use crate::ep::stages::{RankStages, RankWeights};
use crate::error::{Error, Result};
use crate::stage::Stage;
use crate::tensor::{DType, Tensor};

/// One rank on the CPU: its weights, activation dtype and the last forward's buffers.
#[derive(Debug)]
pub(crate) struct CpuRank {
    w: RankWeights,
    dtype: DType,
    x: Option<Tensor>,
    shared_logit: Vec<f32>,
    gate: Option<GateBuffers>,
    perm: Option<PermuteBuffers>,
}

impl CpuRank {
    /// A rank holding `w`, for activations in `dtype`.
    pub fn new(w: RankWeights, dtype: DType) -> Self {
        CpuRank {
            w,
            dtype,
            x: None,
            shared_logit: Vec::new(),
            gate: None,
            perm: None,
        }
    }

    fn x(&self) -> Result<&Tensor> {
        self.x
            .as_ref()
            .ok_or_else(|| Error::Usage("expert-parallel rank: no x loaded".into()))
    }
}

/// f32 values as their bits.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Bits as f32 values.
fn values(w: &[u32]) -> Vec<f32> {
    w.iter().map(|&b| f32::from_bits(b)).collect()
}

impl RankStages for CpuRank {
    fn row_words(&self) -> usize {
        self.w.hidden
    }

    fn router(&mut self, x: &Tensor) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        router_into(
            x,
            &self.w.router_weight,
            self.w.router_bias.as_ref(),
            &mut logits,
        )?;
        if let Some(g) = &self.w.shared_gate {
            router_into(x, g, None, &mut self.shared_logit)?;
        }
        self.x = Some(x.clone());
        Ok(logits)
    }

    fn gate(&mut self, logits: &[f32], tokens: usize) -> Result<GateBuffers> {
        let e = self.w.experts;
        let cfg = &self.w.config.routing;
        let mut g = GateBuffers::poisoned(tokens, cfg.slots(e), e);
        gate_into(logits, self.w.correction_bias.as_ref(), cfg, &mut g)?;
        Ok(g)
    }

    fn permute(&mut self, gate: &GateBuffers) -> Result<(Vec<u32>, Vec<u32>)> {
        let x = self.x()?;
        let mut p = PermuteBuffers::poisoned(gate.tokens, gate.slots, gate.experts, self.w.hidden);
        permute_into(gate, x, self.dtype, &mut p)?;
        let kept = p.expert_offsets[gate.experts] as usize;
        let rows = bits(&p.x_perm[..kept * self.w.hidden]);
        let offsets = p.expert_offsets.clone();
        self.gate = Some(gate.clone());
        self.perm = Some(p);
        Ok((offsets, rows))
    }

    fn experts(&mut self, rows: &[u32], offsets: &[u32]) -> Result<Vec<u32>> {
        let Some(w) = &self.w.local else {
            return match rows.is_empty() {
                true => Ok(Vec::new()),
                false => Err(Error::shape(
                    Stage::ExpertGemm,
                    "rows arrived at a rank that holds no experts",
                )),
            };
        };
        let mut y = Vec::new();
        experts_into(
            &values(rows),
            offsets,
            w,
            self.w.config.activation,
            self.dtype,
            &mut y,
        )?;
        Ok(bits(&y))
    }

    fn combine(&mut self, y_rows: &[u32]) -> Result<Vec<f32>> {
        let x = self.x()?;
        let (Some(gate), Some(perm)) = (&self.gate, &self.perm) else {
            return Err(Error::Usage(
                "expert-parallel rank: combine before permute".into(),
            ));
        };
        let act = self.w.config.activation;
        let mut shared_y = Vec::new();
        if let Some(s) = &self.w.shared {
            crate::cpu::device::shared_into(x, s, act, self.dtype, &mut shared_y)?;
        }
        let shared = self.w.shared.is_some().then(|| {
            let g = self
                .w
                .shared_gate
                .is_some()
                .then_some(self.shared_logit.as_slice());
            (shared_y.as_slice(), g)
        });
        let mut y = Vec::new();
        combine_into(
            &values(y_rows),
            gate,
            &perm.row_of_assignment,
            self.w.hidden,
            shared,
            self.w.config.output_scale,
            self.dtype,
            &mut y,
        )?;
        Ok(y)
    }
}
