"""`llmkit plan`'s memory estimate against the measured peak of the same optimizer step, on the CPU.

    python bench/plan_memory.py recipes/llama-1b.yaml --layers 1 3 --set train.micro_batch_size=2
    python bench/plan_memory.py recipes/gpt2-124m.yaml --vocab 50304 --set train.micro_batch_size=4 --compile

For each layer count, the recipe's model at its real width runs two optimizer steps of its real step (its loss,
optimizer, bf16 autocast, `train.grad_accum_steps` micro-batches; compiled with --compile, as on a GPU under ddp,
else eager, as under DeepSpeed, FSDP or --no-compile) and llmkit.train.memory measures the peak of tensors alive
during the second, which is what `torch.cuda.max_memory_allocated` reports for that step on a GPU. It prints that
beside the plan's estimate without its 1 GiB of CUDA context, their ratio, and the slope per added layer. Whole
models of a billion parameters are slow on a CPU; a few layers give the per-layer cost and the rest of the model.
"""

from __future__ import annotations

import argparse
import time

from llmkit.config import load_config
from llmkit.flops import GIB
from llmkit.plan import estimate_memory, model_size
from llmkit.train.memory import measure_step_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="layer counts to measure")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default: the recipe's data.vocab_size)")
    parser.add_argument("--compile", action="store_true", help="the compiled step (a GPU's default under ddp)")
    parser.add_argument("--set", action="append", default=[], help="config overrides, KEY=VALUE")
    args = parser.parse_args()
    print(f"{args.recipe} {' '.join(args.set)} {'compiled' if args.compile else 'eager'}, plan without CUDA context")
    print("| layers | measured peak | plan | plan / measured | seconds |")
    print("| --- | --- | --- | --- | --- |")
    measured = {}
    for layers in args.layers:
        cfg = load_config(args.recipe, [*args.set, f"model.n_layers={layers}", f"train.compile={args.compile}"])
        vocab = args.vocab or cfg.data.vocab_size
        start = time.perf_counter()
        measured[layers] = measure_step_peak(cfg, vocab)
        checkpointing = cfg.train.gradient_checkpointing
        plan = estimate_memory(cfg, model_size(cfg, vocab, "pretrain"), "ddp", 1, checkpointing, "pretrain")
        estimate = plan.held
        print(f"| {layers} | {measured[layers] / GIB:.3f} GiB | {estimate / GIB:.3f} GiB | "
              f"{estimate / measured[layers]:.3f} | {time.perf_counter() - start:.0f} |")  # fmt: skip
    if len(measured) > 1:
        (first, low), (last, high) = min(measured.items()), max(measured.items())
        print(f"measured per added layer: {(high - low) / (last - first) / GIB:.3f} GiB")


if __name__ == "__main__":
    main()
