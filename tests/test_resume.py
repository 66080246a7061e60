"""Nothing lost: a run killed at any point resumes bitwise-exactly; checkpoints are atomic and verified.

Real crashes: runs are killed with SIGKILL in a subprocess (at an exact micro-batch through
LLMKIT_FAULT_INJECT, or mid-save), then resumed through the CLI and compared tensor by tensor with an
uninterrupted run. CPU, fp32, one process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmkit.atomic import file_sha256
from llmkit.train.checkpoint import COMPLETE, complete_checkpoints
from tests.conftest import TINY_MODEL, run_cli, tiny_data_args

pytestmark = pytest.mark.slow


def resume_args(data: Path, out: Path, steps: int) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), "--max-steps", str(steps), "--micro-batch-size", "4",
        "--lr", "3e-3", *TINY_MODEL, "--set", "train.grad_accum_steps=2", "--set", "train.eval_every=5",
        "--set", "train.eval_batches=2", "--set", "logging.every_steps=1", "--set", "checkpoint.every_steps=4",
        "--set", "checkpoint.keep_last=10", "--set", "logging.data_trace=true", "--set", "logging.report_to=[]",
        "--set", "logging.plot=false", "--set", "schedule.warmup_steps=3",
        "--set", "train.deterministic=true",  # bitwise on a GPU too (CPU runs are bitwise without it)
        "--set", "train.read_ahead=true",  # the next step read on a thread while this one computes, as on a GPU
    ]  # fmt: skip


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 110 blocks: 27 micro-batches of 4 per epoch, so an epoch is 13 steps of 2 micro-batches."""
    out = tmp_path_factory.mktemp("resume") / "data"
    result = run_cli("data-prep", *tiny_data_args(out, docs=110))
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def reference(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "reference"
    result = run_cli("pretrain", *resume_args(small_dataset, out, steps=18))
    assert result.exit_code == 0, result.stderr
    return out


def llmkit_subprocess(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "llmkit", *map(str, args)],
        env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def records(
    path: Path,
    drop: tuple[str, ...] = (
        "elapsed_s",
        "tokens_per_s",
        "mfu",
        "peak_allocated_gib",
        "peak_reserved_gib",
        "peak_rss_gib",
    ),
) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


def assert_same_run(run: Path, reference: Path) -> None:
    """Bitwise-equal weights and optimizer state, identical losses and identical data order."""
    final, expected = (
        load_file(run / "final" / "model.safetensors"),
        load_file(reference / "final" / "model.safetensors"),
    )
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)
    last = complete_checkpoints(run / "checkpoints")[-1]
    ref_last = complete_checkpoints(reference / "checkpoints")[-1]
    assert last.name == ref_last.name
    opt = torch.load(last / "optimizer.pt", weights_only=True)["state"]
    ref_opt = torch.load(ref_last / "optimizer.pt", weights_only=True)["state"]
    assert opt.keys() == ref_opt.keys()
    for key in opt:
        assert all(torch.equal(opt[key][name], ref_opt[key][name]) for name in opt[key])
    assert records(run / "metrics.jsonl") == records(reference / "metrics.jsonl")
    assert records(run / "data_trace.jsonl") == records(reference / "data_trace.jsonl")


