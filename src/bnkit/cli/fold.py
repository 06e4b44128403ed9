"""``bnkit fold``: fold BatchNorm into the layers before it, in an ONNX file or a PyTorch model.

A folded PyTorch state dict no longer fits the original architecture (folded BN layers are gone,
some layers gained a bias), so the fold report is saved beside it as ``<output stem>.fold.json``:
``FoldReport.from_dict(json.load(...)).restructure(model)`` rebuilds the folded structure.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from .app import app, console, fail, needs, note, shown
from .common import print_json, reworded
from .tables import print_table


def _shape(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.lower().split("x")]
    except ValueError:
        dims = []
    if not dims or any(d <= 0 or d >= 1 << 63 for d in dims):  # a tensor's sizes are int64
        raise fail(f"bad shape {text!r}: expected positive sizes joined by 'x', e.g. 1x3x224x224")
    return dims


def _print_rows(folded: list[tuple[str, str]], left: dict[str, str], title: str) -> None:
    # names, paths and reasons go in as Text, never as markup: escape() doubles a trailing backslash ("bn\\")
    table = Table(title=Text(shown(title)))
    table.add_column("BatchNorm", overflow="fold")  # a narrow console folds long names, never cuts them
    table.add_column("result", overflow="fold")
    for bn, into in folded:
        table.add_row(Text(shown(bn)), Text.assemble(("folded into", "green"), f" {shown(into)}"))
    for bn, reason in left.items():
        table.add_row(Text(shown(bn)), Text.assemble(("left:", "yellow"), f" {shown(_cli_words(reason))}"))
    print_table(console, table)


def _onnx_rows(folded: list) -> list[tuple[str, str]]:
    """Table rows of the ONNX fold's folded nodes (:class:`bnkit.onnx.fold.FoldedNode`): BN node, node it went into."""
    return [(f.bn, f"{f.into} ({f.op}{'; ' + '; '.join(f.notes) if f.notes else ''})") for f in folded]


def _torch_rows(folded: list) -> list[tuple[str, str]]:
    """Table rows of fold_bn's folded layers (:class:`bnkit.torch.FoldedBN`): BN layer, layer it went into."""
    return [(f.bn, f"{f.into} ({f.position}{', bias added' if f.bias_added else ''})") for f in folded]


def _in_onnx_file(report, onnx_fold) -> dict:
    """``folded`` and ``left`` as the written ONNX file has them: fold_bn's folds (``"stage": "pytorch"``), then the
    BatchNormalization nodes the ONNX fold removed (``"stage": "onnx"``, node names, with ``op`` and ``notes``);
    ``left``: the nodes still in the file, with the ONNX fold's reason."""
    from dataclasses import asdict

    return {"folded": [{**asdict(f), "stage": "pytorch"} for f in report.folded]
            + [{"bn": f.bn, "into": f.into, "position": "after", "bias_added": "bias added" in f.notes,
                "stage": "onnx", "op": f.op, "notes": f.notes} for f in onnx_fold.folded],
            "left": dict(onnx_fold.left)}


