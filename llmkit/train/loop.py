"""The training loop shared by every training command. Read `fit` top to bottom: that is a run.

A setup function (pretrain, and later finetune) builds a `TrainJob`; `fit` runs the optimizer steps,
validates, checkpoints and writes the final model. Nothing else hides behind callbacks.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from llmkit.atomic import atomic_directory, write_json
from llmkit.config import RunConfig
from llmkit.console import info, progress_bar
from llmkit.errors import TrainingDiverged
from llmkit.losses import causal_lm_nll, count_targets
from llmkit.train import faults
from llmkit.train.checkpoint import (
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    checkpoint_name,
    prune_checkpoints,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    shared_staging,
)
from llmkit.train.loader import LoaderPosition
from llmkit.train.metrics import MetricsLog, plot_loss, truncate_records
from llmkit.train.schedules import lr_at
from llmkit.train.setup import uses_deepspeed, uses_fsdp


class BatchSource(Protocol):
    """A loader: the next micro-batch, and a position that checkpoints save and resume restores."""

    position: LoaderPosition

    def next_batch(self) -> dict[str, torch.Tensor]: ...


@dataclass
class ResumeState:
    """Where a resumed run continues: read from a checkpoint by the setup function."""

    checkpoint: Path
    step: int
    tokens: int
    best_val_loss: float
    bad_evals: int
    rng: dict[str, Any]  # this process's RNG states at the checkpoint


LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
EvalFn = Callable[[Any, list[dict[str, torch.Tensor]], Any], dict[str, Any]]


def next_token_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The language-modelling objective: (sum of next-token losses, target tokens)."""
    return causal_lm_nll(logits, batch["labels"])


def next_token_targets(batch: dict[str, torch.Tensor]) -> int:
    return count_targets(batch["labels"])


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
    config_yaml: str
    fingerprints: dict[str, Any] = field(default_factory=dict)
    resume: ResumeState | None = None
    # The objective: language modelling unless a command supplies another (classification does).
    loss_fn: LossFn = next_token_loss
    count_targets: Callable[[dict[str, torch.Tensor]], int] = next_token_targets
    eval_fn: EvalFn | None = None
    flops_per_token: float = 0.0  # training FLOPs per token (6N + attention): MFU is reported on known GPUs


@dataclass
class FitResult:
    steps: int
    tokens: int
    seconds: float
    train_loss: float
    val_loss: float | None
    best_val_loss: float | None
    stopped_early: bool
    final_dir: Path | None
    interrupted: str | None = None  # "SIGTERM", "SIGUSR1" or "time limit": a checkpoint was saved, resume it
    checkpoint: Path | None = None
    main_process: bool = True
    mfu: float | None = None  # over the whole run, on GPUs whose peak is known

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


