"""bnkit.torch.recalibrate against independent oracles.

The oracle for "exact population statistics" is a reference copy of the model
run with PyTorch's own training-mode BatchNorm (only the BN layers in training
mode), its BN inputs captured by hooks and reduced in float64 NumPy over the
concatenation of every batch (``np.mean`` / ``np.var(ddof=1)``), independent of
the reductions and the Chan merge under test. Most models are float64, so the
forward adds no rounding and the statistics are checked to 1e-9. In float32,
recalibrate normalizes with its own statistics, so deeper layers see activations
that differ from PyTorch's kernel by float32 rounding; the layer reading the data
is checked to 1e-6 and means are compared relative to ``|mean| + std``.
PyTorch's own buffer update (momentum 1.0) pins the biased/unbiased convention.
"""
from __future__ import annotations

import copy
import importlib
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bnkit.torch import RecalibrationReport, bn_layers, recalibrate


class Mixed(nn.Module):
    """Conv3d/BN3d, Conv2d/BN2d, BN1d on (N, C, L), Linear/Dropout/BN1d on (N, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv3d(1, 3, 3, padding=1)
        self.bn3 = nn.BatchNorm3d(3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.bn2 = nn.BatchNorm2d(4, momentum=None)
        self.bn1_seq = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4 * 16, 12)
        self.drop = nn.Dropout(0.5)  # before a BN: if it were switched on, that BN's statistics would change
        self.bn1 = nn.BatchNorm1d(12, momentum=0.3)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 1, 4, 6, 6)
        h = torch.relu(self.bn3(self.conv3(x))).mean(dim=2)  # (N, 3, 6, 6)
        h = torch.relu(self.bn2(self.conv2(h)))  # (N, 4, 4, 4)
        h = self.bn1_seq(h.flatten(2))  # (N, 4, 16)
        return self.head(torch.relu(self.bn1(self.drop(self.fc(h.flatten(1))))))


def make_batches(sizes=(5, 16, 2, 9), seed: int = 0, offset: float = 40.0, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a large common offset: a sum-of-squares variance would lose its digits here
    return [(offset + 3.0 * torch.randn(n, 1, 4, 6, 6, generator=g, dtype=torch.float64)).to(dtype) for n in sizes]


def trained_like(model: nn.Module, seed: int = 1) -> nn.Module:
    """Stale running statistics and non-trivial affine parameters, then eval()."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in bn_layers(model):
            if bn.track_running_stats:
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
                bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=g))
                bn.num_batches_tracked.fill_(123)
            bn.weight.copy_(1 + 0.3 * torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(0.3 * torch.randn(bn.num_features, generator=g))
    return model.eval()


def mixed_model(dtype=torch.float64) -> Mixed:
    """float64 by default: then the forward itself adds no rounding and the statistics can be checked to 1e-9."""
    torch.manual_seed(0)
    return trained_like(Mixed()).to(dtype)


def reference_stats(model: nn.Module, batches, feed=lambda m, b: m(b)) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Per BN layer: float64 mean and unbiased variance of all its inputs, and the expected ``num_batches_tracked``:
    the number of calls for ``momentum=None``, else the layer's count plus the calls (as PyTorch's training-mode
    forwards count)."""
    ref = copy.deepcopy(model)
    seen: dict[str, list[np.ndarray]] = {}
    for name, bn in bn_layers(ref):
        bn.train()
        bn.register_forward_pre_hook(lambda m, args, kwargs, name=name: seen.setdefault(name, []).append(
            np.moveaxis((args or (kwargs["input"],))[0].detach().double().numpy(), 1, 0).reshape(m.num_features, -1)),
            with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            feed(ref, b)
    layers = dict(bn_layers(model))
    out = {}
    for name, parts in seen.items():
        allx = np.concatenate(parts, axis=1)
        bn = layers[name]
        count = len(parts) + (0 if bn.momentum is None or bn.num_batches_tracked is None
                              else int(bn.num_batches_tracked))
        out[name] = (allx.mean(axis=1), allx.var(axis=1, ddof=1), count)
    return out


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def assert_matches_reference(model: nn.Module, ref, rtol: float = 1e-9) -> None:
    """Means to ``rtol`` of ``|mean| + std`` (a channel mean near 0 has no relative digits), variances to ``rtol``."""
    for name, bn in bn_layers(model):
        mean, var, count = ref[name]
        got_mean, got_var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
        assert np.all(np.abs(got_mean - mean) <= rtol * (np.abs(mean) + np.sqrt(var))), (name, got_mean - mean)
        np.testing.assert_allclose(got_var, var, rtol=rtol, err_msg=name)
        assert int(bn.num_batches_tracked) == count


def interrupted_after(batches, k):
    """The first ``k`` batches, then a KeyboardInterrupt (Ctrl-C in the middle of the pass)."""
    yield from batches[:k]
    raise KeyboardInterrupt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_population_statistics_with_unequal_batches_and_dropout(dtype):
    model = mixed_model(dtype)
    batches = make_batches(dtype=dtype)
    ref = reference_stats(model, batches)
    model.fc.train()  # a mix of modes that must survive the call
    flags = {n: m.training for n, m in model.named_modules()}
    momenta = {n: bn.momentum for n, bn in bn_layers(model)}
    model.head.weight.requires_grad_(False)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    report = recalibrate(model, batches, progress=False)

    if dtype == torch.float64:
        assert_matches_reference(model, ref, rtol=1e-9)
    else:
        # bn3 reads the data itself: its float32 buffers hold the float64 statistics to 1e-6 relative.
        np.testing.assert_allclose(model.bn3.running_mean.double().numpy(), ref["bn3"][0], rtol=1e-6)
        np.testing.assert_allclose(model.bn3.running_var.double().numpy(), ref["bn3"][1], rtol=1e-6)
        # Deeper layers read float32 activations that recalibrate's normalization and PyTorch's kernel
        # round differently (~1e-7, amplified where a Linear's sum cancels), so the reference moves too.
        assert_matches_reference(model, ref, rtol=1e-5)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: bn.momentum for n, bn in bn_layers(model)} == momenta
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(not bn._forward_pre_hooks and "forward" not in bn.__dict__ for _, bn in bn_layers(model))
    assert isinstance(report, RecalibrationReport)
    assert report.batches == 4 and report.skipped_batches == 0 and report.world_size == 1
    rows = {r.name: r for r in report.layers}
    assert set(rows) == {n for n, _ in bn_layers(model)}
    assert rows["bn3"].samples == 32 and rows["bn3"].count == 32 * 4 * 6 * 6
    assert rows["bn1"].count == 32 and rows["bn1_seq"].count == 32 * 16
    # the report's old/new values are the buffers before and after
    np.testing.assert_allclose(rows["bn2"].new_var, model.bn2.running_var.double().numpy(), rtol=1e-6)
    before = mixed_model(dtype)
    np.testing.assert_array_equal(rows["bn2"].old_mean, before.bn2.running_mean.double().numpy())
    shift = np.abs(rows["bn2"].new_mean - rows["bn2"].old_mean) / np.sqrt(rows["bn2"].old_var + model.bn2.eps)
    assert rows["bn2"].mean_shift == pytest.approx(shift.max())
    eps = model.bn2.eps  # variance ratio per channel from the buffers before and after: smallest, then largest
    ratio = (model.bn2.running_var.double().numpy() + eps) / (before.bn2.running_var.double().numpy() + eps)
    row = {r["layer"]: r for r in report.rows()}["bn2"]
    assert (row["var_ratio_min"], row["var_ratio_max"]) == pytest.approx((ratio.min(), ratio.max()), rel=1e-6)
    assert ratio.min() < ratio.max()
    assert "bn3" in str(report) and report.rows()[0]["layer"] == "bn3"


def test_independent_of_batching():
    """Same samples, different batch splits: same buffers (to float32 rounding)."""
    data = torch.cat(make_batches())
    a, b = mixed_model(), mixed_model()
    # BN in training mode normalizes per batch, so downstream layers see different inputs for
    # different splits; only the first BN layer's input is split-independent.
    recalibrate(a, [data], progress=False)
    recalibrate(b, list(data.split(3)), progress=False)
    torch.testing.assert_close(a.bn3.running_mean, b.bn3.running_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.bn3.running_var, b.bn3.running_var, rtol=1e-12, atol=0)


def test_shifted_sums_keep_the_variance_to_1e_7_far_from_zero():
    # a float32 input 3e4 std from zero, large enough for the shifted sums: the documented ~1e-7 relative variance
    # needs the correction -(S1/n)^2 (without it the error is ~1e-5 here)
    x = torch.randn(64, 8, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 3e4
    model = nn.Sequential(nn.BatchNorm2d(8)).eval()
    recalibrate(model, [x.float()], progress=False)
    exact = x.float().double().transpose(0, 1).reshape(8, -1)  # float64 oracle on the very float32 values
    np.testing.assert_allclose(model[0].running_var.double().numpy(), exact.var(dim=1).numpy(), rtol=5e-7)
    ulp = float(np.spacing(np.float32(3e4)))  # the float32 buffer's resolution there
    np.testing.assert_allclose(model[0].running_mean.double().numpy(), exact.mean(dim=1).numpy(), rtol=0, atol=ulp)


@pytest.mark.parametrize("dtype,rtol,layout,upcast", [
    (torch.float64, 1e-12, torch.contiguous_format, False), (torch.float32, 1e-6, torch.contiguous_format, False),
    (torch.float32, 1e-6, torch.channels_last, False),
    (torch.float32, 1e-6, torch.contiguous_format, True),  # as on CUDA: inputs upcast up to _UPCAST_DEVICE_MAX
])
def test_large_inputs_with_mean_far_above_std(dtype, rtol, layout, upcast, monkeypatch):
    """Inputs above recalibrate's float64-upcast size take the shifted-sum path (or, on devices in
    ``_UPCAST_DEVICES``, the upcast one); |mean|/std = 1e4 must not cancel."""
    module = importlib.import_module("bnkit.torch.recalibrate")
    shifted, sizes = module._batch_moments, []
    monkeypatch.setattr(module, "_batch_moments", lambda x, c: sizes.append(x.numel()) or shifted(x, c))
    upcast_sizes, kernel = [], torch.batch_norm_update_stats  # the upcast path's float64 kernel, whoever calls it
    monkeypatch.setattr(torch, "batch_norm_update_stats", lambda x, *a: upcast_sizes.append(x.numel()) or kernel(x, *a))
    if upcast:  # the first layer's 40-sample batch (4 * 46 * 46 * 40 values) is above the limit, the rest below
        monkeypatch.setattr(module, "_UPCAST_DEVICES", ("cpu",))
        monkeypatch.setattr(module, "_UPCAST_DEVICE_MAX", 4 * 46 * 46 * 40 - 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
    model = model.to(dtype=dtype, memory_format=layout).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(1e4 + torch.randn(n, 1, 48, 48, generator=g, dtype=torch.float64)).to(dtype=dtype, memory_format=layout)
               for n in (40, 13)]
    assert batches[0][:, :1].numel() * 4 > (1 << 16)
    ref = reference_stats(model, batches)
    recalibrate(model, batches, progress=False)
    mean, var, _ = ref["1"]
    assert np.max(np.abs(mean) / np.sqrt(var)) > 1e3
    np.testing.assert_allclose(model[1].running_mean.double().numpy(), mean, rtol=rtol)
    np.testing.assert_allclose(model[1].running_var.double().numpy(), var, rtol=rtol)
    if dtype == torch.float64:  # in float32 the conv outputs near 1e4 carry ulp ~1e-3: the next layer's input
        assert_matches_reference(model, ref, rtol=1e-9)  # differs by that between any two float32 pipelines
    big = [n * c * 46 * 46 for n in (40, 13) for c in (4, 3)]  # each batch's two BN inputs, all above _SMALL
    # the first batch's inputs reduced twice: the second reduction measures the mean's rounding at its magnitude
    # until that batch finds the layer near 0 (|mean|/std 1e4 < 1e5)
    big = [big[0], big[0], big[1], big[1], *big[2:]]
    assert sizes == ([big[0]] * 2 if upcast else big)  # reached the shifted sums ...
    assert upcast_sizes == (big[2:] if upcast else [])  # ... and the rest, only, went through the float64 copy


@pytest.mark.parametrize("offset", [1e6, 1e8, 1e12])
@pytest.mark.parametrize("values", [8 * 8, 64 * 64])  # the float64 upcast path, and the shifted sums
def test_batches_whose_means_differ_far_from_zero_keep_the_variance_exact(offset, values):
    """Each batch's mean was rounded at the mean's magnitude (1.5e-8 at 1e8) before the batches were merged, and the
    spread of the batch means carried that into the variance: 1.1e-7 off at |mean|/std = 1e8 with batch means half
    a std apart, 5e-9 at 1e7. Oracle: float64 NumPy on the inputs less the offset, which is exact here."""
    g = torch.Generator().manual_seed(3)
    side = int(math.isqrt(values))
    data = [torch.randn(64, 3, side, side, generator=g, dtype=torch.float64) + offset + 0.5 * i for i in range(3)]
    exact = np.concatenate([(d - offset).transpose(0, 1).reshape(3, -1).numpy() for d in data], axis=1)
    assert all(torch.equal(d - offset + offset, d) for d in data)  # the offset subtracts exactly
    bn = nn.BatchNorm2d(3).double().eval()
    recalibrate(bn, data, progress=False)
    np.testing.assert_allclose(bn.running_var.numpy(), exact.var(axis=1, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(bn.running_mean.numpy() - offset, exact.mean(axis=1), atol=4 * np.spacing(offset))


class TwoInputs(nn.Module):
    """Two feature streams, one BatchNorm1d each: a NaN in one leaves the batch out whatever the other holds."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.BatchNorm1d(2).double(), nn.BatchNorm1d(2).double()

    def forward(self, xy):
        return self.a(xy[0]) + self.b(xy[1])


