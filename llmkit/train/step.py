"""One micro-batch's loss as a GPU runs it: the forward pass and the loss together, under autocast, compiled as one
graph when train.compile is on (the default on CUDA).

Why one function and not `torch.compile(model)`: a compiled *module* wraps the model (`_orig_mod.`), so every state
dict taken from it (checkpoints, final/, LoRA adapters) names keys no library knows; compiling a *function* that
calls the model leaves the model, its keys and its adapters as they are. And the loss belongs in the graph and under
autocast: Accelerate autocasts only the model's forward, so a loss computed after it ran the output head's matmul
and the softmax in float32, eagerly, a chunk at a time.

Evaluation, generation and the tasks' own work (reference log-probs, sampling) call the model eagerly: a compiled
graph is specialized to training (grad mode, shapes), and those run a few times per run.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from llmkit.console import info

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, torch.Tensor]]

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: Batch) -> Batch:
    """What the model's forward takes; labels stay with the loop, which computes the loss itself."""
    return {key: value for key, value in batch.items() if key in MODEL_INPUTS}


def autocast_context(accelerator: Any) -> Callable[[], AbstractContextManager[Any]]:
    """The run's autocast (bf16/fp16 mixed precision; nothing for fp32 and for DeepSpeed, which holds the model in
    its own precision), as a factory of context managers."""
    if not getattr(accelerator, "native_amp", False):
        return nullcontext
    return accelerator.autocast


class MicroStep:
    """`step(model, batch)` -> (summed loss, target count) of one micro-batch: forward and loss in one autocast
    region, and in one compiled graph when `compiled`.

    `fixed_shapes`: every micro-batch has one shape (packed pretraining blocks), so the graph is specialized to it;
    otherwise (fine-tuning rows of any length) the sequence length is marked dynamic from the first step, so new
    lengths reuse the graph instead of recompiling it. A compilation that fails (no C++ compiler, an unsupported
    op) falls back to eager once, with one line; the failed call computed nothing, so the step stays exact.
    """

    def __init__(self, loss_fn: LossFn, autocast: Callable[[], AbstractContextManager[Any]], backend: str | None,
                 fixed_shapes: bool = True) -> None:  # fmt: skip
        """`backend`: torch.compile's (train.compile_backend), or None to run eagerly."""
        self.loss_fn, self.autocast, self.fixed_shapes = loss_fn, autocast, fixed_shapes
        self.compiled = torch.compile(self.eager, backend=backend) if backend else None

    def eager(self, model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_fn(model(**model_inputs(batch)).logits, batch)

    def __call__(self, model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            if self.compiled is None:
                return self.eager(model, batch)
            if not self.fixed_shapes:
                _mark_dynamic(batch)
            try:
                return self.compiled(model, batch)
            except Exception as exc:
                if not _compile_failure(exc):
                    raise
                reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                info(f"torch.compile failed ({type(exc).__name__}: {reason}); training eagerly (--no-compile skips it)")
                self.compiled = None
                return self.eager(model, batch)


def _mark_dynamic(batch: Batch) -> None:
    """Every side of a batch's tensors is symbolic in the compiled graph (rows, lengths, the 4-D attention mask's,
    the pairs of a preference batch), but those of size 1, which stay fixed: one graph for any batch of a task."""
    for value in batch.values():
        for dim, size in enumerate(value.shape):
            if size > 1:
                torch._dynamo.maybe_mark_dynamic(value, dim)


def _compile_failure(exc: BaseException) -> bool:
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    return isinstance(exc, TorchDynamoException | InductorError)
