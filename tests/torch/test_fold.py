"""bnkit.torch.fold_bn against the unfolded model in eval mode (PyTorch's own modules are the oracle)."""
from __future__ import annotations

import collections
import copy
import functools
import math
import types

import numpy as np
import pytest
import torch
from _helpers import calibrated
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnkit.torch import (FoldVerificationError, bn_layers, fold_bn, fold_plan, load_state_dict_file,
                         save_state_dict_file)
from bnkit.torch.zoo import ZOO, example_input

# Which BN layers of each zoo model can be folded exactly, read off the architectures in bnkit/torch/zoo.py.
EXPECTED_LEFT = {
    "mlp": set(),
    "resnet": set(),
    "mobilenet": set(),
    "vgg": set(),
    "decoder": set(),
    "shared_conv": {"bn_a", "bn_b"},  # both follow the conv that is called twice
    "preact": {"bn1", "bn2", "bn_out"},  # each reads a sum; bn1/bn2 feed zero-padded convs, bn_out a ReLU
}


def zoo_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = example_input(name, batch=16)
    return calibrated(ZOO[name](), x), x


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_every_foldable_bn_folded_outputs_equal(name):
    model, x = zoo_model(name)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model(x)

    folded, report = fold_bn(model, x)

    all_bn = {n for n, _ in bn_layers(model)}
    assert set(report.left) == EXPECTED_LEFT[name]
    assert {f.bn for f in report.folded} == all_bn - EXPECTED_LEFT[name]
    assert report.method == "fx"
    # folded BNs are gone from the folded model, the others stay
    assert {n for n, _ in bn_layers(folded)} == EXPECTED_LEFT[name]
    with torch.no_grad():
        got = folded(x)
    assert rel_diff(expected, got) < 1e-5
    assert report.max_rel_diff == pytest.approx(rel_diff(expected, got), abs=1e-12)
    # the original is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m.training for m in model.modules())
    assert all(not m.training for m in folded.modules())  # the Identity modules that replace BNs included


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # importing fx fuse
def test_shared_conv_is_not_folded_and_reason_given():
    model, x = zoo_model("shared_conv")
    folded, report = fold_bn(model, x)
    assert torch.equal(folded.shared.weight, model.shared.weight)
    assert torch.equal(folded.shared.bias, model.shared.bias)
    assert "called 2 times" in report.left["bn_a"]
    assert "called 2 times" in report.left["bn_b"]
    # torch.fx's own fuse folds both BNs into the shared conv and changes the output
    from torch.fx.experimental.optimization import fuse

    with torch.no_grad():
        assert rel_diff(model(x), fuse(model)(x)) > 1e-2
        assert rel_diff(model(x), folded(x)) < 1e-5


def test_a_bn_called_twice_is_left_even_when_one_call_follows_a_conv():
    """Folding the BN into the conv would remove it from the conv's path only: its other call still runs it."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.bn(x)

    x = torch.randn(4, 4, 5, 5)
    model = calibrated(Twice(), x)
    for inputs in (x, None):
        folded, report = fold_bn(model, inputs)
        assert report.n_folded == 0 and "called 2 times" in report.left["bn"], report.left
        with torch.no_grad():
            assert torch.equal(folded(x), model(x))


def test_a_bn_whose_output_has_two_readers_is_not_folded_before_either():
    """BN -> Linear plus a residual sum of the BN output: folding it before the Linear would drop it from the sum."""
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc = nn.BatchNorm1d(4), nn.Linear(4, 4)

        def forward(self, x):
            y = self.bn(x)
            return self.fc(y) + y

    x = torch.randn(16, 4)
    model = calibrated(Residual(), x + 3.0)  # running_mean about 3: dropping the BN from the sum moves it by ~3
    for inputs in (x, None):
        folded, report = fold_bn(model, inputs)
        assert report.n_folded == 0 and "bn" in report.left, report.summary()
        with torch.no_grad():
            assert torch.equal(folded(x), model(x))


def test_a_bn_the_forward_never_calls_is_reported_as_left():
    """A spare BN (built but unused) is neither folded nor silently dropped from the report."""
    class Spare(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.spare = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x))

    x = torch.randn(16, 4)
    model = calibrated(Spare(), x)
    model.spare.num_batches_tracked.fill_(1)  # updated elsewhere; never called here
    for inputs in (x, None):
        _, report = fold_bn(model, inputs)
        assert [f.bn for f in report.folded] == ["bn"]
        assert list(report.left) == ["spare"] and "not called" in report.left["spare"]
        assert [r.layer for r in report.findings()] == ["spare"]


def test_verification_counts_a_nan_where_the_original_is_finite_as_inf():
    """A folded model that outputs NaN must not be reported as exact (max_abs_diff 0): NaN differences count as inf."""
    from bnkit.torch.fold import _compare

    assert _compare(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, float("nan"), 3.0]))[:2] == (math.inf, math.inf)
    # an infinite output where the original is finite is as far off (nan_to_num alone made it 1.8e308)
    assert _compare(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, float("inf"), 3.0]))[:2] == (math.inf, math.inf)
    assert _compare(torch.tensor([1.0, float("inf")]), torch.tensor([1.0, float("inf")]))[:2] == (0.0, 0.0)
    assert _compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))[:2] == (0.5, 0.25)  # finite: max|a-b|, / max|a|
    # an all-zero original has no scale: the relative difference falls back to the absolute one, never to 0
    # (which would claim an exact fold of a model whose outputs all moved by 1)
    assert _compare(torch.zeros(3), torch.ones(3))[:2] == (1.0, 1.0)


def test_preact_bn_after_addition_is_refused_with_reason():
    model, x = zoo_model("preact")
    _, report = fold_bn(model, x)
    assert "'add'" in report.left["bn2"] and "'add'" in report.left["bn_out"]
    assert "'stem' is also used" in report.left["bn1"]  # the stem output also feeds the residual sum


@pytest.mark.parametrize("padding", [1, "same"])  # "same" with a 3x3 kernel pads by 1 too
def test_bn_before_zero_padded_conv_is_refused(padding):
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=padding))
    x = torch.randn(4, 3, 8, 8)
    model = calibrated(model, x)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 0 and "zero-pads" in report.left["1"]
    # the refusal is right: folding anyway would differ at the border
    bn, conv = model[1], model[2]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    t = bn.bias - bn.running_mean * s
    wrong = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3, padding=padding))
    with torch.no_grad():
        wrong[1].weight.copy_(conv.weight * s[None, :, None, None])
        wrong[1].bias.copy_(conv.bias + (conv.weight * t[None, :, None, None]).sum(dim=(1, 2, 3)))
        assert rel_diff(model(x), wrong(x)) > 1e-3
        assert torch.equal(model(x), folded(x))


def test_state_dict_round_trip_with_new_biases(tmp_path):
    model, x = zoo_model("resnet")
    assert model.stem[0].bias is None
    folded, report = fold_bn(model, x)
    assert folded.stem[0].bias is not None
    assert any(f.bias_added for f in report.folded)
    path = save_state_dict_file(folded.state_dict(), tmp_path / "folded.safetensors")

    fresh = ZOO["resnet"]()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(load_state_dict_file(path))  # the unfolded architecture has no bias to take it
    report.restructure(fresh)
    fresh.load_state_dict(load_state_dict_file(path), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), folded(x))
        assert rel_diff(model(x), fresh(x)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_restructure_adds_biases_in_the_layers_dtype(dtype):
    """A restructured low-precision model must take the folded state dict and run: a float32 bias beside float16
    weights would be loaded as float32 and make the conv fail on a dtype mismatch."""
    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))

    x = torch.randn(4, 3, 6, 6)
    model = calibrated(make(), x).to(dtype)
    folded, report = fold_bn(model)
    assert report.folded[0].bias_added
    fresh = report.restructure(make().to(dtype))
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert fresh[0].bias.dtype == dtype
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x.to(dtype)), folded(x.to(dtype)))


def test_folded_layers_keep_requires_grad():
    """Fine-tuning a folded model with a frozen backbone: the folded weights and added bias stay frozen, and a
    trainable layer stays trainable."""
    x = torch.randn(4, 3, 8, 8)
    model = calibrated(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), x)
    model[0].weight.requires_grad_(False)
    folded, report = fold_bn(model, x)
    assert [(f.bn, f.into) for f in report.folded] == [("1", "0"), ("4", "3")]
    assert not folded[0].weight.requires_grad and not folded[0].bias.requires_grad
    assert folded[3].weight.requires_grad and folded[3].bias.requires_grad


def test_refuses_training_mode_and_never_updated_unless_forced():
    model, x = zoo_model("vgg")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        fold_bn(model, x)
    assert model.training  # flags untouched
    folded, report = fold_bn(model, x, force=True)
    assert folded.training  # the copy keeps the flags it was given
    model.eval()
    with torch.no_grad():
        assert rel_diff(model(x), folded.eval()(x)) < 1e-5

    fresh = ZOO["vgg"]().eval()
    with pytest.raises(ValueError, match="never updated"):
        fold_bn(fresh, x)
    _, report = fold_bn(fresh, x, force=True)
    assert report.n_folded == 5

    # running_mean 0 and num_batches_tracked 0 are not enough: a set running_var (e.g. statistics converted from
    # another framework, whose counter stays 0) was updated, and folds without force
    for _, bn in bn_layers(fresh):
        bn.running_var.uniform_(0.25, 4.0)
    folded, report = fold_bn(fresh, x)
    assert report.n_folded == 5
    with torch.no_grad():
        assert rel_diff(fresh(x), folded(x)) < 1e-5
    # nor are running_var 1 and num_batches_tracked 0: learned means (converted statistics) were updated too
    for _, bn in bn_layers(fresh):
        bn.running_var.fill_(1.0)
        bn.running_mean.uniform_(-2.0, 2.0)
    folded, report = fold_bn(fresh, x)
    assert report.n_folded == 5
    with torch.no_grad():
        assert rel_diff(fresh(x), folded(x)) < 1e-5


def test_nonfinite_statistics_are_rejected():
    model, x = zoo_model("mlp")
    model[2].running_var[3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        fold_bn(model, x)


@pytest.mark.parametrize("eps", [float("nan"), float("inf")])
def test_a_nonfinite_eps_is_named_not_called_a_range_overflow(eps):
    """eps NaN gave 'weights beyond torch.float32's range ... fold a float32 copy' for a float32 model."""
    model, x = zoo_model("mlp")
    model[2].eps = eps
    with pytest.raises(ValueError, match=r"NaN/Inf statistics, affine parameters or eps cannot be folded: 2"):
        fold_bn(model, x, force=True)


