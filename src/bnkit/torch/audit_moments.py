"""Per-layer float64 moments of every BatchNorm input during the audit's batch-statistics pass.

Each BN call normalizes with its batch's own statistics, as in training, without
updating anything the audit does not restore; the call's count, mean and variance (or
``1 / sqrt(var + eps)``, see :class:`Collector`) are kept and pooled in float64 by Chan's
formula (:class:`bnkit.stats.RunningMoments`).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from ..stats import RunningMoments
from .frozen import FrozenBatchNormNd
from .modules import channels, has_stock_eval_forward, has_stock_forward, is_batchnorm


def _centred(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(count, mean, biased var, x - mean)`` per channel (axis 1), the centred copy shaped ``(N, C, -1)``.

    Two-pass: sums over the ``(N, C, -1)`` view, then ``var = sum |x_nc - mean|^2 / count``
    from each row's 2-norm (one read of the centred copy, no squared temporary). Several
    times faster on CPU than ``torch.var_mean`` over ``(0, 2, 3)`` or a training-mode
    ``F.batch_norm``; the copy is what :class:`Collector` normalizes in place.
    """
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    xv = x.reshape(x.shape[0], x.shape[1], -1)
    n = xv.shape[0] * xv.shape[2]
    mean = xv.sum(2).sum(0).mul_(1.0 / n)
    d = xv - mean.unsqueeze(1)
    return n, mean, torch.linalg.vector_norm(d, dim=2).square_().sum(0).mul_(1.0 / n), d


def _channel_rows(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(count, mean, biased var)`` per channel (axis 1), two-pass over a copy holding each channel as one row.

    ``mean = sum x / count``, then ``var = |x - mean|^2 / count`` with the row centred in place: both passes are
    reductions along contiguous rows, where :func:`_centred` reduces across the batch axis. On the CPU, for
    small contiguous inputs (:data:`_ROWS_MAX_NUMEL`), faster than it and than the training-mode kernel
    (``benchmarks/audit.py``'s VGG: 4x4 and 8x8 maps; ``(N, C)`` inputs of a few thousand rows).
    """
    c = x.shape[1]
    rows = x.detach().reshape(x.shape[0], c, -1).transpose(0, 1)
    rows = rows.clone(memory_format=torch.contiguous_format).view(c, -1)  # a copy: centred in place below
    n = rows.shape[1]
    mean = rows.sum(1).mul_(1.0 / n)
    return n, mean, torch.linalg.vector_norm(rows.sub_(mean.unsqueeze(1)), dim=1).square_().mul_(1.0 / n)


#: PyTorch's training-mode kernel normalizes and reduces faster than :func:`_centred` for inputs with
#: up to this many values per channel and sample (BatchNorm1d on ``(N, C)``, feature maps up to 3x3) ...
_KERNEL_STATS_MAX_VALUES = 9
#: ... or up to this many values in all (the other paths' dozen tensor ops cost mostly call overhead there) ...
_KERNEL_STATS_MAX_NUMEL = 1 << 14
#: ... and at most this many values per channel: on ``(N, C)`` and channels-last inputs its CPU
#: statistics lose the mean of offset data beyond that (mean 1e4, std 1e-2: off by 1.5-3 std at
#: 32768-100000 rows, depending on the thread count; aten/src/ATen/native/cpu/batch_norm_kernel.cpp,
#: the channels-last collect-stats path).
_KERNEL_STATS_MAX_COUNT = 1 << 12
#: Devices whose ``native_batch_norm`` returns the batch mean and inverse std it normalized with
#: (aten/src/ATen/native/native_functions.yaml: CPU and CUDA; only the CPU is tested here);
#: inputs elsewhere always take :func:`_centred`.
_KERNEL_STATS_DEVICES = ("cpu", "cuda")
#: Up to this many values per channel and sample and this many in all (beyond, its copy's extra pass through
#: memory costs more than it saves), :func:`_channel_rows` takes the contiguous float32/float64 inputs that the
#: kernel does not, on these devices (timed on the CPU only; elsewhere :func:`_centred`).
_ROWS_MAX_VALUES, _ROWS_MAX_NUMEL = 128, 1 << 16
_ROWS_DEVICES = ("cpu",)


def _var_from_invstd(invstd: np.ndarray, eps: float) -> np.ndarray:
    """``var = 1 / invstd^2 - eps`` in place, clipped at 0 (a zero variance rounds either way in float32). Only for
    eps > 0: with eps 0 the kernel's invstd of 0 means variance 0 (aten/src/ATen/native/cpu/batch_norm_kernel.cpp,
    ``InvStd``) as well as a variance beyond the dtype, so such layers never take the kernel path."""
    with np.errstate(divide="ignore", invalid="ignore"):  # an infinite variance (invstd 0) stays inf, NaN stays NaN
        np.reciprocal(np.square(invstd, out=invstd), out=invstd)
    return np.maximum(np.subtract(invstd, eps, out=invstd), 0.0, out=invstd)


#: A layer whose running mean sits more than this many running standard deviations from zero in some channel has its
#: calls' moments taken about a value of each call's own data (:func:`_far_from_zero`).
_SHIFT_RATIO = 1e3


def _far_from_zero(bn: nn.Module) -> bool:
    """Whether some channel's finite running mean sits over :data:`_SHIFT_RATIO` running standard deviations (with
    eps) from zero. A call's mean summed in float32 is off by a few ulps of ``|mean|`` (a channel constant at 3e4:
    0.008, which is 2.5 std against a running variance of 0 with eps 1e-5). Such a layer's float32/float64 calls
    are shifted by that mean (the corrected two-pass: ``x - mean`` is exact near it, and its own mean, added back
    in float64, is the correction), which lies where the data is whatever the running mean, and centres it as
    PyTorch's kernel does: BatchNorm on batch statistics is shift-invariant, so the output is the same."""
    mean, var = bn.running_mean, bn.running_var
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor) or is_lazy(mean) or is_lazy(var):
        return False
    mean, var = mean.detach(), var.detach()
    far = mean.abs() > _SHIFT_RATIO * (var + float(bn.eps)).clamp_min(0).sqrt()
    return bool((far & torch.isfinite(mean) & torch.isfinite(var)).any())


