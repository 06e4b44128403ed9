"""bnkit.torch.modules: exact_float32 (TF32 off inside, every setting put back as found, also after an error),
channels (every tool on a lazy layer that load_state_dict filled, and on one pruned by hand), and map_nested /
to_device on nested batches.

The settings are process-wide Python state that exists without a GPU, so this runs on the CPU. Oracle: the
settings read back through PyTorch's own API (torch/backends/cudnn/__init__.py, torch/backends/cuda/__init__.py).
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, MutableMapping

import pytest
import torch
from torch import nn

from bnkit.torch.modules import exact_float32

B = torch.backends
_NEW_API = all(hasattr(k, "fp32_precision") for k in (getattr(B.cudnn, "conv", None), B.cuda.matmul))


def _precisions() -> dict[str, str]:
    return {"conv": B.cudnn.conv.fp32_precision, "rnn": B.cudnn.rnn.fp32_precision,
            "matmul": B.cuda.matmul.fp32_precision}


@pytest.fixture
def user_settings():
    """Leave the process's TF32 settings as the test found them."""
    if not _NEW_API:
        saved = B.cudnn.allow_tf32, B.cuda.matmul.allow_tf32
        yield
        B.cudnn.allow_tf32, B.cuda.matmul.allow_tf32 = saved
        return
    saved = _precisions(), B.cudnn.fp32_precision
    yield
    B.cudnn.fp32_precision = saved[1]
    for name, value in saved[0].items():
        knob = B.cuda.matmul if name == "matmul" else getattr(B.cudnn, name)
        knob.fp32_precision = value


@pytest.mark.skipif(not _NEW_API, reason="this torch has no per-operation fp32_precision settings")
@pytest.mark.parametrize("fail", [False, True])
def test_per_op_precisions_are_ieee_inside_and_the_users_come_back(user_settings, fail):
    B.cudnn.conv.fp32_precision = B.cudnn.rnn.fp32_precision = "tf32"
    B.cuda.matmul.fp32_precision = "tf32"  # not the default: must come back as the user set it
    before = _precisions()

    def body():
        with exact_float32():
            assert _precisions() == {"conv": "ieee", "rnn": "ieee", "matmul": "ieee"}
            # the legacy flag agrees with conv/rnn, so code inside may read it (torch.backends.cudnn.flags does)
            assert B.cudnn.allow_tf32 is False
            if fail:
                raise KeyError("the body failed")

    if fail:
        with pytest.raises(KeyError, match="the body failed"):
            body()
    else:
        body()
    assert _precisions() == before
    assert B.cudnn.allow_tf32 is True


@pytest.mark.skipif(not _NEW_API, reason="this torch has no per-operation fp32_precision settings")
def test_mixed_legacy_and_new_settings_are_kept_as_found(user_settings):
    """conv and rnn set differently: PyTorch refuses reads of the legacy flag, before and after alike."""
    B.cudnn.conv.fp32_precision, B.cudnn.rnn.fp32_precision = "ieee", "tf32"
    with pytest.raises(RuntimeError, match="mix of the legacy and new"):
        _ = B.cudnn.allow_tf32
    with exact_float32():
        assert _precisions()["conv"] == _precisions()["rnn"] == "ieee"
    assert (B.cudnn.conv.fp32_precision, B.cudnn.rnn.fp32_precision) == ("ieee", "tf32")


def test_releases_without_per_op_settings_get_the_allow_tf32_flags(user_settings, monkeypatch):
    """A torch without ``torch.backends.cudnn.conv`` (before the fp32_precision API): the legacy flags alone.

    ``user_settings`` before ``monkeypatch``: the attribute is back before the settings are restored.
    """
    if hasattr(type(B.cudnn), "conv"):
        monkeypatch.delattr(type(B.cudnn), "conv")
    assert getattr(B.cudnn, "conv", None) is None
    B.cudnn.allow_tf32 = B.cuda.matmul.allow_tf32 = True
    with exact_float32():
        assert B.cudnn.allow_tf32 is False and B.cuda.matmul.allow_tf32 is False
    assert B.cudnn.allow_tf32 is True and B.cuda.matmul.allow_tf32 is True


