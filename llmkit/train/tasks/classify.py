"""`--task classify`: text classification on a sequence-classification head (any HF encoder or decoder).

Rows are `text` + `label` (strings or integers). The label <-> id map comes from the training rows (sorted)
and is stored in the model's config (`id2label`, `label2id`), so every tool that loads the model knows it.
A validation label never seen in training is an error naming the row: the model has no output for it, and
silently dropping the row would overstate accuracy.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.config import AugmentConfig, RunConfig
from llmkit.data.formats import Example
from llmkit.data.templates import Encoded
from llmkit.errors import UserError
from llmkit.scoring import classification_metrics, pad_right
from llmkit.train.job import Objective
from llmkit.train.tasks.base import Collate, LmLoss, Task, TaskData, data_fingerprint, split_examples

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


class Classify(Task):
    name = "classify"
    needs_eos = False  # encoders have none
    chat = False
    peft_task_type = "SEQ_CLS"
    packs = False  # one example per row: the head reads each row's last (or first) token
    kernels = False
    logits = "none"

    def load_data(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        """Text + label rows: the label map from the training rows, then encoding with the model's tokenizer."""
        ft = cfg.finetune
        train_examples, val_examples, fmt = split_examples(cfg)
        if fmt != "classification":
            raise UserError(f"{cfg.data.sources[0]}: --task classify needs text + label rows, found the {fmt} format")
        labels = LabelMap.from_examples(train_examples)
        train_examples = augment_examples(train_examples, ft.augment)
        train = encode_classification(tokenizer, train_examples, labels, ft.max_length)
        val = encode_classification(tokenizer, val_examples, labels, ft.max_length)
        truncated = sum(e.truncated for e in train)
        return TaskData(train, val, fmt, data_fingerprint(cfg), truncated, {"labels": labels})

    def load_model(
        self, source: Any, cfg: RunConfig, token: str | None, data: TaskData, tokenizer: PreTrainedTokenizerBase
    ) -> Any:
        from llmkit.models import load_classifier

        model = load_classifier(
            source, data.details["labels"], cfg.model.trust_remote_code, token, cfg.model.attn_implementation
        )
        model.config.pad_token_id = tokenizer.pad_token_id  # decoders find each row's last token by it
        return model

    def collate(self, pad_id: int, attn_implementation: str) -> Collate:
        return lambda rows, indices=None: collate_classification(rows, pad_id, indices)

    def objective(
        self, model: Any, accelerator: Accelerator, data: TaskData, cfg: RunConfig, lm_loss: LmLoss
    ) -> Objective:
        labels = data.details["labels"]
        weights = class_weights(cfg.finetune.class_weights, data.train, len(labels.names))
        return Objective(make_loss(weights), count_examples, make_evaluation(labels, weights))

    def describe(self, data: TaskData, chat: Any) -> str:
        return f"classes {', '.join(data.details['labels'].names)}"

    def stats(self, data: TaskData, chat: Any) -> dict[str, Any]:
        return {"labels": data.details["labels"].names}


@dataclass(frozen=True)
class LabelMap:
    names: list[str]  # id -> label as text
    ids: dict[Any, int]  # label as given -> id

    @classmethod
    def from_examples(cls, examples: list[Example]) -> LabelMap:
        labels = {e.label for e in examples}
        if len({type(label) for label in labels}) > 1:
            first: dict[type, Example] = {}  # the first row of each kind
            for example in examples:
                first.setdefault(type(example.label), example)
            rows = ", ".join(f"{e.where} has {e.label!r}" for e in first.values())
            raise UserError(f"labels mix strings and integers ({rows}); use one kind for every row")
        ordered = sorted(labels)
        if len(ordered) < 2:
            raise UserError(f"classification needs at least 2 labels in the training rows, found {ordered}")
        return cls([str(label) for label in ordered], {label: i for i, label in enumerate(ordered)})

    def id_of(self, example: Example) -> int:
        if example.label not in self.ids:
            known = ", ".join(self.names)
            raise UserError(
                f"{example.where}: label {example.label!r} never appears in the training rows ({known}); "
                "fix the row or add training rows with this label"
            )
        return self.ids[example.label]


