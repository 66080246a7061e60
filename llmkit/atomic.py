"""Files on disk: atomic outputs and content checksums.

Outputs are built beside their target and renamed into place, so a reader never sees a half-written dataset,
checkpoint or model: either the old one or the new one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
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

    The output's lock (llmkit.outputs.output_lock) keeps a second process away, so any staging directory found
    before a new one is made belongs to a dead process.
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
    """Write JSON to a temporary file, fsync it, then rename it over `path`. NaN and infinities, which JSON
    cannot hold, are written as null: the file is always valid JSON."""
    write_text(path, json.dumps(_finite(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def _finite(node: Any) -> Any:
    if isinstance(node, float) and not math.isfinite(node):
        return None
    if isinstance(node, dict):
        return {key: _finite(value) for key, value in node.items()}
    if isinstance(node, list | tuple):
        return [_finite(value) for value in node]
    return node


def write_text(path: str | Path, text: str) -> None:
    """Write text to a temporary file, fsync it, then rename it over `path` (the temporary file never stays)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes to a temporary file, fsync it, then rename it over `path` (the temporary file never stays)."""
    path = Path(path)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with staging.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


FULL_DISK_BYTES = 1 << 20


@contextmanager
def full_disk_as_oserror(directory: Path) -> Iterator[None]:
    """Report a write that failed on a full disk as OSError(ENOSPC) naming `directory`.

    torch.save says "unexpected pos 64 vs 0" and safetensors wraps the OS error in its own type; when the
    disk under `directory` has (almost) no space left afterwards, that is what happened.
    """
    try:
        yield
    except OSError:
        raise
    except Exception:
        if shutil.disk_usage(directory).free < FULL_DISK_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory)) from None
        raise
