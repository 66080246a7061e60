"""plan, env, config and recipes."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from llmkit.cli.app import app, config_app, recipes_app, user_errors_exit_2
from llmkit.cli.options import ConfigOpt, RecipeArg, SetOpt, one_recipe
from llmkit.flops import GPU_TYPES


@app.command("plan")
@user_errors_exit_2
def plan_command(
    recipe: RecipeArg = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    gpus: Annotated[int, typer.Option(help="GPUs in the run.")] = 1,
    gpu_type: Annotated[str, typer.Option(help=f"One of {', '.join(GPU_TYPES)}.")] = "h100",
    strategy: Annotated[
        str, typer.Option(help="ddp, zero1, zero2, fsdp, zero3, zero2-offload or zero3-offload.")
    ] = "ddp",
    mfu: Annotated[float, typer.Option(help="Model FLOPs utilization assumed for the time estimate.")] = 0.4,
    price_per_gpu_hour: Annotated[float | None, typer.Option(help="Price of one GPU-hour, for the cost.")] = None,
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing",
            help="Estimate with activation checkpointing (as when the recipe sets train.gradient_checkpointing).",
        ),
    ] = False,
    train_tokens: Annotated[int | None, typer.Option(help="Tokens per epoch, when the recipe budgets epochs.")] = None,
    stage: Annotated[
        str | None,
        typer.Option(
            help="pretrain or finetune; default: finetune when the recipe has model.init_from and a "
            "finetune section, else pretrain (from scratch, or continued from model.init_from)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Before a run: parameters, FLOPs, memory per GPU, time and cost.

    The recipe as RECIPE or --config, as the training commands take it. Memory by strategy, with the cheapest
    strategy that fits suggested; a distillation teacher's memory, FLOPs or cache disk included. Every formula is in
    llmkit/plan.py and docs/plan.md.
    """
    from llmkit.config import load_config
    from llmkit.plan import plan_run
    from llmkit.reports import print_plan

    cfg = load_config(one_recipe(recipe, config, required=True), overrides)
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
    recipe: RecipeArg = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Print a recipe fully resolved: every key with its value after defaults and overrides.

    The recipe as RECIPE or --config, as the training commands take it; with neither, the defaults.
    """
    from llmkit.config import dump_config, load_config

    print(dump_config(load_config(one_recipe(recipe, config), overrides)), end="")


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
