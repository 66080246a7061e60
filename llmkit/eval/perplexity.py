"""`llmkit eval`: loss, perplexity, bits per token and bits per character on held-out text.

Data is either a prepared dataset (its validation split) or a raw .txt/.jsonl/.json/.csv/.parquet file,
tokenized with the model's own tokenizer. Bits per character sum each target token's characters, so the
figure is exact for byte-level tokenizers and comparable across tokenizers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmkit.console import progress_bar
from llmkit.data.cleaning import clean_text
from llmkit.data.readers import read_documents, resolve_sources
from llmkit.data.store import MANIFEST, open_dataset
from llmkit.data.tokenizer import char_counts, load_tokenizer, tokenizer_hash
from llmkit.errors import UserError
from llmkit.eval.exported import load_for_eval
from llmkit.losses import IGNORE
from llmkit.models import check_vocab_fits, model_context
from llmkit.runs import find_tokenizer_dir, resolve_model_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

LN2 = math.log(2)


@dataclass
class EvalData:
    blocks: list[np.ndarray]  # token id rows; a shorter last row is allowed
    source: str
    entropy_floor: float | None = None


def evaluate(
    model_path: str | Path,
    data: str | Path,
    batch_size: int = 8,
    seq_len: int | None = None,
    max_batches: int | None = None,
    text_field: str = "text",
    encoding: str = "utf-8",
) -> dict[str, Any]:
    """Score a causal LM on held-out text and return the report."""
    model_dir = resolve_model_dir(model_path)
    tokenizer = load_tokenizer(find_tokenizer_dir(model_dir))
    model = load_for_eval(model_dir)
    check_vocab_fits(model, tokenizer, str(model_dir))
    context = model_context(model)
    if seq_len is not None and context and seq_len > context:
        raise UserError(
            f"--seq-len {seq_len}: longer than the model's context of {context} tokens; use {context} or less"
        )
    eval_data = _load_eval_data(data, tokenizer, seq_len or min(context or 1024, 1024), text_field, encoding)
    if not eval_data.blocks:
        raise UserError(f"{data}: no text to evaluate")
    longest = max(len(block) for block in eval_data.blocks)
    if context and longest > context:
        raise UserError(
            f"{data}: blocks of {longest} tokens are longer than the model's context of {context} tokens; "
            "evaluate a raw text file (cut to the context), or a dataset prepared with a smaller block size"
        )

    per_token_chars = torch.from_numpy(char_counts(tokenizer))
    rows = eval_data.blocks
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # batch by length: no padding waste
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    nll, tokens, chars = 0.0, 0, 0
    start = time.perf_counter()
    with torch.no_grad(), progress_bar("evaluating", len(batches), unit="batches") as update:
        for batch_rows in batches:
            ids, labels = _pad([rows[i] for i in batch_rows], tokenizer.pad_token_id)
            padded = bool((labels == IGNORE).any())
            mask = (labels != IGNORE).to(device) if padded else None
            logits = model(input_ids=ids.to(device), attention_mask=mask).logits
            targets = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]).cpu(),
                targets.reshape(-1),
                ignore_index=IGNORE,
                reduction="none",
            )
            scored = targets.reshape(-1) != IGNORE
            nll += float(losses[scored].double().sum())
            tokens += int(scored.sum())
            chars += int(per_token_chars[targets.reshape(-1)[scored]].sum())
            update(1, f"{tokens / (time.perf_counter() - start):,.0f} tok/s")

    loss = nll / tokens
    report: dict[str, Any] = {
        "model": str(model_dir),
        "data": eval_data.source,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_token": loss / LN2,
        "bits_per_char": nll / LN2 / chars if chars else None,
        "tokens": tokens,
        "chars": chars,
        "seconds": time.perf_counter() - start,
    }
    if eval_data.entropy_floor is not None and report["bits_per_char"] is not None:
        report["entropy_floor_bits_per_char"] = eval_data.entropy_floor
        report["bits_per_char_over_floor"] = report["bits_per_char"] / eval_data.entropy_floor
    return report


def _load_eval_data(
    data: str | Path, tokenizer: PreTrainedTokenizerBase, seq_len: int, text_field: str, encoding: str
) -> EvalData:
    path = Path(data)
    if path.is_dir() and (path / MANIFEST).is_file():
        dataset = open_dataset(path)
        if dataset.manifest["tokenizer"]["hash"] != tokenizer_hash(tokenizer):
            raise UserError(
                f"{path}: dataset was tokenized with a different tokenizer than the model's; "
                "evaluate a raw text file instead, or re-run data-prep with the model's tokenizer"
            )
        split = dataset.split("val")
        if len(split) == 0:
            raise UserError(
                f"{path}: the dataset has no validation blocks; re-run data-prep with data.val_fraction > 0"
            )
        blocks = list(split.blocks(np.arange(len(split))))
        entropy = dataset.manifest.get("entropy") or {}
        floor = (entropy.get("bits_per_char") or {}).get("val")
        return EvalData(blocks, f"{path} (validation split)", floor)

    sources = resolve_sources([str(data)])
    eos = int(tokenizer.eos_token_id)
    stream: list[int] = []
    for source in sources:
        for doc in read_documents(source, text_field, "file", 0, 0, encoding):
            text = clean_text(doc.text, "NFC")
            if text:
                stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
                stream.append(eos)
    ids = np.asarray(stream, dtype=np.int64)
    # Non-overlapping windows; the last, shorter one is kept, so every token but each window's first is scored.
    blocks = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i : i + seq_len]) > 1]
    return EvalData(blocks, str(data))


def _pad(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.from_numpy(np.asarray(row, dtype=np.int64))
        labels[i, : len(row)] = ids[i, : len(row)]
    return ids, labels


def failed_gates(
    report: dict[str, Any],
    max_perplexity: float | None = None,
    min_accuracy: float | None = None,
    min_f1: float | None = None,
) -> list[str]:
    """One line per failed gate, naming the metric, its value and the limit."""
    checks = [
        ("perplexity", max_perplexity, "--max-perplexity", lambda value, limit: value <= limit),
        ("accuracy", min_accuracy, "--min-accuracy", lambda value, limit: value >= limit),
        ("macro_f1", min_f1, "--min-f1", lambda value, limit: value >= limit),
    ]
    failures = []
    for metric, limit, flag, passes in checks:
        if limit is None:
            continue
        if metric not in report:
            failures.append(f"{flag}: this report has no {metric} (it applies to the other kind of model)")
        elif not passes(report[metric], limit):
            sign = ">" if flag.startswith("--max") else "<"
            failures.append(f"{metric} {report[metric]:.4g} {sign} {flag} {limit:g}")
    return failures