def encode_classification(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], labels: LabelMap, max_length: int
) -> list[Encoded]:
    encoded = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
    return [
        Encoded(np.asarray(ids, dtype=np.int64), np.asarray([labels.id_of(e)], dtype=np.int64), len(ids) >= max_length)
        for ids, e in zip(encoded["input_ids"], examples, strict=True)
    ]


def collate_classification(rows: list[list[Encoded]], pad_id: int, sample_indices: list[int] | None = None) -> dict:
    """One example per row, padded right, with a 2D attention mask (encoders attend both ways)."""
    examples = [row[0] for row in rows]
    batch = pad_right(examples, pad_id)
    batch["labels"] = torch.tensor([int(e.labels[0]) for e in examples])
    if sample_indices is not None:
        batch["sample_indices"] = torch.tensor(sample_indices)
    return batch


def class_weights(setting: str | list[float], train: list[Encoded], classes: int) -> torch.Tensor | None:
    """None, inverse-frequency ('balanced': n / (k * count)), or weights given per class."""
    if setting == "none":
        return None
    if isinstance(setting, list):
        if len(setting) != classes:
            raise UserError(f"finetune.class_weights has {len(setting)} weights for {classes} classes")
        return torch.tensor(setting, dtype=torch.float32)
    counts = Counter(int(e.labels[0]) for e in train)
    return torch.tensor([len(train) / (classes * max(counts[c], 1)) for c in range(classes)], dtype=torch.float32)


def make_loss(weights: torch.Tensor | None) -> Any:
    def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        weight = weights.to(logits.device) if weights is not None else None
        total = F.cross_entropy(logits.float(), batch["labels"], weight=weight, reduction="sum")
        return total, torch.tensor(batch["labels"].numel(), device=logits.device)

    return loss_fn


def count_examples(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["labels"].numel())


def make_evaluation(labels: LabelMap, weights: torch.Tensor | None) -> Any:
    loss_fn = make_loss(weights)

    @torch.no_grad()
    def evaluate(model: Any, batches: list[dict[str, torch.Tensor]], acc: Accelerator) -> dict[str, Any]:
        model.eval()
        total, count, probabilities, targets = 0.0, 0, [], []
        for batch in batches:
            inputs = {k: batch[k].to(acc.device) for k in ("input_ids", "attention_mask")}
            logits = model(**inputs).logits.float()
            loss_sum, n = loss_fn(logits, {"labels": batch["labels"].to(acc.device)})
            total, count = total + float(loss_sum), count + int(n)
            probabilities.append(torch.softmax(logits, dim=-1).cpu().numpy())
            targets.append(batch["labels"].numpy())
        model.train()
        metrics = classification_metrics(np.concatenate(probabilities), np.concatenate(targets), labels.names)
        result = {"val_loss": total / max(count, 1)}
        result.update({f"val_{key}": value for key, value in metrics.items() if key not in ("per_class", "examples")})
        return result

    return evaluate


def augment_examples(examples: list[Example], cfg: AugmentConfig) -> list[Example]:
    """Append `cfg.copies` seeded variants of every row: random word swaps, insertions and deletions."""
    if cfg.copies == 0:
        return examples
    rng = random.Random(cfg.seed)
    out = list(examples)
    for example in examples:
        for _ in range(cfg.copies):
            out.append(Example(example.where, text=augment_text(example.text, cfg, rng), label=example.label))
    return out


def augment_text(text: str, cfg: AugmentConfig, rng: random.Random) -> str:
    words = text.split()
    if len(words) < 2:
        return text
    result: list[str] = []
    for word in words:
        if rng.random() < cfg.delete and len(words) > 2:
            continue
        result.append(word)
        if rng.random() < cfg.insert:
            result.append(rng.choice(words))
    for i in range(len(result) - 1):
        if rng.random() < cfg.swap:
            result[i], result[i + 1] = result[i + 1], result[i]
    return " ".join(result) if result else text