def test_float32_results_on_the_cpu_are_unchanged(user_settings):
    conv = torch.nn.Conv2d(3, 4, 3).eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = conv(x)
        with exact_float32():
            inside = conv(x)
    assert torch.equal(plain, inside)


def _lazy_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LazyBatchNorm2d(), torch.nn.ReLU())


def test_a_lazy_layer_loaded_from_a_state_dict_works_with_every_tool():
    """PyTorch leaves a LazyBatchNorm2d that load_state_dict filled at num_features 0, even after its first forward
    (nothing left to infer); its tensors say 4. Oracle: the same statistics in a plain nn.BatchNorm2d model."""
    import copy

    from bnkit.torch import audit, convert_frozen, fold_bn, recalibrate

    torch.manual_seed(0)
    source = _lazy_net().train()
    with torch.no_grad():
        for _ in range(5):
            source(torch.randn(8, 3, 6, 6) * 2 + 1)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    plain.load_state_dict(source.state_dict())

    def loaded() -> torch.nn.Module:
        model = _lazy_net()
        model.load_state_dict(source.state_dict())
        assert model[1].num_features == 0
        return model.eval()

    data = [torch.randn(8, 3, 6, 6) * 2 + 1 for _ in range(3)]
    model, reference = loaded(), copy.deepcopy(plain).eval()
    recalibrate(model, data, progress=False)
    recalibrate(reference, data, progress=False)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var, rtol=1e-6, atol=1e-7)
    ours, theirs = audit(loaded(), data[0]), audit(copy.deepcopy(plain).eval(), data[0])
    assert ours.shifts[0].score == pytest.approx(theirs.shifts[0].score, rel=1e-6)
    _, report = fold_bn(loaded(), data[0])
    assert report.n_folded == 1 and report.max_rel_diff < 1e-5
    with pytest.raises(ValueError, match="still lazy"):
        convert_frozen(loaded())
    model = loaded()
    with torch.no_grad():
        model(data[0])  # PyTorch's first forward: an nn.BatchNorm2d now, num_features still 0
    assert type(model[1]) is torch.nn.BatchNorm2d and model[1].num_features == 0
    frozen = convert_frozen(model)
    with torch.no_grad():
        torch.testing.assert_close(frozen(data[1]), plain.eval()(data[1]))


