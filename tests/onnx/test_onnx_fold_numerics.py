"""bnkit.onnx.fold_model where the folded numbers would go wrong: a non-finite epsilon, Gemm's beta=0 with a
non-finite C, float16 underflow; against onnxruntime and float64 NumPy."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnkit.onnx import fold_model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _model(nodes, x_shape, y_shape, arrays: dict, elem=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, x_shape)],
                              [helper.make_tensor_value_info("y", elem, y_shape)],
                              [numpy_helper.from_array(a, k) for k, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def _stats(c: int, var=1.0) -> dict:
    return {"s": np.ones(c, np.float32), "b": np.zeros(c, np.float32), "m": np.full(c, 0.1, np.float32),
            "v": np.full(c, var, np.float32)}


def _conv_bn(epsilon: float) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return _model([helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
                   helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn",
                                    epsilon=epsilon)],
                  ["N", 4, 5, 5], ["N", 6, 3, 3], {"W": rng.normal(size=(6, 4, 3, 3)).astype(np.float32), **_stats(6)})


@pytest.mark.parametrize("epsilon", [float("nan"), float("inf")])
def test_a_non_finite_epsilon_leaves_the_bn_and_no_nan_weights(epsilon):
    """onnxruntime's output of the original is not that of a finite affine map (NaN, or the bias alone): folding
    epsilon into the weights would write NaN (or zero) weights, so the BN is left, as for NaN statistics."""
    model = _conv_bn(epsilon)
    x = np.random.default_rng(1).normal(size=(2, 4, 5, 5)).astype(np.float32)
    original = _run(model, x)
    assert np.isnan(original).all() if np.isnan(epsilon) else np.allclose(original, 0.0)
    folded, report = fold_model(model, verify=False)
    assert report.folded == [] and "non-finite statistics or epsilon" in report.left["bn"]
    assert all(np.isfinite(numpy_helper.to_array(t)).all() for t in folded.graph.initializer)
    np.testing.assert_array_equal(_run(folded, x), original)


def _gemm_bn(beta: float, c: np.ndarray) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return _model([helper.make_node("Gemm", ["x", "W", "C"], ["g"], beta=beta, name="gemm"),
                   helper.make_node("BatchNormalization", ["g", "s", "b", "m", "v"], ["y"], name="bn")],
                  ["N", 5], ["N", 4], {"W": rng.normal(size=(5, 4)).astype(np.float32), "C": c, **_stats(4, 2.0)})


@pytest.mark.parametrize("c", [np.array([np.inf, 1, 1, 1], np.float32), np.array([np.nan, -np.inf, 2, 3], np.float32)])
@pytest.mark.parametrize("verify", [True, False])
def test_gemm_at_beta_zero_ignores_a_non_finite_c_as_onnxruntime_does(c, verify):
    """onnxruntime's output of the original is finite (C ignored at beta=0); the folded model's must equal it,
    with no NumPy warning about 0 * inf on the way."""
    model = _gemm_bn(0.0, c)
    x = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    original = _run(model, x)
    assert np.isfinite(original).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded, report = fold_model(model, verify=verify)
    assert [f.bn for f in report.folded] == ["bn"]
    np.testing.assert_allclose(_run(folded, x), original, rtol=1e-5, atol=1e-6)


def test_gemm_at_beta_zero_folded_through_an_add_keeps_c_ignored():
    """Gemm(beta=0, C=inf) + Add(k) + BN: the shift goes into k, C stays ignored (beta stays 0); onnxruntime is the
    oracle."""
    rng = np.random.default_rng(2)
    model = _model([helper.make_node("Gemm", ["x", "W", "C"], ["g"], beta=0.0, name="gemm"),
                    helper.make_node("Add", ["g", "k"], ["h"], name="add"),
                    helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["y"], name="bn")],
                   ["N", 5], ["N", 4], {"W": rng.normal(size=(5, 4)).astype(np.float32),
                                        "C": np.full(4, np.inf, np.float32), "k": rng.normal(size=4).astype(np.float32),
                                        **_stats(4, 2.0)})
    x = rng.normal(size=(3, 5)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded, report = fold_model(model)
    assert [f.bn for f in report.folded] == ["bn"]
    np.testing.assert_allclose(_run(folded, x), _run(model, x), rtol=1e-5, atol=1e-6)
