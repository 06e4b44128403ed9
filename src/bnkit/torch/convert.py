"""BatchNorm layers between PyTorch and Keras / Flax, and ``SyncBatchNorm`` back to ``BatchNorm*d``.

The weights and hyper-parameters go through :func:`bnkit.convert_state`, so eps is carried
(never left at the target's default), momentum is flipped to the target's side (PyTorch's
weighs the *new* batch statistic, Keras's and Flax's the *old* running value: torch 0.01 is
Keras 0.99), and Keras ``center``/``scale`` / Flax ``use_bias``/``use_scale`` map to torch's
``affine``/``bias``. Sources: keras/src/layers/normalization/batch_normalization.py
(``build``, ``call``), flax/linen/normalization.py (``BatchNorm``), torch/nn/modules/batchnorm.py
(``_BatchNorm``, ``SyncBatchNorm``).

**Running variance.** Keras and Flax update ``var_r = m * var_r + (1 - m) * M2/n`` with the
*biased* batch variance; ``nn.BatchNorm*d`` feeds the *unbiased* ``M2/(n-1)``. Inference is
the same, but a converted plain ``nn.BatchNorm*d`` trained on drifts from the source layer
(each update's batch term is ``n/(n-1)`` times larger). ``exact_training=True`` returns
bnkit's drop-in layer (:class:`bnkit.torch.BatchNorm2d` ...) with ``running_var_rule="biased"``,
whose running statistics follow the source's rule exactly. The other way, a Keras/Flax layer
made from a plain torch layer follows the biased rule from then on.

Layout: torch layers are channels-first (channels on dim 1). A Keras/Flax layer with
``axis=-1`` (channels-last) gives the same output as the torch layer after moving the
channel axis to dim 1.
"""
from __future__ import annotations

import functools
import inspect
import operator
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from ..convert import convert_state
from . import layers
from .freeze import freeze_bn, is_frozen, stats_freeze
from .io import LOAD_REAL_WEIGHTS, refuse_meta
from .modules import (as_args, channels, check_channel_tensors, deep_copy, parallel_device, require_eager, to_device,
                      unwrapped)

__all__ = ["BatchNormNd", "from_keras", "to_keras", "from_flax", "to_flax", "revert_sync_bn"]

_PLAIN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_EXACT = {1: layers.BatchNorm1d, 2: layers.BatchNorm2d, 3: layers.BatchNorm3d}
_RANK_DIMS = {2: 1, 3: 1, 4: 2, 5: 3}  # input rank (with batch and channel axes) -> the d of BatchNorm{d}d


