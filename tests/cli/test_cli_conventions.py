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
    """Row label -> the four framework cells of the conventions table (one line per row at 200 columns)."""
    rows = {}
    for line in output.split("Weight names")[0].splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if len(cells) == 5 and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


def _names(output: str) -> dict[str, list[str]]:
    """Framework -> its gamma, beta, running mean, running var names, from the "Weight names" table."""
    rows = {}
    for line in output.split("Weight names")[1].splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if len(cells) == 5 and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


def _run(*args, width: int = 200) -> str:
    # The shared console fixed its width when it was made; COLUMNS set now would not reach it.
    with patch.object(console, "_width", width):
        result = runner.invoke(app, ["conventions", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _invoke(*args):
    return _table(_run(*args))


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


@pytest.mark.parametrize("m,src", [(0.9999999, "keras"), (0.1234567, "torch"), (0.99999999999, "flax")])
def test_converted_momenta_are_printed_in_full(m, src):
    from bnkit import convert_momentum

    output = _run("--momentum", repr(m), "--from", src)
    rows = _table(output)
    assert f"{m!r} is" in rows  # the row label's second line
    cells = rows[f"{src} momentum"]
    for fw, cell in zip(FRAMEWORKS, cells):
        assert float(cell) == convert_momentum(m, src, fw), fw  # reads back as the very same float
    sentence = " ".join(output.split("The same update")[1].split())
    assert f"weight {cells[0]} on the new batch statistic, {cells[1]} on the old" in sentence


def test_momenta_too_long_for_a_narrow_table_are_listed_whole_under_it():
    from bnkit import convert_momentum

    m = 1 / 3
    output = _run("--momentum", repr(m), "--from", "keras", width=80)
    assert not [k for k in _table(output) if k.startswith("keras momentum")]  # no row split across lines
    lines = output.split("in each framework:")[1].splitlines()[1:5]
    listed = dict(line.strip().split(": ") for line in lines)
    assert {fw: float(v) for fw, v in listed.items()} == {fw: convert_momentum(m, "keras", fw) for fw in FRAMEWORKS}
    short = _table(_run("--momentum", "0.99", "--from", "keras", width=80))  # short values stay in the table
    assert short["keras momentum"] == ["0.01", "0.99", "0.99", "0.99"]


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


def test_weight_names_fit_whole_at_80_columns_and_are_the_frameworks_own():
    torch = pytest.importorskip("torch")
    keras = pytest.importorskip("keras")
    jax = pytest.importorskip("jax")
    linen = pytest.importorskip("flax.linen")
    onnx = pytest.importorskip("onnx")
    output = _run(width=80)
    assert max(len(line) for line in output.splitlines()) <= 80
    keras_bn = keras.layers.BatchNormalization()
    keras_bn.build((None, 3))
    flax_vars = linen.BatchNorm(use_running_average=False).init(jax.random.PRNGKey(0), jax.numpy.ones((2, 3)))
    real = {
        "torch": list(torch.nn.BatchNorm2d(3).state_dict())[:4],  # num_batches_tracked last
        "keras": [w.name for w in keras_bn.weights],
        "flax": [f"{coll}/{k}" for coll in ("params", "batch_stats") for k in flax_vars[coll]],
        "onnx": [i.name for i in onnx.defs.get_schema("BatchNormalization", 15).inputs][1:],
    }
    # one line per framework: no name split over two lines ("running_mea n", "params/scal e")
    assert _names(output) == real
    # too narrow for that table: plain lines, still never splitting a name
    words = set(re.split(r"[\s,:]+", _run(width=60)))
    assert all(name in words for names in real.values() for name in names)


def test_a_console_too_narrow_for_the_columns_gets_lines_with_the_same_content():
    """At 40 columns the table split every cell to one letter and dropped the onnx column's text."""
    wide = _table(_run("--momentum", "0.99", "--from", "keras", width=200))
    narrow = " ".join(_run("--momentum", "0.99", "--from", "keras", width=40).split())  # undo the wrapping
    assert "┃" not in narrow.split("Weight names")[0]  # no table
    for i, fw in enumerate(FRAMEWORKS):
        line = re.search(rf"\b{fw}: (r = [^;]+); momentum weighs the (\w+) value; default momentum ([^,]+), eps (\S+);"
                         r" named [^;]+; running var fed (unbiased M2/\(n-1\)|biased M2/n)(?: |$)", narrow)
        assert line, fw
        # "running var fed" too: swapped, the lines told torch users their layer feeds the biased variance
        groups = list(line.groups())
        groups[-1] = groups[-1].split()[0]  # the table's cell shows "unbiased" / "biased" on its first line
        assert groups == [wide["update (m = momentum)"][i], wide["momentum weighs"][i].split()[1],
                          wide["default momentum"][i], wide["default eps"][i], wide["running var fed"][i]]
    listed = dict(re.findall(r"\b(torch|keras|flax|onnx): ([0-9.]+)\b(?!,)", narrow.split("in each framework:")[1]))
    assert {fw: listed[fw] for fw in FRAMEWORKS} == dict(zip(FRAMEWORKS, wide["keras momentum"]))


def _apply_rule(rule: str, m: float, r: float, x: float) -> float:
    """Evaluate a printed rule such as ``r = (1-m) r + m x`` (one coefficient, m or (1-m), per term)."""
    match = re.fullmatch(r"r = (\(1-m\)|m) r \+ (\(1-m\)|m) x", rule)
    assert match, rule
    coef = {"m": m, "(1-m)": 1 - m}
    return coef[match[1]] * r + coef[match[2]] * x


def test_update_rule_row_is_what_each_real_layer_does_with_its_momentum():
    """The "update" row was never compared with the layers: a swapped rule told torch users the Keras convention.

    Each framework's own layer, built with momentum 0.3, updates a running mean of 1 with a batch of mean 3; the
    printed rule must give the same new running mean."""
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    keras = pytest.importorskip("keras")
    jax = pytest.importorskip("jax")
    linen = pytest.importorskip("flax.linen")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    m, r0 = 0.3, 1.0
    batch = np.array([[2.0], [4.0]], dtype=np.float32)  # batch mean 3
    bn = torch.nn.BatchNorm1d(1, momentum=m)
    bn.running_mean.fill_(r0)
    bn(torch.from_numpy(batch))
    kbn = keras.layers.BatchNormalization(momentum=m)
    kbn.build((None, 1))
    kbn.moving_mean.assign(np.full(1, r0, np.float32))
    kbn(batch, training=True)
    fbn = linen.BatchNorm(use_running_average=False, momentum=m)
    params = fbn.init(jax.random.PRNGKey(0), batch)["params"]
    _, fstate = fbn.apply({"params": params, "batch_stats": {"mean": np.full(1, r0), "var": np.ones(1)}}, batch,
                          mutable=["batch_stats"])
    names = ["X", "scale", "B", "input_mean", "input_var"]
    node = helper.make_node("BatchNormalization", names, ["Y", "running_mean", "running_var"], momentum=m,
                            training_mode=1)
    graph = helper.make_graph([node], "bn", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                               for n in ("Y", "running_mean", "running_var")])
    ones = np.ones(1, np.float32)
    onnx_out = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])).run(
        None, {"X": batch, "scale": ones, "B": ones * 0, "input_mean": ones * r0, "input_var": ones})
    real = {"torch": float(bn.running_mean[0]), "keras": float(np.asarray(kbn.moving_mean.numpy())[0]),
            "flax": float(fstate["batch_stats"]["mean"][0]), "onnx": float(onnx_out[1][0])}
    rows = _invoke()
    for i, fw in enumerate(FRAMEWORKS):
        assert _apply_rule(rows["update (m = momentum)"][i], m, r0, 3.0) == pytest.approx(real[fw], abs=1e-6), fw


