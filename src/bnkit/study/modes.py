"""Chapter 2: two modes. Eval mode normalizes with the running statistics, training mode with the batch's.

A BN network trained on digits is scored in both modes at batch sizes 1, 2, 8
and 64. In training mode BN divides ``x - mean_B`` by ``sqrt(var_B + eps)``
with the biased batch variance (torch/nn/modules/batchnorm.py), so each
prediction depends on the other images in its batch, and a batch of one has
``x - mean_B = 0``: every normalized value is 0, every BN output is ``beta``,
and the network gives one answer for every image. ``nn.BatchNorm1d`` refuses
that batch in Python (``Expected more than 1 value per channel when training``);
:func:`train_mode_logits` runs it through PyTorch's training-mode kernel itself
(``torch.batch_norm``, which has no such guard), so the collapse is measured, up
to that kernel's rounding, not computed from the formula. Eval mode uses the
running statistics, so its outputs do not depend on the batch at all.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..torch.modules import bn_layers
from . import Context
from .data import load_digits_split
from .models import digits_mlp
from .report import Chapter, Figure, Table, new_figure, save_figure
from .train import batches, fit, predict, preserved_modes

NUMBER = 2
PLOTS = ("ch2_two_modes.png",)
TITLE = "Two modes"
CLAIM = (
    "In training mode BatchNorm normalizes with the batch's own statistics, so a prediction depends on the batch "
    "and a batch of one collapses; eval mode uses the running statistics and is the same at any batch size."
)
REQUIRES: tuple[str, ...] = ()
SIZES = {
    "quick": {"seeds": 1, "epochs": 4, "train_batch": 32, "batch_sizes": (1, 2, 8, 64)},
    "demo": {"seeds": 2, "epochs": 10, "train_batch": 32, "batch_sizes": (1, 2, 8, 64)},
    "full": {"seeds": 5, "epochs": 20, "train_batch": 32, "batch_sizes": (1, 2, 4, 8, 16, 32, 64, 128)},
}


def _batch_stat_hook(bn: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> torch.Tensor:
    """PyTorch's training-mode BN output on the batch's own statistics, whatever the batch size: its kernel
    (``torch.batch_norm``, training=True, no running statistics to update) without ``F.batch_norm``'s guard."""
    return torch.batch_norm(inputs[0], bn.weight, bn.bias, None, None, True, 0.0, bn.eps, False)


