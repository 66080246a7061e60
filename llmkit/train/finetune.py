"""`llmkit finetune`: fine-tune an existing model on your own rows for a task (llmkit.train.tasks), then `fit`.

It shares the loop, config, logging, checkpoints, exact resume and run-directory layout of pretrain.
Every check that can fail on user input runs before the run directory is touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmkit.config import RunConfig, input_paths
from llmkit.console import info
from llmkit.data.readers import resolve_sources
from llmkit.data.templates import setup_chat_template
from llmkit.data.tokenizer import load_tokenizer, tokenizer_hash
from llmkit.errors import UserError
from llmkit.flops import count_parameters
from llmkit.models import (
    attach_lora,
    check_rope_applied,
    freeze_except,
    model_context,
    padded_vocab_size,
    place_weights,
    trained_factors,
)
from llmkit.runs import find_tokenizer_dir, resolve_model_dir
from llmkit.train.job import FitResult, Objective
from llmkit.train.packing import ExampleLoader, TooFewRows
from llmkit.train.resume import (
    find_checkpoint,
    own_run_dir,
    run_fingerprints,
)
from llmkit.train.run import Found, Parts, train
from llmkit.train.setup import (
    apply_float8,
    apply_kernels,
    autocast_precision,
    compute_dtype,
    describe_speedups,
    enable_gradient_checkpointing,
    language_model_loss,
    make_accelerator,
)
from llmkit.train.step import router_balance
from llmkit.train.strategies import Strategy, check_added_token_rows, use_cuda
from llmkit.train.tasks import Preparation, Task, TaskData, get_task

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


def finetune(
    cfg: RunConfig,
    overwrite: bool = False,
    resume: str | None = None,
    resume_fallback: bool = False,
    allow_config_change: bool = False,
) -> FitResult:
    """Fine-tune `cfg.model.init_from` on `cfg.data.sources` for the task `cfg.finetune.task` (see
    llmkit.train.tasks: SFT, classification, preference tuning, reward models)."""
    ft = cfg.finetune
    task = get_task(ft.task)
    if not cfg.model.init_from:
        raise UserError("finetune needs a base model: pass --model PATH_OR_HUB_NAME (model.init_from)")
    if (cfg.distill.teacher or cfg.distill.on_policy) and task.name != "distill":
        raise UserError(f"--teacher and distill.* are for --task distill (or pretrain), not --task {task.name}")
    if ft.method == "qlora" and not use_cuda(cfg):
        raise UserError("method qlora needs a CUDA GPU (4-bit bitsandbytes); use --method lora on CPU")
    base_dir = resolve_model_dir(cfg.model.init_from)
    tokenizer = load_tokenizer(find_tokenizer_dir(base_dir), cfg.model.trust_remote_code, require_eos=task.needs_eos)
    chat = setup_chat_template(tokenizer, ft.chat_template) if task.chat else None
    data = task.load_data(cfg, tokenizer)

    accelerator, strategy = make_accelerator(cfg)
    sources = resolve_sources([*cfg.data.sources, *([ft.val_file] if ft.val_file else [])])
    reads = [base_dir, *input_paths(cfg, skip=["data.dataset_dir"]), *(s.name for s in sources if s.kind == "file")]
    with own_run_dir(cfg, reads, resume, accelerator):
        return _finetune(
            cfg,
            task,
            base_dir,
            tokenizer,
            chat,
            data,
            strategy,
            overwrite,
            resume,
            resume_fallback,
            allow_config_change,
        )


def _finetune(
    cfg: RunConfig,
    task: Task,
    base_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    chat: Any,
    data: TaskData,
    strategy: Strategy,
    overwrite: bool,
    resume: str | None,
    resume_fallback: bool,
    allow_config_change: bool,
) -> FitResult:
    ft, accelerator = cfg.finetune, strategy.accelerator
    token = cfg.model.hub_token.get_secret_value() if cfg.model.hub_token else None
    world, micro = accelerator.num_processes, cfg.train.micro_batch_size
    fingerprints = run_fingerprints(
        cfg, world, data.fingerprint, tokenizer_hash(tokenizer), ft.max_length, finetuning=True
    )
    checkpoint, saved_state = find_checkpoint(
        cfg, world, resume, resume_fallback, overwrite, fingerprints, allow_config_change
    )

    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    source = base_dir.resolve() if base_dir.exists() else str(cfg.model.init_from)
    model = _load_base(task.load_model(source, cfg, token, data, tokenizer), cfg, tokenizer, chat)
    if task.keeps_base(cfg):
        data.details["base"] = _frozen_copy(model, cfg, strategy)
    liger = apply_kernels(model, cfg) if task.kernels else False
    model = _apply_method(model, cfg, task, chat.added_tokens if chat else 0, tokenizer, checkpoint)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # Frozen weights in the compute dtype, trained ones in float32 (DeepSpeed and FSDP place weights themselves).
    weight_bytes = {} if strategy.places_weights else place_weights(model, compute_dtype(cfg))
    speedups = describe_speedups(liger, apply_float8(model, cfg))
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    pad_id = int(tokenizer.pad_token_id)
    collate = task.collate(pad_id, attn)
    loader = _row_loader(cfg, task, data, pad_id, attn, collate, accelerator)
    # an upper bound, for budgets
    tokens_per_step = micro * cfg.train.grad_accum_steps * world * ft.max_length * task.sequences_per_row

    def objective(run_dir: Path) -> tuple[Objective, Any]:
        lm_loss = lambda: language_model_loss(model, strategy, liger)  # noqa: E731
        return task.objective(model, accelerator, data, cfg, lm_loss), loader

    def prepare(prepared: Any, run_dir: Path) -> None:
        task.prepare(prepared, Preparation(cfg, accelerator, data, run_dir, checkpoint is not None, collate))

    def announce(prepared: Any, run_dir: Path, total_steps: int, val_batches: list[dict[str, Any]]) -> None:
        _announce(cfg, task, data, chat, prepared, loader, run_dir, total_steps, weight_bytes, world, speedups)

    validation = lambda: _validation_batches(data.val, micro, cfg.train.eval_batches, collate)  # noqa: E731
    lora_plus = ft.lora.plus_ratio if ft.method in ("lora", "qlora") else 1.0
    parts = Parts(
        model,
        loader,
        loader.batches_per_epoch * task.steps_per_read(cfg),
        tokens_per_step,
        ft.max_length,
        objective,
        validation,
        announce,
        prepare,
        lora_plus_ratio=lora_plus,
        fixed_shapes=False,
    )  # fixed_shapes: rows of any length
    return train(cfg, strategy, tokenizer, Found(fingerprints, checkpoint, saved_state), resume, overwrite, parts)


def _row_loader(
    cfg: RunConfig, task: Task, data: TaskData, pad_id: int, attn: str, collate: Any, accelerator: Accelerator
) -> ExampleLoader:
    """The task's training rows in micro-batches for this process, packed where the task and recipe allow."""
    micro, world, ft = cfg.train.micro_batch_size, accelerator.num_processes, cfg.finetune
    packing, row_length = ft.packing and task.packs, ft.max_length * task.sequences_per_row
    try:
        return ExampleLoader(
            data.train,
            micro,
            row_length,
            cfg.train.seed,
            packing,
            pad_id,
            attn,
            accelerator.process_index,
            world,
            collate,
        )
    except TooFewRows as exc:
        packed = f"pack into {exc.rows} rows of up to {row_length} tokens, " if packing else ""
        raise UserError(
            f"{len(data.train)} training examples {packed}fewer than one micro-batch of {micro * world} rows "
            f"(train.micro_batch_size {micro} x {world} process(es)); lower train.micro_batch_size"
            + (", lower finetune.max_length or turn packing off (--no-packing)," if packing else "")
            + " or add data"
        ) from None


