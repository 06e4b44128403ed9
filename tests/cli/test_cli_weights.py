"""Weights that do not fit the model's tensors, and model files of another format, through the commands.

Integer or bool values for floating parameters (an int8-quantized layer whose scale is not in the file) and a count
that is no whole number are refused by recalibrate, fold and audit --model: one error line, exit 2, naming the key
and the dtypes, nothing written; a count saved as 6.0 loads with no note about dtypes, a negative one as it is (for
the audit to report). A PyTorch checkpoint or a
NumPy array named .onnx is named for what it is by fold and audit.

Oracles: the checkpoints made here with torch.save and np.save, the exit status and the folder's files."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from _helpers import one_line_error, run_cli

MLP = "bnkit.torch.zoo:MLP"


def _commands(weights: str) -> list[tuple[list[str], str | None]]:
    """Each command that loads ``weights`` into the MLP, and the file it would write."""
    return [(["recalibrate", "--model", MLP, "--weights", weights, "--data", "x.npy", "-o", "r.pt", "--no-progress"],
             "r.pt"),
            (["fold", "--model", MLP, "--weights", weights, "-o", "f.pt", "--force"], "f.pt"),
            (["audit", weights, "--model", MLP], None)]


@pytest.mark.parametrize("codes, dtype", [
    (lambda w: (w * 127 / w.abs().max()).round().to(torch.int8), "torch.int8"),
    (lambda w: w > 0, "torch.bool"),
])
def test_integer_or_bool_weights_for_float_parameters_are_refused(files, codes, dtype):
    state = torch.load("w.pt")
    state["1.weight"] = codes(state["1.weight"])
    torch.save(state, "q.pt")
    before = sorted(os.listdir())
    for args, _ in _commands("q.pt"):
        line = one_line_error(run_cli(*args))
        assert "integer or bool values for floating-point tensors" in line, args
        assert f"1.weight ({dtype} into torch.float32)" in line, args
        assert sorted(os.listdir()) == before, args


def test_a_count_saved_as_float_loads_if_whole_and_gets_no_dtype_note(files):
    state = torch.load("w.pt")
    state["2.num_batches_tracked"] = torch.tensor(6.7)
    torch.save(state, "c67.pt")
    before = sorted(os.listdir())
    for args, _ in _commands("c67.pt"):
        line = one_line_error(run_cli(*args))
        assert "2.num_batches_tracked (torch.float32 into torch.int64: 6.7 is not a whole number)" in line, args
        assert sorted(os.listdir()) == before, args
    state["2.num_batches_tracked"] = torch.tensor(6.0)
    torch.save(state, "c6.pt")
    for args, output in _commands("c6.pt")[:2]:
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
        assert "cast" not in result.output and "dtype" not in result.output and os.path.exists(output)


def test_a_negative_count_loads_and_the_audit_reports_it(files):
    """A count load_state_dict takes unchanged is not refused: audit --model loads it and reports it as the state
    no BatchNorm layer can hold, as the audit of the checkpoint alone does. Oracle: the checkpoint's own value."""
    state = torch.load("w.pt")
    state["2.num_batches_tracked"] = torch.tensor(-3)
    torch.save(state, "neg.pt")
    for args in (["audit", "neg.pt", "--model", MLP, "--json"], ["audit", "neg.pt", "--json"]):
        result = run_cli(*args)
        assert result.exit_code == 1, result.output
        assert "num_batches_tracked must be one non-negative integer (a count of updates), got -3" in result.output


def test_a_checkpoint_or_an_array_named_onnx_is_named_for_what_it_is(files):
    shutil.copy("w.pt", "ckpt.onnx")
    shutil.copy("x.npy", "data.onnx")
    line = one_line_error(run_cli("fold", "ckpt.onnx", "-o", "f.onnx"))
    assert line.endswith("ckpt.onnx is a PyTorch checkpoint (torch.save), not an ONNX model; to fold a PyTorch model, "
                         "give --model pkg.module:factory --weights FILE")
    assert one_line_error(run_cli("audit", "ckpt.onnx")).endswith(
        "ckpt.onnx is a PyTorch checkpoint (torch.save), not an ONNX model")
    line = one_line_error(run_cli("fold", "data.onnx", "-o", "f.onnx"))
    assert line.endswith("data.onnx is a NumPy .npy array (np.save), not an ONNX model")  # no --model hint for data
    assert one_line_error(run_cli("audit", "data.onnx")).endswith(
        "data.onnx is a NumPy .npy array (np.save), not an ONNX model")
    assert not os.path.exists("f.onnx")
