"""Reaching the Hugging Face Hub: when it cannot be reached, fail in a second instead of retrying for a minute.

Before a name that is not a local path is loaded, one TCP connection to the Hub (or `HF_ENDPOINT`) is tried. If it
fails, the Hugging Face libraries are switched to offline mode for this process: a model or dataset already in the
local cache still loads, and anything else fails at once with llmkit's one-line message.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from llmkit.errors import UserError

_reachable: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    global _reachable
    if _reachable is None:
        url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
            _reachable = True
        except OSError:
            _reachable = False
    return _reachable


def prepare_hub_access(name: str | Path) -> None:
    """Call before loading `name`: a local path, offline mode already on, or a reachable Hub changes nothing."""
    if Path(name).exists() or os.environ.get("HF_HUB_OFFLINE") == "1" or hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:  # already imported: its flag was read at import time
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def check_push(repo: str) -> None:
    """Before any work: the repository name, a reachable Hub and a token, or one line saying what is missing.

    The token is huggingface_hub's own (HF_TOKEN, or `hf auth login`): never an argument, which shell histories
    and process lists would show, and never printed or written to a report.
    """
    if not REPO_ID.match(repo):
        raise UserError(f"--push-to-hub {repo}: give a repository as OWNER/NAME (letters, digits, '-', '_', '.')")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise UserError(
            f"--push-to-hub {repo}: the Hugging Face Hub ({endpoint}) cannot be reached (or HF_HUB_OFFLINE=1); "
            "export without it now and upload later with `hf upload`"
        )
    from huggingface_hub import get_token

    if not get_token():
        raise UserError(f"--push-to-hub {repo}: no Hugging Face token; set HF_TOKEN or run `hf auth login`")


def push_folder(folder: Path, repo: str, private: bool) -> str:
    """Upload an export (weights, tokenizer, model card) to a model repository, created private unless asked."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo, folder_path=folder, commit_message=f"llmkit export ({folder.name})", repo_type="model"
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no response"
        raise UserError(
            f"--push-to-hub {repo}: the Hub refused the upload (HTTP {status}); check the token's write access "
            f"to {repo}; the export is complete in {folder}, upload it with `hf upload {repo} {folder}`"
        ) from None
    return str(commit.commit_url)
