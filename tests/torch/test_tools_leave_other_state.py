"""recalibrate and the audit with data run the model's forward, which may write state of its own: Glow's ActNorm
initializes its parameters from its first batch and sets a flag. Neither tool may keep such writes, whether it
returns or fails (the audit never changes the model; recalibrate changes only the BN statistics), as fold_bn and
fold_plan already did; and a container attribute a forward writes (a collections.Counter) comes back with its items
as they were. Oracles: the model's state before the call (torch.equal, ==), and for recalibrate the float64
population statistics of the BN input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnkit.torch import audit, recalibrate


class ActNorm(nn.Module):
    """Data-dependent initialization on the first forward (Kingma & Dhariwal, 2018): parameters and a plain flag."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, c, 1, 1))
        self.initialized = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            with torch.no_grad():
                self.loc.copy_(-x.mean((0, 2, 3), keepdim=True))
                self.scale.copy_(1 / (x.std((0, 2, 3), keepdim=True) + 1e-6))
            self.initialized = True
        return (x + self.loc) * self.scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), ActNorm(4)
        self.fail_at: int | None = None  # the call that raises, after the ActNorm ran
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn(self.conv(x)))
        self.calls += 1
        if self.fail_at is not None and self.calls > self.fail_at:
            raise RuntimeError("the forward failed")
        return out


def _net(fail_at: int | None) -> Net:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.num_batches_tracked += 10
    model.fail_at = fail_at
    return model


def _state(model: Net) -> tuple:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, model.act.initialized, model.calls,
            [p for p in model.parameters()])


@pytest.mark.parametrize("tool", ["audit", "recalibrate"])
@pytest.mark.parametrize("fail_at", [None, 0, 2])
def test_a_forward_that_initializes_a_layer_leaves_no_trace(tool, fail_at):
    data = [torch.randn(8, 3, 5, 5) * 3 + 1 for _ in range(3)]
    model = _net(fail_at)
    tensors, initialized, calls, params = _state(model)
    run = (lambda: audit(model, data)) if tool == "audit" else (lambda: recalibrate(model, data, progress=False))
    if fail_at is None:
        run()
    else:
        with pytest.raises((ValueError, RuntimeError), match="the forward failed"):
            run()
    assert not model.act.initialized and not initialized and model.calls == calls
    assert [p for p in model.parameters()] == params  # the same objects: an optimizer holding them still works
    recalibrated = tool == "recalibrate" and fail_at is None
    for k, v in model.state_dict().items():
        if not (recalibrated and k.startswith("bn.")):
            assert torch.equal(v, tensors[k]), k
    if recalibrated:  # the statistics, and only they, changed: to those of the BN input over every batch
        with torch.no_grad():
            x = torch.cat([model.conv(b) for b in data]).double().transpose(0, 1).reshape(4, -1).numpy()
        np.testing.assert_allclose(model.bn.running_mean.numpy(), x.mean(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model.bn.running_var.numpy(), x.var(1, ddof=1), rtol=1e-5, atol=1e-6)


class Counting(nn.Module):
    """Counts the input shapes it sees in a collections.Counter attribute."""

    def __init__(self) -> None:
        super().__init__()
        from collections import Counter

        self.shapes = Counter({"(8, 4, 5, 5)": 3})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes[str(tuple(x.shape))] += 1
        return x


@pytest.mark.parametrize("tool", ["audit", "recalibrate", "fold_plan", "fold_bn"])
def test_a_counter_attribute_comes_back_with_its_counts(tool):
    """Putting a dict's items back with update() turned a Counter's (key, count) pairs into new keys counted once:
    Counter({('(8, 4, 5, 5)', 3): 1}). Oracle: the Counter as it was (fold_bn: in the folded copy)."""
    from collections import Counter

    from bnkit.torch import fold_bn, fold_plan

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), Counting()).eval()
    with torch.no_grad():
        model[1].running_var.fill_(2.0)  # statistics a fold accepts
        model[1].num_batches_tracked.fill_(100)
    data = [torch.randn(8, 3, 5, 5) for _ in range(2)]
    if tool == "audit":
        audit(model, data)
    elif tool == "recalibrate":
        recalibrate(model, data, progress=False)
    elif tool == "fold_plan":
        fold_plan(model, data[0])
    else:
        model = fold_bn(model, data[0])[0]
    assert type(model[-1].shapes) is Counter and model[-1].shapes == Counter({"(8, 4, 5, 5)": 3})


