"""Validation of the numbers and arrays users hand the NumPy core: refused with a specific error, never coerced.

NumPy's own casts would take a bool for 1, truncate 1.9 to 1, and parse the string ``"1"`` as 1.0; PyTorch refuses
strings, and an axis or a size given as a fraction is a mistake, not a request to round. What converts exactly is
taken: NumPy scalars, 0-d arrays and tensors, ``Decimal`` and ``Fraction`` values.
"""
from __future__ import annotations

import operator

import numpy as np

_ALL_REAL = object()  # what a search for a non-number in an object array finds when there is none


def _kind(value: object) -> str:
    return f"{value!r} (a {type(value).__name__})"


def integer(value: object, what: str) -> int:
    """``value`` as an int (anything ``operator.index`` takes); a bool, a fraction or a non-number is refused
    (ValueError), naming ``what``."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {_kind(value)}") from None


def _is_number(value: object) -> bool:
    """A value ``float()`` converts as a number, not by parsing text: no string, bytes or None."""
    return not isinstance(value, (str, bytes)) and hasattr(type(value), "__float__")


def real(value: object, what: str) -> float:
    """``value`` as a float; a bool, a string or another non-number is refused (ValueError), naming ``what``."""
    complex_ = value.is_complex() if callable(getattr(value, "is_complex", None)) else np.iscomplexobj(value)
    boolean = str(getattr(value, "dtype", "")) in ("bool", "torch.bool") or (  # a 0-d bool array or tensor
        isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype == object
        and isinstance(value.item(), (bool, np.bool_)))
    if (isinstance(value, (bool, np.bool_)) or boolean or not _is_number(value) or complex_
            or getattr(value, "ndim", 0) != 0):  # complex (float() would drop the imaginary part), an array
        raise ValueError(f"{what} must be a real number, got {_kind(value)}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError, RuntimeError):  # Fraction(10**400); torch's own refusals
        raise ValueError(f"{what} must be a real number within float64's range, got {_kind(value)}") from None


def real_or(value: object, fallback: object) -> object:
    """``value`` as a float where :func:`real` takes it (0-d arrays and tensors too), else ``fallback``."""
    try:
        return real(value, "")
    except ValueError:
        return fallback


def ml_float(dtype: np.dtype) -> bool:
    """One of ml_dtypes' float types (bfloat16, float8_*, float6_*, float4_*: JAX, Keras), which NumPy does not
    count as floating; each holds only values float32 holds exactly."""
    return dtype.kind in "fV" and dtype.name.startswith(("bfloat", "float")) and not np.issubdtype(dtype, np.floating)


def ml_int(dtype: np.dtype) -> bool:
    """One of ml_dtypes' integer types (int4, uint4, int2, ...), which NumPy does not count as integers."""
    return dtype.kind == "V" and dtype.name.startswith(("int", "uint"))


def real_array(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` with a native floating dtype: a big-endian one in the native byte order (NumPy's reductions refuse it
    as a dtype argument), ml_dtypes' floats widened to float32 (:func:`ml_float`), integers (ml_dtypes' int4 and
    the like too), bools and an object array of numbers as float64 (exact). Complex values, strings and bytes, and
    an object array holding anything but numbers (None, a string) are refused (TypeError), naming ``what``."""
    if np.iscomplexobj(x):
        raise TypeError(f"{what} must be real, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))
    if ml_float(x.dtype):
        return x.astype(np.float32)
    if x.dtype.kind in "iub" or ml_int(x.dtype):
        return x.astype(np.float64)
    if x.dtype.kind == "O":
        odd = next((v for v in x.flat if not _is_number(v) or np.iscomplexobj(v)), _ALL_REAL)
        if odd is not _ALL_REAL:
            raise TypeError(f"{what} must hold real numbers, got {_kind(odd)} in an object array")
        try:
            return x.astype(np.float64)
        except (TypeError, ValueError, OverflowError):  # cells holding arrays of several values, or 10**400
            raise TypeError(f"{what} must hold one real number within float64's range per cell, got an object "
                            "array of other things") from None
    raise TypeError(f"{what} must hold real numbers, got dtype {x.dtype}")


def native_array(a: np.ndarray) -> np.ndarray:
    """``a`` as ``torch.from_numpy`` takes it: copied to the native byte order (a big-endian file) and to positive
    strides (``a[::-1]``) where it is not; else ``a`` itself."""
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return a.copy() if any(stride < 0 for stride in a.strides) else a
