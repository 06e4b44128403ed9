"""convert_frozen(modules=...) takes what freeze_bn's modules= takes: qualified names and a single layer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bnkit.torch import FrozenBatchNorm2d, convert_frozen


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)).eval()


@pytest.mark.parametrize("pick", [["1"], "1", "single-module"], ids=["name-list", "name", "module"])
def test_a_name_or_a_single_layer_converts_that_layer_only(pick):
    """The layer model.get_submodule('1') gives (the oracle) becomes frozen, with the same eval output as
    PyTorch's BatchNorm2d; layer '2' stays a BatchNorm2d."""
    model = _model()
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    convert_frozen(model, modules=model.get_submodule("1") if pick == "single-module" else pick)
    assert type(model[1]) is FrozenBatchNorm2d and type(model[2]) is nn.BatchNorm2d
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_a_name_that_is_not_a_bn_layer_is_refused_naming_it():
    """'0' is a Conv2d: ValueError naming '0', and nothing is converted."""
    model = _model()
    with pytest.raises(ValueError, match=r"'0' \(Conv2d\) is not a BatchNorm layer"):
        convert_frozen(model, modules=["1", "0"])
    assert type(model[1]) is nn.BatchNorm2d


@pytest.mark.parametrize("container", ["ModuleList", "Sequential", "ModuleDict"])
def test_a_container_of_bn_layers_selects_its_layers(container):
    """modules=model.bns (an nn.ModuleList, nn.Sequential, or nn.ModuleDict's values) converts those layers, as a
    list of them does; the conv and the BN outside it stay as they are; eval output equal to PyTorch's BN."""
    torch.manual_seed(0)
    layers = [nn.BatchNorm2d(4), nn.BatchNorm2d(4)]
    model = nn.Module()
    model.conv, model.other = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
    model.bns = (nn.ModuleDict({"a": layers[0], "b": layers[1]}) if container == "ModuleDict"
                 else nn.ModuleList(layers) if container == "ModuleList" else nn.Sequential(*layers))
    model.eval()
    x = torch.randn(2, 4, 5, 5)
    expected = [bn(x) for bn in layers]
    convert_frozen(model, modules=model.bns)
    converted = list(model.bns.values()) if container == "ModuleDict" else list(model.bns)
    assert all(type(bn) is FrozenBatchNorm2d for bn in converted) and type(model.other) is nn.BatchNorm2d
    for bn, want in zip(converted, expected):
        torch.testing.assert_close(bn(x), want, rtol=0, atol=0)
