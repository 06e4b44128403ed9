"""bnkit.torch.audit's statistics shifts on few values per channel: sampling noise alone is not graded as a shift.

Oracles: the closed form of the KL score's sampling mean and variance for n independent normal values (SciPy's
digamma and trigamma), checked against the spread of float64 NumPy scores; data drawn from exactly the running
distribution (set running statistics, then sample N(mean, var)); PyTorch's own cumulative-average running
statistics of one batch (momentum=None), which are the batch's exact mean and unbiased variance.
"""
import math

import numpy as np
import pytest
import torch
from _helpers import set_running_stats, shift_figures
from scipy.special import digamma, polygamma
from torch import nn

from bnkit.torch import audit
from bnkit.torch.zoo import MLP

SEEDS = range(20)


def _closed_form(n):
    k = (n - 1) / 2
    return 0.5 * (1 / n + np.log(k) - digamma(k)), 0.5 * math.sqrt(polygamma(1, k) - 1 / k + 2 / n ** 2)


def _bn(channels, seed):
    """A BatchNorm1d with running statistics set per channel, and those (mean, std) in float64."""
    rng = np.random.default_rng(1000 + seed)
    mean, std = rng.normal(0, 2, channels), rng.uniform(0.5, 2, channels)
    bn = nn.BatchNorm1d(channels).eval()
    set_running_stats(bn, mean, std ** 2)
    return bn, mean, std


@pytest.mark.parametrize("n", [2, 3, 10, 100])
def test_sampling_kl_is_the_closed_form_and_what_rows_from_the_running_distribution_score(n):
    """4096 independent channels of n rows drawn from N(running mean, running var): the audit's score (their mean
    KL) is the closed-form expectation within 4 of its standard deviations over 4096 channels, and the channels'
    own KLs (float64 NumPy) spread by the closed-form standard deviation."""
    channels = 4096
    bn, mean, std = _bn(channels, 0)
    x = np.random.default_rng(n).normal(mean, std, (n, channels))
    (s,) = audit(bn, torch.tensor(x, dtype=torch.float32)).shifts
    expected, sd = _closed_form(n)
    assert s.count == n
    assert (s.sampling_kl, s.sampling_kl_sd) == (pytest.approx(expected, rel=1e-9), pytest.approx(sd, rel=1e-6))
    assert abs(s.score - expected) < 4 * sd / math.sqrt(channels)
    kl, _, _ = shift_figures(x, bn)
    assert kl.std() == pytest.approx(sd, rel=0.15)  # the KL's heavy tail at n = 2 makes the sample's sd vary most


@pytest.mark.parametrize("channels", [1, 64])
@pytest.mark.parametrize("n", [2, 3, 10])
def test_rows_from_the_running_distribution_give_no_shift_finding_and_a_3_std_shift_is_an_error(n, channels):
    """Rows drawn from exactly the running distribution, 20 fixed seeds: a single channel clears the noise
    allowance (3 sampling standard deviations) with chance ~2% (simulated; the KL's tail is ~exp(-3)), so at most
    2 of the 20 seeds get a warning or error (3 or more: chance ~0.7%); 64 independent channels, whose mean KL
    varies 8 times less, essentially never. The code before graded the raw score, whose sampling expectation alone
    (0.885 / 0.455 / 0.108 at 2 / 3 / 10 rows) is above the warning level 0.045. The same rows with every
    running mean moved by 3 std (a KL of 4.5 beyond the noise) are an error in every seed with 64 channels."""
    flagged, infos, shifted = 0, [], []
    for seed in SEEDS:
        bn, mean, std = _bn(channels, seed)
        x = torch.tensor(np.random.default_rng(seed).normal(mean, std, (n, channels)), dtype=torch.float32)
        report = audit(bn, x)
        flagged += any(f.severity in ("warning", "error") for f in report.by_code("stat_shift"))
        infos.append([(f.severity, f.data["counts"]) for f in report.by_code("small_data")])
        with torch.no_grad():
            bn.running_mean -= 3 * torch.sqrt(bn.running_var + bn.eps)
        shifted.append([f.severity for f in audit(bn, x).by_code("stat_shift")])
    assert flagged <= 2
    assert infos == [[("info", [n])]] * len(SEEDS)  # what is not graded is said
    if channels > 1 and n <= 3:
        assert shifted == [["error"]] * len(SEEDS)


def test_one_value_per_channel_is_not_graded_and_is_named():
    """A layer fed one row per forward (x.mean(0)) on one batch has no variance to compare: the code before
    called its zero variance a shift (error); now it is named in an info finding and ranked last."""

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.BatchNorm1d(4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.a(x), self.b(x.mean(0, keepdim=True))

    model = Pooled().eval()
    set_running_stats(model.a, 0.0, 1.0)
    set_running_stats(model.b, 0.0, 1.0)
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))  # enough rows for a to be graded
    report = audit(model, x, batch_size=256)
    assert not report.by_code("stat_shift")
    assert [(s.layer, s.count, s.sampling_kl) for s in report.shifts] == [("a", 256, pytest.approx(1 / 256, rel=0.01)),
                                                                          ("b", 1, None)]
    (info,) = report.by_code("small_data")
    assert info.layer == "b" and info.data["counts"] == [1] and "one value per channel" in info.evidence


def _exact_mlp(x):
    """The reviewer's case: zoo MLP, weights N(0, 0.3), running statistics PyTorch's exact mean and unbiased
    variance of each layer's input over all of ``x`` (one training-mode batch with momentum=None)."""
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for m in (model[2], model[5]):
            m.momentum = None
            m.reset_running_stats()
        model.train()(x)
    for m in (model[2], model[5]):
        m.momentum = 0.1
    return model.eval()


def test_two_rows_of_the_calibration_data_give_no_shift_finding_and_a_moved_layer_still_fails():
    x = torch.tensor(np.random.RandomState(1).randn(200, 64) * 2 + 3, dtype=torch.float32)
    model = _exact_mlp(x)
    full = audit(model, x, batch_size=200)
    assert not [f for f in full.by_code("stat_shift") if f.severity != "info"] and not full.by_code("small_data")
    for start in (0, 50, 100, 150):
        report = audit(model, x[start:start + 2])
        assert not report.by_code("stat_shift"), start
        (info,) = report.by_code("small_data")
        assert info.data["layers"] == ["2", "5"] and info.data["counts"] == [2, 2]
    bn = model[2]
    with torch.no_grad():
        bn.running_mean += 3 * torch.sqrt(bn.running_var + bn.eps)
    for start in (0, 50, 100, 150):
        report = audit(model, x[start:start + 2])
        assert [(f.layer, f.severity) for f in report.by_code("stat_shift")] == [("2", "error")]
        assert report.shifts[0].layer == "2" and report.by_code("stat_shift")[0].finding.endswith("(rank 1)")
