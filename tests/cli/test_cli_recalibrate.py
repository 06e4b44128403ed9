"""``bnkit recalibrate`` end to end: saved weights in, exact statistics out, nothing written on failure.

Oracle: the first BN layer of the zoo MLP reads ``Linear(x)``, so its exact
population statistics are computed here in float64 NumPy from the weights and
the data; the deeper layers are compared with the Python API on the same
batches (itself checked against float64 in tests/torch/test_recalibrate.py).
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnkit.cli import app
from bnkit.torch import recalibrate, save_state_dict_file
from bnkit.torch.zoo import MLP

runner = CliRunner()
MODEL = "bnkit.torch.zoo:MLP"


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

    from bnkit.torch import load_state_dict_file

    got = load_state_dict_file(out)
    mean, var = first_bn_oracle(model, x)
    np.testing.assert_allclose(got["2.running_mean"].double().numpy(), mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["2.running_var"].double().numpy(), var, rtol=1e-6)
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
    shift = np.abs(mean - old_mean) / np.sqrt(old_var + 1e-5)
    assert rows["2"][:2] == ["301", "301"] and rows["5"][0] == "301"
    assert float(rows["2"][2]) == pytest.approx(shift.max(), rel=1e-3)


def test_npz_key_batches_and_a_dataset_factory(tmp_path, monkeypatch):
    weights = tmp_path / "w.safetensors"
    model = stale_weights(weights)
    x = digits(200)
    np.savez(tmp_path / "d.npz", images=x, labels=np.arange(200))
    out = tmp_path / "o.safetensors"
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", str(tmp_path / "d.npz"),
                    "--data-key", "images", "--batch-size", "50", "--batches", "2", "--output", str(out))
    assert result.exit_code == 0, result.output
    from bnkit.torch import load_state_dict_file

    got = load_state_dict_file(out)
    mean, var = first_bn_oracle(model, x[:100])  # only the first 2 batches of 50
    np.testing.assert_allclose(got["2.running_mean"].double().numpy(), mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["2.running_var"].double().numpy(), var, rtol=1e-6)
    assert int(got["2.num_batches_tracked"]) == 2

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
    mean, var = first_bn_oracle(model, x)
    np.testing.assert_allclose(load_state_dict_file(out2)["2.running_var"].double().numpy(), var, rtol=1e-6)

    # dict batches need --forward; without it the run fails and writes nothing
    out3 = tmp_path / "o3.pt"
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", "h4_cli_dicts:batches",
                    "--output", str(out3))
    assert result.exit_code == 1 and "forward" in result.output and not out3.exists()
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", "h4_cli_dicts:batches",
                    "--forward", "h4_cli_dicts:feed", "--output", str(out3))
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(load_state_dict_file(out3)["2.running_var"].double().numpy(), var, rtol=1e-6)


def test_failure_writes_nothing_and_keeps_the_input(tmp_path):
    weights = tmp_path / "w.pt"
    stale_weights(weights)
    original = weights.read_bytes()
    x = digits(100)
    x[70, 3] = np.nan
    np.save(tmp_path / "nan.npy", x)
    # output over the input: a failed run must leave the input file as it was
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", str(tmp_path / "nan.npy"),
                    "--output", str(weights))
    assert result.exit_code == 1
    assert "non-finite" in result.output and "batch 1" in result.output
    assert weights.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.npy", "w.pt"]  # no temporary file left behind

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
    assert invoke("--model", MODEL, "--data", data, "--batches", "0", "--output", str(out)).exit_code == 2
    assert not out.exists()


def test_dataset_with_one_sample_left_over(tmp_path, monkeypatch):
    """193 = 3 * 64 + 1 samples: the last sample joins the batch before it instead of failing BatchNorm."""
    weights = tmp_path / "w.safetensors"
    model = stale_weights(weights)
    x = digits(193)
    np.save(tmp_path / "x193.npy", x)
    (tmp_path / "h4_cli_leftover.py").write_text(
        "import numpy as np, torch\n"
        "def make():\n"
        f"    x = torch.from_numpy(np.load({str(tmp_path / 'x193.npy')!r}))\n"
        "    return torch.utils.data.TensorDataset(x, torch.zeros(len(x)))\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.safetensors"
    result = invoke("--model", MODEL, "--weights", str(weights), "--data", "h4_cli_leftover:make", "--output", str(out))
    assert result.exit_code == 0, result.output
    from bnkit.torch import load_state_dict_file

    got = load_state_dict_file(out)
    mean, var = first_bn_oracle(model, x)
    np.testing.assert_allclose(got["2.running_mean"].double().numpy(), mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["2.running_var"].double().numpy(), var, rtol=1e-6)
    assert int(got["2.num_batches_tracked"]) == 3
