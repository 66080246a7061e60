"""The training loop shared by every training command. Read `fit` top to bottom: that is a run.

A setup function (pretrain, finetune) builds a `TrainJob` (llmkit.train.job); `fit` runs the optimizer steps,
validates, checkpoints and writes the final model. Nothing else hides behind callbacks.
"""

from __future__ import annotations

import errno
import json
import math
import time
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from llmkit.atomic import atomic_directory, write_json
from llmkit.console import info, progress_bar
from llmkit.errors import TrainingDiverged, UserError
from llmkit.models import save_pretrained
from llmkit.train import faults
from llmkit.train.checkpoint import (
    checkpoint_name,
    complete_checkpoints,
    prune_checkpoints,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from llmkit.train.job import NOT_ON_DEVICE, FitResult, TrainJob
from llmkit.train.loader import ReadAhead
from llmkit.train.metrics import MetricsLog, plot_loss, truncate_records
from llmkit.train.schedules import lr_at
from llmkit.train.signals import stop_signals
from llmkit.train.throughput import LogWindow, Throughput, mfu, peak_flops, peak_memory

if TYPE_CHECKING:
    from accelerate import Accelerator


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


@dataclass
class _Progress:
    """What a checkpoint records besides the weights: the last losses, the open log window, and whether early
    stopping ended the run there (such a run resumed changes nothing, whatever its budget)."""

    train_loss: float
    val_loss: float | None
    window: LogWindow
    stopped_early: bool


@dataclass
class _Outcome:
    """One optimizer step as the device left it: its loss, gradient norm and whether both were finite (tensors
    until the host reads them at the next check, or numbers where the host decided before the step)."""

    step: int
    tokens: int
    loss: torch.Tensor | float
    grad_norm: torch.Tensor | float
    finite: torch.Tensor | bool


@dataclass
class _Run:
    """The state of a run that changes every step, as `fit` carries it from one step to the next."""

    step: int
    tokens: int
    window: LogWindow
    stopping: _EarlyStopping
    loss: float = math.nan  # the last step's
    val_loss: float | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)  # the last validation's figures
    running_loss: float | None = None  # for loss-spike reports
    bad_steps: int = 0
    throughput: Throughput = field(default_factory=Throughput)
    stopped_early: bool = False
    grad_norm: float = math.nan  # the last step's
    pending: list[_Outcome] = field(default_factory=list)  # steps the host has not read yet
    clock: float = field(default_factory=time.perf_counter)  # start of the current timing window
    first_step_seconds: float | None = None  # this invocation's first step, on the host (compilation included)

    @classmethod
    def begin(cls, job: TrainJob) -> _Run:
        train_cfg, resume = job.cfg.train, job.resume
        stopping = _EarlyStopping(train_cfg.early_stopping_patience, train_cfg.early_stopping_min_delta)
        if resume is None:
            return cls(0, 0, LogWindow(), stopping)
        stopping.best, stopping.bad_evals = resume.best_val_loss, resume.bad_evals
        restore_rng_state(resume.rng)
        if job.objective.replay is not None:
            acc = job.accelerator
            job.objective.replay.load_state(
                resume.objective_states, resume.step, acc.process_index, str(resume.checkpoint)
            )
        return cls(
            resume.step, resume.tokens, LogWindow.restored(resume.window), stopping, resume.train_loss, resume.val_loss
        )


