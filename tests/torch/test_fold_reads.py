"""fold_bn on forwards that read the layers it folds other than by calling them: plain attributes of a BN
(``self.bn.num_features``), a BN's or a layer's tensors outside the fx trace (an untraceable model), and the input of
a BN folded before a layer written in place before that layer reads it.

Oracles: the unfolded model's own eval output (a float64 deep copy where the fold changes weights).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _helpers import set_running_stats
from torch import nn

from bnkit.torch import fold_bn, fold_plan


def max_diff_to_unfolded(model: nn.Module, folded: nn.Module, x: torch.Tensor) -> float:
    """``max |folded(x) - model(x)|``, the unfolded model run in float64 on a deep copy."""
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        return float((folded(x).double() - want).abs().max())


class ReadsBnAttribute(nn.Module):
    """conv -> BN, then a reshape sized by the BN's ``num_features`` and a shift by its ``eps``: plain values, which
    the fx graph does not show."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y.reshape(y.shape[0], self.bn.num_features, -1).mean(-1) + self.bn.eps


def bn_stats(model: nn.Module) -> nn.Module:
    """Real-looking running statistics and affine parameters for every BatchNorm2d of ``model``; eval mode."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            set_running_stats(m, torch.randn(m.num_features), torch.rand(m.num_features) + 0.5)
            with torch.no_grad():
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


@pytest.mark.parametrize("with_inputs", [True, False])
def test_folded_bn_keeps_its_plain_attributes_for_a_forward_that_reads_them(with_inputs):
    """The module replacing a folded BN has the BN's num_features, eps, momentum, affine and tracking flags, so the
    folded model runs and matches the unfolded one (with or without example inputs to verify)."""
    model = bn_stats(ReadsBnAttribute())
    x = torch.randn(2, 3, 8, 8)

    folded, report = fold_bn(model, x if with_inputs else None)

    assert [f.bn for f in report.folded] == ["bn"]
    assert (folded.bn.num_features, folded.bn.eps, folded.bn.momentum) == (8, 1e-3, 0.1)
    assert max_diff_to_unfolded(model, folded, x) < 1e-5
    if with_inputs:
        assert report.max_abs_diff < 1e-5


class ChecksBnType(ReadsBnAttribute):
    """Raises unless ``self.bn`` is a BatchNorm2d: true when traced, false once folded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.bn, nn.BatchNorm2d):
            raise RuntimeError("bn must be a BatchNorm2d")
        return self.bn(self.conv(x))


def test_a_folded_model_that_raises_in_verification_is_a_clear_value_error():
    """Where the folded model cannot run on the inputs the original ran on, fold_bn raises ValueError naming the
    folded BN and the error, instead of passing the forward's own error on."""
    model = bn_stats(ChecksBnType())
    with pytest.raises(ValueError, match=r"folded model raised RuntimeError \(bn must be a BatchNorm2d\).*'bn'"):
        fold_bn(model, torch.randn(2, 3, 8, 8))


@torch.fx.wrap
def pad(x: torch.Tensor) -> torch.Tensor:
    """A user's function named like F.pad that returns its input itself when nothing needs padding."""
    return x


@torch.fx.wrap
def bump(x: torch.Tensor) -> torch.Tensor:
    """A user's function that writes its argument in place."""
    return x.add_(1)


class ReluAliasWritten(nn.Module):
    """conv -> in-place ReLU (its output is the conv's output itself) -> BN -> 1x1 conv, with the conv's output
    written between the BN and the conv: a write into the BN's input through the other name."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.pre, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True)
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.functional = functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.pre(x)
        r = nn.functional.relu(c, inplace=True) if self.functional else self.act(c)
        z = self.bn(r)
        c += 1
        return self.conv(z)


@pytest.mark.parametrize("functional", [True, False])
def test_a_write_through_the_name_an_in_place_activation_returned_leaves_the_bn(functional):
    """The in-place ReLU returns the conv's output itself, so ``c += 1`` writes the BN's input: left, and the
    output is the unfolded model's."""
    model = bn_stats(ReluAliasWritten(functional))
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_bn(model, x)
    assert not report.folded and "in place" in report.left["bn"]
    assert max_diff_to_unfolded(model, folded, x) < 1e-5


class WritesBnInput(nn.Module):
    """BN then a 1x1 conv (a "before" fold), with the BN's input ``h`` also kept as a shortcut that ``write``
    changes in place: between the BN and the conv, or (``late``) after the conv."""

    def __init__(self, write: str, late: bool = False) -> None:
        super().__init__()
        self.pre = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU(inplace=True)
        self.write, self.late = write, late

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        z = self.bn(h)
        if self.late:
            out = self.conv(z)
            self.write_into(h)
            return out + h
        self.write_into(h)
        return self.conv(z) + h

    def write_into(self, h: torch.Tensor) -> None:
        if self.write == "method":
            h.mul_(0.5)
        elif self.write == "augmented":  # fx records `h += 1` as `h + 1`; the forward writes h in place
            h += 1
        elif self.write == "augmented_view":  # writes the slice of h it views
            v = h[:, :2]
            v += 1
        elif self.write == "module":
            self.act(h)
        elif self.write == "function":
            nn.functional.relu(h, inplace=True)
        elif self.write == "view":
            h.view(-1)[::2].zero_()
        elif self.write == "out":
            torch.mul(h, 2, out=h)
        elif self.write in ("ravel", "broadcast", "dropout", "keyword", "second", "wrapped"):
            # ops that return h's memory (h passed by keyword, as a second argument, to a user's function named like
            # a PyTorch op that makes new memory), then `g += 1` on it
            g = {"ravel": lambda: h.ravel(), "broadcast": lambda: h.broadcast_to(h.shape),
                 "dropout": lambda: nn.functional.dropout(h, 0.1, False),
                 "keyword": lambda: torch.flatten(input=h), "second": lambda: torch.broadcast_tensors(h[:1], h)[1],
                 "wrapped": lambda: pad(h)}[self.write]()
            g += 1
        elif self.write == "setitem":
            h.__setitem__(0, 5.0)
        elif self.write == "iadd_method":
            h.__iadd__(1)
        elif self.write == "aten":
            torch.ops.aten.add_.Tensor(h, 1)
        elif self.write == "user_writer":
            bump(h)