def test_a_left_out_batch_does_not_decide_whether_a_layer_is_far_from_zero():
    """A dropped first batch with wide garbage at layer a (1e10 * randn, NaN at b) found a near 0, so the kept batches
    at 1e8 +- 1 lost the measured rounding of their means: 5e-9 off (4e-5 at 1e12). Oracle: float64 NumPy over the
    kept inputs less the offset (exact: the values are multiples of 2^-20)."""
    g = torch.Generator().manual_seed(0)
    dev = [torch.round((torch.randn(4096, 2, generator=g, dtype=torch.float64) + 0.5 * (k % 2)) * 2 ** 20) / 2 ** 20
           for k in range(6)]
    kept = [(d + 1e8, torch.randn(4096, 2, generator=g, dtype=torch.float64)) for d in dev]
    assert all(torch.equal(x - 1e8, d) for (x, _), d in zip(kept, dev))
    bad = (1e10 * torch.randn(4096, 2, generator=g, dtype=torch.float64),
           torch.full((4096, 2), float("nan"), dtype=torch.float64))
    model = TwoInputs().eval()
    report = recalibrate(model, [bad] + kept, on_nonfinite="skip", forward=lambda m, b: m(b), progress=False)
    assert report.skipped_batches == 1
    np.testing.assert_allclose(model.a.running_var.numpy(), torch.cat(dev).numpy().var(0, ddof=1), rtol=1e-12)