@pytest.mark.parametrize(
    ("fault", "resumed_from"),
    [
        ("kill@10.1", "step-00000008"),  # inside a gradient-accumulation window (after micro-batch 1 of 2)
        ("kill@14.0", "step-00000012"),  # at the epoch boundary: step 14 starts the second epoch
        ("kill-in-save@8", "step-00000004"),  # while checkpoint 8 is half written
    ],
)
def test_killed_run_resumes_bitwise_exactly(
    fault: str, resumed_from: str, small_dataset: Path, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = llmkit_subprocess("pretrain", *resume_args(small_dataset, run, steps=18), env={"LLMKIT_FAULT_INJECT": fault})
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    assert not (run / "final").exists()
    assert complete_checkpoints(run / "checkpoints")[-1].name == resumed_from  # a cut-off save is never a checkpoint

    refused = run_cli("pretrain", *resume_args(small_dataset, run, steps=18))
    assert refused.exit_code == 2 and "--resume auto" in refused.stderr  # never restarted silently

    resumed = run_cli("pretrain", *resume_args(small_dataset, run, steps=18), "--resume", "auto")
    assert resumed.exit_code == 0, resumed.stderr
    assert f"resuming from {run / 'checkpoints' / resumed_from}" in resumed.stdout
    assert not list((run / "checkpoints").glob(".step-*"))  # the half-written save was cleaned up
    assert_same_run(run, reference)


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(small_dataset: Path, tmp_path: Path) -> None:
    args = resume_args(small_dataset, tmp_path / "run", steps=300) + ["--set", "checkpoint.every_steps=1000"]
    proc = llmkit_subprocess("pretrain", *args)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert "SIGTERM received" in stderr and "--resume auto" in stderr
    checkpoints = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("-")[1]) < 300

    resumed = run_cli("pretrain", *args, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.stderr
    reference = run_cli("pretrain", *resume_args(small_dataset, tmp_path / "ref", steps=300),
                        "--set", "checkpoint.every_steps=1000")  # fmt: skip
    assert reference.exit_code == 0
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    expected = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    assert all(torch.equal(final[k], expected[k]) for k in final)
    assert records(tmp_path / "run" / "data_trace.jsonl") == records(tmp_path / "ref" / "data_trace.jsonl")


def test_a_second_signal_does_no_harm(small_dataset: Path, tmp_path: Path) -> None:
    args = resume_args(small_dataset, tmp_path / "run", steps=300) + ["--set", "checkpoint.every_steps=1000"]
    proc = llmkit_subprocess("pretrain", *args)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert "already stopping" in stderr or stderr.count("SIGUSR1 received") == 1
    (checkpoint,) = complete_checkpoints(tmp_path / "run" / "checkpoints")
    seal = json.loads((checkpoint / COMPLETE).read_text())
    assert all(file_sha256(checkpoint / name) == entry["sha256"] for name, entry in seal["files"].items())


def test_max_time_checkpoints_and_exits_75(small_dataset: Path, tmp_path: Path) -> None:
    result = run_cli("pretrain", *resume_args(small_dataset, tmp_path / "run", steps=100_000), "--max-time", "1s")
    assert result.exit_code == 75, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["interrupted"] == "time limit" and summary["steps"] < 100_000
    assert complete_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == f"step-{summary['steps']:08d}"


@pytest.fixture
def finished_run(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "final")
    return run


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: flip_byte(c / "model" / "model.safetensors"), "model.safetensors: checkpoint file is corrupted"),
        (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt: checkpoint file is truncated"),
        (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt: checkpoint file is missing"),
    ],
    ids=["bad-checksum", "truncated", "missing-optimizer"],
)  # fmt: skip
def test_corrupted_checkpoint_is_named_and_fallback_only_when_asked(
    damage, message: str, finished_run: Path, small_dataset: Path, reference: Path
) -> None:
    newest = complete_checkpoints(finished_run / "checkpoints")[-1]
    damage(newest)
    args = resume_args(small_dataset, finished_run, steps=18)
    result = run_cli("pretrain", *args, "--resume", "auto")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "--resume-fallback" in result.stderr
    fallback = run_cli("pretrain", *args, "--resume", "auto", "--resume-fallback")
    assert fallback.exit_code == 0, fallback.stderr
    assert "falling back to step-00000016" in fallback.stderr
    final = load_file(finished_run / "final" / "model.safetensors")
    expected = load_file(reference / "final" / "model.safetensors")
    assert all(torch.equal(final[k], expected[k]) for k in final)


