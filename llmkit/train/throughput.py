"""What the loop reports about speed: the logging window, tokens/s (recent and steady), MFU and peak memory."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class LogWindow:
    """Training metrics over the steps since the last log line. Checkpoints save it, so the first line after a
    resume averages the same steps as the uninterrupted run's."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float | None, tokens: int) -> None:
        """One optimizer step: its loss (None for a skipped step) and its tokens."""
        if loss is not None:
            self.loss += loss
            self.steps += 1
        self.tokens += tokens

    def state_dict(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "steps": self.steps,
            "tokens": self.tokens,
            "seconds": time.perf_counter() - self.start,
        }

    @classmethod
    def restored(cls, state: dict[str, float]) -> LogWindow:
        seconds = float(state.get("seconds", 0.0))
        return cls(
            float(state.get("loss", 0.0)),
            int(state.get("steps", 0)),
            int(state.get("tokens", 0)),
            time.perf_counter() - seconds,
        )


@dataclass
class Throughput:
    """Tokens/s as they should be read. The progress bar shows the recent steps; the summary the steady state:
    this invocation's training steps after the first `warmup` (compilation, allocator and cache warm-up), timed
    without validation and checkpoints. A run too short to have a steady state reports none. Time is taken in
    windows that end where the host reads the device (every step, or every logging step when the step runs
    without synchronization), so a window's time is the device's."""

    warmup: int = 5
    recent: deque[tuple[int, float, int]] = field(default_factory=lambda: deque(maxlen=20))
    steps: int = 0
    steady_tokens: int = 0
    steady_seconds: float = 0.0
    steady_from: int | None = None  # the first steady step, counted from this invocation's first

    def add(self, tokens: int, seconds: float, steps: int = 1) -> None:
        self.recent.append((tokens, seconds, steps))
        if self.steps >= self.warmup:
            self.steady_tokens += tokens
            self.steady_seconds += seconds
            self.steady_from = self.steady_from or self.steps + 1
        self.steps += steps

    @property
    def recent_rate(self) -> float:
        """Over the newest windows that hold at most 20 steps (at least the newest window)."""
        tokens = seconds = steps = 0.0
        for window_tokens, window_seconds, window_steps in reversed(self.recent):
            if steps and steps + window_steps > 20:
                break
            tokens, seconds, steps = tokens + window_tokens, seconds + window_seconds, steps + window_steps
        return tokens / seconds if seconds else 0.0

    @property
    def steady_rate(self) -> float | None:
        return self.steady_tokens / self.steady_seconds if self.steady_seconds else None


def peak_memory(device: torch.device) -> dict[str, float]:
    """The process's peak memory in GiB: CUDA's allocated and reserved on a GPU, and the resident set on the host."""
    import resource

    memory = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss is in KiB
    if device.type == "cuda":
        memory["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        memory["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return memory


def mfu(tokens_per_s: float, flops_per_token: float, peak_per_device: float, devices: int) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the peak of all devices together."""
    return tokens_per_s * flops_per_token / (peak_per_device * devices)


def peak_flops(acc: Accelerator) -> float | None:
    from llmkit.flops import device_peak_flops

    if acc.device.type != "cuda":
        return None
    return device_peak_flops(torch.cuda.get_device_name(acc.device))
