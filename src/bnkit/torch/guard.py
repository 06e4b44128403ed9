"""Inference guards for BatchNorm: :func:`bn_guard` and :func:`protect_stats`.

``bn_guard(model)`` is a context manager and a decorator for inference code. It
reports, as :class:`~bnkit.findings.Finding` rows, by raising :class:`BNGuardError`
(``action="raise"``) or warning (``action="warn"``):

* ``training``: a BN layer in training mode normalizes each batch with the
  batch's own statistics (outputs depend on the batch) and overwrites its
  running statistics; ``no_running_stats``: a layer built with
  ``track_running_stats=False`` does the former even in eval mode;
* ``batch_of_one``: such a layer is given one value per channel (an empty batch is fine, as in PyTorch);
* ``nonfinite_stats``: ``running_mean``/``running_var`` hold NaN/Inf (or a
  negative variance);
* ``never_updated``: ``num_batches_tracked == 0`` with the initial statistics
  ``0``/``1``, i.e. a layer that was never trained or whose statistics were never loaded
  (or a lazy layer that was never run).

The layers are listed when the guard is created. The statistics checks and a
first mode check run on entry; statistics that passed and have not been written
since (same tensors, same version counter) are not checked again, so entering a
guard (or calling a decorated function) repeatedly costs, on a correct model, a
version check per buffer, a flag read per layer and one hook registration: no
tensor work. The limit of that: a write that bypasses PyTorch's version counter
(through ``.data``, or a NumPy array from ``.numpy()``) is not seen, so a guard
object entered again (a decorator, or one object entered per call) does not
re-check statistics poisoned that way; in-place tensor ops (``no_grad`` included),
``copy_``, ``load_state_dict`` and assigning a new tensor are seen, and a new
``bn_guard(model)`` checks everything. Re-reading the statistics on every entry
would cost a kernel and a device sync per call. While the guard is active one forward pre-hook on ``model`` (one
however deeply the guard is nested) re-reads every layer's ``training`` flag, so
a ``model.train()`` inside the block is caught before a forward through ``model``
changes anything (a submodule called directly is watched by a guard on that submodule), and a forward hook
reads them again as the forward returns, so one that switched layers to training mode itself (test-time
adaptation, ``self.train()`` in ``forward``) is reported then, its batch statistics already written. A
``torch.compile`` wrapper made of the model earlier runs its cached graph without hooks added to the model
since: guard the wrapper (``bn_guard(compiled)``) or compile in place (``model.compile()``);
per-layer hooks for the batch-size check are added only to layers that use batch
statistics. On a correct model nothing else runs. Checks can be skipped by code
with ``ignore=``.

``protect_stats(model)`` snapshots every BN layer's running buffers and, if the
block leaves any of them non-finite (a mixed-precision overflow step poisons
``running_var`` in the forward, before ``GradScaler`` skips the optimizer step),
restores all of them, so the skipped step leaves no trace in the statistics either.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ..findings import Finding
from .modules import BN_TYPES, bn_or_frozen_layers, is_batchnorm, require_eager, write_count

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

    def __reduce__(self) -> tuple:  # pickled (a process pool sends it back) from its findings, not its message
        return type(self), (self.findings,), self.__dict__


class BNGuardWarning(RuntimeWarning):
    """The warning :func:`bn_guard` emits with ``action="warn"``."""


def _mode_findings(name: str, m: nn.Module) -> list[Finding]:
    if m.training:
        fix = "call model.eval() before inference, or freeze it with bnkit.torch.freeze_bn"
        if m.running_mean is None:  # freeze_bn refuses it, and eval mode alone still uses batch statistics
            fix = ("call model.eval() before inference, and give the layer running statistics "
                   "(track_running_stats=True, then recalibrate)")
        return [Finding("error", name, "in training mode during inference", "training=True", fix, "training")]
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
    if is_lazy(mean):
        return [Finding(
            "error", name, "running statistics were never updated", "uninitialized lazy buffers",
            "train the model or load its checkpoint, or compute them with bnkit.torch.recalibrate", "never_updated",
        )]
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


def _attribute(m: nn.Module, key: str) -> torch.Tensor | None:
    """``getattr(m, key, None)``, read from the buffers' dict where it is a buffer (a plain dict lookup)."""
    buffers = m._buffers
    return buffers[key] if key in buffers else getattr(m, key, None)


