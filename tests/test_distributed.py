"""Several processes on CPU (torchrun, gloo): ranks agree on stopping, and the step's work is split across them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from llmkit.train.checkpoint import complete_checkpoints
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]


def train_args(data: Path, out: Path, steps: int) -> list[str]:
    return [
        "-m", "llmkit", "pretrain", "--data", str(data), "--out", str(out), "--max-steps", str(steps),
        "--micro-batch-size", "4", *TINY_MODEL, "--set", "checkpoint.every_steps=100000",
        "--set", "logging.every_steps=1", "--set", "train.eval_every=100000", "--set", "logging.report_to=[]",
    ]  # fmt: skip


def worker_with_rank(launcher: psutil.Process, rank: int, timeout: float = 120) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in launcher.children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "llmkit" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank}")


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tiny_dataset: Path, tmp_path: Path) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this test runs the CPU (gloo) path")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([*TORCHRUN, *train_args(tiny_dataset, run, steps=3000)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    worker_with_rank(psutil.Process(launcher.pid), rank=1).send_signal(signal.SIGUSR1)
    stdout, stderr = launcher.communicate(timeout=180)
    summary = json.loads((run / "summary.json").read_text())  # written by rank 0, which got no signal itself
    assert summary["interrupted"] == "signal on another process", stderr[-2000:]
    (checkpoint,) = complete_checkpoints(run / "checkpoints")
    assert checkpoint.name == f"step-{summary['steps']:08d}" and summary["steps"] < 3000
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_batch_size"] == 8
    assert summary["tokens"] == summary["steps"] * 8 * 32  # each token counted once, not once per rank

    resumed = subprocess.run([*TORCHRUN, *train_args(tiny_dataset, run, steps=summary["steps"] + 3),
                              "--resume", "auto"], env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {checkpoint}" in resumed.stdout
    assert json.loads((run / "summary.json").read_text())["steps"] == summary["steps"] + 3


def test_two_processes_at_batch_b_match_one_process_at_2b(tiny_dataset: Path, tmp_path: Path) -> None:
    """DDP over gloo with 4 blocks per process reproduces one process with 8: the same global batches (the loader
    gives each rank its slice of the same permutation), the loss normalized by the global target count.
    Tolerance: 1e-5 relative on every step's loss, 1e-5 absolute on final weights (all-reduce sums in another order)."""
    from safetensors.torch import load_file

    from tests.conftest import run_cli

    common = ["--max-steps", "6", *TINY_MODEL, "--set", "logging.every_steps=1", "--set", "train.eval_every=1000",
              "--set", "logging.report_to=[]", "--set", "checkpoint.every_steps=1000",
              "--set", "train.read_ahead=true"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "llmkit", "pretrain", "--data", str(tiny_dataset), "--out", str(tmp_path / "two"),
         "--micro-batch-size", "4", "--cpu", "--num-processes", "2", "--main-process-port", "29534", *common],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli("pretrain", "--data", tiny_dataset, "--out", tmp_path / "one", "--micro-batch-size", "8", *common)
    assert one.exit_code == 0, one.stderr

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    a, b = (
        load_file(tmp_path / "two" / "final" / "model.safetensors"),
        load_file(tmp_path / "one" / "final" / "model.safetensors"),
    )
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    two_summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    one_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert two_summary["tokens"] == one_summary["tokens"] == 6 * 8 * 32  # each token counted once, not per rank


def test_early_stopping_stops_every_process(tiny_dataset: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", "pretrain", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"),
         "--max-steps", "40", "--micro-batch-size", "4", *TINY_MODEL, "--cpu", "--num-processes", "2",
         "--main-process-port", "29535", "--set", "train.eval_every=10", "--set", "train.eval_batches=2",
         "--set", "train.early_stopping_patience=1", "--set", "train.early_stopping_min_delta=100",
         "--set", "logging.report_to=[]"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 20


def test_workers_exit_codes_reach_the_user_through_the_launcher(tiny_dataset: Path, tmp_path: Path) -> None:
    """torchrun reports any worker failure as exit 1 with its own traceback; llmkit's relaunch returns the workers'
    code instead: one line and 2 for bad input, 75 after a time-limit checkpoint (what requeue scripts test)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "llmkit", "pretrain", "--data", str(tiny_dataset), *TINY_MODEL, "--cpu",
              "--num-processes", "2", "--main-process-port", "29537", "--set", "logging.report_to=[]"]  # fmt: skip
    bad = subprocess.run([*launch, "--out", str(tmp_path / "bad"), "--micro-batch-size", "100000"],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2, bad.stderr[-3000:]
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot fill one micro-batch" in errors[0]
    assert "Traceback" not in bad.stderr and "ChildFailedError" not in bad.stderr
    assert not (tmp_path / "bad").exists()

    late = subprocess.run([*launch, "--out", str(tmp_path / "late"), "--max-steps", "100000", "--max-time", "3"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert late.returncode == 75, late.stderr[-3000:]
    assert complete_checkpoints(tmp_path / "late" / "checkpoints") and "ChildFailedError" not in late.stderr


def test_more_processes_than_gpus_is_one_line_before_launch() -> None:
    """On a GPU node, --num-processes above the GPU count failed in the extra ranks ("invalid device ordinal");
    it is refused before launch, naming --cpu. Without GPUs the processes run on the CPU (gloo) as before."""
    from llmkit.errors import UserError
    from llmkit.train.strategies import check_gpu_count

    with pytest.raises(UserError, match=r"--num-processes 2 on a machine with 1 CUDA GPU\(s\).*--cpu"):
        check_gpu_count(2, 1)
    check_gpu_count(2, 0)
    check_gpu_count(8, 8)
