"""``bnkit demo``: the lesson on BatchNorm at inference, every chapter measured on scikit-learn's digits."""
from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.markup import escape

from ..atomic import sigterm_exits
from .app import app, console, err_console, fail, needs
from .tables import print_table


class _RichTracker:
    """Feeds :mod:`bnkit.study`'s progress calls to one rich progress bar per chapter."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.task = None

    def start(self, description: str, total: int) -> None:
        self.task = self.progress.add_task(description, total=max(total, 1))

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)

    def finish(self) -> None:
        if self.task is not None:
            total = next(t.total for t in self.progress.tasks if t.id == self.task)
            self.progress.update(self.task, completed=total)
        self.task = None


def _say(markup: str, text: str, indent: int = 4, style: str = "") -> None:
    """``markup`` then plain ``text``, wrapped lines indented so a bullet reads as one block at 80 columns."""
    from rich.padding import Padding
    from rich.text import Text

    line = Text.from_markup(markup) + Text(text, style=style)
    console.print(Padding(line, (0, 0, 0, indent)), highlight=False)


def _print_chapter(ch) -> None:
    """Each table in a light box that fits 80 columns (CI logs, pipes), its notes dimmed under it."""
    from rich import box
    from rich.table import Table

    console.rule(escape(f"{ch.number}. {ch.title}"), style="bold")
    _say("[italic]Claim:[/] ", ch.claim, indent=0)
    for t in ch.tables:
        console.print()
        _say("", t.title, indent=0, style="bold")  # wrapped at the console's width, not the table's
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for i, col in enumerate(t.columns):
            table.add_column(escape(col), justify="left" if i == 0 else "right", overflow="fold")
        for row in t.rows:
            table.add_row(*map(escape, row))
        print_table(console, table)
        for note in t.notes:
            _say("", note, indent=2, style="dim")
    for claim, ok in ch.checks.items():
        _say(f"[{'green' if ok else 'red'}]{'holds' if ok else 'does NOT hold'}:[/] ", claim)
    for f in ch.findings:
        _say("- ", f)
    if ch.status != "ok":
        _say(f"[bold yellow]chapter {ch.status}:[/] ", ch.reason)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the OS keeps one), else every CPU."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def run_and_report(
    names: list[str], size: str, seed: int, out: Path, seeds: int | None = None, threads: int = 1
) -> int:
    """Run chapters with progress bars on a terminal, print their tables, write the report; return the exit code.

    torch runs on ``threads`` CPU threads for the run (restored afterwards): the models are tiny, and
    on a busy 2-core machine two threads used over 2.7 times the CPU time of one (measured on the demo).
    The report is built in a hidden folder inside ``out`` and replaces the previous one only when it is complete:
    a report that cannot be written (a full disk) exits 2 with the reason, and Ctrl-C or SIGTERM (``timeout``, a
    cancelled CI job; exit status 143 where SIGTERM has its default action) leave the previous report as it was
    and no hidden folder behind.
    """
    try:  # a name too long, a folder on the way it may not search: the reason, not a traceback
        if out.exists() and not out.is_dir():
            raise fail(f"--out {out} exists and is not a folder")
    except OSError as exc:
        raise _cannot_write(out, exc) from None
    cpus = usable_cpus()
    if not 1 <= threads <= cpus:  # PyTorch takes more, then OpenBLAS crashed starting 100000
        raise fail(f"--threads must be between 1 and {cpus} (the CPUs this process may run on), got {threads}")
    from ..study import check_seed

    try:
        check_seed(names, size, seed, seeds)
    except ValueError as exc:  # before --out is touched or any chapter runs
        raise fail(f"--{exc}") from None
    import os
    import platform
    import shutil
    import tempfile
    import time

    import numpy as np
    import torch

    from ..study import chapter_module
    from ..study.report import ReportWriteError, write_report

    _refuse_folders_in_the_way(out, REPORT_FILES + tuple(p for n in names for p in chapter_module(n).PLOTS))
    with sigterm_exits():  # SIGTERM (timeout, a cancelled CI job) exits 143 through the cleanup below
        try:  # the report is built in a hidden folder inside ``out``: writable now, or refused before any chapter runs
            out.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".bnkit-demo-", dir=out))
        except OSError as exc:
            raise _cannot_write(out, exc) from None
        try:
            start = time.perf_counter()
            previous_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                chapters = _run_with_progress(names, size, seed, staging, seeds)
            except ReportWriteError as exc:  # a plot that a full disk refused: the previous report stays
                raise _cannot_write(out, exc) from None
            finally:
                torch.set_num_threads(previous_threads)
            seconds = round(time.perf_counter() - start, 1)
            meta = {"size": size, "seed": seed, "seeds": seeds, "seconds": seconds, "chapters": names,
                    "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                    "torch_threads": threads}
            try:  # a full disk fails here, in the staging folder: the previous report is still as it was
                written = write_report(chapters, staging, meta)
                # only a finished report replaces the previous one: file by file, each atomically, the pages last
                pages = [p.name for p in written.values()]
                names = sorted(p.name for p in staging.iterdir() if p.name not in pages) + pages
                _refuse_folders_in_the_way(out, names)
                stale = _previous_plots(out) - set(names)  # read before its results.json is replaced
                for name in names:
                    os.replace(staging / name, out / name)
                for name in stale:
                    (out / name).unlink(missing_ok=True)
            except OSError as exc:
                raise _cannot_write(out, exc) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # an interrupted run leaves the previous report as it was
    paths = {kind: out / path.name for kind, path in written.items()}
    console.print(f"report: {paths['html']} (also {paths['markdown'].name}, {paths['json'].name}) in {seconds} s",
                  markup=False)
    failed = [ch.name for ch in chapters if ch.status == "failed"]
    if failed:
        err_console.print(f"[bold red]error:[/] chapter(s) failed: {', '.join(failed)} (see results.json)")
        return 1
    return 0


#: The report's pages (:func:`bnkit.study.report.write_report`); the plots are named by their chapters.
REPORT_FILES = ("index.html", "report.md", "results.json")


def _previous_plots(out: Path) -> set[str]:
    """The plot files the report already in ``out`` lists in its ``results.json`` (none if there is none, or it
    cannot be read): a new report removes those it does not make, and nothing else."""
    import json

    try:
        chapters = json.loads((out / "results.json").read_text(encoding="utf-8"))["chapters"].values()
        names = {figure["path"] for chapter in chapters for figure in chapter.get("figures", [])}
        return {n for n in names if isinstance(n, str) and n == Path(n).name and n.endswith(".png")
                and (out / n).is_file()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):  # unreadable: none listed
        return set()


def _cannot_write(out: Path, exc: OSError) -> "typer.Exit":
    """The exit 2 for a report folder that refuses a write (read-only, full): its reason, not a traceback."""
    return fail(f"cannot write the report folder {out}: {exc.strerror or exc}")


def _refuse_folders_in_the_way(out: Path, names) -> None:
    """Exit 2 if any of the report's file names is a folder inside ``out`` (it could not be replaced)."""
    try:
        blocked = [name for name in names if (out / name).is_dir()]
    except OSError as exc:  # a folder it may not search
        raise _cannot_write(out, exc) from None
    if blocked:
        raise fail(f"cannot write the report into {out}: {', '.join(blocked)} there is a folder, not a file")


