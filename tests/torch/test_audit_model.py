"""bnkit.torch.audit_model (depth 2, no data): each mode/momentum/fold finding matches what PyTorch's own layers do."""
import copy
import math
import re

import pytest
import torch
from torch import nn

from bnkit.torch import audit, freeze_bn
from bnkit.torch.audit_model import short_names


def _codes(model, *codes):
    return {f.code: f for f in audit(model).findings if f.code in codes}


def _trains_stats(bn, x):
    """PyTorch's own answer: does a forward in the layer's current mode change its running mean?"""
    before = bn.running_mean.clone()
    with torch.no_grad():
        bn(x)
    changed = not torch.equal(bn.running_mean, before)
    with torch.no_grad():
        bn.running_mean.copy_(before)
    return changed


def test_freeze_bn_stats_false_is_told_as_training_not_as_a_broken_freeze():
    """freeze_bn(stats=False) freezes gamma/beta on purpose and leaves the statistics training: in a training model
    that is ordinary training mode (train_mode + frozen_affine), not "frozen layer left in training mode", whose
    advice (freeze it) would be wrong; in eval mode the statistics no longer train, so frozen_affine goes too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    freeze_bn(model, stats=False)
    x = torch.randn(8, 1, 6, 6)
    assert not model[1].weight.requires_grad and _trains_stats(model[1], model[0](x))
    found = _codes(model, "train_mode", "frozen_in_train", "frozen_affine", "frozen")
    assert set(found) == {"train_mode", "frozen_affine"}
    assert found["train_mode"].data["layers"] == ["1"] and found["frozen_affine"].data["layers"] == ["1"]
    model.eval()
    assert not _trains_stats(model[1], model[0](x))  # eval mode: PyTorch leaves the statistics alone
    assert not _codes(model, "train_mode", "frozen_in_train", "frozen_affine", "frozen")


def test_frozen_info_only_for_layers_that_keep_fixed_statistics_inside_a_training_model():
    """A layer frozen with freeze_bn (statistics pinned, gamma/beta frozen) or by hand (requires_grad=False and
    .eval()) inside a training model keeps its statistics while the rest trains: the "frozen" info names it. When
    the whole model is in eval mode every layer keeps its statistics and there is nothing to tell."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    freeze_bn(model, modules=[model[1]])
    model.train()
    for p in model[7].parameters():
        p.requires_grad_(False)
    model[7].eval()
    x = torch.randn(8, 1, 8, 8)
    h1 = model[0](x)
    h4 = model[3](model[2](model[1](h1)))
    h7 = model[6](model[5](model[4](h4)))
    assert [_trains_stats(model[i], h) for i, h in ((1, h1), (4, h4), (7, h7))] == [False, True, False]
    found = _codes(model, "frozen", "train_mode", "frozen_in_train")
    assert found["frozen"].severity == "info" and found["frozen"].data["layers"] == ["1", "7"]
    assert found["train_mode"].data["layers"] == ["4"] and "frozen_in_train" not in found
    model.eval()
    assert not _codes(model, "frozen", "train_mode", "frozen_in_train")
    hand = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()  # frozen by hand, model in eval mode
    hand[1].requires_grad_(False)
    assert not _codes(hand, "frozen", "train_mode", "frozen_in_train")


def test_train_mode_says_whether_the_model_or_only_a_submodule_is_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    model[1].train()  # one BN switched back after model.eval()
    (finding,) = audit(model).by_code("train_mode")
    assert "inside a model in eval mode" in finding.evidence and "the model is in training mode" not in finding.evidence
    (finding,) = audit(model.train()).by_code("train_mode")
    assert "(the model is in training mode)" in finding.evidence


