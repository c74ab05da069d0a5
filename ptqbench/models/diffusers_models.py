"""PixArt-Sigma, SANA and FLUX.1 through diffusers: real loaders, tiny in-process pipelines, full configs.

Real weights come from a local diffusers folder (the loader's ``path`` or
``$PTQBENCH_MODEL_<NAME>``) or from the Hugging Face hub id of the spec; when neither is
available the loader raises one :class:`UserError` that says how to provide them.
``tiny-pixart`` / ``tiny-sana`` / ``tiny-flux`` are whole diffusers pipelines with a few thousand
random, seeded weights (tiny T5 / Gemma2 / CLIP, tiny VAE / DC-AE, a byte-level tokenizer built in
code) that run end to end on a CPU. ``TRANSFORMER_CONFIGS`` hold the transformers' configs (the
released ones and the tiny ones), so :func:`build_transformer` gives shape-true models with random
weights and no download. What differs between architectures lives in the spec's adapter.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqbench.cache import cache_key
from ptqbench.errors import UserError
from ptqbench.models.adapters import FLUX, PIXART, SANA
from ptqbench.models.base import GenSettings, ModelSpec, Pipeline

PIXART_SIGMA_1024: dict[str, Any] = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
    "dropout": 0.0,
    "in_channels": 4,
    "interpolation_scale": 2,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 128,
    "upcast_attention": False,
    "use_additional_conditions": False,
}
PIXART_SIGMA_512 = {**PIXART_SIGMA_1024, "sample_size": 64, "interpolation_scale": 1}
SANA_1600M: dict[str, Any] = {
    "attention_bias": False,
    "attention_head_dim": 32,
    "caption_channels": 2304,
    "cross_attention_dim": 2240,
    "cross_attention_head_dim": 112,
    "dropout": 0.0,
    "in_channels": 32,
    "interpolation_scale": None,
    "mlp_ratio": 2.5,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "num_attention_heads": 70,
    "num_cross_attention_heads": 20,
    "num_layers": 20,
    "out_channels": 32,
    "patch_size": 1,
    "sample_size": 32,
}
SANA_600M = {
    **SANA_1600M,
    "num_attention_heads": 36,
    "num_cross_attention_heads": 16,
    "cross_attention_head_dim": 72,
    "cross_attention_dim": 1152,
    "num_layers": 28,
}
FLUX_1_DEV: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

TINY_PIXART: dict[str, dict[str, Any]] = {
    "transformer": {
        **PIXART_SIGMA_1024,
        "sample_size": 16,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "caption_channels": 32,
        "cross_attention_dim": 64,
        "norm_num_groups": 8,
        "interpolation_scale": 1,
    },
    "text_encoder": {
        "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    },
    "vae": {
        "block_out_channels": [16, 32],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4, "norm_num_groups": 8, "layers_per_block": 1, "sample_size": 32,
    },
    "scheduler": {
        "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
        "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "epsilon", "solver_order": 2,
        "solver_type": "midpoint", "timestep_spacing": "linspace",
    },
}
TINY_SANA: dict[str, dict[str, Any]] = {
    "transformer": {
        **SANA_1600M,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 32,
        "num_cross_attention_heads": 2,
        "cross_attention_head_dim": 32,
        "cross_attention_dim": 64,
        "caption_channels": 32,
        "sample_size": 16,
    },
    "text_encoder": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 256,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    },
    "vae": {
        "in_channels": 3, "latent_channels": 4, "attention_head_dim": 4,
        "encoder_block_types": ["ResBlock", "EfficientViTBlock"],
        "decoder_block_types": ["ResBlock", "EfficientViTBlock"],
        "encoder_block_out_channels": [16, 16], "decoder_block_out_channels": [16, 16],
        "encoder_qkv_multiscales": [[], [5]], "decoder_qkv_multiscales": [[], [5]],
        "encoder_layers_per_block": [1, 1], "decoder_layers_per_block": [1, 1],
        "downsample_block_type": "conv", "upsample_block_type": "interpolate",
        "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "scaling_factor": 0.41407,
    },
    "scheduler": {"flow_shift": 3.0, "use_flow_sigmas": True, "prediction_type": "flow_prediction"},
}


TINY_FLUX: dict[str, dict[str, Any]] = {
    "transformer": {
        **FLUX_1_DEV,
        "in_channels": 16,  # 4 latent channels packed 2x2
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "axes_dims_rope": [4, 6, 6],
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
    },
    "text_encoder": {  # CLIP: the pooled prompt (its eos token is the tokenizer's </s>, id 1)
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "projection_dim": 32, "max_position_embeddings": 128, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    },
    "text_encoder_2": TINY_PIXART["text_encoder"],  # T5: the prompt tokens
    "vae": {**TINY_PIXART["vae"], "scaling_factor": 0.3611, "shift_factor": 0.1159,
            "use_quant_conv": False, "use_post_quant_conv": False},
    "scheduler": {  # FLUX.1-dev's
        "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
    },
}
# model name -> (diffusers transformer class, config): the released checkpoints and the tiny pipelines
TRANSFORMER_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "pixart-sigma": (PIXART.transformer_class, PIXART_SIGMA_1024),
    "pixart-sigma-512": (PIXART.transformer_class, PIXART_SIGMA_512),
    "sana-1.6b": (SANA.transformer_class, SANA_1600M),
    "sana-600m": (SANA.transformer_class, SANA_600M),
    "flux.1-dev": (FLUX.transformer_class, FLUX_1_DEV),
    "tiny-pixart": (PIXART.transformer_class, TINY_PIXART["transformer"]),
    "tiny-sana": (SANA.transformer_class, TINY_SANA["transformer"]),
    "tiny-flux": (FLUX.transformer_class, TINY_FLUX["transformer"]),
}


def build_transformer(
    name: str, device: str | torch.device = "meta", dtype: torch.dtype | None = None, seed: int = 0,
    **overrides: Any,
) -> nn.Module:
    """The transformer of model ``name`` from its config (keys in ``overrides`` replaced) with random
    weights (no download).

    On ``"meta"`` it is instant and holds no memory (for layer selection and accounting).
    """
    import diffusers

    if name not in TRANSFORMER_CONFIGS:
        raise UserError(f"full config: unknown model {name!r} (valid: {', '.join(TRANSFORMER_CONFIGS)})")
    cls_name, config = TRANSFORMER_CONFIGS[name]
    cls = getattr(diffusers, cls_name)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = cls.from_config({**config, **overrides})
    return model.to(dtype) if dtype is not None else model


# ----------------------------------------------------------------------------- the pipeline


class DiffusersPipeline(Pipeline):
    """A diffusers text-to-image pipeline (PixArt-Sigma, SANA, FLUX.1) behind :meth:`generate`.

    Each image's initial noise is drawn on the CPU from ``torch.Generator().manual_seed(seed)``
    in float32 (the spec's adapter gives its layout) and passed to diffusers as ``latents``, so
    neither batching nor the device changes an image's noise (batched kernels may still round
    differently, ~1e-7 on a CPU). The call arguments are the adapter's plus ``call_kwargs``.
    """

    def __init__(
        self,
        spec: ModelSpec,
        pipe: Any,
        device: torch.device,
        dtype: torch.dtype,
        *,
        weights: str,
        max_sequence_length: int | None = None,
        call_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(spec, pipe.transformer, device, dtype)
        self.pipe = pipe
        self.weights = weights
        self.max_sequence_length = max_sequence_length or spec.adapter.max_sequence_length
        self.call_kwargs = {**spec.adapter.call_kwargs, **(call_kwargs or {})}
        pipe.set_progress_bar_config(disable=True)
        for module in pipe.components.values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False).eval()

    @property
    def latent_channels(self) -> int:
        return self.spec.adapter.latent_channels(self.transformer)

    @property
    def downsample(self) -> int:
        """Pixels per transformer token along a side: the resolution must be a multiple."""
        return self.spec.adapter.downsample(self.transformer, self.pipe.vae_scale_factor)

    def noise(self, seed: int, resolution: int) -> torch.Tensor:
        """The initial latents of one image (float32, CPU; ``[1, C, h, w]`` unless the adapter packs them)."""
        if resolution % self.downsample:
            raise UserError(
                f"resolution {resolution}: must be a multiple of {self.downsample} for model {self.spec.name}"
            )
        side = resolution // int(self.pipe.vae_scale_factor)
        return self.spec.adapter.noise(seed, self.latent_channels, side)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        settings: GenSettings,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if settings.batch_size < 1:
            raise UserError(f"batch_size: must be >= 1, got {settings.batch_size}")
        latent_dtype = self.spec.adapter.torch_latent_dtype(self.dtype)
        out = []
        for start in range(0, len(prompts), settings.batch_size):
            batch = list(prompts[start : start + settings.batch_size])
            noise = torch.cat([self.noise(s, settings.resolution) for s in seeds[start : start + len(batch)]])
            images = self.pipe(
                prompt=batch,
                latents=noise.to(self.device, latent_dtype),
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                height=settings.resolution,
                width=settings.resolution,
                output_type="pt",
                max_sequence_length=self.max_sequence_length,
                **self.call_kwargs,
            ).images
            out.append(images.float().clamp(0, 1).cpu())
            if progress is not None:
                progress(len(batch))
        return torch.cat(out) if out else torch.empty(0, 3, settings.resolution, settings.resolution)

    def info(self) -> dict[str, Any]:
        scheduler = self.pipe.scheduler
        config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
        return {
            **super().info(),
            "weights": self.weights,
            "scheduler": f"{type(scheduler).__name__}:{cache_key(config)}",
            "text_encoder_dtype": str(self.pipe.text_encoder.dtype).removeprefix("torch."),
            "max_sequence_length": self.max_sequence_length,
            "call": cache_key(self.call_kwargs),
        }


# ----------------------------------------------------------------------------- real weights


def env_var(name: str) -> str:
    """The environment variable that points model ``name`` at a local copy."""
    return "PTQBENCH_MODEL_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def unavailable(spec: ModelSpec, cause: str = "") -> UserError:
    """The one message for missing weights: which hub id and how to use a local copy."""
    why = f" ({cause})" if cause else ""
    return UserError(
        f"model {spec.name}: weights of {spec.hub_id} are not available{why}. Download them with "
        f"`huggingface-cli download {spec.hub_id}` (needs internet), or point ptqbench at a local copy "
        f"(a diffusers folder): the model path (suite field `path`) or {env_var(spec.name)}=/path/to/folder"
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return flag.upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def _hub_revision(repo: str, filename: str) -> str | None:
    """The cached snapshot commit of ``repo`` (from the cache layout), or None if not cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    if not isinstance(found, str):
        return None
    parts = Path(found).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else "cached"


