"""The lesson on BatchNorm at inference, checked chapter by chapter on real data.

Each chapter module exposes ``NUMBER``, ``TITLE``, ``CLAIM``, ``REQUIRES`` (the
``bnkit.torch`` names it needs), ``SIZES`` (``quick``/``demo``/``full``), ``PLOTS`` (the
file names of the plots it writes, known before it runs) and ``run(ctx) -> Chapter``, and
``SEED_OFFSET`` where it seeds a random stream with more than the run's seed (base seed +
seed index; see :func:`max_base_seed`). :func:`run_chapters` runs them in order; a chapter
whose ``bnkit.torch`` dependencies are missing is reported as not run, with
the reason, never faked. ``bnkit demo`` runs all chapters at the ``demo`` (or
``quick``) size; ``bnkit study NAME`` runs one at the ``full`` size.
"""
from __future__ import annotations

import importlib
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from .report import Chapter, ReportWriteError, unavailable

__all__ = ["CHAPTERS", "SIZES", "MAX_SEED", "Tracker", "Context", "run_chapters", "missing_dependencies",
           "max_base_seed", "check_seed"]

#: chapter name -> module under ``bnkit.study``, in the order they are told.
CHAPTERS: dict[str, str] = {
    "running-stats": "running",
    "two-modes": "modes",
    "batch-size": "batchsize",
    "fine-tuning": "finetune",
    "deployment": "deploy",
}
SIZES = ("quick", "demo", "full")
#: The largest seed NumPy takes (scikit-learn's ``random_state``, the data split); torch's generators take more.
MAX_SEED = 2**32 - 1


class Tracker(Protocol):
    """Progress reporting: one task per chapter, advanced in work units (epochs, passes)."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class NullTracker:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


@dataclass
class Context:
    """What a chapter runs with: its size, base seed, seed count override, figure folder, progress."""

    size: str = "demo"
    seed: int = 0
    out: Path = Path("bnkit-report")
    seeds: int | None = None
    tracker: Tracker = field(default_factory=NullTracker)

    def params(self, sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The chapter's parameters at this size; ``seeds`` overridden when given."""
        if self.size not in sizes:
            raise ValueError(f"size must be one of {sorted(sizes)}, got {self.size!r}")
        p = dict(sizes[self.size])
        if self.seeds is not None:
            if self.seeds < 1:
                raise ValueError(f"seeds must be >= 1, got {self.seeds}")
            p["seeds"] = self.seeds
        return p


def missing_dependencies(names: tuple[str, ...]) -> list[str]:
    """The ``bnkit.torch`` names among ``names`` that cannot be imported, each with the reason."""
    import bnkit.torch as bt

    missing = []
    for name in names:
        try:
            getattr(bt, name)
        except ModuleNotFoundError as exc:
            missing.append(f"bnkit.torch.{name} (module {exc.name} does not exist yet)")
        except (ImportError, AttributeError) as exc:
            missing.append(f"bnkit.torch.{name} ({exc})")
    return missing


def chapter_module(name: str) -> ModuleType:
    """The module of chapter ``name`` (a key of :data:`CHAPTERS`)."""
    if name not in CHAPTERS:
        raise ValueError(f"unknown chapter {name!r}; choose from {', '.join(CHAPTERS)}")
    return importlib.import_module(f"{__name__}.{CHAPTERS[name]}")


def max_base_seed(names: list[str], size: str, seeds: int | None = None) -> int:
    """The largest base seed the named chapters can run with at ``size`` (``seeds`` overriding the seed count).

    Each chapter seeds its random streams with the base seed plus the seed index (up to its seed count - 1) plus,
    for some streams, its ``SEED_OFFSET``; every such seed must stay within :data:`MAX_SEED`.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    largest = 0
    for name in names:
        mod = chapter_module(name)
        params = mod.SIZES[size]
        count = seeds if seeds is not None and "seeds" in params else params.get("seeds", 1)
        largest = max(largest, count - 1 + getattr(mod, "SEED_OFFSET", 0))
    return MAX_SEED - largest


def check_seed(names: list[str], size: str, seed: int, seeds: int | None = None) -> None:
    """ValueError unless ``seed`` (and ``seeds``) keep every seed the named chapters derive within :data:`MAX_SEED`."""
    top = max_base_seed(names, size, seeds)
    if top < 0:
        raise ValueError(f"seeds {seeds} is too large: the seeds would pass NumPy's limit, 2**32 - 1")
    if not 0 <= seed <= top:
        raise ValueError(f"seed must be between 0 and {top}, got {seed} (the chapters add up to {MAX_SEED - top} "
                         "to it for their random streams, and every seed is kept within 2**32 - 1, NumPy's limit)")


def run_chapters(names: list[str], ctx: Context) -> list[Chapter]:
    """Run the named chapters in order. A chapter that raises is reported as failed, with the error, but for
    :class:`~bnkit.study.report.ReportWriteError` (its plot could not be written), which ends the run.

    A seed outside ``0..max_base_seed(...)`` raises ValueError before any chapter runs.
    """
    check_seed(names, ctx.size, ctx.seed, ctx.seeds)
    ctx.out.mkdir(parents=True, exist_ok=True)
    chapters = []
    for name in names:
        mod = chapter_module(name)
        start = time.perf_counter()
        missing = missing_dependencies(mod.REQUIRES)
        if missing:
            ch = unavailable(mod.NUMBER, name, mod.TITLE, mod.CLAIM, "needs " + "; ".join(missing))
        else:
            try:
                ch = mod.run(ctx)
            except ReportWriteError:  # the report folder, not the chapter: the CLI keeps the previous report
                raise
            except Exception as exc:  # report it in the table and results.json; the CLI exits non-zero
                reason = f"{type(exc).__name__}: {exc}"
                ch = unavailable(mod.NUMBER, name, mod.TITLE, mod.CLAIM, reason, status="failed")
                ch.data["traceback"] = traceback.format_exc()
        ch.seconds = round(time.perf_counter() - start, 2)
        chapters.append(ch)
    return chapters
