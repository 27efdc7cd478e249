"""The one place below the CLI that talks to the terminal: log lines and rich progress bars.

Library code calls `log.info(...)` and wraps long loops in `log.progress(...)`. Output goes to
stderr (stdout stays clean for `--json`) and, once a run directory is open, to its `log.txt`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import sys
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

console = Console(stderr=True, highlight=False)
if not console.is_terminal:  # logs and CI: wide enough for report tables
    console = Console(stderr=True, highlight=False, width=200)
_log_file: Path | None = None
_quiet = False


def set_log_file(path: Path | None) -> None:
    """Append every later log line to `path` (the run's log.txt); None stops."""
    global _log_file
    _log_file = path


def set_quiet(quiet: bool) -> None:
    """Silence terminal output (log.txt still gets every line)."""
    global _quiet
    _quiet = quiet


def _write_file(level: str, message: str) -> None:
    if _log_file is None:
        return
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    with open(_log_file, "a", encoding="utf-8") as f:
        f.write(f"{stamp} {level:5s} {message}\n")


def info(message: str) -> None:
    """A normal progress line."""
    _write_file("INFO", message)
    if not _quiet:
        console.print(message, markup=False)


def warn(message: str) -> None:
    """Something the user should know but that does not stop the run."""
    _write_file("WARN", message)
    if not _quiet:
        console.print(Text.assemble(("warning: ", "yellow"), message))


def error(message: str) -> None:
    """An error; the caller decides whether the run stops."""
    _write_file("ERROR", message)
    console.print(Text.assemble(("error: ", "red"), message))


def detail(message: str) -> None:
    """Only to log.txt (tracebacks, long dumps)."""
    _write_file("DEBUG", message)


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate `items` under a rich progress bar (plain iteration when quiet or not a terminal)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    _write_file("INFO", f"{description} ({total if total is not None else '?'} steps)")
    if _quiet:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal and False) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner for a single long call that has no loop of its own (e.g. a model load)."""
    _write_file("INFO", message)
    if _quiet or not console.is_terminal:
        yield
        return
    with console.status(message):
        yield


def stdout(text: str) -> None:
    """Machine-readable output (JSON) for the CLI: stdout, never the log."""
    sys.stdout.write(text)
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
