"""`llmkit generate` and `llmkit chat`: sample from a model, streaming tokens to the terminal.

A model whose tokenizer carries a chat template (every `llmkit finetune` run) is prompted through that
template, exactly as it was trained; a pretrained model continues the raw prompt.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmkit.config import SEED_MAX
from llmkit.data.tokenizer import load_tokenizer
from llmkit.errors import UserError
from llmkit.models import load_trained_model, model_context
from llmkit.runs import find_tokenizer_dir, refuse_scoring_model, resolve_model_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0

    def check(self) -> None:
        wrong = [
            f"--{name} {value:g} (need {need})"
            for name, value, ok, need in (
                ("max-new-tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1"),
                ("temperature", self.temperature, self.temperature >= 0, ">= 0; 0 is greedy"),
                ("top-k", self.top_k, self.top_k >= 0, ">= 0; 0 keeps every token"),
                ("top-p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
            )
            if not ok
        ]
        if wrong:
            raise UserError("; ".join(wrong))


def check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed {seed}: give a number from 0 to {SEED_MAX}")


@dataclass
class Generator:
    model: Any
    tokenizer: PreTrainedTokenizerBase
    stop_ids: list[int]

    @property
    def is_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_ids(self, prompt: str, raw: bool) -> list[int]:
        if self.is_chat and not raw:
            return list(self.chat_ids([{"role": "user", "content": prompt}]))
        ids = self.tokenizer(prompt)["input_ids"]
        # Trained documents follow a boundary token; start the prompt the same way when the tokenizer does not.
        bos = self.tokenizer.bos_token_id
        return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else list(ids)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def context(self) -> int:
        return model_context(self.model)

    def room(self, ids: list[int], sampling: Sampling) -> int:
        """New tokens that fit after `ids` in the model's context: at most max_new_tokens, with a note when fewer."""
        context = self.context
        if not context:
            return sampling.max_new_tokens
        if len(ids) >= context:
            raise UserError(
                f"the prompt is {len(ids)} tokens, the model's context is {context}: nothing fits after it; "
                "shorten the prompt"
            )
        room = min(sampling.max_new_tokens, context - len(ids))
        if room < sampling.max_new_tokens:
            print(
                f"note: generating at most {room} tokens: the prompt ({len(ids)}) and the answer must fit the "
                f"model's context of {context} tokens",
                file=sys.stderr,
                flush=True,
            )
        return room

    def fit_history(self, history: list[dict[str, str]], sampling: Sampling) -> list[int]:
        """The chat prompt, dropping the oldest turns (never the system message) until the conversation leaves
        room for an answer of max_new_tokens (at most half the context)."""
        context = self.context
        keep = 1 if history and history[0]["role"] == "system" else 0
        ids = self.chat_ids(history)
        if not context:
            return ids
        budget = context - min(sampling.max_new_tokens, context // 2)
        dropped = 0
        while len(ids) > budget and len(history) - keep > 1:
            del history[keep]
            dropped += 1
            ids = self.chat_ids(history)
        if dropped:
            print(
                f"(dropped the {dropped} oldest message(s) to fit the model's context of {context} tokens)",
                file=sys.stderr,
                flush=True,
            )
        return ids

    def complete(self, ids: list[int], sampling: Sampling, stream: bool, stop: Callable[[], bool] | None = None) -> str:
        """The answer after `ids`; `stop()` true ends it early (the tokens so far are the answer)."""
        from transformers import StoppingCriteriaList, TextStreamer

        max_new_tokens = self.room(ids, sampling)
        input_ids = torch.tensor([ids])
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        options = (
            {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
            if sampling.temperature > 0
            else {"do_sample": False}
        )
        output = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_ids,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Asked(stop)] if stop else []),
            **options,
        )
        return str(self.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True))


class _Asked:
    """A stopping criterion true once `stop()` is (Ctrl-C in a chat)."""

    def __init__(self, stop: Callable[[], bool]) -> None:
        self.stop = stop

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.stop(), dtype=torch.bool, device=input_ids.device)


@contextmanager
def ctrl_c_ends_the_answer() -> Iterator[threading.Event]:
    """While a chat answer streams, the first Ctrl-C ends the answer (the chat goes on); a second one interrupts."""
    pressed = threading.Event()

    def press(signum: int, frame: Any) -> None:
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.set()

    previous = signal.signal(signal.SIGINT, press)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def load_generator(model_path: str | Path) -> Generator:
    model_dir = resolve_model_dir(model_path)
    refuse_scoring_model(model_dir, "used to generate")
    tokenizer = load_tokenizer(find_tokenizer_dir(model_dir))
    model = load_trained_model(model_dir).eval()
    vocab = tokenizer.get_vocab()
    stops = {int(tokenizer.eos_token_id)} | {vocab[token] for token in END_OF_TURN if token in vocab}
    return Generator(model, tokenizer, sorted(stops))


def generate_text(
    model_path: str | Path,
    prompt: str,
    sampling: Sampling,
    seed: int | None = None,
    raw: bool = False,
    stream: bool = True,
) -> str:
    """The model's answer to `prompt` (chat models) or its continuation (pretrained models)."""
    sampling.check()
    check_seed(seed)
    generator = load_generator(model_path)
    if seed is not None:
        torch.manual_seed(seed)
    ids = generator.prompt_ids(prompt, raw)
    if stream:
        sys.stdout.write(prompt if raw or not generator.is_chat else "")
        sys.stdout.flush()
    return generator.complete(ids, sampling, stream)


COMMANDS = "/reset clears the conversation, /exit leaves; Ctrl-C ends an answer"


def chat_loop(
    model_path: str | Path,
    sampling: Sampling,
    system: str | None,
    read: Callable[[str], str] = input,
    seed: int | None = None,
) -> int:
    """A REPL over the model's own chat template; returns the number of turns. A line that is one /word is a
    command (COMMANDS); Ctrl-C while the model answers ends the answer, at the prompt it leaves."""
    sampling.check()
    check_seed(seed)
    generator = load_generator(model_path)
    if not generator.is_chat:
        raise UserError(f"{model_path}: the tokenizer has no chat template; use `llmkit generate` for this model")
    if seed is not None:
        torch.manual_seed(seed)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    turns = 0
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if system else []
            print("(conversation cleared)", file=sys.stderr, flush=True)
            continue
        if re.fullmatch(r"/(\w+|\?)", line):
            unknown = "" if line in ("/help", "/?") else f"unknown command {line}; "
            print(f"({unknown}{COMMANDS})", file=sys.stderr, flush=True)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids = generator.fit_history(history, sampling)
        if generator.context and len(ids) >= generator.context:  # the new message alone fills it
            history.pop()
            print(
                f"(that message is too long for the model's context of {generator.context} tokens; shorten it)",
                file=sys.stderr,
                flush=True,
            )
            continue
        with ctrl_c_ends_the_answer() as pressed:
            sys.stdout.write("model> ")
            sys.stdout.flush()
            answer = generator.complete(ids, sampling, stream=True, stop=pressed.is_set)
        if pressed.is_set():
            print("\n(answer stopped: Ctrl-C)", file=sys.stderr, flush=True)
        history.append({"role": "assistant", "content": answer.strip()})
        turns += 1
    return turns
