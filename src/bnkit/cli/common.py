"""Helpers shared by CLI commands: ``package.module:attr`` specs, output and device checks, data files.

The checks raise :class:`UsageError` (a ``ValueError``) with a message meant for the user; a command
turns it into ``fail(str(exc))`` (exit status 2) before anything is loaded or written.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from ..file_kinds import unreadable_file
from ..tracebacks import raised_in

STATE_DICT_SUFFIXES = (".pt", ".pth", ".safetensors")
ONNX_SUFFIXES = (".onnx",)
ARRAY_SUFFIXES = (".npy", ".npz")
#: Names under which a data file with several arrays holds the model's inputs (the first present wins).
INPUT_KEYS = ("x", "inputs", "input", "data", "images", "X")

PathLike = Union[str, "os.PathLike[str]"]


class UsageError(ValueError):
    """A command-line argument that cannot work; the message says why and what would."""


#: What a command catches from the user's code (the --model and --data factories, the model's forward, --forward,
#: a trusted pickle) and reports: any exception, and SystemExit (sys.exit() or exit() in that code), which would
#: otherwise end the command with the user's status and nothing said. KeyboardInterrupt still interrupts.
USER_CODE_ERRORS = (Exception, SystemExit)


def check_safetensors_output(model: Any, output: Path) -> None:
    """UsageError, before any work, where ``output`` is a .safetensors file and ``model``'s state dict holds entries
    that are not tensors (a module's extra state), which safetensors cannot hold. A ``get_extra_state`` that fails
    here is left for the write to report."""
    if output.suffix.lower() != ".safetensors":
        return
    from ..torch.io import refuse_non_tensors

    try:
        state = model.state_dict()
    except USER_CODE_ERRORS:  # noqa: BLE001 - the user's get_extra_state may raise anything
        return
    try:
        refuse_non_tensors(state)
    except ValueError as exc:
        raise UsageError(f"-o {output}: {exc}") from None


def add_cwd_to_path() -> None:
    """Put the current directory first on ``sys.path``, as ``python -m`` does.

    Lets users name their own, uninstalled modules (``--model mypkg.nets:make``) and lets a
    trusted whole-model pickle find the classes it was saved with.
    """
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def resolve_spec(spec: str) -> Any:
    """Import ``package.module:attr`` (attr may be dotted) and return the object.

    The current directory is put on ``sys.path`` first so users can point at
    their own modules without installing them.
    """
    if ":" not in spec:
        raise ValueError(f"expected 'package.module:name', got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    add_cwd_to_path()
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {mod_name!r} from {spec!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r}") from None
    return obj


def load_forward(spec: str) -> Callable[[Any, Any], Any]:
    """The function ``--forward`` names (``package.module:fn``, called as ``fn(model, batch)``), else
    :class:`UsageError` saying why (importing it failed, or it is not callable)."""
    try:
        feed = resolve_spec(spec)
    except USER_CODE_ERRORS as exc:  # noqa: BLE001 - importing the user's module runs its code
        raise UsageError(f"cannot import --forward {spec!r}: {describe_error(exc)}") from None
    if not callable(feed):
        raise UsageError(f"--forward {spec!r} is a {type(feed).__name__}, not a function")
    return feed


def check_input_file(path: Path, kind: str) -> None:
    """:class:`UsageError` unless ``path`` is a file; a folder is named as one, and a path the OS cannot look up
    (a folder the user may not enter, a name too long) with its reason (``kind``: what the file holds)."""
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as exc:  # EACCES, ENAMETOOLONG: Path.is_dir swallows only "no such file" and the like
        raise UsageError(f"cannot read {kind} file {path}: {exc.strerror}") from None
    if is_dir:
        raise UsageError(f"{path} is a directory, not a {kind} file: name a file inside it")
    if not is_file:
        if (why := unreadable_file(path)) == "no such file":
            raise UsageError(f"no such {kind} file: {path}")
        raise UsageError(f"cannot read {kind} file {path}: {why}")


def raised_by_bnkit(exc: BaseException) -> bool:
    """Whether bnkit's own code raised ``exc`` (the innermost frame of its traceback), not the user's or PyTorch's."""
    return raised_in(exc, "bnkit")


def describe_error(exc: BaseException) -> str:
    """``exc``'s text, led by its type unless bnkit raised it (bnkit's own messages say what is wrong); a
    SystemExit is named as the call that raised it."""
    if isinstance(exc, SystemExit):
        code = "" if exc.code is None else repr(exc.code)
        return f"SystemExit (it called sys.exit({code}) or exit({code}))"
    return str(exc) if raised_by_bnkit(exc) else f"{type(exc).__name__}: {exc}"


def reworded(message: object, words: Sequence[tuple[str, str]]) -> str:
    """A library message in a command's words: each ``(Python wording, command-line wording)`` pair of ``words``
    replaced in turn (``forward=`` -> ``--forward package.module:fn``), so its advice names the options."""
    text = str(message)
    for python, option in words:
        text = text.replace(python, option)
    return text


def print_json(obj: Any) -> None:
    """``obj`` on stdout as ``--json`` prints it: strict JSON in ASCII, so a file name that is not UTF-8 keeps its
    escapes (``\\udcff``) instead of raw bytes, and NaN/Inf as strings (:func:`bnkit.findings.jsonable`)."""
    import typer

    from ..findings import jsonable

    typer.echo(json.dumps(jsonable(obj), indent=2, allow_nan=False))


def build_model(spec: str) -> Any:
    """The ``torch.nn.Module`` that ``spec`` names: a module object, or a factory called with no arguments.

    Any failure (an import error, the factory raising, something other than a module) is a
    :class:`UsageError` that says which: user code is reported, not traced.
    """
    from torch import nn

    try:
        obj = resolve_spec(spec)
    except USER_CODE_ERRORS as exc:  # noqa: BLE001 - importing the user's module runs its code
        cause = str(exc) if raised_by_bnkit(exc) else f"importing it raised {describe_error(exc)}"
        raise UsageError(f"cannot build the model from {spec!r}: {cause}") from None
    try:
        net = obj if isinstance(obj, nn.Module) else obj()
    except USER_CODE_ERRORS as exc:  # noqa: BLE001 - any failure of user code
        raise UsageError(f"cannot build the model from {spec!r}: it raised {describe_error(exc)}") from None
    if not isinstance(net, nn.Module):
        raise UsageError(f"{spec!r} gave a {type(net).__name__}, not a torch.nn.Module")
    from ..torch.modules import require_eager

    try:
        require_eager(net)
    except TypeError as exc:
        raise UsageError(f"{spec!r}: {exc}") from None
    return net


def dtype_change(model: Any, loaded: Any, source: str) -> Optional[str]:
    """A note when ``load_state_dict`` cast floating tensors of a checkpoint to other floating dtypes of the ``model``
    its factory built (None when none was cast): the model then runs, and is written, in its own dtypes (a float16
    checkpoint comes back float32, twice the size). Floats loaded into integer buffers (a count of 6.0) are no such
    cast: load_weights_into took them only as whole numbers. ``loaded``: the state under the model's own keys, as
    :func:`bnkit.torch.io.load_weights_into` returns it; compared key by key."""
    import torch

    def name(t: Any) -> str:
        return str(t.dtype).removeprefix("torch.")

    own = model.state_dict()
    floating = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                and isinstance(own.get(k), torch.Tensor) and own[k].is_floating_point()}
    casts: dict[tuple[str, str], int] = {}
    for key, value in floating.items():
        if (target := own[key]).dtype != value.dtype:
            pair = (name(value), name(target))
            casts[pair] = casts.get(pair, 0) + 1
    if not casts:
        return None
    saved = sorted({name(v) for v in floating.values()})
    keep = (f"build the model in {saved[0]} in the factory (e.g. return model.to(torch.{saved[0]}))"
            if len(saved) == 1 else "build the model with the checkpoint's dtypes in the factory")
    cast = ", ".join(f"{n} {a} -> {b}" for (a, b), n in sorted(casts.items()))
    return (f"{source}: load_state_dict cast tensors to the dtypes of the model the factory builds ({cast}), in "
            f"which it runs and any output is written; to keep the checkpoint's, {keep}")


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    try:
        return a.resolve() == b.resolve()
    except RuntimeError:  # a symbolic link loop (Python 3.11; OSError ELOOP later): no file, so none of the inputs
        return False


