"""Nothing lost, round two: each defect found by adversarial use, driven through the real CLI.

An output never swallows an input; one job owns a run directory; a finished run resumed changes nothing; every
stop by signal ends in 75; non-finite numbers never enter a config or a checkpoint; undecodable bytes are named;
context lengths are respected; full and read-only disks give one line; memory is bounded per document.
"""

from __future__ import annotations

import hashlib
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

from llmkit.outputs import lock_path, output_lock
from llmkit.train.checkpoint import COMPLETE, complete_checkpoints
from tests.conftest import TINY_MODEL, assert_nothing_written, assert_user_error, run_cli, tiny_train_args
from tests.test_finetune import write_chat_rows


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (or the file itself) with its sha256: what 'changed nothing' is checked against."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def strict_json(path: Path) -> object:
    """JSON as the standard defines it: NaN and Infinity are not JSON."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{path}: {name} is not valid JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the shared tiny run (30 steps, checkpoints at 10, 20, 30), safe to resume or damage."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(3):
        (folder / f"part{i}.txt").write_text(f"Story number {i}. " * 200 + "\n")
    return folder


# --- 1-3, 19, 27: no command deletes or overwrites what it reads, or a folder holding it -------------------------


def test_data_prep_never_swallows_its_sources(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(corpus)
    small = ["--vocab-size", "300", "--block-size", "16"]
    assert_user_error(run_cli("data-prep", corpus, "--out", corpus, "--overwrite", *small), "which this command reads")
    file = corpus / "part0.txt"
    assert_user_error(run_cli("data-prep", file, "--out", file, "--overwrite", *small), "is a file")
    assert_user_error(run_cli("data-prep", file, "--out", tmp_path, "--overwrite", *small), "contains")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the source is not below: only the current directory is at stake
    assert_user_error(run_cli("data-prep", file, "--out", ".", "--overwrite", *small), "current directory")
    assert snapshot(corpus) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "elsewhere"]  # no staging left anywhere


def test_training_and_export_never_swallow_their_inputs(run_copy: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    data_before, run_before = snapshot(tiny_dataset), snapshot(run_copy)
    pretrain = run_cli("pretrain", *tiny_train_args(tiny_dataset, tiny_dataset, steps=2), "--overwrite")
    assert_user_error(pretrain, "--out", "which this command reads")
    rows = write_chat_rows(tmp_path / "chat.jsonl", 40)
    finetune = run_cli("finetune", "--model", run_copy, "--data", rows, "--out", run_copy, "--overwrite")
    assert_user_error(finetune, "contains", "final")
    assert_user_error(run_cli("export", run_copy, "--out", run_copy, "--overwrite"), "which this command reads")
    assert snapshot(tiny_dataset) == data_before and snapshot(run_copy) == run_before
    plain = tmp_path / "notes.txt"
    plain.write_text("mine")
    assert_user_error(run_cli("export", run_copy, "--out", plain, "--overwrite"), "is a file")
    assert plain.read_text() == "mine"


def test_eval_reports_never_overwrite_inputs_or_folders(run_copy: Path, tmp_path: Path) -> None:
    text = tmp_path / "held_out.txt"
    text.write_text("Once upon a time there was a cat. " * 20)
    assert_user_error(run_cli("eval", run_copy, "--data", text, "--report", text), "is an input")
    folder = tmp_path / "reports"
    folder.mkdir()
    assert_user_error(run_cli("eval", run_copy, "--data", text, "--report", folder), "is a folder")
    assert text.read_text().startswith("Once upon") and list(folder.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    run_before = snapshot(run_copy)
    config = run_copy / "final" / "config.json"
    assert_user_error(run_cli("eval", run_copy, "--data", text, "--markdown", config), f"is inside {run_copy}")
    summary = run_copy / "summary.json"  # the run's validation loss, which monitor's drift reads
    assert_user_error(run_cli("eval", run_copy, "--data", text, "--junit", summary), "is an input")
    assert snapshot(run_copy) == run_before
    same = tmp_path / "r.json"
    assert_user_error(run_cli("eval", run_copy, "--data", text, "--report", same, "--junit", same), "two reports")
    beside = run_cli("eval", run_copy, "--data", text, "--report", run_copy / "eval.json")  # what export's card reads
    assert beside.exit_code == 0, beside.stderr
    # a gate or a limit that cannot be read fails before the model is even looked for, not after the scoring
    missing = tmp_path / "no-such-model"
    assert_user_error(run_cli("eval", missing, "--data", text, "--gate", "perplexity<<3"), "perplexity<<3")
    assert_user_error(run_cli("eval", missing, "--data", text, "--max-regression", "-1"), "--max-regression -1")


def test_an_output_inside_the_source_folder_is_never_read_as_data(corpus: Path) -> None:
    args = ["data-prep", corpus, "--out", corpus / "prepared", "--vocab-size", "300", "--block-size", "16"]
    first = run_cli(*args)
    assert first.exit_code == 0, first.stderr
    manifest = json.loads((corpus / "prepared" / "manifest.json").read_text())
    assert len(manifest["sources"]) == 3  # the three parts, not the dataset's own files
    again = run_cli(*args)
    assert again.exit_code == 0, again.stderr  # the identical second run reuses its output
    assert json.loads((corpus / "prepared" / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]


# --- 4: one owner per output ------------------------------------------------------------------------------------


def test_a_second_job_on_one_output_is_refused_with_the_holder(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with output_lock(out):
        second = run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=2), "--resume", "auto")
        line = assert_user_error(second, "in use by", f"pid {os.getpid()}", "on host")
        prep = run_cli("data-prep", "builtin:stories", "--out", out, "--vocab-size", "300")
        assert_user_error(prep, "in use by")
    assert "two jobs" in line and not out.exists()


def test_a_killed_holder_leaves_no_lock_that_blocks_the_requeue(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from llmkit.outputs import output_lock\n"
         f"with output_lock({str(out)!r}):\n print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    assert_user_error(run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=2)), f"pid {holder.pid}")
    holder.kill()
    holder.wait()
    assert lock_path(out).exists()  # the stale file of the killed job...
    requeued = run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=2), "--resume", "auto")
    assert requeued.exit_code == 0, requeued.stderr  # ...does not block the requeue
    assert not lock_path(out).exists()  # and the finished job removed its own


# --- 5: a finished run resumed changes nothing; a smaller budget is an error ---------------------------------------


def test_a_finished_run_resumed_changes_nothing(run_copy: Path, tiny_dataset: Path) -> None:
    before = snapshot(run_copy)
    again = run_cli("pretrain", *tiny_train_args(tiny_dataset, run_copy, steps=30), "--resume", "auto")
    assert again.exit_code == 0, again.stderr
    assert "finished at step 30" in again.stderr and "nothing to do" in again.stderr
    assert "tokens/s" not in again.stdout
    assert snapshot(run_copy) == before
    smaller = run_cli("pretrain", *tiny_train_args(tiny_dataset, run_copy, steps=10), "--resume", "auto")
    assert_user_error(smaller, "step 30", "budget of 10 steps")
    assert snapshot(run_copy) == before
    strict_json(run_copy / "summary.json")


def test_a_larger_budget_continues_a_finished_run_with_honest_figures(run_copy: Path, tiny_dataset: Path) -> None:
    more = run_cli("pretrain", *tiny_train_args(tiny_dataset, run_copy, steps=35), "--resume", "auto")
    assert more.exit_code == 0, more.stderr
    summary = strict_json(run_copy / "summary.json")
    assert isinstance(summary, dict) and summary["steps"] == 35 and summary["run_tokens"] == 5 * 8 * 32
    assert summary["tokens_per_second"] == pytest.approx(summary["run_tokens"] / summary["seconds"])


# --- 6, 11: every stop by signal ends in 75 ------------------------------------------------------------------------


def _llmkit(*args: str | Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "llmkit", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _long_run(data: Path, out: Path) -> list[str]:
    return ["pretrain", *tiny_train_args(data, out, steps=100_000), "--set", "checkpoint.every_steps=100000",
            "--set", "logging.every_steps=1"]  # fmt: skip


def _training(out: Path) -> bool:
    metrics = out / "metrics.jsonl"
    return metrics.is_file() and len(metrics.read_text().splitlines()) >= 2


def test_sigterm_during_start_up_exits_75(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "LLMKIT_FAULT_INJECT": "term@startup"}
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", *map(str, _long_run(tiny_dataset, out))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _, stderr = proc.communicate(timeout=120)  # a real SIGTERM, sent once the run owns its directory
    assert proc.returncode == 75, stderr
    assert stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM during start-up")
    assert "Traceback" not in stderr and not lock_path(out).exists()
    assert complete_checkpoints(out / "checkpoints") == []


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_a_second_sigterm_during_shutdown_still_exits_75(delay: float, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _llmkit(*_long_run(tiny_dataset, out))
    _wait_for(lambda: _training(out))
    proc.send_signal(signal.SIGTERM)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert len(complete_checkpoints(out / "checkpoints")) == 1


def test_ctrl_c_checkpoints_and_exits_75(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _llmkit(*_long_run(tiny_dataset, out))
    _wait_for(lambda: _training(out))
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert "SIGINT received: finishing this step" in stderr and "Ctrl-C again to stop at once" in stderr
    (checkpoint,) = complete_checkpoints(out / "checkpoints")
    assert f"checkpoint {checkpoint}" in stderr and "--resume auto" in stderr


def test_a_second_ctrl_c_stops_at_once_and_names_what_was_kept(tmp_path: Path) -> None:
    """Python runs a handler once for signals that arrive during one long operation, so the second Ctrl-C is
    checked on the handler itself; the first one is checked end to end above."""
    from llmkit.train.signals import INTERRUPTED_EXIT, Stopped, StopSignals

    (tmp_path / "checkpoints" / "step-00000040").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000040" / COMPLETE).write_text("{}")
    state = StopSignals()
    with pytest.raises(Stopped, match="during start-up"):
        state._handle(signal.SIGTERM, None)
    state = StopSignals()
    state.phase, state.run_dir = "training", tmp_path
    state._handle(signal.SIGINT, None)
    assert state.reason == "SIGINT"
    state._handle(signal.SIGTERM, None)  # another kind of signal: already stopping
    with pytest.raises(Stopped) as stopped:
        state._handle(signal.SIGINT, None)
    assert stopped.value.exit_code == INTERRUPTED_EXIT
    assert "kept: " in str(stopped.value) and "step-00000040" in str(stopped.value)
    state.phase = "stopping"
    state._handle(signal.SIGINT, None)  # during shutdown nothing changes


# --- 7: non-finite numbers ----------------------------------------------------------------------------------------


def test_non_finite_numbers_are_refused_and_never_saved(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    for value, fragment in (("inf", "finite"), ("nan", "finite"), ("1e300", "beyond float32")):
        result = run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=2), "--lr", value)
        assert_user_error(result, "optimizer.lr", fragment)
    assert_nothing_written(tmp_path, "run")
    # Decoupled decay so large that one step makes every weight non-finite while that step's loss was finite: the
    # next step's loss is not, and the run stops (exit 3) saving nothing rather than a checkpoint of such weights.
    huge = ["--lr", "1e30", "--set", "optimizer.weight_decay=1e10", "--set", "schedule.warmup_steps=0"]
    diverged = run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=20), *huge)
    assert diverged.exit_code == 3, diverged.stderr
    assert "not finite" in diverged.stderr and "the run has no checkpoint" in diverged.stderr
    assert complete_checkpoints(out / "checkpoints") == []


# --- 8, 16: resume refuses a model change; branching a run works ------------------------------------------------


def test_resume_refuses_a_model_change(run_copy: Path, tiny_dataset: Path) -> None:
    checkpoint = complete_checkpoints(run_copy / "checkpoints")[0]
    before = snapshot(run_copy)
    for flag in ("--allow-config-change", "--resume-fallback"):  # neither lets the model change
        changed = run_cli("pretrain", *tiny_train_args(tiny_dataset, run_copy, steps=30), "--resume", checkpoint,
                          "--set", "model.n_layers=3", flag)  # fmt: skip
        assert_user_error(changed, "model.n_layers 2 -> 3", "another --out")
    assert snapshot(run_copy) == before


def test_resume_from_another_runs_checkpoint_branches_into_a_new_run(run_copy: Path, tiny_dataset: Path) -> None:
    checkpoint = complete_checkpoints(run_copy / "checkpoints")[0]  # step 10
    before = snapshot(run_copy)
    branch = run_copy.parent / "branch"
    result = run_cli("pretrain", *tiny_train_args(tiny_dataset, branch, steps=30), "--resume", checkpoint)
    assert result.exit_code == 0, result.stderr
    assert snapshot(run_copy) == before
    assert "branching from" in result.stdout + result.stderr
    a, b = load_file(branch / "final" / "model.safetensors"), load_file(run_copy / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same steps 11-30 from the same state: the same model
    steps = [r["step"] for r in map(json.loads, (branch / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and steps[0] == 5 and steps[-1] == 30  # the history up to 10, then its own


# --- 9, 24: encodings and byte-order marks ---------------------------------------------------------------------------


def test_undecodable_bytes_are_named_and_encoding_is_explicit(tmp_path: Path) -> None:
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Un café au lait, s'il vous plaît.\n".encode("latin-1") * 50)
    line = assert_user_error(
        run_cli("data-prep", latin, "--out", tmp_path / "ds"), "latin.txt", "offset 6", "--encoding"
    )
    assert "0xe9" in line
    noise = tmp_path / "noise.txt"
    noise.write_bytes(os.urandom(20_000).replace(b"\n", b" ") + b"\xff")
    assert_user_error(run_cli("data-prep", noise, "--out", tmp_path / "ds"), "noise.txt", "not valid utf-8")
    wide = tmp_path / "wide.txt"  # as Windows' "Unicode" saves text: UTF-16 with its byte-order mark
    wide.write_text("Un café au lait.\n" * 50, encoding="utf-16")
    assert_user_error(run_cli("data-prep", wide, "--out", tmp_path / "ds"), "utf-16 byte-order mark: --encoding utf-16")
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert_user_error(run_cli("data-prep", rows, "--out", tmp_path / "ds"), "rows.jsonl:2", "offset 30")
    assert_nothing_written(tmp_path, "ds")
    ok = run_cli("data-prep", latin, "--out", tmp_path / "ds", "--encoding", "latin-1", "--vocab-size", "300",
                 "--block-size", "16", "--val-fraction", "0")  # fmt: skip
    assert ok.exit_code == 0, ok.stderr
    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tmp_path / "ds" / "tokenizer" / "tokenizer.json"))
    tokens = np.fromfile(tmp_path / "ds" / "train" / "shard-00000.bin", dtype=np.uint16)
    trained_on = tokenizer.decode(tokens.tolist())
    assert "café au lait" in trained_on and "\ufffd" not in trained_on
    unknown = run_cli("data-prep", latin, "--out", tmp_path / "x", "--encoding", "klingon")
    assert_user_error(unknown, "data.encoding", "unknown text encoding 'klingon'")


def test_every_command_that_reads_a_text_file_takes_its_encoding(
    tiny_run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """The undecodable-bytes line says "pass --encoding": export (--probe-data), prune and factor (--data) take it
    too, and refuse it where no text file is read."""
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Un café au lait, s'il vous plaît, merci.\n".encode("latin-1") * 60)
    assert_user_error(run_cli("export", tiny_run, "--out", tmp_path / "a", "--probe-data", latin), "pass --encoding")
    exported = run_cli("export", tiny_run, "--out", tmp_path / "b", "--probe-data", latin, "--encoding", "latin-1")
    assert exported.exit_code == 0, exported.stderr
    assert json.loads((tmp_path / "b" / "export_report.json").read_text())["probe"] == str(latin)
    pruned = run_cli("prune", tiny_run, "--out", tmp_path / "c", "--data", latin, "--encoding", "latin-1",
                     "--mlp", "64", "--batches", "1")  # fmt: skip
    assert pruned.exit_code == 0, pruned.stderr
    assert_user_error(run_cli("factor", tiny_run, "--out", tmp_path / "d", "--rank", "8", "--data", latin), "0xe9")
    factored = run_cli(
        "factor", tiny_run, "--out", tmp_path / "e", "--rank", "8", "--data", latin, "--encoding", "cp1252"
    )
    assert factored.exit_code == 0, factored.stderr
    assert_user_error(run_cli("export", tiny_run, "--out", tmp_path / "f", "--encoding", "latin-1"), "--probe-data")
    assert_user_error(run_cli("factor", tiny_run, "--out", tmp_path / "g", "--rank", "8", "--encoding", "latin-1"),
                      "give --data too")  # fmt: skip
    dataset = run_cli("prune", tiny_run, "--out", tmp_path / "h", "--data", tiny_dataset, "--encoding", "latin-1",
                      "--mlp", "64")  # fmt: skip
    assert_user_error(dataset, "is a prepared dataset, already tokenized")
    for name in "adfgh":
        assert_nothing_written(tmp_path, name)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_byte_order_mark_is_read_as_one(suffix: str, tmp_path: Path) -> None:
    source = tmp_path / f"bom{suffix}"
    body = (
        "text,id\n" + "".join(f"row number {i} of the file,{i}\n" for i in range(30))
        if suffix == ".csv"
        else ("".join(json.dumps({"text": f"row number {i} of the file", "id": i}) + "\n" for i in range(30)))
    )
    source.write_bytes(b"\xef\xbb\xbf" + body.encode())
    result = run_cli("data-prep", source, "--out", tmp_path / "ds", "--vocab-size", "300", "--block-size", "16")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["documents"]["kept"] == 30


# --- 10, 14, 26: context lengths -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_chat_model(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64-token GPT-2 (learned positions: past the context it would index out of range), with a chat template."""
    from transformers import AutoTokenizer

    run = tmp_path_factory.mktemp("gpt2") / "run"
    args = [*tiny_train_args(tiny_dataset, run, steps=3), "--set", "model.arch=gpt2", "--set", "model.n_kv_heads=null"]
    result = run_cli("pretrain", *args)
    assert result.exit_code == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tokenizer.save_pretrained(run / "final")
    return run / "final"


