"""`llmkit plan`: before spending GPU hours, will the run fit, how long will it take, what will it cost?

Everything is computed from the recipe, and stated so a reader can check it:

* parameters: the recipe's model built on PyTorch's `meta` device (exact counts, no memory used); LoRA adds
  r * (in + out) per adapted projection;
* training FLOPs per token: 2N forward + 2N backward through activations + 2N_trainable for weight gradients
  (6N for full training), plus attention 12 * layers * sequence * width, where N counts the matrices that
  multiply (the input embedding is a lookup; a tied output head multiplies once); gradient checkpointing adds
  another 2N forward;
* memory per GPU: trained weights, gradients and optimizer states (fp32 master weights with Accelerate's mixed
  precision: 4 bytes per parameter, 4 per gradient, 8 for Adam's two moments), divided across GPUs as the
  strategy shards them; frozen weights (LoRA, freeze) in the compute dtype (2 bytes in bf16/fp16; QLoRA's
  4-bit matrices about 0.55 bytes); activations per layer and token: in a compiled step (train.compile, on by
  default on GPUs for ddp) COMPILED_LAYER_BYTES x width, else what the layer's operators keep (eager_layer_bytes)
  plus autocast's 16-bit copies of the trained matrices (a frozen layer keeps less; LoRA's adapters their inputs;
  frozen layers below every trained one nothing); eager attention's probabilities (eager_attention_bytes); in fp32
  about twice; only each layer's input with gradient
  checkpointing; for the real model's shape (a fine-tune's base model, not the recipe's defaults); the
  loss's logits: one chunk at a time with the fused head (llmkit.losses) and the head's float32 gradient, or the
  whole batch's in the compute dtype in a compiled step and under ZeRO-3/FSDP; plus 1 GiB of CUDA context. The
  estimate is checked against the peak of a real step measured on the CPU (llmkit.train.memory), which matches
  what CUDA's allocator reports for the same step;
* time: the recipe's token budget x FLOPs per token / (GPUs x peak x MFU); cost: GPU-hours x price.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from llmkit.config import RunConfig
from llmkit.errors import UserError, first_line
from llmkit.flops import (
    GIB,
    GPU_TYPES,
    count_parameters,
    idle_expert_parameters,
    matmul_parameters,
    model_shape,
    training_flops_per_token,
)

Stage = Literal["pretrain", "finetune"]
# Cheapest communication first: the first that fits is the suggestion.
STRATEGIES = ("ddp", "zero1", "zero2", "fsdp", "zero3", "zero2-offload", "zero3-offload")
CUDA_CONTEXT = 1 * GIB
# Bytes per token and unit of width one decoder layer keeps for backward in a compiled step (bf16): measured on the
# CPU with torch.compile's inductor, 43.6 for the Llama-1B shape and 44.5 for GPT-2 124M; 40 holds whole steps,
# with their loss, within 6% of the measured peak (docs/plan.md). Korthikanti et al. (2022) count 34.
COMPILED_LAYER_BYTES = 40.0


@dataclass
class Memory:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float = CUDA_CONTEXT
    # Gradients and activations never alive together: one process stepping after every micro-batch creates the
    # gradients during backward while it frees the activations, so its peak holds the larger of the two.
    not_together: float = 0.0

    @property
    def held(self) -> float:
        """What the tensors take at the peak: what `torch.cuda.max_memory_allocated` measures."""
        return self.weights + self.gradients + self.optimizer + self.activations - self.not_together

    @property
    def total(self) -> float:
        return self.held + self.overhead


@dataclass
class Plan:
    parameters: int
    trainable: int
    matmul_parameters: int
    flops_per_token: float
    tokens_per_step: int
    budget_tokens: int | None
    gpus: int
    gpu_type: str
    strategy: str
    mfu: float
    memory: Memory
    fits: bool
    hours: float | None
    cost: float | None
    suggestion: str
    by_strategy: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["memory"]["total"] = self.memory.total
        return data


@dataclass
class ModelSize:
    """What the plan needs of a model: parameter counts and the shape activations scale with."""

    total: int
    trainable: int
    matmul: int  # parameters that multiply (the input embedding is a lookup)
    vocab: int
    layers: int
    width: int
    intermediate: int = 0  # the MLP's width (0: 4 x width)
    kv_width: int = 0  # keys' (and values') width per token: grouped-query attention's is smaller (0: width)
    gated: bool = True  # a gated MLP with RMSNorm (Llama, Qwen, Mistral...), or GPT-2's GELU MLP and LayerNorm
    qk_norm_width: int = 0  # queries' and keys' width per token where each is normalized (Qwen3, OLMo 2)
    heads: int = 0  # attention heads: eager attention keeps each one's row of scores per token
    adapted_inputs: int = 0  # per layer, the input widths of the projections LoRA adapts (0: no adapters)
    recorded_layers: int | None = None  # layers whose activations backward keeps (None: all; freeze: fewer)
    trained_layers: int | None = None  # of those, layers whose own weights train (None: all; LoRA: none)


def recipe_stage(cfg: RunConfig) -> Stage:
    """The stage a recipe is planned for when `--stage` does not say: fine-tuning when it starts from a model and has
    a finetune section; otherwise pretraining, from scratch or continued from model.init_from."""
    return "finetune" if cfg.model.init_from and "finetune" in cfg.model_fields_set else "pretrain"


def _stage(name: str) -> Stage:
    if name == "pretrain":
        return "pretrain"
    if name == "finetune":
        return "finetune"
    raise UserError(f"--stage {name}: choose pretrain or finetune")


def model_size(cfg: RunConfig, vocab: int, stage: Stage) -> ModelSize:
    """The recipe's model (a fine-tune's base model), built on the meta device: counts and shape."""
    import torch

    from llmkit.models import model_context

    with torch.device("meta"):
        model = _meta_model(cfg, vocab)
    context = model_context(model)
    what, sequence = (
        ("data.block_size", cfg.data.block_size)
        if stage == "pretrain"
        else ("finetune.max_length", cfg.finetune.max_length)
    )
    if context and sequence > context:  # the run refuses it too
        raise UserError(
            f"{what} {sequence} exceeds the model's context of {context} tokens; shorten it, or extend a loaded "
            "model's context with model.rope_scaling and model.rope_factor"
        )
    total = count_parameters(model)[1]
    layers, width = model_shape(model.config)
    trainable, adapted_inputs, recorded, trained = _what_trains(model, cfg, stage, total, layers)
    return ModelSize(
        total,
        trainable,
        matmul_parameters(model, total),
        int(model.get_input_embeddings().weight.shape[0]),
        layers,
        width,
        **_layer_shape(model, width),
        adapted_inputs=adapted_inputs,
        recorded_layers=recorded,
        trained_layers=trained,
    )


def _what_trains(model: Any, cfg: RunConfig, stage: Stage, total: int, layers: int) -> tuple[int, int, int, int]:
    """(trainable parameters, input widths LoRA adapts per layer, layers backward records, layers that train)."""
    from llmkit.models import freeze_except, lora_target_modules

    if stage == "finetune" and cfg.finetune.method in ("lora", "qlora"):
        targets = set(cfg.finetune.lora.target_modules or lora_target_modules(model))
        trainable = adapted_inputs = 0
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in targets and _is_projection(module):
                inputs, outputs = _projection_shape(module)
                trainable += cfg.finetune.lora.r * (inputs + outputs)
                adapted_inputs += inputs
        return trainable, adapted_inputs // max(layers, 1), layers, 0
    if stage == "finetune" and cfg.finetune.method == "freeze":
        freeze_except(model, cfg.finetune.freeze_top_layers, cfg.finetune.trainable_modules)
        return count_parameters(model)[0], 0, *_recorded_layers(model)
    return total, 0, layers, layers


def _layer_shape(model: Any, width: int) -> dict[str, Any]:
    """What a layer's activations scale with, from the model's config: see ModelSize."""
    config = model.config
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1)
    head_dim = int(getattr(config, "head_dim", 0) or width // heads)
    kv_width = int(getattr(config, "num_key_value_heads", 0) or heads) * head_dim
    intermediate = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * width)
    top_k = getattr(config, "num_experts_per_tok", None)
    if isinstance(top_k, int) and idle_expert_parameters(model):  # a token runs through top_k experts' MLPs
        expert = int(getattr(config, "moe_intermediate_size", 0) or intermediate)
        intermediate = top_k * expert + int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
    qk_norm = any(name.endswith(".q_norm") for name, _ in model.named_modules())
    return {
        "intermediate": intermediate,
        "kv_width": kv_width,
        "gated": hasattr(config, "intermediate_size"),  # GPT-2's configs name theirs n_inner
        "qk_norm_width": heads * head_dim + kv_width if qk_norm else 0,
        "heads": heads,
    }


def _is_projection(module: Any) -> bool:
    """A linear layer LoRA adapts: torch's Linear, or GPT-2's Conv1D (its weight is [in, out])."""
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _projection_shape(module: Any) -> tuple[int, int]:
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    return int(module.weight.shape[0]), int(module.weight.shape[1])


def _recorded_layers(model: Any) -> tuple[int, int]:
    """(blocks whose activations backward keeps, blocks that train): from the lowest block with a trained parameter
    up, or every block when the input embedding trains (a frozen block below every trained one is not recorded)."""
    from llmkit.models import block_list

    trains = [any(p.requires_grad for p in block.parameters()) for block in block_list(model)]
    if model.get_input_embeddings().weight.requires_grad:
        return len(trains), sum(trains)
    return (len(trains) - trains.index(True) if True in trains else 0), sum(trains)


def _meta_model(cfg: RunConfig, vocab: int) -> Any:
    from llmkit.models import Vocabulary, build_model, extend_context

    if cfg.model.init_from:
        from transformers import AutoConfig, AutoModelForCausalLM

        from llmkit.hub import prepare_hub_access

        source = _config_source(cfg.model.init_from)
        prepare_hub_access(source)
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
        except Exception as exc:  # OSError offline, ValueError for unknown model types
            reason = first_line(exc)
            raise UserError(
                f"model.init_from {cfg.model.init_from}: cannot read the model's config ({reason})"
            ) from None
        if cfg.model.rope_scaling != "none":
            extend_context(config, cfg.model.rope_scaling, cfg.model.rope_factor, cfg.model.init_from)
        return AutoModelForCausalLM.from_config(config)
    # The attention kernel changes no count, and flash-attn need not be installed where the plan is made.
    return build_model(cfg.model.model_copy(update={"attn_implementation": "sdpa"}), Vocabulary(vocab))


def _config_source(init_from: str) -> str:
    """Where the shape of the model a run starts from is read, as training reads it: a run directory means its final
    model, a checkpoint its model/, a LoRA run its base (merged, it has the base's shape); a hub name is itself."""
    from llmkit.models import adapter_base
    from llmkit.runs import resolve_model_dir

    model_dir = resolve_model_dir(init_from)
    return adapter_base(model_dir) or str(model_dir)


def estimate_memory(
    cfg: RunConfig,
    size: ModelSize,
    strategy: str,
    gpus: int,
    gradient_checkpointing: bool,
    stage: Stage,
    teacher: ModelSize | None = None,
) -> Memory:
    """Bytes per GPU under `strategy` (see the module docstring for every term); `teacher`: a live distillation
    teacher, whole on every GPU in the compute dtype, with its logits."""
    from llmkit.train.strategies import compiles

    compute_bytes = memory_dtype(cfg)
    weights, gradients, optimizer = _sharded_state(*_training_state(cfg, size, stage), strategy, max(gpus, 1))
    micro, seq = cfg.train.micro_batch_size, _sequence(cfg, stage)
    scale = 2.0 if cfg.precision.dtype == "fp32" else 1.0
    compiled = strategy == "ddp" and compiles(cfg, cuda=True)  # as the run would decide on a GPU
    dropout = stage == "finetune" and cfg.finetune.method in ("lora", "qlora") and cfg.finetune.lora.dropout > 0
    layers = size.layers if size.recorded_layers is None else size.recorded_layers
    trained = layers if size.trained_layers is None else size.trained_layers
    kept = []  # per token, of a layer that trains and of one that does not
    for frozen in (False, True):
        eager = eager_layer_bytes(size, scale, frozen, dropout)
        kept.append(min(COMPILED_LAYER_BYTES * size.width * scale, eager) if compiled else eager)
    if cfg.model.attn_implementation == "eager":  # compiled or not, fused attention's memory saving is gone
        kept = [layer + eager_attention_bytes(size, seq, scale) for layer in kept]
    logits = _logits_bytes(cfg, stage, strategy, compiled, micro * seq, size)
    if gradient_checkpointing:  # each layer's input: the residual stream, float32 beside float32 master weights
        stream = 2.0 if size.adapted_inputs and scale == 1.0 else 4.0  # (16-bit from LoRA's frozen embedding)
        activations = seq * micro * stream * size.width * layers
        # and one layer's full set, recomputed in backward, or the loss's logits at the end of forward
        logits = max(logits, seq * micro * max(kept[0] if trained else 0, kept[1]))
    else:
        activations = seq * micro * (trained * kept[0] + (layers - trained) * kept[1])
    # autocast's 16-bit copies of the trained matrices (a compiled step recomputes them, unless it checkpoints)
    if strategy == "ddp" and scale == 1.0 and (not compiled or gradient_checkpointing):
        activations += 2.0 * min(size.matmul, size.trainable)
    if stage == "finetune" and _task(cfg).keeps_base(cfg):  # a frozen copy of the start (GRPO's KL reference)
        weights += compute_bytes * size.total
    if teacher is not None:  # its weights, its logits, and one chunk of both sides' float32 log-softmax
        from llmkit.train.distill import ROWS_PER_CHUNK

        weights += compute_bytes * teacher.total
        activations += compute_bytes * micro * seq * teacher.vocab + 16.0 * ROWS_PER_CHUNK * teacher.vocab
    if cfg.train.activation_offload:  # saved in CPU memory: the GPU holds one layer's while it computes
        activations = activations / max(size.layers, 1)
    activations += logits
    single_step = strategy == "ddp" and gpus <= 1 and cfg.train.grad_accum_steps == 1
    return Memory(
        weights, gradients, optimizer, activations, not_together=min(gradients, activations) if single_step else 0.0
    )


def _training_state(cfg: RunConfig, size: ModelSize, stage: Stage) -> tuple[float, float, float]:
    """Bytes of weights, gradients and optimizer states on one process before sharding: fp32 master weights of
    what trains, frozen weights in the compute dtype (QLoRA's 4-bit matrices ~0.55 bytes), Adam's two moments."""
    state_bytes = _optimizer_state_bytes(cfg, size)
    adapters = stage == "finetune" and cfg.finetune.method in ("lora", "qlora")
    frozen = size.total if adapters else size.total - size.trainable  # adapters come on top of the base model
    if adapters and cfg.finetune.method == "qlora":
        frozen_bytes = 0.55 * size.matmul + 2.0 * (size.total - size.matmul)  # 4-bit matrices, 16-bit embedding
    else:
        frozen_bytes = memory_dtype(cfg) * frozen
    return 4.0 * size.trainable + frozen_bytes, 4.0 * size.trainable, state_bytes


def _optimizer_state_bytes(cfg: RunConfig, size: ModelSize) -> float:
    """Adam's two float32 moments (8 bytes a parameter); 8-bit AdamW's two 8-bit moments and a float32 scale per
    256 (2.03); Muon's one momentum on the hidden matrices (4) and AdamW's on the rest; SGD's momentum (4) or none."""
    name, trainable = cfg.optimizer.name, size.trainable
    if name in ("adamw", "adam"):
        return 8.0 * trainable
    if name == "adamw8bit":
        return (2.0 + 8.0 / 256) * trainable
    if name == "muon":
        hidden = min(trainable, max(0, size.matmul - size.vocab * size.width))  # all matrices but the head
        return 4.0 * hidden + 8.0 * (trainable - hidden)
    return (4.0 if cfg.optimizer.momentum > 0 else 0.0) * trainable


def _sharded_state(
    weights: float, gradients: float, optimizer: float, strategy: str, shard: int
) -> tuple[float, float, float]:
    """What one GPU holds: ZeRO-1 shards optimizer states, ZeRO-2 also gradients, ZeRO-3 and FSDP also weights;
    offload moves optimizer states (and ZeRO-3's weights) to CPU memory."""
    if strategy in ("zero1", "zero2", "zero3", "fsdp", "zero2-offload", "zero3-offload"):
        optimizer /= shard
    if strategy in ("zero2", "zero3", "fsdp", "zero2-offload", "zero3-offload"):
        gradients /= shard
    if strategy in ("zero3", "fsdp", "zero3-offload"):
        weights /= shard
    if strategy.endswith("offload"):
        optimizer = 0.0
    if strategy == "zero3-offload":
        weights = 0.0
    return weights, gradients, optimizer


def _logits_bytes(cfg: RunConfig, stage: Stage, strategy: str, compiled: bool, tokens: int, size: ModelSize) -> float:
    """The loss's logits: none (a classification head); whole (distillation, tasks that need them), with their
    gradient and the float32 log-softmax; a compiled step's, in the compute dtype, their gradient written mostly
    over them; whole with their gradient (ZeRO-3/FSDP, whose head is not fused); or the fused head's one chunk (its
    16-bit and float32 logits and logsumexp's float32 temporary) and, when the head trains, its weight's float32
    gradient, computed in the forward pass and kept for backward."""
    from llmkit.losses import CHUNK_ELEMENTS

    compute_bytes = memory_dtype(cfg)
    head = "whole" if cfg.distill.teacher else _task(cfg).logits if stage == "finetune" else "fused"
    logits = tokens * size.vocab
    if head == "none":  # a classification head: no vocabulary logits
        return 0.0
    if head == "whole":
        return (2.0 * compute_bytes + 4.0) * logits
    if compiled:
        return 1.5 * compute_bytes * logits
    if strategy in ("zero3", "fsdp", "zero3-offload"):
        return 2.0 * compute_bytes * logits
    head_trains = stage == "pretrain" or cfg.finetune.method == "full"
    return 10.0 * min(logits, CHUNK_ELEMENTS) + (4.0 * size.vocab * size.width if head_trains else 0.0)


def eager_layer_bytes(size: ModelSize, scale: float = 1.0, frozen: bool = False, dropout: bool = False) -> float:
    """Bytes per token one decoder layer keeps for backward when it runs eagerly: under 16-bit autocast, or in
    float32 (`scale` 2), counted operator by operator in transformers' layers.

    Llama-style (RMSNorm, gated MLP): each norm's float32 input and normalized copy; the projections' inputs (the
    16-bit copies autocast makes for q, k, v, gate and up, or the two norms' float32 outputs); attention's q, k, v
    and output, o_proj's input, and the MLP's gate, up, activation and product. GPT-2-style: each LayerNorm's
    float32 input, the projections' inputs, q/k/v, the attention output and its merged copy, and five tensors of
    the MLP's width in GELU's tanh form. Normalized queries and keys add their float32 input and 16-bit output.

    A `frozen` layer's projections keep no inputs (their weights take no gradient), and with LoRA's frozen 16-bit
    embedding the residual stream is 16-bit, so each RMSNorm keeps only its float32 copy; each adapter keeps its own
    16-bit input and, with `dropout`, the dropout's mask (a byte per element on a GPU; the CPU's dropout keeps a
    float32 one).

    Measured on the CPU within 5% (docs/plan.md). A compiled step keeps less (COMPILED_LAYER_BYTES x width): the
    compiler recomputes the cheap ones."""
    h, kv, i = size.width, size.kv_width or size.width, size.intermediate or 4 * size.width
    adapters = size.adapted_inputs * (2.0 * scale + (1.0 if dropout else 0.0))
    if size.gated:
        qk_norms = 6.0 * size.qk_norm_width
        if frozen:
            norms = 8.0 * h if size.adapted_inputs else 16.0 * h
            return norms + qk_norms + scale * (4.0 * h + 4.0 * kv + 6.0 * i) + adapters
        projection_inputs = 10.0 * h if scale == 1.0 else 8.0 * h
        return 16.0 * h + projection_inputs + qk_norms + scale * (6.0 * h + 4.0 * kv + 8.0 * i)
    if frozen:
        return 8.0 * h + scale * (8.0 * h + 8.0 * i) + adapters
    return 8.0 * h + scale * (14.0 * h + 10.0 * i)


def eager_attention_bytes(size: ModelSize, sequence: int, scale: float = 1.0) -> float:
    """Bytes per token one layer keeps with model.attn_implementation=eager: its row of attention probabilities in
    every head, over the whole sequence, as the float32 softmax output and (under 16-bit autocast) the 16-bit copy
    the product with the values reads. sdpa and flash attention keep none (they recompute them in backward).
    Measured on the CPU, eager and compiled (docs/plan.md)."""
    return size.heads * sequence * (6.0 if scale == 1.0 else 4.0)


def _sequence(cfg: RunConfig, stage: Stage) -> int:
    """Tokens in one row of a micro-batch: a block, an example, or a pair's two answers side by side."""
    if stage == "pretrain":
        return cfg.data.block_size
    return cfg.finetune.max_length * _task(cfg).sequences_per_row


def _task(cfg: RunConfig) -> Any:
    from llmkit.train.tasks import get_task

    return get_task(cfg.finetune.task)


def plan_run(
    cfg: RunConfig,
    gpus: int = 1,
    gpu_type: str = "h100",
    strategy: str = "ddp",
    mfu: float = 0.4,
    price_per_gpu_hour: float | None = None,
    gradient_checkpointing: bool = False,
    train_tokens: int | None = None,
    stage: str | None = None,
) -> Plan:
    planned = _stage(stage) if stage is not None else recipe_stage(cfg)
    gradient_checkpointing = gradient_checkpointing or cfg.train.gradient_checkpointing  # the flag, or the recipe
    _check_request(cfg, planned, gpus, gpu_type, strategy, mfu, price_per_gpu_hour, train_tokens)
    rows, forwards = _task(cfg).plan_shape(cfg) if planned == "finetune" else (1, 0)
    if rows > 1:  # the model sees this many rows per micro-batch row (GRPO's answers)
        train = cfg.train.model_copy(update={"micro_batch_size": cfg.train.micro_batch_size * rows})
        cfg = cfg.model_copy(update={"train": train})
    peak, capacity = GPU_TYPES[gpu_type]
    vocab, vocab_source = vocabulary_size(cfg) if not cfg.model.init_from else (0, cfg.model.init_from)
    size = model_size(cfg, vocab, planned)
    total, trainable, matmul, vocab = size.total, size.trainable, size.matmul, size.vocab
    seq = _sequence(cfg, planned)
    flops = training_flops_per_token(matmul, trainable, size.layers, size.width, seq, gradient_checkpointing)
    flops += forwards * (2 * matmul + 4 * size.layers * seq * size.width)  # the task's own forward passes
    teacher = teacher_size(cfg)
    teacher_flops = 2 * teacher.matmul + 4 * teacher.layers * seq * teacher.width if teacher else 0  # a forward
    live = teacher if teacher is not None and not cfg.distill.top_k else None
    flops += teacher_flops if live else 0
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * gpus * seq
    budget = _budget_tokens(cfg, tokens_per_step, train_tokens)
    by_strategy = {
        name: estimate_memory(cfg, size, name, gpus, gradient_checkpointing, planned, live).total for name in STRATEGIES
    }
    memory = estimate_memory(cfg, size, strategy, gpus, gradient_checkpointing, planned, live)
    usable = 0.9 * capacity
    suggestion = _suggestion(by_strategy, usable, capacity, gradient_checkpointing)
    hours = budget * flops / (gpus * peak * mfu) / 3600 if budget else None
    cost = hours * gpus * price_per_gpu_hour if hours is not None and price_per_gpu_hour is not None else None
    notes = [f"vocabulary {vocab:,} from {vocab_source}"] if not cfg.model.init_from else []
    if budget is None:
        notes.append("no token budget: set train.max_tokens/max_steps, run data-prep, or pass --train-tokens")
    notes.append(_stage_note(cfg, planned))
    if planned == "finetune":
        notes.extend(_task(cfg).plan_notes(cfg))
    if cfg.precision.dtype == "fp8":
        notes.append(
            "precision fp8: memory as in bf16 (torchao keeps what backward needs in bf16) and time at the "
            "bf16 rate; float8's speed-up depends on the layer widths: measure it with bench/mfu.py --fp8"
        )
    if cfg.train.activation_offload:
        on_gpu = cfg.model_copy(update={"train": cfg.train.model_copy(update={"activation_offload": False})})
        kept = estimate_memory(on_gpu, size, strategy, gpus, gradient_checkpointing, planned, live).activations
        notes.append(
            f"activation offload: about {(kept - memory.activations) / GIB:.2f} GiB of activations per process in "
            "CPU memory (pinned), copied back during backward; the step is not compiled"
        )
    if teacher is not None:
        notes.extend(_distill_notes(cfg, planned, teacher, teacher_flops, gpus * peak * mfu, memory_dtype(cfg)))
    return Plan(
        total,
        trainable,
        matmul,
        flops,
        tokens_per_step,
        budget,
        gpus,
        gpu_type,
        strategy,
        mfu,
        memory,
        memory.total <= usable,
        hours,
        cost,
        suggestion,
        by_strategy,
        notes,
    )


def _check_request(
    cfg: RunConfig,
    stage: Stage,
    gpus: int,
    gpu_type: str,
    strategy: str,
    mfu: float,
    price_per_gpu_hour: float | None,
    train_tokens: int | None,
) -> None:
    if stage == "finetune" and not cfg.model.init_from:
        raise UserError("--stage finetune: set model.init_from to the model being fine-tuned")
    if gpu_type not in GPU_TYPES:
        raise UserError(f"--gpu-type {gpu_type}: choose one of {', '.join(GPU_TYPES)}")
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu:g}: give the fraction of the peak a run reaches, above 0 and at most 1 (0.4)")
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: must be at least 1")
    for name, value in (("--price-per-gpu-hour", price_per_gpu_hour), ("--train-tokens", train_tokens)):
        if value is not None and not value > 0:  # also refuses nan
            raise UserError(f"{name} {value}: must be a positive number")


