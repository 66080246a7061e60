"""GGUF for llama.cpp and its kin, written with the `gguf` package: the Llama, Mistral, Qwen2, Qwen3, Gemma and
GPT-2 architectures.

Tensors take llama.cpp's names (`blk.N.attn_q.weight`, ...) and the architecture llama.cpp knows the layout by
(Mistral's is `llama`). Llama's and Mistral's query and key projections are permuted from Hugging Face's rotary
layout (first half / second half of each head) to llama.cpp's (interleaved pairs), as llama.cpp's own converter
does; Qwen and Gemma rotate halves in llama.cpp too and are written as they are. Gemma's norms are stored as w where
the layer multiplies by 1 + w: llama.cpp wants 1 + w. GPT-2's Conv1D weights are transposed to [out, in]. Types:
f32; f16 (norms and biases stay f32); the block types q8_0, q5_1, q5_0, q4_1 and q4_0 (blocks of 32 weights with
f16 scales, written by the gguf package; tensors whose rows are not a multiple of 32 fall back to f16, as in
llama.cpp); and the k-quants (q6_k ... q2_k), which the gguf package cannot write: llama.cpp's own quantizer makes
them from the f16 file, through llama-cpp-python when it is installed. The tokenizer travels in the file: byte-level
BPE tokens, merges, token types and special ids, and the chat template when there is one.

`read_gguf` reads a file back into a Hugging Face state dict (dequantized, layout undone): the export is verified by
loading that into the model and comparing its logits with the source's.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmkit.errors import UserError
from llmkit.models import model_context

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The types llmkit writes itself, one row each: llama.cpp's tensor type for the 2-D weights (vectors stay F32; a
# weight whose rows are not whole blocks of the type is stored in F16) and the precision whose parity tolerance an
# export of this type is held to (llmkit.export.parity.Tolerance).
WRITTEN = {
    "f32": ("F32", "float32"),
    "f16": ("F16", "float16"),
    "bf16": ("BF16", "bfloat16"),
    "q8_0": ("Q8_0", "q8_0"),
    "q5_1": ("Q5_1", "q5_1"),
    "q5_0": ("Q5_0", "q5_0"),
    "q4_1": ("Q4_1", "q4_1"),
    "q4_0": ("Q4_0", "q4_0"),
}
K_QUANTS = ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_m", "q3_k_s", "q2_k")  # llama.cpp's quantizer
GGUF_TYPES = (*WRITTEN, *K_QUANTS)
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
    "self_attn.q_norm": "attn_q_norm",  # Qwen3's per-head RMS norms of queries and keys
    "self_attn.k_norm": "attn_k_norm",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_GPT2_LAYER_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
_GPT2_TOP_NAMES = {
    "transformer.wte": "token_embd",
    "transformer.wpe": "position_embd",
    "transformer.ln_f": "output_norm",
    "lm_head": "output",
}


@dataclass(frozen=True)
class Layout:
    """How one Hugging Face model type is written for llama.cpp."""

    arch: str  # llama.cpp's name for the architecture (general.architecture, the prefix of its keys)
    permute_rotary: bool  # q/k from half-split to interleaved rotary pairs
    norm_offset: float = 0.0  # added to every RMS norm weight (Gemma: the layer multiplies by 1 + w)


LAYOUTS = {
    "llama": Layout("llama", permute_rotary=True),
    "mistral": Layout("llama", permute_rotary=True),
    "qwen2": Layout("qwen2", permute_rotary=False),
    "qwen3": Layout("qwen3", permute_rotary=False),
    "gemma": Layout("gemma", permute_rotary=False, norm_offset=1.0),
    "gpt2": Layout("gpt2", permute_rotary=False),
}
ARCHITECTURES = tuple(LAYOUTS)


def gguf_architecture(config: Any) -> str:
    return LAYOUTS[config.model_type].arch


def gguf_name(hf_name: str) -> str:
    stem, _, kind = hf_name.rpartition(".")
    parts = stem.split(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    if stem in _GPT2_TOP_NAMES:
        return f"{_GPT2_TOP_NAMES[stem]}.{kind}"
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:])]}.{kind}"
    if parts[:2] == ["transformer", "h"] and ".".join(parts[3:]) in _GPT2_LAYER_NAMES:
        return f"blk.{parts[2]}.{_GPT2_LAYER_NAMES['.'.join(parts[3:])]}.{kind}"
    raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name}")


def _layout(hf_name: str, data: np.ndarray, config: Any, to_gguf: bool) -> np.ndarray:
    """Hugging Face layout <-> llama.cpp's: rotary permutation (Llama q/k), norm offset (Gemma), [out, in] matrices
    (GPT-2's Conv1D)."""
    if config.model_type == "gpt2":
        return data.T if data.ndim == 2 and hf_name.startswith("transformer.h.") else data
    layout = LAYOUTS[config.model_type]
    if layout.norm_offset and hf_name.endswith("norm.weight"):
        return data + layout.norm_offset if to_gguf else data - layout.norm_offset
    if not layout.permute_rotary:
        return data
    permute = _rotary_permute if to_gguf else _rotary_unpermute
    if hf_name.endswith("q_proj.weight"):
        return permute(data, config.num_attention_heads)
    if hf_name.endswith("k_proj.weight"):
        return permute(data, config.num_key_value_heads or config.num_attention_heads)
    return data


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
    config = model.config
    if getattr(config, "model_type", None) not in ARCHITECTURES:
        raise UserError(
            f"--format gguf writes {', '.join(ARCHITECTURES)} models; this one is {config.model_type!r} "
            "(use --format hf or onnx)"
        )
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    if getattr(config, "use_sliding_window", False) or (window is not None and window < model_context(config)):
        raise UserError(
            f"--format gguf: this {config.model_type} model attends through a sliding window, which llama.cpp's "
            f"{gguf_architecture(config)} layout does not apply; use --format hf"
        )
    scaling = _rope_scaling(model.config)
    if scaling not in ("default", "linear", "yarn"):
        raise UserError(
            f"--format gguf: this model's context is extended with {scaling!r} RoPE scaling, which llmkit's GGUF "
            "writer does not describe (linear and yarn it does); use --format hf"
        )


def write_gguf(model: Any, tokenizer: PreTrainedTokenizerBase, path: Path, kind: str, name: str) -> None:
    """`model` as one GGUF file of type `kind`; a k-quant is written as f16 and quantized by llama.cpp."""
    if kind in K_QUANTS:
        f16 = path.with_name(f".{path.name}.f16")
        try:
            write_gguf(model, tokenizer, f16, "f16", name)
            quantize_with_llama_cpp(f16, path, kind)
        finally:
            f16.unlink(missing_ok=True)
        return
    import gguf

    check_gguf_supported(model)
    config = model.config
    writer = gguf.GGUFWriter(str(path), gguf_architecture(config))
    writer.add_name(name)
    _add_hyperparameters(writer, config)
    file_type = "ALL_F32" if kind == "f32" else f"MOSTLY_{kind.upper()}"
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    _add_tokenizer(writer, tokenizer, model)

    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        data = _layout(hf_name, tensor.detach().to(torch.float32).cpu().numpy(), config, to_gguf=True)
        qtype = gguf.GGMLQuantizationType[WRITTEN[kind][0] if data.ndim > 1 else "F32"]
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16
        data = np.ascontiguousarray(data, dtype=np.float32)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(gguf_name(hf_name), data.astype(np.float16 if qtype.name == "F16" else np.float32))
        else:
            quantized = gguf.quants.quantize(data, qtype)
            writer.add_tensor(gguf_name(hf_name), quantized, raw_shape=quantized.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_hyperparameters(writer: Any, config: Any) -> None:
    if config.model_type == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:  # Qwen3, Gemma: heads sized apart from the width
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or _rope_theta(config)))
    scaling = _rope_scaling(config)
    if scaling != "default":  # an extended context (model.rope_scaling): llama.cpp reads the same three numbers
        import gguf

        parameters = config.rope_parameters
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if scaling == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(parameters["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(parameters["original_max_position_embeddings"]))


def _rope_scaling(config: Any) -> str:
    return str((getattr(config, "rope_parameters", None) or {}).get("rope_type", "default"))


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence what C code writes to file descriptor 2 (llama.cpp prints its progress there, not through Python)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def llama_cpp_missing() -> str | None:
    """Why the k-quants cannot be made here (None when llama-cpp-python is importable)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return "k-quants (q6_k ... q2_k) are made by llama.cpp's quantizer: pip install llama-cpp-python"
    return None


def quantize_with_llama_cpp(source: Path, target: Path, kind: str) -> None:
    """llama.cpp's own quantizer (`llama_model_quantize`), as its `llama-quantize` tool runs it."""
    problem = llama_cpp_missing()
    if problem:
        raise UserError(f"--dtype {kind}: {problem}")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = 0  # all cores
    with quiet_native_stderr():
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if code != 0 or not target.is_file():
        raise UserError(f"--dtype {kind}: llama.cpp's quantizer failed (code {code}) on {source.name}")


def _rope_theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", 10000.0))


def _add_tokenizer(writer: Any, tokenizer: PreTrainedTokenizerBase, model: Any) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise UserError("GGUF export: only byte-level BPE tokenizers are written (this one is not)")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer") or {})
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
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            setter(int(token_id))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# The split rules llama.cpp knows by name (its `tokenizer.ggml.pre`), as tokenizers write them.
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_RULES = {_WORDS + r"\p{N}" + _REST: "qwen2", _WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe"}  # digits: 1 or 1-3


def _pre_tokenizer_name(pre: dict[str, Any]) -> str:
    """llama.cpp's name for how the text is split before BPE: GPT-2's byte-level regex, or a known split rule
    followed by byte-level mapping (Qwen2/Qwen3, Llama 3); anything else is refused rather than tokenized otherwise."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        rule = (steps[0].get("pattern") or {}).get("Regex", "")
        if rule in _SPLIT_RULES:
            return _SPLIT_RULES[rule]
        raise UserError(f"GGUF export: the tokenizer splits text by a rule llama.cpp has no name for ({rule[:60]!r})")
    raise UserError(f"GGUF export: the tokenizer's pre-tokenizer ({pre.get('type')}) is not byte-level BPE's")


# llmkit's built-in chat templates (data/templates.py) in Ollama's Go template language.
OLLAMA_TEMPLATES = {
    "chatml": "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n",
    "llama3": "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": '{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
    '{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
    "{{ else }}### Response:\n{{ .Content }}{eos}\n\n{{ end }}{{ end }}### Response:\n",
}


def ollama_modelfile(tokenizer: PreTrainedTokenizerBase, stop_ids: list[int]) -> str:
    """An Ollama Modelfile for `model.gguf` beside it: the chat template in Ollama's language when it is one of
    llmkit's built-in ones, and the stop tokens the run generates until."""
    from llmkit.data.templates import BUILTIN_TEMPLATES

    lines = ["# Ollama: ollama create NAME -f Modelfile, then ollama run NAME", "FROM ./model.gguf"]
    template = getattr(tokenizer, "chat_template", None)
    name = next((n for n, (jinja, _, _) in BUILTIN_TEMPLATES.items() if jinja == template), None)
    if name is not None:
        body = OLLAMA_TEMPLATES[name].replace("{eos}", tokenizer.eos_token or "")
        lines.append(f'TEMPLATE """{body}"""')
    elif template:
        lines.append("# TEMPLATE: this model's chat template is its own (in the GGUF's tokenizer.chat_template, which")
        lines.append("# Ollama reads for templates it knows); for others write one: ollama's docs/template.md")
    for token in dict.fromkeys(tokenizer.convert_ids_to_tokens(stop_ids)):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    return "\n".join(lines) + "\n"


def read_gguf(path: Path, model: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The file's tensors as a Hugging Face state dict for `model`'s architecture, and its metadata."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    config = model.config
    by_gguf = {gguf_name(name): name for name in model.state_dict()}
    state: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dimensions innermost first
        data = np.asarray(data, dtype=np.float32).reshape(shape)
        hf_name = by_gguf[tensor.name]
        data = _layout(hf_name, data, config, to_gguf=False)
        state[hf_name] = torch.from_numpy(np.array(data, dtype=np.float32, copy=True))
        types[tensor.name] = tensor.tensor_type.name
    metadata = {
        "architecture": _field(reader, "general.architecture"),
        "tokens": len(reader.fields["tokenizer.ggml.tokens"].data),
        "merges": len(reader.fields["tokenizer.ggml.merges"].data),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "block_count": _field(reader, f"{gguf_architecture(config)}.block_count"),
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


def llama_cpp_logits(model_dir: Path, config: Any) -> Any:
    """Logits of every position from llama.cpp (llama-cpp-python), one row at a time."""
    if llama_cpp_missing():
        raise UserError(
            f"{model_dir}: a GGUF export is evaluated in llama.cpp, and llama-cpp-python is not installed: "
            "pip install llama-cpp-python (or evaluate the HF model it was exported from)"
        )
    from llama_cpp import Llama

    from llmkit.models import model_context

    with quiet_native_stderr():
        llm = Llama(
            model_path=str(model_dir / "model.gguf"),
            n_ctx=model_context(config) or 2048,
            n_batch=512,
            logits_all=True,
            verbose=False,
        )

    vocab = llm.n_vocab()

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((*ids.shape, max(vocab, config.vocab_size)), dtype=torch.float32)
        out[..., vocab:] = float("-inf")  # embedding rows past the tokenizer: never a token
        for row, (tokens, keep) in enumerate(zip(ids, mask, strict=True)):
            positions = keep.bool().nonzero().flatten()
            if len(positions) == 0:
                continue
            llm.reset()
            with quiet_native_stderr():
                llm.eval(tokens[positions].tolist())
            out[row, positions, :vocab] = torch.from_numpy(np.array(llm.scores[: len(positions)], dtype=np.float32))
        return out[..., : config.vocab_size]

    return run
