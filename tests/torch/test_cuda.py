"""The PyTorch toolkit on a CUDA device, against the same oracles as on the CPU.

Skipped without CUDA (CI has none); run on a GPU machine with
``pytest tests/torch/test_cuda.py``. Exactness checks use float64 models, whose CUDA
kernels never take TF32 shortcuts; float32 checks run with PyTorch's defaults, where
cuDNN convolutions use TF32 (``torch.backends.cudnn.allow_tf32`` is True), as a user's would.
"""
from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _helpers import calibrated, rel, stand_in_pass
from bnkit.torch import (
    BatchNorm2d,
    FrozenBatchNorm2d,
    audit,
    bn_guard,
    BNGuardError,
    bn_layers,
    convert_frozen,
    export_onnx,
    fold_bn,
    freeze_bn,
    protect_stats,
    recalibrate,
    revert_sync_bn,
)
from bnkit.torch.zoo import MLP, SmallResNet, VGGBN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def digits_like(n: int = 96, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return offset + torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)


def hooked_stats(model: nn.Module, batches, device: torch.device | str = "cpu"):
    """Per BN layer: float64 NumPy mean / unbiased variance of all its inputs and the ``num_batches_tracked``
    recalibration leaves (its calls, plus the layer's count unless ``momentum=None``), a copy of ``model`` run on
    ``device`` with PyTorch's own BN in training mode."""
    ref = copy.deepcopy(model).to(device)
    seen: dict[str, list[np.ndarray]] = {}
    for name, bn in bn_layers(ref):
        bn.train()
        bn.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(
            np.moveaxis(args[0].detach().double().cpu().numpy(), 1, 0).reshape(m.num_features, -1)))
    with torch.no_grad():
        for b in batches:
            ref(b.to(device))
    layers = dict(bn_layers(model))
    out = {}
    for name, parts in seen.items():
        allx = np.concatenate(parts, axis=1)
        bn = layers[name]
        count = len(parts) + (0 if bn.momentum is None else int(bn.num_batches_tracked))
        out[name] = (allx.mean(1), allx.var(1, ddof=1), count)
    return out


def assert_stats(model: nn.Module, ref, rtol: float) -> None:
    for name, bn in bn_layers(model):
        mean, var, count = ref[name]
        got_mean, got_var = bn.running_mean.double().cpu().numpy(), bn.running_var.double().cpu().numpy()
        assert np.all(np.abs(got_mean - mean) <= rtol * (np.abs(mean) + np.sqrt(var))), name
        np.testing.assert_allclose(got_var, var, rtol=rtol, err_msg=name)
        assert int(bn.num_batches_tracked) == count


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------------------- recalibrate


# moved: batches on the CPU, moved by device="cuda" (else already on the GPU); channels-last inputs and weights
@pytest.mark.parametrize("moved,layout", [(False, torch.contiguous_format), (True, torch.contiguous_format),
                                          (False, torch.channels_last)])
def test_recalibrate_on_cuda_is_exact_in_float64(moved, layout):
    torch.manual_seed(0)
    model = calibrated(SmallResNet(), digits_like().float()).double().to(CUDA, memory_format=layout)
    batches = [digits_like(n, seed=n, offset=3.0).contiguous(memory_format=layout) for n in (5, 40, 2, 17)]
    ref = hooked_stats(model, batches)
    flags = {n: m.training for n, m in model.named_modules()}
    feed = batches if moved else [b.to(CUDA) for b in batches]
    report = recalibrate(model, feed, device=CUDA if moved else None, progress=False)
    assert_stats(model, ref, rtol=1e-9)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(b.device.type == CUDA.type for b in model.buffers())
    assert report.batches == 4


