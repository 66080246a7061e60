"""User errors: one typed exception that the CLI turns into one line and exit code 2.

Anything that is not a `UserError` is a bug in llmkit and surfaces with its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

USER_ERROR_EXIT = 2
GATE_FAILED_EXIT = 1


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by a signal or --max-time after a checkpoint; resume with --resume auto
DIVERGED_EXIT = 3


class UserError(Exception):
    """Bad input from the user: a path, a file's content, a config key or an option."""

    exit_code = USER_ERROR_EXIT


class TrainingDiverged(UserError):
    """A non-finite loss or gradient stopped the run before the optimizer step."""

    exit_code = DIVERGED_EXIT


def shorten(text: str, limit: int = 400) -> str:
    """`text` cut in the middle to at most about `limit` characters: a value a user (or a client) gave is echoed
    in errors and logs, and it may be megabytes long."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} ...[{len(text) - 2 * half:,} characters cut]... {text[-half:]}"


def first_line(exc: BaseException, limit: int = 200, empty: str | None = None) -> str:
    """A library's reason for refusing, for a one-line error: the first line of its message, cut to `limit`
    characters; `empty` (else the exception's type) when it gave none."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else empty or type(exc).__name__


def closest(word: str, options: Iterable[str]) -> str | None:
    """The closest valid spelling of `word`, if one is close enough to suggest."""
    matches = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix, or '' when nothing is close."""
    match = closest(word, options)
    return f" (did you mean '{match}'?)" if match else ""


def parse_duration(text: str, option: str = "--max-time") -> float:
    """Seconds from '3600', '90s', '90m', '2h', '1d' or 'H:MM:SS' (`option` names it in the error)."""
    value = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if ":" in value:
            seconds = 0.0
            for part in value.split(":"):
                seconds = seconds * 60 + float(part)
        elif value and value[-1] in units:
            seconds = float(value[:-1]) * units[value[-1]]
        else:
            seconds = float(value)
    except ValueError:
        raise UserError(f"{option} {text!r}: expected seconds, 90m, 2h, 1d or H:MM:SS") from None
    if not 0 < seconds < float("inf"):  # also nan: '--since -5m' read every request, '--max-time inf' no limit
        raise UserError(f"{option} {text!r}: give a time above 0, e.g. 90m")
    return seconds
