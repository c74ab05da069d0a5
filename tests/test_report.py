"""``ptqbench report`` on a real temporary MLflow store logged exactly per the run schema (ptqbench.schema)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ptqbench.cli import main as cli_main
from ptqbench.method import METHODS, Method
from ptqbench.metrics.base import METRICS, Metric
from ptqbench.report.load import Artifacts, dedupe
from ptqbench.report.plots import pareto_front
from ptqbench.report.tables import build_table, latex_escape, make_groups, to_markdown
from ptqbench.schema import RunRecord

PROMPTS = ["a red fox in snow", "a bowl of ramen, studio light", "city skyline at dusk", "an old map of the sea"]
SEEDS = [11, 22, 33, 44]
SETTINGS = {"n_prompts": "4", "gen.steps": "2", "gen.guidance": "4.5", "gen.resolution": "32"}
IR_REASON = (
    "ImageReward weights not found at /root/.cache/ImageReward/ImageReward.pt "
    "(set $PTQBENCH_IMAGEREWARD_DIR to a folder holding ImageReward.pt and med_config.json)"
)
REF_REASON = "the 16-bit reference is not compared with itself"
FAIL_ERROR = "RuntimeError: out of memory while quantizing blocks.3.ff | tried 50% & gave_up #2"
DIRECTIONS = {"fid": "lower", "lpips": "lower", "psnr": "higher", "image_reward": "higher", "sharpness": "lower"}
LAYERS = ["blocks.0.attn.to_q", "blocks.0.attn.to_k", "blocks.0.ff.net.0", "blocks.1.attn.to_q", "blocks.1.ff.net.2"]


class Sharpness(Metric):
    """A registered metric whose registry direction (higher) must win over the run's tag (lower)."""

    name = "sharpness"
    higher_is_better = True


def fmt_params(prefix: str, spec: str) -> dict[str, str]:
    """Format params as Method.params() flattens them (spec string plus its fields)."""
    if spec.startswith("int"):
        bits, group = re.fullmatch(r"int(\d+)_g(\d+)", spec).groups()
        fields = {"type": "IntFormat", "bits": bits, "group": group, "per_tensor": "False", "scale_dtype": "fp16"}
    elif spec.startswith("mx"):
        fields = {"type": "MXFormat", "element": "e2m1" if spec == "mxfp4" else "e4m3", "block": "32"}
    else:
        fields = {"type": "CastFormat", "dtype": spec}
    return {prefix: spec, **{f"{prefix}.{k}": v for k, v in fields.items()}}


def method_params(method: str, w: str, a: str, rank: int = 0, branch: str = "") -> dict[str, str]:
    params = {"method": method, **fmt_params("weight_format", w), **fmt_params("act_format", a)}
    if method == "smoothquant":
        params["alpha"] = "0.5"
    if rank:
        params.update({"rank": str(rank), **fmt_params("branch_format", branch)})
        params.update(fmt_params("branch_act_format", branch))
    return params


def sample_image(prompt_i: int, noise: float, seed: int) -> Image.Image:
    """A smooth, prompt-dependent picture plus method-dependent noise."""
    y, x = np.mgrid[0:32, 0:32] / 31.0
    base = np.stack([x, y, (x + y) / 2], -1)
    base = np.roll(base, prompt_i, axis=-1) * (0.4 + 0.15 * prompt_i)
    rng = np.random.default_rng(seed)
    img = np.clip(base + noise * rng.standard_normal(base.shape), 0, 1)
    return Image.fromarray((img * 255).astype(np.uint8))