def test_no_momentum_finding_for_a_layer_that_does_not_track():
    """With track_running_stats turned off PyTorch never applies the momentum (the buffers stay as they are in
    training), so a Keras-style momentum 0.9 on it is no mix-up to warn about; the stale buffers are the finding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.9), nn.BatchNorm1d(4, momentum=0.9)).eval()
    model[1].track_running_stats = False
    model[1].train()
    before = model[1].running_mean.clone()
    model[1](torch.randn(16, 4) + 5)
    assert torch.equal(model[1].running_mean, before)
    model[1].eval()
    report = audit(model)
    (momentum,) = report.by_code("momentum")
    assert momentum.data["layers"] == ["2"] and momentum.severity == "warning"
    assert [f.layer for f in report.by_code("stale_running_stats")] == ["1"]


def test_nothing_foldable_gives_no_fold_finding():
    """A BatchNorm with no conv/linear before it has nothing to merge into: no "0 of 1 ... can be folded" info."""
    first = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    assert not audit(first).by_code("foldable")
    assert not audit(first, torch.randn(2, 4)).by_code("foldable")
    after = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    (finding,) = audit(after).by_code("foldable")
    assert set(finding.data["folded"]) == {"1"}


def test_layer_label_lists_three_names_then_the_count():
    """Past three names the label must say how many layers there are, or the fourth one is silently lost."""
    assert short_names(["a", "b", "c"]) == "a, b, c"
    assert short_names(["a", "b", "c", "d"]) == "a, b, c, ... (4 layers)"
    assert short_names(["", "b"]) == "(root), b"
    model = nn.Sequential(*[nn.BatchNorm1d(4) for _ in range(4)]).train()
    (finding,) = audit(model).by_code("train_mode")
    assert finding.layer == "0, 1, 2, ... (4 layers)" and len(finding.data["layers"]) == 4


class _ThirdPartyFrozenBN(nn.Module):
    """torchvision's FrozenBatchNorm2d in outline: BatchNorm's buffers, its own arithmetic, no _BatchNorm base."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.eps = 1e-5
        for name, value in (("weight", torch.ones(n)), ("bias", torch.zeros(n)), ("running_mean", torch.zeros(n)),
                            ("running_var", torch.ones(n))):
            self.register_buffer(name, value)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale[None, :, None, None] + (self.bias - self.running_mean * scale)[None, :, None, None]


def test_a_module_with_batchnorms_buffers_but_not_its_class_keeps_the_state_checks():
    """Depth 1 finds a BN by its buffer names; the model audit, by its class, saw no BN at all in a model of
    torchvision-style frozen layers, and a negative variance (NaN outputs) went from exit 1 to 'no BatchNorm
    layers found'. Oracle: the model's own NaN output, and the state dict audit of the same tensors."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _ThirdPartyFrozenBN(4)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)[2] = -1.0
        assert torch.isnan(model(torch.randn(1, 3, 8, 8))).any()
    report = audit(model)
    state_codes = {(f.layer, f.code) for f in audit(model.state_dict()).findings if f.severity == "error"}
    assert state_codes == {("1", "negative_var")}
    assert {(f.layer, f.code) for f in report.findings if f.severity == "error"} == state_codes
    assert not report.ok and not report.by_code("no_bn")
    (note,) = report.by_code("bn_like")
    assert "_ThirdPartyFrozenBN" in note.evidence and note.severity == "info" and note.data["layers"] == ["1"]


def test_instance_norm_statistics_are_checked_without_batchnorms_counter_rule():
    """PyTorch's InstanceNorm never counts its updates (num_batches_tracked stays 0 through training): trained, it
    gets no 'set without a training-mode update' warning; never trained, eval mode uses the initial 0 and 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True))
    assert {f.code for f in audit(model.eval()).findings if f.layer == "1"} == {"never_updated", "bn_like"}
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(8, 3, 8, 8) + 1)
    assert int(model[1].num_batches_tracked) == 0  # PyTorch's own behaviour, which the audit must not flag
    report = audit(model.eval())
    assert report.ok and [f.code for f in report.findings if f.layer == "1"] == ["bn_like"]


def test_running_statistics_not_per_channel_are_not_taken_for_a_batchnorms():
    """A scalar running mean (an RL observation normalizer) or keepdim (1, C, 1, 1) buffers are no BN's
    statistics: no finding, where a false 'inconsistent shapes' error made the audit fail."""

    class RunningMeanStd(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(shape))
            self.register_buffer("running_var", torch.ones(shape))

        def forward(self, x):
            return (x - self.running_mean) / self.running_var.sqrt()

    for shape in ((), (1, 4, 1, 1)):
        report = audit(nn.Sequential(nn.Conv2d(3, 4, 3), RunningMeanStd(shape)))
        assert report.ok and [f.code for f in report.findings] == ["no_bn"], report.findings


