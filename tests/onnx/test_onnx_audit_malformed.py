"""bnkit.onnx.audit on models with malformed nodes (onnx.checker, the oracle, rejects each): a finding naming the
node and attribute, never a crash or a bare conversion error."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnkit.onnx import audit, fold_model
from bnkit.onnx.graph import MalformedNodeError

_STATS = [numpy_helper.from_array(np.ones(3, np.float32), "s"), numpy_helper.from_array(np.zeros(3, np.float32), "b"),
          numpy_helper.from_array(np.zeros(3, np.float32), "m"), numpy_helper.from_array(np.ones(3, np.float16), "v16")]


def _bn(var: str = "v", outputs=("y",), **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", ["x", "s", "b", "m", var], list(outputs), name="bn", **attrs)


def _model(nodes) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])], _STATS)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


#: (nodes, what the finding must name): each fails onnx.checker (the last two only its full check, shape inference)
MALFORMED = {
    "epsilon FLOATS": ([_bn("v16", epsilon=[1e-5, 2e-5])], "node 'bn': attribute 'epsilon' is FLOATS, not the FLOAT"),
    "epsilon STRING": ([_bn("v16", epsilon="abc")], "node 'bn': attribute 'epsilon' is STRING, not the FLOAT"),
    "momentum STRING": ([_bn("v16", momentum="x")], "node 'bn': attribute 'momentum' is STRING"),
    "training_mode FLOAT": ([_bn("v16", training_mode=1.0)],
                            "node 'bn': attribute 'training_mode' is FLOAT, not the INT"),
    "Cast without 'to'": ([helper.make_node("Cast", ["v16"], ["v"], name="cast"), _bn()],
                          "Cast node 'cast': its required attribute 'to' is missing"),
    "Shape with a string 'start'": ([helper.make_node("Shape", ["v16"], ["v"], name="sh", start="a"), _bn()],
                                    "Shape node 'sh': attribute 'start' is STRING, not the INT"),
    "two same-named BN without outputs": ([_bn("v16", ()), _bn("v16", ()), helper.make_node("Identity", ["x"], ["y"])],
                                          "BatchNormalization node 'bn' has no output Y"),
    "Transpose perm of another rank": ([helper.make_node("Transpose", ["v16"], ["v"], name="t", perm=[1, 0]), _bn()],
                                       "Transpose node 't': attribute 'perm' [1, 0] is not a permutation"),
    # a shape op with too few inputs: an IndexError traceback from bnkit audit (review)
    "Expand without its shape": ([helper.make_node("Expand", ["v16"], ["v"], name="e"), _bn()],
                                 "Expand node 'e' has inputs ['v16']: it needs 2"),
    "CastLike without its target": ([helper.make_node("CastLike", ["v16"], ["v"], name="cl"), _bn()],
                                    "CastLike node 'cl' has inputs ['v16']: it needs 2"),
    "Shape without its input": ([helper.make_node("Shape", [], ["v"], name="sh"), _bn()],
                                "Shape node 'sh' has inputs []: it needs 1"),
    # a statistic of a type the spec does not allow: a string raised NumPy's conversion error, bool read as 0/1
    "string variance": ([helper.make_node("Constant", [], ["v"], value=helper.make_tensor(
        "c", TensorProto.STRING, [3], [b"a", b"b", b"c"])), _bn()], "has a var of element type object"),
    "bool variance": ([helper.make_node("Constant", [], ["v"], value=helper.make_tensor(
        "c", TensorProto.BOOL, [3], [True, True, False])), _bn()], "has a var of element type bool"),
    # ml_dtypes' 4-bit integers have NumPy kind 'V', which the check by kind let through (review)
    "uint4 variance": ([helper.make_node("Constant", [], ["v"], value=helper.make_tensor(
        "c", TensorProto.UINT4, [3], [1, 2, 3])), _bn()], "has a var of element type uint4"),
    "int4 variance": ([helper.make_node("Constant", [], ["v"], value=helper.make_tensor(
        "c", TensorProto.INT4, [3], [1, 2, 3])), _bn()], "has a var of element type int4"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_node_is_an_error_finding_naming_node_and_attribute(case):
    nodes, named = MALFORMED[case]
    model = _model(nodes)
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        onnx.checker.check_model(model, full_check=True)
    report = audit(model)
    assert not report.ok and report.nodes == []
    malformed = [f for f in report.findings if f.code == "malformed_node"]
    assert len(malformed) == 1 and malformed[0].severity == "error" and named in malformed[0].evidence


def test_an_attribute_of_the_wrong_type_is_also_reported_as_failing_the_checker():
    """onnx.checker's own verdict stays in the report beside the node that cannot be read."""
    report = audit(_model(MALFORMED["epsilon FLOATS"][0]))
    assert [f.code for f in report.findings] == ["invalid_model", "malformed_node"]


