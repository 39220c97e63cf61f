"""VGG (Simonyan & Zisserman, arXiv:1409.1556): model, dense evaluation, pre-initialisation."""

from vgg.dense import DenseVGG, to_dense
from vgg.model import CONFIG_NAMES, VGG, build, cfgs, init_weights, num_parameters, weight_layer_count
from vgg.pretrain import init_from_shallower

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
