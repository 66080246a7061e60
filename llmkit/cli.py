"""The `llmkit` command line. This file only wires: each command's work lives in its own module.

Heavy libraries (torch, transformers) are imported inside commands, so `llmkit --help` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from llmkit.errors import GATE_FAILED_EXIT, PREEMPTED_EXIT, UserError, parse_duration, shorten

app = typer.Typer(
    name="llmkit",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # click's help: option names print whole at any width (rich's panels cut them)
)
config_app = typer.Typer(help="Inspect recipes and configuration.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(config_app, name="config")
recipes_app = typer.Typer(rich_markup_mode=None)
app.add_typer(recipes_app, name="recipes")

F = TypeVar("F", bound=Callable[..., Any])


def _print_version(asked: bool) -> None:
    if asked:
        from llmkit import __version__

        print(f"llmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """From your own raw text to a trained, evaluated and exported language model.

    Shell completion: `llmkit --install-completion` (bash, zsh, fish, PowerShell).
    """


# Arguments and options shared by several commands, defined once.
SourceArg = Annotated[str, typer.Argument(metavar="SOURCE", help="Run directory, checkpoint or HF model directory.")]
ModelArg = Annotated[
    str, typer.Argument(metavar="MODEL", help="Run directory, checkpoint, or HF model directory/hub name.")
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Recipe YAML file (see recipes/).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", metavar="KEY=VALUE", help="Override a config key: --set train.max_steps=100 (repeatable)."
    ),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
NumProcessesOpt = Annotated[
    int | None, typer.Option(help="Processes per machine: relaunches this command under `accelerate launch`.")
]
CpuOpt = Annotated[
    bool, typer.Option("--cpu", help="Run every process on the CPU even where GPUs are (distributed.device=cpu).")
]
NumMachinesOpt = Annotated[int | None, typer.Option(help="Machines in a multi-node run.")]
MachineRankOpt = Annotated[int | None, typer.Option(help="This machine's rank (0 on the main one).")]
MainProcessIpOpt = Annotated[str | None, typer.Option(help="Address of machine rank 0 (multi-node).")]
MainProcessPortOpt = Annotated[int | None, typer.Option(help="Port on machine rank 0 (default 29500).")]
StrategyOpt = Annotated[
    str | None,
    typer.Option(help="ddp, zero1/zero2/zero3(-offload) (DeepSpeed) or fsdp (GPUs); see docs/distributed.md."),
]
DeepSpeedConfigOpt = Annotated[
    str | None,
    typer.Option(help="Your DeepSpeed JSON (start from recipes/deepspeed/); 'auto' values come from the recipe."),
]
AccelerateConfigOpt = Annotated[
    Path | None, typer.Option(help="An `accelerate config` YAML handed to accelerate launch (processes, machines).")
]
GradientCheckpointingOpt = Annotated[
    bool | None, typer.Option("--gradient-checkpointing", help="Recompute activations: less memory, more compute.")
]
CompileOpt = Annotated[
    bool | None,
    typer.Option("--compile/--no-compile", help="torch.compile the model (default: on CUDA GPUs, off on CPU)."),
]
EncodingOpt = Annotated[
    str | None, typer.Option(help="Text encoding of the input files (default utf-8; e.g. latin-1, cp1252).")
]
MaxNewTokensOpt = Annotated[int, typer.Option(help="Tokens to generate at most.")]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")]
TopKOpt = Annotated[int, typer.Option(help="Sample from the k most likely tokens (0: all).")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass.")]
ResumeOpt = Annotated[
    str | None,
    typer.Option(help="'auto' (newest valid checkpoint of --out; a fresh start if none) or a checkpoint path."),
]
ResumeFallbackOpt = Annotated[
    bool,
    typer.Option(
        "--resume-fallback", help="If the newest checkpoint is corrupted, resume from the previous valid one."
    ),
]
AllowChangeOpt = Annotated[
    bool,
    typer.Option(
        "--allow-config-change", help="Resume even if batch size, sequence length, tokenizer or dataset changed."
    ),
]
TeacherOpt = Annotated[
    str | None,
    typer.Option(help="Distill from this model (same tokenizer); see --set distill.* and docs/compression.md."),
]
ReportOpt = Annotated[Path | None, typer.Option(help="Write the JSON report here.")]
MarkdownOpt = Annotated[Path | None, typer.Option(help="Write a Markdown report (a pull-request comment).")]
JunitOpt = Annotated[Path | None, typer.Option(help="Write JUnit XML: one testcase per gate and regression check.")]
MaxTimeOpt = Annotated[
    str | None, typer.Option(help="Wall-clock limit (3600, 90m, 2h, 1:30:00): checkpoint, then exit 75.")
]


def user_errors_exit_2(fn: F) -> F:
    """Turn a UserError, or a disk that is full, read-only or not ours to write, into one line on stderr and exit
    code 2, and a stop by signal into its line and code (75, or 130); let every other exception surface."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from llmkit.train.signals import Stopped

        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            _exit(f"error: {shorten(' '.join(str(exc).split()), 1000)}", exc.exit_code)
        except OSError as exc:
            message = environment_error(exc)
            if message is None:
                raise
            _exit(f"error: {message}", 2)
        except Stopped as exc:
            _exit(str(exc), exc.exit_code)

    return wrapper  # type: ignore[return-value]


