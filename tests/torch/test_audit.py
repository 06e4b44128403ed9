"""bnkit.torch.audit: each defect built on purpose is reported; a clean trained model reports no error."""
import copy
import dataclasses
import json
import math
import sys
import typing

import numpy as np
import pytest
import torch
from _helpers import WritesFile, set_running_stats
from sklearn.datasets import load_digits
from torch import nn

from bnkit.findings import SEVERITIES
from bnkit.torch import AuditReport, audit, freeze_bn, unfreeze_bn
from bnkit.torch.io import UnsafeCheckpointError, save_state_dict_file
from bnkit.torch.fold import fold_plan
from bnkit.torch.modules import bn_layers
from bnkit.torch.zoo import MLP, ConvTransposeDecoder, SharedConvNet, SmallResNet


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    return x[:1792], torch.tensor(d.target)[:1792]  # 28 batches of 64


def _train(model, x, y, epochs=2, lr=0.05, seed=0, inputs=lambda x: x):
    torch.manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(inputs(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@pytest.fixture(scope="module")
def trained(digits):
    x, y = digits
    return _train(SmallResNet(), x, y).eval()


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.training, getattr(m, "momentum", None), getattr(m, "track_running_stats", None))
             for m in model.modules()])


def _assert_unchanged(model, snap):
    state, flags = snap
    now = model.state_dict()
    assert state.keys() == now.keys()
    for k in state:
        assert torch.equal(state[k], now[k]) or (torch.isnan(state[k]) == torch.isnan(now[k])).all(), k
    assert flags == _snapshot(model)[1]


def _cumulative_probe(model, x, batch_size=64):
    """A copy whose BN layers hold PyTorch's own cumulative average of the batch statistics over ``x``."""
    probe = copy.deepcopy(model)
    for _, layer in bn_layers(probe):
        layer.reset_running_stats()
        layer.momentum = None
    probe.train()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            probe(x[i:i + batch_size])
    return probe


def _errors(report):
    return [f for f in report.findings if f.severity == "error"]


# ---------------------------------------------------------------- clean model


def test_clean_trained_model_reports_no_error_with_data(trained, digits):
    snap = _snapshot(trained)
    report = audit(trained, digits[0])
    assert isinstance(report, AuditReport) and report.depth == "data"
    assert report.ok, [f for f in _errors(report)]
    assert report.batches == 28
    assert [s.layer for s in report.shifts] and all(s.z_eq < 0.5 for s in report.shifts)
    assert report.batch_coupling is not None and report.batch_coupling < 1e-3
    _assert_unchanged(trained, snap)
    assert audit(trained).ok and audit(trained.state_dict()).ok


def test_report_serializes_to_json(trained, digits):
    report = audit(trained, digits[0][:256])
    out = json.loads(report.to_json())
    assert out["ok"] is True and out["depth"] == "data"
    assert {f["severity"] for f in out["findings"]} <= {"error", "warning", "info"}
    assert len(out["shifts"]) == len(bn_layers(trained))


# ---------------------------------------------------------------- depth 1: checkpoints


class AutoEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16))
        self.decoder = ConvTransposeDecoder(latent=16)

    def forward(self, x):
        return self.decoder(self.encoder(x))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_with_never_updated_decoder_bn(digits, tmp_path, suffix):
    x = torch.cat([digits[0], digits[0]])  # 56 updates: the encoder's statistics are fully the data's
    torch.manual_seed(0)
    model = AutoEncoder()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for i in range(0, len(x), 64):
        model.train()
        model.decoder.eval()  # the bug: the decoder's BN layers never see training mode
        loss = (model(x[i:i + 64]) - x[i:i + 64]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = save_state_dict_file(model.state_dict(), tmp_path / f"ae{suffix}")
    report = audit(path)
    assert report.depth == "state"
    never = {f.layer for f in report.by_code("never_updated")}
    assert never == {"decoder.bn0", "decoder.bn1"}
    assert all(f.severity == "error" for f in report.by_code("never_updated"))
    assert not [f for f in report.findings if f.layer == "encoder.2" and f.severity != "info"]
    assert not report.ok


def test_nan_poisoned_running_var(trained, digits, tmp_path):
    model = copy.deepcopy(trained)
    model.layers[0].bn2.running_var[5] = float("nan")
    path = save_state_dict_file(model.state_dict(), tmp_path / "nan.pt")
    (finding,) = audit(path).by_code("non_finite")
    assert finding.layer == "layers.0.bn2" and finding.severity == "error"
    snap = _snapshot(model)
    report = audit(model, digits[0][:128])
    assert {f.code for f in _errors(report)} == {"non_finite", "eval_nonfinite"}
    assert "layers.0.bn2" not in [s.layer for s in report.shifts]
    _assert_unchanged(model, snap)


def test_overflow_inside_the_model_is_named_at_the_first_layer_it_reaches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3),
                          nn.BatchNorm1d(3))
    x = torch.randn(256, 4)
    with torch.no_grad():
        model(x)  # trained-looking running statistics
        model[2].weight.mul_(1e38)  # finite weights whose products overflow float32
    model.eval()
    snap = _snapshot(model)
    report = audit(model, x, batch_size=64)
    (finding,) = report.by_code("data_nonfinite")
    assert finding.severity == "error" and finding.layer == "3" and finding.data["layers"] == ["3", "5"]
    assert [s.layer for s in report.shifts] == ["1"]  # the finite layer is still compared
    assert not report.ok
    _assert_unchanged(model, snap)


def test_non_finite_statistics_name_the_layer_the_forward_reached_first():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head_bn = nn.BatchNorm1d(3)  # declared first, called last
            self.fc1, self.bn1, self.fc2 = nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 3)

        def forward(self, x):
            return self.head_bn(self.fc2(self.bn1(self.fc1(x))))

    torch.manual_seed(0)
    model, x = Net(), torch.randn(256, 4)
    with torch.no_grad():
        model(x)
        model.fc1.weight.mul_(1e38)  # overflows before bn1, the first BN the forward reaches
    (finding,) = audit(model.eval(), x, batch_size=64).by_code("data_nonfinite")
    assert finding.layer == "bn1" and finding.data["layers"] == ["bn1", "head_bn"]


def test_a_layer_given_one_value_per_channel_is_audited():
    """BN on ``x.mean(0, keepdim=True)``: one value per channel per call, whose variance is exactly 0."""
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(16)

        def forward(self, x):
            return self.bn(x.mean(0, keepdim=True))

    model = Pooled().eval()
    with torch.no_grad():
        model.bn.running_var.fill_(2.0)
        model.bn.running_mean.fill_(0.3)
    x = torch.randn(4, 16)
    report = audit(model, [x])
    (shift,) = report.shifts
    assert shift.count == 1
    z = (x.mean(0).double() - 0.3) / math.sqrt(2.0 + model.bn.eps)
    assert shift.mean_shift == pytest.approx(z[shift.worst_channel].item(), rel=1e-5)  # against the closed form
    log_ratio = math.log(model.bn.eps / (2.0 + model.bn.eps))  # variance 0 vs 2: the same in every channel
    assert shift.log_var_ratio == pytest.approx(log_ratio, rel=1e-6)
    # several batches: no within-batch spread to compare the batch means with (the F ratio's limit divided by zero
    # and raised), so no F ratio and no variance noise; the mean's noise from the spread of the batch means
    xs = [torch.randn(4, 16, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    report = audit(model, xs)
    (shift,) = report.shifts
    assert shift.batch_f is None and shift.var_noise is None
    means = torch.stack([x.mean(0) for x in xs]).double().numpy()
    s2 = means.var(0, ddof=1)  # one row per call: s2_mean is the batch means' sample variance
    # a training batch of 4 samples gives the layer one row, the mean of 4: the batch means' variance as it is
    expected = math.sqrt((0.1 / 1.9 * s2 / (2.0 + model.bn.eps)).mean())
    assert shift.mean_noise == pytest.approx(expected, rel=1e-5)
    (noise,) = report.by_code("stat_noise")
    assert "variances' noise is not measured" in noise.evidence and noise.data["var_noise"] is None


class _OwnForwardBN(nn.BatchNorm1d):
    """A BN subclass with its own forward: the audit measures its input after the call instead of standing in."""

    def forward(self, x):
        return super().forward(x) * 1.0


@pytest.mark.parametrize("layer", [nn.BatchNorm1d, _OwnForwardBN])
def test_a_routed_branch_given_no_rows_in_a_batch_is_audited(layer):
    """Rows routed to two BN branches, one of which gets none in a batch (PyTorch's training forward takes the empty
    input): the audit measured it by dividing by the batch size 0. Oracle: float64 statistics of the rows each
    branch received, against the closed-form shift."""
    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos, self.neg = layer(3), layer(3)

        def forward(self, x):
            out = torch.zeros_like(x)
            m = x[:, 0] > 0
            out[m], out[~m] = self.pos(x[m]), self.neg(x[~m])
            return out

    model = Routed().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, generator=g).abs() + 0.1, -torch.randn(8, 3, generator=g).abs() - 0.1,
               torch.randn(16, 3, generator=g)]
    with torch.no_grad():
        copy.deepcopy(model).train()(batches[0])  # PyTorch's own training-mode forward runs it
    report = audit(model, batches)
    assert report.batches == 3
    shifts = {s.layer: s for s in report.shifts}
    for name, rows in (("pos", torch.cat([b[b[:, 0] > 0] for b in batches])),
                       ("neg", torch.cat([b[b[:, 0] <= 0] for b in batches]))):
        x = rows.double().numpy()
        z = x.mean(0) / np.sqrt(1.0 + 1e-5)  # running mean 0, running variance 1
        lr = np.log((x.var(0, ddof=1) + 1e-5) / (1.0 + 1e-5))
        kl = 0.5 * (np.expm1(lr) - lr + z ** 2)
        assert shifts[name].count == len(x)
        assert shifts[name].score == pytest.approx(kl.mean(), rel=1e-5)
    assert all(not m.training for m in model.modules())


