#!/usr/bin/env bash
# The main job: install mlae into ./.venv if needed, then run `mlae` (arguments are passed on; with none it
# fine-tunes the embedded pretrained ViT with MLAE on an embedded task, a few minutes on a laptop CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" train
exec "${MLAE_VENV:-$ROOT/.venv}/bin/mlae" "$@"
