"""Batch Renormalization on a layer whose running statistics were removed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import bnkit.torch as bt


def test_renorm_without_running_buffers_is_refused_by_name_changing_nothing():
    """running_mean = running_var = None is a state nn.BatchNorm2d (the oracle) trains in, with batch statistics;
    renorm needs the running statistics for r and d, so the step raises ValueError naming the layer, and the
    step counter, weight and training flag stay as they were."""
    x = torch.randn(4, 3, 2, 2)
    ref = nn.BatchNorm2d(3).train()
    ref.running_mean = ref.running_var = None
    assert ref(x).shape == x.shape
    layer = bt.BatchNorm2d(3, renorm=True, layer_name="stem.bn").train()
    layer.running_mean = layer.running_var = None
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"BatchNorm layer 'stem.bn': renorm=True needs running statistics"):
        layer(x)
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.weight, weight) and layer.training
