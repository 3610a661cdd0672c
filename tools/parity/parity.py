#!/usr/bin/env python3
"""Compare `hga logits` output with Hugging Face transformers' Qwen3MoeForCausalLM on the same checkpoint.

The checkpoint (written by `hga checkpoint new`, FP8 e4m3 weights with 128x128 block scales `weight_scale_inv`) is
dequantized to float32 here: every FP8 weight is multiplied by its block scale, every other tensor cast to float32.
The dequantized tensors and config.json (without quantization_config, dtype float32) go to a temporary directory,
which is loaded with `Qwen3MoeForCausalLM.from_pretrained(..., dtype=float32, attn_implementation="eager")` so that
transformers' own key mapping applies (per-expert tensors in 4.x, fused experts in 5.x). Any missing or unexpected
weight is an error (a randomly initialised weight would otherwise pass silently).

Then the tokens stored in the logits file are run through the model, and the script prints the relative L2 error of
the logits (||ours - theirs|| / ||theirs||, over all positions), the top-1 (argmax) agreement per position, and the
torch / transformers versions. Exit status 1 if rel L2 > --max-rel-l2 (default 1e-4) or top-1 agreement < 100%.

With `--activations fp8` (the default is what the logits file's metadata says), the dynamic FP8 activation
quantization of our `fp8` mode is simulated in torch: the input of every FP8-weight linear (every `F.linear` except
`lm_head` and the routers) is quantized per token per 128-wide group, s = max(absmax, 1e-10) / 448,
x' = float8_e4m3fn(x / s) * s, before the f32 product with the dequantized weight. This checks the `fp8` mode, the
oracle of the GPU FP8 kernels, against an independent implementation (torch's e4m3 rounding).

Usage: python3 parity.py --model DIR --logits FILE.safetensors [--activations f32|fp8] [--max-rel-l2 1e-4]
"""
import argparse
import glob
import json
import os
import sys
import tempfile


def load_checkpoint_tensors(model_dir):
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, f) for f in files]
    else:
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        sys.exit(f"no safetensors files in {model_dir}")
    tensors = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def dequantize(tensors, block):
    """FP8 weight [out, in] * weight_scale_inv [ceil(out/b), ceil(in/b)] (repeated over each b x b block) -> f32."""
    import torch

    out = {}
    n_fp8 = 0
    for name, t in tensors.items():
        if name.endswith(".weight_scale_inv"):
            continue
        scale_name = name + "_scale_inv"
        if scale_name in tensors:
            s = tensors[scale_name].to(torch.float32)
            rows, cols = t.shape
            full = s.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)[:rows, :cols]
            out[name] = t.to(torch.float32) * full
            n_fp8 += 1
        else:
            if t.dtype == torch.float8_e4m3fn:
                sys.exit(f"{name} is FP8 but has no {scale_name}")
            out[name] = t.to(torch.float32)
    orphans = [n for n in tensors if n.endswith(".weight_scale_inv") and n[: -len("_scale_inv")] not in tensors]
    if orphans:
        sys.exit(f"scales without weights: {orphans[:5]}")
    return out, n_fp8


def _version_at_least(version, want):
    parts = []
    for p in version.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) >= want


