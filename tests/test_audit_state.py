"""State-level BatchNorm checks (NumPy only) against PyTorch's own layers and closed forms."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bnkit.audit_state import (
    BNStats,
    audit_state,
    bn_stats_from_state,
    check_bn_stats,
    ema_noise_factor,
    ema_window,
    initial_weight,
    layer_stats,
)


def _trained_bn(channels=4, steps=50, seed=0, **kw):
    torch.manual_seed(seed)
    bn = nn.BatchNorm1d(channels, **kw)
    for _ in range(steps):
        bn(torch.randn(32, channels) * 2 + 3)
    return bn


def _codes(findings):
    return {f.code for f in findings}


def test_ema_window_is_where_the_latest_batches_reach_the_mass():
    for m in (0.1, 0.01, 0.5):
        n = ema_window(m)
        weights = m * (1 - m) ** np.arange(100000)  # batch k steps ago
        assert weights[: math.floor(n)].sum() < 0.95 <= weights[: math.ceil(n)].sum()
    assert ema_window(1.0) == 1.0
    # review: 0.99 gave 0.651 batches and 1.0 jumped back to 1; the latest batch alone carries 95% from 0.95 on
    momenta = [0.5, 0.9, 0.94, 0.95, 0.99, 0.999999, 1.0]
    windows = [ema_window(m) for m in momenta]
    assert windows == sorted(windows, reverse=True) and windows[3:] == [1.0] * 4 and windows[2] > 1
    with pytest.raises(ValueError):
        ema_window(0.0)


def test_ema_window_of_a_tiny_momentum_is_its_limit_not_a_division_by_zero():
    # log(1 - m) = -m (1 + m/2 + ...): n * m tends to -log(1 - mass) as m -> 0, where 1 - m rounds to 1
    for m in (1e-12, 3e-16, 1e-20):
        assert ema_window(m) * m == pytest.approx(-math.log(0.05), rel=1e-9)


def test_ema_noise_factor_matches_a_simulated_running_average():
    rng = np.random.default_rng(0)
    m = 0.1
    r, trace = 0.0, []
    for t, b in enumerate(rng.standard_normal(200000)):
        r = (1 - m) * r + m * b
        if t > 1000:
            trace.append(r)
    assert np.std(trace) == pytest.approx(ema_noise_factor(m), rel=0.03)


def test_initial_weight_is_what_pytorch_leaves_of_the_initial_buffers():
    # (None, 0) and (None, 1): nothing left before an update, and the cumulative average's first update replaces all
    for momentum, n in ((0.1, 7), (0.3, 3), (None, 4), (None, 0), (None, 1), (0.1, 0)):
        bn = nn.BatchNorm1d(1, momentum=momentum)
        for _ in range(n):
            bn(torch.full((8, 1), 5.0) + torch.tensor([[1.0], [-1.0]] * 4))  # batch mean exactly 5
        left = 1 - bn.running_mean.item() / 5.0
        assert left == pytest.approx(initial_weight(momentum, n), abs=1e-6)


def test_state_dict_layers_found_by_buffer_names():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4),
                          nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2, affine=False)))
    state = dict(model.state_dict())
    state["ema.running_mean"] = torch.zeros(5)  # not a BN layer (no running_var): e.g. an EMA normalizer's buffer
    layers = {layer.name: layer for layer in bn_stats_from_state(state)}
    assert set(layers) == {"1", "2.1"}
    assert layers["1"].weight is not None and layers["2.1"].weight is None
    assert layers["1"].num_batches_tracked == 0


def test_trained_layer_has_no_findings():
    bn = _trained_bn()
    assert audit_state(bn.state_dict()) == []


def test_a_bfloat16_state_dict_is_read_like_the_float64_values_it_holds():
    """bfloat16 checkpoints are common; NumPy has no bfloat16, so reading them must go through a float dtype
    (reported as a state no BN can hold otherwise)."""
    bn = _trained_bn().to(torch.bfloat16)
    (layer,) = bn_stats_from_state(bn.state_dict())
    assert layer.invalid == [] and audit_state(bn.state_dict()) == []
    np.testing.assert_array_equal(layer.running_var, bn.running_var.double().numpy())


def test_only_both_initial_values_mean_never_updated():
    """PyTorch's reset_running_stats sets mean 0 AND var 1; either alone is what trained statistics can be (a
    normalized input has mean 0, a whitened one variance 1), and the eval layer then is not the identity."""
    for key, value in (("running_var", 1.0), ("running_mean", 0.0)):
        bn = _trained_bn()
        getattr(bn, key).fill_(value)
        assert audit_state(bn.state_dict()) == [], key
        x = torch.randn(3, 4)
        assert not torch.allclose(bn.eval()(x), nn.BatchNorm1d(4).eval()(x))  # not the never-updated layer


def test_never_updated_statistics_are_an_error():
    findings = audit_state(nn.BatchNorm2d(8).state_dict())
    assert [f.code for f in findings] == ["never_updated"] and findings[0].severity == "error"


def test_set_by_hand_without_updates_is_a_warning():
    state = _trained_bn().state_dict()
    state["num_batches_tracked"] = torch.tensor(0)
    assert _codes(audit_state(state)) == {"never_tracked"}
    # the count load_state_dict leaves at 0 for a checkpoint without one is among the causes named
    (finding,) = audit_state(state)
    assert "checkpoint that stores no num_batches_tracked" in finding.evidence


@pytest.mark.parametrize("steps", [1, 5, 30])
def test_few_updates_reports_the_weight_left_on_the_initial_values(steps):
    """One update (0.9 of the initial values left) and 30 (0.9^30 = 0.042, still above the 1% threshold) are
    few updates as much as 5 are; 50 (0.005) are not (test_trained_layer_has_no_findings)."""
    bn = _trained_bn(steps=steps)
    (finding,) = audit_state(bn.state_dict())
    assert finding.code == "few_updates"
    assert finding.data["initial_weight"] == pytest.approx(0.9**steps)


def test_non_finite_values_name_the_array_and_count():
    state = _trained_bn().state_dict()
    state["running_var"][2] = float("nan")
    state["weight"][0] = float("inf")
    (finding,) = audit_state(state)
    assert finding.code == "non_finite" and finding.severity == "error"
    assert finding.data["non_finite"] == {"running_var": 1, "weight": 1}


def test_negative_variance_is_an_error_and_nan_after_eps():
    state = _trained_bn().state_dict()
    state["running_var"][1] = -0.5
    findings = audit_state(state)
    neg = [f for f in findings if f.code == "negative_var"]
    assert neg and neg[0].severity == "error" and neg[0].data["channels"] == [1]
    bn = _trained_bn()
    bn.load_state_dict(state)
    out = bn.eval()(torch.randn(4, 4))
    assert torch.isnan(out[:, 1]).all()  # what the error warns about


@pytest.mark.parametrize("var", [1e-9, 0.0])  # 0.0: a dead channel (a ReLU before it never fires), gain 1/sqrt(eps)
@pytest.mark.parametrize("affine", [True, False])  # affine=False: gamma is 1, not absent (and not 0)
@pytest.mark.parametrize("eps", [1e-5, 1e-3])  # a layer's own eps reaches the check
def test_tiny_variance_gain_matches_the_eval_layer(var, affine, eps):
    bn = _trained_bn(affine=affine, eps=eps)
    bn.running_var[3] = var
    (finding,) = audit_state(bn.state_dict(), eps=eps)
    assert finding.code == "tiny_var" and finding.data["channels"] == [3]
    x = torch.zeros(2, 4, dtype=torch.float64)
    x[1, 3] = 1e-3
    y = bn.double().eval()(x)
    measured_gain = (y[1, 3] - y[0, 3]).abs().item() / 1e-3
    assert measured_gain == pytest.approx(finding.data["max_gain"], rel=1e-6)


def test_zero_variance_with_zero_eps_is_an_error_like_the_layers_nan_output():
    bn = _trained_bn()
    bn.eps = 0.0
    bn.running_var[1] = 0.0
    layer = BNStats("bn", *(bn.state_dict()[k].numpy() for k in ("running_mean", "running_var", "weight", "bias")),
                    num_batches_tracked=50, eps=0.0, momentum=0.1)
    (finding,) = check_bn_stats(layer)
    assert finding.code == "zero_var" and finding.severity == "error" and finding.data["channels"] == [1]
    out = _eval_float64(layer, np.random.default_rng(0).standard_normal((4, 4)))
    assert not np.isfinite(out[:, 1]).any() and np.isfinite(out[:, [0, 2, 3]]).all()


def test_momentum_zero_does_not_call_loaded_statistics_barely_updated():
    state = _trained_bn().state_dict()
    args = (state["running_mean"].numpy(), state["running_var"].numpy(), state["weight"].numpy(), state["bias"].numpy())
    assert check_bn_stats(BNStats("bn", *args, num_batches_tracked=200, eps=1e-5, momentum=0.0)) == []
    few = check_bn_stats(BNStats("bn", *args, num_batches_tracked=5, eps=1e-5, momentum=0.1))
    assert _codes(few) == {"few_updates"}


def test_dead_gamma_channels():
    bn = _trained_bn()
    with torch.no_grad():
        bn.weight[[0, 2]] = 0.0
    (finding,) = audit_state(bn.state_dict())
    assert finding.code == "dead_gamma" and finding.data["channels"] == [0, 2] and not finding.data["all"]


def test_inconsistent_shapes():
    layer = BNStats("bn", np.zeros(3), np.ones(4), weight=np.ones(3))
    (finding,) = check_bn_stats(layer)
    assert finding.code == "bad_shape" and finding.severity == "error" and "inconsistent" in finding.finding
    # equal shapes that are not one value per channel (torch's buffers are 1-D: (num_features,)): not "inconsistent"
    assert nn.BatchNorm1d(3).running_mean.ndim == 1
    (finding,) = check_bn_stats(BNStats("bn", np.zeros((2, 3)), np.ones((2, 3))))
    assert finding.code == "bad_shape" and finding.finding == "BN arrays are not one value per channel"


def test_a_linear_that_keeps_running_statistics_of_its_input_is_checked_on_them_not_called_inconsistent():
    """A Linear standardizing its input with running_mean/var (8,) beside its weight (4, 8) and bias (4,) got an
    error, 'BN arrays have inconsistent shapes', from the state dict alone and with the model, though it runs fine
    (the oracle: its own eval forward). A BN's 1-D weight of the wrong length still is one."""
    from bnkit.torch import audit

    class NormalizedLinear(nn.Linear):
        def __init__(self, width, bias=True):
            super().__init__(8, width, bias=bias)
            self.register_buffer("running_mean", torch.randn(8))
            self.register_buffer("running_var", torch.rand(8) + 0.5)

        def forward(self, x):
            return super().forward((x - self.running_mean) / (self.running_var + 1e-5).sqrt())

    for width, bias in ((4, True), (1, True), (8, True), (1, False)):  # Linear(8, 1): its (1, 8) weight holds 8 too
        model = nn.Sequential(NormalizedLinear(width, bias), nn.BatchNorm1d(width)).eval()
        model[1].num_batches_tracked.fill_(100)
        model[1].running_mean.normal_()
        assert torch.isfinite(model(torch.randn(2, 8))).all()
        for report in (audit(model.state_dict()), audit(model)):
            assert report.ok and not report.by_code("bad_shape"), report.findings
    class NormalizedDepthwise(nn.Conv2d):  # weight (4, 1, 1, 1): as a state dict, a BN's in the wrong shape too
        def __init__(self):
            super().__init__(4, 4, 1, groups=4)
            self.register_buffer("running_mean", torch.randn(4))
            self.register_buffer("running_var", torch.rand(4) + 0.5)

    bn = nn.BatchNorm1d(4).eval()  # a layer known to be a BatchNorm: its weight is its gamma, whatever its shape
    bn.bias = None
    bn.weight.data = torch.full((4, 1), float("nan"))
    assert [f.code for f in audit(nn.Sequential(bn)).findings if f.severity == "error"][:1] == ["bad_shape"]
    depthwise = nn.Sequential(NormalizedDepthwise()).eval()
    assert audit(depthwise).ok, audit(depthwise).findings  # the model says what it is: no BatchNorm

    from bnkit.audit_state import layer_stats

    for weight in (np.ones(4), np.ones((3, 1)), np.ones((1, 3)), np.ones((1, 3, 1))):  # a BN's in the wrong shape
        findings = check_bn_stats(layer_stats("bn", {"running_mean": np.zeros(3), "running_var": np.ones(3),
                                                     "weight": weight, "bias": np.array([0.0, np.nan, 0.0])}))
        assert [f.code for f in findings] == ["bad_shape"], weight.shape
    with pytest.raises(RuntimeError, match="size mismatch"):
        nn.BatchNorm1d(3).load_state_dict({**nn.BatchNorm1d(3).state_dict(), "weight": torch.ones(3, 1)})


