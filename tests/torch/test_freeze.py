"""freeze_bn: frozen statistics and gamma/beta survive model.train(), deepcopy, state dicts and torch.compile."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from bnkit.torch import (
    BatchNorm1d, bn_layers, convert_bn, convert_frozen, freeze_bn, frozen_bn_layers, is_frozen, load_state_dict_file,
    save_state_dict_file, unfreeze_bn,
)
from bnkit.torch.freeze import FreezeState
from bnkit.torch.zoo import SmallResNet


def _model(seed: int = 0) -> nn.Module:
    """A small ResNet with a Dropout head, with non-default BN statistics from a few training steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(SmallResNet(), nn.Dropout(0.5), nn.Linear(10, 10))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 8, 8))
    return model


def _bn_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n, m in bn_layers(model) for k, v in m.state_dict().items()}


def _other_params(model: nn.Module) -> dict[str, torch.Tensor]:
    bn_ids = {id(p) for _, m in bn_layers(model) for p in m.parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in bn_ids}


def _finetune(model: nn.Module, epochs: int = 4, steps: int = 5, seed: int = 1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()  # what every training loop does each epoch
        for _ in range(steps):
            x = torch.randn(8, 1, 8, 8, generator=g) * 3 + 2  # shifted data
            y = torch.randint(0, 10, (8,), generator=g)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_finetuning_scenario_stats_and_affine_stay_bit_identical():
    model = _model()
    freeze_bn(model)
    bn_before, other_before = _bn_tensors(model), _other_params(model)
    _finetune(model)  # 20 optimizer steps, model.train() every epoch
    _assert_same(_bn_tensors(model), bn_before)  # running stats, counters, gamma and beta
    after = _other_params(model)
    assert all(not torch.equal(after[k], other_before[k]) for k in after)  # every other layer learned
    assert model[1].training and model.training  # Dropout still trains
    assert all(not m.training for _, m in bn_layers(model))
    assert all(state == FreezeState(True, True) for state in frozen_bn_layers(model).values())
    assert set(frozen_bn_layers(model)) == {n for n, _ in bn_layers(model)}
    model.requires_grad_(False)  # a frozen backbone too: containers' parameters carry no trainable one either
    assert set(frozen_bn_layers(model)) == {n for n, _ in bn_layers(model)}
    assert set(frozen_bn_layers(nn.Sequential(freeze_bn(nn.BatchNorm1d(3))))) == {"0"}  # not the container ''


def test_without_freezing_the_same_loop_changes_bn():
    model = _model()
    for _, m in bn_layers(model):  # the lesson's recipe, undone by model.train()
        m.eval()
        m.requires_grad_(False)
    before = _bn_tensors(model)
    _finetune(model, epochs=1, steps=1)
    assert any(not torch.equal(before[k], v) for k, v in _bn_tensors(model).items() if "running" in k)


def test_stats_only_trains_gamma_beta_and_normalizes_with_running_stats():
    model = _model()
    freeze_bn(model, affine=False)
    bn_before = _bn_tensors(model)
    _finetune(model, epochs=2, steps=2)
    after = _bn_tensors(model)
    for k in after:
        same = torch.equal(after[k], bn_before[k])
        assert same == ("running" in k or "num_batches" in k), k
    bn = model[0].stem[1]
    x = torch.randn(4, 16, 8, 8)
    model.train()
    expect = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    expect = expect * bn.weight[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(bn(x), expect)
    assert is_frozen(bn, "stats") and not is_frozen(bn, "affine") and not is_frozen(bn, "all")


def test_affine_only_keeps_gamma_beta_and_updates_stats():
    model = _model()
    freeze_bn(model, stats=False)
    before = _bn_tensors(model)
    _finetune(model, epochs=1, steps=2)
    after = _bn_tensors(model)
    for k in after:
        assert torch.equal(after[k], before[k]) == (k.endswith("weight") or k.endswith("bias")), k
    assert all(m.training for _, m in bn_layers(model))
    # a gamma/beta-only freeze is a freeze: part="any" (the default) says so, per layer and for the model
    assert is_frozen(model) and is_frozen(model[0].stem[1]) and not is_frozen(model, "stats")


def test_stale_gradients_are_cleared():
    model = _model()
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    freeze_bn(model)
    assert all(p.grad is None for _, m in bn_layers(model) for p in m.parameters())


def test_freezing_survives_deepcopy_pickle_and_state_dict_round_trip(tmp_path):
    model = _model()
    freeze_bn(model, modules=["0.stem.1", model[0].layers[1].bn2])
    frozen_names = {"0.stem.1", "0.layers.1.bn2"}
    assert set(frozen_bn_layers(model)) == frozen_names
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        assert set(frozen_bn_layers(clone)) == frozen_names
        bn = clone[0].stem[1]
        assert not bn.training and bn.train.module is bn  # the override acts on the copy
        before = _bn_tensors(clone)
        clone(torch.randn(4, 1, 8, 8))
        after = _bn_tensors(clone)
        assert torch.equal(after["0.stem.1.running_mean"], before["0.stem.1.running_mean"])
        assert not torch.equal(after["0.layers.0.bn1.running_mean"], before["0.layers.0.bn1.running_mean"])
    # state dict: same keys as the unfrozen model; loading keeps the freeze; loads into a plain model strictly
    path = tmp_path / "frozen.safetensors"
    save_state_dict_file(model.state_dict(), path)
    plain = _model(seed=3)
    assert plain.state_dict().keys() == model.state_dict().keys()
    plain.load_state_dict(load_state_dict_file(path), strict=True)
    other = _model(seed=4)
    freeze_bn(other, modules=["0.stem.1"])
    other.load_state_dict(load_state_dict_file(path), strict=True)
    other.train()
    assert is_frozen(other[0].stem[1], "all") and not other[0].stem[1].training
    _assert_same(_bn_tensors(other), _bn_tensors(model))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_freezing_survives_torch_compile(backend):
    torch._dynamo.reset()
    model = _model()
    freeze_bn(model)
    model[1].p = 0.0  # deterministic head for the comparison
    reference = copy.deepcopy(model).eval()
    compiled = torch.compile(model, backend=backend)
    before = _bn_tensors(model)
    x = torch.randn(4, 1, 8, 8)
    for _ in range(2):
        compiled.train()
        y = compiled(x)
        y.sum().backward()
    _assert_same(_bn_tensors(model), before)
    torch.testing.assert_close(y, reference(x))
    assert all(p.grad is None for _, m in bn_layers(model) for p in m.parameters())
    assert model[0].stem[0].weight.grad is not None


def test_unfreeze_restores_flags_exactly():
    model = _model()
    model.train()
    bn = model[0].stem[1]
    model[0].layers[0].bn1.weight.requires_grad_(False)  # already off before freezing
    model[0].layers[0].bn2.eval()
    freeze_bn(model)
    assert not any(m.training for _, m in bn_layers(model))
    unfreeze_bn(model)
    assert frozen_bn_layers(model) == {}
    assert bn.training and not model[0].layers[0].bn2.training  # the modes they had
    assert not model[0].layers[0].bn1.weight.requires_grad and bn.weight.requires_grad
    assert "train" not in bn.__dict__
    freeze_bn(model)
    model.eval()
    unfreeze_bn(model, affine=False)  # the last mode asked for was eval
    assert not bn.training and is_frozen(bn, "affine") and not is_frozen(bn, "stats")
    unfreeze_bn(model)
    assert bn.weight.requires_grad and not is_frozen(bn)


def test_freeze_is_idempotent_and_requires_grad_true_unfreezes_affine_live():
    model = _model()
    freeze_bn(model)
    freeze_bn(model)
    model.requires_grad_(True)
    bn = model[0].stem[1]
    assert is_frozen(bn, "stats") and not is_frozen(bn, "affine")
    unfreeze_bn(model)
    assert bn.weight.requires_grad


def test_bad_selection_and_layers_without_running_stats_change_nothing():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="no running statistics"):
        freeze_bn(model)
    assert frozen_bn_layers(model) == {} and model[0].training and model[0].weight.requires_grad
    freeze_bn(model, stats=False)
    assert is_frozen(model[1], "affine")
    with pytest.raises(ValueError, match="not a BatchNorm layer"):
        freeze_bn(model, modules=["2"])
    with pytest.raises(ValueError, match="not a BatchNorm layer"):
        freeze_bn(model, modules=[nn.BatchNorm1d(3)])
    with pytest.raises(ValueError, match="part must be"):
        is_frozen(model[0], "gamma")


def test_a_layer_with_its_own_train_override_is_refused_and_kept():
    # freezing pins train() on the instance: a user's own override there would be replaced, then deleted on unfreeze
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4))

    def own(mode=True):
        return model[1]

    model[1].train = own
    with pytest.raises(ValueError, match=r"BatchNorm layers \['1'\] already have their own train\(\) override"):
        freeze_bn(model)
    assert model[1].__dict__["train"] is own and frozen_bn_layers(model) == {}  # nothing frozen, not even '2'
    assert model[2].weight.requires_grad


