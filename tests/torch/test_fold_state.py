"""fold_bn and fold_plan leave no trace of their own forward runs: a model whose eval forward writes its state (a
Glow-style ActNorm initializing itself from the first batch, a call counter) is folded, verified and planned from the
state it has, and the caller's model and the returned copy keep that state.

The verification compares like with like: a NaN the unfolded model already outputs at the same place is a match.

Oracles: the unfolded model's own eval output (a float64 deep copy, run fresh), and its state dict before the call.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _helpers import set_running_stats
from torch import nn

from bnkit.torch import fold_bn


class ActNormBuffer(nn.Module):
    """Glow's ActNorm: on its first forward (in any mode) it sets ``loc`` and ``scale`` from the batch; the flag
    is a buffer."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, c, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.done():
            with torch.no_grad():
                self.loc.copy_(-x.mean((0, 2, 3), keepdim=True))
                self.scale.copy_(1 / (x.std((0, 2, 3), keepdim=True) + 1e-6))
            self.mark_done()
        return self.scale * (x + self.loc)

    def done(self) -> bool:
        return bool(self.initialized)

    def mark_done(self) -> None:
        self.initialized.fill_(1)


class ActNormFlag(ActNormBuffer):
    """The same ActNorm with a plain Python flag (no buffer) that the first forward rebinds."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        del self.initialized
        self.initialized = False

    def done(self) -> bool:
        return self.initialized

    def mark_done(self) -> None:
        self.initialized = True


class Counter(nn.Module):
    """Adds how many times it ran before (a buffer written in place on every call, eval mode included)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.calls
        self.calls += 1
        return out


def conv_bn_then(tail: nn.Module) -> nn.Sequential:
    """conv -> BN (foldable, real-looking statistics) -> ``tail``, in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), tail).eval()
    set_running_stats(model[1], torch.randn(4), torch.rand(4) + 0.5)
    return model


@pytest.mark.parametrize("actnorm", [ActNormBuffer, ActNormFlag])
def test_fold_bn_copy_keeps_the_models_state_not_what_its_probe_and_verification_wrote(actnorm):
    """An ActNorm not yet initialized is returned not yet initialized (parameters, buffer or flag as in the
    model), so on the first real batch it initializes from that batch as the unfolded model does."""
    model = conv_bn_then(actnorm(4))
    before = copy.deepcopy(model.state_dict())
    oracle = copy.deepcopy(model).double()
    example = torch.randn(2, 3, 8, 8)

    folded, report = fold_bn(model, example)

    assert [f.bn for f in report.folded] == ["1"]
    assert folded[2].initialized is False if actnorm is ActNormFlag else int(folded[2].initialized) == 0
    for key in ("2.loc", "2.scale"):
        assert torch.equal(folded.state_dict()[key], before[key])
    real = torch.randn(4, 3, 8, 8) * 5 + 3
    with torch.no_grad():
        want, got = oracle(real.double()), folded(real).double()
    assert float((want - got).abs().max()) < 1e-4
    assert report.max_abs_diff < 1e-5


def test_fold_bn_verifies_from_the_state_the_reference_ran_from():
    """A forward that counts its calls in a buffer gives the same output for the same state: the folded model's
    verification run starts from the count the unfolded run started from (0), and the copy comes back at 0."""
    model = conv_bn_then(Counter())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())

    folded, report = fold_bn(model, x)

    assert report.max_abs_diff < 1e-5
    assert float(folded[2].calls) == 0 and float(model[2].calls) == 0
    with torch.no_grad():
        assert float((folded(x).double() - want).abs().max()) < 1e-5


def test_fold_plan_changes_no_parameter_buffer_or_attribute_of_the_model():
    """fold_plan's probe run on the caller's model leaves it as it was: an ActNorm that initializes itself on its
    first forward keeps its parameters (the same objects, with their values) and its flag unset."""
    from bnkit.torch import fold_plan

    model = conv_bn_then(ActNormFlag(4))
    before = copy.deepcopy(model.state_dict())
    params = [id(p) for p in model.parameters()]

    plan = fold_plan(model, torch.randn(2, 3, 8, 8))

    assert [f.bn for f in plan.folded] == ["1"]
    assert model[2].initialized is False
    assert [id(p) for p in model.parameters()] == params
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class SqrtHead(nn.Module):
    """conv -> BN -> sqrt: NaN wherever the BN output is negative, in the folded model at the same places."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.bn(self.conv(x)))


