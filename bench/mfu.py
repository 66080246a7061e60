"""GPU throughput and MFU, side by side: llmkit pretrain, transformers.Trainer and a short hand-written loop, on
the same model, data, batch and optimizer, each contender in a process of its own.

    python bench/mfu.py [--steps 300] [--batch 16] [--compile]        # GPT-2 small on one GPU, bf16
    python bench/mfu.py --arch llama --batch 4 [--compile]             # the llama-1b recipe's shape, seq 2048
    python bench/mfu.py --arch llama --fp8 --compile                   # + llmkit with precision fp8 (Ada/Hopper)
    python bench/mfu.py --contenders llmkit,llmkit-eager,loop          # a subset (names below)
    python bench/mfu.py --layers 2 --hidden 64 --block 128 --steps 30 --peak 1e12 --docs 3000   # a CPU smoke run

Contenders: `llmkit` (pretrain, compiled when --compile: the CUDA default), `llmkit-eager` (pretrain without
compile, where Liger's kernels apply on CUDA), `llmkit-fp8` (with --fp8), `trainer` (transformers.Trainer) and
`loop` (the hand-written loop). Each runs in a fresh Python process (bench/_cli.py), so no kernel patch, compiled
code in memory or allocator state of one reaches another (torch.compile's cache on disk is shared: it changes how long
a compilation takes, not the steady state timed).

GPT-2 is the recipe's GPT-2 small (12 x 768, context 1024) with nanoGPT's padded 50,304-row vocabulary and no
dropout (as nanoGPT pretrains it), so its size matches the usual 124M figures; `--arch llama` is
recipes/llama-1b.yaml's model (22 x 2048, GQA 32/4, 32,000-row vocabulary, sequence 2048). Every contender does
`--steps` optimizer steps of `--batch` x block tokens in bf16 (float32 on a CPU) with fused AdamW from the same
saved weights, in training mode. Throughput is each one's steady state: llmkit's summary figure (training steps
after warm-up), and for the others the median of 10-step windows after the first fifth of the run, each window
timed from one device synchronization to the next (no contender waits for the device every step). MFU = tokens/s
x training FLOPs per token (6N + 12 x layers x sequence x width, as `llmkit plan` counts them) / the device's dense
bf16 peak (989 TFLOP/s for an H100 or H200; `--peak` overrides it). Peak memory is CUDA's max reserved.

The hand-written loop is what a careful user writes in 30 lines: the Hugging Face model, bf16 autocast, fused
AdamW, clipping, a cosine schedule, the model's own loss, optional torch.compile of the model (nanoGPT's way).

`--fp8` adds llmkit with `precision.dtype: fp8` (torchao float8 matmuls in the body's linear layers) from the same
weights and data order, prints its speed-up over llmkit's bf16 run and the loss-curve parity check: the largest
relative difference between the two runs' losses at every logged step.

`--warm-only N` times nothing: it runs each contender for 20 steps, N processes at a time, and drops their figures.
What it leaves is torch.compile's cache on disk (inductor's and AOTAutograd's, shared by every process of the
machine's user), so a timed run of the same shapes afterwards compiles from the cache: seconds instead of the one to
two minutes a 124M or 1B model's first compilation takes. Timed figures are steady state either way; this only
shortens the wall time (bench/gpu_check.sh warms the benches beside the GPU tests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _cli import report, run_apart, scratch  # noqa: E402  (bench/_cli.py)

from llmkit.config import RunConfig, load_config  # noqa: E402
from llmkit.data.store import open_dataset  # noqa: E402

RECIPES = {name: Path(__file__).parent.parent / "recipes" / f"{recipe}.yaml"
           for name, recipe in (("gpt2", "gpt2-124m"), ("llama", "llama-1b"))}  # fmt: skip
CONTENDERS = ("llmkit", "llmkit-eager", "llmkit-fp8", "trainer", "loop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default 16 for gpt2, 4 for llama)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--block", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--docs", type=int, default=None, help="built-in stories to prepare (default: enough)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fp8", action="store_true", help="also run llmkit in precision fp8 and compare its losses")
    parser.add_argument("--contenders", default=None, help=f"comma-separated, of: {', '.join(CONTENDERS)}")
    parser.add_argument("--peak", type=float, default=None, help="peak FLOP/s per device (default: from its name)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds each contender may take")
    parser.add_argument("--warm-only", type=int, metavar="N", default=None,
                        help="only fill the compile cache: 20 steps each, N at a time, no figures")  # fmt: skip
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)  # set for a contender's process
    parser.add_argument("--run", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = {"gpt2": (16, 12, 768, 1024, 50304), "llama": (4, 22, 2048, 2048, 32000)}[args.arch]
    for name, default in zip(("batch", "layers", "hidden", "block", "vocab"), shape, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.run:
        return report(_contender(args), args.result)
    if args.warm_only:
        args.steps = min(args.steps, 20)  # two 10-step windows: every contender gets to its figures
    peak = args.peak or _device_peak()
    if peak is None and not args.warm_only:
        raise SystemExit("unknown device peak: pass --peak FLOP/s")
    contenders = (args.contenders or "llmkit,trainer,loop" + (",llmkit-fp8" if args.fp8 else "")).split(",")
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        raise SystemExit(f"--contenders: unknown {', '.join(unknown)} (choose from {', '.join(CONTENDERS)})")
    work = scratch("llmkit-mfu-")
    flops, params = _prepare(args, work)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}; {args.arch} {args.layers} x {args.hidden}, {params / 1e6:.1f}M parameters, "
          f"vocab {args.vocab}")  # fmt: skip
    print(f"{args.steps} steps of {args.batch} x {args.block} tokens, {_precision()}"
          f"{', compiled' if args.compile else ''}; {flops / 1e9:.3f} GFLOP per token"
          f"{f'; peak {peak / 1e12:.0f} TFLOP/s' if peak else ''}", flush=True)  # fmt: skip

    forwarded = [f"--{key}={getattr(args, key)}" for key in ("arch", "steps", "batch", "layers", "hidden", "block",
                                                             "vocab")]  # fmt: skip
    forwarded += [f"--work={work}", *(["--compile"] if args.compile else [])]
    if args.warm_only:
        return _warm(contenders, forwarded, args.timeout, args.warm_only)
    results = {}
    for name in contenders:
        result = run_apart(__file__, name, forwarded, args.timeout)
        if result is not None:
            results[name] = result
            memory = f"{result['peak_gib']:6.1f} GiB" if result["peak_gib"] is not None else "      -"
            print(f"{name:<14}{result['rate']:>12,.0f} tokens/s   MFU {result['rate'] * flops / peak:6.1%}   "
                  f"peak {memory}", flush=True)  # fmt: skip
    if "llmkit" in results:
        ours = results["llmkit"]["rate"]
        for name in results:
            if name != "llmkit":
                print(f"ratio llmkit / {name}: {ours / results[name]['rate']:.2f}x")
    if "llmkit" in results and results["llmkit"].get("allocated_gib") is not None:
        print(_plan_against(args, work, results["llmkit"]["allocated_gib"]))
    if "llmkit" in results and "llmkit-fp8" in results:
        curve = {int(k): v for k, v in results["llmkit"]["losses"].items()}
        fp8 = {int(k): v for k, v in results["llmkit-fp8"]["losses"].items()}
        worst = max(abs(fp8[step] / loss - 1) for step, loss in curve.items())
        print(f"fp8 loss curve vs {_precision()}: largest difference {worst:.2%} over {len(curve)} logged steps")
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def _warm(contenders: list[str], forwarded: list[str], timeout: float, at_once: int) -> None:
    """Run the contenders `at_once` at a time (each in its own process, as timed runs are) for what their first
    compilation leaves on disk; print how long each took."""

    def run(name: str) -> str:
        start = time.perf_counter()
        done = run_apart(__file__, name, forwarded, timeout) is not None
        return f"warmed {name}: {'done' if done else 'failed'} in {time.perf_counter() - start:.0f} s"

    with ThreadPoolExecutor(max(1, at_once)) as pool:
        for line in pool.map(run, contenders):
            print(line, flush=True)


def _plan_against(args: argparse.Namespace, work: Path, allocated: float) -> str:
    """`llmkit plan`'s memory for the llmkit contender's run, beside the peak CUDA's allocator reported for it."""
    from llmkit.plan import estimate_memory, model_size

    cfg = _config(args, work)
    memory = estimate_memory(cfg, model_size(cfg, args.vocab, "pretrain"), "ddp", 1, False, "pretrain")
    estimate = memory.held / 2**30
    return (
        f"plan {estimate:.1f} GiB without CUDA context, llmkit's peak {allocated:.1f} GiB allocated: "
        f"{estimate / allocated:.2f}x"
    )


