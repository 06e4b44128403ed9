"""Review H3 (commit 7bf2be7): BatchNorm/Dropout inside local functions, random ops in fold verification,
export_onnx(verify=False) and fold --no-verify, fold names vs If bodies, dim_value -1, models over 2 GB, strict JSON.

Oracles: onnxruntime on the unfolded graph, onnx.checker, PyTorch eval output, the statistics put in by hand."""
from __future__ import annotations

import functools
import io
import json
import math
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _helpers import ort_run, rel
from onnx import AttributeProto, TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from bnkit.onnx import audit, fold, fold_model

runner = CliRunner()


def _tensor(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _bn_params(prefix: str, c: int, rng, var=None) -> list[onnx.TensorProto]:
    var = rng.uniform(0.5, 2.0, c) if var is None else np.asarray(var)
    return [numpy_helper.from_array(a.astype(np.float32), prefix + k) for a, k in
            ((rng.uniform(0.5, 1.5, c), "s"), (rng.uniform(-1, 1, c), "b"), (rng.uniform(-1, 1, c), "m"), (var, "v"))]


def _bn(x: str, y: str, prefix: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [prefix + k for k in "sbmv"], [y], name=prefix + "bn", **attrs)


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------------------------------------------------------
# 1. local functions
# ---------------------------------------------------------------------------------------------------------------

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
    report = _strict(result.output)
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
             + _bn_params("a", c, rng) + _bn_params("c", c, rng, var=var_c) + _bn_params("t", c, rng))
    nodes = [helper.make_node("ConvBN", ["x", "aw", "as", "ab", "am", "av"], ["y1"], domain="local", name="first"),
             helper.make_node("ConvBN", ["x", "cw", "cs", "cb", "cm", "cv"], ["y2"], domain="local", name="second"),
             helper.make_node("Conv", ["x", "tw"], ["h3"], pads=[1, 1], name="conv"), _bn("h3", "y3", "t")]
    graph = helper.make_graph(nodes, "g", [_tensor("x", ["N", 2, 5])],
                              [_tensor(y, ["N", c, 5]) for y in ("y1", "y2", "y3")], inits)
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


# ---------------------------------------------------------------------------------------------------------------
# 2. random ops in fold verification
# ---------------------------------------------------------------------------------------------------------------

