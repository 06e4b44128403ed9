"""bnkit.onnx on BatchNormalization and Dropout inside ONNX local functions (as torch.onnx.export writes a module
given in export_modules_as_functions): the audit finds NaN, never-updated and training-mode statistics there and
names them after the call, reads each call's own initializers and reference attributes (through nested functions,
defaults and If bodies), reads a function body with its own opset, and the fold leaves such a BN with the reason
(refusing to switch it to inference) while seeding random nodes inside functions for its check.

Oracles: onnxruntime on the unfolded graph, onnx.checker, the statistics and eps put in by hand (and each PyTorch
instance's), a float64 NumPy BatchNormalization.
"""
from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _helpers import bn_initializers, bn_node, ort_run, rel, strict_json, value_info
from onnx import AttributeProto, TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from bnkit.onnx import audit, fold

runner = CliRunner()


class Block(nn.Module):
    """A module torch.onnx.export(export_modules_as_functions={Block}) writes as a local function."""

    def __init__(self, dropout: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.b = nn.BatchNorm1d(4)
        self.d = nn.Dropout(0.5) if dropout else nn.Identity()

    def forward(self, x):
        return self.d(torch.relu(self.b(self.fc(x))))


def _function_export(model: nn.Module, training: bool = False, opset: int = 15) -> onnx.ModelProto:
    buffer = io.BytesIO()
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(4, 6),), buffer, dynamo=False, opset_version=opset, training=mode,
                          export_modules_as_functions={Block}, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    proto = onnx.load_from_string(buffer.getvalue())
    assert proto.functions and any(f.name == "Block" for f in proto.functions)  # the test's premise
    assert "BatchNormalization" not in [n.op_type for n in proto.graph.node]
    return proto


def _call_name(proto: onnx.ModelProto) -> str:
    return next(n.name for n in proto.graph.node if n.op_type == "Block")


@functools.lru_cache(maxsize=None)
def _nan_function_model() -> bytes:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].b.running_mean.uniform_(-1, 1)
        model[0].b.running_var.uniform_(0.5, 2)
        model[0].b.running_var[1] = float("nan")
    return _function_export(model.eval()).SerializeToString()


def test_nan_running_var_inside_a_local_function_is_an_error_named_after_the_call():
    proto = onnx.load_from_string(_nan_function_model())
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    assert np.isnan(ort_run(proto, {"x": x})[0]).all()  # onnxruntime: the model's outputs are NaN
    report = audit(proto)
    assert not report.ok
    errors = [f for f in report.findings if f.severity == "error"]
    assert [f.code for f in errors] == ["non_finite"]
    assert errors[0].layer.startswith(_call_name(proto) + "/")
    assert len(report.nodes) == 1 and report.nodes[0]["channels"] == 4


def test_cli_audit_exits_one_on_a_nan_inside_a_local_function(tmp_path):
    from bnkit.cli import app

    path = tmp_path / "func.onnx"
    path.write_bytes(_nan_function_model())
    result = runner.invoke(app, ["audit", str(path), "--json"])
    assert result.exit_code == 1, result.output
    report = strict_json(result.output)
    assert not report["ok"] and [f["code"] for f in report["findings"] if f["severity"] == "error"] == ["non_finite"]


def test_never_updated_statistics_inside_a_local_function_are_found():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Linear(4, 2)).eval()  # a fresh BatchNorm1d: mean 0, var 1
    bn = model[0].b
    assert torch.equal(bn.running_mean, torch.zeros(4)) and torch.equal(bn.running_var, torch.ones(4))
    proto = _function_export(model)
    report = audit(proto)
    never = [f for f in report.findings if f.code == "never_updated"]
    assert len(never) == 1 and never[0].severity == "error" and not report.ok
    assert never[0].layer.startswith(_call_name(proto) + "/")


