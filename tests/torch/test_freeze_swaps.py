"""freeze_bn/unfreeze_bn selections by name, and freeze records across layer swaps."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bnkit.torch import freeze_bn, is_frozen, unfreeze_bn


def test_either_qualified_name_of_a_shared_layer_selects_it():
    """A BN shared under "a.0" and "b.0": named_modules() lists it once, yet model.get_submodule (the oracle)
    resolves both names to it, so freeze_bn/unfreeze_bn accept both."""
    bn = nn.BatchNorm1d(3)
    model = nn.ModuleDict({"a": nn.Sequential(bn), "b": nn.Sequential(bn)})
    assert model.get_submodule("b.0") is bn
    freeze_bn(model, modules=["b.0"])
    assert is_frozen(bn, "all") and not bn.weight.requires_grad
    unfreeze_bn(model, modules="b.0")
    assert not is_frozen(bn) and bn.weight.requires_grad and bn.training


def test_a_name_that_is_no_bn_layer_or_no_submodule_is_refused_by_name_changing_nothing():
    """A Linear's name and a missing name raise ValueError naming the item; no layer is frozen meanwhile."""
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"'1' \(Linear\) is not a BatchNorm layer"):
        freeze_bn(model, modules=["0", "1"])
    with pytest.raises(ValueError, match=r"'7' is not a BatchNorm layer of the model: it has no submodule"):
        freeze_bn(model, modules=["0", "7"])
    assert not is_frozen(model[0]) and model[0].weight.requires_grad
