"""`llmkit eval` as a function: held-out data, task files and harness tasks on one model, then gates and
regressions, one report. The CLI only prints it, writes it and turns a failed check into exit code 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.errors import UserError
from llmkit.outputs import check_report_paths

DATA_METRICS = (
    "loss",
    "perplexity",
    "bits_per_token",
    "bits_per_char",
    "bits_per_char_over_floor",
    "accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "roc_auc",
    "margin",
    "reward_chosen",
    "reward_rejected",
    "reward_mean",
)
EVAL_TASKS = ("auto", "reward")


def evaluate_model(
    model: str,
    data: str | None = None,
    task_files: list[Path] | None = None,
    harness: list[str] | None = None,
    gates: list[str] | None = None,
    baseline: Path | None = None,
    max_regression: float | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    max_batches: int | None = None,
    limit: int | None = None,
    text_field: str | None = None,
    encoding: str | None = None,
    reports: list[Path] | None = None,
    task: str = "auto",
    scores: Path | None = None,
) -> dict[str, Any]:
    """The report: data metrics at the top level (as before tasks existed), `tasks`, `harness`, the flat
    `metrics` every gate reads, each gate and regression check, and `passed`.

    `reports` are the files the caller will write: checked before any work, so a bad path fails in a second,
    not after the evaluation, and never names an input."""
    from llmkit.data.task_files import load_task_files, parse_gate
    from llmkit.eval.gates import read_baseline
    from llmkit.eval.tasks import flat_metrics, run_tasks
    from llmkit.export.formats import export_format
    from llmkit.runs import model_files, resolve_model_dir

    _check_request(
        data is not None,
        bool(task_files or harness),
        task,
        scores is not None,
        {
            "--batch-size": (batch_size, 1),
            "--seq-len": (seq_len, 2),
            "--max-batches": (max_batches, 1),
            "--limit": (limit, 1),
        },
    )
    if limit is not None and not harness:  # refused rather than dropped: the user believes it took effect
        raise UserError("--limit counts the items of --harness tasks; --max-batches limits --data")
    if max_regression is not None and not max_regression >= 0:
        raise UserError(f"--max-regression {max_regression:g}: must be 0 or more (how much worse a metric may get)")
    if max_regression is not None and baseline is None:
        raise UserError(
            f"--max-regression {max_regression:g}: how much worse than --baseline a metric may get; give --baseline"
        )
    for gate in gates or []:
        parse_gate(gate)
    reads = [*model_files(model), data, baseline, *(task_files or [])]
    check_report_paths([*(reports or []), *([scores] if scores else [])], reads)
    task_specs, file_gates = load_task_files(list(task_files or []))  # bad task files fail before the model loads
    old_metrics = read_baseline(baseline) if baseline is not None else None
    model_dir = resolve_model_dir(model)
    exported = export_format(model_dir)
    if exported and (harness or task == "reward"):
        raise UserError(
            f"{model_dir}: a {exported.name} export is evaluated with --data and --tasks; --harness and "
            "--task reward take the HF model it was exported from"
        )

    result: dict[str, Any] = {"model": str(model_dir), "runtime": exported.runtime if exported else "transformers"}
    metrics: dict[str, float] = {}
    if data is not None:
        result.update(
            _evaluate_data(model, model_dir, data, batch_size, seq_len, max_batches, text_field, encoding, task, scores)
        )
        metrics.update({k: float(v) for k, v in result.items() if k in DATA_METRICS and v is not None})
    if task_specs:
        result["tasks"] = run_tasks(model_dir, task_specs, batch_size)
        metrics.update(flat_metrics(result["tasks"]))
    if harness:
        from llmkit.eval.harness import run_harness

        result["harness"] = run_harness(model_dir, harness, batch_size, limit)
        metrics.update(flat_metrics({f"harness.{name}": values for name, values in result["harness"].items()}))

    result.update(_judge(metrics, [*file_gates, *(gates or [])], old_metrics, baseline, max_regression or 0.0))
    return result


def _judge(
    metrics: dict[str, float],
    gates: list[str],
    old_metrics: dict[str, float] | None,
    baseline: Path | None,
    max_regression: float,
) -> dict[str, Any]:
    """The gates and regression checks on the metrics, and whether all passed."""
    from llmkit.eval.gates import check_gates, check_regressions, checks_as_dicts

    gate_checks = check_gates(gates, metrics)
    regressions = check_regressions(metrics, old_metrics, max_regression) if old_metrics is not None else []
    return {
        "metrics": metrics,
        "gates": checks_as_dicts(gate_checks),
        "regressions": checks_as_dicts(regressions),
        "baseline": str(baseline) if baseline else None,
        "baseline_metrics": old_metrics,
        "passed": all(c.passed for c in gate_checks + regressions),
    }


def _check_request(data: bool, tasks: bool, task: str, scores: bool, counts: dict[str, tuple[int | None, int]]) -> None:
    """What was asked, checked before anything loads: something to evaluate, a known --task, counts at least their
    least."""
    if not data and not tasks:
        raise UserError("nothing to evaluate: give --data, --tasks or --harness")
    if task not in EVAL_TASKS:
        raise UserError(f"--task {task}: choose one of {', '.join(EVAL_TASKS)}")
    if (task == "reward" or scores) and not data:
        raise UserError("--task reward and --scores need --data: the pairs or candidates to score")
    for name, (value, least) in counts.items():
        if value is not None and value < least:
            raise UserError(f"{name} {value}: must be at least {least}")


def _evaluate_data(
    model: str,
    model_dir: Path,
    data: str,
    batch_size: int,
    seq_len: int | None,
    max_batches: int | None,
    field: str | None,
    encoding: str | None,
    task: str = "auto",
    scores: Path | None = None,
) -> dict[str, Any]:
    """--data scored as the model reads it: pairs or candidates for a reward model, labelled rows for a classifier,
    text for a language model. `field` and `encoding` are None when not given; an option the model's kind of scoring
    has no use for is refused, not dropped."""
    from llmkit.data.store import MANIFEST
    from llmkit.eval.classification import evaluate_classifier, is_classifier
    from llmkit.eval.perplexity import evaluate
    from llmkit.eval.reward import evaluate_reward
    from llmkit.scoring import is_reward_dir

    raw_only = {"--seq-len": seq_len, "--text-field": field, "--encoding": encoding}
    given = [flag for flag, value in raw_only.items() if value is not None]
    if given and (Path(data) / MANIFEST).is_file():
        raise UserError(
            f"{' and '.join(given)}: for raw text; {data} is a prepared dataset, whose validation blocks are "
            "scored as they were packed"
        )
    reward = task == "reward" or is_reward_dir(model_dir)
    classifier = not reward and is_classifier(model_dir)
    # a classifier reads its text from --text-field; only a language model cuts windows or stops after some batches
    unused = {"--seq-len": seq_len, "--max-batches": max_batches, "--text-field": field if reward else None}
    given = [flag for flag, value in unused.items() if value is not None]
    if (reward or classifier) and given:
        kind = "a reward model, scoring each pair or candidate" if reward else "a classifier, scoring each row"
        raise UserError(f"{' and '.join(given)}: for a language model's perplexity; {model_dir} is {kind}")
    if reward:
        return evaluate_reward(model_dir, data, batch_size, scores, encoding or "utf-8")
    if scores is not None:
        raise UserError(f"--scores: {model_dir} is not a reward model; only a reward model scores candidates")
    if classifier:
        return evaluate_classifier(model_dir, data, max(batch_size, 32), field or "text", encoding or "utf-8")
    return evaluate(model, data, batch_size, seq_len, max_batches, field or "text", encoding or "utf-8")


def write_reports(result: dict[str, Any], report: Path | None, markdown: Path | None, junit: Path | None) -> None:
    """JSON, Markdown and JUnit XML, each written atomically (also when a check failed)."""
    from llmkit.atomic import write_json, write_text
    from llmkit.eval.gates import junit_report, markdown_report

    for path, text in ((report, None), (markdown, markdown_report), (junit, junit_report)):
        if path is None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            write_json(path, result)
        else:
            write_text(path, text(result))
