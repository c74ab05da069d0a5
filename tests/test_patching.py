"""Default skip lists (deepcompressor's) on the full PixArt-Sigma, SANA and FLUX.1 configs (meta
device), q/k/v share groups, activation floors, adapter lookup, and ``ptqbench list layers``."""

from __future__ import annotations

import collections
import math
import re

import pytest
import torch

from ptqbench.cli import main
from ptqbench.errors import UserError
from ptqbench.memory import qkv_group
from ptqbench.models import MODELS, ModelSpec
from ptqbench.models.adapters import FLUX, GELU_TANH_MIN, PIXART, SANA
from ptqbench.models.base import adapter_for
from ptqbench.models.diffusers_models import build_transformer
from ptqbench.patching import LayerPlan, select_layers


def _roles(names) -> collections.Counter:
    """Layer names with the block index replaced by ``*``, counted."""
    return collections.Counter(re.sub(r"(blocks)\.\d+\.", r"\1.*.", n) for n in names)


def _shapes(sel) -> collections.Counter:
    return collections.Counter(tuple(layer.weight.shape[:2]) for layer in sel.layers.values())


def _reasons(sel) -> collections.Counter:
    """Skip reasons by the deepcompressor key they name (or the reason itself)."""
    keys = (re.search(r"deepcompressor: (\w+)", r) for r in sel.skipped.values())
    return collections.Counter(k.group(1) if k else r for k, r in zip(keys, sel.skipped.values(), strict=True))


BLOCK = "transformer_blocks.*."


def test_pixart_sigma_skip_list():
    model = build_transformer("pixart-sigma")
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == 610_856_096
    sel = select_layers(model)
    quantized = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
                 "ff.net.0.proj", "ff.net.2")
    assert _roles(sel.layers) == {BLOCK + n: 28 for n in quantized}
    assert _shapes(sel) == {(1152, 1152): 168, (4608, 1152): 28, (1152, 4608): 28}
    assert _roles(n for n, r in sel.skipped.items() if "attn_add" in r) == {BLOCK + "attn2.to_k": 28,
                                                                             BLOCK + "attn2.to_v": 28}
    assert {n for n, r in sel.skipped.items() if "attn_add" not in r} == {
        "pos_embed.proj", "adaln_single.emb.timestep_embedder.linear_1",
        "adaln_single.emb.timestep_embedder.linear_2", "adaln_single.linear",
        "caption_projection.linear_1", "caption_projection.linear_2", "proj_out",
    }
    assert _reasons(sel) == {"attn_add": 56, "embed": 7}
    sel512 = select_layers(build_transformer("pixart-sigma-512"))
    assert list(sel512.layers) == list(sel.layers) and _shapes(sel512) == _shapes(sel)


def test_sana_skip_list():
    model = build_transformer("sana-1.6b")
    assert sum(p.numel() for p in model.parameters()) == 1_604_462_752
    sel = select_layers(model)
    quantized = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
                 "ff.conv_inverted", "ff.conv_point")
    assert _roles(sel.layers) == {BLOCK + n: 20 for n in quantized}
    assert collections.Counter(type(m).__name__ for m in sel.layers.values()) == {"Linear": 120, "Conv2d": 40}
    assert _shapes(sel) == {(2240, 2240): 120, (11200, 2240): 20, (2240, 5600): 20}
    depthwise = "depthwise 3x3 conv is not a linear map over channels"
    assert _reasons(sel) == {"attn_add": 40, "embed": 7, depthwise: 20}
    assert _roles(n for n, r in sel.skipped.items() if "attn_add" in r) == {BLOCK + "attn2.to_k": 20,
                                                                             BLOCK + "attn2.to_v": 20}
    assert {n for n, r in sel.skipped.items() if "embed" in r} == {
        "patch_embed.proj", "time_embed.emb.timestep_embedder.linear_1", "time_embed.emb.timestep_embedder.linear_2",
        "time_embed.linear", "caption_projection.linear_1", "caption_projection.linear_2", "proj_out",
    }
    sel600 = select_layers(build_transformer("sana-600m"))
    assert len(sel600.layers) == 224
    assert _shapes(sel600) == {(1152, 1152): 168, (5760, 1152): 28, (1152, 2880): 28}


