"""Checks shared by the tests of what a GPU user gets, run on the CPU (test_gpu_defaults*.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from llmkit.data.store import open_dataset
from llmkit.losses import causal_lm_nll
from llmkit.train.loader import validation_batches

# torch.compile with inductor and bf16 autocast: what a CUDA run gets by default.
GPU_DEFAULTS = ["--compile", "--precision", "bf16", "--set", "train.read_ahead=true"]
# The same graph traced without generating code: for the paths whose compiled step differs only in the loss.
TRACED = [*GPU_DEFAULTS, "--set", "train.compile_backend=aot_eager"]


def plain_load(model_dir: Path, base: Path | None = None) -> torch.nn.Module:
    """A saved model as plain transformers (or peft, for an adapter) loads it, refusing any missing or unexpected
    key: a state dict saved from a wrapped model (`_orig_mod.` keys) loads as a freshly initialized one."""
    import transformers

    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        config = PeftConfig.from_pretrained(model_dir)
        model = plain_load(base or Path(config.base_model_name_or_path))
        weights = load_file(model_dir / "adapter_model.safetensors")
        assert weights, f"{model_dir}: the adapter holds no tensors"
        rows = next((w.shape[0] for k, w in weights.items() if "trainable_tokens" in k), None)
        if rows is not None:  # the chat template's tokens: rows beyond the base vocabulary
            model.resize_token_embeddings(max(rows, model.get_input_embeddings().num_embeddings))
        model = get_peft_model(model, config)
        assert set(get_peft_model_state_dict(model)) == set(weights)  # every adapter tensor, nothing else
        assert not set_peft_model_state_dict(model, weights).unexpected_keys
        return model.eval()
    config = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, config.architectures[0])
    model, info = cls.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def val_loss(model: torch.nn.Module, data: Path, micro: int, batches: int) -> float:
    """Mean next-token loss over the validation batches a pretraining run evaluates on."""
    total = count = 0.0
    for batch in validation_batches(open_dataset(data).split("val"), micro, batches):
        with torch.no_grad():
            nll, targets = causal_lm_nll(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        total, count = total + float(nll), count + int(targets)
    return total / count


def assert_one_graph() -> None:
    """Since the counters were cleared: one compiled graph, no recompilation, no graph break."""
    from torch._dynamo.utils import counters

    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])


def clear_compile_counters() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
