"""Verification that compares no finite value is refused, not passed: bnkit.onnx.verify.compare, bnkit fold
(fold_model) and export_onnx, against onnxruntime's own outputs (NaN everywhere) and closed-form values."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnkit.onnx import fold, fold_model
from bnkit.onnx.verify import compare, random_inputs, run

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("reference, candidate", [
    ([np.full(3, NAN)], [np.full(3, NAN)]),
    ([np.array([NAN, INF])], [np.array([NAN, INF])]),
    ([np.full(2, NAN), np.array([])], [np.full(2, NAN), np.array([])]),  # an empty output adds nothing either
])
def test_outputs_non_finite_everywhere_compare_nothing_and_are_refused(reference, candidate):
    """Closed form: with every position NaN/Inf in both, no finite element is compared, so (0, 0) would be a
    verdict on nothing."""
    with pytest.raises(ValueError, match="every output value is NaN or Inf in both.*compared nothing"):
        compare(reference, candidate)


def test_an_integer_output_beside_all_nan_float_outputs_compares_nothing():
    """Closed form: an ArgMax class index stays finite (here constant) over NaN logits, so it must not count as a
    compared value while a float output exists; an all-integer model is compared on its integers."""
    with pytest.raises(ValueError, match="compared nothing"):
        compare([np.full(3, NAN), np.zeros(2, np.int64)], [np.full(3, NAN), np.zeros(2, np.int64)])
    assert compare([np.array([1, 2], np.int64)], [np.array([1, 3], np.int64)]) == (1.0, 0.5)


def test_a_wrong_classifier_is_not_verified_on_its_class_index_alone():
    """onnxruntime is the oracle: the Log-features model with an ArgMax output gives NaN logits and the same class
    index in both models on the verification inputs; the doubled-weight model must be refused, not scored 0."""
    model, wrong = (_with_argmax(_log_features_model(scale)) for scale in (1.0, 2.0))
    feeds = random_inputs(model)
    expected, got = run(model, feeds), run(wrong, feeds)
    assert np.isnan(expected[0]).all() and np.array_equal(expected[1], got[1])
    with pytest.raises(ValueError, match="compared nothing"):
        compare(expected, got)


def test_one_output_non_finite_everywhere_and_another_finite_compares_the_finite_one():
    """Closed form: the finite output's 0.5 / 2 is the relative difference; the all-NaN one adds nothing."""
    assert compare([np.full(2, NAN), np.array([1.0, 2.0])], [np.full(2, NAN), np.array([1.0, 2.5])]) == (0.5, 0.25)


def _log_features_model(weight_scale: float = 1.0) -> onnx.ModelProto:
    """Log -> Conv -> BN -> global pool: on standard-normal inputs Log makes NaN, which the pool spreads everywhere."""
    rng = np.random.default_rng(0)
    c = 6
    arrays = {"W": weight_scale * rng.normal(size=(c, 4, 3, 3)), "s": rng.uniform(.5, 2, c), "b": rng.normal(size=c),
              "m": rng.normal(size=c), "v": rng.uniform(.5, 2, c)}
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["l"], name="log"), helper.make_node("Conv", ["l", "W"], ["c"], name="conv"),
         helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="bn"),
         helper.make_node("GlobalAveragePool", ["n"], ["y"], name="gap")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 1, 1])],
        [numpy_helper.from_array(a.astype(np.float32), k) for k, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def _with_argmax(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a second output, the ArgMax over channels of its first (int64)."""
    model.graph.node.append(helper.make_node("ArgMax", ["y"], ["cls"], name="argmax", axis=1))
    model.graph.output.append(helper.make_tensor_value_info("cls", TensorProto.INT64, ["N", 1, 1, 1]))
    return model


def test_a_wrong_model_is_not_scored_zero_on_inputs_where_both_output_only_nan():
    """onnxruntime is the oracle: on the verification inputs both models output NaN everywhere, so compare must
    refuse rather than score the doubled-weight model 0."""
    model, wrong = _log_features_model(), _log_features_model(2.0)
    feeds = random_inputs(model)
    expected, got = run(model, feeds), run(wrong, feeds)
    assert all(np.isnan(o).all() for o in expected + got)
    with pytest.raises(ValueError, match="compared nothing"):
        compare(expected, got)


def test_fold_whose_verification_compares_nothing_is_refused_and_writes_nothing(tmp_path):
    """bnkit fold refuses (ValueError naming --no-verify) instead of reporting a vacuous 'verified'; without
    verification the fold still goes ahead."""
    src = tmp_path / "m.onnx"
    onnx.save(_log_features_model(), src)
    with pytest.raises(ValueError, match=r"compared nothing.*verify=False \(--no-verify\).*nothing written"):
        fold(src, tmp_path / "out.onnx")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    assert [f.bn for f in fold_model(src, verify=False)[1].folded] == ["bn"]


def test_export_whose_check_compares_nothing_is_refused(tmp_path):
    """export_onnx compares PyTorch's eval output (NaN everywhere here: log of negative inputs, then a mean) with
    onnxruntime's; it must refuse, not write a file reported as verified."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from bnkit.torch.export import export_onnx

    class LogFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(torch.log(x))).mean(dim=(2, 3))

    torch.manual_seed(0)
    model = LogFeatures().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 1.5)
    x = -torch.rand(2, 2, 4, 4) - 0.1  # all negative: log gives NaN everywhere
    with torch.no_grad():
        assert torch.isnan(model(x)).all()
    with pytest.raises(ValueError, match="compared nothing"):
        export_onnx(model, x, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
