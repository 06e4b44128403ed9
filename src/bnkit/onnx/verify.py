"""Running ONNX models with onnxruntime on random inputs and comparing their outputs.

Inputs follow the graph's declared shapes; a dynamic dimension (a ``dim_param`` or a
missing ``dim_value``) is set to ``dynamic_size``, and ``input_shapes`` overrides whole
shapes by input name. The difference between two runs is reported per model as the
largest absolute difference over all outputs, and as a relative difference
``max|a - b| / max|b|`` per output (norm-wise, so near-zero elements do not inflate it).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from onnx import helper

from ..precision import fold_tolerance
from .graph import initializer_names, subgraphs

__all__ = ["OnnxRuntimeError", "VerificationMemoryError", "NothingComparedError", "random_inputs", "run", "compare",
           "default_tolerance"]


class NothingComparedError(ValueError):
    """:func:`compare` found the outputs alike in shape but nothing finite to compare (all empty, or NaN/Inf at the
    same places in both)."""


class VerificationMemoryError(MemoryError):
    """A fold's verification ran out of memory (its random inputs, or the outputs it compares), not the fold itself:
    smaller verification input shapes help."""


class OnnxRuntimeError(RuntimeError):
    """onnxruntime could not load or run a model (unsupported op or dtype, bad input shape)."""

_INTS = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
         onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = initializer_names(model.graph)
    return [i for i in model.graph.input if i.name not in inits]


def _fixed(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """A dimension of fixed size: a ``dim_value`` of 0 or more (older converters, paddle2onnx among them, write
    -1 for a dynamic one, which onnxruntime accepts as such)."""
    return dim.HasField("dim_value") and dim.dim_value >= 0


def random_inputs(
    model: onnx.ModelProto,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    dynamic_size: int = 2,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Standard-normal floats (small non-negative integers, random booleans) of each input's declared shape.

    Raises ValueError for a shape in ``input_shapes`` that the graph's declared shape rules out
    (another rank, or another size where the graph fixes one), and for an input that would be
    empty (a size below 1): it would verify nothing.
    """
    rng = np.random.default_rng(seed)
    input_shapes = dict(input_shapes or {})
    feeds = {}
    for value in _graph_inputs(model):
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise ValueError(f"input {value.name!r} is not a tensor; cannot make a random value for it")
        if value.name in input_shapes:
            shape = tuple(int(d) for d in input_shapes.pop(value.name))
            if ttype.HasField("shape"):
                declared = [d.dim_value if _fixed(d) else d.dim_param or "?" for d in ttype.shape.dim]
                if len(shape) != len(declared) or any(isinstance(want, int) and want != got
                                                      for want, got in zip(declared, shape)):
                    raise ValueError(f"the shape {list(shape)} given for input {value.name!r} does not fit the shape "
                                     f"the graph declares for it, {declared}")
        elif ttype.HasField("shape"):
            shape = tuple(d.dim_value if _fixed(d) else dynamic_size for d in ttype.shape.dim)
        else:
            raise ValueError(f"input {value.name!r} declares no shape: pass its shape (input_shapes / --input-shape)")
        if any(d < 1 for d in shape):
            raise ValueError(f"input {value.name!r} would have shape {list(shape)}, which is empty: verifying on it "
                             "compares nothing; give sizes >= 1 (input_shapes / --input-shape, dynamic_size)")
        if (values := math.prod(shape)) * 8 > sys.maxsize:  # NumPy's own ValueError ("array is too big") names no shape
            raise VerificationMemoryError(f"input {value.name!r} of shape {list(shape)} holds {values} values, more "
                                          "than an array can")
        elem = ttype.elem_type
        if elem == onnx.TensorProto.UNDEFINED or elem not in onnx.TensorProto.DataType.values():
            raise ValueError(f"input {value.name!r} has element type {elem}, which ONNX does not define (onnx.checker "
                             "lets it pass): the model cannot be run, so it cannot be verified")
        try:
            if elem == onnx.TensorProto.BOOL:
                feeds[value.name] = np.asarray(rng.random(shape) < 0.5)  # a 0-d comparison gives a NumPy scalar
            elif elem in _INTS:
                feeds[value.name] = rng.integers(0, 2, size=shape).astype(helper.tensor_dtype_to_np_dtype(elem))
            else:
                feeds[value.name] = rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(elem))
        except MemoryError as exc:
            raise VerificationMemoryError(f"input {value.name!r} of shape {list(shape)}: {exc}") from None
    if input_shapes:
        raise ValueError(f"input_shapes names no graph input: {sorted(input_shapes)}; the graph's inputs are "
                         f"{[value.name for value in _graph_inputs(model)]}")
    return feeds


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs of ``model`` on ``feeds`` from onnxruntime's CPU provider, with graph optimisations off.

    Optimisations are off so the comparison is between the graphs as written, not
    between what onnxruntime's own fusions make of them.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, dict(feeds))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        raise OnnxRuntimeError(f"onnxruntime cannot run the model on inputs "
                               f"{ {k: list(np.shape(v)) for k, v in feeds.items()} }: {str(exc).strip()}") from exc


