"""Bad input: one line naming the file, line, field or key; exit code 2; no traceback; nothing left on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import assert_nothing_written, assert_user_error, run_cli, tiny_data_args, tiny_train_args


def test_missing_file(tmp_path: Path) -> None:
    result = run_cli("data-prep", tmp_path / "nope.jsonl", "--out", tmp_path / "ds")
    assert_user_error(result, "nope.jsonl", "file not found")
    assert_nothing_written(tmp_path, "ds")


def test_a_source_named_twice_is_refused(tmp_path: Path, tiny_run: Path) -> None:
    """A file named twice, or a folder and a file in it, would be read twice (its weight silently doubled), and a
    --val-file among the training files would validate on rows the model trains on."""
    rows = tmp_path / "rows" / "chat.jsonl"
    rows.parent.mkdir()
    rows.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f" A{i}."}) + "\n" for i in range(40)))
    for twice in ([rows, rows], [rows.parent, rows], ["builtin:stories", "builtin:stories"]):
        line = assert_user_error(run_cli("data-prep", *twice, "--out", tmp_path / "ds"), "data.mix")
        assert "named twice" in line or f"reached through both {rows.parent} and {rows}" in line
    assert_nothing_written(tmp_path, "ds")
    validate = ["finetune", "--model", tiny_run, "--data", rows.parent, "--val-file", rows, "--out", tmp_path / "ft"]
    assert_user_error(run_cli(*validate), "reached through both --data and --val-file", "rows the model trains on")
    assert_nothing_written(tmp_path, "ft")


def test_llmkits_own_outputs_are_not_read_as_rows_or_text(tmp_path: Path, tiny_run: Path, tiny_dataset: Path) -> None:
    """A prepared dataset given to finetune was read as rows (its manifest.json, 'cannot detect the data format')."""
    tokens = run_cli("finetune", "--model", tiny_run, "--data", tiny_dataset, "--out", tmp_path / "ft")
    assert_user_error(tokens, "is a prepared dataset", "llmkit pretrain --data")
    assert_user_error(run_cli("data-prep", tiny_run, "--out", tmp_path / "ds"), "is an llmkit output (a run")
    assert_nothing_written(tmp_path, "ft")


def test_nothing_left_after_filtering(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "short"}\n{"text": "tiny"}\n{"text": "   "}\n')
    result = run_cli("data-prep", source, "--out", tmp_path / "ds", "--set", "data.min_chars=100")
    assert_user_error(result, "nothing left after filtering", "2 too_short", "1 empty")
    assert_nothing_written(tmp_path, "ds")


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    result = run_cli("data-prep", source, "--out", tmp_path / "ds")
    assert_user_error(result, f"{source}:3", "malformed JSON")
    assert_nothing_written(tmp_path, "ds")


def test_missing_text_field_lists_the_fields(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"content": "x", "id": 1}) + "\n")
    result = run_cli("data-prep", source, "--out", tmp_path / "ds")
    assert_user_error(result, f"{source}:1", "no 'text' field", "content, id", "--text-field")
    assert_nothing_written(tmp_path, "ds")


def test_missing_csv_column_lists_the_columns(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("title,body\na,b\n")
    result = run_cli("data-prep", source, "--out", tmp_path / "ds")
    assert_user_error(result, "in.csv", "no 'text' column", "title, body")
    assert_nothing_written(tmp_path, "ds")


def test_unknown_config_key_in_a_file_and_in_set(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optimizer:\n  lrr: 0.1\n")
    assert_user_error(
        run_cli("pretrain", "--config", recipe), "unknown config key 'optimizer.lrr'", "did you mean 'optimizer.lr'"
    )
    assert_user_error(run_cli("pretrain", "--set", "trian.max_steps=3"), "'trian'", "did you mean 'train'")


def test_output_directory_holding_a_run_is_refused(tiny_dataset: Path, tiny_run: Path) -> None:
    before = sorted(p.name for p in tiny_run.iterdir())
    metrics = (tiny_run / "metrics.jsonl").read_bytes()
    result = run_cli("pretrain", *tiny_train_args(tiny_dataset, tiny_run, steps=2))
    assert_user_error(result, str(tiny_run), "holds checkpoints", "--resume auto", "--overwrite")
    assert sorted(p.name for p in tiny_run.iterdir()) == before
    assert (tiny_run / "metrics.jsonl").read_bytes() == metrics


def test_a_folder_llmkit_did_not_write_is_never_replaced(tiny_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """--overwrite replaces an earlier output of llmkit's; a user's own folder is refused even with it."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for command in (
        ["data-prep", *tiny_data_args(out, docs=50)],
        ["pretrain", *tiny_train_args(tiny_dataset, out, steps=2)],
        ["export", tiny_run, "--out", out],
        ["prune", tiny_run, "--out", out, "--data", tiny_dataset, "--mlp", "32"],
        ["factor", tiny_run, "--out", out, "--rank", "4"],
    ):
        for overwrite in ([], ["--overwrite"]):
            line = assert_user_error(run_cli(*command, *overwrite), "holds files llmkit did not write (notes.txt)")
            assert "--overwrite replaces only what llmkit wrote" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"


