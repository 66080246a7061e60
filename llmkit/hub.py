"""Reaching the Hugging Face Hub: when it cannot be reached, fail in a second instead of retrying for a minute.

Before a name that is not a local path is loaded, one TCP connection to the Hub (or `HF_ENDPOINT`) is tried. If it
fails, the Hugging Face libraries are switched to offline mode for this process: a model or dataset already in the
local cache still loads, and anything else fails at once with llmkit's one-line message.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

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
