"""Float16 / bfloat16 limits that the PyTorch fold (:mod:`bnkit.torch.fold`, ``bnkit fold --model``) and the ONNX
fold (:mod:`bnkit.onnx.fold`) share, so both judge a low-precision fold alike.

Unit roundoff: float16 ``2**-11``, bfloat16 ``2**-8``. A folded model and the original, each computed in that
precision, differ by a few of them; the check allows about ten (float16 with more margin).
"""
from __future__ import annotations

from collections.abc import Iterable

__all__ = ["FOLD_TOLERANCE", "fold_tolerance", "OFFSET_NOTE_RATIO", "FLOAT32_OFFSET_NOTE_RATIO"]

#: Relative tolerance of a fold check by the least precise float the model holds or computes.
FOLD_TOLERANCE = {"bfloat16": 4e-2, "float16": 1e-2}
#: The tolerance for float32 and wider.
_DEFAULT = 1e-4

#: ``|mean| / sqrt(var + eps)`` above which a float16/bfloat16 fold gets a note: the folded layer can lose about
#: that many times its precision on data that far from zero, which random verification inputs do not show.
OFFSET_NOTE_RATIO = 8.0
#: The same for a float32 layer a BN is folded *before*: about 1e3 float32 roundoffs (6e-8) reach the 1e-4 a
#: float32 fold check allows (measured: 6e-5 relative at 1e3, 6e-4 at 1e4, on data around the running mean).
FLOAT32_OFFSET_NOTE_RATIO = 1e3


def fold_tolerance(dtypes: Iterable[str]) -> float:
    """The tolerance for a model holding or computing these dtypes (NumPy/PyTorch names: ``"float16"``, ...)."""
    return max((FOLD_TOLERANCE[d] for d in dtypes if d in FOLD_TOLERANCE), default=_DEFAULT)
