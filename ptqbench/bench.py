"""``ptqbench bench``: forward time of the full PixArt-Sigma transformer, 16-bit vs quantized.

Random weights from the real config (timing does not depend on values), bf16, 1024px latents
(128x128x4), batch 2 (classifier-free guidance), 300 caption tokens of width 4096. Every
targeted attention/FFN linear is replaced by a :class:`~ptqbench.layers.QuantLinear`; variants
are timed in one process with CUDA events (median of ``--iters`` after warm-up) and reported as
ratios to the bf16 forward, next to the memory-traffic floor of one extra pass per layer.
``--model`` picks another registered config (e.g. ``sana-1.6b``); ``--small`` keeps 2 blocks at a
quarter of the latent size (PixArt-Sigma: 256 px), a smoke run that also works on a CPU (float32).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqbench import kernels
from ptqbench.errors import UserError
from ptqbench.formats import can_shift, get_format
from ptqbench.layers import LowRankBranch, QuantLinear, dense_weight
from ptqbench.patching import PatchReport, replace_module, restore_model, select_layers
from ptqbench.shifting import layer_shift


@dataclass(frozen=True)
class Variant:
    """One timed configuration: formats of the main layers and of an optional low-rank branch
    (random factors: timing does not depend on values), a random smoothing vector, shifted inputs
    where the model's activation floors call for them (deepcompressor's INT4), and the kernel paths."""

    label: str
    weight_format: str | None  # None: the untouched bf16 model
    act_format: str = "bf16"
    rank: int = 0
    fused: bool = True  # use the fused activation kernels
    branch_weight: str = "bf16"
    branch_act: str = "bf16"
    mid: str | None = None
    smooth: bool = False
    shift: bool = False
    fused_branch: bool = True  # the fused branch path (x read once, one GEMM adds the branch) where it applies
    share_qkv: bool = False  # q/k/v reading one input share smoothing and down-projection (SVDQuant's native)

    def paths(self) -> ExitStack:
        """The kernel paths this variant runs under (enter with ``with``)."""
        stack = ExitStack()
        stack.enter_context(kernels.use_kernels(self.fused))
        stack.enter_context(kernels.use_fused_branch(self.fused_branch))
        return stack


VARIANTS = (
    Variant("bf16", None),
    Variant("bf16 + rank-32 bf16 branch", "bf16", "bf16", 32),
    Variant("W4A4 mxfp4 (eager torch fake-quant)", "mxfp4", "mxfp4", 0, fused=False),
    Variant("W4A4 mxfp4", "mxfp4", "mxfp4"),
    Variant("W4A4 mxfp4 + rank-32 bf16 branch", "mxfp4", "mxfp4", 32),
    Variant("W4A4 mxfp4 + rank-32 bf16 branch (unfused)", "mxfp4", "mxfp4", 32, fused_branch=False),
    Variant("W4A4 int4_g64", "int4_g64", "int4_g64"),
    Variant("W4A4 int4_g64 + rank-32 bf16 branch", "int4_g64", "int4_g64", 32),
    Variant("W4A4 nvfp4 + rank-32 bf16 branch", "nvfp4", "nvfp4", 32),
    Variant("W4A4 nvfp4 + rank-32 bf16 branch (unfused)", "nvfp4", "nvfp4", 32, fused_branch=False),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="pixart-sigma", help="registered model whose transformer config is used")
    parser.add_argument("--batch", type=int, default=2, help="batch size (2 = one prompt with CFG)")
    parser.add_argument("--tokens", type=int, default=300, help="caption tokens")
    parser.add_argument("--iters", type=int, default=10, help="timed forwards per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    parser.add_argument(
        "--small", action="store_true", help="2 blocks at a quarter of the latent size (smoke test, CPU ok)"
    )
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay timings")


def build_transformer(model: str, small: bool, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model's transformer from its config with random weights (no download); ``small``: 2 blocks at a
    quarter of the latent size."""
    from ptqbench.models import diffusers_models as dm

    overrides = {}
    if small and model in dm.TRANSFORMER_CONFIGS:
        overrides = {"num_layers": 2, "sample_size": dm.TRANSFORMER_CONFIGS[model][1]["sample_size"] // 4}
    return dm.build_transformer(model, device, dtype, **overrides).eval()


def make_inputs(transformer: nn.Module, batch: int, tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Random latents and caption states of the config's shapes, timestep 500, for ``transformer(**inputs)``."""
    cfg = transformer.config
    g = torch.Generator(device=device).manual_seed(0)
    size = cfg.sample_size
    inputs = {
        "hidden_states": torch.randn(batch, cfg.in_channels, size, size, generator=g, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(
            batch, tokens, cfg.caption_channels, generator=g, device=device, dtype=dtype
        ),
        "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
        "return_dict": False,
    }
    return {**inputs, **condition_kwargs(transformer)}


def condition_kwargs(transformer: nn.Module) -> dict[str, Any]:
    """``added_cond_kwargs`` (no resolution/aspect-ratio conditioning) where the transformer's
    forward takes it (PixArt's does, SANA's does not); else nothing. The class's forward is read:
    :func:`~ptqbench.cudagraph.cuda_graphs` replaces the instance's with a ``(*args, **kwargs)`` one."""
    if "added_cond_kwargs" in inspect.signature(type(transformer).forward).parameters:
        return {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return {}


def apply_variant(transformer: nn.Module, variant: Variant) -> PatchReport | None:
    """Swap every targeted layer for a QuantLinear of ``variant`` (random branch factors and
    smoothing, seeded; with ``share_qkv``, the layers of one share group take their group's first
    smoothing vector, down-projection and input key, as SVDQuant builds them)."""
    if variant.weight_format is None:
        return None
    selection = select_layers(transformer)
    quantized: dict[str, QuantLinear] = {}
    leaders: dict[str, QuantLinear] = {}
    g = torch.Generator(device=next(transformer.parameters()).device).manual_seed(1)
    for name, layer in selection.layers.items():
        w = dense_weight(layer).detach()
        out_f, in_f = w.shape
        group = selection.groups.get(name) if variant.share_qkv else None
        leader = leaders.get(group) if group else None
        branch = smooth = None
        if variant.rank:
            down = torch.randn(variant.rank, in_f, generator=g, device=w.device, dtype=w.dtype) * 0.02
            up = torch.randn(out_f, variant.rank, generator=g, device=w.device, dtype=w.dtype) * 0.02
            down = leader.branch.down if leader else down  # drawn anyway: the same stream as unshared
            branch = LowRankBranch(down, up, variant.branch_weight, variant.branch_act, variant.mid)
        if variant.smooth:
            smooth = 2.0 ** (torch.rand(in_f, generator=g, device=w.device) * 2 - 1)
            smooth = leader.smooth if leader else smooth
        act = get_format(variant.act_format)
        floor = selection.floors.get(name)
        if variant.shift and floor is not None and floor < 0 and can_shift(act):
            act = act.with_shift(layer_shift(floor, "deepcompressor", w.dtype)[0])
        q = QuantLinear.from_layer(layer, variant.weight_format, act, smooth=smooth, branch=branch)
        if leader:
            q.input_key = leader.input_key
        elif group:
            leaders[group] = q
        quantized[name] = q
    for name, q in quantized.items():
        replace_module(transformer, name, q)
    return PatchReport(quantized, selection.skipped, dict(selection.layers))


@torch.no_grad()
def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph (launch overhead removed); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@torch.no_grad()
def time_forward(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, wall clock otherwise)."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def traffic_floor_ms(transformer: nn.Module, inputs: dict, bandwidth_gbs: float = 3000.0) -> float:
    """Milliseconds to read and write each targeted linear's input once at ``bandwidth_gbs``."""
    sizes: list[int] = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, a: sizes.append(a[0].numel() * a[0].element_size()))
        for layer in select_layers(transformer).layers.values()
    ]
    with torch.no_grad():
        transformer(**inputs)
    for h in hooks:
        h.remove()
    return 2 * sum(sizes) / (bandwidth_gbs * 1e9) * 1e3


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.small:
        raise UserError("bench: the full-size benchmark needs a CUDA GPU (use --small for a CPU smoke run)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = build_transformer(args.model, args.small, device, dtype)
    inputs = make_inputs(transformer, args.batch, args.tokens, device, dtype)
    floor = traffic_floor_ms(transformer, inputs)
    use_graph = device.type == "cuda" and not args.no_graph
    rows: list[dict] = []
    base: dict[str, float] = {}
    print(f"{'variant':<42} {'eager ms':>9} {'ratio':>6}" + (f" {'graph ms':>9} {'ratio':>6}" if use_graph else ""))
    for variant in VARIANTS:
        report = apply_variant(transformer, variant)
        with variant.paths():
            forward = lambda: transformer(**inputs)  # noqa: E731
            row = {"variant": variant.label, "eager_ms": time_forward(forward, args.iters, args.warmup, device)}
            if use_graph:
                row["graph_ms"] = time_forward(graphed(forward), args.iters, args.warmup, device)
        if report is not None:
            restore_model(transformer, report)
        for mode in ("eager", "graph"):
            if f"{mode}_ms" in row:
                base.setdefault(mode, row[f"{mode}_ms"])
                row[f"{mode}_ratio"] = row[f"{mode}_ms"] / base[mode]
        rows.append(row)
        line = f"{variant.label:<42} {row['eager_ms']:9.2f} {row['eager_ratio']:5.2f}x"
        if use_graph:
            line += f" {row['graph_ms']:9.2f} {row['graph_ratio']:5.2f}x"
        print(line, flush=True)
    n_layers = len(select_layers(transformer).layers)
    ref = base.get("graph", base["eager"])
    print(
        f"floor of one extra read+write pass over each of {n_layers} linears' inputs: "
        f"{floor:.2f} ms ({floor / ref:.1%} of the bf16 forward)"
    )
    rows.append({"variant": "floor: one extra pass per layer input", "ms": floor, "ratio": floor / ref})
    return rows


def kernel_table(device: torch.device, iters: int = 50) -> list[dict]:
    """Fused activation fake-quant vs a plain copy on PixArt-Sigma activation shapes (bf16), graph-timed;
    the eager torch reference is timed call by call."""
    from ptqbench.formats import get_format

    rows = []
    for shape in ((8192, 1152), (8192, 4608)):
        x = torch.randn(*shape, device=device, dtype=torch.bfloat16)

        def per_call(fn: Callable[[], object], reps: int = 20) -> float:
            """Milliseconds per call, ``reps`` calls per graph replay so launch gaps do not count."""
            return time_forward(graphed(lambda: [fn() for _ in range(reps)]), iters, 3, device) / reps

        copy_ms = per_call(lambda x=x: x.clone())
        for name in ("mxfp4", "mxfp8_e4m3", "mxint4", "int4_g64", "nvfp4", "nvfp4_1l"):
            fmt = get_format(name)
            ms = per_call(lambda fmt=fmt, x=x: fmt.quantize(x))
            with kernels.use_kernels(False):
                eager = time_forward(lambda fmt=fmt, x=x: fmt.quantize(x), max(5, iters // 10), 2, device)
            gbs = 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
            rows.append(
                {
                    "shape": list(shape),
                    "format": name,
                    "kernel_ms": ms,
                    "copy_ms": copy_ms,
                    "vs_copy": ms / copy_ms,
                    "GB_s": gbs,
                    "eager_ms": eager,
                }
            )
            print(
                f"{shape!s:<13} {name:<11} kernel {ms * 1e3:7.1f} us  copy {copy_ms * 1e3:7.1f} us  "
                f"{ms / copy_ms:5.2f}x copy  {gbs:6.0f} GB/s   eager torch {eager * 1e3:8.1f} us",
                flush=True,
            )
    return rows


BRANCH_SHAPES = (  # (rows, in, rank, main format, branch act format (None: the input), mid)
    (8192, 1152, 32, "mxfp4", None, None),
    (8192, 4608, 32, "mxfp4", None, None),
    (8192, 1152, 108, "mxfp4", "mxfp8_e4m3", "mxfp8_e4m3"),
)
BRANCH_TILES = (None, (4, 32), (8, 32), (2, 64), (8, 8))  # (NB, BLOCK_M) of the kernel; None: tile_config's


def branch_kernel_table(device: torch.device, iters: int = 20, tiles: tuple = BRANCH_TILES) -> list[dict]:
    """The fused branch path (smoothed input: the kernel writing Qa(x') and x', the product's GEMM,
    the mid format) per kernel tile against the fake-quant kernel alone and a copy of x, graph-timed
    (PixArt-Sigma shapes at batch 1)."""
    return [row for shape in BRANCH_SHAPES for row in _branch_rows(device, shape, iters, tiles)]


def _branch_rows(device: torch.device, shape: tuple, iters: int, tiles: tuple) -> list[dict]:
    from ptqbench.formats import get_format

    m, k, rank, main, source, mid = shape
    width = kernels.branch_width(k, rank)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    down = torch.zeros(width - k, k, device=device, dtype=torch.bfloat16)
    down[:rank] = torch.randn(rank, k, device=device, dtype=torch.bfloat16) * 0.02
    smooth = torch.rand(k, device=device, dtype=torch.bfloat16) + 0.5
    fmt = get_format(main)
    spec = fmt.kernel_spec(torch.bfloat16)
    src = None if source is None else get_format(source).kernel_spec(torch.bfloat16)
    mspec = None if mid is None else get_format(mid).kernel_spec(torch.bfloat16)

    def per_call(fn: Callable[[], object], reps: int = 10) -> float:
        return time_forward(graphed(lambda: [fn() for _ in range(reps)]), iters, 3, device) / reps

    base = {"copy_ms": per_call(lambda: x.clone()), "fake_quant_ms": per_call(lambda: fmt.quantize(x))}
    rows = []
    for tile in tiles:
        ms = per_call(lambda t=tile: kernels.fused_branch(x, down, spec, src, mspec, width, 0.0, smooth, t))
        rows.append({"shape": [m, k, rank], "formats": [main, source, mid], "tile": list(tile or ["auto"]), "ms": ms})
        rows[-1].update(base)
        print(
            f"{m}x{k} r{rank} {main}/{source}/{mid} tile {tile}: fused {ms * 1e3:7.1f} us  fake-quant alone "
            f"{base['fake_quant_ms'] * 1e3:7.1f} us  copy {base['copy_ms'] * 1e3:7.1f} us",
            flush=True,
        )
    return rows


def main(args: argparse.Namespace) -> int:
    rows = run(args)
    kernel_rows = kernel_table(torch.device("cuda")) if torch.cuda.is_available() else []
    if torch.cuda.is_available():
        kernel_rows += branch_kernel_table(torch.device("cuda"))
    if args.out:
        info = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "model": args.model,
            "small": args.small,
            "rows": rows,
            "kernels": kernel_rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=2))
    return 0
