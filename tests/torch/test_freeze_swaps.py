"""freeze_bn/unfreeze_bn selections by name, and freeze records across layer swaps."""
from __future__ import annotations

import copy

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


def _frozen_model() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    freeze_bn(model)
    return model


def test_the_affine_freeze_moves_with_parameters_into_a_new_layer():
    """nn.SyncBatchNorm.convert_sync_batchnorm builds a new module around the same Parameter objects (the oracle
    for 'moved': identity): the stats freeze stays behind, the affine one moves, is_frozen says both, and
    unfreeze_bn gives gamma/beta back requires_grad=True, as before freeze_bn."""
    model = _frozen_model()
    weight = model[1].weight
    swapped = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert swapped[1].weight is weight and not weight.requires_grad
    assert is_frozen(swapped[1], "affine") and not is_frozen(swapped[1], "stats")
    unfreeze_bn(swapped)
    assert weight.requires_grad and swapped[1].bias.requires_grad and not is_frozen(swapped)


def test_freezing_again_after_a_swap_keeps_the_flags_from_before_the_first_freeze():
    """freeze_bn -> convert_sync_batchnorm -> freeze_bn -> unfreeze_bn ends with requires_grad=True, the flag
    gamma/beta had before the first freeze (not the False the swap carried over)."""
    swapped = nn.SyncBatchNorm.convert_sync_batchnorm(_frozen_model())
    freeze_bn(swapped)
    assert is_frozen(swapped, "all")
    unfreeze_bn(swapped)
    assert swapped[1].weight.requires_grad and swapped[1].bias.requires_grad


@pytest.mark.parametrize("copy_kind", ["deepcopy", "torch.save"])
def test_a_copied_frozen_model_unfreezes_to_the_flags_from_before(copy_kind, tmp_path):
    """deepcopy (which makes new Parameters without their attributes) and torch.save/torch.load of the whole
    model: the copy is frozen in both parts, and unfreeze_bn gives it requires_grad=True back, like the
    original."""
    model = _frozen_model()
    model[1].weight.requires_grad_(True)  # unfrozen behind bnkit's back, then frozen again: flag from before kept
    freeze_bn(model)
    if copy_kind == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "m.pt")
        twin = torch.load(tmp_path / "m.pt", weights_only=False)
    assert is_frozen(twin, "all") and not twin[1].weight.requires_grad
    swapped = nn.SyncBatchNorm.convert_sync_batchnorm(twin) if copy_kind == "torch.save" else twin
    unfreeze_bn(swapped)
    assert swapped[1].weight.requires_grad and swapped[1].bias.requires_grad


def test_a_state_dict_carries_no_freeze_into_a_fresh_model():
    """load_state_dict copies values into the fresh model's own Parameters: it stays unfrozen and trainable,
    as a fresh nn.BatchNorm2d is."""
    fresh = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    fresh.load_state_dict(_frozen_model().state_dict())
    assert not is_frozen(fresh) and fresh[1].weight.requires_grad
