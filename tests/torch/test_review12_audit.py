"""bnkit.torch.audit with data (review RA, commit e8cf56b): per-call comparison of layers called several times per
forward, routed noise, random outputs, custom batch objects, unreached and frozen layers, BN subclasses. Oracles:
float64 NumPy statistics of what each layer normalizes (captured by the test's own hooks), a simulation of
PyTorch's own EMA, PyTorch's own modules."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from _helpers import arithmetic_bn_class, set_running_stats

from bnkit.torch import audit, freeze_bn


def _kl(values, bn):
    """float64 per-channel (KL, z, log variance ratio) of rows ``values`` (K, C) against ``bn``'s running
    statistics, as the audit defines them (unbiased data variance)."""
    v = np.asarray(values, dtype=np.float64)
    mu, var = v.mean(0), v.var(0, ddof=1)
    mr, vr, eps = bn.running_mean.double().numpy(), bn.running_var.double().numpy(), float(bn.eps)
    z = (mu - mr) / np.sqrt(vr + eps)
    lr = np.log((var + eps) / (vr + eps))
    return 0.5 * (np.expm1(lr) - lr + z * z), z, lr


def _assert_shift(s, kl, z, lr, count):
    worst = int(np.argmax(kl))
    assert s.worst_channel == worst
    assert s.score == pytest.approx(kl.mean(), rel=1e-5)
    assert s.z_eq == pytest.approx(math.sqrt(2 * kl.mean()), rel=1e-5)
    assert s.mean_shift == pytest.approx(z[worst], rel=1e-4, abs=1e-5)
    assert s.log_var_ratio == pytest.approx(lr[worst], rel=1e-4, abs=1e-5)
    assert s.count == count


# --- 5. layers called several times per forward --------------------------------------------------------------------

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
    per_call = [_kl(c, model.bn) for c in calls]
    k = int(np.argmax([kl.mean() for kl, _, _ in per_call]))
    assert _kl(pooled, model.bn)[0].mean() < 0.01 and per_call[k][0].mean() > 0.5  # the setup holds

    report = audit(model, x, batch_size=64)
    (s,) = report.shifts
    assert (s.call, s.calls_per_forward) == (k + 1, 4)
    _assert_shift(s, *per_call[k], count=512)
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
    per_call = [_kl(data.double().numpy() + off, model.bn) for off in (0.0, 3.0)]
    assert s.call == 1 + int(np.argmax([kl.mean() for kl, _, _ in per_call]))
    _assert_shift(s, *per_call[s.call - 1], count=2048)
    errors = [f for f in report.by_code("stat_shift") if f.severity == "error"]
    assert [f.layer for f in errors] == ["bn"]
    assert f"call {s.call} of 2" in errors[0].evidence
    assert "one set of running statistics serves all its calls" in errors[0].fix


def test_a_layer_called_once_per_forward_has_no_call_and_unchanged_figures():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 3, generator=g) * torch.tensor([2.0, 0.5, 1.0]) + torch.tensor([1.0, -2.0, 0.5])
    bn = nn.BatchNorm1d(3).eval()
    set_running_stats(bn, [0.0, -2.0, 3.0], [4.0, 1.0, 1.0])
    report = audit(bn, x, batch_size=20)
    (s,) = report.shifts
    assert s.call is None and s.calls_per_forward == 1
    _assert_shift(s, *_kl(x.double().numpy(), bn), count=600)
    assert all(" of 1 per forward" not in f.evidence and "call None" not in f.evidence
               for f in report.by_code("stat_shift"))


# --- 6. routed branch noise ----------------------------------------------------------------------------------------

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


# --- 7. random outputs vs coupling ---------------------------------------------------------------------------------

class MCDropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Linear(32, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.fc1(x)))
        return self.fc2(h + 0.3 * torch.randn_like(h))  # samples in eval mode too


class CenteredNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        h = self.bn(self.fc(x))
        return h - h.mean(0)  # couples the samples of a batch, deterministically


def _trained(model, x):
    model.train()
    with torch.no_grad():
        for b in x.split(64):
            model(b)
    return model.eval()


def test_a_model_that_samples_in_eval_mode_is_random_not_coupled():
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    model = _trained(MCDropoutNet(), x)
    with torch.no_grad():  # the setup holds: the same batch twice differs
        assert not torch.equal(model(x[:64]), model(x[:64]))
    report = audit(model, x)
    assert not [f for f in report.by_code("batch_coupling") if f.severity == "error"]
    (rand,) = report.by_code("random_outputs")
    assert rand.severity == "warning" and "outputs are random" in rand.finding
    assert report.batch_coupling is None


def test_a_deterministic_coupled_model_still_gets_the_coupling_error():
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    model = _trained(CenteredNet(), x)
    report = audit(model, x)
    assert [f.severity for f in report.by_code("batch_coupling")] == ["error"]
    assert not report.by_code("random_outputs")


# --- 8. batches of a custom class ----------------------------------------------------------------------------------

class Batch:
    def __init__(self, x, y):
        self.x, self.y = x, y


def _collate(items):
    xs, ys = zip(*items)
    return Batch(torch.stack(xs), torch.stack(ys))


def test_batches_of_a_custom_class_are_audited_and_the_checks_say_why_they_could_not_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)).eval()
    model[1].num_batches_tracked.fill_(1000)
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
    xs = torch.randn(512, 8)
    loader = DataLoader(TensorDataset(xs, torch.randint(0, 2, (512,))), batch_size=64, collate_fn=_collate)
    seen = []  # the oracle's own capture: what the BN normalizes
    h = model[0].register_forward_hook(lambda m, a, out: seen.append(out.double().numpy()))
    with torch.no_grad():
        model(xs)
    h.remove()

    report = audit(model, loader, forward=lambda m, b: m(b.x))
    (s,) = report.shifts
    _assert_shift(s, *_kl(np.concatenate(seen), model[1]), count=512)
    assert report.batches == 8
    (coupling,) = report.by_code("batch_coupling")
    assert coupling.severity == "info" and "not checked" in coupling.finding and "Batch" in coupling.evidence
    (noise,) = report.by_code("stat_noise")
    assert noise.severity == "info" and "not estimated" in noise.finding and "train_batch_size" in noise.fix
    assert s.mean_noise is None

    report = audit(model, loader, forward=lambda m, b: m(b.x), train_batch_size=32)
    (s,) = report.shifts
    # the same batches as tensors give the same noise figure (their size is readable there)
    (t,) = audit(model, xs, batch_size=64, train_batch_size=32).shifts
    assert s.mean_noise is not None and s.mean_noise == pytest.approx(t.mean_noise, rel=1e-6)
    (noise,) = report.by_code("stat_noise")
    assert "not estimated" not in noise.finding and noise.data["train_batch_size"] == 32


# --- 9. layers the data never reaches ------------------------------------------------------------------------------

class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
        self.head_a = nn.Sequential(nn.Linear(16, 4), nn.BatchNorm1d(4))
        self.head_b = nn.Sequential(nn.Linear(16, 4), nn.BatchNorm1d(4))

    def forward(self, x, task="a"):
        h = self.body(x)
        return self.head_a(h) if task == "a" else self.head_b(h)


def test_a_layer_the_data_never_reaches_is_named():
    torch.manual_seed(0)
    model = TwoHeads()
    x = torch.randn(512, 8)
    model.train()
    with torch.no_grad():
        model(x)
        model(x, "b")
    model.eval()
    report = audit(model, x)
    assert "head_b.1" not in [s.layer for s in report.shifts]
    (f,) = report.by_code("unreached")
    assert f.severity == "info" and "not reached by the data" in f.finding
    assert f.layer == "head_b.1" and "head_b.1" in f.evidence and f.data["layers"] == ["head_b.1"]


# --- 10. layers frozen by freeze_bn --------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [4, 8])
def test_a_freeze_bn_layer_gets_no_noise_figure_and_no_blame_on_calls(batch_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).eval()
    x = torch.randn(1024, 8)
    with torch.no_grad():
        h = model[0](x)
        model[1].running_mean.copy_(h.mean(0))
        model[1].running_var.copy_(h.var(0))
        model[1].num_batches_tracked.fill_(1000)
    frozen = freeze_bn(copy.deepcopy(model))
    report = audit(frozen, x, batch_size=batch_size)
    (s,) = report.shifts
    assert s.mean_noise is None and s.var_noise is None
    noise = report.by_code("stat_noise")
    assert not [f for f in noise if f.severity != "info"]
    assert not [f for f in noise if "more than once" in f.evidence or "not estimated" in f.finding]
    # the same layer unfrozen does get its figure (the setup holds)
    assert audit(model, x, batch_size=batch_size).shifts[0].mean_noise is not None


# --- 11. BN subclasses ---------------------------------------------------------------------------------------------

class TransposedBN(nn.BatchNorm1d):
    def forward(self, x):  # x: (N, L, C)
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("length", [6, 10])
def test_a_transposing_subclass_is_compared_on_its_normalized_axis(length):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), TransposedBN(6)).eval()
    set_running_stats(model[1], torch.linspace(-1, 1, 6), torch.linspace(0.5, 2, 6))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, length, 3, generator=g) * 2 + 1
    seen = []
    h = model[0].register_forward_hook(lambda m, a, out: seen.append(out.reshape(-1, 6).double().numpy()))
    with torch.no_grad():
        model(x)
    h.remove()
    report = audit(model, x, batch_size=64)
    (s,) = report.shifts
    _assert_shift(s, *_kl(np.concatenate(seen), model[1]), count=256 * length)
    assert not report.by_code("own_forward")


ArithmeticBN = arithmetic_bn_class()  # masked BN with its own arithmetic: never calls F.batch_norm


def test_a_subclass_with_its_own_arithmetic_gets_the_own_forward_warning():
    model = nn.ModuleDict({"masked": ArithmeticBN(4)}).eval()
    model["masked"].num_batches_tracked.fill_(1000)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        x = torch.randn(16, 4, 12, generator=g) * 2 + 3
        mask = torch.arange(12)[None, :] < torch.randint(3, 12, (16, 1), generator=g)
        data.append((x * mask[:, None, :], mask))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = audit(model, data, forward=lambda m, b: m["masked"](*b))
    (f,) = report.by_code("own_forward")
    assert f.severity == "warning" and f.layer == "masked" and f.data["layers"] == ["masked"]
    assert "masked" in f.evidence
    # measured on its input (padding included), as the warning says
    (s,) = report.shifts
    rows = np.concatenate([x.transpose(1, 2).reshape(-1, 4).double().numpy() for x, _ in data])
    _assert_shift(s, *_kl(rows, model["masked"]), count=len(rows))
    # its own training-mode arithmetic ran during the pass: the audit leaves its buffers as they were
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


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
        xd, eps = x.double().numpy(), model.bn.eps  # the pooled figure, in float64 from the data itself
        z = (xd.mean(0) - (0.5 + 2.0 * shift)) / np.sqrt(4.0 + eps)
        log_ratio = np.log((xd.var(0, ddof=1) + eps) / (4.0 + eps))
        kl = 0.5 * (np.expm1(log_ratio) - log_ratio + z * z)
        assert s.z_eq == pytest.approx(np.sqrt(2 * kl.mean()), rel=1e-5)
        assert (s.score >= 0.045) == (shift > 0)  # a warning only for the real shift


def test_routed_call_that_gets_no_rows_keeps_the_call_positions_and_the_share():
    """Review R: a shared BN called first on the rare flagged rows (3 std off its running statistics), then on the
    whole batch shifted back onto them. Batches with no flagged row used to record only the second call, which
    then counted as call 1: the flagged call's figure was diluted (no finding at 3% flagged). Oracle: float64
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
    """Review R2: a second call that this data never gives rows made the audit divide by zero (one measured place
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
    """Review R2: with an empty routed call between them, the shifted third call was named 'call 2 of 2'."""
    from bnkit.torch import audit

    torch.manual_seed(0)
    model = _RoutedTwice(limit=100.0, third=True).eval()
    model.bn.num_batches_tracked.fill_(1000)
    (s,) = audit(model, torch.randn(640, 3), batch_size=64).shifts
    assert (s.call, s.calls_per_forward) == (3, 3)


def test_a_layer_some_batches_skip_keeps_the_noise_of_its_whole_batches():
    """Review R2: domain-specific BN (each batch goes wholly through one domain's layer) had its noise divided by
    its share of all the data's batches, twice too large at a quarter. Oracle: every training update of the layer
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
    """Review R3: a BN shared by two domains (x and x + 3), each shuffled batch giving rows to one of its two
    calls: its places' difference was measured as spread between batches, the audit called the random data
    ordered and dropped every layer's noise figure. Oracle: the ordinary layer's closed form sqrt(m/(2-m)/B)."""
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
    """Mutation M9: the calls per forward were not tested with a loop whose length varies between batches (one call
    on even batches, three on odd ones, the third shifted by 5 std), nor with an empty routed call of a layer with
    its own forward. Oracle: the third call's rows, in float64, against the running statistics."""
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