def _suggestion(by_strategy: dict[str, float], usable: float, capacity: float, gradient_checkpointing: bool) -> str:
    """The cheapest strategy that fits; fsdp is estimated for comparison, but not suggested until it has run on a
    GPU (docs/distributed.md)."""
    fitting = [name for name in STRATEGIES if by_strategy[name] <= usable and name != "fsdp"]
    if fitting:
        return f"{fitting[0]} fits ({by_strategy[fitting[0]] / GIB:.1f} of {capacity / GIB:.0f} GiB per GPU)"
    if not gradient_checkpointing:
        return "nothing fits: add gradient checkpointing or lower train.micro_batch_size"
    return "nothing fits: lower train.micro_batch_size, use more GPUs, or LoRA"


def teacher_size(cfg: RunConfig) -> ModelSize | None:
    """distill.teacher's size, from its config on the meta device (None without a teacher)."""
    if not cfg.distill.teacher:
        return None
    from llmkit.runs import resolve_model_dir

    source = str(resolve_model_dir(cfg.distill.teacher))
    teacher_cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"init_from": source}),
            "finetune": cfg.finetune.model_copy(update={"method": "full"}),
        }
    )
    return model_size(teacher_cfg, 0, "pretrain")


def memory_dtype(cfg: RunConfig) -> float:
    return 4.0 if cfg.precision.dtype == "fp32" else 2.0


