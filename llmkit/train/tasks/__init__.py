"""Fine-tuning tasks, by name (`llmkit finetune --task NAME`). A new task is a module with a `Task` subclass
(see llmkit.train.tasks.base), one row here and its name and one-line description in config.FINETUNE_TASKS."""

from __future__ import annotations

from llmkit.errors import UserError
from llmkit.train.tasks.base import Preparation, Task, TaskData
from llmkit.train.tasks.classify import Classify
from llmkit.train.tasks.distill import Distill
from llmkit.train.tasks.grpo import GRPO
from llmkit.train.tasks.preference import PreferenceTask
from llmkit.train.tasks.reward import Reward
from llmkit.train.tasks.sft import SFT

__all__ = ["TASKS", "Preparation", "Task", "TaskData", "get_task"]

TASKS: dict[str, Task] = {
    "sft": SFT(),
    "classify": Classify(),
    "dpo": PreferenceTask("dpo"),
    "orpo": PreferenceTask("orpo"),
    "simpo": PreferenceTask("simpo"),
    "kto": PreferenceTask("kto"),
    "reward": Reward(),
    "grpo": GRPO(),
    "distill": Distill(),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]
