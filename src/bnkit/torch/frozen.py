"""Buffer-only frozen BatchNorm layers and the conversion to and from them.

``FrozenBatchNorm1d/2d/3d`` compute BatchNorm's inference transform and nothing else::

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias

with every tensor a buffer: no parameters (an optimizer never sees them), no
training mode (``train()`` changes nothing), no statistics updates. Like
torchvision's ``FrozenBatchNorm2d`` (torchvision/ops/misc.py) and detectron2's
(detectron2/layers/batch_norm.py), but ``eps`` is the converted layer's own, any
dimensionality is covered, ``affine=False`` layers stay without weight/bias, and
the output is ``F.batch_norm(..., training=False)``, so it is bit-identical to
the converted layer in eval mode. The state-dict keys are ``nn.BatchNorm*d``'s,
``num_batches_tracked`` included, so state dicts load both ways; a state dict
without ``num_batches_tracked`` (torchvision's) loads too and keeps the counter.

:func:`convert_frozen` swaps BatchNorm layers for these in place and
:func:`revert_frozen` swaps them back to the original class (bnkit's drop-in
options, hooks, ``training`` and ``requires_grad`` included), sharing tensors.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy

from ..checks import real
from .convert import BatchNormNd
from .freeze import select_bn_layers
from .layers import replace_modules, retype_module
from .modules import channels, check_channel_tensors, eager_modules

__all__ = [
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "FrozenBatchNormNd",
    "convert_frozen", "revert_frozen",
]

_SOURCE_KEY = "_bnkit_frozen_from"  # (original class, {param name: the original nn.Parameter})


class FrozenBatchNormNd(nn.Module):
    """BatchNorm's eval-mode transform with buffers only, for inputs ``(N, C, *)`` of any rank >= 2."""

    _bnkit_frozen_layer = True

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        """``eps``: finite and >= 0, as ``convert_frozen`` keeps a layer's own (PyTorch allows 0); ``bias=False``:
        no bias buffer, as ``nn.BatchNorm*d(bias=False)`` has no bias parameter (only with ``affine``)."""
        super().__init__()
        if int(num_features) != num_features or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        eps = real(eps, "eps")  # a 0-d tensor or array too, as nn.BatchNorm*d takes; a bool or a string refused
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.eps = int(num_features), eps
        self.register_buffer("weight", torch.ones(num_features, **kw) if affine else None)
        self.register_buffer("bias", torch.zeros(num_features, **kw) if affine and bias else None)
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"FrozenBatchNormNd expects at least 2D input (N, C, *), got {input.dim()}D input")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.size(1) != self.num_features:
            raise ValueError(
                f"frozen BatchNorm expects {self.num_features} channels on dim 1, got input of shape {input.shape}"
            )
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    forward._bnkit_stock_in_eval = True  # nn.BatchNorm's eval transform, in every mode (fold and audit rely on it)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        key = prefix + "num_batches_tracked"
        if key not in state_dict and self.num_batches_tracked is not None:
            state_dict = {**state_dict, key: self.num_batches_tracked}  # torchvision's frozen layers omit it
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        no_bias = ", bias=False" if self.weight is not None and self.bias is None else ""
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}{no_bias}"


class FrozenBatchNorm1d(FrozenBatchNormNd):
    """Frozen ``BatchNorm1d``: ``(N, C)`` or ``(N, C, L)``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"FrozenBatchNorm1d expects 2D or 3D input, got {input.dim()}D input")


class FrozenBatchNorm2d(FrozenBatchNormNd):
    """Frozen ``BatchNorm2d``: ``(N, C, H, W)``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"FrozenBatchNorm2d expects 4D input, got {input.dim()}D input")


