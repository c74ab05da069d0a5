"""LoRaQ (Bouquet et al. 2026, arXiv 2604.18117): a quantized low-rank branch, optimized data-free.

Each layer is ``y = Qa(x/s) Q1(P)^T + Qmid(Qa2(x/s) Q2(Omega^T R)^T) Q2(L Omega)^T + b`` with
``P = W^ - Q2(L Omega) Q2(Omega^T R)``, ``W^ = W * s`` (SVDQuant-style smoothing from
statistics when given) and ``Omega`` an r x r rotation (a randomized block-diagonal Hadamard for
any rank by default, see :mod:`ptqbench.rotation`; the branch records what was built).

``L`` and ``R`` start from a truncated SVD (of ``W^``, or of the error ``W^ - Q1(W^)``), split
``U S^1/2``, ``S^1/2 V^T``, and are optimized by Adam on fp32 masters, keeping each layer's best
iterate, for at most ``steps`` steps with an early stop when converged (:class:`Schedule`).
Objectives: ``weight`` (the paper's data-free ``||W^ - Q1(P) - B||_F^2``),
``activation`` (the same error weighted by the calibration ``X^T X``, full or diagonal) and
``output`` (layer-output error on sampled rows with activation quantization in place).
Gradients pass straight through ``Q2`` (and the intermediate quantizer) while ``Q1(P)`` is
treated as piecewise constant: an identity straight-through estimate through ``Q1`` makes the
gradient of the weight objective vanish (methods.md), whereas holding ``Q1(P)`` fixed pulls the
residual onto ``Q1``'s grid. Gradients are computed in closed form, without autograd.

Same-shape layers are optimized together: weights stacked ``[B, out, in]``, one Adam over the
stacked ``[B, out, r]`` and ``[B, r, in]`` factors, batched fake quantization, best iterates
tracked with ``torch.where``; no Python loop over layers inside the step loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ptqbench.errors import UserError
from ptqbench.formats import Format, IntFormat, MXFormat
from ptqbench.layers import QuantLinear
from ptqbench.lowrank import (
    SVD_KINDS,
    Batch,
    BranchSpec,
    Fitter,
    build_layers,
    check_rank,
    make_batches,
    make_units,
    resolve_svd,
    truncated_svd,
)
from ptqbench.method import LowRankMethod, format_field, register_method
from ptqbench.rotation import ROTATIONS, get_rotation
from ptqbench.smoothing import pair_label, quantize_stack, round_smooth, smooth_scale, smoothing_grid
from ptqbench.stats import LayerStats, StatsSpec

INITS = ("svd", "error")
OBJECTIVES = ("weight", "activation", "output")
XTX_KINDS = ("full", "diag")
CURVE_POINTS = 40  # points of the downsampled loss curve each layer logs (info["loss_curve"])
CHECK_EVERY = 10  # steps between tests of the stopping rule (each test syncs a GPU)


def is_int_format(fmt: Format) -> bool:
    """Integer element formats (``int*``, ``mxint*``): the paper's lr is 1e-4 for them."""
    return isinstance(fmt, IntFormat) or (isinstance(fmt, MXFormat) and fmt.is_int)


@dataclass(frozen=True)
class Schedule:
    """Adam's budget: at most ``steps`` steps, stopping early when every layer's best loss improved
    by less than the fraction ``tol`` over the last ``patience`` steps (``patience`` 0: never).

    The lr: ``branch_lr``'s entry for the branch weight format, else ``lr_int`` for integer main
    formats and ``lr_float`` otherwise."""

    steps: int
    lr_int: float
    lr_float: float
    patience: int
    tol: float
    branch_lr: tuple[tuple[str, float], ...] = ()

    def lr(self, weight_format: Format, branch_format: Format) -> float:
        by_branch = dict(self.branch_lr)
        if str(branch_format) in by_branch:
            return by_branch[str(branch_format)]
        return self.lr_int if is_int_format(weight_format) else self.lr_float


