"""Fold ONNX BatchNormalization nodes into the Conv / ConvTranspose / Gemm / MatMul before them.

At inference a BatchNormalization node is, per channel ``c`` on axis 1,
``y = a_c * x + b_c`` with ``a = scale / sqrt(var + epsilon)`` and ``b = B - a * mean``.
When ``x`` is the output of a layer that nothing else reads, the map goes into the
layer's constants (computed in float64, then cast back to the weight's dtype):

* ``Conv``: ``W[c] *= a_c``, ``bias = a * bias + b`` (a bias is added if there was none);
* ``ConvTranspose``: weight ``(C_in, C_out / group, k...)``, output channel
  ``g * C_out/group + j`` scales ``W[g-th block of C_in, j]``; bias as for Conv;
* ``Gemm``: ``alpha * A B' + beta * C`` has channel ``n`` in column ``n`` of ``B'``; the
  column is scaled, ``C := a * beta * C + b`` and ``beta := 1`` (at ``beta = 0`` C is taken as absent, as
  onnxruntime ignores it, NaN/Inf included);
* ``MatMul`` of a 2-D input by a constant ``(K, N)`` matrix (a ``Transpose`` of a constant too,
  as a bias-free Linear is exported): columns scaled and the BN node replaced by ``Add(b)``;
* any of these followed by ``Add`` of a constant ``k`` (how exporters write a bias):
  the layer's weight is scaled and ``k := a * k + b`` (``a``, ``b`` along axis 1).

Each folder is given ``b = None`` for the weight-only part, then checks everything
before it changes anything, so a refusal leaves the graph as it was.

A weight that other nodes also read (a shared conv) is copied, so only this use changes.
Nodes are left, with the reason in the report, when folding would be inexact or
impossible: the folded values would overflow the layer's dtype or put a channel's weights all below its smallest
normal number (subnormal float16), the layer's output is read elsewhere, the statistics are not constants (graph
inputs a caller may override included) or not finite (epsilon too), the input is not such a layer (an
addition, a graph input), a MatMul of rank > 2 (BN's axis 1 is then not the output feature
axis), or the node is in training mode.

Unused running-statistic outputs are removed wherever that leaves every output as it was.
The ONNX spec (onnx/defs/nn/defs.cc, ``BatchNormalization`` 9 and 14/15) decides which:

* an inference node (opset >= 14, ``training_mode=0``) with extra outputs: the spec calls
  them invalid and onnxruntime refuses the model; ``Y`` never reads them, so they are
  always removed when unused;
* a training node in opset 9-13: there is no mode attribute, the number of outputs *is*
  the mode ("Output case #1: Y, mean, var, saved_mean, saved_var (training mode); #2: Y
  (test mode)"), so removing them switches ``Y`` from batch to running statistics;
* a training node from opset 14 (``training_mode=1``): shape inference requires exactly
  three outputs, so they cannot go while the node normalises with batch statistics.

Blanking the names instead (``""`` marks an absent optional output) is not done: with every
extra output blanked onnxruntime 1.32 crashes (segmentation fault) on both kinds of
training node, and blanking only opset 9-13's ``saved_mean``/``saved_var`` would leave
the node in training mode anyway.

So a training node keeps its outputs and is left, unless asked (``to_inference=True``):
its extra outputs are then removed, ``training_mode`` set to 0, and it uses its running
statistics; the verification reference is then the switched model. A file where another node
or the graph's outputs read those outputs is refused (ValueError), as is one with training
nodes inside If/Loop/Scan bodies. Peers: onnxruntime's
``ConvBNFusion`` (onnxruntime/core/optimizer/conv_bn_fusion.cc), which fuses Conv only.

A training export also holds training-mode ``Dropout`` nodes (opset >= 12: the optional
``training_mode`` input is a constant true; onnx/defs/nn/defs.cc ``Dropout`` 12/13: "to convert
the trained model into inference mode, the user can simply not pass ``training_mode`` input or
set it to false"). ``to_inference`` switches those too, so the result is an inference graph:
a node whose ``mask`` output nothing reads becomes an ``Identity`` (inference Dropout copies its
input), one whose mask is read loses its ``training_mode`` input. Without ``to_inference`` they
stay, and verification runs both models with the same fixed Dropout ``seed`` so that it
compares the same random masks. Dropout before opset 12 has no mode in the graph (onnxruntime
runs it as inference); a ``training_mode`` computed at run time is left, with a note.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..atomic import atomic_path, check_target
from ..findings import Finding
from ..precision import OFFSET_NOTE_RATIO
from .graph import (RANDOM_OPS, BNNode, GraphIndex, attribute, blank_outputs_fail, bn_nodes, external_data_files,
                    initializer_names, load_model, local_functions, nested_subgraphs, node_label, opset_version,
                    stored_name, subgraphs, too_large, training_dropouts, unswitchable_training)
from .verify import (OnnxRuntimeError, VerificationMemoryError, compare, default_tolerance, random_inputs,
                     run)

__all__ = ["FoldedNode", "OnnxFoldReport", "FoldVerificationError", "fold_model", "fold"]


class FoldVerificationError(RuntimeError):
    """onnxruntime found the folded model's outputs different from the original's; nothing was written."""

    def __init__(self, message: str, report: "OnnxFoldReport") -> None:
        super().__init__(message)
        self.report = report

    def __reduce__(self) -> tuple:  # pickled (a process pool sends it back) with its report
        return type(self), (self.args[0], self.report), self.__dict__


@dataclass
class FoldedNode:
    bn: str
    into: str
    op: str
    #: e.g. "bias added", "weight copied: shared with another node".
    notes: list[str] = field(default_factory=list)


@dataclass
class OnnxFoldReport:
    """What :func:`fold_model` did.

    ``folded``: BN nodes folded, with the node each went into; ``left``: BN node -> why it
    was not folded; ``converted``: training-mode nodes switched to running statistics;
    ``removed_outputs``: unused running-statistic outputs dropped; ``max_abs_diff`` /
    ``max_rel_diff``: onnxruntime, reference vs folded, on random inputs of ``input_shapes``
    (norm-wise relative, see :mod:`bnkit.onnx.verify`); None when not verified;
    ``dropout_converted``: training-mode Dropout nodes switched to inference (``to_inference``).
    """

    folded: list[FoldedNode] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    converted: list[str] = field(default_factory=list)
    removed_outputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    tolerance: float | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    dropout_converted: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return self.max_rel_diff is not None and self.tolerance is not None and self.max_rel_diff <= self.tolerance

    @property
    def findings(self) -> list[Finding]:
        """One ``info`` finding per BN node left unfolded (as :class:`bnkit.torch.FoldReport` does)."""
        return [Finding("info", bn, "BatchNormalization not folded", reason, code="fold.left")
                for bn, reason in self.left.items()]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["verified"] = self.verified
        return out


def _fresh_name(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _forget_shapes(kind: onnx.TypeProto) -> None:
    """Clear the tensor shapes a type declares, inside sequences, optionals and maps too (element types stay)."""
    which = kind.WhichOneof("value")
    if which == "tensor_type":
        kind.tensor_type.ClearField("shape")
    elif which in ("sequence_type", "optional_type"):
        _forget_shapes(getattr(kind, which).elem_type)
    elif which == "map_type":
        _forget_shapes(kind.map_type.value_type)


class _Folder:
    def __init__(self, model: onnx.ModelProto, report: OnnxFoldReport) -> None:
        self.model = model
        self.graph = model.graph
        self.report = report
        self.opset = opset_version(model)
        self.taken = _names(self.graph, set())  # a new name must not shadow one a body computes, either
        self.index = GraphIndex(self.graph)
        self._ranks: dict[str, int] | None = None

    def reindex(self) -> None:
        self.index = GraphIndex(self.graph)

    # -- stage 1: training-mode nodes and extra outputs ---------------------------------------
    def _added_constant(self, target: onnx.NodeProto, shift: tuple[int, np.ndarray] | None, channels: int):
        """The per-channel constant the layer (its bias: Conv's B, Gemm's beta * C) and an Add between it and the
        BN put into the BN's input: the fold cancels it exactly in float64, so only the rest of the mean, what
        the weights produce, is at the mercy of float16 rounding. 0 where none is known per channel."""
        total = np.zeros(channels)
        parts = []
        if target.op_type in ("Conv", "ConvTranspose") and len(target.input) > 2 and target.input[2]:
            parts.append((self.index.constant(target.input[2]), 1.0))
        elif target.op_type == "Gemm" and _adds_c(target):
            parts.append((self.index.constant(target.input[2]), float(attribute(target, "beta", 1.0))))
        if shift is not None:
            parts.append((shift[1], 1.0))
        for value, factor in parts:
            if value is not None and value.size == channels:
                total = total + factor * value.astype(np.float64).reshape(-1)
        return total

    def tidy_outputs(self, bn: BNNode, to_inference: bool) -> str | None:
        """Drop unused extra outputs (switching a training node if asked); a reason to leave it, or None."""
        read = [o for o in bn.extra_outputs if self.index.readers(o)]
        node = bn.node
        if bn.training and not to_inference:
            if bn.statistics_outputs_missing:
                return (f"training mode with outputs {list(node.output)}, its running mean or variance output absent "
                        "or blank, which onnxruntime refuses to load (absent) or crashes running (blank); pass "
                        "to_inference=True (--to-inference) to use its running statistics instead")
            kept = ("in opset 9-13 they are what selects training mode" if self.opset < 14
                    else "training_mode=1 requires all three outputs")
            return (f"training mode: it normalises with batch statistics, and its outputs {bn.extra_outputs} stay "
                    f"({kept}), since removing them would change Y; pass to_inference=True (--to-inference) "
                    "to use its running statistics instead")
        if read:
            return f"its running-statistic outputs {read} are read by other nodes or are graph outputs"
        if len(node.output) > 1:  # blank ("") names too: absent outputs, which crash onnxruntime 1.32
            self.report.removed_outputs.extend(bn.extra_outputs)
            del node.output[1:]
        if bn.training:
            if self.opset >= 14:
                for attr in node.attribute:
                    if attr.name == "training_mode":
                        attr.i = 0
            self.report.converted.append(bn.name)
        return None

    # -- stage 2: folding ----------------------------------------------------------------------
    def rank(self, name: str) -> int | None:
        """The rank ONNX shape inference derives for ``name`` from the graph's inputs, or None if unknown.

        The file's own ``value_info`` annotations and graph-output shapes are set aside first, in the main graph
        and in every If/Loop/Scan body (also those of local functions): nothing checks them, and one that
        contradicts the graph (a 2-D annotation on a 3-D MatMul input, an If branch declaring a 2-D output it
        computes 3-D, which inference takes as the If's) would fold a BN on the wrong axis; so are the values of
        initializers that are also graph inputs, which a caller may override (a Reshape's target shape). The graph
        inputs' shapes stay: onnxruntime refuses inputs of another rank.
        """
        if self._ranks is None:
            bare = onnx.ModelProto()
            bare.CopyFrom(self.model)
            nodes = [*bare.graph.node, *(n for f in bare.functions for n in f.node)]
            bodies = [g for n in nodes for sub in subgraphs(n) for g in [sub, *nested_subgraphs(sub)]]
            for graph in [bare.graph, *bodies]:
                del graph.value_info[:]
                for out in graph.output:
                    _forget_shapes(out.type)
            inputs = {value.name for value in bare.graph.input}
            for listed in (bare.graph.initializer, bare.graph.sparse_initializer):
                fixed = [t for t in listed if (t.values.name if hasattr(t, "values") else t.name) not in inputs]
                del listed[:]
                listed.extend(fixed)
            inferred = onnx.shape_inference.infer_shapes(bare)
            self._ranks = {}
            for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
                if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
                    self._ranks[v.name] = len(v.type.tensor_type.shape.dim)
        return self._ranks.get(name)

    def set_constant(self, node: onnx.NodeProto, slot: int, value: np.ndarray, label: str, notes: list[str]) -> None:
        """Make input ``slot`` of ``node`` the constant ``value``: in place if only it reads it (a dense
        initializer), else a new initializer."""
        old = node.input[slot] if slot < len(node.input) else ""
        if (old and isinstance(self.index.initializers.get(old), onnx.TensorProto)
                and self.index.readers(old) == 1):
            tensor = self.index.initializers[old]
            if tuple(tensor.dims) != value.shape:  # e.g. a scalar Gemm C became one value per feature
                for stale in [v for v in self.graph.value_info if v.name == old]:
                    self.graph.value_info.remove(stale)
            tensor.CopyFrom(numpy_helper.from_array(value, old))
            return
        if old and self.index.readers(old) > 1:
            notes.append(f"{label} copied: {old!r} is shared with another node")
        name = _fresh_name(f"{node_label(node)}.{label}_folded", self.taken)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.index.initializers[name] = self.graph.initializer[-1]  # read back until the next reindex
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = name

    def _through_add(self, add: onnx.NodeProto):
        """``(layer, (constant slot, constant))`` for ``Add(layer output, constant)``, else a reason."""
        consts = [self.index.constant(i) for i in add.input]
        if sum(c is not None for c in consts) != 1:
            return (f"its input comes from Add {node_label(add)!r} of two computed values (a residual sum), "
                    "not from a Conv/ConvTranspose/Gemm/MatMul")
        slot = 0 if consts[0] is not None else 1
        c, other = consts[slot], add.input[1 - slot]
        layer = self.index.producer.get(other)
        if layer is None or layer.domain not in ("", "ai.onnx") or layer.op_type not in _FOLDERS:
            what = "a graph input" if layer is None else f"{layer.op_type} {node_label(layer)!r}"
            return (f"its input is Add {node_label(add)!r} of a constant and {what}, "
                    "not of a Conv/ConvTranspose/Gemm/MatMul")
        if self.index.readers(other) != 1:
            return f"the output of {node_label(layer)!r} is also read elsewhere; folding would change that reader"
        if not (np.issubdtype(c.dtype, np.floating) or c.dtype.name == "bfloat16"):
            return f"the constant added by {node_label(add)!r} is {c.dtype}, not floating point"
        return layer, (slot, c)

    def fold(self, bn: BNNode) -> str | None:
        """Fold ``bn`` into its producer; a reason to leave it, or None when folded."""
        if bn.overridable:
            return (f"its {', '.join(bn.overridable)} are graph inputs with stored values, which a caller may "
                    "override at run time: a folded layer would ignore the override")
        if not bn.constant:
            return "its statistics or parameters are not constants"
        arrays = (bn.scale, bn.bias, bn.mean, bn.var)
        if len({a.shape for a in arrays}) != 1 or bn.mean.ndim != 1:
            return "scale, B, mean and var are not all one value per channel"
        if (not all(np.isfinite(a).all() for a in arrays) or not np.isfinite(bn.epsilon)
                or (bn.var + bn.epsilon <= 0).any()):
            return ("non-finite statistics or epsilon, or var + epsilon <= 0: folding would spread NaN/Inf into the "
                    "layer")
        node = bn.node
        x = node.input[0]
        producer = self.index.producer.get(x)
        if producer is None:
            return "its input is a graph input or initializer, not a layer's output"
        if self.index.readers(x) != 1:
            return f"the output of {node_label(producer)!r} is also read elsewhere; folding would change that reader"
        target, shift = producer, None
        if producer.domain in ("", "ai.onnx") and producer.op_type == "Add":
            found = self._through_add(producer)
            if isinstance(found, str):
                return found
            target, shift = found
        elif producer.domain not in ("", "ai.onnx") or producer.op_type not in _FOLDERS:
            return (f"its input comes from {producer.op_type} {node_label(producer)!r}, "
                    "not a Conv/ConvTranspose/Gemm/MatMul")
        if not bn.mean.size:
            return "it normalises no channels (empty statistics): there is nothing to fold"
        a = bn.scale / np.sqrt(bn.var + bn.epsilon)
        b = bn.bias - a * bn.mean
        notes: list[str] = []
        if (bn.mean == 0).all() and (bn.var == 1).all():
            notes.append("statistics look never updated (mean 0, var 1): folded as stored; see bnkit audit")
        stored = self.index.constant(target.input[1]) if len(target.input) > 1 else None  # the layer's weight
        produced = bn.mean - self._added_constant(target, shift, a.size)
        spread = bn.var + bn.epsilon
        offset = float(np.max(np.abs(produced) / np.sqrt(spread))) if np.all(spread > 0) else 0.0
        if stored is not None and stored.dtype.name in ("float16", "bfloat16") and offset > OFFSET_NOTE_RATIO:
            notes.append(f"{stored.dtype.name} weights whose products sit up to {offset:.3g} std from zero: the "
                         "folded weights, rounded to that precision after scaling, can lose up to about as many "
                         "times it on real data (random verification inputs do not show it); verify on real data")
        if shift is not None:
            slot, c = shift
            if stored is None:
                return f"the weight of {node_label(target)!r} is not a constant"
            if target.op_type == "MatMul" and (why := _not_2d(self, target)):
                return why  # before the shift is computed: on (N, C, L) its constant lines up with L, not C
            rank = stored.ndim if target.op_type in ("Conv", "ConvTranspose") else 2
            if c.ndim > rank:
                return f"the constant added by {node_label(producer)!r} has rank {c.ndim} > the layer output's {rank}"
            channel = (-1,) + (1,) * (rank - 2)
            try:
                np.broadcast_shapes(c.shape, (a.size,) + channel[1:])
            except ValueError:
                return (f"the constant added by {node_label(producer)!r} has shape {list(c.shape)}, which does not "
                        f"line up with the BN's {a.size} channels on axis 1")
            shifted = a.reshape(channel) * c.astype(np.float64) + b.reshape(channel)
            too_big = _beyond_range(producer, c.dtype, shift=shifted)
        elif target.op_type == "MatMul" and stored is not None:
            too_big = _beyond_range(target, stored.dtype, shift=b)  # it becomes an Add of a constant of that dtype
        else:
            too_big = None
        reason = too_big or _FOLDERS[target.op_type](self, target, a, None if shift else b, notes, bn.scale)
        if reason:
            return reason
        if shift is not None:
            self.set_constant(producer, slot, shifted.astype(c.dtype), "shift", notes)
            notes.append(f"shift folded into {node_label(producer)!r}")
            producer.output[0] = node.output[0]
            self.graph.node.remove(node)
        elif target.op_type == "MatMul":
            bias_name = _fresh_name(f"{bn.name}.bias_folded", self.taken)
            dtype = self.index.constant(target.input[1]).dtype
            self.graph.initializer.append(numpy_helper.from_array(b.astype(dtype), bias_name))
            add = helper.make_node("Add", [x, bias_name], [node.output[0]],
                                   name=_fresh_name(f"{bn.name}_bias", self.taken))
            position = list(self.graph.node).index(node)
            self.graph.node.remove(node)
            self.graph.node.insert(position, add)
        else:
            target.output[0] = node.output[0]
            self.graph.node.remove(node)
        self.report.folded.append(FoldedNode(bn.name, node_label(target), target.op_type, notes))
        self.reindex()
        return None


def _weight(folder: _Folder, node: onnx.NodeProto, slot: int, what: str):
    name = node.input[slot] if slot < len(node.input) else ""
    value = folder.index.constant(name) if name else None
    if value is None:
        return None, f"the {what} of {node_label(node)!r} is not a constant"
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
        return None, f"the {what} of {node_label(node)!r} is {value.dtype}, not floating point"
    return value, None


def _beyond_range(node: onnx.NodeProto, dtype: np.dtype, **values: np.ndarray | None) -> str | None:
    """Why folded values computed in float64 cannot be stored in the layer's ``dtype`` (finite there, inf in
    float16 above 65504), or None: the node is then left as it is, as :func:`bnkit.torch.fold_bn` refuses it."""
    for what, v in values.items():
        if v is None or not np.isfinite(v).all():
            continue
        with np.errstate(over="ignore"):
            if not np.isfinite(v.astype(dtype)).all():
                return (f"folding gives {what} beyond {np.dtype(dtype).name}'s range in {node_label(node)!r} "
                        f"(max |{what}| {np.abs(v).max():.3g}: a variance far below eps' scale, or a large gamma)")
    return None


def _below_normal(node: onnx.NodeProto, dtype: np.dtype, peaks: np.ndarray, a: np.ndarray,
                  gamma: np.ndarray) -> str | None:
    """Why folded weights would lose precision in the layer's ``dtype``, or None: an output channel whose largest
    nonzero |weight| (``peaks``, one per channel, after scaling by ``a``) the fold takes below the dtype's smallest
    normal number (float16: 6.1e-5), where values are subnormal and keep only a few significant bits; the node is
    left as it is, as on overflow. A channel whose ``gamma`` (the BN's scale) is already below it does not count (the
    unfolded model has those few bits only), nor one whose weights are and which the fold does not shrink by half or
    more (subnormals keep a fixed absolute step: scaling them down by ``a`` loses about log2(1/a) bits)."""
    import ml_dtypes  # onnx's own dependency: it reads bfloat16 tensors as ml_dtypes arrays

    tiny = float(ml_dtypes.finfo(dtype).tiny)
    with np.errstate(divide="ignore", invalid="ignore"):
        before = peaks / np.abs(a)  # the channel's largest |weight| as stored
    low = np.flatnonzero((peaks > 0) & (peaks < tiny) & ((before >= tiny) | (np.abs(a) < 0.5))
                         & (np.abs(gamma) >= tiny))
    if not low.size:
        return None
    return (f"folding gives weights below {np.dtype(dtype).name}'s smallest normal number {tiny:.3g} in "
            f"{node_label(node)!r} (output channel {int(low[0])}: max |weight| {peaks[low[0]]:.3g}; {low.size} "
            "channel(s)), where they keep only a few significant bits: a variance far above the weights' scale, or "
            "a tiny gamma")


def _fold_conv_like(
    folder: _Folder, node: onnx.NodeProto, a: np.ndarray, b: np.ndarray | None, notes: list[str], gamma: np.ndarray
) -> str | None:
    w, why = _weight(folder, node, 1, "weight")
    if w is None:
        return why
    group = int(attribute(node, "group", 1))
    if group < 1:
        return f"{node_label(node)!r} has group={group}, which ONNX forbids (onnxruntime refuses the node)"
    if w.ndim < 3:
        return f"the weight of {node_label(node)!r} has rank {w.ndim}"
    w64 = w.astype(np.float64)
    if node.op_type == "Conv":
        if w.shape[0] != a.size:
            return f"{node_label(node)!r} has {w.shape[0]} output channels but the BN has {a.size}"
        w64 = w64 * a.reshape((-1,) + (1,) * (w.ndim - 1))
        peaks = np.abs(w64).reshape(a.size, -1).max(axis=1)
    else:  # ConvTranspose: (C_in, C_out / group, k...)
        if w.shape[0] % group or w.shape[1] * group != a.size:
            return f"{node_label(node)!r} has {w.shape[1] * group} output channels but the BN has {a.size}"
        blocks = w64.reshape((group, w.shape[0] // group, w.shape[1]) + w.shape[2:])
        blocks = blocks * a.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        w64 = blocks.reshape(w.shape)
        peaks = np.abs(blocks).max(axis=(1, *range(3, blocks.ndim))).reshape(-1)
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if has_bias:
        bias, why = _weight(folder, node, 2, "bias")
        if bias is None:
            return why
        bias64 = bias.astype(np.float64).reshape(-1)
    else:
        bias64 = np.zeros(a.size)
    new_bias = a * bias64 + (0.0 if b is None else b) if b is not None or has_bias else None
    why = _beyond_range(node, w.dtype, weights=w64, bias=new_bias) or _below_normal(node, w.dtype, peaks, a, gamma)
    if why:
        return why
    folder.set_constant(node, 1, w64.astype(w.dtype), "W", notes)
    if new_bias is not None:
        if not has_bias:
            notes.append("bias added")
        folder.set_constant(node, 2, new_bias.astype(w.dtype), "B", notes)
    return None


def _fold_gemm(
    folder: _Folder, node: onnx.NodeProto, a: np.ndarray, b: np.ndarray | None, notes: list[str], gamma: np.ndarray
) -> str | None:
    w, why = _weight(folder, node, 1, "B matrix")
    if w is None:
        return why
    if w.ndim != 2:
        return f"the B matrix of {node_label(node)!r} has rank {w.ndim}"
    trans_b = int(attribute(node, "transB", 0))
    n = w.shape[0] if trans_b else w.shape[1]
    if n != a.size:
        return f"{node_label(node)!r} has {n} output features but the BN has {a.size}"
    w64 = w.astype(np.float64) * (a[:, None] if trans_b else a[None, :])
    if _adds_c(node):
        c, why = _weight(folder, node, 2, "C term")
        if c is None:
            return why
        c64 = a * (float(attribute(node, "beta", 1.0)) * c.astype(np.float64)) + (0.0 if b is None else b)
    elif b is not None:
        c64 = b
        notes.append("bias added" if len(node.input) < 3 or not node.input[2] else "C (ignored at beta=0) replaced")
    else:
        c64 = None
    peaks = np.abs(w64).max(axis=1 if trans_b else 0)
    why = _beyond_range(node, w.dtype, weights=w64, bias=c64) or _below_normal(node, w.dtype, peaks, a, gamma)
    if why:
        return why
    folder.set_constant(node, 1, w64.astype(w.dtype), "B", notes)
    if c64 is not None:  # with none, beta stays: 0 keeps an ignored C ignored
        folder.set_constant(node, 2, c64.astype(w.dtype), "C", notes)
        for attr in node.attribute:
            if attr.name == "beta":
                attr.f = 1.0
    return None


def _adds_c(node: onnx.NodeProto) -> bool:
    """A Gemm adds its C input: it has one and beta != 0 (at beta 0 onnxruntime ignores C, NaN/Inf included,
    where beta * C would give NaN)."""
    return len(node.input) > 2 and bool(node.input[2]) and float(attribute(node, "beta", 1.0)) != 0.0


def _not_2d(folder: _Folder, node: onnx.NodeProto) -> str | None:
    """Why a MatMul's output features may not be BN's channel axis 1 (its first operand is not known to be 2-D)."""
    if (rank := folder.rank(node.input[0])) == 2:
        return None
    return (f"the first operand of {node_label(node)!r} is {'not known to be 2-D' if rank is None else f'{rank}-D'}"
            ", so BN's channel axis 1 may not be the MatMul's output-feature axis")


def _fold_matmul(
    folder: _Folder, node: onnx.NodeProto, a: np.ndarray, b: np.ndarray | None, notes: list[str], gamma: np.ndarray
) -> str | None:
    w, why = _weight(folder, node, 1, "second operand")
    if w is None:
        return why
    if w.ndim != 2 or w.shape[1] != a.size:
        return f"the second operand of {node_label(node)!r} is not a (K, {a.size}) matrix"
    if why := _not_2d(folder, node):
        return why
    w64 = w.astype(np.float64) * a[None, :]
    why = _beyond_range(node, w.dtype, weights=w64) or _below_normal(node, w.dtype, np.abs(w64).max(axis=0), a, gamma)
    if why:
        return why
    folder.set_constant(node, 1, w64.astype(w.dtype), "B", notes)
    if b is not None:
        notes.append("BN replaced by Add of the folded shift")
    return None


_FOLDERS = {"Conv": _fold_conv_like, "ConvTranspose": _fold_conv_like, "Gemm": _fold_gemm, "MatMul": _fold_matmul}


def _dropouts_to_inference(graph: onnx.GraphProto, opset: int, report: OnnxFoldReport) -> None:
    """Switch constant-true (or stored-default-true) training-mode Dropout nodes to inference (see the module doc)."""
    index = GraphIndex(graph)
    for node, known, overridable, _ in training_dropouts(graph, opset, index):
        label = node_label(node)
        if not known:
            report.notes.append(f"Dropout {label!r}: training_mode is computed at run time; left as it is")
            continue
        if overridable:
            report.notes.append(f"Dropout {label!r}: training_mode was graph input {node.input[2]!r} with a stored "
                                "default true; switched to inference, a value fed for it is now ignored")
        mask = node.output[1] if len(node.output) > 1 else ""
        if mask and index.readers(mask):
            del node.input[2:]  # absent training_mode: inference; the mask (all true) stays readable
        else:
            identity = helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)
            position = list(graph.node).index(node)
            graph.node.remove(node)
            graph.node.insert(position, identity)
        report.dropout_converted.append(label)


def _names(graph: onnx.GraphProto, into: set[str]) -> set[str]:
    """Every value and node name of ``graph`` and of its If/Loop/Scan bodies."""
    into.update(initializer_names(graph))
    into.update(i.name for i in graph.input)
    for node in graph.node:
        into.add(node.name)
        into.update(node.input)
        into.update(node.output)
        for sub in subgraphs(node):
            _names(sub, into)
    return into


def _random_nodes(nodes, opset: int) -> list[onnx.NodeProto]:
    """The random-number nodes among ``nodes`` and in their If/Loop/Scan bodies, in graph order (Dropout from
    opset 12, where it has a ``seed``)."""
    found = []
    for node in nodes:
        for sub in subgraphs(node):
            found += _random_nodes(sub.node, opset)
        if (node.op_type in RANDOM_OPS and node.domain in ("", "ai.onnx")
                and (node.op_type != "Dropout" or opset >= 12)):
            found.append(node)
    return found


def _seeded(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """A copy whose random-number nodes (Dropout, RandomNormal(Like), RandomUniform(Like), Bernoulli, Multinomial;
    in bodies and local functions too) each draw from a fixed seed of their own, numbered in graph order (for
    verification only: the reference and the folded model then draw the same numbers)."""
    copy = load_model(model)
    nodes = _random_nodes(copy.graph.node, opset) + [n for f in copy.functions for n in _random_nodes(f.node, opset)]
    for k, node in enumerate(nodes):
        for attr in [a for a in node.attribute if a.name == "seed"]:
            node.attribute.remove(attr)
        # from 1: onnxruntime takes a seed of 0 as 1, so seeds 0 and 1 would draw the same numbers
        node.attribute.append(helper.make_attribute("seed", RANDOM_OPS[node.op_type](k + 1)))
    return copy


def _prune(model: onnx.ModelProto, read_before: set[str]) -> None:
    """Remove the initializers (sparse ones too) and the nodes that computed constants (Constant, Identity,
    Transpose, Cast, Shape, Expand, CastLike) folding left unread, and stale value_info."""
    graph = model.graph
    while True:
        index = GraphIndex(graph)
        dead = [n for n in graph.node if n.op_type in ("Identity", "Constant", "Transpose", "Cast", "Shape", "Expand",
                                                         "CastLike")
                and n.domain in ("", "ai.onnx") and n.output[0] in read_before and not index.readers(n.output[0])]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    index = GraphIndex(graph)
    for stored in (graph.initializer, graph.sparse_initializer):
        for t in [t for t in stored if stored_name(t) in read_before and not index.readers(stored_name(t))]:
            stored.remove(t)
    present = {i.name for i in graph.input} | initializer_names(graph)
    for n in graph.node:
        present.update(n.output)
    for v in [v for v in graph.value_info if v.name not in present]:
        graph.value_info.remove(v)


def fold_model(
    model: "str | os.PathLike | onnx.ModelProto",
    *,
    to_inference: bool = False,
    verify: bool = True,
    input_shapes: dict[str, list[int]] | None = None,
    dynamic_size: int = 2,
    rtol: float | None = None,
) -> tuple[onnx.ModelProto, OnnxFoldReport]:
    """Fold every foldable BatchNormalization node; the input (path or proto) is never modified.

    ``verify`` runs the reference (the input, with training BN and Dropout nodes switched when
    ``to_inference``; training Dropout nodes left are seeded alike in both) and the folded model
    in onnxruntime on random inputs and raises :class:`FoldVerificationError` when the norm-wise
    relative difference exceeds ``rtol`` (default 1e-4, 1e-2 / 4e-2 for a graph holding or computing fp16 /
    bf16 values: :func:`~bnkit.onnx.verify.default_tolerance`),
    :class:`~bnkit.onnx.verify.OnnxRuntimeError` when onnxruntime cannot run the model (bf16
    convolutions on CPU, custom ops).
    Raises ValueError for a file that is unreadable or fails ``onnx.checker``, for verification
    inputs that would be empty (``dynamic_size`` or an ``input_shapes`` size below 1: nothing to compare) or on
    which both models output only NaN/Inf (nothing finite to compare), and
    with ``to_inference`` for training nodes it cannot switch (see the module doc).
    """
    work = load_model(model)
    if too_large(work):
        raise ValueError("the model is over 2 GB, protobuf's limit for one message: bnkit fold writes and verifies "
                         "the folded model as one message, so it does not fold models this large (bnkit audit reads "
                         "them); nothing written")
    try:
        onnx.checker.check_model(work)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"the model fails onnx.checker, not folding it: {str(exc).splitlines()[0]}") from exc
    report = OnnxFoldReport()
    folder = _Folder(work, report)
    read_before = {name for name in folder.index.initializers | folder.index.producer if folder.index.readers(name)}

    functions = local_functions(work)
    nodes = bn_nodes(work.graph, folder.opset, folder.index, functions)
    if to_inference and (stuck := unswitchable_training(work.graph, folder.opset, nodes, folder.index, functions)):
        raise ValueError(
            f"cannot switch training-mode nodes {stuck} to inference: bnkit rewrites only BatchNormalization and "
            "Dropout nodes of the main graph (BatchNormalization in opset 9 or later, whose running-statistic outputs "
            "nothing reads), and these are inside an If/Loop/Scan body or a local function, older, or have running "
            "statistics that other nodes or the graph's outputs read; re-export the model in eval mode (nothing "
            "written)")
    candidates = []
    for bn in nodes:
        if (where := bn.unrewritable) is not None:
            report.left[bn.name] = f"{where}: not folded"
            if not bn.training and not bn.extra_outputs and len(bn.node.output) > 1:  # blank names only: absent
                del bn.node.output[1:]  # outputs, which crash onnxruntime 1.32; dropping them changes nothing
        elif (why := folder.tidy_outputs(bn, to_inference)) is not None:
            report.left[bn.name] = why
        else:
            candidates.append((bn.name, bn.node.output[0]))  # an output names a node uniquely; a name may not
    # nodes left with blank ("") optional outputs onnxruntime 1.32 cannot run: the fold below touches none of them
    crashing = [bn.name for bn in nodes if blank_outputs_fail(bn.node, bn.opset)]
    if to_inference:
        _dropouts_to_inference(work.graph, folder.opset, report)
    reference = load_model(work)
    folder.reindex()

    # A fold edits its layer's weights and the graph around it, never another BN's constants: read the BNs once.
    by_output = {b.node.output[0]: b for b in bn_nodes(work.graph, folder.opset, folder.index) if not b.in_subgraph}
    for name, y in candidates:
        why = folder.fold(by_output[y])
        if why is not None:
            report.left[name] = why
    _prune(work, read_before)
    if work.ir_version < 4:  # IR 3 declares every initializer a graph input: the folded weights too
        declared = {i.name for i in work.graph.input}
        work.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                                for t in work.graph.initializer if t.name not in declared)
    if too_large(work):  # weights shared with other nodes are copied before they are folded
        raise ValueError("the folded model is over 2 GB, protobuf's limit for one message (the input is under it: "
                         "weights shared with other nodes were copied to fold them), so bnkit fold cannot write or "
                         "verify it as one message; nothing written")
    try:
        onnx.checker.check_model(work)
    except onnx.checker.ValidationError as exc:  # a bug in the folder, never a silent bad model
        raise RuntimeError(f"the folded model fails onnx.checker: {exc}") from exc

    if verify:
        unloadable = [bn for bn in nodes if bn.statistics_outputs_absent]
        if unloadable and not to_inference:  # to_inference switched them; blank outputs: the error below
            raise OnnxRuntimeError(
                f"BatchNormalization nodes {[bn.name for bn in unloadable]} are in training mode (training_mode=1) "
                "without their running mean and variance outputs, which onnxruntime refuses to load, so the model "
                f"cannot be verified; {_repair_advice(unloadable)}")
        if crashing:
            stuck = [bn for bn in nodes if bn.name in crashing]
            raise OnnxRuntimeError(
                f"BatchNormalization nodes {crashing} keep blank (\"\") optional outputs in a pattern onnxruntime "
                "1.32 cannot run (a segmentation fault where a running statistic is blank), so the model cannot be "
                f"verified; {_repair_advice(stuck)}")
        try:
            _verify(reference, work, folder.opset, report, input_shapes, dynamic_size, rtol)
        except MemoryError as exc:  # the runs' outputs, or their float64 copies: the fold itself fitted
            if isinstance(exc, VerificationMemoryError):
                raise
            raise VerificationMemoryError(f"the outputs on inputs of shapes {report.input_shapes}: {exc}") from None
        if not report.verified:
            raise FoldVerificationError(
                f"onnxruntime outputs differ after folding: max relative difference {report.max_rel_diff:.3g} > "
                f"{report.tolerance:g} (max abs {report.max_abs_diff:.3g}); nothing was written", report)
    return work, report


def _verify(reference: onnx.ModelProto, work: onnx.ModelProto, opset: int, report: OnnxFoldReport,
            input_shapes: dict[str, list[int]] | None, dynamic_size: int, rtol: float | None) -> None:
    """Run ``reference`` and the folded ``work`` in onnxruntime on the same random inputs; fills ``report``'s
    shapes, tolerance and differences (see :func:`fold_model`)."""
    feeds = random_inputs(reference, input_shapes=input_shapes, dynamic_size=dynamic_size)
    report.input_shapes = {k: list(v.shape) for k, v in feeds.items()}
    report.tolerance = default_tolerance(reference) if rtol is None else rtol
    try:
        expected = run(_seeded(reference, opset), feeds)
    except OnnxRuntimeError as exc:
        raise OnnxRuntimeError(
            f"{exc}\nthe input model cannot be run on the verification inputs {report.input_shapes} (dynamic "
            f"dimensions set to {dynamic_size}): if they do not fit it, give shapes that fit it (input_shapes / "
            "--input-shape NAME=SHAPE); if onnxruntime cannot run it at all (an op or dtype it lacks), pass "
            "verify=False (--no-verify) to fold without the check") from None
    try:
        report.max_abs_diff, report.max_rel_diff = compare(expected, run(_seeded(work, opset), feeds))
    except ValueError as exc:
        raise ValueError(f"cannot verify the fold on standard-normal inputs of shapes {report.input_shapes}: "
                         f"{exc}; verify=False (--no-verify) folds without the check; nothing written") from None


def _repair_advice(nodes: list[BNNode]) -> str:
    """What makes the BatchNormalization ``nodes`` onnxruntime cannot run into ones it can: ``to_inference`` where
    bnkit switches them all, else a re-export (their If/Loop bodies or functions are not rewritten)."""
    switchable = [bn.name for bn in nodes if bn.unrewritable is None and bn.training]
    if len(switchable) == len(nodes):
        return "pass to_inference=True (--to-inference) to switch them to their running statistics"
    left = [f"{bn.name} ({bn.unrewritable})" for bn in nodes if bn.unrewritable is not None]
    return ("re-export the model in eval mode" + (f": bnkit fold does not rewrite {', '.join(left)}" if left else "")
            + (f"; to_inference=True (--to-inference) switches {switchable}" if switchable else ""))


def fold(in_path: "str | os.PathLike", out_path: "str | os.PathLike", **options) -> OnnxFoldReport:
    """Fold ``in_path`` into ``out_path`` (see :func:`fold_model` for ``options``).

    ``out_path`` is written atomically (a temporary file beside it, renamed when complete),
    and only after verification passed: on any failure nothing is written and an existing
    file (``in_path`` included, when ``out_path`` names it) is left as it was. ``out_path`` may not name a file
    holding ``in_path``'s external data (ValueError): the folded model is written whole, and the input would be
    lost.
    """
    target = check_target(out_path)
    if not isinstance(in_path, onnx.ModelProto) and target.exists():
        for data in external_data_files(in_path):
            if os.path.exists(data) and os.path.samefile(data, target):
                raise ValueError(f"{out_path} holds the tensors of {in_path} (its external data): writing the "
                                 "folded model there would destroy the input; name another file")
    folded, report = fold_model(in_path, **options)
    with atomic_path(out_path) as tmp:
        onnx.save(folded, tmp)
    return report
