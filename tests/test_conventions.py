"""bnkit.conventions: the frameworks' defaults table, and convert_momentum with its round trips as README states
them (exact when m and 1 - m both have at most 15 significant digits; a float32 momentum of at least 1e-9 comes back the same float32).

Oracles: the frameworks' documented defaults, Python's Decimal arithmetic, NumPy's float32 rounding.
"""
from decimal import Decimal, localcontext

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import bnkit
from bnkit.conventions import CONVENTIONS, convert_momentum, get_convention, new_value_weight


def test_defaults_table():
    t, k, o, f = (CONVENTIONS[n] for n in ("torch", "keras", "onnx", "flax"))
    assert (t.momentum_weighs, t.default_momentum, t.default_eps, t.unbiased_running_var) == ("new", 0.1, 1e-5, True)
    assert (k.momentum_weighs, k.default_momentum, k.default_eps, k.unbiased_running_var) == ("old", 0.99, 1e-3, False)
    assert (o.momentum_weighs, o.default_momentum, o.default_eps, o.unbiased_running_var) == ("old", 0.9, 1e-5, False)
    assert (f.momentum_weighs, f.default_momentum, f.default_eps, f.unbiased_running_var) == ("old", 0.99, 1e-5, False)


@pytest.mark.parametrize("src,dst,m,expected", [
    ("torch", "keras", 0.1, 0.9), ("keras", "torch", 0.99, 0.01), ("onnx", "flax", 0.9, 0.9),
    ("torch", "torch", 0.3, 0.3),
])
def test_convert_momentum(src, dst, m, expected):
    assert convert_momentum(m, src, dst) == pytest.approx(expected)
    assert convert_momentum(convert_momentum(m, src, dst), dst, src) == pytest.approx(m)
    assert new_value_weight(convert_momentum(m, src, dst), dst) == pytest.approx(new_value_weight(m, src))


def test_bad_conventions_and_momenta():
    with pytest.raises(ValueError, match="unknown convention"):
        get_convention("caffe")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        convert_momentum(1.2, "torch", "keras")
    with pytest.raises(ValueError, match="cumulative"):
        convert_momentum(None, "torch", "keras")
    assert get_convention("TensorFlow").name == "keras"
    # the aliases a user types: each must reach its framework's own rule (defaults differ: 0.99 vs 0.9)
    aliases = {"tf": "keras", "tensorflow": "keras", "PyTorch": "torch", "jax": "flax", "JAX": "flax"}
    assert {a: get_convention(a) for a in aliases} == {a: CONVENTIONS[n] for a, n in aliases.items()}


@pytest.mark.parametrize("src", ["keras", "flax", "onnx"])
@pytest.mark.parametrize("dst", ["torch", "keras", "flax", "onnx"])
def test_momentum_none_outside_torch_is_named_as_the_source_s_mistake(src, dst):
    with pytest.raises(ValueError, match=f"^{src} momentum must be a number in \\[0, 1\\], got None") as info:
        convert_momentum(None, src, dst)
    assert "equivalent in" not in str(info.value)
    with pytest.raises(ValueError, match=f"no fixed equivalent in {src}"):  # torch's None is about the target
        convert_momentum(None, "torch", src)
    assert convert_momentum(None, "torch", "torch") is None  # the cumulative average, as it was (typed float | None)


PAIRS = [("torch", "keras"), ("keras", "torch"), ("torch", "onnx"), ("onnx", "torch"), ("torch", "flax")]


def round_trip(m: float, src: str, dst: str) -> float:
    return bnkit.convert_momentum(bnkit.convert_momentum(m, src, dst), dst, src)


def digits15(exponent_min: int):
    """Momenta written with at most 15 significant digits, between 10**exponent_min and 1."""
    def with_digits(d: int):  # d significant digits, scaled into [10**exponent_min, 1)
        return st.builds(lambda mant, exp: float(Decimal(mant).scaleb(exp)), st.integers(10 ** (d - 1), 10**d - 1),
                         st.integers(exponent_min - d + 1, -d))

    return st.integers(1, 15).flatmap(with_digits)


def significant_digits(m: float) -> int:
    return len(Decimal(repr(m)).normalize().as_tuple().digits)


@settings(max_examples=300, deadline=None)
@given(m=digits15(-1), pair=st.sampled_from(PAIRS))
@example(m=0.1, pair=("torch", "keras"))
@example(m=0.99, pair=("keras", "torch"))
@example(m=0.123456789012345, pair=("torch", "onnx"))
def test_momentum_round_trip_is_exact_up_to_15_significant_digits_from_0_1(m, pair):
    assert significant_digits(m) <= 15
    assert round_trip(m, *pair) == m