def _run_with_progress(names: list[str], size: str, seed: int, out: Path, seeds: int | None) -> list:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..study import Context, run_chapters

    chapters = []
    # piped or logged output gets no bars: rich cannot redraw there, so it would print them all after the tables
    with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not console.is_terminal) as progress:
        tracker = _RichTracker(progress)
        ctx = Context(size=size, seed=seed, out=out, seeds=seeds, tracker=tracker)
        for name in names:
            (ch,) = run_chapters([name], ctx)
            tracker.finish()
            chapters.append(ch)
            _print_chapter(ch)
    return chapters


@app.command()
def demo(
    quick: bool = typer.Option(False, "--quick", help="Smallest size (about half the demo's time); the size the "
                               "tests run."),
    out: str = typer.Option(
        "bnkit-report", help="Folder for index.html, report.md, results.json and the plots."),
    seed: int = typer.Option(0, help="Base random seed (data split, initialisation, shuffling)."),
    threads: int = typer.Option(1, help="torch CPU threads (the models are tiny: one is fastest on a busy machine). "
                             "The README's figures are for 1: other counts sum in another order, so the "
                             "accuracies differ slightly."),
) -> None:
    """Tell the story of BatchNorm at inference on scikit-learn's digits, every number measured in this run."""
    needs("torch", "matplotlib", "sklearn", extra="all")
    from ..study import CHAPTERS

    if not out.strip():
        raise fail("--out must name a folder (got an empty name)")
    code = run_and_report(list(CHAPTERS), "quick" if quick else "demo", seed, Path(out), threads=threads)
    raise typer.Exit(code)
