"""Suites: validation with file/line/field errors, grid expansion, cell hashes, equal-memory ranks, dry run."""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ptqbench import cli, shapes
from ptqbench.cache import cache_key
from ptqbench.errors import UserError
from ptqbench.memory import model_bits
from ptqbench.runner import select
from ptqbench.shapes import ModelShapes, ShapeCache
from ptqbench.suite import NOT_HASHED, expand, load_suite, user_plan

REPO = Path(__file__).resolve().parent.parent
SUITES = sorted((REPO / "suites").glob("*.yaml"))


@functools.cache
def _tiny_transformer(name: str):
    from ptqbench.models.base import get_model

    return get_model(name).load("cpu").transformer


@pytest.fixture(autouse=True)
def _shared_tiny_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load each tiny pipeline once for the whole module (shapes only; nothing mutates them)."""
    monkeypatch.setattr(shapes, "load_transformer", lambda entry: _tiny_transformer(entry.name))


BASE = """name: t
models: [tiny-pixart]
prompts: {set: builtin, n: 2}
metrics: [psnr]
"""


def write(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    """Write a suite; an indented block after ``BASE`` is dedented on its own."""
    head = BASE if text.startswith(BASE) else ""
    path = tmp_path / name
    path.write_text(head + textwrap.dedent(text[len(head):]).lstrip("\n"), encoding="utf-8")
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["run", *args])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- shipped suites


@pytest.mark.parametrize("path", SUITES, ids=[p.stem for p in SUITES])
def test_shipped_suites_validate(path: Path) -> None:
    s = load_suite(path)
    assert s.name == path.stem and s.grid and s.models


def test_shipped_suites_are_all_there() -> None:
    names = {p.stem for p in SUITES}
    assert {"equal_memory", "formats", "rank_sweep", "mixed_precision", "loraq_objectives", "smoke", "fmnist"} <= names


def _low_rank_cells(suite: str, n_cells: int, step: float, capsys: pytest.CaptureFixture[str]) -> dict[str, dict]:
    """Dry-run a shipped suite: {model: {(method, formats): (rank, bits/weight)}} of low-rank cells,
    after checking every solved cell is at most its SVDQuant reference's bits and within ``step``
    (about one rank's bits per weight) of it."""
    code, out, _ = run_cli([str(REPO / "suites" / suite), "--dry-run"], capsys)
    assert code == 0
    lines = [line for line in out.splitlines() if re.match(r"^[0-9a-f]{16}\s", line)]
    assert len(lines) == n_cells
    rows = [re.split(r"\s{2,}", line) for line in lines]
    by_model: dict[str, dict[tuple[str, str], tuple[int, float]]] = {}
    for _digest, model, method, formats, rank, bpw, *_ in rows:
        if method.startswith("loraq") or method.startswith("svdquant"):
            by_model.setdefault(model, {})[(method.split()[0], formats)] = (int(rank), float(bpw))
    for model, cells in by_model.items():
        for (method, formats), (_, bpw) in cells.items():
            main = formats.split(" B:")[0]
            ref = cells[("svdquant", f"{main} B:model/model")][1]
            assert bpw <= ref, (model, method, formats)
            assert bpw > ref - step, (model, method, formats)  # the largest rank that fits: close to it
    return by_model


def test_fmnist_dry_run_solves_ranks_for_the_shipped_model(capsys: pytest.CaptureFixture[str]) -> None:
    # ref + 2 x (rtn, smoothquant, svdquant) + 6 loraq; one rank of a 6-bit branch on 256-wide layers
    # is about 0.047 bits per weight
    cells = _low_rank_cells("fmnist.yaml", 13, 0.05, capsys)["fmnist-dit"]
    ranks = {formats: rank for (method, formats), (rank, _) in cells.items() if method == "loraq"}
    # SVDQuant's fused q/k/v store one smoothing vector and one down-projection per group
    # (deepcompressor's default), which lowers the budget LoRaQ is solved against (62/80/81/120 before)
    assert ranks["W:int4_g64 A:int4_g64 B:int8_g64/int8_g64"] == 56
    assert ranks["W:int4_g64 A:int4_g64 B:int6_g64/int6_g64"] == 73
    assert ranks["W:mxfp4 A:mxfp4 B:mxfp6_e2m3/mxfp6_e2m3"] == 73
    assert ranks["W:mxfp4 A:mxfp4 B:mxfp4/mxfp8_e4m3"] == 108


def test_equal_memory_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    by_model = _low_rank_cells("equal_memory.yaml", 38, 0.02, capsys)  # 2 models x (1 + 3 + 3 + 3 + 9)
    pixart = by_model["pixart-sigma"]
    svd = pixart[("svdquant", "W:mxfp4 A:mxfp4 B:model/model")]
    assert svd[0] == 32
    # LoRaQ ranks at equal memory to SVDQuant r32 with its q/k/v sharing R and s (counted once), and
    # the cross-attention k/v 16-bit (deepcompressor's skip list): W8A8 56, W6A6 73, W4A8 108
    assert pixart[("loraq", "W:mxfp4 A:mxfp4 B:mxfp8_e4m3/mxfp8_e4m3")][0] == 56
    assert pixart[("loraq", "W:mxfp4 A:mxfp4 B:mxfp6_e2m3/mxfp6_e2m3")][0] == 73
    assert pixart[("loraq", "W:mxfp4 A:mxfp4 B:mxfp4/mxfp8_e4m3")][0] == 108
    assert pixart[("loraq", "W:int4_g64 A:int4_g64 B:int8_g64/int8_g64")][0] == 56


# ----------------------------------------------------------------------------- expansion and hashing


def test_grid_expansion_with_axes_variants_and_shorthands(tmp_path: Path) -> None:
    s = load_suite(write(tmp_path, BASE + """
        methods:
          - method: rtn
            format: [mxfp4, int4_g64]
          - method: smoothquant
            format: mxfp4
            alpha: [0.3, 0.5, 0.7]
            grid: [0.1, 0.9]            # a tuple field: a plain list sets it
          - method: loraq
            rank: [8, 16]
            variants:
              - {format: mxfp4, branch: mxfp8_e4m3}
              - {weight_format: int4_g64, act_format: int8_g64, branch_format: int8_g64, branch_act_format: bf16}
        """))
    assert len(s.grid) == 2 + 3 + 4
    fields = [dict(p.fields) for p in s.grid]
    assert fields[0] == {"weight_format": "mxfp4", "act_format": "mxfp4"}
    assert [f["alpha"] for f in fields[2:5]] == [0.3, 0.5, 0.7]
    assert fields[2]["grid"] == (0.1, 0.9)
    loraq = [p.build() for p in s.grid[5:]]
    assert [(m.rank, str(m.act_format), str(m.branch_act_format)) for m in loraq] == [
        (8, "mxfp4", "mxfp8_e4m3"), (16, "mxfp4", "mxfp8_e4m3"), (8, "int8_g64", "bf16"), (16, "int8_g64", "bf16"),
    ]
    cells = expand(s)
    assert len(cells) == 1 + 9 and cells[0].is_reference
    assert len({c.hash for c in cells}) == len(cells)


def test_cell_hash_is_content_only(tmp_path: Path) -> None:
    a = write(tmp_path, BASE + "methods: [{method: rtn, format: mxfp4}]\n", "a.yaml")
    b = write(tmp_path, """
        # the same content, spelled differently
        metrics: [psnr]
        name: other-name
        prompts: {n: 2, set: builtin}
        models: [{name: tiny-pixart, steps: 8}]
        methods:
          - {act_format: {name: mxfp4}, method: rtn, weight_format: "mxfp4:block=32"}
        """, "b.yaml")
    ca, cb = expand(load_suite(a)), expand(load_suite(b))
    assert [c.hash for c in ca] == [c.hash for c in cb]
    # the hash is cache_key over the resolved config, pinned so it stays stable across machines
    ref = ca[0]
    assert ref.config == {
        "model": "tiny-pixart", "prompt_set": "builtin", "n_prompts": 2, "gen.steps": 8, "gen.guidance": 4.5,
        "gen.resolution": 32, "gen.batch_size": 8, "metrics": ["psnr"], "method": "none",
    }
    # the metric list and the batch size change no image: the hash leaves them out
    unhashed = {k: v for k, v in ref.config.items() if k not in ("metrics", "gen.batch_size")}
    assert ref.hash == cache_key(unhashed) == "cc98cfa06f99eef1"
    c = write(tmp_path, BASE + "methods: [{method: rtn, format: mxfp4}]\ndefaults: {steps: 3}\n", "c.yaml")
    assert {x.hash for x in expand(load_suite(c))}.isdisjoint({x.hash for x in ca})


def test_metrics_and_batch_size_are_not_in_the_hash(tmp_path: Path) -> None:
    text = BASE + "methods: [{method: rtn, format: mxfp4}, {method: loraq, format: mxfp4, rank: 4}]\n"
    base = expand(load_suite(write(tmp_path, text, "a.yaml")))
    more = expand(load_suite(write(tmp_path, text.replace("[psnr]", "[psnr, ssim]") + "defaults: {batch_size: 3}\n",
                                   "b.yaml")))
    assert [c.hash for c in base] == [c.hash for c in more]
    assert more[1].config["metrics"] == ["psnr", "ssim"] and more[1].config["gen.batch_size"] == 3  # still logged
    assert set(NOT_HASHED) == {"budget", "metrics", "gen.batch_size"}
    steps = expand(load_suite(write(tmp_path, text + "defaults: {steps: 3}\n", "c.yaml")))
    assert {c.hash for c in steps}.isdisjoint(c.hash for c in base)  # sampling does change the images


def test_replicates_redraw_seeds_and_keep_replicate_zero(tmp_path: Path) -> None:
    text = BASE + """
        calibration: {n: 1}
        methods:
          - {method: rtn, format: mxfp4}
          - {method: smoothquant, format: mxfp4, replicates: 2}
          - {method: loraq, format: mxfp4, rank: 4, rotation: random, seed: 5}
        """
    plain = expand(load_suite(write(tmp_path, text, "a.yaml")))
    rep = expand(load_suite(write(tmp_path, text + "replicates: 3\n", "b.yaml")))
    assert len(plain) == 5 and len(rep) == 1 + 1 + 2 + 3  # rtn: nothing to re-draw; smoothquant: its own 2
    by = {}
    for c in rep[1:]:
        by.setdefault(c.method_name, []).append(c)
    assert len(by["rtn"]) == 1 and by["rtn"][0].replicate_group == ""
    loraq = by["loraq"]
    assert [c.replicate for c in loraq] == [0, 1, 2] and {c.replicate_group for c in loraq} == {plain[4].hash}
    assert loraq[0].hash == plain[4].hash  # replicate 0 is the cell without replicates
    assert [c.method.seed for c in loraq] == [5, 6, 7]
    assert [c.calibration.seed for c in loraq] == [0, 1, 2] and loraq[2].config["calibration"]["seed"] == 2
    assert loraq[1].config["replicate"] == 1 and "replicate" not in loraq[0].config
    assert len({c.hash for c in rep}) == len(rep)
    smooth = by["smoothquant"]
    assert [c.calibration.seed for c in smooth] == [0, 1] and smooth[0].hash == plain[2].hash


def test_calibration_only_in_the_hash_of_methods_that_use_it(tmp_path: Path) -> None:
    text = BASE + "methods: [{method: rtn, format: mxfp4}, {method: smoothquant, format: mxfp4}]\n"
    one = expand(load_suite(write(tmp_path, text + "calibration: {n: 2}\n", "a.yaml")))
    two = expand(load_suite(write(tmp_path, text + "calibration: {n: 3}\n", "b.yaml")))
    assert one[1].hash == two[1].hash  # rtn: no statistics
    assert one[2].hash != two[2].hash  # smoothquant: calibration changes it
    assert one[2].config["calibration"] == {  # the suite's key names, pinned with the hash
        "set": "builtin-calib", "n": 2, "steps": None, "guidance": None, "resolution": None, "seed": 0, "rows": 256,
    }
    assert one[2].config["layers"] == {"include": ["*"], "exclude": []} and one[2].hash == "bf10e02ed017d1c8"
    assert one[2].calibration.n_prompts == 2 and one[2].calibration.prompt_set == "builtin-calib"


def test_budget_model_wide_per_layer_and_multiple(tmp_path: Path) -> None:
    text = BASE + """
        budget:
          reference: {method: svdquant, rank: 8, branch: bf16}
          per_layer: {per_layer}
          multiple: {multiple}
        methods:
          - {method: svdquant, format: mxfp4, rank: 8, branch: bf16}
          - {method: loraq, format: mxfp4, branch: mxfp8_e4m3, rank: budget}
        """
    wide = expand(load_suite(write(tmp_path, text.replace("{per_layer}", "false").replace("{multiple}", "1"))))
    ref, loraq = wide[1], wide[2]
    assert loraq.rank == 13 and loraq.ranks is None  # SVDQuant's shared q/k/v R and s are counted once
    assert loraq.bits <= ref.bits
    model = ShapeCache()(loraq.model, user_plan())
    assert model_bits(dataclasses.replace(loraq.method, rank=14), model.layers) > ref.bits  # 13 is the largest
    four = expand(load_suite(write(tmp_path, text.replace("{per_layer}", "false").replace("{multiple}", "4"))))
    assert four[2].rank == 12
    per = expand(load_suite(write(tmp_path, text.replace("{per_layer}", "true").replace("{multiple}", "1"))))[2]
    assert set(per.ranks) == {s.name for s in model.layers}
    low, high = min(per.ranks.values()), max(per.ranks.values())
    assert per.rank == high and (low == high or per.label.endswith(f"(equal-memory ranks {low}-{high})"))
    for s in model.layers:
        fits = dataclasses.replace(per.method, rank=per.ranks[s.name]).layer_bits(s.out_features, s.in_features, s.bias)
        assert fits <= ref.method.layer_bits(s.out_features, s.in_features, s.bias)
    assert per.bits <= ref.bits and per.config["rank_per_layer"] == per.ranks
    assert per.params()["rank_per_layer"]["max"] == max(per.ranks.values())


def test_select_only_and_shards(tmp_path: Path) -> None:
    cells = expand(load_suite(write(tmp_path, BASE + "methods: [{method: rtn, format: [mxfp4, int4_g64, mxint4]}]\n")))
    assert [c.method_name for c in select(cells, only="none")] == ["none"]
    assert len(select(cells, only="*int4_g64*")) == 1
    shards = [select(cells, shard=(i, 3)) for i in range(3)]
    assert sorted(c.hash for s in shards for c in s) == sorted(c.hash for c in cells)
    assert all(len(s) in (1, 2) for s in shards)
    backwards = select(list(reversed(cells)), shard=(1, 3))
    assert [c.hash for c in select(cells, shard=(1, 3))] == [c.hash for c in reversed(backwards)]


def test_model_shapes_match_a_loaded_model() -> None:
    from ptqbench.patching import LayerPlan, select_layers

    t = _tiny_transformer("tiny-sana")
    found = ModelShapes.from_module(t, user_plan(exclude=["*.attn2.to_k"]))
    plan = LayerPlan.for_model(t, exclude=["*.attn2.to_k"])
    assert found.plan == plan  # the plan the model's cells run with: default skips plus the user's
    sel = select_layers(t, plan)
    assert [s.name for s in found.layers] == list(sel.layers)
    params = sum(p.numel() for p in t.parameters()) + sum(b.numel() for b in t.buffers())
    inside = sum(p.numel() for layer in sel.layers.values() for p in layer.parameters())
    assert found.other_elements == params - inside
    assert found.model_bytes(None) == (16 * params + 7) // 8  # all 16-bit: two bytes per element
    assert "transformer_blocks.0.ff.conv_depth" in found.skipped


# ----------------------------------------------------------------------------- bad input: exit 2, one line

ERRORS = {
    "yaml_syntax": (
        "name: t\nmodels: [tiny-pixart\nmethods: []\n", r"suite\.yaml:3:\d+: YAML syntax error"),
    "not_a_mapping": ("- a\n- b\n", r"suite\.yaml:1: expected a mapping with keys name, description"),
    "unknown_top_key": (BASE + "method: []\n", r"suite\.yaml:5: method: unknown key 'method'; did you mean methods\?"),
    "missing_methods": (BASE, r"missing required key 'methods'"),
    "wrong_type": (
        BASE + "defaults: {steps: four}\nmethods: [{method: rtn}]\n",
        r"suite\.yaml:5: defaults\.steps: expected an integer >= 1, got 'four'"),
    "unknown_method": (
        BASE + "methods:\n  - method: svdqant\n",
        r"suite\.yaml:6: methods\[0\]\.method: unknown method 'svdqant'; did you mean svdquant"),
    "unknown_format": (
        BASE + "methods:\n  - method: rtn\n    format: [mxfp4, mxfp5]\n",
        r"suite\.yaml:7: methods\[0\]\.format\[1\]: unknown format 'mxfp5'; did you mean .*mxfp4"),
    "unknown_model": (
        "name: t\nmodels: [tiny-pixar]\nmethods: [{method: rtn}]\n",
        r"suite\.yaml:2: models\[0\]\.name: unknown model 'tiny-pixar'; did you mean tiny-pixart"),
    "unknown_metric": (
        BASE.replace("[psnr]", "[psnr, lpip]") + "methods: [{method: rtn}]\n",
        r"suite\.yaml:4: metrics\[1\]: unknown metric 'lpip'; did you mean lpips"),
    "unknown_field": (
        BASE + "methods:\n  - method: smoothquant\n    alpah: 0.4\n",
        r"suite\.yaml:7: methods\[0\]\.alpah: method smoothquant has no field 'alpah'; did you mean alpha\?"),
    "bad_field_value": (
        BASE + "methods:\n  - method: loraq\n    objective: loss\n",
        r"suite\.yaml:7: methods\[0\]\.objective: loraq: objective 'loss' is not valid "
        r"\(valid: weight, activation, output\)"),
    "negative_rank": (
        BASE + "methods:\n  - method: svdquant\n    rank: [8, -3]\n",
        r"suite\.yaml:7: methods\[0\]\.rank\[1\]: rank must be an integer >= 0 or 'budget', got -3"),
    "rank_too_large": (
        BASE + "methods:\n  - method: svdquant\n    rank: 1000\n",
        r"suite\.yaml:7: methods\[0\]\.rank: rank 1000 exceeds the smallest selected layer of tiny-pixart "
        r"\(.*\) \(valid: 0\.\.\d+\)"),
    "budget_unmet": (
        BASE + "budget: {reference: {method: rtn, format: int4_g128}}\n"
        "methods:\n  - {method: loraq, format: int4_g64, rank: budget}\n",
        r"suite\.yaml:7: methods\[0\]\.rank: tiny-pixart: equal memory: .* does not fit the budget of .* even at "
        r"rank 0"),
    "budget_missing": (
        BASE + "methods:\n  - {method: loraq, rank: budget}\n",
        r"rank: budget needs a top-level 'budget' section"),
    "budget_on_rtn": (
        BASE + "budget: {reference: {method: svdquant}}\nmethods:\n  - {method: rtn, rank: budget}\n",
        r"methods\[0\]\.rank: method rtn has no field 'rank'"),
    "missing_prompt_file": (
        BASE.replace("{set: builtin, n: 2}", "{set: sdci, path: nowhere/sDCI.yaml}") + "methods: [{method: rtn}]\n",
        r"suite\.yaml:3: prompts\.path: nowhere/sDCI\.yaml: no such file or folder"),
    "missing_model_path": (
        "name: t\nmodels:\n  - {name: pixart-sigma, path: /nonexistent/pixart}\nmethods: [{method: rtn}]\n",
        r"suite\.yaml:3: models\[0\]\.path: /nonexistent/pixart: no such file or folder"),
    "empty_grid": (BASE + "methods: []\n", r"suite\.yaml:5: methods: the method grid is empty"),
    "empty_axis": (
        BASE + "methods:\n  - {method: rtn, format: []}\n",
        r"methods\[0\]\.format: empty list: an axis with no values expands to no cells"),
    "duplicate_cells": (
        BASE + "methods:\n  - {method: rtn, format: mxfp4}\n"
        "  - {method: rtn, weight_format: mxfp4, act_format: mxfp4}\n",
        r"suite\.yaml:7: duplicate cell 'tiny-pixart rtn W:mxfp4 A:mxfp4': the same configuration as the cell "
        r"from .*suite\.yaml:6"),
    "duplicate_key": (
        BASE + "methods:\n  - method: rtn\n    format: mxfp4\n    format: int4_g64\n",
        r"suite\.yaml:8: methods\[0\]\.format: duplicate key \(first set on line 7\)"),
    "set_twice": (
        BASE + "methods:\n  - {method: rtn, format: mxfp4, act_format: int8_g64}\n",
        r"methods\[0\]\.act_format: act_format is set twice \(also by methods\[0\]\.format\)"),
    "unknown_prompt_set": (
        BASE.replace("set: builtin,", "set: mjhqq,") + "methods: [{method: rtn}]\n",
        r"suite\.yaml:3: prompts\.set: unknown prompt set 'mjhqq'; did you mean mjhq"),
    "bad_layers": (
        BASE + "layers: {include: []}\nmethods: [{method: rtn}]\n",
        r"suite\.yaml:5: layers\.include: the list is empty"),
    "no_layers_selected": (
        BASE + "layers: {include: ['nothing.*']}\nmethods: [{method: rtn}]\n",
        r"layers: selects no quantizable layer of tiny-pixart"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_suites_exit_2_with_one_clear_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text, pattern = ERRORS[case]
    path = tmp_path / "suite.yaml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["suite.yaml", "--dry-run"], capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("ptqbench run: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


def test_bad_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BASE + "methods: [{method: rtn, format: mxfp4}]\n")
    code, _, err = run_cli([str(path), "--dry-run", "--shard", "3/3"], capsys)
    assert code == 2 and "--shard 3/3: expected I/N with 0 <= I < N" in err
    code, _, err = run_cli([str(path), "--dry-run", "--only", "nothing*"], capsys)
    assert code == 2 and "--only nothing*: matches no cell" in err
    code, _, err = run_cli([str(tmp_path / "missing.yaml"), "--dry-run"], capsys)
    assert code == 2 and "missing.yaml: suite file not found" in err


def test_bad_suite_through_a_subprocess(tmp_path: Path) -> None:
    bad = write(tmp_path, BASE + "methods:\n  - method: rtn\n    format: mxpf4\n", "bad.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "ptqbench", "run", str(bad)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("ptqbench run:")]
    assert re.search(r"bad\.yaml:7: methods\[0\]\.format: unknown format 'mxpf4'; did you mean", line), line
    assert not (tmp_path / "mlflow.db").exists()  # nothing ran, nothing was tracked


def test_real_images_folder_from_an_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = BASE.replace("{set: builtin, n: 2}", "{set: builtin, n: 2, real: '${PTQ_TEST_REAL}'}") + (
        "methods: [{method: rtn}]\n"
    )
    monkeypatch.delenv("PTQ_TEST_REAL", raising=False)
    s = load_suite(write(tmp_path, text))
    assert s.prompts[0].real is None and "PTQ_TEST_REAL is not set" in s.prompts[0].note
    monkeypatch.setenv("PTQ_TEST_REAL", str(tmp_path))
    assert load_suite(write(tmp_path, text)).prompts[0].real == str(tmp_path)
    monkeypatch.setenv("PTQ_TEST_REAL", str(tmp_path / "nope"))
    with pytest.raises(UserError, match=r"prompts\.real: .* no such file or folder"):
        load_suite(write(tmp_path, text))


def test_dry_run_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BASE + """
        budget: {reference: {method: svdquant, rank: 8, branch: bf16}, per_layer: true}
        methods:
          - {method: rtn, format: int4_g64}
          - {method: loraq, format: mxfp4, branch: mxfp8_e4m3, rank: budget, steps: 5}
        """)
    code, out, _ = run_cli([str(path), "--dry-run"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    header = ["cell_hash", "model", "method", "formats", "rank", "bits/weight", "model", "bytes", "note"]
    assert lines[0].split() == header
    assert re.search(r"tiny-pixart\s+none\s+16-bit\s+-\s+16\.196429\s+385,472$", lines[1]), lines[1]
    assert re.search(r"tiny-pixart\s+rtn\s+W:int4_g64 A:int4_g64\s+-\s+4\.446429\s+217,024$", lines[2]), lines[2]
    assert re.search(r"loraq steps=5\s+W:mxfp4 A:mxfp4 B:mxfp8_e4m3/mxfp8_e4m3\s+per-layer \d+\.\.\d+\s+", lines[3])
    assert lines[-1].startswith("# 3 cells (1 16-bit references)")
