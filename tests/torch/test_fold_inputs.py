"""fold_bn, fold_plan and export_onnx on the inputs a model takes: a namedtuple batch, and the inputs of a parallel
wrapper (DataParallel), sent to the device its module runs on as the wrapper itself would send them.

Oracles: the unfolded model's own eval output, and the wrapper's own device_ids.
"""
from __future__ import annotations

import torch
from torch import nn


def test_fold_and_export_send_a_parallel_wrappers_inputs_to_its_device(monkeypatch, tmp_path):
    """fold_bn, fold_plan and export_onnx run the module inside DataParallel, which a GPU machine has moved to
    cuda:0, so they send the inputs there as the wrapper would. Without a GPU: device_ids set by hand (the oracle
    is the wrapper's own attribute), the device asked for recorded, and the inputs moved where the module really
    is (so the test runs on a GPU machine too)."""
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
    """fold_bn's input copy rebuilds a namedtuple field by field (from one generator: TypeError, missing 'scale')."""
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
