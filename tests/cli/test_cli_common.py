"""bnkit.cli.common: the output-path and device checks every writing command uses, and the data-file loader; through
the commands (audit, recalibrate, fold): an input path the OS cannot look up (EACCES, ENAMETOOLONG), a symbolic link
loop or a damaged data file is one error line, exit 2; SystemExit from the user's code (factories, the model's
forward, --forward) is reported as its other exceptions are, KeyboardInterrupt still interrupts; --json prints a file
name that is not UTF-8 escaped.

Oracles: what the OS says of each path (os.stat, os.strerror), json.loads of the printed report compared with
os.fsdecode, the exit status and the folder's files (nothing written)."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from _helpers import BNKIT_MAIN, WritesFile, one_line_error, run_cli
from safetensors.torch import save_file

from bnkit.cli.common import (
    ONNX_SUFFIXES, STATE_DICT_SUFFIXES, UsageError, check_output, dtype_change, load_inputs, parse_device,
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

    from bnkit.cli.app import err_console, fail

    message = "keys ['module.bn.weight'] [bold]not markup[/bold] in /a/" + "very_long_directory_name/" * 8 + "w.pt"
    with patch.object(err_console, "_width", 40):
        exit_ = fail(message)
    captured = capsys.readouterr()
    assert exit_.exit_code == 2
    assert captured.err == f"error: {message}\n" and captured.out == ""  # stderr: stdout stays the command's output


def test_load_inputs_reads_every_data_format_and_picks_the_inputs(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "one.npz", anything=x)
    np.savez(tmp_path / "named.npz", labels=np.zeros(6), images=x)
    torch.save({"labels": torch.zeros(6), "x": torch.from_numpy(x)}, tmp_path / "d.pt")
    torch.save((torch.from_numpy(x), torch.zeros(6)), tmp_path / "pair.pt")
    save_file({"inputs": torch.from_numpy(x), "y": torch.zeros(6)}, str(tmp_path / "d.safetensors"))
    np.save(tmp_path / "npy_as.npy", x)  # an .npy array under a checkpoint's name, refused for being one (review)
    (tmp_path / "npy_as.npy").rename(tmp_path / "npy_as.pt")
    for name in ("a.npy", "one.npz", "named.npz", "d.pt", "pair.pt", "d.safetensors", "npy_as.pt"):
        got = load_inputs(tmp_path / name)
        np.testing.assert_array_equal(np.asarray(got), x, err_msg=name)
    np.testing.assert_array_equal(load_inputs(tmp_path / "named.npz", "labels"), np.zeros(6))


def test_load_inputs_errors_name_the_file_and_the_way_out(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros(2), b=np.ones(2))
    with pytest.raises(ValueError, match=r"two.npz holds \['a', 'b'\]; name the inputs one of .* or choose them with --k"):
        load_inputs(tmp_path / "two.npz", key_option="--k")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="object arrays are refused"):
        load_inputs(tmp_path / "obj.npz")
    with pytest.raises(ValueError, match="no such data file"):
        load_inputs(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="is a directory"):
        load_inputs(tmp_path)
    (tmp_path / "x.csv").write_text("1.0,2.0\n3.0,4.0\n")
    with pytest.raises(ValueError, match=r"x.csv is a text file \(it starts with '1.0,2.0.*'\), not a data file: "
                                         r"save the inputs as .npy, .npz or .safetensors"):
        load_inputs(tmp_path / "x.csv")
    (tmp_path / "legacy.pt").write_bytes(b"\x80\x02" + b"not really a pickle" * 4)  # a damaged legacy torch.save
    with pytest.raises(ValueError, match=r"legacy.pt is a damaged or incomplete PyTorch checkpoint") as info:
        load_inputs(tmp_path / "legacy.pt")
    assert "None" not in str(info.value)  # what the file is was not found out: said as such, not as "is None"
    torch.save({"x": "not an array"}, tmp_path / "str.pt")
    with pytest.raises(ValueError, match="holds a str, not an array"):
        load_inputs(tmp_path / "str.pt")


def test_load_inputs_reads_saved_lists_by_their_structure(tmp_path):
    x = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    batches = list(torch.split(x, 4))  # 4 + 4 + 2 samples, as list(loader) gives them
    cases = {
        "ragged.pt": batches,  # one shape per sample, different lengths: batches
        "loader.pt": [(b, torch.zeros(len(b))) for b in batches],  # list(loader) of (x, y)
        "two_pairs.pt": [(x[:5], torch.zeros(5)), (x[5:], torch.ones(5))],  # the pairs say which is x
        "dataset.pt": [(row, int(i % 3)) for i, row in enumerate(x)],  # list(dataset): samples, stacked
        "xy.pt": (x, torch.zeros(10, dtype=torch.long)),  # torch.save((x, y))
        "onehot.pt": (x, torch.eye(10)[:, :3]),  # (N, 6) inputs, (N, 3) targets
        "one_batch.pt": [[x, torch.zeros(10)]],  # list(loader) of a calibration set that fits one batch
        "labels.pt": (x, [f"img{i}.png" for i in range(10)]),  # (inputs, a list of file names)
        "one_item.pt": [x],  # a one-item list: the array itself, not a batch of one (1, 10, 6)
        "triplets.pt": [(b, torch.zeros(len(b)), torch.arange(len(b))) for b in batches],  # (x, y, index)
        "x_y_names.pt": (x, torch.zeros(10), [f"f{i}.png" for i in range(10)]),  # (inputs, targets, file names)
        "tensordataset.pt": list(torch.utils.data.TensorDataset(x, torch.arange(10))),  # 0-d tensor labels
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        assert torch.equal(load_inputs(tmp_path / name), x), name  # every sample, in order
    refused = {
        "same.pt": [x[:5], x[5:]],  # two batches, an (x, x) pair or samples: not guessed
        "varsize.pt": [(torch.zeros(4, 3, 8, 8), torch.zeros(4)), (torch.zeros(4, 3, 9, 9), torch.zeros(4))],
        "dicts.pt": [{"x": x}, {"x": x}],
        # samples (1, 6) with a 1-long target, or batches of one row? (stacking gives (2, 1, 6), joining (2, 6))
        "rows.pt": [(x[:1], torch.zeros(1)), (x[1:2], torch.ones(1))],
        # the same at the limit: samples (4, 6) with 4-long targets, or batches of 4?
        "pairs_of_4.pt": [(x[:4], torch.zeros(4)), (x[4:8], torch.ones(4))],
        # samples (16, 8) with one-hot (10,) targets: the targets are not one per row, so these are no batches
        "seq_samples.pt": [(torch.ones(16, 8) * i, torch.eye(10)[i]) for i in range(5)],
        "y_x.pt": (torch.arange(10), x.reshape(10, 2, 3)),  # (targets, inputs) in the wrong order: no labels as x
        "ragged_samples.pt": [(x[:5], 1), (x[:4], 2)],  # list(dataset) of samples of different lengths
        "losses.pt": [torch.tensor(0.5), torch.tensor(0.7)],  # numbers, not inputs
    }
    for name, obj in refused.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match=rf"{name} holds (a (list|tuple) of \d+ items whose structure does not "
                                             r"say which are the inputs|(batches|samples) of different shapes)"):
            load_inputs(tmp_path / name)


def test_load_inputs_reads_only_the_chosen_array_in_native_byte_order(tmp_path):
    x = np.arange(12, dtype=">f4").reshape(3, 4)  # big-endian, as FITS and some instruments write
    np.savez(tmp_path / "d.npz", x=x, meta=np.array([{"a": 1}], dtype=object))
    got = load_inputs(tmp_path / "d.npz", "x")
    assert got.dtype == np.dtype("=f4") and torch.equal(torch.from_numpy(got), torch.arange(12.0).reshape(3, 4))
    with pytest.raises(ValueError, match=r"d.npz has no array 'y'; it holds \['meta', 'x'\]"):
        load_inputs(tmp_path / "d.npz", "y")
    with pytest.raises(ValueError, match=r"d.npz is not a readable .*object arrays are refused.*its array 'meta'"):
        load_inputs(tmp_path / "d.npz", "meta")
    torch.save(torch.zeros(4, 3, device="meta"), tmp_path / "meta.pt")
    with pytest.raises(ValueError, match=r"meta.pt holds a meta tensor: a shape without values"):
        load_inputs(tmp_path / "meta.pt")
    if np.dtype(np.longdouble).itemsize > 8:  # x86: 80-bit extended precision
        np.save(tmp_path / "ld.npy", np.ones((2, 3), dtype=np.longdouble))
        with pytest.raises(ValueError, match=r"holds float128 values, which PyTorch has no dtype for"):
            load_inputs(tmp_path / "ld.npy")


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.longdouble, np.complex64, np.complex128, np.clongdouble])
def test_load_inputs_takes_exactly_the_dtypes_pytorch_has(tmp_path, dtype):
    """Oracle: torch.from_numpy itself. complex128 (16 bytes) is a PyTorch dtype, while a float of more than 8
    bytes or a complex of more than 16 (x86's 80-bit long double) is not, and must be refused with a way out."""
    x = np.arange(6).reshape(2, 3).astype(dtype)
    np.save(tmp_path / "d.npy", x)
    try:
        expected = torch.from_numpy(x)
    except TypeError:
        with pytest.raises(ValueError, match=rf"holds {x.dtype} values, which PyTorch has no dtype for: save them as "
                                             rf"{'complex128' if x.dtype.kind == 'c' else 'float64'}"):
            load_inputs(tmp_path / "d.npy")
    else:
        assert torch.equal(torch.from_numpy(load_inputs(tmp_path / "d.npy")), expected)


def test_load_inputs_names_what_a_file_with_an_array_name_is(tmp_path):
    """np.load tells .npy from .npz by the first bytes: files that are neither are named for what they are, and
    damaged ones say so, as ValueError (whatever np.load or zipfile raised: EOFError, BadZipFile)."""
    import onnx
    from onnx import helper

    good = tmp_path / "good.npz"
    np.savez(good, x=np.arange(12, dtype=np.float32).reshape(6, 2))
    data = good.read_bytes()
    member = data.index(b"\x93NUMPY")  # the stored (uncompressed) x.npy: flip one byte of its values
    files = {
        "empty.npy": (b"", "is an empty file, not a NumPy"),
        "text.npy": (b"1,2,3\n4,5,6\n", r"is a text file \(it starts with '1,2,3"),
        "cut.npz": (data[: len(data) // 2], r"is a damaged zip archive \(a truncated or corrupt .npz file\?\)"),
        "crc.npz": (data[: member + 140] + bytes([data[member + 140] ^ 1]) + data[member + 141:],
                    r"its array 'x': BadZipFile: Bad CRC-32"),
    }
    for name, (content, message) in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} {message}" if " is " in message[:4] else message):
            load_inputs(tmp_path / name)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph), tmp_path / "model.npy")  # an ONNX model under an array's name
    torch.save(torch.zeros(3), tmp_path / "tensor.npy")
    save_file({"x": torch.zeros(3)}, tmp_path / "st.npz")
    for name, message in [("model.npy", "is an ONNX model"), ("tensor.npy", "is a pickle or torch.save file"),
                          ("st.npz", "is a safetensors file")]:
        with pytest.raises(ValueError, match=f"{name} {message}.*, not a NumPy .npy/.npz array file"):
            load_inputs(tmp_path / name)
    with open(tmp_path / "swapped.npz", "wb") as f:  # an .npy under an .npz name: np.load reads it by its bytes
        np.save(f, np.ones(3))
    np.testing.assert_array_equal(load_inputs(tmp_path / "swapped.npz"), np.ones(3))
    import zipfile

    with zipfile.ZipFile(tmp_path / "mixed.npz", "w") as archive:  # np.load reads any zip's .npy members
        archive.writestr("x.npy", (tmp_path / "swapped.npz").read_bytes())
        archive.writestr("README.txt", "the inputs")
    np.testing.assert_array_equal(load_inputs(tmp_path / "mixed.npz"), np.ones(3))
    np.savez(tmp_path / "none.npz")  # no arrays: a zip of nothing, which np.load opens
    with pytest.raises(ValueError, match=r"none.npz holds no arrays$"):
        load_inputs(tmp_path / "none.npz")