@functools.lru_cache(maxsize=None)
def _training_function_model(dropout: bool) -> bytes:
    torch.manual_seed(0)
    return _function_export(nn.Sequential(Block(dropout), nn.Linear(4, 2)), training=True).SerializeToString()


def _function_nodes(proto: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for f in proto.functions for n in f.node if n.op_type == op_type]


def test_training_mode_bn_inside_a_local_function_is_reported_and_to_inference_refuses(tmp_path):
    proto = onnx.load_from_string(_training_function_model(False))
    bn, = _function_nodes(proto, "BatchNormalization")
    assert helper.get_attribute_value(next(a for a in bn.attribute if a.name == "training_mode")) == 1  # premise
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    # onnxruntime: batch statistics, so one sample's output depends on the rest of the batch
    assert rel(ort_run(proto, {"x": x})[0][:1], ort_run(proto, {"x": x[:1]})[0]) > 1e-3

    report = audit(proto)
    training = [f for f in report.findings if f.code == "training_mode"]
    assert len(training) == 1 and training[0].layer.startswith(_call_name(proto) + "/")
    assert [n["training"] for n in report.nodes] == [True]

    src, out = tmp_path / "train.onnx", tmp_path / "inference.onnx"
    onnx.save(proto, src)
    with pytest.raises(ValueError, match="local function"):
        fold(src, out, to_inference=True)
    assert not out.exists()


def test_training_dropout_inside_a_local_function_gets_the_dropout_warning():
    proto = onnx.load_from_string(_training_function_model(True))
    assert _function_nodes(proto, "Dropout")  # premise: the Dropout is in the function body
    assert "Dropout" not in [n.op_type for n in proto.graph.node]
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    runs = [session.run(None, {"x": x})[0] for _ in range(4)]  # onnxruntime: random masks
    assert any(not np.array_equal(runs[0], r) for r in runs[1:])
    report = audit(proto)
    dropout = [f for f in report.findings if f.code == "dropout_training"]
    assert len(dropout) == 1 and dropout[0].severity == "warning"
    assert "local function" in dropout[0].fix


