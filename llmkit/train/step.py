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

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from llmkit.console import info
from llmkit.errors import UserError, first_line

if TYPE_CHECKING:
    from accelerate import Accelerator

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, torch.Tensor]]

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: Batch) -> Batch:
    """What the model's forward takes; labels stay with the loop, which computes the loss itself."""
    return {key: value for key, value in batch.items() if key in MODEL_INPUTS}


def autocast_context(accelerator: Accelerator) -> Callable[[], AbstractContextManager[Any]]:
    """The run's autocast (bf16/fp16 mixed precision; nothing for fp32 and for DeepSpeed, which holds the model in
    its own precision), as a factory of context managers."""
    if not getattr(accelerator, "native_amp", False):
        return nullcontext
    return accelerator.autocast


class RouterBalance:
    """A mixture-of-experts model's load-balancing loss, added as the model's own forward adds it when given labels:
    coefficient x transformers' `load_balancing_loss_func` of the routers' logits, over real tokens only.

    The routers' logits are taken by forward hooks on the model's router modules (the ones transformers records
    as `router_logits`), not by `output_router_logits=True`: with it, the model computes the loss itself from the
    attention mask, and fine-tuning's packed rows carry a 4-D block mask that function cannot read. The mask of real
    tokens comes from the batch (`token_mask`, or a 2-D attention mask; every token of a packed pretraining block).
    """

    def __init__(
        self,
        model: Any,
        coefficient: float,
        experts: int,
        top_k: int,
        loss_func: Callable,
        router: type[torch.nn.Module],
    ):
        self.model, self.router = model, router
        self.coefficient, self.experts, self.top_k, self.loss_func = coefficient, experts, top_k, loss_func
        self.logits: list[torch.Tensor] = []
        self.total: torch.Tensor | float = 0.0  # unscaled losses since the last `take`, for the metrics
        self.count = 0

    def attach(self) -> RouterBalance:
        """Record the routers' logits from now on (once per model: training builds one of these)."""
        if self.model.config.output_router_logits:  # the model would compute the loss itself, from a 2-D mask
            self.model.config.output_router_logits = False
            info("output_router_logits turned off in the model's config: llmkit adds the load-balancing loss itself")
        for module in self.model.modules():
            if isinstance(module, self.router):
                module.register_forward_hook(self._record)
        return self

    def _record(self, module: Any, inputs: Any, output: Any) -> None:
        if torch.is_grad_enabled():  # training forwards only: evaluation and sampling run without grad
            self.logits.append(output[0] if isinstance(output, tuple) else output)

    def loss(self, batch: Batch) -> torch.Tensor:
        """The unscaled load-balancing loss of the forward pass just run."""
        mask = batch.get("token_mask")
        if mask is None and batch.get("attention_mask") is not None and batch["attention_mask"].dim() == 2:
            mask = batch["attention_mask"]
        logits, self.logits = tuple(self.logits), []
        return self.loss_func(logits, self.experts, self.top_k, mask)

    def take(self) -> float | None:
        """The mean unscaled loss of this process's micro-batches since the last call (None if there were none)."""
        mean = float(self.total) / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean


def router_balance(model: Any) -> RouterBalance | None:
    """The load-balancing loss of a mixture-of-experts model (Mixtral, Qwen-MoE, OLMoE...: a config with
    `output_router_logits` and a `router_aux_loss_coef`), not yet attached; None for a dense model or a coefficient
    of 0. A model whose loss cannot be computed is refused (call it on loading, before anything is written)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or not hasattr(config, "output_router_logits"):
        return None
    coefficient = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    if coefficient == 0.0:
        return None
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    loss_func = getattr(sys.modules[type(base).__module__], "load_balancing_loss_func", None)
    recorders = ((getattr(type(module), "_can_record_outputs", None) or {}) for module in base.modules())
    router = next((getattr(r["router_logits"], "target_class", None) for r in recorders if "router_logits" in r), None)
    if not (experts and top_k and loss_func and isinstance(router, type) and issubclass(router, torch.nn.Module)):
        where = getattr(config, "_name_or_path", "") or "the model"
        raise UserError(
            f"{where}: {config.model_type} is a mixture of experts whose load-balancing loss llmkit cannot compute "
            f"(router_aux_loss_coef={coefficient}), and training without it unbalances the experts; to train "
            f"without it on purpose, set router_aux_loss_coef to 0 in {where}/config.json"
        )
    return RouterBalance(base, coefficient, int(experts), int(top_k), loss_func, router)


class MicroStep:
    """`step(model, batch)` -> (summed loss, target count) of one micro-batch: forward and loss in one autocast
    region, and in one compiled graph when `compiled`.

    `router`: a mixture-of-experts model's load-balancing loss, added to the micro-batch's as the model adds it to
    its mean loss (coefficient x loss x the micro-batch's targets, so one micro-batch's normalized loss equals the
    model's own `loss` with labels).

    Under gradient checkpointing the compiled step stays one graph: the side effects inside a recomputed layer are
    forward hooks that record outputs (transformers' output capture, which records nothing in training, and the
    routers' logits, which the eager recomputation records again and the next micro-batch drops), so the compiled
    backward does not replay them (torch stops the graph at each layer unless told so).

    `fixed_shapes`: every micro-batch has one shape (packed pretraining blocks), so the graph is specialized to it;
    otherwise (fine-tuning rows of any length) the sequence length is marked dynamic from the first step, so new
    lengths reuse the graph instead of recompiling it. A compilation that fails (no C++ compiler, an unsupported
    op) falls back to eager once, with one line; the failed call computed nothing, so the step stays exact.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        autocast: Callable[[], AbstractContextManager[Any]],
        backend: str | None,
        fixed_shapes: bool = True,
        router: RouterBalance | None = None,
        offload: bool = False,
    ) -> None:
        """`backend`: torch.compile's (train.compile_backend), or None to run eagerly. `offload`: the activations
        the backward pass needs are saved in CPU memory (torch.autograd.graph.save_on_cpu; eager only)."""
        self.loss_fn, self.autocast, self.fixed_shapes, self.router = loss_fn, autocast, fixed_shapes, router
        self.offload = offload
        self.compiled = torch.compile(self.eager, backend=backend) if backend else None

    def eager(self, model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.router is not None:  # drop what evaluation, sampling or recomputation in backward recorded
            self.router.logits = []
        total, targets = self.loss_fn(model(**model_inputs(batch)).logits, batch)
        if self.router is None:
            return total, targets, None
        balance = self.router.loss(batch)
        return total + self.router.coefficient * balance * targets, targets, balance

    def __call__(self, model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        offload = torch.autograd.graph.save_on_cpu(torch.cuda.is_available()) if self.offload else nullcontext()
        with self.autocast(), offload:  # the hooks pack what forward saves; backward unpacks it after the block
            total, targets, balance = self._run(model, batch)
        if balance is not None and self.router is not None:
            self.router.total = self.router.total + balance.detach()  # read at logging time: no sync per step
            self.router.count += 1
        return total, targets

    def _run(self, model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.compiled is None:
            return self.eager(model, batch)
        if not self.fixed_shapes:
            _mark_dynamic(batch)
        try:
            with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
                return self.compiled(model, batch)
        except Exception as exc:
            if not _compile_failure(exc):
                raise
            reason = first_line(exc, 160)
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
