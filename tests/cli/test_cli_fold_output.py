"""What ``bnkit fold`` prints and refuses: --input-shape with --no-verify for an ONNX file is refused (it would do
nothing; oracle: onnx.load's graph inputs), and names are shown as the ONNX file has them (oracle: onnx.load)."""
from __future__ import annotations

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
