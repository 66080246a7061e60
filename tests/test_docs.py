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