def _none_found(layers: list[nn.Module]) -> bool:
    """True if :func:`_stats_findings` finds nothing in any of ``layers``: every running mean and variance finite,
    every variance non-negative and no ``num_batches_tracked`` 0 (what its findings need), read together (one ``cat``
    or ``stack`` per kind and a reduction each, instead of several reductions per layer). False also when that read
    cannot be made (lazy buffers, several devices, dtypes ``cat`` cannot promote): the caller checks each layer."""
    means, variances, counts = [], [], []
    for m in layers:
        mean, var, count = (_attribute(m, k) for k in _BUFFERS)
        if mean is not None and var is not None:
            if is_lazy(mean) or is_lazy(var):
                return False
            means.append(mean)
            variances.append(var)
        if count is not None:
            counts.append(count)
    if len({t.device for t in means + variances + counts}) > 1:
        return False
    try:
        if variances:
            allvar = torch.cat(variances)
            if not (bool(torch.isfinite(torch.cat(means)).all()) and bool(torch.isfinite(allvar).all())
                    and bool((allvar >= 0).all())):
                return False
        return not counts or bool(torch.stack(counts).ne(0).all())
    except RuntimeError:
        return False


#: Frames a guard's warning passes over to reach the user's line: this file, ContextDecorator's wrapper, and
#: PyTorch's own code (``Module.__call__`` and its hooks, ``Sequential.forward``, DataParallel, torch.compile).
_INTERNAL = (os.path.abspath(__file__), os.path.abspath(contextlib.__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued in :meth:`bn_guard._report` point at the user's code: the
    ``with`` line, the call of a decorated function, the ``model(x)`` call or the user's forward line calling the
    layer (a fixed level is right for only one of those)."""
    frame, level = sys._getframe(2), 2  # 2: the caller of _report
    while frame is not None and (frame.f_code.co_filename in _INTERNAL or frame.f_code.co_filename.startswith(_TORCH)):
        frame, level = frame.f_back, level + 1
    return level


def _remove_hooks(module: nn.Module, match: Callable[[object], bool]) -> None:
    """Remove ``module``'s forward (pre-)hooks for which ``match(hook)`` holds (safe while PyTorch runs them: it
    calls a snapshot of the hooks)."""
    for kind in ("_forward_pre_hooks", "_forward_hooks"):
        hooks = vars(module).get(kind)
        for key, hook in list((hooks or {}).items()):
            if match(hook):
                del hooks[key]
                for extra in ("_with_kwargs", "_always_called"):
                    vars(module).get(kind + extra, {}).pop(key, None)


class _GuardHook(partial):
    """A guard's hook on a module: ``partial(guard method, *args)``. A copy or pickle of a module holding it gets a
    :class:`_StaleHook` instead: the partial's own copy would copy the guard, hence its whole model (copying one
    layer copied the model, and failed on the half-built layer, as did loading a pickle of it)."""

    __slots__ = ()

    def __reduce__(self) -> tuple:
        return (_StaleHook, ())


class _StaleHook:
    """In a copy or pickle of a module, the place of a guard's hook: the first to run removes every one on its module
    (the forward hook too, which a forward that raises never reaches), as does a copied guard given its model (see
    ``bn_guard.__setstate__``)."""

    def __call__(self, module: nn.Module, *args: object) -> None:
        _remove_hooks(module, lambda hook: isinstance(hook, _StaleHook))


class _Entry:
    """The state of one active entry of a :class:`bn_guard`: warnings given, batch-size hooks, handles."""

    __slots__ = ("warned", "watched", "handles", "opening")

    def __init__(self) -> None:
        self.warned: set = set()  # (layer, code) already warned about
        self.watched: set[int] = set()  # ids of the layers given a batch-size hook
        self.handles: list = []
        self.opening = True  # hooks given, not yet in the guard's entries: another thread's forward may run them


class bn_guard(contextlib.ContextDecorator):
    """Guard inference against misconfigured BatchNorm layers (see the module doc).

    Use as ``with bn_guard(model): ...`` or as ``@bn_guard(model)`` on a function; a generator or async function
    is refused there (the guard would cover only the call that creates it, not the forwards made while it runs):
    use the ``with`` form inside it.

    Args:
        model: the model about to run inference.
        action: ``"raise"`` a :class:`BNGuardError` or ``"warn"`` with :class:`BNGuardWarning`.
        ignore: check codes to skip, from ``CHECKS`` (one code, or several).
    """

    def __call__(self, func: Callable) -> Callable:
        if inspect.isgeneratorfunction(func) or inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            kind = "a generator" if inspect.isgeneratorfunction(func) else "an async"
            raise TypeError(f"bn_guard cannot decorate {getattr(func, '__qualname__', func)!r}, {kind} function: as "
                            "a decorator it would guard only the call that creates it, not the forwards it runs "
                            "later; use 'with bn_guard(model):' inside the function")
        return super().__call__(func)

    def __init__(self, model: nn.Module, *, action: str = "raise", ignore: Iterable[str] = ()) -> None:
        if action not in _ACTIONS:
            raise ValueError(f"action must be one of {_ACTIONS}, got {action!r}")
        ignore = {ignore} if isinstance(ignore, str) else set(ignore)  # one check's name, not its letters
        if ignore - set(CHECKS):
            raise ValueError(f"unknown check(s) {sorted(ignore - set(CHECKS))}; checks are {CHECKS}")
        self.model, self.action, self.ignore = model, action, ignore
        self._layers = [(n or type(m).__name__, m) for n, m in bn_or_frozen_layers(model)]
        self._bn = [(n, m) for n, m in self._layers if is_batchnorm(m)]
        self._bn_modules = [m for _, m in self._bn]
        self._clean: dict[int, tuple] = {}  # layer id -> the buffers (and versions) that passed the stats checks
        self._all_clean: list[tuple] | None = None  # (buffers, key, tensor, version) of every layer, once all passed
        self._init_entries()

    def _init_entries(self) -> None:
        """The state of active entries. One guard object may be entered from several threads at once (a decorated
        predict function in a thread pool): the entries, the statistics cache and the model's pre-hook are shared
        under a lock, and every forward of the model is checked while any entry is active, whatever thread runs it
        (DataParallel runs its replicas in worker threads). Each thread keeps the entries it made, to pair an exit
        with its own entry; an exit in a thread that made none (a server entering and leaving in different worker
        threads) closes the latest active one."""
        self._local = threading.local()
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []  # active entries, all threads, latest last
        self._hook = None  # the model's forward pre-hook and forward hook, there while any entry is active

    def __getstate__(self) -> dict:
        """Copies and pickles get the configuration and the model, no active entry or cache (checked afresh)."""
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_local", "_lock", "_entries", "_hook", "_clean", "_all_clean")}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._clean, self._all_clean = {}, None
        self._init_entries()
        # copied while entered: the model came with stale hooks in place of the original's; removed here if the model
        # is complete (it is not yet when the copy was reached through the model itself: then each removes itself
        # when it first runs)
        if "_modules" in vars(self.model):
            for m in self.model.modules():
                _remove_hooks(m, lambda hook: isinstance(hook, _StaleHook))

    def _drop_hooks(self, module: nn.Module, entry: _Entry | None = None) -> None:
        """Remove ``module``'s forward (pre-)hooks that call this guard (``entry``: only that entry's)."""
        _remove_hooks(module, lambda hook: isinstance(hook, _GuardHook) and hook.func.__self__ is self
                      and (entry is None or hook.args[:1] == (entry,)))

    # ------------------------------------------------------------- reporting
    def _report(self, findings: list[Finding], entry: _Entry) -> None:
        """Raise, or warn once per layer and check while this entry lasts."""
        findings = [f for f in findings if f.code not in self.ignore]
        if not findings:
            return
        if self.action == "raise":
            raise BNGuardError(findings)
        for f in findings:
            if (f.layer, f.code) not in entry.warned:
                entry.warned.add((f.layer, f.code))
                warnings.warn(f"bn_guard: {f.layer}: {f.finding} ({f.evidence}). Fix: {f.fix}", BNGuardWarning,
                              stacklevel=_user_stacklevel())

    def _stats_unchanged(self) -> bool:
        """True if every layer's statistics passed a check and are the same tensors, unwritten, since."""
        watch = self._all_clean
        if watch is None:
            return False
        for buffers, key, t, version in watch:
            if buffers.get(key) is not t or (t is not None and t._version != version):
                return False
        return True

    def _mine(self) -> list[_Entry]:
        """The entries this thread made, innermost last (some may have been closed from another thread since)."""
        if not hasattr(self._local, "entries"):
            self._local.entries = []
        return self._local.entries

    def _stats_problems(self) -> list[Finding]:
        """Statistics findings; buffers unchanged (same tensor, same ``_version``) since a clean check are skipped.

        The layers left are read together first (:func:`_none_found`); only if that read finds a bad value or a zero
        counter does each of them get :func:`_stats_findings`' own checks.
        """
        with self._lock:
            return self._stats_problems_locked()

    def _stats_problems_locked(self) -> list[Finding]:
        found = []
        todo = []
        for name, m in self._layers:
            cached = self._clean.get(id(m))
            buffers = m._buffers
            if cached is not None and all(buffers.get(k) is t and (t is None or t._version == v) for k, t, v in cached):
                continue
            self._clean.pop(id(m), None)
            todo.append((name, m))
        clean = bool(todo) and _none_found([m for _, m in todo])
        for name, m in todo:
            buffers = m._buffers
            problems = [] if clean else _stats_findings(name, m)
            found += problems
            if not problems:
                # a buffer absent (None) is watched too: statistics assigned to it later are checked
                now = [(k, buffers.get(k)) for k in _BUFFERS]
                current = [(k, t, None if t is None else write_count(t)) for k, t in now]
                if all(v is not None for _, t, v in current if t is not None):  # inference tensors have no counter
                    self._clean[id(m)] = current
        if len(self._clean) == len(self._layers):
            self._all_clean = [(m._buffers, k, t, v) for _, m in self._layers for k, t, v in self._clean[id(m)]]
        else:
            self._all_clean = None
        return found

    def _mode_problems(self, entry: _Entry) -> list[Finding]:
        """Mode findings; a layer using batch statistics gets a batch-size hook for this entry."""
        found = []
        for name, m in self._bn:
            problems = _mode_findings(name, m)
            if problems and id(m) not in entry.watched and "batch_of_one" not in self.ignore:
                entry.watched.add(id(m))  # the name travels with the hook: DataParallel's replicas share it
                entry.handles.append(m.register_forward_pre_hook(_GuardHook(self._check_batch, entry, name)))
            found += problems
        return found

    def _check_batch(self, entry: _Entry, name: str, module: nn.Module, args: tuple) -> None:
        if entry not in self._entries:  # _Entry compares by identity
            if not entry.opening:  # a hook its entry's exit left (run from PyTorch's snapshot), not one being entered
                self._drop_hooks(module, entry)
            return
        x = args[0] if args else None
        if (module.training or module.running_mean is None) and isinstance(x, torch.Tensor) and x.dim() >= 2 \
                and x.size(1) and x.numel() // x.size(1) == 1:  # an empty batch normalizes nothing: fine
            fix = "call model.eval(), or use a batch of at least 2" if module.running_mean is not None else (
                "use a batch of at least 2 (the layer has no running statistics, so eval mode does not help)")
            self._report([Finding(
                "error", name, "gets one value per channel while normalizing with "
                "batch statistics", f"input shape {tuple(x.shape)}", fix, "batch_of_one",
            )], entry)

    def _recheck_after(self, module: nn.Module, args: tuple, output: object) -> None:
        """The forward hook on ``model``: a forward that put layers in training mode itself (test-time adaptation,
        a ``self.train()`` in ``forward``) is reported when it returns, its statistics already written."""
        self._recheck(module, args)

    def _recheck(self, module: nn.Module, args: tuple) -> None:
        """The forward pre-hook on ``model``: on a correct model, one flag read per BN layer."""
        if not self._entries:  # run after the last exit (PyTorch calls a snapshot of the hooks): nothing is entered
            with self._lock:
                if not self._entries:  # not entered again meanwhile (its new hook is this same method)
                    self._drop_hooks(module)
            return
        for m in self._bn_modules:
            if m.training:
                with self._lock:  # an entry closing in another thread must not get hooks after it removed its own
                    if not self._entries:
                        return
                    entry = self._entries[-1]
                    problems = self._mode_problems(entry)
                self._report(problems, entry)
                return

    # ----------------------------------------------------------------- entry
    def __enter__(self) -> "bn_guard":
        entry = _Entry()
        # Fast path (a correct model entered again): a version check per buffer and a flag read per layer.
        stats = [] if self._stats_unchanged() else self._stats_problems()
        for m in self._bn_modules:
            if m.training or m._buffers.get("running_mean") is None:
                try:
                    self._report(stats + self._mode_problems(entry), entry)
                except BaseException:
                    for handle in entry.handles:
                        handle.remove()
                    raise
                break
        else:
            self._report(stats, entry)
        mine = self._mine()
        with self._lock:  # one flag scan per forward, however deeply and in however many threads it is entered
            if self._hook is None:
                self._hook = (self.model.register_forward_pre_hook(_GuardHook(self._recheck)),
                              self.model.register_forward_hook(_GuardHook(self._recheck_after)))
            self._entries.append(entry)
            entry.opening = False
            if mine:
                mine[:] = [e for e in mine if e in self._entries]  # drop those closed from other threads
        mine.append(entry)
        return self

    def __exit__(self, *exc) -> bool:
        mine = self._mine()
        with self._lock:
            while mine and mine[-1] not in self._entries:
                mine.pop()  # closed from another thread
            entry = mine.pop() if mine else (self._entries[-1] if self._entries else None)
            if entry is not None:
                entries = self._entries  # replaced, not edited: forwards in other threads read it without the lock
                self._entries = entries[:-1] if entries[-1] is entry else [e for e in entries if e is not entry]
                if not self._entries and self._hook is not None:
                    for handle in self._hook:
                        handle.remove()
                    self._hook = None
                for handle in entry.handles:
                    handle.remove()
        return False


