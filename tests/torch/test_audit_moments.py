"""The audit's batch-statistics stand-in against PyTorch's own training-mode BatchNorm (float64 oracle)."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import numpy as np
from _helpers import stand_in_pass

from bnkit.torch import audit, audit_moments
from bnkit.torch.audit_data import _noise
from bnkit.torch.audit_moments import _var_from_invstd


# shapes by path on the CPU: the kernel (64, 5) ... (4, 5, 3, 4, 5); rows (512, 5, 12), (64, 5, 4, 4, 4); centred
# (8, 5, 40, 40) and the channels-last 4-d ones beyond the kernel's bounds
@pytest.mark.parametrize("shape", [(64, 5), (16, 5, 3), (8, 5, 2, 2), (6, 5, 7, 9), (4, 5, 3, 4, 5), (8, 5, 40, 40),
                                   (512, 5, 12), (64, 5, 4, 4, 4), (64, 5, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("kernel", [True, False])  # False: as on a device without the kernel and rows paths
def test_stand_in_normalizes_like_training_mode_and_keeps_exact_moments(shape, dtype, affine, kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(audit_moments, "_KERNEL_STATS_DEVICES", ())
        monkeypatch.setattr(audit_moments, "_ROWS_DEVICES", ())
    torch.manual_seed(0)
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](5, affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
    bn.eval()
    if dtype == torch.float64:
        bn.double()  # PyTorch's own layers refuse float64 input with float32 parameters
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 40).to(dtype)
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    buffers = {k: b.clone() for k, b in bn.named_buffers()}
    (out,), col = stand_in_pass(bn, x)
    assert out.dtype == dtype and out.shape == x.shape
    x64 = x.double()
    w = bn.weight.double() if affine else None
    b = bn.bias.double() if affine else None
    ref = F.batch_norm(x64, None, None, w, b, True, 0.0, bn.eps)
    # float32: x near 40 is kept to ~4e-6, so outputs scaled by up to 2/3 are ~1e-5 off whatever the thread count
    tol = {torch.bfloat16: 2e-2, torch.float32: 5e-5, torch.float64: 1e-9}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    dims = [0] + list(range(2, len(shape)))
    moments = col.pool()
    assert moments.count == x64.numel() // 5
    torch.testing.assert_close(torch.from_numpy(moments.mean), x64.mean(dims), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(moments.var), x64.var(dims, correction=0), rtol=1e-4, atol=1e-6)
    for k, v in bn.named_buffers():  # nothing the layer keeps was touched
        assert torch.equal(v, buffers[k]), k
    assert "forward" not in vars(bn)  # the stand-in is gone


@pytest.mark.parametrize("path", ["kernel", "rows", "centred"])
def test_tiny_and_zero_variances_are_kept_to_a_fraction_of_eps(path, monkeypatch):
    """Every path keeps the variance (the kernel's from ``1 / sqrt(var + eps)``) exact to about 1e-7 (var + eps)."""
    if path != "kernel":
        monkeypatch.setattr(audit_moments, "_KERNEL_STATS_DEVICES", ())
    if path == "centred":
        monkeypatch.setattr(audit_moments, "_ROWS_DEVICES", ())
    torch.manual_seed(1)
    bn = nn.BatchNorm1d(3).eval()
    std = torch.tensor([1e-4, 0.0, 10.0], dtype=torch.float64)
    x = (torch.randn(64, 3, dtype=torch.float64) * std + torch.tensor([5.0, -2.0, 1e3])).float()
    _, col = stand_in_pass(bn, x, x[:32] * 2)
    x64 = torch.cat([x, x[:32] * 2]).double()
    var = x64.var(0, correction=0).numpy()
    moments = col.pool()
    assert (abs(moments.var - var) <= 1e-6 * (var + bn.eps)).all(), (moments.var, var)
    per_call = col.batch_vars()  # unbiased, per call
    ref = torch.stack([x.double().var(0), (x[:32] * 2).double().var(0)]).numpy()
    assert (abs(per_call - ref) <= 1e-6 * (ref + bn.eps)).all(), (per_call, ref)
    assert 0 <= per_call[0, 1] <= 1e-6 * bn.eps  # the constant channel


def test_var_from_invstd_is_the_closed_form_clipped_at_zero():
    eps = 1e-5
    above = np.nextafter(np.float32(1 / np.sqrt(eps)), np.float32(np.inf))  # a zero variance rounded up
    invstd = np.array([1 / np.sqrt(4.0 + eps), 1 / np.sqrt(eps), above], dtype=np.float32).astype(np.float64)
    assert 1 / invstd[2] ** 2 - eps < 0  # the clip is exercised
    var = _var_from_invstd(invstd.copy(), eps)
    np.testing.assert_allclose(var[0], 4.0, rtol=1e-6)
    assert abs(var[1]) <= 1e-6 * eps and var[2] == 0.0


@pytest.mark.parametrize("shape,dtype,path", [
    ((64, 512), torch.float32, "kernel"),  # one value per channel and sample
    ((8, 4, 3, 3), torch.float64, "kernel"),  # 9 values per sample
    ((400, 16, 3, 3), torch.float32, "kernel"),  # 9 values per sample, 57600 in all
    ((400, 16, 2, 5), torch.float32, "rows"),  # 10 values per sample, 64000 in all
    ((8, 4, 10), torch.float32, "kernel"),  # 320 values in all
    ((32, 8, 8, 8), torch.float32, "kernel"),  # 16384 in all, 2048 per channel: inclusive
    ((64, 8, 8, 8), torch.float32, "rows"),  # 32768 in all, 64 per sample
    ((64, 8, 8, 9), torch.float32, "rows"),  # 36864 in all, 72 per sample
    ((64, 8, 16, 8), torch.float32, "rows"),  # 128 per sample: inclusive
    ((64, 8, 16, 9), torch.float32, "centred"),  # 144 per sample
    ((64, 8, 8, 8), torch.float32, "centred-channels-last"),  # rows need a contiguous input
    ((4096, 2), torch.float32, "kernel"),
    ((4097, 2), torch.float32, "rows"),  # more values per channel than the kernel's statistics keep exact
    ((8192, 8), torch.float32, "rows"),  # 65536 in all: inclusive
    ((8193, 8), torch.float32, "centred"),
    ((64, 512), torch.bfloat16, "centred"),
])
def test_stand_in_takes_each_path_within_its_bounds(shape, dtype, path, monkeypatch):
    calls = []
    for name in ("_centred", "_channel_rows"):
        original = getattr(audit_moments, name)
        monkeypatch.setattr(audit_moments, name, lambda x, f=original, name=name: calls.append(name) or f(x))
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](shape[1]).eval()
    if dtype == torch.float64:
        bn.double()
    x = torch.randn(shape).to(dtype)
    if path.endswith("channels-last"):
        x = x.contiguous(memory_format=torch.channels_last)
    _, col = stand_in_pass(bn, x)
    assert calls == {"kernel": [], "rows": ["_channel_rows"]}.get(path, ["_centred"])
    assert col.samples[0][2] == (path == "kernel")  # the call kept 1/sqrt(var + eps) exactly when the kernel ran


