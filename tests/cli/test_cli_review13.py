"""Review 13 (RB), the command line on users' files, run in process with typer's CliRunner.

* an input path the OS cannot look up (a folder the user may not enter: EACCES; a name over 255 bytes:
  ENAMETOOLONG) is one line naming the path and ``os.strerror``'s reason, exit 2, as outputs already were;
* SystemExit from the user's code (factories, the model's forward, --forward) is reported like its other exceptions
  (exit 2, one line naming sys.exit), not taken as the command's own exit (status 0, nothing written, no report);
  KeyboardInterrupt still interrupts;
* ``bnkit fold --json`` and ``bnkit audit --json`` print a file name that is not UTF-8 as JSON can hold it (escaped),
  not as raw bytes; read back with json.loads, compared with os.fsdecode;
* ``recalibrate --data-key`` for data without named arrays (.npy, one tensor, an (x, y) tuple) is refused, exit 2,
  as a name the .npz lacks is, not ignored; with named arrays it picks the one recalibrated on (oracle: PyTorch's
  BatchNorm in float64 over that array);
* ``bnkit audit`` words its fixes in its options (``--forward``, new, as recalibrate's; ``--train-batch-size``), not
  in Python arguments; ``bnkit fold x.onnx --input-shape`` with a wrong name names the graph's inputs (oracle: onnx).
"""
from __future__ import annotations

import errno
import os
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from bnkit.cli import app

torch = pytest.importorskip("torch")

runner = CliRunner()
MLP = "bnkit.torch.zoo:MLP"


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "240"})