def test_recalibrate_on_cuda_many_batches_and_large_offset_inputs_float32():
    """Over ``_FOLD_EVERY`` batches (statistics kept on the device between host transfers), and large inputs
    (the float64 upcast, which every CUDA input takes) with ``|mean| / std ~ 1e4``: the layer reading the data
    to 1e-6."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
    model = model.eval().to(CUDA)
    g = torch.Generator().manual_seed(1)
    batches = [(1e4 + torch.randn(40, 1, 48, 48, generator=g, dtype=torch.float64)).float() for _ in range(3)]
    batches += [torch.randn(3, 1, 48, 48, generator=g).add(1e4) for _ in range(70)]
    ref = hooked_stats(model, batches)
    recalibrate(model, [b.to(CUDA) for b in batches], progress=False)
    mean, var, count = ref["1"]
    assert np.max(np.abs(mean) / np.sqrt(var)) > 1e3
    np.testing.assert_allclose(model[1].running_mean.double().cpu().numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(model[1].running_var.double().cpu().numpy(), var, rtol=1e-6)
    assert int(model[1].num_batches_tracked) == count == 73  # a fresh layer: 0 + 73 calls


def test_recalibrate_on_cuda_float16_model_keeps_its_dtype_and_the_statistics_it_saw():
    """A ``.half()`` model: statistics reduced in float64 and stored in the float16 buffers. Oracle: the inputs
    each BN layer of the same float16 model saw with PyTorch's own training-mode BN, reduced in float64; the
    layer reading the data to float16's storage rounding, deeper ones to float16 forward rounding."""
    torch.manual_seed(0)
    model = calibrated(SmallResNet(), digits_like().float()).half().to(CUDA)
    batches = [digits_like(n, seed=n, offset=1.0).half().to(CUDA) for n in (32, 32, 7)]
    ref = hooked_stats(model, batches, CUDA)
    recalibrate(model, batches, progress=False)
    for name, bn in bn_layers(model):
        assert bn.running_mean.dtype == torch.float16 and bn.running_mean.device.type == CUDA.type
        mean, var, _ = ref[name]
        tol = 1e-3 if name == "stem.1" else 2e-2
        got_mean, got_var = bn.running_mean.double().cpu().numpy(), bn.running_var.double().cpu().numpy()
        assert np.all(np.abs(got_mean - mean) <= tol * (np.abs(mean) + np.sqrt(var))), name
        np.testing.assert_allclose(got_var, var, rtol=tol, err_msg=name)


def test_recalibrate_on_cuda_nonfinite_batch_changes_nothing():
    model = calibrated(MLP(), torch.randn(64, 64)).to(CUDA)
    before = state(model)
    batches = [torch.randn(16, 64, device=CUDA) for _ in range(4)]
    batches[2][3, 5] = float("nan")
    with pytest.raises(ValueError, match="batch 2"):
        recalibrate(model, batches, progress=False)
    assert_same_state(model, before)
    report = recalibrate(model, batches, on_nonfinite="skip", progress=False)
    assert report.skipped_batches == 1 and report.batches == 3


def test_recalibrate_under_nccl_world_of_one(tmp_path):
    """The NCCL branch of the gather (payload on the current CUDA device): one rank equals no process group."""
    import datetime

    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("NCCL not built in")
    torch.manual_seed(0)
    model = calibrated(SmallResNet(), digits_like().float()).double().to(CUDA)
    alone = copy.deepcopy(model)
    batches = [digits_like(n, seed=n).to(CUDA) for n in (9, 20)]
    recalibrate(alone, batches, progress=False)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        report = recalibrate(model, batches, progress=False)
    finally:
        dist.destroy_process_group()
    assert report.world_size == 1
    for (name, a), (_, b) in zip(bn_layers(model), bn_layers(alone)):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-12, atol=0, msg=name)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=0, msg=name)


@pytest.mark.parametrize("wrapper", ["DataParallel", "DistributedDataParallel"])
def test_recalibrate_through_a_parallel_wrapper_sends_cpu_batches_to_its_device(tmp_path, wrapper):
    """DataParallel / DDP (NCCL, world of one) around a CUDA model, fed CPU batches with no ``device``: the
    module inside runs on the wrapper's first device and reads exactly what PyTorch's own training-mode BN reads;
    the wrapper's flags and the buffers' device are as before."""
    import datetime

    import torch.distributed as dist

    torch.manual_seed(0)
    model = calibrated(SmallResNet(), digits_like().float()).double().to(CUDA)
    batches = [digits_like(n, seed=n, offset=2.0) for n in (6, 31, 2)]
    ref = hooked_stats(model, batches, CUDA)
    if wrapper == "DataParallel":
        wrapped = nn.DataParallel(model, device_ids=[0])
        flags = {n: m.training for n, m in wrapped.named_modules()}
        report = recalibrate(wrapped, batches, progress=False)
    else:
        if not dist.is_nccl_available():
            pytest.skip("NCCL not built in")
        dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
        try:
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[0])
            flags = {n: m.training for n, m in wrapped.named_modules()}
            report = recalibrate(wrapped, batches, progress=False)
        finally:
            dist.destroy_process_group()
    assert report.batches == 3
    assert_stats(model, ref, rtol=1e-9)
    assert all(b.device.type == CUDA.type for b in model.buffers())
    assert {n: m.training for n, m in wrapped.named_modules()} == flags


