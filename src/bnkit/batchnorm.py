"""The reference BatchNorm layer in NumPy: forward and backward, train and eval.

Training mode normalizes each channel with the statistics of the current batch,

    y = gamma * (x - mean_B) / sqrt(var_B + eps) + beta,   var_B = M2 / n   (biased),

and updates the running statistics by the moving average of the chosen
convention (:mod:`bnkit.conventions`): which side ``momentum`` weighs, and whether
the running variance is fed the unbiased ``M2/(n-1)`` (PyTorch) or the biased
``M2/n`` (Keras, ONNX, Flax). Eval mode normalizes with ``running_mean`` and
``running_var``, is deterministic and updates nothing. ``gamma``/``beta`` enter
both modes identically. With ``track_running_stats=False`` there are no running
statistics and both modes use the batch's, as in ``torch.nn.BatchNorm*d``.

Statistics are two-pass (mean, then the sum of squared deviations): contiguous
runs are summed pairwise in the input dtype (sums of products in pieces of at most
4096 values) and combined across pieces and rows in float64;
float16 inputs are centred, summed and scaled in float32, as PyTorch does.
The output has the input's dtype. Large inputs are processed in row blocks on a
thread pool (NumPy's ufuncs release the GIL); results do not depend on it.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .checks import integer, ml_float, ml_int, real, real_array
from .conventions import Convention, get_convention, new_value_weight, update_weights

__all__ = ["BatchNorm"]

_DEFAULT = object()


class BatchNorm:
    """NumPy BatchNorm for ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ``(N, C, D, H, W)``.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance before the square root (default: the convention's).
        momentum: running-statistics momentum *in the convention's own sense*
            (default: the convention's). ``None`` means PyTorch's cumulative
            average and is accepted only with ``convention="torch"``.
        affine: learnable ``weight`` (gamma) and ``bias`` (beta).
        track_running_stats: keep running statistics and use them in eval mode.
        axis: the channel axis; ``1`` for channels-first, ``-1`` for channels-last.
        convention: ``"torch"``, ``"keras"``, ``"onnx"`` or ``"flax"``.

    Attributes mirror PyTorch: ``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``, ``momentum``, ``eps``, ``training``.
    After :meth:`backward`, ``grad_weight`` and ``grad_bias`` hold the parameter gradients.
    """

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum=_DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int = 1,
        convention: str | Convention = "torch",
    ) -> None:
        if integer(num_features, "num_features") < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        self.convention = get_convention(convention)
        self.num_features = int(num_features)
        self.eps = _checked_eps(self.convention.default_eps if eps is None else eps)
        self.momentum = self.convention.default_momentum if momentum is _DEFAULT else momentum
        if self.momentum is None:
            if self.convention.name != "torch":
                raise ValueError("momentum=None (cumulative average) exists only in the torch convention")
        else:
            self.momentum = real(self.momentum, "momentum")
            new_value_weight(self.momentum, self.convention)  # validates the range
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.axis = integer(axis, "axis")
        self.training = True
        c = self.num_features
        self.weight = np.ones(c) if affine else None
        self.bias = np.zeros(c) if affine else None
        if track_running_stats:
            self.running_mean = np.zeros(c)
            self.running_var = np.ones(c)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = None
            self.num_batches_tracked = None
        self.grad_weight = self.grad_bias = None
        self._cache = None
        self._rows: tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "BatchNorm":
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        return self.train(False)

    # ---------------------------------------------------------------- helpers
    def _channel_axis(self, x: np.ndarray) -> int:
        if x.ndim < 2 or x.ndim > 5:
            raise ValueError(f"expected a 2-D to 5-D input (N, C, ...), got shape {x.shape}")
        ax = self.axis % x.ndim if -x.ndim <= self.axis < x.ndim else None
        if ax is None or ax == 0:
            raise ValueError(f"channel axis {self.axis} is invalid for input of shape {x.shape}")
        if x.shape[ax] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels on axis {self.axis}, got {x.shape[ax]} (input shape {x.shape})"
            )
        return ax

    def _keys(self) -> tuple[str, ...]:
        """The state's keys, as the layer's flags give them: PyTorch's names."""
        return (("weight", "bias") if self.affine else ()) + (
            ("running_mean", "running_var", "num_batches_tracked") if self.track_running_stats else ())

    def _arrays(self) -> dict[str, np.ndarray]:
        """The weight, bias and running statistics the layer has, as real NumPy arrays (for the forward and
        :meth:`state_dict`). Refuses attributes set after construction that are not ``C`` real numbers (a wrong
        shape, a string, complex values; a torch tensor or a list of numbers is read as an array)."""
        arrays = {}
        for name in self._keys():
            if name == "num_batches_tracked":  # a count, no per-channel array
                continue
            value = getattr(self, name)
            if (type(value) is np.ndarray and value.shape == (self.num_features,) and value.dtype.kind == "f"
                    and value.dtype.isnative):  # as the layer keeps them: nothing to read
                arrays[name] = value
                continue
            try:
                arr = real_array(_to_numpy(value, name), name)
            except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: a tensor NumPy cannot read
                raise TypeError(f"{name} must be {self.num_features} real numbers, got {type(value).__name__}: "
                                f"{exc}") from exc
            if arr.shape != (self.num_features,):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({self.num_features},) "
                                 f"(one value per channel)")
            arrays[name] = arr
        return arrays

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def _update_running(self, n: int, mean: np.ndarray, m2: np.ndarray, state: dict[str, np.ndarray]) -> None:
        # the weight first: a momentum set out of range (or a count at int64's maximum) raises before anything changes
        if self.num_batches_tracked >= _INT64_MAX:
            raise ValueError(f"num_batches_tracked is at int64's maximum ({_INT64_MAX}), where PyTorch keeps it: "
                             "one more update cannot be counted")
        if self.momentum is None:
            w_new = 1.0 / (self.num_batches_tracked + 1)
            w_old = 1.0 - w_new
        else:
            w_old, w_new = update_weights(self.momentum, self.convention)
        self.num_batches_tracked += 1
        var = m2 / (n - 1) if self.convention.unbiased_running_var else m2 / n
        self.running_mean = w_old * state["running_mean"] + w_new * mean
        self.running_var = w_old * state["running_var"] + w_new * var

    # ---------------------------------------------------------------- forward
    def forward(self, x: np.ndarray) -> np.ndarray:
        try:
            return self._forward(x)
        except BaseException:
            self._cache = None  # a refused forward leaves no earlier batch for backward() to answer with
            raise

    def _forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if np.iscomplexobj(x):
            raise TypeError(f"BatchNorm takes real inputs, got dtype {x.dtype}")
        x = real_array(x, "BatchNorm's input")
        _checked_eps(self.eps)  # set after construction: checked, as the arrays are, before anything changes
        state = self._arrays()
        ax = self._channel_axis(x)
        x3 = _as_acb(x, ax)
        wt = _work_dtype(x.dtype)
        gamma = state["weight"] if self.affine else np.ones(self.num_features)
        beta = state["bias"] if self.affine else np.zeros(self.num_features)
        if self._uses_batch_stats():
            n = x.size // self.num_features
            if n < 2:
                fix = ("call .eval() for inference, or use a larger batch" if self.track_running_stats else
                       "use a larger batch, or build the layer with track_running_stats=True so eval mode "
                       "normalizes with running statistics")
                raise ValueError(
                    f"BatchNorm {'in training mode' if self.track_running_stats else 'without running statistics'} "
                    f"needs more than 1 value per channel to compute batch statistics, got input of shape {x.shape} "
                    f"({n} value{'s' if n != 1 else ''} per channel). "
                    + ("An empty batch has no statistics" if n == 0 else
                       "A batch of one normalized by its own statistics is all zeros") + f": {fix}."
                )
            # a layer without running statistics normalizes every batch with its own, in either mode
            batch, kept = (("training batch", "; running statistics left untouched") if self.track_running_stats
                           else ("batch (normalized with its own statistics: no running statistics)", ""))
            total = _channel_sum(x3)
            if not np.all(np.isfinite(total)):  # NaN/Inf anywhere makes the channel sum non-finite
                raise ValueError(f"{batch} contains NaN or Inf (or overflows){kept}")
            mean = total / n
            # second pass on deviations: d = x - mean (kept for backward), M2 = sum(d*d)
            d = np.empty(x3.shape, dtype=wt)
            _parallel(lambda s: np.subtract(x3[s], mean.astype(wt)[:, None], out=d[s]), x3)
            m2 = _channel_dot(d, d)
            if not np.all(np.isfinite(m2)):  # finite values whose squared deviations overflow the dtype
                raise ValueError(f"{batch}'s variance overflows its dtype{kept}")
            # 0 / sqrt(0): NaN outputs and gradients. A constant channel's deviations from its rounded mean are
            # an ulp each, not 0 (0.1 three times): told by its range, exactly, as well as by M2
            if self.eps == 0.0 and not np.all(alive := (m2 > 0) & (x3.max(axis=(0, 2)) > x3.min(axis=(0, 2)))):
                dead = np.flatnonzero(~alive).tolist()
                raise ValueError(
                    f"eps=0 and channel(s) {dead[:8]}{' ...' if len(dead) > 8 else ''} have zero variance in this "
                    f"batch: normalizing them divides by zero (PyTorch refuses eps=0 in training); use eps > 0{kept}")
            invstd = 1.0 / np.sqrt(m2 / n + self.eps)
            if self.training and self.track_running_stats:
                self._update_running(n, mean, m2, state)
            scale, shift, src = gamma * invstd, beta, d
        else:
            n = d = None
            mean = state["running_mean"].copy()  # what backward's grad_weight centres on, even if the buffer changes
            invstd = 1.0 / np.sqrt(state["running_var"] + self.eps)
            scale, src = gamma * invstd, x3
            shift = beta - mean * scale
        out = np.empty(x3.shape, dtype=x3.dtype)  # C order whatever x3's strides: out2 below must be a view of it
        # Per-sample rows of C*B values times full-length scale/shift rows: NumPy's inner loop then runs
        # over a whole sample instead of B values per channel (a (C, 1) broadcast is ~1.7x slower).
        a, c, b = x3.shape
        src2, out2 = src.reshape(a, c * b), out.reshape(a, c * b)
        sc, sh = self._affine_rows(scale.astype(wt), shift.astype(wt), b)

        block = max(1, (1 << 16) // max(1, c * b))  # rows per block: ~256 KiB of float32, at least one sample

        def affine(s):
            for i in range(s.start, s.stop, block):  # blockwise: the add finds the product still in cache
                r = slice(i, min(i + block, s.stop))
                if out2.dtype == wt:
                    np.multiply(src2[r], sc, out=out2[r])
                    out2[r] += sh
                else:  # float16: scale and shift in float32, rounded once to float16 (as PyTorch's kernel does)
                    np.add(src2[r] * sc, sh, out=out2[r])

        _parallel(affine, x3)
        # gamma copied: an in-place edit after the forward must not reach backward
        self._cache = (x3, d, mean, invstd, gamma.copy(), n, x.shape)
        return out.reshape(x.shape)

    __call__ = forward

    def _affine_rows(self, scale: np.ndarray, shift: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
        """``scale`` and ``shift`` each repeated ``b`` times; the last pair is reused while both are unchanged.

        In eval mode they are the same every call, and building two sample-long rows costs
        about a tenth of the affine pass itself on a (32, 64, 56, 56) batch.
        """
        cached = self._rows
        if (cached is not None and cached[2] == b and cached[0].dtype == scale.dtype
                and np.array_equal(cached[0], scale) and np.array_equal(cached[1], shift)):
            return cached[3], cached[4]
        rows = np.repeat(scale, b), np.repeat(shift, b)
        self._rows = (scale, shift, b, *rows)
        return rows

    # --------------------------------------------------------------- backward
    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Gradient w.r.t. the input of the last forward; sets ``grad_weight``/``grad_bias``.

        With ``d = x - mean`` and ``xhat = d * invstd``: batch statistics (training mode,
        ``m`` values per channel) give ``dx = gamma*invstd * (dy - mean(dy) - xhat*mean(dy*xhat))``;
        running statistics (eval mode) are constants, so ``dx = gamma*invstd*dy``.
        ``grad_weight = sum(dy * xhat)``, ``grad_bias = sum(dy)``. The statistics, gamma and
        (eval mode) running mean are those of the forward; the input array itself is not
        copied, so change it in place only after backward.
        """
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() first")
        x3, d, mean, invstd, gamma, n, shape = self._cache
        dy = np.asarray(dy)
        if ml_float(dy.dtype) or ml_int(dy.dtype):  # ml_dtypes' bfloat16, int4, ...: as forward takes them
            dy = real_array(dy, "BatchNorm's gradient")
        if np.iscomplexobj(dy) or not np.issubdtype(dy.dtype, np.number):
            raise TypeError(f"BatchNorm takes real gradients, got dtype {dy.dtype}")
        if dy.shape != shape:
            raise ValueError(f"dy has shape {dy.shape}, expected the forward output's shape {shape}")
        dt, wt = x3.dtype, _work_dtype(x3.dtype)
        dy3 = dy.astype(dt, copy=False).reshape(x3.shape)
        if d is None:  # eval: deviations from the running mean the forward used, only for grad_weight
            d = x3 - mean.astype(wt)[:, None]
        sum_dy = _channel_sum(dy3)
        sum_dy_d = _channel_dot(dy3, d)
        if self.affine:
            self.grad_weight = sum_dy_d * invstd
            self.grad_bias = sum_dy
        scale = (gamma * invstd).astype(wt)[:, None]
        dx = np.empty_like(x3)
        if n is None:
            _parallel(lambda s: np.multiply(dy3[s], scale, out=dx[s]), x3)
        else:
            k = (invstd * invstd * sum_dy_d / n).astype(wt)[:, None]
            mdy = (sum_dy / n).astype(wt)[:, None]

            def grad(s):
                if dx.dtype == wt:
                    np.multiply(d[s], k, out=dx[s])
                    dx[s] += mdy
                    np.subtract(dy3[s], dx[s], out=dx[s])
                    dx[s] *= scale
                else:  # float16: the steps in float32, rounded once to float16 (as PyTorch's kernel does)
                    part = d[s] * k
                    part += mdy
                    np.subtract(dy3[s], part, out=part)
                    np.multiply(part, scale, out=dx[s])

            _parallel(grad, x3)
        return dx.reshape(shape)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, np.ndarray]:
        """PyTorch's key names; ``num_batches_tracked`` as a 0-d int64 array."""
        state = {name: value.copy() for name, value in self._arrays().items()}  # a list or tensor as an array
        if self.track_running_stats:
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, object], strict: bool = True) -> None:
        """Load PyTorch-named state (NumPy arrays or CPU tensors). Checks shapes before changing anything."""
        expected = self._keys()
        missing = [k for k in expected if k not in state and k != "num_batches_tracked"]
        unexpected = [k for k in state if k not in expected]
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
        new = {}
        for k in expected:
            if k not in state:
                continue
            v = _to_numpy(state[k], k)
            if np.iscomplexobj(v):
                raise TypeError(f"{k} must be real, got dtype {v.dtype}")
            if k == "num_batches_tracked":
                new[k] = update_count(v)
                continue
            if v.shape != (self.num_features,):
                raise ValueError(f"{k} has shape {v.shape}, expected ({self.num_features},)")
            new[k] = real_array(v, k).astype(np.float64)  # a copy
        for k, v in new.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, axis={self.axis}, convention={self.convention.name!r})"
        )