def _fold_onnx(source: Path, output: Path, shapes: list[str], to_inference: bool, verify: bool, as_json: bool) -> None:
    from ..onnx import FoldVerificationError, OnnxRuntimeError, fold
    from ..onnx.verify import VerificationMemoryError

    input_shapes = {}
    for item in shapes:
        name, sep, dims = item.rpartition("=")
        if not sep or not name:
            raise fail(f"--input-shape for an ONNX model is NAME=SHAPE (e.g. input=1x3x224x224), got {item!r}")
        input_shapes[name] = _shape(dims)
    try:
        report = fold(source, output, to_inference=to_inference, verify=verify, input_shapes=input_shapes or None)
    except (FoldVerificationError, OnnxRuntimeError) as exc:
        raise fail(str(exc), code=1) from None
    except VerificationMemoryError as exc:  # the check's random inputs, or the outputs it compares
        raise fail(f"not enough memory to verify {source} on inputs of shapes {input_shapes or 'from the graph'}: "
                   f"{exc}; nothing written (a smaller --input-shape, or --no-verify)", code=1) from None
    except MemoryError as exc:  # the model's own tensors (NumPy's _ArrayMemoryError)
        raise fail(f"not enough memory to fold {source}: {exc}; nothing written", code=1) from None
    except FileNotFoundError as exc:
        if exc.filename is None:  # the loader's "no such file" for the source (the OS's own errors name a path)
            raise fail(str(exc)) from None
        raise fail(f"cannot write {output}: {exc}; nothing written", code=1) from None  # e.g. its folder is gone
    except ValueError as exc:
        text = str(exc)  # the loader names a file it recognises (PyTorch weights, NumPy data), whatever its suffix
        unreadable = "not a readable ONNX model" in text or "not an ONNX model" in text
        hint = ("; to fold a PyTorch model, give --model pkg.module:factory --weights FILE"
                if unreadable and (source.suffix.lower() != ".onnx" or "PyTorch" in text) else "")
        raise fail(f"{_cli_words(exc)}{hint}") from None
    except OSError as exc:  # the source was read (a missing one is the FileNotFoundError above): writing failed
        raise fail(f"cannot write {output}: {exc}; nothing written", code=1) from None
    if as_json:
        print_json({"output": str(output), **report.to_dict()})
        return
    _print_rows(_onnx_rows(report.folded), report.left, f"{source} -> {output}")
    for name in report.converted:
        console.print(f"switched {name} from training mode to its running statistics", markup=False)
    for name in report.dropout_converted:
        console.print(f"switched Dropout {name} to inference mode (it passes its input through)", markup=False)
    if report.removed_outputs:
        console.print(f"removed unused running-statistic outputs: {', '.join(report.removed_outputs)}",
                      markup=False)
    if report.max_abs_diff is not None:
        console.print(f"verified with onnxruntime on inputs {report.input_shapes}: max |before - after| = "
                      f"{report.max_abs_diff:.3g}, relative {report.max_rel_diff:.3g} (tolerance {report.tolerance:g})",
                      markup=False)


def report_path(output: Path) -> Path:
    """Where the fold report of a folded state dict ``output`` is saved: ``folded.pt`` -> ``folded.fold.json``."""
    return output.with_suffix(".fold.json")


def _identity(path: Path) -> tuple[int, int] | None:
    """The file at ``path`` as a rename replaces it (inode, modification time), or None where there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _report_owner(output: Path) -> str | None:
    """The other weights file whose report ``output``'s would replace (``folded.pt`` and ``folded.safetensors``
    share ``folded.fold.json``): the file the report there names, where that still exists; else None."""
    try:
        weights = json.loads(report_path(output).read_text()).get("weights")
    except (OSError, ValueError, AttributeError):  # no report, or none of ours: nothing to lose
        return None
    owner = output.parent / weights if isinstance(weights, str) and weights != output.name else None
    return weights if owner is not None and owner.exists() else None


def _external_data(source: Path) -> list[str]:
    """The files ``source``'s tensors live in, where onnx is installed (else the fold stops at that first)."""
    try:
        from ..onnx.graph import external_data_files
    except ImportError:
        return []
    return external_data_files(source)


def _reload_hint(spec: str, output: Path, report_file: Path, instance: bool) -> str:
    """Python lines that rebuild the folded model from the factory (or the module object a fresh import
    builds, when ``spec`` names an ``instance``), the report and the weights."""
    module, _, attr = spec.partition(":")
    return "\n".join([
        "reload it in Python:",
        "  import json",
        "  from bnkit.torch import FoldReport, load_state_dict_file",
        f"  from {module} import {attr.split('.')[0]}",
        f"  model = {attr}{'' if instance else '()'}",
        f"  model = FoldReport.from_dict(json.load(open({str(report_file)!r}))).restructure(model)",
        f"  model.load_state_dict(load_state_dict_file({str(output)!r}))",
    ])


def _export_check(exported) -> dict:
    """The onnxruntime-vs-PyTorch check of :func:`bnkit.torch.export.export_onnx`'s report, as ``--json`` gives it:
    ``max_abs_diff``, ``max_rel_diff`` (None when not verified) and the ``batch_sizes`` checked."""
    return {"max_abs_diff": exported.max_abs_diff, "max_rel_diff": exported.max_rel_diff,
            "batch_sizes": list(exported.batch_sizes)}


def _export_words(check: dict) -> str:
    """The export's check (:func:`_export_check`) in words, for the line that says the .onnx file was written;
    export_onnx checks unless verify=False (--no-verify)."""
    if check["max_abs_diff"] is None:
        return "not checked with onnxruntime: --no-verify"
    sizes = check["batch_sizes"]
    batches = f"batches of {' and '.join(map(str, sizes))}" if len(sizes) > 1 else f"a batch of {sizes[0]}"
    return (f"checked with onnxruntime against the folded PyTorch model on {batches}: max |onnxruntime - PyTorch| = "
            f"{check['max_abs_diff']:.3g}, relative {check['max_rel_diff']:.3g}")


