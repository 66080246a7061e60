"""Nothing lost, round three: the defects an adversarial pass found in the newer surfaces, each driven through the
real CLI (or a real server on loopback), inputs hashed before and after."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import zstandard

from tests.conftest import assert_user_error, run_cli, tiny_data_args, tiny_train_args
from tests.test_distill import cached_reference  # noqa: F401 (a fixture)
from tests.test_finetune import write_chat_rows
from tests.test_nothing_lost import small_disk, snapshot  # noqa: F401 (small_disk: a fixture)
from tests.test_serve import Server, chat_model, start_server  # noqa: F401 (fixtures)


def test_no_report_replaces_the_request_log_it_reports_on(tiny_run: Path, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    log.write_text(json.dumps({"time": 1.0, "status": 200, "latency_s": 0.1}) + "\n")
    before, run_before = snapshot(log), snapshot(tiny_run)
    for flag in ("--report", "--markdown", "--junit"):
        assert_user_error(run_cli("monitor", log, flag, log), f"{log}: is an input of this command")
    inside = tiny_run / "final" / "config.json"  # the served model's own files, read for drift
    assert_user_error(run_cli("monitor", log, "--model", tiny_run, "--junit", inside), "which this command reads")
    assert snapshot(log) == before and snapshot(tiny_run) == run_before
    assert_user_error(run_cli("monitor", log, "--gate", "p99<<2"), "--gate 'p99<<2'", "e.g. 'p99_latency_s<=2'")
    assert_user_error(run_cli("monitor", log, "--since=-5m"), "--since '-5m': give a time above 0")  # read them all
    for bad in ("0", "-1"):  # 0 scored every prompt, -1 all but one
        assert_user_error(run_cli("monitor", log, "--max-prompts", bad), f"--max-prompts {bad}", "at least 1")
    assert_user_error(run_cli("monitor", log, "--max-prompts", "5"), "--max-prompts 5", "needs --model")  # unused


def test_overwrite_never_deletes_an_input_the_recipe_or_a_flag_names(
    tiny_run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """A teacher, a recipe, a decontamination task file and a distillation cache kept inside --out: each is named
    in one line and the output (with them in it) is left as it was."""
    out = tmp_path / "out"
    out.mkdir()
    chats = write_chat_rows(tmp_path / "chat.jsonl", 40)
    teacher = out / "teacher"  # an SFT of the base: it has the chat template's tokens, as a fine-tuned student will
    sft = run_cli("finetune", "--model", tiny_run, "--data", chats, "--out", teacher, "--max-steps", "1",
                  "--micro-batch-size", "4", "--max-length", "64")  # fmt: skip
    assert sft.exit_code == 0, sft.stderr
    base = out / "base"  # a pretraining teacher: the tiny run itself, kept inside --out
    shutil.copytree(tiny_run, base)
    recipe = out / "recipe.yaml"
    recipe.write_text("train:\n  max_steps: 2\n")
    tasks = out / "items.jsonl"
    tasks.write_text(json.dumps({"prompt": "Once upon a time there was a cat named Tom who liked the sun"}) + "\n")
    cache = out / "cache"  # a cache to create (one to reuse is checked first: tests/test_distill.py)
    cache.mkdir()
    before = snapshot(out)
    train = tiny_train_args(tiny_dataset, out, steps=2)
    cases = [
        (["pretrain", *train, "--teacher", base], "base"),
        (["pretrain", "--config", recipe, *train], "recipe.yaml"),
        (["pretrain", *train, "--teacher", tiny_run, "--set", "distill.top_k=4", "--set", f"distill.cache={cache}"],
         "cache"),
        (["finetune", "--task", "distill", "--model", tiny_run, "--teacher", teacher, "--data", chats, "--out", out],
         "teacher"),
        (["finetune", "--config", recipe, "--model", tiny_run, "--data", chats, "--out", out], "recipe.yaml"),
        (["data-prep", "--config", recipe, *tiny_data_args(out)], "recipe.yaml"),
        (["data-prep", *tiny_data_args(out), "--set", f"data.decontaminate.tasks=[{tasks}]"], "items.jsonl"),
    ]  # fmt: skip
    for args, named in cases:
        assert_user_error(run_cli(*args, "--overwrite"), "contains", named, "which this command reads")
    assert snapshot(out) == before


@pytest.mark.parametrize("suffix", [".zst", ".gz", ".bz2", ".xz"])
def test_a_truncated_archive_beside_a_good_file_is_one_line(suffix: str, tmp_path: Path) -> None:
    import bz2
    import gzip
    import lzma

    text = "".join(f"Story {i}: once upon a time there was a cat named Tom. The end.\n" for i in range(400)).encode()
    compress = {".zst": zstandard.ZstdCompressor().compress, ".gz": gzip.compress, ".bz2": bz2.compress,
                ".xz": lzma.compress}[suffix]  # fmt: skip
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_bytes(text)
    whole = compress(text)
    damaged = corpus / f"cut.txt{suffix}"
    damaged.write_bytes(whole[: len(whole) // 2])
    result = run_cli("data-prep", corpus, "--out", tmp_path / "ds", "--vocab-size", "300", "--block-size", "16")
    assert_user_error(result, str(damaged), "damaged or truncated")
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    ("key", "old", "note", "read"),
    [
        (
            "logging.tensorboard",
            "logging:\n  tensorboard: false\n  report_to: [mlflow]\n",
            "['mlflow']",
            "report_to:\n  - mlflow",
        ),
        ("data.num_proc", "data:\n  num_proc: 3\n", "data.workers: 3", "workers: 3"),
        (
            "data.num_proc",
            "data:\n  num_proc: 3\n  workers: 5\n",
            "data.workers: 5 (given too, so it wins)",
            "workers: 5",
        ),
    ],
)
def test_an_old_recipe_key_is_read_with_one_deprecation_line(
    key: str, old: str, note: str, read: str, tmp_path: Path
) -> None:
    recipe = tmp_path / "old.yaml"
    recipe.write_text(old)
    result = run_cli("config", "show", recipe)
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{key} is deprecated" in lines[0] and note in lines[0], lines
    assert read in result.stdout and key.split(".")[1] not in result.stdout


def test_a_yaml_alias_bomb_is_one_short_line(tmp_path: Path) -> None:
    recipe = tmp_path / "bomb.yaml"
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    recipe.write_text("\n".join(levels) + "\n")  # 371 bytes, 387 million strings once expanded
    line = assert_user_error(run_cli("config", "show", recipe), str(recipe), "aliases expand to more than")
    assert len(line) < 300
    long = tmp_path / "long.yaml"
    long.write_text("data:\n  sources: &s [" + ", ".join(f"f{i}.txt" for i in range(5000)) + "]\n"
                    "  val_fraction: [*s, *s]\n")  # fmt: skip
    line = assert_user_error(run_cli("config", "show", long), "data.val_fraction", "valid number")
    assert len(line) < 400


def test_a_glob_through_a_symlink_loop_reads_each_real_file_once(tmp_path: Path) -> None:
    import os

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i, folder in enumerate((corpus, corpus / "sub")):
        (folder / f"part{i}.txt").write_text(f"Story number {i}, once upon a time. " * 300 + "\n")
    os.symlink(corpus, corpus / "sub" / "loop")  # corpus/sub/loop/sub/loop/... without end
    os.symlink(corpus / "part0.txt", corpus / "sub" / "again.txt")  # a second name of one file
    out = tmp_path / "ds"
    result = run_cli("data-prep", f"{corpus}/**/*.txt", "--out", out, "--vocab-size", "300", "--block-size", "16")
    assert result.exit_code == 0, result.stderr
    sources = json.loads((out / "manifest.json").read_text())["sources"]
    assert sorted(Path(s["name"]).name for s in sources) == ["part0.txt", "part1.txt"], sources


# --- one client, one request or one file never stops the service for the others ---------------------------------


KEY_FILE_KEY = "sk-from-a-file"


@pytest.fixture(scope="module")
def key_server(chat_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server whose API key comes from a file (its start-up says so), with a small body limit."""
    folder = tmp_path_factory.mktemp("serve3")
    (folder / "key").write_text(KEY_FILE_KEY + "\n")
    server = Server(chat_model, folder / "requests.jsonl", "--api-key-file", str(folder / "key"),
                    "--max-body-bytes", "200000")  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


