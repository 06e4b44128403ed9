"""Streaming statistics for BatchNorm: exact moments and moving averages.

Everything here accumulates in float64.

* :class:`RunningMoments` keeps the exact per-channel count, mean and sum of
  squared deviations (``M2``) over any number of batches. Batches are reduced
  on their own (two-pass, so a large offset does not cancel) and folded in with
  Chan, Golub & LeVeque's parallel formula::

      n = n_a + n_b,  d = mean_b - mean_a
      mean = mean_a + d * n_b / n
      M2   = M2_a + M2_b + d**2 * n_a * n_b / n

  ``merge`` applies the same formula to two accumulators (one per worker), so
  the result is exact whichever way the data was split. The naive
  sum-of-squares ``E[x**2] - E[x]**2`` is never used: it loses every digit when
  ``|mean| >> std``.
* :func:`ema_update` is one exponential-moving-average step with the momentum
  given on either side (see :mod:`bnkit.conventions`); :class:`EMA` takes the
  weight on the old value (``decay``) and adds Adam-style bias correction
  ``v_t / (1 - decay**t)``.
* :class:`CumulativeAverage` is PyTorch's ``momentum=None``: the plain mean of
  every value seen, i.e. an EMA whose weight on the new value is ``1/t``.
"""
from __future__ import annotations

from collections.abc import Iterable

import math

import numpy as np

from .checks import integer, real, real_array

#: The largest count whose moments float64 can still divide by.
_LARGEST_COUNT = int(np.finfo(np.float64).max)

__all__ = [
    "RunningMoments",
    "batch_moments",
    "ema_update",
    "EMA",
    "CumulativeAverage",
    "ema_table",
]


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contains NaN or Inf; refusing to update statistics")


def _check_real(x: np.ndarray, what: str) -> None:
    if np.iscomplexobj(x):
        raise TypeError(f"{what} must be real, got dtype {x.dtype}; refusing to update statistics")


def _move_channels_first(x: np.ndarray, channel_axis: int) -> np.ndarray:
    """Return a 2-D float64 view-or-copy ``(C, M)`` with channels on axis 0."""
    channel_axis = integer(channel_axis, "channel_axis")
    if x.ndim < 1:
        raise ValueError("input must have at least one dimension (the channel axis)")
    ax = channel_axis % x.ndim if -x.ndim <= channel_axis < x.ndim else None
    if ax is None:
        raise ValueError(f"channel_axis {channel_axis} out of range for input of shape {x.shape}")
    moved = np.moveaxis(np.asarray(x), ax, 0)
    return moved.reshape(moved.shape[0], -1).astype(np.float64, copy=False)


def batch_moments(x: np.ndarray, channel_axis: int = 1) -> tuple[int, np.ndarray, np.ndarray]:
    """Per-channel ``(count, mean, M2)`` of one batch, two-pass in float64.

    ``M2`` is the sum of squared deviations from the batch mean, so the biased
    variance is ``M2 / count`` and the unbiased one ``M2 / (count - 1)``. Input that is not real numbers (complex,
    strings) is refused with ``TypeError``, as :meth:`RunningMoments.update` refuses it.
    """
    flat = _move_channels_first(real_array(np.asarray(x), "batch"), channel_axis)
    count = flat.shape[1]
    if count == 0:
        return 0, np.zeros(flat.shape[0]), np.zeros(flat.shape[0])
    mean = flat.mean(axis=1)
    dev = flat - mean[:, None]
    m2 = np.einsum("cm,cm->c", dev, dev)
    return count, mean, m2


