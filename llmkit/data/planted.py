"""A corpus with planted near-duplicates of known truth, to measure near-dedup's precision and recall.

Originals are paragraphs of the built-in story grammar (many share phrases, as web pages of one site do, which is
what makes precision hard). A share of them gets one copy, changed in one of three ways: a few words edited,
the paragraphs reordered, or boilerplate (navigation and copyright lines) around it. Copies sit later in the
stream than their original, so a deduplicator that keeps the first of a group keeps the original.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llmkit.data.corpus import BUILTIN_CORPORA, generate

KINDS = ("edit", "reorder", "boilerplate")
HEADERS = ("Home | News | About us | Contact", "Skip to main content. Menu. Search this site.", "Log in or register")
FOOTERS = (
    "Copyright 2024 Example Media Group. All rights reserved.",
    "Share this story: Facebook, Twitter, e-mail. Related stories below.",
    "Subscribe to our newsletter for more stories every week.",
)


@dataclass
class PlantedCorpus:
    texts: list[str]
    copies: dict[int, int]  # index of a planted copy -> index of its original
    kinds: dict[int, str]  # index of a planted copy -> how it was changed
    related: set[int]  # pages sharing half their paragraphs with an earlier one: not duplicates, must be kept


def planted_corpus(
    originals: int, share: float = 0.3, related: float = 0.1, paragraphs: int = 6, seed: int = 0
) -> PlantedCorpus:
    """`originals` pages; `share` of them get a changed copy, `related` of them a page that shares half their
    paragraphs (the hard negatives: a near-duplicate finder must keep those)."""
    rng = random.Random(seed)
    stories = generate(BUILTIN_CORPORA["stories"], 2 * originals * paragraphs, seed)
    texts = ["\n\n".join(next(stories).text for _ in range(paragraphs)) for _ in range(originals)]
    vocabulary = sorted({word for text in texts[:50] for word in text.split()})
    entries: list[tuple[int, str]] = [(original, "") for original in range(originals)]  # (original, change)
    planned = [
        (o, KINDS[n % len(KINDS)]) for n, o in enumerate(sorted(rng.sample(range(originals), round(share * originals))))
    ]
    planned += [(o, "related") for o in sorted(rng.sample(range(originals), round(related * originals)))]
    for original, kind in planned:
        after = entries.index((original, "")) + 1  # a copy comes later than its original
        entries.insert(rng.randint(after, len(entries)), (original, kind))
    position = {original: index for index, (original, kind) in enumerate(entries) if not kind}
    copies = {index: position[o] for index, (o, kind) in enumerate(entries) if kind and kind != "related"}
    kinds = {index: kind for index, (_, kind) in enumerate(entries) if kind and kind != "related"}
    related_pages = {index for index, (_, kind) in enumerate(entries) if kind == "related"}

    def page(original: int, kind: str) -> str:
        if kind == "related":  # half the paragraphs replaced by new stories
            parts = texts[original].split("\n\n")
            return "\n\n".join(p if i % 2 else next(stories).text for i, p in enumerate(parts))
        return _change(texts[original], kind, vocabulary, rng) if kind else texts[original]

    return PlantedCorpus([page(original, kind) for original, kind in entries], copies, kinds, related_pages)


def _change(text: str, kind: str, vocabulary: list[str], rng: random.Random) -> str:
    if kind == "reorder":
        parts = text.split("\n\n")
        while len(parts) > 1 and parts == text.split("\n\n"):
            rng.shuffle(parts)
        return "\n\n".join(parts)
    if kind == "boilerplate":
        return f"{rng.choice(HEADERS)}\n\n{text}\n\n{rng.choice(FOOTERS)}"
    words = text.split(" ")
    for _ in range(max(1, len(words) // 100)):  # about 1% of the words replaced, deleted or inserted
        at = rng.randrange(len(words))
        action = rng.randrange(3)
        if action == 0:
            words[at] = rng.choice(vocabulary)
        elif action == 1 and len(words) > 1:
            del words[at]
        else:
            words.insert(at, rng.choice(vocabulary))
    return " ".join(words)


def graded_copies(originals: int, paragraphs: int = 6, seed: int = 0) -> PlantedCorpus:
    """`originals` pages, each followed later by one copy with a share of its words replaced, spread so the copies'
    word-5-gram Jaccard similarities to their originals cover about 0.4 to 1 evenly: recall by similarity."""
    rng = random.Random(seed)
    stories = generate(BUILTIN_CORPORA["stories"], originals * paragraphs, seed)
    texts = ["\n\n".join(next(stories).text for _ in range(paragraphs)) for _ in range(originals)]
    vocabulary = sorted({word for text in texts[:50] for word in text.split()})
    entries = [(original, False) for original in range(originals)]
    for original in range(originals):
        after = entries.index((original, False)) + 1
        entries.insert(rng.randint(after, len(entries)), (original, True))
    position = {original: index for index, (original, copy) in enumerate(entries) if not copy}

    def copy_of(text: str) -> str:
        words = text.split(" ")
        # k scattered replacements leave about (n - 5k) / (n + 5k) of the 5-gram sets shared: k from 1 to n / 12
        for at in rng.sample(range(len(words)), rng.randint(1, len(words) // 12)):
            words[at] = rng.choice(vocabulary)
        return " ".join(words)

    pages = [copy_of(texts[original]) if copy else texts[original] for original, copy in entries]
    copies = {index: position[original] for index, (original, copy) in enumerate(entries) if copy}
    return PlantedCorpus(pages, copies, dict.fromkeys(copies, "graded"), set())