def _channel_means(x: torch.Tensor) -> torch.Tensor:
    """The per-channel (axis 1) mean of ``x`` in its dtype, ``(C,)``: a few ulps of ``|mean|`` off at most."""
    return x.detach().mean([0, *range(2, x.dim())])


def _less(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x`` less a per-channel (axis 1) ``shift`` of shape ``(C,)``."""
    return x - shift.view(1, -1, *[1] * (x.dim() - 2))


def pool_calls(counts: np.ndarray, means: np.ndarray, var: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """``(N, mean, M2)`` of calls given as counts ``(K,)``, means and biased variances ``(K, C)``, by Chan's formula
    for K partials: ``mean = sum n_k m_k / N``, ``M2 = sum n_k var_k + sum n_k (m_k - mean)^2``."""
    total = counts.sum()
    mean = counts @ means / total
    return int(total), mean, counts @ var + counts @ np.square(means - mean)


class PassClock:
    """Shared by the collectors of one pass: numbers their calls in the order they ran, and knows the data batch
    being run and each batch's number of samples (set by the pass with :meth:`start`), so a layer's calls can be
    told apart per forward and its rows counted per data sample."""

    def __init__(self) -> None:
        self._calls = itertools.count()
        self.batch = 0
        self.sizes: dict[int, int] = {}

    def start(self, batch: int, size: int | None) -> None:
        """Data batch ``batch``, of ``size`` samples (None: unknown), runs next."""
        self.batch, self.sizes[batch] = batch, size

    def tick(self) -> tuple[int, int]:
        """The next call's number and the batch it runs in."""
        return next(self._calls), self.batch


class CallRows:
    """One row of ``C`` values per call, copied into chunks on the values' device (16 rows, doubling up to 256).

    The pass keeps each call's mean and spread here rather than as one small tensor per call: thousands of
    those, left alive between the activations a forward allocates and frees, fragment the CPU allocator's
    heap, so later activations land in fresh, page-faulting memory (``benchmarks/audit.py``: the MobileNet's
    peak resident memory grew by about 1 GiB over its audits of 78 MB of data, 9-37 MiB with chunks). Each
    chunk's free rows are kept as views, so an append is one copy. Rows of another dtype promote every chunk.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self._chunks: list[torch.Tensor] = []
        self._free: list[torch.Tensor] = []  # the last chunk's unused rows, the next one last
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, row: torch.Tensor) -> None:
        if row.numel() != self.width:
            raise ValueError(f"a row of {row.numel()} values for {self.width} channels")
        if self._chunks and (dtype := torch.promote_types(self._chunks[-1].dtype, row.dtype)) != self._chunks[-1].dtype:
            self._chunks = [c.to(dtype) for c in self._chunks]
            self._free = list(self._chunks[-1].unbind(0)[len(self._chunks[-1]) - len(self._free):])[::-1]
        if not self._free:
            rows = min(16 << len(self._chunks), 256)
            chunk = row.new_empty((rows, self.width), dtype=self._chunks[-1].dtype if self._chunks else row.dtype)
            self._chunks.append(chunk)
            self._free = list(chunk.unbind(0))[::-1]
        self._free.pop().copy_(row)  # rows are 1-d, (C,)
        self._size += 1

    def numpy(self) -> np.ndarray:
        """The rows as a float64 NumPy array ``(calls, C)``, a copy."""
        if not self._chunks:
            return np.zeros((0, self.width))
        return torch.cat(self._chunks)[: self._size].to("cpu", torch.float64).numpy()


class Collector:
    """Per-layer float64 moments of a BN layer's input: pooled with Chan's formula, and per call.

    A stock layer (PyTorch's ``forward`` or that of bnkit's drop-in layers, their extras set aside, see
    :func:`bnkit.torch.modules.has_stock_forward`; or that of bnkit's ``FrozenBatchNorm*d``, BatchNorm's eval
    transform on buffers) gets, for the pass, an
    instance ``forward`` that normalizes each call with the batch's own mean and biased
    variance (what training mode normalizes with; torch/nn/modules/batchnorm.py
    ``_BatchNorm.forward``) and keeps the call's moments; its buffers, ``momentum`` and
    flags are never touched:

    * float32/float64 inputs with up to :data:`_KERNEL_STATS_MAX_VALUES` values per channel
      and sample or :data:`_KERNEL_STATS_MAX_NUMEL` in all, and at most
      :data:`_KERNEL_STATS_MAX_COUNT` per channel: PyTorch's training-mode kernel without
      running buffers (``native_batch_norm``), which returns the mean and
      ``1 / sqrt(var + eps)`` it used;
    * other contiguous float32/float64 inputs on the CPU of up to :data:`_ROWS_MAX_VALUES` values per
      channel and sample and :data:`_ROWS_MAX_NUMEL` in all (and parameters of their dtype):
      :func:`_channel_rows` (two-pass), then PyTorch's eval kernel with those moments for the running ones;
    * otherwise :func:`_centred` (two-pass), whose centred copy is then scaled and shifted
      in place, ``(x - mean) * weight / sqrt(var + eps) + bias`` (float16/bfloat16 inputs in float32, rounded to
      their dtype once: their variance may exceed float16's range), and a channel with ``var + eps == 0`` (eps 0)
      scaled by 0, as PyTorch's kernels do. Layers with eps 0 always take this path.

    Every call keeps its mean and variance; on the kernel path the variance is recovered
    from ``1 / sqrt(var + eps)`` in float64 when the calls are pooled, to within about
    ``4e-7 (var + eps)`` for float32 inputs (so far worse than that relative to a
    variance much below ``eps``; every use of it in the audit adds ``eps`` back). Layers
    with their own ``forward`` run in training mode without tracking, and their input is
    reduced after the call (a frozen one still normalizes with its buffers).
    """

    def __init__(self, bn: _BatchNorm | FrozenBatchNormNd, clock: PassClock | None = None, name: str = "") -> None:
        """``clock``: shared by the collectors of one pass (see :class:`PassClock`); ``name``: the layer's, for
        errors."""
        self.name = name
        self.moments = RunningMoments(channels(bn))
        self._clock = clock if clock is not None else PassClock()
        self.order: list[int] = []  # each call's number on the clock
        self.batch_of: list[int] = []  # each call's data batch
        self.positions: list[int] = []  # each call's place among the layer's calls in its forward (empty ones too)
        self._calls_in: dict[int, int] = {}  # calls per data batch, empty and unmatched ones included
        self._sampled: set[int] = set()  # data batches with a call measured or given no rows
        # a frozen layer's stock forward is BatchNorm's eval transform: the stand-in replaces it as it does PyTorch's
        self.stock = has_stock_forward(bn) or (not is_batchnorm(bn) and has_stock_eval_forward(bn))
        self.eps = float(bn.eps)
        self.samples: list[tuple[int, int, bool]] = []  # (batch size, values per channel, spread is invstd)
        self.far = _far_from_zero(bn)  # its calls are shifted by a value of their data (see _far_from_zero)
        self.offsets = CallRows(channels(bn))  # each call's shift where ``far``, zeros for calls not shifted
        self._shift: torch.Tensor | None = None  # the running call's
        self.unmatched = 0  # calls measure() got no input with the layer's channels on axis 1 for
        self.means = CallRows(channels(bn))
        self.spreads = CallRows(channels(bn))  # biased variance, or 1 / sqrt(var + eps) from the kernel
        self._stacked: tuple[np.ndarray, ...] | None = None

    def attach(self, bn: _BatchNorm | FrozenBatchNormNd) -> Callable[[], None]:
        """Put the layer on batch statistics for the pass (a frozen one with its own ``forward``: measure it only);
        returns what undoes it. A layer with its own ``forward`` is measured through :meth:`measure`, which the
        pass calls with what the layer normalizes (:class:`bnkit.torch.modules.normalized_inputs`); the pass
        restores its flags."""
        if self.stock:
            bn.forward = self._stand_in(bn)  # an instance attribute: shadows the class's forward
            return lambda: vars(bn).pop("forward", None)
        if is_batchnorm(bn):  # a frozen layer's own forward uses its buffers whatever its flags
            bn.training, bn.track_running_stats = True, False
        return lambda: None

    @property
    def data_sizes(self) -> np.ndarray | None:
        """Each call's data batch size (float64), or None where the pass did not set them (a collector alone)."""
        sizes = [self._clock.sizes.get(b) for b in self.batch_of]
        return None if None in sizes else np.asarray(sizes, dtype=np.float64)

    @property
    def called_samples(self) -> float | None:
        """The data samples of the batches with a call of the layer measured or given no rows (None where unknown,
        or where every call was unmatched)."""
        sizes = [self._clock.sizes.get(b) for b in self._sampled]
        return None if not sizes or None in sizes else float(sum(sizes))

    @property
    def calls_per_forward(self) -> int:
        """The most calls one forward of the pass made of the layer, empty ones included."""
        return max(self._calls_in.values(), default=0)

    def _next_position(self, sampled: bool = True) -> int:
        """Count one call of the layer in the running data batch; its place among them (from 0). ``sampled``: the
        call was measured or given no rows (not an unmatched one), so the batch counts in :attr:`called_samples`."""
        batch = self._clock.batch
        if sampled:
            self._sampled.add(batch)
        self._calls_in[batch] = self._calls_in.get(batch, 0) + 1
        return self._calls_in[batch] - 1

    def skip_empty(self) -> None:
        """A call with no values (a routed branch given no rows): counted for the positions, not measured."""
        self._next_position()

    @property
    def once_per_forward(self) -> bool:
        """No forward of the pass gave the layer values more than once (its measured calls then differ by sampling
        alone; a routed call given no rows does not count)."""
        return len(set(self.batch_of)) == len(self.batch_of)

    def _record(self, x: torch.Tensor, n: int, mean: torch.Tensor, spread: torch.Tensor, invstd: bool) -> None:
        if x.shape[1] != self.means.width:  # before anything counts the call
            raise ValueError(f"BatchNorm layer {self.name or '(root)'!r} has {self.means.width} channels but its "
                             f"input has {x.shape[1]} on axis 1 (shape {tuple(x.shape)})")
        self.means.append(mean)
        self.spreads.append(spread)
        if self.far:
            self.offsets.append(self._shift if self._shift is not None else torch.zeros_like(mean))
        self.samples.append((x.shape[0], n, invstd))
        number, batch = self._clock.tick()
        self.order.append(number)
        self.batch_of.append(batch)
        self.positions.append(self._next_position())

    def _stand_in(self, bn: _BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        eps, check = self.eps, bn._check_input_dim  # the layer's own rank check, as its forward starts with

        # PyTorch's kernels are called as torch.batch_norm, never F.batch_norm, which normalized_inputs watches to
        # learn what a layer with its own forward normalizes: that layer may have called this one
        def forward(input: torch.Tensor) -> torch.Tensor:  # PyTorch's parameter name: bn(input=x) works
            x = input
            check(x)
            if not x.numel():  # a routed branch given no rows: nothing to measure; PyTorch's kernel gives the output
                self.skip_empty()
                return torch.batch_norm(x, bn.weight, bn.bias, None, None, True, 0.0, eps, False)
            if self.far and self._shift is None:  # moments about a value of the data (see _far_from_zero)
                return self._shifted(forward, x)
            n = x.numel() // x.shape[1]
            if (eps > 0 and n <= _KERNEL_STATS_MAX_COUNT  # eps 0: invstd 0 is both var 0 and var inf
                    and (n // x.shape[0] <= _KERNEL_STATS_MAX_VALUES or x.numel() <= _KERNEL_STATS_MAX_NUMEL)
                    and x.dtype in (torch.float32, torch.float64) and x.device.type in _KERNEL_STATS_DEVICES):
                out, mean, invstd = torch.native_batch_norm(x, bn.weight, bn.bias, None, None, True, 0.0, eps)
                self._record(x, n, mean, invstd, True)
                return out
            if (eps > 0 and x.device.type in _ROWS_DEVICES and n // x.shape[0] <= _ROWS_MAX_VALUES
                    and x.numel() <= _ROWS_MAX_NUMEL and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()
                    and (bn.weight is None or bn.weight.dtype == x.dtype)):
                n, mean, var = _channel_rows(x)
                self._record(x, n, mean, var, False)
                return torch.batch_norm(x, bn.weight, bn.bias, mean, var, False, 0.0, eps, False)  # batch moments
            n, mean, var, d = _centred(x)
            self._record(x, n, mean, var, False)
            # normalize the centred copy in place; in-place tiny ops: each costs its call overhead
            scale = var.add(eps).rsqrt_()
            if eps <= 0:  # a zero-variance channel: PyTorch's kernels scale it by 0 (output beta), not inf (NaN)
                scale.masked_fill_(var.add(eps) <= 0, 0.0)
            if bn.weight is not None:
                scale.mul_(bn.weight.to(d.dtype))
            d.mul_(scale.unsqueeze(1))
            if bn.bias is not None:
                d.add_(bn.bias.to(d.dtype).unsqueeze(1))
            return d.view(x.shape).to(x.dtype)  # float16/bfloat16: normalized in float32, rounded once

        return forward

    def _shifted(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``forward`` (the stand-in) on ``x - mean`` (:func:`_far_from_zero`; float16/bfloat16 inputs as they are,
        a shift rounded in their precision would lose the data), the shift kept for :meth:`stacked`."""
        shift = _channel_means(x) if x.dtype in (torch.float32, torch.float64) else None
        self._shift = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device) if shift is None else shift
        try:
            return forward(x if shift is None else _less(x, shift))
        finally:
            self._shift = None

    def measure(self, x: torch.Tensor | None) -> None:
        """Keep the moments of one input normalized by a layer with its own ``forward`` (an empty one: none; None,
        or one without the layer's channels on axis 1, such as ``(N, L, C)``: none, counted in :attr:`unmatched`)."""
        if x is None or x.dim() < 2 or x.shape[1] != self.means.width:
            self.unmatched += 1
            self._next_position(sampled=False)
            return
        if x.numel():
            if self.far:  # see _far_from_zero; reduced in float32 at least, as _centred does
                x = x.detach() if x.dtype in (torch.float32, torch.float64) else x.detach().float()
                self._shift = _channel_means(x)
                x = _less(x, self._shift)
            try:
                n, mean, var, _ = _centred(x)
                self._record(x, n, mean, var, False)
            finally:
                self._shift = None
        else:
            self.skip_empty()

    def stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every call's batch size, count, mean and biased variance.

        Float64 arrays shaped ``(K,)``, ``(K,)``, ``(K, C)``, ``(K, C)`` for ``K`` calls.

        Calls that kept ``1 / sqrt(var + eps)`` get :func:`_var_from_invstd`.
        """
        if self._stacked is None:
            sizes = np.array(self.samples, dtype=np.float64).reshape(-1, 3)
            means, var = self.means.numpy(), self.spreads.numpy()
            if self.far:  # the calls' means were taken about their shifts
                means += self.offsets.numpy()
            kernel = sizes[:, 2] == 1
            if kernel.any():
                var[kernel] = _var_from_invstd(var[kernel], self.eps)
            var[sizes[:, 1] == 1] = 0.0  # one value per channel: exactly 0, not invstd's rounding remainder
            self._stacked = (sizes[:, 0], sizes[:, 1], means, var)
        return self._stacked

    def pool(self) -> RunningMoments:
        """The calls' ``(count, mean, M2)`` merged in float64 by Chan's formula for K partials.

        ``mean = sum n_k m_k / N``, ``M2 = sum n_k var_k + sum n_k (m_k - mean)^2``: the pairwise
        update of :class:`bnkit.stats.RunningMoments` applied to all calls at once (each
        weighted sum one matrix-vector product). Nothing is pooled (count 0) when the result
        is not finite: see :meth:`first_nonfinite_call`.
        """
        if self.means and self.moments.count == 0:
            _, counts, means, var = self.stacked()
            with np.errstate(over="ignore", invalid="ignore"):  # NaN/Inf calls, or sums beyond float64
                total, mean, m2 = pool_calls(counts, means, var)
            if np.isfinite(mean).all() and np.isfinite(m2).all():
                self.moments.update_moments(total, mean, m2)
        return self.moments

    def first_nonfinite_call(self) -> int:
        """For a layer :meth:`pool` could not pool: the clock number of its first call with NaN/Inf
        statistics, or of its first call if only their pooled sums overflow float64."""
        _, _, means, var = self.stacked()
        bad = ~(np.isfinite(means).all(axis=1) & np.isfinite(var).all(axis=1))
        return self.order[int(np.argmax(bad))]  # argmax of all False: the first call

    def batch_vars(self) -> np.ndarray:
        """Each call's unbiased variance, float64, ``(calls, C)``."""
        _, counts, _, var = self.stacked()
        return var * (counts / np.maximum(counts - 1, 1))[:, None]
