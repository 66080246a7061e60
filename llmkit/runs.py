"""Where things live in a run directory, and how a path given by the user maps to a model."""

from __future__ import annotations

from pathlib import Path

from llmkit.config import read_json_mapping
from llmkit.errors import UserError


def resolve_model_dir(path: str | Path) -> Path:
    """A run directory means its final model; a checkpoint means its model/ folder; else the path itself.

    A string that does not exist on disk but looks like `owner/name` is passed on as a hub name.
    """
    path = Path(path)
    if not path.exists():
        text = str(path)
        if text.count("/") == 1 and not text.startswith((".", "/", "~")):
            return path
        hub = "; a Hub model is named owner/name, e.g. openai-community/gpt2" if "/" not in text else ""
        raise UserError(f"{path}: model not found (give a run directory, a checkpoint or an HF model directory{hub})")
    for candidate in (path / "final", path / "model", path):
        for name in ("config.json", "adapter_config.json"):
            if (candidate / name).is_file():
                read_json_mapping(candidate / name, "missing")  # a corrupt config is one line, not a traceback
                return candidate
    raise UserError(f"{path}: no config.json here, in final/ or in model/; is this a model directory?")


def find_tokenizer_dir(model_dir: Path) -> Path:
    """The tokenizer saved with a model: beside it, or in the run's tokenizer/ for a checkpoint."""
    candidates = [model_dir, model_dir.parent / "tokenizer"]
    if len(model_dir.parents) >= 3:
        candidates.append(model_dir.parents[2] / "tokenizer")  # RUN/checkpoints/step-N/model
    for candidate in candidates:
        if (candidate / "tokenizer_config.json").is_file() or (candidate / "tokenizer.json").is_file():
            return candidate
    return model_dir  # a hub name, or a directory without one: loading reports it


# What a training run writes at its root; a report written beside them (RUN/eval.json, which a model card picks up)
# must not replace one.
RUN_RECORDS = ("config.yaml", "summary.json", "metrics.jsonl", "data_stats.json", "data_trace.jsonl", "loss.png",
               "tensorboard", "checkpoints", "final", "tokenizer")  # fmt: skip


def model_files(model: str | Path) -> list[Path]:
    """The files a report about `model` must never replace (llmkit.outputs.check_report_paths): the model's folder,
    its tokenizer's, and the records of the run it belongs to; not the rest of the run folder."""
    model_dir = resolve_model_dir(model)
    run = _run_of(model_dir)
    return [model_dir, find_tokenizer_dir(model_dir), *([run / name for name in RUN_RECORDS] if run else [])]


def _run_of(model_dir: Path) -> Path | None:
    """The run directory of RUN/final or RUN/checkpoints/step-N/model, else None."""
    if model_dir.name == "final":
        return model_dir.parent
    if model_dir.name == "model" and model_dir.parent.parent.name == "checkpoints":
        return model_dir.parents[2]
    return None


def run_summaries(model_dir: Path) -> list[Path]:
    """Where the summary.json of the run a model came from may be: beside it, in the run, or above a checkpoint."""
    return [folder / "summary.json" for folder in (model_dir, model_dir.parent, model_dir.parent.parent)]


def scoring_kind(model_dir: Path) -> str | None:
    """ "a reward model" or "a classifier" when the directory's model scores text (a sequence-classification head:
    `--task reward`, `--task classify`, any HF ...ForSequenceClassification), else None (a causal LM)."""
    import json

    config, adapter = model_dir / "config.json", model_dir / "adapter_config.json"
    if adapter.is_file():
        if json.loads(adapter.read_text(encoding="utf-8")).get("task_type") != "SEQ_CLS":
            return None
        import yaml

        run_config = model_dir.parent / "config.yaml"
        saved = yaml.safe_load(run_config.read_text(encoding="utf-8")) if run_config.is_file() else None
        task = ((saved or {}).get("finetune") or {}).get("task")
        return "a reward model" if task == "reward" else "a classifier"
    if not config.is_file():
        return None
    mapping = json.loads(config.read_text(encoding="utf-8"))
    if not any(name.endswith("ForSequenceClassification") for name in mapping.get("architectures") or []):
        return None
    labels = dict(mapping.get("id2label") or {})
    return "a reward model" if len(labels) == 1 and labels.get("0") == "reward" else "a classifier"


def refuse_scoring_model(model_dir: Path, doing: str) -> None:
    """A command that needs a language model, given a model that scores text: one line (generating with one printed
    token soup; exporting one dropped its trained head while the parity check passed)."""
    kind = scoring_kind(model_dir)
    if kind is not None:
        raise UserError(
            f"{model_dir}: {kind} scores text and does not generate it, so it cannot be {doing}; "
            "score with `llmkit eval` on the run"
        )