class Sampler(nn.Module):
    """A VAE encoder's reparameterisation (torch.randn_like -> ONNX RandomNormalLike) after Linear + BatchNorm1d;
    returns the deterministic mean too."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Linear(12, 8)
        self.b = nn.BatchNorm1d(8)

    def forward(self, x):
        h = self.b(self.c(x))
        mu, logvar = h[:, :4], h[:, 4:]
        return mu, mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def _sampler() -> Sampler:
    torch.manual_seed(0)
    model = Sampler()
    with torch.no_grad():
        model.b.running_mean.uniform_(-1, 1)
        model.b.running_var.uniform_(0.5, 2)
    return model.eval()


def _with_seed(model: onnx.ModelProto, seed: float) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type.startswith("Random"):
            node.attribute.append(helper.make_attribute("seed", seed))
    return copy


def test_fold_of_a_graph_with_random_normal_like_verifies():
    model = _sampler()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 12),), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          do_constant_folding=False, dynamic_axes={"x": {0: "n"}})
    proto = onnx.load_from_string(buffer.getvalue())
    assert "RandomNormalLike" in [n.op_type for n in proto.graph.node]  # premise

    folded, report = fold_model(proto)
    assert report.verified and report.max_rel_diff < 1e-5 and len(report.folded) == 1
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    x = np.random.default_rng(0).standard_normal((3, 12)).astype(np.float32)
    mu_ort, z_ort = ort_run(folded, {"x": x})
    with torch.no_grad():
        mu_torch = model(torch.from_numpy(x))[0].numpy()
    assert rel(mu_ort, mu_torch) < 1e-5  # PyTorch eval output for the deterministic part
    # the same seed in both graphs: the sample is the same too (onnxruntime on the original)
    assert rel(ort_run(_with_seed(folded, 7.0), {"x": x})[1], ort_run(_with_seed(proto, 7.0), {"x": x})[1]) < 1e-5


def _random_graph(extra_node: bool) -> onnx.ModelProto:
    """Opset 10: two RandomNormal nodes (opset 1) of one shape and a Dropout-10 (which has no seed attribute);
    ``extra_node``: an Identity first, which changes what unseeded nodes draw in onnxruntime (as a fold does)."""
    nodes = [helper.make_node("Identity", ["x"], ["x0"])] if extra_node else []
    nodes += [helper.make_node("RandomNormal", [], ["r1"], shape=[64], dtype=TensorProto.FLOAT),
              helper.make_node("RandomNormal", [], ["r2"], shape=[64], dtype=TensorProto.FLOAT),
              helper.make_node("Dropout", ["x0" if extra_node else "x"], ["d"], ratio=0.5),
              helper.make_node("Add", ["r1", "d"], ["a"])]
    graph = helper.make_graph(nodes, "g", [_tensor("x", [64])], [_tensor("a", [64]), _tensor("r2", [64])])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 10)])
    onnx.checker.check_model(model)
    return model


def test_seeded_copies_of_two_graphs_draw_the_same_numbers_and_old_dropout_gets_no_seed():
    from bnkit.onnx.fold import _seeded

    x = np.zeros(64, np.float32)
    plain = [ort_run(_random_graph(extra), {"x": x}) for extra in (False, True)]
    assert not np.allclose(plain[0][1], plain[1][1])  # premise: unseeded, the two graphs draw different numbers
    seeded = [_seeded(_random_graph(extra), 10) for extra in (False, True)]
    for copy in seeded:
        onnx.checker.check_model(copy)
        dropout = next(n for n in copy.graph.node if n.op_type == "Dropout")
        assert "seed" not in [a.name for a in dropout.attribute]  # Dropout-10 has no seed attribute
    first, second = (ort_run(copy, {"x": x}) for copy in seeded)  # onnxruntime loads both
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert 0.3 < np.std(first[0]) < 3  # still standard-normal draws


def test_seeded_copy_gives_two_random_nodes_different_draws():
    from bnkit.onnx.fold import _seeded

    seeded = _seeded(_random_graph(False), 10)
    seeds = [helper.get_attribute_value(a) for n in seeded.graph.node if n.op_type == "RandomNormal"
             for a in n.attribute if a.name == "seed"]
    assert len(seeds) == 2 and seeds[0] != seeds[1]
    r1, r2 = ort_run(seeded, {"x": np.zeros(64, np.float32)})
    # onnxruntime: the two nodes draw different numbers (seeds 0 and 1 draw the same ones there: its engine
    # takes a seed of 0 as 1)
    assert not np.allclose(r1, r2)


# ---------------------------------------------------------------------------------------------------------------
# 3. export_onnx(verify=...) and bnkit fold --model ... --no-verify
# ---------------------------------------------------------------------------------------------------------------

def test_export_onnx_verify_false_writes_a_random_graph_and_verify_true_names_the_random_op(tmp_path):
    from bnkit.torch.export import ExportVerificationError, export_onnx

    model = _sampler()
    x = torch.randn(4, 12)
    bad = tmp_path / "verified.onnx"
    with pytest.raises(ExportVerificationError, match="RandomNormalLike"):
        export_onnx(model, x, bad, fold=True)
    assert not bad.exists()

    path = tmp_path / "sampler.onnx"
    report = export_onnx(model, x, path, fold=True, verify=False)
    assert report.max_abs_diff is None and report.max_rel_diff is None
    written = onnx.load(path)
    onnx.checker.check_model(written)
    assert "RandomNormalLike" in [n.op_type for n in written.graph.node]
    mu, z = ort_run(written, {n.name: x.numpy() for n in written.graph.input})
    with torch.no_grad():
        assert rel(mu, model(x)[0].numpy()) < 1e-5
    assert z.shape == (4, 4) and np.isfinite(z).all()


SAMPLER_MODULE = """
import torch
from torch import nn


class Sampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Linear(12, 8)
        self.b = nn.BatchNorm1d(8)
        with torch.no_grad():
            self.b.running_mean.uniform_(-1, 1)
            self.b.running_var.uniform_(0.5, 2)

    def forward(self, x):
        h = self.b(self.c(x))
        mu, logvar = h[:, :4], h[:, 4:]
        return mu, mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def make():
    torch.manual_seed(0)
    return Sampler()
