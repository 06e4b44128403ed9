"""Random ops (RandomNormal, RandomNormalLike, Dropout) and the check of a fold or export: bnkit.onnx.fold seeds its
copies of both graphs so that they draw the same numbers (a Dropout-10 gets no seed, two nodes different seeds);
export_onnx(verify=False) and ``bnkit fold --model ... --no-verify`` write a graph a random op makes unverifiable.

Oracles: onnxruntime on the unfolded graph (with the same seed), onnx.checker, PyTorch eval output for the
deterministic part.
"""
from __future__ import annotations

import io
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from _helpers import ort_run, rel, value_info
from onnx import TensorProto, helper
from torch import nn
from typer.testing import CliRunner

from bnkit.onnx import fold_model

runner = CliRunner()


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
    graph = helper.make_graph(nodes, "g", [value_info("x", [64])], [value_info("a", [64]), value_info("r2", [64])])
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

    name = "sampler_factory"
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
