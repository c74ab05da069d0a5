"""The output error of a layer with a linear branch, from Gram matrices of its calibration rows.

With the smoothing ``s`` fixed (SVDQuant's refinement), the rows' features do not change from
one iterate to the next. With ``x^ = x / s`` rounded to the rows' dtype (as deployed),
``E = Qa(x^) - x^`` (the activations' quantization error) and ``R = x - x^ s`` (the rounding
of the division), the output error of an iterate ``(Q, U, D)`` (main weight, up- and
down-projection; ``W`` the reference weight, ``W_s = W s``) is

    Qa(x^) Q^T + x^ D^T U^T - x W^T = E Q^T + x^ Delta^T - R W^T,   Delta = Q + U D - W_s,

whose squared norm is a quadratic form in ``(Q, Delta, W)`` over the six ``n x n`` Gram
blocks of ``(E, x^, R)``. Each term is error-sized, so nothing large cancels (the Gram of
``(Qa(x^), x^, x)`` loses three digits to cancellation at a 0.1 % output error). :class:`RowGram`
accumulates the blocks in one pass over the rows: on a GPU, 16-bit products (``E`` and ``x^``
are exact in the rows' 16-bit dtype; ``R`` is scaled by 2^12 first) with float32 accumulation
over chunks of CHUNK_ROWS rows, summed in float64; on the CPU, float64 products. An iterate
then costs three float64 ``M x n x n`` products instead of a pass over all rows. The value is
the exact objective of the quantities the per-row path
(:func:`~ptqbench.smoothing.streamed_sq_error`) rounds on the way (the 16-bit outputs and
branch intermediate): it agrees with a float64 per-row evaluation to 1e-11 on the CPU and to
about 5e-6 on an H200, whose tensor cores accumulate float32 more coarsely than IEEE rounding.

It applies when the branch is linear in ``x^`` (no intermediate format; branch activations a
cast that leaves ``x^`` unchanged) and the activation format is row-wise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ptqbench.formats import CastFormat, Format
from ptqbench.smoothing import PROFILE, Rows, chunks, quantize_stack, smooth_divisor, tensorwise

# Rows per 16-bit Gram product (float32 accumulation); chunks are summed in float64.
CHUNK_ROWS = 4096
R_SCALE = 2.0**12  # R is about 2^-12 of x: scaled into fp16's normal range before its products
BLOCKS = ("ee", "eh", "hh", "er", "hr", "rr")


def applies(act_format: Format, branch_act: Format | None, mid_format: Format | None, rows_dtype: torch.dtype) -> bool:
    """Whether the Gram objective is exact for these formats: a row-wise activation format and,
    with a branch, no intermediate format and branch activations that are a cast ``x^`` (in
    ``rows_dtype``) passes through unchanged."""
    if tensorwise(act_format):
        return False
    if branch_act is None:
        return True
    if mid_format is not None or not isinstance(branch_act, CastFormat):
        return False
    return branch_act.torch_dtype in (rows_dtype, torch.float32)


def _features(
    x: torch.Tensor, s: torch.Tensor, act_format: Format, dtype: torch.dtype, tensor_cores: bool
) -> dict[str, torch.Tensor]:
    """``E``, ``x^`` and ``R`` (scaled by R_SCALE) of rows ``x[B, c, n]`` as the per-row path
    computes them (``x^`` rounded to the rows' dtype, every product's operand to ``dtype``): in
    the rows' 16-bit dtype for tensor-core products (``dtype`` is then that dtype), else float64."""
    x_hat = (x / smooth_divisor(s, x.dtype)[:, None, :]).to(x.dtype)
    xq = quantize_stack(act_format, x_hat).to(dtype)
    if tensor_cores:
        e = xq - x_hat  # exact: a quantized value and its input are within a step of each other
        r = ((x.float() - x_hat.float() * s[:, None, :]) * R_SCALE).to(x.dtype)
        return {"e": e, "h": x_hat, "r": r}
    xh = x_hat.to(dtype).double()
    r = (x.to(dtype).double() - xh * s[:, None, :].double()) * R_SCALE
    return {"e": xq.double() - xh, "h": xh, "r": r}


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T b`` per leading index, float64 (16-bit inputs: tensor-core products, float32 sums)."""
    if a.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(a.mT, b, out_dtype=torch.float32).double()
    return a.mT @ b


@dataclass(eq=False)
class RowGram:
    """What the objective needs of ``B`` layers' rows for fixed smoothings (float64).

    ``ee``, ``eh``, ``hh``: ``[B, n, n]`` Gram blocks of ``E`` and ``x^``; ``we = W G_re``,
    ``wh = W G_rh``: ``[B, M, n]``; ``ww = <W G_rr, W>``: ``[B]``; ``ws``: ``W_s``; ``W`` and
    ``s`` as the products see them (rounded to the score ``dtype``).
    """

    ee: torch.Tensor
    eh: torch.Tensor
    hh: torch.Tensor
    we: torch.Tensor
    wh: torch.Tensor
    ww: torch.Tensor
    ws: torch.Tensor
    dtype: torch.dtype

    @classmethod
    @torch.no_grad()
    def build(
        cls, rows: Rows, s: torch.Tensor, weight: torch.Tensor, act_format: Format, dtype: torch.dtype
    ) -> RowGram:
        """One pass over ``rows``: ``s[B, n]`` the smoothing of each layer (16-bit values),
        ``weight[B, M, n]`` (float32) the reference, ``dtype`` the score dtype."""
        n_layers, _, n = weight.shape
        acc = {k: torch.zeros(n_layers, n, n, dtype=torch.float64, device=weight.device) for k in BLOCKS}
        for lo, hi in chunks(rows.count, CHUNK_ROWS):
            x = rows.chunk(lo, hi, dtype=None)
            tensor_cores = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.dtype == dtype
            with PROFILE.stage("quantize"):
                f = _features(x, s, act_format, dtype, tensor_cores)
            with PROFILE.stage("products"):
                for key in BLOCKS:
                    acc[key] += _gram(f[key[0]], f[key[1]])
        w = weight.to(dtype).double()
        we, wh = w @ (acc["er"].mT / R_SCALE), w @ (acc["hr"].mT / R_SCALE)
        ww = _dot(w @ (acc["rr"] / R_SCALE**2), w)
        return cls(acc["ee"], acc["eh"], acc["hh"], we, wh, ww, w * s.double()[:, None, :], dtype)

    def take(self, index: torch.Tensor) -> RowGram:
        """The objective of layers ``index`` alone."""
        if len(index) == len(self.ww):
            return self
        fields = ("ee", "eh", "hh", "we", "wh", "ww", "ws")
        return replace(self, **{k: getattr(self, k)[index] for k in fields})

    @torch.no_grad()
    def sq_error(
        self, main_q: torch.Tensor, up_q: torch.Tensor | None = None, down_q: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``||Qa(x^) Q^T + x^ D^T U^T - x W^T||^2`` per layer (float64) for ``main_q[B, M, n]``
        and the branch ``up_q[B, M, r]``, ``down_q[B, r, n]`` (or none), rounded to the score
        dtype as the per-row products see them."""
        q = main_q.to(self.dtype).double()
        with PROFILE.stage("error"):
            delta = q - self.ws
            if up_q is not None:
                delta = delta + up_q.to(self.dtype).double() @ down_q.to(self.dtype).double()
            quad = _dot(q @ self.ee + 2 * (delta @ self.eh.mT), q) + _dot(delta @ self.hh, delta)
            return quad - 2 * _dot(self.we, q) - 2 * _dot(self.wh, delta) + self.ww


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a, b>`` (sum of the elementwise product) per leading index."""
    return (a * b).sum((-2, -1))
