"""``bnkit`` command line. Each command lives in its own module and registers on :data:`app`.

Every module of this package other than ``app`` and ``common`` is a command
module; importing it registers its commands, so adding a command is adding a file.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

from ._stdout import ReaderGoneSink
from .app import app

_NOT_COMMANDS = {"app", "common"}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _NOT_COMMANDS and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def main() -> None:
    sys.stdout = ReaderGoneSink(sys.stdout)  # output past a closed reader (| head) must not fail the command
    app()
