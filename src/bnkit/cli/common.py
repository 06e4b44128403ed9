"""Helpers shared by CLI commands: resolving ``package.module:attr`` specs."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any


def resolve_spec(spec: str) -> Any:
    """Import ``package.module:attr`` (attr may be dotted) and return the object.

    The current directory is put on ``sys.path`` first so users can point at
    their own modules without installing them.
    """
    if ":" not in spec:
        raise ValueError(f"expected 'package.module:name', got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {mod_name!r} from {spec!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r}") from None
    return obj