def test_convert_bn_of_a_once_lazy_layer_trains_as_plain_batchnorm():
    """After its first forward a loaded LazyBatchNorm2d is an nn.BatchNorm2d with num_features 0; convert_bn's
    drop-in layer must take the channel count from the tensors (its first training step raised 'expects 0
    channels'). Oracle: the same step in nn.BatchNorm2d."""
    import copy

    from bnkit.torch import convert_bn

    torch.manual_seed(0)
    source = _lazy_net()
    source(torch.randn(4, 3, 6, 6))
    model = _lazy_net()
    model.load_state_dict(source.state_dict())
    x = torch.randn(8, 3, 6, 6)
    model(x)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    plain.load_state_dict(model.state_dict())
    convert_bn(model, virtual_batch_size=8)  # one ghost batch: BN's own math through the extras' code
    out, expected = model.train()(x), copy.deepcopy(plain).train()(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert model[1].num_features == 4


def test_a_layer_pruned_by_hand_is_measured_by_its_tensors_not_its_stale_num_features():
    """Channel pruning that cuts a BN layer's tensors to 3 channels but leaves ``num_features`` at 4: PyTorch runs it
    (its forward never reads num_features); the audit and recalibrate refused it ('has 4 channels but its input has
    3') and fold_bn left it. Oracle: the same tensors in a plain nn.BatchNorm2d(3)."""
    import copy

    from bnkit.torch import audit, convert_bn, convert_frozen, fold_bn, recalibrate

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU()).train()
    with torch.no_grad():
        for _ in range(5):
            plain(torch.randn(8, 3, 6, 6) * 2 + 1)
    plain.eval()

    def pruned() -> torch.nn.Module:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        bn = model[1]
        bn.weight, bn.bias = (torch.nn.Parameter(t[:3].clone()) for t in (bn.weight, bn.bias))
        bn.running_mean, bn.running_var = bn.running_mean[:3].clone(), bn.running_var[:3].clone()
        model.load_state_dict(plain.state_dict())
        assert bn.num_features == 4
        return model.eval()

    data = [torch.randn(8, 3, 6, 6) * 2 + 1 for _ in range(3)]
    model, reference = pruned(), copy.deepcopy(plain)
    recalibrate(model, data, progress=False)
    recalibrate(reference, data, progress=False)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var, rtol=1e-6, atol=1e-7)
    ours, theirs = audit(pruned(), data[0]), audit(copy.deepcopy(plain), data[0])
    assert ours.shifts[0].score == pytest.approx(theirs.shifts[0].score, rel=1e-6)
    folded, report = fold_bn(pruned(), data[0])
    assert report.n_folded == 1 and report.max_rel_diff < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(convert_frozen(pruned())(data[1]), plain(data[1]))
        torch.testing.assert_close(folded(data[1]), plain(data[1]), rtol=1e-5, atol=1e-6)
    model = convert_bn(pruned(), virtual_batch_size=8)
    assert model[1].num_features == 3
    torch.testing.assert_close(model.train()(data[2]), copy.deepcopy(plain).train()(data[2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tensor", ["weight", "bias", "running_var"])
@pytest.mark.parametrize("length", [1, 4])
def test_a_layer_whose_channel_tensors_differ_in_length_is_refused_by_every_tool(tensor, length):
    """One per-channel tensor of 1 or 4 values beside 3-channel ones: PyTorch's forward refuses the layer. fold_bn and
    fold_plan without example inputs folded it (a one-element tensor broadcast over every channel), recalibrate ran
    its whole pass and then failed on a raw size error, convert_frozen / convert_bn swapped it in place, and the
    audit with data raised. Now each refuses it by name, changing nothing; the audit reports it and skips the data."""
    from bnkit.torch import audit, convert_bn, convert_frozen, fold_bn, fold_plan, recalibrate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU()).eval()
    bn = model[1]
    setattr(bn, tensor, torch.nn.Parameter(torch.rand(length) + 0.5) if tensor != "running_var"
            else torch.rand(length) + 0.5)
    x = torch.randn(8, 3, 6, 6)
    with pytest.raises(RuntimeError, match="elements"):  # the oracle: PyTorch refuses the layer
        model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append(1))
    for tool in (lambda: fold_bn(model), lambda: fold_plan(model), lambda: recalibrate(model, [x, x], progress=False),
                 lambda: convert_frozen(model), lambda: convert_bn(model, virtual_batch_size=4)):
        with pytest.raises(ValueError, match=rf"BatchNorm layer '1' has per-channel tensors of different shapes.*"
                                             rf"{tensor} \({length},\)"):
            tool()
        assert model[1] is bn and not calls and not bn.training
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    report = audit(model, [x, x])
    assert report.depth == "model" and report.worst == "error"
    assert {f.code for f in report.findings if f.layer in ("1", "(data)")} >= {"data_skipped"}
    assert any(f.severity == "error" and f.layer == "1" for f in report.findings)


@pytest.mark.parametrize("odd", ["untracked", "frozen"])
def test_an_unequal_layer_without_recalibrated_statistics_is_still_named(odd):
    """An unequal BatchNorm2d(3, track_running_stats=False) or FrozenBatchNorm2d beside a tracked BN: the audit gave no
    error (its state checks read only running statistics; exit 0 on a model PyTorch cannot run) and recalibrate ran
    its pass into PyTorch's unnamed 'weight should contain 3 elements not 4'. Oracle: PyTorch's forward refuses it."""
    from bnkit.torch import FrozenBatchNorm2d, audit, recalibrate

    odd_bn = (torch.nn.BatchNorm2d(3, track_running_stats=False) if odd == "untracked" else FrozenBatchNorm2d(3))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(3), odd_bn).eval()
    model[1].running_var.fill_(2.0)  # trained-looking statistics: the tracked layer itself is fine
    model[1].num_batches_tracked.fill_(100)
    if odd == "untracked":
        odd_bn.weight = torch.nn.Parameter(torch.ones(4))
    else:
        odd_bn.weight = torch.ones(4)
    x = torch.randn(8, 3, 6, 6)
    with pytest.raises(RuntimeError, match="elements"):
        model(x)
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=r"BatchNorm layer '2' has per-channel tensors of different shapes"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a frozen layer's statistics are kept: said, and beside the point here
        recalibrate(model, [x, x], progress=False)
    assert not calls
    for report in (audit(model), audit(model, [x, x])):
        bad = [f for f in report.findings if f.severity == "error"]
        assert [(f.layer, f.code) for f in bad] == [("2", "bad_shape")], report.findings
        assert "weight (4,)" in bad[0].evidence