def test_a_layer_a_wide_first_batch_finds_near_zero_measures_its_rounding_once_batches_show_it_far():
    """A first batch of two samples 1e8 +- 1000 (|mean|/std 1e5: near) left every later batch at 1e8 +- 1 without its
    mean's rounding measured (2.1e-10 of the variance here). The first merge (64 batches) now finds the layer far and
    the batches after it measure it (5e-11, from the first 64). Oracle: float64 NumPy on the inputs less 1e8
    (multiples of 2^-20: exact)."""
    g = torch.Generator().manual_seed(0)
    devs = [torch.round((torch.randn(512, 2, generator=g, dtype=torch.float64) + 0.5 * (k % 2)) * 2 ** 20) / 2 ** 20
            for k in range(640)]
    parts = [torch.tensor([[-1000.0, -1000.0], [1000.0, 1000.0]], dtype=torch.float64)] + devs
    bn = nn.BatchNorm1d(2).double().eval()
    recalibrate(bn, [p + 1e8 for p in parts], progress=False)
    np.testing.assert_allclose(bn.running_var.numpy(), torch.cat(parts).numpy().var(0, ddof=1), rtol=1e-10)


@pytest.mark.parametrize("garbage", [1e12, 1e20])
def test_a_left_out_batch_does_not_set_what_the_kept_means_are_taken_relative_to(garbage):
    """A skipped batch (NaN at layer b) with finite garbage at layer a: its values became a's shift, every kept mean
    was rounded at the garbage's magnitude, and the statistics came out wrong (all zeros at 1e20). Oracle: float64
    NumPy over the kept inputs of layer a."""
    g = torch.Generator().manual_seed(0)
    bad = (torch.randn(64, 2, generator=g, dtype=torch.float64) + garbage,
           torch.full((64, 2), float("nan"), dtype=torch.float64))
    kept = [(torch.randn(64, 2, generator=g, dtype=torch.float64) + 0.5 * (k % 2),
             torch.randn(64, 2, generator=g, dtype=torch.float64)) for k in range(8)]
    model = TwoInputs().eval()
    report = recalibrate(model, [bad] + kept, on_nonfinite="skip", forward=lambda m, b: m(b), progress=False)
    assert report.skipped_batches == 1
    a = torch.cat([x for x, _ in kept]).numpy()
    np.testing.assert_allclose(model.a.running_mean.numpy(), a.mean(0), rtol=1e-12)
    np.testing.assert_allclose(model.a.running_var.numpy(), a.var(0, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_shifted_sums_against_float64(dtype):
    """Above ``_SMALL`` values a float16/bfloat16 input is centred in float32 (one temporary, no float32 copy of
    the input besides) and its moments are those of its values in float64."""
    module = importlib.import_module("bnkit.torch.recalibrate")
    x = (torch.randn(8, 4, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 30)
    x = x.to(dtype)
    assert x.numel() > module._SMALL
    shift = torch.full((4,), 29.5, dtype=torch.float64)
    mean, var = module._batch_moments(x, shift)
    mean = mean + shift
    x64 = x.double()
    want_mean, want_var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), correction=0)
    assert mean.dtype == var.dtype == torch.float64
    assert ((mean - want_mean).abs() / want_var.sqrt()).max() < 1e-6
    torch.testing.assert_close(var, want_var, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_normalize_in_float32_for_the_next_layer(dtype):
    """A float16/bfloat16 BN normalizes in float32 during the pass: normalizing in its own dtype rounds the batch
    mean (~50) to the dtype's ulp and shifts every output the next BN reads by a good fraction of a std.
    Oracle: the same weights and data in float64; the next layer's float64 statistic (the report's ``new_mean``,
    before the buffer rounds it) must agree to the dtype's epsilon in std (measured: 8e-5 / 5e-4; 0.018 / 0.10
    when normalizing in the 16-bit dtype)."""
    torch.manual_seed(3)
    model = trained_like(nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.BatchNorm1d(8)))
    model = model.to(dtype)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(64, 3, generator=g, dtype=torch.float64) * 3 + 50).to(dtype) for _ in range(4)]
    mean, var, _ = reference_stats(copy.deepcopy(model).double(), [d.double() for d in data])["3"]
    report = recalibrate(model, data, progress=False)
    got = report.layers[1]
    assert got.name == "3"
    assert np.max(np.abs(got.new_mean - mean) / np.sqrt(var)) < torch.finfo(dtype).eps


def test_subclass_with_its_own_forward_keeps_it():
    class Scaled(nn.BatchNorm1d):
        calls = 0

        def forward(self, x):
            Scaled.calls += 1
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), Scaled(5), nn.Linear(5, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)).double()
    trained_like(model)
    patched_calls = []
    plain_forward = model[4].forward
    model[4].forward = lambda x: patched_calls.append(1) or plain_forward(x) - 1  # patched on the instance
    patched = model[4].forward
    batches = [torch.randn(n, 3, dtype=torch.float64) + 2 for n in (6, 9)]
    ref = reference_stats(model, batches)
    Scaled.calls, patched_calls[:] = 0, []
    recalibrate(model, batches, progress=False)
    assert Scaled.calls == 2  # its forward ran: the next layer saw its doubled output, as in the reference
    assert len(patched_calls) == 2 and model[4].forward is patched
    assert_matches_reference(model, ref)
    assert all("forward" not in m.__dict__ for m in model[:4]) and not any(m._forward_pre_hooks for m in model)