def _stage_note(cfg: RunConfig, stage: Stage) -> str:
    if stage == "finetune":
        return f"stage: fine-tuning {cfg.model.init_from} ({cfg.finetune.task}; --stage pretrain plans pretraining)"
    if cfg.model.init_from:
        return f"stage: continued pretraining of {cfg.model.init_from} (--stage finetune plans a fine-tune)"
    return "stage: pretraining from scratch"


def _distill_notes(
    cfg: RunConfig, stage: Stage, teacher: ModelSize, forward_flops: float, flops_per_s: float, compute_bytes: float
) -> list[str]:
    """What distillation costs beyond the student: the live teacher, or the top-k cache's pass and disk."""
    from llmkit.train.distill import cache_bytes

    head = f"distillation: teacher {cfg.distill.teacher}, {teacher.total / 1e6:,.1f}M parameters"
    weights = compute_bytes * teacher.total / GIB
    if not cfg.distill.top_k:
        return [
            f"{head}, live: {weights:.2f} GiB of weights and its logits per micro-batch on every GPU (counted above), "
            f"a forward pass per token ({forward_flops / 1e9:,.2f} GFLOPs, counted in the FLOPs)"
        ]
    k = cfg.distill.top_k
    tokens = _train_tokens(cfg) if stage == "pretrain" else None
    per_token = cache_bytes(1, k, teacher.vocab)
    if tokens:
        disk = f"{cache_bytes(tokens, k, teacher.vocab) / GIB:.2f} GiB on disk for {tokens:,} training tokens"
        hours = f", one teacher pass of about {tokens * forward_flops / flops_per_s / 3600:.2f} h before step 1"
    else:
        disk, hours = f"{per_token} bytes per training token on disk", ", one teacher pass before step 1"
    return [f"{head}, top-{k} cache: {disk}{hours}; no teacher in memory while training"]


