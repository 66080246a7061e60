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

import numpy as np
import torch

from llmkit.errors import UserError

# An export format: the file that marks its directory, and the runtime eval runs it in.
RUNTIMES = {"onnx": ("model.onnx", "onnxruntime"), "gguf": ("model.gguf", "llama.cpp")}


def export_format(model_dir: Path) -> str | None:
    """'onnx' or 'gguf' for an export directory that holds one, else None (an HF model)."""
    return next((fmt for fmt, (name, _) in RUNTIMES.items() if (Path(model_dir) / name).is_file()), None)


def runtime_name(fmt: str | None) -> str:
    return RUNTIMES[fmt][1] if fmt else "transformers"


def load_for_eval(model_dir: Path) -> Any:
    """The model eval runs: an HF model, or an exported file behind the same small interface."""
    fmt = export_format(model_dir)
    if fmt is None:
        from llmkit.models import load_trained_model

        return load_trained_model(model_dir)
    from transformers import AutoConfig

    from llmkit.export.onnx import onnx_logits

    config = AutoConfig.from_pretrained(model_dir)
    logits = onnx_logits(model_dir / "model.onnx") if fmt == "onnx" else _llama_cpp_logits(model_dir, config)
    return ExportedLM(logits, config, fmt)


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


def _llama_cpp_logits(model_dir: Path, config: Any) -> Any:
    """Logits of every position from llama.cpp (llama-cpp-python), one row at a time."""
    from llmkit.export.gguf import llama_cpp_missing, quiet_native_stderr

    if llama_cpp_missing():
        raise UserError(
            f"{model_dir}: a GGUF export is evaluated in llama.cpp, and llama-cpp-python is not installed: "
            "pip install llama-cpp-python (or evaluate the HF model it was exported from)"
        )
    from llama_cpp import Llama

    from llmkit.models import model_context

    with quiet_native_stderr():
        llm = Llama(model_path=str(model_dir / "model.gguf"), n_ctx=model_context(config) or 2048, n_batch=512,
                    logits_all=True, verbose=False)  # fmt: skip

    vocab = llm.n_vocab()

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((*ids.shape, max(vocab, config.vocab_size)), dtype=torch.float32)
        out[..., vocab:] = float("-inf")  # embedding rows past the tokenizer: never a token
        for row, (tokens, keep) in enumerate(zip(ids, mask, strict=True)):
            positions = keep.bool().nonzero().flatten()
            if len(positions) == 0:
                continue
            llm.reset()
            with quiet_native_stderr():
                llm.eval(tokens[positions].tolist())
            out[row, positions, :vocab] = torch.from_numpy(np.array(llm.scores[: len(positions)], dtype=np.float32))
        return out[..., : config.vocab_size]

    return run
