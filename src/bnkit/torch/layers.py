"""Drop-in BatchNorm layers for small batches: ``bnkit.torch.BatchNorm1d/2d/3d``.

Each subclasses the matching ``torch.nn.BatchNorm*d`` (so ``is_batchnorm`` finds
it and ``nn.BatchNorm*d`` state dicts load both ways: the extras add no buffers).
With every extra off, training-mode forward goes straight to
``nn.BatchNorm*d.forward`` (torch/nn/modules/batchnorm.py, ``_BatchNorm.forward``),
so outputs, running statistics and gradients are bit-identical. Eval mode always
is ``nn.BatchNorm*d``'s: it normalizes with the running statistics at any batch size.

Running statistics follow PyTorch's convention: ``momentum`` weighs the *new*
value, ``running = (1 - a) * running + a * batch_stat`` with ``a = momentum``
(``1/t`` for ``momentum=None``). Opt-in extras, all training-mode only:

* ``running_var_rule="biased"``: feed the running variance the biased batch
  variance ``M2/n`` (Keras, ONNX, Flax; see :mod:`bnkit.conventions`) instead of
  PyTorch's unbiased ``M2/(n-1)``.
* ``debias=True``: bias-corrected running statistics. The raw EMA started at
  ``init`` lags (``v_t = (1-m)**t * init + ...``); the corrected estimate
  ``(v_t - (1-m)**t * init) / (1 - (1-m)**t)`` is the weighted mean of the batch
  statistics seen so far. It is kept directly in the buffers by using the step
  factor ``a_t = m / (1 - (1-m)**t)`` (``a_1 = 1``), so the buffers stay usable
  by a plain ``nn.BatchNorm*d``. ``t`` is ``num_batches_tracked``; ``momentum=0``
  takes the limit ``a_t = 1/t`` (the cumulative average). The correction assumes
  the statistics at ``t = 0`` are the initial ``0``/``1``; other values at ``t = 0``
  (a checkpoint loaded without ``num_batches_tracked``) raise ``ValueError`` at the
  first training batch rather than being discarded (``a_1 = 1``); in eager mode
  only (graphs made by ``torch.compile``/``torch.export`` skip this check). The check
  reads the counter on the host only before the first step and after the counter
  was written outside the layer's steps (``load_state_dict``, ``fill_``, ``copy_``,
  a new tensor); a write through ``num_batches_tracked.data`` is not noticed.
* ``renorm=True``: Batch Renormalization (Ioffe 2017, arXiv:1702.03275, Alg. 1):
  ``y = gamma * ((x - mu_B) / sigma_B * r + d) + beta`` with
  ``r = clip(sigma_B / sigma, 1/rmax, rmax)``, ``d = clip((mu_B - mu) / sigma, -dmax, dmax)``,
  ``sigma = sqrt(running_var + eps)``, ``sigma_B = sqrt(var_B + eps)`` (biased
  ``var_B``), and the gradient through ``r`` and ``d`` stopped. ``r`` and ``d`` use
  the running statistics from before this batch's update. Unlike the paper,
  which averages ``sigma`` itself, the running *variance* is averaged (as every
  BN layer does), so the buffers stay those of ``nn.BatchNorm*d``. ``renorm_schedule``
  ``(warmup, r_full, d_full)`` keeps ``rmax = 1, dmax = 0`` (plain BN) up to step
  ``warmup`` and then relaxes them linearly to reach ``rmax`` at step ``r_full``
  and ``dmax`` at step ``d_full``; the paper's is :data:`PAPER_RENORM_SCHEDULE`.
  Needs running statistics: a training step with ``running_mean``/``running_var``
  set to ``None`` raises ``ValueError`` before anything changes.
* ``virtual_batch_size=k``: ghost batch normalization (Hoffer et al. 2017): the
  batch is split into chunks of ``k`` along dim 0, each normalized by its own
  statistics (a last chunk with a single value per channel joins the one before).
  The running statistics get one update per forward: the batch mean and the
  pooled within-chunk variance ``sum M2_g / (n - G)`` (unbiased rule) or
  ``sum M2_g / n`` (biased rule), which for one chunk is exactly BN's.

The extras compute the running-statistics update in float64, from the step
counter as a tensor (no host read, so a training step does not wait for the
device; ``debias``'s start check aside, see above), so the layers work with
``torch.compile`` and ``torch.export`` in eval and in training mode, every extra included; the
deprecated ``torch.jit.script`` cannot compile them (``revert_bn`` or
``convert_frozen`` first).
"""
from __future__ import annotations