def fit(job: TrainJob) -> FitResult:
    cfg, acc = job.cfg, job.accelerator
    cuda = acc.device.type == "cuda"
    background = cuda if cfg.train.read_ahead == "auto" else cfg.train.read_ahead
    reader = ReadAhead(job.loader, cfg.train.grad_accum_steps, pin=cuda, background=background)
    job = replace(job, loader=reader)
    resume_step = job.resume.step if job.resume else None
    config = yaml.safe_load(job.config_yaml)  # secrets already removed
    metrics = MetricsLog(job.run_dir, cfg.logging, config, acc.is_main_process, resume_step)
    trace = DataTrace(job.run_dir, acc.process_index, acc.num_processes, cfg.logging.data_trace, resume_step)
    run = _Run.begin(job)
    deadline = time.monotonic() + cfg.train.max_time if cfg.train.max_time else None
    interrupted, start = None, time.perf_counter()
    job.model.train()

    bar = progress_bar("training", job.total_steps, unit="steps", enabled=acc.is_main_process, completed=run.step)
    with stop_signals() as signals, bar as update, closing(reader):
        signals.run_dir, signals.phase = job.run_dir, "training"
        update(0, _starting(job))
        while run.step < job.total_steps and not (job.resume and job.resume.stopped_early):
            lr = _train_step(job, run, trace)
            run.first_step_seconds = run.first_step_seconds or time.perf_counter() - start
            timed_out = deadline is not None and time.monotonic() >= deadline
            interrupted = _agree(acc, signals.reason or ("time limit" if timed_out else None))
            if _check_due(job, run, interrupted):
                _settle(job, run, metrics)
            _log_and_validate(job, run, metrics, lr, start)
            if _checkpoint_due(job, run, interrupted):
                _checkpoint_or_stop(job, run)
            if not run.pending:
                run.clock = time.perf_counter()  # validation and checkpoints are not training time
            update(1, _progress_text(run, lr))
            if run.stopped_early:  # every process agrees: the validation loss is reduced across all of them
                if acc.is_main_process:
                    info(
                        f"early stopping at step {run.step}: no validation improvement in "
                        f"{run.stopping.patience} evaluations"
                    )
                break
            if interrupted:
                break
        signals.phase = "stopping"  # a further signal changes nothing: the shutdown below completes
    return _finish(job, run, metrics, interrupted, time.perf_counter() - start)


def _train_step(job: TrainJob, run: _Run, trace: DataTrace) -> float:
    """One optimizer step, or a skipped one when the loss or gradient norm is not finite; returns its learning rate.

    With fused AdamW (the default) the check runs on the device: the optimizer skips a non-finite step itself
    (`found_inf`), so nothing waits for the device here and the host reads the step's numbers at the next check.
    DeepSpeed, fp16 loss scaling and the other optimizers are checked on the host before their step.
    """
    cfg, acc, optimizer = job.cfg, job.accelerator, job.optimizer
    lr = lr_at(run.step, job.total_steps, cfg.optimizer.lr, cfg.schedule)
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # torchao's 8-bit AdamW keeps it as a tensor (no recompiles)
            group["lr"].fill_(lr * group.get("lr_scale", 1.0))
        else:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    objective = job.objective
    micro_batches = _step_batches(job, run.step + 1, trace)
    step_targets, step_tokens = _global_sums(
        acc, sum(objective.count_targets(b) for b in micro_batches), sum(real_tokens(b) for b in micro_batches)
    )
    micro_batches = [_on_device(batch, acc.device) for batch in micro_batches]
    step_loss = torch.zeros((), device=acc.device)
    for i, batch in enumerate(micro_batches):
        step_loss += _forward_backward(job, batch, step_targets, last=i == len(micro_batches) - 1)
        faults.maybe_kill("step", run.step + 1, i)

    loss = acc.reduce(step_loss, reduction="sum")
    if faults.poisoned(run.step + 1):
        loss = loss * math.nan
    if job.strategy.steps_itself:
        finite = math.isfinite(float(loss))
        norm = job.strategy.engine_step(job.model, finite)
        outcome = _Outcome(run.step + 1, step_tokens, float(loss), norm, finite)
    else:
        grad_norm = acc.clip_grad_norm_(job.model.parameters(), cfg.optimizer.grad_clip or math.inf)
        if _checks_on_device(job):
            finite_t = torch.isfinite(loss) & torch.isfinite(grad_norm)
            _inner(optimizer).found_inf = (~finite_t).float()  # fused AdamW leaves weights and state untouched
            optimizer.step()
            outcome = _Outcome(run.step + 1, step_tokens, loss.detach(), grad_norm.detach(), finite_t)
        else:
            value, norm = float(loss), float(grad_norm)
            finite = math.isfinite(value) and math.isfinite(norm)
            if finite:
                optimizer.step()
            outcome = _Outcome(run.step + 1, step_tokens, value, norm, finite)
    optimizer.zero_grad(set_to_none=True)
    run.pending.append(outcome)
    run.step += 1
    run.tokens += step_tokens
    return lr


def _step_batches(job: TrainJob, step: int, trace: DataTrace) -> list[dict[str, torch.Tensor]]:
    """The step's micro-batches, all fetched first so the loss can be normalized by the number of target tokens in
    the whole step (exact under accumulation and across processes), then rewritten by the objective (GRPO's
    answers); or the ones an earlier step made, for a step that learns from them again."""
    objective = job.objective
    replayed = objective.replay.replayed(step) if objective.replay is not None else None
    if replayed is not None:
        return replayed
    micro_batches = [job.loader.next_batch() for _ in range(job.cfg.train.grad_accum_steps)]
    trace.record(step, micro_batches)
    if objective.rewrite is not None:
        micro_batches = [objective.rewrite(job.model, batch, step, i) for i, batch in enumerate(micro_batches)]
    return micro_batches


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps the torch optimizer


