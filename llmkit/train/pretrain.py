"""`llmkit pretrain`: set up a run from a recipe and a prepared dataset, then `fit` it.

Every check that can fail on user input runs before the run directory is touched, so a bad invocation
leaves nothing behind. With `resume`, the run continues from a verified checkpoint exactly where it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.config import RunConfig, input_paths
from llmkit.console import info
from llmkit.data.store import PreparedDataset, open_dataset
from llmkit.data.tokenizer import load_tokenizer, tokenizer_hash
from llmkit.errors import UserError
from llmkit.flops import count_parameters
from llmkit.models import build_model, check_vocab_fits, load_model, model_context, rope_request
from llmkit.train.distill import cache_key, check_given_cache, check_teacher, pretrain_objective
from llmkit.train.job import FitResult, Objective
from llmkit.train.loader import BlockLoader, validation_batches
from llmkit.train.resume import (
    find_checkpoint,
    own_run_dir,
    run_fingerprints,
)
from llmkit.train.run import Found, Parts, train
from llmkit.train.setup import (
    apply_float8,
    apply_kernels,
    describe_speedups,
    enable_gradient_checkpointing,
    language_model_loss,
    make_accelerator,
)
from llmkit.train.step import router_balance
from llmkit.train.strategies import Strategy

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


def pretrain(
    cfg: RunConfig,
    overwrite: bool = False,
    resume: str | None = None,
    resume_fallback: bool = False,
    allow_config_change: bool = False,
) -> FitResult:
    """Train a causal LM on the prepared dataset named in `cfg.data.dataset_dir` (taught by `cfg.distill.teacher`
    when one is given: llmkit.train.distill).

    `resume` is "auto" (the newest valid checkpoint of the run, or a fresh start when it has none) or a
    checkpoint directory.
    """
    dataset = open_dataset(cfg.data.dataset_dir)
    tokenizer = load_tokenizer(dataset.tokenizer_dir)
    block_size = int(dataset.manifest["block_size"])
    _check_init_tokenizer(cfg, dataset.manifest["tokenizer"]["hash"])
    if cfg.distill.on_policy:
        raise UserError("distill.on_policy samples answers to prompts: it is for finetune --task distill on SFT rows")
    if cfg.distill.teacher:
        check_teacher(cfg.distill, tokenizer, f"{cfg.model.init_from or cfg.model.arch} on {dataset.root}")
        if cfg.distill.top_k and cfg.distill.cache:
            key = cache_key(cfg.distill, _blocks_fingerprint(dataset.manifest), len(tokenizer))
            check_given_cache(Path(cfg.distill.cache), key)
    accelerator, strategy = make_accelerator(cfg)
    if block_size != cfg.data.block_size and accelerator.is_main_process:
        info(f"{dataset.root}: using the dataset's blocks of {block_size} (the recipe says {cfg.data.block_size})")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"block_size": block_size})})
    with own_run_dir(cfg, input_paths(cfg), resume, accelerator):
        return _pretrain(cfg, dataset, tokenizer, strategy, overwrite, resume, resume_fallback, allow_config_change)


def _pretrain(
    cfg: RunConfig,
    dataset: PreparedDataset,
    tokenizer: PreTrainedTokenizerBase,
    strategy: Strategy,
    overwrite: bool,
    resume: str | None,
    resume_fallback: bool,
    allow_config_change: bool,
) -> FitResult:
    accelerator = strategy.accelerator
    train_split, val_split = dataset.split("train"), dataset.split("val")
    block_size = cfg.data.block_size
    world, micro = accelerator.num_processes, cfg.train.micro_batch_size
    if len(train_split) < micro * world:
        raise UserError(
            f"{dataset.root}: {len(train_split)} training blocks cannot fill one micro-batch of {micro * world}; "
            "lower train.micro_batch_size or add data"
        )
    manifest = dataset.manifest
    fingerprints = run_fingerprints(
        cfg, world, manifest["fingerprint"], manifest["tokenizer"]["hash"], block_size, finetuning=False
    )
    checkpoint, saved_state = find_checkpoint(
        cfg, world, resume, resume_fallback, overwrite, fingerprints, allow_config_change
    )

    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    if checkpoint is not None:
        model = load_model(checkpoint / "model", attn_implementation=cfg.model.attn_implementation)
    elif cfg.model.init_from:
        model = load_model(
            cfg.model.init_from,
            trust_remote_code=cfg.model.trust_remote_code,
            token=_token(cfg),
            rope=rope_request(cfg),
            attn_implementation=cfg.model.attn_implementation,
        )
        router_balance(model)  # an unknown balancing loss is refused before anything is written
    elif cfg.model.rope_scaling != "none":
        raise UserError(
            "model.rope_scaling extends a loaded model's context (model.init_from); a model built from scratch "
            "trains at model.context_length: set that instead"
        )
    else:
        model = build_model(cfg.model, tokenizer)
    check_vocab_fits(model, tokenizer, str(dataset.root))
    liger = apply_kernels(model, cfg)
    speedups = describe_speedups(liger, apply_float8(model, cfg))
    context = model_context(model)
    if context and block_size > context:
        raise UserError(
            f"{dataset.root}: blocks of {block_size} tokens exceed the model's context of {context}; "
            "re-run data-prep with a smaller data.block_size"
        )

    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    loader = BlockLoader(train_split, micro, cfg.train.seed, accelerator.process_index, world)
    tokens_per_step = micro * cfg.train.grad_accum_steps * world * block_size

    def objective(run_dir: Path) -> tuple[Objective, Any]:
        if cfg.distill.teacher:
            return pretrain_objective(cfg, tokenizer, loader, _blocks_fingerprint(manifest), accelerator, run_dir)
        return Objective(loss_fn=language_model_loss(model, strategy, liger=liger)), loader

    def validation() -> list[dict[str, Any]]:
        if len(val_split) < micro * world:
            return []
        return validation_batches(val_split, micro, cfg.train.eval_batches, accelerator.process_index, world)

    def announce(prepared: Any, run_dir: Path, total_steps: int, val_batches: list[dict[str, Any]]) -> None:
        _print_plan(cfg, prepared, dataset, train_split, val_split, total_steps, tokens_per_step, accelerator, speedups)
        if not val_batches:
            info("no validation split large enough for one batch: validation and early stopping are off")

    parts = Parts(model, loader, loader.batches_per_epoch, tokens_per_step, block_size, objective, validation, announce)
    return train(cfg, strategy, tokenizer, Found(fingerprints, checkpoint, saved_state), resume, overwrite, parts)


def _print_plan(
    cfg: RunConfig,
    model: Any,
    dataset: PreparedDataset,
    train_split: Any,
    val_split: Any,
    total_steps: int,
    tokens_per_step: int,
    acc: Accelerator,
    speedups: str,
) -> None:
    trainable, total = count_parameters(model)
    source = cfg.model.init_from or cfg.model.arch
    info(
        f"model: {source}, {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable); "
        f"data: {len(train_split):,} train / {len(val_split):,} val blocks of {dataset.manifest['block_size']}; "
        f"{total_steps:,} steps of {tokens_per_step:,} tokens on {acc.num_processes} process(es), {acc.device}"
        f"{speedups}"
    )


def _blocks_fingerprint(manifest: dict[str, Any]) -> str:
    return f"{manifest['fingerprint']}:{manifest['block_size']}"


def _token(cfg: RunConfig) -> str | None:
    return cfg.model.hub_token.get_secret_value() if cfg.model.hub_token else None


def _check_init_tokenizer(cfg: RunConfig, dataset_tokenizer_hash: str) -> None:
    """A model continued from a checkpoint must see data tokenized with that checkpoint's tokenizer."""
    if not cfg.model.init_from:
        return
    source = Path(cfg.model.init_from)
    if not (source / "tokenizer.json").is_file() and not (source / "tokenizer_config.json").is_file():
        return  # no tokenizer beside the weights: the embedding-size check still applies
    model_tokenizer = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer_hash(model_tokenizer) != dataset_tokenizer_hash:
        raise UserError(
            f"{cfg.data.dataset_dir}: dataset was tokenized with a different tokenizer than {source}; "
            f"re-run data-prep with data.tokenizer={source}"
        )
