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


def _fp16_conv_bns(variances, w_scale: float = 1.0) -> onnx.ModelProto:
    """float16 x -> (Conv + BN) per variance, in a chain; the BN statistics in float32, as mixed-precision
    converters store them."""
    rng = np.random.default_rng(0)
    nodes, arrays, last = [], {}, "x"
    for k, var in enumerate(variances):
        arrays[f"W{k}"] = (w_scale * rng.normal(size=(6, 6, 1, 1))).astype(np.float16)
        arrays.update({f"{n}{k}": a for n, a in zip("sbmv", (np.ones(6, np.float32), np.zeros(6, np.float32),
                                                            np.zeros(6, np.float32), np.full(6, var, np.float32)))})
        nodes += [helper.make_node("Conv", [last, f"W{k}"], [f"c{k}"], name=f"conv{k}"),
                  helper.make_node("BatchNormalization", [f"c{k}", f"s{k}", f"b{k}", f"m{k}", f"v{k}"],
                                   ["y" if k == len(variances) - 1 else f"n{k}"], name=f"bn{k}")]
        last = f"n{k}"
    return _model(nodes, ["N", 6, 4, 4], ["N", 6, 4, 4], arrays, TensorProto.FLOAT16)


@pytest.mark.parametrize("var", [1e10, 1e12])
def test_float16_weights_folded_into_the_subnormal_range_leave_that_bn_and_fold_the_others(var):
    """float64 NumPy is the oracle: W / sqrt(var) rounded to float16 lies below float16's smallest normal number
    (6.1e-5) and is off by far more than float16's unit roundoff relative to the channel's largest weight; that BN
    is left (as on overflow), the other is folded and the file verifies."""
    model = _fp16_conv_bns([1.0, var])
    w64 = numpy_helper.to_array(model.graph.initializer[5]).astype(np.float64) / np.sqrt(var + np.float32(1e-5))
    rounded = w64.astype(np.float16).astype(np.float64)
    assert np.abs(w64).max() < np.finfo(np.float16).tiny
    assert np.abs(rounded - w64).max() / np.abs(w64).max() > 2 * 2.0 ** -11
    folded, report = fold_model(model)
    assert [f.bn for f in report.folded] == ["bn0"] and report.verified
    assert "below float16's smallest normal number" in report.left["bn1"]


def test_float16_weights_with_single_tiny_values_but_normal_channels_still_fold():
    """A few individually tiny weights lose nothing norm-wise (each channel's largest weight is normal): float64
    NumPy shows the rounding error relative to each channel's largest weight within float16's unit roundoff."""
    model = _fp16_conv_bns([1e2], w_scale=1e-3)  # weights ~1e-4 scaled by 0.1: some below 6.1e-5, none of the peaks
    w64 = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64) / np.sqrt(1e2 + np.float32(1e-5))
    peaks = np.abs(w64).reshape(6, -1).max(axis=1)
    assert (np.abs(w64) < np.finfo(np.float16).tiny).any() and (peaks > np.finfo(np.float16).tiny).all()
    error = np.abs(w64.astype(np.float16).astype(np.float64) - w64).reshape(6, -1).max(axis=1)
    assert (error / peaks <= 2.0 ** -11).all()
    _, report = fold_model(model)
    assert [f.bn for f in report.folded] == ["bn0"] and report.verified


@pytest.mark.parametrize("case", ["weights already subnormal", "gamma already subnormal"])
def test_float16_channels_already_below_normal_before_the_fold_still_fold(case):
    """A dead filter shrunk by weight decay (weights stored below 6.1e-5) or a zero-init-style gamma of 2e-5: the
    unfolded model already has those few bits, so folding loses nothing: the folded output is as close to the
    float64 NumPy oracle as onnxruntime's unfolded output is, to one float16 subnormal step (2**-24)."""
    model = _fp16_conv_bns([1.0], w_scale=1e-6 if case.startswith("weights") else 1.0)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if case.startswith("gamma"):
        model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.full(6, 2e-5, np.float32), "s0"))
        arrays["s0"] = np.full(6, 2e-5, np.float32)
    x = np.random.default_rng(1).normal(size=(2, 6, 4, 4)).astype(np.float16)
    a = arrays["s0"].astype(np.float64) / np.sqrt(arrays["v0"].astype(np.float64) + np.float64(np.float32(1e-5)))
    conv = np.einsum("nchw,oc->nohw", x.astype(np.float64), arrays["W0"][:, :, 0, 0].astype(np.float64))
    oracle = conv * a[None, :, None, None] + (arrays["b0"] - arrays["m0"] * a)[None, :, None, None]
    folded, report = fold_model(model)
    assert [f.bn for f in report.folded] == ["bn0"] and report.verified
    unfolded_error = np.abs(_run(model, x).astype(np.float64) - oracle).max()
    assert np.abs(_run(folded, x).astype(np.float64) - oracle).max() <= unfolded_error + 2.0 ** -24


def test_float16_weights_already_subnormal_that_the_fold_would_shrink_further_leave_the_bn():
    """Stored weights ~1e-5 (subnormal, a fixed absolute step of 2**-24) scaled by a = 1/sqrt(1e4) = 0.01 would keep
    ~2 of their ~8 bits (float64 NumPy: the rounding error of the folded weights far above the stored ones'): the BN
    is left, as for weights the fold takes below normal."""
    model = _fp16_conv_bns([1e4], w_scale=1e-5)
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    assert np.abs(w).max() < np.finfo(np.float16).tiny
    w64 = w / np.sqrt(1e4 + np.float64(np.float32(1e-5)))
    error = np.abs(w64.astype(np.float16).astype(np.float64) - w64).max() / np.abs(w64).max()
    assert error > 50 * 2.0 ** -11
    _, report = fold_model(model)
    assert not report.folded and "below float16's smallest normal number" in report.left["bn0"]