def _local_identity(folder: Path) -> str:
    """A fingerprint of a local weights folder: its path and each file's size and mtime."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    stamp = [(str(p.relative_to(folder)), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    return f"path:{folder.resolve()}:{cache_key(stamp)}"


def resolve_source(spec: ModelSpec, path: str | None, marker: str = "model_index.json") -> tuple[str, str | None]:
    """Where to load ``spec`` from: (local folder or hub id, local identity or None for the hub).

    Raises the missing-weights :class:`UserError` when the hub is offline and nothing is cached.
    """
    given = path or os.environ.get(env_var(spec.name))
    if given:
        folder = Path(given).expanduser()
        if not folder.is_dir():
            raise UserError(
                f"model {spec.name}: path {given} is not a folder (expected a diffusers copy of {spec.hub_id})"
            )
        return str(folder), _local_identity(folder)
    if spec.hub_id is None:
        raise UserError(f"model {spec.name}: no hub id and no path; set {env_var(spec.name)}=/path/to/folder")
    if _hub_offline() and _hub_revision(spec.hub_id, marker) is None:
        raise unavailable(spec, "the hub is offline (HF_HUB_OFFLINE) and it is not in the Hugging Face cache")
    return spec.hub_id, None


def _from_pretrained(spec: ModelSpec, load: Callable[[], Any], source: str) -> Any:
    try:
        return load()
    except OSError as exc:
        if Path(source).is_dir():
            raise UserError(f"model {spec.name}: cannot load the diffusers folder {source}: {exc}") from None
        raise unavailable(spec, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _weights_id(spec: ModelSpec, source: str, local: str | None, marker: str = "model_index.json") -> str:
    return local or f"{source}@{_hub_revision(source, marker) or 'hub'}"


def load_diffusers(spec: ModelSpec, path: str | None, device: torch.device, dtype: torch.dtype) -> Pipeline:
    """The adapter's diffusers pipeline (e.g. PixArtSigmaPipeline, SanaPipeline, FluxPipeline) from a
    folder or the hub."""
    source, local = resolve_source(spec, path)  # before importing diffusers: a missing model fails fast
    import diffusers

    cls = getattr(diffusers, spec.adapter.pipeline_class)
    pipe = _from_pretrained(spec, lambda: cls.from_pretrained(source, dtype=dtype), source)
    weights = _weights_id(spec, source, local)
    return DiffusersPipeline(spec, pipe.to(device), device, dtype, weights=weights)


PIXART_BASE = "pixart-sigma"  # whose T5, VAE and scheduler a transformer-only PixArt checkpoint uses


def load_pixart_transformer_only(
    spec: ModelSpec, path: str | None, device: torch.device, dtype: torch.dtype
) -> Pipeline:
    """A PixArt-Sigma transformer checkpoint (e.g. the 512px one, published without T5/VAE) with
    the other components of ``pixart-sigma``; a full pipeline folder given as path is loaded whole."""
    from ptqbench.models.base import get_model

    source, local = resolve_source(spec, path, marker="transformer/config.json")
    if Path(source).is_dir() and (Path(source) / "model_index.json").is_file():
        return load_diffusers(spec, source, device, dtype)
    base = get_model(PIXART_BASE)
    base_source, base_local = resolve_source(base, None)
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    sub = "transformer" if local is None or (Path(source) / "transformer").is_dir() else None
    transformer = _from_pretrained(
        spec, lambda: PixArtTransformer2DModel.from_pretrained(source, subfolder=sub, dtype=dtype), source
    )
    pipe = _from_pretrained(
        base,
        lambda: PixArtSigmaPipeline.from_pretrained(base_source, transformer=transformer, dtype=dtype),
        base_source,
    )
    own = _weights_id(spec, source, local, "transformer/config.json")
    weights = f"{own}+{_weights_id(base, base_source, base_local)}"
    return DiffusersPipeline(spec, pipe.to(device), device, dtype, weights=weights)


# ----------------------------------------------------------------------------- tiny pipelines

TINY_SEED = 0
TINY_SEQUENCE_LENGTH = 128  # bytes: the shipped prompts fit


def tiny_tokenizer(kind: str) -> Any:
    """A byte-level tokenizer built in code (no download): every byte is a token.

    ``kind="t5"`` appends ``</s>`` (pad 0, eos 1); ``kind="gemma"`` prepends ``<bos>`` (pad 0, eos 1, bos 2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"] if kind == "t5" else ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def _place(pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
    """Move a freshly built (float32, CPU) pipeline to ``device`` / ``dtype``."""
    if dtype != torch.float32:
        for module in pipe.components.values():
            if isinstance(module, nn.Module):
                module.to(dtype)
    pipe.to(device)


def _tiny_weights(name: str, configs: dict[str, Any]) -> str:
    import diffusers
    import transformers

    versions = f"torch={torch.__version__},diffusers={diffusers.__version__},transformers={transformers.__version__}"
    return f"{name}:seed={TINY_SEED}:{cache_key(configs)}:{versions}"


def _no_path(spec: ModelSpec, path: str | None) -> None:
    if path:
        raise UserError(f"model {spec.name}: built in-process from configs, it takes no path (got {path})")


def load_tiny_pixart(spec: ModelSpec, path: str | None, device: torch.device, dtype: torch.dtype) -> Pipeline:
    """A tiny PixArt-Sigma pipeline with seeded random weights (tiny T5, tiny AutoencoderKL, DPM-Solver)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    _no_path(spec, path)
    c = TINY_PIXART
    tokenizer = tiny_tokenizer("t5")
    text_encoder = _seeded(TINY_SEED, lambda: T5EncoderModel(T5Config(vocab_size=len(tokenizer), **c["text_encoder"])))
    transformer = _seeded(TINY_SEED + 1, lambda: PixArtTransformer2DModel.from_config(c["transformer"]))
    vae = _seeded(TINY_SEED + 2, lambda: AutoencoderKL(**c["vae"]))
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**c["scheduler"]),
    )
    _place(pipe, device, dtype)
    return DiffusersPipeline(
        spec, pipe, device, dtype, weights=_tiny_weights(spec.name, c),
        max_sequence_length=TINY_SEQUENCE_LENGTH,
    )


def load_tiny_sana(spec: ModelSpec, path: str | None, device: torch.device, dtype: torch.dtype) -> Pipeline:
    """A tiny SANA pipeline with seeded random weights (tiny Gemma2, tiny DC-AE, flow DPM-Solver)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    _no_path(spec, path)
    c = TINY_SANA
    tokenizer = tiny_tokenizer("gemma")
    text_encoder = _seeded(
        TINY_SEED,
        lambda: Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), attn_implementation="eager", **c["text_encoder"])),
    )
    transformer = _seeded(TINY_SEED + 1, lambda: SanaTransformer2DModel.from_config(c["transformer"]))
    vae = _seeded(TINY_SEED + 2, lambda: AutoencoderDC(**c["vae"]))
    pipe = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**c["scheduler"]),
    )
    _place(pipe, device, dtype)
    return DiffusersPipeline(
        spec, pipe, device, dtype, weights=_tiny_weights(spec.name, c),
        max_sequence_length=TINY_SEQUENCE_LENGTH, call_kwargs={"complex_human_instruction": None},
    )


def load_tiny_flux(spec: ModelSpec, path: str | None, device: torch.device, dtype: torch.dtype) -> Pipeline:
    """A tiny FLUX.1 pipeline with seeded random weights (tiny CLIP + T5, tiny AutoencoderKL, flow Euler)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    _no_path(spec, path)
    c = TINY_FLUX
    tokenizer, tokenizer_2 = tiny_tokenizer("t5"), tiny_tokenizer("t5")
    tokenizer.model_max_length = c["text_encoder"]["max_position_embeddings"]  # FluxPipeline pads CLIP to it
    text_encoder = _seeded(
        TINY_SEED, lambda: CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **c["text_encoder"]))
    )
    text_encoder_2 = _seeded(
        TINY_SEED + 3, lambda: T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **c["text_encoder_2"]))
    )
    transformer = _seeded(TINY_SEED + 1, lambda: FluxTransformer2DModel.from_config(c["transformer"]))
    vae = _seeded(TINY_SEED + 2, lambda: AutoencoderKL(**c["vae"]))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**c["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    _place(pipe, device, dtype)
    return DiffusersPipeline(
        spec, pipe, device, dtype, weights=_tiny_weights(spec.name, c), max_sequence_length=TINY_SEQUENCE_LENGTH
    )