class Renormish(nn.BatchNorm1d):
    """Batch-Renorm-like: its training forward normalizes with the running statistics and then updates them."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        out = (x - self.running_mean) / (self.running_var + self.eps).sqrt()
        with torch.no_grad():
            self.running_mean.lerp_(x.mean(0), 0.5)
            self.running_var.lerp_(x.var(0), 0.5)
        return out


def test_subclass_reading_its_buffers_runs_every_call_from_the_state_before_the_pass():
    """If its buffers drifted from call to call, the next layer's statistics would depend on the batch order.
    Oracle: PyTorch's training forwards with the subclass's buffers put back before every batch."""
    torch.manual_seed(0)
    model = trained_like(nn.Sequential(nn.Linear(3, 4), Renormish(4), nn.Linear(4, 4), nn.BatchNorm1d(4)).double())
    start = buffers(model)
    batches = [torch.randn(8, 3, dtype=torch.float64) + 3 for _ in range(4)]

    def from_start(m, b):
        m[1].running_mean.copy_(start["1.running_mean"])
        m[1].running_var.copy_(start["1.running_var"])
        return m(b)

    ref = reference_stats(model, batches, from_start)
    assert not np.allclose(ref["3"][0], reference_stats(model, batches)["3"][0], rtol=1e-3)  # drift would show
    recalibrate(model, batches, progress=False)
    assert_matches_reference(model, ref)


@pytest.mark.parametrize("biased", [False, True])
def test_running_var_follows_the_layers_own_rule(biased):
    """One batch: the layer's own training step with momentum=1 writes exactly the same buffers, PyTorch's unbiased
    M2/(n-1) for nn.BatchNorm2d, M2/n for a drop-in layer with Keras/Flax's rule (as from_keras(exact_training=True)
    makes)."""
    from bnkit.torch import BatchNorm2d

    torch.manual_seed(0)
    bn = BatchNorm2d(3, running_var_rule="biased") if biased else nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), bn).double()
    x = 2 + torch.randn(4, 2, 4, 4, dtype=torch.float64)
    own = copy.deepcopy(model)
    own[1].momentum = 1.0
    own.train()
    with torch.no_grad():
        own(x)
    recalibrate(model.eval(), [x], progress=False)
    torch.testing.assert_close(model[1].running_mean, own[1].running_mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(model[1].running_var, own[1].running_var, rtol=1e-12, atol=0)
    assert not model.training


def test_cumulative_average_counts_the_batches_as_update_bn_does():
    """momentum=None: the counter is the average's denominator, reset to the pass's calls as
    torch.optim.swa_utils.update_bn leaves it; a layer with a momentum counts on."""
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(0)
    model = trained_like(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None), nn.Linear(4, 4),
                                       nn.BatchNorm1d(4)).double())
    batches = [torch.randn(n, 3, dtype=torch.float64) for n in (5, 7, 6)]
    peer = copy.deepcopy(model)
    update_bn(batches, peer)
    recalibrate(model, batches, progress=False)
    assert int(model[1].num_batches_tracked) == int(peer[1].num_batches_tracked) == 3
    assert int(model[3].num_batches_tracked) == 123 + 3
    # a drop-in layer's debias=True with momentum=0 is a cumulative average too (weight 1/t on batch t): its
    # counter is reset to the 3 calls, not advanced from the 7 training batches (which would weigh them as 10)
    from bnkit.torch import BatchNorm1d

    debiased = nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4, momentum=0.0, debias=True)).double().train()
    with torch.no_grad():
        for _ in range(7):
            debiased(torch.randn(8, 3, dtype=torch.float64))
    assert int(debiased[1].num_batches_tracked) == 7
    recalibrate(debiased.eval(), batches, progress=False)
    assert int(debiased[1].num_batches_tracked) == 3


def test_tuples_by_default_num_batches_and_no_grad():
    """(inputs, targets) tuples and namedtuples, also moved to a device= (a namedtuple rebuilt from its fields)."""
    from collections import namedtuple

    Batch = namedtuple("Batch", "x y")
    for device in (None, "cpu"):
        model = mixed_model()
        batches = make_batches()
        ref = reference_stats(model, batches[:3])
        grad_enabled = []
        model.register_forward_pre_hook(lambda m, a: grad_enabled.append(torch.is_grad_enabled()))
        data = [(x, torch.zeros(len(x))) if i % 2 else Batch(x, torch.zeros(len(x))) for i, x in enumerate(batches)]
        report = recalibrate(model, data, num_batches=3, device=device, progress=False)
        assert report.batches == 3 and grad_enabled == [False] * 3
        assert_matches_reference(model, ref)


def test_dict_input_model_with_forward():
    class DictNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)
            self.bn = nn.BatchNorm1d(4, affine=False, momentum=None)

        def forward(self, image: torch.Tensor, meta: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
            return self.bn(scale * self.a(image) + self.b(meta))

    torch.manual_seed(0)
    model = DictNet().eval()
    g = torch.Generator().manual_seed(3)
    batches = [{"image": torch.randn(n, 3, generator=g), "meta": torch.randn(n, 2, generator=g)} for n in (4, 7)]
    feed = lambda m, b: m(**b, scale=2.0)  # noqa: E731
    ref = reference_stats(model, batches, feed)
    with pytest.raises(TypeError, match="forward="):
        recalibrate(model, batches, progress=False)
    recalibrate(model, batches, forward=feed, device="cpu")  # batches moved through the dict; a progress bar
    assert_matches_reference(model, ref, rtol=1e-6)


def test_shared_layer_unused_layer_and_skip_of_untracked():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.shared = nn.BatchNorm1d(3)  # called twice per forward
            self.unused = nn.BatchNorm1d(3)
            self.untracked = nn.BatchNorm1d(3, track_running_stats=False)
            self.switched = nn.BatchNorm1d(3)  # switched off after construction: its buffers stay, untouched
            self.switched.track_running_stats = False

        def forward(self, x):
            return self.switched(self.untracked(self.shared(self.fc(self.shared(x)))))

    torch.manual_seed(0)
    model = trained_like(Net())
    batches = [torch.randn(n, 3) * 2 + 1 for n in (4, 6)]
    ref = reference_stats(model, batches)
    unused_before = model.unused.running_mean.clone()
    switched_before = {k: v.clone() for k, v in model.switched.state_dict().items()}
    report = recalibrate(model, batches, progress=False)
    assert all(torch.equal(v, switched_before[k]) for k, v in model.switched.state_dict().items())
    np.testing.assert_allclose(model.shared.running_mean.double().numpy(), ref["shared"][0], rtol=1e-6)
    np.testing.assert_allclose(model.shared.running_var.double().numpy(), ref["shared"][1], rtol=1e-6)
    assert int(model.shared.num_batches_tracked) == 123 + 4  # counting on, as training does
    assert torch.equal(model.unused.running_mean, unused_before)
    assert report.unused_layers == ["unused"]
    assert [r.name for r in report.layers] == ["shared", "unused"]
    findings = {f.layer: f for f in report.findings()}
    assert findings["unused"].severity == "warning" and findings["unused"].code == "recalibrate_unused"
    assert findings["shared"].severity == "info" and findings["shared"].data["samples"] == 20


def test_interruption_leaves_model_untouched():
    model = mixed_model()
    model.fc.train()
    before = buffers(model)
    flags = {n: m.training for n, m in model.named_modules()}
    batches = make_batches()
    with pytest.raises(KeyboardInterrupt):
        recalibrate(model, interrupted_after(batches, 3), progress=False)
    assert_same_state(model, before)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(not bn._forward_pre_hooks and "forward" not in bn.__dict__ for _, bn in bn_layers(model))

    class Boom(RuntimeError):
        pass

    def failing(m, b):
        if b.shape[0] == 2:
            raise Boom
        m(b)

    with pytest.raises(Boom):
        recalibrate(model, batches, forward=failing, progress=False)
    assert_same_state(model, before)


def test_nonfinite_batch_raises_naming_the_layer_or_is_skipped():
    model = mixed_model()
    before = buffers(model)
    batches = make_batches()
    bad = batches[1].clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'bn3'.*batch 1"):
        recalibrate(model, [batches[0], bad, *batches[2:]], progress=False)
    assert_same_state(model, before)

    # Inf appearing only after the first BN layer: the error names the first layer that saw it
    model.fc.weight.data[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'bn1'"):
        recalibrate(model, batches, progress=False)
    model.fc.weight.data[0, 0] = before["fc.weight"][0, 0]

    good = [batches[0], *batches[2:]]
    ref = reference_stats(model, good)
    report = recalibrate(model, [batches[0], bad, *batches[2:]], on_nonfinite="skip", progress=False)
    assert report.skipped_batches == 1 and report.batches == 3
    assert_matches_reference(model, ref)


class _NaNRouted(nn.Module):
    """Batches of fewer than 4 rows reach no BN; a batch holding NaN goes to ``b``, any other to ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.a, self.b = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)

    def forward(self, x):
        h = self.fc(x)
        if len(x) < 4:
            return h
        return self.b(h) if bool(torch.isnan(x).any()) else self.a(h)


