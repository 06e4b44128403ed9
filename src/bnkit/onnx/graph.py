"""Reading an ONNX graph: loading safely, constants, producers and consumers, BatchNormalization nodes.

ONNX ``BatchNormalization`` (onnx/defs/nn/defs.cc) computes, per channel ``c`` on axis 1,
``Y = scale * (X - input_mean) / sqrt(input_var + epsilon) + B``. Its ``momentum`` is the
weight on the OLD running value (the Keras/Flax side; PyTorch's is ``1 - momentum``).
Training is signalled by ``training_mode=1`` from opset 14, and before that by asking
for the optional running-statistic outputs: onnxruntime then normalises with the batch
statistics (onnxruntime/core/providers/cpu/nn/batch_norm.h), so either marks a node
that does not use its running statistics at inference.
"""
from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx
from google.protobuf.message import EncodeError, Message
from onnx import helper, numpy_helper

from ..checks import ml_float
from ..file_kinds import (looks_like_npy, looks_like_pickle, looks_like_safetensors, unreadable_file,
                          unreadable_file_error, zip_kind)

__all__ = ["RANDOM_OPS", "MalformedNodeError", "load_model", "check_model", "too_large", "opset_version", "GraphIndex",
           "BNNode", "bn_nodes", "subgraphs", "attribute", "node_label", "TrainingDropout", "training_dropouts",
           "unswitchable_training", "local_functions", "stored_name", "initializer_names",
           "blank_outputs_fail"]


class MalformedNodeError(ValueError):
    """A node (or sparse initializer) bnkit cannot read: an attribute of another type than its op requires, a
    required one missing, or values that do not fit together (such a model fails ``onnx.checker``, or its full
    check)."""


