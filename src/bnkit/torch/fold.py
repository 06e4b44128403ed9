"""Fold inference-mode BatchNorm into the convolution or linear layer next to it.

In eval mode a BN layer is a per-channel affine map ``y = s * x + t`` with::

    s = gamma / sqrt(running_var + eps),    t = beta - running_mean * s

(``running_var`` is PyTorch's unbiased running estimate, used as is; see
``torch/nn/functional.py:batch_norm``). Folding it into its neighbour:

* BN **after** a layer ``z = W x + b`` (Conv1d/2d/3d, ConvTranspose1d/2d/3d,
  Linear): scale the weight's output channels by ``s``, bias ``b' = s * b + t``.
  A layer built with ``bias=False`` gets a bias.
* BN **before** a Linear, or a Conv that does not zero-pad: ``W (s x + t) + b`` is
  ``(W s) x + (b + W t)``, exact because every input pixel the conv reads is a BN
  output (reflect/replicate/circular padding copies BN outputs, so it is exact
  too). With zero padding the padded zeros would become ``t`` after the BN but
  stay 0 after the fold, so that fold is refused; so is a BN before a
  ConvTranspose, whose border outputs sum fewer inputs than the centre, and one
  after which a tensor may be written in place before the layer runs (the
  ``nn.Identity`` replacing the BN returns its input itself).

All folds into one layer are composed in float64 and cast back to the layer's
dtype once, so fp16/bf16 weights get the correctly rounded folded value rather
than an fp16-computed one. Compare ``torch/nn/utils/fusion.py``
(``fuse_conv_bn_weights``, computed in the weights' dtype) and
``torch/fx/experimental/optimization.py`` (``fuse``, which fuses a conv called
twice once per call, silently changing the first call's output).

Which layer feeds which is read from a ``torch.fx`` trace of the model in eval
mode, with every BatchNorm subclass (SyncBatchNorm, bnkit's drop-in layers) kept
as one node; so is bnkit's ``FrozenBatchNorm*d``, eval-mode BN held in buffers,
which folds like one (whatever its train/eval flag). When tracing fails the fold
falls back to neighbours inside plain ``nn.Sequential`` containers and says so in
the report. Only layers with
PyTorch's own forward are folded into: a subclass that changes the forward
(weight standardization, QAT fake-quant), a parametrized weight, or a module
with forward hooks is left alone, with the reason; so is a BN or layer held in
several attribute slots (``self.norm = self.bn``; an aliased container holding it
is fine: replacing it in its one slot replaces it on every path), and a layer
whose weight or bias is shared with another module (a fold would untie it, and
a freshly built model reloads it tied). The
original model is never modified: the folded model is a deep copy of it, with
each folded BN replaced by ``nn.Identity`` (so it keeps its class, forward and
state-dict names) that keeps the BN's plain attributes (``num_features``, ``eps``, ...)
for a forward that reads them.
"""
from __future__ import annotations

import gc
import inspect
import math
import operator
import sys
import types
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from ..findings import Finding
from ..precision import FLOAT32_OFFSET_NOTE_RATIO, OFFSET_NOTE_RATIO, fold_tolerance
from .io import LOAD_REAL_WEIGHTS, refuse_meta
from .modules import (
    MODULE_OWN, SavedState, as_args, bn_or_frozen_layers, channels, check_channel_tensors, deep_copy, eval_mode,
    exact_float32, flatten_tensors, has_stock_eval_forward, is_batchnorm, is_bn_or_frozen, is_compiled_wrapper,
    map_nested, parallel_device, to_device, uninitialized_lazy, unwrapped,
)

__all__ = ["fold_bn", "FoldReport", "FoldedBN", "FoldVerificationError"]

_LAYER_TYPES = (_ConvNd, nn.Linear)  # _ConvTransposeNd derives from _ConvNd
_Weights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # folded float64 (weight, bias) per layer name
# `a op= b` on a tensor writes `a` in place, but fx records it as `a op b` (a Proxy has no in-place operators)
_AUGMENTABLE = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
                          operator.pow, operator.matmul, operator.and_, operator.or_, operator.xor, operator.lshift,
                          operator.rshift})
# PyTorch's methods and functions (torch.*, torch.nn.functional.*) known to return new memory, never an argument
# or a view of one; any other op may (a user's function is matched by its object, never by a name it shares)
_FRESH_NAMES = (
    "add", "sub", "mul", "div", "true_divide", "floor_divide", "remainder", "pow", "matmul", "mm", "bmm", "addmm",
    "neg", "abs", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "sigmoid", "tanh", "relu", "gelu", "silu", "elu",
    "leaky_relu", "hardtanh", "softplus", "softmax", "log_softmax", "clamp", "clip", "where", "clone", "cat",
    "concat", "stack", "sum", "mean", "amax", "amin", "max", "min", "prod", "linear", "conv1d", "conv2d", "conv3d",
    "pad", "interpolate", "avg_pool1d", "avg_pool2d", "max_pool1d", "max_pool2d", "adaptive_avg_pool2d",
    "layer_norm", "group_norm", "embedding", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
    "randn_like")
# PyTorch's views and conversions, which read their argument and write nothing (``torch.flatten``, ``x.view``)
_READ_ONLY_NAMES = (
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
    "permute", "t", "expand", "expand_as", "narrow", "select", "unbind", "split", "chunk", "movedim", "swapaxes",
    "diagonal", "detach", "contiguous", "to", "type_as", "float", "double", "half", "ravel", "broadcast_to",
    "broadcast_tensors", "dropout")


def _torch_functions(names: tuple[str, ...]) -> frozenset:
    """The functions of ``torch`` and ``torch.nn.functional`` of those names, as objects (a user's function that
    shares a name is not one of them)."""
    return frozenset(getattr(module, name) for module in (torch, F) for name in names if hasattr(module, name))


_FRESH_METHODS = frozenset(_FRESH_NAMES) | {"size", "dim", "numel", "item", "tolist"}
_FRESH_FUNCTIONS = _torch_functions(_FRESH_NAMES)
_READ_ONLY_METHODS = frozenset(_READ_ONLY_NAMES)
# reading an attribute or an item writes nothing, nor does arithmetic into a new tensor (the first operand's
# augmented assignment is checked apart)
_READ_ONLY_FUNCTIONS = _torch_functions(_READ_ONLY_NAMES) | {getattr, operator.getitem} | _AUGMENTABLE
# a tensor's attributes that are not tensors (x.shape[0] * 2 is no write into x)
_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "layout", "is_cuda", "requires_grad"})
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)
_PLAIN_FORWARDS = {
    cls.forward: cls
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
}


class FoldVerificationError(RuntimeError):
    """:func:`fold_bn`'s folded model gave other outputs than the original on ``example_inputs``; ``report`` is the
    fold's, with the difference."""

    def __init__(self, message: str, report: FoldReport) -> None:
        super().__init__(message)
        self.report = report

    def __reduce__(self) -> tuple:  # pickled (a process pool sends it back) with its report
        return type(self), (self.args[0], self.report), self.__dict__


@dataclass
class FoldedBN:
    """One folded BN: ``bn`` folded into ``into``, which it follows (``"after"``) or precedes (``"before"``)."""

    bn: str
    into: str
    position: str
    bias_added: bool = False


@dataclass
class FoldReport:
    """What :func:`fold_bn` did.

    Attributes:
        method: ``"fx"`` (data flow read from a torch.fx trace) or ``"sequential"``
            (tracing failed; only neighbours inside ``nn.Sequential`` were considered).
        folded: one :class:`FoldedBN` per folded BN layer, in folding order.
        left: ``{bn_name: reason}`` for every BN layer that was not folded.
        notes: assumptions made and things not checked.
        max_abs_diff: ``max |a - b|`` over every output tensor of the original (``a``)
            and folded (``b``) models in eval mode on ``example_inputs``; None when
            not verified. A NaN/Inf in ``b`` where ``a`` is finite counts as ``inf``; a NaN in both at
            one place is a match (outputs with no finite value at all count as ``inf``: nothing verified).
        max_rel_diff: ``max_abs_diff / max |a|`` (None when not verified).
    """

    method: str = "fx"
    folded: list[FoldedBN] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None

    @property
    def n_folded(self) -> int:
        return len(self.folded)

    @property
    def n_left(self) -> int:
        return len(self.left)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FoldReport:
        """The report back from :meth:`to_dict` output (e.g. JSON saved beside the folded weights)."""
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["folded"] = [FoldedBN(**f) for f in fields.get("folded", [])]
        return cls(**fields)

    def findings(self) -> list[Finding]:
        """One ``info`` :class:`~bnkit.findings.Finding` per BN layer left unfolded, with its reason."""
        return [
            Finding("info", name, "BatchNorm layer not folded", evidence=reason, code="fold.left")
            for name, reason in self.left.items()
        ]

    def summary(self) -> str:
        lines = [f"folded {self.n_folded} BatchNorm layer(s), left {self.n_left} (via {self.method})"]
        lines += [
            f"  folded {f.bn} -> {f.into} ({f.position}{', bias added' if f.bias_added else ''})" for f in self.folded
        ]
        lines += [f"  left   {name}: {reason}" for name, reason in self.left.items()]
        lines += [f"  note: {note}" for note in self.notes]
        if self.max_abs_diff is not None:
            lines.append(f"  max |original - folded| = {self.max_abs_diff:.3g} (relative {self.max_rel_diff:.3g})")
        return "\n".join(lines)

    def restructure(self, model: nn.Module) -> nn.Module:
        """Give a freshly built instance of the original architecture the folded structure, in place.

        Folded BN layers become ``nn.Identity`` and layers that received a bias get one,
        so ``restructured.load_state_dict(folded.state_dict())`` (strict) restores the folded
        model without the original file or code change. Returns the module restructured: ``model``,
        or for a wrapper (``torch.compile``, DataParallel, DDP, AveragedModel) the module inside it,
        which is what :func:`fold_bn` folds and returns.
        """
        model, _ = unwrapped(model)
        for f in self.folded:
            if f.bias_added:
                layer = model.get_submodule(f.into)
                w = layer.weight
                layer.bias = nn.Parameter(torch.zeros(_out_channels(layer), dtype=w.dtype, device=w.device))
        _replace_modules(model, [f.bn for f in self.folded], _identity_for)
        return model


