"""The chapters' digits MLP, with named layers so tables and plots say ``bn1``, not a Sequential index.

``digits_mlp`` is :class:`bnkit.torch.zoo.MLP`'s architecture (``Flatten -> [Linear -> BatchNorm1d -> ReLU]* ->
Linear``), its modules created in the same order, so a seed gives the same initial weights; only the names differ:
``fc1, bn1, relu1, fc2, bn2, relu2, head``.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn

__all__ = ["digits_mlp", "layernorm_mlp", "bn_places", "bn_legend"]


def digits_mlp(
    num_classes: int = 10,
    hidden: tuple[int, ...] = (128, 64),
    in_features: int = 64,
    *,
    norm: Callable[[int], nn.Module] = nn.BatchNorm1d,
    norm_name: str = "bn",
) -> nn.Sequential:
    """``Flatten -> fc1 -> bn1 -> relu1 -> ... -> head``: ``norm(width)`` (BatchNorm1d) after every hidden Linear."""
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width = in_features
    for i, h in enumerate(hidden, 1):
        layers += [(f"fc{i}", nn.Linear(width, h)), (f"{norm_name}{i}", norm(h)), (f"relu{i}", nn.ReLU())]
        width = h
    layers.append(("head", nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def layernorm_mlp(num_classes: int = 10) -> nn.Sequential:
    """:func:`digits_mlp` with ``LayerNorm`` (``ln1``, ``ln2``) in place of BatchNorm: no batch statistics."""
    return digits_mlp(num_classes, norm=nn.LayerNorm, norm_name="ln")


def bn_places(model: nn.Module) -> dict[str, str]:
    """``{bn name: where it sits}`` for the direct children of a Sequential, e.g. ``"after fc1 (Linear 64->128)"``."""
    children = list(model.named_children())
    out = {}
    for (prev_name, prev), (name, m) in zip(children, children[1:]):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = f"after {prev_name}"
            if isinstance(prev, nn.Linear):
                out[name] += f" (Linear {prev.in_features}->{prev.out_features})"
    return out


def bn_legend(model: nn.Module) -> str:
    """One line naming each BN layer of :func:`digits_mlp`: ``bn1 = BatchNorm1d after fc1 (Linear 64->128); ...``."""
    return "; ".join(f"{name} = {type(getattr(model, name)).__name__} {where}"
                     for name, where in bn_places(model).items())
