"""Quality filters on one cleaned document: Gopher repetition and quality rules, C4 line rules, language, PII.

The rules are the published ones (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from
Training Gopher", appendix A; Raffel et al. 2020, C4), written here rather than taken from datatrove because
datatrove's versions split words with spaCy or NLTK models (a large dependency, and NLTK's needs a download),
while these rules only need whitespace words. Thresholds are the papers' defaults, each a config key
(`data.quality.*`). Every function returns the reason a document is dropped, or None to keep it.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from functools import cached_property
from typing import Any

from llmkit.config import QualityConfig

_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»“”‘’…—–"
_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLETS = ("•", "-", "*", "‣", "◦", "●", "▪")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_PARAGRAPHS = re.compile(r"\n{2,}")
LANGUAGE_CHARS = 20_000  # language identification reads the start of a document: its cost grows with the length


def words_of(text: str) -> list[str]:
    """Whitespace words with surrounding punctuation removed; tokens that are only punctuation are not words."""
    return [word for token in text.split() if (word := token.strip(_PUNCTUATION))]


def gopher_repetition(text: str, cfg: QualityConfig) -> str | None:
    """Gopher's repetition rules: repeated lines and paragraphs, frequent n-grams, repeated n-grams."""
    for name, parts, most, most_chars in (
        ("duplicate_lines", text.split("\n"), cfg.max_duplicate_lines, cfg.max_duplicate_line_chars),
        (
            "duplicate_paragraphs",
            _PARAGRAPHS.split(text),
            cfg.max_duplicate_paragraphs,
            cfg.max_duplicate_paragraph_chars,
        ),
    ):
        parts = [part for part in (p.strip() for p in parts) if part]
        repeated, repeated_chars = _repeats(parts)
        if parts and repeated / len(parts) > most:
            return f"gopher_repetition:{name}"
        if parts and repeated_chars / max(1, sum(map(len, parts))) > most_chars:
            return f"gopher_repetition:{name[:-1]}_chars"
    words = text.split()
    total_chars = sum(map(len, words))
    if not total_chars:
        return None
    for n, most in enumerate(cfg.max_top_ngram_chars, start=2):
        counts = Counter(zip(*(words[i:] for i in range(n)), strict=False))
        if counts:
            gram, count = counts.most_common(1)[0]
            if count > 1 and count * sum(map(len, gram)) / total_chars > most:
                return f"gopher_repetition:top_{n}gram"
    for n, most in enumerate(cfg.max_duplicate_ngram_chars, start=5):
        if _duplicate_ngram_chars(words, n) / total_chars > most:
            return f"gopher_repetition:duplicate_{n}grams"
    return None


def _repeats(parts: list[str]) -> tuple[int, int]:
    """How many parts repeat an earlier one, and their characters."""
    seen: set[str] = set()
    repeated = repeated_chars = 0
    for part in parts:
        if part in seen:
            repeated += 1
            repeated_chars += len(part)
        seen.add(part)
    return repeated, repeated_chars


def _duplicate_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the words covered by an n-gram that occurs more than once (each word counted once)."""
    grams = list(zip(*(words[i:] for i in range(n)), strict=False))
    counts = Counter(grams)
    covered = bytearray(len(words))
    for start, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[start : start + n] = b"\x01" * n
    return sum(len(word) for word, hit in zip(words, covered, strict=True) if hit)


def gopher_quality(text: str, cfg: QualityConfig) -> str | None:
    """Gopher's quality rules: word count and length, symbols, bullets and ellipses, letters, stop words."""
    words = words_of(text)
    if not cfg.min_words <= len(words) <= cfg.max_words:
        return "gopher_quality:word_count"
    mean_length = sum(map(len, words)) / max(1, len(words))
    if not cfg.min_mean_word_length <= mean_length <= cfg.max_mean_word_length:
        return "gopher_quality:mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / max(1, len(words)) > cfg.max_symbol_ratio:
        return "gopher_quality:symbols"
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and sum(line.lstrip().startswith(_BULLETS) for line in lines) / len(lines) > cfg.max_bullet_lines:
        return "gopher_quality:bullet_lines"
    if lines and sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > cfg.max_ellipsis_lines:
        return "gopher_quality:ellipsis_lines"
    if words and sum(any(c.isalpha() for c in word) for word in words) / len(words) < cfg.min_alpha_words:
        return "gopher_quality:alpha_words"
    if sum(word.lower() in _STOP_WORDS for word in words) < cfg.min_stop_words:
        return "gopher_quality:stop_words"
    return None


def c4_lines(text: str, cfg: QualityConfig) -> tuple[str, int, str | None]:
    """C4's rules: the text with bad lines removed, how many were removed, and the reason to drop it (or None)."""
    lowered = text.lower()
    if "lorem ipsum" in lowered:
        return text, 0, "c4:lorem_ipsum"
    if "{" in text:
        return text, 0, "c4:curly_bracket"
    kept = [line for line in text.split("\n") if _c4_keeps(line.strip(), cfg.c4_min_words_per_line)]
    removed = text.count("\n") + 1 - len(kept)
    result = "\n".join(kept)
    if len(_SENTENCE_END.findall(result)) < cfg.c4_min_sentences:
        return result, removed, "c4:too_few_sentences"
    return result, removed, None


def _c4_keeps(line: str, min_words: int) -> bool:
    lowered = line.lower()
    return (
        line.endswith(_TERMINAL)
        and len(line.split()) >= min_words
        and "javascript" not in lowered
        and not any(phrase in lowered for phrase in _POLICY)
    )


class LanguageFilter:
    """Language identification with py3langid (a model the package ships; no fastText, no download)."""

    def __init__(self, languages: list[str], threshold: float) -> None:
        self.languages = set(languages)
        self.threshold = threshold

    @cached_property
    def identifier(self) -> Any:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError:
            from llmkit.errors import UserError

            raise UserError("data.quality.languages needs py3langid: pip install py3langid") from None
        return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def __call__(self, text: str) -> str | None:
        language, probability = self.identifier.classify(text[:LANGUAGE_CHARS])
        if language not in self.languages or probability < self.threshold:
            return "language"
        return None


# Replacements are reserved documentation values (RFC 2606 and RFC 5737 / 3849), so masked text still reads as text.
EMAIL_MASK = "email@example.com"
IPV4_MASK = "192.0.2.1"
IPV6_MASK = "2001:db8::1"
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])"
)
_IPV6_CANDIDATE = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")


def mask_pii(text: str) -> tuple[str, Counter[str]]:
    """E-mail addresses and IPv4/IPv6 numbers replaced by documentation values, with how many of each."""
    counts: Counter[str] = Counter()

    def replace(kind: str, mask: str, valid: Callable[[str], bool] = lambda _: True) -> Callable[[re.Match[str]], str]:
        def one(match: re.Match[str]) -> str:
            if match.group() == mask or not valid(match.group()):
                return match.group()
            counts[kind] += 1
            return mask

        return one

    text = _EMAIL.sub(replace("pii_emails", EMAIL_MASK), text)
    text = _IPV4.sub(replace("pii_ipv4", IPV4_MASK), text)
    if "::" in text or text.count(":") >= 7:
        text = _IPV6_CANDIDATE.sub(replace("pii_ipv6", IPV6_MASK, _is_ipv6), text)
    return text, counts


def _is_ipv6(candidate: str) -> bool:
    if sum(c.isalnum() for c in candidate) < 2:  # '::' alone, or ':::' in prose
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True
