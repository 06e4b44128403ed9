"""``bnkit audit``: table and JSON output, exit status, safe loading, --model/--data, ONNX files; --forward, and its
fixes worded in its options (``--forward``, ``--train-batch-size``), not in Python arguments."""
import copy
import json
import math
import sys

import numpy as np
import pytest
import torch
from _helpers import WritesFile, one_line_error, run_cli
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from bnkit.cli import app
from bnkit.torch.io import save_state_dict_file
from bnkit.torch.zoo import MLP

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, ["audit", *map(str, args)], terminal_width=240)


def _flat(result) -> str:
    """The output with whitespace collapsed: rich wraps long temporary paths at the console's width."""
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An MLP trained on digits, its checkpoint and the inputs as .npy."""
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)[:1280]
    y = torch.tensor(d.target)[:1280]
    torch.manual_seed(0)
    model = MLP(hidden=(32, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for i in range(0, len(x), 64):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    root = tmp_path_factory.mktemp("audit_cli")
    ckpt = save_state_dict_file(model.state_dict(), root / "mlp.pt")
    data = root / "x.npy"
    np.save(data, x.numpy())
    (root / "audit_models.py").write_text(
        "import torch\nfrom bnkit.torch.zoo import MLP\n\ndef mlp():\n    return MLP(hidden=(32, 16))\n\n"
        "class OOM(MLP):\n    def forward(self, x):\n"
        "        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n\n"
        "def oom():\n    return OOM(hidden=(32, 16))\n\n"
        "def conv():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten())\n\n"
        "def bn4():\n    return torch.nn.Sequential(torch.nn.BatchNorm1d(4))\n\n"
        "class Chatty(MLP):\n    def forward(self, x):\n        print('forward called')\n"
        "        return super().forward(x)\n\n"
        "def chatty():\n    print('hello from the factory')\n    return Chatty(hidden=(32, 16))\n")
    sys.path.insert(0, str(root))
    yield model.eval(), ckpt, data, root
    sys.path.remove(str(root))


def test_clean_checkpoint_exits_zero_and_prints_the_table(trained):
    _, ckpt, _, _ = trained
    result = _invoke(ckpt)
    assert result.exit_code == 0, result.output
    for column in ("severity", "layer", "finding", "evidence", "fix"):
        assert column in result.output
    assert "no BatchNorm problems found" in _flat(result) and "2 BatchNorm layer(s)" in _flat(result)


def test_nan_checkpoint_exits_one_with_json(trained, tmp_path):
    model, _, _, _ = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["2.running_var"][0] = float("nan")
    path = save_state_dict_file(state, tmp_path / "nan.safetensors")
    result = _invoke(path, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["ok"] is False
    (finding,) = [f for f in report["findings"] if f["severity"] == "error"]
    assert finding["layer"] == "2" and finding["code"] == "non_finite"


def test_every_set_of_weights_in_a_checkpoint_is_audited_each_named_after_its_key(trained, tmp_path):
    """YOLOv5's training checkpoint: the EMA (what it deploys) has a NaN statistic. The "model" copy was audited
    alone and the run passed; then the audit refused the file (exit 2); an encoder/decoder checkpoint, whose
    decoder BN was never updated, passed (exit 0) with the encoder alone audited (review). Now every set is audited,
    its layers named after its key. Oracle: each set saved alone and audited."""
    model, _, _, _ = trained
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    ema["2.running_var"][0] = float("nan")
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "ema": ema, "epoch": 9}, path)
    result = _invoke(path, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["layers"] == sorted([f"model/{n}" for n in ("2", "5")] + [f"ema/{n}" for n in ("2", "5")])
    assert [(f["layer"], f["code"]) for f in report["findings"] if f["severity"] == "error"] == [
        ("ema/2", "non_finite")]
    torch.save(ema, tmp_path / "ema.pt")
    assert _invoke(tmp_path / "ema.pt").exit_code == 1
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert _invoke(tmp_path / "model.pt").exit_code == 0
    decoder = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict()  # never updated
    for layout in ({"model": model.state_dict(), "decoder": decoder, "epoch": 10},
                   {"encoder": model.state_dict(), "decoder": decoder},
                   {**model.state_dict(), "aux_decoder": decoder}):
        torch.save(layout, path)
        result = _invoke(path, "--json")
        assert result.exit_code == 1, result.output
        errors = {(f["layer"], f["code"]) for f in json.loads(result.output)["findings"] if f["severity"] == "error"}
        assert errors == {(("decoder/1" if "decoder" in layout else "aux_decoder/1"), "never_updated")}, errors


def test_never_updated_checkpoint_is_an_error(tmp_path):
    path = save_state_dict_file(MLP().state_dict(), tmp_path / "fresh.pt")
    result = _invoke(path, "--json")
    assert result.exit_code == 1
    codes = {(f["layer"], f["code"]) for f in json.loads(result.output)["findings"]}
    assert {("2", "never_updated"), ("5", "never_updated")} <= codes


def test_malicious_pickle_is_refused_and_the_file_never_appears(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(2), "payload": WritesFile(str(target))}, path)
    result = _invoke(path)
    assert result.exit_code == 2
    assert "NOT loaded" in result.output and "--trust" in result.output
    assert not target.exists()


def test_model_and_data(trained):
    _, ckpt, data, _ = trained
    result = _invoke(ckpt, "--model", "audit_models:mlp", "--data", data, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["depth"] == "data" and report["batches"] == 20
    assert {s["layer"] for s in report["shifts"]} == {"2", "5"}
    text = _invoke(ckpt, "--model", "audit_models:mlp", "--data", data, "--batch-size", "128")
    assert text.exit_code == 0 and "ranked" in text.output


def test_what_the_users_code_prints_goes_to_stderr_and_the_json_stays_json(trained):
    """Review: a factory's or forward's print() came before the JSON on stdout, so `bnkit audit --json | jq` failed.
    Oracle: json.loads of stdout (RFC 8259), and the prints still shown, on stderr."""
    _, ckpt, data, _ = trained
    for extra in ((), ("--data", data)):
        result = _invoke(ckpt, "--model", "audit_models:chatty", *extra, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["ok"] is True
        assert "hello from the factory" in result.stderr and "forward called" not in result.stdout


def test_a_float16_checkpoint_is_noted_on_stderr_and_the_json_stays_json(trained, tmp_path):
    """The factory's float32 MLP given float16 weights: audited in float32 (load_state_dict casts), which a note on
    stderr says; --json's stdout is still one JSON document."""
    model, _, data, _ = trained
    half = save_state_dict_file({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
                                tmp_path / "half.safetensors")
    result = _invoke(half, "--model", "audit_models:mlp", "--data", data, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["depth"] == "data"
    note = " ".join(result.stderr.split())
    assert "cast tensors to the dtypes of the model the factory builds (" in note and " float16 -> float32)" in note


def test_shifted_layer_is_named_first_and_fails(trained, tmp_path):
    model, _, data, _ = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["5.running_mean"] += 3 * torch.sqrt(state["5.running_var"] + 1e-5)
    path = save_state_dict_file(state, tmp_path / "shifted.pt")
    result = _invoke(path, "--model", "audit_models:mlp", "--data", data, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["shifts"][0]["layer"] == "5"
    assert [f["layer"] for f in report["findings"] if f["code"] == "stat_shift" and f["severity"] == "error"] == ["5"]


def test_device_option_runs_the_model_there(trained):
    _, ckpt, data, _ = trained
    args = (ckpt, "--model", "audit_models:mlp", "--data", data, "--json")
    plain, on_cpu = _invoke(*args), _invoke(*args, "--device", "cpu")
    assert plain.exit_code == on_cpu.exit_code == 0, on_cpu.output
    assert json.loads(on_cpu.output) == json.loads(plain.output)
    alone = _invoke(ckpt, "--device", "cpu")
    assert alone.exit_code == 2 and "--device needs --model" in alone.output
    unknown = _invoke(*args, "--device", "tpu")
    assert unknown.exit_code == 2 and "unknown device" in _flat(unknown)
    if not torch.cuda.is_available():
        missing = _invoke(*args, "--device", "cuda")
        assert missing.exit_code == 2 and "CUDA is not available" in _flat(missing)


def test_usage_errors(trained, tmp_path):
    _, ckpt, data, _ = trained
    assert _invoke(tmp_path / "missing.pt").exit_code == 2
    assert "needs --model" in _invoke(ckpt, "--data", data).output
    wrong = _invoke(ckpt, "--model", "bnkit.torch.zoo:SmallResNet")
    assert wrong.exit_code == 2 and "the weights do not fit SmallResNet" in wrong.output
    bad_data = tmp_path / "bad.npy"
    np.save(bad_data, np.full((8, 64), np.nan, dtype=np.float32))
    nan = _invoke(ckpt, "--model", "audit_models:mlp", "--data", bad_data)
    assert nan.exit_code == 2 and "NaN" in nan.output
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert _invoke(garbage).exit_code == 2
    none = _invoke(ckpt, "--model", "audit_models:mlp", "--data", data, "--max-batches", "0")
    assert none.exit_code == 2 and "--max-batches must be at least 1, got 0" in _flat(none)  # the CLI's option name


def test_onnx_file(trained, tmp_path):
    pytest.importorskip("onnx")
    from bnkit.torch import export_onnx

    model, _, _, _ = trained
    path = tmp_path / "mlp.onnx"
    export_onnx(model, torch.randn(2, 64), path)
    result = _invoke(path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["depth"] == "onnx" and len(report["layers"]) == 2  # the MLP's two BatchNorm1d
    checkpoint = tmp_path / "mlp.pt"
    save_state_dict_file(model.state_dict(), checkpoint)
    assert report.keys() == json.loads(_invoke(checkpoint, "--json").output).keys()  # one schema for every input
    text = _invoke(path)  # a clean model with no findings at all: a clear line, not an empty table
    assert text.exit_code == 0, text.output
    flat = " ".join(text.output.split())  # rich wraps long temporary paths at the console's width
    assert "no BatchNorm problems found" in flat and "severity" not in flat
    assert "2 BatchNorm layer(s)" in flat
    for extra in (["--data", "x.npy"], ["--device", "cpu"], ["--model", "audit_models:mlp"]):
        wrong = _invoke(path, *extra)  # one message naming every PyTorch-only option, not "--data needs --model"
        assert wrong.exit_code == 2 and "--model, --data, --forward and --device apply to PyTorch checkpoints" in _flat(wrong)
    assert _invoke(path, "--model", "audit_models:mlp").exit_code == 2


def test_trust_opts_into_a_pickled_module(trained, tmp_path):
    model, _, _, _ = trained
    path = tmp_path / "whole_model.pt"
    torch.save(model, path)  # the whole module: its class is a pickled global
    refused = _invoke(path)
    assert refused.exit_code == 2 and "NOT loaded" in _flat(refused)
    trusted = _invoke(path, "--trust", "--json")
    assert trusted.exit_code == 0, trusted.output
    assert json.loads(trusted.output)["layers"] == ["2", "5"]


def test_a_trusted_pickled_module_is_audited_as_a_model_with_its_own_eps_and_momentum(trained, tmp_path):
    """Its eps and momentum are in the pickle (a state dict stores neither): Keras's momentum 0.9 is flagged as the
    Python audit of the same model flags it, it runs on --data, and a dict of tensors still needs --model."""
    from bnkit.torch import audit

    model, _, data, _ = trained
    net = copy.deepcopy(model)
    net[2].momentum = 0.9  # a Keras-convention momentum
    path = tmp_path / "whole.pt"
    torch.save({"model": net, "epoch": 3}, path)
    result = _invoke(path, "--trust", "--json")
    report = json.loads(result.output)
    expected = audit(copy.deepcopy(net).eval())
    assert report["depth"] == "model" and result.exit_code == (0 if expected.ok else 1)
    codes = {(f["layer"], f["code"]) for f in report["findings"]}
    assert codes == {(f.layer, f.code) for f in expected.findings} and ("2", "momentum") in codes
    assert not any(f["code"] == "assumed_defaults" for f in report["findings"])
    on_data = _invoke(path, "--trust", "--data", str(data), "--json")
    assert json.loads(on_data.output)["depth"] == "data" and json.loads(on_data.output)["batches"] > 1
    tensors = tmp_path / "tensors.pt"
    torch.save(net.state_dict(), tensors)
    refused = _invoke(tensors, "--trust", "--data", str(data))
    assert refused.exit_code == 2 and "holds no pickled model" in _flat(refused)


def test_a_trusted_pickled_model_beside_its_ema_has_both_audited_as_the_api_reads_them(trained, tmp_path):
    """YOLOv5's training checkpoint, ``{"model": module, "ema": module, "optimizer": ...}``, with --trust and no
    --data: both models' buffers are audited, as bnkit.torch.audit(path, trust=True) reads them (the CLI refused
    the file as holding the same weights twice); with --data which one to run stays the user's call, and a pickled
    model beside an optimizer's state alone is still audited as a model. Oracles: the NaN planted in the EMA, and
    the Python audit of the same file."""
    from bnkit.torch import audit

    model, _, data, _ = trained
    model, ema = copy.deepcopy(model), copy.deepcopy(model)  # the fixture's model stays as it is
    with torch.no_grad():
        ema[2].running_var[1] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 64)).sum().backward()
    optimizer.step()  # momentum buffers: tensors beside the models, in no BatchNorm's names
    path = tmp_path / "yolo.pt"
    torch.save({"model": model, "ema": ema, "optimizer": optimizer.state_dict(), "epoch": 3}, path)
    result = _invoke(path, "--trust", "--json")
    report, expected = json.loads(result.output), audit(path, trust=True)
    assert result.exit_code == 1 and report["depth"] == "state"
    assert report["layers"] == expected.layers == ["ema/2", "ema/5", "model/2", "model/5"]
    codes = {(f["layer"], f["code"]) for f in report["findings"]}
    assert codes == {(f.layer, f.code) for f in expected.findings} and ("ema/2", "non_finite") in codes
    on_data = _invoke(path, "--trust", "--data", str(data))
    assert on_data.exit_code == 2 and "the same weights twice, under 'model' and 'ema'" in _flat(on_data)
    alone = tmp_path / "model_and_optimizer.pt"
    torch.save({"model": model, "optimizer": optimizer.state_dict()}, alone)
    assert json.loads(_invoke(alone, "--trust", "--json").output)["depth"] == "model"


def test_trust_imports_the_pickled_class_from_the_current_directory(tmp_path, monkeypatch):
    """A torch.save(model) file names its class by module path: --trust resolves it from the cwd, like --model."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command may prepend the cwd: undone after the test
    pkg = tmp_path / "user_nets_fb"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "import torch.nn as nn\n\nclass Net(nn.Sequential):\n"
        "    def __init__(self):\n        super().__init__(nn.Linear(4, 3), nn.BatchNorm1d(3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from user_nets_fb.nets import Net

    net = Net()
    net(torch.randn(8, 4))  # one training step's statistics: a clean audit
    torch.save(net.eval(), tmp_path / "whole.pt")
    for name in ("user_nets_fb", "user_nets_fb.nets"):
        monkeypatch.delitem(sys.modules, name)
    sys.path.remove(str(tmp_path))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    missing = _invoke(tmp_path / "whole.pt", "--trust")
    assert missing.exit_code == 2 and isinstance(missing.exception, SystemExit), missing.output
    assert "user_nets_fb" in _flat(missing) and "state_dict()" in _flat(missing)

    monkeypatch.chdir(tmp_path)
    found = _invoke("whole.pt", "--trust", "--json")
    assert found.exit_code == 0, found.output
    assert json.loads(found.output)["layers"] == ["1"]
    monkeypatch.delitem(sys.modules, "user_nets_fb.nets", raising=False)
    monkeypatch.delitem(sys.modules, "user_nets_fb", raising=False)


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_trust_on_a_file_that_is_no_pickle_is_a_clear_error(tmp_path, content):
    path = tmp_path / "notpickle.pt"
    if content is None:  # an .npy array named like a checkpoint
        np.save(tmp_path / "a.npy", np.zeros(3, dtype=np.float32))
        path.write_bytes((tmp_path / "a.npy").read_bytes())
    else:
        path.write_bytes(content)
    result = _invoke(path, "--trust")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert _flat(result).startswith("error: ") and _flat(result).count(str(path)) == 1  # named once


def test_a_folder_is_named_as_a_folder(trained, tmp_path):
    _, ckpt, _, _ = trained
    result = _invoke(tmp_path)
    assert result.exit_code == 2 and "is a directory" in _flat(result)
    data = _invoke(ckpt, "--model", "audit_models:mlp", "--data", tmp_path)
    assert data.exit_code == 2 and "is a directory" in _flat(data)


@pytest.mark.parametrize("size", ["0", "1"])
def test_train_batch_size_below_two_is_refused(trained, size):
    _, ckpt, data, _ = trained
    result = _invoke(ckpt, "--model", "audit_models:mlp", "--data", data, "--train-batch-size", size)
    assert result.exit_code == 2
    assert "--train-batch-size must be at least 2" in _flat(result)


def test_noise_row_names_the_layers_of_its_figures(trained):
    _, ckpt, data, _ = trained
    result = _invoke(ckpt, "--model", "audit_models:mlp", "--data", data, "--json")
    report = json.loads(result.output)
    (noise,) = [f for f in report["findings"] if f["code"] == "stat_noise"]
    worst_mean = max(report["shifts"], key=lambda s: s["mean_noise"])["layer"]
    worst_var = max(report["shifts"], key=lambda s: s["var_noise"])["layer"]
    assert noise["layer"] == worst_mean and noise["data"]["var_noise_layer"] == worst_var
    if worst_mean != worst_var:
        assert f"std in {worst_mean} " in noise["evidence"] and f"% in {worst_var}," in noise["evidence"]


def test_data_the_model_cannot_run_on_exits_two(trained, tmp_path):
    """Bad input exits 2 in every command (1 means the audit ran and found an error)."""
    _, ckpt, _, _ = trained
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((16, 10), dtype=np.float32))
    result = _invoke(ckpt, "--model", "audit_models:mlp", "--data", wrong)
    assert result.exit_code == 2 and "failed on data batch 0" in _flat(result)
    ints = tmp_path / "ints.npy"
    np.save(ints, np.ones((16, 64), dtype=np.int64))
    result = _invoke(ckpt, "--model", "audit_models:mlp", "--data", ints)
    assert result.exit_code == 2 and "save it as float32" in _flat(result)
    import audit_models

    conv_ckpt = save_state_dict_file(audit_models.conv().state_dict(), tmp_path / "conv.pt")
    conv_ints = tmp_path / "conv_ints.npy"  # a conv model's own error names neither "dtype" nor "scalar type"
    np.save(conv_ints, np.ones((16, 1, 8, 8), dtype=np.int64))
    result = _invoke(conv_ckpt, "--model", "audit_models:conv", "--data", conv_ints)
    assert result.exit_code == 2 and "save it as float32" in _flat(result)
    as_json = _invoke(ckpt, "--model", "audit_models:mlp", "--data", wrong, "--json")
    assert as_json.exit_code == 2 and as_json.stdout == ""  # errors go to stderr: stdout stays JSON or nothing
    assert "failed on data batch 0" in " ".join(as_json.stderr.split())
    empty = tmp_path / "empty.npy"  # np.load raises EOFError, which click took for Ctrl-C ("Aborted.", exit 1)
    empty.write_bytes(b"")
    result = _invoke(ckpt, "--model", "audit_models:mlp", "--data", empty)
    assert result.exit_code == 2 and "empty.npy is an empty file" in _flat(result)
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((16, 64), dtype=np.float32))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    result = _invoke(ckpt, "--model", "audit_models:mlp", "--data", cut)
    assert result.exit_code == 2 and "cut.npz is a damaged zip archive" in _flat(result)


def test_advice_fits_this_command_and_a_long_ranking_says_it_is_cut(trained, tmp_path):
    """The audit offered 'give --data a Dataset', which its --data does not take; a failing --forward was named
    'package.module:fn'; an empty .npz was asked to name inputs it does not hold; the shift table showed 10 of 12
    layers without a word. Oracle: the command's own options, the file's contents and the JSON report."""
    _, ckpt, x_file, root = trained
    x = np.load(x_file)
    torch.save([(torch.from_numpy(x[:50]), 0), (torch.from_numpy(x[50:100, :40]), 1)], tmp_path / "mixed.pt")
    line = one_line_error(run_cli("audit", ckpt, "--model", "audit_models:mlp", "--data", tmp_path / "mixed.pt"))
    assert "save them as one array" in line and "Dataset" not in line
    (root / "audit_feeds.py").write_text(
        "def boom(model, batch):\n    raise RuntimeError('kaboom')\n\n"
        "def third(model, batch):  # with --max-batches 2, its third call is the eval-mode pass\n"
        "    third.calls = getattr(third, 'calls', 0) + 1\n"
        "    if third.calls == 3:\n"
        "        raise RuntimeError('kaboom in eval')\n"
        "    return model(batch)\n")
    line = one_line_error(run_cli("audit", ckpt, "--model", "audit_models:mlp", "--data", x_file,
                                  "--forward", "audit_feeds:boom"))
    assert "the model or --forward 'audit_feeds:boom' failed on data batch 0" in line and "kaboom" in line
    line = one_line_error(run_cli("audit", ckpt, "--model", "audit_models:mlp", "--data", x_file, "--max-batches", 2,
                                  "--forward", "audit_feeds:third"))
    assert "the model or --forward 'audit_feeds:third' failed in eval mode" in line and "kaboom in eval" in line
    np.savez(tmp_path / "empty.npz")
    line = one_line_error(run_cli("audit", ckpt, "--model", "audit_models:mlp", "--data", tmp_path / "empty.npz"))
    assert "empty.npz holds no arrays" in line
    (root / "audit_deep.py").write_text(
        "import torch\n\ndef deep():\n    return torch.nn.Sequential(*[m for _ in range(12) for m in "
        "(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))])\n")
    import audit_deep

    deep = audit_deep.deep()
    save_state_dict_file(deep.state_dict(), tmp_path / "deep.pt")
    args = ("audit", tmp_path / "deep.pt", "--model", "audit_deep:deep", "--data", x_file, "--max-batches", "2")
    report = json.loads(run_cli(*args, "--json").stdout)
    assert len(report["shifts"]) == 12
    assert "the top 10 of 12 layers (--json lists all)" in " ".join(run_cli(*args).output.split())


def test_names_and_texts_print_literally_not_as_markup(tmp_path, monkeypatch):
    """rich markup in a layer name ([/x], [bold]) is printed as written, not parsed."""
    from bnkit.cli.app import console

    monkeypatch.setattr(console, "_width", 1000)  # no wrapping inside the names, whatever the tmp path's length
    import onnx
    from onnx import TensorProto, helper

    c = 2
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [c], v) for n, v in
             (("s", [1.0, 1.0]), ("b", [0.0, 0.0]), ("m", [0.0, 0.0]), ("v", [0.0, 1.0]))]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn[/x][bold]", epsilon=0.0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 2, 2])], inits)
    path = tmp_path / "odd[names].onnx"
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)]), path)
    table = _invoke(path)
    assert table.exit_code == 1  # zero variance with eps = 0: an error
    assert "bn[/x][bold]" in table.output and "odd[names].onnx" in "".join(table.output.split())
    report = json.loads(_invoke(path, "--json").stdout)
    assert {(f["layer"], f["code"]) for f in report["findings"]} >= {("bn[/x][bold]", "zero_var")}


def test_an_error_or_note_naming_a_path_shows_it_as_written(tmp_path, monkeypatch):
    """rich's escape() doubled a trailing backslash (a path ending in one was named with two); markup-like brackets
    stay literal."""
    monkeypatch.chdir(tmp_path)
    for name in ("nope\\", "[bold]x[/bold]\\"):
        result = _invoke(name)
        assert result.exit_code == 2
        assert result.output.strip().endswith(f"error: no such checkpoint or ONNX file: {name}"), result.output
    from bnkit.cli.app import err_console, note

    with err_console.capture() as captured:
        note("kept in C:\\temp\\")
    assert captured.get() == "note: kept in C:\\temp\\\n"


def test_running_out_of_memory_is_a_failed_run_not_bad_input(trained):
    _, ckpt, data, _ = trained
    result = _invoke(ckpt, "--model", "audit_models:oom", "--data", data)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "out of memory" in _flat(result) and "smaller --batch-size" in _flat(result)


def test_out_of_memory_outside_the_models_forward_is_a_failed_run_too(trained, monkeypatch):
    import importlib

    module = importlib.import_module("bnkit.torch.audit")  # the module: bnkit.torch.audit names the function

    def oom(*args, **kwargs):  # e.g. the audit's own statistics on a device that is full
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(module, "audit", oom)
    _, ckpt, data, _ = trained
    result = _invoke(ckpt, "--model", "audit_models:oom", "--data", data)
    assert result.exit_code == 1 and "the audit ran out of memory (try a smaller --batch-size)" in _flat(result)


class _RaisesOnLoad:
    def __reduce__(self):
        import operator

        return (operator.getitem, ({}, "missing"))  # a KeyError raised by the file's own code when unpickled


def test_trust_on_a_pickle_whose_code_raises_is_a_clear_error(tmp_path):
    path = tmp_path / "raises.pt"
    torch.save({"x": torch.zeros(2), "payload": _RaisesOnLoad()}, path)
    result = _invoke(path, "--trust")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "with --trust: unpickling it raised KeyError" in _flat(result)


@pytest.mark.parametrize("make, says", [
    (lambda p: np.save(p.with_suffix(".npy"), np.array([["a", "b"], ["c", "d"]])), "holds <U1 values, not numbers"),
    (lambda p: np.save(p.with_suffix(".npy"), np.array(["2020-01-01"] * 4, dtype="datetime64[D]").reshape(2, 2)),
     "holds datetime64[D] values, not numbers"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros(4, dtype=[("a", "f4"), ("b", "i4")])),
     "holds [('a', '<f4'), ('b', '<i4')] values, not numbers"),
    (lambda p: np.save(p.with_suffix(".npy"), np.float32(3.0)), "holds a single number"),
    (lambda p: torch.save(torch.eye(64).to_sparse(), p.with_suffix(".pt")), "holds a sparse_coo tensor"),
])
@pytest.mark.parametrize("command", ["audit", "recalibrate"])
def test_data_that_is_not_an_array_of_numbers_is_named_before_the_model_runs(trained, tmp_path, make, says, command):
    """torch.from_numpy raised a bare TypeError (strings, dates, records) or a sparse tensor failed in the model."""
    _, ckpt, _, _ = trained
    make(tmp_path / "data")
    data = next(tmp_path.glob("data.*"))
    args = [command, "--model", "audit_models:mlp", "--data", str(data)]
    args += [str(ckpt)] if command == "audit" else ["--weights", str(ckpt), "-o", str(tmp_path / "out.pt")]
    result = runner.invoke(app, args, terminal_width=240)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert f"{data} {says}" in _flat(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.name]  # nothing written


def test_a_checkpoint_with_only_warnings_says_so_in_its_summary(trained, tmp_path):
    """Statistics from 10 updates (momentum 0.1 leaves the initial values 0.9**10 = 35 % of the weight): warnings,
    no error. The summary counts them (as the Python audit of the same state dict does) instead of claiming no
    problems were found under a table of warnings."""
    from bnkit.torch import audit

    model, _, _, _ = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in ("2.num_batches_tracked", "5.num_batches_tracked"):
        state[key].fill_(10)
    expected = [f.severity for f in audit(state).findings]
    assert "error" not in expected and expected.count("warning") >= 2
    result = _invoke(save_state_dict_file(state, tmp_path / "young.pt"))
    assert result.exit_code == 0, result.output
    assert f"no error-level findings; {expected.count('warning')} warning(s)" in _flat(result)
    assert "no BatchNorm problems found" not in _flat(result)


def test_shifts_table_prints_the_variance_ratio_not_its_log(trained, tmp_path):
    """A BatchNorm whose running means are the data's and whose running variances are a quarter of the data's
    (float64 NumPy): every channel's variance ratio is 4 and its mean shift 0, as the table prints them."""
    x = np.random.default_rng(0).normal([0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], (512, 4)).astype(np.float32)
    data = tmp_path / "x4.npy"
    np.save(data, x)
    xd = x.astype(np.float64)
    state = {"0.weight": torch.ones(4), "0.bias": torch.zeros(4),
             "0.running_mean": torch.from_numpy(xd.mean(axis=0)).float(),
             "0.running_var": torch.from_numpy(xd.var(axis=0) / 4).float(),
             "0.num_batches_tracked": torch.tensor(1000)}
    result = _invoke(save_state_dict_file(state, tmp_path / "bn4.pt"), "--model", "audit_models:bn4", "--data", data)
    assert "ranked" in result.output, result.output
    rows = [cells for cells in ([c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines())
            if len(cells) == 7 and cells[0] == "1"]
    assert len(rows) == 1 and rows[0][1] == "0", result.output
    assert float(rows[0][6]) == pytest.approx(4.0, rel=0.01), rows
    assert abs(float(rows[0][5])) < 0.01, rows


def test_an_infinite_shift_prints_in_the_table(tmp_path, monkeypatch):
    """eps 0 and a constant channel: the data's variance is 0, its log-ratio to the running one -inf and the shift
    infinite, which the JSON holds as "inf" and the table formatted as a number: a ValueError traceback (review).
    Oracle: the closed form log(0 / 1) = -inf, a variance ratio of 0."""
    (tmp_path / "eps0_models.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.BatchNorm1d(3, eps=0.0))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x = np.random.default_rng(0).normal(size=(256, 3)).astype(np.float32)
    x[:, 0] = 0.5  # a dead unit's constant output
    np.save(tmp_path / "x.npy", x)
    state = {"0.weight": torch.ones(3), "0.bias": torch.zeros(3), "0.running_mean": torch.zeros(3),
             "0.running_var": torch.ones(3), "0.num_batches_tracked": torch.tensor(100)}
    args = (save_state_dict_file(state, tmp_path / "m.pt"), "--model", "eps0_models:make", "--data", tmp_path / "x.npy")
    assert json.loads(_invoke(*args, "--json").output)["shifts"][0]["z_eq"] == "inf"
    result = _invoke(*args)
    assert result.exit_code == 1 and not isinstance(result.exception, ValueError), result.output
    rows = [cells for cells in ([c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines())
            if len(cells) == 7 and cells[0] == "1"]
    assert [(r[1], r[2], r[6]) for r in rows] == [("0", "inf", "0")], result.output


def test_onnx_findings_are_listed_most_severe_first(tmp_path):
    """An ONNX file that fails onnx.checker (error), runs Dropout in training mode (warning) and has no
    BatchNormalization (info): JSON and table list them error, warning, info (bnkit.findings.SEVERITIES's order),
    not alphabetically."""
    pytest.importorskip("onnx")
    import onnx
    from onnx import TensorProto, helper

    from bnkit.findings import SEVERITIES

    inits = [helper.make_tensor("ratio", TensorProto.FLOAT, [], [0.5]),
             helper.make_tensor("train", TensorProto.BOOL, [], [True])]
    nodes = [helper.make_node("Dropout", ["x", "ratio", "train"], ["d"], name="drop"),
             helper.make_node("Relu", ["d"], ["y"], name="relu"),
             helper.make_node("Relu", ["undefined"], ["z"], name="orphan")]  # an input nothing defines: invalid
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)]), path)
    result = _invoke(path, "--json")
    assert result.exit_code == 1, result.output
    findings = json.loads(result.output)["findings"]
    assert [(f["severity"], f["code"]) for f in findings] == [
        ("error", "invalid_model"), ("warning", "dropout_training"), ("info", "no_bn")]
    assert SEVERITIES == ("error", "warning", "info")
    first_cells = [line.split("│")[1].strip() for line in _invoke(path).output.splitlines() if line.startswith("│")]
    assert [c for c in first_cells if c] == ["error", "warning", "info"]  # the table's severity column


def test_a_whole_model_pickled_in_training_mode_is_audited_in_eval_mode(trained, tmp_path):
    """torch.save keeps the mode a model was saved in, which says nothing about how it is deployed: like a checkpoint
    loaded into --model's factory, a pickled model is audited in eval mode (no train_mode error, exit 0), with the
    findings of the Python audit of the same model in eval mode."""
    from bnkit.torch import audit

    model, _, _, _ = trained
    net = copy.deepcopy(model).train()
    assert any(f.code == "train_mode" for f in audit(copy.deepcopy(net)).findings)  # what eval mode avoids
    expected = audit(copy.deepcopy(net).eval())
    assert expected.ok
    path = tmp_path / "training.pt"
    torch.save(net, path)
    result = _invoke(path, "--trust", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert {(f["layer"], f["code"]) for f in report["findings"]} == {(f.layer, f.code) for f in expected.findings}
    assert not any(f["code"] == "train_mode" for f in report["findings"])


# audit's advice in its options; fold's --input-shape names
POOLED = """
import torch
from bnkit.torch.zoo import MLP

class Pooled(MLP):
    \"\"\"Its output pools the batch (a set model): nothing lines up sample by sample.\"\"\"
    def forward(self, x):
        return super().forward(x).mean(0)

def make():
    return Pooled()

def per_sample(model, x):  # what --forward would give: the outputs before the pooling
    return MLP.forward(model, x)
"""


@pytest.fixture
def pooled(user_module):
    return user_module("pooled", POOLED)


def test_audit_fixes_name_its_options(pooled):
    result = run_cli("audit", "w.pt", "--model", "pooled:make", "--data", "x.npy", "--json")
    assert result.exit_code in (0, 1), result.output  # 1: the fresh weights' statistics were never updated
    report = json.loads(result.output)
    texts = [f[k] for f in report["findings"] for k in ("finding", "evidence", "fix")]
    assert not [t for t in texts if "forward=" in t or "train_batch_size=" in t], texts
    coupling = next(f for f in report["findings"] if f["finding"] == "batch coupling not checked")
    assert "--forward package.module:fn" in coupling["fix"], coupling
    assert report["batch_coupling"] is None
    assert "--forward" in run_cli("audit", "--help").output


def test_audit_forward_option_feeds_the_model(pooled):
    """With the outputs before the pooling, eval-mode MLP is per sample: batch size 1 and the whole batch agree."""
    result = run_cli("audit", "w.pt", "--model", "pooled:make", "--data", "x.npy", "--forward",
                    "pooled:per_sample", "--json")
    assert result.exit_code in (0, 1), result.output  # 1: the fresh weights' statistics were never updated
    report = json.loads(result.output)
    assert report["batch_coupling"] is not None and report["batch_coupling"] < 1e-5, report["batch_coupling"]


@pytest.mark.parametrize("args, words", [
    (["audit", "w.pt", "--model", "pooled:make", "--forward", "pooled:per_sample"], "--forward needs --data"),
    (["audit", "m.onnx", "--forward", "pooled:per_sample"], "--forward and --device apply to PyTorch"),
    # the batch options did nothing without --data (and for ONNX files) and were accepted silently (review)
    (["audit", "w.pt", "--model", "pooled:make", "--max-batches", "3"], "--max-batches applies to --data"),
    (["audit", "w.pt", "--batch-size", "16", "--train-batch-size", "8"],
     "--batch-size, --train-batch-size apply to --data"),
    (["audit", "m.onnx", "--max-batches", "3"], "an ONNX file's nodes are read"),
    (["audit", "w.pt", "--model", "pooled:make", "--data", "x.npy", "--forward", "pooled:POOLED_NOT"],
     "cannot import --forward"),
])
def test_audit_forward_misuse_is_refused(pooled, args, words):
    assert words in one_line_error(run_cli(*args))


def test_audit_train_batch_size_advice_names_the_option():
    from bnkit.cli.audit import _cli_words

    assert _cli_words("pass train_batch_size=") == "pass --train-batch-size"


def test_audit_names_forward_when_the_model_or_forward_fails(files, user_module):
    """A --forward that raised is named with the model ("the model or --forward"), not reported as the model's
    failure alone."""
    user_module("feed_module", "def feed_one(batch):\n    return batch\n")
    line = one_line_error(run_cli("audit", "w.pt", "--model", "bnkit.torch.zoo:MLP", "--data", "x.npy", "--forward",
                                  "feed_module:feed_one"))
    assert "the model or --forward" in line and "feed_one()" in line and "forward=" not in line, line


def test_the_shift_table_shows_the_sampling_noise_its_ranking_allows_for(tmp_path, monkeypatch):
    """Layer a sees 256 values per channel, shifted 0.4 std; layer b 2 rows of each batch, unshifted: b's raw KL
    is larger (sampling noise at 8 values), a ranks first by its excess, and the table says so with each layer's
    noise figure (0.0885 at 256 values, 0.524 at 8). Oracle: sqrt(2 E[KL]) of the closed form at each count,
    bnkit.torch.audit_data.sampling_kl, itself checked against scipy and simulation in test_audit_sampling."""
    from bnkit.torch.audit_data import sampling_kl

    (tmp_path / "twobn.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass TwoBN(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.a, self.b = nn.BatchNorm1d(16), nn.BatchNorm1d(16)\n\n"
        "    def forward(self, x):\n        return self.a(x).sum() + self.b(x[:2]).sum()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from twobn import TwoBN

    model = TwoBN()
    with torch.no_grad():
        model.a.running_mean.fill_(-0.4)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32))
    result = _invoke(tmp_path / "w.pt", "--model", "twobn:TwoBN", "--data", tmp_path / "x.npy")
    assert "ranked by KL per channel beyond what sampling noise gives" in _flat(result)
    rows = [line.split("│")[1:-1] for line in result.output.splitlines() if line.count("│") == 8]
    assert [[c.strip() for c in r[:2]] for r in rows] == [["1", "a"], ["2", "b"]]
    assert float(rows[0][2]) < float(rows[1][2])  # a ranks first with the smaller raw z_eq
    for row, count in zip(rows, (256, 2 * 4)):  # b: 2 rows in each of the 4 batches of 64
        assert float(row[3]) == pytest.approx(math.sqrt(2 * sampling_kl(count)[0]), rel=1e-2)


def test_control_characters_in_names_from_a_file_reach_the_terminal_as_symbols(tmp_path):
    """A layer named "x\\x1b[31m..." in an untrusted checkpoint reached the terminal as a live escape sequence in the
    table (rich strips BEL/BS/CR, not ESC); --json escaped it (review). Now it shows as the symbol for ESC."""
    name = "x\x1b[31mred"
    path = tmp_path / "names.pt"
    torch.save({f"{name}.running_mean": torch.zeros(3), f"{name}.running_var": torch.ones(3)}, path)
    result = _invoke(path)
    assert result.exit_code == 1 and "x\u241b[31m" in result.output and "\x1b[31m" not in result.output
    assert json.loads(_invoke(path, "--json").output)["layers"] == [name]


def test_a_name_with_control_characters_keeps_every_character_in_the_table(tmp_path):
    """The symbols were put in after rich had measured the cells, where a control character takes no column: each
    cut one character off the end of the name (enc␛␛␛bloc for enc\x1b\x1b\x1bblock_3; review). Oracle: the name
    in the JSON output."""
    name = "enc\x1b\x1b\x1bblock_3"
    path = tmp_path / "esc.pt"
    torch.save({f"{name}.running_mean": torch.full((3,), float("nan")), f"{name}.running_var": torch.ones(3)}, path)
    assert json.loads(_invoke(path, "--json").output)["layers"] == [name]
    assert "enc\u241b\u241b\u241bblock_3" in _flat(_invoke(path))


def test_a_checkpoint_file_without_a_state_dict_exits_2(tmp_path):
    """A list, a tensor or a dict without tensors: exit 2 with the reason (a TypeError traceback with exit 1, or a
    pass, when the audit took every set of weights; review)."""
    sd = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict()
    for obj, reason in (([sd], "holds a list, not a state dict"), (torch.ones(3), "holds a Tensor"),
                        ({"epoch": 3}, "contains no tensors")):
        torch.save(obj, tmp_path / "f.pt")
        result = _invoke(tmp_path / "f.pt")
        assert result.exit_code == 2 and reason in " ".join(result.stderr.split()), result.output


def test_the_cli_reads_a_checkpoint_as_the_library_does(tmp_path):
    """The CLI audited the loaded dict as a dict in memory: lists of BN-named values beside the weights (which a
    weights_only file may hold) were refused or audited, where bnkit.torch.audit(path) reads the file (review).
    Oracle: the library's audit of the same file."""
    from bnkit.torch import audit

    sd = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).state_dict()
    for i, obj in enumerate(({"state_dict": sd, "stats": {"bn.running_mean": [0.0, 0.0], "bn.running_var": [1.0, 1.0]}},
                             {"state_dict": sd, "bn.running_mean": [0.0, 0.0], "bn.running_var": [-1.0, 1.0]})):
        torch.save(obj, tmp_path / f"{i}.pt")
        result = _invoke(tmp_path / f"{i}.pt", "--json")
        library = audit(tmp_path / f"{i}.pt")
        assert result.exit_code == (0 if library.ok else 1), result.output
        assert json.loads(result.output)["layers"] == library.layers == ["1"]
