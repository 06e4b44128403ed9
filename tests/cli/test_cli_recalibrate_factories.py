"""``bnkit recalibrate --data package.module:factory``: every form a factory may give (Datasets, iterables, lists of
NumPy or torch batches, tuples, namedtuples, DataLoaders) is prepared as an array file's data is (cast to the
model's dtype; integer ids kept), a --forward gets the batches as the factory yields them, and without --device
the batches go where the factory's model is.

Oracle: PyTorch's own BatchNorm in float64 (``momentum=None``, one training-mode forward over all the data, so
its running statistics are the data's exact mean and unbiased variance), compared with the buffers of the file
the command writes; exit codes.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnkit.cli import app
from bnkit.torch import load_state_dict_file

runner = CliRunner()
MODULE = "recal_factories"

SOURCE = '''
import numpy as np, torch
from torch import nn

X = np.random.default_rng(0).normal(2, 3, (40, 1, 8, 8))  # float64, as NumPy and sklearn pipelines make it
Y = np.arange(40) % 3
IDX = np.random.default_rng(1).integers(0, 10, (40, 2))   # int64 token ids
SEEN = []                                                  # the device of each batch the model is called with

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())

def embed():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 3), nn.Flatten(), nn.BatchNorm1d(6))

def on_meta():  # stands in for a factory returning model.cuda() on a machine without a GPU
    net = make().to("meta")
    net.register_forward_pre_hook(lambda module, args: SEEN.append(args[0].device))
    return net

def on_cuda():
    return make().cuda()

class Samples(torch.utils.data.Dataset):
    def __len__(self): return len(X)
    def __getitem__(self, i): return X[i]

class Pairs(Samples):
    def __getitem__(self, i): return X[i], Y[i]

class Stream(torch.utils.data.IterableDataset):
    def __iter__(self): return iter(X)

def dataset(): return Samples()
def pairs(): return Pairs()
def stream(): return Stream()
def np_batches(): return np.split(X, 4)                                  # README: "... an array or batches"
def np_pairs(): return [(x.astype("float32"), y) for x, y in zip(np.split(X, 4), np.split(Y, 4))]
def torch64(): return list(torch.from_numpy(X).split(10))
def torch32(): return list(torch.from_numpy(X).float().split(10))     # already as the model takes them
def loader():
    data = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))
    return torch.utils.data.DataLoader(data, batch_size=10)
def dicts(): return [{"pixels": x, "id": 0} for x in np.split(X, 4)]
from collections import namedtuple
Batch = namedtuple("Batch", "x y")
def named(): return [Batch(x, y) for x, y in zip(np.split(X, 4), np.split(Y, 4))]  # float64 inputs in a namedtuple
def feed(model, batch):                    # written for the NumPy batches the factory yields
    assert isinstance(batch["pixels"], np.ndarray), type(batch["pixels"])
    return model(torch.from_numpy(batch["pixels"]).float())
def idx_batches(): return np.split(IDX, 4)
class TiedNet(nn.Module):                  # a language-model head tied to its embedding
    def __init__(self):
        super().__init__()
        self.emb, self.bn, self.out = nn.Embedding(10, 6), nn.BatchNorm1d(6), nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight
    def forward(self, ids): return self.out(self.bn(self.emb(ids).mean(1)))
def tied():
    torch.manual_seed(0)
    return TiedNet()
'''


def invoke(*args: str):
    return runner.invoke(app, ["recalibrate", "--no-progress", *args], env={"COLUMNS": "200"})


@pytest.fixture
def user(tmp_path, monkeypatch):
    """The module ``recal_factories`` (models and data factories), importable from the current folder (tmp_path)."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield tmp_path
    sys.modules.pop(MODULE, None)


