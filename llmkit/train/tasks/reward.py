"""`--task reward`: a Bradley-Terry reward model on preference pairs.

The model is the base with a one-output sequence-classification head (`id2label: {0: reward}`): it scores a whole
prompt + answer by its last token. Training maximizes log sigmoid(r(chosen) - r(rejected)) over the same rows as
DPO (llmkit.train.tasks.preference). `llmkit eval --task reward` reports pairwise accuracy on held-out pairs and
scores a file of candidates.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from llmkit.config import RunConfig
from llmkit.data.pairs import Pair
from llmkit.scoring import REWARD_LABEL, pad_right
from llmkit.train.job import Objective
from llmkit.train.tasks.base import Collate, LmLoss, Task, TaskData
from llmkit.train.tasks.classify import LabelMap
from llmkit.train.tasks.preference import load_pairs

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


def collate_reward_pairs(rows: list[list[Pair]], pad_id: int, indices: list[int] | None = None) -> dict:
    """Each pair as two rows, chosen then rejected, padded right with a 2D attention mask."""
    sequences = [s for row in rows for pair in row for s in (pair.chosen, pair.rejected)]
    batch = pad_right(sequences, pad_id)
    if indices is not None:
        batch["sample_indices"] = torch.tensor(indices)
    return batch


def bradley_terry(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over pairs of -log sigmoid(r_chosen - r_rejected), pairs)."""
    rewards = logits[:, 0].float()
    losses = -F.logsigmoid(rewards[0::2] - rewards[1::2])
    return losses.sum(), torch.tensor(losses.numel(), device=logits.device)


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0]) // 2


@torch.no_grad()
def evaluate_reward_model(model: Any, batches: list[dict[str, torch.Tensor]], acc: Accelerator) -> dict[str, Any]:
    model.eval()
    sums = torch.zeros(5, device=acc.device, dtype=torch.float64)
    for batch in batches:
        inputs = {k: batch[k].to(acc.device) for k in ("input_ids", "attention_mask")}
        rewards = model(**inputs).logits[:, 0].double()
        chosen, rejected = rewards[0::2], rewards[1::2]
        sums += torch.stack(
            [
                (-F.logsigmoid(chosen - rejected)).sum(),
                torch.tensor(float(chosen.numel()), device=acc.device, dtype=torch.float64),
                (chosen > rejected).double().sum(),
                chosen.sum(),
                rejected.sum(),
            ]
        )
    model.train()
    loss, pairs, right, chosen_sum, rejected_sum = (float(v) for v in acc.reduce(sums, reduction="sum"))
    pairs = max(pairs, 1.0)
    return {
        "val_loss": loss / pairs,
        "val_rewards/accuracy": right / pairs,
        "val_rewards/chosen": chosen_sum / pairs,
        "val_rewards/rejected": rejected_sum / pairs,
        "val_rewards/margin": (chosen_sum - rejected_sum) / pairs,
    }


class Reward(Task):
    name = "reward"
    peft_task_type = "SEQ_CLS"
    packs = False  # the head reads each row's last token
    kernels = False
    sequences_per_row = 2
    logits = "none"

    def load_data(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        return load_pairs(cfg, tokenizer)

    def load_model(
        self, source: str | Path, cfg: RunConfig, token: str | None, data: TaskData, tokenizer: PreTrainedTokenizerBase
    ) -> Any:
        from llmkit.models import load_classifier

        labels = LabelMap([REWARD_LABEL], {})
        model = load_classifier(source, labels, cfg.model.trust_remote_code, token, cfg.model.attn_implementation)
        model.config.pad_token_id = tokenizer.pad_token_id  # the head finds each row's last token by it
        return model

    def collate(self, pad_id: int, attn_implementation: str) -> Collate:
        return lambda rows, indices=None: collate_reward_pairs(rows, pad_id, indices)

    def objective(
        self, model: Any, accelerator: Accelerator, data: TaskData, cfg: RunConfig, lm_loss: LmLoss
    ) -> Objective:
        return Objective(bradley_terry, count_pairs, evaluate_reward_model)

    def describe(self, data: TaskData, chat: Any) -> str:
        return f"template {chat.name if chat else '-'}, reward model on chosen/rejected pairs"