import functools
import math
import numbers
import types
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.proxy import Proxy, TraceError
from torch.nn.modules.lazy import LazyModuleMixin

from ..audit_state import FEW_UPDATES_WEIGHT, initial_weight
from ..checks import real_or
from .modules import (channels, check_channel_tensors, eager_modules, is_compiled_wrapper, is_whole_number,
                      require_eager, write_count)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert_bn", "revert_bn", "PAPER_RENORM_SCHEDULE"]

#: Ioffe (2017), section 4: rmax = 1, dmax = 0 for 5k steps, rmax = 3 reached at 40k, dmax = 5 at 25k.
PAPER_RENORM_SCHEDULE = (5000, 40000, 25000)

_RUNNING_VAR_RULES = ("unbiased", "biased")
_EXTRA_DEFAULTS = {
    "debias": False,
    "renorm": False,
    "rmax": 3.0,
    "dmax": 5.0,
    "renorm_schedule": None,
    "virtual_batch_size": None,
    "running_var_rule": "unbiased",
    "layer_name": None,
}


def _number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)  # NumPy's numbers too, not bools


def _check_setting(name: str, value: object, who: str) -> None:
    """A drop-in layer's ``momentum`` in [0, 1] or None, ``eps`` finite and >= 0, else ValueError naming ``who``:
    nn.BatchNorm takes any, and a NaN or out-of-range one then gives NaN statistics or outputs."""
    # 0-d tensors and arrays are numbers here, as nn.BatchNorm takes them; a bool, a string, several values: NaN
    if name == "momentum" and value is not None and not 0.0 <= real_or(value, math.nan) <= 1.0:
        raise ValueError(f"{who}: momentum must be a number in [0, 1] (PyTorch's convention: the weight on the "
                         f"new batch statistic) or None (cumulative average), got {value!r}")
    if name == "eps" and not (math.isfinite(eps := real_or(value, math.nan)) and eps >= 0.0):
        raise ValueError(f"{who}: eps must be a finite number >= 0, got {value!r}")


def is_cumulative(bn: nn.Module) -> bool:
    """The layer's running statistics are a cumulative average, weight ``1/t`` on batch ``t``: ``momentum=None``,
    or a drop-in layer's ``debias=True`` with ``momentum=0`` (the limit of its bias-corrected step)."""
    return bn.momentum is None or (getattr(bn, "debias", False) and bn.momentum == 0.0)


def batch_of_one_message(layer: str, shape: tuple[int, ...], running_stats: bool = True) -> str:
    """The error for a batch with a single value per channel normalized with batch statistics.

    ``running_stats=False``: a layer without running statistics, in either mode, which no mode change or
    freeze can help.
    """
    problem = "only 1 value per channel, so the batch variance is undefined and every output would equal beta"
    if not running_stats:
        return (
            f"{layer} has no running statistics (track_running_stats=False), so it normalizes with batch "
            f"statistics in training and in eval mode alike, and got input of shape {tuple(shape)}: {problem}. "
            "Fixes: use a batch of at least 2; or build the layer with track_running_stats=True and train it "
            "(or compute its statistics with bnkit.torch.recalibrate) so eval mode normalizes with running "
            "statistics."
        )
    return (
        f"{layer} is in training mode and got input of shape {tuple(shape)}: {problem}. Fixes: call model.eval() "
        "(or wrap inference in bnkit.torch.bn_guard) if this is inference; use a batch of at least 2; or freeze "
        "this layer's statistics with bnkit.torch.freeze_bn(model, modules=[...]) / convert it with "
        "bnkit.torch.convert_frozen so it normalizes with its running statistics."
    )


def _write_mark(t: Tensor) -> tuple[int, int] | None:
    """``t``'s identity and in-place write count (:func:`~bnkit.torch.modules.write_count`), or None for an
    inference tensor: the mark changes when ``t`` is replaced or written in place, not through ``t.data``."""
    count = write_count(t)
    return None if count is None else (id(t), count)