def test_a_checkpoint_cut_off_mid_save_is_never_loaded(finished_run: Path, small_dataset: Path) -> None:
    newest = complete_checkpoints(finished_run / "checkpoints")[-1]
    (newest / COMPLETE).unlink()  # what a save killed before its seal leaves (were it not staged)
    result = run_cli("pretrain", *resume_args(small_dataset, finished_run, steps=18), "--resume", newest)
    assert result.exit_code == 2 and "incomplete checkpoint" in result.stderr
    auto = run_cli("pretrain", *resume_args(small_dataset, finished_run, steps=18), "--resume", "auto")
    assert auto.exit_code == 0 and "resuming from" in auto.stdout and newest.name not in auto.stdout


def test_resuming_with_changed_settings_is_refused(finished_run: Path, small_dataset: Path, tmp_path: Path) -> None:
    args = resume_args(small_dataset, finished_run, steps=18)
    bigger = run_cli("pretrain", *args, "--resume", "auto", "--micro-batch-size", "8")
    assert bigger.exit_code == 2 and "global_batch_size 8 -> 16" in bigger.stderr
    other = tmp_path / "other"
    assert run_cli("data-prep", *tiny_data_args(other, docs=130)).exit_code == 0
    changed = run_cli("pretrain", *resume_args(other, finished_run, steps=18), "--resume", "auto")
    assert changed.exit_code == 2
    assert "dataset_fingerprint" in changed.stderr and "tokenizer_hash" in changed.stderr
    assert "--allow-config-change" in changed.stderr
    allowed = run_cli("pretrain", *args, "--resume", "auto", "--micro-batch-size", "8", "--allow-config-change")
    assert allowed.exit_code == 0, allowed.stderr


