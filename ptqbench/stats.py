"""Calibration statistics of layer inputs, collected by forward hooks on any torch model.

A method declares what it needs (:class:`StatsSpec`); :class:`StatsCollector` hooks the
selected layers, accumulates per-channel abs-max, a bounded uniform sample of input rows
(bottom-k reservoir with a seeded generator) or every row (``rows=-1``, :data:`ALL_ROWS`),
optionally a held-out sample disjoint from the reservoir sample, and optionally ``X^T X`` (full or
diagonal), and returns one :class:`LayerStats` per layer. With a sample, memory is bounded by
``rows + heldout`` x ``in_features`` (+ ``in_features^2`` for a full ``X^T X``) per layer, whatever
the number of forwards; all rows cost 4 bytes per row and input channel (kept on the CPU; methods
stream them to the device in chunks), and leave no rows to hold out. With ``minmax`` (on by
default) it also keeps the per-channel max and min (and the column sums when it keeps ``X^T X``),
from which :meth:`LayerStats.shifted` derives the statistics of ``x + c`` exactly, so that one
calibration serves shifted and unshifted layers alike.

The statistics do not depend on how the forwards are split across processes: each input row has
a position (batch, the layer's call within the batch, row) and a sampling key drawn from a
generator seeded by (seed, layer, batch, call), so the sample is the ``rows`` smallest keys of
all rows (ties by position), kept in position order, however the batches were spread.
``X^T X`` is accumulated in float64 (rounded to float32 at the end). :meth:`StatsCollector.partial`
is one process's share; :func:`merge_partials` combines shares exactly (max, sums in share
order, the keyed sample), and is what :meth:`StatsCollector.result` does with the ranks' shares.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from ptqbench.errors import UserError

XtX = Literal["none", "diag", "full"]
ALL_ROWS = -1  # StatsSpec.rows: keep every input row
SAMPLER = "keyed-v1"  # the row-sampling rule (in calibration cache keys)
_ROW_BITS, _CALL_BITS = 24, 16  # a row's position: batch << 40 | call << 24 | row


def merge_rows(a: int, b: int) -> int:
    """The larger of two row requests (:data:`ALL_ROWS` is larger than any sample)."""
    return ALL_ROWS if ALL_ROWS in (a, b) else max(a, b)


@dataclass(frozen=True)
class StatsSpec:
    """What a method needs: per-channel abs-max, ``rows`` sampled input rows (-1: all), ``X^T X``;
    and ``heldout`` rows for measuring a quantized layer on inputs its method never saw.

    The held-out rows are the ``heldout`` rows ranked next after the ``rows`` sample by the same
    random keys: a uniform sample of the rows outside it, so disjoint from it, and the ``rows``
    sample is the same with or without them (none with all rows). ``minmax``: per-channel max /
    min and column sums besides, for :meth:`LayerStats.shifted` (a field, so calibration cache keys
    of entries collected without them differ).
    """

    absmax: bool = False
    rows: int = 0
    xtx: XtX = "none"
    heldout: int = 0
    minmax: bool = True

    def __or__(self, other: StatsSpec) -> StatsSpec:
        order = ("none", "diag", "full")
        return StatsSpec(
            self.absmax or other.absmax,
            merge_rows(self.rows, other.rows),
            order[max(order.index(self.xtx), order.index(other.xtx))],
            max(self.heldout, other.heldout),
            self.minmax or other.minmax,
        )

    @property
    def empty(self) -> bool:
        """Nothing to collect (``minmax`` alone asks for no calibration)."""
        return not self.absmax and self.rows == 0 and self.xtx == "none" and self.heldout == 0


@dataclass
class LayerStats:
    """Statistics of one layer's input ``X`` [tokens, in_features] (float32, on CPU); ``heldout``
    rows are not part of what a method is given (see :class:`StatsSpec`); for :meth:`shifted`, the
    per-channel ``maximum`` / ``minimum`` and ``colsum`` (``X^T 1``)."""

    absmax: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    count: int = 0
    heldout: torch.Tensor | None = None
    maximum: torch.Tensor | None = None
    minimum: torch.Tensor | None = None
    colsum: torch.Tensor | None = None

    TENSORS: ClassVar[tuple[str, ...]] = ("absmax", "rows", "xtx", "heldout", "maximum", "minimum", "colsum")

    def to(self, device: torch.device | str) -> LayerStats:
        moved = {k: None if getattr(self, k) is None else getattr(self, k).to(device) for k in self.TENSORS}
        return LayerStats(count=self.count, **moved)

    def without_heldout(self) -> LayerStats:
        """These statistics as a method gets them (no held-out rows)."""
        kept = {k: getattr(self, k) for k in self.TENSORS if k != "heldout"}
        return LayerStats(count=self.count, **kept)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors for saving (safetensors); ``from_state`` rebuilds."""
        out = {"count": torch.tensor(self.count)}
        for name in self.TENSORS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).contiguous()
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> LayerStats:
        return cls(count=int(state["count"]), **{k: state.get(k) for k in cls.TENSORS})

    # ------------------------------------------------------------------ shifted inputs (H14)
    def shifted(self, c: float) -> LayerStats:
        """The statistics of ``x + c``, derived exactly (in float64, returned in each tensor's
        dtype) from those of ``x``: ``absmax = max(max + c, -(min + c))``, ``max + c``, ``min + c``,
        ``rows + c`` (and held-out rows), ``colsum + c N``, and ``X^T X + c (s 1^T + 1 s^T) + c^2 N 1 1^T`` (diagonal:
        ``+ 2 c s + c^2 N``) with ``s`` the column sums and ``N = count``. Raises :class:`UserError`
        when a statistic to shift was collected without max / min or column sums."""
        if c == 0:
            return self
        if (self.absmax is not None and (self.maximum is None or self.minimum is None)) or (
            self.xtx is not None and self.colsum is None
        ):
            raise UserError(
                "shifted statistics need the per-channel max / min (and column sums with X^T X); these were "
                "collected without them (StatsSpec.minmax=False): recalibrate"
            )
        n = float(self.count)
        out = LayerStats(count=self.count)
        if self.maximum is not None:
            hi, lo = self.maximum.double() + c, self.minimum.double() + c
            out.maximum, out.minimum = hi.to(self.maximum.dtype), lo.to(self.minimum.dtype)
            if self.absmax is not None:
                out.absmax = torch.maximum(hi, -lo).to(self.absmax.dtype)
        for name in ("rows", "heldout"):
            if getattr(self, name) is not None:
                setattr(out, name, (getattr(self, name).double() + c).to(getattr(self, name).dtype))
        if self.colsum is not None:
            s = self.colsum.double()
            out.colsum = (s + c * n).to(self.colsum.dtype)
            if self.xtx is not None:
                g = self.xtx.double()
                if g.dim() == 1:
                    g = g + 2 * c * s + c * c * n
                else:
                    g = g + c * (s[:, None] + s[None, :]) + c * c * n
                out.xtx = g.to(self.xtx.dtype)
        return out


