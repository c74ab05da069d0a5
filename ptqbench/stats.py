"""Calibration statistics of layer inputs, collected by forward hooks on any torch model.

A method declares what it needs (:class:`StatsSpec`); :class:`StatsCollector` hooks the
selected layers, accumulates per-channel abs-max, a bounded uniform sample of input rows
(bottom-k reservoir with a seeded generator) or every row (``rows=-1``, :data:`ALL_ROWS`),
optionally a held-out sample disjoint from the reservoir sample, and optionally ``X^T X`` (full or
diagonal), and returns one :class:`LayerStats` per layer. With a sample, memory is bounded by
``rows + heldout`` x ``in_features`` (+ ``in_features^2`` for a full ``X^T X``) per layer, whatever
the number of forwards; all rows cost 4 bytes per row and input channel (kept on the CPU; methods
stream them to the device in chunks), and leave no rows to hold out.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

XtX = Literal["none", "diag", "full"]
ALL_ROWS = -1  # StatsSpec.rows: keep every input row


def merge_rows(a: int, b: int) -> int:
    """The larger of two row requests (:data:`ALL_ROWS` is larger than any sample)."""
    return ALL_ROWS if ALL_ROWS in (a, b) else max(a, b)


@dataclass(frozen=True)
class StatsSpec:
    """What a method needs: per-channel abs-max, ``rows`` sampled input rows (-1: all), ``X^T X``;
    and ``heldout`` rows for measuring a quantized layer on inputs its method never saw.

    The held-out rows are the ``heldout`` rows ranked next after the ``rows`` sample by the same
    random keys: a uniform sample of the rows outside it, so disjoint from it, and the ``rows``
    sample is the same with or without them (none with all rows).
    """

    absmax: bool = False
    rows: int = 0
    xtx: XtX = "none"
    heldout: int = 0

    def __or__(self, other: StatsSpec) -> StatsSpec:
        order = ("none", "diag", "full")
        return StatsSpec(
            self.absmax or other.absmax,
            merge_rows(self.rows, other.rows),
            order[max(order.index(self.xtx), order.index(other.xtx))],
            max(self.heldout, other.heldout),
        )

    @property
    def empty(self) -> bool:
        return not self.absmax and self.rows == 0 and self.xtx == "none" and self.heldout == 0


@dataclass
class LayerStats:
    """Statistics of one layer's input ``X`` [tokens, in_features] (float32, on CPU); ``heldout``
    rows are not part of what a method is given (see :class:`StatsSpec`)."""

    absmax: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    count: int = 0
    heldout: torch.Tensor | None = None
    _keys: torch.Tensor | None = field(default=None, repr=False)

    def to(self, device: torch.device | str) -> LayerStats:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LayerStats(move(self.absmax), move(self.rows), move(self.xtx), self.count, move(self.heldout))

    def without_heldout(self) -> LayerStats:
        """These statistics as a method gets them (no held-out rows)."""
        return LayerStats(self.absmax, self.rows, self.xtx, self.count)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors for saving (safetensors); ``from_state`` rebuilds."""
        out = {"count": torch.tensor(self.count)}
        for name in ("absmax", "rows", "xtx", "heldout"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).contiguous()
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> LayerStats:
        return cls(
            state.get("absmax"), state.get("rows"), state.get("xtx"), int(state["count"]), state.get("heldout")
        )


def as_rows(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """Flatten a layer input to [tokens, in_features] (channels last for 1x1 convs)."""
    if conv:
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1])


class StatsCollector:
    """Hooks ``layers`` (name -> module) and accumulates ``spec`` while inside ``with``."""

    def __init__(self, layers: Mapping[str, nn.Module], spec: StatsSpec, seed: int = 0, device: str = "cpu"):
        self.layers = dict(layers)
        self.spec = spec
        self.device = device
        self.stats = {name: LayerStats() for name in self.layers}
        self._gens: dict[str, torch.Generator] = {}
        self._parts: dict[str, list[torch.Tensor]] = {}  # all rows, concatenated by result()
        self._last: torch.Tensor | None = None
        self.seed = seed
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

    def _generator(self, name: str, device: torch.device) -> torch.Generator:
        if name not in self._gens:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            self._gens[name] = g
        return self._gens[name]

    def _hook(self, name: str, conv: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            with torch.no_grad():
                self.update(name, as_rows(args[0].detach(), conv))
        return hook

    def update(self, name: str, x: torch.Tensor) -> None:
        """Add input rows ``x`` [tokens, in] of layer ``name``."""
        st, spec = self.stats[name], self.spec
        st.count += x.shape[0]
        if spec.absmax:
            amax = x.abs().amax(0).float()
            st.absmax = amax if st.absmax is None else torch.maximum(st.absmax, amax.to(st.absmax.device))
        if spec.xtx != "none":
            xf = x.float()
            part = (xf * xf).sum(0) if spec.xtx == "diag" else xf.T @ xf
            st.xtx = part if st.xtx is None else st.xtx + part.to(st.xtx.device)
        keep_rows = spec.rows + spec.heldout
        if spec.rows == ALL_ROWS:
            self._parts.setdefault(name, []).append(self._keep(x))
        elif keep_rows:
            keys = torch.rand(x.shape[0], generator=self._generator(name, x.device), device=x.device)
            rows = x.to(torch.float32, copy=True)  # never a view of the layer input
            if st.rows is not None:
                keys = torch.cat([st._keys.to(x.device), keys])
                rows = torch.cat([st.rows.to(x.device), rows])
            if rows.shape[0] > keep_rows:
                keep = torch.topk(keys, keep_rows, largest=False).indices.sort().values
                keys, rows = keys[keep], rows[keep]
            st._keys, st.rows = keys, rows

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        """A float32 CPU copy of ``x``; layers fed the same rows in a row (fused q/k/v) share one."""
        rows = x.to("cpu", torch.float32, copy=True)
        last = self._last
        if last is not None and last.shape == rows.shape and torch.equal(last, rows):
            return last
        self._last = rows
        return rows

    def result(self) -> dict[str, LayerStats]:
        """The statistics, moved to ``device`` (float32); a reservoir split into the ``rows``
        sample and the held-out rows (each in arrival order)."""
        joined: dict[tuple[int, ...], torch.Tensor] = {}  # layers that shared every part share the result
        for name, parts in self._parts.items():
            key = tuple(id(p) for p in parts)
            if key not in joined:
                joined[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
            self.stats[name].rows = joined[key]
        self._parts.clear()
        return {name: self._split(st).to(self.device) for name, st in self.stats.items()}

    def _split(self, st: LayerStats) -> LayerStats:
        if not self.spec.heldout or st.rows is None or self.spec.rows == ALL_ROWS:
            return st
        first = torch.zeros(st.rows.shape[0], dtype=torch.bool, device=st.rows.device)
        first[torch.topk(st._keys, min(self.spec.rows, st.rows.shape[0]), largest=False).indices] = True
        rows = st.rows[first] if self.spec.rows else None
        return LayerStats(st.absmax, rows, st.xtx, st.count, st.rows[~first])


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
