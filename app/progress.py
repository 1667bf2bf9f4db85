"""The one progress bar of the command-line tools: rich, on stderr, counting items.

>>> with progress_bar("scoring", total=3, enabled=False) as advance:
...     advance(3)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(
    label: str, total: int, unit: str = "", enabled: bool = True, transient: bool = False
) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (or nothing when disabled); yields ``advance(n)``.

    ``transient`` clears the bar when done (for commands whose output follows on the terminal).
    """
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=transient) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
