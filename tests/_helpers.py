"""Helpers several test folders use (``pythonpath = ["tests"]`` in pyproject.toml makes this importable)."""
from __future__ import annotations

from typing import Any


class WritesFile:
    """Pickles to ``open(target, "w")``: if a loader ever unpickles it, the file appears."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.target, "w"))


def calibrated(model, x, seed: int = 0, *, positive: bool = False):
    """Real running statistics from three training-mode batches near ``x``, random affine parameters, eval().

    Weights ``1 + 0.5 * N(0, 1)`` (some negative: folds must handle sign flips), or with
    ``positive`` ``0.5 + U(0, 1)`` (away from 0: no dead channels for audits to report);
    biases ``0.5 * N(0, 1)``.
    """
    import torch

    from bnkit.torch import bn_layers

    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.5 * torch.randn(x.shape, generator=g))
        for _, bn in bn_layers(model):
            if positive:
                bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=g))
            else:
                bn.weight.copy_(1 + 0.5 * torch.randn(bn.weight.shape, generator=g))
            bn.bias.copy_(0.5 * torch.randn(bn.bias.shape, generator=g))
    return model.eval()


def ort_run(model, feeds: dict) -> list:
    """onnxruntime on CPU with graph optimizations off: the graph exactly as written."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def rel(a, b) -> float:
    """``max |a - b| / max |b|`` in float64."""
    import numpy as np

    return float(np.abs(np.float64(a) - b).max() / np.abs(np.float64(b)).max())


def set_running_stats(bn, mean, var, count: int = 1000) -> None:
    """Give ``bn`` the running statistics ``mean`` and ``var`` (anything ``torch.as_tensor`` takes, broadcast over
    the channels) as after ``count`` training steps."""
    import torch

    with torch.no_grad():
        bn.running_mean.copy_(torch.as_tensor(mean))
        bn.running_var.copy_(torch.as_tensor(var))
        bn.num_batches_tracked.fill_(count)


def eval_takes_eps_0() -> bool:
    """Whether this PyTorch's eval-mode ``batch_norm`` takes ``eps=0`` (2.13 does; 2.11 refuses it)."""
    import torch
    from torch.nn import functional as F

    try:
        F.batch_norm(torch.ones(2, 1), torch.zeros(1), torch.ones(1), eps=0.0)
    except (RuntimeError, ValueError):
        return False
    return True


def stand_in_pass(bn, *inputs):
    """``bn`` on each input with the audit's batch-statistics stand-in attached (no grad), then detached.

    Returns the outputs and the :class:`bnkit.torch.audit_moments.Collector` that kept the moments.
    """
    import torch

    from bnkit.torch.audit_moments import Collector

    col = Collector(bn)
    undo = col.attach(bn)
    try:
        with torch.no_grad():
            outs = [bn(x) for x in inputs]
    finally:
        undo()
    return outs, col


def without_bias_option(monkeypatch) -> None:
    """Make ``nn.BatchNorm*d`` refuse a ``bias`` argument, as PyTorch releases before that option do (2.11)."""
    from torch.nn.modules import batchnorm

    init = batchnorm._BatchNorm.__init__

    def old_init(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, **kw):
        if kw:
            raise TypeError(f"__init__() got an unexpected keyword argument {next(iter(kw))!r}")
        init(self, num_features, eps, momentum, affine, track_running_stats, device, dtype)

    monkeypatch.setattr(batchnorm._BatchNorm, "__init__", old_init)


def arithmetic_bn_class():
    """A masked BatchNorm1d subclass with its own arithmetic, as some sequence models write it: it never calls
    F.batch_norm, normalizing the real positions of an ``(N, C, L)`` input given a ``(N, L)`` mask."""
    import torch
    from torch import nn

    class ArithmeticBN(nn.BatchNorm1d):
        def forward(self, x, mask):
            if self.training:
                sel = x.transpose(1, 2)[mask]
                mean, var = sel.mean(0), sel.var(0, unbiased=False)
                with torch.no_grad():
                    n = sel.shape[0]
                    self.running_mean.lerp_(mean, self.momentum)
                    self.running_var.lerp_(var * n / (n - 1), self.momentum)
                    self.num_batches_tracked += 1
            else:
                mean, var = self.running_mean, self.running_var
            y = (x - mean[:, None]) / torch.sqrt(var[:, None] + self.eps) * self.weight[:, None] + self.bias[:, None]
            return y * mask[:, None, :]

    return ArithmeticBN


def gru_last_state_bn():
    """A GRU(4 -> 6) fed a PackedSequence, BatchNorm1d on its last hidden state: one row a sequence."""
    from torch import nn

    class GruLastStateBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.bn = nn.GRU(4, 6), nn.BatchNorm1d(6)

        def forward(self, packed):
            return self.bn(self.rnn(packed)[1][-1])

    return GruLastStateBN()


