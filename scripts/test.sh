#!/usr/bin/env bash
# Run the whole test suite: set up .venv, fetch the real models, run pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k serve -x`.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
python="$(bash scripts/setup.sh)"
PYTHON="$python" bash scripts/fetch-models.sh >/dev/null
exec "$python" -m pytest "$@"
