"""The pretraining path end to end through the CLI: data-prep -> pretrain -> eval -> export -> generate."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmkit.atomic import file_sha256
from llmkit.config import ScheduleConfig, TrainConfig, load_config
from llmkit.data.store import open_dataset
from llmkit.train.checkpoint import COMPLETE, complete_checkpoints
from llmkit.train.loader import BlockLoader, ReadAhead
from llmkit.train.schedules import lr_at
from llmkit.train.setup import steps_for_budget
from tests.conftest import assert_user_error, run_cli, tiny_train_args


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_holds_everything(tiny_run: Path) -> None:
    cfg = load_config(tiny_run / "config.yaml")  # the saved config is a valid recipe
    assert cfg.train.max_steps == 30 and cfg.model.hidden_size == 32
    records = read_metrics(tiny_run)
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30]
    assert all({"tokens", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in records if "loss" in r)
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (tiny_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["tokens"] == 30 * 8 * 32
    # Honest figures: the steady state starts after 5 warm-up steps and counts training steps only, so it is
    # faster than the overall rate, which includes start-up, validation and checkpoints.
    assert summary["steady_from_step"] == 6
    assert summary["steady_tokens_per_second"] > summary["tokens_per_second"] > 0
    assert summary["memory"]["peak_rss_gib"] > 0.1


def test_throughput_is_recent_for_progress_and_steady_for_the_summary() -> None:
    from llmkit.train.throughput import Throughput

    rate = Throughput(warmup=2)
    rate.add(100, 10.0)  # compilation
    assert rate.steady_rate is None and rate.recent_rate == 10.0
    rate.add(100, 1.0)
    for _ in range(30):
        rate.add(100, 0.5)
    assert rate.steady_rate == 200.0  # the 30 steps after the 2 of warm-up
    assert rate.recent_rate == 200.0  # the last 20 steps only: the slow first steps have left the window


def test_checkpoints_are_complete_and_pruned(tiny_run: Path) -> None:
    checkpoints = complete_checkpoints(tiny_run / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-00000020", "step-00000030"]  # keep_last=2
    for checkpoint in checkpoints:
        seal = json.loads((checkpoint / COMPLETE).read_text())
        expected = {"model/model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json", "config.yaml"}
        assert expected <= set(seal["files"])
        assert all(file_sha256(checkpoint / name) == entry["sha256"] for name, entry in seal["files"].items())
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert {
            "step",
            "tokens",
            "data",
            "dataset_fingerprint",
            "tokenizer_hash",
            "global_batch_size",
        } <= set(state)
        torch.load(checkpoint / "optimizer.pt", weights_only=True)
        torch.load(checkpoint / "rng.pt", weights_only=True)
    final = load_file(tiny_run / "final" / "model.safetensors")
    last = load_file(checkpoints[-1] / "model" / "model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


def test_loss_goes_down(tiny_run: Path) -> None:
    losses = [r["loss"] for r in read_metrics(tiny_run) if "loss" in r]
    assert losses[-1] < 0.85 * losses[0]
    vals = [r["val_loss"] for r in read_metrics(tiny_run) if "val_loss" in r]
    assert vals[-1] < vals[0]


def test_final_model_and_tokenizer_load_with_transformers(tiny_run: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "final")
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "final")
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert (tiny_run / "final" / "generation_config.json").is_file()
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] >= len(tokenizer)


def test_eval_reports_bits_per_char_against_the_floor(tiny_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "reports" / "eval.json"
    result = run_cli("eval", tiny_run, "--data", tiny_dataset, "--report", report_path)
    assert result.exit_code == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert {"loss", "perplexity", "bits_per_char", "bits_per_token", "tokens"} <= set(report)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    assert report["bits_per_token"] == pytest.approx(report["loss"] / math.log(2))
    manifest = open_dataset(tiny_dataset).manifest
    assert report["tokens"] == manifest["splits"]["val"]["blocks"] * 31  # every target of every block
    assert report["entropy_floor_bits_per_char"] == manifest["entropy"]["bits_per_char"]["val"]
    assert report["bits_per_char"] > report["entropy_floor_bits_per_char"]
    assert "entropy floor" in result.stdout
    # options that would change nothing here are refused, not dropped: the blocks are scored as they were packed
    ignored = run_cli("eval", tiny_run, "--data", tiny_dataset, "--seq-len", "16", "--text-field", "body")
    assert_user_error(ignored, "--seq-len and --text-field: for raw text", "is a prepared dataset")
    assert_user_error(run_cli("eval", tiny_run, "--data", tiny_dataset, "--limit", "5"), "--limit counts the items of")


def test_eval_gate_fails_with_exit_1_naming_the_metric(tiny_run: Path, tiny_dataset: Path) -> None:
    failed = run_cli("eval", tiny_run, "--data", tiny_dataset, "--max-perplexity", "1.01")
    assert failed.exit_code == 1
    assert len(failed.stderr.strip().splitlines()) == 1
    assert "gate failed: perplexity" in failed.stderr
    passed = run_cli("evaluate", tiny_run, "--data", tiny_dataset, "--max-perplexity", "1e9")
    assert passed.exit_code == 0


def test_eval_on_a_raw_jsonl_file(tiny_run: Path, tmp_path: Path) -> None:
    from llmkit.data.corpus import STORIES, generate

    texts = [d.text for d in generate(STORIES, 60, seed=123)]
    source = tmp_path / "held_out.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    report_path = tmp_path / "raw.json"
    result = run_cli("eval", tiny_run, "--data", source, "--report", report_path)
    assert result.exit_code == 0, result.stderr
    report = json.loads(report_path.read_text())
    total_chars = sum(len(t) for t in texts)
    assert 0.9 * total_chars < report["chars"] <= total_chars  # only the first token of each window is unscored
    assert 0 < report["bits_per_char"] < 8


def test_export_logits_equal_the_trained_model(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = run_cli("export", tiny_run, "--out", out)
    assert result.exit_code == 0, result.stderr
    trained = AutoModelForCausalLM.from_pretrained(tiny_run / "final").eval()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(trained(ids).logits, exported(ids).logits)
    report = json.loads((out / "export_report.json").read_text())
    assert report["max_abs_logit_diff"] == 0.0 and report["greedy_agreement"] == 1.0

    half = tmp_path / "bf16"
    assert (
        run_cli("export", tiny_run / "checkpoints" / "step-00000030", "--out", half, "--dtype", "bfloat16").exit_code
        == 0
    )
    assert AutoModelForCausalLM.from_pretrained(half).dtype == torch.bfloat16
    assert json.loads((half / "export_report.json").read_text())["greedy_agreement"] > 0.8


def test_exported_model_loads_without_llmkit(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "standalone"
    assert run_cli("export", tiny_run, "--out", out).exit_code == 0
    script = (
        "import sys; sys.modules['llmkit'] = None\n"  # any import of llmkit would now fail
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "ids = t('Once upon a time', return_tensors='pt').input_ids\n"
        "print(t.decode(m.generate(ids, max_new_tokens=5, do_sample=False)[0]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ""},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Once upon a time")


def test_generate_streams_and_is_seeded(tiny_run: Path) -> None:
    args = [
        "generate",
        str(tiny_run),
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "12",
        "--seed",
        "7",
    ]
    first, second = run_cli(*args), run_cli(*args)
    assert first.exit_code == 0, first.stderr
    assert first.stdout.startswith("Once upon a time") and first.stdout == second.stdout
    greedy = run_cli("generate", str(tiny_run), "--prompt", "One day", "--temperature", "0", "--max-new-tokens", "8")
    assert greedy.exit_code == 0 and greedy.stdout.startswith("One day")
    bad = run_cli("generate", str(tiny_run), "--prompt", "One day", "--top-p", "1.5", "--max-new-tokens", "0")
    assert_user_error(bad, "--max-new-tokens 0 (need >= 1)", "--top-p 1.5 (need in (0, 1])")
    assert "temperature" not in bad.stderr and "top-k" not in bad.stderr


def test_init_from_continues_training(tiny_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "continued"
    result = run_cli(
        "pretrain",
        *tiny_train_args(tiny_dataset, out, steps=5),
        "--init-from",
        tiny_run / "final",
        "--set",
        "logging.every_steps=1",
        "--lr",
        "1e-4",
    )
    assert result.exit_code == 0, result.stderr
    first = read_metrics(out)[0]["loss"]
    fresh = [r["loss"] for r in read_metrics(tiny_run) if "loss" in r][0]
    assert first < fresh * 0.8  # starts from the trained weights, not from scratch


def test_bf16_autocast_trains_on_cpu(tiny_dataset: Path, tmp_path: Path) -> None:
    result = run_cli("pretrain", *tiny_train_args(tiny_dataset, tmp_path / "bf16", steps=6), "--precision", "bf16")
    assert result.exit_code == 0, result.stderr
    assert all(math.isfinite(r.get("loss", 0.0)) for r in read_metrics(tmp_path / "bf16"))


def test_early_stopping_stops_when_validation_stalls(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "early"
    args = tiny_train_args(tiny_dataset, out, steps=40)
    result = run_cli(
        "pretrain",
        *args,
        "--set",
        "train.early_stopping_patience=1",
        "--set",
        "train.early_stopping_min_delta=100",
    )  # nothing counts as an improvement
    assert result.exit_code == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 20  # evals at 10 (best) and 20 (no improvement)
    assert (out / "final" / "model.safetensors").is_file()


def test_gradient_accumulation_matches_a_bigger_batch(tiny_dataset: Path, tmp_path: Path) -> None:
    common = [
        "--set",
        "train.eval_every=1000",
        "--set",
        "logging.every_steps=1",
        "--set",
        "checkpoint.every_steps=1000",
    ]
    big = run_cli(
        "pretrain",
        *tiny_train_args(tiny_dataset, tmp_path / "big", steps=3),
        "--micro-batch-size",
        "8",
        *common,
    )
    acc = run_cli(
        "pretrain",
        *tiny_train_args(tiny_dataset, tmp_path / "acc", steps=3),
        *common,
        "--micro-batch-size",
        "4",
        "--set",
        "train.grad_accum_steps=2",
    )
    assert big.exit_code == acc.exit_code == 0
    # Same blocks in each step? No: the loader shuffles per micro-batch size; compare the first step's loss,
    # which sees different blocks, only loosely, and the token accounting exactly.
    big_m, acc_m = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "acc")
    assert [r["tokens"] for r in big_m] == [r["tokens"] for r in acc_m]
    assert big_m[0]["loss"] == pytest.approx(acc_m[0]["loss"], rel=0.05)


def test_schedules() -> None:
    cosine = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 110, 1.0, cosine) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    linear = ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(50, 101, 2.0, linear) == pytest.approx(1.0)
    exponential = ScheduleConfig(name="exponential", warmup_steps=0, min_lr_ratio=0.01)
    assert lr_at(50, 101, 1.0, exponential) == pytest.approx(0.1)
    constant = ScheduleConfig(name="constant", warmup_steps=5)
    assert lr_at(2, 100, 1.0, constant) == pytest.approx(0.6) and lr_at(99, 100, 1.0, constant) == 1.0
    wsd = ScheduleConfig(name="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    lrs = [lr_at(s, 100, 2.0, wsd) for s in range(100)]
    assert lrs[9] == lrs[10] == lrs[79] == 2.0  # warmup, then stable at the peak until the last 20 steps
    assert lrs[80] == pytest.approx(2.0 * (1 - 0.05**0.5)) and lrs[89] == pytest.approx(2.0 * (1 - 0.5**0.5))
    assert lrs[99] == 0.0 and all(a > b for a, b in zip(lrs[80:], lrs[81:], strict=False))


def test_budgets_convert_to_steps() -> None:
    assert steps_for_budget(TrainConfig(max_steps=7), 100, 1000) == 7
    assert steps_for_budget(TrainConfig(max_tokens=10_500), 100, 1000) == 11
    assert steps_for_budget(TrainConfig(max_epochs=2, grad_accum_steps=4), 100, 1000) == 50
    assert steps_for_budget(TrainConfig(), 100, 1000) == 100  # one epoch by default


def test_loader_position_restores_exactly_and_covers_each_epoch(tiny_dataset: Path) -> None:
    split = open_dataset(tiny_dataset).split("train")
    loader = BlockLoader(split, micro_batch_size=4, seed=3)
    for _ in range(loader.batches_per_epoch - 2):
        loader.next_indices()
    state = loader.position.state_dict()
    expected = [loader.next_indices() for _ in range(5)]  # crosses the epoch boundary
    restored = BlockLoader(split, micro_batch_size=4, seed=3)
    restored.position.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(expected, [restored.next_indices() for _ in range(5)], strict=True))
    fresh = BlockLoader(split, micro_batch_size=4, seed=3)
    epoch = np.concatenate([fresh.next_indices() for _ in range(fresh.batches_per_epoch)])
    assert len(set(epoch.tolist())) == len(epoch)  # no block twice within an epoch
    ranks = [BlockLoader(split, micro_batch_size=2, seed=3, rank=r, world=2) for r in range(2)]
    together = np.concatenate([r.next_indices() for r in ranks])
    assert np.array_equal(together, BlockLoader(split, micro_batch_size=4, seed=3).next_indices())


def test_reading_ahead_on_a_thread_hands_out_what_reading_each_step_does(tiny_dataset: Path) -> None:
    """train.read_ahead (on for CUDA GPUs, off on CPU): the same batches in the same order, and after each step the
    position of the step handed out, not of the step read ahead (what a checkpoint saves)."""
    import threading

    split = open_dataset(tiny_dataset).split("train")
    outcomes = []
    for background in (True, False):
        reader = ReadAhead(BlockLoader(split, micro_batch_size=2, seed=5), per_step=3, pin=False, background=background)
        steps = []
        for _ in range(4):
            batches = [reader.next_batch()["input_ids"] for _ in range(3)]
            steps.append((torch.cat(batches), reader.position.state_dict()))
        threads = {t.name.split("_")[0] for t in threading.enumerate()}
        assert ("llmkit-read-ahead" in threads) == background
        reader.close()
        outcomes.append(steps)
    (ahead, in_step), fresh = outcomes, BlockLoader(split, micro_batch_size=2, seed=5)
    for (tokens, position), (expected, expected_position) in zip(ahead, in_step, strict=True):
        assert torch.equal(tokens, expected) and position == expected_position
        assert torch.equal(tokens, torch.cat([fresh.next_batch()["input_ids"] for _ in range(3)]))


def test_gradient_checkpointing_keeps_the_losses(tiny_dataset: Path, tmp_path: Path) -> None:
    """(torch.compile's losses and artifacts are checked in tests/test_gpu_defaults*.py.)"""
    lever, tolerance = ["--gradient-checkpointing"], 1e-6
    common = [
        "--set",
        "logging.every_steps=1",
        "--set",
        "train.eval_every=1000",
        "--set",
        "checkpoint.every_steps=1000",
    ]
    plain = run_cli("pretrain", *tiny_train_args(tiny_dataset, tmp_path / "plain", steps=4), *common)
    levered = run_cli("pretrain", *tiny_train_args(tiny_dataset, tmp_path / "lever", steps=4), *common, *lever)
    assert plain.exit_code == levered.exit_code == 0, levered.stderr
    expected = [r["loss"] for r in read_metrics(tmp_path / "plain") if "loss" in r]
    assert [r["loss"] for r in read_metrics(tmp_path / "lever") if "loss" in r] == pytest.approx(
        expected, rel=tolerance
    )
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "lever" / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_a_failed_compilation_falls_back_to_eager_in_one_line(tiny_dataset: Path, tmp_path: Path) -> None:
    """A machine without a working C++ compiler (a real inductor failure): --compile says so once and trains
    eagerly; the failed forward computed nothing, so the losses are the eager run's exactly."""
    import os
    import subprocess
    import sys

    settings = tiny_train_args(tiny_dataset, tmp_path / "unused", steps=3)[4:]  # all but --data and --out
    common = [*settings, "--set", "logging.every_steps=1"]
    eager = run_cli("pretrain", "--data", tiny_dataset, "--out", tmp_path / "eager", *common, "--no-compile")
    assert eager.exit_code == 0, eager.stderr
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    compiled = subprocess.run(
        [sys.executable, "-m", "llmkit", "pretrain", "--data", str(tiny_dataset), "--out", str(tmp_path / "compiled"),
         *common, "--compile"], env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    notices = [line for line in (compiled.stdout + compiled.stderr).splitlines() if "torch.compile failed" in line]
    assert len(notices) == 1 and "training eagerly" in notices[0], compiled.stdout + compiled.stderr
    assert "Traceback" not in compiled.stderr

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(run) if "loss" in r]

    assert losses(tmp_path / "compiled") == losses(tmp_path / "eager")


def test_every_process_validates_as_many_batches(tiny_dataset: Path) -> None:
    """A process without validation batches would skip what the others run (a hang under ZeRO-3, found with 3
    processes and eval_batches=2): batches are rounded up to a multiple of the processes, or none at all."""
    from llmkit.train.loader import validation_batches

    val = open_dataset(tiny_dataset).split("val")
    for world, asked in ((3, 2), (2, 3), (1, 5), (3, None)):
        counts = [len(validation_batches(val, 2, asked, rank, world)) for rank in range(world)]
        assert len(set(counts)) == 1 and counts[0] > 0, (world, asked, counts)
        assert asked is None or counts[0] * world == -(-asked // world) * world
    every = {
        tuple(b["input_ids"].flatten().tolist()) for rank in range(3) for b in validation_batches(val, 2, 2, rank, 3)
    }
    assert len(every) == 3  # three distinct batches, one per process
    assert all(len(validation_batches(val, len(val), None, rank, 2)) == 0 for rank in range(2))  # none for all
