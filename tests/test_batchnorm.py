"""The NumPy reference layer against torch.nn.BatchNorm*d and the other frameworks' real layers."""
import contextlib
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnkit.batchnorm
from bnkit import BatchNorm

TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def _pair(shape, eps, momentum, affine, track, rng):
    c = shape[1]
    ref = BatchNorm(c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    tbn = TORCH_BN[len(shape)](c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    if affine:
        ref.weight, ref.bias = rng.normal(1, 0.5, c), rng.normal(0, 0.5, c)
        with torch.no_grad():
            tbn.weight.copy_(torch.tensor(ref.weight))
            tbn.bias.copy_(torch.tensor(ref.bias))
    return ref, tbn


def _step(ref, tbn, x, dy):
    xt = torch.tensor(x, requires_grad=True)
    yt = tbn(xt)
    yt.backward(torch.tensor(dy))
    y = ref(x)
    dx = ref.backward(dy)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-3, atol=1e-4)
    if ref.affine:
        np.testing.assert_allclose(ref.grad_weight, tbn.weight.grad.numpy(), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(ref.grad_bias, tbn.bias.grad.numpy(), rtol=1e-3, atol=1e-3)
        tbn.weight.grad = tbn.bias.grad = None


@settings(max_examples=40, deadline=None)
@given(
    ndim=st.sampled_from([2, 3, 4, 5]),
    n=st.integers(2, 6),
    c=st.integers(1, 5),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    momentum=st.sampled_from([0.1, 0.5, 1.0, 0.0, None]),
    affine=st.booleans(),
    track=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_matches_torch_train_then_eval(ndim, n, c, eps, momentum, affine, track, seed):
    rng = np.random.default_rng(seed)
    shape = (n, c) + tuple(rng.integers(1, 4, size=ndim - 2))
    ref, tbn = _pair(shape, eps, momentum, affine, track, rng)
    for _ in range(3):
        x = rng.normal(1.5, 2.0, size=shape).astype(np.float32)
        _step(ref, tbn, x, rng.normal(size=shape).astype(np.float32))
    if track:
        np.testing.assert_allclose(ref.running_mean, tbn.running_mean.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ref.running_var, tbn.running_var.numpy(), rtol=1e-5, atol=1e-5)
        assert ref.num_batches_tracked == int(tbn.num_batches_tracked) == 3
    ref.eval()
    tbn.eval()
    x = rng.normal(size=shape).astype(np.float32)
    _step(ref, tbn, x, rng.normal(size=shape).astype(np.float32))


def test_channels_last_axis_matches_channels_first():
    rng = np.random.default_rng(3)
    first, last = BatchNorm(4), BatchNorm(4, axis=-1)
    for _ in range(2):
        x = rng.normal(size=(5, 4, 3, 2))
        y1 = first(x)
        y2 = last(np.moveaxis(x, 1, -1))
        np.testing.assert_allclose(np.moveaxis(y2, -1, 1), y1, rtol=1e-12)
        dy = rng.normal(size=x.shape)
        np.testing.assert_allclose(np.moveaxis(last.backward(np.moveaxis(dy, 1, -1)), -1, 1), first.backward(dy), rtol=1e-10)
    np.testing.assert_allclose(first.running_var, last.running_var)


@pytest.mark.parametrize("layout", ["NLC as NCL", "NHWC as NCHW"])
def test_transposed_views_match_torch_in_train_and_eval(layout):
    """An NHWC array viewed as NCHW (``transpose``): the output was written into a reshape's copy and returned
    unfilled. Oracle: torch's BatchNorm in float64 on the same values."""
    rng = np.random.default_rng(7)
    stored = rng.normal(2.0, 3.0, size=(6, 5, 4) if layout == "NLC as NCL" else (6, 3, 5, 4))
    x = stored.transpose(0, 2, 1) if layout == "NLC as NCL" else stored.transpose(0, 3, 1, 2)
    assert not x.flags.c_contiguous and not x.flags.f_contiguous
    ref = BatchNorm(4)
    tbn = (torch.nn.BatchNorm1d if x.ndim == 3 else torch.nn.BatchNorm2d)(4).double()
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 2.0)
        tbn.bias.normal_()
    ref.weight, ref.bias = tbn.weight.detach().numpy().copy(), tbn.bias.detach().numpy().copy()
    for training in (True, False):
        ref.train(training)
        tbn.train(training)
        want = tbn(torch.from_numpy(np.ascontiguousarray(x))).detach().numpy()
        np.testing.assert_allclose(ref(x), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ref.running_var, tbn.running_var.numpy(), rtol=1e-12)


def test_a_float32_view_of_channels_last_data_is_as_accurate_as_a_contiguous_copy():
    """NumPy sums pairwise only along a contiguous axis: an (N, C, L) view of (N, L, C) float32 data had its
    channel sums added one value after another, the running mean 1.6e-3 off at L = 2^20 (a copy: 2e-6). Oracle:
    float64 NumPy statistics of the same float32 values."""
    rng = np.random.default_rng(0)
    stored = (rng.standard_normal((1, 2**20, 2)) + 100.0).astype(np.float32)
    x = stored.swapaxes(1, 2)
    assert x.strides[2] != x.itemsize  # premise: the channel's values are at a stride
    want = x.astype(np.float64).mean(axis=(0, 2))
    for data in (x, np.ascontiguousarray(x)):
        bn = BatchNorm(2, momentum=1.0)
        bn(data)
        assert np.abs(bn.running_mean - want).max() < 1e-5, np.abs(bn.running_mean - want).max()


@pytest.mark.parametrize("kwargs, match", [({"axis": 1.9}, r"axis must be an integer, got 1\.9"),
                                           ({"axis": True}, "axis must be an integer, got True"),
                                           ({"num_features": True}, "num_features must be an integer, got True"),
                                           ({"num_features": 3.0}, r"num_features must be an integer, got 3\.0"),
                                           ({"eps": True}, "eps must be a real number, got True"),
                                           ({"eps": "1e-3"}, "eps must be a real number, got '1e-3'"),
                                           ({"momentum": "0.1"}, "momentum must be a real number, got '0.1'")])
def test_arguments_that_are_not_numbers_of_their_kind_are_refused_not_coerced(kwargs, match):
    """axis=1.9 became 1, num_features=True a layer of one channel, eps=True 1.0; PyTorch's nn.BatchNorm refuses
    a float size, and convert_state an axis of 1.9."""
    with pytest.raises(ValueError, match=match):
        BatchNorm(**{"num_features": 3, **kwargs})
    assert BatchNorm(np.int64(3), eps=np.float32(1e-3), axis=np.int64(-1)).axis == -1
    # what converts exactly is taken, as PyTorch takes nn.BatchNorm1d(np.array(3)) and eps=torch.tensor(1e-5)
    from decimal import Decimal

    bn = BatchNorm(np.array(3), eps=Decimal("1e-5"), momentum=torch.tensor(0.5, dtype=torch.float64))
    assert (bn.num_features, bn.eps, bn.momentum) == (3, 1e-5, 0.5)


def test_state_holding_strings_or_none_is_refused_and_changes_nothing():
    """load_state_dict parsed numeric strings and took None as NaN."""
    bn = BatchNorm(3)
    for bad in (np.array(["1", "2", "3"]), np.array([None, 1.0, 2.0], dtype=object)):
        with pytest.raises(TypeError, match="running_mean must hold real numbers"):
            bn.load_state_dict({"running_mean": bad}, strict=False)
    assert (bn.running_mean == 0).all()


@pytest.mark.parametrize("bad, match", [(np.array([["1", "2"], ["3", "4"]]), "got dtype <U1"),
                                        (np.array([[1.0, None], [3.0, 4.0]], dtype=object), "got None")])
def test_an_input_of_strings_or_none_is_refused_and_changes_nothing(bad, match):
    """Numeric strings were parsed and updated the running statistics (torch refuses them); None was called NaN."""
    bn = BatchNorm(2)
    with pytest.raises(TypeError, match=f"BatchNorm's input must hold real numbers, {match}"):
        bn(bad)
    assert bn.num_batches_tracked == 0 and (bn.running_mean == 0).all() and (bn.running_var == 1).all()
    np.testing.assert_array_equal(bn(np.array([[1, 2], [3, 4]], dtype=object)), bn.train()(np.array([[1.0, 2], [3, 4]])))


def test_backward_after_a_refused_forward_raises_instead_of_answering_for_the_batch_before():
    """The cache of the last good batch outlived a refused forward: backward() returned that batch's gradient."""
    bn = BatchNorm(3)
    rng = np.random.default_rng(1)
    bn(rng.normal(size=(4, 3)))
    bad = rng.normal(size=(4, 3))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        bn(bad)
    with pytest.raises(RuntimeError, match="needs a forward"):
        bn.backward(np.ones((4, 3)))


def test_eval_is_deterministic_updates_nothing_and_uses_gamma_beta_identically():
    rng = np.random.default_rng(4)
    bn = BatchNorm(3)
    bn.weight, bn.bias = np.array([2.0, 0.5, -1.0]), np.array([0.1, 0.2, 0.3])
    bn(rng.normal(3, 2, size=(64, 3)))
    bn.eval()
    before = bn.state_dict()
    x = rng.normal(size=(7, 3))
    y1, y2 = bn(x), bn(x)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(bn(x[:1])[0], y1[0])  # batch size does not matter in eval
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    xhat = (x - bn.running_mean) / np.sqrt(bn.running_var + bn.eps)
    np.testing.assert_allclose(y1, bn.weight * xhat + bn.bias)
    bn.train()
    xb = rng.normal(size=(16, 3))
    xhat_b = (xb - xb.mean(0)) / np.sqrt(xb.var(0) + bn.eps)
    np.testing.assert_allclose(bn(xb), bn.weight * xhat_b + bn.bias)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_follows_statistics_and_parameters_changed_in_place_between_calls(dtype):
    """Eval reuses its expanded scale/shift rows only while they are unchanged."""
    rng = np.random.default_rng(5)
    bn = BatchNorm(4).eval()
    x = rng.normal(2, 3, size=(3, 4, 5, 6)).astype(dtype)

    def expected():
        xhat = (x - bn.running_mean[:, None, None]) / np.sqrt(bn.running_var[:, None, None] + bn.eps)
        return bn.weight[:, None, None] * xhat + bn.bias[:, None, None]

    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(bn(x), expected(), rtol=tol, atol=tol)
    for change in (lambda: bn.running_mean.__setitem__(1, 0.7), lambda: bn.running_var.__imul__(2.0),
                   lambda: bn.weight.__setitem__(3, -1.5), lambda: bn.bias.__iadd__(0.25)):
        change()  # in place: the arrays keep their identity
        np.testing.assert_allclose(bn(x), expected(), rtol=tol, atol=tol)
    np.testing.assert_allclose(bn(x[:, :, :2, :3]), expected()[:, :, :2, :3], rtol=tol, atol=tol)  # another size


def test_state_dict_round_trip_with_torch():
    rng = np.random.default_rng(5)
    tbn = torch.nn.BatchNorm2d(3)
    tbn(torch.randn(4, 3, 2, 2) * 3 + 1)
    with torch.no_grad():
        tbn.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
    ref = BatchNorm(3)
    ref.load_state_dict(tbn.state_dict())
    assert ref.num_batches_tracked == 1
    back = torch.nn.BatchNorm2d(3)
    back.load_state_dict({k: torch.as_tensor(v, dtype=tbn.state_dict()[k].dtype) for k, v in ref.state_dict().items()})
    for k, v in tbn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = rng.normal(size=(2, 3, 2, 2)).astype(np.float32)
    tbn.eval()
    np.testing.assert_allclose(ref.eval()(x), tbn(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_state_dict_of_a_low_or_high_precision_torch_layer_loads(dtype):
    tbn = torch.nn.BatchNorm1d(3).to(dtype)
    tbn(torch.randn(8, 3, dtype=dtype) * 2 + 1)
    ref = BatchNorm(3)
    ref.load_state_dict(tbn.state_dict())
    for k in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(ref.state_dict()[k], getattr(tbn, k).detach().double().numpy())
    assert ref.num_batches_tracked == 1


def test_load_state_dict_checks_before_changing_anything():
    ref = BatchNorm(3)
    good = {"weight": np.full(3, 7.0), "bias": np.full(3, 2.0), "running_mean": np.full(3, 5.0),
            "running_var": np.full(3, 3.0), "num_batches_tracked": np.array(4)}
    for key, bad in [("running_var", np.ones(4)), ("num_batches_tracked", np.array(-1)),
                     ("running_mean", np.ones(3) * 1j)]:  # each a later key than the valid weight and bias
        with pytest.raises((ValueError, TypeError), match="shape|non-negative integer|must be real"):
            ref.load_state_dict({**good, key: bad})
        np.testing.assert_array_equal(ref.weight, np.ones(3))
        np.testing.assert_array_equal(ref.bias, np.zeros(3))
        np.testing.assert_array_equal(ref.running_mean, np.zeros(3))
        assert ref.num_batches_tracked == 0
    with pytest.raises(KeyError, match="missing"):
        ref.load_state_dict({"weight": np.ones(3)})


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)])
def test_batch_of_one_value_per_channel_in_training_is_refused(shape):
    bn = BatchNorm(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(np.ones(shape))
    assert bn.num_batches_tracked == 0
    bn.eval()
    assert bn(np.ones(shape)).shape == shape  # fine at inference


def test_batch_of_one_without_running_statistics_is_refused_in_eval_mode_without_advising_eval():
    """Such a layer normalizes with batch statistics in both modes (as torch's does: it raises at batch 1 in eval):
    .eval() is no fix, running statistics are."""
    bn = BatchNorm(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="without running statistics") as info:
        bn(np.ones((1, 3)))
    assert ".eval()" not in str(info.value) and "track_running_stats=True" in str(info.value)
    with pytest.raises(ValueError):
        torch.nn.BatchNorm1d(3, track_running_stats=False).eval()(torch.ones(1, 3))


def test_single_sample_with_spatial_extent_is_allowed_like_torch():
    bn, tbn = BatchNorm(2), torch.nn.BatchNorm2d(2)
    x = np.random.default_rng(0).normal(size=(1, 2, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(bn(x), tbn(torch.tensor(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_training_batch_leaves_running_stats_untouched(bad):
    bn = BatchNorm(2)
    bn(np.random.default_rng(0).normal(size=(8, 2)))
    before = bn.state_dict()
    x = np.ones((4, 2))
    x[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        bn(x)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_wrong_channels_and_bad_hyperparameters():
    with pytest.raises(ValueError, match="expected 3 channels"):
        BatchNorm(3)(np.ones((4, 2)))
    with pytest.raises(ValueError, match="expected 3 channels on axis -1"):
        BatchNorm(3, axis=-1)(np.ones((4, 3, 2)))
    with pytest.raises(ValueError, match="2-D to 5-D"):
        BatchNorm(3)(np.ones(3))
    for eps in (-1e-5, np.inf, np.nan):  # eps=inf would silently make every output 0 (beta)
        with pytest.raises(ValueError, match="eps"):
            BatchNorm(3, eps=eps)
    # out-of-range axes must not wrap around (-5 % 4 == 3 has the right size here), and axis 0 is the batch axis
    for axis, shape in ((-5, (2, 3, 4, 4)), (4, (2, 3, 4, 4)), (0, (4, 3)), (-4, (4, 3, 2, 2))):
        with pytest.raises(ValueError, match="channel axis"):
            BatchNorm(shape[axis % len(shape)], axis=axis)(np.ones(shape))
    for m in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            BatchNorm(3, momentum=m)
    with pytest.raises(ValueError, match="cumulative"):
        BatchNorm(3, momentum=None, convention="keras")
    with pytest.raises(RuntimeError, match="forward"):
        BatchNorm(3).backward(np.ones((2, 3)))


@pytest.mark.parametrize("shape,mean,std", [((4, 2, 32, 32), 100.0, 1.0), ((2, 2, 256, 256), 0.0, 1.0),
                                             ((2, 2, 16, 16), 0.0, 300.0)])
def test_float16_channel_sums_do_not_overflow(shape, mean, std):
    """Row sums above float16's 65504 (large offsets, long rows, wide spreads) against float64 statistics."""
    x = (np.random.default_rng(0).normal(mean, std, size=shape)).astype(np.float16)
    bn = BatchNorm(2)
    y = bn(x)
    x64 = x.astype(np.float64)
    dims = (0, 2, 3)
    var = x64.var(dims)
    n = x64.size // 2
    np.testing.assert_allclose(bn.running_mean, 0.1 * x64.mean(dims), rtol=1e-3)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * var * n / (n - 1), rtol=1e-3)
    want = (x64 - x64.mean(dims, keepdims=True)) / np.sqrt(var.reshape(1, 2, 1, 1) + bn.eps)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), want, atol=1e-2)


def test_float16_forward_and_backward_match_float64_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, size=(8, 4, 5, 5)).astype(np.float16)
    dy = rng.normal(size=x.shape).astype(np.float16)
    bn = BatchNorm(4)
    y = bn(x)
    dx = bn.backward(dy)
    tbn = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    yt = tbn(xt)
    yt.backward(torch.from_numpy(dy.astype(np.float64)))
    assert y.dtype == dx.dtype == np.float16
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=3e-3)  # float16 resolution near 2-4
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=3e-3)
    np.testing.assert_allclose(bn.grad_weight, tbn.weight.grad.numpy(), rtol=1e-3, atol=1e-2)


def test_empty_batch_raises_the_batch_statistics_error_in_training_and_passes_through_in_eval():
    bn = BatchNorm(3)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(0 values per channel\)\. An empty batch"):
        bn(np.zeros((0, 3)))
    assert bn.num_batches_tracked == 0
    for shape, axis in [((0, 3), 1), ((0, 3, 4, 4), 1), ((0, 4, 3), -1)]:
        out = BatchNorm(3, axis=axis).eval()(np.zeros(shape, dtype=np.float32))
        assert out.shape == shape and out.dtype == np.float32


@pytest.mark.parametrize("training", [True, False])
def test_backward_uses_the_forwards_gamma_and_running_mean_even_if_changed_in_place(training):
    rng = np.random.default_rng(1)
    x, dy = rng.normal(size=(6, 3, 2)), rng.normal(size=(6, 3, 2))
    bn = BatchNorm(3)
    bn.weight[:] = [0.5, 2.0, -1.0]
    bn.running_mean[:] = [0.3, -0.2, 1.0]
    bn.train(training)
    tbn = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    tbn.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in bn.state_dict().items()})
    tbn.train(training)
    xt = torch.from_numpy(x).requires_grad_(True)
    tbn(xt).backward(torch.from_numpy(dy))
    bn(x)
    bn.weight *= 3.0  # in place, after the forward
    bn.running_mean += 5.0
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bn.grad_weight, tbn.weight.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_momentum_set_out_of_range_after_construction_changes_nothing():
    bn = BatchNorm(2)
    bn(np.random.default_rng(0).normal(size=(8, 2)))
    before = bn.state_dict()
    bn.momentum = 2.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bn(np.random.default_rng(1).normal(size=(8, 2)))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_eps_zero_with_a_constant_channel_in_training_is_refused_and_changes_nothing():
    """0 / sqrt(0 + 0) gave NaN outputs and gradients with only RuntimeWarnings (PyTorch refuses eps=0 in
    training); with every channel varying, eps=0 is the closed form (x - mean) / std."""
    bn = BatchNorm(2, eps=0.0)
    x = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    before = bn.state_dict()
    with pytest.raises(ValueError, match=r"eps=0 and channel\(s\) \[1\] have zero variance"):
        bn(x)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    x[:, 1] = [4.0, 5.0, 9.0]
    np.testing.assert_allclose(bn(x), (x - x.mean(0)) / x.std(0), rtol=1e-12)
    # constants whose mean does not round back to them (0.1 three times: each deviation an ulp, not 0) gave +-1
    # outputs and gradients of 5e16 instead of the refusal, depending on the batch size
    for value, rows in ((0.1, 3), (0.1, 7), (0.1, 10), (1 / 3, 10), (1e8 + 0.1, 3)):
        const = np.stack([np.arange(rows, dtype=np.float64), np.full(rows, value)], axis=1)
        with pytest.raises(ValueError, match=r"eps=0 and channel\(s\) \[1\] have zero variance"):
            bn(const)


