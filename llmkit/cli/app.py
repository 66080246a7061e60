"""The `llmkit` program: the Typer app, the one-line handling of user errors, and `main`.

Heavy libraries (torch, transformers) are imported inside commands, so `llmkit --help` stays fast.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from llmkit.errors import UserError, shorten

app = typer.Typer(
    name="llmkit",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # click's help: option names print whole at any width (rich's panels cut them)
)
config_app = typer.Typer(help="Inspect recipes and configuration.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(config_app, name="config")
recipes_app = typer.Typer(rich_markup_mode=None)
app.add_typer(recipes_app, name="recipes")

F = TypeVar("F", bound=Callable[..., Any])


def _print_version(asked: bool) -> None:
    if asked:
        from llmkit import __version__

        print(f"llmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """From your own raw text to a trained, evaluated and exported language model.

    Shell completion: `llmkit --install-completion` (bash, zsh, fish, PowerShell).
    """


def user_errors_exit_2(fn: F) -> F:
    """Turn a UserError, or a disk that is full, read-only or not ours to write, into one line on stderr and exit
    code 2, and a stop by signal into its line and code (75, or 130); let every other exception surface."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from llmkit.train.signals import Stopped

        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            _exit(f"error: {shorten(' '.join(str(exc).split()), 1000)}", exc.exit_code)
        except OSError as exc:
            message = environment_error(exc)
            if message is None:
                raise
            _exit(f"error: {message}", 2)
        except Stopped as exc:
            _exit(str(exc), exc.exit_code)

    return wrapper  # type: ignore[return-value]


def _exit(line: str, code: int) -> None:
    from llmkit.train.launch import record_exit

    print(line, file=sys.stderr, flush=True)
    record_exit(code)
    raise typer.Exit(code) from None


def environment_error(exc: OSError) -> str | None:
    """One line for an OSError the user fixes on their machine (full disk, read-only or forbidden path); None for
    any other, which is a bug. Outputs are written in staging directories, so nothing half-written stays."""
    import errno

    where = exc.filename or "output"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: no space left on device; free space and run again (nothing half-written was kept)"
    if exc.errno == errno.EROFS:
        return f"{where}: read-only file system; choose a writable --out"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; choose a path you can write (or read), or fix its permissions"
    return None


def _quiet_libraries() -> None:
    """Keep library chatter (download bars, accelerator probing) out of llmkit's output, unless set; a library's
    warning prints once, whole, on one line."""
    from llmkit.console import show_warning

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # torch.distributed's renamed collectives, called by DeepSpeed: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.showwarning = show_warning
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import logging as stdlib_logging

    # torchao's optional CUDA extensions, absent on a CPU build: it says so at import, and it works without them.
    stdlib_logging.getLogger("torchao").setLevel(stdlib_logging.ERROR)
    # bitsandbytes, on a CPU with AVX512-BF16, fetches a faster kernel from the Hub at import (through `kernels`);
    # offline it logs twice and runs its own kernel: nothing a user can act on.
    for name in ("kernels", "bitsandbytes.backends.cpu.ops"):
        stdlib_logging.getLogger(name).setLevel(stdlib_logging.CRITICAL)
    stdlib_logging.getLogger("torch.utils._pytree").setLevel(
        stdlib_logging.ERROR
    )  # torchao registers enums torch now knows
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        from transformers.utils import logging

        logging.disable_progress_bar()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class _Process:
    """What the command line knows about the process it runs in."""

    whole = False  # llmkit is the process (the `llmkit` script, `python -m llmkit`), not a library called in-process
    # A training command has done its work (outputs closed and renamed into place): exit without the interpreter's
    # finalization, which resets signal handlers to the default and can take a second or more (library threads), so
    # a scheduler's second SIGTERM in that window would turn exit code 75 into 143.
    exit_at_once = False


PROCESS = _Process()


def main() -> None:
    PROCESS.whole = True
    try:
        app()
    except SystemExit as exc:
        if not PROCESS.exit_at_once:
            raise
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