def train_mode_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits with every BN layer normalizing by the statistics of its batch of ``batch_size`` images.

    Batch size 1 goes through PyTorch's training-mode kernel from a hook (``nn.BatchNorm*d`` raises on it in
    training mode); larger batches through PyTorch's own training-mode
    forward. Buffers and ``training`` flags are restored afterwards.
    """
    if batch_size > 1:
        return predict(model, x, batch_size=batch_size, train_mode=True)
    with preserved_modes(model), torch.no_grad():
        model.train()
        hooks = []
        for _, bn in bn_layers(model):
            bn.eval()  # eval forward runs without error; the hook replaces its output
            hooks.append(bn.register_forward_hook(_batch_stat_hook))
        try:
            return torch.cat([model(x[idx]) for idx in batches(len(x), 1)])
        finally:
            for h in hooks:
                h.remove()


def _one_seed(digits, p: dict, seed: int, tracker) -> dict:
    torch.manual_seed(seed)
    model = digits_mlp()
    fit(model, digits.x_train, digits.y_train, epochs=p["epochs"], batch_size=p["train_batch"], seed=seed,
        on_epoch=lambda _e: tracker.advance())
    model.eval()
    x, y = digits.x_test, digits.y_test
    reference = predict(model, x, batch_size=len(x))
    out: dict = {"eval": {}, "train": {}}
    for bs in p["batch_sizes"]:
        ev = predict(model, x, batch_size=bs)
        tr = train_mode_logits(model, x, bs)
        out["eval"][bs] = {
            "accuracy": float((ev.argmax(1) == y).double().mean()),
            "max_abs_diff_vs_full_batch": float((ev - reference).abs().max()),
            "same_predictions": bool(torch.equal(ev.argmax(1), reference.argmax(1))),
        }
        out["train"][bs] = {
            "accuracy": float((tr.argmax(1) == y).double().mean()),
            "max_abs_diff_vs_eval": float((tr - reference).abs().max()),
            "distinct_outputs": int(torch.unique(tr.argmax(1)).numel()),
            "output_spread": float((tr - tr[0]).abs().max()),
        }
    out["flags_after"] = {name: m.training for name, m in model.named_modules()}
    return out


def _plot(res: dict, p: dict, n_classes: int, out) -> str:
    fig, axes = new_figure()
    ax = axes[0, 0]
    bss = list(p["batch_sizes"])
    modes = (("eval", "eval mode (running statistics)", "o"), ("train", "training mode (batch statistics)", "s"))
    for mode, label, marker in modes:
        acc = np.array([[r[mode][bs]["accuracy"] for bs in bss] for r in res])
        line = ax.plot(bss, acc.mean(0), marker=marker, label=label)[0]
        if len(res) > 1:
            ax.fill_between(bss, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
    ax.axhline(1 / n_classes, color="grey", ls=":", label=f"chance ({n_classes} classes)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(bss, [str(b) for b in bss])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("batch size at inference (images per forward pass)")
    ax.set_ylabel("test accuracy (fraction correct)")
    ax.set_title(f"Digits MLP: the two modes ({len(res)} seed(s)" + (", band = min..max)" if len(res) > 1 else ")"))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, out, PLOTS[0])


def _remainder_example(n: int, batch_sizes: list[int]) -> str:
    """``": 450 images at batch 64 are 6 passes of 64 and one of 66"`` for the largest batch size whose remainder
    joins the pass before it (as :func:`bnkit.study.train.batches` splits), else nothing."""
    for b in sorted(batch_sizes, reverse=True):
        passes = batches(n, b)
        if len(passes) > 1 and len(passes[-1]) > b:
            return f": {n} images at batch {b} are {len(passes) - 1} passes of {b} and one of {len(passes[-1])}"
    return ""


def run(ctx: Context) -> Chapter:
    p = ctx.params(SIZES)
    ctx.tracker.start(f"{NUMBER}. {TITLE}", p["seeds"] * p["epochs"])
    digits = load_digits_split(seed=ctx.seed)
    res = [_one_seed(digits, p, ctx.seed + s, ctx.tracker) for s in range(p["seeds"])]
    n = len(digits.x_test)
    table = Table(
        f"Test accuracy on {n} digits by inference batch size (MLP trained at batch {p['train_batch']}, "
        f"mean over {len(res)} seed(s))",
        ["batch", "eval acc", "train acc", "classes (train)", "max |Δ| (eval)"],
        notes=["batch: images per forward pass at inference (the last pass takes the remainder, joined to the pass "
               f"before it when at most half a batch{_remainder_example(n, p['batch_sizes'])}); eval / train acc: accuracy in eval mode (running "
               "statistics) and in training mode (the batch's statistics); classes (train): fewest distinct "
               "classes predicted in training mode; max |Δ| (eval): largest difference between eval-mode logits "
               "at this batch size and in one batch of the whole test set."],
    )
    for bs in p["batch_sizes"]:
        table.add(
            bs,
            f"{np.mean([r['eval'][bs]['accuracy'] for r in res]):.3f}",
            f"{np.mean([r['train'][bs]['accuracy'] for r in res]):.3f}",
            min(r["train"][bs]["distinct_outputs"] for r in res),
            f"{max(r['eval'][bs]['max_abs_diff_vs_full_batch'] for r in res):.2e}",
        )
    one = [r["train"][1] for r in res]
    big = max(p["batch_sizes"])
    checks = {
        "training mode at batch size 1 gives the same output for every image": all(
            o["output_spread"] < 1e-5 for o in one),
        "training mode at batch size 1 is at chance level (accuracy <= 0.2)": all(o["accuracy"] <= 0.2 for o in one),
        "eval mode gives the same predictions at every batch size": all(
            r["eval"][bs]["same_predictions"] for r in res for bs in p["batch_sizes"]),
        "eval-mode logits agree across batch sizes to 1e-5": all(
            r["eval"][bs]["max_abs_diff_vs_full_batch"] < 1e-5 for r in res for bs in p["batch_sizes"]),
        "every module's train/eval flag is as before after scoring": all(
            not any(r["flags_after"].values()) for r in res),
    }
    ev_big = np.mean([r["eval"][big]["accuracy"] for r in res])
    tr_big = np.mean([r["train"][big]["accuracy"] for r in res])
    tr_two = np.mean([r["train"][2]["accuracy"] for r in res]) if 2 in p["batch_sizes"] else float("nan")
    classes_one = max(o["distinct_outputs"] for o in one)
    same_eval = checks["eval mode gives the same predictions at every batch size"]
    findings = [
        f"At batch size 1 training mode predicts {classes_one} distinct class(es) for the {n} test images (accuracy "
        f"{np.mean([o['accuracy'] for o in one]):.3f}; outputs differ by at most "
        f"{max(o['output_spread'] for o in one):.1e} between images): the normalized value x - mean_B is 0, so each "
        "BN layer outputs its beta. (The lesson says every activation becomes zero; it is the normalized value that "
        "is zero, the layer's output is beta.)",
        f"Training mode needs company: accuracy {tr_two:.3f} at batch 2 and {tr_big:.3f} at batch {big}, "
        f"against {ev_big:.3f} in eval mode at batch {big}.",
        "Eval mode's logits differ across batch sizes by at most "
        f"{max(r['eval'][bs]['max_abs_diff_vs_full_batch'] for r in res for bs in p['batch_sizes']):.1e} "
        "(float32 rounding of the matrix products), and its predictions are "
        + ("identical." if same_eval else "NOT identical."),
    ]
    for r in res:
        del r["flags_after"]
    # seed means, as the table shows: the spread across seeds is not a spread across batch sizes
    ev_means = [float(np.mean([r["eval"][bs]["accuracy"] for r in res])) for bs in p["batch_sizes"]]
    eval_text = (f"{ev_means[0]:.3f} at every batch size" if max(ev_means) - min(ev_means) < 5e-4
                 else f"{min(ev_means):.3f} to {max(ev_means):.3f} across batch sizes")
    small = min(p["batch_sizes"])
    figure = Figure(_plot(res, p, int(digits.y_test.unique().numel()), ctx.out),
                    f"Test accuracy against inference batch size (mean of {len(res)} seed(s)): eval mode {eval_text}; "
                    f"training mode {np.mean([r['train'][small]['accuracy'] for r in res]):.3f} at batch size "
                    f"{small}.")
    return Chapter(NUMBER, "two-modes", TITLE, CLAIM, tables=[table], figures=[figure], findings=findings,
                   checks=checks, data={"per_seed": res, "params": p, "test_images": n})
