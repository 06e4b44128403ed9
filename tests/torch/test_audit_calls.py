"""bnkit.torch.audit with data on layers called several times per forward (in a loop, shared, on ghost-batch chunks,
on a routed share of the batch, or only in some batches): the call compared, the worst call named by its place
among all calls, and the running statistics' noise figure of each layer.

Oracles: float64 NumPy statistics of what each call normalizes (captured by the test's own hooks, or recomputed from
the data), a simulation of PyTorch's own EMA, and the closed form sqrt(m / (2 - m) / B) of its noise.
"""
import copy
import math

import numpy as np
import pytest
import torch
from _helpers import assert_shift, set_running_stats, shift_figures
from torch import nn

from bnkit.torch import audit


SCALES, OFFSETS = (0.5, 1.0, 1.5, 2.0), (-1.5, -0.5, 0.5, 1.5)


class Loop(nn.Module):
    """One BN called 4 times per forward on inputs that differ by design (scale and offset per step)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        out = 0
        for s, o in zip(SCALES, OFFSETS):
            out = out + self.bn(x * s + o)
        return out


def test_a_layer_called_in_a_loop_is_compared_call_by_call_and_the_worst_call_is_named():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, generator=g)
    model = Loop().eval()
    calls = []  # the oracle's own capture of each call's input, in order
    h = model.bn.register_forward_pre_hook(lambda m, a: calls.append(a[0].double().numpy()))
    with torch.no_grad():
        model(x)
    h.remove()
    pooled = np.concatenate(calls)  # running statistics of all calls pooled: each call is far off, their pool is not
    set_running_stats(model.bn, pooled.mean(0), pooled.var(0, ddof=1))
    per_call = [shift_figures(c, model.bn) for c in calls]
    k = int(np.argmax([kl.mean() for kl, _, _ in per_call]))
    assert shift_figures(pooled, model.bn)[0].mean() < 0.01 and per_call[k][0].mean() > 0.5  # the setup holds

    report = audit(model, x, batch_size=64)
    (s,) = report.shifts
    assert (s.call, s.calls_per_forward) == (k + 1, 4)
    assert_shift(s, *per_call[k], count=512)
    (f,) = report.by_code("stat_shift")
    assert f.severity == "error" and f"in its call {k + 1} of 4 per forward" in f.evidence
    assert f.data["call"] == k + 1 and f.data["calls_per_forward"] == 4
    assert "one set of running statistics serves all its calls" in f.fix


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(x) + self.bn(x + 3.0)


def test_a_shared_layer_trained_by_pytorch_names_its_call_and_the_fix_says_one_set_serves_all():
    torch.manual_seed(0)
    model = Shared()
    data = torch.randn(2048, 8)
    model.train()
    with torch.no_grad():  # PyTorch's own training updates on this data
        for _ in range(4):
            for b in data[torch.randperm(len(data))].split(64):
                model(b)
    model.eval()
    report = audit(model, data, batch_size=64)
    (s,) = report.shifts
    assert s.calls_per_forward == 2 and s.call in (1, 2)
    # the named call is the worse of the two, recomputed in float64 on that call's inputs
    per_call = [shift_figures(data.double().numpy() + off, model.bn) for off in (0.0, 3.0)]
    assert s.call == 1 + int(np.argmax([kl.mean() for kl, _, _ in per_call]))
    assert_shift(s, *per_call[s.call - 1], count=2048)
    errors = [f for f in report.by_code("stat_shift") if f.severity == "error"]
    assert [f.layer for f in errors] == ["bn"]
    assert f"call {s.call} of 2" in errors[0].evidence
    assert "one set of running statistics serves all its calls" in errors[0].fix


class TwoBranches(nn.Module):
    def __init__(self, offsets):
        super().__init__()
        self.bn, self.offsets = nn.BatchNorm1d(8), offsets

    def forward(self, x):
        return self.bn(x + self.offsets[0]) + self.bn(x + self.offsets[1])


@pytest.mark.parametrize("batches", [1, 3, 4, 5, 6])
@pytest.mark.parametrize("offsets", [(1.0, -1.0), (0.0, 3.0)])
def test_a_shared_layer_seen_in_a_few_batches_still_names_its_shifted_call(batches, offsets):
    """Running statistics of N(0, 1) serve two calls: 1 std off each way (each error grade), or one call on them
    and one 3 std off. Below a handful of batches the positions test cannot tell the calls apart, and pooling them
    hid the shift (the first pair: a warning of 0.15; the second: 1.7, not 4.5). Oracle: float64 figures of
    each call's inputs."""
    torch.manual_seed(0)
    model = TwoBranches(offsets).eval()
    set_running_stats(model.bn, 0.0, 1.0)
    x = torch.randn(32 * batches, 8)
    per_call = [shift_figures(x.double().numpy() + off, model.bn) for off in offsets]
    report = audit(model, x, batch_size=32)
    (s,) = report.shifts
    assert s.calls_per_forward == 2 and s.call == 1 + int(np.argmax([kl.mean() for kl, _, _ in per_call]))
    assert_shift(s, *per_call[s.call - 1], count=len(x))
    (f,) = report.by_code("stat_shift")
    assert f.severity == "error" and f"call {s.call} of 2" in f.evidence


