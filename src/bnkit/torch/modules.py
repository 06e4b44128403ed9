"""Finding BatchNorm layers in a PyTorch model, and the small module/output helpers every tool shares.

Every layer that normalizes with batch statistics in training mode derives
from ``torch.nn.modules.batchnorm._BatchNorm`` (torch/nn/modules/batchnorm.py):
``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, the ``LazyBatchNorm*d`` and bnkit's
drop-in layers. bnkit's buffer-only ``FrozenBatchNorm*d`` are not among them:
they never use batch statistics.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import numbers
import sys
import threading
from collections import OrderedDict, UserDict
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle

from ..checks import native_array

__all__ = ["BN_TYPES", "is_batchnorm", "is_bn_or_frozen", "bn_or_frozen_layers", "has_stock_forward", "bn_layers",
           "eval_mode", "flatten_tensors", "map_nested", "as_args", "write_count", "SavedBuffers",
           "SavedState"]

BN_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm,)


def is_batchnorm(module: nn.Module) -> bool:
    """True for any module that normalizes with batch statistics when training."""
    return isinstance(module, BN_TYPES)


def require_eager(model: nn.Module) -> None:
    """Raise ``TypeError`` when ``model`` is, or holds, a TorchScript module (``torch.jit.script``/``trace``): its
    layers are ``RecursiveScriptModule``s, whose class, forward and buffers bnkit can neither see nor replace, so
    its tools would find no BatchNorm layer there and silently do nothing, or fail inside."""
    for _ in eager_modules(model):
        pass


def eager_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()``, raising as :func:`require_eager` on the first TorchScript module (one walk)."""
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            where = "the model is" if not name else f"its submodule {name!r} is"
            raise TypeError(f"{where} TorchScript (torch.jit.script or trace), whose layers bnkit can neither find "
                            "nor run as it needs: pass the eager nn.Module (script it after using bnkit)")
        yield name, m


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """``(qualified_name, module)`` for every BatchNorm layer, in ``named_modules`` order (TorchScript refused:
    see :func:`require_eager`)."""
    return [(name, m) for name, m in eager_modules(model) if is_batchnorm(m)]


def is_bn_or_frozen(module: nn.Module) -> bool:
    """A BatchNorm layer or one of bnkit's buffer-only ``FrozenBatchNorm*d`` (marked ``_bnkit_frozen_layer``)."""
    return is_batchnorm(module) or getattr(type(module), "_bnkit_frozen_layer", False)


def bn_or_frozen_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified_name, module)`` for every BatchNorm layer and bnkit ``FrozenBatchNorm*d``, in
    ``named_modules`` order (TorchScript refused: see :func:`require_eager`)."""
    return [(name, m) for name, m in eager_modules(model) if is_bn_or_frozen(m)]


def bn_like_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified_name, module)`` for the modules other than BatchNorm layers and bnkit's ``FrozenBatchNorm*d`` that
    hold per-channel ``running_mean`` and ``running_var`` (1-d tensors of one length): BatchNorm look-alikes
    (torchvision's or detectron2's FrozenBatchNorm2d, the modules of a ``torch.export`` graph), InstanceNorm with
    running statistics. Other shapes (a scalar running mean of an RL normalizer) are not a BN's statistics."""

    def per_channel(m: nn.Module) -> bool:
        mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        return (isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor) and not is_lazy(mean)
                and not is_lazy(var) and mean.dim() == 1 and mean.shape == var.shape)

    return [(name, m) for name, m in eager_modules(model) if not is_bn_or_frozen(m) and per_channel(m)]


def deep_copy(model: nn.Module, *, share_tensors: bool = False) -> nn.Module:
    """``copy.deepcopy(model)``, also where a module keeps a computed tensor as a plain attribute, and keeping
    attributes set on its parameters. ``share_tensors``: the copy holds the model's own parameters and buffers
    (only the modules and what else they hold are copied), a shadow to run or trace whose writes to its other
    state reach no object of the model's.

    The old-style hooks ``torch.nn.utils.weight_norm`` / ``spectral_norm`` store the weight they compute as a
    non-leaf tensor after any forward with grad enabled (and at construction), which ``Tensor.__deepcopy__``
    refuses; such a tensor is copied detached (the hook computes it anew before the copy's next forward). A
    ``torch.distributed`` process group held as a module's attribute (a ``SyncBatchNorm``'s ``process_group``), which
    cannot be copied, is shared (one inside a list or dict attribute still fails the copy).
    """
    groups = (torch.distributed.ProcessGroup,) if torch.distributed.is_available() else ()
    memo = {id(v): v.detach().clone() for m in model.modules() for v in vars(m).values()
            if isinstance(v, torch.Tensor) and v.grad_fn is not None}
    memo.update({id(v): v for m in model.modules() for v in vars(m).values() if groups and isinstance(v, groups)})
    if share_tensors:
        memo.update({id(t): t for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values())
                     if t is not None})
    try:
        new = copy.deepcopy(model, memo)
        # Parameter.__deepcopy__ copies data and requires_grad only: attributes set on a parameter (freeze_bn's
        # record, which moves with it when a layer is swapped) are copied over, parameters paired in the same order
        for old_p, new_p in zip(model.parameters(), new.parameters()):
            if vars(old_p) and not vars(new_p):
                vars(new_p).update(copy.deepcopy(vars(old_p), memo))
    except RecursionError:  # copy.deepcopy recurses once per level of nesting
        raise ValueError("the model holds objects nested too deeply for copy.deepcopy (Python's recursion limit, "
                         f"{sys.getrecursionlimit()}: a long linked chain in an attribute?), which bnkit copies the "
                         "model with: keep such objects outside the model") from None
    return new