def test_a_weight_of_shape_c_by_1_is_refused_for_what_it_is():
    """PyTorch runs a (3, 1) weight (its kernels read it flattened); bnkit's float64 fold would broadcast it to (3, 3),
    so it refuses it, and the message said 'which PyTorch's forward refuses too'."""
    from bnkit.torch import audit, fold_bn

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(3)).eval()
    model[1].weight = torch.nn.Parameter(torch.rand(3, 1) + 0.5)
    model(torch.randn(2, 3, 5, 5))  # PyTorch runs it
    with pytest.raises(ValueError, match=r"weight \(3, 1\).*PyTorch's forward refuses tensors of different lengths, "
                                         r"and bnkit reads each as one value per channel"):
        fold_bn(model)
    untracked = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(3, track_running_stats=False))
    bn = untracked[1]
    bn.weight, bn.bias = (torch.nn.Parameter(t.detach().view(3, 1).clone()) for t in (bn.weight, bn.bias))
    untracked(torch.randn(2, 3, 5, 5))  # PyTorch runs it too
    (bad,) = [f for f in audit(untracked).findings if f.severity == "error"]  # the shapes agree: not 'inconsistent'
    assert (bad.finding, bad.evidence, bad.data) == ("BN arrays are not one value per channel",
                                                     "weight (3, 1), bias (3, 1)", {"weight": [3, 1], "bias": [3, 1]})
    with pytest.raises(ValueError, match=r"has per-channel tensors that are not 1-d \(weight \(3, 1\), bias"):
        fold_bn(torch.nn.Sequential(untracked[0], torch.nn.BatchNorm2d(3).eval(), bn))


def test_buffers_made_under_inference_mode_do_not_stop_the_audit():
    """A cache buffer filled during a torch.inference_mode() forward is an inference tensor, which cannot be written
    in place outside that mode: restoring buffers after the audit's passes must leave it alone (it raised)."""
    from bnkit.torch import audit, fold_plan, recalibrate

    class Cached(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("last", torch.zeros(4))

        def forward(self, x):
            if torch.is_inference_mode_enabled():
                self.last = x.detach().mean(0).flatten()[:4].clone()
            return x

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), Cached()).eval()
    with torch.inference_mode():
        model(torch.randn(8, 5))
    cache = model[2].last
    assert cache.is_inference()
    data = torch.randn(32, 5)
    assert audit(model, data, batch_size=8).depth == "data"
    fold_plan(model, data[:2], force=True)
    recalibrate(model, [data[:16], data[16:]], progress=False)
    assert model[2].last is cache



def test_a_buffer_a_forward_registers_is_removed_after_the_audit():
    """The audit's passes run the user's forward; one that registers a buffer on its first call (a lazily created
    counter) must leave no trace: the module's buffers after audit() are those it had before (state_dict keys)."""
    from bnkit.torch import audit

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)

        def forward(self, x):
            if "seen" not in self._buffers:
                self.register_buffer("seen", torch.zeros(()))
            return self.bn(self.fc(x))

    torch.manual_seed(0)
    net = Net().eval()
    before = dict(net.state_dict(keep_vars=True))
    audit(net, torch.randn(32, 4), batch_size=8)
    after = net.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(after[k] is v for k, v in before.items())