def test_variance_that_overflows_the_dtype_is_refused_and_changes_nothing():
    bn = BatchNorm(2)
    x = np.array([[3e38, 1.0], [-3e38, 2.0], [3e38, 3.0], [-3e38, 4.0]], dtype=np.float32)  # finite sum, inf M2
    before = bn.state_dict()
    with pytest.raises(ValueError, match="overflow"):
        bn(x)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_complex_input_and_non_integer_batch_counts_are_refused():
    with pytest.raises(TypeError, match="real inputs"):
        BatchNorm(2)(np.ones((4, 2), dtype=np.complex64))
    bn = BatchNorm(2)
    state = bn.state_dict()
    for bad in (2.7, np.nan, -1, [1, 2], [[5]], [[[5]]]):
        with pytest.raises(ValueError, match="num_batches_tracked"):
            bn.load_state_dict({**state, "num_batches_tracked": np.array(bad)})
    assert bn.num_batches_tracked == 0


def test_a_count_holds_shape_scalar_or_one_value_as_torch_loads_it():
    """torch's load_state_dict takes num_batches_tracked of shape () or (1,) and refuses (1, 1): so does the core."""
    torch = pytest.importorskip("torch")
    state = BatchNorm(2).state_dict()
    for count, loads in [(np.array(5), True), (np.array([5]), True), (np.array([[5]]), False)]:
        tbn = torch.nn.BatchNorm1d(2)
        try:
            tbn.load_state_dict({k: torch.as_tensor(v) for k, v in {**state, "num_batches_tracked": count}.items()})
            torch_loads = True
        except RuntimeError:
            torch_loads = False
        assert torch_loads is loads
        bn = BatchNorm(2)
        if loads:
            bn.load_state_dict({**state, "num_batches_tracked": count})
            assert bn.num_batches_tracked == int(tbn.num_batches_tracked) == 5
        else:
            with pytest.raises(ValueError, match=r"num_batches_tracked must be one .*got shape \(1, 1\)"):
                bn.load_state_dict({**state, "num_batches_tracked": count})