@pytest.mark.parametrize("shape,layout", [((100_000, 2), None), ((64, 2, 40, 40), None),
                                          ((64, 2, 40, 40), torch.channels_last)])
def test_many_offset_samples_keep_their_mean_and_variance(shape, layout):
    """Inputs with many values per channel and a large offset: exact where PyTorch's CPU statistics are not."""
    torch.manual_seed(2)
    x = (torch.randn(shape, dtype=torch.float64) * 1e-2 + 1e4).float()
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    bn = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(2).eval()
    _, col = stand_in_pass(bn, x)
    x64 = x.double()
    dims = [0] + list(range(2, len(shape)))
    moments = col.pool()
    std = x64.std(dims, correction=0).numpy()
    assert (abs(moments.mean - x64.mean(dims).numpy()) <= 0.1 * std).all()  # float32 resolution of 1e4: 0.05 std
    np.testing.assert_allclose(moments.var, std ** 2, rtol=0.02)


# [1, ...]: a routed branch given one row in a batch; that call has no within-batch spread and weight n - 1 = 0
@pytest.mark.parametrize("sizes", [[5, 9, 16, 7], [1, 9, 16, 7]])
def test_noise_is_the_between_batch_spread_scaled_to_the_training_batch_size(sizes):
    """``_noise`` against the documented formulas, written out per call and channel."""
    torch.manual_seed(3)
    bn = nn.BatchNorm1d(3, momentum=0.2).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.0]))
    batches = [torch.randn(b, 3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + i
               for i, b in enumerate(sizes)]
    _, col = stand_in_pass(bn, *(b.float() for b in batches))
    data = [b.float().double().numpy() for b in batches]
    n = np.array([len(b) for b in data], dtype=np.float64)
    k, b_train, eps, m = len(data), 32, bn.eps, 0.2
    var_r = bn.running_var.double().numpy() + eps
    means = np.array([b.mean(0) for b in data])
    spread = [i for i in range(k) if n[i] > 1]  # the terms of weight n - 1 > 0
    varis = {i: data[i].var(0, ddof=1) for i in spread}
    m_bar = sum(n[i] * means[i] for i in range(k)) / n.sum()
    v_bar = sum((n[i] - 1) * varis[i] for i in spread) / (n - 1).sum()
    s2_mean = sum(n[i] * (means[i] - m_bar) ** 2 for i in range(k)) / (k - 1)
    s2_var = sum((n[i] - 1) * (varis[i] - v_bar) ** 2 for i in spread) / (k - 1)
    factor = np.sqrt(m / (2 - m))  # an EMA keeps this fraction of one batch statistic's std
    want_mean = np.sqrt(np.mean((factor * np.sqrt(s2_mean / b_train / var_r)) ** 2))
    want_var = np.sqrt(np.mean((factor * np.sqrt(s2_var / (b_train - 1)) / (v_bar + eps)) ** 2))
    want_f = np.median(s2_mean / (v_bar + eps))  # the ANOVA F: within-batch mean square v_bar for (N, C) inputs
    got_mean, got_var, got_f = _noise(col, bn, b_train, var_r)
    np.testing.assert_allclose([got_mean, got_var, got_f], [want_mean, want_var, want_f], rtol=1e-5)


def test_first_nonfinite_call_is_the_call_that_overflowed_not_the_first_call():
    """The data_nonfinite finding names the layer the overflow reached first by this call number: a layer whose
    first call was finite and whose second overflowed must give the second call's number."""
    bn = nn.BatchNorm1d(3).eval()
    x = torch.randn(16, 3)
    _, col = stand_in_pass(bn, x, torch.full((16, 3), float("inf")), x)
    assert col.pool().count == 0  # nothing pooled: the layer is one the audit looks at this for
    assert col.first_nonfinite_call() == col.order[1] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stand_in_adds_eps_like_training_mode(dtype):
    """Float16/bfloat16 inputs get PyTorch's eval kernel on the batch moments: with the layer's eps, as training mode
    has. A constant channel is then beta (not 0/0 = NaN for the next layer), and a variance near eps is scaled by
    1 / sqrt(var + eps)."""
    torch.manual_seed(4)
    bn = nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.25, -1.0, 0.5]))
    x = (torch.randn(64, 3, dtype=torch.float64) * torch.tensor([0.0, 3e-3, 1.0]) + torch.tensor([2.0, 0.0, 1.0]))
    x = x.to(dtype)
    (out,), _ = stand_in_pass(bn, x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = F.batch_norm(x.double(), None, None, bn.weight.double(), bn.bias.double(), True, 0.0, bn.eps)
    assert torch.equal(out[:, 0].double(), torch.full((64,), 0.25, dtype=torch.float64))
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


class _Wrapping(nn.BatchNorm1d):
    """A BN subclass whose own forward normalizes nothing itself: a stock child BN does."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.inner = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * 2.0)


@pytest.mark.parametrize("path,length,dtype", [("kernel", 4, torch.float32), ("rows", 40, torch.float32),
                                               ("centred", 40, torch.float32), ("centred", 40, torch.bfloat16)])
def test_a_stand_in_inside_a_layer_with_its_own_forward_is_not_taken_for_that_layer_normalizing(path, length, dtype,
                                                                                                monkeypatch):
    """The child's stand-in normalizes without ``F.batch_norm``, which the audit watches for layers with their own
    forward: the outer layer, which hands ``F.batch_norm`` nothing, is compared on its own input, with a warning."""
    if path == "centred":
        monkeypatch.setattr(audit_moments, "_ROWS_DEVICES", ())
    calls = []
    for name in ("_centred", "_channel_rows"):
        original = getattr(audit_moments, name)
        monkeypatch.setattr(audit_moments, name, lambda x, f=original, name=name: calls.append(name) or f(x))
    torch.manual_seed(0)
    model = nn.Sequential(_Wrapping(8), nn.Flatten(), nn.Linear(8 * length, 2)).eval().to(dtype)
    x = (torch.randn(128, 8, length) * 3 + 1).to(dtype)
    report = audit(model, x)
    own = [f for f in report.findings if f.code == "own_forward"]
    assert [f.data["layers"] for f in own] == [["0"]]
    shifts = {s.layer: s for s in report.shifts}
    x64 = x.double()  # "0" is measured on its input, x; its child on x * 2
    for layer, seen in (("0", x64), ("0.inner", 2 * x64)):
        z = (seen.mean((0, 2)) - 0.0) / (1.0 + 1e-5) ** 0.5  # running statistics at their initial 0 and 1
        assert shifts[layer].mean_shift == pytest.approx(float(z[shifts[layer].worst_channel]), rel=1e-3)
    inner = {"kernel": [], "rows": ["_channel_rows"], "centred": ["_centred"]}[path]
    assert calls == (inner + ["_centred"]) * 2  # per batch: the child's stand-in, then the outer layer's input


class _OwnArithmetic(nn.BatchNorm1d):
    """Normalizes ``(N, L, C)`` with its own arithmetic: neither F.batch_norm nor its input has C on axis 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean) / (self.running_var + self.eps).sqrt()


