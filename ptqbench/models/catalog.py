"""Catalog of built-in models: PixArt-Sigma, SANA and FLUX.1 (real, through diffusers), tiny CPU
pipelines, and the shipped Fashion-MNIST DiT (registered by its own module)."""

from ptqbench.models import fmnist  # noqa: F401  (registers fmnist-dit)
from ptqbench.models.adapters import FLUX, PIXART, SANA
from ptqbench.models.base import MODELS, GenSettings, ModelSpec

_LOADERS = "ptqbench.models.diffusers_models"

for _spec in (
    ModelSpec(
        name="pixart-sigma",
        description="PixArt-Sigma XL-2 1024px (PixArtSigmaPipeline, T5-XXL, fp16, 20-step DPM-Solver, cfg 4.5)",
        adapter=PIXART,
        loader=f"{_LOADERS}:load_diffusers",
        hub_id="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        dtype="fp16",
        defaults=GenSettings(steps=20, guidance=4.5, resolution=1024, batch_size=4),
    ),
    ModelSpec(
        name="pixart-sigma-512",
        description="PixArt-Sigma XL-2 512px transformer with pixart-sigma's T5 and VAE (fp16, 20-step DPM-Solver)",
        adapter=PIXART,
        loader=f"{_LOADERS}:load_pixart_transformer_only",
        hub_id="PixArt-alpha/PixArt-Sigma-XL-2-512-MS",
        dtype="fp16",
        defaults=GenSettings(steps=20, guidance=4.5, resolution=512, batch_size=8),
    ),
    ModelSpec(
        name="sana-1.6b",
        description="SANA 1600M 1024px (SanaPipeline, Gemma-2-2B, DC-AE, bf16, 20-step flow DPM-Solver, cfg 4.5)",
        adapter=SANA,
        loader=f"{_LOADERS}:load_diffusers",
        hub_id="Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers",
        dtype="bf16",
        defaults=GenSettings(steps=20, guidance=4.5, resolution=1024, batch_size=4),
    ),
    ModelSpec(
        name="sana-600m",
        description="SANA 600M 1024px (SanaPipeline, Gemma-2-2B, DC-AE, bf16, 20-step flow DPM-Solver, cfg 4.5)",
        adapter=SANA,
        loader=f"{_LOADERS}:load_diffusers",
        hub_id="Efficient-Large-Model/Sana_600M_1024px_diffusers",
        dtype="bf16",
        defaults=GenSettings(steps=20, guidance=4.5, resolution=1024, batch_size=4),
    ),
    ModelSpec(
        name="tiny-pixart",
        description="tiny PixArt-Sigma pipeline with seeded random weights, built in-process (CPU tests, smoke runs)",
        adapter=PIXART,
        loader=f"{_LOADERS}:load_tiny_pixart",
        dtype="fp32",
        defaults=GenSettings(steps=8, guidance=4.5, resolution=32, batch_size=8),
    ),
    ModelSpec(
        name="tiny-sana",
        description="tiny SANA pipeline with seeded random weights, built in-process (CPU tests, smoke runs)",
        adapter=SANA,
        loader=f"{_LOADERS}:load_tiny_sana",
        dtype="fp32",
        defaults=GenSettings(steps=8, guidance=4.5, resolution=32, batch_size=8),
    ),
    ModelSpec(
        name="flux.1-dev",
        description="FLUX.1-dev 1024px (FluxPipeline, CLIP-L + T5-XXL, bf16, 50-step flow Euler, guidance 3.5)",
        adapter=FLUX,
        loader=f"{_LOADERS}:load_diffusers",
        hub_id="black-forest-labs/FLUX.1-dev",
        dtype="bf16",
        defaults=GenSettings(steps=50, guidance=3.5, resolution=1024, batch_size=4),
    ),
    ModelSpec(
        name="tiny-flux",
        description="tiny FLUX.1 pipeline with seeded random weights, built in-process (CPU tests, smoke runs)",
        adapter=FLUX,
        loader=f"{_LOADERS}:load_tiny_flux",
        dtype="fp32",
        defaults=GenSettings(steps=8, guidance=3.5, resolution=32, batch_size=8),
    ),
):
    MODELS.register(_spec.name, _spec)
