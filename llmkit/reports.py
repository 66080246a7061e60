"""Terminal summaries printed at the end of each command (the JSON files hold the same figures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from llmkit.console import console
from llmkit.data.readers import RECORD_SUFFIXES, data_suffix


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def print_prep_summary(result: Any) -> None:
    manifest = result.manifest
    if result.reused:
        console.print(f"{result.path}: inputs and settings unchanged, reusing the prepared dataset")
    docs = manifest["documents"]
    dropped = ", ".join(f"{n:,} {reason}" for reason, n in docs["dropped"].items()) or "none"
    rows = [("documents", f"{docs['read']:,} read, {docs['kept']:,} kept; dropped: {dropped}")]
    if docs.get("changed"):
        rows.append(("changed", ", ".join(f"{n:,} {what}" for what, n in docs["changed"].items())))
    curation = manifest.get("curation", {})
    if curation.get("contaminated"):
        rows.append(
            ("contaminated", f"{curation['contaminated']:,} documents share an n-gram with eval items (audit.jsonl)")
        )
    if result.shards_reused:
        rows.append(
            ("resumed", f"{result.shards_reused} of {curation['shards']} shards were curated by an interrupted run")
        )
    mix = manifest.get("mix", [])
    if any(entry["weight"] != 1 for entry in mix):
        shares = ", ".join(f"{e['source']} x{e['weight']:g} = {e['documents_packed']:,} docs" for e in mix)
        rows.append(("mix", shares))
    rows.append(("tokenizer", f"{manifest['tokenizer']['source']} ({manifest['tokenizer']['vocab_size']:,} tokens)"))
    for split, info in manifest["splits"].items():
        rows.append(
            (
                split,
                f"{info['documents']:,} docs, {info['tokens']:,} tokens -> {info['blocks']:,} blocks of "
                f"{manifest['block_size']} ({info['remainder_tokens']:,} remainder tokens dropped)",
            )
        )
    if note := _no_validation(manifest):
        rows.append(("validation", note))
    entropy = manifest.get("entropy")
    if entropy:
        rows.append(
            (
                "entropy floor",
                f"{entropy['bits_per_char_expected']:.4f} bits/char (the grammar's exact rate; a "
                "split's own documents have a slightly different one, which eval uses)",
            )
        )
    if not result.reused and result.seconds:
        tokens = sum(info["tokens"] for info in manifest["splits"].values())
        rows.append(
            (
                "time",
                f"{result.seconds:.1f}s, {docs['read'] / result.seconds:,.0f} docs/s, "
                f"{tokens / result.seconds:,.0f} tokens/s",
            )
        )
    console.print(_table(f"dataset {result.path}", rows))


def _no_validation(manifest: dict[str, Any]) -> str | None:
    """Why a dataset that asked for a validation split has no block of it (training then runs without one)."""
    settings, val = manifest["settings"], manifest["splits"].get("val")
    if not settings.get("val_fraction") or val is None or val["blocks"]:
        return None
    off = "none: training will run without validation or early stopping; "
    if val["documents"]:
        return off + f"its {val['tokens']:,} tokens are fewer than one block (lower data.block_size or add data)"
    whole_files = settings.get("txt_mode") == "file" and any(
        source["kind"] == "file" and data_suffix(Path(source["name"])) not in RECORD_SUFFIXES
        for source in manifest["sources"]
    )
    hint = " (a text file is one document: data.txt_mode line or blank_line splits it)" if whole_files else ""
    return off + (
        f"data.val_fraction {settings['val_fraction']:g} of {manifest['documents']['kept']:,} kept documents put none "
        f"there{hint}"
    )


def print_fit_summary(result: Any) -> None:
    rows = [
        ("steps", f"{result.steps:,}" + (" (stopped early)" if result.stopped_early else "")),
        ("tokens", f"{result.tokens:,} in {result.seconds:.1f}s ({result.tokens_per_second:,.0f} tokens/s overall)"),
        ("train loss", f"{result.train_loss:.4f}"),
    ]
    if result.steady_tokens_per_second is not None:
        rows.append(
            (
                "steady state",
                f"{result.steady_tokens_per_second:,.0f} tokens/s from step "
                f"{result.steady_from_step:,} (training steps only: no warm-up, validation or checkpoints)",
            )
        )
    if result.compiled and result.first_step_seconds is not None:
        rows.append(("first step", f"{result.first_step_seconds:.1f}s, compiling the training step (torch.compile)"))
    if result.mfu is not None:
        rows.append(
            ("MFU", f"{result.mfu:.1%} in the steady state (6N + attention FLOPs over the devices' dense bf16 peak)")
        )
    memory = result.memory
    if "peak_reserved_gib" in memory:
        rows.append(
            (
                "GPU memory",
                f"{memory['peak_allocated_gib']:.2f} GiB peak allocated, "
                f"{memory['peak_reserved_gib']:.2f} GiB reserved",
            )
        )
    elif "peak_rss_gib" in memory:
        rows.append(("host memory", f"{memory['peak_rss_gib']:.2f} GiB peak resident"))
    if result.val_loss is not None:
        rows.append(("val loss", f"{result.val_loss:.4f} (best {result.best_val_loss:.4f})"))
    evaluation = getattr(result, "evaluation", {})
    if "val_rewards/accuracy" in evaluation:
        rows.append(
            (
                "val rewards",
                f"accuracy {evaluation['val_rewards/accuracy']:.3f}, margin "
                f"{evaluation['val_rewards/margin']:.4f} (chosen {evaluation['val_rewards/chosen']:.4f}, "
                f"rejected {evaluation['val_rewards/rejected']:.4f})",
            )
        )
    if result.final_dir is not None:
        rows.append(("final model", str(result.final_dir)))
    console.print(_table("training stopped" if result.interrupted else "training finished", rows))


def print_eval_report(report: dict[str, Any]) -> None:
    rows = [
        ("loss", f"{report['loss']:.4f} nats/token"),
        ("perplexity", f"{report['perplexity']:.3f}"),
        ("bits/token", f"{report['bits_per_token']:.4f}"),
    ]
    if report.get("bits_per_char") is not None:
        rows.append(("bits/char", f"{report['bits_per_char']:.4f}"))
    if "entropy_floor_bits_per_char" in report:
        rows.append(
            (
                "entropy floor",
                f"{report['entropy_floor_bits_per_char']:.4f} bits/char of these very documents "
                f"(model is {report['bits_per_char_over_floor']:.3f}x the floor)",
            )
        )
    rows.append(("tokens", f"{report['tokens']:,} in {report['seconds']:.1f}s"))
    if report.get("runtime", "transformers") != "transformers":
        rows.append(("runtime", f"{report['runtime']} (the exported file itself)"))
    console.print(_table(f"eval {report['model']} on {report['data']}", rows))


def print_export_report(report: dict[str, Any]) -> None:
    limits = report["tolerance"]
    rows = [
        ("format", f"{report['format']} ({report['kind']}), {report['precision']}"),
        ("size", f"{report['size_bytes'] / 2**20:.2f} MiB"),
        ("max |logit diff|", f"{report['max_abs_logit_diff']:.3g} vs source (limit {limits['max_logit_diff']:g})"),
        (
            "greedy agreement",
            f"{report['greedy_agreement']:.1%} of {report['probe_tokens']} probe tokens "
            f"(at least {limits['min_greedy_agreement']:.0%})",
        ),
        (
            "perplexity",
            f"{report['exported_perplexity']:.4g} vs {report['source_perplexity']:.4g} on the probe "
            f"({report['perplexity_increase']:+.3%}; within +-{limits['max_ppl_increase']:.2%}; the probe "
            "holds general sentences too, so it is higher than eval's on your data)",
        ),
    ]
    if "pushed" in report:
        pushed = report["pushed"]
        rows.append(
            ("pushed", f"{pushed['repo']} ({'private' if pushed['private'] else 'public'}): {pushed['commit']}")
        )
    console.print(_table(f"exported {report['out']}", rows))


def print_prune_report(report: dict[str, Any]) -> None:
    rows = [
        (
            "parameters",
            f"{report['parameters_before']:,} -> {report['parameters_after']:,} ({report['parameter_fraction']:.1%})",
        ),
        (
            "removed",
            ", ".join(
                f"{key}: {value}" if key != "blocks" else f"blocks {value['dropped']}"
                for key, value in report["removed"].items()
            ),
        ),
        (
            "held-out perplexity",
            f"{report['held_out_perplexity_before']:.4g} -> "
            f"{report['held_out_perplexity_after']:.4g} ({report['held_out_tokens']:,} tokens; "
            "not healed)",
        ),
    ]
    console.print(_table(f"pruned {report['out']}", rows))


def print_factor_report(report: dict[str, Any]) -> None:
    ranks = sorted(set(report["ranks"].values()))
    rows = [
        (
            "factored",
            f"{len(report['ranks'])} projections, rank {ranks[0]}" + (f"..{ranks[-1]}" if len(ranks) > 1 else ""),
        ),
        (
            "parameters",
            f"{report['parameters_before']:,} -> {report['parameters_factored']:,} factored"
            + (" (written dense: the original size)" if report["dense"] else ""),
        ),
    ]
    if report["held_out_perplexity_before"] is not None:
        rows.append(
            (
                "held-out perplexity",
                f"{report['held_out_perplexity_before']:.4g} -> {report['held_out_perplexity_after']:.4g}",
            )
        )
    console.print(_table(f"factored {report['out']}", rows))


def print_reward_report(report: dict[str, Any]) -> None:
    if "pairs" in report:
        margin = (
            f"{report['margin']:.4f} (chosen {report['reward_chosen']:.4f}, rejected {report['reward_rejected']:.4f})"
        )
        rows = [
            ("pairwise accuracy", f"{report['accuracy']:.4f} (chosen scored above rejected)"),
            ("margin", margin),
            ("pairs", f"{report['pairs']:,} in {report['seconds']:.1f}s"),
        ]
    else:
        rows = [
            (
                "reward",
                f"mean {report['reward_mean']:.4f}, std {report['reward_std']:.4f}, range "
                f"{report['reward_min']:.4f} .. {report['reward_max']:.4f}",
            ),
            ("candidates", f"{report['candidates']:,} in {report['seconds']:.1f}s"),
        ]
    if report.get("scores"):
        rows.append(("scores", report["scores"]))
    console.print(_table(f"eval {report['model']} on {report['data']} (reward model)", rows))


def print_classification_report(report: dict[str, Any]) -> None:
    rows = [
        ("accuracy", f"{report['accuracy']:.4f}"),
        (
            "macro P / R / F1",
            f"{report['macro_precision']:.4f} / {report['macro_recall']:.4f} / {report['macro_f1']:.4f}",
        ),
    ]
    if report.get("roc_auc") is not None:
        ovr = " (one-vs-rest, macro)" if len(report["per_class"]) > 2 else ""
        rows.append((f"ROC-AUC{ovr}", f"{report['roc_auc']:.4f}"))
    rows.append(("examples", f"{report['examples']:,} in {report['seconds']:.1f}s"))
    console.print(_table(f"eval {report['model']} on {report['data']}", rows))
    matrix = report["confusion_matrix"]
    table = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left")
    table.add_column("")
    for name in matrix["labels"]:
        table.add_column(name, justify="right")
    for name, counts in zip(matrix["labels"], matrix["rows_true_columns_predicted"], strict=True):
        table.add_row(name, *map(str, counts))
    console.print(table)


def print_plan(plan: Any) -> None:
    gib = 2**30
    memory = plan.memory
    rows = [
        ("parameters", f"{plan.parameters / 1e6:,.2f}M total, {plan.trainable / 1e6:,.2f}M trainable"),
        ("FLOPs per token", f"{plan.flops_per_token / 1e9:,.2f} GFLOP (training: forward + backward)"),
        ("tokens per step", f"{plan.tokens_per_step:,} on {plan.gpus} x {plan.gpu_type}"),
        (
            f"memory per GPU ({plan.strategy})",
            f"{memory.total / gib:.1f} GiB = weights {memory.weights / gib:.1f}"
            f" + gradients {memory.gradients / gib:.1f}"
            f" + optimizer {memory.optimizer / gib:.1f} + activations {memory.activations / gib:.1f}"
            + (f" - {memory.not_together / gib:.1f} not held at once" if memory.not_together >= 0.05 * gib else "")
            + f" + CUDA context {memory.overhead / gib:.1f}"
            + ("" if plan.fits else "  (does not fit)"),
        ),
        ("by strategy", ", ".join(f"{name} {total / gib:.1f}" for name, total in plan.by_strategy.items()) + " GiB"),
        ("suggestion", plan.suggestion),
    ]
    if plan.budget_tokens:
        rows.append(("budget", f"{plan.budget_tokens:,} tokens"))
    if plan.hours is not None:
        rows.append(("time", f"{plan.hours:,.1f} h at {plan.mfu:.0%} MFU ({plan.hours * plan.gpus:,.1f} GPU-hours)"))
    if plan.cost is not None:
        rows.append(("cost", f"{plan.cost:,.2f}"))
    for note in plan.notes:
        rows.append(("note", note))
    console.print(_table("plan", rows))


def print_task_results(results: dict[str, dict[str, Any]], title: str = "tasks") -> None:
    rows = []
    for name, metrics in results.items():
        shown = [
            f"{key} {value:.4f}" for key, value in metrics.items() if isinstance(value, float) and key not in ("items",)
        ]
        count = f" ({metrics['items']} items)" if metrics.get("items") else ""
        rows.append((name, ", ".join(shown) + count))
    console.print(_table(title, rows))


def print_monitor_report(report: dict[str, Any]) -> None:
    def shown(name: str, value: float) -> str:
        if name.endswith("_s") and not name.endswith("_per_s"):  # a duration, not a rate
            return f"{value * 1000:.1f} ms" if value < 10 else f"{value:.1f} s"
        return f"{value:.4g}" if isinstance(value, float) and not value.is_integer() else f"{value:,.0f}"

    rows = [(name, shown(name, value)) for name, value in report["metrics"].items()]
    window = f" (last {report['since']})" if report.get("since") else ""
    console.print(_table(f"monitor {report['source']}{window}", rows))


def print_checks(report: dict[str, Any]) -> None:
    checks = report["gates"] + report["regressions"]
    if not checks:
        return
    rows = [("PASS" if c["passed"] else "FAIL", c["detail"]) for c in checks]
    console.print(_table("gates: passed" if report["passed"] else "gates: FAILED", rows))


def print_recipes(recipes: list[Any]) -> None:
    table = Table(title="bundled recipes", title_justify="left")
    for column in ("name", "what", "hardware", "run"):
        table.add_column(column, overflow="fold")
    for recipe in recipes:
        table.add_row(recipe.name, recipe.about, recipe.hardware, f"llmkit {recipe.command} --config {recipe.name}")
    console.print(table)
    console.print(
        "Also bundled (llmkit recipes show NAME): ci-eval and tasks/* (eval task files), deepspeed/*, accelerate/*, "
        "slurm/*."
    )
