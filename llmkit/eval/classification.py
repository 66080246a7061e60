"""Classification metrics: accuracy, macro precision/recall/F1, the confusion matrix, and ROC-AUC.

Macro averages weigh every class equally; a class that is never predicted has precision 0 (scikit-learn's
`zero_division=0`). ROC-AUC is the probability that a random positive scores above a random negative
(the Mann-Whitney statistic, ties counting one half): for two classes on the second class's probability, for more
one-vs-rest per class and their macro mean, as scikit-learn's `roc_auc_score(multi_class="ovr")` defines it. A class
absent from the labels has no ROC-AUC (None) and is left out of the mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
        },  # fmt: skip
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


def is_classifier(model_dir: Any) -> bool:
    """Does this model directory hold a sequence classifier (its config names one)?"""
    import json
    from pathlib import Path

    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def evaluate_classifier(model_dir: Any, data: Any, batch_size: int = 32, max_length: int = 512) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, the confusion matrix and ROC-AUC on text + label rows."""
    import time

    import torch
    from transformers import AutoModelForSequenceClassification

    from llmkit.console import progress_bar
    from llmkit.data.formats import normalize
    from llmkit.data.readers import read_records, resolve_sources
    from llmkit.data.tokenizer import load_tokenizer
    from llmkit.errors import UserError
    from llmkit.runs import find_tokenizer_dir

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), use_safetensors=True).eval()
    tokenizer = load_tokenizer(find_tokenizer_dir(model_dir), require_eos=False)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    ids = {name: i for i, name in enumerate(names)}
    rows = [example for source in resolve_sources([str(data)])
            for _, example in normalize(read_records(source), "classification", {})]  # fmt: skip
    unknown = [row for row in rows if str(row.label) not in ids]
    if unknown:
        raise UserError(
            f"{unknown[0].where}: label {unknown[0].label!r} is not one of the model's ({', '.join(names)})"
        )
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].text))  # batches by length: little padding
    probabilities = np.zeros((len(rows), len(names)))
    start = time.perf_counter()
    with torch.no_grad(), progress_bar("evaluating", len(order), unit="rows") as update:
        for first in range(0, len(order), batch_size):
            chunk = order[first : first + batch_size]
            batch = tokenizer([rows[i].text for i in chunk], truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt")  # fmt: skip
            probabilities[chunk] = torch.softmax(model(**batch).logits.float(), dim=-1).numpy()
            update(len(chunk))
    labels = np.array([ids[str(row.label)] for row in rows])
    report = classification_metrics(probabilities, labels, names)
    report.update(model=str(model_dir), data=str(data), seconds=time.perf_counter() - start)
    return report
