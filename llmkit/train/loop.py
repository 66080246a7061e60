"""The training loop shared by every training command. Read `fit` top to bottom: that is a run.

A setup function (pretrain, and later finetune) builds a `TrainJob`; `fit` runs the optimizer steps,
validates, checkpoints and writes the final model. Nothing else hides behind callbacks.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from llmkit.atomic import atomic_directory, write_json
from llmkit.config import RunConfig
from llmkit.console import info, progress_bar
from llmkit.errors import UserError
from llmkit.losses import causal_lm_nll, count_targets
from llmkit.train.checkpoint import prune_checkpoints, save_checkpoint
from llmkit.train.metrics import MetricsLog, plot_loss
from llmkit.train.schedules import lr_at


class BatchSource(Protocol):
    def next_batch(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    @property
    def epochs_done(self) -> float: ...


@dataclass
class TrainJob:
    """Everything `fit` needs; built by a command's setup function."""

    cfg: RunConfig
    run_dir: Path
    accelerator: Any
    model: Any  # prepared by the accelerator (may be wrapped)
    optimizer: Any
    loader: BatchSource
    val_batches: list[dict[str, torch.Tensor]]
    total_steps: int
    tokens_per_step: int
    tokenizer: Any
    fingerprints: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitResult:
    steps: int
    tokens: int
    seconds: float
    train_loss: float
    val_loss: float | None
    best_val_loss: float | None
    stopped_early: bool
    final_dir: Path

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class _EarlyStopping:
    patience: int | None
    min_delta: float
    best: float = math.inf
    bad_evals: int = 0

    def should_stop(self, val_loss: float) -> bool:
        if val_loss < self.best - self.min_delta:
            self.best, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience


