"""`llmkit serve` and `llmkit monitor`: the real server on a loopback port, talked to by the official openai client
and by plain HTTP for the error cases; limits, cancellation and draining; the monitor's figures read back from the
server's own request log and /metrics."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from openai import AuthenticationError, OpenAI

from llmkit.data.corpus import STORIES, generate
from tests.conftest import assert_user_error, run_cli

KEY = "sk-test-key"


class Server:
    """`python -m llmkit serve MODEL --port 0 ...` in a subprocess, ready once it printed its `ready:` line."""

    def __init__(self, model: Path, log: Path, *args: str, python: str = sys.executable, ready: bool = True) -> None:
        self.log = log
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        command = [python, "-m", "llmkit", "serve", str(model), "--port", "0", "--request-log", str(log)]
        self.process = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=env)  # fmt: skip
        try:
            first = self.process.stdout.readline()
            match = re.search(r"at (http://127\.0\.0\.1:(\d+)/v1)", first)
            assert match, first
            self.url, self.port = match.group(1), int(match.group(2))
            self.started = first + self.process.stdout.readline()  # and whether an API key is required
            if ready:
                self.wait_ready()
        except AssertionError:
            self.kill()
            raise AssertionError(self.process.stderr.read()) from None

    def wait_ready(self) -> None:
        """Read the line the server prints once the model is loaded."""
        self.ready = self.process.stdout.readline()
        assert self.ready.startswith("ready: "), self.ready

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def client(self, key: str | None = KEY) -> OpenAI:
        return OpenAI(base_url=self.url, api_key=key or "none", max_retries=0, timeout=120)

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=120)
        return self.process.returncode, out + err


def wait_for(condition, what: str, seconds: float = 60) -> None:
    """Poll a condition the server reaches on its own (no fixed sleeps)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def generated(line: str) -> bool:
    """A streamed chunk with generated text (not the first, empty one)."""
    return '"content"' in line and '"content": ""' not in line


