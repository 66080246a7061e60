"""Fault injection for the resume tests: kill this process with SIGKILL (or poison a loss) at an exact point.

Set ``LLMKIT_FAULT_INJECT`` to one of:

* ``kill@STEP.MICRO``  after micro-batch MICRO (0-based) of optimizer step STEP (1-based) has run backward;
* ``kill-in-save@STEP`` while the checkpoint of STEP is half written (model saved, nothing else);
* ``term@startup``      send SIGTERM to this process during start-up, once it owns its run directory (no step yet);
* ``term@loading``      send SIGTERM before the training code (and torch) is imported;
* ``nan@STEP``          make the loss of optimizer step STEP not a number (a diverging step, exactly where wanted).

It is read once at import, is meant for tests and for users who want to check their own recovery, and
does nothing when unset. SIGKILL cannot be caught: this is a real crash, not a simulated one.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("LLMKIT_FAULT_INJECT", "")


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def poisoned(step: int) -> bool:
    """Whether optimizer step `step` (1-based) is to have a non-finite loss (``nan@STEP``)."""
    kind, _, where = _SPEC.partition("@")
    return kind == "nan" and where == str(step)


def maybe_kill(point: str, step: int, micro: int = 0) -> None:
    if not _SPEC:
        return
    kind, _, where = _SPEC.partition("@")
    if point == "step" and kind == "kill" and where == f"{step}.{micro}":
        _kill()
    if point == "save" and kind == "kill-in-save" and where == str(step):
        _kill()
    if point in ("startup", "loading") and kind == "term" and where == point:
        os.kill(os.getpid(), signal.SIGTERM)
