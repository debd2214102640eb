//! Stage 1 on wgpu: fused scoring, selection and weights (shaders/gate.wgsl).
//!
//! The common path (no capacity) is one workgroup per token plus a two-pass, atomic-free
//! count of the assignments per expert. Capacity adds the batch-wide GShard counting (block
//! counts, per-expert exclusive scan, positions inside each block) and, for top-1-score
//! priority, a rank of every token; expert choice finds each expert's top-C tokens by
//! bisection on order-preserving keys. All passes are recorded into the caller's encoder.

use crate::config::{Combine, Priority, RoutingConfig, Scoring};
use crate::error::{Error, Result};
use crate::stage::Stage;
use crate::wgpu::context::{gpu_err, GpuBuffer, WgpuDevice, WG};
use crate::wgpu::kernels::Kernel;
use crate::wgpu::GateGpu;

/// Entry points of shaders/gate.wgsl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    /// One workgroup per token: scores, groups, picks, raw (or, without capacity, final)
    /// weights.
    Select,
    /// One invocation per token: its priority position by top-1 score.
    Priority,
    /// One workgroup per (slot, block of tokens): assignments per expert.
    BlockCounts,
    /// One workgroup per expert: counts, and the exclusive offsets of the blocks.
    BlockScan,
    /// One workgroup per (slot, block): kept flags under capacity.
    Capacity,
    /// One workgroup per expert: the expert-choice threshold.
    ExpertChoice,
    /// One invocation per token: kept masking, renormalisation and scale.
    Finish,
}

impl Entry {
    pub fn name(self) -> &'static str {
        match self {
            Entry::Select => "gate_select",
            Entry::Priority => "gate_priority",
            Entry::BlockCounts => "gate_block_counts",
            Entry::BlockScan => "gate_block_scan",
            Entry::Capacity => "gate_capacity",
            Entry::ExpertChoice => "gate_expert_choice",
            Entry::Finish => "gate_finish",
        }
    }

    /// The bindings of group 0 the entry point uses (the header of gate.wgsl lists them).
    fn bindings(self) -> &'static [u32] {
        match self {
            Entry::Select => &[0, 1, 2, 3, 4, 5, 7],
            Entry::Priority => &[0, 7],
            Entry::BlockCounts => &[0, 3, 7],
            Entry::BlockScan | Entry::ExpertChoice => &[0, 6, 7],
            Entry::Capacity => &[0, 3, 5, 7],
            Entry::Finish => &[0, 3, 4, 5, 7],
        }
    }
}

/// Tokens per block of the capacity counting (`BLOCK` in gate.wgsl).
const BLOCK: usize = 256;
/// f32 words of gate_select's workgroup row cache (`CACHE` in gate.wgsl).
const CACHE: usize = 2048;

const MODE_PLAIN: u32 = 0;
const MODE_CAPACITY: u32 = 1;
const MODE_EXPERT_CHOICE: u32 = 2;

/// `GateParams` of gate.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    tokens: u32,
    experts: u32,
    slots: u32,
    groups: u32,
    keep: u32,
    group_size: u32,
    scoring: u32,
    combine: u32,
    has_bias: u32,
    renormalize: u32,
    mode: u32,
    by_top1: u32,
    capacity: u32,
    blocks: u32,
    use_rank: u32,
    use_global: u32,
    row_len: u32,
    top1_off: u32,
    order_off: u32,
    blk_off: u32,
    ec_key_off: u32,
    ec_sel_off: u32,
    scale: f32,
    nan: f32,
    neg_inf: f32,
    _pad: [u32; 3],
}

fn too_large(what: &str) -> Error {
    Error::shape(
        Stage::Gate,
        format!("{what} exceeds the 32-bit indexing of the wgpu gate"),
    )
}

fn to_u32(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| too_large(what))
}