def _announce(
    cfg: RunConfig,
    task: Task,
    data: TaskData,
    chat: Any,
    model: Any,
    loader: Any,
    run_dir: Path,
    total_steps: int,
    weight_bytes: dict[str, int],
    world: int,
    speedups: str,
) -> None:
    """The run's one-line summary, and RUN/data_stats.json."""
    ft = cfg.finetune
    trainable, total = count_parameters(model)
    efficiency = loader.efficiency()
    info(
        f"finetune {ft.task} ({ft.method}): {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable "
        f"({trainable / total:.2%}); format {data.fmt}, {task.describe(data, chat)}; {len(data.train):,} train / "
        f"{len(data.val):,} val examples ({data.truncated} truncated to {ft.max_length}); "
        f"{'packing' if loader.packing else 'padding'} efficiency {efficiency:.3f} (real tokens / slots); "
        f"{total_steps:,} steps on {world} process(es){speedups}"
        + (
            f"; frozen weights {weight_bytes['frozen_bytes'] / 2**30:.2f} GiB in {autocast_precision(cfg)}"
            if weight_bytes.get("frozen_bytes")
            else ""
        )
    )
    (run_dir / "data_stats.json").write_text(
        json.dumps(
            {
                "task": ft.task,
                "format": data.fmt,
                **task.stats(data, chat),
                "train_examples": len(data.train),
                "val_examples": len(data.val),
                "truncated": data.truncated,
                "packing": loader.packing,
                "efficiency": efficiency,
                "trainable_parameters": trainable,
                "total_parameters": total,
                **weight_bytes,
            },
            indent=2,
        )
        + "\n"
    )