def test_inputs_go_in_the_dtype_of_the_first_layer_outside_normalization():
    """A float16 model whose BatchNorm layers are kept in float32 (apex's keep_batchnorm_fp32), a BN first: it runs
    on float16 inputs, and the audit casts its data to float16, not to the first BN's float32 (the conv then
    raised 'Input type (float) and bias type (c10::Half)')."""
    from bnkit.torch import audit
    from bnkit.torch.modules import input_dtype_device

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).half()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.float()
            m.num_batches_tracked.fill_(100)
    model.eval()
    assert input_dtype_device(model) == (torch.float16, torch.device("cpu"))
    x = torch.randn(16, 3, 8, 8)
    report = audit(model, x, batch_size=8)  # float32 data, cast as the model needs
    assert report.depth == "data" and report.batches == 2
    bn_only = torch.nn.Sequential(torch.nn.BatchNorm1d(3, affine=False).double())
    assert input_dtype_device(bn_only)[0] == torch.float64  # no parameters: the buffers say
    rms_first = torch.nn.Sequential(torch.nn.RMSNorm(5), torch.nn.Linear(5, 3)).half()
    rms_first[0].float()
    assert input_dtype_device(rms_first)[0] == torch.float16


def test_a_model_built_under_inference_mode():
    """Its parameters and buffers are inference tensors, which PyTorch lets nobody write outside that mode:
    recalibrate (it writes the statistics) refuses it with one message (it raised a bare KeyError), nothing
    changed; fold_bn only reads them and folds it with grad mode on too (it raised 'abs(): functions with
    out=...'). Oracle: the model's own eval output."""
    from bnkit.torch import fold_bn, recalibrate

    with torch.inference_mode():
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)).eval()
        model[1].running_mean.add_(0.5)
        model[1].num_batches_tracked.fill_(10)
    with pytest.raises(ValueError, match="inference tensors"):
        recalibrate(model, [torch.randn(8, 5)], progress=False)
    assert bool((model[1].running_var == 1).all())
    x = torch.randn(3, 5)
    folded, report = fold_bn(model, x)
    assert report.n_folded == 1 and report.max_rel_diff < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


@dataclasses.dataclass
class _Batch:
    x: torch.Tensor
    names: list[str]

    def __post_init__(self) -> None:
        self.mask = self.x > 0  # derived: moved with the fields, and __post_init__ not run again


def test_to_device_moves_tensors_in_dataclasses_and_keeps_container_types():
    """Oracle: Tensor.to for each leaf; the meta device stands in for a GPU. A dataclass batch used to stay where it
    was (recalibrate fed a GPU model CPU tensors), and an OrderedDict came back a plain dict."""
    from collections import OrderedDict, namedtuple

    from bnkit.torch.modules import to_device

    Pair = namedtuple("Pair", "a b")
    x = torch.randn(4, 3)
    batch = OrderedDict(data=_Batch(x, ["a"]), pair=Pair(x, 3), rest=[x.long(), "s"])
    moved = to_device(batch, torch.device("meta"))
    assert type(moved) is OrderedDict and list(moved) == ["data", "pair", "rest"]
    assert type(moved["data"]) is _Batch and moved["data"].names == ["a"]
    assert moved["data"].x.device.type == moved["data"].mask.device.type == "meta"
    assert type(moved["pair"]) is Pair and moved["pair"].a.device.type == "meta" and moved["pair"].b == 3
    assert moved["rest"][0].device.type == "meta" and moved["rest"][0].dtype == torch.long
    assert moved["rest"][1] == "s" and batch["data"].x.device.type == "cpu"  # the input is not changed


class _XY(tuple):
    """An (x, y) batch whose constructor takes the two items, not one iterable (type(batch)(items) fails)."""

    def __new__(cls, x, y):
        return super().__new__(cls, (x, y))


