"""bnkit.torch conversions against the real Keras layer (KERAS_BACKEND=torch), the real
flax.linen.BatchNorm, and PyTorch's own SyncBatchNorm / fx fuser; convert_bn refuses the options that need running
statistics on layers without them, naming those layers and changing nothing."""
import contextlib
import copy
import inspect
import sys
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from _helpers import without_bias_option
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnkit.torch import (BatchNorm1d, BatchNorm2d, BatchNorm3d, bn_layers, convert_bn, fold_bn, freeze_bn, from_flax, from_keras,
                         is_frozen, revert_bn, revert_sync_bn, to_flax, to_keras, unfreeze_bn)
from bnkit.torch.convert import BatchNormNd
from bnkit.torch.zoo import SmallResNet, example_input

C = 3
EXACT = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}
PLAIN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPES = {2: (16,), 3: (16, 5), 4: (16, 3, 4), 5: (4, 3, 2, 2)}  # batch and non-channel sizes per rank


def batches(rank, channels_last, count, seed):
    """Float32 batches with per-channel offset/scale, in the source framework's layout."""
    rng = np.random.default_rng(seed)
    n, *rest = SHAPES[rank]
    shape = (n, *rest, C) if channels_last else (n, C, *rest)
    caxis = rank - 1 if channels_last else 1
    bshape = [1] * rank
    bshape[caxis] = C
    off, scl = rng.normal(0, 2, C).reshape(bshape), rng.uniform(0.5, 3, C).reshape(bshape)
    return [(rng.normal(size=shape) * scl + off).astype(np.float32) for _ in range(count)]


def to_first(x, channels_last):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1) if channels_last else x))


def torch_train(bn, xs, channels_last):
    bn.train()
    for x in xs:
        bn(to_first(x, channels_last))


def torch_infer(bn, x, channels_last):
    was = bn.training
    with torch.no_grad():
        y = bn.eval()(to_first(x, channels_last)).numpy()
    bn.train(was)
    return np.moveaxis(y, 1, -1) if channels_last else y


# ----------------------------------------------------------------- Keras
try:
    import keras
except ImportError:  # the SyncBatchNorm tests below still run
    keras = None
needs_keras = pytest.mark.skipif(keras is None, reason='needs Keras: pip install "bnkit[test]"')


def keras_bn(rank, channels_last, seed=0, **kw):
    kw = {"momentum": 0.9, "epsilon": 1e-2, **kw}  # non-default both
    layer = keras.layers.BatchNormalization(axis=-1 if channels_last else 1, **kw)
    xs = batches(rank, channels_last, 4, seed)
    layer.build(xs[0].shape)
    rng = np.random.default_rng(seed + 1)
    for name in ("gamma", "beta"):
        if getattr(layer, name) is not None:
            getattr(layer, name).assign(rng.uniform(0.5, 2, C).astype(np.float32))
    for x in xs[:3]:  # a few training steps in Keras itself
        layer(x, training=True)
    return layer, xs[3]


def keras_stats(layer):
    return keras.ops.convert_to_numpy(layer.moving_mean), keras.ops.convert_to_numpy(layer.moving_variance)


@needs_keras
@pytest.mark.parametrize("rank,channels_last", [(2, True), (3, True), (4, True), (4, False), (5, True)])
def test_from_keras_same_inference_and_running_stats(rank, channels_last):
    layer, x_eval = keras_bn(rank, channels_last, seed=rank)
    plain, exact = from_keras(layer), from_keras(layer, exact_training=True)
    assert type(plain) is PLAIN[rank] and type(exact) is EXACT[rank]
    assert exact.running_var_rule == "biased" and plain.training and exact.training
    assert plain.eps == pytest.approx(1e-2) and plain.momentum == pytest.approx(0.1)  # carried, flipped
    y_keras = keras.ops.convert_to_numpy(layer(x_eval, training=False))
    for bn in (plain, exact):
        np.testing.assert_allclose(torch_infer(bn, x_eval, channels_last), y_keras, rtol=1e-5, atol=1e-5)

    mean0, var0 = keras_stats(layer)
    xs = batches(rank, channels_last, 3, seed=10 + rank)
    for x in xs:
        layer(x, training=True)
    torch_train(plain, xs, channels_last)
    torch_train(exact, xs, channels_last)
    mean_k, var_k = keras_stats(layer)
    for bn in (plain, exact):
        np.testing.assert_allclose(bn.running_mean.numpy(), mean_k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(exact.running_var.numpy(), var_k, rtol=1e-5, atol=1e-6)
    # The plain layer drifts as its docstring says: each update's batch term is n/(n-1) times Keras's.
    n = xs[0].size // C
    v_plain = var0.astype(np.float64)
    for x in xs:
        v_batch = np.var(np.moveaxis(x, -1 if channels_last else 1, 0).reshape(C, -1).astype(np.float64), axis=1)
        v_plain = 0.9 * v_plain + 0.1 * v_batch * n / (n - 1)
    np.testing.assert_allclose(plain.running_var.numpy(), v_plain, rtol=1e-5)
    assert not np.allclose(plain.running_var.numpy(), var_k, rtol=1e-4)


@pytest.mark.parametrize("exact_training", [False, True])
def test_from_keras_builds_on_a_pytorch_without_the_bias_option(exact_training, monkeypatch):
    keras = pytest.importorskip("keras")
    without_bias_option(monkeypatch)
    layer = keras.layers.BatchNormalization(axis=1)
    layer.build((None, 4, 5, 5))
    bn = from_keras(layer, exact_training=exact_training)
    assert bn.bias is not None and bn.num_features == 4


def test_a_scale_without_a_shift_on_a_pytorch_without_the_bias_option_is_a_clear_error(monkeypatch):
    """On torch 2.11 (no bias=False for nn.BatchNorm) the conversion raised TypeError from nn.BatchNorm's
    __init__ (found on the GPU machine); it says what is missing."""
    pytest.importorskip("flax")
    module, variables, _ = flax_bn(4, True, seed=5, use_bias=False, use_scale=True)
    without_bias_option(monkeypatch)
    with pytest.raises(ValueError, match="no shift .* needs nn.BatchNorm's bias=False option"):
        from_flax(module, variables, ndim=4)


@needs_keras
@pytest.mark.parametrize("center,scale", [(False, True), (True, False), (False, False)])
def test_from_keras_center_scale_flags(center, scale):
    layer, x_eval = keras_bn(4, True, seed=3, center=center, scale=scale)
    bn = from_keras(layer)
    assert bn.affine == (center or scale)  # torch has no bias-only layer: weight = 1 then
    assert (bn.bias is not None) == center
    y_keras = keras.ops.convert_to_numpy(layer(x_eval, training=False))
    np.testing.assert_allclose(torch_infer(bn, x_eval, True), y_keras, rtol=1e-5, atol=1e-5)
    back = to_keras(bn, axis=-1)
    assert (back.center, back.scale) == (center, scale)  # the weight of 1 that stood in for no scale is dropped
    np.testing.assert_allclose(keras.ops.convert_to_numpy(back(x_eval, training=False)), y_keras, rtol=1e-6, atol=1e-6)


@needs_keras
@pytest.mark.parametrize("cls,rank,axis", [(BatchNorm2d, 4, -1), (nn.BatchNorm2d, 4, 1), (nn.BatchNorm1d, 2, -1),
                                           (BatchNorm3d, 5, -1)])
def test_to_keras_same_inference_and_running_stats(cls, rank, axis):
    torch.manual_seed(0)
    extra = {"running_var_rule": "biased"} if cls.__module__.startswith("bnkit") else {}
    bn = cls(C, eps=3e-4, momentum=0.2, **extra)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    channels_last = axis == -1
    torch_train(bn, batches(rank, channels_last, 3, seed=1), channels_last)
    layer = to_keras(bn, axis=axis)
    assert layer.built and layer.epsilon == pytest.approx(3e-4) and layer.momentum == pytest.approx(0.8)
    assert layer.input_spec.ndim == rank
    x_eval = batches(rank, channels_last, 1, seed=2)[0]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x_eval, training=False)),
                               torch_infer(bn, x_eval, channels_last), rtol=1e-5, atol=1e-5)
    xs = batches(rank, channels_last, 3, seed=3)
    for x in xs:
        layer(x, training=True)
    torch_train(bn, xs, channels_last)
    mean_k, var_k = keras_stats(layer)
    np.testing.assert_allclose(bn.running_mean.numpy(), mean_k, rtol=1e-5, atol=1e-5)
    if extra:  # bnkit's biased-rule layer and Keras agree exactly; plain torch drifts (see from_keras)
        np.testing.assert_allclose(bn.running_var.numpy(), var_k, rtol=1e-5, atol=1e-6)


