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
            cached = self._clean.get(id(m))
            buffers = m._buffers
            if cached is not None and all(buffers.get(k) is t and t._version == v for k, t, v in cached):
                continue
            problems = _stats_findings(name, m)
            found += problems
            if not problems:
                current = [(k, t, _version(t)) for k in _BUFFERS if (t := buffers.get(k)) is not None]
                if all(v is not None for _, _, v in current):  # inference tensors have no counter: check every time
                    self._clean[id(m)] = current
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
        modules = [m for _, m in self._bn]

        def recheck(module: nn.Module, args: tuple) -> None:
            for m in modules:  # the per-forward cost on a correct model: one flag read per layer
                if m.training:
                    self._report(mode_problems(), warned)
                    return

        handles.append(self.model.register_forward_pre_hook(recheck))
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


class _Snapshot:
    """Copies of many small tensors, one flat tensor per (device, dtype): a few kernel launches, not one per tensor."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            self.groups.setdefault((t.device, t.dtype), []).append(i)
        self.where: dict[int, tuple[tuple, int]] = {}
        for key, idx in self.groups.items():
            offset = 0
            for i in idx:
                self.where[i] = (key, offset)
                offset += tensors[i].numel()
        with torch.no_grad():
            self.flat = {key: self._cat(idx) for key, idx in self.groups.items()}

    def _cat(self, idx: list[int]) -> torch.Tensor:
        return torch.cat([self.tensors[i].detach().reshape(-1) for i in idx])

    def now_finite(self) -> bool:
        """True if every floating tensor is finite now; one sync per device."""
        return all(bool(torch.isfinite(self._cat(idx)).all()) for (_, dtype), idx in self.groups.items()
                   if dtype.is_floating_point)

    def saved(self, i: int) -> torch.Tensor:
        """The snapshot of tensor ``i``."""
        key, offset = self.where[i]
        t = self.tensors[i]
        return self.flat[key][offset: offset + t.numel()].view(t.shape)


@contextlib.contextmanager
def protect_stats(model: nn.Module, *, warn: bool = True) -> Iterator[StatsRollback]:
    """Restore all BN running buffers if the block leaves any of them non-finite.

    Yields a :class:`StatsRollback` that is filled in when the block ends (also
    when it raises). On a rollback every layer gets back its ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` (in place) and, with ``warn``, a
    ``RuntimeWarning`` names the non-finite layers. Costs one flat copy of the BN
    buffers and one finiteness check with one device sync per block.
    """
    layers = [(n or type(m).__name__, m) for n, m in bn_layers(model) if m.running_mean is not None]
    tensors = [t for _, m in layers for k in _BUFFERS if (t := m._buffers.get(k)) is not None]
    owner = [(name, m) for name, m in layers for k in _BUFFERS if m._buffers.get(k) is not None]
    snapshot = _Snapshot(tensors) if tensors else None
    report = StatsRollback()
    try:
        yield report
    finally:
        if snapshot is not None and not snapshot.now_finite():
            _rollback(owner, snapshot, report)
            if report.nonfinite and warn:
                warnings.warn(
                    f"protect_stats: non-finite running statistics in {report.nonfinite}; rolled back the "
                    f"statistics of {len(report.rolled_back)} BatchNorm layer(s) to before the step",
                    RuntimeWarning, stacklevel=3,
                )


def _rollback(owner: list[tuple[str, nn.Module]], snapshot: _Snapshot, report: StatsRollback) -> None:
    """The rare path: find which layers went non-finite and, if any did, restore every changed buffer."""
    before_ok: dict[str, bool] = {}
    after_ok: dict[str, bool] = {}
    for i, (name, _) in enumerate(owner):
        t = snapshot.tensors[i]
        if t.is_floating_point():
            before_ok[name] = before_ok.get(name, True) and bool(torch.isfinite(snapshot.saved(i)).all())
            after_ok[name] = after_ok.get(name, True) and bool(torch.isfinite(t).all())
    names = list(dict.fromkeys(name for name, _ in owner))
    report.already_nonfinite = [n for n in names if not before_ok.get(n, True)]
    report.nonfinite = [n for n in names if before_ok.get(n, True) and not after_ok.get(n, True)]
    if not report.nonfinite:
        return
    with torch.no_grad():
        for i, (name, _) in enumerate(owner):
            saved = snapshot.saved(i)
            if not torch.equal(snapshot.tensors[i], saved):
                snapshot.tensors[i].copy_(saved)
                if name not in report.rolled_back:
                    report.rolled_back.append(name)