def _two_call_model(bad_second: bool, rng) -> onnx.ModelProto:
    """One local function (Conv + BatchNormalization), called twice with its own initializers each (``a``, ``c``),
    and a foldable Conv + BatchNormalization in the main graph (``t``)."""
    c = 3
    fn = helper.make_function(
        "local", "ConvBN", ["x", "w", "s", "b", "m", "v"], ["y"],
        [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1]),
         helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["y"], name="bn")],
        opset_imports=[helper.make_opsetid("", 15)])
    var_c = rng.uniform(0.5, 2.0, c)
    if bad_second:
        var_c[2] = np.nan
    inits = ([numpy_helper.from_array(rng.standard_normal((c, 2, 3)).astype(np.float32), k + "w") for k in "ac"]
             + [numpy_helper.from_array(rng.standard_normal((c, 2, 3)).astype(np.float32), "tw")]
             + bn_initializers("a", c, rng) + bn_initializers("c", c, rng, var=var_c) + bn_initializers("t", c, rng))
    nodes = [helper.make_node("ConvBN", ["x", "aw", "as", "ab", "am", "av"], ["y1"], domain="local", name="first"),
             helper.make_node("ConvBN", ["x", "cw", "cs", "cb", "cm", "cv"], ["y2"], domain="local", name="second"),
             helper.make_node("Conv", ["x", "tw"], ["h3"], pads=[1, 1], name="conv"), bn_node("h3", "y3", "t")]
    graph = helper.make_graph(nodes, "g", [value_info("x", ["N", 2, 5])],
                              [value_info(y, ["N", c, 5]) for y in ("y1", "y2", "y3")], inits)
    model = helper.make_model(graph, ir_version=8, functions=[fn],
                              opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("local", 1)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_two_calls_of_one_function_are_audited_each_with_its_own_initializers():
    model = _two_call_model(bad_second=True, rng=np.random.default_rng(1))
    x = np.random.default_rng(2).standard_normal((2, 2, 5)).astype(np.float32)
    y1, y2, _ = ort_run(model, {"x": x})  # onnxruntime: only the second call's channel 2 is NaN
    assert np.isfinite(y1).all() and np.isnan(y2[:, 2]).all() and np.isfinite(y2[:, :2]).all()

    report = audit(model)
    names = [n["name"] for n in report.nodes]
    assert len(names) == 3 and sum(n.startswith("first/") for n in names) == 1
    assert sum(n.startswith("second/") for n in names) == 1
    errors = [f for f in report.findings if f.severity == "error"]
    assert len(errors) == 1 and errors[0].code == "non_finite" and errors[0].layer.startswith("second/")
    clean = audit(_two_call_model(bad_second=False, rng=np.random.default_rng(1)))
    assert clean.ok and len(clean.nodes) == 3


def test_fold_leaves_bn_inside_a_local_function_and_the_written_graph_matches(tmp_path):
    model = _two_call_model(bad_second=False, rng=np.random.default_rng(3))
    src, out = tmp_path / "f.onnx", tmp_path / "f_folded.onnx"
    onnx.save(model, src)
    report = fold(src, out)
    assert report.verified
    assert [f.bn for f in report.folded] == ["tbn"]
    assert len(report.left) == 2 and all("inside local function" in why for why in report.left.values())
    assert sorted(k.split("/")[0] for k in report.left) == ["first", "second"]
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    assert "BatchNormalization" not in [n.op_type for n in written.graph.node]
    x = np.random.default_rng(4).standard_normal((3, 2, 5)).astype(np.float32)
    for want, got in zip(ort_run(model, {"x": x}), ort_run(written, {"x": x})):
        assert rel(got, want) < 1e-5


def test_function_bodies_read_reference_attributes_from_each_call(tmp_path):
    """Two instances of one module with different eps make the exporter write epsilon as a reference attribute
    (ref_attr_name) of the function body: the audit reads it from each call (not 'Cannot get value of reference
    attribute').
    Oracle: each PyTorch instance's eps and statistics; onnxruntime's output is NaN where the NaN variance is."""

    class Block(nn.Module):
        def __init__(self, eps):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, eps=eps)

        def forward(self, x):
            return self.bn(self.conv(x))

    torch.manual_seed(0)
    model = nn.Sequential(Block(1e-5), Block(1e-1)).eval()
    with torch.no_grad():
        for block in model:
            block.bn.running_mean.uniform_(-1, 1)
            block.bn.running_var.uniform_(0.5, 2)
        model[1].bn.running_var[1] = float("nan")
    path = tmp_path / "fn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 4, 4),), str(path), dynamo=False, opset_version=17,
                          export_modules_as_functions={Block}, do_constant_folding=False)
    proto = onnx.load(path)
    refs = [a.ref_attr_name for f in proto.functions for n in f.node for a in n.attribute if a.ref_attr_name]
    assert refs  # premise: the body refers to its caller for epsilon
    out = ort_run(proto, {proto.graph.input[0].name: np.ones((2, 3, 4, 4), np.float32)})[0]
    assert np.isnan(out[:, 1]).all() and np.isfinite(out[:, [0, 2]]).all()
    report = audit(path)
    assert [n["epsilon"] for n in report.nodes] == pytest.approx([1e-5, 1e-1], rel=1e-6)
    (bad,) = [f for f in report.findings if f.severity == "error"]
    assert bad.code == "non_finite" and bad.layer.startswith("/1/")


def _bn_function(name, body_nodes, inputs, attributes=(), defaults=()):
    return helper.make_function("local", name, inputs, ["y"], body_nodes,
                                [helper.make_opsetid("", 15), helper.make_opsetid("local", 1)],
                                attributes=list(attributes), attribute_protos=list(defaults))