#: The library's Python arguments ``force=True``, ``example_inputs`` and ``input_shapes`` as this command's options.
_CLI_WORDS = (("force=True", "--force"), ("pass example_inputs", "give --input-shape"),
              ("no example_inputs", "no --input-shape"), ("input_shapes names", "--input-shape names"),
              ("on example_inputs", "on a random input of the --input-shape"),
              ("verify=False returns such a model anyway", "--no-verify writes such a model anyway"))


def _cli_words(message: object) -> str:
    """A library message in the command's words (:data:`_CLI_WORDS`)."""
    return reworded(message, _CLI_WORDS)


def _fold_torch(spec: str, weights: Optional[Path], output: Path, shapes: list[str], trust: bool, force: bool,
                verify: bool, as_json: bool, fixed_batch: bool) -> None:
    import torch

    from ..atomic import Terminated, atomic_path
    from ..torch import FoldVerificationError, fold_bn, save_state_dict_file
    from ..torch.io import load_checkpoint, load_weights_into, safetensors_metadata, split_state
    from ..torch.modules import input_dtype_device
    from .common import (USER_CODE_ERRORS, UsageError, build_model, check_safetensors_output, describe_error,
                         dtype_change, raised_by_bnkit, resolve_spec)

    if len(shapes) > 1 or any("=" in s for s in shapes):
        raise fail("--input-shape for a PyTorch model is one SHAPE (e.g. 1x3x224x224)")
    dims = _shape(shapes[0]) if shapes else None  # checked before any work (and outside the allocation's try)
    if output.suffix.lower() == ".onnx" and dims is None:
        raise fail("exporting to .onnx needs --input-shape")
    try:
        model = build_model(spec)
    except UsageError as exc:
        raise fail(str(exc)) from None
    if weights is not None:
        try:
            state, dropped = split_state(load_checkpoint(weights, trust=trust), weights)
            loaded = load_weights_into(model, state, dropped=dropped)
        except USER_CODE_ERRORS as exc:  # unsafe pickles, mismatched state dicts, a trusted pickle's own code
            why = describe_error(exc) if isinstance(exc, SystemExit) else exc  # bnkit's messages name the problem
            raise fail(f"cannot load {weights} into {spec}: {why}") from None
        if changed := dtype_change(model, loaded, str(weights)):
            note(changed)
    safetensors = output.suffix.lower() == ".safetensors"
    try:
        check_safetensors_output(model, output)  # folding keeps extra state
    except UsageError as exc:
        raise fail(str(exc)) from None
    model.eval()
    dtype, device = input_dtype_device(model)
    if output.suffix.lower() == ".onnx" and dtype == torch.bfloat16:
        raise fail("a bfloat16 model cannot be exported to .onnx and verified (NumPy, which feeds onnxruntime, has "
                   "no bfloat16): build it in float32 or float16 in the --model factory, or write a .pt")
    example = None
    if dims is not None:
        try:
            example = torch.randn(*dims, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        except (RuntimeError, MemoryError) as exc:  # the allocator's "can't allocate memory"
            raise fail(f"cannot make a random input of shape {shapes[0]}: {exc}; nothing written", code=1) from None
    try:
        folded, report = fold_bn(model, example, verify=verify and example is not None, force=force)
    except FoldVerificationError as exc:  # the run failed on what it made: exit 1, as for an ONNX file
        raise fail(f"{_cli_words(exc)}; nothing written", code=1) from None
    except USER_CODE_ERRORS as exc:  # noqa: BLE001 - bnkit's checks, or the user's model failing on the input
        if raised_by_bnkit(exc) and isinstance(exc, (ValueError, RuntimeError)):
            raise fail(_cli_words(exc)) from None
        ran = f" (it runs the model on a random input of shape {shapes[0]})" if shapes else ""
        raise fail(f"folding {spec} failed, nothing written: {describe_error(exc)}{ran}") from None
    if output.suffix.lower() == ".onnx":
        from ..torch.export import export_onnx

        try:
            exported = export_onnx(folded, example, output, fold=True, force=force, dynamic_batch=not fixed_batch,
                                   verify=verify)
        except OSError as exc:
            raise fail(f"cannot write {output}: {exc}; nothing written", code=1) from None
        except (ValueError, TypeError, RuntimeError) as exc:  # ExportVerificationError, torch.onnx's errors too
            raise fail(f"cannot export the folded model to ONNX: {_cli_words(exc)}", code=1) from None
        except USER_CODE_ERRORS as exc:  # noqa: BLE001 - the user's model raising anything else while traced
            if isinstance(exc, Terminated):  # SIGTERM while the file was written: exit 143, nothing written
                raise
            raise fail(f"cannot export the folded model to ONNX: {describe_error(exc)}", code=1) from None
        report_file, in_file = None, {**_in_onnx_file(report, exported.fold), "export": _export_check(exported)}
        rows, left = _torch_rows(report.folded) + _onnx_rows(exported.fold.folded), exported.fold.left
    else:
        report_file, in_file = report_path(output), {}
        rows, left = _torch_rows(report.folded), report.left
        writing, before = report_file, _identity(output)
        try:  # the report is renamed into place only once the weights are: a failure leaves both files as they were
            with atomic_path(report_file) as tmp:
                Path(tmp).write_text(json.dumps({**report.to_dict(), "weights": output.name}, indent=2) + "\n")
                writing = output
                save_state_dict_file(folded.state_dict(), output, metadata=safetensors_metadata(weights)
                                     if safetensors and weights is not None else None)
                writing = None  # only the report's rename is left
        except BaseException as exc:  # noqa: BLE001 - torch.save raises RuntimeError, safetensors its own type
            if writing == output and _identity(output) != before:
                writing = None  # the weights were renamed into place (a signal in the folder's fsync after it)
            # new weights beside a report from an earlier run: that report describes other weights
            stale = writing is None and report_file.exists()
            if stale:
                report_file.unlink(missing_ok=True)
            if not isinstance(exc, Exception):  # Ctrl-C, or SIGTERM while writing (SystemExit)
                raise
            if writing is None:
                raise fail(f"cannot write {report_file}: {exc}; {output} was written without its report"
                           + (" (the earlier run's report there was removed: it described other weights)" if stale
                              else ""), code=1) from None
            raise fail(f"cannot write {writing}: {exc}; nothing written", code=1) from None
    verified = report.max_rel_diff is not None
    if as_json:
        extra = {"report": str(report_file)} if report_file is not None else {}
        print_json({"output": str(output), **extra, "verified": verified, **report.to_dict(), **in_file})
        return
    _print_rows(rows, left, f"{spec} -> {output}")
    for made in report.notes:  # assumptions fold_bn made; "not verified" is said below in the CLI's words
        if not made.startswith("not verified"):
            console.print(Text.assemble(("note:", "yellow"), f" {_cli_words(made)}"), soft_wrap=True)
    if verified:
        console.print(f"verified: max |original - folded| = {report.max_abs_diff:.3g}, "
                      f"relative {report.max_rel_diff:.3g}")
    elif not verify:
        console.print("[yellow]not verified[/] (--no-verify)")
    elif example is None:
        console.print("[yellow]not verified[/] (give --input-shape to verify)")
    else:
        console.print("[yellow]not verified[/] (the model's output holds no tensors to compare)")
    if report_file is None:
        console.print(f"wrote {output} ({_export_words(in_file['export'])})", markup=False)
    else:
        console.print(f"wrote {output} and the fold report {report_file} (folded BN -> Identity, new biases)",
                      markup=False)
        instance = resolve_spec(spec) is model  # build_model returns a module object as is
        console.print(_reload_hint(spec, output, report_file, instance), highlight=False, soft_wrap=True,
                      markup=False)


@app.command("fold")
def fold_command(
    source: Optional[Path] = typer.Argument(None, help="An .onnx model to fold (or use --model for PyTorch)."),
    output: str = typer.Option(
        ..., "-o", "--output", help="New file for the folded model: .onnx, or (for --model) a state dict "
        ".pt/.pth/.safetensors, with its report beside it as NAME.fold.json. Its folder must exist; it may not "
        "be an input file."),
    model: Optional[str] = typer.Option(
        None, "--model", help="PyTorch model: 'package.module:factory' (called with no arguments) or "
        "'package.module:name' of an nn.Module object."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="State dict for --model (.pt/.pth/.safetensors)."),
    input_shape: List[str] = typer.Option(
        [], "--input-shape", help="ONNX: NAME=1x3x224x224 (repeatable; dynamic dims default to 2). PyTorch: "
        "1x3x224x224 (a random input in the model's dtype)."),
    to_inference: bool = typer.Option(
        False, "--to-inference", help="ONNX: switch training-mode BatchNormalization to its running statistics."),
    force: bool = typer.Option(
        False, "--force", help="PyTorch: fold layers in training mode or with never-updated statistics (to .onnx: "
        "also write it despite error-level audit findings)."),
    trust: bool = typer.Option(
        False, "--trust", help="Unpickle a checkpoint outside PyTorch's safe allow-list (only files you made)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check outputs before and after folding."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the report as JSON. --model to .onnx: 'folded' and 'left' describe the written "
        "file: 'folded' lists the PyTorch folds (stage 'pytorch'), then the BatchNormalization nodes the ONNX fold "
        "removed (stage 'onnx': node names, with 'op' and 'notes'); 'left' the nodes still in it; 'export' the written "
        "file's check, onnxruntime vs the folded PyTorch model: 'max_abs_diff', 'max_rel_diff' (null with --no-verify) "
        "and the 'batch_sizes' checked."),
    fixed_batch: bool = typer.Option(
        False, "--fixed-batch", help="--model to .onnx: keep the batch size of --input-shape fixed in the graph "
        "(no dynamic batch axis, so no batch-of-one check)."),
) -> None:
    """Fold BatchNorm into the Conv/ConvTranspose/Gemm/Linear before it, verified on random inputs.

    bnkit fold model.onnx -o folded.onnx   |   bnkit fold --model pkg.mod:make --weights w.pt --input-shape 1x3x32x32 -o folded.pt
    """
    from .common import ONNX_SUFFIXES, STATE_DICT_SUFFIXES, UsageError, check_output

    if (source is None) == (model is None):
        raise fail("give either an .onnx file or --model (not both)")
    if fixed_batch and (source is not None or Path(output).suffix.lower() != ".onnx"):
        raise fail("--fixed-batch applies only to exporting --model to an .onnx file")
    unused = ([name for name, given in (("--weights", weights is not None), ("--force", force), ("--trust", trust))
               if given] if source is not None else ["--to-inference"] if to_inference else [])
    if unused:  # an option that would do nothing is a mistake worth saying, not skipping
        pytorch_hint = ("; to fold a PyTorch model, give --model pkg.module:factory --weights FILE"
                        if source is not None and source.suffix.lower() != ".onnx" else "")
        raise fail(f"{', '.join(unused)} {'apply' if len(unused) > 1 else 'applies'} only to "
                   + (f"--model (a PyTorch model), not to FILE, which bnkit folds as an ONNX model{pytorch_hint}"
                      if source is not None
                      else "an .onnx file, not to --model (PyTorch's eval mode already uses the running statistics)"))
    if source is not None and input_shape and not verify:  # it shapes only the verification inputs of a file
        raise fail("--input-shape applies to an .onnx file only with verification (it sets the shapes of the random "
                   "verification inputs): leave it out with --no-verify")
    try:
        if source is not None:  # the input is its .onnx file and the external data files it names
            out = check_output(output, suffixes=ONNX_SUFFIXES, inputs=[source, *_external_data(source)], option="-o",
                               what="ONNX model")
        else:
            out = check_output(output, suffixes=STATE_DICT_SUFFIXES + ONNX_SUFFIXES, inputs=[weights], option="-o",
                               what="folded model")
            if out.suffix.lower() != ".onnx":
                check_output(report_path(out), suffixes=(".json",), inputs=[weights], option="the fold report",
                             what="report")
                if owner := _report_owner(out):
                    raise UsageError(f"{report_path(out)} is the fold report of {owner} beside it, which this run "
                                     f"would leave without one: write to another name (or remove {owner} first)")
    except UsageError as exc:
        raise fail(str(exc)) from None
    if source is not None:
        needs("onnx", "onnxruntime", extra="onnx")
        _fold_onnx(source, out, input_shape, to_inference, verify, as_json)
    else:
        needs("torch", *(("onnx", "onnxruntime") if out.suffix.lower() == ".onnx" else ()), extra="all")
        _fold_torch(model, weights, out, input_shape, trust, force, verify, as_json, fixed_batch)