class _StopSignals:
    """SIGTERM or SIGUSR1 asks the run to stop after the current step; a second signal changes nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.reason is None:
            self.reason = name
            print(f"{name} received: finishing this step, then saving a checkpoint", file=sys.stderr, flush=True)
        else:
            print(f"{name} received: already stopping", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def fit(job: TrainJob) -> FitResult:
    cfg, acc, model, optimizer = job.cfg, job.accelerator, job.model, job.optimizer
    train_cfg = cfg.train
    resume = job.resume
    step, tokens = (resume.step, resume.tokens) if resume else (0, 0)
    metrics = MetricsLog(
        job.run_dir, cfg.logging.tensorboard, enabled=acc.is_main_process, resume_step=step if resume else None
    )
    trace = DataTrace(
        job.run_dir, acc.process_index, acc.num_processes, cfg.logging.data_trace, step if resume else None
    )
    stopping = _EarlyStopping(train_cfg.early_stopping_patience, train_cfg.early_stopping_min_delta)
    if resume:
        stopping.best, stopping.bad_evals = resume.best_val_loss, resume.bad_evals
        restore_rng_state(resume.rng)
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    loss_value, val_loss, stopped_early, interrupted = math.nan, None, False, None
    running_loss: float | None = None
    bad_steps, last_saved = 0, resume.step if resume else -1
    deepspeed = uses_deepspeed(acc)
    peak = _peak_flops(acc) if job.flops_per_token else None
    start = time.perf_counter()
    deadline = time.monotonic() + train_cfg.max_time if train_cfg.max_time else None
    model.train()

    bar = progress_bar("training", job.total_steps, unit="steps", enabled=acc.is_main_process)
    with _StopSignals() as signals, bar as update:
        update(step, "resuming" if resume else "")
        while step < job.total_steps:
            lr = lr_at(step, job.total_steps, cfg.optimizer.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # One optimizer step: the micro-batches are fetched first so the loss can be normalized by the
            # number of target tokens in the whole step (exact under accumulation and across processes).
            micro_batches = [job.loader.next_batch() for _ in range(train_cfg.grad_accum_steps)]
            trace.record(step + 1, micro_batches)
            step_targets, step_tokens = _global_sums(
                acc, sum(job.count_targets(b) for b in micro_batches), sum(real_tokens(b) for b in micro_batches)
            )
            step_loss = torch.zeros((), device=acc.device)
            for i, batch in enumerate(micro_batches):
                batch = {
                    key: value.to(acc.device, non_blocking=True)
                    for key, value in batch.items()
                    if key not in NOT_ON_DEVICE
                }
                last = i == len(micro_batches) - 1
                if deepspeed:  # DeepSpeed reduces the gradients itself at the boundary of the step
                    logits = model(**_model_inputs(batch)).logits
                    nll_sum, _ = job.loss_fn(logits, batch)
                    loss = nll_sum * acc.num_processes / step_targets
                    model.set_gradient_accumulation_boundary(last)
                    model.backward(loss, scale_wrt_gas=False)  # the loss is already normalized for the step
                else:
                    with nullcontext() if last or acc.num_processes == 1 else acc.no_sync(model):
                        logits = model(**_model_inputs(batch)).logits
                        nll_sum, _ = job.loss_fn(logits, batch)
                        loss = nll_sum * acc.num_processes / step_targets
                        acc.backward(loss)
                step_loss += loss.detach() / acc.num_processes
                faults.maybe_kill("step", step + 1, i)

            # DeepSpeed clips inside its step and reports the norm after it.
            clip = cfg.optimizer.grad_clip or math.inf
            grad_norm = math.nan if deepspeed else float(acc.clip_grad_norm_(model.parameters(), clip))
            loss_value = float(acc.reduce(step_loss, reduction="sum"))
            finite = math.isfinite(loss_value) and (deepspeed or math.isfinite(grad_norm))
            if not finite:
                bad_steps += 1
                problem = f"step {step + 1}: non-finite loss ({loss_value}) or gradient norm ({grad_norm})"
                if bad_steps > train_cfg.max_bad_steps or deepspeed:
                    saved = _checkpoint(job, step, tokens, stopping) if last_saved != step else None
                    where = f"; saved as {saved}" if saved else ""
                    advice = (
                        "DeepSpeed holds the step's gradients in its own buffers, so it cannot skip a step"
                        if deepspeed
                        else "allow skips with train.max_bad_steps"
                    )
                    raise TrainingDiverged(
                        f"{problem}; stopped before the optimizer step: the weights are those of step {step}{where}. "
                        f"Lower optimizer.lr, check the data, or {advice}"
                    )
                info(f"{problem}: skipped ({bad_steps} of {train_cfg.max_bad_steps} allowed)")
                metrics.log({"step": step + 1, "tokens": tokens, "skipped_step": 1})
            else:
                if (
                    train_cfg.loss_spike_factor
                    and running_loss
                    and loss_value > train_cfg.loss_spike_factor * running_loss
                ):
                    info(f"loss spike at step {step + 1}: {loss_value:.4f} vs running mean {running_loss:.4f}")
                    metrics.log({"step": step + 1, "tokens": tokens, "loss_spike": loss_value})
                running_loss = loss_value if running_loss is None else 0.9 * running_loss + 0.1 * loss_value
                if deepspeed:
                    model.step()  # clip, optimizer step (skipped by DeepSpeed on an fp16 overflow), zero the gradients
                    grad_norm = float(model.get_global_grad_norm() or 0.0)
                else:
                    optimizer.step()
                window_loss += loss_value
                window_steps += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            window_tokens += step_tokens

            if (step % cfg.logging.every_steps == 0 or step == job.total_steps) and window_steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step,
                    "tokens": tokens,
                    "loss": window_loss / window_steps,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": window_tokens / elapsed,  # global: every process's tokens, each counted once
                    "epoch": job.loader.position.epochs_done,
                    "elapsed_s": time.perf_counter() - start,
                }
                if peak:
                    record["mfu"] = mfu(record["tokens_per_s"], job.flops_per_token, peak, acc.num_processes)
                metrics.log(record)
                window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()

            if job.val_batches and (step % train_cfg.eval_every == 0 or step == job.total_steps):
                evaluation = (job.eval_fn or evaluate_language_model)(model, job.val_batches, acc)
                val_loss = float(evaluation["val_loss"])
                metrics.log({"step": step, "tokens": tokens, **evaluation})
                stopped_early = stopping.should_stop(val_loss) and step < job.total_steps

            timed_out = deadline is not None and time.monotonic() >= deadline
            interrupted = _agree(acc, signals.reason or ("time limit" if timed_out else None))
            every = cfg.checkpoint.every_steps
            if (every and step % every == 0) or step == job.total_steps or stopped_early or interrupted:
                _checkpoint(job, step, tokens, stopping)
                last_saved = step

            rate = (tokens - (resume.tokens if resume else 0)) / (time.perf_counter() - start)
            val_text = f" val {val_loss:.3f}" if val_loss is not None else ""
            update(1, f"loss {loss_value:.3f}{val_text} lr {lr:.1e} {rate:,.0f} tok/s")
            if stopped_early:  # every process agrees: the validation loss is reduced across all of them
                if acc.is_main_process:
                    info(f"early stopping at step {step}: no validation improvement in {stopping.patience} evaluations")
                break
            if interrupted:
                break

    seconds = time.perf_counter() - start
    checkpoint = job.run_dir / "checkpoints" / checkpoint_name(step)
    final_dir = None if interrupted else save_final_model(job)
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
        interrupted=interrupted,
        checkpoint=checkpoint if checkpoint.exists() else None,
        main_process=acc.is_main_process,
    )
    if peak and seconds:
        run_tokens = tokens - (resume.tokens if resume else 0)
        result.mfu = mfu(run_tokens / seconds, job.flops_per_token, peak, acc.num_processes)
    if acc.is_main_process:
        summary = {key: str(value) if isinstance(value, Path) else value for key, value in result.__dict__.items()}
        summary.pop("main_process")
        summary["tokens_per_second"] = result.tokens_per_second
        summary["flops_per_token"] = job.flops_per_token
        write_json(job.run_dir / "summary.json", summary)
    return result


def mfu(tokens_per_s: float, flops_per_token: float, peak_per_device: float, devices: int) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the peak of all devices together."""
    return tokens_per_s * flops_per_token / (peak_per_device * devices)


