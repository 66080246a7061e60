"""Low-rank factorization against rank: size, speed and bits per character (docs/compression.md).

    python bench/lowrank_ranks.py --work DIR     # DIR from bench/distill_proof.py (its data and 4x256 model)

Each row is `llmkit factor` at one rank or energy share, unhealed. Size is the safetensors on disk; speed is the
steady-state forward throughput in PyTorch (batches of 16 x 128 tokens, after 3 warm-up batches, on the CPU this
runs on); bits/char is `llmkit eval` on the validation split against the exact floor.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _cli import llmkit  # bench/_cli.py (run as python bench/NAME.py)


def speed(model_dir: Path, batches: int = 12) -> float:
    from llmkit.models import load_trained_model

    model = load_trained_model(model_dir).eval()
    ids = torch.randint(0, 500, (16, 128))
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=ids)
        start = time.perf_counter()
        for _ in range(batches):
            model(input_ids=ids)
    return batches * ids.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    from llmkit.models import load_trained_model

    data, source = args.work / "data", args.work / "teacher" / "final"
    rows = [("original", source)]
    for flag, value in [("--energy", "0.95"), ("--energy", "0.9"), ("--energy", "0.8"), ("--rank", "96"),
                        ("--rank", "64"), ("--rank", "32"), ("--rank", "16")]:  # fmt: skip
        out = args.work / f"lowrank_{flag[2:]}_{value}"
        llmkit("factor", str(source), "--out", str(out), flag, value, "--overwrite")
        rows.append((f"{flag[2:]} {value}", out))
    print("\n| model | parameters | size (MiB) | forward tokens/s (PyTorch, CPU) | bits/char | x floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, path in rows:
        report_path = args.work / f"{path.name}.eval.json"
        llmkit("eval", str(path), "--data", str(data), "--report", str(report_path))
        report = json.loads(report_path.read_text())
        size = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20
        params = sum(p.numel() for p in {id(p): p for p in load_trained_model(path).parameters()}.values())
        print(f"| {label} | {params:,} | {size:.2f} | {speed(path):,.0f} | {report['bits_per_char']:.4f} "
              f"| {report['bits_per_char_over_floor']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