def as_rows(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """Flatten a layer input to [tokens, in_features] (channels last for 1x1 convs)."""
    if conv:
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1])


@dataclass
class Partial:
    """One process's share of a layer's statistics, before :func:`merge_partials`.

    ``xtx`` is float64; ``keys``/``pos``/``rows`` are the sampled rows' keys, positions and values;
    ``parts`` are every row (``rows=-1``) as (batch, tensor) in arrival order.
    """

    absmax: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    count: int = 0
    keys: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    parts: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    maximum: torch.Tensor | None = None
    minimum: torch.Tensor | None = None
    colsum: torch.Tensor | None = None  # float64, like ``xtx``

    def cpu(self) -> Partial:
        move = lambda t: None if t is None else t.cpu()  # noqa: E731
        return Partial(move(self.absmax), move(self.xtx), self.count, move(self.keys), move(self.pos),
                       move(self.rows), self.parts, move(self.maximum), move(self.minimum), move(self.colsum))


def row_keys(seed: int, name: str, batch: int, call: int, n: int) -> torch.Tensor:
    """The sampling keys (int64, CPU) of the ``n`` rows of ``name``'s ``call``-th input in ``batch``."""
    digest = hashlib.blake2b(f"{seed}/{name}/{batch}/{call}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randint(0, 2**62, (n,), generator=g, dtype=torch.int64)


def row_positions(batch: int, call: int, n: int) -> torch.Tensor:
    if n >= 1 << _ROW_BITS or call >= 1 << _CALL_BITS or batch >= 1 << (63 - _ROW_BITS - _CALL_BITS):
        raise ValueError(f"row position out of range: batch {batch}, call {call}, {n} rows")
    return (batch << (_ROW_BITS + _CALL_BITS)) + (call << _ROW_BITS) + torch.arange(n, dtype=torch.int64)


def smallest_keys(keys: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest (key, position) pairs, in position order (positions are unique)."""
    by_pos = torch.argsort(pos, stable=True)
    by_key = by_pos[torch.argsort(keys[by_pos], stable=True)][:k]
    return by_key[torch.argsort(pos[by_key])]


def _keep_smallest(p: Partial, k: int) -> None:
    if p.keys is not None and p.keys.shape[0] > k:
        keep = smallest_keys(p.keys, p.pos, k)
        p.keys, p.pos, p.rows = p.keys[keep], p.pos[keep], p.rows[keep]


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b.to(a.device)])


def _merge_sampled(ps: Sequence[Partial], spec: StatsSpec) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(sample, held-out rows): the ``rows`` smallest keys, then the ``heldout`` next, each in position order."""
    sampled = [p for p in ps if p.keys is not None]
    if not sampled:
        return None, None
    cat = lambda get: torch.cat([get(p).cpu() for p in sampled])  # noqa: E731
    keys, pos, rows = cat(lambda p: p.keys), cat(lambda p: p.pos), cat(lambda p: p.rows)
    by_pos = torch.argsort(pos, stable=True)
    ranked = by_pos[torch.argsort(keys[by_pos], stable=True)][: spec.rows + spec.heldout]
    first, rest = ranked[: spec.rows], ranked[spec.rows :]
    pick = lambda idx: rows[idx[torch.argsort(pos[idx])]]  # noqa: E731
    return (pick(first) if spec.rows else None), (pick(rest) if spec.heldout else None)


def _merge_sums(ps: Sequence[Partial]) -> LayerStats:
    st = LayerStats(count=sum(p.count for p in ps))
    for p in ps:
        if p.absmax is not None:
            st.absmax = p.absmax.clone() if st.absmax is None else torch.maximum(st.absmax, p.absmax.to(st.absmax))
        if p.xtx is not None:
            st.xtx = p.xtx.clone() if st.xtx is None else st.xtx + p.xtx.to(st.xtx)
        if p.maximum is not None:
            hi, lo = p.maximum, p.minimum
            st.maximum = hi.clone() if st.maximum is None else torch.maximum(st.maximum, hi.to(st.maximum))
            st.minimum = lo.clone() if st.minimum is None else torch.minimum(st.minimum, lo.to(st.minimum))
        if p.colsum is not None:
            st.colsum = p.colsum.clone() if st.colsum is None else st.colsum + p.colsum.to(st.colsum)
    if st.xtx is not None:
        st.xtx = st.xtx.float()
    if st.colsum is not None:
        st.colsum = st.colsum.float()
    return st


def merge_partials(
    shares: Sequence[Mapping[str, Partial]], spec: StatsSpec, device: str = "cpu"
) -> dict[str, LayerStats]:
    """Exact combination of shares (one per process, in rank order): abs-max by max, counts and
    ``X^T X`` summed in share order, the ``spec.rows`` smallest-key rows (independent of the split),
    all rows in batch order. Layers whose every part was one shared tensor share the result."""
    out: dict[str, LayerStats] = {}
    joined: dict[tuple[int, ...], torch.Tensor] = {}
    for name in shares[0]:
        ps = [share[name] for share in shares]
        st = _merge_sums(ps)
        if spec.rows == ALL_ROWS:
            parts = sorted((part for p in ps for part in p.parts), key=lambda bp: bp[0])  # stable: call order
            key = tuple(id(t) for _, t in parts)
            if parts and key not in joined:
                joined[key] = parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in parts])
            st.rows = joined.get(key) if parts else None
        elif spec.rows or spec.heldout:
            st.rows, st.heldout = _merge_sampled(ps, spec)
        out[name] = st.to(device)
    return out


