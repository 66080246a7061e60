"""Scores that training and evaluation both compute: classification metrics (accuracy, macro precision/recall/F1,
the confusion matrix, ROC-AUC) and a reward model's scores of whole sequences.

Macro averages weigh every class equally; a class that is never predicted has precision 0 (scikit-learn's
`zero_division=0`). ROC-AUC is the probability that a random positive scores above a random negative
(the Mann-Whitney statistic, ties counting one half): for two classes on the second class's probability, for more
one-vs-rest per class and their macro mean, as scikit-learn's `roc_auc_score(multi_class="ovr")` defines it. A class
absent from the labels has no ROC-AUC (None) and is left out of the mean.

A reward model is a one-output sequence classifier labelled `reward` (`--task reward`): it scores a whole prompt +
answer by its last token.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.data.templates import Encoded
from llmkit.errors import UserError

REWARD_LABEL = "reward"


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Metrics for predicted class probabilities (N, C) against true class ids (N,)."""
    classes = len(names)
    predictions = probabilities.argmax(axis=1)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    true_positive = np.diag(confusion).astype(float)
    predicted = confusion.sum(axis=0).astype(float)
    actual = confusion.sum(axis=1).astype(float)
    precision = np.divide(true_positive, predicted, out=np.zeros(classes), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros(classes), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(classes), where=denominator > 0)
    metrics: dict[str, Any] = {
        "accuracy": float(true_positive.sum() / max(len(labels), 1)),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for name, p, r, f, n in zip(names, precision, recall, f1, actual, strict=True)
        },
        "confusion_matrix": {"labels": names, "rows_true_columns_predicted": confusion.tolist()},
        "examples": int(len(labels)),
    }
    if classes == 2:
        metrics["roc_auc"] = roc_auc(probabilities[:, 1], labels == 1)
    else:
        per_class = [roc_auc(probabilities[:, c], labels == c) for c in range(classes)]
        for name, auc in zip(names, per_class, strict=True):
            metrics["per_class"][name]["roc_auc"] = auc
        defined = [auc for auc in per_class if auc is not None]
        metrics["roc_auc"] = float(np.mean(defined)) if defined else None
    return metrics


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=float)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pad_right(sequences: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Sequences as rows padded right, with a 2D attention mask and the count of real tokens."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        ids[i, : len(sequence)] = torch.from_numpy(sequence.ids)
        mask[i, : len(sequence)] = 1
    return {"input_ids": ids, "attention_mask": mask, "num_tokens": mask.sum()}


def is_reward_model(config: Any) -> bool:
    return getattr(config, "num_labels", 0) == 1 and dict(getattr(config, "id2label", {}) or {}).get(0) == REWARD_LABEL


def rewards_of(model: Any, sequences: list[Encoded], pad_id: int, batch_size: int) -> np.ndarray:
    """The model's score of every sequence, batched by length."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = np.zeros(len(sequences))
    with torch.no_grad():
        for first in range(0, len(order), batch_size):
            chunk = order[first : first + batch_size]
            batch = pad_right([sequences[i] for i in chunk], pad_id)
            device = next(model.parameters()).device
            inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
            scores[chunk] = model(**inputs).logits[:, 0].double().cpu().numpy()
    return scores


MATCH_METRICS = {"exact": "exact_match", "contains": "contains", "regex": "regex_match", "numeric": "numeric_match"}
NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def answer_score(output: str, target: str, task: Any, where: str) -> float:
    """1.0 when a generated answer matches an item's answer as its task file says (`match`), else 0.0: exact
    (after trimming), contains (case-insensitive), regex (the answer field is the pattern) or numeric (the first
    number in the output within `tolerance` of the answer). Shared by `llmkit eval` and GRPO's rewards."""
    how = task.match
    if how == "exact":
        return float(output.strip() == target.strip())
    if how == "contains":
        return float(target.strip().lower() in output.lower())
    if how == "numeric":
        expected = _number(target)
        if expected is None:
            raise UserError(f"{where}: answer {target!r} is not a number (match: numeric)")
        found = _number(output)
        return float(found is not None and abs(found - expected) <= task.tolerance)
    try:
        return float(re.search(target, output) is not None)
    except re.error as exc:
        raise UserError(f"{where}: answer is not a valid regular expression ({exc})") from None


def _number(text: str) -> float | None:
    match = NUMBER.search(text)
    if match is None:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def is_reward_dir(model_dir: Path) -> bool:
    """Does this directory hold a reward model (full weights; a LoRA run is told by its run's config)?"""
    config, run_config = model_dir / "config.json", model_dir.parent / "config.yaml"
    if config.is_file():
        mapping = json.loads(config.read_text(encoding="utf-8"))
        return dict(mapping.get("id2label") or {}).get("0") == REWARD_LABEL and len(mapping["id2label"]) == 1
    if (model_dir / "adapter_config.json").is_file() and run_config.is_file():
        import yaml

        saved = yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}
        return (saved.get("finetune") or {}).get("task") == "reward"
    return False


def load_reward_model(model_dir: Path) -> Any:
    """A reward model directory (full weights) or a LoRA run's adapter directory on its base."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    adapters = (model_dir / "adapter_config.json").is_file()  # its base's config is known only once loaded
    if not adapters and not is_reward_model(AutoConfig.from_pretrained(str(model_dir))):
        raise UserError(f"{model_dir}: not a reward model (train one with llmkit finetune --task reward)")
    if adapters:
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1)
        if not is_reward_model(model.config):
            raise UserError(f"{model_dir}: not a reward model (train one with llmkit finetune --task reward)")
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), use_safetensors=True)
    return model.eval()
