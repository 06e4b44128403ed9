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


@pytest.mark.parametrize("extras", [{"renorm": True}, {"virtual_batch_size": 2}, {"debias": True}])
def test_integer_input_in_training_mode_is_refused_before_any_buffer_changes(extras):
    """renorm's float32 arithmetic took a uint8 batch and cast its output back to uint8 (negatives wrapped,
    fractions lost), updating the statistics; PyTorch's BatchNorm refuses such input. Refused by every extra,
    before the counter or the statistics change. Oracle: nn.BatchNorm2d's own refusal."""
    x = torch.randint(0, 20, (4, 3, 2, 2), dtype=torch.uint8)
    with pytest.raises((NotImplementedError, RuntimeError)):
        nn.BatchNorm2d(3).train()(x)
    layer = bt.BatchNorm2d(3, **extras).train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match="takes floating-point input, got torch.uint8"):
        layer(x)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
