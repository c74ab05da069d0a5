"""The quantized layer, patching, the registry (with an outside plugin) and the memory solver."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from ptqbench import get_method
from ptqbench.errors import UserError
from ptqbench.formats import get_format
from ptqbench.layers import LowRankBranch, QuantLinear
from ptqbench.memory import LayerShape, bits_per_weight, model_bits, qkv_group, solve_rank
from ptqbench.method import METHODS, LowRankMethod, Method
from ptqbench.patching import LayerPlan, quantize_model, restore_model, select_layers
from ptqbench.registry import Registry
from ptqbench.stats import StatsCollector, StatsSpec

torch.manual_seed(0)


def linear(out_f: int = 48, in_f: int = 96, bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    layer = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight[:, 3] *= 40  # an outlier input channel
    return layer


# ------------------------------------------------------------------ quantized layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_16bit_formats_reproduce_the_layer(dtype: torch.dtype) -> None:
    layer = linear(dtype=dtype)
    x = torch.randn(5, 7, 96).to(dtype)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    q = QuantLinear.from_layer(layer, name, name)
    assert torch.equal(q(x), layer(x))
    assert torch.equal(q.effective_weight(), layer.weight.float())


def test_16bit_formats_on_fp32_layer_only_round() -> None:
    layer = linear()
    x = torch.randn(9, 96)
    q = QuantLinear.from_layer(layer, "bf16", "bf16")
    assert torch.allclose(q(x), layer(x), rtol=2e-2, atol=2e-2)
    assert not torch.equal(q(x), layer(x))


def test_quantized_forward_is_the_emulated_kernel() -> None:
    layer = linear()
    x = torch.randn(4, 96) * torch.linspace(0.1, 10, 96)
    wf, af = get_format("mxfp4"), get_format("int4_g64")
    q = QuantLinear.from_layer(layer, wf, af)
    expected = nn.functional.linear(af.quantize(x), wf.quantize(layer.weight), layer.bias)
    assert torch.equal(q(x), expected)
    assert not torch.equal(q(x), layer(x))


def test_pointwise_conv_matches_linear_emulation() -> None:
    conv = nn.Conv2d(32, 16, 1)
    x = torch.randn(2, 32, 5, 3)
    q16 = QuantLinear.from_layer(conv, "fp32", "fp32")
    assert torch.allclose(q16(x), conv(x), atol=1e-5)
    q = QuantLinear.from_layer(conv, "mxfp4", "mxfp4")
    rows = x.permute(0, 2, 3, 1)
    fmt = get_format("mxfp4")
    expected = nn.functional.linear(fmt.quantize(rows), fmt.quantize(conv.weight.reshape(16, 32)), conv.bias)
    assert torch.equal(q(x), expected.permute(0, 3, 1, 2))


def test_smoothing_and_branch_effective_weight() -> None:
    layer = linear(bias=False)
    w = layer.weight.detach()
    s = torch.rand(96) + 0.5
    u, sv, vh = torch.linalg.svd(w * s, full_matrices=False)
    up, down = u[:, :8] * sv[:8], vh[:8]
    branch = LowRankBranch(down, up, "fp32", "fp32")
    q = QuantLinear.from_layer(layer, "fp32", "fp32", weight=w * s - up @ down, smooth=s, branch=branch)
    assert torch.allclose(q.effective_weight(), w, atol=1e-5)
    x = torch.randn(6, 96)
    assert torch.allclose(q(x), layer(x), atol=1e-4)
    # quantized branch factors: W_eff = (Q1(W_main) + Q2(up) Q2(down)) / s, and forward follows it
    f8 = get_format("mxfp8_e4m3")
    qb = QuantLinear.from_layer(layer, "mxfp4", "fp32", weight=w * s - up @ down, smooth=s,
                                branch=LowRankBranch(down, up, f8, "fp32"))
    expected = (get_format("mxfp4").quantize(w * s - up @ down) + f8.quantize(up) @ f8.quantize(down)) / s
    assert torch.allclose(qb.effective_weight(), expected, atol=1e-6)
    assert torch.allclose(qb(x), x @ qb.effective_weight().T, atol=1e-4)


def test_layer_bits_are_exact_and_match_method_accounting() -> None:
    layer = linear(64, 128, bias=True)
    down, up = torch.randn(8, 128), torch.randn(64, 8)
    q = QuantLinear.from_layer(layer, "int4_g64", "int4_g64", smooth=torch.ones(128),
                               branch=LowRankBranch(down, up, "mxfp8_e4m3", "mxfp8_e4m3"))
    expected = (
        4 * 64 * 128 + 16 * 64 * 2  # main weight, fp16 scale per group of 64
        + 8 * 8 * 128 + 8 * 8 * 4  # down [8, 128]: E8M0 scale per 32
        + 8 * 64 * 8 + 8 * 64 * 1  # up [64, 8]: one (ragged) block per row
        + 16 * 128 + 16 * 64  # smoothing vector, bias
    )
    assert q.bits() == expected
    rtn = get_method("rtn", weight_format="mxfp4", act_format="mxfp4")
    assert rtn.quantize_layer(layer).bits() == rtn.layer_bits(64, 128, True) == 4 * 64 * 128 + 8 * 64 * 4 + 16 * 64


# ------------------------------------------------------------------ patching


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn1 = nn.ModuleDict({"to_q": nn.Linear(32, 32), "to_k": nn.Linear(32, 32)})
        self.ff = nn.Sequential(nn.Conv2d(32, 64, 1), nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.Conv2d(64, 32, 1))


class ToyPixArt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.adaln_single = nn.ModuleDict({"linear": nn.Linear(8, 32)})
        self.transformer_blocks = nn.ModuleList([Block(), Block()])
        self.proj_out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.transformer_blocks:
            h = blk.attn1["to_q"](x) + blk.attn1["to_k"](x)
            img = h.transpose(1, 2).reshape(h.shape[0], 32, 2, 2)
            x = x + blk.ff(img).reshape(h.shape[0], 32, 4).transpose(1, 2)
        return self.proj_out(x)


ToyPixArt.__name__ = "PixArtTransformer2DModel"  # picks the PixArt adapter's skip list


def test_select_quantize_and_restore() -> None:
    model = ToyPixArt()
    sel = select_layers(model)
    assert sorted(sel.layers) == sorted(
        f"transformer_blocks.{i}.{n}" for i in range(2) for n in ("attn1.to_q", "attn1.to_k", "ff.0", "ff.2")
    )
    assert sel.skipped["adaln_single.linear"] == "adaLN modulation shared by all blocks (deepcompressor: embed)"
    assert sel.skipped["proj_out"] == "output projection (deepcompressor: embed)"
    assert "conv is not a linear map" in sel.skipped["transformer_blocks.0.ff.1"]
    x = torch.randn(3, 4, 32)
    ref = model(x)
    report = quantize_model(model, get_method("rtn", weight_format="mxfp4", act_format="mxfp4"))
    assert len(report.quantized) == 8 and isinstance(model.transformer_blocks[1].ff[2], QuantLinear)
    out = model(x)
    assert out.shape == ref.shape and not torch.equal(out, ref)
    restore_model(model, report)
    assert torch.equal(model(x), ref)
    plan = LayerPlan.for_model(model, include=["*attn1*"], exclude=["*to_k"])
    sel2 = select_layers(model, plan)
    assert sorted(sel2.layers) == ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn1.to_q"]
    assert sel2.skipped["transformer_blocks.0.attn1.to_k"] == "excluded by pattern"
    assert sel2.skipped["transformer_blocks.0.ff.0"] == "not included"


def test_stats_collector_on_any_model() -> None:
    model = ToyPixArt()
    sel = select_layers(model)
    spec = StatsSpec(absmax=True, rows=5, xtx="diag")
    xs = [torch.randn(3, 4, 32) for _ in range(3)]
    with StatsCollector(sel.layers, spec, seed=1) as col, torch.no_grad():
        for x in xs:
            model(x)
    stats = col.result()
    q = stats["transformer_blocks.0.attn1.to_q"]
    rows = torch.cat([x.reshape(-1, 32) for x in xs])
    assert q.count == 36 and q.rows.shape == (5, 32)
    assert torch.equal(q.absmax, rows.abs().amax(0))
    assert torch.allclose(q.xtx, (rows * rows).sum(0))
    assert all(any(torch.equal(r, row) for row in rows) for r in q.rows)  # a sample of real rows
    conv = stats["transformer_blocks.0.ff.2"]
    assert conv.absmax.shape == (32 * 2,) and conv.count == 3 * 3 * 4  # channels-last rows of a 1x1 conv
    with StatsCollector(sel.layers, spec, seed=1) as col2, torch.no_grad():
        for x in xs:
            model(x)
    assert torch.equal(col2.result()["transformer_blocks.0.attn1.to_q"].rows, q.rows)  # same seed, same sample


# ------------------------------------------------------------------ registry


def test_registry_duplicates_and_suggestions() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("alpha", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha", 2)
    with pytest.raises(UserError, match="did you mean alpha"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="already registered"):
        METHODS.register("rtn", object)


def test_a_batched_method_quantizes_one_layer_as_a_batch_of_one() -> None:
    @dataclasses.dataclass(frozen=True)
    class Batched(Method):
        def quantize_layers(self, layers, stats=None, progress=None):
            return {name: QuantLinear.from_layer(lin, self.weight_format, self.act_format, weight=lin.weight * 2)
                    for name, lin in layers.items()}

    layer = nn.Linear(8, 4)
    q = Batched(weight_format="fp32", act_format="fp32").quantize_layer(layer)
    assert torch.equal(q.effective_weight(), layer.weight.detach() * 2)
    with pytest.raises(NotImplementedError, match="neither quantize_layer nor quantize_layers"):
        Method(weight_format="fp32", act_format="fp32").quantize_layer(layer)


def test_outside_plugin_registers_a_method_through_entry_points(tmp_path: Path) -> None:
    """A package outside ptqbench adds a method with one file and an entry point."""
    site = tmp_path / "site"
    (site / "toy_ptq").mkdir(parents=True)
    (site / "toy_ptq" / "__init__.py").write_text(textwrap.dedent('''
        """A toy PTQ method living outside ptqbench."""
        from dataclasses import dataclass
        from ptqbench.layers import QuantLinear
        from ptqbench.method import Method, register_method

        @register_method("halfway")
        @dataclass(frozen=True)
        class Halfway(Method):
            """Toy: RTN on a weight shrunk by `factor`."""
            factor: float = 0.5

            def quantize_layer(self, layer, stats=None):
                return QuantLinear.from_layer(layer, self.weight_format, self.act_format,
                                              weight=layer.weight.detach() * self.factor)
    '''))
    dist = site / "toy_ptq-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-ptq\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ptqbench.methods]\nhalfway = toy_ptq\n")
    script = textwrap.dedent('''
        import sys, torch
        from ptqbench import get_method
        from ptqbench.listing import rows
        m = get_method("halfway", factor=0.25, weight_format="fp32", act_format="fp32")
        layer = torch.nn.Linear(4, 3)
        q = m.quantize_layer(layer)
        assert torch.allclose(q.effective_weight(), layer.weight * 0.25)
        names = [n for n, _ in rows("methods")]
        assert "halfway" in names and "rtn" in names, names
        print("ok", m.params()["factor"])
    ''')
    env = {"PYTHONPATH": f"{site}:{Path(__file__).resolve().parents[1]}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok 0.25"


# ------------------------------------------------------------------ equal memory


@dataclasses.dataclass(frozen=True)
class Branchy(LowRankMethod):
    """A low-rank method for accounting tests (never registered)."""

    name = "branchy"


def test_equal_memory_worked_example() -> None:
    """spec/formats.md: 1152x1152, mxfp4 main; a bf16 rank-32 branch costs 32 * 2304 * 16 bits."""
    ref = Branchy(weight_format="mxfp4", act_format="mxfp4", rank=32, branch_format="bf16")
    shapes = [LayerShape("attn.to_q", 1152, 1152, False)]
    assert model_bits(ref, shapes) - model_bits(dataclasses.replace(ref, rank=0), shapes) == 32 * 2304 * 16
    ranks = {b: solve_rank(ref, Branchy(weight_format="mxfp4", branch_format=b), shapes)
             for b in ("mxfp8_e4m3", "mxfp6_e2m3", "mxfp4")}
    # The spec rounds 81.92 to 82 for mxfp6; at rank 82 the exact bits exceed the budget by 5,184 bits.
    assert ranks == {"mxfp8_e4m3": 62, "mxfp6_e2m3": 81, "mxfp4": 120}
    budget = model_bits(ref, shapes)
    for b, r in ranks.items():
        cand = Branchy(weight_format="mxfp4", branch_format=b)
        assert model_bits(dataclasses.replace(cand, rank=r), shapes) <= budget
        assert model_bits(dataclasses.replace(cand, rank=r + 1), shapes) > budget
    assert model_bits(dataclasses.replace(ref, branch_format="mxfp6_e2m3", rank=82), shapes) - budget == 5184


def test_equal_memory_per_layer_multiple_and_errors() -> None:
    ref = Branchy(weight_format="int4_g64", rank=32, branch_format="bf16")
    cand = Branchy(weight_format="mxfp4", branch_format="mxfp8_e4m3")
    shapes = [LayerShape("a", 1152, 1152, True), LayerShape("b", 4608, 1152, True), LayerShape("c", 1152, 4608, True)]
    per = solve_rank(ref, cand, shapes, per_layer=True)
    assert isinstance(per, list) and len(per) == 3 and all(r >= 62 for r in per)
    wide = solve_rank(ref, cand, shapes)
    assert model_bits(dataclasses.replace(cand, rank=wide), shapes) <= model_bits(ref, shapes)
    assert solve_rank(ref, cand, shapes, multiple=16) % 16 == 0
    assert bits_per_weight(None, shapes) > 16  # biases count
    with pytest.raises(UserError, match="even at rank 0"):
        solve_rank(Branchy(weight_format="mxfp4", rank=0), Branchy(weight_format="mxfp8_e4m3"), shapes)
    with pytest.raises(UserError, match="no low-rank branch"):
        solve_rank(ref, get_method("rtn"), shapes)


class ToyAttention(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        for leaf in ("to_q", "to_k", "to_v"):
            setattr(self, leaf, nn.Linear(width, width))
        self.to_out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(self.to_q(x) + self.to_k(x) * self.to_v(x))


def test_deployed_bits_equal_accounted_bits_with_shared_qkv() -> None:
    """Fused q/k/v store one smoothing vector and one down-projection: PatchReport.bits() (what the
    built modules store) equals model_bits over LayerShapes grouped by qkv_group, shared or not."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": ToyAttention(), "b": ToyAttention()})
    x = torch.randn(32, 32)  # small enough to stay below the CPU compile threshold of the formats
    selection = select_layers(model)
    collector = StatsCollector(selection.layers, StatsSpec(absmax=True, rows=32))
    with collector, torch.no_grad():
        model["a"](x)
        model["b"](x * 3)
    stats = collector.result()
    shapes = [dataclasses.replace(s, group=qkv_group(s.name)) for s in selection.shapes()]
    for share in (True, False):
        method = get_method("svdquant", weight_format="mxfp4", act_format="mxfp4", rank=8, num_grids=2,
                            num_iters=2, branch_format="mxfp8_e4m3", share_qkv=share)
        report = quantize_model(model, method, stats)
        assert report.bits() == model_bits(method, shapes), share
        restore_model(model, report)
    shared = model_bits(dataclasses.replace(method, share_qkv=True), shapes)
    assert model_bits(method, shapes) - shared == 2 * 2 * (method.down_bits(32) + 16 * 32)
    assert qkv_group("b.attn2.to_q", cross_attention=True) is None
    assert qkv_group("b.attn2.to_k", cross_attention=True) == qkv_group("b.attn2.to_v", True) == "b.attn2.kv"


def test_per_layer_ranks_are_solved_per_share_group() -> None:
    ref = get_method("svdquant", weight_format="mxfp4", act_format="mxfp4", rank=32)
    cand = Branchy(weight_format="mxfp4", branch_format="mxfp8_e4m3")
    shapes = [LayerShape(f"a.{k}", 1152, 1152, False, "a.qkv") for k in ("to_q", "to_k", "to_v")]
    shapes.append(LayerShape("a.to_out", 1152, 1152, True))
    ranks = solve_rank(ref, cand, shapes, per_layer=True)
    assert ranks[0] == ranks[1] == ranks[2] != ranks[3]
    group_budget = model_bits(ref, shapes[:3])
    assert model_bits(dataclasses.replace(cand, rank=ranks[0]), shapes[:3]) <= group_budget
    assert model_bits(dataclasses.replace(cand, rank=ranks[0] + 1), shapes[:3]) > group_budget