@pytest.mark.parametrize("training", [True, False])
def test_a_layer_without_running_statistics_is_not_told_of_training_or_running_statistics(training):
    """Without running statistics every batch is normalized with its own, in either mode: the NaN and eps=0
    refusals say so, not 'training batch ... running statistics left untouched'."""
    bn = BatchNorm(2, track_running_stats=False)
    bn.training = training
    x = np.ones((4, 2))
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^batch \(normalized with its own statistics: no running statistics\) "
                                         r"contains NaN or Inf \(or overflows\)$"):
        bn(x)
    with pytest.raises(ValueError, match=r"eps=0 and channel\(s\) \[0, 1\] .*use eps > 0$"):
        BatchNorm(2, eps=0.0, track_running_stats=False)(np.ones((4, 2)))


@pytest.mark.parametrize("training", [True, False])
def test_a_complex_or_non_numeric_gradient_is_refused_like_a_complex_input(training):
    """NumPy would drop the imaginary part with only a ComplexWarning."""
    bn = BatchNorm(2)
    bn.train(training)
    bn(np.random.default_rng(0).standard_normal((4, 2)))
    for dy in (np.ones((4, 2), dtype=np.complex128), np.full((4, 2), "1")):
        with pytest.raises(TypeError, match="real gradients"):
            bn.backward(dy)
    bn.backward(np.ones((4, 2), dtype=np.float16))  # any real dtype still goes through