@pytest.mark.parametrize("m,src", [(0.10000000149011612, "torch"), (0.12345678901234568, "torch"),
                                   (1.2345678901234568e-05, "torch"), (0.99, "keras"), (1.2e-08, "torch"),
                                   (5.168e-06, "torch"), (2.5e-10, "torch"), (2.733e-12, "torch")])
def test_converted_momenta_stay_whole_at_every_width(m, src):
    """Before: the fit test counted the first column as the widest fixed label, but the row's own label
    (``'<momentum> is'``) can be up to 4 columns wider; at those widths a value folded over two lines (read
    alone, 1.2345678901234568 for 1.2345678901234568e-05). And rich narrowed a value column below
    its value where the sum fitted (0.99999998 over 8 at 80 columns). Oracle: convert_momentum's values, each found whole
    on one line of the output (in the table or listed under it) at every width from 80 to 160."""
    from bnkit import convert_momentum

    wanted = [repr(convert_momentum(m, src, fw)) for fw in FRAMEWORKS]
    in_table = 0
    for width in range(80, 161):
        output = _run("--momentum", repr(m), "--from", src, width=width)
        rows = _table(output)
        if f"{src} momentum" in rows:  # in the table: whole, nothing carried to the label's second line
            in_table += 1
            assert rows[f"{src} momentum"] == wanted, width
            assert rows[f"{m!r} is"] == ["", "", "", ""], width
        else:  # listed under the table, one "framework: value" line each
            lines = output.split("in each framework:")[1].splitlines()[1:5]
            assert [line.split(": ")[1].strip() for line in lines] == wanted, width
    assert in_table  # the wide consoles do show the row


def test_at_every_width_the_conventions_are_a_table_with_whole_headers_or_lines():
    """At every width, not only at 40 and 60 columns (between them a table with columns narrower than "torch"
    could pass): either a table whose header names each framework whole on one line
    (and ends at its right border), or one line per framework."""
    for width in range(30, 101):
        out = _run(width=width).split("Weight names")[0]
        header = [line for line in out.splitlines() if line.startswith("┃")]
        if header:
            assert [c.strip() for c in header[0].split("┃")[2:-1]] == list(FRAMEWORKS), (width, header[0])
            cells = [c.strip() for line in out.splitlines() if line.startswith("│") for c in line.split("│")[2:-1]]
            for name in ("epsilon,", "momentum", "M2/(n-1)", "unbiased"):  # no name split across lines (57-68)
                assert name in cells, (width, name, out)
        else:
            flat = " ".join(out.split())
            assert all(f"{fw}: r = " in flat for fw in FRAMEWORKS), (width, flat)