def test_batch_counts_with_skipped_batches_and_batches_that_reach_no_layer():
    """Two non-finite batches count as two skipped; a layer reached only by skipped batches is unused (not an
    IndexError); a batch that reaches no BN still counts as a batch run, and data that reaches none leaves
    every layer unused rather than "no batches"."""
    torch.manual_seed(0)
    model = trained_like(_NaNRouted().double())
    before = buffers(model)
    good = [torch.randn(n, 3, dtype=torch.float64) + 1 for n in (8, 6)]
    nan = [torch.randn(8, 3, dtype=torch.float64) for _ in range(2)]
    nan[0][0, 0] = nan[1][5, 2] = float("nan")
    small = torch.randn(3, 3, dtype=torch.float64)
    ref = reference_stats(model, good)["a"]
    report = recalibrate(model, [good[0], nan[0], small, nan[1], good[1]], on_nonfinite="skip", progress=False)
    assert (report.batches, report.skipped_batches) == (3, 2)
    assert report.unused_layers == ["b"]
    (unused,) = [f for f in report.findings() if f.code == "recalibrate_unused"]  # b ran, in skipped batches only
    assert "0 forward calls" not in unused.evidence and "the 2 batch(es) skipped as non-finite" in unused.evidence
    assert all(torch.equal(v, before["b." + k]) for k, v in model.b.state_dict().items())
    np.testing.assert_allclose(model.a.running_mean.numpy(), ref[0], rtol=1e-9)
    np.testing.assert_allclose(model.a.running_var.numpy(), ref[1], rtol=1e-9)
    assert int(model.a.num_batches_tracked) == ref[2]

    report = recalibrate(model, [small, small[:2]], progress=False)
    assert (report.batches, report.skipped_batches) == (2, 0) and report.unused_layers == ["a", "b"]


class _Blowup(nn.Module):
    """Inf wherever a sample's first feature exceeds 3.5: a batch that is finite at the first BN, not the second."""

    def forward(self, x):
        return torch.where(x[:, :1] > 3.5, torch.full_like(x, float("inf")), x)


def test_a_batch_going_nonfinite_deeper_in_the_model_is_left_out_of_every_layer_or_named_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3), _Blowup(), nn.BatchNorm1d(3)).eval()
    good = [torch.randn(16, 3) for _ in range(3)]
    late = torch.randn(16, 3)
    late[0, 0] = 100.0  # finite at layer '0', Inf at layer '2'
    report = recalibrate(model, [good[0], late, *good[1:]], on_nonfinite="skip", progress=False)
    assert report.skipped_batches == 1 and report.layers[0].samples == 48
    x = torch.cat(good).double()  # layer 0 sees the inputs themselves: float64 oracle
    torch.testing.assert_close(model[0].running_mean.double(), x.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(model[0].running_var.double(), x.var(0), rtol=1e-6, atol=0)
    alone = nn.Sequential(nn.BatchNorm1d(3), _Blowup(), nn.BatchNorm1d(3)).eval()
    recalibrate(alone, good, progress=False)  # the good batches only: what every layer must hold
    for a, b in zip(model.buffers(), alone.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    early = torch.randn(16, 3)
    early[3, 1] = float("nan")  # NaN already at layer '0', in a later batch
    with pytest.raises(ValueError, match=r"layer '2' in batch 0"):  # the first bad batch, whatever the layer
        recalibrate(model, [late, early, good[0]], progress=False)


def test_bad_input_is_refused_and_changes_nothing():
    model = mixed_model()
    before = buffers(model)
    batches = make_batches()
    with pytest.raises(ValueError, match="at least 2"):
        recalibrate(model, [batches[0], batches[0][:1]], progress=False)  # bn1 would see one value per channel
    assert_same_state(model, before)
    with pytest.raises(TypeError, match="not a tensor"):
        recalibrate(model, batches[0], progress=False)
    with pytest.raises(ValueError, match="on_nonfinite"):
        recalibrate(model, batches, on_nonfinite="ignore", progress=False)
    for bad in (0, 2.5, float("inf"), float("nan"), True, "3"):  # inf and NaN raised int()'s own errors
        with pytest.raises(ValueError, match=f"num_batches must be a positive integer or None, got {bad!r}"):
            recalibrate(model, batches, num_batches=bad, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate(nn.Linear(2, 2), [torch.randn(3, 2)], progress=False)
    with pytest.raises(RuntimeError):  # wrong shape: PyTorch's own error, nothing changed
        recalibrate(model, [torch.randn(4, 2, 4, 6, 6)], progress=False)
    assert_same_state(model, before)

    class Own(nn.BatchNorm1d):  # a forward of its own: it runs first, and PyTorch's own check refuses the input
        def forward(self, x):
            return super().forward(x)

    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 1D input\)"):  # not an IndexError
        recalibrate(nn.Sequential(Own(4)).eval(), [torch.randn(4)], progress=False)
    with torch.inference_mode():
        frozen = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    with pytest.raises(ValueError, match=r"'1' holds inference tensors"):  # its buffers cannot be written here
        recalibrate(frozen, [torch.randn(8, 3)], progress=False)
    ref = reference_stats(model, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Dropout in eval mode (model.eval() above): nothing to warn about
        recalibrate(model, batches, progress=False)
    assert_matches_reference(model, ref)
    with pytest.warns(UserWarning, match="Dropout"):
        recalibrate(model.train(), batches, progress=False)
    assert model.training and model.drop.training


def test_swa_average_recovers_accuracy_on_digits():
    """Average the weights of two trained MLPs; with stale BN statistics the average fails, recalibrated it works."""
    from sklearn.datasets import load_digits

    from bnkit.torch.zoo import MLP

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1400], perm[1400:]

    def fit(model: nn.Module, seed: int, epochs: int) -> nn.Module:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for idx in train[torch.randperm(len(train), generator=gen)].split(50):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        return model.eval()

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return (model.eval()(x[test]).argmax(1) == y[test]).float().mean().item()

    torch.manual_seed(0)
    base = fit(MLP(hidden=(64, 32)), seed=0, epochs=2)
    a, b = fit(copy.deepcopy(base), seed=1, epochs=4), fit(copy.deepcopy(base), seed=2, epochs=4)
    avg = copy.deepcopy(base)  # AveragedModel(use_buffers=False) keeps the buffers of the module it copied
    with torch.no_grad():
        for pa, pb, p in zip(a.parameters(), b.parameters(), avg.parameters()):
            p.copy_((pa + pb) / 2)
    stale = accuracy(avg)
    for _, bn in bn_layers(avg):
        bn.reset_running_stats()  # the statistics of a freshly built module
    fresh = accuracy(avg)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[train], y[train]), batch_size=64)
    report = recalibrate(avg, loader, progress=False)
    recovered = accuracy(avg)
    assert report.layers[0].samples == len(train) and report.batches == len(loader)
    assert fresh < 0.75 and recovered > 0.95
    assert recovered >= stale and recovered >= max(accuracy(a), accuracy(b)) - 0.01  # as good as the parents


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_statistics_folded_in_chunks(monkeypatch, on_nonfinite):
    """Many batches folded a few at a time (Chan merge of the chunks), a NaN batch in a later chunk."""
    monkeypatch.setattr(importlib.import_module("bnkit.torch.recalibrate"), "_FOLD_EVERY", 3)
    model = mixed_model()
    batches = make_batches(sizes=(4, 7, 2, 5, 3, 9, 6, 2, 8, 3), seed=5)
    bad = batches[7].clone()
    bad[1, 0, 2, 3, 4] = float("inf")
    if on_nonfinite == "raise":
        before = buffers(model)
        with pytest.raises(ValueError, match=r"'bn3'.*batch 7"):
            recalibrate(model, [*batches[:7], bad, *batches[8:]], progress=False)
        assert_same_state(model, before)
        return
    ref = reference_stats(model, batches[:7] + batches[8:])
    report = recalibrate(model, [*batches[:7], bad, *batches[8:]], on_nonfinite="skip", progress=False)
    assert report.batches == 9 and report.skipped_batches == 1
    assert {r.name: r.samples for r in report.layers}["bn1"] == sum(len(b) for b in batches) - len(bad)
    assert_matches_reference(model, ref)