def _train_tokens(cfg: RunConfig) -> int | None:
    """Training tokens of the prepared dataset, when it exists."""
    import json
    from pathlib import Path

    manifest = Path(cfg.data.dataset_dir) / "manifest.json"
    if not manifest.is_file():
        return None
    return int(json.loads(manifest.read_text())["splits"]["train"]["tokens"])


def vocabulary_size(cfg: RunConfig) -> tuple[int, str]:
    """(padded vocabulary, where the number comes from): the prepared dataset, the tokenizer, or the recipe."""
    import json
    from pathlib import Path

    from llmkit.models import padded_vocab_size

    manifest = Path(cfg.data.dataset_dir) / "manifest.json"
    if manifest.is_file():
        size = json.loads(manifest.read_text())["tokenizer"]["vocab_size"]
        return padded_vocab_size(size), f"the prepared dataset {cfg.data.dataset_dir}"
    if cfg.data.tokenizer is not None:
        from llmkit.data.tokenizer import load_tokenizer

        try:
            return padded_vocab_size(len(load_tokenizer(cfg.data.tokenizer))), f"tokenizer {cfg.data.tokenizer}"
        except UserError:
            return padded_vocab_size(cfg.data.vocab_size), (
                f"data.vocab_size: tokenizer {cfg.data.tokenizer} is not reachable, so its size is a guess"
            )
    return padded_vocab_size(cfg.data.vocab_size), "data.vocab_size (the tokenizer data-prep will train)"


def _budget_tokens(cfg: RunConfig, tokens_per_step: int, train_tokens: int | None) -> int | None:
    """The recipe's budget in tokens; epochs need the prepared dataset's size (or --train-tokens)."""
    if cfg.train.max_tokens is not None:
        return cfg.train.max_tokens
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps * tokens_per_step
    epochs = cfg.train.max_epochs or 1.0
    if train_tokens is None:
        train_tokens = _train_tokens(cfg)
    return int(math.ceil(epochs * train_tokens)) if train_tokens else None