"""


def test_cli_fold_model_no_verify_exports_a_random_graph(tmp_path, monkeypatch):
    from bnkit.cli import app

    name = "review12_sampler_mod"
    (tmp_path / f"{name}.py").write_text(SAMPLER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    out = tmp_path / "sampler.onnx"
    try:
        result = runner.invoke(app, ["fold", "--model", f"{name}:make", "--input-shape", "4x12", "-o", str(out),
                                     "--no-verify"], terminal_width=200)
        assert result.exit_code == 0, result.output
        written = onnx.load(out)
        assert "RandomNormalLike" in [n.op_type for n in written.graph.node]
        x = np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)
        mu, z = ort_run(written, {written.graph.input[0].name: x})
        module = sys.modules[name]
        with torch.no_grad():
            assert rel(mu, module.make().eval()(torch.from_numpy(x))[0].numpy()) < 1e-5  # PyTorch eval output
        assert np.isfinite(z).all()
    finally:
        sys.modules.pop(name, None)


# ---------------------------------------------------------------------------------------------------------------
# 4. fold names vs values an If branch computes
# ---------------------------------------------------------------------------------------------------------------

def test_fold_name_does_not_shadow_a_value_an_if_branch_computes():
    rng = np.random.default_rng(0)
    c = 4
    # W is read by two Convs, so folding conv's BN copies it under a new name, "conv.W_folded" at first choice:
    # the then-branch already computes a value of that name
    then_g = helper.make_graph([helper.make_node("Relu", ["y1"], ["conv.W_folded"]),
                                helper.make_node("Identity", ["conv.W_folded"], ["t"])],
                               "then", [], [_tensor("t", ["N", c, 4, 4])])
    else_g = helper.make_graph([helper.make_node("Identity", ["y2"], ["e"])], "else", [],
                               [_tensor("e", ["N", c, 4, 4])])
    nodes = [helper.make_node("Conv", ["x", "W"], ["c1"], name="conv"),
             helper.make_node("Conv", ["x", "W"], ["c2"], name="conv2"),
             _bn("c1", "y1", "a"), _bn("c2", "y2", "b"),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [_tensor("x", ["N", 2, 6, 6]), _tensor("cond", [], TensorProto.BOOL)],
                              [_tensor("y", ["N", c, 4, 4])],
                              [numpy_helper.from_array(rng.standard_normal((c, 2, 3, 3)).astype(np.float32), "W")]
                              + _bn_params("a", c, rng) + _bn_params("b", c, rng))
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)

    folded, report = fold_model(model)
    assert report.verified and len(report.folded) == 2
    onnx.checker.check_model(folded, full_check=True)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    x = rng.standard_normal((3, 2, 6, 6)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        assert rel(ort_run(folded, feeds)[0], ort_run(model, feeds)[0]) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# 5. dim_value -1
# ---------------------------------------------------------------------------------------------------------------

def _conv_bn(batch_dim) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), _bn("c", "y", "a")], "g",
                              [_tensor("x", [batch_dim, 2, 6, 6])], [_tensor("y", [batch_dim, 4, 4, 4])],
                              [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "W")]
                              + _bn_params("a", 4, rng))
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13)])


def test_dim_value_minus_one_is_dynamic_and_zero_is_still_empty():
    from bnkit.onnx.verify import random_inputs

    model = _conv_bn(-1)
    onnx.checker.check_model(model, full_check=True)
    x5 = np.random.default_rng(1).standard_normal((5, 2, 6, 6)).astype(np.float32)
    original = ort_run(model, {"x": x5})[0]  # onnxruntime takes -1 as dynamic
    assert random_inputs(model, dynamic_size=3)["x"].shape == (3, 2, 6, 6)

    folded, report = fold_model(model)
    assert report.verified and report.input_shapes == {"x": [2, 2, 6, 6]}
    assert rel(ort_run(folded, {"x": x5})[0], original) < 1e-5
    _, report = fold_model(model, input_shapes={"x": [3, 2, 6, 6]})
    assert report.verified and report.input_shapes == {"x": [3, 2, 6, 6]}

    empty = _conv_bn(0)
    with pytest.raises(ValueError, match="empty"):
        random_inputs(empty)
    with pytest.raises(ValueError, match="empty"):
        fold_model(empty)


# ---------------------------------------------------------------------------------------------------------------
# 6. models over protobuf's 2 GB limit (the limit made small)
# ---------------------------------------------------------------------------------------------------------------

def test_over_the_protobuf_limit_audit_checks_by_path_and_fold_refuses(tmp_path, monkeypatch):
    import bnkit.onnx.graph as graph_module

    model = _conv_bn("N")
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([1, np.nan, 1, 1], np.float32), "av"))
    path = tmp_path / "big.onnx"
    onnx.save(model, path)
    invalid = _conv_bn("N")
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


# ---------------------------------------------------------------------------------------------------------------
# 7. strict JSON
# ---------------------------------------------------------------------------------------------------------------

def _eps_model(path) -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             _bn("c", "y1", "a", epsilon=float("nan")), _bn("y1", "y", "b", epsilon=float("inf"))]
    graph = helper.make_graph(nodes, "g", [_tensor("x", ["N", 2, 6, 6])], [_tensor("y", ["N", 4, 4, 4])],
                              [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "W")]
                              + _bn_params("a", 4, rng) + _bn_params("b", 4, rng))
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13)]), path)


def test_cli_audit_json_is_strict_json_with_nan_and_inf_epsilon(tmp_path):
    from bnkit.cli import app

    path = tmp_path / "eps.onnx"
    _eps_model(path)
    result = runner.invoke(app, ["audit", str(path), "--json"])
    assert result.exit_code == 1
    report = _strict(result.output)
    assert not report["ok"] and sorted(report["layers"]) == ["abn", "bbn"]
    eps = {f["layer"]: float(f["data"]["eps"]) for f in report["findings"] if f["code"] == "bad_eps"}
    assert sorted(eps) == ["abn", "bbn"] and math.isnan(eps["abn"]) and eps["bbn"] == math.inf


def test_onnx_audit_report_to_dict_is_strict_json(tmp_path):
    path = tmp_path / "eps.onnx"
    _eps_model(path)
    report = audit(path)
    assert {f.code for f in report.findings if f.severity == "error"} == {"bad_eps"}
    out = _strict(json.dumps(report.to_dict(), allow_nan=False))
    assert len(out["nodes"]) == 2 and out["ok"] is False


def test_jsonable_and_the_torch_audit_report_are_strict_json():
    from bnkit.findings import Finding, jsonable
    from bnkit.torch.audit import AuditReport
    from bnkit.torch.audit import audit as torch_audit

    nested = {"a": [1.5, (np.float32(2.5), np.int64(3))], "b": np.array([[1.0, np.nan]]),
              "c": torch.tensor([float("-inf"), 2.0]), 7: {"d": float("nan"), "e": "text", "f": None, "g": True}}
    out = json.loads(json.dumps(jsonable(nested), allow_nan=False))
    want = {"a": [1.5, [2.5, 3]], "b": [[1.0, str(float("nan"))]], "c": [str(float("-inf")), 2.0],
            "7": {"d": str(float("nan")), "e": "text", "f": None, "g": True}}
    assert out == want
    assert isinstance(out["a"][1][1], int)

    bn = nn.BatchNorm1d(3, eps=float("nan")).eval()
    with torch.no_grad():
        bn.running_var[0] = float("inf")
    report = torch_audit(nn.Sequential(nn.Linear(2, 3), bn))
    assert not report.ok
    _strict(json.dumps(report.to_dict(), allow_nan=False))
    var = torch.tensor([float("nan"), 1.0])
    made = AuditReport("m", "state", layers=["bn"], findings=[Finding("error", "bn", "x", code="c", data={"var": var})])
    assert _strict(json.dumps(made.to_dict(), allow_nan=False))["findings"][0]["data"]["var"][1] == 1.0


def test_function_bodies_read_reference_attributes_from_each_call(tmp_path):
    """Review R: two instances of one module with different eps make the exporter write epsilon as a reference
    attribute (ref_attr_name) of the function body; the audit raised 'Cannot get value of reference attribute'.
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
    graph = helper.make_graph([call], "g", [_tensor("x", [2, 3, 4])], [_tensor("y", [2, 3, 4])], inits)
    return helper.make_model(graph, ir_version=8, functions=functions,
                             opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("local", 1)])


