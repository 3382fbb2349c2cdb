"""Whether the Hugging Face hub can be reached: decided once, quickly, instead of a minute of retries."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes"):
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            return True
        except OSError:
            pass
    # Tell huggingface_hub, and so transformers and peft, for the rest of the process (it reads the variable only
    # when imported): some lookups ignore local_files_only (transformers' for an adapter_config.json beside a
    # model) and would retry each file for about 25 s.
    constants.HF_HUB_OFFLINE = True
    return False


def local_only(name: str) -> bool:
    """Whether `from_pretrained(name)` must stay in the local hub cache: `name` is no local directory and the
    hub cannot be reached (transformers would otherwise retry the connection for about a minute)."""
    return not os.path.isdir(name) and not hub_reachable()


def looks_local(name: str) -> bool:
    """A name that can only be a local path: a hub id is `name` or `org/name`."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "") \
        or name.endswith("/")