def test_negative_variance_is_rejected_not_folded_into_nan_weights():
    # sqrt(var + eps) of a corrupt negative variance would write NaN into the layer's weights, even with force
    model, x = zoo_model("mlp")
    model[2].running_var[3] = -0.5
    for force in (False, True):
        with pytest.raises(ValueError, match=r"running_var \+ eps <= 0.*: 2"):
            fold_bn(model, x, force=force)
    model[2].running_var[3] = -model[2].eps / 2  # var + eps > 0: a valid (if odd) BN, folded exactly
    folded, report = fold_bn(model, x)
    assert report.n_left == 0 and report.max_rel_diff < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fold_is_computed_in_float64(dtype):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6, eps=1e-5)
    with torch.no_grad():
        bn.running_mean.uniform_(-3, 3)
        bn.running_var.copy_(torch.tensor([1e-7, 3e-6, 1e-4, 0.3, 7.0, 300.0]))  # near and far from eps
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.num_batches_tracked.fill_(1)
    model = nn.Sequential(conv, bn).to(dtype).eval()
    folded, report = fold_bn(model)
    assert report.n_folded == 1

    # independent float64 NumPy oracle, rounded once to the layer dtype
    def f64(t):
        return t.detach().float().numpy().astype(np.float64)

    bn = model[1]
    w, rm, rv, gamma, beta = (f64(t) for t in (model[0].weight, bn.running_mean, bn.running_var, bn.weight, bn.bias))
    s = gamma / np.sqrt(rv + 1e-5)
    want_w = torch.from_numpy(w * s[:, None, None, None]).to(dtype)
    want_b = torch.from_numpy(beta - rm * s).to(dtype)
    assert folded[0].weight.dtype == dtype
    assert torch.equal(folded[0].weight, want_w)
    assert torch.equal(folded[0].bias, want_b)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # importing fx fuse
def test_sync_batchnorm_in_eval_mode_is_folded():
    model, x = zoo_model("resnet")
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
    folded, report = fold_bn(sync, x)
    assert report.n_left == 0 and report.n_folded == 6
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in folded.modules())
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) < 1e-5
    # the peer: torch.fx's fuse leaves every SyncBatchNorm in place
    from torch.fx.experimental.optimization import fuse

    assert sum(isinstance(m, nn.SyncBatchNorm) for m in fuse(sync).modules()) == 6
    sync.layers[0].bn1.train()
    with pytest.raises(ValueError, match=r"training mode.*layers\.0\.bn1"):
        fold_bn(sync, x)


def test_bn_before_linear_and_unpadded_grouped_conv_and_after_grouped_convtranspose():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, groups=2),  # BN before an unpadded conv: exact
        nn.Flatten(), nn.BatchNorm1d(4 * 15 * 15), nn.Linear(4 * 15 * 15, 5),  # BN before a Linear
    )
    x = torch.randn(8, 4, 8, 8)
    model = calibrated(model, x)
    folded, report = fold_bn(model, x)
    want = {("1", "0", "after"), ("3", "4", "before"), ("6", "7", "before")}
    assert {(f.bn, f.into, f.position) for f in report.folded} == want
    assert report.left == {}  # "3" and "6" were first left (input from a ReLU/Flatten), then folded before
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) < 1e-5


def test_linear_on_3d_input_is_not_folded_into_bn1d():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)
            self.bn = nn.BatchNorm1d(5)  # normalizes dim 1 (tokens), not the Linear's features

        def forward(self, x):
            return self.bn(self.fc(x))

    x = torch.randn(4, 5, 5)
    model = calibrated(Tokens(), x)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 0 and "rank [3]" in report.left["bn"]
    with torch.no_grad():
        assert torch.equal(model(x), folded(x))


def test_track_running_stats_false_is_left():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    _, report = fold_bn(model, torch.randn(2, 1, 8, 8))
    assert "track_running_stats=False" in report.left["1"]


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("with_inputs", [True, False])
def test_fold_plan_reports_what_fold_bn_does_and_changes_nothing(name, with_inputs):
    model, x = zoo_model(name)
    next(model.children()).train()  # one flag differs from the rest; all are to be left as found
    flags = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())
    example = x if with_inputs else None
    plan = fold_plan(model, example, force=True)
    _, report = fold_bn(model, example, verify=False, force=True)
    assert plan.folded == report.folded and plan.left == report.left and plan.method == report.method
    assert plan.max_abs_diff is None
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fold_plan_refuses_what_fold_bn_refuses():
    model, x = zoo_model("mlp")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        fold_plan(model, x)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fold_plan({"weight": torch.ones(2)})


def test_untraceable_model_falls_back_to_sequential_neighbours():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.body(x)
            if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                h = h * 2
            return self.bn(h)

    x = torch.rand(4, 1, 8, 8) + 1
    model = calibrated(Branchy(), x)
    folded, report = fold_bn(model, x)
    assert report.method == "sequential"
    assert any("could not trace" in n for n in report.notes)
    assert [(f.bn, f.into) for f in report.folded] == [("body.1", "body.0")]
    assert "bn" in report.left
    plan = fold_plan(model, x)
    assert (plan.method, plan.folded, plan.left) == ("sequential", report.folded, report.left)
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) < 1e-5


