"""The quantized layer: one module for ``nn.Linear`` and 1x1 ``nn.Conv2d``.

``y = Qa(x / s) Q1(W_main)^T + branch(x / s) + b`` where ``s`` is an optional smoothing
vector and ``branch`` an optional low-rank branch ``Qa2(x) Q2(R)^T Q2(L)^T`` whose factors and
input have their own formats (any of which may be 16-bit). The main weight is quantized once at
construction; activations are fake-quantized per forward, per token along the reduction dim.

A shifted activation format (``Qa.shift = c``) runs as deepcompressor's ``ShiftedLinear``: the
input is shifted first, ``u = x + c``, then smoothed and quantized without the shift,
``y = Qa'(u / s) Q1(W_main)^T + branch(u / s) + (b - c W 1)``, the compensation computed in
float64 from the original weight ``W`` and folded into the bias (which the layer then always has).

With a branch, on the GPU, where Triton runs (:func:`ptqbench.kernels.fused_branch_allowed`) and
the formats allow (:func:`fused_plan`), :func:`ptqbench.kernels.fused_branch` fills ``[Qa(x') | h]``
(``x' = (x + c) / s``, ``h = Qmid(src @ down^T)``, ``src`` x' or its fake-quant; x read once) and one
GEMM against ``[Q1(W_main) | up]`` adds the up-projection: the same Qa(x') and h values as the
unfused path, only the GEMMs accumulate in another order. ``weight`` and ``branch.up`` are then
views of that concatenated buffer, ``branch.down`` of a zero-padded one (no second copy; rebuilt
when reassigned). Layers that read one tensor in turn reuse what they compute from it alone
(:func:`_prepared`). Under autograd and on the CPU the unfused path runs.
"""

from __future__ import annotations

import functools
import threading
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptqbench import kernels
from ptqbench.errors import UserError
from ptqbench.formats import CastFormat, Format, get_format
from ptqbench.kernels import KernelSpec

BIAS_BITS = 16
SMOOTH_BITS = 16


def is_pointwise_conv(module: nn.Module) -> bool:
    """A 1x1 Conv2d that is a linear map over channels (SANA's FFN projections)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
    )


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_pointwise_conv(module)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of a Linear or 1x1 Conv2d (a view, not a copy)."""
    w = layer.weight
    return w.reshape(w.shape[0], -1) if w.dim() == 4 else w


