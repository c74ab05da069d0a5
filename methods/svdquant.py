"""SVDQuant (Li et al., ICLR 2025; reference code mit-han-lab/deepcompressor).

1. Smoothing ``s_j = max|X_j|^a / max|W_j|^b`` chosen per layer from deepcompressor's grid
   (``num_grids`` 20: (0, 0), (a, 0) and (a, 1 - a) for a = 1/20 .. 19/20, 39 candidates), each
   scored by the layer-output MSE on sampled calibration rows **with** the low-rank branch and
   activation quantization in place (by the weight error when only abs-max statistics exist).
2. A rank-``r`` branch from the SVD of the smoothed weight ``W^ = U S V^T``: ``L = U S``,
   ``R = V^T``; the residual ``W^ - L R`` is quantized with ``Q1``. Refinement as in
   deepcompressor (``num_iters`` 100, early stop; ``num_iters=1`` turns it off): the SVD of
   ``W^ - Q1(W^ - L R)`` again, keeping the iterate with the lowest output error (weight error
   without rows); each layer stops at its first iterate that does not improve.
3. ``y = Qa(x/s) Q1(R_es)^T + (x/s) R^T L^T + b``; the branch reads the unquantized smoothed
   input and stays 16-bit by default.

Without statistics: no smoothing, SVD + quantized residual. ``share_qkv`` shares one
down-projection across ``to_q``/``to_k``/``to_v`` layers of one attention module that read the
same input (with statistics: identical input statistics; without: same parent module); each
layer still stores (and counts) its own copy of the shared factor.

Same-shape layers are batched: SVDs, the candidate search and the refinement run on stacked
``[B, out, in]`` tensors. The truncated SVD is a seeded randomized range finder (power
iterations, Cholesky QR, Rayleigh-Ritz) unless the exact SVD is cheaper (:func:`resolve_svd`; ``svd`` field
``auto``; ``exact`` and ``randomized`` force one); on real weights its reconstruction error is
within 0.04% of the exact SVD's (MiniLM, ranks 32 and 62).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ptqbench.errors import UserError
from ptqbench.formats import Format
from ptqbench.layers import LowRankBranch, QuantLinear, dense_weight
from ptqbench.method import LowRankMethod, register_method
from ptqbench.methods.smoothquant import (
    MAX_BATCH_ELEMENTS,
    chunks,
    output_sq_error,
    quantize_stack,
    round_smooth,
    set_info,
    smooth_dtype,
    smooth_scale,
)
from ptqbench.stats import LayerStats, StatsSpec

SVD_KINDS = ("auto", "exact", "randomized")
QKV = ("to_q", "to_k", "to_v")
Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- truncated SVD


def _orthonormalize(y: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """Orthonormal columns spanning ``y[..., m, k]``: Cholesky QR (batched and cheap on GPUs).

    The k x k Gram factorization runs in float64 (with a tiny ridge, so rank-deficient inputs
    stay finite); the large products stay in ``y``'s dtype. Two passes restore orthogonality
    to working precision.
    """
    eye = torch.eye(y.shape[-1], dtype=torch.float64, device=y.device)
    for _ in range(passes):
        top = y.abs().amax((-2, -1), keepdim=True)
        y = y / torch.where(top > 0, top, torch.ones_like(top))  # well-scaled Gram; zero stays zero
        g = (y.mT @ y).double()
        ridge = g.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * 1e-10 + 1e-30
        c, _ = torch.linalg.cholesky_ex(g + ridge * eye)
        inv = torch.linalg.solve_triangular(c, eye.expand_as(c), upper=False)  # C^-1
        y = y @ inv.mT.to(y.dtype)
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


def truncated_svd(
    w: torch.Tensor, rank: int, method: str = "exact", seed: int = 0, niter: int = 6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of each matrix in ``w[..., m, n]`` (float32):
    ``U[..., m, r]``, ``S[..., r]`` (descending), ``Vh[..., r, n]``.

    ``exact``: ``torch.linalg.svd``. ``randomized``: a range finder with ``2 r`` columns from a
    seeded Gaussian shared by the whole batch (so a layer's result does not depend on its
    batch), ``niter`` power iterations, then Rayleigh-Ritz (a small float64 eigenproblem).
    """
    w = w.float()
    if method == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[..., :rank], s[..., :rank], vh[..., :rank, :]
    if method != "randomized":
        raise UserError(f"svd: unknown method {method!r} (valid: {', '.join(SVD_KINDS)})")
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

    def output(self, x_hat: torch.Tensor, up_q: torch.Tensor, down_q: torch.Tensor) -> torch.Tensor:
        """``Qmid(Qa2(x_hat) down_q^T) up_q^T``, as :class:`LowRankBranch` computes it."""
        h = quantize_stack(self.act_format, x_hat) @ down_q.mT
        if self.mid_format is not None:
            h = quantize_stack(self.mid_format, h)
        return h @ up_q.mT


