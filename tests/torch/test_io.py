"""bnkit.torch.io: what a file that is not a checkpoint is called, what an unsafe pickle is called (and a pickled
model whose class is gone), a dangling link, wrapper prefixes; a new state-dict file gets open()'s mode, an existing
one keeps its own; values load_state_dict would cast (integer codes into floats, a count of 6.7) are refused.
Legacy-format checkpoints: test_io_legacy.py; zip checkpoints with changed bytes: test_io_zip.py.

Oracles: files made here with numpy, onnx, zipfile, pickle and torch.save; what torch.load and safetensors
themselves read or refuse; the loaded tensors are compared with the saved ones exactly; a file open() makes in the
same subprocess (under a umask of 027) for the mode.
"""
from __future__ import annotations

import copy
import importlib
import itertools
import math
import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch.serialization import MAGIC_NUMBER
from _helpers import bnkit_env, file_mode
from torch import nn

from bnkit.torch.io import (
    NotACheckpointError, UnsafeCheckpointError, load_checkpoint, load_state_dict_file, load_weights_into,
    save_state_dict_file,
)


def _onnx_file(path, producer: str = "onnx.helper"):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, ir_version=8, producer_name=producer), path)
    return path


def _not_checkpoints(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(bytes(range(7, 200)))
    (tmp_path / "text.pt").write_text("not a checkpoint at all\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    np.savez(tmp_path / "x.npz", x=np.ones(3))
    whole = tmp_path / "w.pt"
    torch.save({"w": torch.ones(4)}, whole)
    (tmp_path / "truncated.pt").write_bytes(whole.read_bytes()[:200])
    return {
        "garbage.pt": "starts with the bytes", "text.pt": "text file", "empty.pt": "empty",
        "x.npy": "NumPy .npy", "x.npz": "NumPy .npz", "truncated.pt": "damaged zip",
        _onnx_file(tmp_path / "m.onnx").name: "ONNX model",
        _onnx_file(tmp_path / "exported.pt", producer="pytorch").name: "ONNX model",  # torch.onnx's, misnamed
    }


@pytest.mark.parametrize("trust", [False, True])
def test_a_file_that_is_not_a_checkpoint_is_named_for_what_it_is_whatever_trust_says(tmp_path, trust):
    for name, kind in _not_checkpoints(tmp_path).items():
        with pytest.raises(NotACheckpointError) as info:
            load_checkpoint(tmp_path / name, trust=trust)
        message = str(info.value)
        assert kind in message and message.count("not a PyTorch checkpoint") == 1, message
        assert "trust" not in message and "allow-list" not in message, message  # never "unsafe: pass --trust"


class Evil:
    def __reduce__(self):
        return (sys.exit, ("pickle code ran",))


def test_a_pickle_with_code_is_refused_and_names_the_global_without_ansi_codes(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2), "evil": Evil()}, legacy, _use_new_zipfile_serialization=False)
    zipped = tmp_path / "zipped.pt"
    torch.save({"w": torch.ones(2), "evil": Evil()}, zipped)
    for path in (legacy, zipped):
        with pytest.raises(UnsafeCheckpointError) as info:
            load_checkpoint(path)  # sys.exit would end the test run if the pickle were executed
        message = str(info.value)
        assert "NOT loaded" in message and "sys.exit" in message and "state_dict()" in message
        assert "\x1b" not in message and "trust" in message


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_pickle_dump_file_is_no_checkpoint_trusted_or_not_and_never_unpickled(tmp_path, protocol):
    """torch.load reads only files that start with PyTorch's magic number (a zip, or a legacy torch.save file), and
    it unpickles that first pickle to find out: trusted, a pickle.dump file ran its code and then failed ('Invalid
    magic number'); untrusted, a plain one of protocol 4 was called unsafe and the user told to trust it (review).
    Oracle: torch.load's own refusal of the plain file when trusted, and the Evil payload never running."""
    plain, evil = tmp_path / "plain.pkl", tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps({"layer.weight": [1.0, 2.0]}, protocol=protocol))
    evil.write_bytes(pickle.dumps({"state_dict": Evil()}, protocol=protocol))
    with pytest.raises(Exception, match="magic number"):
        torch.load(plain, weights_only=False)
    disguised = tmp_path / "disguised.pt"  # the magic number beside Evil in its first pickle, then four more pickles
    with open(disguised, "wb") as f:
        pickle.dump((Evil(), MAGIC_NUMBER), f, protocol=protocol)
        for _ in range(4):
            pickle.dump(0, f, protocol=protocol)
    for path, trust in itertools.product((plain, evil, disguised), (False, True)):
        with pytest.raises(NotACheckpointError, match="is a pickle that is not a torch.save file") as info:
            load_checkpoint(path, trust=trust)  # sys.exit would end the test run if Evil were unpickled
        assert ("sys.exit, which could run code: NOT loaded" in str(info.value)) == (path != plain)


def test_a_whole_pickled_model_needing_an_unimportable_package(tmp_path, monkeypatch):
    pkg = tmp_path / "fa_io_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("import torch\nclass Net(torch.nn.Sequential):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from fa_io_pkg.nets import Net

    net = Net(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(UnsafeCheckpointError, match=r"fa_io_pkg\.nets\.Net"):
        load_checkpoint(path)
    loaded = load_state_dict_file(path, trust=True)  # importable: a trusted load works
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())

    for name in ("fa_io_pkg", "fa_io_pkg.nets"):
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    with pytest.raises(ValueError, match="cannot be found.*fa_io_pkg.*PYTHONPATH"):
        load_checkpoint(path, trust=True)


def test_safetensors_bytes_under_another_suffix_and_a_legacy_torch_file_load(tmp_path):
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
    save_state_dict_file(state, tmp_path / "s.safetensors")
    (tmp_path / "s.pt").write_bytes((tmp_path / "s.safetensors").read_bytes())
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("s.pt", "legacy.pt"):
        got = load_state_dict_file(tmp_path / name)
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


def test_a_file_named_safetensors_is_read_for_what_it_holds(tmp_path):
    """The suffix decided: a torch.save file, an .npy array or an empty file named .safetensors all got the
    safetensors loader's 'header too large' (torch.load itself routes a path by that suffix). Oracles: torch.load
    of the same bytes; what the file holds."""
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
    for legacy in (False, True):
        path = tmp_path / f"{'legacy' if legacy else 'zip'}.safetensors"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        with open(path, "rb") as f:  # a path ending in .safetensors would send torch.load to safetensors
            want = torch.load(f, weights_only=True)
        got = load_state_dict_file(path)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    np.save(tmp_path / "x.npy", np.zeros(3))
    (tmp_path / "x.safetensors").write_bytes((tmp_path / "x.npy").read_bytes())
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name, what in (("x", "a NumPy .npy array (np.save)"), ("empty", "an empty file")):
        with pytest.raises(NotACheckpointError) as info:
            load_checkpoint(tmp_path / f"{name}.safetensors")
        assert info.value.what == what
    save_state_dict_file(state, tmp_path / "s.safetensors")
    data = bytearray((tmp_path / "s.safetensors").read_bytes())
    data[:8] = (10 ** 9).to_bytes(8, "little")  # a damaged header length: still safetensors, damaged
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(NotACheckpointError, match="not a valid safetensors file"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_a_value_that_is_not_a_tensor_under_a_model_key_is_named_as_such(tmp_path):
    """The file holds 1.weight, as an int: it was called missing, which sends the user looking for a key that is
    there; so under DDP's prefix. Epoch counters beside the tensors are still dropped silently, and what the loader
    returns stays a plain dict (torch.save of it loads with weights_only). Oracle: the file's own contents."""
    from bnkit.torch.io import split_state

    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for prefix in ("", "module."):
        torch.save({**{prefix + k: v for k, v in before.items()}, prefix + "1.weight": 5, "epoch": 3},
                   tmp_path / "w.pt")
        state, dropped = split_state(load_checkpoint(tmp_path / "w.pt"), tmp_path / "w.pt")
        assert type(state) is dict and dropped == {prefix + "1.weight": "int", "epoch": "int"}
        with pytest.raises(ValueError) as info:
            load_weights_into(model, state, dropped=dropped)
        assert "1.weight holds an int, not a tensor" in str(info.value) and "missing" not in str(info.value)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.save({**before, "1.weight": before["1.weight"] + 1, "epoch": 3}, tmp_path / "w.pt")
    state = load_state_dict_file(tmp_path / "w.pt")
    load_weights_into(model, state)  # the epoch alone: loads
    assert torch.equal(model[1].weight, before["1.weight"] + 1)
    torch.save(state, tmp_path / "again.pt")
    assert set(torch.load(tmp_path / "again.pt", weights_only=True)) == set(before)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def test_load_weights_into_strips_a_ddp_or_compile_prefix_present_on_every_key():
    source = _net()
    for prefix in ("module.", "_orig_mod."):
        wrapped = {prefix + k: v + 1 for k, v in source.state_dict().items()}
        target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        load_weights_into(target, wrapped)
        for k, v in source.state_dict().items():
            assert torch.equal(target.state_dict()[k], v + 1), k


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's first import: torch.jit internals
def test_load_weights_into_strips_nested_wrapper_prefixes():
    """torch.compile of a DataParallel/DDP model saves '_orig_mod.module.*', the other order 'module._orig_mod.*',
    an AveragedModel inside a wrapper '<prefix>n_averaged' beside '<prefix>module.*' (the real wrappers' state
    dicts; compile traces nothing until called). On a machine with CUDA, DataParallel moves ``source`` to the GPU:
    the weights are compared on the CPU."""
    source = _net()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1)
    from torch.optim.swa_utils import AveragedModel

    averaged = AveragedModel(source)
    for wrapped in (torch.compile(torch.nn.DataParallel(source)), torch.nn.DataParallel(torch.compile(source)),
                    torch.compile(averaged), torch.nn.DataParallel(averaged), AveragedModel(torch.compile(source))):
        state = wrapped.state_dict()
        assert all(k.count(".") >= 2 for k in state if not k.endswith("n_averaged"))
        target = _net()
        load_weights_into(target, state)
        for k, v in source.state_dict().items():
            assert torch.equal(target.state_dict()[k], v.cpu()), k