def _exit(line: str, code: int) -> None:
    from llmkit.train.launch import record_exit

    print(line, file=sys.stderr, flush=True)
    record_exit(code)
    raise typer.Exit(code) from None


def environment_error(exc: OSError) -> str | None:
    """One line for an OSError the user fixes on their machine (full disk, read-only or forbidden path); None for
    any other, which is a bug. Outputs are written in staging directories, so nothing half-written stays."""
    import errno

    where = exc.filename or "output"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: no space left on device; free space and run again (nothing half-written was kept)"
    if exc.errno == errno.EROFS:
        return f"{where}: read-only file system; choose a writable --out"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; choose a path you can write (or read), or fix its permissions"
    return None


def _quiet_libraries() -> None:
    """Keep library chatter (download bars, accelerator probing) out of llmkit's output, unless set; a library's
    warning prints once, whole, on one line."""
    from llmkit.console import show_warning

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # torch.distributed's renamed collectives, called by DeepSpeed: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.showwarning = show_warning
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import logging as stdlib_logging

    # torchao's optional CUDA extensions, absent on a CPU build: it says so at import, and it works without them.
    stdlib_logging.getLogger("torchao").setLevel(stdlib_logging.ERROR)
    stdlib_logging.getLogger("torch.utils._pytree").setLevel(
        stdlib_logging.ERROR
    )  # torchao registers enums torch now knows
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        from transformers.utils import logging

        logging.disable_progress_bar()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@app.command("data-prep")
@user_errors_exit_2
def data_prep_command(
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="SOURCES", help="Files, folders, globs, hf:NAME or builtin:stories (default: the recipe's sources)."
        ),
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Dataset directory to write.")] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Existing tokenizer (HF directory or hub name); default trains a BPE.")
    ] = None,
    vocab_size: Annotated[int | None, typer.Option(help="Vocabulary size of a trained tokenizer.")] = None,
    block_size: Annotated[int | None, typer.Option(help="Tokens per packed block.")] = None,
    text_field: Annotated[str | None, typer.Option(help="Field holding the text (jsonl/json/csv/parquet).")] = None,
    encoding: EncodingOpt = None,
    val_fraction: Annotated[float | None, typer.Option(help="Fraction of documents for validation.")] = None,
    num_proc: Annotated[int | None, typer.Option(help="Tokenizer worker processes.")] = None,
    seed: SeedOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Clean, filter, deduplicate, tokenize and pack text.

    Writes a dataset directory with a manifest. Quality filters, PII masking, decontamination, near-dedup and
    mixing are data.* settings (docs/data-prep.md; --config curate-web turns on the web set). Same inputs and
    settings reuse the existing output; changed inputs rebuild it; an interrupted run resumes its finished shards.
    """
    from llmkit.config import input_paths, load_config
    from llmkit.data.prep import prepare_dataset
    from llmkit.reports import print_prep_summary

    flags = {
        "data.sources": list(sources) if sources else None,
        "data.dataset_dir": out,
        "data.tokenizer": tokenizer,
        "data.vocab_size": vocab_size,
        "data.block_size": block_size,
        "data.text_field": text_field,
        "data.encoding": encoding,
        "data.val_fraction": val_fraction,
        "data.num_proc": num_proc,
        "data.seed": seed,
    }
    cfg = load_config(config, overrides, flags)
    recipe = input_paths(cfg, skip=["data.dataset_dir"])  # the recipe file among them
    print_prep_summary(prepare_dataset(cfg.data, cfg.data.dataset_dir, overwrite=overwrite, reads=recipe))


@app.command("pretrain")
@user_errors_exit_2
def pretrain_command(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Run directory to create.")] = None,
    data: Annotated[str | None, typer.Option(help="Prepared dataset directory (from data-prep).")] = None,
    init_from: Annotated[str | None, typer.Option(help="Continue from an HF model directory or hub name.")] = None,
    teacher: TeacherOpt = None,
    max_steps: Annotated[int | None, typer.Option(help="Budget in optimizer steps.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Budget in training tokens.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    micro_batch_size: Annotated[int | None, typer.Option(help="Sequences per process per forward pass.")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, bf16, fp16 or fp8.")] = None,
    seed: SeedOpt = None,
    keep_last: Annotated[int | None, typer.Option(help="Checkpoints to keep (older ones pruned).")] = None,
    max_time: MaxTimeOpt = None,
    resume: ResumeOpt = None,
    resume_fallback: ResumeFallbackOpt = False,
    allow_config_change: AllowChangeOpt = False,
    gradient_checkpointing: GradientCheckpointingOpt = None,
    compile_model: CompileOpt = None,
    strategy: StrategyOpt = None,
    deepspeed_config: DeepSpeedConfigOpt = None,
    accelerate_config: AccelerateConfigOpt = None,
    num_processes: NumProcessesOpt = None,
    cpu: CpuOpt = False,
    num_machines: NumMachinesOpt = None,
    machine_rank: MachineRankOpt = None,
    main_process_ip: MainProcessIpOpt = None,
    main_process_port: MainProcessPortOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train a decoder language model on a prepared dataset.

    Writes RUN/config.yaml, metrics.jsonl, tensorboard/, checkpoints/, loss.png and final/ (an HF model).
    Exit codes: 0 done (or already finished); 2 bad input; 3 non-finite loss; 75 stopped by SIGTERM, SIGUSR1,
    Ctrl-C or --max-time, after a checkpoint when training had begun (continue with --resume auto); 130 a second
    Ctrl-C (stopped at once; the newest checkpoint is kept).
    """
    flags = {
        "out_dir": out,
        "data.dataset_dir": data,
        "model.init_from": init_from,
        "distill.teacher": teacher,
        "train.max_steps": max_steps,
        "train.max_tokens": max_tokens,
        "checkpoint.keep_last": keep_last,
        **_shared_training_flags(
            lr, micro_batch_size, precision, gradient_checkpointing, compile_model, seed, max_time
        ),
        "distributed.strategy": strategy,
        "distributed.deepspeed_config": deepspeed_config,
        "distributed.device": "cpu" if cpu else None,
    }
    launch = (num_processes, num_machines, machine_rank, main_process_ip, main_process_port, accelerate_config)
    _train("pretrain", config, overrides, flags, launch, overwrite, resume, resume_fallback, allow_config_change)


