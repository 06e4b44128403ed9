"""Validation of the numbers and arrays users hand the NumPy core: refused with a specific error, never coerced.

NumPy's own casts would take a bool for 1, truncate 1.9 to 1, and parse the string ``"1"`` as 1.0; PyTorch refuses
strings, and an axis or a size given as a fraction is a mistake, not a request to round.
"""
from __future__ import annotations

import numbers

import numpy as np

_ALL_REAL = object()  # what a search for a non-number in an object array finds when there is none


def integer(value: object, what: str) -> int:
    """``value`` as an int; a bool, a fraction or a non-number is refused (ValueError), naming ``what``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return int(value)


def real(value: object, what: str) -> float:
    """``value`` as a float; a bool, a string or another non-number is refused (ValueError), naming ``what``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a real number, got {value!r}")
    return float(value)


def real_array(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` with a floating dtype: integers, bools and an object array of real numbers as float64. Complex values
    (TypeError), strings and bytes, and an object array holding anything but real numbers (None, a string) are
    refused (TypeError), naming ``what``."""
    if np.iscomplexobj(x):
        raise TypeError(f"{what} must be real, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        return x
    if x.dtype.kind in "iub":
        return x.astype(np.float64)
    if x.dtype.kind == "O":
        odd = next((v for v in x.flat if not isinstance(v, (numbers.Real, np.bool_))), _ALL_REAL)
        if odd is _ALL_REAL:
            return x.astype(np.float64)
        raise TypeError(f"{what} must hold real numbers, got {odd!r} (a {type(odd).__name__}) in an object array")
    raise TypeError(f"{what} must hold real numbers, got dtype {x.dtype}")
