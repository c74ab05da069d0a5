"""One cache-key function and an on-disk cache for expensive stages.

Keys are SHA-256 digests of the canonical JSON of everything that changes a result (model,
prompts, settings, seeds, layer plan, method config...). The cache root is ``--cache-dir``,
else ``$PTQBENCH_CACHE``, else ``~/.cache/ptqbench``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any


def _canonical(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {type(obj).__name__: _canonical(asdict(obj))}
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def cache_key(*parts: Any, length: int = 16) -> str:
    """Stable hex digest of ``parts`` (dataclasses, dicts, lists, scalars), same on every machine."""
    blob = json.dumps(_canonical(list(parts)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def default_cache_dir() -> Path:
    return Path(os.environ.get("PTQBENCH_CACHE", Path.home() / ".cache" / "ptqbench"))


class Cache:
    """Folders under ``root`` named ``kind/key``; ``done`` marks a complete entry."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_cache_dir()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def done(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / ".done").exists()

    def mark_done(self, kind: str, key: str) -> None:
        p = self.path(kind, key)
        p.mkdir(parents=True, exist_ok=True)
        (p / ".done").touch()
