"""Chapter 1's measuring functions and study/train.py's helpers run on small inputs, against independent
recomputations (float64 NumPy, PyTorch's own BatchNorm)."""
import copy

import numpy as np
import pytest
import torch

from bnkit.study import Context
from bnkit.study import running as ch_running
from bnkit.study.data import Digits, load_digits_split
from bnkit.study.models import digits_mlp
from bnkit.study.train import batches, population_stats, stat_shift
from bnkit.torch.modules import bn_layers


def _np_bn1_population(model, x):
    """bn1's input fc1(x) over all of x, float64: (mean, biased var)."""
    w, b = model.fc1.weight.detach().double().numpy(), model.fc1.bias.detach().double().numpy()
    h = x.double().numpy() @ w.T + b
    return h.mean(0), h.var(0)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_population_stats_leave_the_model_untouched(trained, mode):
    """population_stats runs a training-mode pass, which would overwrite the running statistics and leave the model
    in training mode if it ran on the model itself instead of a copy: the model must come back as it was."""
    model = copy.deepcopy(trained[0]).train(mode == "train")
    x = trained[1]
    flags = {n: m.training for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    population_stats(model, x)
    assert {n: m.training for n, m in model.named_modules()} == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_stat_shift_mean_is_what_batchnorm_makes_of_the_mean_with_eps_inside_the_root():
    """The mean shift is |m - m_ref| in the units BatchNorm normalizes by, sqrt(v_ref + eps): PyTorch's own
    F.batch_norm (eval mode, reference as the running statistics) is the oracle. A zero-variance channel shows where
    eps goes: 1 / sqrt(1e-3) = 31.6, not 1 / (0 + 1e-3) = 1000."""
    ref_mean, ref_var = np.array([0.5, 1.0, -2.0]), np.array([0.0, 1e-4, 4.0])
    mean = ref_mean + np.array([1.0, -0.3, 0.7])
    eps = 1e-3
    normalized = torch.nn.functional.batch_norm(
        torch.from_numpy(mean)[None], torch.from_numpy(ref_mean), torch.from_numpy(ref_var), training=False, eps=eps)
    expected = float(normalized.abs().mean())
    shift, _ = stat_shift(ref_mean, ref_var, mean, ref_var, eps)
    assert shift == pytest.approx(expected, rel=1e-12)
    assert stat_shift(np.zeros(1), np.zeros(1), np.ones(1), np.zeros(1), eps)[0] == pytest.approx(1 / np.sqrt(eps))


def test_worked_example_states_pytorchs_rule_with_the_momentum_on_the_new_batch():
    """The finding spells out PyTorch's update rule; the weights come from a real nn.BatchNorm1d (default momentum)
    fed one batch: running goes from r0 to r0 + w (b - r0), so the new batch weighs w and the old value 1 - w."""
    bn = torch.nn.BatchNorm1d(1).double().train()
    with torch.no_grad():
        bn.running_mean.fill_(2.0)
        bn(torch.tensor([[9.0], [11.0]], dtype=torch.float64))  # batch mean 10
    w = round((float(bn.running_mean[0]) - 2.0) / (10.0 - 2.0), 12)
    _, _, findings, _ = ch_running.worked_example()
    assert any(f"(running = {1 - w:g} * running + {w:g} * batch)" in f for f in findings), findings


@pytest.fixture(scope="module")
def small_convergence():
    """chapter 1's convergence on 300 training and 120 test images of the digits, one epoch, momentum 0.1, with the
    model it trained kept for the checks."""
    full = load_digits_split(seed=0)
    small = Digits(full.x_train[:300], full.y_train[:300], full.x_test[:120], full.y_test[:120])
    made = []

    def make():
        model = digits_mlp()
        made.append(model)
        return model

    mp = pytest.MonkeyPatch()
    mp.setattr(ch_running, "load_digits_split", lambda seed: small)
    mp.setattr(ch_running, "digits_mlp", make)
    try:
        p = {"seeds": 1, "epochs": 1, "batch_size": 32, "every": 3, "momenta": (0.1,)}
        conv = ch_running.convergence(Context(size="quick"), p)
    finally:
        mp.undo()
    (model,) = made
    return conv, model, small


def test_convergence_trains_with_the_momentum_it_reports(small_convergence):
    """The trace filed under momentum 0.1 comes from BN layers updating with PyTorch's momentum 0.1 (weight 0.1 on the
    new batch), not with alpha = 0.9 written into PyTorch's momentum."""
    conv, model, _ = small_convergence
    assert list(conv) == ["0.1"]
    assert [bn.momentum for _, bn in bn_layers(model)] == [0.1, 0.1]


def test_convergence_measures_the_running_mean_in_population_stds_of_the_test_set_model(small_convergence):
    """The last point of the trace is the trained model's bn1 running statistics against the exact population ones,
    recomputed in float64 NumPy: the mean error in population stds (not running ones), and the eval-mode accuracy on
    the TEST images."""
    conv, model, small = small_convergence
    (trace,) = conv["0.1"]
    mu, var = _np_bn1_population(model, small.x_train)
    rm, rv = model.bn1.running_mean.double().numpy(), model.bn1.running_var.double().numpy()
    eps = model.bn1.eps
    assert trace["layers"]["bn1"]["mean_error"][-1] == pytest.approx(
        np.mean(np.abs(rm - mu) / np.sqrt(var + eps)), rel=1e-6)
    assert trace["layers"]["bn1"]["var_error"][-1] == pytest.approx(
        np.mean(np.abs(np.log((rv + eps) / (var + eps)))), rel=1e-6)
    # the swapped reference (running stds) would be a different number here
    assert not np.isclose(np.mean(np.abs(rm - mu) / np.sqrt(rv + eps)), np.mean(np.abs(rm - mu) / np.sqrt(var + eps)),
                          rtol=1e-3)
    model.eval()
    with torch.no_grad():
        test_acc = float((model(small.x_test).argmax(1) == small.y_test).double().mean())
        train_acc = float((model(small.x_train).argmax(1) == small.y_train).double().mean())
    assert trace["test_accuracy_eval"] == pytest.approx(test_acc, abs=1e-12)
    assert train_acc != test_acc  # so the training set's accuracy would be caught
    assert trace["step"][-1] == len(batches(300, 32))


def _traces(p):
    """Hand-made chapter-1 traces whose errors move over training, so the first point, the last point and the last
    epoch's mean each rank the momenta differently."""
    n, b = 1347, p["batch_size"]
    per_epoch = len(batches(n, b))
    steps = list(range(p["every"], per_epoch * p["epochs"], p["every"])) + [per_epoch * p["epochs"]]
    t = np.linspace(0.0, 1.0, len(steps))
    shapes = {  # momentum -> layer -> error along the steps
        "0.01": {"bn1": 0.05 + 0.01 * t, "bn2": 0.9 - 0.85 * t},
        "0.1": {"bn1": 0.4 - 0.3 * t, "bn2": 0.02 + 0.05 * t},
        "0.5": {"bn1": 0.2 - 0.05 * t ** 8, "bn2": 0.5 - 0.47 * t ** 8},
    }
    out = {}
    for m in p["momenta"]:
        layers = {layer: {"mean_error": [float(v) for v in err], "var_error": [0.1] * len(steps)}
                  for layer, err in shapes[str(m)].items()}
        out[str(m)] = [{"step": steps, "layers": layers, "steps_per_epoch": per_epoch,
                        "batch_mean_spread": {"bn1": 0.175, "bn2": 0.023}, "noise_floor": {"bn1": 0.03, "bn2": 0.004},
                        "test_accuracy_eval": 0.95}]
    return out


def test_the_table_reports_the_last_point_and_the_findings_rank_by_the_last_epoch(tmp_path, monkeypatch):
    """The summary's "mean err" is the error after the LAST step (its title says "after N epochs"), and each layer's
    finding names as closest the momentum with the smallest last-epoch mean error and as farthest the largest."""
    p = ch_running.SIZES["quick"]
    traces = _traces(p)
    monkeypatch.setattr(ch_running, "convergence", lambda ctx, p: traces)
    ch = ch_running.run(Context(size="quick", out=tmp_path))
    summary = ch.tables[1]
    rows = {(r[0], r[1]): r for r in summary.rows}
    for m, (tr,) in traces.items():
        start = tr["step"][-1] - tr["steps_per_epoch"]
        for layer, err in tr["layers"].items():
            last = err["mean_error"][-1]
            assert rows[(m, layer)][2] == f"{last:.4f}"
            assert ch.data["final"][m][layer]["mean_error"] == pytest.approx(last)
            settled = np.mean([v for s, v in zip(tr["step"], err["mean_error"]) if s > start])
            assert ch.data["final"][m][layer]["last_epoch_mean_error"] == pytest.approx(settled)
    for layer in ("bn1", "bn2"):
        settled = {m: ch.data["final"][m][layer]["last_epoch_mean_error"] for m in traces}
        best, worst = min(settled, key=settled.get), max(settled, key=settled.get)
        assert best != worst
        (finding,) = [f for f in ch.findings if f.startswith(f"Layer {layer}:")]
        assert f"momentum {best} is closest" in finding and f"momentum {worst} farthest" in finding, finding


def test_ema_noise_floor_is_pytorchs_running_mean_fed_the_same_batches():
    """ema_noise_floor against a real nn.BatchNorm1d (momentum on the new batch) fed the same reshuffled batches of a
    per-sample layer's outputs from the population mean: the same channel-mean error over the second half."""
    n, b, momentum = 300, 20, 0.1
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    model = torch.nn.Sequential(lin, torch.nn.BatchNorm1d(8))
    x = torch.rand(n, 64)
    means, mu, sd = ch_running.batch_means(model, x, b, seed=3)["1"]
    with torch.no_grad():
        h = lin(x).double()
    bn = torch.nn.BatchNorm1d(8, momentum=momentum).double().train()
    bn.running_mean.copy_(torch.from_numpy(mu))
    generator = torch.Generator().manual_seed(3)  # batch_means' own schedule: SPREAD_EPOCHS reshuffled epochs
    order = [idx for _ in range(ch_running.SPREAD_EPOCHS) for idx in batches(n, b, generator=generator)]
    errors = []
    with torch.no_grad():
        for step, idx in enumerate(order):
            bn(h[idx])
            if step >= len(order) // 2:
                errors.append(float(np.mean(np.abs(bn.running_mean.numpy() - mu) / sd)))
    assert len(means) == len(order)
    assert ch_running.ema_noise_floor(means, mu, sd, momentum) == pytest.approx(np.mean(errors), rel=1e-5)


@pytest.mark.parametrize("n,b,momentum,low,high", [
    (4000, 16, 0.1, 0.9, 1.05),  # 250 batches an epoch: the window of 10 steps sees nearly independent batches
    (1347, 32, 0.01, 0.2, 0.6),  # chapter 1's 42 batches an epoch, a window of 100 steps: anti-correlated means
])
def test_ema_noise_floor_meets_the_independent_closed_form_only_for_short_windows(n, b, momentum, low, high):
    """For batches of a per-sample layer the measured floor is sqrt(2/pi) sqrt(m/(2-m)) sqrt((n-B)/(B(n-1))) when
    the EMA's window is a small part of an epoch, and well below it when the window spans epochs."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32))
    (seq,) = ch_running.batch_means(model, torch.randn(n, 16), b, seed=0).values()
    closed = ch_running.noise_floor(momentum, ch_running.independent_spread(n, b))
    assert low <= ch_running.ema_noise_floor(*seq, momentum) / closed <= high