class BatchNormNd(_BatchNorm):
    """``nn.BatchNorm*d`` for input of any rank ``(N, C, *)``, as ``SyncBatchNorm`` accepts.

    Same math and buffers as ``nn.BatchNorm1d/2d/3d`` (momentum weighs the new value, the
    unbiased batch variance feeds ``running_var``); only the input-rank check is relaxed. Made
    when the rank a layer sees is unknown; PyTorch's fusers match the exact ``BatchNorm*d``
    types and skip it.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


# ----------------------------------------------------------------- optional frameworks
def _import_keras():
    try:
        import keras
    except ImportError as exc:
        raise ImportError(
            "Keras 3 is needed for this conversion: pip install \"bnkit[test]\" (or pip install keras), and set "
            f"KERAS_BACKEND=torch to run it on PyTorch ({exc})"
        ) from exc
    return keras


def _import_flax():
    try:
        import flax.linen as linen
        import jax
    except ImportError as exc:
        raise ImportError(
            f"Flax is needed for this conversion: pip install \"bnkit[test]\" (or pip install flax) ({exc})"
        ) from exc
    return linen, jax


# ----------------------------------------------------------------- building the torch layer
def _checked_ndim(ndim: Any) -> int | None:
    """``ndim`` as an int (None: not given): an integer, also a 0-d integer array or tensor (``operator.index``);
    ``4.5``, ``"4"`` or a bool is no rank (TypeError)."""
    if ndim is None:
        return None
    try:
        if np.asarray(ndim).dtype.kind == "b":
            raise TypeError
        return operator.index(ndim)
    except TypeError:
        raise TypeError(f"ndim must be an integer (the input's rank), got {ndim!r} ({type(ndim).__name__})") from None


def _checked_flag(name: str, value: Any) -> bool:
    """A keyword flag: a bool, also a 0-d boolean array or tensor (``exact_training="no"`` or 1 is refused)."""
    try:
        flag = np.asarray(value)
    except (TypeError, ValueError, RuntimeError):
        flag = None
    if flag is None or flag.dtype.kind != "b" or flag.ndim != 0:
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(flag)


def _rank_to_dims(ndim: int | None) -> int | None:
    """Input rank (with batch and channel axes) -> the ``d`` of ``BatchNorm{d}d``; None for an unknown rank and
    for ranks above 5 (:class:`BatchNormNd` takes those; ranks below 2 fail the channel-axis check first)."""
    return None if ndim is None else _RANK_DIMS.get(ndim)


def _build_torch(state: dict, dims: int | None, exact_training: bool, scale: bool = True) -> _BatchNorm:
    """A torch BN layer from :func:`convert_state`'s torch layout, in the widest of its floating arrays' dtypes
    (Flax keeps ``batch_stats`` in float32 beside float64 parameters: nothing is rounded; a torch layer has one).

    ``scale=False``: the source has a shift but no scale (Keras ``scale=False``, Flax ``use_scale=False``); torch
    has no such layer, so the weight of 1 that stands in for it is made not to train (``requires_grad=False``)
    and the layer is marked (:data:`_NO_SCALE`) for :func:`_unit_scale_frozen`.
    """
    cfg, sd = state["config"], state["state_dict"]
    tensors = {name: torch.from_numpy(np.asarray(value)) for name, value in sd.items()}
    if not cfg["bias"] and "bias" not in inspect.signature(_BatchNorm.__init__).parameters:
        raise ValueError(f"a layer with a scale but no shift (Keras center=False, Flax use_bias=False) needs "
                         f"nn.BatchNorm's bias=False option, which torch {torch.__version__} does not have")
    kwargs = {"eps": cfg["eps"], "momentum": cfg["momentum"], "affine": cfg["affine"],
              "track_running_stats": cfg["track_running_stats"],
              "dtype": functools.reduce(torch.promote_types,
                                        [t.dtype for t in tensors.values() if t.is_floating_point()]),
              **({} if cfg["bias"] else {"bias": False})}  # releases without that option, as in layers.py
    if exact_training:
        if dims is None:
            raise ValueError("exact_training=True returns bnkit's BatchNorm1d/2d/3d, which needs the input rank, 2-5 "
                             "(from_flax: ndim=)")
        bn = _EXACT[dims](cfg["num_features"], running_var_rule="biased", **kwargs)
    else:
        bn = (_PLAIN[dims] if dims is not None else BatchNormNd)(cfg["num_features"], **kwargs)
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(bn, name).copy_(value)
    if not scale and bn.weight is not None:
        bn.weight.requires_grad_(False)
        setattr(bn, _NO_SCALE, True)
    return bn


#: Instance attribute marking a layer :func:`from_flax` froze for a module built with ``use_running_average`` true,
#: which :func:`to_flax` gives back while that freeze lasts: it holds the freeze (:func:`stats_freeze`), so one
#: made after ``unfreeze_bn`` is ``freeze_bn``'s own (kept by deepcopy and pickle, which keep the two one object).
_FLAX_FROZEN = "_bnkit_flax_use_running_average"

#: Instance attribute marking a layer whose weight :func:`_build_torch` made to stand in for no scale (kept by
#: deepcopy and pickle, not by a state dict).
_NO_SCALE = "_bnkit_no_scale"


def _from_frozen_flax(bn: _BatchNorm) -> bool:
    """Whether ``bn`` still has the statistics freeze :func:`from_flax` gave it for ``use_running_average``."""
    freeze = stats_freeze(bn)
    return freeze is not None and vars(bn).get(_FLAX_FROZEN) is freeze


def _unit_scale_frozen(bn: _BatchNorm) -> bool:
    """Whether ``bn``'s weight is a stand-in for no scale: one :func:`from_keras`/:func:`from_flax` made of a source
    without a scale, still all ones and not trained, beside a shift; Keras/Flax then get none. A weight of ones
    that is merely frozen (a Keras ``scale=True, trainable=False`` layer not trained yet, ``freeze_bn``) is a
    scale."""
    return (bool(vars(bn).get(_NO_SCALE)) and bn.weight is not None and bn.bias is not None
            and not bn.weight.requires_grad and bool(torch.all(bn.weight == 1)))


def _torch_state(bn: _BatchNorm) -> dict:
    """``bn`` in :func:`convert_state`'s torch layout."""
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"expected a torch BatchNorm layer, got {type(bn).__name__}")
    if isinstance(bn, LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(f"{type(bn).__name__} is not initialized yet: run one input through it first")
    if getattr(bn, "renorm", False) or getattr(bn, "virtual_batch_size", None) or getattr(bn, "debias", False):
        raise ValueError(f"{type(bn).__name__} uses renorm/virtual_batch_size/debias, which Keras and Flax lack")
    check_channel_tensors([("", bn)])
    sd = bn.state_dict()  # tensors: convert_state reads them (bfloat16 as float32)
    if parametrize.is_parametrized(bn):  # the value the layer computes with, not its parametrization's entries
        sd = {k: v for k, v in sd.items() if not k.startswith("parametrizations.")}
        sd.update((name, getattr(bn, name).detach()) for name in bn.parametrizations)
    refuse_meta(sd.items(), f"the {type(bn).__name__}", LOAD_REAL_WEIGHTS)
    config = {"num_features": channels(bn), "eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine,
              "bias": bn.bias is not None or not bn.affine, "track_running_stats": bn.track_running_stats}
    return {"state_dict": sd, "config": config}


_TYPE_RANKS = (((nn.BatchNorm2d, nn.LazyBatchNorm2d), (4,)), ((nn.BatchNorm3d, nn.LazyBatchNorm3d), (5,)),
               ((nn.BatchNorm1d, nn.LazyBatchNorm1d), (2, 3)))


def _torch_rank(bn: _BatchNorm, ndim: int | None) -> int | None:
    """The rank of ``bn``'s input: ``ndim`` if given, else the one its type takes (``BatchNorm1d``: 2); None: any."""
    takes = next((ranks for types, ranks in _TYPE_RANKS if isinstance(bn, types)), None)
    ndim = _checked_ndim(ndim)
    if ndim is None:
        return None if takes is None else takes[0]
    if takes is None:  # bnkit's BatchNormNd: any rank with a batch and a channel axis
        if ndim < 2:
            raise ValueError(f"ndim={ndim}: BatchNorm input has a batch and a channel axis (rank >= 2)")
        return ndim
    if ndim not in takes:
        raise ValueError(f"ndim={ndim}: {type(bn).__name__} takes rank-{' or '.join(map(str, takes))} input")
    return ndim


def _check_axis(axis: int, rank: int | None) -> None:
    """Refuse a Keras/Flax channel ``axis`` that rank-``rank`` input does not have (None: rank unknown), or that
    is its batch axis 0."""
    if rank is not None and not -rank <= axis < rank:
        raise ValueError(f"axis={axis} is out of range for rank-{rank} input (ndim= states the input's rank)")
    if axis == 0 or (rank is not None and axis == -rank):
        raise ValueError(f"axis={axis} is the batch axis of rank-{rank or 'any'} input, not a channel axis")


# ----------------------------------------------------------------- Keras
def from_keras(layer: Any, *, exact_training: bool = False) -> _BatchNorm:
    """A channels-first torch layer equal to a built ``keras.layers.BatchNormalization``.

    ``BatchNorm1d/2d/3d`` is picked from the rank Keras built the layer for (2-3, 4, 5; above 5
    :class:`BatchNormNd`); eps
    is carried and momentum flipped (Keras 0.99 -> torch 0.01), so inference output matches
    the Keras layer's after moving its ``axis`` to dim 1, and the running mean matches after
    the same training batches. A plain ``nn.BatchNorm*d`` feeds the *unbiased* batch variance
    to ``running_var`` where Keras feeds the *biased* one (a factor ``n/(n-1)`` on each
    update's batch term); ``exact_training=True`` returns bnkit's drop-in layer with
    ``running_var_rule="biased"``, whose running variance then matches too.

    A Keras BN with ``trainable=False`` normalizes with its moving statistics even in training
    and never updates them: the torch layer is returned in eval mode with frozen parameters
    (keep it in eval, e.g. with ``bnkit.torch.freeze_bn``); one without gamma and beta
    (``center=False, scale=False``) has no parameters to mark it, so it is returned with its
    statistics frozen by ``freeze_bn`` (eval mode that ``train()`` keeps). Otherwise it is in training mode,
    as a new torch layer is. A layer with a shift but no scale (``scale=False, center=True``) gets
    torch's weight of 1 in its place, with ``requires_grad=False`` so that training does not grow
    a scale the source lacks. A gamma or beta variable of its own marked ``trainable=False`` gives its parameter
    ``requires_grad=False``. ``renorm=True`` is refused (no equivalent). The torch layer has the
    Keras weights' dtype; bfloat16 weights give a float32 layer (which holds them exactly).
    """
    exact_training = _checked_flag("exact_training", exact_training)
    keras = _import_keras()
    if not isinstance(layer, keras.layers.BatchNormalization):
        raise TypeError(f"expected a keras.layers.BatchNormalization, got {type(layer).__name__}")
    if not layer.built or layer.moving_mean is None:
        raise ValueError("the Keras layer is not built: call it on an input (or layer.build(shape)) first")
    names = ("gamma", "beta", "moving_mean", "moving_variance")
    weights = {n: keras.ops.convert_to_numpy(getattr(layer, n)) for n in names if getattr(layer, n) is not None}
    state = convert_state({"weights": weights, "config": layer.get_config()}, "keras", "torch")
    ndim = layer.input_spec.ndim if layer.input_spec is not None else None
    bn = _build_torch(state, _rank_to_dims(ndim), exact_training, scale=layer.scale)
    for param, variable in ((bn.weight, layer.gamma), (bn.bias, layer.beta)):
        if param is not None and variable is not None and not variable.trainable:  # gamma alone frozen, say
            param.requires_grad_(False)
    if not layer.trainable:
        bn.requires_grad_(False)
        bn.eval()
        if not bn.affine:  # no parameters to carry the freeze: freeze_bn's marker does (to_keras reads it)
            freeze_bn(bn)
    return bn


def to_keras(bn: _BatchNorm, *, axis: int = 1, ndim: int | None = None) -> Any:
    """A built ``keras.layers.BatchNormalization`` equal to the torch layer ``bn``.

    ``axis=1`` keeps the torch layout (channels first); ``axis=-1`` gives the channels-last
    layer Keras models usually hold. The layer is built for the rank ``bn`` takes
    (``BatchNorm2d``: 4, ``BatchNorm3d``: 5, ``BatchNorm1d``: 2, or ``ndim=`` for ``(N, C, L)``
    input and for layers of any rank). eps is carried and momentum flipped (torch 0.1 ->
    Keras 0.9). The Keras layer feeds its moving variance the *biased* batch variance from
    now on, as bnkit's ``running_var_rule="biased"`` layers do and ``nn.BatchNorm*d`` does not.
    ``momentum=None``, ``track_running_stats=False`` and the drop-in's renorm/ghost-batch
    extras have no Keras equivalent and are refused. The Keras layer has ``bn``'s dtype, except
    that a bfloat16 layer gives a float32 one (which holds its values exactly), and a layer whose tensors differ
    in dtype (float64 statistics beside a float32 weight) the widest of them: nothing is rounded. A weight of all
    ones that :func:`from_keras` or :func:`from_flax` made to stand in for no scale (``scale=False``), still
    not trained, gives ``scale=False``; any other weight is a scale, all ones and frozen included.

    A layer in eval mode whose parameters all have ``requires_grad=False`` (what
    :func:`from_keras` makes of a ``trainable=False`` Keras layer, or ``freeze_bn(affine=True)``),
    or a layer without parameters whose statistics ``freeze_bn`` froze, gives ``trainable=False``:
    Keras then normalizes with the moving statistics even in training and never updates them, as
    the torch layer does while it stays in eval. Any other layer gives ``trainable=True``, a layer
    without parameters that is merely in eval mode included (eval mode alone is how torch runs
    inference, not a freeze; Keras has no frozen-statistics layer with trainable gamma/beta). A weight or bias
    with ``requires_grad=False`` gives a gamma or beta variable with ``trainable=False`` in any case.
    """
    keras = _import_keras()
    torch_state = _torch_state(bn)
    rank = _torch_rank(bn, ndim)
    if rank is None:
        raise ValueError(f"{type(bn).__name__} accepts any input rank: pass ndim= (the rank of its input)")
    k = convert_state(torch_state, "torch", "keras", axis=axis)
    cfg, weights = k["config"], k["weights"]
    if _unit_scale_frozen(bn):
        cfg["scale"] = False
        del weights["gamma"]
    _check_axis(cfg["axis"], rank)
    dtype = str(np.result_type(*weights.values()))  # the widest: float64 statistics beside a float32 weight stay
    layer = keras.layers.BatchNormalization(**cfg, dtype=dtype)
    shape = [None] * rank
    shape[cfg["axis"]] = channels(bn)
    layer.build(tuple(shape))
    for name, value in weights.items():
        getattr(layer, name).assign(value)
    for param, name in ((bn.weight, "gamma"), (bn.bias, "beta")):
        if param is not None and name in weights and not param.requires_grad:  # one parameter frozen, say
            getattr(layer, name).trainable = False
    params = [p for p in (bn.weight, bn.bias) if p is not None]
    if not bn.training and (not any(p.requires_grad for p in params) if params else is_frozen(bn, "stats")):
        layer.trainable = False
    return layer


# ----------------------------------------------------------------- Flax
def from_flax(module: Any, variables: Mapping, *, ndim: int | None = None,
              exact_training: bool = False) -> _BatchNorm:
    """A channels-first torch layer equal to ``flax.linen.BatchNorm`` with its ``variables``.

    ``variables`` is the layer's ``{"params": {scale, bias}, "batch_stats": {mean, var}}``.
    Flax modules do not know their input rank: pass ``ndim`` (2-5) to get ``BatchNorm1d/2d/3d``,
    or get :class:`BatchNormNd`, which takes any rank (also for ``ndim`` above 5). Guarantees and
    ``use_scale=False`` as :func:`from_keras`: eps
    carried, momentum flipped (Flax 0.99 -> torch 0.01), the same inference output after moving
    Flax's ``axis`` to dim 1; ``exact_training=True`` (needs ``ndim``) follows Flax's biased
    running-variance rule exactly. A module built with ``use_running_average=True`` (or any true value, as Flax
    tests it: ``np.True_``, 1; its field, which no call can override) always normalizes with its statistics and
    never updates them: the torch layer's statistics are frozen by ``freeze_bn(bn, affine=False)`` (eval mode
    that ``train()`` keeps; gamma/beta still train, as Flax's do). Otherwise (``None``, the usual field left to
    the call, or ``False``) it is in training mode, as a new torch layer is.
    """
    ndim, exact_training = _checked_ndim(ndim), _checked_flag("exact_training", exact_training)
    linen, _ = _import_flax()
    if not isinstance(module, linen.BatchNorm):
        cls = type(module)
        if cls.__module__.startswith("flax.nnx") and cls.__name__ == "BatchNorm":
            raise TypeError(
                "expected a flax.linen.BatchNorm, got a flax.nnx.BatchNorm (Flax's NNX API, which holds its own "
                "state): for an nnx layer m pass linen.BatchNorm(axis=m.axis, momentum=m.momentum, epsilon=m.epsilon, "
                "use_bias=m.use_bias, use_scale=m.use_scale) and variables "
                "{'params': {'scale': m.scale[...], 'bias': m.bias[...]}, 'batch_stats': {'mean': m.mean[...], "
                "'var': m.var[...]}}, leaving out 'scale' if not m.use_scale and 'bias' if not m.use_bias; then "
                "bn.eval() if m.use_running_average (nnx's eval() sets it and train() clears it: a mode, as torch's "
                "eval() is, where linen's use_running_average=True would freeze the statistics for good)"
            )
        raise TypeError(f"expected a flax.linen.BatchNorm, got {cls.__module__}.{cls.__qualname__}")
    axis = module.axis[0] if isinstance(module.axis, (tuple, list)) and len(module.axis) == 1 else module.axis
    if isinstance(axis, (int, np.integer)):  # the channel axis must exist in input of the stated rank, and not be 0
        _check_axis(int(axis), ndim)
    config = {"axis": module.axis, "momentum": module.momentum, "epsilon": module.epsilon,
              "use_bias": module.use_bias, "use_scale": module.use_scale}
    # the module's own field, not the call's: set and true (np.True_, 1: Flax tests its truth), it never uses batch
    # statistics; read before anything is built, so a field with no truth value fails first
    frozen = module.use_running_average is not None and bool(module.use_running_average)
    state = convert_state({"variables": variables, "config": config}, "flax", "torch")
    bn = _build_torch(state, _rank_to_dims(ndim), exact_training, scale=module.use_scale)
    if frozen:
        freeze_bn(bn, affine=False)
        setattr(bn, _FLAX_FROZEN, stats_freeze(bn))
    return bn


def to_flax(bn: _BatchNorm, *, axis: int = 1, ndim: int | None = None) -> tuple[Any, dict]:
    """``(flax.linen.BatchNorm, variables)`` equal to the torch layer ``bn``.

    ``axis=1`` keeps the torch layout; ``axis=-1`` is Flax's usual channels-last. ``axis`` must
    exist in ``bn``'s input, whose rank is the one ``bn`` takes (``BatchNorm2d``: 4,
    ``BatchNorm3d``: 5, ``BatchNorm1d``: 2) or ``ndim=`` (3 for ``BatchNorm1d``'s ``(N, C, L)``
    input); a layer of any rank is checked only with ``ndim=``. The module
    leaves ``use_running_average`` to the call, as Flax models usually do:
    ``module.apply(variables, x, use_running_average=True)`` for inference, ``False`` with
    ``mutable=["batch_stats"]`` for training (biased running-variance rule from then on). A layer
    :func:`from_flax` made of a module built with ``use_running_average=True``, its statistics still frozen,
    gives that module back (called without the keyword; it never updates them); a layer frozen by ``freeze_bn``
    otherwise is left to the call as any other (Flax refuses the keyword where the field is set).
    eps is carried and momentum flipped (torch 0.1 -> Flax 0.9). The variables and
    the module's ``param_dtype`` have the widest of ``bn``'s tensors' dtypes (bfloat16 counted as float32, which
    holds it exactly): Flax adds eps to float16 statistics in float16, where 1e-5 is lost; a weight that stands in
    for no scale gives ``use_scale=False``, as in :func:`to_keras`. A layer with float64 tensors (any of them)
    needs JAX's 64-bit mode (``jax.config.update("jax_enable_x64", True)``) and is refused without it, where JAX
    would silently make its variables float32.
    """
    linen, jax = _import_flax()
    torch_state = _torch_state(bn)
    rank = _torch_rank(bn, ndim)
    f = convert_state(torch_state, "torch", "flax", axis=axis)
    cfg = f["config"]
    if _unit_scale_frozen(bn):
        cfg["use_scale"] = False
        del f["variables"]["params"]["scale"]
    _check_axis(cfg["axis"], rank)
    dtype = np.result_type(*(v for d in f["variables"].values() for v in d.values()))  # the widest, as to_keras
    if dtype == np.float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError(f"{type(bn).__name__} holds float64 tensors, but JAX makes float64 arrays float32 unless "
                         "its 64-bit mode is on: call jax.config.update('jax_enable_x64', True) first (or set "
                         "JAX_ENABLE_X64=1), or convert bn.float() for a float32 Flax layer")
    module = linen.BatchNorm(axis=cfg["axis"], momentum=cfg["momentum"], epsilon=cfg["epsilon"],
                             use_bias=cfg["use_bias"], use_scale=cfg["use_scale"], param_dtype=dtype,
                             use_running_average=_from_frozen_flax(bn) or None)
    # every variable in the widest dtype (exact): Flax adds eps to the variance in the variance's own dtype
    variables = {col: {k: jax.numpy.asarray(v, dtype=dtype) for k, v in d.items()} for col, d in f["variables"].items()}
    return module, variables


# ----------------------------------------------------------------- SyncBatchNorm
def revert_sync_bn(model: nn.Module, example_inputs: Any = None) -> nn.Module:
    """A copy of ``model`` with every ``nn.SyncBatchNorm`` replaced by ``BatchNorm1d/2d/3d``.

    The inverse of ``nn.SyncBatchNorm.convert_sync_batchnorm``. The rank each layer sees is
    found by running ``example_inputs`` through a throwaway copy in eval mode without gradients, its forward
    hooks included (a tuple is the positional arguments, as for ``torch.export``; anything else, a list
    included, is the one argument): rank 2-3 gives ``BatchNorm1d``, 4 ``BatchNorm2d``, 5
    ``BatchNorm3d``. A layer never reached (or without ``example_inputs``), reached with
    several ranks, or with a rank no ``BatchNorm*d`` takes (above 5) becomes
    :class:`BatchNormNd`, which accepts any rank, and a warning names it. The new layer takes
    over the old one's attributes as they are: the same parameters (``requires_grad``
    included) and buffers, eps, momentum, affine and tracking flags, ``training`` flag, hooks;
    only ``process_group`` is dropped. ``model`` itself is not modified. The math is unchanged:
    ``SyncBatchNorm`` without a process group runs ``F.batch_norm`` exactly as ``BatchNorm*d`` does. Layers of
    another class (a subclass, which may have code of its own, or one a ``torch.nn.utils.parametrize``
    parametrization made) are left as they are, with a warning naming them: a plain class would drop that code.
    A wrapped model (``DistributedDataParallel``, ``DataParallel``, ``torch.compile``, ``AveragedModel``)
    gives the module inside, converted: the probe runs that module (DDP's own forward would start with a
    collective, which a call on one rank never completes), with ``example_inputs`` sent to a DDP/DataParallel
    wrapper's device, and what follows a conversion (export, fusing) takes no wrapper.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    device = parallel_device(model)
    model, _ = unwrapped(model)
    require_eager(model)
    if example_inputs is not None and device is not None:
        example_inputs = to_device(example_inputs, device)
    ranks = _probe_ranks(model, example_inputs) if example_inputs is not None else {}
    unsure, left = [], []

    def make(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, nn.SyncBatchNorm):
            return None
        if type(module) is not nn.SyncBatchNorm:  # its class's code, or a parametrization's property, would be lost
            left.append(f"{name or 'model'} ({_why_kept(module)})")
            return None
        seen = ranks.get(name, set())  # first name, as named_modules() in the probe reports it
        dims = _RANK_DIMS.get(next(iter(seen))) if len(seen) == 1 else None
        if dims is None:
            unsure.append(f"{name or 'model'} (input ranks seen: {sorted(seen) or 'none'})")
        return _retype(module, _PLAIN[dims] if dims is not None else BatchNormNd)

    out = layers.replace_modules(deep_copy(model), make)
    if unsure:
        warnings.warn(
            "revert_sync_bn: no single input rank of 2-5 for " + ", ".join(unsure) + "; these became bnkit "
            "BatchNormNd (any rank), which torch's fusers do not match. A layer that example_inputs reach at one "
            "rank of 2-5 becomes BatchNorm1d/2d/3d.",
            stacklevel=2,
        )
    if left:
        warnings.warn(f"revert_sync_bn left {len(left)} SyncBatchNorm layer(s) as they are: {', '.join(left)}. In "
                      "eval mode they normalize as BatchNorm does on one process.", stacklevel=2)
    return out


def _why_kept(module: nn.SyncBatchNorm) -> str:
    """Why :func:`revert_sync_bn` leaves a ``SyncBatchNorm`` of another class than PyTorch's as it is."""
    if parametrize.is_parametrized(module):
        return ("parametrized: a plain class would drop the parametrized tensors' properties; remove the "
                "parametrization first, torch.nn.utils.parametrize.remove_parametrizations")
    return (f"class {type(module).__name__}, a subclass, whose own code (if it has any) a plain BatchNorm would "
            "drop; convert it yourself if that code does not matter on one process")


def _retype(module: nn.SyncBatchNorm, cls: type[_BatchNorm]) -> _BatchNorm:
    """A ``cls`` instance holding ``module``'s attributes (parameters, buffers, flags, hooks, a ``freeze_bn``)."""
    new = layers.retype_module(module, cls)
    new.__dict__.pop("process_group", None)
    return new


def _probe_ranks(model: nn.Module, example_inputs: Any) -> dict[str, set[int]]:
    """Input rank seen by each ``SyncBatchNorm`` when ``example_inputs`` run through a copy of ``model``."""
    probe = deep_copy(model).eval()
    ranks: dict[str, set[int]] = {}
    handles = []
    for name, module in probe.named_modules():
        if isinstance(module, nn.SyncBatchNorm):
            handles.append(module.register_forward_pre_hook(  # bn(x) or bn(input=x), PyTorch's parameter name
                lambda _m, args, kwargs, name=name: ranks.setdefault(name, set()).add(
                    (args[0] if args else kwargs["input"]).dim()), with_kwargs=True))
    args = as_args(example_inputs)
    try:
        with torch.no_grad():
            probe(*args)
    finally:
        for h in handles:
            h.remove()
    return ranks