class _Holder(torch.nn.Module):
    """A model whose own submodule is named ``module``, as a wrapper's is."""

    def __init__(self):
        super().__init__()
        self.module = _net()


def test_load_weights_into_keeps_a_real_module_prefix_and_explains_mismatches():
    Holder = _Holder
    holder = Holder()
    state = {k: v.clone() + 2 for k, v in holder.state_dict().items()}
    target = Holder()
    load_weights_into(target, state)  # keys really start with "module.": loaded as they are
    assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())

    # not every key has the prefix (an extra tensor saved beside the weights): nothing stripped, a hint instead
    partial = {"module." + k: v for k, v in _net().state_dict().items()} | {"epoch": torch.tensor(3)}
    with pytest.raises(ValueError) as info:
        load_weights_into(_net(), partial, source="ddp.pt")
    assert "ddp.pt do not fit" in str(info.value) and "prefix 'module.'" in str(info.value)
    assert "save model.module.state_dict()" in str(info.value)
    with pytest.raises(ValueError, match=r"missing .*unexpected .*prefix 'model\.' .*LightningModule.*strip it, "
                                         r"\{k\.removeprefix\('model\.'\): v for k, v in state\.items\(\)\}") as info:
        load_weights_into(_net(), {"model." + k: v for k, v in _net().state_dict().items()})
    assert "model.module" not in str(info.value)  # not DistributedDataParallel's remedy
    with pytest.raises(ValueError) as info:
        load_weights_into(_net(), {"a.b": torch.ones(1), "a.c": torch.ones(1)})
    assert "prefix" not in str(info.value)  # no shared prefix that would explain the mismatch
    bigger = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5))
    with pytest.raises(ValueError, match="size mismatch"):
        load_weights_into(_net(), bigger.state_dict())


def test_a_failed_load_leaves_a_lazy_layer_lazy_and_checks_every_name_of_a_tied_weight():
    """load_state_dict fills a lazy layer before it finds a later shape that does not fit, and the rollback could not
    make it lazy again: shapes are checked first. A tied weight's second name escaped the dtype check (int8 codes
    loaded as floats)."""
    model = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Linear(4, 2))
    state = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).state_dict()
    state["1.weight"] = torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"size mismatch: 1\.weight \(\(5, 4\) in the file, \(2, 4\) in the model\)"):
        load_weights_into(model, state)
    assert torch.nn.parameter.is_lazy(model[0].weight)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 3, bias=False)
            self.dec.weight = self.enc.weight

    tied = Tied()
    before = tied.enc.weight.detach().clone()
    codes = {"enc.weight": before.clone(), "dec.weight": torch.full((3, 3), 127, dtype=torch.int8)}
    with pytest.raises(ValueError, match=r"integer or bool values .*dec\.weight \(torch\.int8"):
        load_weights_into(tied, codes)
    assert torch.equal(tied.enc.weight, before)


def test_a_load_that_fails_late_leaves_lazy_layers_lazy():
    """A non-tensor or a sparse value fails inside load_state_dict after it filled the lazy layers before it: they
    are uninitialized again, and a forward initializes them from its input as before. Oracle: PyTorch's own
    is_lazy and a fresh model's forward."""
    for spoil in ([0.0, 0.0], torch.zeros(2).to_sparse()):
        model = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Linear(4, 2), torch.nn.LazyBatchNorm1d())
        before = model[1].weight.detach().clone()
        state = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2)).state_dict()
        state["1.bias"] = spoil
        with pytest.raises((ValueError, RuntimeError)):
            load_weights_into(model, state)
        lazy = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if torch.nn.parameter.is_lazy(t)]
        assert lazy == ["0.weight", "0.bias", "2.weight", "2.bias", "2.running_mean", "2.running_var"]
        assert torch.equal(model[1].weight, before)
        assert model(torch.randn(5, 7)).shape == (5, 2) and model[0].weight.shape == (4, 7)


def test_loads_that_pytorch_reshapes_or_completes_are_taken_as_load_state_dict_takes_them():
    """Refused before, loaded by torch's load_state_dict: quantization-aware training's observers, which resize
    their (1,)/(0,) buffers to per-channel ones as they load; a load pre-hook that reshapes an old layout; a
    BatchNorm state dict saved before num_batches_tracked existed (BatchNorm's loader keeps the layer's count).
    Oracle: the same load through torch's load_state_dict, tensor by tensor."""
    import torch.ao.quantization as tq

    def qat():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).train()
        m.qconfig = tq.get_default_qat_qconfig("fbgemm")
        return tq.prepare_qat(tq.fuse_modules_qat(m, [["0", "1", "2"]]))

    def hooked():
        lin = torch.nn.Linear(4, 2)
        lin.register_load_state_dict_pre_hook(
            lambda module, sd, prefix, *rest: sd.update({prefix + "weight": sd[prefix + "weight"].view(2, 4)}))
        return lin

    trained = qat()
    trained(torch.randn(4, 3, 8, 8))  # observers now hold per-channel (8,) statistics
    flat = {k: v + 1 for k, v in torch.nn.Linear(4, 2).state_dict().items()}
    flat["weight"] = flat["weight"].reshape(-1)
    old_bn = {k: v + 1 for k, v in _net().state_dict().items() if not k.endswith("num_batches_tracked")}
    counted = _net()
    counted[1].num_batches_tracked.fill_(5)
    for make, state in ((qat, trained.state_dict()), (hooked, flat), (_net, old_bn), (lambda: counted, old_bn)):
        got, want = make(), copy.deepcopy(make())
        want.load_state_dict(dict(state))
        load_weights_into(got, dict(state))
        for k, v in want.state_dict().items():
            assert torch.equal(got.state_dict()[k], v), k
    assert int(counted[1].num_batches_tracked) == 5
    with pytest.raises(ValueError, match=r"missing 1\.num_batches_tracked"):  # a version-2 state dict lacking it
        versioned = OrderedDict(old_bn)
        versioned._metadata = {"1": {"version": 2}}
        load_weights_into(_net(), versioned)