def test_random_batch_limit_is_the_f_quantile_a_little_above_it():
    """``_f_limit`` against scipy's F distribution: a chance of at most one in a million, not far above the quantile."""
    stats = pytest.importorskip("scipy.stats")
    from bnkit.torch.audit_data import _f_limit

    for d1 in (1, 2, 9, 28, 99):
        for d2 in (10, 30, 100, 1000, 10**5):
            limit, exact = _f_limit(d1, d2), stats.f.isf(1e-6, d1, d2)
            assert stats.f.sf(limit, d1, d2) <= 1e-6, (d1, d2)
            assert limit <= exact * (2.0 if d2 < 30 else 1.2), (d1, d2, limit, exact)  # loose only for tiny d2
    assert _f_limit(1, 2) == math.inf  # two batches of two values: too few to tell


def test_malicious_pickle_is_refused_and_never_run(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"bn.running_mean": torch.zeros(3), "payload": WritesFile(str(target))}, path)
    with pytest.raises(UnsafeCheckpointError, match="NOT loaded"):
        audit(path)
    assert not target.exists()
    # the file really is dangerous: a plain unpickling creates the target
    torch.load(path, weights_only=False)
    assert target.exists()


def test_state_dict_without_bn_and_data_without_model(digits):
    report = audit(nn.Linear(3, 2).state_dict())
    assert report.ok and report.by_code("no_bn")
    with pytest.raises(ValueError, match="needs the model"):
        audit(nn.BatchNorm1d(2).state_dict(), digits[0])
    with pytest.raises(TypeError):
        audit(42)


def test_a_state_dict_is_read_as_its_file_is(tmp_path):
    """audit(mapping) took a checkpoint's {"state_dict": sd, "epoch": 3} as flat and passed it ('no BatchNorm layers
    found', ok) where the file failed; a non-string key crashed with AttributeError; an RL observation normalizer's
    (8, 8) running_mean was an error ('not one value per channel') where the model audit skips it. Oracles: the
    audit of the same file, and of the model."""
    never = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).state_dict()  # never-updated statistics: an error
    wrapped = {"state_dict": never, "epoch": 3}
    torch.save(wrapped, tmp_path / "w.pth")
    by_file = audit(tmp_path / "w.pth")
    arrays = {k: v.numpy() for k, v in never.items()}  # a flat dict of arrays or lists audits as it always did
    for target in (wrapped, {**never, 7: torch.zeros(3)}, arrays, {k: v.tolist() for k, v in arrays.items()},
                   {"state_dict": never, "running_mean": torch.tensor(0.3)},  # a metric beside hid the BN layers
                   {"model": never, "obs_rms.running_mean": torch.zeros(8, 8), "obs_rms.running_var": torch.ones(8, 8)},
                   {"weights": never, **{k: 1.0 for k in ("epoch", "step", "lr", "loss", "acc", "seed")}},
                   {"weights": never, "hparams": {"lr": 0.1, "epochs": 90}},
                   {"model": never, "obs_rms.running_mean": torch.full((8,), 0.3),  # a 1-D normalizer beside
                    "obs_rms.running_var": torch.full((8,), 2.0)},
                   {"state_dict": never, "milestones": [[30, 60], [90]]}):  # a ragged list beside
        report = audit(target)
        assert not report.ok and report.layers == by_file.layers == ["1"]
        # the 1-D normalizer beside the weights is named in a warning, not audited
        assert {f.code for f in report.findings} - {"unread_beside"} == {f.code for f in by_file.findings}
        assert [f.data["layers"] for f in report.by_code("unread_beside")] == (
            [["obs_rms"]] if "obs_rms.running_var" in target and target["obs_rms.running_var"].dim() == 1 else [])
    # a model at the top level beside its EMA under a wrapper key: both are read, each named after its place
    beside = audit({**nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).state_dict(), "ema": never})
    assert beside.layers == ["1", "ema/1"] and {f.layer for f in beside.by_code("never_updated")} == {"1", "ema/1"}
    assert audit({}).ok and audit({}).by_code("no_bn")
    with pytest.raises(ValueError, match=r"BatchNorm buffers as arrays under \['state_dict'\]"):
        audit({"state_dict": arrays, "epoch": 3})  # taken for a state dict without BN layers, and passed
    bad = {**arrays, "1.running_var": arrays["1.running_var"].astype(complex)}  # checked whatever they hold
    assert audit(bad).by_code("invalid_state")
    # BN buffers as arrays or lists beside a tensor: dropped as a file's non-tensors are, they passed unseen
    for mixed in ({**arrays, "0.weight": never["0.weight"]},
                  {**never, "1.running_mean": arrays["1.running_mean"].tolist()}):
        report = audit(mixed)
        assert not report.ok and report.layers == ["1"] and report.by_code("never_updated")
    assert audit({"models": [never]}).by_code("never_updated")  # a list around the state dict: read, as its file

    class RunningMeanStd(nn.Module):  # rl_games' observation normalizer: buffers named like a BN's
        def __init__(self):
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(8, 8, dtype=torch.float64))
            self.register_buffer("running_var", torch.ones(8, 8, dtype=torch.float64))
            self.register_buffer("count", torch.ones((), dtype=torch.float64))

    class Agent(nn.Module):
        def __init__(self):
            super().__init__()
            self.obs_norm, self.net = RunningMeanStd(), nn.Sequential(nn.Linear(64, 4))

    agent = Agent()
    for report in (audit(agent.state_dict()), audit(agent)):
        assert report.ok and report.layers == [] and report.by_code("no_bn")


# ---------------------------------------------------------------- depth 2: the model's flags


def _fine_tune(pretrained, x, y, correct):
    model = copy.deepcopy(pretrained)
    if correct == "bnkit":
        freeze_bn(model)
    else:  # the lesson's recipe: eval() plus requires_grad=False
        for _, bn in bn_layers(model):
            bn.eval()
            bn.weight.requires_grad_(False)
            bn.bias.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    shifted = x * 0.5 + 0.3
    for epoch in range(2):
        model.train()  # every training loop does this
        if correct == "manual":
            for _, bn in bn_layers(model):
                bn.eval()
        for i in range(0, 256, 64):
            loss = nn.functional.cross_entropy(model(shifted[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def test_broken_freeze_is_an_error_correct_freezes_are_not(trained, digits):
    x, y = digits
    broken = _fine_tune(trained, x, y, correct=None)
    assert not torch.equal(broken.stem[1].running_mean, trained.stem[1].running_mean)  # the drift happened
    report = audit(broken)
    (finding,) = report.by_code("frozen_in_train")
    assert finding.severity == "error"
    assert set(finding.data["layers"]) == {n for n, _ in bn_layers(broken)}
    for how in ("manual", "bnkit"):
        good = _fine_tune(trained, x, y, correct=how)
        assert torch.equal(good.stem[1].running_mean, trained.stem[1].running_mean)
        flags = [m.training for m in good.modules()]
        report = audit(good)
        assert report.ok, (how, _errors(report))
        assert not report.by_code("frozen_in_train") and not report.by_code("train_mode")
        assert [m.training for m in good.modules()] == flags
    frozen = freeze_bn(copy.deepcopy(trained)).train()
    audit(frozen, x[:128])
    unfreeze_bn(frozen)  # the mode asked for while frozen (train) survived the audit's passes
    assert all(bn.training for _, bn in bn_layers(frozen))


def test_training_mode_at_inference(trained):
    model = copy.deepcopy(trained)
    model.layers[1].bn1.train()  # one submodule left in training mode
    (finding,) = audit(model).by_code("train_mode")
    assert finding.severity == "error" and finding.data["layers"] == ["layers.1.bn1"]
    assert finding.data["model_training"] is False
    assert audit(model.train()).by_code("train_mode")[0].data["model_training"] is True


def test_tracking_turned_off_on_a_layer_with_buffers_is_reported_in_both_modes():
    """PyTorch then never updates the buffers in training but normalizes with them in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    model.train()
    for _ in range(20):
        model(torch.randn(16, 4))
    model[1].track_running_stats = False
    before = model[1].running_mean.clone()
    model(torch.randn(16, 4) + 5)  # training mode: the buffers stay as they were ...
    assert torch.equal(model[1].running_mean, before)
    model.eval()
    x = torch.randn(8, 4)
    ref = model[1].weight * (model[0](x) - before) / torch.sqrt(model[1].running_var + model[1].eps) + model[1].bias
    torch.testing.assert_close(model[1](model[0](x)), ref)  # ... and eval mode normalizes with them
    report = audit(model)
    assert [f.layer for f in report.by_code("stale_running_stats")] == ["1"]
    model.train()
    report = audit(model)
    assert report.by_code("stale_running_stats") and "1" in report.by_code("train_mode")[0].data["layers"]


def test_track_running_stats_false_and_its_batch_coupling():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(256, 3)).eval()
    report = audit(model, torch.randn(64, 1, 8, 8))
    assert report.by_code("no_running_stats")[0].layer == "1"
    (coupling,) = report.by_code("batch_coupling")
    assert coupling.severity == "error" and coupling.data["batch_stat_layers"] == ["1"]
    assert "without running statistics" in coupling.evidence


def test_momentum_window_and_convention_mixup():
    """0.9 and 0.99 are Keras's usual values pasted into PyTorch (where they weigh the NEW batch); 0 keeps the
    initial statistics forever, as PyTorch's own layer shows."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=0.99), nn.Linear(4, 4), nn.BatchNorm1d(4),
                          nn.BatchNorm1d(4, momentum=None), nn.BatchNorm1d(4, momentum=0.9),
                          nn.BatchNorm1d(4, momentum=0.0))
    findings = {f.data["momentum"]: f for f in audit(model).by_code("momentum")}
    assert findings[0.99].severity == "warning" and "0.01" in findings[0.99].fix
    assert findings[0.9].severity == "warning" and "0.1" in findings[0.9].fix
    assert findings[0.0].severity == "warning" and "never change" in findings[0.0].finding
    stuck = nn.BatchNorm1d(4, momentum=0.0).train()
    stuck(torch.randn(16, 4) + 5)
    assert torch.equal(stuck.running_mean, torch.zeros(4)) and torch.equal(stuck.running_var, torch.ones(4))
    assert findings[0.1].severity == "info" and findings[0.1].data["window"] == pytest.approx(
        math.log(0.05) / math.log(0.9))
    assert findings[None].severity == "info"


def test_sync_bn_without_process_group():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    model.train()
    assert not torch.distributed.is_initialized()
    (finding,) = audit(model).by_code("sync_no_group")
    assert finding.severity == "warning"
    # what the warning says: it trains as a plain, local BatchNorm
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).train()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(8, 1, 6, 6)
    assert torch.allclose(model(x), plain(x))
    assert audit(model.eval()).by_code("sync_bn")[0].severity == "info"


def test_foldable_layers_reported():
    model = SharedConvNet().eval()
    (finding,) = audit(model).by_code("foldable")
    folded = set(finding.data["folded"])
    assert "stem.1" in folded and not folded & {"bn_a", "bn_b"} and finding.data["notes"] == []
    # fold's note on a float16 BN folded before a layer whose inputs sit 200 std from zero comes with it
    half = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3)).half().eval()
    with torch.no_grad():
        half[0].running_mean.fill_(200.0)
        half[0].num_batches_tracked.fill_(1000)
    (finding,) = audit(half).by_code("foldable")
    assert sum("200 standard deviations from zero" in note for note in finding.data["notes"]) == 1


