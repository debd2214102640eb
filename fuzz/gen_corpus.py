#!/usr/bin/env python3
"""Writes the committed seed corpus of the fuzz targets (standard library only).

    python3 fuzz/gen_corpus.py      # rewrites fuzz/corpus/*/seed-*

safetensors_layer: tiny synthetic layers (f32 / f16 / bf16, gated and not, biases, shared
experts, an input `x`) plus a few malformed files; quantized layers (FP8 block with F32 / BF16
scale_inv, MXFP4, INT4 with and without zero points, odd K, quantized shared experts) and
malformed quantized files (missing, misshapen or mistyped parts, two formats in one file); config_json: the test fixtures' configs and
edge cases; routing: byte strings in the header + value encoding of fuzz_targets/routing.rs.
"""

import glob
import json
import os
import random
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")


def f16_bits(v):
    return struct.pack("<e", v)


def bf16_bits(v):
    return struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:]


def encode(vals, dtype):
    if dtype == "F32":
        return b"".join(struct.pack("<f", v) for v in vals)
    if dtype == "F16":
        return b"".join(f16_bits(v) for v in vals)
    if dtype == "BF16":
        return b"".join(bf16_bits(v) for v in vals)
    if dtype == "I32":
        return b"".join(struct.pack("<i", int(v)) for v in vals)
    if dtype in ("U8", "F8_E4M3"):
        return bytes(int(v) & 0xFF for v in vals)
    raise ValueError(dtype)


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, values)."""
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, vals in tensors:
        data = encode(vals, dtype)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def layer(rng, e, h, f, dtype="F32", gated=True, router_bias=False, corr_bias=False,
          expert_bias=False, shared=None, shared_gate=False, x=None):
    def rand(n, s=1.0):
        return [rng.uniform(-s, s) for _ in range(n)]

    t = [("router.weight", "F32", [e, h], rand(e * h, 2.0))]
    if router_bias:
        t.append(("router.bias", "F32", [e], rand(e, 0.5)))
    if corr_bias:
        t.append(("router.score_correction_bias", "F32", [e], rand(e, 0.1)))
    if gated:
        t.append(("experts.gate_proj", dtype, [e, f, h], rand(e * f * h)))
    t.append(("experts.up_proj", dtype, [e, f, h], rand(e * f * h)))
    t.append(("experts.down_proj", dtype, [e, h, f], rand(e * h * f)))
    if expert_bias:
        if gated:
            t.append(("experts.gate_proj_bias", dtype, [e, f], rand(e * f, 0.1)))
        t.append(("experts.up_proj_bias", dtype, [e, f], rand(e * f, 0.1)))
        t.append(("experts.down_proj_bias", dtype, [e, h], rand(e * h, 0.1)))
    if shared:
        if gated:
            t.append(("shared.gate_proj", dtype, [shared, h], rand(shared * h)))
        t.append(("shared.up_proj", dtype, [shared, h], rand(shared * h)))
        t.append(("shared.down_proj", dtype, [h, shared], rand(h * shared)))
        if shared_gate:
            t.append(("shared.gate.weight", "F32", [1, h], rand(h)))
    if x is not None:
        t.append(("x", "F32", [x, h], rand(x * h)))
    return t


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as fh:
        fh.write(data)


def safetensors_seeds():
    rng = random.Random(1)
    seeds = {
        "mixtral_e4_h4_f3_f32": layer(rng, 4, 4, 3, router_bias=True),
        "relu_e4_h4_f2_f16_biases": layer(rng, 4, 4, 2, "F16", gated=False, expert_bias=True),
        "deepseek_e16_h2_f2_bf16_shared": layer(rng, 16, 2, 2, "BF16", corr_bias=True, shared=2),
        "qwen2_e8_h3_f2_shared_gate": layer(rng, 8, 3, 2, shared=3, shared_gate=True),
        "gated_e2_h1_f1_bias_x": layer(rng, 2, 1, 1, expert_bias=True, x=3),
        "relu_e3_h5_f1_x": layer(rng, 3, 5, 1, gated=False, x=2),
        "relu_e1_h1_f1_shared": layer(rng, 1, 1, 1, gated=False, shared=1),
    }
    for name, t in seeds.items():
        write("safetensors_layer", name, safetensors(t))
    write("safetensors_layer", "x_only", safetensors([("x", "F32", [2, 4], [0.5] * 8)]))
    nan = float("nan")
    write("safetensors_layer", "x_nan", safetensors([("x", "F32", [2, 4], [nan, nan] + [0.5] * 6)]))
    write("safetensors_layer", "x_rank3",
          safetensors([("x", "BF16", [1, 2, 2], [1.0, -1.0, 0.0, 2.0])]))
    write("safetensors_layer", "metadata_empty_tensor",
          safetensors([("router.weight", "F32", [0, 4], []), ("x", "F32", [0, 4], [])],
                      metadata={"format": "pt"}))
    write("safetensors_layer", "i32_tensor",
          safetensors([("router.weight", "I32", [2, 2], [1, 2, 3, 4])]))
    # Mismatched router width and a NaN / inf weight.
    bad = layer(rng, 4, 4, 3)
    bad[0] = ("router.weight", "F32", [4, 3], [float("nan"), float("inf")] + [1.0] * 10)
    write("safetensors_layer", "router_width_mismatch", safetensors(bad))
    special = layer(rng, 4, 2, 2, x=2)
    special[0] = ("router.weight", "F32", [4, 2],
                  [float("nan"), 1.0, float("inf"), -1.0, float("-inf"), 0.0, 3e38, 1e-45])
    write("safetensors_layer", "special_values", safetensors(special))


def prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def quant_matrix(rng, name, fmt, e, n, k, scale_dtype="F32", zeros=True, group=None):
    """The file tensors of matrix `name` [e, n, k] in `fmt` (e None: a shared expert's [n, k]).

    fp8: F8_E4M3 codes + scale_inv per 128 x 128 block; mxfp4: U8 blocks [.., k/32, 16] + e8m0
    scales [.., k/32]; int4: U8 packed [.., ceil(k/2)] + scales [.., k/g] (+ U8 zeros)."""
    lead = [] if e is None else [e]
    if fmt == "fp8":
        # Every e4m3 code but the NaNs (0x7F, 0xFF).
        codes = [c if c & 0x7F != 0x7F else c ^ 1 for c in rng.choices(range(256), k=prod(lead + [n, k]))]
        sshape = lead + [-(-n // 128), -(-k // 128)]
        return [(name, "F8_E4M3", lead + [n, k], codes),
                (name + "_scale_inv", scale_dtype, sshape,
                 [rng.uniform(0.001, 0.01) for _ in range(prod(sshape))])]
    if fmt == "mxfp4":
        bshape = lead + [n, k // 32, 16]
        sshape = lead + [n, k // 32]
        return [(name + "_blocks", "U8", bshape, rng.choices(range(256), k=prod(bshape))),
                (name + "_scales", "U8", sshape, rng.choices(range(118, 128), k=prod(sshape)))]
    if fmt == "int4":
        g = group or k
        pshape = lead + [n, -(-k // 2)]
        sshape = lead + [n, k // g]
        t = [(name + "_packed", "U8", pshape, rng.choices(range(256), k=prod(pshape))),
             (name + "_scales", scale_dtype, sshape,
              [rng.uniform(0.01, 0.1) for _ in range(prod(sshape))])]
        if zeros:
            t.append((name + "_zeros", "U8", sshape, rng.choices(range(16), k=prod(sshape))))
        return t
    raise ValueError(fmt)


def quant_layer(rng, fmt, e, h, f, gated=True, shared=None, router_bias=False,
                expert_bias=False, x=None, **kw):
    """A layer whose expert (and shared expert) matrices are all in `fmt`."""
    t = [("router.weight", "F32", [e, h], [rng.uniform(-2, 2) for _ in range(e * h)])]
    if router_bias:
        t.append(("router.bias", "F32", [e], [rng.uniform(-0.5, 0.5) for _ in range(e)]))
    if gated:
        t += quant_matrix(rng, "experts.gate_proj", fmt, e, f, h, **kw)
    t += quant_matrix(rng, "experts.up_proj", fmt, e, f, h, **kw)
    t += quant_matrix(rng, "experts.down_proj", fmt, e, h, f, **kw)
    if expert_bias:
        t.append(("experts.up_proj_bias", "F32", [e, f], [0.01] * (e * f)))
        t.append(("experts.down_proj_bias", "F32", [e, h], [-0.01] * (e * h)))
        if gated:
            t.append(("experts.gate_proj_bias", "F32", [e, f], [0.02] * (e * f)))
    if shared:
        if gated:
            t += quant_matrix(rng, "shared.gate_proj", fmt, None, shared, h, **kw)
        t += quant_matrix(rng, "shared.up_proj", fmt, None, shared, h, **kw)
        t += quant_matrix(rng, "shared.down_proj", fmt, None, h, shared, **kw)
    if x is not None:
        t.append(("x", "F32", [x, h], [rng.uniform(-1, 1) for _ in range(x * h)]))
    return t


def replace(tensors, name, new):
    """`tensors` with `name` replaced by `new` (a tensor tuple), or removed when None."""
    out = [t for t in tensors if t[0] != name]
    assert len(out) + 1 == len(tensors), name
    return out + ([new] if new else [])


def quant_seeds():
    rng = random.Random(3)
    good = {
        "q_fp8_e4_h4_f3": quant_layer(rng, "fp8", 4, 4, 3, router_bias=True),
        "q_fp8_bf16_e8_h4_f2_shared": quant_layer(rng, "fp8", 8, 4, 2, shared=2,
                                                  scale_dtype="BF16"),
        "q_fp8_e2_h130_f3_x": quant_layer(rng, "fp8", 2, 130, 3, x=1),
        "q_mxfp4_e2_h32_f32_x": quant_layer(rng, "mxfp4", 2, 32, 32, router_bias=True, x=2),
        "q_mxfp4_relu_e3_h64_f32": quant_layer(rng, "mxfp4", 3, 64, 32, gated=False),
        "q_int4_zeros_e4_h8_f4": quant_layer(rng, "int4", 4, 8, 4, scale_dtype="BF16",
                                             group=4),
        "q_int4_f16_odd_k_e3_h5_f3_shared": quant_layer(rng, "int4", 3, 5, 3, shared=2,
                                                        scale_dtype="F16", zeros=False),
        "q_int4_f32_biases_x": quant_layer(rng, "int4", 2, 4, 2, expert_bias=True, x=3,
                                           group=2),
    }
    for name, t in good.items():
        write("safetensors_layer", name, safetensors(t))
    # A dense routed layer with an int4 shared expert (one quantized format: valid).
    dense = layer(rng, 4, 4, 2, shared=None)
    shared = [t for t in quant_layer(rng, "int4", 4, 4, 2, shared=2, group=2)
              if t[0].startswith("shared.")]
    write("safetensors_layer", "q_dense_experts_int4_shared", safetensors(dense + shared))

    fp8 = good["q_fp8_e4_h4_f3"]
    mx = good["q_mxfp4_relu_e3_h64_f32"]
    i4 = good["q_int4_zeros_e4_h8_f4"]
    bad = {
        "qbad_fp8_no_scale_inv": replace(fp8, "experts.up_proj_scale_inv", None),
        "qbad_fp8_scale_shape": replace(fp8, "experts.up_proj_scale_inv",
                                        ("experts.up_proj_scale_inv", "F32", [4, 2, 1], [0.1] * 8)),
        "qbad_fp8_scale_f16": replace(fp8, "experts.down_proj_scale_inv",
                                      ("experts.down_proj_scale_inv", "F16", [4, 1, 1], [0.1] * 4)),
        "qbad_fp8_scale_u8": replace(fp8, "experts.gate_proj_scale_inv",
                                     ("experts.gate_proj_scale_inv", "U8", [4, 1, 1], [1] * 4)),
        "qbad_mxfp4_k_not_32": replace(mx, "router.weight",
                                       ("router.weight", "F32", [3, 48], [0.5] * 144)),
        "qbad_mxfp4_no_scales": replace(mx, "experts.down_proj_scales", None),
        "qbad_mxfp4_blocks_shape": replace(mx, "experts.up_proj_blocks",
                                           ("experts.up_proj_blocks", "U8", [3, 32, 2, 8], [7] * 1536)),
        "qbad_int4_group_not_dividing": replace(
            replace(i4, "experts.up_proj_scales",
                    ("experts.up_proj_scales", "BF16", [4, 4, 3], [0.1] * 48)),
            "experts.up_proj_zeros", ("experts.up_proj_zeros", "U8", [4, 4, 3], [8] * 48)),
        "qbad_int4_zeros_shape": replace(i4, "experts.down_proj_zeros",
                                         ("experts.down_proj_zeros", "U8", [4, 8, 5], [8] * 160)),
        "qbad_int4_zeros_f32": replace(i4, "experts.down_proj_zeros",
                                       ("experts.down_proj_zeros", "F32", [4, 8, 1], [8.0] * 32)),
        "qbad_int4_packed_shape": replace(i4, "experts.gate_proj_packed",
                                          ("experts.gate_proj_packed", "U8", [4, 4, 3], [0x88] * 48)),
        "qbad_zeros_without_packed": layer(rng, 4, 4, 2)
        + [("experts.up_proj_zeros", "U8", [4, 2, 1], [8] * 8)],
        "qbad_scale_inv_without_matrix": layer(rng, 4, 4, 2)
        + [("experts.down_proj_scale_inv", "F32", [4, 1, 1], [0.1] * 4)],
        "qbad_two_formats": [t for t in fp8 if not t[0].startswith("experts.down_proj")]
        + quant_matrix(rng, "experts.down_proj", "int4", 4, 4, 3),
        "qbad_two_formats_one_matrix": fp8 + [("experts.up_proj_packed", "U8", [4, 3, 2], [0] * 24)],
        "qbad_u8_dense_matrix": replace(layer(rng, 4, 4, 2), "experts.up_proj",
                                        ("experts.up_proj", "U8", [4, 2, 4], [1] * 32)),
        "qbad_shared_mixed": dense + [t for t in shared if not t[0].startswith("shared.down_proj")]
        + [("shared.down_proj", "F32", [4, 2], [0.1] * 8)],
        "qbad_gate_up_layouts_differ": [t for t in i4 if not t[0].startswith("experts.gate_proj")]
        + quant_matrix(rng, "experts.gate_proj", "int4", 4, 4, 8, scale_dtype="F16", zeros=False),
        "qbad_unknown_suffix": fp8 + [("experts.up_proj_qweight", "U8", [4, 3, 2], [0] * 24)],
    }
    for name, t in bad.items():
        write("safetensors_layer", name, safetensors(t))


CONFIG_EDGE = {
    "empty_object": "{}",
    "expert_choice": '{"expert_choice": {"capacity_factor": 2.0}, "activation": "gelu"}',
    "clamped": '{"activation": {"clamped_swiglu": {"alpha": 1.702, "limit": 7.0}}, "top_k": 1}',
    "deepseek_groups_null": '{"preset": "deepseek_v3", "groups": null, "scale": 1e300}',
    "capacity_factor": '{"preset": "switch", "capacity": {"factor": 1.25}, "priority": "top1_score"}',
    "capacity_tokens_neg": '{"capacity": {"tokens": -3}}',
    "top_k_huge": '{"top_k": 18446744073709551615}',
    "top_k_float": '{"top_k": 2.0}',
    "scale_overflow": '{"scale": 1e999}',
    "unknown_key": '{"preset": "mixtral", "topk": 2}',
    "duplicate_keys": '{"top_k": 2, "top_k": 3, "combine": "softmax_selected"}',
    "groups_keep_gt_count": '{"groups": {"count": 2, "keep": 3}}',
    "groups_zero": '{"groups": {"count": 0, "keep": 0}, "renormalize": false}',
    "output_scale_negzero": '{"output_scale": -0.0, "scoring": "logits"}',
    "array": '[1, 2, 3]',
    "deep_nesting": '{"groups": ' + "[" * 200 + "]" * 200 + "}",
    "not_utf8": b'{"preset": "\xff\xfe mixtral"}',
    "unicode_escape": '{"preset": "mixtr\\u0061l", "activation": "geglu"}',
}


def config_seeds():
    for path in sorted(glob.glob(os.path.join(FIXTURES, "*.config.json"))):
        name = os.path.basename(path)[: -len(".config.json")]
        shutil.copyfile(path, os.path.join(CORPUS, "config_json", "seed-" + name + ".json"))
    for name, text in CONFIG_EDGE.items():
        write("config_json", name + ".json", text if isinstance(text, bytes) else text.encode())


# Value encoding of routing.rs: tag 0..15 special, 16..31 + 8 raw bytes, 32..35 + 1 byte
# (NaN payload), otherwise (tag - 144) / 8.
def v_small(x):
    return bytes([int(x * 8) + 144])


def v_raw(x):
    return bytes([16]) + struct.pack("<d", x)


NAN, INF, NINF = bytes([0]), bytes([1]), bytes([2])


def routing(t, e, flags=0, k=2, g=0, c=0, cv=b"\x90", ec=0, ecv=b"\x90", s=0, scale=b"",
            bias=None, logits=b""):
    out = bytes([t, e, flags, k, g, c]) + cv + bytes([ec]) + ecv + bytes([s]) + scale
    if bias is None:
        out += b"\x00"
    else:
        out += b"\x01" + b"".join(bias)
    return out + logits


def routing_seeds():
    rng = random.Random(2)

    def logits(n, f=v_small, lo=-2, hi=2):
        return b"".join(f(rng.uniform(lo, hi)) for _ in range(n))

    seeds = {
        # Mixtral: softmax top-2, renormalise.
        "mixtral_t4_e8": routing(4, 8, flags=0x08, k=2, logits=logits(32)),
        # DeepSeek: sigmoid, 4 groups keep 2, top-4, bias, scale 2.5.
        "deepseek_t3_e16": routing(3, 16, flags=0x09, k=4, g=0x24, s=2,
                                   bias=[v_small(rng.uniform(-0.5, 0.5)) for _ in range(16)],
                                   logits=logits(48)),
        # GPT-OSS: logits, softmax over picks.
        "gptoss_t2_e8": routing(2, 8, flags=0x06, k=4, logits=logits(16, v_raw, -10, 10)),
        # Switch: capacity 1 token (c % 5 == 2, (c >> 3) - 2 == 1), top-1 priority.
        "switch_cap_tokens": routing(6, 4, flags=0x10, k=1, c=27, logits=logits(24)),
        # Capacity fraction 0.5 and factor 1.25.
        "cap_fraction": routing(8, 4, flags=0x08, k=2, c=3, cv=v_small(0.5), logits=logits(32)),
        "cap_factor": routing(5, 6, flags=0x18, k=2, c=4, cv=v_raw(1.25), logits=logits(30)),
        # Expert choice, capacity factor 1.
        "expert_choice": routing(4, 4, flags=0x00, k=1, ec=3, ecv=v_small(1.0), logits=logits(16)),
        # Ties everywhere, NaN / inf logits, custom scale.
        "ties": routing(4, 8, flags=0x08, k=3, logits=v_small(0.0) * 32),
        "nan_inf": routing(3, 4, flags=0x0b, k=2, c=3, cv=v_small(0.5), s=3, scale=v_raw(-1.5),
                           logits=(NAN + INF + NINF + bytes([3]) + bytes([8, 9, 5, 6])
                                   + bytes([32, 7]) + bytes([12, 13, 14]))),
        "e64_t16": routing(16, 64, flags=0x01, k=8, g=0x48, logits=logits(1024)),
        "zero_tokens": routing(0, 8, k=2),
        "invalid_k": routing(2, 4, k=9, logits=logits(8)),
        # Regression: T=2, E=2, k=2, logits scoring, renormalise, capacity 1 token; token 0's
        # logits are [NaN, NaN]: its kept weight is NaN and its dropped one must still be 0.
        "nan_dropped_weight": routing(2, 2, flags=0x08, k=2, c=27,
                                      logits=NAN + NAN + v_small(0.0) + v_small(1.0)),
    }
    for name, data in seeds.items():
        write("routing", name, data)


def main():
    for t in ("safetensors_layer", "config_json", "routing"):
        d = os.path.join(CORPUS, t)
        os.makedirs(d, exist_ok=True)
        for p in glob.glob(os.path.join(d, "seed-*")):
            os.remove(p)
    safetensors_seeds()
    quant_seeds()
    config_seeds()
    routing_seeds()


if __name__ == "__main__":
    main()
