"""Metrics sinks: metrics.jsonl always, TensorBoard when asked, a loss-curve PNG at the end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from llmkit.config import LoggingConfig
from llmkit.errors import UserError
from llmkit.train.trackers import finish_trackers, flat_config, open_trackers


class MetricsLog:
    """Appends one JSON object per event to RUN/metrics.jsonl and mirrors scalars to TensorBoard and the trackers
    in `logging.report_to` (llmkit.train.trackers)."""

    def __init__(
        self,
        run_dir: Path,
        logging: LoggingConfig,
        config: dict[str, Any],
        enabled: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer: Any = None
        self.trackers: list[Any] = []
        self.last_step = resume_step or 0
        if not enabled:
            return
        if resume_step is not None:
            truncate_records(self.path, resume_step)  # records after the checkpoint are logged again
        if "tensorboard" in logging.report_to:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            folder = run_dir / "tensorboard"
            if folder.exists() and not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
                # TensorBoard writes on a thread of its own, where a failure is a traceback and nothing logged
                raise UserError(
                    f"{folder}: cannot write TensorBoard events there; make it writable, or log "
                    "without it (logging.report_to=[])"
                )
            self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge)
        self.trackers = open_trackers(
            logging.report_to, run_dir, logging.project, flat_config(config), resume=resume_step is not None
        )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        step = int(record["step"])
        self.last_step = max(self.last_step, step)
        scalars = {
            key.replace("_", "/", 1) if key.startswith("val_") else f"train/{key}": value
            for key, value in record.items()
            if key != "step" and isinstance(value, int | float) and math.isfinite(value)
        }
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Close every sink; the run's summary (its numbers) goes to the trackers as summary/* at the last step."""
        if self.writer is not None:
            self.writer.close()
        numbers = {
            f"summary/{key}": value
            for key, value in (summary or {}).items()
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        }
        for tracker in self.trackers:
            if numbers:
                tracker.log(numbers, step=self.last_step)
        finish_trackers(self.trackers)
        self.trackers = []


def truncate_records(path: Path, last_step: int) -> None:
    """Keep only the JSONL records of steps up to `last_step` (a resumed run logs the rest again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line)["step"] <= last_step]
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    staging.replace(path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out: Path) -> Path | None:
    """Training and validation loss against tokens seen; returns the PNG path, or None without data."""
    records = read_metrics(metrics_path)
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
