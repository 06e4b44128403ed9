"""Mutation run M10's survivors in the drop-in layers, the frozen layers and freeze_bn, each now pinned.

Oracles: closed-form batch normalization in float64, PyTorch's own F.batch_norm, the layers' documented types."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from bnkit.torch import BatchNorm2d, FrozenBatchNorm2d, freeze_bn


@pytest.mark.parametrize("extras", [{"debias": True}, {"virtual_batch_size": 8}, {"running_var_rule": "biased"}])
def test_the_extras_training_output_uses_the_layers_own_eps(extras):
    """eps = 0.1 on inputs of variance ~0.04: normalizing with 1e-5 instead would be far off."""
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.2
    layer = BatchNorm2d(3, eps=0.1, affine=False, dtype=torch.float64, **extras).train()
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(layer(x), (x - mean) / torch.sqrt(var + 0.1))


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_a_frozen_layer_refuses_an_eps_that_is_not_positive(eps):
    with pytest.raises(ValueError, match="eps must be positive"):
        FrozenBatchNorm2d(3, eps=eps)


def test_extras_train_a_layer_whose_running_buffers_were_set_to_none():
    """As nn.BatchNorm does, a layer whose running_mean/var are None normalizes with batch statistics only
    (here per ghost batch); before, the extras' update crashed on None.copy_."""
    layer = BatchNorm2d(3, virtual_batch_size=2).train()
    layer.running_mean = layer.running_var = None
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    want = torch.cat([F.batch_norm(c, None, None, layer.weight, layer.bias, True, 0.0, layer.eps) for c in x.split(2)])
    torch.testing.assert_close(layer(x), want)


def test_renorm_clip_of_an_int_or_the_next_step_gives_floats():
    """Documented: floats, unless the step is a tensor (then float64 tensors on its device)."""
    layer = BatchNorm2d(3, renorm=True, renorm_schedule=(1, 4, 3))
    for rmax, dmax in (layer.renorm_clip(), layer.renorm_clip(2)):
        assert type(rmax) is float and type(dmax) is float
    rmax, dmax = layer.renorm_clip(torch.tensor(2))
    assert rmax.dtype == dmax.dtype == torch.float64


def test_a_stats_frozen_layer_passes_train_and_eval_on_to_its_submodules():
    """A parametrized weight lives in submodules (parametrizations.weight): their mode must follow model.train()
    and model.eval() as nn.Module.train would pass it on, while the frozen layer itself stays in eval mode."""
    bn = nn.BatchNorm2d(3)
    parametrize.register_parametrization(bn, "weight", nn.Identity())
    model = nn.Sequential(bn)
    freeze_bn(model, affine=False)
    inner = bn.parametrizations.weight[0]
    model.eval()
    assert not inner.training and not bn.training
    model.train()
    assert inner.training and not bn.training