def test_load_inputs_never_runs_a_pickle(tmp_path):
    from bnkit.torch.io import UnsafeCheckpointError

    target = tmp_path / "pwned.txt"
    torch.save({"x": torch.zeros(2), "payload": WritesFile(str(target))}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="never unpickled with code") as err:
        load_inputs(tmp_path / "evil.pt")
    assert "--trust" not in str(err.value).replace("no --trust for data", "")  # the data options have no --trust
    assert not target.exists()


def test_check_output_refuses_a_name_the_file_system_cannot_hold(tmp_path):
    with pytest.raises(UsageError, match="too long"):  # ENAMETOOLONG: a 300-character file name
        check_output(str(tmp_path / ("x" * 300 + ".onnx")), suffixes=ONNX_SUFFIXES)


def test_build_model_names_the_exception_of_the_users_code(tmp_path, monkeypatch):
    from bnkit.cli.common import build_model

    (tmp_path / "broken_models.py").write_text("undefined_name\n")
    (tmp_path / "raising_models.py").write_text("def make():\n    raise KeyError('layer4')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError, match="importing it raised NameError: name 'undefined_name' is not defined"):
        build_model("broken_models:make")
    with pytest.raises(UsageError, match="it raised KeyError: 'layer4'"):
        build_model("raising_models:make")
    with pytest.raises(UsageError, match="cannot import module 'no_such_module_here'"):
        build_model("no_such_module_here:make")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated in torch 2.13
def test_a_torchscript_factory_is_refused_by_every_command_with_nothing_written(tmp_path, monkeypatch):
    """A factory returning torch.jit.script(model): the audit with --model passed it ('0 BatchNorm layer(s)
    audited', exit 0, hiding the never-updated statistics the checkpoint alone shows), with --data it printed a
    traceback, recalibrate claimed there was no BatchNorm layer. Oracle: one error line, exit 2, no file."""
    from bnkit.torch.zoo import MLP

    (tmp_path / "scripted_models.py").write_text(
        "import torch\nfrom bnkit.torch.zoo import MLP\n\ndef make():\n    return torch.jit.script(MLP())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(MLP().state_dict(), tmp_path / "w.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32))
    spec, out = "scripted_models:make", tmp_path / "out.pt"
    for args in (("audit", tmp_path / "w.pt", "--model", spec),
                 ("audit", tmp_path / "w.pt", "--model", spec, "--data", tmp_path / "x.npy"),
                 ("recalibrate", "--model", spec, "--weights", tmp_path / "w.pt", "--data", tmp_path / "x.npy",
                  "-o", out),
                 ("fold", "--model", spec, "--weights", tmp_path / "w.pt", "--input-shape", "2x64", "-o", out,
                  "--force")):
        line = one_line_error(run_cli(*args))
        assert "scripted_models:make': the model is TorchScript" in line, line
        assert not out.exists()