@dataclass
class StatsRollback:
    """What :func:`protect_stats` did: ``nonfinite`` layers made it roll ``rolled_back`` layers back.

    ``already_nonfinite`` lists layers that were non-finite before the block
    (a rollback cannot repair them; they do not trigger one); ``unrestored``, layers put in the model during the
    block (holding none of its tensors from before it) that are non-finite when it ends: they stay as they are,
    their statistics from before it being unknown, and do not trigger a rollback either (they may have come in
    non-finite).
    """

    rolled_back: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    already_nonfinite: list[str] = field(default_factory=list)
    unrestored: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rolled_back)

    @property
    def findings(self) -> list[Finding]:
        return [Finding(
            "warning", name, "non-finite running statistics rolled back", "the guarded step made them NaN/Inf",
            "check the loss scale / learning rate; the step's statistics update was discarded", "stats_rolled_back",
        ) for name in self.nonfinite] + [Finding(
            "error", name, "non-finite running statistics not restored",
            "NaN/Inf when the guarded block ended, in a layer put in the model during it, whose statistics from "
            "before the block are unknown", "recompute them with bnkit.torch.recalibrate or reload a good "
            "checkpoint", "stats_not_restored",
        ) for name in self.unrestored] + [Finding(
            "error", name, "running statistics were already non-finite", "NaN/Inf before the guarded step",
            "reload a good checkpoint or recompute them with bnkit.torch.recalibrate", "nonfinite_stats",
        ) for name in self.already_nonfinite]


