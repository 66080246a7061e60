"""README.md for an export directory: what the model is, what it was trained on and how, and how it scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from llmkit.config import read_json_mapping
from llmkit.errors import UserError
from llmkit.export.formats import FORMATS


def find_run_files(model_dir: Path) -> dict[str, Path]:
    """config.yaml, summary.json, eval.json and data_stats.json of the run a model directory belongs to."""
    found: dict[str, Path] = {}
    for folder in [model_dir, *list(model_dir.parents)[:3]]:
        for name in ("config.yaml", "summary.json", "eval.json", "data_stats.json"):
            if name not in found and (folder / name).is_file():
                found[name] = folder / name
    return found


def model_card(name: str, model_dir: Path, report: dict[str, Any], eval_report: Path | None) -> str:
    files = find_run_files(model_dir)
    config = yaml.safe_load(files["config.yaml"].read_text()) if "config.yaml" in files else None
    lines = [
        f"# {name}",
        "",
        f"Exported by llmkit from `{model_dir}` as **{report['format']}** "
        f"({report['precision']}, {report['size_bytes'] / 2**20:.1f} MiB).",
        "",
    ]
    lines += ["## Base model", "", _base(config, report), ""]
    lines += ["## Data", "", *_data(config, files), ""]
    if "summary.json" in files:
        summary = json.loads(files["summary.json"].read_text())
        lines += ["## Training", "", "| | |", "| --- | --- |"]
        for key in ("steps", "tokens", "train_loss", "val_loss", "best_val_loss", "tokens_per_second", "mfu"):
            if summary.get(key) is not None:
                value = summary[key]
                lines.append(f"| {key} | {value:,.4f} |" if isinstance(value, float) else f"| {key} | {value:,} |")
        lines.append("")
    if config is not None:
        lines += [
            "Training config (secrets removed):",
            "",
            "```yaml",
            yaml.safe_dump(config, sort_keys=False).strip(),
            "```",
            "",
        ]
    evaluation = eval_report or files.get("eval.json")
    lines += ["## Evaluation", "", *_evaluation(evaluation), ""]
    limits = report["tolerance"]
    probe = f"Compared with the source model in float32 on the probe set ({report['probe']}):"
    lines += [
        "## Export check",
        "",
        probe,
        "",
        "| check | value | tolerance |",
        "| --- | ---: | ---: |",
        f"| max abs logit difference | {report['max_abs_logit_diff']:.3g} | {limits['max_logit_diff']:g} |",
        f"| greedy agreement | {report['greedy_agreement']:.2%} | >= {limits['min_greedy_agreement']:.0%} |",
        f"| perplexity change | {report['perplexity_increase']:+.3%} | +-{limits['max_ppl_increase']:.2%} |",
        "",
    ]
    if report.get("ladder"):
        lines += _ladder(report)
    lines += ["## Use", "", "```python", *FORMATS[report["format"]].usage, "```", ""]
    return "\n".join(lines)


def _ladder(report: dict[str, Any]) -> list[str]:
    limits = report["tolerance"]
    lines = [
        "## Quantization ladder",
        "",
        f"Every level measured on the same probe; kept: the smallest inside greedy agreement >= "
        f"{limits['min_greedy_agreement']:.0%} and perplexity change within +-{limits['max_ppl_increase']:.0%} "
        f"(**{report['recommended']}**).",
        "",
        "| level | size (MiB) | greedy agreement | perplexity change | tokens/s (llama.cpp) | within |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in report["ladder"]:
        speed = f"{row['tokens_per_second']:,.0f}" if row.get("tokens_per_second") else "-"
        lines.append(
            f"| {row['level']} | {row['size_bytes'] / 2**20:.2f} | {row['greedy_agreement']:.2%} | "
            f"{row['perplexity_increase']:+.2%} | {speed} | {'yes' if row['within'] else 'no'} |"
        )
    if report.get("ladder_note"):
        lines += ["", f"Not measured: {report['ladder_note']}."]
    if not any(row.get("tokens_per_second") for row in report["ladder"]):
        lines += ["", "tokens/s: llama-cpp-python was not installed where this ran, so no level was timed."]
    return [*lines, ""]


def _base(config: dict[str, Any] | None, report: dict[str, Any]) -> str:
    if config is None:
        return f"Exported from the model directory `{report['source']}` (no llmkit run found beside it)."
    model = config["model"]
    if model.get("init_from"):
        method = config.get("finetune", {}).get("method", "full")
        return f"Fine-tuned from `{model['init_from']}` (method: {method})."
    return (
        f"Trained from scratch: {model['arch']}, {model['n_layers']} layers, width {model['hidden_size']}, "
        f"{model['n_heads']} heads, context {model['context_length']}."
    )


def _data(config: dict[str, Any] | None, files: dict[str, Path]) -> list[str]:
    if config is None:
        return ["Unknown."]
    lines = []
    manifest_path = Path(config["data"]["dataset_dir"]) / "manifest.json"
    if not config["model"].get("init_from") and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        sources = ", ".join(f"{s['kind']}:{s['name']}" for s in manifest.get("sources", []))
        splits = manifest.get("splits", {})
        tokens = {name: split.get("tokens") for name, split in splits.items() if isinstance(split, dict)}
        lines += [
            f"Prepared dataset `{manifest_path.parent}` (fingerprint `{manifest['fingerprint'][:16]}`):",
            f"sources {sources}; tokens per split {tokens}; blocks of {manifest.get('block_size')} tokens.",
        ]
    else:
        lines.append(f"Sources: {', '.join(config['data'].get('sources', []))}.")
    if "data_stats.json" in files:
        stats = json.loads(files["data_stats.json"].read_text())
        shown = {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}
        lines.append(f"Fine-tuning data: {shown}.")
    return lines


def eval_report_metrics(path: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """An `llmkit eval --report` file and its numeric metrics; one line naming the file when it is not one
    (export checks it before any work, so a wrong file fails in a second, not after the parity check)."""
    report = read_json_mapping(path, "evaluation report not found")
    metrics = report.get("metrics", report)  # reports before tasks existed kept the metrics at the top level
    numbers = {
        str(k): v
        for k, v in (metrics.items() if isinstance(metrics, dict) else [])
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if not numbers:
        raise UserError(f"{path}: not an llmkit eval report (no metrics in it); write one with llmkit eval --report")
    return report, numbers


def _evaluation(path: Path | None) -> list[str]:
    if path is None:
        return ["No evaluation report was given (`llmkit export --eval-report eval.json`, or RUN/eval.json)."]
    report, metrics = eval_report_metrics(path)
    rows = ["| metric | value |", "| --- | ---: |"] + [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    passed = report.get("passed")
    verdict = "All gates passed." if passed is True else "Some gates FAILED." if passed is False else ""
    return [f"From `{path}`. {verdict}".strip(), "", *rows]
