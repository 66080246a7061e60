"""Serving throughput and p99 latency: `llmkit serve` against the naive way and against `transformers serve`.

Three OpenAI-compatible servers on loopback, each given the same model and the same load by the official openai
client: every one of C concurrent clients sends R completions of T new tokens (greedy; ignore_eos where the server
supports it, and tokens counted from each answer's usage either way), for C = 1, 8 and 32.

- llmkit: `llmkit serve` (transformers' continuous batching, llmkit's limits and metrics).
- naive: one `model.generate` at a time behind a lock, as a hand-written server does it.
- transformers serve: `transformers serve MODEL --continuous-batching`, where it starts (skipped with the reason).

Prints output tokens/s, p50 and p99 request latency per server and the ratio to naive.

    python bench/serve.py [--model DIR] [--tokens 64] [--requests 2] [--clients 1,8,32]

Without --model, a small random Llama (4 layers, width 256, context 1024) with a tokenizer trained on the built-in
corpus is made in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_model(out: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llmkit.data.templates import setup_chat_template
    from llmkit.data.tokenizer import load_tokenizer

    data = out / "data"
    subprocess.run([sys.executable, "-m", "llmkit", "data-prep", "builtin:stories", "--out", str(data),
                    "--vocab-size", "2048", "--set", "data.builtin_docs=3000"], check=True,
                   capture_output=True)  # fmt: skip
    tokenizer = load_tokenizer(data / "tokenizer")
    setup_chat_template(tokenizer, "chatml")
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model_dir = out / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def naive_server(model: str, port: int) -> None:
    """The naive way: one request at a time, `model.generate` under a lock, no batching."""
    import threading

    import torch
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from llmkit.generate import load_generator

    generator = load_generator(model)
    lock = threading.Lock()

    def run(body: dict) -> dict:
        ids = generator.prompt_ids(body["prompt"], raw=True)
        with lock, torch.no_grad():
            out = generator.model.generate(torch.tensor([ids]), max_new_tokens=body["max_tokens"], do_sample=False,
                                           min_new_tokens=body["max_tokens"] if body.get("ignore_eos") else 0,
                                           pad_token_id=generator.tokenizer.pad_token_id)  # fmt: skip
        new = out[0, len(ids) :].tolist()
        text = generator.tokenizer.decode(new, skip_special_tokens=True)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(new), "total_tokens": len(ids) + len(new)}
        return {
            "id": "naive",
            "object": "text_completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
            "usage": usage,
        }

    async def completions(request: Request) -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(run, await request.json()))

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": Path(model).name, "object": "model"}]})

    print("ready", flush=True)
    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/v1/models", models)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start(kind: str, model: Path, port: int, log: Path) -> tuple[subprocess.Popen, str, bool] | str:
    """Start one server; once it answers, the process, the model name it serves and whether it takes `ignore_eos`
    (a server that validates its requests strictly refuses the field); or why it could not start."""
    if kind == "llmkit":
        command = [sys.executable, "-m", "llmkit", "serve", str(model), "--port", str(port), "--request-log",
                   str(log), "--max-batch", "32"]  # fmt: skip
    elif kind == "naive":
        command = [sys.executable, __file__, "--naive-server", str(model), "--port", str(port)]
    else:
        cli = shutil.which("transformers") or shutil.which("transformers", path=str(Path(sys.executable).parent))
        if cli is None:
            return "the transformers CLI is not installed"
        command = [cli, "serve", str(model), "--continuous-batching", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited with {process.returncode}: {(process.stderr.read() or '').strip().splitlines()[-1:]}"
        try:
            listed = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=60)
            listing = listed.json().get("data") if listed.status_code == 200 else None
            name = listing[0]["id"] if listing else str(model) if listed.status_code == 200 else None
            probe = {"model": name, "prompt": "hi", "max_tokens": 1}
            for ignore_eos in (True, False):
                request = {**probe, "ignore_eos": True} if ignore_eos else probe
                if name and httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=request, timeout=60).is_success:
                    return process, name, ignore_eos
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    return "did not answer within 300 s"


async def load(
    port: int, name: str, clients: int, requests: int, tokens: int, ignore_eos: bool
) -> tuple[float, float, float]:
    """Output tokens/s over the whole load, and p50 / p99 request latency in seconds."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    latencies: list[float] = []
    generated = 0
    extra = {"ignore_eos": True} if ignore_eos else None

    async def user(i: int) -> None:
        nonlocal generated
        for r in range(requests):
            start = time.perf_counter()
            answer = await client.completions.create(model=name, prompt=f"Story {i}.{r}: once upon a time",
                                                     max_tokens=tokens, temperature=0, extra_body=extra)  # fmt: skip
            latencies.append(time.perf_counter() - start)
            generated += answer.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(user(i) for i in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    p50, p99 = np.percentile(latencies, [50, 99])
    return generated / wall, float(p50), float(p99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF model directory (default: a small random Llama)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels")
    parser.add_argument("--servers", default="llmkit,naive,transformers", help="which servers to run")
    parser.add_argument("--naive-server", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_server:
        naive_server(args.naive_server, args.port)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model(Path(tmp))
        levels = [int(c) for c in args.clients.split(",")]
        results: dict[str, dict[int, tuple[float, float, float]]] = {}
        for kind in args.servers.split(","):
            port = free_port()
            started = start(kind, model, port, Path(tmp) / f"{kind}.jsonl")
            if isinstance(started, str):
                print(f"{kind}: skipped ({started})", flush=True)
                continue
            process, name, ignore_eos = started
            if not ignore_eos:
                print(f"{kind}: refuses ignore_eos; its answers may stop early (tokens counted from usage)", flush=True)
            try:
                results[kind] = {}
                for clients in levels:
                    load_run = load(port, name, clients, args.requests, args.tokens, ignore_eos)
                    results[kind][clients] = asyncio.run(load_run)
                    tps, p50, p99 = results[kind][clients]
                    print(f"{kind:>12} {clients:>3} clients: {tps:8.1f} tok/s  p50 {p50:6.2f}s  p99 {p99:6.2f}s",
                          flush=True)  # fmt: skip
            finally:
                process.terminate()
                process.wait(60)
    print(f"\n{args.requests} requests of {args.tokens} tokens per client; model {model}; "
          f"{os.cpu_count()} CPUs" + (", CUDA" if _cuda() else ""))  # fmt: skip
    naive = results.get("naive", {})
    for kind, rows in results.items():
        for clients, (tps, _, p99) in rows.items():
            ratio = f"{tps / naive[clients][0]:.2f}x naive" if clients in naive else ""
            print(f"| {kind} | {clients} | {tps:.1f} | {p99:.2f} | {ratio} |")


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


if __name__ == "__main__":
    main()