def test_ghost_chunks_of_a_conv_map_seen_in_a_few_batches_stay_pooled():
    """The counterpart: chunks of a batch through one BatchNorm2d differ by sampling alone, more than the
    independent-values noise says where a conv map's neighbouring values move together. With too few batches to
    test the chunks apart, no chunk may be named for that noise: the figures are the pooled ones (call None), as
    when the test can run. Oracle: float64 statistics of the whole input."""
    class Ghost(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return torch.cat([self.bn(c) for c in x.chunk(8)])

    g = torch.Generator().manual_seed(0)
    x = nn.functional.avg_pool2d(torch.randn(128, 3, 16, 16, generator=g), 5, 1, 2) * 3  # neighbours correlated
    model = Ghost().eval()
    xd = x.double().numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    set_running_stats(model.bn, xd.mean(1) + 0.02, xd.var(1))
    (s,) = audit(model, x, batch_size=64).shifts
    assert s.call is None and s.calls_per_forward == 8 and s.count == xd.shape[1]
    assert_shift(s, *shift_figures(xd.T, model.bn), count=xd.shape[1])


def test_a_layer_called_once_per_forward_has_no_call_and_unchanged_figures():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 3, generator=g) * torch.tensor([2.0, 0.5, 1.0]) + torch.tensor([1.0, -2.0, 0.5])
    bn = nn.BatchNorm1d(3).eval()
    set_running_stats(bn, [0.0, -2.0, 3.0], [4.0, 1.0, 1.0])
    report = audit(bn, x, batch_size=20)
    (s,) = report.shifts
    assert s.call is None and s.calls_per_forward == 1
    assert_shift(s, *shift_figures(x.double().numpy(), bn), count=600)
    assert all(" of 1 per forward" not in f.evidence and "call None" not in f.evidence
               for f in report.by_code("stat_shift"))


class RoutedMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.BatchNorm1d(4), nn.BatchNorm1d(4)

    def forward(self, x):
        mask = x[:, 0] > 0.5  # about 31% of the samples go to branch a
        out = torch.zeros_like(x)
        out[mask] = self.a(x[mask])
        out[~mask] = self.b(x[~mask])
        return out