def update_count(value) -> int:
    """``num_batches_tracked`` as an int: one finite, non-negative, integral number of any integer or float
    dtype (shape ``()`` or ``(1,)``, a tensor or an array-like). ValueError otherwise, naming the value: a
    count of 2.5, -3, NaN, several values or a string is no count of training-mode updates."""
    v = _to_numpy(value, "num_batches_tracked")
    one = v.size == 1 and v.ndim <= 1  # torch refuses (1, 1) too
    x = v.reshape(-1)[0].item() if one and v.dtype.kind in "iuf" else None
    if x is None or not np.isfinite(x) or x < 0 or x != int(x) or x > _INT64_MAX:
        shown = (repr(x) if x is not None else f"{v.reshape(-1).tolist()[0]!r} ({v.dtype})" if one
                 else f"shape {v.shape}" if v.size == 1 else f"{v.size} values {v.reshape(-1)[:4].tolist()}")
        over = " (over int64's maximum, where PyTorch keeps the count)" if x is not None and x > _INT64_MAX else ""
        raise ValueError(
            f"num_batches_tracked must be one non-negative integer (a count of updates), got {shown}{over}")
    return int(x)


#: The largest count of updates: PyTorch and :meth:`BatchNorm.state_dict` keep ``num_batches_tracked`` in int64.
_INT64_MAX = int(np.iinfo(np.int64).max)


