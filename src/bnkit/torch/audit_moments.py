"""Per-layer float64 moments of every BatchNorm input during the audit's batch-statistics pass.

Each BN call normalizes with its batch's own statistics, as in training, without
updating anything the audit does not restore; the call's ``(count, mean, M2)`` is kept
and pooled in float64 by Chan's formula (:class:`bnkit.stats.RunningMoments`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..stats import RunningMoments


def _moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(count, mean, M2)`` per channel (axis 1) of one batch, two-pass, at least float32.

    Sums over an ``(N, C, -1)`` view, then ``sum((x - mean)^2)``: several times faster on
    CPU than ``torch.var_mean`` over ``(0, 2, 3)`` or a training-mode ``F.batch_norm``.
    """
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if x.ndim == 2:
        n = x.shape[0]
        mean = x.sum(0) / n
        d = x - mean
        return n, mean, d.mul_(d).sum(0)
    xv = x.reshape(x.shape[0], x.shape[1], -1)
    n = xv.shape[0] * xv.shape[2]
    mean = xv.sum(2).sum(0) / n
    d = xv - mean[:, None]
    return n, mean, d.mul_(d).sum(2).sum(0)


#: Up to this many values per channel and sample, PyTorch's training kernel computes the batch
#: moments faster than :func:`_moments` does (BatchNorm1d on ``(N, C)``, tiny feature maps).
_KERNEL_STATS_MAX_VALUES = 4


class Collector:
    """Per-layer float64 moments of a BN layer's input: pooled with Chan's formula, and per call.

    How a stock layer (``forward`` not overridden) normalizes a call with its batch's own
    statistics, without touching what :class:`bnkit.torch.audit_batches.Restore` will put back into its buffers:

    * large feature maps: the layer stays in eval mode and a forward pre-hook writes the
      batch's mean and biased variance (what training mode normalizes with) into its
      running buffers, so PyTorch's fast eval kernel applies them;
    * up to :data:`_KERNEL_STATS_MAX_VALUES` values per channel and sample: the call runs in
      training mode with ``momentum = 1``, so PyTorch's update ``r = (1 - m) r + m b``
      leaves exactly the batch mean and unbiased variance in the buffers, read after it.

    The layer's first call picks one of the two and drops the other hook.

    Layers with their own ``forward`` run in training mode without tracking, and their
    input is reduced after the call.
    """

    def __init__(self, bn: _BatchNorm) -> None:
        self.moments = RunningMoments(bn.num_features)
        self.stock = type(bn).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward)
        self.samples: list[tuple[int, int]] = []  # (batch size, values per channel)
        self.means: list[torch.Tensor] = []
        self.m2: list[torch.Tensor] = []
        self._kernel_call: bool | None = None
        self._handles: list[Any] = []

    def attach(self, bn: _BatchNorm) -> list[Any]:
        """Put the layer on batch statistics for the pass; returns the hook handles."""
        if self.stock:
            bn.momentum, bn.track_running_stats = 1.0, True
            bn.running_mean.zero_()  # scratch space from here on; (1 - 1) * NaN would stay NaN
            bn.running_var.fill_(1.0)
            self._handles = [bn.register_forward_pre_hook(self._before), bn.register_forward_hook(self._after_kernel)]
        else:
            bn.training, bn.track_running_stats = True, False
            self._handles = [bn.register_forward_hook(self._after)]
        return self._handles

    def _record(self, x: torch.Tensor, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        self.samples.append((x.shape[0], n))
        self.means.append(mean)
        self.m2.append(m2)

    def _before(self, module: _BatchNorm, args: tuple) -> None:
        x = args[0]
        if self._kernel_call is None:  # the first call picks the faster way; either is exact
            self._kernel_call = x.numel() // (x.shape[0] * x.shape[1]) <= _KERNEL_STATS_MAX_VALUES
            module.training = self._kernel_call
            self._handles[0 if self._kernel_call else 1].remove()
            if self._kernel_call:
                return
        n, mean, m2 = _moments(x)
        self._record(x, n, mean, m2)
        module.running_mean.copy_(mean)
        module.running_var.copy_(m2 / n)  # training mode normalizes with the biased variance

    def _after_kernel(self, module: _BatchNorm, args: tuple, output: Any) -> None:
        x = args[0]
        n = x.numel() // x.shape[1]
        var = module.running_var.to(torch.float64, copy=True)  # unbiased; copies, the next call overwrites
        self._record(x, n, module.running_mean.to(torch.float64, copy=True), var * (n - 1))

    def _after(self, module: _BatchNorm, args: tuple, output: Any) -> None:
        self._record(args[0], *_moments(args[0]))

    def pool(self) -> RunningMoments:
        """The calls' ``(count, mean, M2)`` merged in float64 by Chan's formula for K partials.

        ``mean = sum n_k m_k / N``, ``M2 = sum M2_k + sum n_k (m_k - mean)^2``: the pairwise
        update of :class:`bnkit.stats.RunningMoments` applied to all calls at once.
        """
        if self.means and self.moments.count == 0:
            counts = np.array([n for _, n in self.samples], dtype=np.float64)[:, None]
            means = torch.stack(self.means).double().cpu().numpy()
            total = counts.sum()
            mean = (counts * means).sum(0) / total
            m2 = torch.stack(self.m2).double().cpu().numpy().sum(0) + (counts * (means - mean) ** 2).sum(0)
            self.moments.update_moments(int(total), mean, m2)
        return self.moments

    def batch_vars(self) -> torch.Tensor:
        """Each call's unbiased variance, float64, ``(calls, C)``."""
        counts = torch.tensor([max(n - 1, 1) for _, n in self.samples], dtype=torch.float64)[:, None]
        return torch.stack(self.m2).double().cpu() / counts