def test_every_command_names_a_value_that_is_not_a_tensor_where_the_model_has_one(tmp_path):
    """A checkpoint holding 2.weight as an int: each command called the key missing. Oracle: the file's contents."""
    from bnkit.torch.zoo import MLP

    torch.save({**MLP().state_dict(), "2.weight": 5}, tmp_path / "w.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32))
    spec, out = "bnkit.torch.zoo:MLP", tmp_path / "out.pt"
    for args in (("audit", tmp_path / "w.pt", "--model", spec),
                 ("recalibrate", "--model", spec, "--weights", tmp_path / "w.pt", "--data", tmp_path / "x.npy",
                  "-o", out),
                 ("fold", "--model", spec, "--weights", tmp_path / "w.pt", "-o", out)):
        result = run_cli(*args)
        line = one_line_error(result)
        assert "2.weight holds an int, not a tensor" in line and "missing" not in line
        assert not out.exists()


def test_dtype_change_compares_key_by_key_under_the_models_keys():
    """What load_state_dict casts, tensor by tensor: a checkpoint with a float16 Linear and a float32 BN loaded into
    a float32 Linear and a float16 BN has the same set of dtypes on both sides, yet every tensor is cast; a uniform
    float16 checkpoint gets the one-dtype advice, a mixed one not; DDP-prefixed keys are compared under the model's
    keys; a checkpoint in the model's own dtypes gets no note. Oracle: the dtypes of the tensors themselves."""
    from torch import nn

    from bnkit.torch.io import load_weights_into

    def model(lin, bn):
        return nn.Sequential(nn.Linear(3, 4).to(lin), nn.BatchNorm1d(4).to(bn))

    swapped = {f"module.{k}": v for k, v in model(torch.float16, torch.float32).state_dict().items()}
    target = model(torch.float32, torch.float16)
    note = dtype_change(target, load_weights_into(target, swapped), "w.pt")
    assert "(2 float16 -> float32, 4 float32 -> float16)" in note and "model.to(" not in note
    target = model(torch.float32, torch.float32)
    note = dtype_change(target, load_weights_into(target, model(torch.float16, torch.float16).state_dict()), "h.pt")
    assert "(6 float16 -> float32)" in note and "return model.to(torch.float16)" in note
    same = model(torch.float32, torch.float16)
    assert dtype_change(same, load_weights_into(same, model(torch.float32, torch.float16).state_dict()), "s.pt") is None



def test_dtype_change_speaks_of_floating_casts_only():
    """A count saved as float (6.0, as some converters write it) loads into the int64 buffer as 6: no cast to build
    the model for; the float16 weights beside it are, and the advice names float16 alone. Oracle: the dtypes."""
    from torch import nn

    from bnkit.torch.io import load_weights_into

    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    state = {**target.state_dict(), "1.num_batches_tracked": torch.tensor(6.0)}
    assert dtype_change(target, load_weights_into(target, state), "c.pt") is None
    assert int(target[1].num_batches_tracked) == 6
    half = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).half().state_dict()
    half["1.num_batches_tracked"] = torch.tensor(6.0, dtype=torch.float16)
    note = dtype_change(target, load_weights_into(target, half), "h.pt")
    assert "(6 float16 -> float32)" in note and "return model.to(torch.float16)" in note


