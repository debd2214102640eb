#!/usr/bin/env python3
"""Reproduces every number of docs/SCALING.md from the assumptions stated there.

Run: python3 scripts/scaling.py  (no dependencies). Prints the markdown tables.
"""
import random
from math import comb

GB = 1e9

# Model shapes (config.json of each model; per MoE layer).
MODELS = {
    "DeepSeek-V3": dict(H=7168, E=256, k=8, F=2048, Fs=2048, layers=58, groups=8, keep=4),
    "Mixtral 8x7B": dict(H=4096, E=8, k=2, F=14336, Fs=0, layers=32, groups=None, keep=None),
}
EPS = [8, 16, 64, 256]
GPUS_PER_NODE = 8

# Published bandwidths, GB/s per GPU (dispatch, combine).
# DeepEP V1 (docs/legacy.md), H800 + CX7 400 Gb/s, FP8 dispatch / BF16 combine.
DEEPEP_NORMAL = {8: (153, 158), 16: (43, 43), 32: (58, 57), 64: (51, 50)}
DEEPEP_LL = {8: (98, 127), 16: (63, 74), 32: (48, 53), 64: (43, 46), 128: (39, 39), 256: (39, 40)}
# NCCL EP (contrib/nccl_ep/README.md, NCCL 2.29u1), H100, LL, BF16 dispatch and combine.
NCCL_EP_LL = {8: (224.3, 185.2), 16: (76.7, 73.0), 32: (53.6, 50.0), 64: (48.8, 43.8)}

# Our measured rates (docs/PERF.md, run 3, H100, CUDA, bf16 weights).
OURS_TFLOPS = {"DeepSeek-V3": 3.25e12 / 22.0e-3, "Mixtral 8x7B": 2.89e12 / 13.2e-3}
OURS_WEIGHT_BW = 705e6 / 647e-6  # Mixtral T = 1: weights streamed per second
CUBLAS_TFLOPS = 722e12
COPY_BW = 3002e9  # the copy ceiling PERF.md's floors use for weight reads


