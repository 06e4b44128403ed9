"""Exact population statistics for every BatchNorm layer, in one pass, atomically.

:func:`recalibrate` runs ``data`` through the model once with only the BatchNorm
layers normalizing by batch statistics (as in training) and sets each layer's
``running_mean`` / ``running_var`` to the exact mean and variance of *all* the
values its input took over the pass (per channel: every sample and every
spatial position). Each standard BN layer gets a stand-in forward for the pass
that reduces its input once, on its device, with shifted sums finished in
float64 (:func:`_batch_moments`: ``M2 = sum((x - c)**2)`` around ``c`` near the
mean, never ``E[x**2] - E[x]**2``; small inputs, and on CUDA those up to
``_UPCAST_DEVICE_MAX`` values, upcast to float64 and reduced by PyTorch's
kernel), and normalizes with exactly those statistics, so on the CPU a BN call
costs about what PyTorch's training-mode forward does (on a GPU, where kernel
launches set the cost, more: see README). The statistics stay on the device;
every ``_FOLD_EVERY`` batches they move to the host in one transfer, and the
batches, then the ranks, are combined with Chan's parallel formula
(:class:`bnkit.stats.RunningMoments`)::

    n = n_a + n_b,  d = mean_b - mean_a
    mean = mean_a + d * n_b / n,   M2 = M2_a + M2_b + d**2 * n_a * n_b / n

so each layer's result is weighted by sample count and, for the values its input took, does not depend on
how they were split into batches or across processes. Those values do, for a layer after another BN: the
upstream layers normalize with each batch's own statistics during the pass, as in training (batches of 32
moved a digits MLP's second BN by 7e-3 std against one batch holding all the data; 256: 1.4e-3). A pass in
one batch gives the statistics eval mode would see but for a factor of about ``n / (n - 1)`` in the variance of
a layer after another BN: that one normalizes with its biased batch variance during the pass and with the
unbiased running one in eval mode (5.6e-4 for the 1797 digits).

Why the peers are not exact (sources read from the real code):

* ``torch.optim.swa_utils.update_bn`` (pytorch/pytorch, torch/optim/swa_utils.py)
  resets the buffers and sets ``momentum=None``, i.e. PyTorch's cumulative
  average ``running += (batch_stat - running) / num_batches_tracked``
  (torch/nn/modules/batchnorm.py, ``_BatchNorm.forward``). That is an average
  *per batch*, not per sample: a last batch of 3 weighs as much as a batch of
  256. Its variance is the mean of the within-batch unbiased variances, which
  misses the spread of the batch means, so it is biased low whenever batches are
  not i.i.d. (data ordered by class, domain or video). It calls ``model.train()``,
  switching on Dropout (and any other train-only behaviour) for the pass, and
  afterwards ``model.train(was_training)`` sets *every* submodule to the top
  module's flag, losing a mix of train/eval submodules. It is not atomic: an
  exception mid-pass leaves reset or half-accumulated statistics.
* fvcore's ``update_bn_stats`` (facebookresearch/fvcore, fvcore/nn/precise_bn.py)
  reads each batch's statistics back from the buffers after forcing
  ``momentum=1.0``. Older releases average the per-batch means and variances
  with equal weight (the "true average of per-batch mean/variance" of its
  docstring; ``_MeanOfBatchVarianceEstimator``), with update_bn's flaws. The
  current release (``_PopulationVarianceEstimator``) weights by batch size but
  forms ``var = E[x**2] - E[x]**2`` in the buffers' float32, which cancels
  catastrophically when ``|mean| >> std``, and stores that *biased* variance in
  ``running_var``. It only touches BN layers the caller already put in training
  mode, asserts on a BN layer used twice per forward, requires exactly
  ``num_iters`` batches, leaves ``num_batches_tracked`` counting its passes, and
  restores nothing if it fails. Neither peer merges statistics across processes.
* Both read each batch's statistics from PyTorch's BN kernel; on CPU its
  ``(N, C)`` path accumulates in float32 (measured with torch 2.13: the batch
  mean off by 2e-2 std at ``|mean| / std = 1e4``, where the shifted sums here
  are exact to 1e-8).

Conventions written into the buffers:

* ``running_var = M2 / (n - 1)``, the *unbiased* variance, because that is what
  PyTorch defines the buffer to hold: in training ``_BatchNorm`` normalizes with
  the biased batch variance but feeds the running average with the unbiased
  one (torch/nn/modules/batchnorm.py docs, aten/src/ATen/native/Normalization.cpp),
  and in eval it divides by ``sqrt(running_var + eps)`` as stored. Writing the
  biased ``M2 / n`` would make recalibrated buffers disagree with what training
  produces and with what folding/ONNX export read; the two differ by ``n/(n-1)``.
  bnkit's drop-in layers with ``running_var_rule="biased"`` (Keras/Flax/ONNX's
  rule, e.g. from ``from_keras(exact_training=True)``) get ``M2 / n``, what their
  own training writes.
* ``num_batches_tracked``, with ``k`` the forward calls the layer received in the
  pass (over all ranks, skipped batches excluded): ``k`` for a cumulative average
  (``momentum=None``, or a drop-in layer's ``debias=True`` with ``momentum=0``),
  whose next update weighs ``1/(num_batches_tracked + 1)``, so continued averaging
  treats the recalibrated statistics as the average of ``k`` batches
  (``torch.optim.swa_utils.update_bn`` leaves the same). Otherwise PyTorch reads
  the counter nowhere and it goes on counting training-mode calls, as training on
  the same batches would: ``+ k`` in one process, ``+`` the most calls of one rank
  under ``torch.distributed`` (each rank counts its own; one value keeps the
  buffers identical on every rank). It is the step of a drop-in layer's
  ``renorm_schedule`` and the ``t`` of its ``debias``, which must not restart.
"""
from __future__ import annotations

import itertools
import time
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..findings import Finding
from ..stats import RunningMoments
from .io import LOAD_REAL_WEIGHTS, refuse_meta
from .layers import _DropInBatchNorm, is_cumulative
from .modules import (SavedState, arrays_as_tensors, at_most, channels, check_channel_tensors, eager_calls,
                      eager_modules, has_stock_forward, input_dtype_device, is_batchnorm, is_bn_or_frozen,
                      is_whole_number, normalized_inputs, parallel_device, restored_after_each_call, sole_device,
                      to_device, uninitialized_lazy, unwrapped, usable_device)

__all__ = ["recalibrate", "RecalibrationReport", "LayerRecalibration", "StatisticsRangeError"]

