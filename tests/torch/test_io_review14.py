"""Review 14 (mutation round M11): behaviours of ``load_checkpoint`` no test pinned.

Oracles: ``torch.load`` itself (what it reads, what it refuses), ``zipfile`` (its CRC-32 check, its reading of a
zip's central directory), ``safetensors.torch.load_file``, and the bytes each sample is built from (the kind phrase
``NotACheckpointError.what`` the CLI shows).
"""
from __future__ import annotations

import importlib
import struct
import sys
import zipfile

import pytest
import torch
from test_io_review13 import legacy_file, pickle_ends, state_dict

from bnkit.torch.io import NotACheckpointError, UnsafeCheckpointError, load_checkpoint


def test_a_whole_pickled_model_whose_class_was_renamed_since(tmp_path, monkeypatch):
    """The module still imports but no longer holds the class (pickle's find_class: AttributeError, not
    ImportError): with trust a ValueError saying the code cannot be found, without it unsafe."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "fa14_netmod.py"
    module.write_text("import torch\n\n\nclass Net(torch.nn.Linear):\n    pass\n")
    importlib.invalidate_caches()
    netmod = importlib.import_module("fa14_netmod")
    path = tmp_path / "net.pt"
    torch.save(netmod.Net(2, 2), path)
    module.write_text("import torch\n")  # Net renamed or removed since
    monkeypatch.delitem(sys.modules, "fa14_netmod")
    importlib.invalidate_caches()
    with pytest.raises(AttributeError):  # the oracle: torch.load cannot find the class
        torch.load(path, weights_only=False)
    with pytest.raises(ValueError, match="code cannot be found") as info:
        load_checkpoint(path, trust=True)
    assert not isinstance(info.value, NotACheckpointError)  # the file is whole; its code is missing
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)


@pytest.mark.parametrize("trust", [False, True])
def test_a_legacy_file_whose_last_pickle_is_damaged_is_damaged_not_unsafe(tmp_path, trust):
    """The storage keys, the last of the legacy format's pickles, with its STOP opcode overwritten: torch's
    weights_only unpickler refuses it (UnpicklingError), and it is damage, not a global outside the allow-list."""
    data = bytearray(legacy_file(tmp_path, state_dict()).read_bytes())
    end = pickle_ends(bytes(data))[-1]
    assert data[end - 1:end] == b"."  # STOP
    data[end - 1] = 0xFF
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(Exception):  # noqa: B017 - the oracle: PyTorch cannot read it, even trusting it
        torch.load(path, weights_only=False)
    with pytest.raises(NotACheckpointError, match="damaged"):
        load_checkpoint(path, trust=trust)


def test_a_zip_checkpoint_with_a_real_folder_entry_loads(tmp_path):
    """A checkpoint re-zipped by a tool that writes a folder entry (``archive/``, MS-DOS attribute 0x10 on a name
    ending in '/') is not a file member flagged as a folder: torch reads it, and so does load_checkpoint."""
    expected = state_dict()
    whole = tmp_path / "whole.pt"
    torch.save(expected, whole)
    path = tmp_path / "refolded.pt"
    with zipfile.ZipFile(whole) as src, zipfile.ZipFile(path, "w") as out:
        folder = zipfile.ZipInfo(src.namelist()[0].split("/")[0] + "/")
        folder.external_attr = (0o40755 << 16) | 0x10
        out.writestr(folder, b"")
        for member in src.infolist():
            out.writestr(member, src.read(member))
    with zipfile.ZipFile(path) as archive:
        assert archive.infolist()[0].is_dir() and archive.testzip() is None
    oracle = torch.load(path, weights_only=True)
    got = load_checkpoint(path)
    assert got.keys() == expected.keys() == oracle.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v) and torch.equal(oracle[k], v), k


def _zip_with_an_empty_central_directory(tmp_path) -> bytes:
    """A local file entry (so the file starts with PK\\x03\\x04) and a central directory that lists nothing."""
    zipped = tmp_path / "one.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("stray.txt", b"left behind")
    data = zipped.read_bytes()
    start = data.rfind(b"PK\x01\x02")  # the central directory: dropped
    return data[:start] + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0, 0, 0, start, 0)


def _onnx_without_ir_version() -> bytes:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, producer_name="onnx.helper")
    model.ClearField("ir_version")  # so its first field is the producer name, not ir_version
    data = model.SerializeToString()
    assert onnx.load_from_string(data).producer_name == "onnx.helper"
    return data


def _safetensors_header_only(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


_CUT_3 = "a" * 62 + "日本"  # 日 is 3 bytes: 2 of them in the 64 bytes read
_CUT_4 = "a" * 61 + "😀 text"  # 4 bytes: 3 of them in the 64 bytes read
_SAMPLES = {
    "cut-3-byte-char": (lambda tmp: _CUT_3.encode(), f"a text file (it starts with {'a' * 32!r})"),
    "cut-4-byte-char": (lambda tmp: _CUT_4.encode(), f"a text file (it starts with {'a' * 32!r})"),
    "empty": (lambda tmp: b"", "an empty file"),
    "onnx-without-ir-version": (
        lambda tmp: _onnx_without_ir_version(),
        "an ONNX model (read it with onnx, or pass it where an .onnx file is expected)"),
    "zip-with-empty-central-directory": (
        _zip_with_an_empty_central_directory, "a zip archive without PyTorch's data.pkl (it holds nothing)"),
}


@pytest.mark.parametrize("sample", sorted(_SAMPLES))
def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path, sample):
    make, what = _SAMPLES[sample]
    path = tmp_path / "model.pt"
    path.write_bytes(make(tmp_path))
    if sample.startswith("zip"):
        with zipfile.ZipFile(path) as archive:  # the oracle: zipfile reads it, and it lists nothing
            assert archive.namelist() == []
    with pytest.raises(NotACheckpointError) as info:
        load_checkpoint(path)
    assert info.value.what == what
    assert f"is {what}, not a PyTorch checkpoint" in str(info.value)


def test_header_only_safetensors_under_a_pt_name_are_read_as_safetensors(tmp_path):
    """A safetensors file with no tensors ends where its header ends (8 + header length == size): it is still
    safetensors, read as safetensors reads it; one whose header promises bytes the file lacks is an invalid
    safetensors file, not 'a file of unknown format'."""
    from safetensors.torch import load_file

    empty = tmp_path / "empty.pt"
    empty.write_bytes(_safetensors_header_only(b'{"__metadata__":{"step":"3"}}'))
    assert load_checkpoint(empty) == load_file(empty) == {}
    short = tmp_path / "short.pt"
    short.write_bytes(_safetensors_header_only(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'))
    with pytest.raises(Exception):  # noqa: B017 - the oracle: safetensors refuses it
        load_file(short)
    with pytest.raises(NotACheckpointError, match="not a valid safetensors file"):
        load_checkpoint(short)


def test_a_tensor_byte_that_does_not_match_its_crc_is_named(tmp_path):
    torch.save({"w": torch.arange(16.0)}, tmp_path / "whole.pt")
    data = bytearray((tmp_path / "whole.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "whole.pt") as archive:
        member = next(m for m in archive.infolist() if m.filename.endswith("data/0"))
    start = data.index(struct.pack("<f", 5.0), member.header_offset)  # a stored (uncompressed) member
    data[start + 3] ^= 0x01
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:  # the oracle: zipfile's own CRC-32 check
        assert archive.testzip() == member.filename
    with pytest.raises(NotACheckpointError, match=f"member {member.filename!r} does not match its CRC-32"):
        load_checkpoint(path)