class _DropInBatchNorm:
    """The shared extras of :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        debias: bool = False,
        renorm: bool = False,
        rmax: float = 3.0,
        dmax: float = 5.0,
        renorm_schedule: tuple[int, int, int] | None = None,
        virtual_batch_size: int | None = None,
        running_var_rule: str = "unbiased",
        layer_name: str | None = None,
    ) -> None:
        # ``bias`` reaches nn.BatchNorm*d only when False: releases without that option (2.11 has none) take the
        # rest, and refuse a bias-less layer with their own TypeError
        super().__init__(  # type: ignore[call-arg]
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
            **({} if bias else {"bias": False}),
        )
        self._set_extras(
            debias=debias, renorm=renorm, rmax=rmax, dmax=dmax, renorm_schedule=renorm_schedule,
            virtual_batch_size=virtual_batch_size, running_var_rule=running_var_rule, layer_name=layer_name,
        )

    # ------------------------------------------------------------ configuration
    def __setattr__(self, name: str, value: object) -> None:
        """``momentum`` and ``eps`` are checked whenever they are set once the layer is built (by a schedule during
        training too), as :meth:`_set_extras` checks them at construction (:func:`_check_setting`)."""
        if name in ("momentum", "eps") and "layer_name" in vars(self):
            _check_setting(name, value, vars(self)["layer_name"] or type(self).__name__)
        super().__setattr__(name, value)

    def _set_extras(self, **extras) -> None:
        unknown = set(extras) - set(_EXTRA_DEFAULTS)
        if unknown:
            raise TypeError(
                f"unknown drop-in BatchNorm option(s) {sorted(unknown)}; expected {sorted(_EXTRA_DEFAULTS)}"
            )
        cfg = {**_EXTRA_DEFAULTS, **extras}
        if cfg["running_var_rule"] not in _RUNNING_VAR_RULES:
            raise ValueError(f"running_var_rule must be one of {_RUNNING_VAR_RULES}, got {cfg['running_var_rule']!r}")
        who = cfg["layer_name"] or type(self).__name__
        _check_setting("momentum", self.momentum, who)  # a layer convert_bn re-typed was not checked as it was set
        _check_setting("eps", self.eps, who)
        rmax, dmax = (float(cfg[k]) if _number(cfg[k]) else math.nan for k in ("rmax", "dmax"))
        if not (math.isfinite(rmax) and rmax >= 1.0):
            raise ValueError(f"rmax must be a finite number >= 1, got {cfg['rmax']!r}")
        if not (math.isfinite(dmax) and dmax >= 0.0):
            raise ValueError(f"dmax must be a finite number >= 0, got {cfg['dmax']!r}")
        schedule = cfg["renorm_schedule"]
        if schedule is not None:
            if not (isinstance(schedule, (tuple, list)) and len(schedule) == 3
                    and all(is_whole_number(s) for s in schedule)):
                raise ValueError(f"renorm_schedule must be three whole numbers (warmup, r_full, d_full), got "
                                 f"{schedule!r}")
            schedule = tuple(int(s) for s in schedule)
            if schedule[0] < 0 or schedule[1] <= schedule[0] or schedule[2] <= schedule[0]:
                raise ValueError(
                    "renorm_schedule must be (warmup, r_full, d_full) with 0 <= warmup < r_full and warmup < d_full, "
                    f"got {cfg['renorm_schedule']!r}"
                )
        vbs = cfg["virtual_batch_size"]
        if vbs is not None and not (is_whole_number(vbs) and vbs >= 1):
            raise ValueError(f"virtual_batch_size must be a positive integer or None, got {vbs!r}")
        for flag in ("debias", "renorm"):  # bool("no") is True: only booleans say what they mean
            if not isinstance(cfg[flag], (bool, np.bool_)):
                raise ValueError(f"{flag} must be True or False, got {cfg[flag]!r}")
        if (cfg["renorm"] or cfg["debias"]) and not self.track_running_stats:
            raise ValueError(f"{who}: renorm and debias need running statistics; "
                             "they require track_running_stats=True")
        self.debias = bool(cfg["debias"])
        self.renorm = bool(cfg["renorm"])
        self.rmax, self.dmax, self.renorm_schedule = rmax, dmax, schedule
        self.virtual_batch_size = None if vbs is None else int(vbs)
        self.running_var_rule = cfg["running_var_rule"]
        self.layer_name = cfg["layer_name"]

    def _extras_on(self) -> bool:
        return (
            self.debias or self.renorm or self.virtual_batch_size is not None or self.running_var_rule != "unbiased"
        )

    def extra_repr(self) -> str:
        parts = [super().extra_repr()]  # type: ignore[misc]
        if self.running_var_rule != "unbiased":
            parts.append(f"running_var_rule={self.running_var_rule!r}")
        if self.debias:
            parts.append("debias=True")
        if self.renorm:
            parts.append(f"renorm=True, rmax={self.rmax}, dmax={self.dmax}, renorm_schedule={self.renorm_schedule}")
        if self.virtual_batch_size is not None:
            parts.append(f"virtual_batch_size={self.virtual_batch_size}")
        return ", ".join(parts)

    def _label(self) -> str:
        if self.layer_name:
            return f"BatchNorm layer {self.layer_name!r}"
        return f"{type(self).__name__}({self.num_features})"

    def renorm_clip(self, step: int | Tensor | None = None) -> tuple[float, float] | tuple[Tensor, Tensor]:
        """``(rmax, dmax)`` in force at training step ``step`` (default: the next one).

        A tensor ``step`` (the forward passes ``num_batches_tracked``) gives float64 tensors
        on its device when a schedule is set, so training reads no counter on the host.
        """
        if self.renorm_schedule is None:
            return self.rmax, self.dmax
        if step is None:
            step = int(self.num_batches_tracked) + 1
        warmup, r_full, d_full = self.renorm_schedule
        s = torch.as_tensor(step, dtype=torch.float64)
        fr = ((s - warmup) / (r_full - warmup)).clamp(0.0, 1.0)
        fd = ((s - warmup) / (d_full - warmup)).clamp(0.0, 1.0)
        rmax, dmax = 1.0 + (self.rmax - 1.0) * fr, self.dmax * fd
        return (rmax, dmax) if isinstance(step, Tensor) else (float(rmax), float(dmax))

    # ------------------------------------------------------------------ forward
    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Proxy):  # fx keeps torch.nn's layers whole and traces into this one, whose checks fail
            raise TraceError(f"torch.fx traces into {self._label()} (bnkit's drop-in layers are not in torch.nn, "
                             "whose modules fx keeps whole), and its forward reads the input's shape: call "
                             "bnkit.torch.revert_bn(model) first (lossless with no extras on), or trace with a "
                             "Tracer whose is_leaf_module returns True for it")
        if self.training:  # check before nn.BatchNorm would count the batch in num_batches_tracked
            if input.dim() < 2 or input.size(1) != self.num_features or input.numel() == self.num_features:
                self._check_batch(input)
            if self._extras_on():
                self._check_input_dim(input)
                return self._forward_train_extras(input)
        try:
            return super().forward(input)  # type: ignore[misc]
        except (ValueError, RuntimeError) as err:  # explain bad input in bnkit's words; no cost when input is fine
            self._check_batch(input)
            raise err

    forward._bnkit_stock_in_eval = True  # outside training it is nn.BatchNorm's forward (fold relies on that)
    forward._bnkit_batch_norm_in_training = True  # with its extras set aside, BatchNorm's (recalibrate, audit)

    def _check_batch(self, input: Tensor) -> None:
        """Raise a named error for the wrong rank, channel count, or one value per channel with batch statistics."""
        self._check_input_dim(input)
        if input.dim() < 2 or input.size(1) != self.num_features:
            raise ValueError(
                f"{self._label()} expects {self.num_features} channels on dim 1, "
                f"got input of shape {tuple(input.shape)}"
            )
        if (self.training or self.running_mean is None) and input.numel() // self.num_features == 1:
            raise ValueError(batch_of_one_message(self._label(), input.shape, self.running_mean is not None))

    def _chunks(self, x: Tensor) -> list[Tensor]:
        k = self.virtual_batch_size
        if k is None or k >= x.size(0):
            return [x]
        per_value = x[:1].numel() // self.num_features
        if k * per_value < 2:
            raise ValueError(
                f"{self._label()}: virtual_batch_size={k} gives ghost batches of {k * per_value} value per channel "
                f"for input of shape {tuple(x.shape)}; each needs at least 2. Use a larger virtual_batch_size."
            )
        chunks = list(x.split(k))
        if chunks[-1].numel() // self.num_features < 2:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        return chunks

    def _forward_train_extras(self, x: Tensor) -> Tensor:
        if self.eps <= 0:  # as F.batch_norm refuses it in training; renorm's sqrt(var + 0) of a constant channel is 0
            raise ValueError(f"{self._label()}: eps must be positive in training, got {self.eps!r} (a constant "
                             "channel would divide by 0)")
        if not x.is_floating_point():  # renorm's float32 arithmetic would take it, and cast its output back
            raise TypeError(f"{self._label()} takes floating-point input, got {x.dtype} (as PyTorch's batch_norm "
                            "does); convert the batch first, e.g. x.float()")
        if x.numel() == 0:  # a routed head given no rows: PyTorch's kernel gives the empty output, linked to the affine
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)  # nothing counted
        chunks = self._chunks(x)  # validates before any buffer changes
        if self.renorm and (self.running_mean is None or self.running_var is None):
            raise ValueError(
                f"{self._label()}: renorm=True needs running statistics (r and d compare the batch with them), but "
                "running_mean or running_var is None; give the layer running statistics again "
                "(layer.running_mean = torch.zeros(C); layer.running_var = torch.ones(C)), or use renorm=False"
            )
        if self.renorm and not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            raise RuntimeError(
                f"{self._label()}: a Batch Renormalization step ran inside a backward pass, where activation "
                "checkpointing (torch.utils.checkpoint) re-runs the forward: a re-run's r and d would come from the "
                "running statistics the step already updated, so the gradients would be wrong. Keep renorm layers "
                "outside checkpointed segments, or use renorm=False there (a step taken on purpose in a backward "
                "hook cannot be told from a re-run: take it outside the backward pass).")
        update = self.track_running_stats and self.running_mean is not None
        if update:
            eager_debias = self.debias and not torch.compiler.is_compiling()  # traced graphs skip the start check
            if eager_debias:
                mark = _write_mark(self.num_batches_tracked)
                if mark is None or mark != self.__dict__.get("_debias_seen"):
                    self._check_debias_start()
        if self.renorm:
            step = self.num_batches_tracked
            if self.renorm_schedule is not None and torch.compiler.is_compiling():
                step = _snapshot(step)  # see _snapshot
            rmax, dmax = self.renorm_clip(step + 1 if update else step)  # the step this call takes
            outs = [self._renorm_chunk(c, rmax, dmax) for c in chunks]
        else:
            outs = [F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps) for c in chunks]
        if update:  # counted once the batch is normalized: a batch PyTorch refused leaves every buffer alone
            self.num_batches_tracked.add_(1)
            if eager_debias:
                self.__dict__["_debias_seen"] = _write_mark(self.num_batches_tracked)
            self._update_running(chunks)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _check_debias_start(self) -> None:
        """Refuse to debias from ``num_batches_tracked = 0`` unless the statistics are the initial 0 / 1.

        Called before a step only when the counter was written since this layer's last step (see
        :func:`_write_mark`), so steady training reads nothing on the host.
        """
        if int(self.num_batches_tracked) == 0 and (self.running_mean.any() or not bool((self.running_var == 1).all())):
            raise ValueError(
                f"{self._label()}: debias=True assumes the running statistics at num_batches_tracked=0 are the "
                "initial mean 0 / variance 1, but they hold other values (loaded from a checkpoint without "
                "num_batches_tracked, which PyTorch then sets to 0?); the first batch would replace them "
                "entirely. Set num_batches_tracked to the number of batches they come from (e.g. "
                "layer.num_batches_tracked.fill_(10000)), or use debias=False."
            )

    def _reduce_dims(self, x: Tensor) -> list[int]:
        return [0, *range(2, x.dim())]

    def _bshape(self, x: Tensor) -> tuple[int, ...]:
        return (1, self.num_features) + (1,) * (x.dim() - 2)

    def _renorm_chunk(self, x: Tensor, rmax: float, dmax: float) -> Tensor:
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        var_b, mean_b = torch.var_mean(xf, dim=self._reduce_dims(xf), correction=0)
        std_b = torch.sqrt(var_b + self.eps)
        # r and d are constants for autograd: detached operands, no no_grad block (an exported graph keeps such a
        # block as a submodule that torch.export.load refuses)
        rv, rm = self.running_var, self.running_mean
        if torch.compiler.is_compiling():  # see _snapshot: the statistics before this step's update
            rv, rm = _snapshot(rv), _snapshot(rm)
        std_r = torch.sqrt(rv.to(xf.dtype) + self.eps)
        r = (std_b.detach() / std_r).clamp(1.0 / rmax, rmax)
        d = ((mean_b.detach() - rm.to(xf.dtype)) / std_r).clamp(-dmax, dmax)
        shape = self._bshape(xf)
        y = (xf - mean_b.view(shape)) / std_b.view(shape) * r.view(shape) + d.view(shape)
        if self.weight is not None:
            y = y * self.weight.to(y.dtype).view(shape)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).view(shape)
        return y.to(x.dtype)

    def _update_running(self, chunks: list[Tensor]) -> None:  # detached chunks: nothing here is recorded
        m = self.momentum
        if is_cumulative(self):  # t as a tensor: no host read, so torch.export can trace it
            a: float | Tensor = 1.0 / self.num_batches_tracked.to(torch.float64)
        elif self.debias and m < 1.0:
            t = self.num_batches_tracked.to(torch.float64)
            a = m / -torch.expm1(t * math.log1p(-m))  # m / (1 - (1-m)**t)
        else:
            a = m
        count, total, m2 = 0, 0.0, 0.0
        for c in chunks:
            c64 = c.detach().to(torch.float64)
            var_c, mean_c = torch.var_mean(c64, dim=self._reduce_dims(c64), correction=0)
            n_c = c64.numel() // self.num_features
            count += n_c
            total = total + mean_c * n_c
            m2 = m2 + var_c * n_c
        mean = total / count
        dof = count - len(chunks) if self.running_var_rule == "unbiased" else count
        var = m2 / dof
        rm, rv = self.running_mean, self.running_var
        rm.copy_((1.0 - a) * rm.to(torch.float64) + a * mean)
        rv.copy_((1.0 - a) * rv.to(torch.float64) + a * var)


@torch.library.custom_op("bnkit::snapshot", mutates_args=())
def _snapshot(t: Tensor) -> Tensor:
    """A copy of ``t`` that a compiled graph keeps for its backward instead of recomputing it.

    A Batch Renormalization step reads the running statistics (and, with a schedule, the step counter) for ``r``
    and ``d``, then updates them in place. Compiled (``aot_eager``, ``inductor``; torch 2.11 and 2.13, CPU and
    CUDA), the partitioner saved those buffers themselves and recomputed ``r`` and ``d`` from them in the
    backward, after the update: gamma's gradient 6-34% off, or an error when the step ran twice before one
    backward. It never recomputes an opaque operator, so ``r`` and ``d`` are computed from this copy, which the
    backward then reads as it was. (Activation checkpointing re-runs the whole forward, this copy included, after
    the update: an eager step re-run inside a backward pass raises instead; see ``_forward_train_extras``.)
    """
    return t.clone()


@_snapshot.register_fake
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t)


class BatchNorm1d(_DropInBatchNorm, nn.BatchNorm1d):
    """Drop-in ``nn.BatchNorm1d`` for ``(N, C)`` / ``(N, C, L)`` with opt-in small-batch extras (see module doc)."""


class BatchNorm2d(_DropInBatchNorm, nn.BatchNorm2d):
    """Drop-in ``nn.BatchNorm2d`` for ``(N, C, H, W)`` with opt-in small-batch extras (see module doc)."""


class BatchNorm3d(_DropInBatchNorm, nn.BatchNorm3d):
    """Drop-in ``nn.BatchNorm3d`` for ``(N, C, D, H, W)`` with opt-in small-batch extras (see module doc)."""


_DROP_IN = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_STANDARD = {v: k for k, v in _DROP_IN.items()}


# ----------------------------------------------------------------- module swaps
def retype_module(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A new ``cls`` instance sharing ``module``'s parameters, buffers, hooks and flags.

    Parameter and buffer tensors are the same objects (an optimizer built on the
    old module keeps working); their containers (and other dicts and sets) are
    copied, so swapping them leaves the old module as it was. The hook dicts are
    the old module's own (the handles ``register_*_hook`` returned remove their hook
    through them, so they keep working; a hook added to one module is on both).
    Attributes bound to the old module (``freeze_bn``'s ``train``, a method set on the
    instance with ``types.MethodType`` or ``functools.partial``) are re-bound to the new one, as
    ``copy.deepcopy`` re-binds them: a frozen layer stays frozen, a patched ``forward`` runs on the new
    layer. Hooks are shared as they are, so a hook bound to the old module still gets that one. An object held
    under two attributes is re-bound once, as deepcopy's memo does: both hold the one new object.
    """
    new = cls.__new__(cls)
    rebound: dict[int, object] = {}  # id of an old bound override -> its new one
    for k, v in module.__dict__.items():
        if isinstance(v, (dict, set)) and "_hooks" not in k:
            v = v.copy()
        elif getattr(v, "module", None) is module and callable(getattr(type(v), "rebound", None)):
            if id(v) not in rebound:
                rebound[id(v)] = v.rebound(new)
            v = rebound[id(v)]
        else:
            v = _rebound(v, module, new)
        new.__dict__[k] = v
    return new