def torch_oracle(model_spec: str, x: np.ndarray) -> dict[str, torch.Tensor]:
    """PyTorch's BatchNorm statistics of the model's input ``x`` in float64: the module's model, a float64 copy
    whose BN has ``momentum=None`` (cumulative average), one training-mode forward over all of ``x``."""
    import importlib

    net = getattr(importlib.import_module(MODULE), model_spec)().double().train()
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    bn.momentum = None
    with torch.no_grad():
        net(torch.from_numpy(x) if x.dtype.kind in "iu" else torch.from_numpy(x.astype(np.float64)))
    return {k: v for k, v in net.state_dict().items() if "running" in k}


def assert_written_statistics(out, model_spec: str, x: np.ndarray, batches: int) -> None:
    got = load_state_dict_file(out)
    expected = torch_oracle(model_spec, x)
    assert expected, "the oracle found no BatchNorm statistics"
    for key, value in expected.items():
        assert got[key].dtype == torch.float32, key  # the model's dtype: the data was cast to it, not the model
        np.testing.assert_allclose(got[key].cpu().double().numpy(), value.numpy(), rtol=2e-6, atol=1e-6, err_msg=key)
    bn = key.rsplit(".", 1)[0]
    assert int(got[f"{bn}.num_batches_tracked"]) == batches


def data_x(dtype=None) -> np.ndarray:
    import importlib

    x = importlib.import_module(MODULE).X
    return x if dtype is None else x.astype(dtype)