@pytest.mark.parametrize("power", [1, 2])
def test_verification_judges_each_output_on_its_own_scale(power):
    """Boxes in pixels (up to 2048), or box areas in pixels^2 (~4e6), beside scores in (0, 1), the score path
    branching on whether the conv has a bias: the folded scores were 16% off, but over the boxes' scale that read
    8e-5, under the 1e-4 tolerance (and a floor of 1% of the largest output, tried since, passed them beside the
    areas). Oracle: the original model's scores."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.box = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Linear(3, 4)

        def forward(self, x):
            f = self.bn(self.conv(x))
            if self.conv.bias is not None:  # the plan cannot see it: folding adds a bias, used twice then
                f = f + self.conv.bias.view(1, -1, 1, 1)
            return (self.box(x.mean((2, 3))).sigmoid() * 2048) ** power, f.mean((2, 3)).sigmoid()

    torch.manual_seed(0)
    model = TwoHeads().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.3, 0.3)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.bias.uniform_(-0.5, 0.5)
        model.bn.num_batches_tracked += 1
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(FoldVerificationError) as info:
        fold_bn(model, x)
    folded, _ = fold_bn(model, x, verify=False)
    with torch.no_grad():
        scores, wrong = model(x)[1], folded(x)[1]
    diff = float((scores - wrong).abs().max())
    assert diff / float(scores.abs().max()) > 0.1  # 16% off
    assert info.value.report.max_rel_diff == pytest.approx(diff / float(scores.abs().max()), rel=1e-6)


def test_wrong_probabilities_over_a_large_vocabulary_beside_logits_are_caught():
    """Softmax over 32000 words (values ~1e-4) beside logits: judged on the logits' scale, 65% wrong probabilities
    read 8e-5 and passed. Oracle: the original model's probabilities."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1, self.h1 = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Linear(8, 10)
            self.c2, self.b2, self.h2 = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Linear(8, 32000)

        def forward(self, x):
            f = self.b2(self.c2(x))
            if self.c2.bias is not None:  # a branch the plan cannot see
                f = f + self.c2.bias.view(1, -1, 1, 1)
            return self.h1(self.b1(self.c1(x)).mean((2, 3))), self.h2(f.mean((2, 3))).softmax(1)

    torch.manual_seed(0)
    model = TwoHeads().eval()
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2)
            bn.bias.uniform_(-0.5, 0.5)
            bn.num_batches_tracked += 1
    x = torch.randn(4, 3, 8, 8)
    folded, _ = fold_bn(model, x, verify=False)
    with torch.no_grad():
        probs, wrong = model(x)[1], folded(x)[1]
    assert float((probs - wrong).abs().max() / probs.abs().max()) > 0.3
    with pytest.raises(FoldVerificationError):
        fold_bn(model, x)


def test_an_output_zero_but_for_rounding_is_refused_with_that_reason():
    """A unit-norm penalty, (|e| - 1) for normalized e, is 0 up to a float32 ulp, which its own scale cannot tell
    from an error (a floor to spare it let wrong small outputs through): the fold is refused, and the reason names
    the output and its scale. Oracle: the same fold in float64, where both penalties are 0 to 1e-15 and the logits
    agree, so verify=False's model is the right one here."""
    import torch.nn.functional as F

    class Penalized(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 5)

        def forward(self, x):
            e = F.normalize(F.relu(self.bn(self.conv(x))).mean((2, 3)), dim=1)
            return self.fc(e), (e.norm(dim=1) - 1).abs().mean()

    torch.manual_seed(0)
    model = Penalized().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.num_batches_tracked += 1
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(FoldVerificationError, match=r"the worst is output tensor 1 \(values up to .* of the largest "
                                                    r"output's\): if it is 0 but for rounding"):
        fold_bn(model, x)
    folded64, _ = fold_bn(copy.deepcopy(model).double(), x.double(), verify=False)
    with torch.no_grad():
        (logits, penalty), (logits64, penalty64) = model.double()(x.double()), folded64(x.double())
    assert abs(float(penalty)) < 1e-15 and abs(float(penalty64)) < 1e-15
    torch.testing.assert_close(logits64, logits, rtol=1e-12, atol=1e-12)


def test_folded_parameters_keep_the_attributes_set_on_them():
    """Optimizer-group or sharding tags on a Parameter (p.no_weight_decay = True) were lost on the folded layer's new
    Parameters while the layers not folded kept them. Oracle: the original parameters' attributes."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, bias=False)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
        model[1].num_batches_tracked += 1
    for name, p in model.named_parameters():
        p.no_weight_decay, p.tag = True, name
    folded, report = fold_bn(model, torch.randn(2, 3, 8, 8))
    assert report.n_folded == 1
    tags = {name: (getattr(p, "no_weight_decay", None), getattr(p, "tag", None)) for name, p in folded.named_parameters()}
    assert tags == {"0.weight": (True, "0.weight"), "0.bias": (True, "0.bias"), "2.weight": (True, "2.weight")}


def test_without_example_inputs_not_verified_but_folded():
    model, x = zoo_model("mlp")
    folded, report = fold_bn(model)
    assert report.max_abs_diff is None and any("not verified" in n for n in report.notes)
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) < 1e-5


def test_bnkit_drop_in_layers_are_traced_as_bn_and_folded():
    from bnkit.torch import convert_bn

    model, x = zoo_model("resnet")
    dropin = convert_bn(copy.deepcopy(model), debias=True)
    assert not any(type(m) is nn.BatchNorm2d for m in dropin.modules())
    folded, report = fold_bn(dropin, x)
    assert report.method == "fx" and report.n_left == 0 and report.n_folded == 6
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) < 1e-5


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_bn_before_conv_with_copying_padding_is_folded_exactly(padding_mode):
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode))
    x = torch.randn(4, 3, 8, 8)
    model = calibrated(model, x)
    folded, report = fold_bn(model, x)
    assert [(f.bn, f.into, f.position) for f in report.folded] == [("1", "2", "before")]
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) < 1e-5


def test_bn_before_pointwise_conv_with_same_padding_is_folded():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1, padding="same", bias=False))
    x = torch.randn(4, 3, 8, 8)
    model = calibrated(model, x)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 1 and report.folded[0].bias_added
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) < 1e-5


def test_bn_on_both_sides_of_one_linear_compose():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5))
    x = torch.randn(16, 6)
    model = calibrated(model, x)
    folded, report = fold_bn(model, x)
    assert {(f.bn, f.position) for f in report.folded} == {("1", "before"), ("3", "after")}
    assert [f.bias_added for f in report.folded] == [True, False]  # one bias, added by the first fold
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) < 1e-5
    # the composed fold is one affine map; check it against float64 closed form
    bn1, lin, bn2 = (model[i] for i in (1, 2, 3))
    with torch.no_grad():
        s1, s2 = (b.weight.double() / torch.sqrt(b.running_var.double() + b.eps) for b in (bn1, bn2))
        t1 = bn1.bias.double() - bn1.running_mean.double() * s1
        t2 = bn2.bias.double() - bn2.running_mean.double() * s2
        w = lin.weight.double()
        want_w = s2[:, None] * w * s1[None, :]
        want_b = s2 * (w @ t1) + t2
    assert torch.equal(folded[2].weight, want_w.float())
    assert torch.equal(folded[2].bias, want_b.float())


class WSConv2d(nn.Conv2d):
    """Weight-standardized conv: it renormalizes its weight, so a BN scale folded into it would be undone."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def test_layers_with_their_own_forward_hooks_or_parametrizations_are_left():
    from torch.nn.utils import parametrizations

    x = torch.randn(8, 3, 8, 8)
    seq = nn.Sequential(
        WSConv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
    )
    parametrizations.weight_norm(seq[3])
    seen = []
    seq[7].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model = calibrated(seq, x)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 0
    assert "call_function 'conv2d'" in report.left["1"]  # fx traces through the subclass's own forward
    assert "parametrized" in report.left["4"]
    assert "forward hooks" in report.left["7"]
    with torch.no_grad():
        assert torch.equal(model(x), folded(x))
    # the fallback (no trace) sees the subclass as a module and refuses it by its forward
    from bnkit.torch.fold import FoldReport, _plan_sequential, _probe, _shared_names

    fallback = FoldReport()
    assert _plan_sequential(model, _probe(model, (x,))[1], _shared_names(model), fallback) == []
    assert "forward is not PyTorch's" in fallback.left["1"]


class WSConvForward(nn.Conv2d):
    """Weight standardization in ``_conv_forward``, behind PyTorch's own ``forward``."""

    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, w, bias)


