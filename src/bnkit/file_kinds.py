"""What kind of model file a file is, told from its first bytes (no framework needed to ask)."""
from __future__ import annotations

import os
import zipfile

__all__ = ["looks_like_onnx", "looks_like_safetensors", "looks_like_npy", "looks_like_pickle", "zip_kind"]


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


def looks_like_pickle(head: bytes) -> bool:
    """A pickle of protocol 2 to 5 (the legacy ``torch.save`` format, or any pickled object): PROTO, version."""
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")


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
