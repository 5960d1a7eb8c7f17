#!/usr/bin/env bash
# Create .venv (or reuse it) with llmctl and its pinned stack installed in editable mode.
# Needs only Python 3.11 and the package registry. Prints the venv's python path.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${LLMCTL_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv" >&2
fi
stamp="$venv/.llmctl-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    # torch first, pinned, so that nothing later pulls a CUDA build.
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0" >&2
    "$venv/bin/python" -m pip install --quiet -e "$root[test]" >&2
    touch "$stamp"
fi
echo "$venv/bin/python"
