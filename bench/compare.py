#!/usr/bin/env python3
"""Ours (`moe bench --json`) against the PyTorch peers (bench/peers.py), point by point.

  python3 bench/compare.py OURS.jsonl PEERS.jsonl [--markdown]

Both files hold one JSON object per line (other lines are skipped, so a captured log works;
`NaN` from `moe bench` counts as missing). Points are matched on (shape, tokens); each of our
backends gets its own table. Ratios are peer_time / our_time, so > 1 means ours is faster:

  router       vs torch F.linear (f32)           peer_us / our_us
  gate         vs softmax_topk (HF gate)          peer_us / our_us
  permute      vs sort_gather                     peer_us / our_us
  expert_gemm  vs dense torch.matmul (cuBLAS)     dense_us / our_us at equal FLOPs: the
                                                  fraction of the cuBLAS ceiling we reach
  expert_gemm  vs torch._grouped_mm               peer_us / our_us
  layer        vs HF eager loop                   peer_us / our_us
  weights GB/s vs copy_gbs                        gemm_weight_gbs / copy_gbs: the fraction of
                                                  the copy bandwidth our weight streaming gets
"""

import argparse
import json
import math
import sys


def load(path):
    rows = []
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def num(r, key):
    if r is None:
        return None
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
        return float(v)
    return None


def ratio(a, b):
    return a / b if a is not None and b is not None else None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ours", help="`moe bench --json` output")
    p.add_argument("peers", help="bench/peers.py --out output")
    p.add_argument("--markdown", action="store_true", help="Markdown tables (for docs/PERF.md)")
    args = p.parse_args(argv)

    ours = [r for r in load(args.ours) if "shape" in r and "tokens" in r]
    peers = {(r["shape"], int(r["tokens"])): r for r in load(args.peers) if "shape" in r and "tokens" in r}
    if not ours:
        sys.exit(f"compare.py: no `moe bench --json` rows in {args.ours}")
    if not peers:
        sys.exit(f"compare.py: no peer rows in {args.peers}")

    md = args.markdown
    matched = 0
    for o in ours:
        key = (o["shape"], int(o["tokens"]))
        pr = peers.get(key)
        title = f"{o['shape']} T={o['tokens']}: ours {o.get('backend', '?')} {o.get('dtype', '?')}"
        if pr is None:
            print(("### " if md else "== ") + title + " (no peer row)\n")
            continue
        title += f" | peers torch {pr.get('torch', '?')} on {pr.get('device', '?')} {pr.get('dtype', '?')}"
        notes = []
        if pr.get("dtype") != o.get("dtype"):
            notes.append(f"dtypes differ: ours {o.get('dtype')}, peers {pr.get('dtype')}")
        if pr.get("shrink", 1) != 1:
            notes.append(f"peers ran with --shrink {pr['shrink']} (testing only): ratios are meaningless")
        if "skipped" in pr:
            notes.append(f"peers skipped: {pr['skipped']}")
        if pr.get("grouped_mm", "ok") != "ok":
            notes.append(f"grouped_mm {pr['grouped_mm']}")
        notes += [f"peer {n}" for n in pr.get("notes", [])]
        matched += 1

        g = num(o, "expert_gemm_us")
        rows = [
            # stage, ours, peer name, peer value, ratio, meaning
            ("router us", num(o, "router_us"), "F.linear f32", num(pr, "router_us"), None, "peer/ours"),
            ("gate us", num(o, "gate_us"), "softmax_topk " + pr.get("gate_peer", ""), num(pr, "gate_us"), None, "peer/ours"),
            ("permute us", num(o, "permute_us"), "sort_gather", num(pr, "permute_us"), None, "peer/ours"),
            ("expert_gemm us", g, "dense matmul (cuBLAS)", num(pr, "dense_gemm_us"), None, "of cuBLAS"),
            ("expert_gemm us", g, "grouped_mm", num(pr, "expert_gemm_us"), None, "peer/ours"),
            ("layer us", num(o, "layer_us"), "eager loop", num(pr, "layer_us"), None, "peer/ours"),
        ]
        rows = [(a, b, c, d, ratio(d, b), f) for a, b, c, d, _, f in rows]
        rows.append(("gemm TFLOP/s", num(o, "gemm_tflops"), "dense / grouped_mm", None, None, ""))
        dt, gt = num(pr, "dense_tflops"), num(pr, "gemm_tflops")
        peer_tf = f"{fmt(dt, '.2f')} / {fmt(gt, '.2f')}"
        cg = num(pr, "copy_gbs")
        wg = num(o, "gemm_weight_gbs")
        rows.append(("weights GB/s", wg, "D2D copy GB/s", cg, ratio(wg, cg), "of copy"))

        def cells(r):
            stage, ov, pname, pv, rt, meaning = r
            ovs = fmt(ov, ".2f" if "TFLOP" in stage else ".1f")
            pvs = peer_tf if stage == "gemm TFLOP/s" else fmt(pv, ".1f")
            rts = "" if stage == "gemm TFLOP/s" else fmt(rt, ".3f")
            return [stage, ovs, pname.strip(), pvs, rts, meaning]

        head = ["ours", "value", "peer", "value", "ratio", ""]
        body = [cells(r) for r in rows]
        if md:
            print(f"### {title}\n")
            print("| " + " | ".join(head) + " |")
            print("|" + "|".join(["---", "---:", "---", "---:", "---:", "---"]) + "|")
            for c in body:
                print("| " + " | ".join(c) + " |")
            for n in notes:
                print(f"\n*{n}*")
            print()
        else:
            w = [max(len(x) for x in col) for col in zip(head, *body)]
            print(f"== {title}")
            for c in [head] + body:
                print(
                    f"  {c[0]:<{w[0]}}  {c[1]:>{w[1]}}  {c[2]:<{w[2]}}  {c[3]:>{w[3]}}  {c[4]:>{w[4]}}  {c[5]}".rstrip()
                )
            for n in notes:
                print(f"  note: {n}")
            print()
    if not md:
        print("ratio = peer time / our time (> 1: ours faster); 'of cuBLAS' = dense_us / our expert_gemm_us at "
              "equal FLOPs; 'of copy' = our gemm_weight_gbs / copy_gbs")
    return 0 if matched else 1


if __name__ == "__main__":
    sys.exit(main())
