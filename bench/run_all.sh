#!/usr/bin/env bash
# Run every benchmark in sequence on the real models and keep each one's output under
# ${1:-out/bench}. Run it alone on the machine: the figures are timings.
#
#   bash bench/run_all.sh [OUT_DIR]
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(realpath -m "${1:-$root/out/bench}")"
python="$root/.venv/bin/python"
gguf="$root/.models/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$out"
cd "$root"

run() {
    local name="$1"; shift
    echo "== $name: $*" >&2
    local start=$SECONDS
    "$@" > "$out/$name.md" 2> "$out/$name.log"
    echo "   exit $? after $((SECONDS - start)) s" >&2
}

uptime > "$out/load-before.txt"
run convert_quantize "$python" bench/convert_quantize.py --gemma
run eval_quality "$python" bench/eval_quality.py --workdir "$out/eval-models" \
    --wikitext-tokens 8192 --hellaswag 200 --parity-samples 16 --json "$out/eval_quality.json"
int4="$out/eval-models/onnx-int4"
run runtime "$python" bench/runtime.py "$int4" --tokens 128 --rounds 5 --with-ort
run serve "$python" bench/serve.py "$int4" --torch-model "$gguf" --tokens 128 --rounds 3
run batching "$python" bench/batching.py "$int4" --rounds 5
run long_prompt "$python" bench/long_prompt.py "$int4"
run cost_calibration "$python" bench/cost_calibration.py --artifact "$int4" --repeats 8
run pipeline "$python" bench/pipeline.py --json "$out/pipeline.json"
run gguf_lossless "$python" bench/gguf_lossless.py --gemma --json "$out/gguf_lossless.json"
uptime > "$out/load-after.txt"
