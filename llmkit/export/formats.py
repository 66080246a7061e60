"""The export formats, one record each: what `llmkit export` writes (dtypes, quantizers, the writer), how its
parity is judged, what the model card tells a user, and what `llmkit eval` and `llmkit serve` run an export
directory in. A new format is one row in FORMATS and its writer below.

A writer turns the source model directory into the format's files in `staging` and returns a logits function
(input_ids, attention_mask -> logits) of what it wrote, read back as a user would load it: parity is measured on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmkit.atomic import write_text
from llmkit.errors import UserError
from llmkit.export.gguf import GGUF_TYPES, WRITTEN, llama_cpp_logits
from llmkit.models import load_trained_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Logits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Written:
    """What a writer is asked for: the source model directory, where to write, and how."""

    model_dir: Path
    staging: Path  # the export's staging directory (renamed into place once parity holds)
    tokenizer: PreTrainedTokenizerBase
    dtype: str
    quantize: str | None = None
    adapter: bool = False  # write the LoRA adapter as it is (hf only); else one whole model
    name: str = "model"  # the model's name inside the file (GGUF)


Writer = Callable[[Written], Logits]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ExportFormat:
    name: str  # --format
    dtypes: tuple[str, ...]  # --dtype values
    default_dtype: str
    quantizers: tuple[str, ...]  # --quantize values it takes
    weights: str  # the suffix of its weight files (the report's size counts them)
    marker: str | None  # the file that marks an export directory of this format; None: a Hugging Face directory
    runtime: str  # what `llmkit eval` runs it in
    serves: str | None  # None: `llmkit serve` serves it; else why not, and what to serve instead
    usage: tuple[str, ...]  # the model card's lines on how to load it
    writer: Writer
    reader: Callable[[Path, Any], Logits] | None  # (export dir, its HF config) -> logits, for eval; None: transformers

    def precision(self, dtype: str, quantize: str | None) -> str:
        """The parity tolerance's name: the quantizer, or the dtype (a GGUF type's own precision)."""
        return quantize or (WRITTEN[dtype][1] if self.name == "gguf" and dtype in WRITTEN else dtype)


def export_format(model_dir: Path) -> ExportFormat | None:
    """The format of an export directory that holds a marked export file (GGUF, ONNX); None for an HF model."""
    return next((f for f in FORMATS.values() if f.marker and (Path(model_dir) / f.marker).is_file()), None)


def model_logits(model: Any) -> Logits:
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


QUANTIZERS = {"int8": "torchao", "int4": "bitsandbytes"}


def check_quantizer(quantize: str, dtype: str | None) -> None:
    import importlib.util

    library = QUANTIZERS[quantize]
    if importlib.util.find_spec(library) is None:
        raise UserError(f"--format hf --quantize {quantize} quantizes through {library}: pip install {library}")
    if dtype not in (None, "float32"):
        raise UserError(f"--quantize {quantize} keeps float32 for what it does not quantize; leave --dtype out")


def _quantization_config(quantize: str) -> Any:
    """int8: torchao's int8 weight-only; int4: bitsandbytes' 4-bit NormalFloat with double quantization (QLoRA's
    format), both applied by transformers at load and saved with the checkpoint."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if quantize == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


BNB_BLOCK = 64  # bitsandbytes' 4-bit blocks: 64 weights, each block with its own scale


def _check_4bit_widths(model: Any) -> None:
    """bitsandbytes quantizes every linear layer but the output head in blocks of 64 inputs; a narrower layer
    quantizes, but its CPU kernel (on CPUs with AVX512-BF16) cannot run it: refused on every machine alike."""
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and module.in_features < BNB_BLOCK:
            raise UserError(
                f"--quantize int4: {name} takes {module.in_features} inputs, fewer than bitsandbytes' 4-bit block of "
                f"{BNB_BLOCK}; a model this narrow exports with --quantize int8"
            )


def _write_hf_quantized(model_dir: Path, staging: Path, tokenizer: PreTrainedTokenizerBase, quantize: str) -> Any:
    """Weight-only quantization of every linear layer, as transformers applies it at load; checked by loading the
    saved directory back through plain transformers."""
    from transformers import AutoModelForCausalLM

    merged = staging / ".float32"
    trained = load_trained_model(model_dir, dtype=torch.float32, merge=True)
    if quantize == "int4":
        _check_4bit_widths(trained)
    trained.save_pretrained(merged, safe_serialization=True)
    config = _quantization_config(quantize)
    model = AutoModelForCausalLM.from_pretrained(merged, quantization_config=config, dtype=torch.float32)
    model.save_pretrained(staging, safe_serialization=True)
    import shutil

    shutil.rmtree(merged)
    tokenizer.save_pretrained(staging)
    return model_logits(AutoModelForCausalLM.from_pretrained(staging).eval())


