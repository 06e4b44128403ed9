"""Freezing BatchNorm layers so that it stays frozen.

The usual recipe, ``bn.eval()`` plus ``requires_grad_(False)``, is undone by the
next ``model.train()``: ``nn.Module.train`` (torch/nn/modules/module.py) sets
``training`` on every submodule, the layer normalizes with batch statistics again
and its running statistics drift towards the new data. bnkit freezes two parts,
independently, because recipes differ (detectron2's ``FrozenBatchNorm2d`` freezes
both; fine-tuning with small batches often freezes the statistics and trains
gamma/beta; some recipes train only gamma/beta):

* ``stats``: the layer normalizes with its running statistics and never updates
  them (``y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta``,
  ``num_batches_tracked`` unchanged). Done by giving the layer its own ``train``:
  ``train(mode)`` remembers ``mode`` (for :func:`unfreeze_bn`) and keeps
  ``training = False``. ``model.train()``/``eval()`` reach every layer through
  ``train``, so freezing survives them. Its ``reset_running_stats`` leaves the statistics as they are, with a
  warning: ``torch.optim.swa_utils.update_bn`` resets every BN layer and then recomputes the statistics in training
  mode, which a frozen layer never enters, so they would end at mean 0, variance 1 (``reset_parameters()``, which
  calls it, resets gamma/beta alone). The overrides are attributes of the
  module object, so the freeze survives ``deepcopy``, pickling, ``load_state_dict`` and
  ``torch.compile`` and leaves ``type(layer)`` and the state-dict keys unchanged
  (a frozen model's state dict loads into an unfrozen one and back). Code that
  assigns ``layer.training`` directly (as bnkit's ``recalibrate`` does on
  purpose) bypasses it, and so does a TorchScript copy (``torch.jit.script``
  does not carry Python attributes; script after :func:`~bnkit.torch.convert_frozen`
  instead, or use ``torch.export``). Needs running statistics (``track_running_stats=True``).
  Code that replaces a layer with a new module loses this part (``is_frozen(layer, "stats")``
  then says so): ``nn.SyncBatchNorm.convert_sync_batchnorm`` does, so call it
  first and :func:`freeze_bn` after; bnkit's own swaps (``convert_bn``,
  ``revert_bn``, ``convert_frozen``, ``revert_frozen``) keep it.
* ``affine``: ``weight`` and ``bias`` (every parameter of the layer: for a parametrized
  weight, the tensors it is computed from) get ``requires_grad=False`` and their
  ``.grad`` is cleared, so every ``torch.optim`` optimizer skips them (weight decay
  and momentum included). ``model.requires_grad_(True)`` undoes this part;
  :func:`is_frozen` reports the live state and :func:`freeze_bn` freezes it again.
  The flags from before the freeze, which :func:`unfreeze_bn` restores, are kept on
  each parameter (and on the layer), so this part moves with the Parameter objects
  when code swaps the layer for a new module around them (``convert_sync_batchnorm``
  does). A state dict carries neither part: loaded into a fresh model, nothing is frozen.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .modules import bn_layers, bn_like_modules, eager_modules, is_batchnorm, is_bn_or_frozen, wrapper_chain

__all__ = ["freeze_bn", "unfreeze_bn", "is_frozen", "frozen_bn_layers", "FreezeState"]

_AFFINE_KEY = "_bnkit_affine_requires_grad"  # on the layer: {parameter name: requires_grad before the freeze}
_PARAM_KEY = "_bnkit_requires_grad_before_freeze"  # on each Parameter: its own flag from before the freeze
_PARTS = ("any", "stats", "affine", "all")


class _PinnedEval:
    """A frozen layer's ``train``: keeps ``training`` False and remembers the mode asked for."""

    def __init__(self, module: nn.Module, requested: bool) -> None:
        self.module = module
        self.requested = requested

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.requested = mode
        self.module.training = False
        for child in self.module.children():
            child.train(mode)
        return self.module

    def rebound(self, module: nn.Module) -> "_PinnedEval":
        """The same override for ``module`` (used when a layer is re-typed, e.g. by ``convert_bn``)."""
        return _PinnedEval(module, self.requested)


