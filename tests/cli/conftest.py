"""Every CLI test gets its own sys.path: the commands put the current folder on it (to import the user's
--model and --data factories from where they run), and that must not leak into later tests. Fixtures several CLI
test files use: ``files`` (an MLP's weights, inputs and ONNX export in the current folder) and ``user_module``."""
import sys

import pytest


@pytest.fixture(autouse=True)
def _own_sys_path():
    """Restored in place, after the test's own monkeypatch (set up later, torn down first) has undone its changes."""
    saved = sys.path[:]
    yield
    sys.path[:] = saved


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A state dict of MLP (w.pt), inputs for it (x.npy) and its ONNX export (m.onnx), in tmp_path, made the current
    folder."""
    import numpy as np
    import torch

    from bnkit.torch import export_onnx, save_state_dict_file
    from bnkit.torch.zoo import MLP as Net

    torch.manual_seed(0)
    net = Net()
    save_state_dict_file(net.state_dict(), tmp_path / "w.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32))
    export_onnx(net.eval(), torch.randn(4, 64), tmp_path / "m.onnx", force=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


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