# ---------------------------------------------------------------- depth 3: data


def test_single_shifted_layer_ranks_first(trained, digits):
    x = digits[0]
    model = copy.deepcopy(trained)
    bn = model.layers[0].bn1
    with torch.no_grad():
        bn.running_mean += 3 * torch.sqrt(bn.running_var + bn.eps)
    report = audit(model, x)
    assert report.shifts[0].layer == "layers.0.bn1"
    assert report.shifts[0].z_eq > 2.5 and report.shifts[1].z_eq < 0.5
    first = report.by_code("stat_shift")[0]
    assert first.layer == "layers.0.bn1" and first.severity == "error"
    ranks = {s.layer: i for i, s in enumerate(report.shifts, start=1)}  # counted from 1: the top layer is rank 1
    assert first.finding.endswith("(rank 1)")
    assert all(f.finding.endswith(f"(rank {ranks[f.layer]})") for f in report.by_code("stat_shift"))
    assert [f.layer for f in report.by_code("stat_shift") if f.severity == "error"] == ["layers.0.bn1"]
    order = [SEVERITIES.index(f.severity) for f in report.findings]  # documented: most severe first
    assert order == sorted(order) and len(set(order)) == 3

    # oracle for the worst channel's z: PyTorch's own cumulative average of the batch means
    probe = _cumulative_probe(model, x)
    s = report.shifts[0]
    mean_d = probe.layers[0].bn1.running_mean.double()
    z = (mean_d - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps)
    assert s.mean_shift == pytest.approx(z[s.worst_channel].item(), abs=1e-4)


@pytest.mark.parametrize("shape", [(600, 3), (60, 3, 2, 2), (40, 3, 5, 5)])  # kernel moments / _moments
def test_shift_math_on_one_layer_against_float64_closed_form(shape):
    rng = np.random.default_rng(1)
    loc = np.array([1.0, -2.0, 0.5]).reshape((1, 3) + (1,) * (len(shape) - 2))
    scale = np.array([2.0, 0.5, 1.0]).reshape(loc.shape)
    data = torch.tensor(rng.normal(size=shape) * scale + loc, dtype=torch.float32)
    bn = (nn.BatchNorm1d(3) if len(shape) == 2 else nn.BatchNorm2d(3)).eval()
    set_running_stats(bn, [0.0, -2.0, 3.0], [4.0, 1.0, 1.0])
    report = audit(bn, data, batch_size=20)
    (s,) = report.shifts
    x = data.double().numpy().swapaxes(0, 1).reshape(3, -1)  # what the layer saw, per channel
    mu, var = x.mean(1), x.var(1, ddof=1)
    mr, vr = np.array([0.0, -2.0, 3.0]), np.array([4.0, 1.0, 1.0])
    z = (mu - mr) / np.sqrt(vr + 1e-5)
    lr = np.log((var + 1e-5) / (vr + 1e-5))
    kl = 0.5 * (np.exp(lr) - 1 - lr + z**2)
    assert s.score == pytest.approx(kl.mean(), rel=1e-5)
    assert s.worst_channel == int(np.argmax(kl)) == 2
    assert s.mean_shift == pytest.approx(z[2], rel=1e-5)
    assert s.log_var_ratio == pytest.approx(lr[2], rel=1e-4)
    assert s.count == x.shape[1]


@pytest.mark.parametrize("shift, severity", [(0.2, None), (0.5, "warning"), (1.2, "error"), (2.0, "error")])
def test_shift_severity_follows_the_equivalent_shift_in_std(shift, severity):
    """Data whose per-channel mean is off by ``shift`` running std and whose variance matches exactly: the shift is an
    error from 1 std on, a warning from 0.3 std on (the KL thresholds 0.5 and 0.045 are z^2 / 2 of those)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 3))
    x = (x - x.mean(0)) / x.std(0, ddof=1) + shift  # exactly mean ``shift``, unbiased variance 1
    bn = nn.BatchNorm1d(3).eval()
    bn.num_batches_tracked.fill_(1000)  # running mean 0, variance 1
    report = audit(bn, torch.tensor(x, dtype=torch.float32), batch_size=128)
    (s,) = report.shifts
    assert s.z_eq == pytest.approx(shift, rel=1e-4)
    assert [f.severity for f in report.by_code("stat_shift")] == ([severity] if severity else [])


def test_worst_channel_is_the_one_with_the_largest_kl_not_the_largest_mean_shift():
    """Channel 0: mean off by 1 std (KL 0.5); channel 1: the data's variance 100x the running one (KL ~ 47.6)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 2))
    x = (x - x.mean(0)) / x.std(0, ddof=1)  # exactly mean 0, unbiased variance 1
    bn = nn.BatchNorm1d(2).eval()
    with torch.no_grad():
        bn.running_mean[0] = 1.0
        bn.running_var[1] = 0.01
        bn.num_batches_tracked.fill_(1000)
    (s,) = audit(bn, torch.tensor(x, dtype=torch.float32), batch_size=128).shifts
    lr = np.log((1 + 1e-5) / (0.01 + 1e-5))
    assert s.worst_channel == 1 and s.log_var_ratio == pytest.approx(lr, rel=1e-4)
    assert s.mean_shift == pytest.approx(0.0, abs=1e-4)
    assert s.score == pytest.approx((0.5 * (np.expm1(lr) - lr) + 0.5 / (1 + 1e-5)) / 2, rel=1e-4)


def test_a_negative_running_variance_is_left_out_of_the_ranking_and_the_coupling_check():
    """running_var -1 (a corrupt checkpoint) has no Gaussian to compare with (sqrt of a negative): the state checks
    report it, it is not ranked with a NaN score; its NaN eval outputs give no batch-coupling verdict."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        model[1].num_batches_tracked.fill_(10)
        model[3].num_batches_tracked.fill_(10)
        model[3].running_var[0] = -1.0
    report = audit(model, torch.randn(256, 3))
    assert {("negative_var", "3"), ("eval_nonfinite", "(model)")} <= {(f.code, f.layer) for f in _errors(report)}
    assert [s.layer for s in report.shifts] == ["1"] and math.isfinite(report.shifts[0].score)
    assert "3" not in [f.layer for f in report.by_code("stat_shift")]
    assert report.batch_coupling is None and not report.by_code("batch_coupling")


@pytest.mark.parametrize("b_train, m", [(8, 0.1), (8, 0.13), (8, 0.2), (4, 0.5)])  # 0.081, 0.093, 0.118, 0.29 std
def test_running_stat_noise_matches_pytorch_running_average(b_train, m):
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(2, momentum=m)
    trace_mean, trace_var = [], []
    with torch.no_grad():
        for t in range(4000):  # the running statistics PyTorch keeps while training at batch size 8
            bn(torch.randn(b_train, 2) * 3 + 2)
            if t > 200:
                trace_mean.append(bn.running_mean.clone())
                trace_var.append(bn.running_var.clone())
    observed_mean = (torch.stack(trace_mean).std(0) / 3).pow(2).mean().sqrt().item()
    observed_var = (torch.stack(trace_var).std(0) / 9).pow(2).mean().sqrt().item()
    bn.eval()
    report = audit(bn, torch.randn(256 * 64, 2) * 3 + 2, batch_size=64, train_batch_size=b_train)
    (s,) = report.shifts
    assert s.mean_noise == pytest.approx(observed_mean, rel=0.12)
    assert s.var_noise == pytest.approx(observed_var, rel=0.12)
    (noise,) = report.by_code("stat_noise")
    assert noise.data["train_batch_size"] == b_train
    closed = (m / (2 - m) / b_train) ** 0.5  # the EMA's std in units of the data's: Var = m/(2-m) * sigma^2/b
    assert observed_mean == pytest.approx(closed, rel=0.12)
    assert noise.severity == ("warning" if closed > 0.1 else "info")  # NOISE_WARNING: 0.1 std
    assert (closed > 0.1) == (m >= 0.2)  # both sides of it covered, 7% and 18% from it


@pytest.mark.parametrize("updates", [1, 2, 4])
def test_running_stat_noise_of_a_cumulative_average_matches_pytorch(updates):
    """momentum=None: the running mean is the plain average of ``updates`` batch means, so it wobbles by
    1 / sqrt(updates * B) std, not by 1 / (updates sqrt(B)) nor as if one more batch were averaged in. The oracle:
    PyTorch's own layer, 4000 independent channels each trained ``updates`` steps at batch size 8."""
    torch.manual_seed(0)
    b_train, channels = 8, 4000
    bn = nn.BatchNorm1d(channels, affine=False, momentum=None)
    with torch.no_grad():
        for _ in range(updates):
            bn(torch.randn(b_train, channels) * 3 + 2)
        observed = ((bn.running_mean - 2) / 3).std().item()  # in the data's std
        bn.running_var.fill_(9.0)  # the data's variance: the audit's unit (running std) is the same
    assert observed == pytest.approx((updates * b_train) ** -0.5, rel=0.05)
    report = audit(bn.eval(), torch.randn(64 * 32, channels) * 3 + 2, batch_size=32, train_batch_size=b_train)
    (s,) = report.shifts
    assert s.mean_noise == pytest.approx(observed, rel=0.05)


