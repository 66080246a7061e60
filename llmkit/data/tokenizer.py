"""Tokenizers: train a byte-level BPE, load an existing one, fingerprint it, count characters per token."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmkit.errors import UserError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE (GPT-2 style) on `texts`.

    Documents are separated by `<|endoftext|>`, which is also the BOS token (the GPT-2 convention:
    it marks a document boundary); `<|pad|>` pads batches. Byte-level means any input round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS, pad_token=PAD)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False, require_eos: bool = True) -> Any:
    """Load a fast tokenizer from a local directory or the hub, with a clear error when it cannot.

    Language modelling separates documents with EOS, so it is required unless `require_eos` is off
    (classification with an encoder's tokenizer).
    """
    from transformers import AutoTokenizer

    from llmkit.hub import prepare_hub_access

    prepare_hub_access(name_or_path)
    path = Path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError offline, ValueError for unknown types, HTTP errors from the hub
        if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(
                f"{name_or_path}: no tokenizer in this folder (no {', '.join(TOKENIZER_FILES)}); give the folder "
                "one was saved in, e.g. RUN/final or RUN/tokenizer"
            ) from None
        where = "local directory" if path.exists() else "hub name (offline or not found?)"
        reason = first_line(exc, 160)
        raise UserError(f"{name_or_path}: cannot load a tokenizer from this {where}: {reason}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{name_or_path}: llmkit needs a fast (Rust `tokenizers`) tokenizer")
    if require_eos and tokenizer.eos_token_id is None:
        raise UserError(f"{name_or_path}: tokenizer has no EOS token; documents cannot be separated")
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """A fingerprint of what the tokenizer does: its vocabulary, rules and special tokens."""
    spec = {
        "backend": json.loads(tokenizer.backend_tokenizer.to_str()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def char_counts(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Characters each token id stands for, so bits per character can be summed token by token.

    For byte-level vocabularies this is exact: a token's characters are its bytes that start a UTF-8
    character. Special tokens count zero. Other vocabularies use the length of the decoded token.
    """
    size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    counts = np.zeros(size, dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    byte_decoder = _byte_decoder() if _is_byte_level(tokenizer) else None
    for token, index in tokenizer.get_vocab().items():
        if index in special:
            continue
        if byte_decoder is not None and all(ch in byte_decoder for ch in token):
            counts[index] = sum(1 for ch in token if (byte_decoder[ch] & 0xC0) != 0x80)
        else:
            counts[index] = len(tokenizer.convert_tokens_to_string([token]).strip() or token)
    return counts


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    return decoder.get("type") == "ByteLevel"


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}