def _simulate_fp8_activations(model, torch):
    """Patches torch.nn.functional.linear: quantize-dequantize the input (per row, 128-wide groups along the last
    dim, the last group possibly shorter) unless the weight is lm_head or a router (the unquantized linears)."""
    import torch.nn.functional as F

    unquantized = set()
    for name, p in model.named_parameters():
        if name == "lm_head.weight" or name.endswith("mlp.gate.weight"):
            unquantized.add(p.data_ptr())
    if model.config.tie_word_embeddings:
        unquantized.add(model.get_input_embeddings().weight.data_ptr())
    orig = F.linear
    counts = {"quantized": 0, "plain": 0}

    def quant(x):
        k = x.shape[-1]
        pad = (-k) % 128
        xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
        g = xp.reshape(*xp.shape[:-1], -1, 128)
        s = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-10) / 448.0
        dq = (g / s).to(torch.float8_e4m3fn).to(torch.float32) * s
        return dq.reshape(xp.shape)[..., :k]

    def linear(x, w, b=None):
        if w.data_ptr() in unquantized:
            counts["plain"] += 1
            return orig(x, w, b)
        counts["quantized"] += 1
        return orig(quant(x), w, b)

    F.linear = linear
    torch.nn.functional.linear = linear
    model._hga_fp8_counts = counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    ap.add_argument("--logits", required=True, help="output of `hga logits` (tensors `logits` and `tokens`)")
    ap.add_argument("--activations", choices=["f32", "fp8"], help="default: from the logits file's metadata")
    ap.add_argument("--max-rel-l2", type=float, default=1e-4)
    args = ap.parse_args()

    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")

    with safe_open(args.logits, framework="pt") as f:
        meta = f.metadata() or {}
    activations = args.activations or meta.get("activations", "f32")
    ours_file = load_file(args.logits)
    ours = ours_file["logits"].to(torch.float64)
    tokens = ours_file["tokens"].to(torch.long)
    print(f"model {args.model}: {tokens.numel()} tokens, vocab {ours.shape[1]}, activations {activations}")

    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    q = config.pop("quantization_config", None)
    block = [128, 128]
    if q is not None:
        if q.get("quant_method") != "fp8":
            sys.exit(f"unsupported quantization_config {q}")
        block = q.get("weight_block_size") or block
    config["torch_dtype"] = "float32"
    config["dtype"] = "float32"

    tensors, n_fp8 = dequantize(load_checkpoint_tensors(args.model), block)
    print(f"{len(tensors)} tensors, {n_fp8} FP8 weights dequantized with {block[0]}x{block[1]} block scales")

    with tempfile.TemporaryDirectory(prefix="hga-parity-") as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        del tensors
        # `dtype=` since transformers 4.56; `torch_dtype=` before.
        dtype_kw = "dtype" if _version_at_least(transformers.__version__, (4, 56)) else "torch_dtype"
        kwargs = {dtype_kw: torch.float32}
        if _version_at_least(transformers.__version__, (5, 0)):
            kwargs["experts_implementation"] = "eager"  # the per-expert F.linear loop (5.x picks grouped_mm)
        model, info = Qwen3MoeForCausalLM.from_pretrained(
            tmp, attn_implementation="eager", output_loading_info=True, **kwargs
        )
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        sys.exit(f"transformers did not load the checkpoint cleanly: {problems}")
    model.eval()
    if activations == "fp8":
        if q is None:
            print("checkpoint is not FP8: fp8 mode quantizes nothing")
        else:
            _simulate_fp8_activations(model, torch)
    with torch.no_grad():
        theirs = model(input_ids=tokens[None, :], use_cache=False).logits[0].to(torch.float64)
    if theirs.shape != ours.shape:
        sys.exit(f"shape mismatch: ours {tuple(ours.shape)}, transformers {tuple(theirs.shape)}")

    counts = getattr(model, "_hga_fp8_counts", None)
    if counts is not None:
        print(f"fp8 simulation: {counts['quantized']} quantized-input linear calls, {counts['plain']} plain")
    rel_l2 = (torch.linalg.vector_norm(ours - theirs) / torch.linalg.vector_norm(theirs)).item()
    max_abs = (ours - theirs).abs().max().item()
    agree = (ours.argmax(-1) == theirs.argmax(-1))
    top1 = agree.double().mean().item()
    per_pos = [
        (torch.linalg.vector_norm(ours[i] - theirs[i]) / torch.linalg.vector_norm(theirs[i])).item()
        for i in range(ours.shape[0])
    ]
    print(f"rel L2 {rel_l2:.3e} (worst position {max(per_pos):.3e}), max |diff| {max_abs:.3e}, "
          f"top-1 agreement {agree.sum().item()}/{agree.numel()} ({100 * top1:.1f}%)")
    ok = rel_l2 <= args.max_rel_l2 and top1 == 1.0
    if not ok:
        print("per position rel L2: " + " ".join(f"{e:.1e}" for e in per_pos))
    print("PASS" if ok else f"FAIL (need rel L2 <= {args.max_rel_l2:g} and top-1 100%)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
