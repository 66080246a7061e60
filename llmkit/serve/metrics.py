"""What `llmkit serve` exposes to Prometheus on /metrics and writes to its JSONL request log."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import UserError

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


@dataclass(frozen=True)
class Family:
    """One Prometheus metric family of `llmkit serve`: how the server defines it and the monitor reads it."""

    name: str
    kind: str  # counter, gauge or histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def sample(self) -> str:
        """The name its samples carry in the exposition (counters end in _total, histogram buckets in _bucket)."""
        return {"counter": f"{self.name}_total", "histogram": f"{self.name}_bucket"}.get(self.kind, self.name)


REQUESTS = Family(
    "llmkit_requests",
    "counter",
    "Requests by endpoint and HTTP status (499: client went away).",
    ("endpoint", "status"),
)
DURATION = Family(
    "llmkit_request_duration_seconds",
    "histogram",
    "Time from arrival to the last byte.",
    ("endpoint",),
    LATENCY_BUCKETS,
)
QUEUE_TIME = Family(
    "llmkit_queue_time_seconds", "histogram", "Time waiting for a generation slot.", (), LATENCY_BUCKETS
)
TTFT = Family(
    "llmkit_time_to_first_token_seconds", "histogram", "Time from arrival to the first new token.", (), LATENCY_BUCKETS
)
TPOT = Family(
    "llmkit_time_per_output_token_seconds", "histogram", "Mean time per new token after the first.", (), TOKEN_BUCKETS
)
PROMPT_TOKENS = Family("llmkit_prompt_tokens", "counter", "Prompt tokens read.")
GENERATION_TOKENS = Family("llmkit_generation_tokens", "counter", "Tokens generated.")
QUEUE_DEPTH = Family("llmkit_queue_depth", "gauge", "Requests waiting for a generation slot.")
IN_FLIGHT = Family("llmkit_requests_in_flight", "gauge", "Requests generating now.")
LOADED = Family("llmkit_model_loaded", "gauge", "1 once the model is loaded and serving.")
LOG_ERRORS = Family("llmkit_request_log_errors", "counter", "Request-log lines that could not be written.")
GPU_ALLOCATED = Family("llmkit_gpu_memory_allocated_bytes", "gauge", "GPU memory held by tensors.")
GPU_RESERVED = Family("llmkit_gpu_memory_reserved_bytes", "gauge", "GPU memory reserved by the allocator.")


class Metrics:
    """Prometheus metrics in their own registry (requests, latencies, tokens, queue, memory)."""

    def __init__(self) -> None:
        import torch
        from prometheus_client import CollectorRegistry, ProcessCollector

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, open fds
        self.requests = self._add(REQUESTS)
        self.duration = self._add(DURATION)
        self.queued = self._add(QUEUE_TIME)
        self.ttft = self._add(TTFT)
        self.tpot = self._add(TPOT)
        self.prompt_tokens = self._add(PROMPT_TOKENS)
        self.generation_tokens = self._add(GENERATION_TOKENS)
        self.queue_depth = self._add(QUEUE_DEPTH)
        self.in_flight = self._add(IN_FLIGHT)
        self.ready = self._add(LOADED)
        self.log_errors = self._add(LOG_ERRORS)
        if torch.cuda.is_available():
            self._add(GPU_ALLOCATED).set_function(torch.cuda.memory_allocated)
            self._add(GPU_RESERVED).set_function(torch.cuda.memory_reserved)

    def _add(self, family: Family) -> Any:
        from prometheus_client import Counter, Gauge, Histogram

        if family.kind == "histogram":
            return Histogram(family.name, family.help, family.labels, buckets=family.buckets, registry=self.registry)
        kind = Counter if family.kind == "counter" else Gauge
        return kind(family.name, family.help, family.labels, registry=self.registry)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


@dataclass
class Record:
    """One line of the request log: timings in seconds, token counts; the prompt only with --log-prompts."""

    time: float
    id: str
    endpoint: str
    status: int
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    duration_s: float = 0.0
    finish_reason: str | None = None
    error: str | None = None
    prompt: Any = None

    def observe(self, metrics: Metrics) -> None:
        metrics.requests.labels(self.endpoint, str(self.status)).inc()
        metrics.duration.labels(self.endpoint).observe(self.duration_s)
        if self.prompt_tokens and self.status == 200:
            metrics.prompt_tokens.inc(self.prompt_tokens)
        if self.completion_tokens:
            metrics.generation_tokens.inc(self.completion_tokens)
        for histogram, value in (
            (metrics.queued, self.queue_s),
            (metrics.ttft, self.ttft_s),
            (metrics.tpot, self.tpot_s),
        ):
            if value is not None:
                histogram.observe(value)


def _refuse_other_files(path: Path) -> None:
    """The log is appended to: a file already there must be a request log (its first line one), not a user's
    data that requests would be written into."""
    try:
        with path.open("rb") as file:
            first = file.readline(1 << 16)
    except OSError:
        return  # none yet, or not a file: opening it says what is wrong
    if not first.strip():
        return
    try:
        row = json.loads(first)
    except ValueError:
        row = None
    if not (isinstance(row, dict) and {"time", "endpoint", "status"} <= set(row)):
        raise UserError(
            f"--request-log {path}: holds something other than a request log (its first line is not one); "
            "give another path, or move that file"
        )


class RequestLog:
    """Appends one JSON line per finished request, each in one write, so readers never see half a line.

    A log that cannot be written (a full disk) never fails the answer: the line is dropped (a part written is cut
    off again), `write` says so, and one warning line names the problem once."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.failures = 0
        if path is not None:
            _refuse_other_files(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UserError(
                    f"--request-log {path}: cannot write there ({exc.strerror}); give a writable path, "
                    "e.g. a mounted volume the server's user owns"
                ) from None

    def write(self, record: Record) -> bool:
        """Log one request; False when the line could not be written."""
        if self.fd is None:
            return True
        row = {k: v for k, v in asdict(record).items() if v is not None}
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        with self.lock:
            end = os.lseek(self.fd, 0, os.SEEK_END)
            try:
                written = os.write(self.fd, line)
                if written == len(line):
                    return True
                raise OSError(errno.ENOSPC, "only part of the line was written")
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, end)  # no half line for the monitor to trip on
                self.failures += 1
                if self.failures == 1:
                    print(
                        f"warning: --request-log {self.path}: cannot write ({exc.strerror}); requests are still "
                        "answered and counted in /metrics (llmkit_request_log_errors), not logged",
                        file=sys.stderr,
                        flush=True,
                    )
                return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
