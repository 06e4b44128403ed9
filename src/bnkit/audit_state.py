"""Auditing BatchNorm statistics from arrays alone: no model code, no framework.

A BatchNorm layer at inference is ``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``
per channel. This module checks the arrays of that formula and reports, as
:class:`bnkit.findings.Finding` records, what would make the output wrong:

* non-finite values, a negative variance (``sqrt`` of a negative number), shapes that disagree,
  arrays that are not real numbers and a ``num_batches_tracked`` that is not a count;
* an ``eps`` that is not finite, or negative (``running_var + eps <= 0`` divides by zero or takes
  the root of a negative number);
* statistics never updated: every mean exactly 0 and every variance exactly 1 (PyTorch's
  initial buffers, ``reset_running_stats`` in torch/nn/modules/batchnorm.py); a
  ``num_batches_tracked == 0`` beside other values means they were set without an update;
* few updates: with PyTorch's momentum ``m`` (the weight on the NEW batch) the initial
  values still weigh ``(1 - m) ** num_batches_tracked`` in the running statistics;
* variances below ``eps`` where the channel's gain ``|gamma| / sqrt(var + eps)`` exceeds 1: it is set by
  ``eps``, not by the data, and any deviation of the input is amplified by up to ``|gamma|/sqrt(eps)``; with
  ``eps <= 0``, variances below PyTorch's default 1e-5, whose gain nothing bounds;
* ``|gamma|`` near zero: the channel outputs the constant ``beta`` whatever its input (dead channel).

:func:`bn_stats_from_state` finds the layers of a flat state dict by PyTorch's buffer
names (``<layer>.running_mean`` / ``.running_var`` / ``.weight`` / ``.bias`` /
``.num_batches_tracked``). The ONNX audit can build :class:`BNStats` from a graph's
initializers and call :func:`check_bn_stats` directly.

:func:`ema_window` and :func:`ema_noise_factor` describe PyTorch's running average
``running = (1 - m) * running + m * batch_stat``: how many batches it effectively
averages, and how much of a batch statistic's noise survives in it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .batchnorm import update_count
from .findings import Finding

__all__ = [
    "BNStats",
    "bn_stats_from_state",
    "layer_stats",
    "check_bn_stats",
    "audit_state",
    "ema_window",
    "ema_noise_factor",
    "initial_weight",
]

#: The initial values still carry more than this weight: "few updates".
FEW_UPDATES_WEIGHT = 0.01
#: ``|gamma|`` at or below this is a dead channel.
GAMMA_TOL = 1e-3
#: PyTorch's default eps: a layer with eps 0 has its variances judged against it (``tiny_var``).
DEFAULT_EPS = 1e-5

#: A BatchNorm layer's entries in a state dict, by name.
BN_BUFFERS = ("running_mean", "running_var", "weight", "bias", "num_batches_tracked")


@dataclass
class BNStats:
    """The arrays of one BatchNorm layer, in PyTorch's naming and convention.

    ``momentum`` is PyTorch's (the weight on the new batch statistic; ``None`` is the
    cumulative average); ``weight``/``bias`` are None for ``affine=False`` layers and
    ``num_batches_tracked`` is None when the format does not store it (ONNX, Keras).
    ``invalid``: what no BatchNorm can hold (complex or non-numeric arrays, a count that is not a
    non-negative integer), as :func:`layer_stats` found it; nothing else is checked then.
    """

    name: str
    running_mean: np.ndarray
    running_var: np.ndarray
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    num_batches_tracked: int | None = None
    eps: float = 1e-5
    momentum: float | None = 0.1
    invalid: list[str] = field(default_factory=list)
    #: statistics per channel, channel-major (ONNX opset 7-8 ``spatial=0``: one per (channel, position))
    positions: int = 1


def ema_window(momentum: float, mass: float = 0.95) -> float:
    """How many of the latest batches carry ``mass`` of a running statistic's weight.

    Batch ``k`` steps ago weighs ``m * (1 - m) ** k``; the latest ``n`` batches weigh
    ``1 - (1 - m) ** n``, so ``n = log(1 - mass) / log(1 - m)`` (28.4 for PyTorch's 0.1), and at least the one
    latest batch (from ``m >= mass`` it alone carries that much: the formula's 0.65 at 0.99 is no number of
    batches); ``log(1 - m)`` as ``log1p(-m)``, which stays exact where ``1 - m`` rounds to 1 (momentum below ~1e-16).
    """
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum}")
    if momentum >= mass:
        return 1.0
    return max(1.0, math.log(1.0 - mass) / math.log1p(-momentum))


def ema_noise_factor(momentum: float) -> float:
    """Standard deviation of the running average over that of one batch statistic.

    For independent batch statistics of variance ``s**2`` the stationary variance of
    ``r = (1 - m) r + m b`` is ``m**2 s**2 / (1 - (1 - m)**2) = m s**2 / (2 - m)``, for every ``0 < m < 2`` (above 1
    the average overshoots each batch and oscillates, still converging; from 2 on it diverges).
    """
    if not 0.0 < momentum < 2.0:
        raise ValueError(f"momentum must be in (0, 2), where the running average converges, got {momentum}")
    return math.sqrt(momentum / (2.0 - momentum))


def initial_weight(momentum: float | None, num_batches_tracked: int) -> float:
    """The weight the initial buffers (0 and 1) still have after ``num_batches_tracked`` updates.

    ``(1 - m) ** n`` for an exponential average; 0 after one update of the cumulative
    average (``momentum=None``: the first batch gets weight ``1/1``).
    """
    if momentum is None:
        return 0.0 if num_batches_tracked > 0 else 1.0
    return (1.0 - momentum) ** num_batches_tracked


def as_array(value) -> np.ndarray:
    """A real tensor or array-like as a float64 NumPy array (torch tensors detached and moved to the CPU).

    Raises TypeError for complex or non-numeric values (a float64 copy would drop their imaginary part).
    """
    kind = _kind(value)
    if kind not in "biuf":
        raise TypeError(f"expected real numbers, got {_dtype_name(value)} values")
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        try:
            value = value.detach().cpu().double().numpy()
        except (RuntimeError, NotImplementedError) as exc:  # float4_e2m1fn_x2, bits8: packed codes, no cast defined
            raise TypeError(f"expected real numbers, got {_dtype_name(value)} values, which torch cannot convert to "
                            f"float64 ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        except ValueError as exc:  # an uninitialized lazy parameter or buffer: torch refuses to read it
            raise TypeError("expected real numbers, got an uninitialized lazy tensor, which holds no values yet "
                            "(its module creates them at its first forward)") from exc
    return np.asarray(value, dtype=np.float64)


def _kind(value) -> str:
    """NumPy's dtype kind of an array, tensor or array-like ("f" float, "c" complex, "O" object, ...)."""
    if hasattr(value, "detach"):  # torch: complex, bool and quantized are the non-float/int dtypes here
        if value.is_quantized:  # "q", no NumPy kind: its integers mean values only with its scale
            return "q"
        if str(value.layout) != "torch.strided" or value.is_nested:  # sparse, nested: no array of values
            return "O"
        return "c" if value.is_complex() else "b" if str(value.dtype) == "torch.bool" else "f"
    try:
        return np.asarray(value).dtype.kind
    except (TypeError, ValueError):  # ragged nests
        return "O"


def _dtype_name(value) -> str:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return type(value).__name__
    if getattr(value, "is_nested", False):
        return f"nested {dtype}"
    layout = str(getattr(value, "layout", "torch.strided"))
    return str(dtype) if layout == "torch.strided" else f"{dtype} {layout.removeprefix('torch.')}"


def layer_stats(name: str, buffers: Mapping[str, object], *, eps: float = 1e-5,
                momentum: float | None = 0.1, batchnorm: bool | None = None) -> BNStats:
    """One layer's :class:`BNStats` from its buffers and parameters under PyTorch's names (absent or None: not stored).

    Arrays that are not real numbers and a ``num_batches_tracked`` that is not one non-negative integer
    are listed in ``invalid`` (and left out) instead of being converted: a float64 copy would keep
    a complex array's real part and ``int()`` would round a count. A ``weight`` of more than one dimension
    whose values or whose ``bias``'s are not one per channel, or without a bias (a Linear's ``(out, in)``, a
    ``Linear(C, 1)`` head's ``(1, C)`` beside a bias of 1 or none: an affine BatchNorm has both) is no BatchNorm's
    gamma but that of a Linear or conv keeping running statistics of its input: it and the bias are left out, the
    statistics checked alone. One with C values beside a bias of C is a BatchNorm's in the wrong shape, which
    ``load_state_dict`` refuses: kept, and reported. That guess is for state dicts (``batchnorm=None``); a layer
    known to be a BatchNorm (``True``) keeps its weight and bias as gamma and beta whatever their shapes, and of a
    module known to be none (``False``) a weight of more than one dimension is always set aside with its bias.
    """
    arrays: dict[str, np.ndarray | None] = {}
    invalid = []
    for key in ("running_mean", "running_var", "weight", "bias"):
        value = buffers.get(key)
        arrays[key] = None
        if value is not None:
            try:
                arrays[key] = as_array(value)
            except TypeError as exc:
                invalid.append(f"{key}: {exc}")
    weight, bias, mean = arrays["weight"], arrays["bias"], arrays["running_mean"]
    if batchnorm is not True and weight is not None and weight.ndim > 1 and (
            batchnorm is False or mean is None or bias is None or weight.size != mean.size or bias.size != mean.size):
        arrays["weight"] = arrays["bias"] = None
    count = None
    if (nbt := buffers.get("num_batches_tracked")) is not None:
        try:
            count = update_count(nbt)
        except ValueError as exc:
            invalid.append(str(exc))
    # a statistic left out becomes an empty array: check_bn_stats then reports ``invalid`` alone
    mean, var = (np.zeros(0) if arrays[k] is None else arrays[k] for k in ("running_mean", "running_var"))
    return BNStats(name=name, running_mean=mean, running_var=var,
                   weight=arrays["weight"], bias=arrays["bias"], num_batches_tracked=count, eps=eps,
                   momentum=momentum, invalid=invalid)


def bn_stats_from_state(
    state: Mapping[str, object], *, eps: float = 1e-5, momentum: float | None = 0.1
) -> list[BNStats]:
    """The BatchNorm layers of a flat state dict, found by their buffer names.

    A layer is a prefix that has both ``running_mean`` and ``running_var``, its ``running_mean`` one value per
    channel (an RL observation normalizer's ``(8, 8)`` or scalar one is no BatchNorm's, as the model audit also
    decides). ``eps`` and ``momentum`` are not stored in a state dict: the PyTorch defaults are assumed.
    Anything but a mapping (a file's path, whose characters would be read as keys) is a TypeError.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"a flat state dict (a mapping of names to tensors or arrays) is needed, got "
                        f"{type(state).__name__}: to audit a file, pass its path to bnkit.torch.audit "
                        "(checkpoints, safetensors, ONNX) or bnkit.onnx.audit (ONNX, without torch)")
    prefixes = []
    for key in state:
        if not isinstance(key, str) or not (key == "running_mean" or key.endswith(".running_mean")):
            continue
        try:
            one_per_channel = np.ndim(state[key]) == 1
        except ValueError:  # a ragged list: no statistic of one value per channel
            one_per_channel = False
        prefix = key[: -len("running_mean")]
        if one_per_channel and prefix + "running_var" in state:
            prefixes.append(prefix)
    return [layer_stats(prefix[:-1] if prefix else "(root)", {b: state.get(prefix + b) for b in BN_BUFFERS},
                        eps=eps, momentum=momentum) for prefix in prefixes]


def _where(mask: np.ndarray, positions: int = 1) -> list[int]:
    """The channels where ``mask`` (one entry per statistic, ``positions`` per channel) holds anywhere."""
    return np.unique(np.flatnonzero(mask) // positions).tolist()


def _channels(mask: np.ndarray, positions: int = 1, limit: int = 6) -> str:
    idx = np.asarray(_where(mask, positions))
    shown = ", ".join(str(i) for i in idx[:limit])
    return f"channel{'s' if idx.size > 1 else ''} {shown}{', ...' if idx.size > limit else ''}"


def check_bn_stats(layer: BNStats) -> list[Finding]:
    """Every problem of one layer's arrays, most severe first."""
    name = layer.name
    if layer.invalid:
        return [Finding("error", name, "BN state that no BatchNorm layer can hold", "; ".join(layer.invalid),
                        "re-export the layer: statistics and parameters are real numbers, num_batches_tracked a "
                        "count of training-mode updates", "invalid_state", {"invalid": layer.invalid})]
    mean, var = layer.running_mean, layer.running_var
    arrays = {"running_mean": mean, "running_var": var}
    if layer.weight is not None:
        arrays["weight"] = layer.weight
    if layer.bias is not None:
        arrays["bias"] = layer.bias

    shapes = {k: v.shape for k, v in arrays.items()}
    if len(set(shapes.values())) > 1 or mean.ndim != 1:
        return [Finding("error", name, "BN arrays have inconsistent shapes" if len(set(shapes.values())) > 1 else
                        "BN arrays are not one value per channel",
                        ", ".join(f"{k} {tuple(s)}" for k, s in shapes.items()),
                        "re-export the layer; every array must hold one value per channel", "bad_shape",
                        {k: list(s) for k, s in shapes.items()})]

    per = layer.positions
    nonfinite = {k: len(_where(~np.isfinite(v), per)) for k, v in arrays.items()}
    nonfinite = {k: n for k, n in nonfinite.items() if n}
    findings: list[Finding] = []
    if nonfinite:  # the checks below still judge the finite channels (a NaN compares false everywhere)
        findings.append(Finding(
            "error", name, "non-finite values in BN statistics or parameters",
            "; ".join(f"{k}: {n} of {mean.size // per} channels NaN/Inf" for k, n in nonfinite.items()),
            "recompute the statistics (bnkit recalibrate) from clean data, or restore an earlier checkpoint",
            "non_finite", {"non_finite": nonfinite}))

    eps = float(layer.eps)
    if not math.isfinite(eps):
        return findings + [Finding("error", name, "non-finite eps",
                        f"eps = {eps}: every output of the layer is "
                        + ("NaN" if math.isnan(eps) or eps < 0 else "beta (the input is divided by infinity)"),
                        "set eps to a small positive number (PyTorch's default is 1e-5)", "bad_eps", {"eps": eps})]

    nbt = layer.num_batches_tracked
    at_init = bool(mean.size and np.all(mean == 0.0) and np.all(var == 1.0))  # no channels: nothing to update
    if at_init:
        findings.append(Finding(
            "error", name, "running statistics never updated",
            "every running_mean is 0 and every running_var is 1 (the initial values)"
            + (f"; num_batches_tracked = {nbt}" if nbt is not None else ""),
            "run the layer in training mode on representative data, or compute its statistics with bnkit recalibrate",
            "never_updated", {"num_batches_tracked": nbt}))
    elif nbt == 0:
        findings.append(Finding(
            "warning", name, "num_batches_tracked is 0 but the statistics are not the initial ones",
            "running_mean/running_var were set without a training-mode update (by hand or by a converter), or "
            "loaded from a checkpoint that stores no num_batches_tracked (load_state_dict then leaves the count 0)",
            "fine if they were computed on purpose; with momentum=None the first update would discard them",
            "never_tracked", {"num_batches_tracked": nbt}))
    # momentum 0 never updates, one outside [0, 1] diverges: the model depth reports those
    elif (nbt is not None and (layer.momentum is None or 0.0 < layer.momentum <= 1.0)
          and (w0 := initial_weight(layer.momentum, nbt)) > FEW_UPDATES_WEIGHT):
        findings.append(Finding(
            "warning", name, "running statistics updated only a few times",
            f"num_batches_tracked = {nbt}: with momentum {layer.momentum} the initial values (0, 1) still weigh "
            f"(1 - {layer.momentum})^{nbt} = {w0:.3g}, if the statistics come from that many training updates",
            "train longer or recalibrate (bnkit recalibrate) so the statistics are the data's; statistics "
            "recomputed from that many batches (bnkit recalibrate on a fresh layer, update_bn) are exact already",
            "few_updates", {"num_batches_tracked": nbt, "initial_weight": w0}))

    # channels with NaN/Inf anywhere are reported above; the checks below judge the others
    finite = np.isfinite(mean) & np.isfinite(var)
    for extra in (layer.weight, layer.bias):
        if extra is not None:
            finite &= np.isfinite(extra)
    finite = np.repeat(finite.reshape(-1, per).all(axis=1), per)  # a channel's positions stand or fall together
    negative = (var < 0) & finite
    if negative.any():
        findings.append(Finding(
            "error", name, "negative running variance",
            f"{_channels(negative, per)}: min running_var {var[negative].min():.3g}"
            + ("; var + eps < 0 gives NaN" if (var[negative] + eps < 0).any() else ""),
            "the statistics were corrupted (a variance cannot be negative): recompute them with bnkit recalibrate",
            "negative_var", {"channels": _where(negative, per), "min_var": float(var[negative].min())}))

    zero = (var >= 0) & (var + eps <= 0) & finite  # sqrt(var + eps): zero divides by zero, negative is NaN
    if zero.any() and eps == 0:
        findings.append(Finding(
            "error", name, "zero running variance with eps = 0",
            f"{_channels(zero, per)}: running_var 0 and eps 0, so the channel divides by zero (inf/NaN outputs)",
            "set eps > 0 (PyTorch's default is 1e-5) or recalibrate on data where the channel varies",
            "zero_var", {"channels": _where(zero, per)}))
    elif zero.any():
        findings.append(Finding(
            "error", name, "running variance + eps <= 0",
            f"{_channels(zero, per)}: running_var + eps <= 0 with eps = {eps:g} (negative; smallest such variance "
            f"{var[zero].min():.3g}), so the channel divides by zero or takes the root of a negative number "
            "(inf/NaN outputs)", "set eps > 0 (PyTorch's default is 1e-5)", "nonpositive_var_eps",
            {"channels": _where(zero, per), "eps": eps}))
    elif eps < 0:
        findings.append(Finding(
            "warning", name, "negative eps",
            f"eps = {eps:g}: sqrt(running_var + eps) is below the running standard deviation, so every gain "
            "|gamma|/sqrt(var + eps) is inflated, and a channel whose variance drops below |eps| gives NaN",
            "set eps > 0 (PyTorch's default is 1e-5)", "negative_eps", {"eps": eps}))

    gamma = np.ones_like(var) if layer.weight is None else layer.weight
    # below eps, eps sets the gain; with eps <= 0 nothing bounds it: judged against PyTorch's default eps then
    floor = eps if eps > 0 else DEFAULT_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # float64: a float16 layer's gains overflow
        gains = np.abs(gamma.astype(np.float64)) / np.sqrt(var.astype(np.float64) + eps)  # its dtype, 1e308 float64's
    tiny = finite & (var >= 0) & (var + eps > 0) & (var < floor) & (gains > 1)  # a dead gamma amplifies nothing
    if tiny.any():
        gain = gains[tiny]
        below = f"eps {eps:g}" if eps > 0 else f"{DEFAULT_EPS:g} (eps {eps:g} bounds nothing)"
        overflow = not np.isfinite(gain.max())  # any input change gives an inf output
        findings.append(Finding(
            "error" if overflow else "warning", name, "variance below eps: eps sets the channel's gain" if eps > 0 else
            "variance below 1e-5 with eps <= 0: nothing bounds the channel's gain",
            f"{_channels(tiny, per)}: running_var {var[tiny].min():.3g} < {below}; "
            f"|gamma|/sqrt(var + eps) up to {gain.max():.3g}, so any input change in these channels is amplified"
            + (" beyond float64's range (inf outputs)" if overflow else ""),
            "if these channels are dead upstream, prune them; otherwise recalibrate on representative data"
            + ("" if eps > 0 else "; an eps > 0 bounds the gain"),
            "tiny_var", {"channels": _where(tiny, per), "max_gain": float(gain.max())}))

    if layer.weight is not None:
        dead = (np.abs(layer.weight) <= GAMMA_TOL) & finite
        if dead.any():
            everywhere = bool(dead.all())
            findings.append(Finding(
                "warning", name, "gamma near zero: dead channels",
                f"{_channels(dead, per)} of {dead.size // per}: |gamma| <= {GAMMA_TOL:g}, so the output is the "
                "constant beta"
                + (" (every channel: a zero-initialised residual BN never trained?)" if everywhere else ""),
                "check weight decay on BN parameters and the learning rate; prune the channels if intended",
                "dead_gamma", {"channels": _where(dead, per), "all": everywhere}))
    return findings


def audit_state(
    state: Mapping[str, object], *, eps: float = 1e-5, momentum: float | None = 0.1
) -> list[Finding]:
    """:func:`check_bn_stats` on every layer of a flat state dict (PyTorch names)."""
    return [f for layer in bn_stats_from_state(state, eps=eps, momentum=momentum) for f in check_bn_stats(layer)]