def _checks_on_device(job: TrainJob) -> bool:
    """Whether the optimizer can skip a non-finite step on the device: fused Adam/AdamW, no fp16 loss scaler (which
    sets found_inf itself), a plain strategy."""
    fused = bool(getattr(_inner(job.optimizer), "defaults", {}).get("fused"))
    return fused and job.accelerator.scaler is None and job.strategy.plain


def _check_due(job: TrainJob, run: _Run, interrupted: str | None) -> bool:
    """Whether the host reads the pending steps now: after every step it checked itself, else where something
    needs their numbers (a log line, validation, a checkpoint, the end)."""
    if not run.pending:
        return False
    if not isinstance(run.pending[-1].finite, torch.Tensor):
        return True
    cfg, step = job.cfg, run.step
    validating = bool(job.val_batches) and step % cfg.train.eval_every == 0
    return step % cfg.logging.every_steps == 0 or validating or _checkpoint_due(job, run, interrupted)


def _settle(job: TrainJob, run: _Run, metrics: MetricsLog) -> None:
    """Read the pending steps (one synchronization) and account for them in order: loss spikes, the logging window,
    skipped steps, and the stop when more steps were not finite than train.max_bad_steps allows."""
    outcomes, run.pending = run.pending, []
    run.throughput.add(sum(o.tokens for o in outcomes), time.perf_counter() - run.clock, len(outcomes))
    if isinstance(outcomes[0].finite, torch.Tensor):
        rows = torch.stack(
            [
                torch.stack([o.loss.float(), o.grad_norm.float(), o.finite.float()])  # type: ignore[union-attr]
                for o in outcomes
            ]
        ).tolist()
    else:
        rows = [[float(o.loss), float(o.grad_norm), float(o.finite)] for o in outcomes]
    tokens = run.tokens - sum(o.tokens for o in outcomes)  # before the first of them
    for index, (outcome, (loss, norm, finite)) in enumerate(zip(outcomes, rows, strict=True)):
        if finite:
            if job.objective.reports_spikes:
                run.running_loss = _report_spike(job.cfg.train, metrics, outcome.step, tokens, loss, run.running_loss)
            run.window.add(loss, outcome.tokens)
        else:
            run.bad_steps += 1
            _skip_or_stop(job, run, outcome, loss, norm, newest=index == len(outcomes) - 1)
            metrics.log({"step": outcome.step, "tokens": tokens, "skipped_step": 1})
            run.window.add(None, outcome.tokens)
        run.loss, run.grad_norm, tokens = loss, norm, tokens + outcome.tokens


def _starting(job: TrainJob) -> str:
    """The bar's text before the first step. A compiled step's first call compiles it (over a minute for a 1B
    model on a GPU; seconds for shapes compiled before, from torch's cache on disk): that is said first."""
    if job.micro_step.compiled is None:
        return "resuming" if job.resume else ""
    if job.accelerator.is_main_process:
        info("torch.compile: the first step compiles the training step (over a minute for a 1B model on a GPU; "
             "seconds when the same shapes were compiled before, from the cache on disk)")  # fmt: skip
    return "compiling the step"


def _progress_text(run: _Run, lr: float) -> str:
    if not run.throughput.recent:  # no step read back from the device yet: that happens on logging steps
        return f"lr {lr:.1e}"
    val_text = f" val {run.val_loss:.3f}" if run.val_loss is not None else ""
    return f"loss {run.loss:.3f}{val_text} lr {lr:.1e} {run.throughput.recent_rate:,.0f} tok/s"


def _log_and_validate(job: TrainJob, run: _Run, metrics: MetricsLog, lr: float, start: float) -> None:
    """Close the logging window on a logging step; validate (and decide early stopping) on a validation step."""
    cfg, step = job.cfg, run.step
    last = step == job.total_steps
    if (step % cfg.logging.every_steps == 0 or last) and run.window.steps:
        metrics.log(_window_record(job, run.window, step, run.tokens, lr, run.grad_norm, start))
        run.window = LogWindow()
    if job.val_batches and (step % cfg.train.eval_every == 0 or last):
        evaluation = job.objective.evaluation()(job.model, job.val_batches, job.accelerator)
        run.val_loss, run.evaluation = float(evaluation["val_loss"]), evaluation
        metrics.log({"step": step, "tokens": run.tokens, **evaluation})
        run.stopped_early = run.stopping.should_stop(run.val_loss) and not last


