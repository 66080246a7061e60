"""GRPO, proved on answers a program can check (docs/rl.md).

    python bench/grpo_proof.py                  # a few minutes on 2 CPU cores
    python bench/grpo_proof.py --rl-steps 120

The built-in corpus gives every animal one color ("What color is the fox?" / "The fox is yellow."). A tiny model
is pretrained on the built-in stories and fine-tuned on a few color chats: it answers in the right form, mostly
with the wrong color. From there the same budget of optimizer steps is spent two ways, each from the same start:

* GRPO (`--task grpo`), rewarded by a task file that checks the color (match: contains);
* SFT on the rejected-sample-free rows: the start model's own sampled answers to the same prompts, the wrong ones
  dropped (rejection-sampling fine-tuning), the usual no-RL alternative when only a checker is at hand.

Every model is scored by `llmkit eval --tasks` with the same task file: greedy answers to every animal's question.
The task is a lookup (each animal has one color), so the scored questions are the trained ones, answered greedily
rather than sampled. Everything runs through the CLI, as a user would; the table is printed in Markdown.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _cli import llmkit  # bench/_cli.py (run as python bench/NAME.py)

from llmkit.data.corpus import ANIMAL_COLORS, color_chats

TASK = """name: colors
kind: generation
data: animals.jsonl
chat: true
prompt: "What color is the {animal}?"
answer_field: color
match: contains
max_new_tokens: 16
"""
TINY = ["model.n_layers=2", "model.hidden_size=64", "model.n_heads=4", "model.n_kv_heads=2", "model.context_length=64"]


def score(model: Path, work: Path) -> float:
    report = model.parent / f"{model.name}.eval.json"
    llmkit("eval", str(model), "--tasks", str(work / "colors.yaml"), "--report", str(report))
    return float(json.loads(report.read_text())["metrics"]["colors.contains"])


def finetune(
    work: Path, name: str, base: Path, data: Path, steps: int, *extra: str, micro: int = 4
) -> tuple[Path, float]:
    out = work / name
    seconds = llmkit("finetune", "--model", str(base), "--data", str(data), "--out", str(out), "--max-steps",
                     str(steps), "--max-length", "64", "--micro-batch-size", str(micro), "--set", "logging.plot=false",
                     "--set", "logging.report_to=[]", "--set", "train.eval_every=1000", *extra)  # fmt: skip
    return out, seconds


def rejection_rows(start: Path, work: Path, samples: int) -> tuple[Path, int]:
    """The start model's sampled answers to every animal's question, the wrong ones dropped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(start)
    model = AutoModelForCausalLM.from_pretrained(start).eval()
    torch.manual_seed(0)
    kept = []
    for animal, color in ANIMAL_COLORS.items():
        question = [{"role": "user", "content": f"What color is the {animal}?"}]
        prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt")
        ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
        with torch.no_grad():
            out = model.generate(input_ids=ids, do_sample=True, max_new_tokens=16, num_return_sequences=samples,
                                 top_k=0,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        for row in out[:, ids.shape[1] :]:
            answer = tokenizer.decode(row, skip_special_tokens=True).strip()
            if color in answer.lower():
                kept.append({"messages": [*question, {"role": "assistant", "content": answer}]})
    path = work / "accepted.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    return path, len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rl-steps", type=int, default=400)
    parser.add_argument("--sft-steps", type=int, default=200, help="the start model's own SFT on color chats")
    parser.add_argument("--generations", type=int, default=16)
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / "colors.yaml").write_text(TASK)
        animals = [{"animal": a, "color": c} for a, c in ANIMAL_COLORS.items()]
        (work / "animals.jsonl").write_text("".join(json.dumps(row) + "\n" for row in animals))
        (work / "chats.jsonl").write_text("".join(json.dumps(row) + "\n" for row in color_chats(400, 0, 1)))
        prompts = [{"messages": [{"role": "user", "content": f"What color is the {a}?"}], "animal": a, "color": c}
                   for a, c in ANIMAL_COLORS.items() for _ in range(4)]  # fmt: skip
        (work / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prompts))
        llmkit("data-prep", "builtin:stories", "--out", str(work / "data"), "--vocab-size", "400", "--block-size",
               "32", "--set", "data.builtin_docs=1500")  # fmt: skip
        llmkit("pretrain", "--data", str(work / "data"), "--out", str(work / "base"), "--max-steps", "60",
               "--micro-batch-size", "8", "--lr", "3e-3", *[f"--set={s}" for s in TINY],
               "--set", "logging.plot=false")  # fmt: skip
        start, _ = finetune(work, "start", work / "base" / "final", work / "chats.jsonl", args.sft_steps, "--lr",
                            "3e-3", micro=8)  # fmt: skip
        start = start / "final"
        rl, rl_seconds = finetune(
            work, "grpo", start, work / "prompts.jsonl", args.rl_steps, "--task", "grpo", "--reward",
            str(work / "colors.yaml"), "--lr", "1e-3", "--set", f"finetune.grpo.generations={args.generations}",
            "--set", "finetune.grpo.max_new_tokens=16", "--set", "data.val_fraction=0",
        )  # fmt: skip
        accepted, kept = rejection_rows(start, work, args.generations)
        sft, sft_seconds = finetune(work, "rejection-sft", start, accepted, args.rl_steps, "--lr", "1e-3",
                                    "--set", "data.val_fraction=0")  # fmt: skip
        rows = [
            ("start (SFT on color chats)", score(start, work), None),
            (f"GRPO, {args.rl_steps} steps", score(rl / "final", work), rl_seconds),
            (f"SFT on {kept} accepted samples, {args.rl_steps} steps", score(sft / "final", work), sft_seconds),
        ]
        print("| model | held-out color accuracy (`llmkit eval --tasks`) | wall time |")
        print("| --- | ---: | ---: |")
        for name, accuracy, seconds in rows:
            print(f"| {name} | {accuracy:.3f} | {f'{seconds:.0f} s' if seconds else '-'} |")


if __name__ == "__main__":
    main()