class _Star(tuple):
    """A batch built as _Star(x, y): given one list, it makes a 1-tuple holding the list, without an error."""

    def __new__(cls, *items):
        return super().__new__(cls, items)


def test_a_tuple_subclass_that_cannot_be_rebuilt_is_kept_or_made_a_plain_tuple():
    """recalibrate sends each batch to a CPU model's device (the CPU) with its default forward, and rebuilding an
    _XY batch raised inside bnkit (review). Unchanged items: the batch itself; moved ones: a plain tuple, as a
    mapping that cannot be rebuilt becomes a plain dict. Oracle: Tensor.to (meta stands in for a GPU) and
    float64 moments of the data."""
    from bnkit.torch import recalibrate
    from bnkit.torch.modules import to_device

    x = torch.randn(16, 3) * 2 + 1
    batch = _XY(x, torch.zeros(16))
    assert to_device(batch, torch.device("cpu")) is batch
    for odd in (batch, _Star(x, torch.zeros(16))):
        moved = to_device(odd, torch.device("meta"))
        assert type(moved) is tuple and [t.device.type for t in moved] == ["meta", "meta"]
    bn = nn.BatchNorm1d(3)
    recalibrate(bn, [batch, _XY(x[:8] - 1, torch.zeros(8))], progress=False)
    every = torch.cat([x, x[:8] - 1]).double()
    torch.testing.assert_close(bn.running_mean.double(), every.mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bn.running_var.double(), every.var(0), rtol=1e-6, atol=1e-7)


def test_map_nested_copies_a_self_referring_dataclass_once():
    from bnkit.torch.modules import map_nested

    node = _Batch(torch.ones(2), [])
    node.names.append(node)  # refers back to itself
    doubled = map_nested(node, lambda t: t * 2)
    assert doubled is not node and doubled.names[0] is doubled
    assert torch.equal(doubled.x, torch.full((2,), 2.0)) and torch.equal(node.x, torch.ones(2))


class _NamedBatch(dict):
    """A dict subclass whose constructor takes the items as arguments, not a dict."""

    def __init__(self, images, labels=None):
        super().__init__(images=images, labels=labels)


class _ReadOnly(Mapping):
    """A read-only mapping over a dict of its own, whose constructor takes something else than a dict."""

    def __init__(self, **items):
        self._items = items

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)


class _WithCount(_ReadOnly):
    """A read-only mapping whose constructor adds an item of its own unless told not to."""

    def __init__(self, items, count=True):
        super().__init__(**items, **({"n": len(items)} if count else {}))


class _Store(_ReadOnly, MutableMapping):
    """A hand-written mutable mapping over a dict of its own, which a shallow copy shares."""

    def __setitem__(self, key, value):
        self._items[key] = value

    def __delitem__(self, key):
        del self._items[key]


@dataclasses.dataclass
class _Lazy:
    x: torch.Tensor
    cache: list = dataclasses.field(init=False)  # set by a metric, if ever


def test_mappings_keep_their_type_only_where_they_hold_exactly_the_mapped_items():
    """As default_collate does (a mutable mapping copied, each item set); before, a dict subclass built
    from a dict nested the whole batch under its first key, silently. Oracle: the items put in, by identity."""
    from bnkit.torch.modules import map_nested

    x, y = torch.ones(2), torch.zeros(2)
    named = map_nested(_NamedBatch(x, y), lambda t: t + 1)
    assert type(named) is _NamedBatch and list(named) == ["images", "labels"]
    assert torch.equal(named["images"], x + 1) and torch.equal(named["labels"], y + 1)
    frozen = map_nested(_ReadOnly(a=x), lambda t: t * 3)  # cannot be built from a dict: a plain one
    assert type(frozen) is dict and torch.equal(frozen["a"], x * 3)
    store = _Store(x=x)  # set on a shallow copy, the moved and cut tensors would go into the user's batch
    mapped = map_nested(store, lambda t: t[:1])
    assert type(mapped) is dict and mapped["x"].shape == (1,) and store["x"] is x
    counted = map_nested(_WithCount({"x": x}, count=False), lambda t: t * 2)  # rebuilt with an item more: plain
    assert type(counted) is dict and list(counted) == ["x"] and torch.equal(counted["x"], x * 2)
    lazy = map_nested(_Lazy(x), lambda t: t - 1)  # the unset field stays unset, nothing raised
    assert torch.equal(lazy.x, x - 1) and not hasattr(lazy, "cache")


