"""The built-in corpus: short stories from a seeded stochastic grammar with a known entropy.

Every document is produced by one derivation of an unambiguous probabilistic grammar, so its exact
probability is the product of the choices made. That gives two exact numbers:

* the entropy rate of the source, E[-log2 p(doc)] / E[chars(doc)], solved in closed form from the
  grammar by two linear systems (expected choice entropy and expected length per nonterminal);
* the empirical floor of a sample, sum(-log2 p(doc)) / sum(chars(doc)), which is what a perfect model
  would score on exactly those documents.

A language model scored in bits per character on this corpus can be compared with that floor.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# A rule maps a nonterminal to weighted alternatives; an alternative is a sequence of parts where
# "<NAME>" refers to a nonterminal and anything else is literal text.
Alternative = tuple[float, tuple[str, ...]]
Rules = dict[str, list[Alternative]]


@dataclass(frozen=True)
class Grammar:
    rules: Rules
    start: str

    def __post_init__(self) -> None:
        for name, alternatives in self.rules.items():
            total = sum(weight for weight, _ in alternatives)
            if not math.isclose(total, 1.0, rel_tol=1e-9):
                raise ValueError(f"rule {name}: weights sum to {total}, not 1")
            for _, parts in alternatives:
                for part in parts:
                    if _is_ref(part) and part[1:-1] not in self.rules:
                        raise ValueError(f"rule {name} refers to unknown {part}")


@dataclass(frozen=True)
class Document:
    text: str
    bits: float  # exact -log2 p(text) under the grammar


def _is_ref(part: str) -> bool:
    return len(part) > 2 and part[0] == "<" and part[-1] == ">"


def _uniform(words: list[str]) -> list[Alternative]:
    if len(set(words)) != len(words):
        raise ValueError(f"duplicate words in {words}")
    return [(1 / len(words), (word,)) for word in words]


def sample(grammar: Grammar, rng: random.Random) -> Document:
    """Draw one document and its exact information content in bits."""
    pieces: list[str] = []
    bits = 0.0
    stack: list[str] = [f"<{grammar.start}>"]
    while stack:
        part = stack.pop()
        if not _is_ref(part):
            pieces.append(part)
            continue
        alternatives = grammar.rules[part[1:-1]]
        weights = [weight for weight, _ in alternatives]
        index = rng.choices(range(len(alternatives)), weights=weights)[0] if len(alternatives) > 1 else 0
        weight, parts = alternatives[index]
        bits -= math.log2(weight)
        stack.extend(reversed(parts))
    return Document("".join(pieces), bits)


def generate(grammar: Grammar, n_docs: int, seed: int) -> Iterator[Document]:
    """A reproducible stream of documents."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        yield sample(grammar, rng)


@dataclass(frozen=True)
class EntropyRate:
    bits_per_doc: float
    chars_per_doc: float

    @property
    def bits_per_char(self) -> float:
        return self.bits_per_doc / self.chars_per_doc


def entropy_rate(grammar: Grammar) -> EntropyRate:
    """Exact expected bits and characters per document, from the grammar alone.

    For each nonterminal A: H(A) = h(A) + sum_B M[A,B] H(B) and L(A) = l(A) + sum_B M[A,B] L(B), where
    h is the entropy of A's own choice, l the expected literal length, and M[A,B] the expected number
    of B in A's chosen alternative. Solving (I - M) x = b gives both; the grammar must terminate with a
    finite expected length (spectral radius of M below 1).
    """
    names = list(grammar.rules)
    index = {name: i for i, name in enumerate(names)}
    n = len(names)
    expected_refs = np.zeros((n, n))
    own_bits = np.zeros(n)
    own_chars = np.zeros(n)
    for name, alternatives in grammar.rules.items():
        i = index[name]
        for weight, parts in alternatives:
            own_bits[i] -= weight * math.log2(weight)
            for part in parts:
                if _is_ref(part):
                    expected_refs[i, index[part[1:-1]]] += weight
                else:
                    own_chars[i] += weight * len(part)
    if max(abs(np.linalg.eigvals(expected_refs))) >= 1:
        raise ValueError("grammar does not terminate with a finite expected length")
    system = np.eye(n) - expected_refs
    bits = np.linalg.solve(system, own_bits)
    chars = np.linalg.solve(system, own_chars)
    start = index[grammar.start]
    return EntropyRate(bits_per_doc=float(bits[start]), chars_per_doc=float(chars[start]))


# --- The stories grammar -------------------------------------------------------------------------
# Unambiguous by construction: every sentence template starts with its own fixed words (or a name,
# which no fixed word equals), slots are single words from disjoint lists, and ending sentences are
# distinct from body sentences. So each story has exactly one derivation and p(story) is exact.