def log_cell(
    client: Any, exp_id: str, work: Path, *, model: str, method: str, params: dict[str, str], bpw: float,
    metrics: dict[str, float | None], reasons: dict[str, str] | None = None, status: str = "finished",
    error: str = "", noise: float = 0.0, layer_scale: float = 0.0, n: int = 4,
) -> str:
    """Log one cell the way the runner does (the MLflow run schema, ptqbench.schema)."""
    from mlflow.entities import Metric as M
    from mlflow.entities import Param, RunTag

    is_ref = method == "none"
    cell_hash = f"{abs(hash((model, tuple(sorted(params.items()))))):016x}"[:16]
    label = "reference" if is_ref else f"{method} W:{params['weight_format']} A:{params['act_format']}"
    if "rank" in params:
        label += f" r{params['rank']} B:{params['branch_format']}/{params['branch_act_format']}"
    tags = {
        "cell_hash": cell_hash, "ptqbench.status": "running", "suite": "smoke", "suite_file": "suites/smoke.yaml",
        "model": model, "method": method, "prompt_set": "builtin", "is_reference": str(is_ref).lower(), "label": label,
    }
    run = client.create_run(exp_id, run_name=f"{model} {label}", tags=tags)
    rid = run.info.run_id
    model_bytes = int(bpw * 1000 / 8) + 512
    all_params = {
        "model": model, "prompt_set": "builtin", **SETTINGS, **params, "bits_per_weight": repr(bpw),
        "model_bytes": str(model_bytes), "versions.torch": "2.14.1", "versions.ptqbench": "0.1.0",
        "git_commit": "d0ed0b3", "cell_hash": cell_hash,
    }
    client.log_batch(rid, params=[Param(k, v) for k, v in all_params.items()])
    if status == "failed":
        client.log_text(rid, f"Traceback (most recent call last):\n  ...\n{error}\n", "traceback.txt")
        client.log_batch(rid, tags=[RunTag("ptqbench.error", error), RunTag("ptqbench.status", "failed")])
        client.set_terminated(rid, "FAILED")
        return rid
    values: dict[str, float] = {"bits_per_weight": bpw, "model_bytes": float(model_bytes)}
    run_tags = []
    for name, value in metrics.items():
        run_tags.append(RunTag(f"metric_direction.{name}", DIRECTIONS[name]))
        if value is None:
            run_tags.append(RunTag(f"metric_status.{name}", f"not_computed: {(reasons or {})[name]}"))
            values[f"{name}_n"] = 0.0
        else:
            values[name] = value
            values[f"{name}_n"] = float(n)
    errors = layer_scale * (1 + np.arange(len(LAYERS)) / 2)
    values.update({
        "layer_rel_weight_error_mean": float(errors.mean()), "layer_rel_weight_error_max": float(errors.max()),
        "layer_rel_output_error_mean": float(errors.mean() * 1.5), "seconds_calibrate": 0.5,
        "seconds_quantize": 0.25, "seconds_generate": 1.5, "seconds_metrics": 0.75, "seconds_total": 3.0,
    })
    client.log_batch(rid, metrics=[M(k, v, 0, 0) for k, v in values.items()], tags=run_tags)
    art = work / rid
    (art / "samples").mkdir(parents=True)
    (art / "config.yaml").write_text(f"model: {model}\nmethod: {method}\n")
    (art / "patch_report.json").write_text(json.dumps({"quantized": [] if is_ref else LAYERS, "skipped": {}}))
    index = []
    for i, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS, strict=True)):
        sample_image(i, noise, seed).save(art / "samples" / f"{i:03d}.png")
        index.append({"index": i, "prompt": prompt, "seed": seed, "file": f"{i:03d}.png"})
    (art / "samples" / "index.json").write_text(json.dumps(index))
    sample_image(0, noise, 0).save(art / "grid.png")
    for name in ("config.yaml", "patch_report.json", "grid.png"):
        client.log_artifact(rid, str(art / name))
    client.log_artifacts(rid, str(art / "samples"), "samples")
    if not is_ref:
        pd.DataFrame({
            "layer": LAYERS, "out_features": 64, "in_features": 64, "rank": int(params.get("rank", 0)),
            "bits": int(bpw * 4096), "bits_per_weight": bpw, "rel_weight_error": errors,
            "rel_output_error": errors * 1.5, "seconds": 0.01,
        }).to_csv(art / "layer_errors.csv", index=False)
        client.log_artifact(rid, str(art / "layer_errors.csv"))
    client.set_tag(rid, "ptqbench.status", "finished")
    client.set_terminated(rid, "FINISHED")
    return rid


# name, weight, act, rank, branch, bpw, fid, lpips, psnr, sharpness, noise
PIXART_CELLS = [
    ("rtn", "int4_g64", "int4_g64", 0, "", 4.25, 35.25, 0.5123, 14.81, 0.31, 0.30),
    ("rtn", "mxfp4", "mxfp4", 0, "", 4.25, 31.8, 0.517, 14.8, 0.35, 0.28),
    ("smoothquant", "int4_g64", "int4_g64", 0, "", 4.27, 28.4, 0.45, 15.9, 0.42, 0.25),
    ("svdquant", "int4_g64", "int4_g64", 16, "bf16", 4.6, 22.1, 0.30, 17.2, 0.61, 0.15),
    ("svdquant", "int4_g64", "int4_g64", 32, "bf16", 4.9, 21.0, 0.2901, 18.03, 0.66, 0.12),
    ("loraq", "mxfp4", "mxfp4", 16, "mxfp8_e4m3", 4.45, 21.7, 0.28, 17.9, 0.64, 0.13),
    ("loraq", "mxfp4", "mxfp4", 32, "mxfp8_e4m3", 4.6, 20.9, 0.2341, 18.6, 0.71, 0.10),
]


