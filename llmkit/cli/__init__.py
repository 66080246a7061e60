"""The `llmkit` command line. It only wires: each command's work lives in its own module, and each group of
commands in its own file here, registered on one Typer app in the order `llmkit --help` lists them."""

import importlib

from llmkit.cli.app import app, main

for _group in ("training", "checks", "serving", "tools"):
    importlib.import_module(f"llmkit.cli.{_group}")

__all__ = ["app", "main"]
