"""The fine-tuning seam: what a task supplies to `llmkit finetune`, and the row handling tasks share.

A task is one module with one `Task` subclass: it reads and checks its rows (`load_data`), loads the model it
trains (`load_model`), batches rows (`collate`), defines the objective (`objective`: the loss, what the loss is
normalized by, the evaluation), and describes its data in one line. `finetune.py` runs every task the same way;
adding a task means adding a module and a row in `llmkit.train.tasks.TASKS`.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from llmkit.config import RunConfig
from llmkit.data.cleaning import is_validation
from llmkit.data.formats import Example, RowFormats, normalize
from llmkit.data.readers import read_records, refuse_shared_files, resolve_sources
from llmkit.errors import UserError
from llmkit.train.job import LossFn, Objective
from llmkit.train.packing import collate_rows

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

Collate = Callable[..., dict[str, torch.Tensor]]
LmLoss = Callable[[], LossFn]


@dataclass
class TaskData:
    """A task's encoded rows: `train` and `val` hold whatever its collate batches (an `Encoded`, a pair, ...)."""

    train: list[Any]
    val: list[Any]
    fmt: str
    fingerprint: str
    truncated: int
    details: dict[str, Any] = field(default_factory=dict)  # task-specific (the label map, ...)


@dataclass(frozen=True)
class Preparation:
    """What a task's work before the first step sees of the run (Task.prepare)."""

    cfg: RunConfig
    accelerator: Accelerator
    data: TaskData
    run_dir: Path
    resumed: bool  # the run continues a checkpoint: what was written before the first step may be reused
    collate: Collate


