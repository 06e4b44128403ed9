"""The typer application every ``bnkit`` subcommand registers on.

Command modules import heavy dependencies (torch, onnx, matplotlib) inside
their functions, so ``bnkit --help`` stays fast and the core needs only NumPy.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterable, Iterator

import typer
from rich.console import Console, ConsoleOptions, RenderableType
from rich.segment import Segment
from rich.text import Text

app = typer.Typer(
    name="bnkit",
    help="BatchNorm done right from training to deployment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
#: C0 controls but tab and newline, DEL, and C1 controls: their visible symbols (``␛`` for ESC), one each.
_SHOWN = {**{c: 0x2400 + c for c in range(0x20) if c not in (0x09, 0x0A)}, 0x7F: 0x2421,
          **{c: 0xFFFD for c in range(0x80, 0xA0)}}


def shown(text: str) -> str:
    """``text`` (a name read from a file) with its control characters as the consoles show them: put into a table
    so, it is measured at the width it prints at (rich counts a control character as no column)."""
    return text.translate(_SHOWN)


class _Console(Console):
    """A rich Console that shows control characters in what it prints as visible symbols: a layer or node name
    read from a file (``"x\x1b[31m..."``) reaches the terminal as text, never as an escape sequence. rich's own
    styling and cursor control are not text, and stay as they are."""

    def render(self, renderable: RenderableType, options: ConsoleOptions | None = None) -> Iterable[Segment]:
        for segment in super().render(renderable, options):
            yield segment if segment.control else Segment(segment.text.translate(_SHOWN), segment.style)

    def on_broken_pipe(self) -> None:
        """The reader of this console's stream has gone: what it prints from now on is dropped (the stream's
        descriptor pointed at os.devnull) and the command runs to its own exit status. rich's own pointed stdout
        there whatever the stream, and exited 1: a note on stderr whose reader had gone lost an audit's report."""
        try:
            fd = self.file.fileno()
        except (AttributeError, OSError, ValueError):  # no descriptor (a test's buffer): nothing to point elsewhere
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)


console = _Console()
#: Errors go to stderr, so stdout stays what a command prints (``--json`` stays JSON when it fails).
err_console = _Console(stderr=True)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print an error in red on stderr and return the Exit to raise."""
    # As Text, not markup (messages quote lists and paths with brackets, and escape() doubles a trailing
    # backslash), and soft-wrapped: rich inserts no line breaks, so a long path stays whole for copying and for
    # tests that read the message.
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    return typer.Exit(code)


def note(message: str) -> None:
    """Print a note in yellow on stderr (stdout stays the command's output)."""
    err_console.print(Text.assemble(("note:", "yellow"), " ", message), soft_wrap=True)


@contextlib.contextmanager
def warnings_as_notes(words: Callable[[str], str] = str) -> Iterator[None]:
    """Print each distinct warning bnkit raises inside as a :func:`note` (``words`` rewords its advice for the command
    line), also when the block fails, instead of Python's ``file:line: UserWarning`` lines; other code's warnings
    (the user's model, torch) keep that form, their origin. The warning filters in force decide what is shown."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bnkit/
    with warnings.catch_warnings(record=True) as caught:
        try:
            yield
        finally:
            shown = set()
            for w in caught:
                ours = os.path.abspath(w.filename).startswith(package + os.sep)
                text = str(w.message) if ours else warnings.formatwarning(
                    w.message, w.category, w.filename, w.lineno, w.line).rstrip()
                if text in shown:
                    continue
                shown.add(text)
                if ours:
                    note(words(text))
                else:
                    err_console.print(Text(text), soft_wrap=True)


def needs(*modules: str, extra: str) -> None:
    """Exit 2 with the install line when a module the command imports is not installed (the base install gives the
    ``bnkit`` command with NumPy alone; torch, onnx and the study's libraries are extras), or is installed but fails
    to import (a broken wheel, a missing shared library, a NumPy it was not built for)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise fail(f"this needs {', '.join(missing)}, which is not installed: pip install 'bnkit[{extra}]'"
                   + (" (torch==2.13.0 first, see README)" if "torch" in missing else ""))
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # whatever a broken install raises, never a traceback
            raise fail(f"this needs {module}, which is installed but cannot be imported ({type(exc).__name__}: "
                       f"{exc}); reinstall it"
                       + (": pip install --force-reinstall torch==2.13.0 (see README)" if module == "torch" else
                          f": pip install --force-reinstall 'bnkit[{extra}]'")) from None
