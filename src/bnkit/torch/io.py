"""Loading and saving weights safely.

Checkpoints are loaded with ``torch.load(..., weights_only=True)``: a pickle
that would run code (any global outside PyTorch's allow-list) is refused with
:class:`UnsafeCheckpointError` and never executed, unless the caller opts in
with ``trust=True``. ``.safetensors`` files are read with safetensors, which
cannot execute code. Saving is atomic: the file is written beside the target
and renamed over it only when complete, so a failure never leaves a
half-written file or touches an existing one.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from ..atomic import atomic_path

__all__ = ["UnsafeCheckpointError", "load_checkpoint", "load_state_dict_file", "save_state_dict_file"]

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "ema")


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint contains pickled code and was not loaded."""


def load_checkpoint(path: str | os.PathLike, *, trust: bool = False, map_location: str = "cpu") -> object:
    """Load a ``.pt``/``.pth``/``.bin``/``.ckpt`` or ``.safetensors`` file without running code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=map_location)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a valid safetensors file: {exc}") from exc
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            raise UnsafeCheckpointError(
                f"{path} contains pickled objects outside PyTorch's safe allow-list, which could run arbitrary "
                "code when loaded; it was NOT loaded. Re-save it as a plain state_dict or safetensors, or pass "
                f"trust=True (--trust) only if you created this file yourself. Details: {str(exc).splitlines()[0]}"
            ) from None
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc


def load_state_dict_file(path: str | os.PathLike, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` state dict from a checkpoint file.

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``, ...) are unwrapped;
    non-tensor entries (epoch counters, optimizer state) are dropped.
    """
    obj = load_checkpoint(path, trust=trust)
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"{path} contains no tensors")
    return state


def save_state_dict_file(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict atomically; ``.safetensors`` by suffix, otherwise ``torch.save``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp)
        else:
            torch.save(tensors, tmp)
    return path
