"""Low-rank branch machinery shared by SVDQuant and LoRaQ.

A truncated SVD (exact, optionally float64 as deepcompressor's ``nn/patch/lowrank.py``, or a
seeded randomized range finder), the branch factors and their formats (:class:`BranchSpec`),
units of layers that share one input (fused q/k/v: one smoothing vector and one
down-projection, each layer its own up-projection), same-shape units batched as ``[B, M, n]``
stacks, the smoothing search and branch refinement on them (:class:`Fitter`) and the
:class:`~ptqbench.layers.QuantLinear` modules built from the result.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import nn

from ptqbench.errors import UserError
from ptqbench.formats import Format
from ptqbench.layers import SMOOTH_BITS, LowRankBranch, QuantLinear, dense_weight
from ptqbench.memory import qkv_group
from ptqbench.method import LowRankMethod
from ptqbench.rowgram import RowGram, applies
from ptqbench.smoothing import (
    MAX_BATCH_ELEMENTS,
    PROFILE,
    CandidateBranch,
    Rows,
    chunks,
    fused_scoring_plan,
    pick_best,
    quantize_stack,
    round_smooth,
    set_info,
    sharing_memory,
    smooth_dtype,
    smooth_scale,
    streamed_sq_error,
)
from ptqbench.stats import ALL_ROWS, LayerStats

T = TypeVar("T")
SVD_KINDS = ("auto", "exact", "gram", "randomized")
STOP_RULES = ("<=", "<")
REFINE_OBJECTIVES = ("gram", "rows")


# ----------------------------------------------------------------------------- truncated SVD


def _orthonormalize(y: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """Orthonormal columns spanning ``y[..., m, k]``: Cholesky QR (batched and cheap on GPUs).

    The k x k Gram factorization runs in float64 (with a tiny ridge, so rank-deficient inputs
    stay finite); the large products stay in ``y``'s dtype. Two passes restore orthogonality
    to working precision.
    """
    for _ in range(passes):
        top = torch.linalg.vector_norm(y, float("inf"), (-2, -1), keepdim=True)
        y = y / top.clamp_min(torch.finfo(y.dtype).tiny)  # a well-scaled Gram; zero stays zero
        g = (y.mT @ y).double()
        diagonal = g.diagonal(dim1=-2, dim2=-1)
        diagonal.add_(diagonal.sum(-1, keepdim=True) * 1e-10 + 1e-30)  # a ridge: rank-deficient inputs stay finite
        c, _ = torch.linalg.cholesky_ex(g)
        y = torch.linalg.solve_triangular(c.mT.to(y.dtype), y, upper=True, left=False)  # y C^-T
    return y


def resolve_svd(kind: str, rank: int, shape: tuple[int, ...], device: torch.device | str = "cpu") -> str:
    """``auto``: randomized while its ``2 r`` columns are fewer than ``min(m, n)`` on a GPU (where
    matrix products are cheap and batched exact SVDs are not), and while ``8 r <= min(m, n)`` on
    the CPU, above which the exact SVD is faster (2 cores, 256-wide layers: randomized vs exact
    3.9 vs 9.2 ms at r = 32, 12.8 vs 8.0 ms at r = 62, 35 vs 7.3 ms at r = 120)."""
    if kind == "auto":
        side = min(shape[-2:])
        exact = 2 * rank >= side if torch.device(device).type == "cuda" else 8 * rank > side
        return "exact" if exact else "randomized"
    return kind


def svd_label(kind: str, dtype: torch.dtype) -> str:
    """How a resolved SVD ran, for ``q.info["svd"]``: ``exact float64``, ``gram float64``,
    ``randomized float32``."""
    precision = {"exact": str(dtype).removeprefix("torch."), "gram": "float64"}.get(kind, "float32")
    return f"{kind} {precision}"


def truncated_svd(
    w: torch.Tensor,
    rank: int,
    method: str = "exact",
    seed: int = 0,
    niter: int = 6,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of each matrix in ``w[..., m, n]`` (returned float32):
    ``U[..., m, r]``, ``S[..., r]`` (descending), ``Vh[..., r, n]``.

    ``exact``: ``torch.linalg.svd`` in ``dtype`` (float64: deepcompressor's). ``gram``: the same
    triplets from the float64 eigendecomposition of the smaller Gram matrix (:func:`gram_svd`).
    ``randomized``: a
    range finder with ``2 r`` columns from a seeded Gaussian shared by the whole batch (so a
    layer's result does not depend on its batch), ``niter`` power iterations, then Rayleigh-Ritz
    (a small float64 eigenproblem); always float32.
    """
    if method == "exact":
        u, s, vh = torch.linalg.svd(w.to(dtype), full_matrices=False)
        return u[..., :rank].float(), s[..., :rank].float(), vh[..., :rank, :].float()
    if method == "gram":
        u, s, vh = gram_svd(w, rank)
        return u.float(), s.float(), vh.float()
    if method != "randomized":
        raise UserError(f"svd: unknown method {method!r} (valid: {', '.join(SVD_KINDS)})")
    w = w.float()
    m, n = w.shape[-2:]
    k = min(2 * rank, m, n)
    gen = torch.Generator().manual_seed(int(seed))
    q = _orthonormalize(w @ torch.randn(n, k, generator=gen).to(w.device))
    for _ in range(niter):
        q = _orthonormalize(w @ _orthonormalize(w.mT @ q))
    q = _orthonormalize(q, passes=2)
    b = q.mT @ w
    bd = b.double()
    evals, evecs = torch.linalg.eigh((bd @ bd.mT).cpu())  # small k x k problems: fastest on the CPU
    evals = evals.flip(-1)[..., :rank].to(w.device)
    evecs = evecs.flip(-1)[..., :rank].to(w.device)
    s = evals.clamp_min(0).sqrt()
    u = (q.double() @ evecs).float()
    vh = (evecs.mT @ bd) / torch.where(s > 0, s, torch.ones_like(s))[..., None]
    vh = torch.where((s > 0)[..., None], vh, torch.zeros_like(vh))
    return u, s.float(), vh.float()


