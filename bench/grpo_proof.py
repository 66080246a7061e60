"""GRPO, proved on answers a program can check (docs/rl.md).

    python bench/grpo_proof.py                  # about 4 minutes on 2 CPU cores
    python bench/grpo_proof.py --work runs/     # keep the runs

The built-in corpus gives every animal one color ("What color is the fox?" / "The fox is yellow."). Nothing before
the reward tells which: a tiny model is pretrained on the built-in stories plus sentences "The fox is navy." with
random colors (the words and the form), then fine-tuned on chats whose answers name a random color (the chat form and
copying the animal). It answers "The fox is <some color>.", right about one time in sixteen. From there the same
optimizer steps, rows per step and learning rate are spent two ways, each from the same start:

* GRPO (`--task grpo`), rewarded by a task file that checks the whole answer (`match: exact`). A looser check is
  gamed: with `match: contains` on the color alone, a model learned to list several colors;
* SFT on the rejected-sample-free rows (rejection-sampling fine-tuning, the usual no-RL alternative when only a
  checker is at hand): the start model's own sampled answers, the wrong ones dropped by the same check. Sampled once
  with GRPO's group size per prompt row (one epoch of GRPO's sampling), and again with as many answers as the whole
  GRPO run drew (`--rejection-samples-all`), so the figures say what online sampling adds.

Every model is scored by `llmkit eval --tasks` with the same task file: greedy answers to every animal's question.
The task is a lookup (each animal has one color), so the scored questions are the trained ones, answered greedily
rather than sampled. Everything runs through the CLI, as a user would; the table is printed in Markdown.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from _cli import llmkit  # bench/_cli.py (run as python bench/NAME.py)

from llmkit.data.corpus import ANIMAL_COLORS

TASK = """name: colors
kind: generation
data: animals.jsonl
chat: true
prompt: "What color is the {animal}?"
answer_field: answer
match: exact
max_new_tokens: 16
"""
TINY = ["model.n_layers=2", "model.hidden_size=64", "model.n_heads=4", "model.n_kv_heads=2", "model.context_length=64"]
QUIET = ["--set", "logging.plot=false", "--set", "logging.report_to=[]", "--set", "train.eval_every=100000"]
ROWS_PER_ANIMAL = 4


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def question(animal: str) -> dict[str, str]:
    return {"role": "user", "content": f"What color is the {animal}?"}


def write_inputs(work: Path) -> None:
    """The task file and the rows: random-color facts and chats (form, no mapping) and GRPO's prompts."""
    rng = random.Random(0)
    animals, colors = list(ANIMAL_COLORS), list(ANIMAL_COLORS.values())
    (work / "colors.yaml").write_text(TASK)
    write_jsonl(work / "animals.jsonl", [{"animal": a, "answer": f"The {a} is {c}."} for a, c in ANIMAL_COLORS.items()])
    facts = [" ".join(f"The {rng.choice(animals)} is {rng.choice(colors)}." for _ in range(6)) for _ in range(1500)]
    write_jsonl(work / "facts.jsonl", [{"text": text} for text in facts])
    guesses = []
    for animal in (rng.choice(animals) for _ in range(400)):
        answer = {"role": "assistant", "content": f"The {animal} is {rng.choice(colors)}."}
        guesses.append({"messages": [question(animal), answer]})
    write_jsonl(work / "guesses.jsonl", guesses)
    prompts = [{"messages": [question(a)], "answer": f"The {a} is {c}."} for a, c in ANIMAL_COLORS.items()]
    write_jsonl(work / "prompts.jsonl", prompts * ROWS_PER_ANIMAL)


def score(model: Path, work: Path) -> float:
    report = model.parent / f"{model.name}.eval.json"
    llmkit("eval", str(model), "--tasks", str(work / "colors.yaml"), "--report", str(report))
    return float(json.loads(report.read_text())["metrics"]["colors.exact_match"])


def finetune(work: Path, name: str, base: Path, data: Path, steps: int, micro: int, lr: str, *extra: str) -> float:
    where = ["--model", str(base), "--data", str(data), "--out", str(work / name)]
    sizes = ["--max-steps", str(steps), "--max-length", "64", "--micro-batch-size", str(micro), "--lr", lr]
    return llmkit("finetune", *where, *sizes, *QUIET, *extra)