def _checked_eps(eps) -> float:
    """``eps`` as a float; ValueError unless it is a finite non-negative real number."""
    value = real(eps, "eps")
    if not value >= 0.0 or not np.isfinite(value):
        raise ValueError(f"eps must be a finite non-negative number, got {eps}")
    return value


def _to_numpy(v, what: str = "a value") -> np.ndarray:
    """``v`` as a NumPy array of its own dtype; bfloat16, which NumPy lacks, is widened to float32 (exactly), as are
    ml_dtypes' other float arrays (float8, from JAX or Keras), and its int4 and the like to int64. A torch tensor of
    another dtype NumPy lacks (``torch.float8_*``, complex32) is refused naming ``what``."""
    if hasattr(v, "detach"):  # a torch tensor; avoids importing torch here
        v = v.detach().cpu()
        try:
            v = (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()
        except TypeError as exc:  # torch's "Got unsupported ScalarType ..."
            raise ValueError(f"{what} has dtype {v.dtype}, which NumPy lacks: convert it to float32 first") from exc
    a = np.asarray(v)
    if ml_int(a.dtype):  # ml_dtypes' int4 and the like
        return a.astype(np.int64)
    return a.astype(np.float32) if ml_float(a.dtype) else a  # ml_dtypes' bfloat16, float8 (JAX, Keras)


def _as_acb(x: np.ndarray, ax: int) -> np.ndarray:
    """View ``x`` as ``(A, C, B)``: everything before the channel axis, channels, everything after."""
    a = int(np.prod(x.shape[:ax], dtype=np.int64))
    b = int(np.prod(x.shape[ax + 1:], dtype=np.int64))  # not -1: an empty batch has no size to infer it from
    return x.reshape(a, x.shape[ax], b)


def _default_threads() -> int:
    """``OMP_NUM_THREADS`` when it names a positive count in ASCII digits (its first, for a nested list), as libgomp
    reads it; else (unset, empty, anything else, which libgomp rejects) every CPU."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    count = int(first) if first.isascii() and first.isdigit() else 0
    return count if count > 0 else (os.cpu_count() or 1)


_THREADS = _default_threads()
#: The worker pool and its size; replaced by a larger one when a pass needs more workers (never shrunk, so at most
#: the largest count used minus one idle threads), and dropped in a forked child, which inherits no threads.
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _forget_pool() -> None:
    global _POOL, _POOL_SIZE, _POOL_LOCK
    _POOL, _POOL_SIZE, _POOL_LOCK = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def set_num_threads(n: int) -> None:
    """Split arrays of at least 2**20 values over ``n`` threads (the calling thread included) in the NumPy layer's
    passes. The default is ``OMP_NUM_THREADS`` when set (which NumPy's BLAS and PyTorch also read), else every CPU.
    Results do not depend on it: each thread computes whole rows. Safe to call while layers run on other threads
    (a pass started before keeps its count)."""
    global _THREADS
    try:
        count = integer(n, "the number of threads")  # NumPy integers taken, bools refused (bnkit.checks)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"the number of threads must be a positive int, got {n!r}")
    _THREADS = count


def get_num_threads() -> int:
    """The threads the NumPy layer's passes use (see :func:`set_num_threads`)."""
    return _THREADS


def _submit(fn, blocks: list[slice]) -> list:
    """Submit ``fn(block)`` for each block to the worker pool, growing it first if it has fewer workers; under the
    lock, so a pool is only ever shut down (letting its submitted work finish) after a pass has handed it its work."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < len(blocks):
            old, _POOL, _POOL_SIZE = _POOL, ThreadPoolExecutor(max_workers=len(blocks)), len(blocks)
            if old is not None:
                old.shutdown(wait=False)
        return [_POOL.submit(fn, block) for block in blocks]


def _parallel(fn, x3: np.ndarray, min_size: int = 1 << 20) -> None:
    """Run ``fn(slice)`` over row blocks of the leading axis, on threads for large arrays.

    NumPy's ufuncs release the GIL, so the blocks run truly in parallel (the calling
    thread takes the last one); each writes a disjoint slice, and results do not
    depend on the number of threads.
    """
    rows = len(x3)
    workers = min(_THREADS, rows)
    if workers < 2 or x3.size < min_size:
        fn(slice(0, rows))
        return
    bounds = [rows * k // workers for k in range(workers + 1)]
    pending = _submit(fn, [slice(lo, hi) for lo, hi in zip(bounds[:-2], bounds[1:-1])])
    try:
        fn(slice(bounds[-2], rows))
    finally:  # never return while a worker still writes
        for job in pending:
            job.result()


def _work_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype deviations and affine rows are computed in: the input's, float32 for float16 (as PyTorch does)."""
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


def _channel_sum(x3: np.ndarray) -> np.ndarray:
    """Per-channel sum of an ``(A, C, B)`` array; contiguous runs summed in :func:`_work_dtype`
    (float16 sums overflow at 65504), the rest in float64. NumPy adds pairwise only along a contiguous axis: runs
    at a stride (a transposed view) are added one value after another, so they are summed in float64 too."""
    strided = x3.shape[2] > 1 and x3.strides[2] != x3.itemsize
    return x3.sum(axis=2, dtype=np.float64 if strided else _work_dtype(x3.dtype)).sum(axis=0, dtype=np.float64)


#: ``np.einsum`` adds a run one value after another (not pairwise, as ``sum`` does): below float64, runs longer
#: than this are cut into pieces of this length, the pieces added in float64 (a 2^20-value float32 run was 6e-5 off).
_DOT_RUN = 4096


def _channel_dot(a3: np.ndarray, b3: np.ndarray) -> np.ndarray:
    """Per-channel ``sum(a * b)`` of two ``(A, C, B)`` arrays: runs (pieces of at most :data:`_DOT_RUN` below
    float64) in :func:`_work_dtype`, the pieces and rows combined in float64."""
    acc = _work_dtype(np.result_type(a3, b3))
    kw = {} if a3.dtype == b3.dtype == acc else {"dtype": acc}
    run = a3.shape[2]
    if run <= _DOT_RUN or acc == np.float64:
        return np.einsum("acb,acb->ac", a3, b3, **kw).sum(axis=0, dtype=np.float64)
    whole = run - run % _DOT_RUN
    shape = a3.shape[:2] + (whole // _DOT_RUN, _DOT_RUN)
    pieces = np.einsum("acjk,acjk->acj", a3[:, :, :whole].reshape(shape), b3[:, :, :whole].reshape(shape), **kw)
    rows = pieces.sum(axis=2, dtype=np.float64)
    if whole < run:
        rows += np.einsum("acb,acb->ac", a3[:, :, whole:], b3[:, :, whole:], **kw)
    return rows.sum(axis=0)