def _rebound(value: object, old: nn.Module, new: nn.Module, _open: frozenset = frozenset()) -> object:
    """``value`` with ``old`` replaced by ``new`` where it is a method bound to ``old`` or a ``functools.partial``
    holding ``old`` or such a method (in its function, arguments or keywords, nested partials too), as
    ``copy.deepcopy`` re-binds them; a partial that does is rebuilt of its class with its ``__dict__``, as pickle
    rebuilds one. Anything else is ``value`` itself: a partial holding itself (``_open``: the partials being read)
    keeps that reference, and one whose class pickles itself its own way (``__reduce__``, ``__setstate__``) is not
    rebuilt."""
    if value is old:
        return new
    if isinstance(value, types.MethodType):
        return types.MethodType(value.__func__, new) if value.__self__ is old else value
    if (not isinstance(value, functools.partial) or id(value) in _open
            or any(getattr(type(value), m) is not getattr(functools.partial, m)
                   for m in ("__reduce__", "__reduce_ex__", "__setstate__"))):
        return value
    inner = _open | {id(value)}
    func = _rebound(value.func, old, new, inner)
    args = tuple(_rebound(a, old, new, inner) for a in value.args)
    keywords = {k: _rebound(a, old, new, inner) for k, a in value.keywords.items()}
    if func is value.func and all(a is b for a, b in zip(args, value.args)) and all(
            keywords[k] is a for k, a in value.keywords.items()):
        return value
    rebuilt = type(value)(func)
    rebuilt.__setstate__((func, args, keywords or None, dict(vars(value)) or None))
    return rebuilt


