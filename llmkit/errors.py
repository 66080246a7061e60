"""User errors: one typed exception that the CLI turns into one line and exit code 2.

Anything that is not a `UserError` is a bug in llmkit and surfaces with its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

USER_ERROR_EXIT = 2
GATE_FAILED_EXIT = 1


class UserError(Exception):
    """Bad input from the user: a path, a file's content, a config key or an option."""


def closest(word: str, options: Iterable[str]) -> str | None:
    """The closest valid spelling of `word`, if one is close enough to suggest."""
    matches = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix, or '' when nothing is close."""
    match = closest(word, options)
    return f" (did you mean '{match}'?)" if match else ""
