#!/usr/bin/env python3
"""Judges the pages scripts/web-test.sh ran (stdlib only).

Every page must report status PASS (its own check against the f64 CPU reference in the same
wasm) on the wgpu backend, i.e. a WebGPU adapter, not the CPU fallback. A page that ran a
fixture of tests/fixtures/ is also held to the float64 outputs of Hugging Face transformers
stored next to it (NAME.expected.safetensors): y within rel L2 2e-5 (f32, DESIGN.md section 5),
top-k sets (`selected`) and kept assignments (`dispatch`) equal.

    web_check.py RESULTS.json FIXTURES_DIR
"""

import json
import math
import struct
import sys
from urllib.parse import parse_qs, urlparse


def read_safetensors(path):
    """{name: (dtype, shape, flat values)} for F64 / F32 / I32 tensors."""
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    fmt = {"F64": "d", "F32": "f", "I32": "i", "I64": "q"}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        code = fmt[meta["dtype"]]
        count = (b - a) // struct.calcsize(code)
        out[name] = (meta["dtype"], meta["shape"], struct.unpack(f"<{count}{code}", body[a:b]))
    return out


def rel_l2(got, want):
    if len(got) != len(want):
        return math.inf
    num = sum((float(g) - w) ** 2 for g, w in zip(got, want))
    den = sum(w * w for w in want)
    return math.sqrt(num / den) if den else math.sqrt(num)


def against_transformers(result, expected_path):
    """Problems of one fixture page's outputs against transformers' (empty when none)."""
    exp = read_safetensors(expected_path)
    _, (t, h), y = exp["y"]
    _, (_, e), selected = exp["selected"]
    _, _, dispatch = exp["dispatch"]
    problems = []
    slots = result.get("slots") or 0
    ids, kept = result.get("topk_ids", []), result.get("kept", [])
    if len(ids) != t * slots or len(kept) != t * slots:
        return [f"routing outputs have {len(ids)} ids for T = {t}, slots = {slots}"]
    sel = [0] * (t * e)
    dis = [0] * (t * e)
    for i, (x, k) in enumerate(zip(ids, kept)):
        tok = i // slots
        sel[tok * e + x] = 1
        if k:
            dis[tok * e + x] = 1
    if sel != list(selected):
        problems.append("top-k sets differ from transformers")
    if dis != list(dispatch):
        problems.append("kept assignments differ from transformers")
    err = rel_l2(result.get("y", []), y)
    if not err <= 2e-5:
        problems.append(f"y rel L2 {err:.3e} against transformers > 2e-5")
    result["rel_l2_transformers"] = err
    return problems


def main():
    results_path, fixtures = sys.argv[1], sys.argv[2]
    with open(results_path) as f:
        results = json.load(f)
    passed = failed = 0
    for r in results:
        problems = []
        if r.get("status") != "PASS":
            problems.append(f"status {r.get('status')}: {r.get('message')}")
        if r.get("backend") != "wgpu":
            problems.append(f"backend {r.get('backend')} (not WebGPU)")
        q = parse_qs(urlparse(r["url"]).query)
        name = "demo" + ("" if not q else " " + "&".join(f"{k}={v[0]}" for k, v in q.items()))
        if "weights" in q:
            name = q["weights"][0].rsplit("/", 1)[-1].removesuffix(".weights.safetensors")
            if r.get("status") == "PASS":
                problems += against_transformers(r, f"{fixtures}/{name}.expected.safetensors")
        extra = ""
        if "rel_l2_transformers" in r:
            extra = f", vs transformers {r['rel_l2_transformers']:.2e}"
        if problems:
            failed += 1
            print(f"FAIL {name}: " + "; ".join(problems))
            for line in r.get("console", [])[-20:]:
                print(f"    {line}")
        else:
            passed += 1
            print(f"ok   {name}: {r.get('message')}{extra} [{r.get('seconds')} s]")
    adapters = sorted({str(r.get("adapter")) for r in results})
    print(f"adapter: {', '.join(adapters)}")
    features = sorted({", ".join(r.get("features") or []) or "none" for r in results})
    print(f"device features in use: {'; '.join(features)}")
    print(f"web: {passed} passed, {failed} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
