"""FrozenBatchNorm*d against nn.BatchNorm*d in eval mode; convert_frozen / revert_frozen round trips."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnkit.torch import (
    BatchNorm1d, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, bn_layers, convert_bn, convert_frozen,
    freeze_bn, frozen_bn_layers, is_frozen, revert_frozen,
)
from bnkit.torch.frozen import FrozenBatchNormNd
from bnkit.torch.zoo import SmallResNet, example_input


def _trained_bn(cls, c=3, seed=0, **kw):
    torch.manual_seed(seed)
    bn = cls(c, **kw)
    with torch.no_grad():
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.1, 3)
        bn.num_batches_tracked.fill_(7)
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 2)
        if bn.bias is not None:
            bn.bias.uniform_(-1, 1)
    return bn


@pytest.mark.parametrize("bn_cls,frozen_cls,shape", [
    (nn.BatchNorm1d, FrozenBatchNorm1d, (4, 3)), (nn.BatchNorm1d, FrozenBatchNorm1d, (4, 3, 6)),
    (nn.BatchNorm2d, FrozenBatchNorm2d, (2, 3, 4, 5)), (nn.BatchNorm3d, FrozenBatchNorm3d, (2, 3, 2, 2, 3)),
])
@pytest.mark.parametrize("affine", [True, False])
def test_frozen_equals_batchnorm_in_eval_and_the_closed_form(bn_cls, frozen_cls, shape, affine):
    bn = _trained_bn(bn_cls, affine=affine, eps=1e-3)
    frozen = frozen_cls(3, eps=1e-3, affine=affine)
    frozen.load_state_dict(bn.state_dict(), strict=True)
    assert list(frozen.parameters()) == []
    assert frozen.state_dict().keys() == bn.state_dict().keys()
    x = torch.randn(shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    frozen.train()  # no training mode to speak of
    y = frozen(x)
    assert torch.equal(y, bn.eval()(x2))
    # float64 closed form
    view = (1, 3) + (1,) * (len(shape) - 2)
    expect = x.detach().double() - bn.running_mean.double().view(view)
    expect = expect / torch.sqrt(bn.running_var.double().view(view) + 1e-3)
    if affine:
        expect = expect * bn.weight.detach().double().view(view) + bn.bias.detach().double().view(view)
    torch.testing.assert_close(y.double(), expect, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    bn(x2).mul(g).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert int(frozen.num_batches_tracked) == 7 and torch.equal(frozen.running_mean, bn.running_mean)


def test_torchvision_style_state_dict_without_counter_loads():
    bn = _trained_bn(nn.BatchNorm2d)
    sd = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    frozen = FrozenBatchNorm2d(3)
    frozen.load_state_dict(sd, strict=True)
    assert torch.equal(frozen.running_var, bn.running_var) and int(frozen.num_batches_tracked) == 0
    with pytest.raises(RuntimeError, match="running_var"):
        FrozenBatchNorm2d(3).load_state_dict({k: v for k, v in sd.items() if k != "running_var"})


@pytest.mark.parametrize("cls,shape", [(FrozenBatchNorm1d, (2, 3, 1, 1)), (FrozenBatchNorm2d, (2, 3)),
                                       (FrozenBatchNorm3d, (2, 4, 1, 1, 1)), (FrozenBatchNormNd, (3,))])
def test_wrong_shapes_are_named(cls, shape):
    with pytest.raises(ValueError, match="expects"):
        cls(3)(torch.randn(shape))


_SCRIPTS_AND_EXPORTS = """
import warnings
import torch
from torch import nn
from bnkit.torch import bn_layers, convert_frozen

warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated in torch 2.13
model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(27, 4), nn.BatchNorm1d(4))
for _, bn in bn_layers(model):
    bn.running_var.fill_(2.0)