# ----------------------------------------------------------------------------- batching


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

    ``rows[B, N, n]`` are sampled inputs, ``xtx`` is ``X^T X / count`` ([B, n, n] or [B, n]).
    """

    units: list[Unit]
    weight: torch.Tensor
    absmax: torch.Tensor | None
    rows: torch.Tensor | None
    xtx: torch.Tensor | None
    smooth_dtype: torch.dtype

    @property
    def segments(self) -> list[int]:
        return self.units[0].segments

    def __len__(self) -> int:
        return len(self.units)


def make_units(
    layers: Mapping[str, nn.Module], stats: Mapping[str, LayerStats] | None, share_qkv: bool = False
) -> list[Unit]:
    """One unit per layer; with ``share_qkv``, q/k/v layers of one module that read the same
    input (identical statistics, or the same parent when there are none) form one unit."""
    get = (lambda name: None) if stats is None else stats.get
    units: list[Unit] = []
    families: dict[str, list[str]] = {}
    for name in layers:
        parent, _, leaf = name.rpartition(".")
        if share_qkv and leaf in QKV:
            families.setdefault(parent, []).append(name)
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
    most ``MAX_BATCH_ELEMENTS`` weight elements."""
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
                    _stack(part, device, lambda st: st.rows) if n_rows else None,
                    _stack(part, device, lambda st: st.xtx / max(st.count, 1)) if xtx_dim else None,
                    smooth_dtype(part[0].layers[0]),
                )
            )
    return batches


def _stack(units: list[Unit], device: torch.device, get: Callable[[LayerStats], torch.Tensor]) -> torch.Tensor:
    return torch.stack([get(u.stats).to(device).float() for u in units])


# ----------------------------------------------------------------------------- search and fit


def smoothing_grid(num_grids: int) -> list[tuple[float, float]]:
    """deepcompressor's candidates for ``beta = -2``: (0, 0), (a, 0), (a, 1 - a), a = k / num_grids."""
    choices = [i / num_grids for i in range(1, num_grids)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in choices] + [(a, 1.0 - a) for a in choices]


