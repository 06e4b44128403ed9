"""Tables that stay whole on any console: one too narrow for a table's columns gets its rows as blocks of lines.

rich narrows a table's columns to fit the console; a column given a few characters folds its cells one letter per
line, and one given none drops them (at 20 columns the audit's "fix" column printed empty). Below
:data:`MIN_CELL` characters for each column, :func:`print_table` prints each row as ``column: value`` lines
instead, wrapped at the console's width.
"""
from __future__ import annotations

from rich.console import Console, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

#: Characters of content each column needs for a table to be printed as one (a column whose cells and header's
#: words are all shorter needs only their width).
MIN_CELL = 8


def print_table(console: Console, table: Table) -> None:
    """Print ``table``, or where ``console`` cannot give every column :data:`MIN_CELL` characters, its title, then
    each row as lines ``header: value`` (the first flush, the rest indented; empty cells left out), then its
    caption."""
    if console.width >= _needed_width(table):
        console.print(table)
        return
    if table.title:
        console.print(_text(table.title), style="bold")
    rows = list(zip(*(column.cells for column in table.columns)))
    for i, row in enumerate(rows):
        if i:
            console.print()
        for j, (column, cell) in enumerate(zip(table.columns, row)):
            value = _text(cell)
            if not value.plain:
                continue
            header = _text(column.header).plain
            line = Text.assemble((f"{header}: ", "bold"), value) if header else value
            console.print(Padding(line, (0, 0, 0, 2 if j else 0), expand=False))
    if table.caption:
        console.print(_text(table.caption), style="dim")


def _needed_width(table: Table) -> int:
    """The console width at which each column of ``table`` gets :data:`MIN_CELL` characters (or its content's
    widest word, if less), its borders and padding."""
    n = len(table.columns)
    borders = (2 if table.show_edge else 0) + n - 1 if table.box else 0
    padding = 2 * n - (0 if table.pad_edge else 2)
    content = 0
    for column in table.columns:
        words = [w for cell in (column.header, *column.cells) for w in _text(cell).plain.split()]
        content += min(MIN_CELL, max((len(w) for w in words), default=0))
    return content + borders + padding


def _text(cell: RenderableType) -> Text:
    """A cell as rich shows it: a string is markup."""
    if isinstance(cell, Text):
        return cell
    return Text.from_markup(cell) if isinstance(cell, str) else Text(str(cell))
