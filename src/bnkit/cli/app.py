"""The typer application every ``bnkit`` subcommand registers on.

Command modules import heavy dependencies (torch, onnx, matplotlib) inside
their functions, so ``bnkit --help`` stays fast and the core needs only NumPy.
"""
from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="bnkit",
    help="BatchNorm done right from training to deployment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print an error in red and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)