def _peak_flops(acc: Any) -> float | None:
    from llmkit.plan import device_peak_flops

    if acc.device.type != "cuda":
        return None
    return device_peak_flops(torch.cuda.get_device_name(acc.device))


def _agree(acc: Any, reason: str | None) -> str | None:
    """Every process stops at the same step: if any one was asked to stop, all stop."""
    if acc.num_processes == 1:
        return reason
    flags = torch.tensor([reason not in (None, "time limit"), reason == "time limit"], device=acc.device).float()
    signalled, timed_out = acc.reduce(flags, reduction="sum").tolist()
    if reason is not None:
        return reason
    return "signal on another process" if signalled else ("time limit" if timed_out else None)


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
NOT_ON_DEVICE = ("sample_indices", "num_tokens")


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes; labels stay with the loop, which computes the loss itself."""
    return {key: value for key, value in batch.items() if key in MODEL_INPUTS}


class DataTrace:
    """RUN/data_trace.jsonl: which blocks every micro-batch of every step used (one file per process)."""

    def __init__(self, run_dir: Path, rank: int, world: int, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = run_dir / ("data_trace.jsonl" if world == 1 else f"data_trace-rank{rank}.jsonl")
        if enabled and resume_step is not None:
            truncate_records(self.path, resume_step)

    def record(self, step: int, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            for micro, batch in enumerate(micro_batches):
                blocks = batch["sample_indices"].tolist()
                handle.write(json.dumps({"step": step, "micro": micro, "blocks": blocks}) + "\n")


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are not padding: padded batches say so with `num_tokens`, packed blocks are all real."""
    return int(batch["num_tokens"]) if "num_tokens" in batch else batch["input_ids"].numel()


