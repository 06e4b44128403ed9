"""Tables on a narrow console (COLUMNS=40, a split terminal): rich folds a cell that does not fit; by default it cut
it with an ellipsis, so a number lost its last digits (0.1281 printed as 0.12...)."""
from __future__ import annotations

from types import SimpleNamespace
from unittest.mock import patch

import pytest
from typer.testing import CliRunner

from bnkit.cli import app
from bnkit.cli.app import console

runner = CliRunner()


def _printed(fn) -> str:
    with patch.object(console, "_width", 40), console.capture() as captured:
        fn()
    return captured.get()


def test_the_ema_table_keeps_every_digit_at_40_columns():
    with patch.object(console, "_width", 40):
        result = runner.invoke(app, ["ema", "4.2", "3.8", "--fill", "4.123456789", "--steps", "12"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output


def test_the_recalibrate_and_audit_tables_keep_every_digit_at_40_columns():
    pytest.importorskip("torch")
    from bnkit.cli.audit import _print
    from bnkit.cli.recalibrate import _report_table

    row = {"layer": "layers.1.shortcut.1", "samples": 200, "values_per_channel": 200, "max_mean_shift_std": 0.128123,
           "var_ratio_min": 0.287654, "var_ratio_max": 0.888123}
    table = _printed(lambda: console.print(_report_table(SimpleNamespace(rows=lambda: [row]))))
    assert "…" not in table and "0.128" in table  # folded onto lines, not cut
    shift = {"layer": "features.3.1", "z_eq": 1.23456, "sampling_kl": 0.0123, "worst_channel": 17,
             "mean_shift": -2.34567, "log_var_ratio": 0.5}
    report = {"findings": [], "layers": ["features.3.1"], "shifts": [shift], "target": "m.pt", "depth": "data"}
    assert "…" not in _printed(lambda: _print(report))


def _squeezed(text: str) -> str:
    return "".join(text.split())


def _table(rows: list[tuple[str, ...]]):
    from rich.table import Table
    from rich.text import Text

    table = Table(title="findings", caption="the caption")
    for col in ("severity", "layer", "finding", "evidence", "fix"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(f"[red]{row[0]}[/]", *map(Text, row[1:]))
    return table


ROWS = [("error", "features.3.1", "running statistics never updated",
         "every running_mean is 0 and every running_var is 1", "recalibrate it on representative data"),
        ("info", "(model)", "train-vs-eval output gap", "0.123 on the first batch", "")]


@pytest.mark.parametrize("width", [12, 20, 40])
def test_a_table_too_narrow_for_its_columns_prints_every_cell_whole_as_lines(width):
    from io import StringIO

    from rich.console import Console

    from bnkit.cli.tables import print_table

    out = StringIO()
    print_table(Console(width=width, file=out, color_system=None), _table(ROWS))
    text = out.getvalue()
    assert not set("┃│┏━") & set(text)  # no table: rich would fold cells one letter per line or drop them
    for row in ROWS:
        for header, cell in zip(("severity", "layer", "finding", "evidence", "fix"), row):
            if cell:
                assert _squeezed(f"{header}: {cell}") in _squeezed(text)
    flat = _squeezed(text)
    assert "fix:" not in flat.split("severity:info")[1]  # an empty cell is left out
    assert flat.index("findings") < flat.index("severity:error") < flat.index("severity:info") < flat.index(
        "thecaption")


def test_a_table_with_room_for_its_columns_stays_a_table():
    from io import StringIO

    from rich.console import Console

    from bnkit.cli.tables import print_table

    out = StringIO()
    print_table(Console(width=70, file=out, color_system=None), _table(ROWS))
    assert "┃ severity" in out.getvalue() and "fix:" not in out.getvalue()


def test_the_audit_at_20_columns_prints_every_finding_whole(tmp_path):
    """At 20 columns rich gave the audit table's fix column no width: the advice printed as empty cells."""
    torch = pytest.importorskip("torch")
    import json

    from bnkit.torch.zoo import MLP

    path = tmp_path / "mlp.pt"
    torch.save(MLP(in_features=8, hidden=(16,)).state_dict(), path)  # never-updated statistics: an error finding
    findings = json.loads(runner.invoke(app, ["audit", str(path), "--json"]).stdout)["findings"]
    with patch.object(console, "_width", 20):
        result = runner.invoke(app, ["audit", str(path)])
    assert result.exit_code == 1, result.output
    assert findings and any(f["fix"] for f in findings)
    for f in findings:
        for key in ("layer", "finding", "evidence", "fix"):
            if f[key]:
                assert _squeezed(f"{key}: {f[key]}") in _squeezed(result.output)


def test_demo_tables_at_20_columns_print_every_cell_whole():
    from bnkit.cli.demo import _print_chapter

    table = SimpleNamespace(title="t", notes=[], columns=["model", "accuracy", "gap"],
                            rows=[["resnet-small", "0.9731", "0.0123"]])
    chapter = SimpleNamespace(number=1, title="Modes", claim="a claim", checks={}, findings=[], status="ok",
                              reason="", tables=[table])
    with patch.object(console, "_width", 20), console.capture() as captured:
        _print_chapter(chapter)
    for column, cell in zip(("model", "accuracy", "gap"), ("resnet-small", "0.9731", "0.0123")):
        assert _squeezed(f"{column}: {cell}") in _squeezed(captured.get())
