"""``fmnist-dit``: a small, real, trained diffusion transformer shipped with ptqbench.

The transformer is a diffusers ``PixArtTransformer2DModel`` (so the PixArt adapter's skip list
and activation floors apply unchanged) trained with a rectified-flow objective in pixel space on Fashion-MNIST:
images ``[1, 32, 32]`` in [-1, 1] (28x28 padded with black), the class as 4 caption tokens from
a learned table of 11 entries (10 classes + a null class for classifier-free guidance).
Sampling: ``FlowMatchEulerDiscreteScheduler`` (Euler), guidance with the null class.
Prompts are class names (``FMNIST_CLASSES``); images come back ``[N, 3, 32, 32]`` in [0, 1]
(gray replicated to 3 channels, the padding kept so every image metric sees 32x32).

Also here: the compact CNN classifier whose predictions and penultimate features drive the
``class_accuracy`` and ``fd_fmnist`` metrics. Weights live in ``ptqbench/assets``
(``ptqbench train-default`` retrains both; see ``assets/MODEL_CARD.md``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ptqbench.errors import UserError
from ptqbench.models.adapters import PIXART
from ptqbench.models.base import MODELS, GenSettings, ModelSpec, Pipeline
from ptqbench.models.fmnist_data import FMNIST_CLASSES, PIXEL_MEAN, PIXEL_STD, class_index

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIT_FILE = "fmnist_dit.safetensors"
CLASSIFIER_FILE = "fmnist_classifier.safetensors"
NULL_CLASS = len(FMNIST_CLASSES)
_META_KEY = "ptqbench"
_RETRAIN = "ptqbench train-default --data DIR --out DIR (see ptqbench/assets/MODEL_CARD.md)"


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the Fashion-MNIST DiT (defaults: the shipped model, 6.95M parameters)."""

    hidden: int = 256
    layers: int = 6
    head_dim: int = 64
    patch: int = 2
    image_size: int = 32
    caption_channels: int = 128
    caption_tokens: int = 4

    def __post_init__(self) -> None:
        if self.hidden % self.head_dim:
            raise UserError(f"DiT config hidden: {self.hidden} must be a multiple of head_dim {self.head_dim}")
        if self.image_size % self.patch or self.image_size < 28 or self.image_size % 2:
            raise UserError(f"DiT config image_size: {self.image_size} (valid: even, >= 28, multiple of patch)")
        if min(self.layers, self.caption_channels, self.caption_tokens) < 1:
            raise UserError("DiT config layers, caption_channels, caption_tokens: must be >= 1")

    def transformer_kwargs(self) -> dict[str, Any]:
        """Arguments of ``PixArtTransformer2DModel`` for this config."""
        return {
            "num_attention_heads": self.hidden // self.head_dim,
            "attention_head_dim": self.head_dim,
            "in_channels": 1,
            "out_channels": 1,
            "num_layers": self.layers,
            "cross_attention_dim": self.hidden,
            "sample_size": self.image_size,
            "patch_size": self.patch,
            "caption_channels": self.caption_channels,
            "use_additional_conditions": False,
            "norm_num_groups": 32,
        }


def build_transformer(config: DiTConfig) -> nn.Module:
    """A freshly initialized PixArt transformer (random weights from the current torch seed)."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(**config.transformer_kwargs())


class LabelTokens(nn.Module):
    """Class label -> ``[B, caption_tokens, caption_channels]`` caption tokens (row 10 = null class)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.tokens, self.channels = config.caption_tokens, config.caption_channels
        self.table = nn.Embedding(NULL_CLASS + 1, self.tokens * self.channels)
        nn.init.normal_(self.table.weight, std=0.5)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels).view(-1, self.tokens, self.channels)


def velocity(transformer: nn.Module, tokens: LabelTokens, x: torch.Tensor, sigma: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
    """The model's rectified-flow velocity ``v = noise - x0`` at ``x_sigma = (1-sigma) x0 + sigma noise``."""
    dtype = next(transformer.parameters()).dtype
    return transformer(
        x.to(dtype),
        encoder_hidden_states=tokens(labels).to(dtype),
        timestep=(sigma * 1000.0).to(x.device),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},  # use_additional_conditions=False
        return_dict=False,
    )[0]