@pytest.mark.parametrize("how", ["instance forward", "own _conv_forward"])
def test_a_layer_computing_otherwise_behind_pytorchs_forward_is_not_folded_into(how):
    """A forward set on the instance (fake quantization), or a subclass's own ``_conv_forward``, keeps the class's
    ``forward``; folding a BN into such a layer changed the outputs by up to half their scale. Oracle: the model."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3) if how == "instance forward" else WSConvForward(3, 4, 3),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    if how == "instance forward":
        conv = model[0]
        conv.forward = lambda inp: conv._conv_forward(inp, conv.weight.round(), conv.bias)  # a crude quantizer
    model = calibrated(model, x)
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_var.mul_(4.0)  # a BN scale far from 1: a wrong fold shows
    from bnkit.torch.fold import FoldReport, _plan_sequential, _probe, _shared_names

    folded, report = fold_bn(model, x)
    assert [f.bn for f in report.folded] == ["4"]
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) < 1e-5
    fallback = FoldReport()  # the nn.Sequential plan, where fx cannot trace
    assert [p[0] for p in _plan_sequential(model, _probe(model, (x,))[1], _shared_names(model), fallback)] == ["4"]
    because = "'0' is a" if how == "instance forward" else "call_function 'conv2d'"  # fx traces into a subclass
    assert because in report.left["1"] and "forward is not PyTorch's" in fallback.left["1"], (report, fallback)


@pytest.mark.parametrize("order", ["linear-bn", "bn-linear"])
def test_a_batchnorm2d_next_to_a_linear_is_left_without_example_inputs(order):
    """A Linear acts on the last dim, BatchNorm2d on dim 1 of a rank-4 input: without example_inputs to show the
    ranks, the pair was folded (wrong by the outputs' scale whenever the widths matched)."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 4)
    layers = [nn.Linear(4, 4), nn.BatchNorm2d(4)]
    model = calibrated(nn.Sequential(*(layers if order == "linear-bn" else layers[::-1])), x)
    folded, report = fold_bn(model)
    assert report.n_folded == 0
    (reason,) = report.left.values()
    assert "is a Linear, which acts on the last dim, and BatchNorm2d takes rank [4] input" in reason
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))
    linear_bn1d = calibrated(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), torch.randn(16, 4))
    assert fold_bn(linear_bn1d)[1].n_folded == 1  # BatchNorm1d takes (N, C): folded, with the note on the assumption

    class ChannelChecked(nn.BatchNorm1d):
        def _check_input_dim(self, input):  # a subclass that also checks the channel count
            super()._check_input_dim(input)
            if input.shape[1] != self.num_features:
                raise ValueError("wrong channel count")

    checked = calibrated(nn.Sequential(nn.Linear(4, 4), ChannelChecked(4)), torch.randn(16, 4))
    assert fold_bn(checked)[1].n_folded == 1  # its ranks are probed with its channels on dim 1


@pytest.mark.parametrize("position", ["after", "before"])
def test_a_bn_next_to_a_layer_with_its_own_hook_is_left(position):
    """A forward hook on the conv would see (and clamp) the folded output; a pre-hook on it, the input without the
    BN: either way the fold changes what the model computes, so the BN stays."""
    x = torch.randn(8, 3, 8, 8)
    if position == "after":
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        model[0].register_forward_hook(lambda m, args, out: out.clamp(min=0))
    else:
        model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3))  # unpadded: foldable but for the hook
        model[2].register_forward_pre_hook(lambda m, args: (args[0].clamp(max=0.5),))
    model = calibrated(model, x)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 0 and "forward hooks" in report.left["1"], report.left
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


def test_bn_subclass_with_its_own_forward_is_left_and_bnkit_drop_ins_are_folded():
    from bnkit.torch.layers import BatchNorm2d as DropIn

    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2 + 1

    x = torch.rand(4, 3, 8, 8)
    model = calibrated(nn.Sequential(nn.Conv2d(3, 4, 3), Scaled(4), nn.Conv2d(4, 4, 3), DropIn(4)), x)
    folded, report = fold_bn(model, x)
    assert [f.bn for f in report.folded] == ["3"] and "forward is not PyTorch's" in report.left["1"]
    assert report.max_rel_diff < 1e-5
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) < 1e-5


@pytest.mark.parametrize("read,reason", [("bn", "reads the BN's tensors directly"),
                                         ("lin", "reads the tensors of 'lin' directly")])
def test_a_forward_that_reads_a_bn_buffer_or_layer_weight_keeps_the_bn(read, reason):
    """A fold changes the BN's buffers and the layer's weight: a forward that reads either would see the change."""
    class ReadsStats(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.lin = nn.BatchNorm1d(5), nn.Linear(5, 3)

        def forward(self, x):
            extra = self.bn.running_mean.sum() if read == "bn" else self.lin.weight.sum()  # e.g. a penalty term
            return self.lin(self.bn(x)) + extra

    x = torch.randn(16, 5)
    model = calibrated(ReadsStats(), x)
    for inputs in (x, None):
        folded, report = fold_bn(model, inputs)
        assert report.n_folded == 0 and reason in report.left["bn"], report.left
        with torch.no_grad():
            assert torch.equal(model(x), folded(x))


def test_untraceable_model_without_example_inputs_folds_nothing():
    """The fallback cannot see a layer called outside its Sequential without a probe run: it refuses."""
    class Reuses(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2))

        def forward(self, x):
            y = self.f(x)
            if y.sum() > 0:  # not traceable
                y = y * 1.0
            return y + self.f[0](x)  # the conv is also used on its own

    x = torch.rand(4, 2, 6, 6)
    model = calibrated(Reuses(), x)
    folded, report = fold_bn(model)
    assert report.method == "sequential" and report.n_folded == 0 and "pass example_inputs" in report.left["f.1"]
    _, with_inputs = fold_bn(model, x)
    assert with_inputs.n_folded == 0 and "called 2 times" in with_inputs.left["f.1"]


def test_sequential_fallback_refuses_overridden_sequential_forward():
    class Skip(nn.Sequential):
        def forward(self, x):  # the BN reads the input, not the conv's output
            return self[0](x) + self[1](x)

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Skip(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            return self.block(x) if x.sum() > 0 else -x

    x = torch.rand(4, 4, 6, 6) + 1
    model = calibrated(Untraceable(), x)
    folded, report = fold_bn(model, x)
    assert report.method == "sequential" and report.n_folded == 0 and "block.1" in report.left
    with torch.no_grad():
        assert torch.equal(model(x), folded(x))


@pytest.mark.parametrize("padding", [0, 1])
def test_sequential_fallback_folds_a_bn_before_a_conv_only_without_zero_padding(padding):
    """Untraceable model, Sequential(WSConv2d, BN, Conv2d): the BN cannot fold after the weight-standardized conv;
    before the next conv it folds without padding (and is then not listed as left), but not into a zero-padded one,
    whose padded zeros would stay 0 instead of becoming the BN shift."""
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(WSConv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=padding))

        def forward(self, x):
            return self.seq(x) if x.sum() > -1e9 else x  # data-dependent control flow: torch.fx cannot trace it

    x = torch.randn(4, 3, 8, 8)
    model = calibrated(Untraceable(), x)
    folded, report = fold_bn(model, x)
    assert report.method == "sequential"
    if padding:
        assert report.n_folded == 0 and "zero-pads" in report.left["seq.1"], report.left
    else:
        assert [(f.bn, f.into, f.position) for f in report.folded] == [("seq.1", "seq.2", "before")]
        assert report.left == {}
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) < 1e-5


def test_sequential_fallback_folds_a_bn_on_each_side_of_one_layer_as_fx_does():
    """Sequential(BN, Conv1d k=1, BN): the fx path folds both BNs into the conv; the fallback folded the first and
    left the second, saying it had no Conv neighbour. Its note says which path it judged on. Oracles: the fx fold
    of the same Sequential, the unfolded model in float64."""
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.BatchNorm1d(4), nn.Conv1d(4, 5, 1), nn.BatchNorm1d(5))

        def forward(self, x):
            return self.seq(x) if x.sum() > -1e9 else x  # data-dependent control flow: torch.fx cannot trace it

    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    model = calibrated(Untraceable().double(), x)
    via_fx = {(f.bn, f.into, f.position) for f in fold_bn(model.seq, x)[1].folded}
    folded, report = fold_bn(model, x)
    assert report.method == "sequential" and report.left == {}
    assert {(f.bn[len("seq."):], f.into[len("seq."):], f.position) for f in report.folded} == via_fx
    assert len(via_fx) == 2 and not bn_layers(folded)
    assert any("the path the example inputs took" in n for n in report.notes)
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) < 1e-12


