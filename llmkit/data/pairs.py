"""Preference rows, read and encoded: pairs of answers to one prompt (`{prompt, chosen, rejected}`, or whole
conversations `{chosen, rejected}` that share their beginning, HH-RLHF style: the common prefix is the prompt) and
KTO's single answers labelled desirable or not (`{prompt, completion, label}`).

Each answer is encoded like an SFT row (the chat template, the answer's end-of-turn or EOS trained, the prompt
masked). Training (llmkit.train.tasks.preference, .reward) and evaluation (llmkit.eval.reward) both read pairs here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from llmkit.data.formats import Example, RowFormats, read_text, read_turns
from llmkit.data.templates import Encoded, encode_example
from llmkit.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Answer = str | tuple[dict[str, str], ...]


@dataclass
class Pair:
    """A chosen and a rejected answer to one prompt, encoded; `reference` holds the reference model's summed
    log-probs of both answers once computed."""

    chosen: Encoded
    rejected: Encoded  # KTO: the mismatched sequence (the prompt with another row's completion)
    where: str
    reference: tuple[float, float] | None = None
    desirable: bool | None = None  # KTO: the row's label

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def _pair_example(record: dict[str, Any], fmt: str, where: str) -> Example:
    if fmt == "conversation_pair":
        prompt, chosen, rejected = _split_shared_prefix(record, where)
    else:
        prompt = (
            record["prompt"]
            if isinstance(record["prompt"], str)
            else read_turns(record["prompt"], "role", "content", where)
        )
        chosen, rejected = _answer(record, "chosen", where), _answer(record, "rejected", where)
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not _answer_text(answer).strip():
            raise UserError(f"{where}: '{name}' is empty; every pair needs two non-empty answers")
    if chosen == rejected:
        raise UserError(f"{where}: 'chosen' and 'rejected' are identical, so there is nothing to prefer; drop the row")
    messages = prompt if isinstance(prompt, tuple) else ()
    return Example(
        where,
        messages=messages,
        prompt=prompt if isinstance(prompt, str) else "",
        extra={"chosen": chosen, "rejected": rejected},
    )


def _answer(record: dict[str, Any], key: str, where: str) -> Answer:
    value = record[key]
    if isinstance(value, list):
        return read_turns(value, "role", "content", where)
    return read_text(record, key, where)


def _answer_text(answer: Answer) -> str:
    return answer if isinstance(answer, str) else "".join(turn["content"] for turn in answer)


def _split_shared_prefix(record: dict[str, Any], where: str) -> tuple[str | tuple[dict[str, str], ...], Answer, Answer]:
    """A whole-conversation pair: the prompt is what both conversations share (whole turns, or whole words)."""
    chosen, rejected = _answer(record, "chosen", where), _answer(record, "rejected", where)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise UserError(f"{where}: 'chosen' and 'rejected' must both be text or both be message lists")
    if isinstance(chosen, tuple) and isinstance(rejected, tuple):
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise UserError(
                f"{where}: 'chosen' and 'rejected' share no first turn, so there is no prompt; give a 'prompt' field"
            )
        for name, answer in (("chosen", chosen[shared:]), ("rejected", rejected[shared:])):
            if answer and answer[0]["role"] != "assistant":
                raise UserError(
                    f"{where}: where the conversations part, '{name}' continues with a "
                    f"{answer[0]['role']} turn; the answers must be assistant turns"
                )
        return chosen[:shared], chosen[shared:], rejected[shared:]
    assert isinstance(chosen, str) and isinstance(rejected, str)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    cut = max(chosen.rfind(" ", 0, shared + 1), chosen.rfind("\n", 0, shared + 1))  # never split a word
    if cut <= 0:
        raise UserError(
            f"{where}: 'chosen' and 'rejected' share no beginning, so there is no prompt; give a 'prompt' field"
        )
    return chosen[:cut], chosen[cut:], rejected[cut:]


PAIR_FORMATS = RowFormats(
    {"preference": ("prompt", "chosen", "rejected"), "conversation_pair": ("chosen", "rejected")}, _pair_example
)


def _unpaired_example(record: dict[str, Any], fmt: str, where: str) -> Example:
    label = record["label"]
    if not isinstance(label, bool):
        raise UserError(f"{where}: field 'label' is {label!r}; KTO labels are true (desirable) or false (undesirable)")
    prompt = (
        record["prompt"]
        if isinstance(record["prompt"], str)
        else read_turns(record["prompt"], "role", "content", where)
    )
    completion = _answer(record, "completion", where)
    if not _answer_text(completion).strip():
        raise UserError(f"{where}: 'completion' is empty; every row needs a non-empty answer")
    messages = prompt if isinstance(prompt, tuple) else ()
    return Example(
        where,
        messages=messages,
        prompt=prompt if isinstance(prompt, str) else "",
        label=label,
        extra={"completion": completion},
    )


UNPAIRED_FORMATS = RowFormats({"unpaired": ("prompt", "completion", "label")}, _unpaired_example)


def encode_unpaired(tokenizer: PreTrainedTokenizerBase, rows: list[Example], max_length: int, group: int) -> list[Pair]:
    """Each row with its mismatched sequence: its prompt and the completion of the row before it in its group of
    `group` consecutive rows (the first takes the group's last), as TRL's KTOTrainer pairs them."""
    out = []
    for start in range(0, len(rows), group):
        chunk = rows[start : start + group]
        for i, row in enumerate(chunk):
            other = chunk[i - 1].extra["completion"]
            own, mismatched = (
                encode_example(tokenizer, _answer_row(row, answer), max_length, False)
                for answer in (row.extra["completion"], other)
            )
            if own.trainable == 0 or mismatched.trainable == 0:
                raise UserError(
                    f"{row.where}: the prompt takes all of finetune.max_length={max_length} tokens, leaving none of "
                    "the 'completion'; raise --max-length or shorten the prompt"
                )
            out.append(Pair(own, mismatched, row.where, desirable=bool(row.label)))
    return out


def encode_pair(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> Pair:
    """Both answers encoded as SFT rows of the same prompt: the answer (and its end) trained, the prompt masked."""
    chosen, rejected = (
        encode_example(tokenizer, _answer_row(example, example.extra[k]), max_length, False)
        for k in ("chosen", "rejected")
    )
    for name, encoded in (("chosen", chosen), ("rejected", rejected)):
        if encoded.trainable == 0:
            raise UserError(
                f"{example.where}: the prompt takes all of finetune.max_length={max_length} tokens, leaving none of "
                f"the '{name}' answer; raise --max-length or shorten the prompt"
            )
    if np.array_equal(chosen.ids, rejected.ids):
        raise UserError(
            f"{example.where}: 'chosen' and 'rejected' are identical within finetune.max_length="
            f"{max_length} tokens; raise --max-length or drop the row"
        )
    return Pair(chosen, rejected, example.where)


def _answer_row(example: Example, answer: Answer) -> Example:
    if not example.messages and isinstance(answer, str):
        return Example(example.where, prompt=example.prompt, completion=answer)
    prompt = example.messages or ({"role": "user", "content": example.prompt},)
    turns = ({"role": "assistant", "content": answer},) if isinstance(answer, str) else answer
    return Example(example.where, messages=(*prompt, *turns))
