"""``bnkit recalibrate`` end to end: saved weights in, exact statistics out, nothing written on failure.

Oracle: the first BN layer of the zoo MLP reads ``Linear(x)``, so its exact
population statistics are computed here in float64 NumPy from the weights and
the data; the deeper layers are compared with the Python API on the same
batches (itself checked against float64 in tests/torch/test_recalibrate.py). The written file's mode: a new file
gets open()'s (a file open() makes in the same subprocess, under a umask of 027, is the oracle; safetensors writes
its own at 0o600), an existing output keeps its own (os.stat). Data from package.module:factory:
test_cli_recalibrate_factories.py. --data-key is refused for data without named arrays (and for a factory), and
picks the named array where there are several (oracle: PyTorch's BatchNorm input in float64 from the same weights).
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from _helpers import BNKIT_MAIN, bnkit_env, file_mode, one_line_error, run_cli
from typer.testing import CliRunner

from bnkit.cli import app
from bnkit.torch import load_state_dict_file, recalibrate, save_state_dict_file
from bnkit.torch.zoo import MLP

runner = CliRunner()
MODEL = "bnkit.torch.zoo:MLP"
RECAL = ["recalibrate", "--no-progress", "-o", "out.pt"]


def invoke(*args: str):
    return runner.invoke(app, ["recalibrate", "--no-progress", *args], env={"COLUMNS": "200"})


def stale_weights(path):
    """An MLP with non-trivial weights and stale running statistics, saved to ``path``."""
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    save_state_dict_file(model.state_dict(), path)
    return model


def digits(n: int = 300) -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().data[:n] / 16.0).astype(np.float32)


def first_bn_oracle(model, x: np.ndarray):
    lin = model[1]
    h = x.astype(np.float64) @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
    return h.mean(axis=0), h.var(axis=0, ddof=1)


def assert_first_bn_exact(out, model, x: np.ndarray, batches: int | None = None) -> dict:
    """The written first BN's statistics against :func:`first_bn_oracle` on ``x`` (and its counter); the state."""
    got = load_state_dict_file(out)
    mean, var = first_bn_oracle(model, x)
    np.testing.assert_allclose(got["2.running_mean"].double().numpy(), mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["2.running_var"].double().numpy(), var, rtol=1e-6)
    if batches is not None:
        assert int(got["2.num_batches_tracked"]) == batches
    return got


@pytest.mark.parametrize("name", ["x.bin", "x"])
def test_an_npy_array_under_another_name_is_read_by_its_content(tmp_path, name):
    """--data x.bin holding an .npy array: refused by its name (review), while the audit's --data read it."""
    weights = tmp_path / "w.pt"
    model = stale_weights(weights)
    x = digits(130)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "x.npy").rename(tmp_path / name)
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", str(tmp_path / name),
                    "--output", str(tmp_path / "out.pt"))
    assert result.exit_code == 0, result.output
    assert_first_bn_exact(tmp_path / "out.pt", model, x)

@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_recalibrates_saved_weights_exactly(tmp_path, suffix):
    weights = tmp_path / f"w{suffix}"
    model = stale_weights(weights)
    x = digits(301)  # 4 batches of 64 and a last one of 45
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / f"out{suffix}"
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", str(tmp_path / "x.npy"),
                    "--output", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output.replace("\n", "")

    got = assert_first_bn_exact(out, model, x)
    expected = MLP()
    expected.load_state_dict(model.state_dict())
    recalibrate(expected.eval(), list(torch.from_numpy(x).split(64)), progress=False)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7, msg=key)
    for key, value in model.state_dict().items():  # weights and biases are copied unchanged
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(got[key], value), key
    # the printed table: samples used and the mean shift in old standard deviations, per layer
    rows = {c[0]: c[1:] for c in (
        [cell.strip() for cell in line.split("│")[1:-1]] for line in result.output.splitlines()) if len(c) == 5}
    old_mean, old_var = model[2].running_mean.double().numpy(), model[2].running_var.double().numpy()
    shift = np.abs(first_bn_oracle(model, x)[0] - old_mean) / np.sqrt(old_var + 1e-5)
    assert rows["2"][:2] == ["301", "301"] and rows["5"][0] == "301"
    assert float(rows["2"][2]) == pytest.approx(shift.max(), rel=1e-3)


def test_a_checkpoint_in_another_dtype_than_the_factory_model_is_noted(tmp_path):
    """A float16 checkpoint loaded into the factory's float32 MLP: load_state_dict casts it, so the statistics are
    computed and written in float32 (the file twice the size); a note on stderr says so and how to keep float16.
    A checkpoint in the model's own dtype gets no note."""
    x = digits(128)
    np.save(tmp_path / "x.npy", x)
    stale_weights(tmp_path / "w32.safetensors")
    half = {k: v.half() if v.is_floating_point() else v
            for k, v in load_state_dict_file(tmp_path / "w32.safetensors").items()}
    save_state_dict_file(half, tmp_path / "w16.safetensors")
    for name, noted in (("w16", True), ("w32", False)):
        out = tmp_path / f"{name}_out.safetensors"
        result = invoke("--model", MODEL, "--weights", str(tmp_path / f"{name}.safetensors"), "--data",
                        str(tmp_path / "x.npy"), "--output", str(out))
        assert result.exit_code == 0, result.output
        note = " ".join(result.stderr.split())
        assert ("cast tensors to the dtypes of the model the factory builds (" in note) is noted, note
        assert (" float16 -> float32)" in note) is noted
        assert ("model.to(torch.float16)" in note) is noted and "note:" not in result.stdout
        assert {v.dtype for v in load_state_dict_file(out).values() if v.is_floating_point()} == {torch.float32}


def test_float64_data_from_numpy_is_cast_to_the_models_dtype(tmp_path):
    # NumPy's default dtype is float64; a float32 model must get float32 batches (torch would refuse the matmul)
    weights = tmp_path / "w.pt"
    model = stale_weights(weights)
    x = digits(200).astype(np.float64)
    np.save(tmp_path / "x64.npy", x)
    out = tmp_path / "out.pt"
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", str(tmp_path / "x64.npy"), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert_first_bn_exact(out, model, x.astype(np.float32))


def test_pairs_whose_target_is_a_dataclass_with_an_unset_field(tmp_path, monkeypatch):
    """(x, target) batches whose target is a dataclass with a field no one set yet (field(init=False)): the model
    takes x alone, so the run works; walking the target to cast its arrays once raised AttributeError (exit 2)."""
    weights = tmp_path / "w.pt"
    model = stale_weights(weights)
    x = digits(200)
    (tmp_path / "r14_cli_targets.py").write_text(
        "import dataclasses, numpy as np, torch\n"
        "@dataclasses.dataclass\n"
        "class Target:\n"
        "    y: np.ndarray\n"
        "    decoded: list = dataclasses.field(init=False)  # filled by a metric, if ever\n"
        "def batches():\n"
        f"    x = np.load({str(tmp_path / 'x.npy')!r})\n"
        "    return [(b, Target(np.zeros(len(b)))) for b in np.array_split(x, 4)]\n"
    )
    np.save(tmp_path / "x.npy", x.astype(np.float64))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.pt"
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", "r14_cli_targets:batches", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert_first_bn_exact(out, model, x.astype(np.float32), batches=4)


def test_npz_key_batches_and_a_dataset_factory(tmp_path, monkeypatch):
    weights = tmp_path / "w.safetensors"
    model = stale_weights(weights)
    x = digits(200)
    np.savez(tmp_path / "d.npz", images=x, labels=np.arange(200))
    out = tmp_path / "o.safetensors"
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", str(tmp_path / "d.npz"),
                    "--data-key", "images", "--batch-size", "50", "--batches", "2", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert_first_bn_exact(out, model, x[:100], batches=2)  # only the first 2 batches of 50

    # a factory returning a Dataset of (x, y) pairs, resolved from the current directory
    (tmp_path / "h4_cli_dataset.py").write_text(
        "import numpy as np, torch\n"
        "def make():\n"
        f"    x = torch.from_numpy(np.load({str(tmp_path / 'd.npz')!r})['images'])\n"
        "    return torch.utils.data.TensorDataset(x, torch.zeros(len(x)))\n"
    )
    (tmp_path / "h4_cli_dicts.py").write_text(
        "import numpy as np, torch\n"
        "def batches():\n"
        f"    x = torch.from_numpy(np.load({str(tmp_path / 'd.npz')!r})['images'])\n"
        "    return [{'pixels': b, 'id': 0} for b in x.split(64)]\n"
        "def feed(model, batch):\n"
        "    return model(batch['pixels'])\n"
    )
    monkeypatch.chdir(tmp_path)
    out2 = tmp_path / "o2.safetensors"
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", "h4_cli_dataset:make", "--output", str(out2))
    assert result.exit_code == 0, result.output
    assert_first_bn_exact(out2, model, x)

    # dict batches need --forward; without it the run is refused as bad usage and writes nothing
    out3 = tmp_path / "o3.pt"
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", "h4_cli_dicts:batches",
                    "--output", str(out3))
    assert result.exit_code == 2 and "forward" in result.output and not out3.exists()
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", "h4_cli_dicts:batches",
                    "--forward", "h4_cli_dicts:feed", "--output", str(out3))
    assert result.exit_code == 0, result.output
    assert_first_bn_exact(out3, model, x)


def test_failure_writes_nothing_and_keeps_the_input(tmp_path):
    weights = tmp_path / "w.pt"
    stale_weights(weights)
    original = weights.read_bytes()
    previous = tmp_path / "previous.pt"  # an older output: a failed run must leave it as it was
    previous.write_bytes(original)
    x = digits(100)
    x[70, 3] = np.nan
    np.save(tmp_path / "nan.npy", x)
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", str(tmp_path / "nan.npy"),
                    "--output", str(previous))
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "non-finite" in text and "batch 1" in text
    assert "--on-nonfinite skip" in text and "on_nonfinite=" not in text  # the CLI's option, not the Python one
    assert weights.read_bytes() == original and previous.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.npy", "previous.pt", "w.pt"]  # no temporary file
    np.save(tmp_path / "huge.npy", digits(100) * np.float32(1e25))  # statistics beyond float32: a run that failed
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", str(tmp_path / "huge.npy"),
                    "--output", str(previous))
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "exceed torch.float32's range" in text and "float64 copy" in text, text
    assert weights.read_bytes() == original and previous.read_bytes() == original

    out = tmp_path / "skip.pt"
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", str(tmp_path / "nan.npy"),
                    "--on-nonfinite", "skip", "--output", str(out))
    assert result.exit_code == 0 and out.is_file()


