"""Mutation run M10's survivors in the drop-in layers, the frozen layers and freeze_bn, each now pinned.

Oracles: closed-form batch normalization in float64, PyTorch's own F.batch_norm, the layers' documented types."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from bnkit.torch import BatchNorm2d, FrozenBatchNorm2d, freeze_bn


@pytest.mark.parametrize("extras", [{"debias": True}, {"virtual_batch_size": 8}, {"running_var_rule": "biased"}])
def test_the_extras_training_output_uses_the_layers_own_eps(extras):
    """eps = 0.1 on inputs of variance ~0.04: normalizing with 1e-5 instead would be far off."""
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.2
    layer = BatchNorm2d(3, eps=0.1, affine=False, dtype=torch.float64, **extras).train()
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(layer(x), (x - mean) / torch.sqrt(var + 0.1))


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_a_frozen_layer_refuses_an_eps_that_is_not_positive(eps):
    with pytest.raises(ValueError, match="eps must be positive"):
        FrozenBatchNorm2d(3, eps=eps)


def test_extras_train_a_layer_whose_running_buffers_were_set_to_none():
    """As nn.BatchNorm does, a layer whose running_mean/var are None normalizes with batch statistics only
    (here per ghost batch); before, the extras' update crashed on None.copy_."""
    layer = BatchNorm2d(3, virtual_batch_size=2).train()
    layer.running_mean = layer.running_var = None
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    want = torch.cat([F.batch_norm(c, None, None, layer.weight, layer.bias, True, 0.0, layer.eps) for c in x.split(2)])
    torch.testing.assert_close(layer(x), want)


def test_renorm_clip_of_an_int_or_the_next_step_gives_floats():
    """Documented: floats, unless the step is a tensor (then float64 tensors on its device)."""
    layer = BatchNorm2d(3, renorm=True, renorm_schedule=(1, 4, 3))
    for rmax, dmax in (layer.renorm_clip(), layer.renorm_clip(2)):
        assert type(rmax) is float and type(dmax) is float
    rmax, dmax = layer.renorm_clip(torch.tensor(2))
    assert rmax.dtype == dmax.dtype == torch.float64


def test_a_stats_frozen_layer_passes_train_and_eval_on_to_its_submodules():
    """A parametrized weight lives in submodules (parametrizations.weight): their mode must follow model.train()
    and model.eval() as nn.Module.train would pass it on, while the frozen layer itself stays in eval mode."""
    bn = nn.BatchNorm2d(3)
    parametrize.register_parametrization(bn, "weight", nn.Identity())
    model = nn.Sequential(bn)
    freeze_bn(model, affine=False)
    inner = bn.parametrizations.weight[0]
    model.eval()
    assert not inner.training and not bn.training
    model.train()
    assert inner.training and not bn.training


def test_fold_and_export_send_a_parallel_wrappers_inputs_to_its_device(monkeypatch, tmp_path):
    """Review R8 / the GPU run: fold_bn, fold_plan and export_onnx run the module inside DataParallel, which a GPU
    machine has moved to cuda:0, so they send the inputs there as the wrapper would (fold_plan did not). Without
    a GPU: device_ids set by hand (the oracle is the wrapper's own attribute), the device asked for recorded, and
    the inputs moved where the module really is (so the test runs on a GPU machine too)."""
    import bnkit.torch.export as export_module
    import bnkit.torch.fold as fold_module
    from bnkit.torch import export_onnx, fold_bn, fold_plan
    from bnkit.torch.zoo import VGGBN

    from bnkit.torch.modules import to_device

    wrapped = nn.DataParallel(VGGBN().eval())
    here = next(wrapped.module.parameters()).device  # the CPU here; cuda:0 on a machine with CUDA
    wrapped.device_ids = [torch.device("cuda", 0)]
    sent = []

    def record(batch, device):  # records where the inputs are asked to go; moves them where the module really is
        sent.append(device)
        return to_device(batch, here)

    monkeypatch.setattr(fold_module, "to_device", record)
    monkeypatch.setattr(export_module, "to_device", record)
    x = torch.randn(2, 1, 8, 8)
    fold_bn(wrapped, x, force=True)  # force: fresh statistics
    fold_plan(wrapped, x, force=True)
    export_onnx(wrapped, x, tmp_path / "m.onnx", force=True, verify=False)
    assert sent == [torch.device("cuda", 0)] * 3
    sent.clear()
    fold_bn(wrapped.module, x.to(here), force=True)  # no wrapper: the inputs stay as given
    assert sent == []


def test_fold_takes_a_namedtuple_input():
    """Review R8: fold_bn's input copy rebuilt a namedtuple from one generator (TypeError: missing 'scale')."""
    from collections import namedtuple

    from bnkit.torch import fold_bn

    Batch = namedtuple("Batch", "image scale")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, batch):
            return self.bn(self.conv(batch.image)) * batch.scale

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    batch = Batch(torch.randn(4, 3, 8, 8), torch.tensor(2.0))
    folded, report = fold_bn(net, (batch,))
    assert [f.bn for f in report.folded] == ["bn"]
    with torch.no_grad():
        torch.testing.assert_close(folded(batch), net(batch), rtol=1e-5, atol=1e-5)


def test_to_device_moves_a_packed_sequence_as_one():
    """Review R8: rebuilt field by field, its batch_sizes left the CPU and PackedSequence refused them. Oracle:
    PackedSequence.to itself (data moved, batch_sizes kept on the CPU); the meta device stands in for a GPU."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from bnkit.torch.modules import to_device

    packed = pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 2]))
    want = packed.to(torch.device("meta"))
    got = to_device({"seq": packed}, torch.device("meta"))["seq"]
    assert (got.data.device, got.batch_sizes.device) == (want.data.device, want.batch_sizes.device)
