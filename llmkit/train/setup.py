"""Builders shared by every training command: run directory, accelerator, optimizer, budget."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch

from llmkit.config import OptimizerConfig, PrecisionConfig, TrainConfig
from llmkit.errors import UserError

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "final")


def claim_run_dir(path: str | Path, overwrite: bool, accelerator: Any, restart_unsaved_run: bool = False) -> Path:
    """Create the run directory; refuse one that already holds a run unless `overwrite` is given.

    `restart_unsaved_run` (from `--resume auto`) replaces a run that never saved a checkpoint. Every process
    checks before the main process changes anything, so all of them reach the same decision.
    """
    run_dir = Path(path)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is a file; choose another --out")
    replace = False
    if run_dir.is_dir() and any(run_dir.iterdir()):
        holds_run = any((run_dir / marker).exists() for marker in RUN_MARKERS)
        if not overwrite and not (holds_run and restart_unsaved_run):
            what = "already holds a run" if holds_run else "is not empty"
            raise UserError(
                f"{run_dir}: output directory {what}; pass --overwrite to replace it or choose another --out"
            )
        replace = True
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if replace:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return run_dir


def make_accelerator(precision: PrecisionConfig, compile_model: bool = False) -> Any:
    """An Accelerator for the chosen precision; fp16 needs CUDA (it relies on a loss scaler)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if precision.dtype == "fp16" and not torch.cuda.is_available():
        raise UserError("precision.dtype=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision.dtype]
    # Accelerate keeps its settings in a process-wide singleton; a second run in the same Python process
    # (a notebook, the test suite) may ask for another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    # Without a GPU, Accelerate treats a torchrun/accelerate launch as multi-process (gloo) only when asked for CPU.
    return Accelerator(
        mixed_precision=mixed, cpu=not torch.cuda.is_available(), dynamo_backend="inductor" if compile_model else "no"
    )


def enable_gradient_checkpointing(model: Any) -> None:
    """Keep only each layer's input and recompute the rest in the backward pass (non-reentrant, LoRA-safe)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"{type(model).__name__} does not support gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def build_optimizer(model: Any, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD with weight decay on matrices only (not on norms and biases)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = True  # one fused kernel over all parameters, on CUDA and on CPU alike
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    if cfg.name == "adam":
        # Adam's weight decay is L2 added to the gradient (the classic form), unlike AdamW's decoupled decay.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def steps_for_budget(cfg: TrainConfig, batches_per_epoch: int, tokens_per_step: int) -> int:
    """Optimizer steps for the budget given in steps, tokens or epochs (default: one epoch)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.max_tokens is not None:
        return max(1, math.ceil(cfg.max_tokens / tokens_per_step))
    epochs = cfg.max_epochs if cfg.max_epochs is not None else 1.0
    return max(1, math.ceil(epochs * batches_per_epoch / cfg.grad_accum_steps))