def uninitialized_lazy(model: nn.Module) -> list[str]:
    """The lazy modules (``nn.LazyConv2d``, ``nn.LazyBatchNorm2d``, ...) whose parameters no forward has created yet:
    a tool's forward would create them, with random weights, in the caller's model."""
    return [name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]


def write_count(t: torch.Tensor) -> int | None:
    """The tensor's in-place write counter (``t._version``; None for inference tensors, which have none).

    In-place ops (``fill_``, ``copy_``, ``add_``, ``load_state_dict``) bump it; writes through ``t.data``
    or a NumPy view do not.
    """
    try:
        return t._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def unwrapped(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The module a wrapper runs, and the wrappers peeled off it, outermost first: ``torch.compile``'s
    ``OptimizedModule`` (``_orig_mod``), ``torch.optim.swa_utils.AveragedModel``, ``nn.DataParallel`` and
    ``DistributedDataParallel`` (``module``), nested in any order.

    Tools that trace or export a model, or wrap its layers' forwards per call, work on that module: a compiled
    wrapper would recompile for every call of theirs, and fx and the ONNX exporter cannot read the others.
    """
    chain = wrapper_chain(model)
    return chain[-1], ["torch.compile" if is_compiled_wrapper(m) else type(m).__name__ for m in chain[:-1]]


def is_compiled_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is ``torch.compile``'s ``OptimizedModule`` around a module (``_orig_mod``), told by its
    class name, without importing ``torch._dynamo``."""
    return type(module).__name__ == "OptimizedModule" and isinstance(module._modules.get("_orig_mod"), nn.Module)


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model``, the module it wraps, and so on down to the module :func:`unwrapped` returns (the last)."""
    from torch.optim.swa_utils import AveragedModel

    chain = [model]
    while True:
        if is_compiled_wrapper(model):
            model = model._modules["_orig_mod"]
        elif isinstance(model, (AveragedModel, nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return chain
        chain.append(model)


def parallel_device(model: nn.Module) -> torch.device | None:
    """Where a DataParallel / DistributedDataParallel wrapper at any depth of ``model``'s :func:`wrapper_chain`
    (torch.compile(DDP(m)) included) sends its inputs: its first ``device_ids``; None without one. Tools that run
    the module inside send inputs there themselves, as the wrapper would have."""
    kinds = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    parallel = [m for m in wrapper_chain(model) if isinstance(m, kinds)]
    return torch.device(parallel[0].device_ids[0]) if parallel and parallel[0].device_ids else None


def is_whole_number(value: object) -> bool:
    """A finite whole real number (NumPy's numbers too), not a bool: ``2`` and ``2.0``, not ``2.5``, NaN or inf."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and int(value) == value)


def usable_device(spec: str | torch.device, what: str | None = None) -> torch.device:
    """``torch.device(spec)``, checked where this machine may lack it (CUDA, MPS): else ValueError saying why;
    ``what`` names it in the message (default ``device=<spec>``)."""
    what = what or f"device={spec if isinstance(spec, int) else repr(str(spec))}"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError) as exc:
        if isinstance(spec, int) and not isinstance(spec, bool):  # an accelerator's index
            raise ValueError(f"{what}: an accelerator index, and torch says: {exc}") from None
        raise ValueError(f"unknown device {spec!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"{what}: CUDA is not available ({why}); use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{what}: there are {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{what}: Apple MPS is not available on this machine; use cpu")
    return device  # other types (xla, privateuse1 backends) are for their own packages to check


def sole_device(model: nn.Module) -> torch.device | None:
    """The one device holding all of ``model``'s parameters and buffers; None for a model spread over several
    devices (it places its inputs itself) or holding no tensor."""
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    return devices.pop() if len(devices) == 1 else None


def map_nested(obj: Any, fn: Callable[[Any], Any], leaf: tuple[type, ...] = (torch.Tensor,),
               _copies: dict[int, Any] | None = None) -> Any:
    """``obj`` with ``fn`` applied to each instance of ``leaf`` in it, through tuples, namedtuples, lists, mappings
    and dataclass instances, nested; anything else is kept as it is.

    A tuple or list whose items ``fn`` all returned unchanged is returned itself; one of a subclass whose
    constructor does not rebuild it from its items (``__new__(cls, x, y)``, ``__new__(cls, *items)``) becomes a
    plain tuple or list, as a mapping that cannot be rebuilt becomes a plain dict.

    A mapping keeps its type as ``default_collate`` keeps it (see :func:`_same_mapping`). A dataclass instance is
    copied without running its ``__init__``/``__post_init__`` again (they may transform their inputs), every
    attribute mapped, fields and what ``__post_init__`` derived from them alike (a mask cut with the batch), a field
    never set left unset; one that refers back to itself is copied once (``_copies``: those copied so far).
    """
    if isinstance(obj, leaf):
        return fn(obj)
    copies = {} if _copies is None else _copies
    if isinstance(obj, (tuple, list)):
        mapped = [map_nested(o, fn, leaf, copies) for o in obj]
        if all(m is o for m, o in zip(mapped, obj)):
            return obj  # nothing changed (tensors already on the device): the batch as it came
        try:
            new = type(obj)(*mapped) if hasattr(obj, "_fields") else type(obj)(mapped)  # a namedtuple takes fields
        except TypeError:
            new = None
        if new is None or len(new) != len(mapped) or any(a is not b for a, b in zip(new, mapped)):
            return (tuple if isinstance(obj, tuple) else list)(mapped)  # its constructor takes other arguments
        return new
    if isinstance(obj, Mapping):
        items = {k: map_nested(v, fn, leaf, copies) for k, v in obj.items()}
        return items if type(obj) is dict else _same_mapping(obj, items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # as flatten_tensors reads it
        if id(obj) in copies:
            return copies[id(obj)]
        new = copies[id(obj)] = copy.copy(obj)
        for name in dict.fromkeys([f.name for f in dataclasses.fields(obj)] + list(getattr(obj, "__dict__", ()))):
            value = getattr(obj, name, _UNSET)  # field(init=False) that nothing set yet: nothing to map
            if value is not _UNSET:
                object.__setattr__(new, name, map_nested(value, fn, leaf, copies))
        return new
    return obj


_UNSET = object()


def _same_mapping(obj: Mapping, items: dict) -> Any:
    """A mapping of ``obj``'s type holding ``items``, as ``default_collate`` (torch/utils/data/_utils/collate.py)
    makes one: a dict subclass or ``UserDict`` copied and each item set on the copy (no ``__init__`` run;
    ``update`` is not used, as some refuse it), another mapping built from a dict; a plain dict where that fails
    or does not hold exactly ``items`` (a constructor that takes other arguments). Other mutable mappings become
    plain dicts: a shallow copy of one may share its storage, and setting items on it would change the user's."""
    try:
        if isinstance(obj, (dict, UserDict)):
            new = copy.copy(obj)
            for k, v in items.items():
                new[k] = v
        elif isinstance(obj, MutableMapping):
            return items
        else:
            new = type(obj)(items)
        if list(new.keys()) == list(items) and all(new[k] is v for k, v in items.items()):
            return new
    except Exception:  # noqa: BLE001 - a mapping that cannot be copied, set or built from a dict
        pass
    return items


def as_args(example_inputs: Any) -> tuple:
    """Example inputs as a model's positional arguments: a tuple is the arguments (PyTorch's convention, as in
    ``torch.onnx.export``), anything else one argument, a ``PackedSequence`` (a namedtuple) included."""
    if isinstance(example_inputs, tuple) and not isinstance(example_inputs, nn.utils.rnn.PackedSequence):
        return example_inputs
    return (example_inputs,)


def tensor_of(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy(a)``, also for arrays it refuses that hold numbers all the same (another byte order,
    negative strides: :func:`bnkit.checks.native_array`). TypeError for dtypes PyTorch lacks."""
    return torch.from_numpy(native_array(a))


def tensor_or_array(a: np.ndarray) -> torch.Tensor | np.ndarray:
    """:func:`tensor_of` ``a``, or ``a`` itself where PyTorch has no dtype for it (strings, objects: left for a
    ``forward=`` of one's own)."""
    try:
        return tensor_of(a)
    except TypeError:
        return a


def arrays_as_tensors(batch: Any, dtype: torch.dtype | None = None) -> Any:
    """``batch`` with every NumPy array in it (nested as :func:`map_nested` walks) :func:`tensor_or_array`'s, the
    floating ones in ``dtype`` where given (NumPy's float64 default for a float32 model)."""
    def convert(a: np.ndarray) -> torch.Tensor | np.ndarray:
        t = tensor_or_array(a)
        return t.to(dtype) if dtype is not None and isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return map_nested(batch, convert, (np.ndarray,))


def at_most(items: Iterable[Any], n: int | None) -> Iterator[Any]:
    """The first ``n`` items of ``items`` (all of them for None), drawing no more from it. ``itertools.islice`` takes
    at most ``sys.maxsize``: a larger ``n`` is all the items there are."""
    return iter(items) if n is None else itertools.islice(items, min(int(n), sys.maxsize))


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested as :func:`map_nested` walks; a ``PackedSequence`` as one) moved to
    ``device``."""
    # asynchronous only towards an accelerator, where the stream orders the copy before its use; a copy to the CPU
    # made with non_blocking=True may be read before it has landed. A PackedSequence keeps batch_sizes on the CPU.
    return map_nested(batch, lambda t: t.to(device, non_blocking=device.type != "cpu"),
                      (torch.Tensor, nn.utils.rnn.PackedSequence))


def _pop_last(entries: list, mine: Callable[[Any], bool]) -> Any:
    """Remove and return the last of ``entries`` that is ``mine`` (None if none is)."""
    for k in range(len(entries) - 1, -1, -1):
        if mine(entries[k]):
            return entries.pop(k)
    return None


class normalized_inputs:
    """Context manager: ``record(i, x)`` gets every tensor ``layers[i]`` hands to ``torch.nn.functional.batch_norm``
    during one of its calls: what it normalizes, which its own input may not be (a BN subclass whose ``forward``
    transposes an ``(N, L, C)`` input, or selects the real positions of a padded one, first).

    For layers with their own ``forward``. While any is active, ``F.batch_norm`` is replaced on the
    ``torch.nn.functional`` module (once per process, however many passes run at a time, in whatever threads),
    where ``_BatchNorm.forward`` (torch/nn/modules/batchnorm.py) looks it up per call; calls outside these
    layers pass through untouched. A call that never hands ``F.batch_norm`` a tensor with the layer's channels
    on axis 1 (a forward that normalizes with its own arithmetic, or reshapes channels first, as a split BN's
    ``x.view(-1, C * S, H, W)``) records the layer's input instead (its first argument, ``input=``, or its one
    tensor keyword; none if it has no such input, or one without the layer's channels on axis 1, such as
    ``(N, L, C)``), after the call, and its index goes into ``from_input`` where that input holds values (what
    such a forward normalizes is unknown: callers warn), into ``unread`` where there was none (nothing measured).
    ``fallback(i, x)``, where given, gets that input
    instead of ``record``, also when there is none (``x`` None). That input is a copy taken before the call, so a
    forward that writes it in place (``x.sub_(mean)``, through ``.data``, or under ``torch.inference_mode``, which
    keeps no version counter) does not change what is recorded. Calls of ``F.batch_norm`` by BatchNorm layers
    inside these layers that are not among them (``track_running_stats=False`` children) are theirs, not the outer
    layer's. A layer calling itself falls back, if at all, on the outermost call's input, and only where none of
    the nested calls reached ``F.batch_norm``. Each hook removes its own entry from the calls under way, wherever
    it sits (two passes over models sharing a module push entries in each other's calls), and entries of a pass
    that has ended are dropped.
    """

    _lock = threading.Lock()
    _active = 0  # passes running, process-wide
    _original: Callable | None = None  # F.batch_norm as found by the first of them
    _local = threading.local()  # per thread: the calls under way, innermost last

    def __init__(self, layers: list[nn.Module], record: Callable[[int, torch.Tensor], Any],
                 fallback: Callable[[int, torch.Tensor | None], Any] | None = None) -> None:
        self.layers, self.record, self.fallback = layers, record, fallback
        self.widths = [channels(m) for m in layers]
        self.unread: set[int] = set()  # layers with a call that fell back on no input with their channels
        self.from_input: set[int] = set()  # layers with a call that fell back on an input of values
        self._handles: list[Any] = []
        self._patched = False
        self._live = False  # hooks in place: entries it pushed are current

    @classmethod
    def _calls(cls) -> list[list]:
        """``[pass, index, input as given, reached]`` of each call under way in this thread (index -1: a BatchNorm
        child's call, whose ``F.batch_norm`` calls are nobody's). Entries of a pass that has ended are dropped from
        the top first: one whose hooks went while a call in this thread was under way never popped its entry."""
        calls = cls._local.__dict__.setdefault("calls", [])
        while calls and not calls[-1][0]._live:
            calls.pop()
        return calls

    @staticmethod
    def _wrapping(original: Callable) -> Callable:
        """The stand-in for ``original`` (``F.batch_norm``), which it keeps: a reference taken while a pass ran
        still works after it."""

        @functools.wraps(original)
        def batch_norm(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # noqa: A002 - torch's name
            calls = normalized_inputs._calls()
            if calls and calls[-1][1] >= 0:
                owner, i = calls[-1][0], calls[-1][1]
                if isinstance(input, torch.Tensor) and input.dim() >= 2 and input.shape[1] == owner.widths[i]:
                    calls[-1][3] = True
                    owner.record(i, input)
            return original(input, *args, **kwargs)

        return batch_norm

    def __enter__(self) -> normalized_inputs:
        if not self.layers:
            return self

        def enter(i: int) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
                x = (args[0] if args else kwargs["input"] if "input" in kwargs
                     else tensors[0] if len(tensors) == 1 else None)
                x = x.detach().clone() if isinstance(x, torch.Tensor) else None  # as given, whatever the call writes
                self._calls().append([self, i, x, False])
            return hook

        def leave(i: int) -> Callable:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                calls = self._calls()
                entry = _pop_last(calls, lambda e: e[0] is self and e[1] == i)
                if entry is None:  # an earlier pre-hook raised before this one pushed it
                    return
                _, _, x, reached = entry
                outer = next((e for e in reversed(calls) if e[0] is self and e[1] == i), None)
                if outer is not None:  # a call of the layer inside its own forward: the outermost call decides,
                    outer[3] = outer[3] or reached  # measured if any of them reached F.batch_norm, else on its input
                elif not reached and output is not None:  # None: the call raised
                    readable = x is not None and x.dim() >= 2 and x.shape[1] == self.widths[i]
                    if not readable:
                        self.unread.add(i)
                    elif x.numel():  # an empty one (a routed branch given no rows) has nothing to measure
                        self.from_input.add(i)
                    if self.fallback is not None:
                        self.fallback(i, x)
                    elif readable:
                        self.record(i, x)
            return hook

        barrier = [self, -1, None, True]

        def enter_child(module: nn.Module, args: tuple) -> None:
            self._calls().append(barrier)

        def leave_child(module: nn.Module, args: Any, output: Any) -> None:
            _pop_last(self._calls(), lambda e: e is barrier)

        listed = {id(m) for m in self.layers}
        children = {id(c): c for m in self.layers for c in m.modules()
                    if id(c) not in listed and isinstance(c, nn.modules.batchnorm._NormBase)}
        try:
            for i, m in enumerate(self.layers):
                self._handles.append(m.register_forward_pre_hook(enter(i), with_kwargs=True))
                self._handles.append(m.register_forward_hook(leave(i), always_call=True))
            for c in children.values():
                self._handles.append(c.register_forward_pre_hook(enter_child))
                self._handles.append(c.register_forward_hook(leave_child, always_call=True))
        except BaseException:
            self._undo()
            raise
        with self._lock:
            if normalized_inputs._active == 0:
                normalized_inputs._original = F.batch_norm
                F.batch_norm = normalized_inputs._wrapping(F.batch_norm)
            normalized_inputs._active += 1
            self._patched = True
        self._live = True
        return self

    def _undo(self) -> None:
        self._live = False
        calls = self._local.__dict__.get("calls")  # this thread's: entries a BaseException left (hooks did not run)
        if calls:
            calls[:] = [e for e in calls if e[0] is not self]
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._patched:
            with self._lock:
                normalized_inputs._active -= 1
                if normalized_inputs._active == 0:
                    F.batch_norm, normalized_inputs._original = normalized_inputs._original, None
            self._patched = False

    def __exit__(self, *exc: Any) -> None:
        self._undo()


class eager_calls:
    """Context manager: modules compiled in place (``module.compile()``) are called eagerly inside, as before on
    exit; tools that wrap layers' forwards per call would make dynamo recompile for every call."""

    def __init__(self, model: nn.Module) -> None:
        self.compiled = [(m, m._compiled_call_impl) for m in model.modules()
                         if getattr(m, "_compiled_call_impl", None) is not None]

    def __enter__(self) -> "eager_calls":
        for m, _ in self.compiled:
            m._compiled_call_impl = None
        return self

    def __exit__(self, *exc: object) -> None:
        for m, call in self.compiled:
            m._compiled_call_impl = call


def channels(bn: nn.Module) -> int:
    """A BatchNorm layer's channel count: the length of its running statistics or affine weight, what its forward
    computes with, else ``num_features``. PyTorch's forward never reads ``num_features``: a ``LazyBatchNorm*d``
    that got its tensors from ``load_state_dict`` keeps it at 0 for good (its first forward finds nothing left to
    infer), and a layer whose tensors were cut by hand (channel pruning) keeps the old count."""
    held = next((t for t in (bn.running_mean, bn.weight) if isinstance(t, torch.Tensor) and not is_lazy(t)), None)
    return int(bn.num_features) if held is None else int(held.numel())


def unequal_channel_tensors(bn: nn.Module) -> dict[str, tuple[int, ...]] | None:
    """Where a BatchNorm layer's per-channel tensors (weight, bias, running_mean, running_var) are not all 1-d of
    one length, their shapes by name; else None. PyTorch's forward refuses tensors of different lengths ("weight
    should contain 3 elements not 4") and reads a ``(3, 1)`` one flattened; bnkit's float64 arithmetic would
    broadcast a one-element or ``(3, 1)`` tensor over every channel."""
    shapes = {k: tuple(t.shape) for k in ("weight", "bias", "running_mean", "running_var")
              if isinstance(t := getattr(bn, k, None), torch.Tensor) and not is_lazy(t)}
    if len(set(shapes.values())) <= 1 and all(len(s) == 1 for s in shapes.values()):
        return None
    return shapes


def describe_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[str, str]:
    """``(what is wrong, the shapes listed)`` for :func:`unequal_channel_tensors`' answer."""
    what = "of different shapes" if len(set(shapes.values())) > 1 else "that are not 1-d"
    return what, ", ".join(f"{k} {s}" for k, s in shapes.items())


def check_channel_tensors(layers: Iterable[tuple[str, nn.Module]]) -> None:
    """Raise ``ValueError`` naming the first of ``layers`` (``(name, layer)`` pairs) whose per-channel tensors
    are not all of shape ``(C,)`` (:func:`unequal_channel_tensors`); callers check before they change anything."""
    for name, bn in layers:
        if shapes := unequal_channel_tensors(bn):
            what, listed = describe_shapes(shapes)
            raise ValueError(f"BatchNorm layer {name or type(bn).__name__!r} has per-channel tensors {what} "
                             f"({listed}): PyTorch's forward refuses tensors of different lengths, and bnkit reads "
                             "each as one value per channel; give them all the shape (C,) (load a consistent state "
                             "dict, or finish cutting the layer)")


def input_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """Where floating inputs for ``model`` go: the dtype and device of its first floating parameter outside
    normalization layers (mixed-precision recipes keep BatchNorm in float32 inside a float16 model, apex's
    keep_batchnorm_fp32), else of any parameter, else of a buffer (a model of ``affine=False`` BatchNorm layers has
    only running statistics); the default dtype on the CPU for a model with none."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
    outside = (p for m in model.modules() if not isinstance(m, norms) for p in m.parameters(recurse=False))
    source = next((t for t in (*outside, *model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    if source is None:
        return torch.get_default_dtype(), torch.device("cpu")
    return source.dtype, source.device


def has_stock_eval_forward(bn: nn.Module) -> bool:
    """In eval mode the layer computes PyTorch's BatchNorm: its ``forward`` is PyTorch's, or one marked
    ``_bnkit_stock_in_eval`` (bnkit's drop-in layers, which defer to it outside training, and its
    ``FrozenBatchNorm*d``, which compute its eval transform in every mode); a subclass or instance
    with its own ``forward`` may compute anything."""
    return has_stock_forward(bn) or (getattr(type(bn).forward, "_bnkit_stock_in_eval", False)
                                     and "forward" not in vars(bn))


def has_stock_forward(bn: _BatchNorm) -> bool:
    """A pass that normalizes with batch statistics (``recalibrate``, the audit) may stand in for the layer's
    training forward: it is PyTorch's own (class and instance), or one marked ``_bnkit_batch_norm_in_training``
    (bnkit's drop-in layers, whose opt-in extras change how training normalizes or updates the buffers:
    Batch Renormalization's ``r``/``d`` pull the output toward the running statistics, which such a pass
    replaces or measures against; ghost batches normalize by parts)."""
    forward = type(bn).forward
    return ((forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward)
             or getattr(forward, "_bnkit_batch_norm_in_training", False)) and "forward" not in vars(bn))


class eval_mode:
    """Context manager: every module in eval mode, each module's own ``training`` flag restored on exit.

    The flags are assigned, not set through ``train(False)``: a module's own ``train``
    (a frozen layer remembering the mode asked for, see :mod:`bnkit.torch.freeze`) does
    not run, so nothing but the flags changes, and they change back.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        for m, _ in self.flags:
            m.training = False
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


class exact_float32:
    """Context manager: float32 convolutions and matmuls on CUDA in full float32 (no TF32); settings restored on exit.

    PyTorch's defaults let cuDNN convolutions round float32 inputs to TF32 (10-bit mantissa,
    relative errors near 1e-3), which would swamp a check against onnxruntime or another model
    run. The per-operation ``fp32_precision`` settings (torch/backends/cudnn/__init__.py,
    torch/backends/cuda/__init__.py) are set to ``"ieee"``, and cuDNN's legacy ``allow_tf32``
    flag to False so that reading it inside does not raise; all are put back as found. Releases
    without those settings get the ``allow_tf32`` flags alone. CPU results are unaffected.
    """

    def __enter__(self) -> None:
        backends = torch.backends
        knobs = [getattr(backends.cudnn, "conv", None), getattr(backends.cudnn, "rnn", None), backends.cuda.matmul]
        if all(k is not None and hasattr(k, "fp32_precision") for k in knobs):
            self.saved = [(knob, "fp32_precision", knob.fp32_precision, "ieee") for knob in knobs]
            try:  # the legacy cuDNN flag first (setting it resets conv/rnn): torch checks it against them on reads
                self.saved.insert(0, (backends.cudnn, "allow_tf32", backends.cudnn.allow_tf32, False))
            except RuntimeError:  # the user mixed the two APIs already; reads of it raise outside as well
                pass
        else:
            self.saved = [(knob, "allow_tf32", knob.allow_tf32, False)
                          for knob in (backends.cudnn, backends.cuda.matmul)]
        for knob, name, _, value in self.saved:
            setattr(knob, name, value)

    def __exit__(self, *exc: object) -> None:
        for knob, name, value, _ in self.saved:
            setattr(knob, name, value)


class SavedBuffers:
    """The buffers of some modules, by module and name (the tensor attached there) and by value.

    :meth:`restore` attaches each saved tensor under its name again and writes its saved values back,
    so a forward that reassigns a buffer (``self.running_mean = ...``) or adds one leaves no trace (one that
    registers it anew as a non-persistent buffer or turns it into a parameter is not undone).
    Uninitialized lazy buffers and inference tensors have no values to save: they are only attached again.
    ``copies``: a saving of the same moment whose copies are reused instead of cloning again.
    """

    def __init__(self, modules: list[nn.Module], copies: SavedBuffers | None = None) -> None:
        self.attached = [(m, dict(m._buffers)) for m in modules]
        known = copies.values if copies is not None else {}
        # an inference tensor (made under torch.inference_mode) cannot be written in place outside it, so no
        # forward here wrote it: attaching it again is all it needs
        self.values = {id(b): known.get(id(b)) or (b, b.detach().clone())
                       for _, bufs in self.attached for b in bufs.values()
                       if b is not None and not is_lazy(b) and not b.is_inference()}

    def before(self, tensor: torch.Tensor) -> torch.Tensor:
        """The saved values of ``tensor`` (one of the saved buffers)."""
        return self.values[id(tensor)][1]

    def restore(self) -> None:
        for m, bufs in self.attached:
            now = m._buffers
            if len(now) != len(bufs) or any(now.get(k) is not b for k, b in bufs.items()):
                now.clear()
                now.update(bufs)
        for tensor, before in self.values.values():
            write_back(tensor, before)


def restored_after_each_call(module: nn.Module, saved: SavedBuffers) -> Any:
    """A forward hook (its handle) putting ``module``'s buffers back as ``saved``, a saving that holds them, has them
    after every call, also one that raises: a forward of its own that writes them (``F.batch_norm`` handed them in
    training mode, whatever ``track_running_stats`` says) runs every call of a pass from the state before it."""
    kept = SavedBuffers([module], copies=saved)  # its buffers alone, the copies already made
    return module.register_forward_hook(lambda *_: kept.restore(), always_call=True)


def write_back(tensor: torch.Tensor, before: torch.Tensor) -> None:
    """Give ``tensor`` (a parameter or buffer) the values ``before`` again: nothing is written where it holds them
    (its autograd version stays, so a graph that saved it can still run backward), else in place, or, where a forward
    rebound its ``.data`` to another shape, dtype or device (``self.s.data = torch.ones(c)``), by rebinding ``.data``
    to a copy of ``before``."""
    same_kind = (tensor.shape, tensor.dtype, tensor.device) == (before.shape, before.dtype, before.device)
    if same_kind and _same_values(tensor.detach(), before):
        return
    with torch.no_grad():
        if same_kind:
            tensor.copy_(before)
        else:
            tensor.data = before.clone()


#: Integer dtypes of the floating dtypes' widths, to compare floating values by their bits.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one shape and dtype hold the same values, bit for bit: a NaN matches the same NaN,
    -0.0 does not match 0.0 (a ``_version`` check would miss writes through ``.data``). One comparison kernel: the
    floating values are compared as the integers of their bits. Tensors it cannot compare (sparse, quantized) count
    as changed: they are written back, as before any comparison."""
    if a.layout != torch.strided or a.is_quantized:
        return False
    try:
        if a.is_complex():
            a, b = torch.view_as_real(a.resolve_conj()), torch.view_as_real(b.resolve_conj())
        if a.is_floating_point() and a.element_size() in _BITS:
            a, b = a.resolve_neg().view(_BITS[a.element_size()]), b.resolve_neg().view(_BITS[b.element_size()])
        return torch.equal(a, b)
    except (RuntimeError, NotImplementedError):  # a dtype without an equality kernel on this device, a meta tensor
        return False


class SavedState:
    """Every module's state at one moment: its attributes as bound (plain values, parameters, buffers, submodules),
    the items of the lists, dicts and sets its attributes hold, and the values of its parameters and buffers.

    :meth:`restore` (also on leaving a ``with`` block) binds each attribute again, gives each such list, dict or set
    its items back in place (``lst[:] = saved``: a cache list appended to, a counter in a dict), and writes the saved
    tensor values back (:func:`write_back`), so the objects stay those they were (an optimizer's references hold).
    A hook handle the modules came to hold since (a module that hooks a layer on its first forward and keeps the
    handle in a list, a dict, a tuple or an attribute) is removed with it, so the hook goes too; hooks registered by
    anything else (a guard, another thread) stay. Not put back: the insides of anything else an attribute holds (a
    container inside a container, a deque, a tensor that is a plain attribute written in place, an object's own
    attributes), hooks removed since (a one-shot hook; a lazy module drops its own as it initializes), a module's
    class, and state outside the modules (globals, the random number generators).
    """

    def __init__(self, model: nn.Module) -> None:
        modules = list(model.modules())
        self.buffers = SavedBuffers(modules)
        self.bindings = [(slots, dict(slots)) for m in modules for slots in (vars(m), m._parameters, m._modules)]
        # every container attribute but nn.Module's own (hooks, _buffers, ...): those follow the module's class, which
        # stays as it is; a user's private ``self._seen = []`` is the user's
        containers = {id(v): v for m in modules for k, v in vars(m).items()
                      if k not in MODULE_OWN and isinstance(v, (list, dict, set))}
        self.items = [(c, _items(c)) for c in containers.values()]
        params = {id(p): p for m in modules for p in m._parameters.values()
                  if p is not None and not is_lazy(p) and not p.is_inference()}
        self.params = [(p, p.detach().clone()) for p in params.values()]

    def restore(self) -> None:
        held = {id(x) for _, before in self.bindings for x in before.values()}
        held |= {id(x) for container, items in self.items for x in _values(container, items)}
        for now, before in self.bindings:
            if now.keys() != before.keys() or any(now[k] is not v for k, v in before.items()):
                _remove_new_handles(now.values(), held)
                now.clear()
                now.update(before)
        for container, items in self.items:
            if not _holds(container, items):
                _remove_new_handles(_values(container, _items(container)), held)
                _put_items(container, items)
        self.buffers.restore()
        for param, before in self.params:
            write_back(param, before)

    def __enter__(self) -> SavedState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


#: The attributes every ``nn.Module`` has (its hooks, parameters, buffers, submodules, flag): not the user's.
MODULE_OWN = frozenset(vars(nn.Module()))


def _values(container: list | dict | set, items: list) -> list:
    """The objects among ``items`` (:func:`_items` of ``container``): a dict's values, a list's or a set's items."""
    return [value for _, value in items] if isinstance(container, dict) else items


def _remove_new_handles(values: Iterable[object], held: set[int]) -> None:
    """Remove the hooks of the ``RemovableHandle`` objects among ``values``, or in a list, tuple, set or dict among
    them, that are not in ``held`` (ids): handles the modules came to hold since a snapshot (a container made in the
    call holds them too: ``self._handles = [h]``). torch/utils/hooks.py: ``remove`` is a no-op once done."""
    for value in values:
        if id(value) in held:
            continue
        if isinstance(value, RemovableHandle):
            value.remove()
        elif isinstance(value, (list, tuple, set, frozenset, dict)):
            _remove_new_handles(value.values() if isinstance(value, dict) else value, held)


def _items(container: list | dict | set) -> list:
    """A list, dict or set's items (a dict's as ``(key, value)`` pairs), the objects themselves."""
    return list(container.items()) if isinstance(container, dict) else list(container)


def _holds(container: list | dict | set, items: list) -> bool:
    """Whether ``container`` holds the very objects ``items`` (from :func:`_items`), in that order but for a set."""
    if isinstance(container, set):
        return {id(x) for x in container} == {id(x) for x in items}
    now = _items(container)
    if isinstance(container, dict):
        return len(now) == len(items) and all(k is j and v is w for (k, v), (j, w) in zip(now, items))
    return len(now) == len(items) and all(x is y for x, y in zip(now, items))


def _put_items(container: list | dict | set, items: list) -> None:
    """Give ``container`` the ``items`` (from :func:`_items`) in place, by the built-in type's own methods: a
    subclass's would transform them (a Counter's ``update`` adds counts; a ``__setitem__`` may wrap a value)."""
    if isinstance(container, list):
        list.__setitem__(container, slice(None), items)
    elif isinstance(container, dict):
        base = OrderedDict if isinstance(container, OrderedDict) else dict  # OrderedDict keeps its own order
        base.clear(container)
        for key, value in items:
            base.__setitem__(container, key, value)
    else:
        set.clear(container)
        set.update(container, items)


def flatten_tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors of a nest of tuples, lists, mappings and dataclass instances (a model's output object), in
    order, detached (a ``PackedSequence`` as its sequences padded into the rows of one batch-first tensor);
    anything else is skipped."""
    if isinstance(obj, torch.Tensor):
        return [obj.detach()]
    if isinstance(obj, nn.utils.rnn.PackedSequence):
        return [nn.utils.rnn.pad_packed_sequence(obj, batch_first=True)[0].detach()]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in flatten_tensors(o)]
    if isinstance(obj, Mapping):
        return [t for o in obj.values() for t in flatten_tensors(o)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in flatten_tensors(getattr(obj, f.name))]
    return []
