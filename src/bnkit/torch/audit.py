"""Audit the BatchNorm layers of a checkpoint, a model, or a model run on data.

Three depths, each adding to the one before:

1. **State** (a state dict or checkpoint file, no model code): the arrays of every
   layer, checked by :func:`bnkit.audit_state.check_bn_stats` (never-updated or
   non-finite statistics, negative or below-``eps`` variances, dead gammas, few updates).
2. **Model**: the same checks with each layer's own ``eps``/``momentum``, plus the
   flags that decide what a layer does at inference (``training``,
   ``track_running_stats``, frozen gamma/beta, SyncBatchNorm without a process group),
   the momentum's averaging window, and which layers :func:`bnkit.torch.fold_bn` could
   remove. bnkit's buffer-only ``FrozenBatchNorm*d`` (:func:`bnkit.torch.convert_frozen`)
   get the array checks (their ``num_batches_tracked`` aside: they never update or read
   it) and no mode or momentum checks: they normalize with their buffers in every mode.
3. **Model + data**: one forward per batch with every BN layer (frozen ones included)
   normalizing with the batch's own statistics, as in training, and other modules in eval mode; no running
   statistic is updated (stock layers get a stand-in ``forward`` for the pass that
   normalizes with the batch's moments and keeps them, :class:`bnkit.torch.audit_moments.Collector`;
   layers with their own ``forward`` run in training mode without tracking). Each layer's
   input then has the distribution its
   running statistics estimate in training (PyTorch's update averages exactly these
   batch statistics; torch/nn/modules/batchnorm.py ``_BatchNorm.forward``), *whatever
   the upstream layers' running statistics are*, so one corrupted layer is ranked first
   instead of smearing into every layer after it. Per layer and channel, with the
   data's mean/variance ``mu_d, v_d`` (float64, Chan's merge; each call's moments taken about a value of its data
   where the running mean sits far from zero, see ``audit_moments._far_from_zero``) and the running ``mu_r, v_r``::

       z = (mu_d - mu_r) / sqrt(v_r + eps)              standardized mean shift
       L = log((v_d + eps) / (v_r + eps))               log variance ratio
       KL = (exp(L) - 1 - L + z**2) / 2                 KL(N(mu_d, v_d) || N(mu_r, v_r))

   Layers are ranked by the channel mean of KL (``z_eq = sqrt(2 KL)`` is the mean
   shift, in standard deviations, that alone would give that KL) less what sampling noise alone gives at the
   layer's number of values per channel (``LayerShift.sampling_kl``; see :mod:`bnkit.torch.audit_data`). Then, in eval mode,
   the train-vs-eval output gap on the first batch, and outputs at batch size 1 against
   the same samples inside the batch: in eval mode BatchNorm with running statistics
   cannot couple samples, so a difference names either a batch-statistics BN layer or
   something else (``x - x.mean(0)``, batch-level ops). Outputs are paired by shape: the
   batch is the one dimension where the batch-1 and batch-B shapes differ (1 vs B; dim 0,
   or dim 1 of a sequence-first output), or a dimension of size B squeezed away at batch
   size 1; when no output lines up, the finding says the check was not made
   (``batch_coupling`` stays None; a ``forward`` can return batch-first outputs). Last, how much the running
   statistics wobble at the training batch size: PyTorch's update
   ``r <- (1 - m) r + m b`` (``m`` weighs the NEW batch) keeps a fraction
   ``sqrt(m / (2 - m))`` of one batch statistic's standard deviation
   (:func:`bnkit.audit_state.ema_noise_factor`); the batch statistic's spread is
   measured between the data's batches and scaled to the training batch size.
   The noise figure and the gap assume batches drawn at random from the data
   (``shuffle=True``). A stream in stored order (sorted by class, as an ImageFolder read
   with ``shuffle=False``) has batches that differ by more than sampling noise, which
   would inflate both; the batch means' ANOVA F ratio (``LayerShift.batch_f``: at most
   about 1 for random batches) tells it when it clears the one-in-a-million level in a
   layer (reliably in layers with one value per channel and sample, such as
   ``BatchNorm1d`` on ``(N, C)``; convolution layers' channel means vary less than
   their values, so they rarely show it), and then the noise is not estimated and the
   gap is reported as info. The statistics shifts pool every batch and do not depend
   on the order.

Nothing is changed: every module's train/eval flag, ``momentum``,
``track_running_stats`` and BN buffers are restored, also when a forward fails.

This module is the entry point and the report; the checks live in
:mod:`bnkit.torch.audit_model` (depth 2), :mod:`bnkit.torch.audit_data` (depth 3, with
:mod:`bnkit.torch.audit_moments` and :mod:`bnkit.torch.audit_batches`) and
:mod:`bnkit.audit_state` (depth 1).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..audit_state import BN_BUFFERS, bn_stats_from_state, check_bn_stats
from ..findings import SEVERITIES, Finding, jsonable, worst_severity
from .audit_batches import Batches, default_forward
from .audit_data import LayerShift, data_findings
from .audit_model import model_findings, short_names
from .io import WeightSets, load_checkpoint, refuse_meta, weight_sets
from .modules import bn_or_frozen_layers, unequal_channel_tensors, uninitialized_lazy, unwrapped

__all__ = ["audit", "AuditReport", "LayerShift"]


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
        return jsonable(out)

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
        target: an ``nn.Module``; a state dict (flat, or under a checkpoint's usual keys, as in a file); or a
            checkpoint file (``.pt``/``.pth``
            loaded with ``weights_only=True``, ``.safetensors``). ``.onnx`` files go to
            :func:`bnkit.onnx.audit`.
        data: needs a model. A tensor/array (split into ``batch_size`` batches) or an
            iterable of batches: tensors, ``(input, target, ...)`` tuples, or whatever
            ``forward`` takes.
        forward: ``forward(model, batch) -> output``; default ``model(batch)``, or
            ``model(batch[0])`` for tuples and lists. A wrapped model (``torch.compile``,
            DataParallel, DDP, AveragedModel) is audited as the module inside, which it receives.
        trust: unpickle checkpoints with arbitrary objects (only files you made yourself).
        train_batch_size: batch size of training, for the running statistics' noise
            (default: the data's batch size); at least 2, as training on batch statistics needs.
        max_batches: use at most this many batches of ``data`` (at least 1).
        coupling_samples: how many samples are rerun at batch size 1.
    """
    if train_batch_size is not None and train_batch_size < 2:
        raise ValueError(f"train_batch_size must be at least 2 (BatchNorm trains on batch statistics, which need "
                         f"two samples), got {train_batch_size}")
    if isinstance(target, (str, os.PathLike)):
        path = Path(target)
        if path.suffix.lower() == ".onnx":
            if data is not None:
                raise ValueError("data can only be audited with a PyTorch model, not an ONNX file")
            from ..onnx import audit as onnx_audit

            onnx_report = onnx_audit(path)
            return AuditReport(str(path), "onnx", findings=_sorted(list(onnx_report.findings)),
                               layers=[node["name"] for node in onnx_report.nodes])
        if data is not None:
            raise ValueError(_NEEDS_MODEL)
        return checkpoint_report(load_checkpoint(path, trust=trust, mmap=True), str(path))  # BN buffers read alone
    if isinstance(target, nn.Module):
        return _model_report(target, data, forward, batch_size, train_batch_size, max_batches, coupling_samples)
    if isinstance(target, Mapping):
        state, unread = _flat_state(target)
        return _state_report("state dict", state, data, unread)
    raise TypeError(f"audit takes a model, a state dict or a file path, got {type(target).__name__}")