# ------------------------------------------------- conventions vs real frameworks
def _batches(rng, shape, k=3):
    return [rng.normal(2.0, 3.0, size=shape).astype(np.float32) for _ in range(k)]


def test_onnx_convention_matches_onnxruntime_training_mode():
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    rng = np.random.default_rng(7)
    eps, momentum = 1e-3, 0.8
    ref = BatchNorm(3, eps=eps, momentum=momentum, convention="onnx")
    ref.weight, ref.bias = rng.normal(size=3), rng.normal(size=3)
    node = helper.make_node("BatchNormalization", ["X", "s", "b", "m", "v"], ["Y", "rm", "rv"],
                            epsilon=eps, momentum=momentum, training_mode=1)
    shape = (4, 3, 2, 2)
    graph = helper.make_graph(
        [node], "bn",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
         [("X", shape), ("s", [3]), ("b", [3]), ("m", [3]), ("v", [3])]],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "rm", "rv")],
    )
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 15)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    for x in _batches(rng, shape):
        y, rm, rv = sess.run(None, dict(X=x, s=ref.weight.astype(np.float32), b=ref.bias.astype(np.float32), m=rm, v=rv))
        np.testing.assert_allclose(ref(x), y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ref.running_mean, rm, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ref.running_var, rv, rtol=1e-5, atol=1e-6)


