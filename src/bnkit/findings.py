"""A finding of an audit: what is wrong with which BatchNorm layer, and what to do.

Shared by :mod:`bnkit.torch.audit` and :mod:`bnkit.onnx`; NumPy-free and torch-free.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Finding", "SEVERITIES", "worst_severity", "jsonable"]

#: From most to least severe. ``error`` means the model gives wrong outputs at inference.
SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    severity: str
    layer: str
    finding: str
    evidence: str = ""
    fix: str = ""
    code: str = ""
    data: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def worst_severity(findings) -> str | None:
    """The most severe level among ``findings``, or None if there are none."""
    levels = {f.severity for f in findings}
    return next((s for s in SEVERITIES if s in levels), None)


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy/torch arrays and scalars as lists and numbers, and NaN/Inf as the strings ``"nan"``,
    ``"inf"``, ``"-inf"``: strict JSON (RFC 8259) has no token for them, and audits report such values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # NumPy/torch, without importing them
        return jsonable(obj.tolist())
    return obj