@torch.no_grad()  # no graph to record; and a model made under torch.inference_mode can be read only so
def fold_bn(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    verify: bool = True,
    force: bool = False,
) -> tuple[nn.Module, FoldReport]:
    """Fold every foldable BatchNorm layer of ``model`` into its neighbour; return ``(folded_copy, report)``.

    Args:
        model: any ``nn.Module``; it is not modified, and the copy keeps every module's
            train/eval flag and state: what the probe and verification forwards write is put back (attribute
            bindings, parameter and buffer values, the items of lists, dicts and sets a module attribute holds; an
            ActNorm initializing itself, a cache list appended to), not what they write inside other objects or
            outside the modules (see :class:`~bnkit.torch.modules.SavedState`). A wrapped model
            (``torch.compile``, ``DataParallel``, DDP, ``AveragedModel``) is folded as the module it
            runs, which is what is returned.
        example_inputs: a tensor or a tuple of positional inputs (anything else is passed
            as the single input). Used to learn the rank of layer outputs (a
            Linear->BatchNorm1d fold is exact only on ``(N, C)``), to count module calls
            when tracing fails, and, with ``verify``, to compare the two models.
        verify: run the original and folded models (copies, in eval mode; float32 on CUDA
            without TF32, see :class:`~bnkit.torch.modules.exact_float32`) on
            ``example_inputs`` with the same random draws and put the difference in the report; beyond about
            ten unit roundoffs of the least precise parameter or output dtype
            (:func:`bnkit.precision.fold_tolerance`), on the floating outputs where there are any, the fold is
            refused.
        force: fold BN layers in training mode or with never-updated statistics anyway
            (their running statistics are used, as in eval mode).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: BN layers in training mode or never updated (without ``force``);
            NaN/Inf BN statistics or affine parameters, or ``running_var + eps <= 0``;
            folded weights beyond the layer's dtype (float16 with a tiny variance);
            uninitialized lazy modules; NaN/Inf in ``example_inputs``; with ``verify``, a folded
            model that raises on ``example_inputs`` (its forward relies on the BN layers otherwise).
        FoldVerificationError: with ``verify``, a folded model whose outputs on ``example_inputs`` differ from
            the original's beyond that tolerance (a hook, or a branch the trace did not show).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_bn needs a torch.nn.Module, got {type(model).__name__}")
    device = parallel_device(model)  # DataParallel / DDP sent inputs there: the module inside is run with them
    model, wrappers = unwrapped(model)
    _check_model(model, force)
    inputs = _as_tuple(example_inputs if device is None else to_device(example_inputs, device))
    work = deep_copy(model)
    report = FoldReport()
    if wrappers:
        report.notes.append(f"folded the module inside {' > '.join(wrappers)}: the folded copy is that module "
                            "(wrap it again if you need the wrapper)")
    reference, plan = _plan(_shadow(work), inputs, report, original=model)
    report.folded = _entries(work, plan)
    report.notes += _low_precision_shift_notes(work, report.folded)
    _apply(work, plan, _folded_weights(work, plan))

    if verify and inputs is not None:
        result = _run_folded(work, inputs, report.folded)
        # judged on the floating outputs where there are any (a float16 argmax flips at near-ties), against about
        # ten unit roundoffs of the least precise parameter or output dtype (bnkit.precision), as for ONNX files
        floating = [t for t in flatten_tensors(reference) if t.is_floating_point()]
        if floating:
            reference, result = floating, [t for t in flatten_tensors(result) if t.is_floating_point()]
        report.max_abs_diff, report.max_rel_diff, small = _compare(reference, result)
        if report.max_abs_diff is None:
            report.notes.append("not verified: the model's output holds no tensors to compare")
        tolerance = fold_tolerance(str(t.dtype).removeprefix("torch.") for t in (*model.parameters(), *floating))
        if report.max_rel_diff is not None and not report.max_rel_diff <= tolerance:
            names = ", ".join(f"'{f.bn}'" for f in report.folded)
            why = ("the forward depends on the folded layers in a way the plan did not see (a hook, a branch on an "
                   "argument or on whether a bias exists)")
            if small:  # each output is judged on its own scale
                why = (f"the worst is {small}: if it is 0 but for rounding (a penalty, a centred mean), its rounding "
                       f"alone can exceed this, so compare it yourself; else {why}")
            raise FoldVerificationError(
                f"the folded model differs from the original on example_inputs: max relative difference "
                f"{report.max_rel_diff:.3g} > {tolerance:g} (folded {names}): {why}; verify=False returns such a "
                "model anyway", report)
    elif verify:
        report.notes.append("not verified: no example_inputs given")
    return work, report


@torch.no_grad()
def fold_plan(model: nn.Module, example_inputs: Any = None, *, force: bool = False) -> FoldReport:
    """What :func:`fold_bn` would fold, without copying the tensors of ``model`` or changing it.

    The report's ``folded`` lists the pairs ``fold_bn`` would fold (``bias_added`` as it
    would set it) and ``left`` the rest with their reasons; nothing is verified. With
    ``example_inputs`` the model runs once in eval mode with forward hooks, to learn the ranks of layer outputs
    (twice where tracing fails). Where a module holds state :class:`~bnkit.torch.modules.SavedState` does not put
    back whole (a deque, a dataclass), the runs and the trace are made on a copy of the modules that holds the
    model's own parameters and buffers (:func:`_shadow`), so what they write there stays in the copy; attribute
    bindings and the items of lists, dicts and sets are put back, and parameter and buffer values they change are
    put back (a copy of them is held meanwhile; only tensors the runs changed are written, so an autograd graph that
    saved them still runs backward); what they write outside the model (a global) is not (see
    :class:`~bnkit.torch.modules.SavedState`). Whether the folded weights fit the layers' dtype is checked by a cheap
    bound (:func:`_within_dtype_bound`), and where that cannot tell, by computing them as :func:`fold_bn` does. Same
    arguments and errors as :func:`fold_bn`; cheaper, as no folded copy of the model is made.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_plan needs a torch.nn.Module, got {type(model).__name__}")
    device = parallel_device(model)  # as in fold_bn
    model, _ = unwrapped(model)
    _check_model(model, force)
    report = FoldReport()
    inputs = _as_tuple(example_inputs if device is None else to_device(example_inputs, device))
    _, plan = _plan(_shadow(model), inputs, report, original=model)
    report.folded = _entries(model, plan)
    report.notes += _low_precision_shift_notes(model, report.folded)
    if not _within_dtype_bound(model, plan):
        _folded_weights(model, plan)  # raises where a folded weight is beyond its layer's dtype
    return report


