"""Progress bars for long work: on stderr, so stdout carries only a command's result; only on a terminal and
transient, so logs and captured output get no bar. Every long loop in lmforge goes through these helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

T = TypeVar("T")


def _bar(enabled: bool, *columns: ProgressColumn) -> Progress:
    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=True, disable=not (enabled and console.is_terminal))


@contextlib.contextmanager
def byte_progress(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A bar counting bytes; yields `advance(n)`."""
    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with _bar(enabled, *columns) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def track(items: Iterable[T], label: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate `items` under a bar counting them."""
    with _bar(enabled, TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        yield from bar.track(items, total=total, description=label)


@contextlib.contextmanager
def step_progress(label: str, total: int, done: int = 0, enabled: bool = True) -> Iterator[Callable[[int, str], None]]:
    """A bar counting steps with a line of metrics beside it; yields `update(completed, metrics_text)`."""
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[metrics]}"))
    with _bar(enabled, *columns) as bar:
        task = bar.add_task(label, total=total, completed=done, metrics="")
        yield lambda completed, metrics: bar.update(task, completed=completed, metrics=metrics)
