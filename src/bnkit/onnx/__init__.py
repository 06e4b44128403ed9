"""bnkit's ONNX tools: audit and fold BatchNormalization nodes, verified with onnxruntime.

Needs ``onnx`` (and ``onnxruntime`` for verification), never torch::

    from bnkit.onnx import audit, fold
    report = audit("model.onnx")          # .findings (bnkit.findings.Finding), .ok
    folded = fold("model.onnx", "folded.onnx")   # .folded, .left, .max_abs_diff, .max_rel_diff
"""
from __future__ import annotations

from .audit import OnnxAuditReport, audit
from .fold import FoldedNode, FoldVerificationError, OnnxFoldReport, fold, fold_model
from .verify import OnnxRuntimeError

__all__ = ["audit", "OnnxAuditReport", "fold", "fold_model", "OnnxFoldReport", "FoldedNode", "FoldVerificationError",
           "OnnxRuntimeError"]
