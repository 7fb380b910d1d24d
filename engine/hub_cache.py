"""Models named by Hugging Face Hub id (`Qwen/Qwen3-0.6B`), found in the local Hugging Face cache.

Serving never downloads: a worker that fetched gigabytes at start would stall a deployment for
minutes, and serving machines often have no route to the Hub. So a Hub id resolves only to a
snapshot already in the cache (`HF_HUB_CACHE`, default `~/.cache/huggingface/hub`), through
`snapshot_download(local_files_only=True)`, which reads the cache's refs and never opens a
connection; when it is not there, the error says how to fetch it beforehand.
"""

from __future__ import annotations

import re
from pathlib import Path

# owner/name as the Hub spells them; a path such as ./models/x or /data/x never matches.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name: str) -> bool:
    return _HUB_ID.fullmatch(name) is not None and not Path(name).exists()


def resolve_model_dir(name: str) -> Path:
    """The local directory of `name`: itself when it is a directory, else the cached snapshot of
    the Hub id `name`. Raises ValueError naming what to do when neither exists."""
    path = Path(name)
    if path.is_dir():
        return path
    if not is_hub_id(name):
        raise ValueError(f"model {name!r} is neither a directory, a Hugging Face Hub id "
                         "(owner/name) nor a random:<preset> spec")
    return _cached_snapshot(name)


def _cached_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ValueError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({HF_HUB_CACHE}) and "
            f"tandem does not download at serve time: fetch it first with `hf download "
            f"{repo_id}` (`huggingface-cli download {repo_id}` with older huggingface_hub), or "
            "pass --model as a local directory") from None
