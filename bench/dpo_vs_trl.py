"""DPO: llmkit vs TRL's DPOTrainer, same base model, pairs, LoRA adapters, beta and epoch, side by side.

    python bench/dpo_vs_trl.py                                     # a small run on a CPU
    python bench/dpo_vs_trl.py --size 1b --rows 2000 --max-length 1024   # one GPU, bf16

Each contender runs in its own process (so peak memory is its own): llmkit `finetune --task dpo --method lora`
(packed pairs, reference log-probs computed once before training), TRL's DPOTrainer with its defaults for a PEFT
model (the reference is the base with the adapters disabled, computed at every step), and TRL with
`precompute_ref_log_probs=True`. The pairs come from the built-in stories: the prompt is the first 1 to 8 sentences
of a story, the chosen answer the rest of it, the rejected answer the same sentences with their words shuffled, so
lengths spread as real data's do. Throughput counts real tokens (prompt + answer of both sequences of every pair, no
padding) over the wall time from the trainer's set-up (libraries already imported) to the end of training,
tokenization and the reference pass included; "loss" is the mean training loss over the last
quarter of the steps, so equal settings should give about equal losses. Needs `pip install trl` (a dev dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from _cli import scratch  # bench/_cli.py (run as python bench/NAME.py)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

SIZES = {"small": ["model.n_layers=4", "model.hidden_size=128", "model.n_heads=4", "model.n_kv_heads=2"],
         "1b": ["model.n_layers=22", "model.hidden_size=2048", "model.n_heads=32", "model.n_kv_heads=4",
                "model.intermediate_size=5632"]}  # fmt: skip
CONTENDERS = ("llmkit", "trl", "trl-precomputed")


def write_pairs(path: Path, n: int, seed: int) -> list[dict[str, str]]:
    from llmkit.data.corpus import STORIES, generate

    rng = random.Random(seed)
    rows = []
    for doc in generate(STORIES, n * 3, seed):
        sentences = [s.strip() + "." for s in doc.text.replace("\n", " ").split(".") if s.strip()]
        if len(sentences) < 3:
            continue
        cut = rng.randint(1, min(8, len(sentences) - 1))
        answer = sentences[cut:]
        shuffled = []
        for sentence in answer:
            words = sentence.rstrip(".").split()
            rng.shuffle(words)
            shuffled.append(" ".join(words) + ".")
        if shuffled == answer:
            continue
        rows.append({"prompt": " ".join(sentences[:cut]), "chosen": " " + " ".join(answer),
                     "rejected": " " + " ".join(shuffled)})  # fmt: skip
        if len(rows) == n:
            break
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=256, help="per sequence (prompt + answer)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step, both")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--only", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--llmkit-max-length", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_one(args)))
        return

    from llmkit.config import load_config
    from llmkit.data.tokenizer import train_bpe
    from llmkit.models import build_model

    cuda = torch.cuda.is_available()
    work = scratch("llmkit-dpo-")
    rows = write_pairs(work / "pairs.jsonl", args.rows, seed=0)
    tokenizer = train_bpe([r["prompt"] + r["chosen"] for r in rows], vocab_size=args.vocab)
    real = sum(len(tokenizer(r["prompt"] + r[k])["input_ids"]) + 1 for r in rows for k in ("chosen", "rejected"))
    # llmkit packs pairs into rows of 2 x finetune.max_length tokens: one row per step holding about --batch pairs
    # (a longer max_length than any sequence here truncates nothing), so both take about the same number of steps
    row_max_length = max(args.max_length, round(args.batch * real / len(rows) / 2))
    base_cfg = load_config(None, [*SIZES[args.size], f"model.context_length={row_max_length}"])
    torch.manual_seed(0)
    build_model(base_cfg.model, tokenizer).save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; base {args.size}; {len(rows)} pairs, "
          f"{real:,} real tokens; max length {args.max_length} per sequence; {'bf16' if cuda else 'fp32'}")  # fmt: skip
    print(f"llmkit: one packed row of up to {2 * row_max_length} tokens per step (about {args.batch} pairs); TRL: "
          f"{args.batch} pairs per step")  # fmt: skip
    results = {}
    for name in CONTENDERS:
        command = [sys.executable, __file__, "--only", name, "--work", str(work), "--size", args.size,
                   "--rows", str(args.rows), "--max-length", str(args.max_length), "--batch", str(args.batch),
                   "--llmkit-max-length", str(row_max_length)]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:<18}{r['seconds']:8.1f} s {real / r['seconds']:>10,.0f} real tokens/s  peak {r['peak_gib']:6.2f} "
              f"GiB  loss {r['loss']:.4f}")  # fmt: skip
    ours = results["llmkit"]
    for name in CONTENDERS[1:]:
        theirs = results[name]
        print(
            f"ratio llmkit / {name}: {theirs['seconds'] / ours['seconds']:.2f}x tokens/s, "
            f"{ours['peak_gib'] / theirs['peak_gib']:.2f}x peak memory"
        )


def run_one(args: argparse.Namespace) -> dict[str, float]:
    cuda = torch.cuda.is_available()
    if args.only == "llmkit":
        seconds, loss = run_llmkit(args.work, args, cuda)
    else:
        seconds, loss = run_trl(args.work, args, cuda, precompute=args.only == "trl-precomputed")
    if cuda:
        peak = torch.cuda.max_memory_reserved() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": seconds, "peak_gib": peak, "loss": loss}


def run_llmkit(work: Path, args: argparse.Namespace, cuda: bool) -> tuple[float, float]:
    import accelerate  # noqa: F401  (imported before the clock starts, as TRL's side imports them with trl)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from llmkit.config import load_config
    from llmkit.train.finetune import finetune

    cfg = load_config(None, [
        f"model.init_from={work / 'base'}", f"data.sources=[{work / 'pairs.jsonl'}]", "data.val_fraction=0",
        f"out_dir={work / 'llmkit'}", f"finetune.max_length={args.llmkit_max_length}", "finetune.task=dpo",
        "finetune.method=lora", "finetune.lora.r=16", "finetune.lora.alpha=32", "finetune.lora.dropout=0",
        "finetune.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
        "finetune.preference.beta=0.1", "train.max_epochs=1", "train.micro_batch_size=1",
        "train.eval_every=1000000", "optimizer.lr=5e-4", "logging.report_to=[]", "logging.plot=false",
        "logging.every_steps=1", "schedule.warmup_steps=0", f"precision.dtype={'bf16' if cuda else 'fp32'}",
    ])  # fmt: skip
    start = time.perf_counter()
    finetune(cfg)
    seconds = time.perf_counter() - start  # set-up, reference pass and training: what the user waits for
    losses = [json.loads(line)["loss"] for line in (work / "llmkit" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]  # fmt: skip
    tail = losses[-max(1, len(losses) // 4) :]
    return seconds, sum(tail) / len(tail)


def run_trl(work: Path, args: argparse.Namespace, cuda: bool, precompute: bool) -> tuple[float, float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16 if cuda else torch.float32)
    config = DPOConfig(
        output_dir=str(work / f"trl-{precompute}"), max_length=args.max_length, beta=0.1,
        per_device_train_batch_size=args.batch, num_train_epochs=1, learning_rate=5e-4, bf16=cuda,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not cuda, dataset_num_proc=1,
        precompute_ref_log_probs=precompute, lr_scheduler_type="cosine", warmup_steps=0,
    )  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    start = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)  # fmt: skip
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tail = losses[-max(1, len(losses) // 4) :]
    return seconds, sum(tail) / len(tail)


if __name__ == "__main__":
    main()
