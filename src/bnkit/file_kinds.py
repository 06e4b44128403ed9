"""What kind of model file a file is, told from its first bytes (no framework needed to ask)."""
from __future__ import annotations

__all__ = ["looks_like_onnx", "looks_like_safetensors"]


def looks_like_onnx(head: bytes) -> bool:
    """A serialized ``ModelProto`` (onnx/onnx.proto) as exporters write it: field 1, ``ir_version``, a small varint
    (1 to 31), then the tag of a later field (producer name/version, domain, model version, doc string, graph,
    opset imports)."""
    return len(head) > 2 and head[0] == 0x08 and 1 <= head[1] <= 31 and head[2] in b"\x12\x1a\x22\x28\x32\x3a\x42"


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length (within the file's ``size``), then a JSON header. Asked
    first: a header length's bytes can also read as an ONNX start."""
    return len(head) > 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size
