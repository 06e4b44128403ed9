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


def _previous_report(out):
    out.mkdir()
    (out / "index.html").write_text("previous report")
    (out / "ch2_two_modes.png").write_bytes(b"previous plot")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _measured_with_a_plot(ctx):
    from bnkit.study import modes
    from bnkit.study.report import Chapter

    (ctx.out / "ch2_two_modes.png").write_bytes(b"new plot")
    return Chapter(modes.NUMBER, "two-modes", modes.TITLE, modes.CLAIM, checks={"a claim": True})


def test_a_full_disk_while_the_report_is_written_exits_2_with_the_reason_and_keeps_the_previous_report(
        tmp_path, monkeypatch):
    """ENOSPC in the report's pages (or in moving them into --out) was a raw OSError traceback, exit 1."""
    import errno
    import os
    from pathlib import Path

    import signal

    from bnkit.study import modes, report

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(modes, "run", _measured_with_a_plot)
    out = tmp_path / "report"
    before = _previous_report(out)
    write_atomic, written = report._write_atomic, []

    def disk_fills_up(path, text):  # results.json fits, index.html does not
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write_atomic(path, text)
        written.append(path)

    monkeypatch.setattr(report, "_write_atomic", disk_fills_up)
    result = runner.invoke(app, ["study", "two-modes", "--size", "quick", "--out", str(out)], terminal_width=200)
    assert written, result.output  # the chapter ran and the report's first page was written
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert f"error: cannot write the report folder {out}: No space left on device" in _one_line(result.output)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder, nothing replaced
    assert signal.getsignal(signal.SIGTERM) == handler  # the run's SIGTERM handler is gone

    monkeypatch.setattr(report, "_write_atomic", write_atomic)
    replace = os.replace

    def no_room_in_out(src, dst):
        if Path(dst).parent == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", no_room_in_out)
    result = runner.invoke(app, ["study", "two-modes", "--size", "quick", "--out", str(out)], terminal_width=200)
    monkeypatch.setattr(os, "replace", replace)
    assert result.exit_code == 2, result.output
    assert f"error: cannot write the report folder {out}: No space left on device" in _one_line(result.output)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


_SLOW_CHAPTER = """
import sys, time
from pathlib import Path
from bnkit.study import modes

running, out = sys.argv[1:]

def slow(ctx):  # a chapter that saved a plot and is still running when SIGTERM comes
    (ctx.out / "ch2_two_modes.png").write_bytes(b"partial")
    Path(running).write_text("running")
    time.sleep(300)

modes.run = slow
from bnkit.cli import main
sys.argv = ["bnkit", "study", "two-modes", "--size", "quick", "--out", out]
main()
"""


def test_sigterm_while_the_chapters_run_exits_143_and_leaves_the_previous_report_and_no_staging_folder(tmp_path):
    """SIGTERM (timeout, a cancelled CI job, kill) skipped the ``finally`` that removes the staging folder: every
    interrupted run left a hidden ``.bnkit-demo-*`` folder with its partial plots inside --out."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out, running = tmp_path / "report", tmp_path / "running"
    before = _previous_report(out)
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", KERAS_BACKEND="torch")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CHAPTER, str(running), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120  # a guard against a hang, not a timing assertion
        while not running.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.exists(), proc.communicate(timeout=60) if proc.poll() is not None else "never started"
        assert [p.name for p in out.iterdir() if p.name.startswith(".bnkit-demo-")]  # the run is building its report
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert b"Traceback" not in err, err.decode()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder, nothing replaced
