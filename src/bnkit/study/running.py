"""Chapter 1: running statistics track the population, checked on the lesson's table and on a trained network.

The lesson's worked example keeps ``running = 0.9 * running + 0.1 * batch_mean``
(alpha = 0.9 on the old value; PyTorch writes the same rule with
``momentum = 0.1`` on the new value, torch/nn/modules/batchnorm.py) from 0 over
batch means 4.2, 3.8, 4.1 and then about 4.0. The exact column comes from
:func:`bnkit.stats.ema_table`, with the bias-corrected mean
``running / (1 - 0.9**t)`` beside it, and is checked against a real
``nn.BatchNorm1d`` fed batches with those means.

On the network, the distance between each BN layer's running statistics and
the exact population statistics of its input (:func:`..train.population_stats`)
is followed through training for several momenta: the mean error in units of
the population standard deviation, ``mean_c |rm_c - mu_c| / sqrt(var_c + eps)``,
and the variance error ``mean_c |log(rv_c / var_c)|``. The running mean does not converge to the
population mean: it settles at a noise floor once the EMA's window of about ``1 / m`` steps has
passed, or above it where the weights drift faster than that window follows. The floor is measured
with the trained model's own batch means (:func:`batch_means`: reshuffled epochs, weights fixed)
fed through PyTorch's update ``r <- (1 - m) r + m b`` (``m`` weighs the new batch) by
:func:`ema_noise_floor`. For independent batches it is :func:`noise_floor`, ``sqrt(2 / pi)
sqrt(m / (2 - m))`` times one batch mean's standard deviation (the *spread*; for a layer whose input
is computed per sample, batches of ``B`` drawn without replacement from ``n`` samples give
``sqrt((n - B) / (B (n - 1)))`` population standard deviations); the batches of one epoch partition
the data, so their means are anti-correlated and a window spanning much of an epoch sits lower.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ..audit_state import ema_noise_factor
from ..stats import ema_table
from ..torch.modules import bn_layers
from . import Context
from .data import load_digits_split
from .models import bn_legend, bn_places, digits_mlp
from .report import Chapter, Figure, Table, new_figure, save_figure
from .train import accuracy, batches, fit, population_stats, running_stats, stat_shift

NUMBER = 1
PLOTS = ("ch1_worked_example.png", "ch1_running_vs_population.png")
TITLE = "Running statistics track the population"
CLAIM = (
    "An exponential moving average of batch statistics approaches the population statistics and then wobbles "
    "around them by a noise floor set by its momentum and the batch size (it never converges), so eval mode can "
    "normalize without a batch (the lesson's worked example and its figures)."
)
REQUIRES: tuple[str, ...] = ()
SIZES = {
    "quick": {"seeds": 1, "epochs": 2, "batch_size": 32, "every": 10, "momenta": (0.01, 0.1, 0.5)},
    "demo": {"seeds": 1, "epochs": 6, "batch_size": 32, "every": 5, "momenta": (0.01, 0.1, 0.5)},
    "full": {"seeds": 3, "epochs": 20, "batch_size": 32, "every": 5, "momenta": (0.01, 0.03, 0.1, 0.3, 0.5)},
}
#: Momenta whose averaging window (about 1 / m steps) is at most this many steps are checked against their noise
#: floor at the end of training; smaller ones still lag the weights' drift there.
FLOOR_WINDOW = 10
#: The checks' tolerance: the last epoch's mean error at least the noise floor over this factor (every layer), and
#: within this factor of it either way in the first layer, whose input is computed per sample.
FLOOR_FACTOR = 2.0
#: Reshuffled epochs of batches over which :func:`batch_means` collects the trained model's batch means.
SPREAD_EPOCHS = 10

#: The lesson's table: batch -> (batch mean it gives, running mean it states as printed).
LESSON_DECAY = 0.9
LESSON_MEANS = (4.2, 3.8, 4.1)
LESSON_FILL = 4.0  # "~4.0" for every later batch
LESSON_STATED = {1: "0.42", 2: "0.758", 3: "1.092", 10: "3.58", 50: "3.98"}


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def _torch_running_means(series: list[float], momentum: float) -> list[float]:
    """``running_mean`` of a real ``nn.BatchNorm1d(1)`` after each batch ``[m - 1, m + 1]`` (batch mean ``m``)."""
    bn = torch.nn.BatchNorm1d(1, momentum=momentum).double()
    bn.train()
    out = []
    with torch.no_grad():
        for m in series:
            bn(torch.tensor([[m - 1.0], [m + 1.0]], dtype=torch.float64))
            out.append(float(bn.running_mean[0]))
    return out


def worked_example() -> tuple[Table, dict, list[str], dict[str, bool]]:
    steps = max(LESSON_STATED)
    series = list(LESSON_MEANS) + [LESSON_FILL] * (steps - len(LESSON_MEANS))
    rows = ema_table(series, LESSON_DECAY, 0.0)
    torch_momentum = torch.nn.BatchNorm1d(1).momentum
    torch_rows = _torch_running_means(series, 1.0 - LESSON_DECAY)
    table = Table(
        f"The lesson's worked example, recomputed (alpha = {LESSON_DECAY:g} on the old value, start 0; "
        f"batches {len(LESSON_MEANS) + 1}-{steps} have mean {LESSON_FILL})",
        ["batch", "mean", "lesson", "EMA", "nn.BN1d", "corrected", "verdict"],
        notes=[f"mean: the batch's mean; lesson: the running mean the lesson states; EMA: the exact running mean "
               f"(float64, from 0); nn.BN1d: running_mean of a real nn.BatchNorm1d(momentum="
               f"{1 - LESSON_DECAY:g}); corrected: bias-corrected EMA / (1 - {LESSON_DECAY:g}^t)."],
    )
    verdicts = {}
    for t, stated in LESSON_STATED.items():
        _, v, run, corr = rows[t - 1]
        right = round(run, _decimals(stated)) == float(stated)
        verdicts[t] = right
        table.add(t, f"{v:g}", stated, f"{run:.4f}", f"{torch_rows[t - 1]:.4f}", f"{corr:.4f}",
                  "right" if right else "WRONG")
    longer = ema_table(series + [LESSON_FILL] * 200, LESSON_DECAY, 0.0)
    reach_steps = next(t for t, _, run, _ in longer if run >= float(LESSON_STATED[10]))
    findings = []
    for t, right in verdicts.items():
        if not right:
            findings.append(
                f"The lesson's running mean after {t} batches ({LESSON_STATED[t]}) is wrong: "
                f"it is {rows[t - 1][2]:.3f}. "
                f"An EMA started at 0 only reaches {LESSON_STATED[10]} after {reach_steps} batches; "
                f"the bias-corrected mean is {rows[t - 1][3]:.3f} already."
            )
    findings.append(
        f"PyTorch's default BatchNorm momentum is {torch_momentum:g}, the weight on the NEW batch "
        f"(running = {1 - torch_momentum:g} * running + {torch_momentum:g} * batch): the lesson's "
        f"'momentum, weight given to the current running value (default 0.9 in PyTorch notation)' "
        f"describes alpha = {1 - torch_momentum:g}; in PyTorch notation it is momentum = {torch_momentum:g}."
    )
    max_torch_diff = max(abs(a - r[2]) for a, r in zip(torch_rows, rows))
    checks = {
        "nn.BatchNorm1d's running_mean equals the exact EMA column": max_torch_diff < 1e-12,
        # an identity for a right correction (a weighted mean of the batch means); a wrong one strays (the EMA from 0
        # is 3.58 away at the first batch)
        f"the bias-corrected mean never strays from {LESSON_FILL} more than the batch means do": all(
            abs(r[3] - LESSON_FILL) <= max(abs(v - LESSON_FILL) for v in series) + 1e-12 for r in rows),
    }
    data = {
        "decay": LESSON_DECAY,
        "series": series,
        "running": [r[2] for r in rows],
        "bias_corrected": [r[3] for r in rows],
        "torch_running_mean": torch_rows,
        "torch_default_momentum": torch_momentum,
        "lesson_stated": LESSON_STATED,
        "lesson_right": {str(k): v for k, v in verdicts.items()},
        "batches_to_reach_lesson_value_at_10": reach_steps,
        "max_abs_diff_torch_vs_exact": max_torch_diff,
    }
    return table, data, findings, checks


def noise_floor(momentum: float, spread: float) -> float:
    """For independent batches: the channel mean of ``|running mean - population mean|`` that sampling noise alone
    leaves once the EMA has settled, in the unit of ``spread`` (one batch mean's standard deviation):
    ``sqrt(2 / pi) sqrt(m / (2 - m)) spread``, for PyTorch's momentum ``m``
    (:func:`bnkit.audit_state.ema_noise_factor`) and ``E|N(0, s^2)| = s sqrt(2 / pi)``. Weights taken as fixed. The
    batches of one shuffled epoch partition the data, so their means are anti-correlated: where the EMA's window of
    about ``1 / m`` steps spans much of an epoch the floor is lower (:func:`ema_noise_floor` measures it)."""
    return math.sqrt(2 / math.pi) * ema_noise_factor(momentum) * spread


def independent_spread(n: int, batch_size: int) -> float:
    """One batch mean's standard deviation, in population standard deviations, for ``batch_size`` of ``n`` samples
    drawn without replacement from values computed per sample: ``sqrt((n - B) / (B (n - 1)))``."""
    return math.sqrt((n - batch_size) / (batch_size * (n - 1)))


def batch_means(model: torch.nn.Module, x: torch.Tensor, batch_size: int,
                seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{bn_name: (means, mu, sd)}``: each BN layer's batch means, ``(steps, C)`` float64, over
    :data:`SPREAD_EPOCHS` reshuffled epochs of ``x`` batched as training batches them (training mode on a copy,
    every BN layer normalizing with its batch's statistics as in training, weights fixed), and its input's
    population mean and standard deviation (:func:`..train.population_stats`, ``sqrt(var + eps)``)."""
    work = copy.deepcopy(model).train()
    means: dict[str, list[np.ndarray]] = {name: [] for name, _ in bn_layers(work)}
    hooks = [bn.register_forward_pre_hook(
        lambda _m, inputs, name=name: means[name].append(inputs[0].detach().double().mean(0).numpy()))
        for name, bn in bn_layers(work)]
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for _ in range(SPREAD_EPOCHS):
                for idx in batches(len(x), batch_size, generator=generator):
                    work(x[idx])
    finally:
        for h in hooks:
            h.remove()
    pop = population_stats(model, x)
    eps = {name: bn.eps for name, bn in bn_layers(model)}
    return {name: (np.array(m), pop[name][0], np.sqrt(pop[name][1] + eps[name])) for name, m in means.items()}


def batch_mean_spread(means: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> float:
    """The channel mean of the standard deviation of one layer's batch means (as :func:`batch_means` gives them),
    in population standard deviations ``sd``."""
    return float(np.mean(np.std(means, axis=0) / sd))


def ema_noise_floor(means: np.ndarray, mu: np.ndarray, sd: np.ndarray, momentum: float) -> float:
    """The channel mean of ``|r - mu| / sd`` for PyTorch's running mean ``r <- (1 - m) r + m b`` fed the batch means
    ``means`` (``(steps, C)``) from ``r = mu``, averaged over the second half of the steps (by then the noise has
    built up: ``1 - (1 - m)^steps`` of its stationary variance, 98.5 % at m = 0.01 over 420 steps)."""
    r = mu.astype(np.float64).copy()
    errors = []
    for step, b in enumerate(means):
        r += momentum * (b - r)
        if step >= len(means) // 2:
            errors.append(float(np.mean(np.abs(r - mu) / sd)))
    return float(np.mean(errors))


def _distances(pop: dict, run: dict, eps: float) -> dict[str, tuple[float, float]]:
    out = {}
    for name, (mu, var) in pop.items():
        rm, rv = run[name]
        out[name] = stat_shift(mu, var, rm, rv, eps)
    return out


def convergence(ctx: Context, p: dict) -> dict:
    """Train one MLP per momentum and seed, measuring the distance to the population every ``every`` steps."""
    digits = load_digits_split(seed=ctx.seed)
    results: dict = {}
    for momentum in p["momenta"]:
        per_seed = []
        for s in range(p["seeds"]):
            torch.manual_seed(ctx.seed + s)
            model = digits_mlp()
            for _, bn in bn_layers(model):
                bn.momentum = momentum
            eps = bn_layers(model)[0][1].eps
            trace: dict = {"step": [], "layers": {}}

            def measure(step: int, final: bool = False) -> None:
                if step % p["every"] and not final:
                    return
                with torch.no_grad():
                    d = _distances(population_stats(model, digits.x_train), running_stats(model), eps)
                trace["step"].append(step)
                for name, (me, ve) in d.items():
                    trace["layers"].setdefault(name, {"mean_error": [], "var_error": []})
                    trace["layers"][name]["mean_error"].append(me)
                    trace["layers"][name]["var_error"].append(ve)

            steps = fit(model, digits.x_train, digits.y_train, epochs=p["epochs"], batch_size=p["batch_size"],
                        lr=1e-3, seed=ctx.seed + s, on_step=measure, on_epoch=lambda _e: ctx.tracker.advance())
            if trace["step"][-1:] != [steps]:  # the last point is the trained model the test accuracy is of
                measure(steps, final=True)
            trace["steps_per_epoch"] = steps // p["epochs"]
            seqs = batch_means(model, digits.x_train, p["batch_size"], ctx.seed + s)
            trace["batch_mean_spread"] = {name: batch_mean_spread(*seq) for name, seq in seqs.items()}
            trace["noise_floor"] = {name: ema_noise_floor(*seq, momentum) for name, seq in seqs.items()}
            trace["test_accuracy_eval"] = accuracy(model, digits.x_test, digits.y_test)
            per_seed.append(trace)
        results[str(momentum)] = per_seed
    return results


def _plot_example(data: dict, out) -> str:
    fig, axes = new_figure()
    ax = axes[0, 0]
    t = np.arange(1, len(data["running"]) + 1)
    ax.plot(t, data["series"], "k:", label="batch mean")
    ax.plot(t, data["running"], "-o", ms=3, label=f"running mean (EMA from 0, alpha {data['decay']:g})")
    ax.plot(t, data["bias_corrected"], "-s", ms=3, label="bias-corrected running mean")
    stated = {int(k): float(v) for k, v in data["lesson_stated"].items()}
    ax.scatter(list(stated), list(stated.values()), marker="x", s=70, c="red", zorder=5, label="the lesson's figures")
    ax.set_xlabel("batch (update step)")
    ax.set_ylabel("feature mean (activation units)")
    ax.set_title("The lesson's worked example, exactly")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, out, PLOTS[0])


def _last_epoch(trace: dict, values: list) -> list:
    """The ``values`` measured during the last epoch of ``trace`` (after its first step)."""
    start = trace["step"][-1] - trace["steps_per_epoch"]
    return [v for step, v in zip(trace["step"], values) if step > start]


def _plot_convergence(conv: dict, floors: dict, p: dict, out) -> str:
    layers = list(next(iter(conv.values()))[0]["layers"])
    places = bn_places(digits_mlp())
    fig, axes = new_figure(2, len(layers), width=5.2, height=3.6)
    for j, layer in enumerate(layers):
        for momentum, per_seed in conv.items():
            steps = np.array(per_seed[0]["step"])
            for i, key in enumerate(("mean_error", "var_error")):
                curves = np.array([tr["layers"][layer][key] for tr in per_seed])
                line = axes[i, j].plot(steps, curves.mean(0), label=f"momentum {momentum}")[0]
                if key == "mean_error":  # the level sampling noise alone leaves
                    axes[i, j].axhline(floors[momentum][layer], color=line.get_color(), ls="--", lw=0.8)
                if len(per_seed) > 1:
                    axes[i, j].fill_between(steps, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2)
        axes[0, j].set_title(f"BN layer {layer}, {places.get(layer, '')}")
        axes[0, j].set_ylabel("|running mean - population mean|\n(population std units, mean over channels)")
        axes[1, j].set_ylabel("|log(running var / population var)|\n(mean over channels)")
        for i in range(2):
            axes[i, j].set_yscale("log")
            axes[i, j].set_xlabel(f"optimizer step (batch size {p['batch_size']})")
            axes[i, j].grid(alpha=0.3, which="both")
            axes[i, j].legend(fontsize=8)
    return save_figure(fig, out, PLOTS[1])


def run(ctx: Context) -> Chapter:
    p = ctx.params(SIZES)
    ctx.tracker.start(f"{NUMBER}. {TITLE}", len(p["momenta"]) * p["seeds"] * p["epochs"])
    table, example, findings, checks = worked_example()
    conv = convergence(ctx, p)
    n, b = len(load_digits_split(seed=ctx.seed).x_train), p["batch_size"]
    layers = list(next(iter(conv.values()))[0]["layers"])
    # mean over every run (the momentum changes only the running statistics, not the weights trained)
    spread = {layer: float(np.mean([tr["batch_mean_spread"][layer] for per_seed in conv.values() for tr in per_seed]))
              for layer in layers}
    floors = {m: {layer: float(np.mean([tr["noise_floor"][layer] for tr in per_seed])) for layer in layers}
              for m, per_seed in conv.items()}
    summary = Table(
        f"Running vs population statistics of each BN layer after {p['epochs']} epochs "
        f"(batch size {b}, mean over {p['seeds']} seed(s))",
        ["momentum", "layer", "mean err", "last epoch", "floor", "var err", "test acc"],
        notes=["mean err: mean over channels of |running mean - population mean| in population std, after the last "
               "step; last epoch: its mean over the last epoch's measurements; floor: what sampling noise alone "
               "leaves: the same error for PyTorch's update with momentum m fed the trained model's own batch means "
               f"over {SPREAD_EPOCHS} reshuffled epochs (weights fixed); var err: mean over channels of "
               "|log(running var / population var)|, after the last step; test acc: eval-mode test accuracy.",
               bn_legend(digits_mlp())],
    )
    final: dict = {}
    for momentum, per_seed in conv.items():
        acc = float(np.mean([tr["test_accuracy_eval"] for tr in per_seed]))
        for layer in layers:
            me = float(np.mean([tr["layers"][layer]["mean_error"][-1] for tr in per_seed]))
            ve = float(np.mean([tr["layers"][layer]["var_error"][-1] for tr in per_seed]))
            settled = float(np.mean([np.mean(_last_epoch(tr, tr["layers"][layer]["mean_error"])) for tr in per_seed]))
            floor = floors[momentum][layer]
            final.setdefault(momentum, {})[layer] = {"mean_error": me, "var_error": ve,
                                                     "last_epoch_mean_error": settled, "noise_floor": floor}
            summary.add(momentum, layer, f"{me:.4f}", f"{settled:.4f}", f"{floor:.4f}", f"{ve:.4f}", f"{acc:.3f}")
    first = next(iter(conv.values()))[0]
    points = len(_last_epoch(first, first["step"]))
    for layer in layers:
        best = min(final, key=lambda m: final[m][layer]["last_epoch_mean_error"])
        worst = max(final, key=lambda m: final[m][layer]["last_epoch_mean_error"])
        findings.append(
            f"Layer {layer}: its batch means spread by {spread[layer]:.3f} population std. Over the last epoch "
            f"({points} measurements) momentum {best} is closest to the population mean on average "
            f"({final[best][layer]['last_epoch_mean_error']:.4f} std, noise floor {floors[best][layer]:.4f}), "
            f"momentum {worst} farthest ({final[worst][layer]['last_epoch_mean_error']:.4f}, floor "
            f"{floors[worst][layer]:.4f})."
        )
    independent = independent_spread(n, b)
    settled_momenta = [m for m in conv if 1 / float(m) <= FLOOR_WINDOW]
    head = layers[0]
    findings.append(
        f"The running mean never converges: it wobbles at a floor set by the momentum and by how much the batch "
        f"means vary. In {head}, whose input is computed per sample, they vary as independent samples' do "
        f"({spread[head]:.3f} std measured, {independent:.3f} for {b} of {n} samples drawn without replacement); "
        f"layers after a BN layer that normalizes each batch by its own statistics vary less "
        + ", ".join(f"({layer}: {spread[layer]:.3f})" for layer in layers[1:])
        + ", so their floor is lower and the lag behind the weights' drift can exceed it.")
    findings.append(
        f"In {head}, each momentum's measured floor against the closed form for independent batches, sqrt(2/pi) "
        "sqrt(m/(2-m)) times the spread: "
        + ", ".join(f"{m}: {floors[m][head]:.4f} vs {noise_floor(float(m), spread[head]):.4f}" for m in conv)
        + f". The {len(batches(n, b))} batches of an epoch partition the data, so their means are anti-correlated and "
        "a window of 1/m steps spanning much of an epoch sits below the closed form.")
    checks[f"{head}'s batch means vary as independent samples' do: measured spread within 10% of "
           f"sqrt((n-B)/(B(n-1))) = {independent:.3f}"] = abs(spread[head] / independent - 1) <= 0.1
    if settled_momenta:
        ms = ", ".join(settled_momenta)
        checks[f"with momentum {ms} every layer's last-epoch mean error stays above 1/{FLOOR_FACTOR:g} of its noise "
               "floor (the running mean does not converge)"] = all(
            final[m][layer]["last_epoch_mean_error"] >= floors[m][layer] / FLOOR_FACTOR
            for m in settled_momenta for layer in layers)
        checks[f"with momentum {ms} {head}'s running mean settles at its noise floor: the last epoch's mean error "
               f"is within {FLOOR_FACTOR:g}x of it, either way"] = all(
            floors[m][head] / FLOOR_FACTOR <= final[m][head]["last_epoch_mean_error"] <= floors[m][head] * FLOOR_FACTOR
            for m in settled_momenta)
    figures = [
        Figure(_plot_example(example, ctx.out),
               "The lesson's table: the EMA from 0 (blue) lags; red crosses are the lesson's figures."),
        Figure(
            _plot_convergence(conv, floors, p, ctx.out),
            "Distance between running and exact population statistics during training, per BN layer and momentum; "
            "dashed: each momentum's noise floor (log scale).",
        ),
    ]
    return Chapter(
        NUMBER, "running-stats", TITLE, CLAIM, tables=[table, summary], figures=figures, findings=findings,
        checks=checks, data={"worked_example": example, "convergence": conv, "final": final, "params": p},
    )
