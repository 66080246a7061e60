"""What a training command hands to `fit` and gets back: the job (model, data, objective, budget), the state a
resumed run continues from, the result, and validation with the job's objective.

Tasks, resume and the commands import these; the loop that runs a job is llmkit.train.loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from llmkit.config import RunConfig
from llmkit.losses import causal_lm_nll, count_targets
from llmkit.train.loader import BatchSource
from llmkit.train.step import MicroStep, autocast_context, model_inputs, router_balance
from llmkit.train.strategies import Strategy, compiles

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


@dataclass
class ResumeState:
    """Where a resumed run continues: read from a checkpoint by the setup function."""

    checkpoint: Path
    step: int
    tokens: int
    best_val_loss: float
    bad_evals: int
    rng: dict[str, Any]  # this process's RNG states at the checkpoint
    window: dict[str, float] = field(default_factory=dict)  # the open logging window (LogWindow.state_dict)
    train_loss: float = math.nan  # the last step's loss and the last validation loss, for the summary
    val_loss: float | None = None
    stopped_early: bool = False  # the run ended there by early stopping: fit only writes what is missing
    objective_states: list[Any] = field(default_factory=list)  # every process's Replay state at the checkpoint


LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


EvalFn = Callable[[Any, list[dict[str, torch.Tensor]], Any], dict[str, Any]]


def next_token_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The language-modelling objective: (sum of next-token losses, target tokens)."""
    return causal_lm_nll(logits, batch["labels"])


def next_token_targets(batch: dict[str, torch.Tensor]) -> int:
    return count_targets(batch["labels"])


Batch = dict[str, torch.Tensor]
Rewrite = Callable[[Any, Batch, int, int], Batch]


class Replay(Protocol):
    """An objective whose steps may learn again from the micro-batches an earlier step made (GRPO's
    num_iterations), and what a checkpoint keeps of them on each process."""

    def replayed(self, step: int) -> list[Batch] | None: ...  # None: the step reads and rewrites new ones

    def state_dict(self, step: int) -> Any: ...  # this process's, after `step`

    def load_state(self, states: list[Any], step: int, rank: int, where: str) -> None: ...  # every process's


@dataclass(frozen=True)
class Objective:
    """What a run minimizes and how it is validated: language modelling unless a task supplies another."""

    loss_fn: LossFn = next_token_loss  # (model output, batch) -> (summed loss, its targets)
    count_targets: Callable[[Batch], int] = next_token_targets  # what the step's loss is normalized by
    eval_fn: EvalFn | None = None  # unset: validation loss and perplexity with loss_fn
    # A rewrite of a micro-batch before the step counts its targets: (model, batch, step, micro) -> batch
    # (on-policy distillation replaces answers with the student's own samples).
    rewrite: Rewrite | None = None
    # The objective's own figures for a logging window, taken (and reset) when the window closes; every process
    # calls it, so it may reduce across processes (GRPO's rewards and answer lengths).
    metrics: Callable[[], dict[str, float]] | None = None
    replay: Replay | None = None
    # Whether a step's loss far above its running mean is worth reporting: a loss bounded below by 0 (a likelihood);
    # not GRPO's surrogate, a signed quantity near 0 whose ratio to its mean says nothing.
    reports_spikes: bool = True

    def evaluation(self) -> EvalFn:
        if self.eval_fn is not None:
            return self.eval_fn
        loss_fn = self.loss_fn
        return lambda model, batches, acc: evaluate_language_model(model, batches, acc, loss_fn)


@dataclass
class TrainJob:
    """Everything `fit` needs; built by a command's setup function."""

    cfg: RunConfig
    run_dir: Path
    accelerator: Accelerator
    strategy: Strategy
    model: Any  # prepared by the accelerator (may be wrapped)
    optimizer: Any
    loader: BatchSource
    val_batches: list[dict[str, torch.Tensor]]
    total_steps: int
    tokens_per_step: int
    tokenizer: PreTrainedTokenizerBase
    config_yaml: str
    fingerprints: dict[str, Any] = field(default_factory=dict)
    resume: ResumeState | None = None
    objective: Objective = field(default_factory=Objective)
    flops_per_token: float = 0.0  # training FLOPs per token (6N + attention): MFU is reported on known GPUs
    fixed_shapes: bool = True  # every micro-batch has one shape (packed blocks); fine-tuning rows vary in length
    micro_step: MicroStep = field(init=False)  # forward and loss, under autocast, compiled when train.compile is on

    def __post_init__(self) -> None:
        autocast = autocast_context(self.accelerator)
        backend = self.cfg.train.compile_backend if compiles(self.cfg) else None
        router = router_balance(self.accelerator.unwrap_model(self.model))
        if router is not None:
            router.attach()
        self.micro_step = MicroStep(
            self.objective.loss_fn,
            autocast,
            backend,
            self.fixed_shapes,
            router,
            offload=self.cfg.train.activation_offload,
        )


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
    interrupted: str | None = None  # "SIGTERM", "SIGINT", "SIGUSR1" or "time limit": a checkpoint was saved
    checkpoint: Path | None = None
    main_process: bool = True
    mfu: float | None = None  # over the steady state, on GPUs whose peak is known
    run_tokens: int = 0  # tokens trained by this invocation (a resumed run counts from its checkpoint)
    already_finished: bool = False  # resumed a finished run: nothing was changed
    steady_tokens_per_second: float | None = None  # see Throughput; None for a run too short to have one
    steady_from_step: int | None = None
    first_step_seconds: float | None = None  # this invocation's first step on the host: compilation, when compiled
    compiled: bool = False  # the training step ran compiled to the end (train.compile)
    memory: dict[str, float] = field(default_factory=dict)  # peak memory in GiB (see peak_memory)
    evaluation: dict[str, Any] = field(default_factory=dict)  # the last validation's figures (this invocation's)

    @property
    def tokens_per_second(self) -> float:
        return self.run_tokens / self.seconds if self.seconds else 0.0


NOT_ON_DEVICE = ("sample_indices", "num_tokens")


def evaluate_language_model(
    model: Any, batches: list[dict[str, torch.Tensor]], acc: Accelerator, loss_fn: LossFn = next_token_loss
) -> dict[str, Any]:
    loss = evaluate_loss(model, batches, acc, loss_fn)
    return {"val_loss": loss, "val_ppl": math.exp(loss)}


@torch.no_grad()
def evaluate_loss(
    model: Any, batches: list[dict[str, torch.Tensor]], acc: Accelerator, loss_fn: LossFn = next_token_loss
) -> float:
    """Mean loss over fixed validation batches, across all processes."""
    model.eval()
    total = torch.zeros((), device=acc.device, dtype=torch.float64)
    count = torch.zeros((), device=acc.device, dtype=torch.float64)
    autocast = autocast_context(acc)
    for batch in batches:
        batch = {key: value.to(acc.device) for key, value in batch.items() if key not in NOT_ON_DEVICE}
        with autocast():
            nll_sum, targets = loss_fn(model(**model_inputs(batch)).logits, batch)
        total += nll_sum.double()
        count += targets.double()
    model.train()
    total, count = acc.reduce(total, reduction="sum"), acc.reduce(count, reduction="sum")
    return float(total / count)