def test_a_failed_load_puts_back_the_buffers_a_quantization_observer_resized():
    """QAT observers resize their (1,)/(0,) buffers in place as they load; when a later tensor failed, the rollback
    copied the old values into the resized buffers, which raised torch's RuntimeError mid-way and left the model
    half loaded. Oracle: the model's state before the call, shapes and values."""
    import torch.ao.quantization as tq

    def qat():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).train()
        m.qconfig = tq.get_default_qat_qconfig("fbgemm")
        return torch.nn.Sequential(tq.prepare_qat(m), torch.nn.InstanceNorm2d(4, affine=True))

    trained = qat()
    trained(torch.randn(2, 3, 8, 8))
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    state["1.weight"] = torch.ones(5)  # InstanceNorm's own loader: no shape pre-check, load_state_dict raises
    model = qat()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(before[k].shape != state[k].shape for k in before if k.startswith("0."))  # premise: resized on load
    with pytest.raises(ValueError, match=r"do not fit Sequential: size mismatch for 1\.weight"):
        load_weights_into(model, state)
    after = model.state_dict()
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items())


def test_narrowing_casts_that_overflow_are_refused_for_complex_and_float8_too():
    """complex128 1e300 loaded into complex64 as inf; float32 1000 into float8_e4m3fn, which has no inf, as its
    largest value 448 (torch 2.13) or NaN (torch 2.11); a float8 value into float32 raised NotImplementedError (no
    isfinite for float8), where nothing can overflow. 460 rounds to 448 in float8_e4m3fn, 65519 to 65504 in
    float16: loaded. Oracle: torch's own casts."""
    assert not torch.isfinite(torch.tensor([1e300 + 0j], dtype=torch.complex128).to(torch.complex64)).all()
    over, rounded = torch.tensor([1000.0, 460.0]).to(torch.float8_e4m3fn).float().tolist()
    assert (over == 448.0 or math.isnan(over)) and rounded == 448.0
    lin = torch.nn.Linear(2, 2, bias=False)
    for dtype, value, says in ((torch.complex64, torch.full((2, 2), 1e300 + 0j, dtype=torch.complex128), "1e+300"),
                               (torch.float8_e4m3fn, torch.full((2, 2), 1000.0), "1000 is beyond 448")):
        model = copy.deepcopy(lin).to(dtype)
        before = model.weight.detach().clone()
        with pytest.raises(ValueError, match=f"they would load as inf, or clamped.*{re.escape(says)}"):
            load_weights_into(model, {"weight": value})
        assert torch.equal(model.weight.view(torch.uint8), before.view(torch.uint8))
    codes = torch.full((2, 2), 448.0).to(torch.float8_e4m3fn)
    load_weights_into(lin, {"weight": codes})
    assert torch.equal(lin.weight, codes.float())
    small = copy.deepcopy(lin).to(torch.float8_e4m3fn)
    load_weights_into(small, {"weight": torch.full((2, 2), 460.0)})
    assert small.weight.float().tolist() == [[448.0, 448.0]] * 2


def test_prefix_rewrites_keep_torchs_metadata_for_version_dependent_loaders():
    """Stripping 'module.' (or adding a wrapper's prefix) rebuilt the state dict without _metadata, so torch's
    loaders saw no version: a MinMaxObserver's eps of 1e-3 loaded as float32's eps, and a version-2 BatchNorm
    dict without its counter was taken once prefixed. Oracle: torch's own consume_prefix_in_state_dict_if_present
    then load_state_dict."""
    from torch.ao.quantization import MinMaxObserver
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    class WithObserver(nn.Module):
        def __init__(self, eps):
            super().__init__()
            self.lin, self.obs = nn.Linear(2, 2), MinMaxObserver(eps=eps)

    torch.manual_seed(0)
    source = WithObserver(1e-3)
    source.obs(torch.randn(8))
    wrapped = nn.DataParallel(source).state_dict()
    oracle, stripped = WithObserver(0.5), OrderedDict(wrapped)
    stripped._metadata = OrderedDict(wrapped._metadata)
    consume_prefix_in_state_dict_if_present(stripped, "module.")
    oracle.load_state_dict(stripped)
    for target, state in ((WithObserver(0.5), wrapped), (nn.DataParallel(WithObserver(0.5)), source.state_dict())):
        load_weights_into(target, state)
        inner = target.module if isinstance(target, nn.DataParallel) else target
        assert inner.obs.eps.item() == oracle.obs.eps.item() == pytest.approx(1e-3)
    counted = nn.DataParallel(nn.Sequential(nn.BatchNorm1d(2))).state_dict()
    del counted["module.0.num_batches_tracked"]
    with pytest.raises(ValueError, match=r"missing 0\.num_batches_tracked"):  # version 2 says it must be there
        load_weights_into(nn.Sequential(nn.BatchNorm1d(2)), counted)


class _Replacer(nn.Linear):
    """A loader that makes a new weight Parameter from the file, then fails."""

    def _load_from_state_dict(self, state_dict, prefix, *args):
        self.weight = nn.Parameter(state_dict[prefix + "weight"].clone())
        raise RuntimeError("custom loader failed")


class _Retyper(nn.Linear):
    """A loader that adopts the file's dtype through .data, then fails."""

    def _load_from_state_dict(self, state_dict, prefix, *args):
        self.weight.data = state_dict[prefix + "weight"].clone()
        raise RuntimeError("custom loader failed")


@pytest.mark.parametrize("cls, dtype", [(_Replacer, torch.float32), (_Retyper, torch.float64)])
def test_a_failed_load_puts_back_the_parameter_objects_and_dtypes_a_loader_replaced(cls, dtype):
    """The rollback copied values into the objects held before the load: a loader that replaced the Parameter left
    the file's values in the module (and the optimizer's Parameter out of it); one that retyped it through .data
    left float64. The one-line error of such a loader was dropped too ('do not fit X: '). Oracle: the model and
    the optimizer's parameter before the call."""
    torch.manual_seed(0)
    model = nn.Sequential(cls(3, 3))
    held, before = model[0].weight, model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {k: torch.full_like(v, 7.0, dtype=dtype) for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="do not fit Sequential: custom loader failed"):
        load_weights_into(model, state)
    assert model[0].weight is held is optimizer.param_groups[0]["params"][0]
    assert held.dtype == torch.float32 and torch.equal(held.detach(), before)


def test_lazy_parameters_tied_before_a_failed_load_stay_tied_and_a_parents_loader_is_left_to_run():
    """A lazy weight shared by two layers came back as two; a parent's own loader, which reshapes its child's old
    layout, was pre-empted by the shape check. Oracle: the model before the call; torch's load_state_dict."""
    first = nn.LazyLinear(3)
    model = nn.Sequential(first, nn.ReLU(), nn.Linear(3, 2))
    model.add_module("again", first)
    state = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).state_dict()
    state = {**state, **{f"again.{k[2:]}": v for k, v in state.items() if k.startswith("0.")}}
    state["2.weight"] = torch.zeros(5, 3)
    with pytest.raises(ValueError):
        load_weights_into(model, state)
    assert model[0].weight is model.again.weight and torch.nn.parameter.is_lazy(model[0].weight)

    class Transposing(nn.Module):  # an old checkpoint stored fc.weight transposed
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 3, bias=False)

        def _load_from_state_dict(self, state_dict, prefix, *args):
            key = prefix + "fc.weight"
            if state_dict[key].shape == (2, 3):
                state_dict[key] = state_dict[key].t()
            super()._load_from_state_dict(state_dict, prefix, *args)

    old = {"fc.weight": torch.arange(6.0).view(2, 3)}
    want, got = Transposing(), Transposing()
    want.load_state_dict(dict(old))
    load_weights_into(got, dict(old))
    assert torch.equal(got.fc.weight, want.fc.weight)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's first import: torch.jit internals