def rejection_rows(start: Path, work: Path, per_animal: int, name: str) -> tuple[Path, int, float]:
    """The start model's sampled answers to every animal's question, the wrong ones dropped by GRPO's own check:
    the rows, how many were kept, and the seconds sampling took."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.train.rewards import load_rewards

    check = load_rewards([str(work / "colors.yaml")])[0]  # the very check GRPO is rewarded by
    tokenizer = AutoTokenizer.from_pretrained(start)
    model = AutoModelForCausalLM.from_pretrained(start).eval()
    torch.manual_seed(0)
    began, kept = time.perf_counter(), []
    for animal, color in ANIMAL_COLORS.items():
        ids = tokenizer.apply_chat_template([question(animal)], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]  # fmt: skip
        for start_at in range(0, per_animal, 256):
            with torch.no_grad():
                out = model.generate(input_ids=ids, do_sample=True, top_k=0, max_new_tokens=16,
                                     num_return_sequences=min(256, per_animal - start_at))  # fmt: skip
            answers = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, ids.shape[1] :]]
            rows = [{"answer": f"The {animal} is {color}."}] * len(answers)
            right = check.score([""] * len(answers), answers, rows, [animal] * len(answers))
            kept += [{"messages": [question(animal), {"role": "assistant", "content": a}]}
                     for a, r in zip(answers, right, strict=True) if r]  # fmt: skip
    seconds = time.perf_counter() - began
    return write_jsonl(work / f"{name}.jsonl", kept), len(kept), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rl-steps", type=int, default=200)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--generations", type=int, default=16)
    parser.add_argument("--lr", default="1e-3", help="GRPO's and the rejection-sampling SFT's learning rate")
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        write_inputs(work)
        llmkit("data-prep", "builtin:stories", str(work / "facts.jsonl"), "--out", str(work / "data"),
               "--vocab-size", "1000", "--block-size", "32", "--set", "data.builtin_docs=1500")  # fmt: skip
        llmkit("pretrain", "--data", str(work / "data"), "--out", str(work / "base"), "--max-steps", "100",
               "--micro-batch-size", "8", "--lr", "3e-3", *[f"--set={s}" for s in TINY], *QUIET)  # fmt: skip
        finetune(work, "start", work / "base" / "final", work / "guesses.jsonl", 600, 8, "3e-3")
        start = work / "start" / "final"
        steps, micro = args.rl_steps, args.prompts_per_step
        rl_seconds = finetune(
            work, "grpo", start, work / "prompts.jsonl", steps, micro, args.lr, "--task", "grpo", "--reward",
            str(work / "colors.yaml"), "--set", f"finetune.grpo.generations={args.generations}",
            "--set", "finetune.grpo.max_new_tokens=16", "--set", "data.val_fraction=0",
        )  # fmt: skip
        rows = [("start (random-color chats)", score(start, work), "-")]
        rows.append((f"GRPO, {steps} steps x {micro} prompts x {args.generations} answers",
                     score(work / "grpo" / "final", work), f"{rl_seconds:.0f} s"))  # fmt: skip
        drawn = steps * micro * args.generations // len(ANIMAL_COLORS)
        for per_animal in (ROWS_PER_ANIMAL * args.generations, drawn):
            name = f"rejection-{per_animal}"
            accepted, kept, sampling = rejection_rows(start, work, per_animal, name)
            sft_seconds = finetune(work, name, start, accepted, steps, micro, args.lr, "--set", "data.val_fraction=0")
            rows.append((f"SFT on the {kept} right of {per_animal * len(ANIMAL_COLORS)} sampled answers, {steps} steps",
                         score(work / name / "final", work), f"{sampling:.0f} s + {sft_seconds:.0f} s"))  # fmt: skip
        print("| model | color accuracy (`llmkit eval --tasks`, greedy, match: exact) | wall time |")
        print("| --- | ---: | ---: |")
        for name, accuracy, seconds in rows:
            print(f"| {name} | {accuracy:.3f} | {seconds} |")


if __name__ == "__main__":
    main()
