"""SVDQuant (Li et al., ICLR 2025), with the defaults of its reference code mit-han-lab/deepcompressor
(``examples/diffusion/configs/svdquant/__default__.yaml``, commit 69f3473).

1. Smoothing ``s_j = max|X_j|^a / max|W_j|^b`` chosen per unit from deepcompressor's grid
   (``num_grids`` 20, ``beta -2``: (0, 0), (a, 0), (a, 1 - a), 39 candidates), each scored by
   the layer-output MSE **with** the low-rank branch (one SVD) and activation quantization in
   place, on ``rows`` calibration rows (``all``: every cached row, deepcompressor's
   ``sample_size: -1``, streamed in chunks); equal errors keep the later candidate
   (``calib/smooth.py``, ``_update_best``: ``e <= b``). A NaN/inf scale resets its whole vector to 1
   (``get_smooth_scale``).
2. A rank-``r`` branch from the exact float64 SVD of the smoothed weight ``W^ = U S V^T``
   (``nn/patch/lowrank.py``): ``L = U S``, ``R = V^T``, stored in the model's dtype
   (``branch_format: model``: fp16 for PixArt-Sigma, bf16 for SANA); ``W^ - L R`` is quantized.
3. Refinement (``calib/lowrank.py``, ``num_iters`` 100, ``early_stop``): the SVD of
   ``W^ - Q1(W^ - L R)`` again; the output error decides (also without smoothing, whenever rows
   exist; the weight error only without rows); an iterate counts as better when its error is
   ``<=`` the best so far, and a unit stops at its first worse iterate. The smoothing being
   fixed, the iterates' output error is evaluated from float64 Gram matrices of the rows
   (``refine_objective: gram``, :mod:`ptqbench.rowgram`): the same objective without the
   16-bit rounding of each product, at one pass over the rows instead of one per iterate;
   ``rows`` scores every iterate per row in ``score_dtype`` as deepcompressor's 16-bit module
   does. Logged in ``q.info["refine_objective"]``.
   The float64 SVDs (of the candidates and the iterates) are solved for their top ``r`` triplets
   by Chebyshev-filtered subspace iteration to a subspace within 1e-10 rad of the exact one
   (``iterative_svd``, :func:`~ptqbench.lowrank.iterative_gram_svd`; an iterate from the last
   one's vectors: it is the last branch plus a quantization error, a 100x spectral gap after the
   rank), the full SVD where that does not converge; ``q.info["full_svds"]`` counts the unit's
   full ones (all of them with ``iterative_svd: false``).
4. ``y = Qa(x/s) Q1(R_es)^T + (x/s) R^T L^T + b``.
5. Fused q/k/v (deepcompressor ``low_rank.exclusive: false``, ``share_qkv``): the layers of one
   attention that read one input share one smoothing vector and one ``R`` from the SVD of
   ``[Wq; Wk; Wv]``, each keeps its own ``L``; both are stored and counted once.

6. Shifted activations (deepcompressor's INT4 config: ``pipeline.shift_activations``,
   ``allow_unsigned``), on by default: the FFN down-projection after GELU reads ``x + 0.171875``
   quantized unsigned, the shift folded into its bias (:mod:`ptqbench.shifting`); only integer
   activation formats are shifted.
7. The candidates' outputs on the rows (``score_dtype`` model: 16-bit products, float32
   accumulation) are computed as the deployed layer computes them on the same device
   (``fused_scoring``, logged in ``q.info["score_path"]``): on a GPU where its fused branch path
   runs, ``[Qa(x/s) | (x/s) R^T] [Q1 | L]^T`` in one GEMM (the same activations and ``h``, the
   output rounded once), else the two products each rounded to 16 bits, summed in float32.
   deepcompressor adds its 16-bit branch output to the 16-bit layer output in 16 bits
   (``utils/hooks/branch.py``): each way the scores differ from its by the outputs' rounding,
   not in what is quantized.

Deviation (logged in ``q.info["objective"]``): deepcompressor scores a fused q/k/v unit on the
attention module's output (``app/diffusion/quant/smooth.py``, ``eval_module=attn``); a layer-level
method sees no attention, so the unit is scored on the summed squared error of the q, k and v
outputs, the closest exact layer-level objective.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ptqbench.errors import UserError
from ptqbench.formats import Format
from ptqbench.layers import SMOOTH_BITS, QuantLinear, dense_weight
from ptqbench.lowrank import (
    REFINE_OBJECTIVES,
    STOP_RULES,
    SVD_KINDS,
    Batch,
    BranchSpec,
    Fitter,
    build_layers,
    check_rank,
    make_batches,
    make_units,
    map_batches,
    subsample,
    svd_label,
)
from ptqbench.method import LowRankMethod, format_field, register_method, resolve_format
from ptqbench.smoothing import GPU_WORKERS, SCORE_DTYPES, pair_label, resolve_score_dtype, smoothing_grid
from ptqbench.stats import ALL_ROWS, LayerStats, StatsSpec

Progress = Callable[[str], None]
QKV_OBJECTIVE = "q/k/v outputs summed (deepcompressor: the attention output)"
FUSED_SCORES = "fused: [Qa(x/s) | (x/s) R^T] [Q1 | L]^T, one GEMM (the deployed layer's GPU path)"
UNFUSED_SCORES = "unfused: Qa(x/s) Q1^T + ((x/s) R^T) L^T, each rounded"


@register_method("svdquant")
@dataclass(frozen=True)
class SVDQuant(LowRankMethod):
    """SVDQuant: smoothing searched with the branch in place, 16-bit SVD branch, quantized residual.

    ``smoothing`` (with statistics) searches ``2 num_grids - 1`` (a, b) pairs scored on ``rows``
    calibration rows (``all`` or -1: every row), or on a seeded subset of ``search_rows`` of them
    (the refinement still scores on all ``rows``; default ``all``: the same rows);
    ``num_iters`` / ``early_stop`` / ``early_stop_rule`` (``<=`` or ``<``) refine the branch;
    ``share_qkv`` fuses q/k/v reading one input; ``svd``: exact (float64) | randomized | auto
    (``seed`` seeds the randomized range finder; ``gram``: exact float64 through the Gram
    matrix's eigendecomposition, cheaper); ``branch_format`` ``model``: the layer's own 16-bit
    dtype; ``score_dtype`` (``model`` | ``float32``): dtype of the row products the candidates
    and iterates are scored with (``model``: the layer's fp16/bf16 with float32 accumulation, as
    deepcompressor runs its candidates; float32 layers always score in float32);
    ``refine_objective`` (``gram`` | ``rows``): how the refinement's iterates are scored on rows
    (item 3 above); ``iterative_svd``: float64 SVDs solved iteratively for the top ``r``
    (item 3; ``false``: every one in full); ``fused_scoring``: where the deployed layer runs its
    fused branch path (a GPU, 16-bit rows scored in the model dtype, formats the kernel fuses),
    candidates are scored as it computes them (item 7).
    """

    branch_format: Format | str = format_field("model", model_dtype=True)
    branch_act_format: Format | str = format_field("model", model_dtype=True)
    shift_activations: bool = True  # deepcompressor's INT4 config (acts on integer act formats only)
    smoothing: bool = True
    num_grids: int = 20
    rows: int | str = 256
    search_rows: int | str = "all"
    num_iters: int = 100
    early_stop: bool = True
    early_stop_rule: str = "<="
    share_qkv: bool = True
    svd: str = "exact"
    seed: int = 0
    score_dtype: str = "model"
    refine_objective: str = "gram"
    iterative_svd: bool = True
    fused_scoring: bool = True
    model_dtype_branch: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("rows", "search_rows"):
            value = getattr(self, key)
            if value == "all":
                object.__setattr__(self, key, value := ALL_ROWS)
            if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != ALL_ROWS):
                raise UserError(f"svdquant: {key} must be >= 1, or 'all' / -1 (every row), got {value!r}")
        if self.num_grids < 2:
            raise UserError(f"svdquant: num_grids must be >= 2, got {self.num_grids}")
        if self.num_iters < 1:
            raise UserError(f"svdquant: num_iters must be >= 1, got {self.num_iters}")
        if self.svd not in SVD_KINDS:
            raise UserError(f"svdquant: svd {self.svd!r} is not valid (valid: {', '.join(SVD_KINDS)})")
        if self.score_dtype not in SCORE_DTYPES:
            raise UserError(
                f"svdquant: score_dtype {self.score_dtype!r} is not valid (valid: {', '.join(SCORE_DTYPES)})"
            )
        if self.refine_objective not in REFINE_OBJECTIVES:
            raise UserError(
                f"svdquant: refine_objective {self.refine_objective!r} is not valid "
                f"(valid: {', '.join(REFINE_OBJECTIVES)})"
            )
        if self.early_stop_rule not in STOP_RULES:
            raise UserError(
                f"svdquant: early_stop_rule {self.early_stop_rule!r} is not valid (valid: {', '.join(STOP_RULES)})"
            )

    @property
    def smooths(self) -> bool:
        return self.smoothing

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(absmax=self.smoothing, rows=self.rows)

    def shared_input_bits(self, in_features: int) -> int:
        if not self.share_qkv:
            return 0
        return self.down_bits(in_features) + (SMOOTH_BITS * in_features if self.smooths else 0)

    def branch_spec(self, dtype: torch.dtype = torch.bfloat16) -> BranchSpec:
        """The branch for layers of ``dtype`` (``model`` formats resolved to it)."""
        fmt, act = resolve_format(self.branch_format, dtype), resolve_format(self.branch_act_format, dtype)
        return BranchSpec(self.rank, fmt, act, None, "us")

    @torch.no_grad()
    def quantize_layers(
        self,
        layers: Mapping[str, nn.Module],
        stats: Mapping[str, LayerStats] | None = None,
        progress: Progress | None = None,
    ) -> dict[str, QuantLinear]:
        check_rank(self, layers)
        units = make_units(layers, stats, self.share_qkv)
        done: dict[str, QuantLinear] = {}

        def one(batch: Batch) -> dict[str, QuantLinear]:
            spec = self.branch_spec(batch.smooth_dtype)
            smooth, up_q, down_q, res, info = self._quantize_batch(batch, spec)
            return build_layers(batch, smooth, up_q, down_q, res, self, spec, "identity", info)

        batches = make_batches(units, use_rows=True)
        for batch, built in zip(batches, map_batches(batches, one, GPU_WORKERS), strict=True):
            done.update(built)
            if progress:
                for unit in batch.units:
                    for name in unit.names:
                        progress(name)
        return {name: done[name] for name in layers}

    def _fitter(self, spec: BranchSpec, layer_dtype: torch.dtype) -> Fitter:
        dtype = torch.float64 if self.svd in ("exact", "gram") else torch.float32
        return Fitter(
            spec, self.weight_format, self.act_format, self.svd, self.seed, dtype, self.early_stop_rule,
            score_dtype=resolve_score_dtype(self.score_dtype, layer_dtype), refine_objective=self.refine_objective,
            iterative=self.iterative_svd, fused_scoring=self.fused_scoring,
        )

    def _quantize_batch(self, batch: Batch, spec: BranchSpec) -> tuple:
        """(smooth, up_q, down_q, residual, info per unit) for one batch."""
        fitter = self._fitter(spec, dense_weight(batch.units[0].layers[0]).dtype)
        pairs = smoothing_grid(self.num_grids)
        rows = batch.samples.count if batch.samples is not None else 0
        searched = rows  # rows the smoothing search scored on (all of them when there is no search)
        full_svds = torch.zeros(len(batch), dtype=torch.long, device=batch.weight.device)
        if self.smoothing and batch.absmax is not None:
            scored = subsample(batch, self.search_rows, self.seed)
            searched = scored.samples.count if scored.samples is not None else 0
            smooth, pick = fitter.search(scored, pairs, full_svds)
            how = "searched on output MSE" if batch.samples is not None else "searched on weight error (no rows)"
            chosen = [pair_label(pairs[int(i)]) for i in pick.tolist()]
        else:
            how = "off" if not self.smoothing else "none: no activation statistics"
            smooth, chosen = None, [None] * len(batch)
        s = torch.ones_like(batch.weight[:, 0]) if smooth is None else smooth
        ws = batch.weight * s[:, None, :]
        history: list[torch.Tensor] = []
        up_q, down_q, res, _, used = fitter.refine(batch, ws, s, self.num_iters, self.early_stop, history, full_svds)
        curves = iterate_errors(history, used, self.early_stop)
        kind = fitter.svd_kind(tuple(ws.shape), ws.device)
        svd = svd_label(kind, fitter.svd_dtype) if self.rank else "none"
        svd += ", iterative top-r" if self.rank and fitter.solves_iteratively(kind) else ""
        refined_on = scored_by = None
        if rows:
            refined_on = "float64 Gram of the rows" if fitter.refines_on_gram(batch) else "per row"
            scored_by = FUSED_SCORES if fitter.scores_fused(batch) else UNFUSED_SCORES
        info = []
        per_unit = zip(batch.units, chosen, used.tolist(), curves, full_svds.tolist(), strict=True)
        for unit, pair, it, curve, n_full in per_unit:
            on = f"{rows} rows" if searched == rows else f"{rows} rows (smoothing searched on {searched} of them)"
            objective = f"output MSE on {on}" if rows else "weight error (no rows)"
            if rows and len(unit.names) > 1:
                objective = f"{QKV_OBJECTIVE} on {on}"
            info.append({
                "smoothing": how, "smooth_pair": pair, "best_iteration": int(it), "iterate_errors": curve,
                "objective": objective, "refine_objective": refined_on,
                "svd": svd, "full_svds": n_full, "branch_format": str(spec.weight_format),
                "score_dtype": str(fitter.score_dtype).removeprefix("torch.") if rows else None,
                "score_path": scored_by,
            })
        return smooth, up_q, down_q, res, info


def iterate_errors(history: list[torch.Tensor], used: torch.Tensor, early_stop: bool) -> list[list[float]]:
    """Per unit, the objective (squared error) of each refinement iterate it evaluated: up to its
    first worse iterate after the best one with ``early_stop``, else all."""
    errors = torch.stack(history, 1).tolist()  # [units, iterates]
    return [row[: int(u) + 1] if early_stop else row for row, u in zip(errors, used.tolist(), strict=True)]
