#!/usr/bin/env python3
"""Same-run torch anchors for the gemm and head benchmarks (benches/gemm.rs, benches/head.rs).

torch._scaled_mm FP8 (e4m3 x e4m3 -> bf16) on the same shapes. It does not take our 128x128 / 1x128 block
scales (unless this torch supports blockwise scaling, tried first): we time it with rowwise scales (per-row of A,
per-column of B, f32), else per-tensor, and print which. M must be a multiple of 16 for _scaled_mm: decode rows
are padded to 16 (noted). Also bf16 torch.matmul / F.linear for reference, a 256 MiB copy (GB/s), lm_head
(151936 x 2048 bf16) GEMV, torch.argmax and a torch top-p sampler over 151936 logits.
CUDA events, warm-up, median of 50 (decode: weights rotated over > 64 MiB)."""
import statistics

import torch
import torch.nn.functional as F

dev = "cuda"
torch.manual_seed(0)
print("torch", torch.__version__, "device", torch.cuda.get_device_name(0))


def bench(fn, iters=50, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


rows = []
n = 256 << 20
src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=dev)
dst = torch.empty_like(src)
ms = bench(lambda: dst.copy_(src))
copy_gbs = 2 * n / ms / 1e6
rows.append(("copy 256 MiB", "", ms * 1e3, f"{copy_gbs:.1f} GB/s"))
del src, dst


def fp8(shape):
    return (torch.randn(shape, device=dev) * 4).to(torch.float8_e4m3fn)


def scaled_mm(a, b_t, m, n, mode):
    """a [m,k] row-major, b_t [n,k] row-major (so b = b_t.t() is column-major, as _scaled_mm wants)."""
    if mode == "rowwise":
        sa = torch.rand(m, 1, device=dev, dtype=torch.float32) + 0.5
        sb = torch.rand(1, n, device=dev, dtype=torch.float32) + 0.5
    else:
        sa = torch.tensor(1.0, device=dev)
        sb = torch.tensor(1.0, device=dev)
    return lambda: torch._scaled_mm(a, b_t.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def pick_mode(a, b_t, m, n):
    for mode in ("rowwise", "tensorwise"):
        try:
            scaled_mm(a, b_t, m, n, mode)()
            torch.cuda.synchronize()
            return mode
        except Exception as e:  # noqa: BLE001
            print(f"_scaled_mm {mode} not available: {str(e).splitlines()[0][:120]}")
    return None


for (m, nn, k) in [(4096, 2048, 2048), (4096, 4096, 2048)]:
    a, b_t = fp8((m, k)), fp8((nn, k))
    mode = pick_mode(a, b_t, m, nn)
    if mode:
        ms = bench(scaled_mm(a, b_t, m, nn, mode))
        rows.append((f"torch._scaled_mm fp8 ({mode})", f"{m}x{nn}x{k}", ms * 1e3, f"{2*m*nn*k/ms/1e9:.1f} TFLOP/s"))
    ab, wb = torch.randn(m, k, device=dev, dtype=torch.bfloat16), torch.randn(nn, k, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: F.linear(ab, wb))
    rows.append(("torch F.linear bf16 (cuBLAS)", f"{m}x{nn}x{k}", ms * 1e3, f"{2*m*nn*k/ms/1e9:.1f} TFLOP/s"))

# Decode shapes: weights rotated through ~96 MiB.
for (nn, k, what) in [(4096, 2048, "q_proj"), (768, 2048, "expert gate/up"), (2048, 768, "expert down")]:
    sets = max(1, (96 << 20) // (nn * k))
    ws = [fp8((nn, k)) for _ in range(sets)]
    for m in (1, 4):
        mp = 16  # _scaled_mm needs M % 16 == 0
        a = fp8((mp, k))
        mode = pick_mode(a, ws[0], mp, nn)
        if mode:
            it = iter(range(10**9))
            fns = [scaled_mm(a, w, mp, nn, mode) for w in ws]
            ms = bench(lambda: fns[next(it) % sets](), iters=200)
            gbs = (nn * k + mp * k + mp * nn * 2) / ms / 1e6
            rows.append((f"torch._scaled_mm fp8 {what} ({mode}, M padded to 16)", f"{m}x{nn}x{k}", ms * 1e3,
                         f"{gbs:.1f} GB/s ({gbs/copy_gbs:.3f}x copy)"))
    wb = [torch.randn(nn, k, device=dev, dtype=torch.bfloat16) for _ in range(max(1, sets // 2))]
    for m in (1, 4):
        xb = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        it = iter(range(10**9))
        ms = bench(lambda: F.linear(xb, wb[next(it) % len(wb)]), iters=200)
        gbs = (nn * k * 2) / ms / 1e6
        rows.append((f"torch F.linear bf16 {what}", f"{m}x{nn}x{k}", ms * 1e3, f"{gbs:.1f} GB/s ({gbs/copy_gbs:.3f}x copy)"))
    del ws, wb

# Head: lm_head GEMV, argmax, top-p sampling over 151936.
V, H = 151936, 2048
W = torch.randn(V, H, device=dev, dtype=torch.bfloat16) * 0.05
for m in (1, 4, 16):
    x = torch.randn(m, H, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: F.linear(x, W).float())
    gbs = (V * H * 2) / ms / 1e6
    rows.append(("torch lm_head F.linear bf16 (+float)", f"{m}x{V}x{H}", ms * 1e3, f"{gbs:.1f} GB/s ({gbs/copy_gbs:.3f}x)"))
del W
for r in (1, 16):
    lg = torch.randn(r, V, device=dev) * 5
    ms = bench(lambda: torch.argmax(lg, dim=-1), iters=100)
    rows.append(("torch.argmax", f"{r}x{V}", ms * 1e3, ""))

    def top_p_sample():
        p = torch.softmax(lg / 0.7, dim=-1)
        sp, si = torch.sort(p, dim=-1, descending=True)
        c = torch.cumsum(sp, dim=-1)
        sp[(c - sp) > 0.9] = 0
        t = torch.multinomial(sp, 1)
        return si.gather(-1, t)
    ms = bench(top_p_sample, iters=50)
    rows.append(("torch softmax+sort+cumsum+multinomial (top-p 0.9)", f"{r}x{V}", ms * 1e3, ""))

print()
print(f"{'torch anchor':<58} {'shape':>16} {'median us':>11}  value")
for name, shape, us, val in rows:
    print(f"{name:<58} {shape:>16} {us:>11.2f}  {val}")