def test_an_averaged_model_state_dict_loads_into_the_same_averaged_model_wrapped():
    """AveragedModel's n_averaged was dropped whenever the model's own keys lacked a bare 'n_averaged', so the
    same AveragedModel under torch.compile or DataParallel was refused. Oracle: the source's tensors."""
    from torch.optim.swa_utils import AveragedModel

    source = AveragedModel(_net())
    source.update_parameters(_net())
    source.update_parameters(_net())
    state = source.state_dict()
    for target in (torch.compile(AveragedModel(_net())), torch.nn.DataParallel(AveragedModel(_net()))):
        load_weights_into(target, state)
        inner = dict(zip(state, target.state_dict().values()))
        assert all(torch.equal(inner[k].cpu(), v) for k, v in state.items()) and int(inner["n_averaged"]) == 2


def test_an_averaged_model_file_loads_into_a_model_holding_an_averaged_model_inside():
    """A model that keeps an AveragedModel below its top (an EMA teacher) made the file's own top-level n_averaged
    count as the model's, so an AveragedModel(model) file was refused. A buffer registered as None that a failing
    loader filled stays None. Oracle: the source's tensors; the model before the call."""
    from torch.optim.swa_utils import AveragedModel

    class WithTeacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = _net()
            self.ema = AveragedModel(_net())

    source = WithTeacher()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1)
    target = WithTeacher()
    load_weights_into(target, AveragedModel(source).state_dict())
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())

    class Fills(nn.Linear):
        def __init__(self):
            super().__init__(2, 2)
            self.register_buffer("extra", None)

        def _load_from_state_dict(self, state_dict, prefix, *args):
            self.extra = torch.ones(1)
            raise RuntimeError("boom")

    model = Fills()
    with pytest.raises(ValueError, match="do not fit Fills: boom"):
        load_weights_into(model, nn.Linear(2, 2).state_dict())
    assert "extra" in model._buffers and model.extra is None


@pytest.mark.parametrize("spoil, says", [
    (lambda s: s.update({"1.running_var": torch.ones(5)}), r"size mismatch: 1\.running_var \(\(5,\) in the file"),
    (lambda s: s.update({"0.weight": s["0.weight"] + 1j}), r"complex values for real tensors: 0\.weight"),
    (lambda s: s.update({"1.bias": [0.0] * 4}), r"1\.bias.*expected torch\.Tensor"),
    (lambda s: s.update({"0.weight": s["0.weight"].to_sparse()}), r"0\.weight"),
])
def test_load_weights_into_changes_nothing_when_one_tensor_does_not_fit(spoil, says):
    """torch's load_state_dict copies every tensor that fits before it raises (and keeps a complex tensor's real
    part with a warning): the file's other tensors must not stay in the model."""
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v + 1 for k, v in model.state_dict().items()}
    spoil(state)
    with pytest.raises(ValueError, match=says):
        load_weights_into(model, state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_load_interrupted_by_ctrl_c_puts_back_what_it_had_loaded():
    """The rollback ran for Exceptions only: a KeyboardInterrupt in the middle of load_state_dict left every module
    loaded before it holding the file's values (review). Oracle: the state before the call."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v + 1 for k, v in before.items()}

    def interrupt(*_):
        raise KeyboardInterrupt

    model[2]._register_load_state_dict_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_weights_into(model, state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_weights_into_takes_what_load_state_dict_takes_unchanged():
    """A one-element count for a 0-d buffer (old checkpoints), any shape into a lazy module's parameters, extra
    state of any shape and a module's own loading code (both handed the file's value by torch)."""
    state = {k: v + 1 for k, v in _net().state_dict().items()}
    state["1.num_batches_tracked"] = torch.tensor([7])
    model = _net()
    load_weights_into(model, state)
    assert int(model[1].num_batches_tracked) == 7 and torch.equal(model[0].weight, state["0.weight"])
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.BatchNorm1d(4))
    load_weights_into(lazy, state)
    assert torch.equal(lazy[0].weight, state["0.weight"])

    class WithExtra(torch.nn.Module):  # Transformer Engine's FP8 modules keep extra state as a byte tensor
        def __init__(self, n=0):
            super().__init__()
            self.extra = torch.zeros(n, dtype=torch.uint8)

        def get_extra_state(self):
            return self.extra

        def set_extra_state(self, value):
            self.extra = value

    class Legacy(torch.nn.Linear):  # reads an old (out, 1) bias layout
        def _load_from_state_dict(self, state_dict, prefix, *args):
            key = prefix + "bias"
            if key in state_dict and state_dict[key].ndim == 2:
                state_dict[key] = state_dict[key].squeeze(1)
            super()._load_from_state_dict(state_dict, prefix, *args)

    target = torch.nn.Sequential(WithExtra(), Legacy(3, 2))
    source = torch.nn.Sequential(WithExtra(5), torch.nn.Linear(3, 2)).state_dict()
    source["1.bias"] = source["1.bias"].unsqueeze(1)
    load_weights_into(target, source)
    assert torch.equal(target[0].extra, source["0._extra_state"]) and target[1].bias.shape == (2,)



def _counted():
    """_net() with an int32 buffer beside the BatchNorm's int64 count."""
    model = _net()
    model.register_buffer("steps", torch.zeros((), dtype=torch.int32))
    return model


def test_load_weights_into_unwraps_a_wrapper_around_a_model_with_its_own_module():
    """DDP/DataParallel or AveragedModel around a model whose submodule is named ``module`` saves 'module.module.*'
    (and 'n_averaged'): the wrapper's prefix was kept, since the model's keys start with 'module.' too, and the load
    refused. Oracle: the wrapped model's own tensors, the real wrappers' state dicts."""
    from torch.optim.swa_utils import AveragedModel

    source = _Holder()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1)
    for wrapped in (torch.nn.DataParallel(source), AveragedModel(source)):
        state = wrapped.state_dict()
        assert all(k.startswith("module.module.") for k in state if k != "n_averaged")
        target = _Holder()
        load_weights_into(target, state)
        for k, v in source.state_dict().items():
            assert torch.equal(target.state_dict()[k], v.cpu()), k


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's first import: torch.jit internals
def test_a_plain_state_dict_loads_into_a_wrapped_model():
    """A factory returning torch.compile(model) or DataParallel(model), or both nested, and weights saved from the
    plain model: refused as 'missing _orig_mod.0.weight, ...', though the prefixed direction loads. Oracle: the
    plain model's tensors."""
    source = _net()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1)
    state = source.state_dict()
    for wrapped in (torch.compile(_net()), torch.nn.DataParallel(_net()), torch.compile(torch.nn.DataParallel(_net())),
                    torch.nn.DataParallel(torch.compile(_net()))):
        load_weights_into(wrapped, dict(state))
        inner = dict(zip(state, wrapped.state_dict().values()))
        assert all(torch.equal(inner[k].cpu(), v) for k, v in state.items()), type(wrapped).__name__
    # a model with its own `module` child: the wrapper's prefix was read off whichever key a set gave first
    # ('module.module.' half the time), so the load depended on the hash seed; DataParallel around it always failed
    holder = _Holder()
    with torch.no_grad():
        for p in holder.parameters():
            p.add_(2)
    own = holder.state_dict()
    for wrapped in (torch.nn.DataParallel(_Holder()), torch.compile(_Holder())):
        load_weights_into(wrapped, dict(own))
        inner = dict(zip(own, wrapped.state_dict().values()))
        assert all(torch.equal(inner[k].cpu(), v) for k, v in own.items()), type(wrapped).__name__
    # saved under one wrapper, loaded into another nesting: the saved prefixes swapped for the model's; an
    # AveragedModel's n_averaged is dropped before, also for a wrapped model (it was kept there and refused)
    from torch.optim.swa_utils import AveragedModel

    for saved, target in ((AveragedModel(source), torch.nn.DataParallel(_net())),
                          (AveragedModel(source), torch.nn.DataParallel(torch.compile(_net()))),
                          (torch.nn.DataParallel(source), torch.nn.DataParallel(torch.compile(_net()))),
                          (torch.compile(source), torch.compile(torch.nn.DataParallel(_net()))),
                          (torch.compile(torch.nn.DataParallel(source)), torch.nn.DataParallel(torch.compile(_net())))):
        load_weights_into(target, saved.state_dict())
        inner = dict(zip(state, target.state_dict().values()))
        assert all(torch.equal(inner[k].cpu(), v.cpu()) for k, v in state.items()), type(target).__name__


