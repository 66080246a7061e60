"""Starting or continuing a run: shared by every training command.

`own_run_dir` makes the command the one owner of its run directory (a second job on it is refused);
`find_checkpoint` (read-only) picks and verifies the checkpoint and refuses silent changes; `finished_run`
answers a finished run resumed (nothing to do); `open_run_dir` claims the directory (never restarting a run
with checkpoints by accident) and writes the run's config and tokenizer; `restore_state` puts the optimizer,
loader, counters and RNG back where the checkpoint left them.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.atomic import remove_stale_staging
from llmkit.config import RunConfig, dump_config
from llmkit.console import info
from llmkit.errors import UserError
from llmkit.outputs import check_output, output_lock
from llmkit.train import faults
from llmkit.train.checkpoint import (
    read_trainer_state,
    safe_torch_load,
    select_checkpoint,
)
from llmkit.train.job import FitResult, ResumeState
from llmkit.train.setup import claim_run_dir
from llmkit.train.strategies import Strategy

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

# Changing these under a resumed run would silently change what the run means (--allow-config-change allows it).
GUARDED_FIELDS = ("global_batch_size", "block_size", "tokenizer_hash", "dataset_fingerprint")
# The model a checkpoint holds: a resumed run loads it from the checkpoint, so these can never change.
MODEL_KEYS = (
    "arch",
    "n_layers",
    "hidden_size",
    "n_heads",
    "n_kv_heads",
    "intermediate_size",
    "context_length",
    "rope_theta",
    "tie_embeddings",
    "init_from",
)
METHOD_KEYS = ("task", "method", "lora", "freeze_top_layers", "trainable_modules")


def model_fingerprint(cfg: RunConfig, finetuning: bool = False) -> dict[str, Any]:
    """The settings that decide what the checkpoint's weights are (a model change on resume is refused)."""
    keys = {f"model.{key}": value for key, value in cfg.model.model_dump(mode="json", include=set(MODEL_KEYS)).items()}
    if finetuning:
        method = cfg.finetune.model_dump(mode="json", include=set(METHOD_KEYS))
        keys.update({f"finetune.{key}": value for key, value in method.items()})
    return keys


@contextmanager
def own_run_dir(cfg: RunConfig, reads: list[Any], resume: str | None, accelerator: Accelerator) -> Iterator[None]:
    """Check that the run directory swallows none of `reads` (nor a checkpoint of another run to branch from),
    then own it for the run: the main process takes its lock and every process learns whether it got it (a
    second job on one run directory is refused)."""
    out = Path(cfg.out_dir).resolve()
    if resume not in (None, "auto") and out not in Path(resume).resolve().parents:
        reads = [*reads, resume]
    check_output(cfg.out_dir, reads)
    with ExitStack() as held:
        refusal = None
        try:
            held.enter_context(output_lock(cfg.out_dir, enabled=accelerator.is_main_process))
        except UserError as exc:
            refusal = str(exc)
        refusal = _from_main(accelerator, refusal)  # every process stops when the main one could not own it
        if refusal is not None:
            raise UserError(refusal)
        faults.maybe_kill("startup", 0)
        yield