def one_line_error(result, code: int = 2) -> str:
    """The error line of a run that failed cleanly: ``code``, no exception of its own, one line on the output."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A state dict of MLP, inputs for it and its ONNX export, in tmp_path (the current folder)."""
    from bnkit.torch import export_onnx, save_state_dict_file
    from bnkit.torch.zoo import MLP as Net

    torch.manual_seed(0)
    net = Net()
    save_state_dict_file(net.state_dict(), tmp_path / "w.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32))
    export_onnx(net.eval(), torch.randn(4, 64), tmp_path / "m.onnx", force=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------------------------------------------
# inputs that cannot be looked up
# ----------------------------------------------------------------------------------------------------------------
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
    line = one_line_error(invoke(*args))
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
    line = one_line_error(invoke(*args))
    assert target in line and line.endswith(os.strerror(errno.EACCES)), line
    assert not list(files.glob("out*")), "nothing is written"


# ----------------------------------------------------------------------------------------------------------------
# sys.exit() in the user's code
# ----------------------------------------------------------------------------------------------------------------
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
def user_module(files, monkeypatch):
    """``write(name, source)``: a module in the files' folder, importable as a --model/--data/--forward target;
    unloaded afterwards."""
    names = []

    def write(name: str, source: str):
        (files / f"{name}.py").write_text(source)
        monkeypatch.delitem(sys.modules, name, raising=False)
        names.append(name)
        return files

    yield write
    for name in names:
        sys.modules.pop(name, None)


@pytest.fixture
def exiting(user_module):
    return user_module("r13_exiting", EXITING)


RECAL = ["recalibrate", "--no-progress", "-o", "out.pt"]


@pytest.mark.parametrize("args, call", [
    (RECAL + ["--model", "r13_exiting:make_exit", "--data", "x.npy"], "sys.exit()"),
    (RECAL + ["--model", "r13_exiting:make", "--data", "r13_exiting:data_exit"], "sys.exit()"),
    (RECAL + ["--model", "r13_exiting:net_exit", "--data", "x.npy"], "sys.exit(3)"),
    (RECAL + ["--model", "r13_exiting:make", "--data", "x.npy", "--forward", "r13_exiting:forward_exit"],
     "sys.exit('bye')"),
    (["audit", "w.pt", "--model", "r13_exiting:make_exit", "--json"], "sys.exit()"),
    (["audit", "w.pt", "--model", "r13_exiting:net_exit", "--data", "x.npy", "--json"], "sys.exit(3)"),
    (["audit", "w.pt", "--model", "r13_exiting:make", "--data", "x.npy", "--forward", "r13_exiting:forward_exit"],
     "the model or --forward 'r13_exiting:forward_exit' raised SystemExit (it called sys.exit('bye')"),
    (["fold", "--model", "r13_exiting:make_exit", "-o", "out.pt"], "sys.exit()"),
    (["fold", "--model", "r13_exiting:net_exit", "--force", "--input-shape", "2x64", "-o", "out.pt"], "sys.exit(3)"),
])
def test_sys_exit_in_user_code_is_an_error(exiting, args, call):
    result = invoke(*args)
    line = one_line_error(result)
    assert "SystemExit" in line and call in line, line
    assert not list(exiting.glob("out*")), "nothing is written"


def test_keyboard_interrupt_in_user_code_still_interrupts(exiting):
    """typer ends the command on KeyboardInterrupt (status 130, click's Abort 1): no error line of bnkit's."""
    result = invoke(*RECAL, "--model", "r13_exiting:make_interrupt", "--data", "x.npy")
    assert result.exit_code in (1, 130) and "error:" not in result.output, (result.exit_code, result.output)


# ----------------------------------------------------------------------------------------------------------------
# --json with a file name that is not UTF-8
# ----------------------------------------------------------------------------------------------------------------
RUN = "import sys; sys.argv = ['bnkit'] + sys.argv[1:]; from bnkit.cli import main; main()"


@pytest.mark.parametrize("command", ["fold", "audit"])
def test_json_of_a_name_that_is_not_utf8_is_valid(files, command):
    """Run as a user would (a subprocess: its stdout is bytes, as a shell's pipe), the name given as bytes."""
    import bnkit

    source, output = b"src\xff.onnx", b"out\xff.onnx"
    os.rename(files / "m.onnx", os.fsdecode(source))
    args = [source, b"-o", output] if command == "fold" else [source]
    src = str(pathlib.Path(bnkit.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", RUN, command, *args, b"--json"], cwd=files, env=env,
                          capture_output=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr.decode(errors="replace")  # audit: 1 when a finding is an error
    report = json.loads(done.stdout)  # bytes: json detects UTF-8/16/32, and raw 0xff is none of them
    if command == "fold":
        assert report["output"] == os.fsdecode(output)
    else:
        assert report["target"] == os.fsdecode(source)


# ----------------------------------------------------------------------------------------------------------------
# recalibrate --data-key
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, save", [
    ("d.npy", lambda x, p: np.save(p, x)),
    ("one.pt", lambda x, p: torch.save(torch.from_numpy(x), p)),
    ("xy.pt", lambda x, p: torch.save((torch.from_numpy(x), torch.zeros(len(x))), p)),
])
def test_data_key_for_data_without_names_is_refused(files, name, save):
    save(np.load("x.npy"), files / name)
    line = one_line_error(invoke(*RECAL, "--model", MLP, "--data", name, "--data-key", "labels"))
    assert "--data-key 'labels'" in line and name in line, line
    assert not (files / "out.pt").exists()


def test_data_key_for_a_data_factory_is_refused(files, user_module):
    """Review R3: a factory's result is used as it is, so --data-key did nothing (exit 0, the key unused)."""
    user_module("r13_data", "import numpy as np\ndef make(): return np.load('x.npy')\n")
    line = one_line_error(invoke(*RECAL, "--model", MLP, "--data", "r13_data:make", "--data-key", "labels"))
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
    result = invoke(*RECAL, "--model", MLP, "--weights", "w.pt", "--data", name, "--data-key", "mine",
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


# ----------------------------------------------------------------------------------------------------------------
# audit's advice in its options; fold's --input-shape names
# ----------------------------------------------------------------------------------------------------------------
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
    return user_module("r13_pooled", POOLED)


def test_audit_fixes_name_its_options(pooled):
    result = invoke("audit", "w.pt", "--model", "r13_pooled:make", "--data", "x.npy", "--json")
    assert result.exit_code in (0, 1), result.output  # 1: the fresh weights' statistics were never updated
    report = json.loads(result.output)
    texts = [f[k] for f in report["findings"] for k in ("finding", "evidence", "fix")]
    assert not [t for t in texts if "forward=" in t or "train_batch_size=" in t], texts
    coupling = next(f for f in report["findings"] if f["finding"] == "batch coupling not checked")
    assert "--forward package.module:fn" in coupling["fix"], coupling
    assert report["batch_coupling"] is None
    assert "--forward" in invoke("audit", "--help").output


def test_audit_forward_option_feeds_the_model(pooled):
    """With the outputs before the pooling, eval-mode MLP is per sample: batch size 1 and the whole batch agree."""
    result = invoke("audit", "w.pt", "--model", "r13_pooled:make", "--data", "x.npy", "--forward",
                    "r13_pooled:per_sample", "--json")
    assert result.exit_code in (0, 1), result.output  # 1: the fresh weights' statistics were never updated
    report = json.loads(result.output)
    assert report["batch_coupling"] is not None and report["batch_coupling"] < 1e-5, report["batch_coupling"]


@pytest.mark.parametrize("args, words", [
    (["audit", "w.pt", "--model", "r13_pooled:make", "--forward", "r13_pooled:per_sample"], "--forward needs --data"),
    (["audit", "m.onnx", "--forward", "r13_pooled:per_sample"], "--forward and --device apply to PyTorch"),
    (["audit", "w.pt", "--model", "r13_pooled:make", "--data", "x.npy", "--forward", "r13_pooled:POOLED_NOT"],
     "cannot import --forward"),
])
def test_audit_forward_misuse_is_refused(pooled, args, words):
    assert words in one_line_error(invoke(*args))


def test_audit_train_batch_size_advice_names_the_option():
    from bnkit.cli.audit import _cli_words

    assert _cli_words("pass train_batch_size=") == "pass --train-batch-size"


def test_fold_input_shape_of_no_graph_input_names_the_inputs(files):
    import onnx

    inputs = [v.name for v in onnx.load(str(files / "m.onnx")).graph.input]
    line = one_line_error(invoke("fold", "m.onnx", "-o", "out.onnx", "--input-shape", "nope=2x64"))
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
    """Review R3: the guard that reports SystemExit from the user's model caught the exit SIGTERM raises during the
    write, so the run ended 1 with "cannot export ...: SystemExit (it called sys.exit(143))". README: exit status
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


def test_symbolic_link_loops_are_one_line_as_input_and_replaced_as_output(files):
    """Review R3: an output path that is a link to itself crashed (RuntimeError: Symlink loop, exit 1); as an input
    it was "no such file". As an output it names no file, so the link is replaced by the written file."""
    os.symlink("loop.pt", files / "loop.pt")
    result = invoke(*RECAL[:-1], "loop.pt", "--model", MLP, "--weights", "w.pt", "--data", "x.npy")
    assert result.exit_code == 0, result.output
    assert (files / "loop.pt").is_file() and not (files / "loop.pt").is_symlink()
    os.symlink("loopx.npy", files / "loopx.npy")
    line = one_line_error(invoke("audit", "w.pt", "--model", MLP, "--data", "loopx.npy"))
    assert "loopx.npy" in line and "symbolic link" in line, line


def test_a_damaged_data_file_is_told_the_data_formats(files):
    """Review R6: a damaged --data .pt got the checkpoint's advice ("expected a state dict ...")."""
    torch.save({"x": torch.from_numpy(np.load("x.npy"))}, files / "d.pt")
    data = bytearray((files / "d.pt").read_bytes())
    data[-200] ^= 0x40  # in the central directory or a storage: damage either way
    (files / "d.pt").write_bytes(bytes(data))
    line = one_line_error(invoke(*RECAL, "--model", MLP, "--data", "d.pt"))
    assert "damaged" in line and ".npy, .npz, .safetensors" in line and "state dict" not in line, line


def test_audit_names_forward_when_the_model_or_forward_fails(files, user_module):
    """Review R7: a --forward that raised was reported as the model's failure."""
    user_module("r13_feed", "def feed_one(batch):\n    return batch\n")
    line = one_line_error(invoke("audit", "w.pt", "--model", MLP, "--data", "x.npy", "--forward", "r13_feed:feed_one"))
    assert "the model or --forward" in line and "feed_one()" in line and "forward=" not in line, line