def _load_base(model: Any, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, chat: Any) -> Any:
    """The loaded base, checked against the run (a mixture of experts' balancing loss, a RoPE extension, the
    length) before anything is written, its embedding grown to the tokenizer, generating until the chat's ends."""
    ft = cfg.finetune
    router_balance(model)  # a mixture of experts whose balancing loss is unknown is refused
    check_rope_applied(model, cfg, f"--task {ft.task}" + (" with --method qlora" if ft.method == "qlora" else ""))
    context = model_context(model)
    if context and ft.max_length > context:
        raise UserError(
            f"finetune.max_length {ft.max_length} exceeds the context of {cfg.model.init_from} ({context} tokens); "
            f"pass --max-length {context} or less, or extend the context with model.rope_scaling and model.rope_factor"
        )
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(padded_vocab_size(len(tokenizer)))
    if chat is not None and getattr(model, "generation_config", None) is not None:  # generative models only
        model.generation_config.eos_token_id = list(chat.stop_token_ids)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _frozen_copy(model: Any, cfg: RunConfig, strategy: Strategy) -> Any:
    """The base as loaded, before any training or checkpoint touches it: frozen, in the compute dtype, on the
    device, whole on every process."""
    import copy

    if not strategy.whole_weights:
        raise UserError(
            f"--task {cfg.finetune.task} keeps a whole frozen copy of the base on every process, which "
            f"{strategy.name} would have to shard; use --method lora (the base with adapters off) or another strategy"
        )
    base = copy.deepcopy(model).requires_grad_(False).eval()
    return base.to(strategy.accelerator.device, dtype=compute_dtype(cfg))


def _apply_method(
    model: Any,
    cfg: RunConfig,
    task: Task,
    added_tokens: int,
    tokenizer: PreTrainedTokenizerBase,
    checkpoint: Path | None,
) -> Any:
    ft = cfg.finetune
    if ft.method in ("lora", "qlora"):
        new_ids = list(range(len(tokenizer) - added_tokens, len(tokenizer))) if added_tokens else []
        check_added_token_rows(new_ids, str(cfg.model.init_from))
        torch.manual_seed(cfg.train.seed)  # the adapters' initialization, whatever loading the base drew (ZeRO-3)
        model = attach_lora(model, ft.lora, task.peft_task_type, new_ids)
        if checkpoint is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            weights = load_file(checkpoint / "model" / "adapter_model.safetensors")
            if ft.lora.init != "default":  # saved converted for the original base; the base is rewritten again
                weights = trained_factors(weights, ft.lora.r)
            set_peft_model_state_dict(model, weights)
        return model
    if checkpoint is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(checkpoint / "model" / "model.safetensors"), strict=False)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
    if ft.method == "freeze":
        freeze_except(model, ft.freeze_top_layers, ft.trainable_modules)
    return model


def _validation_batches(
    examples: list[Any], micro: int, max_batches: int | None, collate: Any
) -> list[dict[str, torch.Tensor]]:
    """Fixed validation batches: examples in order, one per row, padded (packing changes nothing in the loss)."""
    batches: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(examples), micro):
        if max_batches is not None and len(batches) >= max_batches:
            break
        batches.append(collate([[e] for e in examples[start : start + micro]]))
    return batches