@needs_keras
def test_keras_frozen_layer_becomes_an_eval_mode_torch_layer_with_frozen_parameters():
    layer, x_eval = keras_bn(4, True)
    layer.trainable = False
    bn = from_keras(layer)
    assert not bn.training and not any(p.requires_grad for p in bn.parameters())
    mean0, _ = keras_stats(layer)
    layer(x_eval, training=True)  # Keras: a frozen BN uses and keeps its moving statistics
    np.testing.assert_array_equal(keras_stats(layer)[0], mean0)
    np.testing.assert_allclose(bn.running_mean.numpy(), mean0)


@needs_keras
def test_a_frozen_keras_layer_round_trips_as_frozen():
    layer, x_eval = keras_bn(4, True)
    layer.trainable = False
    back = to_keras(from_keras(layer), axis=-1)
    assert not back.trainable and not back.trainable_weights
    mean0, _ = keras_stats(back)
    y = keras.ops.convert_to_numpy(back(x_eval, training=True))  # as the source layer: moving statistics, no update
    np.testing.assert_array_equal(keras_stats(back)[0], mean0)
    np.testing.assert_allclose(y, keras.ops.convert_to_numpy(layer(x_eval, training=True)), rtol=1e-6, atol=1e-6)
    assert not to_keras(freeze_bn(nn.Sequential(nn.BatchNorm2d(C)))[0]).trainable
    # eval alone, frozen parameters alone, or nothing to freeze: not a freeze
    for bn in (nn.BatchNorm2d(C).eval(), nn.BatchNorm2d(C).requires_grad_(False),
               nn.BatchNorm2d(C, affine=False).eval()):
        assert to_keras(bn).trainable
    # only gamma frozen in eval: beta still trains in torch, so Keras must keep it trainable ("not all" was taken
    # for "none": trainable=False froze beta and the moving statistics too)
    bn = nn.BatchNorm2d(C).eval()
    bn.weight.requires_grad_(False)
    k = to_keras(bn)
    assert k.trainable and any(w is k.beta for w in k.trainable_weights)


@needs_keras
def test_one_frozen_parameter_stays_frozen_both_ways():
    """gamma alone frozen (variable.trainable=False in Keras, requires_grad=False in torch) trained again after a
    conversion either way. Oracle: Keras's own trainable_weights."""
    layer, _ = keras_bn(4, True)
    layer.gamma.trainable = False
    assert [id(w) for w in layer.trainable_weights] == [id(layer.beta)]
    bn = from_keras(layer)
    assert bn.training and not bn.weight.requires_grad and bn.bias.requires_grad
    back = to_keras(bn, axis=-1)
    assert back.trainable and [id(w) for w in back.trainable_weights] == [id(back.beta)]
    torch_bn = nn.BatchNorm2d(C)
    torch_bn.bias.requires_grad_(False)
    k = to_keras(torch_bn)
    assert k.trainable and [id(w) for w in k.trainable_weights] == [id(k.gamma)]
    again = from_keras(k)
    assert again.weight.requires_grad and not again.bias.requires_grad


@needs_keras
def test_a_frozen_keras_layer_without_gamma_and_beta_round_trips_as_frozen():
    layer, x_eval = keras_bn(4, True, center=False, scale=False)
    layer.trainable = False
    bn = from_keras(layer)
    assert not bn.affine and is_frozen(bn, "stats")  # no parameters to carry the freeze: freeze_bn's marker does
    bn.train()
    assert not bn.training  # Keras: a frozen BN normalizes with its moving statistics even in training
    back = to_keras(bn, axis=-1)
    assert not back.trainable
    mean0, var0 = keras_stats(back)
    y = keras.ops.convert_to_numpy(back(x_eval, training=True))
    np.testing.assert_array_equal(keras_stats(back)[0], mean0)
    np.testing.assert_array_equal(keras_stats(back)[1], var0)
    np.testing.assert_allclose(y, keras.ops.convert_to_numpy(layer(x_eval, training=True)), rtol=1e-6, atol=1e-6)
    assert to_keras(nn.BatchNorm2d(C, affine=False).eval()).trainable  # eval alone is still not a freeze


@needs_keras
def test_keras_bad_input_is_refused():
    with pytest.raises(ValueError, match="not built"):
        from_keras(keras.layers.BatchNormalization())
    with pytest.raises(TypeError, match="BatchNormalization"):
        from_keras(keras.layers.Dense(3))
    renorm = keras.layers.BatchNormalization(renorm=True)
    renorm.build((None, C))
    with pytest.raises(ValueError, match="renorm"):
        from_keras(renorm)
    with pytest.raises(ValueError, match="cumulative"):
        to_keras(nn.BatchNorm2d(C, momentum=None))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        to_keras(nn.BatchNorm2d(C, track_running_stats=False))
    with pytest.raises(ValueError, match="ndim="):
        to_keras(BatchNormNd(C))
    with pytest.raises(ValueError, match="rank >= 2"):  # BatchNormNd takes any rank from 2 (rank 6: see below)
        to_keras(BatchNormNd(C), ndim=1)
    with pytest.raises(ValueError, match="batch axis"):  # before: the batch axis was taken as the channels
        to_keras(nn.BatchNorm2d(C).eval(), axis=0)
    with pytest.raises(ValueError, match="batch axis"):
        to_keras(nn.BatchNorm2d(C).eval(), axis=-4)
    with pytest.raises(ValueError, match="not initialized"):
        to_keras(nn.LazyBatchNorm2d())
    with pytest.raises(TypeError, match="BatchNorm"):
        to_keras(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="renorm"):
        to_keras(BatchNorm2d(C, renorm=True))
    with pytest.raises(ValueError, match="debias"):  # bias-corrected running statistics: Keras has no such rule
        to_keras(BatchNorm2d(C, debias=True))


@pytest.mark.parametrize("target", ["keras", "flax"])
def test_a_layer_whose_own_tensors_disagree_is_refused_by_name(target):
    """A weight of 4 beside running statistics of 3: the refusal said 'torch config num_features=3 but the arrays
    have 4 channels', blaming num_features. Oracle: PyTorch's forward refuses the layer too."""
    pytest.importorskip("flax" if target == "flax" else "keras")
    bn = nn.BatchNorm2d(C).eval()
    bn.weight = nn.Parameter(torch.ones(C + 1))
    with pytest.raises(RuntimeError, match="elements"):
        bn(torch.randn(2, C, 2, 2))
    with pytest.raises(ValueError, match=r"per-channel tensors of different shapes \(weight \(4,\), bias \(3,\)"):
        (to_flax if target == "flax" else to_keras)(bn)


