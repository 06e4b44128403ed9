"""``bnkit audit`` on ONNX files: malformed models (rejected by onnx.checker, the oracle) exit 1 with findings and no
traceback."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from bnkit.cli import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, ["audit", *map(str, args)], terminal_width=240)


def _bn_model(nodes, stats=None) -> onnx.ModelProto:
    arrays = stats or {"s": np.ones(3), "b": np.zeros(3), "m": np.zeros(3), "v": np.ones(3)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])],
                              [numpy_helper.from_array(np.asarray(a, np.float32), k) for k, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def _bn(name: str = "bn", **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name=name, **attrs)


@pytest.mark.parametrize("epsilon", [[1e-5, 2e-5], "abc"])
def test_an_epsilon_of_the_wrong_type_exits_one_with_findings_not_a_traceback(tmp_path, epsilon):
    model = _bn_model([_bn(epsilon=epsilon)])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "m.onnx")
    result = _invoke(tmp_path / "m.onnx", "--json")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    findings = json.loads(result.stdout)["findings"]
    assert [f["code"] for f in findings] == ["invalid_model", "malformed_node"]
    assert "node 'bn': attribute 'epsilon'" in findings[1]["evidence"]


def test_an_onnx_model_under_another_suffix_gets_the_onnx_audit(tmp_path):
    """A model.pb that onnx.load reads as a ModelProto (the oracle) is audited as ONNX, as bnkit fold folds it;
    options for checkpoints are refused for it as for an .onnx file."""
    path = tmp_path / "model.pb"
    onnx.save(_bn_model([_bn()], {"s": [1.0, 2.0, 0.5], "b": np.zeros(3), "m": [0.1, -0.2, 0.3],
                                  "v": [-1.0, 1.0, 2.0]}), path)
    assert [n.op_type for n in onnx.load(path).graph.node] == ["BatchNormalization"]
    result = _invoke(path, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["depth"] == "onnx" and report["layers"] == ["bn"]
    assert [f["code"] for f in report["findings"]] == ["negative_var"]
    refused = _invoke(path, "--model", "pkg:make")
    assert refused.exit_code == 2 and "apply to PyTorch checkpoints, not to ONNX files" in refused.output


@pytest.mark.parametrize("name", ["bn\\", "[bold]bn[/bold]", "a\\[b]"])
def test_node_names_are_shown_as_written_in_the_table(tmp_path, name):
    """The table shows a node name exactly as the --json report (the oracle: the name onnx stores) gives it: a
    trailing backslash is not doubled, markup-like brackets are not interpreted."""
    model = _bn_model([_bn(name, training_mode=1)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert json.loads(_invoke(path, "--json").stdout)["layers"] == [model.graph.node[0].name] == [name]
    result = _invoke(path)
    assert result.exit_code == 1
    cells = {cell.strip() for line in result.output.splitlines() for cell in line.split("│")}
    assert name in cells


@pytest.mark.parametrize("name", ["big.safetensors", "big.bin"])
def test_a_safetensors_file_whose_header_length_reads_as_an_onnx_start_is_audited_as_a_checkpoint(tmp_path, name):
    """A header of 0x120108 bytes (a large __metadata__ entry) makes the file start 08 01 12, the way an ONNX
    ModelProto starts; safetensors.torch.load_file (the oracle) reads the checkpoint, and so must the audit."""
    pytest.importorskip("torch")
    from safetensors.torch import load_file

    arrays = {"bn.weight": np.ones(4, np.float32), "bn.bias": np.zeros(4, np.float32),
              "bn.running_mean": np.zeros(4, np.float32), "bn.running_var": np.ones(4, np.float32)}
    header, data, offset = {}, b"", 0
    for key, value in arrays.items():
        header[key] = {"dtype": "F32", "shape": [4], "data_offsets": [offset, offset + value.nbytes]}
        offset, data = offset + value.nbytes, data + value.tobytes()
    length = 0x08 | 0x01 << 8 | 0x12 << 16
    header["__metadata__"] = {"pad": ""}
    header["__metadata__"]["pad"] = "x" * (length - len(json.dumps(header).encode()))
    text = json.dumps(header).encode()
    assert len(text) == length
    path = tmp_path / name
    path.write_bytes(length.to_bytes(8, "little") + text + data)
    assert path.read_bytes()[:3] == b"\x08\x01\x12" and sorted(load_file(path)) == sorted(arrays)
    result = _invoke(path, "--json")
    report = json.loads(result.output)
    assert report["depth"] == "state" and report["layers"] == ["bn"], result.output
