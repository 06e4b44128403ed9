"""Atomic file writes: a file is either written completely or not at all.

Every tool that writes a model, a graph or a report writes to a temporary file beside
the target and renames it over the target only when the write finished, so a failure
(or Ctrl-C) never leaves a half-written file and never touches an existing one.
"""
from __future__ import annotations

import os
import secrets
import signal
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "check_target"]


def check_target(path: str | os.PathLike, example: str = "model.onnx") -> Path:
    """``path`` as a Path; IsADirectoryError when it names an existing folder, which no file can replace, or ends in
    a separator, ``.`` or ``..`` (``out/``, ``out/.``: a folder, as ``open`` takes it, which ``Path`` would read as
    the file ``out``). The error suggests the file ``example`` in that folder.

    Writers call it before their work, so a wrong output path fails at once, not after an export or a fold.
    """
    text = os.fsdecode(path)
    if text.replace(os.sep, "/").rsplit("/", 1)[-1] in ("", ".", ".."):
        raise IsADirectoryError(f"{text} names a folder (it ends in a separator, '.' or '..'): name the file to "
                                f"write (e.g. {Path(text) / example})")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: name the file to write (e.g. {path / example})")
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it over ``path`` when the block ends normally.

    On any exception (``KeyboardInterrupt`` included) the temporary file is deleted and ``path`` is left as
    it was; so it is on SIGTERM while the block runs (``kill``, ``timeout``, a scheduler's preemption), which
    then raises ``SystemExit(143)``, where SIGTERM has its default action and this is the main thread. The
    new file's data reaches the disk (``fsync``) before the rename, and the rename before this returns, so a
    crash right after never leaves an empty file where the old one was. Missing parent directories are created;
    they stay when the write fails (removing them again could take a folder from under another writer that found
    it there).
    The file keeps the mode of the file it replaces, and otherwise gets the usual ``0o666 & ~umask``, as ``open``
    gives it. A symbolic link at ``path`` is replaced by the new file (with the mode of the file it pointed to,
    which is left as it was), as ``os.replace`` does. A folder at ``path`` raises :func:`check_target`'s error
    before anything is created.
    """
    path = check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_beside(path)
    fresh = stat.S_IMODE(os.stat(tmp).st_mode)  # open's 0o666 & ~umask
    try:
        with sigterm_exits():
            yield tmp
            _fsync(tmp)  # before the chmod: the old file's mode may not let us read the new one
            # the old file's mode, or open's default where a writer replaced the temporary file with one of its own
            # (safetensors' save_file writes its own at 0o600)
            mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else fresh
            if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
                os.chmod(tmp, mode)
            os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (``SystemExit(143)``, so cleanup runs) instead of
    ending the process on the spot; only where it has its default action (a handler or an ignore set by the
    program is kept) and on the main thread (the only one that may set handlers). Only then: a Python handler
    waits for the main thread to come back from C code, which would delay a SIGTERM during a long collective or
    wait."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Terminated(SystemExit):
    """SIGTERM turned into an exit (status 143) by :func:`sigterm_exits`, so that cleanup runs: never a failure of
    the code it interrupted, which guards that catch ``SystemExit`` from users' code let through."""


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise Terminated(128 + signum)


def _create_beside(path: Path) -> str:
    """Create an empty, uniquely named file in ``path``'s folder, with ``open``'s default mode (the kernel
    applies the umask: reading it with ``os.umask`` would briefly change it for every thread)."""
    stem = path.name
    while len(os.fsencode(stem)) > 200:  # a name may have 255 bytes: room for the temporary name's additions
        stem = stem[:-1]
    for _ in range(100):
        tmp = path.parent / f".{stem}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(tmp)
    raise FileExistsError(f"no free temporary name beside {path}")


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to the disk; folders cannot be opened for this everywhere."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)