def test_every_bn_kind_freezes():
    lazy = nn.LazyBatchNorm1d()
    model = nn.Sequential(nn.Linear(4, 3), lazy, nn.SyncBatchNorm(3), convert_bn(nn.BatchNorm1d(3), debias=True))
    freeze_bn(model)
    model.train()
    x = torch.randn(6, 4)
    out = model(x)
    assert type(model[1]) is nn.BatchNorm1d  # the lazy layer materialized, still frozen
    assert all(not m.training for _, m in bn_layers(model))
    assert set(frozen_bn_layers(model)) == {"1", "2", "3"}
    # materialized with the default statistics 0 / 1 and never updated
    assert torch.equal(model[1].running_var, torch.ones(3)) and int(model[1].num_batches_tracked) == 0
    assert out.shape == (6, 3) and type(model[3]) is BatchNorm1d


def test_convert_bn_keeps_a_layer_frozen():
    model = nn.Sequential(nn.BatchNorm1d(3))
    freeze_bn(model)
    convert_bn(model, virtual_batch_size=2)
    model.train()
    assert not model[0].training and model[0].train.module is model[0] and is_frozen(model[0], "all")


def test_freezing_an_already_compiled_model_recompiles():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 1, 6, 6)
    compiled(x)  # a graph with BN in training mode
    freeze_bn(model)
    compiled.train()
    before = _bn_tensors(model)
    y = compiled(x)
    _assert_same(_bn_tensors(model), before)
    torch.testing.assert_close(y, copy.deepcopy(model).eval()(x))
    unfreeze_bn(model)
    compiled(x)
    assert int(model[1].num_batches_tracked) == 2


