//! Checkpoints as published (DESIGN.md section 4): one MoE layer read straight from a Hugging
//! Face checkpoint directory, with each family's own tensor names and the routing of its
//! config.json, into the canonical tensors [`crate::MoeLayer`] is built from.
//!
//! Only the chosen layer's tensors are read: config.json and the shard headers first, then the
//! layer's tensors from each shard that holds one (memory-mapped, copied out, unmapped).
//! Quantized checkpoints keep their format: FP8 block (`weight` + `weight_scale_inv`) and
//! gpt-oss MXFP4 map onto the canonical layouts as they are; GPTQ, AWQ and
//! compressed-tensors pack-quantized int4 are repacked, bit for bit, into the canonical INT4
//! groups ([`int4`]).

pub mod dir;
pub mod families;
pub mod int4;
pub mod tensors;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use safetensors::tensor::Dtype;

use crate::config::LayerConfig;
use crate::error::{Error, Result};
use crate::io::FileTensor;
use dir::{CheckpointDir, Raw};
use families::{ExpertNames, Family, Plan};
use tensors::{raw_of, split_interleaved, stack, transpose_last2};

/// Which layer of a checkpoint: a decoder index (`3`), or `encoder.3` / `decoder.3` for
/// encoder-decoder models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerSpec {
    /// A plain index: the decoder layer of a decoder-only model.
    Index(usize),
    /// `encoder.L`.
    Encoder(usize),
    /// `decoder.L`.
    Decoder(usize),
}

impl LayerSpec {
    /// The same kind of spec at another index.
    pub fn with_index(self, i: usize) -> LayerSpec {
        match self {
            LayerSpec::Index(_) => LayerSpec::Index(i),
            LayerSpec::Encoder(_) => LayerSpec::Encoder(i),
            LayerSpec::Decoder(_) => LayerSpec::Decoder(i),
        }
    }
}

impl fmt::Display for LayerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerSpec::Index(i) => write!(f, "{i}"),
            LayerSpec::Encoder(i) => write!(f, "encoder.{i}"),
            LayerSpec::Decoder(i) => write!(f, "decoder.{i}"),
        }
    }
}

impl FromStr for LayerSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::Usage(format!(
                "layer {s:?}: expected a layer index (3), or encoder.3 / decoder.3"
            ))
        };
        let (side, index) = match s.split_once('.') {
            Some((side, index)) => (Some(side), index),
            None => (None, s),
        };
        let i: usize = index.parse().map_err(|_| bad())?;
        match side {
            None => Ok(LayerSpec::Index(i)),
            Some("encoder") => Ok(LayerSpec::Encoder(i)),
            Some("decoder") => Ok(LayerSpec::Decoder(i)),
            Some(_) => Err(bad()),
        }
    }
}

/// How a checkpoint stores its quantized Linear weights (config.json's
/// `quantization_config.quant_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// Not quantized.
    None,
    /// FP8 block (`weight` F8_E4M3 + `weight_scale_inv`): DeepSeek-V3, Qwen3-FP8.
    Fp8,
    /// gpt-oss MXFP4 (`*_blocks` + `*_scales`).
    Mxfp4,
    /// GPTQ 4-bit (`qweight`, `qzeros`, `scales`, `g_idx`); `v2` stores zeros as they are.
    Gptq {
        /// `checkpoint_format` "gptq_v2": zero points stored exactly, not minus one.
        v2: bool,
    },
    /// AWQ GEMM 4-bit (`qweight`, `qzeros`, `scales`).
    Awq,
    /// compressed-tensors pack-quantized 4-bit (`weight_packed`, `weight_scale`, ...).
    CompressedTensors,
}

