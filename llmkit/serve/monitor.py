"""`llmkit monitor`: latency percentiles, error rate, throughput and prompt drift from a server's request log, or
from its /metrics, with gates like `llmkit eval` so it runs from cron or CI.

From the request log (exact): every request's own timings. From /metrics (one scrape): counts since the server
started, and percentiles estimated from the histogram buckets as Prometheus' histogram_quantile does.

Drift: the perplexity of the logged prompts (`llmkit serve --log-prompts`) under the served model, divided by the
model's validation perplexity (its run's summary.json). Near 1, the traffic reads like the data the model was
trained on; well above 1, it does not, and answers deserve a look.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.data.task_files import parse_gate
from llmkit.errors import UserError, parse_duration, shorten
from llmkit.eval.gates import check_gates, checks_as_dicts
from llmkit.serve.metrics import (
    DURATION,
    GENERATION_TOKENS,
    IN_FLIGHT,
    LOADED,
    QUEUE_DEPTH,
    QUEUE_TIME,
    REQUESTS,
    TPOT,
    TTFT,
)

QUANTILES = (50, 95, 99)
TIMINGS = {"latency": "duration_s", "ttft": "ttft_s", "tpot": "tpot_s", "queue": "queue_s"}


def read_log(path: Path, since: str | None = None) -> list[dict[str, Any]]:
    """The request log's records (the last `since`, e.g. 1h, when given); a damaged line is one clear error."""
    if not path.is_file():
        raise UserError(f"{path}: request log not found (llmkit serve --request-log writes it)")
    cutoff = time.time() - parse_duration(since, "--since") if since else -math.inf
    records = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = _record(raw)
            except ValueError as exc:  # undecodable bytes, JSON or fields of the wrong kind
                raise UserError(f"{path}:{number}: not a request-log line ({shorten(str(exc), 200)})") from None
            if record["time"] >= cutoff:
                records.append(record)
    if not records:
        raise UserError(f"{path}: no requests{' in the last ' + since if since else ''} to report on")
    return records


FIELDS = {"time": float, "status": int, "duration_s": float}  # what every line has; the rest as llmkit writes it
OPTIONAL = {"queue_s": float, "ttft_s": float, "tpot_s": float, "prompt_tokens": int, "completion_tokens": int}


def _record(raw: bytes) -> dict[str, Any]:
    """One request-log line, its fields of the kinds `summarize` computes with (ValueError otherwise)."""
    record = json.loads(raw.decode("utf-8"))
    if not isinstance(record, dict) or not set(FIELDS) <= set(record):
        raise ValueError("not a request record: it needs time, status and duration_s")
    for key, kind in {**FIELDS, **OPTIONAL}.items():
        value = record.get(key)
        if value is None and key in OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
            raise ValueError(f"'{key}' is {shorten(repr(value), 40)}, not a number")
        if not math.isfinite(value):
            raise ValueError(f"'{key}' is {value}")
    return record


def summarize(records: list[dict[str, Any]]) -> dict[str, float]:
    """Counts, rates, throughput over the log's span, and p50/p95/p99 of each timing over answered requests."""
    statuses = [int(r["status"]) for r in records]
    errors = sum(s >= 400 and s != 499 for s in statuses)
    answered = [r for r in records if r["status"] == 200]
    start = min(r["time"] for r in records)
    end = max(r["time"] + r["duration_s"] for r in records)
    span = max(end - start, 1e-9)
    metrics: dict[str, float] = {
        "requests": len(records),
        "answered": len(answered),
        "errors": errors,
        "error_rate": errors / len(records),
        "cancelled": statuses.count(499),
        "rejected_full": statuses.count(429),
        "span_s": span,
        "requests_per_s": len(records) / span,
        "output_tokens_per_s": sum(r.get("completion_tokens", 0) for r in answered) / span,
        "prompt_tokens_per_s": sum(r.get("prompt_tokens", 0) for r in answered) / span,
    }
    for name, key in TIMINGS.items():
        values = [r[key] for r in answered if r.get(key) is not None]
        if values:
            for q, value in zip(QUANTILES, np.percentile(values, QUANTILES), strict=True):
                metrics[f"p{q}_{name}_s"] = float(value)
    return metrics


def scrape(url: str) -> dict[str, float]:
    """The same figures from one scrape of /metrics: counts since the server started, estimated percentiles."""
    samples = _read_samples(url)
    by_status: dict[int, float] = {}
    for sample in samples.get(REQUESTS.sample, []):
        status = int(sample.labels["status"])
        by_status[status] = by_status.get(status, 0) + sample.value
    requests = sum(by_status.values())
    errors = sum(v for s, v in by_status.items() if s >= 400 and s != 499)
    started = samples["process_start_time_seconds"][0].value if "process_start_time_seconds" in samples else None
    uptime = max(time.time() - started, 1e-9) if started else None
    generated = sum(sample.value for sample in samples.get(GENERATION_TOKENS.sample, []))
    metrics: dict[str, float] = {
        "requests": requests,
        "errors": errors,
        "error_rate": errors / requests if requests else 0.0,
        "cancelled": by_status.get(499, 0),
        "rejected_full": by_status.get(429, 0),
        "queue_depth": samples[QUEUE_DEPTH.sample][0].value,
        "in_flight": samples[IN_FLIGHT.sample][0].value,
    }
    if "process_resident_memory_bytes" in samples:
        metrics["resident_memory_gib"] = samples["process_resident_memory_bytes"][0].value / 2**30
    if uptime:
        metrics["uptime_s"] = uptime
        metrics["output_tokens_per_s"] = generated / uptime
    histograms = {"latency": DURATION, "ttft": TTFT, "tpot": TPOT, "queue": QUEUE_TIME}
    for name, family in histograms.items():
        buckets: dict[float, float] = {}
        for sample in samples.get(family.sample, []):
            bound = float(sample.labels["le"])
            buckets[bound] = buckets.get(bound, 0) + sample.value  # summed over endpoints
        quantiles = {q: bucket_quantile(q / 100, sorted(buckets.items())) for q in QUANTILES}
        metrics.update({f"p{q}_{name}_s": value for q, value in quantiles.items() if value is not None})
    return metrics


