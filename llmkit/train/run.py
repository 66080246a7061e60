"""The tail every training command shares, from the step budget to `fit`.

A command (pretrain, finetune) checks its inputs, finds its checkpoint, loads or builds its model and makes its batch
source; then `train` does the rest in one order: budget, finished-run check, run directory, objective, optimizer,
`accelerator.prepare`, the command's own preparation, validation batches, restore, announcement, `fit`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.console import info
from llmkit.flops import model_flops_per_token
from llmkit.train.job import FitResult, Objective, ResumeState, TrainJob
from llmkit.train.loader import BatchSource
from llmkit.train.loop import fit
from llmkit.train.optimizers import build_optimizer
from llmkit.train.resume import finished_run, open_run_dir, restore_state
from llmkit.train.setup import steps_for_budget
from llmkit.train.strategies import Strategy

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Batches = list[dict[str, Any]]


@dataclass
class Found:
    """Where the run stands before anything is written: its fingerprints and the checkpoint to resume, if any."""

    fingerprints: dict[str, Any]
    checkpoint: Path | None
    saved_state: dict[str, Any] | None


@dataclass
class Parts:
    """What a command brings to the shared tail."""

    model: Any  # loaded or built, wrapped (LoRA) and placed; not yet prepared by the accelerator
    loader: BatchSource
    batches_per_epoch: int  # the loader's, for a budget given in epochs
    tokens_per_step: int
    sequence: int  # tokens in one row: the FLOPs per token are counted at this length
    objective: Callable[[Path], tuple[Objective, BatchSource]]  # once the run directory exists
    validation: Callable[[], Batches]
    announce: Callable[[Any, Path, int, Batches], None]  # main process: the prepared model, run dir, total steps
    prepare: Callable[[Any, Path], None] | None = None  # after accelerator.prepare (a reference model, a cache)
    lora_plus_ratio: float = 1.0
    fixed_shapes: bool = True  # every micro-batch one shape (packed blocks)


def train(
    cfg: Any,
    strategy: Strategy,
    tokenizer: PreTrainedTokenizerBase,
    found: Found,
    resume: str | None,
    overwrite: bool,
    parts: Parts,
) -> FitResult:
    """Train `parts` to the recipe's budget (or return the finished run's result), resuming `found.checkpoint`."""
    accelerator = strategy.accelerator
    total_steps = steps_for_budget(cfg.train, parts.batches_per_epoch, parts.tokens_per_step)
    done = finished_run(Path(cfg.out_dir), found.saved_state, total_steps)
    if done is not None:
        return done
    run_dir, config_yaml = open_run_dir(cfg, found.checkpoint, resume, overwrite, accelerator, tokenizer)
    objective, loader = parts.objective(run_dir)
    optimizer = build_optimizer(parts.model, cfg.optimizer, strategy, parts.lora_plus_ratio)
    model, optimizer = accelerator.prepare(parts.model, optimizer)
    if parts.prepare is not None:
        parts.prepare(model, run_dir)
    val_batches = parts.validation()
    resume_state: ResumeState | None = None
    if found.checkpoint is not None and found.saved_state is not None:
        resume_state = restore_state(found.checkpoint, found.saved_state, model, optimizer, loader, strategy)
    if accelerator.is_main_process:
        parts.announce(model, run_dir, total_steps, val_batches)
        if resume_state is not None:
            info(f"resuming from {found.checkpoint} at step {resume_state.step:,} of {total_steps:,}")
    job = TrainJob(
        cfg=cfg,
        run_dir=run_dir,
        accelerator=accelerator,
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        loader=loader,
        val_batches=val_batches,
        total_steps=total_steps,
        tokens_per_step=parts.tokens_per_step,
        flops_per_token=model_flops_per_token(
            accelerator.unwrap_model(model), parts.sequence, cfg.train.gradient_checkpointing
        ),
        tokenizer=tokenizer,
        config_yaml=config_yaml,
        fingerprints=found.fingerprints,
        resume=resume_state,
        fixed_shapes=parts.fixed_shapes,
        objective=objective,
    )
    return fit(job)