@pytest.mark.parametrize("factory, batches", [
    ("dataset", 3),     # map-style Dataset of float64 NumPy samples: default_collate makes float64 tensors
    ("pairs", 3),       # ... of (float64 sample, int label) tuples
    ("stream", 3),      # IterableDataset of float64 NumPy samples
    ("np_batches", 4),  # a list of float64 NumPy batches ("or batches")
    ("np_pairs", 4),    # a list of (float32 NumPy inputs, int NumPy labels) tuples
    ("torch64", 4),     # a list of float64 tensors
    ("loader", 4),      # a DataLoader of [float64 tensor, int tensor] lists
    ("named", 4),       # a list of namedtuple batches (rebuilt field by field, not from one generator)
])
def test_floating_data_from_a_factory_is_cast_to_the_models_dtype(user, factory, batches):
    """The same data as one float64 array is accepted (cast to float32): every other form a factory may give is
    too. Before: exit 2 ("Input type (double) and bias type (float)", or "a batch of type ndarray")."""
    out = user / "o.safetensors"
    result = invoke("--model", f"{MODULE}:make", "--data", f"{MODULE}:{factory}", "--batch-size", "16", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert_written_statistics(out, "make", data_x(np.float32), batches)


def test_with_forward_the_batches_reach_it_as_the_factory_yields_them(user):
    """Converting them would break a --forward written for NumPy batches; the user's function feeds them as the
    factory yields them. Oracle: the written statistics, and the function's own type check."""
    out = user / "o.pt"
    result = invoke("--model", f"{MODULE}:make", "--data", f"{MODULE}:dicts", "--forward", f"{MODULE}:feed",
                    "-o", str(out))
    assert result.exit_code == 0, result.output
    assert_written_statistics(out, "make", data_x(np.float32), 4)


def test_integer_numpy_batches_become_tensors_unchanged_for_models_that_take_indices(user):
    """int64 NumPy token ids become int64 tensors (an Embedding refuses floats): exact statistics of the
    embeddings. Before: exit 2, "don't know how to feed a batch of type ndarray"."""
    out = user / "o.pt"
    result = invoke("--model", f"{MODULE}:embed", "--data", f"{MODULE}:idx_batches", "-o", str(out))
    assert result.exit_code == 0, result.output
    import importlib

    assert_written_statistics(out, "embed", importlib.import_module(MODULE).IDX, 4)


def test_the_advice_for_batches_it_cannot_feed_names_the_option(user):
    """Dict batches without --forward: bad usage (exit 2, nothing written), and the advice is the CLI's option,
    not the Python argument ``forward=``."""
    out = user / "o.pt"
    result = invoke("--model", f"{MODULE}:make", "--data", f"{MODULE}:dicts", "-o", str(out))
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and not out.exists(), text
    assert "don't know how to feed a batch of type dict" in text, text
    assert "pass --forward package.module:fn" in text and "forward=" not in text, text


def test_without_device_the_batches_go_where_the_model_is(user, monkeypatch):
    """A factory's model off the CPU (the meta device here, as model.cuda() would be), no --device ("default:
    where the model is"): the model is called with batches on its own device. Before: with CPU batches, and
    "Tensor on device meta is not on the expected device cpu". The meta device holds no values, so recalibrate
    refuses such a model before its pass: that check is set aside here, where meta stands in for an accelerator;
    the run itself cannot finish, and fails later, writing nothing."""
    monkeypatch.setattr(sys.modules["bnkit.torch.recalibrate"], "refuse_meta", lambda *args: None)
    out = user / "o.pt"
    result = invoke("--model", f"{MODULE}:on_meta", "--data", f"{MODULE}:torch32", "-o", str(out))
    seen = sys.modules[MODULE].SEEN
    assert seen and all(d.type == "meta" for d in seen), (seen, result.output)
    assert "expected device" not in " ".join(result.output.split()), result.output
    assert result.exit_code in (1, 2) and not out.exists(), result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_factory_model_on_cuda_is_recalibrated_there_without_device(user):
    out = user / "o.pt"
    result = invoke("--model", f"{MODULE}:on_cuda", "--data", f"{MODULE}:torch32", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert_written_statistics(out, "make", data_x(np.float32), 4)


@pytest.mark.parametrize("layout", ["state dict", "checkpoint"])
def test_weights_tied_in_the_file_stay_tied_in_the_pt_it_writes(user, layout, monkeypatch):
    """--weights with an embedding tied to the output layer: each tensor was copied apart, so the .pt written held
    the tied weight twice (review; without --weights it was stored once). Oracle: torch.load's storages."""
    import importlib

    monkeypatch.syspath_prepend(str(user))
    state = importlib.import_module(MODULE).tied().state_dict()
    torch.save(state if layout == "state dict" else {"model": state, "epoch": 3}, "w.pt")
    result = invoke("--model", f"{MODULE}:tied", "--weights", "w.pt", "--data", f"{MODULE}:idx_batches", "-o", "r.pt")
    assert result.exit_code == 0, result.output
    out = torch.load("r.pt", weights_only=True)
    got = out if layout == "state dict" else out["model"]
    assert got["emb.weight"].untyped_storage().data_ptr() == got["out.weight"].untyped_storage().data_ptr()
    assert torch.equal(got["emb.weight"], state["emb.weight"]) and (layout == "state dict" or out["epoch"] == 3)
    assert not torch.equal(got["bn.running_mean"], state["bn.running_mean"])  # recalibrated


def test_batch_size_and_batches_beyond_sys_maxsize_mean_all_the_data(user):
    """islice takes at most sys.maxsize: --batches 2**63 failed with its message (naming no option) and --batch-size
    2**63 of an IterableDataset was blamed on the user's data. Oracle: the statistics of all the data, as
    2**63 - 1 gives."""
    out = user / "o.pt"
    result = invoke("--model", f"{MODULE}:make", "--data", f"{MODULE}:stream", "--batch-size", str(2**63),
                    "--batches", str(2**64), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert_written_statistics(out, "make", data_x(np.float32), 1)


@pytest.mark.parametrize("what, says", [("folder", "is a directory, not a data file"),
                                        ("missing", "no such data file")])
def test_data_path_without_a_data_suffix_is_named_for_what_it_is(user, what, says):
    """A folder or a missing path without a data suffix got 'expected a .npy, ... file or package.module:factory',
    leaving out why (README: one line naming the path and the reason)."""
    if what == "folder":
        (user / "valdata").mkdir()
    out = user / "o.pt"
    result = invoke("--model", f"{MODULE}:make", "--data", "valdata", "-o", str(out))
    assert result.exit_code == 2 and says in result.output and not out.exists(), result.output
