#!/usr/bin/env python3
"""Long-context checks of tools/train/train.py's model (issue 15): is attention memory linear in the context, and how
fast is a training step at 32K?

Parts, each printing one PASS/FAIL or measurement line (and the needle examples' format, checked on the CPU):
  1. paths (CPU): a small model of the same code at a context T larger than every model dimension runs a training
     step (forward + backward, bf16 autocast and f32) and the evaluation paths of train.py (position_nll, mean_loss,
     retrieval_scores) under a dispatch mode that records every aten op's output; FAIL if any tensor has two
     dimensions >= T (a T x T attention matrix or anything like it).
  2. memory (CPU): the real shape (6 layers, hidden 512, 16/2 heads x 128, 8 experts top-2 x 256) at contexts 256, 512
     and 1024 (batch 1, bf16 autocast as on the GPU): bytes saved for backward (distinct storages, parameters
     excluded). Linear means the same bytes per token between each pair of contexts; projected to --batch x
     --project-context (default 2 x 32768 = 65,536 tokens).
  3. speed (--device cuda only): real training steps (AdamW, bf16, SDPA restricted to flash / memory-efficient as in
     train.py) at --context x --batch with random weights: seconds per step, tokens/s, peak memory, and the steps that
     fit in --horizon seconds.

CPU:  python3 tools/train/longctx_check.py
GPU:  python3 tools/train/longctx_check.py --device cuda --context 32768 --batch 2 --steps 4   (about 1 minute)
"""
import argparse
import os
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402


def config(**kw):
    a = dict(train.SHAPE_DEFAULTS)
    a.update(kw)
    return train.Config(types.SimpleNamespace(**a))


class ShapeWatch(TorchDispatchMode):
    """Records every aten op whose output has two or more dimensions >= T."""

    def __init__(self, T):
        super().__init__()
        self.T = T
        self.bad = []
        self.ops = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and sum(int(d) >= self.T for d in t.shape) >= 2:
                self.bad.append((str(func), tuple(t.shape)))
        return out


def check_paths(T=1024):
    """Part 1: no T x T tensor in training (bf16 and f32) or in the evaluation paths."""
    torch.manual_seed(0)
    c = config(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=32, experts=4, top_k=2, moe_inter=32)
    dims = [c.hidden, c.heads * c.head_dim, c.experts * c.moe_inter, train.VOCAB]
    assert T > 2 * max(dims), (T, dims)
    m = train.Model(c)
    m.init_weights()
    dev = torch.device("cpu")
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 256, (2, T + 1)).astype(np.int64)
    ok = True
    for name, bf16 in (("bf16 autocast", True), ("f32", False)):
        amp, _ = train.make_amp(dev, cpu_bf16=bf16)
        x = torch.from_numpy(windows)
        w = ShapeWatch(T)
        with w:
            m.train()
            with amp():
                logits, aux = m(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, train.VOCAB), x[:, 1:].reshape(-1)) + 0.01 * aux
            loss.backward()
            m.eval()
            train.position_nll(m, windows, dev, 1, amp)
            train.mean_loss(m, windows, dev, 1, amp)
            seq, at = train.make_retrieval(windows[0], T, rng)
            train.retrieval_scores(m, [(seq, at)], dev, 1, amp)
        m.zero_grad(set_to_none=True)
        verdict = "PASS" if not w.bad else "FAIL"
        ok &= not w.bad
        print(f"paths, {name}, T={T} (> 2 x every model dimension {dims}): {w.ops} aten ops in a training step and "
              f"the evaluation paths; tensors with two dims >= T: {len(w.bad)} {w.bad[:3]}  {verdict}")
    # Self-test: the same watch must see the T x T weights of an explicit (math) attention.
    sdpa = F.scaled_dot_product_attention

    def explicit(q, k, v, is_causal=False):
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        mask = torch.ones(s.shape[-2:], dtype=torch.bool).triu(1)
        return torch.softmax(s.masked_fill(mask, float("-inf")), -1) @ v

    w = ShapeWatch(T)
    try:
        F.scaled_dot_product_attention = explicit
        with w, torch.no_grad():
            m(torch.from_numpy(windows[:, :-1]))
    finally:
        F.scaled_dot_product_attention = sdpa
    seen = bool(w.bad)
    ok &= seen
    print(f"paths, self-test: with an explicit attention the watch sees {len(w.bad)} tensors with two dims >= T "
          f"(e.g. {w.bad[:1]})  {'PASS' if seen else 'FAIL'}")
    return ok


