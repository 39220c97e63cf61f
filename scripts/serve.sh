#!/usr/bin/env bash
# The README's main command: make sure a model is registered (training the built-in demo
# VGG-D if none is), then serve it over HTTP with BentoML on port 3000.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if ! "$PY" -m export.registry --check >/dev/null 2>&1; then
  echo "No 'vgg' model registered yet: training the built-in demo VGG-D (about 10 minutes on 2 CPU cores)."
  "$PY" -m training.run --cfg D
fi
exec .venv/bin/bentoml serve . --port "${PORT:-3000}"