def check_output(output: PathLike, *, suffixes: Sequence[str], inputs: Iterable[Optional[PathLike]] = (),
                 option: str = "--output", what: str = "file") -> Path:
    """``output`` as a ``Path`` if a command may write ``what`` there, else :class:`UsageError`.

    Refused: a path ending in a separator or naming a directory; a suffix outside ``suffixes``
    (the written format is not chosen by a misleading name); a parent folder that does not exist
    (no folders are created behind the user's back); the same file as any of ``inputs``
    (the weights, the data, the model file: a run must never overwrite what it reads); an input the OS
    cannot look up (a folder the user may not enter, a name too long), with its reason.
    """
    text = os.fspath(output)
    path = Path(text)
    try:
        is_dir = path.is_dir()
    except OSError as exc:  # e.g. a name too long for the file system (ENAMETOOLONG): Python 3.11 raises here
        raise UsageError(f"{option} {text}: {exc.strerror}") from None
    if text.endswith((os.sep, "/")) or is_dir:
        raise UsageError(f"{option} {text} is a folder; give a file name ending in {' or '.join(suffixes)}")
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {text}: the {what} written needs a name ending in {', '.join(suffixes)}"
                         f"{' (got ' + repr(path.suffix) + ')' if path.suffix else ' (it has no suffix)'}")
    parent = path.parent
    if not parent.is_dir():
        above = next((p for p in (parent, *parent.parents) if p.exists()), None)  # the nearest that exists
        if above is not None and not above.is_dir():  # x.npy/out.pt: a file where a folder is needed
            raise UsageError(f"{option} {text}: {above} is a file, not a folder")
        raise UsageError(f"{option} {text}: folder {parent} does not exist; create it first")
    for source in inputs:
        if source is None:
            continue
        src = Path(os.fspath(source))
        try:
            same = src.exists() and _same_file(path, src)
        except OSError as exc:  # an input the OS cannot look up (EACCES, ENAMETOOLONG) cannot be read either
            raise UsageError(f"cannot read {source}: {exc.strerror}") from None
        if same:
            raise UsageError(f"{option} {text} names the input file {source}; write to a new path "
                             "(the input is never overwritten)")
    return path


