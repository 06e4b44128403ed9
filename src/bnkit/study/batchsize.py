"""Chapter 3: batch size and the quality of the statistics.

For each training batch size and seed an MLP is trained on digits for the same
number of epochs, or for at least ``min_steps`` optimizer steps where those
epochs give fewer (so a large batch is not simply undertrained), and scored in
eval mode with:

* ``EMA``: PyTorch's running statistics (momentum 0.1 on the new batch,
  unbiased batch variance fed to ``running_var``);
* ``recalibrated``: the same weights with the population statistics of the training set
  (:func:`bnkit.torch.recalibrate`, one float64 pass in batches of 256: exact for the first BN; the second's
  input depends on the first normalizing with each batch's statistics, 1.4e-3 std and 7e-3 of the variance
  away from a pass in one batch, some 70x below the EMA's error at batch 2);
* ``batch renorm``: a separate model trained with bnkit's drop-in layer,
  ``convert_bn(model, renorm=True)`` (Ioffe 2017: ``y = (x - mu_B)/sigma_B * r + d``
  with ``r, d`` clipped at ``rmax = 3``, ``dmax = 5``), so training already
  normalizes with the running statistics' scale and shift;
* ``LayerNorm``: the same MLP with ``nn.LayerNorm`` in place of BatchNorm, the
  batch-independent reference (it normalizes each image over its features).

At the smallest batch size the gap from the EMA to LayerNorm (mean accuracy
over seeds) is the small-batch loss; the share of it that recalibration and
batch renormalization recover, ``(acc - EMA) / (LayerNorm - EMA)``, tells how
much of the loss is the running statistics' noise (what exact statistics
remove) rather than weights trained on noisy batch statistics.

A method whose ``bnkit.torch`` function is missing in this build is reported
as not available, never estimated.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from ..torch.modules import bn_layers
from . import Context, missing_dependencies
from .data import load_digits_split
from .models import digits_mlp, layernorm_mlp
from .report import Chapter, Figure, Table, new_figure, save_figure
from .train import accuracy, batches, fit, stat_shift

NUMBER = 3
PLOTS = ("ch3_batch_size.png",)
TITLE = "Batch size and statistics quality"
CLAIM = (
    "An EMA of batch statistics inherits their noise: with small training batches the running statistics stray "
    "from the exact ones and eval accuracy falls. Most of that loss is not the running statistics' noise: exact "
    "statistics for the same weights recover less than half of the gap to a batch-independent norm (LayerNorm), "
    "batch renormalization, which changes training, recovers more."
)
REQUIRES: tuple[str, ...] = ()
SIZES = {
    # three seeds even when quick: at batch size 2 one seed's recalibrated and EMA accuracies can tie or swap
    "quick": {"seeds": 3, "epochs": 2, "min_steps": 150, "batch_sizes": (2, 8, 32)},
    "demo": {"seeds": 3, "epochs": 3, "min_steps": 300, "batch_sizes": (2, 4, 8, 16, 32, 128)},
    "full": {"seeds": 5, "epochs": 10, "min_steps": 1000, "batch_sizes": (2, 4, 8, 16, 32, 64, 128, 256)},
}
#: key -> (label in the plot, column header, what the header means, the ``bnkit.torch`` names it needs)
METHODS = {
    "ema": ("EMA running statistics", "EMA", "PyTorch's running statistics", ()),
    "recalibrated": ("recalibrated (one pass)", "recal",
                     "the same weights, training-set statistics recomputed (bnkit.torch.recalibrate)", ("recalibrate",)),
    "renorm": ("batch renorm (drop-in layer)", "renorm",
               "trained with batch renormalization (convert_bn(renorm=True))", ("convert_bn",)),
    "layernorm": ("LayerNorm (no batch statistics)", "LayerNorm", "LayerNorm in place of BN, no batch statistics",
                  ()),
}


def epochs_for(n: int, bs: int, p: dict) -> int:
    """``p["epochs"]``, or more where that many epochs give fewer than ``p["min_steps"]`` steps."""
    return max(p["epochs"], math.ceil(p["min_steps"] / len(batches(n, bs))))


def _train(make, digits, bs: int, epochs: int, seed: int, tracker) -> nn.Module:
    torch.manual_seed(seed)
    model = make()
    fit(model, digits.x_train, digits.y_train, epochs=epochs, batch_size=bs, seed=seed)
    tracker.advance()
    return model


def _one(digits, bs: int, p: dict, seed: int, available: dict[str, bool], tracker) -> dict:
    import bnkit.torch as bt

    x, y = digits.x_test, digits.y_test
    out: dict = {}
    epochs = epochs_for(len(digits.x_train), bs, p)
    bn_model = _train(digits_mlp, digits, bs, epochs, seed, tracker)
    out["epochs"] = epochs
    bn_model.eval()
    out["ema"] = accuracy(bn_model, x, y)
    if available["recalibrated"]:
        recal = copy.deepcopy(bn_model)
        data = [digits.x_train[i] for i in batches(len(digits.x_train), 256)]
        bt.recalibrate(recal, data, progress=False)
        out["recalibrated"] = accuracy(recal, x, y)
        shifts = {name: stat_shift(b.running_mean.double().numpy(), b.running_var.double().numpy(),
                                   a.running_mean.double().numpy(), a.running_var.double().numpy(), b.eps)
                  for (name, a), (_, b) in zip(bn_layers(bn_model), bn_layers(recal))}
        out["running_vs_exact_mean_shift_std"] = {name: mean for name, (mean, _) in shifts.items()}
        out["running_vs_exact_log_var_ratio"] = {name: log_var for name, (_, log_var) in shifts.items()}
    if available["renorm"]:
        renorm = _train(lambda: bt.convert_bn(digits_mlp(), renorm=True, rmax=3.0, dmax=5.0), digits, bs, epochs, seed,
                        tracker)
        out["renorm"] = accuracy(renorm, x, y)
    out["layernorm"] = accuracy(_train(layernorm_mlp, digits, bs, epochs, seed, tracker), x, y)
    return out


def _plot(res: dict, p: dict, methods: list[str], out) -> str:
    fig, axes = new_figure(width=7.0, height=4.4)
    ax = axes[0, 0]
    bss = list(p["batch_sizes"])
    for key, marker in zip(methods, "osD^"):
        acc = np.array([[res[bs][s][key] for bs in bss] for s in range(p["seeds"])])
        line = ax.plot(bss, acc.mean(0), marker=marker, label=METHODS[key][0])[0]
        if p["seeds"] > 1:
            ax.fill_between(bss, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.18)
    ax.set_xscale("log", base=2)
    ax.set_xticks(bss, [str(b) for b in bss])
    ax.set_xlabel("training batch size (images per step)")
    ax.set_ylabel("eval-mode test accuracy (fraction correct)")
    band = ", band = min..max" if p["seeds"] > 1 else ""
    ax.set_title(f"Digits MLP, >= {p['epochs']} epochs and >= {p['min_steps']} steps per run\n"
                 f"mean of {p['seeds']} seed(s){band}")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, out, PLOTS[0])


def run(ctx: Context) -> Chapter:
    p = ctx.params(SIZES)
    missing = {key: missing_dependencies(needs) for key, (*_, needs) in METHODS.items()}
    available = {key: not m for key, m in missing.items()}
    methods = [k for k in METHODS if available[k]]
    models_per_run = 2 + available["renorm"]
    ctx.tracker.start(f"{NUMBER}. {TITLE}", len(p["batch_sizes"]) * p["seeds"] * models_per_run)
    digits = load_digits_split(seed=ctx.seed)
    res = {bs: [_one(digits, bs, p, ctx.seed + s, available, ctx.tracker) for s in range(p["seeds"])]
           for bs in p["batch_sizes"]}
    table = Table(
        f"Eval-mode test accuracy by training batch size (at least {p['epochs']} epochs and {p['min_steps']} steps "
        f"per run; mean ± spread (max - min) / 2 over {p['seeds']} seed(s))",
        ["batch", "epochs"] + [METHODS[k][1] for k in METHODS],
        notes=["batch: training batch size; epochs: epochs each run trained; "
               + "; ".join(f"{short}: {meaning}" for _, short, meaning, _ in METHODS.values())
               + "; n/a: not in this build. Cells: mean ± (max - min) / 2 over seeds."],
    )
    summary: dict = {}
    for bs in p["batch_sizes"]:
        cells = []
        for key in METHODS:
            if not available[key]:
                cells.append("n/a")
                continue
            acc = np.array([r[key] for r in res[bs]])
            summary.setdefault(key, {})[bs] = {
                "mean": float(acc.mean()), "min": float(acc.min()), "max": float(acc.max())}
            cells.append(f"{acc.mean():.3f} ± {(acc.max() - acc.min()) / 2:.3f}")
        table.add(bs, res[bs][0]["epochs"], *cells)
    small, large = min(p["batch_sizes"]), max(p["batch_sizes"])
    findings = [
        f"With EMA statistics, eval accuracy is {summary['ema'][small]['mean']:.3f} at batch size {small} and "
        f"{summary['ema'][large]['mean']:.3f} at {large}; LayerNorm, which needs no batch statistics, gets "
        f"{summary['layernorm'][small]['mean']:.3f} and {summary['layernorm'][large]['mean']:.3f}.",
    ]
    checks: dict[str, bool] = {}
    for key in ("recalibrated", "renorm"):
        if not available[key]:
            findings.append(f"{METHODS[key][0]}: not available in this build ({'; '.join(missing[key])}).")
    ema, layernorm = summary["ema"][small]["mean"], summary["layernorm"][small]["mean"]
    gap = layernorm - ema
    checks[f"eval accuracy with EMA statistics is lower at batch size {small} than at {large}"] = (
        ema < summary["ema"][large]["mean"])
    checks[f"LayerNorm beats the EMA at batch size {small} (there is a gap to close)"] = gap > 0
    shares = {key: (summary[key][small]["mean"] - ema) / gap if gap > 0 else None
              for key in ("recalibrated", "renorm") if available[key]}
    if available["recalibrated"]:
        def stray(bs: int, key: str = "running_vs_exact_mean_shift_std") -> float:
            return float(np.mean([list(r[key].values()) for r in res[bs]]))

        def var_stray(bs: int) -> float:
            return stray(bs, "running_vs_exact_log_var_ratio")

        findings.append(
            f"The EMA running means are {stray(small):.3f} standard deviations from the exact statistics at batch "
            f"size {small} and {stray(large):.3f} at {large}; the running variances are off by a mean |log ratio| of "
            f"{var_stray(small):.3f} (a factor {math.exp(var_stray(small)):.2f}) and {var_stray(large):.3f} (mean over "
            "channels, BN layers and seeds)."
        )
        checks[f"the running means stray farther from the exact statistics at batch size {small} than at {large}"] = (
            stray(small) > stray(large))
        checks[f"the running variances stray farther from the exact statistics at batch size {small} than at "
               f"{large}"] = var_stray(small) > var_stray(large)
        wins = sum(r["recalibrated"] >= r["ema"] for r in res[small])
        findings.append(
            f"Recalibrating the same weights with exact statistics gives {summary['recalibrated'][small]['mean']:.3f} "
            f"at batch size {small} (EMA {ema:.3f}); it is at least as accurate in {wins} of {p['seeds']} seed(s)."
        )
        checks[f"recalibration is no worse than the EMA at batch size {small} (mean over seeds)"] = (
            summary["recalibrated"][small]["mean"] >= ema)
        checks[f"exact statistics recover less than half of the batch-size-{small} gap from the EMA to LayerNorm"] = (
            shares["recalibrated"] is not None and shares["recalibrated"] < 0.5)
    if gap <= 0:
        findings.append(f"LayerNorm does not beat the EMA at batch size {small}: there is no gap to recover.")
    elif shares:
        findings.append(
            f"At batch size {small} the gap from the EMA ({ema:.3f}) to LayerNorm ({layernorm:.3f}) is {gap:.3f}; "
            + ", ".join(f"{name} ({summary[key][small]['mean']:.3f}) recovers {shares[key]:.0%} of it"
                        for key, name in (("recalibrated", "exact recalibration"), ("renorm", "batch renormalization"))
                        if key in shares) + "."
        )
    if len(shares) == 2:
        checks["batch renormalization recovers more of that gap than exact statistics"] = (
            gap > 0 and shares["renorm"] > shares["recalibrated"])
    figure = Figure(_plot(res, p, methods, ctx.out),
                    "Eval accuracy against training batch size for each way of getting the statistics.")
    return Chapter(NUMBER, "batch-size", TITLE, CLAIM, tables=[table], figures=[figure], findings=findings,
                   checks=checks, data={"per_seed": res, "summary": summary, "params": p,
                                        "gap_to_layernorm": {"batch_size": small, "gap": gap,
                                                             "share_recovered": shares},
                                        "not_available": {k: v for k, v in missing.items() if v}})
