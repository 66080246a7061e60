"""The benches' ways to run things apart: llmkit's CLI in a subprocess, as a user would (the wall time back), and
one contender of a side-by-side bench in a process of its own, so no patch, cache or allocator state of one
contender reaches the next."""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def llmkit(*args: str) -> float:
    """Run `llmkit ARGS`; exit with its error output when it fails; return the seconds it took."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"llmkit {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def scratch(prefix: str) -> Path:
    """A temporary directory for a bench's models, data and runs, removed when the bench exits: a 1B bench writes
    tens of GB, and runs left behind fill a GPU node's disk."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def apart_arguments(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """The hidden options `run_apart` passes a contender's process: --run NAME, --result FILE, and --work DIR (the
    files the parent prepared)."""
    parser.add_argument("--run", choices=list(names), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)


def run_apart(script: str, name: str, args: list[str], timeout: float) -> dict[str, Any] | None:
    """Run `python SCRIPT --run NAME --result FILE ARGS`, its output passed through as it comes (a slow contender
    shows where it is), and return the JSON it wrote to FILE, or None when it failed or ran past `timeout` s."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        command = [sys.executable, script, "--run", name, f"--result={result_file}", *args]
        sys.stdout.flush()
        try:
            returncode = subprocess.run(command, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            print(f"{name}: no result within {timeout:.0f} s", flush=True)
            return None
        if returncode != 0 or not result_file.exists():
            print(f"{name} failed (exit {returncode})", flush=True)
            return None
        return json.loads(result_file.read_text())


def report(result: dict[str, Any], path: Path) -> None:
    """What a contender's process leaves for `run_apart`."""
    path.write_text(json.dumps(result))
