"""Pretraining throughput: llmkit's loop vs transformers.Trainer, same model, data, steps and optimizer.

Both train the same tiny Llama from the same seed on the same packed blocks of the built-in corpus, on
whatever device is present (CPU here), one after the other, each in a process of its own (nothing one loads or
patches reaches the other). Prints tokens/s of each and the ratio llmkit / Trainer.

    python bench/pretrain_vs_trainer.py [--steps 150] [--layers 4] [--hidden 128]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from _cli import apart_arguments, report, run_apart, scratch  # noqa: E402  (bench/_cli.py)

from llmkit.config import RunConfig, load_config  # noqa: E402
from llmkit.data.prep import prepare_dataset  # noqa: E402
from llmkit.data.store import open_dataset  # noqa: E402
from llmkit.data.tokenizer import load_tokenizer  # noqa: E402
from llmkit.models import build_model  # noqa: E402
from llmkit.train.pretrain import pretrain  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=128)
    apart_arguments(parser, ["trainer", "llmkit"])
    args = parser.parse_args()
    work = args.work or scratch("llmkit-bench-")
    cfg = bench_config(work, args)
    if args.run:
        report(run_trainer(cfg, work, args) if args.run == "trainer" else run_llmkit(cfg), args.result)
        return
    prepare_dataset(cfg.data, cfg.data.dataset_dir)
    tokens = args.steps * args.batch * args.block
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}")
    print(f"model: llama {args.layers}x{args.hidden}, {args.steps} steps x {args.batch} x {args.block} tokens")
    same = ["--work", str(work), "--steps", str(args.steps), "--layers", str(args.layers), "--hidden",
            str(args.hidden), "--batch", str(args.batch), "--block", str(args.block)]  # fmt: skip
    rates = {}
    for name, title, loss in (("trainer", "transformers.Trainer", "last logged loss"),
                              ("llmkit", "llmkit pretrain", "last step loss")):  # fmt: skip
        result = run_apart(str(Path(__file__).resolve()), name, same, timeout=3600)
        if result is None:
            raise SystemExit(f"{name}: no result (its output is above)")
        rates[name] = tokens / result["seconds"] if name == "trainer" else result["tokens_per_second"]
        seconds, last = result["seconds"], result["loss"]
        print(f"{title + ':':<22}{rates[name]:>9,.0f} tokens/s  ({seconds:.1f}s, {loss} {last:.3f})")
    print(f"ratio llmkit / Trainer: {rates['llmkit'] / rates['trainer']:.2f}x")


def bench_config(work: Path, args: argparse.Namespace) -> RunConfig:
    overrides = [
        f"model.n_layers={args.layers}", f"model.hidden_size={args.hidden}", "model.n_heads=4",
        f"model.context_length={args.block}", f"data.block_size={args.block}", "data.builtin_docs=8000",
        f"data.dataset_dir={work / 'data'}", "data.vocab_size=2048", f"out_dir={work / 'run'}",
        f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}", "train.eval_every=100000",
        "train.eval_batches=1", "optimizer.lr=3e-3", "schedule.warmup_steps=10", "logging.report_to=[]",
        "logging.plot=false", "logging.every_steps=50",
    ]  # fmt: skip
    return load_config(None, overrides)


def run_llmkit(cfg: RunConfig) -> dict[str, float]:
    result = pretrain(cfg, overwrite=True)
    return {"seconds": result.seconds, "tokens_per_second": result.tokens_per_second, "loss": result.train_loss}


def run_trainer(cfg: RunConfig, work: Path, args: argparse.Namespace) -> dict[str, float]:
    from transformers import Trainer, TrainingArguments, set_seed

    dataset = open_dataset(cfg.data.dataset_dir)
    blocks = dataset.split("train")

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.from_numpy(blocks.blocks([i])[0])
            return {"input_ids": ids, "labels": ids}

    set_seed(cfg.train.seed)
    model = build_model(cfg.model, load_tokenizer(dataset.tokenizer_dir))
    training_args = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=cfg.optimizer.lr, lr_scheduler_type="cosine", warmup_steps=cfg.schedule.warmup_steps,
        weight_decay=cfg.optimizer.weight_decay, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        logging_steps=50, save_strategy="no", report_to=[], dataloader_num_workers=0, seed=cfg.train.seed,
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    trainer = Trainer(model=model, args=training_args, train_dataset=Blocks())
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"seconds": seconds, "loss": float(logged[-1] if logged else output.training_loss)}


if __name__ == "__main__":
    main()