@needs_keras
def test_bfloat16_layers_convert_through_float32_exactly():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(C, eps=1e-3, momentum=0.2)
    torch_train(bn, batches(4, False, 2, seed=1), False)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
    bn = bn.to(torch.bfloat16).eval()
    reference = copy.deepcopy(bn).float()  # bfloat16 -> float32 is exact
    x = batches(4, False, 1, seed=2)[0]
    layer = to_keras(bn)
    assert layer.dtype == "float32"
    for name, value in zip(("gamma", "beta", "moving_mean", "moving_variance"), reference.state_dict().values()):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(getattr(layer, name)), value.numpy())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x, training=False)), torch_infer(reference, x, False),
                               rtol=1e-5, atol=1e-5)
    bf16_keras = keras.layers.BatchNormalization(axis=1, dtype="bfloat16")  # the other way: a bfloat16 Keras layer
    bf16_keras.build((None, C, 4, 4))
    bf16_keras.moving_variance.assign(reference.running_var.numpy())
    back = from_keras(bf16_keras)
    assert back.running_var.dtype == torch.float32 and torch.equal(back.running_var, reference.running_var)
    pytest.importorskip("flax")
    module, variables = to_flax(bn)
    assert variables["batch_stats"]["var"].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(variables["batch_stats"]["var"]), reference.running_var.numpy())
    np.testing.assert_allclose(flax_infer(module, variables, x), torch_infer(reference, x, False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,call", [("keras", lambda: to_keras(nn.BatchNorm1d(C))),
                                       ("flax", lambda: to_flax(nn.BatchNorm1d(C)))])
def test_missing_framework_names_the_extra(monkeypatch, name, call):
    monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    if name == "flax":
        monkeypatch.setitem(sys.modules, "flax.linen", None)
    with pytest.raises(ImportError, match=r'pip install "bnkit\[test\]"'):
        call()


# ----------------------------------------------------------------- Flax
def flax_bn(rank, channels_last, seed=0, **kw):
    linen = pytest.importorskip("flax.linen")
    jnp = pytest.importorskip("jax.numpy")
    module = linen.BatchNorm(axis=-1 if channels_last else 1, momentum=0.8, epsilon=2e-3, **kw)
    xs = batches(rank, channels_last, 4, seed)
    variables = module.init(__import__("jax").random.PRNGKey(0), xs[0], use_running_average=False)
    variables = {k: dict(v) for k, v in variables.items()}
    rng = np.random.default_rng(seed + 1)
    for name in variables.get("params", {}):
        variables["params"][name] = jnp.asarray(rng.uniform(0.5, 2, C).astype(np.float32))
    for x in xs[:3]:
        variables = flax_train(module, variables, [x])
    return module, variables, xs[3]


def flax_train(module, variables, xs):
    for x in xs:
        _, upd = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        variables = {**variables, "batch_stats": dict(upd["batch_stats"])}
    return variables


def flax_infer(module, variables, x):
    return np.asarray(module.apply(variables, x, use_running_average=True))


@pytest.mark.parametrize("rank,channels_last", [(2, True), (4, True), (4, False), (5, True)])
def test_from_flax_same_inference_and_running_stats(rank, channels_last):
    module, variables, x_eval = flax_bn(rank, channels_last, seed=rank)
    plain = from_flax(module, variables, ndim=rank)
    exact = from_flax(module, variables, ndim=rank, exact_training=True)
    anyrank = from_flax(module, variables)
    assert type(plain) is PLAIN[rank] and type(exact) is EXACT[rank] and type(anyrank) is BatchNormNd
    assert plain.eps == pytest.approx(2e-3) and plain.momentum == pytest.approx(0.2)
    y_flax = flax_infer(module, variables, x_eval)
    for bn in (plain, exact, anyrank):
        np.testing.assert_allclose(torch_infer(bn, x_eval, channels_last), y_flax, rtol=1e-4, atol=1e-4)
    xs = batches(rank, channels_last, 3, seed=20 + rank)
    variables = flax_train(module, variables, xs)
    torch_train(plain, xs, channels_last)
    torch_train(exact, xs, channels_last)
    mean_f, var_f = (np.asarray(variables["batch_stats"][k]) for k in ("mean", "var"))
    for bn in (plain, exact):
        np.testing.assert_allclose(bn.running_mean.numpy(), mean_f, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(exact.running_var.numpy(), var_f, rtol=1e-4, atol=1e-5)
    assert not np.allclose(plain.running_var.numpy(), var_f, rtol=1e-4)


@pytest.mark.parametrize("use_bias,use_scale", [(True, True), (False, True), (True, False), (False, False)])
def test_to_flax_round_trip_and_flags(use_bias, use_scale):
    if use_scale and not use_bias and "bias" not in inspect.signature(nn.BatchNorm1d.__init__).parameters:
        pytest.skip("a scale without a shift needs nn.BatchNorm's bias=False option (torch 2.11 has none)")
    module, variables, x_eval = flax_bn(4, True, seed=5, use_bias=use_bias, use_scale=use_scale)
    bn = from_flax(module, variables, ndim=4, exact_training=True)
    module2, variables2 = to_flax(bn, axis=-1)
    assert (module2.use_bias, module2.use_scale) == (use_bias, use_scale)
    assert module2.momentum == pytest.approx(0.8) and module2.epsilon == pytest.approx(2e-3)
    np.testing.assert_allclose(flax_infer(module2, variables2, x_eval), flax_infer(module, variables, x_eval),
                               rtol=1e-6, atol=1e-6)
    xs = batches(4, True, 2, seed=6)
    a, b = flax_train(module, variables, xs), flax_train(module2, variables2, xs)
    for k in ("mean", "var"):
        np.testing.assert_allclose(np.asarray(b["batch_stats"][k]), np.asarray(a["batch_stats"][k]), rtol=1e-6)


def test_an_nnx_batchnorm_is_named_and_the_suggested_linen_equivalent_works():
    nnx = pytest.importorskip("flax.nnx")
    linen = pytest.importorskip("flax.linen")
    jnp = pytest.importorskip("jax.numpy")
    m = nnx.BatchNorm(C, momentum=0.8, epsilon=1e-3, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for v in (m.scale, m.bias, m.mean):
        v[...] = jnp.asarray(rng.normal(size=C).astype(np.float32))
    m.var[...] = jnp.asarray(rng.uniform(0.5, 2, C).astype(np.float32))
    with pytest.raises(TypeError, match="got a flax.nnx.BatchNorm") as info:
        from_flax(m, {})
    # what the message says to pass instead gives the nnx layer's own output
    assert "linen.BatchNorm(axis=m.axis, momentum=m.momentum, epsilon=m.epsilon" in str(info.value)
    assert "leaving out 'scale' if not m.use_scale and 'bias' if not m.use_bias; then bn.eval() if " \
           "m.use_running_average" in " ".join(str(info.value).split())
    module = linen.BatchNorm(axis=m.axis, momentum=m.momentum, epsilon=m.epsilon, use_bias=m.use_bias,
                             use_scale=m.use_scale)
    variables = {"params": {"scale": m.scale[...], "bias": m.bias[...]},
                 "batch_stats": {"mean": m.mean[...], "var": m.var[...]}}
    bn = from_flax(module, variables, ndim=2)
    assert bn.momentum == pytest.approx(0.2) and bn.training  # an nnx layer in training mode: a training layer
    x = batches(2, True, 1, seed=0)[0]
    m.eval()
    np.testing.assert_allclose(torch_infer(bn, x, True), np.asarray(m(x)), rtol=1e-5, atol=1e-5)
    # an nnx layer in eval mode: eval() is a mode there; after train() nnx and torch update their statistics alike
    eval_bn = from_flax(module, variables, ndim=2)
    if m.use_running_average:
        eval_bn.eval()
    assert not eval_bn.training
    np.testing.assert_allclose(torch_infer(eval_bn, x, True), np.asarray(m(x)), rtol=1e-5, atol=1e-5)
    m.train()
    eval_bn.train()
    m(x)
    with torch.no_grad():
        eval_bn(to_first(x, True))
    np.testing.assert_allclose(eval_bn.running_mean.numpy(), np.asarray(m.mean[...]), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="got flax.linen.linear.Dense"):
        from_flax(linen.Dense(3), variables)
    # a layer without scale (its m.scale is None): the recipe leaves 'scale' out
    bare = nnx.BatchNorm(C, use_scale=False, rngs=nnx.Rngs(0))
    bare.eval()
    module = linen.BatchNorm(axis=bare.axis, momentum=bare.momentum, epsilon=bare.epsilon, use_bias=bare.use_bias,
                             use_scale=bare.use_scale)
    bn = from_flax(module, {"params": {"bias": bare.bias[...]},
                            "batch_stats": {"mean": bare.mean[...], "var": bare.var[...]}}, ndim=2).eval()
    np.testing.assert_allclose(torch_infer(bn, x, True), np.asarray(bare(x)), rtol=1e-5, atol=1e-5)


def test_a_flax_module_built_to_use_its_running_average_gives_frozen_statistics():
    """linen.BatchNorm(use_running_average=True) normalizes with its statistics in every call and never updates
    them; the torch layer trained with batch statistics and moved its running mean. Oracle: Flax's own step with
    mutable batch_stats, outputs and statistics; gamma/beta still get gradients, as Flax's scale/bias do."""
    linen = pytest.importorskip("flax.linen")
    rng = np.random.default_rng(0)
    module = linen.BatchNorm(use_running_average=True, momentum=0.9)
    variables = {"params": {"scale": rng.uniform(0.5, 2, C).astype(np.float32),
                            "bias": rng.normal(size=C).astype(np.float32)},
                 "batch_stats": {"mean": rng.normal(size=C).astype(np.float32),
                                 "var": rng.uniform(0.5, 2, C).astype(np.float32)}}
    bn = from_flax(module, variables, ndim=2)
    bn.train()  # a training loop's model.train() must not switch it to batch statistics
    x = rng.normal(2, 3, (8, C)).astype(np.float32)
    y_flax, updated = module.apply(variables, x, mutable=["batch_stats"])
    y = bn(torch.from_numpy(x))
    np.testing.assert_allclose(y.detach().numpy(), np.asarray(y_flax), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bn.running_mean.numpy(), np.asarray(updated["batch_stats"]["mean"]))
    y.sum().backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None
    assert from_flax(linen.BatchNorm(use_running_average=None), variables, ndim=2).training


@contextlib.contextmanager
def _to_flax_needing_x64(bn):
    """``to_flax(bn)`` refused without JAX's 64-bit mode, then run with it on: ``(module, variables)`` while it is
    on; the mode put back after."""
    jax = pytest.importorskip("jax")
    was = jax.config.read("jax_enable_x64")
    try:
        jax.config.update("jax_enable_x64", False)
        with pytest.raises(ValueError, match="jax_enable_x64"):
            to_flax(bn)
        jax.config.update("jax_enable_x64", True)
        yield to_flax(bn)
    finally:
        jax.config.update("jax_enable_x64", was)


def test_to_flax_float64_needs_jax_64_bit_mode_and_then_round_trips_exactly():
    bn = nn.BatchNorm2d(C, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.1, 1 / 3, 1e-9], dtype=torch.float64))  # not float32 numbers
    with _to_flax_needing_x64(bn) as (module, variables):
        assert module.param_dtype == np.float64 and variables["batch_stats"]["mean"].dtype == np.float64
        back = from_flax(module, variables, ndim=4)
    assert back.running_mean.dtype == torch.float64 and torch.equal(back.running_mean, bn.running_mean)


