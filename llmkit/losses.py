"""The causal-LM loss as a sum over target tokens, so batches of any mask combine exactly.

Two forms with the same value and gradients:

* `causal_lm_nll(logits, labels)`: from the logits a model returns. The float32 softmax is taken a chunk of
  rows at a time and its gradient kept in the logits' dtype, so a whole batch's logits never exist in float32.
* `fused_lm_nll(hidden, weight, labels)`: from the last hidden states and the output head's weight. The head's
  matmul, the softmax and both gradients are computed a chunk of rows at a time in the forward pass, so the
  logits of a whole batch never exist at all (what Liger's fused linear cross-entropy does, in plain PyTorch:
  it runs on CPU and on every architecture whose head is a plain linear layer).

Both compute the gradient during the forward pass (the loss is a sum, so its gradient is known up to the scalar
that backward multiplies it by): nothing is recomputed.

Inside a compiled training step (llmkit.train.step) both are the plain formula instead: the head's matmul in the
compute dtype and `cross_entropy` on the logits, which the compiler fuses with the float32 softmax; the logits of
the micro-batch then exist once, in the compute dtype (what `llmkit plan` counts for a compiled run).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_ELEMENTS = 2**26  # logits per chunk: 256 MiB in float32 (512 rows of a 128k vocabulary)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts labels[t+1]: the targets, flattened, IGNORE at each row's last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)


def causal_lm_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token negative log-likelihoods in nats, number of target tokens).

    Position t predicts labels[t+1]; labels equal to -100 are not targets.
    """
    # Shift the labels, not the logits: slicing the logits would copy the largest tensor of the step.
    targets = shifted_targets(labels)
    flat = logits.reshape(-1, logits.shape[-1])
    if torch.compiler.is_compiling():
        total = _plain_nll(flat, targets)
    else:
        total = _ChunkedCrossEntropy.apply(flat, targets, torch.is_grad_enabled())
    return total, (targets != IGNORE).sum()


def fused_lm_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_lm_nll(hidden @ weight.T, labels)` without the logits: hidden is [batch, time, width]."""
    targets = shifted_targets(labels)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if torch.compiler.is_compiling():
        dtype = _compute_dtype(hidden)
        total = _plain_nll(flat.to(dtype) @ weight.to(dtype).T, targets)
    else:
        total = _FusedLinearCrossEntropy.apply(flat, weight, targets, torch.is_grad_enabled())
    return total, (targets != IGNORE).sum()


def liger_lm_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_lm_nll` by Liger's Triton kernel (CUDA only), in the compute dtype autocast would use."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    targets = shifted_targets(labels)
    dtype = _compute_dtype(hidden)
    flat = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    total = liger_fused_linear_cross_entropy(flat, weight.to(dtype), targets, ignore_index=IGNORE, reduction="sum")
    return total.float(), (targets != IGNORE).sum()


def _plain_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed loss as plain autograd sees it, for a compiled graph: the compiler fuses the float32 softmax
    into the kernels around it (no float32 copy of the logits), where tracing the chunked Functions above is not
    reliable across torch versions (torch 2.11 traced their gradients as zero)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def _loss_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For float32 logits of some rows: the summed loss, and its gradient (softmax - one-hot, zero on ignored
    rows), computed in place in the logits' memory."""
    valid = targets != IGNORE
    safe = targets.clamp(min=0).unsqueeze(1)
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, safe).squeeze(1)) * valid).sum()
    grad = logits.sub_(lse.unsqueeze(1)).exp_()
    grad[torch.arange(len(targets), device=grad.device), safe.squeeze(1)] -= 1.0  # one index per row: deterministic
    grad.mul_(valid.unsqueeze(1))
    return loss, grad


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on (as for the model's own layers)."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return tensor.dtype


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, grads: bool) -> torch.Tensor:
        total = torch.zeros((), device=logits.device, dtype=torch.float32)
        grad = torch.empty_like(logits) if grads and ctx.needs_input_grad[0] else None
        step = _chunk_rows(logits.shape[-1])
        # split, not a range over the row count: a compiled graph keeps the count symbolic (one graph for any length)
        outputs = grad.split(step) if grad is not None else None
        with torch.autocast(logits.device.type, enabled=False):
            for i, (rows, row_targets) in enumerate(zip(logits.split(step), targets.split(step), strict=True)):
                loss, chunk_grad = _loss_and_grad(rows.to(torch.float32, copy=True), row_targets)
                total += loss
                if outputs is not None:
                    outputs[i].copy_(chunk_grad)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype) if grad is not None else None), None, None


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grads: bool
    ) -> torch.Tensor:
        dtype = _compute_dtype(hidden)
        needs = ctx.needs_input_grad[:2] if grads else (False, False)  # no gradients to prepare under no_grad
        with torch.autocast(hidden.device.type, enabled=False):  # every dtype below is explicit
            total, grad_hidden, grad_weight = _fused_chunks(hidden, weight, targets, dtype, needs)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.float()
        hidden_grad = grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None
        weight_grad = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return hidden_grad, weight_grad, None, None


def _fused_chunks(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype, needs: tuple[bool, ...]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The fused loss a chunk of rows at a time: (summed loss, its gradient for hidden, for weight)."""
    head = weight.to(dtype)
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if needs[0] else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
    step = _chunk_rows(weight.shape[0])
    outputs = grad_hidden.split(step) if grad_hidden is not None else None
    for i, (rows, row_targets) in enumerate(zip(hidden.split(step), targets.split(step), strict=True)):
        inputs = rows.to(dtype)
        loss, grad = _loss_and_grad((inputs @ head.T).float(), row_targets)
        total += loss
        grad = grad.to(dtype)
        if outputs is not None:
            outputs[i].copy_(grad @ head)
        if grad_weight is not None:
            grad_weight += grad.T @ inputs
    return total, grad_hidden, grad_weight
