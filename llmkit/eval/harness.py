"""`llmkit eval --harness TASKS`: lm-evaluation-harness tasks on the same model, folded into llmkit's report.

TASKS is comma-separated: harness task names (their data comes from the Hugging Face Hub or its cache) or
paths to harness task YAML files (local data). Missing pieces are named: the harness not installed, a task
it does not know, or task data it cannot reach.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from llmkit.errors import UserError, first_line


def run_harness(model_dir: Path, specs: list[str], batch_size: int, limit: int | None = None) -> dict[str, Any]:
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("--harness needs lm-evaluation-harness, which is not installed: pip install 'llmkit[eval]'")
    from llmkit.hub import prepare_hub_access

    prepare_hub_access("harness-task-data")  # offline without saying so: use the cache at once, no minute of retries
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llmkit.data.task_files import harness_task_names

    names, include = harness_task_names(specs)
    manager = TaskManager(include_path=include or None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise UserError(f"--harness: lm-evaluation-harness has no task {', '.join(unknown)} (see `lm_eval ls tasks`)")
    model = HFLM(
        pretrained=str(model_dir), batch_size=batch_size, device="cuda" if torch.cuda.is_available() else "cpu"
    )
    try:
        output = simple_evaluate(model=model, tasks=names, limit=limit, task_manager=manager, log_samples=False)
    except (ConnectionError, OSError, FileNotFoundError) as exc:
        first = first_line(exc)
        raise UserError(
            f"--harness {','.join(names)}: the task data could not be loaded ({first}); harness tasks read their "
            "data from the Hugging Face Hub: run once online (the cache is reused) or use a local task file"
        ) from None
    results: dict[str, Any] = {}
    for task, metrics in (output or {}).get("results", {}).items():
        kept = {}
        for key, value in metrics.items():
            metric = key.partition(",")[0]
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and "stderr" not in metric and metric != "sample_len" and math.isfinite(value):
                kept[metric] = float(value)
        results[task] = kept
    return results
