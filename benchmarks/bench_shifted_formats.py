"""GPU check and timing of the unsigned and shifted INT4 activation formats (PixArt-Sigma shapes, bf16).

For each format: the path taken (``backend_for``), bit equality of ``quantize`` (Triton) with the torch
reference on post-GELU activations with an outlier channel, and microseconds per call against a plain copy.

    PYTHONPATH=$PWD python benchmarks/bench_shifted_formats.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptqbench.formats import get_format

FORMATS = ("int4_g64", "uint4_g64", "uint4_g64:shift=0.171875", "int4_g64:shift=0.171875", "uint8_g64")


def per_call_us(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((8192, 1152), (8192, 4608)):
        x = F.gelu(torch.randn(*shape, device="cuda", generator=g) * 2)
        x[:, 7] *= 50.0
        x = x.to(torch.bfloat16)
        copy_us = per_call_us(lambda x=x: x.clone())
        for name in FORMATS:
            fmt = get_format(name)
            got, want = fmt.quantize(x), fmt.reference(x)
            mismatches = int((got != want).sum())
            us = per_call_us(lambda fmt=fmt, x=x: fmt.quantize(x))
            print(f"{shape!s:<13} {name:<26} path={fmt.backend_for(x):<8} mismatches={mismatches:<4} "
                  f"{us:7.1f} us ({us / copy_us:4.2f}x copy)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