def test_check_output_names_a_file_where_a_folder_is_needed(tmp_path):
    """``x.npy/out.pt`` or ``x.npy/sub/out.pt`` with x.npy a file: the file is named as one (a missing folder is
    still told to be created). Oracle: the paths made here."""
    (tmp_path / "x.npy").write_bytes(b"data")
    for output in (tmp_path / "x.npy" / "out.pt", tmp_path / "x.npy" / "sub" / "out.pt"):
        with pytest.raises(UsageError, match=re.escape(f"{tmp_path / 'x.npy'} is a file, not a folder")):
            check_output(output, suffixes=STATE_DICT_SUFFIXES)
    with pytest.raises(UsageError, match="folder .*sub does not exist; create it first"):
        check_output(tmp_path / "sub" / "out.pt", suffixes=STATE_DICT_SUFFIXES)
    assert sorted(os.listdir(tmp_path)) == ["x.npy"] and (tmp_path / "x.npy").read_bytes() == b"data"

def test_load_forward_names_what_is_wrong_with_the_users_function(tmp_path, monkeypatch):
    """A module that calls sys.exit on import, a name that is no function, and a spec without
    a colon each get one clear UsageError (the exit status was the module's own; a number got through; bnkit's
    own message was led by an exception type)."""
    from bnkit.cli.common import load_forward

    (tmp_path / "fwd_exits.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "fwd_number.py").write_text("FN = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError, match=r"cannot import --forward 'fwd_exits:fn': SystemExit \(it called "
                                         r"sys.exit\(3\)"):
        load_forward("fwd_exits:fn")
    with pytest.raises(UsageError, match="--forward 'fwd_number:FN' is a int, not a function"):
        load_forward("fwd_number:FN")
    with pytest.raises(UsageError) as info:
        load_forward("no_colon_here")
    assert "ValueError" not in str(info.value) and "no_colon_here" in str(info.value)


