"""Audit the BatchNorm layers of a checkpoint, a model, or a model run on data.

Three depths, each adding to the one before:

1. **State** (a state dict or checkpoint file, no model code): the arrays of every
   layer, checked by :func:`bnkit.audit_state.check_bn_stats` (never-updated or
   non-finite statistics, negative or below-``eps`` variances, dead gammas, few updates).
2. **Model**: the same checks with each layer's own ``eps``/``momentum``, plus the
   flags that decide what a layer does at inference (``training``,
   ``track_running_stats``, frozen gamma/beta, SyncBatchNorm without a process group),
   the momentum's averaging window, and which layers :func:`bnkit.torch.fold_bn` could
   remove.
3. **Model + data**: one forward per batch with every BN layer normalizing with the
   batch's own statistics, as in training, and other modules in eval mode; no running
   statistic is updated (stock layers run PyTorch's eval kernel on the batch moments,
   computed in a pre-hook; layers with their own ``forward`` run in training mode
   without tracking). Each layer's input then has the distribution its
   running statistics estimate in training (PyTorch's update averages exactly these
   batch statistics; torch/nn/modules/batchnorm.py ``_BatchNorm.forward``), *whatever
   the upstream layers' running statistics are*, so one corrupted layer is ranked first
   instead of smearing into every layer after it. Per layer and channel, with the
   data's mean/variance ``mu_d, v_d`` (float64, Chan's merge) and the running ``mu_r, v_r``::

       z = (mu_d - mu_r) / sqrt(v_r + eps)              standardized mean shift
       L = log((v_d + eps) / (v_r + eps))               log variance ratio
       KL = (exp(L) - 1 - L + z**2) / 2                 KL(N(mu_d, v_d) || N(mu_r, v_r))

   Layers are ranked by the channel mean of KL (``z_eq = sqrt(2 KL)`` is the mean
   shift, in standard deviations, that alone would give that KL). Then, in eval mode,
   the train-vs-eval output gap on the first batch, and outputs at batch size 1 against
   the same samples inside the batch: in eval mode BatchNorm with running statistics
   cannot couple samples, so a difference names either a batch-statistics BN layer or
   something else (``x - x.mean(0)``, batch-level ops). Last, how much the running
   statistics wobble at the training batch size: PyTorch's update
   ``r <- (1 - m) r + m b`` (``m`` weighs the NEW batch) keeps a fraction
   ``sqrt(m / (2 - m))`` of one batch statistic's standard deviation
   (:func:`bnkit.audit_state.ema_noise_factor`); the batch statistic's spread is
   measured between the data's batches and scaled to the training batch size.

Nothing is changed: every module's train/eval flag, ``momentum``,
``track_running_stats`` and BN buffers are restored, also when a forward fails.
``bnkit.torch.audit`` names both this module and :func:`audit`; calling the module
calls the function.
"""
from __future__ import annotations

import json
import math
import os
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy

from ..audit_state import BNStats, audit_state, check_bn_stats, ema_noise_factor, ema_window
from ..findings import SEVERITIES, Finding, worst_severity
from ..stats import RunningMoments
from .io import load_state_dict_file
from .freeze import is_frozen
from .modules import bn_layers

__all__ = ["audit", "AuditReport", "LayerShift"]

#: Layer shift score (channel-mean KL) at or above which the mismatch is an error / a warning.
SHIFT_ERROR_KL = 0.5  # z_eq = 1 standard deviation
SHIFT_WARNING_KL = 0.045  # z_eq = 0.3
#: Relative train-vs-eval output gap above which a warning is raised.
GAP_WARNING = 0.5
#: Batch-1 vs batch-B outputs differing by more than this (relative to max |output|) are coupled.
COUPLING_RTOL = 1e-3
#: Expected running-mean wobble (in running standard deviations) above which a warning is raised.
NOISE_WARNING = 0.1


@dataclass
class LayerShift:
    """How far the data's batch statistics at one layer are from its running statistics.

    ``mean_shift``: ``z`` of the worst channel (signed); ``log_var_ratio``: ``L`` of the
    worst channel (signed); ``score``: channel mean of KL; ``z_eq = sqrt(2 score)``.
    ``mean_noise`` / ``var_noise``: expected standard deviation of the running mean (in
    running standard deviations) and relative one of the running variance at the training
    batch size, root-mean-square over channels (None when fewer than 2 batches were seen).
    """

    layer: str
    score: float
    z_eq: float
    mean_shift: float
    log_var_ratio: float
    worst_channel: int
    count: int
    mean_noise: float | None = None
    var_noise: float | None = None