def test_fold_bn_counts_a_nan_both_models_output_at_one_place_as_a_match():
    """max_abs_diff is the largest difference over the other positions (float64 NumPy over the two models' own
    outputs), not inf, so a correct fold of a model that outputs NaN on some inputs verifies."""
    torch.manual_seed(0)
    model = SqrtHead().eval()
    set_running_stats(model.bn, torch.randn(4), torch.rand(4) + 0.5)
    x = torch.randn(2, 3, 8, 8)

    folded, report = fold_bn(model, x)

    with torch.no_grad():
        a, b = model(x).double().numpy(), folded(x).double().numpy()
    assert np.isnan(a).any() and np.array_equal(np.isnan(a), np.isnan(b))
    want = np.nanmax(np.abs(a - b))
    assert report.max_abs_diff == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert report.max_rel_diff == pytest.approx(want / np.nanmax(np.abs(a)), rel=1e-12, abs=1e-15)


def test_verification_counts_nan_in_one_model_only_or_no_finite_value_as_inf():
    """A NaN where the other model is finite (or NaN at another place) is inf; outputs with no finite value to
    compare (NaN everywhere in both) verify nothing, so they are inf too, not 0."""
    from bnkit.torch.fold import _compare

    nan = float("nan")
    assert _compare(torch.tensor([nan, 2.0]), torch.tensor([nan, 2.5]))[:2] == (0.5, 0.25)
    assert _compare(torch.tensor([nan, 2.0]), torch.tensor([1.0, nan]))[:2] == (math.inf, math.inf)
    assert _compare(torch.tensor([nan, nan]), torch.tensor([nan, nan]))[:2] == (math.inf, math.inf)
    # a class index beside all-NaN logits is finite and equal in both, yet verifies nothing either
    index = torch.tensor([0, 0])
    assert _compare((torch.tensor([nan, nan]), index), (torch.tensor([nan, nan]), index))[:2] == (math.inf, math.inf)
    assert _compare(torch.tensor([1, 3]), torch.tensor([1, 2]))[:2] == (1.0, 1 / 3)  # an all-integer output compares


class LazyScale(nn.Module):
    """A per-channel scale created on the first call the pre-LazyModule way: the forward rebinds the parameter's
    ``.data`` from an empty tensor to one of the channel count."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.empty(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.s.numel() == 0:
            self.s.data = torch.linspace(0.5, 2.0, x.shape[1])
        return x * self.s.view(1, -1, 1, 1)


def test_a_parameter_whose_data_the_forward_rebinds_to_another_shape_is_given_its_old_data_back():
    """fold_bn and fold_plan put the empty parameter back (the same Parameter object), so the folded copy and the
    caller's model create it on their first real call, and the folded copy matches the unfolded model there."""
    from bnkit.torch import fold_plan

    model = conv_bn_then(LazyScale())
    param = model[2].s
    x = torch.randn(2, 3, 8, 8)
    oracle = copy.deepcopy(model).double()

    plan = fold_plan(model, x)
    folded, report = fold_bn(model, x)

    assert [f.bn for f in plan.folded] == [f.bn for f in report.folded] == ["1"]
    assert model[2].s is param and param.shape == (0,) and folded[2].s.shape == (0,)
    assert report.max_abs_diff < 1e-5
    with torch.no_grad():
        assert float((folded(x).double() - oracle(x.double())).abs().max()) < 1e-5


def test_fold_plan_between_a_forward_and_its_backward_leaves_the_graph_usable():
    """fold_plan writes back only tensors its runs changed (none here), so autograd's saved tensors keep their
    versions: backward after fold_plan runs and gives the gradients it gives without the fold_plan call."""
    from bnkit.torch import fold_plan

    model = nn.Sequential(conv_bn_then(nn.ReLU()), nn.Conv2d(4, 2, 3))
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)

    loss = model(x).square().mean()
    plan = fold_plan(model, x)
    loss.backward()
    twin(x).square().mean().backward()

    assert [f.bn for f in plan.folded] == ["0.1"]
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_saved_state_writes_back_changed_values_only_nan_matching_nan_and_minus_zero_not_zero():
    """A parameter holding NaN that nothing wrote is not written back (its autograd version kept); a -0.0 written
    over 0.0 through ``.data`` (which no version counter sees, and == calls equal) is put back as 0.0."""
    from bnkit.torch.modules import SavedState

    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[float("nan"), 0.0]]))
    version = layer.weight._version
    with SavedState(layer):
        pass
    assert layer.weight._version == version
    with SavedState(layer):
        layer.weight.data[0, 1] = -0.0
    assert torch.isnan(layer.weight[0, 0]) and not torch.signbit(layer.weight[0, 1])


