"""The OpenAI-compatible HTTP API of `llmkit serve` (Starlette): chat and text completions, streaming, limits.

A request goes: key check (401), readiness (503), JSON and fields (400), the prompt through the model's own chat
template, length limits (400 naming the limit), a generation slot or a place in the bounded queue (429 with
Retry-After when both are full), then generation by the engine, streamed as server-sent events or returned whole.
A client that goes away cancels its generation; every request ends in one line of the request log and in /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmkit.errors import shorten
from llmkit.serve.engines import Request, Served, Update
from llmkit.serve.metrics import Metrics, Record, RequestLog
from llmkit.serve.requests import BadRequest, Body, Limits, parse_body


@dataclass
class ServerState:
    model_name: str
    limits: Limits
    api_key: str | None
    log: RequestLog
    log_prompts: bool = False
    metrics: Metrics = field(default_factory=Metrics)
    served: Served | None = None
    draining: bool = False
    waiting: int = 0
    active: int = 0
    slots: asyncio.Semaphore | None = None
    tokenizing: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "llmkit-tokenize"))

    def __post_init__(self) -> None:
        self.metrics.queue_depth.set_function(lambda: self.waiting)
        self.metrics.in_flight.set_function(lambda: self.active)
        self.metrics.ready.set_function(lambda: self.served is not None)

    def ready(self) -> Served:
        if self.served is None:
            raise BadRequest("the model is still loading; retry when /health answers ok", status=503)
        if self.draining:
            raise BadRequest("the server is shutting down", status=503)
        return self.served

    def finished(self, record: Record) -> None:
        """A request's end: in /metrics and one line of the request log."""
        record.observe(self.metrics)
        if not self.log.write(record):
            self.metrics.log_errors.inc()


LOGGED_CHARS = 20_000  # of each logged prompt text (--log-prompts)


def generation_error(exc: Exception, limits: Limits) -> BadRequest:
    """What a generation that did not end well answers: 504 past the request timeout, else 500."""
    if isinstance(exc, TimeoutError):
        return BadRequest(f"generation took over {limits.timeout_s:g}s (--request-timeout)", status=504, code="timeout")
    return BadRequest(f"generation failed: {exc}", status=500)