# ------------------------------------------------------------------------------------------ depth 1


def _flat_state(state: Mapping[Any, Any]) -> tuple[Mapping[Any, Any], list[tuple[str, list[str]]]]:
    """The state dict to audit in a mapping, and what :func:`_unread_beside` names. One holding torch tensors (at any
    depth) is read as its file would be (:func:`_audited`: ``{"state_dict": sd, "epoch": 3}`` audits ``sd``), with the
    BN-named entries of its top level that are arrays or lists kept beside (a file cannot hold them; dropped, a
    broken statistic would pass unseen); one without is audited as it is (NumPy arrays or lists, as
    :func:`bnkit.audit_state.bn_stats_from_state` takes them). BN buffers held as arrays in a mapping under a key
    are refused, naming the key, rather than missed."""
    known: dict[int, bool] = {}  # by object: one held in many places is walked once, a cycle back adds nothing

    def tensors_in(value: Any) -> bool:
        if id(value) not in known:
            known[id(value)] = False  # while it is walked
            if isinstance(value, (list, tuple)):
                known[id(value)] = any(tensors_in(v) for v in value)
            else:
                known[id(value)] = isinstance(value, (torch.Tensor, nn.Module)) or (
                    isinstance(value, Mapping) and any(tensors_in(v) for v in value.values()))
        return known[id(value)]

    # meta tensors, also a wrapped state dict's: the advice for a dict in memory, not the one for a file
    for mapping in (state, *(v for v in state.values() if isinstance(v, Mapping))):
        refuse_meta(mapping.items(), "the state dict", _LOAD_FIRST)
    holds = {k: tensors_in(v) for k, v in state.items()}
    if nested := [k for k, v in state.items() if isinstance(v, Mapping) and not holds[k] and bn_stats_from_state(v)]:
        raise ValueError(f"the state dict holds BatchNorm buffers as arrays under {nested}: audit that dict itself "
                         f"(audit(state[{nested[0]!r}]))")
    if not any(holds.values()):
        return state, []
    kept = {k: v for k, v in state.items() if isinstance(k, str) and not isinstance(v, torch.Tensor)
            and k.rsplit(".", 1)[-1] in BN_BUFFERS}
    merged, unread = _audited(state, "the state dict")
    return {**kept, **merged}, unread


