"""Review 12 (commits 9f34f0c and 634fc17): the fixes, each checked against an independent oracle.

* fold_bn / revert_sync_bn on models with the old-style ``nn.utils.weight_norm`` / ``spectral_norm`` hooks, whose
  computed weight (a non-leaf tensor kept as a plain attribute) ``copy.deepcopy`` refuses: PyTorch's own eval
  output of the untouched original is the oracle;
* fold_bn keeps each parameter's ``requires_grad``: the original layers' flags are the oracle;
* export_onnx refuses uninitialized lazy modules before running anything (the model stays lazy);
* ONNX fold of Linear -> BatchNorm1d on (N, C, L), and an Add constant that does not line up with the channels:
  PyTorch eval / a float64 NumPy recomputation, against onnxruntime on the written file;
* convert_bn(renorm/debias) names the track_running_stats=False layers and changes nothing;
* atomic writes give a new file open()'s mode (a file open() makes in the same process is the oracle);
* convert_momentum round trips, as README states them: exact when m and 1 - m both have at most 15 significant
  digits; a float32 attribute comes back as the same float32.
"""
from __future__ import annotations

import copy
import os
import stat
import subprocess
import sys
import warnings
from collections import OrderedDict
from decimal import Decimal, localcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import calibrated, ort_run, rel
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy

import bnkit
from bnkit.torch import BatchNorm2d as DropInBatchNorm2d
from bnkit.torch import convert_bn, export_onnx, fold_bn, revert_sync_bn, save_state_dict_file

HOOKS = {"weight_norm": nn.utils.weight_norm, "spectral_norm": nn.utils.spectral_norm}
STATES = ["fresh", "after a training step", "after a no-grad forward"]


# ----------------------------------------------------------------------------------------------------------------
# 1. old-style weight_norm / spectral_norm hooks: fold_bn and revert_sync_bn copy such models
# ----------------------------------------------------------------------------------------------------------------
def hooked_model(hook: str, state: str, bn: type = nn.BatchNorm2d) -> tuple[nn.Module, torch.Tensor]:
    """``hook(Conv) -> BN -> ReLU -> Conv -> BN`` in eval mode, in ``state``; and an example input."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates the old-style weight_norm
        conv = HOOKS[hook](nn.Conv2d(3, 4, 3))
    model = nn.Sequential(conv, bn(4), nn.ReLU(), nn.Conv2d(4, 4, 3), bn(4))
    with torch.no_grad():
        for layer in (model[1], model[4]):
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
            layer.num_batches_tracked.fill_(100)
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    if state == "after a training step":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loss = model(torch.randn(8, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    if state == "after a no-grad forward":
        with torch.no_grad():
            model(x)
    return model, x


class Snapshot:
    """The model's state dict (cloned), and the hook's computed-weight attribute: the object and its values."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.types = [type(m) for m in model.modules()]
        self.weight = model[0].weight
        self.weight_value = model[0].weight.detach().clone()
        self.grad_fn = model[0].weight.grad_fn

    def assert_untouched(self) -> None:
        model = self.model
        assert [type(m) for m in model.modules()] == self.types
        state = model.state_dict()
        assert state.keys() == self.state.keys()
        for k, v in self.state.items():
            assert torch.equal(state[k], v), k
        assert model[0].weight is self.weight
        assert torch.equal(model[0].weight.detach(), self.weight_value)
        assert model[0].weight.grad_fn is self.grad_fn


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_fold_bn_copies_models_with_old_style_weight_hooks(hook, state):
    model, x = hooked_model(hook, state)
    snap = Snapshot(model)
    folded, report = fold_bn(model, x)
    snap.assert_untouched()

    # the BN after the plain conv is folded (gone from the copy), the one after the hooked conv left with a reason
    assert [(f.bn, f.into) for f in report.folded] == [("4", "3")]
    assert isinstance(folded[4], nn.Identity)
    assert set(report.left) == {"1"} and "'0'" in report.left["1"]
    assert type(folded[1]) is nn.BatchNorm2d
    assert folded[0] is not model[0] and folded[0]._forward_pre_hooks  # the copy keeps its own hook
    with torch.no_grad():
        expected = model(x)  # the original's own eval output (the hook recomputes its weight)
        got = folded(x)
    assert rel(got.numpy(), expected.numpy()) < 1e-5


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_revert_sync_bn_copies_models_with_old_style_weight_hooks(hook, state):
    model, x = hooked_model(hook, state, bn=nn.SyncBatchNorm)
    snap = Snapshot(model)
    plain = revert_sync_bn(model, x)
    snap.assert_untouched()

    assert type(plain[1]) is nn.BatchNorm2d and type(plain[4]) is nn.BatchNorm2d
    assert plain[0] is not model[0] and plain[0]._forward_pre_hooks
    with torch.no_grad():
        expected = model(x)
        got = plain(x)
    torch.testing.assert_close(got, expected)


