"""What a chapter hands back, and the report written from it.

A :class:`Chapter` carries display tables (strings, as printed), findings
(sentences built from the measured numbers), checks (the chapter's headline
claims, each True or False as measured), figures (PNG files written with
matplotlib's Agg backend) and ``data``: the raw numbers, which go to
``results.json``. :func:`write_report` writes ``results.json``, ``index.html``
and ``report.md`` into one folder, each file atomically (written beside its
target, then renamed).
"""
from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_path

__all__ = ["Table", "Figure", "Chapter", "ReportWriteError", "new_figure", "save_figure", "write_report",
           "unavailable"]


@dataclass
class Table:
    """A display table: short column headers (it must read at 80 columns) and ``notes``, lines printed under it
    that spell out the abbreviations."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells, table {self.title!r} has {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])


@dataclass
class Figure:
    path: str  # relative to the report folder
    caption: str


@dataclass
class Chapter:
    number: int
    name: str
    title: str
    claim: str
    status: str = "ok"  # "ok", "unavailable" (did not run) or "failed" (ran and raised)
    reason: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unavailable(number: int, name: str, title: str, claim: str, reason: str, *, status: str = "unavailable") -> Chapter:
    """A chapter that did not run (``unavailable``) or raised (``failed``), saying why; never a made-up result."""
    table = Table(f"{number}. {title}", ["status", "reason"])
    table.add("NOT RUN" if status == "unavailable" else "FAILED", reason)
    return Chapter(number, name, title, claim, status=status, reason=reason, tables=[table])


def new_figure(rows: int = 1, cols: int = 1, *, width: float = 6.4, height: float = 4.2):
    """A matplotlib figure on the Agg backend (no display needed) and its axes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes


class ReportWriteError(OSError):
    """A plot could not be written into the report folder (a full disk, a folder that refuses writes): the run
    cannot make its report, which is no failure of the chapter that drew it (:func:`bnkit.study.run_chapters` lets
    it through)."""


def save_figure(fig, out_dir: Path, name: str, *, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> str:
    """Save ``fig`` as ``out_dir/name`` (PNG, 110 dpi; axes laid out within ``rect``), close it, return its name.
    :class:`ReportWriteError` where the file cannot be written."""
    import matplotlib.pyplot as plt

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.tight_layout(rect=rect)
        fig.savefig(out_dir / name, dpi=110)
    except OSError as exc:
        raise ReportWriteError(exc.errno, exc.strerror or str(exc), str(out_dir / name)) from exc
    finally:
        plt.close(fig)
    return name


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` completely or not at all (:func:`bnkit.atomic.atomic_path`)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def _verdict(ch: Chapter) -> str:
    """How the pages name a chapter that is not ``ok``: one that raised failed, the others did not run."""
    return "failed" if ch.status == "failed" else "did not run"


def _html(chapters: list[Chapter], meta: dict[str, Any]) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>bnkit: BatchNorm at inference, measured</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;line-height:1.45}"
        "table{border-collapse:collapse;margin:0.8em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
        "th{background:#eee}td:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}"
        ".note{font-size:90%;color:#444;margin:0.2em 0}"
        ".fail{color:#b00}.ok{color:#070}.na{color:#b60;font-weight:bold}code{background:#f4f4f4}</style></head><body>",
        "<h1>BatchNorm at inference, measured on scikit-learn's digits</h1>",
        f"<p>Every number below was measured in this run ({e(meta.get('size', ''))} size, "
        f"seed {e(str(meta.get('seed', '')))}, "
        f"{e(str(meta.get('seconds', '')))} s, torch {e(str(meta.get('torch', '')))}). "
        "The raw figures are in <a href='results.json'>results.json</a>.</p>",
    ]
    for ch in chapters:
        parts.append(f"<h2>{ch.number}. {e(ch.title)}</h2><p><em>Claim:</em> {e(ch.claim)}</p>")
        if ch.status != "ok":
            parts.append(f"<p class='na'>This chapter {_verdict(ch)}: {e(ch.reason)}</p>")
        for t in ch.tables:
            parts.append(f"<table><caption>{e(t.title)}</caption><tr>")
            parts.append("".join(f"<th>{e(c)}</th>" for c in t.columns) + "</tr>")
            for row in t.rows:
                parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
            parts.append("</table>")
            parts += [f"<p class='note'>{e(n)}</p>" for n in t.notes]
        if ch.checks:
            parts.append("<ul>")
            for claim, ok in ch.checks.items():
                cls, word = ("ok", "holds") if ok else ("fail", "does NOT hold")
                parts.append(f"<li class='{cls}'>{e(claim)}: {word} in this run</li>")
            parts.append("</ul>")
        if ch.findings:
            parts.append("<ul>" + "".join(f"<li>{e(f)}</li>" for f in ch.findings) + "</ul>")
        for fig in ch.figures:
            parts.append(f"<figure><img src='{e(fig.path)}' alt='{e(fig.caption)}'>"
                         f"<figcaption>{e(fig.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _markdown(chapters: list[Chapter], meta: dict[str, Any]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [
        "# BatchNorm at inference, measured on scikit-learn's digits",
        "",
        f"Every number below was measured in this run ({meta.get('size')} size, seed {meta.get('seed')}, "
        f"{meta.get('seconds')} s, torch {meta.get('torch')}). Raw figures: `results.json`.",
    ]
    for ch in chapters:
        lines += ["", f"## {ch.number}. {ch.title}", "", f"*Claim:* {ch.claim}", ""]
        if ch.status != "ok":
            lines += [f"**This chapter {_verdict(ch)}:** {ch.reason}", ""]
        for t in ch.tables:
            lines += [f"**{t.title}**", "", "| " + " | ".join(map(cell, t.columns)) + " |",
                      "|" + "---|" * len(t.columns)]
            lines += ["| " + " | ".join(map(cell, row)) + " |" for row in t.rows]
            lines.append("")
            lines += [f"*{n}*  " for n in t.notes]
            if t.notes:
                lines.append("")
        lines += [f"- {claim}: {'holds' if ok else 'does NOT hold'} in this run" for claim, ok in ch.checks.items()]
        lines += [f"- {f}" for f in ch.findings]
        lines += [f"\n![{fig.caption}]({fig.path})\n\n*{fig.caption}*" for fig in ch.figures]
    return "\n".join(lines) + "\n"


def write_report(chapters: list[Chapter], out_dir: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """Write ``results.json``, ``index.html`` and ``report.md`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"meta": meta, "chapters": {ch.name: ch.to_dict() for ch in chapters}}
    paths = {"json": out_dir / "results.json", "html": out_dir / "index.html", "markdown": out_dir / "report.md"}
    _write_atomic(paths["json"], json.dumps(_plain(results), indent=2, allow_nan=False) + "\n")
    _write_atomic(paths["html"], _html(chapters, meta))
    _write_atomic(paths["markdown"], _markdown(chapters, meta))
    return paths


def _plain(obj: Any) -> Any:
    """Plain JSON values: NumPy scalars and arrays to Python, NaN and Inf to None (JSON has neither)."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} to results.json")