def _shadow(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules holding its own parameters and buffers, for the plan's runs and trace, whose
    writes to other state (a deque or dataclass an attribute holds, which :class:`SavedState` does not put back)
    then reach no object of the model's; ``model`` itself where its modules hold no such state (the copy costs
    milliseconds), or where it cannot be copied (objects nested too deeply, a lock, a generator, an open file), whose
    such objects may then keep what the trace put there."""
    if all(_plain(v) for m in model.modules() for k, v in vars(m).items() if k not in MODULE_OWN):
        return model
    try:
        return deep_copy(model, share_tensors=True)
    except Exception:  # noqa: BLE001 - whatever copy.deepcopy raises: plan on the model, as before there was a copy
        return model


_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Tensor, type,
          types.FunctionType, types.BuiltinFunctionType)


def _plain(value: object, nested: bool = False) -> bool:
    """Whether a module attribute holds only what :class:`SavedState` puts back whole: numbers, strings, tensors, and
    lists, tuples, dicts and sets of them (their items, one level)."""
    if isinstance(value, _ATOMS):
        return True
    if nested or not isinstance(value, (list, tuple, set, frozenset, dict)):
        return False
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    return all(_plain(item, True) for item in items)


def _plan(work: nn.Module, inputs: tuple | None, report: FoldReport,
          original: nn.Module | None = None) -> tuple[Any, list[tuple[str, str, str]]]:
    """The eval-mode outputs on ``inputs`` (None without them) and the ``(bn, layer, position)`` pairs to fold;
    ``original``: the model ``work`` copies, if it is a copy (see :func:`_shared_names`).

    Reads ``work`` only: a probe forward in eval mode, then a torch.fx trace (or, when
    tracing fails, the ``nn.Sequential`` neighbours), each from ``work``'s state as found and leaving it so
    (a forward may write its parameters, buffers or attributes, even in eval mode). Fills ``report.method``,
    ``report.left`` and ``report.notes``.
    """
    reference, probe = None, {}
    with SavedState(work) as saved:
        if inputs is not None:
            reference, probe = _probe(work, inputs)
            saved.restore()
        traced = _trace_or_note(work, report, None if inputs is None else len(inputs))
        # forward hooks are not in the graph (fx runs forwards, not hooks): they may call a layer or read its tensors
        hooked = [] if traced is None else _hooks_not_traced(work, traced[0])
        if probe and (traced is None or hooked):
            saved.restore()
            _note_reads_outside_forward(work, inputs, probe)
    shared = _shared_names(work, original, report.notes)
    if traced is None:
        return reference, _plan_sequential(work, probe, shared, report)
    if hooked and not probe:
        report.notes.append(f"forward hooks of {', '.join(hooked[:3])}{', ...' if len(hooked) > 3 else ''} are not "
                            "in the traced graph: a hook that calls a folded layer or reads its tensors is not seen "
                            "(pass example_inputs to check)")
    return reference, _plan_fx(work, *traced, probe, shared, report)


def _hooks_not_traced(work: nn.Module, graph: fx.Graph) -> list[str]:
    """The modules with forward hooks, but the BN layers and layers ``graph`` calls as modules, which a hook of
    their own keeps out of a fold (:func:`_bn_reason`, :func:`_layer_reason`): the model, containers and other
    leaves (an activation) may hook code that calls a layer or reads its tensors."""
    pair = {node.target for node in graph.nodes if node.op == "call_module"}
    return [name or type(work).__name__ for name, m in work.named_modules()
            if _hooked(m) and not (name in pair and (is_bn_or_frozen(m) or isinstance(m, _LAYER_TYPES)))]


def _trace_or_note(work: nn.Module, report: FoldReport, given: int | None) -> tuple[fx.Graph, set[int]] | None:
    """The eval-mode fx graph of ``work`` and the modules whose tensors tracing read (see :func:`_trace`); None
    where tracing fails, with ``report.method`` ``"sequential"`` and a note saying why. ``given``: how many
    positional inputs the call has (None: unknown)."""
    defaults, note = _defaults(work, given)
    try:
        with eval_mode(work), _generators_kept():  # fx runs what does not depend on the inputs: torch.rand(())
            traced = _trace(work, report, defaults)
        report.notes += [note] if note else []
        return traced
    except Exception as exc:  # torch.fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        report.method = "sequential"
        report.notes.append(
            f"torch.fx could not trace the model ({type(exc).__name__}: {first_line}); "
            "folded only neighbours inside nn.Sequential containers, judged on the path the example inputs took: "
            "a branch that other inputs take and that calls a folded layer without its BatchNorm "
            "(self.seq[0](x)) would compute with the folded weights"
        )
        return None


# ---------------------------------------------------------------------------------------------- checks


def _check_model(model: nn.Module, force: bool) -> None:
    if lazy := uninitialized_lazy(model):
        raise ValueError(f"uninitialized lazy modules (run one forward pass first): {', '.join(lazy)}")
    refuse_meta(model.state_dict(keep_vars=True).items(), "the model", LOAD_REAL_WEIGHTS)
    check_channel_tensors(bn_or_frozen_layers(model))  # float64 folding would broadcast a one-element tensor
    training, never, nonfinite, nonpositive = [], [], [], []
    for name, bn in bn_or_frozen_layers(model):
        tensors = [t for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias) if t is not None]
        if not all(bool(torch.isfinite(t).all()) for t in tensors) or not math.isfinite(float(bn.eps)):
            nonfinite.append(name)
        if bn.running_mean is None:
            continue  # track_running_stats=False: reported as not foldable
        if bool((_f64(bn.running_var) + bn.eps <= 0).any()):
            nonpositive.append(name)
        if bn.training and is_batchnorm(bn):  # a frozen layer computes the eval transform in either mode
            training.append(name)
        if _never_updated(bn):
            never.append(name)
    if nonfinite:
        raise ValueError(
            "BatchNorm layers with NaN/Inf statistics, affine parameters or eps cannot be folded: "
            + ", ".join(nonfinite)
        )
    if nonpositive:
        raise ValueError(
            "BatchNorm layers with running_var + eps <= 0 somewhere (corrupt statistics; sqrt would put NaN into "
            f"the folded weights) cannot be folded: {', '.join(nonpositive)}"
        )
    problems = []
    if training:
        problems.append(f"in training mode (call model.eval() first): {', '.join(training)}")
    if never:
        problems.append(
            f"never updated (running_mean all 0, running_var all 1, num_batches_tracked 0): {', '.join(never)}"
        )
    if problems and not force:
        raise ValueError(
            "refusing to fold BatchNorm layers " + "; and ".join(problems)
            + ". Pass force=True to fold their running statistics anyway."
        )


def _never_updated(bn: nn.Module) -> bool:
    tracked = bn.num_batches_tracked
    return (
        (tracked is None or int(tracked) == 0)
        and bool((bn.running_mean == 0).all())
        and bool((bn.running_var == 1).all())
    )


def _as_tuple(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    inputs = as_args(example_inputs)
    for t in flatten_tensors(inputs):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError("example_inputs contain NaN/Inf; verification needs finite inputs")
    return inputs


# ---------------------------------------------------------------------------------------------- running


def _run_eval(model: nn.Module, inputs: tuple) -> Any:
    """``model``'s eval-mode outputs on copies of ``inputs``, with the random generators seeded alike for every run
    (a VAE's sampling, MC dropout: the original and the folded model draw the same numbers) and put back after."""
    with eval_mode(model), torch.no_grad(), exact_float32(), _generators_kept():
        torch.manual_seed(0)
        return model(*map_nested(inputs, torch.Tensor.clone))  # a model writing into its input skews nothing


def _generators_kept() -> Any:
    """PyTorch's random generators (the CPU's and every initialized CUDA device's, which ``torch.manual_seed``
    seeds) put back as they were after the block: a forward run or traced by bnkit draws from them."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=cuda)


def _run_folded(work: nn.Module, inputs: tuple, folded: list[FoldedBN]) -> Any:
    """The folded ``work``'s eval-mode outputs, run from its state and leaving it so (the reference ran from it).

    Raises ValueError, naming the folded BN layers, where the forward raises: it ran on the original model, so it
    relies on something of the BN layers that the ``nn.Identity`` replacing them lacks.
    """
    with SavedState(work):
        try:
            return _run_eval(work, inputs)
        except Exception as exc:  # noqa: BLE001 - whatever the user's forward raises
            names = ", ".join(f"'{f.bn}'" for f in folded)
            raise ValueError(f"the folded model raised {type(exc).__name__} ({exc}) on example_inputs, which the "
                             f"original model ran: its forward relies on something of the BN layers folded "
                             f"({names}) that the nn.Identity replacing them lacks") from exc


def _probe(model: nn.Module, inputs: tuple) -> tuple[Any, dict[int, dict]]:
    """Run ``model`` once in eval mode: its outputs, and for each module called (by id) its call count and output
    ranks (``"read"`` False: see :func:`_note_reads_outside_forward`)."""
    probe: dict[int, dict] = {}

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        entry = probe.setdefault(id(module), {"calls": 0, "ndim": set(), "read": False})
        entry["calls"] += 1
        if isinstance(output, torch.Tensor):
            entry["ndim"].add(output.dim())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        out = _run_eval(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return out, probe


def _note_reads_outside_forward(model: nn.Module, inputs: tuple, probe: dict[int, dict]) -> None:
    """Run ``model`` once more in eval mode and set ``"read"`` in the ``probe`` entry of each BN and Conv/Linear
    layer called whose parameters or buffers code outside its own forward reads (``self.body[1].weight`` in a
    parent's forward, which a torch.fx trace would show as a ``get_attr``); the run's outputs are not used."""
    watched = [m for m in model.modules() if id(m) in probe and (is_bn_or_frozen(m) or isinstance(m, _LAYER_TYPES))]
    with _reads_outside_forward(watched) as read:
        _run_eval(model, inputs)
    for key in read:
        probe[key]["read"] = True


#: What a forward may get of a tensor without reading its values (``next(self.parameters()).device``,
#: ``torch.zeros_like(weight)``) ...
_METADATA = frozenset({
    "shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_leaf", "size", "dim", "numel",
    "stride", "is_floating_point", "is_complex", "element_size", "is_contiguous", "nelement", "get_device",
    "is_meta", "is_sparse", "is_quantized", "is_mps", "is_xpu", "is_nested", "is_inference", "__len__", "nbytes",
    "itemsize", "data_ptr", "storage_offset", "new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
})
#: ... and functions that read only the metadata of the tensors after the first (``x.to(weight)``)
_OTHERS_METADATA = frozenset({"to", "type_as", "expand_as", "view_as", "reshape_as"})


class _TensorReads(TorchFunctionMode):
    """Notes, by module id, the modules whose parameters or buffers a torch function gets as real tensors while
    ``skip(module_id)`` is false: reads a torch.fx trace cannot show (``for p in self.conv.parameters()``,
    ``self.state_dict()``: fx evaluates them while tracing and keeps the result as a constant) or, in a run,
    reads outside the owner's own forward. Metadata (:data:`_METADATA`) is no read of values: a tensor reached by
    iterating (``next(model.parameters()).dtype``) is whichever comes first, which may be a BN's, and the first
    after a fold has the same dtype and device; ``next(self.bn.parameters())``, which a folded BN no longer has,
    only verification shows."""

    def __init__(self, modules: list[nn.Module], skip: Any = lambda key: False) -> None:
        super().__init__()
        self.owners: dict[int, list[int]] = {}
        for m in modules:
            for t in (*m._parameters.values(), *m._buffers.values()):
                if t is not None:
                    self.owners.setdefault(id(t), []).append(id(m))
        self.skip = skip
        self.read: set[int] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property: its name is the descriptor's
            name = getattr(getattr(func, "__self__", None), "__name__", "")
        for t in _leaves(_values_read(name, args, kwargs), torch.Tensor):
            for key in self.owners.get(id(t), ()):
                if not self.skip(key):
                    self.read.add(key)
        return func(*args, **kwargs)


def _values_read(name: str, args: tuple, kwargs: dict) -> tuple:
    """The arguments of a call of ``name`` whose values it reads: none for metadata (:data:`_METADATA`, and
    ``w.type()``, a string, where ``w.type(dtype)`` converts), the first for :data:`_OTHERS_METADATA`, else all.
    Shared by the run's torch functions (:class:`_TensorReads`) and the trace's nodes (:func:`_metadata_use`)."""
    if name in _METADATA or (name == "type" and len(args) == 1 and not kwargs):
        return ()
    return args[:1] if name in _OTHERS_METADATA else (args, kwargs)


def _leaves(obj: Any, kind: type) -> Iterator[Any]:
    """The ``kind`` instances themselves (their identity is what counts: tensors, not detached copies; fx nodes)
    in nested tuples, lists and dicts of a call's arguments."""
    if isinstance(obj, kind):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _leaves(o, kind)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _leaves(o, kind)


class _NotingDict(dict):
    """A dict that calls ``note()`` on each lookup ``d[key]``."""

    def __init__(self, items: dict, note: Any) -> None:
        super().__init__(items)
        self.note = note

    def __getitem__(self, key: Any) -> Any:
        self.note()
        return super().__getitem__(key)


@contextmanager
def _reads_outside_forward(modules: list[nn.Module]) -> Iterator[set[int]]:
    """The ids of those of ``modules`` whose parameters or buffers are read in the block while their own forward is
    not running (forward hooks count the forwards running).

    Such reads go through ``nn.Module.__getattr__``, which looks the name up in ``_parameters`` or ``_buffers``: for
    the block these are :class:`_NotingDict` copies (put back after it, with what the block added or removed); each
    module keeps its class, so a forward that dispatches on ``type(module)`` runs as it does outside. Values
    reached without a lookup (``module.parameters()``, ``state_dict()``) are seen where a torch function gets
    them (:class:`_TensorReads`).
    """
    read: set[int] = set()
    running: Counter[int] = Counter()

    def enter(module: nn.Module, args: tuple) -> None:
        running[id(module)] += 1

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        running[id(module)] -= 1

    def noter(key: int) -> Any:
        return lambda: running[key] or read.add(key)

    saved = [(m, slot, getattr(m, slot)) for m in modules for slot in ("_parameters", "_buffers")]
    handles = []
    ops = _TensorReads(modules, skip=lambda key: running[key] > 0)  # values reached otherwise (.parameters())
    try:
        for m in modules:
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave, always_call=True)]
        for m, slot, items in saved:
            m.__dict__[slot] = _NotingDict(items, noter(id(m)))
        with ops:
            yield read
        read |= ops.read
    finally:
        for h in handles:
            h.remove()
        for m, slot, items in saved:
            now = m.__dict__[slot]
            if now is not items:
                items.clear()
                items.update(now)
                m.__dict__[slot] = items


