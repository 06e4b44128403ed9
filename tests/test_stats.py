"""Streaming statistics against float64 NumPy on the full, concatenated data."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnkit.stats import EMA, CumulativeAverage, RunningMoments, batch_moments, ema_table, ema_update


def _split(x, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(x[start : start + s])
        start += s
    return out


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 17), min_size=1, max_size=8),
    channels=st.integers(1, 5),
    spatial=st.sampled_from([(), (3,), (2, 3)]),
    seed=st.integers(0, 2**32 - 1),
)
def test_running_moments_match_numpy_on_concatenation(sizes, channels, spatial, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, size=(sum(sizes), channels, *spatial)).astype(np.float32)
    rm = RunningMoments(channels)
    for part in _split(x, sizes):
        rm.update(part)
    flat = np.moveaxis(x.astype(np.float64), 1, 0).reshape(channels, -1)
    assert rm.count == flat.shape[1]
    np.testing.assert_allclose(rm.mean, flat.mean(1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm.var, flat.var(1), rtol=1e-10, atol=1e-12)
    if flat.shape[1] > 1:
        np.testing.assert_allclose(rm.var_unbiased, flat.var(1, ddof=1), rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(n_a=st.integers(0, 40), n_b=st.integers(0, 40), seed=st.integers(0, 2**32 - 1))
def test_merge_of_two_workers_equals_one_pass(n_a, n_b, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n_a, 3)), rng.normal(5.0, 0.1, size=(n_b, 3))
    wa, wb, whole = RunningMoments(3), RunningMoments(3), RunningMoments(3)
    if n_a:
        wa.update(a)
    if n_b:
        wb.update(b)
    if n_a + n_b:
        whole.update(np.concatenate([a, b]))
    wa.merge(wb)
    assert wa.count == whole.count
    np.testing.assert_allclose(wa.mean, whole.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(wa.m2, whole.m2, rtol=1e-10, atol=1e-10)


def test_large_offset_where_sum_of_squares_fails():
    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.standard_normal((20000, 2))).astype(np.float64)
    exact = x.var(0)  # two-pass float64 on the whole array: the oracle
    rm = RunningMoments(2)
    for part in np.array_split(x, 37):
        rm.update(part)
    np.testing.assert_allclose(rm.var, exact, rtol=1e-9)
    # the naive E[x^2] - E[x]^2 loses most digits here: the test data really is hard
    naive = (x**2).mean(0) - x.mean(0) ** 2
    assert np.max(np.abs(naive - exact) / exact) > 1e-3


@pytest.mark.parametrize("offset, std, batch, steps", [(1e8, 1e-4, 2, 1000), (1e8, 1e-4, 64, 100), (1e4, 1e-2, 16, 200)])
def test_many_small_batches_far_from_zero_lose_no_digits(offset, std, batch, steps):
    """Before: a running mean near 1e8 rounded at every update, and those errors fed Chan's delta**2: the
    variance of 1e8 +- 1e-4 in 2000 batches of 2 was 1e-5 off. Accumulated around a shift, it is exact to a few
    float64 roundings. Oracle: the exact variance of the float64 values, in rationals (merge too)."""
    from fractions import Fraction

    rng = np.random.default_rng(3)
    parts = [offset + std * rng.standard_normal((batch, 1)) for _ in range(steps)]
    values = [Fraction(float(v)) for v in np.concatenate(parts)[:, 0]]
    mu = sum(values) / len(values)
    exact = float(sum((v - mu) ** 2 for v in values) / len(values))
    rm, first, second = RunningMoments(1), RunningMoments(1), RunningMoments(1)
    for i, part in enumerate(parts):
        rm.update(part)
        (first if i < steps // 2 else second).update(part)
    first.merge(second)
    for got in (rm, first):
        assert abs(got.var[0] - exact) <= 1e-12 * exact
        assert abs(got.mean[0] - float(mu)) <= 2e-16 * offset


def test_channel_axis_last_and_update_moments():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4, 5, 3))
    rm = RunningMoments(3).update(x, channel_axis=-1)
    np.testing.assert_allclose(rm.mean, x.reshape(-1, 3).mean(0))
    n, mean, m2 = batch_moments(x, channel_axis=3)
    rm2 = RunningMoments(3).update_moments(n, mean, m2)
    np.testing.assert_allclose(rm2.var, x.reshape(-1, 3).var(0))


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.ones((4, 2)), "expected 3 channels"),
        (np.array([[1.0, np.nan, 2.0], [1.0, 2.0, 3.0]]), "NaN or Inf"),
        (np.array([[1.0, np.inf, 2.0], [1.0, 2.0, 3.0]]), "NaN or Inf"),
    ],
)
def test_running_moments_bad_input(bad, match):
    rm = RunningMoments(3).update(np.ones((2, 3)))
    with pytest.raises(ValueError, match=match):
        rm.update(bad)
    assert rm.count == 2  # untouched


@pytest.mark.parametrize("axis", [True, 1.0, "1", None])
def test_a_channel_axis_that_is_not_an_integer_is_refused_not_coerced(axis):
    """True was taken as axis 1 and '1' % ndim parsed as string formatting; BatchNorm(axis=...) refuses them."""
    rm = RunningMoments(3).update(np.ones((2, 3)))
    with pytest.raises(ValueError, match="channel_axis must be an integer"):
        rm.update(np.ones((2, 3)), channel_axis=axis)
    assert rm.count == 2
    with pytest.raises(ValueError, match="channel_axis must be an integer"):
        batch_moments(np.ones((2, 3)), channel_axis=axis)


def test_the_mean_of_nothing_is_nan_as_its_variance_is():
    """An accumulator that saw no value gave mean 0 beside NaN variances; the oracle: np.mean of an empty axis."""
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        want = np.mean(np.empty((3, 0)), axis=1)
    for rm in (RunningMoments(3), RunningMoments(3).update(np.empty((0, 3))), RunningMoments(3).merge(RunningMoments(3))):
        np.testing.assert_array_equal(rm.mean, want)
        assert np.isnan(rm.var).all()


def test_ema_update_computes_with_the_momentum_as_a_float_whatever_type_gave_it():
    """The momentum was checked as a float but used as given: a Decimal raised TypeError, a Fraction gave an object
    array, a 0-d tensor a tensor. Oracle: the same step with the float."""
    from decimal import Decimal
    from fractions import Fraction

    want = ema_update(np.zeros(3), np.ones(3), 0.1)
    for m in (Decimal("0.1"), Fraction(1, 10), np.array(0.1)):
        got = ema_update(np.zeros(3), np.ones(3), m)
        assert isinstance(got, np.ndarray) and got.dtype == np.float64, type(m)
        np.testing.assert_array_equal(got, want)
    for boolean in (np.array(True), np.array(True, dtype=object), np.array([0.1, 0.2], dtype=object),
                    np.array([], dtype=object)):  # a 0-d bool refused as True is; object arrays of several or none
        with pytest.raises(ValueError, match="momentum must be a real number"):
            ema_update(np.zeros(3), np.ones(3), boolean)


def test_an_empty_accumulators_partial_hands_over_as_nothing():
    """(count, mean, M2) of an empty accumulator, its mean now NaN, was refused by update_moments; a partial of no
    values has no mean to read. Oracle: merge, which takes the accumulator itself."""
    a = RunningMoments(3).update(np.arange(12.0).reshape(4, 3))
    empty = RunningMoments(3)
    a.update_moments(empty.count, empty.mean, empty.m2)
    b = RunningMoments(3).update(np.arange(12.0).reshape(4, 3)).merge(empty)
    assert a.count == b.count == 4
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.var, b.var)


def test_running_moments_refuses_complex_and_overflowing_batches():
    rm = RunningMoments(1).update(np.array([[1.0], [3.0]]))
    with pytest.raises(TypeError, match="must be real"):
        rm.update(np.array([[1 + 5j], [2 - 5j]]))
    with pytest.raises(ValueError, match="overflow float64"):  # finite, but the squared deviations are not
        rm.update(np.array([[1e200], [-1e200]]))
    assert rm.count == 2 and rm.mean[0] == 2.0 and rm.var[0] == 1.0  # untouched


@pytest.mark.parametrize("count, mean, m2, error, match", [
    (3, [np.nan], [1.0], ValueError, "partial mean contains NaN"),
    (3, [0.0], [np.inf], ValueError, "partial M2 contains NaN"),
    (3, [0.0], [-5.0], ValueError, "non-negative"),
    (2.5, [0.0], [1.0], ValueError, "count must be a non-negative integer"),
    (-1, [0.0], [0.0], ValueError, "count must be a non-negative integer"),
    (1, [0.0], [5.0], ValueError, "must have M2 = 0"),
    (3, [1 + 2j], [1.0], TypeError, "must be real"),
    (3, [0.0, 1.0], [1.0, 1.0], ValueError, "shape"),
    ("3", [0.0], [0.0], ValueError, "count must be a non-negative integer, got '3'"),  # was "'<' not supported"
    (3, np.array(["1"]), [0.0], TypeError, "partial mean must hold real numbers"),  # was parsed
    (3, np.array([None], dtype=object), [0.0], TypeError, "partial mean must hold real numbers, got None"),
    ([3], [0.0], [0.0], ValueError, r"count must be a non-negative integer, got \[3\]"),
    (10**400, [0.0], [0.0], ValueError, "count must be a non-negative integer within float64"),  # var overflowed
])
def test_update_moments_refuses_impossible_partials(count, mean, m2, error, match):
    rm = RunningMoments(1).update(np.array([[0.0], [2.0]]))
    with pytest.raises(error, match=match):
        rm.update_moments(count, np.array(mean), np.array(m2))
    assert rm.count == 2 and rm.mean[0] == 1.0 and rm.var[0] == 1.0  # untouched
    rm.update_moments(np.int64(2), np.array([4.0]), np.array([2.0]))  # {3, 5} after {0, 2}: integral counts of any type
    np.testing.assert_allclose([rm.mean[0], rm.var[0]], [np.mean([0, 2, 3, 5]), np.var([0, 2, 3, 5])])


def test_running_moments_rejects_bad_construction_and_merge():
    with pytest.raises(ValueError):
        RunningMoments(0)
    with pytest.raises(ValueError):
        RunningMoments(2).merge(RunningMoments(3))
    assert np.isnan(RunningMoments(2).var).all()
    assert np.isnan(RunningMoments(2).update(np.ones((1, 2))).var_unbiased).all()


def test_ema_sides_are_each_others_complement():
    assert ema_update(0.0, 10.0, 0.1, weight_on="new") == pytest.approx(1.0)
    assert ema_update(0.0, 10.0, 0.9, weight_on="old") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ema_update(0.0, 1.0, 1.5)
    with pytest.raises(ValueError):
        ema_update(0.0, 1.0, 0.5, weight_on="middle")


@pytest.mark.parametrize("decay", [1.5, -0.1, float("nan")])
def test_ema_refuses_a_decay_outside_0_1_when_built(decay):
    """A weight outside [0, 1] is no average; it must be refused at construction, naming decay, not at the first
    update with an error about some other parameter."""
    with pytest.raises(ValueError, match="decay"):
        EMA(decay)


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(-100, 100), min_size=1, max_size=30), decay=st.floats(0.0, 0.999), init=st.floats(-5, 5))
def test_bias_corrected_ema_is_the_weighted_mean_of_values(values, decay, init):
    ema = EMA(decay, init)
    for v in values:
        ema.update(v)
    t = len(values)
    weights = np.array([decay ** (t - 1 - i) for i in range(t)])
    expected = np.dot(weights, values) / weights.sum()
    assert ema.corrected == pytest.approx(expected, rel=1e-9, abs=1e-9)
    raw = decay**t * init + (1 - decay) * np.dot(weights, values)
    assert ema.value == pytest.approx(raw, rel=1e-9, abs=1e-9)



@pytest.mark.parametrize("decay,init", [(0.999999999999, 1e6), (0.999999999, 1e3), (0.5, -7.0), (0.0, 3.0), (1.0, 1e6)])
def test_bias_corrected_ema_keeps_its_digits_with_a_large_start_and_decay_near_one(decay, init):
    """Before: (v_t - decay**t init) / (1 - decay**t) cancelled: with decay 1 - 1e-12 and init 1e6, batches
    all 1 gave 0, -58.2, -38.8. Oracle: the weighted mean of the values in exact rational arithmetic."""
    from fractions import Fraction

    values = [1.0, 1.0, 1.0, 0.25, 3.5, -2.0]
    ema = EMA(decay, init)
    for t, v in enumerate(values, 1):
        ema.update(v)
        weights = [Fraction(decay) ** (t - 1 - i) for i in range(t)]
        exact = sum(w * Fraction(x) for w, x in zip(weights, values)) / sum(weights)
        assert float(ema.corrected) == pytest.approx(float(exact), rel=1e-12, abs=1e-12), t


def test_ema_with_decay_one_never_moves_and_its_corrected_value_is_the_plain_mean():
    """decay = 1 keeps all weight on the old value: the average stays at init, and the correction
    (v_t - 1 * init) / (1 - 1) is 0/0; its limit as decay -> 1, the plain mean of the values, is what
    ``corrected`` gives (as decay 1 - 1e-12 does to 1e-9)."""
    ema, near = EMA(1.0, init=np.array([2.0, -3.0])), EMA(1.0 - 1e-12, init=np.array([2.0, -3.0]))
    for v in (5.0, 7.0, -0.5):
        ema.update(v)
        near.update(v)
    np.testing.assert_array_equal(ema.value, [2.0, -3.0])
    np.testing.assert_allclose(ema.corrected, [23 / 6, 23 / 6], rtol=1e-15)
    np.testing.assert_allclose(ema.corrected, near.corrected, rtol=1e-9)


def test_cumulative_average_is_the_plain_mean():
    ca = CumulativeAverage()
    vals = [3.0, -1.0, 7.5, 2.25]
    for v in vals:
        ca.update(v)
    assert ca.value == pytest.approx(np.mean(vals))


def test_lesson_worked_example_closed_form():
    # v_t = 0.9 v_{t-1} + 0.1 m_t from 0 with m = 4.2, 3.8, 4.1, then 4.0 forever
    rows = ema_table([4.2, 3.8, 4.1] + [4.0] * 47, decay=0.9)
    v3 = 0.1 * (0.81 * 4.2 + 0.9 * 3.8 + 4.1)
    assert rows[0][2] == pytest.approx(0.42)
    assert rows[1][2] == pytest.approx(0.758)
    assert rows[2][2] == pytest.approx(v3)
    for t in (10, 50):  # after batch 3 the input is constant: v_t = 4 + (v_3 - 4) * 0.9**(t-3)
        assert rows[t - 1][2] == pytest.approx(4.0 + (v3 - 4.0) * 0.9 ** (t - 3))
    assert rows[9][2] == pytest.approx(2.6092, abs=1e-4)  # the lesson's "≈ 3.58" is wrong
    assert rows[0][3] == pytest.approx(4.2)  # bias correction recovers the first batch mean exactly


def test_partials_after_batches_and_empty_batches_use_the_shift():
    """update_moments after update keeps the shift (ignoring it gives mean 17.5 for 12.5), and an empty batch
    raises no IndexError. Oracle: NumPy over the values themselves."""
    rm = RunningMoments(1).update(np.array([[10.0], [12.0]]))
    rm.update_moments(2, np.array([14.0]), np.array([2.0]))  # the values 13 and 15
    np.testing.assert_allclose([rm.mean[0], rm.var[0]], [np.mean([10, 12, 13, 15]), np.var([10, 12, 13, 15])])
    empty = RunningMoments(3).update(np.zeros((0, 3)))
    assert empty.count == 0
    x = np.arange(12.0).reshape(4, 3)
    np.testing.assert_allclose(empty.update(x).mean, x.mean(0))


def test_running_moments_takes_numbers_in_an_object_array_as_batchnorm_does():
    """An object array of numbers, which BatchNorm converts, raised NumPy's isfinite TypeError; strings are named.
    Oracle: the float64 copy of the same values."""
    values = np.array([[1, 2.5], [3, 4], [6, -1]], dtype=object)
    got, want = RunningMoments(2), RunningMoments(2)
    got.update(values)
    want.update(values.astype(np.float64))
    np.testing.assert_array_equal(got.mean, want.mean)
    np.testing.assert_array_equal(got.var, want.var)
    with pytest.raises(TypeError, match="batch must hold real numbers, got dtype <U1"):
        RunningMoments(2).update(np.array([["a", "b"], ["c", "d"]]))
    # numeric strings were parsed as numbers (torch refuses them); None in an object array was called NaN
    for bad, match in ((np.array([["1", "2"], ["3", "4"]]), "got dtype <U1"),
                       (np.array([[1, None], [3, 4]], dtype=object), "got None"),
                       (np.array([[1, "2"], [3, 4]], dtype=object), "got '2'")):
        rm = RunningMoments(2)
        with pytest.raises(TypeError, match=f"batch must hold real numbers, {match}.*refusing to update statistics"):
            rm.update(bad)
        assert rm.count == 0


def test_emas_refuse_strings_and_none_instead_of_parsing_them():
    """EMA(0.9).update(np.array(['1.5'])) gave 0.15, None gave NaN, and a complex value lost its imaginary part."""
    for bad, error in ((np.array(["1.5"]), TypeError), (np.array([None]), TypeError), (np.array([1 + 1j]), TypeError),
                       ("1.5", TypeError)):
        for ema in (EMA(0.9), CumulativeAverage()):
            with pytest.raises(error, match="the value must"):
                ema.update(bad)
            assert ema.steps == 0 and ema.value == 0.0
    with pytest.raises(ValueError, match="decay must be a real number, got '0.9'"):
        EMA("0.9")
    with pytest.raises(ValueError, match="num_channels must be an integer, got True"):
        RunningMoments(True)
    assert RunningMoments(np.array(2)).update_moments(np.array(4), np.zeros(2), np.ones(2)).count == 4
    assert RunningMoments(1).update_moments(2**53 + 1, np.zeros(1), np.zeros(1)).count == 2**53 + 1  # exact
    assert RunningMoments(1).update_moments(5.0, np.zeros(1), np.zeros(1)).count == 5
    rm = RunningMoments(3)
    cells = np.empty((2, 3), dtype=object)
    cells[...] = [[np.array([1.0, 2.0])] * 3] * 2
    with pytest.raises(TypeError, match="batch must hold one real number within float64's range per cell"):
        rm.update(cells)  # numpy's own error escaped
    with pytest.raises(TypeError, match="batch must hold one real number within float64's range per cell"):
        rm.update(np.array([[10**400, 1, 2]], dtype=object))  # OverflowError escaped
    assert rm.count == 0


def test_a_total_count_beyond_float64_is_refused_before_anything_changes():
    """Two counts each within float64 added up beyond it (update_moments twice, or merge): accepted, then var raised
    OverflowError; Fraction(10**400) as a count escaped as a bare OverflowError."""
    from fractions import Fraction

    largest = int(np.finfo(np.float64).max)
    rm = RunningMoments(1).update_moments(largest, np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="more than float64 can count"):
        rm.update_moments(largest, np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="more than float64 can count"):
        rm.merge(RunningMoments(1).update_moments(largest, np.zeros(1), np.zeros(1)))
    assert rm.count == largest and np.isfinite(rm.var).all()
    with pytest.raises(ValueError, match="count must be a non-negative integer"):
        RunningMoments(1).update_moments(Fraction(10**400), np.zeros(1), np.zeros(1))


@pytest.mark.parametrize("batch", [np.array([[1 + 2j, 2.0], [3.0, 4 - 1j]]), np.array([["1", "40"], ["3", "2"]])])
def test_batch_moments_refuses_what_running_moments_refuses(batch):
    """batch_moments dropped imaginary parts (a ComplexWarning only) and parsed strings as numbers, where
    RunningMoments.update refuses both: combining workers' partials with update_moments(*batch_moments(x)) took them.
    Oracle: RunningMoments.update's own refusal."""
    with pytest.raises(TypeError, match="batch must"):
        RunningMoments(2).update(batch)
    with pytest.raises(TypeError, match="batch must"):
        batch_moments(batch)


