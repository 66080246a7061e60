"""The causal-LM loss as a sum over target tokens, so batches of any mask combine exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def causal_lm_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token negative log-likelihoods in nats, number of target tokens).

    Position t predicts labels[t+1]; labels equal to -100 are not targets.
    """
    # Shift the labels, not the logits: slicing the logits would copy the largest tensor of the step.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    total = F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total, (targets != IGNORE).sum()


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())