def gram_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``w[..., m, n]`` (returned float64) from the float64
    ``eigh`` of the smaller Gram matrix (``W^T W`` [n, n] when ``m >= n``, else ``W W^T``): a
    ``min(m, n)``-square symmetric eigenproblem instead of the SVD of ``w``, much cheaper for tall
    or wide blocks (fused q/k/v, FFN). Squared singular values carry a relative error of about
    ``eps64 * (s_1 / s_i)^2`` and the vectors ``eps64 * s_1^2 / gap``: for the top ``rank`` of a
    weight matrix far below float32 resolution. Singular-vector signs may differ from
    ``torch.linalg.svd``'s; ``U S V^T`` does not."""
    wd = w.double()
    tall = wd.shape[-2] >= wd.shape[-1]
    gram = wd.mT @ wd if tall else wd @ wd.mT
    evals, evecs = torch.linalg.eigh(gram)
    return _triplets(wd, tall, evals.flip(-1)[..., :rank], evecs.flip(-1)[..., :rank])


# The iterative float64 top-r solve (:func:`top_eigh`).
ITER_TOL = 1e-10  # residual of each Ritz pair / spectral gap after the rank: the subspace's angle bound
ITER_ROUNDS = 24  # filter rounds before a matrix falls back to the full solve
ITER_GUARD = 8  # columns beyond the rank from a warm start (an iterate: a 100x gap after the rank)
ITER_DIGITS = 12  # a filter amplifies the block's Ritz values by at most ~10^ITER_DIGITS from one to another
ITER_DEGREE = 8  # the highest Chebyshev degree of one round
ITER_FLOOR = 1e-8  # the damped interval reaches at least this fraction of the top Ritz value
ITER_WARM_FLOOR = 0.05  # a warm start's first filter damps below this fraction of its r-th value
RR_THREADS = 8  # CPU threads of the Rayleigh-Ritz eigenproblems of a batch


