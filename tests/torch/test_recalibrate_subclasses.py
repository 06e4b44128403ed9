"""bnkit.torch.recalibrate on BN subclasses with a forward of their own: the statistics are those of what the layer
hands to torch.nn.functional.batch_norm, not of its own input (a subclass that never calls it is measured on its
input, with a warning); F.batch_norm is restored after every pass, also when passes overlap in threads.

Oracles: float64 NumPy statistics of the values each layer normalizes, captured by the test's own hooks /
selections."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _helpers import arithmetic_bn_class

from bnkit.torch import recalibrate


class TransposedBN(nn.BatchNorm1d):
    """Normalizes the last axis of an (N, L, C) input: transposes to (N, C, L) for BatchNorm1d."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _moments(values):
    """float64 per-channel mean and unbiased variance of rows (K, C)."""
    v = np.concatenate(values).astype(np.float64)
    return v.mean(0), v.var(0, ddof=1)


@pytest.mark.parametrize("length", [6, 10])  # L == C (silently the wrong axis before) and L != C (an error before)
def test_transposing_subclass_gets_the_statistics_of_its_normalized_axis(length):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), TransposedBN(6)).eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(n, length, 3, generator=g) * 2 + 1 for n in (8, 5)]
    seen = []  # the oracle's own capture: the Linear's output, whose last axis the layer normalizes
    h = model[0].register_forward_hook(lambda m, a, out: seen.append(out.detach().reshape(-1, 6).double().numpy()))
    with torch.no_grad():
        for x in data:
            model(x)
    h.remove()
    mean, var = _moments(seen)
    recalibrate(model, data, progress=False)
    bn = model[1]
    np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5)
    assert int(bn.num_batches_tracked) == 2


class SelectingBN(nn.BatchNorm1d):
    """(N, C, L) input with a (N, L) mask: in training, F.batch_norm (through super().forward) on the real positions
    only, scattered back; padding stays 0."""

    def forward(self, x, mask):
        rows = x.transpose(1, 2)[mask]  # (K, C)
        y = torch.zeros_like(x.transpose(1, 2))
        y[mask] = super().forward(rows)
        return y.transpose(1, 2)


def _padded(seed, n=16, c=4, length=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, length, generator=g) * 2 + 3
    mask = torch.arange(length)[None, :] < torch.randint(3, length, (n, 1), generator=g)
    return x * mask[:, None, :], mask


def test_subclass_normalizing_selected_positions_gets_their_statistics_only():
    bn = SelectingBN(4).eval()
    data = [_padded(s) for s in (0, 1)]
    real = [x.transpose(1, 2)[mask].double().numpy() for x, mask in data]  # oracle: the real positions
    mean, var = _moments(real)
    padded_mean = np.concatenate([x.transpose(1, 2).reshape(-1, 4).double().numpy() for x, _ in data]).mean(0)
    assert np.abs(padded_mean - mean).min() > 0.3  # the padding would pull the mean: the test can tell them apart
    recalibrate(bn, data, forward=lambda m, b: m(*b), progress=False)
    np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5)


ArithmeticBN = arithmetic_bn_class()  # masked BN with its own arithmetic: never calls F.batch_norm


def test_subclass_with_its_own_arithmetic_is_measured_on_its_input_with_a_warning_naming_it():
    model = nn.ModuleDict({"masked": ArithmeticBN(4)}).eval()
    data = [_padded(s) for s in (0, 1)]
    inputs = [x.transpose(1, 2).reshape(-1, 4).double().numpy() for x, _ in data]  # its whole input, padding too
    mean, var = _moments(inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recalibrate(model, data, forward=lambda m, b: m["masked"](*b), progress=False)
    bn = model["masked"]
    np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5)
    own = [w for w in caught if issubclass(w.category, UserWarning) and "batch_norm" in str(w.message)]
    assert len(own) == 1 and "masked" in str(own[0].message)
    # a subclass that does call F.batch_norm gets no such warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recalibrate(SelectingBN(4).eval(), data, forward=lambda m, b: m(*b), progress=False)
    assert not [w for w in caught if "batch_norm" in str(w.message)]


