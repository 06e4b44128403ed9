"""Chapter 4: fine-tuning and freezing BatchNorm.

An MLP is pretrained on digits 0-4 as scanned (domain A), then fine-tuned on a
few labelled images of the same digits from another scanner (domain B, see
:data:`.data.SHIFT_DESCRIPTION`). The variants:

* ``lesson's freeze``: each BN layer put in eval mode with ``requires_grad =
  False`` (the lesson's snippet), then the usual training loop, which calls
  ``model.train()`` every epoch and so puts BN back in training mode;
* ``freeze_bn``: :func:`bnkit.torch.freeze_bn`, which survives ``model.train()``;
* ``training-mode BN``: plain fine-tuning, BN learning and tracking statistics;
* ``recalibrate + freeze_bn``: exact domain-B statistics
  (:func:`bnkit.torch.recalibrate`, no labels) then fine-tuning with ``freeze_bn``;
* ``recalibrate only``: exact domain-B statistics and no gradient step at all.

Each is scored on both domains, and each BN layer's statistics shift is
measured as ``mean_c |rm'_c - rm_c| / sqrt(rv_c + eps)`` (old standard
deviations) and ``mean_c |log(rv'_c / rv_c)|``.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..torch.modules import bn_layers
from . import Context, missing_dependencies
from .data import SHIFT_DESCRIPTION, load_digits_split, shifted_domain
from .models import bn_legend, digits_mlp
from .report import Chapter, Figure, Table, new_figure, save_figure
from .train import accuracy, batches, fit, stat_shift

NUMBER = 4
PLOTS = ("ch4_fine_tuning.png",)
TITLE = "Fine-tuning and freezing"
CLAIM = (
    "Freezing BN layers by setting them to eval mode is undone by the next model.train(), so the running "
    "statistics drift to the new data; a freeze that survives model.train() keeps them exactly, and "
    "recalibrating on the new domain adapts them on purpose."
)
REQUIRES: tuple[str, ...] = ()
CLASSES = (0, 1, 2, 3, 4)
SIZES = {
    "quick": {"seeds": 1, "pretrain_epochs": 6, "finetune_epochs": 3, "finetune_images": 200, "batch_size": 32},
    "demo": {"seeds": 2, "pretrain_epochs": 10, "finetune_epochs": 5, "finetune_images": 200, "batch_size": 32},
    "full": {"seeds": 5, "pretrain_epochs": 20, "finetune_epochs": 10, "finetune_images": 200, "batch_size": 32},
}
#: offsets added to a run's seed for domain B's training-image noise, test-image noise and the fine-tuning shuffle
B_TRAIN_SEED, B_TEST_SEED, FINETUNE_SEED = 1, 2, 1000
SEED_OFFSET = max(B_TRAIN_SEED, B_TEST_SEED, FINETUNE_SEED)
#: key -> (label in the plot, short label in the table, the ``bnkit.torch`` names it needs)
VARIANTS = {
    "pretrained": ("pretrained, not fine-tuned", "pretrained", ()),
    "lesson_freeze": ("lesson's freeze, then model.train()", "lesson freeze", ()),
    "freeze_bn": ("bnkit freeze_bn", "freeze_bn", ("freeze_bn",)),
    "train_bn": ("training-mode BN", "train-mode BN", ()),
    "recal_freeze": ("recalibrate on B + freeze_bn", "recal+freeze", ("recalibrate", "freeze_bn")),
    "recal_only": ("recalibrate on B only (no labels)", "recal only", ("recalibrate",)),
}
VARIANT_NOTES = (
    "pretrained: not fine-tuned; lesson freeze: BN set to eval mode with frozen parameters, then the training loop's "
    "model.train(); freeze_bn: bnkit.torch.freeze_bn; train-mode BN: plain fine-tuning; recal+freeze: recalibrate on "
    "B, then fine-tune with freeze_bn; recal only: recalibrate on B's images, no labels, no gradient step."
)


def lesson_freeze(model: nn.Module) -> None:
    """The lesson's snippet: BN layers to eval mode, their parameters frozen (undone by ``model.train()``)."""
    for _, bn in bn_layers(model):
        bn.eval()
        for prm in bn.parameters():
            prm.requires_grad = False