def check_needle(T=4096):
    """The needle examples: length, statement at its depth, query at the end, answer = value, and UTF-8-safe cuts
    (detok then tokenizer.json's encoding gives the same tokens), on a filler full of multi-byte characters."""
    text = ("αβγ € x = 1 # 例 \n" * (3 * T)).encode()
    stream = np.frombuffer(text, np.uint8).astype(np.int16)
    depths = [round(float(d), 4) for d in np.linspace(0.05, 0.95, 10)]
    ex = train.needle_examples(stream, T, depths, 3, 7)
    bad = []
    for e in ex:
        seq, at, key, val = e["seq"], e["at"], e["key"], e["value"]
        stmt = list(train.kv_line(key, val))
        room = T - 2 * len(stmt)
        prompt = train.detok(seq[:at])
        if len(seq) != T or list(seq[e["needle_at"]:e["needle_at"] + len(stmt)]) != stmt:
            bad.append(("statement", e["depth"]))
        if not prompt.endswith(f"\n[kv] {key} = ") or train.detok(seq[at:at + 8]) != val:
            bad.append(("query/answer", e["depth"]))
        if not 0 <= e["needle_at"] - round(e["depth"] * room) <= 3:
            bad.append(("depth", e["depth"], e["needle_at"]))
        if train.retok(prompt) != [int(t) for t in seq[:at]] or "\ufffd" in prompt:
            bad.append(("utf-8", e["depth"]))
    ok = len(ex) == 30 and not bad
    print(f"needle examples: {len(ex)} at T={T} (10 depths x 3) on multi-byte filler; problems: {bad[:3]}  "
          f"{'PASS' if ok else 'FAIL'}")
    return ok


def saved_bytes(c, T, batch=1):
    """Bytes saved for backward by one forward (bf16 autocast on the CPU), distinct storages, parameters excluded."""
    torch.manual_seed(0)
    m = train.Model(c)
    m.init_weights()
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    amp, _ = train.make_amp(torch.device("cpu"), cpu_bf16=True)
    x = torch.randint(0, 256, (batch, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with amp():
            logits, aux = m(x)
        loss = F.cross_entropy(logits.reshape(-1, train.VOCAB), x.reshape(-1)) + 0.01 * aux
    del loss, logits, aux
    return sum(seen.values())


def check_memory(project_tokens, contexts=(256, 512, 1024)):
    """Part 2: saved-for-backward bytes per token at the real shape, and their projection."""
    c = config()
    b = [saved_bytes(c, T) for T in contexts]
    slopes = [(b[i + 1] - b[i]) / (contexts[i + 1] - contexts[i]) for i in range(len(contexts) - 1)]
    linear = max(slopes) <= 1.05 * min(slopes)
    per_tok = slopes[-1]
    const = b[-1] - per_tok * contexts[-1]
    proj = (const + per_tok * project_tokens) / 2**30
    print("memory, real shape, bf16 autocast: saved for backward "
          + ", ".join(f"T={T}: {x / 2**20:.1f} MiB" for T, x in zip(contexts, b))
          + f"; bytes per token {', '.join(f'{s:.0f}' for s in slopes)} ({'linear' if linear else 'NOT linear'}); "
            f"projected to {project_tokens} tokens: {proj:.1f} GiB of activations (+ weights, AdamW state and the "
            f"transient logits / attention workspaces)  {'PASS' if linear else 'FAIL'}")
    return linear


def check_speed(a):
    """Part 3: timed training steps on the GPU at the real shape."""
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    c = config(rope_theta=a.rope_theta)
    torch.manual_seed(0)
    m = train.Model(c)
    m.init_weights()
    m.to(dev).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    amp, restricted = train.make_amp(dev)
    T, B = a.context, a.batch
    times = []
    for i in range(a.steps + 1):
        x = torch.randint(0, 256, (B, T + 1), device=dev)
        sync()
        t = time.time()
        with amp():
            logits, aux = m(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, train.VOCAB), x[:, 1:].reshape(-1)) + 0.01 * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sync()
        times.append(time.time() - t)
        print(f"  step {i}: {times[-1]:.3f}s{' (warm-up, not counted)' if i == 0 else ''}", flush=True)
    s = float(np.mean(times[1:]))
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float("nan")
    m.eval()
    windows = np.random.default_rng(0).integers(0, 256, (B, T + 1)).astype(np.int64)
    sync()
    t = time.time()
    train.position_nll(m, windows, dev, B, amp)
    sync()
    fwd = time.time() - t
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    print(f"speed, {name}, context {T} x batch {B}, SDPA restricted to flash/efficient: "
          f"{restricted}: {s:.3f} s/step ({B * T / s:.0f} tokens/s), peak memory {peak:.1f} GiB; a no-grad forward "
          f"of {B} windows {fwd:.2f}s; {int(a.horizon / s)} steps ({a.horizon / s * B * T / 1e6:.0f}M tokens) fit in "
          f"{a.horizon:.0f} s")
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rope-theta", type=float, default=1e7)
    ap.add_argument("--speed", action="store_true", help="run part 3 on a non-CUDA device too (a smoke test)")
    ap.add_argument("--horizon", type=float, default=440.0, help="training seconds to project the step count to")
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ok = check_paths()
    ok &= check_needle()
    ok &= check_memory(a.batch * a.context)
    if a.device.startswith("cuda") or a.speed:
        ok &= check_speed(a)
    print("longctx_check: " + ("PASS" if ok else "FAIL"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
