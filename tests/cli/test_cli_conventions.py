"""``bnkit conventions``: the printed table against the frameworks' own layers and closed-form momenta."""
import re
from unittest.mock import patch

import pytest
from typer.testing import CliRunner

from bnkit.cli import app
from bnkit.cli.app import console

runner = CliRunner()
FRAMEWORKS = ["torch", "keras", "flax", "onnx"]


def _table(output: str) -> dict[str, list[str]]:
    """Row label -> the four framework cells (one line per row at 200 columns)."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if len(cells) == 5 and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


def _invoke(*args):
    # The shared console fixed its width when it was made; COLUMNS set now would not reach it.
    with patch.object(console, "_width", 200):
        result = runner.invoke(app, ["conventions", *args])
    assert result.exit_code == 0, result.output
    return _table(result.output)


@pytest.mark.parametrize("m,src", [(0.99, "keras"), (0.1, "torch"), (0.9, "onnx"), (0.997, "flax"), (0.003, "pytorch")])
def test_momentum_row_is_the_same_update_in_each_convention(m, src):
    rows = _invoke("--momentum", str(m), "--from", src)
    src = "torch" if src == "pytorch" else src
    (label,) = [k for k in rows if k.startswith(f"{src} momentum")]
    got = dict(zip(FRAMEWORKS, (float(v) for v in rows[label])))
    new_weight = m if src == "torch" else 1 - m  # weight on the new batch statistic
    assert got["torch"] == pytest.approx(new_weight, abs=1e-12)
    for fw in ("keras", "flax", "onnx"):
        assert got[fw] == pytest.approx(1 - new_weight, abs=1e-12)


def test_defaults_and_rules_match_the_real_layers():
    torch = pytest.importorskip("torch")
    keras = pytest.importorskip("keras")
    linen = pytest.importorskip("flax.linen")
    onnx = pytest.importorskip("onnx")
    rows = _invoke()
    schema = onnx.defs.get_schema("BatchNormalization", 15)
    real = {
        "torch": (torch.nn.BatchNorm2d(3).eps, torch.nn.BatchNorm2d(3).momentum),
        "keras": (keras.layers.BatchNormalization().epsilon, keras.layers.BatchNormalization().momentum),
        "flax": (linen.BatchNorm().epsilon, linen.BatchNorm().momentum),
        "onnx": (schema.attributes["epsilon"].default_value.f, schema.attributes["momentum"].default_value.f),
    }
    for i, fw in enumerate(FRAMEWORKS):
        eps, momentum = real[fw]
        assert float(rows["default eps"][i]) == pytest.approx(eps, rel=1e-6)
        assert float(rows["default momentum"][i]) == pytest.approx(momentum, rel=1e-6)
    assert rows["momentum weighs"] == ["the new value", "the old value", "the old value", "the old value"]
    assert rows["running var fed"][0].startswith("unbiased") and all(
        c.startswith("biased") for c in rows["running var fed"][1:])
    assert not [k for k in rows if k.split()[0] in FRAMEWORKS]  # no converted row without --momentum


@pytest.mark.parametrize("args,match", [
    (["--momentum", "0.9"], "go together"),
    (["--from", "keras"], "go together"),
    (["--momentum", "0.9", "--from", "caffe"], "unknown convention"),
    (["--momentum", "1.5", "--from", "keras"], r"\[0, 1\]"),
])
def test_bad_arguments_fail_with_a_clear_message(args, match):
    # The shared console fixed its width when it was made; COLUMNS set now would not reach it.
    with patch.object(console, "_width", 200):
        result = runner.invoke(app, ["conventions", *args])
    assert result.exit_code == 2
    assert re.search(match, result.output), result.output