# converged: from benchmarks/loraq_convergence.py on real MiniLM layers (384x384 and 384x1536, the
# equal-memory ranks, hadamard, weight objective): the best lr depends on the branch weight format,
# not the main one: INT 8-bit branches want 10-30x the paper's INT lr (1e-4), 4-bit branches 3e-5 to
# 1e-4 whatever the main format (at lr 1e-3 a W4 branch's best iterate is within its first 30 steps).
# Mean relative weight error,
# paper schedule (300 steps) -> this lr at 1500 steps (1000 mxint8; 600 W6 and W4): int8_g64 branch
# 0.0524 -> 0.0475 (3e-3: 0.0470 kept, but one layer's loss diverges after step 220; 1e-2: 0.0616),
# mxint8 0.0578 -> 0.0487 (1e-2: 0.0490), mxfp8_e4m3 0.0481 -> 0.0466
# (3e-3: 0.0469), int6_g64 0.0488 (1e-4) -> 0.0479 (1e-3: 0.0503), mxfp6_e2m3 0.0425 -> 0.0420,
# mxint6 0.0524 -> 0.0507, int4_g64 W4A8 0.0518 -> 0.0510, mxfp4 W4A8 0.0516 -> 0.0465, mxint4 W4A8
# 0.0559 -> 0.0553. The early stop (100, 1e-3) ends within 1% of the 1500-step error at about half
# the steps for mxfp8 (790 steps; int8_g64: 1100), at 430 / 590 for int4_g64 / mxfp4 W4A8;
# mxint8 and mxint4 W4A8 still gain at 1000 / 600 steps (the 2000-step cap bounds them).
# Unmeasured branch formats keep the paper's lr. paper: lr 1e-3 FP / 1e-4 INT main, 300 steps, no stop.
SCHEDULES = {
    "converged": Schedule(
        steps=2000, lr_int=1e-4, lr_float=1e-3, patience=100, tol=1e-3,
        branch_lr=(("int8_g64", 1e-3), ("mxint8", 3e-3), ("mxfp8_e4m3", 1e-3), ("int6_g64", 1e-4),
                   ("mxint6", 1e-3), ("mxfp6_e2m3", 1e-3), ("int4_g64", 3e-5), ("mxint4", 1e-4), ("mxfp4", 3e-5)),
    ),
    "paper": Schedule(steps=300, lr_int=1e-4, lr_float=1e-3, patience=0, tol=0.0),
}
DEFAULT_STEPS = SCHEDULES["converged"].steps
Progress = Callable[[str], None]


@dataclass
class Trace:
    """What the optimization did, per layer: objective at init and at the best iterate, best step,
    the steps run and every iterate's loss (``history`` [steps + 1, B])."""

    init: torch.Tensor
    best: torch.Tensor
    reference: torch.Tensor
    best_step: torch.Tensor
    history: torch.Tensor

    @property
    def steps(self) -> int:
        """Adam steps taken (the init is iterate 0)."""
        return self.history.shape[0] - 1

    def relative(self) -> tuple[list[float], list[float]]:
        """sqrt(loss / reference) at init and at the best iterate, per layer."""
        ref = self.reference.clamp_min(1e-30)
        return (self.init / ref).sqrt().tolist(), (self.best / ref).sqrt().tolist()

    def layer_info(self, index: int) -> dict[str, Any]:
        """What layer ``index`` logs: relative objective at init and best, best step, steps run,
        the final iterate's relative objective and the downsampled curve."""
        init, best = self.relative()
        final = float((self.history[-1, index] / self.reference[index].clamp_min(1e-30)).sqrt())
        return {"objective_rel_init": init[index], "objective_rel_best": best[index],
                "objective_rel_final": final, "best_step": int(self.best_step[index]),
                "steps_run": self.steps, "loss_curve": self.curve(index)}

    def curve(self, index: int, points: int = CURVE_POINTS) -> list[list[float]]:
        """``[[step, sqrt(loss / reference)], ...]`` of layer ``index`` at about ``points``
        log-spaced steps (always the first and the last), for plotting loss vs step."""
        n = self.steps
        picks = torch.unique(torch.logspace(0, math.log10(n + 1), max(points, 2), dtype=torch.float64).round() - 1)
        ref = float(self.reference[index].clamp_min(1e-30))
        rel = (self.history[:, index].double().cpu() / ref).sqrt()
        return [[int(k), float(f"{rel[int(k)]:.6g}")] for k in picks.clamp(0, n).long().unique().tolist()]


