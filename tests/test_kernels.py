"""The fused CUDA kernels equal the torch reference bit for bit (runs where a GPU is present)."""

from __future__ import annotations

import pytest
import torch
from test_formats import sample_tensors

from ptqbench.formats import get_format

KERNEL_FORMATS = [
    "mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8", "mxint4",
    "mxfp4:scale_rule=ceil", "mxfp4:scale_rule=rceil", "mxfp8_e4m3:scale_rule=rceil", "mxfp4:rounding=away",
    "mxint4:rounding=away", "mxfp4_b16", "nvfp4", "nvfp4_1l", "int4_g64", "int8_g64", "int4_g128",
    "int4_g64:scale_dtype=bf16", "int6_g32:rounding=away", "uint4_g64", "uint8_g32:rounding=away",
    "uint4_g64:shift=0.171875", "int4_g64:shift=0.2734375",
]  # fmt: skip


def test_kernels_are_not_used_on_cpu() -> None:
    fmt, x = get_format("mxfp4"), torch.zeros(2, 32)
    assert fmt.backend_for(x) == "eager" and fmt.backend_for(x, "triton") == "eager"


@pytest.mark.parametrize("name", KERNEL_FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_kernel_equals_reference(cuda: torch.device, name: str, dtype: torch.dtype) -> None:
    fmt = get_format(name)
    cases = dict(sample_tensors("cuda"))
    cases["ragged_3d"] = torch.randn(3, 17, 1000, device="cuda") * 3
    nan = torch.randn(8, 96, device="cuda")
    nan[2, 7] = float("nan")
    nan[5] = 0.0
    cases["nan_zero_rows"] = nan
    for case, x in cases.items():
        x = x.to(dtype)
        if dtype == torch.float16:
            x = x.clamp(-6e4, 6e4)
        if fmt.backend_for(x) != "triton":
            assert dtype == torch.float32 and name.lstrip("u").startswith("int"), f"{name} {dtype}: no kernel"
            continue
        got = fmt.quantize(x)
        want = fmt.reference(x)
        same = (got == want) | (torch.isnan(got) & torch.isnan(want))
        assert bool(same.all()), f"{name} {dtype} {case}: {int((~same).sum())} mismatches"



def test_cuda_graph_replay_equals_eager(cuda: torch.device) -> None:
    """Generation's CUDA-graph replay of a quantized tiny PixArt gives bit-identical outputs."""
    from ptqbench import get_method
    from ptqbench.cudagraph import cuda_graphs
    from ptqbench.models import get_model
    from ptqbench.patching import quantize_model

    pipe = get_model("tiny-pixart").load(device="cuda", dtype="bf16")
    quantize_model(pipe.transformer, get_method("rtn", weight_format="mxfp4", act_format="mxfp4"))
    settings = get_model("tiny-pixart").defaults
    eager = pipe.generate(["a red fox", "a city at night"], [1, 2], settings)
    with cuda_graphs(pipe.transformer, enabled=True):
        graphed = pipe.generate(["a red fox", "a city at night"], [1, 2], settings)
        again = pipe.generate(["a red fox", "a city at night"], [1, 2], settings)
    assert torch.equal(eager, graphed) and torch.equal(graphed, again)
    assert "forward" not in pipe.transformer.__dict__