class Task(ABC):
    """The interface every task implements; the defaults are those of a causal language-model task."""

    name: ClassVar[str]
    needs_eos: ClassVar[bool] = True  # the tokenizer must have an EOS (causal LMs end answers with it)
    chat: ClassVar[bool] = True  # the tokenizer gets a chat template (finetune.chat_template)
    peft_task_type: ClassVar[str] = "CAUSAL_LM"
    packs: ClassVar[bool] = True  # finetune.packing applies
    kernels: ClassVar[bool] = True  # Liger kernels may patch the model (model.kernels)
    sequences_per_row: ClassVar[int] = 1  # a row holds this many sequences of up to max_length tokens
    logits: ClassVar[str] = "fused"  # the LM head's logits: fused with the loss, "whole" (materialized), or "none"

    @abstractmethod
    def load_data(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        """Read, check, split and encode the rows (before any output is written)."""

    def load_model(
        self, source: str | Path, cfg: RunConfig, token: str | None, data: TaskData, tokenizer: PreTrainedTokenizerBase
    ) -> Any:
        from llmkit.models import load_model, rope_request

        attn = cfg.model.attn_implementation
        if cfg.finetune.method == "qlora":
            return load_quantized(source, token, attn)
        return load_model(
            source,
            trust_remote_code=cfg.model.trust_remote_code,
            token=token,
            rope=rope_request(cfg),
            attn_implementation=attn,
        )

    def collate(self, pad_id: int, attn_implementation: str) -> Collate:
        return lambda rows, indices=None: collate_rows(rows, pad_id, attn_implementation, indices)

    @abstractmethod
    def objective(
        self, model: Any, accelerator: Accelerator, data: TaskData, cfg: RunConfig, lm_loss: LmLoss
    ) -> Objective:
        """What the task minimizes and how it validates; called before accelerator.prepare. `lm_loss()` builds the
        run's causal-LM loss (fused with the head where the strategy keeps whole weights, Liger's when applied)."""

    def prepare(self, model: Any, run: Preparation) -> None:
        """Work before the first step, on the prepared model (the preference tasks' reference log-probs); none by
        default."""
        return None

    def plan_notes(self, cfg: RunConfig) -> list[str]:
        """What `llmkit plan` should say about this task beyond memory and FLOPs."""
        return []

    def keeps_base(self, cfg: RunConfig) -> bool:
        """Whether the run keeps a frozen copy of the base as loaded, in `data.details["base"]` (a KL's reference
        when every weight trains: it must be the start, also when the run resumes)."""
        return False

    def steps_per_read(self, cfg: RunConfig) -> int:
        """Optimizer steps each step's worth of read rows is trained for (GRPO's num_iterations): a budget in
        epochs counts this many steps per read."""
        return 1

    def plan_shape(self, cfg: RunConfig) -> tuple[int, float]:
        """For `llmkit plan`: the model's rows per training row (a micro-batch's rows times this many go through
        the model), and the forward passes per trained token beyond training's own (sampling, a reference)."""
        return 1, 0

    def describe(self, data: TaskData, chat: Any) -> str:
        return f"template {chat.name if chat else '-'}"

    def stats(self, data: TaskData, chat: Any) -> dict[str, Any]:
        return {"template": chat.name if chat else None}


def load_quantized(source: str | Path, token: str | None, attn_implementation: str | None = None) -> Any:
    """A causal LM in 4-bit NF4 (QLoRA), prepared for training adapters on it. Gradient checkpointing is the run's
    own setting (train.gradient_checkpointing, enabled with the adapters attached), not peft's default of always on:
    what `llmkit plan` counts is what runs."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source), quantization_config=quantization, token=token, attn_implementation=attn_implementation
        )
    except ImportError as exc:
        raise UserError(f"method qlora needs bitsandbytes: pip install bitsandbytes ({exc})") from None
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def split_examples(cfg: RunConfig, formats: RowFormats | None = None) -> tuple[list[Example], list[Example], str]:
    """Training and validation rows: a validation file, or a fraction held out by row content."""
    ft = cfg.finetune
    encoding = cfg.data.encoding
    sources = resolve_sources(cfg.data.sources)
    examples, fmt = read_examples(sources, ft.format, ft.columns, encoding, formats)
    if ft.val_file:
        val_sources = resolve_sources([ft.val_file])
        scored = "validation would score rows the model trains on: give rows kept out of --data"
        refuse_shared_files([("--data", sources), ("--val-file", val_sources)], scored)
        val_examples, _ = read_examples(val_sources, fmt, ft.columns, encoding, formats)
        return examples, val_examples, fmt
    held_out = [is_validation(identity(e), cfg.data.val_fraction, cfg.data.seed) for e in examples]
    train = [e for e, out in zip(examples, held_out, strict=True) if not out]
    val = [e for e, out in zip(examples, held_out, strict=True) if out]
    return train, val, fmt


def data_fingerprint(cfg: RunConfig, *settings: Any) -> str:
    """What the training rows are: source files' content, split and encoding settings (and a task's own)."""
    ft = cfg.finetune
    digest = hashlib.sha256()
    for source in resolve_sources(cfg.data.sources) + (resolve_sources([ft.val_file]) if ft.val_file else []):
        digest.update(json.dumps(source.describe(), sort_keys=True).encode())
    common = ft.model_dump(
        mode="json", include={"task", "format", "columns", "max_length", "chat_template", "train_on_prompt", "augment"}
    )
    digest.update(json.dumps([common, cfg.data.val_fraction, cfg.data.seed, *settings], sort_keys=True).encode())
    return digest.hexdigest()


def read_examples(
    sources: list[Any], fmt: str, columns: dict[str, str], encoding: str = "utf-8", formats: RowFormats | None = None
) -> tuple[list[Example], str]:
    """Every row of `sources` as an Example; `formats` replaces the SFT formats (a task's own row kinds)."""
    examples: list[Example] = []
    for source in sources:
        if source.kind == "builtin":
            raise UserError(f"builtin:{source.name}: a pretraining corpus; finetune needs rows of a dataset file")
        for detected, example in normalize(read_records(source, encoding=encoding), fmt, columns, formats):
            fmt = detected
            examples.append(example)
    if not examples:
        raise UserError(f"{', '.join(s.name for s in sources)}: no rows")
    return examples, fmt


def identity(example: Example) -> str:
    """The text a row is split by: the same row always lands in the same split."""
    parts = [example.messages, example.prompt, example.completion, example.text, example.label]
    return json.dumps([*parts, example.extra] if example.extra else parts, default=str)
