"""The report of ``suites/smoke.yaml`` and ``suites/fmnist.yaml`` shows intervals and the paired "best"
marking: each suite as shipped (its metrics, ``uncertainty`` block, prompts and calibration), on a
reduced grid (one model, two or three cells, fewer steps) so that it runs in seconds on a CPU."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import fresh_store

from ptqbench import cli

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# suite -> what is kept of it: the first model, these method entries (first format each), fewer steps / prompts
REDUCED = {
    "smoke": {"methods": [0, 1], "defaults": {"steps": 2}},
    "fmnist": {"methods": [0, 1], "model": {"steps": 2}, "prompts": {"n": 10}},
}


def reduced_suite(name: str, folder: Path) -> tuple[Path, dict[str, Any]]:
    data = yaml.safe_load((ROOT / "suites" / f"{name}.yaml").read_text(encoding="utf-8"))
    keep = REDUCED[name]
    model = data["models"][0]
    data["models"] = [{**model, **keep["model"]} if isinstance(model, dict) else model]
    data["defaults"] = {**data.get("defaults", {}), **keep.get("defaults", {})} if "defaults" in data else None
    if data["defaults"] is None:
        del data["defaults"]
    data["prompts"] = {**data["prompts"], **keep.get("prompts", {})}
    methods = []
    for i in keep["methods"]:
        entry = dict(data["methods"][i])
        if isinstance(entry.get("format"), list):
            entry["format"] = entry["format"][0]
        methods.append(entry)
    data["methods"] = methods
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path, data


@pytest.mark.parametrize("name", ["smoke", "fmnist"])
def test_suite_report_shows_intervals_and_the_paired_best(
    name: str, tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PTQBENCH_COMPILE", "0")  # eager fake-quant: no kernel builds for a few images
    suite, data = reduced_suite(name, tmp_path)
    uri = fresh_store(tmp_path, template_db)
    common = ["--tracking-uri", uri, "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert cli.main(["run", str(suite), *common]) == 0
    assert cli.main(["report", "--tracking-uri", uri, "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    tables = tmp_path / "report" / "tables"
    [md] = [p for p in tables.glob(f"{name}--*.md")]
    text = md.read_text(encoding="utf-8")
    level = f"{data['uncertainty']['level']:.0%}"
    assert f"paired bootstrap at the {level} level on per-image differences" in text
    assert f"the {level} bootstrap interval" in text

    metrics = [m if isinstance(m, str) else m["name"] for m in data["metrics"]]
    csv = pd.read_csv(md.with_suffix(".csv"))
    quantized = csv[csv["method"] != "none"]
    assert len(quantized) == 2 and set(quantized["status"]) == {"finished"}
    computed = [m for m in metrics if (quantized[f"{m}_status"] == "ok").all()]
    assert "psnr" in computed and "ssim" in computed  # lpips (smoke) may lack its weights: n/c
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:] if "16-bit" not in line]
    for m in computed:
        assert (quantized[f"{m}_lo"] <= quantized[m]).all() and (quantized[m] <= quantized[f"{m}_hi"]).all()
        col = next(i for i, h in enumerate(header) if h.split()[0] == m)
        cells = [row[col] for row in rows]
        assert all(re.search(r" ± | \[", c) for c in cells), (m, cells)  # every value with its interval
        assert any(c.startswith("**") for c in cells), (m, cells)  # the best and those not worse, in bold
    tex, html = md.with_suffix(".tex").read_text(), (tmp_path / "report" / "index.html").read_text()
    assert r"\textbf{" in tex and (r"$\pm$" in tex or "[" in tex) and 'class="ci"' in html