def test_deep_copy_copies_a_non_leaf_tensor_attribute_detached_and_equal():
    from bnkit.torch.modules import deep_copy

    class Computed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.randn(5))
            self.scaled = self.p * 2  # a computed tensor kept as a plain attribute, as the old hooks do

    module = nn.Sequential(Computed())
    with pytest.raises(RuntimeError):
        copy.deepcopy(module)  # the reason deep_copy exists: PyTorch refuses this
    original = module[0].scaled
    copied = deep_copy(module)
    c = copied[0].scaled
    assert c is not original and c.grad_fn is None and not c.requires_grad
    assert torch.equal(c, original.detach())
    assert c.data_ptr() != original.data_ptr()  # its own storage
    assert isinstance(copied[0].p, nn.Parameter) and copied[0].p is not module[0].p
    assert torch.equal(copied[0].p, module[0].p)
    assert module[0].scaled is original and original.grad_fn is not None  # the original keeps its graph


# ----------------------------------------------------------------------------------------------------------------
# 2. fold_bn keeps each parameter's requires_grad
# ----------------------------------------------------------------------------------------------------------------
def after_and_before(bias: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """conv 0 <- BN 1 folded after it; BN 3 folded before conv 4 (a 1x1 conv: exact)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=bias), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 2, 1, bias=bias))
    x = torch.randn(8, 3, 8, 8)
    return calibrated(model, x), x


@pytest.mark.parametrize("weight_grad, bias_grad", [(False, True), (True, False)])
def test_fold_bn_keeps_each_parameters_requires_grad(weight_grad, bias_grad):
    model, x = after_and_before()
    for i in (0, 4):
        model[i].weight.requires_grad_(weight_grad)
        model[i].bias.requires_grad_(bias_grad)
    folded, report = fold_bn(model, x)
    assert sorted((f.bn, f.into, f.position) for f in report.folded) == [("1", "0", "after"), ("3", "4", "before")]
    for i in (0, 4):
        assert folded[i].weight.requires_grad is model[i].weight.requires_grad
        assert folded[i].bias.requires_grad is model[i].bias.requires_grad
    with torch.no_grad():
        assert rel(folded(x).numpy(), model(x).numpy()) < 1e-5


@pytest.mark.parametrize("weight_grad", [False, True])
def test_fold_bn_gives_an_added_bias_the_weights_requires_grad(weight_grad):
    model, x = after_and_before(bias=False)
    for i in (0, 4):
        model[i].weight.requires_grad_(weight_grad)
    folded, report = fold_bn(model, x)
    assert len(report.folded) == 2
    for i in (0, 4):
        assert model[i].bias is None
        assert isinstance(folded[i].bias, nn.Parameter)
        assert folded[i].bias.requires_grad is model[i].weight.requires_grad
    with torch.no_grad():
        assert rel(folded(x).numpy(), model(x).numpy()) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# 3. export_onnx refuses uninitialized lazy modules up front
# ----------------------------------------------------------------------------------------------------------------
def test_export_onnx_refuses_uninitialized_lazy_modules_and_leaves_the_model_lazy(tmp_path):
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        conv=nn.LazyConv2d(4, 3), norm=nn.LazyBatchNorm2d(), act=nn.ReLU(), flat=nn.Flatten(), head=nn.LazyLinear(2),
    )).eval()
    lazy = [n for n, m in model.named_modules() if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    assert lazy == ["conv", "norm", "head"]
    types = [type(m) for m in model.modules()]
    out = tmp_path / "lazy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as info:
            export_onnx(model, torch.randn(4, 3, 6, 6), out)
    message = str(info.value)
    assert "lazy" in message and all(name in message for name in lazy)
    assert [type(m) for m in model.modules()] == types  # still LazyConv2d/..., not materialized
    assert all(is_lazy(p) for p in model.parameters())
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# 4. ONNX: Linear -> BatchNorm1d on (N, C, L); an Add constant that does not line up with the channels
# ----------------------------------------------------------------------------------------------------------------
class LinearThenBN(nn.Module):
    """``BatchNorm1d(C)`` (channels on dim 1) after ``Linear(L, L)`` (on the last dim) of an (N, C, L) input."""

    def __init__(self, channels: int, length: int) -> None:
        super().__init__()
        self.fc = nn.Linear(length, length)
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x):
        return self.bn(self.fc(x))


def ncl_model(channels: int, length: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    model = LinearThenBN(channels, length)
    x = torch.randn(3, channels, length)
    return calibrated(model, x * 1.5 + 0.3), x


@pytest.mark.parametrize("channels, length", [(4, 6), (6, 6)])
def test_onnx_fold_leaves_a_batchnorm1d_after_a_linear_on_ncl(tmp_path, channels, length):
    pytest.importorskip("onnxruntime")
    import onnx

    from bnkit.onnx import fold

    model, x = ncl_model(channels, length)
    src, dst = tmp_path / "ncl.onnx", tmp_path / "ncl_folded.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), src, dynamo=False, input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    report = fold(src, dst)
    assert report.folded == []
    (bn_name, reason), = report.left.items()
    assert "3-D" in reason
    written = onnx.load(dst)
    assert [n.op_type for n in written.graph.node].count("BatchNormalization") == 1
    with torch.no_grad():
        expected = model(x).numpy()
    got, = ort_run(written, {"input": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_export_onnx_fold_leaves_a_batchnorm1d_after_a_linear_on_ncl(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    model, x = ncl_model(4, 6)
    out = tmp_path / "ncl.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_onnx(model, x, out, fold=True)
    assert report.fold is not None and report.fold.folded == []
    assert len(report.fold.left) == 1 and "3-D" in next(iter(report.fold.left.values()))
    written = onnx.load(out)
    with torch.no_grad():
        expected = model(x).numpy()
    got, = ort_run(written, {written.graph.input[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_onnx_fold_leaves_a_bn_whose_add_constant_does_not_line_up_with_its_channels(tmp_path):
    """A Conv's output channels are what an Add constant must broadcast with, so no valid Conv + Add graph has a
    constant that does not line up with the BN's channels. A MatMul of a 2-D input by a 3-D weight does:
    (5, 3) @ (2, 3, 4) -> (2, 5, 4), plus a (5, 4) constant, into a BN with 5 channels on axis 1. ONNX and
    onnxruntime accept it; the (5, 4) constant does not broadcast with the 5 channels as (5,)."""
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bnkit.onnx import fold

    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 3, 4)).astype(np.float32)
    c = rng.standard_normal((5, 4)).astype(np.float32)
    scale, bias = rng.uniform(0.5, 1.5, 5).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    mean, var = rng.standard_normal(5).astype(np.float32), rng.uniform(0.5, 2, 5).astype(np.float32)
    eps = 1e-5
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(w, "W"), (c, "C"), (scale, "scale"), (bias, "B"), (mean, "mean"), (var, "var")]]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["mm"], name="mm"),
         helper.make_node("Add", ["mm", "C"], ["added"], name="add"),
         helper.make_node("BatchNormalization", ["added", "scale", "B", "mean", "var"], ["Y"], name="bn",
                          epsilon=eps)],
        "misaligned", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [5, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 5, 4])], inits)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)  # a valid graph, shapes included
    src, dst = tmp_path / "misaligned.onnx", tmp_path / "folded.onnx"
    onnx.save(model, src)

    report = fold(src, dst)
    assert report.folded == []
    assert set(report.left) == {"bn"} and "does not line up" in report.left["bn"]

    x = rng.standard_normal((5, 3)).astype(np.float32)
    h = np.matmul(x.astype(np.float64), w.astype(np.float64)) + c  # (2, 5, 4)
    ch = (1, -1, 1)
    expected = ((h - mean.reshape(ch)) / np.sqrt(var.astype(np.float64).reshape(ch) + eps) * scale.reshape(ch)
                + bias.reshape(ch))
    got, = ort_run(onnx.load(dst), {"X": x})
    assert got.shape == (2, 5, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# 5. convert_bn(renorm/debias) with a track_running_stats=False layer
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["renorm", "debias"])
def test_convert_bn_names_the_layers_without_running_statistics_and_changes_nothing(option):
    model = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 3), stem_bn=nn.BatchNorm2d(4), act=nn.ReLU(),
        conv2=nn.Conv2d(4, 4, 3), head_bn=nn.BatchNorm2d(4, track_running_stats=False),
        conv3=nn.Conv2d(4, 4, 1), tail_bn=nn.BatchNorm2d(4),
    ))
    stateless = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and not m.track_running_stats]
    assert stateless == ["head_bn"]
    before = [(n, m) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        convert_bn(model, **{option: True})
    message = str(info.value)
    assert "head_bn" in message
    assert "stem_bn" not in message and "tail_bn" not in message
    after = [(n, m) for n, m in model.named_modules()]
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))  # the same module objects
    assert all(type(m) is nn.BatchNorm2d for n, m in after if n.endswith("_bn"))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("option", ["renorm", "debias"])
def test_drop_in_layer_without_running_statistics_names_its_layer(option):
    with pytest.raises(ValueError) as info:
        DropInBatchNorm2d(4, track_running_stats=False, layer_name="block3.head_bn", **{option: True})
    assert "block3.head_bn" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# 6. atomic writes: a new file gets open()'s mode, an existing file keeps its own
# ----------------------------------------------------------------------------------------------------------------
SAVE_WITH_UMASK = """
import os, sys
import torch
from bnkit.torch import save_state_dict_file
os.umask(0o027)  # open() then gives 0o640: neither the common 0o644 nor safetensors' own 0o600
folder = sys.argv[1]
with open(os.path.join(folder, "reference"), "w"):  # open()'s 0o666 & ~umask, the oracle
    pass
for name in sys.argv[2:]:
    save_state_dict_file(torch.nn.BatchNorm1d(3).state_dict(), os.path.join(folder, name))
"""


def bnkit_env() -> dict[str, str]:
    """The environment for a subprocess that imports the very bnkit this test imported."""
    src = str(Path(bnkit.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_state_dict_files_get_open_s_mode(tmp_path):
    names = ["new.safetensors", "new.pt"]
    subprocess.run([sys.executable, "-c", SAVE_WITH_UMASK, str(tmp_path), *names], env=bnkit_env(), check=True,
                   timeout=60)
    reference = mode(tmp_path / "reference")
    assert reference == 0o666 & ~0o027
    for name in names:
        assert oct(mode(tmp_path / name)) == oct(reference), name


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_an_existing_state_dict_file_keeps_its_mode(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    save_state_dict_file(nn.BatchNorm1d(3).state_dict(), path)
    assert mode(path) == 0o640
    assert path.read_bytes() != b"old"


# ----------------------------------------------------------------------------------------------------------------
# 8. convert_momentum round trips (README, Conversions)
# ----------------------------------------------------------------------------------------------------------------
PAIRS = [("torch", "keras"), ("keras", "torch"), ("torch", "onnx"), ("onnx", "torch"), ("torch", "flax")]


def round_trip(m: float, src: str, dst: str) -> float:
    return bnkit.convert_momentum(bnkit.convert_momentum(m, src, dst), dst, src)


def digits15(exponent_min: int):
    """Momenta written with at most 15 significant digits, between 10**exponent_min and 1."""
    def with_digits(d: int):  # d significant digits, scaled into [10**exponent_min, 1)
        return st.builds(lambda mant, exp: float(Decimal(mant).scaleb(exp)), st.integers(10 ** (d - 1), 10**d - 1),
                         st.integers(exponent_min - d + 1, -d))

    return st.integers(1, 15).flatmap(with_digits)


def significant_digits(m: float) -> int:
    return len(Decimal(repr(m)).normalize().as_tuple().digits)


@settings(max_examples=300, deadline=None)
@given(m=digits15(-1), pair=st.sampled_from(PAIRS))
@example(m=0.1, pair=("torch", "keras"))
@example(m=0.99, pair=("keras", "torch"))
@example(m=0.123456789012345, pair=("torch", "onnx"))
def test_momentum_round_trip_is_exact_up_to_15_significant_digits_from_0_1(m, pair):
    assert significant_digits(m) <= 15
    assert round_trip(m, *pair) == m


@settings(max_examples=300, deadline=None)
@given(m=digits15(-15), pair=st.sampled_from(PAIRS))
@example(m=4.99999999999995e-15, pair=("torch", "keras"))  # 1 - m has 29 significant digits: not claimed exact
def test_momentum_round_trip_is_exact_when_both_sides_have_up_to_15_significant_digits(m, pair):
    """What ``_complement``'s docstring says: exact whenever ``1 - m`` has at most 15 significant digits too."""
    with localcontext() as exact:
        exact.prec = 60  # the default 28 digits would round 1 - 4.99999999999995e-15 to 15 significant digits
        digits = len((Decimal(1) - Decimal(repr(m))).normalize().as_tuple().digits)
    if digits > 15:
        return
    assert round_trip(m, *pair) == m


def float32s(lo: float, hi: float):
    return st.floats(lo, hi, width=32).map(lambda v: float(np.float32(v)))


@settings(max_examples=300, deadline=None)
@given(m=float32s(0.5, 1.0), pair=st.sampled_from(PAIRS))
def test_float32_momentum_from_0_5_comes_back_within_one_ulp(m, pair):
    back = round_trip(m, *pair)
    assert back in (m, np.nextafter(m, 0.0), np.nextafter(m, 1.0))


@settings(max_examples=300, deadline=None)
@given(m=float32s(float(np.float32(1e-6)), 1.0), pair=st.sampled_from(PAIRS))
@example(m=float(np.float32(0.1)), pair=("onnx", "torch"))
@example(m=float(np.float32(0.01)), pair=("onnx", "torch"))
def test_float32_momentum_comes_back_the_same_float32(m, pair):
    """Written back as a float32 ONNX attribute, the round trip is exact."""
    assert np.float32(round_trip(m, *pair)) == np.float32(m)
