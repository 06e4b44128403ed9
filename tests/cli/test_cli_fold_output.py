"""What ``bnkit fold`` prints and refuses: --input-shape with --no-verify for an ONNX file is refused (it would do
nothing), names are shown as the ONNX file has them (oracle: onnx.load), and --model to .onnx says it wrote the
file with the export's onnxruntime-vs-PyTorch difference (oracle: onnxruntime run on the written file against
PyTorch's eval output, in float64 NumPy)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from bnkit.cli import app

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

runner = CliRunner()


def _text(result) -> str:
    return " ".join(result.output.split())  # rich wraps long lines


def _conv_bn(path, conv_name: str = "conv", bn_name: str = "bn"):
    """A Conv -> BatchNormalization graph on input ``x`` (N, 3, 4, 4), N dynamic, saved at ``path``."""
    rng = np.random.default_rng(0)
    consts = [numpy_helper.from_array(rng.standard_normal((2, 3, 1, 1)).astype(np.float32), "W"),
              numpy_helper.from_array(np.array([1.5, 0.5], np.float32), "s"),
              numpy_helper.from_array(np.array([0.1, -0.2], np.float32), "b"),
              numpy_helper.from_array(np.array([0.3, -0.4], np.float32), "m"),
              numpy_helper.from_array(np.array([0.8, 1.2], np.float32), "v")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], name=conv_name),
         helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name=bn_name)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8), path)
    return path


def test_input_shape_with_no_verify_is_refused_for_an_onnx_file(tmp_path):
    """--input-shape only shapes the verification inputs of an .onnx file: with --no-verify it would do nothing, so
    it is refused (exit 2, before any work), as the command refuses other options that do nothing; the name
    'nosuch' is no input of the graph (oracle: onnx.load's graph inputs)."""
    src = _conv_bn(tmp_path / "m.onnx")
    assert "nosuch" not in [i.name for i in onnx.load(src).graph.input]
    out = tmp_path / "out.onnx"
    for shape in ("nosuch=1x2", "x=2x3x4x4"):  # a wrong name and a right one: either would be ignored
        result = runner.invoke(app, ["fold", str(src), "-o", str(out), "--input-shape", shape, "--no-verify"],
                               terminal_width=200)
        assert result.exit_code == 2, result.output
        assert "--input-shape" in _text(result) and "--no-verify" in _text(result)
        assert not out.exists()
    result = runner.invoke(app, ["fold", str(src), "-o", str(out), "--no-verify"], terminal_width=200)
    assert result.exit_code == 0 and out.exists(), result.output  # --no-verify alone still folds


def test_names_ending_in_a_backslash_are_shown_as_written(tmp_path, monkeypatch):
    """Node names ending in a backslash show with exactly that one backslash in the fold table (oracle: the names
    onnx.load reads from the file); rich's markup escaping would double it."""
    from bnkit.cli.app import console

    monkeypatch.setattr(console, "_width", 1000)  # no wrapping inside the names, whatever the tmp path's length
    src = _conv_bn(tmp_path / "m.onnx", conv_name="conv\\", bn_name="bn\\")
    names = [n.name for n in onnx.load(src).graph.node]
    assert names == ["conv\\", "bn\\"]
    result = runner.invoke(app, ["fold", str(src), "-o", str(tmp_path / "out.onnx")], terminal_width=1000)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "folded into" in line)
    cells = [c.strip() for c in row.strip().strip("│").split("│")]
    assert cells[0] == names[1]
    assert cells[1].startswith(f"folded into {names[0]} (")


NETS = '''
import torch
from torch import nn


class ConvReluBN(nn.Module):
    """A BN after a ReLU, with no layer after it: neither fold_bn nor the ONNX fold can fold it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


def make():
    torch.manual_seed(0)
    return ConvReluBN()
'''


def _export_difference(model, path, dims) -> tuple[float, float]:
    """(max abs, max norm-wise relative) difference between onnxruntime on the file at ``path`` and PyTorch's eval
    output, in float64, on the CLI's random input of shape ``dims`` and on its first sample alone (the dynamic
    batch axis' check), onnxruntime's graph optimisations off."""
    x = torch.randn(*dims, generator=torch.Generator().manual_seed(0))
    options = ort.SessionOptions()  # the graph as written, unoptimised, as the export's check runs it
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst_abs = worst_rel = 0.0
    for feed in (x, x[:1]):
        with torch.no_grad():
            want = model(feed).double().numpy()
        got = session.run(None, {session.get_inputs()[0].name: feed.numpy()})[0].astype(np.float64)
        diff = float(np.max(np.abs(want - got)))
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / float(np.max(np.abs(want))))
    return worst_abs, worst_rel