def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> tuple[float, float]:
    """``(max absolute difference, max norm-wise relative difference)`` over paired outputs, in float64.

    NaN/Inf must sit at the same places with the same values (else the difference is infinite) and are not
    compared further. Raises ValueError when the outputs differ in number or shape, and
    :class:`NothingComparedError` (a ValueError) when they are all empty, or NaN/Inf at every position in both:
    nothing finite is then compared. Where some outputs are floating point, only those
    count as compared: an integer output (an ArgMax class index) stays finite, often constant, when every float
    output is NaN, and would let a wrong model pass.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs but {len(candidate)} candidate outputs")
    reference = [_numbers(ref, k) for k, ref in enumerate(reference)]
    candidate = [_numbers(got, k, want) for k, (got, (_, want)) in enumerate(zip(candidate, reference))]
    if not any(ref.size for ref, _ in reference):
        raise NothingComparedError("every output is empty, so comparing them would check nothing: give inputs with "
                                   "sizes >= 1")
    max_abs = max_rel = 0.0
    compared = 0
    floating = [np.issubdtype(ref.dtype, np.inexact) for ref, _ in reference]
    for (ref, _), (got, _), counts in zip(reference, candidate, floating if any(floating) else [True] * len(reference)):
        ref = ref.astype(np.float64, copy=False)
        got = got.astype(np.float64, copy=False)
        if ref.shape != got.shape:
            raise ValueError(f"output shapes differ: {ref.shape} vs {got.shape}")
        if ref.size == 0:
            continue
        bad = ~np.isfinite(ref)
        if bad.any() or not np.isfinite(got).all():  # NaN/Inf must match exactly, the rest is compared
            if not (np.array_equal(bad, ~np.isfinite(got)) and np.array_equal(ref[bad], got[bad], equal_nan=True)):
                return float("inf"), float("inf")
            ref, got = ref[~bad], got[~bad]
            if ref.size == 0:
                continue
        compared += ref.size if counts else 0
        diff = float(np.max(np.abs(ref - got)))
        scale = float(np.max(np.abs(ref)))
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    if not compared:
        raise NothingComparedError("every output value is NaN or Inf in both, at the same places, so the comparison "
                                   "compared nothing: the model computes no finite value on these inputs (Log or Sqrt "
                                   "of negative values, NaN parameters, ...)")
    return max_abs, max_rel


def _numbers(value: Any, k: int, want: list | None = None) -> tuple[np.ndarray, list]:
    """Output ``k`` as its numbers, an array, and what else it holds, compared exactly: the keys of a map, the lengths
    of a sequence, the shapes of its tensors, its strings (ZipMap's class probabilities, a label output, a sequence
    of tensors of other shapes). A numeric array, or a sequence of numbers that makes one, is itself, nothing else.
    ``want``: the reference's other part; a candidate whose own differs raises ValueError."""
    if isinstance(value, (list, tuple)):
        try:
            stacked = np.asarray(value)
        except ValueError:  # ragged
            stacked = None
        if stacked is not None and _numeric(stacked):
            value = stacked
    numbers: list[np.ndarray] = []
    rest: list = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            rest.append(sorted(v, key=repr))
            for key in rest[-1]:
                walk(v[key])
        elif isinstance(v, (list, tuple)):
            rest.append(len(v))
            for item in v:
                walk(item)
        else:
            a = np.asarray(v)
            rest.append(a.shape)
            if _numeric(a):
                numbers.append(a.ravel() if a.dtype.kind in "biuf" else a.astype(np.float64).ravel())
            elif a.dtype.kind == "c":  # real and imaginary parts, both compared
                numbers.append(a.astype(np.complex128).view(np.float64).ravel())
            else:  # strings: compared as they are
                rest.append(a.tolist())

    if isinstance(value, np.ndarray) and _numeric(value):
        rest_of_value: list = []
    else:
        walk(value)
        value, rest_of_value = (np.concatenate(numbers) if numbers else np.zeros(0, np.int8)), rest  # none: no float
    if want is not None and rest_of_value != want:
        raise ValueError(f"output {k} differs in what it holds beside numbers (map keys, sequence lengths, shapes, "
                         "strings)")
    return value, rest_of_value


