"""bnkit: BatchNorm done right from training to deployment.

The top-level package is the NumPy core (no PyTorch needed):
:class:`BatchNorm`, the streaming statistics in :mod:`bnkit.stats`, and the
framework conventions in :mod:`bnkit.conventions`, with
:func:`convert_state` moving a layer between them. The PyTorch toolkit lives in
:mod:`bnkit.torch`, the ONNX tools in :mod:`bnkit.onnx`.
"""
from .batchnorm import BatchNorm, get_num_threads, set_num_threads
from .conventions import CONVENTIONS, Convention, convert_momentum, get_convention
from .convert import convert_state
from .stats import EMA, CumulativeAverage, RunningMoments, batch_moments, ema_table, ema_update

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "CONVENTIONS",
    "Convention",
    "convert_momentum",
    "convert_state",
    "get_convention",
    "EMA",
    "CumulativeAverage",
    "RunningMoments",
    "batch_moments",
    "ema_table",
    "ema_update",
    "get_num_threads",
    "set_num_threads",
]
