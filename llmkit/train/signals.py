"""Stopping a training command by signal, whenever the signal arrives.

SIGTERM (Slurm's preemption, `kill`), SIGUSR1 (a scheduler's warning) and SIGINT (Ctrl-C) all mean "stop and keep
what can be kept", and every such stop ends in exit code 75, so a requeue script continues the run:

* during start-up (before the first step), the command stops at once: nothing was trained, nothing is lost;
* during training, the current step finishes, a checkpoint is saved, then the command exits;
* during shutdown (after the loop), a further signal changes nothing: the shutdown completes.

A second Ctrl-C during training stops at once (exit 130) with a line naming the newest checkpoint kept.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmkit.errors import PREEMPTED_EXIT

INTERRUPTED_EXIT = 130  # a second Ctrl-C: stopped at once, the newest checkpoint is what is kept
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stopped(BaseException):  # noqa: N818 (like KeyboardInterrupt: no `except Exception` may swallow it)
    """A stop by signal outside the training steps: one line on stderr and `exit_code`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """What signals asked for, and the phase of the command they arrive in."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.phase = "starting"  # then "training", then "stopping"
        self.run_dir: Path | None = None  # set by fit, for the line a hard stop prints
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.phase == "starting":
            self.reason = name
            raise Stopped(
                f"stopped by {name} during start-up, before the first step: nothing to save; "
                "start again with --resume auto",
                PREEMPTED_EXIT,
            )
        if self.phase == "training" and self.reason is not None and signum == signal.SIGINT:
            raise Stopped(f"stopped at once by a second {name}; kept: {self._kept()}", INTERRUPTED_EXIT)
        if self.reason is None and self.phase == "training":
            self.reason = name
            again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            print(f"{name} received: finishing this step, then saving a checkpoint{again}", file=sys.stderr, flush=True)
        else:
            print(f"{name} received: already stopping", file=sys.stderr, flush=True)

    def _kept(self) -> str:
        from llmkit.train.checkpoint import complete_checkpoints

        found = complete_checkpoints(self.run_dir / "checkpoints") if self.run_dir else []
        return f"{found[-1]} (continue with --resume auto)" if found else "no checkpoint of this run yet"


_active: list[StopSignals] = []


@contextmanager
def stop_signals(until_exit: bool = False) -> Iterator[StopSignals]:
    """Handle the stop signals for the duration; nested uses share the outermost handler (the CLI installs one
    for the whole command, `fit` for callers from Python).

    `until_exit` (the CLI) keeps the handler after the block, in the "stopping" phase, so a signal during the
    interpreter's own shutdown cannot turn the exit code into 143."""
    if _active:
        yield _active[0]
        return
    state = StopSignals()
    installed = threading.current_thread() is threading.main_thread()
    if installed:
        for sig in SIGNALS:
            state._previous[sig] = signal.signal(sig, state._handle)
    _active.append(state)
    try:
        yield state
    finally:
        state.phase = "stopping"
        _active.remove(state)
        if not until_exit:
            for sig, handler in state._previous.items():
                signal.signal(sig, handler)