def _checkpoint_due(job: TrainJob, run: _Run, interrupted: str | None) -> bool:
    every = job.cfg.checkpoint.every_steps
    periodic = every is not None and run.step % every == 0
    return periodic or run.step == job.total_steps or run.stopped_early or interrupted is not None


def _checkpoint_or_stop(job: TrainJob, run: _Run) -> None:
    progress = _Progress(run.loss, run.val_loss, run.window, run.stopped_early)
    if _checkpoint(job, run.step, run.tokens, run.stopping, progress) is None:
        raise TrainingDiverged(
            f"step {run.step}: the weights are not finite after the optimizer step, so no checkpoint was saved "
            f"({_newest(job)}); lower optimizer.lr and start again from that checkpoint"
        )


def _finish(job: TrainJob, run: _Run, metrics: MetricsLog, interrupted: str | None, seconds: float) -> FitResult:
    """The final model (unless interrupted), the loss plot and summary.json."""
    acc, resume = job.accelerator, job.resume
    first_step = (resume.step if resume else 0) + 1  # of this invocation
    checkpoint = job.run_dir / "checkpoints" / checkpoint_name(run.step)
    final_dir = None if interrupted else save_final_model(job)
    result = FitResult(
        steps=run.step,
        tokens=run.tokens,
        seconds=seconds,
        train_loss=run.loss,
        val_loss=run.val_loss,
        best_val_loss=run.stopping.best if math.isfinite(run.stopping.best) else None,
        stopped_early=run.stopped_early or bool(resume and resume.stopped_early),
        final_dir=final_dir,
        interrupted=interrupted,
        checkpoint=checkpoint if checkpoint.exists() else None,
        main_process=acc.is_main_process,
        run_tokens=run.tokens - (resume.tokens if resume else 0),
        steady_tokens_per_second=run.throughput.steady_rate,
        steady_from_step=first_step - 1 + run.throughput.steady_from if run.throughput.steady_from else None,
        first_step_seconds=run.first_step_seconds,
        compiled=job.micro_step.compiled is not None,
        memory=peak_memory(acc.device),
        evaluation=run.evaluation,
    )
    peak = peak_flops(acc)
    if peak and job.flops_per_token and result.steady_tokens_per_second:
        result.mfu = mfu(result.steady_tokens_per_second, job.flops_per_token, peak, acc.num_processes)
    if acc.is_main_process:
        summary = {key: str(value) if isinstance(value, Path) else value for key, value in result.__dict__.items()}
        for internal in ("main_process", "already_finished"):
            summary.pop(internal)
        summary["tokens_per_second"] = result.tokens_per_second
        summary["flops_per_token"] = job.flops_per_token
        write_json(job.run_dir / "summary.json", summary)
        metrics.close(summary)
        if job.cfg.logging.plot:
            plot_loss(metrics.path, job.run_dir / "loss.png")
    else:
        metrics.close()
    return result


def _forward_backward(job: TrainJob, batch: dict[str, torch.Tensor], step_targets: int, last: bool) -> torch.Tensor:
    """One micro-batch: forward, the loss normalized by the whole step's targets, backward; returns the loss."""
    acc, model = job.accelerator, job.model
    batch = {key: value.to(acc.device, non_blocking=True) for key, value in batch.items() if key not in NOT_ON_DEVICE}
    with job.strategy.accumulating(model, last):
        nll_sum, _ = job.micro_step(model, batch)
        loss = nll_sum * acc.num_processes / step_targets
        job.strategy.backward(model, loss, last)
    return loss.detach() / acc.num_processes


def _on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A micro-batch on a CUDA device, copied from pinned memory without blocking: all of a step's copies are queued
    at once and overlap the compute of its earlier micro-batches. (ReadAhead pinned them on its thread already;
    pinning a pinned tensor returns it as it is.)"""
    if device.type != "cuda":
        return batch
    return {
        key: value if key in NOT_ON_DEVICE else value.pin_memory().to(device, non_blocking=True)
        for key, value in batch.items()
    }


def _report_spike(
    train_cfg: Any, metrics: MetricsLog, step: int, tokens: int, loss: float, running: float | None
) -> float:
    """Report step `step`'s loss when far above the running mean; returns the updated running mean."""
    factor = train_cfg.loss_spike_factor
    if factor and running and loss > factor * running:
        info(f"loss spike at step {step}: {loss:.4f} vs running mean {running:.4f}")
        metrics.log({"step": step, "tokens": tokens, "loss_spike": loss})
    return loss if running is None else 0.9 * running + 0.1 * loss