def test_an_expand_to_a_shape_that_does_not_broadcast_names_the_node():
    """The statistics come from Expand of [3] values to [5]: NumPy's broadcasting (the oracle) refuses it."""
    with pytest.raises(ValueError):
        np.broadcast_shapes((3,), (5,))
    shape = numpy_helper.from_array(np.array([5], np.int64), "shape")
    model = _model([helper.make_node("Expand", ["v16", "shape"], ["v"], name="e"), _bn()])
    model.graph.initializer.append(shape)
    report = audit(model)
    assert [f.evidence for f in report.findings if f.code == "malformed_node"] == [
        "node 'e' expands shape [3] to [5], which it cannot be broadcast to"]


def test_an_initializer_of_an_undefined_data_type_is_a_finding_and_a_fold_error_not_a_crash():
    """data_type 999 escaped numpy_helper as a bare KeyError (audit and fold died with a traceback): a tensor ONNX
    does not define cannot be read. onnx.checker passes it, so only bnkit's read can refuse it."""
    model = _model([helper.make_node("Cast", ["v16"], ["v"], to=TensorProto.FLOAT), _bn()])
    model.graph.initializer[3].data_type = 999
    with pytest.raises(KeyError):
        numpy_helper.to_array(model.graph.initializer[3])
    report = audit(model)
    assert [f.evidence.split(":")[0] for f in report.findings if f.code == "malformed_node"] == [
        "initializer 'v16' cannot be read (data type 999, dims [3])"]
    with pytest.raises(MalformedNodeError, match="initializer 'v16' cannot be read"):
        fold_model(model)


def test_statistics_computed_from_themselves_through_a_cast_are_no_constant_not_a_recursion_error():
    """Cast(a) -> v, Cast(v) -> a: an Identity cycle was caught, a Cast or Transpose one recursed without end.
    Oracle: onnx.checker refuses the graph (not topologically sorted); the statistics have no value."""
    model = _model([helper.make_node("Cast", ["a"], ["v"], to=TensorProto.FLOAT),
                    helper.make_node("Transpose", ["v"], ["a"]), _bn()])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    codes = [f.code for f in audit(model).findings]
    assert codes == ["invalid_model", "not_constant"], codes


def test_a_value_read_twice_on_separate_paths_is_still_a_constant():
    """Expand(v16, Shape(v16)) reads v16 twice, on two branches, not in a cycle: its values stay readable (onnxruntime
    computes the same graph)."""
    ort = pytest.importorskip("onnxruntime")
    model = _model([helper.make_node("Shape", ["v16"], ["shape"]), helper.make_node("Expand", ["v16", "shape"], ["e"]),
                    helper.make_node("Cast", ["e"], ["v"], to=TensorProto.FLOAT), _bn()])
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    report = audit(model)  # the initial 0 and 1 read through Expand: the statistics were read
    assert [f.code for f in report.findings] == ["never_updated"], report.findings
    folded, _ = fold_model(model)
    got = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_an_expand_to_an_infinite_dim_and_a_castlike_to_an_undefined_type_are_findings_not_crashes():
    """int(inf) raised OverflowError past the broadcast check, and CastLike's target type 999 a bare KeyError: both
    escaped bnkit audit and bnkit fold as tracebacks. onnx.checker passes both graphs; onnxruntime refuses them."""
    ort = pytest.importorskip("onnxruntime")
    inf = numpy_helper.from_array(np.array([np.inf], np.float32), "inf")
    expand = _model([helper.make_node("Expand", ["v16", "inf"], ["v"], name="e"), _bn()])
    expand.graph.initializer.append(inf)
    castlike = _model([helper.make_node("Identity", ["x"], ["target"]),
                       helper.make_node("CastLike", ["v16", "target"], ["v"], name="cl"), _bn()])
    castlike.graph.value_info.append(helper.make_tensor_value_info("target", 999, ["N", 3, 4]))
    for model, named in ((expand, "node 'e' expands shape [3] to [inf]"),
                         (castlike, "CastLike node 'cl': its target 'target' has element type 999")):
        onnx.checker.check_model(model)
        with pytest.raises(Exception):
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert [f.evidence for f in audit(model).findings if f.code == "malformed_node"][0].startswith(named)
        with pytest.raises(MalformedNodeError, match=named.replace("[", r"\[").replace("]", r"\]")):
            fold_model(model)