class _StatsKept:
    """A stats-frozen layer's ``reset_running_stats``: leaves the frozen statistics as they are and warns (but for a
    lazy layer, which resets them as it materializes them)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self) -> None:
        if isinstance(self.module, LazyModuleMixin):  # materializing: the reset gives its buffers their first values
            type(self.module).reset_running_stats(self.module)
            return
        warnings.warn(f"{type(self.module).__name__}'s running statistics are frozen (bnkit's freeze_bn), so "
                      "reset_running_stats() left them as they are (reset_parameters() calls it and resets gamma/beta "
                      "alone; torch.optim.swa_utils.update_bn calls it on every BatchNorm layer); "
                      "unfreeze_bn(..., stats=True) first to reset and recompute them", stacklevel=2)

    def rebound(self, module: nn.Module) -> "_StatsKept":
        """The same override for ``module`` (a re-typed layer, as for :class:`_PinnedEval`)."""
        return _StatsKept(module)


_OVERRIDES = {"train": _PinnedEval, "reset_running_stats": _StatsKept}  # a stats freeze's instance attributes


@dataclass(frozen=True)
class FreezeState:
    """Which parts of a layer are frozen; falsy when neither is."""

    stats: bool
    affine: bool

    def __bool__(self) -> bool:
        return self.stats or self.affine


def _affine_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter gamma and beta are made of: ``weight``/``bias`` themselves, or for a parametrized weight
    (``torch.nn.utils.parametrize``, ``weight_norm``) the tensors it is computed from (``parametrizations.weight.
    original``, ``weight_g``/``weight_v``), which ``getattr(module, "weight")`` does not return."""
    return dict(module.named_parameters())


def _affine_record(module: nn.Module) -> dict[str, bool] | None:
    """The ``requires_grad`` flags from before the first affine freeze by parameter name, or None if none was.

    Kept on each Parameter, so they move with the Parameter objects into a new module (as in
    ``nn.SyncBatchNorm.convert_sync_batchnorm``), and on the layer, since ``copy.deepcopy`` makes Parameters
    without their attributes.
    """
    on_params = {k: p.__dict__[_PARAM_KEY] for k, p in _affine_params(module).items() if _PARAM_KEY in p.__dict__}
    on_layer = module.__dict__.get(_AFFINE_KEY)
    return None if on_layer is None and not on_params else {**(on_layer or {}), **on_params}


def _state(module: nn.Module) -> FreezeState:
    if getattr(type(module), "_bnkit_frozen_layer", False):  # FrozenBatchNorm*d: buffers only
        return FreezeState(True, True)
    stats = isinstance(module.__dict__.get("train"), _PinnedEval) and not module.training
    params = _affine_params(module)
    affine = _affine_record(module) is not None and not any(p.requires_grad for p in params.values())
    return FreezeState(stats, affine)


def select_bn_layers(model: nn.Module, modules: Iterable[nn.Module | str] | nn.Module | str | None
                     ) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for the BatchNorm layers that ``modules=`` picks: every one for ``None``; else each
    item, a qualified name (resolved with ``model.get_submodule``, so either name of a layer shared under two
    works) or a module of ``model``, or a single such item; an ``nn.ModuleList``/``nn.Sequential`` is its layers,
    an ``nn.ModuleDict`` its values. Anything else raises before anything changes."""
    if modules is None:
        return bn_layers(model)
    if isinstance(modules, nn.ModuleDict):
        modules = list(modules.values())
    elif isinstance(modules, str) or (isinstance(modules, nn.Module)
                                      and not isinstance(modules, (nn.ModuleList, nn.Sequential))):
        modules = [modules]
    name_of: dict[int, str] = {}
    for n, m in model.named_modules():
        name_of.setdefault(id(m), n)
    chosen: dict[int, tuple[str, nn.Module]] = {}
    for item in modules:
        if isinstance(item, str):
            name, layer = item, _submodule(model, item)
        elif isinstance(item, nn.Module):
            if id(item) not in name_of:
                raise ValueError(f"the {type(item).__name__} passed in modules= is not a BatchNorm layer of the model "
                                 "(not one of its modules); modules= items that are not BatchNorm layers of the "
                                 "model are refused before anything changes")
            name, layer = name_of[id(item)], item
        else:
            raise TypeError(f"modules= takes BatchNorm modules or their qualified names, got {type(item).__name__}")
        if not is_batchnorm(layer):
            raise ValueError(f"{name!r} ({type(layer).__name__}) is not a BatchNorm layer; BatchNorm layers of "
                             f"the model: {[n for n, _ in bn_layers(model)][:8]}")
        chosen.setdefault(id(layer), (name, layer))
    return list(chosen.values())


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """``model``'s submodule ``name``, or that of the module a wrapper runs (``module.`` left out of a
    DataParallel's names, as the audit and fold leave it out)."""
    for owner in wrapper_chain(model):
        try:
            return owner.get_submodule(name)
        except AttributeError:
            pass
    raise ValueError(f"{name!r} is not a BatchNorm layer of the model: it has no submodule of that name "
                     f"(BatchNorm layers: {[n for n, _ in bn_layers(model)][:8]})")


