"""`llmkit serve`: bind, load the model in the background (/health says when it is ready), serve, drain on SIGTERM.

uvicorn runs the HTTP side. On SIGTERM or Ctrl-C it stops accepting connections, lets the requests in flight
finish (streams included, up to the request timeout), then llmkit stops the engine and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.util
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llmkit.errors import UserError
from llmkit.serve.requests import Limits

ENGINES = ("transformers", "vllm")


def served_name(model: str | Path) -> str:
    """The name clients send as `model`: the directory's name (the run's, for RUN/final)."""
    path = Path(model).resolve()
    return path.parent.name if path.name == "final" else path.name


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        # a name that does not resolve, or an address not on this machine, is the host's fault; a taken port the port's
        fix = "pick another port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "check --host"
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); {fix}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def check_limits(limits: Limits, port: int = 0) -> None:
    for option, value, least in (
        ("--max-batch", limits.max_batch, 1),
        ("--max-queue", limits.max_queue, 0),
        ("--default-max-tokens", limits.default_max_tokens, 1),
        ("--max-prompt-tokens", limits.max_prompt_tokens, 1),
        ("--max-tokens", limits.max_tokens, 1),
        ("--max-body-bytes", limits.max_body_bytes, 1024),
    ):
        if value is not None and value < least:
            raise UserError(f"{option}: must be at least {least}, got {value}")
    if not math.isfinite(limits.timeout_s) or limits.timeout_s <= 0:
        raise UserError(f"--request-timeout: must be a positive number of seconds, got {limits.timeout_s:g}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: a port is 0 (any free one) to 65535")


def context_of(model_dir: Path) -> int:
    """The model's context from its config.json (0 when it has none: a LoRA adapter's is its base's)."""
    import json

    from llmkit.models import model_context

    config = model_dir / "config.json"
    if not config.is_file():
        return 0
    return model_context(SimpleNamespace(**json.loads(config.read_text(encoding="utf-8"))))


def check_prompt_limit(limits: Limits, context: int) -> None:
    longest = limits.max_prompt_tokens
    if context and longest is not None and longest >= context:
        raise UserError(
            f"--max-prompt-tokens {longest}: the model's context is {context} tokens, which must also "
            f"hold the answer; give at most {context - 1}"
        )


def api_key_from(flag: str | None, file: Path | None) -> tuple[str, str] | None:
    """(the API key, where it came from): --api-key, --api-key-file or LLMKIT_API_KEY, in that order; None for an
    open API. An empty key is refused (it used to turn authentication off silently), and so is one that is not
    printable ASCII (a header carries it: such a key could never match)."""
    if flag is not None:
        key, source = flag, "--api-key"
    elif file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--api-key-file {file}: cannot read it ({exc})") from None
        key, source = (lines[0] if lines else ""), f"--api-key-file {file}"
    elif "LLMKIT_API_KEY" in os.environ:
        key, source = os.environ["LLMKIT_API_KEY"], "LLMKIT_API_KEY"
    else:
        return None
    key = key.strip()
    if not key:
        raise UserError(
            f"{source} is empty: an empty key would leave the API open; give a key, or unset it to serve without one"
        )
    if not (key.isascii() and key.isprintable()):
        raise UserError(f"{source}: an API key travels in an HTTP header, so it must be printable ASCII")
    return key, source


