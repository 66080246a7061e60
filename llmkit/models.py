"""Models: build a decoder from the recipe, or load an existing Hugging Face checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmkit.config import ModelConfig, read_json_mapping
from llmkit.errors import UserError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def model_context(model_or_config: Any) -> int:
    """The longest sequence a model takes, in tokens (0 when its config does not say)."""
    config = getattr(model_or_config, "config", model_or_config)
    return int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 0)


@dataclass
class Vocabulary:
    """What build_model reads from a tokenizer, for a model built without one: its size and special ids."""

    size: int
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = 1

    def __len__(self) -> int:
        return self.size


def build_model(cfg: ModelConfig, tokenizer: Any) -> Any:
    """A freshly initialized causal LM whose vocabulary and special tokens come from `tokenizer`."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen3Config

    special = {
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vocab = padded_vocab_size(len(tokenizer))
    config: Any
    if cfg.arch in ("llama", "qwen3"):
        shape: dict[str, Any] = {
            "vocab_size": vocab,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size or _llama_mlp_width(cfg.hidden_size),
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
            "max_position_embeddings": cfg.context_length,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "tie_word_embeddings": cfg.tie_embeddings,
            "attention_dropout": cfg.dropout,
        }
        if cfg.arch == "llama":
            config = LlamaConfig(**shape, **special)
        else:  # Qwen3 fixes its head size apart from the width (128 by default): here width / heads, as Llama's
            config = Qwen3Config(**shape, head_dim=cfg.hidden_size // cfg.n_heads, use_sliding_window=False, **special)
    else:
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=cfg.hidden_size,
            n_inner=cfg.intermediate_size or 4 * cfg.hidden_size,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_positions=cfg.context_length,
            tie_word_embeddings=cfg.tie_embeddings,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            **special,
        )
    config._attn_implementation = cfg.attn_implementation
    return AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)


def load_model(
    name_or_path: str | Path,
    trust_remote_code: bool = False,
    dtype: Any = None,
    token: str | None = None,
    rope: tuple[str, float] | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """Load a causal LM from safetensors (a local directory or a hub name), with one-line errors; `rope`:
    (scaling type, factor) to extend its context (see `extend_context`); `attn_implementation`: the attention kernel
    to train with (model.attn_implementation; none saved in a model directory, so a resumed run names it again)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmkit.hub import prepare_hub_access

    prepare_hub_access(name_or_path)
    try:
        config = None  # read by from_pretrained itself, unless the context is to be extended first
        if rope is not None:
            config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, token=token)
            extend_context(config, *rope, where=str(name_or_path))
        return AutoModelForCausalLM.from_pretrained(
            str(name_or_path),
            config=config,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            dtype=dtype,
            token=token,
            attn_implementation=attn_implementation,
        )
    except UserError:
        raise
    except Exception as exc:  # OSError offline or missing files, ValueError for unknown architectures
        where = "directory" if Path(name_or_path).exists() else "hub name (offline or not found?)"
        reason = first_line(exc)
        raise UserError(f"{name_or_path}: cannot load a causal LM from this {where}: {reason}") from None


def extend_context(config: Any, scaling: str, factor: float, where: str) -> None:
    """Scale a RoPE model's rotary embedding by `factor` (transformers' own linear, dynamic, yarn or llama3 code reads
    `rope_parameters`) and raise its context to match. A config already scaled this way keeps its original length,
    so loading a scaled model again (a resumed fine-tune) does not scale twice."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        raise UserError(
            f"{where}: {config.model_type} has no rotary position embedding; model.rope_scaling extends RoPE models "
            "(Llama, Qwen, Mistral, Gemma...)"
        )
    already = params.get("rope_type", "default") == scaling and params.get("original_max_position_embeddings")
    original = int(already or model_context(config))
    if not original:
        raise UserError(f"{where}: its config gives no context length (max_position_embeddings) to extend")
    params.update(rope_type=scaling, factor=float(factor), original_max_position_embeddings=original)
    if scaling == "llama3":  # Llama 3.1's published settings
        params.setdefault("low_freq_factor", 1.0)
        params.setdefault("high_freq_factor", 4.0)
    config.rope_parameters = params
    config.max_position_embeddings = int(original * factor)


