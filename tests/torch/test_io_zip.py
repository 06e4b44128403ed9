"""bnkit.torch.io.load_checkpoint on zip checkpoints whose bytes were changed: a flipped bit in data.pkl, in a
tensor's bytes or in the central directory is damage (named by its CRC-32 where it has one) or changes nothing,
never unsafe code or other weights; files written without CRCs, with ``skip_data()`` filled in later, or re-zipped
with a folder entry load.

Oracles: ``torch.load`` itself (what it reads, what it refuses), Python's ``zipfile`` (its CRC-32 check, its reading
of the central directory), and the state dict that was saved.
"""
from __future__ import annotations

import struct
import zipfile

import pytest
import torch
from _helpers import linear_bn_state_dict

from bnkit.torch.io import NotACheckpointError, load_checkpoint


@pytest.mark.parametrize("trust", [False, True])
def test_a_zip_checkpoint_with_a_damaged_data_pkl_is_damaged_never_unsafe(tmp_path, trust):
    """Unless data.pkl's CRC is checked, bit flips (as bit rot leaves them: the CRC stale) are called unsafe code
    (347 of 690), loaded with trust as wrong objects, or raise KeyError from the memo; a quarter load as other
    keys, shapes or offsets. Oracle: Python's zipfile reports the CRC mismatch of each damaged file. One bit
    flipped at each byte of data.pkl: damaged, every time."""
    import io
    import struct
    import zipfile

    buf = io.BytesIO()
    torch.save(linear_bn_state_dict(), buf)
    data = buf.getvalue()
    info = next(i for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if i.filename.endswith("data.pkl"))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    path = tmp_path / "flip.pt"
    for offset in range(info.file_size):
        bad = bytearray(data)
        bad[start + offset] ^= 0x40
        path.write_bytes(bad)
        with pytest.raises(zipfile.BadZipFile, match="CRC"):  # the oracle
            zipfile.ZipFile(path).read(info.filename)
        with pytest.raises(NotACheckpointError, match="CRC"):
            load_checkpoint(path, trust=trust)


def test_a_flipped_bit_in_a_tensors_bytes_is_damage_not_other_weights(tmp_path):
    """torch.load reads a zip checkpoint without its CRCs: a flipped bit in a tensor's bytes loaded as another
    value. Oracle: torch.load itself loads the changed value; zipfile reports the CRC mismatch."""
    import struct
    import zipfile

    expected = linear_bn_state_dict()
    path = tmp_path / "w.pt"
    torch.save(expected, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename)
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    data[member.header_offset + 30 + name_len + extra_len] ^= 0x40  # the first byte of a tensor's storage
    path.write_bytes(bytes(data))
    loaded = torch.load(path, weights_only=True)  # the oracle: torch takes the changed bytes as weights
    assert any(not torch.equal(loaded[k], v) for k, v in expected.items())
    with pytest.raises(NotACheckpointError, match="CRC"):
        load_checkpoint(path)


def _central_directory(data: bytes) -> range:
    start = data.find(b"PK\x01\x02")
    return range(start, len(data))


def test_every_bit_flip_in_the_central_directory_is_damage_or_changes_nothing(tmp_path):
    """zipfile raises NotImplementedError, RuntimeError ("encrypted") or zlib.error on flipped flag, method and
    version fields (a traceback from bnkit audit, unless caught), and a member flagged as a folder (MS-DOS
    attribute 0x10) passes every CRC while torch reads it as empty: uninitialized weights. Oracle: the original
    state dict; each flip is refused as damaged or loads exactly it."""
    import warnings

    expected = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.arange(3.0)}
    source = tmp_path / "w.pt"
    torch.save(expected, source)
    data = source.read_bytes()
    path = tmp_path / "flip.pt"
    outcomes = set()
    for offset in _central_directory(data):
        for bit in range(8):
            bad = bytearray(data)
            bad[offset] ^= 1 << bit
            path.write_bytes(bytes(bad))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = load_checkpoint(path)
            except NotACheckpointError:
                outcomes.add("damaged")
                continue
            assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items()), \
                (offset, bit)
            outcomes.add("same")
    assert outcomes == {"damaged", "same"}


def test_a_checkpoint_saved_without_crcs_loads(tmp_path):
    """torch.serialization.set_crc32_options(False) writes CRC 0 for every member, and torch.load reads it (the
    oracle): it is not damage."""
    expected = linear_bn_state_dict()
    path = tmp_path / "w.pt"
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(expected, path)
    finally:
        torch.serialization.set_crc32_options(previous)
    want = torch.load(path, weights_only=True)
    got = load_checkpoint(path)
    assert all(torch.equal(got[k], want[k]) and torch.equal(got[k], v) for k, v in expected.items())


def test_a_skip_data_checkpoint_filled_in_later_loads(tmp_path):
    """torch.serialization.skip_data() writes CRC 0 for the tensors only, their bytes filled in by a
    second pass (its documented use); such a file is not damaged. Oracle: torch.load of the filled file."""
    import struct
    import zipfile

    expected = {"a": torch.arange(6.0), "b": torch.ones(4)}
    path = tmp_path / "w.pt"
    with torch.serialization.skip_data():
        torch.save(expected, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        storages = [m for m in archive.infolist() if "/data/" in m.filename and "/.data/" not in m.filename]
    for member in storages:  # the second pass: each storage's bytes written where the save reserved them
        name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
        start = member.header_offset + 30 + name_len + extra_len
        raw = expected["ab"[int(member.filename.rsplit("/", 1)[1])]].numpy().tobytes()
        data[start:start + len(raw)] = raw
    path.write_bytes(bytes(data))
    want = torch.load(path, weights_only=True)
    got = load_checkpoint(path)
    assert all(torch.equal(got[k], want[k]) and torch.equal(got[k], v) for k, v in expected.items())


def test_a_crc_less_checkpoint_with_a_damaged_pickle_is_damaged_not_unsafe(tmp_path):
    """Without CRCs nothing checks data.pkl by its CRC: a damaged opcode there is damage, not unsafe code. Oracle:
    torch.load itself cannot read the file even trusting it."""
    import struct
    import zipfile

    path = tmp_path / "w.pt"
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(linear_bn_state_dict(), path)
    finally:
        torch.serialization.set_crc32_options(previous)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = next(m for m in archive.infolist() if m.filename.endswith("data.pkl"))
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    data[member.header_offset + 30 + name_len + extra_len] = 0xFF  # the PROTO opcode
    path.write_bytes(bytes(data))
    with pytest.raises(Exception):  # noqa: B017 - the oracle
        torch.load(path, weights_only=False)
    for trust in (False, True):
        with pytest.raises(NotACheckpointError, match="damaged"):
            load_checkpoint(path, trust=trust)


def test_a_zip_checkpoint_with_a_real_folder_entry_loads(tmp_path):
    """A checkpoint re-zipped by a tool that writes a folder entry (``archive/``, MS-DOS attribute 0x10 on a name
    ending in '/') is not a file member flagged as a folder: torch reads it, and so does load_checkpoint."""
    expected = linear_bn_state_dict()
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