def test_noise_row_names_the_noisiest_layer_not_the_top_ranked_one():
    """Layer ``a``: far off (ranks first) but averaged with momentum 0.01; layer ``b``: momentum 0.9. The noise row
    is about ``b``, whose running mean wobbles by sqrt(m / (2 - m) / B) = 0.16 std at B = 32 (a warning)."""
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fa, self.a = nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.01)
            self.fb, self.b = nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.9)

        def forward(self, x):
            return self.a(self.fa(x)) + self.b(self.fb(x))

    model = Two().eval()
    with torch.no_grad():
        for layer, fc in ((model.a, model.fa), (model.b, model.fb)):  # the data's statistics, but a's mean 3 std off
            h = fc(torch.randn(4096, 3))
            layer.running_mean.copy_(h.mean(0) + 3 * h.std(0) * (layer is model.a))
            layer.running_var.copy_(h.var(0))
            layer.num_batches_tracked.fill_(1000)
    report = audit(model, torch.randn(2048, 3), batch_size=64, train_batch_size=32)
    assert report.shifts[0].layer == "a"  # the setup holds
    (noise,) = report.by_code("stat_noise")
    assert noise.layer == "b" and noise.severity == "warning"
    assert noise.data["mean_noise"] == pytest.approx((0.9 / 1.1 / 32) ** 0.5, rel=0.15)


def test_noise_from_two_unequal_batches_is_the_one_way_anova_of_the_batches():
    """Two batches (40 and 6 samples) are enough for a noise figure; float64 NumPy from the docstring's ANOVA: the
    between-batch mean square of the batch means, and of the unbiased batch variances around their pooled value
    (weighted by n_b - 1, the within-batch degrees of freedom), scaled to the training batch size."""
    rng = np.random.default_rng(0)
    data = [torch.tensor(rng.normal(size=(n, 3)) * [1.0, 2.0, 0.5] + 1.0, dtype=torch.float32) for n in (40, 6)]
    bn = nn.BatchNorm1d(3, momentum=0.1).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
        bn.num_batches_tracked.fill_(1000)
    report = audit(bn, data, train_batch_size=8)
    (s,) = report.shifts
    x = [d.double().numpy() for d in data]
    n = np.array([len(b) for b in x], dtype=float)
    means, variances = np.array([b.mean(0) for b in x]), np.array([b.var(0, ddof=1) for b in x])
    grand = (n @ means) / n.sum()
    s2_mean = n @ (means - grand) ** 2  # / (K - 1) = 1
    pooled = (n - 1) @ variances / (n - 1).sum()
    s2_var = (n - 1) @ (variances - pooled) ** 2
    factor = (0.1 / 1.9) ** 0.5  # the EMA's stationary std over one batch statistic's
    mean_noise = factor * np.sqrt(s2_mean / 8 / (np.array([1.0, 4.0, 0.25]) + 1e-5))
    var_noise = factor * np.sqrt(s2_var / 7) / (pooled + 1e-5)
    assert report.batches == 2
    assert s.mean_noise == pytest.approx(np.sqrt(np.mean(mean_noise ** 2)), rel=1e-5)
    assert s.var_noise == pytest.approx(np.sqrt(np.mean(var_noise ** 2)), rel=1e-5)


def test_one_data_batch_says_the_noise_was_not_estimated():
    bn = nn.BatchNorm1d(2).eval()
    report = audit(bn, torch.randn(64, 2), batch_size=64, train_batch_size=8)
    (noise,) = report.by_code("stat_noise")
    assert noise.severity == "info" and "not estimated" in noise.finding and noise.data["batches"] == 1
    assert report.shifts[0].mean_noise is None


@pytest.mark.parametrize("size", [0, 1])
def test_train_batch_size_below_two_is_refused(size):
    with pytest.raises(ValueError, match="train_batch_size must be at least 2"):
        audit(nn.BatchNorm1d(2).eval(), torch.randn(64, 2), train_batch_size=size)


class _TwoBN(nn.Module):
    """Column 0 through ``gauss`` (running variance 100x too small: the noisiest running means), column 1 cubed
    through ``heavy`` (kurtosis ~46 against a Gaussian's 3: the noisiest running variances)."""

    def __init__(self):
        super().__init__()
        self.gauss, self.heavy = nn.BatchNorm1d(1), nn.BatchNorm1d(1)
        with torch.no_grad():
            self.gauss.running_var.fill_(0.01)
            self.heavy.running_var.fill_(15.0)  # E z^6 for a standard normal z
            self.gauss.num_batches_tracked.fill_(1000)
            self.heavy.num_batches_tracked.fill_(1000)

    def forward(self, x):
        return torch.cat([self.gauss(x[:, :1]), self.heavy(x[:, 1:] ** 3)], 1)


def test_noise_row_names_the_layer_of_each_figure():
    torch.manual_seed(0)
    report = audit(_TwoBN().eval(), torch.randn(64 * 64, 2), batch_size=64, train_batch_size=32)
    by_layer = {s.layer: s for s in report.shifts}
    assert max(by_layer, key=lambda n: by_layer[n].mean_noise) == "gauss"  # the setup holds
    assert max(by_layer, key=lambda n: by_layer[n].var_noise) == "heavy"
    (noise,) = report.by_code("stat_noise")
    assert noise.layer == "gauss" and noise.data["var_noise_layer"] == "heavy"
    assert f"{noise.data['mean_noise']:.3g} std in gauss " in noise.evidence
    assert f"{100 * noise.data['var_noise']:.3g}% in heavy" in noise.evidence


class Centered(nn.Module):
    """Subtracts the batch mean outside any BatchNorm: couples the samples of a batch."""

    def __init__(self):
        super().__init__()
        self.net = MLP(hidden=(16,))

    def forward(self, x):
        h = x.flatten(1)
        return self.net(h - h.mean(0, keepdim=True))


def test_batch_coupling_not_from_bn_is_named(digits):
    x, y = digits
    model = _train(Centered(), x[:512], y[:512], epochs=1).eval()
    snap = _snapshot(model)
    report = audit(model, x[:256])
    (finding,) = report.by_code("batch_coupling")
    assert finding.severity == "error" and "OTHER than BatchNorm" in finding.evidence
    assert report.batch_coupling > 1e-2
    _assert_unchanged(model, snap)


def test_bad_data_changes_nothing(trained, digits):
    model = copy.deepcopy(trained)
    model.layers[0].train()  # mixed flags must come back as they were
    snap = _snapshot(model)
    bad = digits[0][:128].clone()
    bad[70, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="data batch 1 contains NaN"):
        audit(model, bad)
    with pytest.raises(ValueError, match="data batch 1 contains NaN"):
        audit(model, list(torch.split(bad, 64)))
    with pytest.raises(ValueError, match="failed on data batch 0"):
        audit(model, torch.randn(64, 3, 8, 8))
    labels = torch.zeros(128)
    labels[70] = float("nan")  # a missing target: the default forward hands the model the first element alone
    pairs = list(zip(torch.split(bad, 64), torch.split(labels, 64)))
    with pytest.raises(ValueError, match="data batch 1 contains NaN"):
        audit(model, pairs)
    clean = [(x, y) for (_, y), x in zip(pairs, torch.split(digits[0][:128], 64))]
    want = audit(model, [x for x, _ in clean])
    got = audit(model, clean)
    assert [(s.layer, s.score) for s in got.shifts] == [(s.layer, s.score) for s in want.shifts]
    with pytest.raises(ValueError, match="data batch 1 contains NaN"):  # forward= may feed it anything
        audit(model, clean, forward=lambda m, batch: m(batch[0]))
    with pytest.raises(ValueError, match="at least 2"):
        audit(model, digits[0][:3], batch_size=1)
    _assert_unchanged(model, snap)
    lazy = nn.Sequential(nn.Flatten(), nn.LazyLinear(8), nn.LazyBatchNorm1d())
    assert audit(lazy).by_code("lazy")
    with pytest.raises(ValueError, match="lazy"):
        audit(lazy, digits[0][:64])
    assert lazy[1].has_uninitialized_params()


def test_iterable_of_tuples_and_custom_forward(trained, digits):
    x, y = digits
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 640, 64)]
    a = audit(trained, loader)
    b = audit(trained, [{"inp": xb} for xb, _ in loader], forward=lambda model, batch: model(batch["inp"]))
    c = audit(trained, x[:640])
    assert a.batches == b.batches == c.batches == 10
    assert [s.layer for s in a.shifts] == [s.layer for s in c.shifts]
    assert a.shifts[0].score == pytest.approx(c.shifts[0].score, rel=1e-9)
    assert b.shifts[0].score == pytest.approx(c.shifts[0].score, rel=1e-9)
    assert audit(trained, x[:640], max_batches=3).batches == 3
    # a limit covering every batch changes nothing: the last sample alone still joins the batch before it (it was
    # cut off first: 640 of 641 samples measured)
    whole, limited = audit(trained, x[:641]), audit(trained, x[:641], max_batches=10)
    assert whole.batches == limited.batches == 10 and whole.shifts[0].count == limited.shifts[0].count
    assert whole.shifts[0].score == limited.shifts[0].score
    assert audit(trained, x[:641], max_batches=sys.maxsize + 2).batches == 10  # islice took no more than maxsize
    drawn = []

    def stream():  # a user's generator: max_batches=3 must draw 3 batches from it, not one more
        for i, batch in enumerate(loader):
            drawn.append(i)
            yield batch

    assert audit(trained, stream(), max_batches=3).batches == 3 and drawn == [0, 1, 2]



def test_arrays_pytorch_cannot_take_are_left_for_forward(trained, digits):
    """NumPy batches with per-sample names beside the pixels: the names reach forward= as they are (they raised
    TypeError from torch.from_numpy); the figures equal those of the pixels alone."""
    x, _ = digits
    pixels = x[:640].numpy()
    names = np.array([f"img{i}" for i in range(640)])
    seen = []

    def forward(model, batch):
        seen.append(type(batch[1]))
        return model(batch[0])

    a = audit(trained, [(pixels[i:i + 64], names[i:i + 64]) for i in range(0, 640, 64)], forward=forward)
    c = audit(trained, x[:640])
    assert a.batches == c.batches == 10 and set(seen) == {np.ndarray}
    assert [s.layer for s in a.shifts] == [s.layer for s in c.shifts]
    assert a.shifts[0].score == pytest.approx(c.shifts[0].score, rel=1e-9)


