"""Pretraining throughput: llmkit's loop vs transformers.Trainer, same model, data, steps and optimizer.

Both train the same tiny Llama from the same seed on the same packed blocks of the built-in corpus, on
whatever device is present (CPU here), in one process, one after the other. Prints tokens/s of each and
the ratio llmkit / Trainer.

    python bench/pretrain_vs_trainer.py [--steps 150] [--layers 4] [--hidden 128]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from llmkit.config import load_config  # noqa: E402
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
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-"))
    overrides = [
        f"model.n_layers={args.layers}", f"model.hidden_size={args.hidden}", "model.n_heads=4",
        f"model.context_length={args.block}", f"data.block_size={args.block}", "data.builtin_docs=8000",
        f"data.dataset_dir={work / 'data'}", "data.vocab_size=2048", f"out_dir={work / 'run'}",
        f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}", "train.eval_every=100000",
        "train.eval_batches=1", "optimizer.lr=3e-3", "schedule.warmup_steps=10", "logging.report_to=[]",
        "logging.plot=false", "logging.every_steps=50",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    prepare_dataset(cfg.data, cfg.data.dataset_dir)
    tokens = args.steps * args.batch * args.block
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}")
    print(f"model: llama {args.layers}x{args.hidden}, {args.steps} steps x {args.batch} x {args.block} tokens")

    trainer_seconds, trainer_loss = run_trainer(cfg, work, args)
    print(
        f"transformers.Trainer: {tokens / trainer_seconds:>9,.0f} tokens/s  "
        f"({trainer_seconds:.1f}s, last logged loss {trainer_loss:.3f})"
    )
    result = pretrain(cfg, overwrite=True)
    print(
        f"llmkit pretrain:      {result.tokens_per_second:>9,.0f} tokens/s  "
        f"({result.seconds:.1f}s, last step loss {result.train_loss:.3f})"
    )
    print(f"ratio llmkit / Trainer: {result.tokens_per_second / (tokens / trainer_seconds):.2f}x")


def run_trainer(cfg, work: Path, args: argparse.Namespace) -> tuple[float, float]:
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
    return seconds, float(logged[-1] if logged else output.training_loss)


if __name__ == "__main__":
    main()