def serve(
    model: str,
    host: str,
    port: int,
    name: str | None,
    key: tuple[str, str] | None,
    limits: Limits,
    request_log: Path | None,
    log_prompts: bool,
    engine: str,
    tensor_parallel: int,
) -> int:
    """Serve until SIGTERM / Ctrl-C; returns the exit code (0 after a clean drain, 2 when the model cannot load).
    `key`: (API key, where it came from) from `api_key_from`, or None for an open API."""
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    check_limits(limits, port)
    if tensor_parallel < 1 or (tensor_parallel > 1 and engine != "vllm"):
        raise UserError(
            f"--tensor-parallel {tensor_parallel}: the GPUs one model is split over, at least 1, and more only with "
            "--engine vllm (the transformers engine serves on one device)"
        )
    if name is not None and not name.strip():
        raise UserError("--model-name is empty: give the name clients send as 'model' (default: the directory's)")
    name = name or served_name(model)
    api_key = key[0] if key else None
    if engine == "vllm":
        return _exec_vllm(model, name, host, port, api_key, tensor_parallel, limits.max_batch)
    missing = [name for name in ("starlette", "uvicorn", "prometheus_client") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"llmkit serve needs {', '.join(missing)}: pip install 'llmkit[serve]'")
    from llmkit.outputs import check_report_paths
    from llmkit.runs import model_files
    from llmkit.serve.app import ServerState, build_app
    from llmkit.serve.engines import servable_dir
    from llmkit.serve.metrics import RequestLog

    check_prompt_limit(limits, context_of(servable_dir(model)))  # before anything listens, where the config says
    if request_log is not None:  # appended to: never one of the model's files
        check_report_paths([request_log], model_files(model), "--request-log", "requests.jsonl")
    sock = bind(host, port)
    import uvicorn

    state = ServerState(name, limits, api_key, RequestLog(request_log), log_prompts)
    state.slots = asyncio.Semaphore(limits.max_batch)
    config = uvicorn.Config(
        build_app(state),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=int(limits.timeout_s) + 5,
    )
    server = draining_server(config, state)
    shown = f"[{host}]" if ":" in host else host
    address = f"{shown}:{sock.getsockname()[1]}"
    print(f"serving {name} at http://{address}/v1 (loading the model; /health answers ok when ready)", flush=True)
    if key is None:
        print(f"no API key: anyone who can reach {address} can use the API (set LLMKIT_API_KEY to require one)")
    else:
        print(f"API key required (from {key[1]})")
        if key[1] == "--api-key":
            print(
                "note: a key given on the command line is visible to other users of this machine (ps); prefer "
                "LLMKIT_API_KEY or --api-key-file",
                file=sys.stderr,
            )
    failure: list[BaseException] = []
    threading.Thread(target=_load, args=(model, state, server, failure, request_log), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        if state.served is not None:
            state.served.engine.close()
        state.log.close()
    if failure:
        raise failure[0]
    if state.draining:
        print("stopped: every request in flight was answered", flush=True)
    return 0


def _load(model: str, state: Any, server: Any, failure: list[BaseException], log: Path | None) -> None:
    from llmkit.serve.engines import load_served

    try:
        served = load_served(model, state.limits.max_batch)
        try:
            check_prompt_limit(state.limits, served.context)  # a LoRA run's context is known once loaded
        except UserError:
            served.engine.close()
            raise
    except BaseException as exc:  # the main thread reports it (one line for a UserError)
        failure.append(exc)
        server.should_exit = True
        return
    state.served = served
    engine = served.engine
    batching = (
        f"continuous batching of up to {state.limits.max_batch} requests"
        if engine.name == "transformers"
        else "one request at a time"
    )
    where = f"; request log {log}" if log else ""
    print(f"ready: {engine.name}, {batching}, context {served.context} tokens{where}", flush=True)


def draining_server(config: Any, state: Any) -> Any:
    """uvicorn's server, marking the state as draining (health 503, new requests 503) when a stop signal arrives."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not state.draining:
                state.draining = True
                busy = state.active + state.waiting
                print(f"stopping: draining {busy} request(s) in flight", flush=True)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """As uvicorn's, without re-raising the signal afterwards: a drained stop exits 0."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)


def _exec_vllm(
    model: str, name: str, host: str, port: int, api_key: str | None, tensor_parallel: int, max_batch: int
) -> int:
    from llmkit.serve.engines import vllm_command

    command = vllm_command(model, name, host, port, tensor_parallel, max_batch)
    env = dict(os.environ, **({"VLLM_API_KEY": api_key} if api_key else {}))
    print(f"starting vLLM: {' '.join(command)}", flush=True)
    sys.stdout.flush()
    os.execvpe(command[0], command, env)
    return 0  # not reached: vLLM replaces this process
