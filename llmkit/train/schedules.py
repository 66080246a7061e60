"""Learning-rate schedules: a pure function of the step, so resuming needs only the step."""

from __future__ import annotations

import math

from llmkit.config import ScheduleConfig


def lr_at(step: int, total_steps: int, peak: float, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay to min_lr_ratio * peak."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return peak
    if cfg.name == "wsd":  # stable at the peak, then 1 - sqrt decay over the last decay_fraction of the steps
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = max(cfg.warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return peak * cfg.min_lr_ratio + peak * (1 - cfg.min_lr_ratio) * (1 - math.sqrt(progress))
    decay_steps = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = peak * cfg.min_lr_ratio
    if cfg.name == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "linear":
        return peak + (floor - peak) * progress
    # exponential: geometric from peak to floor (a floor of 0 decays to 1e-3 of the peak)
    ratio = max(cfg.min_lr_ratio, 1e-3)
    return peak * ratio**progress