def test_float64_flax_parameters_beside_float32_batch_stats_are_not_rounded():
    """linen's init makes ``batch_stats`` float32 whatever ``param_dtype`` says: the torch layer took the statistics'
    dtype and rounded the float64 scale and bias to float32 (and then refused the float64 input Flax takes).
    Oracles: the closed form in float64 NumPy, and the Flax layer's output (whose ``rsqrt`` of the float32 variance
    is itself float32)."""
    jax = pytest.importorskip("jax")
    linen = pytest.importorskip("flax.linen")
    jnp = pytest.importorskip("jax.numpy")
    was = jax.config.read("jax_enable_x64")
    try:
        jax.config.update("jax_enable_x64", True)
        rng = np.random.default_rng(1)
        module = linen.BatchNorm(param_dtype=jnp.float64, dtype=jnp.float64, epsilon=1e-12)
        x = rng.normal(size=(8, 5, 5, C))
        variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x), use_running_average=True)
        variables = {"params": {"scale": jnp.asarray(1 + rng.normal(size=C) * 1e-3),
                                "bias": jnp.asarray(rng.normal(size=C))},
                     "batch_stats": {"mean": jnp.asarray(rng.normal(size=C).astype(np.float32)),
                                     "var": jnp.asarray(rng.uniform(0.5, 2, C).astype(np.float32))}}
        want = np.asarray(module.apply(variables, jnp.asarray(x), use_running_average=True))
    finally:
        jax.config.update("jax_enable_x64", was)
    bn = from_flax(module, variables, ndim=4).eval()
    assert bn.weight.dtype == bn.running_var.dtype == torch.float64
    assert np.array_equal(bn.weight.detach().numpy(), np.asarray(variables["params"]["scale"]))
    assert np.array_equal(bn.running_var.numpy(), np.asarray(variables["batch_stats"]["var"]).astype(np.float64))
    got = bn(torch.from_numpy(np.moveaxis(x, 3, 1).copy())).detach().numpy()
    p, st = variables["params"], {k: np.asarray(v).astype(np.float64) for k, v in variables["batch_stats"].items()}
    exact = (x - st["mean"]) / np.sqrt(st["var"] + 1e-12) * np.asarray(p["scale"]) + np.asarray(p["bias"])
    np.testing.assert_allclose(np.moveaxis(got, 1, 3), exact, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.moveaxis(got, 1, 3), want, rtol=1e-6, atol=1e-6)


@needs_keras
def test_to_keras_and_to_flax_refuse_the_same_channel_axes():
    pytest.importorskip("flax")
    for convert in (to_keras, to_flax):
        for axis in (4, -5):
            with pytest.raises(ValueError, match=f"axis={axis} is out of range for rank-4 input"):
                convert(nn.BatchNorm2d(C), axis=axis)
        with pytest.raises(ValueError, match="rank-2 input"):
            convert(nn.BatchNorm1d(C), axis=2)
        with pytest.raises(ValueError, match="ndim=3: BatchNorm2d takes rank-4 input"):
            convert(nn.BatchNorm2d(C), ndim=3)
        with pytest.raises(ValueError, match="rank-4 input"):
            convert(BatchNormNd(C), axis=4, ndim=4)
    module, variables = to_flax(nn.BatchNorm1d(C), axis=2, ndim=3)  # (N, L, C): channels last
    x = batches(3, True, 1, seed=0)[0]
    np.testing.assert_allclose(flax_infer(module, variables, x), torch_infer(nn.BatchNorm1d(C), x, True),
                               rtol=1e-5, atol=1e-5)
    assert to_flax(BatchNormNd(C), axis=-1)[0].axis == -1  # any rank and no ndim: nothing to check against


