"""Chapter 5: deployment. Fold BN into the convolutions, verify, export to ONNX, run in onnxruntime.

In eval mode BN is the per-channel affine map ``y = gamma * (x - rm) / sqrt(rv + eps) + beta``,
so it folds into the preceding convolution: ``W' = W * s``, ``b' = (b - rm) * s + beta``
with ``s = gamma / sqrt(rv + eps)`` (:func:`bnkit.torch.fold_bn`). A small ResNet is
trained on the digit images, folded, exported with :func:`bnkit.torch.export_onnx`,
and run in onnxruntime; the chapter reports the largest logit difference against
the unfolded PyTorch model in eval mode, whether any prediction changed, and the
median latency per forward pass of each (measured here, single process).
"""
from __future__ import annotations

import collections
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..torch.modules import bn_layers
from ..torch.zoo import SmallResNet
from . import Context, missing_dependencies
from .data import load_digits_split
from .report import Chapter, Figure, Table, new_figure, save_figure
from .train import fit, predict

NUMBER = 5
PLOTS = ("ch5_latency.png",)
TITLE = "Deployment"
CLAIM = (
    "In eval mode BatchNorm is a fixed affine map, so it folds into the layer before it and exports to ONNX "
    "with the same outputs up to float32 rounding, and without the BN cost at inference."
)
REQUIRES: tuple[str, ...] = ("fold_bn",)
ONNX_BN = "onnxruntime (BN nodes)"
ONNX_FOLDED = "onnxruntime (folded)"
ONNX_NOFUSE = "onnxruntime (BN nodes, Conv+BN fusion off)"
#: onnxruntime's optimizer that folds BatchNormalization into the Conv before it by itself
#: (onnxruntime/core/optimizer/conv_bn_fusion.h); the third run disables only it (every other graph optimization is
#: on in all three), so the BN work stays as ops of its own: BatchNormalization nodes, or, where onnxruntime has
#: NCHWc kernels (x86 with AVX2/AVX-512), per-channel convolutions its NCHWc transformer makes of them.
ORT_CONV_BN_FUSION = "ConvBNFusion"
#: (key, label, short label in the table, which model, onnxruntime optimizers disabled)
ONNX_RUNS = (("onnx_bn", ONNX_BN, "ORT BN", "bn", ()), ("onnx_folded", ONNX_FOLDED, "ORT folded", "folded", ()),
             ("onnx_bn_nofusion", ONNX_NOFUSE, "ORT BN no-fusion", "bn", (ORT_CONV_BN_FUSION,)))
TABLE_NOTE = (
    "torch: PyTorch eval mode; ORT: onnxruntime on the exported model, every graph optimization on; folded: after "
    "bnkit.torch.fold_bn; no-fusion: onnxruntime's Conv+BN fusion off (only it); BN: BN layers or nodes in the model "
    "given to the runtime; max |Δ|: largest logit difference from "
    "PyTorch eval mode; changed: predictions that differ from it; ms bN: median latency per forward pass of N "
    "images."
)
SIZES = {
    "quick": {"epochs": 2, "batch_size": 32, "repeats": 20, "latency_batches": (1, 64)},
    "demo": {"epochs": 4, "batch_size": 32, "repeats": 50, "latency_batches": (1, 64)},
    "full": {"epochs": 10, "batch_size": 32, "repeats": 200, "latency_batches": (1, 16, 64, 256)},
}


