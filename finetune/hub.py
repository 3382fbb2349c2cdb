"""Whether the Hugging Face hub can be reached: decided once, quickly, instead of a minute of retries."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def local_only(name: str) -> bool:
    """Whether `from_pretrained(name)` must stay in the local hub cache: `name` is no local directory and the
    hub cannot be reached (transformers would otherwise retry the connection for about a minute)."""
    return not os.path.isdir(name) and not hub_reachable()