def test_recalibrate_cli_on_cuda_writes_portable_cpu_tensors(tmp_path):
    from typer.testing import CliRunner

    from bnkit.cli import app
    from bnkit.torch import load_state_dict_file, save_state_dict_file

    torch.manual_seed(0)
    model = calibrated(MLP(), torch.randn(64, 64))
    weights = tmp_path / "w.safetensors"
    save_state_dict_file(model.state_dict(), weights)
    data = np.random.default_rng(0).normal(size=(300, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    for out in ("r.safetensors", "r.pt"):
        result = CliRunner().invoke(app, [
            "recalibrate", "--model", "bnkit.torch.zoo:MLP", "--weights", str(weights), "--data",
            str(tmp_path / "x.npy"), "--device", CUDA.type, "-o", str(tmp_path / out)], terminal_width=200)
        assert result.exit_code == 0, result.output
        saved = load_state_dict_file(tmp_path / out)
        assert all(t.device.type == "cpu" for t in saved.values())  # loads on a machine without a GPU
        ref = copy.deepcopy(model)
        recalibrate(ref, torch.from_numpy(data).split(64), progress=False)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(saved[k], v, rtol=2e-5, atol=2e-6, msg=k)


# ----------------------------------------------------------------------------------------------- audit


def test_audit_cli_on_cuda_gives_the_cpu_report(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from bnkit.cli import app
    from bnkit.torch import save_state_dict_file

    audit_module = importlib.import_module("bnkit.torch.audit")  # the package attribute is the function
    ran_on, real = [], audit_module.audit  # where the model was when the CLI audited it
    monkeypatch.setattr(audit_module, "audit",
                        lambda net, *a, **k: ran_on.append(next(net.parameters()).device.type) or real(net, *a, **k))

    torch.manual_seed(0)
    model = calibrated(MLP(), torch.randn(64, 64), positive=True)
    ckpt = save_state_dict_file(model.state_dict(), tmp_path / "w.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(320, 64)).astype(np.float32))
    reports = {}
    for device in ("cpu", CUDA.type):
        result = CliRunner().invoke(app, ["audit", str(ckpt), "--model", "bnkit.torch.zoo:MLP", "--data",
                                          str(tmp_path / "x.npy"), "--device", device, "--json"])
        assert result.exit_code in (0, 1) and not isinstance(result.exception, Exception), result.exception
        reports[device] = json.loads(result.output)
    assert ran_on == ["cpu", CUDA.type]
    cpu, gpu = reports["cpu"], reports[CUDA.type]
    assert [s["layer"] for s in gpu["shifts"]] == [s["layer"] for s in cpu["shifts"]]
    for a, b in zip(gpu["shifts"], cpu["shifts"]):
        assert a["z_eq"] == pytest.approx(b["z_eq"], rel=1e-3), a["layer"]
    assert sorted(f["code"] for f in gpu["findings"]) == sorted(f["code"] for f in cpu["findings"])


@pytest.mark.parametrize("shape", [(64, 5), (16, 5, 3), (8, 5, 2, 2), (6, 5, 7, 9), (8, 5, 40, 40)])
def test_audit_stand_in_on_cuda_normalizes_like_training_mode(shape):
    """The batch-statistics stand-in (CUDA's training kernel for small inputs, two-pass otherwise) against
    PyTorch's own training-mode BatchNorm in float64, and its kept moments against float64 NumPy."""
    torch.manual_seed(0)
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](5).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    bn.to(CUDA)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 4).float().to(CUDA)
    buffers = {k: b.clone() for k, b in bn.named_buffers()}
    (out,), col = stand_in_pass(bn, x)
    x64 = x.double()
    ref = F.batch_norm(x64, None, None, bn.weight.double(), bn.bias.double(), True, 0.0, bn.eps)
    torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=5e-5)
    dims = [0] + list(range(2, len(shape)))
    moments = col.pool()
    np.testing.assert_allclose(moments.mean, x64.mean(dims).cpu().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(moments.var, x64.var(dims, correction=0).cpu().numpy(), rtol=1e-4, atol=1e-6)
    for k, v in bn.named_buffers():
        assert torch.equal(v, buffers[k]), k


# float32: the same findings as on the CPU; float16/bfloat16 models: the same shifts to their rounding
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-3), (torch.float16, 2e-2), (torch.bfloat16, 2e-2)])
def test_audit_on_cuda_ranks_the_shifted_layer_first_and_matches_the_cpu_audit(dtype, rel):
    torch.manual_seed(0)
    x = digits_like(640).float()
    model = calibrated(SmallResNet(), x, positive=True)
    bn = model.layers[0].bn1
    with torch.no_grad():
        bn.running_mean += 3 * torch.sqrt(bn.running_var + bn.eps)
    cpu_report = audit(model, x)  # float32 on the CPU
    gpu = copy.deepcopy(model).to(CUDA, dtype)
    before = state(gpu)
    report = audit(gpu, x)  # data on the CPU in float32, moved to the model's device and dtype batch by batch
    assert report.shifts[0].layer == "layers.0.bn1" and report.shifts[0].z_eq > 2.5
    assert {s.layer: s.z_eq for s in report.shifts} == pytest.approx({s.layer: s.z_eq for s in cpu_report.shifts},
                                                                     rel=rel)
    if dtype == torch.float32:
        assert [s.layer for s in report.shifts] == [s.layer for s in cpu_report.shifts]
        assert sorted(f.code for f in report.findings) == sorted(f.code for f in cpu_report.findings)
    assert_same_state(gpu, before)
    assert not any(m.training for m in gpu.modules())


