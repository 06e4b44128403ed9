"""bnkit.torch.modules.deep_copy, and fold_bn / revert_sync_bn that copy a model with it, on models with the
old-style ``nn.utils.weight_norm`` / ``spectral_norm`` hooks, whose computed weight (a non-leaf tensor kept as a plain
attribute) ``copy.deepcopy`` refuses: the original is left untouched, the copy keeps its own hook.

Oracle: PyTorch's own eval output of the untouched original; ``copy.deepcopy`` refusing the model.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _helpers import rel
from torch import nn

from bnkit.torch import fold_bn, revert_sync_bn


HOOKS = {"weight_norm": nn.utils.weight_norm, "spectral_norm": nn.utils.spectral_norm}


STATES = ["fresh", "after a training step", "after a no-grad forward"]


def hooked_model(hook: str, state: str, bn: type = nn.BatchNorm2d) -> tuple[nn.Module, torch.Tensor]:
    """``hook(Conv) -> BN -> ReLU -> Conv -> BN`` in eval mode, in ``state``; and an example input."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates the old-style weight_norm
        conv = HOOKS[hook](nn.Conv2d(3, 4, 3))
    model = nn.Sequential(conv, bn(4), nn.ReLU(), nn.Conv2d(4, 4, 3), bn(4))
    with torch.no_grad():
        for layer in (model[1], model[4]):
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
            layer.num_batches_tracked.fill_(100)
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    if state == "after a training step":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loss = model(torch.randn(8, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    if state == "after a no-grad forward":
        with torch.no_grad():
            model(x)
    return model, x


class Snapshot:
    """The model's state dict (cloned), and the hook's computed-weight attribute: the object and its values."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.types = [type(m) for m in model.modules()]
        self.weight = model[0].weight
        self.weight_value = model[0].weight.detach().clone()
        self.grad_fn = model[0].weight.grad_fn

    def assert_untouched(self) -> None:
        model = self.model
        assert [type(m) for m in model.modules()] == self.types
        state = model.state_dict()
        assert state.keys() == self.state.keys()
        for k, v in self.state.items():
            assert torch.equal(state[k], v), k
        assert model[0].weight is self.weight
        assert torch.equal(model[0].weight.detach(), self.weight_value)
        assert model[0].weight.grad_fn is self.grad_fn


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_fold_bn_copies_models_with_old_style_weight_hooks(hook, state):
    model, x = hooked_model(hook, state)
    snap = Snapshot(model)
    folded, report = fold_bn(model, x)
    snap.assert_untouched()

    # the BN after the plain conv is folded (gone from the copy), the one after the hooked conv left with a reason
    assert [(f.bn, f.into) for f in report.folded] == [("4", "3")]
    assert isinstance(folded[4], nn.Identity)
    assert set(report.left) == {"1"} and "'0'" in report.left["1"]
    assert type(folded[1]) is nn.BatchNorm2d
    assert folded[0] is not model[0] and folded[0]._forward_pre_hooks  # the copy keeps its own hook
    with torch.no_grad():
        expected = model(x)  # the original's own eval output (the hook recomputes its weight)
        got = folded(x)
    assert rel(got.numpy(), expected.numpy()) < 1e-5


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_revert_sync_bn_copies_models_with_old_style_weight_hooks(hook, state):
    model, x = hooked_model(hook, state, bn=nn.SyncBatchNorm)
    snap = Snapshot(model)
    plain = revert_sync_bn(model, x)
    snap.assert_untouched()

    assert type(plain[1]) is nn.BatchNorm2d and type(plain[4]) is nn.BatchNorm2d
    assert plain[0] is not model[0] and plain[0]._forward_pre_hooks
    with torch.no_grad():
        expected = model(x)
        got = plain(x)
    torch.testing.assert_close(got, expected)


def test_deep_copy_copies_a_non_leaf_tensor_attribute_detached_and_equal():
    from bnkit.torch.modules import deep_copy

    class Computed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.randn(5))
            self.scaled = self.p * 2  # a computed tensor kept as a plain attribute, as the old hooks do

    module = nn.Sequential(Computed())
    with pytest.raises(RuntimeError):
        copy.deepcopy(module)  # the reason deep_copy exists: PyTorch refuses this
    original = module[0].scaled
    copied = deep_copy(module)
    c = copied[0].scaled
    assert c is not original and c.grad_fn is None and not c.requires_grad
    assert torch.equal(c, original.detach())
    assert c.data_ptr() != original.data_ptr()  # its own storage
    assert isinstance(copied[0].p, nn.Parameter) and copied[0].p is not module[0].p
    assert torch.equal(copied[0].p, module[0].p)
    assert module[0].scaled is original and original.grad_fn is not None  # the original keeps its graph


def test_a_freeze_carried_by_the_parameters_survives_revert_sync_bn():
    """freeze_bn's affine record moves with the Parameter objects through convert_sync_batchnorm (which swaps the
    layer); revert_sync_bn deep-copies the model, and Parameter.__deepcopy__ dropped that record, so the reverted
    layer's weight kept requires_grad=False with no freeze to undo (review). Oracle: unfreeze_bn restoring
    requires_grad, as on the model that was never converted."""
    from bnkit.torch import freeze_bn, is_frozen, unfreeze_bn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    freeze_bn(model, stats=False)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    reverted = revert_sync_bn(sync, torch.randn(2, 3, 5, 5))
    assert is_frozen(reverted[1], "affine") and not reverted[1].weight.requires_grad
    assert reverted[1].weight is not sync[1].weight  # a copy, with the record
    unfreeze_bn(reverted)
    assert reverted[1].weight.requires_grad and reverted[1].bias.requires_grad
    assert not sync[1].weight.requires_grad  # the source keeps its own freeze
