"""DeepSpeed ZeRO on CPU (2 processes, gloo), launched by llmkit through `accelerate launch`.

Each strategy trains the same steps as plain DDP from the same initial weights, checkpoints its optimizer
shards, resumes after a SIGKILL to exactly the run that was never killed (and on another number of processes to it
within 1e-5), and exports whole weights equal to DeepSpeed's own consolidation of the shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.config import load_config
from llmkit.data.store import open_dataset
from llmkit.data.tokenizer import load_tokenizer
from llmkit.models import build_model
from llmkit.train.checkpoint import complete_checkpoints
from tests.conftest import TINY_MODEL, assert_user_error, run_cli

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
PORTS = iter(range(29571, 29650))


@pytest.fixture(scope="module")
def start(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One set of initial weights for every run (ZeRO-3 builds a fresh model sharded, with another init order)."""
    folder = tmp_path_factory.mktemp("init") / "model"
    overrides = [arg for arg in TINY_MODEL if arg != "--set"]
    tokenizer = load_tokenizer(open_dataset(tiny_dataset).tokenizer_dir)
    build_model(load_config(None, overrides).model, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pretrain(
    data: Path, init: Path, out: Path, *extra: str, fault: str | None = None, processes: int = 2
) -> subprocess.CompletedProcess:
    """6 steps of a global batch of 12 sequences: 2 processes x 3 rows x 2 micro-batches (or 1 x 6 x 2, 3 x 2 x 2)."""
    command = [
        sys.executable, "-m", "llmkit", "pretrain", "--data", str(data), "--out", str(out), "--init-from", str(init),
        "--max-steps", "6", "--micro-batch-size", str(6 // processes), "--lr", "3e-3", "--cpu",
        "--num-processes", str(processes), "--main-process-port", str(next(PORTS)), "--set", "train.grad_accum_steps=2",
        "--set", "checkpoint.every_steps=3", "--set", "checkpoint.keep_last=5", "--set", "logging.every_steps=1",
        "--set", "train.eval_every=3", "--set", "train.eval_batches=2", "--set", "logging.report_to=[]",
        "--set", "logging.data_trace=true", *extra,
    ]  # fmt: skip
    env = {**ENV, "LLMKIT_FAULT_INJECT": fault} if fault else ENV
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def ddp_run(tiny_dataset: Path, start: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = pretrain(tiny_dataset, start, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize(("strategy", "resumed_on"), [("zero2", 1), ("zero3", 3)])
def test_zero_trains_like_ddp_resumes_exactly_on_any_number_of_processes_and_exports_whole(
    strategy: str, resumed_on: int, tiny_dataset: Path, start: Path, ddp_run: Path, tmp_path: Path
) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from tests.test_nothing_lost import blocks_per_step

    # 1. Same losses as DDP (fp32; DeepSpeed reduces in buckets, so sums run in another order): 1e-5 relative.
    whole = tmp_path / "whole"
    done = pretrain(tiny_dataset, start, whole, "--strategy", strategy)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(whole) == pytest.approx(losses(ddp_run), rel=1e-5)
    state = json.loads((complete_checkpoints(whole / "checkpoints")[-1] / "trainer_state.json").read_text())
    assert state["strategy"] == strategy and state["num_processes"] == 2
    assert json.loads((whole / "summary.json").read_text())["tokens"] == 6 * 12 * 32  # once, not per rank

    # 2. Killed in the middle of step 5 (after the step-3 checkpoint), then resumed: identical to the whole run.
    killed = tmp_path / "killed"
    crash = pretrain(tiny_dataset, start, killed, "--strategy", strategy, fault="kill@5.1")
    assert crash.returncode != 0 and not (killed / "final").exists()
    assert [p.name for p in complete_checkpoints(killed / "checkpoints")] == ["step-00000003"]
    again = pretrain(tiny_dataset, start, killed, "--strategy", strategy, "--resume", "auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert losses(killed) == losses(whole)
    resumed, reference = weights(killed / "final"), weights(whole / "final")
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)

    # 3. The same 2-process checkpoint continued on another number of processes (a branch: the killed run is only
    # read): DeepSpeed's universal checkpoint shards it anew. Same blocks per step; losses and weights within 1e-5.
    branch = tmp_path / "resharded"
    step3 = killed / "checkpoints" / "step-00000003"
    moved = pretrain(tiny_dataset, start, branch, "--strategy", strategy, "--resume", str(step3), processes=resumed_on)
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert losses(branch) == pytest.approx(losses(whole), rel=1e-5)
    a, b = weights(branch / "final"), reference
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in b)
    later = {step: used for step, used in blocks_per_step(whole).items() if step > 3}
    assert blocks_per_step(branch) == later
    assert not list((killed / "checkpoints").glob(".*universal*"))  # the conversion is removed once loaded

    # 4. Export of the last checkpoint: whole tensors, equal to DeepSpeed's own consolidation of the shards.
    last = complete_checkpoints(whole / "checkpoints")[-1]
    exported = tmp_path / "export"
    result = run_cli("export", last, "--out", exported)
    assert result.exit_code == 0, result.stderr
    from_export = weights(exported)
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(last / "deepspeed"), tag="state")
    assert all(tensor.numel() > 0 for tensor in from_export.values())
    assert from_export.keys() <= gathered.keys()
    assert all(torch.equal(from_export[name], gathered[name]) for name in from_export)


def test_optimizer_offload_trains_like_ddp(tiny_dataset: Path, start: Path, ddp_run: Path, tmp_path: Path) -> None:
    """zero2-offload steps DeepSpeed's CPU Adam: same hyperparameters (decoupled weight decay included)."""
    out = tmp_path / "offload"
    done = pretrain(tiny_dataset, start, out, "--strategy", "zero2-offload")
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(ddp_run), rel=1e-5)


def test_strategy_errors_are_caught_before_launch(tiny_dataset: Path, tmp_path: Path) -> None:
    args = ["pretrain", "--data", tiny_dataset, "--out", tmp_path / "run", "--cpu", "--num-processes", "2"]
    assert_user_error(run_cli(*args, "--strategy", "fsdp"), "fsdp needs CUDA GPUs")
    assert_user_error(run_cli(*args, "--strategy", "zero9"), "distributed.strategy")
    assert_user_error(run_cli(*args, "--deepspeed-config", tmp_path / "none.json"), "none.json: DeepSpeed config")
    conflicting = tmp_path / "ds.json"
    conflicting.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2}}))
    assert_user_error(
        run_cli(*args, "--micro-batch-size", "4", "--deepspeed-config", conflicting),
        "train_micro_batch_size_per_gpu is 3 but the run needs the recipe's 4",
    )
    lora = ["finetune", "--model", tiny_dataset, "--data", tmp_path / "rows.jsonl", "--out", tmp_path / "run"]
    assert_user_error(run_cli(*lora, "--method", "qlora", "--strategy", "zero3"), "cannot shard 4-bit", "use zero2")
    assert not (tmp_path / "run").exists()


