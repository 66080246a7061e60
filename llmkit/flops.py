"""Counts shared by `llmkit plan` and training: parameters, training FLOPs per token, devices' peaks.

A leaf module (it imports nothing of llmkit), so the plan and the training loop use one formula without importing
each other. The formula and its sources are in docs/plan.md.
"""

from __future__ import annotations

import re
from typing import Any

GIB = 2**30
# Dense bf16 tensor-core peak (FLOP/s) and memory per GPU type (NVIDIA's data sheets; B200 as in HGX, at 1 kW).
GPU_TYPES: dict[str, tuple[float, float]] = {
    "b200": (2250e12, 180 * GIB),
    "h200": (989e12, 141 * GIB),
    "h100-nvl": (835e12, 94 * GIB),
    "h100-pcie": (756e12, 80 * GIB),
    "h100": (989e12, 80 * GIB),  # SXM
    "a100": (312e12, 80 * GIB),
    "a100-40": (312e12, 40 * GIB),
    "l40s": (362e12, 48 * GIB),
    "l40": (181e12, 48 * GIB),
    "a10": (125e12, 24 * GIB),
    "l4": (121e12, 24 * GIB),
    "rtx4090": (165e12, 24 * GIB),
    "v100": (125e12, 32 * GIB),
}


def device_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a CUDA device from its name ("NVIDIA H100 80GB HBM3" -> h100, "NVIDIA H100 PCIe" ->
    h100-pcie; the Grace superchips GH200 and GB200 as their GPU), None when unknown. A type is a whole word: an L40
    is not an L4. A form (pcie, nvl) must be named too; a size (a100-40) changes the memory, not the peak."""
    name = device_name.lower().replace("rtx ", "rtx")
    for gpu_type, (peak, _) in GPU_TYPES.items():
        chip, *form = gpu_type.split("-")
        if re.search(rf"(?<![a-z0-9])g?{chip}(?![0-9])", name) and all(
            word.isdigit() or re.search(rf"(?<![a-z0-9]){word}(?![a-z0-9])", name) for word in form
        ):
            return peak
    return None


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters, counting tied weights once (and whole tensors under ZeRO-3 sharding)."""
    seen: set[int] = set()
    trainable = total = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        count = getattr(parameter, "ds_numel", None) or parameter.numel()
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def matmul_parameters(model: Any, total: int) -> int:
    """The parameters that multiply each token: all but the input embedding (a lookup), unless the output head shares
    it, and, in a mixture of experts, but the experts a token is not routed to."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    return total - (0 if tied else _numel(embedding)) - idle_expert_parameters(model)


def idle_expert_parameters(model: Any) -> int:
    """Expert weights a token does not use: (experts - top k) / experts of every parameter under an `experts` module."""
    config = getattr(model, "config", None)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not (isinstance(experts, int) and isinstance(top_k, int) and 0 < top_k < experts):
        return 0
    expert_weights = sum(_numel(p) for name, p in model.named_parameters() if "experts" in name.split(".")[:-1])
    return expert_weights * (experts - top_k) // experts


def _numel(parameter: Any) -> int:
    return int(getattr(parameter, "ds_numel", None) or parameter.numel())


def model_shape(config: Any) -> tuple[int, int]:
    """(layers, width) from a transformers config of any naming convention."""
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 0)
    width = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
    return layers, width


def training_flops_per_token(
    matmul: int, trainable: int, layers: int, width: int, sequence: int, gradient_checkpointing: bool = False
) -> float:
    """2N forward + 2N backward through activations + 2 min(N, trainable) for weight gradients, another 2N forward
    with gradient checkpointing, and attention's 12 * layers * sequence * width."""
    flops = 4 * matmul + 2 * min(matmul, trainable) + (2 * matmul if gradient_checkpointing else 0)
    return float(flops + 12 * layers * sequence * width)


def model_flops_per_token(model: Any, sequence: int, gradient_checkpointing: bool = False) -> float:
    """Training FLOPs per token of a real model, by the plan's formula."""
    trainable, total = count_parameters(model)
    layers, width = model_shape(model.config)
    matmul = matmul_parameters(model, total)
    return training_flops_per_token(matmul, trainable, layers, width, sequence, gradient_checkpointing)
