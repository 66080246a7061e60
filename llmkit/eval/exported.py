"""Evaluate what ships: an ONNX export through onnxruntime, a GGUF export through llama.cpp.

`llmkit eval EXPORT_DIR` runs the same data, tasks and gates as on the HF model, with the artifact's own runtime
computing the logits, so a CI gate holds for the file that is deployed. Only the logits come from the runtime:
tokenization is the export's saved tokenizer (the one the model was trained with) and greedy decoding picks the
runtime's most likely token, one full forward per new token (exact, and fast enough for evaluation sets).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from llmkit.export.formats import export_format


def load_for_eval(model_dir: Path) -> Any:
    """The model eval runs: an HF model, or an exported file behind the same small interface."""
    fmt = export_format(model_dir)
    if fmt is None or fmt.reader is None:
        from llmkit.models import load_trained_model

        return load_trained_model(model_dir)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return ExportedLM(fmt.reader(model_dir, config), config, fmt.name)


class ExportedLM:
    """The part of a transformers causal LM that eval uses (call -> logits, greedy generate), over a runtime."""

    def __init__(self, logits: Any, config: Any, runtime: str) -> None:
        self.logits, self.config, self.runtime = logits, config, runtime

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return SimpleNamespace(logits=self.logits(input_ids.cpu(), mask.cpu()))

    def get_input_embeddings(self) -> Any:
        return SimpleNamespace(weight=SimpleNamespace(shape=(self.config.vocab_size,)))

    def to(self, *_: Any, **__: Any) -> ExportedLM:
        return self

    def eval(self) -> ExportedLM:
        return self

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, pad_token_id: int, **_: Any
    ) -> torch.Tensor:
        """Greedy continuation of each (left-padded) row until max_new_tokens or end-of-text, as HF's generate."""
        eos = self.config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        rows = []
        for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True):
            tokens = ids[mask.bool()].tolist()
            new: list[int] = []
            while len(new) < max_new_tokens and not (new and new[-1] in stops):
                sequence = torch.tensor([tokens + new])
                new.append(int(self.logits(sequence, torch.ones_like(sequence))[0, -1].argmax()))
            rows.append(new + [pad_token_id] * (max_new_tokens - len(new)))
        return torch.cat([input_ids.cpu(), torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1)], dim=1)
