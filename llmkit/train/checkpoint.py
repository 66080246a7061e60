"""Checkpoints: everything needed to continue a run, written atomically and sealed with checksums.

A checkpoint directory ``RUN/checkpoints/step-00000200/`` holds::

    model/              the model in Hugging Face layout (config.json, model.safetensors)
    optimizer.pt        optimizer state (tensors and numbers only: loads with weights_only=True)
    deepspeed/          instead of optimizer.pt under DeepSpeed: every process's shard of the optimizer
                        states, written by DeepSpeed itself (resume needs the same number of processes)
    rng.pt              Python, NumPy, torch CPU and CUDA RNG states, one entry per process
    objective_state.pt  the objective's state, one entry per process, where it has one (GRPO's answers inside a
                        num_iterations round)
    scaler.pt           the fp16 loss scaler's state (only when one is used)
    trainer_state.json  step, tokens, data position, early-stopping state, fingerprints
    config.yaml         the resolved config of the run (secrets removed)
    COMPLETE            size and sha256 of every file above; written last, so only a whole checkpoint has it

It is built in a staging directory and renamed into place, so a save cut off midway leaves no directory
that looks like a checkpoint. Loading verifies every checksum first and names the file that is wrong.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.atomic import atomic_directory, file_sha256, full_disk_as_oserror, write_json
from llmkit.errors import UserError, first_line
from llmkit.train import faults

COMPLETE = "COMPLETE"
PREFIX = "step-"
REQUIRED = ("rng.pt", "trainer_state.json")
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"
# A full model, or (LoRA runs) an adapter: one of these pairs must be sealed.
MODEL_FILES = (
    ("model/model.safetensors", "model/config.json"),
    ("model/adapter_model.safetensors", "model/adapter_config.json"),
)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: Any,
    optimizer: Any,
    trainer_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    config_yaml: str,
    scaler: Any = None,
    staging: Path | None = None,
    objective_states: list[Any] | None = None,
) -> Path:
    """Write a complete checkpoint for `step` and return its path (main process only).

    `optimizer` is None when the optimizer states are already in `staging` (DeepSpeed wrote its shards there).
    """
    target = checkpoints_dir / checkpoint_name(step)
    with atomic_directory(target, staging) as staging, full_disk_as_oserror(checkpoints_dir):
        model.save_pretrained(staging / "model", safe_serialization=True)
        faults.maybe_kill("save", step)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(rng_states, staging / "rng.pt")
        if objective_states is not None and any(state is not None for state in objective_states):
            torch.save(objective_states, staging / "objective_state.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), staging / "scaler.pt")
        write_json(staging / "trainer_state.json", trainer_state)
        (staging / "config.yaml").write_text(config_yaml, encoding="utf-8")
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        seal = {str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
        write_json(staging / COMPLETE, {"step": step, "files": seal})
    return target


def shared_staging(checkpoints_dir: Path, step: int) -> Path:
    """The staging directory every process writes into when each saves its own shard (DeepSpeed)."""
    return checkpoints_dir / f".{checkpoint_name(step)}.tmp-shared"


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


def verify_checkpoint(checkpoint: Path) -> None:
    """Raise a UserError naming the first file that is missing, truncated or altered."""
    seal_path = checkpoint / COMPLETE
    if not seal_path.is_file():
        raise UserError(f"{checkpoint}: incomplete checkpoint (no {COMPLETE} marker: its save was cut off)")
    try:
        seal = json.loads(seal_path.read_text(encoding="utf-8"))["files"]
        if not all(
            isinstance(v, dict) and isinstance(v["bytes"], int) and isinstance(v["sha256"], str) for v in seal.values()
        ):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise UserError(
            f"{seal_path}: corrupt checkpoint (its seal is not a list of files, sizes and sha256s)"
        ) from None
    for name in REQUIRED:
        if name not in seal:
            raise UserError(f"{checkpoint / name}: missing from the checkpoint seal")
    if "optimizer.pt" not in seal and not any(name.startswith(DEEPSPEED_DIR + "/") for name in seal):
        raise UserError(f"{checkpoint / 'optimizer.pt'}: missing from the checkpoint seal")
    if not any(all(name in seal for name in pair) for pair in MODEL_FILES):
        raise UserError(f"{checkpoint / 'model'}: no model or adapter weights in the checkpoint seal")
    for name, expected in seal.items():
        path = checkpoint / name
        if not path.is_file():
            raise UserError(f"{path}: checkpoint file is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise UserError(
                f"{path}: checkpoint file is truncated or altered ({size} bytes, sealed with {expected['bytes']})"
            )
        if file_sha256(path) != expected["sha256"]:
            raise UserError(f"{path}: checkpoint file is corrupted (sha256 does not match its seal)")


def select_checkpoint(run_dir: Path, resume: str, fallback: bool) -> Path | None:
    """The checkpoint to resume from: `auto` means the newest valid one (None when the run has none yet).

    A newest checkpoint that fails verification is an error naming the bad file, unless `fallback` is
    set, in which case older checkpoints are tried in turn.
    """
    if resume != "auto":
        path = Path(resume)
        if not (path / COMPLETE).is_file() and not (path / "trainer_state.json").is_file():
            raise UserError(f"{path}: not a checkpoint directory (expected {COMPLETE} and trainer_state.json)")
        verify_checkpoint(path)
        return path
    candidates = list(reversed(complete_checkpoints(run_dir / "checkpoints")))
    for i, candidate in enumerate(candidates):
        try:
            verify_checkpoint(candidate)
            return candidate
        except UserError as exc:
            if not fallback:
                raise UserError(f"{exc} (pass --resume-fallback to use the previous valid checkpoint)") from None
            older = candidates[i + 1].name if i + 1 < len(candidates) else "none left"
            print(f"warning: {exc}; falling back to {older}", file=sys.stderr, flush=True)
    if candidates:
        raise UserError(f"{run_dir / 'checkpoints'}: no valid checkpoint left to resume from")
    return None


def safe_torch_load(path: Path) -> Any:
    """torch.load that accepts tensors, numbers and containers only: a pickle carrying code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = first_line(exc, 160, empty="unsupported content")
        raise UserError(f"{path}: refused to load: not a plain tensor file, it may carry code ({first})") from None


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, lists and numbers (loadable with weights_only=True)."""
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


def restore_rng_state(state: dict[str, Any]) -> None:
    version, keys, position = state["python"]
    random.setstate((version, tuple(keys), position))
    kind, numpy_keys, numpy_pos, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, numpy_keys.numpy().astype(np.uint32), numpy_pos, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


TRAINER_STATE_KEYS = {"step": int, "tokens": int, "data": dict, "early_stopping": dict}


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a (verified) checkpoint; a state of the wrong shape is a corrupt checkpoint."""
    path = checkpoint / "trainer_state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not all(isinstance(state.get(k), t) for k, t in TRAINER_STATE_KEYS.items()):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise UserError(
            f"{path}: corrupt checkpoint (trainer state unreadable or missing step, tokens or data)"
        ) from None
    return dict(state)
