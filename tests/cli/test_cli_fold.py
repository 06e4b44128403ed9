"""``bnkit fold`` on ONNX files and on PyTorch factories + weights; an --input-shape naming no graph input names the
inputs (oracle: onnx), and SIGTERM while the ONNX file is written exits 143 leaving nothing."""
from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from _helpers import one_line_error, run_cli
from typer.testing import CliRunner

from bnkit.cli import app

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

runner = CliRunner()


def _calibrated_vgg():
    from bnkit.torch import bn_layers
    from bnkit.torch.zoo import VGGBN

    torch.manual_seed(0)
    model = VGGBN()
    g = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 8, 8, generator=g))
        for _, bn in bn_layers(model):
            bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=g))
            bn.bias.copy_(0.5 * torch.randn(bn.bias.shape, generator=g))
    return model.eval()


def _export(model, path, training=False):
    buffer = io.BytesIO()
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 1, 8, 8),), buffer, dynamo=False, training=mode, opset_version=17,
                          do_constant_folding=False, input_names=["input"], dynamic_axes={"input": {0: "N"}})
    path.write_bytes(buffer.getvalue())
    return path


def _text(result) -> str:
    return " ".join(result.output.split())  # rich wraps long lines


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_fold_onnx_file_folds_and_verifies(tmp_path):
    model = _calibrated_vgg()
    src = _export(model, tmp_path / "vgg.onnx")
    out = tmp_path / "folded.onnx"
    result = runner.invoke(app, ["fold", str(src), "-o", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert _text(result).count("folded into") == 5 and "verified with onnxruntime" in _text(result)
    folded = onnx.load(out)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        eager = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(out, x), eager, rtol=1e-5, atol=1e-5 * np.abs(eager).max())


def test_fold_onnx_json_and_training_mode(tmp_path):
    model = _calibrated_vgg()
    src = _export(model, tmp_path / "train.onnx", training=True)
    result = runner.invoke(app, ["fold", str(src), "-o", str(tmp_path / "a.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["folded"] == [] and len(report["left"]) == 5 and report["verified"]

    result = runner.invoke(app, ["fold", str(src), "-o", str(tmp_path / "b.onnx"), "--to-inference", "--json",
                                 "--input-shape", "input=5x1x8x8"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["folded"]) == 5 and len(report["converted"]) == 5 and report["input_shapes"] == {"input": [5, 1, 8, 8]}
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)  # batch of one: running stats used
    with torch.no_grad():
        eager = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(tmp_path / "b.onnx", x), eager, rtol=1e-5, atol=1e-5 * np.abs(eager).max())


def test_fold_onnx_to_inference_names_the_switched_dropout(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Dropout(0.5), torch.nn.Linear(144, 3))
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8))
    model.eval()
    src = _export(model, tmp_path / "train.onnx", training=True)
    result = runner.invoke(app, ["fold", str(src), "-o", str(tmp_path / "inference.onnx"), "--to-inference"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "switched Dropout" in _text(result)
    x = np.random.default_rng(2).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        eager = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(tmp_path / "inference.onnx", x), eager, rtol=1e-5, atol=1e-5 * np.abs(eager).max())


def test_fold_onnx_bad_input(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xff not onnx")
    out = tmp_path / "out.onnx"
    result = runner.invoke(app, ["fold", str(bad), "-o", str(out)])
    assert result.exit_code == 2 and "not a readable ONNX model" in _text(result) and not out.exists()
    assert "--model" not in _text(result)  # an .onnx name: no PyTorch hint
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"PK\x03\x04 a checkpoint's zip")
    result = runner.invoke(app, ["fold", str(ckpt), "-o", str(out)])
    assert result.exit_code == 2 and "not a readable ONNX model" in _text(result)
    assert "to fold a PyTorch model, give --model pkg.module:factory --weights FILE" in _text(result)
    # the hint is for a file that could not be read as ONNX, not for every error on another suffix: a missing
    # file, or a readable ONNX model saved as .bin given an input name it does not have
    result = runner.invoke(app, ["fold", str(tmp_path / "missing.pt"), "-o", str(out)])
    assert result.exit_code == 2 and "no such file" in _text(result) and "--model" not in _text(result)
    _export(_calibrated_vgg(), tmp_path / "vgg.bin")
    result = runner.invoke(app, ["fold", str(tmp_path / "vgg.bin"), "-o", str(out), "--input-shape", "nosuch=1x1x8x8"])
    assert result.exit_code == 2 and "nosuch" in _text(result) and "--model" not in _text(result)
    result = runner.invoke(app, ["fold", str(tmp_path), "-o", str(out)])
    assert result.exit_code == 2 and f"{tmp_path} is a folder, not an ONNX model file" in _text(result)
    result = runner.invoke(app, ["fold", str(bad), "-o", str(bad)])
    assert result.exit_code == 2 and "names the input file" in _text(result)
    assert runner.invoke(app, ["fold", "-o", str(out)]).exit_code == 2
    src = _export(_calibrated_vgg(), tmp_path / "vgg.onnx")  # both an .onnx file and --model: which one?
    result = runner.invoke(app, ["fold", str(src), "--model", "bnkit.torch.zoo:VGGBN", "-o", str(out)])
    assert result.exit_code == 2 and "give either an .onnx file or --model (not both)" in _text(result)
    assert not out.exists()
    (tmp_path / "g.fold.json").mkdir()  # the report's place is taken: refused before the model is built
    result = runner.invoke(app, ["fold", "--model", "bnkit.torch.zoo:VGGBN", "-o", str(tmp_path / "g.pt")])
    assert result.exit_code == 2 and "g.fold.json is a folder" in _text(result) and not (tmp_path / "g.pt").exists()
    src = _export(_calibrated_vgg(), tmp_path / "vgg.onnx")
    result = runner.invoke(app, ["fold", str(src), "-o", str(out), "--input-shape", "1x1x8x8"])
    assert result.exit_code == 2 and "NAME=SHAPE" in _text(result) and not out.exists()


def test_options_that_do_nothing_and_bad_shapes_are_refused_before_any_work(tmp_path):
    src = _export(_calibrated_vgg(), tmp_path / "vgg.onnx")
    out = tmp_path / "out.onnx"
    for extra in (["--weights", str(src)], ["--force"], ["--trust"]):
        result = runner.invoke(app, ["fold", str(src), "-o", str(out), *extra])
        assert result.exit_code == 2 and "only to --model" in _text(result) and extra[0] in _text(result)
    # a PyTorch checkpoint given as FILE with --trust was called "an .onnx file": FILE is folded as ONNX, and how
    # to fold a PyTorch model is said
    pt = tmp_path / "whole.pt"
    pt.write_bytes(b"")
    result = runner.invoke(app, ["fold", str(pt), "-o", str(out), "--trust"])
    assert result.exit_code == 2 and "not to FILE, which bnkit folds as an ONNX model; to fold a PyTorch model, give " \
        "--model pkg.module:factory --weights FILE" in _text(result)
    pt.unlink()
    result = runner.invoke(app, ["fold", "--model", "bnkit.torch.zoo:VGGBN", "--to-inference", "-o",
                                 str(tmp_path / "f.pt")])
    assert result.exit_code == 2 and "--to-inference applies only to an .onnx file" in _text(result)
    for shape in ("0x1x8x8", "2xax8", f"{1 << 63}x3"):  # one message, exit 2 (bad usage), as for an ONNX file; int64
        result = runner.invoke(app, ["fold", "--model", "bnkit.torch.zoo:VGGBN", "--input-shape", shape, "-o",
                                     str(tmp_path / "f.pt")])
        assert result.exit_code == 2 and _text(result).count("error:") == 1 and "bad shape" in _text(result)
    assert os.listdir(tmp_path) == ["vgg.onnx"]


def test_fold_pytorch_model_saves_a_reloadable_state_dict(tmp_path):
    from bnkit.torch import save_state_dict_file
    from bnkit.torch.fold import FoldReport, FoldedBN
    from bnkit.torch.zoo import VGGBN

    model = _calibrated_vgg()
    weights = save_state_dict_file(model.state_dict(), tmp_path / "w.safetensors")
    out = tmp_path / "folded.pt"
    result = runner.invoke(app, ["fold", "--model", "bnkit.torch.zoo:VGGBN", "--weights", str(weights),
                                 "--input-shape", "2x1x8x8", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["folded"]) == 5 and data["max_rel_diff"] < 1e-5
    # rebuild the folded architecture from the report and load the saved weights strictly
    report = FoldReport(folded=[FoldedBN(**f) for f in data["folded"]])
    fresh = report.restructure(VGGBN())
    fresh.load_state_dict(torch.load(out, weights_only=True))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_float16_checkpoint_folded_in_the_float32_factory_model_is_noted(tmp_path):
    """float16 weights in the factory's float32 VGG: folded and written in float32, as a note on stderr says (the
    --json output on stdout stays JSON)."""
    from bnkit.torch import load_state_dict_file, save_state_dict_file

    half = {k: v.half() if v.is_floating_point() else v for k, v in _calibrated_vgg().state_dict().items()}
    weights = save_state_dict_file(half, tmp_path / "w16.safetensors")
    out = tmp_path / "folded.safetensors"
    result = runner.invoke(app, ["fold", "--model", "bnkit.torch.zoo:VGGBN", "--weights", str(weights),
                                 "--input-shape", "2x1x8x8", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == str(out)
    assert "to the dtypes of the model the factory builds (" in " ".join(result.stderr.split())
    assert " float16 -> float32)" in " ".join(result.stderr.split())
    assert {v.dtype for v in load_state_dict_file(out).values()} == {torch.float32}


def test_a_failed_write_leaves_the_previous_weights_and_report(tmp_path, monkeypatch):
    """The disk fills up while the weights are written: the earlier run's folded.pt and folded.fold.json stay as
    they were (the report was written first and then deleted, leaving weights nothing could reload)."""
    import bnkit.torch.io

    from bnkit.torch import save_state_dict_file

    weights = save_state_dict_file(_calibrated_vgg().state_dict(), tmp_path / "w.safetensors")
    args = ["fold", "--model", "bnkit.torch.zoo:VGGBN", "--weights", str(weights), "-o", str(tmp_path / "f.pt")]
    assert runner.invoke(app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(state, path, **_):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(bnkit.torch.io, "save_state_dict_file", full)
        patch.setattr(bnkit.torch, "save_state_dict_file", full)
        result = runner.invoke(app, args + ["--input-shape", "2x1x8x8"])
    assert result.exit_code == 1 and "nothing written" in _text(result)
    assert f"cannot write {tmp_path / 'f.pt'}: [Errno 28] No space left" in _text(result)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.setattr(Path, "write_text", lambda self, text: full(None, self))  # now the report's write fails
    result = runner.invoke(app, args + ["--input-shape", "2x1x8x8"])
    assert result.exit_code == 1 and "nothing written" in _text(result)
    assert f"cannot write {tmp_path / 'f.fold.json'}: [Errno 28]" in _text(result)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    import bnkit.atomic

    real = os.replace  # now only the report's final rename fails: the new weights are in place, without a report
    monkeypatch.setattr(bnkit.atomic.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(5, "I/O error"))
                        if str(b).endswith(".fold.json") else real(a, b))
    result = runner.invoke(app, args + ["--input-shape", "2x1x8x8"])
    assert result.exit_code == 1 and "was written without its report" in _text(result)
    assert "the earlier run's report there was removed" in _text(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pt", "w.safetensors"]  # no stale report
    # the same window hit by SIGTERM (the write's handler raises SystemExit(143)): no stale report either
    monkeypatch.undo()
    assert runner.invoke(app, args).exit_code == 0 and (tmp_path / "f.fold.json").exists()
    monkeypatch.setattr(bnkit.atomic.os, "replace", lambda a, b: (_ for _ in ()).throw(SystemExit(143))
                        if str(b).endswith(".fold.json") else real(a, b))
    result = runner.invoke(app, args + ["--input-shape", "2x1x8x8"])
    assert result.exit_code == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pt", "w.safetensors"]
    # SIGTERM in the folder's fsync right after the weights' rename, inside their own write: the new weights are
    # in place, so the earlier report, which describes other weights, goes (before, it stayed beside them)
    monkeypatch.undo()
    assert runner.invoke(app, args).exit_code == 0 and (tmp_path / "f.fold.json").exists()
    fsync = bnkit.atomic._fsync
    monkeypatch.setattr(bnkit.atomic, "_fsync", lambda p: (_ for _ in ()).throw(SystemExit(143))
                        if os.path.isdir(p) else fsync(p))
    result = runner.invoke(app, args + ["--input-shape", "2x1x8x8"])
    assert result.exit_code == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pt", "w.safetensors"]


def test_the_assumptions_of_an_unverified_fold_are_printed(tmp_path):
    """Linear -> BatchNorm1d folds assume (N, features) activations: without --input-shape nothing checks it, so
    the console says so (it was only in the .fold.json); with it, the layout is probed and nothing is assumed."""
    from bnkit.torch import save_state_dict_file
    from bnkit.torch.zoo import MLP

    model = MLP()
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 64))
    weights = save_state_dict_file(model.state_dict(), tmp_path / "w.pt")
    args = ["fold", "--model", "bnkit.torch.zoo:MLP", "--weights", str(weights), "-o", str(tmp_path / "f.pt")]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0 and "note: Linear/BatchNorm1d folds assume (N, features) activations; give " \
        "--input-shape to check" in result.output
    checked = runner.invoke(app, args + ["--input-shape", "4x64"], terminal_width=200)
    assert checked.exit_code == 0 and "note:" not in checked.output and "verified: max" in checked.output


def test_fold_pytorch_model_to_onnx_and_refusals(tmp_path):
    from bnkit.torch import save_state_dict_file

    model = _calibrated_vgg()
    weights = save_state_dict_file(model.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "folded.onnx"
    result = runner.invoke(app, ["fold", "--model", "bnkit.torch.zoo:VGGBN", "--weights", str(weights),
                                 "--input-shape", "2x1x8x8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(out).graph.node]
    x = np.random.default_rng(2).standard_normal((4, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        eager = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(out, x), eager, rtol=1e-5, atol=1e-5 * np.abs(eager).max())

    # never-trained weights are refused without --force; nothing written
    fresh = tmp_path / "fresh.pt"
    result = runner.invoke(app, ["fold", "--model", "bnkit.torch.zoo:VGGBN", "-o", str(fresh)])
    assert result.exit_code == 2 and "never updated" in _text(result) and not fresh.exists()
    assert "Pass --force to fold" in _text(result) and "force=True" not in _text(result)  # the option, not the argument
    result = runner.invoke(app, ["fold", "--model", "no_such_module:f", "-o", str(fresh)])
    assert result.exit_code == 2 and "cannot build the model" in _text(result)
    assert sorted(os.listdir(tmp_path)) == ["folded.onnx", "w.pt"]

    upper = tmp_path / "folded2.ONNX"  # suffixes are read case-insensitively everywhere
    result = runner.invoke(app, ["fold", "--model", "bnkit.torch.zoo:VGGBN", "--weights", str(weights),
                                 "--input-shape", "2x1x8x8", "-o", str(upper)])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(_run(upper, x), eager, rtol=1e-5, atol=1e-5 * np.abs(eager).max())
    assert not (tmp_path / "folded2.fold.json").exists()  # no fold report: an ONNX file needs none


def test_fold_pytorch_model_writes_nothing_when_the_folded_outputs_differ(tmp_path, monkeypatch):
    import bnkit.torch.fold
    from bnkit.torch import save_state_dict_file

    weights = save_state_dict_file(_calibrated_vgg().state_dict(), tmp_path / "w.pt")
    real = bnkit.torch.fold._run_folded

    def off_by_a_bit(work, inputs, folded):  # a fold that went wrong: one bias nudged before the check runs
        with torch.no_grad():
            work.features[0][0].bias += 1.0
        return real(work, inputs, folded)

    monkeypatch.setattr(bnkit.torch.fold, "_run_folded", off_by_a_bit)
    out = tmp_path / "folded.pt"
    args = ["fold", "--model", "bnkit.torch.zoo:VGGBN", "--weights", str(weights), "--input-shape", "2x1x8x8", "-o"]
    result = runner.invoke(app, args + [str(out)])
    assert result.exit_code == 1 and "nothing written" in _text(result) and not out.exists()
    assert runner.invoke(app, args + [str(out), "--no-verify"]).exit_code == 0 and out.exists()


def test_audit_reads_the_unfolded_export_the_folded_file_and_a_training_export(tmp_path):
    # the two commands together: `bnkit fold model.onnx -o folded.onnx`, then `bnkit audit` on each file
    src = _export(_calibrated_vgg(), tmp_path / "vgg.onnx")
    out = tmp_path / "folded.onnx"
    assert runner.invoke(app, ["fold", str(src), "-o", str(out)]).exit_code == 0

    def audit(path):
        result = runner.invoke(app, ["audit", str(path), "--json"])
        return result.exit_code, json.loads(result.output)

    code, report = audit(src)
    assert code == 0 and report["ok"] and report["depth"] == "onnx" and report["findings"] == []
    code, report = audit(out)
    assert code == 0 and report["ok"] and [f["code"] for f in report["findings"]] == ["no_bn"]
    code, report = audit(_export(_calibrated_vgg(), tmp_path / "train.onnx", training=True))
    assert code == 1 and not report["ok"]
    assert [f["code"] for f in report["findings"]] == ["training_mode"] * 5


def test_fold_refuses_outputs_that_would_overwrite_an_input_or_mislead(tmp_path, monkeypatch):
    from bnkit.torch import save_state_dict_file

    save_state_dict_file(_calibrated_vgg().state_dict(), tmp_path / "w.pt")
    _export(_calibrated_vgg(), tmp_path / "vgg.onnx")
    # a model whose tensors live in an external data file named like a model: folding onto that file wrote the
    # folded model over the input's weights (the input then loaded as garbage)
    onnx.save(onnx.load(tmp_path / "vgg.onnx"), tmp_path / "ext.onnx", save_as_external_data=True,
              location="ext_data.onnx", size_threshold=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.chdir(tmp_path)
    torch_args = ["fold", "--model", "bnkit.torch.zoo:VGGBN", "--weights", "w.pt", "--input-shape", "2x1x8x8", "-o"]
    cases = [
        (torch_args + ["w.pt"], "names the input file w.pt"),
        (torch_args + [str(tmp_path / "w.pt")], "names the input file"),
        (torch_args + ["w.txt"], "ending in .pt, .pth, .safetensors, .onnx"),
        (torch_args + ["out/"], "is a folder"),
        (torch_args + ["no/dir/f.pt"], "does not exist"),
        (["fold", "vgg.onnx", "-o", "folded.pt"], "ending in .onnx"),
        (["fold", "vgg.onnx", "-o", "./vgg.onnx"], "names the input file"),
        (["fold", "ext.onnx", "-o", "ext_data.onnx"], "names the input file ext_data.onnx"),
        (["fold", "vgg.onnx", "-o", "no/dir/f.onnx"], "does not exist"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args, terminal_width=200)
        assert result.exit_code == 2 and message in _text(result), (args, result.output)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, no folder made


def test_fold_says_when_it_did_not_verify_and_its_reload_hint_works(tmp_path, monkeypatch):
    from bnkit.torch import save_state_dict_file

    model = _calibrated_vgg()
    save_state_dict_file(model.state_dict(), tmp_path / "w.safetensors")
    monkeypatch.chdir(tmp_path)
    args = ["fold", "--model", "bnkit.torch.zoo:VGGBN", "--weights", "w.safetensors", "-o"]
    result = runner.invoke(app, args + ["a.safetensors"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "not verified (give --input-shape to verify)" in _text(result) and "verified:" not in _text(result)
    result = runner.invoke(app, args + ["b.pt", "--input-shape", "2x1x8x8", "--no-verify"], terminal_width=200)
    assert result.exit_code == 0 and "not verified (--no-verify)" in _text(result)
    result = runner.invoke(app, args + ["c.pth", "--input-shape", "2x1x8x8"], terminal_width=200)
    assert result.exit_code == 0 and "verified: max" in _text(result) and "not verified" not in _text(result)

    # the printed reload lines, run as they are, rebuild a model that computes what the original does
    lines = result.output.splitlines()
    start = lines.index("reload it in Python:")
    snippet = "\n".join(line[2:] for line in lines[start + 1:start + 7])
    assert "c.fold.json" in snippet and (tmp_path / "c.fold.json").is_file()
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the hint is meant to be pasted into Python
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(x), model(x), rtol=1e-5, atol=1e-5)

    result = runner.invoke(app, args + ["d.pt", "--json"])
    data = json.loads(result.output)
    assert data["verified"] is False and data["report"] == "d.fold.json"
    assert json.loads((tmp_path / "d.fold.json").read_text())["folded"] == data["folded"]

    # d.pt and d.safetensors would share d.fold.json: the second fold would take d.pt's report away (its reload
    # lines then fail, or load other weights' structure); refused before anything is written. A rerun into d.pt,
    # the report's own weights, replaces both as before.
    before = (tmp_path / "d.fold.json").read_bytes()
    result = runner.invoke(app, args + ["d.safetensors"], terminal_width=200)
    assert result.exit_code == 2 and "d.fold.json is the fold report of d.pt beside it" in _text(result)
    assert (tmp_path / "d.fold.json").read_bytes() == before and not (tmp_path / "d.safetensors").exists()
    assert runner.invoke(app, args + ["d.pt"]).exit_code == 0
    assert json.loads((tmp_path / "d.fold.json").read_text())["weights"] == "d.pt"
    (tmp_path / "d.pt").unlink()  # the report's weights are gone: nothing left to lose
    assert runner.invoke(app, args + ["d.safetensors"]).exit_code == 0
    assert json.loads((tmp_path / "d.fold.json").read_text())["weights"] == "d.safetensors"


def test_names_and_paths_with_brackets_print_literally(tmp_path, monkeypatch):
    """rich markup in node names and paths ([/x], [bold]) is printed as written, never parsed."""
    from bnkit.cli.app import console

    monkeypatch.setattr(console, "_width", 1000)  # no wrapping inside the names, whatever the tmp path's length
    src = _export(_calibrated_vgg(), tmp_path / "vgg.onnx")
    graph = onnx.load(src)
    for i, node in enumerate(n for n in graph.graph.node if n.op_type == "BatchNormalization"):
        node.name = f"bn{i}[/x][bold]"
    odd = tmp_path / "odd[dir]"
    odd.mkdir()
    onnx.save(graph, odd / "v[1].onnx")
    result = runner.invoke(app, ["fold", str(odd / "v[1].onnx"), "-o", str(odd / "f[1].onnx")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "bn0[/x][bold]" in result.output and "odd[dir]/v[1].onnx" in "".join(result.output.split())


NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, tail):
        super().__init__()
        self.conv, self.bn, self.tail = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), tail
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.tail(self.bn(self.conv(x)))


def unsupported():  # an op torch.onnx cannot export
    return Net(torch.special.i0e)


def fixed():  # runs only at the batch size of 4 it was written for
    torch.manual_seed(0)
    return Net(lambda h: h.reshape(4, 64))


def _batch_of_seven(h):
    assert h.shape[0] == 7, "built for batches of 7"
    return h


def asserting():
    return Net(_batch_of_seven)


class TwoInputs(Net):
    def forward(self, x, y):
        return super().forward(x) + y


def two_inputs():
    return TwoInputs(nn.Identity())
'''


def test_fold_errors_are_messages_not_tracebacks(tmp_path, monkeypatch):
    (tmp_path / "f5_cli_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    args = ["fold", "--model", "f5_cli_nets:unsupported", "--input-shape", "4x3x6x6", "-o"]
    result = runner.invoke(app, args + ["odd.onnx"], terminal_width=200)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "cannot export the folded model to ONNX" in _text(result) and "is not supported" in _text(result)

    # a model built for one batch size: the batch-of-one check says how to skip it, and --fixed-batch does
    args = ["fold", "--model", "f5_cli_nets:fixed", "--input-shape", "4x3x6x6", "-o", "fixed.onnx"]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "first sample alone" in _text(result) and "--fixed-batch" in _text(result)
    assert sorted(os.listdir(tmp_path)) == ["f5_cli_nets.py"]
    result = runner.invoke(app, args + ["--fixed-batch"], terminal_width=200)
    assert result.exit_code == 0, result.output
    import f5_cli_nets

    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        eager = f5_cli_nets.fixed().eval()(x).numpy()
    np.testing.assert_allclose(_run(tmp_path / "fixed.onnx", x.numpy()), eager, rtol=1e-5,
                               atol=1e-5 * np.abs(eager).max())
    result = runner.invoke(app, ["fold", "fixed.onnx", "-o", "again.onnx", "--fixed-batch"])
    assert result.exit_code == 2 and "--fixed-batch applies only" in _text(result)

    # an ONNX output that cannot be written (the disk fills up halfway)
    src = _export(_calibrated_vgg(), tmp_path / "vgg.onnx")
    import onnx

    def disk_full(model, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save", disk_full)
    result = runner.invoke(app, ["fold", str(src), "-o", "full.onnx"], terminal_width=200)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "cannot write full.onnx" in _text(result) and "nothing written" in _text(result)
    assert not [name for name in os.listdir(tmp_path) if name.startswith((".", "full"))]

    # the output's folder removed while the fold ran: the OS's FileNotFoundError is a write failure (exit 1), not a
    # missing source (exit 2)
    def folder_gone(model, path, *args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(onnx, "save", folder_gone)
    result = runner.invoke(app, ["fold", str(src), "-o", "gone.onnx"], terminal_width=200)
    assert result.exit_code == 1 and "cannot write gone.onnx" in _text(result) and "nothing written" in _text(result)


def test_fold_onnx_input_shape_that_does_not_fit_is_bad_input_and_a_small_dynamic_size_names_the_option(tmp_path):
    model = _calibrated_vgg()
    src = _export(model, tmp_path / "vgg.onnx")  # input (N, 1, 8, 8), N dynamic
    out = tmp_path / "out.onnx"
    result = runner.invoke(app, ["fold", str(src), "-o", str(out), "--input-shape", "input=1x3"], terminal_width=200)
    assert result.exit_code == 2 and "does not fit the shape the graph declares" in _text(result), result.output
    # a graph with dynamic H and W, which the default size 2 leaves too small for VGG's 3x3 convs and pooling
    graph = onnx.load(src)
    for dim in graph.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "HW"
    onnx.save(graph, tmp_path / "dyn.onnx")
    result = runner.invoke(app, ["fold", str(tmp_path / "dyn.onnx"), "-o", str(out)], terminal_width=200)
    assert result.exit_code == 1 and "--input-shape NAME=SHAPE" in _text(result) and "--no-verify" in _text(result)
    assert not out.exists()
    result = runner.invoke(app, ["fold", str(tmp_path / "dyn.onnx"), "-o", str(out), "--input-shape",
                                 "input=2x1x8x8"], terminal_width=200)
    assert result.exit_code == 0 and out.exists(), result.output


def test_fold_reload_hint_for_a_module_object_uses_it_without_calling_it(tmp_path, monkeypatch):
    import sys

    from bnkit.torch import save_state_dict_file

    model = _calibrated_vgg()
    save_state_dict_file(model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "f5_instance.py").write_text("from bnkit.torch.zoo import VGGBN\n\nnet = VGGBN()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["fold", "--model", "f5_instance:net", "--weights", "w.pt", "-o", "f.pt"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = lines.index("reload it in Python:")
    snippet = "\n".join(line[2:] for line in lines[start + 1:start + 7])
    assert "model = net\n" in snippet
    monkeypatch.delitem(sys.modules, "f5_instance")  # as in a fresh Python session: the import builds the object
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the hint is meant to be pasted into Python
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_fold_verifies_a_model_in_its_own_dtype(tmp_path, monkeypatch, dtype):
    """The random --input-shape input is made in the model's dtype (float32 into a float64 conv raised)."""
    from bnkit.torch import save_state_dict_file

    (tmp_path / f"f6_{dtype}.py").write_text(
        "import torch\nfrom bnkit.torch.zoo import VGGBN\n\n"
        f"def make():\n    return VGGBN().to(torch.{dtype})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = save_state_dict_file(_calibrated_vgg().to(getattr(torch, dtype)).state_dict(), tmp_path / "w.pt")
    out = tmp_path / "f.pt"
    result = runner.invoke(app, ["fold", "--model", f"f6_{dtype}:make", "--weights", str(weights), "--input-shape",
                                 "2x1x8x8", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["verified"] and len(data["folded"]) == 5
    assert all(t.dtype == getattr(torch, dtype) for t in torch.load(out, weights_only=True).values()
               if t.is_floating_point())
    if dtype == "bfloat16":  # to .onnx: refused before folding, as bad usage
        result = runner.invoke(app, ["fold", "--model", f"f6_{dtype}:make", "--weights", str(weights),
                                     "--input-shape", "2x1x8x8", "-o", str(tmp_path / "f.onnx")])
        assert result.exit_code == 2 and "bfloat16" in _text(result) and not (tmp_path / "f.onnx").exists()


@pytest.mark.parametrize("wrapper", ["torch.nn.DataParallel", "torch.optim.swa_utils.AveragedModel"])
def test_the_reload_hint_works_for_a_factory_returning_a_wrapper(tmp_path, monkeypatch, wrapper):
    """fold_bn folds the module inside; the printed lines restructure that module (restructure peels the wrapper
    and returns it) and load the weights into it."""
    from torch.optim.swa_utils import AveragedModel

    from bnkit.torch import save_state_dict_file

    model = _calibrated_vgg()
    name = f"f7_{wrapper.rsplit('.', 1)[1].lower()}"
    (tmp_path / f"{name}.py").write_text(
        f"import torch\nimport torch.optim.swa_utils\nfrom bnkit.torch.zoo import VGGBN\n\n"
        f"def make():\n    return {wrapper}(VGGBN())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    make = {"torch.nn.DataParallel": torch.nn.DataParallel, "torch.optim.swa_utils.AveragedModel": AveragedModel}
    save_state_dict_file(make[wrapper](model).state_dict(), tmp_path / "ww.pt")  # the wrapper's own keys
    result = runner.invoke(app, ["fold", "--model", f"{name}:make", "--weights", "ww.pt", "--input-shape",
                                 "2x1x8x8", "-o", "f.pt"], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = lines.index("reload it in Python:")
    scope: dict = {}
    exec("\n".join(line[2:] for line in lines[start + 1:start + 7]), scope)  # noqa: S102 - the printed hint
    x = torch.randn(3, 1, 8, 8)
    on = lambda net: x.to(next(net.parameters()).device)  # noqa: E731 - DataParallel moves to a GPU if any
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(on(scope["model"])).cpu(), model(on(model)).cpu(),
                                   rtol=1e-5, atol=1e-5)


def test_a_weights_write_that_fails_otherwise_is_a_message(tmp_path, monkeypatch):
    """torch.save raises RuntimeError when the file cannot be written (a file size limit), safetensors its own
    error type: one line, exit 1, nothing written."""
    import bnkit.torch
    import bnkit.torch.io

    from bnkit.torch import save_state_dict_file

    weights = save_state_dict_file(_calibrated_vgg().state_dict(), tmp_path / "w.safetensors")

    def too_large(state, path, **_):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(bnkit.torch.io, "save_state_dict_file", too_large)
    monkeypatch.setattr(bnkit.torch, "save_state_dict_file", too_large)
    result = runner.invoke(app, ["fold", "--model", "bnkit.torch.zoo:VGGBN", "--weights", str(weights), "-o",
                                 str(tmp_path / "f.pt")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "PytorchStreamWriter failed" in _text(result) and "nothing written" in _text(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_reasons_for_layers_left_speak_of_the_cli_options(tmp_path, monkeypatch):
    (tmp_path / "f8_branchy.py").write_text(
        "import torch\nfrom torch import nn\n\nclass Branchy(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))\n"
        "    def forward(self, x):\n        return self.body(x) if x.sum() > 0 else -self.body(x)\n\n"
        "def make():\n    m = Branchy()\n    m.train()\n    m(torch.randn(4, 1, 8, 8))\n    return m\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(app, ["fold", "--model", "f8_branchy:make", "-o", str(tmp_path / "f.pt")],
                           terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "--input-shape" in _text(result) and "example_inputs" not in _text(result)


def test_a_bfloat16_fold_as_accurate_as_the_model_is_written(tmp_path, monkeypatch):
    """bfloat16's unit roundoff is 2^-8, so folded and original bf16 outputs differ by about 1e-2 although both are
    equally far from float64 (1e-2 refused such folds); the check allows 4e-2. Oracle: the float64 model."""
    import copy

    from bnkit.torch import load_state_dict_file, recalibrate, save_state_dict_file

    (tmp_path / "f9_bf16.py").write_text(
        "import torch\nfrom torch import nn\n\ndef make():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(4 * 36, 5), nn.BatchNorm1d(5)).to(torch.bfloat16).eval()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from f9_bf16 import make

    model, g = make(), torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 8, 8, generator=g)
    recalibrate(model, [x[:32].bfloat16(), x[32:].bfloat16()], progress=False)
    save_state_dict_file(model.state_dict(), tmp_path / "w.safetensors")
    result = runner.invoke(app, ["fold", "--model", "f9_bf16:make", "--weights", str(tmp_path / "w.safetensors"),
                                 "--input-shape", "2x3x8x8", "-o", str(tmp_path / "f.pt"), "--json"])
    assert result.exit_code == 0, result.output
    folded = load_state_dict_file(tmp_path / "f.pt")
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        want = exact(x.double())
        err_model = rel_of(model(x.bfloat16()), want)
        rebuilt = make()
        rebuilt[1], rebuilt[5] = torch.nn.Identity(), torch.nn.Identity()
        rebuilt.load_state_dict(folded)
        err_folded = rel_of(rebuilt(x.bfloat16()), want)
    assert err_folded < 2 * err_model + 1e-3


@pytest.mark.parametrize("dtype,accepted", [("bfloat16", True), ("float16", False)])
def test_the_fold_check_allows_about_ten_unit_roundoffs_of_the_model_dtype(tmp_path, monkeypatch, dtype, accepted):
    """A folded bf16 model 1.5e-2 from the original (under 4 of bfloat16's 2^-8 roundoffs) is written; the same
    difference in float16 (30 of its 2^-11) is refused."""
    import bnkit.torch.fold

    from bnkit.torch import save_state_dict_file

    monkeypatch.setattr(bnkit.torch.fold, "_compare", lambda reference, folded: (1.5e-2, 1.5e-2, None))
    weights = save_state_dict_file(_calibrated_vgg().to(getattr(torch, dtype)).state_dict(), tmp_path / "w.pt")
    (tmp_path / f"f10_{dtype}.py").write_text(
        f"import torch\nfrom bnkit.torch.zoo import VGGBN\n\ndef make():\n    return VGGBN().to(torch.{dtype})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(app, ["fold", "--model", f"f10_{dtype}:make", "--weights", str(weights),
                                 "--input-shape", "2x1x8x8", "-o", str(tmp_path / "f.pt")])
    assert (result.exit_code == 0) is accepted and (tmp_path / "f.pt").exists() is accepted, result.output


def rel_of(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


def test_fold_to_onnx_export_refusal_names_the_force_option(tmp_path, monkeypatch):
    import bnkit.torch.export
    from bnkit.torch import save_state_dict_file

    def refuse(*args, **kwargs):  # export_onnx's own refusal text, in its Python words
        raise bnkit.torch.export.ExportVerificationError(
            "the exported graph has error-level findings; nothing written (force=True writes it anyway)")

    monkeypatch.setattr(bnkit.torch.export, "export_onnx", refuse)
    weights = save_state_dict_file(_calibrated_vgg().state_dict(), tmp_path / "w.pt")
    result = runner.invoke(app, ["fold", "--model", "bnkit.torch.zoo:VGGBN", "--weights", str(weights),
                                 "--input-shape", "2x1x8x8", "-o", str(tmp_path / "f.onnx")], terminal_width=200)
    assert result.exit_code == 1 and "(--force writes it anyway)" in _text(result), result.output


@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_a_model_that_fails_on_the_random_input_is_a_message_and_nothing_is_written(tmp_path, monkeypatch, suffix):
    """The user's model raising TypeError/AssertionError went past the CLI as a traceback; so did an input
    shape too big to allocate."""
    (tmp_path / "f5_cli_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for factory, says in (("two_inputs", "TypeError: TwoInputs.forward() missing 1 required"),
                          ("asserting", "AssertionError: built for batches of 7 (it runs the model on a random "
                                        "input of shape 4x3x6x6)")):
        args = ["fold", "--model", f"f5_cli_nets:{factory}", "--input-shape", "4x3x6x6", "-o", "out" + suffix]
        result = runner.invoke(app, args, terminal_width=300)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert f"folding f5_cli_nets:{factory} failed, nothing written: {says}" in _text(result)
    huge = ["fold", "--model", "f5_cli_nets:fixed", "--input-shape", "99999999x3x800x800", "-o", "out" + suffix]
    result = runner.invoke(app, huge, terminal_width=300)  # 768 TB: beyond any address space, refused at once
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "cannot make a random input of shape 99999999x3x800x800" in _text(result)
    assert [name for name in sorted(os.listdir(tmp_path)) if name != "__pycache__"] == ["f5_cli_nets.py"]


def test_fold_onnx_inputs_too_big_to_verify_on_are_a_message(tmp_path):
    src = _export(_calibrated_vgg(), tmp_path / "vgg.onnx")  # input (N, 1, 8, 8), N dynamic
    shape = "input=1000000000000x1x8x8"  # 512 TB of float64 random values: beyond any address space
    result = runner.invoke(app, ["fold", str(src), "-o", str(tmp_path / "out.onnx"), "--input-shape", shape],
                           terminal_width=300)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "not enough memory to verify" in _text(result) and "--no-verify" in _text(result)
    assert sorted(os.listdir(tmp_path)) == ["vgg.onnx"]


@pytest.mark.parametrize("verify", [True, False])
def test_fold_onnx_out_of_memory_on_the_model_does_not_blame_verification(tmp_path, monkeypatch, verify):
    """Memory short for the model's own tensors (not the random inputs): the advice was 'a smaller --input-shape, or
    --no-verify', with --no-verify given too."""
    import bnkit.onnx

    src = _export(_calibrated_vgg(), tmp_path / "vgg.onnx")

    def short_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 37.3 GiB for an array")

    monkeypatch.setattr(bnkit.onnx, "fold", short_of_memory)
    result = runner.invoke(app, ["fold", str(src), "-o", str(tmp_path / "out.onnx")] + ([] if verify else
                                                                                        ["--no-verify"]),
                           terminal_width=300)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"not enough memory to fold {src}: Unable to allocate 37.3 GiB" in _text(result)
    assert "verify" not in _text(result)
    assert sorted(os.listdir(tmp_path)) == ["vgg.onnx"]


def test_fold_input_shape_of_no_graph_input_names_the_inputs(files):
    import onnx

    inputs = [v.name for v in onnx.load(str(files / "m.onnx")).graph.input]
    line = one_line_error(run_cli("fold", "m.onnx", "-o", "out.onnx", "--input-shape", "nope=2x64"))
    assert "--input-shape" in line and "'nope'" in line and str(inputs) in line, line


SLOW_ONNX_SAVE = r'''
import sys, time, onnx
def slow_save(*a, **k):  # a big model on a slow disk: SIGTERM arrives while the file is written
    print("WRITING", file=sys.stderr, flush=True)
    time.sleep(60)
onnx.save = slow_save
sys.argv = ["bnkit", "fold", "--model", "bnkit.torch.zoo:MLP", "--input-shape", "4x64", "--force", "-o", "out.onnx"]
from bnkit.cli import main
main()
'''


def test_sigterm_while_fold_writes_an_onnx_file_exits_143_and_writes_nothing(tmp_path):
    """The guard that reports SystemExit from the user's model must not catch the exit SIGTERM raises during the
    write (the run would end 1 with "cannot export ...: SystemExit (it called sys.exit(143))"). README: exit status
    143 when SIGTERM comes during the write, and nothing left behind."""
    import signal

    import bnkit

    src = str(pathlib.Path(bnkit.__file__).resolve().parents[1])  # importable from tmp_path, installed or not
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200",
               PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", SLOW_ONNX_SAVE], cwd=tmp_path, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    for line in child.stderr:
        seen.append(line)
        if "WRITING" in line:
            child.send_signal(signal.SIGTERM)
            break
    _, rest = child.communicate(timeout=120)
    stderr = "".join(seen) + rest
    assert child.returncode == 143, stderr
    assert "SystemExit" not in stderr and "Traceback" not in stderr, stderr
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_a_fold_that_verification_shows_different_exits_one_and_writes_nothing(tmp_path, monkeypatch):
    """A forward that branches on whether the conv has a bias: the fold adds one, so the folded model differs on
    the --input-shape input; the library's FoldVerificationError is exit 1 here, nothing written."""
    (tmp_path / "branchy.py").write_text(
        "import torch\nfrom torch import nn\n\nclass Net(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.conv, self.bn = nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4)\n"
        "        self.bn.running_mean.fill_(0.5); self.bn.num_batches_tracked.fill_(10)\n"
        "    def forward(self, x):\n        y = self.bn(self.conv(x))\n"
        "        return y + 2.0 if self.conv.bias is None else y\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(app, ["fold", "--model", "branchy:Net", "--input-shape", "2x1x8x8", "-o",
                                 str(tmp_path / "f.pt")])
    assert result.exit_code == 1, result.output
    assert "differs from the original on a random input of the --input-shape" in _text(result)
    assert "--no-verify writes such a model anyway; nothing written" in _text(result)
    assert sorted(os.listdir(tmp_path)) == ["__pycache__", "branchy.py"] or sorted(os.listdir(tmp_path)) == [
        "branchy.py"]
