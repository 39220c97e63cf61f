#!/usr/bin/env bash
# The reproduction protocol at the paper's geometry on one GPU (target: under 10 minutes on
# one H100): S jittered in [256, 512], 224 crops, Q = (Smin + Smax) / 2 = 384 (section 4.1),
# VGG-A initialised with Glorot (the paper's N(0, 1e-2) stays at chance within a short budget:
# RESULTS.md, CPU protocol), bf16 autocast and channels_last
# (training.run does both on CUDA), then the same table as the CPU protocol, plus the
# training throughput (in the table) and ONNX Runtime CUDA serving throughput (bench/inference.py).
#
# Data: a stated subset of Imagenette, small enough to copy to a GPU machine with the code: the first $PER_CLASS (default 380) images of each of the 10 classes,
# about 45 MiB, copied (not linked) into .data/imagenette-gpu by `bash bench/reproduce_gpu.sh
# --prepare` on a machine that has ../shared/data. Then, on the GPU machine, from the repo root:
#
#   bash bench/reproduce_gpu.sh            # needs the project's Python packages (make setup),
#                                          # or wheels in .whl/ (installed into /tmp/site first)
#
# Results: runs/reproduce-gpu/results.{md,json} and runs/reproduce-gpu/engine.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
SUBSET=.data/imagenette-gpu
PER_CLASS=${PER_CLASS:-380}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

if [ "${1:-}" = "--prepare" ]; then
  SOURCE=${SOURCE:-../shared/data/imagenette/train}
  rm -rf "$SUBSET" && mkdir -p "$SUBSET/train"
  for class_dir in "$SOURCE"/*/; do
    name=$(basename "$class_dir")
    mkdir -p "$SUBSET/train/$name"
    find "$class_dir" -maxdepth 1 -type f | sort | head -n "$PER_CLASS" | xargs -I{} cp {} "$SUBSET/train/$name/"
  done
  du -sh "$SUBSET"
  exit 0
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d "$SUBSET/train" ] || { echo "error: $SUBSET/train missing: run 'bash bench/reproduce_gpu.sh --prepare' first" >&2; exit 2; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device visible')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

OUT=runs/reproduce-gpu
mkdir -p "$OUT"
start=$(date +%s)
"$PY" bench/reproduce.py --data "$SUBSET" --out "$OUT" --geometry paper --amp --init-a "${INIT_A:-glorot}" \
  --epochs-a "${EPOCHS_A:-10}" --epochs-d "${EPOCHS_D:-8}" --workers "${WORKERS:-12}" --eval-batch 64
"$PY" bench/inference.py --batch 32 --iters 10 --no-int8 2>&1 | tee "$OUT/engine.txt"
echo "GPU protocol wall time: $(( $(date +%s) - start )) s"
