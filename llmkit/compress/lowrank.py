"""Low-rank factorization: every projection of every block, W (out x in) ~ B A with B = U_r S_r^1/2 (out x r) and
A = S_r^1/2 V_r^T (r x in), the truncated SVD, at a fixed rank or the smallest rank keeping a share of W's energy
(sum of squared singular values). A matrix is factored only where r (in + out) < in x out, i.e. where it saves.

Two outputs, and where each loads:

* factored (default): the two factors replace the projection (`Linear(in, r)` then `Linear(r, out)`), so the file is
  smaller and a forward pass does fewer multiply-adds. This is not an architecture transformers knows: the directory
  holds `lowrank.json` (the rank of every factored module) beside standard safetensors, and llmkit's loader rebuilds
  it (`llmkit eval`, `generate`, `export --format hf` writes it dense for other tools). Plain transformers refuses it.
* `--dense`: the truncated product B A written back as ordinary weights: loads in plain transformers, vLLM, GGUF
  export and everything else, with the factored model's quality but the original's size and speed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import UserError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "c_attn", "c_proj", "c_fc")  # fmt: skip
MANIFEST = "lowrank.json"


def rank_for(singular: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return min(rank, singular.numel())
    assert energy is not None
    share = torch.cumsum(singular.double() ** 2, 0) / (singular.double() ** 2).sum()
    return int(torch.searchsorted(share, torch.tensor(energy, dtype=torch.float64)).item()) + 1


def factor_model(model: Any, rank: int | None = None, energy: float | None = None) -> dict[str, int]:
    """Replace every projection that a rank-r factorization makes smaller; returns {module name: rank}."""
    if (rank is None) == (energy is None):
        raise UserError("give one of --rank or --energy")
    if energy is not None and not 0 < energy < 1:
        raise UserError(f"--energy {energy}: a share of the squared singular values, between 0 and 1 (0.9 keeps 90%)")
    if rank is not None and rank < 1:
        raise UserError(f"--rank {rank}: must be at least 1")
    ranks: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in PROJECTIONS:
            continue
        weight, bias, conv = _weight(module)
        if weight is None:
            continue
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        r = rank_for(s, rank, energy)
        out_features, in_features = weight.shape
        if r * (in_features + out_features) >= in_features * out_features:
            continue  # factoring would not save anything
        root = s[:r].sqrt()
        first = torch.nn.Linear(in_features, r, bias=False)
        second = torch.nn.Linear(r, out_features, bias=bias is not None)
        first.weight.data = (root[:, None] * vh[:r]).to(weight.dtype)
        second.weight.data = (u[:, :r] * root[None, :]).to(weight.dtype)
        if bias is not None:
            second.bias.data = bias.detach().clone()
        _replace(model, name, torch.nn.Sequential(first, second))
        ranks[name] = r
    return ranks


def _weight(module: Any) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """A projection's weight as [out, in] (GPT-2's Conv1D stores [in, out]), its bias, and whether it is a Conv1D."""
    if isinstance(module, torch.nn.Linear):
        return module.weight.data, module.bias, False
    if type(module).__name__ == "Conv1D":
        return module.weight.data.T, module.bias, True
    return None, None, False


def _replace(model: Any, name: str, new: Any) -> None:
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
            _replace(model, name, dense)


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
        weight, bias, _ = _weight(module)
        if weight is None:
            raise UserError(f"{model_dir}/{MANIFEST}: {name} is not a projection of this architecture")
        out_features, in_features = weight.shape
        pair = torch.nn.Sequential(torch.nn.Linear(in_features, rank, bias=False),
                                   torch.nn.Linear(rank, out_features, bias=bias is not None))  # fmt: skip
        _replace(model, name, pair.to(weight.dtype))
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


def factor_directory(source: str, out: Path, rank: int | None, energy: float | None, dense: bool,
                     data: str | None, overwrite: bool) -> dict[str, Any]:  # fmt: skip
    """`llmkit factor`: load, factor, measure (parameters, held-out perplexity when `data` is given), save."""
    from llmkit.atomic import atomic_directory, write_json
    from llmkit.compress.prune import calibration_text, open_source, parameters, perplexity
    from llmkit.models import model_context
    from llmkit.outputs import output_lock

    model_dir, tokenizer, model = open_source(source, out, data, overwrite)
    held_out = calibration_text(data, tokenizer, model_context(model) or 512, 8)[1] if data else []
    before_params = parameters(model)
    before = perplexity(model, held_out) if held_out else None
    ranks = factor_model(model, rank, energy)
    if not ranks:
        raise UserError(f"rank {rank or f'for energy {energy}'} saves nothing on any projection of {source}: lower it")
    factored_params = parameters(model)
    after = perplexity(model, held_out) if held_out else None
    report = {"source": str(model_dir), "out": str(out), "rank": rank, "energy": energy, "ranks": ranks,
              "dense": dense, "parameters_before": before_params, "parameters_factored": factored_params,
              "held_out_perplexity_before": before, "held_out_perplexity_after": after}  # fmt: skip
    with output_lock(out), atomic_directory(out) as staging:
        if dense:
            densify(model)
            model.save_pretrained(staging, safe_serialization=True)
        else:
            save_factored(model, ranks, staging, {"rank": rank, "energy": energy})
        tokenizer.save_pretrained(staging)
        write_json(staging / "factor_report.json", report)
    return report