@settings(max_examples=300, deadline=None)
@given(m=digits15(-15), pair=st.sampled_from(PAIRS))
@example(m=4.99999999999995e-15, pair=("torch", "keras"))  # 1 - m has 29 significant digits: not claimed exact
def test_momentum_round_trip_is_exact_when_both_sides_have_up_to_15_significant_digits(m, pair):
    """What ``_complement``'s docstring says: exact whenever ``1 - m`` has at most 15 significant digits too."""
    with localcontext() as exact:
        exact.prec = 60  # the default 28 digits would round 1 - 4.99999999999995e-15 to 15 significant digits
        digits = len((Decimal(1) - Decimal(repr(m))).normalize().as_tuple().digits)
    if digits > 15:
        return
    assert round_trip(m, *pair) == m


def float32s(lo: float, hi: float):
    return st.floats(lo, hi, width=32).map(lambda v: float(np.float32(v)))


@settings(max_examples=300, deadline=None)
@given(m=float32s(0.5, 1.0), pair=st.sampled_from(PAIRS))
def test_float32_momentum_from_0_5_comes_back_within_one_ulp(m, pair):
    back = round_trip(m, *pair)
    assert back in (m, np.nextafter(m, 0.0), np.nextafter(m, 1.0))


@settings(max_examples=300, deadline=None)
@given(m=float32s(float(np.float32(1e-9)), 1.0), pair=st.sampled_from(PAIRS))
@example(m=float(np.float32(1e-9)), pair=("onnx", "torch"))
@example(m=float(np.float32(0.1)), pair=("onnx", "torch"))
@example(m=float(np.float32(0.01)), pair=("onnx", "torch"))
def test_float32_momentum_comes_back_the_same_float32(m, pair):
    """Written back as a float32 ONNX attribute, the round trip is exact."""
    assert np.float32(round_trip(m, *pair)) == np.float32(m)


@pytest.mark.parametrize("bad", [True, "0.1", None])
def test_a_momentum_that_is_not_a_real_number_is_refused_not_read(bad):
    """convert_momentum(True, ...) gave 0.0 (True read as 1) and "0.1" was parsed; BatchNorm(momentum=True) and
    ema_update refuse them (bnkit.checks). None is PyTorch's cumulative average: refused only between frameworks."""
    from bnkit import convert_state

    with pytest.raises(ValueError, match="momentum must be|momentum=None"):
        convert_momentum(bad, "torch", "keras")
    state = {"state_dict": {"running_mean": np.zeros(2), "running_var": np.ones(2)},
             "config": {"eps": 1e-5, "momentum": bad}}
    with pytest.raises(ValueError, match="momentum"):
        convert_state(state, "torch", "keras")
    with pytest.raises(ValueError, match="torch eps must be a real number, got '1e-5'"):
        convert_state(dict(state, config={"eps": "1e-5", "momentum": 0.1}), "torch", "keras")


@pytest.mark.parametrize("bad", [np.complex128(0.1 + 0.5j), np.array([0.1]), "torch-complex", "torch-1d"])
def test_a_complex_momentum_or_an_array_of_one_is_refused_not_cut_to_a_real(bad):
    """np.complex128(0.1+0.5j) became 0.1 (float() drops the imaginary part, with only a NumPy warning), a complex
    0-d tensor raised torch's own RuntimeError, and a 1-d tensor was taken where a 1-d array was refused."""
    if isinstance(bad, str):
        torch = pytest.importorskip("torch")
        bad = torch.tensor(0.1 + 0.5j) if bad == "torch-complex" else torch.tensor([0.1])
    with pytest.raises(ValueError, match="momentum must be a real number"):
        convert_momentum(bad, "torch", "keras")
    assert convert_momentum(np.array(0.1), "torch", "keras") == 0.9  # a 0-d array is one number
    torch = pytest.importorskip("torch")  # and so is a 0-d tensor, a Parameter's and a bfloat16 one too
    for one in (torch.tensor(0.5, requires_grad=True), torch.tensor(0.5, dtype=torch.bfloat16)):
        assert convert_momentum(one, "torch", "keras") == 0.5


def test_set_num_threads_takes_numpy_integers_and_refuses_bools():
    import bnkit

    old = bnkit.get_num_threads()
    try:
        bnkit.set_num_threads(np.int64(2))
        assert bnkit.get_num_threads() == 2 and type(bnkit.get_num_threads()) is int
        for bad in (True, 2.0, "2", 0):
            with pytest.raises(ValueError, match="the number of threads must be a positive int"):
                bnkit.set_num_threads(bad)
        assert bnkit.get_num_threads() == 2
    finally:
        bnkit.set_num_threads(old)
