"""The command line when the reader of its output goes away (``bnkit audit model.pt | head -1``).

Oracle: the same command with its output read to the end: its exit status and the files it writes.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch
from _helpers import BNKIT_MAIN, bnkit_env

from bnkit.torch.io import save_state_dict_file


def _run_reader_gone(args, cwd):
    """``bnkit ARGS`` whose standard output is a pipe closed before it writes anything."""
    child = subprocess.Popen([sys.executable, "-c", BNKIT_MAIN, *map(str, args)], cwd=cwd, env=bnkit_env(COLUMNS="120"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    err = child.stderr.read().decode()
    return child.wait(timeout=300), err


def _run_read(args, cwd):
    done = subprocess.run([sys.executable, "-c", BNKIT_MAIN, *map(str, args)], cwd=cwd, env=bnkit_env(COLUMNS="120"),
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout


def _trained_bn_state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(16, 4))
    return model.state_dict()


def test_a_closed_reader_leaves_each_command_its_own_exit_status(tmp_path):
    clean = save_state_dict_file(_trained_bn_state(0), tmp_path / "clean.pt")
    state = _trained_bn_state(1)
    state["1.running_var"][0] = float("nan")
    poisoned = save_state_dict_file(state, tmp_path / "nan.pt")
    statuses = []
    for args in (["audit", clean], ["audit", poisoned], ["ema", "4.2", "--fill", "4", "--steps", "300", "--show", "all"]):
        statuses.append(_run_read(args, tmp_path)[0])
        assert _run_reader_gone(args, tmp_path) == (statuses[-1], ""), args  # typer's broken-pipe exit: 1, silently
    assert statuses == [0, 1, 0]  # no finding, an error finding (NaN running_var), a table


def test_a_closed_reader_does_not_stop_a_file_being_written(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
    (tmp_path / "nets.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))\n")
    weights = save_state_dict_file(model.state_dict(), tmp_path / "w.pt")
    data = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    np.save(tmp_path / "data.npy", data)
    args = ["recalibrate", "--model", "nets:make", "--weights", weights, "--data", tmp_path / "data.npy",
            "-o", tmp_path / "out.pt", "--no-progress"]
    assert _run_reader_gone(args, tmp_path) == (0, "")
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        h = model[0](torch.from_numpy(data)).double()
    torch.testing.assert_close(got["1.running_mean"].double(), h.mean(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("who", ["model", "bnkit"])
def test_a_closed_reader_of_stderr_does_not_fail_an_audit(tmp_path, who):
    """Review: with stderr's reader gone, the audit exited 1 and wrote no report when the user's model printed (its
    prints went to stderr unguarded) or when bnkit printed a note there (rich's broken-pipe handler exits 1). Oracle:
    the same audit with both streams read to the end."""
    (tmp_path / "loud.py").write_text(
        "import torch\n\ndef make():\n    for i in range(200000):\n        print('line', i)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))\n\n"
        "def quiet():\n    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))\n")
    state = _trained_bn_state(0)
    if who == "bnkit":  # float64 weights into a float32 model: bnkit notes the cast on stderr
        state = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    weights = save_state_dict_file(state, tmp_path / "w.pt")
    args = ["audit", weights, "--model", "loud:make" if who == "model" else "loud:quiet", "--json"]
    status, report = _run_read(args, tmp_path)
    with open(tmp_path / "report.json", "wb") as out:
        child = subprocess.Popen([sys.executable, "-c", BNKIT_MAIN, *map(str, args)], cwd=tmp_path,
                                 env=bnkit_env(COLUMNS="120"), stdout=out, stderr=subprocess.PIPE)
        child.stderr.close()
        assert child.wait(timeout=300) == status == 0
    assert (tmp_path / "report.json").read_text() == report and report.lstrip().startswith("{")