def test_an_accelerate_config_file_drives_the_launch(tiny_dataset: Path, start: Path, tmp_path: Path) -> None:
    """`--accelerate-config recipes/accelerate/zero2.yaml` hands the file to accelerate launch; its DeepSpeed
    section decides the strategy, and a launch option on the command line overrides the file's port."""
    config = Path(__file__).parent.parent / "recipes" / "accelerate" / "zero2.yaml"
    out = tmp_path / "run"
    command = [sys.executable, "-m", "llmkit", "pretrain", "--data", str(tiny_dataset), "--out", str(out),
               "--init-from", str(start), "--max-steps", "2", "--micro-batch-size", "4", "--cpu", "--accelerate-config",
               str(config), "--main-process-port", str(next(PORTS)), "--set", "logging.report_to=[]"]  # fmt: skip
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((complete_checkpoints(out / "checkpoints")[-1] / "trainer_state.json").read_text())
    assert state["strategy"] == "zero2" and state["num_processes"] == 2


@pytest.fixture(scope="module")
def chat_base(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A base whose tokenizer already has the chat template's tokens (a short full fine-tune), and chat rows."""
    from tests.test_finetune import write_chat_rows

    folder = tmp_path_factory.mktemp("chat_base")
    rows = write_chat_rows(folder / "chat.jsonl", 120)
    done = run_cli("finetune", "--model", tiny_run, "--data", rows, "--out", folder / "base", "--max-steps", "2",
                   "--micro-batch-size", "4", "--max-length", "64", "--set", "logging.report_to=[]")  # fmt: skip
    assert done.exit_code == 0, done.stderr
    return folder / "base" / "final", rows


def test_lora_under_zero3_saves_whole_adapters_resumes_exactly_and_merges(
    chat_base: tuple[Path, Path], tiny_run: Path, tmp_path: Path
) -> None:
    """2 CPU processes, ZeRO-3 shards the frozen base and the adapters: the adapters saved are whole (the shapes of
    an unsharded run, trained: lora_B is no longer zero), equal to a LoRA run under ZeRO-2 within 1e-5, a run killed
    in step 5 resumes to the same adapters bit for bit, and `export --merge-lora` folds them into a whole model."""
    from safetensors.torch import load_file

    base, rows = chat_base

    def finetune(out: Path, strategy: str, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
        command = [
            sys.executable, "-m", "llmkit", "finetune", "--model", str(base), "--data", str(rows), "--out", str(out),
            "--method", "lora", "--strategy", strategy, "--cpu", "--num-processes", "2",
            "--main-process-port", str(next(PORTS)),
            "--max-steps", "6", "--micro-batch-size", "4", "--max-length", "64", "--lr", "3e-3",
            "--set", "checkpoint.every_steps=3", "--set", "logging.every_steps=1", "--set", "train.eval_every=3",
            "--set", "logging.report_to=[]", *extra,
        ]  # fmt: skip
        env = {**ENV, "LLMKIT_FAULT_INJECT": fault} if fault else ENV
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)

    whole = finetune(tmp_path / "zero3", "zero3")
    assert whole.returncode == 0, whole.stderr[-3000:]
    zero2 = finetune(tmp_path / "zero2", "zero2")
    assert zero2.returncode == 0, zero2.stderr[-3000:]
    adapters = load_file(tmp_path / "zero3" / "final" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "zero2" / "final" / "adapter_model.safetensors")
    assert adapters.keys() == reference.keys() and len(adapters) > 0
    assert all(adapters[k].shape == reference[k].shape and adapters[k].numel() > 0 for k in adapters)
    assert all(adapters[k].abs().max() > 0 for k in adapters if "lora_B" in k)
    assert all(torch.allclose(adapters[k], reference[k], atol=1e-5) for k in adapters)
    assert losses(tmp_path / "zero3") == pytest.approx(losses(tmp_path / "zero2"), rel=1e-5)

    crash = finetune(tmp_path / "killed", "zero3", fault="kill@5.0")
    assert crash.returncode != 0 and not (tmp_path / "killed" / "final").exists()
    again = finetune(tmp_path / "killed", "zero3", "--resume", "auto")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = load_file(tmp_path / "killed" / "final" / "adapter_model.safetensors")
    assert all(torch.equal(resumed[k], adapters[k]) for k in adapters)
    assert losses(tmp_path / "killed") == losses(tmp_path / "zero3")

    merged = run_cli("export", tmp_path / "zero3", "--out", tmp_path / "merged", "--merge-lora")
    assert merged.exit_code == 0, merged.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()