_NAMES = [
    "Tom",
    "Anna",
    "Ben",
    "Lily",
    "Max",
    "Mia",
    "Sam",
    "Zoe",
    "Leo",
    "Ella",
    "Jack",
    "Ruby",
    "Finn",
    "Ivy",
    "Noah",
    "Lucy",
]
_ANIMALS = [
    "cat",
    "dog",
    "bird",
    "fox",
    "rabbit",
    "bear",
    "mouse",
    "duck",
    "frog",
    "owl",
    "horse",
    "lion",
    "tiger",
    "sheep",
    "goat",
    "pig",
]
_ADJECTIVES = [
    "big",
    "small",
    "happy",
    "sad",
    "red",
    "blue",
    "green",
    "old",
    "young",
    "kind",
    "brave",
    "shy",
    "quiet",
    "funny",
    "soft",
    "warm",
]
_PLACES = [
    "park",
    "forest",
    "garden",
    "river",
    "house",
    "school",
    "farm",
    "beach",
    "hill",
    "lake",
    "town",
    "field",
]
_OBJECTS = [
    "ball",
    "apple",
    "box",
    "kite",
    "hat",
    "cake",
    "book",
    "boat",
    "drum",
    "cup",
    "stone",
    "flower",
    "leaf",
    "shell",
    "coin",
    "bell",
]
_VERBS = [
    "found",
    "took",
    "saw",
    "liked",
    "wanted",
    "painted",
    "carried",
    "lost",
    "hid",
    "dropped",
    "shared",
    "opened",
]
_FEELINGS = ["happy", "sad", "tired", "hungry", "scared", "proud", "calm", "excited"]

STORIES = Grammar(
    start="STORY",
    rules={
        "STORY": [(1.0, ("<OPEN>", " ", "<BODY>"))],
        "OPEN": [
            (0.4, ("Once upon a time, there was a ", "<ADJ>", " ", "<ANIMAL>", " named ", "<NAME>", ".")),
            (0.3, ("One day, ", "<NAME>", " the ", "<ANIMAL>", " went to the ", "<PLACE>", ".")),
            (0.3, ("There once lived a ", "<ADJ>", " ", "<ANIMAL>", " near the ", "<PLACE>", ".")),
        ],
        "BODY": [(0.7, ("<SENT>", " ", "<BODY>")), (0.3, ("<SENT>", " ", "<END>"))],
        "SENT": [
            (0.25, ("The ", "<ANIMAL>", " ", "<VERB>", " the ", "<OBJ>", ".")),
            (0.2, ("<NAME>", " ", "<VERB>", " the ", "<ADJ>", " ", "<OBJ>", ".")),
            (0.15, ("It was a ", "<ADJ>", " day at the ", "<PLACE>", ".")),
            (0.15, ("Then ", "<NAME>", " met a ", "<ANIMAL>", " by the ", "<PLACE>", ".")),
            (0.15, ("Everyone felt ", "<FEEL>", ".")),
            (0.1, ("Soon it began to rain.",)),
        ],
        "END": [
            (0.4, ("The end.",)),
            (0.3, ("They lived happily ever after.",)),
            (0.3, ("And ", "<NAME>", " was ", "<FEEL>", " again.")),
        ],
        "NAME": _uniform(_NAMES),
        "ANIMAL": _uniform(_ANIMALS),
        "ADJ": _uniform(_ADJECTIVES),
        "PLACE": _uniform(_PLACES),
        "OBJ": _uniform(_OBJECTS),
        "VERB": _uniform(_VERBS),
        "FEEL": _uniform(_FEELINGS),
    },
)

BUILTIN_CORPORA: dict[str, Grammar] = {"stories": STORIES}


# --- A synthetic chat dataset with a known answer --------------------------------------------------
# Every animal has one colour, so a fine-tuned model's answers can be checked, and conversations of 1 to
# `max_turns` question/answer pairs give the spread of lengths that real chat data has.

_COLORS = [
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "brown",
    "gray",
    "orange",
    "pink",
    "purple",
    "gold",
    "silver",
    "teal",
    "navy",
    "beige",
]
ANIMAL_COLORS = dict(zip(_ANIMALS, _COLORS, strict=True))


def color_chats(n_rows: int, seed: int, max_turns: int = 2) -> Iterator[dict[str, list[dict[str, str]]]]:
    """Rows in the `messages` format: "What color is the fox?" / "The fox is yellow.", 1 to max_turns pairs."""
    rng = random.Random(seed)
    for _ in range(n_rows):
        turns = []
        for _ in range(rng.randint(1, max_turns)):
            animal = rng.choice(_ANIMALS)
            turns += [
                {"role": "user", "content": f"What color is the {animal}?"},
                {"role": "assistant", "content": f"The {animal} is {ANIMAL_COLORS[animal]}."},
            ]
        yield {"messages": turns}


def story_preference_pairs(n_rows: int, seed: int) -> Iterator[dict[str, str]]:
    """Rows in the `preference` format whose answer is known: the prompt is a sentence of a built-in story, the
    chosen answer the sentence that follows it, the rejected answer the same words in a shuffled (ungrammatical)
    order. A model of the grammar prefers the chosen answer; an untrained one cannot tell them apart."""
    rng = random.Random(seed)
    made = 0
    while made < n_rows:
        document = sample(STORIES, rng)
        sentences = [s.strip() + "." for s in document.text.replace("\n", " ").split(".") if s.strip()]
        for before, sentence in zip(sentences, sentences[1:], strict=False):
            words = sentence.rstrip(".").split()
            if len(words) < 4 or made >= n_rows:
                continue
            shuffled = words[:]
            while shuffled == words:
                rng.shuffle(shuffled)
            yield {"prompt": before, "chosen": " " + sentence, "rejected": " " + " ".join(shuffled) + "."}
            made += 1
