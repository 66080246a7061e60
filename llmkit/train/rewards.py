"""GRPO's scorers (`finetune.grpo.rewards`): what an answer earned, from a program the user already trusts.

Each reward is SPEC or SPEC@WEIGHT; an answer's reward is the weighted sum of its scorers' rewards.

* a task file (`tasks.yaml`): its first generation task checks the answer against the row's answer field exactly
  as `llmkit eval --tasks` does (exact, contains, regex or numeric within a tolerance): 1.0 or 0.0. The same file
  gates the trained model in CI. Rows without `prompt`/`messages` are rendered by the task's prompt template.
* a reward model directory (`llmkit finetune --task reward`): its score of the prompt and answer.
* `module:function` (importable from the working directory): `function(prompt, answer, row) -> float`, where
  `prompt` is the text the model saw, `answer` the sampled answer (cut at the first stop string) and `row` the
  training row as read. An exception or a value that is not a finite number is one line naming the row.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.data.task_files import TaskSpec, load_task_files
from llmkit.errors import UserError
from llmkit.scoring import answer_score, is_reward_dir


@dataclass
class Scorer:
    """One reward: its name in the metrics, its weight, and how it scores a group of answers."""

    name: str
    weight: float
    score: Callable[[list[str], list[str], list[dict[str, Any]], list[str]], list[float]]
    task: TaskSpec | None = None  # a task file's generation task (its prompt template and stop strings)


def load_rewards(specs: list[str]) -> list[Scorer]:
    """The scorers of `finetune.grpo.rewards`, checked before any output is written."""
    if not specs:
        raise UserError("--task grpo needs a reward: pass --reward TASKS.yaml, a reward model, or module:function")
    scorers = []
    for spec in specs:
        source, weight = spec, 1.0
        if "@" in spec:
            source, _, given = spec.rpartition("@")
            weight = float(given)
        scorers.append(_scorer(source, weight))
    names = [scorer.name for scorer in scorers]
    if len(set(names)) < len(names):
        raise UserError(f"finetune.grpo.rewards names one scorer twice ({', '.join(names)}); give each once")
    return scorers


def _scorer(source: str, weight: float) -> Scorer:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return _task_file(path, weight)
    if path.is_dir():
        if not is_reward_dir(path):
            raise UserError(f"{source}: not a reward model (train one with llmkit finetune --task reward)")
        return _reward_model(path, weight)
    if ":" in source:
        return _function(source, weight)
    raise UserError(f"reward {source}: not a task file, a reward model directory or module:function")


def _task_file(path: Path, weight: float) -> Scorer:
    tasks, _ = load_task_files([path])
    task = next((task for task in tasks if task.kind == "generation"), None)
    if task is None:
        raise UserError(f"{path}: a reward needs a generation task (kind: generation) in the file")

    def score(prompts: list[str], answers: list[str], rows: list[dict[str, Any]], wheres: list[str]) -> list[float]:
        scores = []
        for answer, row, where in zip(answers, rows, wheres, strict=True):
            if task.answer_field not in row:
                raise UserError(f"{where}: no '{task.answer_field}' field for the reward of {path} (task {task.name})")
            scores.append(answer_score(answer, str(row[task.answer_field]), task, where))
        return scores

    return Scorer(task.name, weight, score, task)


def _reward_model(path: Path, weight: float) -> Scorer:
    import torch

    from llmkit.data.templates import Encoded
    from llmkit.data.tokenizer import load_tokenizer
    from llmkit.runs import find_tokenizer_dir
    from llmkit.scoring import load_reward_model, rewards_of

    model = load_reward_model(path).to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(find_tokenizer_dir(path))
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    def score(prompts: list[str], answers: list[str], rows: list[dict[str, Any]], wheres: list[str]) -> list[float]:
        import numpy as np

        sequences = []
        for prompt, answer in zip(prompts, answers, strict=True):
            ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"] + [int(tokenizer.eos_token_id)]
            sequences.append(Encoded(np.asarray(ids, dtype=np.int64), np.asarray(ids, dtype=np.int64), False))
        return [float(value) for value in rewards_of(model, sequences, pad, batch_size=16)]

    return Scorer(path.name, weight, score)


def _function(source: str, weight: float) -> Scorer:
    module_name, _, function_name = source.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the user's module, beside their data
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"reward {source}: cannot import it ({exc}); the module must be importable from here") from None
    if not callable(function):
        raise UserError(f"reward {source}: not a function")

    def score(prompts: list[str], answers: list[str], rows: list[dict[str, Any]], wheres: list[str]) -> list[float]:
        scores = []
        for prompt, answer, row, where in zip(prompts, answers, rows, wheres, strict=True):
            try:
                value = float(function(prompt, answer, row))
            except Exception as exc:  # the user's code: its failure is named with the row, not a traceback
                raise UserError(f"{where}: reward {source} failed: {type(exc).__name__}: {exc}") from None
            if not math.isfinite(value):
                raise UserError(f"{where}: reward {source} returned {value}; rewards must be finite numbers")
            scores.append(value)
        return scores

    return Scorer(function_name, weight, score)