def load_model(model: "str | os.PathLike | onnx.ModelProto") -> onnx.ModelProto:
    """A private copy of ``model`` (a path or a ModelProto), with a clear error for unreadable files.

    ONNX files hold only tensors and graph structure; nothing in them is executed on load.
    """
    if isinstance(model, onnx.ModelProto):
        unloaded = [t.name for t in _model_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
        if unloaded:
            raise ValueError(
                f"the model's tensors {unloaded[:5]}{' ...' if len(unloaded) > 5 else ''} are in an external data "
                "file that was not loaded: pass the .onnx file's path, or load it with onnx.load(path) "
                "(load_external_data=True, the default)")
        if (where := non_utf8_text(model)) is not None:
            raise ValueError(f"the model is not a valid ONNX model: {where} holds text that is not UTF-8")
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    path = os.fspath(model)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not an ONNX model file")
    if (exc := unreadable_file_error(path)) is not None:
        raise exc
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, ...
        if (kind := _other_format(path)) is not None:
            raise ValueError(f"{path} is {kind}, not an ONNX model") from exc
        raise ValueError(f"{path} is not a readable ONNX model: {exc}") from exc
    if not proto.HasField("graph") or not (proto.graph.node or proto.graph.output):  # what stray bytes parse as
        raise ValueError(f"{path} is not a readable ONNX model: its graph has no nodes and no outputs")
    if (where := non_utf8_text(proto)) is not None:  # before the external data, whose file names it checks
        raise ValueError(f"{path} is not a readable ONNX model: {where} holds text that is not UTF-8")
    try:
        onnx.load_external_data_for_model(proto, os.path.dirname(path))  # what onnx.load(path) does next
    except Exception as exc:  # a missing or truncated data file, a location outside the model's folder, ...
        raise ValueError(f"{path} is not a readable ONNX model: {exc}") from exc
    return proto


#: The string fields of an ONNX model that name things bnkit looks up (nodes, values, tensors, operators, domains,
#: attributes, functions, external data files).
_NAME_FIELDS = frozenset({"name", "input", "output", "op_type", "domain", "ref_attr_name", "overload",
                          "key", "value"})  # the last two: external data's entries (metadata_props is skipped)


def non_utf8_text(message: Message, where: str = "model") -> str | None:
    """Where ``message`` holds a name that is not UTF-8 (protobuf hands such a proto2 string over as ``bytes``,
    which every name lookup then trips on), or None. Only the string fields bnkit reads (:data:`_NAME_FIELDS`) are
    checked: a doc string or metadata entry of any bytes is left, as onnxruntime leaves it."""
    for field, value in message.ListFields():
        if not (field.type == field.TYPE_MESSAGE and field.name != "metadata_props"
                or field.type == field.TYPE_STRING and field.name in _NAME_FIELDS):
            continue
        one = isinstance(value, (str, bytes, Message))  # else a repeated field
        for k, item in enumerate([value] if one else value):
            label = f"{where}.{field.name}" + ("" if one else f"[{k}]")
            if isinstance(item, bytes):
                return label
            if isinstance(item, Message) and (found := non_utf8_text(item, label)) is not None:
                return found
    return None


def _other_format(path: str) -> str | None:
    """What a file that onnx cannot parse is instead, told from its first bytes (the weights and data files bnkit
    reads), or None."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if looks_like_safetensors(head, size):
        return "a safetensors file (PyTorch weights)"
    if looks_like_npy(head):
        return "a NumPy .npy array (np.save)"
    if looks_like_pickle(head):
        return "a pickle (a PyTorch checkpoint in torch.save's legacy format?)"
    if not head.startswith(b"PK\x03\x04"):
        return None
    return {"torchscript": "a TorchScript archive (torch.jit.save)", "torch": "a PyTorch checkpoint (torch.save)",
            "npz": "a NumPy .npz archive (np.savez)", "zip": "a zip archive"}.get(zip_kind(path))  # None: damaged


#: Protobuf cannot serialize a message of 2 GiB or more: a larger model exists only as a file with external data.
PROTOBUF_LIMIT = 2**31


def too_large(proto: onnx.ModelProto) -> bool:
    """The model is too large to serialize as one protobuf message (its tensors loaded in memory)."""
    try:
        return proto.ByteSize() >= PROTOBUF_LIMIT
    except EncodeError:  # protobuf's upb backend gives no size for a message over the limit: it raises
        return True


def check_model(proto: onnx.ModelProto, source: "str | os.PathLike | onnx.ModelProto") -> None:
    """``onnx.checker.check_model`` on ``proto``, read from ``source``; a model over :data:`PROTOBUF_LIMIT` is
    checked from its file, which the checker reads with its external data (raises ValueError for one given
    in memory). Raises ``onnx.checker.ValidationError`` for an invalid model."""
    if not too_large(proto):
        onnx.checker.check_model(proto)
    elif isinstance(source, onnx.ModelProto):
        raise ValueError("the model is over 2 GB, protobuf's limit for one message, so it cannot be checked in memory: "
                         "pass the path of its .onnx file (with its external data) instead")
    else:
        onnx.checker.check_model(os.fspath(source))


def external_data_files(path: str | os.PathLike) -> list[str]:
    """The files the ONNX model at ``path`` keeps tensors in (its external data), as paths beside it; none for a
    file onnx cannot read and for a path that is no regular file, which a read would block on (a named pipe; the
    reader of the model says why)."""
    if unreadable_file(path) is not None:
        return []
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model: nothing of it to protect
        return []
    # a location of bytes (not UTF-8) is left out: reading the model refuses it by name
    places = {e.value for t in _model_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL
              for e in t.external_data if e.key == "location" and isinstance(e.value, str)}
    return sorted(os.path.join(os.path.dirname(os.fspath(path)), p) for p in places)


def _model_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor the model holds: initializers and node attributes of its graph, of every subgraph, and of its
    local functions' nodes and their bodies."""
    tensors = [t for g in [model.graph, *nested_subgraphs(model.graph)] for t in _tensors_of(g)]
    for node in (n for f in model.functions for n in f.node):
        tensors += _node_tensors(node)
        tensors += [t for sub in subgraphs(node) for g in [sub, *nested_subgraphs(sub)] for t in _tensors_of(g)]
    return tensors


def nested_subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """Every subgraph (If/Loop/Scan bodies) below ``graph``, nested ones included."""
    found = []
    for node in graph.node:
        for sub in subgraphs(node):
            found += [sub, *nested_subgraphs(sub)]
    return found


def _tensors_of(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """The initializers of ``graph`` (sparse ones' values and indices too) and the tensors its nodes hold."""
    tensors = list(graph.initializer)
    for sparse in graph.sparse_initializer:
        tensors += [sparse.values, sparse.indices]
    return tensors + [t for node in graph.node for t in _node_tensors(node)]


def _node_tensors(node: onnx.NodeProto) -> list[onnx.TensorProto]:
    """The tensors a node's attributes hold (``Constant`` values), not its bodies'."""
    held = []
    for attr in node.attribute:
        held += ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
        if attr.HasField("sparse_tensor"):
            held += [attr.sparse_tensor.values, attr.sparse_tensor.indices]
    return held


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain (``ai.onnx``) opset the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ValueError("the model imports no default-domain (ai.onnx) opset")


#: ONNX ops that draw random numbers, each with the type of its ``seed`` attribute (unseeded, they draw anew on every
#: run; Dropout only in training mode). RandomNormalLike is how torch.onnx exports ``torch.randn_like``.
RANDOM_OPS = {"Dropout": int, "RandomNormal": float, "RandomNormalLike": float, "RandomUniform": float,
              "RandomUniformLike": float, "Bernoulli": float, "Multinomial": float}

#: A local function's key, as a calling node names it: ``(domain, name, overload)``.
FunctionKey = tuple[str, str, str]


def local_functions(model: onnx.ModelProto) -> dict[FunctionKey, onnx.FunctionProto]:
    """The model's local functions (``model.functions``) by the key a calling node names them with."""
    return {(f.domain, f.name, getattr(f, "overload", "")): f for f in model.functions}


def _called(node: onnx.NodeProto, functions: dict[FunctionKey, onnx.FunctionProto]) -> onnx.FunctionProto | None:
    """The local function ``node`` calls, or None (a standard or custom op)."""
    return functions.get((node.domain, node.op_type, getattr(node, "overload", ""))) if functions else None


def _function_opset(function: onnx.FunctionProto, opset: int) -> int:
    """The default-domain opset a function body imports (its own ``opset_import``), else the model's."""
    own = [imp.version for imp in function.opset_import if imp.domain in ("", "ai.onnx")]
    return int(own[0]) if own else opset


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held by a node's attributes (If branches, Loop/Scan bodies)."""
    return [g for _, g in _named_subgraphs(node)]


def _named_subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """:func:`subgraphs` with the attribute each hangs from (``then_branch``; ``name[k]`` in a list of graphs)."""
    out = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append((attr.name, attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend((f"{attr.name}[{k}]", g) for k, g in enumerate(attr.graphs))
    return out


def _referenced_names(graph: onnx.GraphProto, into: set[str]) -> set[str]:
    """Every value name read by a node of ``graph`` or of its subgraphs (outer-scope reads included)."""
    for node in graph.node:
        into.update(i for i in node.input if i)
        for sub in subgraphs(node):
            _referenced_names(sub, into)
            into.update(o.name for o in sub.output)
    return into


class GraphIndex:
    """Who produces and who reads each value of one graph, and which values are constants.

    A constant is an initializer (a sparse one too, read as the dense tensor it stands for) that is not also a
    graph input (a graph input of the
    same name would let the caller override it at run time), the output of a
    ``Constant`` node, or an ``Identity`` or ``Transpose`` of a constant (the PyTorch
    exporter shares equal initializers through ``Identity``, and without constant folding
    writes a bias-free Linear as ``MatMul`` by ``Transpose(weight)``). An initializer that
    is also a graph input (what ``keep_initializers_as_inputs=True`` and IR < 4 exports
    write) is a *default*: the value that runs unless a caller feeds another, readable
    with ``defaults=True``.

    ``outer``: the index of the graph enclosing a subgraph (an If branch, a Loop body). A name the
    subgraph neither declares as an input, stores nor computes is read from there (ONNX's outer-scope
    rule, onnx/docs/IR.md "Names Within a Graph"): TorchScript exports keep a branch's BatchNorm
    parameters among the main graph's initializers.

    ``graph`` may also be the body of a local function (``FunctionProto``, as
    ``torch.onnx.export(..., export_modules_as_functions=...)`` writes a module's nodes); ``call``
    then binds it to one call: the calling node and the index of the graph it is in. A function sees
    no outer scope; its formal inputs are the call's arguments, read through the caller's index.
    """

    def __init__(self, graph: onnx.GraphProto | onnx.FunctionProto, outer: GraphIndex | None = None,
                 call: tuple[onnx.NodeProto, GraphIndex] | None = None) -> None:
        self.graph = graph
        self.outer = outer
        self.bindings: dict[str, tuple[GraphIndex, str]] = {}
        self.call = call
        if isinstance(graph, onnx.FunctionProto):
            self.inputs, self.outputs = set(graph.input), set(graph.output)
            self.initializers, self.defaults = {}, {}
            if call is not None:
                node, caller = call
                self.bindings = {formal: (caller, actual) for formal, actual in zip(graph.input, node.input)}
        else:
            self.inputs = {i.name for i in graph.input}
            self.outputs = {o.name for o in graph.output}
            stored = [*graph.initializer, *graph.sparse_initializer]
            self.initializers = {stored_name(t): t for t in stored if stored_name(t) not in self.inputs}
            self.defaults = {stored_name(t): t for t in stored if stored_name(t) in self.inputs}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.subgraph_reads: set[str] = set()
        for node in graph.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers[i].append(node)
            for sub in subgraphs(node):
                _referenced_names(sub, self.subgraph_reads)

    def attribute(self, node: onnx.NodeProto, name: str, default=None, kind: int | None = None):
        """:func:`attribute`, a function body's reference attributes (``ref_attr_name``: the exporter writes one
        for a value that differs between the module instances a function serves) read from the call, else the
        function's declared default (an enclosing If/Loop body defers to its graph's index)."""
        for attr in node.attribute:
            if attr.name == name:
                return self._referenced(attr.ref_attr_name, default, kind) if attr.ref_attr_name else (
                    _attribute_value(node, attr, kind))
        return default

    def _referenced(self, ref: str, default, kind: int | None):
        if self.call is None:
            return self.outer._referenced(ref, default, kind) if self.outer is not None else default
        node, caller = self.call
        for attr in node.attribute:
            if attr.name == ref:
                if not attr.ref_attr_name:
                    return _attribute_value(node, attr, kind)
                value = caller._referenced(attr.ref_attr_name, _UNSET, kind)
                if value is not _UNSET:
                    return value
                break  # a reference its caller leaves unset: the call passes nothing, and the default applies
        for attr in getattr(self.graph, "attribute_proto", ()):  # the function's defaults
            if attr.name == ref:
                return _attribute_value(node, attr, kind)
        return default

    def readers(self, name: str) -> int:
        """How many places read ``name``: node inputs, graph outputs, subgraphs."""
        return len(self.consumers.get(name, ())) + (name in self.outputs) + (name in self.subgraph_reads)

    def constant(self, name: str, *, defaults: bool = False) -> np.ndarray | None:
        """The value of ``name`` if it is a compile-time constant (``defaults``: or a stored default), else None.

        Identity, Cast and Transpose chains are followed in a loop, however long. A value computed from itself (a
        cycle: a graph the checker refuses) is no constant, nor, as a last resort, one behind more nested
        Shape/Expand/CastLike nodes or function calls than Python's recursion limit lets bnkit follow."""
        try:
            return self._constant(name, defaults, frozenset())
        except RecursionError:
            return None

    def _constant(self, name: str, defaults: bool, path: frozenset) -> np.ndarray | None:
        """:meth:`constant`; ``path``: the ``(graph, name)`` pairs being read on the way here."""
        steps: list[onnx.NodeProto] = []  # the Cast/Transpose nodes on the way, outermost first
        value = None
        while name:
            if (id(self), name) in path:
                return None
            path = path | {(id(self), name)}
            if name in self.bindings:  # a function's formal input: the caller's argument
                caller, actual = self.bindings[name]
                value = caller._constant(actual, defaults, path)
                break
            if name in self.initializers:
                value = _stored_array(self.initializers[name])
                break
            if defaults and name in self.defaults:
                value = _stored_array(self.defaults[name])
                break
            node = self.producer.get(name)
            if node is None and name not in self.inputs and name not in self.defaults and self.outer is not None:
                value = self.outer._constant(name, defaults, path)
                break
            if node is None or node.domain not in ("", "ai.onnx"):
                return None
            if node.op_type in ("Identity", "Transpose", "Cast"):  # Cast: float16 storage read as float32
                if node.op_type != "Identity":
                    steps.append(node)
                name = node.input[0] if node.input else ""
                continue
            if node.op_type == "Constant":
                value = self._constant_node_value(node)
            elif node.op_type in _SHAPE_OPS:
                value = self._shape_op(node, defaults, path)
            break
        if value is None:
            return None
        for node in reversed(steps):  # innermost first
            if node.op_type == "Transpose":
                value = _transposed(node, value, self.attribute(node, "perm", None, _INTS))
            else:
                value = value.astype(_cast_target(node, self.attribute(node, "to", None, _INT)))
        return value

    def _constant_node_value(self, node: onnx.NodeProto) -> np.ndarray | None:
        """A Constant node's value (a sparse one as the dense tensor it stands for), its attribute read from the
        call where a function body refers to one (``ref_attr_name``); None for strings, or a reference the call and
        the function's defaults leave unset."""
        for attr in node.attribute:
            if attr.name not in _CONSTANT_KINDS:
                return None  # value_string(s): not a numeric constant
            value = self.attribute(node, attr.name, None, _CONSTANT_KINDS[attr.name])
            if value is None:
                return None
            what = f"node {node_label(node)!r}'s {attr.name}"
            if attr.name == "value":
                return _tensor_array(value, what)
            if attr.name == "sparse_value":
                return _stored_array(value, what)
            return np.array(value, dtype=np.float32 if attr.name.startswith("value_float") else np.int64)
        return None

    def _shape_op(self, node: onnx.NodeProto, defaults: bool, path: frozenset) -> np.ndarray | None:
        """``Shape`` of a constant, ``Expand`` of constants, ``CastLike`` of a constant to a value of known type:
        how torch.onnx's dynamo exporter (optimize=False) writes the zero bias of a bias-free Conv."""
        needed = 1 if node.op_type == "Shape" else 2
        if len(node.input) < needed or not all(node.input[:needed]):
            raise MalformedNodeError(f"{node.op_type} node {node_label(node)!r} has inputs {list(node.input)}: it "
                                     f"needs {needed} (the ONNX spec; onnxruntime refuses the model)")
        value = self._constant(node.input[0], defaults, path)
        if value is None:
            return None
        if node.op_type == "Shape":
            start, end = attribute(node, "start", 0, _INT), attribute(node, "end", None, _INT)
            return np.array(value.shape[start:end], dtype=np.int64)
        if node.op_type == "Expand":
            shape = self._constant(node.input[1], defaults, path)
            if shape is None:
                return None
            try:
                out = np.broadcast_shapes(value.shape, tuple(int(d) for d in np.ravel(shape)))
            except (ValueError, OverflowError):  # also dims of NaN or Inf (a float shape)
                raise MalformedNodeError(f"node {node_label(node)!r} expands shape {list(value.shape)} to "
                                         f"{np.ravel(shape).tolist()}, which it cannot be broadcast to") from None
            return np.array(np.broadcast_to(value, out)) if np.prod(out) <= _EXPAND_MAX else None
        elem = self._elem_type(node.input[1], path)  # CastLike: only the target's type is read
        return None if elem is None else value.astype(_np_dtype(
            elem, f"CastLike node {node_label(node)!r}: its target {node.input[1]!r} has element type {elem}"))

    def _elem_type(self, name: str, path: frozenset) -> int | None:
        """The element type of ``name`` where the graph declares it (inputs, outputs, value_info), or its constant's
        (``path`` as in :meth:`_constant`)."""
        declared = {v.name: v.type.tensor_type.elem_type for v in self._declared() if v.type.HasField("tensor_type")}
        if declared.get(name):
            return declared[name]
        value = self._constant(name, False, path)
        return None if value is None else helper.np_dtype_to_tensor_dtype(value.dtype)

    def _declared(self) -> list[onnx.ValueInfoProto]:
        if isinstance(self.graph, onnx.FunctionProto):
            return []
        return list(self.graph.input) + list(self.graph.output) + list(self.graph.value_info)


#: Ops read through when they compute a constant from constants (see :meth:`GraphIndex._shape_op`).
_SHAPE_OPS = ("Shape", "Expand", "CastLike")
#: The largest ``Expand`` result read as a constant (a bias or a statistic is one value per channel).
_EXPAND_MAX = 1 << 20


#: A reference attribute the caller leaves unset (see :meth:`GraphIndex._referenced`).
_UNSET = object()
#: A Constant node's numeric attributes and the types its schema gives them.
_CONSTANT_KINDS = {"value": onnx.AttributeProto.TENSOR, "sparse_value": onnx.AttributeProto.SPARSE_TENSOR,
                   "value_float": onnx.AttributeProto.FLOAT, "value_floats": onnx.AttributeProto.FLOATS,
                   "value_int": onnx.AttributeProto.INT, "value_ints": onnx.AttributeProto.INTS}


def stored_name(tensor: onnx.TensorProto | onnx.SparseTensorProto) -> str:
    """An initializer's name; a sparse one's is its values' name (onnx.proto's SparseTensorProto)."""
    return tensor.values.name if isinstance(tensor, onnx.SparseTensorProto) else tensor.name


def initializer_names(graph: onnx.GraphProto) -> set[str]:
    """The names of ``graph``'s initializers, sparse ones included."""
    return {stored_name(t) for t in (*graph.initializer, *graph.sparse_initializer)}


def _tensor_array(tensor: onnx.TensorProto, what: str) -> np.ndarray:
    """``numpy_helper.to_array(tensor)``; a tensor it cannot read (a data type ONNX does not define, its data of
    another size than its dims) is a :class:`MalformedNodeError` naming ``what``."""
    try:
        return numpy_helper.to_array(tensor)
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedNodeError(f"{what} cannot be read (data type {tensor.data_type}, dims {list(tensor.dims)}): "
                                 f"{type(exc).__name__}: {exc}") from None


#: The most values a sparse initializer is densified to: a file of a few hundred bytes may declare a dense shape of
#: billions, which would take gigabytes (and float64 copies of it more) before anything else could fail.
_SPARSE_DENSE_MAX = 1 << 26


def _stored_array(tensor: onnx.TensorProto | onnx.SparseTensorProto, what: str | None = None) -> np.ndarray:
    """An initializer's value; a sparse one (``graph.sparse_initializer``, a Constant's ``sparse_value``) as the
    dense tensor it stands for, its values at its indices (linear, or one row of coordinates each) and zeros
    elsewhere (onnx.proto's SparseTensorProto). ``what``: the tensor in errors (default: the initializer)."""
    if not isinstance(tensor, onnx.SparseTensorProto):
        return _tensor_array(tensor, what or f"initializer {tensor.name!r}")
    what = what or f"sparse initializer {tensor.values.name!r}"
    values = _tensor_array(tensor.values, f"{what}'s values").reshape(-1)
    indices = _tensor_array(tensor.indices, f"{what}'s indices").astype(np.int64)
    dims = tuple(int(d) for d in tensor.dims)
    if any(d < 0 for d in dims):
        raise MalformedNodeError(f"{what}: its shape {list(dims)} has a negative dimension")
    if (size := math.prod(dims)) > _SPARSE_DENSE_MAX:  # np.zeros only reserves it: the first copy would take it
        raise MalformedNodeError(f"{what}: its dense shape {list(dims)} holds {size} values, more than bnkit builds "
                                 f"from a sparse tensor ({_SPARSE_DENSE_MAX}): store it dense")
    try:
        dense = np.zeros(size, dtype=values.dtype)
    except MemoryError:
        raise MalformedNodeError(f"{what}: its dense shape {list(dims)} does not fit in the memory available") from None
    try:
        dense[indices.reshape(-1) if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), dims)] = values
    except (IndexError, ValueError):
        raise MalformedNodeError(f"{what}: its indices {indices.shape} and values {values.shape} do not fit its "
                                 f"shape {list(dims)}") from None
    return dense.reshape(dims)


_INT, _INTS, _FLOAT = onnx.AttributeProto.INT, onnx.AttributeProto.INTS, onnx.AttributeProto.FLOAT


def attribute(node: onnx.NodeProto, name: str, default=None, kind: int | None = None):
    """The value of attribute ``name`` of ``node``, or ``default``; ``kind`` (an ``onnx.AttributeProto`` type, as
    the op's schema requires): raises :class:`MalformedNodeError` naming node and attribute for another type."""
    for attr in node.attribute:
        if attr.name == name:
            return _attribute_value(node, attr, kind)
    return default


def _attribute_value(node: onnx.NodeProto, attr: onnx.AttributeProto, kind: int | None):
    if kind is not None and attr.type != kind:
        names = onnx.AttributeProto.AttributeType.Name
        raise MalformedNodeError(f"{node.op_type} node {node_label(node)!r}: attribute {attr.name!r} is "
                                 f"{names(attr.type)}, not the {names(kind)} the op requires")
    return onnx.helper.get_attribute_value(attr)


def _transposed(node: onnx.NodeProto, value: np.ndarray, perm: list[int] | None) -> np.ndarray:
    """``value`` permuted by a Transpose node's ``perm`` (reversed without one)."""
    try:
        return np.transpose(value, perm)
    except ValueError:
        raise MalformedNodeError(f"Transpose node {node_label(node)!r}: attribute 'perm' {list(perm)} is not a "
                                 f"permutation of its input's {value.ndim} axes") from None


def _cast_target(node: onnx.NodeProto, to: int | None) -> np.dtype:
    """The NumPy dtype a Cast node's required ``to`` attribute names."""
    if to is None:
        raise MalformedNodeError(f"Cast node {node_label(node)!r}: its required attribute 'to' is missing")
    return _np_dtype(int(to), f"Cast node {node_label(node)!r}: attribute 'to' is {to}")


def _np_dtype(elem: int, where: str) -> np.dtype:
    """The NumPy dtype of ONNX element type ``elem``; one ONNX does not define is a :class:`MalformedNodeError`
    (``where``, then ", no ONNX element type")."""
    try:
        return helper.tensor_dtype_to_np_dtype(elem)
    except KeyError:
        raise MalformedNodeError(f"{where}, no ONNX element type") from None


@dataclass
class BNNode:
    """One BatchNormalization node, its arrays (float64, None when computed at run time) and mode.

    ``training`` is True when onnxruntime normalises with batch statistics: ``training_mode=1``
    (opset >= 14) or running-statistic outputs requested (opset 9-13). ``overridable`` names the
    arrays that are graph inputs with a stored default (see :class:`GraphIndex`): their array is
    that default, what runs unless a caller feeds another; such a node is not ``constant``.
    """

    node: onnx.NodeProto
    name: str
    opset: int
    epsilon: float
    momentum: float
    training: bool
    extra_outputs: list[str]
    scale: np.ndarray | None
    bias: np.ndarray | None
    mean: np.ndarray | None
    var: np.ndarray | None
    notes: list[str] = field(default_factory=list)
    in_subgraph: bool = False
    overridable: list[str] = field(default_factory=list)
    #: the local function whose body holds the node (innermost), "" outside functions; such a node is ``in_subgraph``
    in_function: str = ""

    @property
    def unrewritable(self) -> str | None:
        """Why ``bnkit fold`` leaves this node as it is, folding or switching nothing (None: it may rewrite it)."""
        if self.in_function:
            return f"inside local function {self.in_function!r}"
        if self.in_subgraph:
            return "inside a subgraph, an If/Loop/Scan body"
        return f"opset {self.opset} BatchNormalization (before opset 9)" if self.opset < 9 else None

    @property
    def constant(self) -> bool:
        return all(a is not None for a in (self.scale, self.bias, self.mean, self.var)) and not self.overridable

    @property
    def statistics_outputs_absent(self) -> bool:
        """A ``training_mode=1`` node (opset >= 14) without its running mean and variance outputs: onnxruntime
        refuses to load it."""
        return self.training and self.opset >= 14 and len(self.node.output) < 3

    @property
    def statistics_outputs_missing(self) -> bool:
        """A training node whose running mean or variance output is absent (:attr:`statistics_outputs_absent`) or
        named blank (``""``, opset 9 on), which onnxruntime crashes running (:func:`blank_outputs_fail`)."""
        outputs = list(self.node.output)
        blank = self.training and self.opset >= 9 and len(outputs) >= 3 and not all(outputs[1:3])
        return self.statistics_outputs_absent or blank


def _as64(value: np.ndarray | None) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=np.float64)


def node_label(node: onnx.NodeProto) -> str:
    """A node's name, or ``<op>(<first output>)`` for an unnamed node."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"


def bn_nodes(graph: onnx.GraphProto, opset: int, index: GraphIndex | None = None,
             functions: dict[FunctionKey, onnx.FunctionProto] | None = None) -> list[BNNode]:
    """Every BatchNormalization node of ``graph`` (subgraphs too, their names prefixed by the owner's).

    ``functions`` (:func:`local_functions`): the bodies of the local functions ``graph`` calls are read once per
    call, named after the calling node (``block/bn``) and their parameters read through the call's arguments.

    ONNX does not require unique node names: nodes sharing one are named ``name[first output]``
    (an output names a node uniquely within a graph), and nodes of different bodies that still share it get
    the body's attribute in their prefix (``if/then_branch/bn[y]``), and a number (``#2``, in graph order) if even
    that is shared (their owners share a name too), so reports keep them apart.
    """
    found = _bn_nodes(graph, opset, index, "", "", functions or {}, ())
    names = Counter(bn.name for bn, _ in found)
    full = Counter(f"{bn.name}[{bn.node.output[0]}]" for bn, _ in found)
    for bn, scoped in found:
        if names[bn.name] > 1:
            own = f"{bn.name}[{bn.node.output[0]}]"
            bn.name = own if full[own] == 1 else f"{scoped}[{bn.node.output[0]}]"
    seen = Counter(bn.name for bn, _ in found)
    if len(seen) < len(found):  # owners sharing a name too (onnxruntime refuses such a file): number them in order
        count: Counter = Counter()
        for bn, _ in found:
            if seen[bn.name] > 1:
                count[bn.name] += 1
                bn.name = f"{bn.name}#{count[bn.name]}"
    return [bn for bn, _ in found]


def _bn_nodes(graph: onnx.GraphProto | onnx.FunctionProto, opset: int, index: GraphIndex | None, prefix: str,
              scope: str, functions: dict[FunctionKey, onnx.FunctionProto],
              calling: tuple[str, ...], function: str = "") -> list[tuple[BNNode, str]]:
    """``(node, its name with the owners' body attributes)``: ``prefix`` names the owners, ``scope`` also the
    attribute (``then_branch``, ``body``) each body hangs from; ``calling``: the functions being read (ONNX
    forbids recursion; a file that has it is not followed round), ``function``: the innermost one."""
    index = index or GraphIndex(graph)
    found = []
    for node in graph.node:
        label = node_label(node)
        for where, sub in _named_subgraphs(node):
            found.extend(_bn_nodes(sub, opset, GraphIndex(sub, outer=index), f"{prefix}{label}/",
                                   f"{scope}{label}/{where}/", functions, calling, function))
        if (body := _called(node, functions)) is not None and body.name not in calling:
            found.extend(_bn_nodes(body, _function_opset(body, opset), GraphIndex(body, call=(node, index)),
                                   f"{prefix}{label}/", f"{scope}{label}/{body.name}/", functions,
                                   calling + (body.name,), body.name))
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        extra = [o for o in node.output[1:] if o]
        notes = []
        if not node.output or not node.output[0]:
            raise MalformedNodeError(f"BatchNormalization node {node_label(node)!r} has no output Y")
        if opset >= 14:
            training = bool(index.attribute(node, "training_mode", 0, _INT))
        else:
            training = bool(extra) or (opset < 7 and not index.attribute(node, "is_test", 0, _INT))
        if opset < 9 and not index.attribute(node, "spatial", 1, _INT):
            notes.append("spatial=0: statistics per (channel, position), not per channel")
        inputs = list(node.input) + [""] * (5 - len(node.input))
        arrays, overridable = {}, []
        for key, name in zip(("scale", "bias", "mean", "var"), inputs[1:]):
            value = index.constant(name)
            if value is None and (value := index.constant(name, defaults=True)) is not None:
                overridable.append(key)
            dtype = None if value is None else np.asarray(value).dtype
            if dtype is not None and not (np.issubdtype(dtype, np.floating) or ml_float(dtype)):  # the spec's: floats
                raise MalformedNodeError(f"BatchNormalization node {node_label(node)!r} has a {key} of element type "
                                         f"{dtype}, not floating point")
            arrays[key] = _as64(value)
        found.append((BNNode(
            node=node,
            name=prefix + label,
            opset=opset,
            epsilon=float(index.attribute(node, "epsilon", np.float32(1e-5), _FLOAT)),  # attributes are float32
            momentum=float(index.attribute(node, "momentum", 0.9, _FLOAT)),
            training=training,
            extra_outputs=extra,
            **arrays,
            notes=notes,
            in_subgraph=bool(prefix),
            overridable=overridable,
            in_function=function,
        ), scope + label))
    return found


def blank_outputs_fail(node: onnx.NodeProto, opset: int) -> bool:
    """Whether the BatchNormalization ``node``'s blank (``""``, absent) optional outputs stop onnxruntime 1.32 from
    running it: a segmentation fault where a running statistic is blank on a training node, a refusal for most other
    patterns. The one that runs: opset 9-13's five outputs with ``saved_mean`` and ``saved_var`` both blank."""
    outputs = list(node.output)
    if "" not in outputs[1:]:
        return False
    return not (opset < 14 and len(outputs) == 5 and "" not in outputs[1:3] and outputs[3:] == ["", ""])


class TrainingDropout(NamedTuple):
    """A Dropout node that may run in training mode (see :func:`training_dropouts`)."""

    node: onnx.NodeProto
    #: False when ``training_mode`` is computed at run time rather than a constant or a stored default
    known: bool
    #: ``training_mode`` is a graph input whose stored default is true: true unless a caller feeds false
    overridable: bool
    #: its label, after those of the nodes whose bodies hold it (``block1/drop``: a function called twice is two)
    name: str


def training_dropouts(
    graph: onnx.GraphProto | onnx.FunctionProto, opset: int, index: GraphIndex | None = None, *, nested: bool = False,
    functions: dict[FunctionKey, onnx.FunctionProto] | None = None, _calling: tuple[str, ...] = (), _prefix: str = ""
) -> list[TrainingDropout]:
    """A :class:`TrainingDropout` for each top-level Dropout (``nested``: in If/Loop/Scan bodies and in the bodies
    of the local ``functions`` called, once per call, too) whose ``training_mode`` input may be true.

    ONNX Dropout-12+ (onnx/defs/nn/defs.cc) drops values at random only when its optional
    ``training_mode`` input is true; before opset 12 the graph holds no mode. A ``training_mode`` that is a
    graph input with a stored default (see :class:`GraphIndex`) is read as that default, what runs unless a
    caller feeds another.
    """
    if opset < 12:
        return []
    index = index or GraphIndex(graph)
    found = []
    for node in graph.node:
        inner = f"{_prefix}{node_label(node)}/"
        if nested:
            for sub in subgraphs(node):
                found.extend(training_dropouts(sub, opset, GraphIndex(sub, outer=index), nested=True,
                                               functions=functions, _calling=_calling, _prefix=inner))
            if (body := _called(node, functions)) is not None and body.name not in _calling:
                found.extend(training_dropouts(body, _function_opset(body, opset), GraphIndex(body, call=(node, index)),
                                               nested=True, functions=functions, _calling=_calling + (body.name,),
                                               _prefix=inner))
        if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx") or len(node.input) < 3 or not node.input[2]:
            continue
        mode, overridable = index.constant(node.input[2]), False
        if mode is None and (mode := index.constant(node.input[2], defaults=True)) is not None:
            overridable = True
        if mode is None:
            found.append(TrainingDropout(node, False, False, _prefix + node_label(node)))
        elif bool(np.asarray(mode).any()):
            found.append(TrainingDropout(node, True, overridable, _prefix + node_label(node)))
    return found


def unswitchable_training(graph: onnx.GraphProto, opset: int, nodes: list[BNNode],
                          index: GraphIndex | None = None,
                          functions: dict[FunctionKey, onnx.FunctionProto] | None = None) -> list[str]:
    """The training-mode nodes ``bnkit fold --to-inference`` cannot switch, by name: BatchNormalization (``nodes``,
    from :func:`bn_nodes`) inside If/Loop/Scan bodies or local functions, before opset 9, or whose running-statistic
    outputs other nodes or the graph's outputs read (switching drops them), and Dropout with a constant (or stored
    default) true ``training_mode`` inside bodies or functions (top-level ones are switched)."""
    index = index or GraphIndex(graph)
    stuck = [bn.name for bn in nodes if bn.training and (bn.unrewritable is not None
                                                         or any(index.readers(o) for o in bn.extra_outputs))]
    top = list(graph.node)  # held while ids are compared: a protobuf wrapper keeps its id only while referenced
    ids = {id(n) for n in top}
    return stuck + [name for n, known, _, name in training_dropouts(graph, opset, index, nested=True,
                                                                     functions=functions)
                    if known and id(n) not in ids]
