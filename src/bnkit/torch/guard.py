"""Inference guards for BatchNorm: :func:`bn_guard` and :func:`protect_stats`.

``bn_guard(model)`` is a context manager and a decorator for inference code. It
reports, as :class:`~bnkit.findings.Finding` rows, by raising :class:`BNGuardError`
(``action="raise"``) or warning (``action="warn"``):

* ``training``: a BN layer in training mode normalizes each batch with the
  batch's own statistics (outputs depend on the batch) and overwrites its
  running statistics; ``no_running_stats``: a layer built with
  ``track_running_stats=False`` does the former even in eval mode;
* ``batch_of_one``: such a layer is given fewer than 2 values per channel;
* ``nonfinite_stats``: ``running_mean``/``running_var`` hold NaN/Inf (or a
  negative variance);
* ``never_updated``: ``num_batches_tracked == 0`` with the initial statistics
  ``0``/``1``, i.e. a layer that was never trained or whose statistics were never loaded.

The layers are listed when the guard is created. The statistics checks and a
first mode check run on entry; statistics that passed and have not been written
since (same tensors, same version counter) are not checked again, so entering a
guard (or calling a decorated function) repeatedly is cheap. While the guard is
active one forward pre-hook on ``model`` re-reads every layer's ``training``
flag (a flag scan, no tensor work), so a ``model.train()`` inside the block is
caught too; per-layer hooks for the batch-size check are added only to layers
that use batch statistics. On a correct model nothing else runs. Checks can be
skipped by code with ``ignore=``.

``protect_stats(model)`` snapshots every BN layer's running buffers and, if the
block leaves any of them non-finite (a mixed-precision overflow step poisons
``running_var`` in the forward, before ``GradScaler`` skips the optimizer step),
restores all of them, so the skipped step leaves no trace in the statistics either.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..findings import Finding
from .modules import bn_layers, is_batchnorm

__all__ = ["bn_guard", "BNGuardError", "BNGuardWarning", "protect_stats", "StatsRollback"]

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
CHECKS = ("training", "no_running_stats", "batch_of_one", "nonfinite_stats", "never_updated")
_ACTIONS = ("raise", "warn")


class BNGuardError(RuntimeError):
    """A BatchNorm problem found by :func:`bn_guard`; ``findings`` lists them."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        lines = [f"- {f.layer}: {f.finding} ({f.evidence}). Fix: {f.fix}" for f in findings]
        super().__init__(f"bn_guard found {len(findings)} BatchNorm problem(s) during inference:\n" + "\n".join(lines))


class BNGuardWarning(RuntimeWarning):
    """The warning :func:`bn_guard` emits with ``action="warn"``."""


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place write counter (None for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _mode_findings(name: str, m: nn.Module) -> list[Finding]:
    if m.training:
        return [Finding(
            "error", name, "in training mode during inference", "training=True",
            "call model.eval() before inference, or freeze it with bnkit.torch.freeze_bn", "training",
        )]
    if m.running_mean is None:
        return [Finding(
            "error", name, "normalizes with batch statistics even in eval mode", "track_running_stats=False",
            "give the layer running statistics (track_running_stats=True, then recalibrate)", "no_running_stats",
        )]
    return []


def _stats_findings(name: str, m: nn.Module) -> list[Finding]:
    mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
    if mean is None or var is None:
        return []
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()):
        bad = int((~torch.isfinite(mean)).sum() + (~torch.isfinite(var)).sum() + (var < 0).sum())
        return [Finding(
            "error", name, "running statistics are non-finite or negative", f"{bad} bad value(s) in running_mean/var",
            "reload a good checkpoint or recompute them with bnkit.torch.recalibrate; guard training steps "
            "with bnkit.torch.protect_stats", "nonfinite_stats",
        )]
    count = getattr(m, "num_batches_tracked", None)
    if count is not None and int(count) == 0 and not mean.any() and bool((var == 1).all()):
        return [Finding(
            "error", name, "running statistics were never updated", "num_batches_tracked=0, mean=0, var=1",
            "train the model or load its checkpoint (strict=True), or compute them with bnkit.torch.recalibrate",
            "never_updated",
        )]
    return []


