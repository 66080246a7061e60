"""Distillation on SFT rows: llmkit `finetune --task distill` vs TRL's GKDTrainer, same teacher, student, rows, steps.

    python bench/distill_vs_trl.py --work DIR      # DIR from bench/distill_proof.py (its data and models)

The teacher is the 4x256 model fine-tuned on 240 color chats (made here if absent); the student the 2x128 stories
model; both sides distill with forward KL (GKD beta 0) at temperature 1 on the assistant tokens, offline (GKD lmbda 0:
the data's answers) and half on-policy (lmbda 0.5 / distill.on_policy 0.5: the student's own samples), for the same
number of steps of 8 rows, learning rate 1e-3, fp32, one process each. Time is the training call's wall time with
libraries imported; "loss" is the mean of the last quarter of the logged training losses (per answer token).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _cli import llmkit  # bench/_cli.py (run as python bench/NAME.py)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def run_llmkit(
    work: Path, rows: Path, teacher: Path, student: Path, steps: int, on_policy: float
) -> tuple[float, float]:
    out = work / f"distill_llmkit_{on_policy}"
    llmkit("finetune", "--model", str(student), "--data", str(rows), "--out", str(out), "--task", "distill",
           "--teacher", str(teacher), "--max-steps", str(steps), "--micro-batch-size", "8", "--max-length", "64",
           "--lr", "1e-3", "--no-packing", "--overwrite", "--set", f"distill.on_policy={on_policy}",
           "--set", "logging.every_steps=1", "--set", f"train.eval_every={steps}", "--set", "logging.plot=false",
           "--set", "logging.report_to=[]", "--set", "schedule.min_lr_ratio=0")  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    summary = json.loads((out / "summary.json").read_text())
    return float(summary["seconds"]), _tail(losses)


def run_trl(work: Path, rows: Path, teacher: Path, student: Path, steps: int, lmbda: float) -> tuple[float, float]:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from llmkit.data.templates import setup_chat_template
    from llmkit.data.tokenizer import load_tokenizer
    from llmkit.models import padded_vocab_size

    tokenizer = load_tokenizer(student)
    setup_chat_template(tokenizer, "chatml")
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    model.resize_token_embeddings(padded_vocab_size(len(tokenizer)))
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher / "final", dtype=torch.float32)
    args = GKDConfig(output_dir=str(work / f"distill_trl_{lmbda}"), per_device_train_batch_size=8, max_steps=steps,
                     learning_rate=1e-3, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no",
                     report_to=[], use_cpu=True, max_length=64, lmbda=lmbda, beta=0.0, temperature=1.0,
                     max_new_tokens=16, bf16=False, seed=0, disable_tqdm=True)  # fmt: skip
    trainer = GKDTrainer(model=model, teacher_model=teacher_model, args=args, processing_class=tokenizer,
                         train_dataset=load_dataset("json", data_files=str(rows), split="train"))  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return seconds, _tail(losses)


def _tail(losses: list[float]) -> float:
    tail = losses[-max(len(losses) // 4, 1) :]
    return sum(tail) / len(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="bench/distill_proof.py's work directory")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work, rows = args.work, args.work / "chat.jsonl"
    teacher, student = work / "chat_teacher", work / "student_data" / "final"
    if args.only:
        name, share = args.only.split(":")
        runner = run_llmkit if name == "llmkit" else run_trl
        print(json.dumps(runner(work, rows, teacher, student, args.steps, float(share))))
        return
    if not rows.is_file():
        from llmkit.data.corpus import color_chats

        rows.write_text("".join(json.dumps(row) + "\n" for row in color_chats(240, 0)))
    if not (teacher / "final").is_dir():
        llmkit("finetune", "--model", str(work / "teacher"), "--data", str(rows), "--out", str(teacher),
               "--max-steps", "300", "--micro-batch-size", "8", "--max-length", "64", "--lr", "2e-3")  # fmt: skip
    print(f"teacher {teacher}, student {student}, {args.steps} steps of 8 rows, CPU fp32")
    for share in (0.0, 0.5):
        results = {}
        for name in ("llmkit", "trl"):
            out = subprocess.run([sys.executable, __file__, "--work", str(work), "--steps", str(args.steps),
                                  "--only", f"{name}:{share}"], capture_output=True, text=True)  # fmt: skip
            if out.returncode != 0:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"on-policy {share:.1f}  {name:<7} {results[name][0]:7.1f} s  loss {results[name][1]:.4f}")
        print(f"on-policy {share:.1f}  ratio llmkit / trl: {results['trl'][0] / results['llmkit'][0]:.2f}x speed")


if __name__ == "__main__":
    main()