def _bn_ref(epsilon_ref):
    """A BatchNormalization node whose epsilon refers to the function attribute ``epsilon_ref``."""
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])
    node.attribute.append(helper.make_attribute_ref("epsilon", AttributeProto.FLOAT))
    node.attribute[-1].ref_attr_name = epsilon_ref
    return node


def _calling_model(functions, call):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("s", rng.uniform(0.5, 1.5, 3)), ("b", rng.normal(size=3)), ("m", rng.normal(size=3)),
              ("v", rng.uniform(0.5, 2, 3)))]
    graph = helper.make_graph([call], "g", [value_info("x", [2, 3, 4])], [value_info("y", [2, 3, 4])], inits)
    return helper.make_model(graph, ir_version=8, functions=functions,
                             opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("local", 1)])


def test_reference_attributes_through_nested_functions_and_function_defaults():
    """A reference passed through a function that calls another, and a function's declared default (beyond one
    level of call). Oracle: onnxruntime's output equals BatchNormalization with that
    epsilon, and the audit reads the same epsilon."""
    from bnkit.onnx.graph import bn_nodes, local_functions, opset_version

    inner = _bn_function("Inner", [_bn_ref("eps")], ["x", "s", "b", "m", "v"], attributes=["eps"])
    passing = helper.make_node("Inner", ["x", "s", "b", "m", "v"], ["y"], domain="local")
    passing.attribute.append(helper.make_attribute_ref("eps", AttributeProto.FLOAT))
    passing.attribute[-1].ref_attr_name = "eps2"
    outer = _bn_function("Outer", [passing], ["x", "s", "b", "m", "v"], attributes=["eps2"])
    call = helper.make_node("Outer", ["x", "s", "b", "m", "v"], ["y"], domain="local", eps2=0.3)
    defaulted = _bn_function("Defaulted", [_bn_ref("epsilon")], ["x", "s", "b", "m", "v"],
                             defaults=[helper.make_attribute("epsilon", 0.1)])
    plain_call = helper.make_node("Defaulted", ["x", "s", "b", "m", "v"], ["y"], domain="local")
    for model, eps in ((_calling_model([inner, outer], call), 0.3), (_calling_model([defaulted], plain_call), 0.1)):
        onnx.checker.check_model(model)
        (node,) = bn_nodes(model.graph, opset_version(model), functions=local_functions(model))
        assert node.epsilon == pytest.approx(eps)
        x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
        inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
        want = ((x - inits["m"][:, None]) / np.sqrt(inits["v"][:, None] + eps) * inits["s"][:, None]
                + inits["b"][:, None])
        np.testing.assert_allclose(ort_run(model, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


def test_random_nodes_inside_local_functions_are_seeded_for_verification():
    """Random nodes inside function bodies are seeded too (else a fold's check would compare independent draws).
    Oracle: the seeded copy's function node carries a seed, and it runs."""
    from bnkit.onnx.fold import _seeded

    body = [helper.make_node("RandomNormalLike", ["x"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])]
    sampler = helper.make_function("local", "Sampler", ["x"], ["y"], body, [helper.make_opsetid("", 15)])
    call = helper.make_node("Sampler", ["x"], ["y"], domain="local")
    graph = helper.make_graph([call], "g", [value_info("x", [64])], [value_info("y", [64])])
    model = helper.make_model(graph, ir_version=8, functions=[sampler],
                              opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("local", 1)])
    seeded = _seeded(model, 15)
    (node,) = [n for f in seeded.functions for n in f.node if n.op_type == "RandomNormalLike"]
    assert [helper.get_attribute_value(a) for a in node.attribute if a.name == "seed"] == [1.0]
    assert ort_run(seeded, {"x": np.zeros(64, np.float32)})[0].shape == (64,)
    assert not [a for f in model.functions for n in f.node for a in n.attribute]  # the input is not modified


def test_castlike_constants_take_the_targets_type_and_a_recursive_function_is_not_followed_round():
    """A CastLike constant takes its target's type, and a (malformed) function that calls itself is not followed
    round. Oracle: NumPy's cast; bn_nodes returns the BN once."""
    from bnkit.onnx.graph import GraphIndex, bn_nodes

    nodes = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array(2, np.int64))),
             helper.make_node("CastLike", ["k", "x"], ["kf"]),
             helper.make_node("Shape", ["w"], ["n"], start=0, end=1),
             helper.make_node("Expand", ["kf", "n"], ["bias"]),
             helper.make_node("Add", ["x", "bias"], ["y"])]
    graph = helper.make_graph(nodes, "g", [value_info("x", [2, 3])], [value_info("y", [2, 3])],
                              [numpy_helper.from_array(np.zeros((3, 5), np.float32), "w")])
    bias = GraphIndex(graph).constant("bias")
    assert bias.dtype == np.float32 and np.array_equal(bias, np.full(3, 2.0, np.float32))

    body = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["t"]),
            helper.make_node("Loopy", ["t", "s", "b", "m", "v"], ["y"], domain="local")]
    loopy = helper.make_function("local", "Loopy", ["x", "s", "b", "m", "v"], ["y"], body,
                                 [helper.make_opsetid("", 15), helper.make_opsetid("local", 1)])
    model = _calling_model([loopy], helper.make_node("Loopy", ["x", "s", "b", "m", "v"], ["y"], domain="local"))
    from bnkit.onnx.graph import local_functions

    (node,) = bn_nodes(model.graph, 15, functions=local_functions(model))
    assert node.in_function == "Loopy"


