"""Every code block and command of README.md, read from the README itself (an edit there reruns here).

Long jobs run at test size: suites as ``--dry-run``, ``bench --small`` with one timed forward,
``layers`` on the tiny PixArt, the "Adding a method" example in a two-prompt suite through the CLI
(in a fresh interpreter whose HOME, temp folder and working directory are empty folders: the run
writes only into ``--cache-dir`` and the tracking store). The two set-up commands (a fresh
virtualenv) cannot run inside a test: the test command must be what ``.ci/run`` runs, and the main
job's ``ptqbench`` parts run as a dry run / parse.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from conftest import fresh_store
from torch import nn

from ptqbench.cli import build_parser
from ptqbench.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PROSE = FENCED.sub("", README)
INLINE = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", PROSE)]

pytestmark = pytest.mark.usefixtures("one_thread")


def blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCED.findall(README) if kind == lang]


def section(title: str) -> str:
    """The README text under ``## title`` up to the next heading."""
    match = re.search(rf"^## {re.escape(title)}.*?\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match[1]


def ptqbench_argv(command: str) -> list[str]:
    """The arguments after ``ptqbench`` of a shell command (env assignments and a venv path dropped)."""
    words = shlex.split(command, comments=True)
    at = next(i for i, w in enumerate(words) if w == "ptqbench" or w.endswith("/ptqbench"))
    return words[at + 1 :]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli(argv)
    out, err = capsys.readouterr()
    return code, out, err


def dry_run(suite: str | Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    code, out, err = run_cli(["run", str(suite), "--dry-run", *extra], capsys)
    assert code == 0, err
    return out


def cells_of(out: str) -> int:
    return int(re.search(r"^# (\d+) cells", out, re.M)[1])


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README commands use relative paths (suites/...): run them from the repository root, but with
    default outputs (./mlflow.db, reports/, layer_errors.csv) redirected by each test."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PTQBENCH_COMPILE", "0")  # eager fake-quant: no kernel builds in these short runs


# ----------------------------------------------------------------------------- set-up, main job, tests


def test_main_job_command(capsys, tmp_path: Path) -> None:
    setup = blocks("bash")[0].strip()
    parts = [p.strip() for p in setup.split("&&")]
    assert parts[:2] == ["python3 -m venv .venv", ".venv/bin/pip install -e ."]
    run, report = (ptqbench_argv(p) for p in parts[2:])
    assert run[:2] == ["run", "suites/fmnist.yaml"] and report[0] == "report"
    # "Measured on one H200: 110 s for the 19 cells": the suite's grid has that many cells
    measured = int(re.search(r"Measured[^:]*: \d+ s for the (\d+) cells", README)[1])
    assert cells_of(dry_run(run[1], capsys, *run[2:])) == measured
    args = build_parser(report).parse_args(report)
    assert args.experiment == ["fmnist"] == [Path(run[1]).stem] and args.out == Path("reports/fmnist")
    assert "HF_HUB_OFFLINE=1" in parts[2]


def test_test_command_is_what_ci_runs() -> None:
    readme = blocks("bash")[1].strip()
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if ln.strip()]
    assert lines[-1] == readme
    assert "pytest" in readme and ".[test]" in readme


