"""Files on disk: atomic outputs and content checksums.

Outputs are built beside their target and renamed into place, so a reader never sees a half-written dataset,
checkpoint or model: either the old one or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_directory(target: str | Path, staging: Path | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `target`, on error it is removed.

    `staging` names one already made beside `target` (several processes wrote into it first).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, target)


def remove_stale_staging(parent: Path, pattern: str) -> int:
    """Delete staging directories left by a process that was killed (e.g. `.data.tmp-*`); returns the count.

    Two processes writing the same output at once are not supported, so any staging directory found before
    a new one is made belongs to a dead process.
    """
    stale = [p for p in parent.glob(pattern) if p.is_dir()] if parent.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def replace_directory(staging: Path, target: Path) -> None:
    """Move `staging` to `target`, replacing what was there with two renames (never a half state)."""
    retired = None
    if target.exists():
        retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, retired)
    os.replace(staging, target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary file, fsync it, then rename it over `path`."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write text to a temporary file, fsync it, then rename it over `path`."""
    path = Path(path)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    with staging.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