def checkpoint_report(loaded: object, where: str, found: WeightSets | None = None) -> AuditReport:
    """The audit of a loaded checkpoint file (``where``: its name) alone: every set of weights in it, and a warning
    naming BatchNorm-like tensors beside them that no set holds (:func:`_audited`). ``found``: its
    :func:`bnkit.torch.io.weight_sets`, where the caller has read them already."""
    state, unread = _audited(loaded, where, found)
    return _state_report(where, state, None, unread)


def _audited(obj: object, where: str, found: WeightSets | None = None
             ) -> tuple[dict[str, object], list[tuple[str, list[str]]]]:
    """:func:`_merged` and :func:`_unread_beside` of ``obj``'s sets of weights, read once
    (:func:`bnkit.torch.io.weight_sets`: the file's tensors are compared and fingerprinted there)."""
    sets, beside = weight_sets(obj, where) if found is None else found
    return _merged(sets, where), _unread_beside(beside)


def models_in(found: WeightSets) -> list[str]:
    """The key paths of a checkpoint's sets of weights (:func:`bnkit.torch.io.weight_sets`) that hold BatchNorm
    buffers: more than one where it holds several models (a model and its EMA)."""
    return [path for path, state in found[0] if bn_stats_from_state(state)]


def _merged(sets: list[tuple[str, dict[str, object]]], where: str) -> dict[str, object]:
    """Every set of weights of a loaded checkpoint (``where``: it, in errors) as one flat state dict to audit: where
    more than one holds BatchNorm buffers (an encoder's and a decoder's, a model's and its EMA's), each name gets its
    set's key path first (``decoder/bn1``; the top level's none; a bare BatchNorm's state dict is the layer
    ``decoder``), so no BN layer of the file goes unchecked; else the set that holds them (or the first) as it is.
    ValueError where there is no tensor, or where two sets' names would read alike."""
    if not sets:
        raise ValueError(f"{where} contains no tensors")
    for _, state in sets:  # before any value is read: a meta tensor has none
        refuse_meta(state.items(), where, _LOAD_FIRST)
    with_bn = [(path, state) for path, state in sets if bn_stats_from_state(state)]
    several = len(with_bn) > 1
    merged: dict[str, object] = {}
    for path, state in with_bn or sets[:1]:
        for k, v in state.items():
            # a set's own root layer (a bare BatchNorm's state dict) is named after its key: decoder.running_var
            name = k if not path else f"{path}.{k}" if "." not in k else f"{path}/{k}" if several else k
            if name in merged:
                raise ValueError(f"{where} holds two sets of weights that both give {name!r} (under key paths that "
                                 "read alike); audit them one at a time")
            merged[name] = v
    return merged


