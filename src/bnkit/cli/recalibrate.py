"""``bnkit recalibrate``: exact BatchNorm statistics for a saved model, written to a new file atomically.

Exit status: 0 when the file was written; 2 for bad usage or input (arguments, unreadable or
mismatched files, data the model cannot run on, an exception from the user's code named by --model,
--data or --forward: one line naming its type and where it came from), checked before anything is
written; 1 when a run that started fails (non-finite statistics, out of memory, the file cannot be
written).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .app import app, console, fail, needs, note, shown, warnings_as_notes
from .common import INPUT_KEYS, USER_CODE_ERRORS, check_input_array, describe_error, raised_by_bnkit, reworded
from .tables import print_table

#: The library's advice (:func:`bnkit.torch.recalibrate`'s errors) with its Python arguments as this command's options.
_CLI_WORDS = (("pass on_nonfinite='skip'", "pass --on-nonfinite skip"),
              ("revert_frozen(model) first", "bnkit.torch.revert_frozen(model) in the --model factory first"),
              ("pass forward=, e.g. forward=lambda model, batch: model(**batch)",
               "pass --forward package.module:fn, called as fn(model, batch), e.g. one returning model(**batch)"))


def _batches_of(array: Any, batch_size: int, dtype: Any) -> list[Any]:
    """Consecutive batches of a whole array; a last batch of one sample joins the one before it."""
    import numpy as np
    import torch

    array = array if isinstance(array, torch.Tensor) else np.asarray(array)
    check_input_array(array, "the data")
    x = torch.as_tensor(array)
    if x.ndim < 2:
        raise ValueError(f"input array of shape {tuple(x.shape)} has no batch axis: expected (N, features...)")
    if x.is_floating_point():
        x = x.to(dtype)
    if len(x) < 2:
        raise ValueError(f"input array holds {len(x)} sample(s); BatchNorm statistics need at least 2")
    return [x[r.start:r.stop] for r in _index_batches(len(x), batch_size)]


def _index_batches(n: int, batch_size: int) -> list[range]:
    """Consecutive index ranges of ``batch_size``; a last batch of one sample joins the one before it."""
    batches = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [range(batches[-2].start, n)]
    return batches


class _StreamBatches:
    """Batches of ``batch_size`` consecutive samples of an IterableDataset, collated as a DataLoader does
    (``default_collate``); a last batch of one sample joins the one before it."""

    def __init__(self, dataset: Iterable[Any], batch_size: int) -> None:
        self.dataset, self.batch_size = dataset, batch_size

    def __iter__(self) -> Iterator[Any]:
        from torch.utils.data import default_collate

        from ..torch.modules import at_most

        samples = iter(self.dataset)
        batch = list(at_most(samples, self.batch_size))
        while batch:
            following = list(at_most(samples, self.batch_size))
            if len(following) == 1:
                batch, following = batch + following, []
            yield default_collate(batch)
            batch = following


class _DataError(Exception):
    """The user's data (a Dataset, a DataLoader, a generator) raised while producing a batch; ``__cause__``."""


def _model_input(batch: Any, dtype: Any) -> Any:
    """``batch`` prepared as array data is (:func:`_batches_of`): floating NumPy arrays and tensors, also nested
    (tuples, lists and dicts as ``default_collate`` makes them, dataclass instances; see
    :func:`bnkit.torch.modules.map_nested`), become tensors of the model's floating ``dtype``; other numeric ones
    become tensors of their own dtype (integers for models that take indices); anything else is left as it is."""
    import numpy as np
    import torch

    from ..torch.modules import map_nested

    def prepare(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray):
            if leaf.dtype.kind not in "biufc":
                return leaf  # strings, dates, records: the user's --forward may know what to do with them
            try:
                leaf = torch.as_tensor(leaf)
            except (TypeError, ValueError, RuntimeError):  # e.g. a byte order PyTorch cannot take: left for the model
                return leaf
        return leaf.to(dtype) if leaf.is_floating_point() else leaf

    return map_nested(batch, prepare, (np.ndarray, torch.Tensor))


class _Reading:
    """Iterates ``batches``, each made model input by ``prepare``; an exception from producing a batch is
    re-raised as :class:`_DataError`, so a failure of the data is told apart from one of the model."""

    def __init__(self, batches: Iterable[Any], prepare: Callable[[Any], Any] = lambda batch: batch) -> None:
        self.batches, self.prepare = batches, prepare

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]  # TypeError without one: no total for the bar

    def __iter__(self) -> Iterator[Any]:
        try:
            batches = iter(self.batches)
        except USER_CODE_ERRORS as exc:  # noqa: BLE001 - the user's __iter__
            raise _DataError() from exc
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except USER_CODE_ERRORS as exc:  # noqa: BLE001 - the user's __getitem__/__next__/collate
                raise _DataError() from exc
            yield self.prepare(batch)