def parse_device(text: str) -> Any:
    """``torch.device(text)`` for a device this machine has, else :class:`UsageError` saying why."""
    from ..torch.modules import usable_device

    try:
        device = usable_device(text, f"--device {text}")
    except ValueError as exc:
        raise UsageError(str(exc).replace("; use cpu", "; use --device cpu")) from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {text!r}: use cpu, cuda, cuda:N or mps")
    return device


def _check_array_file(path: Path) -> None:
    """Raise ValueError naming what a file with an .npy/.npz name is when it is no NumPy array file (``np.load``
    tells the two apart by their first bytes, not by the name)."""
    from ..file_kinds import describe_file, looks_like_npy, zip_kind

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    is_zip = head[:4] in (b"PK\x03\x04", b"PK\x05\x06")  # the latter: an empty zip
    kind = zip_kind(path) if is_zip else None
    if looks_like_npy(head) or kind in ("npz", "zip"):  # np.load reads any zip's .npy members
        return
    if is_zip and kind is None:
        what = "a damaged zip archive (a truncated or corrupt .npz file?)"
    else:  # None: a pickle or a torch.save archive
        what = describe_file(path, head, size) or ("a pickle or torch.save file (name it .pt to have it read as "
                                                   "a checkpoint, with weights_only=True)")
    raise ValueError(f"{path} is {what}, not a NumPy .npy/.npz array file")