def test_is_frozen_on_a_whole_model_answers_for_all_its_bn_layers():
    model = _model()
    layers = [m for _, m in bn_layers(model)]
    assert len(layers) > 2 and not is_frozen(model)
    freeze_bn(model)
    model.train()
    # the oracle: the layers' own flags, read directly
    assert all(not m.training and not m.weight.requires_grad for m in layers)
    assert is_frozen(model) and is_frozen(model, "stats") and is_frozen(model, "affine") and is_frozen(model, "all")
    layers[-1].weight.requires_grad_(True)  # one layer's gamma trains again: the live state counts
    assert not is_frozen(model, "affine") and not is_frozen(model, "all") and is_frozen(model, "stats")
    unfreeze_bn(model, stats=False)  # gamma/beta train again everywhere
    assert all(m.weight.requires_grad for m in layers)
    assert is_frozen(model, "stats") and is_frozen(model) and not is_frozen(model, "affine")
    unfreeze_bn(model)
    assert not is_frozen(model, "any") and all(m.training for m in layers)


def test_is_frozen_on_a_block_needs_every_bn_layer_inside_frozen():
    model = _model()
    stem = model[0].stem
    freeze_bn(model, modules=[stem[1]])
    assert is_frozen(stem[1]) and is_frozen(stem)  # the only BN layer of the stem block
    assert not is_frozen(model) and not is_frozen(model[0])
    assert not is_frozen(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))  # no BN layer: nothing is frozen
    frozen = convert_frozen(_model(1))
    assert not bn_layers(frozen) and is_frozen(frozen, "all")  # buffer-only FrozenBatchNorm layers count


def test_freezing_again_refreezes_parts_unfrozen_behind_its_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    bn, other = model[1], model[2]
    other.bias.requires_grad_(False)  # the user's own setting before the first freeze
    model.train()
    freeze_bn(model)
    model.requires_grad_(True)  # "unfreeze everything" ...
    bn.training = True  # ... and a direct flag write
    assert not is_frozen(bn, "affine") and not is_frozen(bn, "stats")
    freeze_bn(model)  # ... then freeze BN again
    assert is_frozen(model, "all")
    # the oracle: an optimizer step with the layers' own flags leaves gamma/beta and the statistics untouched
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = _bn_tensors(model)
    model.train()
    model(torch.randn(8, 4) * 3 + 1).pow(2).sum().backward()
    opt.step()
    _assert_same(_bn_tensors(model), before)
    unfreeze_bn(model)  # back to the flags from before the FIRST freeze
    assert bn.training and other.training
    assert bn.weight.requires_grad and bn.bias.requires_grad and other.weight.requires_grad
    assert not other.bias.requires_grad