def test_print_json_writes_strict_json_with_infinities_and_numpy_scalars_as_values(capsys):
    """fold --json may report max_abs_diff = inf: json.dumps(allow_nan=False) refused it unconverted."""
    import json

    from bnkit.cli.common import print_json

    print_json({"d": float("inf"), "n": np.float32(1.5), "name": "w\udcff.pt"})
    out = capsys.readouterr().out
    assert json.loads(out) == {"d": "inf", "n": 1.5, "name": "w\udcff.pt"} and out.isascii()


# inputs that cannot be looked up
MLP = "bnkit.torch.zoo:MLP"
LONG = "a" * 300  # over NAME_MAX (255 bytes) of every common file system: stat fails with ENAMETOOLONG


@pytest.mark.parametrize("args, path", [
    (["audit", f"{LONG}.pt"], f"{LONG}.pt"),
    (["audit", "w.pt", "--model", MLP, "--data", f"{LONG}.npy"], f"{LONG}.npy"),
    (["recalibrate", "--no-progress", "--model", MLP, "--data", f"{LONG}.npy", "-o", "out.pt"], f"{LONG}.npy"),
    (["recalibrate", "--no-progress", "--model", MLP, "--weights", f"{LONG}.pt", "--data", "x.npy", "-o", "out.pt"],
     f"{LONG}.pt"),
    (["fold", f"{LONG}.onnx", "-o", "out.onnx"], f"{LONG}.onnx"),
    (["fold", "--model", MLP, "--weights", f"{LONG}.pt", "-o", "out.pt"], f"{LONG}.pt"),
])
def test_input_name_too_long_is_one_line(files, args, path):
    with pytest.raises(OSError) as oracle:  # what the OS says of the name
        os.stat(path)
    assert oracle.value.errno == errno.ENAMETOOLONG
    line = one_line_error(run_cli(*args))
    assert path in line and line.endswith(os.strerror(errno.ENAMETOOLONG)), line
    assert not list(files.glob("out*")), "nothing is written"