def test_a_function_body_is_read_with_its_own_opset():
    """A function importing opset 9 inside an opset-15 model is read with its own rules, not the model's: its
    BatchNormalization asking for running-statistic outputs (opset 9's training mode) is training, not inference."""
    from bnkit.onnx.graph import bn_nodes, local_functions

    body = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv", "sm", "sv"])]
    old = helper.make_function("local", "Old", ["x", "s", "b", "m", "v"], ["y"], body, [helper.make_opsetid("", 9)])
    model = _calling_model([old], helper.make_node("Old", ["x", "s", "b", "m", "v"], ["y"], domain="local"))
    (node,) = bn_nodes(model.graph, 15, functions=local_functions(model))
    assert node.opset == 9 and node.training


def test_a_reference_attribute_inside_an_if_body_of_a_function_is_read_from_the_call():
    """A BN in an If branch inside a function reads its referenced epsilon through the function's
    call (the branch's own index has no call)."""
    from bnkit.onnx.graph import bn_nodes, local_functions

    branch = helper.make_graph([_bn_ref("eps")], "then", [], [value_info("y", [2, 3, 4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "else", [], [value_info("y", [2, 3, 4])])
    body = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
            helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)]
    fn = _bn_function("Branchy", body, ["x", "s", "b", "m", "v"], attributes=["eps"])
    call = helper.make_node("Branchy", ["x", "s", "b", "m", "v"], ["y"], domain="local", eps=0.25)
    model = _calling_model([fn], call)
    (node,) = bn_nodes(model.graph, 15, functions=local_functions(model))
    assert node.epsilon == pytest.approx(0.25)


def _var_through_function(var_node, call_attrs):
    """A call of function ``Blk`` whose BatchNormalization reads its variance from ``var_node`` (a node of the body
    that writes ``v``, its attributes referring to the call's ``call_attrs``); mean 0.5 on channel 0."""
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=0.0)
    blk = _bn_function("Blk", [var_node, bn], ["x", "s", "b", "m"], attributes=sorted(call_attrs))
    call = helper.make_node("Blk", ["x", "s", "b", "m"], ["y"], domain="local", **call_attrs)
    inits = [numpy_helper.from_array(np.array(a, np.float32), n)
             for n, a in (("s", [1, 1, 1]), ("b", [0, 0, 0]), ("m", [0.5, 0, 0]))]
    graph = helper.make_graph([call], "g", [value_info("x", [2, 3, 4])], [value_info("y", [2, 3, 4])], inits)
    return helper.make_model(graph, ir_version=8, functions=[blk],
                             opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("local", 1)])


