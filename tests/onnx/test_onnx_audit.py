"""bnkit.onnx.audit on real exports and on hand-built BatchNormalization graphs; a model over protobuf's 2 GB limit
is checked by path (and the fold refuses it); reports with NaN or infinite values are strict JSON."""
from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _helpers import bn_initializers, bn_node, conv_bn_model, ort_exit_code, strict_json, value_info
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from bnkit.onnx import OnnxRuntimeError, audit, fold, fold_model
from bnkit.torch.zoo import ZOO

runner = CliRunner()


def _bn_model(scale, bias, mean, var, *, opset=17, outputs=("y",), training_mode=None, epsilon=1e-5, name="bn"):
    c = len(mean)
    attrs = {"epsilon": epsilon}
    if training_mode is not None:
        attrs["training_mode"] = training_mode
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], list(outputs), name=name, **attrs)
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), k) for k, a in zip("sbmv", (scale, bias, mean, var))]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 3])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2, c, 3] if o == "y" else [c])
                               for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


GOOD = dict(scale=[1.2, 0.8, 1.0], bias=[0.1, -0.2, 0.0], mean=[0.3, -1.0, 2.0], var=[0.5, 1.7, 0.9])


@pytest.mark.parametrize("name", sorted(ZOO))
def test_clean_eval_export_gets_a_clean_bill(name, zoo_onnx):
    model, _, proto = zoo_onnx(name)
    report = audit(proto)
    assert report.ok and report.findings == []
    assert len(report.nodes) == sum(1 for m in model.modules() if isinstance(m, torch_bn()))
    assert not any(n["training"] for n in report.nodes)


def torch_bn():
    from torch.nn.modules.batchnorm import _BatchNorm

    return _BatchNorm


@pytest.mark.parametrize("opset", [12, 15])
def test_training_mode_export_is_an_error(opset, calibrated, export, tmp_path):
    model, x = calibrated("resnet")
    path = tmp_path / "train.onnx"
    onnx.save(export(model, x, training=True, opset=opset), path)
    report = audit(path)  # a path works as well as a proto
    assert not report.ok
    flagged = {f.layer for f in report.findings if f.code == "training_mode" and f.severity == "error"}
    assert len(flagged) == 6 and all(n["training"] for n in report.nodes)


@pytest.mark.parametrize("opset,outputs,training_mode", [
    (8, ["y", "", "", "", ""], None), (9, ["y", "", "", "", ""], None), (12, ["y", "rm", "", "", ""], None),
    (15, ["y", "", ""], 0), (15, ["y", "", ""], 1), (14, ["y", "rm", ""], 1), (15, ["y", "", "rv"], 1)])
def test_blank_outputs_onnxruntime_cannot_run_are_an_error(opset, outputs, training_mode, tmp_path):
    """Review: they were a warning, so `bnkit audit` exited 0 (and a CI pipeline passed) on files onnxruntime refuses
    or crashes running, where the same node with named extra outputs is an error. Oracle: onnxruntime, in a child
    process (a segmentation fault is its answer to most of these)."""
    model = _bn_model(**GOOD, opset=opset, training_mode=training_mode)
    del model.graph.node[0].output[:]
    model.graph.node[0].output.extend(outputs)
    assert ort_exit_code(model, tmp_path) != 0
    report = audit(model)
    assert ("error", "blank_outputs") in [(f.severity, f.code) for f in report.findings] and not report.ok
    runs = _bn_model(**GOOD, opset=12)  # the one blank pattern it runs: saved_mean/saved_var blank beside named ones
    del runs.graph.node[0].output[:]
    runs.graph.node[0].output.extend(["y", "rm", "rv", "", ""])
    assert ort_exit_code(runs, tmp_path) == 0 and "blank_outputs" not in [f.code for f in audit(runs).findings]


def test_hand_built_training_mode_node_and_extra_outputs():
    report = audit(_bn_model(**GOOD, training_mode=1, outputs=("y", "rm", "rv")))
    assert [f.code for f in report.findings] == ["training_mode"] and report.findings[0].layer == "bn"
    # the running mean's output left blank (""): a valid node, but onnxruntime 1.32 segfaults loading it
    model = _bn_model(**GOOD, training_mode=1, outputs=("y", "rv"))
    model.graph.node[0].output.insert(1, "")
    blank = audit(model)
    assert [(f.severity, f.code) for f in blank.findings] == [("error", "training_mode"), ("error", "blank_outputs")]
    model = _bn_model(**GOOD, opset=15, training_mode=0, outputs=("y", "rm", "rv"))
    report = audit(model)
    assert not report.ok and [f.code for f in report.findings] == ["extra_outputs"]
    assert report.findings[0].severity == "error"  # what onnxruntime and the full check say of it:
    with pytest.raises(Exception, match="should be 1 when Training_mode = False"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="should be 1 when Training_mode = False"):
        onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("opset", [14, 17])