def test_progress_bar_only_on_long_passes(monkeypatch):
    """A rich bar counting batches once the pass has run _PROGRESS_AFTER seconds; a short pass draws nothing."""
    import io

    import rich
    from rich.console import Console

    module = importlib.import_module("bnkit.torch.recalibrate")
    batches = make_batches()

    def drawn(**kwargs) -> str:
        out = io.StringIO()
        monkeypatch.setattr(rich, "_console", Console(file=out, force_terminal=True, width=100))
        recalibrate(mixed_model(), batches, **kwargs)
        return out.getvalue()

    monkeypatch.setattr(module, "_PROGRESS_AFTER", 3600.0)  # a pass shorter than that, however loaded the machine
    assert drawn() == ""
    monkeypatch.setattr(module, "_PROGRESS_AFTER", 0.0)
    text = drawn()
    assert "recalibrating BatchNorm" in text and f"{len(batches)}/{len(batches)}" in text
    text = drawn(num_batches=2)  # the pass runs 2 of the 4 batches: the total is 2
    assert "2/2" in text and f"/{len(batches)}" not in text


def test_layers_called_with_keyword_input():
    """``bn(input=x)`` is valid PyTorch; the stand-in forward and the subclass pre-hook both accept it."""
    class Doubled(nn.BatchNorm1d):
        def forward(self, input):  # noqa: A002
            return 2 * super().forward(input)

    class KwNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn, self.sub = nn.Linear(3, 4), nn.BatchNorm1d(4), Doubled(4)

        def forward(self, x):
            return self.sub(input=self.bn(input=self.fc(x)))

    torch.manual_seed(0)
    model = trained_like(KwNet()).double()
    batches = [torch.randn(n, 3, dtype=torch.float64) + 1 for n in (5, 8)]
    ref = reference_stats(model, batches)
    report = recalibrate(model, batches, progress=False)
    assert report.unused_layers == []
    assert_matches_reference(model, ref)


def test_statistics_beyond_float64_when_merged_name_the_layer_and_change_nothing():
    """Finite float64 batches near 5e152: each variance fits, their weighted sum does not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3)).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randn(4, 3, 8, 8, dtype=torch.float64) * 5e152 for _ in range(40)]
    assert all(torch.isfinite(x).all() for x in data)
    with pytest.raises(ValueError, match=r"BatchNorm layer '0': its statistics overflow float64"):
        recalibrate(model, data, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # one batch whose own variance overflows (values ~1e160, finite mean) is a non-finite batch: named under
    # "raise", left out under "skip", with the rest's statistics (float64 oracle)
    rest = [torch.randn(4, 3, 8, 8, dtype=torch.float64) + 2 for _ in range(3)]
    huge = torch.randn(4, 3, 8, 8, dtype=torch.float64) * 1e160
    with pytest.raises(ValueError, match=r"non-finite .* layer '0' in batch 1"):
        recalibrate(model, [rest[0], huge, *rest[1:]], progress=False)
    report = recalibrate(model, [rest[0], huge, *rest[1:]], on_nonfinite="skip", progress=False)
    assert (report.batches, report.skipped_batches) == (3, 1)
    x = torch.cat(rest).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(model[0].running_var, x.var(dim=1), rtol=1e-9, atol=0)
    torch.testing.assert_close(model[0].running_mean, x.mean(dim=1), rtol=0, atol=1e-12)


def test_statistics_beyond_float16_are_refused_and_change_nothing():
    """A float16 model on 12-bit pixel values: the first BN's variance (~1.4e6) does not fit its buffer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    model = model.half().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randint(0, 4096, (8, 1, 10, 10)).half() for _ in range(3)]
    with pytest.raises(ValueError, match=r"'1'.*exceed torch.float16's range.*recalibrate a float32 copy"):
        recalibrate(model, data, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    scaled = [x / 4096 for x in data]  # in range: recalibrates, every buffer finite
    recalibrate(model, scaled, progress=False)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    # the mean too: a float16 BN fed float32 activations near 7e4 (variance ~1) would get running_mean = inf
    mixed = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        mixed[0].bias.fill_(7e4)
    mixed[1].half()
    before = {k: v.clone() for k, v in mixed.state_dict().items()}
    with pytest.raises(ValueError, match=r"'1'.*max \|mean\| 7e\+04.*exceed torch.float16's range"):
        recalibrate(mixed, [torch.randn(8, 3) for _ in range(2)], progress=False)
    assert all(torch.equal(v, before[k]) for k, v in mixed.state_dict().items())
    # a float32 model: the way out is float64 (a float32 copy is what it is already)
    wide = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    huge = [torch.randn(8, 3) * 1e20 for _ in range(2)]
    with pytest.raises(ValueError, match=r"exceed torch.float32's range.*recalibrate a float64 copy") as info:
        recalibrate(wide, huge, progress=False)
    assert "float32 copy" not in str(info.value)
    recalibrate(wide.double(), [x.double() for x in huge], progress=False)
    assert torch.isfinite(wide[1].running_var).all() and wide[1].running_var.max() > torch.finfo(torch.float32).max


class ReassigningBN(nn.BatchNorm1d):
    """Research-code style: its own training forward updates the statistics by reassigning the buffers."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        mean, var = x.mean(0), x.var(0, unbiased=False)
        self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * mean
        self.running_var = (1 - self.momentum) * self.running_var + self.momentum * x.var(0)
        self.num_batches_tracked = self.num_batches_tracked + 1
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class LastMax(nn.Module):
    """A non-BN module that reassigns its buffer in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("last_max", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.last_max = x.detach().abs().max()
        return x


def test_forward_that_reassigns_buffers():
    torch.manual_seed(0)
    model = trained_like(nn.Sequential(nn.Linear(3, 4), LastMax(), ReassigningBN(4), nn.BatchNorm1d(4)).double())
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    before = buffers(model)
    batches = [torch.randn(n, 3, dtype=torch.float64) + 2 for n in (8, 5, 7)]
    ref = reference_stats(model, batches)
    with pytest.raises(KeyboardInterrupt):
        recalibrate(model, interrupted_after(batches, 2), progress=False)
    assert_same_state(model, before)
    assert all(v is tensors[k] for k, v in model.state_dict(keep_vars=True).items())  # the same tensors attached

    recalibrate(model, batches, progress=False)
    assert_matches_reference(model, ref)
    assert all(v is tensors[k] for k, v in model.state_dict(keep_vars=True).items())
    assert float(model[1].last_max) == 0.0  # not a BN statistic: as before the pass
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model)


def test_a_skipped_batch_leaves_nothing_in_drop_in_layers_without_renorm():
    """Ghost-batch drop-ins get no per-call buffer restore (their output never reads their buffers): a skipped
    non-finite batch must still leave exactly what a run without it gives."""
    from bnkit.torch import convert_bn

    torch.manual_seed(0)
    model = convert_bn(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3),
                                     nn.BatchNorm1d(3)), virtual_batch_size=4)
    data = [torch.randn(8, 4) for _ in range(5)]
    data[2][0, 0] = float("nan")
    clean = copy.deepcopy(model)
    assert recalibrate(model, data, on_nonfinite="skip", progress=False).batches == 4
    recalibrate(clean, [d for i, d in enumerate(data) if i != 2], progress=False)
    for (k, v), w in zip(model.state_dict().items(), clean.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("extras", [{"renorm": True, "rmax": 1.5, "dmax": 0.5},
                                    {"renorm": True, "renorm_schedule": (2, 4, 6)}, {"virtual_batch_size": 3}])
def test_drop_in_layers_normalize_as_plain_batchnorm_and_a_skipped_batch_leaves_nothing(extras):
    """Renorm's r/d (which pull the output toward the statistics being replaced) and ghost batches are set aside:
    the layers after them are measured as at inference, where every layer normalizes with the new statistics.
    Oracle: the same model with plain nn.BatchNorm1d layers; its counter goes on from the old one."""
    from bnkit.torch import BatchNorm1d

    torch.manual_seed(0)
    model = trained_like(nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4, **extras), nn.Linear(4, 4),
                                       nn.BatchNorm1d(4)).double())
    model[1].running_mean.add_(3.0)  # stale statistics, far from the data's: renorm's r/d would be clipped
    before = buffers(model)
    batches = [torch.randn(8, 3, dtype=torch.float64) + 1 for _ in range(6)]
    ref = reference_stats(revert(model, before), [b for i, b in enumerate(batches) if i != 1])
    batches[1][0, 0] = float("nan")
    report = recalibrate(model, batches, on_nonfinite="skip", progress=False)
    assert (report.batches, report.skipped_batches) == (5, 1)
    assert_matches_reference(model, ref)
    assert int(model[1].num_batches_tracked) == 123 + 5  # a renorm_schedule goes on from its step
    assert type(model[1]) is BatchNorm1d and "forward" not in vars(model[1])