def _stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, ...]]:
    return {name: (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
            for name, bn in bn_layers(model)}


def _shift(before: dict, after: dict, eps: float) -> dict[str, dict[str, float]]:
    out = {}
    for name, (m0, v0, _) in before.items():
        m1, v1, _ = after[name]
        m0, v0, m1, v1 = (t.double().numpy() for t in (m0, v0, m1, v1))
        mean_shift, log_var = stat_shift(m0, v0, m1, v1, eps)
        out[name] = {"mean_shift_std": mean_shift, "log_var_ratio": log_var,
                     "max_mean_shift_std": float(np.max(np.abs(m1 - m0) / np.sqrt(v0 + eps)))}
    return out


def _variant(key: str, base: nn.Module, ft_x, ft_y, p: dict, seed: int) -> nn.Module:
    import bnkit.torch as bt

    model = copy.deepcopy(base)
    if key in ("recal_freeze", "recal_only"):
        model.eval()
        bt.recalibrate(model, [ft_x[i] for i in batches(len(ft_x), 256)], progress=False)
    if key == "pretrained" or key == "recal_only":
        return model
    if key == "lesson_freeze":
        lesson_freeze(model)
    elif key in ("freeze_bn", "recal_freeze"):
        bt.freeze_bn(model)
    fit(model, ft_x, ft_y, epochs=p["finetune_epochs"], batch_size=p["batch_size"], seed=seed + FINETUNE_SEED)
    return model


def _one_seed(p: dict, seed: int, available: dict[str, bool], tracker) -> dict:
    a = load_digits_split(seed=seed).subset(CLASSES)
    b_train_x = shifted_domain(a.x_train, seed=seed + B_TRAIN_SEED)
    b_test_x = shifted_domain(a.x_test, seed=seed + B_TEST_SEED)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(b_train_x), generator=g)[: p["finetune_images"]]
    ft_x, ft_y = b_train_x[pick], a.y_train[pick]
    torch.manual_seed(seed)
    base = digits_mlp(num_classes=len(CLASSES))
    fit(base, a.x_train, a.y_train, epochs=p["pretrain_epochs"], batch_size=p["batch_size"], seed=seed)
    base.eval()
    tracker.advance()
    before = _stats(base)
    eps = bn_layers(base)[0][1].eps
    out: dict = {}
    for key in VARIANTS:
        if not available[key]:
            continue
        model = _variant(key, base, ft_x, ft_y, p, seed)
        after = _stats(model)
        model.eval()
        out[key] = {
            "acc_A": accuracy(model, a.x_test, a.y_test),
            "acc_B": accuracy(model, b_test_x, a.y_test),
            "stats_bit_identical": all(all(torch.equal(u, v) for u, v in zip(before[n], after[n])) for n in before),
            "shift": _shift(before, after, eps),
        }
        tracker.advance()
    return out


def _plot(res: list[dict], keys: list[str], out) -> str:
    fig, axes = new_figure(1, 2, width=5.6, height=4.4)
    ax = axes[0, 0]
    xs = np.arange(len(keys))
    for off, dom, label in ((-0.2, "acc_A", "domain A (original scans)"), (0.2, "acc_B", "domain B (other scanner)")):
        vals = np.array([[r[k][dom] for k in keys] for r in res])
        err = None
        if len(res) > 1:
            err = np.vstack([vals.mean(0) - vals.min(0), vals.max(0) - vals.mean(0)])
        ax.bar(xs + off, vals.mean(0), width=0.4, yerr=err, capsize=3, label=label)
    ax.set_xticks(xs, [VARIANTS[k][0] for k in keys], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"test accuracy, digits {CLASSES[0]}-{CLASSES[-1]} (fraction correct)")
    lowest = min(r[k][dom] for r in res for k in keys for dom in ("acc_A", "acc_B"))
    ax.set_ylim(max(0.0, lowest - 0.1), 1.0)
    ax.set_title("Accuracy after fine-tuning on domain B", pad=24)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[0, 1]
    layers = list(res[0][keys[0]]["shift"])
    width = 0.8 / len(layers)
    for j, layer in enumerate(layers):
        vals = np.array([[r[k]["shift"][layer]["mean_shift_std"] for k in keys] for r in res]).mean(0)
        ax.bar(xs - 0.4 + width * (j + 0.5), vals, width=width, label=f"BN layer {layer}")
    ax.set_xticks(xs, [VARIANTS[k][0] for k in keys], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("|running mean change| (old std units,\nmean over channels)")
    ax.set_title("How far the running means moved", pad=24)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(layers), fontsize=8, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, out, PLOTS[0])