#: Batches whose statistics wait on the device before being moved to the host
#: and folded in (one device-to-host transfer per this many batches).
_FOLD_EVERY = 64

#: A pass shows its progress bar once it has run this many seconds (short passes stay quiet).
_PROGRESS_AFTER = 1.0

#: Inputs with at most this many values are reduced by upcasting to float64 (see _batch_moments) ...
_SMALL = 1 << 16
#: ... and every input on these devices, where kernel launches rather than the upcast set the cost: the
#: shifted sums launch about 16 kernels per call, the upcast path 2 (on an H200, recalibrating a small
#: ResNet on 32x32 images took 3.1x plain forwards with the shifted sums) ...
_UPCAST_DEVICES = ("cuda",)
#: ... up to this many values: the float64 copy is transient but twice the float32 input (512 MiB here);
#: larger inputs, where the launches no longer matter, take the shifted sums, whose temporary is the input's size.
_UPCAST_DEVICE_MAX = 1 << 26

@dataclass
class LayerRecalibration:
    """What recalibration did to one BatchNorm layer.

    ``count`` is the number of values per channel (samples times spatial
    positions); ``samples`` the number of samples (sum of the batch dimension);
    ``calls`` the forward calls folded in (see the module doc for ``num_batches_tracked``).
    A layer with ``count == 0`` is left unchanged: never reached, or (``unread``) reached only in calls of its own
    forward with no input to measure (see :func:`recalibrate`'s warnings).
    """

    name: str
    calls: int
    samples: int
    count: int
    old_mean: np.ndarray
    old_var: np.ndarray
    new_mean: np.ndarray
    new_var: np.ndarray
    eps: float
    unread: bool = False

    @property
    def updated(self) -> bool:
        return self.count > 0

    @property
    def mean_shift(self) -> float:
        """Largest ``|new_mean - old_mean| / sqrt(old_var + eps)``: the shift in old standard deviations (NaN where
        the old variance was negative, inf where ``old_var + eps`` was 0: a damaged layer, no warning)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.max(np.abs(self.new_mean - self.old_mean) / np.sqrt(self.old_var + self.eps)))

    @property
    def var_ratio(self) -> tuple[float, float]:
        """Smallest and largest ``(new_var + eps) / (old_var + eps)`` over channels (inf or NaN where the old
        ``var + eps`` was 0, as for :attr:`mean_shift`)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (self.new_var + self.eps) / (self.old_var + self.eps)
        return float(ratio.min()), float(ratio.max())


@dataclass
class RecalibrationReport:
    """Result of :func:`recalibrate`: per-layer shifts and how much data was used.

    ``batches`` and ``skipped_batches`` are summed over all ranks;
    ``world_size`` is 1 without ``torch.distributed``.
    """

    layers: list[LayerRecalibration] = field(default_factory=list)
    batches: int = 0
    skipped_batches: int = 0
    world_size: int = 1

    @property
    def unused_layers(self) -> list[str]:
        """BatchNorm layers the data never reached (their statistics are unchanged)."""
        return [layer.name for layer in self.layers if not layer.updated and not layer.unread]

    @property
    def unread_layers(self) -> list[str]:
        """BatchNorm layers reached only in calls of their own forward with no input to measure (unchanged)."""
        return [layer.name for layer in self.layers if not layer.updated and layer.unread]

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per layer, for tables and JSON."""
        out = []
        for layer in self.layers:
            lo, hi = layer.var_ratio
            out.append({
                "layer": layer.name, "samples": layer.samples, "values_per_channel": layer.count,
                "max_mean_shift_std": layer.mean_shift, "var_ratio_min": lo, "var_ratio_max": hi,
            })
        return out

    def findings(self) -> list[Finding]:
        """The rows as :class:`bnkit.findings.Finding`: ``info`` per recalibrated layer, ``warning`` per unused one."""
        out = []
        for layer, row in zip(self.layers, self.rows()):
            if layer.updated:
                lo, hi = layer.var_ratio
                out.append(Finding(
                    "info", layer.name, "running statistics recomputed exactly",
                    evidence=f"{layer.samples} samples; mean moved {layer.mean_shift:.3g} old std; "
                             f"variance x{lo:.3g}..x{hi:.3g}",
                    code="recalibrated", data=row))
            else:
                skipped = (f", or only in the {self.skipped_batches} batch(es) skipped as non-finite"
                           if self.skipped_batches else "")
                out.append(Finding(
                    "warning", layer.name, "not reached by the data: statistics left unchanged",
                    evidence=f"no input values reached it in the batches used: not called, or called on empty "
                             f"inputs only{skipped}",
                    fix="feed data that takes this branch (or a forward= that calls it), or remove the layer",
                    code="recalibrate_unused", data=row))
        return out

    def __str__(self) -> str:
        lines = [
            f"recalibrated {sum(l.updated for l in self.layers)}/{len(self.layers)} BatchNorm layers from "
            f"{self.batches} batches ({self.skipped_batches} skipped) on {self.world_size} process(es)",
            f"{'layer':<32} {'samples':>9} {'|dmean|/std':>12} {'var new/old':>19}",
        ]
        for r in self.rows():
            ratio = f"{r['var_ratio_min']:.3g}..{r['var_ratio_max']:.3g}"
            lines.append(f"{r['layer']:<32} {r['samples']:>9} {r['max_mean_shift_std']:>12.4g} {ratio:>19}")
        return "\n".join(lines)


class StatisticsRangeError(ValueError):
    """The data gave a BatchNorm input NaN/Inf, or statistics beyond the range of the sums or of the layer's
    buffers: the run failed on what the data holds, not on how it was called; nothing was changed."""


class _NonFinite(Exception):
    """A batch produced NaN/Inf at a BatchNorm input (internal; becomes StatisticsRangeError)."""

    def __init__(self, batch: int, layer: int) -> None:
        super().__init__(batch, layer)
        self.batch, self.layer = batch, layer


def _f64(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64: on its device, or on the CPU for MPS, which has no float64."""
    return t.to("cpu", torch.float64) if t.device.type == "mps" else t.double()