def _low_precision_shift_notes(model: nn.Module, folded: list[FoldedBN]) -> list[str]:
    """Notes for BN layers folded *before* a float16/bfloat16/float32 layer whose inputs sit far from zero.

    The BN's shift ``-mean * gamma / sigma`` moves into the layer's bias, where it cancels the input's mean in the
    layer's own arithmetic: with ``|mean| / sigma = r`` the folded layer loses about ``r`` times its dtype's
    roundoff (measured: 11-36x worse than the unfolded model at r = 30-100 in float16, 100x at r = 1e3 in
    float32), which random verification inputs near zero do not show. Noted above :data:`OFFSET_NOTE_RATIO` in
    float16/bfloat16, :data:`FLOAT32_OFFSET_NOTE_RATIO` in float32.
    """
    limits = {torch.float16: OFFSET_NOTE_RATIO, torch.bfloat16: OFFSET_NOTE_RATIO,
              torch.float32: FLOAT32_OFFSET_NOTE_RATIO}
    notes = []
    for f in folded:
        layer = model.get_submodule(f.into)
        if f.position != "before" or layer.weight.dtype not in limits:
            continue
        bn = model.get_submodule(f.bn)
        ratio = float((bn.running_mean.double().abs() / (bn.running_var.double() + bn.eps).sqrt()).max())
        if ratio > limits[layer.weight.dtype]:
            notes.append(f"{f.bn} folded before {f.into} in {str(layer.weight.dtype).removeprefix('torch.')}: its "
                         f"inputs sit up to {ratio:.3g} standard deviations from zero, and the folded bias cancels "
                         "that offset in the layer's own precision, so outputs on real data may lose about as many "
                         "times its precision; verify on real data, or fold in "
                         f"{'float64' if layer.weight.dtype == torch.float32 else 'float32'}")
    return notes


def _compare(a: Any, b: Any) -> tuple[float | None, float | None, str | None]:
    """``max|a - b|`` over the output tensors, the largest of each tensor's over its own ``max|a|`` (the absolute
    difference itself where that is 0): a wrong score head beside boxes in pixels is not lost in the boxes' scale;
    and, where that worst tensor's values are below 1e-3 of the largest tensor's, a phrase naming it. Such an output
    may be 0 but for rounding (a penalty, a centred mean), which its own scale cannot tell from an error: it is
    judged all the same (a refused fold can be checked by hand; a wrong one passed would be silent). None, None,
    None for outputs that hold no tensors (nothing to compare).

    As in :func:`bnkit.onnx.verify.compare`, NaN in both at one place, like equal infinities, is a match, and a
    NaN/Inf in one where the other differs counts as inf; so do outputs with values but no finite one in ``a``
    (nothing would be verified), where only floating outputs count if there are any (an ArgMax class index stays
    finite over NaN logits).
    """
    pairs = list(zip(flatten_tensors(a), flatten_tensors(b), strict=True))
    if not pairs:
        return None, None, None
    diffs, finite_seen, values_seen = [], False, False  # (max|a - b|, max|a|) per tensor
    any_floating = any(x.is_floating_point() or x.is_complex() for x, _ in pairs)
    for x, y in pairs:
        if not x.numel():
            continue
        counts = x.is_floating_point() or x.is_complex() or not any_floating
        x, y = _f64(x), _f64(y)
        same = (x == y) | (x.isnan() & y.isnan())
        d = float(torch.where(same, 0.0, (x - y).abs()).nan_to_num(nan=math.inf, posinf=math.inf).max())
        finite = x[torch.isfinite(x)]
        diffs.append((d, float(finite.abs().max()) if finite.numel() else 0.0))
        finite_seen = finite_seen or (counts and bool(finite.numel()))
        values_seen = values_seen or counts
    if values_seen and not finite_seen:
        return math.inf, math.inf, None
    rel = [d / scale if scale > 0 else d for d, scale in diffs]
    if not rel:
        return 0.0, 0.0, None
    worst, largest = max(range(len(rel)), key=rel.__getitem__), max(scale for _, scale in diffs)
    small = diffs[worst][1] < 1e-3 * largest
    note = (f"output tensor {worst} (values up to {diffs[worst][1]:.3g}, {diffs[worst][1] / largest:.2g} of the "
            "largest output's)") if small else None
    return max(d for d, _ in diffs), max(rel), note


# ---------------------------------------------------------------------------------------------- planning


class _Tracer(fx.Tracer):
    """fx's default tracer, but every BatchNorm subclass (bnkit's drop-in layers too) and bnkit's
    ``FrozenBatchNorm*d`` (whose input checks fx cannot trace) stays one ``call_module``,
    and buffers read in a forward become ``get_attr`` nodes (fx's default inlines them as constants, which
    would hide a read of a BN's ``running_mean`` from the planner)."""

    proxy_buffer_attributes = True

    def __init__(self) -> None:
        super().__init__()
        self.made: list[weakref.ref] = []  # every proxy the trace made, weakly: see _mark_stored
        self.metadata: list[weakref.ref] = []  # the attribute proxies of their metadata (y.shape), weakly
        self.pinned: list[object] = []  # what the forward set as attributes of a traced parameter or buffer

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_bn_or_frozen(m) or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        made = _TracedProxy(node, self)
        self.made.append(weakref.ref(made))
        return made


class _TracedProxy(fx.Proxy):
    """fx's proxy, noting the attribute proxies of its metadata made from it (``y.shape``): each holds it, as fx's
    attribute proxy holds its root, but what the forward keeps of it then is no tensor (see :func:`_mark_stored`)."""

    def __getattr__(self, k: str) -> fx.proxy.Attribute:
        attr = super().__getattr__(k)
        if k in _METADATA:
            self.tracer.metadata.append(weakref.ref(attr))
        return attr

    def __setattr__(self, name: str, value: object) -> None:
        # ``self.conv.weight.prev = y`` (or ``= [y]``): kept on a parameter or buffer, which outlives the call but
        # whose proxy only lives while tracing, so held here for _mark_stored to count (a temporary's dies with it)
        if self.__dict__.get("node") is not None and self.node.op == "get_attr":
            self.tracer.pinned.append(value)  # a container too, which the forward may fill afterwards
        super().__setattr__(name, value)


class _ConstantBufferTracer(_Tracer):
    """For forwards that use a buffer as a Python value (``if self.initialized:``), which a traced buffer cannot be."""

    proxy_buffer_attributes = False


def _defaults(work: nn.Module, given: int | None) -> tuple[dict[str, Any], str | None]:
    """The forward's arguments with defaults that the call leaves out (past ``given`` positional inputs; all of
    them where that is unknown), at their defaults: traced as placeholders, ``if mask is not None:`` would take
    the branch the call does not; and a note naming them with their values (a flag such as
    ``return_features=False`` steers as ``mask=None`` does: a call passing another value takes a path the plan did
    not see)."""
    try:
        params = list(inspect.signature(work.forward).parameters.values())
    except (TypeError, ValueError):
        return {}, None
    plain = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = sum(p.default is p.empty for p in plain if p.kind != p.KEYWORD_ONLY)
    skipped = max(given if given is not None else required, required)
    fixed = {p.name: p.default for i, p in enumerate(plain) if i >= skipped and p.default is not p.empty}
    named = ", ".join(f"{name}={value!r}" for name, value in fixed.items())
    return fixed, (f"forward arguments {named} were traced at their defaults, as the "
                   f"{'example inputs' if given is not None else 'call with the required inputs only'} leave them: "
                   "a call passing other values may take another path, whose folds are not checked") if fixed else None