def test_a_routed_branch_noise_matches_pytorch_ema_at_the_training_batch_size():
    torch.manual_seed(0)
    x = torch.randn(20000, 4)
    model = RoutedMask().eval()
    share = float((x[:, 0] > 0.5).double().mean())
    with torch.no_grad():
        for bn, rows in ((model.a, x[x[:, 0] > 0.5]), (model.b, x[x[:, 0] <= 0.5])):
            bn.running_mean.copy_(rows.mean(0))
            bn.running_var.copy_(rows.var(0))
            bn.num_batches_tracked.fill_(10000)
    b_train = 32
    report = audit(model, x[:6400], batch_size=64, train_batch_size=b_train)
    reported = {s.layer: s.mean_noise for s in report.shifts}

    # oracle: PyTorch's own training-mode EMA on random batches of b_train samples, running means recorded
    sim = copy.deepcopy(model).train()
    trace = {"a": [], "b": []}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in range(3500):
            sim(x[torch.randint(0, len(x), (b_train,), generator=g)])
            if t >= 500:
                trace["a"].append(sim.a.running_mean.clone())
                trace["b"].append(sim.b.running_mean.clone())
    for name in ("a", "b"):
        bn = getattr(model, name)
        h = torch.stack(trace[name]).double()
        observed = math.sqrt(float((h.var(0) / (bn.running_var.double() + bn.eps)).mean()))
        assert reported[name] == pytest.approx(observed, rel=0.2), name
    # the small share's figure is well above that of a layer seeing the whole training batch
    full = math.sqrt(0.1 / 1.9 / b_train)  # BatchNorm's EMA std of the mean at batch b_train, in the data's std
    assert share < 0.35 and reported["a"] > 1.5 * full