# ------------------------------------------------------------------------------------------ fold, export


def test_fold_on_cuda_float64_is_exact_and_keeps_the_device():
    torch.manual_seed(0)
    x = digits_like(32)
    model = calibrated(VGGBN(), x.float()).double().to(CUDA)
    folded, report = fold_bn(model, x.to(CUDA))
    assert len(report.folded) == 5 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(p.device.type == CUDA.type for p in folded.parameters())
    with torch.no_grad():
        want, got = model(x.to(CUDA)), folded(x.to(CUDA))
    assert rel(got.cpu().numpy(), want.cpu().numpy()) < 1e-12
    assert report.max_rel_diff < 1e-12


def test_fold_verification_on_cuda_float32_compares_exact_float32():
    """PyTorch's default TF32 convolutions would put ~1e-3 between any two runs' outputs; the fold's check
    compares the two models in exact float32, and leaves the user's TF32 setting as it was."""
    torch.manual_seed(0)
    x = digits_like(64).float()
    model = calibrated(SmallResNet(widths=(32, 64)), x).to(CUDA)
    tf32 = torch.backends.cudnn.allow_tf32
    folded, report = fold_bn(model, x.to(CUDA))
    assert torch.backends.cudnn.allow_tf32 == tf32
    assert report.max_rel_diff < 1e-5, report.max_rel_diff


def test_export_onnx_from_a_cuda_model_verifies_against_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    x = digits_like(16).float()
    model = calibrated(SmallResNet(widths=(32, 64)), x).to(CUDA)
    tf32 = torch.backends.cudnn.allow_tf32
    report = export_onnx(model, x.to(CUDA), tmp_path / "m.onnx", fold=True)
    assert (tmp_path / "m.onnx").exists() and report.max_rel_diff <= 1e-4
    assert torch.backends.cudnn.allow_tf32 == tf32
    assert all(p.device.type == CUDA.type for p in model.parameters()) and not model.training


# ------------------------------------------------------------------------------- freeze, guard, layers


def test_drop_in_layer_on_cuda_is_bit_identical_to_pytorch_with_extras_off():
    torch.manual_seed(0)
    ours, theirs = BatchNorm2d(8).to(CUDA), nn.BatchNorm2d(8).to(CUDA)
    theirs.load_state_dict(ours.state_dict())
    for step in range(3):
        x = torch.randn(6, 8, 5, 5, device=CUDA, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        y, y2 = ours(x), theirs(x2)
        g = torch.randn_like(y)
        y.backward(g), y2.backward(g)
        assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad), step
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert torch.equal(ours.weight.grad, theirs.weight.grad)


@pytest.mark.parametrize("extras", [dict(renorm=True), dict(debias=True), dict(virtual_batch_size=4),
                                    dict(running_var_rule="biased")])
