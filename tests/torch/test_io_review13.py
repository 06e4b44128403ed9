"""Review 13 (RB): a legacy-format (``_use_new_zipfile_serialization=False``) checkpoint cut short is damaged, not
unsafe (a GLOBAL cut short names part of a global), with or without ``trust``; a legacy pickle that needs a global
outside the allow-list is still unsafe.

Oracle: ``torch.load`` itself: with ``weights_only=False`` it cannot read the truncated bytes (damaged) and reads the
whole file; with ``weights_only=True`` it refuses the unsafe file's global (``datetime.date``).
"""
from __future__ import annotations

import datetime
import pickletools

import pytest
import torch

from bnkit.torch.io import NotACheckpointError, UnsafeCheckpointError, load_checkpoint


def legacy_file(tmp_path, obj, name="legacy.pt"):
    path = tmp_path / name
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def pickle_ends(data: bytes) -> list[int]:
    """Where each of the legacy format's five pickles ends (magic, protocol, sys info, the object, storage keys)."""
    import io

    stream, ends = io.BytesIO(data), []
    for _ in range(5):
        list(pickletools.genops(stream))
        ends.append(stream.tell())
    return ends


def state_dict():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    return net.state_dict()


@pytest.mark.parametrize("trust", [False, True])
def test_truncated_legacy_checkpoint_is_damaged(tmp_path, trust):
    """Cut after every byte (the sys info, each GLOBAL's module and name, the storage keys, the storages): damaged,
    never unsafe, never an IndexError or struct.error from inside torch.load."""
    data = legacy_file(tmp_path, state_dict()).read_bytes()
    ends = pickle_ends(data)
    assert ends[-1] < len(data)  # the storages' bytes follow the pickles
    path = tmp_path / "cut.pt"
    for cut in range(ends[0] + 1, len(data)):  # a cut in the magic number is a pickle of unknown format
        path.write_bytes(data[:cut])
        with pytest.raises(Exception):  # noqa: B017 - the oracle: PyTorch cannot read it, even trusting it
            torch.load(path, weights_only=False)
        with pytest.raises(NotACheckpointError, match="damaged or incomplete"):
            load_checkpoint(path, trust=trust)