def test_keras_convention_matches_real_keras_layer():
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(8)
    layer = keras.layers.BatchNormalization(axis=-1, momentum=0.9, epsilon=1e-3)
    shape = (6, 4, 4, 3)
    layer.build(shape)
    gamma, beta = rng.normal(size=3).astype(np.float32), rng.normal(size=3).astype(np.float32)
    layer.set_weights([gamma, beta, np.zeros(3, np.float32), np.ones(3, np.float32)])
    ref = BatchNorm(3, momentum=0.9, axis=-1, convention="keras")
    assert ref.eps == 1e-3
    ref.weight, ref.bias = gamma.astype(np.float64), beta.astype(np.float64)
    for x in _batches(rng, shape):
        y = keras.ops.convert_to_numpy(layer(x, training=True))
        np.testing.assert_allclose(ref(x), y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ref.running_mean, keras.ops.convert_to_numpy(layer.moving_mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.running_var, keras.ops.convert_to_numpy(layer.moving_variance), rtol=1e-5, atol=1e-6)
    x = rng.normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(ref.eval()(x), keras.ops.convert_to_numpy(layer(x, training=False)), rtol=1e-4, atol=1e-4)


def test_flax_convention_matches_real_flax_layer():
    pytest.importorskip("flax")
    import jax
    import jax.numpy as jnp
    from flax import linen

    rng = np.random.default_rng(9)
    module = linen.BatchNorm(use_running_average=False, momentum=0.8, axis=-1)
    shape = (5, 3, 4)
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros(shape))
    ref = BatchNorm(4, momentum=0.8, axis=-1, convention="flax")
    for x in _batches(rng, shape):
        y, updates = module.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
        variables = {"params": variables["params"], **updates}
        np.testing.assert_allclose(ref(x), np.asarray(y), rtol=1e-4, atol=1e-4)
    stats = variables["batch_stats"]
    np.testing.assert_allclose(ref.running_mean, np.asarray(stats["mean"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref.running_var, np.asarray(stats["var"]), rtol=1e-4, atol=1e-5)
    x = rng.normal(size=shape).astype(np.float32)
    y = linen.BatchNorm(use_running_average=True, axis=-1).apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(ref.eval()(x), np.asarray(y), rtol=1e-4, atol=1e-4)


def test_torch_feeds_unbiased_variance_others_biased():
    x = np.array([[0.0], [2.0]])  # biased var 1, unbiased var 2
    t, k = BatchNorm(1, momentum=1.0), BatchNorm(1, momentum=0.0, convention="keras")
    t(x)
    k(x)
    assert t.running_var[0] == pytest.approx(2.0)
    assert k.running_var[0] == pytest.approx(1.0)



@pytest.mark.parametrize("convention", ["keras", "onnx", "flax"])
@pytest.mark.parametrize("momentum, r0", [(1e-12, 1e6), (1e-20, 1e30), (0.3, 0.7)])
def test_old_side_momentum_weighs_the_running_value_by_itself(convention, momentum, r0):
    """Keras/ONNX/Flax: running = m * running + (1 - m) * batch, m itself on the running value (1 - (1 - m) drops a
    tiny m: the old value vanished). Oracle: the closed form in float64."""
    bn = BatchNorm(1, momentum=momentum, convention=convention)
    bn.running_mean[:] = r0
    bn(np.array([[0.5], [1.5]]))  # batch mean 1
    assert bn.running_mean[0] == momentum * r0 + (1 - momentum) * 1.0

# ------------------------------------------------- threaded path, dtypes, state loading details
@pytest.fixture
def three_threads():
    """The NumPy layer on 3 threads (3 uneven blocks) whatever this machine has; the setting put back after."""
    old = bnkit.get_num_threads()
    bnkit.set_num_threads(3)
    yield
    bnkit.set_num_threads(old)


@pytest.mark.parametrize("training", [True, False])
def test_input_large_enough_for_the_threaded_path_matches_float64_torch(training, three_threads):
    """Inputs of >= 1<<20 values are split into row blocks on threads; every block must be written (a dropped
    block leaves np.empty garbage) in the forward and the backward, in both modes."""
    rng = np.random.default_rng(11)
    x = rng.normal(1.0, 2.0, size=(8, 4, 128, 256))
    dy = rng.normal(size=x.shape)
    assert x.size >= 1 << 20
    bn = BatchNorm(4)
    bn.weight, bn.bias = np.array([0.5, 2.0, -1.0, 1.5]), np.array([0.1, -0.2, 0.3, 0.0])
    bn.running_mean, bn.running_var = np.array([0.5, 1.0, 1.5, -1.0]), np.array([2.0, 4.0, 1.0, 9.0])
    tbn = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    tbn.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in bn.state_dict().items()})
    bn.train(training)
    tbn.train(training)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = tbn(xt)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(bn(x), yt.detach().numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(bn.backward(dy), xt.grad.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(bn.grad_weight, tbn.weight.grad.numpy(), rtol=1e-9)
    np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-12)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_set_num_threads_sets_how_many_blocks_run_and_not_the_result(threads, three_threads):
    """set_num_threads(n): a large input's pass runs in n row blocks (one, on the calling thread, for n = 1, as a
    benchmark against one torch thread needs), and the output is the same whatever n."""
    x3 = np.zeros((12, 4, 1 << 16), dtype=np.float32)
    seen = []
    bnkit.set_num_threads(threads)
    assert bnkit.get_num_threads() == threads
    bnkit.batchnorm._parallel(lambda rows: seen.append((rows.start, rows.stop)), x3)
    assert sorted(seen) == [(12 * k // threads, 12 * (k + 1) // threads) for k in range(threads)]
    x = np.random.default_rng(3).normal(2.0, 3.0, size=(12, 4, 256, 256)).astype(np.float32)
    bn = BatchNorm(4)
    y = bn(x)
    bnkit.set_num_threads(1)
    np.testing.assert_array_equal(bn(x), y)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2", None])
def test_set_num_threads_refuses_what_is_not_a_positive_int(bad):
    old = bnkit.get_num_threads()
    with pytest.raises(ValueError, match="positive int"):
        bnkit.set_num_threads(bad)
    assert bnkit.get_num_threads() == old


@pytest.mark.parametrize("env,expected", [("3", 3), ("4,2", 4), (" 2 ", 2), (" 5 ", 5), ("\t3 ,2", 3), ("0", None),
                                          ("abc", None), ("", None),
                                          ("-2", None), ("2.5", None), ("\u00b2", None), ("1_6", None),
                                          ("\u0663", None)])
def test_default_threads_follow_omp_num_threads(env, expected, monkeypatch):
    """As NumPy's BLAS and PyTorch read it: OMP_NUM_THREADS=1 keeps the NumPy layer on one thread too."""
    monkeypatch.setenv("OMP_NUM_THREADS", env)
    assert bnkit.batchnorm._default_threads() == (expected or os.cpu_count() or 1)


def test_state_without_num_batches_tracked_loads_strictly_like_torch():
    """Checkpoints from before PyTorch 0.4 have no num_batches_tracked; PyTorch loads them strictly (the count
    stays 0), so must we."""
    state = {"weight": np.full(3, 2.0), "bias": np.full(3, 0.5), "running_mean": np.full(3, 1.5),
             "running_var": np.full(3, 4.0)}
    tbn = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    tbn.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    ref = BatchNorm(3)
    ref.load_state_dict(state, strict=True)
    for k in state:
        np.testing.assert_array_equal(getattr(ref, k), getattr(tbn, k).detach().numpy())
    assert ref.num_batches_tracked == int(tbn.num_batches_tracked) == 0


def test_loaded_low_precision_state_is_stored_in_float64_and_grads_start_as_none():
    """Running statistics are kept in float64 (as built), whatever dtype they were loaded from: later momentum
    updates must not round to float32. The parameter gradients exist (as None) before any backward."""
    tbn = torch.nn.BatchNorm1d(3)  # float32
    tbn(torch.randn(8, 3) * 2 + 1)
    ref = BatchNorm(3)
    assert ref.grad_weight is None and ref.grad_bias is None
    ref.load_state_dict(tbn.state_dict())
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(ref, k).dtype == np.float64, k


def test_integer_input_is_normalized_in_float64():
    """Integers are promoted to float64 (as NumPy's mean does), not float32: above 2**24 float32 loses the
    differences that the normalization is about."""
    x = (np.array([[0, 1], [1, 3], [2, 5], [3, 7]], dtype=np.int64) + 2**30)
    for training in (True, False):
        bn = BatchNorm(2).train(training)
        if not training:
            bn.running_mean = np.full(2, 2.0**30)
        y = bn(x)
        assert y.dtype == np.float64
        x64 = x.astype(np.float64)
        mean = x64.mean(0) if training else bn.running_mean
        var = x64.var(0) if training else bn.running_var
        # eval folds the mean into a shift of -2**30: float64 cancellation leaves ~1e-7 (float32 would lose all)
        np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + bn.eps), rtol=1e-12, atol=1e-12 if training else 1e-6)


def test_float64_gradient_on_a_float16_forward_is_rounded_to_float16_like_torch():
    """PyTorch's autograd casts an incoming gradient to the output's dtype before the backward runs."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 3, 4, 4)).astype(np.float16)
    dy = rng.normal(size=x.shape)
    for training in (True, False):
        bn = BatchNorm(3).train(training)
        bn(x)
        dx64, gw64 = bn.backward(dy), bn.grad_weight
        dx16 = bn.backward(dy.astype(np.float16))
        np.testing.assert_array_equal(dx64, dx16)
        np.testing.assert_array_equal(gw64, bn.grad_weight)


def test_float16_eval_forward_and_backward_keep_scale_and_shift_in_float32():
    """Like PyTorch, float16 works with float32 scale/shift rows. The backward's dx = dy*scale then rounds once (within
    half a float16 ulp of exact); the bound on the forward allows x*scale and x*scale + shift a half ulp each
    (it rounds once now: see test_float16_output_is_rounded_once_from_the_exact_value). Rounding scale/shift to
    float16 first adds about another ulp."""
    def half_ulp(a):
        return np.spacing(np.abs(a).astype(np.float16)).astype(np.float64) / 2

    rng = np.random.default_rng(7)
    c = 4
    bn = BatchNorm(c).eval()
    bn.weight, bn.bias = rng.normal(1, 0.5, c), rng.normal(0, 0.5, c)
    bn.running_mean, bn.running_var = rng.normal(0, 1, c), rng.uniform(0.5, 2.0, c)
    x = rng.normal(size=(64, c, 8, 8)).astype(np.float16)
    dy = rng.normal(size=x.shape).astype(np.float16)
    y, dx = bn(x), bn.backward(dy)
    assert y.dtype == dx.dtype == np.float16
    s = (bn.weight / np.sqrt(bn.running_var + bn.eps))[:, None, None]
    h = bn.bias[:, None, None] - bn.running_mean[:, None, None] * s
    xs, dys = x.astype(np.float64) * s, dy.astype(np.float64) * s
    assert np.all(np.abs(y - (xs + h)) <= 1.01 * (half_ulp(xs) + half_ulp(xs + h)))  # 1.01: float32 noise
    assert np.all(np.abs(dx - dys) <= 1.01 * half_ulp(dys))


@pytest.mark.parametrize("training", [False, True])
def test_float16_output_is_rounded_once_from_the_exact_value(training):
    """A float16 input's output is ``x * scale + shift`` computed in float32 and rounded once to float16, as
    PyTorch's kernel does; writing the product to the float16 output before adding the shift rounded twice and
    missed the correctly rounded value in about a quarter of the elements (one ulp). Oracle: the float64 formula
    rounded to float16."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 4, 8, 8)).astype(np.float16)
    bn = BatchNorm(4)
    bn.weight, bn.bias = rng.uniform(0.5, 2, 4), rng.normal(size=4)
    bn.running_mean, bn.running_var = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    bn.train(training)
    y = bn(x)
    x64 = x.astype(np.float64)
    running = bn.running_mean, bn.running_var  # what eval mode normalized with (it does not update them)
    mean, var = (x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3))) if training else running
    shape = (1, 4, 1, 1)
    exact = ((x64 - mean.reshape(shape)) / np.sqrt(var + bn.eps).reshape(shape) * bn.weight.reshape(shape)
             + bn.bias.reshape(shape)).astype(np.float16)
    assert y.dtype == np.float16 and np.mean(y != exact) < 0.005
    # the gradient too: every step in float32, one rounding (four in-place float16 steps missed a quarter of the
    # elements, by up to 140 ulp). Oracle: torch autograd in float64 on the same formula, rounded to float16
    dy = rng.standard_normal(x.shape).astype(np.float16)
    xt = torch.from_numpy(x64).requires_grad_(True)
    w, b = torch.from_numpy(bn.weight.copy()), torch.from_numpy(bn.bias.copy())
    if training:
        torch.nn.functional.batch_norm(xt, None, None, w, b, True, 0.0, bn.eps).backward(torch.from_numpy(dy).double())
    else:
        torch.nn.functional.batch_norm(xt, torch.from_numpy(mean), torch.from_numpy(var), w, b, False, 0.0,
                                       bn.eps).backward(torch.from_numpy(dy).double())
    dx = bn.backward(dy)
    assert dx.dtype == np.float16 and np.mean(dx != xt.grad.numpy().astype(np.float16)) < 0.005



