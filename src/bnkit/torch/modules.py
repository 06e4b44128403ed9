"""Finding BatchNorm layers in a PyTorch model.

Every layer that normalizes with batch statistics in training mode derives
from ``torch.nn.modules.batchnorm._BatchNorm`` (torch/nn/modules/batchnorm.py):
``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, the ``LazyBatchNorm*d`` and bnkit's
drop-in layers. bnkit's buffer-only ``FrozenBatchNorm*d`` are not among them:
they never use batch statistics.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BN_TYPES", "is_batchnorm", "bn_layers"]

BN_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm,)


def is_batchnorm(module: nn.Module) -> bool:
    """True for any module that normalizes with batch statistics when training."""
    return isinstance(module, BN_TYPES)


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """``(qualified_name, module)`` for every BatchNorm layer, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]
