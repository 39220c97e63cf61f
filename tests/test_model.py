"""The model against the paper's Tables 1 and 2 and against torchvision's VGG."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

import vgg
from vgg.dense import feature_size
from vgg.model import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, PAPER_INIT_STD, parse_token
from vgg.pretrain import conv_positions

# Table 2 of the paper (millions in the paper; exact counts for 1000 classes).
PAPER_PARAMETERS = {
    "A": 132_863_336,
    "A-LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
}
# Table 1: weight layers per configuration.
PAPER_DEPTH = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}
TORCHVISION_NAMES = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}


def small(cfg: str, **kwargs) -> vgg.VGG:
    return vgg.build(cfg, num_classes=kwargs.pop("num_classes", 10), fc_width=kwargs.pop("fc_width", 64), **kwargs)


@pytest.mark.parametrize("cfg", vgg.CONFIG_NAMES)
def test_parameter_count_matches_table_2(cfg):
    assert vgg.num_parameters(vgg.build(cfg)) == PAPER_PARAMETERS[cfg]


@pytest.mark.parametrize("cfg", vgg.CONFIG_NAMES)
def test_depth_matches_table_1(cfg):
    model = small(cfg)
    weight_layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weight_layers) == PAPER_DEPTH[cfg] == vgg.weight_layer_count(cfg)


@pytest.mark.parametrize("cfg", vgg.CONFIG_NAMES)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_batch_norm_follows_every_conv(cfg, batch_norm):
    model = small(cfg, batch_norm=batch_norm)
    layers = list(model.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            if batch_norm:
                assert isinstance(layers[i + 1], nn.BatchNorm2d)
                assert layers[i + 1].num_features == layer.out_channels
                assert isinstance(layers[i + 2], nn.ReLU)
            else:
                assert isinstance(layers[i + 1], nn.ReLU)
    assert any(isinstance(m, nn.BatchNorm2d) for m in layers) == batch_norm


@pytest.mark.slow
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("cfg", sorted(TORCHVISION_NAMES))
def test_torchvision_state_dict_loads_strictly_and_gives_same_outputs(cfg, batch_norm):
    name = TORCHVISION_NAMES[cfg] + ("_bn" if batch_norm else "")
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    if batch_norm:  # non-trivial running statistics, so eval-mode BN is really compared
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    ours = vgg.build(cfg, batch_norm=batch_norm).eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg", vgg.CONFIG_NAMES)
@pytest.mark.parametrize("size", [32, 64, 224])
def test_output_shape(cfg, size):
    model = small(cfg, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)
        assert model.forward_features(torch.randn(1, 3, size, size)).shape == (1, 512, size // 32, size // 32)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", vgg.CONFIG_NAMES)
def test_dense_equals_fc_at_224_and_gives_score_map_at_320(cfg):
    torch.manual_seed(0)
    model = vgg.build(cfg, init="kaiming").eval()
    dense = vgg.to_dense(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), rtol=0, atol=1e-5)
        scores = dense.score_map(torch.randn(1, 3, 320, 320))
    # 320 / 32 = 10x10 features; a 7x7 conv leaves a 4x4 map of 1000 class scores.
    assert scores.shape == (1, 1000, 4, 4)
    assert dense.fc6.kernel_size == (7, 7) and dense.fc7.kernel_size == (1, 1) and dense.fc8.kernel_size == (1, 1)


@pytest.mark.parametrize("crop", [32, 56, 64, 96])
def test_dense_equals_fc_for_smaller_training_crops(crop):
    torch.manual_seed(1)
    model = small("A", init="kaiming").eval()
    dense = vgg.to_dense(model, crop=crop)
    assert dense.fc6.kernel_size == (feature_size(crop),) * 2
    x = torch.randn(3, 3, crop, crop)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), rtol=0, atol=1e-5)
        larger = dense.score_map(torch.randn(1, 3, crop + 64, crop + 64))
    assert larger.shape == (1, 10, 3, 3)


def test_dense_averages_the_score_map():
    model = small("A").eval()
    dense = vgg.to_dense(model, crop=32)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), dense.score_map(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("cfg", vgg.CONFIG_NAMES)
def test_paper_init_statistics(cfg):
    torch.manual_seed(0)
    model = small(cfg, init="paper")
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    biases = torch.cat([m.bias for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    assert abs(weights.mean().item()) < 1e-4
    assert weights.std().item() == pytest.approx(PAPER_INIT_STD, rel=0.01)
    assert torch.count_nonzero(biases) == 0


def _largest_conv(model: nn.Module) -> nn.Conv2d:
    return max((m for m in model.modules() if isinstance(m, nn.Conv2d)), key=lambda m: m.weight.numel())


def test_glorot_init_statistics():
    torch.manual_seed(0)
    conv = _largest_conv(small("D", init="glorot"))  # 512 x 512 x 3 x 3
    fan_in = fan_out = 512 * 9
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert conv.weight.abs().max().item() <= bound
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.01)
    assert torch.count_nonzero(conv.bias) == 0


def test_kaiming_init_statistics():
    torch.manual_seed(0)
    model = small("D", init="kaiming", fc_width=1024)
    conv = _largest_conv(model)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.01)
    assert model.classifier[0].weight.std().item() == pytest.approx(0.01, rel=0.01)


def test_unknown_init_and_cfg_are_rejected():
    with pytest.raises(ValueError, match="unknown init"):
        vgg.build("A", init="xavier")
    with pytest.raises(ValueError, match="unknown VGG configuration 'F'"):
        vgg.build("F")


def test_lrn_only_in_a_lrn_after_first_conv_before_first_pool():
    layers = list(small("A-LRN").features)
    lrn_indices = [i for i, m in enumerate(layers) if isinstance(m, nn.LocalResponseNorm)]
    assert lrn_indices == [2]  # conv, relu, LRN
    assert isinstance(layers[0], nn.Conv2d) and isinstance(layers[3], nn.MaxPool2d)
    lrn = layers[2]
    assert (lrn.size, lrn.k, lrn.beta) == (LRN_SIZE, LRN_K, LRN_BETA)
    for cfg in ("A", "B", "C", "D", "E"):
        assert not any(isinstance(m, nn.LocalResponseNorm) for m in small(cfg).modules())


def test_lrn_matches_alexnet_formula():
    """b = a / (k + alpha * sum over n=5 neighbouring channels of a^2) ** beta, alpha = 1e-4."""
    lrn = small("A-LRN").features[2]
    a = torch.rand(1, 9, 2, 2) * 50
    squares = torch.nn.functional.pad(a.pow(2), (0, 0, 0, 0, 2, 2))
    window_sum = sum(squares[:, i : i + 9] for i in range(5))
    expected = a / (LRN_K + LRN_ALPHA * window_sum) ** LRN_BETA
    torch.testing.assert_close(lrn(a), expected)


def test_c_has_1x1_convs_as_last_conv_of_blocks_3_to_5():
    model = small("C")
    positions = conv_positions(model)
    last_in_block = {}
    for (block, _index), features_index in positions:
        last_in_block[block] = features_index
    one_by_one = [
        (block, m.out_channels) for (block, _), i in positions if (m := model.features[i]).kernel_size == (1, 1)
    ]
    assert one_by_one == [(3, 256), (4, 512), (5, 512)]
    for block in (3, 4, 5):
        assert model.features[last_in_block[block]].kernel_size == (1, 1)
    assert all(m.kernel_size == (3, 3) for m in small("D").modules() if isinstance(m, nn.Conv2d))


def test_unknown_token_is_rejected():
    with pytest.raises(ValueError, match="unknown VGG configuration token"):
        parse_token("conv5-64")


# Pre-initialisation (section 3.1): A's first four convs and three FC layers.
PREINIT_LAYERS = {
    # (block, index) positions (1,1) (2,1) (3,1) (3,2) in each net's `features`.
    "B": ["features.0", "features.5", "features.10", "features.12"],
    "C": ["features.0", "features.5", "features.10", "features.12"],
    "D": ["features.0", "features.5", "features.10", "features.12"],
    "E": ["features.0", "features.5", "features.10", "features.12"],
}


@pytest.mark.parametrize("cfg", sorted(PREINIT_LAYERS))
def test_pre_init_copies_exactly_the_named_tensors(cfg):
    torch.manual_seed(0)
    source = small("A", init="glorot")
    target = small(cfg, init="glorot")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    copied = vgg.init_from_shallower(target, source)
    layers = PREINIT_LAYERS[cfg] + ["classifier.0", "classifier.3", "classifier.6"]
    expected = [f"{layer}.{p}" for layer in layers for p in ("weight", "bias")]
    assert copied == expected
    # A's first four convs are features.0, .3, .6, .8 (conv, relu, pool, conv, relu, pool, conv, relu, conv).
    source_layers = [
        "features.0",
        "features.3",
        "features.6",
        "features.8",
        "classifier.0",
        "classifier.3",
        "classifier.6",
    ]
    source_state, after = source.state_dict(), target.state_dict()
    for target_layer, source_layer in zip(layers, source_layers, strict=True):
        for p in ("weight", "bias"):
            assert torch.equal(after[f"{target_layer}.{p}"], source_state[f"{source_layer}.{p}"])
    for key, value in after.items():
        if key not in copied:
            assert torch.equal(value, before[key]), f"{key} changed"


def test_pre_init_with_batch_norm_copies_the_batch_norm_of_copied_convs():
    source, target = small("A", batch_norm=True), small("D", batch_norm=True)
    for module in source.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.fill_(0.5)
    copied = vgg.init_from_shallower(target, source)
    assert "features.1.running_mean" in copied and "features.1.weight" in copied
    assert torch.equal(target.features[1].running_mean, torch.full((64,), 0.5))
    assert not torch.equal(target.features[4].running_mean, torch.full((64,), 0.5))  # D's second conv untouched


def test_pre_init_refuses_mismatched_heads():
    with pytest.raises(ValueError, match="cannot pre-initialise classifier.6.weight"):
        vgg.init_from_shallower(small("D", num_classes=10), small("A", num_classes=5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_dense_of_a_model_on_the_gpu():
    model = vgg.build("A", num_classes=5, fc_width=16).cuda().eval()
    dense = vgg.to_dense(model, crop=32)
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), rtol=1e-4, atol=1e-4)