def _load_data(spec: str, key: Optional[str], batch_size: int, dtype: Any) -> Any:
    """Batches from an array file, or from ``package.module:factory`` returning a Dataset (map-style or
    iterable, of samples), an array or batches."""
    import numpy as np
    import torch

    from .common import ARRAY_SUFFIXES, STATE_DICT_SUFFIXES, check_input_file, load_inputs, resolve_spec

    if spec.lower().endswith(ARRAY_SUFFIXES + STATE_DICT_SUFFIXES) or Path(spec).is_file():  # read by its content
        return _batches_of(load_inputs(Path(spec), key, "--data-key", factories=True), batch_size, dtype)
    if ":" not in spec:  # a path: a folder, a missing or unreadable file is named for what it is
        check_input_file(Path(spec), "data")
        raise ValueError(f"expected a {', '.join(ARRAY_SUFFIXES + STATE_DICT_SUFFIXES)} file or "
                         "package.module:factory")
    if key is not None:  # an option that would do nothing is refused, as for files without named arrays
        raise ValueError(f"--data-key {key!r} names an array in a data file; --data {spec} is a factory, whose "
                         "result is used as it is: leave --data-key out")
    obj = resolve_spec(spec)
    if callable(obj) and not isinstance(obj, torch.utils.data.Dataset):
        obj = obj()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _batches_of(obj, batch_size, dtype)
    if isinstance(obj, torch.utils.data.IterableDataset):
        return _StreamBatches(obj, batch_size)
    if isinstance(obj, torch.utils.data.Dataset) and hasattr(obj, "__len__"):
        return torch.utils.data.DataLoader(obj, batch_sampler=_index_batches(len(obj), batch_size))
    if hasattr(obj, "__iter__"):
        return obj  # already batches (a DataLoader, a list of tensors, ...)
    raise ValueError(f"{spec} gave a {type(obj).__name__}: expected a Dataset, an array, or an iterable of batches")


def _report_table(report: Any) -> Table:
    table = Table()
    for column in ("layer", "samples", "values/channel", "max |mean shift| (old std)", "new/old variance"):
        table.add_column(column, justify="left" if column == "layer" else "right", overflow="fold")  # numbers whole
    for row in report.rows():
        unused = row["values_per_channel"] == 0
        table.add_row(
            Text(shown(row["layer"])), str(row["samples"]), str(row["values_per_channel"]),
            "unused" if unused else f"{row['max_mean_shift_std']:.4g}",
            "unused" if unused else f"{row['var_ratio_min']:.3g} .. {row['var_ratio_max']:.3g}",
        )
    return table


def _in_layout_of(checkpoint: Any, weights: Path, new: dict, out_path: Path) -> tuple[Any, dict[str, str] | None]:
    """What to write for the recalibrated state dict ``new``, and the safetensors metadata: the ``--weights``
    file's layout (:func:`bnkit.torch.io.checkpoint_with`: its other entries and key prefixes kept), its metadata if
    it is a safetensors file. A .safetensors output, which holds tensors only, gets the weights alone under the
    file's names, with a note naming what it leaves out; a file holding a pickled module gives ``new`` alone."""
    import torch

    from ..torch.io import checkpoint_with, safetensors_metadata

    metadata = safetensors_metadata(weights) if out_path.suffix.lower() == ".safetensors" else None
    try:
        kept, alone, others = checkpoint_with(checkpoint, weights, new)
    except ValueError as exc:
        note(f"{out_path} holds the model's state dict alone ({exc})")
        return new, metadata
    if metadata is None:
        return kept, metadata
    if others:
        note(f"{out_path} holds the weights alone: safetensors holds tensors only, so the other entries of {weights} "
             f"({', '.join(others[:4])}{', ...' if len(others) > 4 else ''}) are left out; name the output .pt to "
             "keep them")
    return {k: v for k, v in alone.items() if isinstance(v, torch.Tensor)}, metadata