def _read_samples(url: str) -> dict[str, list[Any]]:
    """The samples of one scrape by name; one line when the URL cannot be read or is not llmkit's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read(16 * 2**20)
    except (OSError, ValueError) as exc:  # ValueError: not a URL urllib can open
        raise UserError(
            f"{url}: cannot read the metrics ({shorten(str(exc), 200)}); is `llmkit serve` running there?"
        ) from None
    samples: dict[str, list[Any]] = {}
    try:
        for metric_family in text_string_to_metric_families(body.decode("utf-8")):
            for sample in metric_family.samples:
                samples.setdefault(sample.name, []).append(sample)
    except ValueError:  # undecodable bytes or text that is not Prometheus' format (an HTML page, ...)
        samples = {}
    if REQUESTS.sample not in samples and LOADED.sample not in samples:
        raise UserError(f"{url}: not the /metrics of `llmkit serve`")
    return samples


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear inside the bucket that holds the rank (cumulative counts)."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its upper bound is all that is known
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 0.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def drift(records: list[dict[str, Any]], model: str | Path, limit: int) -> dict[str, float]:
    """Perplexity of the logged prompts under `model`, and its ratio to the model's validation perplexity."""
    import torch

    from llmkit.generate import load_generator
    from llmkit.runs import resolve_model_dir

    logged = [(number, r["prompt"]) for number, r in enumerate(records, 1) if r.get("prompt") is not None]
    for number, prompt in logged:  # a string, or chat messages as serve logs them
        chat = isinstance(prompt, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
        )
        if not (isinstance(prompt, str) or chat):
            shown = shorten(repr(prompt), 80)
            raise UserError(
                f"--model: request {number} of the log has a prompt that is neither text nor chat "
                f"messages ({shown}); was the log written by `llmkit serve`?"
            )
    prompts = [prompt for _, prompt in logged][-limit:]
    if not prompts:
        raise UserError("--model: the log holds no prompts; run `llmkit serve --log-prompts` to measure drift")
    reference = validation_perplexity(resolve_model_dir(model))
    generator = load_generator(model)
    context = generator.context or 4096
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for prompt in prompts:
            ids = generator.chat_ids(prompt) if isinstance(prompt, list) else generator.prompt_ids(prompt, raw=True)
            ids = ids[:context]
            if len(ids) < 2:
                continue
            batch = torch.tensor([ids])
            logits = generator.model(batch).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, batch[0, 1:], reduction="sum"))
            tokens += len(ids) - 1
    if not tokens:
        raise UserError("--model: the logged prompts are too short to score (need two tokens)")
    perplexity = math.exp(nll / tokens)
    return {
        "prompts_scored": len(prompts),
        "prompt_perplexity": perplexity,
        "val_perplexity": reference,
        "ppl_drift": perplexity / reference,
    }


def validation_perplexity(model_dir: Path) -> float:
    from llmkit.runs import run_summaries

    for summary in run_summaries(model_dir):
        if summary.is_file():
            loss = json.loads(summary.read_text(encoding="utf-8")).get("val_loss")
            if isinstance(loss, (int, float)) and math.isfinite(loss):
                return math.exp(loss)
    raise UserError(
        f"{model_dir}: no validation loss in the run's summary.json to compare prompts with; "
        "give the run directory the model came from"
    )


MAX_PROMPTS = 1000  # the newest logged prompts drift scores by default


def monitor(
    source: str, since: str | None, model: str | None, gates: list[str], max_prompts: int | None = None
) -> dict[str, Any]:
    """The monitor's report: metrics, gates and verdict, in the shape `llmkit eval` reports have."""
    if max_prompts is not None and max_prompts < 1:  # 0 used to score every prompt, and -1 all but one
        raise UserError(f"--max-prompts {max_prompts}: must be at least 1 (the newest prompts scored for drift)")
    if max_prompts is not None and not model:
        raise UserError(f"--max-prompts {max_prompts}: the prompts scored for drift, which needs --model")
    for gate in gates:  # a typo fails before the log is read and its prompts scored
        parse_gate(gate, example="p99_latency_s<=2")
    if source.startswith(("http://", "https://")):
        if since or model:
            raise UserError("--since and --model read the request log; give its path instead of a /metrics URL")
        metrics = scrape(source)
    else:
        records = read_log(Path(source), since)
        metrics = summarize(records)
        if model:
            metrics.update(drift(records, model, max_prompts or MAX_PROMPTS))
    checks = checks_as_dicts(check_gates(gates, metrics))
    passed = all(check["passed"] for check in checks)
    return {
        "title": "llmkit monitor",
        "model": str(model or source),
        "source": source,
        "since": since,
        "metrics": metrics,
        "gates": checks,
        "regressions": [],
        "passed": passed,
    }