@pytest.mark.parametrize("write", ["method", "augmented", "augmented_view", "module", "function", "view", "out",
                                   "ravel", "broadcast", "dropout", "keyword", "second", "wrapped", "setitem",
                                   "iadd_method", "aten", "user_writer"])
@pytest.mark.parametrize("with_inputs", [True, False])
def test_bn_before_a_layer_is_left_where_its_input_is_written_in_place_before_the_layer_reads_it(write, with_inputs):
    """Folded, the BN would become an nn.Identity returning its input itself (a BN returns a new tensor), so the
    conv would read the values written after the BN ran: the BN is left, with the reason, and the model's output
    is unchanged."""
    model = bn_stats(WritesBnInput(write))
    x = torch.randn(2, 3, 8, 8)

    folded, report = fold_bn(model, x if with_inputs else None)

    assert report.method == "fx" and not report.folded
    assert "in place" in report.left["bn"]
    assert max_diff_to_unfolded(model, folded, x) < 1e-5


class ReadsBnInputShape(nn.Module):
    """BN then a 1x1 conv, with arithmetic on the BN input's shape (a number, no tensor) between them."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.bn(h)
        n = h.shape[0] * 1
        return self.conv(z)[:n]


def test_arithmetic_on_the_bn_inputs_shape_does_not_stop_a_fold_before_the_layer():
    """``h.shape[0] * 1`` writes nothing: folded before the conv, equal to the unfolded model."""
    model = bn_stats(ReadsBnInputShape())
    x = torch.randn(2, 4, 5, 5)
    folded, report = fold_bn(model, x)
    assert [(f.bn, f.into, f.position) for f in report.folded] == [("bn", "conv", "before")]
    assert max_diff_to_unfolded(model, folded, x) < 1e-5


def test_bn_before_a_layer_is_folded_where_its_input_is_written_only_after_the_layer():
    """A write after the conv has read the BN's output changes nothing the fold affects: folded, and exact."""
    model = bn_stats(WritesBnInput("method", late=True))
    x = torch.randn(2, 3, 8, 8)

    folded, report = fold_bn(model, x)

    assert [(f.bn, f.into, f.position) for f in report.folded] == [("bn", "conv", "before")]
    assert max_diff_to_unfolded(model, folded, x) < 1e-5


class UntraceableReadsTensor(nn.Module):
    """A data-dependent branch (torch.fx cannot trace it: the nn.Sequential fallback plans the fold), then a read of
    the BN's gamma (``reads="bn"``) or the conv's weight (``reads="conv"``) outside their own forward, or neither."""

    def __init__(self, reads: str) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.reads = reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 100:
            x = x / 2
        y = self.body(x)
        if self.reads == "bn":
            return y * self.body[1].weight.view(1, -1, 1, 1).sign()
        if self.reads == "conv":
            return y * self.body[0].weight.abs().mean()
        return y


@pytest.mark.parametrize("reads, reason", [("bn", "the forward reads the BN's tensors directly"),
                                           ("conv", "the forward reads the tensors of 'body.0' directly")])
@pytest.mark.parametrize("verify", [True, False])
def test_sequential_fallback_leaves_a_pair_whose_tensors_the_forward_reads_directly(reads, reason, verify):
    """As the fx path does: the probe run notes reads of a BN's or a layer's parameters from outside that module's
    forward, and the pair is left with the fx path's reason; the model's output is unchanged."""
    model = bn_stats(UntraceableReadsTensor(reads))
    x = torch.randn(2, 3, 8, 8)

    folded, report = fold_bn(model, x, verify=verify)

    assert report.method == "sequential" and not report.folded
    assert report.left == {"body.1": reason}
    assert max_diff_to_unfolded(model, folded, x) < 1e-5
    assert fold_plan(model, x).left == {"body.1": reason}
    for m in (folded, model):  # the copy fold_bn ran, and the caller's model fold_plan ran
        assert_modules_as_built(m)


def assert_modules_as_built(model: UntraceableReadsTensor) -> None:
    """Each module of ``model`` has its own class and plain dicts of parameters and buffers, as built."""
    assert [type(m) for m in model.body] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert all(type(m._parameters) is dict and type(m._buffers) is dict for m in model.modules())


def test_sequential_fallback_still_folds_a_pair_only_its_own_forward_reads():
    """Without such a read the fallback folds the pair, exactly."""
    model = bn_stats(UntraceableReadsTensor("neither"))
    x = torch.randn(2, 3, 8, 8)

    folded, report = fold_bn(model, x)

    assert report.method == "sequential" and [f.bn for f in report.folded] == ["body.1"]
    assert max_diff_to_unfolded(model, folded, x) < 1e-5