def test_drop_in_extras_on_cuda_match_the_cpu(extras):
    torch.manual_seed(0)
    cpu = BatchNorm2d(8, **extras).double()
    gpu = copy.deepcopy(cpu).to(CUDA)
    for _ in range(4):
        x = torch.randn(8, 8, 3, 3, dtype=torch.float64) * 2 + 1
        torch.testing.assert_close(gpu(x.to(CUDA)).cpu(), cpu(x), rtol=1e-10, atol=1e-10)
    gpu.eval(), cpu.eval()
    x = torch.randn(3, 8, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(gpu(x.to(CUDA)).cpu(), cpu(x), rtol=1e-10, atol=1e-10)
    for k, v in cpu.state_dict().items():
        torch.testing.assert_close(gpu.state_dict()[k].cpu(), v, rtol=1e-10, atol=0, msg=k)


def test_freeze_on_cuda_survives_train_and_keeps_statistics_through_a_training_step():
    torch.manual_seed(0)
    model = calibrated(SmallResNet(), digits_like().float()).to(CUDA)
    freeze_bn(model, affine=False)
    before = {n: (bn.running_mean.clone(), bn.running_var.clone()) for n, bn in bn_layers(model)}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss = model(digits_like(32, seed=5).float().to(CUDA) + 2).square().mean()
    loss.backward()
    opt.step()
    for name, bn in bn_layers(model):
        assert not bn.training and bn.weight.grad is not None, name
        assert torch.equal(bn.running_mean, before[name][0]) and torch.equal(bn.running_var, before[name][1]), name


def test_frozen_layers_on_cuda_equal_eval_mode_batchnorm():
    torch.manual_seed(0)
    model = calibrated(SmallResNet(), digits_like().float()).to(CUDA)
    x = digits_like(16, seed=3).float().to(CUDA)
    with torch.no_grad():
        want = model(x)
    convert_frozen(model)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_guard_and_protect_stats_on_cuda():
    torch.manual_seed(0)
    model = calibrated(MLP(), torch.randn(64, 64)).to(CUDA)
    x = torch.randn(8, 64, device=CUDA)
    with bn_guard(model):
        model(x)
    model[2].train()
    with pytest.raises(BNGuardError):
        with bn_guard(model):
            model(x)
    model.train()
    before = state(model)
    with pytest.warns(RuntimeWarning, match="rolled back"):
        with protect_stats(model) as report:
            with torch.autocast(CUDA.type, dtype=torch.float16):
                model(x * 1e5)  # float16 overflow: inf in the BN input, NaN in running_var
    assert report and report.nonfinite
    assert_same_state(model, before)


# --------------------------------------------------------------------------------------------- convert


def test_revert_sync_bn_on_cuda_keeps_tensors_device_and_outputs():
    torch.manual_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(calibrated(SmallResNet(), digits_like().float())).to(CUDA)
    x = digits_like(16, seed=2).float().to(CUDA)
    with torch.no_grad():
        want = model.eval()(x)
    reverted = revert_sync_bn(model, x)
    assert all(type(m) is nn.BatchNorm2d for _, m in bn_layers(reverted))
    assert all(t.device.type == CUDA.type for t in reverted.state_dict().values())
    with torch.no_grad():
        assert torch.equal(reverted(x), want)


# ------------------------------------------------------------- the twelfth session's changes, on a CUDA device


def _behind_gpu_work(batches):
    """Each batch made on the GPU behind ~20 ms of queued GPU work: a copy of it to the CPU that does not wait for
    the stream would hand over memory not yet written."""
    for b in batches:
        on_gpu = b.to(CUDA)
        torch.cuda._sleep(40_000_000)  # clock cycles of busy waiting, queued on the current stream
        yield on_gpu * 1.0  # written only after the wait


def test_recalibrate_of_a_cpu_model_waits_for_each_batch_copied_from_the_gpu():
    """device='cpu' with batches on the GPU (ba58be0): each copy to the CPU lands before the model reads it.
    Oracle: PyTorch's own training-mode BN on the same values, on the CPU."""
    torch.manual_seed(0)
    model = calibrated(SmallResNet(), digits_like().float()).double()
    batches = [digits_like(64, seed=s, offset=2.0) for s in range(6)]
    ref = hooked_stats(model, batches)
    report = recalibrate(model, _behind_gpu_work(batches), device="cpu", progress=False)
    assert report.batches == 6
    assert_stats(model, ref, rtol=1e-9)


def test_recalibrate_and_audit_on_cuda_read_what_a_subclass_hands_to_batch_norm():
    """A BN subclass that transposes its input (e9cbb0c, normalized_inputs): on CUDA its statistics are those of
    the axis it normalizes, as on the CPU. Oracle: float64 NumPy moments of the values it normalizes; the audit's
    figures against the CPU audit of the same model."""
    from test_audit_data import TransposedBN

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), TransposedBN(6)).double().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(n, 10, 3, generator=g, dtype=torch.float64) * 2 + 1 for n in (8, 5)]
    with torch.no_grad():
        rows = np.concatenate([model[0](x).reshape(-1, 6).numpy() for x in data])
    gpu = copy.deepcopy(model).to(CUDA)
    recalibrate(gpu, data, device=CUDA, progress=False)
    bn = gpu[1]
    assert bn.running_mean.device.type == CUDA.type
    np.testing.assert_allclose(bn.running_mean.cpu().numpy(), rows.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bn.running_var.cpu().numpy(), rows.var(0, ddof=1), rtol=1e-9)
    with torch.no_grad():  # now shift the statistics and audit on both devices
        model[1].running_mean.copy_(torch.linspace(-1, 1, 6))
        model[1].running_var.copy_(torch.linspace(0.5, 2, 6))
    gpu = copy.deepcopy(model).to(CUDA)
    x = torch.randn(256, 10, 3, generator=g, dtype=torch.float64) * 2 + 1
    cpu_report, gpu_report = audit(model, x), audit(gpu, x)
    (a,), (b,) = gpu_report.shifts, cpu_report.shifts
    assert (a.layer, a.worst_channel, a.count) == (b.layer, b.worst_channel, b.count) == ("1", b.worst_channel, 2560)
    assert a.z_eq == pytest.approx(b.z_eq, rel=1e-9) and a.z_eq > 0.5
    assert not gpu_report.by_code("own_forward")


