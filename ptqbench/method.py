"""The method interface and registry.

A method is a frozen, typed dataclass (its config, every field logged) with
``quantize_layer(layer, stats=None) -> QuantLinear``. Format fields accept names, spec strings,
dicts or Format objects and are parsed once. Methods register with ``@register_method(name)``;
other packages add theirs through the ``ptqbench.methods`` entry-point group, one file each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ptqbench.errors import UserError
from ptqbench.formats import Format, can_shift, get_format
from ptqbench.layers import BIAS_BITS, SMOOTH_BITS, QuantLinear
from ptqbench.registry import Registry
from ptqbench.stats import LayerStats, StatsSpec

SHIFT_BOUNDS = ("deepcompressor", "exact")  # Method.shift_bounds: which lower bound the shift negates
METHODS: Registry[type[Method]] = Registry("method", group="ptqbench.methods", builtins=("ptqbench.methods",))


# A branch format that is the layer's own 16-bit dtype, resolved per layer (SVDQuant's native branch).
MODEL_DTYPE = "model"


def format_field(default: str, model_dtype: bool = False) -> Any:
    """A dataclass field holding a Format (given as a name, spec string, dict or Format);
    ``model_dtype``: it may also be :data:`MODEL_DTYPE`, kept as that string."""
    return field(default=default, metadata={"format": True, "model_dtype": model_dtype})


def model_dtype_format(dtype: torch.dtype) -> Format:
    """The cast format of a layer's own dtype when it is 16-bit (fp16, bf16), else bf16."""
    return get_format("fp16" if dtype == torch.float16 else "bf16")