def test_load_weights_into_refuses_finite_floats_a_narrower_dtype_turns_into_inf():
    """torch's load_state_dict casts 70000.0 into a float16 weight as inf: refused before anything loads, naming the
    key, the dtypes and the value. Values that round to float16's largest (65519) or are inf already load as the
    cast gives them. Oracle: the model before the call; torch's own cast."""
    model = _net().half()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.float() for k, v in model.state_dict().items()}
    state["0.weight"] = torch.full((4, 3), 0.5).index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(7e4))
    with pytest.raises(ValueError, match=r"beyond the range .* 0\.weight \(torch\.float32 into torch\.float16: "
                                         r"70000 is beyond 65504\)"):
        load_weights_into(model, state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    state["0.weight"] = torch.tensor([[65519.0, float("inf"), -float("inf")]] * 4)
    load_weights_into(model, state)
    assert torch.equal(model[0].weight, state["0.weight"].half())
    assert model[0].weight[0, 0] == 65504


@pytest.mark.parametrize("key, value, says", [
    ("0.weight", torch.tensor([[127, -3, 0]] * 4, dtype=torch.int8),
     r"integer or bool values for floating-point tensors.*: 0\.weight \(torch\.int8 into torch\.float32\)"),
    ("1.running_mean", torch.tensor([True, False, True, True]), r"1\.running_mean \(torch\.bool into torch\.float32\)"),
    ("1.num_batches_tracked", torch.tensor(6.7),
     r"integer tensors cannot hold: 1\.num_batches_tracked \(torch\.float32 into torch\.int64: 6\.7 is not a whole"),
    ("1.num_batches_tracked", torch.tensor(float("nan"), dtype=torch.float64), r"float64 into torch\.int64: nan is"),
    ("1.num_batches_tracked", torch.tensor(float("inf")), r"inf is not a whole number"),
    ("1.num_batches_tracked", torch.tensor(1e30), r"1e\+30 is outside -9223372036854775808\.\.9223372036854775807"),
    ("steps", torch.tensor(2**40), r"steps \(torch\.int64 into torch\.int32: 1099511627776 is outside"),
])
def test_load_weights_into_refuses_values_that_load_state_dict_would_cast(key, value, says):
    """torch's load_state_dict casts silently: int8 codes become floats 127.0 (their scale lost), bools 1.0, a count
    of 6.7 becomes 6, NaN and 1e30 some integer, 2**40 wraps in an int32: refused before anything is loaded, naming
    the key and both dtypes. Oracle: the model's tensors before the call, compared exactly."""
    model = _counted()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v + 1 for k, v in model.state_dict().items()}
    state[key] = value
    with pytest.raises(ValueError, match=says):
        load_weights_into(model, state, "w.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_load_weights_into_takes_integers_and_whole_number_floats_into_integer_tensors():
    """A count some converter saved as float (6.0, or [2.0**53] in float64) loads as that integer, an int32 or uint8
    into the int64 count and an int64 that an int32 holds too; 6.5 does not. A negative count loads as it is (the
    audit reports it; refusing it would stop the audit of the model). Oracle: Python's int of the value."""
    pairs = ((torch.tensor(6.0), torch.tensor(-5)), (torch.tensor(-2.0), torch.tensor(0)),
             (torch.tensor(-2), torch.tensor(1)),
             (torch.tensor([2.0**53], dtype=torch.float64), torch.tensor(2**31 - 1)),
             (torch.tensor(7, dtype=torch.int32), torch.tensor(3, dtype=torch.uint8)))
    for count, steps in pairs:
        model = _counted()
        state = {**model.state_dict(), "1.num_batches_tracked": count, "steps": steps}
        load_weights_into(model, state)
        assert model[1].num_batches_tracked.dtype == torch.int64 and model.steps.dtype == torch.int32
        assert int(model[1].num_batches_tracked) == int(count.item()) and int(model.steps) == int(steps)
    with pytest.raises(ValueError, match=r"1\.num_batches_tracked .*6\.5 is not a whole number"):
        load_weights_into(_counted(), {**_counted().state_dict(), "1.num_batches_tracked": torch.tensor(6.5)})


def test_upper_case_safetensors_suffix_writes_and_reads_safetensors(tmp_path):
    from safetensors.torch import load_file

    state = {"bn.weight": torch.arange(3.0), "bn.running_var": torch.ones(3)}
    path = save_state_dict_file(state, tmp_path / "w.SAFETENSORS")
    assert {k: torch.equal(v, state[k]) for k, v in load_file(str(path)).items()} == {k: True for k in state}
    assert all(torch.equal(v, state[k]) for k, v in load_state_dict_file(path).items())


def test_a_wrapper_holding_a_whole_model_is_unwrapped_with_trust(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    path = tmp_path / "yolo_style.pt"
    torch.save({"model": model, "epoch": 3}, path)  # YOLOv5's layout
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict_file(path)
    state = load_state_dict_file(path, trust=True)
    want = model.state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want)


def test_load_weights_into_takes_an_averaged_model_state_dict():
    from torch import nn
    from torch.optim.swa_utils import AveragedModel

    def net():
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))

    torch.manual_seed(0)
    a, b = net(), net()
    swa = AveragedModel(a)
    swa.update_parameters(a)
    swa.update_parameters(b)
    state = swa.state_dict()
    assert "n_averaged" in state and all(k.startswith("module.") for k in state if k != "n_averaged")
    target = net()
    load_weights_into(target, state)
    for key, value in swa.module.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    torch.testing.assert_close(target[0].weight, (a[0].weight + b[0].weight) / 2)  # closed form: the mean of two


def test_a_state_dict_under_an_unknown_key_is_found_or_the_choice_left_to_the_user(tmp_path):
    sd = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict()
    path = tmp_path / "mixed.pt"
    torch.save({"epoch": 3, "best_acc1": torch.tensor(0.7), "weights": sd}, path)  # one dict of tensors: the weights
    state = load_state_dict_file(path)
    assert state.keys() == sd.keys() and all(torch.equal(state[k], sd[k]) for k in sd)
    torch.save({"params": sd, "params_ema": sd}, path)  # BasicSR's layout: two candidates
    with pytest.raises(ValueError, match=r"holds dicts of tensors under \['params', 'params_ema'\], none under a key "
                                         r"bnkit knows .*torch.save\(checkpoint\['params'\], 'weights.pt'\)"):
        load_state_dict_file(path)
    torch.save({**sd, "extra": {"scale": torch.ones(1)}}, path)  # a flat state dict beside a small dict
    assert load_state_dict_file(path).keys() == sd.keys()
    # a tie (one tensor under "generator", one at the top level) is as ambiguous as two dicts: refused, never either
    torch.save({"generator": {"w": torch.ones(2)}, "best_loss": torch.tensor(0.3)}, path)
    with pytest.raises(ValueError, match=r"holds dicts of tensors under \['generator'\] and 1 tensor\(s\) at its top "
                                         r"level"):
        load_state_dict_file(path)
    torch.save({"bn._extra_state": {"version": 2}}, path)  # only extra state: no weights at all
    with pytest.raises(ValueError, match=r"mixed\.pt contains no tensors"):
        load_state_dict_file(path)


