#!/usr/bin/env bash
# The test suite: install mlae with its test extras into ./.venv if needed, then run pytest. (The PostgreSQL sweep
# test also needs a server: Debian's postgresql package, which .ci/run installs; without it that test skips.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" train,test,postgres
cd "$ROOT"
exec "${MLAE_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