def test_a_pass_whose_pool_is_replaced_by_a_larger_one_still_completes(three_threads):
    """A pass on another thread has handed its blocks to the pool when a pass needing more workers replaces it:
    those blocks must still run (the old pool is shut down without cancelling them; a pool shut down before the
    other pass submitted made its forward raise "cannot schedule new futures after shutdown")."""
    import threading

    started, release = threading.Event(), threading.Event()

    def slow(block):
        started.set()
        release.wait(60)
        return block

    pending = bnkit.batchnorm._submit(slow, [slice(0, 1), slice(1, 2)])  # a 3-thread pass's two blocks, running
    assert started.wait(60)
    bnkit.set_num_threads(6)
    bigger = bnkit.batchnorm._submit(lambda block: block, [slice(k, k + 1) for k in range(5)])
    release.set()
    assert [f.result(timeout=60) for f in pending] == [slice(0, 1), slice(1, 2)]
    assert [f.result(timeout=60) for f in bigger] == [slice(k, k + 1) for k in range(5)]


def test_the_pool_grows_to_the_largest_count_used_and_no_further(three_threads):
    """Passes over batches of every size below the count, and counts set lower later, reuse one pool: at most the
    largest count minus one worker threads stay (one pool per size once left 80 idle threads for 16)."""
    bnkit.set_num_threads(6)
    for rows in range(2, 9):
        bnkit.batchnorm._parallel(lambda block: None, np.zeros((rows, 1, 1 << 18), dtype=np.float32))
    for n in (2, 4, 3):
        bnkit.set_num_threads(n)
        bnkit.batchnorm._parallel(lambda block: None, np.zeros((8, 1, 1 << 18), dtype=np.float32))
    assert bnkit.batchnorm._POOL_SIZE == 5 and len(bnkit.batchnorm._POOL._threads) <= 5


