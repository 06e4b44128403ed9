"""Standard output for the command line that outlives its reader (``bnkit audit model.pt | head -1``)."""
from __future__ import annotations

import os
from typing import Any, TextIO


class ReaderGoneSink:
    """``sys.stdout`` whose writes, once the reader of its pipe has gone, are dropped instead of raising.

    Python ignores SIGPIPE, so a write to a pipe nobody reads raises ``BrokenPipeError``, which typer turns
    into exit status 1 mid-command: an audit with no error finding, or a recalibration whose file was written,
    would report failure. Here the first such error points the descriptor at ``os.devnull`` (so the buffered
    rest and the interpreter's last flush go nowhere, silently), the command runs to its end and exits with
    its own status, as it does when its whole output fits in the pipe.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def _drop(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... as the stream has them
        return getattr(self._stream, name)
