"""Shared fixtures: a tiny prepared dataset and a tiny trained run, built once per session through the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers: one thread each, not two spinning on one core
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from llmkit.cli import app  # noqa: E402

TINY_MODEL = [
    "--set", "model.n_layers=2", "--set", "model.hidden_size=32", "--set", "model.n_heads=4",
    "--set", "model.n_kv_heads=2", "--set", "model.context_length=64",
]  # fmt: skip


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None


def run_cli(*args: str | Path) -> CliResult:
    """Invoke the real Typer app in-process, with separate stdout and stderr."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    exception = result.exception if not isinstance(result.exception, SystemExit) else None
    return CliResult(result.exit_code, result.stdout, result.stderr, exception)


def assert_user_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.exception is None, result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_nothing_written(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], list(parent.iterdir())


def tiny_data_args(out: Path, docs: int = 1500) -> list[str]:
    return [
        "builtin:stories", "--out", str(out), "--vocab-size", "400", "--block-size", "32",
        "--set", f"data.builtin_docs={docs}", "--val-fraction", "0.1",
    ]  # fmt: skip


def tiny_train_args(data: Path, out: Path, steps: int = 30) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), "--max-steps", str(steps), "--micro-batch-size", "8",
        "--lr", "3e-3", *TINY_MODEL, "--set", "train.eval_every=10", "--set", "train.eval_batches=4",
        "--set", "logging.every_steps=5", "--set", "checkpoint.every_steps=10", "--set", "schedule.warmup_steps=5",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "stories"
    result = run_cli("data-prep", *tiny_data_args(out))
    assert result.exit_code == 0, result.stderr + result.stdout
    return out


def pretrained(data: Path, factory: pytest.TempPathFactory, name: str, *sets: str) -> Path:
    """The tiny pretraining run, with `--set` overrides (another width, another architecture)."""
    out = factory.mktemp("runs") / name
    result = run_cli("pretrain", *tiny_train_args(data, out), *(arg for s in sets for arg in ("--set", s)))
    assert result.exit_code == 0, result.stderr + result.stdout
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrained(tiny_dataset, tmp_path_factory, "tiny")


@pytest.fixture(autouse=True)
def fresh_compile_cache() -> None:
    """Each test's in-process runs compile their own step: the last test's compiled code (kept per code object,
    up to torch's recompile limit) is dropped; the kernels stay cached on disk."""
    torch._dynamo.reset()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