def test_reference_attributes_through_nested_functions_and_function_defaults():
    """Mutation M9: a reference passed through a function that calls another, and a function's declared default,
    were not covered (only one level of call). Oracle: onnxruntime's output equals BatchNormalization with that
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
    """Mutation M9: the seeding of random nodes inside function bodies could be dropped unnoticed (a fold's check
    would then compare independent draws). Oracle: the seeded copy's function node carries a seed, and it runs."""
    from bnkit.onnx.fold import _seeded

    body = [helper.make_node("RandomNormalLike", ["x"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])]
    sampler = helper.make_function("local", "Sampler", ["x"], ["y"], body, [helper.make_opsetid("", 15)])
    call = helper.make_node("Sampler", ["x"], ["y"], domain="local")
    graph = helper.make_graph([call], "g", [_tensor("x", [64])], [_tensor("y", [64])])
    model = helper.make_model(graph, ir_version=8, functions=[sampler],
                              opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("local", 1)])
    seeded = _seeded(model, 15)
    (node,) = [n for f in seeded.functions for n in f.node if n.op_type == "RandomNormalLike"]
    assert [helper.get_attribute_value(a) for a in node.attribute if a.name == "seed"] == [1.0]
    assert ort_run(seeded, {"x": np.zeros(64, np.float32)})[0].shape == (64,)
    assert not [a for f in model.functions for n in f.node for a in n.attribute]  # the input is not modified


