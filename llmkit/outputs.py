"""Where a command writes: it never swallows what it reads, and one process at a time owns it.

Every command that writes a directory (data-prep, pretrain, finetune, export) calls `check_output` with the
paths it reads before it touches anything, and holds `output_lock` while it writes; one that writes report files
(eval, monitor) calls `check_report_paths`. The rule: no command may
delete or overwrite anything it reads, or any folder that contains it, nor the directory the user stands in.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from llmkit.errors import UserError


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_output(out: str | Path, reads: Iterable[str | Path | None], flag: str = "--out") -> None:
    """Refuse an output that is a file, that is or contains an input, or that is or contains the current directory.

    `reads` are the files and directories the command reads (sources, datasets, models, checkpoints); names
    that do not exist on disk (hub names) are skipped.
    """
    target = _real(out)
    if target.exists() and not target.is_dir():
        raise UserError(f"{out}: exists and is a file; choose another {flag}")
    for read in reads:
        if read is None or not Path(read).exists():
            continue
        source = _real(read)
        if source == target or target in source.parents:
            what = "is" if source == target else "contains"
            raise UserError(f"{flag} {out}: {what} {read}, which this command reads; choose another {flag}")
    cwd = _real(os.getcwd())
    if cwd == target or target in cwd.parents:
        raise UserError(f"{flag} {out}: is (or contains) the current directory; choose a new directory below it")
    check_writable(out, flag)


# What marks a directory as one llmkit wrote: a prepared dataset, an export, a pruned or factored model, a checkpoint;
# and a run: its config.yaml beside what a run writes with it.
OUTPUT_MARKERS = (
    "manifest.json",
    "export_report.json",
    "prune_report.json",
    "factor_report.json",
    "trainer_state.json",
)
RUN_MARKERS = ("tokenizer", "metrics.jsonl", "checkpoints", "final")


def llmkit_wrote(directory: Path) -> bool:
    """A directory llmkit wrote (dataset, run, checkpoint, export, pruned or factored model)."""
    if (directory / "config.yaml").is_file() and any((directory / marker).exists() for marker in RUN_MARKERS):
        return True
    return any((directory / marker).is_file() for marker in OUTPUT_MARKERS)


def replaces(out: Path, overwrite: bool, flag: str = "--out") -> bool:
    """Whether writing `out` replaces a directory there. Without --overwrite that is refused; a folder llmkit did not
    write is refused even with it: --overwrite replaces llmkit's own outputs, never a user's files."""
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if not llmkit_wrote(out):
        names = sorted(path.name for path in out.iterdir())
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise UserError(
            f"{flag} {out}: holds files llmkit did not write ({shown}); choose another {flag} (--overwrite replaces "
            "only what llmkit wrote)"
        )
    if not overwrite:
        raise UserError(
            f"{flag} {out}: holds an earlier output; pass --overwrite to replace it or choose another {flag}"
        )
    return True


def check_writable(path: str | Path, flag: str = "--out") -> None:
    """Refuse, before any work, a path whose nearest existing folder cannot be written (read-only, not yours)."""
    target = _real(path)
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is None:
        return
    if existing == target and not target.is_dir():  # a file to replace: its folder must be writable
        existing = target.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"{flag} {path}: cannot write in {existing} (read-only or no permission); choose another {flag}"
        )


def check_report_paths(
    reports: Iterable[Path | None], reads: Iterable[Any], what: str = "report", example: str = "report.json"
) -> None:
    """Every command that writes a report (eval, monitor, serve's request log) checks its paths first: a report is a
    file, not a folder, never one of the command's inputs (a request log, an eval file) nor inside one
    (`--markdown run/final/config.json` would replace the model's config), and not inside an existing file."""
    sources = [(read, _real(read)) for read in reads if read is not None and Path(read).exists()]
    paths = [path for path in reports if path is not None]
    twice = [path for number, path in enumerate(paths) if _real(path) in {_real(p) for p in paths[:number]}]
    if twice:  # the last written would replace the others
        raise UserError(f"{twice[0]}: named for two reports; give each its own file")
    for path in paths:
        if path.is_dir():
            raise UserError(f"{path}: is a folder; give a file name for the {what} (e.g. {path / example})")
        target = _real(path)
        for read, source in sources:
            if target == source:
                raise UserError(f"{path}: is an input of this command; write the {what} elsewhere")
            if source in target.parents:
                raise UserError(f"{path}: is inside {read}, which this command reads; write the {what} elsewhere")
        check_writable(path, what)


def lock_path(out: str | Path) -> Path:
    """The lock file of an output directory: beside it, so replacing the directory keeps the lock."""
    target = _real(out)
    return target.parent / f".{target.name}.lock"


@contextmanager
def output_lock(out: str | Path, enabled: bool = True) -> Iterator[None]:
    """Own `out` for the duration: an exclusive lock that dies with its process (a killed job leaves no stale
    lock that matters). A second llmkit process on the same output is refused with the holder's host and pid.
    """
    if not enabled:
        yield
        return
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = _acquire(path, out)
    _held.add(descriptor)
    try:
        yield
    finally:
        _held.discard(descriptor)
        path.unlink(missing_ok=True)
        os.close(descriptor)


# A forked child (a multiprocessing manager, a loader worker) would share the lock's open file and keep the output
# locked after this process dies: children close their copy at once.
_held: set[int] = set()


def _close_held_locks() -> None:
    for descriptor in _held:
        with suppress(OSError):
            os.close(descriptor)
    _held.clear()


os.register_at_fork(after_in_child=_close_held_locks)


def _acquire(path: Path, out: str | Path) -> int:
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(descriptor, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(descriptor)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"{out}: in use by {holder}; wait for that job to end or stop it (two jobs must not share "
                    "one output)"
                ) from None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and our lock: take the new one
            os.ftruncate(descriptor, 0)
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            os.pwrite(descriptor, f"pid {os.getpid()} on host {socket.gethostname()} (since {started})".encode(), 0)
            return descriptor
        os.close(descriptor)
