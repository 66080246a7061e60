"""Decontamination: find training documents that contain an evaluation item's words.

An item is contaminated into a document when they share a run of `ngrams` words (13, as GPT-3's study), compared
lower-cased on letters and digits only, so case, punctuation and line breaks do not hide a copy. Items shorter than
that but at least `min_words` long are matched whole; shorter ones (a one-word answer) would match everywhere and
are left out. Every string field of an item counts: the question, the answer, each choice, a passage.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmkit.config import DecontaminateConfig
from llmkit.errors import UserError, first_line

_WORD = re.compile(r"\w+")
ITEM_FILES = (".jsonl", ".json", ".csv", ".parquet")
HARNESS_PREFIX = "harness:"


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Contamination:
    """The word n-grams of evaluation items, each naming its item; `find` returns the item a text contains."""

    def __init__(self, items: Iterator[tuple[str, str]], cfg: DecontaminateConfig) -> None:
        self.grams: dict[int, dict[str, str]] = {}  # length -> n-gram -> item label
        self.items = 0
        for label, text in items:
            item_words = words(text)
            if len(item_words) < cfg.min_words:
                continue
            self.items += 1
            n = min(cfg.ngrams, len(item_words))
            table = self.grams.setdefault(n, {})
            for start in range(len(item_words) - n + 1):
                table.setdefault(" ".join(item_words[start : start + n]), label)

    def find(self, text: str) -> str | None:
        if not self.grams:
            return None
        text_words = words(text)
        for n, table in self.grams.items():
            for start in range(len(text_words) - n + 1):
                label = table.get(" ".join(text_words[start : start + n]))
                if label is not None:
                    return label
        return None

    def digest(self) -> str:
        """A hash of every n-gram: the dataset fingerprint changes exactly when the evaluation items do."""
        hasher = hashlib.sha256()
        for n in sorted(self.grams):
            for gram in sorted(self.grams[n]):
                hasher.update(f"{n}\t{gram}\n".encode())
        return hasher.hexdigest()


def load_contamination(cfg: DecontaminateConfig) -> Contamination | None:
    """The n-grams of every item of the configured task or item files; None when none are configured."""
    if not cfg.tasks:
        return None
    return Contamination(_items(cfg.tasks), cfg)


def _items(paths: list[str]) -> Iterator[tuple[str, str]]:
    from llmkit.data.readers import read_records, resolve_sources
    from llmkit.data.task_files import load_task_files, task_items

    for spec in paths:
        if spec.startswith(HARNESS_PREFIX):
            yield from _harness_items(spec.removeprefix(HARNESS_PREFIX))
            continue
        path = Path(spec)
        if path.is_dir():
            raise UserError(
                f"{path}: data.decontaminate.tasks names a folder; give llmkit task files (YAML), item "
                "files (.jsonl/.json/.csv/.parquet) or harness:NAME"
            )
        if path.suffix in ITEM_FILES:
            if not path.is_file():
                raise UserError(f"{path}: data.decontaminate.tasks names a file that does not exist")
            records = (record for source in resolve_sources([str(path)]) for record, _ in read_records(source))
            for index, record in enumerate(records):
                yield from ((f"{path.name} item {index + 1}", text) for text in _strings(record))
            continue
        tasks, _ = load_task_files([path])
        for task in tasks:
            for index, item in enumerate(task_items(task)):
                yield from ((f"{task.name} item {index + 1}", text) for text in _strings(item))


def _harness_items(spec: str) -> Iterator[tuple[str, str]]:
    """The evaluated documents of an lm-evaluation-harness task (a name whose data is in the Hugging Face cache, or a
    task YAML file): the text it shows the model, the target, and every choice."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(
            f"{HARNESS_PREFIX}{spec}: decontaminating against harness tasks needs lm-evaluation-harness: "
            "pip install 'llmkit[eval]'"
        )
    from llmkit.data.task_files import harness_task_names
    from llmkit.hub import prepare_hub_access

    prepare_hub_access("harness-task-data")
    from lm_eval.tasks import TaskManager, get_task_dict

    names, include = harness_task_names([spec])
    manager = TaskManager(include_path=include or None)
    if names[0] not in manager.all_tasks:
        raise UserError(f"{HARNESS_PREFIX}{spec}: lm-evaluation-harness has no such task (see `lm_eval ls tasks`)")
    try:
        tasks = get_task_dict(names, manager)
    except (ConnectionError, OSError) as exc:
        first = first_line(exc)
        raise UserError(
            f"{HARNESS_PREFIX}{spec}: the task's data is not on disk ({first}); run it once online (the Hugging Face "
            "cache keeps it) or name a task file with local data"
        ) from None
    for name, task in _leaf_tasks(tasks):
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        for index, doc in enumerate(docs or []):
            fields = [task.doc_to_text(doc), task.doc_to_target(doc)]
            if task.OUTPUT_TYPE == "multiple_choice":
                fields.append(task.doc_to_choice(doc))
            yield from ((f"{name} item {index + 1}", text) for text in _strings(fields))


def _leaf_tasks(tasks: dict[Any, Any]) -> Iterator[tuple[str, Any]]:
    for key, value in tasks.items():
        if isinstance(value, dict):  # a group of tasks
            yield from _leaf_tasks(value)
        else:
            yield str(getattr(key, "group_name", key)), value


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for inner in value.values():
            yield from _strings(inner)
    elif isinstance(value, list | tuple):
        for inner in value:
            yield from _strings(inner)