def _device_peak() -> float | None:
    from llmkit.flops import device_peak_flops

    return device_peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def _precision() -> str:
    return "bf16" if torch.cuda.is_available() else "fp32"


def _config(args: argparse.Namespace, work: Path) -> RunConfig:
    heads = max(1, args.hidden // 64)  # GPT-2's and Llama-1B's head width
    return load_config(RECIPES[args.arch], [
        f"model.n_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.n_heads={heads}",
        *([f"model.n_kv_heads={max(1, heads // 8)}", f"model.intermediate_size={_llama_mlp(args.hidden)}",
           "data.tokenizer=null"] if args.arch == "llama" else []),
        f"model.context_length={args.block}", f"data.block_size={args.block}", "data.vocab_size=8192",
        f"data.dataset_dir={work / 'data'}", f"out_dir={work / 'runs' / (args.run or 'llmkit')}",
        f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}",
        "train.grad_accum_steps=1",
        "train.eval_every=1000000", "checkpoint.every_steps=null", "logging.every_steps=10",
        "logging.report_to=[]", "logging.plot=false", "schedule.warmup_steps=10", f"train.compile={args.compile}",
        "train.gradient_checkpointing=false", "data.sources=[builtin:stories]", f"precision.dtype={_precision()}",
        f"model.init_from={work / 'start'}", "data.builtin_docs=1000",
    ])  # fmt: skip