@pytest.fixture
def fresh_pool(monkeypatch):
    """No pool yet (the module's pool only grows, so earlier tests' passes would decide its size); the pools made
    in the test shut down after it and the module's own put back."""
    monkeypatch.setattr(bnkit.batchnorm, "_POOL", None)
    monkeypatch.setattr(bnkit.batchnorm, "_POOL_SIZE", 0)
    yield
    if bnkit.batchnorm._POOL is not None:
        bnkit.batchnorm._POOL.shutdown()


def test_a_pass_of_the_same_size_reuses_the_pool_and_a_replaced_pool_takes_no_more_work(three_threads, fresh_pool):
    """A pass needing no more workers than the pool has keeps that pool (replacing it every time started new threads
    for every pass); a pool replaced by a larger one is shut down (left running, its idle threads stayed forever)."""
    x3 = np.zeros((8, 1, 1 << 18), dtype=np.float32)
    bnkit.batchnorm._parallel(lambda block: None, x3)  # 3 threads: 2 blocks on the pool
    pool = bnkit.batchnorm._POOL
    bnkit.batchnorm._parallel(lambda block: None, x3)
    assert bnkit.batchnorm._POOL is pool and bnkit.batchnorm._POOL_SIZE == 2
    bnkit.set_num_threads(4)  # one block more than the pool has workers
    bnkit.batchnorm._parallel(lambda block: None, x3)
    assert bnkit.batchnorm._POOL is not pool and bnkit.batchnorm._POOL_SIZE == 3
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(lambda: None)


def test_two_concurrent_passes_share_a_pool_of_at_most_the_count_minus_one_threads(three_threads, fresh_pool):
    """Two passes of 4 threads running at once (3 blocks each on the pool, all blocked until released) never
    get more than 3 worker threads between them: the pool is sized for one pass, the extra blocks queue."""
    import threading

    release = threading.Event()
    bnkit.set_num_threads(4)
    blocks = [slice(k, k + 1) for k in range(3)]
    first = bnkit.batchnorm._submit(lambda block: release.wait(60), blocks)
    second = bnkit.batchnorm._submit(lambda block: release.wait(60), blocks)
    threads = len(bnkit.batchnorm._POOL._threads)
    release.set()
    assert all(f.result(timeout=60) for f in first + second)
    assert threads == 3


def _threaded_forward_in_child(queue):
    x = np.ones((4, 2, 512, 512), dtype=np.float32)
    queue.put(float(BatchNorm(2).eval()(x).sum()))


def _fork_and_forward(hang: str, holding=contextlib.nullcontext()) -> None:
    """Fork a child (started inside ``holding``) that runs a threaded forward: it must finish within 30 s, with the
    parent's result; ``hang`` says what a hang means."""
    import multiprocessing

    x = np.ones((4, 2, 512, 512), dtype=np.float32)
    expected = float(BatchNorm(2).eval()(x).sum())  # the parent's pool now has worker threads
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with holding:
        child = ctx.Process(target=_threaded_forward_in_child, args=(queue,))
        child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(hang)
    assert child.exitcode == 0 and queue.get(timeout=60) == pytest.approx(expected)


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX, imported by other tests, warns of any fork
def test_a_forked_child_runs_threaded_passes(three_threads):
    """A child made by fork inherits the pool but not its threads: it must start its own instead of waiting forever
    for workers that do not exist (multiprocessing's default on Linux)."""
    _fork_and_forward("the forked child hung in a threaded pass")


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_a_child_forked_while_another_thread_holds_the_pool_lock_runs_threaded_passes(three_threads):
    """A fork while another thread is inside _submit copies the pool's lock held, by a thread the child does not
    have: the child must get a lock of its own, not wait forever on the copy."""
    # held as a pass on another thread holds it while it hands its blocks to the pool
    _fork_and_forward("the forked child hung on the pool lock it inherited held", bnkit.batchnorm._POOL_LOCK)