def test_flax_bad_input_is_refused():
    linen = pytest.importorskip("flax.linen")
    module, variables, _ = flax_bn(4, True)
    with pytest.raises(ValueError, match="ndim="):
        from_flax(module, variables, exact_training=True)
    swapped = {**variables, "batch_stats": {"mean": variables["batch_stats"]["var"] * 0 - 1,
                                            "var": variables["batch_stats"]["mean"] * 0 - 1}}
    with pytest.raises(ValueError, match="swapped"):
        from_flax(module, swapped, ndim=4)
    with pytest.raises(TypeError, match="flax.linen.BatchNorm"):
        from_flax(linen.Dense(3), variables)
    with pytest.raises(ValueError, match="single channel axis"):
        from_flax(linen.BatchNorm(axis=(1, 2), momentum=0.9, epsilon=1e-5), variables)
    with pytest.raises(ValueError, match="debias"):  # bias-corrected running statistics: Flax has no such rule
        to_flax(BatchNorm2d(C, debias=True))


def test_from_flax_with_the_wrong_variables_says_what_it_expects():
    module, variables, _ = flax_bn(4, True)
    for part in ("params", "batch_stats"):  # the common mix-up: one collection instead of the whole dict
        with pytest.raises(ValueError, match=r"not variables\['params'\] or variables\['batch_stats'\] alone"):
            from_flax(module, variables[part], ndim=4)
    for bad, got in ((None, "NoneType"), ([variables], "list")):
        with pytest.raises(ValueError, match=f"whole variables mapping.*got {got}"):
            from_flax(module, bad, ndim=4)
    with pytest.raises(ValueError, match="no 'batch_stats'"):
        from_flax(module, {"params": variables["params"]}, ndim=4)
    with pytest.raises(ValueError, match=r"variables\['params'\] must be a mapping, got list"):
        from_flax(module, {**variables, "params": [1.0]}, ndim=4)


# ----------------------------------------------------------------- SyncBatchNorm
class Mixed(nn.Module):
    """BN after Linear (rank 2), Conv1d (rank 3), Conv2d (rank 4), Conv3d (rank 5)."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn_fc = nn.Linear(8, 4), nn.BatchNorm1d(4, eps=1e-3)
        self.c1, self.bn1 = nn.Conv1d(1, 3, 3), nn.BatchNorm1d(3, momentum=0.3)
        self.c2, self.bn2 = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, affine=False)
        self.c3, self.bn3 = nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2, momentum=None)

    def forward(self, x):
        a = self.bn_fc(self.fc(x.flatten(1)[:, :8]))
        b = self.bn1(self.c1(x.flatten(1)[:, None, :16]))
        c = self.bn2(self.c2(x[:, :, 0]))
        d = self.bn3(self.c3(x))
        return torch.cat([a.flatten(1), b.flatten(1), c.flatten(1), d.flatten(1)], 1)


def trained(model, x, steps=3):
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x + torch.randn_like(x))
    return model


def test_revert_sync_bn_restores_the_original_with_flags():
    x = example_input("resnet", batch=6)
    torch.manual_seed(0)
    original = trained(SmallResNet(), x)
    original.layers[0].bn1.eval()  # mixed train/eval flags
    original.stem[1].weight.requires_grad_(False)  # frozen parameter
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(original))
    sync_before = copy.deepcopy(sync.state_dict())
    reverted = revert_sync_bn(sync, x)

    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())  # the input is untouched
    assert all(torch.equal(v, sync.state_dict()[k]) for k, v in sync_before.items())
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in reverted.modules())
    orig_mods, rev_mods = dict(original.named_modules()), dict(reverted.named_modules())
    assert orig_mods.keys() == rev_mods.keys()
    for name, m in orig_mods.items():
        r = rev_mods[name]
        assert type(r) is type(m) and r.training == m.training, name
    for (name, p), (_, q) in zip(original.named_parameters(), reverted.named_parameters()):
        assert p.requires_grad == q.requires_grad and torch.equal(p, q), name
    for k, v in original.state_dict().items():
        assert torch.equal(v, reverted.state_dict()[k]), k
    # same outputs and same running statistics after training steps (CPU: SyncBN runs F.batch_norm)
    a, b = copy.deepcopy(original), copy.deepcopy(reverted)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_revert_sync_bn_probes_a_layer_called_with_its_input_as_a_keyword():
    """``self.bn(input=x)``, PyTorch's parameter name: the rank probe read ``args[0]`` of an empty tuple
    (IndexError, review). Oracle: PyTorch's BatchNorm2d, which the 4-D input's layer becomes, with the source
    model's outputs."""
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.SyncBatchNorm(3)

        def forward(self, x):
            return self.bn(input=x)

    model = trained(Keyword(), torch.randn(8, 3, 5, 5)).eval()
    x = torch.randn(4, 3, 5, 5)
    reverted = revert_sync_bn(model, x)
    assert type(reverted.bn) is nn.BatchNorm2d
    with torch.no_grad():
        assert torch.equal(reverted(x), model(x))


def test_revert_sync_bn_leaves_subclasses_and_parametrized_layers_as_they_are_and_says_so():
    """A plain BatchNorm class dropped a subclass's own forward (outputs 3 apart) and a parametrization's weight
    property (AttributeError on the first call). Oracle: the source model's eval outputs."""
    from torch.nn.utils import parametrize

    class Doubled(nn.SyncBatchNorm):
        def forward(self, x):
            return super().forward(x) * 2

    class Positive(nn.Module):
        def forward(self, w):
            return w.abs() + 0.5

    x = torch.randn(4, C, 5, 5)
    model = nn.Sequential(nn.SyncBatchNorm(C), Doubled(C), nn.SyncBatchNorm(C)).eval()
    parametrize.register_parametrization(model[2], "weight", Positive())
    with torch.no_grad():
        model[0].running_mean.uniform_(-1, 1)
    expected = model(x)
    with pytest.warns(UserWarning, match=r"left 2 SyncBatchNorm layer\(s\) as they are: 1 \(class Doubled.*2 \("
                                         r"parametrized"):
        reverted = revert_sync_bn(model, x)
    assert type(reverted[0]) is nn.BatchNorm2d and type(reverted[1]) is Doubled
    assert isinstance(reverted[2], nn.SyncBatchNorm) and parametrize.is_parametrized(reverted[2], "weight")
    torch.testing.assert_close(reverted(x), expected, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's first import: torch.jit internals
def test_revert_sync_bn_of_a_wrapped_model_gives_the_module_inside_reverted(tmp_path):
    """DDP/DataParallel/torch.compile/AveragedModel: the probe ran DDP's own forward, which starts with a buffer
    broadcast (a collective: called on rank 0 only, as exports are, it waited for the process group's timeout),
    and the result was a DDP copy that torch's fuser cannot trace. Now the module inside is probed and returned,
    reverted. Oracle: the unwrapped model's own outputs and types; DDP in a gloo world of one."""
    import torch.distributed as dist
    from torch.optim.swa_utils import AveragedModel

    x = example_input("resnet", batch=6)
    torch.manual_seed(0)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(trained(SmallResNet(), x)).eval()
    with torch.no_grad():
        want = sync(x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for wrapper in (nn.DataParallel, lambda m: torch.compile(m, backend="eager"), AveragedModel):
            reverted = revert_sync_bn(wrapper(copy.deepcopy(sync)), x)
            assert type(reverted) is SmallResNet and not any(isinstance(m, nn.SyncBatchNorm)
                                                              for m in reverted.modules())
            assert isinstance(reverted.stem[1], nn.BatchNorm2d)
            device = next(reverted.parameters()).device  # DataParallel moved it to cuda:0 on a GPU machine
            with torch.no_grad():
                got = reverted.eval()(x.to(device)).cpu()
            torch.testing.assert_close(got, want, **({} if device.type == "cuda" else {"rtol": 0, "atol": 0}))
        ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
        reverted = revert_sync_bn(ddp, torch.randn(5, 4))
        assert type(reverted) is nn.Sequential and reverted[1] is not ddp.module[1]  # a copy, as without DDP
    finally:
        dist.destroy_process_group()


def test_a_sync_batchnorm_with_a_process_group_is_reverted_and_folded(tmp_path):
    """convert_sync_batchnorm(model, process_group=pg), the usual call: copying the model deep-copied the group,
    which cannot be pickled (TypeError from revert_sync_bn and fold_bn). Oracle: the same model converted without
    a group, reverted and folded, bit for bit; a gloo world of one."""
    import torch.distributed as dist

    x = example_input("resnet", batch=6)
    torch.manual_seed(0)
    plain = trained(SmallResNet(), x).eval()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain), process_group=group)
        ungrouped = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
        for args in ((), (x,)):
            reverted, want = revert_sync_bn(sync, *args), revert_sync_bn(ungrouped, *args)
            assert [type(m) for m in reverted.modules()] == [type(m) for m in want.modules()]
            assert all(torch.equal(a, b) for a, b in zip(reverted.state_dict().values(), want.state_dict().values()))
            assert sync.stem[1].process_group is group  # the original keeps its group
        folded, report = fold_bn(sync, x)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), fold_bn(ungrouped, x)[0](x), rtol=0, atol=0)
        assert report.n_folded == len(bn_layers(plain))
    finally:
        dist.destroy_process_group()


