"""Evaluation task files: the YAML that names tasks, and their items (read here so data-prep can decontaminate).

A task file (YAML) holds one task, or a list under `tasks:` (each inline or `include: other.yaml`), and
optionally `gates:` (see llmkit.eval.gates). Items come from a JSONL/CSV/parquet file (`data:`, relative to
the task file) or inline (`items:`). docs/eval.md documents every field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmkit.config import read_yaml, yaml_path
from llmkit.data.readers import read_records, resolve_sources
from llmkit.errors import UserError

TaskKind = Literal["multiple_choice", "generation", "perplexity", "classification"]
GATE = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(>=|<=|==|>|<)\s*([-+0-9.eE]+)\s*$")


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Metric prefix: NAME.acc, NAME.exact_match, ...")
    kind: TaskKind
    data: str | None = Field(None, description="Items file (jsonl/csv/parquet), relative to the task file.")
    items: list[dict[str, Any]] | None = Field(None, description="Items inline, instead of `data`.")
    prompt: str = Field("{question}", description="Python format string over the item's fields.")
    chat: bool = Field(False, description="Wrap the prompt in the model's chat template (a user turn).")
    choices_field: str = "choices"
    answer_field: str = Field("answer", description="multiple_choice: index of the right choice; generation: text.")
    target_delimiter: str = Field(" ", description="multiple_choice: put between the prompt and each choice.")
    match: Literal["exact", "contains", "regex", "numeric"] = Field(
        "exact", description="generation: how the answer is checked (numeric: the first number, within `tolerance`)."
    )
    tolerance: float = Field(0.0, ge=0, description="generation, match numeric: the absolute difference allowed.")
    max_new_tokens: int = Field(32, ge=1)
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="generation: cut the output at these.")
    text_field: str = Field("text", description="perplexity and classification: the text column.")
    limit: int | None = Field(None, ge=1, description="Score only the first N items.")
    source: str = Field("", exclude=True)
    base: str = Field(".", exclude=True)


def parse_gate(gate: str, where: str = "", example: str = "colors.acc>=0.8") -> tuple[str, str, str, float]:
    """A gate `METRIC OP VALUE` as (metric, op, the limit as written, the limit). Read where it enters (a --gate,
    a task file's `gates:`), so a typo fails in a second rather than after an hour of scoring; `where` names it."""
    where = where or f"--gate {gate!r}"
    match = GATE.match(gate)
    if not match:
        raise UserError(f"{where}: expected METRIC OP VALUE, e.g. '{example}' (OP: >= <= > < ==)")
    metric, op, text = match.groups()
    try:
        return metric, op, text, float(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a number") from None


def load_task_files(paths: list[Path]) -> tuple[list[TaskSpec], list[str]]:
    """Tasks and gates from task files (a file may include others)."""
    tasks: list[TaskSpec] = []
    gates: list[str] = []
    for path in paths:
        _load(Path(path), tasks, gates, seen=set())
    names = [task.name for task in tasks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"{paths[0]}: task names must be unique; repeated: {', '.join(duplicates)}")
    return tasks, gates


def _load(path: Path, tasks: list[TaskSpec], gates: list[str], seen: set[Path]) -> None:
    path = yaml_path(path)  # a bundled task file by name: its includes and data are beside it
    if path.resolve() in seen:
        raise UserError(f"{path}: includes itself")
    seen = seen | {path.resolve()}
    raw = read_yaml(path)
    entries = raw.pop("tasks", None)
    listed = raw.pop("gates", None) or []
    for gate in [listed] if isinstance(listed, str) else listed if isinstance(listed, list) else [listed]:
        parse_gate(str(gate), f"{path}: gates: {gate!r}")
        gates.append(str(gate))
    if entries is None:
        entries = [raw] if raw else []
    elif raw:
        raise UserError(f"{path}: unknown key(s) {', '.join(sorted(raw))} beside 'tasks' (allowed: tasks, gates)")
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and set(entry) == {"include"}:
            _load(path.parent / str(entry["include"]), tasks, gates, seen)
            continue
        try:
            tasks.append(TaskSpec.model_validate({**entry, "source": str(path), "base": str(path.parent)}))
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(part) for part in error["loc"]) or "task"
            where = f"{path}: task {index + 1}" if len(entries) > 1 else str(path)
            raise UserError(f"{where}: {key}: {error['msg']}") from None
        except TypeError:
            raise UserError(f"{path}: task {index + 1} must be a mapping") from None


def task_items(task: TaskSpec) -> list[dict[str, Any]]:
    if (task.data is None) == (task.items is None):
        raise UserError(f"{task.source}: task {task.name}: give exactly one of 'data' or 'items'")
    if task.items is not None:
        items = [dict(item) for item in task.items]
    else:
        path = Path(task.base) / str(task.data)
        if not path.is_file():
            raise UserError(f"{path}: task {task.name}: data file not found")
        items = [dict(record) for source in resolve_sources([str(path)]) for record, _ in read_records(source)]
    if not items:
        raise UserError(f"{task.source}: task {task.name}: no items")
    return items[: task.limit] if task.limit else items


def harness_task_names(specs: list[str]) -> tuple[list[str], list[str]]:
    """lm-evaluation-harness task names, and the folders of task YAML files given by path (for its TaskManager)."""
    names, include = [], []
    for spec in specs:
        path = Path(spec)
        if path.suffix not in (".yaml", ".yml"):
            names.append(spec)
            continue
        if not path.is_file():
            raise UserError(f"{path}: harness task file not found")
        include.append(str(path.parent.resolve()))
        name = read_yaml(path).get("task")
        if not isinstance(name, str):
            raise UserError(f"{path}: a harness task file needs a 'task' name")
        names.append(name)
    return names, include


def render_prompt(task: TaskSpec, item: dict[str, Any], where: str, tokenizer: Any) -> str:
    """An item's prompt: the task's format string over its fields, as a user turn of the chat template when
    `chat` is set."""
    try:
        prompt = task.prompt.format(**item)
    except KeyError as exc:
        raise UserError(f"{where}: prompt needs field {exc} (fields: {', '.join(sorted(item))})") from None
    if not task.chat:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{task.source}: task {task.name}: chat: true but the model's tokenizer has no template")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return str(rendered)
