"""Atomic file writes: a file is either written completely or not at all.

Every tool that writes a model, a graph or a report writes to a temporary file beside
the target and renames it over the target only when the write finished, so a failure
(or Ctrl-C) never leaves a half-written file and never touches an existing one.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "check_target"]


def check_target(path: str | os.PathLike) -> Path:
    """``path`` as a Path; IsADirectoryError when it names an existing folder, which no file can replace.

    Writers call it before their work, so a wrong output path fails at once, not after an export or a fold.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: name the file to write (e.g. {path / 'model.onnx'})")
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it over ``path`` when the block ends normally.

    On any exception (``KeyboardInterrupt`` included) the temporary file is deleted and
    ``path`` is left as it was. Missing parent directories are created. The file gets the
    usual ``0o666 & ~umask`` mode (``mkstemp`` alone would make it private, 0600). A folder at ``path``
    raises :func:`check_target`'s error before anything is created.
    """
    path = check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
