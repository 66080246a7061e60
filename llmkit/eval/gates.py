"""Gates and regressions for `llmkit eval` in CI, and the reports a reviewer reads (JSON, Markdown, JUnit XML).

A gate is `METRIC OP VALUE` with OP one of >=, <=, >, <, ==, e.g. `colors.acc>=0.8` or `perplexity<=12`.
A regression check compares every metric present in both this report and a baseline report: a metric that
got worse by more than `max_regression` (absolute, in the metric's own units) fails. Lower is better for
loss, perplexity and bits; higher for everything else.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from llmkit.config import read_json_mapping
from llmkit.data.task_files import parse_gate
from llmkit.errors import UserError, did_you_mean

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    ">": operator.gt,
    "<": operator.lt,
}
LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_token", "bits_per_char", "bits_per_char_over_floor")


@dataclass
class Check:
    """One gate or one regression check: a JUnit testcase."""

    name: str
    metric: str
    value: float | None
    passed: bool
    detail: str


def lower_is_better(metric: str) -> bool:
    return metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER


def check_gates(gates: list[str], metrics: dict[str, float]) -> list[Check]:
    checks = []
    for gate in gates:
        metric, op, text, limit = parse_gate(gate)
        if metric not in metrics:
            known = ", ".join(sorted(metrics)) or "none"
            raise UserError(
                f"--gate {gate!r}: no metric {metric!r}{did_you_mean(metric, list(metrics))} (have: {known})"
            )
        value = metrics[metric]
        passed = OPERATORS[op](value, limit)
        checks.append(
            Check(f"gate {metric}{op}{text}", metric, value, passed, f"{metric} = {value:.6g} (need {op} {text})")
        )
    return checks


def check_regressions(metrics: dict[str, float], baseline: dict[str, float], max_regression: float) -> list[Check]:
    checks = []
    for metric in sorted(set(metrics) & set(baseline)):
        old, new = baseline[metric], metrics[metric]
        worse = (new - old) if lower_is_better(metric) else (old - new)
        passed = worse <= max_regression + 1e-12
        change = f"worse by {worse:.4g}" if worse > 0 else "not worse"
        detail = f"{metric}: {old:.6g} -> {new:.6g} ({change}; allowed {max_regression:g})"
        checks.append(Check(f"regression {metric}", metric, new, passed, detail))
    return checks


def read_baseline(path: Path) -> dict[str, float]:
    report = read_json_mapping(path, "baseline report not found (write one with llmkit eval --report)")
    metrics = report.get("metrics")
    if not isinstance(metrics, dict):
        raise UserError(f"{path}: not an llmkit eval report (no 'metrics' mapping)")
    return {str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def checks_as_dicts(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(check) for check in checks]


def markdown_report(report: dict[str, Any]) -> str:
    """A pull-request comment: verdict, metrics, failed checks first."""
    checks = report["gates"] + report["regressions"]
    failed = [c for c in checks if not c["passed"]]
    verdict = "passed" if report["passed"] else f"FAILED ({len(failed)} of {len(checks)} checks)"
    lines = [f"## {report.get('title', 'llmkit eval')}: {verdict}", "", f"Model: `{report['model']}`", ""]
    if failed:
        lines += ["### Failed", "", "| check | detail |", "| --- | --- |"]
        lines += [f"| {c['name']} | {c['detail']} |" for c in failed]
        lines.append("")
    lines += ["### Metrics", "", "| metric | value | baseline |", "| --- | ---: | ---: |"]
    baseline = report.get("baseline_metrics") or {}
    for metric, value in report["metrics"].items():
        old = f"{baseline[metric]:.4f}" if metric in baseline else ""
        lines.append(f"| {metric} | {value:.4f} | {old} |")
    if checks:
        lines += ["", "### Checks", "", "| check | result | detail |", "| --- | --- | --- |"]
        lines += [f"| {c['name']} | {'pass' if c['passed'] else '**FAIL**'} | {c['detail']} |" for c in checks]
    return "\n".join(lines) + "\n"


def junit_report(report: dict[str, Any]) -> str:
    """JUnit XML: one testcase per gate and per regression check (CI systems render these natively)."""
    checks = report["gates"] + report["regressions"]
    failures = sum(not c["passed"] for c in checks)
    cases = []
    for c in checks:
        body = "" if c["passed"] else f"<failure message={quoteattr(c['detail'])}>{escape(c['detail'])}</failure>"
        cases.append(f'    <testcase classname="llmkit.eval" name={quoteattr(c["name"])}>{body}</testcase>')
    header = f'  <testsuite name="llmkit-eval" tests="{len(checks)}" failures="{failures}" errors="0">'
    return (
        "\n".join(
            [
                '<?xml version="1.0" encoding="UTF-8"?>',
                "<testsuites>",
                header,
                *cases,
                "  </testsuite>",
                "</testsuites>",
            ]
        )
        + "\n"
    )