def test_audit_on_cuda_compares_a_looped_layer_call_by_call_as_on_the_cpu():
    """A layer called four times per forward on inputs that differ by design (e8cf56b): on CUDA the worst call
    and its figures are those of the CPU audit."""
    from test_audit_calls import Loop

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, generator=g)
    model = Loop().eval()
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
        model.bn.running_var.copy_(torch.tensor([1.5, 2.0, 0.8]))
    cpu_report = audit(model, x, batch_size=64)
    gpu_report = audit(copy.deepcopy(model).to(CUDA), x, batch_size=64)
    (a,), (b,) = gpu_report.shifts, cpu_report.shifts
    assert (a.call, a.calls_per_forward) == (b.call, b.calls_per_forward) and b.calls_per_forward == 4
    assert a.z_eq == pytest.approx(b.z_eq, rel=1e-4)
    assert sorted(f.code for f in gpu_report.findings) == sorted(f.code for f in cpu_report.findings)


def test_audit_on_cuda_tells_random_outputs_from_batch_coupling():
    """On CUDA a deterministic model is not taken for a random one (its two runs of one batch agree), a model that
    samples in eval mode is, and a model that couples its samples still gets the coupling error."""
    from test_audit_data import CenteredNet, MCDropoutNet, _trained

    torch.manual_seed(0)
    x = torch.randn(512, 8)
    sampling = audit(_trained(MCDropoutNet(), x).to(CUDA), x)
    assert sampling.by_code("random_outputs") and not [
        f for f in sampling.by_code("batch_coupling") if f.severity == "error"]
    coupled = audit(_trained(CenteredNet(), x).to(CUDA), x)
    assert [f.severity for f in coupled.by_code("batch_coupling")] == ["error"]
    assert not coupled.by_code("random_outputs")
    images = digits_like(256).float()
    plain = audit(calibrated(SmallResNet(), images, positive=True).to(CUDA), images)  # float32, TF32 convolutions
    assert not plain.by_code("random_outputs")
    assert [f.finding for f in plain.by_code("batch_coupling")] == ["per-sample outputs do not depend on the batch"]


