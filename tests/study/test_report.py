"""bnkit.study.report: what index.html and report.md say, read back from the files written."""
import html

import pytest

from bnkit.study.report import Chapter, Table, unavailable, write_report


def test_a_check_that_fails_reads_as_not_holding_in_the_html_and_the_markdown(tmp_path):
    """A False check must be printed as "does NOT hold" in both reports (a report that printed every measured claim as
    holding would hide exactly the results it exists to show), and a True one as "holds"."""
    checks = {"the true claim": True, "the false claim": False}
    ch = Chapter(1, "c", "Title", "claim", checks=checks)
    paths = write_report([ch], tmp_path, {"size": "quick"})
    page, md = paths["html"].read_text(), paths["markdown"].read_text()
    assert "<li class='ok'>the true claim: holds in this run</li>" in page
    assert "<li class='fail'>the false claim: does NOT hold in this run</li>" in page
    assert "the false claim: holds" not in page
    md_lines = md.splitlines()
    assert "- the true claim: holds in this run" in md_lines
    assert "- the false claim: does NOT hold in this run" in md_lines
    assert "- the false claim: holds in this run" not in md_lines


@pytest.mark.parametrize("status,word", [("unavailable", "NOT RUN"), ("failed", "FAILED")])
def test_a_chapter_that_did_not_run_says_so_and_why_in_both_reports(tmp_path, status, word):
    """A chapter that was not run (a missing API) and one that raised are told apart in its table, and both reports
    say that it did not run (or that it failed) and why: never an empty chapter that reads as if nothing was wrong."""
    reason = "needs bnkit.torch.fold_bn <missing>" if status == "unavailable" else "RuntimeError: kaputt"
    ch = unavailable(5, "deployment", "Deploy", "claim", reason, status=status)
    assert ch.status == status and ch.reason == reason and not ch.checks
    assert ch.tables[0].rows == [[word, reason]]
    paths = write_report([ch], tmp_path, {"size": "quick"})
    page, md = paths["html"].read_text(), paths["markdown"].read_text()
    said = "did not run" if status == "unavailable" else "failed"
    assert f"<p class='na'>This chapter {said}: {html.escape(reason)}</p>" in page
    assert f"<td>{word}</td><td>{html.escape(reason)}</td>" in page
    assert f"**This chapter {said}:** {reason}" in md.splitlines()
    assert f"| {word} | {reason} |" in md.splitlines()
    # a chapter that ran says nothing of the kind
    ok = Chapter(1, "c", "Title", "claim", tables=[Table("t", ["a"])])
    paths = write_report([ok], tmp_path, {"size": "quick"})
    assert "did not run" not in paths["html"].read_text() and "did not run" not in paths["markdown"].read_text()
