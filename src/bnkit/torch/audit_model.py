"""Depth 2 of :func:`bnkit.torch.audit`: what each BatchNorm layer will do at inference.

Per layer, from the module itself (no data): its arrays with its own ``eps``/``momentum``
(:func:`bnkit.audit_state.check_bn_stats`); the flags that decide how it normalizes
(``training``, ``track_running_stats``, gamma/beta frozen by hand but left in training mode,
SyncBatchNorm without a process group); PyTorch's momentum (the weight of the NEW batch,
``r <- (1 - m) r + m b``) and its averaging window; and which layers
:func:`bnkit.torch.fold_bn` could remove.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from ..audit_state import check_bn_stats, ema_window, layer_stats
from ..checks import real_or
from ..findings import Finding
from .freeze import is_frozen
from .layers import is_cumulative
from .modules import bn_like_modules, channels, describe_shapes, is_batchnorm, unequal_channel_tensors


def model_findings(model: nn.Module, layers: list[tuple[str, nn.Module]], example: Any = None) -> list[Finding]:
    """Every depth-2 finding; ``example`` (model inputs, or None) helps the fold analysis.

    ``layers``: BatchNorm layers and bnkit's ``FrozenBatchNorm*d``; the frozen ones get the array
    checks only (they have no training mode, momentum or tracking flag: their buffers are used always).
    """
    findings: list[Finding] = []
    others = bn_like_modules(model)
    if not layers and not others:
        findings.append(Finding("info", "(model)", "no BatchNorm layers found", "", "", "no_bn"))
    for name, bn in layers:
        findings += _layer_state_findings(name, bn)
    findings += _bn_like_findings(others)
    bns = [(name, bn) for name, bn in layers if is_batchnorm(bn)]
    findings += _mode_findings(model, bns)
    findings += _random_module_findings(model)
    findings += _momentum_findings(bns)
    findings += _sync_findings(bns)
    findings += _fold_findings(model, layers, example)
    return findings


def _layer_state_findings(name: str, bn: nn.Module) -> list[Finding]:
    if (bn.running_mean is None) != (bn.running_var is None):
        missing, kept = ("running_mean", "running_var") if bn.running_mean is None else ("running_var", "running_mean")
        return [Finding(
            "error", name, f"{missing} is None but {kept} is not: inference raises",
            f"PyTorch normalizes with batch statistics only where both are None; eval mode passes {kept} and None "
            f"to batch_norm, which raises ('{missing} must be defined in evaluation mode')",
            f"register the buffer again ({_reregister(missing, bn)}; load_state_dict skips a buffer that is None), "
            "then load the trained state dict"
            + (" or recalibrate (bnkit recalibrate); or set both to None to use batch statistics on purpose"
               if is_batchnorm(bn) else ""),
            "missing_running_stat", {"missing": missing})]
    if bn.running_mean is None and not is_batchnorm(bn):  # bnkit's FrozenBatchNorm*d: its forward never uses batches
        return [Finding(
            "error", name, "frozen layer without running statistics: inference raises",
            "FrozenBatchNorm normalizes with its buffers in every mode, and batch_norm raises without them "
            "('running_mean must be defined in evaluation mode')",
            f"register the buffers again ({_reregister('running_mean', bn)}; {_reregister('running_var', bn)}: "
            "load_state_dict skips buffers that are None), then load the trained state dict",
            "missing_running_stat", {"missing": "running_mean, running_var"})]
    if bn.running_mean is None or bn.running_var is None:
        unequal = []  # what the state checks below say of a layer with running statistics
        if (shapes := unequal_channel_tensors(bn)) is not None:
            what, listed = describe_shapes(shapes)
            unequal.append(Finding(
                "error", name, "BN arrays have inconsistent shapes" if what.startswith("of different") else
                "BN arrays are not one value per channel", listed,
                "give the layer one value per channel in each, shape (C,); PyTorch's forward refuses arrays of "
                "different lengths", "bad_shape", {k: list(s) for k, s in shapes.items()}))
        return unequal + [Finding(
            "warning", name, "track_running_stats=False: normalizes with batch statistics at inference",
            "no running statistics; every output depends on the other samples of its batch, and a batch of one "
            "fails (BatchNorm1d) or is normalized to beta",
            "train with track_running_stats=True, or compute running statistics (bnkit recalibrate) and set it "
            "to True before deployment", "no_running_stats")]
    if is_lazy(bn.running_mean):  # an error, as never-updated statistics are: the first forward creates them so
        return [Finding("error", name, "lazy layer not initialized: its statistics were never updated",
                        "its running statistics do not exist yet; the first forward creates them at mean 0 / "
                        "variance 1 and, in eval mode, normalizes with them",
                        "train the model, or load its trained state dict, before inference", "lazy")]
    frozen = not is_batchnorm(bn)  # bnkit's FrozenBatchNorm*d
    stale = []
    if not frozen and not bn.track_running_stats:  # the flag turned off after construction: the buffers are still there
        stale.append(Finding(
            "warning", name, "track_running_stats=False on a layer that has running statistics",
            "training normalizes with batch statistics and never updates the buffers, but eval mode still "
            "normalizes with them (torch/nn/modules/batchnorm.py _BatchNorm.forward uses buffers whenever they "
            "exist): inference runs on whatever statistics the layer held when the flag was turned off",
            "set track_running_stats=True and recalibrate (bnkit recalibrate), or remove the buffers to use "
            "batch statistics on purpose", "stale_running_stats"))
    # a frozen layer never updates or reads its counter (one loaded from torchvision's keys keeps 0)
    nbt = None if frozen else bn.num_batches_tracked
    # a drop-in layer's debias leaves no weight on the initial values (its first update replaces them), as a
    # cumulative average (momentum=None) does
    momentum = None if frozen or getattr(bn, "debias", False) else bn.momentum
    stats = layer_stats(name, {"running_mean": bn.running_mean, "running_var": bn.running_var, "weight": bn.weight,
                               "bias": bn.bias, "num_batches_tracked": nbt}, eps=float(bn.eps), momentum=momentum,
                        batchnorm=True)
    return stale + [_refused_eps(f, bn) if f.code == "negative_eps" else f for f in check_bn_stats(stats)]


def _reregister(buffer: str, bn: nn.Module) -> str:
    """The call that gives ``bn`` its ``buffer`` back, at PyTorch's initial value, in the dtype and on the device of
    its other statistic or its weight (load_state_dict keeps a buffer's dtype: a float32 one in a float64 model
    made inference raise)."""
    like = next((t for t in (bn.running_mean, bn.running_var, bn.weight) if isinstance(t, torch.Tensor)), None)
    fill = "zeros" if buffer == "running_mean" else "ones"
    if like is None:  # nothing of the layer tells its dtype (a FrozenBatchNorm without affine and statistics)
        return (f"layer.register_buffer('{buffer}', torch.{fill}({channels(bn)}, dtype=..., device=...)) with the "
                "model's dtype and device")
    where = f", dtype={like.dtype}" + ("" if like.device.type == "cpu" else f", device='{like.device}'")
    return f"layer.register_buffer('{buffer}', torch.{fill}({channels(bn)}{where}))"


def _refused_eps(finding: Finding, bn: nn.Module) -> Finding:
    """The negative-eps warning made an error where this PyTorch's ``batch_norm`` (which PyTorch's layers and
    bnkit's frozen ones call at inference) refuses the eps: then the layer's eval-mode forward raises."""
    try:
        F.batch_norm(torch.zeros(2, 1), torch.zeros(1), torch.ones(1), eps=float(bn.eps))
    except (RuntimeError, ValueError) as exc:
        return Finding("error", finding.layer, "negative eps: inference raises",
                       f"eps = {bn.eps:g}, which torch.nn.functional.batch_norm refuses ({exc}), so the layer's "
                       "eval-mode forward raises",
                       "set eps > 0 (PyTorch's default is 1e-5)", "negative_eps", finding.data)
    return finding


def _bn_like_findings(others: list[tuple[str, nn.Module]]) -> list[Finding]:
    """Their arrays checked as a state dict's are (with their own ``eps`` where they have a number for it), and an
    info finding naming them: the flag, momentum, fold and data checks know PyTorch's and bnkit's layers only. Their
    ``num_batches_tracked`` is left out: whether their forward counts is theirs to say (InstanceNorm's never does)."""
    out = []
    for name, m in others:
        buffers = {k: getattr(m, k, None) for k in ("running_mean", "running_var", "weight", "bias")}
        buffers = {k: v if isinstance(v, torch.Tensor) else None for k, v in buffers.items()}
        eps, momentum = getattr(m, "eps", None), getattr(m, "momentum", None)
        out += check_bn_stats(layer_stats(name, buffers, eps=float(eps) if isinstance(eps, (int, float)) else 1e-5,
                                          momentum=float(momentum) if isinstance(momentum, (int, float)) else None,
                                          batchnorm=False))  # a conv's or Linear's 2-D weight is no gamma
    if others:
        names = [n for n, _ in others]
        kinds = ", ".join(sorted({type(m).__name__ for _, m in others}))
        out.append(Finding(
            "info", short_names(names), "modules with running statistics that are not BatchNorm layers",
            f"{len(names)} module(s) ({kinds}) hold running_mean and running_var: their statistics are checked as "
            "a state dict's are; the mode, momentum, fold and data checks cover torch.nn's BatchNorm layers and "
            "bnkit's FrozenBatchNorm*d", "", "bn_like", {"layers": names}))
    return out


def _frozen_affine(bn: _BatchNorm) -> bool:
    """gamma/beta fixed by hand (``requires_grad=False``), not by :func:`bnkit.torch.freeze_bn`."""
    params = [p for p in (bn.weight, bn.bias) if p is not None]
    return bool(params) and not any(p.requires_grad for p in params) and not is_frozen(bn, "affine")


def _mode_findings(model: nn.Module, layers: list[tuple[str, _BatchNorm]]) -> list[Finding]:
    tracked = [(n, bn) for n, bn in layers if bn.running_mean is not None]  # buffers used in eval mode
    frozen_train = [n for n, bn in tracked if bn.training and _frozen_affine(bn)]
    train = [n for n, bn in tracked if bn.training and not _frozen_affine(bn)]
    frozen_eval = [n for n, bn in tracked if not bn.training and (_frozen_affine(bn) or is_frozen(bn, "stats"))]
    affine_only = [n for n, bn in tracked if bn.training and is_frozen(bn, "affine")]
    out = []
    if frozen_train:
        out.append(Finding(
            "error", short_names(frozen_train), "frozen layer left in training mode",
            f"gamma/beta have requires_grad=False but {len(frozen_train)} layer(s) are in training mode: they "
            "normalize with batch statistics and their running statistics drift toward the new data at every "
            "batch (model.train() undid an earlier bn.eval())",
            "freeze with bnkit.torch.freeze_bn (survives model.train()), or call .eval() on the BN layers after "
            "every model.train()", "frozen_in_train", {"layers": frozen_train}))
    if train:
        where = "the model is in training mode" if model.training else "inside a model in eval mode"
        out.append(Finding(
            "error", short_names(train), "BatchNorm in training mode",
            f"{len(train)} layer(s) in training mode ({where}): at inference they normalize with the batch's "
            "statistics, so outputs depend on the batch, and every call overwrites the running statistics "
            "(of layers that track them)",
            "call model.eval() before inference (and after any submodule.train())", "train_mode",
            {"layers": train, "model_training": model.training}))
    if frozen_eval and model.training:
        out.append(Finding(
            "info", short_names(frozen_eval), "frozen layers in eval mode inside a model in training mode",
            f"{len(frozen_eval)} layer(s) normalize with their fixed running statistics while the rest trains",
            "", "frozen", {"layers": frozen_eval}))
    if affine_only:
        out.append(Finding(
            "info", short_names(affine_only), "gamma/beta frozen, running statistics still trained",
            f"{len(affine_only)} layer(s) frozen with freeze_bn(stats=False): they normalize with batch statistics "
            "and update their running statistics while training", "", "frozen_affine", {"layers": affine_only}))
    return out


def _random_module_findings(model: nn.Module) -> list[Finding]:
    """Dropout (``p > 0``) and RReLU modules left in training mode inside a model in eval mode (set for inference,
    then a submodule's ``train()``): random at inference, which the data checks, running every module in eval mode,
    would not show. A model in training mode is left to :func:`_mode_findings` (it may be training on purpose)."""
    if model.training:
        return []
    random = [(n or type(m).__name__, m) for n, m in model.named_modules() if m.training and (
        isinstance(m, nn.RReLU) or isinstance(m, nn.modules.dropout._DropoutNd) and _drops(m.p))]
    if not random:
        return []
    names = [n for n, _ in random]
    kinds = ", ".join(sorted({type(m).__name__ for _, m in random}))
    return [Finding(
        "warning", short_names(names), f"{kinds} in training mode inside a model in eval mode",
        f"{len(names)} module(s) in training mode ({kinds}): at inference they zero or scale activations at "
        "random, so the same input gives different outputs (the audit's data checks run them in eval mode)",
        "call model.eval() after any submodule.train(), before inference", "random_train_mode",
        {"modules": names})]


def _drops(p: Any) -> bool:
    """Whether a dropout probability (a number, or a tensor of them in a subclass) is above 0 anywhere; one bnkit
    cannot read counts as dropping."""
    try:
        return bool(torch.as_tensor(p, dtype=torch.float64).gt(0).any())
    except (TypeError, ValueError, RuntimeError):
        return True


def _momentum_findings(layers: list[tuple[str, _BatchNorm]]) -> list[Finding]:
    groups: dict[float | None, list[str]] = {}
    debiased = set()  # drop-in layers with debias=True at momentum 0: a cumulative average too
    for name, bn in layers:
        if bn.track_running_stats and bn.running_mean is not None:
            # as a float where it is a number: tensors hash by identity, and JSON has none (others refused below)
            groups.setdefault(None if is_cumulative(bn) else real_or(bn.momentum, bn.momentum), []).append(name)
            if bn.momentum is not None and is_cumulative(bn):
                debiased.add(name)
    out = []
    for m, names in groups.items():
        data = {"momentum": m, "layers": names}
        if m is None:
            out.append(Finding(
                "info", short_names(names), "momentum=None: cumulative average" if not debiased & set(names) else
                "cumulative average (momentum=None, or debias=True at momentum 0)",
                "every training batch since the last reset weighs equally, early-training batches included",
                "recompute the statistics after training (bnkit recalibrate) so they match the final weights",
                "momentum", data))
        elif math.isnan(m) or m < 0 or m >= 2:
            how = ("every update makes the running statistics NaN" if math.isnan(m) else
                   f"|1 - m| = {abs(1 - m):g} > 1, so the running statistics move away from the batch statistics "
                   "at every update (they diverge)" if m < 0 else
                   f"|1 - m| = {abs(1 - m):g} >= 1, so every update lands as far or farther on the other side of "
                   "the batch statistics (they oscillate without converging" + (", ever wider)" if m > 2 else ")"))
            out.append(Finding(
                "error", short_names(names), f"momentum {m} outside [0, 1]",
                f"PyTorch updates r <- (1 - m) r + m b, m the weight of the new batch: {how}",
                "use momentum 0.1 (or None for a cumulative average), then recalibrate (bnkit recalibrate)",
                "momentum", data))
        elif m > 1:
            out.append(Finding(
                "warning", short_names(names), f"momentum {m:g} above 1",
                f"PyTorch updates r <- (1 - m) r + m b: with 1 - m = {1 - m:.3g} < 0 every update overshoots the "
                "batch statistics; they oscillate towards the data's, with sqrt(m / (2 - m)) = "
                f"{math.sqrt(m / (2 - m)):.3g} times one batch's noise",
                f"if this came from another framework, use momentum {1 - m:.3g} (bnkit.convert_momentum) if that is "
                "in [0, 1]; else 0.1", "momentum", data))
        elif m <= 0:
            out.append(Finding(
                "warning", short_names(names), f"momentum {m}: running statistics never change",
                "PyTorch's momentum is the weight of the NEW batch; 0 keeps the initial values forever",
                "use momentum 0.1 (or None for a cumulative average)", "momentum", data))
        else:
            window = ema_window(m)
            data["window"] = window
            severity, fix = "info", ""
            evidence = (f"PyTorch's momentum weighs the NEW batch: the last {window:.3g} batches carry 95% of the "
                        f"running statistics")
            if m > 0.5:
                severity = "warning"
                evidence += f" (Keras/ONNX/Flax's momentum {m:g} would be PyTorch's {1 - m:.3g})"
                fix = f"if this came from another framework, use momentum {1 - m:.3g} (bnkit.convert_momentum)"
            out.append(Finding(severity, short_names(names), f"momentum {m:g}: averaging window {window:.3g} batches",
                               evidence, fix, "momentum", data))
    return out


def _sync_findings(layers: list[tuple[str, _BatchNorm]]) -> list[Finding]:
    sync = [(n, bn) for n, bn in layers if isinstance(bn, nn.SyncBatchNorm)]
    if not sync:
        return []
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    names = [n for n, _ in sync]
    training = [n for n, bn in sync if bn.training]
    if training and not initialized:
        return [Finding(
            "warning", short_names(training), "SyncBatchNorm without a process group",
            "torch.distributed is not initialized, so in training these layers silently use the local batch's "
            "statistics only (torch/nn/modules/batchnorm.py SyncBatchNorm.forward falls back to F.batch_norm)",
            "initialize torch.distributed before training, or convert with bnkit.torch.revert_sync_bn",
            "sync_no_group", {"layers": training})]
    return [Finding(
        "info", short_names(names), "SyncBatchNorm layers",
        "in eval mode they act as BatchNorm" + ("" if initialized else "; torch.distributed is not initialized"),
        "convert with bnkit.torch.revert_sync_bn before export or single-process inference", "sync_bn",
        {"layers": names})]


def _fold_findings(model: nn.Module, layers, example) -> list[Finding]:
    tracked = [n for n, bn in layers if bn.running_mean is not None]
    if not tracked:
        return []
    try:
        from .fold import fold_plan

        fold = fold_plan(model, example, force=True)
    except Exception as exc:  # fold refuses NaN statistics, lazy modules, ...; the audit reports those itself
        return [Finding("info", "(model)", "fold analysis skipped", f"{type(exc).__name__}: {exc}", "", "fold")]
    folded = [f.bn for f in fold.folded]
    if not folded:
        return []
    return [Finding(
        "info", short_names(folded), f"{len(folded)} of {len(layers)} BatchNorm layers can be folded away",
        "at inference each is an affine map that merges into the neighbouring conv/linear layer",
        "bnkit fold (bnkit.torch.fold_bn) removes them for deployment", "foldable",
        {"folded": {f.bn: f.into for f in fold.folded}, "left": dict(fold.left), "notes": list(fold.notes)})]



def short_names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(n or "(root)" for n in names[:limit])
    return shown + (f", ... ({len(names)} layers)" if len(names) > limit else "")