class FrozenBatchNorm3d(FrozenBatchNormNd):
    """Frozen ``BatchNorm3d``: ``(N, C, D, H, W)``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"FrozenBatchNorm3d expects 5D input, got {input.dim()}D input")


def _frozen_class(module: nn.Module) -> type[FrozenBatchNormNd]:
    for bn_cls, frozen_cls in (
        (nn.BatchNorm1d, FrozenBatchNorm1d), (nn.BatchNorm2d, FrozenBatchNorm2d), (nn.BatchNorm3d, FrozenBatchNorm3d)
    ):
        if isinstance(module, bn_cls):
            return frozen_cls
    return FrozenBatchNormNd  # SyncBatchNorm and other _BatchNorm subclasses accept any rank


def convert_frozen(
    model: nn.Module, modules: Iterable[nn.Module | str] | nn.Module | str | None = None
) -> nn.Module:
    """Replace every BatchNorm layer (or those in ``modules``: layers or qualified names, as for
    :func:`~bnkit.torch.freeze_bn`) with its buffer-only frozen twin.

    Tensors are shared (parameters become buffers viewing the same storage), no
    ``training`` flag changes, hooks and other attributes are kept for
    :func:`revert_frozen`. The original parameters' gradients are cleared (``None``), so an
    optimizer built before, which still holds them, skips them (with a zeroed gradient its
    momentum and weight decay would go on moving the frozen values). Layers without running statistics or with
    uninitialized lazy ones raise ``ValueError`` before anything changes.
    Returns the model (a new object only when ``model`` itself is a BN layer).
    """
    targets = {id(m): (name or type(m).__name__) for name, m in select_bn_layers(model, modules)}
    bad = [
        targets[id(m)] for m in model.modules()
        if id(m) in targets and (m.running_mean is None or is_lazy(m.running_mean) or is_lazy(m.weight)
                                 or isinstance(m, LazyModuleMixin))
    ]
    if bad:
        raise ValueError(
            f"cannot freeze BatchNorm layers {bad}: they have no running statistics (track_running_stats=False) "
            "or are still lazy (uninitialized, or loaded from a state dict: run one forward pass first)"
        )
    computed = [  # parametrize / weight_norm: the stored tensors are not gamma and beta
        targets[id(m)] for m in model.modules()
        if id(m) in targets
        and any(k not in m._parameters and getattr(m, k, None) is not None for k in ("weight", "bias"))
    ]
    if computed:
        raise ValueError(
            f"cannot freeze BatchNorm layers {computed}: their weight or bias is computed from other tensors "
            "(torch.nn.utils.parametrize or weight_norm), which a frozen layer does not keep; remove the "
            "parametrization first (torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight'))"
        )

    check_channel_tensors((name, m) for m in model.modules() if (name := targets.get(id(m))) is not None)

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if id(m) not in targets:
            return None
        new = retype_module(m, _frozen_class(m))
        new.num_features = channels(m)  # a once-lazy layer keeps num_features 0 in PyTorch
        params = m._parameters
        new._parameters = {}
        new._buffers = {k: (None if params.get(k) is None else params[k].detach()) for k in ("weight", "bias")}
        new._buffers.update(m._buffers)
        new.__dict__[_SOURCE_KEY] = (type(m), {k: p for k, p in params.items() if p is not None})
        return new

    converted = replace_modules(model, make)
    live = {id(p) for p in converted.parameters()}  # a parameter tied to a layer left trainable keeps its gradient
    for m in converted.modules():
        for p in (m.__dict__.get(_SOURCE_KEY) or (None, {}))[1].values():
            # an optimizer built before still holds these Parameters: a zeroed (not None) gradient would let its
            # momentum, Adam moments and weight decay go on moving the frozen gamma/beta, whose storage they share
            if id(p) not in live:
                p.grad = None
    return converted


def _as_parameter(buffer: Tensor | None, original: nn.Parameter | None) -> nn.Parameter | None:
    """``original`` again if ``buffer`` still is its tensor, so optimizers holding it keep training it.

    A buffer replaced since (``.to()``, ``.half()``, assignment) becomes a new parameter.
    """
    if buffer is None or original is None:
        return None if buffer is None else nn.Parameter(buffer)
    same = (buffer.data_ptr() == original.data_ptr() and buffer.shape == original.shape
            and buffer.dtype == original.dtype and buffer.device == original.device)
    return original if same else nn.Parameter(buffer, requires_grad=original.requires_grad)


def revert_frozen(model: nn.Module) -> nn.Module:
    """Swap every ``FrozenBatchNorm*d`` back to a BatchNorm layer, sharing tensors.

    A layer made by :func:`convert_frozen` gets back its original class with all
    its options, flags and its original ``weight``/``bias`` ``nn.Parameter`` objects
    (``requires_grad`` included), so an optimizer built before :func:`convert_frozen`
    trains them again; only where the tensors were replaced meanwhile (``.to()``,
    ``.half()``) are new parameters made. One built directly becomes the
    matching ``nn.BatchNorm1d/2d/3d`` (:class:`~bnkit.torch.BatchNormNd` for ``FrozenBatchNormNd``;
    momentum 0.1, ``training`` and hooks kept): its buffers are the same tensors, and ``weight``/``bias``
    become new ``nn.Parameter`` objects over the same storage. A frozen layer without running statistics
    raises ``ValueError`` before anything changes.
    Returns the model (a new object only when ``model`` itself is frozen).
    """
    plain = {FrozenBatchNorm1d: nn.BatchNorm1d, FrozenBatchNorm2d: nn.BatchNorm2d, FrozenBatchNorm3d: nn.BatchNorm3d,
             FrozenBatchNormNd: BatchNormNd}
    frozen = [(name or type(m).__name__, m) for name, m in eager_modules(model) if isinstance(m, FrozenBatchNormNd)]
    foreign = [name for name, m in frozen if _SOURCE_KEY not in m.__dict__ and type(m) not in plain]
    if foreign:
        raise ValueError(f"{foreign}: a subclass of FrozenBatchNormNd not made by convert_frozen has no BatchNorm "
                         "class to revert to")
    empty = [name for name, m in frozen if m.running_mean is None or m.running_var is None]
    if empty:
        raise ValueError(f"cannot revert frozen BatchNorm layers {empty}: running_mean or running_var is None")

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if not isinstance(m, FrozenBatchNormNd):
            return None
        if _SOURCE_KEY not in m.__dict__:  # built directly: a plain BatchNorm layer over the same tensors
            new = retype_module(m, plain[type(m)])
            new.momentum, new.affine, new.track_running_stats = 0.1, m.weight is not None, True
            new._parameters = {k: _as_parameter(m._buffers[k], None) for k in ("weight", "bias")}
            new._buffers = {k: v for k, v in m._buffers.items() if k not in ("weight", "bias")}
            return new
        cls, params = m.__dict__[_SOURCE_KEY]
        new = retype_module(m, cls)
        del new.__dict__[_SOURCE_KEY]
        new._parameters = {k: _as_parameter(m._buffers[k], params.get(k)) for k in ("weight", "bias")}
        new._buffers = {k: v for k, v in m._buffers.items() if k not in ("weight", "bias")}
        return new

    return replace_modules(model, make)
