import pytest

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
