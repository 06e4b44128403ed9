"""bnkit.cli.common: the output-path and device checks every writing command uses."""
from __future__ import annotations

import os

import pytest
import torch

from bnkit.cli.common import (
    ONNX_SUFFIXES, STATE_DICT_SUFFIXES, UsageError, check_output, parse_device,
)


def test_check_output_accepts_a_new_file_with_a_matching_suffix(tmp_path):
    for name in ("a.pt", "a.pth", "a.safetensors", "A.PT"):
        assert check_output(str(tmp_path / name), suffixes=STATE_DICT_SUFFIXES) == tmp_path / name
    assert check_output(tmp_path / "m.onnx", suffixes=ONNX_SUFFIXES, inputs=[None, tmp_path / "x.onnx"])


def test_check_output_refuses_an_input_file_by_any_name(tmp_path, monkeypatch):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    os.link(weights, tmp_path / "hard.pt")
    os.symlink(weights, tmp_path / "soft.pt")
    monkeypatch.chdir(tmp_path)
    for name in ("w.pt", str(weights), "./w.pt", "hard.pt", "soft.pt", f"../{tmp_path.name}/w.pt"):
        with pytest.raises(UsageError, match="names the input file"):
            check_output(name, suffixes=STATE_DICT_SUFFIXES, inputs=[weights])
    assert weights.read_bytes() == b"weights"


def test_check_output_refuses_folders_wrong_suffixes_and_missing_parents(tmp_path):
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(UsageError, match="is a folder"):
        check_output(str(tmp_path / "dir.pt"), suffixes=STATE_DICT_SUFFIXES)
    with pytest.raises(UsageError, match="is a folder"):
        check_output(str(tmp_path / "new.pt") + "/", suffixes=STATE_DICT_SUFFIXES)
    for name, got in (("o.onnx", "'.onnx'"), ("out.txt", "'.txt'"), ("calib.npy", "'.npy'"), ("noext", "no suffix")):
        with pytest.raises(UsageError) as info:
            check_output(str(tmp_path / name), suffixes=STATE_DICT_SUFFIXES)
        assert ".pt, .pth, .safetensors" in str(info.value) and got in str(info.value)
    with pytest.raises(UsageError, match=r"ending in \.onnx"):
        check_output(str(tmp_path / "f.pt"), suffixes=ONNX_SUFFIXES)
    missing = tmp_path / "no" / "such" / "f.onnx"
    with pytest.raises(UsageError, match="does not exist; create it first"):
        check_output(str(missing), suffixes=ONNX_SUFFIXES)
    assert not (tmp_path / "no").exists()  # nothing created


def test_parse_device(monkeypatch):
    assert parse_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "", "cuda:x"):
        with pytest.raises(UsageError, match="unknown device"):
            parse_device(bad)
    with pytest.raises(UsageError, match="unsupported device 'meta'"):
        parse_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UsageError, match="CUDA is not available"):
        parse_device("cuda")
    with pytest.raises(UsageError, match="MPS is not available"):
        parse_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert parse_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UsageError, match=r"1 CUDA device\(s\)"):
        parse_device("cuda:1")


def test_fail_prints_the_message_literally_and_unbroken(capsys):
    from unittest.mock import patch

    from bnkit.cli.app import console, fail

    message = "keys ['module.bn.weight'] [bold]not markup[/bold] in /a/" + "very_long_directory_name/" * 8 + "w.pt"
    with patch.object(console, "_width", 40):
        exit_ = fail(message)
    out = capsys.readouterr().out
    assert exit_.exit_code == 2
    assert out == f"error: {message}\n"