def _ref(node, name, kind, ref):
    node.attribute.append(helper.make_attribute_ref(name, kind))
    node.attribute[-1].ref_attr_name = ref
    return node


@pytest.mark.parametrize("how", ["value", "value_floats", "cast_to"])
@pytest.mark.parametrize("var", [[0.5, 1.0, 2.0], [0.0, 1.0, 1.0]])
def test_statistics_from_constants_whose_attributes_refer_to_the_call(how, var, tmp_path):
    """Constant(value=@var), Constant(value_floats=@var) and Cast(to=@dt) in a function body read the call's
    attribute: the audit reported a valid model's variance as unreadable (a false error hiding a real one), as
    shaped (0,), or raised ValueError out of the API (review). Oracles: onnx.checker, onnxruntime's output against
    the float64 closed form, and the zero variance with eps 0 that gives it NaN/Inf."""
    if how == "value":
        node = _ref(helper.make_node("Constant", [], ["v"]), "value", AttributeProto.TENSOR, "var")
        attrs = {"var": numpy_helper.from_array(np.array(var, np.float32))}
    elif how == "value_floats":
        node = _ref(helper.make_node("Constant", [], ["v"]), "value_floats", AttributeProto.FLOATS, "var")
        attrs = {"var": [float(v) for v in var]}
    else:  # float16 storage cast to float32 by the call's element type
        node = _ref(helper.make_node("Cast", ["v16"], ["v"]), "to", AttributeProto.INT, "dt")
        attrs = {"dt": onnx.TensorProto.FLOAT}
    model = _var_through_function(node, attrs)
    if how == "cast_to":
        model.graph.initializer.append(numpy_helper.from_array(np.array(var, np.float16), "v16"))
        model.graph.node[0].input.append("v16")
        model.functions[0].input.append("v16")
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(2).standard_normal((2, 3, 4)).astype(np.float32)
    out = ort_run(model, {"x": x})[0]
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    report = audit(path)
    assert [f.code for f in report.findings if f.code == "malformed_node"] == []
    errors = [f.code for f in report.findings if f.severity == "error"]
    if var[0] == 0.0:
        assert not np.isfinite(out[:, 0]).all()  # onnxruntime: (x - 0.5) / sqrt(0 + 0)
        assert errors == ["zero_var"], report.findings
    else:
        want = (x.astype(np.float64) - np.array([0.5, 0, 0])[:, None]) / np.sqrt(np.array(var))[:, None]
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        assert errors == [] and report.nodes[0]["channels"] == 3, report.findings
        fold(path, tmp_path / "f.onnx")  # reads the same statistics, and verifies itself with onnxruntime
        np.testing.assert_allclose(ort_run(onnx.load(tmp_path / "f.onnx"), {"x": x})[0], out, rtol=1e-5, atol=1e-6)


def test_a_sparse_constant_statistic_is_read_as_the_dense_tensor_it_stands_for(tmp_path):
    """Constant(sparse_value=...) holding var [0, 1, 1] with eps 0: the audit called it 'computed at run time' and
    passed a graph whose channel 0 onnxruntime makes NaN (review); a sparse initializer of the same values was
    already an error. Oracle: onnxruntime's output."""
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0, 1.0], np.float32), "vals"),
                                       numpy_helper.from_array(np.array([1, 2], np.int64), "idx"), [3])
    const = helper.make_node("Constant", [], ["v"], sparse_value=sparse)
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=0.0)
    inits = [numpy_helper.from_array(np.array(a, np.float32), n)
             for n, a in (("s", [1, 1, 1]), ("b", [0, 0, 0]), ("m", [0.5, 0, 0]))]
    graph = helper.make_graph([const, bn], "g", [value_info("x", [2, 3, 4])], [value_info("y", [2, 3, 4])], inits)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    out = ort_run(model, {"x": np.ones((2, 3, 4), np.float32)})[0]
    assert not np.isfinite(out[:, 0]).all() and np.isfinite(out[:, 1:]).all()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    report = audit(path)
    assert [f.code for f in report.findings if f.severity == "error"] == ["zero_var"], report.findings
    assert "not_constant" not in {f.code for f in report.findings}


