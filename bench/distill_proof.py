"""Distillation, proved on the built-in corpus whose entropy floor is known (docs/compression.md).

    python bench/distill_proof.py                 # about 12 minutes on 2 CPU cores
    python bench/distill_proof.py --steps 300 --teacher-steps 2000

A 4x256 teacher is pretrained close to the floor; the same 2x128 student (same initial weights, data order and
schedule) is then trained for S steps on the data alone, distilled from the teacher (forward KL, live teacher;
forward KL from a top-k cache; generalized JSD), and distilled for 70% of S steps. Every model is scored by
`llmkit eval` on the validation split: bits per character against the exact floor of those documents. Everything
runs through the CLI, as a user would; the table is printed in Markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _cli import llmkit, scratch  # bench/_cli.py (run as python bench/NAME.py)

MODEL = {
    "teacher": ["model.n_layers=4", "model.hidden_size=256", "model.n_heads=4", "model.n_kv_heads=2"],
    "student": ["model.n_layers=2", "model.hidden_size=128", "model.n_heads=4", "model.n_kv_heads=2"],
}
COMMON = ["model.context_length=128", "train.micro_batch_size=16", "train.eval_batches=10", "precision.dtype=fp32",
          "optimizer.lr=3e-3", "schedule.warmup_steps=20", "logging.plot=false",
          "logging.report_to=[]"]  # fmt: skip


def train(name: str, work: Path, role: str, steps: int, *extra: str) -> tuple[Path, float]:
    out = work / name
    sets = [f"--set={s}" for s in [*MODEL[role], *COMMON, f"train.eval_every={max(steps // 4, 1)}"]]
    seconds = llmkit("pretrain", "--data", str(work / "data"), "--out", str(out), "--max-steps", str(steps),
                     *sets, *extra)  # fmt: skip
    return out, seconds


def score(run: Path) -> dict:
    report = run.with_suffix(".eval.json")
    llmkit("eval", str(run), "--data", str(run.parent / "data"), "--report", str(report))
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="student steps S")
    parser.add_argument("--teacher-steps", type=int, default=1200)
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--work", type=Path, default=None, help="keep runs here (default: a temporary directory)")
    args = parser.parse_args()
    work = args.work or scratch("llmkit-distill-")
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data" / "manifest.json").is_file():
        llmkit("data-prep", "builtin:stories", "--out", str(work / "data"), "--vocab-size", "2048",
               "--block-size", "128", "--set", f"data.builtin_docs={args.docs}")  # fmt: skip
    teacher = work / "teacher"
    if not (teacher / "final").is_dir():
        train("teacher", work, "teacher", args.teacher_steps, "--set=optimizer.lr=2e-3")
    s, short = args.steps, max(1, round(0.7 * args.steps))
    kd = ["--teacher", str(teacher)]
    rows = [("teacher 4x256", teacher, args.teacher_steps, None)]
    for label, name, steps, extra in [
        ("student 2x128, data alone", "data", s, []),
        ("student 2x128, forward KL (live teacher)", "fkl", s, kd),
        (f"student 2x128, forward KL (top-{args.top_k} cache)", "fkl_topk", s,
         [*kd, f"--set=distill.top_k={args.top_k}"]),
        ("student 2x128, generalized JSD (beta 0.5)", "jsd", s, [*kd, "--set=distill.loss=jsd"]),
        ("student 2x128, data alone, 70% of the steps", "data_short", short, []),
        ("student 2x128, forward KL, 70% of the steps", "fkl_short", short, kd),
    ]:  # fmt: skip
        run, seconds = train(f"student_{name}", work, "student", steps, "--overwrite", *extra)
        rows.append((label, run, steps, seconds))
    floor = None
    print(f"\nbuilt-in stories, {args.docs:,} documents; bits/char on the validation split (`llmkit eval`)\n")
    print("| model | steps | bits/char | x floor | train time (2 CPU cores) |")
    print("|---|---:|---:|---:|---:|")
    for label, run, steps, seconds in rows:
        report = score(run)
        floor = report["entropy_floor_bits_per_char"]
        took = f"{seconds:.0f} s" if seconds is not None else "-"
        print(f"| {label} | {steps} | {report['bits_per_char']:.4f} | {report['bits_per_char_over_floor']:.4f} "
              f"| {took} |")  # fmt: skip
    print(f"| entropy floor of these documents | | {floor:.4f} | 1.0000 | |")
    if args.work:
        print(f"\nruns in {work}")


if __name__ == "__main__":
    main()
