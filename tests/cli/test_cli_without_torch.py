"""The command line without torch (the base install), run as a user would, in a subprocess of the bnkit under test:
the commands that need torch exit 2 with the line to install the extra and no traceback, while ``bnkit audit
x.onnx`` (or an ONNX model named otherwise) still works.

torch is hidden by a ``sitecustomize.py`` first on PYTHONPATH that sets ``sys.modules["torch"] = None``: ``import
torch`` then raises ModuleNotFoundError and ``importlib.util.find_spec("torch")`` returns None, as when torch is not
installed (a stand-in torch package would be found by find_spec, and a meta path finder cannot make it return None).

Oracles: the exit status and output of each run; the audit's JSON read back with json.loads and compared with the
graph's own BatchNormalization nodes; the folder's files (nothing written).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from _helpers import BNKIT_MAIN, bnkit_env


NO_TORCH_RUN = ("import importlib.util, sys; assert importlib.util.find_spec('torch') is None, 'torch not hidden'; "
                + BNKIT_MAIN)


# the command line without torch
@pytest.fixture
def no_torch(tmp_path):
    """Run ``bnkit ARGS`` in tmp_path with torch hidden: (returncode, stdout, stderr)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text('import sys\nsys.modules["torch"] = None  # as if not installed\n')
    env = bnkit_env(shim, COLUMNS="240")

    def run(*args: str):
        result = subprocess.run([sys.executable, "-c", NO_TORCH_RUN, *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        return result.returncode, result.stdout, result.stderr

    return run


def test_the_shim_hides_torch_from_import_and_find_spec(tmp_path, no_torch):
    code, out, err = no_torch("--help")
    assert code == 0, err
    shim_env = bnkit_env(tmp_path / "shim", COLUMNS="240")
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=shim_env, capture_output=True, text=True,
                           timeout=60)
    assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr


def assert_install_hint(code: int, out: str, err: str, extra: str) -> None:
    text = (out + err).replace("\n", " ")
    assert code == 2, out + err
    assert "Traceback" not in text, text
    assert f"pip install 'bnkit[{extra}]'" in text, text


def test_audit_of_a_checkpoint_without_torch_says_what_to_install(tmp_path, no_torch):
    (tmp_path / "x.pt").write_bytes(b"not read: the command stops first")
    assert_install_hint(*no_torch("audit", "x.pt"), extra="torch")


def test_audit_with_a_device_without_torch_says_what_to_install(tmp_path, no_torch):
    """--device is parsed (importing torch) only after the check."""
    (tmp_path / "x.pt").write_bytes(b"not read: the command stops first")
    assert_install_hint(*no_torch("audit", "x.pt", "--model", "bnkit.torch.zoo:MLP", "--device", "cpu"),
                        extra="torch")


def test_recalibrate_without_torch_says_what_to_install(tmp_path, no_torch):
    (tmp_path / "w.pt").write_bytes(b"w")
    np.save(tmp_path / "x.npy", np.zeros((4, 64), np.float32))
    assert_install_hint(*no_torch("recalibrate", "--model", "bnkit.torch.zoo:MLP", "--weights", "w.pt",
                                  "--data", "x.npy", "-o", "out.safetensors"), extra="torch")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("output", ["folded.pt", "folded.onnx"])
def test_fold_of_a_model_without_torch_says_what_to_install(tmp_path, no_torch, output):
    assert_install_hint(*no_torch("fold", "--model", "bnkit.torch.zoo:MLP", "--input-shape", "2x64", "-o", output),
                        extra="all")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shim"]


def test_demo_without_torch_says_what_to_install(tmp_path, no_torch):
    assert_install_hint(*no_torch("demo", "--quick", "--out", "report"), extra="all")
    assert not (tmp_path / "report").exists()


def test_study_without_torch_says_what_to_install(tmp_path, no_torch):
    assert_install_hint(*no_torch("study", "running-stats", "--size", "quick", "--out", "report"), extra="all")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("name", ["x.onnx", "model.pb"])  # a .pb is told ONNX by its first bytes, not by torch
def test_audit_of_an_onnx_file_works_without_torch(tmp_path, no_torch, name):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in [
        (rng.standard_normal((4, 3, 3, 3)), "W"), (rng.standard_normal(4), "b"),
        (rng.uniform(0.5, 1.5, 4), "scale"), (rng.standard_normal(4), "B"),
        (rng.standard_normal(4), "mean"), (rng.uniform(0.5, 2.0, 4), "var")]]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W", "b"], ["h"], name="conv"),
         helper.make_node("BatchNormalization", ["h", "scale", "B", "mean", "var"], ["Y"], name="the_bn")],
        "small", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4, 6, 6])], inits)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / name)

    code, out, err = no_torch("audit", name, "--json")
    assert code == 0 and "Traceback" not in err, out + err
    report = json.loads(out)
    assert report["depth"] == "onnx" and report["ok"] is True
    assert report["layers"] == [n.name for n in graph.node if n.op_type == "BatchNormalization"]


def test_a_torch_that_is_installed_but_fails_to_import_is_one_line_not_a_traceback(tmp_path):
    """find_spec found the broken package, so the command went on to import it and died with a traceback (exit 1,
    the status of findings)."""
    shim = tmp_path / "broken" / "torch"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("libtorch_cpu.so: cannot open shared object file")\n')
    (tmp_path / "x.pt").write_bytes(b"not read: the command stops first")
    result = subprocess.run([sys.executable, "-c", BNKIT_MAIN, "audit", "x.pt"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=bnkit_env(tmp_path / "broken", COLUMNS="240"))
    text = (result.stdout + result.stderr).replace("\n", " ")
    assert result.returncode == 2 and "Traceback" not in text, text
    assert "torch, which is installed but cannot be imported (ImportError: libtorch_cpu.so" in text, text