def test_a_training_mode_node_without_its_statistics_outputs_is_said_to_be_refused_by_onnxruntime(opset):
    """training_mode=1 with output Y only: the audit said onnxruntime normalises with batch statistics and the fold
    left it because 'its outputs [] stay (training_mode=1 requires all three outputs)'; onnxruntime (the oracle)
    refuses to load it. --to-inference repairs it: the closed-form eval transform, in float64."""
    model = _bn_model(**GOOD, opset=opset, training_mode=1)
    with pytest.raises(Exception, match="should be 3 when Training_mode = True"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (finding,) = audit(model).findings
    assert (finding.severity, finding.code) == ("error", "training_mode")
    assert "with outputs ['y'] only: onnxruntime refuses to load the model" in finding.evidence
    _, report = fold_model(model, verify=False)
    assert "which onnxruntime refuses to load" in report.left["bn"] and "to_inference=True" in report.left["bn"]
    with pytest.raises(OnnxRuntimeError, match=r"\['bn'\] are in training mode .* without their running mean and "
                                               r"variance outputs.*to_inference=True \(--to-inference\)"):
        fold_model(model)  # the advice was input shapes or --no-verify, which writes a file onnxruntime refuses
    # named blank instead (onnxruntime loads it, then crashes running it: see the blank-output tests of the fold)
    blank = _bn_model(**GOOD, opset=opset, training_mode=1)
    blank.graph.node[0].output.extend(["rm", ""])
    finding = next(f for f in audit(blank).findings if f.code == "training_mode")
    assert "onnxruntime loads the model but crashes running this node" in finding.evidence
    assert "crashes running (blank)" in fold_model(blank, verify=False)[1].left["bn"]
    old = _bn_model(**GOOD, opset=12)  # opset 9-13: running-statistic outputs select training; a blank one crashes
    old.graph.node[0].output.extend(["rm", "", "", ""])
    finding = next(f for f in audit(old).findings if f.code == "training_mode")
    assert "onnxruntime loads the model but crashes running this node" in finding.evidence
    assert "crashes running (blank)" in fold_model(old, verify=False)[1].left["bn"]
    folded, report = fold_model(model, to_inference=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 3)).astype(np.float32)
    y = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    s, b, m, v = (np.asarray(GOOD[k], np.float64)[None, :, None] for k in ("scale", "bias", "mean", "var"))
    np.testing.assert_allclose(y, (x - m) / np.sqrt(v + np.float32(1e-5)) * s + b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("outputs", [["y"], ["y", "rm", ""]])
def test_a_training_node_bnkit_cannot_switch_gets_re_export_advice_when_onnxruntime_cannot_run_it(outputs):
    """The node inside an If body: fold_model's refusal said to pass --to-inference, which then refused the file
    ('cannot switch training-mode nodes'), and for blank outputs offered --no-verify, which writes a file onnxruntime
    crashes on. Now: re-export, naming why bnkit leaves the node."""
    model = _bn_model(**GOOD, opset=15)
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], outputs, name="bn", training_mode=1)
    body = helper.make_graph([bn], "then", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 3])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "else", [],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3, 3])])
    graph = model.graph
    del graph.node[:]
    graph.node.append(helper.make_node("If", ["cond"], ["out"], name="if", then_branch=body, else_branch=other))
    graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 3]))
    onnx.checker.check_model(model)
    with pytest.raises(OnnxRuntimeError, match=r"re-export the model in eval mode: bnkit fold does not rewrite if/bn "
                                               r"\(inside a subgraph") as caught:
        fold_model(model)
    assert "to_inference" not in str(caught.value) and "no-verify" not in str(caught.value)
    with pytest.raises(ValueError, match="cannot switch training-mode nodes"):  # what the old advice led to
        fold_model(model, to_inference=True)


@pytest.mark.parametrize("opset", [14, 15, 17])
def test_training_mode_attribute_decides_from_opset_14_on(opset):
    """From opset 14 (the first with ``training_mode``) the attribute, not the outputs asked for, is the mode:
    onnxruntime normalises a training_mode=1 node with the batch statistics, and refuses a training_mode=0
    node asking for the running-statistic outputs rather than train it."""
    x = np.random.default_rng(0).standard_normal((2, 3, 3)).astype(np.float32) * 3 + 1
    training = _bn_model(**GOOD, opset=opset, training_mode=1, outputs=("y", "rm", "rv"))
    y = ort.InferenceSession(training.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y.mean(axis=(0, 2)), GOOD["bias"], atol=1e-5)  # batch statistics: mean = bias
    report = audit(training)
    assert [f.code for f in report.findings] == ["training_mode"] and report.nodes[0]["training"]

    inference = _bn_model(**GOOD, opset=opset, training_mode=0, outputs=("y", "rm", "rv"))
    with pytest.raises(Exception, match="should be 1 when Training_mode = False"):
        ort.InferenceSession(inference.SerializeToString(), providers=["CPUExecutionProvider"])
    report = audit(inference)
    assert [f.code for f in report.findings] == ["extra_outputs"] and not report.nodes[0]["training"]
    # onnxruntime refuses the file (above) at every one of these opsets, opset 14 included: an error, not a warning
    assert report.findings[0].severity == "error" and not report.ok


