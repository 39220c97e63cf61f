"""Pre-initialisation of a deeper net from a trained configuration A (paper, section 3.1).

"When training deeper architectures, we initialised the first four convolutional layers
and the last three fully-connected layers with the layers of net A (the intermediate
layers were initialised randomly)."

A's first four convolutions are the first conv of blocks 1 and 2 and the two convs of
block 3 (3->64, 64->128, 128->256, 256->256). In a deeper net the layers with those
shapes are at the same positions: (block, index in block) = (1, 1), (2, 1), (3, 1),
(3, 2). So layers are matched by that position, not by their running count (the deeper
net's second conv is 64->64 and could not take A's 64->128 weights).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from vgg.model import VGG

__all__ = ["conv_positions", "init_from_shallower", "PREINIT_CONV_COUNT"]

log = logging.getLogger(__name__)

PREINIT_CONV_COUNT = 4  # "the first four convolutional layers"


def conv_positions(model: VGG) -> list[tuple[tuple[int, int], int]]:
    """``[((block, index_in_block), features_index), ...]`` for every conv, 1-based positions."""
    positions, block, index = [], 1, 0
    for i, module in enumerate(model.features):
        if isinstance(module, nn.MaxPool2d):
            block, index = block + 1, 0
        elif isinstance(module, nn.Conv2d):
            index += 1
            positions.append(((block, index), i))
    return positions


def _batch_norm_after(model: VGG, conv_index: int) -> nn.BatchNorm2d | None:
    following = model.features[conv_index + 1] if conv_index + 1 < len(model.features) else None
    return following if isinstance(following, nn.BatchNorm2d) else None


def _layer_pairs(target: VGG, source: VGG) -> list[tuple[str, str]]:
    """(target module name, source module name) for every layer to copy."""
    target_by_position = dict(conv_positions(target))
    pairs = []
    for position, source_index in conv_positions(source)[:PREINIT_CONV_COUNT]:
        if position not in target_by_position:
            raise ValueError(f"the target net has no conv at block {position[0]}, index {position[1]}")
        target_index = target_by_position[position]
        pairs.append((f"features.{target_index}", f"features.{source_index}"))
        if _batch_norm_after(source, source_index) and _batch_norm_after(target, target_index):
            pairs.append((f"features.{target_index + 1}", f"features.{source_index + 1}"))
    fc_indices = [i for i, m in enumerate(source.classifier) if isinstance(m, nn.Linear)]
    pairs += [(f"classifier.{i}", f"classifier.{i}") for i in fc_indices]
    return pairs


@torch.no_grad()
def init_from_shallower(target: VGG, source: VGG) -> list[str]:
    """Copy ``source``'s first four convs and three FC layers into ``target`` in place.

    Returns the ``state_dict`` keys of ``target`` that were overwritten. Every other
    tensor keeps its value. Raises ``ValueError`` if a shape differs (e.g. another
    number of classes).
    """
    target_state, source_state = target.state_dict(), source.state_dict()
    copied = []
    for target_name, source_name in _layer_pairs(target, source):
        for suffix in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            key, source_key = f"{target_name}.{suffix}", f"{source_name}.{suffix}"
            if key not in target_state or source_key not in source_state:
                continue
            if target_state[key].shape != source_state[source_key].shape:
                raise ValueError(
                    f"cannot pre-initialise {key} {tuple(target_state[key].shape)} "
                    f"from {source_key} {tuple(source_state[source_key].shape)}"
                )
            target_state[key].copy_(source_state[source_key])
            copied.append(key)
    log.info("pre-initialised %d tensors from the shallower net: %s", len(copied), ", ".join(copied))
    return copied