def test_two_copies_of_the_weights_are_refused_and_the_first_known_key_wins_over_other_tensors(tmp_path):
    """YOLOv5 and timm checkpoints hold a model and an EMA of its weights ("model"/"ema", "state_dict"/
    "state_dict_ema"), and deploy the EMA: which one to use is the user's call, as for BasicSR's params/params_ema
    (before, "model" was taken and the EMA's NaN statistics went unaudited). Dicts of other tensors beside a known key
    (a loss's weights) leave the known key's weights taken, in the documented order."""
    path = tmp_path / "both.pt"
    sd = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict()
    ema = {k: v.clone() for k, v in sd.items()}
    ema["1.running_var"][0] = float("nan")
    for checkpoint, known, twin in [({"model": sd, "ema": ema, "epoch": 3}, "model", "ema"),
                                    ({"state_dict": sd, "state_dict_ema": ema}, "state_dict", "state_dict_ema"),
                                    ({"model": {"module." + k: v for k, v in sd.items()}, "ema": ema}, "model", "ema"),
                                    # torchvision's references: an AveragedModel's state dict, n_averaged and module.*
                                    ({"model": sd, "optimizer": {}, "model_ema": {
                                        "n_averaged": torch.tensor(7), **{"module." + k: v for k, v in ema.items()}}},
                                     "model", "model_ema")]:
        torch.save(checkpoint, path)
        with pytest.raises(ValueError, match=rf"both.pt holds the same weights twice, under '{known}' and '{twin}' .*"
                                             rf"torch.save\(checkpoint\['{twin}'\], 'weights.pt'\), or "
                                             rf"checkpoint\['{known}'\]"):
            load_state_dict_file(path)
    torch.save({"model": sd, "ema": None, "loss": {"weight": torch.ones(3)}}, path)  # YOLOv5's stripped layout
    assert load_state_dict_file(path).keys() == sd.keys()
    torch.save({"net": {"w": torch.ones(2)}, "state_dict": {"v": torch.full((2,), 2.0)}}, path)
    assert list(load_state_dict_file(path)) == ["v"]


def test_the_same_values_under_two_keys_are_one_set_of_weights(tmp_path):
    """One state dict saved under two keys (the same storage after loading), an equal copy, and an EMA just started
    (equal values, NaN included, under an AveragedModel's layout) leave nothing to choose: the known key's weights
    load, as one copy did; one value apart is two sets of weights again (refused, see the test above)."""
    path = tmp_path / "twice.pt"
    sd = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict()
    sd["1.running_var"][1] = float("nan")
    averaged = {"n_averaged": torch.tensor(0), **{"module." + k: v.clone() for k, v in sd.items()}}
    for checkpoint in [{"state_dict": sd, "model": sd, "epoch": 5}, {"model": sd, "best_model": copy.deepcopy(sd)},
                       {"model": sd, "model_ema": averaged}]:
        torch.save(checkpoint, path)
        state = load_state_dict_file(path)
        assert state.keys() == sd.keys() and all(torch.equal(state[k], sd[k]) or k == "1.running_var" for k in sd)
        assert torch.equal(state["1.running_var"].isnan(), sd["1.running_var"].isnan())
    other = copy.deepcopy(sd)
    other["1.running_mean"][3] += 1e-3
    torch.save({"model": sd, "best_model": other}, path)
    with pytest.raises(ValueError, match=r"holds the same weights twice, under 'model' and 'best_model'"):
        load_state_dict_file(path)
    # sparse tensors (torch.equal has none: PyTorch's dispatcher error escaped), equal and not; CSR cannot be compared
    sparse = dict(sd, adj=torch.eye(3).to_sparse())
    torch.save({"state_dict": sparse, "model": copy.deepcopy(sparse)}, path)
    assert torch.equal(load_state_dict_file(path)["adj"].to_dense(), torch.eye(3))
    for differing in (torch.eye(3).mul(2).to_sparse(), torch.eye(3).to_sparse_csr()):
        torch.save({"state_dict": sparse, "model": dict(sparse, adj=differing)}, path)
        with pytest.raises(ValueError, match=r"holds the same weights twice, under 'state_dict' and 'model'"):
            load_state_dict_file(path)


class _Tagged(torch.nn.BatchNorm1d):
    """A layer with extra state (nn.Module.get_extra_state): a non-tensor entry in its state dict."""

    def get_extra_state(self):
        return {"version": getattr(self, "version", 2)}

    def set_extra_state(self, state):
        self.version = state["version"]


def test_extra_state_is_saved_and_loaded(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), _Tagged(4))
    model[1].version = 7
    path = save_state_dict_file(model.state_dict(), tmp_path / "w.pt")
    state = load_state_dict_file(path)
    assert state["1._extra_state"] == {"version": 7}
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), _Tagged(4))
    load_weights_into(fresh, state)
    assert fresh[1].version == 7 and torch.equal(fresh[0].weight, model[0].weight)
    # a load that fails (a weight of another shape) leaves the extra state as it was, like the tensors
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), _Tagged(4))
    other[1].version = 1
    bad = {**state, "0.weight": torch.zeros(5, 3)}
    with pytest.raises(ValueError, match="do not fit"):
        load_weights_into(other, bad)
    assert other[1].version == 1
    # an extra state holding tensors is not taken for a state dict of its own
    sd = {**model.state_dict(), "1._extra_state": {f"t{i}": torch.zeros(1) for i in range(9)}}
    torch.save(sd, tmp_path / "big_extra.pt")
    assert load_state_dict_file(tmp_path / "big_extra.pt").keys() == sd.keys()
    with pytest.raises(ValueError, match=r"safetensors holds tensors only, and the state dict's 1._extra_state is "
                                         r"not \(a module's extra state\); write a .pt file instead"):
        save_state_dict_file(model.state_dict(), tmp_path / "w.safetensors")
    assert not list(tmp_path.glob("w.safetensors*"))


def test_torchscript_archives_and_meta_tensors_are_named(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    torch.jit.save(torch.jit.script(model), tmp_path / "ts.pt")
    for trust in (False, True):
        with pytest.raises(NotACheckpointError, match=r"ts.pt is a TorchScript archive \(torch.jit.save: code as "
                                                      r"well as weights; .*torch.jit.load\(path\).state_dict\(\)"):
            load_state_dict_file(tmp_path / "ts.pt", trust=trust)
    with torch.device("meta"):
        meta = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    torch.save(meta.state_dict(), tmp_path / "meta.pt")
    with pytest.raises(ValueError, match=r"meta.pt holds meta tensors \(0.weight, 0.bias, 1.weight, 1.bias, ...\): "
                                         "shapes without values"):
        load_state_dict_file(tmp_path / "meta.pt")


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(NotACheckpointError, match=r"is a folder, not a checkpoint file") as err:
        load_checkpoint(tmp_path)
    assert err.value.what == "a folder"


def test_a_wrapper_key_without_tensors_does_not_hide_the_weights(tmp_path):
    sd = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict()
    torch.save({"state_dict": {"lr": 0.1, "epochs": 3}, "model_state_dict": sd}, tmp_path / "ckpt.pt")
    state = load_state_dict_file(tmp_path / "ckpt.pt")
    assert state.keys() == sd.keys() and all(torch.equal(state[k], sd[k]) for k in sd)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_tied_and_strided_tensors_are_saved_as_their_values(tmp_path, suffix):
    # tied embedding/head weights share storage (safetensors refuses that), a transposed view is not contiguous
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    state = {"emb.weight": emb.weight, "head.weight": head.weight, "t": torch.arange(6.0).reshape(2, 3).t()}
    path = save_state_dict_file(state, tmp_path / f"w{suffix}")
    loaded = load_state_dict_file(path)
    assert all(torch.equal(loaded[k], v.detach()) for k, v in state.items())


class _Calibrated(torch.nn.BatchNorm1d):
    """Extra state computed from a weight (a quantization scale), and one holding an object that does not deep-copy
    (a lock: TypeError; a handle whose __deepcopy__ raises RuntimeError)."""

    holds = staticmethod(threading.Lock)

    def get_extra_state(self):
        return {"amax": self.weight.abs().amax(), "handle": self.holds()}

    def set_extra_state(self, state):
        self.amax = state["amax"]


class _Handle:
    def __deepcopy__(self, memo):
        raise RuntimeError("a handle cannot be copied")


@pytest.mark.parametrize("holds", [threading.Lock, _Handle])
def test_extra_state_that_cannot_be_copied_still_loads(monkeypatch, holds):
    monkeypatch.setattr(_Calibrated, "holds", staticmethod(holds))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), _Calibrated(4))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    state["1._extra_state"] = {"amax": torch.tensor(2.5)}
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), _Calibrated(4))
    load_weights_into(fresh, state)  # as model.load_state_dict(state) does: the backup is not worth a refusal
    assert float(fresh[1].amax) == 2.5 and torch.equal(fresh[0].weight, model[0].weight)


class _Scaled(torch.nn.BatchNorm1d):
    """Extra state computed from the weight while grad is on (a quantization scale that tracks grad)."""

    def get_extra_state(self):
        return {"amax": self.weight.abs().amax()}

    def set_extra_state(self, state):
        self.amax = state["amax"]


