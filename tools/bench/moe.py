#!/usr/bin/env python3
"""Eager-PyTorch anchors for benches/moe.rs (same GPU, same run): the Qwen3-30B-A3B MoE layer at decode batch 1 and
the router top-8 of 128 for 1 and 4096 tokens.

- Router: logits = F.linear(x, W) (bf16), softmax in f32, topk(8), renormalised (norm_topk_prob), as transformers'
  Qwen3MoeSparseMoeBlock does it.
- MoE decode: the same router, then the transformers-style eager expert loop over the 8 chosen experts with
  bf16-DEQUANTIZED weights (W_fp8 * weight_scale_inv per 128x128 block, done once up front): per expert
  down(silu(gate(x)) * up(x)) * weight, summed. torch._scaled_mm does not take 128x128 block scales, so the FP8
  form is not used here; the bf16 weights are 2x the FP8 bytes (75.5 MB per token), so a bf16 floor is printed too.
Device events, warm-up, median; router weights rotate over 128 sets (64 MB) and expert weights over 2 sets of 128
experts (2.4 GB bf16) so that L2 does not serve repeated weights.
"""
import torch
import torch.nn.functional as F

H, E, K, I = 2048, 128, 8, 768
dev = "cuda"
torch.manual_seed(0)


def median_us(fn, iters=200, warm=5):
    for i in range(warm):
        fn(i)
    ts = []
    for i in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    # Copy anchor, as the Rust bench measures it (bytes read + written).
    n = 128 << 20
    src = torch.ones(n, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    us = median_us(lambda i: dst.copy_(src), iters=30)
    copy_gbs = 2 * n * 2 / us / 1e3
    del src, dst
    print(f"torch copy 256 MiB: {us:.2f} us, {copy_gbs:.0f} GB/s")

    RS = 128
    rws = [torch.empty(E, H, dtype=torch.bfloat16, device=dev).uniform_(-0.05, 0.05) for _ in range(RS)]
    xs = [torch.empty(4096, H, dtype=torch.bfloat16, device=dev).uniform_(-2, 2) for _ in range(16)]

    def router(x, w):
        logits = F.linear(x, w)
        p = F.softmax(logits, dim=-1, dtype=torch.float)
        wt, ids = torch.topk(p, K, dim=-1)
        wt = wt / wt.sum(dim=-1, keepdim=True)
        return wt, ids

    res = {}
    for t in (1, 4096):
        us = median_us(lambda i: router(xs[i % 16][:t], rws[i % RS]))
        res[f"router{t}"] = us
        print(f"torch router softmax+topk T={t}: {us:.2f} us")

    # Expert weights: FP8 codes + block scales, dequantized to bf16 once (2 sets).
    def dequant(shape):
        q = (torch.rand(E, *shape, device=dev) * 896 - 448).to(torch.float8_e4m3fn)
        s = torch.rand(E, shape[0] // 128, shape[1] // 128, device=dev) * 1e-3 + 0.5e-3
        s = s.repeat_interleave(128, 1).repeat_interleave(128, 2)
        return (q.float() * s).to(torch.bfloat16)

    sets = []
    for _ in range(2):
        sets.append((dequant((I, H)), dequant((I, H)), dequant((H, I))))
        torch.cuda.empty_cache()

    def moe_decode(i):
        x = xs[i % 16][:1]
        wg, wu, wd = sets[i % 2]
        wt, ids = router(x, rws[i % RS])
        y = torch.zeros_like(x)
        for e, w in zip(ids[0].tolist(), wt[0].tolist()):
            h = F.silu(F.linear(x, wg[e])) * F.linear(x, wu[e])
            y += F.linear(h, wd[e]) * w
        return y

    us = median_us(moe_decode, iters=200)
    bf16_bytes = K * 3 * H * I * 2
    print(f"torch eager MoE decode T=1 (bf16-dequantized weights): {us:.2f} us "
          f"({bf16_bytes / us / 1e3:.0f} GB/s of bf16 weights; bf16 floor {bf16_bytes / copy_gbs / 1e3:.2f} us, "
          f"FP8 floor {bf16_bytes / 2 / copy_gbs / 1e3:.2f} us)")
    res["moe1"] = us
    print("TORCH_ANCHORS " + " ".join(f"{k}={v:.2f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