def test_model_writing_into_its_input_is_verified_on_fresh_copies():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x.mul_(2)))

    x = torch.randn(8, 4)
    model = calibrated(InPlace(), x.clone())
    x0 = x.clone()
    _, report = fold_bn(model, x)
    assert report.n_folded == 1 and report.max_rel_diff < 1e-6
    assert torch.equal(x, x0)  # the caller's tensor was not written


def test_bad_input_gives_specific_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        fold_bn(torch.zeros(3))
    model, x = zoo_model("mlp")
    with pytest.raises(ValueError, match="NaN/Inf"):
        fold_bn(model, torch.full_like(x, float("nan")))
    with torch.no_grad():
        model[2].weight[0] = float("inf")
    with pytest.raises(ValueError, match="affine"):
        fold_bn(model, x)
    lazy = nn.Sequential(nn.LazyLinear(4), nn.LazyBatchNorm1d()).eval()
    with pytest.raises(ValueError, match="lazy"):
        fold_bn(lazy)


def test_report_findings_and_summary_name_every_left_layer():
    model, x = zoo_model("preact")
    _, report = fold_bn(model, x)
    rows = report.findings()
    assert {r.layer for r in rows} == set(report.left)
    assert all(r.severity == "info" and r.evidence == report.left[r.layer] for r in rows)
    text = report.summary()
    assert all(name in text for name in report.left)
    assert report.to_dict()["max_rel_diff"] == report.max_rel_diff


def test_conv1d_and_conv3d_and_convtranspose1d():
    torch.manual_seed(2)
    m1 = nn.Sequential(
        nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), nn.ConvTranspose1d(5, 4, 3, stride=2), nn.BatchNorm1d(4)
    )
    m3 = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4))
    for model, x in ((m1, torch.randn(6, 3, 10)), (m3, torch.randn(3, 2, 5, 5, 5))):
        model = calibrated(model, x)
        folded, report = fold_bn(model, x)
        assert report.n_left == 0 and all(f.position == "after" for f in report.folded)
        with torch.no_grad():
            assert rel_diff(model(x), folded(x)) < 1e-5


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_folded_state_dict_reloads_into_restructured_architecture(name, tmp_path):
    import json

    from bnkit.torch import FoldReport

    model, x = zoo_model(name)
    folded, report = fold_bn(model, x)
    path = save_state_dict_file(folded.state_dict(), tmp_path / "folded.pt")
    saved = FoldReport.from_dict(json.loads(json.dumps(report.to_dict())))  # as a JSON file would give it back
    assert saved == report
    fresh = saved.restructure(ZOO[name]())
    fresh.load_state_dict(load_state_dict_file(path), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), folded(x))


_LAYER_KINDS = {
    "linear": (nn.Linear, nn.BatchNorm1d, 0),
    "conv1d": (nn.Conv1d, nn.BatchNorm1d, 1),
    "conv2d": (nn.Conv2d, nn.BatchNorm2d, 2),
    "conv3d": (nn.Conv3d, nn.BatchNorm3d, 3),
    "convT1d": (nn.ConvTranspose1d, nn.BatchNorm1d, 1),
    "convT2d": (nn.ConvTranspose2d, nn.BatchNorm2d, 2),
}


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(sorted(_LAYER_KINDS)),
    groups=st.sampled_from([1, 2]),
    stride=st.sampled_from([1, 2]),
    dilation=st.sampled_from([1, 2]),
    padding=st.sampled_from([0, 1]),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    bias=st.booleans(),
    before=st.booleans(),
    after=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_single_layer_folds_match_the_rule_and_the_output(
    kind, groups, stride, dilation, padding, padding_mode, bias, before, after, seed
):
    layer_cls, bn_cls, spatial = _LAYER_KINDS[kind]
    transpose = kind.startswith("convT")
    cin, cout = 4, 6
    torch.manual_seed(seed)
    if kind == "linear":
        layer = layer_cls(cin, cout, bias=bias)
    else:
        mode = "zeros" if transpose else padding_mode  # ConvTranspose supports zero padding only
        layer = layer_cls(cin, cout, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                          padding_mode=mode)
    mods = ([nn.ReLU(), bn_cls(cin)] if before else [nn.ReLU()]) + [layer] + ([bn_cls(cout)] if after else [])
    model = nn.Sequential(*mods)
    x = torch.randn((8, cin) + (7,) * spatial)
    if not (before or after):
        model.eval()
    else:
        model = calibrated(model, x, seed=seed)
    folded, report = fold_bn(model, x)

    # the rule, stated independently: after-folds always; before-folds unless the layer zero-pads or is transposed
    zero_pads = kind != "linear" and padding > 0 and (transpose or padding_mode == "zeros")
    want = set()
    if after:
        want.add((str(len(mods) - 1), "after"))
    if before and not transpose and not zero_pads:
        want.add(("1", "before"))
    assert {(f.bn, f.position) for f in report.folded} == want
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) < 1e-5


def test_folded_weights_beyond_the_dtype_are_refused():
    x = torch.rand(4, 2, 6, 6)
    model = calibrated(nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2, eps=1e-12)), x)
    with torch.no_grad():
        model[1].running_var.fill_(1e-12)
        model[0].weight.mul_(100.0)
    half = copy.deepcopy(model).half()
    before = {k: v.clone() for k, v in half.state_dict().items()}
    with pytest.raises(ValueError, match="beyond torch.float16's range"):
        fold_bn(half)
    with pytest.raises(ValueError, match="beyond torch.float16's range"):  # the plan promises no such fold
        fold_plan(half)
    assert all(torch.equal(v, before[k]) for k, v in half.state_dict().items())
    folded, report = fold_bn(model)  # float32 holds them
    assert report.n_folded == 1 and torch.isfinite(folded[0].weight).all()


@pytest.mark.parametrize("order", ["after", "before"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_plans_cheap_dtype_bound_never_passes_a_fold_that_overflows(order, kind):
    """``fold_plan`` skips computing the folded weights when a bound says they fit: the bound must hold."""
    from bnkit.torch.fold import FoldReport, _folded_weights, _plan, _within_dtype_bound

    rng = torch.Generator().manual_seed(0)
    layer = nn.Linear(6, 6) if kind == "linear" else nn.Conv2d(6, 6, 3)  # no padding: a BN before it folds
    bn = nn.BatchNorm1d(6) if kind == "linear" else nn.BatchNorm2d(6)
    model = nn.Sequential(layer, bn) if order == "after" else nn.Sequential(bn, layer)
    x = torch.rand(4, 6) if kind == "linear" else torch.rand(4, 6, 5, 5)
    model = calibrated(model, x).half()
    checked = 0
    for scale in (1e-3, 1.0, 30.0, 1e3, 3e4):
        for var in (1.0, 1e-2, 1e-4, 0.0):
            with torch.no_grad():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=rng) * scale)
                bn.running_var.fill_(var)
                bn.running_mean.copy_(torch.randn(6, generator=rng) * scale)
            _, plan = _plan(model, None, FoldReport())
            assert len(plan) == 1
            try:
                _folded_weights(model, plan)
                overflows = False
            except ValueError:
                overflows = True
            within = _within_dtype_bound(model, plan)
            assert not (within and overflows), (scale, var)
            checked += within
    assert checked >= 5  # the bound does skip the work in ordinary cases


@pytest.mark.parametrize("case", ["bias_scaled_after", "shift_summed_over_a_3x3_kernel_before"])
def test_the_plans_dtype_bound_counts_the_scaled_bias_and_every_weight_of_an_output(case):
    """Closed-form float16 overflows the bound must see: a bias 100 scaled by a BN with s = 1000 (1e5), and a BN shift
    300 summed over all 4 x 3 x 3 weights 10 of a conv output (108000), both beyond float16's 65504."""
    if case == "bias_scaled_after":
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, eps=0.0))
        with torch.no_grad():
            model[0].weight.fill_(0.01)
            model[0].bias.fill_(100.0)
            model[1].running_var.fill_(1e-6)  # s = 1 / sqrt(1e-6) = 1000
            model[1].num_batches_tracked.fill_(1)
        want = 100.0 * 1000.0
    else:
        model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3))
        with torch.no_grad():
            model[0].bias.fill_(300.0)  # mean 0, var 1: t = 300
            model[0].num_batches_tracked.fill_(1)
            model[1].weight.fill_(10.0)
            model[1].bias.zero_()
        want = 4 * 3 * 3 * 10.0 * 300.0
    model = model.half().eval()
    assert want > torch.finfo(torch.float16).max
    with pytest.raises(ValueError, match="beyond torch.float16's range"):
        fold_bn(model)
    with pytest.raises(ValueError, match="beyond torch.float16's range"):  # the plan promises no such fold
        fold_plan(model)