def populate(uri: str, root: Path) -> dict[str, str]:
    """Two experiments: 'smoke' (tiny-pixart, full grid, one failed cell) and 'smoke-sana' (tiny-sana, one rank)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    work = root / "work"
    ids = {}
    exp = client.create_experiment("smoke", artifact_location=(root / "mlartifacts" / "smoke").as_uri())
    ir = {"image_reward": None}
    reasons = {"image_reward": IR_REASON, "lpips": REF_REASON, "psnr": REF_REASON}
    ids["ref"] = log_cell(client, exp, work, model="tiny-pixart", method="none", params={"method": "none"}, bpw=16.0,
                          metrics={"fid": 20.512, "lpips": None, "psnr": None, "sharpness": 0.8, **ir},
                          reasons=reasons)
    for m, w, a, r, b, bpw, fid, lp, ps, sh, noise in PIXART_CELLS:
        ids[f"{m}-{w}-{r}"] = log_cell(
            client, exp, work, model="tiny-pixart", method=m, params=method_params(m, w, a, r, b), bpw=bpw,
            metrics={"fid": fid, "lpips": lp, "psnr": ps, "sharpness": sh, **ir}, reasons=reasons, noise=noise,
            layer_scale=noise / 3,
        )
    ids["failed"] = log_cell(client, exp, work, model="tiny-pixart", method="loraq",
                             params=method_params("loraq", "mxfp4", "mxfp4", 64, "mxfp8_e4m3"), bpw=5.2, metrics={},
                             status="failed", error=FAIL_ERROR)
    exp2 = client.create_experiment("smoke-sana", artifact_location=(root / "mlartifacts" / "smoke-sana").as_uri())
    ids["sana-ref"] = log_cell(client, exp2, work, model="tiny-sana", method="none", params={"method": "none"},
                               bpw=16.0, metrics={"fid": 30.0, "psnr": None}, reasons=reasons)
    ids["sana-rtn"] = log_cell(client, exp2, work, model="tiny-sana", method="rtn",
                               params=method_params("rtn", "nvfp4", "nvfp4"), bpw=4.5,
                               metrics={"fid": 33.5, "psnr": 16.25}, noise=0.2, layer_scale=0.05)
    return ids


# ----------------------------------------------------------------------------- fixtures

PIXART = "smoke--tiny-pixart--builtin"
SANA = "smoke-sana--tiny-sana--builtin"


def run_report(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(["report", *argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    METRICS.register("sharpness", Sharpness)
    try:
        populate(uri, root)
        yield uri, root
    finally:
        METRICS.unregister("sharpness")


@pytest.fixture(scope="module")
def report(store: tuple[str, Path]) -> tuple[Path, str]:
    uri, root = store
    out = root / "report"
    rc, stdout, stderr = run_report("--tracking-uri", uri, "--out", str(out))
    assert rc == 0, stderr
    return out, stdout


def md_rows(text: str) -> list[list[str]]:
    """Cells of a Markdown table (unescaped), header first, separator dropped."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|:") and not line.startswith("|-"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            rows.append([c.strip().replace("\\|", "|") for c in cells])
    return rows


def footnotes(text: str) -> dict[int, str]:
    return {int(m[1]): m[2].strip().replace("\\|", "|") for m in re.finditer(r"^\[(\d+)\] (.*)$", text, re.M)}


# ----------------------------------------------------------------------------- tables


def test_markdown_table_has_reference_first_best_in_bold_nc_and_failed_rows(report: tuple[Path, str]) -> None:
    text = (report[0] / "tables" / f"{PIXART}.md").read_text()
    header, *rows = md_rows(text)
    col = {h.split(" ")[0]: i for i, h in enumerate(header)}
    assert header[col["fid"]] == "fid ↓ (n=4)" and header[col["psnr"]] == "psnr ↑ (n=4)"
    assert header[col["lpips"]] == "lpips ↓ (n=4)"
    assert header[col["sharpness"]] == "sharpness ↑ (n=4)"  # the registry wins over the run's 'lower' tag
    assert header[col["image_reward"]] == "image_reward ↑"  # never computed: no n
    assert [r[0] for r in rows] == ["16-bit reference", "rtn", "rtn", "smoothquant", "svdquant", "svdquant",
                                    "loraq", "loraq", "loraq"]
    assert [r[col["Weights"]] for r in rows[1:4]] == ["int4_g64", "mxfp4", "int4_g64"]
    assert [r[col["Rank"]] for r in rows[4:]] == ["16", "32", "16", "32", "64"]
    assert [r[col["Bits/w"]] for r in rows[:2]] == ["16.000", "4.250"]
    best = rows[7]  # loraq r32
    assert [best[col[m]] for m in ("fid", "lpips", "psnr", "sharpness")] == ["**20.9**", "**0.234**", "**18.60**",
                                                                               "**0.710**"]
    bold = [c for r in rows for c in r if c.startswith("**")]
    assert len(bold) == 4  # one per column with a direction; the reference's better FID (20.5) is not marked
    assert rows[0][col["fid"]] == "20.5" and rows[1][col["fid"]] == "35.2" and rows[4][col["psnr"]] == "17.20"
    # PSNR 14.81 and 14.8 would both read 14.8 at three significant digits: the column gets one more.
    assert [rows[1][col["psnr"]], rows[2][col["psnr"]]] == ["14.81", "14.80"]
    notes = footnotes(text)
    nc = re.fullmatch(r"n/c\[(\d+)\]", rows[1][col["image_reward"]])
    assert nc and notes[int(nc[1])] == f"image_reward not computed: {IR_REASON}"
    assert all(r[col["image_reward"]] == rows[1][col["image_reward"]] for r in rows[:8])
    ref_nc = re.fullmatch(r"n/c\[(\d+)\]", rows[0][col["lpips"]])
    assert ref_nc and notes[int(ref_nc[1])] == f"lpips not computed: {REF_REASON}"
    failed = rows[8]
    assert re.fullmatch(r"failed\[\d+\]", failed[col["Status"]])
    assert all(failed[col[m]] == "—" for m in ("fid", "lpips", "psnr"))
    fn = int(re.search(r"\d+", failed[col["Status"]])[0])
    assert notes[fn] == f"loraq W:mxfp4 A:mxfp4 r64 B:mxfp8_e4m3 failed: {FAIL_ERROR}"
    assert [r[col["Status"]] for r in rows[:8]] == ["finished"] * 8


def test_csv_holds_the_logged_numbers_and_failures(report: tuple[Path, str]) -> None:
    table = pd.read_csv(report[0] / "tables" / f"{PIXART}.csv")
    assert len(table) == 9 and list(table["status"]) == ["finished"] * 8 + ["failed"]
    assert table["fid"].iloc[0] == 20.512
    for (m, w, _, r, _, bpw, fid, lp, ps, _, _), (_, row) in zip(PIXART_CELLS, table.iloc[1:8].iterrows(), strict=True):
        assert (row["method"], row["weight_format"], row["rank"]) == (m, w, r)
        assert (row["fid"], row["lpips"], row["psnr"], row["bits_per_weight"]) == (fid, lp, ps, bpw)
        assert row["fid_n"] == 4 and row["image_reward_status"] == "not_computed"
        assert row["image_reward_reason"] == IR_REASON and row["fid_direction"] == "lower"
    failed = table.iloc[8]
    assert failed["error"] == FAIL_ERROR and pd.isna(failed["fid"]) and failed["rank"] == 64
    runs = pd.read_csv(report[0] / "tables" / "runs.csv")
    assert len(runs) == 11 and sorted(set(runs["experiment"])) == ["smoke", "smoke-sana"]
    assert (runs["status"] == "failed").sum() == 1 and "param.weight_format.group" in runs.columns
    sana = md_rows((report[0] / "tables" / f"{SANA}.md").read_text())
    assert [r[0] for r in sana[1:]] == ["16-bit reference", "rtn"] and sana[2][1] == "nvfp4"


def test_regenerating_gives_identical_files(store: tuple[str, Path], report: tuple[Path, str], tmp_path: Path) -> None:
    rc, _, err = run_report("--tracking-uri", store[0], "--out", str(tmp_path))
    assert rc == 0, err
    first = sorted(p.relative_to(report[0]) for p in report[0].rglob("*") if p.is_file())
    again = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert first == again and len(first) == 22
    for rel in first:  # tables, page, and the plots too (no timestamps in PNG or PDF)
        assert (report[0] / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def latex_cells(line: str) -> int:
    """Columns a tabular row spans (multicolumn counted by its span)."""
    cells = re.split(r"(?<!\\)&", line.rsplit(r"\\", 1)[0])
    return sum(int(m[1]) if (m := re.match(r"\s*\\multicolumn\{(\d+)\}", c)) else 1 for c in cells)


def check_latex(tex: str) -> None:
    """Structural checks that hold for any booktabs table a paper can \\input."""
    assert tex.isascii()
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    depth = 0
    chars = iter(body)
    for ch in chars:
        if ch == "\\":
            next(chars, None)  # an escaped character (\{ \} \% ...) or the start of a command
        elif ch in "{}":
            depth += 1 if ch == "{" else -1
            assert depth >= 0, "unbalanced }"
    assert depth == 0, "unbalanced {"
    assert re.search(r"(?<!\\)[_%#]", body) is None, "unescaped special character"
    assert len(re.findall(r"(?<!\\)\$", body)) % 2 == 0
    for env in ("table", "tabular"):
        assert body.count(rf"\begin{{{env}}}") == body.count(rf"\end{{{env}}}") == 1
    assert body.index(r"\toprule") < body.index(r"\midrule") < body.index(r"\bottomrule")
    spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", body)[1]
    inner = body[body.index(spec) + len(spec) + 1 : body.index(r"\end{tabular}")]
    rows = [line for line in inner.splitlines() if line.rstrip().endswith(r"\\")]
    assert rows and all(latex_cells(r) == len(spec) for r in rows), [latex_cells(r) for r in rows]


def test_latex_table_is_well_formed_and_compiles(report: tuple[Path, str], tmp_path: Path) -> None:
    tex = (report[0] / "tables" / f"{PIXART}.tex").read_text()
    check_latex(tex)
    check_latex((report[0] / "tables" / f"{SANA}.tex").read_text())
    assert r"\textbf{20.9}" in tex and r"\textbf{0.234}" in tex and "fid $\\downarrow$" in tex
    assert r"blocks.3.ff $|$ tried 50\% \& gave\_up \#2" in tex and r"int4\_g64" in tex
    assert r"\multicolumn{7}{c}{Configuration} & \multicolumn{5}{c}{Metrics}" in tex
    assert "n/c\\textsuperscript{1}" in tex and "failed\\textsuperscript{4}" in tex
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        return  # structural checks only (no TeX engine here)
    (tmp_path / "table.tex").write_text(tex)
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n\\input{table.tex}\n\\end{document}\n"
    )
    done = subprocess.run(
        [pdflatex, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", "doc.tex"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000
    log = (tmp_path / "doc.log").read_text(errors="replace").replace("\n", "")
    assert "pk>" not in log and ".pfb>" in log  # Type 1 fonts only: no bitmap glyph (e.g. a textcomp symbol)


def test_escaping_and_pareto_front() -> None:
    assert latex_escape("a_b 50% {x} ~ ^ \\ | $5 → ↓") == (
        r"a\_b 50\% \{x\} \~{} \^{} $\backslash$ $|$ {\char36}5 ? $\downarrow$"
    )
    assert latex_escape("café") == "cafe"
    pts = [(4.25, 35.0), (4.25, 31.8), (4.5, 33.0), (4.6, 21.0), (4.9, 22.0), (5.0, 20.0)]
    assert pareto_front(pts, higher_is_better=False) == [1, 3, 5]
    assert pareto_front([(1, 1.0), (2, 0.5), (3, 2.0)], higher_is_better=True) == [0, 2]


def fake_run(run_id: str, method: str, gen_steps: str, status: str = "FINISHED", start: int = 0, **params: str) -> Any:
    """An object shaped like an MLflow Run (info + data), for the grouping logic without a store."""
    tags = {"model": "m", "method": method, "prompt_set": "p", "is_reference": str(method == "none").lower(),
            "cell_hash": params.pop("cell_hash", run_id), "metric_direction.fid": "lower",
            "ptqbench.status": {"FINISHED": "finished", "FAILED": "failed"}.get(status, "running")}
    all_params = {"gen.steps": gen_steps, "n_prompts": "4", "gen.resolution": params.pop("resolution", "32"),
                  "method": method, **params}
    if method != "none":
        all_params.update(fmt_params("weight_format", "int4_g64") | fmt_params("act_format", "int4_g64"))
    info = SimpleNamespace(run_id=run_id, run_name=run_id, status=status, start_time=start, artifact_uri="")
    metrics = {"fid": 30.0 - start, "fid_n": 4.0} if status == "FINISHED" else {}
    return SimpleNamespace(info=info, data=SimpleNamespace(tags=tags, params=all_params, metrics=metrics))


@dataclasses.dataclass(frozen=True)
class Stepper(Method):
    """A method with an optimizer field named like the generation setting ``steps``."""

    steps: int = 100


def test_groups_split_by_settings_variants_and_duplicates() -> None:
    runs = [
        fake_run("a", "none", "2"), fake_run("b", "smoothquant", "2", alpha="0.8"),
        fake_run("c", "smoothquant", "2", alpha="0.5"), fake_run("d", "none", "4"),
        fake_run("e", "rtn", "4", status="RUNNING"),
        fake_run("f1", "rtn", "2", status="FAILED", start=5, cell_hash="h"), fake_run("f2", "rtn", "2", cell_hash="h"),
        fake_run("g", "stepper_test", "4", resolution="64", steps="100"), fake_run("r64", "none", "4", resolution="64"),
    ]
    records, notes = dedupe([RunRecord.from_run(r, "e") for r in runs])
    assert sorted(r.run_id for r in records) == ["a", "b", "c", "d", "e", "f2", "g", "r64"]
    assert notes == ["experiment e: cell h has several runs; showing f2 (finished), not f1 (failed)"]
    METHODS.register("stepper_test", Stepper)
    try:
        groups = make_groups(pd.DataFrame([r.row() for r in records]))
    finally:
        METHODS.unregister("stepper_test")
    assert [g.slug for g in groups] == ["e--m--p--steps2_resolution32", "e--m--p--steps4_resolution32",
                                        "e--m--p--steps4_resolution64"]
    assert groups[0].title == "m · p (n_prompts=4, steps=2, resolution=32) · e"
    assert [r["row_label"] for r in groups[0].rows] == [
        "16-bit reference", "rtn W:int4_g64 A:int4_g64", "smoothquant W:int4_g64 A:int4_g64 (alpha=0.5)",
        "smoothquant W:int4_g64 A:int4_g64 (alpha=0.8)"]
    # the method's own 'steps' field is a param of its own; generation steps are 'gen.steps'
    assert [r["run_id"] for r in groups[2].rows] == ["r64", "g"] and groups[2].rows[1]["steps"] == "4"
    assert groups[2].rows[1]["params"]["steps"] == "100"
    text = to_markdown(build_table(groups[1]))
    assert "| rtn | int4_g64 | int4_g64 | — | — | — | — | — | running[1] |" in text
    assert "[1] rtn W:int4_g64 A:int4_g64 running: the run has not finished (running, or killed)" in text


# ----------------------------------------------------------------------------- plots and page


def test_plots_are_written_and_skips_noted(report: tuple[Path, str]) -> None:
    out, stdout = report
    plots = out / "plots"
    for kind in ("rank", "pareto", "layer-errors", "samples"):
        png, pdf = plots / f"{PIXART}--{kind}.png", plots / f"{PIXART}--{kind}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in plots.glob(f"{SANA}--*.png")) == [f"{SANA}--layer-errors.png", f"{SANA}--samples.png"]
    assert "tiny-sana" in stdout
    assert "rank plot skipped (no method and branch format was run at several ranks)" in stdout
    assert "bits-vs-metric plot skipped" in stdout
    with Image.open(plots / f"{PIXART}--samples.png") as img:
        grid = np.asarray(img.convert("RGB")).astype(float)
    assert grid.shape[0] > grid.shape[1]  # 8 rows (reference + 7 finished runs) x 4 prompts
    assert grid.std() > 30  # images, not an empty canvas


class _Cells(HTMLParser):
    """Texts of the <td> cells, row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None
        self.images = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self.cell = []
        elif tag == "img" and (dict(attrs).get("src") or "").startswith("data:image/png;base64,"):
            self.images += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self.cell is not None:
            self.rows[-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def test_html_is_self_contained(report: tuple[Path, str]) -> None:
    page = (report[0] / "index.html").read_text()
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert links and all(u.startswith(("data:", "#")) for u in links)
    assert "<script" not in page and "@import" not in page and "url(" not in page
    parser = _Cells()
    parser.feed(page)
    assert parser.images == 6
    assert ["loraq", "mxfp4", "mxfp4", "mxfp8_e4m3", "32", "4.600", "1087", "20.9", "n/c1", "0.234", "18.60", "0.710",
            "finished"] in parser.rows


def chromium() -> str:
    """The headless browser, or fail (skip only with PTQBENCH_SKIP_BROWSER=1)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    message = ("headless Chromium is needed to check the HTML report: install the Debian package `chromium` "
               "(apt-get install chromium)")
    if os.environ.get("PTQBENCH_SKIP_BROWSER") == "1":
        pytest.skip(f"{message}; skipped because PTQBENCH_SKIP_BROWSER=1")
    pytest.fail(f"{message}, or set PTQBENCH_SKIP_BROWSER=1 to skip this check locally")


def browse(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars", "--force-device-scale-factor=1"]
    done = subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_html_renders_in_headless_chromium(report: tuple[Path, str], tmp_path: Path) -> None:
    exe = chromium()
    url = (report[0] / "index.html").as_uri()
    shot = tmp_path / "page.png"
    browse(exe, tmp_path / "p1", f"--screenshot={shot}", "--window-size=1280,2000",
           "--virtual-time-budget=5000", url)
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB")).astype(float)
    assert pixels.shape == (2000, 1280, 3)
    assert pixels.std() > 20 and (pixels.min(-1) < 240).mean() > 0.03  # not blank
    assert ((pixels.max(-1) - pixels.min(-1)) > 80).mean() > 0.002  # colored plots were decoded and drawn
    dom = browse(exe, tmp_path / "p2", "--dump-dom", "--virtual-time-budget=5000", url).stdout
    parser = _Cells()
    parser.feed(dom)
    rows = [r for r in parser.rows if r]
    assert rows[0][:8] == ["16-bit reference", "—", "—", "—", "—", "16.000", "2512", "20.5"]
    assert any(r[0] == "loraq" and r[-1] == "failed4" for r in rows)
    assert parser.images == 6


def test_bad_input_exits_2_without_creating_a_store(store: tuple[str, Path], tmp_path: Path) -> None:
    rc, _, err = run_report("--tracking-uri", store[0], "--experiment", "nope", "--out", str(tmp_path / "r"))
    assert rc == 2 and "unknown experiment(s) nope" in err and "smoke, smoke-sana" in err
    missing = tmp_path / "missing.db"
    rc, _, err = run_report("--tracking-uri", f"sqlite:///{missing}", "--out", str(tmp_path / "r"))
    assert rc == 2 and "no MLflow store" in err and not missing.exists()
    assert not (tmp_path / "r").exists()
    (tmp_path / "file").write_text("x")
    rc, _, err = run_report("--tracking-uri", store[0], "--out", str(tmp_path / "file"))
    assert rc == 2 and "is not a folder" in err


def test_experiment_filter_replaces_the_previous_report(
    store: tuple[str, Path], report: tuple[Path, str], tmp_path: Path
) -> None:
    out = tmp_path / "report"
    shutil.copytree(report[0], out)
    (out / "plots" / "mine.png").write_bytes(b"not written by the report")
    rc, stdout, err = run_report("--tracking-uri", store[0], "--experiment", "smoke-sana", "--out", str(out))
    assert rc == 0, err
    assert "2 runs in 1 tables" in stdout
    tables = sorted(p.name for p in (out / "tables").iterdir())
    assert tables == ["runs.csv", f"{SANA}.csv", f"{SANA}.md", f"{SANA}.tex"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "mine.png", f"{SANA}--layer-errors.pdf", f"{SANA}--layer-errors.png", f"{SANA}--samples.pdf",
        f"{SANA}--samples.png"]  # the stale smoke plots are gone, a file the report did not write stays
    assert json.loads((out / "manifest.json").read_text())["files"][0] == "index.html"


def test_missing_browser_fails_unless_skipped_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("PTQBENCH_SKIP_BROWSER", raising=False)
    with pytest.raises(pytest.fail.Exception, match="install the Debian package `chromium`"):
        chromium()
    monkeypatch.setenv("PTQBENCH_SKIP_BROWSER", "1")
    with pytest.raises(pytest.skip.Exception, match="PTQBENCH_SKIP_BROWSER=1"):
        chromium()


def test_artifacts_download_path_for_remote_stores(store: tuple[str, Path], tmp_path: Path) -> None:
    """Without a local artifact folder (a remote server), artifacts are listed and downloaded."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store[0])
    exp = client.get_experiment_by_name("smoke-sana").experiment_id
    ref = next(r for r in client.search_runs([exp]) if r.data.tags["method"] == "none")
    artifacts = Artifacts(client, tmp_path, {})
    index = artifacts.json(ref.info.run_id, "samples/index.json")
    assert [e["prompt"] for e in index] == PROMPTS
    local = artifacts.get(ref.info.run_id, "samples/001.png")
    assert local is not None and local.is_relative_to(tmp_path) and Image.open(local).size == (32, 32)
    assert artifacts.get(ref.info.run_id, "layer_errors.csv") is None and artifacts.notes == []


# ----------------------------------------------------------------------------- intervals and the paired "best"


def test_intervals_and_paired_best_marking(tmp_path: Path) -> None:
    """psnr (per-image tables): bold = not significantly worse than the best by the paired test, though
    all three intervals overlap; fid (intervals only): overlap with the best's; CSV lo/hi; warnings."""
    from ptqbench.metrics.base import MetricResult, read_per_image, write_per_image
    from ptqbench.report.tables import best_rows, bootstrap_config, table_frame

    g = np.random.default_rng(0)
    keys, seeds = [f"k{i:02d}" for i in range(24)], list(range(24))
    prompt = g.normal(20.0, 4.0, 24)  # shared by every method: wide intervals, tight paired differences
    psnr = {"a": prompt + 1.0 + g.normal(0, 0.2, 24), "c": prompt + g.normal(0, 0.2, 24)}
    psnr["b"] = psnr["a"] + g.normal(0, 0.2, 24)
    fid = {"a": (10.0, 8.0, 14.0), "b": (12.0, 10.0, 14.0), "c": (30.0, 25.0, 36.0)}
    records = [RunRecord.from_run(fake_run("ref", "none", "2"), "e").row()]
    for i, name in enumerate("abc"):
        rec = RunRecord.from_run(fake_run(name, "smoothquant", "2", alpha=f"0.{i + 1}"), "e").row()
        values = tuple(psnr[name].tolist())
        res = MetricResult("psnr", float(np.mean(values)), 24, per_image=values)
        path = write_per_image(tmp_path / name / "per_image.csv", keys[::-1], seeds[::-1],
                               {"psnr": MetricResult("psnr", res.value, 24, per_image=values[::-1])})
        rec["per_image"] = read_per_image(path)
        lo, hi = float(np.quantile(values, 0.05)), float(np.quantile(values, 0.95))
        rec["metrics"].update({"psnr": res.value, "psnr_n": 24.0, "psnr.lo": lo, "psnr.hi": hi,
                               "fid": fid[name][0], "fid.lo": fid[name][1], "fid.hi": fid[name][2]})
        rec["tags"]["metric_direction.psnr"] = "higher"
        rec["metric_names"] = ("fid", "psnr")
        records.append(rec)
    records[3]["tags"]["metric_warning.fid"] = "n=24 is below the feature dimension 2048"
    (group,) = make_groups(pd.DataFrame(records))
    rows = {r["run_id"]: i for i, r in enumerate(group.rows)}
    config = bootstrap_config(group.rows)
    psnr_info, fid_info = (next(m for m in group.metrics if m.name == n) for n in ("psnr", "fid"))
    assert best_rows(group, psnr_info, config) == ({rows["a"], rows["b"]}, "paired")
    assert best_rows(group, fid_info, config) == ({rows["a"], rows["b"]}, "overlap")
    table = build_table(group)
    text = to_markdown(table)
    col = {c.header.split()[0]: j for j, c in enumerate(table.columns)}
    cells = {rid: table.rows[i] for rid, i in rows.items()}
    assert cells["a"][col["psnr"]].bold and cells["b"][col["psnr"]].bold and not cells["c"][col["psnr"]].bold
    assert "±" in cells["a"][col["psnr"]].text or "[" in cells["a"][col["psnr"]].text
    assert cells["a"][col["fid"]].text == "10.0 [8.0, 14.0]"  # asymmetric intervals: [lo, hi]
    assert cells["c"][col["fid"]].notes and "below the feature dimension" in text
    assert "not significantly worse than the best quantized cell: paired bootstrap at the 95% level" in table.legend
    assert "set metrics: 95% intervals overlap" in table.legend and "bootstrap interval" in table.legend
    from ptqbench.report.html import table_html
    from ptqbench.report.tables import to_latex

    assert '<strong>10.0<span class="ci"> [8.0, 14.0]</span></strong>' in table_html(table)
    assert r"\textbf{10.0 [8.0, 14.0]}" in to_latex(table)
    frame = table_frame(group).set_index("run_id")
    assert frame.loc["a", "fid_lo"] == 8.0 and frame.loc["a", "fid_hi"] == 14.0 and "fid.lo" not in frame.columns
    assert frame.loc["ref", "psnr_lo"] == "" or pd.isna(frame.loc["ref", "psnr_lo"])
    # an old run without intervals or per-image values: the plain best value, as before
    old = [dict(r, per_image=None, metrics={k: v for k, v in r["metrics"].items() if "." not in k}) for r in records]
    (plain,) = make_groups(pd.DataFrame(old))
    top = max("abc", key=lambda k: float(np.mean(psnr[k])))
    assert best_rows(plain, psnr_info, config) == ({rows[top]}, "value")
    assert "±" not in to_markdown(build_table(plain)) and "the best shown value" in build_table(plain).legend


def test_per_image_table_round_trips_exactly(tmp_path: Path) -> None:
    from ptqbench.metrics.base import MetricResult, per_image_frame, read_per_image, write_per_image

    values = (0.1 + 0.2, 1e-300, 123456.78901234567, 100.0)
    results = {"psnr": MetricResult("psnr", 1.0, 4, per_image=values),
               "fid": MetricResult("fid", 3.0, 4), "ssim": MetricResult("ssim", 0.5, 4, per_image=(1, 0, 0.5, 0.25))}
    path = write_per_image(tmp_path / "per_image.csv", ["007", "a,b", "c", "d"], [1, 2, 3, 2**32 - 1], results)
    back = read_per_image(path)
    assert list(back.columns) == ["key", "seed", "psnr", "ssim"]  # set metrics have no per-image column
    assert back["key"].tolist() == ["007", "a,b", "c", "d"] and back["seed"].tolist() == [1, 2, 3, 2**32 - 1]
    assert tuple(back["psnr"]) == values
    with pytest.raises(ValueError, match="3 per-image values for 4 images"):
        per_image_frame(list("abcd"), [1, 2, 3, 4], {"x": MetricResult("x", 1.0, 3, per_image=(1.0, 2.0, 3.0))})


def test_runs_without_per_image_values_are_noted_and_not_compared(store: tuple[str, Path],
                                                                  report: tuple[Path, str]) -> None:
    """Runs logged before per-image values were kept: one note, and ``--compare`` says why it cannot."""
    uri, _ = store
    assert "finished run(s) have no readable per_image.csv" in report[1]
    rc, _, err = run_report("--tracking-uri", uri, "--compare", "rtn W:mxfp4 A:mxfp4", "reference")
    assert rc == 2 and "--compare reference: 2 runs have this label" in err and "--experiment" in err
    rc, _, err = run_report("--tracking-uri", uri, "--experiment", "smoke", "--compare", "rtn W:mxfp4 A:mxfp4",
                            "reference")
    assert rc == 2 and "has no per-image values: no per_image.csv" in err


def test_compare_and_the_loader_read_per_image_artifacts(tmp_path: Path) -> None:
    """Two runs with per_image.csv (written by the metrics' writer, in other key orders): ``--compare``
    pairs them by key and prints the paired difference; an unreadable table is a note, not a crash."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from ptqbench.metrics.base import MetricResult, write_per_image
    from ptqbench.report.load import attach_per_image, load_runs
    from ptqbench.uncertainty import Bootstrap, paired_difference

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    g = np.random.default_rng(1)
    keys, seeds = [f"k{i}" for i in range(12)], list(range(100, 112))
    base = g.normal(15.0, 3.0, 12)
    values = {"a": base + 0.5 + g.normal(0, 0.1, 12), "b": base + g.normal(0, 0.1, 12), "c": base}
    ids = {}
    for name, w in (("a", "mxfp4"), ("b", "int4_g64"), ("c", "nvfp4")):
        ids[name] = log_cell(client, exp, tmp_path / "work", model="tiny-pixart", method="rtn",
                             params=method_params("rtn", w, w), bpw=4.25, metrics={"psnr": float(values[name].mean())})
        order = slice(None, None, -1) if name == "b" else slice(None)
        table = tmp_path / name / "per_image.csv"
        if name == "c":
            table.parent.mkdir()
            table.write_text("not,a,table\n1,2,3\n")
        else:
            write_per_image(table, keys[order], seeds[order],
                            {"psnr": MetricResult("psnr", 0.0, 12, per_image=tuple(values[name][order]))})
        client.log_artifact(ids[name], str(table))
        client.log_batch(ids[name], params=[Param(f"ci.{k}", v) for k, v in (("level", "0.9"), ("seed", "3"))])
    rc, out, err = run_report("--tracking-uri", uri, "--compare", "rtn W:mxfp4 A:mxfp4", ids["b"])
    assert rc == 0, err
    expected = paired_difference(values["a"], values["b"], Bootstrap(level=0.9, seed=3))
    [line] = [x for x in out.splitlines() if x.startswith("psnr ")]
    assert f"{expected.diff:.3f}" in line and f"[{expected.lo:.3f}, {expected.hi:.3f}]" in line
    assert line.endswith("A better") and "90% interval" in out
    runs = load_runs(client)
    artifacts = Artifacts(client, tmp_path / "dl", dict(zip(runs.frame["run_id"], runs.frame["artifact_uri"],
                                                            strict=True)))
    attach_per_image(runs, artifacts)
    tables = dict(zip(runs.frame["run_id"], runs.frame["per_image"], strict=True))
    assert tables[ids["c"]] is None and "per_image.csv is unreadable" in " ".join(artifacts.notes)
    assert tables[ids["a"]]["key"].tolist() == keys and tables[ids["b"]]["key"].tolist() == keys[::-1]