def sample(transformer: nn.Module, tokens: LabelTokens, noise: torch.Tensor, labels: torch.Tensor,
           steps: int, guidance: float) -> torch.Tensor:
    """Euler sampling from ``noise`` (float32, on the model's device) to images in [-1, 1]."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    guided = guidance != 1.0
    null = torch.full_like(labels, NULL_CLASS)
    for t in scheduler.timesteps:
        sigma = (t / 1000.0).expand(x.shape[0]).float()
        if guided:
            v_c, v_u = velocity(transformer, tokens, x.repeat(2, 1, 1, 1), sigma.repeat(2),
                                torch.cat([labels, null])).float().chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = velocity(transformer, tokens, x, sigma, labels).float()
        x = scheduler.step(v, t, x).prev_sample
    return x


def to_images(x: torch.Tensor) -> torch.Tensor:
    """Model space ``[N, 1, H, W]`` in [-1, 1] -> float32 ``[N, 3, H, W]`` in [0, 1] on the CPU."""
    return ((x.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0).repeat(1, 3, 1, 1)


def _metadata(config: dict[str, Any], info: dict[str, Any]) -> dict[str, str]:
    return {_META_KEY: json.dumps({"config": config, "info": info}, sort_keys=True)}


def _read_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise UserError(f"{path}: not a ptqbench Fashion-MNIST weight file (no {_META_KEY!r} metadata)")
    return json.loads(meta[_META_KEY])


def _fp16_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()}


def save_dit(path: str | Path, transformer: nn.Module, tokens: LabelTokens, config: DiTConfig,
             info: dict[str, Any]) -> Path:
    """Write transformer + label table as one fp16 safetensors file with the config in its metadata."""
    path = Path(path)
    state = {**_fp16_state(transformer, "transformer."), **_fp16_state(tokens, "tokens.")}
    save_file(state, str(path), metadata=_metadata(asdict(config), info))
    return path


def _weights_file(path: str | Path | None, name: str, what: str) -> Path:
    p = ASSETS / name if path is None else Path(path).expanduser()
    if p.is_dir():
        p = p / name
    if not p.is_file():
        where = "the shipped asset" if path is None else "the path given"
        raise UserError(f"{what}: weights file {p} not found ({where}); retrain with {_RETRAIN}")
    return p


def load_dit(path: str | Path | None = None) -> tuple[nn.Module, LabelTokens, DiTConfig, dict[str, Any]]:
    """``(transformer, tokens, config, info)`` in float32 on the CPU from a file or folder (default: shipped)."""
    file = _weights_file(path, DIT_FILE, "fmnist-dit")
    meta = _read_metadata(file)
    config = DiTConfig(**meta["config"])
    transformer, tokens = build_transformer(config), LabelTokens(config)
    state = load_file(str(file))
    transformer.load_state_dict({k.removeprefix("transformer."): v for k, v in state.items()
                                 if k.startswith("transformer.")})
    tokens.load_state_dict({k.removeprefix("tokens."): v for k, v in state.items() if k.startswith("tokens.")})
    return transformer.float().eval(), tokens.float().eval(), config, {**meta["info"], "file": str(file)}


class FMNISTPipeline(Pipeline):
    """Class-conditional sampling of the Fashion-MNIST DiT; prompts are class names."""

    def __init__(self, spec: ModelSpec, transformer: nn.Module, tokens: LabelTokens, config: DiTConfig,
                 device: torch.device, dtype: torch.dtype, weights: dict[str, Any] | None = None):
        # nn.Module.to: diffusers' override warns about fp32 modules this model does not have.
        super().__init__(spec, nn.Module.to(transformer, device, dtype).eval(), device, dtype)
        self.tokens = tokens.to(device, dtype).eval()
        self.config = config
        self.weights = weights or {}

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
        if settings.resolution != self.config.image_size:
            raise UserError(f"{self.spec.name}: resolution {settings.resolution} "
                            f"(valid: {self.config.image_size}, the size it was trained at)")
        labels = torch.tensor([class_index(p) for p in prompts], dtype=torch.long)
        size = self.config.image_size
        noise = torch.stack([torch.randn((1, size, size), generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds]) if seeds else torch.empty(0, 1, size, size)
        out = []
        for i in range(0, len(prompts), max(1, settings.batch_size)):
            j = i + max(1, settings.batch_size)
            x = sample(self.transformer, self.tokens, noise[i:j].to(self.device), labels[i:j].to(self.device),
                       settings.steps, settings.guidance)
            out.append(to_images(x))
            if progress is not None:
                progress(len(out[-1]))
        return torch.cat(out) if out else torch.empty(0, 3, size, size)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "weights": self.weights.get("file", "")}


def load_pipeline(spec: ModelSpec, path: str | None, device: torch.device, dtype: torch.dtype) -> FMNISTPipeline:
    """The ModelSpec loader: shipped weights, or a file/folder from ``ptqbench train-default``."""
    transformer, tokens, config, info = load_dit(path)
    return FMNISTPipeline(spec, transformer, tokens, config, device, dtype, info)


# ----------------------------------------------------------------------------- classifier


class FMNISTClassifier(nn.Module):
    """Compact CNN for Fashion-MNIST; ``features`` are the penultimate (ReLU) activations.

    Inputs are images in [0, 1], ``[N, 1 or 3, H, W]``: 3 channels are averaged to gray, 32x32
    (the DiT's canvas) is center-cropped to 28x28, any other size is resized to 28x28.
    """

    def __init__(self, width: int = 16, features: int = 128, dropout: float = 0.3):
        super().__init__()
        self.width, self.n_features = width, features

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.body = nn.Sequential(
            *block(1, w), nn.MaxPool2d(2),  # 28 -> 14
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),  # 14 -> 7
            *block(2 * w, 4 * w),
            nn.Flatten(), nn.Linear(4 * w * 49, features), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, len(FMNIST_CLASSES)))

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] == (32, 32):
            x = x[..., 2:30, 2:30]
        elif x.shape[-2:] != (28, 28):
            x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        return (x - PIXEL_MEAN) / PIXEL_STD

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def config(self) -> dict[str, int]:
        return {"width": self.width, "features": self.n_features}


def save_classifier(path: str | Path, model: FMNISTClassifier, info: dict[str, Any]) -> Path:
    path = Path(path)
    save_file(_fp16_state(model, ""), str(path), metadata=_metadata(model.config(), info))
    return path


def load_classifier(path: str | Path | None = None) -> tuple[FMNISTClassifier, dict[str, Any]]:
    """``(classifier in eval mode, float32 on the CPU, info)`` from a file or folder (default: shipped)."""
    file = _weights_file(path, CLASSIFIER_FILE, "Fashion-MNIST classifier")
    meta = _read_metadata(file)
    model = FMNISTClassifier(**meta["config"])
    model.load_state_dict({k: v.float() for k, v in load_file(str(file)).items()})
    return model.eval(), {**meta["info"], "file": str(file)}


@torch.no_grad()
def classify(model: FMNISTClassifier, images: torch.Tensor, device: str | torch.device = "cpu",
             batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted class [N], penultimate features float64 [N, F])`` on the CPU."""
    model = model.to(device).eval()
    preds, feats = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(images[i:i + batch_size].to(device))
        preds.append(model.head(f).argmax(dim=1).cpu())
        feats.append(f.double().cpu())
    if not preds:
        return torch.empty(0, dtype=torch.long), torch.empty(0, model.n_features, dtype=torch.float64)
    return torch.cat(preds), torch.cat(feats)


SPEC = ModelSpec(
    name="fmnist-dit",
    description="PixArt-architecture DiT (6.95M params) trained on Fashion-MNIST; runs offline on a CPU",
    adapter=PIXART,  # a PixArtTransformer2DModel: PixArt's layer rules (its own Pipeline samples)
    loader="ptqbench.models.fmnist:load_pipeline",
    dtype="bf16",
    defaults=GenSettings(steps=20, guidance=2.0, resolution=32, batch_size=64),
)
MODELS.register(SPEC.name, SPEC)
