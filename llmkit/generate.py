"""`llmkit generate`: sample a continuation from a model, streaming tokens to the terminal."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from llmkit.data.tokenizer import load_tokenizer
from llmkit.errors import UserError
from llmkit.models import load_model
from llmkit.runs import find_tokenizer_dir, resolve_model_dir


def generate_text(
    model_path: str | Path,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: bool = True,
) -> str:
    """The prompt's continuation. Temperature 0 is greedy decoding."""
    from transformers import TextStreamer

    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1:
        raise UserError("need temperature >= 0, 0 < top-p <= 1, top-k >= 0 and max-new-tokens >= 1")
    model_dir = resolve_model_dir(model_path)
    tokenizer = load_tokenizer(find_tokenizer_dir(model_dir))
    model = load_model(model_dir).eval()
    if seed is not None:
        torch.manual_seed(seed)

    ids = tokenizer(prompt)["input_ids"]
    # Trained documents follow a boundary token; start the prompt the same way when the tokenizer does not.
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    input_ids = torch.tensor([ids])
    streamer = None
    if stream:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        streamer=streamer,
        **(sampling if temperature > 0 else {"do_sample": False}),
    )
    return str(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True))