@pytest.mark.parametrize("op", ["Cast", "Transpose"])
def test_statistics_behind_a_thousand_casts_are_read_at_any_stack_depth(op):
    """A Cast or Transpose chain longer than Python's recursion limit crashed bnkit audit and bnkit fold; then one of
    ~950 read as a constant or not depending on how deep the caller's stack was. Oracle: the same statistics stored
    directly (the initial 0 and 1: never updated), read the same from any depth."""
    attrs = {"to": TensorProto.FLOAT} if op == "Cast" else {}
    chain = [helper.make_node(op, ["v16" if i == 0 else f"c{i - 1}"], [f"c{i}"], **attrs) for i in range(1200)]
    model = _model([*chain, helper.make_node(op, ["c1199"], ["v"], **attrs), _bn()])
    onnx.checker.check_model(model)
    want = [f.code for f in audit(_model([helper.make_node("Cast", ["v16"], ["v"], to=TensorProto.FLOAT), _bn()]))
            .findings]
    assert want == ["never_updated"]

    def deep(n):
        return deep(n - 1) if n else [f.code for f in audit(model).findings]

    assert [f.code for f in audit(model).findings] == deep(500) == want


def test_a_sparse_initializer_too_large_to_densify_is_named_not_a_memory_error():
    """Dims [2**20, 2**20, 16] (64 TiB of zeros) escaped as NumPy's out-of-memory traceback."""
    values = numpy_helper.from_array(np.ones(1, np.float32), "s")
    indices = numpy_helper.from_array(np.zeros(1, np.int64), "s_idx")
    model = _model([_bn("v16")])
    del model.graph.initializer[0]  # the scale "s" becomes the sparse one
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [2 ** 20, 2 ** 20, 16]))
    onnx.checker.check_model(model)
    assert [f.evidence for f in audit(model).findings if f.code == "malformed_node"] == [
        "sparse initializer 's': its dense shape [1048576, 1048576, 16] holds 17592186044416 values, more than bnkit "
        "builds from a sparse tensor (67108864): store it dense"]


def test_a_sparse_initializer_whose_zeros_the_system_would_only_reserve_is_refused_before_they_are_touched():
    """Dims [2**27] (a 0.5 GiB dense array for a file of a few hundred bytes): np.zeros succeeded, since Linux only
    reserves the memory, and the float64 copy of the statistics then took 1 GiB; at [5e9] that copy escaped as
    NumPy's out-of-memory traceback. Both the audit and the fold refuse it by name, before building anything."""
    values = numpy_helper.from_array(np.ones(1, np.float32), "m")
    indices = numpy_helper.from_array(np.zeros(1, np.int64), "m_idx")
    model = _model([_bn("v16")])
    del model.graph.initializer[2]  # the mean "m" becomes the sparse one
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [2 ** 27]))
    onnx.checker.check_model(model)
    expected = ("sparse initializer 'm': its dense shape [134217728] holds 134217728 values, more than bnkit builds "
                "from a sparse tensor (67108864): store it dense")
    assert [f.evidence for f in audit(model).findings if f.code == "malformed_node"] == [expected]
    with pytest.raises(MalformedNodeError, match=r"\[134217728\] holds"):
        fold_model(model, verify=False)