def linear_bn_state_dict():
    """The state dict of ``Linear(8, 4) -> BatchNorm1d(4)`` (seed 0): a small checkpoint to save, cut and damage."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    return net.state_dict()


def bnkit_env(*first, **extra: str) -> dict[str, str]:
    """The environment for a subprocess that imports the very bnkit this test imported (the folders ``first`` before
    it on PYTHONPATH), with one OpenMP thread and the variables ``extra``."""
    import os
    from pathlib import Path

    import bnkit

    src = str(Path(bnkit.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*map(str, first), src, *rest])
    return env


def ort_exit_code(model, folder) -> int:
    """The exit status of a child process that loads ``model`` (saved in ``folder``) into onnxruntime and runs it on
    zeros shaped as its declared inputs: 0 if it ran, 1 if onnxruntime refused it, negative if it crashed (a
    segmentation fault would take the test process with it)."""
    import subprocess
    import sys
    from pathlib import Path

    import onnx

    path = Path(folder) / "ort_child.onnx"
    onnx.save(model, path)
    code = ("import sys, numpy as np, onnxruntime as ort\n"
            f"s = ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])\n"
            "s.run(None, {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)"
            " for i in s.get_inputs()})\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode


def file_mode(path) -> int:
    """The permission bits of ``path`` (``os.stat``)."""
    import os
    import stat

    return stat.S_IMODE(os.stat(path).st_mode)


#: ``python -c BNKIT_MAIN ARGS`` runs ``bnkit ARGS`` through the console script's entry point, in a fresh interpreter
BNKIT_MAIN = "import sys; sys.argv = ['bnkit'] + sys.argv[1:]; from bnkit.cli import main; main()"


def run_cli(*args: object):
    """``bnkit ARGS`` in process (typer's CliRunner), each argument passed as ``str``, at 240 columns."""
    from typer.testing import CliRunner

    from bnkit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "240"})


def one_line_error(result, code: int = 2) -> str:
    """The error line of a run that failed cleanly: ``code``, no exception of its own, one line on the output."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def shift_figures(values, bn):
    """float64 per-channel (KL, z, log variance ratio) of rows ``values`` (K, C) against ``bn``'s running
    statistics, as bnkit.torch.audit defines them (unbiased data variance)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    mu, var = v.mean(0), v.var(0, ddof=1)
    mr, vr, eps = bn.running_mean.double().numpy(), bn.running_var.double().numpy(), float(bn.eps)
    z = (mu - mr) / np.sqrt(vr + eps)
    lr = np.log((var + eps) / (vr + eps))
    return 0.5 * (np.expm1(lr) - lr + z * z), z, lr


def assert_shift(s, kl, z, lr, count):
    """The audit's shift row ``s`` against :func:`shift_figures` (``kl, z, lr``) of the ``count`` rows it saw."""
    import math

    import numpy as np
    import pytest

    worst = int(np.argmax(kl))
    assert s.worst_channel == worst
    assert s.score == pytest.approx(kl.mean(), rel=1e-5)
    assert s.z_eq == pytest.approx(math.sqrt(2 * kl.mean()), rel=1e-5)
    assert s.mean_shift == pytest.approx(z[worst], rel=1e-4, abs=1e-5)
    assert s.log_var_ratio == pytest.approx(lr[worst], rel=1e-4, abs=1e-5)
    assert s.count == count


def value_info(name, shape, elem=None):
    """An ONNX ValueInfoProto: ``name``, ``shape``, element type ``elem`` (default float)."""
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT if elem is None else elem, shape)


def bn_initializers(prefix: str, c: int, rng, var=None) -> list:
    """The float32 initializers ``{prefix}s, b, m, v`` (scale, bias, mean, variance) of a BatchNormalization over
    ``c`` channels, drawn from ``rng`` (variance ``var`` when given)."""
    import numpy as np
    from onnx import numpy_helper

    var = rng.uniform(0.5, 2.0, c) if var is None else np.asarray(var)
    return [numpy_helper.from_array(a.astype(np.float32), prefix + k) for a, k in
            ((rng.uniform(0.5, 1.5, c), "s"), (rng.uniform(-1, 1, c), "b"), (rng.uniform(-1, 1, c), "m"), (var, "v"))]


def bn_node(x: str, y: str, prefix: str, **attrs):
    """A BatchNormalization node ``{prefix}bn`` from ``x`` to ``y`` reading the initializers of
    :func:`bn_initializers`."""
    from onnx import helper

    return helper.make_node("BatchNormalization", [x] + [prefix + k for k in "sbmv"], [y], name=prefix + "bn", **attrs)


def conv_bn_model(batch_dim):
    """Opset 13 Conv(2 -> 4, 3x3) + BatchNormalization ``abn`` on an (batch_dim, 2, 6, 6) input ``x``."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y", "a")], "g",
                              [value_info("x", [batch_dim, 2, 6, 6])], [value_info("y", [batch_dim, 4, 4, 4])],
                              [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "W")]
                              + bn_initializers("a", 4, rng))
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13)])


def strict_json(text: str):
    """``json.loads`` that refuses NaN and Infinity (which the JSON standard has not)."""
    import json

    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)