class Recording(nn.Module):
    """Writes a private list and Counter, a dict subclass whose __setitem__ wraps values, and moves an OrderedDict's
    first key last."""

    class History(dict):
        def __setitem__(self, key, value) -> None:  # keeps every value set
            super().__setitem__(key, [*self.get(key, []), value])

    def __init__(self) -> None:
        super().__init__()
        from collections import Counter, OrderedDict

        self._seen: list = []
        self._counts = Counter({"calls": 2})
        self.history = Recording.History()
        dict.__setitem__(self.history, "lr", [0.1])
        self.order = OrderedDict(a=1, b=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._seen.append(tuple(x.shape))
        self._counts["calls"] += 1
        self.history["lr"] = 0.2
        self.order.move_to_end("a")
        return x


@pytest.mark.parametrize("tool", ["audit", "recalibrate", "fold_plan"])
def test_private_and_subclassed_containers_come_back_as_they_were(tool):
    """Containers under a private name (self._seen) were skipped, so every write stayed; putting a dict's items back
    through a subclass's own __setitem__ wrapped them again ({'lr': [[0.1]]}); an OrderedDict keeps its order.
    Oracle: the containers as they were."""
    from collections import Counter

    from bnkit.torch import fold_plan

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), Recording()).eval()
    with torch.no_grad():
        model[1].running_var.fill_(2.0)
        model[1].num_batches_tracked.fill_(100)
    data = [torch.randn(8, 3, 5, 5) for _ in range(2)]
    {"audit": lambda: audit(model, data), "recalibrate": lambda: recalibrate(model, data, progress=False),
     "fold_plan": lambda: fold_plan(model, data[0])}[tool]()
    rec = model[-1]
    assert rec._seen == [] and rec._counts == Counter({"calls": 2})
    assert dict(rec.history) == {"lr": [0.1]} and list(rec.order) == ["a", "b"]


class HooksOnce(nn.Module):
    """Hooks its Linear on its first forward and keeps the handle (to detach it later): in a private list made in
    ``__init__`` (``keep="list"``), or made by that forward (``"new list"``), in a tuple, or in a dict."""

    def __init__(self, keep: str) -> None:
        super().__init__()
        self.lin, self.bn, self.keep = nn.Linear(3, 3), nn.BatchNorm1d(3), keep
        if keep == "list":
            self._handles: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "_handles", None):
            handle = self.lin.register_forward_hook(lambda m, i, out: out * 2)
            if self.keep == "list":
                self._handles.append(handle)
            else:
                self._handles = {"new list": [handle], "tuple": (handle,), "dict": {"lin": handle}}[self.keep]
        return self.bn(self.lin(x))


@pytest.mark.parametrize("keep", ["list", "new list", "tuple", "dict"])
@pytest.mark.parametrize("tool", ["audit", "recalibrate", "fold_plan"])
def test_a_hook_a_forward_registers_goes_with_the_handle_list_it_is_kept_in(tool, keep):
    """The handle list was put back (emptied, or its attribute dropped) but the hook stayed on the layer, so every
    later forward added one more (outputs x2, x4, ...) and the model could no longer detach them. Oracle: a deep copy
    taken before, run after."""
    import copy

    from bnkit.torch import fold_plan

    torch.manual_seed(0)
    model = HooksOnce(keep).eval()
    with torch.no_grad():
        model.bn.running_var.fill_(2.0)
        model.bn.num_batches_tracked.fill_(100)
    before = copy.deepcopy(model)
    data = [torch.randn(8, 3) for _ in range(2)]
    {"audit": lambda: audit(model, data), "recalibrate": lambda: recalibrate(model, data, progress=False),
     "fold_plan": lambda: fold_plan(model, data[0])}[tool]()
    assert not getattr(model, "_handles", None) and len(model.lin._forward_hooks) == 0
    if tool != "recalibrate":  # recalibrate changes the BN statistics, on purpose
        with torch.no_grad():
            torch.testing.assert_close(model(data[0]), before(data[0]), rtol=0, atol=0)


def test_hooks_whose_handles_others_hold_stay_after_the_tool():
    """Putting the state back removed every hook registered during the call: a bn_guard open around recalibrate lost
    its batch-of-one check for the rest of its block, and a hook another party registered meanwhile (here from the
    data iterator) vanished. Only hooks whose handles the model itself came to hold go. Oracles: the guard's report
    and the other party's hook being called, as without the tool."""
    from bnkit.torch import BNGuardError, bn_guard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[1].running_var.fill_(2.0)
        model[1].num_batches_tracked.fill_(100)
    seen, handles = [], []

    def data():
        for i in range(3):
            if i == 1:  # someone else hooks the model while the pass runs, and keeps the handle
                handles.append(model[2].register_forward_hook(lambda m, inp, out: seen.append(out.shape)))
            yield torch.randn(8, 3)

    with bn_guard(model, ignore=["training"]):
        recalibrate(model, data(), progress=False)
        model.train()
        with pytest.raises(BNGuardError) as caught:
            model(torch.randn(1, 3))
        assert [f.code for f in caught.value.findings] == ["batch_of_one"]
    model.eval()
    seen.clear()
    with torch.no_grad():
        model(torch.randn(5, 3))
    assert seen == [torch.Size([5, 2])]
    handles[0].remove()