def test_opset_6_training_node_is_named_for_its_is_test_attribute():
    """Before opset 7 a node without is_test=1 trains, whatever its outputs: the evidence said outputs were
    requested when none were."""
    (finding,) = audit(_bn_model(**GOOD, opset=6)).findings
    assert finding.code == "training_mode" and "is_test=0 (opset 6" in finding.evidence
    assert finding.data["extra_outputs"] == []
    tested = _bn_model(**GOOD, opset=6)
    tested.graph.node[0].attribute.append(helper.make_attribute("is_test", 1))
    assert audit(tested).findings == []


@pytest.mark.parametrize("opset", [8, 9, 13])
def test_training_node_before_opset_14_is_named_for_its_outputs_and_advised_as_fold_does(opset):
    """Opsets 7-13 have no is_test (nor training_mode) attribute: the requested running-statistic outputs make the
    node train, so the evidence must name them, not is_test. The advice must say what `bnkit fold --to-inference`
    really does with the file: it switches an opset >= 9 node and refuses an older one, which is not in an If/Loop."""
    assert "is_test" not in onnx.defs.get_schema("BatchNormalization", opset, "").attributes
    model = _bn_model(**GOOD, opset=opset, outputs=("y", "rm", "rv", "sm", "sv"))
    del model.graph.output[1:]  # the statistics outputs unread, as in a training export: fold may remove them
    (finding,) = audit(model).findings
    assert finding.code == "training_mode" and finding.severity == "error"
    assert f"running-statistic outputs requested (opset {opset})" in finding.evidence
    assert "is_test" not in finding.evidence
    if opset >= 9:
        folded, fold_report = fold_model(model, to_inference=True)
        assert fold_report.converted == ["bn"] and [list(n.output) for n in folded.graph.node] == [["y"]]
        assert "`bnkit fold --to-inference` switches an existing file" in finding.fix
    else:
        with pytest.raises(ValueError, match="cannot switch training-mode nodes"):
            fold_model(model, to_inference=True)
        assert "bnkit fold cannot switch it" in finding.fix and "switches an existing file" not in finding.fix
        assert "If/Loop bodies)" not in finding.fix  # the file holds no If/Loop: not the reason fold refuses


def test_model_failing_onnx_checker_is_an_error():
    """A graph onnx.checker rejects (a node reads a tensor nothing produces), which onnxruntime refuses to load
    too: the audit must report it as an error even when every BatchNormalization statistic is sound."""
    model = _bn_model(**GOOD)
    model.graph.node.append(helper.make_node("Relu", ["nowhere"], ["z"], name="r"))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3, 3]))
    with pytest.raises(onnx.checker.ValidationError) as checked:
        onnx.checker.check_model(model)
    with pytest.raises(Exception):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    report = audit(model)
    assert not report.ok and [(f.severity, f.layer, f.code) for f in report.findings] == [
        ("error", "(model)", "invalid_model")]
    assert report.findings[0].evidence == str(checked.value).splitlines()[0]
    assert audit(_bn_model(**GOOD)).findings == []  # the same graph without the dangling node is clean


def test_statistic_problems_are_flagged():
    nan = dict(GOOD, var=[0.5, np.nan, 0.9])
    assert [(f.severity, f.code) for f in audit(_bn_model(**nan)).findings] == [("error", "non_finite")]
    fresh = dict(GOOD, mean=[0, 0, 0], var=[1, 1, 1])
    assert [(f.severity, f.code) for f in audit(_bn_model(**fresh)).findings] == [("error", "never_updated")]
    negative = dict(GOOD, var=[0.5, -0.2, 0.9])
    assert ("error", "negative_var") in [(f.severity, f.code) for f in audit(_bn_model(**negative)).findings]
    tiny = audit(_bn_model(**dict(GOOD, var=[0.5, 1e-9, 0.9]), epsilon=1e-3))
    assert tiny.ok and [f.code for f in tiny.findings] == ["tiny_var"]
    assert tiny.findings[0].data["channels"] == [1]
    # gain 0.8 / sqrt(1e-9 + 1e-3), computed in float64 from the float32 arrays
    expected = np.float64(np.float32(0.8)) / np.sqrt(np.float64(np.float32(1e-9)) + np.float64(np.float32(1e-3)))
    assert tiny.findings[0].data["max_gain"] == pytest.approx(expected, rel=1e-6)


def test_nodes_sharing_a_name_are_reported_apart():
    # ONNX does not require unique node names: two "bn" nodes, the second with NaN statistics
    model = _bn_model(**GOOD)
    first = model.graph.node[0]
    second = helper.make_node("BatchNormalization", ["y", "s", "b", "m", "v2"], ["z"], name="bn")
    model.graph.node.append(second)
    model.graph.initializer.append(numpy_helper.from_array(np.asarray([0.5, np.nan, 0.9], np.float32), "v2"))
    model.graph.output[0].name = "z"
    report = audit(model)
    assert [n["name"] for n in report.nodes] == ["bn[y]", "bn[z]"] and first.name == "bn"
    assert [(f.layer, f.code) for f in report.findings] == [("bn[z]", "non_finite")]