model = convert_frozen(model)
x = torch.randn(2, 1, 5, 5)
assert torch.equal(torch.jit.script(model)(x), model(x))
try:
    torch.jit.script(model[1])(torch.randn(2, 3, 5))
    raise AssertionError("a 3-D input passed FrozenBatchNorm2d")
except torch.jit.Error as exc:
    assert "expects 4D input" in str(exc), exc
exported = torch.export.export(model, (x,))
torch.testing.assert_close(exported.module()(x), model(x))
print("ok")
"""


def test_frozen_model_scripts_and_exports():
    """Run in a fresh interpreter: torch.jit.script of a Conv2d failed once inside the whole suite ('builtin cannot
    be used as a value' compiling its F.pad call), an order-dependent state of TorchScript's compiler that no single
    test file reproduces; the frozen layers' own scripting is what is tested here."""
    import subprocess
    import sys

    from _helpers import bnkit_env

    result = subprocess.run([sys.executable, "-c", _SCRIPTS_AND_EXPORTS], capture_output=True, text=True,
                            timeout=300, env=bnkit_env())
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_frozen_works_on_a_batch_of_one():
    assert FrozenBatchNorm2d(3)(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)


def _mixed_model():
    torch.manual_seed(0)
    model = nn.Sequential(SmallResNet(), nn.Dropout(0.2))
    with torch.no_grad():
        model(example_input("resnet", batch=8))
    model.train()
    model[0].stem[1].eval()
    model[0].layers[0].bn1.weight.requires_grad_(False)
    return model


def test_convert_and_revert_round_trip_exactly():
    model = _mixed_model()
    x = example_input("resnet", batch=4, seed=1)
    reference = copy.deepcopy(model).eval()
    flags = {n: m.training for n, m in model.named_modules()}
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in bn_layers(model)]

    convert_frozen(model)
    assert bn_layers(model) == []
    assert all(isinstance(model.get_submodule(n), FrozenBatchNorm2d) for n in names)
    assert {n: m.training for n, m in model.named_modules()} == flags  # Dropout and all other flags kept
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert v.data_ptr() == tensors[k].data_ptr(), k  # same storage
    assert set(frozen_bn_layers(model)) == set(names) and is_frozen(model[0].stem[1], "all")
    bn_param_ids = {id(tensors[f"{n}.weight"]) for n in names}
    assert not bn_param_ids & {id(p) for p in model.parameters()}
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = model[0](x)
    assert torch.equal(y, reference[0](x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])

    for name in flags:  # restore the flags model.train() changed, then revert
        model.get_submodule(name).training = flags[name]
    revert_frozen(model)
    assert [n for n, _ in bn_layers(model)] == names
    assert all(type(m) is nn.BatchNorm2d for _, m in bn_layers(model))
    assert {n: m.training for n, m in model.named_modules()} == flags
    for k, v in model.state_dict(keep_vars=True).items():
        assert torch.equal(v, state[k]) and v.data_ptr() == tensors[k].data_ptr(), k
        if isinstance(tensors[k], nn.Parameter):
            assert isinstance(v, nn.Parameter) and v.requires_grad == tensors[k].requires_grad, k


def test_revert_restores_drop_in_options_and_freeze():
    model = convert_bn(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), renorm=True, rmax=2.0)
    freeze_bn(model, affine=False)
    convert_frozen(model)
    assert isinstance(model[1], FrozenBatchNorm1d)
    revert_frozen(model)
    assert type(model[1]) is BatchNorm1d and model[1].renorm and model[1].rmax == 2.0
    model.train()
    assert is_frozen(model[1], "stats") and not model[1].training and model[1].weight.requires_grad


def test_deepcopy_and_sync_bn():
    model = nn.Sequential(nn.SyncBatchNorm(3), nn.BatchNorm3d(3))
    convert_frozen(model)
    assert type(model[0]) is FrozenBatchNormNd and type(model[1]) is FrozenBatchNorm3d
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3, 2, 2, 2)
    assert torch.equal(clone(x), model(x))
    revert_frozen(clone)
    assert type(clone[0]) is nn.SyncBatchNorm


