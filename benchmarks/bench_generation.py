"""Seconds per image and images/s per GPU of the full PixArt-Sigma and SANA-1.6B transformers:
16-bit vs ptqbench's emulated quantization, the low-rank branch fused and unfused.

Each transformer is built from its released config with seeded random weights (no download;
timing does not depend on values). Random caption embeddings ``[2B, 300, caption_channels]``
(uncond + cond) stand in for the text encoder, and the loop stops at the latents: **the text
encoder and the VAE are not included** (one T5/Gemma encode and one VAE decode per image on top).
The 20-step DPM-Solver++ loop (the released scheduler configs, as ``tiny-pixart``/``tiny-sana``
hold them) with classifier-free guidance (4.5) runs at 1024 px (PixArt-Sigma 128x128 latents,
SANA 32x32) with the transformer replayed from CUDA graphs (:mod:`ptqbench.cudagraph`, as
generation runs it), at each batch size of ``--batches`` (images per batch; the transformer sees
twice as many). Variants (:class:`ptqbench.bench.Variant`, random factors and smoothing): RTN
W4A4, SVDQuant's smoothed rank-32 16-bit branch, LoRaQ's quantized branch at its equal-memory rank
(``ptqbench run suites/equal_memory.yaml --dry-run``), int4_g64 cells with deepcompressor's
shifted FFN inputs; each branch variant fused and unfused. ``--profile`` adds a torch.profiler
breakdown of one eager forward per listed variant.

    PYTHONPATH=. python benchmarks/bench_generation.py --out $OUT/gen.json     # GPU, full models
    python benchmarks/bench_generation.py --small --out /tmp/gen.json          # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqbench.bench import Variant, apply_variant, condition_kwargs
from ptqbench.cudagraph import cuda_graphs
from ptqbench.models import diffusers_models as dm
from ptqbench.patching import restore_model

SCHEDULERS = {"pixart-sigma": dm.TINY_PIXART["scheduler"], "sana-1.6b": dm.TINY_SANA["scheduler"]}
SMALL = {"pixart-sigma": "tiny-pixart", "sana-1.6b": "tiny-sana"}  # --small: the tiny configs (CPU smoke test)

VARIANTS = (  # "core" variants are also timed at batch sizes above --all-up-to
    (True, Variant("16-bit", None)),
    (False, Variant("RTN W4A4 mxfp4", "mxfp4", "mxfp4")),
    (False, Variant("RTN W4A4 nvfp4", "nvfp4", "nvfp4")),
    (False, Variant("RTN W4A4 int4_g64", "int4_g64", "int4_g64", shift=True)),
    (True, Variant("SVDQuant r32 mxfp4 fused", "mxfp4", "mxfp4", 32, smooth=True, share_qkv=True)),
    (False, Variant("SVDQuant r32 mxfp4 unfused", "mxfp4", "mxfp4", 32, smooth=True, share_qkv=True,
                    fused_branch=False)),
    (False, Variant("SVDQuant r32 nvfp4 fused", "nvfp4", "nvfp4", 32, smooth=True, share_qkv=True)),
    (False, Variant("SVDQuant r32 nvfp4 unfused", "nvfp4", "nvfp4", 32, smooth=True, share_qkv=True,
                    fused_branch=False)),
    (False, Variant("SVDQuant r32 int4_g64 fused", "int4_g64", "int4_g64", 32, smooth=True, share_qkv=True,
                    shift=True)),
    (False, Variant("SVDQuant r32 int4_g64 unfused", "int4_g64", "int4_g64", 32, smooth=True, share_qkv=True,
                    shift=True, fused_branch=False)),
    (False, Variant("LoRaQ W4A8 r108 mxfp4 fused", "mxfp4", "mxfp4", 108, branch_weight="mxfp4",
                   branch_act="mxfp8_e4m3", mid="mxfp8_e4m3", smooth=True)),
    (False, Variant("LoRaQ W4A8 r108 mxfp4 unfused", "mxfp4", "mxfp4", 108, branch_weight="mxfp4",
                    branch_act="mxfp8_e4m3", mid="mxfp8_e4m3", smooth=True, fused_branch=False)),
    (False, Variant("LoRaQ W8A8 r56 int4_g64 fused", "int4_g64", "int4_g64", 56, branch_weight="int8_g64",
                    branch_act="int8_g64", mid="int8_g64", smooth=True, shift=True)),
    (False, Variant("LoRaQ W8A8 r56 int4_g64 unfused", "int4_g64", "int4_g64", 56, branch_weight="int8_g64",
                    branch_act="int8_g64", mid="int8_g64", smooth=True, shift=True, fused_branch=False)),
)  # fmt: skip


def scheduler(model: str) -> Any:
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULERS[model])


def transformer_kwargs(model: nn.Module, captions: torch.Tensor) -> dict[str, Any]:
    """The caption arguments of ``model``'s forward (PixArt's ``added_cond_kwargs``, not SANA's)."""
    mask = torch.ones(captions.shape[:2], device=captions.device)
    kwargs = {"encoder_hidden_states": captions, "encoder_attention_mask": mask, "return_dict": False}
    return {**kwargs, **condition_kwargs(model)}