def test_affine_false_layer_counts_as_affine_frozen_once_frozen():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, affine=False), nn.BatchNorm1d(3))
    assert not is_frozen(model[1], "affine")  # not frozen before freeze_bn
    freeze_bn(model)
    assert is_frozen(model, "all") and frozen_bn_layers(model)["1"] == FreezeState(True, True)
    assert is_frozen(model, "all") == is_frozen(convert_frozen(model), "all")  # convert_frozen's answer agrees


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("kind", ["parametrize", "weight_norm"])
def test_a_parametrized_gamma_is_frozen_through_the_tensors_it_is_made_of(kind):
    """gamma computed from other parameters (parametrize, weight_norm): only those receive gradients, and they
    stayed trainable while is_frozen said "all"."""
    import warnings

    from torch.nn.utils import parametrize

    model = _model()
    bn = bn_layers(model)[0][1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm's deprecation notice
        if kind == "parametrize":
            parametrize.register_parametrization(bn, "weight", _Doubled())
        else:
            torch.nn.utils.weight_norm(bn, dim=0)
    made_of = {n for n, _ in bn.named_parameters()} - {"bias"}
    assert made_of and "weight" not in made_of
    before = _bn_tensors(model)
    freeze_bn(model)
    assert is_frozen(model, "all") and not any(p.requires_grad for p in bn.parameters())
    _finetune(model)  # PyTorch's autograd and SGD are the oracle: nothing of gamma may move
    _assert_same(_bn_tensors(model), before)
    unfreeze_bn(model)
    assert all(p.requires_grad for p in bn.parameters())


@pytest.mark.parametrize("mode", [False, True])
def test_convert_bn_keeps_the_mode_unfreeze_restores(mode):
    """A layer re-typed by convert_bn while frozen still remembers the mode from before the freeze: unfreeze_bn
    gives back eval (or training) mode, not training (or eval) mode. Oracle: the mode set before freeze_bn."""
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train(mode)
    freeze_bn(model)
    model = convert_bn(model)
    assert is_frozen(model[1], "all") and not model[1].training
    unfreeze_bn(model)
    assert not is_frozen(model[1]) and model[1].training is mode


def test_refreezing_a_flag_written_behind_its_back_keeps_the_mode_from_before_the_first_freeze():
    """Frozen in eval mode, then `layer.training = True` written directly, then frozen again: unfreeze_bn must give
    back eval mode (the mode before the first freeze, as freeze_bn's docstring promises), not the flag written."""
    bn = nn.BatchNorm2d(3).eval()
    freeze_bn(bn)
    bn.training = True  # code that assigns the flag directly (bypassing train())
    assert not is_frozen(bn, "stats")
    freeze_bn(bn)
    assert is_frozen(bn, "stats") and not bn.training
    unfreeze_bn(bn)
    assert bn.training is False


def test_a_single_module_or_name_is_accepted_as_modules():
    """modules= takes one module or one qualified name as well as a list of them (a module is not a list of
    layers: it must not be iterated)."""
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.BatchNorm2d(3))
    freeze_bn(model, modules=model[0])
    freeze_bn(model, modules="2")
    assert set(frozen_bn_layers(model)) == {"0", "2"}
    unfreeze_bn(model, modules=model[0])
    assert set(frozen_bn_layers(model)) == {"2"}


def test_frozen_train_refuses_a_non_bool_mode_like_nn_module():
    """nn.Module.train(0) raises ValueError (the oracle, checked here); a frozen layer's train() must too, instead
    of remembering 0 and giving training=0 back on unfreeze."""
    with pytest.raises(ValueError, match="boolean"):
        nn.BatchNorm2d(3).train(0)
    bn = freeze_bn(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="boolean"):
        bn.train(0)
    unfreeze_bn(bn)
    assert bn.training is True


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


