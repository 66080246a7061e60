"""Checkpoints: everything needed to continue a run, written atomically and sealed with checksums.

A checkpoint directory ``RUN/checkpoints/step-00000200/`` holds::

    model/              the model in Hugging Face layout (config.json, model.safetensors)
    optimizer.pt        optimizer state (tensors and numbers only: loads with weights_only=True)
    rng.pt              Python, NumPy and torch RNG states
    trainer_state.json  step, tokens, data position, early-stopping state, fingerprints
    COMPLETE            sha256 of every file above; written last, so only a whole checkpoint has it

It is built in a staging directory and renamed into place, so a save cut off midway leaves no
directory that looks like a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.atomic import atomic_directory, write_json

COMPLETE = "COMPLETE"
PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save_checkpoint(
    checkpoints_dir: Path, step: int, model: Any, optimizer: Any, trainer_state: dict[str, Any]
) -> Path:
    """Write a complete checkpoint for `step` (the unwrapped model) and return its path."""
    target = checkpoints_dir / checkpoint_name(step)
    with atomic_directory(target) as staging:
        model.save_pretrained(staging / "model", safe_serialization=True)
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(rng_state(), staging / "rng.pt")
        write_json(staging / "trainer_state.json", trainer_state)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        checksums = {str(p.relative_to(staging)): _sha256(p) for p in files}
        write_json(staging / COMPLETE, {"step": step, "sha256": checksums})
    return target


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoints that finished saving, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.name.startswith(PREFIX) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def prune_checkpoints(checkpoints_dir: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` complete checkpoints (called only after a new one is sealed)."""
    for old in complete_checkpoints(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors, lists and numbers, so they load with torch.load(weights_only=True)."""
    version, keys, position = random.getstate()
    kind, numpy_keys, numpy_pos, has_gauss, cached_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(keys), position],
        "numpy": [kind, torch.from_numpy(np.asarray(numpy_keys, dtype=np.int64)), numpy_pos, has_gauss, cached_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return dict(json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")))