def _write_hf(job: Written) -> Logits:
    if job.quantize:
        return _write_hf_quantized(job.model_dir, job.staging, job.tokenizer, job.quantize)
    if job.adapter:
        model = load_trained_model(job.model_dir, dtype=torch.float32)
    else:
        model = load_trained_model(job.model_dir, dtype=TORCH_DTYPES[job.dtype], merge=True)
    model.save_pretrained(job.staging, safe_serialization=True)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(job.staging)
    job.tokenizer.save_pretrained(job.staging)
    return model_logits(load_trained_model(job.staging, dtype=TORCH_DTYPES[job.dtype]).eval())


def _write_gguf(job: Written) -> Logits:
    from transformers import AutoModelForCausalLM

    from llmkit.export.gguf import gguf_architecture, read_gguf, write_gguf

    model = load_trained_model(job.model_dir, dtype=torch.float32, merge=True).eval()
    path = job.staging / "model.gguf"
    write_gguf(model, job.tokenizer, path, job.dtype, job.name)
    _write_modelfile(job, model)
    model.config.save_pretrained(job.staging)  # with the tokenizer: `llmkit eval` runs the file as the HF model
    job.tokenizer.save_pretrained(job.staging)
    state, metadata = read_gguf(path, model)  # read back: what a GGUF runtime would load
    if metadata["tokens"] < len(job.tokenizer) or metadata["architecture"] != gguf_architecture(model.config):
        raise UserError(
            f"{path}: read back {metadata['tokens']} tokens / {metadata['architecture']}: not written right"
        )
    restored = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    missing, unexpected = restored.load_state_dict(state, strict=False)
    if unexpected or [key for key in missing if key != "lm_head.weight"]:
        raise UserError(f"{path}: tensors do not match the model (missing {missing}, unexpected {unexpected})")
    restored.tie_weights()
    return model_logits(restored.eval())


def _write_modelfile(job: Written, model: Any) -> None:
    """Ollama's Modelfile beside the GGUF file, stopping where the run's generation config says (a LoRA run's own
    config, not its base's)."""
    from llmkit.export.gguf import ollama_modelfile

    generation = getattr(model, "generation_config", None)
    if (job.model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        generation = GenerationConfig.from_pretrained(job.model_dir)
    stop = getattr(generation, "eos_token_id", None) if generation is not None else None
    stop = stop if stop is not None else job.tokenizer.eos_token_id
    write_text(job.staging / "Modelfile", ollama_modelfile(job.tokenizer, stop if isinstance(stop, list) else [stop]))


def _write_onnx(job: Written) -> Logits:
    from llmkit.export.onnx import onnx_logits, write_onnx

    model = load_trained_model(job.model_dir, dtype=torch.float32, merge=True).eval()
    write_onnx(model, job.staging / "model.onnx", job.quantize)
    model.config.save_pretrained(job.staging)
    job.tokenizer.save_pretrained(job.staging)
    return onnx_logits(job.staging / "model.onnx")


def _onnx_reader(model_dir: Path, config: Any) -> Logits:
    from llmkit.export.onnx import onnx_logits

    return onnx_logits(model_dir / "model.onnx")


HF = ExportFormat(
    name="hf",
    dtypes=("float32", "bfloat16", "float16"),
    default_dtype="float32",
    quantizers=("int8", "int4"),
    weights=".safetensors",
    marker=None,
    runtime="transformers",
    serves=None,
    usage=(
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('.')",
        "tokenizer = AutoTokenizer.from_pretrained('.')",
    ),
    writer=_write_hf,
    reader=None,
)
GGUF = ExportFormat(
    name="gguf",
    dtypes=GGUF_TYPES,
    default_dtype="f16",
    quantizers=(),  # its levels are dtypes
    weights=".gguf",
    marker="model.gguf",
    runtime="llama.cpp",
    serves=None,
    usage=(
        "# llama.cpp: llama-cli -m model.gguf -p 'Once upon a time'",
        "from llama_cpp import Llama",
        "llm = Llama(model_path='model.gguf')",
    ),
    writer=_write_gguf,
    reader=llama_cpp_logits,
)
ONNX = ExportFormat(
    name="onnx",
    dtypes=("float32",),
    default_dtype="float32",
    quantizers=("int8",),
    weights=".onnx",
    marker="model.onnx",
    runtime="onnxruntime",
    serves="an ONNX export; serve the run, the HF export or a GGUF export instead",
    usage=(
        "import onnxruntime, numpy as np",
        "session = onnxruntime.InferenceSession('model.onnx')",
        "logits = session.run(['logits'], {'input_ids': ids, 'attention_mask': np.ones_like(ids)})[0]",
    ),
    writer=_write_onnx,
    reader=_onnx_reader,
)
FORMATS = {fmt.name: fmt for fmt in (HF, GGUF, ONNX)}
