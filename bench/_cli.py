"""The compression benches' one way to run llmkit: its CLI in a subprocess, as a user would; the wall time back."""

from __future__ import annotations

import subprocess
import sys
import time


def llmkit(*args: str) -> float:
    """Run `llmkit ARGS`; exit with its error output when it fails; return the seconds it took."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"llmkit {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start