class _Configured(torch.nn.BatchNorm1d):
    """Extra state that is the module's own config dict, updated in place on load."""

    def __init__(self, n):
        super().__init__(n)
        self.config = {"bits": 8}

    def get_extra_state(self):
        return self.config

    def set_extra_state(self, state):
        self.config.update(state)


def test_a_failed_load_puts_back_extra_state_computed_from_a_weight_or_updated_in_place():
    """The rollback needs a real copy of each extra state taken first: one computed from a weight deep-copies only
    with grad off, and a dict the module hands out and then updates in place would change with the load."""
    scaled = torch.nn.Sequential(torch.nn.Linear(3, 4), _Scaled(4))
    with torch.no_grad():
        scaled[1].weight.fill_(3.0)
    scaled[1].amax = torch.tensor(3.0)
    configured = torch.nn.Sequential(torch.nn.Linear(3, 4), _Configured(4))
    for model, extra in ((scaled, {"amax": torch.tensor(5.0)}), (configured, {"bits": 4})):
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        bad = {**state, "1._extra_state": extra, "0.weight": torch.zeros(5, 3)}  # fails after set_extra_state ran
        with pytest.raises(ValueError, match="do not fit"):
            load_weights_into(model, bad)
    assert float(scaled[1].amax) == 3.0 and configured[1].config == {"bits": 8}


def test_a_dangling_link_is_named_as_one(tmp_path):
    import os

    from bnkit.onnx.graph import load_model

    for name in ("w.pt", "m.onnx"):
        os.symlink(tmp_path / "nowhere", tmp_path / name)
    with pytest.raises(FileNotFoundError, match="symbolic link that leads to no file"):
        load_checkpoint(tmp_path / "w.pt")
    with pytest.raises(FileNotFoundError, match="symbolic link that leads to no file"):
        load_model(tmp_path / "m.onnx")


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes are POSIX")
def test_a_pipe_is_named_as_no_regular_file_not_as_missing(tmp_path):
    """A FIFO (or <(...)) exists, but torch.load cannot seek in it: the error said 'no such file'."""
    import os

    os.mkfifo(tmp_path / "w.pt")
    with pytest.raises(NotACheckpointError, match="w.pt: it is not a regular file"):
        load_checkpoint(tmp_path / "w.pt")


