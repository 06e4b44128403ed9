"""``bnkit study NAME``: one chapter of the demo at full size (more seeds, batch sizes, epochs)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, fail, needs
from .demo import run_and_report


#: each chapter's name, then its title and claim in a line (the full claim is in bnkit.study.<module>.CLAIM;
#: kept here so ``bnkit --help`` does not import the chapters, which import torch).
CHAPTER_HELP = {
    "running-stats": "1. Running statistics track the population: the EMA of batch statistics approaches the "
                     "population's and then wobbles at a noise floor set by its momentum and the batch size, so eval "
                     "mode needs no batch.",
    "two-modes": "2. Two modes: training mode normalizes with the batch's statistics (a batch of one collapses); "
                 "eval mode gives the same output at any batch size.",
    "batch-size": "3. Batch size and statistics quality: small batches make noisy running statistics and lower "
                  "eval accuracy, mostly not through that noise: exact statistics recover less than half of the gap "
                  "to a batch-independent norm, batch renorm more.",
    "fine-tuning": "4. Fine-tuning and freezing: model.eval() on BN layers is undone by model.train(); a real freeze "
                   "keeps the statistics, recalibration adapts them on purpose.",
    "deployment": "5. Deployment: in eval mode BN is a fixed affine map, so it folds into the layer before it and "
                  "exports to ONNX with the same outputs.",
}
_HELP = ("Run one chapter at full size and write its report, for the real curves.\n\n"
         "Chapters (NAME: title and claim):\n\n"
         + "\n\n".join(f"{name}: {line}" for name, line in CHAPTER_HELP.items()))


@app.command(help=_HELP)
def study(
    name: str = typer.Argument(..., help=f"Chapter: {', '.join(CHAPTER_HELP)} (listed above)."),
    seeds: Optional[int] = typer.Option(None, help="Number of seeds (default: the chapter's count for the chosen --size)."),
    out: Optional[str] = typer.Option(None, help="Report folder (default bnkit-report/study-NAME)."),
    size: str = typer.Option("full", help="full, demo or quick."),
    seed: int = typer.Option(0, help="Base random seed."),
    threads: int = typer.Option(1, help="torch CPU threads (the README's figures are for 1: other counts sum in "
                             "another order, so the accuracies differ slightly)."),
) -> None:
    needs("torch", "matplotlib", "sklearn", extra="all")
    from ..study import CHAPTERS, SIZES, chapter_module

    if name not in CHAPTERS:
        raise fail(f"unknown study {name!r}; choose from {', '.join(CHAPTERS)}")
    if size not in SIZES:
        raise fail(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    if seeds is not None and seeds < 1:
        raise fail(f"--seeds must be at least 1, got {seeds}")
    if seeds is not None and "seeds" not in chapter_module(name).SIZES[size]:
        raise fail(f"--seeds: the {name} chapter trains one model with the base --seed; it has no seed count")
    if out is not None and not out.strip():
        raise fail("--out must name a folder (got an empty name)")
    folder = Path(out) if out is not None else Path("bnkit-report") / f"study-{name}"
    raise typer.Exit(run_and_report([name], size, seed, folder, seeds=seeds, threads=threads))