def test_ghost_batch_layer_called_on_chunks_is_compared_pooled_not_per_chunk():
    """One BN called on each small chunk of a shuffled batch (ghost batch norm): the chunk positions differ by
    sampling alone, so the worst of 32 small positions must not be reported as a shift. Running statistics set
    to the data's own distribution N(0.5, 2^2) (the oracle: no mismatch); a real shift of 1.2 std is still found,
    with the pooled figure."""
    from bnkit.torch import audit

    class GhostBN(nn.Module):
        def __init__(self, c, vbs):
            super().__init__()
            self.bn, self.vbs = nn.BatchNorm1d(c), vbs

        def forward(self, x):
            return torch.cat([self.bn(c) for c in x.chunk(max(1, x.shape[0] // self.vbs))])

    for shift in (0.0, 1.2):
        torch.manual_seed(0)
        model = GhostBN(16, 2).eval()
        with torch.no_grad():
            model.bn.running_mean.fill_(0.5 + 2.0 * shift)
            model.bn.running_var.fill_(4.0)
            model.bn.num_batches_tracked.fill_(1000)
        x = torch.randn(256, 16) * 2 + 0.5
        (s,) = audit(model, x, batch_size=64).shifts
        assert s.call is None and s.count == 256  # pooled over all calls
        assert s.calls_per_forward == 32  # 64 rows in chunks of 2, pooled or not
        xd, eps = x.double().numpy(), model.bn.eps  # the pooled figure, in float64 from the data itself
        z = (xd.mean(0) - (0.5 + 2.0 * shift)) / np.sqrt(4.0 + eps)
        log_ratio = np.log((xd.var(0, ddof=1) + eps) / (4.0 + eps))
        kl = 0.5 * (np.expm1(log_ratio) - log_ratio + z * z)
        assert s.z_eq == pytest.approx(np.sqrt(2 * kl.mean()), rel=1e-5)
        assert (s.score >= 0.045) == (shift > 0)  # a warning only for the real shift


def test_routed_call_that_gets_no_rows_keeps_the_call_positions_and_the_share():
    """A shared BN called first on the rare flagged rows (3 std off its running statistics), then on the whole batch
    shifted back onto them. Batches with no flagged row give only the second call, which must not count as call 1
    there: the flagged call's figure would be diluted (no finding at 3% flagged). Oracle: float64
    statistics of the flagged rows alone, and the share of flagged rows over all the data."""
    from bnkit.torch import audit

    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            flagged = x[x[:, 0] > 0][:, 1:]
            return self.bn(flagged).sum() + self.bn(x[:, 1:]).sum()

    g = torch.Generator().manual_seed(0)
    n = 1024
    flag = (torch.rand(n, generator=g) < 0.05).float() * 2 - 1
    rows = torch.randn(n, 4, generator=g)
    rows[flag > 0] += 3.0  # flagged rows 3 std off; the rest match the running statistics
    x = torch.cat([flag[:, None], rows], 1)
    model = Flagged().eval()
    model.bn.num_batches_tracked.fill_(1000)  # running statistics: mean 0, var 1 (the unflagged rows)
    (s,) = audit(model, x, batch_size=16).shifts
    sel = rows[flag > 0].double().numpy()
    z = sel.mean(0) / np.sqrt(1 + model.bn.eps)
    log_ratio = np.log((sel.var(0, ddof=1) + model.bn.eps) / (1 + model.bn.eps))
    kl = 0.5 * (np.expm1(log_ratio) - log_ratio + z * z)
    assert s.call == 1 and s.calls_per_forward == 2 and s.count == len(sel)
    assert s.z_eq == pytest.approx(np.sqrt(2 * kl.mean()), rel=1e-5)


class _RoutedTwice(nn.Module):
    """One BN called on the batch, on a routed subset (rows with x[:, 0] > limit; none when limit is large), and,
    with ``third``, on the batch shifted by 5 std."""

    def __init__(self, limit, third=False):
        super().__init__()
        self.bn, self.limit, self.third = nn.BatchNorm1d(3), limit, third

    def forward(self, x):
        out = self.bn(x).sum() + self.bn(x[x[:, 0] > self.limit]).sum()
        return out + self.bn(3 * x + 5).sum() if self.third else out


def test_a_layer_measured_at_one_place_of_two_is_audited_as_called_once():
    """A second call that this data never gives rows must not make the audit divide by zero (one measured place
    compared among places). Oracle: float64 statistics of all rows, and the closed-form noise sqrt(m/(2-m)/B)."""
    from bnkit.torch import audit

    torch.manual_seed(0)
    model = _RoutedTwice(limit=100.0).eval()
    model.bn.num_batches_tracked.fill_(1000)
    x = torch.randn(640, 3)
    (s,) = audit(model, x, batch_size=64).shifts
    assert s.call is None and s.count == 640
    xd = x.double().numpy()
    z = xd.mean(0) / np.sqrt(1 + model.bn.eps)
    log_ratio = np.log((xd.var(0, ddof=1) + model.bn.eps) / (1 + model.bn.eps))
    assert s.z_eq == pytest.approx(np.sqrt(np.mean(np.expm1(log_ratio) - log_ratio + z * z)), rel=1e-5)
    assert s.mean_noise == pytest.approx(np.sqrt(0.1 / 1.9 / 64), rel=0.35)  # a spread measured over 10 batches


def test_the_worst_call_is_named_by_its_place_among_all_calls():
    """With an empty routed call between them, the shifted third call is 'call 3 of 3', not 'call 2 of 2'."""
    from bnkit.torch import audit

    torch.manual_seed(0)
    model = _RoutedTwice(limit=100.0, third=True).eval()
    model.bn.num_batches_tracked.fill_(1000)
    (s,) = audit(model, torch.randn(640, 3), batch_size=64).shifts
    assert (s.call, s.calls_per_forward) == (3, 3)


def test_a_layer_some_batches_skip_keeps_the_noise_of_its_whole_batches():
    """Domain-specific BN (each batch goes wholly through one domain's layer): its noise is not divided by its
    share of all the data's batches (twice too large at a quarter). Oracle: every training update of the layer
    sees a whole batch of 64, so its running mean wobbles by sqrt(m/(2-m)/64) std."""
    from bnkit.torch import audit

    class TwoDomains(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_a, self.bn_b = nn.BatchNorm1d(16), nn.BatchNorm1d(16)

        def forward(self, x):
            return self.bn_a(x[:, :16]) if x[0, 16] > 0 else self.bn_b(x[:, :16])

    torch.manual_seed(0)
    model = TwoDomains().eval()
    for bn in (model.bn_a, model.bn_b):
        bn.num_batches_tracked.fill_(1000)
    batches = []
    for i in range(400):
        x = torch.randn(64, 17)
        x[:, 16] = 1.0 if i % 4 == 0 else -1.0
        batches.append(x)
    shifts = {s.layer: s for s in audit(model, batches, train_batch_size=64).shifts}
    for layer in ("bn_a", "bn_b"):
        assert shifts[layer].mean_noise == pytest.approx(np.sqrt(0.1 / 1.9 / 64), rel=0.15)


def test_places_that_differ_by_design_give_no_noise_figure_and_do_not_make_random_data_look_ordered():
    """A BN shared by two domains (x and x + 3), each shuffled batch giving rows to one of its two calls: its
    places' difference must not be measured as spread between batches (the audit would call the random data
    ordered and drop every layer's noise figure). Oracle: the ordinary layer's closed form sqrt(m/(2-m)/B)."""
    from bnkit.torch import audit

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.other, self.bn = nn.BatchNorm1d(4), nn.BatchNorm1d(4)

        def forward(self, x):
            domain = x[:, 0] > 0
            h = self.other(x[:, 1:])
            return self.bn(h[domain]).sum() + self.bn(h[~domain] + 3.0).sum()

    torch.manual_seed(0)
    model = Shared().eval()
    for bn in (model.other, model.bn):
        bn.num_batches_tracked.fill_(1000)
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(40):
        x = torch.randn(32, 5, generator=g)
        x[:, 0] = 1.0 if torch.rand(1, generator=g) < 0.5 else -1.0
        data.append(x)
    report = audit(model, data, train_batch_size=32)
    shifts = {s.layer: s for s in report.shifts}
    assert shifts["bn"].call is not None and shifts["bn"].mean_noise is None
    assert shifts["other"].mean_noise == pytest.approx(np.sqrt(0.1 / 1.9 / 32), rel=0.25)
    assert not [f for f in report.by_code("stat_noise") if "not random" in f.finding]


class _OwnForward(nn.BatchNorm1d):
    """A BN subclass with a forward of its own that hands its input to F.batch_norm unchanged."""

    def forward(self, x):
        return super().forward(x)


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, _OwnForward])
def test_a_loop_of_varying_length_is_named_by_its_longest_forward(cls):
    """The calls per forward of a loop whose length varies between batches (one call on even batches, three on odd
    ones, the third shifted by 5 std), with an empty routed call, for a stock layer and for one with its own
    forward: the longest forward's count, the shifted call named. Oracle: the third call's rows, in float64,
    against the running statistics."""
    from bnkit.torch import audit

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = cls(3)

        def forward(self, x):
            out = self.bn(x).sum()
            if x[0, 0] > 0:  # odd batches: an empty routed call, then the shifted one
                out = out + self.bn(x[x[:, 1] > 100]).sum() + self.bn(3 * x + 5).sum()
            return out

    torch.manual_seed(0)
    model = Loop().eval()
    model.bn.num_batches_tracked.fill_(1000)
    batches = []
    for i in range(10):
        x = torch.randn(64, 3)
        x[0, 0] = 1.0 if i % 2 else -1.0
        batches.append(x)
    (s,) = audit(model, batches).shifts
    assert (s.call, s.calls_per_forward) == (3, 3)
    third = np.concatenate([(3 * b + 5).double().numpy() for b in batches[1::2]])
    z = third.mean(0) / np.sqrt(1 + model.bn.eps)
    log_ratio = np.log((third.var(0, ddof=1) + model.bn.eps) / (1 + model.bn.eps))
    assert s.z_eq == pytest.approx(np.sqrt(np.mean(np.expm1(log_ratio) - log_ratio + z * z)), rel=1e-5)