def test_a_sparse_initializer_with_a_negative_dimension_is_named_as_such():
    """It was called too large to build; onnx.checker (the oracle) names the negative dimension."""
    values = numpy_helper.from_array(np.ones(1, np.float32), "s")
    indices = numpy_helper.from_array(np.zeros(1, np.int64), "s_idx")
    model = _model([_bn("v16")])
    del model.graph.initializer[0]
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [3, -1]))
    with pytest.raises(onnx.checker.ValidationError, match="not positive"):
        onnx.checker.check_model(model)
    assert [f.evidence for f in audit(model).findings if f.code == "malformed_node"] == [
        "sparse initializer 's': its shape [3, -1] has a negative dimension"]


def test_a_name_that_is_not_utf8_makes_the_file_unreadable_not_a_crash(tmp_path):
    """protobuf hands a proto2 string that is not UTF-8 over as bytes, which onnx.checker passes and every name
    lookup tripped on (TypeError traceback in audit and fold, review): the file is refused as unreadable."""
    path = tmp_path / "m.onnx"
    model = _model([helper.make_node("Cast", ["v16"], ["v"], to=TensorProto.FLOAT), _bn()])
    data = bytearray(model.SerializeToString())
    at = data.index(b"\x1a\x02bn") + 2  # NodeProto.name: field 3, length 2, "bn"
    data[at] = 0xDD  # "bn" -> b"\xddn"
    path.write_bytes(bytes(data))
    assert isinstance(onnx.load(path).graph.node[1].name, bytes)
    for run in (audit, fold_model):
        with pytest.raises(ValueError, match=r"not a readable ONNX model: model\.graph\.node\[1\]\.name holds text "
                                             "that is not UTF-8"):
            run(path)


def test_a_graph_input_of_an_undefined_element_type_cannot_be_verified_not_a_crash():
    """elem_type 118, which onnx.checker lets pass: random verification inputs raised a bare KeyError (review)."""
    model = _model([helper.make_node("Cast", ["v16"], ["v"], to=TensorProto.FLOAT), _bn()])
    model.graph.input[0].type.tensor_type.elem_type = 118
    onnx.checker.check_model(model)
    with pytest.raises(ValueError, match="input 'x' has element type 118, which ONNX does not define"):
        fold_model(model)


def test_a_doc_string_or_metadata_that_is_not_utf8_is_left_as_onnxruntime_leaves_it(tmp_path):
    """Only names are looked up: a doc string or metadata value of other bytes was refused as unreadable (review).
    Oracle: onnxruntime runs the file, and the fold matches it."""
    import onnxruntime as ort

    model = _model([helper.make_node("Cast", ["v16"], ["v"], to=TensorProto.FLOAT, doc_string="docA"), _bn()])
    model.graph.doc_string = "docB"
    onnx.helper.set_model_props(model, {"k": "docC"})
    data = model.SerializeToString()
    for text in (b"docA", b"docB", b"docC"):
        data = data.replace(text, b"\xdd" + text[1:])
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert "bn" in {f.layer for f in audit(path).findings}  # read, not refused
    folded, _ = fold_model(path)
    got = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_an_external_data_location_that_is_not_utf8_is_refused_by_name(tmp_path):
    """fold's list of the model's data files joined the bytes location to a str path (TypeError traceback, review);
    onnx.load's own error named a pybind signature. onnxruntime runs such a file, but bnkit cannot name the file."""
    from bnkit.onnx import fold

    model = _model([helper.make_node("Cast", ["v16"], ["v"], to=TensorProto.FLOAT), _bn()])
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="QQloc.bin", size_threshold=0)
    data = (tmp_path / "m.onnx").read_bytes().replace(b"QQloc.bin", b"\xddQloc.bin")
    (tmp_path / "bad.onnx").write_bytes(data)
    os.rename(os.path.join(bytes(tmp_path), b"QQloc.bin"), os.path.join(bytes(tmp_path), b"\xddQloc.bin"))
    message = r"bad.onnx is not a readable ONNX model: model.graph.initializer\[0\].external_data\[0\].value holds"
    for run in (audit, lambda path: fold(path, tmp_path / "out.onnx")):
        with pytest.raises(ValueError, match=message):
            run(tmp_path / "bad.onnx")
    assert not (tmp_path / "out.onnx").exists()
