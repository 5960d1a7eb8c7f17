#!/usr/bin/env bash
# Regenerate completions/ from the application; tests/test_completions.py checks they match.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
llmctl="${LLMCTL:-$root/.venv/bin/llmctl}"
"$llmctl" completions bash > "$root/completions/llmctl.bash"
"$llmctl" completions zsh > "$root/completions/_llmctl"
"$llmctl" completions fish > "$root/completions/llmctl.fish"