def _trace(work: nn.Module, report: FoldReport, defaults: dict[str, Any]) -> tuple[fx.Graph, set[int]]:
    """The fx graph of ``work`` (``defaults``: arguments fixed at these values): buffers traced, or, if the forward
    needs their values, inlined (with a note); and the ids of the modules whose tensors the trace read as values
    (:class:`_TensorReads`), which its graph does not show."""
    modules = list(work.modules())
    try:
        with _TensorReads(modules) as reads:
            graph = (tracer := _Tracer()).trace(work, concrete_args=defaults or None)
        _mark_stored(tracer)
        return graph, reads.read
    except Exception:  # noqa: BLE001 - whatever fx raises, the constant-buffer trace decides
        with _TensorReads(modules) as reads:
            graph = (tracer := _ConstantBufferTracer()).trace(work, concrete_args=defaults or None)
        _mark_stored(tracer)
        report.notes.append("the forward uses a buffer as a Python value, so buffers were traced as constants: "
                            "a direct read of a BN's running statistics in the forward would not be seen "
                            "(pass example_inputs to verify the folded model)")
        return graph, reads.read


#: ``node.meta`` key of the nodes whose value the traced forward kept beyond the call (see :func:`_mark_stored`)
_STORED = "bnkit_kept_by_the_forward"


def _mark_stored(tracer: _Tracer) -> None:
    """Mark the graph nodes whose proxies outlive the trace: the forward kept them (``self.prev = y``,
    ``self.feats.append(y)``, a deque, a dataclass, a NumPy object array, a global list), a reader of the value that
    the graph does not show, which a fold would hand another tensor (the BN's output for a layer's, its input for
    its output).

    Where some are alive, cyclic garbage is collected first (an exception kept in a local, a recursive closure); a
    proxy whose only references are the attribute proxies of its metadata (``self.shapes.append(y.shape)``) is not
    kept, one held by an attribute proxy of a tensor (``y.T``, ``y.data``) is. References are counted, so holders
    the garbage collector does not track (a NumPy array, a torch Future) count too."""
    if all(ref() is None for ref in tracer.made):  # the usual case: nothing kept, no collection
        return
    gc.collect()
    metadata_of: Counter[int] = Counter()  # by the id of the proxy each metadata proxy holds
    for ref in tracer.metadata:
        if (attr := ref()) is not None:
            metadata_of[id(attr.root)] += 1
    for ref in tracer.made:
        proxy = ref()
        # its references: this name, getrefcount's argument, and the metadata proxies made from it; a proxy the
        # forward set on a traced parameter or buffer is held by the tracer (``pinned``), and counts
        if proxy is not None and sys.getrefcount(proxy) - 2 > metadata_of[id(proxy)]:
            proxy.node.meta[_STORED] = True
        proxy = None


def _plan_fx(
    work: nn.Module, graph: fx.Graph, traced_reads: set[int], probe: dict[int, dict],
    shared: dict[int, list[str]], report: FoldReport,
) -> list[tuple[str, str, str]]:
    """Pairs ``(bn, layer, position)`` to fold, read from the eval-mode fx ``graph`` of ``work``.

    ``traced_reads``: the modules whose tensors tracing read as values (see :func:`_trace`). With a ``probe``,
    a module it saw called more often than the graph shows (from a hook) counts as called that often.
    Unfoldable BNs go to ``report.left``. "after" folds are planned first; a BN left over is
    then tried against the single layer it feeds.
    """
    modules = dict(work.named_modules(remove_duplicate=False))
    calls: Counter[int] = Counter({key: entry["calls"] for key, entry in probe.items()})
    # modules whose parameters/buffers the forward reads directly
    attr_used = set(traced_reads) | {key for key, entry in probe.items() if entry["read"]}
    graph_calls: Counter[int] = Counter()
    for node in graph.nodes:
        if node.op == "call_module":
            graph_calls[id(modules[node.target])] += 1
        elif node.op == "get_attr" and "." in node.target:
            owner = node.target.rsplit(".", 1)[0]
            # a layer's tensor used for its metadata stays readable after a fold; a folded BN's is gone
            if owner in modules and (is_bn_or_frozen(modules[owner])
                                     or not all(_metadata_use(u, node) for u in node.users)):
                attr_used.add(id(modules[owner]))
    calls |= graph_calls  # the larger count of each
    # modules the trace runs whole (fx leaves, such as nn.MultiheadAttention): their code may use a submodule's
    # weights without calling it (out_proj.weight), which neither the graph nor the probe's call counts show
    wholes = [node.target for node in graph.nodes
              if node.op == "call_module" and not is_bn_or_frozen(modules[node.target])]

    def inside_whole(target: str) -> str | None:
        whole = next((w for w in wholes if target.startswith(f"{w}.")), None)
        return None if whole is None else (f"'{target}' belongs to '{whole}', which the trace runs as a whole: its "
                                           "code may use the layer's weights without calling it")

    def layer_node(node: Any) -> str | None:
        ok = isinstance(node, fx.Node) and node.op == "call_module" and isinstance(modules[node.target], _LAYER_TYPES)
        return node.target if ok else None

    plan: list[tuple[str, str, str]] = []
    for name, bn in bn_or_frozen_layers(work):
        if graph_calls[id(bn)] == 0:
            report.left[name] = "not called as a module in the traced forward"

    retry = []
    for node in graph.nodes:
        if not (node.op == "call_module" and is_bn_or_frozen(modules[node.target])):
            continue
        name, bn = node.target, modules[node.target]
        reason = _bn_reason(bn, calls, attr_used, shared)
        if reason is None:
            src = node.args[0] if node.args else node.kwargs.get("input")
            target = layer_node(src)
            if target is None:
                if isinstance(src, fx.Node):
                    what = f"{src.op} '{getattr(src.target, '__name__', src.target)}'"
                else:
                    what = repr(src)
                reason = f"its input comes from {what}, not from a Conv/ConvTranspose/Linear"
            else:
                layer = modules[target]
                reason = (
                    _layer_reason(layer, target, calls, attr_used, shared)
                    or inside_whole(target)
                    or (f"'{target}' already absorbs another BN" if target in {p[1] for p in plan} else None)
                    or (f"the output of '{target}' is also used elsewhere" if len(src.users) > 1 else None)
                    or (f"the forward also keeps the output of '{target}' (in a module attribute or another "
                        "object)" if src.meta.get(_STORED) else None)
                    or _channel_reason(bn, layer, target, "after")
                    or _layout_reason(layer, bn, probe, report, target)
                )
            if reason is None:
                plan.append((name, target, "after"))
                continue
            retry.append(node)
        report.left[name] = reason

    for node in retry:
        name, bn = node.target, modules[node.target]
        users = list(node.users)
        target = layer_node(users[0]) if len(users) == 1 else None
        if target is None:
            continue
        layer = modules[target]
        reason = (
            _padding_reason(layer, target)
            or ("has its output kept by the forward (in a module attribute or another object), which would then "
                "hold its input" if node.meta.get(_STORED) else None)
            or _written_between_reason(node, users[0], modules, target)
            or _layer_reason(layer, target, calls, attr_used, shared)
            or inside_whole(target)
            or _channel_reason(bn, layer, target, "before")
            or _layout_reason(layer, bn, probe, report, target)
        )
        if reason is None:
            plan.append((name, target, "before"))
            del report.left[name]
        else:
            report.left[name] += f"; and it {reason}"
    return plan


def _plan_sequential(work: nn.Module, probe: dict[int, dict], shared: dict[int, list[str]],
                     report: FoldReport) -> list[tuple[str, str, str]]:
    """Fallback: fold BN with its neighbour inside plain ``nn.Sequential`` containers.

    A plain Sequential passes each child's output to the next child only, so adjacency is
    data flow if the probe run saw the Sequential itself called (a forward may instead run
    its children one by one and use their outputs elsewhere), each child once, so only from
    it. A module or layer weight held in several attribute slots is not folded either, nor a
    BN or layer whose tensors the probe run saw read outside its own forward;
    without a probe run (no ``example_inputs``) nothing is. ``shared``: see :func:`_shared_names`.
    """
    if not probe:  # nothing shows whether a layer is also called outside its Sequential: fold nothing
        for name, _ in bn_or_frozen_layers(work):
            report.left[name] = ("the model is not traceable by torch.fx, and with no example_inputs nothing shows "
                                 "whether its neighbour is also called outside its nn.Sequential: pass example_inputs")
        return []
    calls: Counter[int] = Counter({key: entry["calls"] for key, entry in probe.items()})
    read = {key for key, entry in probe.items() if entry["read"]}
    plan: list[tuple[str, str, str]] = []
    used: set[str] = set()  # BN layers folded, and layers with their position ("conv:after"): one BN each side
    compiled = [f"{n}." for n, m in work.named_modules() if n and is_compiled_wrapper(m)]
    for prefix, seq in work.named_modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        # every slot as its forward runs them: named_children() skips a module repeated in it (an activation
        # between a layer and a BN would vanish)
        children = [(f"{prefix}.{n}" if prefix else n, m) for n, m in seq._modules.items()]
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if is_bn_or_frozen(b) and isinstance(a, _LAYER_TYPES):
                bn_name, bn, layer_name, layer, position = b_name, b, a_name, a, "after"
            elif is_bn_or_frozen(a) and isinstance(b, _LAYER_TYPES):
                bn_name, bn, layer_name, layer, position = a_name, a, b_name, b, "before"
            else:
                continue
            if bn_name in used or f"{layer_name}:{position}" in used:
                continue
            inside = next((c[:-1] for c in compiled if bn_name.startswith(c)), None)
            reason = (
                (inside and f"it runs inside '{inside}', compiled by torch.compile, whose compiled code reads the BN's "
                            "tensors itself: fold before compiling that part")
                or _bn_reason(bn, calls, read, shared)
                or (None if calls[id(seq)] else f"its nn.Sequential '{prefix}' was not called as a whole, so the "
                    "forward may run its children one by one and use their outputs elsewhere")
                or (_padding_reason(layer, layer_name) if position == "before" else None)
                or _layer_reason(layer, layer_name, calls, read, shared)
                or _channel_reason(bn, layer, layer_name, position)
                or _layout_reason(layer, bn, probe, report, layer_name)
            )
            if reason is None:
                plan.append((bn_name, layer_name, position))
                used.update((bn_name, f"{layer_name}:{position}"))
                report.left.pop(bn_name, None)
            else:
                report.left[bn_name] = reason
    for name, _ in bn_or_frozen_layers(work):
        if name not in used and name not in report.left:
            report.left[name] = (
                "no Conv/ConvTranspose/Linear neighbour inside a plain nn.Sequential (model not traceable)"
            )
    return plan