def test_generation_and_evaluation_respect_the_context(gpt2_chat_model: Path, tmp_path: Path) -> None:
    long = run_cli("generate", gpt2_chat_model, "--prompt", "Once upon a time", "--raw", "--max-new-tokens", "200",
                   "--seed", "0")  # fmt: skip
    assert long.exit_code == 0, long.stderr
    assert "generating at most" in long.stderr and "context of 64 tokens" in long.stderr
    assert_user_error(run_cli("generate", gpt2_chat_model, "--raw", "--prompt", "word " * 100), "context is 64")
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a shy cat. " * 40)
    assert_user_error(run_cli("eval", gpt2_chat_model, "--data", text, "--seq-len", "128"), "context of 64")
    assert_user_error(run_cli("eval", gpt2_chat_model, "--data", text, "--seq-len", "-5"), "--seq-len -5", "at least 2")
    fits = run_cli("eval", gpt2_chat_model, "--data", text, "--seq-len", "64")
    assert fits.exit_code == 0, fits.stderr


def test_chat_keeps_the_conversation_inside_the_context(gpt2_chat_model: Path, capsys: pytest.CaptureFixture) -> None:
    from llmkit.generate import Sampling, chat_loop

    said = iter(["tell me a story about a cat " * 2, "and then what happened to the dog " * 2, "/exit"])
    turns = chat_loop(
        gpt2_chat_model, Sampling(max_new_tokens=24, temperature=0), "Be brief.", read=lambda _: next(said)
    )
    assert turns == 2
    assert "oldest message(s) to fit the model's context of 64 tokens" in capsys.readouterr().err