@dataclass
class AuditReport:
    """The findings of :func:`audit`, most severe first, and what was measured.

    ``depth`` is ``"state"``, ``"model"``, ``"data"`` or ``"onnx"``. ``ok`` is True when no
    finding is an error (the model's inference outputs are not known to be wrong).
    """

    target: str
    depth: str
    layers: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    shifts: list[LayerShift] = field(default_factory=list)
    train_eval_gap: float | None = None
    batch_coupling: float | None = None
    batches: int = 0

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    @property
    def worst(self) -> str | None:
        return worst_severity(self.findings)

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"], out["worst"] = self.ok, self.worst
        return _jsonable(out)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        verdict = "OK" if self.ok else "ERRORS"
        return (f"{verdict}: {len(self.layers)} BatchNorm layer(s) audited ({self.depth}); "
                + ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items()))


def audit(
    target: nn.Module | Mapping[str, Any] | str | os.PathLike,
    data: Any = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    trust: bool = False,
    batch_size: int = 64,
    train_batch_size: int | None = None,
    max_batches: int | None = None,
    coupling_samples: int = 8,
) -> AuditReport:
    """Audit the BatchNorm layers of ``target``; see the module docstring for the checks.

    Args:
        target: an ``nn.Module``; a flat state dict; or a checkpoint file (``.pt``/``.pth``
            loaded with ``weights_only=True``, ``.safetensors``). ``.onnx`` files go to
            :func:`bnkit.onnx.audit`.
        data: needs a model. A tensor/array (split into ``batch_size`` batches) or an
            iterable of batches: tensors, ``(input, target, ...)`` tuples, or whatever
            ``forward`` takes.
        forward: ``forward(model, batch) -> output``; default ``model(batch)``, or
            ``model(batch[0])`` for tuples and lists.
        trust: unpickle checkpoints with arbitrary objects (only files you made yourself).
        train_batch_size: batch size of training, for the running statistics' noise
            (default: the data's batch size).
        max_batches: use at most this many batches of ``data``.
        coupling_samples: how many samples are rerun at batch size 1.
    """
    if isinstance(target, (str, os.PathLike)):
        path = Path(target)
        if path.suffix.lower() == ".onnx":
            if data is not None:
                raise ValueError("data can only be audited with a PyTorch model, not an ONNX file")
            from ..onnx import audit as onnx_audit

            onnx_report = onnx_audit(path)
            return AuditReport(str(path), "onnx", findings=_sorted(list(onnx_report.findings)),
                               layers=[node["name"] for node in onnx_report.nodes])
        state = load_state_dict_file(path, trust=trust)
        return _state_report(str(path), state, data)
    if isinstance(target, nn.Module):
        return _model_report(target, data, forward, batch_size, train_batch_size, max_batches, coupling_samples)
    if isinstance(target, Mapping):
        return _state_report("state dict", target, data)
    raise TypeError(f"audit takes a model, a state dict or a file path, got {type(target).__name__}")


# ------------------------------------------------------------------------------------------ depth 1


def _state_report(name: str, state: Mapping[str, Any], data: Any) -> AuditReport:
    if data is not None:
        raise ValueError("auditing with data needs the model: pass an nn.Module (CLI: --model package.module:factory)")
    findings = audit_state(state)
    layers = sorted({k[: -len(".running_mean")] for k in state if k.endswith(".running_mean")}
                    | ({"(root)"} if "running_mean" in state else set()))
    if not layers:
        findings.append(Finding("info", "(state)", "no BatchNorm layers found",
                                "no '<layer>.running_mean' / '.running_var' buffers in the state dict", "", "no_bn"))
    else:
        findings.append(Finding(
            "info", "(state)", "eps and momentum assumed to be PyTorch's defaults",
            "a state dict stores neither; eps = 1e-5, momentum = 0.1 (new-batch weight)",
            "audit the model (--model) for its own values", "assumed_defaults"))
    return AuditReport(name, "state", layers=layers, findings=_sorted(findings))


# ------------------------------------------------------------------------------------------ depth 2


