"""Keras/Flax layers through bnkit.torch and back: a layer with a shift but no scale, and input above rank 5.

Oracles: the real Keras 3 (on torch) and Flax layers: which weights they train, and their inference output.
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from bnkit.torch import BatchNormNd, from_flax, from_keras, to_flax, to_keras

C = 3


def _keras_layer(rank: int, **kw):
    keras = pytest.importorskip("keras")
    layer = keras.layers.BatchNormalization(axis=1, momentum=0.9, epsilon=1e-3, **kw)
    layer.build((None, C) + (None,) * (rank - 2))
    rng = np.random.default_rng(rank)
    for w, lo in ((layer.beta, -1), (layer.moving_mean, -1), (layer.moving_variance, 0.5)):
        if w is not None:
            w.assign(rng.uniform(lo, 2, C).astype("float32"))
    return layer


def _keras_eval(layer, x: np.ndarray) -> np.ndarray:
    out = layer(x, training=False)
    return np.asarray(out.detach().cpu() if hasattr(out, "detach") else out)


def _trained(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def test_a_keras_layer_without_scale_gives_a_torch_weight_that_does_not_train_and_comes_back_without_scale():
    source = _keras_layer(4, scale=False, center=True)
    assert [w.name for w in source.trainable_weights] == ["beta"]
    bn = from_keras(source).eval()
    assert _trained(bn) == ["bias"]  # the weight of 1 stands in for no scale: training must not grow one
    x = np.random.default_rng(0).normal(size=(4, C, 2, 2)).astype("float32")
    np.testing.assert_allclose(bn(torch.from_numpy(x)).detach().numpy(), _keras_eval(source, x), rtol=1e-5, atol=1e-6)
    back = to_keras(copy.deepcopy(bn))  # the mark travels with the layer
    assert back.get_config()["scale"] is False and back.get_config()["center"] is True
    assert [w.name for w in back.trainable_weights] == ["beta"]
    np.testing.assert_allclose(_keras_eval(back, x), _keras_eval(source, x), rtol=1e-6, atol=1e-6)


def test_a_torch_weight_of_ones_that_trains_stays_a_keras_scale():
    pytest.importorskip("keras")
    pytest.importorskip("flax.linen")
    bn = nn.BatchNorm2d(C).eval()  # a fresh layer: weight all ones, but trained
    assert to_keras(bn).get_config()["scale"] is True
    assert to_flax(bn)[0].use_scale is True
    bn.weight.requires_grad_(False)
    bn.bias = None  # no shift: the weight is the layer's only parameter, not a stand-in
    assert to_keras(bn).get_config()["scale"] is True


def test_a_frozen_keras_scale_of_ones_comes_back_as_a_scale():
    """A Keras scale=True, trainable=False layer whose gamma is still 1 came back with scale=False: three weights,
    which its own architecture refuses. Oracle: the real Keras layer's config and set_weights."""
    pytest.importorskip("flax.linen")
    source = _keras_layer(4)  # gamma still its initial 1
    source.trainable = False
    back = to_keras(from_keras(source))
    assert back.get_config()["scale"] is True
    source.set_weights(back.get_weights())  # the same four weights, in the source's layout
    frozen = nn.BatchNorm2d(C).eval().requires_grad_(False)  # freeze_bn(affine=True)'s state: a scale all the same
    assert to_keras(frozen).get_config()["scale"] is True and to_flax(frozen)[0].use_scale is True


def test_a_flax_layer_without_scale_gives_a_torch_weight_that_does_not_train_and_comes_back_without_scale():
    linen = pytest.importorskip("flax.linen")
    jax = pytest.importorskip("jax")
    module = linen.BatchNorm(axis=1, momentum=0.9, epsilon=1e-5, use_scale=False, use_bias=True)
    x = np.random.default_rng(1).normal(size=(4, C, 5)).astype("float32")
    variables = module.init(jax.random.PRNGKey(0), x, use_running_average=False)
    variables = {"params": {"bias": variables["params"]["bias"] + 0.5},
                 "batch_stats": {"mean": variables["batch_stats"]["mean"] - 0.3,
                                 "var": variables["batch_stats"]["var"] * 2.0}}
    want = np.asarray(module.apply(variables, x, use_running_average=True))
    bn = from_flax(module, variables, ndim=3).eval()
    assert _trained(bn) == ["bias"]
    np.testing.assert_allclose(bn(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-5, atol=1e-6)
    back, back_vars = to_flax(bn)
    assert back.use_scale is False and set(back_vars["params"]) == {"bias"}
    np.testing.assert_allclose(np.asarray(back.apply(back_vars, x, use_running_average=True)), want, rtol=1e-6,
                               atol=1e-6)


def test_keras_and_flax_layers_of_rank_6_become_batchnormnd():
    source = _keras_layer(6)
    x = np.random.default_rng(2).normal(size=(2, C, 2, 1, 2, 3)).astype("float32")
    bn = from_keras(source).eval()
    assert type(bn) is BatchNormNd
    np.testing.assert_allclose(bn(torch.from_numpy(x)).detach().numpy(), _keras_eval(source, x), rtol=1e-5,
                               atol=1e-6)
    again = from_keras(to_keras(bn, ndim=6)).eval()  # the layer to_keras builds for rank 6 comes back
    np.testing.assert_allclose(again(torch.from_numpy(x)).detach().numpy(), _keras_eval(source, x), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="2-5"):  # bnkit's exact-training layers stop at BatchNorm3d
        from_keras(source, exact_training=True)
    module, variables = to_flax(bn, ndim=6)
    flat = from_flax(module, variables, ndim=6).eval()
    assert type(flat) is BatchNormNd
    np.testing.assert_allclose(flat(torch.from_numpy(x)).detach().numpy(), _keras_eval(source, x), rtol=1e-5,
                               atol=1e-6)