def test_a_whole_pickled_model_whose_class_was_renamed_since(tmp_path, monkeypatch):
    """The module still imports but no longer holds the class (pickle's find_class: AttributeError, not
    ImportError): with trust a ValueError saying the code cannot be found, without it unsafe."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "fa14_netmod.py"
    module.write_text("import torch\n\n\nclass Net(torch.nn.Linear):\n    pass\n")
    importlib.invalidate_caches()
    netmod = importlib.import_module("fa14_netmod")
    path = tmp_path / "net.pt"
    torch.save(netmod.Net(2, 2), path)
    module.write_text("import torch\n")  # Net renamed or removed since
    monkeypatch.delitem(sys.modules, "fa14_netmod")
    importlib.invalidate_caches()
    with pytest.raises(AttributeError):  # the oracle: torch.load cannot find the class
        torch.load(path, weights_only=False)
    with pytest.raises(ValueError, match="code cannot be found") as info:
        load_checkpoint(path, trust=True)
    assert not isinstance(info.value, NotACheckpointError)  # the file is whole; its code is missing
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)


def _zip_with_an_empty_central_directory(tmp_path) -> bytes:
    """A local file entry (so the file starts with PK\\x03\\x04) and a central directory that lists nothing."""
    zipped = tmp_path / "one.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("stray.txt", b"left behind")
    data = zipped.read_bytes()
    start = data.rfind(b"PK\x01\x02")  # the central directory: dropped
    return data[:start] + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0, 0, 0, start, 0)


def _onnx_without_ir_version() -> bytes:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, producer_name="onnx.helper")
    model.ClearField("ir_version")  # so its first field is the producer name, not ir_version
    data = model.SerializeToString()
    assert onnx.load_from_string(data).producer_name == "onnx.helper"
    return data


def _safetensors_header_only(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


_CUT_3 = "a" * 62 + "日本"  # 日 is 3 bytes: 2 of them in the 64 bytes read


_CUT_4 = "a" * 61 + "😀 text"  # 4 bytes: 3 of them in the 64 bytes read


_TEXT_NAMING_ONNX = b'{"framework": "onnx", "epochs": 3}\n'


def test_a_text_file_naming_onnx_is_no_onnx_model(tmp_path):
    """The oracle for the sample above: onnx itself cannot read it."""
    onnx = pytest.importorskip("onnx")
    (tmp_path / "config.pt").write_bytes(_TEXT_NAMING_ONNX)
    with pytest.raises(Exception, match="(?i)pars|wire|decode|protobuf"):
        onnx.load(tmp_path / "config.pt")


_SAMPLES = {
    "cut-3-byte-char": (lambda tmp: _CUT_3.encode(), f"a text file (it starts with {'a' * 32!r})"),
    "cut-4-byte-char": (lambda tmp: _CUT_4.encode(), f"a text file (it starts with {'a' * 32!r})"),
    "empty": (lambda tmp: b"", "an empty file"),
    "onnx-without-ir-version": (
        lambda tmp: _onnx_without_ir_version(),
        "an ONNX model (read it with onnx, or pass it where an .onnx file is expected)"),
    "text-naming-onnx": (  # was called an ONNX model for the word; oracle: onnx.load refuses it (test below)
        lambda tmp: _TEXT_NAMING_ONNX, f"a text file (it starts with {_TEXT_NAMING_ONNX.decode()[:32]!r})"),
    "zip-with-empty-central-directory": (
        _zip_with_an_empty_central_directory, "a zip archive without PyTorch's data.pkl (it holds nothing)"),
}


@pytest.mark.parametrize("sample", sorted(_SAMPLES))
def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path, sample):
    make, what = _SAMPLES[sample]
    path = tmp_path / "model.pt"
    path.write_bytes(make(tmp_path))
    if sample.startswith("zip"):
        with zipfile.ZipFile(path) as archive:  # the oracle: zipfile reads it, and it lists nothing
            assert archive.namelist() == []
    with pytest.raises(NotACheckpointError) as info:
        load_checkpoint(path)
    assert info.value.what == what
    assert f"is {what}, not a PyTorch checkpoint" in str(info.value)


def test_header_only_safetensors_under_a_pt_name_are_read_as_safetensors(tmp_path):
    """A safetensors file with no tensors ends where its header ends (8 + header length == size): it is still
    safetensors, read as safetensors reads it; one whose header promises bytes the file lacks is an invalid
    safetensors file, not 'a file of unknown format'."""
    from safetensors.torch import load_file

    empty = tmp_path / "empty.pt"
    empty.write_bytes(_safetensors_header_only(b'{"__metadata__":{"step":"3"}}'))
    assert load_checkpoint(empty) == load_file(empty) == {}
    short = tmp_path / "short.pt"
    short.write_bytes(_safetensors_header_only(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'))
    with pytest.raises(Exception):  # noqa: B017 - the oracle: safetensors refuses it
        load_file(short)
    with pytest.raises(NotACheckpointError, match="not a valid safetensors file"):
        load_checkpoint(short)


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


def test_new_state_dict_files_get_open_s_mode(tmp_path):
    names = ["new.safetensors", "new.pt"]
    subprocess.run([sys.executable, "-c", SAVE_WITH_UMASK, str(tmp_path), *names], env=bnkit_env(), check=True,
                   timeout=60)
    reference = file_mode(tmp_path / "reference")
    assert reference == 0o666 & ~0o027
    for name in names:
        assert oct(file_mode(tmp_path / name)) == oct(reference), name


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_an_existing_state_dict_file_keeps_its_mode(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    save_state_dict_file(nn.BatchNorm1d(3).state_dict(), path)
    assert file_mode(path) == 0o640
    assert path.read_bytes() != b"old"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_saving_copies_only_tensors_that_do_not_hold_their_own_storage(tmp_path, suffix, monkeypatch):
    """A state dict of tensors that each hold their whole storage (a folded copy of a model, recalibrate's output
    checkpoint) is written as it is: copying it first held a second copy of the model's weights in memory. Views
    and strided tensors are still written as their values alone, and tied ones for safetensors (which refuses
    them); torch.save stores tied ones once, so a .pt file keeps them tied (they were copied apart: review)."""
    import safetensors.torch

    base = torch.arange(12.0)
    emb = torch.randn(5, 3)
    state = {"own": torch.randn(4, 3), "ints": torch.arange(5), "emb": emb, "tied": emb, "view": base[2:8],
             "whole_view": base.view(3, 4), "t": torch.randn(2, 3).t(), "empty": torch.zeros(0),
             "empty2": torch.ones(0, 2),
             # lazy views whose memory holds other values (safetensors wrote those: review)
             "conj": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),
             "neg": torch._neg_view(torch.ones(2))}
    given = {}
    if suffix == ".pt":
        real = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f, **kw: given.update(obj) or real(obj, f, **kw))
    else:
        real = safetensors.torch.save_file
        monkeypatch.setattr(safetensors.torch, "save_file",
                            lambda obj, f, **kw: given.update(obj) or real(obj, f, **kw))
    loaded = load_state_dict_file(save_state_dict_file(state, tmp_path / f"w{suffix}"))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    shared = {k: given[k].untyped_storage().data_ptr() == v.untyped_storage().data_ptr() for k, v in state.items()
              if v.numel()}
    assert shared == {"own": True, "ints": True, "emb": True, "tied": suffix == ".pt", "view": False,
                      "whole_view": True, "t": False, "conj": False, "neg": False}
    assert loaded["conj"].tolist() == [1 - 2j, 3 + 4j] and loaded["neg"].tolist() == [-1.0, -1.0]
    ptrs = [t.untyped_storage().data_ptr() for k, t in given.items() if t.numel() and k != "tied"]
    assert len(ptrs) == len(set(ptrs))  # no two other entries share a storage
    if suffix == ".pt":  # the file holds one storage for both, as torch.save(state) writes it
        again = torch.load(tmp_path / "w.pt", weights_only=True)
        assert again["tied"].untyped_storage().data_ptr() == again["emb"].untyped_storage().data_ptr()


def test_mmap_reads_a_zip_file_whose_records_are_compressed_or_mis_sized(tmp_path):
    """torch maps each record at its offset with the size the pickle names, unchecked: a re-zipped checkpoint
    (records deflated) was read as compressed bytes (the audit of a healthy file found dead channels and negative
    variances), and a record 8 bytes longer than its tensor, with a valid CRC, as the wrong bytes (review). Oracle:
    torch.load without mmap, which reads the first right and refuses the second."""
    state = {"a": torch.arange(16.0), "b": torch.arange(100.0, 116.0)}
    torch.save(state, tmp_path / "orig.pt")
    with zipfile.ZipFile(tmp_path / "orig.pt") as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    for name, compression, grow in (("deflated.pt", zipfile.ZIP_DEFLATED, b""), ("long.pt", zipfile.ZIP_STORED,
                                                                                 b"\0" * 8)):
        with zipfile.ZipFile(tmp_path / name, "w", compression) as archive:
            for filename, data in records:
                archive.writestr(filename, data + (grow if filename.endswith("data/0") else b""))
    deflated = torch.load(tmp_path / "deflated.pt", weights_only=True)
    assert all(torch.equal(deflated[k], v) for k, v in state.items())
    loaded = load_checkpoint(tmp_path / "deflated.pt", mmap=True)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(RuntimeError, match="does not match expected size"):
        torch.load(tmp_path / "long.pt", weights_only=True)
    with pytest.raises(NotACheckpointError, match="does not match expected size"):
        load_checkpoint(tmp_path / "long.pt", mmap=True)


def test_mmap_maps_a_file_named_data_and_a_module_with_a_non_persistent_buffer(tmp_path, monkeypatch):
    """The record check took every member under a folder named data for a tensor record, so a file named data.pt
    (its zip root is data/) was never mapped; and it read a pickled module's tensors from its state dict, which
    leaves out non-persistent buffers, so such a module was read whole (review). Oracle: torch.load's own mmap
    argument, and the values saved."""
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("mmap", False)) or real(*a, **kw))
    state = {"w": torch.randn(50), "b": torch.arange(4.0), "empty": torch.zeros(0), "empty2": torch.ones(0, 2)}
    torch.save(state, tmp_path / "data.pt")
    loaded = load_checkpoint(tmp_path / "data.pt", mmap=True)
    assert all(torch.equal(loaded[k], v) for k, v in state.items()) and calls == [True]
    module = torch.nn.Linear(3, 4)
    module.register_buffer("pos", torch.arange(3.0), persistent=False)
    torch.save(module, tmp_path / "module.pt")
    calls.clear()
    loaded = load_checkpoint(tmp_path / "module.pt", mmap=True, trust=True)
    assert torch.equal(loaded.pos, module.pos) and torch.equal(loaded.weight, module.weight)
    assert calls == [True, True]  # refused as weights only, then loaded trusted: mapped both times


def test_mmap_refuses_records_of_other_sizes_in_another_order_and_a_tie_across_dtypes_is_saved(tmp_path):
    """Two records swapped (40 and 80 bytes): the sizes as a whole matched the storages', so the file was mapped
    and read the wrong bytes, past a record's end (review); each storage is now checked at its record's offset.
    Oracle: torch.load without mmap, which refuses the file. And a tensor beside a view of it in another dtype,
    kept tied, made torch.save refuse the state dict (it copies such a view apart)."""
    torch.save({"a": torch.ones(10), "b": torch.full((20,), 2.0)}, tmp_path / "orig.pt")
    with zipfile.ZipFile(tmp_path / "orig.pt") as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    swap = {"orig/data/0": "orig/data/1", "orig/data/1": "orig/data/0"}
    with zipfile.ZipFile(tmp_path / "swapped.pt", "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name, records[swap.get(name, name)])
    with pytest.raises(RuntimeError, match="does not match expected size"):
        torch.load(tmp_path / "swapped.pt", weights_only=True)
    with pytest.raises(NotACheckpointError, match="does not match expected size"):
        load_checkpoint(tmp_path / "swapped.pt", mmap=True)
    # a record emptied, an unreferenced one of its size beside it: the empty record was left out of the pairing and
    # the spare one paired with the storage (review)
    torch.save({"w": torch.ones(10)}, tmp_path / "one.pt")
    with zipfile.ZipFile(tmp_path / "one.pt") as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(tmp_path / "spare.pt", "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name, b"" if name == "one/data/0" else data)
            if name == "one/data/0":
                archive.writestr("one/data/1", torch.full((10,), 2.0).numpy().tobytes())
    with pytest.raises(NotACheckpointError, match="does not match expected size"):
        load_checkpoint(tmp_path / "spare.pt", mmap=True)
    w = torch.randn(6, 4)
    loaded = torch.load(save_state_dict_file({"a": w, "i": w.view(torch.int32)}, tmp_path / "o.pt"),
                        weights_only=True)
    assert torch.equal(loaded["a"], w) and torch.equal(loaded["i"], w.view(torch.int32))


@pytest.mark.parametrize("layout", ["zip", "legacy", "zip named .safetensors"])
def test_mmap_maps_zip_checkpoints_and_reads_the_others(tmp_path, layout, monkeypatch):
    """load_checkpoint(mmap=True) (the audit's): a large .pt was read whole into memory to audit a few BN buffers
    (1.3 GB resident for a 1 GiB file; mapped, 0.23 GB) (review). torch maps zip files given by path only."""
    path = tmp_path / ("w.safetensors" if "safetensors" in layout else "w.pt")
    state = {"w": torch.randn(5), "n": torch.arange(3)}
    torch.save(state, path, _use_new_zipfile_serialization=layout != "legacy")
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("mmap", False)) or real(*a, **kw))
    loaded = load_checkpoint(path, mmap=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    assert calls == [layout == "zip"]
    loaded["w"].add_(1)  # copy-on-write: the file keeps its values
    assert torch.equal(load_checkpoint(path)["w"], state["w"])