@app.command("finetune")
@user_errors_exit_2
def finetune_command(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    model: Annotated[str | None, typer.Option(help="Base model: HF directory, run directory or hub name.")] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(metavar="PATH", help="Training rows: jsonl/json/csv/parquet files, folders or hf:NAME."),
    ] = None,
    val_file: Annotated[str | None, typer.Option(help="Validation rows (default: hold out data.val_fraction).")] = None,
    encoding: EncodingOpt = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Run directory to create.")] = None,
    task: Annotated[
        str | None,
        typer.Option(help="sft (default), classify, preference tuning (dpo, orpo, simpo, kto), reward or distill."),
    ] = None,
    teacher: TeacherOpt = None,
    method: Annotated[str | None, typer.Option(help="full, lora, qlora or freeze.")] = None,
    data_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="auto, messages, sharegpt, alpaca, prompt_completion, text, classification, preference, "
            "conversation_pair or unpaired.",
        ),
    ] = None,
    template: Annotated[str | None, typer.Option(help="Chat template: auto, chatml, llama3 or alpaca.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Longest example in tokens.")] = None,
    packing: Annotated[bool | None, typer.Option("--packing/--no-packing", help="Pack examples, or pad.")] = None,
    train_on_prompt: Annotated[
        bool | None, typer.Option("--train-on-prompt", help="Train on every token, not only the answers.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Budget in optimizer steps.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Budget in passes over the training rows.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    micro_batch_size: Annotated[int | None, typer.Option(help="Rows per process per forward pass.")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, bf16, fp16 or fp8.")] = None,
    seed: SeedOpt = None,
    max_time: MaxTimeOpt = None,
    resume: ResumeOpt = None,
    resume_fallback: ResumeFallbackOpt = False,
    allow_config_change: AllowChangeOpt = False,
    gradient_checkpointing: GradientCheckpointingOpt = None,
    compile_model: CompileOpt = None,
    strategy: StrategyOpt = None,
    deepspeed_config: DeepSpeedConfigOpt = None,
    accelerate_config: AccelerateConfigOpt = None,
    num_processes: NumProcessesOpt = None,
    cpu: CpuOpt = False,
    num_machines: NumMachinesOpt = None,
    machine_rank: MachineRankOpt = None,
    main_process_ip: MainProcessIpOpt = None,
    main_process_port: MainProcessPortOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Fine-tune a model on your rows (SFT, DPO, classify, distill).

    Tasks: chat/instruction SFT, classification, preference tuning (DPO, ORPO, SimPO, KTO), a reward model, or
    distillation from a teacher; methods: full, LoRA, QLoRA or freeze.

    SFT's loss covers assistant and completion tokens only; packed examples never attend to each other.
    Exit codes as for pretrain: 0 done, 2 bad input, 3 non-finite loss, 75 stopped by a signal or --max-time
    (after a checkpoint once training had begun), 130 a second Ctrl-C.
    """
    flags = {
        "model.init_from": model,
        "data.sources": list(data) if data else None,
        "finetune.val_file": val_file,
        "data.encoding": encoding,
        "out_dir": out,
        "finetune.task": task,
        "distill.teacher": teacher,
        "finetune.method": method,
        "finetune.format": data_format,
        "finetune.chat_template": template,
        "finetune.max_length": max_length,
        "finetune.packing": packing,
        "finetune.train_on_prompt": train_on_prompt,
        "train.max_steps": max_steps,
        "train.max_epochs": epochs,
        **_shared_training_flags(
            lr, micro_batch_size, precision, gradient_checkpointing, compile_model, seed, max_time
        ),
        "distributed.strategy": strategy,
        "distributed.deepspeed_config": deepspeed_config,
        "distributed.device": "cpu" if cpu else None,
    }
    launch = (num_processes, num_machines, machine_rank, main_process_ip, main_process_port, accelerate_config)
    _train("finetune", config, overrides, flags, launch, overwrite, resume, resume_fallback, allow_config_change)


def _shared_training_flags(
    lr: float | None,
    micro_batch_size: int | None,
    precision: str | None,
    gradient_checkpointing: bool | None,
    compile_model: bool | None,
    seed: int | None,
    max_time: str | None,
) -> dict[str, Any]:
    """The typed flags pretrain and finetune share, as dotted config keys (None: not given)."""
    return {
        "optimizer.lr": lr,
        "train.micro_batch_size": micro_batch_size,
        "precision.dtype": precision,
        "train.gradient_checkpointing": gradient_checkpointing,
        "train.compile": compile_model,
        "train.seed": seed,
        "train.max_time": parse_duration(max_time) if max_time else None,
    }


@contextlib.contextmanager
def _training_process() -> Iterator[None]:
    """Stop signals are handled from the first line of a training command to its exit code (llmkit.train.signals)."""
    global _EXIT_AT_ONCE
    from llmkit.train.signals import stop_signals

    with stop_signals(until_exit=_WHOLE_PROCESS):
        try:
            yield
        finally:
            _EXIT_AT_ONCE = _WHOLE_PROCESS


@_training_process()
def _train(
    command: str,
    config: Path | None,
    overrides: list[str] | None,
    flags: dict[str, Any],
    launch: tuple[Any, ...],
    overwrite: bool,
    resume: str | None,
    resume_fallback: bool,
    allow_config_change: bool,
) -> None:
    """Relaunch under accelerate when more processes are asked for; else resolve the config, run, report.
    `command` (pretrain or finetune) is imported here, once the stop signals are handled: torch's import takes
    seconds, and a SIGTERM during it used to end the process with 143 instead of 75."""
    import importlib

    from llmkit.config import load_config
    from llmkit.reports import print_fit_summary
    from llmkit.train.launch import relaunch
    from llmkit.train.strategies import check_available
    from llmkit.train.trackers import check_trackers

    cfg = load_config(config, overrides, flags)  # a bad config fails here, before any process starts
    processes, machines, machine_rank, ip, port, accelerate_config = launch
    check_available(cfg, (processes or 1) * (machines or 1), command == "finetune", processes or 1)
    check_trackers(cfg.logging.report_to)
    deepspeed = cfg.distributed.strategy not in ("ddp", "fsdp") or cfg.distributed.deepspeed_config is not None
    single = "--use_deepspeed" if deepspeed else ("--use_fsdp" if cfg.distributed.strategy == "fsdp" else None)
    code = relaunch(
        sys.argv[1:],
        processes,
        machines,
        machine_rank,
        ip,
        port,
        accelerate_config,
        single_process_launch=single,
        cpu=cfg.distributed.device == "cpu",
    )
    if code is not None:
        raise typer.Exit(code)
    from llmkit.train import faults

    faults.maybe_kill("loading", 0)
    run = getattr(importlib.import_module(f"llmkit.train.{command}"), command)
    result = run(cfg, overwrite, resume, resume_fallback, allow_config_change)
    if result.already_finished:
        if result.main_process:
            print(
                f"{cfg.out_dir}: this run finished at step {result.steps:,} (final model in {result.final_dir}); "
                "nothing to do",
                file=sys.stderr,
            )
        return
    if result.main_process:
        print_fit_summary(result)
    if result.interrupted and result.main_process:
        print(
            f"stopped ({result.interrupted}) at step {result.steps}; checkpoint {result.checkpoint}; "
            "continue with --resume auto",
            file=sys.stderr,
        )
    if result.interrupted:
        from llmkit.train.launch import record_exit

        record_exit(PREEMPTED_EXIT)
        raise typer.Exit(PREEMPTED_EXIT)


def eval_command(
    model: ModelArg,
    data: Annotated[
        str | None,
        typer.Option(help="Prepared dataset (its validation split), a raw text/JSONL file, or text+label rows."),
    ] = None,
    tasks: Annotated[
        list[Path] | None,
        typer.Option("--tasks", metavar="FILE", help="Task file (YAML; see docs/eval.md), repeatable."),
    ] = None,
    harness: Annotated[
        str | None, typer.Option(help="lm-evaluation-harness tasks, comma-separated (names or task YAML files).")
    ] = None,
    gate: Annotated[
        list[str] | None,
        typer.Option("--gate", metavar="RULE", help="CI gate METRIC OP VALUE, e.g. 'colors.acc>=0.8' (repeatable)."),
    ] = None,
    baseline: Annotated[Path | None, typer.Option(help="An earlier JSON report to compare with.")] = None,
    max_regression: Annotated[
        float, typer.Option(help="With --baseline: fail if a metric got worse by more than this (absolute).")
    ] = 0.0,
    report: ReportOpt = None,
    markdown: MarkdownOpt = None,
    junit: JunitOpt = None,
    max_perplexity: Annotated[float | None, typer.Option(help="Gate: same as --gate 'perplexity<=X'.")] = None,
    min_accuracy: Annotated[float | None, typer.Option(help="Gate (classifiers): --gate 'accuracy>=X'.")] = None,
    min_f1: Annotated[float | None, typer.Option(help="Gate (classifiers): --gate 'macro_f1>=X'.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    seq_len: Annotated[int | None, typer.Option(help="Window length for raw text (default: model context).")] = None,
    max_batches: Annotated[int | None, typer.Option(help="Score at most this many batches.")] = None,
    limit: Annotated[int | None, typer.Option(help="Harness: score only the first N items of each task.")] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the text in JSONL/CSV/parquet.")] = "text",
    encoding: Annotated[str, typer.Option(help="Text encoding of a raw --data file.")] = "utf-8",
    task: Annotated[
        str, typer.Option(help="What --data is scored as: auto (by the model) or reward (pairs or candidates).")
    ] = "auto",
    scores: Annotated[Path | None, typer.Option(help="Reward models: write each row's reward here (JSONL).")] = None,
) -> None:
    """Score a model: perplexity, classification, task files, gates.

    Held-out perplexity or classification (--data), task files (--tasks), harness tasks (--harness); gates and
    regressions against a baseline; JSON, Markdown and JUnit reports.

    Exit codes: 0 every gate and regression check passed, 1 one failed, 2 bad input.
    """
    from llmkit.eval.run import evaluate_model
    from llmkit.reports import (
        print_classification_report,
        print_eval_report,
        print_reward_report,
        print_task_results,
    )

    sugar = [("perplexity<=", max_perplexity), ("accuracy>=", min_accuracy), ("macro_f1>=", min_f1)]
    gates = [*(gate or []), *(f"{rule}{limit!r}" for rule, limit in sugar if limit is not None)]
    result = evaluate_model(
        model, data, list(tasks or []), [t for t in (harness or "").split(",") if t], gates, baseline,
        max_regression, batch_size, seq_len, max_batches, limit, text_field, encoding,
        reports=[path for path in (report, markdown, junit) if path is not None], task=task, scores=scores,
    )  # fmt: skip
    if data is not None:
        printer = {"reward": print_reward_report}.get(result.get("kind", ""))
        (printer or (print_classification_report if "macro_f1" in result else print_eval_report))(result)
    if "tasks" in result:
        print_task_results(result["tasks"])
    if "harness" in result:
        print_task_results(result["harness"], title="lm-evaluation-harness")
    _finish_checks(result, report, markdown, junit)


def _finish_checks(result: dict[str, Any], report: Path | None, markdown: Path | None, junit: Path | None) -> None:
    """Show the gates and regression checks, write the reports, name each failure; exit 1 when one failed."""
    from llmkit.eval.run import write_reports
    from llmkit.reports import print_checks

    print_checks(result)
    write_reports(result, report, markdown, junit)
    for kind in ("gates", "regressions"):
        for check in result[kind]:
            if not check["passed"]:
                print(f"{kind.removesuffix('s')} failed: {check['detail']}", file=sys.stderr)
    if not result["passed"]:
        raise typer.Exit(GATE_FAILED_EXIT)


app.command("eval")(user_errors_exit_2(eval_command))
app.command("evaluate", help="Alias of `llmkit eval`.")(user_errors_exit_2(eval_command))


@app.command("export")
@user_errors_exit_2
def export_command(
    source: SourceArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    fmt: Annotated[str, typer.Option("--format", help="hf, gguf (llama.cpp) or onnx (onnxruntime).")] = "hf",
    dtype: Annotated[
        str | None,
        typer.Option(
            help="hf: float32/bfloat16/float16; gguf: f32, f16 (default), q8_0, q5_1, q5_0, q4_1, q4_0, "
            "k-quants q6_k..q2_k; onnx: float32."
        ),
    ] = None,
    quantize: Annotated[
        str | None, typer.Option(help="hf: int8 (torchao) or int4 (bitsandbytes NF4) weights; onnx: int8 dynamic.")
    ] = None,
    merge_lora: Annotated[
        bool, typer.Option("--merge-lora", help="Fold a LoRA run's adapter into a standalone model.")
    ] = False,
    max_logit_diff: Annotated[float | None, typer.Option(help="Parity tolerance: largest logit difference.")] = None,
    min_greedy_agreement: Annotated[
        float | None, typer.Option(help="Parity tolerance: least share of equal greedy tokens.")
    ] = None,
    max_ppl_increase: Annotated[
        float | None, typer.Option(help="Parity tolerance: largest relative perplexity change (0.02 = 2%).")
    ] = None,
    probe_data: Annotated[
        str | None,
        typer.Option(help="Text of your domain to probe with (.txt lines, .jsonl 'text'); default built-in."),
    ] = None,
    eval_report: Annotated[Path | None, typer.Option(help="An llmkit eval report to put in the model card.")] = None,
    ladder: Annotated[
        bool,
        typer.Option("--ladder", help="gguf: measure every quantization level, keep the smallest within tolerance."),
    ] = False,
    push_to_hub: Annotated[
        str | None,
        typer.Option(metavar="OWNER/NAME", help="Upload the checked export with its card (token: HF_TOKEN or login)."),
    ] = None,
    public: Annotated[bool, typer.Option("--public", help="With --push-to-hub: a public repository.")] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write the model as hf, gguf or onnx, checked for parity.

    Checked against the source on logits, greedy tokens and perplexity, with export_report.json and a model card
    (README.md); --ladder measures every GGUF level and keeps the smallest within tolerance; --push-to-hub uploads
    the checked export. Exit 1 when parity breaks: nothing is written.
    """
    from llmkit.export.export import export_model
    from llmkit.reports import print_export_report

    tolerance = {"max_logit_diff": max_logit_diff, "min_greedy_agreement": min_greedy_agreement,
                 "max_ppl_increase": max_ppl_increase}  # fmt: skip
    report = export_model(source, out, fmt=fmt, dtype=dtype, quantize=quantize, overwrite=overwrite,
                          merge_lora=merge_lora, tolerance=tolerance, eval_report=eval_report,
                          probe_data=probe_data, ladder=ladder, push_to_hub=push_to_hub,
                          public=public)  # fmt: skip
    print_export_report(report)


