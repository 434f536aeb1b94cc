"""Is the Hugging Face hub reachable? Answered fast and never hanging."""

from __future__ import annotations

import functools
import os
import socket

_TRUE = {"1", "true", "yes", "on"}


def offline_forced() -> bool:
    """True when the user or the environment declared the hub off-limits."""
    return any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint, at most ``timeout`` seconds; cached for the process.

    Returns False at once when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE is set.
    """
    if offline_forced():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = host.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False
