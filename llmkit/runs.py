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
        raise UserError(f"{path}: model not found (give a run directory, a checkpoint or an HF model directory)")
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


def model_reads(model: str | Path) -> list[Path]:
    """What scoring `model` reads, for the report-path check (llmkit.outputs.check_report_paths): the model's folder,
    its tokenizer's, and the run's summary.json (validation loss); not the run folder itself, where RUN/eval.json
    is the report a model card picks up."""
    model_dir = resolve_model_dir(model)
    run_files = [folder / "summary.json" for folder in (model_dir, model_dir.parent, model_dir.parent.parent)]
    return [model_dir, find_tokenizer_dir(model_dir), *run_files]


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
