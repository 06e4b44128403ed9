"""``bnkit study NAME``: one chapter of the demo at full size (more seeds, batch sizes, epochs)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, fail
from .demo import run_and_report


@app.command()
def study(
    name: str = typer.Argument(..., help="Chapter: running-stats, two-modes, batch-size, fine-tuning or deployment."),
    seeds: Optional[int] = typer.Option(None, help="Number of seeds (default: the chapter's full-size count)."),
    out: Optional[Path] = typer.Option(None, help="Report folder (default bnkit-report/study-NAME)."),
    size: str = typer.Option("full", help="full, demo or quick."),
    seed: int = typer.Option(0, help="Base random seed."),
    threads: int = typer.Option(1, help="torch CPU threads."),
) -> None:
    """Run one chapter at full size and write its report, for the real curves."""
    from ..study import CHAPTERS, SIZES, chapter_module

    if name not in CHAPTERS:
        raise fail(f"unknown study {name!r}; choose from {', '.join(CHAPTERS)}")
    if size not in SIZES:
        raise fail(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    if seeds is not None and seeds < 1:
        raise fail(f"--seeds must be at least 1, got {seeds}")
    if seeds is not None and "seeds" not in chapter_module(name).SIZES[size]:
        raise fail(f"--seeds: the {name} chapter trains one model with the base --seed; it has no seed count")
    out = out if out is not None else Path("bnkit-report") / f"study-{name}"
    raise typer.Exit(run_and_report([name], size, seed, out, seeds=seeds, threads=threads))
