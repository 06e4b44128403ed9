"""Loading and saving weights safely.

Checkpoints are loaded with ``torch.load(..., weights_only=True)``: a pickle
that would run code (any global outside PyTorch's allow-list) is refused with
:class:`UnsafeCheckpointError` and never executed, unless the caller opts in
with ``trust=True``. ``.safetensors`` files are read with safetensors, which
cannot execute code. A file that is not a PyTorch checkpoint at all (a NumPy
array, an ONNX model, text, damaged bytes) is recognised by its first bytes
and refused with :class:`NotACheckpointError` naming what it looks like, with
or without ``trust``. Saving is atomic: the file is written beside the target
and renamed over it only when complete, so a failure never leaves a
half-written file or touches an existing one.

The two on-disk formats of ``torch.save`` (torch/serialization.py): a zip
archive holding ``<name>/data.pkl`` (the default since PyTorch 1.6), and the
legacy format, a sequence of pickles starting with a magic number.
"""
from __future__ import annotations

import copy
import functools
import io
import math
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy
from torch.serialization import MAGIC_NUMBER

from ..atomic import atomic_path, check_target
from ..file_kinds import describe_file, looks_like_pickle, looks_like_safetensors, unreadable_file_error
from ..tracebacks import raised_in

__all__ = [
    "NotACheckpointError", "UnsafeCheckpointError", "load_checkpoint", "load_state_dict_file", "load_weights_into",
    "save_state_dict_file",
]

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / DataParallel, torch.compile
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
#: What a checkpoint file may be, as error messages say it (the CLI words damaged data files its own way).
CHECKPOINT_FORMATS = "expected a state dict saved with torch.save (.pt/.pth/.bin/.ckpt) or a .safetensors file"


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint is a real pickle holding objects outside PyTorch's safe allow-list; it was not loaded."""


class NotACheckpointError(ValueError):
    """The file is not a PyTorch checkpoint (another format, or damaged); ``trust`` does not change that.

    ``what``: what the file is instead (``"a text file (it starts with ...)"``), when that is known.
    """

    def __init__(self, message: str, what: str | None = None) -> None:
        super().__init__(message)
        self.what = what


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


#: The pickles that start a legacy ``torch.save`` file, in order (torch/serialization.py, ``_legacy_save``): the
#: magic number, the protocol version, system info, the object, its storage keys; the storages' bytes follow.
_LEGACY_PICKLES = 5


def _zip_damage(path: Path) -> str | None:
    """Why a zip checkpoint is damaged, or None. torch's reader checks no CRC-32: a flipped bit in ``data.pkl``
    can give other keys, shapes or offsets, one in a tensor's bytes other values, and a file member flagged as a
    folder (MS-DOS attribute 0x10) is read as empty, its tensor left uninitialized. A member whose CRC is 0 has
    none recorded (``torch.serialization.set_crc32_options(False)``; the tensors of a ``skip_data`` save filled
    in later): it is read unchecked."""
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.external_attr & 0x10 and not member.is_dir():
                    return f"its member {member.filename!r} is marked as a folder"
                if member.CRC == 0 or member.is_dir():
                    continue
                try:
                    with archive.open(member) as stream:  # zipfile compares the CRC-32 at the end of the member
                        while stream.read(1 << 20):
                            pass
                except zipfile.BadZipFile as exc:
                    if "CRC" in str(exc):
                        return f"its member {member.filename!r} does not match its CRC-32"
                    raise
    except Exception as exc:  # noqa: BLE001 - zipfile raises many types on a damaged archive (zlib.error, ...)
        return f"its zip structure cannot be read ({type(exc).__name__}: {exc})"
    return None