def _skip_or_stop(job: TrainJob, run: _Run, outcome: _Outcome, loss: float, grad_norm: float, newest: bool) -> None:
    """A non-finite loss or gradient: skip the step while train.max_bad_steps allows, else stop with exit 3.

    The step was never applied. When it is the newest step the weights are those of the step before it; when a later
    check found it (the device skipped it and went on), they are those of the current step. Either way they are
    saved (when finite and not saved yet) so nothing is lost.
    """
    problem = f"step {outcome.step}: non-finite loss ({loss}) or gradient norm ({grad_norm})"
    allowed = job.cfg.train.max_bad_steps
    if run.bad_steps <= allowed and not job.strategy.steps_itself:
        info(f"{problem}: skipped ({run.bad_steps} of {allowed} allowed)")
        return
    if newest:
        state_step, tokens = outcome.step - 1, run.tokens - outcome.tokens
        where = f"stopped before the optimizer step: the weights are those of step {state_step}"
    else:
        state_step, tokens = run.step, run.tokens
        where = f"the optimizer skipped it; found at step {state_step}, whose weights are kept"
    saved: Path | None = job.run_dir / "checkpoints" / checkpoint_name(state_step)
    if saved is not None and not saved.exists():
        saved = _checkpoint(job, state_step, tokens, run.stopping, _Progress(math.nan, None, run.window, False))
    if saved is None:
        kept = f"they are not finite either (an earlier step made them so), so nothing was saved; {_newest(job)}"
    else:
        kept = f"saved as {saved}"
    advice = (
        "DeepSpeed holds the step's gradients in its own buffers, so it cannot skip a step"
        if job.strategy.steps_itself
        else "allow skips with train.max_bad_steps"
    )
    raise TrainingDiverged(f"{problem}; {where}; {kept}. Lower optimizer.lr, check the data, or {advice}")


def _newest(job: TrainJob) -> str:
    found = complete_checkpoints(job.run_dir / "checkpoints")
    return f"the newest checkpoint is {found[-1]}" if found else "the run has no checkpoint"


def _window_record(
    job: TrainJob, window: LogWindow, step: int, tokens: int, lr: float, grad_norm: float, start: float
) -> dict[str, Any]:
    """The metrics line of a logging window."""
    now = time.perf_counter()
    record = {
        "step": step,
        "tokens": tokens,
        "loss": window.loss / window.steps,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": window.tokens / (now - window.start),  # global: every process's tokens, each counted once
        "epoch": job.loader.position.epochs_done,
        "elapsed_s": now - start,
    }
    balance = job.micro_step.router.take() if job.micro_step.router is not None else None
    if balance is not None:  # a mixture of experts: its load-balancing loss (unscaled; `loss` holds it scaled)
        record["router_aux_loss"] = balance
    if job.objective.metrics is not None:
        record.update(job.objective.metrics())
    peak = peak_flops(job.accelerator) if job.flops_per_token else None
    if peak:
        record["mfu"] = mfu(record["tokens_per_s"], job.flops_per_token, peak, job.accelerator.num_processes)
    if job.accelerator.device.type == "cuda":
        record.update(peak_memory(job.accelerator.device))
    return record


def _agree(acc: Accelerator, reason: str | None) -> str | None:
    """Every process stops at the same step: if any one was asked to stop, all stop."""
    if acc.num_processes == 1:
        return reason
    flags = torch.tensor([reason not in (None, "time limit"), reason == "time limit"], device=acc.device).float()
    signalled, timed_out = acc.reduce(flags, reduction="sum").tolist()
    if reason is not None:
        return reason
    return "signal on another process" if signalled else ("time limit" if timed_out else None)


