"""bnkit's PyTorch toolkit: freeze, guard, drop-in layers, recalibrate, fold, audit, convert.

Names are imported lazily from the module that owns them, so an optional dependency
(onnx, keras, flax) is needed only by the function that uses it. ``audit`` and
``recalibrate`` (torch only) are imported eagerly at the end, because they share their
module's name (see there).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # modules.py: finding BN layers
    "BN_TYPES": "modules", "is_batchnorm": "modules", "bn_layers": "modules",
    # io.py: safe checkpoint loading, atomic saving
    "UnsafeCheckpointError": "io", "NotACheckpointError": "io", "load_checkpoint": "io", "load_state_dict_file": "io",
    "save_state_dict_file": "io", "load_weights_into": "io",
    # freeze.py: freezing that survives model.train()
    "freeze_bn": "freeze", "FreezeState": "freeze", "unfreeze_bn": "freeze", "is_frozen": "freeze", "frozen_bn_layers": "freeze",
    # frozen.py: buffer-only frozen layers
    "FrozenBatchNorm1d": "frozen", "FrozenBatchNorm2d": "frozen", "FrozenBatchNorm3d": "frozen", "FrozenBatchNormNd": "frozen",
    "convert_frozen": "frozen", "revert_frozen": "frozen",
    # guard.py: inference guards
    "bn_guard": "guard", "BNGuardError": "guard", "protect_stats": "guard", "BNGuardWarning": "guard", "StatsRollback": "guard",
    # layers.py: drop-in layers for small batches
    "BatchNorm1d": "layers", "BatchNorm2d": "layers", "BatchNorm3d": "layers", "convert_bn": "layers", "revert_bn": "layers",
    # recalibrate.py: exact population statistics
    "recalibrate": "recalibrate", "RecalibrationReport": "recalibrate", "StatisticsRangeError": "recalibrate",
    # fold.py / export.py: deployment
    "fold_bn": "fold", "fold_plan": "fold", "FoldReport": "fold", "FoldVerificationError": "fold",
    "export_onnx": "export",
    # audit.py
    "audit": "audit", "AuditReport": "audit",
    # convert.py: other frameworks and SyncBatchNorm
    "from_keras": "convert", "to_keras": "convert", "from_flax": "convert", "to_flax": "convert",
    "revert_sync_bn": "convert", "BatchNormNd": "convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bnkit.torch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


# ``audit`` and ``recalibrate`` share their module's name. Imported here, the package
# attribute ends as the function for good: a later ``import bnkit.torch.audit`` finds the
# module in ``sys.modules`` and leaves the attribute alone (both need only torch).
from .audit import AuditReport, audit  # noqa: E402
from .recalibrate import RecalibrationReport, recalibrate  # noqa: E402