def _prepare(args: argparse.Namespace, work: Path) -> tuple[float, int]:
    """The data (enough built-in stories for every step) and the starting weights every contender loads."""
    from llmkit.data.prep import prepare_dataset
    from llmkit.data.tokenizer import load_tokenizer
    from llmkit.flops import model_flops_per_token

    cfg = _config(args, work)
    tokens = args.steps * args.batch * args.block
    docs = args.docs or max(2000, int(tokens / 45 * 1.2))  # a story is about 50 tokens
    prepare_dataset(cfg.data.model_copy(update={"builtin_docs": docs}), cfg.data.dataset_dir)
    tokenizer = load_tokenizer(open_dataset(cfg.data.dataset_dir).tokenizer_dir)
    torch.manual_seed(0)
    model = _gpt2(args) if args.arch == "gpt2" else _llama(args, cfg)
    model.save_pretrained(work / "start")
    tokenizer.save_pretrained(work / "start")
    params = sum({id(p): p.numel() for p in model.parameters()}.values())
    return model_flops_per_token(model, args.block), params


def _contender(args: argparse.Namespace) -> dict[str, object]:
    """One contender in this process: {rate (steady tokens/s), peak_gib (CUDA's max reserved), allocated_gib
    (CUDA's max allocated), losses}."""
    runs = {"llmkit": lambda: _llmkit(args), "llmkit-eager": lambda: _llmkit(args, compile=False),
            "llmkit-fp8": lambda: _llmkit(args, precision="fp8"), "trainer": lambda: _trainer(args),
            "loop": lambda: _loop(args)}  # fmt: skip
    rate, losses = runs[args.run]()
    peak = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
    allocated = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"rate": rate, "peak_gib": peak, "allocated_gib": allocated, "losses": losses}


