"""fold_bn keeps each parameter's ``requires_grad`` (a folded weight or bias trains, or stays frozen, as the original
did; a bias the fold adds follows the weight).

Oracles: the original layers' flags, and the unfolded model's eval output.
"""
from __future__ import annotations

import pytest
import torch
from _helpers import calibrated, rel
from torch import nn

from bnkit.torch import fold_bn


def after_and_before(bias: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """conv 0 <- BN 1 folded after it; BN 3 folded before conv 4 (a 1x1 conv: exact)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=bias), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 2, 1, bias=bias))
    x = torch.randn(8, 3, 8, 8)
    return calibrated(model, x), x


@pytest.mark.parametrize("weight_grad, bias_grad", [(False, True), (True, False)])
def test_fold_bn_keeps_each_parameters_requires_grad(weight_grad, bias_grad):
    model, x = after_and_before()
    for i in (0, 4):
        model[i].weight.requires_grad_(weight_grad)
        model[i].bias.requires_grad_(bias_grad)
    folded, report = fold_bn(model, x)
    assert sorted((f.bn, f.into, f.position) for f in report.folded) == [("1", "0", "after"), ("3", "4", "before")]
    for i in (0, 4):
        assert folded[i].weight.requires_grad is model[i].weight.requires_grad
        assert folded[i].bias.requires_grad is model[i].bias.requires_grad
    with torch.no_grad():
        assert rel(folded(x).numpy(), model(x).numpy()) < 1e-5


@pytest.mark.parametrize("weight_grad", [False, True])
def test_fold_bn_gives_an_added_bias_the_weights_requires_grad(weight_grad):
    model, x = after_and_before(bias=False)
    for i in (0, 4):
        model[i].weight.requires_grad_(weight_grad)
    folded, report = fold_bn(model, x)
    assert len(report.folded) == 2
    for i in (0, 4):
        assert model[i].bias is None
        assert isinstance(folded[i].bias, nn.Parameter)
        assert folded[i].bias.requires_grad is model[i].weight.requires_grad
    with torch.no_grad():
        assert rel(folded(x).numpy(), model(x).numpy()) < 1e-5