def test_a_layer_whose_channels_cannot_be_read_is_named_not_compared_and_the_rest_are_audited():
    torch.manual_seed(5)
    model = nn.Sequential(_OwnArithmetic(4), nn.Flatten(), nn.Linear(24, 8), nn.BatchNorm1d(8)).eval()
    with torch.no_grad():
        model[3].running_mean.fill_(3.0)  # 3 running standard deviations off the data's mean
    report = audit(model, torch.randn(128, 6, 4), batch_size=32)
    (unread,) = report.by_code("own_forward_unread")
    assert unread.severity == "warning" and unread.data["layers"] == ["0"] and "4 call(s)" in unread.evidence
    assert not report.by_code("own_forward") and not report.by_code("unreached")
    assert [s.layer for s in report.shifts] == ["3"] and report.shifts[0].mean_shift < -2


class _TwoWays(nn.BatchNorm1d):
    """``(N, C)``: hands it to F.batch_norm; ``(N, L, C)``: its own arithmetic, neither with C on axis 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1,
                                self.eps)
        return (x - self.running_mean) / (self.running_var + self.eps).sqrt() * self.weight + self.bias


class _CallsTwoWays(nn.Module):
    def __init__(self, skip_3d: bool = False) -> None:
        super().__init__()
        self.own, self.skip_3d = _TwoWays(4), skip_3d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and self.skip_3d:
            return x
        return self.own(x)


class _Twice(nn.Module):
    """Calls ``own`` on ``(N, L, C)`` (unreadable), then on ``(N, C)`` (through F.batch_norm)."""

    def __init__(self, own: nn.Module) -> None:
        super().__init__()
        self.own, self.lin = own, nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.own(self.lin(self.own(x).mean(1)))


def test_calls_measured_through_batch_norm_beside_unreadable_ones_are_not_said_to_be_measured_on_the_input():
    torch.manual_seed(3)
    model = _Twice(_TwoWays(4)).eval()
    report = audit(model, torch.randn(96, 6, 4), batch_size=16)
    (unread,) = report.by_code("own_forward_unread")
    assert unread.data["layers"] == ["own"] and "6 call(s)" in unread.evidence
    assert not report.by_code("own_forward")  # every measured call came from F.batch_norm's input


def test_unreadable_calls_do_not_count_as_calls_given_no_rows_in_the_noise_figures():
    """A layer's share of the samples counts the batches it measured or got no rows in: batches whose call it could
    not read change nothing against a model that skips the layer there."""
    torch.manual_seed(4)
    batches = [torch.randn(16, 4) if i % 2 == 0 else torch.randn(16, 6, 4) for i in range(40)]
    figures = []
    for skip in (True, False):
        (shift,) = audit(_CallsTwoWays(skip).eval(), batches).shifts
        figures.append((shift.mean_noise, shift.var_noise, shift.count))
    assert figures[0] == pytest.approx(figures[1], rel=1e-12)


class _Writes(nn.BatchNorm1d):
    """Hands F.batch_norm its buffers whatever ``track_running_stats`` says (training mode updates them), and
    normalizes ``(N, L, C)`` with them by its own arithmetic. ``momentum_in_call`` 0: the same, writing nothing."""

    def __init__(self, c: int, momentum_in_call: float) -> None:
        super().__init__(c)
        self.momentum_in_call = momentum_in_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                                self.momentum_in_call, self.eps)
        return (x - self.running_mean) / (self.running_var + self.eps).sqrt() * self.weight + self.bias


def test_a_forward_writing_its_buffers_during_the_pass_runs_every_call_from_the_state_before_it():
    """Else each batch's (N, L, C) call reads statistics the batches before it wrote, and the batches' figures
    drift with their order (read as batches that are not random samples)."""
    figures = []
    for momentum in (0.0, 0.1):
        torch.manual_seed(0)
        model = _Twice(_Writes(4, momentum)).eval()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(1)
        report = audit(model, [torch.randn(n, 5, 4) * 2 + 1 for n in [8, 24, 16, 40, 12, 30] * 5], train_batch_size=32)
        (shift,) = [s for s in report.shifts if s.layer == "own"]
        figures.append((shift.count, shift.mean_shift, shift.batch_f, shift.mean_noise, shift.var_noise))
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert figures[1] == pytest.approx(figures[0], rel=1e-9)
    assert figures[0][2] < 3  # the batches are random samples


class _EmptySafe(nn.BatchNorm1d):
    """Returns an empty input as it is (detectron2's old BatchNorm wrapper); every other call is PyTorch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone() if x.numel() == 0 else super().forward(x)


class _Routed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = _EmptySafe(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, y = x[:, 0] > 0, x.clone()
        y[keep] = self.bn(x[keep])
        return y


def test_an_empty_call_is_not_a_call_measured_on_the_input():
    """Its empty calls never reach F.batch_norm, but nothing is measured on them: no own_forward warning, and a
    layer only ever given no rows is unreached, nothing else."""
    torch.manual_seed(0)
    batches = [torch.randn(16, 4) for _ in range(12)]
    for b in batches[::3]:
        b[:, 0] = -1 - b[:, 0].abs()  # no row routed
    report = audit(_Routed().eval(), batches)
    assert not report.by_code("own_forward") and [s.layer for s in report.shifts] == ["bn"]
    report = audit(_Routed().eval(), batches[::3])
    assert not report.by_code("own_forward") and report.by_code("unreached")[0].data["layers"] == ["bn"]


class _InPlace(nn.BatchNorm1d):
    """Never calls F.batch_norm and centres its input in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub_(self.running_mean).div_((self.running_var + self.eps).sqrt())


class _UntrackedChild(nn.BatchNorm1d):
    """Its own arithmetic on its input, plus an untracked BatchNorm child normalizing something else."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.aux = nn.BatchNorm1d(c, affine=False, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean) / (self.running_var + self.eps).sqrt() + 0 * self.aux(x * 10 + 50)


def test_an_input_written_in_place_is_measured_as_given_and_a_child_batchnorm_call_is_not_the_layer_s():
    torch.manual_seed(0)
    x = torch.randn(256, 4) * 2 + 3
    model = nn.Sequential(nn.Identity(), _InPlace(4)).eval()
    with torch.no_grad():
        model[1].running_mean.copy_(x.mean(0))
        model[1].running_var.copy_(x.var(0))
    report = audit(model, x.clone(), batch_size=32)  # measured after the call, it would read 0: a 1.5 std shift
    (shift,) = report.shifts
    assert abs(shift.mean_shift) < 1e-3 and not report.by_code("stat_shift")
    assert report.by_code("own_forward")[0].data["layers"] == ["1"]
    model = nn.Sequential(_UntrackedChild(4)).eval()
    report = audit(model, x, batch_size=32)
    (shift,) = report.shifts  # on its input x, not on the child's x * 10 + 50
    assert shift.mean_shift == pytest.approx(float(x.mean(0)[shift.worst_channel]) / (1 + 1e-5) ** 0.5, rel=1e-4)
    assert report.by_code("own_forward")[0].data["layers"] == ["0"]


def test_inference_tensors_reach_a_layer_with_its_own_forward():
    """They keep no version counter: the in-place check must not break the pass."""
    with torch.inference_mode():
        x = torch.randn(64, 5, 4)
    model = nn.Sequential(_Wrapping(5)).eval()
    assert sorted(s.layer for s in audit(model, x, batch_size=32).shifts) == ["0", "0.inner"]


def test_a_stock_layer_given_other_channels_fails_as_in_eval_mode():
    """PyTorch's eval mode refuses the input (running statistics of another size); so does the audit, naming it."""
    model = nn.Sequential(nn.BatchNorm1d(4, affine=False), nn.BatchNorm1d(4, affine=False)).eval()
    model.insert(1, nn.Linear(4, 6))
    x = torch.randn(16, 4)
    with pytest.raises(RuntimeError):
        model(x)
    with pytest.raises(ValueError, match=r"BatchNorm layer '2' has 4 channels but its input has 6 on axis 1"):
        audit(model, x)


def test_an_input_of_the_wrong_rank_fails_with_the_layer_s_own_message():
    model = nn.Sequential(nn.BatchNorm1d(4)).eval()
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 1D input\)"):
        model(torch.randn(4))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 1D input\)"):
        audit(model, torch.randn(16, 4), forward=lambda m, x: m(x[0]))


