"""The four ways frameworks write the same BatchNorm running-statistics update.

Every framework keeps ``running = a * running + b * batch_stat`` with ``a + b = 1``;
they differ in which of ``a``/``b`` the user-facing ``momentum`` names, in its
default, in the default ``eps``, and in whether the *unbiased* or the *biased*
batch variance feeds the running variance.

========  ==============  ========  ======  ==========================  =======================================
name      momentum weighs default   eps     running_var fed with        source
========  ==============  ========  ======  ==========================  =======================================
torch     the new value   0.1       1e-5    unbiased  M2/(n-1)           torch/nn/modules/batchnorm.py,
                                                                         aten/src/ATen/native/Normalization.cpp
keras     the old value   0.99      1e-3    biased    M2/n               keras/src/layers/normalization/
                                                                         batch_normalization.py (ops.moments)
onnx      the old value   0.9       1e-5    biased    M2/n               onnx/defs/nn/defs.cc (BatchNormalization-15),
                                                                         onnx/reference/ops/op_batch_normalization.py
flax      the old value   0.99      1e-5    biased    M2/n               flax/linen/normalization.py (_compute_stats)
========  ==============  ========  ======  ==========================  =======================================

PyTorch also accepts ``momentum=None``: a cumulative average whose weight on the
new value is ``1 / num_batches_tracked``. It has no equivalent elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from .checks import real

__all__ = ["Convention", "CONVENTIONS", "get_convention", "convert_momentum", "new_value_weight",
           "update_weights"]


@dataclass(frozen=True)
class Convention:
    """One framework's BatchNorm update rule and defaults.

    Attributes:
        name: ``"torch"``, ``"keras"``, ``"onnx"`` or ``"flax"``.
        momentum_weighs: ``"new"`` if ``momentum`` multiplies the batch statistic,
            ``"old"`` if it multiplies the running value.
        default_momentum: the framework's default ``momentum``.
        default_eps: the framework's default ``epsilon``.
        unbiased_running_var: True if the running variance is fed ``M2/(n-1)``.
        source: where the rule is defined in the framework's own code or spec.
    """

    name: str
    momentum_weighs: str
    default_momentum: float
    default_eps: float
    unbiased_running_var: bool
    source: str

    def update_rule(self) -> str:
        """The update written with this framework's own ``momentum``."""
        if self.momentum_weighs == "new":
            return "running = (1 - momentum) * running + momentum * batch"
        return "running = momentum * running + (1 - momentum) * batch"


CONVENTIONS: dict[str, Convention] = {
    "torch": Convention("torch", "new", 0.1, 1e-5, True,
                        "torch/nn/modules/batchnorm.py; aten/src/ATen/native/Normalization.cpp"),
    "keras": Convention("keras", "old", 0.99, 1e-3, False, "keras/src/layers/normalization/batch_normalization.py"),
    "onnx": Convention("onnx", "old", 0.9, 1e-5, False,
                       "onnx/defs/nn/defs.cc (BatchNormalization-15); onnx/reference/ops/op_batch_normalization.py"),
    "flax": Convention("flax", "old", 0.99, 1e-5, False, "flax/linen/normalization.py (BatchNorm, _compute_stats)"),
}


def get_convention(name: str | Convention) -> Convention:
    """Look a convention up by name (case-insensitive); ``"tf"``/``"tensorflow"`` mean keras."""
    if isinstance(name, Convention):
        return name
    key = str(name).lower()
    key = {"tf": "keras", "tensorflow": "keras", "pytorch": "torch", "jax": "flax"}.get(key, key)
    try:
        return CONVENTIONS[key]
    except KeyError:
        raise ValueError(f"unknown convention {name!r}; expected one of {sorted(CONVENTIONS)}") from None


def _check_momentum(m: float) -> float:
    m = real(m, "momentum")  # a bool or a string is refused, not read as 1.0 or parsed
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    return m


def update_weights(momentum: float, convention: str | Convention) -> tuple[float, float]:
    """``(old, new)``: the weights an update puts on the running value and on the batch statistic under
    ``convention``. The side the momentum names gets ``m`` itself, the other ``1 - m`` (``1 - (1 - m)`` would lose a
    tiny ``m``, as in :func:`bnkit.stats.ema_update`)."""
    conv = get_convention(convention)
    m = _check_momentum(momentum)
    return (1.0 - m, m) if conv.momentum_weighs == "new" else (m, 1.0 - m)


def new_value_weight(momentum: float, convention: str | Convention) -> float:
    """The weight an update puts on the new batch statistic under ``convention``."""
    return update_weights(momentum, convention)[1]


def convert_momentum(momentum: float | None, src: str | Convention, dst: str | Convention) -> float | None:
    """Translate a momentum from ``src``'s convention into ``dst``'s.

    The update is the same; only the side the number names changes:
    PyTorch's 0.1 (weight on the new value) is Keras's 0.9 (weight on the old).
    The complement is taken in decimal, so a round trip returns the same float when both ``m`` and ``1 - m`` have
    at most 15 significant digits; a float32 ONNX attribute (0.10000000149011612) of at least 1e-9 comes back as the
    same float32 (below that, ``1 - m`` needs more digits than a float64 holds).
    PyTorch's ``momentum=None`` (cumulative average) has no fixed equivalent elsewhere and is refused
    (PyTorch to PyTorch passes it through); the other frameworks have no ``momentum=None``.
    """
    s, d = get_convention(src), get_convention(dst)
    if momentum is None:
        if s.name != "torch":
            raise ValueError(f"{s.name} momentum must be a number in [0, 1], got None (only PyTorch has "
                             "momentum=None, its cumulative average)")
        if d.name == "torch":
            return None
        raise ValueError(
            "momentum=None (PyTorch's cumulative average, weight 1/t on the new value) has no fixed "
            f"equivalent in {d.name}; pick the momentum you want explicitly"
        )
    m = _check_momentum(momentum)
    return m if s.momentum_weighs == d.momentum_weighs else _complement(m)


def _complement(m: float) -> float:
    """``1 - m`` computed on ``m``'s shortest decimal form, so ``0.9 -> 0.1`` (not 0.09999999999999998)
    and converting back returns the very same float whenever ``1 - m`` has at most 15 significant digits."""
    return float(Decimal(1) - Decimal(repr(m)))