def test_a_reference_the_outer_call_leaves_unset_takes_the_inner_functions_default():
    """Outer passes its attribute eps2 on as Inner's eps; the top call leaves eps2 unset and Outer has no default:
    Inner's own default applies (the attribute is absent in the inner call), as onnxruntime runs it, where the audit
    took none and assumed eps 1e-5 (review). Oracle: onnxruntime's output against the closed form with 0.1."""
    from bnkit.onnx.graph import bn_nodes, local_functions, opset_version

    inner = _bn_function("Inner", [_bn_ref("eps")], ["x", "s", "b", "m", "v"],
                         defaults=[helper.make_attribute("eps", 0.1)])
    passing = helper.make_node("Inner", ["x", "s", "b", "m", "v"], ["y"], domain="local")
    passing.attribute.append(helper.make_attribute_ref("eps", AttributeProto.FLOAT))
    passing.attribute[-1].ref_attr_name = "eps2"
    outer = _bn_function("Outer", [passing], ["x", "s", "b", "m", "v"], attributes=["eps2"])
    model = _calling_model([inner, outer], helper.make_node("Outer", ["x", "s", "b", "m", "v"], ["y"], domain="local"))
    onnx.checker.check_model(model, full_check=True)
    (node,) = bn_nodes(model.graph, opset_version(model), functions=local_functions(model))
    assert node.epsilon == pytest.approx(0.1)
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    want = (x - inits["m"][:, None]) / np.sqrt(inits["v"][:, None] + 0.1) * inits["s"][:, None] + inits["b"][:, None]
    np.testing.assert_allclose(ort_run(model, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


def test_a_training_dropout_in_a_function_called_twice_is_named_after_each_call():
    """Two calls of one function whose Dropout runs in training mode gave two identical findings named after the
    body's node, where its BatchNormalization rows are named after each call (review). Oracle: onnxruntime, whose
    two runs of the graph differ, and the BN rows' own names."""
    fn = helper.make_function("local", "Blk", ["x", "s", "b", "m", "v"], ["y"], [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["t"], name="bn"),
        helper.make_node("Constant", [], ["r"], value=helper.make_tensor("r", TensorProto.FLOAT, [], [0.5])),
        helper.make_node("Constant", [], ["tm"], value=helper.make_tensor("tm", TensorProto.BOOL, [], [True])),
        helper.make_node("Dropout", ["t", "r", "tm"], ["y"], name="drop")], [helper.make_opsetid("", 17)])
    stats = [helper.make_tensor(n, TensorProto.FLOAT, [2], v)
             for n, v in (("s", [1, 1]), ("b", [0, 0]), ("m", [0.1, 0.2]), ("v", [1.5, 2.0]))]
    graph = helper.make_graph(
        [helper.make_node("Blk", ["X", "s", "b", "m", "v"], ["H"], name="block1", domain="local"),
         helper.make_node("Blk", ["H", "s", "b", "m", "v"], ["Y"], name="block2", domain="local")], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2, 64])], stats)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[fn])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones((1, 2, 64), np.float32)
    assert not np.array_equal(session.run(None, {"X": x})[0], session.run(None, {"X": x})[0])
    report = audit(model)
    assert [n["name"] for n in report.nodes] == ["block1/bn", "block2/bn"]
    assert [f.layer for f in report.findings if f.code == "dropout_training"] == ["block1/drop", "block2/drop"]