def test_nodes_sharing_a_name_and_output_in_two_branches_are_named_by_branch():
    def branch(tag, var):
        arrays = {f"s{tag}": np.ones(3), f"b{tag}": np.zeros(3), f"m{tag}": np.full(3, 0.5), f"v{tag}": var}
        bn = helper.make_node("BatchNormalization", ["x", *arrays], ["y"], name="bn")
        return helper.make_graph([bn], f"g{tag}", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2])],
                                 [numpy_helper.from_array(np.asarray(a, np.float32), k) for k, a in arrays.items()])

    iff = helper.make_node("If", ["c"], ["out"], name="if", then_branch=branch("t", [1, 2, 1]),
                           else_branch=branch("e", [1, np.nan, 1]))  # only the else branch is broken
    graph = helper.make_graph([iff], "main", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                              helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 2])])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)])
    report = audit(model)
    assert sorted(n["name"] for n in report.nodes) == ["if/else_branch/bn[y]", "if/then_branch/bn[y]"]
    assert [(f.layer, f.code) for f in report.findings] == [("if/else_branch/bn[y]", "non_finite")]
    # a second If of the same name, with the same bodies: numbered in graph order (onnxruntime refuses the file,
    # the audit must still tell the four apart)
    second = onnx.helper.make_node("If", ["c"], ["out2"], name="if", then_branch=branch("t2", [1, 2, 1]),
                                   else_branch=branch("e2", [1, 2, 1]))
    model.graph.node.append(second)
    model.graph.output.append(helper.make_tensor_value_info("out2", TensorProto.FLOAT, [1, 3, 2]))
    # and a top-level node whose name is its own: it keeps it (no number, no output)
    model.graph.node.append(helper.make_node("BatchNormalization", ["x", "s0", "b0", "m0", "v0"], ["w"], name="bn0"))
    model.graph.initializer.extend(branch("0", [1, 2, 1]).initializer)
    model.graph.output.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 3, 2]))
    report = audit(model)
    assert len({n["name"] for n in report.nodes}) == 5 and "bn0" in {n["name"] for n in report.nodes}
    assert [(f.layer, f.code) for f in report.findings] == [("if/else_branch/bn[y]#1", "non_finite")]


def test_nodes_sharing_a_name_in_one_branch_are_told_apart_by_output_alone():
    """Two "bn" nodes in one If branch: their outputs already tell them apart, so the branch attribute is not
    added to their names (it is for nodes of different bodies that share name and output)."""
    arrays = {k: np.full(3, v, np.float32) for k, v in (("s", 1.0), ("b", 0.0), ("m", 0.5), ("v", 2.0))}
    then = helper.make_graph([helper.make_node("BatchNormalization", ["x", *arrays], ["h"], name="bn"),
                              helper.make_node("BatchNormalization", ["h", *arrays], ["y"], name="bn")], "then", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2])],
                             [numpy_helper.from_array(a, k) for k, a in arrays.items()])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "else", [],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 2])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["out"], name="if", then_branch=then, else_branch=other)],
                              "main", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                       helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 2])])
    report = audit(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)]))
    assert [n["name"] for n in report.nodes] == ["if/bn[h]", "if/bn[y]"]


@pytest.mark.parametrize("epsilon, var, code, nan_channels", [
    (-1.0, GOOD["var"], "nonpositive_var_eps", [0, 2]),  # var + eps < 0 in channels 0 and 2
    (float("nan"), GOOD["var"], "bad_eps", [0, 1, 2]),
    (0.0, [0.5, 0.0, 0.9], "zero_var", [1]),  # 0 / 0 with x equal to the mean; inf elsewhere
    (-0.4, GOOD["var"], "negative_eps", []),  # every var + eps > 0: finite, inflated gains
])
def test_eps_that_breaks_the_node_is_flagged_where_onnxruntime_says(epsilon, var, code, nan_channels):
    """Oracle: onnxruntime's own outputs, non-finite exactly in the channels the finding names."""
    import onnxruntime as ort

    model = _bn_model(**dict(GOOD, var=var), epsilon=epsilon)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.stack([np.full((2, 3), m, np.float32) for m in GOOD["mean"]], axis=1)  # each channel at its mean ...
    x[:, :, 1:] += 1.0  # ... and off it
    y = session.run(None, {"x": x})[0]
    assert np.flatnonzero(~np.isfinite(y).all(axis=(0, 2))).tolist() == nan_channels
    report = audit(model)
    (finding,) = [f for f in report.findings if f.code == code]
    warning = code == "negative_eps"
    assert finding.severity == ("warning" if warning else "error") and report.ok == warning
    if "channels" in finding.data:
        assert finding.data["channels"] == nan_channels