def _ort_runner(path: Path, disabled: tuple[str, ...] = ()):
    """A function running ``path`` in onnxruntime (every graph optimization but ``disabled`` on), the input's fixed
    batch size or None, and the op types of the graph onnxruntime optimized (the one it runs) with their counts."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    optimized = path.with_name(path.stem + "_ort.onnx")
    opts.optimized_model_filepath = str(optimized)
    opts.log_severity_level = 3  # not its warning that a saved NCHWc graph fits this machine only: it is only counted
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled))
    ops = collections.Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    name = sess.get_inputs()[0].name
    fixed = sess.get_inputs()[0].shape[0]

    def run(x: torch.Tensor) -> np.ndarray:
        arr = x.numpy()
        if isinstance(fixed, int) and fixed != len(arr):  # exported with a fixed batch size: feed it that size
            return np.concatenate([sess.run(None, {name: arr[i:i + fixed]})[0] for i in range(0, len(arr), fixed)])
        return sess.run(None, {name: arr})[0]

    return run, fixed, ops


def run(ctx: Context) -> Chapter:
    import bnkit.torch as bt

    p = ctx.params(SIZES)
    missing_export = missing_dependencies(("export_onnx",))
    ctx.tracker.start(f"{NUMBER}. {TITLE}", p["epochs"] + 2)
    digits = load_digits_split(seed=ctx.seed, images=True)
    torch.manual_seed(ctx.seed)
    model = SmallResNet()
    fit(model, digits.x_train, digits.y_train, epochs=p["epochs"], batch_size=p["batch_size"], seed=ctx.seed,
        on_epoch=lambda _e: ctx.tracker.advance())
    model.eval()
    x, y = digits.x_test, digits.y_test
    reference = predict(model, x, batch_size=len(x))
    n_bn = len(bn_layers(model))
    folded, report = bt.fold_bn(model, x[:8])
    folded.eval()
    ctx.tracker.advance()
    folded_logits = predict(folded, x, batch_size=len(x))
    data: dict = {
        "params": p, "bn_layers": n_bn, "folded": report.n_folded, "left": dict(report.left),
        "bn_layers_after_fold": len(bn_layers(folded)),
        "accuracy": {"pytorch_eval": float((reference.argmax(1) == y).double().mean()),
                     "folded": float((folded_logits.argmax(1) == y).double().mean())},
        "max_abs_diff_vs_eval": {"folded": float((folded_logits - reference).abs().max())},
        "predictions_changed": {"folded": int((folded_logits.argmax(1) != reference.argmax(1)).sum())},
        "latency_ms": {},
    }
    runners = {"PyTorch eval (with BN)": lambda t: model(t), "PyTorch folded": lambda t: folded(t)}
    if not missing_export:
        with tempfile.TemporaryDirectory() as tmp:
            for key, label, _, net, disabled in ONNX_RUNS:
                path = Path(tmp) / f"{key}.onnx"
                bt.export_onnx(model if net == "bn" else folded, x[:8], path)
                ort_run, fixed, ops = _ort_runner(path, disabled)
                logits = torch.from_numpy(ort_run(x))
                data["onnx_bytes"] = {**data.get("onnx_bytes", {}), key: path.stat().st_size}
                data["ort_ops_run"] = {**data.get("ort_ops_run", {}), key: dict(ops)}
                data["accuracy"][key] = float((logits.argmax(1) == y).double().mean())
                data["max_abs_diff_vs_eval"][key] = float((logits - reference).abs().max())
                data["predictions_changed"][key] = int((logits.argmax(1) != reference.argmax(1)).sum())
                runners[label] = ort_run
            data["latency_ms"] = _latencies(runners, x, p)
    else:
        data["latency_ms"] = _latencies(runners, x, p)
    ctx.tracker.advance()

    table = Table(
        f"SmallResNet on digit images ({n_bn} BN layers; test set of {len(x)} images)",
        ["model", "BN", "acc", "max |Δ|", "changed"] + [f"ms b{b}" for b in p["latency_batches"]],
        notes=[TABLE_NOTE],
    )
    rows = [("PyTorch eval (with BN)", "torch BN", n_bn, "pytorch_eval", None),
            ("PyTorch folded", "torch folded", data["bn_layers_after_fold"], "folded", "folded")]
    if not missing_export:
        rows += [(label, short, n_bn if net == "bn" else data["bn_layers_after_fold"], key, key)
                 for key, label, short, net, _ in ONNX_RUNS]
    for name, short, layers, key, diff in rows:
        table.add(short, layers, f"{data['accuracy'][key]:.3f}",
                  "reference" if diff is None else f"{data['max_abs_diff_vs_eval'][key]:.1e}",
                  0 if diff is None else data["predictions_changed"][key],
                  *[f"{data['latency_ms'][name][str(b)]:.3f}" for b in p["latency_batches"]])
    if missing_export:
        table.add("ORT", "n/a", *["-"] * (3 + len(p["latency_batches"])))
    checks = {
        "folding removes every BN layer of the ResNet": data["bn_layers_after_fold"] == 0,
        "the folded model's logits match eval mode to 1e-4": data["max_abs_diff_vs_eval"]["folded"] < 1e-4,
    }
    findings = [
        f"fold_bn folded {report.n_folded} of {n_bn} BN layers; the largest logit difference is "
        f"{data['max_abs_diff_vs_eval']['folded']:.1e} and {data['predictions_changed']['folded']} of {len(x)} "
        "predictions changed.",
    ]
    lat = data["latency_ms"]
    b1 = str(p["latency_batches"][0])
    findings.append("PyTorch median latency, with BN / folded: " + ", ".join(
        f"batch {b}: {lat['PyTorch eval (with BN)'][b]:.3f} / {lat['PyTorch folded'][b]:.3f} ms"
        for b in lat["PyTorch folded"])
        + f" ({torch.get_num_threads()} thread(s); timings on a busy machine are noisy).")
    if missing_export:
        findings.append(f"ONNX export and onnxruntime: not available in this build ({'; '.join(missing_export)}).")
        data["not_available"] = {"onnx": missing_export}
    else:
        diffs = data["max_abs_diff_vs_eval"]
        nodes = {key: sum(ops.values()) for key, ops in data["ort_ops_run"].items()}
        bn_left = {key: ops.get("BatchNormalization", 0) for key, ops in data["ort_ops_run"].items()}
        checks["onnxruntime's logits match PyTorch eval mode to 1e-4 (every ONNX variant)"] = max(
            diffs[key] for key, *_ in ONNX_RUNS) < 1e-4
        checks["onnxruntime runs the BN model as the folded one: its Conv+BN fusion leaves no BN node and the folded "
               "model's node count; with only that fusion off it runs more nodes"] = (
            bn_left["onnx_bn"] == 0 and nodes["onnx_bn"] == nodes["onnx_folded"]
            and nodes["onnx_bn_nofusion"] > nodes["onnx_folded"])
        findings.append(
            f"onnxruntime: largest logit difference {diffs['onnx_bn']:.1e} with BN nodes, {diffs['onnx_folded']:.1e} "
            f"folded. Its graph optimizer fuses Conv + BatchNormalization by itself "
            f"(onnxruntime/core/optimizer/conv_bn_fusion.h): the graph it runs has {nodes['onnx_bn']} nodes for the BN "
            f"model ({bn_left['onnx_bn']} BatchNormalization) and {nodes['onnx_folded']} for the folded one. With only "
            f"that fusion off it runs {nodes['onnx_bn_nofusion']} ({bn_left['onnx_bn_nofusion']} BatchNormalization): "
            "the BN work stays as ops of its own (where onnxruntime has NCHWc kernels, as per-channel convolutions). "
            f"Median latency at batch {b1}: "
            f"{lat[ONNX_BN][b1]:.3f} ms with BN nodes, {lat[ONNX_FOLDED][b1]:.3f} ms folded, "
            f"{lat[ONNX_NOFUSE][b1]:.3f} ms with BN nodes and the fusion off: the unfolded model takes "
            f"{lat[ONNX_BN][b1] / lat[ONNX_FOLDED][b1]:.2f}x the folded model's time with the fusion, "
            f"{lat[ONNX_NOFUSE][b1] / lat[ONNX_FOLDED][b1]:.2f}x without it (every other optimization on in all "
            "three).")
    figure = Figure(_plot(lat, p, ctx.out), "Median latency per forward pass, by runtime and batch size.")
    return Chapter(NUMBER, "deployment", TITLE, CLAIM, tables=[table], figures=[figure], findings=findings,
                   checks=checks, data=data)


def _latencies(runners: dict, x: torch.Tensor, p: dict) -> dict:
    """Median ms per forward pass of each runner at each batch size. The runs are interleaved, one of each per
    round, so a burst of load on a shared machine falls on all of them alike instead of on whichever ran then
    (run one after the other, a ratio of two medians once came out 1.91 where it is about 1). Each round runs
    them in a new order (shuffled, seeded), and each timed call follows an untimed call of itself: a call right
    after another runtime's batch of 64 took 1.3-2.7x its time, which in a fixed order (or one only rotated,
    which keeps every call's predecessor) fell on the same runner every round, so two identical onnxruntime
    graphs timed 1.3-2.1x apart."""
    calls = [(name, str(b), lambda fn=fn, b=b: fn(x[:b])) for name, fn in runners.items() for b in p["latency_batches"]]
    times: dict = {(name, b): [] for name, b, _ in calls}
    order = random.Random(0)
    with torch.no_grad():
        for _ in range(p["repeats"]):
            for name, b, call in order.sample(calls, len(calls)):
                call()  # untimed: the timed call finds the caches as it leaves them, whoever ran before
                start = time.perf_counter()
                call()
                times[name, b].append(time.perf_counter() - start)
    return {name: {str(b): float(np.median(times[name, str(b)]) * 1e3) for b in p["latency_batches"]}
            for name in runners}


def _plot(lat: dict, p: dict, out) -> str:
    """One panel per batch size, each on its own scale (a batch of one takes a fraction of a large batch's time)."""
    bss = [str(b) for b in p["latency_batches"]]
    fig, axes = new_figure(1, len(bss), width=4.2, height=4.6)
    names = list(lat)
    colors = [f"C{i}" for i in range(len(names))]
    for ax, b in zip(axes[0], bss):
        bars = ax.bar(range(len(names)), [lat[n][b] for n in names], color=colors)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks([])
        ax.set_title(f"batch of {b} image(s)")
        ax.margins(y=0.12)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].set_ylabel("median latency per forward pass (ms)")
    fig.suptitle(f"SmallResNet inference on CPU, {torch.get_num_threads()} thread(s)", y=0.99)
    fig.legend([_patch(c) for c in colors], names, loc="upper center", bbox_to_anchor=(0.5, 0.93),
               ncol=min(3, len(names)), fontsize=8, frameon=False)
    return save_figure(fig, out, PLOTS[0], rect=(0, 0, 1, 0.86))


def _patch(color: str):
    from matplotlib.patches import Patch

    return Patch(color=color)