def test_ctrl_c_ends_a_chat_answer_and_the_chat_goes_on(
    gpt2_chat_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """As in other chat tools: Ctrl-C while the model answers keeps what it said and returns to the prompt; at the
    prompt, or a second time, it interrupts as usual. Commands are one /word; other lines go to the model."""
    import signal

    from llmkit.generate import Sampling, chat_loop, ctrl_c_ends_the_answer

    class Terminal:  # the user presses Ctrl-C as the first answer begins
        def __init__(self) -> None:
            self.text, self.pressed = "", False

        def write(self, text: str) -> None:
            self.text += text
            if text == "model> " and not self.pressed:
                self.pressed = True
                signal.raise_signal(signal.SIGINT)

        def flush(self) -> None:
            pass

    def answers(interrupt: bool) -> list[str]:
        terminal = Terminal()
        terminal.pressed = not interrupt
        monkeypatch.setattr(sys, "stdout", terminal)
        said = iter(["tell me a story", "/bogus", "/reset", "tell me a story", "/exit"])
        turns = chat_loop(gpt2_chat_model, Sampling(max_new_tokens=12, temperature=0), None, read=lambda _: next(said))
        assert turns == 2
        return terminal.text.split("model> ")[1:]

    full = answers(interrupt=False)
    assert full[0] == full[1] and len(full[0].split()) > 2, full
    stopped = answers(interrupt=True)
    err = capsys.readouterr().err
    assert err.count("(answer stopped: Ctrl-C)") == 1 and "(unknown command /bogus;" in err
    assert "(conversation cleared)" in err
    assert len(stopped[0]) < len(full[0]) and stopped[1] == full[1]  # ended early; the next answer is whole
    usual = signal.getsignal(signal.SIGINT)
    with ctrl_c_ends_the_answer() as pressed, pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
        assert pressed.is_set()
        signal.raise_signal(signal.SIGINT)  # a second Ctrl-C interrupts
    assert signal.getsignal(signal.SIGINT) is usual  # the usual handler is back after the answer


# --- 12, 15, 21: recipes and checkpoints of the wrong shape --------------------------------------------------------


def test_recipe_files_that_cannot_be_trusted(tmp_path: Path) -> None:
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text("optimizer:\n  lr: 0.001\n  weight_decay: 0.1\n  lr: 0.01\n")
    assert_user_error(run_cli("pretrain", "--config", duplicate), "dup.yaml:4", "duplicate key 'lr'", "line 2")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("about: 'caf\xe9'\n".encode("latin-1"))
    assert_user_error(run_cli("pretrain", "--config", latin), "latin.yaml", "not UTF-8")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    assert_user_error(run_cli("config", "show", binary), "binary.yaml")


def test_a_head_size_rotary_cannot_use_is_refused_before_writing(tiny_dataset: Path, tmp_path: Path) -> None:
    args = [*tiny_train_args(tiny_dataset, tmp_path / "run", steps=2), "--set", "model.hidden_size=12",
            "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2"]  # fmt: skip
    assert_user_error(run_cli("pretrain", *args), "head size", "even")
    assert_nothing_written(tmp_path, "run")


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        ("seal-list", "corrupt checkpoint"),
        ("seal-files-not-mapping", "corrupt checkpoint"),
        ("state-wrong-shape", "corrupt checkpoint"),
    ],
)
def test_checkpoint_metadata_of_the_wrong_shape_is_corrupt(
    damage: str, fragment: str, run_copy: Path, tiny_dataset: Path
) -> None:
    from llmkit.atomic import file_sha256

    newest = complete_checkpoints(run_copy / "checkpoints")[-1]
    seal_path = newest / COMPLETE
    if damage == "seal-list":
        seal_path.write_text("[]")
    elif damage == "seal-files-not-mapping":
        seal_path.write_text(json.dumps({"step": 30, "files": {"rng.pt": 7}}))
    else:  # a trainer state of valid JSON but the wrong shape, resealed so the checksums pass
        (newest / "trainer_state.json").write_text(json.dumps({"step": "thirty"}))
        seal = json.loads(seal_path.read_text())
        path = newest / "trainer_state.json"
        seal["files"]["trainer_state.json"] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        seal_path.write_text(json.dumps(seal))
    result = run_cli("pretrain", *tiny_train_args(tiny_dataset, run_copy, steps=40), "--resume", newest)
    assert_user_error(result, fragment)