def test_statistics_fed_at_run_time_cannot_be_checked():
    model = _bn_model(**GOOD)
    var = model.graph.initializer.pop()
    model.graph.input.append(helper.make_tensor_value_info(var.name, TensorProto.FLOAT, [3]))
    report = audit(model)
    assert report.ok and [f.code for f in report.findings] == ["not_constant"]
    assert report.findings[0].data["missing"] == ["var"]


@pytest.mark.parametrize("fed, spoil, code", [
    ("s", dict(var=[0.5, np.nan, 0.9]), "non_finite"),  # a computed gamma beside a NaN variance
    ("m", dict(var=[0.5, -1.0, 0.9]), "negative_var"),
    ("v", dict(scale=[1.2, 0.0, 1.0]), "dead_gamma"),
    ("v", dict(mean=[0.0, 0.0, 0.0]), None),  # mean 0 alone is no 'never updated' without the variance
    ("m", dict(var=[1.0, 1.0, 1.0]), None),
])
def test_a_statistic_fed_at_run_time_leaves_the_stored_ones_checked(fed, spoil, code):
    """One of scale/B/mean/var fed at run time made the audit skip the node's other checks: a NaN variance beside
    a computed gamma passed while onnxruntime output NaN. Oracle: the state-dict audit of the stored arrays, with
    the fed one at a harmless value, and onnxruntime's output."""
    import onnxruntime as ort

    arrays = dict(GOOD, **spoil)
    model = _bn_model(**arrays)
    (init,) = [t for t in model.graph.initializer if t.name == fed]
    model.graph.initializer.remove(init)
    model.graph.input.append(helper.make_tensor_value_info(fed, TensorProto.FLOAT, [3]))
    report = audit(model)
    assert [f.code for f in report.findings if f.severity == "warning"][:1] == ["not_constant"]
    assert [f.code for f in report.findings if f.code != "not_constant"] == ([code] if code else [])
    if code == "non_finite":
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = session.run(None, {"x": np.ones((2, 3, 3), np.float32), "s": np.ones(3, np.float32)})[0]
        assert np.isnan(y[:, 1]).all() and not report.ok


def test_bn_inside_a_subgraph_is_found():
    inner = _bn_model(**dict(GOOD, mean=[0, 0, 0], var=[1, 1, 1]), name="inner_bn").graph
    inner.ClearField("input")
    branch = helper.make_graph(list(inner.node), "then", [], list(inner.output), list(inner.initializer))
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "else", [],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 3, 3])])
    cond = helper.make_node("If", ["c"], ["out"], name="branch", then_branch=branch, else_branch=other)
    graph = helper.make_graph([cond], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = audit(model)
    assert [(f.layer, f.code) for f in report.findings] == [("branch/inner_bn", "never_updated")]


@pytest.mark.parametrize("shadowed", [False, True])
def test_bn_in_a_branch_reading_the_main_graphs_initializers_is_checked(shadowed):
    """TorchScript exports of an `if` keep the branch's BN parameters in the main graph (ONNX's outer scope):
    they were taken for run-time values, so a negative variance passed. A branch input of the same name hides
    the outer value (then it is not a constant)."""
    import onnxruntime as ort

    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y1"], name="inner_bn")
    branch_inputs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, [3])] if shadowed else []
    branch = helper.make_graph([bn], "then", branch_inputs, [helper.make_tensor_value_info("y1", TensorProto.FLOAT,
                                                                                           [2, 3, 3])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "else", [],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 3, 3])])
    cond = helper.make_node("If", ["c"], ["out"], name="branch", then_branch=branch, else_branch=other)
    stats = dict(GOOD, var=[0.5, -0.7, 0.9])
    inits = [numpy_helper.from_array(np.asarray(stats[k], np.float32), n)
             for k, n in (("scale", "s"), ("bias", "b"), ("mean", "m"), ("var", "v"))]
    graph = helper.make_graph([cond], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = audit(model)
    if shadowed:  # onnx.checker refuses a subgraph input on an If branch; the audit still reads no constant there
        assert [(f.layer, f.code) for f in report.findings if f.code != "invalid_model"] == [
            ("branch/inner_bn", "not_constant")]
        return
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"c": np.array(True), "x": np.ones((2, 3, 3), np.float32)})[0]
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()  # what the error is about
    assert not report.ok
    (finding,) = report.findings
    assert (finding.layer, finding.code, finding.data["channels"]) == ("branch/inner_bn", "negative_var", [1])


def test_model_without_bn_and_the_input_proto_untouched():
    model = _bn_model(**GOOD)
    before = model.SerializeToString()
    audit(model)
    assert model.SerializeToString() == before
    relu = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]), opset_imports=[helper.make_opsetid("", 17)])
    report = audit(relu)
    assert report.ok and [f.code for f in report.findings] == ["no_bn"]


def test_unreadable_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xfe not an onnx file")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        audit(bad)