def test_installed_diffusers_honours_dtype(tmp_path: Path) -> None:
    """pyproject's diffusers bound is a release whose from_pretrained takes ``dtype`` (0.40): what the
    loaders pass. Older releases ignore it and load float32."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if d.startswith("diffusers"))
    assert Version(metadata.version("diffusers")) in req.specifier
    assert not req.specifier.contains("0.39.0") and req.specifier.contains("0.40.0")
    from diffusers import PixArtTransformer2DModel

    from ptqbench.models.diffusers_models import build_transformer

    config = {"num_layers": 1, "sample_size": 4, "num_attention_heads": 2, "attention_head_dim": 8,
              "cross_attention_dim": 16, "caption_channels": 8, "norm_num_groups": 2}
    build_transformer("pixart-sigma", "cpu", **config).save_pretrained(tmp_path / "t")
    loaded = PixArtTransformer2DModel.from_pretrained(tmp_path / "t", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- quickstart, suites


def test_quickstart(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [ln for ln in blocks("bash")[2].splitlines() if ln.strip()]
    assert len(lines) == 4  # list, dry run, shard, report: each checked below

    [listed] = [ln for ln in lines if ptqbench_argv(ln) == ["list", "models"]]
    code, out, _ = run_cli(["list", "models"], capsys)
    names = {row.split()[0] for row in out.splitlines()}
    promised = listed.split("#")[1].replace("...", "").replace(",", " ").split()
    assert code == 0 and set(promised) <= names

    dry = next(ptqbench_argv(ln) for ln in lines if "--dry-run" in ln)
    code, out, err = run_cli(dry, capsys)
    assert code == 0, err
    header = out.splitlines()[0]
    assert all(word in header for word in ("rank", "bits/weight", "model bytes"))
    total = cells_of(out)

    shard = next(ptqbench_argv(ln) for ln in lines if "--shard" in ln)
    i, n = map(int, shard[shard.index("--shard") + 1].split("/"))
    assert cells_of(dry_run(shard[1], capsys, "--shard", f"{i}/{n}")) in (total // n, math.ceil(total / n))
    # offline, without the weights or prompts: exit code 2 and one line that says how to provide them
    for var in [v for v in os.environ if v.startswith(("PTQBENCH_MODEL_", "PTQBENCH_MJHQ"))]:
        monkeypatch.delenv(var)
    code, _, err = run_cli([*shard, "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--cache-dir",
                            str(tmp_path / "cache")], capsys)
    assert code == 2 and re.search(r"PTQBENCH_(MJHQ|MODEL_)", err), err

    report = next(ptqbench_argv(ln) for ln in lines if ptqbench_argv(ln)[0] == "report")
    args = build_parser(report).parse_args(report)
    assert args.experiment == [Path(dry[1]).stem] and args.out == Path("reports") / args.experiment[0]


def test_every_shipped_suite_is_in_the_table_and_dry_runs(capsys) -> None:
    table = re.findall(r"^\| `(suites/[\w.]+)` \|", README, re.M)
    assert sorted(table) == sorted(f"suites/{p.name}" for p in (ROOT / "suites").glob("*.yaml"))
    for suite in table:
        assert cells_of(dry_run(suite, capsys)) > 0


def test_suite_example_dry_runs(capsys, tmp_path: Path) -> None:
    [text] = blocks("yaml")
    (tmp_path / "my_study.yaml").write_text(text, encoding="utf-8")
    out = dry_run(tmp_path / "my_study.yaml", capsys)
    # 16-bit reference, svdquant x [int4_g64, mxfp4], two loraq variants at a solved rank
    assert cells_of(out) == 5 and out.count("rank solved: equal memory") == 2


# ----------------------------------------------------------------------------- Python


def test_python_snippet() -> None:
    [snippet] = [b for b in blocks("python") if "get_format" in b]
    torch.manual_seed(0)
    x = torch.randn(8, 256) * torch.rand(256) * 4
    linear = nn.Linear(256, 128)
    scope = {"x": x, "linear": linear}
    exec(compile(snippet, "README.md (Python)", "exec"), scope)
    y, fmt, q = scope["y"], scope["fmt"], scope["q"]
    assert y.shape == x.shape and y.dtype == x.dtype and not torch.equal(y, x)  # "same shape and dtype"
    assert fmt.bits(x.shape) == 8 * 256 * 4 + 8 * (256 // 32) * 8  # mxfp4: 4-bit elements, one 8-bit scale per 32
    w, bits = q.effective_weight(), q.bits()
    assert w.shape == linear.weight.shape and bits > 0
    assert (w - linear.weight).norm() < (get_rtn(linear) - linear.weight).norm()  # the branch helps


def get_rtn(linear: nn.Linear) -> torch.Tensor:
    from ptqbench import get_method

    return get_method("rtn", weight_format="mxfp4", act_format="mxfp4").quantize_layer(linear).effective_weight()


# ----------------------------------------------------------------------------- other commands


def inline(prefix: str) -> list[str]:
    return [c for c in INLINE if c.startswith(prefix)]


def test_every_inline_command_is_covered() -> None:
    covered = ("ptqbench list ", "ptqbench layers ", "ptqbench bench", "ptqbench train-default ")
    commands = inline("ptqbench ")
    assert commands and all(c.startswith(covered) for c in commands), commands
    other = [c for c in INLINE if c.startswith((".venv/", "mlflow ", "pip "))]
    assert len(other) == 2, other  # the CPU torch wheel (a pip command) and mlflow ui: checked below
    from ptqbench.tracking import DEFAULT_URI

    ui = shlex.split(next(c for c in other if c.startswith("mlflow ")))
    assert ui[:2] == ["mlflow", "ui"] and ui[ui.index("--backend-store-uri") + 1] == DEFAULT_URI
    assert (Path(sys.executable).parent / "mlflow").exists()


def test_list_commands(capsys) -> None:
    commands = {tuple(ptqbench_argv(c)) for c in inline("ptqbench list ")}
    assert {c[1] for c in commands} >= {"metrics", "methods", "layers"}
    for argv in commands:
        code, out, _ = run_cli(list(argv), capsys)
        assert code == 0 and len(out.splitlines()) >= 4, argv


def test_layers_command(capsys, tmp_path: Path) -> None:
    [command] = inline("ptqbench layers ")
    spec = re.search(r"e\.g\. `(\w+:[^`]+)`", PROSE)[1]
    argv = [{"MODEL": "tiny-pixart", "SPEC": spec}.get(w, w) for w in ptqbench_argv(command)]
    out_csv = tmp_path / "errors.csv"
    code, out, err = run_cli([*argv, "--max-layers", "2", "--rows", "16", "--out", str(out_csv)], capsys)
    assert code == 0, err
    assert "2 layers of tiny-pixart" in out and "equal memory with: svdquant" in out and out_csv.is_file()


def test_bench_commands(capsys) -> None:
    commands = set(inline("ptqbench bench"))
    assert commands == {"ptqbench bench", "ptqbench bench --small"}
    timing = ["--iters", "1", "--warmup", "0", "--tokens", "8", "--batch", "1", "--no-graph"]
    code, out, err = run_cli([*ptqbench_argv("ptqbench bench --small"), *timing], capsys)
    assert code == 0, err
    assert "W4A4 nvfp4 + rank-32 bf16 branch" in out and "floor of one extra read+write pass" in out
    if not torch.cuda.is_available():  # the full-size run needs a GPU and says so
        code, _, err = run_cli(ptqbench_argv("ptqbench bench"), capsys)
        assert code == 2 and "--small" in err


def test_train_default_command_parses(tmp_path: Path) -> None:
    """Retraining takes GPU minutes and the Fashion-MNIST files: its command line is checked, not run."""
    [command] = inline("ptqbench train-default ")
    argv = [str(tmp_path) if w == "DIR" else w for w in ptqbench_argv(command)]
    assert build_parser(argv).parse_args(argv).out == str(tmp_path)


# ----------------------------------------------------------------------------- a method plugin, isolated run


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _plugin(folder: Path) -> tuple[str, str]:
    """The README's method file and an installed distribution declaring its entry point (as the
    README's pyproject line does); returns the suite lines the README shows for it."""
    [code] = [b for b in blocks("python") if "register_method" in b]
    module = re.match(r"# (\w+)\.py\n", code)[1]
    (folder / f"{module}.py").write_text(code, encoding="utf-8")
    text = section("Adding a method: one file")
    group, name, value = re.search(r'\[project\.entry-points\."([\w.]+)"\] (\w+) = "([\w.:]+)"', text).groups()
    assert value == module
    info = folder / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {value}\n", encoding="utf-8")
    method, field = re.search(r"in suites \(`(method: \w+)`, `(\w+: \[[^\]]+\])`\)", text).groups()
    return method, field


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_method_example_in_a_suite_writes_only_to_its_cache_and_store(tmp_path: Path, template_db: Path) -> None:
    """A user's view: a fresh interpreter, the README's plugin installed as a distribution, HOME and
    the temp folder empty, no XDG_* / TORCH_HOME / MPLCONFIGDIR / PTQBENCH_CACHE. Its metrics include
    fd_fmnist with another classifier, so real-image statistics are computed and cached too."""
    from ptqbench.models import fmnist
    from ptqbench.tracking import Tracker

    plugin, home, tmp, work, data = (tmp_path / d for d in ("plugin", "home", "tmp", "work", "data"))
    for d in (plugin, home, tmp, work, data):
        d.mkdir()
    method_line, field_line = _plugin(plugin)
    torch.manual_seed(0)
    fmnist.save_classifier(data / "own.safetensors", fmnist.FMNISTClassifier(width=4, features=8), {})
    rng = np.random.default_rng(0)
    _write_idx(data / "t10k-images-idx3-ubyte", rng.integers(0, 256, (16, 28, 28)), 2051)
    _write_idx(data / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 16), 2049)
    suite = work / "suite.yaml"
    suite.write_text(textwrap.dedent(f"""\
        name: readme_plugin
        models: [{{name: tiny-pixart, steps: 2, resolution: 32, batch_size: 2}}]
        prompts: {{set: builtin, n: 2}}
        calibration: {{set: builtin-calib, n: 1, steps: 2, rows: 16}}
        metrics: [fd_fmnist, psnr]
        methods:
          - {{method: rtn, format: mxfp4}}
          - {method_line}
            format: mxfp4
            {field_line}
        """), encoding="utf-8")
    uri = fresh_store(tmp_path / "store", template_db)  # a migrated store: the run need not create one
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TMPDIR": str(tmp),
        "PYTHONPATH": os.pathsep.join([str(plugin), str(ROOT)]), "HF_HUB_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # the plugin stands for an installed package: no __pycache__ beside it
        "MLFLOW_TRACKING_URI": uri, "PTQBENCH_COMPILE": "0", "PTQBENCH_FASHION_MNIST": str(data),
        "PTQBENCH_FMNIST_CLASSIFIER": str(data / "own.safetensors"),
    }
    before = _files(tmp_path)

    def ptqbench(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ptqbench", *argv], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)

    listed = ptqbench("list", "methods")
    assert listed.returncode == 0 and re.search(r"^my_ptq +RTN on a clipped weight", listed.stdout, re.M), listed
    done = ptqbench("run", str(suite), "--cache-dir", str(tmp_path / "cache"), "--threads", "1")
    assert done.returncode == 0, done.stderr[-3000:]

    tracker = Tracker(uri)
    runs = tracker.runs(tracker.experiment("readme_plugin"))
    assert len(runs) == 4 and all(r.status == "FINISHED" for r in runs)  # reference, rtn, my_ptq x 2 clips
    mine = sorted(r.params["clip"] for r in runs if r.params.get("method") == "my_ptq")
    assert mine == ["0.8", "0.9"]
    assert all("fd_fmnist" in r.metrics for r in runs) and any("psnr" in r.metrics for r in runs)

    changed = {p for p, t in _files(tmp_path).items() if before.get(p) != t}
    outside = {p for p in changed if not p.startswith(("cache", "store")) and not p.startswith("tmp/torchinductor_")}
    assert outside <= {"tmp"}, sorted(outside)  # HOME, the working directory and the inputs untouched
    assert not any(home.iterdir()) and [p.name for p in work.iterdir()] == ["suite.yaml"]
    assert {p.name for p in (tmp_path / "cache").iterdir()} >= {"reference", "calibration", "fmnist_stats", "runs"}


def test_real_image_statistics_go_to_the_given_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FID-style metrics keep a real folder's feature statistics in ``MetricInputs.cache`` (the run's
    ``--cache-dir``), not under the default root."""
    from PIL import Image

    from ptqbench.cache import Cache
    from ptqbench.metrics import fid
    from ptqbench.metrics.base import MetricInputs

    class PixelFD(fid.FrechetMetric):  # a feature network of 3 channel means and 3 channel maxima
        name, against = "pixel_fd", "real"

        def load_network(self, device: str) -> fid.FeatureNet:
            return fid.FeatureNet("pixels", 16, lambda x: torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1), device)

    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(real / f"{i}.png")
    cache = Cache(tmp_path / "cache")
    images = torch.rand(4, 3, 16, 16)
    first = PixelFD()(MetricInputs(images, real_dir=real, cache=cache))
    [entry] = [p for p in (tmp_path / "cache" / "real_feature_stats").iterdir() if p.is_dir()]  # beside its .lock
    assert first.status == "ok" and (entry / "stats.npz").is_file() and cache.done("real_feature_stats", entry.name)
    assert not (Cache().path("real_feature_stats", entry.name)).exists()
    monkeypatch.setattr("cleanfid.fid.get_files_features", lambda *a, **k: pytest.fail("not served from the cache"))
    assert PixelFD()(MetricInputs(images, real_dir=real, cache=cache)).value == first.value