class FailingBN(nn.BatchNorm1d):
    """Calls F.batch_norm, then raises on its third call."""

    def __init__(self, c):
        super().__init__(c)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = super().forward(x)
        if self.calls == 3:
            raise RuntimeError("boom in the layer")
        return y


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs
               and not m._forward_pre_hooks_with_kwargs for m in model.modules())


@pytest.mark.parametrize("fails", [False, True])
def test_functional_batch_norm_is_restored_and_no_hook_is_left(fails):
    original = F.batch_norm
    model = nn.Sequential(nn.Linear(3, 4), FailingBN(4) if fails else TransposedBN(4), nn.BatchNorm1d(4)).eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 3, generator=g) if fails else torch.randn(8, 4, 3, generator=g) for _ in range(4)]  # L == C: the
    # stock layer after the transposing one normalizes axis 1 of its (N, 4, 4) output
    if fails:
        with pytest.raises(RuntimeError, match="boom in the layer"):
            recalibrate(model, data, progress=False)
    else:
        recalibrate(model, data, progress=False)
    assert F.batch_norm is original and torch.nn.functional.batch_norm is original
    assert _no_hooks(model)
    # PyTorch's own layers, after the pass, call the original again: a plain training-mode update is PyTorch's
    bn = nn.BatchNorm1d(4, momentum=1.0)
    x = torch.randn(16, 4, generator=g)
    with torch.no_grad():
        bn(x)
    np.testing.assert_allclose(bn.running_mean.numpy(), x.mean(0).numpy(), rtol=1e-5, atol=1e-6)


class SplitBN(nn.BatchNorm2d):
    """MoCo's SplitBatchNorm: in training, normalizes each of ``splits`` sub-batches on its own by viewing the
    channels as C * splits, so what reaches F.batch_norm does not have the layer's channels on axis 1."""

    def __init__(self, c, splits):
        super().__init__(c)
        self.splits = splits

    def forward(self, x):
        n, c, h, w = x.shape
        if not self.training:
            return super().forward(x)
        mean, var = self.running_mean.repeat(self.splits), self.running_var.repeat(self.splits)
        out = F.batch_norm(x.view(-1, c * self.splits, h, w), mean, var, self.weight.repeat(self.splits),
                           self.bias.repeat(self.splits), True, self.momentum, self.eps).view(n, c, h, w)
        self.running_mean.copy_(mean.view(self.splits, c).mean(0))
        self.running_var.copy_(var.view(self.splits, c).mean(0))
        return out


