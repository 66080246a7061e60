"""`llmkit eval --task reward`: a reward model (llmkit finetune --task reward) on pairs or on candidates.

Pairs (`{prompt, chosen, rejected}` or whole-conversation pairs) give pairwise accuracy (the chosen answer scored
strictly higher), the mean margin and the mean rewards. Any other rows (prompt/completion, messages, text) are
candidates: each is scored, and `--scores FILE` writes one JSON line per row with its reward. Rows are encoded as
in training (the tokenizer's chat template, the answer's end token).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.data.formats import normalize
from llmkit.data.readers import read_records, resolve_sources
from llmkit.errors import UserError
from llmkit.scoring import load_reward_model

DEFAULT_MAX_LENGTH = 1024


def evaluate_reward(
    model_dir: Path, data: str, batch_size: int, scores: Path | None = None, encoding: str = "utf-8"
) -> dict[str, Any]:
    from llmkit.data.pairs import PAIR_FORMATS, encode_pair
    from llmkit.data.templates import encode_example
    from llmkit.data.tokenizer import load_tokenizer
    from llmkit.models import model_context
    from llmkit.runs import find_tokenizer_dir
    from llmkit.scoring import rewards_of

    model = load_reward_model(model_dir)
    tokenizer = load_tokenizer(find_tokenizer_dir(model_dir))
    max_length = min(model_context(model) or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    sources = resolve_sources([data])
    start = time.perf_counter()
    first = next(iter(read_records(sources[0], encoding=encoding)), None)
    if first is None:
        raise UserError(f"{data}: no rows")
    record, _ = first
    pad = int(tokenizer.pad_token_id)
    if isinstance(record, dict) and {"chosen", "rejected"} <= record.keys():
        rows = [
            example
            for source in sources
            for _, example in normalize(read_records(source, encoding=encoding), "auto", {}, PAIR_FORMATS)
        ]
        pairs = [encode_pair(tokenizer, row, max_length) for row in rows]
        rewards = rewards_of(model, [s for p in pairs for s in (p.chosen, p.rejected)], pad, batch_size)
        chosen, rejected = rewards[0::2], rewards[1::2]
        result = {
            "kind": "reward",
            "data": data,
            "pairs": len(pairs),
            "accuracy": float(np.mean(chosen > rejected)),
            "margin": float(np.mean(chosen - rejected)),
            "reward_chosen": float(np.mean(chosen)),
            "reward_rejected": float(np.mean(rejected)),
        }
        if scores is not None:
            _write_scores(
                scores,
                [
                    {"where": r.where, "chosen": float(c), "rejected": float(j)}
                    for r, c, j in zip(rows, chosen, rejected, strict=True)
                ],
            )
    else:
        rows = [
            example
            for source in sources
            for _, example in normalize(read_records(source, encoding=encoding), "auto", {})
        ]
        if rows and rows[0].label is not None:
            raise UserError(f"{rows[0].where}: text + label rows; a reward model scores pairs or candidates")
        encoded = [encode_example(tokenizer, row, max_length, train_on_prompt=True) for row in rows]
        rewards = rewards_of(model, encoded, pad, batch_size)
        result = {
            "kind": "reward",
            "data": data,
            "candidates": len(rows),
            "reward_mean": float(np.mean(rewards)),
            "reward_std": float(np.std(rewards)),
            "reward_min": float(np.min(rewards)),
            "reward_max": float(np.max(rewards)),
        }
        if scores is not None:
            _write_scores(scores, [{"where": r.where, "reward": float(v)} for r, v in zip(rows, rewards, strict=True)])
    result["seconds"] = time.perf_counter() - start
    result["scores"] = str(scores) if scores is not None else None
    return result


def _write_scores(path: Path, lines: list[dict[str, Any]]) -> None:
    from llmkit.atomic import write_text

    write_text(path, "".join(json.dumps(line) + "\n" for line in lines))
