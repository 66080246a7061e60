"""GRPO, proved on answers a program can check (docs/rl.md).

    python bench/grpo_proof.py                  # the lookup: about 3 minutes on 2 CPU cores
    python bench/grpo_proof.py --proof facts    # three facts per answer, held-out questions: about 6 minutes
    python bench/grpo_proof.py --work runs/     # keep the runs
    python bench/grpo_proof.py --engine vllm    # GRPO's answers sampled by vLLM (installed apart)

The built-in corpus gives every animal one color ("What color is the fox?" / "The fox is yellow."). Nothing before
the reward tells which: a tiny model is pretrained on the built-in stories plus sentences "The fox is navy." with
random colors (the words and the form), then fine-tuned on chats whose answers name random colors (the chat form and
copying the animals). From there the same optimizer steps, rows per step and learning rate are spent on GRPO and on
SFT of the rejected-sample-free rows (rejection-sampling fine-tuning, the usual no-RL alternative when only a checker
is at hand: the start model's own sampled answers, the wrong ones dropped by the same check), each from the same
start. Every model is scored by `llmkit eval --tasks` with the task file GRPO is rewarded by (`match: exact`).

* `lookup`: "What color is the fox?". The start answers "The fox is <some color>.", right about one time in
  sixteen. GRPO is rewarded by the task file alone. The rejection-sampled rows are drawn once with GRPO's group size
  per prompt row (one epoch of GRPO's sampling), and again with as many answers as the whole GRPO run drew. A lookup
  has nothing held out: the scored questions are the trained ones, answered greedily rather than sampled. A looser
  check is gamed: with `match: contains` on the color alone, a model learned to list several colors.
* `facts`: "What colors are the fox, the owl and the cat?" / "The fox is yellow, the owl is blue, the cat is red.",
  scored on 64 held-out triples (no trained question among them). The start (fine-tuned longer, so that its sampled
  answers copy the asked animals too) is right one time in 4,096. GRPO is rewarded by the task file and by the share
  of the three facts stated rightly (0 for an answer of another form), held near the start by a KL (`beta: 0.1`);
  the rejected-sample-free rows are the exactly right ones among as many answers as GRPO drew, and, a stronger
  baseline that uses the graded reward too, the best-scored of `--generations` answers to each training question.

Everything runs through the CLI, as a user would; the table is printed in Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _cli import llmkit  # bench/_cli.py (run as python bench/NAME.py)

from llmkit.data.corpus import ANIMAL_COLORS

ANIMALS, COLORS = list(ANIMAL_COLORS), list(ANIMAL_COLORS.values())
TASK = """name: colors
kind: generation
data: {data}
chat: true
prompt: "{{question}}"
answer_field: answer
match: exact
max_new_tokens: {tokens}
"""
FACTS_REWARD = '''
import re


def facts(prompt, answer, row):
    """The share of the asked animals whose color the answer states rightly, in the asked order; 0 for an answer of
    another form (a fact too many or too few, or words after the last one)."""
    want = row["facts"]
    got = re.findall(r"the (\\w+) is (\\w+)", answer.lower())
    if len(got) != len(want) or not answer.strip().endswith("."):
        return 0.0
    return sum(tuple(g) == tuple(w) for g, w in zip(got, want)) / len(want)
'''
QUIET = ["--set", "logging.plot=false", "--set", "logging.report_to=[]", "--set", "train.eval_every=100000"]
TINY = ["model.n_layers=2", "model.hidden_size=64", "model.n_heads=4", "model.n_kv_heads=2"]


class Proof:
    """One proof's questions and answers: `lookup` (one fact, the trained questions scored) or `facts` (three facts
    per answer, held-out questions scored)."""

    def __init__(self, name: str) -> None:
        self.name, rng = name, random.Random(0)
        self.count = 1 if name == "lookup" else 3
        self.length, self.tokens = (64, 16) if name == "lookup" else (96, 32)
        # Three animals are copied reliably when sampled only after longer fine-tuning (600 steps: half of them), and
        # GRPO keeps that copying only when held near the start by a KL (without: 0.50 held-out, copying at 0.81)
        self.start_steps, self.beta = (600, "0") if name == "lookup" else (2000, "0.1")
        if name == "lookup":
            self.train = [[a] for a in ANIMALS] * 4
            self.scored = [[a] for a in ANIMALS]
        else:
            self.train = [rng.sample(ANIMALS, 3) for _ in range(256)]
            seen = {tuple(t) for t in self.train}
            self.scored = [t for t in (rng.sample(ANIMALS, 3) for _ in range(300)) if tuple(t) not in seen][:64]
        self.rng = rng

    def question(self, animals: list[str]) -> str:
        if len(animals) == 1:
            return f"What color is the {animals[0]}?"
        return "What colors are the " + ", the ".join(animals[:-1]) + f" and the {animals[-1]}?"

    @staticmethod
    def answer(animals: list[str], colors: list[str]) -> str:
        return ", ".join(f"the {a} is {c}" for a, c in zip(animals, colors, strict=True)).capitalize() + "."

    def row(self, animals: list[str]) -> dict[str, Any]:
        colors = [ANIMAL_COLORS[a] for a in animals]
        return {"question": self.question(animals), "answer": self.answer(animals, colors),
                "facts": [[a, c] for a, c in zip(animals, colors, strict=True)]}  # fmt: skip

    def guess(self) -> dict[str, Any]:
        """A chat in the right form whose colors are random (the start model's fine-tuning)."""
        animals = self.rng.sample(ANIMALS, self.count)
        answer = self.answer(animals, [self.rng.choice(COLORS) for _ in animals])
        return {"messages": [ask(self.question(animals)), {"role": "assistant", "content": answer}]}


def ask(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_inputs(work: Path, proof: Proof) -> None:
    """The task file and the rows: random-color facts and chats (form, no mapping), GRPO's prompts, the scored
    questions."""
    (work / "colors.yaml").write_text(TASK.format(data="scored.jsonl", tokens=proof.tokens))
    (work / "proof_rewards.py").write_text(FACTS_REWARD)
    write_jsonl(work / "scored.jsonl", [proof.row(t) for t in proof.scored])
    rng = proof.rng
    facts = [" ".join(f"The {rng.choice(ANIMALS)} is {rng.choice(COLORS)}." for _ in range(6)) for _ in range(1500)]
    write_jsonl(work / "facts.jsonl", [{"text": text} for text in facts])
    write_jsonl(work / "guesses.jsonl", [proof.guess() for _ in range(400 * proof.count)])
    write_jsonl(work / "prompts.jsonl", [{"messages": [ask(proof.question(t))], **proof.row(t)} for t in proof.train])


def score(model: Path, work: Path) -> float:
    report = model.parent / f"{model.name}.eval.json"
    llmkit("eval", str(model), "--tasks", str(work / "colors.yaml"), "--report", str(report))
    return float(json.loads(report.read_text())["metrics"]["colors.exact_match"])


def finetune(work: Path, proof: Proof, name: str, data: Path, steps: int, micro: int, lr: str, *extra: str) -> float:
    where = ["--model", str(work / "start" / "final"), "--data", str(data), "--out", str(work / name)]
    sizes = ["--max-steps", str(steps), "--max-length", str(proof.length), "--micro-batch-size", str(micro)]
    return llmkit("finetune", *where, *sizes, "--lr", lr, *QUIET, "--set", "data.val_fraction=0", *extra)


def rejection_rows(work: Path, proof: Proof, per_prompt: int, keep: str, name: str) -> tuple[Path, int, float]:
    """The start model's sampled answers to each distinct training question, `per_prompt` of them: the ones GRPO's
    task file checks right (`keep="right"`), or the best-scored by the facts reward (`keep="best"`). Returns the
    rows, how many were kept, and the seconds sampling took."""
    import torch
    from proof_rewards import facts  # (written into the work directory, the working directory)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.train.rewards import load_rewards

    start = work / "start" / "final"
    check = load_rewards([str(work / "colors.yaml")])[0]  # the very check GRPO is rewarded by
    tokenizer = AutoTokenizer.from_pretrained(start)
    model = AutoModelForCausalLM.from_pretrained(start).eval()
    torch.manual_seed(0)
    began, kept = time.perf_counter(), []
    questions = {proof.question(t): proof.row(t) for t in proof.train}
    for text, row in questions.items():
        ids = tokenizer.apply_chat_template([ask(text)], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]  # fmt: skip
        answers: list[str] = []
        for done in range(0, per_prompt, 256):
            with torch.no_grad():
                out = model.generate(input_ids=ids, do_sample=True, top_k=0, max_new_tokens=proof.tokens,
                                     num_return_sequences=min(256, per_prompt - done))  # fmt: skip
            answers += [tokenizer.decode(r, skip_special_tokens=True).strip() for r in out[:, ids.shape[1] :]]
        if keep == "right":
            right = check.score([""] * len(answers), answers, [row] * len(answers), [text] * len(answers))
            chosen = [a for a, r in zip(answers, right, strict=True) if r]
        else:
            chosen = [max(answers, key=lambda a, row=row: facts(text, a, row))]
        kept += [{"messages": [ask(text), {"role": "assistant", "content": a}]} for a in chosen]
    seconds = time.perf_counter() - began
    return write_jsonl(work / f"{name}.jsonl", kept), len(kept), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proof", choices=["lookup", "facts"], default="lookup")
    parser.add_argument("--rl-steps", type=int, help="default: 200 (lookup), 300 (facts)")
    parser.add_argument("--prompts-per-step", type=int, help="default: 16 (lookup), 32 (facts)")
    parser.add_argument("--generations", type=int, help="default: 16 (lookup), 8 (facts)")
    parser.add_argument(
        "--lr", help="GRPO's and the rejection-sampling SFT's learning rate; default: 1e-3 (lookup), 1.5e-3 (facts)"
    )
    parser.add_argument("--engine", choices=["generate", "vllm"], default="generate",
                        help="GRPO's sampler (vllm: installed apart; the model gets heads of 32, which vLLM's CPU "
                        "attention needs)")  # fmt: skip
    parser.add_argument("--vllm-correction", default="sequence_mask",
                        help="engine vllm: finetune.grpo.vllm_correction (none: no importance weight)")  # fmt: skip
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    proof = Proof(args.proof)
    lookup = args.proof == "lookup"
    steps = args.rl_steps or (200 if lookup else 300)
    micro = args.prompts_per_step or (16 if lookup else 32)
    generations = args.generations or (16 if lookup else 8)
    lr = args.lr or ("1e-3" if lookup else "1.5e-3")
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        os.chdir(work)  # the facts reward, module:function, is imported from the working directory
        sys.path.insert(0, str(work))
        write_inputs(work, proof)
        llmkit("data-prep", "builtin:stories", str(work / "facts.jsonl"), "--out", str(work / "data"),
               "--vocab-size", "1000", "--block-size", "32", "--set", "data.builtin_docs=1500")  # fmt: skip
        heads = ["model.n_heads=2", "model.n_kv_heads=1"] if args.engine == "vllm" else []
        tiny = [*TINY, *heads, f"model.context_length={proof.length}"]
        llmkit("pretrain", "--data", str(work / "data"), "--out", str(work / "base"), "--max-steps", "100",
               "--micro-batch-size", "8", "--lr", "3e-3", *[f"--set={s}" for s in tiny], *QUIET)  # fmt: skip
        llmkit("finetune", "--model", str(work / "base" / "final"), "--data", str(work / "guesses.jsonl"),
               "--out", str(work / "start"), "--max-steps", str(proof.start_steps), "--max-length", str(proof.length),
               "--micro-batch-size", "8", "--lr", "3e-3", *QUIET)  # fmt: skip
        rewards = ["--reward", str(work / "colors.yaml")]
        rewards += [] if lookup else ["--reward", "proof_rewards:facts"]
        rl_seconds = finetune(work, proof, "grpo", work / "prompts.jsonl", steps, micro, lr, "--task", "grpo",
                              *rewards, "--set", f"finetune.grpo.generations={generations}",
                              "--set", f"finetune.grpo.max_new_tokens={proof.tokens}",
                              "--set", f"finetune.grpo.beta={proof.beta}",
                              "--set", f"finetune.grpo.engine={args.engine}",
                              "--set", f"finetune.grpo.vllm_correction={args.vllm_correction}")  # fmt: skip
        rows = [("start (random-color chats)", score(work / "start" / "final", work), "-")]
        sampler = " (sampled by vLLM)" if args.engine == "vllm" else ""
        rows.append((f"GRPO{sampler}, {steps} steps x {micro} prompts x {generations} answers",
                     score(work / "grpo" / "final", work), f"{rl_seconds:.0f} s"))  # fmt: skip
        distinct = len({proof.question(t) for t in proof.train})
        drawn = steps * micro * generations // distinct  # as many answers as GRPO drew
        baselines = [(len(proof.train) // distinct * generations, "right"), (drawn, "right")]
        baselines = baselines if lookup else [(drawn, "right"), (generations, "best")]
        for per_prompt, keep in baselines:
            name = f"rejection-{keep}-{per_prompt}"
            accepted, kept, sampling = rejection_rows(work, proof, per_prompt, keep, name)
            # (at least one row per micro-batch: the loader needs one whole batch per epoch)
            sft_seconds = finetune(work, proof, name, accepted, steps, min(micro, max(kept // 2, 1)), lr)
            what = "right" if keep == "right" else "best-scored (facts reward)"
            rows.append((f"SFT on the {kept:,} {what} of {per_prompt * distinct:,} sampled answers, {steps} steps",
                         score(work / name / "final", work), f"{sampling:.0f} s + {sft_seconds:.0f} s"))  # fmt: skip
        scored = "the trained questions" if lookup else f"{len(proof.scored)} held-out questions"
        print(f"| model | exact answers to {scored} (`llmkit eval --tasks`, greedy) | wall time |")
        print("| --- | ---: | ---: |")
        for name, accuracy, seconds in rows:
            print(f"| {name} | {accuracy:.3f} | {seconds} |")


if __name__ == "__main__":
    main()