def revert(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    from bnkit.torch import revert_bn

    plain = revert_bn(copy.deepcopy(model))
    plain.load_state_dict(state)
    return plain


def test_empty_bn_input_is_ignored_as_pytorch_does():
    class Routed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn_all, self.bn_pos = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn_pos(self.bn_all(self.fc(x))[x[:, 0] > 0])  # rows routed to a branch; may be none

    torch.manual_seed(0)
    model = trained_like(Routed().double())
    batches = [torch.randn(16, 3, dtype=torch.float64) + 1, torch.randn(8, 3, dtype=torch.float64) - 5,
               torch.randn(16, 3, dtype=torch.float64) + 1]
    ref = reference_stats(model, [batches[0], batches[2]])
    ref["bn_all"] = reference_stats(model, batches)["bn_all"]
    report = recalibrate(model, batches, progress=False)
    assert report.batches == 3
    assert_matches_reference(model, ref)  # bn_pos: 2 calls; the empty input gives no statistics and no count


def test_debias_layer_loaded_without_num_batches_tracked_is_recalibrated():
    from bnkit.torch import BatchNorm1d

    torch.manual_seed(0)
    model = trained_like(nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4, debias=True)).double())
    model[1].num_batches_tracked.zero_()  # as loaded from a checkpoint without it; the statistics are not 0 / 1
    batches = [torch.randn(n, 3, dtype=torch.float64) + 2 for n in (8, 6, 7)]
    ref = reference_stats(revert(model, model.state_dict()), batches)
    before = buffers(model)
    bad = [batches[0], batches[1] * float("nan")]
    with pytest.raises(ValueError, match="non-finite"):
        recalibrate(model, bad, progress=False)
    assert_same_state(model, before)
    assert model[1].debias
    recalibrate(model, batches, progress=False)
    assert_matches_reference(model, ref)
    assert model[1].debias


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's first import: torch.jit internals
def test_a_compiled_model_is_recalibrated_and_audited_through_the_module_it_runs():
    """torch.compile(model, fullgraph=True): the per-call stand-ins made dynamo recompile on every batch until its
    limit (FailOnRecompileLimitHit after 8 batches); the pass runs the module inside, with the same statistics."""
    from bnkit.torch import audit

    model = mixed_model()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    batches = make_batches(sizes=(5, 16, 2, 9) * 3)
    ref = reference_stats(model, batches)
    recalibrate(compiled, batches, progress=False)
    assert_matches_reference(model, ref)
    report = audit(compiled, torch.cat(batches[:4]), batch_size=8)
    assert report.depth == "data" and report.batches == 4 and {s.layer for s in report.shifts} == set(ref)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("how", ["inside AveragedModel", "in place"])
def test_a_model_compiled_inside_a_wrapper_or_in_place_is_recalibrated(how):
    """AveragedModel(torch.compile(m)) and m.compile(): the pass reaches the module and calls it eagerly (both
    failed with dynamo's 'Operator does not support running with fake tensors' under fullgraph=True); the
    in-place compiled call is back afterwards."""
    from torch.optim.swa_utils import AveragedModel

    model = mixed_model()
    batches = make_batches(sizes=(5, 16, 2, 9) * 3)
    ref = reference_stats(model, batches)
    if how == "in place":
        model.compile(backend="eager", fullgraph=True)
        compiled_call = model._compiled_call_impl
        recalibrate(model, batches, progress=False)
        assert model._compiled_call_impl is compiled_call
        target = model
    else:
        averaged = AveragedModel(torch.compile(model, backend="eager", fullgraph=True))
        recalibrate(averaged, batches, progress=False)
        target = averaged.module._orig_mod
    assert_matches_reference(target, ref)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's first import: torch.jit internals