def test_custom_forward_of_a_two_input_model_on_tuple_batches_keeps_the_fold_analysis():
    """With a custom forward only it knows the model's inputs: the audit must not feed the batch's first tensor
    to the model alone (a two-input model raises, and the fold analysis was skipped). The conv + BN is foldable."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x, scale):
            return self.bn(self.c(x * scale))

    torch.manual_seed(0)
    m = Two().eval()
    m.bn.num_batches_tracked.fill_(10)
    data = [(torch.randn(8, 3, 4, 4), torch.full((8, 1, 1, 1), 2.0)) for _ in range(3)]
    report = audit(m, data, forward=lambda model, b: model(b[0], b[1]))
    assert report.batches == 3 and not report.by_code("fold")
    (finding,) = report.by_code("foldable")
    assert finding.data["folded"] == {"bn": "c"}  # into the conv before it

def test_onnx_path_goes_to_the_onnx_audit(trained, tmp_path):
    pytest.importorskip("onnx")
    from bnkit.torch import export_onnx

    path = tmp_path / "m.onnx"
    export_onnx(trained, torch.randn(2, 1, 8, 8), path)
    report = audit(path)
    assert report.ok and report.depth == "onnx" and len(report.layers) == len(bn_layers(trained))
    with pytest.raises(ValueError):
        audit(path, torch.randn(4, 1, 8, 8))



@pytest.mark.parametrize("extras", [{}, {"renorm": True, "rmax": 3.0, "dmax": 5.0}, {"virtual_batch_size": 16}])
def test_drop_in_layers_measured_as_plain_batchnorm(trained, digits, extras):
    """bnkit's drop-in layers are measured on batch statistics as plain BN is, their extras set aside (renorm's r/d
    would pull each output toward the running statistics, so an upstream error would reach the layers after it)."""
    from bnkit.torch import convert_bn

    x = digits[0][:640]
    model = copy.deepcopy(trained)
    bn = model.layers[1].bn1
    with torch.no_grad():
        bn.running_var *= 4.0
    stock = audit(model, x)
    converted = convert_bn(copy.deepcopy(model), **extras)
    assert type(converted.layers[1].bn1).forward is not nn.BatchNorm2d.forward
    snap = _snapshot(converted)
    other = audit(converted, x)
    assert [s.layer for s in other.shifts] == [s.layer for s in stock.shifts]
    assert other.shifts[0].layer == "layers.1.bn1"
    for a, b in zip(stock.shifts, other.shifts):
        assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-7)
        assert a.log_var_ratio == pytest.approx(b.log_var_ratio, rel=1e-4, abs=1e-6)
    _assert_unchanged(converted, snap)


@pytest.mark.parametrize("name", ["resnet", "mlp", "vgg"])
def test_train_eval_gap_equals_pytorch_training_mode(name, digits):
    """The pass normalizes exactly as PyTorch's training mode does (without its updates)."""
    from bnkit.torch.zoo import VGGBN

    torch.manual_seed(0)
    model = {"resnet": SmallResNet, "mlp": MLP, "vgg": VGGBN}[name]()
    x = digits[0][:128] if name != "mlp" else digits[0][:128].flatten(1)
    with torch.no_grad():
        model.train()
        for i in range(0, 128, 32):
            model(x[i:i + 32] * 1.5)  # running statistics of other data: a real gap
    model.eval()
    report = audit(model, x, batch_size=64)
    reference = copy.deepcopy(model)
    for _, bn in bn_layers(reference):
        bn.train()
    with torch.no_grad():
        y_train, y_eval = reference(x[:64]).double(), model(x[:64]).double()
    expected = ((y_train - y_eval).norm() / y_train.norm()).item()
    assert expected > 0.05
    assert report.train_eval_gap == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("shift", [0.2, 3.0])
def test_train_eval_gap_above_one_half_is_a_warning(shift):
    """Running statistics off by ``shift`` std: the relative gap is about ``shift``, a warning above 0.5."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4)).eval()  # running mean 0, variance 1
    model[0].num_batches_tracked.fill_(1000)
    x = torch.randn(256, 4) + shift
    reference = copy.deepcopy(model)
    reference[0].train()  # PyTorch's training mode: batch statistics
    with torch.no_grad():
        y_train, y_eval = reference(x[:64]).double(), model(x[:64]).double()
    expected = ((y_train - y_eval).norm() / y_train.norm()).item()
    assert (expected > 0.5) == (shift > 1)
    report = audit(model, x, batch_size=64)
    assert report.train_eval_gap == pytest.approx(expected, rel=1e-4)
    (gap,) = report.by_code("gap")
    assert gap.severity == ("warning" if expected > 0.5 else "info")


def test_import_submodule_then_call_the_function():
    """What users write: ``import bnkit.torch.audit`` then ``bnkit.torch.audit(model)``.

    Run in a fresh interpreter, so that importing the submodule first (before anything
    else of bnkit.torch) is really what happens.
    """
    import subprocess
    import sys

    code = ("import bnkit.torch.audit\n"
            "import torch\n"
            "report = bnkit.torch.audit(torch.nn.BatchNorm1d(2).eval())\n"
            "print(sorted(f.code for f in report.findings if f.severity == 'error'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['never_updated']"


def test_pass_leaves_no_stand_in_forward_and_keeps_instance_forwards(trained, digits):
    """Stock layers get a stand-in forward for the pass only; a layer whose forward was patched
    on the instance keeps that forward (it is measured through a hook instead)."""
    x = digits[0][:640]
    model = copy.deepcopy(trained)
    reference = audit(model, x)
    patched = model.layers[0].bn1
    calls = []

    def own_forward(input):
        calls.append(1)
        return nn.BatchNorm2d.forward(patched, input)

    patched.forward = own_forward
    report = audit(model, x)
    assert calls and vars(patched)["forward"] is own_forward
    assert all("forward" not in vars(bn) for name, bn in bn_layers(model) if bn is not patched)
    for a, b in zip(reference.shifts, report.shifts):
        assert (a.layer, a.score) == (b.layer, pytest.approx(b.score, rel=1e-4, abs=1e-7))
    with pytest.raises(ValueError, match="failed on data batch 0"):
        audit(model, torch.randn(64, 3, 8, 8))
    assert all("forward" not in vars(bn) for name, bn in bn_layers(model) if bn is not patched)


class _Shaped(nn.Module):
    """BN, then optionally ``h - h.mean(0)`` (couples the batch), then an output shaped by ``shape``."""

    def __init__(self, couple, shape):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 1)
        self.couple, self.shape = couple, shape
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = torch.relu(self.bn(self.fc1(x)))
        return self.shape(self.fc2(h - h.mean(0) if self.couple else h))


@pytest.mark.parametrize("shape, dim", [(lambda y: y.squeeze(), 0),  # (N,), but () at batch size 1
                                        (lambda y: y.unsqueeze(0).expand(3, -1, -1), 1)],  # sequence-first (T, N, C)
                         ids=["squeezed", "sequence_first"])
def test_batch_coupling_is_compared_on_squeezed_and_sequence_first_outputs(shape, dim):
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    coupled, clean = _Shaped(True, shape).eval(), _Shaped(False, shape).eval()
    with torch.no_grad():  # the oracle: sample 0 alone against sample 0 inside its batch of 64
        assert (coupled(x[:1]).squeeze() - coupled(x[:64]).select(dim, 0).squeeze()).abs().max() > 1e-2
    (finding,) = audit(coupled, x).by_code("batch_coupling")
    assert finding.severity == "error" and "OTHER than BatchNorm" in finding.evidence
    report = audit(clean, x)
    (finding,) = report.by_code("batch_coupling")
    assert finding.severity == "info" and report.batch_coupling < 1e-6


def test_batch_coupling_not_claimed_when_no_output_lines_up():
    torch.manual_seed(0)
    model = _Shaped(True, lambda y: y.expand(-1, 2).reshape(-1)).eval()  # (2N,): no dimension is the batch
    report = audit(model, torch.randn(128, 8))
    (finding,) = report.by_code("batch_coupling")
    assert finding.severity == "info" and finding.finding == "batch coupling not checked"
    assert "forward=" in finding.fix and report.batch_coupling is None
    assert "do not depend" not in " ".join(f.finding for f in report.findings)
    # (4, 4) at batch size 4 against (4,) at batch size 1 (``.T.squeeze()``): either dimension could be the batch
    # squeezed away, so nothing lines up; pairing along the feature one made a false coupling error of a BN-only model
    clean = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    report = audit(clean, torch.randn(64, 3), batch_size=4, forward=lambda m, x: m(x).T.squeeze())
    (finding,) = report.by_code("batch_coupling")
    assert finding.severity == "info" and finding.finding == "batch coupling not checked"


def test_frozen_layers_get_the_array_checks_and_no_mode_checks(trained):
    from bnkit.torch import convert_frozen

    model = convert_frozen(copy.deepcopy(trained))
    names = [n for n, _ in bn_layers(trained)]
    with torch.no_grad():
        model.layers[0].bn1.running_var[3] = float("nan")
    report = audit(model)
    assert report.layers == names
    (finding,) = report.by_code("non_finite")
    assert finding.layer == "layers.0.bn1" and not report.ok
    model.train()  # frozen layers use their buffers in every mode: no mode, momentum or counter findings
    codes = {f.code for f in audit(model).findings}
    assert not codes & {"train_mode", "frozen_in_train", "momentum", "few_updates", "never_tracked"}


def test_frozen_layer_shifted_by_three_std_ranks_first(trained, digits):
    from bnkit.torch import convert_frozen

    x = digits[0][:640]
    model = copy.deepcopy(trained)
    bn = model.layers[0].bn1
    with torch.no_grad():
        bn.running_mean += 3 * torch.sqrt(bn.running_var + bn.eps)
    # oracle: PyTorch's cumulative average of the batch means, every BN layer on batch statistics
    probe = _cumulative_probe(model, x)
    convert_frozen(model)
    snap = _snapshot(model)
    report = audit(model, x)
    _assert_unchanged(model, snap)
    assert all("forward" not in vars(m) for m in model.modules())
    s = report.shifts[0]
    assert s.layer == "layers.0.bn1" and s.z_eq > 2.5 and report.shifts[1].z_eq < 0.5
    z = (probe.layers[0].bn1.running_mean.double() - bn.running_mean.double()) / torch.sqrt(
        bn.running_var.double() + bn.eps)
    assert s.mean_shift == pytest.approx(z[s.worst_channel].item(), abs=1e-4)
    assert s.mean_noise is None and not report.by_code("stat_noise")  # frozen statistics do not wobble


def test_batches_that_are_not_random_samples_are_told_instead_of_noise_and_gap():
    from sklearn.feature_selection import f_classif

    rng = np.random.default_rng(0)
    side = np.repeat([-1.0, 1.0], 640)  # two classes, stored sorted (an ImageFolder read with shuffle=False)
    x = rng.normal(size=(1280, 3)) + 1.5 * side[:, None]
    bn = nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        bn.running_var.fill_(1 + 1.5 ** 2)  # the mixture's statistics: no shift
        bn.num_batches_tracked.fill_(1000)
    ordered = audit(bn, torch.tensor(x, dtype=torch.float32), batch_size=64)
    (s,) = ordered.shifts
    f_anova, _ = f_classif(x, np.arange(1280) // 64)  # one-way ANOVA F, the batches as groups
    assert s.batch_f == pytest.approx(np.median(f_anova), rel=1e-4) and s.batch_f > 100
    (noise,) = ordered.by_code("stat_noise")
    assert noise.severity == "info" and "not random samples" in noise.finding and s.mean_noise is None
    (gap,) = ordered.by_code("gap")
    assert gap.severity == "info" and "not random samples" in gap.evidence
    shuffled = audit(bn, torch.tensor(rng.permutation(x), dtype=torch.float32), batch_size=64)
    (noise,) = shuffled.by_code("stat_noise")
    assert "not random" not in noise.finding and "random samples" in noise.evidence
    assert shuffled.shifts[0].batch_f < 2 and shuffled.shifts[0].mean_noise is not None


def test_a_layer_called_twice_per_forward_is_not_taken_for_ordered_batches():
    """One BN on x and on x + 3 in each forward: its two calls differ by design, not because the batches (random
    here) differ, so the audit must not claim that the data is ordered."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(3, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x)) + self.bn(self.fc(x + 3))

    torch.manual_seed(0)
    model = Twice().eval()
    model.bn.num_batches_tracked.fill_(1000)
    report = audit(model, torch.randn(512, 3), batch_size=64)
    (noise,) = report.by_code("stat_noise")
    assert "not random" not in noise.finding
    (gap,) = report.by_code("gap")
    assert "not random" not in gap.evidence
    # nor taken for sampling noise: the spread between x's and x + 3's statistics made the running means "wobble"
    # by 0.25 std (a warning), where PyTorch's own running mean, trained so, wobbles by 0.04 between forwards
    assert noise.finding == "running statistics noise not estimated" and noise.severity == "info"
    assert "called more than once per forward" in noise.evidence
    (shift,) = report.shifts
    assert shift.mean_noise is None and shift.var_noise is None and shift.batch_f is None
    # a layer called once per forward beside it still gets its figure
    model.head = nn.BatchNorm1d(4).eval()
    model.head.num_batches_tracked.fill_(1000)
    model.forward = lambda x: model.head(Twice.forward(model, x))
    report = audit(model, torch.randn(512, 3), batch_size=64)
    (noise,) = report.by_code("stat_noise")
    assert noise.layer == "head" and noise.data["mean_noise"] > 0
    assert {s.layer: s.mean_noise is None for s in report.shifts} == {"bn": True, "head": False}