def test_a_forward_using_a_buffer_as_a_python_value_still_folds():
    """fx cannot trace ``if self.initialized:`` on a traced buffer: the constant-buffer trace takes over."""
    class ActNormLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)
            self.register_buffer("initialized", torch.tensor(1))

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y * 2 if self.initialized else y

    x = torch.rand(4, 2, 6, 6)
    model = calibrated(ActNormLike(), x)
    for inputs in (x, None):
        folded, report = fold_bn(model, inputs)
        assert report.method == "fx" and [f.bn for f in report.folded] == ["bn"]
        assert any("buffer as a Python value" in note for note in report.notes)
        with torch.no_grad():
            assert rel_diff(model(x), folded(x)) < 1e-5


def test_a_bn_or_layer_registered_under_two_names_is_left():
    """fx names a module by its first name and a fold replaces that one: an alias would still run the BN."""
    class Aliased(nn.Module):
        def __init__(self, alias: str):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            setattr(self, alias, getattr(self, alias.removesuffix("_alias")))  # e.g. a backward-compatible name

        def forward(self, x):  # calls the alias
            return getattr(self, "bn_alias", self.bn)(getattr(self, "conv_alias", self.conv)(x))

    x = torch.rand(4, 3, 8, 8)
    for alias, reason in (("bn_alias", "several names (bn, bn_alias)"), ("conv_alias", "several names (conv, conv")):
        model = calibrated(Aliased(alias), x)
        for inputs in (x, None):
            folded, report = fold_bn(model, inputs)
            assert report.n_folded == 0 and reason in report.left["bn"], (alias, report.left)
            with torch.no_grad():
                assert torch.equal(folded(x), model(x))