def resolve_format(fmt: Format | str, dtype: torch.dtype) -> Format:
    """``fmt``, with :data:`MODEL_DTYPE` resolved for a layer of ``dtype``."""
    return model_dtype_format(dtype) if fmt == MODEL_DTYPE else fmt


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a Method subclass under ``name``."""

    def decorator(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS.register(name, cls)
        return cls

    return decorator


Progress = Callable[[str], None]


@dataclass(frozen=True)
class Method:
    """Base of every method: main weight format ``Q1`` and activation format ``Qa``.

    ``shift_activations`` (deepcompressor's ``pipeline.shift_activations`` with ``allow_unsigned``):
    with an integer ``act_format``, a layer whose input follows an activation with a negative lower
    bound (the model adapter's ``activation_floors``: PixArt's and FLUX's FFN down-projections after
    GELU) reads ``x + c`` quantized unsigned, ``-c W 1`` folded into its bias
    (:mod:`ptqbench.shifting`). ``shift_bounds``: ``deepcompressor`` (``c`` = its rounded bound,
    0.171875 for GELU) or ``exact`` (the activation's exact minimum, rounded up to the layer's dtype).
    """

    name: ClassVar[str] = ""
    weight_format: Format = format_field("int4_g64")
    act_format: Format = format_field("int4_g64")
    shift_activations: bool = False
    shift_bounds: str = "deepcompressor"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.metadata.get("format"):
                value = getattr(self, f.name)
                if value == MODEL_DTYPE and f.metadata.get("model_dtype"):
                    continue
                if value is not None:
                    object.__setattr__(self, f.name, get_format(value))
        self._check_shift()

    def _check_shift(self) -> None:
        if not isinstance(self.shift_activations, bool):
            raise UserError(f"{self.name}: shift_activations must be true or false, got {self.shift_activations!r}")
        if self.shift_bounds not in SHIFT_BOUNDS:
            raise UserError(
                f"{self.name}: shift_bounds {self.shift_bounds!r} is not valid (valid: {', '.join(SHIFT_BOUNDS)})"
            )
        if self.shift_activations and self.act_format.shift:
            raise UserError(
                f"{self.name}: act_format {self.act_format} is already shifted; with shift_activations the "
                "shift is chosen per layer: give the unshifted format, or set shift_activations: false"
            )

    def shifts_input(self, floor: float | None) -> bool:
        """Whether this method shifts the input of a layer whose input is bounded below by ``floor``
        (None: unbounded): ``shift_activations``, an integer ``act_format`` and ``floor < 0``."""
        return self.shift_activations and floor is not None and floor < 0 and can_shift(self.act_format)

    # ------------------------------------------------------------------ what a method declares
    def stats_spec(self) -> StatsSpec:
        """Statistics this method uses when they are available (none by default)."""
        return StatsSpec()

    @property
    def smooths(self) -> bool:
        """Whether layers keep an explicit smoothing vector when statistics are given."""
        return False

    # ------------------------------------------------------------------ quantization
    def quantize_layer(self, layer: nn.Module, stats: LayerStats | None = None) -> QuantLinear:
        """Quantize one layer. Methods implement this, or :meth:`quantize_layers` (batched over
        same-shape layers), in which case one layer is a batch of one."""
        if type(self).quantize_layers is Method.quantize_layers:
            raise NotImplementedError(f"{type(self).__name__} implements neither quantize_layer nor quantize_layers")
        return self.quantize_layers({"layer": layer}, None if stats is None else {"layer": stats})["layer"]

    def quantize_layers(
        self,
        layers: Mapping[str, nn.Module],
        stats: Mapping[str, LayerStats] | None = None,
        progress: Progress | None = None,
    ) -> dict[str, QuantLinear]:
        """Quantize many layers; methods that batch same-shape layers override this."""
        out = {}
        for name, layer in layers.items():
            out[name] = self.quantize_layer(layer, None if stats is None else stats.get(name))
            if progress:
                progress(name)
        return out

    # ------------------------------------------------------------------ memory
    def layer_bits(self, out_features: int, in_features: int, bias: bool, smoothed: bool | None = None) -> int:
        """Exact bits of this method's quantized layer of that shape, without building it.

        ``smoothed`` defaults to :attr:`smooths` (a smoothing vector is kept). ``bias``: the
        quantized layer has one (a shifted layer always has: pass ``bias or shifts_input(floor)``).
        """
        smoothed = self.smooths if smoothed is None else smoothed
        total = self.weight_format.bits((out_features, in_features))
        total += self.branch_bits(out_features, in_features)
        total += SMOOTH_BITS * in_features if smoothed else 0
        total += BIAS_BITS * out_features if bias else 0
        return total

    def branch_bits(self, out_features: int, in_features: int) -> int:
        return 0

    def shared_input_bits(self, in_features: int) -> int:
        """Bits that layers reading one input (a :class:`~ptqbench.memory.LayerShape` group of
        equal rank) share, stored once per group: 0 unless the method shares parts."""
        return 0

    # ------------------------------------------------------------------ logging
    def params(self) -> dict[str, Any]:
        """Every field flattened for logging: formats as spec strings plus each of their fields."""
        out: dict[str, Any] = {"method": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Format):
                out[f.name] = str(value)
                for k, v in value.to_dict().items():
                    if k != "name":
                        out[f"{f.name}.{k.rstrip('_')}"] = v
            else:
                out[f.name] = value
        return out

    def label(self) -> str:
        return f"{self.name} W:{self.weight_format} A:{self.act_format}"


@dataclass(frozen=True)
class LowRankMethod(Method):
    """A method with a low-rank branch of rank ``rank`` (factor format ``Q2``, input ``Qa2``)."""

    rank: int = 32
    branch_format: Format | str = format_field("bf16", model_dtype=True)
    branch_act_format: Format | str = format_field("bf16", model_dtype=True)
    # Whether the method resolves MODEL_DTYPE branch formats per layer.
    model_dtype_branch: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 0:
            raise UserError(f"{self.name}: rank must be >= 0, got {self.rank}")
        uses = MODEL_DTYPE in (self.branch_format, self.branch_act_format)
        if uses and not self.model_dtype_branch:
            raise UserError(f"{self.name}: branch format {MODEL_DTYPE!r} (the layer's dtype) is not supported")

    @property
    def branch_storage(self) -> Format:
        """The branch weight format as stored: :data:`MODEL_DTYPE` is 16 bits per element."""
        return model_dtype_format(torch.bfloat16) if self.branch_format == MODEL_DTYPE else self.branch_format

    def branch_bits(self, out_features: int, in_features: int) -> int:
        if self.rank == 0:
            return 0
        fmt = self.branch_storage
        return fmt.bits((self.rank, in_features)) + fmt.bits((out_features, self.rank))

    def down_bits(self, in_features: int) -> int:
        """Bits of the down-projection ``R`` [rank, in]."""
        return 0 if self.rank == 0 else self.branch_storage.bits((self.rank, in_features))

    def label(self) -> str:
        return f"{super().label()} r{self.rank} B:{self.branch_format}/{self.branch_act_format}"


def get_method(name: str, **fields: Any) -> Method:
    """A method by its registered name with its config fields as keywords."""
    cls = METHODS.get(name)
    valid = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(fields) - valid)
    if bad:
        raise UserError(f"method {name}: unknown field(s) {', '.join(bad)} (valid: {', '.join(sorted(valid))})")
    try:
        return cls(**fields)
    except TypeError as exc:
        raise UserError(f"method {name}: {exc}") from None
