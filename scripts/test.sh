#!/usr/bin/env bash
# The test suite: install mlae with its test extras into ./.venv if needed, then run pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" train,test
cd "$ROOT"
exec "${MLAE_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