def load_inputs(path: Path, key: Optional[str] = None, key_option: Optional[str] = None, *,
                factories: bool = False) -> Any:
    """The model inputs in a data file: an array (``.npy``/``.npz``, pickles refused) or a tensor.

    Anything else is read as a checkpoint with ``weights_only=True`` (``.pt``, ``.pth``) or as
    safetensors: data files are never trusted to run code. A file of several named arrays
    gives ``key``, else its only one, else the first of :data:`INPUT_KEYS` present; a tuple
    or list, see :func:`_inputs_of_sequence`. A ``key`` for a file without named arrays is refused.

    Raises:
        ValueError: no such file, a folder, an unreadable file, or no inputs in it (the
            message names the file, and ``key_option``, the option that picks a name, if any; ``factories``:
            the command's ``--data`` also takes a Dataset factory, which the advice then offers).
        bnkit.torch.io.UnsafeCheckpointError: a pickle with code in it.
    """
    import numpy as np
    import torch

    from ..file_kinds import looks_like_npy
    from ..torch.io import CHECKPOINT_FORMATS, NotACheckpointError, UnsafeCheckpointError, load_checkpoint

    check_input_file(path, "data")
    named = False  # whether the file holds named arrays, of which ``key`` picks one
    with open(path, "rb") as f:
        npy = looks_like_npy(f.read(6))  # an .npy array under another name is read as one, as np.load reads it
    if path.suffix.lower() in ARRAY_SUFFIXES or npy:
        _check_array_file(path)
        unreadable = f"{path} is not a readable .npy/.npz array file (object arrays are refused)"
        try:
            loaded = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - a damaged file raises ValueError, EOFError, BadZipFile, ...
            raise ValueError(f"{unreadable}: {type(exc).__name__}: {exc}") from exc
        if named := isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                name = _chosen_key(loaded.files, key, key_option, path)
                try:
                    loaded = loaded[name]  # only the inputs are read: other arrays may hold anything
                except Exception as exc:  # noqa: BLE001 - BadZipFile (a CRC-32 mismatch), zlib.error, EOFError, ...
                    raise ValueError(f"{unreadable}, its array {name!r}: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            loaded = load_checkpoint(path)
        except UnsafeCheckpointError as exc:  # its advice (re-save a model, --trust) is for checkpoints, not data
            found = str(exc).split(" so it was NOT loaded.")[0]
            raise UnsafeCheckpointError(
                f"{found} so it was NOT loaded; data files are never unpickled with code (no --trust for data): "
                "save the inputs as .npy, .npz or .safetensors, or torch.save a tensor or a dict of tensors") from None
        except NotACheckpointError as exc:
            if exc.what is None:  # damaged: the checkpoint's "expected" advice names the data formats instead
                raise ValueError(str(exc).replace(CHECKPOINT_FORMATS, "expected .npy, .npz, .safetensors, or a "
                                                  "tensor or dict of tensors saved with torch.save")) from None
            raise ValueError(f"{path} is {exc.what}, not a data file: save the inputs as .npy, .npz or .safetensors, "
                             "or torch.save a tensor or a dict of tensors") from None
        except (ValueError, OSError) as exc:
            message = str(exc)
            raise ValueError(message if str(path) in message else f"cannot read data file {path}: {message}") from exc
    if isinstance(loaded, dict):
        named = True
        arrays = {str(k): v for k, v in loaded.items()}
        loaded = arrays[_chosen_key(list(arrays), key, key_option, path)]
    elif key is not None and not named:  # a key that picks nothing would be ignored: say so, as for a wrong name
        what = "an array" if isinstance(loaded, (np.ndarray, torch.Tensor)) else f"a {type(loaded).__name__}"
        option = key_option or "the key"
        raise ValueError(f"{path} holds {what}, not named arrays: {option} {key!r} names nothing in it; "
                         f"leave {option} out (it picks one array of an .npz file or a dict of tensors)")
    elif isinstance(loaded, (tuple, list)) and loaded:
        loaded = _inputs_of_sequence(loaded, path, factories)
    if not isinstance(loaded, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not an array of inputs")
    if isinstance(loaded, np.ndarray):  # big-endian files: torch takes native byte order only
        from ..checks import native_array

        loaded = native_array(loaded)
    check_input_array(loaded, str(path))
    return loaded


def _chosen_key(names: list[str], key: Optional[str], key_option: Optional[str], path: Path) -> str:
    """Which of a file's named arrays holds the inputs: ``key``, else the only one, else the first of
    :data:`INPUT_KEYS`."""
    if key is not None:
        if key not in names:
            raise ValueError(f"{path} has no array {key!r}; it holds {sorted(names)}")
        return key
    if not names:
        raise ValueError(f"{path} holds no arrays")
    found = names[0] if len(names) == 1 else next((k for k in INPUT_KEYS if k in names), None)
    if found is None:
        choose = f" or choose them with {key_option}" if key_option else ""
        raise ValueError(f"{path} holds {sorted(names)}; name the inputs one of {list(INPUT_KEYS)}{choose}")
    return found


#: Saved (x, y) pairs whose x are all one shape with at most this many rows, and y one entry per row, may be
#: batches of that size or samples (C, ...) with C-long targets: refused rather than guessed.
_AMBIGUOUS_BATCH = 4


def _inputs_of_sequence(items: "list | tuple", path: Path, factories: bool = False) -> Any:
    """The inputs in a saved list or tuple, where its structure says what they are.

    * ``(inputs, targets, ...)`` (``torch.save((x, y))``): two or three items with one length, the first an
      array with the most dimensions, the others arrays or lists (labels, file names), not all of one shape,
      give the first (so do two or three same-size batches of different shapes: nothing tells them apart);
    * arrays of one shape per sample but different lengths (``list(loader)`` with a short last batch) are
      batches, joined along the batch axis;
    * pairs (``list(loader)``'s ``[(x1, y1), (x2, y2), ...]``, one batch too): targets with one per sample mark
      batches, joined, unless all batches are one shape of at most :data:`_AMBIGUOUS_BATCH` rows; scalar targets
      (``list(dataset)``'s ``[(x, 3), ...]``) mark samples, stacked into one batch;
    * a one-item list of an array gives the array.

    Anything else is refused rather than guessed: arrays all of one shape may be batches to join, samples to
    stack or an ``(x, x)`` pair, and batches of different shapes cannot be joined.
    """
    import numpy as np
    import torch

    kind = type(items).__name__
    items = list(items)

    def is_array(v: Any) -> bool:
        return isinstance(v, (np.ndarray, torch.Tensor))

    def scalar(v: Any) -> bool:
        return isinstance(v, (int, float)) or (is_array(v) and v.ndim == 0)

    def joined(arrays: list, stack: bool) -> Any:
        shapes = {tuple(a.shape) if stack else (a.ndim, *a.shape[1:]) for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"{path} holds {'samples' if stack else 'batches'} of different shapes "
                             f"({', '.join(str(tuple(a.shape)) for a in arrays[:4])}, ...): they cannot be "
                             "joined into one dataset; save them as one array"
                             + (", or give --data a Dataset (pkg.module:make_dataset)" if factories else ""))
        if all(isinstance(a, torch.Tensor) for a in arrays):
            return torch.stack(arrays) if stack else torch.cat(arrays)
        numpy = [a.numpy(force=True) if isinstance(a, torch.Tensor) else a for a in arrays]
        return np.stack(numpy) if stack else np.concatenate(numpy)

    if len(items) == 1 and is_array(items[0]):
        return items[0]
    if all(isinstance(it, (tuple, list)) and len(it) >= 2 and is_array(it[0]) for it in items):
        xs, ys = [it[0] for it in items], [it[1] for it in items]
        if all(scalar(y) for y in ys):
            return joined(xs, stack=True)
        per_sample = all(is_array(y) and y.ndim >= 1 and x.ndim >= 1 and len(y) == len(x) for x, y in zip(xs, ys))
        # a sample (C, ...) with a C-long target looks like a batch of C: only a few rows, all alike, leave it open
        if per_sample and not (len({tuple(x.shape) for x in xs}) == 1 and len(xs[0]) <= _AMBIGUOUS_BATCH):
            return joined(xs, stack=False)
    elif is_array(items[0]) and items[0].ndim >= 1:
        first, rest = items[0], items[1:]
        targets = all((is_array(it) and 1 <= it.ndim <= first.ndim) or isinstance(it, (list, tuple))
                      for it in rest) and all(len(it) == len(first) for it in rest)
        if len(items) <= 3 and targets and len({tuple(getattr(it, "shape", ())) for it in items}) > 1:
            return first  # (inputs, targets[, more]): targets as arrays, or lists of labels or file names
        if (all(is_array(it) for it in rest) and len({(it.ndim, *it.shape[1:]) for it in items}) == 1
                and len({len(it) for it in items}) > 1):
            return joined(items, stack=False)
    raise ValueError(
        f"{path} holds a {kind} of {len(items)} items whose structure does not say which are the "
        "inputs (batches to join, samples to stack, or an (inputs, targets) pair?): save the inputs as one "
        "array (torch.cat(batches) or torch.stack(samples)), or a dict {'x': inputs}")


def check_input_array(x: Any, source: str) -> None:
    """ValueError unless the array or tensor ``x`` holds numbers, densely, along a batch axis (``source``: where
    it came from). Strings, dates and records cannot become tensors; a sparse tensor does not run through most
    layers."""
    import torch

    if isinstance(x, torch.Tensor):
        if x.is_meta:
            raise ValueError(f"{source} holds a meta tensor: a shape without values; save the real inputs")
        if x.layout != torch.strided:
            raise ValueError(f"{source} holds a {str(x.layout).removeprefix('torch.')} tensor: save the inputs as a "
                             "dense tensor (x.to_dense())")
    elif x.dtype.kind not in "biufc":
        raise ValueError(f"{source} holds {x.dtype} values, not numbers")
    elif x.dtype.itemsize > (16 if x.dtype.kind == "c" else 8):
        raise ValueError(f"{source} holds {x.dtype} values, which PyTorch has no dtype for: save them as "
                         f"{'complex128' if x.dtype.kind == 'c' else 'float64'} (or float32)")
    if x.ndim == 0:
        raise ValueError(f"{source} holds a single number: the inputs need a batch axis, (N, features...)")