def test_flux_skip_list():
    """flux.1-dev.yaml quantizes the joint blocks' text stream (attn_add, ffn_add); the adaLN
    modulations (transformer_norm / transformer_add_norm), weight-only there, stay 16-bit here."""
    sel = select_layers(build_transformer("flux.1-dev"))
    joint = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2")
    single = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
    assert _roles(sel.layers) == {**{BLOCK + n: 19 for n in joint},
                                  **{"single_" + BLOCK + n: 38 for n in single}}
    assert _reasons(sel) == {"transformer_norm": 57, "transformer_add_norm": 19, "embed": 10}
    assert sel.layers["single_transformer_blocks.0.proj_out"].weight.shape == (3072, 3072 + 12288)
    assert len(set(sel.groups.values())) == 19 + 19 + 38


def test_qkv_groups():
    """Self-attention q/k/v share one input; a cross-attention's to_q reads the image, its k/v the text."""
    model = build_transformer("tiny-pixart")
    shapes = {s.name: s for s in select_layers(model).shapes()}
    assert {n: s.group for n, s in shapes.items() if s.group} == {
        f"transformer_blocks.{i}.attn1.{p}": f"transformer_blocks.{i}.attn1.qkv" for i in range(2)
        for p in ("to_q", "to_k", "to_v")
    }
    assert shapes["transformer_blocks.0.attn2.to_q"].group is None
    everything = select_layers(model, LayerPlan())  # no skips: the cross-attention's k and v read the text
    assert everything.groups["transformer_blocks.0.attn2.to_k"] == "transformer_blocks.0.attn2.qkv"
    assert everything.groups["transformer_blocks.0.attn2.to_v"] == "transformer_blocks.0.attn2.qkv"
    assert "transformer_blocks.0.attn2.to_q" not in everything.groups
    only_q = select_layers(model, LayerPlan(include=("*.attn1.to_q",)))  # a group of one is no group
    assert len(only_q.layers) == 2 and only_q.groups == {}
    flux = select_layers(build_transformer("tiny-flux")).groups
    assert flux["transformer_blocks.0.attn.add_k_proj"] == "transformer_blocks.0.attn.add_qkv"
    assert flux["single_transformer_blocks.1.attn.to_v"] == "single_transformer_blocks.1.attn.qkv"
    assert qkv_group("a.add_q_proj") == "a.add_qkv" and qkv_group("a.to_add_out") is None


def test_gelu_tanh_floor_is_exact():
    """The constant is the minimum of diffusers' GELU(tanh), re-derived in float64 two ways."""
    def gelu_tanh(x: float) -> float:
        return 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    lo, hi = -2.0, 0.0
    for _ in range(200):  # ternary search on the unimodal left branch
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, b) if gelu_tanh(a) < gelu_tanh(b) else (a, hi)
    assert abs(gelu_tanh((lo + hi) / 2) - GELU_TANH_MIN) < 1e-14
    grid = torch.linspace(-4, 0, 400_001, dtype=torch.float64)
    assert torch.nn.functional.gelu(grid, approximate="tanh").min().item() >= GELU_TANH_MIN - 1e-15


def test_activation_floors_follow_the_models_activations():
    pixart, flux = build_transformer("tiny-pixart"), build_transformer("tiny-flux")
    assert pixart.transformer_blocks[0].ff.net[0].approximate == "tanh"
    assert flux.transformer_blocks[0].ff_context.net[0].approximate == "tanh"
    assert PIXART.activation_floor("transformer_blocks.3.ff.net.2") == GELU_TANH_MIN
    assert PIXART.activation_floor("transformer_blocks.3.ff.net.0.proj") is None
    assert FLUX.activation_floor("transformer_blocks.0.ff_context.net.2") == GELU_TANH_MIN
    assert FLUX.activation_floor("single_transformer_blocks.0.proj_out") is None  # [attention, GELU] inputs
    assert SANA.activation_floors == {}  # GLUMBConv's x * SiLU(gate) has no lower bound


