"""Serving: the ONNX Runtime engine shared by the BentoML service, its tests and bench/serve.py."""

from serving.engine import Engine, EngineError, ModelFiles, load_engine, resolve_model

__all__ = ["Engine", "EngineError", "ModelFiles", "load_engine", "resolve_model"]