def _from_main(accelerator: Accelerator, value: Any) -> Any:
    """The main process's `value`, on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def run_fingerprints(
    cfg: RunConfig, world: int, dataset_fingerprint: str, tokenizer_hash: str, block_size: int, finetuning: bool
) -> dict[str, Any]:
    """What a checkpoint records about the run it belongs to; `find_checkpoint` compares it on resume."""
    return {
        "dataset_fingerprint": dataset_fingerprint,
        "tokenizer_hash": tokenizer_hash,
        "global_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world,
        "block_size": block_size,
        "model": model_fingerprint(cfg, finetuning),
    }


def find_checkpoint(
    cfg: RunConfig,
    world: int,
    resume: str | None,
    fallback: bool,
    overwrite: bool,
    fingerprints: dict[str, Any],
    allow_config_change: bool,
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint of the run in `cfg.out_dir` to continue from and its trainer state, or (None, None) for a
    fresh run. `world` (this run's processes) gives the hint when only the number of processes changed: the
    micro-batch size that keeps the global batch."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    checkpoint = select_checkpoint(Path(cfg.out_dir), resume, fallback) if resume else None
    if checkpoint is None:
        return None, None
    saved = read_trainer_state(checkpoint)
    saved_model, model = saved.get("model"), fingerprints.get("model")
    if isinstance(saved_model, dict) and model is not None and saved_model != model:
        diff = "; ".join(
            f"{key} {saved_model.get(key)} -> {model.get(key)}"
            for key in sorted(set(saved_model) | set(model))
            if saved_model.get(key) != model.get(key)
        )
        raise UserError(
            f"{checkpoint}: resuming would change the model ({diff}); a resumed run continues the checkpoint's "
            "model: restore these settings, or start a new run with another --out"
        )
    changed = [
        f"{name} {saved.get(name)} -> {fingerprints[name]}"
        for name in GUARDED_FIELDS
        if name in fingerprints and saved.get(name) != fingerprints[name]
    ]
    if changed and not allow_config_change:
        hint = _batch_hint(saved, world, cfg.train.grad_accum_steps)
        raise UserError(
            f"{checkpoint}: resuming would change {'; '.join(changed)}; "
            f"restore the original settings{hint} or pass --allow-config-change"
        )
    for change in changed:
        info(f"warning: resuming with a changed setting: {change}")
    return checkpoint, saved


def _batch_hint(saved: dict[str, Any], world: int, accum: int) -> str:
    wanted = saved.get("global_batch_size")
    if not isinstance(wanted, int) or saved.get("num_processes") == world or wanted % (world * accum):
        return ""
    return (
        f" (on {world} process(es), --micro-batch-size {wanted // (world * accum)} keeps the global batch of {wanted})"
    )


def finished_run(run_dir: Path, saved: dict[str, Any] | None, total_steps: int) -> FitResult | None:
    """For a checkpoint past or at the end of the run: a budget below its step is an error; a finished run whose
    final model exists is answered without changing anything (None: there is training or finishing to do)."""
    if saved is None:
        return None
    step = int(saved["step"])
    if step > total_steps:
        raise UserError(
            f"{run_dir}: the checkpoint is at step {step:,}, past this run's budget of {total_steps:,} steps; "
            f"give a budget of at least {step:,} steps to continue, or start a new run with another --out"
        )
    finished = bool(saved.get("stopped_early")) or step == total_steps
    if not finished or not (run_dir / "final").is_dir():
        return None
    val_loss = saved.get("val_loss")
    best = (saved.get("early_stopping") or {}).get("best")
    return FitResult(
        steps=step,
        tokens=int(saved["tokens"]),
        seconds=0.0,
        train_loss=float(saved.get("train_loss") or math.nan),
        val_loss=val_loss,
        best_val_loss=best if isinstance(best, float) and math.isfinite(best) else None,
        stopped_early=step < total_steps,
        final_dir=run_dir / "final",
        already_finished=True,
    )


def open_run_dir(
    cfg: RunConfig,
    checkpoint: Path | None,
    resume: str | None,
    overwrite: bool,
    accelerator: Accelerator,
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[Path, str]:
    """Claim (fresh run) or reuse (resumed run) the run directory; write config.yaml and tokenizer/."""
    run_dir = Path(cfg.out_dir)
    if checkpoint is not None and run_dir.resolve() not in checkpoint.resolve().parents:
        return _branch(cfg, checkpoint, accelerator, tokenizer)
    if checkpoint is None:
        checkpoints = run_dir / "checkpoints"
        if not overwrite and checkpoints.is_dir() and any(checkpoints.iterdir()):
            if resume == "auto":
                raise UserError(
                    f"{checkpoints}: holds no complete checkpoint to resume; pass --overwrite to start fresh"
                )
            raise UserError(
                f"{run_dir}: holds checkpoints of an earlier run; pass --resume auto to continue it "
                "or --overwrite to start fresh"
            )
        run_dir = claim_run_dir(run_dir, overwrite, accelerator, restart_unsaved_run=resume == "auto")
    config_yaml = dump_config(cfg)
    if accelerator.is_main_process:
        remove_stale_staging(run_dir / "checkpoints", ".step-*.tmp-*")  # saves cut off by a kill
        (run_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
        tokenizer.save_pretrained(run_dir / "tokenizer")
    return run_dir, config_yaml


def _branch(
    cfg: RunConfig, checkpoint: Path, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase
) -> tuple[Path, str]:
    """`--resume CHECKPOINT --out NEW`: a new run that continues another run's checkpoint; the other run is
    only read. The new run's metrics start with the other run's, up to the checkpoint."""
    run_dir = claim_run_dir(cfg.out_dir, False, accelerator)
    config_yaml = dump_config(cfg)
    if accelerator.is_main_process:
        parent_metrics = checkpoint.resolve().parents[1] / "metrics.jsonl"
        if parent_metrics.is_file():
            shutil.copyfile(parent_metrics, run_dir / "metrics.jsonl")  # fit keeps the records up to the step
        (run_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
        tokenizer.save_pretrained(run_dir / "tokenizer")
        info(f"branching from {checkpoint}: a new run in {run_dir} (the original run is left as it is)")
    accelerator.wait_for_everyone()
    return run_dir, config_yaml


def restore_state(
    checkpoint: Path, saved: dict[str, Any], model: Any, optimizer: Any, loader: Any, strategy: Strategy
) -> ResumeState:
    """Load the optimizer (after accelerator.prepare), scaler, loader position and RNG states."""
    accelerator = strategy.accelerator
    strategy.restore_optimizer(checkpoint, saved, model, optimizer)
    if accelerator.scaler is not None and (checkpoint / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(safe_torch_load(checkpoint / "scaler.pt"))
    try:
        loader.position.load_state_dict(saved["data"])
    except ValueError as exc:
        raise UserError(
            f"{checkpoint}: the data position cannot be continued with micro-batches of "
            f"{loader.position.items_per_batch} ({exc}); keep train.micro_batch_size x processes as it was "
            f"({saved.get('num_processes', 1)} process(es) at the checkpoint)"
        ) from None
    rng_states = safe_torch_load(checkpoint / "rng.pt")
    if not isinstance(rng_states, list) or not rng_states:
        raise UserError(f"{checkpoint / 'rng.pt'}: unexpected content")
    rank = accelerator.process_index
    objective_file = checkpoint / "objective_state.pt"
    objective_states = safe_torch_load(objective_file) if objective_file.is_file() else []
    train_loss, best = saved.get("train_loss"), saved["early_stopping"].get("best")
    return ResumeState(
        checkpoint=checkpoint,
        step=int(saved["step"]),
        tokens=int(saved["tokens"]),
        best_val_loss=float(best) if best is not None else math.inf,  # JSON holds no infinity: null
        bad_evals=int(saved["early_stopping"]["bad_evals"]),
        rng=rng_states[rank] if rank < len(rng_states) else rng_states[0],
        window=dict(saved.get("log_window") or {}),
        train_loss=float(train_loss) if train_loss is not None else math.nan,
        val_loss=saved.get("val_loss"),
        stopped_early=bool(saved.get("stopped_early")),
        objective_states=list(objective_states),
    )
