"""Builders shared by every training command: run directory, accelerator, optimizer, budget."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmkit.config import RunConfig, TrainConfig
from llmkit.errors import UserError
from llmkit.outputs import llmkit_wrote, replaces
from llmkit.train.strategies import Strategy, accelerator_options, check_available, compiles, use_cuda

if TYPE_CHECKING:
    from accelerate import Accelerator


def claim_run_dir(
    path: str | Path, overwrite: bool, accelerator: Accelerator, restart_unsaved_run: bool = False
) -> Path:
    """Create the run directory; refuse one that already holds a run unless `overwrite` is given.

    `restart_unsaved_run` (from `--resume auto`) replaces a run that never saved a checkpoint. Every process
    checks before the main process changes anything, so all of them reach the same decision.
    """
    run_dir = Path(path)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is a file; choose another --out")
    replace = replaces(run_dir, overwrite or (restart_unsaved_run and llmkit_wrote(run_dir)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if replace:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return run_dir


def make_accelerator(cfg: RunConfig) -> tuple[Any, Strategy]:
    """An Accelerator for the run's precision and strategy, and the Strategy to ask about it.

    fp16 needs CUDA (it relies on a loss scaler). Without CUDA, processes talk over gloo.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision, cuda = cfg.precision, use_cuda(cfg)
    if precision.dtype == "fp16" and not cuda:
        raise UserError("precision.dtype=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    check_available(cfg)
    if cfg.train.deterministic:
        use_deterministic_kernels()
    autocast = autocast_precision(cfg)  # fp8: bf16, and apply_float8 converts the body's linear layers
    options = accelerator_options(cfg, cuda)
    # Accelerate keeps its settings in a process-wide singleton; a second run in the same Python process
    # (a notebook, the test suite) may ask for another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    # dynamo_backend "no": llmkit compiles the training step itself (llmkit.train.step); Accelerate's compiled
    # wrapper would rename every key of every saved state dict.
    accelerator = Accelerator(mixed_precision="no" if autocast == "fp32" else autocast, dynamo_backend="no", **options)
    strategy = Strategy(accelerator)
    if cfg.distributed.strategy == "fsdp" and not strategy.fsdp:  # never fall back to DDP silently
        raise UserError(f"Accelerate did not enable FSDP here ({accelerator.distributed_type}); use ddp or zero3")
    return accelerator, strategy


def use_deterministic_kernels() -> None:
    """train.deterministic: kernels that give the same bits every time, so a GPU run repeats and resumes bitwise.

    cuBLAS needs a fixed workspace (read when its first handle is made, so set before any matmul); PyTorch then
    raises on any op that has no deterministic implementation rather than silently varying; the memory-efficient
    attention backward accumulates in a varying order, so SDPA uses flash or math attention instead.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if torch.cuda.is_available():
        torch.backends.cuda.enable_mem_efficient_sdp(False)


def apply_kernels(model: Any, cfg: RunConfig) -> bool:
    """model.kernels: patch Liger's Triton kernels (RMSNorm, SwiGLU) into this model; True when applied.

    Call before LoRA adapters are attached (they wrap the projections the fused MLP calls). auto applies them on
    CUDA when liger-kernel is installed and knows the architecture; liger insists, with one line when it cannot.
    """
    import importlib.util

    if cfg.model.kernels == "none" or compiles(cfg):  # compile fuses these layers itself
        return False
    problem = None
    if not use_cuda(cfg):
        problem = "needs a CUDA GPU (Triton kernels)"
    elif importlib.util.find_spec("liger_kernel") is None:
        problem = "needs liger-kernel: pip install 'llmkit[gpu]'"
    else:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        model_type = getattr(model.config, "model_type", None)
        if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            problem = f"has no kernels for model type {model_type}"
    if problem is not None:
        if cfg.model.kernels == "liger":
            raise UserError(f"model.kernels=liger: Liger {problem}; use model.kernels=auto or none")
        return False
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    # The loss is llmkit's (language_model_loss), so Liger's patched forward and cross-entropy stay off. RoPE stays
    # PyTorch's: Liger patches it as a function of the modeling module, which no instance patch can limit.
    with module_globals_kept(type(model).__module__):
        _apply_liger_kernel_to_instance(
            model,
            rope=False,
            rms_norm=True,
            swiglu=True,
            layer_norm=True,
            geglu=True,
            cross_entropy=False,
            fused_linear_cross_entropy=False,
        )
    return True


@contextmanager
def module_globals_kept(module_name: str) -> Iterator[None]:
    """Undo, on the way out, whatever the block rebinds in a module's namespace (Liger's apply functions replace
    a modeling module's classes and functions for the whole process, so a model built later, on the CPU by an
    export, would run Triton kernels); patches of one model instance stay."""
    import sys

    namespace = vars(sys.modules[module_name])
    saved = dict(namespace)
    try:
        yield
    finally:
        for name in [name for name in namespace if name not in saved]:
            del namespace[name]
        namespace.update(saved)


def autocast_precision(cfg: RunConfig) -> str:
    """fp32, bf16 or fp16: what autocast computes in and frozen weights are held in (fp8 runs the rest in bf16)."""
    return "bf16" if cfg.precision.dtype == "fp8" else cfg.precision.dtype


def compute_dtype(cfg: RunConfig) -> torch.dtype:
    """autocast_precision as a torch dtype."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[autocast_precision(cfg)]


