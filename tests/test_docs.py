"""The docs that are generated from code stay in step with it."""

from __future__ import annotations

from pathlib import Path

from llmkit.config import describe_keys

ROOT = Path(__file__).parent.parent


def test_config_reference_matches_the_schema() -> None:
    text = (ROOT / "docs" / "config.md").read_text()
    assert text == describe_keys(), "docs/config.md is stale: regenerate it with `make docs`"


def test_deepspeed_recipes_match_the_strategies() -> None:
    """recipes/deepspeed/*.json are what --strategy uses, so a user's edited copy starts from the truth."""
    import json

    from llmkit.train.strategies import ZERO_STAGES, deepspeed_template

    folder = ROOT / "recipes" / "deepspeed"
    assert sorted(p.stem for p in folder.glob("*.json")) == sorted(ZERO_STAGES)
    for strategy in ZERO_STAGES:
        saved = json.loads((folder / f"{strategy}.json").read_text())
        assert saved == deepspeed_template(strategy), f"recipes/deepspeed/{strategy}.json is stale: run `make docs`"


def test_readme_shows_the_two_commands_and_links_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    for link in ["docs/data-prep.md", "docs/pretrain.md", "docs/eval.md", "docs/config.md", "docs/benchmarks.md"]:
        assert link in readme and (ROOT / link).is_file(), link


# Options of the tools the docs show beside llmkit (torchrun, accelerate, pip, docker, slurm, mlflow, transformers);
# the benches' own options are read from bench/*.py.
OTHER_TOOLS = {"--nproc", "--nproc_per_node", "--multi", "--multi_gpu", "--num", "--num_processes", "--port",
               "--use", "--use_deepspeed", "--config_file", "--requeue", "--signal", "--logdir", "--backend-store-uri",
               "--build-arg", "--continuous-batching", "--user", "--no-index", "--find-links",
               "--no-build-isolation", "--format"}  # fmt: skip


def bench_options() -> set[str]:
    """Every option a bench script's argparse takes (with its --no- form, for the boolean ones)."""
    import re

    found = {m for path in (ROOT / "bench").glob("*.py")
             for m in re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', path.read_text())}  # fmt: skip
    return found | {f"--no-{option[2:]}" for option in found}


def test_every_option_and_config_key_the_docs_name_exists() -> None:
    """Docs are read against the code: a renamed flag or key cannot linger in them."""
    import re

    import typer
    from pydantic import BaseModel

    from llmkit.cli import app
    from llmkit.config import RunConfig
    from llmkit.config.recipes import RENAMED

    options = {"--help"}
    commands = [typer.main.get_command(app)]
    while commands:
        command = commands.pop()
        options |= {name for param in command.params for name in (*param.opts, *param.secondary_opts)}
        commands += list(getattr(command, "commands", {}).values())
    keys: set[str] = set()

    def walk(model: type[BaseModel], prefix: str = "") -> None:
        for name, field in model.model_fields.items():
            keys.add(prefix + name)
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{prefix}{name}.")

    walk(RunConfig)
    keys |= {f"{section}.{key}" for section, key in RENAMED}  # old keys recipes still use, read with a note
    benches = bench_options()
    sections = sorted({key.split(".")[0] for key in keys if "." in key})
    key_pattern = re.compile(rf"(?<![\w./-])(?:{'|'.join(sections)})\.[a-z_]+(?:\.[a-z_]+)*(?![\w/-])")
    file_like = re.compile(r"\.(?:pt|py|md|jsonl|gguf|onnx|safetensors|lrr|load_universal)$")  # files; a typo's example
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if doc.name == "config.md":
            continue
        text = doc.read_text()
        for option in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]+", text)) - options - OTHER_TOOLS - benches:
            raise AssertionError(f"{doc.name} names {option}, which no llmkit command has")
        for key in {m.group(0) for m in key_pattern.finditer(text)} - keys:
            assert file_like.search(key), f"{doc.name} names config key {key}, which the schema does not have"