def _shared_names(work: nn.Module, original: nn.Module | None = None,
                  notes: list[str] | None = None) -> dict[int, list[str]]:
    """Every name of each module and parameter held in more than one attribute slot, by object id.

    Such objects are not folded: fx names a module by its first name and a fold replaces the
    module in one slot, so an alias of a folded BN would still run it; a layer weight tied to
    another module's would get its own folded copy, tied again in a freshly built model, where the
    last key loaded wins. Parameters that are distinct objects over the same memory
    (``nn.Parameter(other.weight.data)``) count as one: each would be saved under its own key, and a freshly built
    model that shares them so keeps the last one loaded. ``original``: the model ``work`` is a copy of, whose
    memory sharing counts (``copy.deepcopy`` gives such parameters memory of their own). Names that differ only
    because an ancestor container is registered twice reach one slot (replacing it there replaces it for every
    path), so they do not count. ``notes`` gets a note where the search of what the modules hold was cut short
    (:class:`_HeldRefs`).
    """
    def slots_of(model: nn.Module) -> list[tuple[str, int, str, Any]]:
        held = _HeldRefs(model)
        slots = [(f"{prefix}.{attr}" if prefix else attr, id(parent), attr, obj)
                 for prefix, parent in model.named_modules(remove_duplicate=False)
                 for attr, obj in [*parent._modules.items(), *parent._parameters.items(), *held.of(parent)]
                 if obj is not None]
        if held.cut and notes is not None and model is work:
            notes.append(f"the objects the modules hold in plain attributes were searched for other references to "
                         f"the BatchNorm layers up to {_OPEN_LIMIT} objects, and no further: a BN reached only "
                         "beyond them would still run after its fold (example_inputs verify the fold)")
        return slots

    here = slots_of(work)
    names: dict[int, list[str]] = {}
    slots: dict[int, set[tuple[int, str]]] = {}
    for name, parent, attr, obj in here:
        names.setdefault(id(obj), []).append(name)
        slots.setdefault(id(obj), set()).add((parent, attr))
    storages: dict[tuple, list[tuple[int, int, int]]] = {}  # (start, end, id in this model) by the original's storage
    for (_, _, _, obj), (_, _, _, seen) in zip(here, here if original is None else slots_of(original)):
        if isinstance(seen, torch.Tensor) and not is_lazy(seen) and seen.device.type != "meta" and seen.numel():
            start = seen.data_ptr()
            end = start + (1 + sum((n - 1) * abs(st) for n, st in zip(seen.shape, seen.stride()))) * seen.element_size()
            storages.setdefault((seen.device, seen.untyped_storage().data_ptr()), []).append((start, end, id(obj)))
    for group in (g for spans in storages.values() for g in _overlapping(spans)):
        together = sorted(n for key in group for n in names[key])
        for key in group:
            slots[key] = slots[key] | {(other, "") for other in group}
            names[key] = together
    return {key: names[key] for key, where in slots.items() if len(where) > 1}


class _HeldRefs:
    """What the modules of ``model`` hold outside their registered slots that a fold cannot follow, module by module
    (:meth:`of`), by where (``norms[0]``):

    * parameters in plain attributes (``object.__setattr__``) and in the lists, tuples, sets and dicts they hold,
      nested (a fold gives its layer new ones), and modules inside tuples and frozensets or as dict keys, which it
      cannot rewrite;
    * BatchNorm layers reached through any other object (a ``SimpleNamespace``, a ``deque``, a
      ``functools.partial``, a bound method, a closure: :func:`_referents`) or a module the model does not register
      (``object.__setattr__(self, "norms", nn.ModuleList([...]))``), which a forward may call: a layer keeps its
      object there, and parameters held by other objects (an optimizer's) are not the model's.

    A module held elsewhere in plain attributes is followed: a folded BN is replaced there too
    (:func:`_replace_modules`), so a forward calling ``self.norms[0]`` (traced under the BN's registered name) runs
    the ``nn.Identity``, and a layer keeps its object, only its parameters change. Each object is opened once per
    model, and at most :data:`_OPEN_LIMIT` of those beyond plain containers (``cut`` then says so).
    """

    def __init__(self, model: nn.Module) -> None:
        self.registered = {id(m) for m in model.modules()}
        self.seen: set[int] = set()
        self.opened = 0
        self.cut = False

    def of(self, module: nn.Module) -> list[tuple[str, nn.Module | nn.Parameter]]:
        found: list[tuple[str, nn.Module | nn.Parameter]] = []

        def counts(value: object, opaque: bool) -> bool:
            """A parameter or module held there is recorded (inside other objects, BatchNorm layers only)."""
            return (isinstance(value, nn.Parameter) and not opaque
                    or isinstance(value, nn.Module) and (not opaque or is_bn_or_frozen(value)))

        # (value, where, frozen: not rewritable, opaque: inside an object other than a plain container), walked
        # depth first with a stack of its own (a linked chain of thousands of objects is no recursion)
        stack = [(v, k, False, False) for k, v in reversed(vars(module).items()) if k not in MODULE_OWN]
        while stack:
            value, where, frozen, opaque = stack.pop()
            if value is module or isinstance(value, _ATOMS) and not isinstance(value, nn.Parameter):
                continue  # its own bound method goes with it
            if isinstance(value, nn.Parameter):
                if counts(value, opaque):
                    found.append((where, value))
                continue
            if isinstance(value, nn.Module):
                if frozen and counts(value, opaque):
                    found.append((where, value))
                if id(value) not in self.registered and id(value) not in self.seen:  # it runs what it holds
                    self.seen.add(id(value))
                    held = [*value._modules.items(), *((k, v) for k, v in vars(value).items() if k not in MODULE_OWN)]
                    stack += [(item, f"{where}.{key}", True, True) for key, item in reversed(held)]
                continue
            if id(value) in self.seen:
                continue
            if isinstance(value, (list, tuple, set, frozenset, dict)):
                self.seen.add(id(value))
                items = list(value.items() if isinstance(value, dict) else enumerate(value))
                if isinstance(value, dict):  # a key is not rewritten
                    found += [(f"{where} (a key)", key) for key, _ in items if counts(key, opaque)]
                inner = frozen or isinstance(value, (tuple, frozenset))
                stack += [(item, f"{where}[{key!r}]", inner, opaque) for key, item in reversed(items)]
            elif self.opened < _OPEN_LIMIT:
                self.seen.add(id(value))
                self.opened += 1
                stack += [(item, f"{where}.<{type(value).__name__}>", True, True)
                          for item in reversed(_referents(value))]
            else:
                self.cut = True
        return found


#: Values with nothing inside that could be a module (a Parameter, a Tensor subclass, is told apart).
_ATOMS = (str, bytes, int, float, complex, type(None), torch.Tensor, np.ndarray, type, types.ModuleType,
          types.CodeType, torch.dtype, torch.device)
#: The most objects other than plain containers :class:`_HeldRefs` opens in one model (a tokenizer or a logger held
#: in an attribute could reach far).
_OPEN_LIMIT = 20_000


def _referents(value: object) -> list[object]:
    """The objects ``value`` refers to (``gc.get_referents``), which a forward could reach a module through: a
    function's closure and defaults, not its globals or code; no classes or Python modules."""
    if isinstance(value, types.FunctionType):
        cells = [c.cell_contents for c in value.__closure__ or () if _filled(c)]
        return [*cells, *(value.__defaults__ or ()), *(value.__kwdefaults__ or {}).values()]
    return [r for r in gc.get_referents(value) if not isinstance(r, (type, types.ModuleType))]


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return False
    return True


def _replace_modules(root: nn.Module, names: Iterable[str], make: Callable[[nn.Module], nn.Module]) -> None:
    """Put ``make(module)`` in each slot ``names`` names in ``root``, and wherever a module of ``root`` holds that
    module outside its registered slots: in a plain attribute, or in the lists, sets and dicts such attributes hold,
    nested (:class:`_HeldRefs` leaves modules inside tuples unfolded). One walk of ``root`` for them all."""
    new: dict[int, nn.Module] = {}
    for name in names:
        old = root.get_submodule(name)
        parent, _, leaf = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, leaf, new.setdefault(id(old), make(old)))
    seen: set[int] = set()

    def rewrite(container: list | set | dict) -> None:
        if id(container) in seen:
            return
        seen.add(id(container))
        if isinstance(container, set):
            for item in [item for item in container if id(item) in new]:
                container.discard(item)
                container.add(new[id(item)])
            return
        keys = container.keys() if isinstance(container, dict) else range(len(container))
        for key in list(keys):
            if id(container[key]) in new:
                container[key] = new[id(container[key])]
            elif isinstance(container[key], (list, set, dict)):
                rewrite(container[key])

    for module in root.modules():
        slots = vars(module)
        for attr in [a for a in slots if a not in MODULE_OWN]:
            if id(slots[attr]) in new:
                slots[attr] = new[id(slots[attr])]
            elif isinstance(slots[attr], (list, set, dict)):
                rewrite(slots[attr])