def _numeric(a: np.ndarray) -> bool:
    """Whether ``a`` holds real numbers: NumPy's integer, bool and float kinds, or ml_dtypes' (bfloat16, float8:
    kind ``V``) that convert to float64."""
    if a.dtype.kind in "biuf":
        return True
    if a.dtype.kind != "V" or a.dtype.fields is not None:
        return False
    try:
        a[:0].astype(np.float64)
    except (TypeError, ValueError):
        return False
    return True


#: ONNX's low-precision element types by their NumPy/PyTorch names.
_LOW_PRECISION = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def default_tolerance(model: onnx.ModelProto) -> float:
    """Relative tolerance for the least precise float the graph holds or computes
    (:func:`bnkit.precision.fold_tolerance`: 4e-2 bf16, 1e-2 fp16, else 1e-4).

    Read from the inputs, outputs, initializers, ``Cast`` targets, ``Constant`` values and the value types shape
    inference finds of the main graph and of every If/Loop/Scan body in it, with the local functions inlined first
    (shape inference types nothing inside a function's body; ``convert_version``: also those importing another
    opset), so an fp16 network between fp32 inputs and outputs gets the fp16 tolerance, wherever it sits. The
    functions' own bodies are read too, as the inliner may leave a function or drop a ``Cast``'s ``to`` taken from
    an attribute: such a ``to`` counts with the attribute's default and every value a call gives it.
    """
    functions = list(model.functions)
    if functions:
        try:
            model = onnx.inliner.inline_local_functions(model, convert_version=True)
        except Exception:  # noqa: BLE001 - onnx's C++ inliner raises its own types; the bodies are read below
            pass
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except onnx.shape_inference.InferenceError:
        pass  # the declared types still count
    elems: set[int] = set()

    def walk(listed, attributes: dict[str, set[int]]) -> list[onnx.NodeProto]:
        """Count the Cast targets and Constant types of ``listed`` and of the bodies they hold (a ``to`` taken from
        an attribute: ``attributes``' values of it); returns every node seen."""
        seen = list(listed)
        for n in listed:
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to":
                    elems.update(attributes.get(a.ref_attr_name, ()) if a.ref_attr_name else (int(a.i),))
                elif n.op_type == "Constant" and a.type == onnx.AttributeProto.TENSOR:
                    elems.add(a.t.data_type)
            for g in subgraphs(n):
                seen += walk_graph(g, attributes)
        return seen

    def walk_graph(g: onnx.GraphProto, attributes: dict[str, set[int]]) -> list[onnx.NodeProto]:
        """:func:`walk` over ``g``'s nodes, with the types of its initializers and typed values counted too."""
        elems.update(t.data_type for t in g.initializer)
        elems.update(v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info))
        return walk(g.node, attributes)

    # a Cast whose 'to' is a function's attribute: the attribute's default and every value a call gives it, a call
    # inside another function passing on its own attribute (ref_attr_name) included; sets grow until none changes
    bodies = {(f.domain, f.name): f for f in functions}
    calls = [(None, n) for n in walk_graph(model.graph, {})]
    calls += [(key, n) for key, f in bodies.items() for n in walk(f.node, {})]
    given = {key: {a.name: {int(a.i)} for a in f.attribute_proto if a.type == onnx.AttributeProto.INT}
             for key, f in bodies.items()}
    grew = True
    while grew:
        grew = False
        for owner, call in calls:
            if (target := given.get((call.domain, call.op_type))) is None:
                continue
            for a in call.attribute:
                if a.ref_attr_name:  # the calling function's own attribute, passed on
                    values = given[owner].get(a.ref_attr_name, set()) if owner is not None else set()
                elif a.type == onnx.AttributeProto.INT:
                    values = {int(a.i)}
                else:
                    continue
                if not values <= (known := target.setdefault(a.name, set())):
                    known |= values
                    grew = True
    for key, f in bodies.items():
        walk(f.node, given[key])
    return fold_tolerance(_LOW_PRECISION[e] for e in elems if e in _LOW_PRECISION)