def _global_sums(acc: Any, *values: int) -> list[int]:
    """Sums over all processes, in one collective."""
    if acc.num_processes == 1:
        return list(values)
    summed = acc.reduce(torch.tensor(values, device=acc.device, dtype=torch.float64), reduction="sum")
    return [int(v) for v in summed.tolist()]


def evaluate_language_model(model: Any, batches: list[dict[str, torch.Tensor]], acc: Any) -> dict[str, Any]:
    loss = evaluate_loss(model, batches, acc)
    return {"val_loss": loss, "val_ppl": math.exp(loss)}


@torch.no_grad()
def evaluate_loss(
    model: Any, batches: list[dict[str, torch.Tensor]], acc: Any, loss_fn: LossFn = next_token_loss
) -> float:
    """Mean loss over fixed validation batches, across all processes."""
    model.eval()
    total = torch.zeros((), device=acc.device, dtype=torch.float64)
    count = torch.zeros((), device=acc.device, dtype=torch.float64)
    for batch in batches:
        batch = {key: value.to(acc.device) for key, value in batch.items() if key not in NOT_ON_DEVICE}
        nll_sum, targets = loss_fn(model(**_model_inputs(batch)).logits, batch)
        total += nll_sum.double()
        count += targets.double()
    model.train()
    total, count = acc.reduce(total, reduction="sum"), acc.reduce(count, reduction="sum")
    return float(total / count)


def _checkpoint(job: TrainJob, step: int, tokens: int, stopping: _EarlyStopping) -> Path:
    """Save a checkpoint of the state after `step` optimizer steps (every process takes part)."""
    from accelerate.utils import gather_object

    acc = job.accelerator
    state_dict = acc.get_state_dict(job.model)
    rng_states = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
    checkpoints = job.run_dir / "checkpoints"
    staging, optimizer = None, job.optimizer
    if uses_deepspeed(acc):  # every process writes its own optimizer shard into one shared staging directory
        staging, optimizer = shared_staging(checkpoints, step), None
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        job.model.save_checkpoint(str(staging / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
    elif uses_fsdp(acc):  # gather the sharded optimizer states into one whole state dict (a collective)
        optimizer = _Saved(full_optimizer_state(job.model, job.optimizer))
    acc.wait_for_everyone()
    if acc.is_main_process:
        trainer_state = {
            "step": step,
            "tokens": tokens,
            "total_steps": job.total_steps,
            "data": job.loader.position.state_dict(),
            "early_stopping": {"best": stopping.best, "bad_evals": stopping.bad_evals},
            "num_processes": acc.num_processes,
            "strategy": strategy_name(acc),
            **job.fingerprints,
        }
        model = _WithState(acc.unwrap_model(job.model), state_dict)
        save_checkpoint(
            checkpoints, step, model, optimizer, trainer_state, rng_states, job.config_yaml, acc.scaler, staging
        )
        prune_checkpoints(checkpoints, job.cfg.checkpoint.keep_last)
    acc.wait_for_everyone()
    return checkpoints / checkpoint_name(step)


def strategy_name(acc: Any) -> str:
    """What wrote the optimizer state: "ddp" or "fsdp" (one optimizer.pt) or "zeroN" (DeepSpeed shards)."""
    if uses_fsdp(acc):
        return "fsdp"
    if not uses_deepspeed(acc):
        return "ddp"
    return f"zero{acc.state.deepspeed_plugin.zero_stage}"


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """FSDP's optimizer states gathered whole, keyed by parameter name, on the CPU (every process calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return dict(get_optimizer_state_dict(model, optimizer.optimizer, options=options))


class _Saved:
    """An optimizer state dict computed beforehand, saved like an optimizer."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


class _WithState:
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
            if getattr(model, "peft_config", None) and getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(staging)  # adapters do not save it themselves
    acc.wait_for_everyone()
    return final_dir
