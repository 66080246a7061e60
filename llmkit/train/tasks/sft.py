"""`--task sft`: supervised fine-tuning on chat, instruction, prompt/completion or plain-text rows.

The loss covers assistant and completion tokens only (all tokens for plain text); packed examples never attend
to each other (llmkit.train.packing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmkit.config import RunConfig
from llmkit.data.templates import encode_example
from llmkit.errors import UserError
from llmkit.train.job import Objective
from llmkit.train.tasks.base import LmLoss, Task, TaskData, data_fingerprint, split_examples
from llmkit.train.tasks.classify import augment_examples

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


class SFT(Task):
    name = "sft"

    def load_data(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        """Read, normalize, split and encode the rows; refuse data with nothing to learn."""
        ft = cfg.finetune
        train_examples, val_examples, fmt = split_examples(cfg)
        if fmt == "classification":
            raise UserError(f"{cfg.data.sources[0]}: rows are text + label; train a classifier with --task classify")
        if fmt == "text":
            train_examples = augment_examples(train_examples, ft.augment)
        train = [encode_example(tokenizer, e, ft.max_length, ft.train_on_prompt) for e in train_examples]
        val = [encode_example(tokenizer, e, ft.max_length, ft.train_on_prompt) for e in val_examples]
        trainable = sum(e.trainable for e in train)
        truncated = sum(e.truncated for e in train)
        if trainable == 0:
            total = sum(len(e.ids) for e in train)
            raise UserError(
                f"no trainable tokens: {len(train)} training examples, {total} tokens, {truncated} truncated to "
                f"finetune.max_length={ft.max_length}, 0 assistant/completion tokens left after masking; "
                "raise max_length, check the assistant turns, or set finetune.train_on_prompt"
            )
        return TaskData(train, val, fmt, data_fingerprint(cfg), truncated)

    def objective(
        self, model: Any, accelerator: Accelerator, data: TaskData, cfg: RunConfig, lm_loss: LmLoss
    ) -> Objective:
        return Objective(loss_fn=lm_loss())
