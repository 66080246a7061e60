"""`llmkit env`: the versions and devices a bug report needs."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

PACKAGES = (
    "torch",
    "transformers",
    "datasets",
    "tokenizers",
    "accelerate",
    "deepspeed",
    "peft",
    "safetensors",
)


def environment() -> dict[str, str]:
    import torch

    info = {"llmkit": _version("llmkit"), "python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        info[name] = _version(name)
    if torch.cuda.is_available():
        info["cuda"] = str(torch.version.cuda)
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info[f"cuda:{i}"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        info["cuda"] = "no CUDA device"
    info["cpu_threads"] = str(torch.get_num_threads())
    return info


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