def _orthonormal(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_orthonormalize` then one Cholesky QR pass without its ridge (whose shrink, about
    ``1e-10 k``, would bias Rayleigh quotients): orthonormal to float64 working precision, and
    whether that pass succeeded (``[...]`` bool; where not, the columns are only near-orthonormal)."""
    q = _orthonormalize(y)
    c, info = torch.linalg.cholesky_ex(q.mT @ q)  # within ~1e-9 of the identity
    ok = info == 0
    c = torch.where(ok[..., None, None], c, torch.eye(c.shape[-1], dtype=c.dtype, device=c.device))
    return torch.linalg.solve_triangular(c.mT, q, upper=True, left=False), ok


@functools.cache
def _eigh_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(RR_THREADS, os.cpu_count() or 1)), thread_name_prefix="ptqbench-eigh")


def _small_eigh(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of a batch of small symmetric matrices on the CPU (faster than cuSOLVER's at these
    sizes: 10.8 vs 29.8 ms for 39 of 64 x 64 on an H200's host), the batch split over threads
    (its matrices otherwise run one after another): values descending."""
    h = ((h + h.mT) / 2).cpu()
    parts = max(1, min(RR_THREADS, len(h) // 4))
    if parts == 1:
        t, z = torch.linalg.eigh(h)
    else:
        t, z = (torch.cat(v) for v in zip(*_eigh_pool().map(torch.linalg.eigh, h.chunk(parts)), strict=True))
    return t.flip(-1), z.flip(-1)


def _rayleigh_ritz(
    q: torch.Tensor, gq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz values (descending), vectors and ``G`` times them, of the bases ``q[B, k, c]`` with
    ``gq = G q``, and the values on the CPU."""
    values, z = _small_eigh(q.mT @ gq)
    z = z.to(q.device)
    return values.to(q.device), q @ z, gq @ z, values


@functools.lru_cache(maxsize=64)
def _gaussian(k: int, cols: int, seed: int, device: torch.device) -> torch.Tensor:
    """A seeded float64 Gaussian ``[k, cols]`` on ``device`` (drawn on the CPU: the same on every
    device), kept: every solve of a shape starts its fresh columns from it (read only)."""
    return torch.randn(k, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)


def top_eigh(
    g: torch.Tensor, rank: int, start: torch.Tensor | None = None, seed: int = 0,
    start_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` eigenpairs of symmetric PSD ``g[..., k, k]`` (float64; values descending,
    vectors ``[..., k, rank]``) by Chebyshev-filtered subspace iteration, and whether each matrix
    converged (``[...]`` bool, on the host: the others are for the caller to solve in full).

    The block holds ``start`` (the vectors of a nearby matrix; a refinement iterate's last
    solve) and ``ITER_GUARD`` more columns, or without ``start`` ``2 rank`` seeded Gaussian
    columns. Each round applies ``T_d`` of ``g`` mapped so that ``[0, t_min]`` (the block's
    smallest Ritz value) lands on ``[-1, 1]``, amplifying the wanted end, each column scaled by
    its Ritz value's amplification (``d`` bounded so that no column's grows ``10^ITER_DIGITS``
    past another's), then Rayleigh-Ritz (small eigenproblems on the CPU). With ``start_values``
    (``[..., rank]``: the nearby matrix's top eigenvalues) the first round filters the start
    block before any Rayleigh-Ritz, with those values and the damped interval's end at
    ITER_WARM_FLOOR of the r-th (a refinement iterate's gap after the rank is about 100x:
    that round usually converges it); the convergence test is the same. A matrix is done
    when every top Ritz pair has ``||g x - t x|| <= ITER_TOL (t_r - t_(r+1))`` (its subspace
    then within about ITER_TOL rad of the exact one, its block orthonormal to working
    precision) and leaves the batch."""
    batch, k = g.shape[:-2], g.shape[-1]
    g = g.reshape(-1, k, k)
    cols = min(rank + (rank if start is None else ITER_GUARD), k)
    fresh = cols - (0 if start is None else start.shape[-1])
    gauss = _gaussian(k, fresh, int(seed), g.device).expand(len(g), k, fresh)
    q, ok = _orthonormal(gauss if start is None else torch.cat([start.double().reshape(len(g), k, -1), gauss], -1))
    if start is not None and start_values is not None:
        known = start_values.detach().reshape(len(g), -1).double().cpu()
        floor = known[:, -1:] * ITER_WARM_FLOOR
        q, ok = _orthonormal(_filtered(g, q, torch.cat([known, floor.expand(-1, cols - known.shape[1])], 1)))
    t, x, gx, t_host = _rayleigh_ritz(q, g @ q)
    values = t.new_zeros(len(g), rank)
    vectors = x.new_zeros(len(g), k, rank)
    done = torch.zeros(len(g), dtype=torch.bool)  # on the host
    left = torch.arange(len(g))  # the matrices still iterating (host indices)
    for rounds in range(ITER_ROUNDS + 1):
        residual = (gx[..., :rank] - x[..., :rank] * t[:, None, :rank]).norm(dim=-2).amax(-1)
        residual_host, ok_host = torch.stack([residual, ok.double()]).cpu()  # the round's one sync besides eigh's
        gap = t_host[:, rank - 1] - (t_host[:, rank] if cols > rank else 0)
        converged = (ok_host > 0) & (residual_host <= ITER_TOL * gap) & (gap > 0)
        out = converged | (rounds == ITER_ROUNDS)
        if bool(out.any()):
            at, where = left[out], out.nonzero().squeeze(-1).to(g.device)
            values[at], vectors[at], done[at] = t[where, :rank], x[where, :, :rank], converged[out]
            if bool(out.all()):
                break
            keep = (~out).nonzero().squeeze(-1)
            left, t_host, keep = left[keep], t_host[keep], keep.to(g.device)
            g, t, x, gx = g[keep], t[keep], x[keep], gx[keep]
        q, ok = _orthonormal(_filtered(g, x, t_host))
        t, x, gx, t_host = _rayleigh_ritz(q, g @ q)
    return values.reshape(*batch, rank), vectors.reshape(*batch, k, rank), done.reshape(batch)


def _filtered(g: torch.Tensor, x: torch.Tensor, t_host: torch.Tensor) -> torch.Tensor:
    """One filter round of :func:`top_eigh`: ``T_d`` of ``g`` mapped so that the damped interval
    ``[0, t_min]`` lands on ``[-1, 1]``, applied to the Ritz block ``x`` (its values ``t_host``
    on the host), each column scaled by its Ritz value's amplification ``|T_d(t)|``,
    by the three-term recurrence ``y_(j+1) = (2 / c) g y_j - 2 y_j - y_(j-1)`` (``c`` the
    interval's center, one fused product per degree); columns of a matrix whose block overflowed
    are its input's."""
    half_host = torch.maximum(t_host[:, -1], ITER_FLOOR * t_host[:, 0]).clamp_min(torch.finfo(t_host.dtype).tiny) / 2
    spread = float((t_host[:, 0] / half_host).amax())
    degree = max(1, min(ITER_DEGREE, int(ITER_DIGITS / max(math.log10(max(spread, 1.0)), 1e-3))))
    growth = torch.cosh(degree * torch.acosh((t_host / half_host[:, None] - 1).abs().clamp_min(1)))  # |T_d(t)|
    scales = torch.cat([2 / half_host[:, None], 1 / growth], 1).to(g.device)  # one upload
    gs = g * scales[:, :1, None]
    y0, y1 = x, torch.baddbmm(x, gs, x, beta=-1.0, alpha=0.5)  # T_1 = g x / c - x
    for _ in range(degree - 1):
        y0, y1 = y1, torch.baddbmm(torch.add(y0, y1, alpha=2.0), gs, y1, beta=-1.0)
    y1 = y1 * scales[:, None, 1:]
    finite = torch.isfinite(y1).flatten(1).all(1)
    return torch.where(finite[:, None, None], y1, x)


def gram_basis(u: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """The eigenvectors of the smaller Gram matrix that :func:`gram_svd` solves for (``V`` of a
    tall ``[m >= n]`` matrix, ``U`` of a wide one): what :func:`iterative_gram_svd` starts from."""
    return vh.mT if vh.shape[-1] <= u.shape[-2] else u


def iterative_gram_svd(
    w: torch.Tensor, rank: int, start: torch.Tensor | None = None, seed: int = 0,
    start_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gram_svd`'s triplets (float64) from :func:`top_eigh` of the smaller Gram matrix
    (from ``start``, a nearby matrix's :func:`gram_basis`, and ``start_values``, its singular
    values, if given), and whether each matrix converged (on the host). A refinement iterate is
    ``L R + E`` (the last branch plus the main weight's quantization error): its Gram has a gap
    of about 100x after the rank (l_(r+1) / l_r ~ 0.01, INT4 at r = 32, measured) and a warm
    start within a few degrees, so it converges in a few products; a smoothed weight (a search
    candidate) has no such gap and takes a few dozen.
    Singular-vector signs may differ from the full solve's; ``U S V^T`` does not."""
    wd = w.double()
    tall = wd.shape[-2] >= wd.shape[-1]
    values = None if start_values is None else start_values.double() ** 2
    theta, x, done = top_eigh(wd.mT @ wd if tall else wd @ wd.mT, rank, start, seed, values)
    return (*_triplets(wd, tall, theta, x), done)


def _triplets(
    wd: torch.Tensor, tall: bool, evals: torch.Tensor, evecs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, V^T`` of ``wd`` from eigenpairs of its smaller Gram matrix (``W^T W`` when ``tall``)."""
    s = evals.clamp_min(0).sqrt()
    inv = torch.where(s > 0, 1 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    if tall:
        return (wd @ evecs) * inv[..., None, :], s, evecs.mT
    return evecs, s, (evecs.mT @ wd) * inv[..., :, None]


# ----------------------------------------------------------------------------- the branch


@dataclass(frozen=True, eq=False)
class BranchSpec:
    """How a branch is built from an SVD and scored: factor split, rotation, formats.

    ``split="us"``: ``L = U S``, ``R = V^T`` (SVDQuant); ``"sqrt"``: ``L = U S^1/2``,
    ``R = S^1/2 V^T`` (LoRaQ). ``rotation`` (``Omega`` [r, r]) gives ``up = L Omega``,
    ``down = Omega^T R``.
    """

    rank: int
    weight_format: Format
    act_format: Format
    mid_format: Format | None = None
    split: str = "us"
    rotation: torch.Tensor | None = None

    def factors(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.split == "us":
            up, down = u * s[..., None, :], vh
        else:
            root = s.sqrt()
            up, down = u * root[..., None, :], root[..., :, None] * vh
        if self.rotation is not None:
            rot = self.rotation.to(up.device, up.dtype)
            up, down = up @ rot, rot.T @ down
        return up, down

    def quantize(
        self, up: torch.Tensor, down: torch.Tensor, segments: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_stack(self.weight_format, up, segments), quantize_stack(self.weight_format, down)


# ----------------------------------------------------------------------------- units and batches


@dataclass
class Unit:
    """One matrix to quantize: a layer, or layers sharing an input stacked along ``out``."""

    names: list[str]
    layers: list[nn.Module]
    stats: LayerStats | None

    @property
    def segments(self) -> list[int]:
        return [int(dense_weight(layer).shape[0]) for layer in self.layers]

    def weight(self) -> torch.Tensor:
        return torch.cat([dense_weight(layer).detach().float() for layer in self.layers], 0)


@dataclass
class Batch:
    """Same-shape units stacked: ``weight[B, M, n]`` float32 and their statistics.

    ``samples`` are the units' calibration rows (streamed in chunks; ``rows`` stacks them all
    as ``[B, N, n]`` on the device), ``xtx`` is ``X^T X / count`` ([B, n, n] or [B, n]).
    """

    units: list[Unit]
    weight: torch.Tensor
    absmax: torch.Tensor | None
    samples: Rows | None
    xtx: torch.Tensor | None
    smooth_dtype: torch.dtype

    @property
    def segments(self) -> list[int]:
        return self.units[0].segments

    @property
    def rows(self) -> torch.Tensor | None:
        return None if self.samples is None else self.samples.stacked()

    def __len__(self) -> int:
        return len(self.units)


def make_units(
    layers: Mapping[str, nn.Module], stats: Mapping[str, LayerStats] | None, share_qkv: bool = False
) -> list[Unit]:
    """One unit per layer; with ``share_qkv``, the layers of one :func:`~ptqbench.memory.qkv_group`
    that read the same input (identical statistics, or the same group when there are none) form
    one unit. Cross-attention ``to_k``/``to_v`` (they read the text, ``to_q`` the image) split from
    ``to_q`` by their statistics."""
    get = (lambda name: None) if stats is None else stats.get
    units: list[Unit] = []
    families: dict[str, list[str]] = {}
    for name in layers:
        group = qkv_group(name)
        if share_qkv and group is not None:
            families.setdefault(group, []).append(name)
        else:
            units.append(Unit([name], [layers[name]], get(name)))
    for names in families.values():
        groups: list[list[str]] = []
        for name in names:
            home = next((g for g in groups if _same_input(layers, get, g[0], name)), None)
            if home is None:
                groups.append([name])
            else:
                home.append(name)
        units.extend(Unit(g, [layers[n] for n in g], get(g[0])) for g in groups)
    return units


def _same_input(layers: Mapping[str, nn.Module], get: Callable, a: str, b: str) -> bool:
    wa, wb = dense_weight(layers[a]), dense_weight(layers[b])
    if wa.shape[1] != wb.shape[1] or wa.device != wb.device or wa.dtype != wb.dtype:
        return False
    sa, sb = get(a), get(b)
    if sa is None and sb is None:
        return True
    if sa is None or sb is None or sa.count != sb.count:
        return False
    if sa.absmax is None or sb.absmax is None:
        return sa.absmax is None and sb.absmax is None
    return bool(torch.equal(sa.absmax, sb.absmax))


def make_batches(units: list[Unit], use_rows: bool, xtx: str = "none") -> list[Batch]:
    """Stack units with the same shape, device, dtype and statistics layout, in chunks of at
    most ``MAX_BATCH_ELEMENTS`` weight elements. Rows stay where the statistics keep them."""
    groups: dict[tuple, list[Unit]] = {}
    for unit in units:
        w = dense_weight(unit.layers[0])
        st = unit.stats
        has_absmax = st is not None and st.absmax is not None
        n_rows = int(st.rows.shape[0]) if use_rows and st is not None and st.rows is not None else 0
        xtx_dim = st.xtx.dim() if xtx != "none" and st is not None and st.xtx is not None else 0
        key = (tuple(unit.segments), int(w.shape[1]), str(w.device), w.dtype, has_absmax, n_rows, xtx_dim)
        groups.setdefault(key, []).append(unit)
    batches = []
    for (segments, n, _, _, has_absmax, n_rows, xtx_dim), members in groups.items():
        per_chunk = MAX_BATCH_ELEMENTS // (sum(segments) * n)
        for lo, hi in chunks(len(members), per_chunk):
            part = members[lo:hi]
            device = dense_weight(part[0].layers[0]).device
            batches.append(
                Batch(
                    part,
                    torch.stack([u.weight().to(device) for u in part]),
                    _stack(part, device, lambda st: st.absmax) if has_absmax else None,
                    Rows([u.stats.rows for u in part], device, _compact(part[0])) if n_rows else None,
                    _stack(part, device, lambda st: st.xtx / max(st.count, 1)) if xtx_dim else None,
                    smooth_dtype(part[0].layers[0]),
                )
            )
    return batches


def subsample(batch: Batch, rows: int, seed: int) -> Batch:
    """``batch`` with a seeded subset of ``rows`` of its calibration rows (kept in their order; the
    same positions for every unit), or ``batch`` itself for ALL_ROWS or when it has no more rows."""
    if batch.samples is None or rows == ALL_ROWS or rows >= batch.samples.count:
        return batch
    perm = torch.randperm(batch.samples.count, generator=torch.Generator().manual_seed(int(seed)))
    keep = perm[:rows].sort().values
    parts = [part[keep.to(part.device)] for part in batch.samples.parts]
    return replace(batch, samples=Rows(parts, batch.samples.device, batch.samples.compact))


def map_batches(batches: list[Batch], fn: Callable[[Batch], T], workers: int = 1) -> list[T]:
    """``[fn(b) for b in batches]``; on a GPU with ``workers > 1``, that many batches at a time,
    each in a thread on its own CUDA stream, so that one batch's SVDs (latency-bound solver
    kernels and host syncs) overlap another's row products. Each batch runs the same operations
    on the same shapes as alone (chunk sizes do not depend on free memory: see
    :func:`~ptqbench.smoothing.score_budget`), so the results are the same; they split the
    memory for kept rows and outputs (:func:`~ptqbench.smoothing.sharing_memory`). Serial while
    :data:`~ptqbench.smoothing.PROFILE` is on (its stages synchronize the whole GPU)."""
    if workers <= 1 or len(batches) < 2 or not batches[0].weight.is_cuda or PROFILE.enabled:
        return [fn(b) for b in batches]

    load_cuda_linalg(batches[0].weight.device)
    grad = torch.is_grad_enabled()  # thread-local: a worker starts with autograd on

    def run(batch: Batch) -> T:
        device = batch.weight.device
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.set_grad_enabled(grad):
            out = fn(batch)
        stream.synchronize()  # its tensors are complete before another stream reads them
        return out

    workers = min(workers, len(batches))
    with sharing_memory(workers), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, batches))


def load_cuda_linalg(device: torch.device) -> None:
    """Load torch's CUDA linear-algebra library from this thread. torch loads it on the first
    CUDA linalg call, and two threads making that first call at once fail ("lazy wrapper should
    be called at most once"), so the workers of :func:`map_batches` find it loaded."""
    torch.linalg.cholesky_ex(torch.ones(1, 1, device=device))


def _compact(unit: Unit) -> torch.dtype | None:
    """The 16-bit dtype a unit's rows may be stored in (its layers'), or None for wider layers."""
    dtype = dense_weight(unit.layers[0]).dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _stack(units: list[Unit], device: torch.device, get: Callable[[LayerStats], torch.Tensor]) -> torch.Tensor:
    return torch.stack([get(u.stats).to(device).float() for u in units])


# ----------------------------------------------------------------------------- search and fit


@dataclass(frozen=True, eq=False)
class Fitter:
    """Fits and scores branches for stacked smoothed weights (shared by SVDQuant and LoRaQ).

    ``svd_dtype``: precision of the exact SVD. ``rule``: ``"<="`` (deepcompressor's
    ``calib/lowrank.py``: an equal error counts as an improvement, the later candidate is kept)
    or ``"<"``. ``row_chunk``: rows scored per chunk (default: bounded by MAX_BATCH_ELEMENTS).
    ``score_dtype``: of the row products of the output error (see
    :func:`~ptqbench.smoothing.resolve_score_dtype`); float32 accumulation either way.
    ``refine_objective``: how the refinement's iterates are scored on rows: ``gram``, the same
    output error evaluated exactly from float64 Gram matrices of the rows (one pass over them,
    then three ``n x n`` products per iterate; :mod:`ptqbench.rowgram`), where the formats allow
    it (:meth:`refines_on_gram`), else ``rows``: a pass over every row per iterate.
    ``iterative``: float64 top-r solves (``svd`` exact or gram) run :func:`iterative_gram_svd`,
    the refinement's iterates after the first from the last iterate's vectors; the full solve
    where it does not converge. ``fused_scoring``: candidates with a branch are scored per row as
    the deployed layer's fused path computes them where it runs (:meth:`scores_fused`).
    """

    spec: BranchSpec
    weight_format: Format
    act_format: Format
    svd: str
    seed: int
    svd_dtype: torch.dtype = torch.float32
    rule: str = "<="
    row_chunk: int | None = None
    score_dtype: torch.dtype = torch.float32
    refine_objective: str = "gram"
    iterative: bool = False
    fused_scoring: bool = True

    def svd_kind(self, shape: tuple[int, ...], device: torch.device) -> str:
        return resolve_svd(self.svd, self.spec.rank, shape, device)

    def solves_iteratively(self, method: str) -> bool:
        """Whether float64 top-r solves of ``method`` run :func:`iterative_gram_svd`."""
        return self.iterative and method in ("exact", "gram") and self.svd_dtype == torch.float64

    def solve(
        self, target: torch.Tensor, start: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-r triplets of ``target`` (float32; ``start``: :func:`gram_basis` and singular values
        of the last iterate, where :meth:`solves_iteratively`) and, per matrix, whether the full solve ran
        (all of them unless :meth:`solves_iteratively`; else where the iterative one did not
        converge)."""
        rank, method = self.spec.rank, self.svd_kind(tuple(target.shape), target.device)
        if not self.solves_iteratively(method):
            with PROFILE.stage("svd"):
                u, s, vh = truncated_svd(target, rank, method, self.seed, dtype=self.svd_dtype)
            return u, s, vh, torch.ones(target.shape[:-2], dtype=torch.bool, device=target.device)
        with PROFILE.stage("svd iterative"):
            basis, values = start or (None, None)
            u, s, vh, done = iterative_gram_svd(target, rank, basis, self.seed, values)
            u, s, vh = u.float(), s.float(), vh.float()
        cold = (~done).nonzero().squeeze(-1)  # on the host
        if len(cold):
            with PROFILE.stage("svd"):
                full = truncated_svd(target[cold], rank, method, self.seed, dtype=self.svd_dtype)
            for part, value in zip((u, s, vh), full, strict=True):
                part[cold] = value
        return u, s, vh, (~done).to(target.device)

    def fit(
        self, ws: torch.Tensor, target: torch.Tensor, segments: list[int],
        start: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor, tuple | None]:
        """Branch from the top-r SVD of ``target``; returns quantized factors (None at rank 0),
        the residual ``ws - up_q down_q``, its quantized version, and the SVD (:meth:`solve`;
        None at rank 0)."""
        if self.spec.rank == 0:
            return None, None, ws, quantize_stack(self.weight_format, ws, segments), None
        svd = self.solve(target, start)
        with PROFILE.stage("weight quant"):
            up_q, down_q = self.spec.quantize(*self.spec.factors(*svd[:3]), segments)
            res = ws - up_q @ down_q
            return up_q, down_q, res, quantize_stack(self.weight_format, res, segments), svd

    def error(
        self,
        batch: Batch,
        index: torch.Tensor,
        s: torch.Tensor,
        main_q: torch.Tensor,
        up_q: torch.Tensor | None,
        down_q: torch.Tensor | None,
    ) -> torch.Tensor:
        """Squared output error (float64) of candidates ``index`` (units of ``batch``) on all its
        rows, activations quantized as deployed; without rows, the squared weight error in the
        original (unsmoothed) space."""
        if batch.samples is not None:
            branch = None
            if up_q is not None:
                branch = CandidateBranch(up_q, down_q, self.spec.act_format, self.spec.mid_format)
            return streamed_sq_error(
                batch.samples, index, batch.weight, s, main_q, self.act_format, branch, self.row_chunk,
                self.score_dtype, self.fused_scoring,
            )
        w_eff = main_q if up_q is None else main_q + up_q @ down_q
        return (batch.weight[index] - w_eff / s[..., None, :]).pow(2).sum((-2, -1)).double()

    def scores_fused(self, batch: Batch) -> bool:
        """Whether :meth:`error` scores ``batch``'s candidates (with their branch) on its rows by
        the fused path (:func:`~ptqbench.smoothing.fused_scoring_plan`)."""
        if not self.fused_scoring or batch.samples is None or self.spec.rank == 0:
            return False
        plan = fused_scoring_plan(
            self.act_format, self.spec.act_format, self.spec.mid_format, batch.samples.dtype, self.score_dtype,
            batch.weight.device,
        )
        return plan is not None

    def refines_on_gram(self, batch: Batch) -> bool:
        """Whether :meth:`refine` scores ``batch``'s iterates on Gram matrices of its rows."""
        if self.refine_objective != "gram" or batch.samples is None:
            return False
        branch_act = self.spec.act_format if self.spec.rank else None
        return applies(self.act_format, branch_act, self.spec.mid_format, batch.samples.dtype)

    @PROFILE.timed("search (total)")
    def search(
        self, batch: Batch, pairs: list[tuple[float, float]], full_solves: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The smoothing of each unit with the lowest error over ``pairs`` (rounded to 16 bits)
        and the index of the winning pair, per unit. A NaN/inf scale resets its whole vector to 1.
        ``full_solves`` (``[units]`` long, if given) counts each unit's full SVDs."""
        w = batch.weight
        n_units, m, n = w.shape
        dev = w.device
        a = torch.tensor([p[0] for p in pairs], dtype=torch.float32, device=dev)[None, :, None]
        b = torch.tensor([p[1] for p in pairs], dtype=torch.float32, device=dev)[None, :, None]
        scales = smooth_scale(batch.absmax[:, None, :], w.abs().amax(-2)[:, None, :], a, b, invalid="vector")
        cand = round_smooth(scales, batch.smooth_dtype)
        n_cand = len(pairs)
        errors = torch.empty(n_units * n_cand, dtype=torch.float64, device=dev)
        for lo, hi in chunks(n_units * n_cand, MAX_BATCH_ELEMENTS // (m * n)):
            idx = torch.arange(lo, hi, device=dev)
            ui, ci = idx // n_cand, idx % n_cand
            s = cand[ui, ci]
            ws = w[ui] * s[:, None, :]
            up_q, down_q, _, main_q, svd = self.fit(ws, ws, batch.segments)
            if full_solves is not None and svd is not None:
                full_solves.index_add_(0, ui, svd[3].long())
            errors[lo:hi] = self.error(batch, ui, s, main_q, up_q, down_q)
        best = pick_best(errors.view(n_units, n_cand), self.rule)
        return cand[torch.arange(n_units, device=dev), best], best

    @PROFILE.timed("refine (total)")
    def refine(
        self,
        batch: Batch,
        ws: torch.Tensor,
        s: torch.Tensor,
        num_iters: int,
        early_stop: bool,
        history: list[torch.Tensor] | None = None,
        full_solves: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """deepcompressor's iterations (``calib/lowrank.py``): branch from SVD(ws - Q1(previous
        residual)); each unit keeps its best iterate under ``rule`` and, with ``early_stop``, stops
        at its first iterate that is worse (a stopped unit is no longer solved or scored). Returns
        up_q, down_q, residual, error, iterate used; ``history`` (if given) receives every
        iterate's errors ([units] each, NaN for stopped units), ``full_solves`` (``[units]`` long,
        if given) counts each unit's full SVDs (:meth:`solve`)."""
        n_units = len(batch)
        gram = None
        if self.refines_on_gram(batch):
            gram = RowGram.build(batch.samples, s, batch.weight, self.act_format, self.score_dtype)
        target, basis, values, best = ws.clone(), None, None, None
        active = torch.ones(n_units, dtype=torch.bool, device=ws.device)
        used = torch.ones(n_units, dtype=torch.long, device=ws.device)
        for it in range(max(1, num_iters)):
            idx = active.nonzero().squeeze(-1)
            start = None if basis is None else (basis[idx], values[idx])
            up_q, down_q, res, main_q, svd = self.fit(ws[idx], target[idx], batch.segments, start)
            if gram is not None:
                err = gram.take(idx).sq_error(main_q, up_q, down_q)
            else:
                err = self.error(batch, idx, s[idx], main_q, up_q, down_q)
            if history is not None:
                history.append(err.new_full((n_units,), torch.nan).index_put((idx,), err))
            if full_solves is not None and svd is not None:
                full_solves[idx] += svd[3].long()
            if best is None:
                best = [up_q, down_q, res, err]
            else:
                better = (err <= best[3][idx]) if self.rule == "<=" else (err < best[3][idx])
                for i, new in enumerate((up_q, down_q, res, err)):
                    if new is not None:
                        shape = (-1,) + (1,) * (new.dim() - 1)
                        best[i][idx] = torch.where(better.view(shape), new, best[i][idx])
                used[idx] = torch.where(better, it + 1, used[idx])
                if early_stop:
                    active[idx] = better
            if self.spec.rank == 0 or it + 1 == num_iters or not bool(active.any()):
                break
            if self.iterative:
                vectors = gram_basis(svd[0], svd[2])
                if basis is None:
                    basis = vectors.new_zeros(n_units, *vectors.shape[1:])
                    values = svd[1].new_zeros(n_units, self.spec.rank)
                basis[idx], values[idx] = vectors, svd[1]
            target[idx] = ws[idx] - main_q
        return best[0], best[1], best[2], best[3], used


# ----------------------------------------------------------------------------- building layers


class SharedInputLinear(QuantLinear):
    """A layer of a unit that reads one input (fused q/k/v) other than the unit's first: its
    smoothing vector and down-projection are the first layer's, stored and counted there, so
    :meth:`bits` leaves them out (``shared_bits``)."""

    shared_bits: int = 0

    def bits(self) -> int:
        return super().bits() - self.shared_bits


def shared_part_bits(q: QuantLinear) -> int:
    """Bits of what the layers of one input share: the smoothing vector and the down-projection."""
    total = SMOOTH_BITS * q.in_features if q.smooth is not None else 0
    if q.branch is not None:
        total += q.branch.weight_format.bits(tuple(q.branch.down.shape))
    return total


def build_layers(
    batch: Batch,
    smooth: torch.Tensor | None,
    up_q: torch.Tensor | None,
    down_q: torch.Tensor | None,
    res: torch.Tensor,
    method: LowRankMethod,
    spec: BranchSpec,
    rotation: str,
    info: list[dict],
) -> dict[str, QuantLinear]:
    """QuantLinear modules for every layer of ``batch`` (each unit split by its segments). In a
    unit of several layers the first stores the shared smoothing vector and down-projection
    (:class:`SharedInputLinear` for the others), so the layers' bits sum to the unit's."""
    out = {}
    for b, unit in enumerate(batch.units):
        start = 0
        first: QuantLinear | None = None
        for name, layer, size in zip(unit.names, unit.layers, unit.segments, strict=True):
            dtype = layer.weight.dtype
            rows = slice(start, start + size)
            start += size
            branch = None
            if up_q is not None:
                branch = LowRankBranch(
                    down_q[b].to(dtype), up_q[b, rows].to(dtype), spec.weight_format, spec.act_format,
                    spec.mid_format, rotation=rotation,
                )
            cls = QuantLinear if first is None else SharedInputLinear
            q = cls.from_layer(
                layer, method.weight_format, method.act_format, weight=res[b, rows],
                smooth=None if smooth is None else smooth[b], branch=branch,
            )
            shared = {}
            if len(unit.names) > 1:
                shared = {"shared_with": unit.names, "shared_stored_by": unit.names[0]}
            if first is None:
                first = q
            else:
                q.shared_bits = shared_part_bits(first)
                q.input_key = first.input_key  # same smoothing vector and down-projection: one fused buffer
            out[name] = set_info(q, **info[b], **shared)
    return out


def check_rank(method: LowRankMethod, layers: Mapping[str, nn.Module]) -> None:
    for name, layer in layers.items():
        w = dense_weight(layer)
        if method.rank > min(w.shape):
            raise UserError(
                f"{method.name}: rank {method.rank} exceeds min(out, in) = {min(w.shape)} of layer {name} "
                f"({w.shape[0]}x{w.shape[1]})"
            )
