"""benchmarks/bench_generation.py end to end on the tiny PixArt and SANA transformers (CPU)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_generation_benchmark_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTQBENCH_COMPILE", "0")  # a smoke run: torch.compile's first compile costs a minute
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generation.py"
    bench = runpy.run_path(str(script))
    out = tmp_path / "gen.json"
    only = ["16-bit", "RTN W4A4 mxfp4", "SVDQuant r32 int4_g64", "LoRaQ W4A8"]  # fmt: skip
    argv = ["--small", "--steps", "2", "--batches", "1", "2", "--all-up-to", "1", "--device", "cpu", "--out", str(out)]
    assert bench["main"]([*argv, "--only", *only]) == 0
    result = json.loads(out.read_text())
    assert result["text_encoder_and_vae"] == "not included" and not result["cuda_graphs"]
    for model in ("pixart-sigma", "sana-1.6b"):
        rows = result["models"][model]["variants"]
        assert set(rows) == {
            "16-bit", "RTN W4A4 mxfp4", "SVDQuant r32 int4_g64 fused", "SVDQuant r32 int4_g64 unfused",
            "LoRaQ W4A8 r108 mxfp4 fused", "LoRaQ W4A8 r108 mxfp4 unfused",
        }  # fmt: skip
        assert rows["16-bit"]["1"]["ratio_to_16bit"] == 1.0
        # batch 2 times only the core variants (16-bit and SVDQuant mxfp4 fused)
        assert (
            "2" in rows["16-bit"]
            and "2" not in rows["RTN W4A4 mxfp4"]
            and "2" not in rows["LoRaQ W4A8 r108 mxfp4 fused"]
        )
        assert all(r["seconds_per_image"] > 0 and r["images_per_s"] > 0 for v in rows.values() for r in v.values()
                   if isinstance(r, dict) and "seconds_per_image" in r)  # fmt: skip
        # on the CPU the fused switch changes nothing: the latents of both paths are identical
        assert rows["SVDQuant r32 int4_g64 fused"]["rel_latent_diff_vs_unfused"] == 0.0
        assert rows["LoRaQ W4A8 r108 mxfp4 fused"]["rel_latent_diff_vs_unfused"] == 0.0