def test_batches_go_to_the_first_device_of_a_parallel_wrapper_at_any_depth():
    """DataParallel/DDP sent each batch to their first device; recalibrate runs the module inside and sends the
    batches there itself, also when the wrapper sits inside torch.compile or AveragedModel (device_ids set by
    hand: this machine has no GPU; the oracle is the wrapper's own attribute)."""
    from torch.optim.swa_utils import AveragedModel

    from bnkit.torch.modules import parallel_device

    parallel = nn.DataParallel(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    parallel.device_ids = [torch.device("cuda", 1)]  # on a GPU machine: the ints DataParallel stores
    for wrapped in (parallel, torch.compile(parallel, backend="eager"), AveragedModel(parallel)):
        assert parallel_device(wrapped) == torch.device("cuda", 1)
    assert parallel_device(parallel.module) is None


def test_the_default_forward_sends_batches_to_the_models_one_device_and_a_forward_of_ones_own_gets_them_as_they_come():
    """With the default forward, batches go where all the model's tensors are (a CUDA model fed CPU batches, as the
    audit does; tests/torch/test_cuda.py runs that on a GPU); a model spread over devices, or a forward= of one's
    own, gets them untouched. Oracle: the devices ``Tensor.to`` is asked for, recorded by __torch_function__, and
    the float64 moments of all the data either way."""
    from bnkit.torch.modules import sole_device

    asked = []

    class Spy(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to and any(args[0] is b for b in data):  # the batches, not what the pass moves
                asked.extend(a for a in (*args[1:], *(kwargs or {}).values()) if isinstance(a, torch.device))
            return super().__torch_function__(func, types, args, kwargs)

    torch.manual_seed(0)
    data = [torch.randn(16, 3).as_subclass(Spy) for _ in range(3)]
    every = torch.cat([b.as_subclass(torch.Tensor) for b in data]).double()
    for forward, moved in ((None, [torch.device("cpu")] * 3), (lambda m, b: m(b), [])):
        asked.clear()
        bn = nn.BatchNorm1d(3)
        recalibrate(bn, data, forward=forward, progress=False)
        assert asked == moved
        torch.testing.assert_close(bn.running_mean.double(), every.mean(0), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(bn.running_var.double(), every.var(0), rtol=1e-6, atol=1e-7)
    spread = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3, device="meta"))
    assert sole_device(spread) is None and sole_device(nn.ReLU()) is None
    assert sole_device(spread[0]) == torch.device("cpu") and sole_device(spread[1]) == torch.device("meta")


def test_batches_moved_to_the_cpu_are_copied_synchronously():
    """A device-to-host copy made with non_blocking=True may be read before it lands; towards an accelerator the
    stream orders it. Oracle: the keyword the copy is asked with, recorded by __torch_function__."""
    from bnkit.torch.modules import to_device

    asked = []

    class Spy(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to:
                asked.append((kwargs or {}).get("non_blocking"))
            return super().__torch_function__(func, types, args, kwargs)

    x = torch.randn(2, 3).as_subclass(Spy)
    to_device({"x": x, "pair": (x, x)}, torch.device("cpu"))
    assert asked == [False, False, False]
    to_device(x, torch.device("meta"))  # any non-CPU device: asynchronous
    assert asked[-1] is True


class PackedGRUBN(nn.Module):
    """A GRU over a PackedSequence, its packed outputs batch-normalized (DeepSpeech's BN over packed time steps)."""

    def __init__(self):
        super().__init__()
        self.gru, self.bn = nn.GRU(4, 6), nn.BatchNorm1d(6)

    def forward(self, packed):
        from torch.nn.utils.rnn import PackedSequence

        out, _ = self.gru(packed)
        return PackedSequence(self.bn(out.data), out.batch_sizes, out.sorted_indices, out.unsorted_indices)


def test_packed_sequence_batches_reach_the_model_whole():
    """Before: the default forward took a PackedSequence (a namedtuple) for an (inputs, ...) tuple and fed
    the model its packed data alone, which a GRU runs as one unbatched sequence: other statistics, no error.
    Oracle: the float64 moments of what the BN normalizes."""
    from torch.nn.utils.rnn import pack_sequence

    torch.manual_seed(0)
    data = [pack_sequence([torch.randn(int(n), 4) * 3 + 1 for n in torch.randint(1, 7, (8,))], enforce_sorted=False)
            for _ in range(4)]
    net = PackedGRUBN()
    recalibrate(net, data)
    with torch.no_grad():
        h = torch.cat([net.gru(p)[0].data for p in data]).double()
    torch.testing.assert_close(net.bn.running_mean.double(), h.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.bn.running_var.double(), h.var(0), rtol=1e-5, atol=1e-6)
    paired = copy.deepcopy(net)  # (packed, targets) batches, as a packing collate_fn yields
    recalibrate(paired, [(p, torch.zeros(8)) for p in data])
    torch.testing.assert_close(paired.bn.running_mean, net.bn.running_mean, rtol=0, atol=0)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_a_single_inputs_targets_batch_passed_as_data_fails_with_a_note_saying_so():
    """recalibrate(model, (x, y)) takes x and then y for batches: the model's own error on y named neither the batch
    nor the mistake (review). The error keeps its type and gains a note; nothing changes. Oracle: the model's
    state before the call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with pytest.raises(RuntimeError) as info:
        recalibrate(model, (x, y), progress=False)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "the forward failed on data batch 1 (a tensor of shape (16,))" in notes
    assert "data is a pair of tensors, each taken for a batch" in notes and "[batch]" in notes
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_named_before_anything_runs():
    """recalibrate(..., device="cuda") on a CPU-only build raised torch's 'Torch not compiled with CUDA enabled'
    AssertionError from deep in the pass. Oracle: torch.cuda.is_available(), and the model's state before."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"device='cuda': CUDA is not available"):
        recalibrate(model, [torch.randn(8, 3)], device="cuda", progress=False)
    with pytest.raises(ValueError, match=r"device=0: an accelerator index, and torch says"):
        recalibrate(model, [torch.randn(8, 3)], device=0, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.training


def test_a_model_with_uninitialized_lazy_modules_is_refused_unchanged():
    """The pass ran the LazyLinear's first forward: new random weights and a new class in the caller's model, also
    when the pass then failed, and statistics measured behind them; audit and fold_bn refuse such models."""
    model = nn.Sequential(nn.LazyLinear(4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"uninitialized lazy modules \(0\): the pass would create their parameters"):
        recalibrate(model, [torch.randn(8, 3)], progress=False)
    assert type(model[0]) is nn.LazyLinear and nn.parameter.is_lazy(model[0].weight)
    assert model[1].num_batches_tracked == 0 and (model[1].running_mean == 0).all()
    model(torch.randn(8, 3))  # initialized by the caller's own forward: recalibrated as any model
    report = recalibrate(model, [torch.randn(8, 3), torch.randn(8, 3)], progress=False)
    assert report.batches == 2


def test_a_model_on_the_meta_device_is_refused_by_name():
    """Built on device='meta' (shapes, no values) before its weights are loaded: recalibrate ran into aten's
    'attempted to run this operator with Meta tensors'; now the refusal the audit and fold give, before the pass."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    for data in ([torch.randn(8, 4)], [torch.randn(8, 4, device="meta")]):
        with pytest.raises(ValueError, match=r"the model holds meta tensors \(0.weight, .*load real weights first"):
            recalibrate(model, data, progress=False)


def test_numpy_batches_are_read_as_the_audit_reads_them():
    """(x, y) batches of NumPy arrays with the default forward; a forward= of one's own gets them as they come.
    Oracle: the float64 NumPy mean and unbiased variance of all the inputs."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(40, 3))  # float64, NumPy's default: floating arrays come in the model's dtype
    batches = [(x[:16], np.arange(16)), (x[16:], np.arange(24))]
    for forward in (None, lambda model, batch: model(torch.from_numpy(batch[0]).float())):
        bn = nn.BatchNorm1d(3)
        recalibrate(nn.Sequential(bn), batches, forward=forward)
        np.testing.assert_allclose(bn.running_mean.numpy(), x.mean(0), rtol=1e-6)
        np.testing.assert_allclose(bn.running_var.numpy(), x.var(0, ddof=1), rtol=1e-6)
    with pytest.raises(TypeError, match="not an array; wrap it"):
        recalibrate(nn.Sequential(nn.BatchNorm1d(3)), x)
    with pytest.raises(ValueError, match=r"one \(inputs, targets\) batch goes in a list"):
        recalibrate(nn.Sequential(nn.BatchNorm1d(3)), (x, rng.normal(size=(40, 2))))


def test_num_batches_beyond_sys_maxsize_is_all_the_data():
    """islice refused a limit over sys.maxsize ('Stop argument for islice() must be None or an integer'), where
    sys.maxsize itself ran every batch. Oracle: the float64 reference over all the batches."""
    model = mixed_model()
    batches = make_batches()
    ref = reference_stats(model, batches)
    report = recalibrate(model, batches, num_batches=2**63, progress=False)
    assert report.batches == len(batches)
    assert_matches_reference(model, ref)


@pytest.mark.parametrize("old_var,eps", [(-1.0, 1e-5), (0.0, 0.0)])
def test_the_report_of_a_layer_with_a_damaged_variance_warns_nothing(old_var, eps):
    """Review: a negative running_var (or 0 with eps 0), what recalibration is for, made the report's figures warn
    (invalid sqrt, division by zero), and under -W error `bnkit recalibrate` exited 1 with a traceback after writing
    its file. Oracle: the closed forms, NaN for the shift in old standard deviations of a negative variance and inf
    for a division by 0; the statistics as PyTorch's training mode gives them over the whole data in one batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, eps=eps))
    model[1].running_var.fill_(old_var)
    x = torch.randn(50, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = recalibrate(model, [x])
        layer = report.layers[0]
        shift, ratio = layer.mean_shift, layer.var_ratio
        str(report)
    assert math.isnan(shift) if old_var < 0 else math.isinf(shift)
    assert (math.isinf(ratio[0]) and math.isinf(ratio[1])) if old_var == 0 else ratio[0] < 0
    with torch.no_grad():
        h = model[0](x).double()
    torch.testing.assert_close(model[1].running_var.double(), h.var(0), rtol=1e-6, atol=0)
