"""Chapter 1's measuring functions and study/train.py's helpers run on small inputs, against independent
recomputations (float64 NumPy, PyTorch's own BatchNorm)."""
import copy
import itertools

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


@pytest.mark.parametrize("n,b", [(5, 2), (6, 3), (7, 1), (4, 4)])
def test_independent_spread_is_the_std_of_the_mean_over_every_batch_drawn_without_replacement(n, b):
    """Every batch of b of n distinct values is equally likely without replacement: the standard deviation of their
    means over all C(n, b) of them, in population stds, is the spread exactly (finite population correction n - 1,
    not n, nor sqrt(1 / b) as with replacement)."""
    values = np.arange(n, dtype=np.float64) ** 1.5
    means = [values[list(batch)].mean() for batch in itertools.combinations(range(n), b)]
    assert ch_running.independent_spread(n, b) == pytest.approx(np.std(means) / np.std(values), rel=1e-12, abs=1e-15)


def test_convergence_takes_the_floor_from_the_trained_models_training_batches_at_its_momentum(small_convergence):
    """A trace's steps_per_epoch is one epoch's steps, and its spread and floor come from the trained model's batch
    means over the TRAINING images (seeded by the run's seed), the floor from a real nn.BatchNorm1d with the run's
    momentum 0.1 on the new batch fed those means (each as a batch of two around it), from the population mean."""
    conv, model, small = small_convergence
    (trace,) = conv["0.1"]
    assert trace["steps_per_epoch"] == len(batches(300, 32))
    seqs = ch_running.batch_means(model, small.x_train, 32, seed=Context(size="quick").seed)
    for name, (means, mu, sd) in seqs.items():
        assert trace["batch_mean_spread"][name] == pytest.approx(np.mean(means.std(0) / sd), rel=1e-9)
        bn = torch.nn.BatchNorm1d(means.shape[1], momentum=0.1).double().train()
        bn.running_mean.copy_(torch.from_numpy(mu))
        errors = []
        with torch.no_grad():
            for step, b in enumerate(torch.from_numpy(means)):
                bn(torch.stack([b - 1.0, b + 1.0]))
                if step >= len(means) // 2:
                    errors.append(float(np.mean(np.abs(bn.running_mean.numpy() - mu) / sd)))
        assert trace["noise_floor"][name] == pytest.approx(np.mean(errors), rel=1e-6), name


def test_last_epoch_keeps_the_measurements_after_the_previous_epochs_end():
    """Three epochs of 6 steps measured every 3 steps: the last epoch is steps 13-18, so its measurements are those
    at steps 15 and 18; the one at step 12 ends the second epoch, and the first two epochs are not the last."""
    trace = {"step": [3, 6, 9, 12, 15, 18], "steps_per_epoch": 6}
    assert ch_running._last_epoch(trace, ["s3", "s6", "s9", "s12", "s15", "s18"]) == ["s15", "s18"]


def test_batch_means_of_a_later_layer_are_those_of_training_mode_batches():
    """The second BN's input depends on how the first normalizes: in training mode by each batch's own statistics
    (PyTorch's F.batch_norm with training=True is the oracle), not by running statistics set far off here, as an
    eval-mode pass would use them. The reference is the population's mean and std (sqrt(var + eps)) of the input."""
    n, b = 70, 20  # batches of 20, 20 and 30: the mean of the batch means is not the population mean
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(),
                                torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
        model[1].running_var.fill_(0.05)
    x = torch.randn(n, 6)
    means, _, _ = ch_running.batch_means(model, x, b, seed=5)["4"]
    generator = torch.Generator().manual_seed(5)
    order = [idx for _ in range(ch_running.SPREAD_EPOCHS) for idx in batches(n, b, generator=generator)]
    with torch.no_grad():
        expected = [model[3](torch.relu(torch.nn.functional.batch_norm(
            model[0](x[idx]), None, None, model[1].weight, model[1].bias, training=True))).double().mean(0).numpy()
            for idx in order]
    np.testing.assert_allclose(means, np.array(expected), rtol=1e-5, atol=1e-6)
    _, mu, sd = ch_running.batch_means(model, x, b, seed=5)["1"]
    with torch.no_grad():
        h = model[0](x).double()
    np.testing.assert_allclose(mu, h.mean(0).numpy(), rtol=1e-6, atol=1e-9)  # the population's, as the docstring says
    np.testing.assert_allclose(sd, np.sqrt(h.var(0, unbiased=False).numpy() + model[1].eps), rtol=1e-6)


def test_the_floor_check_reads_the_last_epoch_and_the_spread_every_run(tmp_path, monkeypatch):
    """Hand-made traces at their floor all along but for a spike of 5x the floor at the very last step: the last
    epoch (4 points at the floor and the spike: 1.8x) is within 2x of the floor, so the settling check holds though
    the last point alone is not. The reported spread is the mean over every run (0.16, 0.175, 0.19: 0.175), not the
    first momentum's, and the finding counts the last epoch's measurements, not the trace's."""
    p = ch_running.SIZES["quick"]
    n, b = 1347, p["batch_size"]
    per_epoch = len(batches(n, b))
    steps = list(range(p["every"], per_epoch * p["epochs"], p["every"])) + [per_epoch * p["epochs"]]
    assert sum(s > steps[-1] - per_epoch for s in steps) == 5
    traces = {}
    for m, bn1_spread in zip(p["momenta"], (0.16, 0.175, 0.19)):
        floor = {"bn1": ch_running.noise_floor(m, 0.175), "bn2": ch_running.noise_floor(m, 0.023)}
        layers = {layer: {"mean_error": [f] * (len(steps) - 1) + [5 * f if layer == "bn1" else f],
                          "var_error": [0.1] * len(steps)} for layer, f in floor.items()}
        traces[str(m)] = [{"step": steps, "layers": layers, "steps_per_epoch": per_epoch,
                           "batch_mean_spread": {"bn1": bn1_spread, "bn2": 0.023}, "noise_floor": floor,
                           "test_accuracy_eval": 0.95}]
    monkeypatch.setattr(ch_running, "convergence", lambda ctx, p: traces)
    ch = ch_running.run(Context(size="quick", out=tmp_path))
    (settles,) = [k for k in ch.checks if "settles at its noise floor" in k]
    assert ch.checks[settles]
    final = ch.data["final"]["0.1"]["bn1"]
    assert final["mean_error"] > 2 * final["noise_floor"] > final["last_epoch_mean_error"]
    (finding,) = [f for f in ch.findings if f.startswith("Layer bn1:")]
    assert "its batch means spread by 0.175 population std. Over the last epoch (5 measurements)" in finding, finding
