"""SFT throughput: llmkit packed vs transformers.Trainer padded, on the same rows and the same base model.

Both train one epoch over the same chat rows, encoded by llmkit's SFT task (same tokens, same assistant-only labels),
from the same saved base model, on whatever device is present, one after the other, each in a process of its own.
Prints real-token throughput (padding does not count) of each, the ratio llmkit / Trainer, and llmkit's packing
efficiency (real tokens / slots).

    python bench/sft_packing.py [--rows 1500] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from _cli import apart_arguments, report, run_apart, scratch  # noqa: E402  (bench/_cli.py)

from llmkit.config import RunConfig, load_config  # noqa: E402
from llmkit.data.corpus import ANIMAL_COLORS, color_chats  # noqa: E402
from llmkit.data.templates import setup_chat_template  # noqa: E402
from llmkit.data.tokenizer import train_bpe  # noqa: E402
from llmkit.models import build_model  # noqa: E402
from llmkit.train.finetune import finetune  # noqa: E402
from llmkit.train.tasks import TASKS  # noqa: E402


def write_rows(path: Path, n: int, seed: int) -> None:
    """Conversations of 1 to 8 question/answer turns: a wide spread of lengths, as real chat data has."""
    path.write_text("".join(json.dumps(row) + "\n" for row in color_chats(n, seed, max_turns=8)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="examples per Trainer batch; llmkit rows per batch / 2")
    apart_arguments(parser, ["trainer", "llmkit"])
    args = parser.parse_args()
    work = args.work or scratch("llmkit-bench-")
    cfg = bench_config(work, args)
    if args.run:
        report(run_trainer(cfg, work, args.batch) if args.run == "trainer" else run_llmkit(cfg, work), args.result)
        return
    write_rows(work / "chat.jsonl", args.rows, seed=0)
    # One base model for both: a 4 x 128 Llama with a BPE tokenizer, saved like any HF model.
    texts = [f"What color is the {a}? The {a} is {c}." for a, c in ANIMAL_COLORS.items()] * 50
    tokenizer = train_bpe(texts, vocab_size=512)
    base_cfg = load_config(None, ["model.n_layers=4", "model.hidden_size=128", "model.n_heads=4",
                                  f"model.context_length={args.max_length}"])  # fmt: skip
    torch.manual_seed(0)
    build_model(base_cfg.model, tokenizer).save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")

    same = ["--work", str(work), "--rows", str(args.rows), "--max-length", str(args.max_length),
            "--batch", str(args.batch)]  # fmt: skip
    results = {}
    for name in ("trainer", "llmkit"):
        results[name] = run_apart(str(Path(__file__).resolve()), name, same, timeout=3600)
        if results[name] is None:
            raise SystemExit(f"{name}: no result (its output is above)")
    trainer, ours = results["trainer"], results["llmkit"]
    llmkit_rate, trainer_rate = ours["tokens"] / ours["seconds"], trainer["tokens"] / trainer["seconds"]
    print(f"rows: {args.rows}, max length {args.max_length}, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"transformers.Trainer (padded):  {trainer_rate:>8,.0f} real tokens/s  ({trainer['seconds']:.1f}s, "
          f"padding efficiency {trainer['efficiency']:.3f})")  # fmt: skip
    print(f"llmkit finetune (packed):       {llmkit_rate:>8,.0f} real tokens/s  ({ours['seconds']:.1f}s, "
          f"packing efficiency {ours['efficiency']:.3f})")  # fmt: skip
    print(f"ratio llmkit / Trainer: {llmkit_rate / trainer_rate:.2f}x")


def bench_config(work: Path, args: argparse.Namespace) -> RunConfig:
    return load_config(None, [
        f"model.init_from={work / 'base'}", f"data.sources=[{work / 'chat.jsonl'}]", "data.val_fraction=0.02",
        f"out_dir={work / 'llmkit'}", f"finetune.max_length={args.max_length}", "train.max_epochs=1",
        f"train.micro_batch_size={max(1, args.batch // 2)}", "train.eval_every=100000", "train.eval_batches=1",
        "optimizer.lr=1e-3", "logging.report_to=[]", "logging.plot=false",
    ])  # fmt: skip


def run_llmkit(cfg: RunConfig, work: Path) -> dict[str, float]:
    result = finetune(cfg)
    efficiency = json.loads((work / "llmkit" / "data_stats.json").read_text())["efficiency"]
    return {"tokens": result.tokens, "seconds": result.seconds, "efficiency": efficiency}


def run_trainer(cfg: RunConfig, work: Path, batch: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    setup_chat_template(tokenizer, "chatml")
    data = TASKS["sft"].load_data(cfg, tokenizer)  # the very same encoded rows llmkit trains on
    model = AutoModelForCausalLM.from_pretrained(work / "base")
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    rows = [{"input_ids": e.ids.tolist(), "labels": e.labels.tolist()} for e in data.train]

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        pad = tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([f["input_ids"] + [pad] * (width - len(f["input_ids"])) for f in features]),
            "labels": torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features]),
            "attention_mask": torch.tensor(
                [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]
            ),  # fmt: skip
        }

    arguments = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=1e-3,
        lr_scheduler_type="cosine", weight_decay=0.1, save_strategy="no", report_to=[], logging_steps=50,
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(model=model, args=arguments, train_dataset=rows, data_collator=collate)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    real = sum(len(r["input_ids"]) for r in rows)
    # Padding efficiency of the Trainer's batches (real tokens / padded slots), on one draw of its shuffle.
    batches = list(trainer.get_train_dataloader().batch_sampler)
    slots = sum(max(len(rows[i]["input_ids"]) for i in batch) * len(batch) for batch in batches)
    return {"tokens": real, "seconds": seconds, "efficiency": real / slots}


if __name__ == "__main__":
    main()
