"""Is the Hugging Face hub reachable? Answered within a few seconds, never hanging."""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


def offline_forced() -> bool:
    """True when the user or the environment declared the hub off-limits."""
    return any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint (``HF_ENDPOINT`` or huggingface.co) answers a TCP connect within ``timeout`` s.

    Returns False at once when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE is set. The connect
    runs in a daemon thread joined with the timeout, because DNS resolution ignores socket timeouts and could
    otherwise hang a run on a machine with a broken resolver.
    """
    if offline_forced():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