def test_refuses_unsafe_or_mismatched_weights_and_bad_arguments(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": Evil()}, protocol=2))
    np.save(tmp_path / "x.npy", digits(64))
    out = tmp_path / "out.pt"
    data = str(tmp_path / "x.npy")
    result = invoke("--model", MODEL, "--weights", str(evil), "--data", data, "--output", str(out))
    assert result.exit_code == 2 and "NOT loaded" in result.output.replace("\n", " ") and "pwned" not in result.output

    wrong = tmp_path / "wrong.safetensors"
    save_state_dict_file(MLP(hidden=(32,)).state_dict(), wrong)
    result = invoke("--model", MODEL, "--weights", str(wrong), "--data", data, "--output", str(out))
    assert result.exit_code == 2 and "cannot load" in result.output

    np.save(tmp_path / "flat.npy", np.zeros(10, dtype=np.float32))
    result = invoke("--model", MODEL, "--data", str(tmp_path / "flat.npy"), "--output", str(out))
    assert result.exit_code == 2 and "batch axis" in result.output
    result = invoke("--model", "bnkit.torch.zoo:NoSuchModel", "--data", data, "--output", str(out))
    assert result.exit_code == 2 and "NoSuchModel" in result.output
    assert invoke("--model", MODEL, "--data", data, "--batch-size", "1", "--output", str(out)).exit_code == 2
    # each refusal names the user's mistake in the CLI's own words, not a later failure inside the library
    result = invoke("--model", MODEL, "--data", data, "--batches", "0", "--output", str(out))
    assert result.exit_code == 2 and "--batches must be at least 1, got 0" in " ".join(result.output.split())
    np.save(tmp_path / "one.npy", digits(1))  # one sample has no variance: said before BatchNorm fails on it
    result = invoke("--model", MODEL, "--data", str(tmp_path / "one.npy"), "--output", str(out))
    assert result.exit_code == 2 and "holds 1 sample(s); BatchNorm statistics need at least 2" in \
        " ".join(result.output.split()), result.output
    result = invoke("--model", MODEL, "--data", data, "--forward", "bnkit.findings:SEVERITIES", "--output", str(out))
    assert result.exit_code == 2 and "--forward 'bnkit.findings:SEVERITIES' is a tuple, not a function" in \
        " ".join(result.output.split()), result.output
    assert not out.exists()


def recalibrate_193_from_factory(tmp_path, monkeypatch, module: str, source: str) -> None:
    """Stale weights recalibrated from ``module:make`` (``source``, which reads the 193 digits from X193), checked
    against the oracle: 193 = 3 * 64 + 1, so 3 batches (the last sample joins the batch before it)."""
    weights = tmp_path / "w.safetensors"
    model = stale_weights(weights)
    x = digits(193)
    np.save(tmp_path / "x193.npy", x)
    (tmp_path / f"{module}.py").write_text(source.replace("X193", repr(str(tmp_path / "x193.npy"))))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.safetensors"
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", f"{module}:make", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert_first_bn_exact(out, model, x, batches=3)


def test_dataset_with_one_sample_left_over(tmp_path, monkeypatch):
    """193 = 3 * 64 + 1 samples: the last sample joins the batch before it instead of failing BatchNorm."""
    recalibrate_193_from_factory(tmp_path, monkeypatch, "h4_cli_leftover", (
        "import numpy as np, torch\n"
        "def make():\n"
        "    x = torch.from_numpy(np.load(X193))\n"
        "    return torch.utils.data.TensorDataset(x, torch.zeros(len(x)))\n"))


def test_refuses_outputs_that_would_overwrite_an_input_or_mislead(tmp_path, monkeypatch):
    weights = tmp_path / "w.pt"
    stale_weights(weights)
    x = digits(64)
    np.save(tmp_path / "x.npy", x)
    torch.save({"x": torch.from_numpy(x)}, tmp_path / "x.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.chdir(tmp_path)
    cases = [
        ("w.pt", "x.npy", "names the input file w.pt"),
        (str(weights), "x.npy", "names the input file"),
        ("x.pt", "x.pt", "names the input file x.pt"),  # the data file
        ("x.npy", "x.npy", "ending in .pt, .pth, .safetensors"),
        ("o.onnx", "x.npy", "ending in .pt, .pth, .safetensors"),
        ("out.txt", "x.npy", "ending in .pt, .pth, .safetensors"),
        ("mydir/", "x.npy", "is a folder"),
        ("no/such/dir/o.pt", "x.npy", "does not exist"),
    ]
    for output, data, message in cases:
        result = invoke("--model", MODEL, "--weights", "w.pt", "--data", data, "--output", output)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (output, result.output)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, no folder made


def test_devices_are_checked_before_anything_runs(tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", digits(64))
    out = tmp_path / "o.pt"
    args = ["--model", MODEL, "--data", str(tmp_path / "x.npy"), "--output", str(out), "--device"]
    result = invoke(*args, "gpu")
    assert result.exit_code == 2 and "unknown device 'gpu'" in result.output and type(result.exception) is SystemExit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke(*args, "cuda")
    assert result.exit_code == 2 and "CUDA is not available" in result.output and not out.exists()
    assert invoke(*args, "cpu").exit_code == 0 and out.exists()


def test_unreadable_weights_are_named_for_what_they_are(tmp_path):
    np.save(tmp_path / "x.npy", digits(64))
    (tmp_path / "corrupt.pt").write_text("not a checkpoint\n")
    out = tmp_path / "o.pt"
    for weights, kind in (("corrupt.pt", "text file"), ("x.npy", "NumPy .npy array")):
        for trust in ([], ["--trust"]):
            result = invoke("--model", MODEL, "--weights", str(tmp_path / weights), "--data", str(tmp_path / "x.npy"),
                            "--output", str(out), *trust)
            text = " ".join(result.output.split())
            assert result.exit_code == 2 and kind in text and "not a PyTorch checkpoint" in text, result.output
            assert "--trust" not in text and "allow-list" not in text
    class Raises:
        def __reduce__(self):
            return (dict.__getitem__, ({}, "missing"))  # a trusted pickle whose own code raises KeyError

    torch.save({"w": Raises()}, tmp_path / "raises.pt")
    result = invoke("--model", MODEL, "--weights", str(tmp_path / "raises.pt"), "--data", str(tmp_path / "x.npy"),
                    "--output", str(out), "--trust")
    assert result.exit_code == 2 and "raised KeyError" in " ".join(result.output.split()), result.output
    assert not out.exists()


def test_a_ddp_checkpoint_loads_and_a_whole_model_loads_with_trust_from_the_current_folder(tmp_path, monkeypatch):
    model = stale_weights(tmp_path / "w.pt")
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    x = digits(128)
    np.save(tmp_path / "x.npy", x)
    mean, var = first_bn_oracle(model, x)
    result = invoke("--model", MODEL, "--weights", str(tmp_path / "ddp.pt"), "--data", str(tmp_path / "x.npy"),
                    "--output", str(tmp_path / "o.pt"))
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(load_state_dict_file(tmp_path / "o.pt")["module.2.running_var"].double().numpy(),
                               var, rtol=1e-6)  # the file's prefix kept (test_cli_recalibrate_layout.py)

    # a whole pickled model whose class lives in the user's folder: --trust loads it once the folder is on sys.path
    (tmp_path / "fa_cli_whole.py").write_text(
        "import torch\nfrom bnkit.torch.zoo import MLP\nclass Mine(MLP):\n    pass\ndef make():\n    return Mine()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fa_cli_whole

    whole = fa_cli_whole.make()
    whole.load_state_dict(model.state_dict())
    torch.save(whole, tmp_path / "whole.pt")
    monkeypatch.delitem(__import__("sys").modules, "fa_cli_whole")
    monkeypatch.chdir(tmp_path)
    args = ["--model", "fa_cli_whole:make", "--weights", "whole.pt", "--data", "x.npy", "--output"]
    result = invoke(*args, "o2.pt")
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "fa_cli_whole.Mine" in text and "state_dict()" in text and "\x1b" not in text
    result = invoke(*args, "o2.pt", "--trust")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(load_state_dict_file(tmp_path / "o2.pt")["2.running_var"].double().numpy(), var,
                               rtol=1e-6)


def test_bad_data_exits_2_with_a_hint_and_integer_data_says_which_dtype(tmp_path):
    stale_weights(tmp_path / "w.pt")
    out = tmp_path / "o.pt"
    np.save(tmp_path / "ints.npy", (digits(64) * 16).astype(np.int64))
    np.save(tmp_path / "wide.npy", np.zeros((64, 65), np.float32))
    result = invoke("--model", MODEL, "--weights", str(tmp_path / "w.pt"), "--data", str(tmp_path / "ints.npy"),
                    "--output", str(out))
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "int64" in text and "float32" in text and "astype('float32')" in text, text
    result = invoke("--model", MODEL, "--weights", str(tmp_path / "w.pt"), "--data", str(tmp_path / "wide.npy"),
                    "--output", str(out))
    assert result.exit_code == 2 and "cannot run on the data" in " ".join(result.output.split())
    assert not out.exists()


def test_data_keys_and_tensor_files_as_data_and_no_leading_blank_line(tmp_path):
    model = stale_weights(tmp_path / "w.pt")
    x = digits(100)
    mean, var = first_bn_oracle(model, x)
    np.savez(tmp_path / "d.npz", labels=np.arange(100), input=x)  # 'input', as bnkit audit --data accepts
    save_state_dict_file({"labels": torch.arange(100.0), "X": torch.from_numpy(x)}, tmp_path / "d.safetensors")
    torch.save((torch.from_numpy(x), torch.arange(100)), tmp_path / "d.pt")
    for data in ("d.npz", "d.safetensors", "d.pt"):
        out = tmp_path / f"o_{data.replace('.', '_')}.pt"
        result = invoke("--model", MODEL, "--weights", str(tmp_path / "w.pt"), "--data", str(tmp_path / data),
                        "--output", str(out))
        assert result.exit_code == 0, (data, result.output)
        np.testing.assert_allclose(load_state_dict_file(out)["2.running_var"].double().numpy(), var, rtol=1e-6)
        assert result.output.splitlines()[0].startswith("recalibrated 2/2 BatchNorm layers"), result.output
    (tmp_path / "d.csv").write_text("1,2\n")
    result = invoke("--model", MODEL, "--data", str(tmp_path / "d.csv"), "--output", str(tmp_path / "o.pt"))
    assert result.exit_code == 2 and "d.csv is a text file (it starts with '1,2\\n'), not a data file: save the " \
        "inputs as .npy, .npz or .safetensors" in " ".join(result.output.split())  # read by content, named for it
    result = invoke("--model", MODEL, "--data", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "o.pt"))
    assert result.exit_code == 2 and "no such data file" in " ".join(result.output.split())  # the reason
    help_text = " ".join(runner.invoke(app, ["recalibrate", "--help"], env={"COLUMNS": "400"}).output.split())
    assert "first present of x, inputs, input, data, images, X" in help_text


@pytest.mark.parametrize("batch_size", [2, 4])
def test_finite_data_whose_statistics_overflow_float64_exits_1_whatever_the_batch_size(tmp_path, monkeypatch,
                                                                                       batch_size):
    """Values near 1e154 in a float64 model overflow the squares: batches of 4 failed in the batch's sums (exit 1,
    a message about float32 sums), batches of 2 when merged (exit 2, bad input). Both are the data's statistics out
    of range: exit 1, and the message gives float64's limit. Oracle: the square of 1.0001e154 overflows float64."""
    assert not np.isfinite(np.float64(1.0001e154) ** 2 * 2)
    (tmp_path / "f64_user.py").write_text("import torch\ndef bn64(): return torch.nn.BatchNorm1d(2).double()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    np.save(tmp_path / "huge.npy", np.array([[1e154] * 2, [1.0001e154] * 2, [-1e154] * 2, [-1.0001e154] * 2]))
    out = tmp_path / "o.pt"
    result = invoke("--model", "f64_user:bn64", "--data", str(tmp_path / "huge.npy"), "--batch-size",
                    str(batch_size), "--output", str(out), "--no-progress")
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "nothing written" in text and not out.exists(), text
    assert "float32 sums" not in text and ("1e154 in float64" in text or "overflow float64 when merged" in text)


def test_a_factory_giving_one_x_y_batch_is_told_each_tensor_was_taken_for_a_batch(tmp_path, monkeypatch):
    """A factory returning (x, y) feeds the model y as the second batch; the library's call says so, the CLI said
    only the model's shape error. Oracle: the library's own note on the same data."""
    (tmp_path / "xy_user.py").write_text(
        "import torch\n"
        "def pair(): return torch.randn(16, 64), torch.zeros(16)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import xy_user

    with pytest.raises(IndexError) as library:  # MLP's Flatten on the (16,) targets
        recalibrate(MLP(), xy_user.pair(), progress=False)
    if sys.version_info >= (3, 11):
        assert "the forward failed on data batch 1 (a tensor of shape (16,))" in library.value.__notes__[0]
    result = invoke("--model", MODEL, "--data", "xy_user:pair", "--output", str(tmp_path / "o.pt"))
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and not (tmp_path / "o.pt").exists(), text
    assert "xy_user:pair gave a pair of tensors, each taken for a batch" in text and "return [batch]" in text
    if sys.version_info >= (3, 11):
        assert "(the forward failed on data batch 1 (a tensor of shape (16,)))" in text
    # a list of real batches that fails at its first: no (x, y) advice, from the library or the CLI
    (tmp_path / "xy_user2.py").write_text("import torch\ndef batches(): return [torch.randn(8, 32)] * 3\n")
    import xy_user2

    with pytest.raises(RuntimeError) as library:
        recalibrate(MLP(), xy_user2.batches(), progress=False)
    assert "pair of tensors" not in " ".join(getattr(library.value, "__notes__", []))
    result = invoke("--model", MODEL, "--data", "xy_user2:batches", "--output", str(tmp_path / "o.pt"))
    assert result.exit_code == 2 and "pair of tensors" not in result.output and "[batch]" not in result.output


def test_data_whose_every_batch_is_non_finite_exits_1_with_skip(tmp_path):
    """--on-nonfinite skip over all-NaN data: the data's fault, exit 1 as any non-finite failure (it gave exit 2,
    bad usage, once the CLI told such failures by the error's class)."""
    x = digits(40)
    x[:] = np.nan
    np.save(tmp_path / "nan.npy", x)
    result = invoke("--model", MODEL, "--data", str(tmp_path / "nan.npy"), "--on-nonfinite", "skip",
                    "--output", str(tmp_path / "o.pt"))
    assert result.exit_code == 1 and "batches had non-finite BatchNorm inputs" in " ".join(result.output.split())
    assert not (tmp_path / "o.pt").exists()


def test_failures_of_the_users_code_exit_2_naming_the_exception_and_where(tmp_path, monkeypatch):
    (tmp_path / "fs4_user.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Images(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 32\n"
        "    def __getitem__(self, i): raise FileNotFoundError(f'img_{i}.png')\n"
        "def images(): return Images()\n"
        "def dicts(): return [{'pixels': torch.randn(8, 64)} for _ in range(2)]\n"
        "def feed(model, batch): return model(batch['image'])\n"
        "def emb(): return nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.BatchNorm1d(6))\n"
        "def idx(): return [torch.tensor([[1, 2], [3, 9]])]\n"
        "def interrupted():\n"
        "    yield torch.randn(8, 64)\n"
        "    raise KeyboardInterrupt\n"
    )
    (tmp_path / "fs4_broken.py").write_text("def feed(model, batch): return model(batch)\nundefined_name\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.pt"
    cases = [
        (("--data", "fs4_user:images"), "reading a batch of the data from 'fs4_user:images' failed",
         "FileNotFoundError: img_0.png"),
        (("--data", "fs4_user:dicts", "--forward", "fs4_user:feed"), "the model or --forward 'fs4_user:feed' raised",
         "KeyError: 'image'"),
        (("--data", "fs4_user:dicts", "--forward", "fs4_broken:feed"), "cannot import --forward 'fs4_broken:feed'",
         "NameError: name 'undefined_name' is not defined"),
        (("--model", "fs4_user:emb", "--data", "fs4_user:idx"), "the model raised", "IndexError: index out of range"),
    ]
    for args, where, what in cases:
        model = () if "--model" in args else ("--model", MODEL)
        result = invoke(*model, *args, "-o", str(out))
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (args, result.output)
        assert where in text and what in text and "Traceback" not in result.output, (args, text)
        assert not out.exists()
    result = invoke("--model", MODEL, "--data", "fs4_user:interrupted", "-o", str(out))
    assert result.exit_code != 2 and "error:" not in result.output and not out.exists()  # not reported as bad input


def test_iterable_dataset_is_batched_by_batch_size(tmp_path, monkeypatch):
    """193 samples streamed one at a time, --batch-size 64: 3 batches, the last sample joins the batch before it."""
    recalibrate_193_from_factory(tmp_path, monkeypatch, "fs4_stream", (
        "import numpy as np, torch\n"
        "class Stream(torch.utils.data.IterableDataset):\n"
        "    def __iter__(self):\n"
        "        for row in np.load(X193):\n"
        "            yield torch.from_numpy(row), 0\n"
        "def make():\n"
        "    return Stream()\n"))


USER_MODELS = (
    "import torch\n"
    "from torch import nn\n"
    "from bnkit.torch.zoo import MLP\n"
    "def dropout():\n"
    "    return nn.Sequential(nn.Linear(64, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))  # in training mode, as built\n"
    "class Spare(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.a = nn.Sequential(nn.Linear(64, 4), nn.BatchNorm1d(4))\n"
    "        self.unused = nn.BatchNorm1d(4)\n"
    "    def forward(self, x):\n"
    "        return self.a(x)\n"
    "class OOM(MLP):\n"
    "    def forward(self, x):\n"
    "        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
)


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """A module ``t7d_models`` of models a factory returns, importable from the current folder (tmp_path)."""
    (tmp_path / "t7d_models.py").write_text(USER_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "t7d_models", raising=False)
    yield tmp_path
    sys.modules.pop("t7d_models", None)


def test_a_factory_model_in_training_mode_is_recalibrated_in_eval_mode(user_models):
    """A factory's fresh model is in training mode: its Dropout must not be active while the statistics are
    computed (the command runs the model in eval mode, only BatchNorm using batch statistics). Oracle: the
    BatchNorm after Linear -> Dropout reads Linear(x) exactly, float64 moments of it."""
    tmp_path = user_models
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(64, 4), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(4))
    save_state_dict_file(net.state_dict(), tmp_path / "w.pt")
    x = digits(200)
    np.save(tmp_path / "x.npy", x)
    result = invoke("--model", "t7d_models:dropout", "--weights", "w.pt", "--data", "x.npy", "-o", "o.pt")
    assert result.exit_code == 0, result.output
    lin = net[0]
    h = x.astype(np.float64) @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
    got = load_state_dict_file(tmp_path / "o.pt")
    np.testing.assert_allclose(got["2.running_mean"].double().numpy(), h.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["2.running_var"].double().numpy(), h.var(axis=0, ddof=1), rtol=1e-6)


def test_data_that_reaches_no_layer_fails_and_writes_nothing(user_models):
    """A --forward that never calls the model recalibrates nothing: exit 1 and no file, as all-NaN data gets, not
    an unchanged copy with exit 0 (oracle: the output path does not exist)."""
    tmp_path = user_models
    (tmp_path / "t7d_feed.py").write_text("def noop(model, batch):\n    return None\n")
    sys.modules.pop("t7d_feed", None)
    np.save(tmp_path / "x.npy", digits(100))
    result = invoke("--model", MODEL, "--data", "x.npy", "--forward", "t7d_feed:noop", "-o", "o.pt")
    sys.modules.pop("t7d_feed", None)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "changed nothing, nothing written" in text and "none of the 2 BatchNorm layer(s)" in text
    assert "t7d_feed:noop" in text and not (tmp_path / "o.pt").exists()


def test_a_layer_the_data_does_not_reach_is_named_and_left_unchanged(user_models):
    tmp_path = user_models
    np.save(tmp_path / "x.npy", digits(100))
    result = invoke("--model", "t7d_models:Spare", "--data", "x.npy", "-o", "o.pt")
    assert result.exit_code == 0, result.output
    assert "not reached by the data, left unchanged: unused" in " ".join(result.output.split()), result.output
    got = load_state_dict_file(tmp_path / "o.pt")
    assert torch.equal(got["unused.running_mean"], torch.zeros(4)) and torch.equal(got["unused.running_var"],
                                                                                  torch.ones(4))
    assert int(got["unused.num_batches_tracked"]) == 0 and int(got["a.1.num_batches_tracked"]) == 2


def test_a_run_that_fails_after_it_started_exits_1_and_writes_nothing(user_models, monkeypatch):
    """The module's contract: 1 when a run that started fails (out of memory, the file cannot be written), 2 only for
    bad usage or input, which a retry with the same arguments cannot fix."""
    tmp_path = user_models
    np.save(tmp_path / "x.npy", digits(100))
    result = invoke("--model", "t7d_models:OOM", "--data", "x.npy", "-o", "o.pt")
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "ran out of memory, nothing written (try a smaller --batch-size; the pass also holds one copy" in text
    assert not (tmp_path / "o.pt").exists()

    import bnkit.torch.io

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bnkit.torch.io, "save_state_dict_file", disk_full)
    result = invoke("--model", MODEL, "--data", "x.npy", "-o", "o.pt")
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "cannot write o.pt" in text and "No space left on device" in text and not (tmp_path / "o.pt").exists()


UMASK_RUN = ("import os, sys; os.umask(0o027); open(os.environ['REFERENCE_FILE'], 'w').close(); " + BNKIT_MAIN)


# atomic writes through the command line
@pytest.fixture
def recalibrate_inputs(tmp_path):
    torch = pytest.importorskip("torch")
    from bnkit.torch import save_state_dict_file
    from bnkit.torch.zoo import MLP

    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    save_state_dict_file(MLP().state_dict(), weights)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32))
    return ["recalibrate", "--no-progress", "--model", "bnkit.torch.zoo:MLP", "--weights", str(weights),
            "--data", str(data)]


def recalibrate_with_umask(tmp_path, args, out):
    reference = tmp_path / "reference"
    result = subprocess.run([sys.executable, "-c", UMASK_RUN, *args, "-o", str(out)], cwd=tmp_path,
                            env=bnkit_env(COLUMNS="240", REFERENCE_FILE=str(reference)), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert file_mode(reference) == 0o666 & ~0o027  # open()'s default under the subprocess's umask: 0o640
    return file_mode(reference)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_recalibrate_writes_a_new_file_with_open_s_mode(tmp_path, recalibrate_inputs, suffix):
    out = tmp_path / f"new{suffix}"
    reference = recalibrate_with_umask(tmp_path, recalibrate_inputs, out)
    assert oct(file_mode(out)) == oct(reference)


def test_recalibrate_over_an_existing_file_keeps_its_mode(tmp_path, recalibrate_inputs):
    out = tmp_path / "old.safetensors"
    out.write_bytes(b"old")
    os.chmod(out, 0o604)  # neither open()'s 0o640 under that umask nor safetensors' 0o600
    recalibrate_with_umask(tmp_path, recalibrate_inputs, out)
    assert oct(file_mode(out)) == oct(0o604)
    assert out.read_bytes() != b"old"


# recalibrate --data-key
@pytest.mark.parametrize("name, save", [
    ("d.npy", lambda x, p: np.save(p, x)),
    ("one.pt", lambda x, p: torch.save(torch.from_numpy(x), p)),
    ("xy.pt", lambda x, p: torch.save((torch.from_numpy(x), torch.zeros(len(x))), p)),
])
def test_data_key_for_data_without_names_is_refused(files, name, save):
    save(np.load("x.npy"), files / name)
    line = one_line_error(run_cli(*RECAL, "--model", MODEL, "--data", name, "--data-key", "labels"))
    assert "--data-key 'labels'" in line and name in line, line
    assert not (files / "out.pt").exists()


def test_data_key_for_a_data_factory_is_refused(files, user_module):
    """A factory's result is used as it is, so --data-key would do nothing (exit 0, the key unused): refused."""
    user_module("data_factory", "import numpy as np\ndef make(): return np.load('x.npy')\n")
    line = one_line_error(run_cli(*RECAL, "--model", MODEL, "--data", "data_factory:make", "--data-key", "labels"))
    assert "--data-key 'labels'" in line and "factory" in line, line
    assert not (files / "out.pt").exists()


@pytest.mark.parametrize("name", ["d.npz", "d.pt"])
def test_data_key_picks_the_named_array(files, name):
    from bnkit.torch import load_state_dict_file

    x = np.load("x.npy")
    other = np.random.default_rng(1).normal(5, 2, x.shape).astype(np.float32)  # the first of INPUT_KEYS present
    if name.endswith(".npz"):
        np.savez(files / name, x=other, mine=x)
    else:
        torch.save({"x": torch.from_numpy(other), "mine": torch.from_numpy(x)}, files / name)
    result = run_cli(*RECAL, "--model", MODEL, "--weights", "w.pt", "--data", name, "--data-key", "mine",
                    "--batch-size", "40")
    assert result.exit_code == 0, result.output
    got = load_state_dict_file(files / "out.pt")
    from bnkit.torch.zoo import MLP as Net

    net = Net()  # the oracle: the first BatchNorm's input, from the same weights, in float64
    net.load_state_dict(load_state_dict_file(files / "w.pt"))
    net = net.double().eval()
    bn_name, bn = next((n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm1d))
    seen = []
    bn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        net(torch.from_numpy(x).double())
    np.testing.assert_allclose(got[f"{bn_name}.running_mean"].double().numpy(), seen[0].mean(0).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_extra_state_for_a_safetensors_output_is_refused_before_the_pass(tmp_path, monkeypatch):
    """A module's extra state cannot go into safetensors: the whole pass ran first, then the write failed (exit 1);
    now exit 2 before the data is read, and a .pt output takes it."""
    (tmp_path / "extra_user.py").write_text(
        "import torch\n"
        "class Tagged(torch.nn.BatchNorm1d):\n"
        "    def get_extra_state(self): return {'version': 2}\n"
        "    def set_extra_state(self, state): pass\n"
        "class Late(torch.nn.BatchNorm1d):  # extra state only once it has statistics (recalibrate puts back\n"
        "    def get_extra_state(self):    # whatever else a forward writes, so this is what the pass changes)\n"
        "        if not bool(self.running_mean.any()): raise RuntimeError('no statistics yet')\n"
        "        return {'seen': 1}\n"
        "    def set_extra_state(self, state): pass\n"
        "read = []\n"
        "def net(): return torch.nn.Sequential(torch.nn.Linear(3, 2), Tagged(2))\n"
        "def late(): return torch.nn.Sequential(torch.nn.Linear(3, 2), Late(2))\n"
        "def data():\n"
        "    read.append(1)\n"
        "    return torch.randn(8, 3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import extra_user

    out = tmp_path / "o.safetensors"
    result = invoke("--model", "extra_user:net", "--data", "extra_user:data", "--output", str(out), "--no-progress")
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "safetensors holds tensors only" in text and "1._extra_state" in text, text
    assert extra_user.read == [] and not out.exists()
    result = invoke("--model", "extra_user:net", "--data", "extra_user:data", "--output", str(tmp_path / "o.pt"),
                    "--no-progress")
    assert result.exit_code == 0 and (tmp_path / "o.pt").exists(), result.output
    # a get_extra_state that needs statistics first raised out of the early check as a traceback: left to the write
    result = invoke("--model", "extra_user:late", "--data", "extra_user:data", "--output", str(out), "--no-progress")
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "cannot write" in text and "safetensors holds tensors only" in text, text
    assert not out.exists()


def test_frozen_batchnorm_layers_left_as_they_are_are_a_note_in_the_commands_words(tmp_path, monkeypatch):
    """The library's warning came out as Python's 'file:line: UserWarning' lines, advising revert_frozen(model) to a
    user who only names a factory; a model that is itself a FrozenBatchNorm was named ''."""
    (tmp_path / "frozen_models.py").write_text(
        "from torch import nn\nfrom bnkit.torch import convert_frozen\n"
        "def half():\n    return nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), convert_frozen(nn.BatchNorm1d(8)))\n"
        "def bare():\n    return convert_frozen(nn.BatchNorm1d(64))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", digits(64))
    result = invoke("--model", "frozen_models:half", "--data", "x.npy", "-o", "out.pt")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "UserWarning" not in text
    assert ("note: bnkit FrozenBatchNorm layer(s) ['2'] keep their statistics, fixed by design: "
            "bnkit.torch.revert_frozen(model) in the --model factory first to recalibrate them") in text
    (tmp_path / "noisy_models.py").write_text(
        "import warnings\nfrom torch import nn\nclass Noisy(nn.Sequential):\n    def forward(self, x):\n"
        "        warnings.warn('my model says hi')\n        return super().forward(x)\n"
        "def noisy():\n    return Noisy(nn.Linear(64, 8), nn.BatchNorm1d(8))\n")
    noisy = invoke("--model", "noisy_models:noisy", "--data", "x.npy", "-o", "noisy.pt")
    assert noisy.exit_code == 0, noisy.output  # the user's own warning keeps its origin: not a bnkit note
    assert "noisy_models.py:5: UserWarning: my model says hi" in noisy.output
    assert "note: my model says hi" not in noisy.output and noisy.output.count("UserWarning: my model says hi") == 1
    import warnings

    with warnings.catch_warnings():  # as PYTHONWARNINGS=error: bnkit's warning stops the run, told as such
        warnings.simplefilter("error")
        strict = one_line_error(invoke("--model", "frozen_models:half", "--data", "x.npy", "-o", "strict.pt"))
    assert "a warning the warning filters in force make an error: bnkit FrozenBatchNorm layer(s)" in strict
    assert "in the --model factory" in strict and "cannot run on the data" not in strict
    error = one_line_error(invoke("--model", "frozen_models:bare", "--data", "x.npy", "-o", "bare.pt"))
    assert "FrozenBatchNorm layer(s) ['FrozenBatchNorm1d']" in error and "--model factory" in error
    assert not (tmp_path / "bare.pt").exists()