def test_bare_layer_and_selection():
    bn = _trained_bn(nn.BatchNorm1d)
    frozen = convert_frozen(bn)
    assert isinstance(frozen, FrozenBatchNorm1d) and frozen.running_mean is bn.running_mean
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    convert_frozen(model, modules=[model[1]])
    assert type(model[0]) is nn.BatchNorm1d and type(model[1]) is FrozenBatchNorm1d
    with pytest.raises(ValueError, match="not BatchNorm layers"):
        convert_frozen(model, modules=[nn.Linear(2, 2)])


def test_direct_frozen_reverts_to_plain_batchnorm():
    frozen = FrozenBatchNorm2d(3, eps=1e-3)
    with torch.no_grad():
        frozen.running_var.fill_(4.0)
    model = nn.Sequential(frozen).eval()
    revert_frozen(model)
    assert type(model[0]) is nn.BatchNorm2d and model[0].eps == 1e-3 and not model[0].training
    assert torch.equal(model[0].running_var, torch.full((3,), 4.0))

    class Custom(FrozenBatchNorm2d):
        pass

    with pytest.raises(ValueError, match="not made by convert_frozen"):
        revert_frozen(nn.Sequential(Custom(3)))


@pytest.mark.parametrize("frozen_cls, shape", [
    (FrozenBatchNorm1d, (4, 3, 5)), (FrozenBatchNorm2d, (2, 3, 4, 4)), (FrozenBatchNorm3d, (2, 3, 2, 3, 2)),
    (FrozenBatchNormNd, (2, 3, 2, 2, 3, 2)),
])
def test_direct_frozen_reverts_sharing_tensors_and_hooks(frozen_cls, shape):
    """A frozen layer built directly reverts over its own tensors with its hooks and attributes, as one made by
    convert_frozen does. Oracle: PyTorch's nn.BatchNorm*d in eval mode loaded with the same values (for the Nd
    layer, nn.BatchNorm1d on the input flattened to (N, C, L))."""
    torch.manual_seed(0)
    frozen = frozen_cls(3, eps=1e-3)
    with torch.no_grad():
        for k in ("weight", "bias", "running_mean"):
            getattr(frozen, k).copy_(torch.randn(3))
        frozen.running_var.copy_(torch.rand(3) + 0.5)
    calls = []
    handle = frozen.register_forward_hook(lambda *a: calls.append("post"))
    frozen.register_forward_pre_hook(lambda *a: calls.append("pre"))
    frozen.tag = "kept"
    old = {k: getattr(frozen, k) for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    model = nn.Sequential(frozen).eval()
    revert_frozen(model)
    bn = model[0]
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.tag == "kept" and not bn.training
    assert bn.affine and bn.track_running_stats and bn.momentum == 0.1 and bn.eps == 1e-3
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert getattr(bn, k) is old[k], k
    for k in ("weight", "bias"):
        p = getattr(bn, k)
        assert isinstance(p, nn.Parameter) and p.requires_grad and p.data_ptr() == old[k].data_ptr(), k
    x = torch.randn(shape)
    oracle_cls = {FrozenBatchNorm1d: nn.BatchNorm1d, FrozenBatchNorm2d: nn.BatchNorm2d,
                  FrozenBatchNorm3d: nn.BatchNorm3d, FrozenBatchNormNd: nn.BatchNorm1d}[frozen_cls]
    oracle = oracle_cls(3, eps=1e-3).eval()
    oracle.load_state_dict({k: v.clone() for k, v in old.items()})
    expected = oracle(x if frozen_cls is not FrozenBatchNormNd else x.flatten(2)).reshape(shape)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    assert calls == ["pre", "post"]
    handle.remove()  # a handle taken before the revert still removes its hook
    model(x)
    assert calls == ["pre", "post", "pre"]
    with torch.no_grad():
        bn.running_mean.add_(1.0)
    assert torch.equal(frozen.running_mean, bn.running_mean)


def test_direct_frozen_without_affine_reverts_without_parameters():
    model = nn.Sequential(FrozenBatchNorm2d(3, affine=False))
    mean = model[0].running_mean
    revert_frozen(model)
    assert type(model[0]) is nn.BatchNorm2d and not model[0].affine and list(model[0].parameters()) == []
    assert model[0].weight is None and model[0].running_mean is mean


def test_revert_that_fails_changes_nothing():
    model = nn.Sequential(FrozenBatchNorm2d(3), FrozenBatchNorm2d(3))
    first = model[0]
    model[1].running_var = None
    with pytest.raises(ValueError, match=r"\['1'\].*running_var is None"):
        revert_frozen(model)
    assert model[0] is first and type(model[1]) is FrozenBatchNorm2d


def test_layers_that_cannot_be_frozen_change_nothing():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False), nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match=r"\['1', '2'\]"):
        convert_frozen(model)
    assert type(model[0]) is nn.BatchNorm1d and type(model[1]) is nn.BatchNorm1d


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def test_a_parametrized_layer_is_refused_not_frozen_without_its_gamma():
    """A parametrized weight is not in the layer's _parameters: the frozen twin had weight=None (outputs off by
    a factor of gamma); refused, with the model unchanged."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)).eval()
    parametrize.register_parametrization(model[1], "weight", _Doubled())
    x = torch.randn(2, 3, 6, 6)
    before = model(x).detach()
    with pytest.raises(ValueError, match=r"\['1'\]: their weight or bias is computed from other tensors"):
        convert_frozen(model)
    assert parametrize.is_parametrized(model[1]) and type(model[2]) is nn.BatchNorm2d
    assert torch.equal(model(x), before)
    frozen = convert_frozen(model, modules=[model[2]])  # the plain layer alone is fine
    assert isinstance(frozen[2], FrozenBatchNormNd) and torch.equal(frozen(x), before)


def test_revert_gives_back_the_original_parameters_so_an_old_optimizer_keeps_training_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    reference = copy.deepcopy(model)  # never converted: the oracle
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, reference))
    weight = model[1].weight
    revert_frozen(convert_frozen(model))
    assert model[1].weight is weight
    x = torch.randn(8, 4)
    for m, o in ((model, opt), (reference, ref_opt)):
        o.zero_grad()
        m(x).pow(2).mul(torch.arange(3.0)).sum().backward()
        o.step()
    for (k, v), (_, r) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(v, r), k
    assert not torch.equal(model[1].weight, weight.new_ones(3))  # the optimizer did move gamma
    clone = revert_frozen(copy.deepcopy(convert_frozen(model)).double())  # tensors replaced: new parameters
    assert clone[1].weight.dtype == torch.float64 and isinstance(clone[1].weight, nn.Parameter)
    assert torch.equal(clone[1].weight, model[1].weight.double()) and clone[1].weight.requires_grad
    # new parameters keep the originals' requires_grad: a gamma/beta the user froze stays frozen (not trainable)
    user = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    user[1].bias.requires_grad_(False)
    bias = user[1].bias.detach().clone()
    user = revert_frozen(convert_frozen(user).double())
    assert user[1].weight.requires_grad and not user[1].bias.requires_grad
    assert user[1].bias.dtype == torch.float64 and torch.equal(user[1].bias, bias.double())


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
                                      lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=1e-2)])
def test_an_optimizer_built_before_convert_frozen_no_longer_moves_gamma_and_beta(make_opt):
    """Before: the frozen buffers share storage with the original Parameters, which the optimizer still holds;
    their zeroed (not None) gradients let momentum, Adam moments and weight decay move the 'frozen' values.
    Oracle: the values at conversion."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    opt = make_opt(model.parameters())
    x = torch.randn(8, 3, 8, 8)
    for _ in range(2):
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()
    convert_frozen(model)
    frozen = model[1]
    gamma, beta = frozen.weight.clone(), frozen.bias.clone()
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()
    torch.testing.assert_close(frozen.weight, gamma, rtol=0, atol=0)
    torch.testing.assert_close(frozen.bias, beta, rtol=0, atol=0)