def test_momentum_outside_zero_one_is_an_error_not_a_crash():
    """ema_window raised for 1.5 and NaN (no layer named); -0.1 was told as 'never changes' with an initial weight of
    (1 - -0.1)^1000. Oracle: PyTorch's own updates: from 2 on and below 0 they run away from the batch mean (an
    error), between 1 and 2 they overshoot but converge (a warning), NaN makes them NaN."""
    x = torch.randn(64, 3) + 3.0
    for m, severity in ((1.5, "warning"), (2.0, "error"), (2.5, "error"), (float("nan"), "error"), (-0.1, "error")):
        bn = nn.BatchNorm1d(3, momentum=m).train()
        with torch.no_grad():
            bn.num_batches_tracked.fill_(1000)
            for _ in range(8):
                bn(x)
        off = float((bn.running_mean - x.mean(0)).abs().max())
        assert (off < 0.1 if severity == "warning" else not off < 1.0), (m, off)  # NaN: not below either
        # at 2 the distance keeps its size, flipping side: told so, not as growing
        grows = "ever wider" in audit(nn.Sequential(copy.deepcopy(bn).eval())).by_code("momentum")[0].evidence
        assert grows == (m == 2.5)
        bn.eval()
        report = audit(nn.Sequential(bn))
        (finding,) = report.by_code("momentum")
        assert finding.severity == severity and ("outside [0, 1]" in finding.finding) == (severity == "error")
        assert not report.by_code("few_updates")


def test_a_tiny_positive_momentum_gets_its_window_not_a_crash():
    """1 - 1e-20 rounds to 1 in float64: the window divided by log(1) = 0 and the audit died. Oracle: the window's
    limit for small m, -log(0.05) / m."""
    bn = nn.BatchNorm1d(3, momentum=1e-20).eval()
    (finding,) = audit(nn.Sequential(bn)).by_code("momentum")
    assert finding.severity == "info"
    assert finding.data["window"] == pytest.approx(-math.log(0.05) / 1e-20, rel=1e-9)


def test_a_debiased_drop_in_layer_at_momentum_zero_is_a_cumulative_average_not_frozen():
    from bnkit.torch import BatchNorm1d

    bn = BatchNorm1d(3, momentum=0.0, debias=True).train()
    batches = [torch.randn(16, 3) * 2 + 1 for _ in range(20)]
    with torch.no_grad():
        for b in batches:
            bn(b)
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))  # cumulative
    (finding,) = audit(nn.Sequential(bn.eval())).by_code("momentum")
    assert finding.severity == "info" and "cumulative average" in finding.finding


def test_a_negative_eps_that_pytorch_refuses_is_an_error():
    bn = nn.BatchNorm1d(3, eps=-1e-3).eval()
    try:
        bn(torch.randn(4, 3))
        refuses = False
    except (RuntimeError, ValueError):
        refuses = True
    (finding,) = audit(nn.Sequential(bn)).by_code("negative_eps")
    assert (finding.severity == "error") == refuses
    assert "eval-mode forward raises" in finding.evidence or not refuses  # a renorm layer in training may not