@dataclass(frozen=True, eq=False)
class Objective:
    """Loss and its gradient w.r.t. the quantized factors, for stacked layers.

    ``kind`` weight: ``||E||^2`` with ``E = W^ - Q1(P) - B``; activation: ``tr(E C E^T)`` with
    ``C = X^T X / count`` in the smoothed space (``[B, n, n]``) or its diagonal (``[B, n]``);
    output: ``||y - Qa(X^) Q1(P)^T - branch(X^)||^2`` on sampled rows.
    """

    kind: str
    spec: BranchSpec
    weight_format: Format
    act_format: Format
    segments: list[int]
    c: torch.Tensor | None = None
    xa: torch.Tensor | None = None
    x2: torch.Tensor | None = None
    y: torch.Tensor | None = None

    def __call__(
        self, ws: torch.Tensor, up_q: torch.Tensor, down_q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss [B], d loss / d up_q, d loss / d down_q)."""
        p = ws - up_q @ down_q
        main_q = quantize_stack(self.weight_format, p, self.segments)
        if self.kind == "output":
            h = self.x2 @ down_q.mT
            hm = h if self.spec.mid_format is None else quantize_stack(self.spec.mid_format, h)
            diff = self.y - self.xa @ main_q.mT - hm @ up_q.mT
            g = -2.0 * diff
            return diff.pow(2).sum((-2, -1)), g.mT @ hm, (g @ up_q).mT @ self.x2
        e = p - main_q
        if self.kind == "weight":
            ge = e
        elif self.c.dim() == 2:
            ge = e * self.c[:, None, :]
        else:
            ge = e @ self.c
        return (e * ge).sum((-2, -1)), -2.0 * ge @ down_q.mT, -2.0 * up_q.mT @ ge

    def reference(self, ws: torch.Tensor) -> torch.Tensor:
        """The loss of a zero approximation (for relative errors)."""
        if self.kind == "output":
            return self.y.pow(2).sum((-2, -1))
        if self.kind == "weight":
            return ws.pow(2).sum((-2, -1))
        g = ws * self.c[:, None, :] if self.c.dim() == 2 else ws @ self.c
        return (ws * g).sum((-2, -1))


def converged(best: torch.Tensor, step: int, patience: int, tol: float) -> bool:
    """The stopping rule: every layer's best loss improved by less than the fraction ``tol``
    over the last ``patience`` steps (``best`` [steps + 1, B], running minimum per layer);
    ``patience`` 0 never stops early."""
    if patience <= 0 or step < patience:
        return False
    now, then = best[step], best[step - patience]
    return bool((now >= (1.0 - tol) * then).all())


def optimize(
    ws: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    omega: torch.Tensor,
    objective: Objective,
    steps: int,
    lr: float,
    patience: int = 0,
    tol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, Trace]:
    """Adam on fp32 masters ``left[B, M, r]``, ``right[B, r, n]`` for at most ``steps`` steps,
    stopping early by :func:`converged` (``patience``, ``tol``; tested every ``CHECK_EVERY``
    steps); returns each layer's best
    iterate (the init counts as step 0) and a :class:`Trace` with every iterate's loss."""
    spec = objective.spec
    left, right = left.clone(), right.clone()
    opt = torch.optim.Adam([left, right], lr=lr)
    best_l, best_r = left.clone(), right.clone()
    best = torch.full(ws.shape[:1], float("inf"), device=ws.device)
    best_step = torch.zeros(ws.shape[:1], dtype=torch.long, device=ws.device)
    history = torch.empty(steps + 1, ws.shape[0], device=ws.device)
    running = torch.empty_like(history)
    for step in range(steps + 1):
        up_q, down_q = spec.quantize(left @ omega, omega.T @ right, objective.segments)
        loss, d_up, d_down = objective(ws, up_q, down_q)
        history[step] = loss
        better = loss < best
        best = torch.where(better, loss, best)
        running[step] = best
        best_step = torch.where(better, step, best_step)
        best_l = torch.where(better[:, None, None], left, best_l)
        best_r = torch.where(better[:, None, None], right, best_r)
        if step == steps or (step % CHECK_EVERY == 0 and converged(running, step, patience, tol)):
            break
        left.grad = d_up @ omega.T
        right.grad = omega @ d_down
        opt.step()
    trace = Trace(history[0], best, objective.reference(ws), best_step, history[: step + 1])
    return best_l, best_r, trace