def _batch_moments(x: torch.Tensor, shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float64 ``(mean - shift, biased variance)`` of a ``(N, C, *)`` tensor, on its device (MPS: the
    CPU, where ``shift``, float64 ``(C,)`` or None for 0, lies too).

    Small inputs (at most ``_SMALL`` values), where per-call overhead dominates,
    are upcast and reduced in one call to PyTorch's float64 BN statistics kernel
    (``torch.batch_norm_update_stats``: double accumulators, returns the mean and the
    biased variance). :class:`_Pass` inlines that path, and sends inputs on a CUDA
    device there too up to ``_UPCAST_DEVICE_MAX`` values (``_UPCAST_DEVICES``: there
    each kernel launch costs more than the upcast; the float64 copy is transient).
    Larger ones use shifted sums: with ``c`` the channel mean in the working
    precision, ``d = x - c``, ``S1 = sum(d)``, ``S2 = sum(d**2)``, finished in
    float64 as ``mean - shift = (c - shift) + S1/n`` and ``var = (S2 - S1**2/n) / n``. Only
    deviations from a value near the mean are summed, never ``x**2``, so no sum of
    squares cancels; the mean is returned relative to ``shift`` (a batch's own mean, whose rounding at its magnitude
    this measures, see :class:`_Pass`). The sums run over each sample's
    positions in the working precision (vectorized; a few float32 roundings of
    the spread) and over the batch in float64: variance to ~1e-7 relative, mean
    to ~1e-7 std, at float32 speed (upcasting every value to float64 costs ~20x
    more per element on CPU). Half/bfloat16 inputs are summed in float32.
    """
    xw = x.detach()
    if xw.numel() <= _SMALL:
        xs = _f64(xw) if shift is None else _f64(xw) - _channel_view(shift, x.dim())
        return torch.batch_norm_update_stats(xs, None, None, 0.0)
    dims = [0, *range(2, x.dim())]
    n = xw.numel() // xw.shape[1]
    c = xw.mean(dim=dims, keepdim=True, dtype=torch.float64 if xw.dtype == torch.float64 else torch.float32)
    d = xw - c  # float16/bfloat16 promote to float32 here: one temporary, no float32 copy of the input too

    def total(t: torch.Tensor) -> torch.Tensor:
        per_sample = t.sum(dim=dims[1:]) if len(dims) > 1 else t
        return _f64(per_sample).sum(dim=0)

    s1 = total(d)
    s2 = total(d.square_())
    step = s1 / n
    centre = _f64(c.flatten())
    return (centre if shift is None else centre - shift) + step, (s2 / n - step * step).clamp_min_(0.0)


def _channel_view(t: torch.Tensor, rank: int) -> torch.Tensor:
    """A ``(C,)`` tensor shaped to broadcast over the channel axis (1) of a rank-``rank`` input."""
    return t.view(-1, *([1] * (rank - 2)))


def _moments(x: torch.Tensor, shift: torch.Tensor | None, upcast: bool,
             stats: Callable = torch.batch_norm_update_stats) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_batch_moments`, with its float64 upcast path inlined where ``upcast`` (with a shift: in float64, x
    promoted; ``stats``: PyTorch's float64 statistics kernel, looked up once per layer)."""
    if upcast:
        return stats(x.double() if shift is None else x.detach() - _channel_view(shift, x.dim()), None, None, 0.0)
    return _batch_moments(x, shift)


#: A layer whose means lie more than this many std from 0 (some channel's, in the first batch finite at every layer)
#: keeps each batch's mean as two parts, see :class:`_Pass`; nearer 0, rounding a batch mean at its magnitude costs
#: the variance under ~1e-11.
_FAR_FROM_ZERO = 1e5


def _note_batch(exc: Exception, index: int, batch: Any, data: Any) -> None:
    """Note on ``exc`` (Python 3.11+; its type kept) which data batch the forward failed on, and, when ``data`` is
    a tuple or list of tensors, that each of them was taken for a batch: a single ``(inputs, targets)`` batch
    passed as ``data`` feeds the model its targets as the second batch."""
    if not hasattr(exc, "add_note"):
        return
    what = f"a tensor of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else type(batch).__name__
    note = f"recalibrate: the forward failed on data batch {index} ({what})"
    if one_xy_batch(data, index):
        note += ("; data is a pair of tensors, each taken for a batch: one (inputs, targets) batch goes in a list "
                 "of batches, [batch]")
    exc.add_note(note)


def one_xy_batch(data: Any, failed: int) -> bool:
    """Whether ``data``, whose batch ``failed`` made the forward fail, looks like one ``(inputs, targets)`` batch
    taken for two: a pair of tensors with one batch size, the second (the targets) being the one that failed."""
    return (isinstance(data, (tuple, list)) and len(data) == 2 and failed == 1
            and all(isinstance(b, (torch.Tensor, np.ndarray)) and b.ndim > 0 for b in data)
            and len(data[0]) == len(data[1]))


def _default_forward(model: nn.Module, batch: Any) -> Any:
    one = (torch.Tensor, nn.utils.rnn.PackedSequence)  # a PackedSequence (a namedtuple) is one input
    if isinstance(batch, one):
        return model(batch)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], one):
        return model(batch[0])
    raise TypeError(
        f"don't know how to feed a batch of type {type(batch).__name__} to the model: batches must be tensors or "
        "(inputs, ...) tuples, or pass forward=, e.g. forward=lambda model, batch: model(**batch)"
    )