def test_tensors_on_the_meta_device_are_refused_with_a_clear_error():
    import pytest

    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    for target in (model, model.state_dict()):
        with pytest.raises(ValueError, match=r"holds meta tensors \(0.weight, .*load_state_dict\(\.\.\., assign=True\)"):
            audit(target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_a_layer_missing_one_running_statistic_is_an_error_as_its_inference_raises(missing, dtype):
    """Review: it was the track_running_stats=False warning (normalizes with batch statistics), exit 0. Oracle:
    PyTorch's eval-mode forward of the same layer raises; the advice, followed as printed, gives a model that runs
    (in the model's dtype: a float32 buffer in a float64 model made inference raise)."""
    torch.set_default_dtype(dtype)
    try:
        _missing_one(missing)
    finally:
        torch.set_default_dtype(torch.float32)


def _missing_one(missing: str) -> None:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.normal_()
    bn.num_batches_tracked.fill_(100)
    setattr(bn, missing, None)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn).eval()
    with pytest.raises(RuntimeError, match=f"{missing} must be defined in evaluation mode"):
        model(torch.randn(2, 3, 6, 6))
    report = audit(model)
    assert not report.ok
    assert [(f.severity, f.layer) for f in report.findings if f.code == "missing_running_stat"] == [("error", "1")]
    assert not report.by_code("no_running_stats")
    # the advice works: the buffer registered again, then the trained state dict loaded strictly (review)
    trained = nn.BatchNorm2d(4)
    with torch.no_grad():
        trained.running_mean.normal_(), trained.running_var.uniform_(0.5, 2), trained.num_batches_tracked.fill_(100)
    trained = trained.state_dict()
    fix = report.by_code("missing_running_stat")[0].fix
    call = re.search(r"layer\.register_buffer\(.*?\)\)", fix).group()
    eval(call, {"torch": torch, "layer": bn})  # noqa: S307 - the advice, run as printed
    bn.load_state_dict(trained)
    model(torch.randn(2, 3, 6, 6))
    assert audit(model).ok


def test_an_uninitialized_lazy_layer_is_an_error_as_its_never_updated_statistics_are():
    """Review: it was info, so the report said ok, and after one eval forward (which creates the statistics at 0 / 1
    and normalizes with them) the same model's audit said never_updated, an error. Oracle: that forward's output is
    the conv's divided by sqrt(1 + eps); the state dict of such a model is an invalid_state finding, not torch's own
    ValueError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d()).eval()
    assert [f.code for f in audit(model.state_dict()).findings if f.severity == "error"] == ["invalid_state"]
    before = audit(model)
    assert not before.ok and [f.severity for f in before.findings if f.code == "lazy"] == ["error"]
    x = torch.randn(2, 3, 6, 6) * 5 + 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), model[0](x) / math.sqrt(1 + 1e-5))
    assert not audit(model).ok and audit(model).by_code("never_updated")


def test_a_frozen_layer_without_running_statistics_is_an_error_as_its_forward_raises():
    """Review: a FrozenBatchNorm2d with both statistics None got the track_running_stats=False warning (normalizes
    with batch statistics), but its forward always uses its buffers. Oracle: that forward raises."""
    from bnkit.torch import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(4)
    frozen.running_mean = frozen.running_var = None
    model = nn.Sequential(nn.Conv2d(3, 4, 3), frozen).eval()
    with pytest.raises(RuntimeError, match="must be defined in evaluation mode"):
        model(torch.randn(2, 3, 6, 6))
    report = audit(model)
    assert not report.ok and [(f.severity, f.code) for f in report.findings if f.layer == "1"] == [
        ("error", "missing_running_stat")]
    fix = report.by_code("missing_running_stat")[0].fix  # the advice works (review: revert_frozen refuses the layer)
    assert "register_buffer('running_mean'" in fix and "register_buffer('running_var'" in fix
    frozen.register_buffer("running_mean", torch.zeros(4))
    frozen.register_buffer("running_var", torch.ones(4))
    frozen.load_state_dict(FrozenBatchNorm2d(4).state_dict())
    model(torch.randn(2, 3, 6, 6))
    bare = FrozenBatchNorm2d(4, affine=False).double()  # nothing left tells the dtype: no float32 is named (review)
    bare.running_mean = bare.running_var = None
    fix = audit(bare).by_code("missing_running_stat")[0].fix
    assert "float32" not in fix and "with the model's dtype and device" in fix


def test_equal_momenta_given_as_tensors_are_one_finding():
    """Review: momenta given as 0-d tensors (which nn.BatchNorm and the drop-in layers take) were grouped by tensor
    identity, one finding per layer. Oracle: the same model with float momenta."""
    def findings(momentum):
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=momentum()), nn.Linear(4, 4),
                              nn.BatchNorm1d(4, momentum=momentum())).eval()
        return [(f.layer, f.finding) for f in audit(model).findings if f.code == "momentum"]

    assert findings(lambda: torch.tensor(0.1)) == findings(lambda: 0.1) == [("1, 3", findings(lambda: 0.1)[0][1])]
