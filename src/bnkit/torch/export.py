"""Export a PyTorch model to ONNX in inference mode, audited and checked by onnxruntime.

A BatchNorm layer exported in training mode (``training_mode=1``) normalises every batch
with its own statistics in onnxruntime; one built with ``track_running_stats=False``
has no running statistics at all, so its exported graph uses batch statistics whatever
the mode (``torch/nn/modules/batchnorm.py``: ``bn_training = running_mean is None``).
:func:`export_onnx` refuses the latter, exports with every module in eval mode (restoring
each module's flag afterwards), audits the exported graph (:func:`bnkit.onnx.audit`; with
``fold=True`` too, so an error blocks the write whether or not the BN is folded away), optionally
folds BatchNormalization into its neighbours (:func:`bnkit.onnx.fold_model`), and compares
onnxruntime's outputs with PyTorch's eval outputs on the example inputs (and on their
first sample alone when the batch axis is dynamic: the inputs declared dynamic are cut to it, and a model that fails
there, in PyTorch even without verification, is refused, with a pointer to ``dynamic_batch=False``). The file is written atomically and only when every check passed.

It uses the TorchScript-based exporter (``dynamo=False``), which needs no ``onnxscript``.
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path, check_target
from ..checks import integer
from .io import LOAD_REAL_WEIGHTS, refuse_meta
from .modules import (SavedState, bn_layers, eager_calls, eval_mode, exact_float32, parallel_device, to_device,
                      uninitialized_lazy, unwrapped)

__all__ = ["export_onnx", "ExportReport", "ExportVerificationError"]


class ExportVerificationError(RuntimeError):
    """The export failed a check (audit error or onnxruntime mismatch); no file was written."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and checked.

    ``findings``: the audit of the exported graph, before any folding; ``fold``: the
    :class:`bnkit.onnx.OnnxFoldReport` when ``fold=True``; ``max_abs_diff`` /
    ``max_rel_diff``: onnxruntime vs PyTorch eval outputs (norm-wise relative),
    the worst over the checked batches (``batch_sizes``); None when not verified (``verify=False``).
    """

    path: str
    opset: int
    findings: list = field(default_factory=list)
    fold: object | None = None
    max_abs_diff: float | None = 0.0
    max_rel_diff: float | None = 0.0
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)


@contextmanager
def _history_dropped(model: nn.Module) -> Iterator[None]:
    """After ``torch.onnx.export`` traces ``model`` with gradients on, each parameter or buffer that had no autograd
    history and came to have some (a forward writing it in place from a value that requires grad) is detached in
    place, so deepcopy and optimizers take the model again; a buffer that is a view of another cannot be detached
    in place and keeps it (the trace sees the model's own tensors, so the graph is the one torch.onnx exports)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if t.grad_fn is None}
    try:
        yield
    finally:
        for t in tensors.values():
            if t.grad_fn is not None and t._base is None:
                t.detach_()


def _fresh(tensors: Iterable[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Copies, detached but requiring grad where the tensor did (a forward may branch on ``x.requires_grad``):
    inputs a forward may write into, outputs that may be views of buffers ``restore()`` resets."""
    return tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)


def _flatten(value) -> list[torch.Tensor]:
    """The tensors of a model's output, in the exported graph's order; None is dropped, as torch.onnx drops it."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    raise TypeError(f"cannot export an output of type {type(value).__name__}")


def _names(given: Sequence[str] | None, count: int, stem: str) -> list[str]:
    """``given`` (checked: one non-empty string per tensor, no two alike; torch.onnx would rename a repeated or empty
    one, and the file's names would not be the ones asked for), else ``stem``, ``stem_0``, ..."""
    if given is None:
        return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]
    names = list(given)
    if len(names) != count:
        raise ValueError(f"{len(names)} {stem} names given for {count} {stem}s")
    if bad := [n for n in names if not isinstance(n, str) or not n]:
        raise ValueError(f"{stem} names must be non-empty strings, got {bad[0]!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{stem} names must differ, got {names}")
    return names


def _batch_axes(names: Sequence[str], runs: Sequence[Sequence[torch.Tensor]], sizes: Sequence[int]) -> dict:
    """``{name: {0: "batch"}}`` for each tensor whose dim 0 has the run's batch size in every run
    (``runs[k][i]``: tensor ``i`` of the run on a batch of ``sizes[k]``); 0-d tensors have no batch axis."""
    return {name: {0: "batch"} for name, seen in zip(names, zip(*runs))
            if all(t.dim() and t.shape[0] == size for t, size in zip(seen, sizes))}


@contextmanager
def _shadowed(model: nn.Module, name: str, value: object) -> Iterator[None]:
    """``model.<name>`` is ``value`` inside, an instance attribute shadowing the class's; after, the instance
    attribute found before (a frozen root layer's pinned ``train``, a caller's own ``forward``) or none."""
    own = vars(model).get(name)
    setattr(model, name, value)
    try:
        yield
    finally:
        if own is None:
            delattr(model, name)
        else:
            setattr(model, name, own)


def _train_calls_ignored(model: nn.Module) -> AbstractContextManager[None]:
    """``model.train(...)`` does nothing inside: ``torch.onnx.export`` calls it on the root (eval, then the mode it
    found), which would run every module's own ``train`` (a frozen layer's pin, a user's override that also sets
    ``requires_grad``); :class:`~bnkit.torch.modules.eval_mode` has set the flags already."""
    return _shadowed(model, "train", lambda mode=True: model)


def _defaults_in_python(model: nn.Module) -> AbstractContextManager[None]:
    """Inside, ``model.forward`` has no named parameters and passes every argument on: ``torch.onnx.export`` appends
    the defaults of the parameters the example inputs leave out to the inputs it traces (``_decide_input_format``
    in torch/onnx/_internal/torchscript_exporter/utils.py), where a number (``scale=2.0``) became a graph input no
    caller feeds and a keyword-only one a positional argument too many; left to Python, they are constants of the
    trace, the values PyTorch's eval output used. Keywords still reach the forward (a pre-hook's, a self-call's)."""
    bound = model.forward
    return _shadowed(model, "forward", lambda *args, **kwargs: bound(*args, **kwargs))


def _batch_of_one(what: str, exc: Exception) -> ExportVerificationError:
    return ExportVerificationError(
        f"{what} fails on the example's first sample alone, the batch of one that checks the dynamic batch axis "
        f"({type(exc).__name__}: {exc}). For a model built for one batch size pass dynamic_batch=False "
        "(bnkit fold: --fixed-batch); nothing written")


def export_onnx(
    model: nn.Module,
    example_inputs: "torch.Tensor | Sequence[torch.Tensor]",
    path: "str | os.PathLike",
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = 17,
    fold: bool = False,
    force: bool = False,
    rtol: float | None = None,
    verify: bool = True,
) -> ExportReport:
    """Export ``model`` in inference mode to ``path`` and check the file; returns an :class:`ExportReport`.

    ``fold=True`` folds BatchNormalization nodes into the Conv/Gemm before them.
    ``force=True`` writes the file despite error-level audit findings (never despite an
    onnxruntime mismatch beyond ``rtol``, norm-wise relative; by default 1e-4, or 1e-2 / 4e-2 for a graph
    holding or computing fp16 / bf16 values, as :func:`bnkit.onnx.fold` uses). The PyTorch side of
    that check runs float32 on CUDA without TF32, as onnxruntime computes
    (:class:`~bnkit.torch.modules.exact_float32`). Raises ValueError for
    BatchNorm layers without running statistics, non-finite or bfloat16 inputs, an output holding no tensor, names
    repeated, empty or given to an input and an output, an opset that is no integer this torch.onnx exports, and
    :class:`ExportVerificationError` when a check fails; then nothing is written.
    ``verify=False`` skips the onnxruntime comparison (the audit still runs), for graphs that draw random
    numbers (a VAE's sampling: onnxruntime and PyTorch draw different ones); the report's diffs are then None.
    ``dynamic_batch=True`` declares dim 0 dynamic (``"batch"``) on the inputs whose dim 0 has the example batch size
    (that of the first input with a dim 0) and on the outputs whose dim 0 has it too and is 1 when PyTorch runs the
    first sample of those inputs alone (the others uncut; with ``verify=False`` too, and a model that fails there is
    refused); 0-d tensors and others (a fixed table) keep their shapes. With an example batch of one every dim 0 of 1
    counts as the batch: give a larger batch to tell them apart. None outputs are dropped, as
    torch.onnx drops them (``output_names`` names the tensors).
    """
    import onnx

    from ..onnx import audit, fold_model
    from ..onnx.graph import RANDOM_OPS
    from ..onnx.verify import NothingComparedError, OnnxRuntimeError, compare, default_tolerance, run

    check_target(path)
    opset = integer(opset, "opset")  # a bool, a float or None refused, not passed on
    newest = getattr(torch.onnx._constants, "ONNX_MAX_OPSET", opset)  # torch/onnx/_constants.py
    if not 7 <= opset <= newest:
        raise ValueError(f"opset must be from 7 to {newest}, the opsets this torch.onnx exports, got {opset}")
    device = parallel_device(model)  # DataParallel / DDP sent inputs there: the module inside is run with them
    model, _ = unwrapped(model)  # the module a wrapper runs: the exporter cannot trace DataParallel or torch.compile
    one = isinstance(example_inputs, (torch.Tensor, nn.utils.rnn.PackedSequence))
    inputs = (example_inputs,) if one else tuple(example_inputs)
    if any(isinstance(t, nn.utils.rnn.PackedSequence) for t in inputs):
        raise TypeError("export_onnx cannot export a model fed a PackedSequence: ONNX has no packed sequences; "
                        "export a model that takes the padded tensor (and lengths) instead")
    if device is not None:
        inputs = tuple(to_device(t, device) for t in inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a tensor or a sequence of tensors")
    refuse_meta([*model.state_dict(keep_vars=True).items(), *((f"input {i}", t) for i, t in enumerate(inputs))],
                "the model or its example inputs", LOAD_REAL_WEIGHTS)
    if any(t.dtype == torch.bfloat16 for t in inputs):
        raise ValueError("bfloat16 example_inputs: NumPy has no bfloat16, so onnxruntime cannot be fed them for the "
                         "check; export a float32 (model.float()) or float16 (model.half()) copy")
    if any(t.is_floating_point() and not torch.isfinite(t).all() for t in inputs):
        raise ValueError("example_inputs contain NaN or Inf; the onnxruntime check needs finite inputs")
    if lazy := uninitialized_lazy(model):
        raise ValueError(f"uninitialized lazy modules (run one forward pass first): {', '.join(lazy)}; exporting "
                         "would create their parameters, with random weights, in your model")
    stateless = [name for name, bn in bn_layers(model) if bn.running_mean is None or bn.running_var is None]
    if stateless:
        raise ValueError(
            f"BatchNorm layers {stateless} have track_running_stats=False: their exported graph would normalise "
            "with batch statistics at inference. Give them running statistics (bnkit recalibrate) before exporting")

    batch = next((int(t.shape[0]) for t in inputs if t.dim()), 0)  # the first input with a dim 0 sets the batch
    batched = [bool(dynamic_batch and t.dim() and t.shape[0] == batch) for t in inputs]  # declared dynamic
    runs = [inputs]
    if batch > 1 and any(batched):  # the first sample alone: decides which outputs are batched, and checks the graph
        runs.append(tuple(t[:1] if cut else t for t, cut in zip(inputs, batched)))
    # torch.onnx.export calls model.train() twice, and cannot trace modules compiled in place; every run starts
    # from the state the model was given (a forward may write buffers or attributes, even in eval mode), and the
    # model is left in it, also when a check fails
    with eval_mode(model), _train_calls_ignored(model), eager_calls(model), SavedState(model) as saved:
        with torch.no_grad(), exact_float32():  # what onnxruntime computes: float32 without TF32
            # every run and the trace get copies (also of tensors made under torch.inference_mode): a model that
            # writes into its input (x.sub_(mean)) must neither change the caller's tensors nor feed a later run, the
            # trace or onnxruntime what an earlier run left there
            expected = [_fresh(_flatten(model(*_fresh(inputs))))]  # also counts the outputs to name
            if len(runs) > 1:
                saved.restore()
                try:
                    expected.append(_fresh(_flatten(model(*_fresh(runs[1])))))
                except Exception as exc:  # the model's own error, whatever its type
                    raise _batch_of_one("the model", exc) from exc
        saved.restore()
        if not expected[0]:
            raise ValueError("the model's output holds no tensors: there is nothing to export")
        in_names = _names(input_names, len(inputs), "input")
        out_names = _names(output_names, len(expected[0]), "output")
        if both := sorted(set(in_names) & set(out_names)):
            raise ValueError(f"names used for an input and an output alike: {both}")
        sizes = (batch, 1)[:len(expected)]  # an output whose dim 0 is 1 on the first sample alone too is batched
        axes = ({**_batch_axes(in_names, [inputs], sizes), **_batch_axes(out_names, expected, sizes)}
                if dynamic_batch else None)
        buffer = io.BytesIO()  # exported in memory: the file is written only once every check passed
        # traced with gradients on, as torch.onnx.export traces for the user (under no_grad PyTorch picks fused
        # attention kernels that do not export)
        with warnings.catch_warnings(), _defaults_in_python(model), _history_dropped(model):
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, _fresh(inputs), buffer, dynamo=False, training=torch.onnx.TrainingMode.EVAL, opset_version=opset,
                do_constant_folding=False, input_names=in_names, output_names=out_names, dynamic_axes=axes)

    proto = onnx.load_from_string(buffer.getvalue())
    report = ExportReport(path=os.fspath(path), opset=opset)
    report.findings = audit(proto).findings  # before folding, which would hide the statistics it folds away
    errors = [f for f in report.findings if f.severity == "error"]
    if errors and not force:
        raise ExportVerificationError(
            "the exported graph has error-level findings; nothing written (force=True writes it anyway):\n"
            + "\n".join(f"  {f.layer}: {f.finding} ({f.evidence})" for f in errors))
    if fold:
        proto, report.fold = fold_model(proto, verify=False)
    declared = {i.name for i in proto.graph.input}  # the exporter drops inputs the forward never reads
    for feeds, want, size in zip(runs if verify else [], expected, (batch, 1)):
        try:
            got = run(proto, {n: t.detach().cpu().numpy() for n, t in zip(in_names, feeds) if n in declared})
            abs_diff, rel_diff = compare([w.detach().cpu().double().numpy() for w in want],
                                         [np.asarray(g) for g in got])
        except NothingComparedError:  # the first sample alone ran and gave no finite value: the batch checked those
            if feeds is inputs:
                raise
            report.batch_sizes.append(size)
            continue
        except (OnnxRuntimeError, ValueError) as exc:  # cannot run, or output shapes differ
            if feeds is inputs:
                raise
            raise _batch_of_one("the exported graph", exc) from exc
        report.max_abs_diff = max(report.max_abs_diff, abs_diff)
        report.max_rel_diff = max(report.max_rel_diff, rel_diff)
        report.batch_sizes.append(size)
    rtol = default_tolerance(proto) if rtol is None else rtol
    if not verify:
        report.max_abs_diff = report.max_rel_diff = None
    elif not report.max_rel_diff <= rtol:
        random = sorted({n.op_type for n in proto.graph.node if n.op_type in RANDOM_OPS and n.op_type != "Dropout"})
        raise ExportVerificationError(
            f"onnxruntime differs from PyTorch eval output: max relative difference {report.max_rel_diff:.3g} > "
            f"{rtol:g} (max abs {report.max_abs_diff:.3g}); nothing written"
            + (f"; the graph draws random numbers ({', '.join(random)}), which onnxruntime and PyTorch draw "
               "differently: verify=False (--no-verify) skips this check" if random else ""))
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
    return report