class LowRankBranch(nn.Module):
    """``Qa2(x) @ down^T [@ Qmid] @ up^T`` with ``down = Q2(Omega^T R)`` [r, in] and
    ``up = Q2(L Omega)`` [out, r], stored already quantized (the rotation is folded in).

    ``mid_format`` optionally quantizes the rank-r intermediate (LoRaQ's default).
    """

    def __init__(
        self,
        down: torch.Tensor,
        up: torch.Tensor,
        weight_format: Format | str = "bf16",
        act_format: Format | str = "bf16",
        mid_format: Format | str | None = None,
        rotation: str = "identity",
    ):
        super().__init__()
        self.weight_format = get_format(weight_format)
        self.act_format = get_format(act_format)
        self.mid_format = None if mid_format is None else get_format(mid_format)
        self.rotation = rotation
        self.register_buffer("down", self.weight_format.quantize(down))
        self.register_buffer("up", self.weight_format.quantize(up))

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def down_project(self, x: torch.Tensor) -> torch.Tensor:
        """``Qa2(x) @ down^T``, the rank-r intermediate before ``mid_format``."""
        return F.linear(self.act_format.quantize(x), self.down)

    def _mid(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.mid_format is None else self.mid_format.quantize(h)

    def up_project_into(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``y + Qmid(h) @ up^T``, accumulated into ``y`` by the GEMM where possible (one pass less)."""
        h = self._mid(h)
        if not y.is_contiguous() or (torch.is_grad_enabled() and (y.requires_grad or h.requires_grad)):
            return y + F.linear(h, self.up)
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.up.t())
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._mid(self.down_project(x)), self.up)

    def effective(self) -> torch.Tensor:
        """The dense ``[out, in]`` product ``up @ down`` in float32."""
        return self.up.float() @ self.down.float()

    def bits(self) -> int:
        return self.weight_format.bits(tuple(self.down.shape)) + self.weight_format.bits(tuple(self.up.shape))

    def extra_repr(self) -> str:
        mid = f", mid={self.mid_format}" if self.mid_format else ""
        return f"rank={self.rank}, weights={self.weight_format}, acts={self.act_format}{mid}, rotation={self.rotation}"


@dataclass(frozen=True)
class FusedPlan:
    """How the fused branch path computes a layer: the main activations' kernel, the rank-r
    product's source (None: the 16-bit input itself; ``main``: Qa(x')), the intermediate's kernel
    (``mid``) or, for a mid format the kernel cannot apply, that format applied after it."""

    main: KernelSpec
    source: KernelSpec | None
    mid: KernelSpec | None
    mid_after: Format | None


def _identity_cast(fmt: Format, dtype: torch.dtype) -> bool:
    """A cast format that leaves ``dtype`` values unchanged (its own dtype, or fp32)."""
    return isinstance(fmt, CastFormat) and fmt.torch_dtype in (dtype, torch.float32)


@functools.cache
def fused_plan(act: Format, branch_act: Format, mid: Format | None, dtype: torch.dtype) -> FusedPlan | None:
    """The fused kernel's plan for main activation format ``act`` (unshifted), a branch reading
    ``branch_act`` with intermediate format ``mid`` and ``dtype`` inputs (any width and rank: the
    product is a GEMM); None where the fused path does not apply (no kernel for a format, a shifted branch format) or
    is slower (a per-tensor scale, NVFP4's, whose abs-max pass the kernel adds): the unfused path
    runs. A mid format with a per-tensor scale runs after the kernel, in torch (``mid_after``)."""
    main = act.kernel_spec(dtype)
    if mid is not None and _identity_cast(mid, dtype):
        mid = None
    if main is None or dtype not in (torch.bfloat16, torch.float16) or act.shift:
        return None
    if _identity_cast(branch_act, dtype):
        source = None
    elif branch_act == act:
        source = main
    else:
        source = None if branch_act.shift else branch_act.kernel_spec(dtype)
        if source is None:
            return None
    if main.tensor_scale == "absmax" or (source is not None and source.tensor_scale == "absmax"):
        return None  # measured slower fused (PixArt-Sigma, H200: NVFP4 + branch 1.76x fused, 1.56x unfused)
    mid_spec = None if mid is None else mid.kernel_spec(dtype)
    if mid_spec is not None and mid_spec.tensor_scale == "absmax":
        mid_spec = None
    return FusedPlan(main, source, mid_spec, mid if mid is not None and mid_spec is None else None)


def fused_input(
    x: torch.Tensor,
    down: torch.Tensor,
    plan: FusedPlan,
    width: int,
    rank: int,
    shift: float = 0.0,
    smooth: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[Qa(x') | h | 0]`` by :func:`ptqbench.kernels.fused_branch` (``down`` zero-padded to
    ``width - K`` rows; a batch as it takes one) with ``plan``'s mid format applied to ``h``, in
    torch (per item) where the kernel cannot: the fused path's input to one GEMM against
    ``[Q1(W_main) | up | 0]``."""
    buf = kernels.fused_branch(x, down, plan.main, plan.source, plan.mid, width, shift, smooth, out=out)
    if plan.mid_after is not None:
        k = x.shape[-1]
        h = buf[..., k : k + rank]
        for part in h if h.dim() == 3 else h[None]:
            part.copy_(plan.mid_after.quantize(part))
    return buf


class QuantLinear(nn.Module):
    """An emulated quantized Linear (or 1x1 Conv2d when ``conv=True``).

    ``weight`` is the main-branch weight ``[out, in]`` *before* quantization, already smoothed
    (multiplied by ``smooth``) and with the branch subtracted, as the method computed it.
    ``info`` holds what the method decided for this layer (chosen smoothing, objective, ...),
    written to the per-layer error CSV. ``original_weight`` (the layer's ``[out, in]`` weight
    before any method touched it) is read only for a shifted ``act_format``'s bias compensation;
    without it the compensation uses ``(weight + branch) / smooth``.

    ``input_key`` names what the fused path's ``[Qa(x') | h]`` reads besides x (smoothing vector,
    down-projection, formats): unique per layer, and the same for layers built to share them (a
    fused q/k/v unit), which then reuse one buffer when they read the same tensor in turn.
    """

    info: dict[str, Any]
    input_key: str

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_format: Format | str,
        act_format: Format | str,
        smooth: torch.Tensor | None = None,
        branch: LowRankBranch | None = None,
        conv: bool = False,
        original_weight: torch.Tensor | None = None,
    ):
        super().__init__()
        self.weight_format = get_format(weight_format)
        self.act_format = get_format(act_format)
        self.out_features, self.in_features = weight.shape
        self.conv = conv
        self.branch = branch
        self.register_buffer("smooth", None if smooth is None else smooth.to(weight.dtype))
        if self.act_format.shift:
            if original_weight is None:
                original_weight = self._unquantized_weight(weight)
            bias = shift_compensated_bias(original_weight, bias, self.act_format.shift, weight.dtype)
        self.register_buffer("weight", self.weight_format.quantize(weight))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.info = {}
        self.input_key = uuid.uuid4().hex

    def __setstate__(self, state: dict) -> None:
        state.setdefault("input_key", uuid.uuid4().hex)  # layers pickled before input keys existed
        super().__setstate__(state)

    def _unquantized_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``(weight + branch) / smooth`` in float64, the layer's weight before quantization."""
        w = weight.double() + (0.0 if self.branch is None else self.branch.effective().double())
        return w if self.smooth is None else w / self.smooth.double()

    @classmethod
    def from_layer(
        cls,
        layer: nn.Module,
        weight_format: Format | str,
        act_format: Format | str,
        *,
        weight: torch.Tensor | None = None,
        smooth: torch.Tensor | None = None,
        branch: LowRankBranch | None = None,
    ) -> QuantLinear:
        """Build from a Linear / 1x1 Conv2d; ``weight`` replaces its (smoothed, residual) weight."""
        original = dense_weight(layer).detach()
        w = original if weight is None else weight.to(layer.weight.dtype)
        conv = isinstance(layer, nn.Conv2d)
        return cls(w, layer.bias, weight_format, act_format, smooth, branch, conv=conv, original_weight=original)

    def shift_inputs(self, act_format: Format | str, original_weight: torch.Tensor) -> QuantLinear:
        """Turn a layer built (and calibrated) on shifted inputs ``x + c`` with the unshifted format
        into the layer that reads ``x``: ``act_format`` (whose ``unshifted()`` must be this layer's
        format) adds ``c`` to the input, and ``b - c W 1`` (``W = original_weight``) becomes the
        bias. Returns the layer, changed in place; the result equals building it with ``act_format``."""
        fmt = get_format(act_format)
        if not fmt.shift or fmt.unshifted() != self.act_format:
            raise UserError(f"shift_inputs: {fmt} is not a shifted variant of this layer's {self.act_format}")
        self.act_format = fmt
        self.bias = shift_compensated_bias(original_weight, self.bias, fmt.shift, self.weight.dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return self._linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._fused_plan(x)
        if plan is not None:
            return self._fused_linear(x, plan)
        act = self.act_format
        if act.shift:  # shift before smoothing; the -c is in the bias
            x, act = act.shift_input(x), act.unshifted()
        if self.smooth is not None:
            x = x / self.smooth
        if self.branch is None:
            xq = act.quantize(x) if self.smooth is not None else _prepared(x, ("act", act), lambda: act.quantize(x))
            return F.linear(xq, self.weight, self.bias)
        # The branch reads x first, while x is likely still in the GPU's L2 cache.
        h = self.branch.down_project(x)
        return self.branch.up_project_into(F.linear(act.quantize(x), self.weight, self.bias), h)

    def _fused_plan(self, x: torch.Tensor) -> FusedPlan | None:
        """The fused branch path's plan for input ``x``, or None for the unfused path (no branch,
        no Triton here, autograd, mixed dtypes, or formats :func:`fused_plan` does not fuse)."""
        branch = self.branch
        if branch is None or not kernels.fused_branch_allowed(x):
            return None
        tensors = (x, self.weight, branch.down, branch.up) + (() if self.smooth is None else (self.smooth,))
        if any(t.dtype != x.dtype for t in tensors):
            return None
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return None
        return fused_plan(self.act_format.unshifted(), branch.act_format, branch.mid_format, x.dtype)

    def concat_weight(self) -> torch.Tensor:
        """``[Q1(W_main) | up | 0]`` ``[out, branch_width(in, r)]``, of which ``weight`` and
        ``branch.up`` are views (built on first use, rebuilt when either was reassigned)."""
        k, r = self.in_features, self.branch.rank
        width = kernels.branch_width(k, r)
        cat = _padded_base([self.weight, self.branch.up], (self.out_features, width), [0, k])
        if cat is None:
            cat = self.weight.new_zeros(self.out_features, width)
            cat[:, :k] = self.weight
            cat[:, k : k + r] = self.branch.up
            self.weight, self.branch.up = cat[:, :k], cat[:, k : k + r]
        return cat

    def padded_down(self) -> torch.Tensor:
        """``[down; 0]`` ``[branch_width(in, r) - in, in]`` (the product's columns of the fused buffer),
        of which ``branch.down`` is a view (built on first use, rebuilt when it was reassigned)."""
        k, down = self.in_features, self.branch.down
        rows = kernels.branch_width(k, self.branch.rank) - k
        pad = _padded_base([down], (rows, k), [0])
        if pad is None:
            pad = down.new_zeros(rows, k)
            pad[: down.shape[0]] = down
            self.branch.down = pad[: down.shape[0]]
        return pad

    def _fused_linear(self, x: torch.Tensor, plan: FusedPlan) -> torch.Tensor:
        """The fused branch path: one kernel writes ``[Qa(x') | h | 0]`` (reused by the next layer
        that reads the same ``x`` and shares this one's input key), one GEMM adds both products."""
        cat = self.concat_weight()
        key = ("fused", self.input_key, plan, self.act_format)
        buf = _prepared(x, key, lambda: self._fused_buffer(x, plan, cat.shape[1]))
        return F.linear(buf, cat, self.bias).reshape(*x.shape[:-1], self.out_features)

    def _fused_buffer(self, x: torch.Tensor, plan: FusedPlan, width: int) -> torch.Tensor:
        shift = _rounded_shift(self.act_format.shift, x.dtype)
        x2 = x.reshape(-1, self.in_features).contiguous()
        return fused_input(x2, self.padded_down(), plan, width, self.branch.rank, shift, self.smooth)

    def effective_weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` matrix the layer applies to unquantized activations:
        ``(Q1(W_main) + L_q R_q) diag(s)^-1``, in float32 (a shifted layer adds the constant
        ``c (W_eff - W) 1`` to its output besides)."""
        w = self.weight.float()
        if self.branch is not None:
            w = w + self.branch.effective()
        if self.smooth is not None:
            w = w / self.smooth.float()
        return w

    def bits(self) -> int:
        """Exact storage bits: main weight, branch factors, smoothing vector, bias (a shifted layer
        always has one; the shift itself is a constant of the activation function, not stored)."""
        total = self.weight_format.bits((self.out_features, self.in_features))
        if self.branch is not None:
            total += self.branch.bits()
        if self.smooth is not None:
            total += SMOOTH_BITS * self.in_features
        if self.bias is not None:
            total += BIAS_BITS * self.out_features
        return total

    def extra_repr(self) -> str:
        smooth = ", smoothed" if self.smooth is not None else ""
        kind = "conv1x1" if self.conv else "linear"
        return (
            f"{kind} {self.in_features}->{self.out_features}, weights={self.weight_format}, "
            f"acts={self.act_format}{smooth}"
        )


class _LastInput(threading.local):
    """The prepared activations of the last input a quantized layer read (one entry per thread),
    held while that input lives: a weak reference to it, its version, the key and the value."""

    ref: weakref.ref | None = None
    version: int = -1
    key: tuple = ()
    value: Any = None

    def set(self, x: torch.Tensor | None, key: tuple = (), value: Any = None) -> None:
        self.ref = None if x is None else weakref.ref(x, self._dropped)
        self.version, self.key, self.value = (-1 if x is None else x._version), key, value

    def _dropped(self, ref: weakref.ref) -> None:
        if self.ref is ref:  # the input of the current entry died: nothing reads its value again
            self.set(None)


_LAST = _LastInput()


def _prepared(x: torch.Tensor, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, or its value for the previous call when that had the same ``x`` (the same tensor
    object, unmodified since) and ``key``: q, k and v of an attention read one tensor in turn, and
    what they compute from it alone (its fake-quant; a shared fused buffer) is computed once. Off
    under autograd and for inference-mode tensors (no version counter to see in-place changes by).
    The value is released with ``x`` (or the next entry)."""
    if torch.is_grad_enabled() or x.is_inference():
        return make()
    last = _LAST
    if last.ref is not None and last.ref() is x and last.version == x._version and last.key == key:
        return last.value
    last.set(None)  # drop the old entry before computing
    value = make()
    last.set(x, key, value)
    return value


def _padded_base(views: list[torch.Tensor], shape: tuple[int, int], offsets: list[int]) -> torch.Tensor | None:
    """The contiguous ``shape`` buffer that each of ``views`` is a view of, starting ``offsets[i]``
    elements into it, or None when they are not (any more: a view was reassigned)."""
    base = views[0]._base
    if base is None or base.shape != shape or not base.is_contiguous():
        return None
    for view, offset in zip(views, offsets, strict=True):
        if view._base is not base or view.data_ptr() != base.data_ptr() + offset * base.element_size():
            return None
    return base


@functools.cache
def _rounded_shift(shift: float, dtype: torch.dtype) -> float:
    """The shift ``c`` rounded to ``dtype``, as :meth:`Format.shift_input` adds it."""
    return float(torch.tensor(shift, dtype=dtype)) if shift else 0.0


def shift_compensated_bias(
    weight: torch.Tensor, bias: torch.Tensor | None, shift: float, dtype: torch.dtype
) -> torch.Tensor:
    """``b - c W 1`` computed in float64 and returned in ``dtype`` (the layer's), as deepcompressor's
    ``ShiftedLinear.from_linear`` folds it (``c`` rounded to ``dtype`` first, as its buffer is)."""
    c = torch.tensor(shift, dtype=dtype).double()
    folded = -(weight.double().sum(dim=1) * c)
    if bias is not None:
        folded = bias.double() + folded
    return folded.to(dtype)