def replace_modules(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Replace every module for which ``make(name, module)`` returns a new one.

    All replacements are built before any is installed, so an exception leaves
    ``model`` untouched. A module used at several places is replaced by one new
    module everywhere. Returns the (possibly new) root.
    """
    new_of: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in new_of:
            new = make(name, module)
            if new is not None:
                new_of[id(module)] = new
    if not new_of:
        return model
    for name, parent in model.named_modules():
        label = repr(name) if name else "the model"
        # torch.compile's wrapper calls the module it was given, bound at compile time: a new one in its
        # ``_orig_mod`` slot would never run
        if is_compiled_wrapper(parent) and id(parent._orig_mod) in new_of:
            raise ValueError(f"{label} is torch.compile({type(parent._orig_mod).__name__}), whose compiled forward "
                             "keeps calling the layer it was given: swap the layer before compiling it (or compile "
                             "the model that holds it); nothing changed")
        # module.compile() keeps torch.compile(self._call_impl), bound to the module: a copy of its __dict__ would
        # run the old class's code under the new class's name
        if id(parent) in new_of and vars(parent).get("_compiled_call_impl") is not None:
            raise ValueError(f"{label} was compiled in place ({type(parent).__name__}.compile()), and its compiled "
                             "call keeps running the code of the class it was compiled as: swap the layer before "
                             "compiling it (or compile the model that holds it); nothing changed")
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new_of:
                parent._modules[child_name] = new_of[id(child)]
    return new_of.get(id(model), model)


def convert_bn(model: nn.Module, **extras) -> nn.Module:
    """Swap every standard ``nn.BatchNorm1d/2d/3d`` for bnkit's drop-in layer with ``extras``.

    Weights, buffers (the same tensors), hooks, ``training`` and ``requires_grad``
    flags are kept; each new layer's ``layer_name`` is its qualified name, so its
    errors name it. bnkit drop-in layers already in the model get the requested
    ``extras`` and keep their other options; one that already has them (and a name)
    is left as it is, the same object. ``SyncBatchNorm`` and other subclasses
    (a parametrized weight makes one) are left alone, with a ``UserWarning`` naming them (revert them
    first). An uninitialized ``LazyBatchNorm*d`` raises
    ``ValueError`` (run one forward pass first: it then is an ``nn.BatchNorm*d``).
    Nothing changes if any layer fails. Returns the model (a new object only when
    ``model`` itself is a BN layer). ``debias=True`` takes the statistics a layer holds as already corrected: a
    ``UserWarning`` names the layers whose ``num_batches_tracked`` says the initial values may still weigh over 1%
    in them (an average of a few updates; the same holds for a plain checkpoint loaded into a debias layer).
    """
    _DROP_IN[nn.BatchNorm1d](1)._set_extras(**extras)  # the options checked once, whatever layers the model has
    lazy = [name or type(m).__name__ for name, m in eager_modules(model)
            if isinstance(m, LazyModuleMixin) and getattr(m, "cls_to_become", None) in _DROP_IN]
    if lazy:
        raise ValueError(
            f"convert_bn: BatchNorm layers {lazy} are lazy and not initialized yet, so they cannot be converted; "
            "run one forward pass first (they then become nn.BatchNorm*d), then convert"
        )

    if extras.get("renorm") or extras.get("debias"):
        stateless = [name or "(root)" for name, m in model.named_modules()
                     if type(m) in _STANDARD or type(m) in _DROP_IN if not m.track_running_stats]
        if stateless:
            raise ValueError(
                f"convert_bn: renorm and debias need running statistics, and BatchNorm layers {stateless} have "
                "track_running_stats=False; convert the submodules that hold the others (convert_bn(model.block, "
                "...)), or give these layers running statistics; nothing changed")
    left: list[tuple[str, type]] = []  # (name, class) of each BatchNorm layer left as it is
    lagging: list[tuple[str, int, float]] = []  # (name, count, initial values' weight) of layers debias starts on

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if type(m) in _STANDARD:  # already a drop-in: update its options on a copy (the model is untouched on error)
            cls, current = type(m), {k: getattr(m, k) for k in _EXTRA_DEFAULTS}
        elif type(m) in _DROP_IN:
            cls, current = _DROP_IN[type(m)], {}
        else:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                left.append((name or "(root)", type(m)))
            return None
        options = {**current, "layer_name": current.get("layer_name") or name or type(m).__name__, **extras}
        if options == current:
            return None  # a drop-in with these options and name already: keep it (references to it stay the model's)
        check_channel_tensors([(name, m)])  # before any layer is swapped: replace_modules installs none on error
        new = retype_module(m, cls)
        new.num_features = channels(m)  # a once-lazy layer keeps num_features 0 in PyTorch
        new._set_extras(**options)
        if options.get("debias") and not current.get("debias") and m.momentum is not None \
                and not m.num_batches_tracked.is_meta:  # a model built on meta has no count to read yet
            count = int(m.num_batches_tracked)
            if count > 0 and (w0 := initial_weight(float(m.momentum), count)) > FEW_UPDATES_WEIGHT:
                lagging.append((name or "(root)", count, w0))
        return new

    converted = replace_modules(model, make)
    if lagging:
        names = ", ".join(f"{n} (num_batches_tracked {t}: {w:.2g})" for n, t, w in lagging[:6])
        warnings.warn(
            f"convert_bn(debias=True): if the running statistics of {len(lagging)} layer(s) come from that many "
            f"exponential-average updates, the initial 0 and 1 still weigh (1 - momentum)^num_batches_tracked in "
            f"them: {names}{', ...' if len(lagging) > 6 else ''}. debias takes them as corrected averages and keeps "
            "that lag; recalibrate them (bnkit recalibrate) for exact statistics (statistics recalibrate computed "
            "are exact already)", UserWarning, stacklevel=2)
    if left:
        names = ", ".join(f"{n} ({c.__name__})" for n, c in left[:6]) + (", ..." if len(left) > 6 else "")
        warnings.warn(f"convert_bn left {len(left)} BatchNorm layer(s) of other classes as they are: {names}. "
                      + "; ".join(dict.fromkeys(_left_advice(c) for _, c in left)), UserWarning, stacklevel=2)
    return converted


def _left_advice(cls: type) -> str:
    """How to make a BatchNorm layer of class ``cls``, which :func:`convert_bn` leaves, one it converts."""
    if issubclass(cls, nn.SyncBatchNorm):
        return "SyncBatchNorm: model = bnkit.torch.revert_sync_bn(model, example_inputs) first (it returns a copy)"
    if cls.__name__ == "BatchNormNd":
        return ("BatchNormNd (any input rank): redo the conversion that made it with the rank known "
                "(revert_sync_bn with example_inputs, from_keras/from_flax with ndim=) to get BatchNorm1d/2d/3d")
    if cls.__name__.startswith("Parametrized"):
        return ("a parametrized weight: torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') "
                "first")
    return f"{cls.__name__} has its own code: swap it yourself"


def revert_bn(model: nn.Module) -> nn.Module:
    """Swap every bnkit drop-in layer back to the plain ``nn.BatchNorm*d``, keeping tensors and flags."""
    require_eager(model)

    def make(name: str, m: nn.Module) -> nn.Module | None:
        cls = _STANDARD.get(type(m))
        if cls is None:
            return None
        new = retype_module(m, cls)
        for key in (*_EXTRA_DEFAULTS, "_debias_seen"):
            new.__dict__.pop(key, None)
        return new

    return replace_modules(model, make)
