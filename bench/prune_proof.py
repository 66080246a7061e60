"""Pruning and healing, measured on the built-in corpus whose entropy floor is known (docs/compression.md).

    python bench/prune_proof.py --work DIR     # DIR from bench/distill_proof.py (its data and 4x256 teacher)

The 4x256 model is pruned three ways with `llmkit prune` (width to 75% of its parameters, one block dropped, and a
mixed cut to about 55%), then each pruned model is healed for the same steps by distillation from the unpruned
model (`llmkit pretrain --init-from PRUNED --teacher ORIGINAL`) and, for comparison, by training on the data alone.
Every model is scored by `llmkit eval` (bits per character on the validation split, against the exact floor).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _cli import llmkit  # bench/_cli.py (run as python bench/NAME.py)

CUTS = {
    "width, 75% of the parameters": ["--target-params", "0.75"],
    "depth, one block dropped": ["--drop-layers", "1"],
    "mixed: 2 of 4 heads, 512 of 704 MLP, 192 of 256 hidden": ["--heads", "2", "--mlp", "512", "--hidden", "192"],
}
HEAL = ["train.micro_batch_size=16", "train.eval_batches=10", "optimizer.lr=1e-3", "schedule.warmup_steps=10",
        "logging.plot=false", "logging.report_to=[]"]  # fmt: skip


def bits(run: Path, data: Path) -> dict:
    report = run.with_name(run.name + ".eval.json")
    llmkit("eval", str(run), "--data", str(data), "--report", str(report))
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="bench/distill_proof.py's work directory")
    parser.add_argument("--steps", type=int, default=150, help="healing steps")
    args = parser.parse_args()
    data, teacher = args.work / "data", args.work / "teacher"
    if not (teacher / "final").is_dir():
        sys.exit(f"{teacher}: run bench/distill_proof.py --work {args.work} first (it trains the 4x256 model)")
    original = bits(teacher, data)
    rows = [("original 4x256", "-", original, None, None)]
    for index, (label, cut) in enumerate(CUTS.items()):
        pruned = args.work / f"pruned_{index}"
        llmkit("prune", str(teacher), "--out", str(pruned), "--data", str(data), "--overwrite", *cut)
        report = json.loads((pruned / "prune_report.json").read_text())
        healed = {}
        for how, extra in (("distilled", ["--teacher", str(teacher)]), ("data alone", [])):
            run = args.work / f"healed_{index}_{'kd' if extra else 'data'}"
            seconds = llmkit("pretrain", "--data", str(data), "--init-from", str(pruned), "--out", str(run),
                             "--max-steps", str(args.steps), "--overwrite", *extra,
                             *[f"--set={s}" for s in [*HEAL, f"train.eval_every={args.steps}"]])  # fmt: skip
            healed[how] = (bits(run, data), seconds)
        rows.append((label, f"{report['parameter_fraction']:.1%}", bits(pruned, data), healed["distilled"],
                     healed["data alone"]))  # fmt: skip
    floor = original["entropy_floor_bits_per_char"]
    print(f"\nbits/char on the validation split (floor {floor:.4f}); healing: {args.steps} steps\n")
    print("| model | parameters | pruned | healed by distillation | healed on data alone | distilled vs original |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, fraction, pruned, kd, alone in rows:
        if kd is None:
            print(f"| {label} | 100% | {pruned['bits_per_char']:.4f} | | | |")
            continue
        print(f"| {label} | {fraction} | {pruned['bits_per_char']:.4f} | {kd[0]['bits_per_char']:.4f} "
              f"({kd[1]:.0f} s) | {alone[0]['bits_per_char']:.4f} ({alone[1]:.0f} s) | "
              f"{kd[0]['bits_per_char'] / original['bits_per_char'] - 1:+.2%} |")  # fmt: skip


if __name__ == "__main__":
    main()
