"""Parameters stored as ``graph.sparse_initializer`` are constants: bnkit.onnx.audit checks them and fold_model folds
them, against onnxruntime (which runs such files) and NumPy's dense values."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnkit.onnx import audit, fold_model
from bnkit.onnx.verify import random_inputs

C = 4


def _sparse(name: str, dense: np.ndarray, coordinates: bool = False) -> onnx.SparseTensorProto:
    """``dense`` as a sparse tensor: its nonzero values at linear indices, or at rows of coordinates."""
    where = np.argwhere(dense) if coordinates else np.flatnonzero(dense)
    values = dense[tuple(where.T)] if coordinates else dense.reshape(-1)[where]
    return helper.make_sparse_tensor(numpy_helper.from_array(values, name),
                                     numpy_helper.from_array(where.astype(np.int64), name + "_idx"), dense.shape)


def _conv_bn(var: np.ndarray, *, sparse_weight: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(C, 3, 1, 1)).astype(np.float32)
    w[1, 0] = w[3, 2] = 0  # zeros a sparse weight leaves out
    dense = {"s": rng.uniform(.5, 2, C), "b": rng.normal(size=C), "m": rng.normal(size=C)}
    inits = [numpy_helper.from_array(a.astype(np.float32), k) for k, a in dense.items()]
    sparse = [_sparse("v", var.astype(np.float32))]
    if sparse_weight:
        sparse.append(_sparse("W", w, coordinates=True))
    else:
        inits.append(numpy_helper.from_array(w, "W"))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
         helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn", epsilon=1e-3)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 4, 4])], inits, sparse_initializer=sparse)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


X = np.random.default_rng(1).normal(size=(2, 3, 4, 4)).astype(np.float32)


def test_a_negative_variance_stored_sparse_is_reported_on_the_channel_onnxruntime_makes_nan():
    model = _conv_bn(np.array([1.0, 0.0, 2.0, -1.0]))
    nan_channels = [c for c in range(C) if np.isnan(_run(model, X)[:, c]).any()]
    assert nan_channels == [3]
    findings = {f.code: f for f in audit(model).findings}
    assert "not_constant" not in findings
    assert "channel 3" in findings["negative_var"].evidence


@pytest.mark.parametrize("sparse_weight", [False, True])
def test_a_bn_with_sparse_statistics_and_weight_folds_to_a_valid_model_onnxruntime_agrees_with(sparse_weight):
    model = _conv_bn(np.array([1.0, 0.0, 2.0, 0.5]), sparse_weight=sparse_weight)
    folded, report = fold_model(model)
    assert [f.bn for f in report.folded] == ["bn"] and report.verified
    onnx.checker.check_model(folded, full_check=True)
    assert not folded.graph.sparse_initializer  # the statistics and the old weight are no longer read
    np.testing.assert_allclose(_run(folded, X), _run(model, X), rtol=1e-5, atol=1e-5)


def test_a_sparse_initializer_listed_as_a_graph_input_is_not_given_a_random_value():
    """As a dense initializer listed as an input (a stored default): onnxruntime runs it with x alone."""
    model = _conv_bn(np.array([1.0, 0.5, 2.0, 0.5]))
    model.graph.input.append(helper.make_tensor_value_info("v", TensorProto.FLOAT, [C]))
    assert np.isfinite(_run(model, X)).all()
    assert sorted(random_inputs(model)) == ["x"]
    assert audit(model).findings[0].code == "overridable"
