"""bnkit.torch.audit with data on models that are not plain feed-forward stacks: outputs that are random in eval mode
(not coupling), batches of a custom class, layers the data never reaches, layers frozen by freeze_bn, and BN
subclasses (one that transposes its input, one with its own arithmetic).

Oracles: float64 NumPy statistics of what each layer normalizes (captured by the test's own hooks), PyTorch's own
modules (the same batch twice, the unfrozen layer, its buffers left as they were).
"""
import copy

import numpy as np
import pytest
import torch
from _helpers import arithmetic_bn_class, assert_shift, set_running_stats, shift_figures
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from bnkit.torch import audit, freeze_bn


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
    assert_shift(s, *shift_figures(np.concatenate(seen), model[1]), count=512)
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
    assert_shift(s, *shift_figures(np.concatenate(seen), model[1]), count=256 * length)
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
    assert_shift(s, *shift_figures(rows, model["masked"]), count=len(rows))
    # its own training-mode arithmetic ran during the pass: the audit leaves its buffers as they were
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
