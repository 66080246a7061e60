"""Arguments and options shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmkit.catalog import FINETUNE_TASKS
from llmkit.errors import UserError

SourceArg = Annotated[str, typer.Argument(metavar="SOURCE", help="Run directory, checkpoint or HF model directory.")]
ModelArg = Annotated[
    str, typer.Argument(metavar="MODEL", help="Run directory, checkpoint, or HF model directory/hub name.")
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Recipe YAML file (see recipes/).")]
RecipeArg = Annotated[
    Path | None,
    typer.Argument(metavar="RECIPE", help="Recipe YAML file or bundled recipe name (or --config).", show_default=False),
]


def one_recipe(recipe: Path | None, config: Path | None, required: bool = False) -> Path | None:
    """The recipe of a command that takes it as an argument, or as --config like the training commands."""
    if recipe is not None and config is not None and recipe != config:
        raise UserError(f"two recipes, {recipe} and --config {config}: give one")
    if required and recipe is None and config is None:
        raise UserError("give a recipe: RECIPE or --config (`llmkit recipes` lists the bundled ones)")
    return recipe or config


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
# finetune's own, kept here so its signature reads as a list
RowsOpt = Annotated[
    list[str] | None,
    typer.Option("--data", metavar="PATH", help="Training rows: jsonl/json/csv/parquet files, folders or hf:NAME."),
]
TaskOpt = Annotated[str | None, typer.Option(help=f"{', '.join(FINETUNE_TASKS)} (default sft); see docs/finetune.md.")]
RowFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="auto, messages, sharegpt, alpaca, prompt_completion, text, classification, preference, "
        "conversation_pair or unpaired.",
    ),
]
RewardOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--reward",
        metavar="SPEC",
        help="Task grpo: a task file, a reward model or module:function, optionally @WEIGHT (repeatable).",
    ),
]
TrainOnPromptOpt = Annotated[
    bool | None, typer.Option("--train-on-prompt", help="Train on every token, not only the answers.")
]