impl Quantization {
    fn name(self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Fp8 => "fp8",
            Quantization::Mxfp4 => "mxfp4",
            Quantization::Gptq { .. } => "gptq",
            Quantization::Awq => "awq",
            Quantization::CompressedTensors => "compressed-tensors",
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One MoE layer read out of a checkpoint: its config and canonical tensors.
#[derive(Debug)]
pub struct CheckpointLayer {
    /// The family (config.json's `model_type`).
    pub family: Family,
    /// The checkpoint's quantization.
    pub quantization: Quantization,
    /// Which layer.
    pub layer: LayerSpec,
    /// The routing and activation the family's transformers module computes.
    pub config: LayerConfig,
    /// The layer's tensors under the canonical names of DESIGN.md section 4.
    pub tensors: BTreeMap<String, FileTensor>,
    /// `DIR layer L`, for errors.
    pub origin: String,
}

/// Reads layer `layer` of the checkpoint in `dir`.
pub fn read_layer(dir: &Path, layer: LayerSpec) -> Result<CheckpointLayer> {
    let ck = CheckpointDir::open(dir)?;
    let family = families::family(&ck)?;
    let quantization = quantization(&ck)?;
    let (config, plan) = families::plan(&ck, family, layer)?;
    let tensors = Reader {
        ck: &ck,
        plan: &plan,
        quant: quantization,
        layer,
    }
    .read()?;
    Ok(CheckpointLayer {
        family,
        quantization,
        layer,
        config,
        tensors,
        origin: format!("{} layer {layer}", ck.origin()),
    })
}

/// The checkpoint's quantization, from config.json's `quantization_config`.
pub(crate) fn quantization(ck: &CheckpointDir) -> Result<Quantization> {
    let Some(q) = ck
        .config
        .get("quantization_config")
        .filter(|v| !v.is_null())
    else {
        return Ok(Quantization::None);
    };
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
    let bits = q.get("bits").and_then(|b| b.as_u64());
    let four_bit = |what: &str| -> Result<()> {
        match bits {
            None | Some(4) => Ok(()),
            Some(b) => Err(ck.error(format!(
                "{what} with {b} bits is not supported (4-bit only)"
            ))),
        }
    };
    Ok(match method {
        "fp8" => {
            if let Some(b) = q.get("weight_block_size").filter(|v| !v.is_null()) {
                if b != &serde_json::json!([128, 128]) {
                    return Err(ck.error(format!(
                        "fp8 weight_block_size {b} is not supported ([128, 128] only)"
                    )));
                }
            }
            Quantization::Fp8
        }
        "mxfp4" => Quantization::Mxfp4,
        "gptq" => {
            four_bit("gptq")?;
            let format = q
                .get("checkpoint_format")
                .and_then(|f| f.as_str())
                .unwrap_or("gptq");
            match format {
                "gptq" => Quantization::Gptq { v2: false },
                "gptq_v2" => Quantization::Gptq { v2: true },
                other => {
                    return Err(ck.error(format!(
                        "gptq checkpoint_format {other:?} is not supported (gptq or gptq_v2)"
                    )))
                }
            }
        }
        "awq" => {
            four_bit("awq")?;
            let version = q.get("version").and_then(|v| v.as_str()).unwrap_or("gemm");
            if !version.eq_ignore_ascii_case("gemm") {
                return Err(ck.error(format!(
                    "awq version {version:?} is not supported (the GEMM packing only)"
                )));
            }
            Quantization::Awq
        }
        "compressed-tensors" => Quantization::CompressedTensors,
        other => {
            return Err(ck.error(format!(
                "quantization_config.quant_method {other:?} is not supported (fp8, mxfp4, \
                 gptq, awq, compressed-tensors)"
            )))
        }
    })
}

/// The canonical projections, with their logical `[N, K]` from config.json.
#[derive(Clone, Copy)]
enum Proj {
    Gate,
    Up,
    Down,
}

impl Proj {
    fn canonical(self) -> &'static str {
        match self {
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// `[N, K]` for a width-`ffn` expert of hidden size `hidden`.
    fn dims(self, hidden: usize, ffn: usize) -> (usize, usize) {
        match self {
            Proj::Gate | Proj::Up => (ffn, hidden),
            Proj::Down => (hidden, ffn),
        }
    }
}

/// The Linears of some projections: (projection, one base name per expert, N, K).
type Linears = Vec<(Proj, Vec<String>, usize, usize)>;

/// One Linear weight in canonical parts: (suffix of the canonical name, tensor).
type Parts = Vec<(&'static str, Raw)>;

struct Reader<'a> {
    ck: &'a CheckpointDir,
    plan: &'a Plan,
    quant: Quantization,
    layer: LayerSpec,
}

impl Reader<'_> {
    fn name(&self, rel: &str) -> String {
        format!("{}{rel}", self.plan.prefix)
    }

    fn shape_error(&self, name: &str, got: &[usize], want: &[usize]) -> Error {
        self.ck.tensor_error(
            name,
            format!(
                "shape {got:?} disagrees with config.json (expected {want:?} for layer {})",
                self.layer
            ),
        )
    }

    /// The tensor must exist with this shape (checked from the header, before reading).
    fn expect(&self, name: &str, want: &[usize]) -> Result<()> {
        let e = self.ck.entry(name).ok_or_else(|| self.missing(name))?;
        if e.shape != want {
            return Err(self.shape_error(name, &e.shape, want));
        }
        Ok(())
    }

    fn missing(&self, name: &str) -> Error {
        let near: Vec<&str> = self.ck.names_under(&self.plan.prefix).take(6).collect();
        let hint = if near.is_empty() {
            format!("the checkpoint has no tensor under {:?}", self.plan.prefix)
        } else {
            format!("tensors under the layer: {}", near.join(", "))
        };
        self.ck.error(format!(
            "layer {}: missing tensor {name:?} ({hint})",
            self.layer
        ))
    }

    fn read(&self) -> Result<BTreeMap<String, FileTensor>> {
        let p = self.plan;
        let (e, h) = (p.num_experts, p.hidden);
        let router_w = self.name(&format!("{}.weight", p.router));
        let router_b = self.name(&format!("{}.bias", p.router));
        self.expect(&router_w, &[e, h])?;
        let mut wanted = vec![router_w.clone()];
        let mut singles: Vec<(String, &'static str)> = vec![(router_w, "router.weight")];
        if self.ck.has(&router_b) {
            self.expect(&router_b, &[e])?;
            wanted.push(router_b.clone());
            singles.push((router_b, "router.bias"));
        }
        if let Some(b) = p.score_bias {
            let b = self.name(b);
            self.expect(&b, &[e])?;
            wanted.push(b.clone());
            singles.push((b, "router.score_correction_bias"));
        }
        let mut out = BTreeMap::new();
        match &p.experts {
            ExpertNames::PerExpert {
                stem,
                gate,
                up,
                down,
                biases,
            } => {
                let projs: Vec<(Proj, &str)> = gate
                    .map(|g| (Proj::Gate, g))
                    .into_iter()
                    .chain([(Proj::Up, *up), (Proj::Down, *down)])
                    .collect();
                let mut linears = Vec::new();
                for (proj, local) in &projs {
                    let bases: Vec<String> = (0..e)
                        .map(|j| self.name(&format!("{stem}{j}.{local}")))
                        .collect();
                    let (n, k) = proj.dims(h, p.ffn);
                    for b in &bases {
                        wanted.extend(self.linear_names(b, n, k)?);
                        if *biases {
                            let bias = format!("{b}.bias");
                            self.expect(&bias, &[n])?;
                            wanted.push(bias);
                        }
                    }
                    linears.push((*proj, bases, n, k));
                }
                let shared = self.shared_names()?;
                for (_, bases, n, k) in &shared {
                    for b in bases {
                        wanted.extend(self.linear_names(b, *n, *k)?);
                    }
                }
                if let Some((_, Some(gate))) = p.shared {
                    let g = self.name(&format!("{gate}.weight"));
                    self.expect(&g, &[1, h])?;
                    wanted.push(g.clone());
                    singles.push((g, "shared.gate.weight"));
                }
                let mut raw = self.ck.fetch(&wanted)?;
                for (name, canonical) in &singles {
                    out.insert(canonical.to_string(), self.float(&mut raw, name)?);
                }
                for (proj, bases, n, k) in linears {
                    self.stack_linears(&mut raw, &mut out, proj, &bases, n, k, *biases)?;
                }
                for (proj, bases, n, k) in shared {
                    self.shared_linear(&mut raw, &mut out, proj, &bases[0], n, k)?;
                }
            }
            ExpertNames::GptOss => {
                let mut raw = self.ck.fetch(&wanted)?;
                for (name, canonical) in &singles {
                    out.insert(canonical.to_string(), self.float(&mut raw, name)?);
                }
                drop(raw);
                self.gpt_oss(&mut out)?;
            }
        }
        Ok(out)
    }

    /// The shared expert's Linears: (projection, [base], N, K), after checking the gate.
    fn shared_names(&self) -> Result<Linears> {
        let p = self.plan;
        let Some((stem, _)) = p.shared else {
            return Ok(Vec::new());
        };
        let fs = p.shared_ffn.unwrap_or(p.ffn);
        Ok([Proj::Gate, Proj::Up, Proj::Down]
            .into_iter()
            .map(|proj| {
                let (n, k) = proj.dims(p.hidden, fs);
                (
                    proj,
                    vec![self.name(&format!("{stem}{}", proj.canonical()))],
                    n,
                    k,
                )
            })
            .collect())
    }

    /// The stored tensors of Linear `base` (logical `[n, k]`), by the format it is stored in.
    fn linear_names(&self, base: &str, n: usize, k: usize) -> Result<Vec<String>> {
        let w = format!("{base}.weight");
        let names = |suffixes: &[&str]| -> Vec<String> {
            suffixes.iter().map(|s| format!("{base}.{s}")).collect()
        };
        if let Some(entry) = self.ck.entry(&w) {
            if entry.shape != [n, k] {
                return Err(self.shape_error(&w, &entry.shape, &[n, k]));
            }
            if entry.dtype == Dtype::F8_E4M3 {
                let s = format!("{base}.weight_scale_inv");
                if !self.ck.has(&s) {
                    return Err(self
                        .ck
                        .tensor_error(&w, format!("an F8_E4M3 weight without its scale {s:?}")));
                }
                self.expect(&s, &[n.div_ceil(128), k.div_ceil(128)])?;
                return Ok(vec![w, s]);
            }
            return Ok(vec![w]);
        }
        if self.ck.has(&format!("{base}.qweight")) {
            return match self.quant {
                Quantization::Gptq { .. } => {
                    let mut v = names(&["qweight", "qzeros", "scales"]);
                    if self.ck.has(&format!("{base}.g_idx")) {
                        v.push(format!("{base}.g_idx"));
                    }
                    Ok(v)
                }
                Quantization::Awq => Ok(names(&["qweight", "qzeros", "scales"])),
                other => Err(self.ck.tensor_error(
                    &format!("{base}.qweight"),
                    format!("a GPTQ/AWQ qweight, but quantization_config.quant_method is {other}"),
                )),
            };
        }
        if self.ck.has(&format!("{base}.weight_packed")) {
            let mut v = names(&["weight_packed", "weight_scale"]);
            for opt in ["weight_zero_point", "weight_shape", "weight_g_idx"] {
                if self.ck.has(&format!("{base}.{opt}")) {
                    v.push(format!("{base}.{opt}"));
                }
            }
            return Ok(v);
        }
        Err(self.missing(&w))
    }

    fn take(&self, raw: &mut BTreeMap<String, Raw>, name: &str) -> Result<Raw> {
        raw.remove(name).ok_or_else(|| self.missing(name))
    }

    fn float(&self, raw: &mut BTreeMap<String, Raw>, name: &str) -> Result<FileTensor> {
        let r = self.take(raw, name)?;
        match r.dtype {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => r
                .into_file_tensor()
                .map_err(|e| self.ck.tensor_error(name, e)),
            other => Err(self
                .ck
                .tensor_error(name, format!("dtype {other:?} (expected F32, F16 or BF16)"))),
        }
    }

    /// Linear `base` as canonical parts (suffix, tensor).
    fn linear(
        &self,
        raw: &mut BTreeMap<String, Raw>,
        base: &str,
        n: usize,
        k: usize,
    ) -> Result<Parts> {
        let w = format!("{base}.weight");
        if raw.contains_key(&w) {
            let weight = self.take(raw, &w)?;
            let s = format!("{base}.weight_scale_inv");
            return Ok(match raw.remove(&s) {
                Some(scale) => vec![("", weight), ("_scale_inv", scale)],
                None => {
                    if !matches!(weight.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                        return Err(self.ck.tensor_error(
                            &w,
                            format!(
                                "dtype {:?} (expected F32, F16, BF16 or F8_E4M3)",
                                weight.dtype
                            ),
                        ));
                    }
                    vec![("", weight)]
                }
            });
        }
        let groups = self.int4(raw, base, n, k)?;
        let file = String::new();
        let mut parts: Parts = vec![(
            "_packed",
            Raw {
                name: format!("{base} (packed)"),
                file: file.clone(),
                dtype: Dtype::U8,
                shape: vec![n, k.div_ceil(2)],
                bytes: groups.packed,
            },
        )];
        let g = groups.scales.shape().get(1).copied().unwrap_or(0);
        parts.push(("_scales", raw_of(base, &file, groups.scales)));
        if let Some(z) = groups.zeros {
            parts.push((
                "_zeros",
                Raw {
                    name: format!("{base} (zeros)"),
                    file,
                    dtype: Dtype::U8,
                    shape: vec![n, g],
                    bytes: z,
                },
            ));
        }
        Ok(parts)
    }

    /// An int4 Linear (GPTQ / AWQ / compressed-tensors) as canonical INT4 groups.
    fn int4(
        &self,
        raw: &mut BTreeMap<String, Raw>,
        base: &str,
        n: usize,
        k: usize,
    ) -> Result<int4::Int4Groups> {
        let ints = |raw: &mut BTreeMap<String, Raw>, s: &str| -> Result<(Vec<usize>, Vec<i32>)> {
            let name = format!("{base}.{s}");
            let r = self.take(raw, &name)?;
            let v = r.to_i32().map_err(|e| self.ck.tensor_error(&name, e))?;
            Ok((r.shape, v))
        };
        let floats = |raw: &mut BTreeMap<String, Raw>, s: &str| -> Result<crate::Tensor> {
            let name = format!("{base}.{s}");
            let r = self.take(raw, &name)?;
            r.into_float().map_err(|e| self.ck.tensor_error(&name, e))
        };
        let context = |e: String| self.ck.tensor_error(base, e);
        if raw.contains_key(&format!("{base}.qweight")) {
            let (qw_shape, qw) = ints(raw, "qweight")?;
            let (qz_shape, qz) = ints(raw, "qzeros")?;
            let scales = floats(raw, "scales")?;
            let qweight = int4::I32Tensor::new(&qw_shape, &qw);
            let qzeros = int4::I32Tensor::new(&qz_shape, &qz);
            return match self.quant {
                Quantization::Gptq { v2 } => {
                    let g_idx = match raw.contains_key(&format!("{base}.g_idx")) {
                        true => Some(ints(raw, "g_idx")?.1),
                        false => None,
                    };
                    // gptq_v2 stores the zero point itself; v1 stores it minus one, read as
                    // GPTQModel (and transformers through optimum) reads it.
                    let zeros = match v2 {
                        true => int4::GptqZeros::V2,
                        false => int4::GptqZeros::V1Word,
                    };
                    int4::gptq(qweight, qzeros, &scales, g_idx.as_deref(), zeros, n, k)
                        .map_err(context)
                }
                _ => int4::awq(qweight, qzeros, &scales, n, k).map_err(context),
            };
        }
        let (packed_shape, packed) = ints(raw, "weight_packed")?;
        let scale = floats(raw, "weight_scale")?;
        let shape_name = format!("{base}.weight_shape");
        if let Some(s) = raw.remove(&shape_name) {
            let s = s
                .to_i64()
                .map_err(|e| self.ck.tensor_error(&shape_name, e))?;
            if s != [n as i64, k as i64] {
                return Err(self.ck.tensor_error(
                    &shape_name,
                    format!("{s:?} disagrees with config.json (expected [{n}, {k}])"),
                ));
            }
        }
        let g_idx = match raw.contains_key(&format!("{base}.weight_g_idx")) {
            true => Some(ints(raw, "weight_g_idx")?.1),
            false => None,
        };
        let zp_name = format!("{base}.weight_zero_point");
        let zp_raw = raw.remove(&zp_name);
        let (zp_i32, zp_i8): (Vec<i32>, Vec<i8>);
        let zp = match &zp_raw {
            None => None,
            // compressed-tensors before 0.9.4: unpacked signed int8 [N, K/G].
            Some(z) if z.dtype == Dtype::I8 => {
                zp_i8 = bytemuck::cast_slice::<u8, i8>(&z.bytes).to_vec();
                Some(int4::CtZeroPoint::Unpacked {
                    shape: &z.shape,
                    data: &zp_i8,
                })
            }
            Some(z) => {
                zp_i32 = z.to_i32().map_err(|e| self.ck.tensor_error(&zp_name, e))?;
                Some(int4::CtZeroPoint::Packed(int4::I32Tensor::new(
                    &z.shape, &zp_i32,
                )))
            }
        };
        int4::compressed_tensors(
            int4::I32Tensor::new(&packed_shape, &packed),
            &scale,
            zp,
            g_idx.as_deref(),
            n,
            k,
        )
        .map_err(context)
    }

    /// The routed experts' Linears of one projection, stacked into `experts.P*`.
    #[allow(clippy::too_many_arguments)]
    fn stack_linears(
        &self,
        raw: &mut BTreeMap<String, Raw>,
        out: &mut BTreeMap<String, FileTensor>,
        proj: Proj,
        bases: &[String],
        n: usize,
        k: usize,
        biases: bool,
    ) -> Result<()> {
        let canonical = format!("experts.{}", proj.canonical());
        let mut by_suffix: BTreeMap<&'static str, Vec<Raw>> = BTreeMap::new();
        let mut bias_parts = Vec::new();
        for b in bases {
            for (suffix, r) in self.linear(raw, b, n, k)? {
                by_suffix.entry(suffix).or_default().push(r);
            }
            if biases {
                bias_parts.push(self.take(raw, &format!("{b}.bias"))?);
            }
        }
        for (suffix, parts) in by_suffix {
            if parts.len() != bases.len() {
                return Err(self.ck.error(format!(
                    "layer {}: {} of the {} experts of {:?} have a {suffix:?} part (every expert \
                     must be stored alike)",
                    self.layer,
                    parts.len(),
                    bases.len(),
                    bases[0]
                )));
            }
            let stacked = stack(parts).map_err(|e| self.ck.error(e))?;
            let name = format!("{canonical}{suffix}");
            out.insert(name, self.typed(stacked)?);
        }
        if biases {
            let stacked = stack(bias_parts).map_err(|e| self.ck.error(e))?;
            out.insert(format!("{canonical}_bias"), self.typed(stacked)?);
        }
        Ok(())
    }

    fn shared_linear(
        &self,
        raw: &mut BTreeMap<String, Raw>,
        out: &mut BTreeMap<String, FileTensor>,
        proj: Proj,
        base: &str,
        n: usize,
        k: usize,
    ) -> Result<()> {
        for (suffix, r) in self.linear(raw, base, n, k)? {
            out.insert(
                format!("shared.{}{suffix}", proj.canonical()),
                self.typed(r)?,
            );
        }
        Ok(())
    }

    fn typed(&self, r: Raw) -> Result<FileTensor> {
        let name = r.name.clone();
        r.into_file_tensor()
            .map_err(|e| self.ck.tensor_error(&name, e))
    }

    /// gpt-oss: every expert in one tensor per projection, gate and up interleaved.
    fn gpt_oss(&self, out: &mut BTreeMap<String, FileTensor>) -> Result<()> {
        let p = self.plan;
        let (e, h, f) = (p.num_experts, p.hidden, p.ffn);
        let n = |s: &str| self.name(&format!("experts.{s}"));
        let err = |name: &str, m: String| self.ck.tensor_error(name, m);
        let biases = [
            (n("gate_up_proj_bias"), vec![e, 2 * f]),
            (n("down_proj_bias"), vec![e, h]),
        ];
        let mut names: Vec<String> = Vec::new();
        for (b, shape) in &biases {
            self.expect(b, shape)?;
            names.push(b.clone());
        }
        let mxfp4 = self.ck.has(&n("gate_up_proj_blocks"));
        if mxfp4 {
            if h % 32 != 0 || f % 32 != 0 {
                return Err(self.ck.error(format!(
                    "MXFP4 needs hidden_size and intermediate_size divisible by 32, got {h} and {f}"
                )));
            }
            self.expect(&n("gate_up_proj_blocks"), &[e, 2 * f, h / 32, 16])?;
            self.expect(&n("gate_up_proj_scales"), &[e, 2 * f, h / 32])?;
            self.expect(&n("down_proj_blocks"), &[e, h, f / 32, 16])?;
            self.expect(&n("down_proj_scales"), &[e, h, f / 32])?;
            names.extend(
                [
                    "gate_up_proj_blocks",
                    "gate_up_proj_scales",
                    "down_proj_blocks",
                    "down_proj_scales",
                ]
                .map(n),
            );
        } else {
            self.expect(&n("gate_up_proj"), &[e, h, 2 * f])?;
            self.expect(&n("down_proj"), &[e, f, h])?;
            names.extend(["gate_up_proj", "down_proj"].map(n));
        }
        let mut raw = self.ck.fetch(&names)?;
        let (gb, ub) = split_interleaved(self.take(&mut raw, &biases[0].0)?, 1)
            .map_err(|m| err(&biases[0].0, m))?;
        out.insert("experts.gate_proj_bias".into(), self.typed(gb)?);
        out.insert("experts.up_proj_bias".into(), self.typed(ub)?);
        out.insert(
            "experts.down_proj_bias".into(),
            self.typed(self.take(&mut raw, &biases[1].0)?)?,
        );
        if mxfp4 {
            // Rows interleaved: even rows gate, odd rows up (blocks and scales alike).
            for part in ["blocks", "scales"] {
                let name = n(&format!("gate_up_proj_{part}"));
                let (g, u) =
                    split_interleaved(self.take(&mut raw, &name)?, 1).map_err(|m| err(&name, m))?;
                out.insert(format!("experts.gate_proj_{part}"), self.typed(g)?);
                out.insert(format!("experts.up_proj_{part}"), self.typed(u)?);
                let down = n(&format!("down_proj_{part}"));
                out.insert(
                    format!("experts.down_proj_{part}"),
                    self.typed(self.take(&mut raw, &down)?)?,
                );
            }
        } else {
            // [E, H, 2F], gate and up interleaved along the last axis, each [in, out].
            let name = n("gate_up_proj");
            let (g, u) =
                split_interleaved(self.take(&mut raw, &name)?, 2).map_err(|m| err(&name, m))?;
            let g = transpose_last2(g).map_err(|m| err(&name, m))?;
            out.insert("experts.gate_proj".into(), self.typed(g)?);
            let u = transpose_last2(u).map_err(|m| err(&name, m))?;
            out.insert("experts.up_proj".into(), self.typed(u)?);
            let down = n("down_proj");
            let d = transpose_last2(self.take(&mut raw, &down)?).map_err(|m| err(&down, m))?;
            out.insert("experts.down_proj".into(), self.typed(d)?);
        }
        Ok(())
    }
}