def _pickle_is_well_formed(path: Path) -> bool:
    """Whether every pickle ``torch.load`` reads from the file parses to its STOP opcode, read without executing
    anything (pickletools: seconds on a large pickled model, so only where no CRC-32 tells): a zip checkpoint's
    ``data.pkl`` if it has no CRC (:func:`_zip_damage` checked it otherwise); the :data:`_LEGACY_PICKLES` of a
    legacy file (one that starts with PyTorch's magic number), or else the file's first pickle."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next(m for m in archive.infolist() if m.filename.endswith("data.pkl"))
                if member.CRC == 0:
                    _parse_pickle(io.BytesIO(archive.read(member)))
            return True
        with open(path, "rb") as f:
            for _ in range(_LEGACY_PICKLES - 1 if _is_magic(_parse_pickle(f)) else 0):
                _parse_pickle(f)
        return True
    except Exception:  # noqa: BLE001 - any parse failure means "not a well-formed pickle"
        return False


def _parse_pickle(stream: BinaryIO) -> list:
    """The opcodes of the next pickle in ``stream``, read without executing anything (``pickletools.genops``;
    ValueError if it is cut short before its STOP)."""
    return list(pickletools.genops(stream))


def _is_magic(ops: list) -> bool:
    """Whether a pickle's opcodes (:func:`_parse_pickle`) are PyTorch's magic number and nothing else, as every legacy
    ``torch.save`` file's first pickle is (torch/serialization.py, ``_legacy_load`` refuses any other: 'Invalid
    magic number'): one push of it between the protocol/frame marks and STOP. A pickle that merely holds it beside
    other objects (``(Evil(), MAGIC_NUMBER)``) is not: torch.load would run those before it refuses."""
    pushed = [arg for op, arg, _ in ops if op.name not in ("PROTO", "FRAME", "STOP")]
    return len(pushed) == 1 and pushed[0] == MAGIC_NUMBER


def _refuse_unless_magic(path: Path) -> None:
    """Raise :class:`NotACheckpointError` for a pickle whose first pickle is not PyTorch's magic number (a
    ``pickle.dump`` file), naming a global it would import; its opcodes are read, nothing is run. One cut short
    is left to the loader, which calls it damaged."""
    with open(path, "rb") as f:
        try:
            ops = _parse_pickle(f)
        except Exception:  # noqa: BLE001 - genops raises ValueError and others on a damaged pickle
            return
    if not _is_magic(ops):
        what = "a pickle that is not a torch.save file (pickle.dump?)"
        names = _globals(ops)
        code = f"; it also names {names[0]}, which could run code: NOT loaded" if names else ""
        raise NotACheckpointError(f"{path} is {what}{code}; {CHECKPOINT_FORMATS}", what)


def _globals(ops: list) -> list[str]:
    """The ``module.name`` globals a pickle's opcodes (:func:`_parse_pickle`) would import: GLOBAL's argument, or
    the two strings pushed before a STACK_GLOBAL (protocol 4+)."""
    names, strings = [], []
    for op, arg, _ in ops:
        if op.name == "GLOBAL":
            names.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str):
            strings.append(arg)
    return names


def _load_safetensors(path: Path, map_location: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError) as exc:
        raise NotACheckpointError(f"{path} is not a valid safetensors file: {exc}") from exc


def _unsafe(path: Path, exc: Exception) -> UnsafeCheckpointError:
    if op := re.search(r"Unsupported operand \d+", str(exc)):  # FRAME (149) of protocol 4/5, LONG (76) of 0/1
        return UnsafeCheckpointError(
            f"{path} is a pickle that PyTorch's weights_only loader cannot read ({op.group()}: pickle protocol 0, "
            "1, 4 or 5, which torch.save writes when given that pickle_protocol, in either format), so "
            "it was NOT loaded. Re-save it with torch.save's default pickle protocol (no pickle_protocol "
            "argument), or as .safetensors, where it was made; pass trust=True (--trust) only if you created this "
            "file yourself (protocol 0 files cannot be read back even so).")
    names = _GLOBAL.findall(_strip_ansi(str(exc)))
    needs = f"it needs {names[0]}, which is" if names else "it uses pickle features"
    return UnsafeCheckpointError(
        f"{path} is a pickle, but {needs} outside PyTorch's weights_only allow-list: loading it could run "
        "arbitrary code, so it was NOT loaded. If it is a whole pickled model (torch.save(model)), re-save "
        "model.state_dict() (or a .safetensors file) where it was made; pass trust=True (--trust) only if you "
        "created this file yourself."
    )


def load_checkpoint(path: str | os.PathLike, *, trust: bool = False, map_location: str = "cpu",
                    mmap: bool = False) -> object:
    """Load a ``.pt``/``.pth``/``.bin``/``.ckpt`` or ``.safetensors`` file without running code.

    ``mmap``: a ``torch.save`` zip file's tensors are mapped from the file rather than read into memory
    (``torch.load(mmap=True)``; a safetensors file's always are), so reading a few of them from a large checkpoint
    (the audit's BN buffers) costs little memory; copy-on-write, so writing them leaves the file alone. A legacy
    (pre-zip) file, and a ``torch.save`` file named ``.safetensors``, are read as they are.

    Raises ``FileNotFoundError`` for a missing file, :class:`NotACheckpointError` for a file that is
    not a checkpoint (whatever ``trust`` says; a pickle that does not start with PyTorch's magic number, as
    ``pickle.dump`` writes, is never unpickled), :class:`UnsafeCheckpointError` for a pickle with
    objects outside the allow-list when ``trust`` is False, and ``ValueError`` when a trusted pickle
    needs a module that cannot be imported; other errors of a trusted pickle's own calls pass through (damaged
    records of one that needs ``trust`` may fail there too, as whatever the call they name raises). A
    ``MemoryError`` always passes through.
    """
    path = Path(path)
    if path.is_dir():
        raise NotACheckpointError(f"{path} is a folder, not a checkpoint file; {CHECKPOINT_FORMATS}", "a folder")
    if (exc := unreadable_file_error(path, functools.partial(NotACheckpointError, what="not a regular file"))):
        raise exc
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    # the content decides: a torch.save file named .safetensors loads as one, as a safetensors file named .pt does;
    # the name only sends a damaged safetensors start (length, then "{") to its own loader, which says what is wrong
    if looks_like_safetensors(head, size) or (path.suffix.lower() == ".safetensors" and head[8:9] == b"{"):
        return _load_safetensors(path, map_location)
    kind = describe_file(path, head, size)
    if kind is not None:
        raise NotACheckpointError(f"{path} is {kind}, not a PyTorch checkpoint; {CHECKPOINT_FORMATS}", kind)
    corrupt = NotACheckpointError(
        f"{path} is a damaged or incomplete PyTorch checkpoint (or not one); {CHECKPOINT_FORMATS}")
    damage = _zip_damage(path) if head.startswith(b"PK\x03\x04") else None  # before anything is unpickled
    if damage is not None:
        raise NotACheckpointError(f"{corrupt}: {damage}")
    if looks_like_pickle(head):  # torch.load unpickles a legacy file's first pickle, then refuses all but its magic
        _refuse_unless_magic(path)
    mmap = mmap and head.startswith(b"PK\x03\x04")  # torch maps zip files only
    try:
        return _torch_load(path, map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not _pickle_is_well_formed(path):  # a damaged pickle may name part of a global: not unsafe
            raise corrupt from None
        if not trust:
            raise _unsafe(path, exc) from None
    except MemoryError:
        raise
    # nothing unsafe was found, so whatever else fails is the file: cut short (IndexError, struct.error), a damaged
    # pickle's memo or strings (KeyError, UnicodeDecodeError), or flipped bits in a legacy file's records, which
    # torch's loader meets as AssertionError, TypeError, AttributeError, ValueError, OverflowError, ...
    except Exception as exc:  # noqa: BLE001
        raise NotACheckpointError(f"{corrupt}: {_reason(exc)}") from None
    try:
        return _torch_load(path, map_location, weights_only=False, mmap=mmap)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"{path} is a pickled object whose code cannot be found ({exc}): run from the folder that holds "
            "its package, or put that folder on PYTHONPATH; better, re-save model.state_dict() where it was made"
        ) from None
    # a trusted pickle runs its own calls: what else they raise is passed on as theirs (the CLI names it so), damaged
    # records too, as they fail in the calls they name; an assert of PyTorch's loader itself is damage
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AssertionError) as exc:
        if isinstance(exc, AssertionError) and not raised_in(exc, "torch"):  # e.g. a storage key _legacy_load lacks
            raise
        if isinstance(exc, AssertionError) and "saved_id must be a tuple" in str(exc):  # PERSID: text, protocol 0
            raise NotACheckpointError(
                f"{path} was written with pickle protocol 0 (torch.save(..., pickle_protocol=0)), whose tensor "
                "references torch.load cannot read back, trusted or not; re-save it with torch.save's default "
                "pickle protocol, or as .safetensors, where it was made") from None
        raise NotACheckpointError(f"{corrupt}: {_reason(exc)}") from None


def _torch_load(path: Path, map_location: str, weights_only: bool, mmap: bool = False) -> object:
    """``torch.load`` of the file; of its bytes where the path ends in ``.safetensors``, which it would read as
    safetensors whatever the file holds (torch/serialization.py ``load``): the content has said it is not.

    ``mmap`` (a zip file): mapped only where every tensor record is stored uncompressed and the storages loaded have
    the records' sizes; else read. torch maps each record at its offset with the size the pickle names, unchecked:
    a compressed (re-zipped) or mis-sized record would be read as other bytes, where reading it checks its size."""
    if path.suffix.lower() != ".safetensors":
        if mmap and (records := _stored_records(path)) is not None:
            loaded = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=True)
            if _mapped_as_stored(loaded, records):
                return loaded
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    with open(path, "rb") as f:  # read: torch maps a file it is given by path only
        return torch.load(f, map_location=map_location, weights_only=weights_only)


def _stored_records(path: Path) -> list[tuple[int, int]] | None:
    """The file offset and size of each tensor record of a ``torch.save`` zip file (``<root>/data/<key>``, beside
    ``<root>/data.pkl``), or None where one is compressed or the layout is not that."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            return None
        prefix = pickles[0][: -len("data.pkl")] + "data/"
        records = []
        for member in archive.infolist():
            if member.filename.startswith(prefix) and "/" not in member.filename[len(prefix):]:
                if member.compress_type != zipfile.ZIP_STORED:
                    return None
                f.seek(member.header_offset + 26)  # the local header's name and extra field lengths
                name_length, extra_length = struct.unpack("<HH", f.read(4))
                records.append((member.header_offset + 30 + name_length + extra_length, member.file_size))
    return records


def _mapped_as_stored(obj: object, records: list[tuple[int, int]]) -> bool:
    """Whether the storages of the tensors in a checkpoint loaded with ``mmap`` (in dicts, lists, tuples and
    modules) are the file's records: each at its record's offset from one base address, of its record's size.
    Tensors held elsewhere are not found, and the check then fails (the file is read instead)."""
    found: set[tuple[int, int]] = set()

    def walk(value: object) -> None:
        if isinstance(value, torch.Tensor):
            if value.layout == torch.strided and not value.is_meta:  # empty ones too: mapped at their offsets
                found.add(((storage := value.untyped_storage()).data_ptr(), storage.nbytes()))
        elif isinstance(value, torch.nn.Module):
            for tensor in (*value.parameters(), *value.buffers()):  # non-persistent buffers are pickled too
                walk(tensor)
        elif isinstance(value, Mapping):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(obj)
    storages, stored = sorted(found), sorted(records)
    if len(storages) != len(stored):  # every record read by one storage: none left over for a mis-sized one
        return False
    return all(ptr - offset == storages[0][0] - stored[0][0] and nbytes == size
               for (ptr, nbytes), (offset, size) in zip(storages, stored))


def _reason(exc: Exception) -> str:
    """An exception's message without terminal colours, or its type where it has none (a bare assert)."""
    return _strip_ansi(str(exc)).strip() or type(exc).__name__


def load_state_dict_file(path: str | os.PathLike, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` state dict from a checkpoint file.

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``, ...) are unwrapped, also one holding a
    whole pickled ``nn.Module`` (YOLOv5's ``{"model": model, "epoch": 3}``; readable with ``trust`` only);
    non-tensor entries (epoch counters, optimizer state) are dropped (:func:`split_state` names them).
    """
    return state_dict_of(load_checkpoint(path, trust=trust), path)


def pickled_module(obj: object) -> torch.nn.Module | None:
    """The whole ``nn.Module`` a loaded checkpoint holds (``torch.save(model)``, or one under a wrapper key such as
    YOLOv5's ``{"model": model, "epoch": 3}``; loaded with ``trust`` only), or None."""
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, Mapping):
        return next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), torch.nn.Module)), None)
    return None


def state_dict_of(obj: object, path: str | os.PathLike) -> dict[str, object]:
    """The flat ``{name: tensor}`` state dict in a loaded checkpoint ``obj`` (read from ``path``), as
    :func:`load_state_dict_file` returns it: :func:`split_state`'s first part."""
    return split_state(obj, path)[0]


def split_state(obj: object, path: str | os.PathLike) -> tuple[dict[str, object], dict[str, str]]:
    """The flat ``{name: tensor}`` state dict in a loaded checkpoint ``obj`` (read from ``path``), and the names
    and types of the non-tensor entries left out of it (an epoch counter; or a value where a model has a tensor,
    which :func:`load_weights_into`'s ``dropped=`` then names).

    The state dict is ``obj`` itself, or the dict of tensors under one of the usual wrapper keys
    (``state_dict``, ``model``, ``ema``, ...), or under the only key that holds one (``{"weights": sd,
    "epoch": 3}``) when it holds more tensors than the top level. Several such dicts under other keys
    (``{"params": sd, "params_ema": sd_ema}``) are refused: which one holds the weights is the user's call; so is a
    dict under a wrapper key beside another of the same tensor names and other values (``{"model": sd, "ema":
    sd_ema}``, ``{"state_dict": sd, "state_dict_ema": sd_ema}``); equal values under both (one dict saved twice)
    are one set of weights.
    Entries a module's ``get_extra_state`` wrote (``..._extra_state``) are kept whatever their type.
    """
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if (key := _weights_key(obj, path)) is not None:
        obj = _as_state(obj[key])
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor) or str(k).endswith("_extra_state")}
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} contains no tensors")
    refuse_meta(state.items(), str(path), "save the state dict after loading real weights")
    return state, {str(k): type(v).__name__ for k, v in obj.items() if str(k) not in state}


_NO_FIRST = object()  # weight_sets: the checkpoint holds several sets and split_state picks none


def _first_key(obj: Mapping, path: str | os.PathLike) -> object:
    """:func:`_weights_key`, or :data:`_NO_FIRST` where its rules leave the choice to the user."""
    try:
        return _weights_key(obj, path)
    except ValueError:
        return _NO_FIRST


def _reads_loose(obj: Mapping, first: object) -> bool:
    """Whether the tensors of ``obj`` itself (its ``first`` key: :func:`_first_key`) are a set of weights: not beside
    weights under one of the usual wrapper keys (a metric, an observation normalizer beside ``{"model": sd}``, as
    :func:`split_state` leaves them out) unless they bear the same names (a model beside its EMA)."""
    return first is None or first is _NO_FIRST or first not in _WRAPPER_KEYS or (
        _weights(obj).keys() == _weights(obj[first]).keys())


#: :func:`weight_sets`' answer: the sets of weights, and the tensors left beside them, each with its key path.
WeightSets = tuple[list[tuple[str, dict[str, object]]], list[tuple[str, dict[str, object]]]]


def weight_sets(obj: object, path: str | os.PathLike) -> WeightSets:
    """Every set of weights in a loaded checkpoint ``obj`` (read from ``path``), each with its key path (``""``
    for the top level, ``"decoder"``, ``"gen/ema"``), for reading them all (the audit of a checkpoint alone): where
    :func:`split_state` loads one set into a model, or leaves the choice to the user, a checkpoint may hold several
    models' (an encoder's and a decoder's, a model's and its EMA's). Also the tensors left beside them, each group
    with the key path of the weights it sits beside (``"model"``, ``"agent/model"``).

    First the set :func:`split_state` loads, where it picks one; then every other dict of tensors nested in ``obj``,
    in dicts, lists and tuples (a pickled module as its state dict; the items of a list by their index), and the
    tensors of the top level. At every level, tensors beside weights under a usual wrapper key are left beside
    (:func:`_reads_loose`). A set equal to one before it (one dict saved under two keys) is left out.
    Entries a module's ``get_extra_state`` wrote are kept with the tensors. ValueError where ``obj`` is neither a
    mapping nor a module.
    """
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    first = _first_key(obj, path)
    found: list[tuple[str, dict[str, object]]] = []
    beside: list[tuple[str, dict[str, object]]] = []
    visited: set[int] = set()  # ids of the checkpoint's own objects (alive throughout): a cycle is walked once

    def walk(value: object, key_path: str) -> None:
        if not isinstance(value, (Mapping, list, tuple, torch.nn.Module)) or id(value) in visited:
            return
        visited.add(id(value))
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{key_path}/{i}" if key_path else str(i))
            return
        value = _as_state(value)  # a pickled module's state dict
        tensors = {str(k): v for k, v in value.items()
                   if isinstance(v, torch.Tensor) or str(k).endswith("_extra_state")}
        if any(isinstance(v, torch.Tensor) for v in tensors.values()):
            mine = first if value is obj else _first_key(value, path)
            if _reads_loose(value, mine):
                found.append((key_path, tensors))
            else:
                beside.append((f"{key_path}/{mine}" if key_path else str(mine), tensors))
        for k, v in value.items():
            walk(v, f"{key_path}/{k}" if key_path else str(k))

    walk(obj, "")
    if first is not None and first is not _NO_FIRST:
        found.sort(key=lambda item: item[0] != str(first))  # the set split_state loads first (a stable sort)
    sets: list[tuple[str, dict[str, object]]] = []
    seen: dict[tuple, list[dict[str, torch.Tensor]]] = {}  # by fingerprint: only look-alikes are compared
    for key_path, tensors in found:
        mine = _weights(tensors)
        alike = seen.setdefault(_fingerprint(mine), [])
        if not any(not _two_sets(mine, other) for other in alike):
            sets.append((key_path, tensors))
            alike.append(mine)
    return sets, beside


def _fingerprint(weights: Mapping[str, torch.Tensor]) -> tuple:
    """Names, shapes, dtypes and the first values (in index order, whatever the memory layout) of a set of weights:
    equal sets have equal ones, so only sets with equal fingerprints need comparing. Read without copying a tensor
    (a memory-mapped checkpoint stays on disk); a tensor whose values cannot be read so (meta, sparse, nested,
    quantized) gives its type alone."""
    def head(t: torch.Tensor) -> tuple:
        try:
            values = (t.detach()[(0,) * (t.dim() - 1)][:4] if t.dim() else t.detach()).tolist()
            values = values if isinstance(values, list) else [values]
            return (tuple(t.shape), str(t.dtype), tuple("nan" if v != v else v for v in values))
        except (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError):
            return (type(t).__name__, str(t.layout))

    return tuple((k, head(t)) for k, t in sorted(weights.items()))


def _weights_key(obj: Mapping, path: str | os.PathLike) -> object:
    """The key of the checkpoint ``obj`` under which its state dict lies (None: ``obj`` is the state dict), by
    :func:`split_state`'s rules (ValueError where they leave the choice to the user)."""
    def tensors_in(value: object) -> int:
        return sum(isinstance(v, torch.Tensor) for v in _as_state(value).values())

    known = next((k for k in _WRAPPER_KEYS if tensors_in(obj.get(k))), None)
    mine = {} if known is None else _weights(obj[known])
    if mine and (twins := [str(k) for k, v in obj.items() if k != known and _two_sets(mine, _weights(v))]):
        raise ValueError(
            f"{path} holds the same weights twice, under {known!r} and {twins[0]!r} (such as a model and an average "
            "of its weights, as YOLOv5, timm and torchvision's references save them): which one to use is your call; "
            f"save it alone, e.g. torch.save(checkpoint[{twins[0]!r}], 'weights.pt'), or checkpoint[{known!r}]")
    if known is not None:
        return known
    nested = {k: n for k, v in obj.items() if not str(k).endswith("_extra_state") and (n := tensors_in(v))}
    top = tensors_in(obj)
    if len(nested) == 1 and max(nested.values()) > top:
        return next(iter(nested))
    if nested and top <= max(nested.values()):
        keys = sorted(map(str, nested))
        raise ValueError(
            f"{path} holds dicts of tensors under {keys}"
            + (f" and {top} tensor(s) at its top level" if top else "")
            + f", none under a key bnkit knows ({', '.join(_WRAPPER_KEYS)}): which one holds the weights is for "
            f"you to say; save it alone, e.g. torch.save(checkpoint[{keys[0]!r}], 'weights.pt')")
    return None


def _as_state(value: object) -> Mapping:
    """A checkpoint entry as a state dict: a module's, a mapping itself, anything else an empty one."""
    if isinstance(value, torch.nn.Module):
        return value.state_dict()
    return value if isinstance(value, Mapping) else {}


def _weights(value: object) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint entry by name, wrapper prefixes and an ``AveragedModel``'s ``n_averaged`` aside."""
    return {_bare(str(k)): v for k, v in _as_state(value).items()
            if isinstance(v, torch.Tensor) and str(k) != "n_averaged"}


def _two_sets(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Whether two checkpoint entries are two copies of one model's weights that differ (a model and its EMA): the
    same names (not a model and another component, such as a loss's weights) and some other value (NaN equal to
    NaN; sparse COO tensors by their coalesced indices and values; meta tensors, which hold none, and tensors
    PyTorch cannot compare (other sparse layouts, nested tensors) differ)."""
    def same(x: torch.Tensor, y: torch.Tensor) -> bool:
        if x.layout != y.layout or x.dtype != y.dtype or x.is_meta or y.is_meta:
            return False
        try:
            if x.shape != y.shape:
                return False
            if x.layout == torch.sparse_coo:
                x, y = x.coalesce(), y.coalesce()
                return same(x.indices(), y.indices()) and same(x.values(), y.values())
            y = y.to(x.device)
            return torch.equal(x, y) or (x.is_floating_point() or x.is_complex()) and bool(
                torch.all((x == y) | (x.isnan() & y.isnan())))
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):  # no comparison for this kind
            return False  # (a jagged nested tensor's == gives a bool)

    return a.keys() == b.keys() and not all(same(a[k], b[k]) for k in a)


def _bare(name: str) -> str:
    """``name`` without the wrapper prefixes it starts with (``module._orig_mod.0.weight`` -> ``0.weight``)."""
    while prefix := next((p for p in _WRAPPER_PREFIXES if name.startswith(p)), None):
        name = name[len(prefix):]
    return name


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: ``an int``, ``a str``."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _wrapper_chains(depth: int = 3) -> list[str]:
    """Every sequence of up to ``depth`` wrapper prefixes (``module.``, ``_orig_mod.``, ``module._orig_mod.``, ...),
    shortest first, in a fixed order."""
    chains, level = [], [""]
    for _ in range(depth):
        level = [c + p for c in level for p in _WRAPPER_PREFIXES]
        chains += level
    return chains


#: :func:`refuse_meta`'s advice for a model in memory.
LOAD_REAL_WEIGHTS = "load real weights first (load_state_dict(..., assign=True))"


def refuse_meta(named: Iterable[tuple[str, object]], what: str, fix: str) -> None:
    """ValueError naming the first of the ``(name, value)`` tensors on the meta device (``what`` holds them), which
    have shapes but no values; ``fix`` says what to do instead."""
    if meta := [k for k, v in named if isinstance(v, torch.Tensor) and v.is_meta]:
        raise ValueError(f"{what} holds meta tensors ({', '.join(meta[:4])}{', ...' if len(meta) > 4 else ''}): "
                         "shapes without values, as a model built on device='meta' has before its weights are "
                         f"loaded; {fix}")


def load_weights_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "the weights", *,
                      dropped: Mapping[str, str] | None = None) -> Mapping[str, object]:
    """``model.load_state_dict(state)`` (strict), with a readable error and wrapper prefixes handled; returns the
    state as loaded, under the model's own keys.

    A state dict saved from ``DistributedDataParallel``/``DataParallel`` (every key starts with
    ``module.``) or from ``torch.compile`` (``_orig_mod.``), or from several nested in any order, is loaded
    with the prefixes removed when the model's own keys do not carry them, and into a model that is itself such a
    wrapper (or another nesting of them) with its prefixes put in their place. So is a
    ``torch.optim.swa_utils.AveragedModel`` state dict
    (SWA/EMA: ``n_averaged`` and every other key under ``module.``), with its ``n_averaged`` counter
    dropped: it loads as the averaged model. A mismatch raises ``ValueError`` listing a few missing and
    unexpected keys (and the prefix, if one would explain them) instead of torch's full key dump; a missing key
    that ``dropped`` (:func:`split_state`'s non-tensor entries of the file, name: type) holds, wrapper prefixes
    aside, is named as holding that type instead.
    Values that ``load_state_dict`` would change as it casts them are refused before loading (see
    :func:`_misfit`: complex values for real tensors, integer or bool ones for floating tensors, floating ones
    that an integer tensor cannot hold exactly); when
    ``load_state_dict`` fails (a shape, a module's own loading code), the parameters, buffers and extra state
    (``get_extra_state``) it had already overwritten are put back from a copy taken first (transient: one copy
    of the model's tensors).
    """
    own = set(model.state_dict())
    keys = list(state)
    held_as = {_bare(k): t for k, t in (dropped or {}).items()}  # the file's non-tensors, wrapper prefixes aside

    def wraps(prefix: str, names: list[str]) -> bool:
        """Every name carries ``prefix`` and removing it fits the model better: the model's keys lack it, or they
        carry it too (a submodule named ``module``) and the names without it match more of them."""
        if not names or not all(k.startswith(prefix) for k in names):
            return False
        if not any(k.startswith(prefix) for k in own):
            return True
        return len(own & {k[len(prefix):] for k in names}) > len(own & set(names))

    def wrapper_prefix() -> str | None:
        return next((p for p in _WRAPPER_PREFIXES if wraps(p, keys)), None)

    averaged = bool(own & {c + "n_averaged" for c in ("", *_wrapper_chains())})  # the model is an AveragedModel
    while True:  # one wrapper at a time: nested ones (torch.compile(DDP(model)), the reverse, AveragedModel inside)
        if "n_averaged" in state and not averaged:  # AveragedModel(...).state_dict(): its counter
            rest = [k for k in keys if k != "n_averaged"]
            if rest and all(k.startswith("module.") for k in rest):  # also for a wrapped model: swapped below
                state, keys = _moved(state, "", "", drop="n_averaged"), rest
        prefix = wrapper_prefix()
        if prefix is None:
            break
        state = _moved(state, prefix, "")
        keys = list(state)
    if own and set(keys) != own:  # wrappers on the model's side (a factory returning torch.compile(model)), or
        # other wrappers on each side: the file's wrapper prefixes swapped for the model's, where more keys then fit
        chains = [""] + _wrapper_chains()  # shortest first: a longer swap must fit more keys to win
        saved = [c for c in chains if all(k.startswith(c) for k in keys)]
        held = [c for c in chains if all(k.startswith(c) for k in own)]
        best, fitted = ("", ""), len(own & set(keys))
        for old_prefix in saved:
            for new_prefix in held:
                if (n := len(own & {new_prefix + k[len(old_prefix):] for k in keys})) > fitted:
                    best, fitted = (old_prefix, new_prefix), n
        if best != ("", ""):
            state = _moved(state, *best)
            keys = list(state)
    missing = sorted(own - set(keys) - _counters_torch_adds(model, state))
    unexpected = sorted(set(keys) - own)
    if missing or unexpected:
        def few(names: list[str]) -> str:
            return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")

        parts = [f"{source} do not fit {type(model).__name__}"]
        if held := [k for k in missing if _bare(k) in held_as]:  # in the file, but not as a tensor
            parts.append(", ".join(f"{k} holds {_a(held_as[_bare(k)])}, not a tensor" for k in held[:6]))
        if absent := [k for k in missing if _bare(k) not in held_as]:
            parts.append(f"missing {few(absent)}")
        if unexpected:
            parts.append(f"unexpected {few(unexpected)}")
        common = os.path.commonprefix(unexpected) if len(unexpected) > 1 else ""
        candidates = (*_WRAPPER_PREFIXES, common[:common.rindex(".") + 1] if "." in common else "")
        prefix = next((p for p in candidates if p and own & {k[len(p):] for k in unexpected if k.startswith(p)}), "")
        if prefix in _WRAPPER_PREFIXES:
            parts.append(f"the file's keys carry a prefix {prefix!r} that the model's do not (DistributedDataParallel "
                         "saves 'module.'): save model.module.state_dict(), or strip the prefix")
        elif prefix:  # a training framework's (a LightningModule's attribute, an EMA's holder): no wrapper of ours
            parts.append(f"the file's keys carry a prefix {prefix!r} that the model's do not (a LightningModule "
                         f"saves its submodule under its attribute name): strip it, {{k.removeprefix({prefix!r}): v "
                         "for k, v in state.items()}, and save that")
        raise ValueError("; ".join(parts))
    # every name of a tied tensor: the file may hold its values under any of them
    tensors = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
    misfits: dict[str, list[str]] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and k in tensors and (
                why := _shape_misfit(model, k, v, tensors[k]) or _misfit(k, v, tensors[k])) is not None:
            misfits.setdefault(why[0], []).append(why[1])
    if misfits:
        raise ValueError(f"{source} do not fit {type(model).__name__}: " + "; ".join(
            f"{what}: {', '.join(items[:4])}" + (f", ... ({len(items)} in all)" if len(items) > 4 else "")
            for what, items in misfits.items()))
    slots = _slots(model)
    empty = [(container, name) for m in model.modules() for container in (m._parameters, m._buffers)
             for name, t in container.items() if t is None]  # registered as None: a loader may fill them
    saved = {id(t): t.detach().clone() for _, _, _, t in slots if not is_lazy(t)}
    fresh: dict[int, torch.Tensor] = {}  # one new uninitialized tensor per lazy one, shared where it was
    for _, _, _, t in slots:
        if is_lazy(t) and id(t) not in fresh:
            kind = UninitializedParameter if isinstance(t, torch.nn.Parameter) else UninitializedBuffer
            fresh[id(t)] = kind(requires_grad=t.requires_grad, device=t.device, dtype=t.dtype)
    extra = _extra_state_backup(model)
    try:
        model.load_state_dict(state)
    except BaseException as exc:  # KeyboardInterrupt included: a load cut short leaves no half-loaded model
        # load_state_dict copies every tensor that fits, fills lazy layers (in place), and a module's own loader
        # may resize, retype or replace a tensor, before it raises: put every slot back as it was
        with torch.no_grad():
            for _, container, name, t in slots:
                if id(t) in fresh:
                    container[name] = t if is_lazy(t) else fresh[id(t)]
                    continue
                container[name] = t  # the original object (an optimizer may hold it)
                old = saved[id(t)]
                if t.shape == old.shape and t.dtype == old.dtype:
                    t.copy_(old)
                else:
                    t.data = old
            for container, name in empty:
                container[name] = None
        for name, value in extra.items():
            model.get_submodule(name).set_extra_state(value)
        if not isinstance(exc, RuntimeError):
            raise
        lines = [ln.strip() for ln in _strip_ansi(str(exc)).splitlines() if ln.strip()]
        if lines and lines[0].startswith("Error(s) in loading state_dict"):  # torch's header: the details follow
            lines = lines[1:]
        raise ValueError(f"{source} do not fit {type(model).__name__}: {' '.join(lines[:4])}") from None
    return state


def _moved(state: Mapping[str, object], old: str, new: str, drop: str | None = None) -> dict[str, object]:
    """``state`` with the key prefix ``old`` replaced by ``new`` (and the key ``drop`` left out), its ``_metadata``
    (the module versions torch's loaders read, keyed by module path) moved alike, as
    ``torch.nn.modules.utils.consume_prefix_in_state_dict_if_present`` keeps it."""
    out: dict[str, object] = OrderedDict((new + k[len(old):], v) for k, v in state.items() if k != drop)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        moved = OrderedDict()
        for path, value in metadata.items():
            dotted = f"{path}." if path else ""
            if dotted.startswith(old):
                moved[(new + dotted[len(old):]).rstrip(".")] = value
        out._metadata = moved  # type: ignore[attr-defined]
    return out


def _slots(model: torch.nn.Module) -> list[tuple[torch.nn.Module, dict, str, torch.Tensor]]:
    """Every parameter and buffer as (module, its ``_parameters`` or ``_buffers``, name, tensor), tied ones once per
    place they are held."""
    return [(m, container, name, t) for m in model.modules()
            for container in (m._parameters, m._buffers) for name, t in container.items() if t is not None]


#: Why :func:`_misfit` refuses a value, as the error lists them.
_SHAPE = "size mismatch"
_COMPLEX = "complex values for real tensors"
_INTEGER = "integer or bool values for floating-point tensors (quantized codes, their scale not in the file?)"
_INEXACT = "values the model's integer tensors cannot hold"
_OVERFLOW = "finite values beyond the range of the model's floating-point tensors (they would load as inf, or clamped)"


def _counters_torch_adds(model: torch.nn.Module, state: Mapping[str, object]) -> set[str]:
    """The ``num_batches_tracked`` keys that BatchNorm's loader (torch/nn/modules/batchnorm.py,
    ``_NormBase._load_from_state_dict``) adds, keeping the layer's own count, to a state dict without them whose
    metadata gives no version 2 or later (saved before the counter existed, or built by hand)."""
    metadata = getattr(state, "_metadata", None) or {}
    return {f"{name}.num_batches_tracked".lstrip(".") for name, m in model.named_modules()
            if isinstance(m, _NormBase) and m.track_running_stats and m.num_batches_tracked is not None
            and (metadata.get(name, {}).get("version") or 0) < 2}


def _shape_misfit(model: torch.nn.Module, key: str, value: torch.Tensor,
                  target: torch.Tensor) -> tuple[str, str] | None:
    """A shape ``load_state_dict`` refuses, found before it runs: it raises only after copying what fits. Where
    PyTorch's own loading code reads the key as it comes (a 0-d tensor takes a 1-element one, as it allows): not
    under a module with a load pre-hook (which may reshape it), nor in one with a loader of its own (PyTorch's
    quantization observers resize their buffers; InstanceNorm's drops old keys), BatchNorm's excepted."""
    path = key.rpartition(".")[0]
    owner, chain = model, [model]
    for part in path.split(".") if path else ():
        owner = getattr(owner, part)
        chain.append(owner)
    # a parent's own loader runs first and may rewrite its children's entries
    plain = all(type(m)._load_from_state_dict in (torch.nn.Module._load_from_state_dict,
                                                 _NormBase._load_from_state_dict) for m in chain)
    if not plain or any(m._load_state_dict_pre_hooks for m in chain) or is_lazy(target) \
            or value.shape == target.shape or (target.dim() == 0 and value.shape == (1,)):
        return None
    return _SHAPE, f"{key} ({tuple(value.shape)} in the file, {tuple(target.shape)} in the model)"


def _misfit(key: str, value: torch.Tensor, target: torch.Tensor) -> tuple[str, str] | None:
    """Why ``value`` must not load into the model's tensor ``target`` (``key``), as (reason, what) or None: torch's
    ``load_state_dict`` casts silently, keeping a complex value's real part, turning integer codes into floats
    (int8 127 -> 127.0), truncating floats (6.7 -> 6), wrapping integers an integer tensor cannot hold and turning
    finite floats beyond a narrower dtype's range into inf or its largest value (70000.0 into float16, 1000.0 into
    float8_e4m3fn). A floating value fits an integer tensor when each element is a whole number in its range
    (6.0 -> 6). A value loaded unchanged is never refused (a negative ``num_batches_tracked`` loads as it is, for
    the audit to report)."""
    dtypes = f"{value.dtype} into {target.dtype}"
    if value.is_complex() and not target.is_complex():
        return _COMPLEX, f"{key} ({dtypes})"
    if value.is_quantized or value.is_meta or value.layout != torch.strided or value.numel() == 0:
        return None  # load_state_dict refuses these itself (or has nothing to copy)
    if target.is_floating_point() or target.is_complex():
        if not (value.is_floating_point() or value.is_complex()):
            return _INTEGER, f"{key} ({dtypes})"
        info = torch.finfo(target.dtype)
        if info.max < torch.finfo(value.dtype).max:
            # a narrower dtype turns finite values from half an ulp past its largest into inf, or clamps them to it
            # where it has no inf (float8_e4m3fn): 70000.0 into float16, 1000.0 into float8_e4m3fn (448)
            limit = info.max + info.eps * 2.0 ** math.floor(math.log2(info.max)) / 2
            parts = torch.view_as_real(value.detach()) if value.is_complex() else value.detach()
            parts = parts.float() if parts.element_size() == 1 else parts  # float8 has no comparison kernels
            if (lost := parts[torch.isfinite(parts) & (parts.abs() >= limit)]).numel():
                return _OVERFLOW, f"{key} ({dtypes}: {lost[0].item():g} is beyond {info.max:g})"
        return None
    if value.dtype == target.dtype:
        return None

    def shown(x: float) -> str:  # a float32 or narrower value as written (6.7), not widened (6.699999809265137)
        return str(np.float32(x)) if value.is_floating_point() and value.element_size() <= 4 else str(x)

    numbers = value.detach().reshape(-1)
    if value.dtype == torch.uint64:  # no min/max kernel, and no wider dtype: exact as Python ints
        low, high = min(numbers.tolist()), max(numbers.tolist())
    else:
        numbers = numbers.double() if value.is_floating_point() else numbers.long()
        if value.is_floating_point() and (inexact := ~torch.isfinite(numbers) | (numbers != numbers.trunc())).any():
            return _INEXACT, f"{key} ({dtypes}: {shown(numbers[inexact][0].item())} is not a whole number)"
        low, high = numbers.min().item(), numbers.max().item()
    info = torch.iinfo(target.dtype) if target.dtype != torch.bool else None
    lo, hi = (info.min, info.max) if info is not None else (0, 1)
    if low < lo or high > hi:  # Python compares an int with a float exactly
        return _INEXACT, f"{key} ({dtypes}: {shown(low if low < lo else high)} is outside {lo}..{hi})"
    return None


def _extra_state_backup(model: torch.nn.Module) -> dict[str, object]:
    """A copy of each module's ``get_extra_state()``, what ``load_state_dict`` hands to ``set_extra_state``; a state
    that cannot be copied (it holds a lock, say) is left out: the load goes on, only its rollback is lost."""
    backup = {}
    for name, m in model.named_modules():
        if type(m).get_extra_state is not torch.nn.Module.get_extra_state:
            try:
                with torch.no_grad():  # a tensor computed from a parameter has no deepcopy while it tracks grad
                    backup[name] = copy.deepcopy(m.get_extra_state())
            except Exception:  # noqa: BLE001 - any object may be in there
                continue
    return backup


def checkpoint_with(obj: object, path: str | os.PathLike,
                    new: Mapping[str, object]) -> tuple[object, OrderedDict, list[str]]:
    """The checkpoint ``obj`` (as :func:`load_checkpoint` read it from ``path``) with its weights replaced by the
    model's state dict ``new``, in the file's own layout; that state dict alone, under the file's names; and the
    names of the checkpoint's other entries (keys beside the weights, non-tensors among them).

    Kept as they were: the wrapper key (``{"model": ...}``) and the other entries (optimizer state, an epoch), the
    key prefixes (``module.``, ``_orig_mod.``), an ``AveragedModel``'s ``n_averaged``, ``_metadata``, and entries the
    model has no counterpart for. A copy of the weights under another key (``{"model": sd, "ema": sd}``, equal
    values: one set of weights to :func:`split_state`) is replaced too. Entries are matched by their names without
    wrapper prefixes, as :func:`load_weights_into` loads them (by their full names where that makes two of the
    model's alike: a submodule named ``module``); a tensor the model has and the file lacks (the
    ``num_batches_tracked`` PyTorch adds to old checkpoints) is added under the file's prefix. The new tensors are
    detached copies on the CPU. ValueError where the file holds a pickled module (its state dict cannot be put back
    in its place) or a tensor no name of the model matches (but an ``AveragedModel``'s ``n_averaged``)."""
    key = _weights_key(obj, path) if isinstance(obj, Mapping) else None
    inner = obj if key is None else obj[key]
    if not isinstance(inner, Mapping):
        raise ValueError(f"{path} holds a pickled {type(inner).__name__}, not a state dict")
    strip = _bare if len({_bare(str(k)) for k in new}) == len(new) else str
    model_of = {strip(str(k)): k for k in new}
    new = _tied_copies(new)
    weights = _with_weights(inner, new, model_of, strip)
    if key is None:
        others = [str(k) for k, v in weights.items() if not isinstance(v, torch.Tensor)]
        return weights, weights, others
    mine = _weights(inner)
    outer, others = OrderedDict(obj.items()), []
    for k, v in obj.items():
        if k == key:
            outer[k] = weights
        elif isinstance(v, Mapping) and mine and _weights(v).keys() == mine.keys() and not _two_sets(mine, _weights(v)):
            outer[k] = _with_weights(v, new, model_of, strip)  # the same weights saved twice
        else:
            others.append(str(k))
    return outer, weights, others + [str(k) for k, v in weights.items() if not isinstance(v, torch.Tensor)]


def _with_weights(inner: Mapping, new: Mapping[str, object], model_of: dict[str, object],
                  strip: Callable[[str], str]) -> OrderedDict:
    """The state dict ``inner`` with each entry the model's ``new`` (:func:`_tied_copies`) has (by name as ``strip``
    leaves it, ``model_of``) replaced, and those it lacks added under the prefix its names carry where the model's
    do."""
    names = [strip(str(k)) for k in inner]
    unmatched = [str(k) for k, n in zip(inner, names)
                 if n not in model_of and isinstance(inner[k], torch.Tensor) and _bare(str(k)) != "n_averaged"]
    if len(set(names)) != len(names) or unmatched:
        raise ValueError("its weights do not line up with the model's names"
                         + (f" ({', '.join(unmatched[:3])})" if unmatched else ""))
    out = OrderedDict((k, new[model_of[n]] if n in model_of else v) for (k, v), n in zip(inner.items(), names))
    prefix = {}  # the model's wrapper prefix -> the file's, from the names both have
    for k, n in zip(map(str, inner), names):
        if (m := model_of.get(n)) is not None:
            prefix.setdefault(str(m)[:len(str(m)) - len(n)], k[:len(k) - len(n)])
    held = set(names)
    for n, m in model_of.items():
        if n not in held and (p := prefix.get(str(m)[:len(str(m)) - len(n)])) is not None:
            out[p + n] = new[m]
    if (metadata := getattr(inner, "_metadata", None)) is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def _tied_copies(state: Mapping[str, object]) -> dict[str, object]:
    """Each tensor of ``state`` as a detached copy on the CPU, one copy for the entries that view the same memory
    alike (tied weights: same storage, offset, shape, strides and dtype), which a ``.pt`` file then stores once;
    anything else (a module's extra state) as it is."""
    copies: dict[tuple, torch.Tensor] = {}
    out: dict[str, object] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            view = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
            if view not in copies:
                copies[view] = v.detach().cpu().clone()
            v = copies[view]
        out[k] = v
    return out


def _owning(state: Mapping[str, object], keep_ties: bool = False) -> OrderedDict:
    """``state`` with each tensor as a detached CPU tensor that alone holds its whole storage, copied only where it
    does not: one on another device, not contiguous, a lazy conjugate or negative view (``z.conj()``: safetensors
    writes the memory, which holds the values before the view), a view into a larger storage (``torch.save``
    writes the whole storage), or sharing its storage with an earlier entry (tied weights, which safetensors
    refuses; ``keep_ties``: kept tied, as ``torch.save`` stores them once). The others are written as they are,
    so a fresh copy of a model's weights (a folded model's, a checkpoint's) is not copied again to be saved."""
    saved, storages = OrderedDict(), {}  # data pointer: the dtype of the first entry over that storage
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            v = v.detach()
            tie = storages.get(v.untyped_storage().data_ptr())
            if not (v.device.type == "cpu" and v.layout == torch.strided and not v.is_quantized and v.is_contiguous()
                    and not v.is_conj() and not v.is_neg()  # lazy views: the memory holds the unconjugated values
                    and v.storage_offset() == 0 and v.untyped_storage().nbytes() == v.numel() * v.element_size()
                    and v.numel() and (tie is None or keep_ties and tie == v.dtype)):  # torch.save: one dtype a tie
                v = v.to("cpu", copy=True, memory_format=torch.contiguous_format)
            storages.setdefault(v.untyped_storage().data_ptr(), v.dtype)
        saved[k] = v
    return saved


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file's header (``{"format": "pt"}`` and the like); empty for other files."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}


def refuse_non_tensors(state: Mapping[str, object]) -> None:
    """ValueError naming the entries of ``state`` that are not tensors (a module's extra state), which a
    safetensors file cannot hold."""
    if others := [k for k, v in state.items() if not isinstance(v, torch.Tensor)]:
        raise ValueError("safetensors holds tensors only, and the state dict's "
                         f"{', '.join(others[:4])} {'is' if len(others) == 1 else 'are'} not (a module's extra "
                         "state); write a .pt file instead")


def save_state_dict_file(state: Mapping[str, object], path: str | os.PathLike, *,
                         metadata: Mapping[str, str] | None = None) -> Path:
    """Write a state dict atomically; ``.safetensors`` by suffix, otherwise ``torch.save``.

    Entries that are not tensors (what a module's ``get_extra_state`` returns) go into a ``torch.save`` file
    as they are; safetensors holds tensors only, so a state dict with such entries is refused for it. A
    safetensors file gets ``metadata`` in its header, with ``"format": "pt"`` unless it says otherwise (loaders
    such as Hugging Face's read it). A name ending in ``.onnx`` is refused (ValueError): the file would be no ONNX
    model.
    """
    path = check_target(path, "model.safetensors")
    if path.suffix.lower() == ".onnx":
        raise ValueError(f"{path}: a state dict is written as a .safetensors or torch.save file, not as an ONNX "
                         "model; name it .safetensors or .pt (bnkit.torch.export_onnx writes .onnx files)")
    safetensors = path.suffix.lower() == ".safetensors"
    if safetensors:
        refuse_non_tensors(state)
    with atomic_path(path) as tmp:
        saved = _owning(state, keep_ties=not safetensors)
        if (versions := getattr(state, "_metadata", None)) is not None:  # module versions, read by their loaders
            saved._metadata = versions  # type: ignore[attr-defined]
        if safetensors:
            from safetensors.torch import save_file

            save_file(saved, tmp, metadata={"format": "pt", **(metadata or {})})
        else:
            torch.save(saved, tmp)
    return path
