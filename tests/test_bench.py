"""``ptqbench bench`` on CPU-sized configs of PixArt-Sigma and SANA (the full-size run needs a GPU)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from ptqbench import bench
from ptqbench.models import diffusers_models as dm
from ptqbench.patching import select_layers

pytestmark = pytest.mark.usefixtures("one_thread")

# The released configs, narrowed to a few thousand weights (same classes and code paths).
TINY = {
    "pixart-sigma": {"num_layers": 1, "sample_size": 4, "num_attention_heads": 2, "attention_head_dim": 16,
                     "cross_attention_dim": 32, "caption_channels": 16, "norm_num_groups": 2},
    "sana-1.6b": {"num_layers": 1, "sample_size": 4, "num_attention_heads": 2, "attention_head_dim": 16,
                  "num_cross_attention_heads": 2, "cross_attention_head_dim": 16, "cross_attention_dim": 32,
                  "caption_channels": 16},
}


def tiny(name: str) -> torch.nn.Module:
    return dm.build_transformer(name, "cpu", torch.float32, **TINY[name]).eval()


@pytest.mark.parametrize("name", ["pixart-sigma", "sana-1.6b", "sana-600m", "pixart-sigma-512"])
def test_small_keeps_two_blocks_at_a_quarter_of_the_latent_size(name: str) -> None:
    full = dm.TRANSFORMER_CONFIGS[name][1]
    small = bench.build_transformer(name, True, torch.device("meta"), None).config
    assert (small.num_layers, small.sample_size) == (2, full["sample_size"] // 4)
    assert small.caption_channels == full["caption_channels"]  # layer widths stay the released ones
    assert bench.build_transformer(name, False, torch.device("meta"), None).config.num_layers == full["num_layers"]


@pytest.mark.parametrize("name", ["pixart-sigma", "sana-1.6b"])
def test_inputs_and_traffic_floor(name: str) -> None:
    """SANA's forward takes no ``added_cond_kwargs`` (the crash of ``--model sana-1.6b``); the floor is
    two passes over the bytes of every targeted layer's input at the given bandwidth."""
    model = tiny(name)
    inputs = bench.make_inputs(model, 2, 5, torch.device("cpu"), torch.float32)
    assert ("added_cond_kwargs" in inputs) == (name == "pixart-sigma")
    layers = select_layers(model).layers
    seen: dict[str, int] = {}

    def record(name: str):
        return lambda module, args: seen.update({name: args[0].numel()})  # returns None: inputs unchanged

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    # batch 2, 32 channels: the cross-attention queries read the image tokens (PixArt: 4x4 latents in
    # 2x2 patches; SANA: 1x1 patches); its keys/values read the caption and stay 16-bit (deepcompressor)
    image_tokens = 4 if name == "pixart-sigma" else 16
    assert not any(n.endswith(("attn2.to_k", "attn2.to_v")) for n in layers)
    query = next(n for n in layers if n.endswith("attn2.to_q"))
    assert seen[query] == 2 * image_tokens * 32
    assert len(seen) == len(layers)
    floor = bench.traffic_floor_ms(model, inputs, bandwidth_gbs=1.0)
    assert floor == pytest.approx(2 * 4 * sum(seen.values()) / 1e9 * 1e3, rel=1e-12)
    assert bench.traffic_floor_ms(model, inputs, bandwidth_gbs=2.0) == pytest.approx(floor / 2, rel=1e-12)


@pytest.mark.parametrize("name", ["pixart-sigma", "sana-1.6b"])
def test_run_times_every_variant(name: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("the CPU path (float32, wall clock) is what this checks")
    model = tiny(name)
    monkeypatch.setattr(bench, "build_transformer", lambda *_: model)
    args = argparse.Namespace(model=name, batch=1, tokens=3, iters=1, warmup=0, small=True, no_graph=True)
    rows = bench.run(args)
    assert [r["variant"] for r in rows[:-1]] == [v.label for v in bench.VARIANTS]
    assert rows[0]["eager_ratio"] == 1.0
    assert all(r["eager_ms"] > 0 and math.isfinite(r["eager_ratio"]) for r in rows[:-1])
    assert rows[-1]["ms"] > 0 and "floor of one extra read+write pass" in capsys.readouterr().out
    # the transformer came back unpatched after every variant
    assert all(type(m).__name__ != "QuantLinear" for m in model.modules())


def test_shared_qkv_variant_builds_svdquants_fused_units() -> None:
    """``share_qkv``: q/k/v of an attention take their unit's first smoothing vector, down-projection
    and input key (as SVDQuant builds them); other layers and the unshared variant keep their own."""
    model = tiny("pixart-sigma")
    shared = bench.Variant("s", "mxfp4", "mxfp4", 4, smooth=True, share_qkv=True)
    report = bench.apply_variant(model, shared)
    q = report.quantized
    unit = [q[f"transformer_blocks.0.attn1.{p}"] for p in ("to_q", "to_k", "to_v")]
    assert len({u.input_key for u in unit}) == 1
    assert all(u.smooth is unit[0].smooth and torch.equal(u.branch.down, unit[0].branch.down) for u in unit)
    assert len({layer.input_key for layer in q.values()}) == len(q) - 2
    separate = bench.apply_variant(tiny("pixart-sigma"), bench.Variant("s", "mxfp4", "mxfp4", 4, smooth=True))
    assert len({layer.input_key for layer in separate.quantized.values()}) == len(separate.quantized)