# --- 13: the first log line after a resume averages the same steps --------------------------------------------------


def test_the_log_after_a_resume_equals_the_uninterrupted_log(tiny_dataset: Path, tmp_path: Path) -> None:
    args = lambda out: [*tiny_train_args(tiny_dataset, out, steps=16), "--set", "logging.every_steps=5",  # noqa: E731
                        "--set", "checkpoint.every_steps=3", "--set", "logging.report_to=[]"]  # fmt: skip
    reference = run_cli("pretrain", *args(tmp_path / "ref"))
    assert reference.exit_code == 0, reference.stderr
    env = {**os.environ, "LLMKIT_FAULT_INJECT": "kill@8.0", "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run([sys.executable, "-m", "llmkit", "pretrain", *args(tmp_path / "run")], env=env,
                            capture_output=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli("pretrain", *args(tmp_path / "run"), "--resume", "auto")  # from step 6: window of 10 is 6-10
    assert resumed.exit_code == 0, resumed.stderr

    def losses(run: Path) -> list[tuple[int, float]]:
        lines = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"]) for r in lines if "loss" in r]

    assert losses(tmp_path / "run") == losses(tmp_path / "ref")  # exactly, not approximately


# --- 17, 18: full and read-only disks ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 1.2 MB filesystem (tmpfs): writes fail with ENOSPC as on a full disk. Needs mount rights (root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)],
                      capture_output=True).returncode:  # fmt: skip
        pytest.skip("cannot mount a small filesystem here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_earlier_ones(
    small_disk: Path, tiny_dataset: Path
) -> None:
    from llmkit.train.checkpoint import verify_checkpoint

    out = small_disk / "run"
    args = [*tiny_train_args(tiny_dataset, out, steps=60), "--set", "logging.report_to=[]",
            "--set", "checkpoint.keep_last=10", "--set", "logging.plot=false"]  # fmt: skip
    line = assert_user_error(run_cli("pretrain", *args), "no space left on device", "intact", "--resume auto")
    kept = complete_checkpoints(out / "checkpoints")
    assert kept and str(kept[-1]) in line
    for checkpoint in kept:
        verify_checkpoint(checkpoint)
    assert not list((out / "checkpoints").glob(".step-*"))  # the cut-off save left nothing


