#!/usr/bin/env bash
# One short, prepared check for a CUDA machine (minutes): what nobody can measure on the CPU-only dev machines.
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT: folder for the logs (default: $OUT, else runs/gpu_check)
#
# 1. `mlae train` end to end on CUDA (3 epochs of the default run): device, precision and attention it picks,
#    images/s, test top-1.
# 2. The attention choice there: MLAE / LoRA training step with timm's fused kernel and with the math path, bf16
#    and fp32, on ViT-B/16 at 224 px (the paper's backbone) and ViT-Ti/4 at 32 px (batch 64).
# 3. MLAE vs LoRA (vs PEFT when installed) step time and peak memory on ViT-B/16, and merged inference vs the
#    plain backbone: the adapter targets (MLAE <= 1.03x LoRA, memory <= 1.02x, merged >= 0.99x).
# Runs from a source tree without installing (PYTHONPATH=src); the machine needs torch, timm, safetensors, yaml,
# tqdm and numpy. Prints everything; the numbers go into the README by hand, labelled with the GPU.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/runs/gpu_check}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
log() { echo "== $*" | tee -a "$OUT_DIR/summary.txt"; }

"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/env.txt" || exit 1
import importlib.util, sys
import torch
missing = [m for m in ("timm", "safetensors", "yaml", "tqdm", "numpy") if importlib.util.find_spec(m) is None]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; missing: {missing or 'none'}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device here; this script is for a CUDA machine")
if missing:
    sys.exit(f"gpu_check: install {missing} first")
EOF

log "1. mlae train on CUDA (suite:digits, embedded ViT, MLAE, 3 epochs)"
t0=$(date +%s)
"$PY" -m mlae train --device cuda --epochs 3 --out "$OUT_DIR/train" --overwrite --quiet > "$OUT_DIR/train.log" 2>&1
echo "exit $? after $(( $(date +%s) - t0 )) s (process start, data, training, evaluations)" | tee -a "$OUT_DIR/summary.txt"
"$PY" - "$OUT_DIR/train/results.json" <<'EOF' 2>&1 | tee -a "$OUT_DIR/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
print({k: r.get(k) for k in ("device", "precision", "attention", "train_images_per_s", "test_top1", "wall_time_s")})
EOF

for attention in fused math; do
  log "2/3. adapter_speed.py, attention $attention (batch 64, 20 rounds)"
  "$PY" benchmarks/adapter_speed.py --models ViT-B/16@224 ViT-Ti/4@32 --precisions bf16 fp32 --batch 64 \
    --rounds 20 --attention "$attention" 2>&1 | tee -a "$OUT_DIR/summary.txt"
done
log "done: $OUT_DIR/summary.txt"