def test_layers_inside_a_container_registered_twice_still_fold_and_reload_equal(tmp_path):
    """Encoder stages also listed in a ModuleList: two names, one attribute slot each, so the fold reaches every path."""
    from bnkit.torch import FoldReport

    class Staged(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(
                nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
            self.stages = nn.ModuleList([self.encoder[0], self.encoder[1]])

        def forward(self, x):
            for stage in self.stages:
                x = stage(x)
            return x

    x = torch.rand(4, 3, 8, 8)
    model = calibrated(Staged(), x)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 2 and not report.left, report.left
    save_state_dict_file(folded.state_dict(), tmp_path / "staged.safetensors")
    fresh = FoldReport.from_dict(report.to_dict()).restructure(Staged())
    fresh.load_state_dict(load_state_dict_file(tmp_path / "staged.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x), rtol=1e-5, atol=1e-5)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fresh.modules())


def test_layers_sharing_one_weight_each_with_its_own_bn_are_left_and_reload_equal(tmp_path):
    """A folded layer gets its own weight, but a freshly built model ties them again: the last key loaded wins."""
    from bnkit.torch import FoldReport

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(3, 4, 3, dilation=2, bias=False), nn.BatchNorm2d(4)
            self.c2.weight = self.c1.weight

        def forward(self, x):
            return self.b1(self.c1(x)).mean((2, 3)) + self.b2(self.c2(x)).mean((2, 3))

    x = torch.rand(4, 3, 12, 12)
    model = calibrated(Tied(), x)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 0 and all("weight of 'c" in report.left[bn] for bn in ("b1", "b2"))
    save_state_dict_file(folded.state_dict(), tmp_path / "tied.safetensors")
    fresh = FoldReport.from_dict(report.to_dict()).restructure(Tied())
    fresh.load_state_dict(load_state_dict_file(tmp_path / "tied.safetensors"))
    with torch.no_grad():
        assert rel_diff(model(x), fresh.eval()(x)) < 1e-6


def test_sequential_fallback_needs_the_sequential_itself_called():
    """A forward that runs a Sequential's children one by one may tap a conv's output: that conv is not folded."""
    class Tapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            taps = []
            for i, layer in enumerate(self.features):
                x = layer(x)
                if i == 0:
                    taps.append(x)  # the conv's output, used outside the Sequential
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = x * 2
            return self.head(x), taps[0]

    x = torch.rand(4, 3, 8, 8)
    model = calibrated(Tapped(), x)
    folded, report = fold_bn(model, x)
    assert report.method == "sequential" and [(f.bn, f.into) for f in report.folded] == [("head.1", "head.0")]
    assert "'features' was not called as a whole" in report.left["features.1"]
    with torch.no_grad():
        for a, b in zip(model(x), folded(x)):
            assert rel_diff(a, b) < 1e-5


def test_sequential_fallback_sees_a_module_repeated_in_the_sequential_between_a_layer_and_its_bn():
    """``Sequential(conv, act, conv, act, bn)`` with one ReLU in two slots: ``named_children()`` lists it once, so
    the second conv and the BN looked adjacent and the BN was folded through the ReLU (review). Oracle: the
    unfolded model in float64."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            act = nn.ReLU()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), act, nn.Conv2d(4, 4, 3), act, nn.BatchNorm2d(4))

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace it
                return x
            return self.body(x)

    x = torch.randn(4, 3, 10, 10)
    model = calibrated(Branchy(), x)
    with torch.no_grad():
        model.body[4].bias.uniform_(-1, 1)
        want = copy.deepcopy(model).double()(x.double())
    folded, report = fold_bn(model, x, verify=False)
    assert report.method == "sequential" and not report.folded and "body.4" in report.left
    with torch.no_grad():
        assert rel_diff(folded(x).double(), want) < 1e-6


@pytest.mark.parametrize("holder", ["list", "dict", "set", "attribute", "tuple"])
def test_a_bn_also_held_in_a_plain_attribute_is_replaced_there_too_or_left(holder):
    """``self.norms = [self.bn]`` called as ``self.norms[0](...)``: fx names the call after the registered slot,
    the fold replaced that slot alone, and the list's BN still ran on the folded weights (review). Now the folded
    BN's Identity goes wherever the copy holds the BN outside its slots (a list, dict, set or plain attribute),
    and a tuple, which cannot be rewritten, leaves the BN with the reason; restructure() does the same to a
    fresh model. Oracle: the unfolded model in float64."""
    class Held(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            held = {"list": [self.bn], "dict": {"norm": self.bn}, "set": {self.bn}, "tuple": (self.bn,),
                    "attribute": self.bn}[holder]
            object.__setattr__(self, "norms", held)  # unregistered: a plain attribute

        def forward(self, x):
            norm = {"list": lambda: self.norms[0], "dict": lambda: self.norms["norm"],
                    "set": lambda: next(iter(self.norms)), "tuple": lambda: self.norms[0],
                    "attribute": lambda: self.norms}[holder]()
            return norm(self.conv(x))

    x = torch.randn(4, 3, 8, 8)
    model = calibrated(Held(), x)
    with torch.no_grad():
        model.bn.bias.uniform_(-1, 1)
        want = copy.deepcopy(model).double()(x.double())
    folded, report = fold_bn(model)
    if holder == "tuple":
        assert not report.folded and "held under several names (bn, norms[0])" in report.left["bn"]
    else:
        assert [(f.bn, f.into) for f in report.folded] == [("bn", "conv")]
        assert not any(isinstance(m, nn.BatchNorm2d) for m in (folded.norms if holder in ("list", "set") else
                       folded.norms.values() if holder == "dict" else [folded.norms]))
        fresh = report.restructure(Held())
        fresh.load_state_dict(folded.state_dict())
        with torch.no_grad():
            assert rel_diff(fresh(x).double(), want) < 1e-6
    with torch.no_grad():
        assert rel_diff(folded(x).double(), want) < 1e-6
    assert isinstance(model.bn, nn.BatchNorm2d) and model.norms is not folded.norms  # the caller's model as it was



@pytest.mark.parametrize("holder", ["namespace", "deque", "partial", "closure", "method"])
def test_a_bn_reached_through_another_object_is_left(holder):
    """A SimpleNamespace, deque, functools.partial, closure or bound method holding the BN: a fold cannot rewrite
    them, and replacing the registered slot alone left them running the BN on the folded conv (review: 0.64 of the
    output off). Oracle: the unfolded model in eval mode (a deep copy of a closure still calls the original BN)."""
    class Reached(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            bn = self.bn
            held = {"namespace": lambda: types.SimpleNamespace(norm=bn), "deque": lambda: collections.deque([bn]),
                    "partial": lambda: functools.partial(bn), "closure": lambda: (lambda y: bn(y)),
                    "method": lambda: bn.forward}[holder]()
            object.__setattr__(self, "norm", held)

        def forward(self, x):
            norm = self.norm.norm if holder == "namespace" else self.norm[0] if holder == "deque" else self.norm
            return norm(self.conv(x))

    report = _folded_as_the_eval_model(Reached())
    assert not report.folded
    if holder not in ("closure", "method"):  # fx cannot trace a call of a plain attribute's function: left for that
        assert "held under several names (bn, norm" in report.left["bn"]


def _folded_as_the_eval_model(model: nn.Module):
    """fold_bn(model) without example_inputs, its BN ``bn`` given a random bias after calibration: the report, once
    the folded model's output is checked against the unfolded eval-mode model's (the oracle)."""
    x = torch.randn(4, 3, 8, 8)
    model = calibrated(model, x)
    with torch.no_grad():
        model.bn.bias.uniform_(-1, 1)
        want = model(x)
    folded, report = fold_bn(model)
    with torch.no_grad():
        assert rel_diff(folded(x), want) < 1e-6
    return report


@pytest.mark.parametrize("holder", ["module list", "module list in a namespace", "vocabulary first"])
def test_a_bn_in_an_unregistered_module_or_past_a_large_attribute_is_left(holder):
    """An nn.ModuleList set with object.__setattr__ runs the BN it holds (review: 0.57 off), and a 10000-word
    vocabulary held before the namespace used up the search (review). Oracle: the unfolded model in eval mode."""
    class Reached(nn.Module):
        def __init__(self):
            super().__init__()
            object.__setattr__(self, "vocab", [f"w{i}" for i in range(12_000)])
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            held = {"module list": lambda: nn.ModuleList([self.bn]),
                    "module list in a namespace": lambda: types.SimpleNamespace(norm=nn.ModuleList([self.bn])),
                    "vocabulary first": lambda: types.SimpleNamespace(norm=[self.bn])}[holder]()
            object.__setattr__(self, "held", held)

        def forward(self, x):
            norm = self.held[0] if holder == "module list" else self.held.norm[0]
            return norm(self.conv(x))

    report = _folded_as_the_eval_model(Reached())
    assert not report.folded and "held under several names (bn, held" in report.left["bn"]


def test_a_model_holding_its_optimizer_still_folds():
    """The optimizer's parameter groups hold the model's parameters, which are not aliases a forward reads: the
    fold refused them as shared (review). Oracle: the unfolded model in float64."""
    class Agent(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.opt = torch.optim.Adam(self.parameters())

        def forward(self, x):
            return self.net(x)

    x = torch.randn(4, 3, 8, 8)
    model = Agent()
    model(x).square().mean().backward()
    model.opt.step()  # its state: a dict keyed by the parameters (review: then refused again)
    model = calibrated(model, x)
    want = copy.deepcopy(model).double()(x.double())
    folded, report = fold_bn(model, x)
    assert [(f.bn, f.into) for f in report.folded] == [("net.1", "net.0")]
    with torch.no_grad():
        assert rel_diff(folded(x).double(), want) < 1e-6


def test_a_search_of_held_objects_cut_short_is_noted(monkeypatch):
    import bnkit.torch.fold as fold_module

    monkeypatch.setattr(fold_module, "_OPEN_LIMIT", 3)
    model = calibrated(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), torch.randn(4, 3, 8, 8))
    object.__setattr__(model, "objects", [types.SimpleNamespace(k=k) for k in range(5)])
    report = fold_plan(model)
    assert sum("searched for other references to the BatchNorm layers up to 3 objects" in n for n in report.notes) == 1


def test_a_long_chain_of_held_objects_is_searched_without_recursion():
    """A linked list of 5000 objects in a plain attribute: the recursive search hit Python's recursion limit
    (review); the chain's end holds the BN, which is then left."""
    class Node:
        def __init__(self, nxt):
            self.nxt = nxt

    model = calibrated(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), torch.randn(4, 3, 8, 8))
    chain = model[1]
    for _ in range(5000):
        chain = Node(chain)
    object.__setattr__(model, "chain", chain)
    report = fold_plan(model)
    assert not report.folded and "held under several names (1, chain.<Node>" in report.left["1"]
    with pytest.raises(ValueError, match="nested too deeply for copy.deepcopy"):  # fold_bn copies the model first
        fold_bn(model)
    assert isinstance(model[1], nn.BatchNorm2d)
    object.__setattr__(model, "chain", None)
    model[0].weight.history = chain  # an attribute of a parameter, copied after the model (review)
    with pytest.raises(ValueError, match="nested too deeply for copy.deepcopy"):
        fold_bn(model)

def test_a_conv_or_the_module_itself_reached_through_other_objects_still_folds():
    """Only a BN (replaced) or a parameter (copied) held elsewhere matters: a conv keeps its object, and a module's
    own bound method goes with it. Oracle: the unfolded model in float64."""
    class Bound(nn.BatchNorm2d):
        def __init__(self, c):
            super().__init__(c)
            object.__setattr__(self, "run", self.forward)

    class Reached(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), Bound(4)
            object.__setattr__(self, "convs", types.SimpleNamespace(first=self.conv))

        def forward(self, x):
            return self.bn(self.convs.first(x))

    x = torch.randn(4, 3, 8, 8)
    model = calibrated(Reached(), x)
    with torch.no_grad():
        model.bn.bias.uniform_(-1, 1)
        want = copy.deepcopy(model).double()(x.double())
    folded, report = fold_bn(model, x)
    assert [(f.bn, f.into) for f in report.folded] == [("bn", "conv")]
    with torch.no_grad():
        assert rel_diff(folded(x).double(), want) < 1e-6


def test_a_bn_inside_a_compiled_submodule_is_left_saying_so():
    class Part(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.compile(nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), backend="eager")
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.block(x))

    x = torch.randn(2, 4, 9, 9)
    folded, report = fold_bn(calibrated(Part(), x), x)
    assert not report.folded and "inside 'block', compiled by torch.compile" in report.left["block._orig_mod.1"]

def test_a_bn_used_as_a_dict_key_is_left():
    """``{self.bn: 2.0}`` iterated in forward: a key cannot be rewritten, and the fold left the key's BN running on
    the folded weights, 1.7 off unverified (review). Oracle: the unfolded model in float64."""
    class Keyed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            object.__setattr__(self, "scale_of", {self.bn: 2.0})

        def forward(self, x):
            y = self.conv(x)
            for module, k in self.scale_of.items():
                y = module(y) * k
            return y

    x = torch.randn(4, 3, 8, 8)
    model = calibrated(Keyed(), x)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
    folded, report = fold_bn(model, x, verify=False)
    assert not report.folded and "scale_of (a key)" in report.left["bn"]
    with torch.no_grad():
        assert rel_diff(folded(x).double(), want) < 1e-6


def test_bnkit_frozen_layers_fold_like_eval_mode_bn_and_leave_the_rest_traceable():
    """FrozenBatchNorm*d's input checks cannot be traced: as leaves they fold, and one does not hide the rest."""
    from bnkit.torch import FrozenBatchNorm2d, convert_frozen

    model, x = zoo_model("resnet")
    want = {(f.bn, f.into, f.position) for f in fold_bn(model, x)[1].folded}
    frozen = copy.deepcopy(model)
    convert_frozen(frozen, [bn_layers(frozen)[0][1]])
    every = convert_frozen(copy.deepcopy(model)).train()  # a frozen layer computes the eval transform in any mode
    for net, n_frozen in ((frozen, 1), (every, len(want))):
        assert sum(isinstance(m, FrozenBatchNorm2d) for m in net.modules()) == n_frozen
        folded, report = fold_bn(net, x)
        assert report.method == "fx" and {(f.bn, f.into, f.position) for f in report.folded} == want, report.summary()
        assert not report.left and not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
        with torch.no_grad():
            assert rel_diff(model(x), folded.eval()(x)) < 1e-5


def test_the_identity_replacing_a_freeze_bn_layer_follows_train_and_holds_no_copy_of_the_bn():
    """freeze_bn pins a layer's flag with an instance ``train``; copied onto the Identity, it kept the Identity in
    eval mode through ``folded.train()`` and the removed BN (buffers and all) inside the folded model's pickle.
    Oracle: a plain nn.Identity in the same place."""
    import io

    from bnkit.torch import freeze_bn

    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    model = freeze_bn(calibrated(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), x))
    folded, _ = fold_bn(model, x)
    assert isinstance(folded[1], nn.Identity) and "train" not in vars(folded[1])
    assert folded[1].num_features == 4 and folded[1].eps == model[1].eps  # the plain attributes stay
    assert folded.train()[1].training and not folded.eval()[1].training
    pickled = io.BytesIO()
    torch.save(folded, pickled)
    assert b"BatchNorm2d" not in pickled.getvalue()


_PRECISION_SEEN: list[tuple[str, ...]] = []  # module level: fold_bn's deep copies record here too


class _ReadsPrecision(nn.Module):
    """Conv -> BN that records the float32 precision settings each forward runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        knobs = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul)
        _PRECISION_SEEN.append(tuple(k.fp32_precision for k in knobs))
        assert torch.backends.cudnn.allow_tf32 in (True, False)  # model code may read the legacy flag (cudnn.flags)
        return self.bn(self.conv(x))


@pytest.mark.parametrize("tool", ["fold_bn", "export_onnx"])
def test_checks_run_in_full_float32_and_leave_the_users_tf32_settings(tool, tmp_path):
    """TF32 convolutions (PyTorch's CUDA default) differ from float32 by ~1e-3: fold's verification and the
    export's reference outputs run with every float32 precision setting at "ieee", then put back as found."""
    model = calibrated(_ReadsPrecision(), torch.randn(8, 1, 6, 6))
    knobs = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul)
    saved = [k.fp32_precision for k in knobs]
    try:
        torch.backends.cudnn.conv.fp32_precision = "tf32"  # a user's choice, mixed on purpose
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        before = [k.fp32_precision for k in knobs]
        _PRECISION_SEEN.clear()
        if tool == "fold_bn":
            fold_bn(model, torch.randn(4, 1, 6, 6))
            assert len(_PRECISION_SEEN) == 3  # the original's run, the fx trace (symbolic), the folded copy's run
            checks = [_PRECISION_SEEN[0], _PRECISION_SEEN[2]]
        else:
            from bnkit.torch import export_onnx

            export_onnx(model, torch.randn(4, 1, 6, 6), tmp_path / "m.onnx")
            checks = _PRECISION_SEEN[:2]  # the batch and its first sample; then the export traces the model
        assert len(checks) == 2 and all(seen == ("ieee",) * 3 for seen in checks), _PRECISION_SEEN
        assert [k.fp32_precision for k in knobs] == before
    finally:
        for k, value in zip(knobs, saved):
            k.fp32_precision = value


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's first import: torch.jit internals
def test_wrapped_models_fold_and_audit_as_the_module_they_run():
    """DataParallel, AveragedModel and torch.compile: fx cannot trace the wrappers (2 of 6 folded, by nn.Sequential
    neighbours) and the ONNX exporter refused them; the module inside folds 6 of 6 like the plain model."""
    from torch.optim.swa_utils import AveragedModel

    from bnkit.torch import audit

    model, x = zoo_model("resnet")
    plain = {f.bn for f in fold_bn(model, x)[1].folded}
    # DataParallel last, and each wrapper made when its turn comes: on a machine with CUDA, DataParallel moves the
    # model to the GPU as it is made (and sends x there itself)
    for wrap in (AveragedModel, lambda m: torch.compile(m, backend="eager"), nn.DataParallel):
        wrapped = wrap(model)
        folded, report = fold_bn(wrapped, x)
        assert {f.bn for f in report.folded} == plain and report.method == "fx", type(wrapped).__name__
        assert any("folded the module inside" in n for n in report.notes) and report.max_rel_diff < 1e-5
        inner = wrapped.module if hasattr(wrapped, "module") else model
        xd = x.to(next(inner.parameters()).device)
        with torch.no_grad():
            assert rel_diff(inner.eval()(xd).cpu(), folded(xd).cpu()) < 1e-5
        row = [f for f in audit(wrapped).findings if f.code == "foldable"]
        assert row and row[0].finding.startswith(f"{len(plain)} of ")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_export_onnx_takes_wrappers_and_inference_mode_inputs(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from bnkit.torch import export_onnx

    model, x = zoo_model("vgg")
    with torch.inference_mode():
        xi = x.clone()
    in_place = copy.deepcopy(model)
    in_place.compile(backend="eager")
    with torch.no_grad():
        want = model(x)
    # DataParallel last, and made when its turn comes: on a machine with CUDA, DataParallel moves the model to the
    # GPU as it is made (and sends xi there itself)
    for i, wrap in enumerate((lambda m: torch.compile(m, backend="eager"), lambda m: in_place, lambda m: m,
                              nn.DataParallel)):
        path = export_onnx(wrap(model), xi, tmp_path / f"m{i}.onnx").path
        got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        assert rel_diff(want, torch.from_numpy(got)) < 1e-5


@pytest.mark.parametrize("dtype,mean,var,noted", [(torch.float16, 200.0, 1.0, True), (torch.bfloat16, 200.0, 1.0, True),
                                                  (torch.float16, 40.0, 1.0, True), (torch.float16, 0.5, 1.0, False),
                                                  (torch.float32, 200.0, 1.0, False),
                                                  (torch.float32, 3e4, 1.0, True),
                                                  # the offset counts in standard deviations sqrt(var), not var
                                                  (torch.float16, 300.0, 100.0, True),  # 30 std
                                                  (torch.float16, 0.5, 0.01, False)])  # 5 std
def test_a_low_precision_fold_before_a_layer_with_offset_inputs_is_noted(dtype, mean, var, noted):
    """BN -> Linear in float16 with inputs 200 std from zero: the folded bias cancels the offset in float16, so the
    folded model is far less accurate than the unfolded one on such data (float64 oracle), which random
    verification inputs near zero do not show; the report says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].running_mean.fill_(mean)
        model[0].running_var.fill_(var)
        model[0].num_batches_tracked.fill_(1000)
    model = model.to(dtype).eval()
    folded, report = fold_bn(model, torch.randn(8, 16).to(dtype))
    assert any("folded before 1" in n for n in report.notes) is noted
    assert fold_plan(model, torch.randn(8, 16).to(dtype)).notes == report.notes  # the same report, uncopied
    if noted:  # the loss it warns of, on data like the statistics
        x = (mean + var ** 0.5 * torch.randn(64, 16)).to(dtype)  # the inputs as the model gets them
        exact = copy.deepcopy(model).double()
        with torch.no_grad():
            want = exact(x.double())
            assert rel_diff(want, folded(x)) > 3 * rel_diff(want, model(x))


def test_a_packed_sequence_example_input_is_one_argument():
    """PyTorch takes a tuple of example inputs as the arguments; a PackedSequence is a namedtuple, and was spread
    into four arguments (TypeError in the model). Oracle: the unfolded model's eval output."""
    from torch.nn.utils.rnn import pack_padded_sequence

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc, self.bn = nn.GRU(4, 6), nn.Linear(6, 5), nn.BatchNorm1d(5)

        def forward(self, packed):
            return self.bn(self.fc(self.rnn(packed)[1][-1]))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    packed = pack_padded_sequence(torch.randn(5, 3, 4), torch.tensor([5, 3, 2]))
    folded, report = fold_bn(net, packed)
    assert [(f.bn, f.into) for f in report.folded] == [("bn", "fc")] and report.max_abs_diff is not None
    assert fold_plan(net, packed).folded[0].bn == "bn"
    with torch.no_grad():
        torch.testing.assert_close(folded(packed), net(packed), rtol=1e-5, atol=1e-6)


def test_a_model_on_the_meta_device_is_refused_by_name():
    """fold_bn of a model built on 'meta' failed deep inside with 'Tensor.item() cannot be called on meta tensors'."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    for call in (lambda: fold_bn(model, torch.randn(2, 4)), lambda: fold_plan(model)):
        with pytest.raises(ValueError, match=r"the model holds meta tensors \(0.weight"):
            call()
