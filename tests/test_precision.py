"""bnkit.precision.fold_tolerance: a fold check's tolerance follows the least precise float a model holds."""
from __future__ import annotations

import numpy as np
import pytest

from bnkit.precision import fold_tolerance

# unit roundoff (half the machine epsilon): NumPy's limits, and bfloat16's 8 significant bits (no NumPy type)
UNIT = {"float16": np.finfo(np.float16).eps / 2, "float32": np.finfo(np.float32).eps / 2, "bfloat16": 2.0**-8}


@pytest.mark.parametrize("dtypes, least", [
    ([], "float32"),
    (["float32", "float64", "int64"], "float32"),
    (["float32", "float16"], "float16"),
    (["bfloat16", "float32"], "bfloat16"),
    # a model mixing both: bfloat16 (unit roundoff 2^-8) is the less precise, 8 times float16's 2^-11
    (["float32", "float16", "bfloat16"], "bfloat16"),
    (["bfloat16", "float16"], "bfloat16"),
])
def test_tolerance_is_that_of_the_least_precise_dtype(dtypes, least):
    tolerance = fold_tolerance(iter(dtypes))  # any iterable, a generator included
    # a few unit roundoffs of the least precise dtype fit (an exact fold rounded in it differs by that much) ...
    assert tolerance >= 8 * UNIT[least]
    # ... but a fold 10% off still fails
    assert tolerance < 0.1
    assert tolerance == fold_tolerance([least])