def test_missing_dataset_for_pretrain(tmp_path: Path) -> None:
    result = run_cli("pretrain", *tiny_train_args(tmp_path / "no-data", tmp_path / "run"))
    assert_user_error(result, "no-data", "data-prep")
    assert_nothing_written(tmp_path, "run")


def test_tokenizer_that_does_not_match_the_model(tiny_dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": f"completely different text number {i}"}) + "\n" for i in range(400)))
    assert run_cli("data-prep", source, "--out", other, "--block-size", "16", "--vocab-size", "300").exit_code == 0
    run_dir = tmp_path / "base"
    assert run_cli("pretrain", *tiny_train_args(tiny_dataset, run_dir, steps=1)).exit_code == 0
    result = run_cli("pretrain", *tiny_train_args(other, tmp_path / "run2", steps=1), "--init-from", run_dir / "final")
    assert_user_error(result, "different tokenizer")
    assert_nothing_written(tmp_path, "run2")
    result = run_cli("eval", run_dir, "--data", other)
    assert_user_error(result, "different tokenizer")


def test_fp16_on_cpu_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    result = run_cli("pretrain", *tiny_train_args(tiny_dataset, tmp_path / "run"), "--precision", "fp16", "--cpu")
    assert_user_error(result, "fp16 needs a CUDA GPU")  # --cpu: the same on a machine with GPUs
    assert_nothing_written(tmp_path, "run")


def test_liger_kernels_without_cuda_are_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    args = [*tiny_train_args(tiny_dataset, tmp_path / "run"), "--set", "model.kernels=liger", "--cpu"]
    assert_user_error(run_cli("pretrain", *args), "model.kernels=liger", "needs a CUDA GPU", "auto or none")
    assert_nothing_written(tmp_path, "run")


def test_launch_and_resume_options_that_cannot_apply_are_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    """--num-processes 0 ran one process, a port out of range or a rank beyond the machines was passed on, and the
    resume options without --resume did nothing."""
    for option, fragment in (
        (["--num-processes", "0"], "--num-processes 0, --num-machines 1: each must be at least 1"),
        (["--main-process-port", "99999"], "a port is 1 to 65535"),
        (["--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "10.0.0.1"], "is 0 to 1"),
        (["--resume-fallback"], "--resume-fallback changes how a run resumes: it goes with --resume"),
        (["--allow-config-change"], "--allow-config-change changes how a run resumes"),
    ):
        assert_user_error(run_cli("pretrain", *tiny_train_args(tiny_dataset, tmp_path / "run"), *option), fragment)
    assert_nothing_written(tmp_path, "run")


def test_compile_where_it_cannot_run_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    args = [*tiny_train_args(tiny_dataset, tmp_path / "run"), "--compile"]
    liger = run_cli("pretrain", *args, "--set", "model.kernels=liger")
    assert_user_error(liger, "model.kernels=liger and train.compile", "--no-compile")
    assert_user_error(run_cli("pretrain", *args, "--set", "distributed.strategy=zero2"),
                      "train.compile is not supported with distributed.strategy=zero2")  # fmt: skip
    assert_nothing_written(tmp_path, "run")


def test_hub_names_fail_clearly_offline(tmp_path: Path) -> None:
    result = run_cli("data-prep", "hf:someone/some-dataset", "--out", tmp_path / "ds")
    assert_user_error(result, "hf:someone/some-dataset", "cannot load")
    result = run_cli("data-prep", "builtin:stories", "--tokenizer", "someone/some-tokenizer", "--out", tmp_path / "ds")
    assert_user_error(result, "someone/some-tokenizer", "cannot load a tokenizer")
    folder = tmp_path / "not-a-tokenizer"
    folder.mkdir()
    result = run_cli("data-prep", "builtin:stories", "--tokenizer", folder, "--out", tmp_path / "ds")
    assert_user_error(result, "not-a-tokenizer: no tokenizer in this folder (no tokenizer.json, tokenizer_config.json")
    assert_user_error(run_cli("data-prep", "builtin:storys", "--out", tmp_path / "ds"), "did you mean 'stories'")
    assert_nothing_written(tmp_path, "ds")


def test_eval_export_generate_on_missing_models(tmp_path: Path, tiny_dataset: Path) -> None:
    assert_user_error(run_cli("eval", tmp_path / "nothing", "--data", tiny_dataset), "model not found")
    assert_user_error(run_cli("export", tmp_path, "--out", tmp_path / "x"), "no config.json")
    assert_user_error(run_cli("generate", tmp_path / "nothing", "--prompt", "hi"), "model not found")
    assert_user_error(run_cli("generate", "gpt2", "--prompt", "hi"), "gpt2: model not found", "named owner/name")


def test_export_into_a_non_empty_directory_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert_user_error(run_cli("export", tiny_run, "--out", out), "holds files llmkit did not write")
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    assert run_cli("export", tiny_run, "--out", out).exit_code == 0  # an empty folder is filled
    assert_user_error(run_cli("export", tiny_run, "--out", out), "holds an earlier output; pass --overwrite")
    assert run_cli("export", tiny_run, "--out", out, "--overwrite").exit_code == 0


def test_the_installed_console_script_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", "data-prep", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.jsonl'}: file not found"]
    assert "Traceback" not in proc.stdout + proc.stderr


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# case -> (arguments built from (scratch directory, prepared dataset), fragments the one line must contain)
CASES = {
    "glob matches nothing": (
        lambda d, data: ["data-prep", d / "raw" / "*.jsonl", "--out", d / "ds"], ["no files match this pattern"]),
    "unsupported file type": (
        lambda d, data: ["data-prep", _write(d / "notes.docx", "x"), "--out", d / "ds"], ["unsupported file type"]),
    "non-text field value": (
        lambda d, data: ["data-prep", _write(d / "n.jsonl", '{"text": "ok"}\n{"text": 5}\n'), "--out", d / "ds"],
        ["n.jsonl:2", "field 'text' is int"]),
    "too little data for one block": (
        lambda d, data: ["data-prep", _write(d / "s.jsonl", '{"text": "tiny doc"}\n'), "--out", d / "ds",
                         "--val-fraction", "0"], ["fewer than one block of 256"]),
    "bad config value": (
        lambda d, data: ["pretrain", "--set", "train.micro_batch_size=-1", "--out", d / "ds"],
        ["'train.micro_batch_size'", "got -1"]),
    "bad YAML": (
        lambda d, data: ["pretrain", "--config", _write(d / "b.yaml", "train: [1, 2\n"), "--out", d / "ds"],
        ["b.yaml:"]),
    "missing config file": (
        lambda d, data: ["pretrain", "--config", d / "none.yaml", "--out", d / "ds"], ["config file not found"]),
    "bad --max-time": (
        lambda d, data: ["pretrain", "--max-time", "soon", "--out", d / "ds"], ["--max-time 'soon'"]),
    "no --max-time": (
        lambda d, data: ["pretrain", "--max-time", "-5m", "--out", d / "ds"], ["'-5m': give a time above 0"]),
    "resume and overwrite together": (
        lambda d, data: ["pretrain", "--data", data, "--resume", "auto", "--overwrite", "--out", d / "ds"],
        ["contradict"]),
    "resume path is not a checkpoint": (
        lambda d, data: ["pretrain", "--data", data, "--resume", d, "--out", d / "ds"], ["not a checkpoint"]),
    "a seed numpy cannot take": (
        lambda d, data: ["pretrain", "--data", data, "--seed", "-1", "--out", d / "ds"], ["'train.seed'", "got -1"]),
    "a seed generate cannot take": (
        lambda d, data: ["generate", d, "--prompt", "x", "--seed", str(2**64)], ["--seed 18446744073709551616: give"]),
    "bad sampling options": (
        lambda d, data: ["generate", d, "--prompt", "x", "--top-p", "0"], ["error: --top-p 0 (need in (0, 1])"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_error_matrix(case: str, tmp_path: Path, tiny_dataset: Path) -> None:
    make_args, fragments = CASES[case]
    assert_user_error(run_cli(*make_args(tmp_path, tiny_dataset)), *fragments)
    assert_nothing_written(tmp_path, "ds")


def test_every_documented_error_names_an_existing_test() -> None:
    root = Path(__file__).parent.parent
    tests = "".join(p.read_text() for p in (root / "tests").glob("test_*.py"))
    errors_table = (root / "docs" / "errors.md").read_text().split("## Exit codes")[0]
    rows = [line for line in errors_table.splitlines() if line.startswith("| ")]
    assert len(rows) > 20
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if cells[0] in ("case", "---"):
            continue
        test, _, case = cells[-1].strip("`").partition("[")
        assert test, f"docs/errors.md: '{cells[0]}' names no test"
        assert f"def {test}(" in tests, f"docs/errors.md: test {test} does not exist"
        assert not case or f'"{case.rstrip("]")}"' in tests, f"docs/errors.md: no case {case} in {test}"


def test_an_unreachable_hub_fails_fast_with_one_line(tmp_path: Path) -> None:
    """Without HF_HUB_OFFLINE, the hub libraries would retry for about a minute; llmkit probes once and stops."""
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", PYTHONWARNINGS="ignore")  # the discard port: nothing listens
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", "data-prep", "builtin:stories", "--tokenizer", "someone/some-tokenizer",
         "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and time.monotonic() - start < 30
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: someone/some-tokenizer: cannot load a tokenizer from this hub name (offline or not")
    assert "couldn't connect to 'http://127.0.0.1:9'" in line  # the library's reason, not only its exception's type