class bn_guard(contextlib.ContextDecorator):
    """Guard inference against misconfigured BatchNorm layers (see the module doc).

    Use as ``with bn_guard(model): ...`` or as ``@bn_guard(model)`` on a function.

    Args:
        model: the model about to run inference.
        action: ``"raise"`` a :class:`BNGuardError` or ``"warn"`` with :class:`BNGuardWarning`.
        ignore: check codes to skip, from ``CHECKS``.
    """

    def __init__(self, model: nn.Module, *, action: str = "raise", ignore: Iterable[str] = ()) -> None:
        if action not in _ACTIONS:
            raise ValueError(f"action must be one of {_ACTIONS}, got {action!r}")
        ignore = set(ignore)
        if ignore - set(CHECKS):
            raise ValueError(f"unknown check(s) {sorted(ignore - set(CHECKS))}; checks are {CHECKS}")
        self.model, self.action, self.ignore = model, action, ignore
        self._layers = [(n or type(m).__name__, m) for n, m in model.named_modules()
                        if is_batchnorm(m) or getattr(type(m), "_bnkit_frozen_layer", False)]
        self._bn = [(n, m) for n, m in self._layers if is_batchnorm(m)]
        self._clean: dict[int, tuple] = {}  # layer id -> the buffers (and versions) that passed the stats checks
        self._active: list[list] = []  # per nested entry: its hook handles

    # ------------------------------------------------------------- reporting
    def _report(self, findings: list[Finding], warned: set) -> None:
        """Raise, or warn once per layer and check while this entry lasts."""
        findings = [f for f in findings if f.code not in self.ignore]
        if not findings:
            return
        if self.action == "raise":
            raise BNGuardError(findings)
        for f in findings:
            if (f.layer, f.code) not in warned:
                warned.add((f.layer, f.code))
                warnings.warn(f"bn_guard: {f.layer}: {f.finding} ({f.evidence}). Fix: {f.fix}", BNGuardWarning,
                              stacklevel=4)

    def _stats_problems(self) -> list[Finding]:
        """Statistics findings; buffers unchanged (same tensor, same ``_version``) since a clean check are skipped."""
        found = []
        for name, m in self._layers:
            bufs = tuple(b for k in _BUFFERS if (b := getattr(m, k, None)) is not None)
            key = tuple((id(b), _version(b)) for b in bufs)
            if None not in (v for _, v in key) and self._clean.get(id(m), (None,))[0] == key:
                continue
            problems = _stats_findings(name, m)
            found += problems
            if not problems:
                self._clean[id(m)] = (key, bufs)  # bufs keep the tensors alive, so their ids stay theirs
        return found

    # ----------------------------------------------------------------- hooks
    def __enter__(self) -> "bn_guard":
        warned: set = set()  # (layer, code) already warned about in this entry
        watched: dict[int, str] = {}  # layers given a batch-size hook, by id -> name
        handles: list = []

        def check_batch(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if (module.training or module.running_mean is None) and isinstance(x, torch.Tensor) and x.dim() >= 2 \
                    and x.numel() // max(x.size(1), 1) < 2:
                self._report([Finding(
                    "error", watched[id(module)], "gets fewer than 2 values per channel while normalizing with batch "
                    "statistics", f"input shape {tuple(x.shape)}", "call model.eval(), or use a batch of at least 2",
                    "batch_of_one",
                )], warned)

        def mode_problems() -> list[Finding]:
            found = []
            for name, m in self._bn:
                problems = _mode_findings(name, m)
                if problems and id(m) not in watched and "batch_of_one" not in self.ignore:
                    watched[id(m)] = name
                    handles.append(m.register_forward_pre_hook(check_batch))
                found += problems
            return found

        try:
            self._report(self._stats_problems() + mode_problems(), warned)
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        handles.append(self.model.register_forward_pre_hook(lambda module, args: self._report(mode_problems(), warned)))
        self._active.append(handles)
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._active.pop():
            handle.remove()
        return False


@dataclass
class StatsRollback:
    """What :func:`protect_stats` did: ``nonfinite`` layers made it roll ``rolled_back`` layers back.

    ``already_nonfinite`` lists layers that were non-finite before the block
    (a rollback cannot repair them; they do not trigger one).
    """

    rolled_back: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    already_nonfinite: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rolled_back)

    @property
    def findings(self) -> list[Finding]:
        return [Finding(
            "warning", name, "non-finite running statistics rolled back", "the guarded step made them NaN/Inf",
            "check the loss scale / learning rate; the step's statistics update was discarded", "stats_rolled_back",
        ) for name in self.nonfinite] + [Finding(
            "error", name, "running statistics were already non-finite", "NaN/Inf before the guarded step",
            "reload a good checkpoint or recompute them with bnkit.torch.recalibrate", "nonfinite_stats",
        ) for name in self.already_nonfinite]


@contextlib.contextmanager
def protect_stats(model: nn.Module, *, warn: bool = True) -> Iterator[StatsRollback]:
    """Restore all BN running buffers if the block leaves any of them non-finite.

    Yields a :class:`StatsRollback` that is filled in when the block ends (also
    when it raises). On a rollback every layer gets back its ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` (in place) and, with ``warn``, a
    ``RuntimeWarning`` names the non-finite layers. Costs one copy of the BN buffers
    and one device sync per block.
    """
    layers = [(n or type(m).__name__, m) for n, m in bn_layers(model) if m.running_mean is not None]
    snapshot = [{k: getattr(m, k).detach().clone() for k in _BUFFERS if getattr(m, k, None) is not None}
                for _, m in layers]
    report = StatsRollback()
    try:
        yield report
    finally:
        if layers:
            flags = []
            for (_, m), snap in zip(layers, snapshot):
                flags += [torch.isfinite(m.running_mean).all() & torch.isfinite(m.running_var).all(),
                          torch.isfinite(snap["running_mean"]).all() & torch.isfinite(snap["running_var"]).all()]
            device = flags[0].device
            ok = torch.stack([f.to(device) for f in flags]).view(-1, 2).tolist()  # one sync
            report.already_nonfinite = [n for (n, _), (_, before) in zip(layers, ok) if not before]
            report.nonfinite = [n for (n, _), (after, before) in zip(layers, ok) if before and not after]
            if report.nonfinite:
                with torch.no_grad():
                    for (name, m), snap in zip(layers, snapshot):
                        changed = [k for k, v in snap.items() if not torch.equal(getattr(m, k), v)]
                        for k in changed:
                            getattr(m, k).copy_(snap[k])
                        if changed:
                            report.rolled_back.append(name)
                if warn:
                    warnings.warn(
                        f"protect_stats: non-finite running statistics in {report.nonfinite}; rolled back the "
                        f"statistics of {len(report.rolled_back)} BatchNorm layer(s) to before the step",
                        RuntimeWarning, stacklevel=3,
                    )