def test_a_routed_layer_called_twice_in_some_forwards_gets_no_noise_figure_and_no_ordering_claim():
    """A branch taken by some batches only, where it calls its BN on x and x + 3: 4 calls over 4 batches looked like
    one per forward, so its x / x + 3 spread (F ~ 100) made the audit call random data ordered and drop the other
    layer's figure. Calls are counted per forward now; the once-called layer's figure is the closed form for
    BatchNorm1d on i.i.d. N(0, 1) data, sqrt(momentum / (2 - momentum) / B) (see the running-average test above)."""
    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.other = nn.BatchNorm1d(4), nn.BatchNorm1d(4)

        def forward(self, x):
            y = self.other(x)
            if x.shape[0] == 33:  # data-dependent routing
                y = y + self.bn(x) + self.bn(x + 3)
            return y

    torch.manual_seed(0)
    model = Routed().eval()
    for bn in (model.bn, model.other):
        bn.num_batches_tracked.fill_(1000)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(n, 4, generator=g) for n in (33, 32, 33, 32) * 8]
    report = audit(model, data, train_batch_size=32)
    shifts = {s.layer: s for s in report.shifts}
    assert shifts["bn"].mean_noise is None and shifts["bn"].batch_f is None
    (noise,) = report.by_code("stat_noise")
    assert noise.layer == "other" and "not random" not in noise.finding
    assert "not random" not in report.by_code("gap")[0].evidence
    expected = math.sqrt(0.1 / 1.9 / 32)
    assert shifts["other"].mean_noise == pytest.approx(expected, rel=0.35)


@pytest.mark.parametrize("keyword", ["input", "x"])
def test_a_bn_subclass_called_with_the_input_keyword_is_audited(keyword):
    """``bn(input=x)`` (PyTorch's parameter name), or the subclass's own name for it, on a BN subclass with its own
    forward: the after-hook read ``args[0]`` of an empty tuple and the audit blamed the model (then, for another
    name, left the layer out without a word). Oracle: float64 statistics of x."""
    class Own(nn.BatchNorm1d):
        def forward(self, *args, **kwargs):
            return super().forward(*args, *kwargs.values()) * 1.0

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = Own(3)

        def forward(self, x):
            return self.bn(**{keyword: x})

    model = Keyword().eval()
    model.bn.num_batches_tracked.fill_(10)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) + 1.0
    (shift,) = audit(model, x).shifts
    xd = x.double().numpy()
    z = xd.mean(0) / np.sqrt(1.0 + 1e-5)
    lr = np.log((xd.var(0, ddof=1) + 1e-5) / (1.0 + 1e-5))
    assert shift.count == 64 and shift.score == pytest.approx((0.5 * (np.expm1(lr) - lr + z ** 2)).mean(), rel=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rows_reshaped_from_samples_count_as_their_samples_for_ordering_and_noise(offset):
    """BatchNorm1d on x.reshape(-1, C) of T = 6 tokens per sample, independent (offset 0) or sharing a per-sample
    offset N(0, offset^2): the unit batches are drawn in is the sample, not the row. Dividing the rows' spread by B
    overstated the noise of independent tokens by sqrt(T); counting rows made random data with shared offsets look
    ordered (F ~ 3.4) and dropped every noise figure. Oracle: a sample's channel mean varies by offset^2 + 1/T, so
    at batch B the running mean wobbles by sqrt(m / (2 - m) * (offset^2 + 1/T) / B / (offset^2 + 1)) running std."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x):
            return self.bn(x.reshape(-1, 8)).reshape(x.shape)

    model = Tokens().eval()
    model.bn.num_batches_tracked.fill_(1000)
    model.bn.running_var.fill_(offset ** 2 + 1.0)  # the rows' variance
    g = torch.Generator().manual_seed(0)
    n = 128 * 16
    data = offset * torch.randn(n, 1, 8, generator=g) + torch.randn(n, 6, 8, generator=g)
    report = audit(model, data, batch_size=16)
    (shift,) = report.shifts
    assert shift.batch_f < 1.5 and not [f for f in report.findings if "not random" in f.finding + f.evidence]
    expected = math.sqrt(0.1 / 1.9 * (offset ** 2 + 1 / 6) / 16 / (offset ** 2 + 1.0))
    assert shift.mean_noise == pytest.approx(expected, rel=0.2)


def test_rows_that_each_sum_up_the_batch_never_claim_that_random_data_is_ordered():
    """BatchNorm1d on x.mean(0) of (N, 6, C) samples sharing an offset per sample: 6 rows per call, each an average
    of the whole batch, not samples; their between-call spread (the batch mean of the offsets) against their small
    within-call spread gave F ~ 7 and the claim that shuffled, random data is ordered. Only layers fed at least one
    row per sample may make that claim."""
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x):
            return self.bn(x.mean(0))

    model = Pooled().eval()
    model.bn.num_batches_tracked.fill_(1000)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(4096, 1, 8, generator=g) + torch.randn(4096, 6, 8, generator=g)
    report = audit(model, data, batch_size=16)
    assert report.shifts[0].batch_f > 3  # what the rows show; not taken as evidence of ordered data
    assert not [f for f in report.findings if "not random" in f.finding + f.evidence]


def test_the_quoted_random_batch_limit_has_the_anova_degrees_of_freedom():
    """4 sorted batches of 8 through BatchNorm1d (one value per channel and sample): for random batches the F ratio
    is F(K - 1, sum_b (n_b - 1)) = F(3, 28), so the quoted limit has a chance of at most one in a million under it
    (F(4, 28) or F(3, 32), one degree of freedom too many, give lower limits: chances above that)."""
    stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4).eval()
    bn.num_batches_tracked.fill_(1000)
    x = torch.randn(32, 4) + torch.linspace(-5, 5, 32)[:, None]  # batches in ascending order
    (noise,) = audit(bn, x, batch_size=8).by_code("stat_noise")
    assert "not random samples" in noise.finding and noise.data["batches"] == 4
    limit, exact = noise.data["f_limit"], stats.f.isf(1e-6, 3, 28)
    assert stats.f.sf(limit, 3, 28) <= 1e-6 and limit <= 1.2 * exact
    assert f"above {limit:.3g} with" in noise.evidence


@pytest.mark.parametrize("max_batches", [0, -3])
def test_max_batches_below_one_is_refused(max_batches):
    x = torch.randn(256, 2)
    for data in (x, list(x.split(64))):
        with pytest.raises(ValueError, match="max_batches must be at least 1"):
            audit(nn.BatchNorm1d(2).eval(), data, max_batches=max_batches)


def test_a_model_without_parameters_gets_the_data_in_its_buffers_dtype():
    """affine=False BatchNorm layers only: the batches follow the running statistics' dtype (and device)."""
    model = nn.Sequential(nn.BatchNorm1d(4, affine=False)).double().eval()
    with torch.no_grad():
        model[0].running_var.fill_(2.0)
        model[0].num_batches_tracked.fill_(100)
    x = torch.randn(128, 4, generator=torch.Generator().manual_seed(0))
    report = audit(model, x)  # float32 data
    (shift,) = report.shifts
    x64 = x.double()
    z = (x64.mean(0) / (2.0 + 1e-5) ** 0.5).numpy()
    assert report.batches == 2 and shift.count == 128
    assert shift.mean_shift == pytest.approx(z[shift.worst_channel], rel=1e-9)


def test_a_count_that_is_not_one_is_an_error_at_every_depth(trained, tmp_path):
    """A negative num_batches_tracked (torch's load_state_dict takes it) is not a few updates to report on."""
    model = copy.deepcopy(trained)
    bn_name, bn = bn_layers(model)[0]
    bn.num_batches_tracked.fill_(-3)
    path = save_state_dict_file(model.state_dict(), tmp_path / "w.safetensors")
    for report in (audit(model), audit(path)):
        (finding,) = [f for f in report.findings if f.layer == bn_name and f.severity == "error"]
        assert finding.code == "invalid_state" and "(a count of updates), got -3" in finding.evidence and not report.ok
        assert "few_updates" not in {f.code for f in report.findings if f.layer == bn_name}


@pytest.mark.parametrize("debias", [False, True])
def test_few_updates_of_a_debiased_layer_leave_no_weight_on_the_initial_values(debias):
    """Three steps with momentum 0.1: a plain EMA still holds 0.9^3 of the initial 0 / 1 (the running mean is 27%
    of the data's), a debiased one none (it equals the data's); only the first is reported."""
    from bnkit.torch import BatchNorm1d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4, debias=debias))
    x = torch.randn(96, 3) + 5.0
    model.train()
    with torch.no_grad():
        for i in range(0, 96, 32):
            model(x[i:i + 32])
        data_mean = model[0](x).mean(0)
    ratio = (model[1].running_mean / data_mean).mean().item()
    assert ratio == pytest.approx(1.0, abs=0.05) if debias else ratio == pytest.approx(1 - 0.9 ** 3, abs=0.05)
    codes = {f.code for f in audit(model.eval()).findings if f.layer == "1"}
    assert ("few_updates" in codes) is not debias


