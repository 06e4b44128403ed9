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