def post(server: Server, path: str, body: object, key: str | None = KEY_FILE_KEY) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    authorization = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/{path}", content=content, timeout=120,
                      headers={"Content-Type": "application/json", **authorization})  # fmt: skip


def still_serving(server: Server) -> None:
    ok = post(server, "completions", {"model": "chat", "prompt": "hi", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"http://127.0.0.1:{server.port}/health").json()["status"] == "ok"


def test_sampling_values_the_engine_cannot_take_are_read_as_vllm_reads_them(key_server: Server) -> None:
    """top_k of 2^63 (the whole vocabulary) and a temperature of 1e-40 (greedy) used to kill the batching thread:
    every later request hung while /health said ok."""
    greedy = post(key_server, "completions", {"model": "chat", "prompt": "Once", "max_tokens": 6, "temperature": 0})
    for sampling in ({"top_k": 2**63}, {"top_k": 2**70, "temperature": 0.7}, {"temperature": 1e-40}):
        answer = post(key_server, "completions", {"model": "chat", "prompt": "Once", "max_tokens": 6, **sampling})
        assert answer.status_code == 200, (sampling, answer.text)
    tiny = post(key_server, "completions", {"model": "chat", "prompt": "Once", "max_tokens": 6, "temperature": 1e-40})
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    still_serving(key_server)


@pytest.mark.parametrize(
    ("body", "status", "param", "fragment"),
    [
        ({"model": "chat", "prompt": "x" * 300_000}, 413, None, "at most 200,000"),
        ({"model": "chat", "prompt": "word " * 30_000}, 400, "prompt", "characters, more than"),
        (b"[" * 100_000, 400, None, "nested too deeply"),
        (b'{"model": "chat", "prompt": "a \\ud800 b"}', 400, "prompt", "lone surrogate"),
        ({"model": "chat", "prompt": "hi", "n": 0}, 400, "n", "must be 1"),
        ({"model": "m" * 100_000, "prompt": "hi"}, 400, "model", "characters cut"),
    ],
    ids=["body-over-the-limit", "prompt-too-long-to-tokenize", "nested-json", "lone-surrogate", "n-0", "huge-echo"],
)  # fmt: skip
def test_one_request_is_refused_in_one_json_error_and_the_others_are_served(
    key_server: Server, body: object, status: int, param: str | None, fragment: str
) -> None:
    answer = post(key_server, "completions", body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert len(error["message"]) < 600
    still_serving(key_server)
    last = key_server.records()[-2]  # the refused request's line, before the request that followed it
    assert last["status"] == status and len(json.dumps(last)) < 1000


def test_a_streamed_answer_never_shows_the_start_of_a_stop_string(key_server: Server) -> None:
    whole = post(key_server, "completions", {"model": "chat", "prompt": "Once", "max_tokens": 24, "temperature": 0})
    text = whole.json()["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 6]  # a stop string that spans tokens
    assert len(stop) == 6
    request = {"model": "chat", "prompt": "Once", "max_tokens": 24, "temperature": 0, "stop": [stop]}
    cut = post(key_server, "completions", request).json()["choices"][0]["text"]
    streamed = ""
    headers = {"Authorization": f"Bearer {KEY_FILE_KEY}"}
    with httpx.stream("POST", f"{key_server.url}/completions", json={**request, "stream": True}, headers=headers,
                      timeout=120) as r:  # fmt: skip
        for line in r.iter_lines():
            if line.startswith("data: {"):
                streamed += json.loads(line[6:])["choices"][0]["text"]
    assert streamed == cut and stop not in cut and text.startswith(cut)


def test_api_keys_that_cannot_protect_are_refused_and_an_open_api_says_so(
    key_server: Server, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMKIT_API_KEY", "")
    assert_user_error(run_cli("serve", tiny_run, "--port", "0"), "LLMKIT_API_KEY is empty", "leave the API open")
    monkeypatch.delenv("LLMKIT_API_KEY")
    assert_user_error(run_cli("serve", tiny_run, "--api-key", ""), "--api-key is empty")
    assert_user_error(run_cli("serve", tiny_run, "--api-key", "clé-secrète"), "printable ASCII")
    empty = tmp_path / "key"
    empty.write_text("\n")
    assert_user_error(run_cli("serve", tiny_run, "--api-key-file", empty), f"--api-key-file {empty} is empty")
    assert_user_error(run_cli("serve", tiny_run, "--port", "70000"), "--port 70000")
    assert_user_error(run_cli("serve", tiny_run, "--request-timeout", "nan"), "--request-timeout")
    assert_user_error(run_cli("serve", tiny_run, "--request-timeout", "inf"), "--request-timeout")


def test_a_key_from_a_file_is_required(key_server: Server) -> None:
    assert "API key required (from --api-key-file" in key_server.started
    body = {"model": "chat", "prompt": "hi", "max_tokens": 2}
    assert post(key_server, "completions", body, key=None).status_code == 401
    assert post(key_server, "completions", body).status_code == 200


def test_a_prompt_limit_beyond_the_context_is_one_line(chat_model: Path, tmp_path: Path) -> None:
    result = run_cli("serve", chat_model, "--port", "0", "--max-prompt-tokens", "4096")
    assert_user_error(result, "--max-prompt-tokens 4096", "context is 4096 tokens", "at most 4095")


def test_a_full_request_log_disk_never_fails_an_answer(small_disk: Path, chat_model: Path, start_server) -> None:
    log = small_disk / "requests.jsonl"
    log.touch()
    with (small_disk / "filler").open("ab", buffering=0) as filler:  # the disk full to its last byte
        while True:
            try:
                filler.write(b"x" * 512)
            except OSError:
                break
    server = start_server(chat_model, log)
    assert "no API key: anyone who can reach" in server.started
    body = {"model": "chat", "prompt": "Once", "max_tokens": 4, "temperature": 0}
    answers = [post(server, "completions", body, key=None) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert server.metric("llmkit_request_log_errors_total") >= 1
    assert server.metric('llmkit_requests_total{endpoint="completions",status="200"}') == 4
    for line in log.read_text().splitlines():  # what was written is whole lines
        json.loads(line)


# --- wrong results, silently ---------------------------------------------------------------------------------------


def test_a_scoring_model_is_never_exported_without_its_head_nor_asked_to_generate(
    tiny_run: Path, tmp_path: Path
) -> None:
    """Exporting a reward model dropped its trained head while the parity check passed, and generating with it
    printed token soup: each is one line now (its scores come from `llmkit eval`)."""
    from llmkit.data.corpus import story_preference_pairs

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in story_preference_pairs(64, 0)))
    run = tmp_path / "reward"
    trained = run_cli("finetune", "--task", "reward", "--model", tiny_run, "--data", pairs, "--out", run,
                      "--max-steps", "2", "--micro-batch-size", "8", "--max-length", "64")  # fmt: skip
    assert trained.exit_code == 0, trained.stderr
    for args, doing in ((["export", run, "--out", tmp_path / "export"], "cannot be exported"),
                        (["export", run, "--out", tmp_path / "gguf", "--format", "gguf"], "cannot be exported"),
                        (["generate", run, "--prompt", "Once"], "cannot be used to generate"),
                        (["serve", run, "--port", "0"], "cannot be served")):  # fmt: skip
        assert_user_error(run_cli(*args), "a reward model scores text", doing, "llmkit eval")
    assert not (tmp_path / "export").exists() and not (tmp_path / "gguf").exists()


def test_monitor_input_it_cannot_read_is_one_line(key_server: Server, tiny_run: Path, tmp_path: Path) -> None:
    good = json.dumps({"time": 1.0, "status": 200, "duration_s": 0.5})
    cases = {
        b"\xff\xfe not utf-8\n": "not a request-log line",
        json.dumps({"time": "noon", "status": 200, "duration_s": 0.5}).encode() + b"\n": "'time' is 'noon'",
        json.dumps({"time": 1.0, "status": 200.5, "duration_s": 0.5}).encode() + b"\n": "'status' is 200.5",
    }
    for line, fragment in cases.items():
        log = tmp_path / "requests.jsonl"
        log.write_bytes(good.encode() + b"\n" + line)
        assert_user_error(run_cli("monitor", log), f"{log}:2", fragment)
    health = f"http://127.0.0.1:{key_server.port}/health"  # JSON, not Prometheus text
    assert_user_error(run_cli("monitor", health), "not the /metrics of `llmkit serve`")
    log = tmp_path / "prompts.jsonl"
    log.write_text(json.dumps({"time": 1.0, "status": 200, "duration_s": 0.5, "prompt": {"text": "hi"}}) + "\n")
    assert_user_error(run_cli("monitor", log, "--model", tiny_run), "request 1", "neither text nor chat")


def test_data_prep_settings_that_cannot_work_are_one_line(tmp_path: Path) -> None:
    corpus = tmp_path / "a.txt"
    corpus.write_text("Once upon a time there was a cat. " * 50)
    data = [str(corpus), "--out", str(tmp_path / "ds"), "--vocab-size", "300", "--block-size", "16"]
    for setting, fragment in ((f"data.mix={{{corpus}: 1e308}}", "weights are epochs, 0 to 1000"),
                              (f"data.mix={{{corpus}: 0}}", "training split would be empty"),
                              (f"data.decontaminate.tasks=[{tmp_path}]", "names a folder")):  # fmt: skip
        assert_user_error(run_cli("data-prep", *data, "--set", setting), fragment)
    assert not (tmp_path / "ds").exists()


def test_a_world_size_that_is_not_a_count_is_one_line(tiny_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "abc")
    result = run_cli("pretrain", *tiny_train_args(tiny_dataset, tmp_path / "run", steps=2))
    assert_user_error(result, "WORLD_SIZE='abc'", "not a number of processes")
    assert not (tmp_path / "run").exists()


def test_sigterm_before_torch_is_imported_exits_75(tiny_dataset: Path, tmp_path: Path) -> None:
    """The stop handlers are in place before the training code's imports (seconds, torch's): a SIGTERM then used to
    end the process with 143."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LLMKIT_FAULT_INJECT": "term@loading"}
    command = [sys.executable, "-m", "llmkit", "pretrain", *tiny_train_args(tiny_dataset, tmp_path / "run", steps=2)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 75, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_a_damaged_teacher_cache_is_one_line_before_the_run_is_started(
    cached_reference: Path, tiny_dataset: Path, tiny_run: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(cached_reference / "teacher_cache", cache)
    ids = cache / "ids.npy"
    ids.write_bytes(ids.read_bytes()[: ids.stat().st_size // 2])  # cut short
    out = tmp_path / "run"
    args = [*tiny_train_args(tiny_dataset, out, steps=2), "--teacher", tiny_run, "--set", "distill.top_k=8",
            "--set", f"distill.cache={cache}"]  # fmt: skip
    assert_user_error(run_cli("pretrain", *args), str(cache), "damaged teacher cache", "computed again")
    assert not out.exists()  # nothing half-made to block the corrected command


def test_distilling_across_vocabularies_names_the_tokens_that_differ(tiny_run: Path, tmp_path: Path) -> None:
    chats = write_chat_rows(tmp_path / "chat.jsonl", 20)
    args = ["finetune", "--task", "distill", "--model", tiny_run, "--teacher", tiny_run, "--data", chats,
            "--out", tmp_path / "run"]  # fmt: skip
    assert_user_error(run_cli(*args), "different vocabularies", "the student also has '<|im_start|>'", "chat template")


def test_a_tensorboard_folder_that_cannot_be_written_is_one_line(tiny_run: Path, tiny_dataset: Path, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "tensorboard")
    (run / "tensorboard").write_text("not a folder")  # as unwritable as it gets, also for root
    result = run_cli("pretrain", *tiny_train_args(tiny_dataset, run, steps=35), "--resume", "auto")
    assert_user_error(result, "tensorboard: cannot write TensorBoard events there", "logging.report_to=[]")


def _write_sources(folder: Path, files: int, docs: int, words: int = 60) -> list[Path]:
    import random

    rng = random.Random(0)
    vocabulary = ["".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(2000)]
    folder.mkdir()
    paths = []
    for k in range(files):
        rows = (json.dumps({"text": " ".join(rng.choices(vocabulary, k=words))}) for _ in range(docs))
        paths.append(folder / f"part{k}.jsonl")
        paths[-1].write_text("\n".join(rows) + "\n")
    return paths


@pytest.mark.parametrize("change", ["edited", "deleted"])
def test_a_source_changed_or_deleted_during_data_prep_is_one_line_and_nothing_is_kept(
    change: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's edit lands after the file was hashed and before it was read (here: as curation starts)."""
    from llmkit.data import curate

    first, second = _write_sources(tmp_path / "src", 2, 50)
    curate_shards = curate.curate_shards

    def user_changes_a_file(*args, **kwargs):
        if change == "edited":
            with second.open("a") as handle:
                handle.write(json.dumps({"text": "a line added while data-prep ran"}) + "\n")
        else:
            second.unlink()
        return curate_shards(*args, **kwargs)

    monkeypatch.setattr(curate, "curate_shards", user_changes_a_file)
    out = tmp_path / "out"
    result = run_cli("data-prep", tmp_path / "src", "--out", out, "--vocab-size", "300")
    assert_user_error(result, f"{second}: {change.replace('edited', 'changed')} while data-prep read it")
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # no dataset, no staging, no stale curation


def test_a_killed_data_prep_leaves_no_process_behind(tmp_path: Path) -> None:
    """datatrove's Manager (a forked child) outlived a kill -9 and kept its fork server and resource tracker alive."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def children() -> dict[int, list[int]]:
        found: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            found.setdefault(parent, []).append(int(stat.parent.name))
        return found

    def descendants(pid: int) -> set[int]:
        tree, todo, seen = children(), [pid], set()
        while todo:
            for child in tree.get(todo.pop(), []):
                seen.add(child)
                todo.append(child)
        return seen

    def alive(pid: int) -> bool:  # a zombie waiting for its (new) parent to reap it is dead
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    _write_sources(tmp_path / "src", 2, 6000, words=100)
    command = [sys.executable, "-m", "llmkit", "data-prep", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
               "--vocab-size", "300", "--set", "data.near_dedup.enabled=true", "--set", "data.workers=2"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(helpers := descendants(proc.pid)) < 3:  # datatrove's Manager, fork server and resource tracker
        assert proc.poll() is None and time.monotonic() < deadline, "data-prep ended before curating in parallel"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    helpers |= descendants(proc.pid)
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in helpers if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} process(es) outlived the killed data-prep"
