"""bnkit.findings: a Finding's severity is one of three levels, and the worst level decides whether a report is ok;
jsonable (and the torch audit's report built on it) gives strict JSON: NaN and infinities as strings, NumPy and torch
values as plain numbers (oracle: json.loads refusing NaN and Infinity)."""
import itertools
import json

import numpy as np
import pytest
from _helpers import strict_json

from bnkit.findings import SEVERITIES, Finding, worst_severity


@pytest.mark.parametrize("severity", ["fatal", "Error", "WARNING", "warn", "", None])
def test_an_unknown_severity_is_refused_when_the_finding_is_made(severity):
    """worst_severity knows only SEVERITIES: a finding of any other level would never make a report not-ok (a
    'fatal' finding with exit 0), so it is refused where it is made, naming the levels allowed."""
    with pytest.raises(ValueError, match=r"severity must be one of \('error', 'warning', 'info'\)"):
        Finding(severity, "bn1", "something")


def test_the_three_levels_are_accepted_and_the_worst_wins():
    assert SEVERITIES == ("error", "warning", "info")  # documented: from most to least severe
    findings = {s: Finding(s, "bn1", f"a {s}") for s in SEVERITIES}
    assert findings["warning"].to_dict()["severity"] == "warning"
    assert worst_severity([]) is None
    for n in (1, 2, 3):
        for levels in itertools.permutations(SEVERITIES, n):
            expected = min(levels, key=SEVERITIES.index)
            assert worst_severity([findings[s] for s in levels]) == expected, levels


def test_jsonable_and_the_torch_audit_report_are_strict_json():
    torch = pytest.importorskip("torch")
    from torch import nn

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
    strict_json(json.dumps(report.to_dict(), allow_nan=False))
    var = torch.tensor([float("nan"), 1.0])
    made = AuditReport("m", "state", layers=["bn"], findings=[Finding("error", "bn", "x", code="c", data={"var": var})])
    assert strict_json(json.dumps(made.to_dict(), allow_nan=False))["findings"][0]["data"]["var"][1] == 1.0