def test_a_layer_whose_own_forward_reassigns_its_buffers_gets_the_same_tensors_back():
    """A forward that assigns new tensors (``self.running_mean = ...``), even in eval mode, must not leave them
    attached after the audit: its fold analysis runs the model once (fold_plan's probe), and so does each pass."""

    class Reassigning(nn.BatchNorm1d):
        def forward(self, x):
            self.running_mean = self.running_mean * 0.5 + 1.0  # a new tensor, not an in-place write
            return super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), Reassigning(3)).eval()
    before = model[1].running_mean
    snap = _snapshot(model)
    audit(model, torch.randn(32, 4), batch_size=8)
    assert model[1].running_mean is before
    _assert_unchanged(model, snap)
    fold_plan(model, torch.randn(8, 4), force=True)
    assert model[1].running_mean is before
    _assert_unchanged(model, snap)


@dataclasses.dataclass
class _Out:
    logits: torch.Tensor
    note: str = "kept"


class _Centred(nn.Module):
    """BN, then ``h - h.mean(0)``, which couples the samples of a batch; returns a dataclass, a tensor or nothing."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.fc, self.bn = kind, nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        h = self.bn(self.fc(x))
        h = h - h.mean(0, keepdim=True)
        return {"dataclass": _Out(h), "tensor": h, "none": None}[self.kind]


@pytest.mark.parametrize("kind", ["dataclass", "tensor", "none"])
def test_outputs_in_a_dataclass_are_compared_and_outputs_without_tensors_say_so(kind):
    from bnkit.torch import fold_bn

    torch.manual_seed(0)
    model = _Centred(kind).train()
    with torch.no_grad():
        for _ in range(50):
            model(torch.randn(16, 5))
    model.eval()
    report = audit(model, [torch.randn(16, 5) for _ in range(4)])
    codes = {f.code: f for f in report.findings if f.layer == "(model)"}
    _, folded = fold_bn(model, torch.randn(16, 5))
    if kind == "none":
        assert codes["batch_coupling"].finding == "batch coupling not checked" and report.batch_coupling is None
        assert folded.max_abs_diff is None and any("holds no tensors" in n for n in folded.notes)
    else:  # the dataclass is read as the tensor is: the coupling outside BN is an error
        assert codes["batch_coupling"].severity == "error" and not report.ok and report.batch_coupling > 0.1
        assert folded.max_rel_diff < 1e-5


def test_observers_updated_by_the_passes_are_put_back():
    """A quantization observer (torch.ao's MovingAverageMinMaxObserver, as prepare_qat inserts) moves its range on
    every call, in any mode: after audit(model, data) it holds what it held before."""
    from torch.ao.quantization import MovingAverageMinMaxObserver

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), MovingAverageMinMaxObserver(), nn.Linear(4, 3))
    model.train()
    with torch.no_grad():
        for _ in range(10):
            model(torch.randn(16, 5))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    audit(model, torch.randn(64, 5) * 3, batch_size=16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class _RunningRange(nn.Module):
    """Divides by a range it moves on every call, in any mode (as a fake-quantization observer does)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        self.scale.mul_(0.5).add_(0.5 * x.abs().max())
        return x / self.scale


def test_the_eval_pass_starts_from_the_state_before_the_audit():
    """The gap compares the first batch on batch statistics with it in eval mode, both from the model as given: an
    observer left where the first pass (every batch) moved it changed the eval output. Oracle: two copies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), _RunningRange()).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].num_batches_tracked.fill_(10)
    x = torch.randn(512, 3) * 10
    on_batch, in_eval = copy.deepcopy(model), copy.deepcopy(model)
    on_batch[1].train()
    with torch.no_grad():
        a, b = on_batch(x[:64]).double(), in_eval(x[:64]).double()
    report = audit(model, x, batch_size=64)
    assert report.train_eval_gap == pytest.approx(((a - b).norm() / a.norm()).item(), rel=1e-5)


@dataclasses.dataclass
class _Batch:
    x: torch.Tensor


def test_batches_held_in_a_dataclass_are_cut_to_single_samples():
    """The batch-size-1 run slices every tensor of the batch, a dataclass's too (it ran the whole batch and
    compared it with itself): the coupling outside BN is found as with a plain tensor batch."""
    torch.manual_seed(0)
    model = _Centred("tensor").train()
    with torch.no_grad():
        for _ in range(50):
            model(torch.randn(16, 5))
    model.eval()
    data = [_Batch(torch.randn(16, 5)) for _ in range(4)]
    report = audit(model, data, forward=lambda m, b: m(b.x))
    assert not report.ok and report.batch_coupling > 0.1


@dataclasses.dataclass
class _Scaled:
    """A batch whose construction transforms its tensor (rebuilding it would scale the input again) and derives an
    attribute from it that must be cut with the batch."""

    x: torch.Tensor

    def __post_init__(self) -> None:
        self.x = self.x / 255
        self.valid = self.x.abs().sum(1) > 0
        self.view = {"owner": self}  # a reference back to itself: copied once, not followed forever


class _Pair(typing.NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def test_batches_are_copied_field_by_field_not_rebuilt():
    """A dataclass with __post_init__ (rebuilt, it was scaled twice: a false stat_shift error) and a NamedTuple
    (type(obj)(generator) raised): both audited as the same data given as plain tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).train()
    raw = [torch.rand(16, 5) * 255 for _ in range(4)]
    with torch.no_grad():
        for _ in range(20):
            for r in raw:
                model(r / 255)
    model.eval()
    plain = audit(model, [r / 255 for r in raw])
    scaled = audit(model, [_Scaled(r) for r in raw], forward=lambda m, b: m(b.x[b.valid]))
    pairs = audit(model, [_Pair(r / 255, torch.zeros(16)) for r in raw])
    for report in (scaled, pairs):
        assert report.ok == plain.ok and [s.layer for s in report.shifts] == [s.layer for s in plain.shifts]
        assert report.shifts[0].score == pytest.approx(plain.shifts[0].score, rel=1e-9)


def test_packed_sequence_batches_count_sequences_and_cut_whole_ones():
    """A GRU fed PackedSequence batches, BN on its last hidden state. A PackedSequence (a namedtuple) was taken
    for a tuple batch: its data's rows counted as samples (training batch size 18 for 8 sequences), the coupling
    check cut packed rows and reported a false 'fails at batch size 1' error, and the default forward fed the
    model its data tensor alone. Oracle: the BN inputs recomputed in float64 from the GRU's own outputs."""
    from _helpers import gru_last_state_bn
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    net = gru_last_state_bn()
    lengths = torch.tensor([5, 4, 4, 3, 2, 2, 1, 1])

    def batch(dtype=torch.float32):
        return pack_padded_sequence(torch.randn(5, 8, 4, dtype=dtype), lengths[torch.randperm(8)],
                                    enforce_sorted=False)

    with torch.no_grad():
        for _ in range(30):
            net(batch())
    net.eval()
    data = [batch(torch.float64) for _ in range(4)]  # cast to the model's float32 on the way in
    report = audit(net, data)
    assert report.ok and not report.by_code("fold") and report.batch_coupling is not None
    assert report.batch_coupling < 1e-5 and report.by_code("stat_noise")[0].data["train_batch_size"] == 8
    with torch.no_grad():
        h = torch.cat([net.rnn(p.to(torch.float32))[1][-1] for p in data]).double()
    z = (h.mean(0) - net.bn.running_mean.double()) / (net.bn.running_var.double() + net.bn.eps).sqrt()
    (shift,) = report.shifts
    assert shift.count == 32 and shift.mean_shift == pytest.approx(float(z[shift.worst_channel]), rel=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's first import: torch.jit internals
def test_a_model_compiled_in_place_runs_eagerly_in_every_pass_of_the_audit():
    """The audit saved the model's state before setting in-place compiled calls aside, so putting the state back
    between its passes bound the compiled call again for the eval pass and the batch-of-one checks (dynamo would
    recompile per call). Oracle: the module's own _compiled_call_impl, read at each forward."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    model.compile(backend="eager")
    compiled_call = model._compiled_call_impl
    seen = []

    def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        seen.append(m._compiled_call_impl)
        return m(x)

    audit(model, [torch.randn(8, 3, 6, 6) for _ in range(3)], forward=forward)
    assert len(seen) > 4 and all(call is None for call in seen), seen
    assert model._compiled_call_impl is compiled_call


def test_every_set_of_weights_is_audited_in_a_mapping_and_a_file(tmp_path):
    """A checkpoint of an encoder and a decoder, whose decoder BN was never updated: audit() checked the first set
    alone and passed (review). Oracle: the decoder's state dict audited alone."""
    trained = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    trained(torch.randn(16, 3))  # one training step: updated statistics
    decoder = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)).state_dict()
    alone = audit(decoder)
    assert [f.code for f in alone.findings if f.severity == "error"] == ["never_updated"]
    ckpt = {"encoder": trained.state_dict(), "decoder": decoder, "epoch": 3}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    for report in (audit(ckpt), audit(tmp_path / "ckpt.pt")):
        assert report.layers == ["decoder/1", "encoder/1"]
        errors = [(f.layer, f.code) for f in report.findings if f.severity == "error"]
        assert errors == [("decoder/1", "never_updated")]
    optimizer = {"state": {0: {"momentum_buffer": torch.ones(2)}}}
    assert audit({"state_dict": decoder, "optimizer": optimizer}).layers == ["1"]