def error_response(error: BadRequest) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _stop_prefix(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that a stop string starts with (0 when none does)."""
    return max(
        (n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1) if stop.startswith(text[-n:])),
        default=0,
    )


class Generation:
    """One request's generation: the prompt ids, the limits applied, and the text as tokens arrive."""

    def __init__(self, state: ServerState, served: Served, body: Body, endpoint: str) -> None:
        generator = served.generator
        if body.chat:
            if not generator.is_chat:
                raise BadRequest("this model has no chat template: use /v1/completions", "messages")
            self.ids = generator.chat_ids(body.messages)
        else:
            self.ids = generator.prompt_ids(body.prompt, raw=True)
        limits, context = state.limits, served.context
        max_prompt = limits.max_prompt_tokens or context - 1
        if len(self.ids) > max_prompt:
            param = "messages" if body.chat else "prompt"
            raise BadRequest(f"the prompt is {len(self.ids)} tokens; this server takes at most {max_prompt}", param)
        room, allowed = context - len(self.ids), limits.max_tokens or context
        if body.max_tokens is not None and body.max_tokens > allowed:
            raise BadRequest(f"'max_tokens' is {body.max_tokens}; this server allows at most {allowed}", "max_tokens")
        if body.max_tokens is not None and body.max_tokens > room:
            raise BadRequest(
                f"the prompt ({len(self.ids)} tokens) and max_tokens ({body.max_tokens}) exceed the "
                f"model's context of {context} tokens",
                "max_tokens",
            )
        self.max_tokens = body.max_tokens or min(limits.default_max_tokens, allowed, room)
        self.state, self.body, self.served = state, body, served
        self.id = f"{'chatcmpl' if body.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.text, self.finish_reason = "", "length"
        self.tokens: list[int] = []
        prompt = None
        if state.log_prompts:  # for `llmkit monitor`'s drift: enough of each text, never megabytes of it
            prompt = (
                [{**m, "content": shorten(m["content"], LOGGED_CHARS)} for m in body.messages]
                if body.chat
                else shorten(body.prompt, LOGGED_CHARS)
            )
        self.record = Record(time.time(), self.id, endpoint, 200, body.stream, len(self.ids), prompt=prompt)
        self.start = time.perf_counter()

    def request(self) -> Request:
        b = self.body
        return Request(self.ids, self.max_tokens, b.temperature, b.top_p, b.top_k, b.ignore_eos)

    async def run(self) -> AsyncIterator[str]:
        """Wait for a slot, generate, and yield each new piece of text; cancels the generation if abandoned."""
        state, engine = self.state, self.served.engine
        assert state.slots is not None
        queue: asyncio.Queue[Update] = asyncio.Queue()
        state.waiting += 1
        submitted = False
        try:
            async with asyncio.timeout(state.limits.timeout_s):
                await state.slots.acquire()
                try:
                    state.waiting -= 1
                    state.active += 1
                    self.record.queue_s = time.perf_counter() - self.start
                    engine.submit(self.id, self.request(), queue)
                    submitted = True
                    while True:
                        update = await queue.get()
                        if update.error:
                            raise RuntimeError(update.error)
                        piece = self._advance(update.tokens, update.done)
                        if piece:
                            yield piece
                        if update.done or self.finish_reason == "stop":
                            submitted = not update.done  # a stop string ended it early: cancel the rest
                            break
                finally:
                    state.active -= 1
                    state.slots.release()
        finally:
            if self.record.queue_s is None:
                state.waiting -= 1
            if submitted:
                engine.cancel(self.id)

    def _advance(self, tokens: list[int], done: bool) -> str:
        """The text that `tokens` (everything generated so far) adds, held back while a character is incomplete."""
        now = time.perf_counter()
        if tokens and not self.tokens:
            self.record.ttft_s = now - self.start
        self.tokens = tokens
        stops = self.served.generator.stop_ids
        ended = bool(tokens) and tokens[-1] in stops and not self.body.ignore_eos
        if ended:
            self.finish_reason = "stop"
        text = str(self.served.tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True))
        for stop in self.body.stop:
            at = text.find(stop, max(0, len(self.text) - len(stop)))
            if at >= 0:
                text, self.finish_reason = text[:at], "stop"
        final = done or self.finish_reason == "stop"
        if text.endswith("\ufffd") and not final:
            return ""
        # What could still become a stop string stays back until the next tokens say (the whole answer cuts it).
        shown = text if final else text[: len(text) - _stop_prefix(text, self.body.stop)]
        piece, self.text = shown[len(self.text) :], shown
        return piece

    def finish(self, status: int, error: str | None = None) -> None:
        record = self.record
        record.status, record.error = status, error
        record.duration_s = time.perf_counter() - self.start
        record.completion_tokens = len(self.tokens)
        record.finish_reason = self.finish_reason if status == 200 else None
        if record.ttft_s is not None and len(self.tokens) > 1:
            record.tpot_s = (record.duration_s - record.ttft_s) / (len(self.tokens) - 1)
        self.state.finished(record)

    def usage(self) -> dict[str, int]:
        n = len(self.tokens)
        return {"prompt_tokens": len(self.ids), "completion_tokens": n, "total_tokens": len(self.ids) + n}

    def chunk(self, piece: str | None, finish: str | None = None, first: bool = False) -> dict[str, Any]:
        if self.body.chat:
            delta = {"role": "assistant", "content": ""} if first else {} if piece is None else {"content": piece}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
            kind = "text_completion"
        return self._envelope(kind, choice)

    def _envelope(self, kind: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.state.model_name,
            "choices": [choice],
        }

    def whole(self) -> dict[str, Any]:
        if self.body.chat:
            message = {"role": "assistant", "content": self.text}
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": self.finish_reason}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": self.text, "finish_reason": self.finish_reason, "logprobs": None}
            kind = "text_completion"
        return {**self._envelope(kind, choice), "usage": self.usage()}


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The request's body, refused (413) once it is larger than `limit` bytes, before it is read whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(
            f"the body is {int(declared):,} bytes; this server takes at most {limit:,} (--max-body-bytes)", status=413
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(
                f"the body is over {limit:,} bytes, the most this server takes (--max-body-bytes)", status=413
            )
        chunks.append(chunk)
    return b"".join(chunks)


def too_long(body: Body, served: Served, limits: Limits) -> None:
    """Refuse a prompt that cannot fit before tokenizing it: a token covers at most `token_chars` characters, so
    a text longer than that many per allowed token is too long whatever it says."""
    max_prompt = limits.max_prompt_tokens or served.context - 1
    chars = sum(len(m["content"]) for m in body.messages) if body.chat else len(body.prompt)
    if chars > max_prompt * served.token_chars:
        param = "messages" if body.chat else "prompt"
        raise BadRequest(
            f"the prompt is {chars:,} characters, more than {max_prompt} tokens can hold; this server "
            f"takes at most {max_prompt} tokens",
            param,
        )


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def build_app(state: ServerState) -> Starlette:
    """The routes of the OpenAI-compatible API, each handler given the server's state."""

    def bound(
        handler: Callable[..., Awaitable[Response]], **options: Any
    ) -> Callable[[HttpRequest], Awaitable[Response]]:
        async def route(request: HttpRequest) -> Response:
            return await handler(state, request, **options)

        return route

    routes = [
        Route("/v1/chat/completions", bound(_completions, chat=True), methods=["POST"]),
        Route("/v1/completions", bound(_completions, chat=False), methods=["POST"]),
        Route("/v1/models", bound(_models), methods=["GET"]),
        Route("/health", bound(_health), methods=["GET"]),
        Route("/metrics", bound(_metrics), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: _not_found})


