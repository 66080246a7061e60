"""The built-in corpus: exact entropy, checked against closed forms and against sampling."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest

from llmkit.data.corpus import STORIES, Grammar, entropy_rate, generate


def binary_entropy(q: float) -> float:
    return -(q * math.log2(q) + (1 - q) * math.log2(1 - q))


def test_uniform_words_of_equal_length() -> None:
    # k equally likely words of L characters: log2(k) bits per document, L characters.
    words = ["abc", "def", "ghi", "jkl", "mno", "pqr", "stu", "vwx"]
    grammar = Grammar(start="S", rules={"S": [(1 / 8, (w,)) for w in words]})
    rate = entropy_rate(grammar)
    assert rate.bits_per_doc == pytest.approx(3.0)
    assert rate.chars_per_doc == pytest.approx(3.0)
    assert rate.bits_per_char == pytest.approx(1.0)


@pytest.mark.parametrize("stop", [0.1, 0.3, 0.5, 0.9])
def test_geometric_run_has_binary_entropy_per_char(stop: float) -> None:
    # "a" repeated until a stop with probability q: length ~ Geometric(q), H(doc) = h(q)/q, E[len] = 1/q,
    # so the entropy rate is exactly the binary entropy h(q) bits per character.
    grammar = Grammar(start="S", rules={"S": [(1 - stop, ("a", "<S>")), (stop, ("a",))]})
    rate = entropy_rate(grammar)
    assert rate.chars_per_doc == pytest.approx(1 / stop)
    assert rate.bits_per_char == pytest.approx(binary_entropy(stop), rel=1e-12)


def test_sampled_information_matches_the_closed_form() -> None:
    grammar = Grammar(start="S", rules={"S": [(0.7, ("ab", "<S>")), (0.3, ("c",))]})
    docs = list(generate(grammar, 20000, seed=1))
    for doc in docs[:50]:
        n = doc.text.count("ab")
        assert doc.bits == pytest.approx(-(n * math.log2(0.7) + math.log2(0.3)))
    empirical = sum(d.bits for d in docs) / sum(len(d.text) for d in docs)
    assert empirical == pytest.approx(entropy_rate(grammar).bits_per_char, rel=0.02)


def test_stories_sample_agrees_with_analytic_rate_and_is_unambiguous() -> None:
    docs = list(generate(STORIES, 5000, seed=0))
    empirical = sum(d.bits for d in docs) / sum(len(d.text) for d in docs)
    assert empirical == pytest.approx(entropy_rate(STORIES).bits_per_char, rel=0.02)
    # One derivation per string: equal strings must carry equal probability.
    bits_by_text: dict[str, set[float]] = defaultdict(set)
    for doc in docs:
        bits_by_text[doc.text].add(round(doc.bits, 9))
    assert all(len(values) == 1 for values in bits_by_text.values())


def test_generation_is_seeded() -> None:
    assert [d.text for d in generate(STORIES, 5, seed=3)] == [d.text for d in generate(STORIES, 5, seed=3)]
    assert [d.text for d in generate(STORIES, 5, seed=3)] != [d.text for d in generate(STORIES, 5, seed=4)]


def test_bad_grammars_are_rejected() -> None:
    with pytest.raises(ValueError, match="sum to"):
        Grammar(start="S", rules={"S": [(0.5, ("a",))]})
    with pytest.raises(ValueError, match="unknown"):
        Grammar(start="S", rules={"S": [(1.0, ("<T>",))]})
    with pytest.raises(ValueError, match="terminate"):
        entropy_rate(Grammar(start="S", rules={"S": [(1.0, ("a", "<S>"))]}))