@pytest.fixture(scope="module")
def chat_model(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a long context (slow enough generation to hold a slot) and a chat template."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llmkit.data.templates import setup_chat_template
    from llmkit.data.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("serve") / "chat"
    tokenizer = load_tokenizer(tiny_run / "tokenizer")
    setup_chat_template(tokenizer, "chatml")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def start_server():
    """Start servers in a test; whatever happens, none outlives it."""
    servers: list[Server] = []

    def start(model: Path, log: Path, *args: str, python: str = sys.executable, ready: bool = True) -> Server:
        servers.append(Server(model, log, *args, python=python, ready=ready))
        return servers[-1]

    yield start
    for server in servers:
        server.kill()


@pytest.fixture(scope="module")
def chat_server(chat_model: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve-log") / "requests.jsonl"
    server = Server(chat_model, log, "--api-key", KEY, "--log-prompts", "--max-prompt-tokens", "300",
                    "--max-tokens", "2000")  # fmt: skip
    try:
        yield server
    finally:
        code, output = server.stop()
    assert code == 0, output


def greedy(model: Path, prompt: str, tokens: int, raw: bool = False) -> str:
    """What `llmkit generate --temperature 0` answers (the same Generator the command runs)."""
    from llmkit.generate import Sampling, load_generator

    generator = load_generator(model)
    return generator.complete(generator.prompt_ids(prompt, raw), Sampling(tokens, temperature=0.0), stream=False)


def test_openai_client_chat_completions_models_and_streaming(chat_server: Server, chat_model: Path) -> None:
    client = chat_server.client()
    assert [m.id for m in client.models.list().data] == ["chat"]
    question = "Tell me about the red fox."
    answer = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": question}],
                                            max_tokens=20, temperature=0)  # fmt: skip
    assert answer.choices[0].message.content == greedy(chat_model, question, 20)
    assert answer.usage.completion_tokens <= 20 and answer.usage.prompt_tokens > 5

    text = client.completions.create(model="chat", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert text.choices[0].text == greedy(chat_model, "Once upon a time", 12, raw=True)

    chunks = list(client.chat.completions.create(model="chat", messages=[{"role": "user", "content": question}],
                                                 max_tokens=20, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason

    stop = answer.choices[0].message.content[6:9]  # a stop string ends the answer just before it
    stopped = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": question}],
                                             max_tokens=20, temperature=0, stop=[stop])  # fmt: skip
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == answer.choices[0].message.content.split(stop)[0]

    sampled = client.completions.create(model="chat", prompt="The cat", max_tokens=8, temperature=0.9, top_p=0.9)
    assert sampled.usage.completion_tokens >= 1

    assert httpx.get(f"http://127.0.0.1:{chat_server.port}/health").json() == {"status": "ok"}
    assert chat_server.metric('llmkit_requests_total{endpoint="chat",status="200"}') == 3
    assert chat_server.metric('llmkit_requests_total{endpoint="completions",status="200"}') == 2
    logged = [r for r in chat_server.records() if r["status"] == 200]
    assert logged[0]["prompt"] == [{"role": "user", "content": question}]  # --log-prompts
    assert all(r["ttft_s"] <= r["duration_s"] and r["completion_tokens"] >= 1 for r in logged)


def test_32_concurrent_streaming_clients_get_the_greedy_answers(chat_server: Server, chat_model: Path) -> None:
    prompts = [f"Question {i}: what colour is the {animal}?" for i, animal in
               enumerate(["fox", "cat", "owl", "bear"] * 8)]  # fmt: skip
    client = chat_server.client()

    def ask(prompt: str) -> str:
        stream = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=24, temperature=0, stream=True)  # fmt: skip
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    before = len(chat_server.records())
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [greedy(chat_model, prompt, 24) for prompt in prompts]
    cli = run_cli("generate", chat_model, "--prompt", prompts[5], "--temperature", "0", "--max-new-tokens", "24")
    assert cli.exit_code == 0 and cli.stdout.strip() == answers[5].strip()
    records = chat_server.records()[before:]
    assert len(records) == 32 and {r["status"] for r in records} == {200}
    # They were generated together. The clients' threads reach the server staggered on a busy machine, so not every
    # request starts before the first ends (CI once saw 14 ms between them); one at a time would peak at 1.
    assert peak_overlap([(r["time"] + r["queue_s"], r["time"] + r["duration_s"]) for r in records]) >= 16
    assert chat_server.metric("llmkit_requests_in_flight") == 0


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The most of these (start, end) spans that were under way at one instant."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # an end first on a tie
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize(
    ("path", "body", "param", "fragment"),
    [
        ("chat/completions", b"{not json", None, "not valid JSON"),
        ("chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, "model", "gpt-4"),
        ("chat/completions", {"model": "chat", "messages": "hi"}, "messages", "list"),
        ("chat/completions", {"model": "chat", "messages": [{"role": "robot", "content": "hi"}]},
         "messages[0].role", "one of"),
        ("chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
         "temperature", "number"),
        ("chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
         "max_tokens", "at least 1"),
        ("chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "logprobs": True},
         "logprobs", "unsupported parameter"),
        ("chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", "1"),
        ("completions", {"model": "chat", "prompt": 42}, "prompt", "string"),
        ("completions", {"model": "chat", "prompt": "word " * 400}, "prompt", "at most 300"),
        ("completions", {"model": "chat", "prompt": "hi", "max_tokens": 5000}, "max_tokens", "at most 2000"),
    ],
)  # fmt: skip
def test_a_bad_request_is_a_400_naming_the_field(chat_server: Server, path, body, param, fragment) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{chat_server.url}/{path}", content=content,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert error["type"] == "invalid_request_error"
    ok = chat_server.client().completions.create(model="chat", prompt="hi", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1  # and the server keeps serving


def test_the_api_key_is_required_and_unknown_routes_are_404(chat_server: Server) -> None:
    for key in (None, "sk-wrong"):
        with pytest.raises(AuthenticationError, match="API key"):
            chat_server.client(key).completions.create(model="chat", prompt="hi", max_tokens=2)
    assert httpx.get(f"{chat_server.url}/engines").status_code == 404
    assert chat_server.metric('llmkit_requests_total{endpoint="completions",status="401"}') == 2


def test_full_queue_429_disconnect_cancels_and_sigterm_drains(chat_model: Path, tmp_path: Path,
                                                               start_server) -> None:  # fmt: skip
    server = start_server(chat_model, tmp_path / "requests.jsonl", "--max-batch", "1", "--max-queue", "1")
    base, client = f"http://127.0.0.1:{server.port}", server.client(None)
    long = {"model": "chat", "messages": [{"role": "user", "content": "go on"}], "stream": True, "ignore_eos": True,
            "max_tokens": 3000}  # fmt: skip
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/chat/completions", json=long) as holder:
            lines = holder.iter_lines()
            assert next(line for line in lines if generated(line))  # generating, holding the only slot
            waiting: list = []
            thread = threading.Thread(target=lambda: waiting.append(
                client.completions.create(model="chat", prompt="hi", max_tokens=4, temperature=0)))  # fmt: skip
            thread.start()
            wait_for(lambda: server.metric("llmkit_queue_depth") == 1, "the second request to queue")
            full = httpx.post(f"{server.url}/completions", json={"model": "chat", "prompt": "hi"})
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["code"] == "queue_full"
        # The holder hung up mid-stream: its generation is cancelled and the queued request runs.
        thread.join(60)
        assert waiting and waiting[0].usage.completion_tokens >= 1
        wait_for(lambda: any(r["status"] == 499 for r in server.records()), "the cancelled request's log line")
        cancelled = next(r for r in server.records() if r["status"] == 499)
        assert 0 < cancelled["completion_tokens"] < 3000, server.log.read_text()
        assert server.metric("llmkit_requests_in_flight") == 0

        # SIGTERM with a stream in flight: no new connections, the stream ends whole, exit 0.
        with http.stream(
            "POST",
            f"{server.url}/chat/completions",
            json={**long, "max_tokens": 600, "stream_options": {"include_usage": True}},
        ) as drained:
            lines = drained.iter_lines()
            next(line for line in lines if generated(line))
            server.process.send_signal(signal.SIGTERM)

            def refused() -> bool:
                try:
                    httpx.get(f"{base}/health", timeout=1)
                except httpx.TransportError:
                    return True
                return False

            wait_for(refused, "the server to stop accepting connections")
            rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 600
    code, output = server.stop()
    assert code == 0, output
    assert "draining 1 request(s)" in output and "every request in flight was answered" in output


def test_health_says_loading_until_the_model_is_ready_and_a_slow_generation_is_a_504(
    chat_model: Path, tmp_path: Path, start_server
) -> None:
    """The server listens before the model is loaded (seconds here, against milliseconds for the first request):
    until then /health and every request answer 503 with Retry-After. A generation past --request-timeout is
    cancelled and answered 504, whole or streamed."""
    server = start_server(chat_model, tmp_path / "requests.jsonl", "--request-timeout", "1", ready=False)
    health = httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=60)
    assert (health.status_code, health.json()) == (503, {"status": "loading"})
    early = httpx.post(f"{server.url}/completions", json={"model": "chat", "prompt": "hi"}, timeout=60)
    assert early.status_code == 503 and early.headers["retry-after"] == "1"
    assert "still loading" in early.json()["error"]["message"]
    server.wait_ready()
    assert httpx.get(f"http://127.0.0.1:{server.port}/health").json() == {"status": "ok"}

    endless = {"model": "chat", "prompt": "Once upon a time", "ignore_eos": True, "max_tokens": 4000}
    slow = httpx.post(f"{server.url}/completions", json=endless, timeout=60)
    assert slow.status_code == 504, slow.text
    error = slow.json()["error"]
    assert error["code"] == "timeout" and error["type"] == "server_error" and "over 1s" in error["message"]
    with httpx.stream("POST", f"{server.url}/completions", json={**endless, "stream": True}, timeout=60) as streamed:
        events = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "timeout"  # the stream ends with the error, no [DONE]
    records = server.records()
    assert [r["status"] for r in records] == [503, 504, 504]
    assert all(r["duration_s"] < 5 for r in records[1:])  # cancelled at the timeout, not run to 4,000 tokens
    # Both slots are free again and the server is healthy (a later request's own latency depends on the machine's
    # load, which a 1 s limit would make this test depend on too).
    assert server.metric("llmkit_requests_in_flight") == 0 and server.metric("llmkit_queue_depth") == 0
    assert httpx.get(f"http://127.0.0.1:{server.port}/health").json() == {"status": "ok"}
    code, output = server.stop()
    assert code == 0, output


def test_monitor_reports_percentiles_errors_and_prompt_drift(tiny_run: Path, tmp_path: Path, start_server) -> None:
    log = tmp_path / "requests.jsonl"
    server = start_server(tiny_run, log, "--log-prompts")  # a run directory, without a chat template
    client = server.client(None)
    stories = [doc.text[:120] for doc in generate(STORIES, 12, seed=99)]
    for story in stories:
        client.completions.create(model="tiny", prompt=story, max_tokens=8, temperature=0)
    no_template = httpx.post(f"{server.url}/chat/completions",
                             json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert no_template.status_code == 400 and "/v1/completions" in no_template.json()["error"]["message"]

    report = tmp_path / "monitor.json"
    result = run_cli("monitor", log, "--model", tiny_run, "--gate", "ppl_drift<=1.5", "--gate", "error_rate<=0.1",
                     "--report", report, "--markdown", tmp_path / "monitor.md")  # fmt: skip
    assert result.exit_code == 0, result.stdout + result.stderr
    metrics = json.loads(report.read_text())["metrics"]
    records = server.records()
    durations = [r["duration_s"] for r in records if r["status"] == 200]
    assert metrics["requests"] == 13 and metrics["errors"] == 1 and metrics["error_rate"] == pytest.approx(1 / 13)
    assert [metrics[f"p{q}_latency_s"] for q in (50, 95, 99)] == pytest.approx(np.percentile(durations, [50, 95, 99]))
    assert 0.5 < metrics["ppl_drift"] < 1.5  # prompts from the training distribution read like validation text
    assert "## llmkit monitor: passed" in (tmp_path / "monitor.md").read_text()

    rng = random.Random(0)
    for _ in range(12):  # traffic unlike anything the model saw
        noise = "".join(rng.choice("qzxjkvw#%&{}0123") for _ in range(40))
        client.completions.create(model="tiny", prompt=noise, max_tokens=4, temperature=0)
    drifted = run_cli("monitor", log, "--model", tiny_run, "--gate", "ppl_drift<=1.5")
    assert drifted.exit_code == 1 and "gate failed: ppl_drift" in drifted.stderr

    scraped = tmp_path / "scraped.json"
    result = run_cli("monitor", f"http://127.0.0.1:{server.port}/metrics", "--gate", "p99_latency_s<=60",
                     "--report", scraped)  # fmt: skip
    assert result.exit_code == 0, result.stdout + result.stderr
    from_metrics = json.loads(scraped.read_text())["metrics"]
    assert from_metrics["requests"] == 25 and from_metrics["error_rate"] == pytest.approx(1 / 25)
    assert from_metrics["p50_latency_s"] > 0 and from_metrics["resident_memory_gib"] > 0
    log.write_bytes(b"")  # as logrotate's copytruncate empties it: the next line starts the file, whole
    client.completions.create(model="tiny", prompt=stories[0], max_tokens=2, temperature=0)
    assert len(server.records()) == 1 and log.read_bytes().count(b"\n") == 1
    code, output = server.stop()
    assert code == 0, output

    log.write_text(log.read_text() + "{half a line\n")
    assert_user_error(run_cli("monitor", log), f"{log}:2")


def test_a_gguf_export_is_served_by_llama_cpp(tiny_run: Path, tmp_path: Path, start_server) -> None:
    """With llama-cpp-python (here or in LLMKIT_LLAMA_CPP_PYTHON, as in test_export): the f32 GGUF export answers
    greedily as the model it came from, whole and streamed."""
    python = os.environ.get("LLMKIT_LLAMA_CPP_PYTHON") or sys.executable
    if subprocess.run([python, "-c", "import llama_cpp, llmkit"], capture_output=True).returncode != 0:
        pytest.skip("llama-cpp-python is not installed (set LLMKIT_LLAMA_CPP_PYTHON)")
    out = tmp_path / "gguf"
    assert run_cli("export", tiny_run, "--out", out, "--format", "gguf", "--dtype", "f32").exit_code == 0
    server = start_server(out, tmp_path / "requests.jsonl", python=python)
    assert server.ready.startswith("ready: llama.cpp, one request at a time"), server.ready
    client = server.client(None)
    prompt = "Once upon a time, there was a"
    answer = client.completions.create(model="gguf", prompt=prompt, max_tokens=8, temperature=0)
    assert answer.choices[0].text == greedy(tiny_run, prompt, 8, raw=True)
    stream = client.completions.create(model="gguf", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == answer.choices[0].text
    code, output = server.stop()
    assert code == 0, output


def test_what_cannot_be_served_is_one_line_before_listening(tmp_path: Path, tiny_run: Path) -> None:
    assert_user_error(run_cli("serve", tmp_path / "missing"), "model not found")
    if importlib.util.find_spec("vllm") is None:
        assert_user_error(run_cli("serve", tiny_run, "--engine", "vllm"), "pip install vllm")
    assert_user_error(run_cli("serve", tiny_run, "--max-batch", "0"), "--max-batch")
    assert_user_error(run_cli("serve", tiny_run, "--tensor-parallel", "2"), "more only with --engine vllm")
    assert_user_error(run_cli("serve", tiny_run, "--model-name", " "), "--model-name is empty")
    assert_user_error(run_cli("serve", tiny_run, "--host", "10.255.255.1"), "cannot listen there", "check --host")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_user_error(run_cli("serve", tiny_run, "--port", port), "cannot listen there", "pick another port")
    (tmp_path / "a-file").write_text("")
    unwritable = run_cli("serve", tiny_run, "--port", "0", "--request-log", tmp_path / "a-file" / "requests.jsonl")
    assert_user_error(unwritable, "--request-log", "a-file is a file, not a folder")
    # the log is appended to: never one of the model's files, nor a file of the user's that is not a request log
    inside = run_cli("serve", tiny_run, "--port", "0", "--request-log", tiny_run / "final" / "config.json")
    assert_user_error(inside, "config.json: is inside", "write the --request-log elsewhere")
    rows = tmp_path / "train.jsonl"
    rows.write_text('{"text": "a user\'s own rows"}\n')
    theirs = run_cli("serve", tiny_run, "--port", "0", "--request-log", rows)
    assert_user_error(theirs, "--request-log", "holds something other than a request log")
    assert rows.read_text() == '{"text": "a user\'s own rows"}\n'
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "config.json").write_text("{}")
    (gguf / "model.gguf").write_bytes(b"GGUF")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert_user_error(run_cli("serve", gguf), "pip install llama-cpp-python")
