"""Seconds per image of the full PixArt-Sigma transformer: 16-bit vs ptqbench's emulated quantization.

The transformer is built from its released config with random weights (no download); random
caption embeddings ``[2, 300, 4096]`` (uncond + cond) stand in for T5; the 20-step DPM-Solver++
loop with classifier-free guidance (4.5) runs against the transformer directly at 1024 px
(128x128 latents), without a VAE. Variants: the 16-bit model, RTN W4A4 MXFP4, and an SVDQuant-like
rank-32 16-bit branch with an MXFP4 W4A4 residual (``ptqbench.layers``; plus the registered
``svdquant`` method when one is registered).

    PYTHONPATH=. python benchmarks/bench_generation.py --out $OUT/gen.json     # GPU, full model
    python benchmarks/bench_generation.py --small --out /tmp/gen.json          # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqbench.cudagraph import cuda_graphs
from ptqbench.layers import LowRankBranch, QuantLinear, dense_weight
from ptqbench.method import METHODS, get_method
from ptqbench.models.diffusers_models import PIXART_SIGMA_1024, TINY_PIXART
from ptqbench.patching import PatchReport, quantize_model, replace_module, restore_model, select_layers

FULL = {"config": PIXART_SIGMA_1024, "latent": 128, "tokens": 300}  # 1024 px / VAE 8
SMALL = {"config": TINY_PIXART["transformer"], "latent": 16, "tokens": 16}


def build(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The transformer from ``config`` with seeded random weights, directly on ``device``."""
    from diffusers import PixArtTransformer2DModel

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = PixArtTransformer2DModel.from_config(config)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def scheduler() -> Any:
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**TINY_PIXART["scheduler"])  # PixArt-Sigma's released scheduler config


@torch.no_grad()
def sample(
    model: nn.Module, latents: torch.Tensor, captions: torch.Tensor, steps: int, guidance: float
) -> torch.Tensor:
    """DPM-Solver++ (2M) with classifier-free guidance; ``captions`` = [uncond; cond] per image."""
    sched = scheduler()
    sched.set_timesteps(steps, device=latents.device)
    x = latents * sched.init_noise_sigma
    mask = torch.ones(captions.shape[:2], device=captions.device)
    cond = {"resolution": None, "aspect_ratio": None}
    for t in sched.timesteps:
        inp = torch.cat([x, x])
        eps = model(inp, encoder_hidden_states=captions, encoder_attention_mask=mask,
                    timestep=t.expand(inp.shape[0]), added_cond_kwargs=cond, return_dict=False)[0]
        eps = eps.chunk(2, dim=1)[0]  # learned sigma: keep the noise prediction
        uncond, text = eps.chunk(2)
        x = sched.step(uncond + guidance * (text - uncond), t, x, return_dict=False)[0]
    return x


def svd_branch(rank: int, fmt: str) -> Callable[[nn.Module], QuantLinear]:
    """SVDQuant-like: ``W = L R + residual``, a 16-bit rank-``rank`` branch and ``fmt`` W4A4 residual."""

    def quantize(layer: nn.Module) -> QuantLinear:
        w = dense_weight(layer).float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        up, down = u[:, :rank] * s[:rank], vh[:rank]
        dtype = layer.weight.dtype
        branch = LowRankBranch(down.to(dtype), up.to(dtype), "bf16", "bf16")
        residual = (w - up @ down).to(dtype)
        return QuantLinear.from_layer(layer, fmt, fmt, weight=residual, branch=branch)

    return quantize


def patch_with(model: nn.Module, quantize: Callable[[nn.Module], QuantLinear]) -> PatchReport:
    """Swap every selected layer for ``quantize(layer)`` (undo with ``restore_model``)."""
    selection = select_layers(model)
    quantized = {name: quantize(layer) for name, layer in selection.layers.items()}
    for name, q in quantized.items():
        replace_module(model, name, q)
    return PatchReport(quantized, selection.skipped, dict(selection.layers))


def time_variant(
    model: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """Warm up once, then time ``args.images`` images; also the final latents for error checks."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    latents, captions = inputs
    sample(model, latents, captions, min(args.steps, 2), args.guidance)  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(args.images):
        out = sample(model, latents, captions, args.steps, args.guidance)
    sync()
    seconds = (time.perf_counter() - start) / args.images
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"seconds_per_image": seconds, "peak_memory_bytes": peak, "latents": out.float().cpu()}


def variants(rank: int) -> dict[str, Callable[[nn.Module], PatchReport | None]]:
    rtn = get_method("rtn", weight_format="mxfp4", act_format="mxfp4")
    out: dict[str, Callable[[nn.Module], PatchReport | None]] = {
        "16bit": lambda m: None,
        "rtn_mxfp4_w4a4": lambda m: quantize_model(m, rtn),
        f"svd_r{rank}_mxfp4_w4a4": lambda m: patch_with(m, svd_branch(rank, "mxfp4")),
    }
    if "svdquant" in METHODS:  # the registered method, when the methods work provides it
        method = get_method("svdquant", rank=rank, weight_format="mxfp4", act_format="mxfp4")
        out[f"svdquant_r{rank}_mxfp4_w4a4"] = lambda m: quantize_model(m, method)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--small", action="store_true", help="tiny config (CPU smoke test)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--images", type=int, default=3, help="timed images per variant (after one warm-up)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    setup = SMALL if args.small else FULL
    config = setup["config"]
    model = build(config, device, dtype)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, config["in_channels"], setup["latent"], setup["latent"], generator=gen)
    captions = torch.randn(2, setup["tokens"], config["caption_channels"], generator=gen)
    inputs = (latents.to(device, dtype), captions.to(device, dtype))

    results: dict[str, Any] = {
        "model": "pixart-sigma" + ("-small" if args.small else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "steps": args.steps, "guidance": args.guidance, "latent": setup["latent"], "images": args.images,
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__, "variants": {},
    }
    reference = None
    for name, apply in variants(args.rank).items():
        t0 = time.perf_counter()
        report = apply(model)
        convert = time.perf_counter() - t0
        try:
            timing = time_variant(model, inputs, args, device)
            if device.type == "cuda":  # the same, with the transformer replayed from CUDA graphs
                with cuda_graphs(model, enabled=True):
                    graphed = time_variant(model, inputs, args, device)
                timing["graph_seconds_per_image"] = graphed["seconds_per_image"]
                timing["graph_equals_eager"] = bool(torch.equal(graphed["latents"], timing["latents"]))
        finally:
            if report is not None:
                restore_model(model, report)
        latents_out = timing.pop("latents")
        reference = latents_out if reference is None else reference
        err = float(torch.linalg.norm(latents_out - reference) / torch.linalg.norm(reference))
        row = {**timing, "convert_seconds": convert, "rel_latent_error_vs_16bit": err,
               "quantized_layers": 0 if report is None else len(report.quantized),
               "bits_per_weight": None if report is None else report.bits_per_weight()}
        results["variants"][name] = row
        graph = f"  graphs {row['graph_seconds_per_image']:7.3f} s/image" if "graph_seconds_per_image" in row else ""
        print(f"{name:28s} {row['seconds_per_image']:8.3f} s/image{graph}  convert {convert:6.2f} s  "
              f"latent rel err {err:.4f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