def _unread_beside(beside: list[tuple[str, dict[str, object]]]) -> list[tuple[str, list[str]]]:
    """For each group of tensors left beside weights under a usual wrapper key (:func:`bnkit.torch.io.weight_sets`:
    a metric, an observation normalizer, or another model's weights under names of its own) that holds
    BatchNorm-like layers: that key's path and the layers, named after their place (``obs_rms``, ``agent/obs_rms``)."""
    unread = []
    for key, tensors in beside:
        where = key.rpartition("/")[0]
        if names := sorted(f"{where}/{layer.name}" if where else layer.name for layer in bn_stats_from_state(tensors)):
            unread.append((key, names))
    return unread


def _state_report(name: str, state: Mapping[str, Any], data: Any,
                  unread: Sequence[tuple[str, list[str]]] = ()) -> AuditReport:
    if data is not None:
        raise ValueError(_NEEDS_MODEL)
    refuse_meta(state.items(), f"the {name}", _LOAD_FIRST)
    stats = bn_stats_from_state(state)
    findings = [f for layer in stats for f in check_bn_stats(layer)]
    for key, names in unread:
        findings.append(Finding(
            "warning", "(state)", "BatchNorm-like tensors beside the weights not audited",
            f"tensors named like BatchNorm buffers ({short_names(names)}) sit beside the weights under {key!r} "
            "and were not audited (a metric or an observation normalizer usually sits there)",
            "if they are a model's weights, save that state dict alone and audit it", "unread_beside",
            {"layers": names, "beside": key}))
    layers = sorted(layer.name for layer in stats)
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
    model, _ = unwrapped(model)  # what a wrapper runs: fx reads it, and a compiled one would recompile per call
    layers = bn_or_frozen_layers(model)
    refuse_meta([*model.named_parameters(), *model.named_buffers()], "the model", _LOAD_FIRST)
    report = AuditReport(type(model).__name__, "model", layers=[name for name, _ in layers])
    batches = None
    if data is not None:
        if lazy := uninitialized_lazy(model):
            raise ValueError(f"uninitialized lazy modules ({', '.join(lazy)}): a forward pass would create their "
                             "parameters; run one yourself before auditing with data")
        batches = Batches(data, batch_size, max_batches, model, own_forward=forward is not None)
    findings = model_findings(model, layers, batches.first_input(forward) if batches is not None else None)
    if batches is not None and (broken := [n for n, bn in layers if unequal_channel_tensors(bn)]):
        findings.append(Finding(  # the state checks report each such layer as an error (bad_shape)
            "info", "(data)", "data checks skipped",
            f"BatchNorm layer(s) {short_names(broken)} have per-channel tensors not all of shape (C,) (PyTorch's "
            "forward refuses tensors of different lengths; the audit reads each as one value per channel), so the "
            "model is not run on the data",
            "give those layers' tensors the shape (C,), then audit with the data again", "data_skipped",
            {"layers": broken}))
    elif batches is not None:
        report.depth = "data"
        findings += data_findings(model, layers, batches, forward or default_forward,
                                  train_batch_size, coupling_samples, report)
    report.findings = _sorted(findings)
    _name_root(report)
    return report


def _name_root(report: AuditReport) -> None:
    """A BatchNorm that is the model itself (``named_modules``' ``""``) named ``(root)`` throughout the report, as a
    state dict's own root layer is (:func:`bnkit.audit_state.bn_stats_from_state`)."""
    report.layers = [name or "(root)" for name in report.layers]
    for item in (*report.findings, *report.shifts):
        item.layer = item.layer or "(root)"
    for f in report.findings:
        if isinstance(f.data.get("layers"), list):
            f.data["layers"] = [name or "(root)" for name in f.data["layers"]]


# ------------------------------------------------------------------------------------------ helpers


_LOAD_FIRST = "audit it after loading real weights (load_state_dict(..., assign=True))"
_NEEDS_MODEL = "auditing with data needs the model: pass an nn.Module (CLI: --model package.module:factory)"


def _sorted(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))