@pytest.mark.parametrize("make", [lambda: EMA(0.9), lambda: EMA(0.9, init=np.zeros(3)), lambda: CumulativeAverage(),
                                  lambda: CumulativeAverage(np.zeros(3))])
def test_averages_refuse_nan_and_shapes_that_would_change_them_and_stay_as_they_were(make):
    """A NaN or Inf value made the average NaN/Inf for good, and a value NumPy broadcasts turned a 3-channel average
    into a (2, 3) table, both without an error (review); RunningMoments refuses NaN/Inf batches. Oracle: the
    closed-form average of the finite values, which the refused ones leave as it was."""
    avg = make()
    first = np.array([1.0, 2.0, 4.0])
    avg.update(first)
    before = avg.value.copy()
    for bad, match in ((np.array([1.0, np.nan, 2.0]), "NaN or Inf"), (np.inf, "NaN or Inf"),
                       (np.ones((2, 3)), r"shape \(2, 3\) does not fit the average's \(3,\)"),
                       (np.ones(2), r"shape \(2,\) does not fit")):
        with pytest.raises(ValueError, match=match):
            avg.update(bad)
        assert avg.steps == 1 and np.array_equal(avg.value, before)
    avg.update(first * 3)
    want = 0.9 * (0.9 * 0.0 + 0.1 * first) + 0.1 * first * 3 if isinstance(avg, EMA) else 2 * first
    np.testing.assert_allclose(avg.value, want, rtol=1e-15)
    avg.update(2.0)  # a scalar broadcasts to every channel
    assert avg.value.shape == (3,)
    for bad_init in (np.nan, [0.0, np.inf]):
        with pytest.raises(ValueError, match="init contains NaN or Inf"):
            type(avg)(0.9, bad_init) if isinstance(avg, EMA) else type(avg)(bad_init)


def test_old_side_momentum_weighs_the_old_value_by_the_momentum_itself():
    """weight_on="old" weighed the old value by 1 - (1 - m), which is 0 for m = 1e-20: EMA(1e-20, init=1e20) after
    a 0 gave 0, where the rule it states (Keras's moving * m + mean * (1 - m)) gives 1 (review). Oracle: that
    closed form; PyTorch's side, (1 - m) * running + m * x, as its kernel computes it (aten's batch_norm)."""
    assert ema_update(1e20, 0.0, 1e-20, weight_on="old") == 1e-20 * 1e20
    ema = EMA(1e-20, init=1e20)
    assert float(ema.update(0.0)) == 1e-20 * 1e20
    assert ema_update(1e20, 0.0, 1e-20, weight_on="new") == (1 - 1e-20) * 1e20
    assert ema_update(0.7, 0.3, 0.3, weight_on="new") == (1 - 0.3) * 0.7 + 0.3 * 0.3
