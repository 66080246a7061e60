"""GPU paths: mixed precision with and without loss scaling. Skipped without CUDA (marker `gpu`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_cli, tiny_train_args

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_pretrain_on_cuda(precision: str, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / precision
    result = run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=20), "--precision", precision)
    assert result.exit_code == 0, result.stderr
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [loss for loss in losses if loss is not None]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    report = run_cli("eval", out, "--data", tiny_dataset)
    assert report.exit_code == 0, report.stderr
