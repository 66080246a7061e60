"""Starting or continuing a run: shared by every training command.

`find_checkpoint` (read-only) picks and verifies the checkpoint and refuses silent changes; `open_run_dir`
claims the directory (never restarting a run with checkpoints by accident) and writes the run's config and
tokenizer; `restore_state` puts the optimizer, loader, counters and RNG back where the checkpoint left them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.atomic import remove_stale_staging
from llmkit.config import RunConfig, dump_config
from llmkit.console import info
from llmkit.errors import UserError
from llmkit.train.checkpoint import (
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    read_trainer_state,
    safe_torch_load,
    select_checkpoint,
)
from llmkit.train.loop import ResumeState, strategy_name
from llmkit.train.setup import claim_run_dir, uses_deepspeed, uses_fsdp

# Changing these under a resumed run would silently change what the run means.
GUARDED_FIELDS = ("global_batch_size", "block_size", "tokenizer_hash", "dataset_fingerprint")


def find_checkpoint(
    run_dir: Path,
    resume: str | None,
    fallback: bool,
    overwrite: bool,
    fingerprints: dict[str, Any],
    allow_config_change: bool,
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to continue from and its trainer state, or (None, None) for a fresh run."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: choose one")
    checkpoint = select_checkpoint(run_dir, resume, fallback) if resume else None
    if checkpoint is None:
        return None, None
    saved = read_trainer_state(checkpoint)
    changed = [
        f"{name} {saved.get(name)} -> {fingerprints[name]}"
        for name in GUARDED_FIELDS
        if name in fingerprints and saved.get(name) != fingerprints[name]
    ]
    if changed and not allow_config_change:
        raise UserError(
            f"{checkpoint}: resuming would change {'; '.join(changed)}; "
            "restore the original settings or pass --allow-config-change"
        )
    for change in changed:
        info(f"warning: resuming with a changed setting: {change}")
    return checkpoint, saved


def open_run_dir(
    cfg: RunConfig, checkpoint: Path | None, resume: str | None, overwrite: bool, accelerator: Any, tokenizer: Any
) -> tuple[Path, str]:
    """Claim (fresh run) or reuse (resumed run) the run directory; write config.yaml and tokenizer/."""
    run_dir = Path(cfg.out_dir)
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


def restore_state(
    checkpoint: Path, saved: dict[str, Any], model: Any, optimizer: Any, loader: Any, accelerator: Any
) -> ResumeState:
    """Load the optimizer (after accelerator.prepare), scaler, loader position and RNG states."""
    written_by, now = saved.get("strategy", "ddp"), strategy_name(accelerator)
    if written_by != now:
        raise UserError(
            f"{checkpoint}: written under strategy {written_by}, resumed under {now}; "
            f"resume with distributed.strategy={written_by}"
        )
    if uses_deepspeed(accelerator):
        if saved["num_processes"] != accelerator.num_processes:
            raise UserError(
                f"{checkpoint}: DeepSpeed saved optimizer shards for {saved['num_processes']} processes; "
                f"resume with --num-processes {saved['num_processes']} (this run has {accelerator.num_processes})"
            )
        # DeepSpeed's own files (checked against the seal above) hold the module, the shards and the step.
        model.load_checkpoint(
            str(checkpoint / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_optimizer_states=True,
            load_lr_scheduler_states=False, load_module_strict=True,
        )  # fmt: skip
    elif uses_fsdp(accelerator):  # whole states keyed by parameter name: FSDP shards them as it loads them
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = safe_torch_load(checkpoint / "optimizer.pt")
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer.optimizer, optim_state_dict=state, options=options)
    else:
        optimizer.load_state_dict(safe_torch_load(checkpoint / "optimizer.pt"))
    if accelerator.scaler is not None and (checkpoint / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(safe_torch_load(checkpoint / "scaler.pt"))
    loader.position.load_state_dict(saved["data"])
    rng_states = safe_torch_load(checkpoint / "rng.pt")
    if not isinstance(rng_states, list) or not rng_states:
        raise UserError(f"{checkpoint / 'rng.pt'}: unexpected content")
    rank = accelerator.process_index
    return ResumeState(
        checkpoint=checkpoint,
        step=int(saved["step"]),
        tokens=int(saved["tokens"]),
        best_val_loss=float(saved["early_stopping"]["best"]),
        bad_evals=int(saved["early_stopping"]["bad_evals"]),
        rng=rng_states[rank] if rank < len(rng_states) else rng_states[0],
    )