def freeze_bn(
    model: nn.Module, *, stats: bool = True, affine: bool = True, modules: Iterable[nn.Module | str] | None = None
) -> nn.Module:
    """Freeze the running statistics and/or gamma/beta of BatchNorm layers, for good.

    Args:
        model: any module; every BatchNorm layer in it (``nn.BatchNorm1d/2d/3d``,
            ``SyncBatchNorm``, ``LazyBatchNorm*d``, bnkit's drop-in layers) is frozen,
            or only those in ``modules`` (modules or qualified names).
        stats: normalize with the running statistics and never update them, whatever
            ``model.train()`` says (see the module doc).
        affine: stop training ``weight``/``bias`` (``requires_grad=False``).

    Freezing a frozen part again is a no-op; a part whose freeze was undone since
    (``model.requires_grad_(True)``, a direct ``layer.training = True``), i.e. one
    :func:`is_frozen` reports as not frozen, is frozen again, and :func:`unfreeze_bn`
    still restores the ``requires_grad`` flags from before the first freeze. A layer without
    gamma/beta (``affine=False``) has nothing to train: ``affine=True`` marks it
    affine-frozen. All layers are checked before any is changed: a layer without
    running statistics cannot have them frozen (it normalizes with batch
    statistics even in eval mode) and raises ``ValueError``.
    Returns ``model``.
    """
    layers = select_bn_layers(model, modules)
    if stats:
        missing = [n or type(m).__name__ for n, m in layers if m.running_mean is None]
        if missing:
            raise ValueError(
                f"BatchNorm layers {missing} have no running statistics (track_running_stats=False), so they "
                "normalize with batch statistics even in eval mode and their statistics cannot be frozen; "
                "pass stats=False, or leave them out with modules=[...]"
            )
        foreign = [(n, k) for n, m in layers for k, cls in _OVERRIDES.items()
                   if k in m.__dict__ and not isinstance(m.__dict__[k], cls)]
        if foreign:
            raise ValueError(f"BatchNorm layers {[n for n, _ in foreign]} already have their own "
                             f"{', '.join(sorted({k + '()' for _, k in foreign}))} override; not freezing them")
    for _, m in layers:
        state = _state(m)  # the live state: a part unfrozen behind bnkit's back is frozen again
        if stats:
            if not isinstance(m.__dict__.get("train"), _PinnedEval):
                m.__dict__["train"] = _PinnedEval(m, m.training)
            if not isinstance(m.__dict__.get("reset_running_stats"), _StatsKept):
                m.__dict__["reset_running_stats"] = _StatsKept(m)
            m.training = False
        if affine and not state.affine:
            params = _affine_params(m)
            before = _affine_record(m) or {}  # the flags from before the first freeze, which unfreeze_bn restores
            flags = {k: before.get(k, p.requires_grad) for k, p in params.items()}
            m.__dict__[_AFFINE_KEY] = flags
            for k, p in params.items():
                p.__dict__[_PARAM_KEY] = flags[k]
                p.requires_grad = False  # (an attribute, so uninitialized lazy parameters accept it too)
                p.grad = None
    if modules is None:
        _warn_left(model, layers)
    return model