def test_fold_on_cuda_keeps_each_parameters_requires_grad_and_device():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 2, 1, bias=False))
    x = torch.randn(8, 3, 8, 8)
    model = calibrated(model, x).double().to(CUDA)
    model[0].weight.requires_grad_(False)
    model[4].weight.requires_grad_(False)
    folded, report = fold_bn(model, x.double().to(CUDA))
    assert len(report.folded) == 2
    assert [(p.requires_grad, p.device.type) for p in (folded[0].weight, folded[0].bias, folded[4].weight,
                                                       folded[4].bias)] == [
        (False, CUDA.type), (True, CUDA.type), (False, CUDA.type), (False, CUDA.type)]
    with torch.no_grad():
        assert rel(folded(x.double().to(CUDA)).cpu().numpy(), model(x.double().to(CUDA)).cpu().numpy()) < 1e-12


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_renorm_training_under_torch_compile_on_cuda_matches_eager(backend):
    """Batch Renormalization compiled on CUDA (f046208: its training step runs eagerly inside torch.compile):
    three SGD steps give eager's gradients and running statistics. float64, so TF32 plays no part."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(2, 3, 1), BatchNorm2d(3, renorm=True, rmax=3.0, dmax=5.0)).double().to(CUDA)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend=backend)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (eager, twin)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = (torch.randn(7, 2, 4, 4, generator=g, dtype=torch.float64) * 2 + 1).to(CUDA)
        for model, opt in zip((eager, compiled), opts):
            opt.zero_grad()
            model(x).square().sum().backward()
        torch.testing.assert_close(twin[1].weight.grad, eager[1].weight.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(twin[0].weight.grad, eager[0].weight.grad, rtol=1e-9, atol=1e-9)
        for opt in opts:
            opt.step()
    torch.testing.assert_close(twin[1].running_mean, eager[1].running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(twin[1].running_var, eager[1].running_var, rtol=1e-12, atol=1e-12)


def test_fold_and_export_of_a_data_parallel_model_send_cpu_inputs_to_its_device(tmp_path):
    """DataParallel moves its module to the GPU and scatters CPU inputs there; fold_bn and export_onnx run the
    module inside, so they send the inputs there themselves (they raised 'Input type (torch.FloatTensor) and
    weight type (torch.cuda.FloatTensor)' on the GPU machine). Oracle: the wrapper's own outputs."""
    torch.manual_seed(0)
    model = calibrated(SmallResNet(), digits_like().float())
    wrapped = nn.DataParallel(model, device_ids=[0])
    x = digits_like(8, seed=4).float()  # on the CPU, as a DataParallel user feeds it
    with torch.no_grad():
        want = wrapped(x)
    folded, report = fold_bn(wrapped, x)
    assert report.folded and report.max_rel_diff is not None and report.max_rel_diff < 1e-3
    with torch.no_grad():
        assert rel(folded(x.to(CUDA)).cpu().numpy(), want.cpu().numpy()) < 1e-3
    export_onnx(wrapped, x, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file()


# ------------------------------------------------------------------ changes since the last GPU run (session 15)


def test_fold_of_a_cuda_model_whose_forward_writes_its_state_leaves_that_state_as_found():
    """fold_bn/fold_plan snapshot and write back the model's state around their runs (compared bitwise, written
    back in place): on CUDA the caller's buffers and parameters keep their objects, storage and device, and the
    counter a forward increments is 0 again in the model and in the folded copy. Oracle: a float64 copy's output."""
    from test_fold_state import ActNormFlag, Counter, conv_bn_then

    from bnkit.torch import fold_plan

    model = conv_bn_then(Counter()).double().to(CUDA)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64).to(CUDA)
    with torch.no_grad():
        want = copy.deepcopy(model)(x)
    storage = {k: v.data_ptr() for k, v in model.state_dict().items()}
    folded, report = fold_bn(model, x)
    assert [f.bn for f in report.folded] == ["1"] and report.max_abs_diff < 1e-12
    assert float(model[2].calls) == 0 and float(folded[2].calls) == 0
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == storage
    assert all(t.device.type == CUDA.type for t in (*folded.parameters(), *folded.buffers()))
    with torch.no_grad():
        assert rel(folded(x).cpu().numpy(), want.cpu().numpy()) < 1e-12

    actnorm = conv_bn_then(ActNormFlag(4)).to(CUDA)
    before = state(actnorm)
    plan = fold_plan(actnorm, torch.randn(2, 3, 8, 8).to(CUDA))
    assert [f.bn for f in plan.folded] == ["1"] and actnorm[2].initialized is False
    assert_same_state(actnorm, before)