def fit(job: TrainJob) -> FitResult:
    cfg, acc, model, optimizer = job.cfg, job.accelerator, job.model, job.optimizer
    train_cfg = cfg.train
    metrics = MetricsLog(job.run_dir, cfg.logging.tensorboard, enabled=acc.is_main_process)
    stopping = _EarlyStopping(train_cfg.early_stopping_patience, train_cfg.early_stopping_min_delta)
    step, tokens = 0, 0
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    loss_value, val_loss, stopped_early = math.nan, None, False
    start = time.perf_counter()
    model.train()

    with progress_bar("training", job.total_steps, unit="steps") as update:
        while step < job.total_steps:
            lr = lr_at(step, job.total_steps, cfg.optimizer.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # One optimizer step: the micro-batches are fetched first so the loss can be normalized by the
            # number of target tokens in the whole step (exact under accumulation and across processes).
            micro_batches = [job.loader.next_batch() for _ in range(train_cfg.grad_accum_steps)]
            step_targets = _global_sum(acc, sum(count_targets(b["labels"]) for b in micro_batches))
            step_loss = torch.zeros((), device=acc.device)
            for i, batch in enumerate(micro_batches):
                batch = {key: value.to(acc.device, non_blocking=True) for key, value in batch.items()}
                last = i == len(micro_batches) - 1
                with nullcontext() if last or acc.num_processes == 1 else acc.no_sync(model):
                    logits = model(**_model_inputs(batch)).logits
                    nll_sum, _ = causal_lm_nll(logits, batch["labels"])
                    loss = nll_sum * acc.num_processes / step_targets
                    acc.backward(loss)
                step_loss += loss.detach() / acc.num_processes

            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip or math.inf)
            loss_value = float(acc.reduce(step_loss, reduction="sum"))
            if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
                raise UserError(
                    f"step {step + 1}: non-finite loss ({loss_value}) or gradient norm ({float(grad_norm)}); "
                    "weights are those of the previous step. Lower optimizer.lr or check the data"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += job.tokens_per_step
            window_loss += loss_value
            window_tokens += job.tokens_per_step

            if step % cfg.logging.every_steps == 0 or step == job.total_steps:
                elapsed = time.perf_counter() - window_start
                steps_in_window = window_tokens // job.tokens_per_step
                metrics.log(
                    {
                        "step": step,
                        "tokens": tokens,
                        "loss": window_loss / steps_in_window,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": window_tokens / elapsed,
                        "epoch": job.loader.epochs_done,
                        "elapsed_s": time.perf_counter() - start,
                    }
                )
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()

            if job.val_batches and (step % train_cfg.eval_every == 0 or step == job.total_steps):
                val_loss = evaluate_loss(model, job.val_batches, acc)
                metrics.log({"step": step, "tokens": tokens, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
                stopped_early = stopping.should_stop(val_loss) and step < job.total_steps

            every = cfg.checkpoint.every_steps
            if (every and step % every == 0) or step == job.total_steps or stopped_early:
                _checkpoint(job, step, tokens, stopping)

            rate = tokens / (time.perf_counter() - start)
            val_text = f" val {val_loss:.3f}" if val_loss is not None else ""
            update(1, f"loss {loss_value:.3f}{val_text} lr {lr:.1e} {rate:,.0f} tok/s")
            if stopped_early:
                info(f"early stopping at step {step}: no validation improvement in {stopping.patience} evaluations")
                break

    seconds = time.perf_counter() - start
    final_dir = save_final_model(job)
    metrics.close()
    if acc.is_main_process and cfg.logging.plot:
        plot_loss(metrics.path, job.run_dir / "loss.png")
    result = FitResult(
        steps=step,
        tokens=tokens,
        seconds=seconds,
        train_loss=loss_value,
        val_loss=val_loss,
        best_val_loss=stopping.best if math.isfinite(stopping.best) else None,
        stopped_early=stopped_early,
        final_dir=final_dir,
    )
    if acc.is_main_process:
        write_json(
            job.run_dir / "summary.json",
            {**result.__dict__, "final_dir": str(final_dir), "tokens_per_second": result.tokens_per_second},
        )
    return result


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes; labels stay with the loop, which computes the loss itself."""
    return {key: value for key, value in batch.items() if key != "labels"}


def _global_sum(acc: Any, value: int) -> int:
    if acc.num_processes == 1:
        return value
    return int(acc.reduce(torch.tensor(value, device=acc.device), reduction="sum"))


@torch.no_grad()
def evaluate_loss(model: Any, batches: list[dict[str, torch.Tensor]], acc: Any) -> float:
    """Mean next-token loss (nats) over fixed validation batches, across all processes."""
    model.eval()
    total = torch.zeros((), device=acc.device, dtype=torch.float64)
    count = torch.zeros((), device=acc.device, dtype=torch.float64)
    for batch in batches:
        batch = {key: value.to(acc.device) for key, value in batch.items()}
        nll_sum, targets = causal_lm_nll(model(**_model_inputs(batch)).logits, batch["labels"])
        total += nll_sum.double()
        count += targets.double()
    model.train()
    total, count = acc.reduce(total, reduction="sum"), acc.reduce(count, reduction="sum")
    return float(total / count)


def _checkpoint(job: TrainJob, step: int, tokens: int, stopping: _EarlyStopping) -> None:
    acc = job.accelerator
    state_dict = acc.get_state_dict(job.model)
    acc.wait_for_everyone()
    if acc.is_main_process:
        trainer_state = {
            "step": step,
            "tokens": tokens,
            "total_steps": job.total_steps,
            "data": job.loader.state_dict(),
            "early_stopping": {"best": stopping.best, "bad_evals": stopping.bad_evals},
            **job.fingerprints,
        }
        checkpoints = job.run_dir / "checkpoints"
        model = acc.unwrap_model(job.model)
        save_checkpoint(checkpoints, step, _with_state(model, state_dict), job.optimizer, trainer_state)
        prune_checkpoints(checkpoints, job.cfg.checkpoint.keep_last)
    acc.wait_for_everyone()


class _with_state:
    """Save a model with an explicitly gathered state dict (needed when parameters are sharded)."""

    def __init__(self, model: Any, state_dict: dict[str, torch.Tensor]) -> None:
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, path: Path, **kwargs: Any) -> None:
        self.model.save_pretrained(path, state_dict=self.state_dict, **kwargs)


def save_final_model(job: TrainJob) -> Path:
    """RUN/final: a standalone Hugging Face directory (safetensors, config, tokenizer, generation config)."""
    acc = job.accelerator
    state_dict = acc.get_state_dict(job.model)
    final_dir = job.run_dir / "final"
    if acc.is_main_process:
        model = acc.unwrap_model(job.model)
        with atomic_directory(final_dir) as staging:
            model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
            job.tokenizer.save_pretrained(staging)
    acc.wait_for_everyone()
    return final_dir
