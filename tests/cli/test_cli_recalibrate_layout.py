"""``bnkit recalibrate -o`` keeps the ``--weights`` file's layout: a training checkpoint's other entries (optimizer
state, epoch), its wrapper key, its ``module.`` prefix and an AveragedModel's ``n_averaged`` come back as they were,
with only the weights replaced; a .safetensors output keeps the input's header metadata (``{"format": "pt"}`` at
least), and where it cannot hold the rest, says what it left out.

Oracles: the input file itself (torch.load of both), and the recalibrated statistics of the same model and data
from a plain state dict (checked against float64 in test_cli_recalibrate.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cli_recalibrate import MODEL, digits, invoke, stale_weights

from bnkit.torch import load_state_dict_file


def _checkpoint(tmp_path) -> tuple[dict, dict]:
    """A DataParallel-style training checkpoint of the stale MLP, and the recalibrated state from its plain state
    dict (the oracle for the weights)."""
    model = stale_weights(tmp_path / "plain.pt")
    np.save(tmp_path / "x.npy", digits(200))
    result = invoke("--model", MODEL, "--weights", str(tmp_path / "plain.pt"), "--data", str(tmp_path / "x.npy"),
                    "-o", str(tmp_path / "plain_out.pt"))
    assert result.exit_code == 0, result.output
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 64)).sum().backward()
    opt.step()  # momentum buffers in the optimizer's state
    model.load_state_dict(torch.load(tmp_path / "plain.pt"))  # the weights as saved
    ckpt = {"model": {f"module.{k}": v for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(), "epoch": 5, "args": {"lr": 0.1}}
    return ckpt, load_state_dict_file(tmp_path / "plain_out.pt")


def test_a_training_checkpoint_keeps_its_other_entries_wrapper_and_prefix(tmp_path):
    ckpt, expected = _checkpoint(tmp_path)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    result = invoke("--model", MODEL, "--weights", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "x.npy"),
                    "-o", str(tmp_path / "out.pt"))
    assert result.exit_code == 0, result.output
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(out) == list(ckpt) and out["epoch"] == 5 and out["args"] == {"lr": 0.1}
    assert list(out["model"]) == list(ckpt["model"])  # module. prefix, same order
    for key, value in expected.items():
        assert torch.equal(out["model"][f"module.{key}"], value), key
    state, saved = out["optimizer"]["state"], ckpt["optimizer"]["state"]
    assert state.keys() == saved.keys() and all(torch.equal(state[k]["momentum_buffer"],
                                                            saved[k]["momentum_buffer"]) for k in saved)
    assert out["optimizer"]["param_groups"] == ckpt["optimizer"]["param_groups"]


def test_an_averaged_model_state_keeps_its_counter(tmp_path):
    _, expected = _checkpoint(tmp_path)
    averaged = torch.optim.swa_utils.AveragedModel(torch.nn.Sequential())  # only for its state dict's layout
    state = {"n_averaged": torch.tensor(7), **{f"module.{k}": v for k, v in load_state_dict_file(
        tmp_path / "plain.pt").items()}}
    assert "n_averaged" in averaged.state_dict()
    torch.save(state, tmp_path / "swa.pt")
    result = invoke("--model", MODEL, "--weights", str(tmp_path / "swa.pt"), "--data", str(tmp_path / "x.npy"),
                    "-o", str(tmp_path / "out.pt"))
    assert result.exit_code == 0, result.output
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(out) == list(state) and int(out["n_averaged"]) == 7
    assert all(torch.equal(out[f"module.{k}"], v) for k, v in expected.items())


def test_safetensors_output_keeps_the_inputs_metadata_and_says_what_it_cannot_hold(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt, expected = _checkpoint(tmp_path)
    save_file(ckpt["model"], tmp_path / "w.safetensors", metadata={"format": "pt", "note": "kept"})
    result = invoke("--model", MODEL, "--weights", str(tmp_path / "w.safetensors"), "--data",
                    str(tmp_path / "x.npy"), "-o", str(tmp_path / "out.safetensors"))
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}
        assert sorted(f.keys()) == sorted(ckpt["model"])  # the prefix kept
    torch.save(ckpt, tmp_path / "ckpt.pt")  # a training checkpoint into a .safetensors output: weights only
    result = invoke("--model", MODEL, "--weights", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "x.npy"),
                    "-o", str(tmp_path / "out2.safetensors"))
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "safetensors holds tensors only, so the other entries of" in said and "(optimizer, epoch, args)" in said
    with safe_open(str(tmp_path / "out2.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert got.keys() == {f"module.{k}" for k in expected}  # the weights under the file's names
    assert all(torch.equal(got[f"module.{k}"], v) for k, v in expected.items())
    torch.save({"state_dict": ckpt["model"]}, tmp_path / "wrapped.pt")  # nothing beside the weights: no note
    result = invoke("--model", MODEL, "--weights", str(tmp_path / "wrapped.pt"), "--data", str(tmp_path / "x.npy"),
                    "-o", str(tmp_path / "out3.safetensors"))
    assert result.exit_code == 0 and "left out" not in result.output, result.output


def test_a_pickled_module_is_written_as_its_state_dict_with_a_note(tmp_path):
    _, expected = _checkpoint(tmp_path)
    from bnkit.torch.zoo import MLP

    model = MLP()
    model.load_state_dict(torch.load(tmp_path / "plain.pt"))
    torch.save({"model": model, "epoch": 3}, tmp_path / "whole.pt")
    result = invoke("--model", MODEL, "--weights", str(tmp_path / "whole.pt"), "--trust", "--data",
                    str(tmp_path / "x.npy"), "-o", str(tmp_path / "out.pt"))
    assert result.exit_code == 0, result.output
    assert "holds the model's state dict alone" in " ".join(result.output.split())
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


def test_counters_an_old_checkpoint_lacks_are_written_under_its_prefix(tmp_path):
    """PyTorch adds num_batches_tracked to a checkpoint saved without it; the recalibrated count must be written,
    or a momentum=None (or debias) layer loaded from the output restarts its average at the next training step."""
    ckpt, expected = _checkpoint(tmp_path)
    old = {k: v for k, v in ckpt["model"].items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt")
    result = invoke("--model", MODEL, "--weights", str(tmp_path / "old.pt"), "--data", str(tmp_path / "x.npy"),
                    "-o", str(tmp_path / "out.pt"))
    assert result.exit_code == 0, result.output
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(out) == {f"module.{k}" for k in expected}
    assert all(torch.equal(out[f"module.{k}"], v) for k, v in expected.items())
    assert int(out["module.2.num_batches_tracked"]) > 0


def test_the_same_weights_saved_twice_are_recalibrated_in_both_places(tmp_path):
    """{"model": sd, "ema": sd} (equal values: one set of weights to the loader): the second copy stayed stale, and
    bnkit then refused its own output as holding two different sets."""
    ckpt, expected = _checkpoint(tmp_path)
    twins = {"model": ckpt["model"], "ema": {k: v.clone() for k, v in ckpt["model"].items()}, "epoch": 3}
    torch.save(twins, tmp_path / "twins.pt")
    for source, target in (("twins.pt", "out.pt"), ("out.pt", "again.pt")):
        result = invoke("--model", MODEL, "--weights", str(tmp_path / source), "--data", str(tmp_path / "x.npy"),
                        "-o", str(tmp_path / target))
        assert result.exit_code == 0, result.output
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for copy in ("model", "ema"):
        assert all(torch.equal(out[copy][f"module.{k}"], v) for k, v in expected.items()), copy
    assert out["epoch"] == 3


def test_an_averaged_model_inside_ddp_keeps_its_layout(tmp_path):
    _, expected = _checkpoint(tmp_path)
    state = {"module.n_averaged": torch.tensor(7), **{f"module.module.{k}": v for k, v in load_state_dict_file(
        tmp_path / "plain.pt").items()}}
    torch.save(state, tmp_path / "ddp_swa.pt")
    result = invoke("--model", MODEL, "--weights", str(tmp_path / "ddp_swa.pt"), "--data", str(tmp_path / "x.npy"),
                    "-o", str(tmp_path / "out.pt"))
    assert result.exit_code == 0 and "alone" not in result.output, result.output
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(out) == list(state) and int(out["module.n_averaged"]) == 7
    assert all(torch.equal(out[f"module.module.{k}"], v) for k, v in expected.items())


def test_a_model_with_a_submodule_named_module_keeps_the_layout(tmp_path, monkeypatch):
    """'module.weight' and 'weight' are alike without DDP's prefix: the layout was given up for the state dict
    alone. Matched by full names there. Oracle: torch.load of the input and the output."""
    (tmp_path / "lay_module_net.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.module = nn.BatchNorm1d(4)\n"
        "        self.weight = nn.Parameter(torch.ones(4))\n"
        "    def forward(self, x):\n"
        "        return self.module(x) * self.weight\n"
        "def make():\n    return Net()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "lay_module_net", raising=False)
    import lay_module_net

    torch.save({"model": lay_module_net.make().state_dict(), "epoch": 5}, tmp_path / "ck.pt")
    x = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32) * 2 + 1
    np.save(tmp_path / "x4.npy", x)
    result = invoke("--model", "lay_module_net:make", "--weights", str(tmp_path / "ck.pt"), "--data",
                    str(tmp_path / "x4.npy"), "-o", str(tmp_path / "out.pt"))
    assert result.exit_code == 0 and "alone" not in result.output, result.output
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(out) == ["model", "epoch"] and out["epoch"] == 5
    np.testing.assert_allclose(out["model"]["module.running_mean"].numpy(), x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(out["model"]["module.running_var"].numpy(), x.astype(np.float64).var(0, ddof=1),
                               rtol=1e-5)