@pytest.mark.parametrize("args", [
    ["audit", "locked/w.pt"],
    ["audit", "w.pt", "--model", MLP, "--data", "locked/x.npy"],
    ["recalibrate", "--no-progress", "--model", MLP, "--data", "locked/x.npy", "-o", "out.pt"],
    ["recalibrate", "--no-progress", "--model", MLP, "--weights", "locked/w.pt", "--data", "x.npy", "-o", "out.pt"],
    ["fold", "locked/m.onnx", "-o", "out.onnx"],
    ["fold", "--model", MLP, "--weights", "locked/w.pt", "-o", "out.pt"],
])
def test_input_in_a_folder_the_user_may_not_enter_is_one_line(files, monkeypatch, args):
    """The tests run as root, who may enter any folder: ``Path.stat`` of a path inside ``locked`` raises what it
    raises for a user without the right (EACCES), as ``os.stat`` would."""
    locked = files / "locked"
    locked.mkdir()
    stat = pathlib.Path.stat

    def no_entry(self, *args, **kwargs):
        if locked in self.absolute().parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return stat(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", no_entry)
    target = next(a for a in args if a.startswith("locked/"))
    line = one_line_error(run_cli(*args))
    assert target in line and line.endswith(os.strerror(errno.EACCES)), line
    assert not list(files.glob("out*")), "nothing is written"


# sys.exit() in the user's code
EXITING = """
import sys, torch
from bnkit.torch.zoo import MLP

class ExitingNet(MLP):
    def forward(self, x):
        sys.exit(3)

def make(): return MLP()
def make_exit(): sys.exit()
def make_interrupt(): raise KeyboardInterrupt
def net_exit(): return ExitingNet()
def data_exit(): sys.exit()
def forward_exit(model, batch): sys.exit("bye")
"""


@pytest.fixture
def exiting(user_module):
    return user_module("exiting_code", EXITING)


RECAL = ["recalibrate", "--no-progress", "-o", "out.pt"]


@pytest.mark.parametrize("args, call", [
    (RECAL + ["--model", "exiting_code:make_exit", "--data", "x.npy"], "sys.exit()"),
    (RECAL + ["--model", "exiting_code:make", "--data", "exiting_code:data_exit"], "sys.exit()"),
    (RECAL + ["--model", "exiting_code:net_exit", "--data", "x.npy"], "sys.exit(3)"),
    (RECAL + ["--model", "exiting_code:make", "--data", "x.npy", "--forward", "exiting_code:forward_exit"],
     "sys.exit('bye')"),
    (["audit", "w.pt", "--model", "exiting_code:make_exit", "--json"], "sys.exit()"),
    (["audit", "w.pt", "--model", "exiting_code:net_exit", "--data", "x.npy", "--json"], "sys.exit(3)"),
    (["audit", "w.pt", "--model", "exiting_code:make", "--data", "x.npy", "--forward", "exiting_code:forward_exit"],
     "the model or --forward 'exiting_code:forward_exit' raised SystemExit (it called sys.exit('bye')"),
    (["fold", "--model", "exiting_code:make_exit", "-o", "out.pt"], "sys.exit()"),
    (["fold", "--model", "exiting_code:net_exit", "--force", "--input-shape", "2x64", "-o", "out.pt"], "sys.exit(3)"),
])
def test_sys_exit_in_user_code_is_an_error(exiting, args, call):
    result = run_cli(*args)
    line = one_line_error(result)
    assert "SystemExit" in line and call in line, line
    assert not list(exiting.glob("out*")), "nothing is written"


def test_keyboard_interrupt_in_user_code_still_interrupts(exiting):
    """typer ends the command on KeyboardInterrupt (status 130, click's Abort 1): no error line of bnkit's."""
    result = run_cli(*RECAL, "--model", "exiting_code:make_interrupt", "--data", "x.npy")
    assert result.exit_code in (1, 130) and "error:" not in result.output, (result.exit_code, result.output)


@pytest.mark.parametrize("command", ["fold", "audit"])
def test_json_of_a_name_that_is_not_utf8_is_valid(files, command):
    """Run as a user would (a subprocess: its stdout is bytes, as a shell's pipe), the name given as bytes."""
    import bnkit

    source, output = b"src\xff.onnx", b"out\xff.onnx"
    os.rename(files / "m.onnx", os.fsdecode(source))
    args = [source, b"-o", output] if command == "fold" else [source]
    src = str(pathlib.Path(bnkit.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", BNKIT_MAIN, command, *args, b"--json"], cwd=files, env=env,
                          capture_output=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr.decode(errors="replace")  # audit: 1 when a finding is an error
    report = json.loads(done.stdout)  # bytes: json detects UTF-8/16/32, and raw 0xff is none of them
    if command == "fold":
        assert report["output"] == os.fsdecode(output)
    else:
        assert report["target"] == os.fsdecode(source)


def test_symbolic_link_loops_are_one_line_as_input_and_replaced_as_output(files):
    """An output path that is a link to itself must not crash (RuntimeError: Symlink loop, exit 1); as an input it
    is a symbolic link, not "no such file". As an output it names no file, so the link is replaced by the written
    file."""
    os.symlink("loop.pt", files / "loop.pt")
    result = run_cli(*RECAL[:-1], "loop.pt", "--model", MLP, "--weights", "w.pt", "--data", "x.npy")
    assert result.exit_code == 0, result.output
    assert (files / "loop.pt").is_file() and not (files / "loop.pt").is_symlink()
    os.symlink("loopx.npy", files / "loopx.npy")
    line = one_line_error(run_cli("audit", "w.pt", "--model", MLP, "--data", "loopx.npy"))
    assert "loopx.npy" in line and "symbolic link" in line, line


def test_a_damaged_data_file_is_told_the_data_formats(files):
    """A damaged --data .pt gets the data formats' advice, not the checkpoint's ("expected a state dict ...")."""
    torch.save({"x": torch.from_numpy(np.load("x.npy"))}, files / "d.pt")
    data = bytearray((files / "d.pt").read_bytes())
    data[-200] ^= 0x40  # in the central directory or a storage: damage either way
    (files / "d.pt").write_bytes(bytes(data))
    line = one_line_error(run_cli(*RECAL, "--model", MLP, "--data", "d.pt"))
    assert "damaged" in line and ".npy, .npz, .safetensors" in line and "state dict" not in line, line


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes are POSIX")
def test_a_pipe_given_as_a_file_is_named_as_no_regular_file(tmp_path):
    """A FIFO exists, so 'no such file' was wrong; loaders cannot seek in it. Every kind of input says so."""
    import os

    from bnkit.cli.common import UsageError, check_input_file
    from bnkit.onnx.graph import load_model

    os.mkfifo(tmp_path / "m.onnx")
    with pytest.raises(UsageError, match=r"cannot read ONNX file .*m.onnx: it is not a regular file"):
        check_input_file(tmp_path / "m.onnx", "ONNX")
    with pytest.raises(ValueError, match="not a regular file"):
        load_model(tmp_path / "m.onnx")


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes are POSIX")
def test_bnkit_fold_given_a_pipe_says_so_instead_of_blocking(tmp_path):
    """bnkit fold read the ONNX argument for its external data before checking it was a file: on a named pipe with
    no writer that read blocked forever. Run as a subprocess with a timeout, so a block fails the test."""
    import os
    import subprocess
    import sys

    os.mkfifo(tmp_path / "m.onnx")
    from _helpers import BNKIT_MAIN

    done = subprocess.run([sys.executable, "-c", BNKIT_MAIN, "fold", str(tmp_path / "m.onnx"), "-o",
                           str(tmp_path / "x.onnx")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a regular file" in " ".join(done.stdout.split() + done.stderr.split())