class Recording(nn.Module):
    """conv -> BN, recording each output in a list, counting calls in a dict and noting call numbers in a set:
    containers held in attributes and changed in place by every eval forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        set_running_stats(self.bn, torch.randn(4), torch.rand(4) + 0.5)
        self.features, self.stats, self.seen = [], {"calls": 0}, set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        self.features.append(y.detach())
        self.stats["calls"] += 1
        self.seen.add(len(self.features))
        return y


def test_lists_dicts_and_sets_in_attributes_get_their_items_back():
    """After one real call, fold_plan leaves the caller's containers (the same objects) holding what that call put
    there, no fx Proxy and no probe output; fold_bn's copy holds as many items as the model."""
    from bnkit.torch import fold_plan

    model = Recording().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    features, stats, seen = model.features, model.stats, model.seen
    first = features[0]

    plan = fold_plan(model, x)
    folded, report = fold_bn(model, x)

    assert [f.bn for f in plan.folded] == [f.bn for f in report.folded] == ["bn"]
    assert model.features is features and len(features) == 1 and features[0] is first
    assert model.stats is stats and stats == {"calls": 1}
    assert model.seen is seen and seen == {1}
    assert len(folded.features) == 1 and folded.stats == {"calls": 1} and folded.seen == {1}
    assert torch.equal(folded.features[0], first)


@pytest.mark.parametrize("extra", ["sparse", "float8", "complex"])
def test_buffers_without_a_bitwise_comparison_are_kept_and_the_bn_folds(extra):
    """A sparse adjacency matrix, a float8 or a complex NaN buffer beside the BN: fold_plan and fold_bn fold it (as
    PyTorch's own fuser would: the oracle is the unfolded float64 output) and the buffer keeps its values."""
    from bnkit.torch import fold_bn, fold_plan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double()
    set_running_stats(model[1], torch.randn(4).double(), torch.rand(4).double() + 0.5)
    value = {"sparse": torch.eye(4).to_sparse(), "float8": torch.linspace(-2, 2, 4).to(torch.float8_e4m3fn),
             "complex": torch.full((4,), complex(float("nan"), 1.0))}[extra]
    model.register_buffer("extra", value.clone())
    model.eval()
    assert [f.bn for f in fold_plan(model, torch.randn(2, 3, 6, 6).double()).folded] == ["1"]
    x = torch.randn(2, 3, 6, 6).double()
    folded, report = fold_bn(model, x)
    assert [f.bn for f in report.folded] == ["1"]
    torch.testing.assert_close(folded(x), model(x))
    for kept in (model.extra, folded.extra):
        same = (kept.to_dense() == value.to_dense()).all() if extra == "sparse" else (
            torch.equal(kept.view(torch.int8), value.view(torch.int8)) if extra == "float8"
            else torch.equal(torch.view_as_real(kept).isnan(), torch.view_as_real(value).isnan()))
        assert same


def test_write_back_compares_neg_bit_and_complex_tensors_by_their_values():
    """A float buffer with the negative bit set (``c.conj().imag``) is compared, not refused; a complex -0.0 written
    over 0j is put back as 0j (bit for bit, as for real values); torch.signbit is the oracle."""
    from bnkit.torch.fold import fold_plan
    from bnkit.torch.modules import write_back

    c = torch.randn(4, dtype=torch.cfloat)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    set_running_stats(model[1], torch.randn(4), torch.rand(4) + 0.5)
    model.register_buffer("im", c.conj().imag)
    assert model.im.is_neg() and [f.bn for f in fold_plan(model, torch.randn(8, 4)).folded] == ["1"]
    saved = torch.zeros(2, dtype=torch.cfloat)
    buffer = torch.tensor([complex(-0.0, 0.0), 0j])
    write_back(buffer, saved)
    assert not torch.signbit(torch.view_as_real(buffer)).any()
