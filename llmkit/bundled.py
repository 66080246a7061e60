"""The bundled recipes: list them with their purpose and hardware, find one by name.

They ship inside the package (llmkit/recipes/, also reachable as recipes/ in a checkout), so `--config tiny-cpu`
works after a plain `pip install`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from llmkit.errors import UserError, did_you_mean

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    about: str
    hardware: str
    command: str  # the llmkit command that runs it


def bundled_recipes() -> list[Recipe]:
    """Every recipe shipped with llmkit (training or data-prep): the YAML files at the top of the recipes folder with
    an `about`."""
    recipes = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if "about" in raw:
            about, _, hardware = str(raw["about"]).partition("; ")
            command = "finetune" if "finetune" in raw else "pretrain" if {"train", "model"} & set(raw) else "data-prep"
            recipes.append(Recipe(path.stem, path, about.strip(), hardware.strip().rstrip("."), command))
    return recipes


def bundled_files() -> dict[str, Path]:
    """Every bundled file by its name: the path under the recipes folder without its suffix ('deepspeed/zero2')."""
    files = sorted(p for p in RECIPES_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return {str(p.relative_to(RECIPES_DIR).with_suffix("")): p for p in files}


def find_recipe(name: str) -> Path:
    """A bundled file by name (`tiny-cpu`, `tiny-cpu.yaml`, `deepspeed/zero2`), or a one-line error."""
    files = bundled_files()
    stem = str(Path(name).with_suffix("")) if Path(name).suffix in (".yaml", ".json", ".sh", ".sbatch") else name
    if stem not in files:
        raise UserError(f"no bundled recipe '{name}'{did_you_mean(stem, list(files))}; `llmkit recipes` lists them")
    return files[stem]
