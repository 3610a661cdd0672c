#!/usr/bin/env bash
# Parity of `hga logits --backend cpu --activations f32` with Hugging Face transformers, on two checkpoints made by
# our writer: the `tiny` preset and tools/parity/mixed.json (dense + MoE layers, GQA 8:2, head_dim 128).
#
# Usage: tools/parity/run.sh [HGA_BINARY] [WORK_DIR]
#   HGA_BINARY  the staged release binary (default: $HGA, else ./hga, else target/release/hga)
#   WORK_DIR    where checkpoints and logits go (default: a fresh temporary directory)
#   PYTHON      env: the Python with torch + transformers (default: python3)
# Exit status: 0 when both pass (rel L2 <= 1e-4, top-1 100%), 1 otherwise.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
hga="${1:-${HGA:-}}"
if [[ -z "$hga" ]]; then
  if [[ -x ./hga ]]; then hga=./hga; else hga="$here/../../target/release/hga"; fi
fi
[[ -x "$hga" ]] || { echo "no hga binary at '$hga' (pass it as the first argument)" >&2; exit 2; }
work="${2:-$(mktemp -d -t hga-parity-XXXXXX)}"
py="${PYTHON:-python3}"
mkdir -p "$work"
# 32 tokens, valid in both vocabularies (320 and 384).
tokens=1,17,5,42,42,9,63,100,200,3,7,11,13,250,251,2,300,0,64,65,66,128,129,31,97,180,181,182,7,7,7,319

set -x
"$hga" checkpoint new --preset tiny --seed 1 --out "$work/tiny" --quiet
"$hga" checkpoint new --config "$here/mixed.json" --seed 2 --out "$work/mixed" --quiet
set +x

status=0
for name in tiny mixed; do
  echo "== $name"
  (set -x; "$hga" logits --model "$work/$name" --tokens "$tokens" --backend cpu --activations f32 \
    --out "$work/$name.logits.safetensors")
  (set -x; "$py" "$here/parity.py" --model "$work/$name" --logits "$work/$name.logits.safetensors") || status=1
done
# Informative (does not change the exit status): the fp8 activation mode against the same quantization simulated in
# torch. Expect ~4e-7, except that a value landing within rounding noise of an e4m3 rounding boundary can round the
# other way in one implementation (then a few e-3 from that position on): fp8 quantization is discontinuous.
for name in tiny mixed; do
  echo "== $name, fp8 activations (informative)"
  (set -x; "$hga" logits --model "$work/$name" --tokens "$tokens" --backend cpu --activations fp8 \
    --out "$work/$name.fp8.logits.safetensors")
  (set -x; "$py" "$here/parity.py" --model "$work/$name" --logits "$work/$name.fp8.logits.safetensors") || true
done
echo "work dir: $work"
if [[ $status -eq 0 ]]; then echo "parity: PASS (tiny, mixed)"; else echo "parity: FAIL"; fi
exit $status