@pytest.mark.parametrize("env", ["1", "3"])
def test_the_count_at_import_follows_omp_num_threads(env):
    """A fresh interpreter with OMP_NUM_THREADS set starts the NumPy layer on that many threads, as NumPy's BLAS and
    PyTorch do (the default read once, at import)."""
    import subprocess
    import sys

    src = os.path.dirname(os.path.dirname(bnkit.batchnorm.__file__))
    out = subprocess.run([sys.executable, "-c", "import bnkit.batchnorm as b; print(b.get_num_threads())"],
                         env={**os.environ, "OMP_NUM_THREADS": env, "PYTHONPATH": src}, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split() == [env]


def test_float32_long_runs_keep_float32_accuracy_in_the_variance_and_grad_weight():
    """Before: the per-channel sum of squares added each sample's run one value after another (np.einsum), so
    with 2^20 values per sample and channel the batch variance was 6e-5 off (PyTorch's float32: 3e-8). Oracle:
    float64 NumPy of the same values."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 2, 1024, 1024)) * 3 + 5).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = BatchNorm(2, momentum=1.0)  # running_var = this batch's unbiased variance
    bn.forward(x)
    bn.backward(dy)
    x64 = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(2, -1)
    var = x64.var(1, ddof=1)
    np.testing.assert_allclose(bn.running_var, var, rtol=1e-6)
    xhat = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + bn.eps)
    grad_weight = (dy.astype(np.float64).transpose(1, 0, 2, 3).reshape(2, -1) * xhat).sum(1)
    np.testing.assert_allclose(bn.grad_weight, grad_weight, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("hw", [(100, 100), (4097, 1)])  # runs of 4096 k + r values: the pieces and the rest
def test_float32_runs_longer_than_a_piece_with_a_remainder(hw):
    """The values after the last whole 4096-value piece count too (the long-run test uses 256 whole pieces, so it
    would not notice them dropped). Oracle: float64 NumPy."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 2, *hw)) * 3 + 5).astype(np.float32)
    bn = BatchNorm(2, momentum=1.0)
    bn.forward(x)
    np.testing.assert_allclose(bn.running_var, x.astype(np.float64).transpose(1, 0, 2, 3).reshape(2, -1).var(1, ddof=1),
                               rtol=1e-6)


def test_big_endian_and_bfloat16_inputs_give_the_numbers_of_a_native_float_copy():
    """A big-endian array (np.load of a '>f8' .npy, FITS, HDF5) crashed the training forward and the eval backward
    inside NumPy's sum(dtype=...); ml_dtypes' bfloat16, float8 and int4 arrays (JAX, Keras) were refused as 'not real
    numbers', in forward and as gradients.
    Oracle: torch.nn.BatchNorm1d in float64 on the native (widened) copy, train forward and input gradient."""
    rng = np.random.default_rng(0)
    native = rng.standard_normal((16, 3)) * 2 + 1
    cases = [(native.astype(">f8"), native), (native.astype(">f4"), native.astype(np.float32).astype(np.float64))]
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for name in ("bfloat16", "float8_e5m2", "float8_e4m3fn"):  # NumPy kinds 'V', 'f' and 'V'
        low = native.astype(getattr(ml_dtypes, name))
        cases.append((low, low.astype(np.float64)))
    small = np.clip(np.round(native * 2), -8, 7)  # ml_dtypes' int4: integers, taken as float64 as int8 is
    cases.append((small.astype(ml_dtypes.int4), small))
    for given, exact in cases:
        ours = BatchNorm(3)
        y = ours(given)
        dy = np.ones_like(exact) * np.arange(1.0, 4.0)
        dx = ours.backward(dy.astype(given.dtype) if given.dtype.byteorder == ">" or given.dtype.kind == "V"
                           else dy)  # dy of the input's dtype too (big-endian, bfloat16, int4)
        ref = torch.nn.BatchNorm1d(3).double()
        x64 = torch.tensor(exact, requires_grad=True)
        out = ref(x64)
        out.backward(torch.ones_like(out) * torch.arange(1.0, 4.0, dtype=torch.float64))
        tol = 1e-12 if y.dtype == np.float64 else 1e-5  # computed in float64 (>f8, int4) or float32
        np.testing.assert_allclose(y.astype(np.float64), out.detach().numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(dx, np.float64), x64.grad.numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(ours.running_var, ref.running_var.numpy(), rtol=tol, atol=tol)


def test_a_count_of_an_ml_dtypes_integer_type_loads():
    """num_batches_tracked as ml_dtypes' int4 (a JAX/Keras state) was refused as 'must be one non-negative integer,
    got 3'. Oracle: the same count as int64."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    layer = BatchNorm(2)
    state = {"weight": np.ones(2), "bias": np.zeros(2), "running_mean": np.zeros(2), "running_var": np.ones(2),
             "num_batches_tracked": np.array(3).astype(ml_dtypes.int4)}
    layer.load_state_dict(state)
    assert layer.num_batches_tracked == 3


@pytest.mark.parametrize("attr, value", [("weight", np.ones(5)), ("bias", np.zeros(5)), ("running_mean", np.zeros(5)),
                                         ("running_var", np.ones((3, 1))), ("eps", -1.0), ("eps", float("nan")),
                                         ("weight", "abc"), ("bias", np.ones(3) * 1j), ("weight", ("a", "b", "c"))])
def test_attributes_set_badly_after_construction_are_refused_before_anything_changes(attr, value):
    """A weight of the wrong shape failed with NumPy's broadcast error after the running statistics had been
    updated; a negative eps gave NaN outputs and updated them too (the constructor refuses both). Oracle:
    torch.nn.BatchNorm1d refuses the same settings in training and leaves its running statistics."""
    x = np.random.default_rng(0).normal(size=(4, 3))
    bn = BatchNorm(3)
    setattr(bn, attr, value)
    before = {k: np.copy(v) for k, v in vars(bn).items() if k in ("running_mean", "running_var")}
    with pytest.raises((ValueError, TypeError), match=f"{attr} (has shape|must be)"):
        bn(x)
    assert bn.num_batches_tracked == 0
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(bn, k), v)
    ref = torch.nn.BatchNorm1d(3)
    if isinstance(value, np.ndarray) and attr in ("weight", "bias") and not np.iscomplexobj(value) or (
            attr == "eps" and not np.isnan(value)):  # torch lets a NaN eps pass
        setattr(ref, attr, torch.nn.Parameter(torch.from_numpy(value)) if attr != "eps" else value)
        with pytest.raises((RuntimeError, ValueError)):
            ref(torch.from_numpy(x))
        assert torch.equal(ref.running_mean, torch.zeros(3))


@pytest.mark.parametrize("value", [[0.5, 2.0, 3.0], (0.5, 2.0, 3.0), torch.tensor([0.5, 2.0, 3.0]),
                                   torch.tensor([0.5, 2.0, 3.0], requires_grad=True)])
def test_a_weight_of_real_numbers_in_another_container_is_read_as_an_array(value):
    """A tuple or tensor weight failed with AttributeError ('no attribute astype') after the running statistics
    moved. Oracle: the same layer with the weight as a NumPy array."""
    x = np.random.default_rng(0).normal(size=(4, 3, 2))
    bn, ref = BatchNorm(3), BatchNorm(3)
    bn.weight, ref.weight = value, np.array([0.5, 2.0, 3.0])
    np.testing.assert_array_equal(bn(x), ref(x))
    np.testing.assert_array_equal(bn.running_var, ref.running_var)
    np.testing.assert_array_equal(bn.backward(np.ones_like(x)), ref.backward(np.ones_like(x)))
    state = bn.state_dict()  # it raised AttributeError ('no attribute copy') on a tuple or tensor
    assert type(state["weight"]) is np.ndarray
    np.testing.assert_array_equal(state["weight"], ref.state_dict()["weight"])
    bn.weight = "abc"  # a state the forward refuses is replaced by loading a good one
    bn.load_state_dict(ref.state_dict())
    np.testing.assert_array_equal(bn(x), ref(x))


def test_an_update_past_int64s_maximum_count_is_refused_and_changes_nothing():
    """At a count of int64's maximum one more update made state_dict() raise OverflowError (PyTorch wraps the
    count to a negative number)."""
    bn = BatchNorm(3)
    bn.load_state_dict({**bn.state_dict(), "num_batches_tracked": np.array(np.iinfo(np.int64).max)})
    with pytest.raises(ValueError, match="int64's maximum"):
        bn(np.random.default_rng(0).normal(size=(4, 3)))
    np.testing.assert_array_equal(bn.running_mean, np.zeros(3))
    assert bn.state_dict()["num_batches_tracked"] == np.iinfo(np.int64).max


@pytest.mark.parametrize("count", [np.array(1e20), np.array(2**63, dtype=np.uint64), 2**70])
def test_a_count_int64_cannot_hold_is_refused_on_load(count):
    """A num_batches_tracked of 1e20 loaded, and the layer's state_dict() (int64, as PyTorch's) then failed with
    OverflowError; 2**70 raised AttributeError. Oracle: int64's maximum loads and round-trips."""
    bn = BatchNorm(3)
    with pytest.raises(ValueError, match="num_batches_tracked must be one non-negative integer"):
        bn.load_state_dict({**bn.state_dict(), "num_batches_tracked": count})
    assert bn.num_batches_tracked == 0
    bn.load_state_dict({**bn.state_dict(), "num_batches_tracked": np.array(np.iinfo(np.int64).max)})
    assert bn.state_dict()["num_batches_tracked"] == np.iinfo(np.int64).max
