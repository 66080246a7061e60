"""`llmkit eval` of a sequence classifier: its metrics on labelled rows (llmkit.scoring computes them)."""

from __future__ import annotations

from typing import Any

import numpy as np

from llmkit.scoring import classification_metrics

MAX_LENGTH = 512  # tokens of a row scored; longer rows are cut


def is_classifier(model_dir: Any) -> bool:
    """Does this model directory hold a sequence classifier (its config names one)?"""
    import json
    from pathlib import Path

    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def evaluate_classifier(
    model_dir: Any, data: Any, batch_size: int = 32, text_field: str = "text", encoding: str = "utf-8"
) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, the confusion matrix and ROC-AUC on text + label rows (the text under
    `text_field`)."""
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
    rows = [
        example
        for source in resolve_sources([str(data)])
        for _, example in normalize(read_records(source, encoding=encoding), "classification", {"text": text_field})
    ]
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
            batch = tokenizer(
                [rows[i].text for i in chunk], truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt"
            )
            probabilities[chunk] = torch.softmax(model(**batch).logits.float(), dim=-1).numpy()
            update(len(chunk))
    labels = np.array([ids[str(row.label)] for row in rows])
    report = classification_metrics(probabilities, labels, names)
    report.update(model=str(model_dir), data=str(data), seconds=time.perf_counter() - start)
    return report