def test_split_bn_that_reshapes_its_channels_is_measured_on_its_input_with_a_warning():
    """The reshaped tensor (4 splits x 4 channels on axis 1) must not be recorded (it would be refused with a
    channel error): the layer is measured on its own input (oracle: float64 statistics of the conv output), and a
    warning names it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), SplitBN(4, 2)).eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 3, 8, 8, generator=g) + 1 for _ in range(3)]
    with torch.no_grad():
        h = torch.cat([model[0](x) for x in data]).double()
    expected = h.transpose(0, 1).reshape(4, -1)
    with pytest.warns(UserWarning, match=r"\['1'\] have a forward of their own"):
        recalibrate(model, data, progress=False)
    np.testing.assert_allclose(model[1].running_mean.double().numpy(), expected.mean(1).numpy(), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(model[1].running_var.double().numpy(), expected.var(1).numpy(), rtol=1e-5)


def test_two_passes_in_two_threads_keep_their_own_records_and_restore_f_batch_norm():
    """A pass that began first and ends while another runs must not take the other's patch away (the other would be
    measured on the wrong axis, with a false warning), nor leave F.batch_norm patched. Here pass A begins, pass B
    begins, A ends, then B runs its batches. Oracle: float64 statistics of each model's normalized axis;
    F.batch_norm is the original object afterwards."""
    import threading

    original = F.batch_norm
    a_entered, b_entered, a_done = threading.Event(), threading.Event(), threading.Event()
    g = torch.Generator().manual_seed(2)
    data_a = [torch.randn(8, 4, 4, generator=g) for _ in range(2)]
    data_b = [torch.randn(8, 4, 4, generator=g) * 3 + torch.arange(4.0) for _ in range(3)]

    def batches_a():  # read once the pass is set up: both passes are then active
        a_entered.set()
        b_entered.wait(10)
        yield from data_a

    def batches_b():
        b_entered.set()
        a_done.wait(10)  # A has ended before B's first batch runs
        yield from data_b

    models = [TransposedBN(4).eval(), TransposedBN(4).eval()]
    errors = []

    def run(model, data, done=None):
        try:
            recalibrate(model, data, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            if done is not None:
                done.set()

    # warnings recorded here, around both threads: catch_warnings is process-wide, not per thread
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = threading.Thread(target=run, args=(models[0], batches_a(), a_done))
        first.start()
        a_entered.wait(10)
        second = threading.Thread(target=run, args=(models[1], batches_b()))
        second.start()
        first.join(30)
        second.join(30)
    assert not errors and not [str(w.message) for w in caught]
    assert F.batch_norm is original
    for model, data in zip(models, (data_a, data_b)):
        rows = torch.cat(data).reshape(-1, 4).double()
        np.testing.assert_allclose(model.running_mean.double().numpy(), rows.mean(0).numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(model.running_var.double().numpy(), rows.var(0).numpy(), rtol=1e-5)


def test_a_reference_to_f_batch_norm_taken_during_a_pass_still_works_after_it():
    """The shared stand-in must not call a class attribute that is set to None when the last pass ends."""
    from bnkit.torch.modules import normalized_inputs

    bn = TransposedBN(3)
    with normalized_inputs([bn], lambda i, x: None):
        kept = F.batch_norm
    assert kept is not F.batch_norm
    x = torch.randn(4, 3)
    torch.testing.assert_close(kept(x, None, None, training=True), F.batch_norm(x, None, None, training=True))


class _Passthrough(nn.BatchNorm1d):
    """A BN subclass whose forward hands its input to F.batch_norm unchanged."""

    def forward(self, x):
        return super().forward(x)


def test_a_call_that_raises_inside_the_model_is_neither_recorded_nor_counted_as_unmeasured():
    """A layer call that raised (and that the model caught) must not go through the after-call bookkeeping as if
    it had run. Oracle: no own-forward warning, and the statistics of the good calls alone, in float64."""

    class Tolerant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = _Passthrough(3)

        def forward(self, x):
            try:
                self.bn(x[:, :2])  # the wrong channel count: PyTorch's own check raises inside the call
            except (RuntimeError, ValueError):
                pass
            return self.bn(x)

    torch.manual_seed(0)
    model = Tolerant().eval()
    data = [torch.randn(8, 3) * 2 + 1 for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recalibrate(model, data, progress=False)
    assert not [w for w in caught if "forward of their own" in str(w.message)]
    rows = torch.cat(data).double()
    np.testing.assert_allclose(model.bn.running_mean.double().numpy(), rows.mean(0).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.bn.running_var.double().numpy(), rows.var(0).numpy(), rtol=1e-5)


def test_frozen_batchnorm_layers_keep_their_statistics_and_are_named():
    """convert_frozen's layers were skipped in silence (the report said 3/3 of six layers), and a model of only
    them was told it had no BatchNorm layer with running statistics. Oracle: their buffers, unchanged."""
    from bnkit.torch import convert_frozen
    from bnkit.torch.zoo import SmallResNet

    torch.manual_seed(0)
    model = SmallResNet(in_channels=1).eval()
    convert_frozen(model.layers[1])
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.startswith("layers.1.")}
    x = [torch.randn(16, 1, 8, 8) + 2.0]
    with pytest.warns(UserWarning, match=r"FrozenBatchNorm layer\(s\) \['layers.1.bn1', 'layers.1.bn2'.*revert_frozen"):
        report = recalibrate(model, x, progress=False)
    assert len(report.layers) == 3
    assert all(torch.equal(b, dict(model.named_buffers())[n]) for n, b in frozen.items())
    with pytest.raises(ValueError, match="no BatchNorm layer with running statistics.*FrozenBatchNorm layer"):
        recalibrate(convert_frozen(SmallResNet(in_channels=1)).eval(), x, progress=False)


class InPlaceArithmeticBN(nn.BatchNorm1d):
    """Never calls F.batch_norm and centres its input in place: what it was given is gone after the call."""

    def forward(self, x):
        mean = x.mean(0) if self.training else self.running_mean
        var = x.var(0, correction=0) if self.training else self.running_var
        return x.sub_(mean).div_((var + self.eps).sqrt()) * self.weight + self.bias


def test_a_subclass_writing_its_input_in_place_is_measured_on_the_input_as_given():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), InPlaceArithmeticBN(4)).eval()
    data = [torch.randn(16, 4) * 2 + 1 for _ in range(3)]
    mean, var = _moments([d.numpy().copy() for d in data])  # before the forward centres the batches in place
    with pytest.warns(UserWarning, match=r"\['1'\] have a forward of their own"):
        recalibrate(model, data)
    np.testing.assert_allclose(model[1].running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model[1].running_var.double().numpy(), var, rtol=1e-5)


class WithUntrackedChild(nn.BatchNorm1d):
    """Its own arithmetic on its input, plus an untracked BatchNorm child normalizing something else."""

    def __init__(self, c):
        super().__init__(c)
        self.aux = nn.BatchNorm1d(c, affine=False, track_running_stats=False)

    def forward(self, x):
        return (x - self.running_mean) / (self.running_var + self.eps).sqrt() + 0 * self.aux(x * 10 + 50)


def test_an_untracked_batchnorm_child_calling_f_batch_norm_is_not_taken_for_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(WithUntrackedChild(4)).eval()
    data = [torch.randn(32, 4) * 2 + 1 for _ in range(3)]
    with pytest.warns(UserWarning, match="forward of their own"):
        recalibrate(model, data)
    mean, var = _moments([d.numpy() for d in data])  # measured on its input, not on the child's x * 10 + 50
    np.testing.assert_allclose(model[0].running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model[0].running_var.double().numpy(), var, rtol=1e-5)


class SharingAChild(nn.BatchNorm1d):
    """(N, L, C): calls a shared untracked BatchNorm child, then normalizes its last axis through F.batch_norm."""

    def __init__(self, c, shared):
        super().__init__(c)
        self.shared = shared

    def forward(self, x):
        s = self.shared(x.mean(1))
        return super().forward(x.transpose(1, 2)).transpose(1, 2) + 0 * s[:, None, :]


def test_two_passes_at_once_over_models_sharing_a_child_keep_their_records_and_leave_no_entries():
    """Each pass's hooks on the shared child fire in both threads: each must remove its own entry, wherever it sits."""
    import threading

    from bnkit.torch.modules import normalized_inputs

    shared = nn.BatchNorm1d(4, affine=False, track_running_stats=False)
    models = [SharingAChild(4, shared).eval(), SharingAChild(4, shared).eval()]
    g = torch.Generator().manual_seed(2)
    datas = [[torch.randn(8, 6, 4, generator=g) * 3 + torch.arange(4.0) for _ in range(3)] for _ in range(2)]
    both = threading.Barrier(2)
    left = [None, None]

    def batches(d):
        both.wait(30)  # both passes have hooked the shared child before either runs a forward
        yield from d

    def run(k):
        try:
            recalibrate(models[k], batches(datas[k]), progress=False)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            left[k] = str(exc)
        else:
            left[k] = len(normalized_inputs._calls())

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert left == [0, 0]
    for model, data in zip(models, datas):
        mean, var = _moments([d.reshape(-1, 4).numpy() for d in data])
        np.testing.assert_allclose(model.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(model.running_var.double().numpy(), var, rtol=1e-5)


class CallsItself(nn.BatchNorm1d):
    """(N, L, C): transposes and calls itself; the nested call hands F.batch_norm (N, C, L)."""

    def forward(self, x):
        if x.dim() == 3 and x.shape[1] != self.num_features:
            return self(x.transpose(1, 2)).transpose(1, 2)
        return super().forward(x)


def test_a_layer_calling_itself_is_measured_once_on_what_its_nested_call_normalizes():
    torch.manual_seed(0)
    data = [torch.randn(8, 5, 4) * 2 + 3 for _ in range(3)]
    model = nn.Sequential(CallsItself(4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no call fell back on its (N, L, C) input
        recalibrate(model, data)
    mean, var = _moments([d.reshape(-1, 4).numpy() for d in data])
    np.testing.assert_allclose(model[0].running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model[0].running_var.double().numpy(), var, rtol=1e-5)


class KeywordsOnly(nn.BatchNorm1d):
    """Its own arithmetic on ``x`` given with a second tensor keyword: no single input to fall back on."""

    def forward(self, x, mask):
        return (x - self.running_mean) / (self.running_var + self.eps).sqrt() * mask


class CallsWithKeywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = KeywordsOnly(4)

    def forward(self, x):
        return self.bn(x=x, mask=torch.ones_like(x))


def test_a_layer_with_no_single_tensor_input_is_named_as_not_measured_and_keeps_its_statistics():
    model = CallsWithKeywords().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"\['bn'\].*nothing was measured") as record:
        recalibrate(model, [torch.randn(16, 4) + 3 for _ in range(3)])
    assert not any("statistics are those of their inputs" in str(w.message) for w in record)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class Interrupts(nn.BatchNorm1d):
    def forward(self, x):
        raise KeyboardInterrupt


def test_an_interrupted_pass_leaves_no_entry_holding_a_copy_of_an_input():
    from bnkit.torch.modules import normalized_inputs

    model = nn.Sequential(Interrupts(4)).eval()
    with pytest.raises(KeyboardInterrupt):
        recalibrate(model, [torch.randn(16, 4)])
    assert not normalized_inputs._local.__dict__.get("calls")  # the thread's stack, unpruned


class OwnArithmeticInside(nn.BatchNorm1d):
    """Calls itself for its own arithmetic (``2x + 1``, no F.batch_norm), then normalizes that through it."""

    def forward(self, x, inner=False):
        return x * 2 + 1 if inner else super().forward(self(x, inner=True))


def test_a_nested_call_doing_its_own_arithmetic_inside_one_that_reaches_f_batch_norm_is_not_measured():
    torch.manual_seed(0)
    data = [torch.randn(16, 4) for _ in range(3)]
    model = nn.Sequential(OwnArithmeticInside(4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no call fell back on its input
        recalibrate(model, data)
    mean, var = _moments([(2 * d + 1).numpy() for d in data])  # what PyTorch's training mode normalizes
    np.testing.assert_allclose(model[0].running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model[0].running_var.double().numpy(), var, rtol=1e-5)


class OwnArithmeticOnLastAxis(nn.BatchNorm1d):
    """Normalizes (N, L, C) with its own arithmetic: neither F.batch_norm nor its input has C on axis 1."""

    def forward(self, x):
        return (x - self.running_mean) / (self.running_var + self.eps).sqrt()


def test_a_layer_whose_input_lacks_its_channels_on_axis_1_is_reported_reached_but_not_measured():
    """As the audit names it 'not compared': its statistics kept, the others recalibrated, no refusal."""
    torch.manual_seed(0)
    model = nn.Sequential(OwnArithmeticOnLastAxis(4), nn.Flatten(), nn.BatchNorm1d(20)).eval()
    before = model[0].running_mean.clone()
    data = [torch.randn(16, 5, 4) + 3 for _ in range(3)]
    with pytest.warns(UserWarning, match=r"\['0'\].*an \(N, L, C\) input\): nothing was measured"):
        report = recalibrate(model, data)
    assert torch.equal(model[0].running_mean, before)
    assert report.unread_layers == ["0"] and report.unused_layers == []
    mean, _ = _moments([((d - before) / (1 + 1e-5) ** 0.5).reshape(16, -1).numpy() for d in data])
    np.testing.assert_allclose(model[2].running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-5)


class EmptySafe(nn.BatchNorm1d):
    """Returns an empty input as it is (detectron2's old BatchNorm wrapper); every other call is PyTorch's."""

    def forward(self, x):
        return x.clone() if x.numel() == 0 else super().forward(x)


class RoutedEmptySafe(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = EmptySafe(4)

    def forward(self, x):
        keep, y = x[:, 0] > 0, x.clone()
        y[keep] = self.bn(x[keep])
        return y


def test_empty_calls_of_a_layer_with_its_own_forward_are_not_said_to_be_measured_on_its_input():
    torch.manual_seed(0)
    batches = [torch.randn(16, 4) for _ in range(6)]
    for b in batches[::3]:
        b[:, 0] = -1 - b[:, 0].abs()  # no row routed
    model = RoutedEmptySafe().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every call with values went through F.batch_norm
        recalibrate(model, batches)
    mean, var = _moments([b[b[:, 0] > 0].numpy() for b in batches])
    np.testing.assert_allclose(model.bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn.running_var.double().numpy(), var, rtol=1e-5)