@torch.no_grad()
def sample(
    model: nn.Module, name: str, latents: torch.Tensor, captions: torch.Tensor, steps: int, guidance: float
) -> torch.Tensor:
    """DPM-Solver++ with classifier-free guidance; ``captions`` = [uncond; cond] of the batch."""
    sched = scheduler(name)
    sched.set_timesteps(steps, device=latents.device)
    x = latents * sched.init_noise_sigma
    kwargs = transformer_kwargs(model, captions)
    for t in sched.timesteps:
        inp = torch.cat([x, x])
        out = model(inp, timestep=t.expand(inp.shape[0]).to(x.dtype), **kwargs)[0]
        if out.shape[1] == 2 * x.shape[1]:
            out = out.chunk(2, dim=1)[0]  # learned sigma: keep the noise prediction
        uncond, text = out.chunk(2)
        x = sched.step(uncond + guidance * (text - uncond), t, x, return_dict=False)[0]
    return x


def make_inputs(model: nn.Module, batch: int, tokens: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    cfg = model.config
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    captions = torch.randn(2 * batch, tokens, cfg.caption_channels, generator=gen)
    return latents.to(device, dtype), captions.to(device, dtype)


def time_batch(model: nn.Module, name: str, inputs: tuple, args: argparse.Namespace) -> dict[str, Any]:
    """One warm-up (captures the graph), then ``args.reps`` timed ``args.steps``-step batches."""
    device = inputs[0].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with cuda_graphs(model, enabled=device.type == "cuda"):
        sample(model, name, *inputs, min(args.steps, 2), args.guidance)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        for _ in range(args.reps):
            out = sample(model, name, *inputs, args.steps, args.guidance)
        sync()
    seconds = (time.perf_counter() - start) / args.reps / inputs[0].shape[0]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"seconds_per_image": seconds, "images_per_s": 1 / seconds, "peak_memory_bytes": peak, "latents": out}