def test_a_pickle_with_a_code_payload_is_refused(finished_run: Path, small_dataset: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    newest = complete_checkpoints(finished_run / "checkpoints")[-1]
    torch.save(Payload(), newest / "optimizer.pt")
    seal = json.loads((newest / COMPLETE).read_text())  # re-seal, as an attacker would
    seal["files"]["optimizer.pt"] = {
        "bytes": (newest / "optimizer.pt").stat().st_size,
        "sha256": file_sha256(newest / "optimizer.pt"),
    }
    (newest / COMPLETE).write_text(json.dumps(seal))
    result = run_cli("pretrain", *resume_args(small_dataset, finished_run, steps=18), "--resume", "auto")
    assert result.exit_code == 2 and "optimizer.pt: refused to load" in result.stderr, result.stderr
    assert not marker.exists()


def test_non_finite_loss_stops_before_the_step_and_keeps_previous_weights(small_dataset: Path, tmp_path: Path) -> None:
    explode = ["--set", "optimizer.name=sgd", "--lr", "1e4", "--set", "optimizer.grad_clip=null",
               "--set", "checkpoint.every_steps=1000", "--set", "train.loss_spike_factor=1.5"]  # fmt: skip
    run = tmp_path / "run"
    result = run_cli("pretrain", *resume_args(small_dataset, run, steps=50), *explode)
    assert result.exit_code == 3, result.stderr + result.stdout
    message = result.stderr.strip()
    assert message.count("\n") == 0 and "non-finite loss" in message
    bad_step = int(message.split("step ")[1].split(":")[0])
    (saved,) = complete_checkpoints(run / "checkpoints")
    assert saved.name == f"step-{bad_step - 1:08d}"
    assert any("loss_spike" in r for r in records(run / "metrics.jsonl")) or "loss spike" in result.stdout
    # The saved weights are exactly those of a run that stopped at the previous step.
    clean = run_cli("pretrain", *resume_args(small_dataset, tmp_path / "clean", steps=bad_step - 1), *explode)
    assert clean.exit_code == 0
    weights = load_file(saved / "model" / "model.safetensors")
    expected = load_file(tmp_path / "clean" / "final" / "model.safetensors")
    assert all(torch.equal(weights[k], expected[k]) for k in weights)

    skipping = run_cli("pretrain", *resume_args(small_dataset, tmp_path / "skip", steps=12), *explode,
                       "--set", "train.max_bad_steps=100")  # fmt: skip
    assert skipping.exit_code == 0, skipping.stderr
    skipped = [r for r in records(tmp_path / "skip" / "metrics.jsonl") if "skipped_step" in r]
    assert skipped and all(
        torch.isfinite(t).all() for t in load_file(tmp_path / "skip" / "final" / "model.safetensors").values()
    )


def test_secrets_never_reach_the_run_directory(small_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    secrets = {"HF_TOKEN": "hf_envSECRET0123456789", "WANDB_API_KEY": "wandbSECRET0123456789"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    in_config = "hf_configSECRET0123456789"
    run = tmp_path / "run"
    result = run_cli("pretrain", *resume_args(small_dataset, run, steps=4), "--set", f"model.hub_token={in_config}")
    assert result.exit_code == 0, result.stderr
    for value in [*secrets.values(), in_config]:
        assert value not in result.stdout + result.stderr
        for path in run.rglob("*"):
            if path.is_file():
                assert value.encode() not in path.read_bytes(), path


def test_interrupted_data_prep_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    out = tmp_path / "data"
    args = ["data-prep", "builtin:stories", "--out", out, "--set", "data.builtin_docs=100000", "--vocab-size", "400"]
    proc = llmkit_subprocess(*args, "--set", "data.tokenizer_train_docs=2000")  # killed soon after the tokenizer
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp_path.glob(".data.tmp-*/tokenizer")):
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=60)
    assert not out.exists() and list(tmp_path.glob(".data.tmp-*"))  # only a hidden staging directory
    result = run_cli(*args[:-2], "--vocab-size", "400", "--set", "data.builtin_docs=3000")
    assert result.exit_code == 0, result.stderr
    assert (out / "manifest.json").is_file() and not list(tmp_path.glob(".data.tmp-*"))


def test_a_non_finite_step_is_skipped_on_the_device_and_found_at_the_next_check(
    small_dataset: Path, tmp_path: Path
) -> None:
    """Fused AdamW skips a non-finite step on the device (found_inf), so the host reads losses only at checks
    (logging, validation, checkpoints). Step 7's loss is poisoned; checks are every 5 steps. Allowed one bad step,
    the run skips it and finishes; allowed none, it stops at the check of step 10 with one line, saving step 10,
    whose weights are bitwise those of the run that skipped: finding it later changed nothing in training."""
    every5 = [*resume_args(small_dataset, tmp_path / "unused", steps=12)[4:], "--set", "logging.every_steps=5",
              "--set", "train.eval_every=1000", "--set", "checkpoint.every_steps=5"]  # fmt: skip

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "llmkit", "pretrain", "--data", str(small_dataset), "--out", str(out)]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "LLMKIT_FAULT_INJECT": "nan@7"}
        return subprocess.run([*args, *every5, *extra], env=env, capture_output=True, text=True, timeout=300)

    skipping = run(tmp_path / "skip", "--set", "train.max_bad_steps=1")
    assert skipping.returncode == 0, skipping.stderr[-3000:]
    assert [r["step"] for r in records(tmp_path / "skip" / "metrics.jsonl") if "skipped_step" in r] == [7]
    stopping = run(tmp_path / "stop")
    assert stopping.returncode == 3, stopping.stderr[-3000:]
    (line,) = [line for line in stopping.stderr.splitlines() if line.strip()]
    assert line.startswith("error: step 7: non-finite loss (nan)") and "found at step 10" in line, line
    saved = load_file(tmp_path / "stop" / "checkpoints" / "step-00000010" / "model" / "model.safetensors")
    expected = load_file(tmp_path / "skip" / "checkpoints" / "step-00000010" / "model" / "model.safetensors")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    before = load_file(tmp_path / "skip" / "checkpoints" / "step-00000005" / "model" / "model.safetensors")
    assert not all(torch.equal(saved[k], before[k]) for k in saved)  # steps 8 to 10 were applied
