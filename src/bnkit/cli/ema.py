"""``bnkit ema``: the lesson's worked example of a running mean, computed."""
from __future__ import annotations

import math
from typing import List, Optional

import typer
from rich.table import Table

from ..stats import ema_table
from .app import app, console, fail
from .tables import print_table

MAX_STEPS = 10_000  # a worked example, not a simulation: 10000 rows take well under a second


@app.command()
def ema(
    values: List[float] = typer.Argument(..., help="Batch means, in order."),
    fill: Optional[float] = typer.Option(None, help="Value for the batches after the given ones."),
    steps: Optional[int] = typer.Option(
        None, help=f"Total number of batches, at most {MAX_STEPS} (needs --fill if more than the values given)."),
    decay: float = typer.Option(
        0.9, help="Weight on the OLD running value (the lesson's alpha; Keras/ONNX/Flax side)."),
    init: float = typer.Option(0.0, help="Initial running value."),
    show: str = typer.Option("auto", help="'all' rows, or 'auto': the given batches plus every 10th and the last."),
) -> None:
    """Print the running mean after each batch, with the bias-corrected mean beside it.

    Negative batch means go after ``--``: ``bnkit ema --fill -1 --steps 3 -- -4.2 1``.
    """
    if show not in ("auto", "all"):
        raise fail(f"--show must be 'auto' or 'all', got {show!r}")
    named = [(f"batch mean #{i}", v) for i, v in enumerate(values, start=1)] + [("--fill", fill), ("--init", init)]
    for name, given in named:
        if given is not None and not math.isfinite(given):
            raise fail(f"{name} is {given}: every value must be a finite number (no NaN or Inf)")
    n = steps if steps is not None else len(values)
    if n > MAX_STEPS:
        raise fail(f"{n} batches (--steps) exceed the maximum of {MAX_STEPS}")
    if n < len(values):
        raise fail(f"--steps {n} is fewer than the {len(values)} values given")
    if n > len(values) and fill is None:
        raise fail("--steps exceeds the values given: pass --fill for the remaining batches")
    if n == len(values) and fill is not None:
        raise fail(f"--fill has no batch to fill: --steps ({n}) must exceed the {len(values)} values given")
    if not 0.0 <= decay <= 1.0:
        raise fail(f"--decay must be in [0, 1], got {decay}")
    series = list(values) + [fill] * (n - len(values))
    rows = ema_table(series, decay, init)
    new = 1.0 - decay  # the batch's weight as the rows (and Keras) compute it, shown to float64's 15 sure digits
    table = Table(title=f"Running mean, running = {decay!r} * running + {new:.15g} * batch_mean (start {init})")
    for column in ("batch", "batch mean", "running mean", "bias-corrected"):
        table.add_column(column, justify="right", overflow="fold")  # a narrow console folds numbers, never cuts them
    for step, v, run, corr in rows:
        if show == "all" or step <= len(values) or step % 10 == 0 or step == n:
            table.add_row(str(step), repr(v), f"{run:.6g}", f"{corr:.6g}")
    print_table(console, table)
    console.print(
        "bias-corrected = (running - decay^t * start) / (1 - decay^t): the weighted mean of the batches seen, "
        "free of the pull toward the starting value" + (" (at decay 1, where that is 0/0, its limit: the plain mean)."
                                                         if decay == 1.0 else ".")
    )