def rope_request(cfg: Any) -> tuple[str, float] | None:
    """(scaling type, factor) from `model.rope_scaling` / `model.rope_factor`, or None."""
    return None if cfg.model.rope_scaling == "none" else (cfg.model.rope_scaling, cfg.model.rope_factor)


def check_rope_applied(model: Any, cfg: Any, what: str) -> None:
    """Refuse a rope_scaling request a loading path could not honour (a scoring head, a quantized base)."""
    request = rope_request(cfg)
    params = getattr(model.config, "rope_parameters", None) or {}
    if request is not None and params.get("rope_type") != request[0]:
        raise UserError(f"model.rope_scaling is not supported for {what}; extend the base model's context first")


def check_vocab_fits(model: Any, tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Refuse a tokenizer with ids the model's embedding cannot hold."""
    weight = model.get_input_embeddings().weight
    embedding_rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 builds the model already sharded
    if len(tokenizer) > embedding_rows:
        raise UserError(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the model's embedding has {embedding_rows} rows; "
            "use the tokenizer the model was trained with"
        )


def padded_vocab_size(size: int, multiple: int = 64) -> int:
    """Round the embedding up to a multiple of 64: faster matmuls, and unused rows are never sampled."""
    return int(math.ceil(size / multiple) * multiple)


def _llama_mlp_width(hidden: int) -> int:
    return int(math.ceil(8 * hidden / 3 / 64) * 64)


def place_weights(model: Any, frozen_dtype: Any) -> dict[str, int]:
    """Trained weights in float32 (what the optimizer updates), frozen ones in the compute dtype: a LoRA, QLoRA or
    freeze fine-tune in bf16 holds its frozen base in bf16, never in float32 copies. Returns the bytes of each."""
    import torch

    held = {"trainable_bytes": 0, "frozen_bytes": 0}
    seen: set[int] = set()
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        if parameter.is_floating_point():
            wanted = torch.float32 if parameter.requires_grad else frozen_dtype
            if parameter.dtype != wanted:
                parameter.data = parameter.data.to(wanted)
        held["trainable_bytes" if parameter.requires_grad else "frozen_bytes"] += (
            parameter.numel() * parameter.element_size()
        )
    return held


# Architectures whose logits are exactly `lm_head(last hidden states)`: no soft-capping or scaling after the head.
PLAIN_HEAD_TYPES = frozenset(
    {
        "llama",
        "gpt2",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "phi3",
        "olmo",
        "olmo2",
        "starcoder2",
        "smollm3",
    }
)


class HiddenStatesHead(torch.nn.Module):
    """Stands in for a linear output head while training: returns the hidden states unchanged, and the loss runs
    the head's matmul itself a chunk of rows at a time (llmkit.losses.fused_lm_nll). It holds the same weight
    under the same name, so state dicts, weight tying, checkpoints and saved models are unchanged."""

    def __init__(self, weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def defer_output_head(model: Any) -> torch.nn.Parameter | None:
    """Swap a causal LM's plain linear head for a HiddenStatesHead; returns the head's weight, or None (and changes
    nothing) for an architecture that transforms its logits further or whose head is not a plain linear layer."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if getattr(inner.config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    inner.set_output_embeddings(HiddenStatesHead(head.weight))
    return head.weight


# Projection names of common architectures: Llama/Mistral/Qwen, GPT-2, BERT-style encoders.
LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "c_attn",
    "c_proj",
    "c_fc",
    "query",
    "key",
    "value",
    "dense",
)


def lora_target_modules(model: Any) -> list[str]:
    """The leaf projection names present in `model` that LoRA should adapt."""
    found = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if not list(module.children())}
    targets = [name for name in LORA_TARGETS if name in found]
    if not targets:
        raise UserError("cannot detect LoRA target modules for this architecture; set finetune.lora.target_modules")
    return targets


def attach_lora(model: Any, cfg: Any, task_type: str, new_token_ids: list[int]) -> Any:
    """Wrap `model` with LoRA (or DoRA) adapters; newly added tokens get trainable embedding rows."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    embedding_name = _embedding_module_name(model)
    targets = cfg.target_modules or lora_target_modules(model)
    _check_lora_targets(model, targets, embedding_name if new_token_ids else None)
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        # GPT-2's projections are Conv1D, weights stored (in, out): PEFT would switch this on itself, with a warning
        fan_in_fan_out=any(isinstance(module, Conv1D) for module in model.modules()),
        use_dora=cfg.dora,
        use_rslora=cfg.rslora,
        init_lora_weights=True if cfg.init == "default" else cfg.init,
        task_type=task_type,
        trainable_token_indices={embedding_name: new_token_ids} if new_token_ids else None,
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:  # a module type LoRA cannot adapt (a norm, say)
        raise UserError(f"finetune.lora.target_modules {targets}: {first_line(exc)}") from None
    if cfg.init != "default":  # the base now holds the residual: keep the initial adapter to save plain LoRA
        from peft import get_peft_model_state_dict

        model.llmkit_initial_adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return model


def _check_lora_targets(model: Any, targets: list[str], new_token_embedding: str | None) -> None:
    """Each name in finetune.lora.target_modules must match a module as PEFT matches it (the whole name or its end
    after a dot): PEFT itself fails only when none matches, so a misspelt one was dropped in silence. The embedding
    whose new chat-template rows are trained already cannot take LoRA as well (PEFT refuses the pair)."""
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
    if missing:
        raise UserError(
            f"finetune.lora.target_modules: {', '.join(missing)} matches no module of this model "
            f"(its projections: {', '.join(lora_target_modules(model))})"
        )
    if new_token_embedding in targets:
        raise UserError(
            f"finetune.lora.target_modules: {new_token_embedding} is the embedding, whose rows for the chat "
            "template's new tokens are trained as they are; leave it out"
        )


def save_pretrained(model: Any, path: str | Path, **kwargs: Any) -> None:
    """`model.save_pretrained`; an adapter initialized from the base's own components (PiSSA, OLoRA), whose base was
    rewritten to the residual, is saved as the plain LoRA adapter of rank 2r that gives the same model on the
    original base: A' = [A; A0], B' = [B, -B0] (what peft's `path_initial_model_for_weight_conversion` computes; its
    own path fails on adapters with trainable token rows, and loads a second adapter at every save)."""
    model.save_pretrained(path, **kwargs)
    initial = getattr(model, "llmkit_initial_adapter", None)
    if initial is None:
        return
    import json
    import math

    from safetensors.torch import load_file, save_file

    weights_file, config_file = Path(path) / "adapter_model.safetensors", Path(path) / "adapter_config.json"
    trained = load_file(str(weights_file))
    plain = {}
    for key, weight in trained.items():
        if ".lora_A." in key:
            plain[key] = torch.cat([weight, initial[key].to(weight.dtype)], dim=0)
        elif ".lora_B." in key:
            plain[key] = torch.cat([weight, -initial[key].to(weight.dtype)], dim=1)
        else:
            plain[key] = weight
    save_file({k: v.contiguous() for k, v in plain.items()}, str(weights_file), metadata={"format": "pt"})
    config = json.loads(config_file.read_text())
    config["lora_alpha"] *= math.sqrt(2) if config.get("use_rslora") else 2  # the same scale at rank 2r
    config.update(r=2 * config["r"], init_lora_weights=True)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def trained_factors(weights: dict[str, Any], r: int) -> dict[str, Any]:
    """The rank-r factors training left, out of an adapter `save_pretrained` converted: to resume a PiSSA or OLoRA
    run onto a base initialized again the same way."""
    return {k: w[:r] if ".lora_A." in k else w[:, :r] if ".lora_B." in k else w for k, w in weights.items()}


def _embedding_module_name(model: Any) -> str:
    embedding = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embedding:
            return name.rsplit(".", 1)[-1]
    return "embed_tokens"


def freeze_except(model: Any, top_layers: int | None, name_parts: list[str]) -> None:
    """Train only the top `top_layers` transformer blocks, the final norm and head, and named parameters."""
    if top_layers is None and not name_parts:
        raise UserError("method freeze needs finetune.freeze_top_layers or finetune.trainable_modules")
    layers = block_list(model)
    if top_layers is not None and top_layers > len(layers):
        raise UserError(f"finetune.freeze_top_layers={top_layers} but the model has {len(layers)} layers")
    names = [name for name, _ in model.named_parameters()]
    unmatched = [part for part in name_parts if not any(part in name for name in names)]
    if unmatched:  # else a misspelt name trains only the head, without a word
        raise UserError(
            f"finetune.trainable_modules: {', '.join(unmatched)} is in no parameter's name (they read like "
            f"{names[len(names) // 2]})"
        )
    for parameter in model.parameters():
        parameter.requires_grad = False
    trained = list(layers[len(layers) - top_layers :]) if top_layers else []
    output = model.get_output_embeddings()
    head = [output] if output is not None else []
    for module in trained + head:
        for parameter in module.parameters():
            parameter.requires_grad = True
    for name, parameter in model.named_parameters():
        if any(part in name for part in name_parts) or (top_layers and _is_final_norm_or_head(name)):
            parameter.requires_grad = True


def block_list(model: Any) -> Any:
    """The model's transformer blocks: its longest ModuleList."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise UserError("cannot find the transformer layers of this model; use finetune.trainable_modules")
    return max(lists, key=len)


def _is_final_norm_or_head(name: str) -> bool:
    return name.startswith(("model.norm", "transformer.ln_f", "classifier", "score", "lm_head", "pooler"))


def load_trained_model(model_dir: Path, dtype: Any = None, merge: bool = False) -> Any:
    """A model directory from llmkit or any HF tool: full weights, a PEFT adapter over its base model, or a
    low-rank factored model (`llmkit factor`; `merge` multiplies its factors back into plain projections).

    For an adapter, the base named in adapter_config.json is loaded (its embedding grown to the adapter's
    tokenizer when fine-tuning added tokens) and the adapter applied; `merge` folds it into the weights.
    """

    from llmkit.data.tokenizer import load_tokenizer
    from llmkit.factored import densify, is_factored, load_factored
    from llmkit.runs import find_tokenizer_dir

    if is_factored(model_dir):  # llmkit factor's output: rebuilt here (plain transformers cannot)
        model = load_factored(model_dir, dtype)
        if merge:
            densify(model)
        return model
    base_name = adapter_base(model_dir)
    if base_name is None:
        return load_model(model_dir, dtype=dtype)
    from peft import PeftModel

    base = load_model(base_name, dtype=dtype)
    tokenizer = load_tokenizer(find_tokenizer_dir(Path(model_dir)))
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(padded_vocab_size(len(tokenizer)))
    model = PeftModel.from_pretrained(base, str(model_dir))
    return model.merge_and_unload() if merge else model


def adapter_base(model_dir: str | Path) -> str | None:
    """The base model a LoRA adapter directory names (None for a directory of full weights)."""
    adapter_config = Path(model_dir) / "adapter_config.json"
    if not adapter_config.is_file():
        return None
    base = read_json_mapping(adapter_config, "missing").get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_config}: names no base model (base_model_name_or_path)")
    return str(base)


def load_classifier(
    source: str | Path,
    labels: Any,
    trust_remote_code: bool = False,
    token: str | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """A sequence-classification model on any HF encoder or decoder, with the label map in its config."""
    from transformers import AutoModelForSequenceClassification

    from llmkit.hub import prepare_hub_access

    prepare_hub_access(source)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(source),
            num_labels=len(labels.names),
            id2label=dict(enumerate(labels.names)),
            label2id={name: i for i, name in enumerate(labels.names)},
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            token=token,
            attn_implementation=attn_implementation,
        )
    except Exception as exc:  # OSError offline or missing files, ValueError for unsupported architectures
        reason = first_line(exc)
        raise UserError(f"{source}: cannot load a sequence classifier from this model: {reason}") from None
    if model.config.pad_token_id is None:  # decoders find each row's last token through the pad id
        model.config.pad_token_id = model.config.eos_token_id
    return model