def _authorized(state: ServerState, request: HttpRequest) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode(), state.api_key.encode()):
        raise BadRequest(
            "missing or wrong API key (send Authorization: Bearer KEY)", status=401, code="invalid_api_key"
        )


async def _admit(state: ServerState, request: HttpRequest, chat: bool) -> Generation:
    _authorized(state, request)
    served = state.ready()
    try:
        payload = json.loads(await read_body(request, state.limits.max_body_bytes))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the body is JSON nested too deeply to read") from None
    body = parse_body(payload, chat)
    if body.model != state.model_name:
        raise BadRequest(
            f"model '{body.model}' is not served here; this server serves '{state.model_name}'",
            "model",
            code="model_not_found",
        )
    too_long(body, served, state.limits)
    # Tokenizing takes time in proportion to the prompt: on a thread, so other clients are still answered.
    endpoint = "chat" if chat else "completions"
    generation = await asyncio.get_running_loop().run_in_executor(
        state.tokenizing, Generation, state, served, body, endpoint
    )
    assert state.slots is not None
    if state.slots.locked() and state.waiting >= state.limits.max_queue:
        raise BadRequest(
            f"the server is full ({state.limits.max_batch} generating, {state.waiting} waiting); retry later",
            status=429,
            code="queue_full",
        )
    return generation


async def _completions(state: ServerState, request: HttpRequest, chat: bool) -> Response:
    endpoint = "chat" if chat else "completions"
    start = time.perf_counter()
    try:
        generation = await _admit(state, request, chat)
    except BadRequest as error:
        state.finished(
            Record(
                time.time(), "-", endpoint, error.status, duration_s=time.perf_counter() - start, error=error.message
            )
        )
        return error_response(error)
    except ClientDisconnect:  # gone before its request was read: nobody to answer
        state.finished(
            Record(time.time(), "-", endpoint, 499, duration_s=time.perf_counter() - start, error="client disconnected")
        )
        return Response(status_code=499)
    if generation.body.stream:
        return StreamingResponse(
            _stream(state, generation), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    return await _whole(state, request, generation)


async def _whole(state: ServerState, request: HttpRequest, generation: Generation) -> Response:
    async def collect() -> None:
        async for _ in generation.run():
            pass

    task = asyncio.create_task(collect())
    while not task.done():
        await asyncio.wait([task], timeout=0.5)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            generation.finish(499, "client disconnected")
            return Response(status_code=499)
    try:
        task.result()
    except (TimeoutError, RuntimeError) as exc:
        error = generation_error(exc, state.limits)
        generation.finish(error.status, error.message)
        return error_response(error)
    generation.finish(200)
    return JSONResponse(generation.whole())


async def _stream(state: ServerState, generation: Generation) -> AsyncIterator[bytes]:
    status: int = 499
    error: str | None = "client disconnected"
    try:
        yield sse(generation.chunk(None, first=True))
        try:
            async for piece in generation.run():
                yield sse(generation.chunk(piece))
        except (TimeoutError, RuntimeError) as exc:
            failure = generation_error(exc, state.limits)
            status, error = failure.status, failure.message
            yield sse(failure.body())
            return
        yield sse(generation.chunk(None, finish=generation.finish_reason))
        if generation.body.include_usage:
            yield sse({**generation.chunk(None), "choices": [], "usage": generation.usage()})
        yield sse("[DONE]")
        status, error = 200, None
    finally:
        generation.finish(status, error)


async def _models(state: ServerState, request: HttpRequest) -> Response:
    try:
        _authorized(state, request)
    except BadRequest as error:
        return error_response(error)
    model = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "llmkit"}
    if state.served is not None:
        model["max_model_len"] = state.served.context
    return JSONResponse({"object": "list", "data": [model]})


async def _health(state: ServerState, request: HttpRequest) -> Response:
    served = state.served
    status = "draining" if state.draining else "ok" if served is not None else "loading"
    if status == "ok" and served is not None and not served.engine.alive():
        status = "failed"  # the engine stopped and could not start again: restart the server
    answer: dict[str, Any] = {"status": status}
    if served is not None and served.engine.restarts:
        answer["engine_restarts"] = served.engine.restarts
    return JSONResponse(answer, status_code=200 if status == "ok" else 503)


async def _metrics(state: ServerState, request: HttpRequest) -> Response:
    return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def _not_found(request: HttpRequest, exc: Exception) -> Response:
    return error_response(BadRequest(f"no route {request.url.path}", status=404))