def test_to_device_moves_a_packed_sequence_as_one():
    """Not rebuilt field by field: its batch_sizes would leave the CPU and PackedSequence refuse them. Oracle:
    PackedSequence.to itself (data moved, batch_sizes kept on the CPU); the meta device stands in for a GPU."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from bnkit.torch.modules import to_device

    packed = pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 2]))
    want = packed.to(torch.device("meta"))
    got = to_device({"seq": packed}, torch.device("meta"))["seq"]
    assert (got.data.device, got.batch_sizes.device) == (want.data.device, want.batch_sizes.device)


def _tools_on(model):
    """Every public bnkit.torch tool that takes a model, applied to ``model``."""
    import bnkit.torch as bt

    x = torch.randn(8, 64)
    return {
        "bn_layers": lambda: bt.bn_layers(model), "freeze_bn": lambda: bt.freeze_bn(model),
        "unfreeze_bn": lambda: bt.unfreeze_bn(model), "is_frozen": lambda: bt.is_frozen(model),
        "frozen_bn_layers": lambda: bt.frozen_bn_layers(model), "convert_frozen": lambda: bt.convert_frozen(model),
        "revert_frozen": lambda: bt.revert_frozen(model), "bn_guard": lambda: bt.bn_guard(model),
        "protect_stats": lambda: bt.protect_stats(model), "convert_bn": lambda: bt.convert_bn(model),
        "revert_bn": lambda: bt.revert_bn(model), "recalibrate": lambda: bt.recalibrate(model, [x], progress=False),
        "fold_bn": lambda: bt.fold_bn(model, x), "fold_plan": lambda: bt.fold_plan(model, x),
        "export_onnx": lambda: bt.export_onnx(model, x, "unused.onnx"), "audit": lambda: bt.audit(model),
        "audit with data": lambda: bt.audit(model, x), "revert_sync_bn": lambda: bt.revert_sync_bn(model),
    }


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/trace are deprecated in torch 2.13
@pytest.mark.parametrize("how", ["script", "trace", "scripted submodule", "scripted activation"])
def test_torchscript_is_refused_by_every_tool_and_left_unchanged(how):
    """A TorchScript module's BatchNorm layers are RecursiveScriptModules: no tool found them, so freeze_bn froze
    nothing, the audit passed a never-updated model with '0 BatchNorm layer(s) audited', recalibrate said the model
    had no BatchNorm layer and fold_bn failed inside bnkit (also on a scripted activation beside eager layers,
    whose buffers it could not restore). Each now refuses it by name. Oracle: the model's own BatchNorm buffers
    under state_dict (two layers) and its state and flags, unchanged."""
    from bnkit.torch.zoo import MLP

    eager = MLP().eval()
    if how == "script":
        model = torch.jit.script(eager)
    elif how == "trace":
        model = torch.jit.trace(eager, torch.randn(4, 64))
    elif how == "scripted submodule":
        model = nn.Sequential(torch.jit.script(eager), nn.ReLU())
    else:
        model = nn.Sequential(eager, torch.jit.script(nn.Tanh()))
    assert sum(k.endswith("running_mean") for k in model.state_dict()) == 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    where = {"scripted submodule": "its submodule '0' is", "scripted activation": "its submodule '1' is"}.get(
        how, "the model is")
    for tool, call in _tools_on(model).items():
        with pytest.raises(TypeError, match=f"{where} TorchScript"):
            call()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), tool
        assert [m.training for m in model.modules()] == flags, tool
