"""``bnkit fold --model ... -o x.onnx``: the table and --json report what the written ONNX file holds (BN nodes the
ONNX fold removed are folded, those still in the graph are left), read back from the file with onnx."""
from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from bnkit.cli import app

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

runner = CliRunner()

_NETS = '''
import torch
from torch import nn


def _bn(n, seed):
    bn = nn.BatchNorm2d(n)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        bn.num_batches_tracked.fill_(3)
    return bn


class Net(nn.Module):
    """bn0 after a conv (fold_bn folds it), bn called after two convs (fold_bn leaves it; the ONNX fold folds both
    of its nodes), bn_sum after a residual sum (left by both)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c0, self.bn0 = nn.Conv2d(3, 4, 1), _bn(4, 0)
        self.c1, self.c2, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), _bn(4, 1)
        self.bn_sum = _bn(4, 2)

    def forward(self, x):
        h = self.bn0(self.c0(x))
        return self.bn_sum(self.bn(self.c1(h)) + self.bn(self.c2(h)))
'''


@pytest.fixture
def nets(tmp_path, monkeypatch) -> str:
    """The --model spec of ``Net`` in a module written to ``tmp_path``."""
    (tmp_path / "cli_fold_onnx_nets.py").write_text(_NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "cli_fold_onnx_nets:Net"
    sys.modules.pop("cli_fold_onnx_nets", None)


def _bn_nodes(path) -> list[str]:
    return [n.name for n in onnx.load(path).graph.node if n.op_type == "BatchNormalization"]


def test_json_folded_and_left_are_the_bn_nodes_the_written_file_lost_and_holds(nets, tmp_path):
    """'left' is exactly the file's BatchNormalization nodes (was fold_bn's modules, one the ONNX fold had folded);
    the ONNX-stage folds are nodes the file no longer has, folded into nodes of the op named; the four BN calls
    are each either folded or left."""
    out = tmp_path / "net.onnx"
    result = runner.invoke(app, ["fold", "--model", nets, "--input-shape", "2x3x8x8", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    in_file = _bn_nodes(out)
    assert len(in_file) == 1 and list(data["left"]) == in_file
    ops = {n.name: n.op_type for n in onnx.load(out).graph.node}
    by_onnx = [f for f in data["folded"] if f["stage"] == "onnx"]
    assert len(by_onnx) == 2 and all(f["bn"] not in ops and ops[f["into"]] == f["op"] == "Conv" for f in by_onnx)
    assert [f["bn"] for f in data["folded"] if f["stage"] == "pytorch"] == ["bn0"]
    assert len(data["folded"]) + len(data["left"]) == 4
    assert {"output", "verified", "method", "notes", "max_abs_diff", "max_rel_diff"} <= set(data)
    assert all({"bn", "into", "position", "bias_added"} <= set(f) for f in data["folded"])


def test_table_lists_the_nodes_the_onnx_fold_removed_as_folded_and_only_the_file_s_nodes_as_left(nets, tmp_path):
    """The table says 'folded into' for each node the ONNX fold removed and 'left' only for the file's own
    BatchNormalization node (it said 'left: the BN module is called 2 times' for a BN the file no longer had)."""
    out = tmp_path / "net.onnx"
    result = runner.invoke(app, ["fold", "--model", nets, "--input-shape", "2x3x8x8", "-o", str(out)],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    left = [line for line in lines if "left:" in line]
    assert len(left) == 1 and _bn_nodes(out)[0] in left[0]
    assert sum("folded into" in line for line in lines) == 3 and "called 2 times" not in result.output
