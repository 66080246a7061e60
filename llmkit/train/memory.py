"""The peak memory of a run's optimizer step, measured on the CPU: what `llmkit plan` is checked against.

The step is the run's own: the recipe's model (or its fine-tuned base, with LoRA's adapters or frozen blocks and
frozen weights in the compute dtype), its loss fused with the output head, the recipe's optimizer, autocast in the
run's precision, compiled or eager, `train.grad_accum_steps` micro-batches of `train.micro_batch_size` blocks and the
gradient clip. torch.profiler records every tensor allocation and release; the peak of live bytes during the
second optimizer step (the first creates the optimizer's states, and compiles), plus what was alive before it
(weights and optimizer states), is what `torch.cuda.max_memory_allocated` reports for the same step on a GPU: the
same operators allocate the same tensors. Checked on a nanoGPT-style GPT-2 124M loop (16 x 1024 tokens, bf16):
15.98 GiB eager and 8.42 GiB compiled measured here on the CPU, 16.1 and 8.4 GiB on an H100 (docs/plan.md).

It computes a real step, so it is for small shapes (the tests) and for one or a few layers of a real one
(bench/plan_memory.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any, cast

import torch

from llmkit.config import RunConfig
from llmkit.models import Vocabulary, attach_lora, build_model, freeze_except, place_weights
from llmkit.train.optimizers import build_optimizer
from llmkit.train.setup import compute_dtype, enable_gradient_checkpointing, language_model_loss
from llmkit.train.step import MicroStep
from llmkit.train.strategies import Strategy


def measure_step_peak(cfg: RunConfig, vocab: int, finetune: bool = False) -> int:
    """Peak bytes of tensors alive during one optimizer step of `cfg`'s run on the CPU, compiled when
    `train.compile` is true (auto is off on a CPU): pretraining, or with
    `finetune` a language-model fine-tune of `model.init_from` by `finetune.method` (full, lora or freeze) on rows of
    `finetune.max_length` tokens, its frozen weights in the compute dtype as the run holds them."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    if finetune:
        model = _fine_tuned(cfg)
        sequence = cfg.finetune.max_length
    else:
        model = build_model(cfg.model, Vocabulary(vocab)).train()
        sequence = cfg.data.block_size
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    single_process = cast(Strategy, SimpleNamespace(whole_weights=True, offloads_optimizer=False))
    loss_fn = language_model_loss(model, single_process)
    optimizer = build_optimizer(model, cfg.optimizer)
    dtype = compute_dtype(cfg)
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype != torch.float32 else nullcontext
    step = MicroStep(loss_fn, autocast, cfg.train.compile_backend if cfg.train.compile is True else None)
    ids = torch.randint(0, vocab, (cfg.train.micro_batch_size, sequence))
    batch = {"input_ids": ids, "labels": ids}

    def optimizer_step() -> None:
        for _ in range(cfg.train.grad_accum_steps):
            total, targets = step(model, batch)
            (total / targets).backward()
        if cfg.optimizer.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    optimizer_step()
    alive = _storage_bytes([*model.parameters(), *_state_tensors(optimizer)])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        optimizer_step()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return alive + peak


def _fine_tuned(cfg: RunConfig) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(cfg.model.init_from)).train()
    if cfg.finetune.method == "lora":
        model = attach_lora(model, cfg.finetune.lora, "CAUSAL_LM", [])
    elif cfg.finetune.method == "freeze":
        freeze_except(model, cfg.finetune.freeze_top_layers, cfg.finetune.trainable_modules)
    place_weights(model, compute_dtype(cfg))
    return model


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]


def _storage_bytes(tensors: list[Any]) -> int:
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    return sum(storages.values())