/// Records the gate on `logits` `[T, E]` into `out`.
#[allow(clippy::too_many_arguments)]
pub fn encode(
    dev: &WgpuDevice,
    enc: &mut ::wgpu::CommandEncoder,
    logits: &GpuBuffer<f32>,
    tokens: usize,
    experts: usize,
    bias: Option<&GpuBuffer<f32>>,
    cfg: &RoutingConfig,
    out: &GateGpu,
) -> Result<()> {
    encode_with(dev, enc, (logits, tokens, experts), bias, cfg, out, false)
}

/// [`encode`], optionally forcing gate_select's row into the scratch buffer (the path taken
/// when E + 2G exceeds the workgroup cache), so that tests can reach it with small E.
fn encode_with(
    dev: &WgpuDevice,
    enc: &mut ::wgpu::CommandEncoder,
    (logits, tokens, experts): (&GpuBuffer<f32>, usize, usize),
    bias: Option<&GpuBuffer<f32>>,
    cfg: &RoutingConfig,
    out: &GateGpu,
    force_global: bool,
) -> Result<()> {
    cfg.validate(experts)?;
    let slots = cfg.slots(experts);
    let n = tokens
        .checked_mul(slots)
        .ok_or_else(|| too_large("T x slots"))?;
    let te = tokens
        .checked_mul(experts)
        .ok_or_else(|| too_large("T x E"))?;
    let expect = |what: &str, got: usize, want: usize| -> Result<()> {
        if got == want {
            Ok(())
        } else {
            Err(Error::shape(
                Stage::Gate,
                format!("{what} holds {got} elements, expected {want}"),
            ))
        }
    };
    expect("logits", logits.len, te)?;
    if let Some(b) = bias {
        expect("score_correction_bias", b.len, experts)?;
    }
    expect("topk_ids", out.topk_ids.len, n)?;
    expect("topk_weights", out.topk_weights.len, n)?;
    expect("kept", out.kept.len, n)?;
    expect("counts", out.counts.len, experts)?;

    let (groups, keep) = cfg.groups.map_or((0, 0), |g| (g.count, g.keep));
    let group_size = if groups == 0 { 0 } else { experts / groups };
    let row_len = experts + 2 * groups;
    let use_global = force_global || row_len > CACHE;

    let (mode, capacity) = if let Some(ec) = cfg.expert_choice {
        let c = ((ec.capacity_factor * tokens as f64 / experts as f64).ceil() as usize).min(tokens);
        (MODE_EXPERT_CHOICE, c)
    } else if let Some(c) = cfg.capacity {
        (MODE_CAPACITY, c.tokens_per_expert(tokens, slots, experts))
    } else {
        (MODE_PLAIN, u32::MAX as usize)
    };
    // Positions never exceed T · slots, so a larger C keeps everything.
    let capacity = capacity.min(u32::MAX as usize) as u32;
    let by_top1 = mode == MODE_CAPACITY && cfg.priority == Priority::Top1Score;
    let blocks = tokens.div_ceil(BLOCK);

    // Rank every expert at once when that is cheaper than `slots` rounds of a workgroup
    // reduction (about 12 barrier steps each).
    let per_inv = experts.div_ceil(WG as usize);
    let use_rank = experts * per_inv <= slots * (per_inv + 12);

    // Scratch regions, in u32 words.
    let mut len = 0usize;
    let mut region = |words: usize, what: &str| -> Result<u32> {
        let off = to_u32(len, what)?;
        len = len.checked_add(words).ok_or_else(|| too_large(what))?;
        Ok(off)
    };
    region(if use_global { tokens * row_len } else { 0 }, "gate rows")?;
    let top1_off = region(if by_top1 { tokens } else { 0 }, "top-1 scores")?;
    let order_off = region(if by_top1 { tokens } else { 0 }, "priority order")?;
    let blk_words = if mode == MODE_EXPERT_CHOICE {
        0
    } else {
        slots * blocks * experts
    };
    let blk_off = region(blk_words, "block counts")?;
    let ec_key_off = region(
        if mode == MODE_EXPERT_CHOICE { te } else { 0 },
        "expert-choice keys",
    )?;
    let ec_sel_off = region(
        if mode == MODE_EXPERT_CHOICE {
            2 * experts
        } else {
            0
        },
        "expert-choice thresholds",
    )?;
    to_u32(len, "gate scratch")?;
    if (len * 4) as u64 > dev.max_binding_bytes() {
        return Err(gpu_err(format!(
            "the gate's scratch needs {} bytes, more than the adapter's largest binding {}",
            len * 4,
            dev.max_binding_bytes()
        )));
    }
    let scratch = dev.alloc::<u32>(len.max(1), "gate scratch")?;

    let params = Params {
        tokens: to_u32(tokens, "T")?,
        experts: to_u32(experts, "E")?,
        slots: to_u32(slots, "slots")?,
        groups: groups as u32,
        keep: keep as u32,
        group_size: group_size as u32,
        scoring: match cfg.scoring {
            Scoring::Softmax => 0,
            Scoring::Sigmoid => 1,
            Scoring::Logits => 2,
        },
        combine: match cfg.combine {
            Combine::Score => 0,
            Combine::SoftmaxSelected => 1,
        },
        has_bias: u32::from(bias.is_some()),
        renormalize: u32::from(cfg.renormalize),
        mode,
        by_top1: u32::from(by_top1),
        capacity,
        blocks: blocks as u32,
        use_rank: u32::from(use_rank),
        use_global: u32::from(use_global),
        row_len: to_u32(row_len, "E + 2G")?,
        top1_off,
        order_off,
        blk_off,
        ec_key_off,
        ec_sel_off,
        scale: cfg.scale as f32,
        nan: f32::NAN,
        neg_inf: f32::NEG_INFINITY,
        _pad: [0; 3],
    };
    let uniform = dev.uniform(&params);
    let dummy;
    let bias_buf = match bias {
        Some(b) => b,
        None => {
            dummy = dev.upload(&[0f32], "no score_correction_bias");
            &dummy
        }
    };
    let resources = [
        uniform.as_entire_binding(),
        logits.binding(),
        bias_buf.binding(),
        out.topk_ids.binding(),
        out.topk_weights.binding(),
        out.kept.binding(),
        out.counts.binding(),
        scratch.binding(),
    ];
    let run =
        |enc: &mut ::wgpu::CommandEncoder, entry: Entry, groups: (u32, u32, u32)| -> Result<()> {
            let pipeline = dev.pipeline(Kernel::Gate(entry), &[])?;
            let entries: Vec<::wgpu::BindGroupEntry<'_>> = entry
                .bindings()
                .iter()
                .map(|&b| ::wgpu::BindGroupEntry {
                    binding: b,
                    resource: resources[b as usize].clone(),
                })
                .collect();
            let bind = dev.device.create_bind_group(&::wgpu::BindGroupDescriptor {
                label: Some(entry.name()),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            dev.dispatch(enc, &pipeline, &bind, groups);
            Ok(())
        };

    let per_token = dev.grid(tokens, 1);
    let per_token_inv = dev.grid(tokens, WG);
    let per_expert = dev.grid(experts, 1);
    let per_block = dev.grid(slots * blocks, 1);
    run(enc, Entry::Select, per_token)?;
    match mode {
        MODE_PLAIN => {
            run(enc, Entry::BlockCounts, per_block)?;
            run(enc, Entry::BlockScan, per_expert)?;
        }
        MODE_CAPACITY => {
            if by_top1 {
                run(enc, Entry::Priority, per_token_inv)?;
            }
            run(enc, Entry::BlockCounts, per_block)?;
            run(enc, Entry::BlockScan, per_expert)?;
            run(enc, Entry::Capacity, per_block)?;
            run(enc, Entry::Finish, per_token_inv)?;
        }
        _ => {
            run(enc, Entry::ExpertChoice, per_expert)?;
            run(enc, Entry::Finish, per_token_inv)?;
        }
    }
    Ok(())
}
