"""What kind of model file a file is, told from its first bytes (no framework needed to ask)."""
from __future__ import annotations

import os
import zipfile
from collections.abc import Callable

__all__ = ["describe_file", "looks_like_onnx", "looks_like_safetensors", "looks_like_npy", "looks_like_pickle",
           "unreadable_file", "unreadable_file_error", "zip_kind"]

#: :func:`unreadable_file`'s reason for a path that exists but holds no file to read.
NOT_REGULAR = "it is not a regular file (a pipe, socket or device), which loaders cannot seek in: save it to a file"


def unreadable_file(path: str | os.PathLike) -> str | None:
    """Why ``path``, a path that is not a folder, is no file to load: None for a regular file (or a link to one);
    else ``"no such file"``, a symbolic link that leads to no file (a loop too), or :data:`NOT_REGULAR` (a named
    pipe such as ``<(...)``, ``/dev/stdin``, a device)."""
    if os.path.isfile(path):
        return None
    if os.path.islink(path) and not os.path.exists(path):
        return "it is a symbolic link that leads to no file"
    return NOT_REGULAR if os.path.exists(path) else "no such file"


def unreadable_file_error(path: str | os.PathLike,
                          not_regular: Callable[[str], Exception] = ValueError) -> Exception | None:
    """What a loader raises for ``path`` (:func:`unreadable_file`): None for a regular file, ``FileNotFoundError``
    for a missing path or a link to nothing, ``not_regular(message)`` for a pipe or a device."""
    if (why := unreadable_file(path)) is None:
        return None
    if why == NOT_REGULAR:
        return not_regular(f"{path}: {why}")
    return FileNotFoundError(f"no such file: {path}" if why == "no such file" else f"{path}: {why}")


def looks_like_onnx(head: bytes) -> bool:
    """A serialized ``ModelProto`` (onnx/onnx.proto) as exporters write it: field 1, ``ir_version``, a small varint
    (1 to 31), then the tag of a later field (producer name/version, domain, model version, doc string, graph,
    opset imports)."""
    return len(head) > 2 and head[0] == 0x08 and 1 <= head[1] <= 31 and head[2] in b"\x12\x1a\x22\x28\x32\x3a\x42"


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length (within the file's ``size``), then a JSON header. Asked
    first: a header length's bytes can also read as an ONNX start."""
    return len(head) > 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def looks_like_npy(head: bytes) -> bool:
    """A NumPy ``.npy`` array (``np.save``): its magic string."""
    return head.startswith(b"\x93NUMPY")


#: How protocols 0 and 1 pickle PyTorch's magic number (torch/serialization.py ``MAGIC_NUMBER``), which the legacy
#: ``torch.save`` format writes first: LONG, its decimal digits, ``L``, a newline.
_LEGACY_MAGIC_TEXT = b"L119547037146038801333356L\n"


def looks_like_pickle(head: bytes) -> bool:
    """A pickle of protocol 2 to 5 (the legacy ``torch.save`` format, or any pickled object): PROTO, version; or a
    legacy ``torch.save`` file in protocol 0 or 1, whose pickles have no PROTO: by its magic number."""
    return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) \
        or head.startswith(_LEGACY_MAGIC_TEXT)


def zip_kind(path: str | os.PathLike) -> str | None:
    """What a zip archive holds, by its member names: ``"torchscript"`` (``torch.jit.save``: a ``constants.pkl``,
    torch/serialization.py ``_is_torchscript_zip``), ``"torch"`` (``torch.save``: a ``data.pkl``), ``"npz"``
    (``np.savez``: ``.npy`` members only) or ``"zip"`` (anything else); None when it cannot be read as a zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception:  # noqa: BLE001 - BadZipFile, NotImplementedError (a flipped version field), OSError, ...
        return None
    if any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch"
    return "npz" if names and all(n.endswith(".npy") for n in names) else "zip"


def describe_file(path: str | os.PathLike, head: bytes, size: int) -> str | None:
    """What a file that cannot be a ``torch.save`` checkpoint is, told from its first bytes ``head`` (64 are
    enough), its ``size`` and, for a zip archive, its member names; None if it may be one (a pickle or a zip
    archive with PyTorch's ``data.pkl``)."""
    if size == 0:
        return "an empty file"
    if looks_like_safetensors(head, size):
        return "a safetensors file"
    if looks_like_npy(head):
        return "a NumPy .npy array (np.save)"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "an HDF5 file (a Keras .h5 model?)"
    if head.startswith(b"PK\x03\x04"):
        kind = zip_kind(path)
        if kind is None:
            return "a damaged zip archive (a truncated or corrupt torch.save file?)"
        if kind == "torchscript":
            return ("a TorchScript archive (torch.jit.save: code as well as weights; if you trust it, "
                    "torch.jit.load(path).state_dict() gives its weights)")
        if kind == "npz":
            return "a NumPy .npz archive (np.savez)"
        if kind == "zip":
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            return f"a zip archive without PyTorch's data.pkl (it holds {', '.join(names[:5]) or 'nothing'})"
        return None
    if looks_like_pickle(head):
        return None  # a pickle: the legacy torch.save format, or a raw pickle for torch.load to judge
    onnx_model = "an ONNX model (read it with onnx, or pass it where an .onnx file is expected)"
    if looks_like_onnx(head) or (head[:1] == b"\x08" and str(path).lower().endswith(".onnx")):
        return onnx_model
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a character cut at the end of the 64 bytes read is not an error
        text = head[:exc.start].decode("utf-8") if exc.start >= len(head) - 3 else ""
    if text and all(c.isprintable() or c.isspace() for c in text):
        return f"a text file (it starts with {text[:32]!r})"  # one that mentions onnx too
    if b"onnx" in head.lower():  # binary naming onnx early: a ModelProto whose first field is not ir_version
        return onnx_model
    return f"a file of unknown format (it starts with the bytes {head[:8].hex(' ')})"
