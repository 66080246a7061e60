"""Does the exported model still behave like the trained one? Measured on a fixed probe set of real text.

Every export is run by its own runtime (transformers for hf, onnxruntime for onnx, the GGUF file read back and
dequantized for gguf) on the same probe as the source model in float32, and compared on:

* the maximum absolute difference of the logits (over every real position and vocabulary entry);
* greedy-token agreement: how often both pick the same most likely next token;
* perplexity on the probe, and its relative change from the source's (either way).

Each has a tolerance, by default set by the format and precision and changeable by the user; an export
outside any of them fails and writes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from llmkit.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

GENERIC_PROBES = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "In 1969, astronauts landed on the Moon and walked on its surface for the first time.",
    "def add(a, b):\n    return a + b\n",
]


@dataclass
class Tolerance:
    max_logit_diff: float
    min_greedy_agreement: float
    max_ppl_increase: float  # relative, either way: 0.02 allows the probe perplexity to move by 2%

    @classmethod
    def default(cls, precision: str) -> Tolerance:
        """Exact formats must match; 16-bit ones stay close; 8-bit and fewer bits are held to behaviour, not to
        logits, more loosely the fewer bits they keep (a single export's default gate; `--ladder` holds every
        level to one bar)."""
        levels = {
            "float32": cls(1e-3, 1.0, 1e-4),
            "float16": cls(0.05, 0.98, 0.005),
            "bfloat16": cls(0.5, 0.95, 0.02),
            "q8_0": cls(math.inf, 0.9, 0.05),
            "int8": cls(math.inf, 0.9, 0.05),
            "int4": cls(math.inf, 0.8, 0.2),
            "q6_k": cls(math.inf, 0.9, 0.05),
            "q5": cls(math.inf, 0.85, 0.1),
            "q4": cls(math.inf, 0.8, 0.2),
            "q3": cls(math.inf, 0.7, 0.35),
            "q2": cls(math.inf, 0.6, 0.6),
        }
        return levels.get(precision) or levels[precision[:2]]  # q5_1, q5_k_m -> q5


BUILTIN_PROBE = "built-in (8 held-out stories, 4 general sentences)"


@dataclass(frozen=True)
class Probe:
    """The texts an export is checked on (read before any work), and what its report calls them."""

    texts: list[str]
    name: str


def probe_texts(path: str | None = None, count: int = 32, encoding: str | None = None) -> list[str]:
    """The user's text (the first `count` documents of a .txt/.jsonl/.csv/.parquet file, field `text`), or by
    default held-out stories from the built-in corpus plus a few general sentences (BUILTIN_PROBE)."""
    from llmkit.data.corpus import STORIES, generate

    if path is None:
        return [document.text for document in generate(STORIES, 8, seed=20261122)] + GENERIC_PROBES
    from llmkit.data.readers import check_encoding, read_documents, resolve_sources

    codec = check_encoding(encoding or "utf-8")
    texts = []
    for source in resolve_sources([path]):
        for document in read_documents(source, "text", "line", 0, 0, codec):
            if document.text.strip():
                texts.append(document.text)
            if len(texts) == count:
                return texts
    if not texts:
        raise UserError(f"{path}: no text to probe the export with")
    return texts


def probe_batch(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], length: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe texts' first `length` tokens, right-padded to one batch."""
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"][:length] for text in texts]
    rows = [row for row in rows if len(row) >= 2]
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def measure(reference: LogitsFn, exported: LogitsFn, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    expected, actual = reference(ids, mask).float(), exported(ids, mask).float()
    real = mask.bool()
    diff = (expected - actual).abs().amax(dim=-1)[real]
    agree = (expected.argmax(-1) == actual.argmax(-1))[real]
    targets = ids[:, 1:]
    scored = real[:, 1:] & real[:, :-1]

    def perplexity(logits: torch.Tensor) -> float:
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        return math.exp(float(nll[scored].double().mean()))

    source_ppl, exported_ppl = perplexity(expected), perplexity(actual)
    return {
        "max_abs_logit_diff": float(diff.max()),
        "greedy_agreement": float(agree.float().mean()),
        "source_perplexity": source_ppl,
        "exported_perplexity": exported_ppl,
        "perplexity_increase": exported_ppl / source_ppl - 1,
        "probe_tokens": int(real.sum()),
    }


def failures(report: dict[str, Any], tolerance: Tolerance) -> list[str]:
    found = []
    if report["max_abs_logit_diff"] > tolerance.max_logit_diff:
        found.append(f"max logit difference {report['max_abs_logit_diff']:.4g} > {tolerance.max_logit_diff:g}")
    if report["greedy_agreement"] < tolerance.min_greedy_agreement:
        found.append(f"greedy agreement {report['greedy_agreement']:.4f} < {tolerance.min_greedy_agreement:g}")
    if abs(report["perplexity_increase"]) > tolerance.max_ppl_increase:  # a big drop is a different model too
        found.append(
            f"perplexity change {report['perplexity_increase']:+.2%} beyond +-{tolerance.max_ppl_increase:.2%}"
        )
    return found
