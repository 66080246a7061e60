"""Terminal output: rich progress on a terminal, plain lines when piped or in CI."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, highlight=False)


_warned: set[tuple[type, str]] = set()


def show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """A library's warning as one whole line on stderr, once per text, saying where it comes from (Python's own
    format repeats it per call site and adds the source line, e.g. a bare `warnings.warn(`)."""
    text = " ".join(str(message).split())
    if (category, text) in _warned:
        return
    _warned.add((category, text))
    where = filename.split("site-packages/")[-1]
    print(f"warning: {text} ({category.__name__} from {where}:{lineno})", file=sys.stderr, flush=True)


def interactive() -> bool:
    """True when output goes to a person at a terminal rather than to a log or CI."""
    return console.is_terminal and not os.environ.get("CI")


def info(message: str) -> None:
    console.print(message)


@contextmanager
def progress_bar(
    description: str, total: float | None, unit: str = "it", enabled: bool = True, completed: int = 0
) -> Iterator[Any]:
    """A progress bar with a custom stats field; yields `update(advance, **fields)`. `completed`: done before this
    process began (a resumed run's steps), which the pace and the ETA leave out.

    On a terminal it is a rich bar with ETA; otherwise it prints a plain line at most every 10 seconds, with the ETA
    at the pace since the line before, and once at the end, so CI logs stay short and readable.
    """
    if not enabled:
        yield lambda advance=1, stats="": None
        return
    if interactive():
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn() if total else TaskProgressColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(description, total=total, stats="", completed=completed)

            def update(advance: float = 1, stats: str = "") -> None:
                progress.update(task, advance=advance, stats=stats)

            yield update
        return

    done, last, last_done, last_stats = float(completed), time.monotonic(), float(completed), ""
    start = last

    def plain_update(advance: float = 1, stats: str = "") -> None:
        nonlocal done, last, last_done, last_stats
        done += advance
        last_stats = stats
        now = time.monotonic()
        if now - last >= 10:
            rate = (done - last_done) / (now - last)  # since the last line: the recent pace, not start-up's
            eta = f", ETA {_clock((total - done) / rate)}" if total and rate > 0 and done < total else ""
            last, last_done = now, done
            _print_plain(description, done, total, stats, f"{now - start:.1f}s{eta}")

    yield plain_update
    _print_plain(description, done, total, last_stats, f"{time.monotonic() - start:.1f}s")


def _print_plain(description: str, done: float, total: float | None, stats: str, times: str) -> None:
    of = f"/{total:.0f}" if total else ""
    print(f"{description}: {done:.0f}{of} {stats} [{times}]", file=sys.stdout, flush=True)


def _clock(seconds: float) -> str:
    """45s, 3m12s, 2h05m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