def _running_buffers(model: nn.Module) -> tuple[list[nn.Module], list[torch.Tensor], list[torch.Tensor],
                                                list[nn.Module]]:
    """``(layers, statistics, counters, lazy)``: every BatchNorm layer with running statistics, once each, and
    those whose statistics are uninitialized lazy buffers (nothing to copy yet: a rollback resets them).

    A plain walk over ``_modules`` (no qualified names built, order not fixed): this runs on every
    :class:`protect_stats` entry.
    """
    layers: list[nn.Module] = []
    stats: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    lazy: list[nn.Module] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if m is None:
            continue
        if isinstance(m, BN_TYPES) and id(m) not in seen:
            seen.add(id(m))
            b = m._buffers
            mean, var, count = b.get("running_mean"), b.get("running_var"), b.get("num_batches_tracked")
            if mean is not None and var is not None and is_lazy(mean):
                lazy.append(m)
            elif mean is not None and var is not None:
                layers.append(m)
                stats += (mean, var)
                if count is not None:
                    counts.append(count)
        stack.extend(m._modules.values())
    return layers, stats, counts, lazy


def _pack(tensors: list[torch.Tensor], join) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """``[(tensors, one flat copy of them)]``: one kernel for all of them, or one per device if they are spread.

    Buffers do not require grad, so no graph is recorded (and no ``no_grad`` context is paid for).
    """
    if not tensors:
        return []
    try:
        return [(tensors, join(tensors))]
    except RuntimeError:  # tensors on several devices
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in tensors:
            by_device.setdefault(t.device, []).append(t)
        return [(ts, join(ts)) for ts in by_device.values()]


