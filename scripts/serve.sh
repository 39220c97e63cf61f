#!/usr/bin/env bash
# The README's main command (`make serve`): make sure a model is registered, training and
# registering the built-in demo VGG-D if none is, then serve it with BentoML on port 3000.
#   PORT=3001 make serve           another port
#   VGG_MODEL=vgg:<version> ...    a given store model, or VGG_MODEL=path/to/model.onnx
# Other settings (batch size, limits, VGG_REQUIRE_GPU): README.md, "Serving".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export BENTOML_DO_NOT_TRACK=True

if [[ -z "${VGG_MODEL:-}" ]] && ! "$PY" -m vgg.store --check >/dev/null 2>&1; then
  echo "No 'vgg' model registered yet: training the built-in demo VGG-D (5-8 minutes of training on 2 CPU cores: README.md, \"Worked example\")."
  "$PY" -m training.run --cfg D
  if ! "$PY" -m vgg.store --check >/dev/null 2>&1; then
    echo "error: training finished but registered no 'vgg' model; export one with" \
         "'python -m export --checkpoint runs/<run>/best.pt'" >&2
    exit 2
  fi
fi
echo "Serving on http://localhost:${PORT:-3000}: try it in a browser at http://localhost:${PORT:-3000}/ui" \
     "(API docs at /, POST /classify); Ctrl+C stops it."
exec .venv/bin/bentoml serve . --host "${HOST:-0.0.0.0}" --port "${PORT:-3000}"
