"""The data side of :func:`bnkit.torch.audit`: batches, the default forward, and the helpers of its passes.

:class:`Batches` streams the user's data once (the first batch kept for the eval-mode
checks) with NaN/Inf refused. The passes put the model back with
:class:`~bnkit.torch.modules.SavedState`: every module's train/eval flag, each BN layer's ``momentum`` and
``track_running_stats``, and every attribute, parameter and buffer a forward writes (observers' ranges, a layer
initializing itself from its first batch), also when a forward fails.
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .modules import at_most, flatten_tensors, input_dtype_device, map_nested, tensor_of, tensor_or_array


class Batches:
    """The data's batches, streamed once, on the model's device with floating tensors in its dtype.

    The first batch is kept (the eval-mode checks rerun it); the rest are not stored. NaN/Inf is refused in what
    the model gets: with the default forward, a tuple or list batch's first element (the rest, labels, never reach
    the model); with ``forward=`` of one's own, every tensor of the batch.
    """

    def __init__(self, data: Any, batch_size: int, max_batches: int | None, model: nn.Module,
                 own_forward: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be at least 1, got {max_batches}")
        self.dtype, self.device = input_dtype_device(model)
        if isinstance(data, np.ndarray):
            data = tensor_of(data)
        self._checked = False  # True: the batches are slices of one tensor already checked for NaN/Inf
        self._own_forward = own_forward
        if isinstance(data, torch.Tensor):
            if data.ndim == 0 or len(data) == 0:
                raise ValueError(f"data must hold at least one sample, got shape {tuple(data.shape)}")
            sizes = [batch_size] * (len(data) // batch_size) + ([len(data) % batch_size] if len(data) % batch_size
                                                                else [])
            if batch_size > 1 and len(sizes) > 1 and sizes[-1] == 1:  # a last sample alone joins the batch before
                sizes[-2:] = [batch_size + 1]
            if max_batches is not None:  # the first of those batches: a limit covering them all changes nothing
                sizes = sizes[:max_batches]
                data = data[: sum(sizes)]
            _check_finite(data, sizes)  # one reduction for all batches instead of one per batch
            data = torch.split(data, sizes)
            self._checked = True
        self._iter = iter(data)
        self.max_batches = max_batches
        try:
            self.first = self._prepare(next(self._iter), 0)
        except StopIteration:
            raise ValueError("data yielded no batches") from None

    def __iter__(self):
        yield self.first
        rest = at_most(self._iter, None if self.max_batches is None else self.max_batches - 1)
        for i, batch in enumerate(rest, start=1):  # not one batch more is drawn from the user's data
            yield self._prepare(batch, i)

    def _prepare(self, batch: Any, index: int) -> Any:
        if self._checked:  # a slice of the data tensor, which the model gets whole
            moved = self._move(batch)
            if self._narrows(batch):
                self._fits(moved, index)
            return moved

        def check(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point():
                _check_finite(t, [len(t) if t.ndim else 1], index)
                if self._narrows(t):
                    self._fits(t.to(self.dtype), index)
            return t

        # the default forward hands the model a tuple or list batch's first element alone
        map_tensors(batch[0] if not self._own_forward and _is_sequence(batch) and len(batch) else batch, check)
        return map_tensors(batch, self._move)

    def _move(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)

    def _narrows(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is floating and the model's dtype holds a smaller range than its own."""
        return t.is_floating_point() and torch.finfo(self.dtype).max < torch.finfo(t.dtype).max

    def _fits(self, cast: torch.Tensor, index: int) -> None:
        """Refuse finite data that the model's dtype turned into Inf (float32 data of 7e4 for a float16 model),
        naming the batch, rather than let it surface as non-finite statistics inside the model."""
        try:
            _check_finite(cast, [len(cast) if cast.ndim else 1], index)
        except ValueError:
            raise ValueError(f"data batch {index} holds values beyond {self.dtype}'s range (largest "
                             f"{torch.finfo(self.dtype).max:.5g}), the model's dtype it is converted to; scale the "
                             "data down or audit a model of a wider dtype") from None

    def first_input(self, forward: Callable | None) -> Any:
        """Two samples of the first batch's model input (the fold analysis needs only its ranks)."""
        if forward is not None or isinstance(self.first, Mapping):
            return None  # the model's inputs are only known to ``forward``
        x = self.first[0] if _is_sequence(self.first) else self.first
        size = batch_len(x)
        return map_tensors(x, lambda t: t[:2] if batched(t, size) else t) if size else x


def _check_finite(t: torch.Tensor, sizes: list[int], first_index: int = 0) -> None:
    """Raise naming the first data batch with NaN/Inf (``t``'s rows are consecutive batches of ``sizes`` rows)."""
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return  # NaN/Inf always reach the sum; only a sum that overflows needs the element-wise check
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return
    row = int(bad.reshape(len(t), -1).any(1).nonzero()[0]) if t.ndim else 0
    batch = bisect.bisect_right(list(itertools.accumulate(sizes)), row)
    raise ValueError(f"data batch {first_index + batch} contains NaN or Inf")


def _is_sequence(batch: Any) -> bool:
    """A tuple or list batch, of which the default forward hands the model the first element (a PackedSequence,
    a namedtuple of tensors, is one input)."""
    return isinstance(batch, (tuple, list)) and not isinstance(batch, PackedSequence)


def default_forward(model: nn.Module, batch: Any) -> Any:
    if _is_sequence(batch):
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def set_training(model: nn.Module, flag: bool) -> None:
    for m in model.modules():
        m.training = flag


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor (and numeric NumPy array, as a tensor) in it, nested as
    :func:`bnkit.torch.modules.map_nested` walks; arrays PyTorch cannot take (strings, objects) are left for
    ``forward=`` as they are. A ``PackedSequence`` goes to ``fn`` as its batch-first padded tensor and lengths
    (one row a sequence, so a cut keeps whole sequences) and is packed again (lengths on the CPU)."""
    def apply(t: torch.Tensor | np.ndarray | PackedSequence) -> Any:
        if isinstance(t, PackedSequence):
            padded, lengths = pad_packed_sequence(t, batch_first=True)
            return pack_padded_sequence(fn(padded), fn(lengths).cpu(), batch_first=True, enforce_sorted=False)
        if isinstance(t, np.ndarray):
            t = tensor_or_array(t)
            if isinstance(t, np.ndarray):
                return t
        return fn(t)

    return map_nested(obj, apply, (torch.Tensor, np.ndarray, PackedSequence))


def batch_len(batch: Any) -> int | None:
    tensors = flatten_tensors(batch)
    return int(tensors[0].shape[0]) if tensors and tensors[0].ndim else None


def batched(t: torch.Tensor, size: int) -> bool:
    return t.ndim > 0 and t.shape[0] == size
