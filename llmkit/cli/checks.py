"""eval, export, prune and factor: what checks, compresses and ships a trained model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from llmkit.cli.app import app, user_errors_exit_2
from llmkit.cli.options import EncodingOpt, JunitOpt, MarkdownOpt, ModelArg, OverwriteOpt, ReportOpt, SourceArg
from llmkit.errors import GATE_FAILED_EXIT


def eval_command(
    model: ModelArg,
    data: Annotated[
        str | None,
        typer.Option(help="Prepared dataset (its validation split), a raw text/JSONL file, or text+label rows."),
    ] = None,
    tasks: Annotated[
        list[Path] | None,
        typer.Option("--tasks", metavar="FILE", help="Task file (YAML; see docs/eval.md), repeatable."),
    ] = None,
    harness: Annotated[
        str | None, typer.Option(help="lm-evaluation-harness tasks, comma-separated (names or task YAML files).")
    ] = None,
    gate: Annotated[
        list[str] | None,
        typer.Option("--gate", metavar="RULE", help="CI gate METRIC OP VALUE, e.g. 'colors.acc>=0.8' (repeatable)."),
    ] = None,
    baseline: Annotated[Path | None, typer.Option(help="An earlier JSON report to compare with.")] = None,
    max_regression: Annotated[
        float | None,
        typer.Option(help="With --baseline: fail if a metric got worse by more than this (absolute; default 0)."),
    ] = None,
    report: ReportOpt = None,
    markdown: MarkdownOpt = None,
    junit: JunitOpt = None,
    max_perplexity: Annotated[float | None, typer.Option(help="Gate: same as --gate 'perplexity<=X'.")] = None,
    min_accuracy: Annotated[float | None, typer.Option(help="Gate (classifiers): --gate 'accuracy>=X'.")] = None,
    min_f1: Annotated[float | None, typer.Option(help="Gate (classifiers): --gate 'macro_f1>=X'.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    seq_len: Annotated[int | None, typer.Option(help="Window length for raw text (default: model context).")] = None,
    max_batches: Annotated[int | None, typer.Option(help="Score at most this many batches.")] = None,
    limit: Annotated[int | None, typer.Option(help="Harness: score only the first N items of each task.")] = None,
    text_field: Annotated[
        str | None, typer.Option(help="Field holding the text in JSONL/CSV/parquet (default: text).")
    ] = None,
    encoding: EncodingOpt = None,
    task: Annotated[
        str, typer.Option(help="What --data is scored as: auto (by the model) or reward (pairs or candidates).")
    ] = "auto",
    scores: Annotated[Path | None, typer.Option(help="Reward models: write each row's reward here (JSONL).")] = None,
) -> None:
    """Score a model: perplexity, classification, task files, gates.

    Held-out perplexity or classification (--data), task files (--tasks), harness tasks (--harness); gates and
    regressions against a baseline; JSON, Markdown and JUnit reports.

    Exit codes: 0 every gate and regression check passed, 1 one failed, 2 bad input.
    """
    from llmkit.eval.run import evaluate_model

    sugar = [("perplexity<=", max_perplexity), ("accuracy>=", min_accuracy), ("macro_f1>=", min_f1)]
    gates = [*(gate or []), *(f"{rule}{value!r}" for rule, value in sugar if value is not None)]
    result = evaluate_model(
        model,
        data,
        list(tasks or []),
        [t for t in (harness or "").split(",") if t],
        gates,
        baseline,
        max_regression,
        batch_size,
        seq_len,
        max_batches,
        limit,
        text_field,
        encoding,
        reports=[path for path in (report, markdown, junit) if path is not None],
        task=task,
        scores=scores,
    )
    _print_evaluation(result, data_scored=data is not None)
    finish_checks(result, report, markdown, junit)


def _print_evaluation(result: dict[str, Any], data_scored: bool) -> None:
    from llmkit.reports import (
        print_classification_report,
        print_eval_report,
        print_reward_report,
        print_task_results,
    )

    if data_scored:
        printer = {"reward": print_reward_report}.get(result.get("kind", ""))
        (printer or (print_classification_report if "macro_f1" in result else print_eval_report))(result)
    if "tasks" in result:
        print_task_results(result["tasks"])
    if "harness" in result:
        print_task_results(result["harness"], title="lm-evaluation-harness")


def finish_checks(result: dict[str, Any], report: Path | None, markdown: Path | None, junit: Path | None) -> None:
    """Show the gates and regression checks, write the reports, name each failure; exit 1 when one failed."""
    from llmkit.eval.run import write_reports
    from llmkit.reports import print_checks

    print_checks(result)
    write_reports(result, report, markdown, junit)
    for kind in ("gates", "regressions"):
        for check in result[kind]:
            if not check["passed"]:
                print(f"{kind.removesuffix('s')} failed: {check['detail']}", file=sys.stderr)
    if not result["passed"]:
        raise typer.Exit(GATE_FAILED_EXIT)


app.command("eval")(user_errors_exit_2(eval_command))
app.command("evaluate", help="Alias of `llmkit eval`.")(user_errors_exit_2(eval_command))


@app.command("export")
@user_errors_exit_2
def export_command(
    source: SourceArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    fmt: Annotated[str, typer.Option("--format", help="hf, gguf (llama.cpp) or onnx (onnxruntime).")] = "hf",
    dtype: Annotated[
        str | None,
        typer.Option(
            help="hf: float32/bfloat16/float16; gguf: f32, f16 (default), q8_0, q5_1, q5_0, q4_1, q4_0, "
            "k-quants q6_k..q2_k; onnx: float32."
        ),
    ] = None,
    quantize: Annotated[
        str | None, typer.Option(help="hf: int8 (torchao) or int4 (bitsandbytes NF4) weights; onnx: int8 dynamic.")
    ] = None,
    merge_lora: Annotated[
        bool, typer.Option("--merge-lora", help="Fold a LoRA run's adapter into a standalone model.")
    ] = False,
    max_logit_diff: Annotated[float | None, typer.Option(help="Parity tolerance: largest logit difference.")] = None,
    min_greedy_agreement: Annotated[
        float | None, typer.Option(help="Parity tolerance: least share of equal greedy tokens.")
    ] = None,
    max_ppl_increase: Annotated[
        float | None, typer.Option(help="Parity tolerance: largest relative perplexity change (0.02 = 2%).")
    ] = None,
    probe_data: Annotated[
        str | None,
        typer.Option(help="Text of your domain to probe with (.txt lines, .jsonl 'text'); default built-in."),
    ] = None,
    encoding: EncodingOpt = None,
    eval_report: Annotated[Path | None, typer.Option(help="An llmkit eval report to put in the model card.")] = None,
    ladder: Annotated[
        bool,
        typer.Option("--ladder", help="gguf: measure every quantization level, keep the smallest within tolerance."),
    ] = False,
    push_to_hub: Annotated[
        str | None,
        typer.Option(metavar="OWNER/NAME", help="Upload the checked export with its card (token: HF_TOKEN or login)."),
    ] = None,
    public: Annotated[bool, typer.Option("--public", help="With --push-to-hub: a public repository.")] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write the model as hf, gguf or onnx, checked for parity.

    Checked against the source on logits, greedy tokens and perplexity, with export_report.json and a model card
    (README.md); --ladder measures every GGUF level and keeps the smallest within tolerance; --push-to-hub uploads
    the checked export. Exit 1 when parity breaks: nothing is written.
    """
    from llmkit.export.export import export_model
    from llmkit.reports import print_export_report

    tolerance = {
        "max_logit_diff": max_logit_diff,
        "min_greedy_agreement": min_greedy_agreement,
        "max_ppl_increase": max_ppl_increase,
    }
    report = export_model(
        source,
        out,
        fmt=fmt,
        dtype=dtype,
        quantize=quantize,
        overwrite=overwrite,
        merge_lora=merge_lora,
        tolerance=tolerance,
        eval_report=eval_report,
        probe_data=probe_data,
        probe_encoding=encoding,
        ladder=ladder,
        push_to_hub=push_to_hub,
        public=public,
    )
    print_export_report(report)