def _metadata_use(user: fx.Node, node: fx.Node) -> bool:
    """``user`` gets only the metadata of ``node``'s tensor (``weight.device``, ``weight.new_zeros(...)``,
    ``x.to(weight)``): no read of its values (see :data:`_METADATA`)."""
    if user.op not in ("call_function", "call_method"):
        return False
    name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
    if user.target is getattr:  # weight.device: the attribute's name decides
        name = user.args[1]
    return not any(n is node for n in _leaves(_values_read(name, user.args, user.kwargs), fx.Node))


def _overlapping(spans: list[tuple[int, int, int]]) -> list[set[int]]:
    """The ids of the tensors whose memory spans ``[start, end)`` overlap, in groups of two or more (views of one
    storage that do not overlap, a flat parameter vector's slices, share no memory)."""
    groups: list[set[int]] = []
    reach = None
    for start, end, key in sorted(set(spans)):
        if reach is not None and start < reach:
            groups[-1].add(key)
            reach = max(reach, end)
        else:
            groups.append({key})
            reach = end
    return [g for g in groups if len(g) > 1]


def _global_hooks() -> bool:
    """Forward hooks or pre-hooks registered for every module (``register_module_forward_hook``)."""
    from torch.nn.modules import module as module_mod

    return bool(module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)


def _own_call(module: nn.Module) -> bool:
    """``module``'s class calls it otherwise than ``nn.Module.__call__`` does (a ``__call__`` of its own adds to
    what ``forward`` computes)."""
    return (type(module).__call__ is not nn.Module.__call__ or type(module)._call_impl is not nn.Module._call_impl
            or "_call_impl" in vars(module))  # nn.Module.__call__ looks _call_impl up on the instance


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _bn_reason(bn: nn.Module, calls: Counter, attr_used: set[int], shared: dict[int, list[str]]) -> str | None:
    if bn.running_mean is None:
        return "track_running_stats=False: it normalizes with batch statistics at inference, which no fold can express"
    if not has_stock_eval_forward(bn) or _own_call(bn):
        return f"it is a {type(bn).__name__} whose forward is not PyTorch's, so removing it may change the outputs"
    if _global_hooks():
        return ("forward hooks registered for every module (torch.nn.modules.module.register_module_forward_hook) "
                "run on it: removing it changes what they see and return")
    if id(bn) in shared:
        return (f"it is held under several names ({', '.join(shared[id(bn)])}): folding would replace "
                "one of them, and the others would still run it")
    if calls[id(bn)] > 1:
        return f"the BN module is called {calls[id(bn)]} times"
    if id(bn) in attr_used:
        return "the forward reads the BN's tensors directly"
    if _hooked(bn):
        return "it has forward hooks, which removing it would drop"
    return None


def _layer_reason(
    layer: nn.Module, name: str, calls: Counter, attr_used: set[int], shared: dict[int, list[str]]
) -> str | None:
    base = _PLAIN_FORWARDS.get(type(layer).forward)
    # a forward set on the instance (fake quantization, a wrapper's hook) or a subclass's own _conv_forward
    # (weight standardization) computes something else with the weights behind PyTorch's forward
    conv_forward = getattr(type(layer), "_conv_forward", None)
    if (base is None or "forward" in vars(layer) or conv_forward is not getattr(base, "_conv_forward", None)
            or _own_call(layer)):
        return (
            f"'{name}' is a {type(layer).__name__} whose forward is not PyTorch's, "
            "so its weights may not act linearly"
        )
    if parametrize.is_parametrized(layer) or hasattr(layer, "weight_g"):
        return f"'{name}' has a parametrized weight (weight_norm or torch.nn.utils.parametrize)"
    if _hooked(layer):
        return f"'{name}' has forward hooks, which could see or change the folded values"
    if id(layer) in shared:
        names = ", ".join(shared[id(layer)])
        return f"'{name}' is held under several names ({names}); only layers with one name are folded into"
    for kind, p in (("weight", layer.weight), ("bias", layer.bias)):
        if p is not None and id(p) in shared:
            return (f"the {kind} of '{name}' is shared ({', '.join(shared[id(p)])}): the folded layer would get "
                    "its own copy, which a freshly built model ties again on reload")
    if calls[id(layer)] > 1:
        return f"'{name}' is called {calls[id(layer)]} times; folding would change its other uses"
    if id(layer) in attr_used:
        return f"the forward reads the tensors of '{name}' directly"
    return None


def _written_between_reason(bn: fx.Node, layer: fx.Node, modules: dict[str, nn.Module], name: str) -> str | None:
    """Why a BN cannot fold before ``layer``: a node run between the two may write a tensor in place.

    Folded, the BN becomes an ``nn.Identity`` that returns its input itself (the BN returned a new tensor), so
    a write into that input, or into a tensor sharing its memory, before the layer runs would reach the layer.
    """
    src = bn.args[0] if bn.args else bn.kwargs.get("input")
    aliases = _aliases(src, modules) if isinstance(src, fx.Node) else set()
    node = bn.next
    while node is not layer:
        if _may_write_in_place(node, modules, aliases):
            what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.name)
            return (f"is followed by '{what}', which may write a tensor in place, before '{name}' reads it: folded, "
                    "the BN would become an nn.Identity returning its input itself, so the write would reach "
                    f"'{name}'")
        node = node.next
    return None


def _may_write_in_place(node: fx.Node, modules: dict[str, nn.Module], aliases: set[fx.Node]) -> bool:
    """Whether ``node`` may write a tensor in place: an ``inplace=True`` module or call, a ``*_`` method or
    function (``mul_``, ``torch.relu_``), an ``out=`` argument, an arithmetic operator whose first operand is one of
    ``aliases`` (``h += 1`` is traced as ``h + 1``; ``e * 0.5`` on another tensor writes nothing of the BN's), and
    any other op given one of ``aliases`` that is not known to leave its arguments alone (PyTorch's views and
    new-memory ops): ``h.__setitem__``, ``torch.ops.aten.add_.Tensor``, a function of the user's."""
    if _in_place(node, modules):
        return True
    if node.op not in ("call_method", "call_function"):
        return False
    if "out" in node.kwargs or (node.target in _AUGMENTABLE and node.args[0] in aliases):
        return True
    if not aliases.intersection(_tensor_args(node)):
        return False
    max_norm = node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")
    if node.target is F.embedding and max_norm is not None:  # it renormalizes rows of its weight argument in place
        return True
    if node.op == "call_method":
        return node.target not in _FRESH_METHODS and node.target not in _READ_ONLY_METHODS
    return node.target not in _FRESH_FUNCTIONS and node.target not in _READ_ONLY_FUNCTIONS


def _in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` writes (and returns) its input: an ``inplace=True`` module or call, or a ``*_`` method or
    function."""
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op not in ("call_method", "call_function"):
        return False
    name = _op_name(node)
    return (name.endswith("_") and not name.endswith("__")) or node.kwargs.get("inplace", False) is not False


def _aliases(node: fx.Node, modules: dict[str, nn.Module]) -> set[fx.Node]:
    """``node`` and the nodes that may share its memory: the tensors it may be a view of, and every node that may
    be a view of those (:func:`_may_alias`), whichever argument, positional or keyword, the tensor is."""
    roots, todo = set(), [node]
    while todo:  # up: what node may be a view of
        current = todo.pop()
        if current not in roots:
            roots.add(current)
            todo += _tensor_args(current) if _may_alias(current, modules) else []
    seen, todo = set(), list(roots)
    while todo:  # down: everything that may be a view of those
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += [user for user in current.users if _may_alias(user, modules)]
    return seen


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    """The nodes among ``node``'s arguments, positional and keyword, nested ones included."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def _may_alias(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` may return one of its tensor arguments or a view of one: an ``nn.Identity``, ``nn.Flatten``
    or eval-mode Dropout module, and any method or function not known to return new memory (:data:`_FRESH_NAMES`):
    ``x.view``, ``x[0]``, ``x.ravel()``, ``torch.flatten(input=x)``, ``F.dropout(x, training=False)``..."""
    if _in_place(node, modules):  # F.relu(c, inplace=True) is c
        return True
    if node.op == "call_module":
        return isinstance(modules[node.target], _VIEW_MODULES)
    if node.op == "call_method":
        return node.target not in _FRESH_METHODS
    if node.op == "call_function":
        if node.target is getattr and len(node.args) > 1 and node.args[1] in _META_ATTRS:
            return False
        return node.target not in _FRESH_FUNCTIONS
    return False


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def _channel_reason(bn: nn.Module, layer: nn.Module, name: str, position: str) -> str | None:
    if isinstance(layer, nn.Linear):
        n = layer.out_features if position == "after" else layer.in_features
    else:
        n = layer.out_channels if position == "after" else layer.in_channels
    return None if n == channels(bn) else f"'{name}' has {n} channels on the BN's side, the BN {channels(bn)}"


def _layout_reason(layer: nn.Module, bn: nn.Module, probe: dict[int, dict], report: FoldReport,
                   name: str) -> str | None:
    """None if the layer's activations are (or, unprobed, are assumed) ``(N, C, *spatial)``; else why not.

    BatchNorm normalizes dim 1; a Linear acts on the last dim, so only ``(N, features)`` lines them up,
    and an unbatched conv's dim 1 is spatial. Unprobed, a BN that takes no rank-2 input (``BatchNorm2d``/``3d``)
    next to a Linear never lines up.
    """
    want = 2 if isinstance(layer, nn.Linear) else layer.weight.dim()
    ranks = probe.get(id(layer), {}).get("ndim")
    if ranks is None:
        bn_ranks = _bn_ranks(bn)
        if isinstance(layer, nn.Linear) and bn_ranks is not None and 2 not in bn_ranks:
            return (f"'{name}' is a Linear, which acts on the last dim, and {type(bn).__name__} takes rank "
                    f"{sorted(bn_ranks)} input, normalizing dim 1")
        if isinstance(layer, nn.Linear):
            note = "Linear/BatchNorm1d folds assume (N, features) activations; pass example_inputs to check"
        elif bn_ranks is not None and want - 1 in bn_ranks:  # an unbatched conv's output fits this BN too
            if want not in bn_ranks:
                return (f"'{name}' gives batched rank-{want} output, which {type(bn).__name__} does not take: "
                        f"the pair runs only unbatched, where BatchNorm's dim 1 is spatial")
            note = (f"{type(layer).__name__}/{type(bn).__name__} folds assume batched (N, C, ...) activations "
                    "(unbatched, BatchNorm's dim 1 is spatial); pass example_inputs to check")
        else:
            return None
        if note not in report.notes:
            report.notes.append(note)
        return None
    if ranks != {want}:
        kind = "Linear acts on the last dim" if want == 2 else f"it needs batched rank-{want} input"
        return f"'{name}' outputs rank {sorted(ranks)} tensors; BatchNorm normalizes dim 1, {kind}"
    return None


def _bn_ranks(bn: nn.Module) -> set[int] | None:
    """The input ranks (2 to 5) the BN's ``_check_input_dim`` accepts, tried on meta tensors with its channels on
    dim 1; None for a BN without one, or that accepts none of them (a check of its own that these do not pass)."""
    check = getattr(bn, "_check_input_dim", None)
    if check is None:
        return None
    ranks = set()
    for rank in range(2, 6):
        try:
            check(torch.empty((1, channels(bn)) + (1,) * (rank - 2), device="meta"))
        except Exception:  # noqa: BLE001 - ValueError for PyTorch's and bnkit's layers; a subclass may raise anything
            continue
        ranks.add(rank)
    return ranks or None


def _padding_reason(layer: nn.Module, name: str) -> str | None:
    if isinstance(layer, nn.Linear):
        return None
    if isinstance(layer, _ConvTransposeNd):
        return f"precedes ConvTranspose '{name}', whose border outputs sum fewer inputs, so the shift t does not fold"
    if layer.padding_mode != "zeros":
        return None  # reflect/replicate/circular pad with copies of BN outputs: exact
    padding = layer.padding
    if padding == "same":
        pads = any(d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size))
    else:
        pads = padding != "valid" and any(padding)
    if not pads:
        return None
    return (
        f"precedes '{name}', which zero-pads its input (padding={padding!r}): padded zeros would stay 0 "
        "instead of becoming the BN shift, so the fold would be inexact"
    )


# ---------------------------------------------------------------------------------------------- folding math


def _entries(work: nn.Module, plan: list[tuple[str, str, str]]) -> list[FoldedBN]:
    """The report's entry for each planned fold; a bias is added by the first fold into a layer without one."""
    entries, seen = [], set()
    for bn_name, layer_name, position in plan:
        added = layer_name not in seen and work.get_submodule(layer_name).bias is None
        seen.add(layer_name)
        entries.append(FoldedBN(bn_name, layer_name, position, bias_added=added))
    return entries