class DataTrace:
    """RUN/data_trace.jsonl: which blocks every micro-batch of every step used (one file per process).

    On resume every file is cut back to the checkpoint's step; the main process also cuts the files of ranks
    that no longer exist (a run resumed on fewer processes), so the trace never shows steps that were redone.
    """

    def __init__(self, run_dir: Path, rank: int, world: int, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = run_dir / self.file_name(rank, world)
        if enabled and resume_step is not None:
            truncate_records(self.path, resume_step)
            if rank == 0:
                owned = {self.file_name(r, world) for r in range(world)}
                for other in run_dir.glob("data_trace*.jsonl"):
                    if other.name not in owned:
                        truncate_records(other, resume_step)

    @staticmethod
    def file_name(rank: int, world: int) -> str:
        return "data_trace.jsonl" if world == 1 else f"data_trace-rank{rank}.jsonl"

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


def _global_sums(acc: Accelerator, *values: int) -> list[int]:
    """Sums over all processes, in one collective."""
    if acc.num_processes == 1:
        return list(values)
    summed = acc.reduce(torch.tensor(values, device=acc.device, dtype=torch.float64), reduction="sum")
    return [int(v) for v in summed.tolist()]


def _checkpoint(job: TrainJob, step: int, tokens: int, stopping: _EarlyStopping, progress: _Progress) -> Path | None:
    """Save a checkpoint of the state after `step` optimizer steps (every process takes part).

    Returns None, saving nothing, when the weights are not finite: a checkpoint is only ever a state to go on from.
    """
    from accelerate.utils import gather_object

    acc = job.accelerator
    state_dict = acc.get_state_dict(job.model)
    if not _all_finite(acc, state_dict):
        return None
    rng_states = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
    replay = job.objective.replay
    objective_states = None
    if replay is not None:
        objective_states = [replay.state_dict(step)]
        objective_states = gather_object(objective_states) if acc.num_processes > 1 else objective_states
    checkpoints = job.run_dir / "checkpoints"
    staging, optimizer = job.strategy.optimizer_to_save(job.model, job.optimizer, checkpoints, step)
    acc.wait_for_everyone()
    if acc.is_main_process:
        trainer_state = {
            "step": step,
            "tokens": tokens,
            "total_steps": job.total_steps,
            "stopped_early": progress.stopped_early,
            "data": job.loader.position.state_dict(),
            "early_stopping": {"best": stopping.best, "bad_evals": stopping.bad_evals},
            "log_window": progress.window.state_dict(),
            "train_loss": progress.train_loss,
            "val_loss": progress.val_loss,
            "num_processes": acc.num_processes,
            "strategy": job.strategy.name,
            **job.fingerprints,
        }
        model = _WithState(acc.unwrap_model(job.model), state_dict)
        try:
            save_checkpoint(
                checkpoints,
                step,
                model,
                optimizer,
                trainer_state,
                rng_states,
                job.config_yaml,
                acc.scaler,
                staging,
                objective_states,
            )
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UserError(
                f"{checkpoints}: no space left on device while saving {checkpoint_name(step)}; nothing of it was "
                f"kept and {_newest(job)}, intact; free space and continue with --resume auto"
            ) from None
        prune_checkpoints(checkpoints, job.cfg.checkpoint.keep_last)
    acc.wait_for_everyone()
    return checkpoints / checkpoint_name(step)


def _all_finite(acc: Accelerator, state_dict: dict[str, torch.Tensor] | None) -> bool:
    """Whether every floating-point weight is finite, agreed by all processes (under ZeRO-3 only the main process
    holds the gathered state dict; the others hold None)."""
    tensors = (state_dict or {}).values()
    bad = any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors)
    if acc.num_processes > 1:
        bad = bool(acc.reduce(torch.tensor([float(bad)], device=acc.device), reduction="sum").item())
    return not bad


class _WithState:
    """Save a model with an explicitly gathered state dict (needed when parameters are sharded)."""

    def __init__(self, model: Any, state_dict: dict[str, torch.Tensor]) -> None:
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, path: Path, **kwargs: Any) -> None:
        save_pretrained(self.model, path, state_dict=self.state_dict, **kwargs)


def save_final_model(job: TrainJob) -> Path:
    """RUN/final: a standalone Hugging Face directory (safetensors, config, tokenizer, generation config)."""
    acc = job.accelerator
    state_dict = acc.get_state_dict(job.model)
    final_dir = job.run_dir / "final"
    if acc.is_main_process:
        model = acc.unwrap_model(job.model)
        with atomic_directory(final_dir) as staging:
            save_pretrained(model, staging, state_dict=state_dict, safe_serialization=True)
            job.tokenizer.save_pretrained(staging)
            if getattr(model, "peft_config", None) and getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(staging)  # adapters do not save it themselves
    acc.wait_for_everyone()
    return final_dir
