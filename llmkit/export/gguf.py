"""GGUF for llama.cpp and its kin, written with the `gguf` package: Llama-architecture models only.

Tensors take llama.cpp's names (`blk.N.attn_q.weight`, ...). The query and key projections are permuted
from Hugging Face's rotary layout (first half / second half of each head) to llama.cpp's (interleaved
pairs), as llama.cpp's own converter does. Types: f32; f16 (norms stay f32); q8_0 (blocks of 32 int8 values
with one f16 scale; tensors whose rows are not a multiple of 32 fall back to f16, as in llama.cpp). The
tokenizer travels in the file: byte-level BPE tokens, merges, token types and special ids, and the chat
template when there is one.

`read_gguf` reads a file back into a Hugging Face state dict (dequantized, permutation undone): the export is
verified by loading that into the model and comparing its logits with the source's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.errors import UserError

GGUF_TYPES = ("f32", "f16", "q8_0")
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str) -> str:
    stem, _, kind = hf_name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:])]}.{kind}"
    raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name}")


def _rotary_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face (half-split) rotary layout -> llama.cpp (interleaved), per head."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _rotary_unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    return (
        weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def check_gguf_supported(model: Any) -> None:
    if getattr(model.config, "model_type", None) != "llama":
        raise UserError(
            f"--format gguf writes Llama-architecture models; this one is {model.config.model_type!r} "
            "(use --format hf or onnx)"
        )


def write_gguf(model: Any, tokenizer: Any, path: Path, kind: str, name: str) -> None:
    import gguf

    check_gguf_supported(model)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or _rope_theta(config)))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])  # fmt: skip
    _add_tokenizer(writer, tokenizer, model)

    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _rotary_permute(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _rotary_permute(data, kv_heads)
        target = gguf_name(hf_name)
        if data.ndim == 1 or kind == "f32":
            writer.add_tensor(target, data.astype(np.float32))
        elif kind == "q8_0" and data.shape[-1] % 32 == 0:
            quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(target, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(target, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rope_theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", 10000.0))


def _add_tokenizer(writer: Any, tokenizer: Any, model: Any) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise UserError("GGUF export: only byte-level BPE tokenizers are written (this one is not)")
    rows = model.get_input_embeddings().weight.shape[0]
    vocab = tokenizer.get_vocab()
    by_id = {index: token for token, index in vocab.items()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for index in range(rows):  # the embedding may be padded past the vocabulary: unused rows are placeholders
        if index in by_id:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for the GPT-2 split regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):  # fmt: skip
        if token_id is not None:
            setter(int(token_id))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def read_gguf(path: Path, model: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The file's tensors as a Hugging Face state dict for `model`'s architecture, and its metadata."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    by_gguf = {gguf_name(name): name for name in model.state_dict()}
    state: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dimensions innermost first
        data = np.asarray(data, dtype=np.float32).reshape(shape)
        hf_name = by_gguf[tensor.name]
        if hf_name.endswith("q_proj.weight"):
            data = _rotary_unpermute(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _rotary_unpermute(data, kv_heads)
        state[hf_name] = torch.from_numpy(np.array(data, dtype=np.float32, copy=True))
        types[tensor.name] = tensor.tensor_type.name
    metadata = {
        "architecture": _field(reader, "general.architecture"),
        "tokens": len(reader.fields["tokenizer.ggml.tokens"].data),
        "merges": len(reader.fields["tokenizer.ggml.merges"].data),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "block_count": _field(reader, "llama.block_count"),
        "tensor_types": sorted(set(types.values())),
    }
    return state, metadata


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8")
    return value.tolist()[0]