@torch.no_grad()
def profile_forward(model: nn.Module, inputs: tuple, top: int = 12) -> dict[str, Any]:
    """CUDA time of one eager CFG forward by kernel (torch.profiler), grouped: GEMMs, the fused branch
    kernel, fake-quant kernels, attention, the rest."""
    from torch.profiler import ProfilerActivity, profile

    latents, captions = inputs
    inp = torch.cat([latents, latents])
    t = torch.full((inp.shape[0],), 500.0, device=inp.device, dtype=inp.dtype)
    kwargs = transformer_kwargs(model, captions)
    model(inp, timestep=t, **kwargs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(inp, timestep=t, **kwargs)
        torch.cuda.synchronize()
    kernels: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type.name == "CUDA":
            kernels[event.name] += event.device_time / 1e3  # ms
    groups: dict[str, float] = defaultdict(float)
    for kname, ms in kernels.items():
        groups[kernel_group(kname)] += ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {"total_ms": sum(kernels.values()), "groups_ms": dict(groups), "top_kernels_ms": dict(ranked)}


def kernel_group(name: str) -> str:
    low = name.lower()
    if "_fq_kernel" in low or "_absmax_kernel" in low:
        return "fake-quant kernels (the fused branch's included: Qa(x') and x' from one read)"
    if "gemm" in low or "cutlass" in low or "sm90_xmma" in low or "nvjet" in low:
        return "GEMMs"
    if "flash" in low or "fmha" in low or "attention" in low:
        return "attention"
    return "other (norms, elementwise, copies)"


def run_model(name: str, args: argparse.Namespace, device: torch.device, results: dict[str, Any]) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = dm.build_transformer(SMALL[name] if args.small else name, device, dtype).eval().requires_grad_(False)
    rows: dict[str, dict[str, Any]] = {}
    base: dict[int, float] = {}
    first: dict[str, torch.Tensor] = {}  # each variant's latents at its first batch size
    for core, variant in VARIANTS:
        if args.only and not any(s in variant.label for s in args.only):
            continue
        report = apply_variant(model, variant)
        try:
            with variant.paths():
                for batch in args.batches:
                    if batch > args.all_up_to and not core:
                        continue
                    row = time_batch(model, name, make_inputs(model, batch, args.tokens, device), args)
                    first.setdefault(variant.label, row.pop("latents").float().cpu())
                    if variant.weight_format is None:
                        base[batch] = row["seconds_per_image"]
                    row["ratio_to_16bit"] = row["seconds_per_image"] / base[batch] if batch in base else None
                    rows.setdefault(variant.label, {})[str(batch)] = row
                    print(
                        f"{name:13s} {variant.label:34s} batch {batch:3d}  {row['seconds_per_image']:7.4f} s/image"
                        f"  {row['images_per_s']:6.2f} img/s  {row['ratio_to_16bit'] or 0:5.3f}x",
                        flush=True,
                    )
                if args.profile and device.type == "cuda" and any(s in variant.label for s in args.profile):
                    prof = profile_forward(model, make_inputs(model, args.profile_batch, args.tokens, device))
                    rows[variant.label]["profile"] = prof
                    print(
                        f"  profile (batch {args.profile_batch}, one eager forward): "
                        + ", ".join(f"{k} {v:.2f} ms" for k, v in prof["groups_ms"].items()),
                        flush=True,
                    )
        finally:
            if report is not None:
                restore_model(model, report)
    for label, latents in first.items():  # the fused path against the unfused one, end to end
        if label.endswith(" fused") and label.replace(" fused", " unfused") in first:
            other = first[label.replace(" fused", " unfused")]
            rows[label]["rel_latent_diff_vs_unfused"] = float((latents - other).norm() / other.norm())
    results["models"][name] = {"params": sum(p.numel() for p in model.parameters()), "variants": rows}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--small", action="store_true", help="the tiny pipelines' transformers (CPU smoke test)")
    parser.add_argument("--models", nargs="+", default=["pixart-sigma", "sana-1.6b"], choices=list(SCHEDULERS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="images per batch")
    parser.add_argument("--all-up-to", type=int, default=4, help="larger batches time the core variants only")
    parser.add_argument("--only", nargs="*", help="substrings of the variant labels to run (default: all)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--tokens", type=int, default=300, help="caption tokens")
    parser.add_argument("--reps", type=int, default=1, help="timed batches per variant and batch size")
    parser.add_argument("--profile", nargs="*", default=[], help="variant label substrings to profile")
    parser.add_argument("--profile-batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.small:
        args.tokens = min(args.tokens, 8)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "steps": args.steps, "guidance": args.guidance, "tokens": args.tokens,
        "batches": args.batches, "small": args.small, "cuda_graphs": device.type == "cuda",
        "text_encoder_and_vae": "not included", "models": {},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        run_model(name, args, device, results)
        args.out.write_text(json.dumps(results, indent=1) + "\n")  # after each model: a cut-off run keeps some
    return 0


if __name__ == "__main__":
    sys.exit(main())
