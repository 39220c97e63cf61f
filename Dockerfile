# syntax=docker/dockerfile:1
# The VGG classification service on a CUDA runtime (falls back to the CPU without a GPU).
#
#   docker build -t vgg-service .
#   docker run --gpus all -p 3000:3000 -v "$HOME/bentoml/models:/home/vgg/bentoml/models:ro" vgg-service
#
# Model: mounted at run time (above), or baked in at build time: first
#   bentoml models export vgg:latest vgg.bentomodel
# in this directory, then `docker build` picks up every *.bentomodel file here (README.md, "Serving").

# CUDA 13 + cuDNN 9 runtime: what onnxruntime-gpu 1.31 is built against.
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 22.04's own Python 3.11 (the project supports 3.11 and 3.12); apt versions follow the base image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BENTOML_DO_NOT_TRACK=True \
    BENTOML_HOME=/home/vgg/bentoml

# Serving needs neither torch nor onnx. Pins: the same as pyproject.toml and bentofile.yaml
# (tests/test_service_packaging.py checks that they agree).
RUN python3.11 -m venv /opt/venv \
 && pip install --no-cache-dir \
      "bentoml==1.4.40" \
      "onnxruntime-gpu==1.31.1" \
      "pillow==13.0.0" \
      "numpy==2.4.6" \
      "httpx==0.28.1"

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin vgg
WORKDIR /app
COPY --chown=vgg:vgg service.py bentofile.yaml ./
COPY --chown=vgg:vgg serving/ serving/
COPY --chown=vgg:vgg vgg/__init__.py vgg/errors.py vgg/preprocessing.py vgg/store.py vgg/

USER 10001
# Baked-in model (optional): any vgg.bentomodel in the build context is imported into the
# image's BentoML store; with none, mount a store at run time.
COPY --chown=vgg:vgg bentofile.yaml *.bentomodel /tmp/models/
RUN mkdir -p "$BENTOML_HOME/models" \
 && for archive in /tmp/models/*.bentomodel; do \
      if [ -e "$archive" ]; then bentoml models import "$archive"; fi; \
    done \
 && rm -rf /tmp/models

EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4)"]
CMD ["bentoml", "serve", "service:VGGClassifier", "--host", "0.0.0.0", "--port", "3000"]