def _layer_with_eps(bn, eps):
    state = bn.state_dict()
    return BNStats("bn", *(state[k].numpy() for k in ("running_mean", "running_var", "weight", "bias")),
                   num_batches_tracked=50, eps=eps, momentum=0.1)


def _eval_float64(layer, x):
    """The inference formula in float64 NumPy (PyTorch refuses a negative eps; ONNX runtimes compute it:
    tests/onnx/test_onnx_audit.py checks the same findings against onnxruntime)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return layer.weight * (x - layer.running_mean) / np.sqrt(layer.running_var + layer.eps) + layer.bias


def test_negative_eps_that_reaches_a_variance_is_an_error_naming_the_nan_channels():
    bn = _trained_bn()
    bn.running_var[2] = 0.25
    layer = _layer_with_eps(bn, -0.5)  # var + eps < 0 in channel 2 only (the others' variances are near 4)
    (finding,) = check_bn_stats(layer)
    assert finding.code == "nonpositive_var_eps" and finding.severity == "error" and finding.data["channels"] == [2]
    out = _eval_float64(layer, np.random.default_rng(0).standard_normal((4, 4)))
    assert np.flatnonzero(np.isnan(out).any(axis=0)).tolist() == finding.data["channels"]


def test_zero_eps_with_positive_variances_is_no_finding():
    """eps=0 is legal in ONNX and in torch 2.13 (torch 2.11's F.batch_norm refuses it); the eval layer is finite."""
    bn = _trained_bn()
    layer = _layer_with_eps(bn, 0.0)
    assert check_bn_stats(layer) == []
    assert np.isfinite(_eval_float64(layer, np.random.default_rng(0).standard_normal((4, 4)))).all()


def test_negative_eps_below_every_variance_is_a_warning():
    bn = _trained_bn()
    layer = _layer_with_eps(bn, -0.5)
    (finding,) = check_bn_stats(layer)
    assert finding.code == "negative_eps" and finding.severity == "warning"
    x = np.zeros((2, 4))
    x[1] = 1e-3
    gain = np.abs(np.diff(_eval_float64(layer, x), axis=0)[0]) / 1e-3
    assert np.isfinite(gain).all() and (gain > np.abs(layer.weight) / np.sqrt(layer.running_var)).all()  # inflated


@pytest.mark.parametrize("eps, outputs", [(math.nan, "NaN"), (-math.inf, "NaN"), (math.inf, "beta")])
def test_non_finite_eps_is_an_error_naming_what_the_layer_outputs(eps, outputs):
    layer = _layer_with_eps(_trained_bn(), eps)
    (finding,) = check_bn_stats(layer)
    assert finding.code == "bad_eps" and finding.severity == "error" and finding.evidence.endswith(
        "NaN" if outputs == "NaN" else "beta (the input is divided by infinity)")
    out = _eval_float64(layer, np.random.default_rng(0).standard_normal((4, 4)))
    if outputs == "NaN":
        assert np.isnan(out).all()
    else:
        assert np.array_equal(out, np.broadcast_to(layer.bias, (4, 4)))


@pytest.mark.parametrize("key, value, says", [
    ("running_var", torch.ones(4, dtype=torch.complex64), "running_var: expected real numbers, got torch.complex64"),
    ("weight", np.ones(4, dtype=np.complex128), "weight: expected real numbers, got complex128"),
    ("num_batches_tracked", torch.tensor(-3), "(a count of updates), got -3"),
    ("num_batches_tracked", torch.tensor(2.5), "(a count of updates), got 2.5"),
    ("num_batches_tracked", torch.tensor(math.nan), "(a count of updates), got nan"),
    ("num_batches_tracked", torch.tensor([3, 4]), "(a count of updates), got 2 values [3, 4]"),
    ("num_batches_tracked", torch.ones(1, dtype=torch.complex64), "(a count of updates), got (1+0j)"),
    ("num_batches_tracked", "5", "(a count of updates), got '5'"),
])
def test_state_no_layer_can_hold_is_one_error_and_nothing_is_converted(key, value, says):
    """A float64 copy of a complex array keeps its real part, int() rounds 2.5 to 2: neither may pass unnoticed."""
    state = _trained_bn().state_dict()
    state[key] = value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's and NumPy's "discards the imaginary part" warnings fail the test
        (finding,) = audit_state(state)
    assert finding.code == "invalid_state" and finding.severity == "error" and says in finding.evidence
    if key != "num_batches_tracked":  # PyTorch's own layer cannot hold it either
        bn = _trained_bn()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bn.load_state_dict({**bn.state_dict(), key: torch.as_tensor(value) + 1j})
        assert not getattr(bn, key).is_complex()  # the imaginary part is gone: what the audit refuses to do


def test_a_valid_count_in_any_real_dtype_or_shape_one_is_read_exactly():
    state = _trained_bn().state_dict()
    for value in (torch.tensor(7.0), torch.tensor([7]), np.int32(7), 7):
        state["num_batches_tracked"] = value
        (layer,) = bn_stats_from_state(state)
        assert layer.invalid == [] and layer.num_batches_tracked == 7 and type(layer.num_batches_tracked) is int


def test_nan_in_some_channels_leaves_the_others_checked():
    """A NaN mean in channel 0 used to hide every other finding of the layer: a negative variance (channel 1), a
    variance below eps (channel 2, gain 1/sqrt(1e-9 + 1e-5) = 316 closed form) and a dead gamma (channel 3)."""
    state = _trained_bn().state_dict()
    state["running_mean"][0] = float("nan")
    state["running_var"][1], state["running_var"][2] = -0.5, 1e-9
    state["weight"][3] = 0.0
    findings = audit_state(state)
    assert [f.code for f in findings] == ["non_finite", "negative_var", "tiny_var", "dead_gamma"]
    assert findings[0].data["non_finite"] == {"running_mean": 1}
    assert findings[1].data == {"channels": [1], "min_var": -0.5}
    gamma = abs(float(state["weight"][2]))
    assert findings[2].data["channels"] == [2]
    assert findings[2].data["max_gain"] == pytest.approx(gamma / math.sqrt(1e-9 + 1e-5), rel=1e-6)
    assert findings[3].data["channels"] == [3]


def test_a_tiny_variance_with_eps_zero_is_warned_by_its_unbounded_gain():
    """eps 0: a variance of 1e-8 gives the channel a gain of 1e4 (closed form |gamma|/sqrt(var)), which eps > 0
    would have bounded; before, only exactly zero variance was reported with eps 0."""
    bn = _trained_bn()
    bn.running_var[2] = 1e-8
    layer = BNStats("bn", *(bn.state_dict()[k].numpy().astype(np.float64)
                            for k in ("running_mean", "running_var", "weight", "bias")),
                    num_batches_tracked=50, eps=0.0, momentum=0.1)
    (finding,) = check_bn_stats(layer)
    assert finding.code == "tiny_var" and finding.data["channels"] == [2]
    assert finding.finding == "variance below 1e-5 with eps <= 0: nothing bounds the channel's gain"
    assert "running_var 1e-08 < 1e-05 (eps 0 bounds nothing); |gamma|/sqrt(var + eps) up to" in finding.evidence
    assert finding.data["max_gain"] == pytest.approx(abs(bn.weight.detach()[2].item()) / 1e-4, rel=1e-6)


def test_a_variance_below_eps_in_a_dead_channel_is_no_amplification():
    """gamma 0 and variance 0: the gain is 0, so tiny_var (which says the channel amplifies) is not raised; the
    dead channel is reported as such."""
    state = _trained_bn().state_dict()
    state["weight"][0], state["running_var"][0] = 0.0, 0.0
    assert [f.code for f in audit_state(state)] == ["dead_gamma"]


def test_a_non_finite_channel_is_left_out_of_the_other_checks_and_float16_gains_do_not_overflow():
    """An inf gamma with a tiny variance, a -inf variance: reported as non-finite only, not again as an inf gain
    or a -inf minimum; a float16 layer's gain 1000/sqrt(1e-5) = 3.16e5 (closed form) is computed in float64."""
    layer = BNStats("bn", np.zeros(3), np.array([1e-8, 1e-8, 1.0]), np.array([np.inf, 1.0, 1.0]), np.zeros(3),
                    num_batches_tracked=50, eps=1e-5, momentum=0.1)
    codes = [(f.code, f.data.get("channels")) for f in check_bn_stats(layer)]
    assert codes == [("non_finite", None), ("tiny_var", [1])]
    layer = BNStats("bn", np.zeros(2), np.array([-np.inf, -1.0]), None, None, num_batches_tracked=50, eps=1e-5,
                    momentum=0.1)
    negative = [f for f in check_bn_stats(layer) if f.code == "negative_var"]
    assert negative[0].data == {"channels": [1], "min_var": -1.0}
    half = BNStats("bn", np.zeros(2, np.float16), np.array([0.0, 1.0], np.float16), np.array([1000, 1], np.float16),
                   np.zeros(2, np.float16), num_batches_tracked=50, eps=1e-5, momentum=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (tiny,) = [f for f in check_bn_stats(half) if f.code == "tiny_var"]
    assert tiny.data["max_gain"] == pytest.approx(float(np.float16(1000)) / math.sqrt(1e-5), rel=1e-6)


def test_a_tiny_variance_with_a_negative_eps_names_that_eps():
    layer = BNStats("bn", np.zeros(2), np.array([1e-6, 1.0]), np.ones(2), np.zeros(2), num_batches_tracked=50,
                    eps=-1e-7, momentum=0.1)
    (tiny,) = [f for f in check_bn_stats(layer) if f.code == "tiny_var"]
    assert "(eps -1e-07 bounds nothing)" in tiny.evidence and "eps 0" not in tiny.evidence
    assert tiny.data["max_gain"] == pytest.approx(1 / math.sqrt(1e-6 - 1e-7), rel=1e-9)


def test_a_channel_with_nan_at_one_position_is_left_out_at_all_its_positions():
    """ONNX opset 7-8 spatial=0 statistics: one (channel, position) entry each. Channel 0's NaN mean at position 0
    reports the channel as non-finite; its tiny variance at position 1 is not reported again as a gain."""
    layer = BNStats("bn", np.array([np.nan, 0.0, 0.0, 0.0]), np.array([1.0, 1e-9, 1.0, 1.0]), np.ones(4),
                    np.zeros(4), eps=1e-5, momentum=None, positions=2)
    assert [f.code for f in check_bn_stats(layer)] == ["non_finite"]
    layer.running_mean[0] = 0.0
    (tiny,) = check_bn_stats(layer)
    assert tiny.code == "tiny_var" and tiny.data["channels"] == [0]


def test_a_gain_beyond_float64_is_an_error_and_says_so_without_a_runtime_warning():
    """gamma 1e308 over sqrt(0 + 1e-5): the gain overflows float64, so any input change gives inf outputs; it was a
    warning (ok) with an overflow RuntimeWarning on stderr (review). Oracle: the closed form overflows to inf."""
    with np.errstate(over="ignore"):
        assert np.isinf(np.float64(1e308) * 0.5 / np.sqrt(1e-5))
    layer = layer_stats("bn", {"running_mean": np.zeros(2), "running_var": np.array([0.0, 1.0]),
                               "weight": np.array([1e308, 1.0]), "bias": np.zeros(2),
                               "num_batches_tracked": np.array(5)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        findings = check_bn_stats(layer)
    (tiny,) = [f for f in findings if f.code == "tiny_var"]
    assert tiny.severity == "error" and "beyond float64's range (inf outputs)" in tiny.evidence


def test_a_quantized_buffer_is_an_invalid_state_not_a_crash():
    """A quantized running_var crashed the audit with RuntimeError out of .double() (exit 1, a traceback), where a
    complex one is an invalid_state finding (review)."""
    var = torch.quantize_per_tensor(torch.rand(4) + 0.5, 0.1, 0, torch.quint8)
    stats = bn_stats_from_state({"bn.running_mean": torch.zeros(4), "bn.running_var": var})
    findings = [f for layer in stats for f in check_bn_stats(layer)]
    assert [f.code for f in findings if f.severity == "error"] == ["invalid_state"], findings
    assert "quint8" in next(f.evidence for f in findings if f.code == "invalid_state")


@pytest.mark.parametrize("dtype", ["float4_e2m1fn_x2", "bits8", "bits16"])
def test_a_buffer_torch_cannot_convert_is_an_invalid_state_not_a_crash(dtype):
    """A float4 (or bits8/bits16) running_var raised NotImplementedError/RuntimeError out of .double(): a traceback
    from bnkit audit (exit 1, read as 'error findings'). Oracle: PyTorch's own cast fails on it."""
    dtype = getattr(torch, dtype, None)
    if dtype is None:
        pytest.skip("this torch has no such dtype")
    var = torch.full((4 * dtype.itemsize,), 0x22, dtype=torch.uint8).view(dtype)
    with pytest.raises((RuntimeError, NotImplementedError)):
        var.double()
    stats = bn_stats_from_state({"bn.running_mean": torch.zeros(var.shape[0]), "bn.running_var": var})
    findings = [f for layer in stats for f in check_bn_stats(layer)]
    assert [f.code for f in findings if f.severity == "error"] == ["invalid_state"], findings
    assert str(dtype) in next(f.evidence for f in findings if f.code == "invalid_state")


@pytest.mark.parametrize("layout", ["nested", "sparse"])
def test_a_buffer_with_no_array_of_values_is_invalid_state_not_a_crash(layout):
    """A nested or sparse tensor as a BN buffer in a checkpoint: reading it as an array raised PyTorch's
    RuntimeError ('NestedTensorImpl doesn't support sizes') out of the audit (review). Oracle: PyTorch's own
    BatchNorm, which cannot run on such a buffer either."""
    sd = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).state_dict()
    sd["1.num_batches_tracked"].fill_(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the nested API's prototype warning
        odd = (torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]) if layout == "nested"
               else torch.ones(3).to_sparse())
    sd["1.running_var"] = odd
    bn = nn.BatchNorm1d(3).eval()
    bn.running_var = odd
    with pytest.raises((RuntimeError, NotImplementedError)):
        bn(torch.ones(2, 3))
    (finding,) = [f for f in audit_state(sd) if f.severity == "error"]
    assert finding.code == "invalid_state" and "running_var: expected real numbers, got" in finding.evidence
    assert ("nested" if layout == "nested" else "sparse_coo") in finding.evidence


@pytest.mark.parametrize("state", ["never.onnx", b"never.onnx", __import__("pathlib").Path("m.pt"), [("a", 1)]])
def test_a_path_or_other_non_mapping_is_a_type_error_not_a_clean_audit(state):
    """Review: a file's path given as a string was read character by character and reported clean ([]), while the
    same file given to bnkit.onnx.audit has errors. Oracle: the documented input, a mapping."""
    with pytest.raises(TypeError, match="a flat state dict .* is needed, got .*bnkit.torch.audit"):
        audit_state(state)
