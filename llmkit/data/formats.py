"""Fine-tuning data formats: detect or declare them, and normalize every row into one `Example`.

| format             | fields                                                                 |
| ------------------ | ---------------------------------------------------------------------- |
| messages           | `messages`: [{role: system/user/assistant, content}]                    |
| sharegpt           | `conversations`: [{from: system/human/gpt, value}]                       |
| alpaca             | `instruction`, optional `input`, `output` (optional `system`)           |
| prompt_completion  | `prompt`, `completion`                                                   |
| classification     | `text`, `label` (string or int)                                          |
| text               | `text` (continued pretraining: every token is trained)                  |

A column mapping (`finetune.columns: {instruction: question, output: answer}`) renames your fields to these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import UserError

FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "text": ("text",),
}
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}


@dataclass(frozen=True)
class Example:
    """One training row, whatever its source format."""

    where: str  # file:line, for messages
    messages: tuple[dict[str, str], ...] = ()  # chat formats
    prompt: str = ""  # prompt_completion
    completion: str = ""
    text: str = ""  # text and classification
    label: Any = None  # classification
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)


@dataclass(frozen=True)
class RowFormats:
    """A family of row formats: the fields each requires (detection tries them in order) and the row builder."""

    fields: dict[str, tuple[str, ...]]
    build: Callable[[dict[str, Any], str, str], Example]


def detect_format(record: dict[str, Any], where: str, formats: dict[str, tuple[str, ...]] = FORMATS) -> str:
    """The first format whose required fields the record has."""
    for name, required in formats.items():
        if all(key in record for key in required):
            return name
    found = ", ".join(sorted(map(str, record))) or "none"
    raise UserError(
        f"{where}: cannot detect the data format from fields ({found}); expected one of "
        + "; ".join(f"{name}: {', '.join(fields)}" for name, fields in formats.items())
        + ". Map your fields with finetune.columns or declare finetune.format"
    )


def normalize(
    records: Iterator[tuple[dict[str, Any], str]], fmt: str, columns: dict[str, str], formats: RowFormats | None = None
) -> Iterator[tuple[str, Example]]:
    """Yield (format, Example) for every record; the format is detected from the first when `fmt` is auto.
    `formats` replaces the SFT formats of this module (a task's own kinds of rows)."""
    formats = formats or SFT_FORMATS
    if fmt != "auto" and fmt not in formats.fields:
        raise UserError(f"finetune.format {fmt} is not a format of this task; use one of: {', '.join(formats.fields)}")
    rename = {theirs: ours for ours, theirs in columns.items()}
    for record, where in records:
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected an object with named fields, got {type(record).__name__}")
        if rename:
            record = {rename.get(key, key): value for key, value in record.items()}
        if fmt == "auto":
            fmt = detect_format(record, where, formats.fields)
        missing = [key for key in formats.fields[fmt] if key not in record]
        if missing:
            found = ", ".join(sorted(map(str, record))) or "none"
            raise UserError(f"{where}: no '{missing[0]}' field for the {fmt} format (fields found: {found})")
        yield fmt, formats.build(record, fmt, where)


def _example(record: dict[str, Any], fmt: str, where: str) -> Example:
    if fmt == "messages":
        return Example(where, messages=read_turns(record["messages"], "role", "content", where))
    if fmt == "sharegpt":
        return Example(where, messages=read_turns(record["conversations"], "from", "value", where))
    if fmt == "alpaca":
        user = read_text(record, "instruction", where)
        if record.get("input"):
            user = f"{user}\n\n{read_text(record, 'input', where)}"
        turns = [{"role": "system", "content": read_text(record, "system", where)}] if record.get("system") else []
        answer = read_text(record, "output", where)
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return Example(where, messages=tuple(turns))
    if fmt == "prompt_completion":
        prompt, completion = read_text(record, "prompt", where), read_text(record, "completion", where)
        return Example(where, prompt=prompt, completion=completion)
    if fmt == "classification":
        label = record["label"]
        if label is None or isinstance(label, float | bool) or not isinstance(label, str | int):
            raise UserError(f"{where}: field 'label' is {label!r}; labels are strings or integers")
        return Example(where, text=read_text(record, "text", where), label=label)
    return Example(where, text=read_text(record, "text", where))


SFT_FORMATS = RowFormats(FORMATS, _example)


def read_text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' is {type(value).__name__}, expected text")
    return value


def read_turns(turns: Any, role_key: str, content_key: str, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: expected a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            found = ", ".join(sorted(map(str, turn))) if isinstance(turn, dict) else type(turn).__name__
            raise UserError(f"{where}: turn {i} needs '{role_key}' and '{content_key}' (found: {found})")
        role = ROLES.get(str(turn[role_key]).lower())
        if role is None:
            raise UserError(f"{where}: turn {i} has unknown role {turn[role_key]!r} (use system, user or assistant)")
        content = turn[content_key]
        if not isinstance(content, str):
            raise UserError(f"{where}: turn {i} content is {type(content).__name__}, expected text")
        out.append({"role": role, "content": content})
    return tuple(out)
