"""generate, chat, serve and monitor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmkit.cli.app import app, user_errors_exit_2
from llmkit.cli.checks import finish_checks
from llmkit.cli.options import (
    JunitOpt,
    MarkdownOpt,
    MaxNewTokensOpt,
    ModelArg,
    ReportOpt,
    SeedOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
)


@app.command("generate")
@user_errors_exit_2
def generate_command(
    model: ModelArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue, or a chat model's question.")],
    max_new_tokens: MaxNewTokensOpt = 100,
    temperature: TemperatureOpt = 0.8,
    top_k: TopKOpt = 50,
    top_p: TopPOpt = 1.0,
    raw: Annotated[bool, typer.Option("--raw", help="Continue the prompt as is, without the chat template.")] = False,
    seed: SeedOpt = None,
) -> None:
    """Continue a prompt, or answer it, streaming tokens.

    A model with a chat template answers the prompt as a question (--raw continues it as is).
    """
    from llmkit.generate import Sampling, generate_text

    generate_text(model, prompt, Sampling(max_new_tokens, temperature, top_k, top_p), seed, raw)
    print()


@app.command("chat")
@user_errors_exit_2
def chat_command(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="A fine-tuned run, checkpoint or HF chat model directory.")
    ],
    system: Annotated[str | None, typer.Option(help="System message for the conversation.")] = None,
    max_new_tokens: MaxNewTokensOpt = 200,
    temperature: TemperatureOpt = 0.7,
    top_k: TopKOpt = 50,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
) -> None:
    """Talk to a chat model in the terminal (/reset, /exit).

    Through the chat template the model was trained with. Ctrl-C while the model answers ends the answer and the
    chat goes on; the oldest turns are dropped when the conversation outgrows the context.
    """
    from llmkit.generate import Sampling, chat_loop

    chat_loop(model, Sampling(max_new_tokens, temperature, top_k, top_p), system, seed=seed)


REQUEST_LOG = Path("requests.jsonl")


@app.command("serve")
@user_errors_exit_2
def serve_command(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    model_name: Annotated[
        str | None, typer.Option(help="The model name clients send (default: the directory's name).")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require Authorization: Bearer KEY (401 without); other users see it in ps: prefer "
            "LLMKIT_API_KEY or --api-key-file."
        ),
    ] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="Read the API key from this file (its first line).")] = None,
    max_batch: Annotated[int, typer.Option(help="Requests generating at once (continuous batching).")] = 32,
    max_queue: Annotated[int, typer.Option(help="Requests waiting beyond those; more get 429.")] = 256,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(help="Longest prompt accepted (default: the context less one).")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Largest max_tokens a request may ask for.")] = None,
    default_max_tokens: Annotated[int, typer.Option(help="New tokens when a request names none.")] = 256,
    request_timeout: Annotated[float, typer.Option(help="Seconds before a request is cancelled (504).")] = 600.0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body read (413 beyond).")] = 4 * 2**20,
    request_log: Annotated[Path, typer.Option(help="JSONL log of every request (timings, tokens).")] = REQUEST_LOG,
    log_prompts: Annotated[
        bool, typer.Option("--log-prompts", help="Also log prompt text (for `llmkit monitor` drift).")
    ] = False,
    engine: Annotated[str, typer.Option(help="transformers, or vllm (GPU nodes, tensor parallel).")] = "transformers",
    tensor_parallel: Annotated[int, typer.Option(help="GPUs per model with --engine vllm.")] = 1,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API.

    /v1/chat/completions (the model's chat template), /v1/completions, streaming, /v1/models, /health and
    Prometheus /metrics. A run, checkpoint, LoRA run, HF or GGUF export. SIGTERM drains and exits 0.
    """
    from llmkit.serve.requests import Limits
    from llmkit.serve.server import api_key_from, serve

    limits = Limits(
        max_batch, max_queue, max_prompt_tokens, max_tokens, default_max_tokens, request_timeout, max_body_bytes
    )
    key = api_key_from(api_key, api_key_file)
    code = serve(model, host, port, model_name, key, limits, request_log, log_prompts, engine, tensor_parallel)
    raise typer.Exit(code)


@app.command("monitor")
@user_errors_exit_2
def monitor_command(
    source: Annotated[
        str, typer.Argument(metavar="LOG_OR_URL", help="A serve request log (JSONL), or http://HOST:PORT/metrics.")
    ],
    since: Annotated[str | None, typer.Option(help="Only requests of the last 15m, 1h, 1d...")] = None,
    model: Annotated[
        str | None, typer.Option(help="The served run: perplexity drift of the logged prompts against it.")
    ] = None,
    gate: Annotated[
        list[str] | None,
        typer.Option("--gate", metavar="RULE", help="METRIC OP VALUE, e.g. 'p99_latency_s<=2' (repeatable)."),
    ] = None,
    max_prompts: Annotated[
        int | None, typer.Option(help="With --model: score the last N logged prompts (default 1000).")
    ] = None,
    report: ReportOpt = None,
    markdown: MarkdownOpt = None,
    junit: JunitOpt = None,
) -> None:
    """Latency, errors, throughput and drift of a served model.

    p50/p95/p99 latency, time to first token and per token, error rate, tokens/s; prompt perplexity drift with
    --model. Exit codes: 0 every gate passed, 1 one failed, 2 bad input.
    """
    from llmkit.outputs import check_report_paths
    from llmkit.reports import print_monitor_report
    from llmkit.runs import model_files, resolve_model_dir, run_summaries
    from llmkit.serve.monitor import monitor

    reads = [*model_files(model), *run_summaries(resolve_model_dir(model))] if model else []  # drift reads them
    check_report_paths([report, markdown, junit], [source, *reads])
    result = monitor(source, since, model, list(gate or []), max_prompts)
    print_monitor_report(result)
    finish_checks(result, report, markdown, junit)
