"""Convert one BatchNorm layer's state *and* hyper-parameters between frameworks.

The same layer is written four ways. Each framework's state is given and returned
in that framework's own names and nesting, with the hyper-parameters beside it:

=====  ==========================================================  ===========================================
src    weights (gamma, beta, mean, var), in the framework's names  hyper-parameters
=====  ==========================================================  ===========================================
torch  ``{"state_dict": {weight, bias, running_mean, running_var,   ``"config": {num_features, eps, momentum,
       num_batches_tracked}}`` (``nn.BatchNorm*d.state_dict()``)    affine, bias, track_running_stats}``
                                                                   (the constructor's arguments)
keras  ``{"weights": {gamma, beta, moving_mean, moving_variance}}``  ``"config": {axis, momentum, epsilon, center,
       or the list of ``layer.get_weights()`` in that order         scale}`` (``layer.get_config()``)
flax   ``{"variables": {"params": {scale, bias},                    ``"config": {axis, momentum, epsilon, use_bias,
       "batch_stats": {mean, var}}}``                               use_scale}`` (the module's fields)
onnx   ``{"initializers": {scale, B, input_mean, input_var}}`` or    ``"attributes": {epsilon, momentum}``
       the list in the node's input order (after ``X``)
=====  ==========================================================  ===========================================

Sources: torch/nn/modules/batchnorm.py (``_NormBase``: ``weight``/``bias`` parameters, the
``bias=`` keyword, ``running_*`` buffers); keras/src/layers/normalization/batch_normalization.py
(``build`` adds ``gamma``, ``beta``, ``moving_mean``, ``moving_variance`` in that order, each
only if ``scale``/``center``); flax/linen/normalization.py (``BatchNorm.__call__``: ``batch_stats``
``mean``/``var``, ``_normalize``: ``params`` ``scale``/``bias``); onnx/defs/nn/defs.cc
(BatchNormalization-15: inputs ``X, scale, B, input_mean, input_var``, attributes ``epsilon``,
``momentum``).

The three classic slips are made impossible:

* **eps/momentum left at the target's default**: the source's ``eps`` and ``momentum``
  must be stated (never assumed), and the result always states the target's.
* **momentum copied without flipping its side**: PyTorch's ``momentum`` weighs the new
  batch statistic, the others' weigh the old running value; :func:`convert_momentum`
  converts it (0.1 in torch is 0.9 elsewhere).
* **mean and variance swapped in a positional list**: a variance with negative entries
  is rejected. (A swap whose means happen to be all non-negative cannot be detected
  from the values; pass named weights to rule it out.)

Round trips are exact (the arrays are copied, never cast, except that bfloat16, which
NumPy lacks, becomes float32, which holds it exactly; momenta are complemented in
decimal). What a target cannot express is filled with the identity and said here:
torch has no "bias but no weight" layer, so Keras ``scale=False, center=True`` (Flax
``use_scale=False``) becomes an affine torch layer with ``weight = 1``; ONNX always has
``scale`` and ``B``, so a layer without them gets ``1`` and ``0``; torch's
``num_batches_tracked`` exists nowhere else and is left out when unknown. Torch and ONNX
are channels-first and have no ``axis``: converting to Keras/Flax from them gives
``axis=1`` (same tensor layout) unless ``axis=`` says otherwise (``-1`` for channels-last).

The running-variance rule is a property of the layer, not of its state: PyTorch feeds
the unbiased ``M2/(n-1)`` batch variance into ``running_var``, the others the biased
``M2/n`` (see :mod:`bnkit.conventions`). Inference is unaffected; continued training
of a converted layer drifts by ``n/(n-1)`` per update unless the target layer follows
the source's rule (``bnkit.torch.from_keras(..., exact_training=True)``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .batchnorm import _to_numpy, update_count
from .checks import integer, real
from .conventions import convert_momentum, get_convention

__all__ = ["FRAMEWORKS", "LAYOUTS", "convert_state"]

FRAMEWORKS = ("torch", "keras", "flax", "onnx")

#: Per framework: the names of (gamma, beta, mean, var), the hyper-parameter names of
#: (eps, momentum), and where the weights and hyper-parameters sit in the state dict.
LAYOUTS: dict[str, dict] = {
    "torch": {"names": ("weight", "bias", "running_mean", "running_var"), "eps": "eps", "momentum": "momentum",
              "weights": "state_dict", "config": "config"},
    "keras": {"names": ("gamma", "beta", "moving_mean", "moving_variance"), "eps": "epsilon", "momentum": "momentum",
              "weights": "weights", "config": "config"},
    "flax": {"names": ("params/scale", "params/bias", "batch_stats/mean", "batch_stats/var"), "eps": "epsilon",
             "momentum": "momentum", "weights": "variables", "config": "config"},
    "onnx": {"names": ("scale", "B", "input_mean", "input_var"), "eps": "epsilon", "momentum": "momentum",
             "weights": "initializers", "config": "attributes"},
}


@dataclass
class _Layer:
    """Framework-neutral BN layer: arrays are 1-D per-channel, ``None`` when absent."""

    gamma: np.ndarray | None
    beta: np.ndarray | None
    mean: np.ndarray | None
    var: np.ndarray | None
    eps: float
    momentum: float | None  # in the source convention's own sense
    src: str
    axis: int | None  # None: channels-first framework without an axis
    num_batches_tracked: int | None = None
    channels: int | None = None  # torch config's num_features, needed only when there are no arrays

    @property
    def num_features(self) -> int:
        arrays = [a for a in (self.mean, self.gamma, self.beta) if a is not None]
        return arrays[0].shape[0] if arrays else int(self.channels)


def convert_state(state: Mapping, src: str, dst: str, *, axis: int | None = None,
                  positional: bool = False) -> dict:
    """Convert a BN layer's state and hyper-parameters from ``src`` to ``dst``'s names and nesting.

    Args:
        state: the layer in ``src``'s layout (module docstring table). NumPy arrays,
            torch tensors, JAX arrays or lists are accepted; bfloat16 arrays are read as float32.
        src, dst: ``"torch"``, ``"keras"``, ``"flax"`` or ``"onnx"``.
        axis: the channel axis of a Keras/Flax target (default: the source's, or ``1``
            from channels-first torch/ONNX). Refused for torch/ONNX targets, which have none.
        positional: return Keras weights / ONNX initializers as the list in their documented
            order (``set_weights`` order; the node's inputs after ``X``) instead of a dict.

    Returns:
        ``dst``'s layout with NumPy arrays, and the converted eps and momentum stated.

    Raises:
        ValueError: missing eps/momentum, unknown or missing weights, shape mismatch,
            ``positional=True`` for a torch/Flax target,
            NaN/Inf, a negative variance (likely swapped with the mean), or a layer
            the target cannot express (torch ``momentum=None`` or ``track_running_stats=False``
            to a framework without them, Keras ``renorm=True``).
    """
    src_c, dst_c = get_convention(src).name, get_convention(dst).name
    layer = _READERS[src_c](state)
    _validate(layer, src_c)
    if axis is not None and dst_c in ("torch", "onnx"):
        raise ValueError(f"{dst_c} BatchNorm is channels-first and has no axis; do not pass axis=")
    if positional and dst_c not in ("keras", "onnx"):
        raise ValueError(f"positional=True gives a Keras or ONNX weight list; {dst_c} weights are named")
    return _WRITERS[dst_c](layer, axis=axis, positional=positional)


# ----------------------------------------------------------------- reading
def _array(v, what: str) -> np.ndarray:
    a = _to_numpy(v, what)
    if a.ndim != 1 or a.shape[0] < 1:
        raise ValueError(f"{what} must be a non-empty 1-D per-channel array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what} must be floating point, got dtype {a.dtype}")
    return a.copy()


def _part(state: Mapping, key: str, src: str):
    if not isinstance(state, Mapping) or key not in state:
        have = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{src} state must be a mapping with a {key!r} entry (see bnkit.convert), got {have}")
    return state[key]


def _hyper(config: Mapping, src: str) -> tuple[float, float | None]:
    layout, conv = LAYOUTS[src], get_convention(src)
    if not isinstance(config, Mapping):
        raise ValueError(f"{src} {layout['config']} must be a mapping, got {type(config).__name__}")
    missing = [layout[k] for k in ("eps", "momentum") if layout[k] not in config]
    if missing:
        raise ValueError(
            f"{src} {layout['config']} must state {missing}: bnkit never assumes a default (the {src} defaults "
            f"are eps={conv.default_eps}, momentum={conv.default_momentum}, but the layer may not use them)"
        )
    eps = real(config[layout["eps"]], f"{src} {layout['eps']}")  # a bool or a string refused, not read or parsed
    m = config[layout["momentum"]]
    if m is not None:
        m = real(m, f"{src} {layout['momentum']}")
    return eps, m


def _check_keys(weights: Mapping, allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(weights) - set(allowed))
    if unknown:
        raise ValueError(f"unexpected entries {unknown} in {where}; expected only {list(allowed)}")


def _flag(config: Mapping, key: str, present: bool, src: str) -> None:
    if key in config and bool(config[key]) != present:
        raise ValueError(f"{src} config says {key}={config[key]} but the weights {'have' if present else 'lack'} it")


def _read_torch(state: Mapping) -> _Layer:
    sd, config = _part(state, "state_dict", "torch"), _part(state, "config", "torch")
    eps, m = _hyper(config, "torch")
    names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    if not isinstance(sd, Mapping):
        raise ValueError(f"torch state_dict must be a mapping (layer.state_dict()), got {type(sd).__name__}")
    _check_keys(sd, names, "the torch state_dict")
    get = {k: (_array(sd[k], k) if k in sd else None) for k in names[:4]}
    if get["weight"] is None and get["bias"] is not None:
        raise ValueError("torch state_dict has 'bias' without 'weight': no torch BatchNorm has that")
    _flag(config, "affine", get["weight"] is not None, "torch")
    if get["weight"] is not None:
        _flag(config, "bias", get["bias"] is not None, "torch")
    if (get["running_mean"] is None) != (get["running_var"] is None):
        raise ValueError("torch state_dict must have both running_mean and running_var, or neither")
    _flag(config, "track_running_stats", get["running_mean"] is not None, "torch")
    nbt = sd.get("num_batches_tracked")
    nbt = None if nbt is None else update_count(nbt)
    channels = config.get("num_features")
    if channels is not None and (isinstance(channels, bool) or not isinstance(channels, (int, np.integer))
                                 or channels < 1):
        raise ValueError(f"torch config num_features must be a positive integer, got {channels!r}")
    layer = _Layer(get["weight"], get["bias"], get["running_mean"], get["running_var"], eps, m, "torch", None, nbt,
                   None if channels is None else int(channels))
    arrays = [a for a in get.values() if a is not None]
    if layer.channels is None and not arrays:
        raise ValueError("torch config must give num_features for a layer without weights or running statistics")
    if layer.channels is not None and arrays and arrays[0].shape[0] != layer.channels:
        raise ValueError(f"torch config num_features={layer.channels} but the arrays have "
                         f"{arrays[0].shape[0]} channels")
    return layer


def _check_listed(weights: object, part: str, src: str) -> None:
    """``weights`` given neither as a mapping nor as a list (or tuple, or stacked NumPy/torch/JAX array) of arrays:
    ValueError."""
    stacked = hasattr(weights, "__array__") and getattr(weights, "ndim", 0) >= 1
    if isinstance(weights, (str, bytes)) or not (isinstance(weights, Sequence) or stacked):
        raise ValueError(f"{src} {part} must be a mapping of names to arrays or a list of arrays, "
                         f"got {type(weights).__name__}")


def _read_positional(weights: Sequence, names: Sequence[str], src: str) -> dict[str, np.ndarray]:
    if len(weights) != len(names):
        raise ValueError(f"{src} positional weights: expected {len(names)} arrays in the order {list(names)}, "
                         f"got {len(weights)}")
    out = {k: _array(v, f"{src} {k} (position {i})") for i, (k, v) in enumerate(zip(names, weights))}
    return out


def _read_keras(state: Mapping) -> _Layer:
    weights, config = _part(state, "weights", "keras"), _part(state, "config", "keras")
    eps, m = _hyper(config, "keras")
    axis = _int_axis(config.get("axis", -1), "keras")  # before the arrays: a multi-axis layer's are 2-D
    if config.get("renorm"):
        raise ValueError("Keras renorm=True (Batch Renormalization) trains with a different rule and extra "
                         "variables; it has no equivalent in the other frameworks")
    g, b, mu, v = LAYOUTS["keras"]["names"]
    if isinstance(weights, Mapping):
        _check_keys(weights, (g, b, mu, v), "the keras weights")
        w = {k: _array(a, k) for k, a in weights.items()}
        _flag(config, "scale", g in w, "keras")
        _flag(config, "center", b in w, "keras")
    else:
        _check_listed(weights, "weights", "keras")
        center, scale = config.get("center"), config.get("scale")
        if center is None or scale is None:
            guess = {4: (True, True), 2: (False, False)}.get(len(weights))
            if guess is None:
                raise ValueError(f"keras get_weights() list of {len(weights)} arrays is ambiguous without "
                                 "config 'center' and 'scale'")
            center = guess[0] if center is None else center
            scale = guess[1] if scale is None else scale
        order = [k for k, on in ((g, scale), (b, center), (mu, True), (v, True)) if on]
        w = _read_positional(weights, order, "keras")
    if mu not in w or v not in w:
        raise ValueError(f"keras weights must include {mu!r} and {v!r}")
    return _Layer(w.get(g), w.get(b), w[mu], w[v], eps, m, "keras", axis)


def _read_flax(state: Mapping) -> _Layer:
    variables, config = _part(state, "variables", "flax"), _part(state, "config", "flax")
    eps, m = _hyper(config, "flax")
    axis = _int_axis(config.get("axis", -1), "flax")  # before the arrays: a multi-axis layer's are 2-D
    expected = ("the whole variables mapping {'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}} "
                "that module.init/apply returns")
    if not isinstance(variables, Mapping):
        raise ValueError(f"flax variables must be {expected}; got {type(variables).__name__}")
    inner = sorted(set(variables) & {"scale", "bias", "mean", "var"})
    if inner:
        raise ValueError(f"flax variables has {inner} at its top level: pass {expected}, not "
                         "variables['params'] or variables['batch_stats'] alone")
    _check_keys(variables, ("params", "batch_stats"), "the flax variables")
    if "batch_stats" not in variables:
        raise ValueError(f"flax variables has no 'batch_stats' (the running mean and var): pass {expected}")
    params, stats = variables.get("params", {}), variables["batch_stats"]
    for name, collection in (("params", params), ("batch_stats", stats)):
        if not isinstance(collection, Mapping):
            raise ValueError(f"flax variables[{name!r}] must be a mapping, got {type(collection).__name__}")
    _check_keys(params, ("scale", "bias"), "flax params")
    _check_keys(stats, ("mean", "var"), "flax batch_stats")
    if "mean" not in stats or "var" not in stats:
        raise ValueError("flax batch_stats must include 'mean' and 'var'")
    _flag(config, "use_scale", "scale" in params, "flax")
    _flag(config, "use_bias", "bias" in params, "flax")
    arr = {f"params/{k}": _array(a, f"params/{k}") for k, a in params.items()}
    arr.update({f"batch_stats/{k}": _array(a, f"batch_stats/{k}") for k, a in stats.items()})
    return _Layer(arr.get("params/scale"), arr.get("params/bias"), arr["batch_stats/mean"], arr["batch_stats/var"],
                  eps, m, "flax", axis)


def _read_onnx(state: Mapping) -> _Layer:
    inits, attrs = _part(state, "initializers", "onnx"), _part(state, "attributes", "onnx")
    eps, m = _hyper(attrs, "onnx")
    names = LAYOUTS["onnx"]["names"]
    if isinstance(inits, Mapping):
        _check_keys(inits, names, "the onnx initializers")
        missing = [k for k in names if k not in inits]
        if missing:
            raise ValueError(f"onnx BatchNormalization needs all of {list(names)}; missing {missing}")
        w = {k: _array(inits[k], k) for k in names}
    else:
        _check_listed(inits, "initializers", "onnx")
        w = _read_positional(inits, names, "onnx")
    return _Layer(*(w[k] for k in names), eps, m, "onnx", None)


def _int_axis(axis, src: str) -> int:
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ValueError(f"{src} axis {axis}: only a single channel axis can be converted")
        axis = axis[0]
    return integer(axis, f"{src} axis")


def _validate(layer: _Layer, src: str) -> None:
    arrays = {"gamma": layer.gamma, "beta": layer.beta, "mean": layer.mean, "var": layer.var}
    present = {k: a for k, a in arrays.items() if a is not None}
    sizes = {k: a.shape[0] for k, a in present.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"per-channel arrays disagree on the number of channels: {sizes}")
    for k, a in present.items():
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{src} {k} contains NaN or Inf")
    if layer.var is not None and np.any(layer.var < 0):
        neg = int(np.sum(layer.var < 0))
        raise ValueError(
            f"{src} variance has {neg} negative entries (min {layer.var.min():.4g}): a variance cannot be negative; "
            f"the mean and variance are most likely swapped (expected order {list(LAYOUTS[src]['names'])})"
        )
    if not (np.isfinite(layer.eps) and layer.eps >= 0):
        raise ValueError(f"{src} eps must be a finite non-negative number, got {layer.eps}")
    if layer.momentum is not None and not 0.0 <= layer.momentum <= 1.0:
        raise ValueError(f"{src} momentum must be in [0, 1], got {layer.momentum}")


# ----------------------------------------------------------------- writing
def _filled(layer: _Layer, fill: float) -> np.ndarray:
    ref = next(a for a in (layer.mean, layer.gamma, layer.beta) if a is not None)
    return np.full(ref.shape, fill, dtype=ref.dtype)


def _need_running(layer: _Layer, dst: str) -> None:
    if layer.mean is None:
        raise ValueError(f"a torch layer with track_running_stats=False normalizes with batch statistics even at "
                         f"inference; {dst} has no such layer")


def _target_axis(layer: _Layer, axis: int | None) -> int:
    if axis is not None:
        if integer(axis, "axis") == 0:
            raise ValueError("axis=0 is the batch axis, not a channel axis")
        return int(axis)
    return 1 if layer.axis is None else layer.axis


def _write_torch(layer: _Layer, axis=None, positional=False) -> dict:
    gamma = layer.gamma
    if gamma is None and layer.beta is not None:
        gamma = _filled(layer, 1.0)  # torch has bias-without-weight only via weight = 1
    sd: dict[str, np.ndarray] = {}
    if gamma is not None:
        sd["weight"] = gamma
        if layer.beta is not None:
            sd["bias"] = layer.beta
    if layer.mean is not None:
        sd["running_mean"], sd["running_var"] = layer.mean, layer.var
        if layer.num_batches_tracked is not None:
            sd["num_batches_tracked"] = np.array(layer.num_batches_tracked, dtype=np.int64)
    config = {
        "num_features": layer.num_features,
        "eps": layer.eps,
        "momentum": convert_momentum(layer.momentum, layer.src, "torch"),
        "affine": gamma is not None,
        "bias": layer.beta is not None or gamma is None,
        "track_running_stats": layer.mean is not None,
    }
    return {"state_dict": sd, "config": config}


def _write_keras(layer: _Layer, axis=None, positional=False) -> dict:
    _need_running(layer, "keras")
    names = LAYOUTS["keras"]["names"]
    pairs = [(k, a) for k, a in zip(names, (layer.gamma, layer.beta, layer.mean, layer.var)) if a is not None]
    config = {
        "axis": _target_axis(layer, axis),
        "momentum": convert_momentum(layer.momentum, layer.src, "keras"),
        "epsilon": layer.eps,
        "center": layer.beta is not None,
        "scale": layer.gamma is not None,
    }
    return {"weights": [a for _, a in pairs] if positional else dict(pairs), "config": config}


def _write_flax(layer: _Layer, axis=None, positional=False) -> dict:
    _need_running(layer, "flax")
    params = {k: a for k, a in (("scale", layer.gamma), ("bias", layer.beta)) if a is not None}
    config = {
        "axis": _target_axis(layer, axis),
        "momentum": convert_momentum(layer.momentum, layer.src, "flax"),
        "epsilon": layer.eps,
        "use_bias": layer.beta is not None,
        "use_scale": layer.gamma is not None,
    }
    variables = {"params": params} if params else {}  # flax creates no params collection without scale and bias
    variables["batch_stats"] = {"mean": layer.mean, "var": layer.var}
    return {"variables": variables, "config": config}


def _write_onnx(layer: _Layer, axis=None, positional=False) -> dict:
    _need_running(layer, "onnx")
    gamma = layer.gamma if layer.gamma is not None else _filled(layer, 1.0)
    beta = layer.beta if layer.beta is not None else _filled(layer, 0.0)
    values = (gamma, beta, layer.mean, layer.var)
    inits = list(values) if positional else dict(zip(LAYOUTS["onnx"]["names"], values))
    attrs = {"epsilon": layer.eps, "momentum": convert_momentum(layer.momentum, layer.src, "onnx")}
    return {"initializers": inits, "attributes": attrs}


_READERS = {"torch": _read_torch, "keras": _read_keras, "flax": _read_flax, "onnx": _read_onnx}
_WRITERS = {"torch": _write_torch, "keras": _write_keras, "flax": _write_flax, "onnx": _write_onnx}
