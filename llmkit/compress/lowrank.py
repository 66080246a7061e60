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

from pathlib import Path
from typing import Any

import torch

from llmkit.errors import UserError
from llmkit.factored import PROJECTIONS, densify, projection_weight, replace_module, save_factored


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
        weight, bias, conv = projection_weight(module)
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
        replace_module(model, name, torch.nn.Sequential(first, second))
        ranks[name] = r
    return ranks


def factor_directory(
    source: str,
    out: Path,
    rank: int | None,
    energy: float | None,
    dense: bool,
    data: str | None,
    overwrite: bool,
    encoding: str | None = None,
) -> dict[str, Any]:
    """`llmkit factor`: load, factor, measure (parameters, held-out perplexity when `data` is given), save."""
    from llmkit.atomic import atomic_directory, write_json
    from llmkit.compress.prune import calibration_text, open_source, parameters, perplexity
    from llmkit.models import model_context
    from llmkit.outputs import output_lock

    if encoding and not data:
        raise UserError(f"--encoding {encoding} is the encoding of a --data text file: give --data too")
    model_dir, tokenizer, model = open_source(source, out, data, overwrite)
    held_out = calibration_text(data, tokenizer, model_context(model) or 512, 8, encoding=encoding)[1] if data else []
    before_params = parameters(model)
    before = perplexity(model, held_out) if held_out else None
    ranks = factor_model(model, rank, energy)
    if not ranks:
        raise UserError(f"rank {rank or f'for energy {energy}'} saves nothing on any projection of {source}: lower it")
    factored_params = parameters(model)
    after = perplexity(model, held_out) if held_out else None
    report = {
        "source": str(model_dir),
        "out": str(out),
        "rank": rank,
        "energy": energy,
        "ranks": ranks,
        "dense": dense,
        "parameters_before": before_params,
        "parameters_factored": factored_params,
        "held_out_perplexity_before": before,
        "held_out_perplexity_after": after,
    }
    with output_lock(out), atomic_directory(out) as staging:
        if dense:
            densify(model)
            model.save_pretrained(staging, safe_serialization=True)
        else:
            save_factored(model, ranks, staging, {"rank": rank, "energy": energy})
        tokenizer.save_pretrained(staging)
        write_json(staging / "factor_report.json", report)
    return report
