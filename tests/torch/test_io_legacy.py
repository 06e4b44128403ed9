"""bnkit.torch.io.load_checkpoint on PyTorch's legacy format (``_use_new_zipfile_serialization=False``): a file cut
short or with flipped bits is damaged, never unsafe (a GLOBAL cut short names part of a global) nor a bare error from
inside torch.load, with or without ``trust``; a whole file loads; a legacy pickle that needs a global outside the
allow-list is still unsafe.

Oracle: ``torch.load`` itself: with ``weights_only=False`` it cannot read the truncated bytes (damaged) and reads the
whole file; with ``weights_only=True`` it refuses the unsafe file's global (``datetime.date``).
"""
from __future__ import annotations

import datetime
import pickletools

import pytest
import torch
from _helpers import linear_bn_state_dict

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


@pytest.mark.parametrize("trust", [False, True])
def test_truncated_legacy_checkpoint_is_damaged(tmp_path, trust):
    """Cut after every byte (the sys info, each GLOBAL's module and name, the storage keys, the storages): damaged,
    never unsafe, never an IndexError or struct.error from inside torch.load."""
    data = legacy_file(tmp_path, linear_bn_state_dict()).read_bytes()
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
    expected = linear_bn_state_dict()
    got = load_checkpoint(legacy_file(tmp_path, expected))
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("protocol, opcode, zipped", [(1, 76, False), (4, 149, False), (5, 149, False),
                                                      (4, 149, True), (5, 149, True)])
def test_a_file_in_pickle_protocol_1_4_or_5_is_unreadable_not_called_code(tmp_path, protocol, opcode, zipped):
    """torch's weights-only unpickler has no FRAME opcode (149), which protocols 4 and 5 write, nor LONG (76),
    protocol 1's: the file holds nothing outside the allow-list, so the message names the opcode and the format
    instead of code it could run (protocol 1, which has no PROTO mark, was 'a file of unknown format'); with trust
    it loads as torch.load(weights_only=False) reads it. The default zip format with pickle_protocol=4 too: the
    advice was to re-save in that format, which the file already was."""
    expected = linear_bn_state_dict()
    path = tmp_path / "legacy.pt"
    torch.save(expected, path, _use_new_zipfile_serialization=zipped, pickle_protocol=protocol)
    with pytest.raises(Exception, match=f"Unsupported operand {opcode}"):  # the oracle: torch's own refusal
        torch.load(path, weights_only=True)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    assert f"cannot read (Unsupported operand {opcode}: pickle protocol 0, 1, 4 or 5" in str(info.value)
    assert "no pickle_protocol argument" in str(info.value) and "arbitrary code" not in str(info.value)
    got = load_checkpoint(path, trust=True)
    assert all(torch.equal(got[k], v) for k, v in expected.items()) and got.keys() == expected.keys()


@pytest.mark.parametrize("zipped", [False, True])
def test_a_file_in_pickle_protocol_0_is_named_as_such_not_damaged_when_trusted(tmp_path, zipped):
    """Review: with trust, a protocol-0 file was called damaged, after the refusal had said trust=True reads it.
    Oracle: torch.load(weights_only=False) cannot read it either (its persistent ids are text, not tuples)."""
    path = tmp_path / "p0.pt"
    torch.save(linear_bn_state_dict(), path, _use_new_zipfile_serialization=zipped, pickle_protocol=0)
    with pytest.raises(AssertionError, match="saved_id must be a tuple"):
        torch.load(path, weights_only=False)
    with pytest.raises(UnsafeCheckpointError, match="protocol 0 files cannot be read back even so"):
        load_checkpoint(path)
    with pytest.raises(NotACheckpointError, match="written with pickle protocol 0 .* cannot read back, trusted or not"):
        load_checkpoint(path, trust=True)


@pytest.mark.parametrize("zipped", [False, True])
def test_whole_pickled_model_needing_trust_loads_with_it_in_either_format(tmp_path, zipped):
    """The check for a cut-short pickle must not call a whole one damaged. A whole pickled model with
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
    obj = {"state_dict": linear_bn_state_dict(), "date": datetime.date(2020, 1, 2)}
    path = legacy_file(tmp_path, obj)
    with pytest.raises(Exception, match="datetime"):  # noqa: B017 - the oracle: weights_only refuses the global
        torch.load(path, weights_only=True)
    with pytest.raises(UnsafeCheckpointError, match="datetime"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust=True)["date"] == datetime.date(2020, 1, 2)


def test_flipped_bits_in_a_legacy_checkpoints_records_are_damage_never_a_bare_error(tmp_path):
    """Single-bit flips in the object pickle of a legacy file (its storages' records) make torch's loader raise
    AssertionError, TypeError, AttributeError, ValueError or OverflowError: none passes straight through
    load_checkpoint. Every flip in a 200-byte window there, bits 0 and 4: it loads (a flip that changes nothing
    checked, or a value), is damaged, or unsafe (a global renamed into another one). (With trust, a record turned
    into a call outside the allow-list fails in that call, and its error passes through as the pickle's own.)"""
    path = legacy_file(tmp_path, linear_bn_state_dict())
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
    """PyTorch's legacy loader asserts that every storage key it read exists: that AssertionError is damage,
    not passed through load_checkpoint(trust=True). An assert in the pickle's own code still does."""
    import re

    path = legacy_file(tmp_path, torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)))
    raw = bytearray(path.read_bytes())
    # a key in the storage-key list, the fifth pickle (searched there alone: the storages' raw bytes after it
    # can hold the same byte pattern, and changing one of those damaged nothing, now and then)
    start, end = pickle_ends(bytes(raw))[3:5]
    key = list(re.finditer(rb"X.\x00\x00\x00(\d+)", raw[start:end]))[-1]
    at = start + key.start(1)
    raw[at] = ord("9") if raw[at] != ord("9") else ord("8")
    path.write_bytes(bytes(raw))
    with pytest.raises(NotACheckpointError, match="damaged.*not found"):
        load_checkpoint(path, trust=True)
    own = tmp_path / "asserts.pt"
    torch.save({"w": torch.zeros(2), "payload": _AssertsOnLoad()}, own)
    with pytest.raises(AssertionError, match="the file's own check"):
        load_checkpoint(own, trust=True)


@pytest.mark.parametrize("trust", [False, True])
def test_a_legacy_file_whose_last_pickle_is_damaged_is_damaged_not_unsafe(tmp_path, trust):
    """The storage keys, the last of the legacy format's pickles, with its STOP opcode overwritten: torch's
    weights_only unpickler refuses it (UnpicklingError), and it is damage, not a global outside the allow-list."""
    data = bytearray(legacy_file(tmp_path, linear_bn_state_dict()).read_bytes())
    end = pickle_ends(bytes(data))[-1]
    assert data[end - 1:end] == b"."  # STOP
    data[end - 1] = 0xFF
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(Exception):  # noqa: B017 - the oracle: PyTorch cannot read it, even trusting it
        torch.load(path, weights_only=False)
    with pytest.raises(NotACheckpointError, match="damaged"):
        load_checkpoint(path, trust=trust)
