"""Training-mode Dropout in an ONNX export: ``fold(to_inference=True)`` switches it, verification stays exact.

Oracles: PyTorch's eval-mode output, onnxruntime on the graph as given, and closed-form inference Dropout
(ONNX Dropout-12/13: without ``training_mode`` the output is the input and the mask is all true).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from _helpers import ort_run, rel
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bnkit.onnx import audit, fold, fold_model


def _dropout_net(seed: int = 0) -> nn.Module:
    """conv, BN2d, ReLU, Dropout, Linear, BN1d, Dropout (the newcomer's shape), with trained statistics, in eval."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                          nn.Linear(144, 6), nn.BatchNorm1d(6), nn.Dropout(0.3))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 8, 8) + 0.5)
    return model.eval()


def _training_dropouts(model: onnx.ModelProto) -> list[str]:
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    consts.update({t.name: numpy_helper.to_array(t) for t in model.graph.initializer})
    return [n.name for n in model.graph.node
            if n.op_type == "Dropout" and len(n.input) > 2 and n.input[2] and bool(consts.get(n.input[2], True))]


@pytest.mark.parametrize("opset", [12, 17])
def test_to_inference_switches_training_dropout_and_matches_pytorch_eval(opset, export, tmp_path):
    model = _dropout_net()
    x = torch.randn(4, 1, 8, 8)
    proto = export(model, x, training=True, opset=opset)
    assert len(_training_dropouts(proto)) == 2
    feeds = {"input": x.numpy()}
    with torch.no_grad():
        eager = model(x).double().numpy()
    # the export really is random: two runs of the same input differ
    assert not np.array_equal(ort_run(proto, feeds)[0], ort_run(proto, feeds)[0])

    proto_path = tmp_path / "train.onnx"
    onnx.save(proto, proto_path)
    report = fold(proto_path, tmp_path / "inf.onnx", to_inference=True)
    folded = onnx.load(tmp_path / "inf.onnx")
    assert report.verified and report.max_rel_diff < 1e-5
    assert report.dropout_converted == ["/4/Dropout", "/7/Dropout"] and len(report.converted) == 2
    assert not _training_dropouts(folded)
    assert "Dropout" not in [n.op_type for n in folded.graph.node]  # masks unused: plain Identity
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    got = ort_run(folded, feeds)[0]
    assert rel(got, eager) < 1e-5
    assert np.array_equal(got, ort_run(folded, feeds)[0])  # deterministic
    assert onnx.load(proto_path).graph.node == proto.graph.node  # the input file is untouched


def test_without_to_inference_dropout_stays_and_verification_compares_the_same_masks(export):
    model = _dropout_net(1)
    x = torch.randn(4, 1, 8, 8)
    proto = export(model, x, training=True, opset=17)
    folded, report = fold_model(proto)  # used to fail: the random masks differed between the two runs
    assert report.verified and report.max_abs_diff == 0.0
    assert report.dropout_converted == [] and len(report.left) == 2
    assert _training_dropouts(folded) == _training_dropouts(proto)
    assert not any(a.name == "seed" for n in folded.graph.node for a in n.attribute)  # seeded only to verify


def test_a_read_mask_keeps_the_node_without_training_mode():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("Dropout", ["h", "ratio", "train"], ["y", "mask"], name="drop")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 50])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 50]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [3, 50])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"), numpy_helper.from_array(np.array(True), "train")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    codes = [(f.severity, f.layer, f.code) for f in audit(model).findings]
    assert ("warning", "drop", "dropout_training") in codes
    folded, report = fold_model(model, to_inference=True)
    assert report.dropout_converted == ["drop"] and report.verified
    (drop,) = [n for n in folded.graph.node if n.op_type == "Dropout"]
    assert list(drop.input) == ["h", "ratio"] and list(drop.output) == ["y", "mask"]
    assert "train" not in {t.name for t in folded.graph.initializer}
    x = rng.standard_normal((3, 50)).astype(np.float32)
    y, mask = ort_run(folded, {"x": x})
    assert np.array_equal(y, np.maximum(x, 0)) and mask.all()
    assert "dropout_training" not in [f.code for f in audit(folded).findings]


def test_inference_export_has_no_dropout_finding(export):
    model = _dropout_net(2)
    proto = export(model, torch.randn(2, 1, 8, 8), training=False, opset=17)
    assert "dropout_training" not in [f.code for f in audit(proto).findings]


@pytest.mark.parametrize("train", [False, True])
def test_a_constant_training_mode_is_read_for_its_value(train):
    """A Dropout whose training_mode is a stored False is an inference Dropout (onnxruntime passes its input
    through): it is neither reported nor converted; only a stored True is."""
    graph = helper.make_graph(
        [helper.make_node("Dropout", ["x", "ratio", "train"], ["y"], name="drop")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 50])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 50])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
         numpy_helper.from_array(np.array(train), "train")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = np.random.default_rng(4).standard_normal((3, 50)).astype(np.float32) + 5  # no zeros of its own
    (y,) = ort_run(model, {"x": x})
    assert np.array_equal(y, x) == (not train)  # training drops about half of the 150 values
    assert ("dropout_training" in [f.code for f in audit(model).findings]) == train
    folded, report = fold_model(model, to_inference=True)
    assert report.dropout_converted == (["drop"] if train else []) and report.verified
    np.testing.assert_array_equal(ort_run(folded, {"x": x})[0], x)


def test_a_body_dropout_whose_training_mode_is_fed_at_run_time_does_not_block_to_inference():
    """A Dropout in an If body whose training_mode is a graph input: the caller decides, as for a top-level one
    (left with a note), so it is not a training-mode node --to-inference must refuse."""
    def body(tag):
        return helper.make_graph([helper.make_node("Dropout", ["x", "ratio", "train"], [f"y{tag}"], name="drop")],
                                 tag, [], [helper.make_tensor_value_info(f"y{tag}", TensorProto.FLOAT, [3, 50])])

    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="if", then_branch=body("t"), else_branch=body("e"))], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 50]),
         helper.make_tensor_value_info("train", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 50])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "ratio")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = np.random.default_rng(5).standard_normal((3, 50)).astype(np.float32) + 5  # no zeros of its own
    for train in (False, True):  # onnxruntime: the fed value decides
        (y,) = ort_run(model, {"c": np.array(True), "x": x, "train": np.array(train)})
        assert np.array_equal(y, x) == (not train)
    folded, report = fold_model(model, to_inference=True)
    assert report.verified and report.dropout_converted == []
    assert folded.graph.node[0].attribute[0].g.node[0].input[2] == "train"  # left as it is
