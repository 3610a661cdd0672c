#!/usr/bin/env python3
"""Same-run torch anchors for the attention benchmarks (Qwen3-30B-A3B: 32 query heads, 4 KV heads, head_dim 128).

Measures torch.nn.functional.scaled_dot_product_attention on the same GPU: decode (1 and 4 query tokens against a
4K/16K/64K cache, enable_gqa=True) and causal prefill (4K, 16K, enable_gqa=True, is_causal=True), with CUDA events,
warm-up, median, inputs rotated past L2. Then reads the RESULT lines of our bench (`bench_attention`'s log, path as
argument or $OUT/bench_attention.log) and prints one table with the ratios and the floors.
Usage: python3 attention.py [bench_attention.log]
"""
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

NH, NKV, D = 32, 4, 128
dev = torch.device("cuda")


def median_ms(fn, iters, sets, reps=1):
    """Median per-call time over `iters` samples of `reps` back-to-back calls between two events."""
    for i in range(5):
        fn(i % sets)
    ts = []
    n = 0
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn(n % sets)
            n += 1
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / reps)
    ts.sort()
    return ts[len(ts) // 2]


def sets_for(nbytes):
    return max(2, min(16, math.ceil(160e6 / nbytes)))


def backend_of(q, k, v, causal):
    """Which SDPA backend accepts these inputs (flash, then efficient, then cudnn, then math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]:
        try:
            with sdpa_kernel([be]):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            torch.cuda.synchronize()
            return name
        except RuntimeError:
            continue
    return "?"


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    res = {}
    for ctx, tok in [(4096, 1), (16384, 1), (65536, 1), (65536, 4)]:
        nbytes = 2 * NKV * ctx * D * 2
        sets = sets_for(nbytes)
        ks = [torch.randn(1, NKV, ctx, D, device=dev, dtype=torch.bfloat16) for _ in range(sets)]
        vs = [torch.randn(1, NKV, ctx, D, device=dev, dtype=torch.bfloat16) for _ in range(sets)]
        q = torch.randn(1, NH, tok, D, device=dev, dtype=torch.bfloat16)
        # One query token at the end sees everything: not causal. Several: causal with the queries at the end
        # (SDPA's is_causal aligns top-left, so pass an explicit bottom-right mask).
        mask = None
        if tok > 1:
            i = torch.arange(tok, device=dev)[:, None] + (ctx - tok)
            j = torch.arange(ctx, device=dev)[None, :]
            mask = (j <= i)[None, None]
        be = backend_of(q, ks[0], vs[0], False) if mask is None else "mask"
        call = lambda i: F.scaled_dot_product_attention(q, ks[i], vs[i], attn_mask=mask, enable_gqa=True)
        iso = median_ms(call, 50, sets)
        ms = median_ms(call, 20, sets, reps=20)
        res[("decode", ctx, tok)] = (ms * 1e3, be, iso * 1e3)
        print(f"TORCH decode ctx={ctx} tokens={tok} {ms * 1e3:.2f} us pipelined, {iso * 1e3:.2f} us isolated ({be})")
        del ks, vs
    for t in [4096, 16384]:
        q = [torch.randn(1, NH, t, D, device=dev, dtype=torch.bfloat16) for _ in range(2)]
        k = [torch.randn(1, NKV, t, D, device=dev, dtype=torch.bfloat16) for _ in range(2)]
        v = [torch.randn(1, NKV, t, D, device=dev, dtype=torch.bfloat16) for _ in range(2)]
        be = backend_of(q[0], k[0], v[0], True)
        ms = median_ms(lambda i: F.scaled_dot_product_attention(q[i], k[i], v[i], is_causal=True, enable_gqa=True),
                       10 if t > 8192 else 30, 2)
        flops = 4.0 * D * NH * t * (t + 1) / 2
        res[("prefill", t)] = (ms * 1e3, be, flops / ms / 1e9)
        print(f"TORCH prefill T={t} {ms * 1e3:.1f} us {flops / ms / 1e9:.1f} TFLOP/s ({be})")
        del q, k, v

    log = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "bench_attention.log")
    ours = {}
    copy = None
    try:
        for line in open(log):
            m = re.match(r"RESULT copy \S+ ([\d.]+) ([\d.]+)", line)
            if m:
                copy = float(m.group(2))
            m = re.match(r"RESULT decode ctx=(\d+) tokens=(\d+) ([\d.]+) ([\d.]+) floor_us=([\d.]+) splits=(\d+)"
                         r" iso_us=([\d.]+)", line)
            if m:
                ours[("decode", int(m.group(1)), int(m.group(2)))] = (float(m.group(3)), float(m.group(4)),
                                                                      float(m.group(5)), float(m.group(7)))
            m = re.match(r"RESULT (prefill) T=(\d+) ([\d.]+) ([\d.]+)", line)
            if m:
                ours[(m.group(1), int(m.group(2)))] = (float(m.group(3)), float(m.group(4)))
            if line.startswith("RESULT decode_split"):
                print(line.strip())
    except OSError as e:
        print(f"no bench log ({e}): torch numbers only")
    print()
    print(f"copy bandwidth (same run, bench_attention): {copy} GB/s")
    print("decode: per call, 20 calls back to back between events (isolated single calls in brackets)")
    print(f"{'case':<26} {'ours us':>10} {'torch us':>10} {'speedup':>8} {'floor us':>9} {'ours/floor':>10}  goal")
    for key in [("decode", 4096, 1), ("decode", 16384, 1), ("decode", 65536, 1), ("decode", 65536, 4)]:
        tu, be, tiso = res[key]
        if key in ours:
            ou, _, fl, oiso = ours[key]
            goal = ">=1.4x" if key == ("decode", 65536, 1) else ""
            print(f"decode ctx={key[1]} T={key[2]:<6} {ou:>10.2f} {tu:>10.2f} {tu / ou:>7.2f}x {fl:>9.2f} "
                  f"{ou / fl:>9.2f}x  {goal} [isolated: ours {oiso:.1f}, torch {tiso:.1f}: {tiso / oiso:.2f}x] "
                  f"(torch: {be})")
    peak = 989.0  # H100 SXM dense bf16 (wgmma); mma.sync reaches about 60% of it
    for t in [4096, 16384]:
        tu, be, ttf = res[("prefill", t)]
        if ("prefill", t) in ours:
            ou, otf = ours[("prefill", t)]
            flops = 4.0 * D * NH * t * (t + 1) / 2
            print(f"prefill T={t:<15} {ou:>10.1f} {tu:>10.1f} {tu / ou:>7.2f}x  ours {otf:.1f} TFLOP/s, torch "
                  f"{ttf:.1f} TFLOP/s, ratio {otf / ttf:.2f} (goal >=0.5); flops floor at {peak:.0f} TFLOP/s: "
                  f"{flops / peak / 1e6:.1f} us (torch: {be})")


if __name__ == "__main__":
    main()
