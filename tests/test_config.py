"""Configuration: recipes validate, unknown keys are named with a suggestion, overrides resolve in order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from llmkit.config import RunConfig, apply_override, load_config
from llmkit.errors import UserError
from tests.conftest import run_cli

ALL_YAML = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
EVAL_SUITES = {"ci-eval.yaml"}  # task files for `llmkit eval --tasks`, not run recipes
RECIPES = [p for p in ALL_YAML if p.name not in EVAL_SUITES]


def test_there_are_the_three_required_recipes() -> None:
    names = {p.name for p in RECIPES}
    assert {"tiny-cpu.yaml", "gpt2-124m.yaml", "llama-1b.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_says_its_hardware(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert isinstance(cfg, RunConfig)
    assert cfg.about, f"{recipe.name} must say what hardware it is for in `about`"


def test_the_ci_eval_suite_and_example_tasks_load() -> None:
    from llmkit.data.task_files import load_task_files

    root = Path(__file__).parent.parent / "recipes"
    tasks, gates = load_task_files([root / "ci-eval.yaml"])
    assert [t.name for t in tasks] == ["animal_colors_mc", "animal_colors_gen", "stories"] and len(gates) == 2
    assert all((Path(t.base) / str(t.data)).is_file() for t in tasks)


def test_unknown_top_level_key_suggests_the_closest(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(UserError, match=r"unknown config key 'trian' \(did you mean 'train'\?\)"):
        load_config(path)


def test_unknown_nested_key_suggests_the_closest(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"unknown config key 'optimizer.learning_rat'"):
        load_config(None, ["optimizer.learning_rat=0.1"])
    with pytest.raises(UserError, match=r"'train.max_step' \(did you mean 'train.max_steps'\?\)"):
        load_config(None, ["train.max_step=5"])
    with pytest.raises(UserError, match=r"'train.lr' \(did you mean 'optimizer.lr'\?\)"):  # the right name elsewhere
        load_config(None, ["train.lr=1e-4"])


def test_a_budget_on_the_command_line_replaces_the_recipes(tmp_path: Path) -> None:
    """Every recipe budgets its run; `--max-steps 20` on one that budgets epochs or tokens was refused as two."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_epochs: 10\n")
    by_flag = load_config(recipe, flags={"train.max_steps": 20, "train.max_tokens": None}).train
    assert (by_flag.max_steps, by_flag.max_tokens, by_flag.max_epochs) == (20, None, None)
    by_set = load_config(recipe, ["train.max_tokens=5000"]).train
    assert (by_set.max_steps, by_set.max_tokens, by_set.max_epochs) == (None, 5000, None)
    assert load_config(recipe, ["optimizer.lr=1e-4"]).train.max_epochs == 10  # no budget given: the recipe's
    with pytest.raises(UserError, match="set only one of max_steps, max_tokens, max_epochs"):
        load_config(recipe, ["train.max_tokens=5000"], {"train.max_steps": 20})  # two given here: which one?


def test_wrong_value_names_the_key_and_value() -> None:
    with pytest.raises(UserError, match=r"config key 'train.micro_batch_size'.*got -1"):
        load_config(None, ["train.micro_batch_size=-1"])
    with pytest.raises(UserError, match=r"'precision.dtype'"):
        load_config(None, ["precision.dtype=fp4"])
    with pytest.raises(
        UserError, match=r"config key 'train.read_ahead': should be a valid boolean or 'auto' \(got 'maybe'\)"
    ):
        load_config(None, ["train.read_ahead=maybe"])


def test_an_error_names_where_the_bad_value_was_set(tmp_path: Path) -> None:
    """The recipe file at the key's line, the --set that gave it, or the command-line option: not the recipe for a
    value it never held."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# a recipe\ntrain:\n  max_steps: 10\n  compile: maybe\nmodel:\n  n_heads: 4\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(recipe))}:4: config key 'train.compile': should be"):
        load_config(recipe)
    recipe.write_text("train:\n  max_steps: 10\n")
    with pytest.raises(UserError, match=r"^--set train.compile=maybe: config key 'train.compile'"):
        load_config(recipe, ["train.compile=maybe"])
    with pytest.raises(UserError, match=r"^--set train.bogus=1: unknown config key 'train.bogus'"):
        load_config(recipe, ["train.bogus=1"])
    with pytest.raises(UserError, match=r"^--micro-batch-size -1: config key 'train.micro_batch_size'.*got -1"):
        load_config(recipe, [], {"train.micro_batch_size": -1})  # a typed option, named for its key
    with pytest.raises(UserError, match=r"^--out 12: config key 'out_dir'"):
        load_config(recipe, [], {"out_dir": 12}, {"out_dir": "--out"})  # or as the command names it
    # a cross-field rule: the section's line in the file, or the --set of a key inside it
    recipe.write_text("train:\n  max_steps: 10\nmodel:\n  hidden_size: 30\n  n_heads: 4\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(recipe))}:3: config key 'model': .*not divisible"):
        load_config(recipe)
    with pytest.raises(UserError, match=r"^--set model.hidden_size=30: config key 'model'"):
        load_config(None, ["model.hidden_size=30"])


def test_cross_field_rules() -> None:
    with pytest.raises(UserError, match="not divisible by n_heads"):
        load_config(None, ["model.hidden_size=30", "model.n_heads=4"])
    with pytest.raises(UserError, match="only one of max_steps, max_tokens, max_epochs"):
        load_config(None, ["train.max_steps=5", "train.max_tokens=100"])


def test_precedence_defaults_yaml_set_flags(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("optimizer:\n  lr: 0.01\ntrain:\n  max_steps: 7\n")
    assert load_config(path).optimizer.lr == 0.01
    assert load_config(path, ["optimizer.lr=0.02"]).optimizer.lr == 0.02
    assert load_config(path, ["optimizer.lr=0.02"], {"optimizer.lr": 0.03}).optimizer.lr == 0.03
    assert load_config(path, [], {"optimizer.lr": None}).optimizer.lr == 0.01
    assert load_config(path).optimizer.weight_decay == RunConfig().optimizer.weight_decay


def test_override_values_parse_as_yaml() -> None:
    raw: dict = {}
    apply_override(raw, "data.sources=[a.txt, b.jsonl]")
    apply_override(raw, "optimizer.betas=[0.9, 0.99]")
    apply_override(raw, "data.max_chars=null")
    apply_override(raw, "train.max_steps=12")
    assert raw == {
        "data": {"sources": ["a.txt", "b.jsonl"], "max_chars": None},
        "optimizer": {"betas": [0.9, 0.99]},
        "train": {"max_steps": 12},
    }
    with pytest.raises(UserError, match="expected dotted.key=value"):
        apply_override(raw, "train.max_steps")


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  max_steps: 3\n  lr: [1, 2\n")
    with pytest.raises(UserError, match=rf"{path}:\d+"):
        load_config(path)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_show_prints_the_resolved_recipe() -> None:
    recipe = Path(__file__).parent.parent / "recipes" / "tiny-cpu.yaml"
    result = run_cli("config", "show", recipe, "--set", "train.max_steps=9")
    assert result.exit_code == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["max_steps"] == 9
    assert resolved["optimizer"]["eps"] == RunConfig().optimizer.eps  # defaults are filled in
    assert set(resolved) == set(RunConfig.model_fields)