def _model_report(model, data, forward, batch_size, train_batch_size, max_batches, coupling_samples) -> AuditReport:
    layers = bn_layers(model)
    report = AuditReport(type(model).__name__, "model", layers=[name for name, _ in layers])
    findings: list[Finding] = []
    if not layers:
        findings.append(Finding("info", "(model)", "no BatchNorm layers found", "", "", "no_bn"))
    for name, bn in layers:
        findings += _layer_state_findings(name, bn)
    findings += _mode_findings(model, layers)
    findings += _momentum_findings(layers)
    findings += _sync_findings(layers)
    batches = None
    if data is not None:
        lazy = [n or type(m).__name__ for n, m in model.named_modules()
                if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
        if lazy:
            raise ValueError(f"uninitialized lazy modules ({', '.join(lazy)}): a forward pass would create their "
                             "parameters; run one yourself before auditing with data")
        batches = _Batches(data, batch_size, max_batches, model)
    findings += _fold_findings(model, layers, batches.first_input(forward) if batches is not None else None)
    if batches is not None:
        report.depth = "data"
        findings += _data_findings(model, layers, batches, forward or _default_forward,
                                   train_batch_size, coupling_samples, report)
    report.findings = _sorted(findings)
    return report


def _layer_state_findings(name: str, bn: _BatchNorm) -> list[Finding]:
    if bn.running_mean is None or bn.running_var is None:
        return [Finding(
            "warning", name, "track_running_stats=False: normalizes with batch statistics at inference",
            "no running statistics; every output depends on the other samples of its batch, and a batch of one "
            "fails (BatchNorm1d) or is normalized to beta",
            "train with track_running_stats=True, or compute running statistics (bnkit recalibrate) and set it "
            "to True before deployment", "no_running_stats")]
    if is_lazy(bn.running_mean):
        return [Finding("info", name, "lazy layer not initialized", "run one forward pass to create its buffers",
                        "", "lazy")]
    nbt = bn.num_batches_tracked
    stats = BNStats(
        name=name,
        running_mean=_np(bn.running_mean),
        running_var=_np(bn.running_var),
        weight=None if bn.weight is None else _np(bn.weight),
        bias=None if bn.bias is None else _np(bn.bias),
        num_batches_tracked=None if nbt is None else int(nbt),
        eps=float(bn.eps),
        momentum=bn.momentum,
    )
    return check_bn_stats(stats)


def _frozen_affine(bn: _BatchNorm) -> bool:
    """gamma/beta fixed by hand (``requires_grad=False``), not by :func:`bnkit.torch.freeze_bn`."""
    params = [p for p in (bn.weight, bn.bias) if p is not None]
    return bool(params) and not any(p.requires_grad for p in params) and not is_frozen(bn, "affine")


def _mode_findings(model: nn.Module, layers: list[tuple[str, _BatchNorm]]) -> list[Finding]:
    tracked = [(n, bn) for n, bn in layers if bn.track_running_stats and bn.running_mean is not None]
    frozen_train = [n for n, bn in tracked if bn.training and _frozen_affine(bn)]
    train = [n for n, bn in tracked if bn.training and not _frozen_affine(bn)]
    frozen_eval = [n for n, bn in tracked if not bn.training and (_frozen_affine(bn) or is_frozen(bn, "stats"))]
    affine_only = [n for n, bn in tracked if bn.training and is_frozen(bn, "affine")]
    out = []
    if frozen_train:
        out.append(Finding(
            "error", _names(frozen_train), "frozen layer left in training mode",
            f"gamma/beta have requires_grad=False but {len(frozen_train)} layer(s) are in training mode: they "
            "normalize with batch statistics and their running statistics drift toward the new data at every "
            "batch (model.train() undid an earlier bn.eval())",
            "freeze with bnkit.torch.freeze_bn (survives model.train()), or call .eval() on the BN layers after "
            "every model.train()", "frozen_in_train", {"layers": frozen_train}))
    if train:
        where = "the model is in training mode" if model.training else "inside a model in eval mode"
        out.append(Finding(
            "error", _names(train), "BatchNorm in training mode",
            f"{len(train)} layer(s) in training mode ({where}): at inference they normalize with the batch's "
            "statistics, so outputs depend on the batch, and every call overwrites the running statistics",
            "call model.eval() before inference (and after any submodule.train())", "train_mode",
            {"layers": train, "model_training": model.training}))
    if frozen_eval and model.training:
        out.append(Finding(
            "info", _names(frozen_eval), "frozen layers in eval mode inside a model in training mode",
            f"{len(frozen_eval)} layer(s) normalize with their fixed running statistics while the rest trains",
            "", "frozen", {"layers": frozen_eval}))
    if affine_only:
        out.append(Finding(
            "info", _names(affine_only), "gamma/beta frozen, running statistics still trained",
            f"{len(affine_only)} layer(s) frozen with freeze_bn(stats=False): they normalize with batch statistics "
            "and update their running statistics while training", "", "frozen_affine", {"layers": affine_only}))
    return out


def _momentum_findings(layers: list[tuple[str, _BatchNorm]]) -> list[Finding]:
    groups: dict[float | None, list[str]] = {}
    for name, bn in layers:
        if bn.track_running_stats and bn.running_mean is not None:
            groups.setdefault(bn.momentum, []).append(name)
    out = []
    for m, names in groups.items():
        data = {"momentum": m, "layers": names}
        if m is None:
            out.append(Finding(
                "info", _names(names), "momentum=None: cumulative average",
                "every training batch since the last reset weighs equally, early-training batches included",
                "recompute the statistics after training (bnkit recalibrate) so they match the final weights",
                "momentum", data))
        elif m <= 0:
            out.append(Finding(
                "warning", _names(names), f"momentum {m}: running statistics never change",
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
            out.append(Finding(severity, _names(names), f"momentum {m:g}: averaging window {window:.3g} batches",
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
            "warning", _names(training), "SyncBatchNorm without a process group",
            "torch.distributed is not initialized, so in training these layers silently use the local batch's "
            "statistics only (torch/nn/modules/batchnorm.py SyncBatchNorm.forward falls back to F.batch_norm)",
            "initialize torch.distributed before training, or convert with bnkit.torch.revert_sync_bn",
            "sync_no_group", {"layers": training})]
    return [Finding(
        "info", _names(names), "SyncBatchNorm layers",
        "in eval mode they act as BatchNorm" + ("" if initialized else "; torch.distributed is not initialized"),
        "convert with bnkit.torch.revert_sync_bn before export or single-process inference", "sync_bn",
        {"layers": names})]


def _fold_findings(model: nn.Module, layers, example) -> list[Finding]:
    tracked = [n for n, bn in layers if bn.running_mean is not None]
    if not tracked:
        return []
    try:
        from .fold import fold_bn

        _, fold = fold_bn(model, example, verify=False, force=True)
    except Exception as exc:  # fold refuses NaN statistics, lazy modules, ...; the audit reports those itself
        return [Finding("info", "(model)", "fold analysis skipped", f"{type(exc).__name__}: {exc}", "", "fold")]
    folded = [f.bn for f in fold.folded]
    if not folded:
        return []
    return [Finding(
        "info", _names(folded), f"{len(folded)} of {len(layers)} BatchNorm layers can be folded away",
        "at inference each is an affine map that merges into the neighbouring conv/linear layer",
        "bnkit fold (bnkit.torch.fold_bn) removes them for deployment", "foldable",
        {"folded": {f.bn: f.into for f in fold.folded}, "left": dict(fold.left)})]


# ------------------------------------------------------------------------------------------ depth 3


class _Batches:
    """The data's batches, streamed once, on the model's device with floating tensors in its dtype.

    The first batch is kept (the eval-mode checks rerun it); the rest are not stored.
    """

    def __init__(self, data: Any, batch_size: int, max_batches: int | None, model: nn.Module) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        self.dtype = param.dtype if param is not None else torch.get_default_dtype()
        self.device = param.device if param is not None else torch.device("cpu")
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(data)
        if isinstance(data, torch.Tensor):
            if data.ndim == 0 or len(data) == 0:
                raise ValueError(f"data must hold at least one sample, got shape {tuple(data.shape)}")
            data = torch.split(data, batch_size)
        self._iter = iter(data)
        self.max_batches = max_batches
        try:
            self.first = self._prepare(next(self._iter), 0)
        except StopIteration:
            raise ValueError("data yielded no batches") from None

    def __iter__(self):
        yield self.first
        for i, batch in enumerate(self._iter, start=1):
            if self.max_batches is not None and i >= self.max_batches:
                break
            yield self._prepare(batch, i)

    def _prepare(self, batch: Any, index: int) -> Any:
        def move(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point():
                # NaN/Inf always reach the sum; only a sum that overflows needs the element-wise check
                if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"data batch {index} contains NaN or Inf")
                t = t.to(self.dtype)
            return t.to(self.device)

        return _map_tensors(batch, move)

    def first_input(self, forward) -> Any:
        if forward is not None:
            return None  # the model's inputs are only known to ``forward``
        return self.first[0] if isinstance(self.first, (tuple, list)) else self.first


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


class _Restore:
    """Remember every module's flag and each BN layer's momentum, tracking flag and buffers; restore on exit."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, _BatchNorm]]) -> None:
        self.flags = [(m, m.training) for m in model.modules()]
        self.bn = [(bn, bn.momentum, bn.track_running_stats,
                    {k: b.detach().clone() for k, b in bn.named_buffers(recurse=False) if b is not None and not is_lazy(b)})
                   for _, bn in layers]

    def __enter__(self) -> "_Restore":
        return self

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag
        self.buffers_and_options()

    def buffers_and_options(self) -> None:
        with torch.no_grad():
            for bn, momentum, track, buffers in self.bn:
                bn.momentum, bn.track_running_stats = momentum, track
                for k, saved in buffers.items():
                    getattr(bn, k).copy_(saved)


def _moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(count, mean, M2)`` per channel (axis 1) of one batch, two-pass, at least float32.

    Sums over an ``(N, C, -1)`` view, then ``sum((x - mean)^2)``: several times faster on
    CPU than ``torch.var_mean`` over ``(0, 2, 3)`` or a training-mode ``F.batch_norm``.
    """
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if x.ndim == 2:
        n = x.shape[0]
        mean = x.sum(0) / n
        d = x - mean
        return n, mean, d.mul_(d).sum(0)
    xv = x.reshape(x.shape[0], x.shape[1], -1)
    n = xv.shape[0] * xv.shape[2]
    mean = xv.sum(2).sum(0) / n
    d = xv - mean[:, None]
    return n, mean, d.mul_(d).sum(2).sum(0)


#: Up to this many values per channel and sample, PyTorch's training kernel computes the batch
#: moments faster than :func:`_moments` does (BatchNorm1d on ``(N, C)``, tiny feature maps).
_KERNEL_STATS_MAX_VALUES = 4


class _Collector:
    """Per-layer float64 moments of a BN layer's input: pooled with Chan's formula, and per call.

    How a stock layer (``forward`` not overridden) normalizes a call with its batch's own
    statistics, without touching what :class:`_Restore` will put back into its buffers:

    * large feature maps: the layer stays in eval mode and a forward pre-hook writes the
      batch's mean and biased variance (what training mode normalizes with) into its
      running buffers, so PyTorch's fast eval kernel applies them;
    * up to :data:`_KERNEL_STATS_MAX_VALUES` values per channel and sample: the call runs in
      training mode with ``momentum = 1``, so PyTorch's update ``r = (1 - m) r + m b``
      leaves exactly the batch mean and unbiased variance in the buffers, read after it.

    The layer's first call picks one of the two and drops the other hook.

    Layers with their own ``forward`` run in training mode without tracking, and their
    input is reduced after the call.
    """

    def __init__(self, bn: _BatchNorm) -> None:
        self.moments = RunningMoments(bn.num_features)
        self.stock = type(bn).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward)
        self.samples: list[tuple[int, int]] = []  # (batch size, values per channel)
        self.means: list[torch.Tensor] = []
        self.m2: list[torch.Tensor] = []
        self._kernel_call: bool | None = None
        self._handles: list[Any] = []

    def attach(self, bn: _BatchNorm) -> list[Any]:
        """Put the layer on batch statistics for the pass; returns the hook handles."""
        if self.stock:
            bn.momentum, bn.track_running_stats = 1.0, True
            bn.running_mean.zero_()  # scratch space from here on; (1 - 1) * NaN would stay NaN
            bn.running_var.fill_(1.0)
            self._handles = [bn.register_forward_pre_hook(self._before), bn.register_forward_hook(self._after_kernel)]
        else:
            bn.training, bn.track_running_stats = True, False
            self._handles = [bn.register_forward_hook(self._after)]
        return self._handles

    def _record(self, x: torch.Tensor, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        self.samples.append((x.shape[0], n))
        self.means.append(mean)
        self.m2.append(m2)

    def _before(self, module: _BatchNorm, args: tuple) -> None:
        x = args[0]
        if self._kernel_call is None:  # the first call picks the faster way; either is exact
            self._kernel_call = x.numel() // (x.shape[0] * x.shape[1]) <= _KERNEL_STATS_MAX_VALUES
            module.training = self._kernel_call
            self._handles[0 if self._kernel_call else 1].remove()
            if self._kernel_call:
                return
        n, mean, m2 = _moments(x)
        self._record(x, n, mean, m2)
        module.running_mean.copy_(mean)
        module.running_var.copy_(m2 / n)  # training mode normalizes with the biased variance

    def _after_kernel(self, module: _BatchNorm, args: tuple, output: Any) -> None:
        x = args[0]
        n = x.numel() // x.shape[1]
        var = module.running_var.to(torch.float64, copy=True)  # unbiased; copies, the next call overwrites
        self._record(x, n, module.running_mean.to(torch.float64, copy=True), var * (n - 1))

    def _after(self, module: _BatchNorm, args: tuple, output: Any) -> None:
        self._record(args[0], *_moments(args[0]))

    def pool(self) -> RunningMoments:
        """The calls' ``(count, mean, M2)`` merged in float64 by Chan's formula for K partials.

        ``mean = sum n_k m_k / N``, ``M2 = sum M2_k + sum n_k (m_k - mean)^2``: the pairwise
        update of :class:`bnkit.stats.RunningMoments` applied to all calls at once.
        """
        if self.means and self.moments.count == 0:
            counts = np.array([n for _, n in self.samples], dtype=np.float64)[:, None]
            means = torch.stack(self.means).double().cpu().numpy()
            total = counts.sum()
            mean = (counts * means).sum(0) / total
            m2 = torch.stack(self.m2).double().cpu().numpy().sum(0) + (counts * (means - mean) ** 2).sum(0)
            self.moments.update_moments(int(total), mean, m2)
        return self.moments

    def batch_vars(self) -> torch.Tensor:
        """Each call's unbiased variance, float64, ``(calls, C)``."""
        counts = torch.tensor([max(n - 1, 1) for _, n in self.samples], dtype=torch.float64)[:, None]
        return torch.stack(self.m2).double().cpu() / counts


def _data_findings(model, layers, batches: _Batches, forward, train_batch_size, coupling_samples,
                   report: AuditReport) -> list[Finding]:
    tracked = [(n, bn) for n, bn in layers if bn.running_mean is not None and not is_lazy(bn.running_mean)]
    collectors = {n: _Collector(bn) for n, bn in tracked}
    findings: list[Finding] = []
    with _Restore(model, layers) as restore, torch.no_grad():
        # pass 1: every BN on batch statistics (its buffers as scratch space); other modules in eval mode
        _set_training(model, False)  # assigned, not model.eval(): a frozen layer's own train() must not run
        handles = [h for n, bn in tracked for h in collectors[n].attach(bn)]
        try:
            batch_out, used = None, 0
            for i, batch in enumerate(batches):
                if (_batch_len(batch) or 0) < 2:
                    continue  # batch statistics need two samples (a trailing remainder of one)
                try:
                    out = forward(model, batch)
                except Exception as exc:
                    raise ValueError(f"the model failed on data batch {i} with BatchNorm on batch statistics: "
                                     f"{type(exc).__name__}: {exc}") from exc
                if batch_out is None:
                    batch_out, first = _flatten(out), batch
                used += 1
        finally:
            for h in handles:
                h.remove()
        if not used:
            raise ValueError("every data batch has fewer than 2 samples: batch statistics need at least 2")
        report.batches = used
        # pass 2: the model in eval mode, first batch, then single samples
        restore.buffers_and_options()
        _set_training(model, False)
        try:
            eval_out = _flatten(forward(model, first))
        except Exception as exc:
            raise ValueError(f"the model failed in eval mode on the first data batch: {type(exc).__name__}: {exc}") from exc
        findings += _gap_findings(batch_out, eval_out, report)
        findings += _coupling_findings(model, layers, first, eval_out, forward, coupling_samples, report)
    b_train = train_batch_size or _batch_len(first)
    findings += _shift_findings(tracked, collectors, b_train, report)
    return findings


def _shift_findings(tracked, collectors, b_train: int, report: AuditReport) -> list[Finding]:
    shifts = []
    for name, bn in tracked:
        col = collectors[name]
        if col.pool().count == 0:
            continue
        mu_r, var_r = _np(bn.running_mean), _np(bn.running_var)
        if not (np.isfinite(mu_r).all() and np.isfinite(var_r).all()) or (var_r + bn.eps <= 0).any():
            continue  # reported by the state checks
        eps = float(bn.eps)
        mu_d = col.moments.mean
        var_d = col.moments.var_unbiased if col.moments.count > 1 else col.moments.var
        z = (mu_d - mu_r) / np.sqrt(var_r + eps)
        log_ratio = np.log((var_d + eps) / (var_r + eps))
        kl = 0.5 * (np.expm1(log_ratio) - log_ratio + z * z)
        worst = int(np.argmax(kl))
        shift = LayerShift(name, float(kl.mean()), float(math.sqrt(2 * kl.mean())), float(z[worst]),
                           float(log_ratio[worst]), worst, int(col.moments.count))
        shift.mean_noise, shift.var_noise = _noise(col, bn, b_train, var_r + eps)
        shifts.append(shift)
    shifts.sort(key=lambda s: s.score, reverse=True)
    report.shifts = shifts
    findings = []
    for rank, s in enumerate(shifts, start=1):
        if s.score < SHIFT_WARNING_KL:
            continue
        findings.append(Finding(
            "error" if s.score >= SHIFT_ERROR_KL else "warning", s.layer,
            f"running statistics do not match the data (rank {rank})",
            f"like a shift of {s.z_eq:.2f} std per channel; worst channel {s.worst_channel}: mean off by "
            f"{s.mean_shift:+.2f} std, variance x{math.exp(s.log_var_ratio):.3g}",
            "the top-ranked layer is where the mismatch starts (layers are measured on batch statistics, so "
            "upstream errors do not propagate): if its statistics were altered, restore them; if this data is "
            "what the model will see, recalibrate (bnkit recalibrate)",
            "stat_shift", asdict(s)))
    noisy = [s for s in shifts if s.mean_noise is not None]
    if noisy:
        worst = max(noisy, key=lambda s: s.mean_noise)
        worst_var = max(noisy, key=lambda s: s.var_noise)
        momentum = dict(tracked)[worst.layer].momentum
        findings.append(Finding(
            "warning" if worst.mean_noise > NOISE_WARNING else "info", worst.layer,
            f"running statistics noise at training batch size {b_train}",
            f"running means are expected to wobble by {worst.mean_noise:.3g} std (momentum {momentum}); "
            f"running variances by {100 * worst_var.var_noise:.3g}% ({worst_var.layer})",
            "" if worst.mean_noise <= NOISE_WARNING else
            "use larger batches, a smaller momentum, or recompute the statistics after training (bnkit recalibrate)",
            "stat_noise", {"train_batch_size": b_train, "mean_noise": worst.mean_noise,
                           "var_noise": worst_var.var_noise}))
    return findings


def _noise(col: _Collector, bn: _BatchNorm, b_train: int, var_r: np.ndarray) -> tuple[float | None, float | None]:
    """RMS over channels of the running mean's std (in running std) and running variance's relative std.

    Between-batch mean squares (one-way ANOVA) give a batch statistic's variance per
    sample, ``s2 = sum_b n_b (m_b - m)^2 / (K - 1)``; at batch size ``B`` it is ``s2 / B``
    (``sum_b (n_b - 1)(v_b - v)^2 / (K - 1)`` and ``/ (B - 1)`` for the unbiased variance).
    """
    if len(col.means) < 2:
        return None, None
    n = torch.tensor([b for b, _ in col.samples], dtype=torch.float64)[:, None]
    means, variances = torch.stack(col.means).double().cpu(), col.batch_vars()
    k = len(col.means)
    m_bar = (n * means).sum(0) / n.sum()
    v_bar = ((n - 1) * variances).sum(0) / (n - 1).sum()
    s2_mean = (n * (means - m_bar) ** 2).sum(0) / (k - 1)
    s2_var = ((n - 1) * (variances - v_bar) ** 2).sum(0) / (k - 1)
    if bn.momentum is None:
        updates = max(int(bn.num_batches_tracked or 1), 1)
        factor = 1.0 / math.sqrt(updates)
    else:
        factor = ema_noise_factor(bn.momentum) if bn.momentum > 0 else 0.0
    mean_noise = factor * np.sqrt(s2_mean.numpy() / b_train / var_r)
    var_noise = factor * np.sqrt(s2_var.numpy() / max(b_train - 1, 1)) / np.maximum(v_bar.numpy() + bn.eps, 1e-300)
    return float(np.sqrt(np.mean(mean_noise ** 2))), float(np.sqrt(np.mean(var_noise ** 2)))


def _gap_findings(batch_out: list[torch.Tensor], eval_out: list[torch.Tensor], report: AuditReport) -> list[Finding]:
    if not batch_out or not eval_out or len(batch_out) != len(eval_out):
        return [Finding("info", "(model)", "train-vs-eval gap not measured", "the model's output holds no tensors",
                        "", "gap")]
    a = torch.cat([t.double().flatten() for t in batch_out])
    b = torch.cat([t.double().flatten() for t in eval_out])
    if not bool(torch.isfinite(b).all()):
        return [Finding("error", "(model)", "non-finite outputs in eval mode",
                        f"{int((~torch.isfinite(b)).sum())} of {b.numel()} output values are NaN/Inf on the first batch",
                        "see the non-finite / negative variance findings; recalibrate the statistics", "eval_nonfinite")]
    gap = float((a - b).norm() / a.norm().clamp_min(1e-12))
    report.train_eval_gap = gap
    agree = ""
    if batch_out[0].ndim == 2 and batch_out[0].shape[1] > 1:
        same = (batch_out[0].argmax(1) == eval_out[0].argmax(1)).double().mean()
        agree = f"; argmax agrees on {100 * float(same):.3g}% of the batch"
    return [Finding(
        "warning" if gap > GAP_WARNING else "info", "(model)", "train-vs-eval output gap",
        f"|y_train - y_eval| / |y_train| = {gap:.3g} on the first batch (batch statistics vs running statistics)"
        + agree, "" if gap <= GAP_WARNING else "see the ranked statistics shifts; recalibrate on this data",
        "gap", {"gap": gap})]


def _coupling_findings(model, layers, batch, eval_out, forward, samples: int, report: AuditReport) -> list[Finding]:
    size = _batch_len(batch)
    if size is None or size < 2 or samples < 1 or not eval_out:
        return []
    if not all(bool(torch.isfinite(t).all()) for t in eval_out if t.is_floating_point()):
        return []  # reported as non-finite eval outputs
    batch_stat_bn = [n for n, bn in layers if bn.running_mean is None]
    idx = sorted(set(np.linspace(0, size - 1, min(samples, size)).round().astype(int).tolist()))
    worst = 0.0
    scale = max(float(t.abs().max()) for t in eval_out if t.numel()) if eval_out else 1.0
    for i in idx:
        try:
            single = _flatten(forward(model, _map_tensors(batch, lambda t: t[i:i + 1] if _batched(t, size) else t)))
        except Exception as exc:
            return [Finding("error", "(model)", "the model fails at batch size 1 in eval mode",
                            f"{type(exc).__name__}: {exc}",
                            "layers using batch statistics at inference need more than one sample: give them "
                            "running statistics (track_running_stats=True)", "batch_one_fails")]
        for s, ref in zip(single, eval_out):
            if s.ndim and ref.ndim and ref.shape[0] == size and s.shape[0] == 1:
                worst = max(worst, float((s[0].double() - ref[i].double()).abs().max()))
    rel = worst / max(scale, 1e-12)
    report.batch_coupling = rel
    if rel <= COUPLING_RTOL:
        return [Finding("info", "(model)", "per-sample outputs do not depend on the batch",
                        f"eval mode, batch size 1 vs {size} on {len(idx)} samples: max difference {rel:.2g} of max |output|",
                        "", "batch_coupling", {"relative_diff": rel})]
    if batch_stat_bn:
        cause = f"BatchNorm layers without running statistics ({_names(batch_stat_bn)}) normalize with the batch's"
        fix = "give these layers running statistics (track_running_stats=True, then bnkit recalibrate)"
    else:
        cause = ("every BatchNorm layer uses running statistics in eval mode, so something OTHER than BatchNorm "
                 "couples the batch (e.g. x - x.mean(0), batch-level normalization or attention across the batch)")
        fix = "find the operation that reduces over the batch dimension and make it per-sample"
    return [Finding("error", "(model)", "per-sample outputs depend on the rest of the batch",
                    f"eval mode, batch size 1 vs {size}: outputs differ by {rel:.3g} of max |output|; {cause}",
                    fix, "batch_coupling", {"relative_diff": rel, "batch_stat_layers": batch_stat_bn})]


# ------------------------------------------------------------------------------------------ helpers


def _set_training(model: nn.Module, flag: bool) -> None:
    for m in model.modules():
        m.training = flag


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(n or "(root)" for n in names[:limit])
    return shown + (f", ... ({len(names)} layers)" if len(names) > limit else "")


def _sorted(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, np.ndarray):
        return fn(torch.from_numpy(obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _flatten(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj.detach()]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flatten(o)]
    if isinstance(obj, Mapping):
        return [t for o in obj.values() for t in _flatten(o)]
    return []


def _batch_len(batch: Any) -> int | None:
    tensors = _flatten(batch)
    return int(tensors[0].shape[0]) if tensors and tensors[0].ndim else None


def _batched(t: torch.Tensor, size: int) -> bool:
    return t.ndim > 0 and t.shape[0] == size


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else str(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


class _CallableModule(types.ModuleType):
    """Calling the module calls :func:`audit`.

    The function shares this module's name, and importing the module binds the name
    ``bnkit.torch.audit`` to the module, so ``bnkit.torch.audit(model)`` must work either way.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> AuditReport:
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