class RunningMoments:
    """Exact per-channel mean and variance over a stream of batches.

    Batches are combined by Chan's formula around a fixed shift per channel, the first value seen (or,
    for partials given as ``(count, mean, M2)``, the first partial's mean): each batch is reduced as
    ``x - shift`` (exact for values near it) and the running mean is kept relative to it, so data far
    from zero (a mean of 1e8 with a spread of 1e-4, in thousands of small batches) loses no digits to
    the rounding of a large mean.

    Attributes:
        count: number of values seen per channel (the same for every channel).
        mean: float64 ``(C,)`` mean of everything seen (NaN before any value, as ``np.mean`` of nothing).
        var: biased (population) variance, ``M2 / count``.
        var_unbiased: sample variance, ``M2 / (count - 1)`` (NaN below 2 values).
    """

    def __init__(self, num_channels: int) -> None:
        if integer(num_channels, "num_channels") < 1:
            raise ValueError(f"num_channels must be a positive integer, got {num_channels!r}")
        self.num_channels = int(num_channels)
        self.count = 0
        self._shift = np.zeros(self.num_channels, dtype=np.float64)
        self._offset = np.zeros(self.num_channels, dtype=np.float64)  # mean - shift
        self.m2 = np.zeros(self.num_channels, dtype=np.float64)

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            return np.full(self.num_channels, np.nan)
        return self._shift + self._offset

    def _combine(self, count: int, offset: np.ndarray, m2: np.ndarray, shift: np.ndarray | None = None) -> None:
        """Chan's update with a partial whose mean is ``shift + offset`` (``shift`` None: this accumulator's, or,
        for the first partial, 0); nothing changes if the result overflows float64."""
        if count == 0:
            return
        if self.count + count > _LARGEST_COUNT:  # the variance would divide by a count float64 cannot hold
            raise ValueError(f"{self.count} + {count} values are more than float64 can count; refusing to update "
                             "statistics")
        if self.count == 0:  # the partial's own shift, or (an absolute mean) its mean, becomes the shift
            if shift is None:
                new_shift, new_offset = offset.astype(np.float64).copy(), np.zeros(self.num_channels)
            else:
                new_shift, new_offset = shift.astype(np.float64).copy(), offset.astype(np.float64).copy()
            new_m2 = m2.astype(np.float64).copy()
        else:
            if shift is not None:
                offset = (shift - self._shift) + offset
            delta = offset - self._offset
            new_shift = self._shift
            new_offset = self._offset + delta * (count / (self.count + count))
            new_m2 = self.m2 + m2 + delta * delta * (self.count * count / (self.count + count))
        if not (np.all(np.isfinite(new_shift + new_offset)) and np.all(np.isfinite(new_m2))):
            raise ValueError("the statistics overflow float64 (finite values too large to square); "
                             "refusing to update statistics")
        self.count, self._shift, self._offset, self.m2 = self.count + count, new_shift, new_offset, new_m2

    def update(self, x: np.ndarray, channel_axis: int = 1) -> "RunningMoments":
        """Fold a batch in; every axis except ``channel_axis`` is reduced (as ``x - shift``, see the class doc)."""
        channel_axis = integer(channel_axis, "channel_axis")  # before it indexes the shape below
        x = np.asarray(x)
        ax = channel_axis % x.ndim if x.ndim else 0
        if x.ndim == 0 or x.shape[ax] != self.num_channels:
            raise ValueError(
                f"expected {self.num_channels} channels on axis {channel_axis}, got input of shape {x.shape}"
            )
        _check_real(x, "batch")
        try:  # integers, bools, numbers in an object array: as BatchNorm takes
            x = real_array(x, "batch")
        except TypeError as exc:
            raise TypeError(f"{exc}; refusing to update statistics") from None
        _check_finite(x, "batch")
        flat = _move_channels_first(x, channel_axis)
        if flat.shape[1] == 0:
            return self
        # the first batch is reduced around its first value per channel, which becomes the shift
        shift = flat[:, 0].astype(np.float64) if self.count == 0 else self._shift
        centre = np.expand_dims(shift, tuple(i for i in range(x.ndim) if i != ax))
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused by _combine
            count, offset, m2 = batch_moments(x - centre, channel_axis)
        self._combine(count, offset, m2, shift=shift)
        return self

    def update_moments(self, count: int, mean: np.ndarray, m2: np.ndarray) -> "RunningMoments":
        """Fold in already-reduced partial statistics ``(count, mean, M2)``.

        ``count`` is a non-negative integer, ``M2 >= 0`` (and 0 for fewer than 2 values),
        everything finite, except the mean of a partial of no values (an empty accumulator's is NaN), which is
        not read; anything else is refused before the state changes.
        """
        try:
            whole = integer(count, "count")  # exact, however large
        except ValueError:
            try:
                value = real(count, "count")  # 5.0, Decimal("5")
            except ValueError:
                value = math.nan
            whole = int(value) if value.is_integer() else -1
        if not 0 <= whole <= _LARGEST_COUNT:
            raise ValueError(f"count must be a non-negative integer{' within float64' if whole > 0 else ''}, "
                             f"got {count!r}")
        count = whole
        mean, m2 = np.asarray(mean), np.asarray(m2)
        _check_real(mean, "partial mean")
        _check_real(m2, "partial M2")
        mean, m2 = real_array(mean, "partial mean").astype(np.float64), real_array(m2, "partial M2").astype(np.float64)
        if mean.shape != (self.num_channels,) or m2.shape != (self.num_channels,):
            raise ValueError(f"partial statistics must have shape ({self.num_channels},)")
        if count:
            _check_finite(mean, "partial mean")
        _check_finite(m2, "partial M2")
        if np.any(m2 < 0):
            raise ValueError("partial M2 (sum of squared deviations) must be non-negative")
        if count < 2 and np.any(m2 != 0):
            raise ValueError(f"a partial of {count} value(s) per channel must have M2 = 0, got {m2}")
        self._combine(count, mean - self._shift if self.count else mean, m2)
        return self

    def merge(self, other: "RunningMoments") -> "RunningMoments":
        """Combine another accumulator into this one (Chan's formula), exactly."""
        if not isinstance(other, RunningMoments) or other.num_channels != self.num_channels:
            raise ValueError("can only merge RunningMoments with the same number of channels")
        self._combine(other.count, other._offset, other.m2, shift=other._shift)
        return self

    @property
    def var(self) -> np.ndarray:
        if self.count == 0:
            return np.full(self.num_channels, np.nan)
        return self.m2 / self.count

    @property
    def var_unbiased(self) -> np.ndarray:
        if self.count < 2:
            return np.full(self.num_channels, np.nan)
        return self.m2 / (self.count - 1)

    def __repr__(self) -> str:
        return f"RunningMoments(num_channels={self.num_channels}, count={self.count})"


