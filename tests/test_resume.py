"""Resume inside a cell: a run SIGKILLed mid-generation keeps its verified images, its calibration
and its quantized layers, generates only the missing images and ends bit-identical to a run that
was never interrupted; the image store's own contract (atomic files, verified index parts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fresh_store, sigkill_when

from ptqbench import cli
from ptqbench.imagestore import PARTS, ImageFolder, ImageWriter
from ptqbench.prompts import PromptSet, get_prompt_set
from ptqbench.suite import expand, load_suite
from ptqbench.tracking import Tracker

pytestmark = pytest.mark.usefixtures("one_thread", "eager_formats")  # the killed subprocess inherits the environment

N = 6
SUITE = f"""
name: resume
models: [tiny-pixart]
defaults: {{steps: 2, resolution: 32, batch_size: 1}}
prompts: {{set: builtin, n: {N}}}
calibration: {{set: builtin-calib, n: 1, steps: 2, rows: 16}}
metrics: [psnr]
methods:
  - {{method: smoothquant, format: mxfp4}}
"""
# Slows the cell's image writes (not the cached reference's) so the test can kill it in the middle.
LAUNCHER = """
import sys, time
import torch
torch.set_num_threads(1)
from ptqbench import imagestore
write = imagestore.ImageWriter.write
def slow(self, indices, images):
    out = write(self, indices, images)
    if "cells" in self.folder.parts:
        time.sleep(1.0)
    return out
imagestore.ImageWriter.write = slow
from ptqbench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _args(root: Path, suite: Path) -> list[str]:
    return ["run", str(suite), "--tracking-uri", f"sqlite:///{root}/mlflow.db", "--cache-dir", str(root / "cache"),
            "--out", str(root / "cells"), "--device", "cpu", "--threads", "1"]


def _run(root: Path) -> dict:
    tracker = Tracker(f"sqlite:///{root}/mlflow.db")
    [run] = [r for r in tracker.runs(tracker.experiment("resume")) if r.tags["method"] == "smoothquant"]
    return {"status": run.status, "generated": run.metrics["images_generated"], "psnr": run.metrics["psnr"],
            "tags": run.tags}


def _lines(folder: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (folder / PARTS).glob("*.jsonl")) if folder.exists() else 0


def test_killed_cell_resumes_with_only_the_missing_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template_db: Path
) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE, encoding="utf-8")
    cell = expand(load_suite(suite))[1]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    images = killed / "cells" / cell.hash / "images"
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER, encoding="utf-8")
    fresh_store(killed, template_db)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(launcher), *_args(killed, suite)], stdout=log, stderr=log)
    sigkill_when(proc, lambda: _lines(images) >= 2, "the cell wrote 2 images", (tmp_path / "killed.log").read_text)
    kept = ImageWriter(images, get_prompt_set("builtin", N)).done()
    assert 2 <= len(kept) < N and not (images / "index.json").exists()
    mtimes = {e["file"]: (images / e["file"]).stat().st_mtime_ns for e in kept.values()}
    assert list((killed / "cells" / cell.hash / "quantized").glob("*.pt"))  # the quantized layers were saved

    # resumed in-process: neither calibration nor quantization may run again
    def refuse(*args, **kwargs):
        raise AssertionError("a resumed cell must take this from the cache")

    monkeypatch.setattr("ptqbench.calibration.StatsCollector", refuse)
    monkeypatch.setattr("ptqbench.evaluate._quantize", refuse)
    assert cli.main(_args(killed, suite)) == 0
    resumed = _run(killed)
    assert resumed["status"] == "FINISHED" and resumed["generated"] == N - len(kept)
    assert {f: (images / f).stat().st_mtime_ns for f in mtimes} == mtimes  # kept files were not rewritten
    assert not (killed / "cells" / cell.hash / "quantized").exists()  # dropped once the cell finished

    monkeypatch.undo()
    fresh_store(clean, template_db)
    assert cli.main(_args(clean, suite)) == 0
    fresh = _run(clean)
    assert fresh["generated"] == N and fresh["psnr"] == resumed["psnr"]
    other = clean / "cells" / cell.hash / "images"
    for e in json.loads((other / "index.json").read_text()):
        assert (images / e["file"]).read_bytes() == (other / e["file"]).read_bytes(), e["file"]
    assert json.loads((images / "index.json").read_text()) == json.loads((other / "index.json").read_text())
    assert resumed["tags"]["images_dir"] == str(images.resolve())


def _prompts(n: int) -> PromptSet:
    return PromptSet("t", tuple(f"k{i}" for i in range(n)), tuple(f"p{i}" for i in range(n)))