def test_model_with_external_data(tmp_path):
    path = str(tmp_path / "m.onnx")
    onnx.save(_bn_model(**dict(GOOD, var=[0.5, np.nan, 0.9])), path, save_as_external_data=True,
              location="m.data", size_threshold=0)
    assert [f.code for f in audit(path).findings] == ["non_finite"]  # the path: onnx.load reads the data file
    bare = onnx.load(path, load_external_data=False)  # the proto alone holds no numbers to check
    for tool in (audit, fold_model):
        with pytest.raises(ValueError, match=r"tensors \['s', 'b', 'm', 'v'\] are in an external data file that "
                                             "was not loaded: pass the .onnx file's path"):
            tool(bare)


def test_external_data_of_a_local_function_constant_is_named(tmp_path):
    model = _bn_model(**GOOD)
    const = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.full(3, 2.0, np.float32), "kv"))
    scale = helper.make_function("local", "Scale", ["a"], ["b"], [const, helper.make_node("Mul", ["a", "k"], ["b"])],
                                 [helper.make_opsetid("", 17)])
    model.functions.append(scale)
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.graph.node.append(helper.make_node("Scale", ["y"], ["z"], domain="local"))
    model.graph.output[0].name = "z"
    path = str(tmp_path / "f.onnx")
    onnx.save(model, path, save_as_external_data=True, location="f.data", size_threshold=0, convert_attribute=True)
    bare = onnx.load(path, load_external_data=False)
    for t in bare.graph.initializer:  # the graph's own tensors inline: only the function's constant is outside
        onnx.external_data_helper.load_external_data_for_tensor(t, str(tmp_path))
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]
    for tool in (audit, fold_model):
        with pytest.raises(ValueError, match=r"tensors \['kv'\] are in an external data file that was not loaded"):
            tool(bare)


def _stored_outside(tensor: onnx.TensorProto) -> str:
    """Mark ``tensor`` as held in an external data file, as onnx.load(path, load_external_data=False) leaves it."""
    onnx.external_data_helper.set_external_data(tensor, "w.data")
    tensor.ClearField("raw_data")
    assert onnx.external_data_helper.uses_external_data(tensor)
    return tensor.name


@pytest.mark.parametrize("holder", ["sparse_initializer", "sparse_constant", "tensors_attribute", "branch_constants"])
def test_external_data_held_anywhere_in_the_model_is_named(holder):
    """Tensors in an unloaded data file may sit in a sparse initializer, a Constant's sparse_value, a TENSORS
    attribute or Constant nodes inside If branches: each must get the clear refusal (audit ran on an empty tensor
    and fold_model blamed onnx.checker). Only the first 5 are listed."""
    stats = {k: numpy_helper.from_array(np.asarray(GOOD[n], np.float32), k)
             for k, n in (("s", "scale"), ("b", "bias"), ("m", "mean"), ("v", "var"))}
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 3]) for n in ("x", "y")]
    nodes, outside, opsets = [helper.make_node("BatchNormalization", ["x", *stats], ["y"], name="bn")], [], []
    if holder == "sparse_initializer":
        values = stats.pop("s")
        indices = numpy_helper.from_array(np.arange(3, dtype=np.int64), "s_indices")
        sparse = [helper.make_sparse_tensor(values, indices, [3])]
        outside = [_stored_outside(sparse[0].values)]
    elif holder == "sparse_constant":
        values = stats.pop("s")
        values.name = "s_values"
        const = helper.make_node("Constant", [], ["s"], sparse_value=helper.make_sparse_tensor(
            values, numpy_helper.from_array(np.arange(3, dtype=np.int64), "s_indices"), [3]))
        outside = [_stored_outside(const.attribute[0].sparse_tensor.values)]
        nodes.insert(0, const)
    elif holder == "tensors_attribute":
        custom = helper.make_node("Lookup", ["y"], ["z"], domain="my.ops")
        table = numpy_helper.from_array(np.ones(3, np.float32), "t0")
        custom.attribute.append(helper.make_attribute("tables", [table]))
        outside = [_stored_outside(custom.attribute[0].tensors[0])]
        nodes.append(custom)
        vi[1] = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3, 3])
        opsets = [helper.make_opsetid("my.ops", 1)]
    else:  # both branches compute the statistics with Constant nodes: 8 tensors outside

        def branch(tag):
            consts = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(numpy_helper.to_array(t),
                                                                                          f"{k}_{tag}"))
                      for k, t in stats.items()]
            return helper.make_graph(consts + nodes, tag, [], [vi[1]])

        nodes = [helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("then"),
                                  else_branch=branch("else"))]
        for node in nodes[0].attribute:
            outside += [_stored_outside(c.attribute[0].t) for c in node.g.node if c.op_type == "Constant"]
        vi.insert(0, helper.make_tensor_value_info("c", TensorProto.BOOL, []))
        stats = {}
    graph = helper.make_graph(nodes, "g", vi[:-1], vi[-1:], list(stats.values()))
    if holder == "sparse_initializer":
        graph.sparse_initializer.extend(sparse)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17), *opsets])
    for tool in (audit, fold_model):
        with pytest.raises(ValueError, match="are in an external data file that was not loaded") as info:
            tool(model)
        listed, more = re.search(r"tensors (\[.*?\])( \.\.\.)? are in", str(info.value)).groups()
        listed = ast.literal_eval(listed)
        assert set(listed) <= set(outside) and len(listed) == min(len(outside), 5)
        assert bool(more) == (len(outside) > 5)


