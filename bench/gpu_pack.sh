#!/usr/bin/env bash
# Prepare, on a machine that reaches PyPI, what a GPU machine without registry access lacks
# for bench/gpu_check.sh, as "sends": folders of at most $PIECE_MIB MiB that travel one per
# command to the GPU machine (its git-ignored files stay there between commands).
#
#   bash bench/gpu_pack.sh            # writes .gpu/send-1 ... .gpu/send-N and prints the commands
#   bash bench/gpu_pack.sh --verify   # checks the sends: sizes, reassembly, installability
#
# The GPU machine is expected to have Python 3.12 with torch (CUDA 13), torchvision, numpy,
# onnx, onnxscript, pillow and CPU-only onnxruntime, and no bentoml (GPU_IMAGE_HAS below).
# Carried: onnxruntime-gpu (its ~255 MB wheel split into pieces), bentoml, fastapi, uvicorn and
# every dependency of theirs except numpy (the machine's own numpy stays: torch is built on it),
# and a subset of the real images (PER_CLASS Imagenette images per class, and the photos).
# The project's own torch/torchvision pins are NOT carried: the GPU machine's torch is used.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
PIECE_MIB=${PIECE_MIB:-60}
PER_CLASS=${PER_CLASS:-100}
DATA=${DATA:-../shared/data}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
ORT_GPU="onnxruntime-gpu==1.31.1"
SERVING=("bentoml==1.4.40" "fastapi==0.165.0" "uvicorn==0.54.0" "httpx==0.28.1")
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64
          --platform manylinux2010_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64
          --platform any)

verify() {
  local limit=$((PIECE_MIB * 1024 * 1024)) send size work
  [ -d "$GPU/send-1" ] || { echo "error: no $GPU/send-1: run 'bash bench/gpu_pack.sh' first" >&2; exit 2; }
  for send in "$GPU"/send-*; do
    size=$(du -sb "$send" | cut -f1)
    [ "$size" -le "$limit" ] || { echo "error: $send is $size bytes, over $PIECE_MIB MiB" >&2; exit 1; }
    echo "$send: $((size / 1024 / 1024)) MiB"
  done
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  cat "$GPU"/send-*/ort.part* > "$work/$(cat "$GPU/send-1/ort.name")"
  (cd "$work" && sha256sum -c --quiet "$OLDPWD/$GPU/send-1/ort.sha256")
  cp "$GPU"/send-1/wheels/*.whl "$work/"
  # Every carried wheel installs on CPython 3.12 / manylinux x86_64 from the sends alone ...
  "$PY" -m pip install --dry-run --quiet --no-index --no-deps --ignore-installed --target "$work/site" \
    "${PLATFORM[@]}" "$work"/*.whl
  # ... and every requirement of theirs is carried or already on the GPU machine.
  "$PY" bench/gpu_requirements.py "$work"
  echo "ok: the sends reassemble and install"
}

if [ "${1:-}" = "--verify" ]; then
  verify
  exit 0
fi

[ -d "$DATA/imagenette/train" ] || { echo "error: $DATA/imagenette/train missing (set DATA=...)" >&2; exit 2; }
rm -rf "$GPU" && mkdir -p "$GPU/download" "$GPU/send-1/wheels" "$GPU/send-1/data/imagenette/train"
"$PY" -m pip download --quiet "${PLATFORM[@]}" -d "$GPU/send-1/wheels" "${SERVING[@]}"
rm -f "$GPU"/send-1/wheels/numpy-*.whl
"$PY" -m pip download --quiet --no-deps "${PLATFORM[@]}" -d "$GPU/download" "$ORT_GPU"

for class_dir in "$DATA"/imagenette/train/*/; do
  name=$(basename "$class_dir")
  mkdir -p "$GPU/send-1/data/imagenette/train/$name"
  find "$class_dir" -maxdepth 1 -type f | sort | sed -n "1,${PER_CLASS}p" | xargs -I{} cp {} "$GPU/send-1/data/imagenette/train/$name/"
done
cp -r "$DATA/photos" "$GPU/send-1/data/photos"

wheel=$(ls "$GPU"/download/onnxruntime_gpu-*.whl)
basename "$wheel" > "$GPU/send-1/ort.name"
(cd "$GPU/download" && sha256sum "$(basename "$wheel")") > "$GPU/send-1/ort.sha256"
piece=$((PIECE_MIB * 1024 * 1024 - 65536))  # a little room for the folder entries
first=$((piece - $(du -sb "$GPU/send-1" | cut -f1)))
head -c "$first" "$wheel" > "$GPU/send-1/ort.part00"
tail -c +"$((first + 1))" "$wheel" | split -b "$piece" -d -a 2 - "$GPU/download/rest."
n=1
for part in "$GPU"/download/rest.*; do
  n=$((n + 1))
  mkdir -p "$GPU/send-$n"
  mv "$part" "$GPU/send-$n/ort.part$(printf '%02d' $((n - 1)))"
done
rm -rf "$GPU/download"
verify

echo
echo "On the GPU machine (repo root), one command per send, back to back (the machine keeps"
echo "git-ignored files while it is warm, about 30 s idle). Carry exactly the path named:"
steps=("--steps machine,torch-tests" "--steps train-speed")
for i in $(seq 1 "$n"); do
  if [ "$i" -lt "$n" ]; then
    echo "  $i. carry .gpu/send-$i: bash bench/gpu_check.sh ${steps[$((i - 1))]:---receive}"
  else
    echo "  $i. carry .gpu/send-$i: bash bench/gpu_check.sh   (installs, runs the remaining steps, writes the report)"
  fi
done
