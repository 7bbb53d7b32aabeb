#!/usr/bin/env bash
# Create ./.venv (once) and install mlae with the given extras into it. Sourced by run.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MLAE_VENV:-$ROOT/.venv}"
EXTRAS="${1:-train}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# Reinstall only when pyproject.toml changed since the last install (keeps repeated runs fast).
STAMP="$VENV/.mlae-installed-$EXTRAS"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -e "$ROOT[$EXTRAS]"
  touch "$STAMP"
fi