def _integer_hint(loader: Any, dtype: Any) -> str:
    """A hint when array inputs are integers but the model computes in floating point."""
    import torch

    first = loader[0] if isinstance(loader, list) and loader else None
    if not isinstance(first, torch.Tensor) or first.is_floating_point() or first.is_complex():
        return ""
    name = str(dtype).replace("torch.", "")
    return (f" (the data is {str(first.dtype).replace('torch.', '')} but the model computes in {name}: "
            f"save the inputs as {name}, e.g. np.save(path, x.astype('{name}')); integer inputs are passed "
            "unchanged for models that take indices)")


@app.command("recalibrate")
def recalibrate_command(
    model: str = typer.Option(..., help="package.module:factory returning the model (or the model object itself)."),
    output: str = typer.Option(
        ..., "--output", "-o", help="New file for the recalibrated weights: .pt/.pth (torch.save) or .safetensors, "
                  "in the --weights file's layout (its other entries and key prefixes kept), else the model's "
                  "state dict. Its folder must exist; it may not be an input file."),
    data: str = typer.Option(
        ..., help="Inputs: a .npy/.npz array file, a .pt/.pth/.safetensors tensor file, or "
                  "package.module:factory returning a Dataset (map-style or iterable) of samples, an array "
                  "or batches."),
    weights: Optional[Path] = typer.Option(
        None, help="State dict or .safetensors to load first (loaded with weights_only=True)."),
    batches: Optional[int] = typer.Option(None, help="Use at most this many batches (default: all the data)."),
    batch_size: int = typer.Option(64, help="Batch size when --data is an array or a Dataset (also iterable)."),
    data_key: Optional[str] = typer.Option(
        None, help="Array name inside an .npz/.pt/.safetensors file holding several. Default: its only array, "
                   f"else the first present of {', '.join(INPUT_KEYS)}."),
    forward: Optional[str] = typer.Option(
        None, help="package.module:fn called as fn(model, batch), for batches that are dicts or several inputs."),
    device: Optional[str] = typer.Option(
        None, help="Run on this device (cpu, cuda, cuda:N, mps); default: where the model is."),
    on_nonfinite: str = typer.Option("raise", help="'raise' on a NaN/Inf activation, or 'skip' such batches."),
    trust: bool = typer.Option(
        False, "--trust", help="Allow a pickled checkpoint with code in it (only files you made)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Recompute every BatchNorm layer's running mean/variance exactly over the data, and save the weights.

    Use after fine-tuning, weight averaging (SWA), pruning or quantization, or for a new data domain.
    The model runs in eval mode with only its BatchNorm layers using batch statistics. The output is
    written atomically: on any failure nothing is written and the input weights are untouched.
    Exit status: 0 written, 2 bad usage or input, 1 the run failed.
    """
    needs("torch", extra="torch")
    import torch

    from ..torch import recalibrate
    from ..torch.io import UnsafeCheckpointError, load_checkpoint, load_weights_into, save_state_dict_file, split_state
    from ..torch.modules import input_dtype_device
    from ..torch.recalibrate import StatisticsRangeError, one_xy_batch
    from .common import (STATE_DICT_SUFFIXES, UsageError, build_model, check_output, check_safetensors_output,
                         dtype_change, load_forward, parse_device)

    if batches is not None and batches < 1:
        raise fail(f"--batches must be at least 1, got {batches}")
    if batch_size < 2:
        raise fail(f"--batch-size must be at least 2 (BatchNorm needs 2 values per channel), got {batch_size}")
    if on_nonfinite not in ("raise", "skip"):
        raise fail(f"--on-nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    try:
        out_path = check_output(output, suffixes=STATE_DICT_SUFFIXES, what="state dict",
                              inputs=[weights, data])  # a --data spec names no file
        run_on = parse_device(device) if device is not None else None
    except UsageError as exc:
        raise fail(str(exc))
    try:
        net = build_model(model)
    except UsageError as exc:
        raise fail(str(exc))
    if weights is not None:
        try:
            checkpoint = load_checkpoint(weights, trust=trust)
            state, dropped = split_state(checkpoint, weights)
            loaded = load_weights_into(net, state, dropped=dropped)
        except (UnsafeCheckpointError, FileNotFoundError, ValueError, RuntimeError) as exc:
            raise fail(f"cannot load {weights}: {exc}")
        except USER_CODE_ERRORS as exc:  # noqa: BLE001 - a trusted pickle runs its own code, which may raise anything
            raise fail(f"cannot load {weights}: unpickling it raised {describe_error(exc)}")
        if changed := dtype_change(net, loaded, str(weights)):
            note(changed)
    try:
        check_safetensors_output(net, out_path)
    except UsageError as exc:
        raise fail(str(exc)) from None
    if run_on is not None:
        net.to(run_on)
    dtype, where = input_dtype_device(net)  # batches go where the model is unless --device says otherwise, as in
    run_on = where if run_on is None else run_on  # `bnkit fold` (a factory may return model.cuda())
    try:
        loader = _load_data(data, data_key, batch_size, dtype)
    except USER_CODE_ERRORS as exc:  # noqa: BLE001 - the user's factory may raise anything
        raise fail(f"cannot load data from {data!r}: {describe_error(exc)}")
    try:
        feed = load_forward(forward) if forward is not None else None
    except UsageError as exc:
        raise fail(str(exc))
    try:
        prepare = (lambda batch: batch) if feed is not None else (lambda batch: _model_input(batch, dtype))
        with warnings_as_notes(lambda text: reworded(text, _CLI_WORDS)):
            report = recalibrate(net.eval(), _Reading(loader, prepare),
                                 num_batches=batches, forward=feed, device=run_on, on_nonfinite=on_nonfinite,
                                 progress=progress)
    except torch.OutOfMemoryError as exc:
        raise fail(f"recalibration ran out of memory, nothing written (try a smaller --batch-size; the pass also "
                   f"holds one copy of the model's parameters and buffers, whatever the batch size): {exc}", code=1)
    except _DataError as exc:
        raise fail(f"reading a batch of the data from {data!r} failed, nothing written: {describe_error(exc.__cause__)}")
    except USER_CODE_ERRORS as exc:  # noqa: BLE001 - bnkit's checks, or the user's model/--forward failing
        text = str(exc)
        if not raised_by_bnkit(exc):  # the user's code, or PyTorch inside it (shapes, dtypes)
            text = f"{'the model' if feed is None else f'the model or --forward {forward!r}'} raised {describe_error(exc)}"
        else:  # the library's advice names its Python arguments: here they are options
            text = reworded(text, _CLI_WORDS)
            if isinstance(exc, Warning):  # PYTHONWARNINGS=error (or -W error) made bnkit's own warning an error
                raise fail(f"recalibration stopped, nothing written: a warning the warning filters in force make an "
                           f"error: {text}")
            if isinstance(exc, ValueError):  # bnkit's checks: non-finite or out of range (1), bad input (2)
                raise fail(f"recalibration failed, nothing written: {text}",
                           code=1 if isinstance(exc, StatisticsRangeError) else 2)
        hint = _integer_hint(loader, dtype) if isinstance(exc, (TypeError, RuntimeError)) else ""  # dtype errors
        failed = -1
        if notes := [n for n in getattr(exc, "__notes__", []) if n.startswith("recalibrate: ")]:
            text += f" ({notes[0].removeprefix('recalibrate: ').split('; ')[0]})"  # which batch, as the library says
            failed = int(re.search(r"data batch (\d+)", notes[0]).group(1))
        if one_xy_batch(loader, failed):
            hint += (f"; {data} gave a pair of tensors, each taken for a batch: a factory giving one (inputs, "
                     "targets) batch should return [batch]")
        raise fail(f"the model cannot run on the data from {data!r}, nothing written: {text}{hint}")
    if report.layers and not any(layer.updated for layer in report.layers):  # an unchanged copy is no result
        unread = f" ({len(report.unread_layers)} reached only with no input to measure)" if report.unread_layers else ""
        raise fail(f"recalibration changed nothing, nothing written: the data from {data!r} reached none of the "
                   f"{len(report.layers)} BatchNorm layer(s){unread} in {report.batches} batch(es)"
                   + ("" if feed is None else f"; check that --forward {forward!r} calls the model"), code=1)
    written, metadata = net.state_dict(), None
    if weights is not None:
        written, metadata = _in_layout_of(checkpoint, weights, written, out_path)
    try:
        save_state_dict_file(written, out_path, metadata=metadata)
    except Exception as exc:  # noqa: BLE001
        raise fail(f"cannot write {output}: {exc}", code=1)
    console.print(str(report).splitlines()[0].strip(), highlight=False, markup=False)
    print_table(console, _report_table(report))
    if report.unused_layers:
        console.print(f"[yellow]not reached by the data, left unchanged:[/] {escape(', '.join(report.unused_layers))}")
    if report.unread_layers:
        console.print("[yellow]reached, but no call gave their own forward an input to measure (see the note), left "
                      f"unchanged:[/] {escape(', '.join(report.unread_layers))}")
    console.print(f"wrote {output}", markup=False)
