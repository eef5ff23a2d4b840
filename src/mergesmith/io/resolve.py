"""Turn a model reference (local folder, or hub id `org/name@revision`) into a local folder."""

from __future__ import annotations

import os
from textwrap import shorten
from pathlib import Path

from mergesmith.errors import ModelNotFoundError

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def resolve_model(ref: str) -> Path:
    """A local folder as is; otherwise a hub snapshot (from the local cache when offline)."""
    local = Path(ref).expanduser()
    path, revision = ref, None
    if not local.exists() and "@" in ref:
        path, revision = ref.rsplit("@", 1)
    if local.is_dir():
        return local
    if local.exists():
        raise ModelNotFoundError(f"model {path!r} is a file; expected a model folder")
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local:
        raise ModelNotFoundError(
            f"model {path!r} not found: no such folder",
            hint="give a model folder, or a hub id like org/name or org/name@revision",
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id=path,
                revision=revision,
                allow_patterns=WEIGHT_PATTERNS,
                local_files_only=offline,
            )
        )
    except Exception as exc:  # huggingface_hub raises many types; all mean "not available"
        where = "in the local hub cache (HF_HUB_OFFLINE is set)" if offline else "on the hub"
        raise ModelNotFoundError(
            f"model {path}{'@' + revision if revision else ''} not found {where}: "
            f"{type(exc).__name__}: {shorten(str(exc).splitlines()[0] if str(exc) else '', 240)}",
            hint="check the id and revision, or download it first with `hf download`",
        ) from None