def test_a_full_disk_during_data_prep_is_one_line_and_leaves_nothing(small_disk: Path) -> None:
    out = small_disk / "ds"
    result = run_cli(
        "data-prep", "builtin:stories", "--out", out, "--vocab-size", "300", "--set", "data.builtin_docs=20000"
    )
    assert_user_error(result, str(out), "no space left on device")
    assert list(small_disk.iterdir()) == []


def test_a_read_only_output_is_refused_before_any_work(small_disk: Path, run_copy: Path, tiny_dataset: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = small_disk / "x"
    assert_user_error(run_cli("pretrain", *tiny_train_args(tiny_dataset, out, steps=2)), "cannot write in")
    assert_user_error(run_cli("data-prep", "builtin:stories", "--out", out), "cannot write in")
    assert_user_error(run_cli("export", run_copy, "--out", out), "cannot write in")
    assert_user_error(run_cli("eval", run_copy, "--data", tiny_dataset, "--report", out / "r.json"), "cannot write in")


# --- 20: eval's numbers and files -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--max-batches", "0"], "--max-batches 0: must be at least 1"),
        (["--seq-len", "4096"], "longer than the model's context of 64"),
    ],
)
def test_eval_numbers_are_checked_where_they_enter(
    args: list[str], fragment: str, run_copy: Path, tmp_path: Path
) -> None:
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. " * 10)
    assert_user_error(run_cli("eval", run_copy, "--data", text, *args), fragment)