def test_reverted_model_fuses_with_no_bn_left():
    from torch.fx.experimental.optimization import fuse

    x = torch.randn(5, 1, 6, 6, 6)
    torch.manual_seed(0)
    original = trained(Mixed(), x).eval()
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(original))
    assert len(list(fuse(sync).graph.nodes)) == len(list(torch.fx.symbolic_trace(sync).graph.nodes))  # torch skips it
    reverted = revert_sync_bn(sync, x)
    for name in ("bn_fc", "bn1", "bn2", "bn3"):
        assert type(getattr(reverted, name)) is type(getattr(original, name)), name
        o, r = getattr(original, name), getattr(reverted, name)
        assert (r.eps, r.momentum, r.affine, r.track_running_stats) == (o.eps, o.momentum, o.affine,
                                                                        o.track_running_stats)
    fused = fuse(reverted)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)


def test_reverted_resnet_folds_with_fold_bn():
    x = example_input("resnet", batch=4)
    torch.manual_seed(0)
    original = trained(SmallResNet(), x).eval()
    reverted = revert_sync_bn(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(original)), x)
    folded, report = fold_bn(reverted, x)
    assert len(report.folded) == sum(isinstance(m, nn.BatchNorm2d) for m in original.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), original(x), rtol=1e-5, atol=1e-5)