def run(ctx: Context) -> Chapter:
    p = ctx.params(SIZES)
    missing = {key: missing_dependencies(needs) for key, (*_, needs) in VARIANTS.items()}
    available = {key: not m for key, m in missing.items()}
    keys = [k for k in VARIANTS if available[k]]
    ctx.tracker.start(f"{NUMBER}. {TITLE}", p["seeds"] * (1 + len(keys)))
    res = [_one_seed(p, ctx.seed + s, available, ctx.tracker) for s in range(p["seeds"])]
    layers = list(res[0]["pretrained"]["shift"])
    table = Table(
        f"Pretrained on digits {CLASSES[0]}-{CLASSES[-1]} (A), fine-tuned on {p['finetune_images']} images from "
        f"domain B for {p['finetune_epochs']} epochs (mean over {len(res)} seed(s))",
        ["variant", "acc A", "acc B", "stats kept"] + [f"shift {n}" for n in layers],
        notes=["acc A / acc B: test accuracy on the original scans (A) and the other scanner (B); stats kept: every "
               "BN buffer bit-identical to the pretrained model's; shift: mean over channels of |running mean "
               "change| in the pretrained standard deviations. " + bn_legend(digits_mlp(len(CLASSES))) + ".",
               VARIANT_NOTES],
    )
    summary: dict = {}
    for key, (_, label, _) in VARIANTS.items():
        if not available[key]:
            table.add(label, "n/a", *["-"] * (2 + len(layers)))
            continue
        rows = [r[key] for r in res]
        s = {"acc_A": float(np.mean([r["acc_A"] for r in rows])), "acc_B": float(np.mean([r["acc_B"] for r in rows])),
             "stats_bit_identical": all(r["stats_bit_identical"] for r in rows),
             "mean_shift_std": {n: float(np.mean([r["shift"][n]["mean_shift_std"] for r in rows])) for n in layers},
             "max_mean_shift_std": {n: max(r["shift"][n]["max_mean_shift_std"] for r in rows) for n in layers}}
        summary[key] = s
        table.add(label, f"{s['acc_A']:.3f}", f"{s['acc_B']:.3f}", "yes" if s["stats_bit_identical"] else "no",
                  *[f"{s['mean_shift_std'][n]:.3f}" for n in layers])
    lf = summary["lesson_freeze"]
    checks = {"the lesson's freeze does not survive model.train(): the running statistics changed":
              not lf["stats_bit_identical"]}
    findings = [
        f"Domain B is {SHIFT_DESCRIPTION}. Without fine-tuning the pretrained model scores "
        f"{summary['pretrained']['acc_A']:.3f} on A and {summary['pretrained']['acc_B']:.3f} on B.",
        ("The lesson's freeze is undone by model.train(): the running means moved by "
         if not lf["stats_bit_identical"] else
         "The lesson's freeze held this time (the running statistics are bit-identical): the running means moved by ")
        + f"{max(lf['mean_shift_std'].values()):.2f} old standard deviations on average over a layer's channels (up "
        f"to {max(lf['max_mean_shift_std'].values()):.2f} in one channel) and accuracy on A became "
        f"{lf['acc_A']:.3f}.",
    ]
    if available["freeze_bn"]:
        fb = summary["freeze_bn"]
        checks["freeze_bn keeps every BN statistic bit-identical through fine-tuning"] = fb["stats_bit_identical"]
        kept = "bit-identical" if fb["stats_bit_identical"] else "CHANGED"
        findings.append(f"With freeze_bn the statistics are {kept}; accuracy A {fb['acc_A']:.3f}, B {fb['acc_B']:.3f}.")
    if available["recal_only"]:
        ro = summary["recal_only"]
        findings.append(f"Recalibrating on B alone, with no labels and no gradient step, moves accuracy on B from "
                        f"{summary['pretrained']['acc_B']:.3f} to {ro['acc_B']:.3f} (A: {ro['acc_A']:.3f}).")
    findings += [f"{VARIANTS[k][0]}: not available in this build ({'; '.join(m)})." for k, m in missing.items() if m]
    figure = Figure(_plot(res, keys, ctx.out),
                    "Left: accuracy on both domains for each fine-tuning variant. "
                    "Right: how far each BN layer's running mean moved.")
    return Chapter(NUMBER, "fine-tuning", TITLE, CLAIM, tables=[table], figures=[figure], findings=findings,
                   checks=checks, data={"per_seed": res, "summary": summary, "params": p,
                                        "domain_b": SHIFT_DESCRIPTION,
                                        "not_available": {k: v for k, v in missing.items() if v}})