def _folded_weights(work: nn.Module, plan: list[tuple[str, str, str]]) -> _Weights:
    """Every planned fold composed per layer in float64: ``{layer: (weight, bias)}``; reads ``work`` only.

    Raises ValueError where a folded weight or bias is beyond the layer's dtype.
    """
    pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for bn_name, layer_name, position in plan:
        bn, layer = work.get_submodule(bn_name), work.get_submodule(layer_name)
        if layer_name in pending:
            w, b = pending[layer_name]
        else:
            w = _f64(layer.weight)
            b = torch.zeros(_out_channels(layer), dtype=torch.float64) if layer.bias is None else _f64(layer.bias)
        s, t = _scale_shift(bn)
        fold = _fold_after if position == "after" else _fold_before
        pending[layer_name] = fold(layer, w, b, s, t)
    for layer_name, (w, b) in pending.items():
        dtype = work.get_submodule(layer_name).weight.dtype
        if not (torch.isfinite(w.to(dtype)).all() and torch.isfinite(b.to(dtype)).all()):
            bns = ", ".join(bn for bn, layer, _ in plan if layer == layer_name)
            raise ValueError(f"folding {bns} into '{layer_name}' gives weights beyond {dtype}'s range (a tiny "
                             "running_var + eps scales them up): keep these BN layers, or fold a float32 copy")
    return pending


def _within_dtype_bound(work: nn.Module, plan: list[tuple[str, str, str]]) -> bool:
    """Whether a cheap bound puts every planned folded weight and bias inside its layer's dtype.

    Per layer, from ``max|W|``, ``max|b|`` and each BN's ``max|s|``, ``max|t|`` (see :func:`_scale_shift`),
    folds applied in plan order: after the layer, ``|W'| <= max|W| max|s|`` and ``|b'| <= max|b| max|s| + max|t|``;
    before it, ``|W'| <= max|W| max|s|`` and ``|b'| <= max|b| + fan max|W| max|t|`` (``fan``: weights per
    output). False (ask :func:`_folded_weights`) where the bound reaches the dtype's maximum or is not finite.
    """
    bounds: dict[str, tuple[float, float, int]] = {}
    for bn_name, layer_name, position in plan:
        layer = work.get_submodule(layer_name)
        if layer_name not in bounds:
            w, b = layer.weight.detach(), layer.bias
            bounds[layer_name] = (float(w.abs().max()) if w.numel() else 0.0,
                                  float(b.detach().abs().max()) if b is not None and b.numel() else 0.0,
                                  w[0].numel() if len(w) else 0)
        w_max, b_max, fan = bounds[layer_name]
        s, t = _scale_shift(work.get_submodule(bn_name))
        s_max, t_max = float(s.abs().max()), float(t.abs().max())
        b_new = b_max * s_max + t_max if position == "after" else b_max + fan * w_max * t_max
        bounds[layer_name] = (w_max * s_max, b_new, fan)
    return all(max(w_max, b_max) < torch.finfo(work.get_submodule(name).weight.dtype).max
               for name, (w_max, b_max, _) in bounds.items())


def _apply(work: nn.Module, plan: list[tuple[str, str, str]], weights: _Weights) -> None:
    """Write each layer's folded ``weights`` once in its own dtype and replace every planned BN."""
    for layer_name, (w, b) in weights.items():
        _assign(work.get_submodule(layer_name), w, b)
    _replace_modules(work, [bn_name for bn_name, _, _ in plan], _identity_for)


def _f64(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy (some devices, e.g. MPS, have no float64)."""
    return t.detach().to(device="cpu", dtype=torch.float64)


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``."""
    var, mean = _f64(bn.running_var), _f64(bn.running_mean)
    gamma = _f64(bn.weight) if bn.weight is not None else torch.ones_like(var)
    beta = _f64(bn.bias) if bn.bias is not None else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - mean * s


def _fold_after(layer: nn.Module, w: torch.Tensor, b: torch.Tensor, s: torch.Tensor, t: torch.Tensor):
    """``layer`` then BN: weight scaled by ``s`` per output channel, bias ``s * b + t``."""
    if isinstance(layer, _ConvTransposeNd):
        # weight (in, out/groups, *k); output channel g * (out/groups) + j lives at [g-th block of in, j]
        g = layer.groups
        view = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        new_w = (view * s.reshape((g, 1, w.shape[1]) + (1,) * (w.dim() - 2))).reshape(w.shape)
    else:
        new_w = w * s.reshape((w.shape[0],) + (1,) * (w.dim() - 1))
    return new_w, s * b + t


def _fold_before(layer: nn.Module, w: torch.Tensor, b: torch.Tensor, s: torch.Tensor, t: torch.Tensor):
    """BN then ``layer`` (Linear, or Conv without zero padding): ``W * s`` per input channel, bias ``b + W t``."""
    if isinstance(layer, nn.Linear):
        return w * s, b + w @ t
    out, in_pg, g = w.shape[0], w.shape[1], layer.groups
    w_g = w.reshape(g, out // g, in_pg, -1)  # output channel o belongs to group o // (out/groups)
    new_w = (w_g * s.reshape(g, 1, in_pg, 1)).reshape(w.shape)
    shift = (w_g * t.reshape(g, 1, in_pg, 1)).sum(dim=(2, 3)).reshape(out)
    return new_w, b + shift


def _assign(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """New Parameters (cast once to the layer's dtype/device), so tied tensors elsewhere are not touched; each
    keeps its old ``requires_grad`` (bias-only fine-tuning stays so) and the attributes set on it (an optimizer
    group's ``no_weight_decay``, a sharding tag), an added bias takes the weight's ``requires_grad``."""
    old, old_bias = layer.weight, layer.bias
    dtype, device = old.dtype, old.device
    layer.weight = nn.Parameter(weight.to(dtype=dtype, device=device), requires_grad=old.requires_grad)
    layer.bias = nn.Parameter(bias.to(dtype=dtype, device=device),
                              requires_grad=old.requires_grad if old_bias is None else old_bias.requires_grad)
    for new, before in ((layer.weight, old), (layer.bias, old_bias)):
        if before is not None:
            vars(new).update(vars(before))


def _identity_for(bn: nn.Module) -> nn.Identity:
    """The ``nn.Identity`` that replaces a folded BN, with the BN's plain attributes (its train/eval flag,
    ``num_features``, ``eps``, ``momentum``, ...), so a forward that reads them reads what it read before.
    Callables set on the BN are not plain data: ``freeze_bn``'s ``train`` override would pin the Identity's flag
    and keep the removed BN reachable from it."""
    identity = nn.Identity()
    for name, value in vars(bn).items():
        if not name.startswith("_") and not isinstance(value, (torch.Tensor, nn.Module)) and not callable(value):
            setattr(identity, name, value)
    return identity