SCALE_BY_TYPE = {nn.Conv2d: 1.0, nn.Linear: 2.0}


class DispatchesOnLayerType(nn.Module):
    """conv -> BN, then a branch on the exact class of the conv (``branch``: ``type(self.conv) is nn.Conv2d``) or a
    lookup keyed by it (``table``); ``untraceable`` adds a data-dependent branch, so the nn.Sequential fallback plans
    the fold (the layers sit in a Sequential)."""

    def __init__(self, how: str, untraceable: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.how, self.untraceable = how, untraceable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.untraceable and x.mean() > 100:
            x = x / 2
        y = self.body(x)
        if self.how == "table":
            return y * SCALE_BY_TYPE[type(self.body[0])]
        return y if type(self.body[0]) is nn.Conv2d else y * 0


@pytest.mark.parametrize("untraceable", [False, True])
@pytest.mark.parametrize("how", ["branch", "table"])
def test_a_forward_that_dispatches_on_a_layers_exact_type_runs_as_it_does_outside_fold_bn(how, untraceable):
    """fold_bn's runs keep every module's class, so the reference run takes the branch real use takes: the fold is
    verified (max_abs_diff against the unfolded model's own output) instead of refused or raising KeyError."""
    model = bn_stats(DispatchesOnLayerType(how, untraceable))
    x = torch.randn(2, 3, 8, 8)

    folded, report = fold_bn(model, x)

    assert report.method == ("sequential" if untraceable else "fx")
    assert [f.bn for f in report.folded] == ["body.1"]
    assert report.max_abs_diff < 1e-5
    assert max_diff_to_unfolded(model, folded, x) < 1e-5


class BnOnAView(WritesBnInput):
    """The BN reads a view of ``h`` (``h.view(h.shape)``), and ``h += 1`` then writes the memory that view shares."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        z = self.bn(h.view(h.shape))
        h += 1
        return self.conv(z) + h


def test_bn_before_a_layer_is_left_where_the_tensor_its_input_views_is_written_in_place():
    """An augmented assignment to the tensor the BN's input is a view of reaches the layer once the BN is an
    nn.Identity: the BN is left, with the reason, and the output is unchanged."""
    model = bn_stats(BnOnAView("augmented"))
    x = torch.randn(2, 3, 8, 8)

    folded, report = fold_bn(model, x)

    assert not report.folded and "in place" in report.left["bn"]
    assert max_diff_to_unfolded(model, folded, x) < 1e-5


class InputBnBesideABranch(nn.Module):
    """A tabular model: BatchNorm1d on the dense input, then a Linear; between the two, an out-of-place product on
    an embedding, which shares no memory with the BN's input."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in, self.lin, self.emb = nn.BatchNorm1d(8), nn.Linear(8, 4), nn.Embedding(10, 4)
        set_running_stats(self.bn_in, torch.rand(8) * 2 - 1, torch.rand(8) + 0.5)

    def forward(self, dense: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        z = self.bn_in(dense)
        e = self.emb(idx) * 0.5
        return self.lin(z) + e


def test_arithmetic_on_a_tensor_unrelated_to_the_bns_input_does_not_stop_a_fold_before_the_layer():
    """Only arithmetic whose first operand is the BN's input or shares its memory could be an augmented assignment
    reaching the layer: the input BN is folded into the Linear, exactly (against the unfolded float64 model)."""
    torch.manual_seed(0)
    model = InputBnBesideABranch().eval()
    dense, idx = torch.randn(16, 8), torch.randint(0, 10, (16,))

    folded, report = fold_bn(model, (dense, idx))

    assert [(f.bn, f.into, f.position) for f in report.folded] == [("bn_in", "lin", "before")]
    assert report.max_abs_diff < 1e-5
    with torch.no_grad():
        want = copy.deepcopy(model).double()(dense.double(), idx)
        assert float((folded(dense, idx).double() - want).abs().max()) < 1e-5


class ReadsWeightsByIteration(nn.Module):
    """conv -> BN, and an L2 penalty of the conv's weights from ``self.conv.parameters()`` (or its state dict): no
    attribute lookup, so fx evaluates it while tracing and keeps the value as a constant. ``untraceable``: a branch
    on the input's values (fx fails; the nn.Sequential fallback plans)."""

    def __init__(self, how: str, untraceable: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.how, self.untraceable = how, untraceable

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.untraceable and bool(x.sum() > 1e9):
            x = x * 0
        conv = self.body[0]
        weights = conv.parameters() if self.how == "parameters" else conv.state_dict().values()
        penalty = sum((p ** 2).sum() for p in weights)
        shape = next(conv.parameters()).shape  # metadata: no read of values
        return self.body(x).mean((2, 3)) * shape[0], penalty


@pytest.mark.parametrize("untraceable", [False, True])
@pytest.mark.parametrize("how", ["parameters", "state_dict"])
def test_weights_read_by_iterating_a_layers_parameters_leave_the_pair(how, untraceable):
    """Oracle: the unfolded model's penalty output. Before, the pair was folded and the penalty read the folded
    weights (2.7 became 10.1)."""
    model = bn_stats(ReadsWeightsByIteration(how, untraceable))
    x = torch.randn(2, 3, 8, 8)
    for inputs in ([x] if untraceable else [x, None]):
        folded, report = fold_bn(model, inputs)
        assert report.n_folded == 0 and "reads the tensors of 'body.0' directly" in report.left["body.1"]
        with torch.no_grad():
            assert torch.equal(folded(x)[1], model(x)[1])


class ReadsShapeOnly(nn.Module):
    """conv -> BN, with the device and channel count looked up through ``parameters()``: metadata only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = next(self.conv.parameters())
        return self.bn(self.conv(x.to(first.device))).reshape(x.shape[0], first.shape[0], -1).mean(-1)


def test_looking_up_a_layers_device_or_shape_through_parameters_does_not_stop_the_fold():
    model = bn_stats(ReadsShapeOnly())
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 1 and max_diff_to_unfolded(model, folded, x) < 1e-5


def test_a_hook_on_the_model_that_calls_a_layer_again_leaves_the_pair():
    """fx traces the model's forward, not its hooks: a root hook calling the conv a second time is seen by the probe
    run (with example_inputs) and the pair left; without them a note says the hooks were not traced. Oracle: the
    unfolded model's output (before: folded, off by 0.21)."""
    model = bn_stats(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    model.register_forward_hook(lambda mod, inp, out: out + mod[0](inp[0]).mean())
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 0 and report.left["1"] == "'0' is called 2 times; folding would change its other uses"
    assert max_diff_to_unfolded(model, folded, x) < 1e-5
    report = fold_plan(model)
    assert any(n.startswith("forward hooks of Sequential are not in the traced graph") for n in report.notes)


class TiedByMemory(nn.Module):
    """c2's weight is a Parameter of its own over c1's weight memory (``nn.Parameter(c1.weight.data)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c2.weight = nn.Parameter(self.c1.weight.data.view(-1)[:16].view(4, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.bn(self.c1(x)))


def test_parameters_that_share_memory_are_shared_weights_for_the_fold():
    """Each would be saved under its own key, and a fresh model ties them again: the folded c1 weight would be
    overwritten on reload by c2's. Oracle: the unfolded model, after the README's reload recipe (before: 0.26 off)."""
    model = bn_stats(TiedByMemory())
    x = torch.randn(2, 4, 8, 8)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 0
    assert report.left["bn"].startswith("the weight of 'c1' is shared (c1.weight, c2.weight)")
    fresh = TiedByMemory().eval()
    report.restructure(fresh).load_state_dict(folded.state_dict())
    assert max_diff_to_unfolded(model, fresh, x) < 1e-5


def test_conv1d_and_batchnorm1d_unprobed_get_a_note_and_a_conv2d_before_batchnorm1d_is_left():
    """An unbatched Conv1d's (C, L) output fits BatchNorm1d with dim 1 spatial (folded wrongly, 4.1 off, before,
    without a word); a Conv2d's batched output BatchNorm1d does not take, so that pair only ever runs unbatched."""
    pair = nn.Sequential(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)).eval()
    set_running_stats(pair[1], torch.randn(4), torch.rand(4) + 0.5)
    report = fold_plan(pair)
    assert report.n_folded == 1
    assert ("Conv1d/BatchNorm1d folds assume batched (N, C, ...) activations (unbatched, BatchNorm's dim 1 is "
            "spatial); pass example_inputs to check") in report.notes
    batched = fold_plan(pair, torch.randn(2, 4, 4))
    assert batched.n_folded == 1 and not any("assume batched" in n for n in batched.notes)
    unbatched = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm1d(8)).eval()
    set_running_stats(unbatched[1], torch.randn(8), torch.rand(8) + 0.5)
    assert fold_plan(unbatched).left["1"] == ("'0' gives batched rank-4 output, which BatchNorm1d does not take: the "
                                             "pair runs only unbatched, where BatchNorm's dim 1 is spatial")


class MetadataOnly(nn.Module):
    """conv -> BN, with the conv's weight used for its metadata alone: ``how`` names the idiom (a recurrent
    model's ``weight.new_zeros`` hidden state, ``torch.zeros_like``, ``x.to(weight)``, ``len``, ``is_meta``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight if self.how.startswith("attribute") else next(self.conv.parameters())
        if self.how.endswith("new_zeros"):
            zero = w.new_zeros(1)
        elif self.how.endswith("zeros_like"):
            zero = torch.zeros_like(w)[0, 0, 0, :1]
        elif self.how.endswith("to"):
            x, zero = x.to(w), 0.0
        else:
            zero = float(len(w) + w.is_meta + w.is_floating_point()) * 0.0
        return self.bn(self.conv(x)).mean((2, 3)) + zero


@pytest.mark.parametrize("how", ["new_zeros", "zeros_like", "to", "len", "attribute new_zeros", "attribute to"])
def test_a_layers_weight_used_for_its_metadata_only_does_not_stop_the_fold(how):
    """Before this session's fix of reads through parameters(), such uses left the pair (false positives); an
    attribute's get_attr used for metadata only (a recurrent model's hidden state) did already."""
    model = bn_stats(MetadataOnly(how))
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 1, report.left
    assert max_diff_to_unfolded(model, folded, x) < 1e-5


def test_parameters_that_are_disjoint_slices_of_one_flat_vector_are_not_shared():
    """vector_to_parameters leaves every parameter a view of one storage, none overlapping: nothing is tied, and
    each key reloads into its own slice. Oracle: the unfolded model, and the folded state dict reloaded."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    model = bn_stats(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                                   nn.BatchNorm2d(4)))
    vector_to_parameters(parameters_to_vector(model.parameters()).clone(), model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 2 and not report.left
    assert max_diff_to_unfolded(model, folded, x) < 1e-5


class UsesBnMetadata(nn.Module):
    """conv -> BN, and the BN's own tensors used for their metadata: a folded BN (an nn.Identity) has none."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.how == "device":
            return y.to(self.bn.weight.device)
        if self.how == "zeros_like":
            return y + torch.zeros_like(self.bn.running_mean).view(1, -1, 1, 1)
        if self.how == "model dtype":  # the first parameter of the model is the BN's (registered first)
            return y.to(next(self.parameters()).dtype)
        return y.to(next(self.bn.parameters()).dtype)


@pytest.mark.parametrize("how", ["device", "zeros_like"])
def test_a_bns_own_tensors_used_for_metadata_leave_it(how):
    """A metadata use through an attribute spares a layer that stays, not the BN a fold removes: before this was
    fixed, fold_bn folded it and the folded model raised AttributeError (no inputs: unverified, broken at its
    first call)."""
    model = bn_stats(UsesBnMetadata(how))
    x = torch.randn(2, 3, 8, 8)
    for inputs in (x, None):
        folded, report = fold_bn(model, inputs)
        assert report.n_folded == 0 and "the forward reads the BN's tensors directly" in report.left["bn"]
        assert max_diff_to_unfolded(model, folded, x) < 1e-5


def test_the_models_first_parameter_for_its_dtype_folds_and_a_bns_own_is_caught_by_verification():
    """next(model.parameters()).dtype is whichever parameter comes first, a BN's here; after the fold the next one
    has the same dtype: folded, exact. next(self.bn.parameters()) finds none in the folded BN: verification says
    so (documented: without example_inputs the folded model raises at its first call)."""
    model = bn_stats(UsesBnMetadata("model dtype"))
    model._modules["conv"] = model._modules.pop("conv")  # the BN registered first: the model's first parameter
    x = torch.randn(2, 3, 8, 8)
    assert next(model.parameters()) is model.bn.weight
    folded, report = fold_bn(model, x)
    assert report.n_folded == 1 and max_diff_to_unfolded(model, folded, x) < 1e-5
    model.how = "bn parameters"
    with pytest.raises(ValueError, match=r"the folded model raised StopIteration .*relies on something of the BN "
                                         r"layers folded \('bn'\)"):
        fold_bn(model, x)


class BranchesOnBias(nn.Module):
    """A bias-free conv -> BN, and a forward that adds a shift of its own while the conv has no bias: the fold
    gives the conv one, so the folded model takes the other branch (a Python constant in the trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.shift = nn.Parameter(torch.full((1, 8, 1, 1), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y + self.shift if self.conv.bias is None else y


def test_a_folded_model_that_verification_shows_different_is_refused():
    """Oracle: the unfolded model. Before, fold_bn returned the model with max_rel_diff 0.3 in its report; now
    verification raises FoldVerificationError (report attached); verify=False still returns it, as documented."""
    import pickle

    from bnkit.torch import FoldVerificationError

    model = bn_stats(BranchesOnBias())
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(FoldVerificationError, match=r"differs from the original on example_inputs: max relative "
                                                    r"difference .* > 0.0001 \(folded 'bn'\)") as info:
        fold_bn(model, x)
    assert info.value.report.max_rel_diff > 0.1
    assert pickle.loads(pickle.dumps(info.value)).report.to_dict() == info.value.report.to_dict()
    folded, report = fold_bn(model, x, verify=False)
    assert report.n_folded == 1 and max_diff_to_unfolded(model, folded, x) > 0.1


class OptionalSkip(nn.Module):
    """conv -> BN, and an optional ``skip``: without it the conv's output is also added to the BN's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv(x)
        out = self.bn(y)
        return out + skip if skip is not None else out + y


def test_an_argument_left_at_its_default_is_traced_at_it():
    """Traced as a placeholder, skip was not None: the graph showed one reader of the conv's output and the pair
    was folded (0.4 off, or 0.64 unverified). Traced at its default, the second reader shows: left, with a note."""
    model = bn_stats(OptionalSkip())
    x = torch.randn(2, 3, 8, 8)
    for inputs in (x, None):
        folded, report = fold_bn(model, inputs)
        assert report.n_folded == 0 and report.left["bn"].startswith("its input comes from") is False
        assert "the output of 'conv' is also used elsewhere" in report.left["bn"]
        assert any(n.startswith("forward arguments skip=None were traced at their defaults") for n in report.notes)
        assert max_diff_to_unfolded(model, folded, x) < 1e-5


def test_a_flag_left_at_its_default_is_named_in_a_note():
    """forward(x, return_features=False): traced at False, the fold changed what return_features=True returns (0.95
    off, half the output's size) and no note said the flag was fixed. Oracle: the original model with the flag."""
    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

        def forward(self, x, return_features=False):
            y = self.conv(x)
            return y if return_features else self.bn(y)

    model = bn_stats(Features())
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 1  # on the path the call takes, as planned
    assert any(n.startswith("forward arguments return_features=False were traced at their defaults")
               for n in report.notes)
    with torch.no_grad():
        assert (model(x, return_features=True) - folded(x, return_features=True)).abs().max() > 1e-2


def test_a_layer_inside_a_module_the_trace_runs_whole_is_left():
    """nn.MultiheadAttention is an fx leaf whose code uses out_proj.weight without calling out_proj: folding the BN
    after out_proj changed the attention output too (0.59 off unverified; with example_inputs the whole fold was
    refused). Oracle: the original model's output."""
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha, self.bn = nn.MultiheadAttention(8, 2), nn.BatchNorm1d(8)

        def forward(self, x):
            a, _ = self.mha(x, x, x)
            return a.mean(0) + self.bn(self.mha.out_proj(x.mean(0)))

    torch.manual_seed(0)
    model = Attend().eval()
    set_running_stats(model.bn, torch.randn(8), torch.rand(8) + 0.5)
    x = torch.randn(4, 3, 8)
    for inputs in (None, x):
        folded, report = fold_bn(model, inputs)
        assert report.n_folded == 0 and report.left["bn"].startswith("'mha.out_proj' belongs to 'mha'")
        with torch.no_grad():
            assert torch.equal(folded(x), model(x))


def test_a_hook_on_an_activation_reading_a_layers_weights_and_a_global_hook_leave_the_pair():
    """fx runs forwards, not hooks: a hook adding conv.weight.sum() after the BN (before: folded, 0.19 off), on the
    root or on the ReLU reaching the conv through a plain list, is seen by the read check with example_inputs and
    noted without; a hook registered for every module (clamping BN outputs: 4.1 off before) leaves every BN."""
    model = bn_stats(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    model.register_forward_hook(lambda mod, inp, out: out + mod[0].weight.sum())  # the folded copy's own conv
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 0 and report.left["1"] == "the forward reads the tensors of '0' directly"
    assert any(n.startswith("forward hooks of Sequential are not in the traced graph") for n in fold_plan(model).notes)
    listed = bn_stats(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    listed[2].peers = [listed[0]]  # a plain list: the folded copy's hook reads the copy's conv
    listed[2].register_forward_hook(lambda mod, inp, out: out + mod.peers[0].weight.sum())
    report = fold_bn(listed, x)[1]
    assert report.n_folded == 0 and report.left["1"] == "the forward reads the tensors of '0' directly"
    plain = bn_stats(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, inp, out: out.clamp(max=0.5) if isinstance(mod, nn.BatchNorm2d) else None)
    try:
        folded, report = fold_bn(plain, x)
        assert report.n_folded == 0 and report.left["1"].startswith("forward hooks registered for every module")
        assert max_diff_to_unfolded(plain, folded, x) < 1e-5
    finally:
        handle.remove()
    assert fold_bn(plain, x)[1].n_folded == 1


class CallsMore(nn.BatchNorm2d):
    """A BN whose __call__ adds to what forward returns: the Identity replacing it would not."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(x) + 1.0


class TypeString(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x.type(self.conv.weight.type())))


def test_a_bn_with_its_own_call_is_left_and_a_weights_type_name_is_no_read():
    model = bn_stats(nn.Sequential(nn.Conv2d(3, 8, 3), CallsMore(8)))
    set_running_stats(model[1], torch.randn(8), torch.rand(8) + 0.5)
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold_bn(model, x)  # before: folded, 0.31 off
    assert report.n_folded == 0 and "whose forward is not PyTorch's" in report.left["1"]
    folded, report = fold_bn(bn_stats(TypeString()), x)  # w.type() is a string: no read (fx's fuse folds it too)
    assert report.n_folded == 1


class Samples(nn.Module):
    """conv -> BN, then a sample around the output (a VAE's reparameterization, in eval mode too)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x))
        return h + torch.randn_like(h)


def test_a_model_that_samples_is_verified_with_the_same_draws_and_the_callers_generator_is_left_alone():
    """The original and the folded model draw the same numbers (before the check existed: a difference of 1.3
    in the report; with it, a refused fold); the caller's random state is as before the call."""
    model = bn_stats(Samples())
    x = torch.randn(2, 3, 8, 8)
    state = torch.random.get_rng_state()
    folded, report = fold_bn(model, x)
    assert report.n_folded == 1 and report.max_rel_diff < 1e-5
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_class_index_that_flips_is_judged_on_the_floating_outputs_beside_it(monkeypatch):
    """A float16/bfloat16 argmax flips where two logits are within rounding (5 of 256 rows in bfloat16 in a
    review): the check judges the logits beside it. Here the folded run's index output is made to differ by one
    class while its logits match: not refused (before: relative difference 1/99 > 1e-4, refused)."""
    import bnkit.torch.fold as fold_module

    torch.manual_seed(0)

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 100), nn.BatchNorm1d(100))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.net(x)
            return logits, logits.argmax(1)

    model = Both().eval()
    set_running_stats(model.net[1], torch.randn(100), torch.rand(100) + 0.5)
    real = fold_module._run_folded

    def one_flip(work, inputs, folded):
        logits, index = real(work, inputs, folded)
        return logits, torch.where(index == 99, 98, index + 1)

    monkeypatch.setattr(fold_module, "_run_folded", one_flip)
    folded, report = fold_bn(model, torch.randn(8, 16))
    assert report.n_folded == 1 and report.max_rel_diff < 1e-5  # the logits' figure: not refused


class DrawsWhileTraced(nn.Module):
    """conv -> BN plus noise fx draws while tracing (it does not depend on the input), and a seed of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(7)
        return self.bn(self.conv(x)) + torch.rand(()) * 0


@pytest.mark.parametrize("with_inputs", [True, False])
def test_the_callers_torch_generator_is_left_as_it_was_by_the_trace_too(with_inputs):
    model = bn_stats(DrawsWhileTraced())
    inputs = torch.randn(2, 3, 8, 8) if with_inputs else None
    for tool in (fold_bn, fold_plan):
        state = torch.random.get_rng_state()
        tool(model, inputs)
        assert torch.equal(torch.random.get_rng_state(), state), tool.__name__


def test_the_report_of_a_refused_fold_holds_the_figure_judged():
    """Float logits 1e-3 off beside a large integer output: the relative difference is judged on the logits, and
    the report attached to the error says the same figure (it divided by the integer output's scale)."""
    import bnkit.torch.fold as fold_module
    from bnkit.torch import FoldVerificationError

    class WithCount(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.net(x), torch.full((2,), 10**6)

    model = WithCount().eval()
    set_running_stats(model.net[1], torch.randn(3), torch.rand(3) + 0.5)
    real = fold_module._run_folded
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fold_module, "_run_folded",
                      lambda work, inputs, folded: (lambda out: (out[0] + 1e-3 * out[0].abs().max(), out[1]))(
                          real(work, inputs, folded)))
        with pytest.raises(FoldVerificationError) as info:
            fold_bn(model, torch.randn(8, 4))
    rel = info.value.report.max_rel_diff
    assert rel == pytest.approx(1e-3, rel=1e-3) and f"max relative difference {rel:.3g}" in str(info.value)


class StoresATensor(nn.Module):
    """(conv ->) BN -> 1x1 conv, the forward keeping one of the tensors in a module attribute: the conv's output (for
    the next call, as a streaming model adds the previous features; or in a list of features for another consumer),
    or the BN's output (``bn_output``: the BN normalizes the input itself)."""

    def __init__(self, store: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1) if store != "bn_output" else None
        self.bn, self.head = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.store, self.prev, self.feats = store, None, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) if self.conv is not None else x
        z = self.bn(y)
        out = self.head(z)
        if self.store == "previous":
            if self.prev is not None:
                out = out + self.prev
            self.prev = y
        elif self.store == "list":
            self.feats.append(y)
        elif self.store == "bn_output":
            self.feats = {"normed": (z,)}
        return out


@pytest.mark.parametrize("store", ["previous", "list", "bn_output"])
@pytest.mark.parametrize("with_inputs", [True, False])
def test_a_tensor_the_forward_stores_in_an_attribute_is_a_reader_the_fold_keeps(store, with_inputs):
    """Review: fx shows no node for `self.prev = y`, so the conv's output counted one reader and the BN was folded
    into it: the stored tensor became the BN's output (a streaming model's second call off by 3.3), and a stored BN
    output became its input in a fold before the head. Verification on one call could not see it. Oracle: the
    unfolded model on the same sequence of calls, and the tensors it stores. The BN may still fold on its other side,
    where the stored tensor keeps its values."""
    x1, x2 = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    model = bn_stats(StoresATensor(store))
    folded, report = fold_bn(model, x1 if with_inputs else None)
    if store == "bn_output":
        assert not report.folded and "output kept by the forward" in report.left["bn"]
    else:
        assert [(f.bn, f.into, f.position) for f in report.folded] == [("bn", "head", "before")]
    with torch.no_grad():
        for x in (x1, x2):
            torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    for a, b in ((model.prev, folded.prev), (model.feats, folded.feats)):
        for t, u in zip(*(torch.utils._pytree.tree_leaves(v) for v in (a, b)), strict=True):
            torch.testing.assert_close(u, t, rtol=1e-5, atol=1e-5)


def test_a_conv_output_the_forward_stores_is_not_given_the_bn_after_it():
    """The same without the head: the BN can only fold into the conv whose output the forward stores."""

    class Streaming(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.prev = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            out = self.bn(y)
            if self.prev is not None:
                out = out + self.prev
            self.prev = y
            return out

    model, x = bn_stats(Streaming()), torch.randn(2, 4, 6, 6)
    folded, report = fold_bn(model, x)
    assert not report.folded
    assert report.left["bn"] == "the forward also keeps the output of 'conv' (in a module attribute or another object)"
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class EmbeddingOfBnInput(nn.Module):
    """BN then a Linear (a "before" fold), the BN's input also the table of an F.embedding with max_norm, which
    renormalizes the rows it looks up in place."""

    def __init__(self, max_norm: float | None) -> None:
        super().__init__()
        self.bn, self.lin, self.max_norm = nn.BatchNorm1d(3), nn.Linear(3, 2), max_norm

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        x = x * 1.0
        h = self.bn(x)
        e = nn.functional.embedding(idx, x, max_norm=self.max_norm)
        return self.lin(h) + e.sum(0)[:2]


@pytest.mark.parametrize("max_norm", [0.01, 0.0, None])  # 0.0 zeroes the rows (review)
def test_an_embedding_with_max_norm_writes_the_bn_input_and_one_without_does_not(max_norm):
    """Review: F.embedding counted as leaving its arguments alone, but with max_norm it rescales rows of its weight
    in place (PyTorch's documentation), so the folded Linear read the rescaled rows. Oracle: the unfolded model."""
    torch.manual_seed(0)
    model = EmbeddingOfBnInput(max_norm)
    set_running_stats(model.bn, torch.randn(3), torch.rand(3) + 0.5)
    model.eval()
    x, idx = torch.randn(4, 3), torch.tensor([0, 1])
    folded, report = fold_bn(model)
    assert bool(report.folded) == (max_norm is None), report
    with torch.no_grad():
        torch.testing.assert_close(folded(x.clone(), idx), model(x.clone(), idx), rtol=1e-5, atol=1e-5)


_KEPT_GLOBALLY: list = []


class KeepsElsewhere(nn.Module):
    """conv -> BN, the forward keeping the conv's output outside the modules' attributes proper: in a deque, a
    dataclass-like namespace, a module held in a plain list, or a global list."""

    def __init__(self, where: str) -> None:
        import collections
        import types as pytypes

        super().__init__()
        self.conv, self.bn, self.where = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), where
        self.hist, self.ns, self.box = collections.deque(maxlen=2), pytypes.SimpleNamespace(prev=None), [nn.Identity()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.where == "deque":
            self.hist.append(y)
        elif self.where == "namespace":
            self.ns.prev = y
        elif self.where == "unregistered":
            self.box[0].prev = y
        elif self.where == "numpy":  # an object array: a holder the garbage collector does not see
            self.arr = np.empty(1, dtype=object)
            self.arr[0] = y
        elif self.where == "tensor_attribute":  # on a parameter, which fx traces as a proxy made for the call
            self.conv.weight.prev = y
        elif self.where == "tensor_attribute_list":
            self.conv.weight.hist = [y]
        elif self.where == "tensor_attribute_filled":  # a container set first, filled afterwards
            self.conv.weight.hist = []
            self.conv.weight.hist.append(y)
        else:
            _KEPT_GLOBALLY.append(y)
        return self.bn(y)


@pytest.mark.parametrize("where", ["deque", "namespace", "unregistered", "global", "numpy", "tensor_attribute",
                                   "tensor_attribute_list", "tensor_attribute_filled"])
@pytest.mark.parametrize("with_inputs", [True, False])
def test_a_tensor_kept_anywhere_by_the_forward_is_a_reader_and_no_trace_is_left_in_the_model(where, with_inputs):
    """Review: only lists, tuples and dicts in module attributes were searched for the traced value, so a deque, a
    namespace, an unregistered module or a global list kept the conv's output and the BN was folded into it (the
    kept tensor then the BN's output); and the trace left torch.fx proxies in the deque or namespace of the model
    fold_plan was given (torch.save of it then failed). Oracle: the unfolded model's kept tensor; pickle."""
    import pickle

    model, x = bn_stats(KeepsElsewhere(where)), torch.randn(2, 4, 5, 5)
    _KEPT_GLOBALLY.clear()
    plan = fold_plan(model, x if with_inputs else None)
    folded, report = fold_bn(model, x if with_inputs else None)
    for r in (plan, report):
        assert not r.folded and r.left["bn"].startswith("the forward also keeps the output of 'conv'"), r
    for m in (model, folded):
        assert not any(isinstance(v, torch.fx.Proxy) for v in (*m.hist, m.ns.__dict__.get("prev"), *vars(m.box[0])
                                                               .values()))
        pickle.dumps(m)
    if where == "global":  # outside the model: the trace's value stays there (documented)
        _KEPT_GLOBALLY.clear()
    with torch.no_grad():
        want, got = model(x), folded(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class KeepsOther(nn.Module):
    """conv -> BN, the forward keeping something other than the conv's output beyond the call: its shape in a deque,
    a transposed view of it in a deque (which is the output), or an exception in a local (cyclic garbage)."""

    def __init__(self, keep: str) -> None:
        import collections

        super().__init__()
        self.conv, self.bn, self.keep = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), keep
        self.hist = collections.deque(maxlen=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.keep == "shape":
            self.hist.append(y.shape)
        elif self.keep == "view":
            self.hist.append(y.mT)
        elif self.keep == "temporary":  # an attribute of a tensor that dies with the call
            t = x * 1
            t.src = y
        else:
            try:
                {}["missing"]
            except KeyError as exc:
                err = exc  # noqa: F841 - exception -> traceback -> this frame -> y: a cycle until collected
        return self.bn(y)


@pytest.mark.parametrize("keep", ["shape", "view", "exception", "temporary"])
def test_only_a_kept_tensor_or_view_of_the_output_keeps_the_bn_from_its_layer(keep):
    """Review: a shape kept (fx's attribute proxy holds its tensor's proxy) and cyclic garbage (an exception in a
    local) counted as keeping the conv's output, and a model holding a lock (which copy.deepcopy refuses) made
    fold_plan raise, and the audit skip its fold analysis. Oracle: the unfolded model, on the same calls, and the
    view it keeps."""
    import threading

    model, x = bn_stats(KeepsOther(keep)), torch.randn(2, 4, 5, 5)
    if keep == "exception":  # keeps nothing: fold_plan plans a model it cannot copy on the model itself, as before
        model.lock = threading.Lock()
    plan = fold_plan(model)
    vars(model).pop("lock", None)  # fold_bn copies the model it returns folded: a lock cannot be copied
    folded, report = fold_bn(model, x)
    assert [f.bn for f in plan.folded] == [f.bn for f in report.folded] == ([] if keep == "view" else ["bn"])
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    if keep == "view":
        torch.testing.assert_close(folded.hist[-1], model.hist[-1], rtol=1e-5, atol=1e-5)
