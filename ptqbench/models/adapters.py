"""Model adapters: everything ptqbench must know about one transformer architecture, in one object.

A :class:`ModelAdapter` holds the layer rules (which Linear / 1x1 conv layers stay 16-bit and why;
which layer inputs follow an activation with a negative lower bound) and the pipeline rules (the
diffusers pipeline class, extra call arguments, the latent layout, noise and dtype). Each
registered :class:`~ptqbench.models.base.ModelSpec` carries one; adding a diffusers DiT is one
adapter plus its model entries.

The skip lists are deepcompressor's (mit-han-lab/deepcompressor @ 69f3473,
``examples/diffusion/configs/model/*.yaml`` skip keys mapped onto modules by
``deepcompressor/app/diffusion/nn/struct.py``); each reason names the deepcompressor key.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ptqbench.errors import UserError

# min over x of 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (diffusers' GELU(approximate="tanh")),
# at x = -0.75246..., in float64. deepcompressor shifts GELU inputs by 0.171875 (its rounded bound).
GELU_TANH_MIN = -0.170040750571254

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # names in specs and suites


def _why(what: str, key: str) -> str:
    return f"{what} (deepcompressor: {key})"


@dataclass(frozen=True)
class ModelAdapter:
    """How ptqbench selects, quantizes and samples one diffusers transformer architecture.

    ``skips``: fnmatch glob on the module name -> reason it stays 16-bit (the default skip list).
    ``activation_floors``: glob -> lower bound of the activation that produces that layer's input
    (layers not listed have an unbounded input). ``call_kwargs``: extra pipeline call arguments.
    ``max_sequence_length``: text tokens the released pipeline encodes.
    ``latent_dtype``: the dtype the pipeline keeps latents in (None: the model's dtype).
    ``latent_packing``: p > 1 packs p x p latent patches into tokens ``[1, hw/p^2, C p^2]`` (FLUX).
    """

    name: str
    transformer_class: str  # the diffusers class whose modules the rules name
    pipeline_class: str = ""  # the diffusers pipeline (empty: the model has its own Pipeline)
    skips: Mapping[str, str] = field(default_factory=dict)
    activation_floors: Mapping[str, float] = field(default_factory=dict)
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    max_sequence_length: int = 300
    latent_dtype: str | None = None
    latent_packing: int = 1

    def __post_init__(self) -> None:
        if self.latent_dtype is not None and self.latent_dtype not in DTYPES:
            raise UserError(f"adapter {self.name}: latent_dtype {self.latent_dtype!r} (valid: {', '.join(DTYPES)})")
        if self.latent_packing < 1:
            raise UserError(f"adapter {self.name}: latent_packing must be >= 1, got {self.latent_packing}")

    def __hash__(self) -> int:  # the mappings are not hashable; a spec (and so its adapter) may be a key
        return hash((self.name, self.transformer_class, self.pipeline_class))

    def activation_floor(self, name: str) -> float | None:
        """Lower bound of the activation that feeds layer ``name`` (None: unbounded or unknown)."""
        return next((v for p, v in self.activation_floors.items() if fnmatch.fnmatchcase(name, p)), None)

    def layer_rules(self) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, float], ...]]:
        """The rules that depend on the transformer only (two adapters of one class must agree)."""
        return tuple(self.skips.items()), tuple(self.activation_floors.items())

    def torch_latent_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return DTYPES[self.latent_dtype] if self.latent_dtype else model_dtype

    def latent_channels(self, transformer: nn.Module) -> int:
        """Channels of the latent image (before packing)."""
        return int(transformer.config.in_channels) // self.latent_packing**2

    def downsample(self, transformer: nn.Module, vae_scale_factor: int) -> int:
        """Pixels per transformer token along a side: the resolution must be a multiple of it."""
        patch = int(getattr(transformer.config, "patch_size", 1) or 1)
        return int(vae_scale_factor) * patch * self.latent_packing

    def noise(self, seed: int, channels: int, side: int) -> torch.Tensor:
        """One image's initial noise (float32, CPU): ``[1, C, side, side]`` drawn from ``seed``,
        packed to ``[1, (side/p)^2, C p^2]`` when ``latent_packing`` is p > 1 (diffusers' layout)."""
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        x = torch.randn(1, channels, side, side, generator=gen, dtype=torch.float32)
        p = self.latent_packing
        if p == 1:
            return x
        x = x.view(1, channels, side // p, p, side // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(1, (side // p) ** 2, channels * p * p)


GENERIC = ModelAdapter("generic", transformer_class="")

_DIT_EMBEDS = {  # PixArt-Sigma and SANA alike: DiTStruct's text_embed and output_embed
    "caption_projection.*": _why("caption projection", "embed"),
    "proj_out": _why("output projection", "embed"),
}
_CROSS_KV = {  # a cross-attention's to_k / to_v are DiffusionAttentionStruct's add_k_proj / add_v_proj
    "transformer_blocks.*.attn2.to_k": _why("cross-attention key, reads the text", "attn_add"),
    "transformer_blocks.*.attn2.to_v": _why("cross-attention value, reads the text", "attn_add"),
}

PIXART = ModelAdapter(
    "pixart",
    transformer_class="PixArtTransformer2DModel",
    pipeline_class="PixArtSigmaPipeline",
    skips={
        "pos_embed.*": _why("patch embedding", "embed"),
        "adaln_single.emb.*": _why("timestep embedding", "embed"),
        "adaln_single.linear": _why("adaLN modulation shared by all blocks", "embed"),
        **_DIT_EMBEDS,
        **_CROSS_KV,
    },
    # FeedForward(activation_fn="gelu-approximate"): net.2 reads GELU(tanh) of net.0.proj
    activation_floors={"transformer_blocks.*.ff.net.2": GELU_TANH_MIN},
    # caption cleaning depends on optional packages (bs4, ftfy); off, so images do not depend on them
    call_kwargs={"use_resolution_binning": False, "clean_caption": False},
)

SANA = ModelAdapter(
    "sana",
    transformer_class="SanaTransformer2DModel",
    pipeline_class="SanaPipeline",
    skips={
        "patch_embed.*": _why("patch embedding", "embed"),
        "time_embed.emb.*": _why("timestep embedding", "embed"),
        "time_embed.linear": _why("adaLN modulation shared by all blocks", "embed"),
        **_DIT_EMBEDS,
        **_CROSS_KV,
    },
    # GLUMBConv's conv_point reads x * SiLU(gate), unbounded below: deepcompressor shifts no "_glu"
    # activation (infer_lowerbound returns None), so SANA has no floors.
    call_kwargs={"use_resolution_binning": False},
    latent_dtype="fp32",  # SanaPipeline keeps its latents in float32 whatever the model's dtype
)

_WEIGHT_ONLY = "{}, quantized weight-only there"  # flux.1-dev.yaml skips these keys for inputs only
FLUX = ModelAdapter(
    "flux",
    transformer_class="FluxTransformer2DModel",
    pipeline_class="FluxPipeline",
    skips={  # flux.1-dev.yaml skips embed (not attn_add / ffn_add); its norms' inputs stay 16-bit
        "x_embedder": _why("patch embedding", "embed"),
        "time_text_embed.*": _why("timestep, guidance and pooled-text embedding", "embed"),
        "context_embedder": _why("text embedding", "embed"),
        "norm_out.linear": _why("output adaLN modulation", "embed"),
        "proj_out": _why("output projection", "embed"),
        "transformer_blocks.*.norm1.linear": _why("adaLN modulation", _WEIGHT_ONLY.format("transformer_norm")),
        "transformer_blocks.*.norm1_context.linear": _why(
            "adaLN modulation", _WEIGHT_ONLY.format("transformer_add_norm")
        ),
        "single_transformer_blocks.*.norm.linear": _why("adaLN modulation", _WEIGHT_ONLY.format("transformer_norm")),
    },
    # ff / ff_context: FeedForward(activation_fn="gelu-approximate"). A single block's proj_out reads
    # [attention output, GELU(proj_mlp)] (deepcompressor splits it in two; one Linear here): no floor.
    activation_floors={
        "transformer_blocks.*.ff.net.2": GELU_TANH_MIN,
        "transformer_blocks.*.ff_context.net.2": GELU_TANH_MIN,
    },
    max_sequence_length=512,
    latent_packing=2,
)