def test_without_example_inputs_layers_take_any_rank_and_a_warning_says_so():
    x = torch.randn(5, 1, 6, 6, 6)
    torch.manual_seed(0)
    original = trained(Mixed(), x).eval()
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(original))
    with pytest.warns(UserWarning, match="bn_fc.*bn3"):
        reverted = revert_sync_bn(sync)
    assert all(type(getattr(reverted, n)) is BatchNormNd for n in ("bn_fc", "bn1", "bn2", "bn3"))
    with torch.no_grad():
        torch.testing.assert_close(reverted(x), original(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least 2D"):
        reverted.bn1(torch.randn(3))


def test_root_sync_bn_and_unreached_layers():
    layer = nn.SyncBatchNorm(4, eps=1e-4, momentum=0.05, track_running_stats=False)
    out = revert_sync_bn(layer, torch.randn(2, 4, 3, 3))
    assert type(out) is nn.BatchNorm2d and out.eps == 1e-4 and out.momentum == 0.05 and out.running_mean is None
    assert type(layer) is nn.SyncBatchNorm and not hasattr(out, "process_group")

    class Unreached(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.BatchNorm2d(2), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.used(x)

    sync = nn.SyncBatchNorm.convert_sync_batchnorm(Unreached())
    with pytest.warns(UserWarning, match="spare") as record:
        out = revert_sync_bn(sync, torch.randn(2, 2, 3, 3))
    assert "used" not in str(record[0].message).replace("seen", "")
    assert type(out.used) is nn.BatchNorm2d and type(out.spare) is BatchNormNd
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(revert_sync_bn(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2))[0]) is nn.Linear
    with pytest.raises(TypeError, match="nn.Module"):
        revert_sync_bn("not a model")


def test_a_layer_reached_at_rank_6_becomes_any_rank_with_the_warning():
    sync = nn.Sequential(nn.SyncBatchNorm(C, momentum=0.3), nn.Flatten(), nn.BatchNorm1d(C * 16))
    x = torch.randn(2, C, 2, 2, 2, 2)
    with pytest.warns(UserWarning, match=r"for 0 \(input ranks seen: \[6\]\)"):
        out = revert_sync_bn(sync, x)
    assert type(out[0]) is BatchNormNd and out[0].momentum == 0.3 and type(out[2]) is nn.BatchNorm1d
    torch.testing.assert_close(out(x), sync(x), rtol=0, atol=0)  # both in training mode, same batch statistics


def test_a_layer_reached_at_two_ranks_becomes_any_rank():
    # one SyncBatchNorm called on 4-D and 5-D inputs: a BatchNorm2d (or 3d) would refuse one of the two calls
    class TwoRanks(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.SyncBatchNorm(C)

        def forward(self, x):
            return self.bn(x).sum() + self.bn(x.unsqueeze(2)).sum()

    sync, x = TwoRanks().eval(), torch.randn(2, C, 4, 4)
    with pytest.warns(UserWarning, match=r"input ranks seen: \[4, 5\]"):
        out = revert_sync_bn(sync, x)
    assert type(out.bn) is BatchNormNd
    torch.testing.assert_close(out(x), sync(x), rtol=0, atol=0)


def test_only_a_tuple_is_spread_into_arguments():
    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.SyncBatchNorm(C)

        def forward(self, views, scale=1.0):
            return sum(self.bn(v) for v in views) * scale

    views = [torch.randn(2, C, 4, 4), torch.randn(2, C, 4, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the list reached the layer: no any-rank fallback
        assert type(revert_sync_bn(Views(), views).bn) is nn.BatchNorm2d
        assert type(revert_sync_bn(Views(), (views, 2.0)).bn) is nn.BatchNorm2d


def test_a_layer_registered_twice_stays_one_layer():
    shared = nn.SyncBatchNorm(2)  # (torch's convert_sync_batchnorm itself converts only the first reference)
    sync = nn.Sequential(nn.Conv2d(2, 2, 1), shared, nn.Conv2d(2, 2, 1), shared)
    out = revert_sync_bn(sync, torch.randn(3, 2, 4, 4))
    assert out[1] is out[3] and type(out[1]) is nn.BatchNorm2d


def test_a_frozen_sync_bn_stays_frozen_on_the_reverted_layer():
    sync = freeze_bn(nn.Sequential(nn.Conv2d(2, 2, 1), nn.SyncBatchNorm(2)), affine=False)
    out = revert_sync_bn(sync, torch.randn(3, 2, 4, 4))
    bn = out[1]
    assert type(bn) is nn.BatchNorm2d and is_frozen(bn, "stats")
    assert bn.train() is bn and not bn.training  # the freeze acts on the new layer, not on the discarded one
    unfreeze_bn(out)
    out.train()
    assert bn.training and not is_frozen(bn) and sync[1].train() is sync[1]


@needs_keras
def test_to_keras_reads_the_channels_of_a_lazy_layer_filled_by_load_state_dict():
    """PyTorch leaves its num_features at 0 ('torch config num_features must be a positive integer, got 0');
    Keras's layer gets the 4 channels its tensors hold and infers as PyTorch does."""
    torch.manual_seed(0)
    source = torch.nn.LazyBatchNorm2d()
    source(torch.randn(8, 4, 3, 3) * 2 + 1)
    lazy = torch.nn.LazyBatchNorm2d()
    lazy.load_state_dict(source.state_dict())
    assert lazy.num_features == 0
    layer = to_keras(lazy.eval(), axis=1)
    x = torch.randn(2, 4, 3, 3)
    got = keras.ops.convert_to_numpy(layer(x.numpy(), training=False))
    np.testing.assert_allclose(got, source.eval()(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_batchnormnd_converts_at_rank_6_and_matches_real_keras_and_flax():
    """Before: BatchNormNd (any rank; what revert_sync_bn makes beyond rank 5) was refused with ndim=6 though
    Keras and Flax take rank-6 input. Oracle: the real Keras/Flax layers' inference output vs the torch layer's."""
    pytest.importorskip("keras")
    jnp = pytest.importorskip("jax.numpy")

    from bnkit.torch import BatchNormNd, to_flax

    torch.manual_seed(0)
    bn = BatchNormNd(3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 2, 3, 2, 2)
    with torch.no_grad():
        want = bn(x).numpy()
    layer = to_keras(bn, ndim=6)
    got = layer(x.numpy(), training=False)
    np.testing.assert_allclose(np.asarray(got.detach().cpu() if hasattr(got, "detach") else got), want, rtol=1e-5,
                               atol=1e-6)
    module, variables = to_flax(bn, ndim=6)
    np.testing.assert_allclose(np.asarray(module.apply(variables, jnp.asarray(x.numpy()), use_running_average=True)),
                               want, rtol=1e-5, atol=1e-6)


def test_from_flax_refuses_a_channel_axis_the_stated_rank_lacks():
    """Before: from_flax(linen.BatchNorm(axis=3), ndim=2) gave a BatchNorm1d; to_flax refuses the same."""
    import flax.linen as linen

    module = linen.BatchNorm(axis=3, use_running_average=True)
    variables = {"params": {"scale": np.ones(3), "bias": np.zeros(3)},
                 "batch_stats": {"mean": np.zeros(3), "var": np.ones(3)}}
    with pytest.raises(ValueError, match="out of range for rank-2"):
        from_flax(module, variables, ndim=2)
    assert isinstance(from_flax(module, variables, ndim=4), nn.BatchNorm2d)
    for axis in ((3,), np.int64(3)):  # a one-axis tuple and a NumPy integer are checked too
        with pytest.raises(ValueError, match="out of range for rank-2"):
            from_flax(linen.BatchNorm(axis=axis, use_running_average=True), variables, ndim=2)
    for axis in (0, (0,), np.int64(0)):  # the batch axis, with or without ndim
        with pytest.raises(ValueError, match="batch axis"):
            from_flax(linen.BatchNorm(axis=axis, use_running_average=True), variables)


@pytest.mark.parametrize("option", ["renorm", "debias"])
def test_convert_bn_names_the_layers_without_running_statistics_and_changes_nothing(option):
    model = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 3), stem_bn=nn.BatchNorm2d(4), act=nn.ReLU(),
        conv2=nn.Conv2d(4, 4, 3), head_bn=nn.BatchNorm2d(4, track_running_stats=False),
        conv3=nn.Conv2d(4, 4, 1), tail_bn=nn.BatchNorm2d(4),
    ))
    stateless = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and not m.track_running_stats]
    assert stateless == ["head_bn"]
    before = [(n, m) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        convert_bn(model, **{option: True})
    message = str(info.value)
    assert "head_bn" in message
    assert "stem_bn" not in message and "tail_bn" not in message
    after = [(n, m) for n, m in model.named_modules()]
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))  # the same module objects
    assert all(type(m) is nn.BatchNorm2d for n, m in after if n.endswith("_bn"))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _mixed_dtype_layer(stats_dtype: torch.dtype, weight_dtype: torch.dtype) -> nn.BatchNorm2d:
    """A layer whose float64 tensors hold values float32 cannot (0.1, 1e-9, 1 + 1e-12, 1/3)."""
    bn = nn.BatchNorm2d(2)
    bn.running_mean = torch.tensor([0.1, 1e-9], dtype=stats_dtype)
    bn.running_var = torch.tensor([1 + 1e-12, 2.0], dtype=stats_dtype)
    bn.weight = nn.Parameter(torch.tensor([1 / 3, 1 + 1e-12], dtype=weight_dtype))
    bn.bias = nn.Parameter(torch.tensor([0.1, -1 / 3], dtype=weight_dtype))
    return bn


@pytest.mark.parametrize("stats_dtype,weight_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_to_keras_keeps_float64_tensors_of_a_layer_of_mixed_dtypes(stats_dtype, weight_dtype):
    """The Keras layer took the first weight's dtype: float64 statistics beside a float32 weight were rounded to
    float32 in silence (review). Oracle: the torch layer's own values."""
    pytest.importorskip("keras")
    bn = _mixed_dtype_layer(stats_dtype, weight_dtype)
    layer = to_keras(bn)
    assert layer.dtype == "float64"
    for name, t in (("moving_mean", bn.running_mean), ("moving_variance", bn.running_var), ("gamma", bn.weight),
                    ("beta", bn.bias)):
        np.testing.assert_array_equal(np.asarray(getattr(layer, name).numpy(), dtype=np.float64),
                                      t.detach().double().numpy(), err_msg=name)


@pytest.mark.parametrize("stats_dtype,weight_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_to_flax_refuses_any_float64_tensor_without_64_bit_mode_and_keeps_it_with(stats_dtype, weight_dtype):
    """Only the running mean's dtype was checked: a float64 weight beside float32 statistics became float32 in JAX
    without an error (review). Oracle: the torch layer's own values."""
    pytest.importorskip("flax")
    bn = _mixed_dtype_layer(stats_dtype, weight_dtype)
    with _to_flax_needing_x64(bn) as (module, variables):
        assert module.param_dtype == np.float64
        got = {"mean": variables["batch_stats"]["mean"], "var": variables["batch_stats"]["var"],
               "scale": variables["params"]["scale"], "bias": variables["params"]["bias"]}
        for name, t in (("mean", bn.running_mean), ("var", bn.running_var), ("scale", bn.weight), ("bias", bn.bias)):
            np.testing.assert_array_equal(np.asarray(got[name], dtype=np.float64), t.detach().double().numpy(),
                                          err_msg=name)


def test_to_flax_gives_float16_statistics_the_layers_widest_dtype():
    """Float16 statistics beside a float32 weight stayed float16 in the Flax variables, and Flax adds eps in the
    variance's dtype: 1 + 1e-5 is 1 in float16, so the output was 1 where it is 1/sqrt(1 + 1e-5) (review).
    Oracles: that closed form, and the torch layer made float32."""
    pytest.importorskip("flax")
    jnp = pytest.importorskip("jax.numpy")
    bn = nn.BatchNorm1d(1).eval()
    bn.running_var = torch.ones(1, dtype=torch.float16)
    bn.running_mean = torch.zeros(1, dtype=torch.float16)
    module, variables = to_flax(bn)
    assert {str(v.dtype) for d in variables.values() for v in d.values()} == {"float32"}
    out = np.asarray(module.apply(variables, jnp.ones((1, 1), dtype=jnp.float32), use_running_average=True))
    want = 1 / np.sqrt(1 + 1e-5)
    np.testing.assert_allclose(out, [[want]], rtol=1e-6)
    np.testing.assert_allclose(out, bn.float()(torch.ones(1, 1)).detach().numpy(), rtol=1e-6)


def test_to_keras_and_to_flax_convert_a_parametrized_weight_as_the_layer_computes_with_it():
    """A parametrization on the weight (``w.abs()``): its state dict's ``parametrizations.weight.original`` was
    refused as an unexpected state-dict entry (review). Oracle: the torch layer's own eval outputs."""
    pytest.importorskip("flax")
    keras = pytest.importorskip("keras")
    jnp = pytest.importorskip("jax.numpy")
    from torch.nn.utils import parametrize

    class Abs(nn.Module):
        def forward(self, w):
            return w.abs()

    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([-1.5, 2.0, -0.5]))
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    parametrize.register_parametrization(bn, "weight", Abs())
    x = torch.randn(8, 3)
    with torch.no_grad():
        want = bn(x).numpy()
    module, variables = to_flax(bn)
    np.testing.assert_allclose(np.asarray(module.apply(variables, jnp.asarray(x.numpy()), use_running_average=True)),
                               want, rtol=1e-6, atol=1e-6)
    layer = to_keras(bn)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x.numpy(), training=False)), want, rtol=1e-6,
                               atol=1e-6)
    assert parametrize.is_parametrized(bn, "weight")  # the layer is left as it was