def test_store_keeps_only_verified_images_and_assembles_parts(tmp_path: Path) -> None:
    prompts = _prompts(5)
    imgs = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    a, b = ImageWriter(tmp_path, prompts, "rank0"), ImageWriter(tmp_path, prompts, "rank1")
    a.write([0, 2], imgs[[0, 2]])  # two writers fill one folder, each its share
    b.write([1, 3], imgs[[1, 3]])
    assert a.missing() == [4]
    with pytest.raises(RuntimeError, match="1 images missing"):
        a.finalize()
    (tmp_path / "00003.png").write_bytes(b"truncated")  # a damaged file is not kept
    with open(tmp_path / PARTS / "rank1.jsonl", "a") as f:
        f.write('{"index": 4, "key"')  # a line cut by a kill is ignored
    assert a.missing() == [3, 4]
    b.write([3, 4], imgs[[3, 4]])
    entries = a.finalize()
    assert [e["index"] for e in entries] == list(range(5)) and not list(tmp_path.glob(".*.tmp"))
    folder = ImageFolder(tmp_path)
    assert folder.shape == (5, 3, 8, 8) and len(folder) == 5 and folder.keys == list(prompts.keys)
    assert torch.equal(folder[1:4], imgs[1:4]) and torch.equal(folder[2], imgs[2]) and torch.equal(folder.load(), imgs)
    assert ImageWriter(tmp_path, prompts, "rank2").missing() == []  # a complete folder is final


def test_disk_backed_metric_inputs_equal_in_memory_ones(tmp_path: Path) -> None:
    from ptqbench.metrics.base import MetricInputs, get_metric

    prompts = _prompts(3)
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=gen)
    ref = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=gen)
    for name, x in (("img", imgs), ("ref", ref)):
        w = ImageWriter(tmp_path / name, prompts)
        w.write(range(3), x)
        w.finalize()
    disk = MetricInputs.from_folders(tmp_path / "img", tmp_path / "ref", list(prompts.prompts))
    memory = MetricInputs(imgs, ref, list(prompts.prompts))
    assert disk.n == 3 and torch.equal(disk.images, memory.images) and torch.equal(disk.reference, memory.reference)
    for metric in ("psnr", "ssim"):
        assert get_metric(metric)(disk).value == get_metric(metric)(memory).value


@pytest.mark.slow
def test_store_memory_does_not_grow_with_n() -> None:
    """Peak host memory of generating and scoring n and 4n 256 px images (fresh processes)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "store_memory.py"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # large buffers back to the OS when freed
    out = subprocess.run([sys.executable, str(script), "--compare", "8", "32", "--resolution", "256"],
                         check=True, capture_output=True, text=True, env=env).stdout
    small, large = (json.loads(line) for line in out.splitlines())
    grown = large["all_images_uint8_mib"] - small["all_images_uint8_mib"]  # 4.5 MiB more images (13.5 as float)
    assert large["generate_peak_mib"] - small["generate_peak_mib"] < grown / 3, (small, large)
    assert large["score_peak_mib"] - small["score_peak_mib"] < grown / 3, (small, large)


class _Noise:
    """A pipeline stand-in: seeded noise images whose values depend on the whole batch (as batched
    kernels may), so only the same batches give the same images."""

    transformer = torch.nn.Linear(1, 1)

    def generate(self, prompts, seeds, settings, progress=None):
        batch = torch.stack([torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return (batch + 1e-3 * len(seeds)).clamp(0, 1)


def test_ranks_fill_one_folder_like_one_process(tmp_path: Path) -> None:
    from ptqbench.generation import generate_images, share
    from ptqbench.models.base import GenSettings

    prompts, settings = _prompts(7), GenSettings(steps=1, guidance=1.0, resolution=8, batch_size=2)
    one = generate_images(_Noise(), prompts, settings, tmp_path / "one")
    shares = [share(7, 2, r, 3) for r in range(3)]
    assert shares == [[0, 1, 6], [2, 3], [4, 5]] and one.generated == 7
    for r, indices in enumerate(shares):
        assert generate_images(_Noise(), prompts, settings, tmp_path / "dp", indices=indices, part=f"rank{r}",
                               finalize=False) is None
    assert sorted(p.name for p in (tmp_path / "dp" / PARTS).iterdir()) == ["rank0.jsonl", "rank1.jsonl", "rank2.jsonl"]
    ImageWriter(tmp_path / "dp", prompts).finalize()
    assert (tmp_path / "dp" / "index.json").read_bytes() == (tmp_path / "one" / "index.json").read_bytes()
    again = generate_images(_Noise(), prompts, settings, tmp_path / "dp")  # complete: nothing to generate
    assert again.generated == 0 and torch.equal(again.load(), one.load())
