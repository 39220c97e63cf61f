#!/usr/bin/env bash
# GPU acceptance check: correctness of the CUDA paths and their speed, in one report
# (runs/gpu-check/gpu_check.md and .json; its path is printed last). At most ~8 minutes on
# one H100/H200. See bench/gpu_check.py for the steps.
#
#   bash bench/gpu_check.sh                  # every step not done yet, then the report
#   bash bench/gpu_check.sh --steps a,b      # only these steps (spread over several commands)
#   bash bench/gpu_check.sh --receive        # only check which carried pieces are here
#   bash bench/gpu_check.sh --dry-run        # every step on the CPU at toy size (CI runs this)
#
# On a machine without registry access, the wheels and images it lacks come from
# `bash bench/gpu_pack.sh` as .gpu/send-1 ... send-N (README, "GPU"): once all pieces are here,
# onnxruntime-gpu is reassembled, checked and installed with the other wheels into $SITE,
# which is put first on PYTHONPATH. The machine's own torch is used, whatever its version.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
SITE=${SITE:-/tmp/vgg-site}

install_carried() {
  [ -f .gpu/send-1/ort.name ] || return 0
  local name parts
  name=$(cat .gpu/send-1/ort.name)
  parts=$(ls .gpu/send-*/ort.part* 2>/dev/null | wc -l)
  if [ -f "$SITE/.installed" ] && cmp -s "$SITE/.installed" .gpu/send-1/ort.sha256; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    return 0
  fi
  mkdir -p .gpu/ort
  # The pieces are ort.part00, ort.part01, ... in their sends; cat them in name order.
  ls .gpu/send-*/ort.part* | sort -t/ -k3 | xargs cat > ".gpu/ort/$name"
  if ! (cd .gpu/ort && sha256sum -c --quiet ../send-1/ort.sha256 2>/dev/null); then
    echo "carried onnxruntime-gpu: $parts piece(s) here, not complete yet (sha256 differs)"
    rm -f ".gpu/ort/$name"
    return 0
  fi
  echo "installing the carried wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    ".gpu/ort/$name" .gpu/send-1/wheels/*.whl
  cp .gpu/send-1/ort.sha256 "$SITE/.installed"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
}

if [ "${1:-}" = "--receive" ]; then
  ls -la .gpu/send-* 2>/dev/null | grep -c "ort.part" | xargs echo "ORT pieces here:"
  exit 0
fi
if [ "${1:-}" != "--dry-run" ]; then
  install_carried
fi
exec "$PY" bench/gpu_check.py "$@"