@app.command("prune")
@user_errors_exit_2
def prune_command(
    source: SourceArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write (an HF model directory).")],
    data: Annotated[str, typer.Option(help="Calibration text: a prepared dataset, or a .txt/.jsonl file.")],
    target_params: Annotated[
        float | None, typer.Option(help="Parameters to keep: a fraction (0.75) or a count (2.3e6).")
    ] = None,
    axis: Annotated[str, typer.Option(help="How --target-params is reached: width (MLP channels) or depth.")] = "width",
    drop_layers: Annotated[int | None, typer.Option(help="Blocks to drop (the least influential).")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads to keep per layer (Llama).")] = None,
    mlp: Annotated[int | None, typer.Option(help="MLP channels to keep per layer (Llama).")] = None,
    hidden: Annotated[int | None, typer.Option(help="Hidden channels to keep (Llama).")] = None,
    batches: Annotated[int, typer.Option(help="Calibration batches of 8 sequences.")] = 16,
    encoding: EncodingOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Cut a trained model down by depth or width.

    Depth drops blocks; width drops heads, MLP or hidden channels. Scored on calibration text; writes a plain HF
    model directory with prune_report.json and a model card. Heal it with
    `llmkit pretrain --init-from OUT --teacher SOURCE` (docs/compression.md).
    """
    from llmkit.compress.prune import PruneSpec, prune_model
    from llmkit.reports import print_prune_report

    spec = PruneSpec(drop_layers, heads, mlp, hidden, target_params, axis)
    print_prune_report(prune_model(source, out, data, spec, batches, overwrite, encoding))


@app.command("factor")
@user_errors_exit_2
def factor_command(
    source: SourceArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    rank: Annotated[int | None, typer.Option(help="Rank of every factored projection.")] = None,
    energy: Annotated[
        float | None, typer.Option(help="Or: the smallest rank keeping this share of squared singular values.")
    ] = None,
    dense: Annotated[
        bool, typer.Option("--dense", help="Write the truncated weights as plain projections (loads anywhere).")
    ] = False,
    data: Annotated[str | None, typer.Option(help="Held-out text to measure perplexity before and after.")] = None,
    encoding: EncodingOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Factor block projections into low-rank pairs (truncated SVD).

    Every block projection is factored to --rank or to an --energy share, where that saves. The factored directory
    is smaller and faster and loads through llmkit (eval, generate, export); --dense writes the truncated weights as
    plain projections that any tool loads.
    """
    from llmkit.compress.lowrank import factor_directory
    from llmkit.reports import print_factor_report

    print_factor_report(factor_directory(source, out, rank, energy, dense, data, overwrite, encoding))
