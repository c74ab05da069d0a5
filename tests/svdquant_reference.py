"""An independent re-derivation of SVDQuant as deepcompressor runs it (for the parity tests only).

Written from the paper (Li et al., arXiv 2411.05007) and from the algorithm that deepcompressor's
``calib/smooth.py``, ``calib/lowrank.py`` and ``nn/patch/lowrank.py`` implement
(mit-han-lab/deepcompressor 69f3473), not from ptqbench's method code; only the number formats
(``Format.quantize``, tested against torchao elsewhere) come from ptqbench. A *group* is one
layer, or the q/k/v layers of one attention fused (``low_rank.exclusive: false``): their weights
are stacked along the output dimension, they share the smoothing vector and the down-projection
``R``, and each keeps its own rows of ``L``.

1. Smoothing (``smooth.proj``: AbsMax spans, ``beta = -2``, ``num_grids``): candidates (0, 0),
   (a, 0), (a, 1 - a) for a = k / num_grids; ``s = max|X|^a / max|W|^b`` with ``max|W|`` over the
   stacked group; zero scales become 1 and a vector with any NaN/inf becomes all ones
   (``get_smooth_scale``). Each candidate is scored by the squared output error summed over the
   group, with the rank-r branch (one SVD of ``W * s``) and weight and input quantization in
   place; a later candidate with an equal error wins (``_update_best``: ``e <= b``).
2. Low-rank (``wgts.low_rank``, ``compensate: false``): iterate k takes the SVD of
   ``W^ - Qw_{k-1}`` (``Qw_0 = 0``) in float64, ``L = U S``, ``R = V^T``; the residual
   ``W^ - L R`` is quantized layer by layer; an iterate becomes the best when its error is ``<=``
   the best one's, and with ``early_stop`` the first worse iterate ends the loop.
3. The layer computes ``y = Qa(x / s) Q1(W^ - L R)^T + (x / s) R^T L^T``.

``dtype`` is the working precision: float64, or float32 as deepcompressor's ``develop_dtype``
(its SVD stays float64). The stored smoothing vector is 16-bit (ptqbench counts it at 16 bits), so
it is rounded to ``s_dtype`` before use; the branch is kept in ``branch_dtype`` (the model's dtype
in deepcompressor; None: the working precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqbench.formats import Format


def grid(num_grids: int) -> list[tuple[float, float]]:
    alphas = [k / num_grids for k in range(1, num_grids)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in alphas] + [(a, 1.0 - a) for a in alphas]


def smooth_scale(x_span: torch.Tensor, w_span: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """deepcompressor's smoothing scale of one (alpha, beta) pair, in float64."""
    if alpha == 0 and beta == 0:
        return torch.ones_like(x_span, dtype=torch.float64)
    s = x_span.double().pow(alpha)
    if beta > 0:
        s = s / w_span.double().pow(beta)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s if bool(torch.isfinite(s).all()) else torch.ones_like(s)


