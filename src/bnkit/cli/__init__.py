"""``bnkit`` command line. Each command lives in its own module and registers on :data:`app`."""
from __future__ import annotations

from .app import app

# Importing a command module registers its commands.
from . import ema  # noqa: E402,F401
from . import demo  # noqa: E402,F401


def main() -> None:
    app()
