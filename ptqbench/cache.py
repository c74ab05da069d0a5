"""One cache-key function and an on-disk cache for expensive stages.

Keys are SHA-256 digests of the canonical JSON of everything that changes a result (model,
prompts, settings, seeds, layer plan, method config...). The cache root is ``--cache-dir``,
else ``$PTQBENCH_CACHE``, else ``~/.cache/ptqbench``.

Several processes (other GPUs, other machines on a shared file system) may share one cache: an
entry is computed under :meth:`Cache.lock` (``fcntl.flock`` on ``kind/key.lock`` beside it), so it
is computed once and a second process waits, then reads the finished entry::

    with cache.lock(kind, key):
        if not cache.done(kind, key):
            ...compute into cache.path(kind, key)...
            cache.mark_done(kind, key)

The kernel drops a flock when its process dies, so a crash never leaves a stale lock; the wait is
bounded by ``lock_timeout`` (``$PTQBENCH_LOCK_TIMEOUT`` seconds, default 24 h) against a hung
holder. Each ``mark_done`` appends ``host pid time`` to the entry's ``.done`` file (who computed it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from ptqbench.errors import UserError

DEFAULT_LOCK_TIMEOUT = 24 * 3600.0
POLL = 0.2  # seconds between attempts to take a held lock
_HELD: dict[tuple[Path, int], int] = {}  # (lock file, thread) held here, with its depth: re-entrant per thread


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


def lock_timeout_from_env() -> float:
    text = os.environ.get("PTQBENCH_LOCK_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_LOCK_TIMEOUT
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"$PTQBENCH_LOCK_TIMEOUT={text!r}: expected a number of seconds > 0")
    return value


class Cache:
    """Folders under ``root`` named ``kind/key``; ``done`` marks a complete entry, ``lock`` guards its computation."""

    def __init__(self, root: str | Path | None = None, lock_timeout: float | None = None):
        self.root = Path(root) if root else default_cache_dir()
        self.lock_timeout = lock_timeout if lock_timeout is not None else lock_timeout_from_env()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def done(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / ".done").exists()

    def mark_done(self, kind: str, key: str) -> None:
        p = self.path(kind, key)
        p.mkdir(parents=True, exist_ok=True)
        with open(p / ".done", "a", encoding="utf-8") as f:
            f.write(f"{_me()} {time.time():.3f}\n")

    def lock_path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.lock"

    @contextmanager
    def lock(self, kind: str, key: str) -> Iterator[Path]:
        """Hold the entry's exclusive lock (waiting for another process up to ``lock_timeout``
        seconds, then UserError); yields the entry's folder. Re-entrant within a thread."""
        path = self.lock_path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        held = (path, threading.get_ident())
        if held in _HELD:
            _HELD[held] += 1
            try:
                yield self.path(kind, key)
            finally:
                _HELD[held] -= 1
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._acquire(fd, path, f"{kind}/{key}")
            os.ftruncate(fd, 0)
            os.write(fd, f"{_me()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            _HELD[held] = 1
            try:
                yield self.path(kind, key)
            finally:
                del _HELD[held]
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _acquire(self, fd: int, path: Path, entry: str) -> None:
        start = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            holder = _holder(path)
            if time.monotonic() - start > self.lock_timeout:
                raise UserError(
                    f"cache entry {entry}: gave up after {self.lock_timeout:.0f} s waiting for its lock {path} "
                    f"(held by {holder}); another ptqbench process is computing it: let it finish, or stop "
                    "it if it hangs, or raise $PTQBENCH_LOCK_TIMEOUT"
                )
            if not told:
                print(f"cache entry {entry}: waiting for {holder}, which is computing it", file=sys.stderr)
                told = True
            time.sleep(POLL)


def _me() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return f"process {text}" if text else "another process"