@dataclass(frozen=True, eq=False)
class Fitter:
    """Fits and scores branches for stacked smoothed weights (shared by SVDQuant and LoRaQ)."""

    spec: BranchSpec
    weight_format: Format
    act_format: Format
    svd: str
    seed: int

    def fit(
        self, ws: torch.Tensor, target: torch.Tensor, segments: list[int]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Branch from the top-r SVD of ``target``; returns quantized factors (None at rank 0),
        the residual ``ws - up_q down_q`` and its quantized version."""
        if self.spec.rank == 0:
            return None, None, ws, quantize_stack(self.weight_format, ws, segments)
        method = resolve_svd(self.svd, self.spec.rank, tuple(target.shape), target.device)
        u, s, vh = truncated_svd(target, self.spec.rank, method, self.seed)
        up_q, down_q = self.spec.quantize(*self.spec.factors(u, s, vh), segments)
        res = ws - up_q @ down_q
        return up_q, down_q, res, quantize_stack(self.weight_format, res, segments)

    def error(
        self,
        w: torch.Tensor,
        s: torch.Tensor,
        main_q: torch.Tensor,
        up_q: torch.Tensor | None,
        down_q: torch.Tensor | None,
        x: torch.Tensor | None,
        y: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-matrix squared output error on rows ``x`` (``y = x w^T``), activations quantized
        as deployed; without rows, the squared weight error in the original (unsmoothed) space."""
        if x is not None:
            x_hat = x / s[..., None, :]
            extra = None if up_q is None else self.spec.output(x_hat, up_q, down_q)
            return output_sq_error(x_hat, y, main_q, self.act_format, extra)
        w_eff = main_q if up_q is None else main_q + up_q @ down_q
        return (w - w_eff / s[..., None, :]).pow(2).sum((-2, -1))

    def search(self, batch: Batch, pairs: list[tuple[float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The smoothing of each unit with the lowest error over ``pairs`` (rounded to 16 bits)
        and the index of the winning pair, per unit."""
        w = batch.weight
        n_units, m, n = w.shape
        dev = w.device
        a = torch.tensor([p[0] for p in pairs], dtype=torch.float32, device=dev)[None, :, None]
        b = torch.tensor([p[1] for p in pairs], dtype=torch.float32, device=dev)[None, :, None]
        scales = smooth_scale(batch.absmax[:, None, :], w.abs().amax(-2)[:, None, :], a, b)
        cand = round_smooth(scales, batch.smooth_dtype)
        n_cand = len(pairs)
        x = batch.rows
        y = None if x is None else x @ w.mT
        per_item = m * n + (0 if x is None else x.shape[1] * (n + m))
        errors = torch.empty(n_units * n_cand, dtype=torch.float32, device=dev)
        for lo, hi in chunks(n_units * n_cand, MAX_BATCH_ELEMENTS // per_item):
            idx = torch.arange(lo, hi, device=dev)
            ui, ci = idx // n_cand, idx % n_cand
            s = cand[ui, ci]
            w_items = w[ui]
            ws = w_items * s[:, None, :]
            up_q, down_q, _, main_q = self.fit(ws, ws, batch.segments)
            errors[lo:hi] = self.error(
                w_items, s, main_q, up_q, down_q, None if x is None else x[ui], None if y is None else y[ui]
            )
        best = errors.view(n_units, n_cand).argmin(1)
        return cand[torch.arange(n_units, device=dev), best], best

    def refine(
        self, batch: Batch, ws: torch.Tensor, s: torch.Tensor, num_iters: int, early_stop: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """deepcompressor's iterations: branch from SVD(ws - Q1(previous residual)); keeps each
        unit's best iterate. Returns up_q, down_q, residual, error and iterations used per unit."""
        x = batch.rows
        y = None if x is None else x @ batch.weight.mT
        target = ws
        best = None
        for it in range(max(1, num_iters)):
            up_q, down_q, res, main_q = self.fit(ws, target, batch.segments)
            err = self.error(batch.weight, s, main_q, up_q, down_q, x, y)
            if best is None:
                best = [up_q, down_q, res, err]
                used = torch.ones_like(err, dtype=torch.long)
                active = torch.ones_like(err, dtype=torch.bool)
            else:
                better = active & (err < best[3])
                for i, new in enumerate((up_q, down_q, res, err)):
                    if new is not None:
                        shape = (-1,) + (1,) * (new.dim() - 1)
                        best[i] = torch.where(better.view(shape), new, best[i])
                used = torch.where(better, it + 1, used)
                active = active & better if early_stop else active
            if self.spec.rank == 0 or it + 1 == num_iters or not bool(active.any()):
                break
            target = ws - main_q
        return best[0], best[1], best[2], best[3], used


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
    """QuantLinear modules for every layer of ``batch`` (each unit split by its segments)."""
    out = {}
    for b, unit in enumerate(batch.units):
        start = 0
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
            q = QuantLinear.from_layer(
                layer, method.weight_format, method.act_format, weight=res[b, rows],
                smooth=None if smooth is None else smooth[b], branch=branch,
            )
            out[name] = set_info(q, **info[b], **({"shared_with": unit.names} if len(unit.names) > 1 else {}))
    return out


def check_rank(method: LowRankMethod, layers: Mapping[str, nn.Module]) -> None:
    for name, layer in layers.items():
        w = dense_weight(layer)
        if method.rank > min(w.shape):
            raise UserError(
                f"{method.name}: rank {method.rank} exceeds min(out, in) = {min(w.shape)} of layer {name} "
                f"({w.shape[0]}x{w.shape[1]})"
            )


def pair_label(pair: tuple[float, float]) -> str:
    return f"a={pair[0]:g},b={pair[1]:g}"


# ----------------------------------------------------------------------------- the method


@register_method("svdquant")
@dataclass(frozen=True)
class SVDQuant(LowRankMethod):
    """SVDQuant: smoothing searched with the branch in place, 16-bit SVD branch, quantized residual.

    ``smoothing`` (with statistics) searches ``2 num_grids - 1`` (a, b) pairs on ``rows`` sampled
    inputs; ``num_iters`` / ``early_stop`` refine the branch; ``share_qkv`` shares the
    down-projection of q/k/v layers reading one input; ``svd``: auto | exact | randomized
    (``seed`` seeds the randomized range finder).
    """

    smoothing: bool = True
    num_grids: int = 20
    rows: int = 256
    num_iters: int = 100
    early_stop: bool = True
    share_qkv: bool = False
    svd: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_grids < 2:
            raise UserError(f"svdquant: num_grids must be >= 2, got {self.num_grids}")
        if self.rows < 1:
            raise UserError(f"svdquant: rows must be >= 1, got {self.rows}")
        if self.num_iters < 1:
            raise UserError(f"svdquant: num_iters must be >= 1, got {self.num_iters}")
        if self.svd not in SVD_KINDS:
            raise UserError(f"svdquant: svd {self.svd!r} is not valid (valid: {', '.join(SVD_KINDS)})")

    @property
    def smooths(self) -> bool:
        return self.smoothing

    def stats_spec(self) -> StatsSpec:
        if not self.smoothing:
            return StatsSpec()
        return StatsSpec(absmax=True, rows=self.rows)

    def branch_spec(self) -> BranchSpec:
        return BranchSpec(self.rank, self.branch_format, self.branch_act_format, None, "us")

    @torch.no_grad()
    def quantize_layers(
        self,
        layers: Mapping[str, nn.Module],
        stats: Mapping[str, LayerStats] | None = None,
        progress: Progress | None = None,
    ) -> dict[str, QuantLinear]:
        check_rank(self, layers)
        units = make_units(layers, stats if self.smoothing else None, self.share_qkv)
        spec = self.branch_spec()
        fitter = Fitter(spec, self.weight_format, self.act_format, self.svd, self.seed)
        pairs = smoothing_grid(self.num_grids)
        done: dict[str, QuantLinear] = {}
        for batch in make_batches(units, use_rows=True):
            if batch.absmax is not None:
                smooth, pick = fitter.search(batch, pairs)
                how = "searched on output MSE" if batch.rows is not None else "searched on weight error (no rows)"
                chosen = [pair_label(pairs[int(i)]) for i in pick.tolist()]
            else:
                smooth, how, chosen = None, "none: no activation statistics", [None] * len(batch)
            s = torch.ones_like(batch.weight[:, 0]) if smooth is None else smooth
            ws = batch.weight * s[:, None, :]
            up_q, down_q, res, _, used = fitter.refine(batch, ws, s, self.num_iters, self.early_stop)
            info = [
                {"smoothing": how, "smooth_pair": c, "best_iteration": int(u)}
                for c, u in zip(chosen, used.tolist(), strict=True)
            ]
            done.update(build_layers(batch, smooth, up_q, down_q, res, self, spec, "identity", info))
            if progress:
                for unit in batch.units:
                    for name in unit.names:
                        progress(name)
        return {name: done[name] for name in layers}
