"""`--strategy`: how training is split across processes, handed to Accelerate and DeepSpeed.

* ``ddp``: every process holds the whole model and optimizer; gradients are averaged (PyTorch DDP).
* ``zero1`` / ``zero2`` / ``zero3``: DeepSpeed ZeRO shards optimizer states / and gradients / and weights
  across the processes; ``zero2-offload`` and ``zero3-offload`` also keep optimizer states (and, for zero3,
  the weights) in CPU memory and step them with DeepSpeed's CPU Adam.
* ``fsdp``: PyTorch FSDP2 through Accelerate's FSDP plugin (GPUs only): weights, gradients and optimizer states
  sharded per transformer layer, like zero3.

Each ZeRO strategy is a plain DeepSpeed JSON file in ``recipes/deepspeed/`` (written by `deepspeed_template`,
checked by a test). Values set to ``"auto"`` are filled from the recipe (micro-batch, accumulation, clipping,
precision), so one file serves every recipe; a value that contradicts the recipe is refused rather than
silently winning. Edit a copy and pass it back with ``--deepspeed-config FILE``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from llmkit.config import RunConfig, read_json_mapping
from llmkit.errors import UserError

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3, "zero2-offload": 2, "zero3-offload": 3}


def deepspeed_template(strategy: str) -> dict[str, Any]:
    """The DeepSpeed config of a ZeRO strategy, with the recipe-dependent values left as "auto"."""
    stage = ZERO_STAGES[strategy]
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if strategy.endswith("offload"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # Gather the shards into whole tensors when a model is saved: checkpoints and final/ hold full weights.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def use_cuda(cfg: RunConfig) -> bool:
    """Whether this run trains on CUDA GPUs: there are some, and distributed.device is not cpu."""
    return cfg.distributed.device != "cpu" and torch.cuda.is_available()


def compiles(cfg: RunConfig, cuda: bool | None = None) -> bool:
    """Whether the training step is compiled (train.compile): auto compiles on CUDA GPUs for plain and data-parallel
    runs, unless the recipe asks for Liger's kernels by name (compile fuses the same layers itself, and traces
    Liger's Triton kernels badly). DeepSpeed and FSDP wrap the model in ways the compiled step is not tested with.
    `cuda`: decide for a machine with (True) or without CUDA GPUs rather than this one (`llmkit plan`)."""
    wanted = cfg.train.compile
    sharded = cfg.distributed.strategy == "fsdp" or wants_deepspeed(cfg)
    if wanted is True and sharded:
        raise UserError(
            f"train.compile is not supported with distributed.strategy={cfg.distributed.strategy} yet; "
            "leave --compile off"
        )
    if wanted is True and cfg.model.kernels == "liger":
        raise UserError(
            "model.kernels=liger and train.compile both fuse the model's layers and do not mix; choose one "
            "(--no-compile, or model.kernels=auto)"
        )
    if wanted is True and cfg.train.activation_offload:
        raise UserError(
            "train.activation_offload moves saved activations through hooks torch.compile does not trace; "
            "choose one (--no-compile, or train.activation_offload=false)"
        )
    if wanted == "auto":
        on_gpu = use_cuda(cfg) if cuda is None else cuda and cfg.distributed.device != "cpu"
        return on_gpu and not sharded and cfg.model.kernels != "liger" and not cfg.train.activation_offload
    return bool(wanted)


def check_available(cfg: RunConfig, world_size: int = 1, finetuning: bool = False, local_processes: int = 1) -> None:
    """Refuse what cannot run, before any process is launched (an error in every rank is harder to read)."""
    gpus = torch.cuda.device_count() if cfg.distributed.device != "cpu" else 0  # counts without initializing CUDA
    check_gpu_count(local_processes, gpus)
    zero3 = ZERO_STAGES.get(cfg.distributed.strategy) == 3
    if finetuning and zero3 and cfg.finetune.method == "qlora":
        raise UserError(
            f"finetune.method=qlora with distributed.strategy={cfg.distributed.strategy}: ZeRO-3 cannot shard "
            "4-bit weights; use zero2 (the base model is frozen, so ZeRO-2 already shards everything that is "
            "trained) or method lora with zero3"
        )
    if finetuning and cfg.finetune.method == "qlora" and cfg.finetune.lora.init != "default":
        raise UserError(
            f"finetune.lora.init={cfg.finetune.lora.init} rewrites the base weights, which qlora keeps in 4 bits; "
            "use method lora, or init=default"
        )
    if cfg.distributed.strategy == "fsdp" and not use_cuda(cfg):
        raise UserError(
            "distributed.strategy=fsdp needs CUDA GPUs (Accelerate runs FSDP on GPUs only); on CPU use zero3, "
            "which shards weights, gradients and optimizer states the same way"
        )
    from llmkit.train.launch import world_size as launched_world

    launched_world()  # a WORLD_SIZE that is not a count is one line here (Accelerate reads it with a traceback)
    compiles(cfg)  # refuses what cannot be compiled
    check_optimizer(cfg, finetuning)
    if cfg.precision.dtype == "fp8":
        check_float8(cfg, finetuning)
    if cfg.distributed.strategy in ZERO_STAGES or cfg.distributed.deepspeed_config is not None:
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(
                f"distributed.strategy={cfg.distributed.strategy} needs DeepSpeed: pip install 'llmkit[deepspeed]'"
            )
        deepspeed_config(cfg, world_size)


def check_optimizer(cfg: RunConfig, finetuning: bool) -> None:
    """Optimizers that keep their own state run with DDP only; Muon trains whole matrices; 8-bit AdamW needs torchao."""
    name = cfg.optimizer.name
    if name in ("adamw8bit", "muon") and cfg.distributed.strategy != "ddp":
        raise UserError(
            f"optimizer.name={name} keeps its own state layout, which distributed.strategy="
            f"{cfg.distributed.strategy} cannot shard; use distributed.strategy=ddp or optimizer.name=adamw"
        )
    if name == "muon" and finetuning and cfg.finetune.method in ("lora", "qlora"):
        raise UserError("optimizer.name=muon orthogonalizes whole weight matrices, not LoRA's thin factors; use adamw")
    if name == "adamw8bit" and importlib.util.find_spec("torchao") is None:
        raise UserError("optimizer.name=adamw8bit needs torchao: pip install 'llmkit[gpu]' (it runs on CPU too)")


def check_float8(cfg: RunConfig, finetuning: bool) -> None:
    """precision.dtype=fp8 (torchao's float8 training of the full weights) on plain data parallel only."""
    if wants_deepspeed(cfg) or cfg.distributed.strategy == "fsdp":
        raise UserError(
            f"precision.dtype=fp8 with distributed.strategy={cfg.distributed.strategy}: float8 training runs with "
            "ddp only (DeepSpeed and FSDP casts are not wired up); use ddp, or bf16 with this strategy"
        )
    if finetuning and cfg.finetune.method in ("lora", "qlora"):
        raise UserError(
            f"precision.dtype=fp8 with finetune.method={cfg.finetune.method}: float8 training is for full weights; "
            "LoRA keeps its frozen base in bf16 already, so use --precision bf16"
        )
    if importlib.util.find_spec("torchao") is None:
        raise UserError("precision.dtype=fp8 needs torchao: pip install 'llmkit[gpu]'")


def check_gpu_count(local_processes: int, gpus: int) -> None:
    """One process per GPU: more processes than this machine's GPUs would fail in the extra ranks."""
    if 0 < gpus < local_processes:
        raise UserError(
            f"--num-processes {local_processes} on a machine with {gpus} CUDA GPU(s): each process needs its own; "
            f"use --num-processes {gpus} or fewer, or --cpu to run {local_processes} processes on the CPU"
        )


def fsdp_plugin() -> Any:
    """FSDP2, one shard group per transformer layer (the model's `_no_split_modules`), whole state dicts on save."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False,
    )  # fmt: skip


def wants_deepspeed(cfg: RunConfig) -> bool:
    """A ZeRO strategy, a DeepSpeed file, or `accelerate launch --use_deepspeed` / a DeepSpeed accelerate config."""
    from_launcher = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return cfg.distributed.strategy in ZERO_STAGES or cfg.distributed.deepspeed_config is not None or from_launcher


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this run: the user's file, the launcher's, or the strategy's; "auto" resolved."""
    path = cfg.distributed.deepspeed_config
    strategy: str = cfg.distributed.strategy
    if path is None and strategy not in ZERO_STAGES:  # started by `accelerate launch --use_deepspeed ...`
        launcher_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        path = None if launcher_file == "none" else launcher_file
        strategy = f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    if path:
        source, config = path, read_json_mapping(path, "DeepSpeed config not found (start from recipes/deepspeed/)")
    else:
        source, config = f"--strategy {strategy}", deepspeed_template(strategy)
    micro, accumulation = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    wanted = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
        "gradient_clipping": cfg.optimizer.grad_clip or 0.0,
    }
    for key, value in wanted.items():
        _fill(config, [key], value, source, f"the recipe's {value}")
    for dtype in ("bf16", "fp16"):
        _fill(
            config, [dtype, "enabled"], cfg.precision.dtype == dtype, source, f"precision.dtype={cfg.precision.dtype}"
        )
    if "optimizer" in config or "scheduler" in config:
        raise UserError(
            f"{source}: remove the 'optimizer' and 'scheduler' sections: llmkit builds them from the recipe "
            "(optimizer.* and schedule.*)"
        )
    if offloads_optimizer(config):
        # llmkit builds DeepSpeed's CPU Adam itself (build_optimizer); Accelerate's swap would rebuild it in
        # Adam-with-L2 mode, losing AdamW's decoupled weight decay.
        config["zero_force_ds_cpu_optimizer"] = False
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3:
        _fill(config, ["zero_optimization", "stage3_gather_16bit_weights_on_model_save"], True, source, "true")
    return config


def offloads_optimizer(config: dict[str, Any]) -> bool:
    device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return str(device) != "none"


def _fill(config: dict[str, Any], keys: list[str], value: Any, source: str, expected: str) -> None:
    """Set an "auto" (or missing) value; refuse an explicit one that contradicts the recipe."""
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    current = node.get(keys[-1], "auto")
    if current == "auto":
        node[keys[-1]] = value
    elif current != value and not (isinstance(value, float) and float(current) == value):
        dotted = ".".join(keys)
        raise UserError(f'{source}: {dotted} is {current!r} but the run needs {expected}; set it to "auto"')


def write_templates(folder: Path) -> list[Path]:
    """recipes/deepspeed/<strategy>.json for every ZeRO strategy (`make docs` runs this)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for strategy in ZERO_STAGES:
        path = folder / f"{strategy}.json"
        path.write_text(json.dumps(deepspeed_template(strategy), indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written
