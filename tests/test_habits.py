"""What people coming from the Hugging Face ecosystem expect: whole help text, --version and completion, bundled
recipes, experiment trackers, clean output, compressed corpora, push to the Hub."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from llmkit.cli import app
from tests.conftest import TINY_MODEL, assert_nothing_written, assert_user_error, run_cli

LLMKIT = [sys.executable, "-m", "llmkit"]


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = []
    for name, command in group.commands.items():
        found.append(((*prefix, name), command))
        if hasattr(command, "commands"):  # a group (Typer's own click)
            found += _commands(command, (*prefix, name))
    return found


@pytest.mark.parametrize("columns", ["80", "40"])
def test_every_option_name_prints_whole_at_narrow_widths(columns: str) -> None:
    root = typer.main.get_command(app)
    commands = [((), root), *_commands(root)]
    assert len(commands) > 15
    for path, command in commands:
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": columns})
        assert result.exit_code == 0, (path, result.output)
        names = [name for param in command.params for name in (*param.opts, *param.secondary_opts)
                 if name.startswith("-")]  # fmt: skip
        for name in names:
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", result.output), (path, name, result.output)
        assert "…" not in result.output, (path, result.output)
        if columns == "80":  # narrower, click keeps 50 columns and still prints every name whole
            assert max(len(line) for line in result.output.splitlines()) <= 80, (path, result.output)


def test_version_and_shell_completion() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"llmkit {version('llmkit')}"
    entry_point = str(Path(sys.executable).parent / "llmkit")  # the script a shell completes
    # Typer finds the shell among the command's ancestors, so ask from inside bash, as a user at a prompt does
    # (`; true` keeps bash from exec-ing the command in its own place).
    script = subprocess.run(["bash", "-c", f'"{entry_point}" --show-completion; true'], capture_output=True, text=True)
    assert script.returncode == 0 and "_llmkit_completion" in script.stdout and "complete " in script.stdout
    env = {**os.environ, "_LLMKIT_COMPLETE": "complete_bash", "COMP_WORDS": "llmkit fine", "COMP_CWORD": "1"}
    completed = subprocess.run([entry_point], env=env, capture_output=True, text=True)  # what the shell script runs
    assert completed.returncode == 0 and "finetune" in completed.stdout


def test_recipes_are_listed_shown_and_usable_by_name(tmp_path: Path) -> None:
    listing = run_cli("recipes")
    assert listing.exit_code == 0
    for name, words in (("tiny-cpu", "2 CPU cores"), ("llama-1b", "8 x A100/H100"), ("sft-lora", "16 GB")):
        line = next(line for line in listing.stdout.splitlines() if line.startswith(f"│ {name} "))
        assert words.split()[0] in line, line
    assert "llmkit pretrain --config tiny-cpu" in listing.stdout.replace("│", "").replace("  ", " ")
    shown = run_cli("recipes", "show", "tiny-cpu")
    assert shown.exit_code == 0 and shown.stdout == (Path("llmkit/recipes/tiny-cpu.yaml")).read_text()
    assert json.loads(run_cli("recipes", "show", "deepspeed/zero3").stdout)["zero_optimization"]["stage"] == 3
    resolved = run_cli("config", "show", "tiny-cpu", "--set", "train.max_steps=7")
    assert resolved.exit_code == 0 and "max_steps: 7" in resolved.stdout
    as_training_takes_it = run_cli("config", "show", "--config", "tiny-cpu", "--set", "train.max_steps=7")
    assert as_training_takes_it.stdout == resolved.stdout
    defaults = run_cli("config", "show")
    assert defaults.exit_code == 0 and "max_steps: 7" not in defaults.stdout and "n_layers:" in defaults.stdout
    assert_user_error(run_cli("config", "show", "tiny-cpu", "-c", "sft-full"), "two recipes", "give one")
    planned = run_cli("plan", "--config", "tiny-cpu", "--json")  # as `llmkit pretrain --config tiny-cpu` reads it
    assert planned.exit_code == 0 and json.loads(planned.stdout) == json.loads(
        run_cli("plan", "tiny-cpu", "--json").stdout
    )
    assert_user_error(run_cli("plan"), "give a recipe: RECIPE or --config")
    assert_user_error(run_cli("recipes", "show", "tiny"), "no bundled recipe 'tiny'", "tiny-cpu")
    assert_user_error(run_cli("config", "show", "no-such-recipe"), "config file not found", "llmkit recipes")


def _wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending, records = path.read_bytes(), 7, b"", []  # 7: the ':W&B' header
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # a block's tail too short for a record header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_trackers_log_metrics_config_and_summary_and_continue_on_resume(tiny_dataset: Path, tmp_path: Path) -> None:
    """W&B offline, MLflow in a local database, Trackio in a local folder: the real libraries, read back."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("trackio")
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "TRACKIO_DIR": str(tmp_path / "trackio"), "CI": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [*LLMKIT, "pretrain", "--data", str(tiny_dataset), "--out", str(out), *TINY_MODEL, "--micro-batch-size",
            "4", "--set", "logging.every_steps=2", "--set", "train.eval_every=4", "--set", "train.eval_batches=2",
            "--set", "checkpoint.every_steps=3", "--set", "logging.report_to=[tensorboard,wandb,mlflow,trackio]",
            "--set", "logging.project=habits"]  # fmt: skip
    first = subprocess.run([*args, "--max-steps", "6"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "wandb: offline run in" in first.stdout and "mlflow: run" in first.stdout and "trackio: run" in first.stdout
    ids = json.loads((out / "trackers.json").read_text())
    second = subprocess.run([*args, "--max-steps", "10", "--resume", "auto"], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((out / "trackers.json").read_text()) == ids  # the same tracker runs, continued
    for output in (first, second):
        assert "Trackio" not in output.stdout + output.stderr and "wandb: Run history" not in output.stdout
    logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    losses = {r["step"]: r["loss"] for r in logged}
    assert sorted(losses) == [2, 4, 6, 8, 10]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(ids["mlflow"])
    history = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "train/loss")}
    assert history == pytest.approx(losses)
    assert run.data.params["optimizer.lr"] and run.data.params["logging.project"] == "habits"
    assert run.data.metrics["summary/steps"] == 10 and "val/loss" in run.data.metrics

    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(d.name.endswith(ids["wandb"]) for d in runs)
    records = [r for d in runs for r in _wandb_records(next(d.glob("*.wandb")))]
    history_loss = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            if "train/loss" in items:
                history_loss[int(items["_step"])] = float(items["train/loss"])
    assert history_loss == pytest.approx(losses)
    config = {u.key: u.value_json for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert json.loads(config["model.n_layers"]) == 2

    read = "import json; from trackio.sqlite_storage import SQLiteStorage; "
    read += "print(json.dumps(SQLiteStorage.get_logs('habits', 'run')))"
    logs = json.loads(
        subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, check=True).stdout
    )
    trackio_loss = {log["step"]: log["train/loss"] for log in logs if "train/loss" in log}
    assert trackio_loss == pytest.approx(losses)


def test_a_missing_tracker_library_is_one_line(tiny_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = run_cli(
        "pretrain", "--data", tiny_dataset, "--out", tmp_path / "run", "--set", "logging.report_to=[wandb]"
    )
    assert_user_error(result, "logging.report_to: wandb is not installed", "llmkit[trackers]")
    assert_nothing_written(tmp_path, "run")
    bad = run_cli("pretrain", "--data", tiny_dataset, "--out", tmp_path / "run", "--set", "logging.report_to=[neptune]")
    assert_user_error(bad, "logging.report_to", "neptune")
    monkeypatch.undo()
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    unreachable = run_cli("pretrain", "--data", tiny_dataset, "--out", tmp_path / "run", "--max-steps", "1",
                          *TINY_MODEL, "--set", "logging.report_to=[mlflow]")  # fmt: skip
    assert_user_error(unreachable, "logging.report_to: mlflow could not start", "nosuchscheme")


def test_library_warnings_are_one_whole_line_each(tiny_run: Path, tmp_path: Path) -> None:
    """A LoRA fine-tune triggers a transformers deprecation inside peft: shown once, whole, with its source."""
    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Color {i}?"},
                                                     {"role": "assistant", "content": "Red."}]}) + "\n"
                            for i in range(40)))  # fmt: skip
    command = [*LLMKIT, "finetune", "--model", str(tiny_run), "--data", str(rows), "--out", str(tmp_path / "lora"),
               "--method", "lora", "--max-steps", "2", "--micro-batch-size", "4", "--max-length", "64",
               "--set", "logging.report_to=[]"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    output = run.stdout + run.stderr
    assert "warnings.warn(" not in output and "Warning:" not in output.replace("warning: ", "")
    warned = [line for line in run.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == len(set(warned))
    assert all(re.search(r"\((\w+Warning) from [\w/.-]+\.py:\d+\)$", line) for line in warned), warned
    assert all(line.startswith("warning: ") for line in run.stderr.splitlines() if line.strip()), run.stderr


def test_a_log_reads_the_eta_at_the_recent_pace_without_a_resumed_runs_steps(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Off a terminal (a Slurm or CI log) progress is a line every 10 s; its ETA is at the pace since the line before
    (not start-up's) and leaves out the steps a resumed run had already done."""
    from llmkit import console

    class Clock:  # the seconds the lines are printed at
        now = 0.0

        @classmethod
        def monotonic(cls) -> float:
            return cls.now

    monkeypatch.setattr(console, "time", Clock)
    with console.progress_bar("training", 400, completed=100) as update:
        update(0, "starting")
        for now, steps in ((10, 10), (20, 40), (25, 5), (30, 5)):  # 1 step/s, then 4, then 1
            Clock.now = now
            update(steps, "loss 1.0")
        Clock.now = 31
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "training: 110/400 loss 1.0 [10.0s, ETA 4m50s]",  # 290 steps at 1 step/s: not 110 steps in 10 s
        "training: 150/400 loss 1.0 [20.0s, ETA 1m02s]",  # 250 at 4 steps/s
        "training: 160/400 loss 1.0 [30.0s, ETA 4m00s]",  # 240 at 1 step/s (10 steps in 10 s)
        "training: 160/400 loss 1.0 [31.0s]",
    ]


def test_compressed_corpora_read_as_the_plain_files(tmp_path: Path) -> None:
    import zstandard

    from llmkit.data.corpus import BUILTIN_CORPORA, generate

    texts = [doc.text for doc in generate(BUILTIN_CORPORA["stories"], 300, 0)]
    jsonl = "".join(json.dumps({"text": t}) + "\n" for t in texts[:150]).encode()
    txt = "".join(t.replace("\n", " ") + "\n\n" for t in texts[150:]).encode()
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir(), packed.mkdir()
    (plain / "a.jsonl").write_bytes(jsonl)
    (plain / "b.txt").write_bytes(txt)
    (packed / "a.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (packed / "b.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(txt))
    (packed / "extra.jsonl.bz2").write_bytes(bz2.compress(b""))
    manifests = []
    for folder in (plain, packed):
        out = tmp_path / f"{folder.name}-data"
        result = run_cli("data-prep", folder, "--out", out, "--vocab-size", "300", "--block-size", "32")
        assert result.exit_code == 0, result.stderr
        manifests.append(json.loads((out / "manifest.json").read_text()))
    assert manifests[0]["documents"] == manifests[1]["documents"] and manifests[0]["documents"]["kept"] > 150
    assert manifests[0]["splits"] == manifests[1]["splits"]
    assert manifests[0]["tokenizer"]["hash"] == manifests[1]["tokenizer"]["hash"]
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(jsonl)[:300])
    result = run_cli("data-prep", broken, "--out", tmp_path / "b", "--vocab-size", "300")
    assert_user_error(result, "broken.jsonl.gz: damaged or truncated .gz file")
    assert_nothing_written(tmp_path, "b")
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    assert_user_error(run_cli("data-prep", tmp_path / "x.parquet.gz", "--out", tmp_path / "c"), "unsupported file type")


def test_push_to_hub_fails_in_one_line_before_any_work(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "export"
    offline = run_cli("export", tiny_run, "--out", out, "--push-to-hub", "me/tiny")
    assert_user_error(offline, "--push-to-hub me/tiny", "cannot be reached", "hf upload")
    assert_nothing_written(tmp_path, "export")
    assert_user_error(run_cli("export", tiny_run, "--out", out, "--push-to-hub", "not a repo"), "OWNER/NAME")
    import huggingface_hub.constants

    import llmkit.hub

    with socket.create_server(("127.0.0.1", 0)) as server:  # a Hub endpoint that answers, and no token anywhere
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setattr(llmkit.hub, "_reachable", None)
        no_token = run_cli("export", tiny_run, "--out", out, "--push-to-hub", "me/tiny")
    assert_user_error(no_token, "--push-to-hub me/tiny: no Hugging Face token", "HF_TOKEN")
    assert_nothing_written(tmp_path, "export")