def test_adapter_lookup():
    assert adapter_for(build_transformer("sana-600m")) is SANA
    assert adapter_for(torch.nn.Linear(2, 2)).skips == {}
    assert LayerPlan.for_model(build_transformer("tiny-flux"), exclude=["*.ff.*"]).exclude["*.ff.*"] == (
        "excluded by pattern"
    )
    rival = ModelSpec("rival-pixart", "test", loader="x:y", adapter=PIXART.__class__(
        "rival", transformer_class=PIXART.transformer_class, skips={"proj_out": "mine"}))
    MODELS.register(rival.name, rival)
    try:
        with pytest.raises(UserError, match="different layer rules"):
            adapter_for(build_transformer("tiny-pixart"))
    finally:
        MODELS.unregister(rival.name)


def _list_layers(capsys, *args: str) -> tuple[int, list[str], str]:
    rc = main(["list", "layers", *args])
    out = capsys.readouterr()
    return rc, out.out.splitlines(), out.err


def test_list_layers_pixart_sigma(capsys):
    rc, lines, _ = _list_layers(capsys, "pixart-sigma")
    assert rc == 0
    rows = {line.split()[0]: line for line in lines[:287]}
    assert len(rows) == 287 and lines[287] == ""
    assert re.fullmatch(r"transformer_blocks\.0\.attn1\.to_q +Linear 1152x1152 +quantized +"
                        r"\[transformer_blocks\.0\.attn1\.qkv\]", rows["transformer_blocks.0.attn1.to_q"])
    assert rows["transformer_blocks.0.attn2.to_q"].endswith("quantized")
    assert "skipped (cross-attention key" in rows["transformer_blocks.0.attn2.to_k"]
    assert rows["transformer_blocks.5.ff.net.2"].endswith("quantized  input >= -0.170041")
    assert "Conv2d 2x2 1152x4x2x2" in rows["pos_embed.proj"]
    assert lines[288] == "pixart-sigma: PixArtTransformer2DModel (adapter pixart)"
    first_role = r"quantized +28 +transformer_blocks\.\*\.attn1\.to_q +Linear 1152x1152 +shares its input"
    assert re.match(first_role, lines[289])
    assert lines[-2] == ("quantized: 224 layers (Linear 224), 520,224,768 weights (85.2% of 610,856,096 parameters); "
                         "28 q/k/v groups share an input")
    assert lines[-1] == "skipped: 63 layers, 90,003,456 weights"


def test_list_layers_sana_tiny_and_errors(capsys):
    rc, lines, _ = _list_layers(capsys, "sana-1.6b")
    assert rc == 0 and lines[-2].startswith("quantized: 160 layers (Conv2d 1x1 40, Linear 120), 1,354,752,000 weights")
    assert any(re.match(r"skipped +20 +transformer_blocks\.\*\.ff\.conv_depth +Conv2d 3x3 depthwise", x) for x in lines)
    rc, lines, _ = _list_layers(capsys, "tiny-flux", "--exclude", "single_*")
    assert rc == 0 and lines[-2].startswith("quantized: 12 layers (Linear 12)")
    assert "1 q/k/v groups" not in lines[-2] and "2 q/k/v groups share an input" in lines[-2]
    rc, _, err = _list_layers(capsys)
    assert rc == 2 and "which model?" in err
    rc, _, err = _list_layers(capsys, "pixart-sigmaa")
    assert rc == 2 and "did you mean pixart-sigma" in err
    assert main(["list", "models", "pixart-sigma"]) == 2
