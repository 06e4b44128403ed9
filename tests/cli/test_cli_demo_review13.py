"""Review 13 (RA) of ``bnkit demo``/``bnkit study``: a failed chapter's wording in the pages, a report that cannot
be written (a full disk), and SIGTERM while the chapters run."""
import json

from typer.testing import CliRunner

from bnkit.cli import app

runner = CliRunner()


def _one_line(output: str) -> str:
    return " ".join(output.split())


def test_the_pages_say_a_chapter_that_raised_failed_and_one_that_could_not_run_did_not_run(tmp_path, monkeypatch):
    """The terminal and the README say "failed" for a chapter that ran and raised; the pages said "did not run"."""
    from bnkit.study import modes

    def broken(ctx):
        raise RuntimeError("raised after training")

    monkeypatch.setattr(modes, "run", broken)
    result = runner.invoke(app, ["study", "two-modes", "--size", "quick", "--out", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 1, result.output
    assert json.loads((tmp_path / "results.json").read_text())["chapters"]["two-modes"]["status"] == "failed"
    reason = "RuntimeError: raised after training"
    assert f"This chapter failed: {reason}" in (tmp_path / "index.html").read_text()
    assert f"**This chapter failed:** {reason}" in (tmp_path / "report.md").read_text()
    for page in ("index.html", "report.md"):
        assert "did not run" not in (tmp_path / page).read_text()

    from bnkit.study.report import unavailable

    monkeypatch.setattr(modes, "run", lambda ctx: unavailable(modes.NUMBER, "two-modes", modes.TITLE, modes.CLAIM,
                                                              "needs bnkit.torch.freeze_bn"))
    result = runner.invoke(app, ["study", "two-modes", "--size", "quick", "--out", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "This chapter did not run: needs bnkit.torch.freeze_bn" in (tmp_path / "index.html").read_text()
    assert "**This chapter did not run:** needs bnkit.torch.freeze_bn" in (tmp_path / "report.md").read_text()
    for page in ("index.html", "report.md"):
        assert "failed" not in (tmp_path / page).read_text()
