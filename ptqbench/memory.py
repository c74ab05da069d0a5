"""Exact memory accounting and the equal-memory rank solver.

A layer's cost is its method's ``layer_bits`` (main weight, branch factors, smoothing vector,
bias, every scale); layers left in 16-bit count at 16 bits; bits-per-weight is model bits over
the number of weights of the quantized layers. Layers of one share group (:attr:`LayerShape.group`)
and equal rank store what their method shares (``Method.shared_input_bits``: SVDQuant's fused
q/k/v smoothing vector and down-projection) once. The solver finds the largest branch rank whose
exact bits do not exceed a reference configuration's, per layer (per share group) or one rank
model-wide.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ptqbench.errors import UserError
from ptqbench.method import LowRankMethod, Method

QKV = ("to_q", "to_k", "to_v")
ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")  # a joint attention's text-stream projections (FLUX, SD3)


def qkv_group(name: str, cross_attention: bool = False) -> str | None:
    """The share group of an attention projection that may share its input with its siblings
    (``<parent>.qkv`` for ``<parent>.to_q/to_k/to_v``, ``<parent>.add_qkv`` for a joint
    attention's ``add_q_proj/add_k_proj/add_v_proj``), else ``None``. In a cross-attention
    (``cross_attention=True``) ``to_q`` reads the image and ``to_k``/``to_v`` the text: ``to_q`` is
    alone and ``to_k``/``to_v`` form ``<parent>.kv`` (deepcompressor's ``add_k_proj``/``add_v_proj``)."""
    parent, _, leaf = name.rpartition(".")
    if leaf in ADD_QKV:
        return f"{parent}.add_qkv"
    if leaf not in QKV:
        return None
    if cross_attention:
        return None if leaf == "to_q" else f"{parent}.kv"
    return f"{parent}.qkv"


@dataclass(frozen=True)
class LayerShape:
    """What the accounting needs of a layer: its name, ``[out, in]``, whether it has a bias, and
    ``group``: layers with the same group read one input and may share a smoothing vector and a
    down-projection (counted once by methods that share them)."""

    name: str
    out_features: int
    in_features: int
    bias: bool
    group: str | None = None

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features


def model_bits(method: Method | None, shapes: Sequence[LayerShape], ranks: Sequence[int] | None = None) -> int:
    """Exact bits of the targeted layers under ``method`` (``None``: all 16-bit); the parts a
    method shares between the layers of one group with equal rank count once."""
    total = 0
    groups: dict[tuple[str, int, int], int] = {}
    for i, s in enumerate(shapes):
        if method is None:
            total += 16 * s.weights + (16 * s.out_features if s.bias else 0)
            continue
        m = method if ranks is None else dataclasses.replace(method, rank=ranks[i])
        total += m.layer_bits(s.out_features, s.in_features, s.bias)
        if s.group is not None:
            key = (s.group, getattr(m, "rank", 0), s.in_features)
            if key in groups:
                total -= groups[key]
            else:
                groups[key] = m.shared_input_bits(s.in_features)
    return total


def bits_per_weight(
    method: Method | None, shapes: Sequence[LayerShape], ranks: Sequence[int] | None = None
) -> float:
    weights = sum(s.weights for s in shapes)
    return model_bits(method, shapes, ranks) / weights if weights else 0.0


def _largest_rank(
    candidate: LowRankMethod, budget: int, shapes: Sequence[LayerShape], multiple: int, limit: int
) -> int:
    """Largest r (a multiple of ``multiple``) with bits(r) <= budget; bits grow with r."""
    def fits(r: int) -> bool:
        return model_bits(dataclasses.replace(candidate, rank=r), shapes) <= budget

    if not fits(0):
        return -1
    lo, hi = 0, limit // multiple  # in units of ``multiple``
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * multiple):
            lo = mid
        else:
            hi = mid - 1
    return lo * multiple


def solve_rank(
    reference: Method,
    candidate: LowRankMethod,
    shapes: Sequence[LayerShape],
    multiple: int = 1,
    per_layer: bool = False,
) -> int | list[int]:
    """Largest rank for ``candidate`` whose exact bits do not exceed ``reference``'s.

    Model-wide (one rank for all ``shapes``) or ``per_layer`` (a list, one per shape; the layers
    of one share group get one rank, solved on the group's bits, so that they may share).
    Raises :class:`UserError` when even rank 0 does not fit.
    """
    if not isinstance(candidate, LowRankMethod):
        raise UserError(f"equal memory: method {candidate.name} has no low-rank branch, so no rank to solve")
    if multiple < 1:
        raise UserError(f"equal memory: multiple must be >= 1, got {multiple}")
    if not shapes:
        raise UserError("equal memory: no layers to solve for")
    by_group: dict[object, list[int]] = {}
    for i, s in enumerate(shapes):
        by_group.setdefault(i if s.group is None else s.group, []).append(i)
    members = list(by_group.values()) if per_layer else [list(range(len(shapes)))]
    ranks = [0] * len(shapes)
    for index in members:
        group = [shapes[i] for i in index]
        budget = model_bits(reference, group)
        limit = min(min(s.out_features, s.in_features) for s in group)
        r = _largest_rank(candidate, budget, group, multiple, limit)
        if r < 0:
            where = group[0].name if per_layer else f"{len(group)} layers"
            raise UserError(
                f"equal memory: {candidate.label()} does not fit the budget of {reference.label()} "
                f"even at rank 0 ({where})"
            )
        for i in index:
            ranks[i] = r
    return ranks if per_layer else ranks[0]