class _Snapshot:
    """Copies of every running statistic (one ``cat``) and counter (one ``stack``) of a model's BN layers.

    ``cat`` promotes mixed floating dtypes to the widest, which holds the others exactly.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers, stats, counts, self.lazy = _running_buffers(model)
        self.stats = _pack(stats, torch.cat)
        self.counts = _pack(counts, torch.stack)
        self.entry = [(m, tuple(m._buffers.get(k) for k in _BUFFERS)) for m in self.layers]  # the tensors now
        self.known = {id(m) for m in (*self.layers, *self.lazy)}

    def added(self, model: nn.Module) -> list[nn.Module]:
        """The BN layers with running statistics in ``model`` now that it did not hold at the snapshot (swapped in
        during the block: ``convert_bn``, a copy, a new layer)."""
        return [m for m in _running_buffers(model)[0] if id(m) not in self.known]

    def replaced(self) -> list[nn.Module]:
        """The layers whose running statistics are other tensors now (``.double()``, ``.to()``, assignment)."""
        return [m for m, (mean, var, _) in self.entry
                if (m._buffers.get("running_mean") is not mean or m._buffers.get("running_var") is not var)
                and _stats_present(m)]

    def materialized(self) -> list[nn.Module]:
        """The layers that were lazy at the snapshot and got their statistics since."""
        return [m for m in self.lazy if not is_lazy(m.running_mean)]

    def now_finite(self, added: list[nn.Module]) -> bool:
        """True if every running statistic is finite now.

        One ``cat`` and one ``sum`` per device: a sum is finite iff every term is, unless it
        overflows; an overflow only sends the check to the exact per-element test.
        """
        for tensors, _ in self.stats:
            now = torch.cat(tensors)
            if not math.isfinite(now.sum().item()) and not bool(torch.isfinite(now).all()):
                return False
        return all(_finite(m) for m in self.materialized() + self.replaced() + added)

    def saved(self) -> tuple[dict[tuple[int, str], torch.Tensor], dict[int, torch.Tensor]]:
        """Every snapshotted buffer's snapshot, by ``(id(layer), buffer name)`` and by ``id`` of the tensor it copied
        (which the snapshot holds on to, so the ids stay its own)."""
        by_tensor = {}
        for tensors, flat in self.stats + self.counts:
            for t, s in zip(tensors, flat.split([t.numel() for t in tensors])):
                by_tensor[id(t)] = s.view(t.shape)
        return {(id(m), k): by_tensor[id(t)] for m, tensors in self.entry
                for k, t in zip(_BUFFERS, tensors) if id(t) in by_tensor}, by_tensor


class protect_stats:
    """Restore all BN running buffers if the block leaves any of them non-finite.

    ``with protect_stats(model) as report:`` gives a :class:`StatsRollback` that is
    filled in when the block ends (also when it raises). On a rollback every layer
    gets back its ``running_mean``, ``running_var`` and ``num_batches_tracked`` (in
    place) and, with ``warn``, a ``RuntimeWarning`` names the non-finite layers. Buffers replaced in the
    block (``model.double()``, ``.to()``, assignment) are checked as they are on exit and restored into
    those tensors (the values from entry, cast to their dtype and device).
    The object can be made once and entered every step, also from several threads at once: each exit pairs
    with its own thread's latest entry (its snapshot, its report). Blocks that overlap in time on one model share
    its buffers, and each restores what it found on entry: one entered while another thread's step had left a
    statistic non-finite cannot repair it, and names it in ``already_nonfinite`` if it is still non-finite when
    the block ends (that thread's own exit restores its entry values). Each entry costs one walk
    over the modules, one flat copy of the statistics and one of the counters, and
    on exit one walk (for layers swapped in during the block: those holding the buffers from entry are restored, others
    left non-finite are named in ``unrestored``) and one fused finiteness check with one device sync.
    """

    def __init__(self, model: nn.Module, *, warn: bool = True) -> None:
        require_eager(model)
        self.model, self.warn = model, warn
        self._local = threading.local()  # per thread: (snapshot, report) of each nested entry, innermost last

    def __getstate__(self) -> dict:
        """Copies and pickles get the model and the options, no active entry."""
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _active(self) -> list[tuple[_Snapshot, StatsRollback]]:
        if not hasattr(self._local, "active"):
            self._local.active = []
        return self._local.active

    def __enter__(self) -> StatsRollback:
        report = StatsRollback()
        self._active().append((_Snapshot(self.model), report))
        return report

    def __exit__(self, *exc) -> bool:
        if not self._active():
            raise RuntimeError("protect_stats: left in a thread that did not enter it; enter and leave each block "
                               "in one thread (a with statement does)")
        snapshot, report = self._active().pop()
        added = snapshot.added(self.model)
        if (snapshot.stats or snapshot.lazy or added) and not snapshot.now_finite(added):
            _rollback(self.model, snapshot, report, added)
            said = []
            if report.nonfinite:
                said.append(f"non-finite running statistics in {report.nonfinite}; rolled back the statistics of "
                            f"{len(report.rolled_back)} BatchNorm layer(s) to before the step")
            if report.unrestored:
                said.append(f"non-finite running statistics in {report.unrestored}, put in the model during the "
                            "block: their statistics from before it are unknown, so they stay as they are")
            if said and self.warn:
                warnings.warn(f"protect_stats: {'; '.join(said)}", RuntimeWarning, stacklevel=2)
        return False


def _rollback(model: nn.Module, snapshot: _Snapshot, report: StatsRollback, added: list[nn.Module]) -> None:
    """The rare path: find which layers went non-finite and, if any did, restore every changed buffer. ``added``:
    the layers swapped in during the block; those holding none of the snapshot's tensors cannot be restored."""
    saved, by_tensor = snapshot.saved()
    # each buffer as it is now with its values at entry: a layer's by its name, also where the block replaced the
    # tensor (.double(), assignment); by the tensor, where the block swapped the layer for one holding its buffers
    # (convert_bn, revert_bn)
    buffers = [(n or type(m).__name__, t, entry) for n, m in model.named_modules() for k in _BUFFERS
               if (t := m._buffers.get(k)) is not None and not is_lazy(t)
               and (entry := saved.get((id(m), k), by_tensor.get(id(t)))) is not None and t.shape == entry.shape]
    before_ok: dict[str, bool] = {}
    after_ok: dict[str, bool] = {}
    for name, t, s in buffers:
        if t.is_floating_point():
            before_ok[name] = before_ok.get(name, True) and bool(torch.isfinite(s).all())
            after_ok[name] = after_ok.get(name, True) and bool(torch.isfinite(t).all())
    materialized = {id(m) for m in snapshot.materialized()}  # lazy before the step: "before" is their initial 0 / 1
    fresh = [(n or type(m).__name__, m) for n, m in model.named_modules() if id(m) in materialized]
    for name, m in fresh:
        after_ok[name] = _finite(m)
    layer_names = list(dict.fromkeys([name for name, _, _ in buffers] + [name for name, _ in fresh]))
    report.already_nonfinite = [n for n in layer_names if not before_ok.get(n, True)]
    report.nonfinite = [n for n in layer_names if before_ok.get(n, True) and not after_ok.get(n, True)]
    matched = {id(t) for _, t, _ in buffers}
    lost = {id(m) for m in added if not _finite(m) and not {id(m.running_mean), id(m.running_var)} <= matched}
    report.unrestored = [n or type(m).__name__ for n, m in model.named_modules() if id(m) in lost]
    if not report.nonfinite:  # such a layer may have come in non-finite: it names no step to roll back
        return
    with torch.no_grad():
        for name, t, s in buffers:
            if not torch.equal(t, s.to(t.device, t.dtype)):
                t.copy_(s)  # into the current tensor: a conversion made in the block (dtype, device) stays
                if name not in report.rolled_back:
                    report.rolled_back.append(name)
        for name, m in fresh:
            type(m).reset_running_stats(m)  # the values lazy materialization gives (a frozen layer's own keeps them)
            report.rolled_back.append(name)


def _stats_present(bn: nn.Module) -> bool:
    mean, var = bn._buffers.get("running_mean"), bn._buffers.get("running_var")
    return mean is not None and var is not None and not is_lazy(mean) and not is_lazy(var)


def _finite(bn: nn.Module) -> bool:
    return bool(torch.isfinite(bn.running_mean).all()) and bool(torch.isfinite(bn.running_var).all())