@register_method("loraq")
@dataclass(frozen=True)
class LoRaQ(LowRankMethod):
    """LoRaQ: rotated, quantized low-rank branch optimized data-free (Adam, best iterate kept).

    ``mid_format``: quantizer of the rank-r intermediate; ``"branch_act"`` (default) resolves to
    ``branch_act_format`` at construction, ``None`` leaves it unquantized. ``rotation``:
    hadamard | random | identity. ``init``: svd | error. ``objective``: weight | activation
    (``xtx`` full | diag) | output. ``schedule``: converged | paper (:data:`SCHEDULES`) gives
    the defaults of ``steps`` (the most Adam steps), ``lr`` (by main format: integer or not) and
    the early stop ``patience`` / ``tol``; each set explicitly overrides its schedule's value.
    ``smoothing`` with statistics: ``smooth_alpha`` fixed (a, 1 - a), or None to search the
    SVDQuant grid (``num_grids``) on ``rows`` sampled inputs.
    """

    branch_format: Format = format_field("mxfp8_e4m3")
    branch_act_format: Format = format_field("mxfp8_e4m3")
    mid_format: Format | None = field(default="branch_act", metadata={"format": True})
    rotation: str = "hadamard"
    init: str = "svd"
    objective: str = "weight"
    xtx: str = "full"
    schedule: str = "converged"
    steps: int | None = None
    lr: float | None = None
    patience: int | None = None
    tol: float | None = None
    seed: int = 0
    smoothing: bool = True
    smooth_alpha: float | None = None
    num_grids: int = 20
    rows: int = 256
    svd: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.mid_format, str) and self.mid_format == "branch_act":
            object.__setattr__(self, "mid_format", self.branch_act_format)
        super().__post_init__()
        checks = (
            ("rotation", self.rotation, ROTATIONS),
            ("init", self.init, INITS),
            ("objective", self.objective, OBJECTIVES),
            ("xtx", self.xtx, XTX_KINDS),
            ("svd", self.svd, SVD_KINDS),
            ("schedule", self.schedule, tuple(SCHEDULES)),
        )
        for name, value, valid in checks:
            if value not in valid:
                raise UserError(f"loraq: {name} {value!r} is not valid (valid: {', '.join(valid)})")
        if self.steps is not None and self.steps < 0:
            raise UserError(f"loraq: steps must be >= 0 or null (the schedule's), got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"loraq: lr must be > 0 or null (the schedule's), got {self.lr}")
        if self.patience is not None and self.patience < 0:
            raise UserError(f"loraq: patience must be >= 0 (0: no early stop) or null, got {self.patience}")
        if self.tol is not None and not 0.0 <= self.tol < 1.0:
            raise UserError(f"loraq: tol must be in [0, 1) or null, got {self.tol}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise UserError(f"loraq: smooth_alpha must be in [0, 1] or null (search), got {self.smooth_alpha}")
        if self.num_grids < 2:
            raise UserError(f"loraq: num_grids must be >= 2, got {self.num_grids}")
        if self.rows < 1:
            raise UserError(f"loraq: rows must be >= 1, got {self.rows}")

    @property
    def max_steps(self) -> int:
        """``steps``, or the schedule's."""
        return SCHEDULES[self.schedule].steps if self.steps is None else int(self.steps)

    @property
    def learning_rate(self) -> float:
        """``lr``, or the schedule's for the branch and main formats (:meth:`Schedule.lr`)."""
        if self.lr is not None:
            return float(self.lr)
        return SCHEDULES[self.schedule].lr(self.weight_format, self.branch_format)

    @property
    def stopping(self) -> tuple[int, float]:
        """``(patience, tol)`` of the early stop, explicit values over the schedule's."""
        sched = SCHEDULES[self.schedule]
        return (sched.patience if self.patience is None else int(self.patience),
                sched.tol if self.tol is None else float(self.tol))

    @property
    def smooths(self) -> bool:
        return self.smoothing

    def _uses_rows(self) -> bool:
        return (self.smoothing and self.smooth_alpha is None) or self.objective == "output"

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(
            absmax=self.smoothing,
            rows=self.rows if self._uses_rows() else 0,
            xtx=self.xtx if self.objective == "activation" else "none",
        )

    def label(self) -> str:
        mid = f" mid:{self.mid_format}" if self.mid_format is not None else ""
        patience, tol = self.stopping
        stop = f" stop:{patience}/{tol:g}" if patience else ""
        return f"{super().label()}{mid} {self.objective} {self.max_steps}st lr:{self.learning_rate:g}{stop}"

    @torch.no_grad()
    def quantize_layers(
        self,
        layers: Mapping[str, nn.Module],
        stats: Mapping[str, LayerStats] | None = None,
        progress: Progress | None = None,
    ) -> dict[str, QuantLinear]:
        check_rank(self, layers)
        rotation = get_rotation(self.rotation, self.rank, self.seed)
        spec = BranchSpec(
            self.rank, self.branch_format, self.branch_act_format, self.mid_format, "sqrt", rotation.matrix.float()
        )
        fitter = Fitter(spec, self.weight_format, self.act_format, self.svd, self.seed)
        xtx = self.xtx if self.objective == "activation" else "none"
        done: dict[str, QuantLinear] = {}
        for batch in make_batches(make_units(layers, stats), self._uses_rows(), xtx):
            smooth, info = self._smoothing(batch, fitter)
            s = torch.ones_like(batch.weight[:, 0]) if smooth is None else smooth
            ws = batch.weight * s[:, None, :]
            if self.rank == 0:
                up_q = down_q = None
                res = ws
            else:
                objective, note = self._objective(batch, spec, s)
                omega = spec.rotation.to(ws.device)
                left, right = self._init(ws, batch)
                left, right, trace = optimize(
                    ws, left, right, omega, objective, self.max_steps, self.learning_rate, *self.stopping
                )
                up_q, down_q = spec.quantize(left @ omega, omega.T @ right)
                res = ws - up_q @ down_q
                for i, item in enumerate(info):
                    item.update(objective=note, **trace.layer_info(i))
            for item in info:
                item.update(rotation=rotation.label, rotation_blocks=list(rotation.blocks), init=self.init,
                            schedule=self.schedule, steps=self.max_steps, lr=self.learning_rate)
            done.update(build_layers(batch, smooth, up_q, down_q, res, self, spec, rotation.label, info))
            if progress:
                for unit in batch.units:
                    progress(unit.names[0])
        return {name: done[name] for name in layers}

    def _smoothing(self, batch: Batch, fitter: Fitter) -> tuple[torch.Tensor | None, list[dict]]:
        """SVDQuant-style smoothing (fixed ``(a, 1 - a)`` or the searched grid), when statistics allow."""
        if not self.smoothing:
            return None, [{"smoothing": "off"} for _ in batch.units]
        if batch.absmax is None:
            return None, [{"smoothing": "none: no activation statistics"} for _ in batch.units]
        if self.smooth_alpha is not None:
            a = self.smooth_alpha
            s = smooth_scale(batch.absmax, batch.weight.abs().amax(-2), a, 1.0 - a)
            info = [{"smoothing": "fixed", "smooth_pair": pair_label((a, 1.0 - a))} for _ in batch.units]
            return round_smooth(s, batch.smooth_dtype), info
        pairs = smoothing_grid(self.num_grids)
        smooth, pick = fitter.search(batch, pairs)
        how = "searched on output MSE" if batch.rows is not None else "searched on weight error (no rows)"
        return smooth, [{"smoothing": how, "smooth_pair": pair_label(pairs[int(i)])} for i in pick.tolist()]

    def _objective(self, batch: Batch, spec: BranchSpec, s: torch.Tensor) -> tuple[Objective, str]:
        """The configured objective, or the weight objective when its statistics are missing."""
        kind, note = self.objective, self.objective
        if kind == "activation" and batch.xtx is None:
            kind, note = "weight", "weight (activation objective: no X^T X statistics)"
        if kind == "output" and batch.rows is None:
            kind, note = "weight", "weight (output objective: no sampled rows)"
        common = (spec, self.weight_format, self.act_format, batch.segments)
        if kind == "weight":
            return Objective(kind, *common), note
        if kind == "activation":
            c = batch.xtx
            c = c / (s * s) if c.dim() == 2 else c / (s[:, :, None] * s[:, None, :])
            return Objective(kind, *common, c=c), note
        x_hat = batch.rows / s[:, None, :]
        xa = quantize_stack(self.act_format, x_hat)
        x2 = quantize_stack(self.branch_act_format, x_hat)
        return Objective(kind, *common, xa=xa, x2=x2, y=batch.rows @ batch.weight.mT), note

    def _init(self, ws: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``L = U S^1/2``, ``R = S^1/2 V^T`` from the SVD of ``ws`` or of ``ws - Q1(ws)``."""
        target = ws if self.init == "svd" else ws - quantize_stack(self.weight_format, ws, batch.segments)
        method = resolve_svd(self.svd, self.rank, tuple(ws.shape), ws.device)
        u, s, vh = truncated_svd(target, self.rank, method, self.seed)
        root = s.sqrt()
        return u * root[..., None, :], root[..., :, None] * vh