def test_bnkit_onnx_imports_and_audits_without_torch(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_bn_model(**dict(GOOD, var=[0.5, np.inf, 0.9])), path)
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any 'import torch' now raises ImportError
        "from bnkit.onnx import audit\n"
        f"r = audit({str(path)!r}); print(r.ok, [f.code for f in r.findings])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False ['non_finite']"


def test_statistics_stored_as_overridable_graph_inputs_are_checked(kiai_export):
    # initializers that are also graph inputs were not constants to the audit, which then checked nothing
    import onnxruntime as ort

    proto = kiai_export(nan_channel=2)
    assert {t.name for t in proto.graph.initializer} <= {i.name for i in proto.graph.input}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": np.ones((1, 3, 6, 6), np.float32)})[0]  # nothing fed: the stored values run
    assert np.isnan(y[0, 2]).all() and np.isfinite(y[0, [0, 1, 3]]).all()
    report = audit(proto)
    assert not report.ok
    assert [(f.severity, f.code) for f in report.findings] == [("error", "non_finite"), ("warning", "overridable")]
    assert report.findings[1].data["overridable"] == ["scale", "bias", "mean", "var"]
    clean = audit(kiai_export())
    assert clean.ok and [f.code for f in clean.findings] == ["overridable"]


def test_fold_verifies_a_model_with_a_scalar_bool_input(tmp_path):
    """The random 0-d bool (an If's condition) was a NumPy scalar, which onnxruntime refuses: verification failed
    and --input-shape could not help."""
    from bnkit.onnx import fold
    from bnkit.onnx.verify import random_inputs

    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y1"], name="inner_bn")
    branch = helper.make_graph([bn], "then", [], [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [2, 3, 3])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "else", [],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 3, 3])])
    inits = [numpy_helper.from_array(np.asarray(GOOD[k], np.float32), n)
             for k, n in (("scale", "s"), ("bias", "b"), ("mean", "m"), ("var", "v"))]
    graph = helper.make_graph([helper.make_node("If", ["c"], ["out"], name="branch", then_branch=branch,
                                                else_branch=other)], "g",
                              [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feeds = random_inputs(model)
    assert isinstance(feeds["c"], np.ndarray) and feeds["c"].shape == () and feeds["c"].dtype == bool
    onnx.save(model, tmp_path / "if.onnx")
    report = fold(tmp_path / "if.onnx", tmp_path / "out.onnx")
    assert report.max_abs_diff == 0.0 and "branch/inner_bn" in report.left


@pytest.mark.parametrize("negative", [False, True])
def test_spatial_0_statistics_of_shape_c_h_w_are_checked_per_position(negative):
    """Opset 7 spatial=0: the spec gives scale, B, mean and var the shape (C, H, W). They were called inconsistent
    (an error on a node onnxruntime runs); a negative variance there is the error onnxruntime's NaN shows."""
    rng = np.random.default_rng(3)
    var = rng.uniform(0.5, 2.0, (2, 3, 3))
    if negative:
        var[1, 2, 0] = -1.0
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("s", np.ones((2, 3, 3))), ("b", np.zeros((2, 3, 3))), ("m", rng.standard_normal((2, 3, 3))), ("v", var))]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", spatial=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": rng.standard_normal((2, 2, 3, 3)).astype(np.float32)})[0]
    nan = bool(np.isnan(y).any())
    report = audit(model)
    codes = {f.code for f in report.findings if f.severity == "error"}
    assert nan is negative and codes == ({"negative_var"} if negative else set())
    assert report.nodes[0]["channels"] == 2
    if negative:  # the channel named is the one onnxruntime's NaN is in, not the flat (channel, position) index 15
        (finding,) = [f for f in report.findings if f.code == "negative_var"]
        assert finding.data["channels"] == sorted(set(np.argwhere(np.isnan(y))[:, 1].tolist())) == [1]
        assert finding.evidence.startswith("channel 1:")
    # spatial is an attribute of opsets 7-8 only (gone from opset 9): the node gets the unusual-attribute warning
    assert "spatial" in onnx.defs.get_schema("BatchNormalization", 7, "").attributes
    assert "spatial" not in onnx.defs.get_schema("BatchNormalization", 9, "").attributes
    spatial = [f for f in report.findings if f.code == "spatial"]
    assert [(f.severity, f.layer) for f in spatial] == [("warning", "bn")] and "spatial=0" in spatial[0].evidence


