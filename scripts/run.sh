#!/usr/bin/env bash
# The main job: install mlae into ./.venv if needed, then run `mlae` with the arguments given; with none it runs
# `mlae train`, which fine-tunes the embedded pretrained ViT with MLAE on an embedded task (minutes on a CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" train
[ "$#" -gt 0 ] || set -- train  # bare `mlae` only prints its help
exec "${MLAE_VENV:-$ROOT/.venv}/bin/mlae" "$@"