FLOAT8_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with float8 tensor cores


def apply_float8(model: Any, cfg: RunConfig) -> int:
    """precision.dtype=fp8: the linear layers of the model's body run their three matmuls in float8 through torchao
    (dynamic tensor-wise scales; e4m3 inputs and weights, e5m2 gradients), inside bf16 autocast; returns how many.

    Heads (the output layer, a classifier) and layers whose sides are not multiples of 16 (what float8 matmuls
    need) stay in bf16, as in torchtitan. Weights, gradients, optimizer states and checkpoints are unchanged
    (float32 masters, plain nn.Linear keys), so a checkpoint loads anywhere. Call before the optimizer and
    `accelerator.prepare` (which compiles the converted model)."""
    if cfg.precision.dtype != "fp8":
        return 0
    if use_cuda(cfg) and torch.cuda.get_device_capability() < FLOAT8_CAPABILITY:
        major, minor = torch.cuda.get_device_capability()
        raise UserError(
            f"precision.dtype=fp8 needs float8 tensor cores (compute capability 8.9+: Ada, Hopper or newer); "
            f"{torch.cuda.get_device_name()} is {major}.{minor}; use --precision bf16"
        )
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    body = getattr(model, getattr(model, "base_model_prefix", ""), model)
    in_body = {id(module) for module in body.modules()}

    def in_float8(module: torch.nn.Module, name: str) -> bool:
        return (
            type(module) is torch.nn.Linear
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
            and id(module) in in_body
        )

    # pad_inner_dim: a fine-tune's padded micro-batches may hold any number of tokens (the gradient matmul's
    # inner side); multiples of 16 are left as they are. A CPU has no float8 units: torch's float8 matmul there is
    # a reference kernel some 50x slower than torchao's emulation, the float32 matmul of the same float8-rounded
    # operands, which gives the same numbers up to the order of float32's sums (tests/test_float8.py).
    settings = Float8LinearConfig(pad_inner_dim=True, emulate=not use_cuda(cfg))
    convert_to_float8_training(model, module_filter_fn=in_float8, config=settings)
    converted = sum(isinstance(module, Float8Linear) for module in model.modules())
    if converted == 0:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise UserError(
            f"precision.dtype=fp8: {kind} has no linear layer float8 can run (torch.nn.Linear with sides that are "
            "multiples of 16; GPT-2 uses Conv1D); use --precision bf16"
        )
    return converted


def describe_speedups(liger: bool, float8_layers: int) -> str:
    """The start line's note on what makes this run faster than plain PyTorch ("" when nothing does)."""
    parts = ["Liger kernels"] if liger else []
    if float8_layers:
        parts.append(f"float8 matmuls in {float8_layers} linear layers")
    return "".join(f", {part}" for part in parts)


def language_model_loss(model: Any, strategy: Strategy, liger: bool = False) -> Callable[..., Any]:
    """The causal-LM loss of a run: fused with the output head, so no logits exist (llmkit.losses.fused_lm_nll,
    or Liger's Triton kernel when `liger`), where every process holds whole weights and the architecture's logits
    are a plain linear head; else from the logits the model returns, with a chunked float32 softmax. Call before
    `accelerator.prepare`."""
    from llmkit.losses import causal_lm_nll, fused_lm_nll, liger_lm_nll
    from llmkit.models import defer_output_head

    # Sharded weights: the head's weight exists only inside the forward.
    weight = defer_output_head(model) if strategy.whole_weights else None
    if weight is None:
        return lambda logits, batch: causal_lm_nll(logits, batch["labels"])
    fused = liger_lm_nll if liger else fused_lm_nll
    return lambda hidden, batch: fused(hidden, weight, batch["labels"])


def enable_gradient_checkpointing(model: Any) -> None:
    """Keep only each layer's input and recompute the rest in the backward pass. Call it on the model as it trains
    (after LoRA is attached).

    Non-reentrant checkpointing computes the adapters' gradients whether or not a layer's input requires one, so
    the hook transformers and peft add to make the embeddings' output require a gradient (which reentrant
    checkpointing needs) is removed: inside a compiled step its `requires_grad_` broke the graph."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"{type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers, where the older name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()
    model.config.use_cache = False


def steps_for_budget(cfg: TrainConfig, batches_per_epoch: int, tokens_per_step: int) -> int:
    """Optimizer steps for the budget given in steps, tokens or epochs (default: one epoch)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.max_tokens is not None:
        return max(1, math.ceil(cfg.max_tokens / tokens_per_step))
    epochs = cfg.max_epochs if cfg.max_epochs is not None else 1.0
    return max(1, math.ceil(epochs * batches_per_epoch / cfg.grad_accum_steps))
