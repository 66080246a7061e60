"""Chat templates and the loss mask: what the model is trained on is exactly what it will see at inference.

llmkit uses the tokenizer's own template when it has one, else a named built-in. The template is stored in
the tokenizer it trains with (and so in every export), so `generate`, `chat` and any other tool format
prompts the same way. The loss mask is computed from character spans of the rendered conversation: a token
is a target when it starts inside an assistant turn (its content and its end-of-turn marker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llmkit.data.formats import Example
from llmkit.errors import UserError
from llmkit.losses import IGNORE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN_TEMPLATES: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    # name: (Jinja template, special tokens it needs, end-of-turn token; None means the tokenizer's EOS)
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
        " + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        ("<|im_start|>", "<|im_end|>"),
        "<|im_end|>",
    ),
    "llama3": (
        "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}",
        (),
        None,
    ),
}


@dataclass(frozen=True)
class ChatSetup:
    name: str  # "tokenizer" for the tokenizer's own template
    added_tokens: int
    stop_token_ids: tuple[int, ...]


def setup_chat_template(tokenizer: PreTrainedTokenizerBase, choice: str) -> ChatSetup:
    """Give `tokenizer` the chat template to train with; add the special tokens a built-in one needs."""
    if choice == "auto" and getattr(tokenizer, "chat_template", None):
        # its own template: a turn ends at EOS, or at the end-of-turn marker the template writes (a model fine-tuned
        # again, as SFT -> DPO or GRPO, keeps stopping where its answers end)
        template, vocab = str(tokenizer.chat_template), tokenizer.get_vocab()
        ends = {vocab[end] for _, _, end in BUILTIN_TEMPLATES.values() if end and end in vocab and end in template}
        return ChatSetup("tokenizer", 0, tuple(sorted({int(tokenizer.eos_token_id), *ends})))
    name = "chatml" if choice == "auto" else choice
    template, specials, end_of_turn = BUILTIN_TEMPLATES[name]
    missing = [token for token in specials if token not in tokenizer.get_vocab()]
    added = tokenizer.add_special_tokens({"additional_special_tokens": missing}) if missing else 0
    tokenizer.chat_template = template
    stops = {int(tokenizer.eos_token_id)}
    if end_of_turn is not None:
        stops.add(tokenizer.get_vocab()[end_of_turn])
    return ChatSetup(name, added, tuple(sorted(stops)))


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray  # int64 token ids
    labels: np.ndarray  # int64 targets, IGNORE where not trained
    truncated: bool

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def trainable(self) -> int:
        # position t predicts t+1, so the first label never counts
        return int((self.labels[1:] != IGNORE).sum())


def encode_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int, train_on_prompt: bool
) -> Encoded:
    """Token ids and loss labels for one example."""
    eos = int(tokenizer.eos_token_id)
    if example.is_chat:
        ids, trained = _encode_chat(tokenizer, example, train_on_prompt)
    elif example.prompt or example.completion:
        prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [eos]
        ids = prompt + completion
        trained = [train_on_prompt] * len(prompt) + [True] * len(completion)
    else:
        ids = tokenizer(example.text, add_special_tokens=False)["input_ids"] + [eos]
        trained = [True] * len(ids)
    truncated = len(ids) > max_length
    ids, trained = ids[:max_length], trained[:max_length]
    array = np.asarray(ids, dtype=np.int64)
    labels = np.where(np.asarray(trained, dtype=bool), array, IGNORE)
    return Encoded(array, labels, truncated)


def _encode_chat(
    tokenizer: PreTrainedTokenizerBase, example: Example, train_on_prompt: bool
) -> tuple[list[int], list[bool]]:
    messages = list(example.messages)
    text = str(tokenizer.apply_chat_template(messages, tokenize=False))
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = str(
            tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
        )
        through = str(tokenizer.apply_chat_template(messages[: k + 1], tokenize=False))
        if not (through.startswith(before) and text.startswith(through)):
            raise UserError(
                f"{example.where}: the chat template does not render turns as prefixes of each other, so the "
                "assistant turns cannot be located; choose a built-in finetune.chat_template"
            )
        spans.append((len(before), len(through)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [train_on_prompt or any(a <= start < b for a, b in spans) for start, _ in encoding["offset_mapping"]]
    return list(encoding["input_ids"]), trained
