"""A Dropout whose training_mode is a graph input with a stored default (an initializer also listed as an input):
bnkit.onnx.audit and fold_model read the default, what onnxruntime (the oracle) runs when no value is fed."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bnkit.onnx import audit, fold_model


def _dropout(default: bool) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Dropout", ["x", "r", "tm"], ["y"], name="drop")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4]),
         helper.make_tensor_value_info("tm", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "r"), numpy_helper.from_array(np.array(default), "tm")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


X = np.ones((2, 3, 4), np.float32)


def test_a_stored_default_true_is_reported_as_training_mode_that_a_caller_may_override():
    model = _dropout(True)
    assert (_run(model, X) == 0).any()  # onnxruntime drops values on a run that feeds no training_mode
    [finding] = [f for f in audit(model).findings if f.code == "dropout_training"]
    assert finding.layer == "drop" and finding.data == {"overridable": ["training_mode"]}
    assert "graph input 'tm' with a stored default true" in finding.evidence


def test_a_stored_default_false_is_not_reported():
    model = _dropout(False)
    np.testing.assert_array_equal(_run(model, X), X)  # inference: a copy
    assert not [f for f in audit(model).findings if f.code == "dropout_training"]


def test_to_inference_switches_a_stored_default_true_and_says_a_fed_value_is_now_ignored():
    folded, report = fold_model(_dropout(True), to_inference=True)
    assert report.dropout_converted == ["drop"]
    assert any("stored default true; switched to inference" in note for note in report.notes)
    np.testing.assert_array_equal(_run(folded, X), X)


def test_without_to_inference_the_dropout_stays_as_it_was():
    folded, report = fold_model(_dropout(True), verify=False)
    assert report.dropout_converted == [] and [n.op_type for n in folded.graph.node] == ["Dropout"]