def test_castlike_constants_take_the_targets_type_and_a_recursive_function_is_not_followed_round():
    """Mutation M9: CastLike's target type could be ignored, and a (malformed) function that calls itself was
    only guarded by a check no test reached. Oracle: NumPy's cast; bn_nodes returns the BN once."""
    from bnkit.onnx.graph import GraphIndex, bn_nodes

    nodes = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array(2, np.int64))),
             helper.make_node("CastLike", ["k", "x"], ["kf"]),
             helper.make_node("Shape", ["w"], ["n"], start=0, end=1),
             helper.make_node("Expand", ["kf", "n"], ["bias"]),
             helper.make_node("Add", ["x", "bias"], ["y"])]
    graph = helper.make_graph(nodes, "g", [_tensor("x", [2, 3])], [_tensor("y", [2, 3])],
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
    """Mutation M9: a function importing opset 9 inside an opset-15 model was read with the model's rules: its
    BatchNormalization asking for running-statistic outputs (opset 9's training mode) looked like inference."""
    from bnkit.onnx.graph import bn_nodes, local_functions

    body = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv", "sm", "sv"])]
    old = helper.make_function("local", "Old", ["x", "s", "b", "m", "v"], ["y"], body, [helper.make_opsetid("", 9)])
    model = _calling_model([old], helper.make_node("Old", ["x", "s", "b", "m", "v"], ["y"], domain="local"))
    (node,) = bn_nodes(model.graph, 15, functions=local_functions(model))
    assert node.opset == 9 and node.training


def test_a_reference_attribute_inside_an_if_body_of_a_function_is_read_from_the_call():
    """Mutation M9: a BN in an If branch inside a function reads its referenced epsilon through the function's
    call (the branch's own index has no call)."""
    from bnkit.onnx.graph import bn_nodes, local_functions

    branch = helper.make_graph([_bn_ref("eps")], "then", [], [_tensor("y", [2, 3, 4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "else", [], [_tensor("y", [2, 3, 4])])
    body = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
            helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)]
    fn = _bn_function("Branchy", body, ["x", "s", "b", "m", "v"], attributes=["eps"])
    call = helper.make_node("Branchy", ["x", "s", "b", "m", "v"], ["y"], domain="local", eps=0.25)
    model = _calling_model([fn], call)
    (node,) = bn_nodes(model.graph, 15, functions=local_functions(model))
    assert node.epsilon == pytest.approx(0.25)
