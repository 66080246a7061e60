"""GPU throughput and MFU: llmkit pretrain vs transformers.Trainer on GPT-2 small, same model, data and batch.

    python bench/mfu.py [--steps 300] [--batch 16] [--compile]                  # one GPU, bf16 (recipe gpt2-124m)
    python bench/mfu.py --layers 2 --hidden 64 --block 128 --steps 30 --peak 1e12   # a smoke run on a CPU

The model is the recipe's GPT-2 small (12 x 768, context 1024) with nanoGPT's padded 50,304-row vocabulary, so
its size matches the usual 124M figures whatever tokenizer the built-in corpus trains. Both runs do `--steps`
optimizer steps of `--batch` x 1024 tokens in the recipe's precision; throughput is the median of the logged
windows after the first fifth of the run (warm-up, compilation). MFU = tokens/s x training FLOPs per token
(6N + 12 x layers x sequence x width, as `llmkit plan` counts them) / the device's dense bf16 peak (989 TFLOP/s
for an H100; `--peak` overrides it). nanoGPT reports about 37% for this model on an A100.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from llmkit.plan import device_peak_flops, model_flops_per_token  # noqa: E402
from llmkit.train.pretrain import pretrain  # noqa: E402

RECIPE = Path(__file__).parent.parent / "recipes" / "gpt2-124m.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--docs", type=int, default=300_000, help="built-in stories to prepare")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak", type=float, default=None, help="peak FLOP/s per device (default: from its name)")
    args = parser.parse_args()
    peak = args.peak or (device_peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None)
    if peak is None:
        raise SystemExit("unknown device peak: pass --peak FLOP/s")
    work = Path(tempfile.mkdtemp(prefix="llmkit-mfu-"))
    heads = max(1, args.hidden // 64)  # GPT-2's head width
    cfg = load_config(RECIPE, [
        f"model.n_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.n_heads={heads}",
        f"model.context_length={args.block}", f"data.block_size={args.block}", f"data.builtin_docs={args.docs}",
        "data.vocab_size=8192",
        f"data.dataset_dir={work / 'data'}", f"out_dir={work / 'run'}", f"train.max_steps={args.steps}",
        "train.max_tokens=null", f"train.micro_batch_size={args.batch}", "train.grad_accum_steps=1",
        "train.eval_every=1000000", "checkpoint.every_steps=null", "logging.every_steps=10",
        "logging.tensorboard=false", "logging.plot=false", "schedule.warmup_steps=10", f"train.compile={args.compile}",
        *([] if torch.cuda.is_available() else ["precision.dtype=fp32"]),
    ])  # fmt: skip
    prepare_dataset(cfg.data, cfg.data.dataset_dir)
    dataset = open_dataset(cfg.data.dataset_dir)
    tokenizer = load_tokenizer(dataset.tokenizer_dir)
    start_dir = work / "start"
    model = _gpt2(cfg, args)
    model.save_pretrained(start_dir)
    tokenizer.save_pretrained(start_dir)
    flops = model_flops_per_token(model, args.block)
    params = sum(p.numel() for p in model.parameters())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}; GPT-2 {args.layers} x {args.hidden}, {params / 1e6:.1f}M parameters, vocab {args.vocab}")
    print(f"{args.steps} steps of {args.batch} x {args.block} tokens, {cfg.precision.dtype}; "
          f"{flops / 1e9:.3f} GFLOP per token; peak {peak / 1e12:.0f} TFLOP/s")  # fmt: skip

    run_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": str(start_dir)})})
    pretrain(run_cfg, overwrite=True)
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    ours = _steady([r["tokens_per_s"] for r in records if "tokens_per_s" in r])
    theirs = _trainer(cfg, args, start_dir, work)
    for name, rate in (("llmkit pretrain", ours), ("transformers.Trainer", theirs)):
        print(f"{name:<22}{rate:>12,.0f} tokens/s   MFU {rate * flops / peak:6.1%}")
    print(f"ratio llmkit / Trainer: {ours / theirs:.2f}x")


def _gpt2(cfg, args: argparse.Namespace):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.block, n_embd=args.hidden, n_layer=args.layers,
                        n_head=cfg.model.n_heads, tie_word_embeddings=True)  # fmt: skip
    return GPT2LMHeadModel(config)


def _steady(rates: list[float]) -> float:
    """Median throughput after the first fifth of the logged windows (warm-up and compilation)."""
    return statistics.median(rates[len(rates) // 5 :] or rates)


def _trainer(cfg, args: argparse.Namespace, start_dir: Path, work: Path) -> float:
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    blocks = open_dataset(cfg.data.dataset_dir).split("train")

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.from_numpy(blocks.blocks([i])[0].astype("int64"))
            return {"input_ids": ids, "labels": ids}

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, *_: object, **__: object) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    bf16 = cfg.precision.dtype == "bf16" and torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=cfg.optimizer.lr, lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, bf16=bf16, torch_compile=args.compile,
        optim="adamw_torch_fused", logging_steps=10, save_strategy="no", report_to=[], dataloader_num_workers=2,
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    clock = Clock()
    model = AutoModelForCausalLM.from_pretrained(start_dir)
    Trainer(model=model, args=training_args, train_dataset=Blocks(), callbacks=[clock]).train()
    tokens_per_step = args.batch * args.block
    windows = [10 * tokens_per_step / (b - a) for a, b in zip(clock.times[::10], clock.times[10::10], strict=False)]
    return _steady(windows)


if __name__ == "__main__":
    main()