def _warn_left(model: nn.Module, layers: list) -> None:
    """Warn where ``freeze_bn(model)`` left running statistics free to change: modules holding them that are not
    BatchNorm layers (:func:`bnkit.torch.modules.bn_like_modules`; a class named ``Frozen...``, as torchvision's and
    detectron2's ``FrozenBatchNorm2d``, is taken as frozen by design), or no BatchNorm layer at all."""
    like = bn_like_modules(model)
    if others := [(n, m) for n, m in like if "Frozen" not in type(m).__name__]:
        names = [n or "(root)" for n, _ in others]
        kinds = ", ".join(sorted({type(m).__name__ for _, m in others}))
        warnings.warn(f"freeze_bn left {len(names)} module(s) ({kinds}: {', '.join(names[:3])}"
                      f"{', ...' if len(names) > 3 else ''}) unfrozen: they hold running_mean and running_var but are "
                      "not torch.nn BatchNorm layers, so their own forward decides whether it updates them (the "
                      "modules of a torch.export graph, InstanceNorm, another library's BatchNorm); freeze the eager "
                      "model before exporting it, or keep those modules out of training yourself", stacklevel=3)
    elif not layers and not like and not any(is_bn_or_frozen(m) for _, m in eager_modules(model)):
        warnings.warn(f"freeze_bn found no BatchNorm layer in the {type(model).__name__}: nothing was frozen",
                      stacklevel=3)


def unfreeze_bn(
    model: nn.Module, *, stats: bool = True, affine: bool = True, modules: Iterable[nn.Module | str] | None = None
) -> nn.Module:
    """Undo :func:`freeze_bn` exactly, for the selected parts and layers.

    ``training`` becomes the mode last asked for through ``train()`` while frozen
    (so a layer frozen during training and since put through ``model.eval()`` is
    in eval mode); ``requires_grad`` gets back the value it had when first frozen.
    Layers that are not frozen are left alone. Returns ``model``.
    """
    for _, m in select_bn_layers(model, modules):
        pinned = m.__dict__.get("train")
        if stats and isinstance(pinned, _PinnedEval):
            del m.__dict__["train"]
            m.training = pinned.requested
        if stats and isinstance(m.__dict__.get("reset_running_stats"), _StatsKept):
            del m.__dict__["reset_running_stats"]
        flags = _affine_record(m) if affine else None
        if flags is not None:
            m.__dict__.pop(_AFFINE_KEY, None)
            for k, p in _affine_params(m).items():
                p.__dict__.pop(_PARAM_KEY, None)
                p.requires_grad = flags.get(k, True)
    return model


def is_frozen(module: nn.Module, part: str = "any") -> bool:
    """Whether ``part`` of ``module`` is frozen now: ``"stats"``, ``"affine"``, ``"any"`` or ``"all"`` (both).

    On a BatchNorm layer the answer is that layer's. On any other module (a whole
    model, a block) it answers for all the BatchNorm layers inside, the ones
    :func:`freeze_bn` would freeze by default plus bnkit's ``FrozenBatchNorm*d``:
    True when there is at least one and the part is frozen in every one of them
    (so ``is_frozen(model)`` is True right after ``freeze_bn(model)``, and False
    after ``freeze_bn(model, modules=[...])`` froze only some; use
    :func:`frozen_bn_layers` for the per-layer answer). bnkit's ``FrozenBatchNorm*d``
    are frozen in every part. The answer is live: an affine part whose
    ``requires_grad`` was switched back on is not frozen.
    """
    if part not in _PARTS:
        raise ValueError(f"part must be one of {_PARTS}, got {part!r}")
    if is_bn_or_frozen(module):
        layers = [module]
    else:
        layers = [m for _, m in eager_modules(module) if is_bn_or_frozen(m)]
    return bool(layers) and all(_part_frozen(_state(m), part) for m in layers)


def stats_freeze(module: nn.Module) -> object | None:
    """The object that pins ``module``'s statistics frozen now (None: not frozen by :func:`freeze_bn`). Each freeze
    makes a new one, so a caller can tell the freeze it saw from a later one after :func:`unfreeze_bn`."""
    pinned = module.__dict__.get("train")
    return pinned if isinstance(pinned, _PinnedEval) else None


def _part_frozen(state: FreezeState, part: str) -> bool:
    return {"any": bool(state), "stats": state.stats, "affine": state.affine, "all": state.stats and state.affine}[part]


def frozen_bn_layers(model: nn.Module) -> dict[str, FreezeState]:
    """``{qualified_name: FreezeState}`` for every BatchNorm or FrozenBatchNorm layer with a frozen part."""
    return {name: state for name, m in eager_modules(model) if is_bn_or_frozen(m) and (state := _state(m))}
