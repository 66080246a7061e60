"""ONNX: the causal LM as `model.onnx` (input_ids, attention_mask -> logits; batch and length dynamic), exported
with PyTorch's dynamo exporter, run with onnxruntime; `int8` adds dynamic quantization of the matrix weights
(onnxruntime's quantize_dynamic: int8 weights, activations quantized on the fly) for CPU inference.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.errors import UserError


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _require(module: str, extra: str = "export") -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"--format onnx needs {module}, which is not installed: pip install 'llmkit[{extra}]'")


def write_onnx(model: Any, path: Path, quantize: str | None) -> None:
    for module in ("onnx", "onnxscript", "onnxruntime"):
        _require(module)
    model = model.float().eval()
    ids = torch.ones((2, 8), dtype=torch.long)
    dynamic = {0: "batch", 1: "sequence"}
    full = path if quantize is None else path.with_name("model.fp32.onnx")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # the exporter narrates every stage
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _LogitsOnly(model),
            (ids, torch.ones_like(ids)),
            str(full),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": dynamic, "attention_mask": dynamic},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR  # "consider pre-processing": advice for vision models
        try:
            quantize_dynamic(str(full), str(path), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        full.unlink()


def onnx_logits(path: Path) -> Any:
    """A function (input_ids, attention_mask) -> float32 logits that runs the file with onnxruntime."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        feed = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)}
        return torch.from_numpy(np.asarray(session.run(["logits"], feed)[0], dtype=np.float32))

    return run