def test_swa_update_bn_leaves_frozen_statistics_with_a_warning_and_resets_them_after_unfreeze():
    """torch.optim.swa_utils.update_bn calls reset_running_stats() on every BN layer, then recomputes the statistics
    in training mode, which a frozen layer never enters: a frozen layer ended at mean 0, var 1 with is_frozen still
    True and no warning (review). Oracle: PyTorch's eval-mode BatchNorm with the statistics from before."""
    from torch.optim.swa_utils import AveragedModel, update_bn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].running_mean.uniform_(1, 2)
        model[1].running_var.uniform_(2, 3)
        model[1].num_batches_tracked.fill_(9)
    x, data = torch.randn(2, 3, 6, 6), [torch.randn(4, 3, 6, 6)]
    ref = copy.deepcopy(model).eval()(x)
    freeze_bn(model)
    swa = AveragedModel(model)
    with pytest.warns(UserWarning, match="running statistics are frozen .* reset_running_stats\\(\\) left them"):
        update_bn(data, swa)
    torch.testing.assert_close(swa.eval()(x), ref, rtol=0, atol=0)
    assert is_frozen(swa.module[1], "stats") and int(swa.module[1].num_batches_tracked) == 9
    twin = copy.deepcopy(model)  # a copy's override is bound to the copy
    with pytest.warns(UserWarning):
        twin[1].reset_running_stats()
    assert torch.equal(twin[1].running_mean, model[1].running_mean)
    with pytest.warns(UserWarning, match=r"reset_parameters\(\) calls it and resets gamma/beta alone"):
        twin[1].reset_parameters()  # PyTorch's: reset_running_stats(), then gamma 1 and beta 0
    assert torch.equal(twin[1].running_var, model[1].running_var) and torch.equal(twin[1].weight, torch.ones(4))
    unfreeze_bn(model)
    assert "reset_running_stats" not in vars(model[1])
    model[1].reset_running_stats()
    assert torch.equal(model[1].running_mean, torch.zeros(4)) and int(model[1].num_batches_tracked) == 0


def test_a_layer_with_its_own_reset_running_stats_is_not_frozen():
    bn = nn.BatchNorm1d(3)
    bn.reset_running_stats = lambda: None
    with pytest.raises(ValueError, match=r"own reset_running_stats\(\) override; not freezing"):
        freeze_bn(bn)
    assert bn.training and "train" not in vars(bn)


def test_freeze_warns_where_running_statistics_stay_free():
    """A torch.export graph's modules hold BN buffers but are no BatchNorm layers: freeze_bn cannot pin them, and the
    warning names them. Oracle: the buffer does change in a forward after the freeze."""
    torch.manual_seed(0)
    exported = torch.export.export(SmallResNet().train(), (torch.randn(4, 1, 8, 8),)).module()
    with pytest.warns(UserWarning, match=r"left 6 module\(s\) .*stem\.1.* unfrozen"):
        freeze_bn(exported)
    before = exported.get_submodule("stem.1").running_mean.clone()
    exported(torch.randn(4, 1, 8, 8) * 3 + 2)
    assert not torch.equal(before, exported.get_submodule("stem.1").running_mean)
    with pytest.warns(UserWarning, match="no BatchNorm layer in the Sequential: nothing was frozen"):
        freeze_bn(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


def test_freeze_is_quiet_where_every_running_statistic_is_frozen():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        freeze_bn(_model())
        freeze_bn(convert_frozen(_model(1)))  # FrozenBatchNorm layers only: frozen already
        freeze_bn(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), modules=["1"])
        freeze_bn(nn.Sequential(nn.BatchNorm1d(3), FrozenBatchNorm2d(3)))  # frozen by design, as its name says
        freeze_bn(nn.Sequential(nn.Conv2d(3, 3, 1), FrozenBatchNorm2d(3)))  # torchvision's detection backbones


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d's buffers: a look-alike whose statistics never change."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for k, v in (("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)):
            self.register_buffer(k, torch.full((n,), float(v)))


def test_modules_named_as_in_the_wrapped_model_work_through_a_data_parallel_wrapper():
    """The audit and fold name a DataParallel model's layers without 'module.'; freeze_bn refused those names.
    Oracle: the layer's running mean through a training-mode forward."""
    model = _model()
    wrapped = nn.DataParallel(model)
    freeze_bn(wrapped, modules=["0.stem.1", "module.0.layers.0.bn1"])
    assert set(frozen_bn_layers(model)) == {"0.stem.1", "0.layers.0.bn1"}
    before = model[0].stem[1].running_mean.clone()
    wrapped.train()(torch.randn(4, 1, 8, 8))
    assert torch.equal(before, model[0].stem[1].running_mean)
    with pytest.raises(ValueError, match="'0.stem.9' is not a BatchNorm layer of the model"):
        freeze_bn(wrapped, modules=["0.stem.9"])