def ema_update(running: np.ndarray | float, value: np.ndarray | float, momentum: float, *, weight_on: str = "new"):
    """One exponential-moving-average step.

    ``weight_on="new"`` (PyTorch): ``running = (1 - m) * running + m * value``.
    ``weight_on="old"`` (Keras, ONNX, Flax, the lesson's alpha):
    ``running = m * running + (1 - m) * value``.
    """
    m = real(momentum, "momentum")  # computed with as a float: a Decimal or a tensor gives float64 too
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if weight_on == "new":
        w_old, w_new = 1.0 - m, m
    elif weight_on == "old":  # m itself on the old value, as Keras computes it (1 - (1 - m) loses a tiny m)
        w_old, w_new = m, 1.0 - m
    else:
        raise ValueError(f"weight_on must be 'new' or 'old', got {weight_on!r}")
    return w_old * _values(running, "the running value") + w_new * _values(value, "the value")


def _values(x: object, what: str) -> np.ndarray:
    """``x`` as a float64 array: real numbers only (strings, None and complex values refused, naming ``what``)."""
    return real_array(np.asarray(x), what).astype(np.float64)


def _finite_init(init: object) -> np.ndarray:
    """A running average's start as a float64 array; NaN/Inf refused (0 * NaN would keep it in every step)."""
    value = _values(init, "init")
    if not np.isfinite(value).all():
        raise ValueError("init contains NaN or Inf")
    return value


