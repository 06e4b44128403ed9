"""``bnkit conventions``: the four ways frameworks write BatchNorm, side by side.

One column per framework (torch, keras, flax, onnx, from :data:`bnkit.conventions.CONVENTIONS`):
the update rule in that framework's own ``momentum``, which side ``momentum`` weighs, the
default momentum and eps, and which batch variance feeds the running variance. The weight
names (``moving_variance``, ``batch_stats/mean``) go in a second table, one row per framework,
so that each stays whole at 80 columns (plain lines on a narrower console). With
``--momentum M --from FW`` it adds the row "the same update, written in each framework"
computed by :func:`bnkit.convert_momentum` (so ``--momentum 0.99 --from keras`` shows ``0.01``
under torch), each momentum printed in full (the shortest form that reads back as the same float);
as lines under the table when a value would not fit its column whole.
"""
from __future__ import annotations

import copy
import io
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..conventions import CONVENTIONS, convert_momentum, get_convention
from ..convert import FRAMEWORKS, LAYOUTS
from .app import app, console, fail


@app.command("conventions")
def conventions(
    momentum: Optional[float] = typer.Option(None, help="A momentum to translate into every framework."),
    src: Optional[str] = typer.Option(None, "--from", help="The framework whose convention --momentum is written in."),
) -> None:
    """Print the BatchNorm conventions of torch, Keras, Flax and ONNX side by side."""
    if (momentum is None) != (src is None):
        raise fail("--momentum and --from go together: e.g. --momentum 0.99 --from keras")
    try:
        src_name = get_convention(src).name if src is not None else None
        converted = {fw: convert_momentum(momentum, src_name, fw) for fw in FRAMEWORKS} if src_name else None
    except ValueError as exc:
        raise fail(str(exc)) from None

    label = "update (m = momentum)"  # the widest label: the first column's width
    convs = [CONVENTIONS[fw] for fw in FRAMEWORKS]
    layouts = [LAYOUTS[fw] for fw in FRAMEWORKS]
    rows = [
        (label, *(_short_rule(c.momentum_weighs) for c in convs)),
        ("momentum weighs", *(f"the {c.momentum_weighs} value" for c in convs)),
        ("default momentum", *(f"{c.default_momentum:g}" for c in convs)),
        ("default eps", *(f"{c.default_eps:g}" for c in convs)),
        ("eps, momentum\nnamed", *(f"{lay['eps']},\n{lay['momentum']}" for lay in layouts)),
        ("running var fed", *("unbiased\nM2/(n-1)" if c.unbiased_running_var else "biased\nM2/n" for c in convs)),
    ]
    # the labels whole, each other column as wide as its longest word, or rich splits a name (epsilo|n): else lines
    widths = [len(label)] + [max(len(word) for cell in column for word in cell.split()) for column in zip(*rows)][1:]
    if console.width < sum(widths) + 3 * len(widths) + 1:
        _print_lines(convs, layouts)
        if converted is not None:
            _print_converted(src_name, momentum, converted)
        _print_names({fw: lay["names"] for fw, lay in zip(FRAMEWORKS, layouts)})
        console.print(_EPS_NOTE)
        return
    table = Table(title="BatchNorm conventions (r: running value, x: batch statistic)")
    table.add_column("", style="bold", no_wrap=True)
    for fw in FRAMEWORKS:
        table.add_column(fw, overflow="fold")
    for row in rows:
        table.add_row(*row)
    # the converted momenta whole: a table row if rich lays each out on one line of its column, else lines under
    # the table (how rich narrows columns is its own: the row is tried on a plain copy of the console first)
    row_fits = False
    if converted is not None:
        values = [repr(converted[fw]) for fw in FRAMEWORKS]
        with_row = copy.deepcopy(table)
        with_row.add_row(f"{src_name} momentum\n{momentum!r} is", *values, style="green")
        row_fits = _row_is_whole(with_row, f"{src_name} momentum", values)
        if row_fits:
            table = with_row
    console.print(table)
    if converted is not None:
        _print_converted(src_name, momentum, converted, listed=not row_fits)
    _print_names({fw: lay["names"] for fw, lay in zip(FRAMEWORKS, layouts)})
    console.print(_EPS_NOTE)


def _row_is_whole(table: Table, label: str, values: list[str]) -> bool:
    """Whether ``table``, rendered at the console's width, shows the row led by ``label`` with ``values`` each
    whole on the row's first line, nothing of them on the next, and no line cut at the right edge."""
    plain = Console(width=console.width, file=io.StringIO(), color_system=None)
    plain.print(table)
    lines = plain.file.getvalue().splitlines()
    for i, line in enumerate(lines[:-1]):
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] == label:
            below = [c.strip() for c in lines[i + 1].split("│")[1:-1]]
            return cells[1:] == values and below[1:] == [""] * len(values) and line.endswith("│")
    return False


_EPS_NOTE = ("eps is never converted, only carried: state it explicitly in the target (bnkit.convert_state does), "
             "or the target's default silently replaces it. A plain torch layer trained on after a conversion "
             "feeds its running variance n/(n-1) times the biased value the others use.")


def _print_lines(convs: list, layouts: list[dict]) -> None:
    """The conventions table as one block of lines per framework, for consoles too narrow for its columns."""
    console.print("BatchNorm conventions (r: running value, x: batch statistic):")
    for fw, c, lay in zip(FRAMEWORKS, convs, layouts):
        var = "unbiased M2/(n-1)" if c.unbiased_running_var else "biased M2/n"
        console.print(f"[bold]{fw}[/]: {_short_rule(c.momentum_weighs)}; momentum weighs the {c.momentum_weighs} "
                      f"value; default momentum {c.default_momentum:g}, eps {c.default_eps:g}; named "
                      f"{lay['eps']}, {lay['momentum']}; running var fed {var}")


def _print_converted(src_name: str, momentum: float, converted: dict[str, float], listed: bool = True) -> None:
    """The momentum in every framework (``listed``: as lines; the table row already showed them otherwise)."""
    if listed:
        console.print(f"{src_name} momentum {momentum!r} is, in each framework:")
        for fw in FRAMEWORKS:
            console.print(f"  {fw}: {converted[fw]!r}", style="green")
    # torch's momentum is the weight on the new value, Keras's the weight on the old
    console.print(f"The same update in every framework: weight {converted['torch']!r} on the new batch "
                  f"statistic, {converted['keras']!r} on the old running value.")


def _short_rule(weighs: str) -> str:
    """The update in a framework's own momentum ``m``, short enough for a table cell."""
    return "r = (1-m) r + m x" if weighs == "new" else "r = m r + (1-m) x"


def _print_names(names: dict[str, tuple[str, ...]]) -> None:
    """The weight names, one row per framework; as plain lines when the table would split a name."""
    header = ("", "gamma", "beta", "running mean", "running var")
    cells = [header] + [(fw, *row) for fw, row in names.items()]
    needed = sum(max(len(c) for c in column) for column in zip(*cells)) + 3 * len(header) + 1
    if console.width < needed:
        console.print("Weight names (gamma, beta, running mean, running var):")
        for fw, row in names.items():
            console.print(f"  [bold]{fw}[/]: {', '.join(row)}")
        return
    table = Table(title="Weight names")
    table.add_column("", style="bold", no_wrap=True)
    for role in header[1:]:
        table.add_column(role, no_wrap=True)
    for fw, row in names.items():
        table.add_row(fw, *row)
    console.print(table)