def test_a_corrupt_model_config_is_one_line(run_copy: Path, tiny_dataset: Path) -> None:
    (run_copy / "final" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    for command in (["eval", run_copy, "--data", tiny_dataset], ["generate", run_copy, "--prompt", "x"],
                    ["export", run_copy, "--out", run_copy.parent / "e"]):  # fmt: skip
        assert_user_error(run_cli(*command), "config.json", "not valid JSON")


# --- 22: memory per document ----------------------------------------------------------------------------------------


def _peak_rss_mb(*args: str | Path) -> float:
    code = (
        "import resource, subprocess, sys\n"
        "proc = subprocess.run([sys.executable, '-m', 'llmkit', *sys.argv[1:]], capture_output=True, text=True)\n"
        "assert proc.returncode == 0, proc.stderr\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip())


def test_one_huge_document_needs_little_more_memory_than_the_same_text_as_lines(tmp_path: Path) -> None:
    """12 MB in one document used about 140 bytes per character (1.7 GB); the same text as lines about 280 MB."""
    import random

    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "happily"]
    rng = random.Random(0)
    text = " ".join(rng.choice(words) for _ in range(3_000_000))
    (tmp_path / "one.txt").write_text(text)
    (tmp_path / "lines.txt").write_text("\n".join(text[i : i + 60] for i in range(0, len(text), 60)))
    common = ["--vocab-size", "300", "--block-size", "64", "--val-fraction", "0", "--set", "data.dedup=false"]
    one = _peak_rss_mb("data-prep", tmp_path / "one.txt", "--out", tmp_path / "a", *common)
    lines = _peak_rss_mb("data-prep", tmp_path / "lines.txt", "--out", tmp_path / "b", *common,
                         "--set", "data.txt_mode=line")  # fmt: skip
    assert one < lines + 150, (one, lines)  # 12 MB of text: at most ~12 bytes per character more


# --- 25: the message says what does not fill a micro-batch ---------------------------------------------------------


def test_too_few_packed_rows_says_they_are_packed_rows(tiny_run: Path, tmp_path: Path) -> None:
    rows = write_chat_rows(tmp_path / "few.jsonl", 5)
    args = ["finetune", "--model", tiny_run, "--data", rows, "--out", tmp_path / "ft", "--max-length", "64",
            "--micro-batch-size", "8", "--set", "data.val_fraction=0"]  # fmt: skip
    assert_user_error(run_cli(*args), "5 training examples pack into", "rows of up to 64 tokens",
                      "micro-batch of 8 rows", "--no-packing")  # fmt: skip
    assert_nothing_written(tmp_path, "ft")


# --- Resume on another number of processes -----------------------------------------------------------------------


def blocks_per_step(run: Path) -> dict[int, set[int]]:
    """Blocks each step used, from every process's data trace."""
    used: dict[int, set[int]] = {}
    for trace in run.glob("data_trace*.jsonl"):
        for record in map(json.loads, trace.read_text().splitlines()):
            used.setdefault(record["step"], set()).update(record["blocks"])
    return used


@pytest.mark.slow
def test_a_run_killed_on_two_processes_resumes_on_one_and_on_three(tiny_dataset: Path, tmp_path: Path) -> None:
    """Global batch 12: 2 processes x 6, then 1 x 12 or 3 x 4. Every step sees the same 12 blocks as an uninterrupted
    run (each block once), and the losses match it within 1e-5 relative (sums in another order)."""
    common = ["--max-steps", "8", "--lr", "3e-3", *TINY_MODEL, "--set", "logging.every_steps=1",
              "--set", "train.eval_every=1000", "--set", "logging.report_to=[]", "--set", "logging.plot=false",
              "--set", "checkpoint.every_steps=4", "--set", "logging.data_trace=true"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    reference = run_cli("pretrain", "--data", tiny_dataset, "--out", tmp_path / "ref", "--micro-batch-size", "12",
                        *common)  # fmt: skip
    assert reference.exit_code == 0, reference.stderr

    def launch(out: Path, processes: int, micro: int, port: int, fault: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "llmkit", "pretrain", "--data", str(tiny_dataset), "--out", str(out),
             "--micro-batch-size", str(micro), "--cpu", "--num-processes", str(processes),
             "--main-process-port", str(port),
             *common, *(["--resume", "auto"] if not fault else [])],
            env={**env, "LLMKIT_FAULT_INJECT": fault} if fault else env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    killed = launch(tmp_path / "killed", 2, 6, 29551, fault="kill@6.0")
    assert killed.returncode != 0 and not (tmp_path / "killed" / "final").exists()
    assert complete_checkpoints(tmp_path / "killed" / "checkpoints")[-1].name == "step-00000004"
    shutil.copytree(tmp_path / "killed", tmp_path / "on3")
    on_one = run_cli("pretrain", "--data", tiny_dataset, "--out", tmp_path / "killed", "--micro-batch-size", "12",
                     *common, "--resume", "auto")  # fmt: skip
    assert on_one.exit_code == 0, on_one.stderr
    on_three = launch(tmp_path / "on3", 3, 4, 29552)
    assert on_three.returncode == 0, on_three.stderr[-3000:]

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    expected = blocks_per_step(tmp_path / "ref")
    assert sorted(expected) == list(range(1, 9)) and all(len(blocks) == 12 for blocks in expected.values())
    for run in (tmp_path / "killed", tmp_path / "on3"):
        assert blocks_per_step(run) == expected  # the same blocks at every step: none skipped, none seen twice
        assert losses(run) == pytest.approx(losses(tmp_path / "ref"), rel=1e-5)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["tokens"] == 8 * 12 * 32
    refused = run_cli("pretrain", "--data", tiny_dataset, "--out", tmp_path / "on3", "--micro-batch-size", "4",
                      *common, "--max-steps", "9", "--resume", "auto")  # fmt: skip
    assert_user_error(refused, "global_batch_size 12 -> 4", "--micro-batch-size 12 keeps the global batch of 12")


@pytest.mark.parametrize(
    "args",
    [
        ["export", "RUN", "--out", "OUT", "--max-logit-diff", "-1"],
        ["export", "RUN", "--out", "OUT", "--min-greedy-agreement", "1.5"],
        ["export", "RUN", "--out", "OUT", "--max-ppl-increase", "nan"],
        ["plan", "recipes/tiny-cpu.yaml", "--price-per-gpu-hour", "-3"],
        ["plan", "recipes/tiny-cpu.yaml", "--train-tokens", "0"],
    ],
)
def test_other_numbers_are_checked_where_they_enter(args: list[str], run_copy: Path, tmp_path: Path) -> None:
    root = Path(__file__).parent.parent
    args = [str(run_copy) if a == "RUN" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    args = [str(root / a) if a.startswith("recipes/") else a for a in args]
    assert_user_error(run_cli(*args), args[-2])
    assert not (tmp_path / "out").exists()