def _llmkit(args: argparse.Namespace, compile: bool | None = None, precision: str | None = None):
    from llmkit.train.pretrain import pretrain

    cfg = _config(args, args.work)
    train = cfg.train.model_copy(update={"compile": args.compile if compile is None else compile})
    dtype = cfg.precision.model_copy(update={"dtype": precision or cfg.precision.dtype})
    result = pretrain(cfg.model_copy(update={"train": train, "precision": dtype}), overwrite=True)
    records = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    return float(result.steady_tokens_per_second or result.tokens_per_second), losses


def _llama_mlp(hidden: int) -> int:
    return 5632 if hidden == 2048 else int(-(-8 * hidden // 3 // 64) * 64)


def _llama(args: argparse.Namespace, cfg: RunConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=_llama_mlp(args.hidden),
                         num_hidden_layers=args.layers, num_attention_heads=cfg.model.n_heads,
                         num_key_value_heads=cfg.model.n_kv_heads, max_position_embeddings=args.block,
                         tie_word_embeddings=False, attn_implementation="sdpa")  # fmt: skip
    return LlamaForCausalLM(config)


def _gpt2(args: argparse.Namespace):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=args.vocab, n_positions=args.block, n_embd=args.hidden, n_layer=args.layers,
                        n_head=max(1, args.hidden // 64), tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config)


def _loop(args: argparse.Namespace):
    """The hand-written loop: the same model and blocks, bf16 autocast, fused AdamW, the model's own loss; the
    device is synchronized once per 10-step window, where the time is read."""
    from transformers import AutoModelForCausalLM

    cfg = _config(args, args.work)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.work / "start", dtype=torch.float32).to(device)
    model.train()
    step_fn = torch.compile(model) if args.compile else model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=cfg.optimizer.lr, betas=(0.9, 0.95), fused=True)  # fmt: skip
    blocks = open_dataset(args.work / "data").split("train")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0)).tolist()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, losses = [], {}
    for step in range(args.steps):
        rows = [order[(step * args.batch + i) % len(order)] for i in range(args.batch)]
        ids = torch.from_numpy(blocks.blocks(rows).astype("int64"))
        if device.type == "cuda":
            ids = ids.pin_memory().to(device, non_blocking=True)
        lr = cfg.optimizer.lr * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 10 == 0:
            losses[step + 1] = float(loss)  # reads the device: the window ends here
            times.append(time.perf_counter())
    tokens = 10 * args.batch * args.block
    return _steady([tokens / (b - a) for a, b in zip(times, times[1:], strict=False)]), losses


def _steady(rates: list[float]) -> float:
    """Median throughput after the first fifth of the logged windows (warm-up and compilation)."""
    return statistics.median(rates[len(rates) // 5 :] or rates)


def _trainer(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    cfg = _config(args, args.work)
    blocks = open_dataset(args.work / "data").split("train")

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.from_numpy(blocks.blocks([i])[0].astype("int64"))
            return {"input_ids": ids, "labels": ids}

    class Clock(TrainerCallback):
        """Synchronizes once every 10 steps (Trainer itself reads the loss only at its logging steps)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args_, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step % 10 == 0:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter())

    bf16 = torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=str(args.work / "trainer"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=cfg.optimizer.lr, lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, bf16=bf16, torch_compile=args.compile,
        optim="adamw_torch_fused", logging_steps=10, save_strategy="no", report_to=[], dataloader_num_workers=2,
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    clock = Clock()
    model = AutoModelForCausalLM.from_pretrained(args.work / "start")
    trainer = Trainer(model=model, args=training_args, train_dataset=Blocks(), callbacks=[clock])
    trainer.train()
    tokens = 10 * args.batch * args.block
    losses = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
    return _steady([tokens / (b - a) for a, b in zip(clock.times, clock.times[1:], strict=False)]), losses


if __name__ == "__main__":
    main()
