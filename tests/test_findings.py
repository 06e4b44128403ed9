"""bnkit.findings: a Finding's severity is one of three levels, and the worst level decides whether a report is ok."""
import itertools

import pytest

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