def test_over_the_protobuf_limit_audit_checks_by_path_and_fold_refuses(tmp_path, monkeypatch):
    import bnkit.onnx.graph as graph_module

    model = conv_bn_model("N")
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([1, np.nan, 1, 1], np.float32), "av"))
    path = tmp_path / "big.onnx"
    onnx.save(model, path)
    invalid = conv_bn_model("N")
    invalid.graph.node.append(helper.make_node("Relu", ["nowhere"], ["z"]))  # reads a value nothing makes
    invalid_path = tmp_path / "invalid.onnx"
    onnx.save(invalid, invalid_path)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(invalid_path)  # premise

    # what onnx and bnkit do with a model over 2 GB, at a limit this model is over
    limit = model.ByteSize() // 2
    monkeypatch.setattr(graph_module, "PROTOBUF_LIMIT", limit, raising=False)
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", limit)
    with pytest.raises(ValueError, match="too large"):
        onnx.checker.check_model(model)  # onnx refuses the message in memory

    report = audit(path)
    assert not report.ok and [f.code for f in report.findings if f.severity == "error"] == ["non_finite"]
    bad = audit(invalid_path)
    assert "invalid_model" in [f.code for f in bad.findings] and not bad.ok

    with pytest.raises(ValueError, match="2 GB"):
        audit(onnx.load(path))
    out = tmp_path / "folded.onnx"
    with pytest.raises(ValueError, match="2 GB.*nothing written"):
        fold(path, out, verify=False)
    assert not out.exists()


@pytest.mark.slow
def test_a_real_model_over_two_gigabytes_is_audited_from_its_file_and_refused_by_fold(tmp_path):
    """protobuf's upb backend raises EncodeError for ByteSize() of a message over 2 GB instead of returning it: both
    commands failed with a traceback. A real one here: the conv-BN model plus a 2.15 GB external tensor (a sparse
    file: no disk used; about 4.3 GB of memory once loaded) that a Shape node reads; onnx.checker passes it by
    path. Oracle: the NaN the test puts in the running variance, and onnx's own checker."""
    model = conv_bn_model("N")
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([1, np.nan, 1, 1], np.float32), "av"))
    n = 2**29 + 2**20
    pad = TensorProto(name="pad", data_type=TensorProto.FLOAT, dims=[n], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "pad.bin"), ("offset", "0"), ("length", str(4 * n))):
        pad.external_data.add(key=key, value=value)
    with open(tmp_path / "pad.bin", "wb") as f:
        f.truncate(4 * n)
    model.graph.initializer.append(pad)
    model.graph.node.append(helper.make_node("Shape", ["pad"], ["pad_shape"]))
    model.graph.output.append(helper.make_tensor_value_info("pad_shape", TensorProto.INT64, [1]))
    path = tmp_path / "big.onnx"
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(path)  # premise: a valid model
    report = audit(path)
    assert [f.code for f in report.findings if f.severity == "error"] == ["non_finite"]
    out = tmp_path / "folded.onnx"
    with pytest.raises(ValueError, match="over 2 GB.*nothing written"):
        fold(path, out, verify=False)
    assert not out.exists()


def _eps_model(path) -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             bn_node("c", "y1", "a", epsilon=float("nan")), bn_node("y1", "y", "b", epsilon=float("inf"))]
    graph = helper.make_graph(nodes, "g", [value_info("x", ["N", 2, 6, 6])], [value_info("y", ["N", 4, 4, 4])],
                              [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "W")]
                              + bn_initializers("a", 4, rng) + bn_initializers("b", 4, rng))
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13)]), path)


def test_cli_audit_json_is_strict_json_with_nan_and_inf_epsilon(tmp_path):
    from bnkit.cli import app

    path = tmp_path / "eps.onnx"
    _eps_model(path)
    result = runner.invoke(app, ["audit", str(path), "--json"])
    assert result.exit_code == 1
    report = strict_json(result.output)
    assert not report["ok"] and sorted(report["layers"]) == ["abn", "bbn"]
    eps = {f["layer"]: float(f["data"]["eps"]) for f in report["findings"] if f["code"] == "bad_eps"}
    assert sorted(eps) == ["abn", "bbn"] and math.isnan(eps["abn"]) and eps["bbn"] == math.inf


def test_onnx_audit_report_to_dict_is_strict_json(tmp_path):
    path = tmp_path / "eps.onnx"
    _eps_model(path)
    report = audit(path)
    assert {f.code for f in report.findings if f.severity == "error"} == {"bad_eps"}
    out = strict_json(json.dumps(report.to_dict(), allow_nan=False))
    assert len(out["nodes"]) == 2 and out["ok"] is False


def test_a_graph_without_nodes_read_from_a_file_audits_as_it_does_in_memory(tmp_path):
    """Review: a valid model whose output is an initializer (no nodes) was "not a readable ONNX model" from a path,
    clean in memory. Oracle: onnx.checker's full check passes and onnxruntime runs it. An empty file is still
    refused."""
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.ones(2, np.float32), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "nodeless.onnx"
    onnx.save(model, path)
    np.testing.assert_array_equal(ort.InferenceSession(str(path)).run(None, {})[0], np.ones(2, np.float32))
    for target in (model, path):
        report = audit(target)
        assert report.ok and [f.code for f in report.findings] == ["no_bn"]
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        audit(tmp_path / "empty.onnx")
