"""The factored-model format that `llmkit compress lowrank` writes (llmkit.compress.lowrank): each factored
projection stored as its two factors (`Linear(in, r)` then `Linear(r, out)`), with `lowrank.json` (the model type
and every factored module's rank) beside standard safetensors. Loading and densifying live here, below the model
loader that reads such a directory (llmkit.models), and below the compression command that writes one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import UserError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj", "c_fc")
MANIFEST = "lowrank.json"


def projection_weight(module: Any) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """A projection's weight as [out, in] (GPT-2's Conv1D stores [in, out]), its bias, and whether it is a Conv1D."""
    if isinstance(module, torch.nn.Linear):
        return module.weight.data, module.bias, False
    if type(module).__name__ == "Conv1D":
        return module.weight.data.T, module.bias, True
    return None, None, False


def replace_module(model: Any, name: str, new: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def densify(model: Any) -> None:
    """Write every factored projection back as one Linear of the product (same function, plain architecture)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Sequential) and name.rsplit(".", 1)[-1] in PROJECTIONS:
            first: Any = module[0]
            second: Any = module[1]
            dense: Any = torch.nn.Linear(first.in_features, second.out_features, bias=second.bias is not None)
            dense.weight.data = second.weight.data @ first.weight.data
            if second.bias is not None:
                dense.bias.data = second.bias.data.clone()
            if model.config.model_type == "gpt2":  # back to a Conv1D, whose weight is [in, out]
                from transformers.pytorch_utils import Conv1D

                conv = Conv1D(second.out_features, first.in_features)
                conv.weight.data = dense.weight.data.T.contiguous()
                conv.bias.data = dense.bias.data if dense.bias is not None else torch.zeros(second.out_features)
                dense = conv
            replace_module(model, name, dense)


def save_factored(model: Any, ranks: dict[str, int], directory: Path, settings: dict[str, Any]) -> None:
    """The factored model as safetensors, with config.json's model_type renamed so that plain transformers refuses
    the directory loudly (rather than loading the projections it cannot find as random weights)."""
    model.save_pretrained(directory, safe_serialization=True)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    manifest = {"model_type": config["model_type"], "ranks": ranks, **settings}
    config["model_type"] = f"llmkit_lowrank_{config['model_type']}"
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def is_factored(model_dir: Path) -> bool:
    return (Path(model_dir) / MANIFEST).is_file()


def load_factored(model_dir: Path, dtype: Any = None) -> Any:
    """A factored directory: the architecture from config.json, each listed projection rebuilt as its two factors,
    then the weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    manifest = json.loads((Path(model_dir) / MANIFEST).read_text(encoding="utf-8"))
    fields = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    fields.pop("model_type", None)
    config = AutoConfig.for_model(manifest["model_type"], **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    for name, rank in manifest["ranks"].items():
        module = model.get_submodule(name)
        weight, bias, _ = projection_weight(module)
        if weight is None:
            raise UserError(f"{model_dir}/{MANIFEST}: {name} is not a projection of this architecture")
        out_features, in_features = weight.shape
        pair = torch.nn.Sequential(
            torch.nn.Linear(in_features, rank, bias=False), torch.nn.Linear(rank, out_features, bias=bias is not None)
        )
        replace_module(model, name, pair.to(weight.dtype))
    state = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [key for key in missing if not key.endswith("lm_head.weight")]:
        raise UserError(
            f"{model_dir}: weights do not match {MANIFEST} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return model.eval()
