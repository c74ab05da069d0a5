"""torch.distributed for ptqbench: one process (``ptqbench run``) or ranks launched by ``torchrun``.

:func:`init` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and joins the process group: NCCL when the run is on CUDA (each
rank on GPU ``LOCAL_RANK``), gloo on the CPU. Without those variables (or ``WORLD_SIZE=1``) every
helper here is a no-op that returns what one process would, so the rest of ptqbench calls the
same functions either way. Every helper is collective: all ranks call it, in the same order.

Work is split so that results do not depend on the number of ranks: :func:`batch_share` hands
out whole batches (a batch is generated the same way whichever rank runs it), :func:`assign`
spreads weighted work items (longest-processing-time first), and reductions are exact or made
in a fixed rank order (:func:`all_gather_object` returns the ranks' values in rank order).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import pickle
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as td

from ptqbench.errors import UserError

T = TypeVar("T")
TIMEOUT_ENV = "PTQBENCH_DIST_TIMEOUT"  # seconds a rank waits at a collective (metrics, MLflow on rank 0)
DEFAULT_TIMEOUT = 4 * 3600


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its host."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_WORLD = World()


def resolve_device(name: str | None) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (valid: cpu)")
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def launched() -> bool:
    """True when torchrun (or an equivalent launcher) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "cpu") -> World:
    """Join the process group torchrun set up (idempotent); one process: :class:`World` ``(0, 1)``.

    ``device`` is where the run computes: ``cuda`` selects NCCL and GPU ``LOCAL_RANK``.
    """
    global _WORLD
    if _WORLD.size > 1 or not launched():
        return _WORLD
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
    if not td.is_initialized():
        kwargs: dict[str, Any] = {"device_id": torch.device("cuda", local)} if cuda else {}
        td.init_process_group(backend, timeout=timeout, **kwargs)
    _WORLD = World(td.get_rank(), td.get_world_size(), local, backend)
    return _WORLD


def shutdown() -> None:
    """Leave the process group (after a last barrier); back to one process."""
    global _WORLD
    if _WORLD.size > 1 and td.is_initialized():
        td.barrier()
        td.destroy_process_group()
    _WORLD = World()


def world() -> World:
    return _WORLD


def rank() -> int:
    return _WORLD.rank


def size() -> int:
    return _WORLD.size


def is_main() -> bool:
    return _WORLD.is_main


def held_by_main(enter: Callable[[], AbstractContextManager[Any]]) -> AbstractContextManager[Any]:
    """``enter()`` on rank 0 only, a no-op context elsewhere: for a cache entry's file lock, which
    rank 0 takes for the whole job (the other ranks follow its decisions through collectives, so a
    rank that waited on the lock while rank 0 waits in a collective would deadlock the job)."""
    return enter() if is_main() else contextlib.nullcontext()


def barrier() -> None:
    if _WORLD.size > 1:
        td.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (pickled; keep tensors in it on the CPU)."""
    if _WORLD.size == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (pickled; keep tensors in it on the CPU)."""
    if _WORLD.size == 1:
        return [obj]
    out: list[Any] = [None] * _WORLD.size
    td.all_gather_object(out, obj)
    return out


def _comm(t: torch.Tensor) -> torch.Tensor:
    """``t`` where the backend reduces (NCCL: this rank's GPU), contiguous."""
    if _WORLD.backend == "nccl":
        return t.to(torch.device("cuda", _WORLD.local_rank)).contiguous()
    return t.cpu().contiguous()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks (exact in any order), on every rank, where ``t`` is."""
    if _WORLD.size == 1:
        return t
    out = _comm(t).clone()
    td.all_reduce(out, op=td.ReduceOp.MAX)
    return out.to(t.device)


def sum_in_rank_order(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, added in rank order (the same bits on every rank, every run), where ``t`` is."""
    if _WORLD.size == 1:
        return t
    local = _comm(t)
    parts = [torch.empty_like(local) for _ in range(_WORLD.size)]
    td.all_gather(parts, local)
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total.to(t.device)


def batch_share(n: int, batch_size: int, rank_: int | None = None, size_: int | None = None) -> list[int]:
    """Indices ``0..n-1`` of this rank: whole batches (``batch_size`` consecutive indices), batch
    ``b`` to rank ``b % size``. Every batch holds the same indices for any number of ranks."""
    r = _WORLD.rank if rank_ is None else rank_
    s = _WORLD.size if size_ is None else size_
    starts = range(0, n, max(1, batch_size))
    return [i for b, start in enumerate(starts) if b % s == r for i in range(start, min(start + batch_size, n))]


