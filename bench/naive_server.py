"""The server a user would write by hand, for ``bench/serve.py`` to compare against.

FastAPI + uvicorn, one ONNX Runtime call per request (no batching), the same model file and
the same preprocessing as the service. ``VGG_MODEL`` is the ``.onnx`` path (or store tag).

    VGG_MODEL=model.onnx .venv/bin/python -m uvicorn bench.naive_server:app --port 3001
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, Form, HTTPException, UploadFile

from serving.engine import resolve_model
from vgg.preprocessing import ImageDecodeError, load_graph_input

_state: dict = {}


@asynccontextmanager
async def lifespan(_: FastAPI):
    files = resolve_model(os.environ.get("VGG_MODEL"))
    _state["files"] = files
    _state["session"] = ort.InferenceSession(
        str(files.onnx_path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    yield
    _state.clear()


app = FastAPI(title="naive VGG server", lifespan=lifespan)


@app.get("/readyz")
def readyz() -> dict:
    return {"ready": "session" in _state}


@app.post("/classify")
def classify(image: UploadFile = File(...), top_k: int = Form(5)) -> dict:
    files = _state["files"]
    try:
        pixels = load_graph_input(image.file.read(), files.test_scale)
    except ImageDecodeError as error:
        raise HTTPException(400, str(error)) from None
    probs = _state["session"].run(None, {"images": pixels[None]})[0][0]
    order = np.argsort(-probs)[:top_k]
    top = [{"label": files.labels[i], "index": int(i), "score": float(probs[i])} for i in order]
    return {**top[0], "top": top, "model": files.tag}
