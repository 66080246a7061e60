"""LoRA fine-tuning: llmkit vs TRL's SFTTrainer, same base model, rows, adapters, epoch and gradient
checkpointing, side by side, each in a process of its own.

    python bench/lora_vs_trl.py --size 1b --rows 3000 --max-length 1024      # one GPU, bf16 (issue 27's LoRA target)
    python bench/lora_vs_trl.py                                               # a small run on a CPU

Both fine-tune the same saved Llama-style base (`--size 1b`: recipes/llama-1b.yaml's shape; default: 4 x 128) for
one epoch on the same prompt/completion rows (stories of the built-in corpus, 1 to 12 per row, so lengths spread
as real data's do), LoRA r16 / alpha 32 on every linear projection, loss on the completions only, packing on for
both (TRL: packing with padding-free batches), `--batch` packed rows per step, bf16 on a GPU and float32 on a CPU,
gradient checkpointing on for both (TRL's default; `--no-checkpointing` turns it off for both), each tool's other
settings at their defaults (llmkit compiles its step on a GPU; TRL does not). Throughput counts real tokens (prompt
+ completion of every row, no padding) two ways: in all (over the training wall time, llmkit's first compilation
included) and in the steady state (the tokens of an average step over the median step time after the first fifth
of the steps: what a longer run gets; both log every step). Peak memory is CUDA's max allocated (what `llmkit plan`
estimates) and max reserved for each run, or the process's peak resident set on a CPU. Needs `pip install trl` (a
dev dependency; llmkit itself does not use it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from _cli import apart_arguments, report, run_apart, scratch  # noqa: E402  (bench/_cli.py)

SIZES = {"small": ["model.n_layers=4", "model.hidden_size=128", "model.n_heads=4", "model.n_kv_heads=2"],
         "1b": ["model.n_layers=22", "model.hidden_size=2048", "model.n_heads=32", "model.n_kv_heads=4",
                "model.intermediate_size=5632"]}  # fmt: skip
CONTENDERS = {"llmkit": "llmkit finetune (lora)", "trl": "TRL SFTTrainer (lora)"}


def write_rows(path: Path, n: int, seed: int) -> list[dict[str, str]]:
    from llmkit.data.corpus import STORIES, generate

    rng = random.Random(seed)
    stories = (doc.text for doc in generate(STORIES, n * 13, seed))
    rows = []
    for _ in range(n):
        texts = [next(stories) for _ in range(rng.randint(1, 12))]
        rows.append(
            {"prompt": f"Tell {len(texts)} stories, starting with: {texts[0][:40]}", "completion": " ".join(texts)}
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4, help="packed rows per step, both")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="gradient checkpointing for both (default: on, as TRL's SFTConfig has it)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=3600, help="seconds each contender may take")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated, of: llmkit, trl")
    apart_arguments(parser, CONTENDERS)
    args = parser.parse_args()
    if args.run:
        report(run_one(args), args.result)
        return
    contenders = args.contenders.split(",")
    if unknown := sorted(set(contenders) - set(CONTENDERS)):
        raise SystemExit(f"--contenders: unknown {', '.join(unknown)} (choose from {', '.join(CONTENDERS)})")

    from llmkit.config import load_config
    from llmkit.data.tokenizer import train_bpe
    from llmkit.models import build_model

    cuda = torch.cuda.is_available()
    work = scratch("llmkit-lora-")
    rows = write_rows(work / "rows.jsonl", args.rows, seed=0)
    tokenizer = train_bpe([r["prompt"] + " " + r["completion"] for r in rows[:2000]], vocab_size=args.vocab)
    base_cfg = load_config(None, [*SIZES[args.size], f"model.context_length={args.max_length}"])
    torch.manual_seed(0)
    build_model(base_cfg.model, tokenizer).save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    real_tokens = sum(len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) for r in rows)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; base {args.size}; {args.rows} rows, "
          f"{real_tokens:,} tokens; max length {args.max_length}; {args.batch} packed rows per step; "
          f"{'bf16' if cuda else 'fp32'}; gradient checkpointing {'on' if args.checkpointing else 'off'}")  # fmt: skip
    same = ["--work", str(work), "--size", args.size, "--rows", str(args.rows), "--max-length", str(args.max_length),
            "--batch", str(args.batch), "--checkpointing" if args.checkpointing else "--no-checkpointing"]  # fmt: skip
    results = {}
    for name in contenders:
        title = CONTENDERS[name]
        result = run_apart(str(Path(__file__).resolve()), name, same, timeout=args.timeout)
        if result is None:
            raise SystemExit(f"{name}: no result (its output is above)")
        results[name] = r = result
        memory = f"peak {r['allocated_gib']:6.2f} GiB allocated, {r['peak_gib']:6.2f} reserved" if cuda else (
            f"peak {r['peak_gib']:6.2f} GiB resident")  # fmt: skip
        r["steady"] = real_tokens / r["steps"] / r["step_seconds"]
        print(f"{title:<24}{r['seconds']:8.1f} s  {real_tokens / r['seconds']:>10,.0f} real tokens/s in all  "
              f"{r['steady']:>10,.0f} steady ({r['steps']} steps)   {memory}")  # fmt: skip
    if len(results) < len(CONTENDERS):
        return
    ours, theirs = results["llmkit"], results["trl"]
    key = "allocated_gib" if cuda else "peak_gib"
    print(f"ratio llmkit / TRL: {ours['steady'] / theirs['steady']:.2f}x tokens/s steady, "
          f"{theirs['seconds'] / ours['seconds']:.2f}x in all, {ours[key] / theirs[key]:.2f}x peak memory")  # fmt: skip


def run_one(args: argparse.Namespace) -> dict[str, float]:
    """One contender, in this process: its training seconds, steps, median step after the first fifth, and peak
    memory."""
    cuda = torch.cuda.is_available()
    seconds, ends = (run_llmkit if args.run == "llmkit" else run_trl)(args.work, args, cuda)
    steps = [b - a for a, b in itertools.pairwise([0.0, *ends])]
    result = {"seconds": seconds, "steps": len(steps), "step_seconds": statistics.median(steps[len(steps) // 5 :])}
    if cuda:
        return {**result, "peak_gib": torch.cuda.max_memory_reserved() / 2**30,
                "allocated_gib": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
    return {**result, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


Timed = tuple[float, list[float]]  # the training's seconds, and when each step ended (seconds into the training)


def run_llmkit(work: Path, args: argparse.Namespace, cuda: bool) -> Timed:
    from llmkit.config import load_config
    from llmkit.train.finetune import finetune

    cfg = load_config(None, [
        f"model.init_from={work / 'base'}", f"data.sources=[{work / 'rows.jsonl'}]", "data.val_fraction=0",
        f"out_dir={work / 'llmkit'}", f"finetune.max_length={args.max_length}", "finetune.method=lora",
        "finetune.lora.r=16", "finetune.lora.alpha=32", "finetune.lora.dropout=0", "train.max_epochs=1",
        f"train.micro_batch_size={args.batch}", "train.eval_every=1000000", "optimizer.lr=2e-4",
        "logging.report_to=[]", "logging.plot=false", f"precision.dtype={'bf16' if cuda else 'fp32'}",
        f"train.gradient_checkpointing={args.checkpointing}", "logging.every_steps=1",
    ])  # fmt: skip
    seconds = finetune(cfg).seconds
    records = [json.loads(line) for line in (work / "llmkit" / "metrics.jsonl").read_text().splitlines()]
    return seconds, [r["elapsed_s"] for r in records if "loss" in r]


def run_trl(work: Path, args: argparse.Namespace, cuda: bool) -> Timed:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Clock(TrainerCallback):
        """When each step ended (logging every step reads the loss, as llmkit's does, so the device is synchronized)."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args_, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.ends.append(time.perf_counter())

    rows = [json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16 if cuda else torch.float32)
    config = SFTConfig(
        output_dir=str(work / "trl"), max_length=args.max_length, packing=True, padding_free=True,
        per_device_train_batch_size=args.batch, num_train_epochs=1, learning_rate=2e-4, bf16=cuda,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not cuda, dataset_num_proc=1,
        gradient_checkpointing=args.checkpointing,
    )  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    clock = Clock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora, callbacks=[clock])  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, [end - start for end in clock.ends]


if __name__ == "__main__":
    main()