def assign(costs: Sequence[float], size_: int | None = None) -> list[int]:
    """A rank for each item, balancing the summed cost: longest-processing-time first (items by
    decreasing cost, ties by index, each to the least-loaded rank, ties to the lowest rank)."""
    s = _WORLD.size if size_ is None else size_
    load = [0.0] * s
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(s), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def to_bytes(obj: Any) -> bytes:
    """``torch.save`` of ``obj`` (modules, tensors) into bytes, for :func:`from_bytes` on any rank."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes, device: torch.device | str) -> Any:
    """What :func:`to_bytes` saved, every tensor on ``device``."""
    return torch.load(io.BytesIO(data), map_location=device, weights_only=False)


def share_modules(local: Mapping[str, torch.nn.Module], device: torch.device | str) -> dict[str, torch.nn.Module]:
    """Every rank's ``local`` modules (disjoint names) on every rank, the others' loaded onto ``device``."""
    if _WORLD.size == 1:
        return dict(local)
    out: dict[str, torch.nn.Module] = {}
    for r, data in enumerate(all_gather_object(to_bytes(dict(local)))):
        out.update(local if r == _WORLD.rank else from_bytes(data, device))
    return out


_SOLO = [False]  # rank 0 inside on_main: MainOnly calls go straight to the object


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on rank 0 only; every rank returns its result, or raises its
    exception (so all ranks take the same path). Collective; one process: a plain call."""
    if _WORLD.size == 1 or _SOLO[0]:
        return fn(*args, **kwargs)
    outcome: tuple[str, Any] = ("ok", None)
    if _WORLD.is_main:
        _SOLO[0] = True
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except BaseException as exc:
            outcome = ("error", exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}"))
        finally:
            _SOLO[0] = False
    kind, value = broadcast_object(outcome)
    if kind == "error":
        with contextlib.suppress(AttributeError):  # an exception type without a __dict__
            value.ptqbench_every_rank = True  # every rank raises it here (see raised_on_every_rank)
        raise value
    return value


def raised_on_every_rank(exc: BaseException) -> bool:
    """Whether ``exc`` was raised on every rank at the same point (by :func:`on_main`), so that the
    ranks may go on together; any other exception may have left the others inside a collective."""
    return _WORLD.size == 1 or bool(getattr(exc, "ptqbench_every_rank", False))


def abandon(message: str, traceback_text: str) -> NoReturn:
    """Stop this process at once after an exception the other ranks did not share: they may be
    waiting in a collective this rank will never join, and any collective it called next (a
    tracker call, the shutdown barrier) would pair with theirs. Exits with status 1 without
    touching the process group; torchrun then stops the other ranks."""
    print(
        f"{traceback_text}ptqbench: rank {_WORLD.rank} of {_WORLD.size}: {message}\n"
        f"ptqbench: rank {_WORLD.rank}: stopping the job (the other ranks may be waiting in a collective); "
        "rerun to resume: finished cells, verified images and cached layers are kept, --only skips cells",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(1)


def _picklable(obj: object) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:
        return False
    return True


class MainOnly:
    """An object that lives on rank 0 (a tracker: only rank 0 talks to MLflow), reached from every
    rank: each method call runs on rank 0 and returns its result on every rank (:func:`on_main`),
    attributes are rank 0's values. Inside :func:`on_main`, rank 0 calls the object directly."""

    def __init__(self, obj: Any):
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        if _WORLD.size == 1 or _SOLO[0]:
            return getattr(self._obj, name)
        value = on_main(lambda: _Method if callable(getattr(self._obj, name)) else getattr(self._obj, name))
        if value is not _Method:
            return value
        return lambda *args, **kwargs: on_main(lambda: getattr(self._obj, name)(*args, **kwargs))


class _Method:
    """Marker: the attribute is a method (called through :func:`on_main`)."""


def main_only(factory: Callable[[], Any]) -> MainOnly:
    """``factory()`` built on rank 0 only (its errors raised on every rank), as a :class:`MainOnly`."""
    box: list[Any] = [None]

    def make() -> None:
        box[0] = factory()

    on_main(make)
    return MainOnly(box[0])