@pytest.mark.parametrize("convert", ["to_keras", "to_flax"])
def test_to_keras_and_to_flax_refuse_a_layer_on_the_meta_device_naming_it(convert):
    """A layer built on device='meta' failed deep in the copy (NotImplementedError: Cannot copy out of meta tensor,
    review); fold, export and the audit name it. Oracle: the refusal those give."""
    pytest.importorskip("keras" if convert == "to_keras" else "flax")
    with pytest.raises(ValueError, match=r"BatchNorm2d holds meta tensors .* load real weights first"):
        globals()[convert](nn.BatchNorm2d(3, device="meta"))


@pytest.mark.parametrize("flag", [np.True_, 1])
def test_a_flax_module_whose_field_is_any_true_value_gives_frozen_statistics(flag):
    """Flax tests use_running_average by its truth: np.True_ or 1 in the field freezes the statistics as True does.
    bnkit froze only for the object True: the torch layer trained on batch statistics (4.8 off Flax's output).
    Oracle: Flax's own training-style call with mutable batch_stats."""
    linen = pytest.importorskip("flax.linen")
    module = linen.BatchNorm(use_running_average=flag, momentum=0.9)
    variables = flax_bn(2, True)[1]
    bn = from_flax(module, variables, ndim=2)
    bn.train()
    x = np.random.default_rng(1).normal(2, 3, (8, C)).astype(np.float32)
    y_flax, updated = module.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(bn(torch.from_numpy(x)).detach().numpy(), np.asarray(y_flax), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bn.running_mean.numpy(), np.asarray(updated["batch_stats"]["mean"]))


def test_to_flax_keeps_frozen_statistics_so_a_frozen_module_round_trips():
    """from_flax freezes a use_running_average=True module's statistics; to_flax gave back a module that left the
    field to the call, so calling it as the source was called failed and a training call moved the statistics.
    Oracle: the source Flax module's own training-style call; a layer not frozen still leaves the field unset."""
    linen = pytest.importorskip("flax.linen")
    source = linen.BatchNorm(use_running_average=True, momentum=0.9)
    variables = flax_bn(2, True)[1]
    module, back = to_flax(from_flax(source, variables, ndim=2))
    assert module.use_running_average is True
    x = np.random.default_rng(2).normal(2, 3, (8, C)).astype(np.float32)
    y_src, upd_src = source.apply(variables, x, mutable=["batch_stats"])
    y, upd = module.apply(back, x, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_src), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(upd["batch_stats"]["mean"]), np.asarray(upd_src["batch_stats"]["mean"]))
    assert to_flax(nn.BatchNorm1d(C).eval())[0].use_running_average is None  # eval is a mode, not a freeze
    layer = copy.deepcopy(from_flax(source, variables, ndim=2))
    assert to_flax(layer)[0].use_running_average is True  # the copy keeps the freeze it came with
    unfreeze_bn(layer)
    assert to_flax(layer)[0].use_running_average is None
    assert to_flax(freeze_bn(layer))[0].use_running_average is None  # a freeze of torch's own: left to the call
    swapped = revert_bn(convert_bn(from_flax(source, variables, ndim=2)))  # re-typed: the freeze goes along
    assert is_frozen(swapped, "stats") and to_flax(swapped)[0].use_running_average is True


def test_to_flax_of_a_layer_frozen_in_torch_keeps_the_usual_flax_call():
    """A layer freeze_bn froze in torch (not one from_flax made) gives a module called as Flax models call BN:
    with use_running_average at the call, which Flax refuses where the field is set. Oracle: the torch layer."""
    linen = pytest.importorskip("flax.linen")
    bn = nn.BatchNorm1d(C)
    with torch.no_grad():
        bn.running_mean.normal_(generator=torch.Generator().manual_seed(0))
    module, variables = to_flax(freeze_bn(bn))
    assert module.use_running_average is None
    x = np.random.default_rng(3).normal(size=(8, C)).astype(np.float32)

    class Net(linen.Module):
        @linen.compact
        def __call__(self, x, train):
            return module.clone(parent=self, name="bn")(x, use_running_average=not train)

    got = Net().apply({"params": {"bn": variables["params"]}, "batch_stats": {"bn": variables["batch_stats"]}}, x,
                      train=False)
    np.testing.assert_allclose(np.asarray(got), bn(torch.from_numpy(x)).detach().numpy(), rtol=1e-6, atol=1e-6)


@needs_keras
@pytest.mark.parametrize("ndim", [4.5, "4", True])
def test_conversions_refuse_a_rank_that_is_not_an_integer(ndim):
    """ndim went through int(): 4.5 or "4" silently became rank 4 (the axis= beside it is checked)."""
    pytest.importorskip("flax")
    module, variables, _ = flax_bn(4, True)
    for convert in (lambda: to_keras(nn.BatchNorm2d(C), ndim=ndim), lambda: to_flax(nn.BatchNorm2d(C), ndim=ndim),
                    lambda: from_flax(module, variables, ndim=ndim)):
        with pytest.raises(TypeError, match="ndim must be an integer"):
            convert()
    for rank in (np.int64(4), np.array(4), torch.tensor(4)):  # integers NumPy and torch hold: operator.index
        assert isinstance(from_flax(module, variables, ndim=rank), nn.BatchNorm2d)


@needs_keras
def test_exact_training_must_be_a_bool():
    """exact_training="no" was true and gave the exact-training layer."""
    pytest.importorskip("flax")
    module, variables, _ = flax_bn(4, True)
    keras = pytest.importorskip("keras")
    layer = keras.layers.BatchNormalization()
    layer.build((2, 3, 4, C))
    for flag in ("no", 1):
        for convert in (lambda: from_flax(module, variables, ndim=4, exact_training=flag),
                        lambda: from_keras(layer, exact_training=flag)):
            with pytest.raises(TypeError, match="exact_training must be True or False"):
                convert()
    for flag in (np.True_, np.array(True), torch.tensor(True)):
        assert isinstance(from_flax(module, variables, ndim=4, exact_training=flag), BatchNorm2d)
