"""data-prep, pretrain and finetune."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from llmkit.cli.app import PROCESS, app, user_errors_exit_2
from llmkit.cli.options import (
    AccelerateConfigOpt,
    AllowChangeOpt,
    CompileOpt,
    ConfigOpt,
    CpuOpt,
    DeepSpeedConfigOpt,
    EncodingOpt,
    GradientCheckpointingOpt,
    MachineRankOpt,
    MainProcessIpOpt,
    MainProcessPortOpt,
    MaxTimeOpt,
    NumMachinesOpt,
    NumProcessesOpt,
    OverwriteOpt,
    ResumeFallbackOpt,
    ResumeOpt,
    RewardOpt,
    RowFormatOpt,
    RowsOpt,
    SeedOpt,
    SetOpt,
    StrategyOpt,
    TaskOpt,
    TeacherOpt,
    TrainOnPromptOpt,
)
from llmkit.errors import PREEMPTED_EXIT, UserError, parse_duration


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
    workers: Annotated[
        int | None, typer.Option("--workers", "--num-proc", help="Processes curating, then tokenizing.")
    ] = None,
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
        "data.workers": workers,
        "data.seed": seed,
    }
    cfg = load_config(config, overrides, flags, {"data.sources": "SOURCES", "data.dataset_dir": "--out"})
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
    options = {**TRAINING_OPTIONS, "data.dataset_dir": "--data"}
    _train(
        "pretrain", config, overrides, (flags, options), launch, overwrite, resume, resume_fallback, allow_config_change
    )


@app.command("finetune")
@user_errors_exit_2
def finetune_command(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    model: Annotated[str | None, typer.Option(help="Base model: HF directory, run directory or hub name.")] = None,
    data: RowsOpt = None,
    val_file: Annotated[str | None, typer.Option(help="Validation rows (default: hold out data.val_fraction).")] = None,
    encoding: EncodingOpt = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Run directory to create.")] = None,
    task: TaskOpt = None,
    teacher: TeacherOpt = None,
    reward: RewardOpt = None,
    method: Annotated[str | None, typer.Option(help="full, lora, qlora or freeze.")] = None,
    data_format: RowFormatOpt = None,
    template: Annotated[str | None, typer.Option(help="Chat template: auto, chatml, llama3 or alpaca.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Longest example in tokens.")] = None,
    packing: Annotated[bool | None, typer.Option("--packing/--no-packing", help="Pack examples, or pad.")] = None,
    train_on_prompt: TrainOnPromptOpt = None,
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

    Tasks: chat/instruction SFT, classification, preference tuning (DPO, ORPO, SimPO, KTO), a reward model, online
    RL on sampled answers scored by your rewards (GRPO, Dr. GRPO, DAPO, RLOO), or
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
        "finetune.grpo.rewards": list(reward) if reward else None,
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
    options = {**TRAINING_OPTIONS, "model.init_from": "--model", "data.sources": "--data"}
    _train(
        "finetune", config, overrides, (flags, options), launch, overwrite, resume, resume_fallback, allow_config_change
    )


# The options of pretrain and finetune whose names are not their config key's last part (--max-steps).
TRAINING_OPTIONS = {
    "out_dir": "--out",
    "precision.dtype": "--precision",
    "distributed.device": "--cpu",
    "train.max_epochs": "--epochs",
    "finetune.grpo.rewards": "--reward",
    "finetune.chat_template": "--template",
}


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
    from llmkit.train.signals import stop_signals

    with stop_signals(until_exit=PROCESS.whole):
        try:
            yield
        finally:
            PROCESS.exit_at_once = PROCESS.whole


@_training_process()
def _train(
    command: str,
    config: Path | None,
    overrides: list[str] | None,
    flags: tuple[dict[str, Any], dict[str, str]],
    launch: tuple[Any, ...],
    overwrite: bool,
    resume: str | None,
    resume_fallback: bool,
    allow_config_change: bool,
) -> None:
    """Relaunch under accelerate when more processes are asked for; else resolve the config, run, report.
    `command` (pretrain or finetune) is imported here, once the stop signals are handled: torch's import takes
    seconds, and a SIGTERM during it used to end the process with 143 instead of 75. `flags`: the typed options as
    config keys, and the names of those not named for their key."""
    import importlib

    from llmkit.config import load_config
    from llmkit.reports import print_fit_summary
    from llmkit.train.launch import relaunch
    from llmkit.train.strategies import check_available, launch_mode
    from llmkit.train.trackers import check_trackers

    cfg = load_config(config, overrides, *flags)  # a bad config fails here, before any process starts
    for given, option in ((resume_fallback, "--resume-fallback"), (allow_config_change, "--allow-config-change")):
        if given and resume is None:
            raise UserError(f"{option} changes how a run resumes: it goes with --resume (auto or a checkpoint)")
    processes, machines, machine_rank, ip, port, accelerate_config = launch
    check_available(cfg, (processes or 1) * (machines or 1), command == "finetune", processes or 1)
    check_trackers(cfg.logging.report_to)
    code = relaunch(
        sys.argv[1:],
        processes,
        machines,
        machine_rank,
        ip,
        port,
        accelerate_config,
        single_process_launch=launch_mode(cfg),
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