def test_model_to_onnx_says_it_wrote_the_file_with_the_exports_own_difference(tmp_path, monkeypatch):
    """--model to .onnx ends with 'wrote FILE.onnx' and the export's onnxruntime-vs-PyTorch difference, and --json
    carries it as 'export' (max_abs_diff, max_rel_diff, batch_sizes). Oracle: onnxruntime on the written file
    against the PyTorch model in eval mode, on the same random input and its first sample; fold_bn folds nothing
    here, so its own check reads 0 while the export's difference does not."""
    (tmp_path / "fold_output_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import fold_output_nets

    args = ["fold", "--model", "fold_output_nets:make", "--input-shape", "2x16x12x12", "-o"]
    result = runner.invoke(app, args + ["j.onnx", "--json"], terminal_width=200)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    want_abs, want_rel = _export_difference(fold_output_nets.make().eval(), tmp_path / "j.onnx", (2, 16, 12, 12))
    assert want_abs > 0 and data["max_abs_diff"] == 0  # fold_bn's own check compares the unchanged model
    assert data["export"]["max_abs_diff"] == pytest.approx(want_abs, rel=1e-9)
    assert data["export"]["max_rel_diff"] == pytest.approx(want_rel, rel=1e-9)
    assert data["export"]["batch_sizes"] == [2, 1]

    result = runner.invoke(app, args + ["t.onnx"], terminal_width=200)
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("wrote t.onnx") and "onnxruntime" in last
    assert f"{want_abs:.3g}" in last and f"{want_rel:.3g}" in last

    result = runner.invoke(app, args + ["n.onnx", "--no-verify", "--json"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["export"] == {"max_abs_diff": None, "max_rel_diff": None, "batch_sizes": []}
    result = runner.invoke(app, args + ["m.onnx", "--no-verify"], terminal_width=200)
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("wrote m.onnx") and "--no-verify" in last
    written = sorted(set(os.listdir(tmp_path)) - {"__pycache__"})
    assert written == ["fold_output_nets.py", "j.onnx", "m.onnx", "n.onnx", "t.onnx"]


def test_an_input_shape_too_big_for_any_array_is_named_not_numpys_error(tmp_path):
    """Sizes below 2**63 whose product no array can hold: NumPy's "array is too big" named neither the shape nor
    the option; now the memory error names the input and its shape, exit 1, nothing written."""
    src = _conv_bn(tmp_path / "m.onnx")
    result = runner.invoke(app, ["fold", str(src), "-o", str(tmp_path / "f.onnx"), "--input-shape",
                                 f"x={1 << 62}x3x4x4"])
    assert result.exit_code == 1, result.output
    assert f"input 'x' of shape [{1 << 62}, 3, 4, 4]" in _text(result) and "nothing written" in _text(result)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_a_safetensors_output_is_refused_before_folding_for_extra_state_and_keeps_the_inputs_metadata(user_module):
    """Extra state (get_extra_state) cannot go into safetensors: refused as bad usage (exit 2) before the fold, as
    recalibrate does, not after it with exit 1. A safetensors input's header metadata comes through (oracle:
    safetensors.safe_open of both files)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = user_module("fa_fold_extra", "from bnkit.torch.zoo import MLP\n"
                         "class Extra(MLP):\n    def get_extra_state(self):\n        return {'version': 7}\n"
                         "    def set_extra_state(self, state):\n        pass\n"
                         "def make():\n    return Extra()\n")
    __import__("sys").path.insert(0, str(folder))  # the CLI puts it there too; conftest restores sys.path
    torch.save(__import__("fa_fold_extra").make().state_dict(), folder / "extra.pt")
    result = runner.invoke(app, ["fold", "--model", "fa_fold_extra:make", "--weights", "extra.pt", "--input-shape",
                                 "2x64", "--force", "-o", "fe.safetensors"])
    assert result.exit_code == 2, result.output
    assert "safetensors holds tensors only" in _text(result) and not (folder / "fe.safetensors").exists()

    state = {k: v.contiguous() for k, v in torch.load(folder / "w.pt").items()}
    save_file(state, folder / "w.safetensors", metadata={"format": "pt", "origin": "trainer"})
    for weights, expected in (("w.safetensors", {"format": "pt", "origin": "trainer"}), ("w.pt", {"format": "pt"})):
        result = runner.invoke(app, ["fold", "--model", "bnkit.torch.zoo:MLP", "--weights", weights,
                                     "--input-shape", "2x64", "--force", "-o", f"f_{weights}.safetensors"])
        assert result.exit_code == 0, result.output
        with safe_open(str(folder / f"f_{weights}.safetensors"), "pt") as f:
            assert f.metadata() == expected
