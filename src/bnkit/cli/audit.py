"""``bnkit audit``: BatchNorm problems of a checkpoint, a model, or a model on data, as a table or JSON.

Exit status: 0 when no finding is an error, 1 when one is (for CI pipelines) or the run
itself fails (out of memory), 2 for bad usage or bad input: a file that cannot be read
(a pickle with code in it included), or data the model cannot run on (wrong shape or
dtype). The other commands use the same convention (2: usage or input; 1: the command
ran and failed, or its result did).
"""
from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from ..file_kinds import looks_like_onnx, looks_like_safetensors
from ._stdout import ReaderGoneSink
from .app import app, console, fail, needs, note, shown
from .common import (USER_CODE_ERRORS, UsageError, add_cwd_to_path, build_model, check_input_file, describe_error,
                     dtype_change, load_forward, load_inputs, parse_device, print_json, reworded)
from .tables import print_table

_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


@app.command("audit")
def audit_command(
    file: Path = typer.Argument(..., help="Checkpoint (.pt/.pth/.bin/.ckpt, .safetensors) or ONNX model (.onnx, or "
                                  "read as one by its content, e.g. a model.pb)."),
    model: Optional[str] = typer.Option(
        None, "--model", help="package.module:factory building the model the checkpoint belongs to."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Inputs (.npy, .npz, .pt, .safetensors): audits the model on them (needs --model, or a "
        "whole pickled model with --trust)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size for --data (default 64)."),
    train_batch_size: Optional[int] = typer.Option(
        None, help="Training batch size (at least 2), for the running statistics' noise (default --batch-size)."),
    max_batches: Optional[int] = typer.Option(None, help="Use at most this many batches of --data (at least 1)."),
    forward: Optional[str] = typer.Option(
        None, help="package.module:fn called as fn(model, batch) for each batch of --data, e.g. to return "
                   "batch-first outputs; default: model(batch)."),
    trust: bool = typer.Option(
        False, "--trust", help="Unpickle arbitrary objects in the checkpoint. ONLY for files you made yourself."),
    device: Optional[str] = typer.Option(
        None, help="Run the model on this device (cpu, cuda, cuda:N, mps; needs a model); default: the CPU."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Find BatchNorm problems and say how to fix them. Exits 1 when an error-level finding exists, 2 on bad input."""
    try:
        check_input_file(file, "checkpoint or ONNX")
    except UsageError as exc:
        raise fail(str(exc)) from None
    onnx_file = _is_onnx(file)
    if onnx_file and (model is not None or data is not None or device is not None or forward is not None):
        raise fail("--model, --data, --forward and --device apply to PyTorch checkpoints, not to ONNX files "
                   "(an ONNX file's BatchNormalization nodes are read, nothing runs)")
    if data is not None and model is None and not trust:
        raise fail("--data needs --model (or a whole pickled model, read with --trust): the data is run through "
                   "the model")
    given = [name for name, value in (("--batch-size", batch_size), ("--train-batch-size", train_batch_size),
                                      ("--max-batches", max_batches)) if value is not None]
    if given and data is None:  # they would do nothing: refused, as --forward is
        raise fail(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to --data, which is not given"
                   + (" (an ONNX file's nodes are read, nothing runs)" if onnx_file else ""))
    batch_size = 64 if batch_size is None else batch_size
    if batch_size < 2:
        raise fail(f"--batch-size must be at least 2 (each batch is normalized with its own statistics), "
                   f"got {batch_size}")
    if train_batch_size is not None and train_batch_size < 2:
        raise fail(f"--train-batch-size must be at least 2 (BatchNorm trains on batch statistics, which need "
                   f"two samples), got {train_batch_size}")
    if forward is not None and data is None:
        raise fail("--forward needs --data: it feeds the data's batches to the model")
    if max_batches is not None and max_batches < 1:
        raise fail(f"--max-batches must be at least 1, got {max_batches}")
    if device is not None and model is None and not trust:
        raise fail("--device needs --model (or a whole pickled model, read with --trust): without it the "
                   "checkpoint's tensors are only read, nothing runs")
    needs(*(("onnx",) if onnx_file else ("torch",)), extra="onnx" if onnx_file else "torch")
    try:
        run_on = parse_device(device) if device is not None else None
    except UsageError as exc:
        raise fail(str(exc)) from None
    # the user's factory, forward or trusted pickle may print: their output goes to stderr, stdout holds the report
    with contextlib.redirect_stdout(ReaderGoneSink(sys.stderr)):  # a reader of stderr gone: their prints dropped
        if onnx_file:
            report = _onnx_report(file)
        else:
            report = _torch_report(file, model, data, batch_size, train_batch_size, max_batches, trust, run_on,
                                   forward)

    if as_json:
        print_json(report)
    else:
        _print(report)
    if not report["ok"]:
        raise typer.Exit(1)


def _is_onnx(file: Path) -> bool:
    """An ONNX model: an .onnx file, or one whose first bytes are a serialized ModelProto's (a model.pb, as converters
    name them)."""
    if file.suffix.lower() in (".onnx", ".safetensors"):
        return file.suffix.lower() == ".onnx"
    try:
        with open(file, "rb") as f:
            head = f.read(64)
        return looks_like_onnx(head) and not looks_like_safetensors(head, file.stat().st_size)
    except OSError:  # the checkpoint loader reports it
        return False


def _onnx_report(file: Path) -> dict[str, Any]:
    from ..findings import worst_severity
    from ..onnx import audit as onnx_audit

    try:
        result = onnx_audit(file)
    except (ValueError, OSError) as exc:
        raise fail(f"cannot audit {file}: {exc}") from None
    findings = sorted(result.findings, key=lambda f: ("error", "warning", "info").index(f.severity))
    return {"target": str(file), "depth": "onnx", "ok": bool(result.ok), "worst": worst_severity(findings),
            "layers": [node["name"] for node in result.nodes], "findings": [f.to_dict() for f in findings],
            "shifts": [], "train_eval_gap": None, "batch_coupling": None,
            "batches": 0}  # the keys of AuditReport.to_dict(), which other input kinds print


def _torch_report(file, model_spec, data_file, batch_size, train_batch_size, max_batches, trust,
                  device, forward_spec) -> dict[str, Any]:
    import torch

    from ..torch.audit import audit, checkpoint_report, models_in
    from ..torch.io import UnsafeCheckpointError, load_checkpoint, pickled_module, split_state, weight_sets

    if trust:
        add_cwd_to_path()  # a pickled module names its classes by module path, as --model specs do
    try:
        loaded = load_checkpoint(file, trust=trust, mmap=True)  # what the audit reads of a large file: mapped
        pickled = pickled_module(loaded) if model_spec is None else None
        found = weight_sets(loaded, file) if pickled is not None and data_file is None and device is None else None
        if found is not None and len(models_in(found)) > 1:
            pickled = None  # a pickled model beside another (its EMA): every one read from its buffers, as the API does
        alone = model_spec is None and pickled is None
        if alone and data_file is None and device is None:  # the checkpoint alone: every set of weights in it
            report = checkpoint_report(loaded, str(file), found)  # as bnkit.torch.audit(path) reads it, sets once
        elif not alone:  # the one set that loads into the model
            state, dropped = split_state(loaded, file)
    except UnsafeCheckpointError as exc:
        raise fail(str(exc)) from None
    except (ValueError, OSError) as exc:
        message = str(exc)  # bnkit.torch.io's messages name the file already
        raise fail(message if str(file) in message else f"cannot read {file}: {message}") from None
    except USER_CODE_ERRORS as exc:  # noqa: BLE001 - unpickling a trusted file runs its code: anything can go wrong
        if not trust:
            raise
        raise fail(_trusted_load_error(file, exc)) from None
    if alone and (data_file is not None or device is not None):
        raise fail(f"--data and --device need --model: {file} holds no pickled model to run, only tensors")
    if not alone:
        # a whole pickled model (with --trust) is audited as one, its eps and momentum included, in eval mode like a
        # checkpoint's: torch.save keeps whatever mode it was saved in, which says nothing about its deployment
        net = _build_model(model_spec, state, dropped, file) if pickled is None else pickled.eval()
        if device is not None:
            net.to(device)  # the audit moves each data batch to the model's device
        inputs = None if data_file is None else _load_data(data_file)
        try:
            feed = load_forward(forward_spec) if forward_spec is not None else None
        except UsageError as exc:
            raise fail(str(exc)) from None
        try:
            report = audit(net, inputs, forward=feed, batch_size=batch_size, train_batch_size=train_batch_size,
                           max_batches=max_batches)
        except torch.OutOfMemoryError as exc:  # the input was fine: the run failed (exit 1, as recalibrate)
            raise fail(f"the audit ran out of memory (try a smaller --batch-size): {exc}", code=1) from None
        except ValueError as exc:
            if isinstance(exc.__cause__, torch.OutOfMemoryError):
                raise fail(f"{exc} (try a smaller --batch-size)", code=1) from None
            text = str(exc) if forward_spec is None else \
                str(exc).replace("the model or forward=", f"the model or --forward {forward_spec!r}")
            raise fail(_cli_words(text) + _dtype_hint(inputs, exc)) from None
        except SystemExit as exc:  # the model's forward or --forward (their other exceptions: the ValueErrors above)
            who = "the model" if forward_spec is None else f"the model or --forward {forward_spec!r}"
            raise fail(f"{who} raised {describe_error(exc)} while audited") from None
    out = report.to_dict()
    out["target"] = str(file)
    for finding in out["findings"]:
        for key in ("finding", "evidence", "fix"):
            finding[key] = _cli_words(finding[key])
    return out


#: The library's advice in the command's words: its Python arguments are options here (the examples first).
_CLI_WORDS = (
    ("e.g. forward=lambda model, x: model(x).transpose(0, 1)",
     "e.g. a fn(model, x) returning model(x).transpose(0, 1)"),
    ("forward=lambda m, x: m(x.transpose(0, 1))", "--forward package.module:fn returning model(x.transpose(0, 1))"),
    ("forward=", "--forward package.module:fn"),
    ("train_batch_size=", "--train-batch-size"),
)


def _cli_words(text: str) -> str:
    """A finding of :func:`bnkit.torch.audit` with its Python arguments (``forward=``, ``train_batch_size=``) as
    this command's options."""
    return reworded(text, _CLI_WORDS)


def _trusted_load_error(file: Path, exc: BaseException) -> str:
    """Unpickling with ``--trust`` runs the file's code, which can raise anything ``bnkit.torch.io`` does not name."""
    return (f"cannot load {file} with --trust: unpickling it raised {describe_error(exc)}; if you made it, "
            "load it where it was made and save model.state_dict() (or safetensors), which needs no --trust")


def _build_model(spec: str, state, dropped: dict[str, str], file: Path):
    from ..torch.io import load_weights_into

    try:
        net = build_model(spec)
    except UsageError as exc:
        raise fail(str(exc)) from None
    try:
        loaded = load_weights_into(net, state, dropped=dropped)
    except (ValueError, RuntimeError) as exc:
        raise fail(f"cannot load {file} into {spec}: {str(exc).strip()}") from None
    if changed := dtype_change(net, loaded, str(file)):
        note(changed)
    # a checkpoint does not store train/eval flags: audit the model as it is deployed
    return net.eval()


def _dtype_hint(inputs, exc: ValueError) -> str:
    """A hint when the model failed on integer data (PyTorch's errors name only the scalar types, each its own way)."""
    if inputs is None or inputs.is_floating_point() or "the model failed" not in str(exc):
        return ""
    return f" (the data is {inputs.dtype}; if it holds features, save it as float32)"


def _load_data(path: Path):
    """The inputs in ``--data`` (see :func:`bnkit.cli.common.load_inputs`); unreadable files fail with exit 2."""
    import torch

    from ..torch.io import UnsafeCheckpointError

    try:
        inputs = load_inputs(path)
    except (UnsafeCheckpointError, ValueError) as exc:
        raise fail(str(exc)) from None
    return torch.from_numpy(inputs) if not isinstance(inputs, torch.Tensor) else inputs


def _print(report: dict[str, Any]) -> None:
    findings = report["findings"]
    layers = len(report.get("layers") or [])
    if findings:
        # names, paths and texts go in as Text, never as markup: escape() doubles a trailing backslash ("bn\\")
        table = Table(title=Text(f"BatchNorm audit of {shown(report['target'])} ({report['depth']})"), show_lines=True)
        for col, width in (("severity", 8), ("layer", 24), ("finding", 30), ("evidence", 48), ("fix", 36)):
            table.add_column(col, max_width=width if col != "severity" else None, overflow="fold")
        for f in findings:
            table.add_row(f"[{_STYLE[f['severity']]}]{f['severity']}[/]",
                          *(Text(shown(f[k])) for k in ("layer", "finding", "evidence", "fix")))
        print_table(console, table)
    if report.get("shifts"):
        shifts = Table(title="Data vs running statistics, ranked by KL per channel beyond what sampling noise gives "
                             "(z_eq = equivalent mean shift in std; noise z_eq: that of sampling noise alone)")
        for col in ("rank", "layer", "z_eq", "noise z_eq", "worst channel", "mean shift (std)", "variance ratio"):
            shifts.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
        top = report["shifts"][:10]
        if len(top) < len(report["shifts"]):
            shifts.caption = f"the top {len(top)} of {len(report['shifts'])} layers (--json lists all)"
        for rank, s in enumerate(top, start=1):
            s = {k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in s.items()}  # JSON's strings for them
            noise = "-" if s.get("sampling_kl") is None else f"{math.sqrt(2 * s['sampling_kl']):.3g}"
            shifts.add_row(str(rank), Text(shown(s["layer"])), f"{s['z_eq']:.3g}", noise, str(s["worst_channel"]),
                           f"{s['mean_shift']:+.3g}", f"{math.exp(s['log_var_ratio']):.3g}")
        print_table(console, shifts)
    errors = sum(f["severity"] == "error" for f in findings)
    warnings = sum(f["severity"] == "warning" for f in findings)
    if errors:
        console.print(f"[bold red]{errors} error-level finding(s)[/]"
                      + (f", {warnings} warning(s)" if warnings else ""))
    elif warnings:
        console.print(f"[bold yellow]no error-level findings; {warnings} warning(s)[/]")
    else:
        console.print(Text.assemble(("no BatchNorm problems found", "bold green"),
                                    f" in {report['target']} ({layers} BatchNorm layer(s) audited, {report['depth']})"))