def test_convert_frozen_keeps_the_gradient_of_a_parameter_tied_to_a_layer_left_trainable():
    """Before: clearing the originals' gradients also cleared that of a Parameter another, unconverted layer
    shares and still trains (its step lost). Oracle: the gradient as backward left it."""
    torch.manual_seed(0)
    bn1, bn2 = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    bn2.weight, bn2.bias = bn1.weight, bn1.bias
    model = nn.Sequential(bn1, bn2).train()
    model(torch.randn(8, 4)).square().sum().backward()
    grad = bn2.weight.grad.clone()
    convert_frozen(model, modules=[bn1])
    torch.testing.assert_close(bn2.weight.grad, grad)


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_a_frozen_layer_refuses_a_negative_or_non_finite_eps(eps):
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        FrozenBatchNorm2d(3, eps=eps)


@pytest.mark.parametrize("eps", ["1e-5", True, None, torch.tensor([1e-5, 1e-5])])
def test_a_frozen_layer_refuses_an_eps_that_is_not_a_number(eps):
    with pytest.raises(ValueError, match="eps must be a real number"):
        FrozenBatchNorm2d(3, eps=eps)


def test_a_frozen_layer_takes_a_0d_tensor_eps_as_batchnorm_does():
    """Review: the eps check first written for eps=0 refused torch.tensor(1e-5), which nn.BatchNorm2d takes.
    Oracle: nn.BatchNorm2d with that eps, in eval mode."""
    bn = _trained_bn(nn.BatchNorm2d, eps=torch.tensor(1e-3)).eval()
    frozen = FrozenBatchNorm2d(3, eps=torch.tensor(1e-3))
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(frozen(x), bn(x), rtol=0, atol=0)


