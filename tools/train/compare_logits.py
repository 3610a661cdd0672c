#!/usr/bin/env python3
"""Compare `hga logits` output with the torch forward of tools/train/train.py on the same exported fixture.

The export (model.safetensors, FP8 weights dequantized as e4m3 * weight_scale_inv block) is loaded into train.py's
Model in float32 on the CPU, the tokens stored in the logits file are run through it, and the relative L2 error of the
logits and the top-1 agreement are printed. Exit status 1 if rel L2 > --max-rel-l2 or top-1 < 100%.
(tools/parity/parity.py does the same against transformers' Qwen3MoeForCausalLM.)

Usage: python3 tools/train/compare_logits.py --model DIR --logits FILE.safetensors
"""
import argparse
import json
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--logits", required=True, help="output of `hga logits --activations f32`")
    ap.add_argument("--max-rel-l2", type=float, default=1e-4)
    a = ap.parse_args()
    from safetensors.torch import load_file

    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    if cfg["vocab_size"] != train.VOCAB:
        sys.exit(f"vocab_size {cfg['vocab_size']} is not the fixture's {train.VOCAB}")
    c = train.Config(types.SimpleNamespace(
        hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
        kv_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"], experts=cfg["num_experts"],
        top_k=cfg["num_experts_per_tok"], moe_inter=cfg["moe_intermediate_size"], rope_theta=cfg["rope_theta"]))
    c.eps = cfg["rms_norm_eps"]
    model = train.Model(c)
    train.load_hf_tensors(model, train.load_export(os.path.join(a.model, "model.safetensors")))
    model.eval()
    f = load_file(a.logits)
    ours_rust = f["logits"].double()
    tokens = f["tokens"].long()
    with torch.no_grad():
        torch_logits = model(tokens[None])[0][0].double()
    rel = (torch.linalg.vector_norm(ours_rust - torch_logits) / torch.linalg.vector_norm(torch_logits)).item()
    agree = (ours_rust.argmax(-1) == torch_logits.argmax(-1))
    print(f"{tokens.numel()} tokens: hga logits vs train.py's torch forward (f32): rel L2 {rel:.3e}, max |diff| "
          f"{(ours_rust - torch_logits).abs().max().item():.3e}, top-1 {agree.sum().item()}/{agree.numel()}")
    ok = rel <= a.max_rel_l2 and bool(agree.all())
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