def test_every_set_is_audited_whatever_holds_it(tmp_path):
    """Review of the every-set audit: a second pickled module was skipped (its temporary state dict's id reused), a
    bare BatchNorm's state dict under a key lost its layer once prefixed, a set in a list was missed, and two sets
    whose names read alike overwrote each other. Oracle: each broken set audited alone (negative_var)."""
    def conv_bn(bad: bool) -> nn.Sequential:
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        m[1].running_var.fill_(2.0)
        m[1].num_batches_tracked.fill_(50)
        if bad:
            m[1].running_var[0] = -1.0
        return m

    bare = nn.BatchNorm1d(8)
    bare.num_batches_tracked.fill_(50)
    with torch.no_grad():
        bare.running_var[0] = -1.0
    cases = {
        "modules": ({"gen": conv_bn(False), "disc": conv_bn(True)}, "disc/1"),
        "bare": ({"model": conv_bn(False).state_dict(), "head_bn": bare.state_dict()}, "head_bn"),
        "list": ({"model": conv_bn(False).state_dict(), "ensemble": [conv_bn(True).state_dict()]}, "ensemble/0/1"),
    }
    for name, (ckpt, broken) in cases.items():
        errors = [(f.layer, f.code) for f in audit(ckpt).findings if f.severity == "error"]
        assert errors == [(broken, "negative_var")], (name, errors)
    with pytest.raises(ValueError, match="two sets of weights that both give 'a/b/0.weight'"):
        audit({"a/b": conv_bn(True).state_dict(), "a": {"b": conv_bn(False).state_dict()}})


def test_a_checkpoint_that_holds_itself_or_no_state_dict_is_a_clear_error(tmp_path):
    """Through the CLI's path: a dict that holds itself (pickle keeps the cycle) gave RecursionError; a list, a tensor
    or None gave TypeError (exit 1) and a dict without tensors passed (review)."""
    from bnkit.torch.audit import checkpoint_report

    meta = {"name": "run1"}
    ckpt = {"model": nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).state_dict(), "meta": meta}
    meta["parent"] = ckpt
    assert audit(ckpt).layers == ["1"] and checkpoint_report(ckpt, "f.pt").layers == ["1"]
    for bad, match in (([ckpt["model"]], "f.pt holds a list, not a state dict"),
                       (torch.ones(3), "holds a Tensor"), (None, "holds a NoneType"),
                       ({"epoch": 3}, "f.pt contains no tensors")):
        with pytest.raises(ValueError, match=match):
            checkpoint_report(bad, "f.pt")


def test_top_level_weights_beside_another_model_and_many_sets_and_a_lone_bare_bn(tmp_path):
    """Review of the every-set audit: a student's weights at the top level beside {"teacher": sd} were skipped (its
    negative variance passed, exit 0), as were a model's beside its "ema"; 2,000 distinct tiny sets took 30 s (each
    compared with every other); a lone bare BatchNorm under a key was "(root)"; a list holding itself 20 levels
    deep took seconds. Oracle: each set audited alone."""
    def model(bad: bool) -> dict:
        m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        m[1].num_batches_tracked.fill_(50)
        with torch.no_grad():
            m[1].running_var.fill_(2.0)
            if bad:
                m[1].running_var[0] = -1.0
        return m.state_dict()

    for ckpt, broken in (({**model(True), "teacher": model(False)}, "1"),
                         ({**model(True), "ema": model(False)}, "1")):
        errors = [(f.layer, f.code) for f in audit(ckpt).findings if f.severity == "error"]
        assert errors == [(broken, "negative_var")], errors
    bare = nn.BatchNorm1d(2)
    with torch.no_grad():
        bare.running_var[0] = -1.0
    assert [f.layer for f in audit({"model": nn.Linear(3, 3).state_dict(), "norm": bare.state_dict()}).findings
            if f.code == "negative_var"] == ["norm"]
    many = {"sets": [{"running_mean": torch.randn(2), "running_var": torch.rand(2) + 0.5,
                      "num_batches_tracked": torch.tensor(100)} for _ in range(2000)]}
    many["sets"].append(dict(many["sets"][0]))  # one set saved twice: audited once
    report = audit(many)
    assert len(report.layers) == 2000 and report.layers[0] == "sets/0"
    nest: list = []
    for _ in range(20):
        nest = [nest, nest]
    assert audit({**model(False), "meta": nest}).ok


def test_equal_sets_in_other_layouts_are_one_and_odd_tensors_do_not_stop_the_audit(tmp_path):
    """The fingerprint of a set summed every tensor in float64: a channels_last copy of the same weights could sum
    differently and be audited twice, a nested tensor beside the weights crashed the audit, and each tensor's
    float64 copy undid the memory map (1.4 GB resident for a 400 MB file) (review). Oracle: torch.equal."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64))
    m(torch.randn(2, 64, 5, 5))
    sd = m.state_dict()
    last = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v.clone() for k, v in sd.items()}
    assert all(torch.equal(sd[k], last[k]) for k in sd)
    assert audit({"best": sd, "last": last}).layers == ["1"]
    lengths = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    torch.save({**sd, "lengths": lengths}, tmp_path / "nested.pt")
    assert audit(tmp_path / "nested.pt").layers == ["1"]


def test_an_observation_normalizer_beside_the_weights_one_level_down_is_named_not_audited_as_batchnorm(tmp_path):
    """An RL checkpoint, ``{"agent": {"model": sd, "obs_rms.running_mean": ..., "obs_rms.running_var": ...}}``: the
    normalizer of a constant observation (variance 0) was audited as a BatchNorm layer one level down (a tiny-variance
    warning for a layer the model lacks); at the top level it was already named in a warning instead. Oracle:
    the model's state dict audited alone, and the same checkpoint with the agent's dict at the top level."""
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net[1].num_batches_tracked.fill_(50)
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
    alone = audit(net.state_dict())
    agent = {"model": net.state_dict(), "obs_rms.running_mean": torch.tensor([0.3, 5.0]),
             "obs_rms.running_var": torch.tensor([1.2, 0.0]), "obs_rms.count": torch.tensor(1e4)}
    assert alone.ok
    torch.save({"agent": agent, "step": 10}, tmp_path / "rl.pt")
    for target, key, name in ((agent, "model", "obs_rms"), ({"agent": agent, "step": 10}, "agent/model",
                                                            "agent/obs_rms"), (tmp_path / "rl.pt", "agent/model",
                                                                               "agent/obs_rms")):
        report = audit(target)
        assert report.ok and report.layers == alone.layers == ["1"], (target, report.layers)
        (unread,) = report.by_code("unread_beside")
        assert unread.data == {"layers": [name], "beside": key}
    # a model's EMA one level down still is a set of weights: same names as the model beside it
    ema = {k: v.clone() for k, v in net.state_dict().items()}
    ema["1.running_var"][0] = float("nan")
    both = audit({"run": {"model": net.state_dict(), **{k: v for k, v in ema.items()}}})
    assert both.layers == ["run/1", "run/model/1"] and not both.ok


def test_bn_like_tensors_beside_the_weights_under_a_wrapper_key_are_named_not_dropped(tmp_path):
    """{"model": teacher, **student}: the student's BatchNorm buffers at the top level were dropped without a word,
    its negative variance unseen (review); they are still not audited (an observation normalizer sits there as
    often), but a warning names them. Oracle: the student audited alone."""
    def model(bad: bool) -> dict:
        m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
        m[1].num_batches_tracked.fill_(50)
        m[3].num_batches_tracked.fill_(50)
        with torch.no_grad():
            m[1].running_var[0] = -1.0 if bad else 1.0
        return m.state_dict()

    student = model(True)
    assert audit(student).by_code("negative_var")
    ckpt = {"model": nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).state_dict(), **student}
    torch.save(ckpt, tmp_path / "c.pt")
    for report in (audit(ckpt), audit(tmp_path / "c.pt")):
        (unread,) = report.by_code("unread_beside")
        assert unread.severity == "warning" and unread.data == {"layers": ["1", "3"], "beside": "model"}
    assert not audit({"model": student}).by_code("unread_beside")


def test_a_checkpoint_of_meta_tensors_is_refused_by_name(tmp_path):
    """A state dict saved from a model built on the meta device: the audit read its values before refusing meta
    tensors (NotImplementedError: Cannot copy out of meta tensor; review). Oracle: PyTorch, which has no values for
    a meta tensor to give."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    torch.save(model.state_dict(), tmp_path / "meta.pt")
    with pytest.raises(NotImplementedError):
        model[1].running_var.cpu()
    with pytest.raises(ValueError, match="holds meta tensors .* audit it after loading real weights"):
        audit(tmp_path / "meta.pt")


def test_a_batchnorm_that_is_the_model_itself_is_named_root_at_every_depth(tmp_path):
    """audit(nn.BatchNorm1d(3)) named the layer '' in its layers, state findings and shifts and '(root)' in its
    momentum finding; its state dict's file, '(root)' (review). Oracle: the state dict's own report."""
    bn = nn.BatchNorm1d(3)
    save_state_dict_file(bn.state_dict(), tmp_path / "bn.pt")
    assert audit(tmp_path / "bn.pt").layers == ["(root)"]
    model_report = audit(bn)
    assert model_report.layers == ["(root)"] and {f.layer for f in model_report.findings} == {"(root)"}
    bn.eval()
    set_running_stats(bn, torch.zeros(3), torch.full((3,), 2.0))
    data_report = audit(bn, torch.randn(256, 3))
    assert [s.layer for s in data_report.shifts] == ["(root)"]
    assert {f.layer for f in data_report.findings} <= {"(root)", "(model)"}