def test_call_rows_grow_promote_and_copy():
    rows = audit_moments.CallRows(3)
    for k in range(300):  # chunks of 16, 32, 64, 128, then 256 rows
        rows.append(torch.full((3,), float(k)))
    rows.append(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))  # float64 promotes what was kept
    rows.append(torch.full((3,), 7.0))  # float32 after float64: kept as float64
    got = rows.numpy()
    assert len(rows) == 302 and got.shape == (302, 3) and got.dtype == np.float64
    np.testing.assert_array_equal(got[:300], np.repeat(np.arange(300.0), 3).reshape(300, 3))
    np.testing.assert_array_equal(got[300], [0.1, 0.2, 0.3])  # exact: not rounded through float32
    np.testing.assert_array_equal(got[301], [7.0, 7.0, 7.0])
    got[0] = -1.0
    assert rows.numpy()[0, 0] == 0.0  # a copy
    with pytest.raises(ValueError, match="2 values for 3 channels"):
        rows.append(torch.zeros(2))
    assert audit_moments.CallRows(2).numpy().shape == (0, 2)


class _CallsItself(nn.BatchNorm1d):
    """(N, L, C): transposes and calls itself; the nested call hands F.batch_norm (N, C, L)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[1] != self.num_features:
            return self(x.transpose(1, 2)).transpose(1, 2)
        return super().forward(x)


def test_a_layer_calling_itself_is_compared_on_what_its_nested_call_normalizes():
    torch.manual_seed(0)
    x = torch.randn(24, 5, 4) * 2 + 3
    report = audit(nn.Sequential(_CallsItself(4)).eval(), x, batch_size=8)
    assert not report.by_code("own_forward_unread") and not report.by_code("own_forward")
    (shift,) = report.shifts
    assert shift.count == 120 and shift.calls_per_forward == 1  # each forward: one measured call of 8 x 5 rows
    z = x.double().reshape(-1, 4).mean(0) / (1 + 1e-5) ** 0.5  # running statistics at their initial 0 and 1
    assert shift.mean_shift == pytest.approx(float(z[shift.worst_channel]), rel=1e-4)


class _OwnArithmeticInside(nn.BatchNorm1d):
    """Calls itself for its own arithmetic (``2x + 1``, no F.batch_norm), then normalizes that through it."""

    def forward(self, x: torch.Tensor, inner: bool = False) -> torch.Tensor:
        return x * 2 + 1 if inner else super().forward(self(x, inner=True))


def test_a_nested_call_doing_its_own_arithmetic_is_not_an_extra_call():
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    report = audit(nn.Sequential(_OwnArithmeticInside(4)).eval(), x, batch_size=8)
    assert not report.by_code("own_forward") and not report.by_code("own_forward_unread")
    (shift,) = report.shifts
    assert shift.count == 32 and shift.calls_per_forward == 1
    z = (2 * x.double() + 1).mean(0) / (1 + 1e-5) ** 0.5  # running statistics at their initial 0 and 1
    assert shift.mean_shift == pytest.approx(float(z[shift.worst_channel]), rel=1e-4)