@app.command("prune")
@user_errors_exit_2
def prune_command(
    source: SourceArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write (an HF model directory).")],
    data: Annotated[str, typer.Option(help="Calibration text: a prepared dataset, or a .txt/.jsonl file.")],
    target_params: Annotated[
        float | None, typer.Option(help="Parameters to keep: a fraction (0.75) or a count (2.3e6).")
    ] = None,
    axis: Annotated[str, typer.Option(help="How --target-params is reached: width (MLP channels) or depth.")] = "width",
    drop_layers: Annotated[int | None, typer.Option(help="Blocks to drop (the least influential).")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads to keep per layer (Llama).")] = None,
    mlp: Annotated[int | None, typer.Option(help="MLP channels to keep per layer (Llama).")] = None,
    hidden: Annotated[int | None, typer.Option(help="Hidden channels to keep (Llama).")] = None,
    batches: Annotated[int, typer.Option(help="Calibration batches of 8 sequences.")] = 16,
    overwrite: OverwriteOpt = False,
) -> None:
    """Cut a trained model down by depth or width.

    Depth drops blocks; width drops heads, MLP or hidden channels. Scored on calibration text; writes a plain HF
    model directory with prune_report.json and a model card. Heal it with
    `llmkit pretrain --init-from OUT --teacher SOURCE` (docs/compression.md).
    """
    from llmkit.compress.prune import PruneSpec, prune_model
    from llmkit.reports import print_prune_report

    spec = PruneSpec(drop_layers, heads, mlp, hidden, target_params, axis)
    print_prune_report(prune_model(source, out, data, spec, batches, overwrite))


@app.command("factor")
@user_errors_exit_2
def factor_command(
    source: SourceArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    rank: Annotated[int | None, typer.Option(help="Rank of every factored projection.")] = None,
    energy: Annotated[
        float | None, typer.Option(help="Or: the smallest rank keeping this share of squared singular values.")
    ] = None,
    dense: Annotated[
        bool, typer.Option("--dense", help="Write the truncated weights as plain projections (loads anywhere).")
    ] = False,
    data: Annotated[str | None, typer.Option(help="Held-out text to measure perplexity before and after.")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Factor block projections into low-rank pairs (truncated SVD).

    Every block projection is factored to --rank or to an --energy share, where that saves. The factored directory
    is smaller and faster and loads through llmkit (eval, generate, export); --dense writes the truncated weights as
    plain projections that any tool loads.
    """
    from llmkit.compress.lowrank import factor_directory
    from llmkit.reports import print_factor_report

    print_factor_report(factor_directory(source, out, rank, energy, dense, data, overwrite))


@app.command("generate")
@user_errors_exit_2
def generate_command(
    model: ModelArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue, or a chat model's question.")],
    max_new_tokens: MaxNewTokensOpt = 100,
    temperature: TemperatureOpt = 0.8,
    top_k: TopKOpt = 50,
    top_p: TopPOpt = 1.0,
    raw: Annotated[bool, typer.Option("--raw", help="Continue the prompt as is, without the chat template.")] = False,
    seed: SeedOpt = None,
) -> None:
    """Continue a prompt, or answer it, streaming tokens.

    A model with a chat template answers the prompt as a question (--raw continues it as is).
    """
    from llmkit.generate import Sampling, generate_text

    generate_text(model, prompt, Sampling(max_new_tokens, temperature, top_k, top_p), seed, raw)
    print()


@app.command("chat")
@user_errors_exit_2
def chat_command(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="A fine-tuned run, checkpoint or HF chat model directory.")
    ],
    system: Annotated[str | None, typer.Option(help="System message for the conversation.")] = None,
    max_new_tokens: MaxNewTokensOpt = 200,
    temperature: TemperatureOpt = 0.7,
    top_k: TopKOpt = 50,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
) -> None:
    """Talk to a chat model in the terminal (/reset, /exit).

    Through the chat template the model was trained with.
    """
    from llmkit.generate import Sampling, chat_loop

    chat_loop(model, Sampling(max_new_tokens, temperature, top_k, top_p), system, seed=seed)


REQUEST_LOG = Path("requests.jsonl")


@app.command("serve")
@user_errors_exit_2
def serve_command(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    model_name: Annotated[
        str | None, typer.Option(help="The model name clients send (default: the directory's name).")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require Authorization: Bearer KEY (401 without); other users see it in ps: prefer "
            "LLMKIT_API_KEY or --api-key-file."
        ),
    ] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="Read the API key from this file (its first line).")] = None,
    max_batch: Annotated[int, typer.Option(help="Requests generating at once (continuous batching).")] = 32,
    max_queue: Annotated[int, typer.Option(help="Requests waiting beyond those; more get 429.")] = 256,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(help="Longest prompt accepted (default: the context less one).")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Largest max_tokens a request may ask for.")] = None,
    default_max_tokens: Annotated[int, typer.Option(help="New tokens when a request names none.")] = 256,
    request_timeout: Annotated[float, typer.Option(help="Seconds before a request is cancelled (504).")] = 600.0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body read (413 beyond).")] = 4 * 2**20,
    request_log: Annotated[Path, typer.Option(help="JSONL log of every request (timings, tokens).")] = REQUEST_LOG,
    log_prompts: Annotated[
        bool, typer.Option("--log-prompts", help="Also log prompt text (for `llmkit monitor` drift).")
    ] = False,
    engine: Annotated[str, typer.Option(help="transformers, or vllm (GPU nodes, tensor parallel).")] = "transformers",
    tensor_parallel: Annotated[int, typer.Option(help="GPUs per model with --engine vllm.")] = 1,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API.

    /v1/chat/completions (the model's chat template), /v1/completions, streaming, /v1/models, /health and
    Prometheus /metrics. A run, checkpoint, LoRA run, HF or GGUF export. SIGTERM drains and exits 0.
    """
    from llmkit.serve.requests import Limits
    from llmkit.serve.server import api_key_from, serve

    limits = Limits(max_batch, max_queue, max_prompt_tokens, max_tokens, default_max_tokens, request_timeout,
                    max_body_bytes)  # fmt: skip
    key = api_key_from(api_key, api_key_file)
    code = serve(model, host, port, model_name, key, limits, request_log, log_prompts, engine, tensor_parallel)
    raise typer.Exit(code)


@app.command("monitor")
@user_errors_exit_2
def monitor_command(
    source: Annotated[
        str, typer.Argument(metavar="LOG_OR_URL", help="A serve request log (JSONL), or http://HOST:PORT/metrics.")
    ],
    since: Annotated[str | None, typer.Option(help="Only requests of the last 15m, 1h, 1d...")] = None,
    model: Annotated[
        str | None, typer.Option(help="The served run: perplexity drift of the logged prompts against it.")
    ] = None,
    gate: Annotated[
        list[str] | None,
        typer.Option("--gate", metavar="RULE", help="METRIC OP VALUE, e.g. 'p99_latency_s<=2' (repeatable)."),
    ] = None,
    max_prompts: Annotated[int, typer.Option(help="With --model: score the last N logged prompts.")] = 1000,
    report: ReportOpt = None,
    markdown: MarkdownOpt = None,
    junit: JunitOpt = None,
) -> None:
    """Latency, errors, throughput and drift of a served model.

    p50/p95/p99 latency, time to first token and per token, error rate, tokens/s; prompt perplexity drift with
    --model. Exit codes: 0 every gate passed, 1 one failed, 2 bad input.
    """
    from llmkit.outputs import check_report_paths
    from llmkit.reports import print_monitor_report
    from llmkit.serve.monitor import monitor

    check_report_paths([report, markdown, junit], [source, model])
    result = monitor(source, since, model, list(gate or []), max_prompts)
    print_monitor_report(result)
    _finish_checks(result, report, markdown, junit)


@app.command("plan")
@user_errors_exit_2
def plan_command(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML file.")],
    overrides: SetOpt = None,
    gpus: Annotated[int, typer.Option(help="GPUs in the run.")] = 1,
    gpu_type: Annotated[str, typer.Option(help="h100, h200, a100, a100-40, l40s, a10, rtx4090 or v100.")] = "h100",
    strategy: Annotated[
        str, typer.Option(help="ddp, zero1, zero2, fsdp, zero3, zero2-offload or zero3-offload.")
    ] = "ddp",
    mfu: Annotated[float, typer.Option(help="Model FLOPs utilization assumed for the time estimate.")] = 0.4,
    price_per_gpu_hour: Annotated[float | None, typer.Option(help="Price of one GPU-hour, for the cost.")] = None,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Estimate with activation checkpointing.")
    ] = False,
    train_tokens: Annotated[int | None, typer.Option(help="Tokens per epoch, when the recipe budgets epochs.")] = None,
    stage: Annotated[
        str | None,
        typer.Option(
            help="pretrain or finetune; default: finetune when the recipe has model.init_from and a "
            "finetune section, else pretrain (from scratch, or continued from model.init_from)."
        ),
    ] = None,  # fmt: skip
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Before a run: parameters, FLOPs, memory per GPU, time and cost.

    Memory by strategy, with the cheapest strategy that fits suggested; a distillation teacher's memory, FLOPs or
    cache disk included. Every formula is in llmkit/plan.py and docs/plan.md.
    """
    from llmkit.config import load_config
    from llmkit.plan import plan_run
    from llmkit.reports import print_plan

    cfg = load_config(recipe, overrides)
    plan = plan_run(cfg, gpus, gpu_type, strategy, mfu, price_per_gpu_hour, gradient_checkpointing, train_tokens, stage)
    if as_json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print_plan(plan)


@app.command("env")
@user_errors_exit_2
def env_command(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Versions of Python and the libraries, and the CUDA devices."""
    from llmkit.env import environment

    info = environment()
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")


@config_app.command("show")
@user_errors_exit_2
def config_show_command(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Recipe YAML file.")],
    overrides: SetOpt = None,
) -> None:
    """Print a recipe fully resolved: every key with its value after defaults and overrides."""
    from llmkit.config import dump_config, load_config

    print(dump_config(load_config(file, overrides)), end="")


@config_app.command("keys")
@user_errors_exit_2
def config_keys_command() -> None:
    """Every config key with its default and description, as Markdown (docs/config.md is this output)."""
    from llmkit.config import describe_keys

    print(describe_keys(), end="")


@recipes_app.callback(invoke_without_command=True)
@user_errors_exit_2
def recipes_command(ctx: typer.Context) -> None:
    """List the bundled recipes: purpose, hardware, command.

    `llmkit recipes show NAME` prints one; `--config NAME` uses one without copying it (copy it to change it).
    """
    if ctx.invoked_subcommand is not None:
        return
    from llmkit.bundled import bundled_recipes
    from llmkit.reports import print_recipes

    print_recipes(bundled_recipes())


@recipes_app.command("show")
@user_errors_exit_2
def recipes_show_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A recipe (tiny-cpu), or deepspeed/zero2, ci-eval...")],
) -> None:
    """Print one bundled recipe or config file.

    As it ships: `llmkit recipes show tiny-cpu > my.yaml` starts your own.
    """
    from llmkit.bundled import find_recipe

    print(find_recipe(name).read_text(encoding="utf-8"), end="")


# True when llmkit is the process (the `llmkit` script, `python -m llmkit`), not a library called in-process.
_WHOLE_PROCESS = False
# A training command has done its work (outputs closed and renamed into place): exit without the interpreter's
# finalization, which resets signal handlers to the default and can take a second or more (library threads), so a
# scheduler's second SIGTERM in that window would turn exit code 75 into 143.
_EXIT_AT_ONCE = False


def main() -> None:
    global _WHOLE_PROCESS
    _WHOLE_PROCESS = True
    try:
        app()
    except SystemExit as exc:
        if not _EXIT_AT_ONCE:
            raise
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
