#!/usr/bin/env python3
"""PyTorch peers for `moe bench` (DESIGN.md section 6), measured in the same run as ours.

For each layer shape of src/bench.rs and each token count T, times (CUDA events, median of
`--iters` after `--warmup`, on the GPU; time.perf_counter on `--device cpu`):

  copy_gbs        a large device-to-device copy, (read + written bytes) / time: the
                  bandwidth ceiling (measured once per run, repeated in every row)
  router_us       F.linear on f32 x and f32 router weights (peer of our router stage)
  gate_us         softmax_topk: the Hugging Face gate on [T, E] f32 logits: softmax + topk
                  (+ renormalise) for mixtral / qwen3 / gpt4, topk + softmax over the picks
                  for gpt_oss, sigmoid + correction bias + group top-2 sum + group topk +
                  masked topk + renormalise x 2.5 for deepseek_v3
  permute_us      sort_gather: stable torch.sort of the T*k expert ids + index_select of the
                  f32 x rows (ours keeps x in f32 too)
  dense_gemm_us   torch.matmul at the FLOPs of our expert_gemm stage: [T*k, H] x [H, 2F] and
  dense_tflops    [T*k, F] x [F, H] (plus [T, H] x [H, 2Fs], [T, Fs] x [Fs, H] for the shared
                  expert, which our expert_gemm stage includes): the cuBLAS ceiling
  expert_gemm_us  grouped_mm: torch._grouped_mm on rows sorted by expert with uniform routing,
  gemm_tflops     both grouped GEMMs + the activation between them (+ the shared expert as
  gemm_weight_gbs dense matmuls), "unavailable: ..." in `grouped_mm` if it cannot run
  layer_us        eager_loop: the whole Hugging Face style layer (router, gate, one_hot mask,
                  loop over the experts that got tokens: index_select, per-expert matmuls +
                  activation, index_add_; + shared expert)

Writes one JSON object per (shape, T) per line to --out (the layout of `moe bench --json`,
with "backend": "torch"); bench/compare.py reads both. A point that would not fit in device
memory, or that hits an out-of-memory error, is recorded as skipped and the run goes on.

  python3 bench/peers.py --out peers.json [--shapes mixtral,deepseek_v3,qwen3_30b_a3b]
      [--tokens 1,64,4096] [--dtype bf16] [--quick] [--device cuda|cpu]
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

# The shapes of src/bench.rs (same names, same sizes) and their Hugging Face gates.
SHAPES = {
    "mixtral": dict(E=8, k=2, H=4096, F=14336, Fs=0, gate="softmax", act="silu"),
    "deepseek_v3": dict(
        E=256, k=8, H=7168, F=2048, Fs=2048, gate="deepseek", groups=8, keep=4, scale=2.5, act="silu"
    ),
    "qwen3_30b_a3b": dict(E=128, k=8, H=2048, F=768, Fs=0, gate="softmax", act="silu"),
    "gpt_oss_120b": dict(E=128, k=4, H=2880, F=2880, Fs=0, gate="softmax_selected", act="clamped_swiglu"),
    "gpt4": dict(E=16, k=2, H=4096, F=14336, Fs=0, gate="softmax", act="silu"),
}

GATE_PEER = {
    "softmax": "softmax+topk+renorm",
    "softmax_selected": "topk+softmax(selected)",
    "deepseek": "sigmoid+bias+group_top2_sum+group_topk+topk+renorm*2.5",
}

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "fp16": torch.float16, "f32": torch.float32}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Timer:
    """Median time in microseconds of `fn()` over `iters` calls after `warmup` calls."""

    def __init__(self, device, warmup, iters, flush_l2=False):
        self.cuda = device.type == "cuda"
        self.warmup, self.iters = warmup, max(1, iters)
        self.flush = None
        if self.cuda and flush_l2:
            self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)

    def __call__(self, fn):
        for _ in range(self.warmup):
            fn()
        times = []
        if self.cuda:
            torch.cuda.synchronize()
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.iters)]
            for s, e in ev:
                if self.flush is not None:
                    self.flush.zero_()
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) * 1e3 for s, e in ev]
        else:
            for _ in range(self.iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        times.sort()
        return times[len(times) // 2]  # the same median as src/bench.rs


def free_bytes(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def release(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def is_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def short(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:200]


def rand(shape, dtype, device, std=1.0, gen=None):
    """Random normal values (never zeros) times `std`, generated on the device."""
    t = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    if std != 1.0:
        t.mul_(std)
    return t


# ------------------------------------------------------------------------------ the pieces


def activation(s):
    if s["act"] == "clamped_swiglu":
        alpha, limit = 1.702, 7.0

        def act(h):
            g, u = h.chunk(2, dim=-1)
            g = g.clamp(max=limit)
            u = u.clamp(min=-limit, max=limit)
            return (u + 1) * (g * torch.sigmoid(g * alpha))

        return act

    def act(h):
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u

    return act


def make_gate(s, bias):
    """The Hugging Face gate of shape `s` on f32 logits [T, E]: (weights f32 [T, k], ids [T, k])."""
    E, k = s["E"], s["k"]
    if s["gate"] == "softmax":

        def gate(logits):
            p = torch.softmax(logits, dim=-1, dtype=torch.float32)
            w, ids = torch.topk(p, k, dim=-1)
            w = w / w.sum(dim=-1, keepdim=True)
            return w, ids

    elif s["gate"] == "softmax_selected":

        def gate(logits):
            v, ids = torch.topk(logits, k, dim=-1)
            return torch.softmax(v, dim=-1, dtype=torch.float32), ids

    else:  # DeepseekV3TopkRouter
        G, keep, scale = s["groups"], s["keep"], s["scale"]

        def gate(logits):
            scores = logits.sigmoid()
            choice = scores + bias.unsqueeze(0)
            gs = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
            gidx = torch.topk(gs, k=keep, dim=-1, sorted=False)[1]
            gmask = torch.zeros_like(gs)
            gmask.scatter_(1, gidx, 1)
            smask = gmask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
            choice = choice.masked_fill(~smask.bool(), 0.0)
            ids = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
            w = scores.gather(1, ids)
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
            return w * scale, ids

    return gate


def uniform_counts(rows, E):
    """Rows per expert when `rows` assignments are spread evenly (T*k < E: one row each)."""
    base, rem = divmod(rows, E)
    counts = [base] * E
    # Spread the remainder over the experts rather than the first ones.
    for i in range(rem):
        counts[(i * E) // rem] += 1
    return counts


def grouped_mm(a, b, offs):
    return torch._grouped_mm(a, b, offs=offs)


# ------------------------------------------------------------------------------- one shape


class Layer:
    """Random weights of one shape, resident on the device."""

    def __init__(self, name, s, dtype, device, gen):
        self.name, self.s, self.dtype, self.device = name, s, dtype, device
        E, H, Fd, Fs = s["E"], s["H"], s["F"], s["Fs"]
        # nn.Linear layouts, as Hugging Face keeps them: gate and up stacked [E, 2F, H].
        self.w13 = rand((E, 2 * Fd, H), dtype, device, 1 / math.sqrt(H), gen)
        self.w2 = rand((E, H, Fd), dtype, device, 1 / math.sqrt(Fd), gen)
        if Fs:
            self.ws13 = rand((2 * Fs, H), dtype, device, 1 / math.sqrt(H), gen)
            self.ws2 = rand((H, Fs), dtype, device, 1 / math.sqrt(Fs), gen)
        else:
            self.ws13 = self.ws2 = None
        # Router: f32 as ours (DeepSeek's HF router is f32 too); HF Mixtral/Qwen3/GPT-OSS run it
        # in the model dtype, so the eager layer uses a copy in `dtype` for those.
        self.wr = rand((E, H), torch.float32, device, 1 / math.sqrt(H), gen)
        self.wr_model = self.wr if s["gate"] == "deepseek" else self.wr.to(dtype)
        self.router_bias = rand((E,), torch.float32, device, 0.1, gen) if s["gate"] == "softmax_selected" else None
        self.corr_bias = rand((E,), torch.float32, device, 0.01, gen) if s["gate"] == "deepseek" else None
        self.gate = make_gate(s, self.corr_bias)
        self.act = activation(s)

    @staticmethod
    def weight_bytes(s, dtype):
        esize = torch.empty((), dtype=dtype).element_size()
        return esize * 3 * s["H"] * (s["E"] * s["F"] + s["Fs"]) + 4 * s["E"] * s["H"] * 2

    @staticmethod
    def point_bytes(s, T, dtype):
        """A generous estimate of the activations one point allocates."""
        esize = torch.empty((), dtype=dtype).element_size()
        H, Fd, Fs, k, E = s["H"], s["F"], s["Fs"], s["k"], s["E"]
        rows = T * k
        gemm = rows * (2 * H + 6 * Fd) * esize + T * (2 * H + 6 * Fs) * esize
        permute = (T + rows) * H * 4
        gate = T * E * 4 * 8 + T * k * E * 8  # logits, temporaries, one_hot mask
        return int(1.5 * (gemm + permute + gate)) + (64 << 20)

    def shared(self, x):
        return F.linear(self.act(F.linear(x, self.ws13)), self.ws2)

    def eager(self, x):
        """The Hugging Face eager MoE block (MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock /
        DeepseekV3MoE / GptOssMLP), bf16 hidden states."""
        s = self.s
        E = s["E"]
        xr = x.float() if s["gate"] == "deepseek" else x
        logits = F.linear(xr, self.wr_model, self.router_bias.to(xr.dtype) if self.router_bias is not None else None)
        w, ids = self.gate(logits.float())
        w = w.to(x.dtype)
        y = torch.zeros_like(x)
        mask = F.one_hot(ids, num_classes=E).permute(2, 1, 0)  # [E, k, T]
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit.flatten().tolist():
            pos, tok = torch.where(mask[e])
            cur = x.index_select(0, tok)
            h = self.act(F.linear(cur, self.w13[e]))
            out = F.linear(h, self.w2[e]) * w[tok, pos, None]
            y.index_add_(0, tok, out.to(y.dtype))
        if self.ws13 is not None:
            y = y + self.shared(x)
        return y


def copy_bandwidth(device, timer, nbytes):
    src = torch.randint(1, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src))
    del src, dst
    release(device)
    return 2 * nbytes / (us * 1e-6) / 1e9


def run_point(L, T, timer, gen, res):
    s, dtype, device = L.s, L.dtype, L.device
    E, k, H, Fd, Fs = s["E"], s["k"], s["H"], s["F"], s["Fs"]
    rows = T * k
    flops = 2.0 * 3 * H * (rows * Fd + T * Fs)  # as src/bench.rs: 2 per multiply-add
    res["gemm_flops"] = flops
    esize = torch.empty((), dtype=dtype).element_size()
    notes = []

    def guarded(key, fn):
        try:
            return fn()
        except Exception as e:  # keep going: one failing peer must not lose the others
            if is_oom(e):
                notes.append(f"{key}: out of memory")
            else:
                notes.append(f"{key}: {short(e)}")
            release(device)
            return None

    x32 = rand((T, H), torch.float32, device, 1.0, gen)
    x = x32.to(dtype)

    # Router (f32, as ours).
    res["router_us"] = guarded("router", lambda: timer(lambda: F.linear(x32, L.wr, L.router_bias)))

    # Gate peer on f32 logits.
    logits = rand((T, E), torch.float32, device, 1.0, gen)
    res["gate_us"] = guarded("gate", lambda: timer(lambda: L.gate(logits)))
    ids = L.gate(logits)[1]

    # Permute peer: stable sort of the T*k ids + gather of the x rows (f32, as ours).
    flat = ids.flatten()

    def sort_gather():
        _, order = torch.sort(flat, stable=True)
        return x32.index_select(0, order // k)

    res["permute_us"] = guarded("permute", lambda: timer(sort_gather))
    del logits, flat

    # Dense ceiling at the FLOPs of our expert_gemm stage.
    a = rand((rows, H), dtype, device, 1.0, gen)
    af = rand((rows, Fd), dtype, device, 1.0, gen)
    b1, b2 = L.w13[0].t(), L.w2[0].t()  # [H, 2F], [F, H]
    if Fs:
        sf = rand((T, Fs), dtype, device, 1.0, gen)
        s1, s2 = L.ws13.t(), L.ws2.t()

    def dense():
        torch.matmul(a, b1)
        torch.matmul(af, b2)
        if Fs:
            torch.matmul(x, s1)
            torch.matmul(sf, s2)

    us = guarded("dense_matmul", lambda: timer(dense))
    res["dense_gemm_us"] = us
    res["dense_tflops"] = flops / (us * 1e-6) / 1e12 if us else None
    del af
    if Fs:
        del sf

    # torch._grouped_mm, rows sorted by expert, uniform routing.
    counts = uniform_counts(rows, E)
    used = sum(1 for c in counts if c > 0)
    res["gemm_weight_bytes"] = esize * 3.0 * H * (used * Fd + Fs)
    if not hasattr(torch, "_grouped_mm"):
        res["grouped_mm"] = "unavailable: torch._grouped_mm missing"
        res["expert_gemm_us"] = None
    else:
        offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
        g1, g2 = L.w13.transpose(1, 2), L.w2.transpose(1, 2)  # [E, H, 2F], [E, F, H]

        def grouped():
            h = L.act(grouped_mm(a, g1, offs))
            o = grouped_mm(h, g2, offs)
            if Fs:
                L.shared(x)
            return o

        try:
            grouped()  # availability probe (dtype, device capability, strides)
            us = timer(grouped)
            res["grouped_mm"] = "ok"
            res["expert_gemm_us"] = us
        except Exception as e:
            release(device)
            res["grouped_mm"] = ("unavailable: out of memory" if is_oom(e) else "unavailable: " + short(e))
            res["expert_gemm_us"] = None
    us = res["expert_gemm_us"]
    res["gemm_tflops"] = flops / (us * 1e-6) / 1e12 if us else None
    res["gemm_weight_gbs"] = res["gemm_weight_bytes"] / (us * 1e-6) / 1e9 if us else None
    del a

    # Hugging Face eager loop, whole layer.
    res["layer_us"] = guarded("eager_loop", lambda: timer(lambda: L.eager(x)))
    if notes:
        res["notes"] = notes
    del x, x32, ids
    release(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write one JSON object per (shape, T) per line here")
    p.add_argument("--shapes", default="mixtral,deepseek_v3,qwen3_30b_a3b", help=",".join(SHAPES))
    p.add_argument("--tokens", default="1,64,4096")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="1 warm-up, 5 timed iterations")
    p.add_argument("--iters", type=int, help="timed iterations (default 20, 5 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default 3, 1 with --quick)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--budget-s", type=float, default=150.0, help="skip the remaining points past this many seconds")
    p.add_argument("--copy-mib", type=int, default=None, help="copy size (default 1024 MiB on GPU, 64 on CPU)")
    p.add_argument("--flush-l2", action="store_true", help="overwrite 256 MiB before each timed call (GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shrink", type=int, default=1, help="divide H, F and Fs by this (testing only; recorded)")
    args = p.parse_args(argv)

    t_start = time.monotonic()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("peers.py: CUDA is not available (use --device cpu)")
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    for n in names:
        if n not in SHAPES:
            sys.exit(f"peers.py: unknown shape {n!r} (expected one of {', '.join(SHAPES)})")
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    dtype = DTYPES[args.dtype]
    dname = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}[dtype]
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    iters = args.iters if args.iters is not None else (5 if args.quick else 20)
    timer = Timer(device, warmup, iters, args.flush_l2)
    torch.backends.cuda.matmul.allow_tf32 = False  # f32 router exactly f32, like ours
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)

    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        gpu = "cpu: " + line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        gpu += f" ({torch.get_num_threads()} threads)"
    common = dict(dtype=dname, backend="torch", device=gpu, torch=torch.__version__)
    log(f"peers.py: torch {torch.__version__} on {gpu}; {dname}; median of {iters} after {warmup} warm-up")

    copy_mib = args.copy_mib or (1024 if device.type == "cuda" else 64)
    try:
        copy_gbs = copy_bandwidth(device, timer, copy_mib << 20)
    except Exception as e:
        log(f"copy: {short(e)}")
        copy_gbs = None
    log(f"copy ({copy_mib} MiB, read + write): {copy_gbs and round(copy_gbs, 1)} GB/s")

    rows = []
    out = open(args.out, "w") if args.out else None

    def emit(r):
        r = {key: (round(v, 3) if isinstance(v, float) else v) for key, v in r.items()}
        rows.append(r)
        line = json.dumps(r)
        if out:
            out.write(line + "\n")
            out.flush()
        else:
            print(line, flush=True)

    for name in names:
        s = dict(SHAPES[name])
        if args.shrink > 1:
            for key in ("H", "F", "Fs"):
                s[key] = max(16, s[key] // args.shrink // 8 * 8) if s[key] else 0
        base = lambda T: dict(shape=name, tokens=T, **common, copy_gbs=copy_gbs, gate_peer=GATE_PEER[s["gate"]])
        if args.shrink > 1:
            base = (lambda b: lambda T: dict(b(T), shrink=args.shrink, H=s["H"], F=s["F"], Fs=s["Fs"]))(base)
        if time.monotonic() - t_start > args.budget_s:
            for T in tokens:
                emit(dict(base(T), skipped=f"time budget ({args.budget_s:.0f} s) spent"))
            continue
        need = Layer.weight_bytes(s, dtype) + Layer.point_bytes(s, min(tokens), dtype)
        have = free_bytes(device)
        if need > 0.92 * have:
            for T in tokens:
                emit(dict(base(T), skipped=f"weights need {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB free"))
            continue
        t0 = time.monotonic()
        try:
            L = Layer(name, s, dtype, device, gen)
        except Exception as e:
            release(device)
            for T in tokens:
                emit(dict(base(T), skipped="weights: " + ("out of memory" if is_oom(e) else short(e))))
            continue
        log(f"{name}: weights {Layer.weight_bytes(s, dtype) / 2**30:.2f} GiB in {time.monotonic() - t0:.1f} s")
        for T in tokens:
            r = base(T)
            if time.monotonic() - t_start > args.budget_s:
                emit(dict(r, skipped=f"time budget ({args.budget_s:.0f} s) spent"))
                continue
            need = Layer.point_bytes(s, T, dtype)
            have = free_bytes(device)
            if need > 0.92 * have:
                emit(dict(r, skipped=f"activations need {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB free"))
                continue
            t0 = time.monotonic()
            try:
                run_point(L, T, timer, gen, r)
            except Exception as e:
                release(device)
                r["skipped"] = "out of memory" if is_oom(e) else short(e)
            r["wall_s"] = round(time.monotonic() - t0, 2)
            emit(r)
            log(f"{name} T={T}: {r['wall_s']} s" + (f" ({r['skipped']})" if "skipped" in r else ""))
        del L
        release(device)
    if out:
        out.close()

    # The short table.
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    print(f"\nPyTorch peers: torch {torch.__version__} on {gpu}, {dname}, median of {iters} after {warmup} warm-up")
    print(f"copy (D2D, read + write): {f(copy_gbs)} GB/s")
    hdr = f"{'shape':<14} {'T':>5} {'router':>8} {'gate':>8} {'permute':>8} {'dense':>9} {'TFLOP/s':>7} {'grouped':>9} {'TFLOP/s':>7} {'wGB/s':>6} {'eager':>10}"
    print(hdr)
    print(f"{'':<14} {'':>5} {'(us)':>8} {'(us)':>8} {'(us)':>8} {'(us)':>9} {'':>7} {'(us)':>9} {'':>7} {'':>6} {'(us)':>10}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['shape']:<14} {r['tokens']:>5} skipped: {r['skipped']}")
            continue
        print(
            f"{r['shape']:<14} {r['tokens']:>5} {f(r.get('router_us')):>8} {f(r.get('gate_us')):>8} "
            f"{f(r.get('permute_us')):>8} {f(r.get('dense_gemm_us')):>9} {f(r.get('dense_tflops'), '{:.2f}'):>7} "
            f"{f(r.get('expert_gemm_us')):>9} {f(r.get('gemm_tflops'), '{:.2f}'):>7} "
            f"{f(r.get('gemm_weight_gbs'), '{:.0f}'):>6} {f(r.get('layer_us')):>10}"
        )
        if r.get("grouped_mm", "ok") != "ok":
            print(f"{'':<20} grouped_mm {r['grouped_mm']}")
        for n in r.get("notes", []):
            print(f"{'':<20} {n}")
    print(f"total {time.monotonic() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
