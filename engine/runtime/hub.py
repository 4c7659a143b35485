"""Whether this job can reach the Hugging Face hub, decided once, before anything asks it.

Compute nodes are often offline, and every hub name a job plans with then costs 30-40 s of the hub
client's retries before it falls back to the local cache (eight recipes' configs: 3 min 41 s, against
10 s offline). So the answer is settled at start: ``HF_HUB_OFFLINE`` when the user set it, else one
connection attempt to the hub's endpoint with a short timeout. An unreachable hub switches the hub
client to offline mode for the whole process (and, through the environment, its children); after the
process group is up, :func:`agree` makes every rank take the same answer, offline if any rank is.
A file a job needs that is not in the local cache then fails at once with :func:`not_cached`'s message.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Optional
from urllib.parse import urlparse

import torch.distributed as dist

from ..config import is_local, model_location

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)  # any one of them is a model's weights
PROBE_TIMEOUT = 2.0  # seconds; DNS included (a resolver can hang longer than a connect)
_decision: dict = {}  # {"online": bool, "why": str} once decided


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "on", "yes", "true")


def decide(timeout: float = PROBE_TIMEOUT) -> bool:
    """True when the hub is reachable. Decided once per process; sets offline mode when it is not."""
    if _decision:
        return _decision["online"]
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name):
            online = not _truthy(os.environ[name])
            return _settle(online, f"{name}={os.environ[name]}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    reached: list[Optional[str]] = [f"no answer from {host}:{port} within {timeout:g} s"]

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            reached[0] = None
        except OSError as e:
            reached[0] = f"{host}:{port} unreachable ({e.strerror or e})"

    # A thread, so that a hanging DNS lookup costs the timeout too, not the resolver's own.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    online = reached[0] is None and not thread.is_alive()
    return _settle(online, "the hub answered" if online else reached[0])


def location(path: str) -> str:
    """Where a loader finds ``path`` (config.model_location), deciding first, once per process, whether the hub
    can be reached when ``path`` is a hub name. The command lines decide at start; this makes the library path
    (a notebook planning recipes with load_recipe and students.student_config) as fast on an offline node,
    instead of paying the hub client's retries for every name."""
    if not is_local(path):
        decide()
    return model_location(path)


def _settle(online: bool, why: str) -> bool:
    _decision.update(online=online, why=why)
    if not online:
        set_offline()
    return online


def set_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"  # children (converters, workers) inherit it
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True  # read at each request; the environment only at import


def agree() -> bool:
    """Every rank takes the same answer (offline if any rank found the hub unreachable); collective."""
    online = decide()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        answers = [None] * dist.get_world_size()
        dist.all_gather_object(answers, online)
        if not all(answers):
            if online:
                _decision.update(
                    online=False, why=f"rank(s) {[i for i, a in enumerate(answers) if not a]} cannot reach it"
                )
                set_offline()
            online = False
    return online


def not_cached(name: str, what: str = "model") -> str:
    """The message for a hub name whose files this offline node does not have."""
    import huggingface_hub.constants

    why = _decision.get("why", "HF_HUB_OFFLINE")
    return (
        f"{what} {name!r} is not in the local Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) and the "
        f"hub is not reachable from this node ({why}): download it where there is network "
        f"(`hf download {name}`, with HF_HOME on storage every node sees) or give a local directory"
    )


def offline() -> bool:
    """True once this process has decided the hub is unreachable (or was told so)."""
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def load_error(name: str, error: Exception, what: str = "model") -> str:
    """Why ``from_pretrained(name)`` failed: a hub name missing from an offline node's cache, or the error."""
    if offline() and not is_local(name):
        return not_cached(name, what)
    return f"cannot load a {what} from {name!r}: {error}"


def check_cached(name: str, weights: bool) -> Optional[str]:
    """On an offline node, why hub name ``name`` cannot be loaded (its config or weights are not in the
    local cache), or None: a local path, an online node, or files that are there."""
    if not offline() or is_local(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(name, filename), str)

    if not cached("config.json") or (weights and not any(cached(f) for f in WEIGHT_FILES)):
        return not_cached(name)
    return None