def test_whole_legacy_checkpoint_loads(tmp_path):
    expected = state_dict()
    got = load_checkpoint(legacy_file(tmp_path, expected))
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("zipped", [False, True])
def test_whole_pickled_model_needing_trust_loads_with_it_in_either_format(tmp_path, zipped):
    """Review R3: the check for a cut-short pickle must not call a whole one damaged. A whole pickled model with
    tensors of several dtypes sharing storage, in the legacy and the zip format: unsafe without trust (torch's
    weights_only refuses it: the oracle), equal to torch.load's own result with it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4)).double()
    obj = {"model": net, "half": torch.randn(3, 5).half(), "view": net[0].weight[1:], "ints": torch.arange(6)}
    path = tmp_path / "model.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(Exception):  # noqa: B017 - the oracle: weights_only refuses the module's class
        torch.load(path, weights_only=True)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)
    got, want = load_checkpoint(path, trust=True), torch.load(path, weights_only=False)
    for k, v in want["model"].state_dict().items():
        assert torch.equal(got["model"].state_dict()[k], v), k
    for k in ("half", "view", "ints"):
        assert torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype, k


def test_unsafe_legacy_checkpoint_is_still_unsafe(tmp_path):
    obj = {"state_dict": state_dict(), "date": datetime.date(2020, 1, 2)}
    path = legacy_file(tmp_path, obj)
    with pytest.raises(Exception, match="datetime"):  # noqa: B017 - the oracle: weights_only refuses the global
        torch.load(path, weights_only=True)
    with pytest.raises(UnsafeCheckpointError, match="datetime"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust=True)["date"] == datetime.date(2020, 1, 2)


@pytest.mark.parametrize("trust", [False, True])
def test_a_zip_checkpoint_with_a_damaged_data_pkl_is_damaged_never_unsafe(tmp_path, trust):
    """Review R4: with data.pkl's CRC no longer checked, bit flips (as bit rot leaves them: the CRC stale) were
    called unsafe code (347 of 690), loaded with trust as wrong objects, or raised KeyError from the memo; a
    quarter loaded as other keys, shapes or offsets. Oracle: Python's zipfile reports the CRC mismatch of each
    damaged file. One bit flipped at each byte of data.pkl: damaged, every time."""
    import io
    import struct
    import warnings
    import zipfile

    buf = io.BytesIO()
    torch.save(state_dict(), buf)
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

    expected = state_dict()
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


def test_a_dangling_link_is_named_as_one(tmp_path):
    import os

    from bnkit.onnx.graph import load_model

    for name in ("w.pt", "m.onnx"):
        os.symlink(tmp_path / "nowhere", tmp_path / name)
    with pytest.raises(FileNotFoundError, match="symbolic link that leads to no file"):
        load_checkpoint(tmp_path / "w.pt")
    with pytest.raises(FileNotFoundError, match="symbolic link that leads to no file"):
        load_model(tmp_path / "m.onnx")


def _central_directory(data: bytes) -> range:
    start = data.find(b"PK\x01\x02")
    return range(start, len(data))


def test_every_bit_flip_in_the_central_directory_is_damage_or_changes_nothing(tmp_path):
    """Review R5: zipfile raised NotImplementedError, RuntimeError ("encrypted") or zlib.error on flipped flag,
    method and version fields (a traceback from bnkit audit), and a member flagged as a folder (MS-DOS attribute
    0x10) passed every CRC while torch read it as empty: uninitialized weights. Oracle: the original state dict;
    each flip is refused as damaged or loads exactly it."""
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
    expected = state_dict()
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
    """Review R6: torch.serialization.skip_data() writes CRC 0 for the tensors only, their bytes filled in by a
    second pass (its documented use); such a file was refused as damaged. Oracle: torch.load of the filled file."""
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
    """Review R7: without CRCs nothing checked data.pkl, and a damaged opcode was called unsafe code. Oracle:
    torch.load itself cannot read the file even trusting it."""
    import struct
    import zipfile

    path = tmp_path / "w.pt"
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state_dict(), path)
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


def test_flipped_bits_in_a_legacy_checkpoints_records_are_damage_never_a_bare_error(tmp_path):
    """Mutation round M11: single-bit flips in the object pickle of a legacy file (its storages' records) made
    torch's loader raise AssertionError, TypeError, AttributeError, ValueError or OverflowError straight through
    load_checkpoint. Every flip in a 200-byte window there, bits 0 and 4: it loads (a flip that changes nothing
    checked, or a value), is damaged, or unsafe (a global renamed into another one). (With trust, a record turned
    into a call outside the allow-list fails in that call, and its error passes through as the pickle's own.)"""
    path = legacy_file(tmp_path, state_dict())
    data = path.read_bytes()
    start = pickle_ends(data)[2]  # the object pickle: the state dict and its storages' records
    flipped, outcomes = tmp_path / "flipped.pt", set()
    for pos in range(start + 60, start + 260):
        for bit in (0, 4):
            damaged = bytearray(data)
            damaged[pos] ^= 1 << bit
            flipped.write_bytes(bytes(damaged))
            try:
                load_checkpoint(flipped)
                outcomes.add("loaded")
            except (NotACheckpointError, UnsafeCheckpointError) as exc:
                outcomes.add(type(exc).__name__)
    assert "NotACheckpointError" in outcomes


def _asserting():
    raise AssertionError("the file's own check")


class _AssertsOnLoad:
    def __reduce__(self):
        return (_asserting, ())


def test_a_trusted_legacy_model_with_a_damaged_storage_key_is_damaged(tmp_path):
    """Review R14b: PyTorch's legacy loader asserts that every storage key it read exists, and that
    AssertionError passed through load_checkpoint(trust=True). An assert in the pickle's own code still does."""
    import re

    path = legacy_file(tmp_path, torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)))
    raw = bytearray(path.read_bytes())
    key = list(re.finditer(rb"X.\x00\x00\x00(\d+)", raw))[-1]  # the last copy: the storage-key list's
    raw[key.start(1)] = ord("9") if raw[key.start(1)] != ord("9") else ord("8")
    path.write_bytes(bytes(raw))
    with pytest.raises(NotACheckpointError, match="damaged.*not found"):
        load_checkpoint(path, trust=True)
    own = tmp_path / "asserts.pt"
    torch.save({"w": torch.zeros(2), "payload": _AssertsOnLoad()}, own)
    with pytest.raises(AssertionError, match="the file's own check"):
        load_checkpoint(own, trust=True)