def test_export_of_a_cuda_model_runs_every_batch_size_in_onnxruntime(tmp_path):
    """export_onnx keeps the batch axis dynamic where the example has one (backed by its own batch-of-one run):
    the file written from a CUDA model runs batches of 1, 3 and 8 in onnxruntime. Oracle: the model's eval output
    on the CPU in float32 (no TF32 there)."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    x = digits_like(16).float()
    model = calibrated(SmallResNet(), x)
    export_onnx(copy.deepcopy(model).to(CUDA), x[:4].to(CUDA), tmp_path / "m.onnx", fold=True)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for n in (1, 3, 8):
        with torch.no_grad():
            want = model(x[:n]).numpy()
        assert rel(session.run(None, {name: x[:n].numpy()})[0], want) < 1e-5, n


def test_recalibrate_and_audit_of_a_cuda_model_fed_dataclass_and_packed_sequence_batches_from_the_cpu():
    """One walker moves nested batches to the GPU (recalibrate's ``device``, or the model's with its default
    forward; the audit's model device): dataclass batches and PackedSequence batches (data moved, batch_sizes
    kept on the CPU, as PackedSequence.to does) reach a CUDA model whole. Oracle: the float64 moments of what
    the BN normalizes, computed on the CPU."""
    import dataclasses

    from test_recalibrate import PackedGRUBN
    from torch.nn.utils.rnn import pack_sequence

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor

    torch.manual_seed(0)
    net = calibrated(MLP(), torch.randn(64, 64)).double()
    data = [Batch(torch.randn(32, 64, dtype=torch.float64) * 2 + 1) for _ in range(3)]
    ref = hooked_stats(net, [b.x for b in data])
    gpu = copy.deepcopy(net).to(CUDA)
    recalibrate(gpu, data, forward=lambda m, b: m(b.x), device=CUDA, progress=False)  # a forward= of one's own
    assert_stats(gpu, ref, rtol=1e-9)
    with pytest.raises(RuntimeError, match="same device|device"):  # ... gets the batches as they come
        recalibrate(copy.deepcopy(net).to(CUDA), data, forward=lambda m, b: m(b.x), progress=False)
    pairs = copy.deepcopy(net).to(CUDA)
    recalibrate(pairs, [(b.x, torch.zeros(32)) for b in data], progress=False)  # default forward, CPU batches
    assert_stats(pairs, ref, rtol=1e-9)
    report = audit(gpu, data, forward=lambda m, b: m(b.x))
    assert len(report.layers) == len(list(bn_layers(net)))

    seqs = [pack_sequence([torch.randn(int(n), 4, dtype=torch.float64) * 3 + 1 for n in torch.randint(1, 7, (8,))],
                          enforce_sorted=False) for _ in range(4)]
    rnn = PackedGRUBN().double()
    with torch.no_grad():
        h = torch.cat([rnn.gru(p)[0].data for p in seqs])
    rnn.to(CUDA)
    recalibrate(rnn, seqs, progress=False)  # the default forward: batches go to the model's device
    torch.testing.assert_close(rnn.bn.running_mean.cpu(), h.mean(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rnn.bn.running_var.cpu(), h.var(0), rtol=1e-9, atol=1e-9)


def test_renorm_re_run_by_activation_checkpointing_on_cuda_raises_and_changes_nothing():
    """A Batch Renormalization step re-run inside backward (torch.utils.checkpoint) raises before touching a
    buffer on CUDA as on the CPU."""
    from torch.utils.checkpoint import checkpoint

    from bnkit.torch import BatchNorm1d

    torch.manual_seed(0)
    bn = BatchNorm1d(3, renorm=True).to(CUDA).train()
    x = torch.randn(8, 3, device=CUDA, requires_grad=True)
    y = checkpoint(bn, x, use_reentrant=False)
    after_step = state(bn)
    with pytest.raises(RuntimeError, match="a Batch Renormalization step ran inside a backward"):
        y.sum().backward()
    assert_same_state(bn, after_step)


def test_audit_on_cuda_checks_batchnorm_like_modules_and_skips_nan_labels_as_on_the_cpu():
    """Two changes since the last GPU run, on CUDA: a module with BatchNorm's buffers but not its class (torchvision's
    FrozenBatchNorm2d) keeps the state checks, and NaN in the labels of (x, y) batches, which the default forward
    never hands the model, no longer refuses the data. Oracles: the CPU audit, and the audit of the inputs alone."""
    from test_audit_model import _ThirdPartyFrozenBN

    torch.manual_seed(0)
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), _ThirdPartyFrozenBN(4)).eval()
    with torch.no_grad():
        frozen[1].running_var.uniform_(0.5, 2.0)[2] = -1.0
    x = torch.randn(64, 3, 8, 8)
    errors = [{(f.layer, f.code) for f in audit(m, x).findings if f.severity == "error"}
              for m in (frozen, copy.deepcopy(frozen).to(CUDA))]
    assert errors[0] == errors[1] and ("1", "negative_var") in errors[1]
    assert audit(copy.deepcopy(frozen).to(CUDA)).by_code("bn_like")

    images = digits_like(256).float()
    model = calibrated(SmallResNet(), images, positive=True).to(CUDA)
    labels = torch.zeros(256)
    labels[70] = float("nan")
    pairs = list(zip(torch.split(images, 64), torch.split(labels, 64)))
    got, want = audit(model, pairs), audit(model, list(torch.split(images, 64)))
    assert [s.layer for s in got.shifts] == [s.layer for s in want.shifts] and len(got.shifts) == 6
    assert [s.z_eq for s in got.shifts] == pytest.approx([s.z_eq for s in want.shifts], rel=1e-6)