@dataclass(frozen=True)
class Reference:
    """SVDQuant for one group of layers reading the same input rows."""

    weight_format: Format
    act_format: Format
    rank: int = 32
    num_grids: int = 20
    num_iters: int = 100
    early_stop: bool = True
    dtype: torch.dtype = torch.float64
    s_dtype: torch.dtype = torch.bfloat16
    branch_dtype: torch.dtype | None = None

    def cast(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``t`` rounded to ``dtype`` (if given), in the working precision."""
        return (t if dtype is None else t.to(dtype)).to(self.dtype)

    def quantize(self, fmt: Format, t: torch.Tensor) -> torch.Tensor:
        """Fake quantization along the last dim with a ptqbench format (of the float32 values)."""
        return self.cast(fmt.quantize(t.float()))

    def branch(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``L = U S``, ``R = V^T`` of the top-``rank`` float64 SVD of ``target``."""
        u, sv, vh = torch.linalg.svd(target.double(), full_matrices=False)
        up = u[:, : self.rank] * sv[: self.rank]
        return self.cast(up, self.branch_dtype), self.cast(vh[: self.rank], self.branch_dtype)

    def residual(self, ws: torch.Tensor, up: torch.Tensor, down: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """``Q1(W^ - L R)``, each layer of the group quantized on its own."""
        res = ws - up @ down
        return torch.cat([self.quantize(self.weight_format, part) for part in res.split(sizes, 0)], 0)

    def output(
        self, x: torch.Tensor, s: torch.Tensor, main: torch.Tensor, up: torch.Tensor, down: torch.Tensor
    ) -> torch.Tensor:
        """``Qa(x / s) main^T + (x / s) R^T L^T`` (no bias): the branch reads the unquantized
        smoothed input."""
        x_hat = self.cast(x) / s
        branch_in = self.cast(x_hat, self.branch_dtype)
        return self.quantize(self.act_format, x_hat) @ main.T + (branch_in @ down.T) @ up.T

    def error(self, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, *parts: torch.Tensor) -> float:
        """Squared output error of the whole group (its outputs side by side) on rows ``x``."""
        return float((x @ w.T - self.output(x, s, *parts)).double().pow(2).sum())

    def search(
        self, x: torch.Tensor, absmax: torch.Tensor, w: torch.Tensor, sizes: list[int]
    ) -> tuple[int, torch.Tensor]:
        """Index of the winning pair and its 16-bit smoothing vector."""
        w_span = w.abs().amax(0)
        best = None
        for i, (a, b) in enumerate(grid(self.num_grids)):
            s = self.cast(smooth_scale(absmax, w_span, a, b), self.s_dtype)
            ws = w * s
            up, down = self.branch(ws)
            err = self.error(x, w, s, self.residual(ws, up, down, sizes), up, down)
            if best is None or err <= best[0]:
                best = (err, i, s)
        return best[1], best[2]

    def refine(self, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, sizes: list[int]) -> tuple[int, tuple]:
        """1-based index of the kept iterate and its ``(Q1(residual), L, R)`` for the group."""
        ws = w * s
        target, best = ws, None
        for it in range(1, self.num_iters + 1):
            up, down = self.branch(target)
            main = self.residual(ws, up, down, sizes)
            err = self.error(x, w, s, main, up, down)
            if best is None or err <= best[0]:
                best = (err, it, (main, up, down))
            elif self.early_stop:
                break
            target = ws - main
        return best[1], best[2]

    def run(self, x: torch.Tensor, absmax: torch.Tensor, weights: list[torch.Tensor]) -> list[Layer]:
        """Search and refine a group of layers (``weights`` [out, in] each) reading rows ``x``."""
        x = self.cast(x)
        w = torch.cat([self.cast(t.detach()) for t in weights], 0)
        sizes = [int(t.shape[0]) for t in weights]
        pick, s = self.search(x, absmax, w, sizes)
        it, (main, up, down) = self.refine(x, w, s, sizes)
        pair = grid(self.num_grids)[pick]
        return [
            Layer(self, pair, it, s, m, u, down) for m, u in zip(main.split(sizes, 0), up.split(sizes, 0), strict=True)
        ]


@dataclass(frozen=True, eq=False)
class Layer:
    """One layer of a re-derived group: the chosen pair, the kept iterate and its parts."""

    ref: Reference
    pair: tuple[float, float]
    iteration: int
    smooth: torch.Tensor
    main: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def effective_weight(self) -> torch.Tensor:
        """``(Q1(W^ - L R) + L R) / s`` in float64."""
        return ((self.main + self.up @ self.down) / self.smooth).double()

    def relative_output_error(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
        """``||y - y_q|| / ||y||`` on rows ``x`` with ``y = x W^T + b`` (float64)."""
        x, w = x.double(), weight.detach().double()
        y = x @ w.T + (0 if bias is None else bias.detach().double())
        diff = x @ w.T - self.ref.output(x, self.smooth, self.main, self.up, self.down).double()
        return float(torch.linalg.norm(diff) / torch.linalg.norm(y))