def _distributed_world() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _gather_ranks(payload: np.ndarray | None, error: BaseException | None,
                  layers: list[tuple[str, nn.Module]] | None) -> list[np.ndarray]:
    """Every rank's float64 payload, in rank order, on every rank; ``payload`` is None where ``error`` is set.

    The ranks first exchange their outcomes and the shape of their models (the number of BN layers and a
    CRC-32 of their widths; ``layers`` None where the input checks failed before they were known). If any
    failed, every rank raises instead (no payload is sent): one with an error of its own re-raises it (noting
    another rank's non-finite batch); the others raise ``ValueError`` when the ranks' models differ (before
    anything else: another rank's layer index means nothing here), or for a non-finite batch on any rank, else
    ``RuntimeError`` naming the failed ranks.
    """
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    world = dist.get_world_size()
    # (0 done, 1 non-finite, 2 other error; the non-finite batch and layer; the number of BN layers and the
    # CRC-32 of their widths, -1 where unknown): float64 holds each exactly
    widths = None if layers is None else np.asarray([channels(m) for _, m in layers], dtype=np.int64)
    head = [0.0, -1, -1, -1 if widths is None else len(widths), -1 if widths is None else zlib.crc32(widths.tobytes())]
    if isinstance(error, _NonFinite):
        head[:3] = [1.0, error.batch, error.layer]
    elif error is not None:
        head[0] = 2.0
    local_head = torch.tensor(head, dtype=torch.float64, device=device)
    heads = [torch.empty_like(local_head) for _ in range(world)]
    dist.all_gather(heads, local_head)
    outcomes = [h.tolist() for h in heads]
    nonfinite = [(rank, int(h[1]), int(h[2])) for rank, h in enumerate(outcomes) if h[0] == 1.0]
    failed = [rank for rank, h in enumerate(outcomes) if h[0] == 2.0]
    if error is not None and not isinstance(error, _NonFinite):
        if nonfinite and hasattr(error, "add_note"):  # Python 3.11+
            rank, batch, _ = nonfinite[0]
            error.add_note(f"recalibrate: rank {rank} had a non-finite BatchNorm input too, in its batch {batch}")
        raise error
    if len({(h[3], h[4]) for h in outcomes if h[3] >= 0}) > 1:
        raise ValueError(
            "ranks hold models with different BatchNorm layers (" + ", ".join(
                f"rank {rank}: {int(h[3])}" for rank, h in enumerate(outcomes) if h[3] >= 0)
            + " layers, or layers of other widths); every rank must recalibrate the same architecture"
        )
    if nonfinite:
        rank, batch, layer = nonfinite[0]
        also = f" Recalibration also failed on rank(s) {failed} (see that rank's error)." if failed else ""
        raise StatisticsRangeError(_nonfinite_message(layers[layer][0], batch, rank) + also)
    if failed:
        raise RuntimeError(
            f"recalibration failed on rank(s) {failed} (see that rank's error); no statistics were changed"
        )
    local = torch.from_numpy(payload).to(device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return [g.cpu().numpy() for g in gathered]


class _Pass:
    """The per-layer instrumentation for one pass (stand-in forwards, pre-hooks) and its float64 accumulators.

    Each BN call appends one record ``(layer, count, samples, batch, mean, biased var, residual)``
    (statistics left on the device, no host sync); every ``_FOLD_EVERY`` batches
    :meth:`fold` moves them to the host in one transfer and merges them per layer. For a layer whose inputs lie
    far from 0 (:data:`_FAR_FROM_ZERO`; until a batch finite at every layer decides, every layer is taken as
    such), a batch mean is rounded at its magnitude (1.5e-8 at 1e8), and the
    spread of the batch means would carry that rounding into the variance (1e-7 of it at ``|mean| / std`` 1e8, batch
    means half a std apart): its records keep the ``residual``, the mean of ``x - mean`` (the variance is taken
    about the mean then too), and its accumulators hold the means less a ``reference``, the first kept batch's mean
    (chosen once the batches to leave out are known), added back once, when the buffers are written. Other layers
    (residual None, reference 0) skip that second reduction.
    """

    def __init__(self, layers: list[tuple[str, _BatchNorm]], skip_nonfinite: bool) -> None:
        self.layers = layers
        self.skip_nonfinite = skip_nonfinite
        self.widths = np.array([channels(m) for _, m in layers], dtype=np.int64)
        self.moments = [RunningMoments(c) for c in self.widths.tolist()]  # of the inputs less the layer's reference
        self.far: list[bool | None] = [None] * len(layers)  # per layer, decided by end_batch
        self.undecided_reached = False  # the batch running has called an undecided layer
        self.references: list[np.ndarray | None] = [None] * len(layers)  # the far layers' first kept batch means
        self.calls = np.zeros(len(layers), dtype=np.int64)
        self.samples = np.zeros(len(layers), dtype=np.int64)
        self.batches = 0
        self.skipped = 0
        self.records: list[tuple[int, int, int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.batch_index = 0  # batches run so far (the one running now)
        self.rank_calls: np.ndarray | None = None  # after merge_ranks: per layer, the most calls of one rank
        self.folded = 0  # batches folded so far

    def recorder(self, index: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """``record(x)``: check and reduce one input of layer ``index``, keep its statistics; returns them,
        the float64 ``(mean, biased variance)``, or None for an input with no values (ignored)."""
        name, module = self.layers[index]
        width, append, stats = channels(module), self.records.append, torch.batch_norm_update_stats

        def record(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
            shape = x.shape
            if len(shape) < 2 or shape[1] != width:
                raise ValueError(
                    f"BatchNorm layer {name!r} has {width} channels but got input of shape "
                    f"{tuple(shape)} in batch {self.batch_index}"
                )
            count = x.numel() // width
            if count < 2:
                if count == 0:  # an empty input (a routed branch given no rows): no statistics, and not counted
                    # in num_batches_tracked (PyTorch's forward counts it; a cumulative count stays batches averaged)
                    return None
                raise ValueError(
                    f"BatchNorm layer {name!r} got input of shape {tuple(shape)} in batch {self.batch_index}: "
                    "one value per channel cannot be normalized in training mode; use batches of at least 2 "
                    "(e.g. DataLoader(..., drop_last=True))"
                )
            size = count * width
            upcast = (size <= _SMALL and x.device.type != "mps") or (
                x.device.type in _UPCAST_DEVICES and size <= _UPCAST_DEVICE_MAX)
            mean, var = _moments(x, None, upcast, stats)
            residual, far = None, self.far[index]
            if far is not False:  # far, or undecided (end_batch decides): the mean's rounding at its magnitude
                residual, var = _moments(x, mean, upcast, stats)  # measured, a second reduction, of x - mean
                self.undecided_reached = self.undecided_reached or far is None
            append((index, count, shape[0], self.batch_index, mean, var, residual))
            return mean, var

        return record

    def forward(self, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """A stand-in forward for a standard BN layer: reduce once, normalize with those statistics.

        Same output as the layer's training-mode forward (biased batch variance),
        without reducing the input a second time in PyTorch's kernel.
        """
        module = self.layers[index][1]
        check, record, batch_norm = module._check_input_dim, self.recorder(index), torch.batch_norm
        weight, bias, eps, dtype = module.weight, module.bias, module.eps, module.running_mean.dtype
        cudnn = torch.backends.cudnn.enabled
        low = dtype.itemsize < 4  # float16/bfloat16: a variance above 65504 would be inf; normalize in float32
        if low:
            weight, bias = (None if p is None else p.float() for p in (weight, bias))
        stats = torch.float32 if low else dtype

        def forward(input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - PyTorch's name: bn(input=x) works too
            check(input)
            moments = record(input)
            if moments is None:  # no values: an empty output, as PyTorch's training forward gives
                return input.clone()
            mean, var = moments
            device = input.device  # MPS: the statistics were finished on the CPU
            x = input.float() if low else input
            out = batch_norm(x, weight, bias, mean.to(device, stats), var.to(device, stats), False, 0.0, eps, cudnn)
            return out.to(input.dtype) if low else out

        return forward

    def end_batch(self) -> None:
        if self.undecided_reached:
            self._decide_far()
        self.batch_index += 1
        if self.batch_index - self.folded >= _FOLD_EVERY:
            self.fold()

    def _decide_far(self) -> None:
        """Decide which undecided layers the batch just run finds far from 0 (:data:`_FAR_FROM_ZERO`; a layer
        called twice: far if either call is), where its statistics are finite at every layer: a batch
        ``on_nonfinite='skip'`` leaves out decides nothing (its values at one layer may be garbage). One host sync
        per batch that reaches an undecided layer."""
        self.undecided_reached = False
        mine = list(itertools.takewhile(lambda r: r[3] == self.batch_index, reversed(self.records)))
        finite = [torch.isfinite(r[4]).all() & torch.isfinite(r[5]).all() for r in mine]
        far = [(r[4].abs() > _FAR_FROM_ZERO * r[5].sqrt()).any() for r in mine]
        try:
            flags = torch.stack([*finite, *far]).tolist()  # one transfer
        except RuntimeError:  # layers on several devices (a model spread over devices)
            flags = [bool(f) for f in (*finite, *far)]
        if not all(flags[:len(mine)]):
            return
        undecided = {r[0] for r in mine if self.far[r[0]] is None}
        for i in undecided:
            self.far[i] = False
        for r, is_far in zip(mine, flags[len(mine):]):
            if r[0] in undecided and is_far:
                self.far[r[0]] = True

    def fold(self) -> None:
        """Merge the pending records into the accumulators: per layer, all its records at once.

        For the ``K`` records ``(n_k, mean_k, var_k)`` of a layer (Chan's pairwise
        formula unrolled over ``K`` partials; no ``E[x**2]`` anywhere)::

            n = sum n_k,   mean = mean_1 + sum n_k (mean_k - mean_1) / n,
            M2 = sum n_k var_k + sum n_k (mean_k - mean)**2

        then folded into the layer's :class:`RunningMoments` with Chan's formula.
        A batch with a non-finite statistic at any layer raises :class:`_NonFinite`
        (the first such batch, the first layer it reached) or is left out whole.
        """
        records = list(self.records)
        self.records.clear()
        ended, self.folded = self.batch_index - self.folded, self.batch_index
        if not records:
            self.batches += ended
            return
        # records grouped by layer (stably: batch order within a layer), so each layer's block is one (K, C) view
        order = sorted(range(len(records)), key=lambda r: records[r][0])
        index, count, samples, batch = (np.asarray(v) for v in zip(*(records[r][:4] for r in order)))
        stats = [records[r][4] for r in order] + [records[r][5] for r in order]
        try:
            flat = torch.cat(stats).cpu().numpy()  # one device-to-host transfer
        except RuntimeError:  # statistics on several devices (a model spread over devices)
            flat = torch.cat([t.cpu() for t in stats]).numpy()
        widths = self.widths[index]
        starts = np.cumsum(widths) - widths
        half = int(widths.sum())
        bad = np.logical_or.reduceat(~np.isfinite(flat[:half]) | ~np.isfinite(flat[half:]), starts)
        keep = None
        if bad.any():
            bad_batches = np.unique(batch[bad])
            if not self.skip_nonfinite:  # in call order: the first bad batch, the first layer it reached
                first = min(r for r, b in zip(order, bad.tolist()) if b)
                raise _NonFinite(records[first][3], records[first][0])
            keep = ~np.isin(batch, bad_batches)
            self.skipped += len(bad_batches)
            ended -= len(bad_batches)
        self.batches += ended
        layer_ids, firsts, sizes = np.unique(index, return_index=True, return_counts=True)
        for i, first, k in zip(layer_ids.tolist(), firsts.tolist(), sizes.tolist()):
            c, rows = int(self.widths[i]), slice(first, first + k)
            start = int(starts[first])
            mean_k = flat[start:start + k * c].reshape(k, c)
            var_k = flat[half + start:half + start + k * c].reshape(k, c)
            n_k, s_k = count[rows], samples[rows]
            residuals = [records[r][6] for r in order[first:first + k]]
            if keep is not None:
                mean_k, var_k, n_k, s_k = mean_k[keep[rows]], var_k[keep[rows]], n_k[keep[rows]], s_k[keep[rows]]
                residuals = [r for r, kept in zip(residuals, keep[rows].tolist()) if kept]
                if len(n_k) == 0:
                    continue
            if self.far[i]:  # each mean as (mean - reference) + residual; the reference: the first kept batch's mean
                if self.references[i] is None:
                    self.references[i] = mean_k[0].copy()
                residual = np.zeros_like(mean_k)  # 0 for a record without one (recorded while found near 0)
                if measured := [j for j, r in enumerate(residuals) if r is not None]:
                    residual[measured] = torch.stack([residuals[j] for j in measured]).cpu().numpy()
                mean_k = (mean_k - self.references[i]) + residual
            n, w = int(n_k.sum()), n_k.astype(np.float64)
            mean = mean_k[0] + w @ (mean_k - mean_k[0]) / n
            dev = mean_k - mean
            with np.errstate(over="ignore"):  # refused by _update, with the layer's name
                m2 = w @ var_k + w @ (dev * dev)
            self._update(self.moments[i], i, n, mean, m2, "merged")  # activations near 1e150
            self.calls[i] += len(n_k)
            self.samples[i] += int(s_k.sum())
            if self.far[i] is False and (np.abs(mean_k) > _FAR_FROM_ZERO * np.sqrt(var_k)).any():
                self._now_far(i)

    def _now_far(self, i: int) -> None:
        """Layer ``i``, found near 0 by its first batch, has batches far from it: later batches measure their
        means' rounding, merged relative to the mean so far (the batches merged until now stay as they were)."""
        self.far[i] = True
        moments = self.moments[i]
        self.references[i] = moments.mean.copy()
        self.moments[i] = RunningMoments(moments.num_channels)
        self.moments[i].update_moments(moments.count, np.zeros_like(moments.m2), moments.m2)

    def _update(self, moments: RunningMoments, i: int, n: int, mean: np.ndarray, m2: np.ndarray, when: str) -> None:
        """``moments.update_moments(n, mean, m2)``; :class:`StatisticsRangeError` naming layer ``i`` where the
        sums overflow float64 (each part finite, their merge not)."""
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                moments.update_moments(n, mean, m2)
        except ValueError as exc:
            raise StatisticsRangeError(f"BatchNorm layer {self.layers[i][0]!r}: its statistics overflow float64 "
                                       f"when {when} ({exc})") from None

    def payload(self) -> np.ndarray:
        """This rank's ``(batches, skipped)`` then per layer ``(calls, samples, count, reference, mean, M2)`` (the
        mean less the reference, 0 where the layer has none), as one float64 vector for ``all_gather``."""
        parts = [np.asarray([self.batches, self.skipped], dtype=np.float64)]
        for rm, calls, samples, reference in zip(self.moments, self.calls, self.samples, self.references):
            parts += [np.asarray([calls, samples, rm.count], dtype=np.float64),
                      np.zeros(rm.mean.shape) if reference is None else reference, rm.mean, rm.m2]
        return np.concatenate(parts)

    def merge_ranks(self, payloads: list[np.ndarray]) -> None:
        """Replace the local accumulators by the Chan merge of every rank's, in rank order, each rank's means moved
        to the reference of the first rank with statistics (references near the same mean differ exactly)."""
        merged = [RunningMoments(c) for c in self.widths.tolist()]
        references: list[np.ndarray | None] = [None] * len(merged)
        self.rank_calls = np.zeros_like(self.calls)
        self.calls[:] = 0
        self.samples[:] = 0
        self.batches = int(sum(p[0] for p in payloads))
        self.skipped = int(sum(p[1] for p in payloads))
        for p in payloads:
            pos = 2
            for i, c in enumerate(self.widths.tolist()):
                calls, samples, count = (int(v) for v in p[pos:pos + 3])
                reference, mean, m2 = (p[pos + 3 + j * c:pos + 3 + (j + 1) * c] for j in range(3))
                if count:
                    if references[i] is None:
                        references[i] = reference
                    # every rank merges the same payloads: all refuse alike
                    self._update(merged[i], i, count, mean + (reference - references[i]), m2, "the ranks' are merged")
                self.calls[i] += calls
                self.rank_calls[i] = max(self.rank_calls[i], calls)
                self.samples[i] += samples
                pos += 3 + 3 * c
        self.moments, self.references = merged, references


def _nonfinite_message(layer: str, batch: int, rank: int | None = None) -> str:
    where = f"batch {batch}" + ("" if rank is None else f" on rank {rank}")
    return (
        f"non-finite (NaN/Inf) input to BatchNorm layer {layer!r} in {where}, or values so far from their mean "
        "that their squares overflow the sums (beyond about 1e18 in float32 ones, 1e154 in float64); no "
        "statistics were changed. "
        "Fix the data or the model, or pass on_nonfinite='skip' to leave such batches out"
    )


def _checked(model: nn.Module, data: Iterable[Any], num_batches: int | None,
             forward: Callable[[nn.Module, Any], Any] | None, device: str | torch.device | None,
             on_nonfinite: str) -> tuple[nn.Module, list[tuple[str, nn.Module]], list[tuple[str, _BatchNorm]],
                                         torch.device | None]:
    """:func:`recalibrate`'s input checks: the module the pass runs, its named modules, its BN layers with running
    statistics and the device batches go to."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        raise TypeError(f"data must be an iterable of batches (e.g. a DataLoader), not "
                        f"{'a tensor' if isinstance(data, torch.Tensor) else 'an array'}; wrap it: [x]")
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    if num_batches is not None and not (is_whole_number(num_batches) and num_batches >= 1):
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches!r}")
    if device is None:  # DataParallel / DDP moved each batch to their first device: bnkit moves it there instead
        device = parallel_device(model)
    # the module a wrapper runs: a compiled one would recompile for every stand-in call, DDP's forward starts with a
    # buffer broadcast that a rank without batches never joins
    model, _ = unwrapped(model)
    if device is None and forward is None:  # the default forward feeds the batch as it is: send it to the model
        device = sole_device(model)
    modules = list(eager_modules(model))
    refuse_meta([*model.named_parameters(), *model.named_buffers()], "the model", LOAD_REAL_WEIGHTS)
    layers = [(n, m) for n, m in modules if is_batchnorm(m) and m.track_running_stats and m.running_mean is not None]
    frozen = [n or type(m).__name__ for n, m in modules if is_bn_or_frozen(m) and not is_batchnorm(m)]
    keep = (f"bnkit FrozenBatchNorm layer(s) {frozen[:3]}{'...' if len(frozen) > 3 else ''} keep their statistics, "
            "fixed by design: revert_frozen(model) first to recalibrate them")
    if not layers:
        raise ValueError("the model has no BatchNorm layer with running statistics: nothing to recalibrate"
                         + (f" ({keep})" if frozen else ""))
    if frozen:
        warnings.warn(keep, stacklevel=3)
    # every BN layer, those left as they are too: the pass would fail in PyTorch's forward, or writing statistics back
    check_channel_tensors((n, m) for n, m in modules if is_bn_or_frozen(m))
    for name, module in layers:
        if nn.parameter.is_lazy(module.running_mean):
            raise ValueError(f"BatchNorm layer {name!r} is lazy and not initialized yet: run one forward pass first")
        if any(t is not None and t.is_inference() for t in (module.running_mean, module.running_var,
                                                              module.num_batches_tracked)):
            raise ValueError(
                f"BatchNorm layer {name!r} holds inference tensors (the model was built or loaded under "
                "torch.inference_mode), which cannot be written outside it: build or load the model outside "
                "inference_mode, or give the layer copies of them (.clone())")
    if lazy := uninitialized_lazy(model):
        raise ValueError(f"uninitialized lazy modules ({', '.join(lazy)}): the pass would create their parameters, "
                         "with random weights, in your model; run one forward pass (or load the weights) first")
    return model, modules, layers, usable_device(device) if device is not None else None


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    device: str | torch.device | None = None,
    on_nonfinite: str = "raise",
    progress: bool = True,
    distributed: bool = True,
) -> RecalibrationReport:
    """Set every BatchNorm layer's running statistics to the exact statistics of its inputs over ``data``.

    One pass, all layers at once, under ``torch.no_grad()``. During the pass only
    the BatchNorm layers normalize with batch statistics, as in training (standard
    layers with the statistics reduced here, which are also the ones recorded).
    bnkit's drop-in layers normalize as plain BatchNorm does, their extras set
    aside: the layers after them are measured on what they will see at inference,
    where every layer normalizes with the new statistics (Batch Renormalization's
    ``r``/``d`` would instead pull the output toward the statistics being replaced,
    ghost batches would normalize by parts). Any other layer whose class or
    instance overrides ``forward`` runs its own training-mode forward, always from
    its state before the pass: its buffers are put back after every call, so a
    skipped batch leaves nothing behind for the next. Its statistics are those of
    what it hands to ``torch.nn.functional.batch_norm`` (a subclass may transpose or
    mask its input first); one whose forward never calls it is measured on its
    input, with a warning. Dropout and every other module keep
    the mode they were in, so call ``model.eval()`` first for eval-time
    activations (a warning is issued if Dropout is left in training mode).
    Afterwards every ``training`` flag and ``requires_grad`` is as before, and no
    buffer other than the recalibrated layers' ``running_mean``, ``running_var``
    and ``num_batches_tracked`` changes, also where a forward reassigns or adds
    buffers (momentum is never touched). A BN layer used several times per
    forward gets the statistics of all its inputs pooled (PyTorch's running average would
    average each call's own variance instead, leaving out the spread between the calls' means);
    an input with no values (a routed branch given no rows) is ignored, and not
    counted in ``num_batches_tracked`` (PyTorch's training forward counts it). bnkit's ``FrozenBatchNorm*d``
    (:func:`bnkit.torch.convert_frozen`) keep their statistics, fixed by design, with a warning naming them.

    Per layer, with ``n`` the number of values per channel seen (samples times
    spatial positions): ``running_mean = mean``, ``running_var = M2 / (n - 1)``
    (unbiased, PyTorch's definition of the buffer; ``M2 / n`` for bnkit's
    ``running_var_rule="biased"`` layers; see the module docstring),
    ``num_batches_tracked`` counting the forward calls received (reset to them for a
    cumulative average; see the module docstring). Layers the data never
    reached keep their statistics (``report.unused_layers``).

    With ``torch.distributed`` initialized, each rank passes its own shard (of
    any size and any number of batches) and the ranks' ``(count, mean, M2)`` are
    all-gathered and Chan-merged in rank order, so every rank ends with
    identical buffers equal to a single pass over the union. ``SyncBatchNorm``
    layers normalize with local batch statistics during the pass (no collective
    per forward, so unequal batch counts cannot deadlock on them). A BN subclass
    with a forward of its own runs it, collectives included (detectron2's
    ``NaiveSyncBatchNorm`` and apex's ``SyncBatchNorm`` all-reduce in every
    training call): the ranks deadlock unless each runs the same number of
    batches, reaching those layers in the same calls (else convert them to plain
    BatchNorm first). An ``Exception`` on one rank, in its input checks or its
    pass, is re-raised there (on Python 3.11+ with a note of any other rank's
    non-finite batch); every other rank raises ``ValueError`` if any rank had a
    non-finite batch, else ``RuntimeError`` naming the failed ranks. The ranks meet in one collective,
    at the end of the pass, so none hangs on another's error; but a rank with
    fewer batches waits there for the slowest rank's whole pass, and fails if
    that outlasts the process group's timeout (``init_process_group(timeout=)``;
    30 minutes by default, 10 for NCCL): set a timeout longer than the pass, or
    balance the shards. Only a ``KeyboardInterrupt`` on one rank leaves the
    others waiting in the collective until that timeout.

    Args:
        model: the model; its BN layers must track running statistics
            (layers with ``track_running_stats=False`` are left alone).
        data: an iterable of batches (e.g. a DataLoader), not a tensor; with the default ``forward``, NumPy arrays in
            a batch reach the model as tensors, floating ones in the model's dtype (tensors come as they are).
        num_batches: stop after this many batches (per rank); default all.
        forward: ``forward(model, batch)`` runs one batch. Default: ``model(batch)``
            for a tensor, ``model(batch[0])`` for an ``(inputs, targets, ...)`` tuple. For a
            wrapped model (``torch.compile``, DataParallel, DDP, AveragedModel) it receives the
            module inside, which the pass runs; batches then go to a DataParallel/DDP wrapper's
            first device unless ``device`` says otherwise.
        device: move tensors in each batch (also inside tuples/lists/dicts) here first. Default:
            with the default ``forward``, the model's device when one device holds all its
            parameters and buffers (CPU batches reach a CUDA model, as in the audit); a ``forward``
            of your own, or a model spread over devices, gets the batches as ``data`` yields them. A CUDA or
            MPS device this machine lacks raises ValueError before anything runs.
        on_nonfinite: ``"raise"`` (default): a batch giving NaN/Inf at any BN
            input raises ``ValueError`` naming the first such layer, changing
            nothing. ``"skip"``: leave such batches out and count them.
        progress: show a rich progress bar (rank 0 only) once the pass has run a second.
        distributed: with ``torch.distributed`` initialized, merge every rank's statistics
            (every rank must call). ``False``: this process's data only, e.g. under
            ``if rank == 0:`` (the other ranks need not call).

    Returns:
        A :class:`RecalibrationReport` with per-layer old and new statistics.

    Raises:
        ValueError: no BN layer with running statistics, no (finite) batch,
            a non-finite batch with ``on_nonfinite="raise"``, a BN input with
            one value per channel, statistics beyond the buffers' dtype (float16
            running_var above 65504).
        RuntimeError: under ``torch.distributed``, another rank failed (see above).
            On any exception, KeyboardInterrupt included, the model's buffers, parameters,
            attributes and flags are exactly as before (on success, only the BN statistics changed),
            as :class:`~bnkit.torch.modules.SavedState` puts them back (not what a forward writes
            inside other objects, such as a deque or a tensor held as a plain attribute).
    """
    world = _distributed_world() if distributed else 1
    try:  # a check failing on one rank must reach the collective too, or the others wait there until the timeout
        model, modules, layers, device = _checked(model, data, num_batches, forward, device, on_nonfinite)
        state = SavedState(model)  # what a forward may write anywhere (an ActNorm initializing itself), put back
        saved = state.buffers
        acc = _Pass(layers, skip_nonfinite=on_nonfinite == "skip")
    except Exception as exc:
        if world > 1:
            _gather_ranks(None, exc, None)  # raises exc once every rank has reported
        raise
    dropout = [n for n, m in modules if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
    if dropout:
        warnings.warn(
            f"Dropout layers {dropout[:3]}{'...' if len(dropout) > 3 else ''} are in training mode, so the statistics "
            "of the BatchNorm layers they feed include dropout noise (those before them are unaffected); call "
            "model.eval() first for the activations seen at inference",
            stacklevel=2,
        )
    feeds_own, forward = forward is not None, forward or _default_forward
    grads = [(p, p.requires_grad) for p in model.parameters()]  # not module state: SavedState leaves it
    handles = []

    try:
        # Standard layers and bnkit's drop-in ones get a stand-in forward (one reduction, see _Pass.forward;
        # SyncBatchNorm then normalizes per rank, with no collective per batch); a layer with its own forward
        # (a subclass, or one patched on the instance) keeps it: what it hands to F.batch_norm is reduced
        # (normalized_inputs: its own input may be transposed or masked first), and a hook puts its buffers back
        # after each call, so its state never drifts during the pass.
        own_forward = []
        for i, (_, m) in enumerate(layers):
            m.training = True  # this flag and the stand-in go when the state is put back (on success and failure)
            if has_stock_forward(m):
                m.__dict__["forward"] = acc.forward(i)  # an instance attribute, as `m.forward = ...` makes it
            else:
                own_forward.append(i)
                handles.append(restored_after_each_call(m, saved))
        recorders = [acc.recorder(i) for i in own_forward]
        measured = normalized_inputs([layers[i][1] for i in own_forward], lambda j, x: recorders[j](x))
        error: BaseException | None = None
        with torch.no_grad(), eager_calls(model), measured:
            try:  # len() and iter() of the data run the user's code too: a failure must reach the collective
                total = _total(data, num_batches)
                dtype = input_dtype_device(model)[0]  # of NumPy's floating arrays
                batches = data if num_batches is None else at_most(data, num_batches)
                with _progress_bar(progress and _rank() == 0, total) as advance:
                    for i, batch in enumerate(batches):
                        if not feeds_own:  # NumPy batches as the audit reads them; a forward= gets them as they come
                            batch = arrays_as_tensors(batch, dtype)
                        if device is not None:
                            batch = to_device(batch, device)
                        try:
                            forward(model, batch)
                        except _NonFinite:
                            raise
                        except Exception as exc:
                            _note_batch(exc, i, batch, data)
                            raise
                        acc.end_batch()
                        advance()
                acc.fold()
            except _NonFinite as exc:
                if world == 1:
                    raise StatisticsRangeError(_nonfinite_message(layers[exc.layer][0], exc.batch)) from None
                error = exc  # every rank must reach the collective before anyone raises
            except Exception as exc:
                if world == 1:
                    raise
                error = exc
        for found, consequence in (
                (measured.unread, ", and calls of it with no single tensor input with their channels on axis 1 "
                 "(several tensor keywords, a PackedSequence, an (N, L, C) input): nothing was measured in those calls "
                 "(a layer no call measured keeps its statistics)"),
                (measured.from_input, " (it normalizes with its own arithmetic, or reshapes the channels first): their "
                 "statistics are those of their inputs, which may not be what they normalize")):
            if found:
                names = [layers[own_forward[j]][0] or "(root)" for j in sorted(found)]
                warnings.warn(f"BatchNorm layers {names} have a forward of their own that does not hand "
                              f"torch.nn.functional.batch_norm a tensor with their channels on axis 1{consequence}",
                              UserWarning, stacklevel=2)
        if world > 1:
            payload = None if error is not None else acc.payload()
            acc.merge_ranks(_gather_ranks(payload, error, layers))
        if acc.batches == 0 and acc.skipped == 0:
            raise ValueError("data yielded no batches")
        if acc.batches == 0:
            raise StatisticsRangeError(
                f"all {acc.skipped} batches had non-finite BatchNorm inputs; nothing to recalibrate from")
        state.restore()  # every attribute, parameter and buffer as before the pass (the statistics go into those)
        report = RecalibrationReport(batches=acc.batches, skipped_batches=acc.skipped, world_size=world)
        unread = {layers[own_forward[j]][0] for j in measured.unread}
        with torch.no_grad():
            steps = (acc.calls if acc.rank_calls is None else acc.rank_calls).tolist()
            for (name, m), rm, reference, calls, samples, step in zip(layers, acc.moments, acc.references,
                                                                      acc.calls.tolist(), acc.samples.tolist(), steps):
                # the saved copies are private: as float64 CPU arrays they need no further copy
                old_mean, old_var = (saved.before(b).to("cpu", torch.float64).numpy()
                                     for b in (m.running_mean, m.running_var))
                new_mean, new_var = old_mean, old_var
                if rm.count > 0:
                    biased = isinstance(m, _DropInBatchNorm) and m.running_var_rule == "biased"
                    new_mean = rm.mean if reference is None else rm.mean + reference
                    new_var = rm.var if biased else rm.var_unbiased
                    dtype = m.running_var.dtype
                    limit = torch.finfo(dtype).max
                    if not (np.abs(new_mean).max() <= limit and new_var.max() <= limit):
                        wider = {torch.float16: "a float32", torch.bfloat16: "a float32", torch.float32: "a float64"}
                        way = (f"recalibrate {wider[dtype]} copy of the model, or scale the inputs down" if dtype in wider
                               else "scale the inputs down")
                        raise StatisticsRangeError(
                            f"BatchNorm layer {name!r}: its statistics (max |mean| {np.abs(new_mean).max():.3g}, max "
                            f"variance {new_var.max():.3g}) exceed {dtype}'s range, where they would be non-finite; "
                            f"{way} (the buffers are left as they were)")
                    m.running_mean.copy_(torch.from_numpy(new_mean))
                    m.running_var.copy_(torch.from_numpy(new_var))
                    if m.num_batches_tracked is not None:  # see the module doc
                        if is_cumulative(m):
                            m.num_batches_tracked.fill_(calls)
                        else:
                            m.num_batches_tracked.add_(step)
                report.layers.append(LayerRecalibration(
                    name, calls, samples, rm.count, old_mean, old_var, new_mean, new_var, float(m.eps),
                    unread=name in unread))
        return report
    except BaseException:
        state.restore()
        raise
    finally:
        for h in handles:
            h.remove()
        for p, req in grads:
            if p.requires_grad is not req:
                p.requires_grad_(req)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _total(data: Any, num_batches: int | None) -> int | None:
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        return num_batches
    return n if num_batches is None else min(n, int(num_batches))


class _progress_bar:
    """A transient rich progress bar that appears once the pass has run ``_PROGRESS_AFTER`` seconds.

    ``advance()`` counts one batch; short passes never draw (nor pay for) a bar.
    """

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled, self.total = enabled, total
        self.bar: Any = None
        self.task: Any = None
        self.done = 0
        self.start = time.monotonic()

    def __enter__(self) -> Callable[[], None]:
        self.start = time.monotonic()
        return self.advance if self.enabled else lambda: None

    def advance(self) -> None:
        self.done += 1
        if self.bar is None:
            if time.monotonic() - self.start < _PROGRESS_AFTER:
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("recalibrating BatchNorm"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("recalibrate", total=self.total)
        self.bar.update(self.task, completed=self.done)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
