"""VGG networks of Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition" (ICLR 2015, arXiv:1409.1556).

The architecture is plain data: :data:`cfgs` holds the six columns of the paper's
Table 1 as token lists, and one private builder turns a token list into layers.
Module names and ``state_dict`` keys match torchvision's ``VGG`` (``features.N``,
``avgpool``, ``classifier.N``), so torchvision ``vgg11/13/16/19`` (and ``_bn``)
weights load with ``strict=True`` into configurations A, B, D and E.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["VGG", "cfgs", "build", "parse_token", "CONFIG_NAMES", "Init"]

Token = int | str
Init = Literal["paper", "glorot", "kaiming"]

# Tokens of the configuration data (paper, Table 1):
#   int           conv3-<int>: a 3x3 convolution, stride 1, padding 1, then ReLU
#   "conv1-<int>" a 1x1 convolution (configuration C), then ReLU
#   "LRN"         Local Response Normalisation (configuration A-LRN)
#   "M"           2x2 max-pooling, stride 2
cfgs: dict[str, list[Token]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        "conv1-256",
        "M",
        512,
        512,
        "conv1-512",
        "M",
        512,
        512,
        "conv1-512",
        "M",
    ],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
CONFIG_NAMES: tuple[str, ...] = tuple(cfgs)

# AlexNet's LRN (Krizhevsky et al. 2012, section 3.3), as the paper uses it:
#   b = a / (k + alpha * sum_{n neighbours} a^2) ** beta,  n=5, k=2, alpha=1e-4, beta=0.75.
# torch.nn.LocalResponseNorm divides alpha by the window size n, so alpha_torch = alpha * n.
LRN_SIZE = 5
LRN_K = 2.0
LRN_ALPHA = 1e-4
LRN_BETA = 0.75

# Standard deviation of the "paper" initialisation. Section 3.1 says weights are drawn
# from a zero-mean normal with "10^-2 variance" (std 0.1). Taken literally, std 0.1 on a
# 3x3x512 fan-in multiplies the activation scale by ~4.8 per layer (~1e7 after 11 layers)
# and training diverges at the paper's learning rate 1e-2. The authors' Caffe setup, like
# AlexNet's, used std 1e-2 (a variance of 1e-4), which is also what torchvision uses for
# the FC layers; a std of 1e-4 would make the signal vanish entirely. We use 1e-2.
PAPER_INIT_STD = 1e-2

FC_WIDTH = 4096  # paper, section 2.1: two FC layers of 4096 channels
POOLED_SIZE = 7  # 224 / 2**5: the spatial size the first FC layer sees


def parse_token(token: Token) -> tuple[str, int | None]:
    """Return ``(kind, out_channels)`` for a configuration token.

    ``kind`` is one of ``"conv3"``, ``"conv1"``, ``"lrn"``, ``"pool"``.
    """
    if isinstance(token, int):
        return "conv3", token
    if token == "M":
        return "pool", None
    if token == "LRN":
        return "lrn", None
    if token.startswith("conv1-"):
        return "conv1", int(token.removeprefix("conv1-"))
    raise ValueError(f"unknown VGG configuration token {token!r}")


def _make_features(tokens: list[Token], *, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for token in tokens:
        kind, out_channels = parse_token(token)
        if kind == "pool":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif kind == "lrn":
            # After the ReLU, as in AlexNet, so that it normalises the first conv's responses.
            layers.append(nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE, beta=LRN_BETA, k=LRN_K))
        else:
            kernel = 3 if kind == "conv3" else 1
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=kernel // 2))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            in_channels = out_channels
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """A VGG net: ``features`` (conv stack), ``avgpool`` and ``classifier`` (three FC layers).

    ``forward_features`` returns the last conv feature map; ``forward_head`` the class
    scores from it (paper, section 2.1). For a 224x224 input ``avgpool`` is the identity.
    """

    def __init__(
        self,
        features: nn.Sequential,
        *,
        num_classes: int = 1000,
        dropout: float = 0.5,
        fc_width: int = FC_WIDTH,
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((POOLED_SIZE, POOLED_SIZE))
        # Dropout 0.5 on the first two FC layers (paper, section 3.1).
        self.classifier = nn.Sequential(
            nn.Linear(512 * POOLED_SIZE * POOLED_SIZE, fc_width),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(fc_width, fc_width),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(fc_width, num_classes),
        )

    @property
    def num_classes(self) -> int:
        return self.classifier[-1].out_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def init_weights(model: nn.Module, init: Init) -> None:
    """Initialise conv and FC layers in place; biases zero, BatchNorm to (1, 0).

    - ``"paper"``: zero-mean normal, std :data:`PAPER_INIT_STD` (section 3.1).
    - ``"glorot"``: Glorot & Bengio (2010) uniform; the paper's note (section 3.1) that
      this trains the deep nets without pre-training.
    - ``"kaiming"``: torchvision's choice: He normal (fan-out) for convs, N(0, 0.01) for FC.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if init == "paper":
                nn.init.normal_(module.weight, 0.0, PAPER_INIT_STD)
            elif init == "glorot":
                nn.init.xavier_uniform_(module.weight)
            elif init == "kaiming":
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.normal_(module.weight, 0.0, 0.01)
            else:
                raise ValueError(f"unknown init {init!r}; choose paper, glorot or kaiming")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build(
    cfg: str,
    *,
    num_classes: int = 1000,
    batch_norm: bool = False,
    dropout: float = 0.5,
    init: Init = "paper",
    fc_width: int = FC_WIDTH,
) -> VGG:
    """Build configuration ``cfg`` (``"A"``, ``"A-LRN"``, ``"B"``, ``"C"``, ``"D"`` or ``"E"``)
    of the paper's Table 1, optionally with BatchNorm after every convolution.

    ``fc_width`` is the paper's 4096; a smaller value gives a light head for small data
    sets and fast tests (the conv stack and all module names stay the paper's).
    """
    if cfg not in cfgs:
        raise ValueError(f"unknown VGG configuration {cfg!r}; choose one of {', '.join(CONFIG_NAMES)}")
    if num_classes < 1 or fc_width < 1:
        raise ValueError(f"num_classes and fc_width must be positive, got {num_classes} and {fc_width}")
    features = _make_features(cfgs[cfg], batch_norm=batch_norm)
    model = VGG(features, num_classes=num_classes, dropout=dropout, fc_width=fc_width)
    init_weights(model, init)
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_layer_count(cfg: str) -> int:
    return sum(parse_token(t)[0] in ("conv3", "conv1") for t in cfgs[cfg])


def weight_layer_count(cfg: str) -> int:
    """Depth in weight layers as in Table 1 (11, 11, 13, 16, 16, 19)."""
    return conv_layer_count(cfg) + 3
