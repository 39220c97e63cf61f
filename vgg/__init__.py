"""VGG (Simonyan & Zisserman, arXiv:1409.1556): model, dense evaluation, pre-initialisation.

The names below load their submodule (and torch) on first use, so ``vgg.preprocessing``
alone, which the service uses, needs only Pillow and numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "CONFIG_NAMES",
    "VGG",
    "DenseVGG",
    "build",
    "cfgs",
    "init_weights",
    "init_from_shallower",
    "num_parameters",
    "to_dense",
    "weight_layer_count",
]

_SUBMODULE_OF = {
    "DenseVGG": "vgg.dense",
    "to_dense": "vgg.dense",
    "CONFIG_NAMES": "vgg.model",
    "VGG": "vgg.model",
    "build": "vgg.model",
    "cfgs": "vgg.model",
    "init_weights": "vgg.model",
    "num_parameters": "vgg.model",
    "weight_layer_count": "vgg.model",
    "init_from_shallower": "vgg.pretrain",
}

if TYPE_CHECKING:
    from vgg.dense import DenseVGG, to_dense
    from vgg.model import CONFIG_NAMES, VGG, build, cfgs, init_weights, num_parameters, weight_layer_count
    from vgg.pretrain import init_from_shallower


_SUBMODULES = ("checkpoint", "dense", "errors", "model", "preprocessing", "pretrain", "protocols", "store")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULE_OF:
        value = getattr(importlib.import_module(_SUBMODULE_OF[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:  # `import vgg; vgg.model.X` worked when __init__ imported eagerly
        return importlib.import_module(f"vgg.{name}")
    raise AttributeError(f"module 'vgg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
