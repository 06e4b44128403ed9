"""The audit's batch-statistics stand-in against PyTorch's own training-mode BatchNorm (float64 oracle)."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnkit.torch import audit_moments
from bnkit.torch.audit_moments import Collector


@pytest.mark.parametrize("shape", [(64, 5), (16, 5, 3), (8, 5, 2, 2), (6, 5, 7, 9), (4, 5, 3, 4, 5), (8, 5, 40, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("kernel", [True, False])  # False: as on a device without the training-mode kernel path
def test_stand_in_normalizes_like_training_mode_and_keeps_exact_moments(shape, dtype, affine, kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(audit_moments, "_KERNEL_STATS_DEVICES", ())
    torch.manual_seed(0)
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](5, affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
    bn.eval()
    if dtype == torch.float64:
        bn.double()  # PyTorch's own layers refuse float64 input with float32 parameters
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 40).to(dtype)
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    buffers = {k: b.clone() for k, b in bn.named_buffers()}
    col = Collector(bn)
    undo = col.attach(bn)
    with torch.no_grad():
        out = bn(x)
    undo()
    assert out.dtype == dtype and out.shape == x.shape
    x64 = x.double()
    w = bn.weight.double() if affine else None
    b = bn.bias.double() if affine else None
    ref = F.batch_norm(x64, None, None, w, b, True, 0.0, bn.eps)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    dims = [0] + list(range(2, len(shape)))
    moments = col.pool()
    assert moments.count == x64.numel() // 5
    torch.testing.assert_close(torch.from_numpy(moments.mean), x64.mean(dims), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(moments.var), x64.var(dims, correction=0), rtol=1e-4, atol=1e-6)
    for k, v in bn.named_buffers():  # nothing the layer keeps was touched
        assert torch.equal(v, buffers[k]), k
    assert "forward" not in vars(bn)  # the stand-in is gone


@pytest.mark.parametrize("kernel", [True, False])
def test_tiny_and_zero_variances_are_kept_to_a_fraction_of_eps(kernel, monkeypatch):
    """Calls keep ``1 / sqrt(var + eps)``: the recovered variance is exact to about 1e-7 (var + eps)."""
    if not kernel:
        monkeypatch.setattr(audit_moments, "_KERNEL_STATS_DEVICES", ())
    torch.manual_seed(1)
    bn = nn.BatchNorm1d(3).eval()
    std = torch.tensor([1e-4, 0.0, 10.0], dtype=torch.float64)
    x = (torch.randn(64, 3, dtype=torch.float64) * std + torch.tensor([5.0, -2.0, 1e3])).float()
    col = Collector(bn)
    undo = col.attach(bn)
    with torch.no_grad():
        bn(x)
        bn(x[:32] * 2)
    undo()
    x64 = torch.cat([x[:64], x[:32] * 2]).double()
    var = x64.var(0, correction=0).numpy()
    moments = col.pool()
    assert (abs(moments.var - var) <= 1e-6 * (var + bn.eps)).all(), (moments.var, var)
    per_call = col.batch_vars()  # unbiased, per call
    ref = torch.stack([x.double().var(0), (x[:32] * 2).double().var(0)]).numpy()
    assert (abs(per_call - ref) <= 1e-6 * (ref + bn.eps)).all(), (per_call, ref)
    assert per_call[0, 1] <= 1e-6 * bn.eps  # the constant channel