class StatsCollector:
    """Hooks ``layers`` (name -> module) and accumulates ``spec`` while inside ``with``.

    Calibration calls :meth:`begin_batch` with each batch's global index before feeding it; the
    statistics are then the same however batches are spread over processes (see the module doc).
    """

    def __init__(self, layers: Mapping[str, nn.Module], spec: StatsSpec, seed: int = 0, device: str = "cpu"):
        self.layers = dict(layers)
        self.spec = spec
        self.device = device
        self.seed = seed
        self.shares = {name: Partial() for name in self.layers}
        self.batch = 0
        self._calls: dict[str, int] = {}
        self._last: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> StatsCollector:
        for name, module in self.layers.items():
            conv = isinstance(module, nn.Conv2d)
            self._handles.append(module.register_forward_pre_hook(self._hook(name, conv)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def begin_batch(self, batch: int) -> None:
        """The inputs that follow belong to batch ``batch`` (a global index, the same on every rank)."""
        self.batch = batch
        self._calls.clear()

    def _hook(self, name: str, conv: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            with torch.no_grad():
                self.update(name, as_rows(args[0].detach(), conv))
        return hook

    def update(self, name: str, x: torch.Tensor) -> None:
        """Add input rows ``x`` [tokens, in] of layer ``name``."""
        p, spec = self.shares[name], self.spec
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        p.count += x.shape[0]
        if spec.absmax:
            amax = x.abs().amax(0).float()
            p.absmax = amax if p.absmax is None else torch.maximum(p.absmax, amax.to(p.absmax.device))
        if spec.xtx != "none":
            xd = x.double()
            part = (xd * xd).sum(0) if spec.xtx == "diag" else xd.T @ xd
            p.xtx = part if p.xtx is None else p.xtx + part.to(p.xtx.device)
        if spec.minmax:
            self._update_minmax(p, x, spec.xtx != "none")
        if spec.rows == ALL_ROWS:
            p.parts.append((self.batch, self._keep(x)))
        elif spec.rows or spec.heldout:
            n = x.shape[0]
            p.keys = _cat(p.keys, row_keys(self.seed, name, self.batch, call, n).to(x.device))
            p.pos = _cat(p.pos, row_positions(self.batch, call, n).to(x.device))
            p.rows = _cat(p.rows, x.to(torch.float32, copy=True))  # never a view of the layer input
            _keep_smallest(p, spec.rows + spec.heldout)

    @staticmethod
    def _update_minmax(st: Partial, x: torch.Tensor, colsum: bool) -> None:
        """Per-channel max / min (and column sums, with ``X^T X``): what :meth:`LayerStats.shifted` needs."""
        hi, lo = x.amax(0).float(), x.amin(0).float()
        st.maximum = hi if st.maximum is None else torch.maximum(st.maximum, hi.to(st.maximum.device))
        st.minimum = lo if st.minimum is None else torch.minimum(st.minimum, lo.to(st.minimum.device))
        if colsum:
            part = x.double().sum(0)  # float64 like X^T X: sums over shares do not depend on the split
            st.colsum = part if st.colsum is None else st.colsum + part.to(st.colsum.device)

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        """A float32 CPU copy of ``x``; layers fed the same rows in a row (fused q/k/v) share one."""
        rows = x.to("cpu", torch.float32, copy=True)
        last = self._last
        if last is not None and last.shape == rows.shape and torch.equal(last, rows):
            return last
        self._last = rows
        return rows

    def partial(self) -> dict[str, Partial]:
        """This process's share, on the CPU (what :func:`merge_partials` combines)."""
        return {name: p.cpu() for name, p in self.shares.items()}

    def result(self) -> dict[str, LayerStats]:
        """The statistics of every process's inputs (float32, on ``device``); collective when
        distributed (:mod:`ptqbench.distributed`), one process's own otherwise."""
        from ptqbench import distributed as dist

        shares = [self.shares] if dist.size() == 1 else dist.all_gather_object(self.partial())
        self.shares = {name: Partial() for name in self.layers}
        return merge_partials(shares, self.spec, self.device)


def collect_stats(
    layers: Mapping[str, nn.Module],
    spec: StatsSpec,
    run: Callable[[], object] | Iterable[object],
    seed: int = 0,
) -> dict[str, LayerStats]:
    """Collect ``spec`` for ``layers`` while ``run()`` feeds the model (or while iterating it)."""
    with StatsCollector(layers, spec, seed=seed) as collector, torch.no_grad():
        if callable(run):
            run()
        else:
            for _ in run:
                pass
    return collector.result()
