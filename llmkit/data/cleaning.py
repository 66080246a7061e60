"""Cleaning: Unicode normalization and whitespace cleanup, and the content-keyed train/validation split."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterator
from typing import Literal

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_TRAILING = re.compile(r" +\n")
_BLANK_LINES = re.compile(r"\n{3,}")


CLEAN_PIECE_CHARS = 1 << 20


def clean_text(text: str, normalize: Literal["NFC", "NFKC", "none"] | str) -> str:
    """Normalize Unicode, drop control characters, collapse runs of spaces and of blank lines.

    A long text is cleaned in pieces (the substitutions' working memory grows with the number of matches): each
    cut is between whitespace and a letter or digit, which no rule here reads across, so the result is the same.
    """
    if len(text) <= CLEAN_PIECE_CHARS:
        return _clean(text, normalize).strip()
    return "".join(_clean(piece, normalize) for piece in _pieces(text, CLEAN_PIECE_CHARS)).strip()


def _pieces(text: str, limit: int) -> Iterator[str]:
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = end
        while cut > start + limit // 2 and not (text[cut - 1].isspace() and text[cut].isalnum()):
            cut -= 1
        end = cut if cut > start + limit // 2 else end  # no safe cut in half a piece: cut where it is
        yield text[start:end]
        start = end
    yield text[start:]


def _clean(text: str, normalize: str) -> str:
    if normalize != "none":
        text = unicodedata.normalize(normalize, text)  # type: ignore[arg-type]
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text)


def is_validation(text: str, val_fraction: float, seed: int) -> bool:
    """Deterministic split by document content: the same text always lands in the same split."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction
