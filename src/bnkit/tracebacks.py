"""Where an exception came from: the package whose code raised it (the innermost frame of its traceback).

Used to tell bnkit's own messages from errors of users' code (the CLI), and PyTorch's loader meeting a damaged
file from a trusted pickle's own calls (:func:`bnkit.torch.io.load_checkpoint`).
"""
from __future__ import annotations

__all__ = ["raised_in"]


def raised_in(exc: BaseException, package: str) -> bool:
    """Whether the innermost Python frame of ``exc``'s traceback runs code of ``package`` (or one of its modules)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    name = str(tb.tb_frame.f_globals.get("__name__", "")) if tb is not None else ""
    return name == package or name.startswith(package + ".")