def row_bytes(H, fmt):
    # bf16: 2 bytes per element; FP8 (DeepEP): 1 byte + one f32 scale per 128 channels.
    return 2 * H if fmt == "bf16" else H + 4 * (H // 128)


def distinct_ranks(m, N):
    """Expected distinct ranks among a token's k picks, uniform without replacement over the
    eligible experts (DeepSeek-V3: the 4 kept groups of 32; Mixtral: all 8)."""
    H, E, k = m["H"], m["E"], m["k"]
    per_rank = E / N
    if m["groups"]:
        eligible = E * m["keep"] // m["groups"]
    else:
        eligible = E
    if per_rank >= 1:
        ranks = eligible / per_rank
        per = int(per_rank)
        return ranks * (1 - comb(eligible - per, k) / comb(eligible, k))
    return k  # more ranks than experts: each pick on its own rank


def simulate(m, N, samples=20000, seed=17):
    """Monte Carlo of a token's picks under uniform routing (DeepSeek-V3: 4 of 8 groups
    uniformly, then k of their experts uniformly; Mixtral: k of E uniformly), home rank
    uniform over the N ranks. Returns the expected (distinct remote ranks, distinct remote
    nodes) the token's picks land on; ranks hold contiguous expert ranges, 8 ranks a node."""
    rng = random.Random(seed)
    E, k = m["E"], m["k"]
    holders = min(N, E)
    per = E // holders
    gsize = E // m["groups"] if m["groups"] else E
    tot_r = tot_n = 0
    for _ in range(samples):
        if m["groups"]:
            gs = rng.sample(range(m["groups"]), m["keep"])
            eligible = [g * gsize + i for g in gs for i in range(gsize)]
        else:
            eligible = list(range(E))
        picks = rng.sample(eligible, k)
        home = rng.randrange(N)
        ranks = {p // per for p in picks}
        nodes = {r // GPUS_PER_NODE for r in ranks}
        tot_r += len(ranks - {home})
        tot_n += len(nodes - {home // GPUS_PER_NODE})
    return tot_r / samples, tot_n / samples


def expert_ranks(m, N):
    return min(N, m["E"])


def main():
    print("## Bytes per token per layer (one direction; the combine returns as many rows)\n")
    print("| model | EP | rows ours (k), remote | distinct remote ranks | distinct remote nodes | dispatch bf16 ours | dispatch FP8 ours | combine bf16 ours | dedup dispatch FP8 (per rank / per node) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in MODELS.items():
        for N in EPS:
            k, H = m["k"], m["H"]
            holders = expert_ranks(m, N)
            remote = k * (holders - 1) / holders if N <= m["E"] else k * (1 - holders / N / holders)
            dr, dn = simulate(m, N)
            rb, rf = row_bytes(H, "bf16"), row_bytes(H, "fp8")
            nodes = "—" if N <= GPUS_PER_NODE else f"{dn*rf/1024:.0f} KiB"
            print(f"| {name} | {N} | {k}, {remote:.2f} | {dr:.2f} | {dn:.2f} "
                  f"| {remote*rb/1024:.0f} KiB | {remote*rf/1024:.0f} KiB | {remote*rb/1024:.0f} KiB "
                  f"| {dr*rf/1024:.0f} KiB / {nodes} |")
    print()

    print("## Memory per rank (one MoE layer; x layers for the model)\n")
    print("| model | EP | experts/rank | routed, bf16 | routed, FP8 | shared+router | x layers, FP8 routed | recv rows (T_local=4096, balanced / worst case), bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in MODELS.items():
        H, E, F, Fs, k, L = m["H"], m["E"], m["F"], m["Fs"], m["k"], m["layers"]
        per_expert = 3 * H * F
        for N in EPS:
            epr = E / N if N <= E else (1 if N <= E else 0)
            held = E / N if N <= E else 1  # ranks 0..E-1 hold one, the rest none
            bf16 = held * per_expert * 2
            fp8 = held * per_expert * (1 + 4 / 16384)
            shared = 3 * H * Fs * 2 + E * H * 4
            rows_bal = 4096 * k * (N / min(N, E))  # expert ranks receive everything when N > E
            rows_worst = N * 4096 * k
            label = f"{E/N:g}" if N <= E else f"1 on {E} ranks, 0 on {N-E}"
            print(f"| {name} | {N} | {label} | {bf16/GB:.2f} GB | {fp8/GB:.2f} GB | {shared/1e6:.1f} MB "
                  f"| {fp8*L/GB:.1f} GB | {rows_bal*2*H/GB:.2f} / {rows_worst*2*H/GB:.1f} GB |")
    print()

    for phase, T in [("decode", 128), ("prefill", 4096)]:
        print(f"## Time per layer, {phase}: {T} tokens per rank\n")
        if phase == "decode":
            print("| model | EP | exchange, DeepEP LL (FP8 / bf16) | exchange, NCCL EP LL (bf16 / bf16) | expert GEMM, ours | expert GEMM at cuBLAS / copy rate | dominant: ours / at peer rate |")
        else:
            print("| model | EP | exchange, k rows at DeepEP normal bw | exchange, DeepEP dedup (per node / NVLink GPU) | expert GEMM, ours | expert GEMM at cuBLAS / copy rate | dominant: ours / at peer rate |")
        print("|---|---|---|---|---|---|---|")
        for name, m in MODELS.items():
            H, E, F, Fs, k = m["H"], m["E"], m["F"], m["Fs"], m["k"]
            for N in EPS:
                holders = min(N, E)
                rows = T * k  # rows a rank sends (all k copies)
                fp8, bf = row_bytes(H, "fp8"), row_bytes(H, "bf16")
                us = lambda v: "n/p" if v is None else f"{v*1e6:,.0f} us"
                if phase == "decode":
                    bw = DEEPEP_LL[N]
                    a = rows * fp8 / (bw[0] * GB) + rows * bf / (bw[1] * GB)
                    nb = NCCL_EP_LL.get(N)
                    b = rows * bf / (nb[0] * GB) + rows * bf / (nb[1] * GB) if nb else None
                else:
                    bw = DEEPEP_NORMAL[min(N, 64)]
                    a = rows * fp8 / (bw[0] * GB) + rows * bf / (bw[1] * GB)
                    dr, dn = simulate(m, N)
                    per = dn if N > GPUS_PER_NODE else dr
                    b = T * per * (fp8 / (bw[0] * GB) + bf / (bw[1] * GB))
                comm = a  # what this crate's design sends: k rows each way
                # Expert ranks, balanced: each receives T·k·N/holders rows.
                recv = T * k * N / holders
                flops = recv * 2 * 3 * H * F + T * 2 * 3 * H * Fs
                wbytes = (E / holders) * 3 * H * F * 2 + 3 * H * Fs * 2
                ours = max(flops / OURS_TFLOPS[name], wbytes / OURS_WEIGHT_BW)
                ceil = max(flops / CUBLAS_TFLOPS, wbytes / COPY_BW)
                dom = lambda g: ("GEMM" if g > comm else "exchange") + f" {max(g, comm)/min(g, comm):.1f}x"
                print(f"| {name} | {N} | {us(a)} | {us(b)} | {us(ours)} | {us(ceil)} | {dom(ours)} / {dom(ceil)} |")
        print()


if __name__ == "__main__":
    main()