def test_a_frozen_layer_with_eps_0_is_what_convert_frozen_makes_and_equals_batchnorm():
    """Before: the constructor refused eps=0, which nn.BatchNorm2d takes and convert_frozen keeps, so the frozen
    layer of such a BN could not be built from its own repr. Oracle: nn.BatchNorm2d(eps=0) in eval mode."""
    torch.manual_seed(0)
    bn = _trained_bn(nn.BatchNorm2d, eps=0.0).eval()
    frozen = FrozenBatchNorm2d(3, eps=0.0)
    frozen.load_state_dict(bn.state_dict())
    assert repr(frozen) == repr(convert_frozen(copy.deepcopy(bn)))
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(frozen(x), bn(x), rtol=0, atol=0)


def test_a_frozen_layer_without_bias_loads_a_bias_free_batchnorm_both_ways():
    """Before: no FrozenBatchNorm2d could strictly load the state dict of nn.BatchNorm2d(bias=False) (affine=True
    missed "bias", affine=False did not expect "weight"). Oracle: nn.BatchNorm2d(bias=False) in eval mode."""
    torch.manual_seed(0)
    bn = _trained_bn(nn.BatchNorm2d, bias=False).eval()
    frozen = FrozenBatchNorm2d(3, bias=False)
    frozen.load_state_dict(bn.state_dict())
    assert frozen.bias is None and "bias=False" in repr(frozen)
    assert repr(frozen) == repr(convert_frozen(copy.deepcopy(bn)))
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(frozen(x), bn(x), rtol=0, atol=0)
    back = revert_frozen(frozen)
    assert type(back) is nn.BatchNorm2d and back.bias is None and back.weight is not None
    nn.BatchNorm2d(3, bias=False).load_state_dict(back.state_dict())