def _averaged(x: object, average: np.ndarray, steps: int) -> np.ndarray:
    """A value for a running average ``average`` of ``steps`` values so far, as a float64 array: finite, and of a
    shape that broadcasts to the average's without changing it (but a scalar average not yet updated, which takes
    the value's shape). A NaN would stay in the average for good, and a shape NumPy broadcasts would turn a per-channel
    average into a table of them; both are refused (ValueError), the average left as it was."""
    value = _values(x, "the value")
    if not np.isfinite(value).all():
        raise ValueError("the value contains NaN or Inf; refusing to update the average (it would never recover)")
    try:
        shape = np.broadcast_shapes(average.shape, value.shape)
    except ValueError:
        shape = None
    if shape is None or ((steps > 0 or average.ndim > 0) and shape != average.shape):
        raise ValueError(f"the value's shape {value.shape} does not fit the average's {average.shape}")
    return value


class EMA:
    """Exponential moving average with optional bias correction.

    ``decay`` is the weight on the old value. ``value`` is the raw average
    started at ``init``; ``corrected`` divides out the start-up bias,
    ``(v_t - decay**t * init) / (1 - decay**t)``, which for ``init = 0`` is
    Adam's ``v_t / (1 - decay**t)``: the weighted mean of the values seen so far, weights
    ``decay**(t - i)``. It is computed from the values' part of the average alone (an EMA started
    at 0), so a large ``init`` with ``decay`` near 1 loses no digits to the subtraction. At
    ``decay = 1`` the raw average never leaves ``init`` and the formula is 0/0; ``corrected`` is then
    its limit, the plain mean of the values seen.
    """

    def __init__(self, decay: float, init: float | np.ndarray = 0.0) -> None:
        self.decay = real(decay, "decay")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.init = _finite_init(init)
        self.value = self.init.copy()
        self._seen = np.zeros_like(self.init)  # sum_i (1 - decay) decay**(t-i) x_i; at decay 1 the plain mean
        self.steps = 0

    def update(self, x) -> np.ndarray:
        """Average in ``x``: finite, shaped to broadcast to ``init`` (a scalar ``init`` takes the first value's
        shape); ValueError otherwise, nothing changed."""
        x = _averaged(x, self.value, self.steps)
        self.value = ema_update(self.value, x, self.decay, weight_on="old")
        self.steps += 1
        if self.decay == 1.0:  # every weight decay**(t-i) is 1: the plain mean, kept as a cumulative average
            self._seen = ema_update(self._seen, x, 1.0 / self.steps, weight_on="new")
        else:
            self._seen = ema_update(self._seen, x, self.decay, weight_on="old")
        return self.value

    @property
    def corrected(self) -> np.ndarray:
        if self.steps == 0:
            return self.init.copy()
        if self.decay == 1.0 or self.decay == 0.0:  # the plain mean / only the last value counts
            return self._seen.copy()
        return self._seen / -math.expm1(self.steps * math.log(self.decay))  # / (1 - decay**t), to full precision


class CumulativeAverage:
    """Plain mean of every value seen (PyTorch ``momentum=None``)."""

    def __init__(self, init: float | np.ndarray = 0.0) -> None:
        self.value = _finite_init(init)
        self.steps = 0

    def update(self, x) -> np.ndarray:
        """Average in ``x``, checked as by :meth:`EMA.update`."""
        x = _averaged(x, self.value, self.steps)
        self.value = ema_update(self.value, x, 1.0 / (self.steps + 1), weight_on="new")  # a refused x counts nothing
        self.steps += 1
        return self.value


def ema_table(values: Iterable[float], decay: float, init: float = 0.0) -> list[tuple[int, float, float, float]]:
    """Rows ``(step, value, running, bias_corrected)`` of an EMA over ``values``."""
    ema = EMA(decay, init)
    rows = []
    for step, v in enumerate(values, start=1):
        ema.update(v)
        rows.append((step, float(v), float(ema.value), float(ema.corrected)))
    return rows
